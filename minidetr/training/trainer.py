"""The training run: data, model, optimiser, the epoch loop, checkpoints, metrics, pictures.

::

    from minidetr.data import generate_shapes_dataset
    from minidetr.models import get_config
    from minidetr.training import DataPaths, TrainConfig, run_training, resume_training

    data = DataPaths.from_shapes(generate_shapes_dataset("data/shapes"))
    result = run_training(get_config("tiny"), TrainConfig(epochs=20, transforms="tiny"),
                          data, "runs/tiny")
    result = resume_training("runs/tiny", epochs=30)          # continue, 10 epochs more

The run folder and its files: :mod:`minidetr.training.run_dir`.

The epoch loop (the official ``main.py``)::

    for epoch in range(start, epochs):
        train_one_epoch(...)              # AdamW, clipping 0.1, three lr groups
        evaluate(...)                     # validation losses + COCO AP (every eval_every)
        lr_scheduler.step()               # StepLR: lr x 0.1 after lr_drop epochs
        save last.npz (+ best.npz), rewrite metrics.jsonl, redraw the plots

Resuming continues exactly where the run stopped: the checkpoint holds the weights, the
AdamW moments and step counts, the schedule, the epoch *and the step within it*, the
running means of the interrupted epoch, and the state of every dropout generator; the
data order and augmentation of every sample are pure functions of ``(seed, epoch,
index)``. On the CPU a resumed run therefore computes the same numbers, bit for bit, as
one that was never interrupted.

Ctrl-C: the first one lets the current step finish, saves ``last.npz`` and returns
(``TrainResult.interrupted``); a second one stops at once without saving. A non-finite
loss raises :class:`~minidetr.training.engine.NonFiniteLossError` naming the step and the
loss term; ``last.npz`` then still holds the last good epoch. Running out of (GPU) memory
raises :class:`RunError` naming the batch and the options that shrink it.
"""
from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..backend import is_out_of_memory, resolve_device, to_device
from ..data import (PRESETS, CategoryMap, CocoDetection, DataLoader, FirstImages, collate,
                    make_transforms)
from ..inference import predict
from ..models.build import build_criterion, build_model, build_postprocess
from ..models.config import ModelConfig
from ..optim import AdamW, StepLR
from ..weights.checkpoint import (Checkpoint, CheckpointError, load_checkpoint,
                                  load_model_state, save_checkpoint)
from ..weights.pretrained import load_pretrained
from .config import DataPaths, TrainConfig
from .engine import (RunningAverages, StepOutOfMemoryError, build_param_groups, evaluate,
                     train_one_epoch)
from .evaluation import METRIC_NAMES
from .plots import draw_detections, plot_ap, plot_losses
from .run_dir import RunError, prepare_run_dir, write_metrics, write_run_json

# --------------------------------------------------------------------------- data
def build_datasets(data: DataPaths, cfg: TrainConfig, category_map=None):
    """The training and validation datasets of ``data`` with ``cfg``'s transforms.

    The validation split uses the training split's :class:`CategoryMap` (or the given
    one, e.g. from a checkpoint), so both agree on the labels.
    """
    kwargs = dict(scales=cfg.train_scales, max_size=cfg.max_size, val_size=cfg.val_size)
    train_tf = make_transforms("train", cfg.transforms, crop=None if cfg.crop else False,
                               hflip_p=cfg.hflip_p, **kwargs)
    val_tf = make_transforms("val", cfg.transforms, **kwargs)
    label_map = category_map if category_map is not None else cfg.label_map
    train = CocoDetection(data.train_images, data.train_annotations, transforms=train_tf,
                          label_map=label_map)
    val = CocoDetection(data.val_images, data.val_annotations, transforms=val_tf,
                        label_map=train.category_map)
    if cfg.max_train_images is not None:
        train = FirstImages(train, cfg.max_train_images)
    if cfg.max_val_images is not None:
        val = FirstImages(val, cfg.max_val_images)
    return train, val


