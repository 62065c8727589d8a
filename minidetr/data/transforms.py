"""Data augmentation for detection: every transform moves the image *and* its boxes.

A transform is a callable ``t(image, target, rng) -> (image, target)``:

* ``image`` is a ``PIL.Image`` in RGB until the last step, :class:`Normalize`, turns it into
  the float32 array the model reads;
* ``target`` is a dict; while the image is a PIL image its ``"boxes"`` are absolute pixel
  corners ``(x0, y0, x1, y1)``, and :class:`Normalize` turns them into normalised
  ``(cx, cy, w, h)``. Transforms never modify the dict they are given: they return a new one;
* ``rng`` is a ``numpy.random.Generator``. Every random choice is drawn from it, so the same
  generator state gives the same augmentation, whichever thread runs it. Transforms that
  draw nothing accept ``rng=None``; a random one given ``None`` raises a ValueError.

The official training recipe (``make_transforms("train", "paper")``) is::

    RandomHorizontalFlip(0.5)
    RandomSelect(                                  # p = 0.5 each
        RandomResize([480, 512, ..., 800], max_size=1333),
        Compose([RandomResize([400, 500, 600]),    # no cap on the long side
                 RandomSizeCrop(384, 600),
                 RandomResize([480, 512, ..., 800], max_size=1333)]))
    Normalize(ImageNet mean, std)

and validation is ``Resize(800, max_size=1333)`` then ``Normalize``. The presets "small" and
"tiny" are the same recipe with smaller numbers, for small models and images.

Shapes:
    target["boxes"]   (T, 4) float32: absolute xyxy before Normalize, normalised cxcywh after
    target["labels"]  (T,) int64
    target["size"]    (2,) int64, (h, w) of the current (unpadded) image
    Normalize output  (3, H, W) float32
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- helpers
def _require_rng(rng, who):
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"{who} makes a random choice and needs a numpy Generator as rng, got "
                         f"{type(rng).__name__} (for example rng=np.random.default_rng(0); "
                         "the DataLoader passes one per sample)")
    return rng


def _with(target, **changes):
    """A shallow copy of ``target`` with some entries replaced (the input is never modified)."""
    out = dict(target)
    out.update(changes)
    return out


def _indent(text):
    return "\n".join("    " + line for line in text.splitlines())


def _image_hw(image):
    return image.height, image.width


def resize_size(height, width, size, max_size=None):
    """The output (h, w) of the official resize rule for a short side of ``size``.

    The shorter side becomes ``size`` and the longer side keeps the aspect ratio, rounded
    down. If that would make the longer side exceed ``max_size``, ``size`` is reduced first
    to ``round(max_size * short / long)``. An image whose short side already equals ``size``
    is left as it is.

    >>> resize_size(480, 640, 800, max_size=1333)      # (h, w) in, (h, w) out
    (800, 1066)
    >>> resize_size(500, 2000, 800, max_size=1333)     # long side capped
    (333, 1332)
    """
    short, long = min(height, width), max(height, width)
    if max_size is not None and long / short * size > max_size:
        size = int(round(max_size * short / long))
    if short == size:
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


# --------------------------------------------------------------------------- functional
def hflip(image, target):
    """Mirror left-right: a box (x0, y0, x1, y1) becomes (W - x1, y0, W - x0, y1)."""
    w = image.width
    flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    boxes = target["boxes"]
    # (T, 4): new x0 = W - old x1, new x1 = W - old x0
    new_boxes = np.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], axis=1)
    return flipped, _with(target, boxes=new_boxes.astype(np.float32))


def resize(image, target, out_hw):
    """Resize to ``out_hw = (h, w)`` with bilinear interpolation; boxes scale per axis."""
    h, w = _image_hw(image)
    oh, ow = int(out_hw[0]), int(out_hw[1])
    if (oh, ow) == (h, w):
        return image, target
    resized = image.resize((ow, oh), Image.Resampling.BILINEAR)
    scale = np.array([ow / w, oh / h, ow / w, oh / h], dtype=np.float32)   # (4,)
    return resized, _with(target, boxes=(target["boxes"] * scale).astype(np.float32),
                          size=np.array([oh, ow], dtype=np.int64))


def crop(image, target, top, left, height, width):
    """Cut the region rows [top, top+height), columns [left, left+width).

    Boxes move with the region's corner, are clipped to it, and boxes left with zero width
    or height (objects outside the region) are removed together with their labels.
    """
    cropped = image.crop((left, top, left + width, top + height))
    boxes = target["boxes"] - np.array([left, top, left, top], dtype=np.float32)   # (T, 4)
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])                 # (T,)
    return cropped, _with(target, boxes=boxes[keep].astype(np.float32),
                          labels=target["labels"][keep],
                          size=np.array([height, width], dtype=np.int64))


def to_normalized_array(image, target, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """PIL RGB image -> float32 (3, H, W), ``(x / 255 - mean) / std``; boxes -> cxcywh / (W, H).

    The arithmetic is the official one (ToTensor then Normalize) in float32.
    """
    h, w = _image_hw(image)
    pixels = np.asarray(image, dtype=np.float32)                     # (H, W, 3) in [0, 255]
    if pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"Normalize expects an RGB image, got PIL mode {image.mode!r}")
    mean = np.asarray(mean, dtype=np.float32)
    std = np.asarray(std, dtype=np.float32)
    pixels = (pixels / np.float32(255.0) - mean) / std
    array = np.ascontiguousarray(pixels.transpose(2, 0, 1))          # (3, H, W)
    x0, y0, x1, y1 = np.moveaxis(target["boxes"].astype(np.float32), 1, 0)   # 4 x (T,)
    cxcywh = np.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], axis=1)   # (T, 4)
    cxcywh = cxcywh / np.array([w, h, w, h], dtype=np.float32)
    return array, _with(target, boxes=cxcywh.astype(np.float32),
                        size=np.array([h, w], dtype=np.int64))


# --------------------------------------------------------------------------- transforms
class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image, target, rng=None):
        for t in self.transforms:
            image, target = t(image, target, rng)
        return image, target

    def __repr__(self):
        lines = [_indent(repr(t)) + "," for t in self.transforms]
        return "\n".join(["Compose(["] + lines + ["])"])


class RandomHorizontalFlip:
    """Mirror left-right with probability ``p`` (one draw from rng)."""

    def __init__(self, p=0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"RandomHorizontalFlip: p must be in [0, 1], got {p}")
        self.p = float(p)

    def __call__(self, image, target, rng=None):
        if self.p in (0.0, 1.0):              # no draw needed
            return hflip(image, target) if self.p == 1.0 else (image, target)
        if _require_rng(rng, "RandomHorizontalFlip").random() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self):
        return f"RandomHorizontalFlip(p={self.p})"


class Resize:
    """Resize by the official rule: short side ``size``, long side at most ``max_size``."""

    def __init__(self, size, max_size=None):
        if int(size) <= 0 or (max_size is not None and int(max_size) <= 0):
            raise ValueError(f"Resize: size and max_size must be positive, got {size}, {max_size}")
        self.size = int(size)
        self.max_size = None if max_size is None else int(max_size)

    def __call__(self, image, target, rng=None):
        h, w = _image_hw(image)
        return resize(image, target, resize_size(h, w, self.size, self.max_size))

    def __repr__(self):
        return f"Resize({self.size}, max_size={self.max_size})"


class RandomResize:
    """Resize to a short side drawn uniformly from ``sizes`` (long side at most ``max_size``)."""

    def __init__(self, sizes, max_size=None):
        sizes = [int(s) for s in sizes]
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"RandomResize: sizes must be a non-empty list of positive ints, "
                             f"got {sizes}")
        self.sizes = sizes
        self.max_size = None if max_size is None else int(max_size)

    def __call__(self, image, target, rng=None):
        if len(self.sizes) == 1:
            size = self.sizes[0]
        else:
            size = self.sizes[_require_rng(rng, "RandomResize").integers(len(self.sizes))]
        return Resize(size, self.max_size)(image, target)

    def __repr__(self):
        return f"RandomResize({self.sizes}, max_size={self.max_size})"


class RandomSizeCrop:
    """Crop a random region whose width and height are uniform ints in [min_size, max_size].

    Each side is also at most the image's side (and ``min_size`` shrinks to fit an image
    smaller than it). The region's position is uniform over the image.
    """

    def __init__(self, min_size, max_size):
        if not 0 < int(min_size) <= int(max_size):
            raise ValueError(f"RandomSizeCrop: need 0 < min_size <= max_size, got "
                             f"{min_size}, {max_size}")
        self.min_size, self.max_size = int(min_size), int(max_size)

    def __call__(self, image, target, rng=None):
        rng = _require_rng(rng, "RandomSizeCrop")
        h, w = _image_hw(image)
        hi_w, hi_h = min(w, self.max_size), min(h, self.max_size)
        cw = int(rng.integers(min(self.min_size, hi_w), hi_w + 1))
        ch = int(rng.integers(min(self.min_size, hi_h), hi_h + 1))
        top = int(rng.integers(0, h - ch + 1))
        left = int(rng.integers(0, w - cw + 1))
        return crop(image, target, top, left, ch, cw)

    def __repr__(self):
        return f"RandomSizeCrop({self.min_size}, {self.max_size})"


class RandomSelect:
    """Apply ``first`` with probability ``p``, otherwise ``second``."""

    def __init__(self, first, second, p=0.5):
        self.first, self.second, self.p = first, second, float(p)

    def __call__(self, image, target, rng=None):
        if _require_rng(rng, "RandomSelect").random() < self.p:
            return self.first(image, target, rng)
        return self.second(image, target, rng)

    def __repr__(self):
        return (f"RandomSelect(p={self.p},\n{_indent(repr(self.first))},\n"
                f"{_indent(repr(self.second))})")


class Normalize:
    """The last step: image -> float32 (3, H, W) normalised; boxes -> normalised cxcywh."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image, target, rng=None):
        return to_normalized_array(image, target, self.mean, self.std)

    def __repr__(self):
        return f"Normalize(mean={self.mean}, std={self.std})"


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class AugmentationPreset:
    """The numbers of the training recipe; the structure is the same for every preset.

    scales:      short sides the multi-scale resize chooses from (train)
    max_size:    cap on the long side (train and val)
    crop_resize: short sides of the resize that precedes the random crop (no cap)
    crop_size:   (min, max) side of the random crop
    val_size:    short side at validation
    """
    scales: tuple
    max_size: int
    crop_resize: tuple
    crop_size: tuple
    val_size: int


