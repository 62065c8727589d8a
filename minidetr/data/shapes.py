"""The built-in dataset: synthetic coloured shapes, written to disk in real COCO format.

Five classes, each a distinct shape *and* colour, on textured grey backgrounds:

    id  name      colour
    1   circle    red
    2   square    green
    3   triangle  blue
    4   cross     yellow
    5   star      magenta

Each image holds 1-4 objects whose boxes span about 12-44 % of the shorter image side; squares,
triangles and crosses are turned by up to ±30°, stars by any angle. Objects may overlap
a little (box IoU <= 0.1), never enough to hide one. Shapes are drawn with 4x4 supersampling
(soft edges), then the whole image gets Gaussian pixel noise.

The result is an ordinary COCO dataset (JPEG files + ``instances_*.json``), so the same
:class:`~minidetr.data.coco.CocoDetection`, loader and COCO evaluator serve it and real data.
It is small and clearly learnable: the CPU demo trains a tiny Deformable DETR on it.

Determinism: image ``i`` of a split is drawn from its own generator made from
``(seed, split, i)``, so a larger ``num_train`` only appends images.

Layout under ``root``::

    manifest.json                      settings; written last (marks a complete dataset)
    annotations/instances_train.json
    annotations/instances_val.json
    train/000000000001.jpg ...
    val/000000000001.jpg ...
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .coco import DatasetError

SHAPES_VERSION = 1
CLASSES = ("circle", "square", "triangle", "cross", "star")
COLOURS = {                       # RGB, far apart in hue and saturated (backgrounds are grey)
    "circle": (220, 40, 40),
    "square": (40, 180, 60),
    "triangle": (40, 90, 230),
    "cross": (240, 200, 30),
    "star": (200, 60, 210),
}
_SPLITS = {"train": 0, "val": 1}      # split codes for the per-image generators
_SUPERSAMPLE = 4
_MAX_OVERLAP_IOU = 0.1


@dataclass(frozen=True)
class ShapesPaths:
    """Where :func:`generate_shapes_dataset` put (or found) the dataset."""
    root: Path
    train_images: Path
    train_annotations: Path
    val_images: Path
    val_annotations: Path

    def split(self, name):
        """``(image_dir, ann_file)`` of "train" or "val"."""
        if name not in _SPLITS:
            raise ValueError(f"ShapesPaths.split: name must be 'train' or 'val', got {name!r}")
        return getattr(self, f"{name}_images"), getattr(self, f"{name}_annotations")


def _paths(root):
    root = Path(root)
    return ShapesPaths(root, root / "train", root / "annotations" / "instances_train.json",
                       root / "val", root / "annotations" / "instances_val.json")


# --------------------------------------------------------------------------- geometry
def _unit_outline(name, n_circle=64):
    """Vertices (V, 2) of the shape with 'radius' 1 around the origin, before rotation."""
    if name == "circle":
        t = np.arange(n_circle) * (2 * np.pi / n_circle)
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "square":
        return np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8
    if name == "triangle":                                     # equilateral, pointing up
        t = np.deg2rad([-90.0, 30.0, 150.0])
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if name == "cross":                                        # a plus sign
        a, r = 0.33, 1.0
        return np.array([[-a, -r], [a, -r], [a, -a], [r, -a], [r, a], [a, a],
                         [a, r], [-a, r], [-a, a], [-r, a], [-r, -a], [-a, -a]])
    if name == "star":                                         # five points
        t = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    raise ValueError(f"unknown shape {name!r}")


def _polygon_area(v):
    """Shoelace formula for vertices (V, 2)."""
    x, y = v[:, 0], v[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _iou(a, b):
    """IoU of two xyxy boxes (plain floats)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# --------------------------------------------------------------------------- drawing
def _background(rng, height, width):
    """A textured grey background, float (H, W, 3) in [0, 255]."""
    grey = rng.uniform(70, 160)
    tint = rng.uniform(-12, 12, size=3)
    h, w = max(2, height // 16), max(2, width // 16)
    # smooth blobs: mostly brightness (shared by the channels), a little colour
    coarse = rng.normal(0.0, 22.0, size=(h, w, 1)) + rng.normal(0.0, 7.0, size=(h, w, 3))
    coarse = (coarse + 128).clip(0, 255).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                       dtype=np.float64) - 128                       # (H, W, 3)
    return grey + tint + blobs


