"""The settings of a training run: :class:`TrainConfig` (the loop) and :class:`DataPaths`
(the data). The model's own settings are a :class:`~minidetr.models.config.ModelConfig`.

The defaults of :class:`TrainConfig` are the official recipe (``main.py``): AdamW with lr
2e-4 (backbone 2e-5, sampling offsets and reference points x 0.1), weight decay 1e-4,
gradient clipping at norm 0.1 (DETR's setting, which the official code keeps as its
default; the paper's §5 does not mention clipping), 50 epochs with the learning rate
divided by 10 after 40, batch 2, the ``paper`` augmentation. See docs/training.md for what each setting does.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from ..data import CategoryMap


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of the training loop (the model's own settings are a ModelConfig).

    The defaults are the official recipe (``main.py``); the CPU demo uses smaller ones.
    ``from_dict(to_dict())`` gives the same config back (JSON-safe: lists for tuples).
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
    # --- pretrained weights (paths of files read once, when the run starts)
    backbone_weights: str | None = None     # an ImageNet ResNet (.pth/.safetensors/.npz)
    init_from: str | None = None            # a detector checkpoint to fine-tune from

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


# The training recipe each model preset brings (``train --config``): the TrainConfig fields
# that differ between them. ``paper`` and ``small`` keep the official recipe (they are
# meant to start from ImageNet weights, on a GPU); ``tiny`` is trained from scratch on a
# CPU, where the demo found a higher learning rate for every group (the backbone too, it
# has no pretrained weights to protect) and batches of 8 to work better (docs/training.md).
RECIPES = {
    "paper": dict(epochs=50, lr=2e-4, lr_backbone=2e-5, lr_drop=40, batch_size=2,
                  weight_decay=1e-4, clip_max_norm=0.1),
    "small": dict(epochs=50, lr=2e-4, lr_backbone=2e-5, lr_drop=40, batch_size=2,
                  weight_decay=1e-4, clip_max_norm=0.1),
    "tiny": dict(epochs=50, lr=5e-4, lr_backbone=5e-4, lr_drop=40, batch_size=8,
                 weight_decay=1e-4, clip_max_norm=0.1),
}


def recipe(preset: str) -> dict:
    """The TrainConfig fields of model preset ``preset``'s recipe (see :data:`RECIPES`)."""
    if preset not in RECIPES:
        raise ValueError(f"no training recipe for preset {preset!r}; choose one of "
                         f"{sorted(RECIPES)}")
    return dict(RECIPES[preset])


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
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def absolute(self) -> "DataPaths":
        """The same paths made absolute (a run must not depend on where it was started)."""
        return DataPaths(*(str(Path(p).resolve()) for p in dataclasses.astuple(self)))

    def relative_to(self, folder) -> dict:
        """The paths relative to ``folder`` (a run folder), as a dict: they still lead to the
        data when the run folder and the data move together."""
        return {name: os.path.relpath(Path(p).resolve(), Path(folder).resolve())
                for name, p in self.to_dict().items()}


def data_record(data: DataPaths, run_dir) -> dict:
    """What a run stores about its data (``run.json`` and every checkpoint's ``extra``):
    ``data`` (absolute paths) and ``data_relative_to_run`` (from the run folder)."""
    return {"data": data.absolute().to_dict(), "data_relative_to_run": data.relative_to(run_dir)}


def locate_data(record, run_dir, split=None, missing_ok=False):
    """The :class:`DataPaths` a run recorded (see :func:`data_record`), found again.

    Tried in turn: the stored paths (absolute; relative to the current folder for runs
    made before absolute paths were stored), then the paths relative to ``run_dir``.
    ``split`` "val" or "train" needs only that split's two paths to exist.

    Raises:
        RunError: none of them exists (the data moved), with the paths and the options
            that point the run at the new place; ``missing_ok`` returns None instead.
    """
    from .run_dir import RunError

    names = [f.name for f in dataclasses.fields(DataPaths)
             if split is None or f.name.startswith(split)]
    candidates = [DataPaths.from_dict(record["data"])]
    relative = record.get("data_relative_to_run")
    if relative:
        candidates.append(DataPaths.from_dict(
            {k: os.path.normpath(Path(run_dir) / v) for k, v in relative.items()}))
    for paths in candidates:
        if all(Path(getattr(paths, n)).exists() for n in names):
            return paths
    if missing_ok:
        return None
    missing = [getattr(candidates[0], n) for n in names
               if not Path(getattr(candidates[0], n)).exists()]
    raise RunError(f"the data of the run in {run_dir} is not where it was: {', '.join(missing)} "
                   "not found" + (" (nor relative to the run folder)" if relative else "")
                   + "; if it moved, give its new place: `eval RUN --data ANN_JSON IMAGE_DIR`, "
                   "or `train --resume RUN --data ANN_JSON IMAGE_DIR --val-data ANN_JSON "
                   "IMAGE_DIR`")


__all__ = ["TrainConfig", "DataPaths", "RECIPES", "recipe", "data_record", "locate_data"]