# --------------------------------------------------------------------------- Ctrl-C
class GracefulInterrupt:
    """First Ctrl-C: ask the loop to stop after the current step. Second: stop at once.

    Only the main thread can install signal handlers; elsewhere Ctrl-C keeps its usual
    meaning (KeyboardInterrupt). ``requested`` can also be set by code (tests, callbacks).
    """

    def __init__(self, log=print):
        self.requested = False
        self.log = log
        self._previous = None

    def __call__(self):
        return self.requested

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.log("\nCtrl-C: stopping after this step and saving a checkpoint "
                 "(press Ctrl-C again to stop at once, without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# --------------------------------------------------------------------------- the run
@dataclass
class TrainResult:
    """What a run did. ``final_metrics`` holds the last evaluation (AP, AP50, ...)."""

    run_dir: Path
    history: list
    final_metrics: dict = field(default_factory=dict)
    interrupted: bool = False
    epoch: int = 0                  # completed epochs
    step: int = 0                   # batches done in the next epoch (when interrupted)
    pictures: list = field(default_factory=list)


class Trainer:
    """Owns everything one run needs; :meth:`fit` is the epoch loop.

    Build it with :func:`run_training` or :func:`resume_training` rather than directly.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataPaths,
                 run_dir, *, device="cpu", category_map=None, progress=True, log=print,
                 debug_transfers=False):
        self.model_cfg = model_cfg.validate()
        self.cfg = train_cfg
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.progress = progress
        self.debug_transfers = debug_transfers  # every step under backend.transfer_guard
        self.log = log

        self.train_set, self.val_set = build_datasets(data, train_cfg, category_map)
        self.category_map = self.train_set.category_map
        if self.category_map.num_classes != model_cfg.num_classes:
            raise RunError(f"the model has num_classes={model_cfg.num_classes} logits but the "
                           f"training data's category map ({self.category_map.mode} labels) "
                           f"needs {self.category_map.num_classes}; build the model with "
                           f"num_classes={self.category_map.num_classes}")
        self.train_loader = DataLoader(self.train_set, train_cfg.batch_size, shuffle=True,
                                       seed=train_cfg.seed, drop_last=True,
                                       num_workers=train_cfg.num_workers)
        if len(self.train_loader) == 0:
            raise RunError(f"the training set has {len(self.train_set)} images, fewer than one "
                           f"batch of {train_cfg.batch_size}")
        self.val_loader = DataLoader(self.val_set, train_cfg.batch_size, shuffle=False,
                                     num_workers=train_cfg.num_workers)

        self.model = build_model(model_cfg)
        if device != "cpu":
            self.model.to(device)              # before the optimiser creates its moments
        self.criterion = build_criterion(model_cfg)
        self.postprocess = build_postprocess(model_cfg)
        self.optimizer = AdamW(build_param_groups(self.model, train_cfg), lr=train_cfg.lr,
                               weight_decay=train_cfg.weight_decay)
        self.scheduler = StepLR(self.optimizer, train_cfg.lr_drop, train_cfg.lr_drop_gamma)

        self.epoch = 0                          # completed epochs
        self.step = 0                           # batches done in epoch self.epoch
        self.partial = None                     # RunningAverages of those batches
        self.history = []

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            schedule_state=self.scheduler.state_dict(),
            progress={"epoch": self.epoch, "step": self.step,
                      "steps_per_epoch": len(self.train_loader),
                      "partial": None if self.partial is None else self.partial.state(),
                      "history": self.history},
            rng={"data_seed": self.cfg.seed, "dropout": self.model.rng_state()},
            model_config=self.model_cfg.to_dict(), train_config=self.cfg.to_dict(),
            category_map=self.category_map.to_dict(),
            extra={"data": self.data.to_dict(), "minidetr_version": __version__})

    def restore(self, ckpt: Checkpoint):
        """Load weights, optimiser, schedule, progress and RNG states from ``ckpt``."""
        load_model_state(self.model, ckpt, self.model_cfg.to_dict())
        if ckpt.optimizer_state is None or ckpt.progress is None or ckpt.rng is None:
            raise CheckpointError(f"{ckpt.path}: holds weights only (no optimiser, progress "
                                  "or RNG state), so training cannot resume from it")
        self.optimizer.load_state_dict(ckpt.optimizer_state)
        self.scheduler.load_state_dict(ckpt.schedule_state)
        self.model.set_rng_state(ckpt.rng["dropout"])
        progress = ckpt.progress
        if progress["steps_per_epoch"] != len(self.train_loader):
            raise CheckpointError(f"{ckpt.path}: the run had {progress['steps_per_epoch']} "
                                  f"batches per epoch, the data now gives "
                                  f"{len(self.train_loader)}; resume with the same data")
        self.epoch, self.step = int(progress["epoch"]), int(progress["step"])
        self.partial = RunningAverages.from_state(progress["partial"])
        self.history = list(progress["history"])

    def save(self, name="last.npz"):
        return save_checkpoint(self.run_dir / name, self.checkpoint(), overwrite=True)

    # ------------------------------------------------------------------ the loop
    def _eval_due(self, epoch, out_of_time=False):
        return ((epoch + 1) % self.cfg.eval_every == 0 or epoch + 1 == self.cfg.epochs
                or out_of_time)

    def _out_of_time(self, started) -> bool:
        """True once ``cfg.time_limit`` minutes have passed since ``fit`` started."""
        limit = self.cfg.time_limit
        return limit is not None and time.perf_counter() - started >= 60.0 * limit

    def _best_ap(self):
        aps = [h["AP"] for h in self.history if "AP" in h]
        return max(aps) if aps else -np.inf

    def fit(self, on_step=None) -> TrainResult:
        """Train from the current epoch/step to ``cfg.epochs``; see the module docstring.

        With ``cfg.time_limit`` (minutes), the epoch running when the limit passes is the
        last one: it is finished, evaluated and saved, and the run ends as if it were
        complete (``--resume`` with the same or more ``--epochs`` continues it).

        ``on_step(epoch, step, values)`` is called after every update (``epoch`` 0-based,
        ``step`` the number of batches done in it, ``values`` the logged losses); if it
        returns True the run stops as on Ctrl-C: ``last.npz`` is saved and the result says
        ``interrupted``.
        """
        with GracefulInterrupt(self.log) as interrupt:
            return self._fit(interrupt, on_step)

    def _fit(self, interrupt, on_step) -> TrainResult:
        steps, fit_started = len(self.train_loader), time.perf_counter()

        def hook(epoch, step, values):          # on_step may ask to stop, like Ctrl-C
            if on_step is not None and on_step(epoch, step, values):
                interrupt.requested = True

        while self.epoch < self.cfg.epochs:
            epoch, started = self.epoch, time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            if self.step < steps:
                try:
                    result = train_one_epoch(
                        self.model, self.criterion, self.optimizer,
                        self.train_loader.iter_epoch(epoch, self.step), epoch=epoch,
                        num_steps=steps, clip_max_norm=self.cfg.clip_max_norm,
                        device=self.device, first_step=self.step, averages=self.partial,
                        should_stop=interrupt, on_step=hook, progress=self.progress,
                        debug_transfers=self.debug_transfers)
                except FloatingPointError as e:
                    raise type(e)(f"{e}\n{self._kept()}") from None
                except MemoryError as e:           # engine.StepOutOfMemoryError and kin
                    raise RunError(self._memory_advice(e)) from e
                self.step, self.partial = result.steps_done, result.averages
                if interrupt.requested:
                    return self._interrupted()
            record = {"epoch": epoch + 1, "lr": lr}
            record.update({f"train_{k}": v for k, v in self.partial.means().items()
                           if k != "lr"})
            out_of_time = self._out_of_time(fit_started)
            if self._eval_due(epoch, out_of_time):
                try:
                    val = evaluate(self.model, self.criterion, self.postprocess,
                                   self.val_loader.iter_epoch(0), self.val_set.coco,
                                   self.category_map, num_steps=len(self.val_loader),
                                   device=self.device, should_stop=interrupt,
                                   progress=self.progress)
                except Exception as e:
                    if is_out_of_memory(e):
                        raise RunError(self._memory_advice(e, "evaluating")) from e
                    raise
                if val is None:
                    return self._interrupted()
                record.update({(k if k in METRIC_NAMES else f"val_{k}"): v
                               for k, v in val.items()})
            record["seconds"] = round(time.perf_counter() - started, 2)

            # the epoch is complete: advance, save, log
            self.history.append(record)
            self.scheduler.step()
            self.epoch, self.step, self.partial = epoch + 1, 0, None
            self.save("last.npz")
            if "AP" in record and record["AP"] >= self._best_ap():
                self.save("best.npz")
            write_metrics(self.run_dir, self.history)
            self._plots()
            self.log(_epoch_line(record, self.cfg.epochs))
            if interrupt.requested:
                return self._interrupted()
            if out_of_time and self.epoch < self.cfg.epochs:
                self.log(f"time limit of {self.cfg.time_limit:g} min reached after epoch "
                         f"{self.epoch}/{self.cfg.epochs}: stopping here (continue with "
                         f"`python -m minidetr train --resume {self.run_dir}`)")
                break

        pictures = self.save_pictures()
        final = {k: self.history[-1][k] for k in METRIC_NAMES if k in self.history[-1]}
        return TrainResult(self.run_dir, self.history, final, epoch=self.epoch,
                           pictures=pictures)

    def _kept(self) -> str:
        """Which checkpoint survives a run that stopped on an error."""
        if (self.run_dir / "last.npz").exists():
            return (f"The last good checkpoint {self.run_dir / 'last.npz'} (after epoch "
                    f"{self.epoch}, step {self.step}) is kept.")
        return "No checkpoint was written yet."

    def _memory_advice(self, error, doing="training") -> str:
        """Out of memory: what happened, and the options (CLI names) that need less."""
        max_size = self.cfg.max_size or PRESETS[self.cfg.transforms].max_size
        what = (str(error) if isinstance(error, StepOutOfMemoryError)   # names the batch
                else f"out of memory while {doing} on {self.device}: {error}")
        return (f"{what}\n"
                f"Each step needs less memory with a smaller batch or smaller images; start "
                f"a new run with a smaller --batch-size (this run: {self.cfg.batch_size}), "
                f"a smaller --max-size (the long side of an image, this run: {max_size} "
                f"pixels), a smaller --transforms preset (this run: {self.cfg.transforms}; "
                f"small and tiny use smaller images), or a smaller --config. {self._kept()}")

    def _interrupted(self) -> TrainResult:
        path = self.save("last.npz")
        self.log(f"interrupted: saved {path} (epoch {self.epoch + 1}, {self.step} of "
                 f"{len(self.train_loader)} steps done); continue with "
                 f"`python -m minidetr train --resume {self.run_dir}`")
        return TrainResult(self.run_dir, self.history, interrupted=True, epoch=self.epoch,
                           step=self.step)

    def _plots(self):
        plot_losses(self.history, self.run_dir / "loss.png")
        if any("AP" in h for h in self.history):
            plot_ap(self.history, self.run_dir / "ap.png")

    # ------------------------------------------------------------------ pictures
    def save_pictures(self, count=None):
        """Draw detections (coloured) and ground truth (dashed) on the first val images."""
        count = self.cfg.num_pictures if count is None else count
        return save_prediction_pictures(
            self.model, self.postprocess, self.val_set, range(min(count, len(self.val_set))),
            self.run_dir / "predictions", self.category_map, self.cfg.picture_threshold,
            self.device)


def save_prediction_pictures(model, postprocess, dataset, indices, out_dir, category_map,
                             threshold=0.5, device="cpu"):
    """Run the model on ``dataset[i]`` for each index and save one PNG each; return paths."""
    paths = []
    for index in indices:
        image, target = dataset.get(index)                  # validation transforms
        raw_image, raw_target = dataset.load(index)         # original pixels and boxes
        batch = collate([(image, target)])
        det = predict(model, postprocess, to_device(batch.images, device),
                      to_device(batch.mask, device), target["orig_size"][None])[0]
        image_id = raw_target["image_id"]
        paths.append(draw_detections(
            raw_image, det, category_map.name_of, Path(out_dir) / f"val_{image_id:06d}.png",
            score_threshold=threshold, ground_truth=raw_target,
            title=f"image {image_id}: detections with score >= {threshold} "
                  "(dashed: ground truth)"))
    return paths


def _epoch_line(record, epochs):
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}"]
    if "val_loss" in record:
        parts.append(f"val loss {record['val_loss']:.4f}")
    if "AP" in record:
        parts.append(f"AP {record['AP']:.3f} AP50 {record['AP50']:.3f}")
    parts.append(f"{record['seconds']:.0f} s")
    return ", ".join(parts)


# --------------------------------------------------------------------------- entry points
def run_training(model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataPaths, out_dir, *,
                 device="cpu", overwrite=False, progress=True, on_step=None,
                 log=print, debug_transfers=False) -> TrainResult:
    """Train a new model; see the module docstring for what ``out_dir`` receives.

    ``debug_transfers`` runs every training step under
    :func:`~minidetr.backend.transfer_guard` (GPU debugging; nothing changes on a CPU).

    Raises:
        RunError: ``out_dir`` already holds a run (and ``overwrite`` is False), the
            data and the model disagree, or a step ran out of memory.
        NonFiniteLossError: the loss became NaN/inf (``last.npz`` keeps the last epoch).
    """
    device = resolve_device(device)
    run_dir = Path(out_dir)
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, device=device,
                      progress=progress, log=log, debug_transfers=debug_transfers)
    for line in load_pretrained(trainer.model, model_cfg, train_cfg):   # before any file
        log(line)
    prepare_run_dir(run_dir, overwrite)
    write_run_json(run_dir, {
        "model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict(),
        "data": data.to_dict(), "category_map": trainer.category_map.to_dict(),
        "device": device, "minidetr_version": __version__})
    write_metrics(run_dir, [])
    log(f"run folder {run_dir}: {model_cfg.backbone} backbone, d_model {model_cfg.d_model}, "
        f"{trainer.model.num_parameters(trainable_only=True):,} trainable parameters, "
        f"{len(trainer.train_set)} training / {len(trainer.val_set)} validation images, "
        f"{train_cfg.epochs} epochs of {len(trainer.train_loader)} steps on {device}")
    log(f"seeds: model initialisation and dropout {model_cfg.seed}, data order and "
        f"augmentation {train_cfg.seed}")
    return trainer.fit(on_step)


def resume_training(run_dir, *, epochs=None, data: DataPaths | None = None, device="cpu",
                    progress=True, on_step=None, log=print, debug_transfers=False,
                    time_limit="keep") -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.npz``, exactly where it stopped.

    Args:
        epochs: a new total number of epochs (to train longer); default the run's own.
        data: other paths for the same data (if it moved); default the run's own.
        debug_transfers: as for :func:`run_training`.
        time_limit: minutes for this session (``TrainConfig.time_limit``, counted from
            the resume), None for none; default ``"keep"``: the run's own.

    Raises:
        RunError: ``run_dir`` does not exist or holds no checkpoint, or a step ran out
            of memory.
        CheckpointError: the checkpoint is unreadable or does not fit.
    """
    device = resolve_device(device)
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: the run folder {run_dir} does not exist")
    if not (run_dir / "last.npz").is_file():
        raise RunError(f"cannot resume: {run_dir} holds no checkpoint (last.npz); start a new "
                       "run instead")
    ckpt = load_checkpoint(run_dir / "last.npz")
    if ckpt.model_config is None or ckpt.train_config is None or ckpt.category_map is None:
        raise CheckpointError(f"{ckpt.path}: lacks the run's configuration, so it cannot be "
                              "resumed (is it a converted or weights-only checkpoint?)")
    try:
        model_cfg = ModelConfig.from_dict(ckpt.model_config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.path}: {e}") from None
    train_cfg = TrainConfig.from_dict(ckpt.train_config)
    if epochs is not None:
        train_cfg = train_cfg.replace(epochs=int(epochs))
    if time_limit != "keep":
        train_cfg = train_cfg.replace(time_limit=time_limit)
    data = data if data is not None else DataPaths.from_dict(ckpt.extra["data"])
    category_map = CategoryMap.from_dict(ckpt.category_map)
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, device=device,
                      category_map=category_map, progress=progress, log=log,
                      debug_transfers=debug_transfers)
    trainer.restore(ckpt)
    write_metrics(run_dir, trainer.history)           # drop epochs after the checkpoint
    if trainer.epoch >= train_cfg.epochs:
        log(f"{run_dir} already finished its {train_cfg.epochs} epochs (pass a larger --epochs "
            "to train longer)")
    else:
        log(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step + 1} of "
            f"{len(trainer.train_loader)}, on {device}")
    result = trainer.fit(on_step)
    return result


__all__ = ["Trainer", "TrainResult", "RunError", "run_training", "resume_training",
           "build_datasets", "save_prediction_pictures", "GracefulInterrupt"]
