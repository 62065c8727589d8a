"""The settings of a training run: :class:`TrainConfig` (the loop) and :class:`DataPaths`
(the data). The model's own settings are a :class:`~minidetr.models.config.ModelConfig`.

The defaults of :class:`TrainConfig` are the official recipe (``main.py``): AdamW with lr
2e-4 (backbone 2e-5, sampling offsets and reference points x 0.1), weight decay 1e-4,
gradient clipping at norm 0.1, 50 epochs with the learning rate divided by 10 after 40,
batch 2, the ``paper`` augmentation. See docs/training.md for what each setting does.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

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


__all__ = ["TrainConfig", "DataPaths"]
