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

Ctrl-C or SIGTERM (what ``timeout`` and cluster schedulers send): the first one lets the
current step finish, saves ``last.npz`` and returns (``TrainResult.interrupted``,
``TrainResult.signal``); a second one stops at once without saving.

Nothing is lost when a run fails. Before the first step, :mod:`minidetr.data.preflight`
opens every image (and decodes it, on sets of up to 10 000 images) and prints a summary
per split, so a bad image stops the run before anything is trained. After the first step,
any failure (a bad image, an evaluation error, a non-finite loss, out of memory, a disk
error) first saves ``last.npz`` at the last completed step, where the disk allows, and
then raises the error with a note saying what was saved and how to continue
(``error.__notes__``). A non-finite loss raises
:class:`~minidetr.training.engine.NonFiniteLossError` naming the step and the loss term;
running out of (GPU) memory raises :class:`RunError` naming the batch and the options that
shrink it; a full or read-only disk raises :class:`~minidetr.files.DiskWriteError`. Every
save first keeps the previous ``last.npz`` as ``last.prev.npz``, so a damaged ``last.npz``
still leaves a checkpoint to resume from (``--resume RUN_DIR/last.prev.npz``).
"""
from __future__ import annotations

import json
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from ..backend import is_out_of_memory, resolve_device, to_device
from ..data import (PRESETS, CategoryMap, CocoDetection, DataLoader, DatasetError, FirstImages,
                    collate, make_transforms)
from ..data.preflight import preflight
from ..files import DiskWriteError, keep_previous, write_text
from ..inference import predict
from ..models.build import build_criterion, build_model, build_postprocess
from ..models.config import ModelConfig
from ..optim import AdamW, StepLR
from ..weights.checkpoint import (Checkpoint, CheckpointError, CorruptCheckpointError,
                                  load_checkpoint, load_model_state, save_checkpoint)
from ..weights.pretrained import load_pretrained
from .config import DataPaths, TrainConfig, data_record, locate_data
from .engine import (RunningAverages, StepOutOfMemoryError, build_param_groups, evaluate,
                     long_lived_objects_frozen, train_one_epoch)
from .evaluation import METRIC_NAMES
from .plots import draw_detections, plot_ap, plot_losses
from .run_dir import (CHECKPOINT_FILES, RunError, existing_run_files, prepare_run_dir,
                      write_final_metrics, write_metrics, write_run_json)

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
                          label_map=label_map, warn=False)     # the pre-flight summary says
    val = CocoDetection(data.val_images, data.val_annotations, transforms=val_tf,
                        label_map=train.category_map, warn=False)
    if cfg.max_train_images is not None:
        train = FirstImages(train, cfg.max_train_images)
    if cfg.max_val_images is not None:
        val = FirstImages(val, cfg.max_val_images)
    return train, val


# --------------------------------------------------------------------------- failures
# Errors whose message says all (no traceback needed); anything else is a bug or an
# environment problem, and its traceback goes to the run folder's error.log.
EXPECTED_FAILURES = (DatasetError, FloatingPointError, MemoryError, RunError, CheckpointError,
                     DiskWriteError, KeyboardInterrupt)


def add_note(error, note: str):
    """Attach ``note`` to ``error`` (``BaseException.add_note`` where Python has it, 3.11+;
    the same ``__notes__`` list before). The CLI prints the notes under the error line."""
    if hasattr(error, "add_note"):
        error.add_note(note)
    else:
        error.__notes__ = [*getattr(error, "__notes__", []), note]


# --------------------------------------------------------------------------- Ctrl-C, SIGTERM
class GracefulInterrupt:
    """First Ctrl-C or SIGTERM: ask the loop to stop after the current step (and save).
    Second: stop at once (KeyboardInterrupt), without saving.

    SIGTERM is what ``timeout``, ``kill`` and cluster schedulers (before their SIGKILL)
    send. ``signal`` is the number of the first signal received (None if stopped by code).
    Only the main thread can install signal handlers; elsewhere both keep their usual
    meaning. ``requested`` can also be set by code (tests, callbacks).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, log=print):
        self.requested = False
        self.signal = None
        self.log = log
        self._previous = {}

    def __call__(self):
        return self.requested

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        self.log(f"\n{name}: stopping after this step and saving a checkpoint "
                 f"(another {name} stops at once, without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
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
    signal: int | None = None       # the signal that interrupted the run (SIGINT, SIGTERM)


class Trainer:
    """Owns everything one run needs; :meth:`fit` is the epoch loop.

    Build it with :func:`run_training` or :func:`resume_training` rather than directly.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, data: DataPaths,
                 run_dir, *, device="cpu", category_map=None, progress=True, log=print,
                 debug_transfers=False, check_images="auto"):
        self.model_cfg = model_cfg.validate()
        self.cfg = train_cfg
        self.data = data
        self.run_dir = Path(run_dir)
        self.device = device
        self.progress = progress
        self.debug_transfers = debug_transfers  # every step under backend.transfer_guard
        self.log = log

        self.train_set, self.val_set = build_datasets(data, train_cfg, category_map)
        self.check_data(check_images)
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
        self.saved_at = None                    # (epoch, step) of last.npz on disk
        self.keep_previous_last = True          # last.npz -> last.prev.npz before a save
        self._rng_after_step = None             # dropout RNG after the last completed step

    # ------------------------------------------------------------------ pre-flight
    def check_data(self, check_images="auto"):
        """Open every image of both splits (:func:`~minidetr.data.preflight.preflight`) and
        log one summary per split; a bad image raises DatasetError before any training."""
        same = (Path(self.data.val_annotations).resolve()
                == Path(self.data.train_annotations).resolve())
        for split, dataset in (("train", self.train_set), ("val", self.val_set)):
            summary = preflight(dataset, split, decode=check_images, progress=self.progress,
                                num_workers=self.cfg.num_workers,
                                same_file_as="train" if split == "val" and same else None)
            for line in summary.lines():
                self.log(line)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self, rng_state=None) -> Checkpoint:
        """Everything needed to continue; ``rng_state``: the dropout generators' state to
        record (default: now)."""
        return Checkpoint(
            model_state=self.model.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            schedule_state=self.scheduler.state_dict(),
            progress={"epoch": self.epoch, "step": self.step,
                      "steps_per_epoch": len(self.train_loader),
                      "partial": None if self.partial is None else self.partial.state(),
                      "history": self.history},
            rng={"data_seed": self.cfg.seed,
                 "dropout": self.model.rng_state() if rng_state is None else rng_state},
            model_config=self.model_cfg.to_dict(), train_config=self.cfg.to_dict(),
            category_map=self.category_map.to_dict(),
            extra={**data_record(self.data, self.run_dir), "minidetr_version": __version__})

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
        self.saved_at = (self.epoch, self.step)
        self._rng_after_step = ckpt.rng["dropout"]     # until a step of this session

    def save(self, name="last.npz", rng_state=None):
        """Write a checkpoint; ``last.npz`` first keeps its previous version as
        ``last.prev.npz`` (a hard link: no copy), so both are complete at every moment."""
        path = self.run_dir / name
        if name == "last.npz":
            if self.keep_previous_last:
                keep_previous(path, self.run_dir / "last.prev.npz", what="checkpoint")
            save_checkpoint(path, self.checkpoint(rng_state), overwrite=True)
            self.saved_at, self.keep_previous_last = (self.epoch, self.step), True
            return path
        return save_checkpoint(path, self.checkpoint(rng_state), overwrite=True)

    # ------------------------------------------------------------------ failures
    def _position(self, epoch=None, step=None) -> str:
        epoch, step = (self.epoch, self.step) if epoch is None else (epoch, step)
        if step == 0:
            return f"after epoch {epoch}" if epoch else "before the first step"
        return f"epoch {epoch + 1}, {step} of {len(self.train_loader)} steps done"

    def _save_after_failure(self, error) -> str:
        """Save ``last.npz`` at the last completed step (where the disk allows); return a
        note for the user: what is on disk and the command that continues the run."""
        resume = f"`python -m minidetr train --resume {self.run_dir}`"
        if (self.epoch, self.step) == (0, 0) and self.saved_at is None:
            return (f"Nothing was trained yet and {self.run_dir} holds no checkpoint; once "
                    "the cause is fixed, the same command starts the run again (no "
                    "--overwrite needed).")
        kept = (f"{self.run_dir / 'last.npz'} ({self._position(*self.saved_at)}) is intact"
                if self.saved_at is not None else None)
        if (self.epoch, self.step) != self.saved_at:
            try:
                path = self.save("last.npz", rng_state=self._rng_after_step)
            except Exception as save_error:       # the disk, most likely: say both
                why = ("" if str(save_error) == str(error)      # no need to say it twice
                       else f" ({type(save_error).__name__}: {save_error})")
                if self.saved_at is None:
                    return (f"Saving a checkpoint failed too{why}; nothing of this session "
                            "was saved. Once the cause is fixed, run the same command again.")
                return (f"Saving a checkpoint failed too{why}; {kept}. Continue from it "
                        f"with {resume} once the cause is fixed.")
            return (f"Saved {path} ({self._position()}) before stopping; continue the run "
                    f"with {resume} once the cause is fixed.")
        return f"{kept}; continue the run with {resume} once the cause is fixed."

    def _log_traceback(self, error) -> str:
        """Write an unexpected error's traceback to ``error.log``; return a note naming it."""
        path = self.run_dir / "error.log"
        try:
            write_text(path, "".join(traceback.format_exception(
                type(error), error, error.__traceback__)), what="error log")
        except Exception:                       # no disk left: the note says what it can
            return "The traceback could not be written to disk."
        return f"The full traceback is in {path}."

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
        with GracefulInterrupt(self.log) as interrupt, long_lived_objects_frozen():
            try:
                return self._fit(interrupt, on_step)
            except Exception as error:          # save what was trained, then say so
                notes = [self._save_after_failure(error)]
                if not isinstance(error, EXPECTED_FAILURES):
                    notes.append(self._log_traceback(error))
                for note in notes:
                    add_note(error, note)
                raise

    def _fit(self, interrupt, on_step) -> TrainResult:
        steps, fit_started = len(self.train_loader), time.perf_counter()

        def hook(epoch, step, values):          # on_step may ask to stop, like Ctrl-C
            self.step = step                    # the last completed step, for failures
            self._rng_after_step = self.model.rng_state()
            if on_step is not None and on_step(epoch, step, values):
                interrupt.requested = True

        while self.epoch < self.cfg.epochs:
            epoch, started = self.epoch, time.perf_counter()
            lr = self.optimizer.param_groups[0]["lr"]
            if self.step < steps:
                if self.partial is None:
                    self.partial = RunningAverages()      # updated in place, step by step
                try:
                    result = train_one_epoch(
                        self.model, self.criterion, self.optimizer,
                        self.train_loader.iter_epoch(epoch, self.step), epoch=epoch,
                        num_steps=steps, clip_max_norm=self.cfg.clip_max_norm,
                        device=self.device, first_step=self.step, averages=self.partial,
                        should_stop=interrupt, on_step=hook, progress=self.progress,
                        debug_transfers=self.debug_transfers)
                except MemoryError as e:           # engine.StepOutOfMemoryError and kin
                    raise RunError(self._memory_advice(e)) from e
                self.step, self.partial = result.steps_done, result.averages
                if interrupt.requested:
                    return self._interrupted(interrupt)
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
                    return self._interrupted(interrupt)
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
                return self._interrupted(interrupt)
            if out_of_time and self.epoch < self.cfg.epochs:
                self.log(f"time limit of {self.cfg.time_limit:g} min reached after epoch "
                         f"{self.epoch}/{self.cfg.epochs}: stopping here (continue with "
                         f"`python -m minidetr train --resume {self.run_dir}`)")
                break

        pictures = self.save_pictures()
        final = {k: self.history[-1][k] for k in METRIC_NAMES if k in self.history[-1]}
        return TrainResult(self.run_dir, self.history, final, epoch=self.epoch,
                           pictures=pictures)

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
                f"small and tiny use smaller images), or a smaller --config.")

    def _interrupted(self, interrupt=None) -> TrainResult:
        path = self.save("last.npz")
        self.log(f"interrupted: saved {path} (epoch {self.epoch + 1}, {self.step} of "
                 f"{len(self.train_loader)} steps done); continue with "
                 f"`python -m minidetr train --resume {self.run_dir}`")
        return TrainResult(self.run_dir, self.history, interrupted=True, epoch=self.epoch,
                           step=self.step, signal=getattr(interrupt, "signal", None))

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
                 log=print, debug_transfers=False, check_images="auto") -> TrainResult:
    """Train a new model; see the module docstring for what ``out_dir`` receives.

    ``debug_transfers`` runs every training step under
    :func:`~minidetr.backend.transfer_guard` (GPU debugging; nothing changes on a CPU).
    ``check_images``: the pre-flight check, "auto", "decode" or "header"
    (:func:`~minidetr.data.preflight.preflight`). A folder whose earlier run saved no
    checkpoint is reused without ``overwrite`` (nothing in it can be lost).

    Raises:
        RunError: ``out_dir`` already holds a run (and ``overwrite`` is False), the
            data and the model disagree, or a step ran out of memory.
        NonFiniteLossError: the loss became NaN/inf (``last.npz`` keeps the last step).
        DatasetError: the pre-flight check found a bad image (nothing is written).
        DiskWriteError: the disk refused a file (no space, read-only, no permission).
    """
    device = resolve_device(device)
    run_dir = Path(out_dir)
    data = data.absolute()                   # the run must not depend on the current folder
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, device=device,
                      progress=progress, log=log, debug_transfers=debug_transfers,
                      check_images=check_images)
    for line in load_pretrained(trainer.model, model_cfg, train_cfg):   # before any file
        log(line)
    stale = existing_run_files(run_dir) if run_dir.is_dir() else []
    if stale and not overwrite and not set(stale) & set(CHECKPOINT_FILES):
        log(f"{run_dir} holds a run that stopped before saving any checkpoint "
            f"({', '.join(stale)}): starting it again")
    prepare_run_dir(run_dir, overwrite)
    write_run_json(run_dir, {
        "model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict(),
        **data_record(data, run_dir), "category_map": trainer.category_map.to_dict(),
        "device": device, "minidetr_version": __version__})
    write_metrics(run_dir, [])
    log(f"run folder {run_dir}: {model_cfg.backbone} backbone, d_model {model_cfg.d_model}, "
        f"{trainer.model.num_parameters(trainable_only=True):,} trainable parameters, "
        f"{len(trainer.train_set)} training / {len(trainer.val_set)} validation images, "
        f"{train_cfg.epochs} epochs of {len(trainer.train_loader)} steps on {device}")
    log(f"seeds: model initialisation and dropout {model_cfg.seed}, data order and "
        f"augmentation {train_cfg.seed}")
    return _finish(trainer.fit(on_step), run_dir)


