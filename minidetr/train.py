"""The training run: data, model, optimiser, the epoch loop, checkpoints, metrics, pictures.

::

    from minidetr.data import generate_shapes_dataset
    from minidetr.models import get_config
    from minidetr.train import DataPaths, TrainConfig, run_training, resume_training

    data = DataPaths.from_shapes(generate_shapes_dataset("data/shapes"))
    result = run_training(get_config("tiny"), TrainConfig(epochs=20, transforms="tiny"),
                          data, "runs/tiny")
    result = resume_training("runs/tiny", epochs=30)          # continue, 10 epochs more

A run folder holds:

=====================  ===============================================================
``run.json``           the model and training configurations, data paths and seeds
``last.npz``           checkpoint after the last step (every epoch, and on Ctrl-C)
``best.npz``           checkpoint of the epoch with the best validation AP
``metrics.jsonl``      one JSON line of metrics per epoch
``loss.png``           loss terms over epochs (train and validation)
``ap.png``             COCO AP over epochs
``predictions/``       detections drawn on a few validation images (end of training)
=====================  ===============================================================

The epoch loop (the official ``main.py``)::

    for epoch in range(start, epochs):
        train_one_epoch(...)              # AdamW, clipping 0.1, three lr groups
        evaluate(...)                     # validation losses + COCO AP (every eval_every)
        lr_scheduler.step()               # StepLR: lr x 0.1 after lr_drop epochs
        save last.npz (+ best.npz), append metrics.jsonl, redraw the plots

Resuming continues exactly where the run stopped: the checkpoint holds the weights, the
AdamW moments and step counts, the schedule, the epoch *and the step within it*, the
running means of the interrupted epoch, and the state of every dropout generator; the
data order and augmentation of every sample are pure functions of ``(seed, epoch,
index)``. On the CPU a resumed run therefore computes the same numbers, bit for bit, as
one that was never interrupted.

Ctrl-C: the first one lets the current step finish, saves ``last.npz`` and returns
(``TrainResult.interrupted``); a second one stops at once without saving. A non-finite
loss raises :class:`~minidetr.engine.NonFiniteLossError` naming the step and the loss
term; ``last.npz`` then still holds the last good epoch. Running out of (GPU) memory
raises :class:`RunError` naming the batch and the options that shrink it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .backend import cupy_available, is_out_of_memory, why_no_cupy
from .checkpoint import (Checkpoint, CheckpointError, load_checkpoint, load_model_state,
                         save_checkpoint)
from .data import (PRESETS, CategoryMap, CocoDetection, DataLoader, collate,
                   make_transforms, sample_rng)
from .engine import (RunningAverages, StepOutOfMemoryError, build_param_groups, evaluate,
                     predict, train_one_epoch)
from .evaluation import METRIC_NAMES
from .models.build import build_criterion, build_model, build_postprocess
from .models.config import ModelConfig
from .optim import AdamW, StepLR
from .visualize import draw_detections, plot_ap, plot_losses

# Files a run writes; only these are ever replaced (with overwrite=True).
RUN_FILES = ("run.json", "last.npz", "best.npz", "metrics.jsonl", "loss.png", "ap.png",
             "predictions", "final_metrics.json")


class RunError(ValueError):
    """A run cannot start or continue: a bad folder, configuration or data; says which."""


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class TrainConfig:
    """Every setting of the training loop (the model's own settings are a ModelConfig).

    The defaults are the official recipe (``main.py``); the CPU demo uses smaller ones.
    """

    epochs: int = 50
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    lr_linear_proj_mult: float = 0.1        # sampling_offsets / reference_points: lr x 0.1
    weight_decay: float = 1e-4
    clip_max_norm: float = 0.1              # <= 0: no clipping
    lr_drop: int = 40                       # StepLR step size (epochs)
    lr_drop_gamma: float = 0.1
    batch_size: int = 2
    num_workers: int = 2                    # data-loading threads
    seed: int = 42                          # data order and augmentation
    # --- data
    transforms: str = "paper"               # augmentation preset: paper, small, tiny
    train_scales: tuple | None = None       # override the preset's short sides
    max_size: int | None = None             # override the preset's long-side cap
    val_size: int | None = None             # override the preset's validation short side
    crop: bool = True                       # the random-crop branch of the recipe
    hflip_p: float = 0.5
    label_map: str = "contiguous"           # "raw" = COCO ids (official 91 logits)
    max_train_images: int | None = None     # use only the first N images of a split
    max_val_images: int | None = None
    # --- evaluation and pictures
    eval_every: int = 1                     # evaluate every N epochs (and after the last)
    time_limit: float | None = None         # minutes: no new epoch starts after this
    num_pictures: int = 4                   # validation images drawn at the end
    picture_threshold: float = 0.5          # draw detections scoring at least this

    def __post_init__(self):
        if self.train_scales is not None:
            object.__setattr__(self, "train_scales", tuple(int(s) for s in self.train_scales))
        for name in ("epochs", "lr_drop", "batch_size", "eval_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("lr", "lr_backbone", "lr_linear_proj_mult", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        if self.label_map not in CategoryMap.MODES:
            raise ValueError(f"TrainConfig.label_map must be one of {CategoryMap.MODES}, got "
                             f"{self.label_map!r}")
        if self.time_limit is not None and not (isinstance(self.time_limit, (int, float))
                                                and self.time_limit > 0):
            raise ValueError(f"TrainConfig.time_limit must be None or minutes > 0, got "
                             f"{self.time_limit!r}")
        for name in ("max_train_images", "max_val_images"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or a positive int, got "
                                 f"{value!r}")

    def replace(self, **changes) -> "TrainConfig":
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["train_scales"] is not None:
            d["train_scales"] = list(d["train_scales"])
        return d

    @classmethod
    def from_dict(cls, d) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class DataPaths:
    """The COCO annotation files and image folders of the training and validation splits."""

    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str

    @classmethod
    def from_shapes(cls, paths) -> "DataPaths":
        """From :func:`~minidetr.data.generate_shapes_dataset`'s ``ShapesPaths``."""
        return cls(str(paths.train_annotations), str(paths.train_images),
                   str(paths.val_annotations), str(paths.val_images))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "DataPaths":
        return cls(**d)


def model_config_from_dict(d) -> ModelConfig:
    """A ModelConfig from ``ModelConfig.to_dict()`` (JSON turns tuples into lists)."""
    d = dict(d)
    if "tiny_channels" in d:
        d["tiny_channels"] = tuple(d["tiny_channels"])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"the stored model configuration has unknown fields {unknown}")
    return ModelConfig(**d).validate()


