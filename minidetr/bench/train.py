"""The training benchmark: ``python -m minidetr bench train``.

One training iteration is what :func:`minidetr.training.engine.train_step` does during training:
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
  process's peak resident size (``VmHWM``, :func:`.common._max_rss_bytes`) after the row and its rise during the
  row: a high-water mark of the whole process, so a row that needs less than an earlier
  one shows a rise of 0 (tracemalloc would see NumPy's buffers too, but slows the step
  several times over).

When ``transformers`` and ``torch`` are importable (never a dependency of minidetr),
the same iteration of HuggingFace's ``DeformableDetrForObjectDetection``, built to the
same configuration (:mod:`minidetr.bench.train_hf`), is timed on the same device with the same
batch, and the table ends with minidetr's time over theirs per variant. On a CPU those rows
run in a Python process of their own, with torch's default threads: minidetr's thread
settings are process-wide and would slow torch down.

The batch is synthetic and the same for every row: normal noise images of the requested
size (no padding) and six random boxes per image.

Shapes: images (B, 3, H, W) with ``--batch`` B and ``--size`` H x W (default 128x128 for
``tiny``, 800x1066, the paper's typical padded COCO batch, for ``small`` and ``paper``).
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import numpy as np

from ..files import write_json
from ..functional._parallel import cpu_threads
from ..models.config import PRESETS as MODEL_PRESETS
from .common import (CpuMemory, CupyMemory, cpu_time_ms, cuda_time_ms, machine_info,
                     parse_size, synthetic_batch, time_steps, variant_names)

DEFAULT_JSON = Path("runs") / "bench" / "train.json"


# --------------------------------------------------------------------------- minidetr
def bench_minidetr(config, variant, device, batch, height, width, *, iterations, warmup,
                   seed=0):
    """One row: minidetr's training iteration for ``config``/``variant`` on ``device``."""
    from ..models.build import build_criterion, build_model
    from ..models.config import get_config
    from ..optim import AdamW
    from ..training import TrainConfig
    from ..training.engine import build_param_groups, long_lived_objects_frozen, train_step

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

    timer = cuda_time_ms if device == "cuda" else cpu_time_ms
    with long_lived_objects_frozen():                   # as Trainer.fit does
        timed = time_steps(step, iterations=iterations, warmup=warmup, timer=timer,
                           memory=memory)
    return {"framework": "minidetr", **timed, "memory_note": memory.note}


# --------------------------------------------------------------------------- driver
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
            mine = ours[r["variant"]]
            ratio = mine["ms_median"] / r["ms_median"]
            line = (f"{r['variant']}: minidetr takes {ratio:.2f}x the time of "
                    f"{r['framework']} per iteration")
            if len(r.get("rounds_ms", ())) > 1:
                each = ", ".join(f"{a / b:.2f}" for a, b in zip(mine["rounds_ms"],
                                                               r["rounds_ms"]))
                line += (f" (the medians of {len(r['rounds_ms'])} rounds; round by round: "
                         f"{each})")
            print_fn(line)


def _combine_rounds(rounds):
    """One row per framework and variant from the rows of every round.

    ``ms_median`` becomes the median of the rounds' medians (``rounds_ms``, in order),
    ``ms_min`` the least of all, ``times_ms`` every timed iteration; the memory figures
    are the highest of the rounds. With one round the rows are returned as they are.
    """
    if len(rounds) == 1:
        return rounds[0]
    combined = []
    for same in zip(*rounds):                              # the same row of every round
        medians = [r["ms_median"] for r in same]
        row = dict(same[0], ms_median=statistics.median(medians), rounds_ms=medians,
                   ms_min=min(r["ms_min"] for r in same),
                   times_ms=[t for r in same for t in r["times_ms"]])
        row["ms_mean"] = statistics.fmean(row["times_ms"])
        for key in ("peak_bytes", "reserved_bytes", "growth_bytes"):
            if any(r.get(key) is not None for r in same):
                row[key] = max(r[key] for r in same if r.get(key) is not None)
        combined.append(row)
    return combined


