"""Fidelity check: minidetr and HuggingFace transformers compute the same numbers.

The released checkpoints are not needed. The check builds minidetr's DeformableDETR
with random weights, nudges every parameter and buffer (so nothing that starts at zero
or one -- offset weights, attention weights, the last box layer, biases, batch-norm
statistics -- hides a mistake), copies those *identical* weights into transformers'
``DeformableDetrForObjectDetection`` (loaded strictly: every key on both sides must be
used), runs both in eval mode on the same padded two-image batch, and prints the largest
absolute difference of every intermediate and final tensor::

    pip install torch transformers          # only for this script, never a dependency
    python tools/compare_with_transformers.py                      # all variants, f32 + f64
    python tools/compare_with_transformers.py --variants two-stage --dtypes float64

What is compared, per variant (plain, refine, two-stage) and dtype:

=========================  ==================================================================
row                        tensors
=========================  ==================================================================
backbone (relative)        C3, C4, C5 of the ResNet (FrozenBatchNorm), divided by the
                           largest |value| (a random ResNet's C5 reaches ~1e5)
masks                      per-level padding masks (number of differing entries)
pos_embed                  sine position embeddings, non-padded positions
pos_embed (padding)        the same at padded positions (see "Padding" below)
input_proj                 the L projected levels (1x1 conv / strided 3x3 conv + GroupNorm)
memory                     encoder output, non-padded tokens
memory (padding)           encoder output, padded tokens
enc_logits, enc_boxes      two-stage: the proposal head on every token
init_reference             the decoder's initial reference points / boxes
references                 the reference after every decoder layer
hs                         every decoder layer's output
logits, boxes              the heads' outputs of every decoder layer
pred_logits, pred_boxes    the final predictions
=========================  ==================================================================

transformers runs its pure-PyTorch multi-scale deformable attention (``grid_sample``):
a model built from a config, as here, never swaps in a hub kernel (that takes an
explicit ``kernelize()``), and the script checks that the ``kernels`` package is absent
or says so. Self-attention uses the "eager" implementation (a plain softmax).

Padding. The official sine embedding divides by ``valid extent + 1e-6``, which is 1e-6
in rows and columns that are padding only, so positions there get phases of about 3e6
radians, where one rounding step of the phase changes the sine by O(1). Padded tokens
never reach a valid output (their values are zeroed before every deformable attention,
and in two-stage their memory is zeroed before the proposal head), so they are reported
in rows of their own, "(padding)": a difference there would not change any prediction.
(Both implementations evaluate the same float32 expression, so they agree there too.)

Known transformers deviations that the script works around or explains:

* Refine (``with_box_refine`` without ``two_stage``): transformers ties every class head
  to ``class_embed.0`` (its ``_tied_weights_keys``), while the official model has one
  independent class head per decoder layer. The script unties them (independent copies
  before loading) and says so; without that, every auxiliary layer's logits differ.
* Two-stage in float64: transformers computes the proposal sine embedding in float32
  whatever the model dtype (the official code: float32 frequencies, the rest in the
  model dtype), so float64 two-stage rows differ at ~1e-7 from the decoder on, not
  ~1e-14. float32 is unaffected.

Weight mapping (minidetr keys are the official ones, see docs/model.md section 8):
``backbone.0.body`` -> ``model.backbone.model`` with transformers' ResNet names,
``transformer.`` -> ``model.``, encoder ``norm1/linear1/linear2/norm2`` ->
``self_attn_layer_norm/mlp.fc1/mlp.fc2/final_layer_norm``, decoder ``cross_attn`` ->
``encoder_attn``, ``norm1/norm2/norm3`` -> ``encoder_attn_layer_norm/
self_attn_layer_norm/final_layer_norm``, ``self_attn.in_proj_*`` split row-wise into
``q_proj/k_proj/v_proj``, ``self_attn.out_proj`` -> ``self_attn.o_proj``,
``query_embed`` -> ``model.query_position_embeddings``; the heads keep their names.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from minidetr.autograd import no_grad  # noqa: E402
from minidetr.models import build_model, get_config  # noqa: E402
from minidetr.weights.layouts import official_to_transformers  # noqa: E402

VARIANTS = ("plain", "refine", "two-stage")
DTYPES = ("float32", "float64")

# A small model: every architectural feature of the paper's, at CPU-test size.
DEFAULT_MODEL = dict(backbone="resnet18", d_model=64, nheads=8, enc_layers=2, dec_layers=2,
                     dim_feedforward=128, num_feature_levels=4, n_points=4, num_queries=20,
                     num_classes=10, dropout=0.1, seed=0)
DEFAULT_SIZES = ((96, 128), (128, 96))     # (H, W) of the two images before padding


# =========================================================================== environment
def torch_status():
    """(True, "torch X, transformers Y") if both import, else (False, why not)."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return False, (f"{' and '.join(missing)} not installed; this check needs "
                       f"`pip install torch transformers` (never a minidetr dependency)")
    import torch
    import transformers
    return True, f"torch {torch.__version__}, transformers {transformers.__version__}"


