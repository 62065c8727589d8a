"""Inference: a trained detector, loaded from a checkpoint, run on images.

::

    from minidetr.inference import Detector

    detector = Detector.from_checkpoint("runs/demo")       # a run folder (best.npz) or a file
    found = detector.predict("photo.jpg", threshold=0.5)   # a path, PIL image or a list
    for name, score, box in zip(found.names, found.scores, found.boxes):
        print(name, round(float(score), 2), box)           # box: x0, y0, x1, y1 in pixels
    found.to_coco(image_id=42)                             # COCO results dicts

A :class:`Detector` holds the model (in eval mode, on its device), its post-processing,
the class names and the validation transforms the model was trained with, so that an
image is resized and normalised exactly as during validation. ``eval``, ``predict`` and
``check-reference`` of the command line all load their model through
:meth:`Detector.from_checkpoint`, and ``predict`` runs :meth:`Detector.predict_batch`.

:func:`predict` is the step underneath: detections of one padded batch.
:func:`coco_results` writes detections in COCO's results format (what ``predict --json``
and ``eval --save-detections`` save, and what ``COCO.loadRes`` reads).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .autograd import no_grad
from .backend import resolve_device, to_device, to_numpy
from .data import PRESETS, CategoryMap, collate, load_rgb_image, make_transforms
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


def xyxy_to_xywh(boxes):
    """(T, 4) corners -> COCO (x, y, width, height), float64."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)          # (T, 4)
    return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)


def coco_results(image_id, scores, labels, boxes, category_map=None) -> list:
    """Detections of one image as COCO results dicts (``COCO.loadRes`` reads a list of them)::

        {"image_id": 42, "category_id": 3, "bbox": [x, y, w, h], "score": 0.91}

    Args:
        scores (k,), labels (k,) class labels, boxes (k, 4) xyxy in pixels of the original.
        category_map: turns labels into the dataset's category ids; None: the labels are
            the category ids (a converted official checkpoint, 91 logits = raw COCO ids).
    """
    labels = np.asarray(to_numpy(labels), dtype=np.int64)                  # (k,)
    category_ids = labels if category_map is None else category_map.category_of(labels)
    xywh = xyxy_to_xywh(to_numpy(boxes))                                   # (k, 4)
    return [{"image_id": int(image_id), "category_id": int(cid),
             "bbox": [float(v) for v in box], "score": float(score)}
            for score, cid, box in zip(np.asarray(to_numpy(scores)), category_ids, xywh)]


