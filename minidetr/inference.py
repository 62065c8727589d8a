"""Inference: a trained detector, loaded from a checkpoint, run on images.

::

    from minidetr.inference import Detector

    detector = Detector.from_checkpoint("runs/demo")       # a run folder or a .npz file
    detections = detector.predict_image(image)             # a PIL image
    detections["boxes"]                                    # (k, 4) xyxy, original pixels

A :class:`Detector` holds the model (in eval mode, on its device), its post-processing,
the class names and the validation transforms the model was trained with, so that an
image is resized and normalised exactly as during validation. ``eval``, ``predict`` and
``check-reference`` of the command line all load their model through
:meth:`Detector.from_checkpoint`.

:func:`predict` is the step underneath: detections of one padded batch.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .autograd import no_grad
from .backend import resolve_device, to_device, to_numpy
from .data import CategoryMap, collate, make_transforms
from .models.build import build_model, build_postprocess
from .models.config import VARIANTS, ModelConfig, get_config
from .weights.checkpoint import CheckpointError, load_model_state
from .weights.convert import load_weights


def predict(model, postprocess, images, mask, orig_sizes):
    """Detections of one padded batch: PostProcess dicts with host (NumPy) arrays.

    Shapes: images (B, 3, H, W), mask (B, H, W), orig_sizes (B, 2) rows (h, w) ->
    B dicts {"scores" (k,), "labels" (k,), "boxes" (k, 4) xyxy pixels of the original}.
    """
    model.eval()
    with no_grad():
        outputs = model(images, mask)
        results = postprocess(outputs, np.asarray(orig_sizes))
    return [{k: to_numpy(v) for k, v in r.items()} for r in results]


def model_config_of(ckpt, config=None, variant=None) -> ModelConfig:
    """The :class:`ModelConfig` to build for checkpoint ``ckpt``.

    Args:
        config: a preset name to build instead of the recorded model; the variant and
            the number of classes default to the recorded ones.
        variant: another variant of the recorded model (or of ``config``).

    A checkpoint that records no model (a converted one without ``--variant``) needs
    ``variant`` (the ``paper`` preset is then assumed) or ``config``.
    """
    stored = None
    if ckpt.model_config:
        try:
            stored = ModelConfig.from_dict(ckpt.model_config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{ckpt.path}: {e}") from None
    if config is not None:
        cfg = get_config(config, variant or (stored.variant if stored else "plain"))
        return cfg.replace(num_classes=stored.num_classes) if stored is not None else cfg
    if stored is not None:
        return stored.replace(**VARIANTS[variant]) if variant else stored
    if variant is not None:
        return get_config("paper", variant)
    raise CheckpointError(f"{ckpt.path} does not say which model it belongs to (a converted "
                          "checkpoint?); pass --config and --variant")


def validation_transforms(train_config: dict | None):
    """The deterministic resize + normalise a model was validated with.

    ``train_config`` is a checkpoint's ``TrainConfig`` dict (its ``transforms``,
    ``val_size`` and ``max_size``); without one, the ``paper`` preset (shorter side 800,
    longer side at most 1333), as the official checkpoints were evaluated.
    """
    d = train_config or {}
    return make_transforms("val", d.get("transforms", "paper"), val_size=d.get("val_size"),
                           max_size=d.get("max_size"))


class Detector:
    """A model ready for inference, with everything that came with its checkpoint.

    Attributes:
        model: the :class:`~minidetr.models.DeformableDETR`, in eval mode, on ``device``.
        postprocess: its :class:`~minidetr.models.PostProcess` (top-k, boxes in pixels).
        config: the :class:`ModelConfig` it was built from.
        checkpoint: the :class:`~minidetr.weights.Checkpoint` it was loaded from.
        category_map: label <-> dataset category (None for a converted checkpoint).
        transforms: the validation transforms (see :func:`validation_transforms`).
        device: "cpu" or "cuda".
    """

    def __init__(self, model, postprocess, config, checkpoint, category_map, transforms,
                 device="cpu"):
        self.model = model
        self.postprocess = postprocess
        self.config = config
        self.checkpoint = checkpoint
        self.category_map = category_map
        self.transforms = transforms
        self.device = device

    @classmethod
    def from_checkpoint(cls, path, *, config=None, variant=None, device="auto") -> "Detector":
        """Load the model of checkpoint ``path`` (a ``.npz`` or a run folder).

        ``config`` and ``variant`` build another model than the recorded one (see
        :func:`model_config_of`); ``device`` is "auto", "cpu" or "cuda".
        """
        device = resolve_device(device)
        ckpt = load_weights(path)        # .npz as it is; .pth/.safetensors converted
        cfg = model_config_of(ckpt, config, variant)
        model = build_model(cfg)
        load_model_state(model, ckpt, cfg.to_dict())
        if device != "cpu":
            model.to(device)
        model.eval()
        category_map = CategoryMap.from_dict(ckpt.category_map) if ckpt.category_map else None
        return cls(model, build_postprocess(cfg), cfg, ckpt, category_map,
                   validation_transforms(ckpt.train_config), device)

    def class_name(self, label) -> str:
        """The class name of a predicted label ("class 3" when the checkpoint has no names)."""
        if self.category_map is None:
            return f"class {int(label)}"
        return self.category_map.name_of(int(label))

    def predict_image(self, image) -> dict:
        """Detections of one PIL image: {"scores" (k,), "labels" (k,), "boxes" (k, 4)},
        boxes as xyxy in pixels of ``image``, the ``num_select`` best of them."""
        size = np.array([image.height, image.width], dtype=np.int64)          # (h, w)
        no_boxes = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
                    "orig_size": size, "size": size}
        batch = collate([self.transforms(image, no_boxes)])
        return predict(self.model, self.postprocess, to_device(batch.images, self.device),
                       to_device(batch.mask, self.device), size[None])[0]

    def __repr__(self):
        where = Path(self.checkpoint.path) if self.checkpoint.path is not None else "memory"
        return (f"Detector({self.config.backbone}, {self.config.variant}, "
                f"{self.config.num_classes} classes, {self.device}, from {where})")


__all__ = ["Detector", "predict", "model_config_of", "validation_transforms"]