def _place_objects(rng, height, width, max_tries=30):
    """Choose 1-4 shapes: [(class index, vertices (V, 2) in pixels, xyxy box)]."""
    objects = []
    side = min(height, width)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(len(CLASSES)))
        name = CLASSES[cls]
        for _try in range(max_tries):
            radius = rng.uniform(0.08, 0.22) * side                   # circle: box side 16-44 %
            if name == "star":
                angle = rng.uniform(0, 2 * np.pi / 5)
            elif name == "circle":
                angle = 0.0
            else:
                angle = rng.uniform(-np.pi / 6, np.pi / 6)
            c, s = math.cos(angle), math.sin(angle)
            v = _unit_outline(name) @ np.array([[c, s], [-s, c]]) * radius   # (V, 2)
            lo, hi = v.min(axis=0), v.max(axis=0)
            # the whole shape inside the image, 1 px margin
            cx = rng.uniform(1 - lo[0], width - 1 - hi[0])
            cy = rng.uniform(1 - lo[1], height - 1 - hi[1])
            box = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            if all(_iou(box, o[2]) <= _MAX_OVERLAP_IOU for o in objects):
                objects.append((cls, v + [cx, cy], box))
                break
    return objects


def render_shapes_image(rng, height, width):
    """One synthetic image and its objects.

    Returns:
        image: uint8 (H, W, 3)
        objects: list of dicts {"category_id", "bbox" (x, y, w, h), "area"}
    """
    image = _background(rng, height, width)                             # (H, W, 3)
    objects = []
    for cls, vertices, box in _place_objects(rng, height, width):
        name = CLASSES[cls]
        x0, y0, x1, y1 = box
        # the pixels the shape touches: columns c0..c1-1, rows r0..r1-1
        c0, r0 = int(x0), int(y0)
        c1, r1 = min(width, math.ceil(x1)), min(height, math.ceil(y1))
        # coverage of each pixel: draw at 4x and average 4x4 blocks. A pixel i spans
        # [i, i+1); PIL fills the sub-pixels whose centres are inside the polygon.
        S = _SUPERSAMPLE
        mask = Image.new("L", ((c1 - c0) * S, (r1 - r0) * S), 0)
        ImageDraw.Draw(mask).polygon([tuple(p) for p in (vertices - [c0, r0]) * S - 0.5],
                                     fill=255)
        alpha = np.asarray(mask.reduce(S), dtype=np.float64)[:, :, None] / 255  # (h, w, 1)
        colour = np.clip(np.array(COLOURS[name]) + rng.integers(-25, 26, size=3), 0, 255)
        region = image[r0:r1, c0:c1]                                    # (h, w, 3), a view
        region[...] = region * (1 - alpha) + colour * alpha
        objects.append({"category_id": cls + 1,
                        "bbox": [round(float(v), 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                        "area": round(_polygon_area(vertices), 2)})
    image = image + rng.normal(0.0, 6.0, size=image.shape)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), objects


def _image_rng(seed, split, index):
    return np.random.default_rng(
        np.random.SeedSequence(int(seed), spawn_key=(_SPLITS[split], int(index))))


def _write_split(folder, ann_file, split, count, height, width, seed, progress):
    from tqdm import tqdm

    folder.mkdir(parents=True)
    images, annotations = [], []
    for i in tqdm(range(count), disable=not progress, desc=f"shapes {split}"):
        pixels, objects = render_shapes_image(_image_rng(seed, split, i), height, width)
        image_id = i + 1
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(folder / file_name, quality=92, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "height": height,
                       "width": width})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id,
                                "iscrowd": 0, **obj})
    coco = {"info": {"description": f"minidetr built-in shapes dataset ({split})",
                     "version": str(SHAPES_VERSION), "seed": seed},
            "licenses": [],
            "categories": [{"id": k + 1, "name": n, "supercategory": "shape"}
                           for k, n in enumerate(CLASSES)],
            "images": images, "annotations": annotations}
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    with open(ann_file, "w", encoding="utf-8") as f:
        json.dump(coco, f)


