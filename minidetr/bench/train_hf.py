"""The reference row of ``python -m minidetr bench train``: HuggingFace's Deformable DETR.

:func:`bench_hf` times one training iteration of transformers'
``DeformableDetrForObjectDetection`` (PyTorch) the way :mod:`minidetr.bench.train`
times minidetr's: forward with the labels (its own Hungarian matcher and losses),
backward, gradient clipping at 0.1, AdamW, and reading the loss on the host, with the
same synthetic batch on the same device. torch and transformers are imported only here
and only when asked for; minidetr never depends on them.

The model is built from a ``DeformableDetrConfig`` that matches the minidetr preset
(:func:`hf_config`): d_model, heads, encoder/decoder layers, FFN width, dropout, queries,
feature levels, sampling points, classes, box refinement, two-stage, auxiliary losses
and the matcher's costs. Its backbone is transformers' own ResNet with random weights
(no download): ResNet-18/34/50 as in the preset, or, for ``tiny``, a one-block-per-stage
ResNet with the TinyBackbone's widths (close, not identical: the costs there are small
anyway). Which parameters train follows the official rule, as minidetr does: for a
ResNet the stem and the first stage are frozen, the rest trains (transformers' own rule
looks for ``stage.1`` in names that read ``stages.1`` and so would freeze the whole
backbone, skipping its backward); the tiny backbone trains whole.

Two-stage loss. The official implementation (and minidetr) also trains the encoder's
proposals: every encoder token's class-agnostic "object or not" logit and its box are
matched to the targets (labels set to 0) and get the focal, L1 and GIoU losses, the
``_enc`` terms of the loss. transformers 5's ``DeformableDetrForObjectDetectionLoss``
leaves them out (it passes only the final and auxiliary outputs to its criterion), so as
shipped its two-stage model computes no gradient for its proposal heads at all
(``enc_output``, ``enc_output_norm``, the last ``class_embed`` and ``bbox_embed``) and
skips one matching and one loss over every encoder token. ``hf_loss="official"`` (the
default, ``--hf-loss official``) adds those terms with transformers' own matcher and
criterion (:func:`hf_encoder_loss`), so that both frameworks time the same iteration;
``hf_loss="shipped"`` times transformers' loss as it is. Without two-stage the two are
the same.

The multi-scale deformable attention runs as transformers runs it by default (its
PyTorch ``grid_sample`` version unless a hub kernel is installed and reachable).

Timing: CUDA events on a GPU (``torch.cuda.Event``), ``time.perf_counter`` on a CPU.
Memory on a GPU: ``torch.cuda.max_memory_allocated`` over one iteration (peak),
``torch.cuda.memory_reserved`` (reserved, the caching allocator's counterpart of
CuPy's pool), the change of ``memory_allocated`` over the timed iterations (growth),
and the device's total; on a CPU the same peak resident size (``VmHWM``) as minidetr's rows.
"""
from __future__ import annotations

import importlib.util

import numpy as np

from .common import CpuMemory, cpu_time_ms, synthetic_batch, time_steps

# transformers ResNetConfig arguments of each minidetr backbone
RESNETS = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2],
                     hidden_sizes=[64, 128, 256, 512], embedding_size=64),
    "resnet34": dict(layer_type="basic", depths=[3, 4, 6, 3],
                     hidden_sizes=[64, 128, 256, 512], embedding_size=64),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3],
                     hidden_sizes=[256, 512, 1024, 2048], embedding_size=64),
}


def hf_status(device):
    """(True, "transformers X, torch Y") when the comparison can run on ``device``,
    else (False, why not)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"{' and '.join(missing)} not installed (pip install torch transformers)"
    from importlib.metadata import version
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            return False, f"torch {torch.__version__} sees no CUDA device"
    # On a CPU torch is not imported here: its rows run in a process of their own.
    return True, f"transformers {version('transformers')}, torch {version('torch')}"


# The child process of the CPU rows: torch is imported first, so that it starts its
# threads with its own defaults, before ``import minidetr`` sets minidetr's (see
# minidetr/__init__.py); its rows come back as one JSON line on stdout.
_CHILD = """
import json, sys
import torch, transformers
from minidetr.bench.train_hf import bench_hf
rows = [bench_hf(**request) for request in json.loads(sys.argv[1])]
print("MINIDETR-HF-ROWS " + json.dumps(rows))
"""


def bench_hf_in_child(requests):
    """transformers' CPU rows, each ``bench_hf(**request)``, in a fresh Python process.

    Why a process of their own: minidetr's thread settings (BLAS one thread per call,
    Numba's OpenMP workers passive; minidetr/__init__.py) are process-wide, and torch
    reads the same variables when it starts: in minidetr's process, torch would start
    with one thread and passive OpenMP workers, measured 1.4-1.7x slower than on its own
    (671 vs 451-490 ms at ``small``). The child gets the environment minus the variables
    that ``import minidetr`` set (your own settings, e.g. glibc's ``MALLOC_*``, pass on),
    so each framework runs with its defaults and its own peak memory (``VmHWM``: its own
    program's, not including minidetr's process before the ``exec``).
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import minidetr

    env = {k: v for k, v in os.environ.items() if k not in minidetr.THREAD_SETTINGS_MADE}
    package_parent = str(Path(minidetr.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH"))
                                        if p)
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(requests)], env=env,
                          capture_output=True, text=True)
    marker = "MINIDETR-HF-ROWS "
    lines = [line for line in done.stdout.splitlines() if line.startswith(marker)]
    if done.returncode != 0 or not lines:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"transformers' rows failed in their own process (exit code "
                           f"{done.returncode}):\n{tail}")
    return json.loads(lines[-1][len(marker):])


