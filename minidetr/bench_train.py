"""The training benchmark: ``python -m minidetr bench train``.

One training iteration is what :func:`minidetr.engine.train_step` does during training:
move the batch to the device, forward, match and compute every loss, backward, clip the
gradients (max norm 0.1), AdamW step, and read the logged values. For each requested
variant of a preset this prints and writes (default ``runs/bench/train.json``):

* time per iteration (median of ``iterations`` timed ones, after ``warmup`` untimed ones
  that include compiling kernels) and images per second = batch / time;
* memory. On a GPU, from CuPy's memory pool: ``peak`` = the most bytes in use at any
  moment of one more (untimed) iteration, counted by a CuPy memory hook, weights,
  gradients and AdamW moments included; ``reserved`` = what the pool holds from the
  device afterwards; ``growth`` = the change of the bytes in use from the first to the
  last timed iteration (0 when nothing piles up); and the device's total. On a CPU, the
  process's peak resident size (``ru_maxrss``) after the row and its rise during the
  row: a high-water mark of the whole process, so a row that needs less than an earlier
  one shows a rise of 0 (tracemalloc would see NumPy's buffers too, but slows the step
  several times over).

When ``transformers`` and ``torch`` are importable (never a dependency of minidetr),
the same iteration of HuggingFace's ``DeformableDetrForObjectDetection``, built to the
same configuration (:mod:`minidetr.bench_hf`), is timed on the same device with the same
batch, and the table ends with minidetr's time over theirs per variant.

The batch is synthetic and the same for every row: normal noise images of the requested
size (no padding) and six random boxes per image.

Shapes: images (B, 3, H, W) with ``--batch`` B and ``--size`` H x W (default 128x128 for
``tiny``, 800x1066, the paper's typical padded COCO batch, for ``small`` and ``paper``).
"""
from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from .models.config import PRESETS as MODEL_PRESETS
from .models.config import VARIANTS

DEFAULT_SIZES = {"tiny": (128, 128), "small": (800, 1066), "paper": (800, 1066)}
DEFAULT_JSON = Path("runs") / "bench" / "train.json"
BOXES_PER_IMAGE = 6


# --------------------------------------------------------------------------- inputs
def parse_size(size, config="tiny"):
    """``"800x1066"`` (height x width), a pair, or None (the preset's default) -> (H, W)."""
    if size is None:
        return DEFAULT_SIZES[config]
    if isinstance(size, str):
        parts = size.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 800x1066; got "
                             f"{size!r}")
        size = tuple(int(p) for p in parts)
    height, width = size
    if height < 32 or width < 32:
        raise ValueError(f"--size {height}x{width}: each side must be at least 32 pixels "
                         "(the backbone divides it by 32)")
    return int(height), int(width)


def synthetic_batch(batch, height, width, num_classes, rng):
    """A ``Batch`` of noise images with random boxes, as the data loader would give.

    Shapes: images (B, 3, H, W) float32, mask (B, H, W) bool (no padding), each target
    ``labels`` (T,) int64 in [0, num_classes) and ``boxes`` (T, 4) normalised cxcywh,
    T = 6.
    """
    from .data import Batch

    images = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
    mask = np.zeros((batch, height, width), dtype=bool)
    targets = []
    for b in range(batch):
        centres = rng.uniform(0.2, 0.8, size=(BOXES_PER_IMAGE, 2))
        sizes = rng.uniform(0.05, 0.4, size=(BOXES_PER_IMAGE, 2))
        size = np.array([height, width], dtype=np.int64)
        targets.append({"boxes": np.concatenate([centres, sizes], 1).astype(np.float32),
                        "labels": rng.integers(0, num_classes, BOXES_PER_IMAGE),
                        "image_id": b, "orig_size": size, "size": size})
    return Batch(images, mask, targets)


# --------------------------------------------------------------------------- memory
def _max_rss_bytes():
    """The process's peak resident set size (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class CpuMemory:
    """Memory of a CPU row: the process's resident-size high-water mark."""

    note = ("CPU: peak resident size of the whole process (ru_maxrss); rise = its growth "
            "during this row")

    def __init__(self):
        self.start = _max_rss_bytes()

    def in_use(self):
        return None                     # not measurable cheaply on the host

    def peak_of_one(self, step):
        step()
        return None

    def summary(self, peak, in_use):
        end = _max_rss_bytes()
        return {"peak_bytes": end, "rise_bytes": end - self.start}


