"""COCO-format detection datasets: any annotation json + image folder.

What happens to the annotations (once, when the dataset is built), as in the official code:

1. crowd regions (``iscrowd = 1``) are removed;
2. COCO boxes ``(x, y, w, h)`` become corners ``(x0, y0, x1, y1) = (x, y, x + w, y + h)``;
3. corners are clipped to the image, ``0 <= x <= W``, ``0 <= y <= H``;
4. boxes left with ``x1 <= x0`` or ``y1 <= y0`` are dropped;
5. category ids become labels through a :class:`CategoryMap`: either the raw COCO ids
   (``"raw"``, 91 logits for COCO as in the official checkpoints) or contiguous ids
   0..K-1 (``"contiguous"``, for small subsets).

Images with no objects left are kept (they teach the model "nothing here"). Everything
removed, dropped or clipped is counted per image: ``dataset.report()`` gives the summary,
``dataset.notes()`` the image ids behind each count (the training run prints them in its
pre-flight summary, :mod:`minidetr.data.preflight`), and dropped boxes raise one warning
when the dataset is built (``warn=False``: none). Bad files raise :class:`DatasetError`
naming the file, the image id or the json field.

Images are decoded to 8-bit RGB (grayscale, palette, CMYK, 16-bit, ... are converted, see
:func:`to_rgb8`) after their EXIF orientation tag is applied, as detectron2 does: a photo
stored sideways with "rotate 90" in its EXIF is used upright, and its json width and height
must be those of the upright image.

Shapes (one sample of ``dataset.get(i, rng)``, after the transforms' ``Normalize``):
    image               (3, H, W) float32, ImageNet-normalised
    target["boxes"]     (T, 4) float32, cxcywh normalised by the unpadded (W, H)
    target["labels"]    (T,) int64
    target["image_id"]  int
    target["orig_size"] (2,) int64, (h, w) of the file
    target["size"]      (2,) int64, (h, w) after the transforms
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .transforms import Normalize


class DatasetError(ValueError):
    """A dataset file is missing, unreadable or inconsistent; the message says which."""


class DatasetWarning(UserWarning):
    """Something was dropped from a dataset (the summary says what and how much)."""


# --------------------------------------------------------------------------- categories
class CategoryMap:
    """The mapping between dataset category ids and the model's class labels.

    * ``mode="raw"``: label = category id; ``num_classes = max id + 1`` (91 for COCO, whose
      ids run 1..90 with gaps). This is what the official checkpoints use.
    * ``mode="contiguous"``: the K categories, sorted by id, get labels 0..K-1;
      ``num_classes = K``. Use it for small subsets.

    Save it with the model (``to_json``) so predictions map back to category ids
    (``category_of``) with the same table, and reuse it for the validation split.
    """

    MODES = ("raw", "contiguous")

    def __init__(self, categories, mode="raw"):
        if mode not in self.MODES:
            raise ValueError(f"CategoryMap: mode must be one of {self.MODES}, got {mode!r}")
        cats = sorted(((int(c["id"]), str(c["name"])) for c in categories))
        ids = [i for i, _ in cats]
        if not cats:
            raise DatasetError("CategoryMap: no categories given")
        if len(set(ids)) != len(ids):
            raise DatasetError(f"CategoryMap: duplicate category ids in {ids}")
        if mode == "raw" and ids[0] < 0:
            raise DatasetError(f"CategoryMap: raw mode needs non-negative ids, got {ids[0]}")
        self.mode = mode
        self.category_ids = tuple(ids)
        self.names = tuple(n for _, n in cats)
        if mode == "raw":
            self.labels = self.category_ids
            self.num_classes = ids[-1] + 1
        else:
            self.labels = tuple(range(len(ids)))
            self.num_classes = len(ids)
        self._label_of_id = dict(zip(self.category_ids, self.labels))
        self._id_of_label = dict(zip(self.labels, self.category_ids))

    @classmethod
    def from_coco(cls, coco_dict, mode="raw"):
        """The map of every category listed in a COCO annotation dict."""
        return cls(coco_dict["categories"], mode)

    def label_of(self, category_ids):
        """Category ids (any int array-like) -> labels, int64 of the same shape."""
        ids = np.asarray(category_ids, dtype=np.int64)
        try:
            return np.array([self._label_of_id[int(i)] for i in ids.ravel()],
                            dtype=np.int64).reshape(ids.shape)
        except KeyError as e:
            raise DatasetError(f"category id {e.args[0]} is not in this CategoryMap "
                               f"(ids {list(self.category_ids)})") from None

    def category_of(self, labels):
        """Labels -> category ids, int64 of the same shape.

        In raw mode this is the identity (a label that is no category, like COCO's unused
        id 12, stays as it is, exactly as the official post-processing does).
        """
        labels = np.asarray(labels, dtype=np.int64)
        if self.mode == "raw":
            return labels.copy()
        if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"category_of: labels must be in [0, {self.num_classes}), got "
                             f"range [{labels.min()}, {labels.max()}]")
        table = np.array(self.category_ids, dtype=np.int64)
        return table[labels]

    def name_of(self, label):
        """The category name of one label ('' for a raw label that is no category)."""
        cid = self._id_of_label.get(int(label))
        return "" if cid is None else self.names[self.category_ids.index(cid)]

    def to_dict(self):
        return {"mode": self.mode,
                "categories": [{"id": i, "name": n}
                               for i, n in zip(self.category_ids, self.names)]}

    @classmethod
    def from_dict(cls, d):
        try:
            return cls(d["categories"], d["mode"])
        except (KeyError, TypeError) as e:
            raise DatasetError(f"CategoryMap.from_dict: expected keys 'mode' and 'categories' "
                               f"with id/name entries, got {d!r:.200}") from e

    def to_json(self):
        """A JSON string (store it next to a checkpoint)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text):
        """The map saved by :meth:`to_json`."""
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise DatasetError(f"CategoryMap.from_json: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def __eq__(self, other):
        return isinstance(other, CategoryMap) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return (f"CategoryMap(mode={self.mode!r}, categories={len(self.category_ids)}, "
                f"num_classes={self.num_classes})")


# --------------------------------------------------------------------------- json checks
def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_coco_json(ann_file):
    """Read and check a COCO annotation file; return the dict.

    Checked: valid JSON; the lists "images", "annotations", "categories"; every image has an
    integer "id", a "file_name" and positive integer "width"/"height"; every category an
    integer "id" and a "name"; every annotation an "id", an "image_id" and a "category_id"
    that exist, and a "bbox" of 4 finite numbers. Ids must be unique. Anything else raises
    :class:`DatasetError` naming the file and the entry.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise DatasetError(f"annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: "
                           f"{e.msg}); is the file complete?") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: the top level must be a JSON object with 'images', "
                           f"'annotations' and 'categories', got a {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        hint = (" (COCO 'image_info' files for the test split have no annotations: they "
                "cannot be used for training or evaluation)") if missing == ["annotations"] else ""
        raise DatasetError(f"{path}: missing required field(s) {missing}; a COCO detection "
                           f"file has 'images', 'annotations' and 'categories'{hint}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetError(f"{path}: field '{key}' must be a list, "
                               f"got {type(data[key]).__name__}")

    def bad(where, entry, field, expected):
        value = entry.get(field, "<missing>") if isinstance(entry, dict) else entry
        raise DatasetError(f"{path}: {where} field '{field}' must be {expected}, got {value!r}")

    image_ids = set()
    for i, im in enumerate(data["images"]):
        where = f"images[{i}]"
        if not isinstance(im, dict):
            raise DatasetError(f"{path}: {where} must be an object, got {im!r:.80}")
        if not _is_int(im.get("id")):
            bad(where, im, "id", "an integer")
        where = f"images[{i}] (id {im['id']})"
        if not isinstance(im.get("file_name"), str) or not im["file_name"]:
            bad(where, im, "file_name", "a non-empty string")
        for k in ("width", "height"):
            if not _is_int(im.get(k)) or im[k] <= 0:
                bad(where, im, k, "a positive integer")
        if im["id"] in image_ids:
            raise DatasetError(f"{path}: {where}: image id {im['id']} appears twice")
        image_ids.add(im["id"])

    category_ids = set()
    for i, cat in enumerate(data["categories"]):
        where = f"categories[{i}]"
        if not isinstance(cat, dict):
            raise DatasetError(f"{path}: {where} must be an object, got {cat!r:.80}")
        if not _is_int(cat.get("id")):
            bad(where, cat, "id", "an integer")
        if not isinstance(cat.get("name"), str):
            bad(f"{where} (id {cat['id']})", cat, "name", "a string")
        if cat["id"] in category_ids:
            raise DatasetError(f"{path}: {where}: category id {cat['id']} appears twice")
        category_ids.add(cat["id"])

    ann_ids = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        if not isinstance(ann, dict):
            raise DatasetError(f"{path}: {where} must be an object, got {ann!r:.80}")
        if not _is_int(ann.get("id")):
            bad(where, ann, "id", "an integer")
        where = f"annotations[{i}] (id {ann['id']})"
        if ann["id"] in ann_ids:
            raise DatasetError(f"{path}: {where}: annotation id {ann['id']} appears twice")
        ann_ids.add(ann["id"])
        for k in ("image_id", "category_id"):
            if not _is_int(ann.get(k)):
                bad(where, ann, k, "an integer")
        if ann["image_id"] not in image_ids:
            raise DatasetError(f"{path}: {where} refers to image_id {ann['image_id']}, which "
                               "is not in 'images'")
        if ann["category_id"] not in category_ids:
            raise DatasetError(f"{path}: {where} refers to category_id {ann['category_id']}, "
                               f"which is not in 'categories' (ids {sorted(category_ids)})")
        box = ann.get("bbox")
        if not isinstance(box, list) or len(box) != 4 or not all(_is_number(v) for v in box):
            bad(where, ann, "bbox", "a list of 4 finite numbers [x, y, width, height]")
        if ann.get("iscrowd", 0) not in (0, 1):
            bad(where, ann, "iscrowd", "0 or 1")
    return data


# --------------------------------------------------------------------------- images
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")

# What each PIL mode is, for the reports (anything not RGB is converted by to_rgb8).
MODE_NAMES = {"L": "grayscale", "LA": "grayscale with alpha", "1": "1-bit",
              "P": "palette", "PA": "palette with alpha", "RGBA": "RGBA (alpha dropped)",
              "RGBX": "RGBX", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
              "I;16": "16-bit grayscale", "I;16B": "16-bit grayscale",
              "I;16L": "16-bit grayscale", "I;16N": "16-bit grayscale",
              "I": "32-bit grayscale", "F": "floating-point grayscale"}

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the PIL transpose that makes the image upright (detectron2's table,
# detectron2/data/detection_utils.py _apply_exif_orientation). 5..8 swap width and height.
_EXIF_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                   4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                   6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                   8: Image.Transpose.ROTATE_90}
EXIF_ORIENTATION_NAMES = {2: "mirrored", 3: "rotate 180", 4: "flipped upside down",
                          5: "mirrored and rotate 270 CW", 6: "rotate 90 CW",
                          7: "mirrored and rotate 90 CW", 8: "rotate 270 CW"}


def exif_orientation(image) -> int:
    """The EXIF orientation tag of a PIL image (1..8; 1, also when absent, means upright).

    A PNG's EXIF chunk may follow the pixels; it is read only once the image is loaded,
    so for an unloaded PNG only an EXIF chunk before the pixels is seen.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    try:
        value = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:          # a damaged EXIF block: treat the image as upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_exif_orientation(image):
    """The image turned upright by its EXIF orientation tag (as detectron2's ``read_image``)."""
    method = _EXIF_TRANSPOSE.get(exif_orientation(image))
    return image if method is None else image.transpose(method)


def oriented_size(image) -> tuple:
    """``(height, width)`` after the EXIF orientation (without decoding the pixels)."""
    swap = exif_orientation(image) in (5, 6, 7, 8)
    return (image.width, image.height) if swap else (image.height, image.width)


def size_mismatch_message(path, image_id, size, expected, ann_file, raw_size=None,
                          orientation=1) -> str:
    """One sentence: the file's (h, w) disagrees with the json's; with EXIF, why it may."""
    h, w = size
    message = (f"image {path} (image id {image_id}) is {h}x{w} (h x w) but {ann_file} says "
               f"{expected[0]}x{expected[1]}")
    if orientation != 1 and raw_size is not None:
        name = EXIF_ORIENTATION_NAMES.get(orientation, str(orientation))
        message += (f" (after its EXIF orientation tag {orientation}, \"{name}\", applied as "
                    f"detectron2 does; the stored pixels are {raw_size[0]}x{raw_size[1]})")
        if tuple(raw_size) == tuple(expected):
            message += ("; the json matches the unrotated pixels, so its boxes were probably "
                        "drawn on them: remove the tag (e.g. `exiftool -Orientation= FILE`) "
                        "or fix the json's width, height and boxes")
    return message


def to_rgb8(image):
    """Any PIL image -> 8-bit RGB.

    Grayscale, grayscale+alpha, RGBA (alpha dropped, as the official ``convert('RGB')``),
    palette (through RGBA when it has transparency), CMYK, 1-bit; 16-bit grayscale is
    scaled to 8 bits (``v / 257``) rather than clipped.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.asarray(image).astype(np.float32)                 # (H, W)
        gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))   # (H, W, 3)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_rgb_image(path, image_id=None):
    """Decode an image file to 8-bit RGB, upright by its EXIF orientation (as detectron2);
    raise :class:`DatasetError` naming the file."""
    what = f"image {path}" + ("" if image_id is None else f" (image id {image_id})")
    try:
        with open(path, "rb") as f:          # we own the file; the decoded image outlives it
            image = Image.open(f)
            image.load()
        return to_rgb8(apply_exif_orientation(image))
    except FileNotFoundError:
        raise DatasetError(f"{what}: file not found") from None
    except UnidentifiedImageError:
        raise DatasetError(f"{what}: cannot decode (not an image file Pillow can read: "
                           "corrupt, empty, or another format)") from None
    except MemoryError:
        raise
    except Exception as e:       # OSError, SyntaxError, struct.error, ...: a damaged file
        raise DatasetError(f"{what}: cannot decode ({type(e).__name__}: {e}); the file is "
                           "corrupt, truncated or not an image") from None


# --------------------------------------------------------------------------- dataset
# What happened to the annotations of one image (counts), for reports.
NOTE_KINDS = ("crowd_removed", "dropped_nonpositive", "dropped_outside", "clipped")


def _prepare_boxes(anns, width, height, counts):
    """Crowd removal, xywh -> xyxy, clipping, dropping empty boxes; adds to ``counts``
    (a dict with the :data:`NOTE_KINDS` keys).

    Returns boxes (T, 4) float32 xyxy and category ids (T,) int64.
    """
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    counts["crowd_removed"] += len(crowd)
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    if not anns:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
    xywh = np.array([a["bbox"] for a in anns], dtype=np.float64)          # (T, 4)
    cat_ids = np.array([a["category_id"] for a in anns], dtype=np.int64)  # (T,)
    nonpositive = (xywh[:, 2] <= 0) | (xywh[:, 3] <= 0)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)   # (T, 4)
    clipped = xyxy.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, width)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, height)
    keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
    counts["dropped_nonpositive"] += int(nonpositive.sum())
    counts["dropped_outside"] += int((~keep & ~nonpositive).sum())
    counts["clipped"] += int((keep & (clipped != xyxy).any(axis=1)).sum())
    return clipped[keep].astype(np.float32), cat_ids[keep]


class CocoDetection:
    """A COCO-format detection dataset: ``dataset.get(i, rng) -> (image, target)``.

    Args:
        image_dir: folder with the images ("file_name" of each json image is relative to it).
        ann_file: the COCO annotation json.
        transforms: a callable ``(PIL image, target, rng) -> (image, target)`` ending with
            ``Normalize`` (see :func:`~minidetr.data.transforms.make_transforms`); None means
            only ``Normalize`` (native size).
        label_map: "raw" (labels = COCO category ids), "contiguous", or a
            :class:`CategoryMap` (e.g. the training split's, for the validation split).
        check_files: check at construction that every image file exists.
        require_annotations: raise if the file has no annotation at all (a split with no
            objects cannot train or be evaluated); set False to load image-only files.
        warn: raise one :class:`DatasetWarning` if boxes were dropped (the training run
            passes False: its pre-flight summary reports them instead).

    Attributes:
        coco: the ``pycocotools.coco.COCO`` index of the file (for ``COCOeval``).
        ids: image ids in dataset order (sorted).
        category_map: the :class:`CategoryMap`; ``category_map.num_classes`` logits.
    """

    def __init__(self, image_dir, ann_file, transforms=None, label_map="raw",
                 check_files=True, require_annotations=True, warn=True):
        from pycocotools.coco import COCO

        self.image_dir = Path(image_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms if transforms is not None else Normalize()
        if not self.image_dir.is_dir():
            raise DatasetError(f"image folder not found: {self.image_dir}")
        data = load_coco_json(self.ann_file)
        if not data["images"]:
            raise DatasetError(f"{self.ann_file}: the dataset is empty (no images)")
        if not data["annotations"] and require_annotations:
            raise DatasetError(f"{self.ann_file}: no annotations at all ({len(data['images'])} "
                               "images, 0 objects); is this the right file? (pass "
                               "require_annotations=False to load it anyway)")
        if not data["categories"]:
            raise DatasetError(f"{self.ann_file}: 'categories' is empty")

        self.coco = COCO()
        self.coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):   # pycocotools prints progress
            self.coco.createIndex()

        if isinstance(label_map, CategoryMap):
            unknown = sorted({c["id"] for c in data["categories"]} - set(label_map.category_ids))
            if unknown:
                raise DatasetError(f"{self.ann_file}: category ids {unknown} are not in the "
                                   f"given CategoryMap (ids {list(label_map.category_ids)})")
            self.category_map = label_map
        else:
            self.category_map = CategoryMap.from_coco(data, label_map)

        self.ids = sorted(self.coco.imgs)
        self._counts = dict(images=len(self.ids), annotations=len(data["annotations"]),
                            crowd_removed=0, dropped_nonpositive=0, dropped_outside=0,
                            clipped=0, objects=0, images_without_objects=0)
        self._records = []
        self._notes = []                      # per image: {kind: count} of NOTE_KINDS
        for image_id in self.ids:
            info = self.coco.imgs[image_id]
            anns = self.coco.imgToAnns.get(image_id, [])
            notes = dict.fromkeys(NOTE_KINDS, 0)
            boxes, cat_ids = _prepare_boxes(anns, info["width"], info["height"], notes)
            for kind, count in notes.items():
                self._counts[kind] += count
            self._notes.append(dict(notes, objects=len(boxes)))
            self._counts["objects"] += len(boxes)
            self._counts["images_without_objects"] += int(len(boxes) == 0)
            self._records.append((info["file_name"], info["height"], info["width"], boxes,
                                  self.category_map.label_of(cat_ids)))

        if check_files:
            self._check_files_exist()
        dropped = self._counts["dropped_nonpositive"] + self._counts["dropped_outside"]
        if dropped and warn:
            warnings.warn(f"{self.ann_file}: {self.report()}", DatasetWarning, stacklevel=2)

    # ------------------------------------------------------------------ checks & report
    def _check_files_exist(self):
        missing = [(image_id, self.image_dir / rec[0])
                   for image_id, rec in zip(self.ids, self._records)
                   if not os.path.isfile(self.image_dir / rec[0])]
        if missing:
            listed = ", ".join(f"{p} (image id {i})" for i, p in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DatasetError(f"{self.ann_file}: {len(missing)} of {len(self.ids)} image files "
                               f"are missing: {listed}{more}")

    @property
    def stats(self):
        """The counts behind :meth:`report` (a copy)."""
        return dict(self._counts)

    def report(self):
        """One paragraph: what was loaded, removed, dropped and clipped."""
        c = self._counts
        parts = [f"{c['images']} images ({c['images_without_objects']} without objects), "
                 f"{c['annotations']} annotations -> {c['objects']} objects",
                 f"{c['crowd_removed']} crowd regions removed"]
        if c["dropped_nonpositive"]:
            parts.append(f"{c['dropped_nonpositive']} boxes with zero or negative width/height "
                         "dropped")
        if c["dropped_outside"]:
            parts.append(f"{c['dropped_outside']} boxes entirely outside their image dropped")
        parts.append(f"{c['clipped']} boxes clipped to the image")
        return "; ".join(parts)

    def image_record(self, index):
        """``(image_id, path, (height, width))`` of image ``index`` as the json gives it."""
        file_name, height, width = self._records[index][:3]
        return self.ids[index], self.image_dir / file_name, (height, width)

    def notes(self, indices=None) -> dict:
        """``{kind: [(image_id, count), ...]}`` for each kind of :data:`NOTE_KINDS` and
        ``"without_objects"`` (count 1 each), over ``indices`` (default: every image),
        listing only the images where it happened."""
        indices = range(len(self)) if indices is None else indices
        found = {kind: [] for kind in NOTE_KINDS + ("without_objects",)}
        for index in indices:
            note = self._notes[index]
            for kind in NOTE_KINDS:
                if note[kind]:
                    found[kind].append((self.ids[index], note[kind]))
            if note["objects"] == 0:
                found["without_objects"].append((self.ids[index], 1))
        return found

    def num_objects(self, indices=None) -> int:
        """Objects (boxes kept) in the images ``indices`` (default: every image)."""
        indices = range(len(self)) if indices is None else indices
        return sum(self._notes[i]["objects"] for i in indices)

    def verify(self, progress=False):
        """Decode every image (slow for large sets); return the list of problems found."""
        from tqdm import tqdm

        problems = []
        for index in tqdm(range(len(self)), disable=not progress, desc="verify images"):
            try:
                self.load(index)
            except DatasetError as e:
                problems.append(str(e))
        return problems

    # ------------------------------------------------------------------ access
    def __len__(self):
        return len(self.ids)

    def load(self, index):
        """The raw sample: PIL RGB image and target with absolute xyxy boxes (no transform)."""
        file_name, height, width, boxes, labels = self._records[index]
        image_id = self.ids[index]
        path = self.image_dir / file_name
        image = load_rgb_image(path, image_id)
        if (image.height, image.width) != (height, width):
            with Image.open(path) as stored:           # was it the EXIF tag? say so
                raw_hw, orientation = (stored.height, stored.width), exif_orientation(stored)
            raise DatasetError(size_mismatch_message(path, image_id, (image.height, image.width),
                                                     (height, width), self.ann_file, raw_hw,
                                                     orientation))
        size = np.array([height, width], dtype=np.int64)
        target = {"image_id": image_id, "boxes": boxes.copy(), "labels": labels.copy(),
                  "orig_size": size, "size": size.copy()}
        return image, target

    def get(self, index, rng=None):
        """Sample ``index`` after the transforms; random transforms draw from ``rng``."""
        image, target = self.load(index)
        return self.transforms(image, target, rng)

    def __getitem__(self, index):
        """``get(index)`` without a generator: fine for deterministic (validation) transforms."""
        return self.get(index)

    def __repr__(self):
        return (f"CocoDetection({len(self)} images, {self._counts['objects']} objects, "
                f"{self.category_map!r}, ann_file={str(self.ann_file)!r})")


class FirstImages:
    """The first ``n`` images of a dataset: the same samples, the same augmentation streams.

    Quacks like :class:`CocoDetection` for the loader, the evaluator and the pictures
    (``get``, ``load``, ``ids``, ``coco``, ``category_map``, ``image_record``, ``notes``);
    ``--max-train-images`` and ``eval --max-images`` use it.
    """

    def __init__(self, dataset, n):
        self.dataset = dataset
        self.n = min(int(n), len(dataset))
        self.ids = dataset.ids[:self.n]
        self.coco = dataset.coco
        self.category_map = dataset.category_map
        self.ann_file = dataset.ann_file

    def __len__(self):
        return self.n

    def get(self, index, rng=None):
        return self.dataset.get(index, rng)

    def load(self, index):
        return self.dataset.load(index)


    def image_record(self, index):
        return self.dataset.image_record(index)

    def notes(self, indices=None) -> dict:
        return self.dataset.notes(range(self.n) if indices is None else indices)

    def num_objects(self, indices=None) -> int:
        return self.dataset.num_objects(range(self.n) if indices is None else indices)