def hf_config(cfg):
    """A transformers ``DeformableDetrConfig`` matching the minidetr ModelConfig ``cfg``."""
    from transformers import DeformableDetrConfig, ResNetConfig

    if cfg.backbone == "tiny":
        c = cfg.tiny_channels
        resnet = dict(layer_type="basic", depths=[1, 1, 1, 1], hidden_sizes=list(c),
                      embedding_size=c[0])
    else:
        resnet = RESNETS[cfg.backbone]
    stages = ["stage2", "stage3", "stage4"] if cfg.num_feature_levels > 1 else ["stage4"]
    return DeformableDetrConfig(
        backbone_config=ResNetConfig(**resnet, out_features=stages),
        d_model=cfg.d_model, encoder_attention_heads=cfg.nheads,
        decoder_attention_heads=cfg.nheads, encoder_layers=cfg.enc_layers,
        decoder_layers=cfg.dec_layers, encoder_ffn_dim=cfg.dim_feedforward,
        decoder_ffn_dim=cfg.dim_feedforward, dropout=cfg.dropout,
        num_queries=cfg.num_queries, two_stage_num_proposals=cfg.num_queries,
        num_feature_levels=cfg.num_feature_levels, encoder_n_points=cfg.n_points,
        decoder_n_points=cfg.n_points, num_labels=cfg.num_classes,
        auxiliary_loss=cfg.aux_loss, with_box_refine=cfg.with_box_refine,
        two_stage=cfg.two_stage, class_cost=_whole(cfg.set_cost_class),
        bbox_cost=_whole(cfg.set_cost_bbox), giou_cost=_whole(cfg.set_cost_giou),
        bbox_loss_coefficient=_whole(cfg.bbox_loss_coef),
        giou_loss_coefficient=_whole(cfg.giou_loss_coef), focal_alpha=cfg.focal_alpha)


def _whole(value):
    """2.0 -> 2: transformers 5 declares the costs and loss coefficients as ints."""
    return int(value) if float(value).is_integer() else value


HF_LOSSES = ("official", "shipped")


def hf_encoder_loss(outputs, labels, config):
    """The official two-stage ``_enc`` loss terms for transformers' encoder proposals.

    As the official ``SetCriterion`` does for ``outputs["enc_outputs"]``: every target's
    label is set to 0 (one class-agnostic "object" class), the proposals are matched to
    the targets by transformers' own Hungarian matcher, and its own criterion gives the
    focal, L1 and GIoU losses (and the cardinality error, logged, not weighed), weighed
    as transformers weighs its other terms.

    Args:
        outputs: transformers' ``DeformableDetrObjectDetectionOutput`` of a two-stage
            model, with ``enc_outputs_class`` (B, S, num_classes) and
            ``enc_outputs_coord_logits`` (B, S, 4), S = the encoder's tokens.
        labels: the list of target dicts given to the model (``class_labels``, ``boxes``).
        config: the model's ``DeformableDetrConfig``.

    Returns:
        a scalar torch tensor, the weighted sum of the ``_enc`` terms.
    """
    import torch
    from transformers.loss.loss_deformable_detr import (DeformableDetrHungarianMatcher,
                                                         DeformableDetrImageLoss)

    matcher = DeformableDetrHungarianMatcher(class_cost=config.class_cost,
                                             bbox_cost=config.bbox_cost,
                                             giou_cost=config.giou_cost)
    criterion = DeformableDetrImageLoss(matcher=matcher, num_classes=config.num_labels,
                                        focal_alpha=config.focal_alpha,
                                        losses=["labels", "boxes", "cardinality"])
    binary = [{**t, "class_labels": torch.zeros_like(t["class_labels"])} for t in labels]
    proposals = {"logits": outputs.enc_outputs_class,                       # (B, S, C)
                 "pred_boxes": outputs.enc_outputs_coord_logits.sigmoid()}   # (B, S, 4)
    terms = criterion(proposals, binary)
    weights = {"loss_ce": 1, "loss_bbox": config.bbox_loss_coefficient,
               "loss_giou": config.giou_loss_coefficient}    # transformers' own weights
    return sum(terms[k] * w for k, w in weights.items())


