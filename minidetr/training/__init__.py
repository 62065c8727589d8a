"""Training: the step, the epoch loop, evaluation, the run folder, the demo.

The path of one training run, top to bottom:

==================  ====================================================================
:mod:`.config`      :class:`TrainConfig` (the recipe: optimiser, schedule, augmentation)
                    and :class:`DataPaths` (the two splits)
:mod:`.engine`      one training step and one epoch (the official ``engine.py``):
                    forward, losses, backward, clipping, AdamW; ``evaluate``
:mod:`.evaluation`  COCO box AP with pycocotools (:class:`CocoEvaluator`)
:mod:`.trainer`     the run: :func:`run_training`, :func:`resume_training`, the epoch
                    loop, checkpoints every epoch, Ctrl-C, pictures
:mod:`.run_dir`     the run folder's files and their one writer each
:mod:`.plots`       loss and AP curves, detections drawn on images
:mod:`.demo`        the main job (``python -m minidetr demo``)
==================  ====================================================================

Checkpoints themselves (the ``.npz`` format) are :mod:`minidetr.weights.checkpoint`.
"""
from .config import DataPaths, TrainConfig  # noqa: F401
from .run_dir import RUN_FILES, RunError, read_metrics  # noqa: F401
from .trainer import (GracefulInterrupt, Trainer, TrainResult, build_datasets,  # noqa: F401
                      resume_training, run_training)

__all__ = ["DataPaths", "TrainConfig", "RUN_FILES", "RunError", "read_metrics",
           "GracefulInterrupt", "Trainer", "TrainResult", "build_datasets",
           "resume_training", "run_training"]
