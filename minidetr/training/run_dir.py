"""The run folder: what a training run writes, and the one writer of each file.

=====================  ===============================================================
``run.json``           the model and training configurations, data paths and seeds
``last.npz``           checkpoint after the last step (every epoch, on Ctrl-C/SIGTERM,
                       and on a failure after the first step)
``last.prev.npz``      the ``last.npz`` before it (a damaged ``last.npz`` is not the end)
``best.npz``           checkpoint of the epoch with the best validation AP
``metrics.jsonl``      one JSON line of metrics per epoch
``final_metrics.json`` the six COCO metrics of the last evaluation
``loss.png``           loss terms over epochs (train and validation)
``ap.png``             COCO AP over epochs
``predictions/``       detections drawn on a few validation images (end of training)
``error.log``          the traceback of an unexpected error that stopped the run
=====================  ===============================================================

Every file is written atomically (:mod:`minidetr.files`): a crash never leaves a
half-written ``metrics.jsonl`` or ``run.json``. A folder whose run saved no checkpoint
holds nothing that can be lost: a new run may replace it without ``overwrite``.
``metrics.jsonl`` is always written whole, from the run's history, by
:func:`write_metrics`, so after a resume it holds exactly the epochs the checkpoint knows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..files import make_folder, write_json, write_text

# Files a run writes; only these are ever replaced (with overwrite=True).
RUN_FILES = ("run.json", "last.npz", "best.npz", "metrics.jsonl", "loss.png", "ap.png",
             "predictions", "final_metrics.json", "last.prev.npz", "error.log")
# The files that hold training (a folder without any of them can be started again).
CHECKPOINT_FILES = ("last.npz", "last.prev.npz", "best.npz")
METRICS_FILE = "metrics.jsonl"


class RunError(ValueError):
    """A run cannot start or continue: a bad folder, configuration or data; says which."""


def existing_run_files(run_dir) -> list:
    """The names of :data:`RUN_FILES` present in ``run_dir``."""
    run_dir = Path(run_dir)
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def prepare_run_dir(run_dir, overwrite=False) -> Path:
    """Create ``run_dir`` for a new run; refuse to replace an earlier run's files.

    With ``overwrite`` only the files a run writes (``RUN_FILES``) are removed; anything
    else in the folder is left alone. A run that saved no checkpoint (``CHECKPOINT_FILES``)
    is replaced without ``overwrite``: nothing of it can be lost.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a folder")
    existing = existing_run_files(run_dir) if run_dir.is_dir() else []
    if set(existing) & set(CHECKPOINT_FILES) and not overwrite:
        raise RunError(f"{run_dir} already holds a run ({', '.join(existing)}); continue it "
                       f"with `python -m minidetr train --resume {run_dir}`, replace it with "
                       "--overwrite, or choose another --out")
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    make_folder(run_dir, "run folder")
    return run_dir


def write_run_json(run_dir, info: dict) -> Path:
    """``run.json``: what the run is (configurations, data, device, version)."""
    return write_json(Path(run_dir) / "run.json", info, what="run description")


def write_metrics(run_dir, history) -> Path:
    """``metrics.jsonl``: one JSON line per epoch of ``history`` (the whole file, atomically)."""
    return write_text(Path(run_dir) / METRICS_FILE,
                      "".join(json.dumps(record) + "\n" for record in history), what="metrics")


def read_metrics(run_dir) -> list:
    """The per-epoch metric dicts of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def write_final_metrics(run_dir, metrics: dict) -> Path:
    """``final_metrics.json``: the six COCO metrics of the run's last evaluation."""
    return write_json(Path(run_dir) / "final_metrics.json", metrics)


__all__ = ["RUN_FILES", "CHECKPOINT_FILES", "RunError", "existing_run_files", "prepare_run_dir",
           "write_run_json",
           "write_metrics", "read_metrics", "write_final_metrics"]
