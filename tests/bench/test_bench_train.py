"""``python -m minidetr bench train``: a real (tiny, CPU) run of the training benchmark,
its inputs and options; the transformers comparison where transformers is installed."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from minidetr.bench.common import parse_size, synthetic_batch
from minidetr.bench.train import bench_train
from minidetr.cli import main

HAVE_HF = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def test_bench_train_tiny_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "train.json"
    code = main(["bench", "train", "--config", "tiny", "--device", "cpu", "--iterations", "1",
                 "--warmup", "0", "--variant", "plain,two-stage", "--no-hf",
                 "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "batch 2 of 128x128 (HxW), cpu" in text and "ms/iter" in text
    saved = json.loads(out.read_text())
    rows = saved["results"]
    assert [(r["framework"], r["variant"]) for r in rows] == [("minidetr", "plain"),
                                                              ("minidetr", "two-stage")]
    for r in rows:
        assert (r["batch"], r["height"], r["width"], r["device"]) == (2, 128, 128, "cpu")
        assert r["ms_median"] > 0 and len(r["times_ms"]) == 1
        assert r["images_per_s"] == pytest.approx(2 / (r["ms_median"] / 1e3))
        assert r["peak_bytes"] > 2**20 and r["rise_bytes"] >= 0     # VmHWM, bytes
        assert "VmHWM" in r["memory_note"]
    assert saved["machine"]["cpu_count"] >= 1


def test_rounds_report_the_median_of_the_rounds_medians(tmp_path, capsys):
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--config", "tiny", "--device", "cpu", "--iterations", "2",
                 "--warmup", "0", "--variant", "plain", "--no-hf", "--rounds", "3",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 rounds" in text and "round 3 of 3" in text
    saved = json.loads(out.read_text())
    assert saved["rounds"] == 3
    (row,) = saved["results"]
    assert len(row["rounds_ms"]) == 3 and len(row["times_ms"]) == 6
    assert row["ms_median"] == sorted(row["rounds_ms"])[1]
    assert row["ms_min"] == min(row["times_ms"])
    with pytest.raises(ValueError, match="rounds must be an int >= 1"):
        bench_train(config="tiny", variants="plain", device="cpu", rounds=0,
                    json_path=tmp_path / "t.json", print_fn=lambda *a: None)


def test_sizes_and_options_are_checked():
    assert parse_size(None, "tiny") == (128, 128)
    assert parse_size(None, "paper") == (800, 1066)
    assert parse_size("384x512") == (384, 512)
    for bad in ("800", "800x", "axb", "16x16"):
        with pytest.raises(ValueError, match="--size"):
            parse_size(bad)
    with pytest.raises(ValueError, match="variant"):
        bench_train(variants="plain,fancy", device="cpu")
    with pytest.raises(ValueError, match="iterations"):
        bench_train(iterations=0, device="cpu")
    with pytest.raises(ValueError, match="config"):
        bench_train(config="huge", device="cpu")


def test_the_synthetic_batch_looks_like_the_loader_s():
    batch = synthetic_batch(2, 64, 96, 5, np.random.default_rng(0))
    assert batch.images.shape == (2, 3, 64, 96) and batch.images.dtype == np.float32
    assert batch.mask.shape == (2, 64, 96) and not batch.mask.any()
    for t in batch.targets:
        boxes, labels = t["boxes"], t["labels"]
        assert boxes.shape == (6, 4) and boxes.dtype == np.float32
        assert labels.dtype.kind == "i" and 0 <= labels.min() and labels.max() < 5
        x0, y0 = boxes[:, 0] - boxes[:, 2] / 2, boxes[:, 1] - boxes[:, 3] / 2
        x1, y1 = boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2
        assert (x0 >= 0).all() and (y0 >= 0).all() and (x1 <= 1).all() and (y1 <= 1).all()


@pytest.mark.skipif(not HAVE_HF, reason="transformers comparison not tested: torch and "
                                        "transformers are not installed (never a dependency)")
def test_the_transformers_model_matches_the_preset_and_is_timed(tmp_path):
    from minidetr.bench.train_hf import build_hf_model
    from minidetr.models.build import build_model
    from minidetr.models.config import get_config

    for preset in ("small", "paper"):                   # same parameters, same frozen ones
        cfg = get_config(preset, "two-stage")
        ours, theirs = build_model(cfg), build_hf_model(cfg, "cpu")
        assert sum(p.numel() for p in theirs.parameters()) == ours.num_parameters()
        assert sum(p.numel() for p in theirs.parameters() if p.requires_grad) == \
            ours.num_parameters(trainable_only=True)
    rows = bench_train(config="tiny", variants="plain", device="cpu", iterations=1, warmup=0,
                       json_path=tmp_path / "train.json", print_fn=lambda *a: None)
    assert [r["framework"] for r in rows] == ["minidetr", "transformers"]
    assert rows[1]["ms_median"] > 0 and "transformers" in rows[1]["versions"]


def test_the_gpu_peak_hook_follows_the_bytes_in_use():
    """CuPy's pool calls the hook around every allocation; replayed here without a GPU."""
    from types import SimpleNamespace

    from minidetr.backend import _import_cupy, why_no_cupy
    from minidetr.bench.common import CupyMemory

    cp = _import_cupy()
    if cp is None:
        pytest.skip(f"CuPy memory hook not tested: {why_no_cupy()}")
    from cupy.cuda import memory_hook

    memory = object.__new__(CupyMemory)              # no pool to empty: no GPU needed
    memory.cp, memory.pool = cp, SimpleNamespace(used_bytes=lambda: 4096)

    def step():                                      # what MemoryPool.malloc/free report
        hooks = list(memory_hook.get_memory_hooks().values())
        for kind, size, ptr in (("malloc", 1024, 1), ("malloc", 512, 2), ("free", 1024, 1),
                                ("malloc", 512, 0), ("free", 512, 2)):   # ptr 0: failed
            for hook in hooks:
                if kind == "malloc":
                    hook.malloc_postprocess(device_id=0, size=size, mem_size=size,
                                            mem_ptr=ptr, pmem_id=ptr)
                else:
                    hook.free_postprocess(device_id=0, mem_size=size, mem_ptr=ptr, pmem_id=ptr)

    assert memory.peak_of_one(step) == 4096 + 1024 + 512
    assert not memory_hook.get_memory_hooks()        # unregistered afterwards