PRESETS = {
    # the official recipe (main.py / datasets/coco.py of Deformable DETR)
    "paper": AugmentationPreset(scales=tuple(range(480, 801, 32)), max_size=1333,
                                crop_resize=(400, 500, 600), crop_size=(384, 600),
                                val_size=800),
    # about half the resolution: for small backbones on a GPU or patient CPU runs
    "small": AugmentationPreset(scales=(256, 288, 320, 352, 384), max_size=640,
                                crop_resize=(200, 250, 300), crop_size=(192, 300),
                                val_size=384),
    # for ~128 px images such as the built-in shapes dataset: validation at native size
    "tiny": AugmentationPreset(scales=(80, 96, 112, 128), max_size=213,
                               crop_resize=(64, 80, 96), crop_size=(64, 96),
                               val_size=128),
}


def make_transforms(split, preset="paper", *, scales=None, max_size=None, crop=None,
                    val_size=None, hflip_p=0.5, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Build the train or validation pipeline of a preset, with any number overridden.

    Args:
        split: "train" (random augmentation) or "val" (deterministic resize).
        preset: "paper" (the official recipe), "small" or "tiny"; see ``PRESETS``.
        scales: short-side choices of the multi-scale resize (train).
        max_size: cap on the long side.
        crop: the random-crop branch: None or True = the preset's, False = no crop branch
            (always the multi-scale resize), or ``(crop_resize_sizes, (min_side, max_side))``.
        val_size: short side at validation.
        hflip_p: probability of the horizontal flip (train).
        mean, std: per-channel normalisation (ImageNet statistics by default).

    Returns:
        a :class:`Compose` taking ``(PIL image, target, rng)``.

    >>> make_transforms("val", "tiny")
    Compose([
        Resize(128, max_size=213),
        Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    ])
    """
    if preset not in PRESETS:
        raise ValueError(f"make_transforms: unknown preset {preset!r}; choose one of "
                         f"{sorted(PRESETS)}")
    p = PRESETS[preset]
    scales = tuple(p.scales if scales is None else scales)
    max_size = p.max_size if max_size is None else max_size
    val_size = p.val_size if val_size is None else val_size
    normalize = Normalize(mean, std)
    if split == "val":
        return Compose([Resize(val_size, max_size), normalize])
    if split != "train":
        raise ValueError(f"make_transforms: split must be 'train' or 'val', got {split!r}")

    multi_scale = RandomResize(scales, max_size)
    if crop is False:
        geometric = multi_scale
    else:
        if crop is None or crop is True:
            crop_resize, crop_size = p.crop_resize, p.crop_size
        else:
            try:
                crop_resize, (lo, hi) = crop
                crop_size = (lo, hi)
            except (TypeError, ValueError):
                raise ValueError("make_transforms: crop must be None, True, False or "
                                 f"(resize_sizes, (min_side, max_side)), got {crop!r}") from None
        geometric = RandomSelect(
            multi_scale,
            Compose([RandomResize(crop_resize), RandomSizeCrop(*crop_size),
                     RandomResize(scales, max_size)]))
    return Compose([RandomHorizontalFlip(hflip_p), geometric, normalize])
