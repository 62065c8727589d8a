"""The experiments of notebooks 08, 14, 15 and 16: one training budget, many settings.

Every setting trains the ``tiny`` detector on the built-in shapes data with the *same*
recipe (:data:`BUDGET`: the CPU demo's settings, fewer epochs) and differs from the
baseline in one thing only (:data:`SETTINGS`): the number of sampling points K, the
number of feature levels L, the attention (deformable or dense), or the variant (plain,
refine, two-stage). Run them all (minutes per setting on 2 idle cores; one ``run`` at a
time: on 2 cores, parallel runs, or a run beside other jobs, are many times slower)::

    python -m minidetr.lessons.experiments run                 # every setting, in order
    python -m minidetr.lessons.experiments run base dense-L1   # some of them
    python -m minidetr.lessons.experiments run refine-long     # notebook 14's model
    python -m minidetr.lessons.experiments collect             # -> notebooks/cache/

A finished setting is never trained again (its ``final_metrics.json`` is there), a
stopped one is resumed, and a setting that another ``run`` process is training (its
``.lock`` file) is skipped, so the command can be stopped, restarted, or run twice at
once. ``collect`` gathers every run's per-epoch metrics (loss, COCO AP, seconds), its
configurations, its time and memory per training step and its attention's focus into
the small JSON file the notebooks read (:data:`RESULTS_PATH`), and copies the
checkpoints the notebooks open (:data:`CACHED_CHECKPOINTS`) as float16 ``.npz`` files,
so that the notebooks show the full results while the test suite runs them in their
tiny setting in seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..files import write_json

REPO = Path(__file__).resolve().parents[2]
RUNS = REPO / "runs" / "lessons"                 # the training runs (not committed)
DATA = REPO / "data" / "shapes"                  # the demo's shapes data (made once)
CACHE = REPO / "notebooks" / "cache"             # what the notebooks read (committed)
RESULTS_PATH = CACHE / "experiments.json"

# The one budget every setting gets: the CPU demo's recipe (DEMO.train) shrunk to fit all
# settings into about an hour on 2 cores shared with other jobs: the first 400 of the
# demo's 1000 training images at 64-96 px (the demo: 80-128 px), 3 epochs of 50 steps with
# the learning-rate drop after 2 (the demo: 16 epochs of 125 steps, drop after 12), and
# the first 100 validation images at 96 px. 150 steps are 7 % of the demo's 2000: the
# models are far from trained, which is the regime where convergence speed shows.
BUDGET = dict(epochs=3, lr=5e-4, lr_backbone=5e-4, lr_drop=2, batch_size=8, num_workers=2,
              transforms="tiny", seed=42, num_pictures=0, max_train_images=400,
              max_val_images=100, train_scales=(64, 80, 96), val_size=96, max_size=160)


@dataclass(frozen=True)
class Setting:
    """One experiment: a model variant plus ModelConfig overrides of the ``tiny`` preset."""

    name: str
    variant: str
    overrides: dict
    what: str                                    # one line for tables


SETTINGS = {s.name: s for s in (
    Setting("base", "plain", {}, "deformable, L=3, K=2, plain (the tiny preset)"),
    Setting("refine", "refine", {}, "deformable, L=3, K=2, iterative box refinement"),
    Setting("L1", "plain", dict(num_feature_levels=1), "deformable, L=1 (C5 only), K=2"),
    Setting("dense-L1", "plain", dict(num_feature_levels=1, attention="dense"),
            "dense attention (Eq. 1), L=1 (C5 only)"),
    Setting("K1", "plain", dict(n_points=1), "deformable, L=3, K=1"),
    Setting("K4", "plain", dict(n_points=4), "deformable, L=3, K=4"),
    Setting("two-stage", "two-stage", {}, "deformable, L=3, K=2, two-stage (+ refinement)"),
    Setting("dense-L3", "plain", dict(attention="dense"),
            "dense attention (Eq. 1) over all L=3 levels' tokens"),
)}

# Notebook 14 opens a model trained longer (not an ablation: its budget is not BUDGET):
# the refine setting with the CPU demo's recipe (the 1000 training images at 80-128 px,
# validation on the 200 at 128 px) for 8 epochs with the drop after 6 (the demo: 16 and
# 12), at most 25 minutes. About 4 minutes on 2 idle cores.
LONG = "refine-long"
LONG_BUDGET = dict(epochs=8, lr=5e-4, lr_backbone=5e-4, lr_drop=6, batch_size=8,
                   num_workers=2, transforms="tiny", seed=42, num_pictures=0, time_limit=25)

# The checkpoints the notebooks open (setting -> cached file name).
CACHED_CHECKPOINTS = {"refine": "refine.npz", "base": "plain.npz", LONG: "refine-long.npz"}


# Settings of the ``tiny`` preset that may change after these runs were trained are pinned
# to the values they were trained with (official GroupNorm over the padded batch), so that
# every setting differs from the baseline in its own overrides only.
PINNED = {"mask_aware_norm": False}


def setting_config(name, **extra):
    """The ModelConfig of setting ``name`` (``extra``: more overrides, e.g. smaller sizes)."""
    from ..models import get_config
    if name not in SETTINGS:
        raise ValueError(f"unknown experiment setting {name!r}; known: {sorted(SETTINGS)}")
    s = SETTINGS[name]
    return get_config("tiny", s.variant, **{**PINNED_FIELDS(), **s.overrides, **extra})


def PINNED_FIELDS():                                                        # noqa: N802
    """The :data:`PINNED` fields that this version of ModelConfig has."""
    from ..models import ModelConfig
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    return {k: v for k, v in PINNED.items() if k in known}


def shapes_data(root=DATA, progress=True):
    """The demo's shapes dataset (1000 + 200 images of 128 px), made once under ``root``."""
    from ..data import generate_shapes_dataset
    from ..training import DataPaths
    from ..training.demo import DEMO
    paths = generate_shapes_dataset(root, num_train=DEMO.num_train, num_val=DEMO.num_val,
                                    image_size=(DEMO.image_size, DEMO.image_size), seed=0,
                                    progress=progress)
    return DataPaths.from_shapes(paths)