def build_hf_model(cfg, device, seed=0):
    """transformers' detector for ``cfg`` on ``device``, training mode, official freezing."""
    import torch
    from transformers import DeformableDetrForObjectDetection

    torch.manual_seed(seed)
    model = DeformableDetrForObjectDetection(hf_config(cfg))
    for name, p in model.model.backbone.named_parameters():
        trained_stage = any(f"stages.{i}." in name for i in (1, 2, 3))
        p.requires_grad_(cfg.backbone == "tiny" or trained_stage)
    return model.to(torch.device(device)).train()


def hf_inputs(batch, device):
    """A minidetr ``Batch`` as transformers' arguments: pixel_values, pixel_mask (1 =
    valid pixel, the opposite of minidetr's mask) and labels (class_labels, boxes)."""
    import torch

    dev = torch.device(device)
    pixel_values = torch.from_numpy(batch.images).to(dev)                   # (B, 3, H, W)
    pixel_mask = torch.from_numpy((~batch.mask).astype(np.int64)).to(dev)   # (B, H, W)
    labels = [{"class_labels": torch.from_numpy(t["labels"].astype(np.int64)).to(dev),
               "boxes": torch.from_numpy(t["boxes"]).to(dev)} for t in batch.targets]
    return pixel_values, pixel_mask, labels


class TorchCudaMemory:
    """Memory of a torch GPU row (see the module docstring)."""

    note = ("GPU (torch): peak = max_memory_allocated during one step; reserved = "
            "memory_reserved; growth = memory_allocated after the last timed step minus "
            "after the first")

    def __init__(self):
        import torch
        self.torch = torch
        torch.cuda.empty_cache()

    def in_use(self):
        return self.torch.cuda.memory_allocated()

    def peak_of_one(self, step):
        self.torch.cuda.reset_peak_memory_stats()
        step()
        return self.torch.cuda.max_memory_allocated()

    def summary(self, peak, in_use):
        cuda = self.torch.cuda
        return {"peak_bytes": peak, "reserved_bytes": cuda.memory_reserved(),
                "growth_bytes": in_use[-1] - in_use[0],
                "device_total_bytes": cuda.get_device_properties(0).total_memory}


def torch_cuda_time_ms(step):
    """Milliseconds between two CUDA events around ``step`` on torch's current stream."""
    import torch
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bench_hf(config, variant, device, batch, height, width, *, iterations, warmup, seed=0,
             threads=None, hf_loss="official"):
    """One row: transformers' training iteration for ``config``/``variant``.

    ``threads``: torch's CPU threads for this row (restored afterwards); None keeps
    torch's setting. On a CPU, ``bench_train`` runs this in a process of its own
    (:func:`bench_hf_in_child`). ``hf_loss``: "official" adds the two-stage encoder
    proposals' loss that transformers leaves out (the module docstring says why),
    "shipped" times transformers' loss as it is.
    """
    if hf_loss not in HF_LOSSES:
        raise ValueError(f"hf_loss must be one of {HF_LOSSES}, got {hf_loss!r}")
    import torch
    import transformers

    from ..models.config import get_config

    previous = torch.get_num_threads()
    if threads is not None and device == "cpu":
        torch.set_num_threads(threads)
    try:
        return _bench_hf_row(torch, transformers, get_config(config, variant), device, batch,
                             height, width, iterations=iterations, warmup=warmup, seed=seed,
                             hf_loss=hf_loss)
    finally:
        torch.set_num_threads(previous)


def _bench_hf_row(torch, transformers, cfg, device, batch, height, width, *, iterations,
                  warmup, seed, hf_loss):
    """The timed row of :func:`bench_hf` for the ModelConfig ``cfg``."""
    memory = TorchCudaMemory() if device == "cuda" else CpuMemory()
    model = build_hf_model(cfg, device, seed)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=2e-4, weight_decay=1e-4)
    data = synthetic_batch(batch, height, width, cfg.num_classes, np.random.default_rng(seed))
    pixel_values, pixel_mask, labels = hf_inputs(data, device)

    encoder_loss = cfg.two_stage and hf_loss == "official"

    def step():
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        loss = out.loss
        if encoder_loss:
            loss = loss + hf_encoder_loss(out, labels, model.config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 0.1)
        optimizer.step()
        loss.item()                         # the logged loss, as minidetr's step reads it

    timer = torch_cuda_time_ms if device == "cuda" else cpu_time_ms
    result = time_steps(step, iterations=iterations, warmup=warmup, timer=timer,
                        memory=memory)
    return {"framework": "transformers", **result, "memory_note": memory.note,
            "versions": f"transformers {transformers.__version__}, torch {torch.__version__}",
            "torch_threads": torch.get_num_threads(),
            "hf_loss": hf_loss}


__all__ = ["bench_hf", "bench_hf_in_child", "hf_status", "hf_config", "build_hf_model", "hf_inputs",
           "hf_encoder_loss", "HF_LOSSES"]