def bench_train(config="tiny", variants="all", device="auto", batch=2, size=None,
                iterations=5, warmup=2, compare_hf=True, json_path=None, seed=0,
                torch_threads=None, hf_loss="official", rounds=1, print_fn=print):
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
        torch_threads: torch's CPU threads for transformers' rows; None: torch's own
            default. On a CPU those rows run in a process of their own
            (:func:`minidetr.bench.train_hf.bench_hf_in_child` says why).
        hf_loss: transformers' two-stage loss: "official" adds the encoder proposals'
            ``_enc`` terms that transformers leaves out (minidetr computes them, as the
            official code does), "shipped" times transformers' own loss as it is
            (:mod:`minidetr.bench.train_hf` explains).
        rounds: how many times to run every row, minidetr's and transformers' in turn;
            each row then reports the median over the rounds of its medians (with one
            round's time moving by 10-15 % on a shared machine, several rounds taken
            in turn compare the two frameworks under the same conditions).

    Returns:
        the list of result rows (dicts), as written to the JSON file.
    """
    from ..backend import resolve_device

    if config not in MODEL_PRESETS:
        raise ValueError(f"unknown config {config!r}; choose from {list(MODEL_PRESETS)}")
    names = variant_names(variants)
    height, width = parse_size(size, config)
    for name, value, least in (("batch", batch, 1), ("iterations", iterations, 1),
                               ("warmup", warmup, 0), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    device = resolve_device(device)

    hf_status = (False, "not asked for (--no-hf)")
    if compare_hf:
        from .train_hf import hf_status as check_hf
        hf_status = check_hf(device)
    print_fn(f"training benchmark: config {config}, batch {batch} of {height}x{width} "
             f"(HxW), {device}, median of {iterations} iterations after {warmup} warm-up"
             + (f", {rounds} rounds" if rounds > 1 else ""))
    threads = cpu_threads()
    if torch_threads is not None and (isinstance(torch_threads, bool)
                                      or not isinstance(torch_threads, int)
                                      or torch_threads < 1):
        raise ValueError(f"torch_threads must be an int >= 1, got {torch_threads!r}")
    from .train_hf import HF_LOSSES
    if hf_loss not in HF_LOSSES:
        raise ValueError(f"hf_loss must be one of {HF_LOSSES}, got {hf_loss!r}")
    if not hf_status[0]:
        print_fn(f"transformers comparison skipped: {hf_status[1]}")

    common = dict(config=config, device=device, batch=batch, height=height, width=width,
                  iterations=iterations, warmup=warmup)
    each_round = []
    for number in range(1, rounds + 1):
        if rounds > 1:
            print_fn(f"round {number} of {rounds}")
        rows = []
        for variant in names:
            row = bench_minidetr(config, variant, device, batch, height, width,
                                 iterations=iterations, warmup=warmup, seed=seed)
            rows.append({**common, "variant": variant, **row})
        if hf_status[0]:
            rows += _hf_rows(common, names, device, torch_threads, hf_loss, seed)
        each_round.append(rows)
    rows = _combine_rounds(each_round)
    for row in rows:
        row["images_per_s"] = batch / (row["ms_median"] / 1e3)

    _print_table(rows, print_fn)
    if hf_status[0] and "two-stage" in names:
        print_fn("transformers' two-stage loss: " + (
            "official (its own loss plus the encoder proposals' _enc terms it leaves out, "
            "as minidetr and the official code compute them; --hf-loss shipped for its own)"
            if hf_loss == "official" else
            "as shipped (without the encoder proposals' _enc terms that minidetr computes)"))
    if device == "cpu":
        torch_used = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
        print_fn(f"CPU threads: minidetr {threads} (MINIDETR_NUM_THREADS; BLAS "
                 f"{os.environ.get('OPENBLAS_NUM_THREADS', 'default')} per call, Numba "
                 f"{machine_info().get('numba_threads')})"
                 + (f"; torch {', '.join(map(str, torch_used))}, in a process of its own"
                    if torch_used else ""))
    path = Path(json_path) if json_path else DEFAULT_JSON
    write_json(path, dict(benchmark="train", **common, machine=machine_info(device),
                          minidetr_threads=threads, torch_threads=torch_threads,
                          hf_loss=hf_loss, rounds=rounds,
                          transformers=hf_status[1], results=rows))
    print_fn(f"results written to {path}")
    return rows


def _hf_rows(common, names, device, torch_threads, hf_loss, seed):
    """transformers' rows of one round (on a CPU in a process of their own)."""
    from .train_hf import bench_hf
    if device == "cuda":
        import cupy as cp
        cp.get_default_memory_pool().free_all_blocks()         # leave the GPU to torch
    requests = [dict(config=common["config"], variant=variant, device=device,
                     batch=common["batch"], height=common["height"], width=common["width"],
                     iterations=common["iterations"], warmup=common["warmup"], seed=seed,
                     threads=torch_threads, hf_loss=hf_loss) for variant in names]
    if device == "cpu":
        from .train_hf import bench_hf_in_child
        hf_rows = bench_hf_in_child(requests)           # a process of their own: see there
    else:
        hf_rows = [bench_hf(**request) for request in requests]
    return [{**common, "variant": request["variant"], **row}
            for request, row in zip(requests, hf_rows)]


__all__ = ["bench_train", "bench_minidetr"]