def _finish(result, run_dir):
    """``final_metrics.json`` of a run that ended with an evaluation (as ``demo`` writes)."""
    if result.final_metrics and not result.interrupted:
        write_final_metrics(run_dir, {k: result.final_metrics[k] for k in METRIC_NAMES
                                      if k in result.final_metrics})
    return result


def _update_run_json(run_dir, train_cfg, data, epoch, device):
    """``run.json`` after a resume: the configuration now in force (epochs, time limit),
    where the data is now, and one entry per resume (from which epoch, on which device)."""
    path = Path(run_dir) / "run.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = {}
    info.update({"train_config": train_cfg.to_dict(), **data_record(data, run_dir)})
    info["resumed"] = list(info.get("resumed") or []) + [
        {"from_epoch": int(epoch), "epochs": train_cfg.epochs, "device": device,
         "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minidetr_version": __version__}]
    write_run_json(run_dir, info)


def _describe_checkpoint(path) -> str | None:
    """``"epoch 2, 1 of 3 steps done"`` for a readable checkpoint with progress, else None."""
    try:
        progress = load_checkpoint(path).progress
    except CheckpointError:
        return None
    if not progress:
        return "weights only"
    epoch, step = int(progress["epoch"]), int(progress["step"])
    if step == 0:
        return f"after epoch {epoch}"
    return f"epoch {epoch + 1}, {step} of {progress['steps_per_epoch']} steps done"