class CupyMemory:
    """Memory of a GPU row, from CuPy's memory pool (see the module docstring)."""

    note = ("GPU: peak = most bytes in use in CuPy's pool during one step; reserved = "
            "bytes the pool holds; growth = in use after the last timed step minus after "
            "the first")

    def __init__(self):
        import cupy as cp
        self.cp = cp
        self.pool = cp.get_default_memory_pool()
        self.pool.free_all_blocks()                 # each row starts from an empty cache

    def in_use(self):
        return self.pool.used_bytes()

    def peak_of_one(self, step):
        """Run ``step`` once with a memory hook that follows the bytes in use."""
        cp = self.cp

        class PeakInUse(cp.cuda.MemoryHook):
            name = "minidetr_bench_peak"

            def __init__(self, start):
                self.in_use = self.peak = start

            def malloc_postprocess(self, **kwargs):
                if kwargs["mem_ptr"]:                # 0: the allocation failed
                    self.in_use += kwargs["mem_size"]
                    self.peak = max(self.peak, self.in_use)

            def free_postprocess(self, **kwargs):
                self.in_use -= kwargs["mem_size"]

        with PeakInUse(self.pool.used_bytes()) as hook:
            step()
        return hook.peak

    def summary(self, peak, in_use):
        _, total = self.cp.cuda.runtime.memGetInfo()        # (free, total) bytes
        return {"peak_bytes": peak, "reserved_bytes": self.pool.total_bytes(),
                "growth_bytes": in_use[-1] - in_use[0], "device_total_bytes": total}


# --------------------------------------------------------------------------- timing
def cpu_time_ms(step):
    """Wall-clock milliseconds of ``step``."""
    start = time.perf_counter()
    step()
    return 1e3 * (time.perf_counter() - start)


def cupy_time_ms(step):
    """Milliseconds between two CUDA events around ``step`` on CuPy's current stream."""
    import cupy as cp
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    step()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end)


def time_steps(step, *, iterations, warmup, timer, memory):
    """Run ``warmup`` untimed steps, then ``iterations`` timed ones, then one for the peak.

    Returns a dict with the times (ms) and the memory summary.
    """
    for _ in range(warmup):
        step()
    times, in_use = [], []
    for _ in range(iterations):
        times.append(timer(step))
        in_use.append(memory.in_use())
    peak = memory.peak_of_one(step)
    return {"ms_median": statistics.median(times), "ms_min": min(times),
            "ms_mean": statistics.fmean(times), "times_ms": times,
            **memory.summary(peak, in_use)}


# --------------------------------------------------------------------------- minidetr
def bench_minidetr(config, variant, device, batch, height, width, *, iterations, warmup,
                   seed=0):
    """One row: minidetr's training iteration for ``config``/``variant`` on ``device``."""
    from .engine import build_param_groups, train_step
    from .models.build import build_criterion, build_model
    from .models.config import get_config
    from .optim import AdamW
    from .train import TrainConfig

    cfg = get_config(config, variant)
    recipe = TrainConfig()
    memory = CupyMemory() if device == "cuda" else CpuMemory()
    model = build_model(cfg)
    if device != "cpu":
        model.to(device)
    criterion = build_criterion(cfg)
    optimizer = AdamW(build_param_groups(model, recipe), lr=recipe.lr,
                      weight_decay=recipe.weight_decay)
    data = synthetic_batch(batch, height, width, cfg.num_classes, np.random.default_rng(seed))
    model.train()

    def step():
        train_step(model, criterion, optimizer, data, clip_max_norm=recipe.clip_max_norm,
                   device=device, where="the benchmark")

    timer = cupy_time_ms if device == "cuda" else cpu_time_ms
    return {"framework": "minidetr", **time_steps(step, iterations=iterations,
                                                  warmup=warmup, timer=timer,
                                                  memory=memory),
            "memory_note": memory.note}


# --------------------------------------------------------------------------- driver
def _variant_names(variants):
    names = list(VARIANTS) if variants in (None, "all") else (
        [v.strip() for v in variants.split(",") if v.strip()] if isinstance(variants, str)
        else list(variants))
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown variant(s) {unknown or variants!r}; choose from "
                         f"{list(VARIANTS)} (comma-separated)")
    return names


def _mib(value):
    return "-" if value is None else f"{value / 2**20:.0f}"