def msda_note():
    """Which deformable-attention code transformers runs here."""
    if importlib.util.find_spec("kernels") is None:
        return "transformers MSDA: PyTorch grid_sample path (no `kernels` package)"
    return ("transformers MSDA: PyTorch grid_sample path (`kernels` is installed, but a "
            "model built from a config is not kernelized)")


# =========================================================================== weights
def perturbed_model(cfg, rng):
    """minidetr's model for ``cfg`` with every floating array nudged, in eval mode.

    Initial values that would hide an error are moved away: zero offset and attention
    weights, zero biases, the zero last box layer, LayerNorm/GroupNorm (1, 0) and the
    identity FrozenBatchNorm statistics.
    """
    model = build_model(cfg)
    state = model.state_dict()
    first_name = {}                          # shared heads: nudge each tensor once
    for key, tensor in model._state_items():
        first_name.setdefault(id(tensor), key)
    aliases = {key: first_name[id(tensor)] for key, tensor in model._state_items()}
    for key, value in state.items():
        if aliases[key] != key:
            state[key] = state[aliases[key]]          # (its first name came earlier)
            continue
        if value.dtype.kind != "f":
            continue
        if key.endswith("running_var"):
            state[key] = rng.uniform(0.5, 1.5, value.shape).astype(value.dtype)
            continue
        scale = 0.1 if key.endswith(("running_mean", "bn1.weight", "bn2.weight", "bn3.weight",
                                     "1.weight", "norm.weight")) else 0.02
        if "sampling_offsets.weight" in key:
            scale = 0.05             # offsets of a few pixels / box fractions
        elif "attention_weights" in key:
            scale = 0.1              # clearly non-uniform attention
        state[key] = (value + scale * rng.standard_normal(value.shape)).astype(value.dtype)
    model.load_state_dict(state)
    return model.eval()


def to_hf_state_dict(state):
    """minidetr (= official) state dict -> transformers' names (its own ResNet backbone),
    as NumPy arrays: :func:`minidetr.weights.layouts.official_to_transformers`."""
    return dict(official_to_transformers(state, "transformers 5", backbone="transformers"))