def resolve_device(device: str) -> str:
    """The device to use: "auto" means "cuda" when CuPy sees a GPU, else "cpu".

    Asking for "cuda" without a usable GPU is a :class:`RunError` that says why.
    """
    if device in (None, "auto"):
        return "cuda" if cupy_available() else "cpu"
    if device == "cpu":
        return "cpu"
    if device == "cuda":
        if not cupy_available():
            raise RunError(f"--device cuda: the GPU backend is not available ({why_no_cupy()}); "
                           "use --device cpu")
        return "cuda"
    raise RunError(f"unknown device {device!r}; use cpu, cuda or auto")


# --------------------------------------------------------------------------- data
class FirstImages:
    """The first ``n`` images of a dataset: same samples, same augmentation streams.

    Quacks like :class:`~minidetr.data.CocoDetection` for the loader, the evaluator and
    the pictures (``get``, ``load``, ``ids``, ``coco``, ``category_map``).
    """

    def __init__(self, dataset, n):
        self.dataset = dataset
        self.n = min(int(n), len(dataset))
        self.ids = dataset.ids[:self.n]
        self.coco = dataset.coco
        self.category_map = dataset.category_map

    def __len__(self):
        return self.n

    def get(self, index, rng=None):
        return self.dataset.get(index, rng)

    def load(self, index):
        return self.dataset.load(index)


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