# --------------------------------------------------------------------------- entry point
def _settings(num_train, num_val, image_size, seed):
    return {"generator": "minidetr.data.shapes", "version": SHAPES_VERSION, "seed": seed,
            "num_train": num_train, "num_val": num_val, "image_size": list(image_size),
            "classes": list(CLASSES)}


def _expected_files(paths, settings):
    files = [paths.train_annotations, paths.val_annotations]
    for split in _SPLITS:
        folder = getattr(paths, f"{split}_images")
        files += [folder / f"{i + 1:012d}.jpg" for i in range(settings[f"num_{split}"])]
    return files


def generate_shapes_dataset(root, num_train=1000, num_val=200, image_size=(128, 128), seed=0,
                            overwrite=False, progress=False):
    """Write the shapes dataset under ``root`` (or reuse it) and return its :class:`ShapesPaths`.

    Idempotent: if ``root`` already holds a complete dataset made with the same settings
    (``manifest.json``), nothing is written. Files it would replace (``train/``, ``val/``,
    the two annotation files, the manifest) are only replaced with ``overwrite=True``;
    other files under ``root`` are never touched. The dataset is first written to a
    staging folder beside ``root``, so an interrupted run leaves no half dataset.

    Args:
        root: the dataset folder (created if needed).
        num_train, num_val: images per split.
        image_size: (H, W) in pixels, each at least 32.
        seed: the seed every image derives from.
        overwrite: replace an existing dataset (or other files at those paths).
        progress: show a tqdm progress bar.
    """
    height, width = (int(s) for s in image_size)
    if min(height, width) < 32:
        raise ValueError(f"generate_shapes_dataset: image_size must be at least 32x32, "
                         f"got {image_size}")
    if int(num_train) < 1 or int(num_val) < 1:
        raise ValueError(f"generate_shapes_dataset: need num_train >= 1 and num_val >= 1, got "
                         f"{num_train}, {num_val}")
    settings = _settings(int(num_train), int(num_val), (height, width), int(seed))
    paths = _paths(root)
    manifest = paths.root / "manifest.json"
    ours = [paths.train_images, paths.val_images, paths.train_annotations,
            paths.val_annotations, manifest]

    existing = [p for p in ours if p.exists()]
    if existing and not overwrite:
        try:
            old = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if old == settings:
            missing = [p for p in _expected_files(paths, settings) if not p.is_file()]
            if not missing:
                return paths
            raise DatasetError(f"{paths.root}: the shapes dataset is incomplete ({len(missing)} "
                               f"files missing, e.g. {missing[0]}); pass overwrite=True to "
                               "regenerate it")
        if isinstance(old, dict) and old.get("generator") == settings["generator"]:
            diffs = ", ".join(f"{k} {old.get(k)!r} != {v!r}" for k, v in settings.items()
                              if old.get(k) != v)
            raise DatasetError(f"{paths.root}: holds a shapes dataset made with other settings "
                               f"({diffs}); pass overwrite=True to replace it, or use another "
                               "root")
        raise DatasetError(f"{paths.root}: already contains {[str(p) for p in existing]} that "
                           "generate_shapes_dataset did not make (no matching manifest.json); "
                           "pass overwrite=True to replace them, or use another root")

    stage = paths.root.parent / f".{paths.root.name}.partial"
    if stage.exists():
        shutil.rmtree(stage)                          # left over by an interrupted run
    staged = _paths(stage)
    for split in _SPLITS:
        folder, ann_file = staged.split(split)
        _write_split(folder, ann_file, split, settings[f"num_{split}"], height, width,
                     settings["seed"], progress)

    # move into place; the manifest last, so it only exists for a complete dataset
    paths.root.mkdir(parents=True, exist_ok=True)
    if manifest.exists():
        manifest.unlink()
    for split in _SPLITS:
        folder, ann_file = paths.split(split)
        new_folder, new_ann = staged.split(split)
        if folder.exists():
            shutil.rmtree(folder) if folder.is_dir() else folder.unlink()
        os.replace(new_folder, folder)
        ann_file.parent.mkdir(exist_ok=True)
        os.replace(new_ann, ann_file)
    manifest.write_text(json.dumps(settings, indent=1), encoding="utf-8")
    shutil.rmtree(stage)
    return paths