def test_a_bad_hf_loss_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="hf_loss must be one of"):
        bench_train(config="tiny", variants="two-stage", device="cpu", iterations=1,
                    warmup=0, hf_loss="mine", json_path=tmp_path / "t.json",
                    print_fn=lambda *a: None)


@pytest.mark.skipif(not HAVE_HF, reason="transformers comparison not tested: torch and "
                                        "transformers are not installed (never a dependency)")
def test_the_official_hf_loss_trains_the_proposal_heads_that_transformers_leaves_out():
    """transformers' own two-stage loss gives its proposal heads no gradient; the
    ``_enc`` terms added by hf_encoder_loss do, as minidetr's criterion does."""
    import torch

    from minidetr.bench.common import synthetic_batch
    from minidetr.bench.train_hf import build_hf_model, hf_encoder_loss, hf_inputs
    from minidetr.models.config import get_config

    cfg = get_config("tiny", "two-stage")
    model = build_hf_model(cfg, "cpu")
    data = synthetic_batch(2, 64, 64, cfg.num_classes, np.random.default_rng(0))
    pixel_values, pixel_mask, labels = hf_inputs(data, "cpu")
    heads = [model.model.enc_output.weight, model.model.decoder.class_embed[-1].weight,
             model.model.decoder.bbox_embed[-1].layers[0].weight]

    def head_grads(official):
        model.zero_grad(set_to_none=True)
        out = model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        loss = out.loss + (hf_encoder_loss(out, labels, model.config) if official else 0)
        loss.backward()
        return [p.grad for p in heads]

    assert all(g is None for g in head_grads(official=False)), \
        "transformers' own loss now reaches the proposal heads: revisit hf_loss"
    grads = head_grads(official=True)
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_a_child_process_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss survives exec: a child of a big process would report the parent's peak;
    the benchmark's reading (VmHWM on Linux) is the child's own."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("/proc/self/status").exists():
        pytest.skip("no /proc/self/status here: the benchmark reads ru_maxrss instead")
    from minidetr.bench.common import _max_rss_bytes

    ballast = np.ones(64 * 2**20 // 8)                     # 64 MiB touched in this process
    parent = _max_rss_bytes()
    code = ("import sys; sys.path[:0] = [" + repr(str(Path(__file__).resolve().parents[2]))
            + "]; from minidetr.bench.common import _max_rss_bytes; print(_max_rss_bytes())")
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               check=True).stdout.split()[-1])
    assert ballast.sum() > 0 and parent > 64 * 2**20
    assert child < parent - 32 * 2**20, (child, parent)