def _other_checkpoints(run_dir, damaged) -> str:
    """What to do when ``damaged`` cannot be read: the other readable checkpoints of the
    run folder, and the command that resumes from each."""
    found = []
    for name in CHECKPOINT_FILES:
        path = Path(run_dir) / name
        if path != Path(damaged) and path.is_file():
            where = _describe_checkpoint(path)
            if where is not None and where != "weights only":
                found.append((path, where))
    if not found:
        return (f"No other readable checkpoint is in {run_dir}; start the run again with "
                f"`python -m minidetr train ... --out {run_dir} --overwrite`.")
    listed = "; ".join(f"`python -m minidetr train --resume {path}` ({where})"
                       for path, where in found)
    return (f"Resume from an earlier checkpoint instead (the training after it is redone, "
            f"and {Path(damaged).name} is replaced at the next save): {listed}.")


def _restart_from_run_json(run_dir, epochs, data, time_limit, **kwargs) -> TrainResult:
    """``--resume`` of a run that saved no checkpoint: start it again from ``run.json``."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text(encoding="utf-8"))
        model_cfg = ModelConfig.from_dict(info["model_config"])
        train_cfg = TrainConfig.from_dict(info["train_config"])
        data = data if data is not None else DataPaths.from_dict(info["data"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunError(f"cannot resume: {run_dir} holds no checkpoint, and its run.json cannot "
                       f"be read ({type(e).__name__}: {e}); start a new run with `python -m "
                       f"minidetr train ... --out {run_dir}` (no --overwrite needed)") from None
    if epochs is not None:
        train_cfg = train_cfg.replace(epochs=int(epochs))
    if time_limit != "keep":
        train_cfg = train_cfg.replace(time_limit=time_limit)
    kwargs["log"](f"{run_dir} holds no checkpoint: the run stopped before its first step "
                  "finished, so it starts again from the beginning with the configuration "
                  "in its run.json")
    return run_training(model_cfg, train_cfg, data, run_dir, **kwargs)


def resume_training(run_dir, *, epochs=None, data: DataPaths | None = None, device="cpu",
                    progress=True, on_step=None, log=print, debug_transfers=False,
                    time_limit="keep", check_images="auto") -> TrainResult:
    """Continue the run in ``run_dir`` from its ``last.npz``, exactly where it stopped.

    ``run_dir`` may also name a checkpoint inside a run folder (``runs/x/last.prev.npz``,
    ``runs/x/best.npz``) to continue from it when ``last.npz`` is damaged; the run then
    goes on in that folder. A folder whose run stopped before saving any checkpoint (it
    holds a ``run.json`` only) is started again from the beginning.

    Args:
        epochs: a new total number of epochs (to train longer); default the run's own.
        data: other paths for the same data (if it moved); default the run's own.
        debug_transfers: as for :func:`run_training`.
        time_limit: minutes for this session (``TrainConfig.time_limit``, counted from
            the resume), None for none; default ``"keep"``: the run's own.

    Raises:
        RunError: ``run_dir`` does not exist or holds no run, or a step ran out of memory.
        CheckpointError: the checkpoint does not fit; :class:`CorruptCheckpointError`
            (damaged) lists the folder's other checkpoints and the command for each.
    """
    device = resolve_device(device)
    run_dir = Path(run_dir)
    ckpt_path = run_dir / "last.npz"
    if run_dir.suffix == ".npz" and not run_dir.is_dir():        # a checkpoint in the folder
        run_dir, ckpt_path = run_dir.parent, run_dir
        if not ckpt_path.is_file():
            raise RunError(f"cannot resume: checkpoint not found: {ckpt_path}")
    if not run_dir.is_dir():
        raise RunError(f"cannot resume: the run folder {run_dir} does not exist")
    if not ckpt_path.is_file():
        others = [n for n in CHECKPOINT_FILES if (run_dir / n).is_file()]
        if others:
            raise RunError(f"cannot resume: {run_dir} holds no last.npz. " + _other_checkpoints(
                run_dir, ckpt_path))
        if (run_dir / "run.json").is_file():
            return _restart_from_run_json(
                run_dir, epochs, data, time_limit, device=device, progress=progress,
                on_step=on_step, log=log, debug_transfers=debug_transfers,
                check_images=check_images)
        raise RunError(f"cannot resume: {run_dir} holds no checkpoint and no run.json (no run "
                       f"was started there); start one with `python -m minidetr train ... "
                       f"--out {run_dir}`")
    try:
        ckpt = load_checkpoint(ckpt_path)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(f"{e}\n{_other_checkpoints(run_dir, ckpt_path)}",
                                     e.member) from None
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
    data = (data if data is not None else locate_data(ckpt.extra, run_dir)).absolute()
    category_map = CategoryMap.from_dict(ckpt.category_map)
    trainer = Trainer(model_cfg, train_cfg, data, run_dir, device=device,
                      category_map=category_map, progress=progress, log=log,
                      debug_transfers=debug_transfers, check_images=check_images)
    trainer.restore(ckpt)
    if ckpt_path.name != "last.npz":     # keep last.npz as last.prev.npz only if readable
        last = run_dir / "last.npz"
        trainer.keep_previous_last = last.is_file() and _describe_checkpoint(last) is not None
        trainer.saved_at = None          # last.npz is not the checkpoint the run came from
    write_metrics(run_dir, trainer.history)           # drop epochs after the checkpoint
    _update_run_json(run_dir, train_cfg, data, trainer.epoch, device)
    if trainer.epoch >= train_cfg.epochs:
        log(f"{run_dir} already finished its {train_cfg.epochs} epochs (pass a larger --epochs "
            "to train longer)")
    else:
        log(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step + 1} of "
            f"{len(trainer.train_loader)}, on {device}")
    return _finish(trainer.fit(on_step), run_dir)


__all__ = ["Trainer", "TrainResult", "RunError", "run_training", "resume_training",
           "build_datasets", "save_prediction_pictures", "GracefulInterrupt"]