def resolve_checkpoint(path) -> Path:
    """The file to load for ``path``: a run folder gives its ``best.npz`` (the epoch with the
    best validation AP) when there is one, else its ``last.npz``; any other path as it is."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.npz", "last.npz"):
            if (path / name).is_file():
                return path / name
    return path


@dataclass
class Detections:
    """What :meth:`Detector.predict` found in one image, best first.

    Attributes:
        boxes: (k, 4) float32 x0, y0, x1, y1 in pixels of the image, clipped to it (a
            minidetr choice: the official post-processing, used for AP, does not clip).
        scores: (k,) float32, the sigmoid class probability.
        labels: (k,) int64 class labels; ``names`` the class names.
        image_size: (height, width) of the image.
        category_ids: (k,) the dataset's category ids (``to_coco`` writes these).
        path: the image file, when it was read from one.
    """

    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    names: list
    image_size: tuple
    category_ids: np.ndarray
    path: str | None = field(default=None)

    def __len__(self):
        return len(self.scores)

    def to_coco(self, image_id) -> list:
        """COCO results dicts (see :func:`coco_results`)."""
        return [{**r, "category_id": int(cid)} for r, cid in
                zip(coco_results(image_id, self.scores, self.labels, self.boxes),
                    self.category_ids)]

    def __repr__(self):
        where = f"{self.path}, " if self.path else ""
        return f"Detections({where}{len(self)} boxes: " + ", ".join(
            f"{n} {s:.2f}" for n, s in zip(self.names[:5], self.scores[:5])) + \
            (", ..." if len(self) > 5 else "") + ")"


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


def validation_transforms(train_config: dict | None, max_size=None):
    """The deterministic resize + normalise a model was validated with.

    ``train_config`` is a checkpoint's ``TrainConfig`` dict (its ``transforms``,
    ``val_size`` and ``max_size``); without one, the ``paper`` preset (shorter side 800,
    longer side at most 1333), as the official checkpoints were evaluated. ``max_size``
    caps the longer side instead (the shorter side is scaled down with it).
    """
    d = train_config or {}
    if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                 or max_size < 1):
        raise ValueError(f"max_size must be a positive number of pixels, got {max_size!r}")
    preset = d.get("transforms", "paper")
    val_size = d.get("val_size")
    if max_size is not None:
        val_size = min(val_size or PRESETS[preset].val_size, max_size)
    return make_transforms("val", preset, val_size=val_size,
                           max_size=max_size if max_size is not None else d.get("max_size"))


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
    def from_checkpoint(cls, path, *, config=None, variant=None, device="auto",
                        max_size=None) -> "Detector":
        """Load the model of checkpoint ``path`` (a ``.npz``, ``.pth``, ``.safetensors``, or a
        run folder: its ``best.npz``, else ``last.npz``, see :func:`resolve_checkpoint`).

        ``config`` and ``variant`` build another model than the recorded one (see
        :func:`model_config_of`); ``device`` is "auto", "cpu" or "cuda"; ``max_size`` caps
        the longer image side (default: the validation size the model was trained with).
        """
        device = resolve_device(device)
        path = resolve_checkpoint(path)
        ckpt = load_weights(path)        # .npz as it is; .pth/.safetensors converted
        cfg = model_config_of(ckpt, config, variant)
        model = build_model(cfg)
        load_model_state(model, ckpt, cfg.to_dict())
        if device != "cpu":
            model.to(device)
        model.eval()
        category_map = CategoryMap.from_dict(ckpt.category_map) if ckpt.category_map else None
        return cls(model, build_postprocess(cfg), cfg, ckpt, category_map,
                   validation_transforms(ckpt.train_config, max_size), device)

    def class_name(self, label) -> str:
        """The class name of a predicted label ("class 3" when the checkpoint has no names)."""
        if self.category_map is None:
            return f"class {int(label)}"
        return self.category_map.name_of(int(label))

    def predict_image(self, image) -> dict:
        """Detections of one PIL image: {"scores" (k,), "labels" (k,), "boxes" (k, 4)},
        boxes as xyxy in pixels of ``image`` (not clipped), the ``num_select`` best."""
        return self.predict_batch([image])[0]

    def predict_batch(self, images) -> list:
        """The raw detections of PIL images run as one padded batch: one dict per image,
        as :meth:`predict_image`. (With a mask-aware model, ``ModelConfig.mask_aware_norm``,
        the result does not depend on which images share the batch.)"""
        samples, sizes = [], []
        for image in images:
            size = np.array([image.height, image.width], dtype=np.int64)      # (h, w)
            no_boxes = {"boxes": np.zeros((0, 4), np.float32),
                        "labels": np.zeros(0, np.int64), "orig_size": size, "size": size}
            samples.append(self.transforms(image, no_boxes))
            sizes.append(size)
        batch = collate(samples)
        return predict(self.model, self.postprocess, to_device(batch.images, self.device),
                       to_device(batch.mask, self.device), np.stack(sizes))   # sizes (B, 2)

    def predict(self, images, threshold=0.5, batch_size=1):
        """Detect objects in one image or a list of them.

        Args:
            images: an image file path, a PIL image, or a list of these.
            threshold: keep detections scoring at least this (0 keeps all ``num_select``).
            batch_size: images per forward pass for a list.

        Returns:
            :class:`Detections` (boxes in pixels, scores, labels, class names) for one
            image, a list of them for a list. An unreadable file raises
            :class:`~minidetr.data.DatasetError` naming it.
        """
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"Detector.predict: batch_size must be a positive int, got "
                             f"{batch_size!r}")
        found = []
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            pictures = [self.load_image(item) for item in chunk]
            for item, image, raw in zip(chunk, pictures, self.predict_batch(pictures)):
                path = None if hasattr(item, "height") else str(item)
                found.append(self.detections(raw, (image.height, image.width), threshold,
                                             path))
        return found[0] if single else found

    @staticmethod
    def load_image(image_or_path):
        """A PIL image as it is; a path decoded to RGB, upright by its EXIF orientation."""
        if hasattr(image_or_path, "height") and hasattr(image_or_path, "convert"):
            return image_or_path if image_or_path.mode == "RGB" else image_or_path.convert("RGB")
        return load_rgb_image(image_or_path)

    def detections(self, raw, image_size, threshold=0.5, path=None) -> Detections:
        """:class:`Detections` from a raw PostProcess dict: scores >= ``threshold``, boxes
        clipped to the image of ``image_size`` (h, w)."""
        keep = np.asarray(raw["scores"]) >= threshold                         # (k,)
        h, w = (int(v) for v in image_size)
        boxes = np.asarray(raw["boxes"], dtype=np.float32)[keep].reshape(-1, 4)  # (k', 4)
        boxes = np.clip(boxes, 0, np.array([w, h, w, h], dtype=np.float32))
        labels = np.asarray(raw["labels"], dtype=np.int64)[keep]               # (k',)
        category_ids = labels if self.category_map is None else \
            np.asarray(self.category_map.category_of(labels), dtype=np.int64)
        return Detections(boxes=boxes, scores=np.asarray(raw["scores"], np.float32)[keep],
                          labels=labels, names=[self.class_name(l) for l in labels],
                          image_size=(h, w), category_ids=category_ids, path=path)

    def __repr__(self):
        where = Path(self.checkpoint.path) if self.checkpoint.path is not None else "memory"
        return (f"Detector({self.config.backbone}, {self.config.variant}, "
                f"{self.config.num_classes} classes, {self.device}, from {where})")


__all__ = ["Detector", "Detections", "predict", "coco_results", "resolve_checkpoint",
           "model_config_of", "validation_transforms", "xyxy_to_xywh"]