def run_setting(name, runs=RUNS, data=None, log=print, progress=True):
    """Train setting ``name`` into ``runs/name`` with :data:`BUDGET`.

    A finished run is not trained again; a stopped one (``last.npz`` but no
    ``final_metrics.json``) is resumed where it stopped.
    """
    from ..training import TrainConfig, resume_training, run_training
    from ..training.run_dir import write_final_metrics
    out = Path(runs) / name
    budget = LONG_BUDGET if name == LONG else BUDGET
    if (out / "final_metrics.json").is_file():
        log(f"{name}: already trained ({out})")
        return json.loads((out / "final_metrics.json").read_text(encoding="utf-8"))
    lock = _lock(out)
    if lock is None:
        log(f"{name}: another process is training it; skipped")
        return None
    try:
        data = data or shapes_data(progress=progress)
        started = time.perf_counter()
        if (out / "last.npz").is_file():
            log(f"{name}: resuming {out}")
            result = resume_training(out, data=data, progress=progress, log=log)
        else:
            cfg = setting_config("refine" if name == LONG else name)
            result = run_training(cfg, TrainConfig(**budget), data, out, overwrite=True,
                                  progress=progress, log=log)
    finally:
        lock.unlink(missing_ok=True)
    write_final_metrics(out, result.final_metrics)
    log(f"{name}: done in {(time.perf_counter() - started) / 60:.1f} min, "
        f"AP {result.final_metrics.get('AP', float('nan')):.3f}")
    return result.final_metrics