def epoch_batches(loader, epoch, first_step=0):
    """The batches of ``epoch`` from batch ``first_step`` on (resuming mid-epoch).

    From step 0 this is ``loader.iter_epoch(epoch)`` (threaded); the rest of an
    interrupted epoch is loaded in this thread with the same per-sample generators, so
    its batches are identical to the ones the uninterrupted epoch would have had.
    """
    if first_step == 0:
        yield from loader.iter_epoch(epoch)
        return
    for indices in loader.batch_indices(epoch)[first_step:]:
        yield loader.collate_fn([loader.dataset.get(int(i), sample_rng(loader.seed, epoch, i))
                                 for i in indices])


# --------------------------------------------------------------------------- run folder
def _existing_run_files(run_dir: Path):
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def prepare_run_dir(run_dir, overwrite=False) -> Path:
    """Create ``run_dir`` for a new run; refuse to replace an earlier run's files.

    With ``overwrite`` only the files a run writes (``RUN_FILES``) are removed; anything
    else in the folder is left alone.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir} exists and is not a folder")
    existing = _existing_run_files(run_dir) if run_dir.is_dir() else []
    if existing and not overwrite:
        raise RunError(f"{run_dir} already holds a run ({', '.join(existing)}); use --resume "
                       f"{run_dir} to continue it, --overwrite to replace it, or another --out")
    for name in existing:
        path = run_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _write_json_atomic(path: Path, obj):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _write_metrics(path: Path, history):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(h) + "\n" for h in history), encoding="utf-8")
    os.replace(tmp, path)


def read_metrics(run_dir) -> list:
    """The per-epoch metric dicts of ``run_dir/metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


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
                        epoch_batches(self.train_loader, epoch, self.step), epoch=epoch,
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
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
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
    from .backend import to_device

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
    prepare_run_dir(run_dir, overwrite)
    _write_json_atomic(run_dir / "run.json", {
        "model_config": model_cfg.to_dict(), "train_config": train_cfg.to_dict(),
        "data": data.to_dict(), "category_map": trainer.category_map.to_dict(),
        "device": device, "minidetr_version": __version__})
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
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
    model_cfg = model_config_from_dict(ckpt.model_config)
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
    _write_metrics(run_dir / "metrics.jsonl", trainer.history)   # drop lines after the save
    if trainer.epoch >= train_cfg.epochs:
        log(f"{run_dir} already finished its {train_cfg.epochs} epochs (pass a larger --epochs "
            "to train longer)")
    else:
        log(f"resuming {run_dir} at epoch {trainer.epoch + 1}, step {trainer.step + 1} of "
            f"{len(trainer.train_loader)}, on {device}")
    result = trainer.fit(on_step)
    return result


# --------------------------------------------------------------------------- the demo
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
DEMO = DemoSettings(
    data_dir="data/shapes", num_train=1000, num_val=200, image_size=128,
    model={},
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
    from .data import generate_shapes_dataset
    from .models.config import get_config

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
    _write_json_atomic(final_path, result.final_metrics)
    _print_final(result.final_metrics, out, log)
    return result.final_metrics


def _print_final(final, out, log):
    log("final COCO metrics on the validation split: "
        + ", ".join(f"{k} {final[k]:.3f}" for k in METRIC_NAMES if k in final)
        + "  (-1: no object of that size in the split)")
    log(f"files: {out / 'final_metrics.json'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}, "
        f"{out / 'ap.png'}, {out / 'predictions'}/, checkpoints {out / 'last.npz'} and "
        f"{out / 'best.npz'}")


__all__ = ["TrainConfig", "DataPaths", "Trainer", "TrainResult", "RunError", "run_training",
           "run_demo", "DEMO", "QUICK_DEMO", "DemoSettings",
           "resume_training", "build_datasets", "epoch_batches", "prepare_run_dir",
           "read_metrics", "resolve_device", "save_prediction_pictures",
           "model_config_from_dict", "GracefulInterrupt", "FirstImages", "RUN_FILES"]