def hf_model_like(cfg, state, dtype):
    """transformers' detector for ``cfg`` holding ``state`` (a minidetr state dict),
    loaded strictly, in eval mode and ``dtype``; returns (model, note or None)."""
    import torch
    from transformers import DeformableDetrForObjectDetection

    from minidetr.bench.train_hf import hf_config

    config = hf_config(cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = DeformableDetrForObjectDetection(config)
    note = untie_refine_class_heads(model, cfg)
    weights = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in
               to_hf_state_dict(state).items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise KeyError(f"weight mapping incomplete: transformers keys without a minidetr "
                       f"counterpart {missing}; mapped keys transformers lacks {unexpected}")
    model.load_state_dict(weights, strict=True)
    return model.to(getattr(torch, dtype)).eval(), note


def untie_refine_class_heads(model, cfg):
    """Give a transformers refine model one independent class head per layer, as the
    official model has; returns a note when it had to (see the module docstring)."""
    import torch

    heads = model.class_embed
    if not cfg.with_box_refine or heads[0].weight is not heads[-1].weight:
        return None
    model.class_embed = torch.nn.ModuleList(copy.deepcopy(h) for h in heads)
    return ("transformers ties all class heads of a refine model to class_embed.0 "
            "(official: one per layer); untied here before loading")


# =========================================================================== inputs and runs
def make_batch(sizes, dtype, rng):
    """Random images of ``sizes`` (H, W), zero-padded bottom/right into one batch.

    Returns images (B, 3, Hmax, Wmax) of ``dtype`` and mask (B, Hmax, Wmax) bool, True on
    padding.
    """
    H = max(h for h, _ in sizes)
    W = max(w for _, w in sizes)
    images = np.zeros((len(sizes), 3, H, W), dtype)
    mask = np.ones((len(sizes), H, W), bool)
    for i, (h, w) in enumerate(sizes):
        images[i, :, :h, :w] = rng.standard_normal((3, h, w))
        mask[i, :h, :w] = False
    return images, mask


def run_minidetr(model, images, mask):
    """Every compared tensor of minidetr's forward pass, as NumPy arrays."""
    with no_grad():
        features, _, _ = model.backbone(images, mask)
        srcs, masks, pos = model.project_features(images, mask)
        T = model.transformer
        src, mask_flat, lvl_pos, shapes, starts, ratios = T.flatten_levels(srcs, masks, pos)
        memory = T.encoder(src, shapes, starts, ratios, lvl_pos, mask_flat)
        query_embed = None if model.two_stage else model.query_embed.weight
        inner = T(srcs, masks, pos, query_embed)
        out = model(images, mask)
    layers = out.get("aux_outputs", []) + [out]
    result = {
        "backbone": [f.data for f in features],
        "masks": list(masks),
        "pos_embed": [p.data for p in pos],
        "input_proj": [s.data for s in srcs],
        "memory": memory.data,
        "mask_flat": mask_flat,
        "init_reference": inner.init_reference.data,
        "references": inner.inter_references.data,                 # (layers, N, Nq, 2|4)
        "hs": inner.hs.data,                                         # (layers, N, Nq, C)
        "logits": np.stack([o["pred_logits"].data for o in layers]),
        "boxes": np.stack([o["pred_boxes"].data for o in layers]),
        "pred_logits": out["pred_logits"].data,
        "pred_boxes": out["pred_boxes"].data,
    }
    if model.two_stage:
        result["enc_logits"] = out["enc_outputs"]["pred_logits"].data
        result["enc_boxes"] = out["enc_outputs"]["pred_boxes"].data
    return result


def run_hf(model, images, mask):
    """The same tensors from transformers' forward pass (batch first, as minidetr)."""
    import torch

    pixel_values = torch.from_numpy(images)
    pixel_mask = torch.from_numpy((~mask).astype(np.int64))          # 1 = valid pixel
    inner = model.model
    with torch.no_grad():
        feats = inner.backbone(pixel_values, pixel_mask)             # [(feature, valid), ...]
        srcs = [proj(f) for proj, (f, _) in zip(inner.input_proj, feats)]
        valid = [m for _, m in feats]
        for level in range(len(feats), inner.config.num_feature_levels):
            srcs.append(inner.input_proj[level](feats[-1][0] if level == len(feats)
                                                else srcs[-1]))
            valid.append(torch.nn.functional.interpolate(
                pixel_mask[None].to(pixel_values.dtype), size=srcs[-1].shape[-2:])
                .to(torch.bool)[0])
        pos = [inner.position_embedding(shape=s.shape, device=s.device, dtype=s.dtype, mask=m)
               for s, m in zip(srcs, valid)]
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    layers_logits, layers_boxes = _hf_layer_outputs(model, out)
    result = {
        "backbone": [f.numpy() for f, _ in feats],
        "masks": [(~m).numpy() for m in valid],
        "pos_embed": [p.numpy() for p in pos],
        "input_proj": [s.numpy() for s in srcs],
        "memory": out.encoder_last_hidden_state.numpy(),
        "init_reference": out.init_reference_points.numpy(),
        "references": out.intermediate_reference_points.transpose(0, 1).numpy(),
        "hs": out.intermediate_hidden_states.transpose(0, 1).numpy(),
        "logits": layers_logits,
        "boxes": layers_boxes,
        "pred_logits": out.logits.numpy(),
        "pred_boxes": out.pred_boxes.numpy(),
    }
    if out.enc_outputs_class is not None:
        result["enc_logits"] = out.enc_outputs_class.numpy()
        result["enc_boxes"] = out.enc_outputs_coord_logits.sigmoid().numpy()
    return result


def _hf_layer_outputs(model, out):
    """Logits and boxes of every decoder layer (transformers returns only the last
    unless labels are given), recomputed with its own heads as its forward does."""
    import torch
    from transformers.models.deformable_detr.modeling_deformable_detr import inverse_sigmoid

    hs = out.intermediate_hidden_states                               # (N, layers, Nq, C)
    refs = out.intermediate_reference_points
    logits, boxes = [], []
    with torch.no_grad():
        for i in range(hs.shape[1]):
            reference = out.init_reference_points if i == 0 else refs[:, i - 1]
            delta = model.bbox_embed[i](hs[:, i])
            offset = inverse_sigmoid(reference)
            if reference.shape[-1] == 4:
                delta = delta + offset
            else:
                delta = torch.cat([delta[..., :2] + offset, delta[..., 2:]], -1)
            logits.append(model.class_embed[i](hs[:, i]).numpy())
            boxes.append(delta.sigmoid().numpy())
    return np.stack(logits), np.stack(boxes)


# =========================================================================== comparison
def _max_abs(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    return float(np.abs(a - b).max()) if a.size else 0.0


def compare(mini, hf):
    """{row name: max |minidetr - transformers|} (for masks: the number of differing entries)."""
    rows = {"backbone (relative)": max(_max_abs(a, b) / float(np.abs(b).max())
                                       for a, b in zip(mini["backbone"], hf["backbone"])),
            "masks": float(sum(int((a != b).sum()) for a, b in zip(mini["masks"], hf["masks"])))}
    valid_d = pad_d = 0.0
    for p_mini, p_hf, m in zip(mini["pos_embed"], hf["pos_embed"], mini["masks"]):
        diff = np.abs(p_mini.astype(np.float64) - p_hf)               # (N, C, H, W)
        valid_d = max(valid_d, float(diff.transpose(0, 2, 3, 1)[~m].max()))
        if m.any():
            pad_d = max(pad_d, float(diff.transpose(0, 2, 3, 1)[m].max()))
    rows["pos_embed"], rows["pos_embed (padding)"] = valid_d, pad_d
    rows["input_proj"] = max(_max_abs(a, b) for a, b in zip(mini["input_proj"], hf["input_proj"]))
    pad = mini["mask_flat"]
    diff = np.abs(mini["memory"].astype(np.float64) - hf["memory"])
    rows["memory"] = float(diff[~pad].max())
    rows["memory (padding)"] = float(diff[pad].max()) if pad.any() else 0.0
    for name in ("enc_logits", "enc_boxes", "init_reference", "references", "hs", "logits",
                 "boxes", "pred_logits", "pred_boxes"):
        if name in mini or name in hf:
            rows[name] = _max_abs(mini[name], hf[name])
    return rows


def compare_variant(variant, dtype="float32", sizes=DEFAULT_SIZES, msda_backend=None,
                    **model_overrides):
    """Build both models with identical weights and compare them on one batch.

    Args:
        variant: "plain", "refine" or "two-stage".
        dtype: "float32" or "float64".
        sizes: (H, W) of each image before padding.
        msda_backend: minidetr's MSDA backend (None: automatic; float64 uses "numpy").
        model_overrides: ModelConfig fields over :data:`DEFAULT_MODEL`.

    Returns:
        (rows, note): rows maps a row name to its max abs difference (see
        :func:`compare`); note says what was changed on the transformers side, or None.
    """
    ok, why = torch_status()
    if not ok:
        raise RuntimeError(why)
    fields = {**DEFAULT_MODEL, **model_overrides}
    if msda_backend is None and dtype == "float64":
        msda_backend = "numpy"
    cfg = get_config("small", variant, **fields, msda_backend=msda_backend)
    if cfg.backbone == "tiny":
        raise ValueError("the TinyBackbone has no transformers counterpart; use a ResNet")
    rng = np.random.default_rng(cfg.seed)
    model = perturbed_model(cfg, rng)
    hf, note = hf_model_like(cfg, model.state_dict(), dtype)
    model.astype(dtype)
    images, mask = make_batch(sizes, dtype, rng)
    rows = compare(run_minidetr(model, images, mask), run_hf(hf, images, mask))
    return rows, note


def format_table(results):
    """results: {(variant, dtype): rows} -> a text table, one column per run."""
    columns = list(results)
    names = []
    for rows in results.values():
        names += [n for n in rows if n not in names]
    header = ["output"] + [f"{v} {d}" for v, d in columns]
    lines = [header]
    for name in names:
        cells = [name]
        for column in columns:
            value = results[column].get(name)
            cells.append("-" if value is None else
                         (f"{int(value)}" if name == "masks" else f"{value:.2e}"))
        lines.append(cells)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--backbone", default=DEFAULT_MODEL["backbone"],
                        choices=("resnet18", "resnet34", "resnet50"))
    parser.add_argument("--d-model", type=int, default=DEFAULT_MODEL["d_model"])
    parser.add_argument("--queries", type=int, default=DEFAULT_MODEL["num_queries"])
    parser.add_argument("--seed", type=int, default=DEFAULT_MODEL["seed"])
    parser.add_argument("--msda-backend", default=None,
                        help="minidetr MSDA backend (default: automatic, numpy in float64)")
    args = parser.parse_args(argv)
    ok, why = torch_status()
    if not ok:
        print(f"compare_with_transformers: {why}", file=sys.stderr)
        return 2
    import torch
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    print(f"{why}; {msda_note()}")
    print(f"model: {args.backbone}, d_model {args.d_model}, {DEFAULT_MODEL['nheads']} heads, "
          f"{DEFAULT_MODEL['enc_layers']}+{DEFAULT_MODEL['dec_layers']} layers, "
          f"{args.queries} queries, {DEFAULT_MODEL['num_feature_levels']} levels, "
          f"{DEFAULT_MODEL['n_points']} points; images (H, W) {list(DEFAULT_SIZES)} padded")
    results, notes = {}, set()
    for variant in args.variants:
        for dtype in args.dtypes:
            results[(variant, dtype)], note = compare_variant(
                variant, dtype, msda_backend=args.msda_backend, backbone=args.backbone,
                d_model=args.d_model, num_queries=args.queries, seed=args.seed)
            if note:
                notes.add(f"{variant}: {note}")
    for note in sorted(notes):
        print(f"note: {note}")
    print("max |minidetr - transformers| (masks: number of differing entries)")
    print(format_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