def _lock(out):
    """Claim ``out`` for this process (several ``run`` commands may share a machine):
    the path of a new ``<out>.lock`` holding our pid, or None if a live process holds it."""
    lock = out.with_name(out.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    if lock.is_file():
        try:
            os.kill(int(lock.read_text(encoding="utf-8")), 0)
            return None                                   # its owner is alive
        except (ValueError, ProcessLookupError):
            lock.unlink(missing_ok=True)                  # a stale lock
        except PermissionError:
            return None
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    return lock


def step_cost(cfg, batch_size=8, image_size=96, steps=5, seed=0):
    """Seconds and peak traced memory (MiB) of one training step of ``cfg`` on the CPU.

    A fixed batch of random images of ``image_size`` pixels with two boxes each; the
    first step is a warm-up, the time is the fastest of ``steps`` (on a shared machine
    the fastest step is the one least slowed by other jobs). Memory is the peak of Python's allocations during one step
    (NumPy's arrays included), measured with :mod:`tracemalloc`.

    Returns:
        dict(seconds=fastest of ``steps``, peak_mib=..., tokens=S of the encoder)
    """
    from ..autograd import Tensor
    from ..models import build_criterion, build_model
    from ..optim import AdamW
    rng = np.random.default_rng(seed)
    model, criterion = build_model(cfg), build_criterion(cfg)
    model.train()
    opt = AdamW(model.parameters(), lr=1e-4)
    images = Tensor(rng.standard_normal((batch_size, 3, image_size, image_size))
                    .astype(np.float32))                                   # (B, 3, H, W)
    targets = [{"labels": np.array([0, 1]),
                "boxes": np.array([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.15]],
                                  np.float32)} for _ in range(batch_size)]

    def step():
        out = model(images)
        losses = criterion(out, targets)
        total = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        opt.zero_grad()
        total.backward()
        opt.step()

    step()                                                                 # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    strides = (32,) if cfg.num_feature_levels == 1 else (8, 16, 32)
    tokens = sum((-(-image_size // s)) ** 2 for s in strides)           # ceil
    return dict(seconds=float(np.min(times)), peak_mib=peak / 2**20, tokens=int(tokens))


def trained_focus(checkpoint, num_images=16):
    """:func:`~minidetr.lessons.trained.attention_focus` of a trained model's first encoder
    layer and first decoder cross-attention, on held-out shapes images (queries: the
    unpadded tokens, all object queries)."""
    from ..autograd import Tensor
    from .trained import attention_focus, held_out_shapes, load_cached_model, record_sampling
    model, _, ckpt = load_cached_model(checkpoint)
    batch = held_out_shapes(DATA.parent / "shapes-heldout", num_images, batch_size=num_images,
                            category_map=ckpt.category_map)[0]
    with record_sampling(model) as records:
        model(Tensor(batch.images), batch.mask)
    focus = {}
    for name, calls in records.items():
        if name.endswith("encoder.layers.0.self_attn"):
            tokens = token_mask(model, batch)
            focus["encoder"] = attention_focus(calls[0], query_mask=tokens)
        elif name.endswith("decoder.layers.0.cross_attn"):
            focus["decoder"] = attention_focus(calls[0])
    return focus


def token_mask(model, batch):
    """(N, S) True on the unpadded encoder tokens of ``batch`` (a collated Batch)."""
    from ..autograd import Tensor, no_grad
    with no_grad():
        srcs, masks, pos = model.project_features(Tensor(batch.images), batch.mask)
    return np.concatenate([~np.asarray(m).reshape(len(m), -1) for m in masks], axis=1)


def read_run(run_dir):
    """Per-epoch records of a run folder (``metrics.jsonl``), as a list of dicts."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def collect(runs=RUNS, cache=CACHE, log=print, costs=True, rounds=3):
    """Gather every finished run into :data:`RESULTS_PATH` and cache the checkpoints.

    The time per step of every setting is measured in ``rounds`` interleaved rounds and
    the fastest kept, so that a burst of other work on a shared machine does not land on
    one setting only.
    """
    cache = Path(cache)
    cache.mkdir(parents=True, exist_ok=True)
    results = {"budget": BUDGET, "settings": {}}
    for name, s in SETTINGS.items():
        records = read_run(Path(runs) / name)
        if not records:
            log(f"{name}: no run yet")
            continue
        stored = json.loads((Path(runs) / name / "run.json").read_text(encoding="utf-8"))
        entry = {"what": s.what, "variant": s.variant, "overrides": s.overrides,
                 "model_config": stored["model_config"],
                 "train_config": stored["train_config"], "epochs": records,
                 "finished": (Path(runs) / name / "final_metrics.json").is_file()}
        if entry["finished"]:
            entry["focus"] = trained_focus(Path(runs) / name / "last.npz")
            log(f"{name}: attention focus after training {entry['focus']}")
        results["settings"][name] = entry
    for _ in range(rounds if costs else 0):
        for name, entry in results["settings"].items():
            cost = step_cost(setting_config(name))
            if "step_cost" not in entry or cost["seconds"] < entry["step_cost"]["seconds"]:
                entry["step_cost"] = cost
    for name, entry in results["settings"].items():
        log(f"{name}: {entry.get('step_cost')}")
    write_json(cache / RESULTS_PATH.name, results, indent=1)
    for name in CACHED_CHECKPOINTS:
        cache_checkpoint(name, runs, cache, log)
    return results


def cache_checkpoint(name, runs=RUNS, cache=CACHE, log=print):
    """Copy run ``name``'s ``last.npz`` to ``cache/CACHED_CHECKPOINTS[name]`` with float16
    weights, its model configuration, category map and metrics history (nothing else),
    unless the cached copy is newer than the run's."""
    from ..weights.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    source, target = Path(runs) / name / "last.npz", Path(cache) / CACHED_CHECKPOINTS[name]
    if not source.is_file() or (target.is_file()
                                and target.stat().st_mtime >= source.stat().st_mtime):
        return None                                       # no run, or cached since it ended
    ckpt = load_checkpoint(source)
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
             for k, v in ckpt.model_state.items()}
    small = Checkpoint(state, model_config=ckpt.model_config, category_map=ckpt.category_map,
                       progress={"history": ckpt.progress["history"]})
    save_checkpoint(target, small, overwrite=True)
    log(f"cached {source} -> {target}")
    return target


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minidetr.lessons.experiments",
                                     description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train settings (all when none is named)")
    run.add_argument("names", nargs="*")
    sub.add_parser("collect", help="gather the runs into notebooks/cache/")
    args = parser.parse_args(argv)
    if args.command == "run":
        unknown = sorted(set(args.names) - set(SETTINGS) - {LONG})
        if unknown:
            parser.error(f"unknown settings {unknown}; known: {sorted(SETTINGS)} and {LONG}")
        for name in args.names or list(SETTINGS):
            run_setting(name)
    else:
        collect()
    return 0


if __name__ == "__main__":
    for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")
    sys.exit(main())
