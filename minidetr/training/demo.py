"""The main job, ``python -m minidetr demo``: the built-in shapes data, the tiny model.

:func:`run_demo` makes the shapes dataset once (1000 training and 200 validation images
of 128 x 128 pixels, in COCO format, under ``data/shapes``), trains the ``tiny`` model on
it with settings that fit a 2-core CPU (:data:`DEMO`), evaluates it with pycocotools and
writes the run folder (:mod:`minidetr.training.run_dir`) plus ``final_metrics.json``.
``demo --quick`` (:data:`QUICK_DEMO`) is a one-minute smoke run of the same code path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..data import PRESETS, generate_shapes_dataset
from ..models.config import get_config
from .config import DataPaths, TrainConfig
from .evaluation import METRIC_NAMES
from .run_dir import write_final_metrics
from .trainer import resume_training, run_training


@dataclass(frozen=True)
class DemoSettings:
    """The CPU demo: the built-in shapes data, the tiny model, settings that fit 2 cores."""

    data_dir: str
    num_train: int                      # images generated per split (the cached dataset)
    num_val: int
    image_size: int
    model: dict                         # get_config("tiny", variant, **model)
    train: dict                         # TrainConfig(**train)


# The full demo: about 10 minutes on 2 CPU cores (see docs/training.md for the numbers).
# Its images all have one size, so no evaluation of it depends on the batch, and it keeps
# the official (padding-inclusive) GroupNorm statistics it was tuned and measured with:
# mask_aware_norm=True would change its training batches' statistics, hence its numbers.
DEMO = DemoSettings(
    data_dir="data/shapes", num_train=1000, num_val=200, image_size=128,
    model={"mask_aware_norm": False},
    train=dict(epochs=16, lr=5e-4, lr_backbone=5e-4, lr_drop=12, batch_size=8,
               num_workers=2, transforms="tiny", seed=42))

# ``demo --quick``: a one-minute smoke run of the same code path (used by the tests).
QUICK_DEMO = DemoSettings(
    data_dir="data/shapes-quick", num_train=32, num_val=8, image_size=64,
    model=dict(d_model=32, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=64,
               num_queries=8, tiny_channels=(8, 16, 32, 32)),
    train=dict(epochs=2, lr=1e-3, lr_backbone=1e-3, lr_drop=2, batch_size=4, num_workers=2,
               transforms="tiny", train_scales=(48, 64), val_size=64, max_size=107,
               crop=False, seed=42, num_pictures=2))


def run_demo(out_dir="runs/demo", *, quick=False, data_dir=None, variant="plain",
             epochs=None, device="auto", overwrite=False, resume=False, progress=True,
             log=print, model_overrides=None, train_overrides=None) -> dict:
    """The main job: make the shapes data (once), train the tiny model, evaluate, report.

    Writes the run folder (see the module docstring) plus ``final_metrics.json`` with the
    six COCO metrics, and returns that dict. A folder holding a finished demo is reported
    again rather than retrained (pass ``overwrite=True`` to train anew).
    """
    settings = QUICK_DEMO if quick else DEMO
    out = Path(out_dir)
    final_path = out / "final_metrics.json"
    if final_path.is_file() and not overwrite and not resume:
        final = json.loads(final_path.read_text(encoding="utf-8"))
        log(f"{out} already holds a finished demo run (pass --overwrite to train again):")
        _print_final(final, out, log)
        return final

    data_root = Path(data_dir or settings.data_dir)
    log(f"shapes dataset: {data_root} ({settings.num_train} training, {settings.num_val} "
        f"validation images of {settings.image_size} px; made once, then reused)")
    paths = generate_shapes_dataset(data_root, num_train=settings.num_train,
                                    num_val=settings.num_val,
                                    image_size=(settings.image_size, settings.image_size),
                                    seed=0, progress=progress)
    data = DataPaths.from_shapes(paths)
    if resume:
        result = resume_training(out, epochs=epochs, data=data, device=device,
                                 progress=progress, log=log)
    else:
        model_cfg = get_config("tiny", variant, **{**settings.model, **(model_overrides or {})})
        train = {**settings.train, **(train_overrides or {})}
        if epochs is not None:
            train["epochs"] = int(epochs)
        result = run_training(model_cfg, TrainConfig(**train), data, out, device=device,
                              overwrite=overwrite, progress=progress, log=log)
    if result.interrupted:
        return {}
    write_final_metrics(out, result.final_metrics)
    _print_final(result.final_metrics, out, log)
    return result.final_metrics


def scaled_resolution(size):
    """Training/validation sizes of the ``tiny`` preset scaled to a validation side ``size``."""
    tiny = PRESETS["tiny"]
    factor = size / tiny.val_size
    return {"val_size": int(size), "max_size": int(round(tiny.max_size * factor)),
            "train_scales": tuple(int(round(s * factor)) for s in tiny.scales)}


def _print_final(final, out, log):
    log("final COCO metrics on the validation split: "
        + ", ".join(f"{k} {final[k]:.3f}" for k in METRIC_NAMES if k in final)
        + "  (-1: no object of that size in the split)")
    log(f"files: {out / 'final_metrics.json'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}, "
        f"{out / 'ap.png'}, {out / 'predictions'}/, checkpoints {out / 'last.npz'} and "
        f"{out / 'best.npz'}")


__all__ = ["DemoSettings", "DEMO", "QUICK_DEMO", "run_demo", "scaled_resolution"]