def _print_table(rows, print_fn):
    print_fn(f"{'framework':13} {'variant':10} {'device':6} {'ms/iter':>9} {'img/s':>7} "
             f"{'peak MiB':>9} {'reserved MiB':>13} {'growth MiB':>11}")
    for r in rows:
        print_fn(f"{r['framework']:13} {r['variant']:10} {r['device']:6} "
                 f"{r['ms_median']:9.1f} {r['images_per_s']:7.2f} "
                 f"{_mib(r.get('peak_bytes')):>9} {_mib(r.get('reserved_bytes')):>13} "
                 f"{_mib(r.get('growth_bytes')):>11}")
    for note in dict.fromkeys(r["memory_note"] for r in rows):
        print_fn(f"memory: {note}")
    ours = {r["variant"]: r for r in rows if r["framework"] == "minidetr"}
    for r in rows:
        if r["framework"] != "minidetr" and r["variant"] in ours:
            ratio = ours[r["variant"]]["ms_median"] / r["ms_median"]
            print_fn(f"{r['variant']}: minidetr takes {ratio:.2f}x the time of "
                     f"{r['framework']} per iteration (target: at most 2x)")


def _machine(device):
    from .bench import _machine as cpu_machine
    info = cpu_machine()
    if device == "cuda":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        info.update(gpu=name.decode() if isinstance(name, bytes) else str(name),
                    cupy=cp.__version__)
    return info


def bench_train(config="tiny", variants="all", device="auto", batch=2, size=None,
                iterations=5, warmup=2, compare_hf=True, json_path=None, seed=0,
                print_fn=print):
    """Time training iterations of minidetr (and of transformers' model); print, write JSON.

    Args:
        config: "tiny", "small" or "paper".
        variants: comma-separated names among plain, refine, two-stage, or "all".
        device: "auto" (cuda when CuPy sees a GPU), "cpu" or "cuda".
        batch: images per iteration.
        size: "HxW" or (H, W); None for the preset's default (see the module docstring).
        iterations, warmup: timed and untimed iterations per row.
        compare_hf: also time transformers' DeformableDetrForObjectDetection when
            transformers and torch are importable.
        json_path: where to write the rows (default ``runs/bench/train.json``).

    Returns:
        the list of result rows (dicts), as written to the JSON file.
    """
    from .train import resolve_device

    if config not in MODEL_PRESETS:
        raise ValueError(f"unknown config {config!r}; choose from {list(MODEL_PRESETS)}")
    names = _variant_names(variants)
    height, width = parse_size(size, config)
    for name, value, least in (("batch", batch, 1), ("iterations", iterations, 1),
                               ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    device = resolve_device(device)

    hf_status = (False, "not asked for (--no-hf)")
    if compare_hf:
        from .bench_hf import hf_status as check_hf
        hf_status = check_hf(device)
    print_fn(f"training benchmark: config {config}, batch {batch} of {height}x{width} "
             f"(HxW), {device}, median of {iterations} iterations after {warmup} warm-up")
    if not hf_status[0]:
        print_fn(f"transformers comparison skipped: {hf_status[1]}")

    common = dict(config=config, device=device, batch=batch, height=height, width=width,
                  iterations=iterations, warmup=warmup)
    rows = []
    for variant in names:
        row = bench_minidetr(config, variant, device, batch, height, width,
                             iterations=iterations, warmup=warmup, seed=seed)
        rows.append({**common, "variant": variant, **row})
    if hf_status[0]:
        from .bench_hf import bench_hf
        if device == "cuda":
            import cupy as cp
            cp.get_default_memory_pool().free_all_blocks()     # leave the GPU to torch
        for variant in names:
            row = bench_hf(config, variant, device, batch, height, width,
                           iterations=iterations, warmup=warmup, seed=seed)
            rows.append({**common, "variant": variant, **row})
    for row in rows:
        row["images_per_s"] = batch / (row["ms_median"] / 1e3)

    _print_table(rows, print_fn)
    path = Path(json_path) if json_path else DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(benchmark="train", **common, machine=_machine(device),
                                    transformers=hf_status[1], results=rows), indent=2))
    print_fn(f"results written to {path}")
    return rows


__all__ = ["bench_train", "bench_minidetr", "synthetic_batch", "parse_size", "time_steps",
           "DEFAULT_SIZES"]