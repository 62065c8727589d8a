"""Carve a small COCO subset out of a full COCO download (a new json, optionally the images).

    make_subset("annotations/instances_train2017.json", "subsets/animals_train.json",
                categories=["cat", "dog", "horse"], num_images=2000, seed=0,
                image_dir="train2017", copy_images_to="subsets/animals_train")

keeps the images that contain at least one object of the chosen categories (all images when
``categories`` is None), draws ``num_images`` of them at random (reproducibly from ``seed``),
and writes a json with only those images, their annotations of the chosen categories (crowd
regions included: the loader removes them, the COCO evaluator uses them) and only the chosen
categories, with their original ids. Load it with ``label_map="contiguous"`` for a model with
one logit per chosen category.
"""
from __future__ import annotations

import filecmp
import shutil
from pathlib import Path

import numpy as np

from ..files import write_json
from .coco import DatasetError, load_coco_json


def _resolve_categories(data, categories, ann_file):
    """Names or ids -> the set of chosen category ids (all when ``categories`` is None)."""
    by_id = {c["id"]: c["name"] for c in data["categories"]}
    if categories is None:
        return set(by_id)
    if isinstance(categories, (str, int)):
        categories = [categories]
    by_name = {name: cid for cid, name in by_id.items()}
    chosen = set()
    for c in categories:
        if isinstance(c, str) and c in by_name:
            chosen.add(by_name[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool) and int(c) in by_id:
            chosen.add(int(c))
        else:
            raise DatasetError(f"{ann_file}: unknown category {c!r}; known names: "
                               f"{sorted(by_name)[:20]}{' ...' if len(by_name) > 20 else ''} "
                               f"(ids {min(by_id)}..{max(by_id)})")
    if not chosen:
        raise DatasetError("make_subset: categories is empty; pass None for all categories")
    return chosen


def make_subset(ann_file, out_json, categories=None, num_images=None, seed=0, image_dir=None,
                copy_images_to=None, overwrite=False):
    """Write a COCO subset json (and optionally copy its images); return a summary dict.

    Args:
        ann_file: the full COCO annotation json (e.g. ``instances_train2017.json``).
        out_json: where to write the subset's json.
        categories: category names and/or ids to keep; None keeps all.
        num_images: how many images to draw at random; None keeps every eligible image.
        seed: seeds the random draw (a numpy Generator), so the subset is reproducible.
        image_dir: the folder of the full set's images; needed to check or copy them.
        copy_images_to: copy the chosen images into this folder.
        overwrite: replace an existing ``out_json`` or differing image files.

    Returns:
        {"out_json", "num_images", "num_annotations", "category_ids", "category_names",
         "images_dir"} (``images_dir`` is where the subset's images are, or None).

    Raises:
        DatasetError: unreadable input, unknown category, too few images, a missing source
            image, or an existing output that ``overwrite=False`` protects.
    """
    ann_file, out_json = Path(ann_file), Path(out_json)
    if out_json.resolve() == ann_file.resolve():
        raise DatasetError(f"make_subset: out_json is the input file {ann_file}")
    if out_json.exists() and not overwrite:
        raise DatasetError(f"{out_json} already exists; pass overwrite=True to replace it")
    if copy_images_to is not None and image_dir is None:
        raise DatasetError("make_subset: copy_images_to needs image_dir (where the images are)")
    data = load_coco_json(ann_file)
    chosen = _resolve_categories(data, categories, ann_file)

    # eligible images: those with at least one (non-crowd) object of a chosen category
    if categories is None:
        eligible = sorted(im["id"] for im in data["images"])
    else:
        eligible = sorted({a["image_id"] for a in data["annotations"]
                           if a["category_id"] in chosen and not a.get("iscrowd", 0)})
    if num_images is not None:
        if int(num_images) < 1:
            raise DatasetError(f"make_subset: num_images must be >= 1, got {num_images}")
        if int(num_images) > len(eligible):
            raise DatasetError(f"make_subset: asked for {num_images} images but only "
                               f"{len(eligible)} in {ann_file} contain the chosen categories")
        rng = np.random.default_rng(seed)
        picked = rng.choice(len(eligible), size=int(num_images), replace=False)
        eligible = sorted(eligible[i] for i in picked)
    if not eligible:
        raise DatasetError(f"make_subset: no image of {ann_file} contains the chosen categories")
    keep = set(eligible)

    images = [im for im in data["images"] if im["id"] in keep]
    subset = {
        "info": {**data.get("info", {}),
                 "description": f"subset of {ann_file.name} made by minidetr make_subset("
                                f"categories={sorted(chosen) if categories is not None else None}, "
                                f"num_images={num_images}, seed={seed})"},
        "licenses": data.get("licenses", []),
        "categories": [c for c in data["categories"] if c["id"] in chosen],
        "images": images,
        "annotations": [a for a in data["annotations"]
                        if a["image_id"] in keep and a["category_id"] in chosen],
    }

    images_dir = None
    if image_dir is not None:
        image_dir = Path(image_dir)
        missing = [(im["id"], image_dir / im["file_name"]) for im in images
                   if not (image_dir / im["file_name"]).is_file()]
        if missing:
            raise DatasetError(f"make_subset: {len(missing)} chosen images are missing from "
                               f"{image_dir}, e.g. {missing[0][1]} (image id {missing[0][0]})")
        images_dir = image_dir
    if copy_images_to is not None:
        images_dir = Path(copy_images_to)
        _copy_images(images, image_dir, images_dir, overwrite)

    write_json(out_json, subset, indent=None)
    return {"out_json": out_json, "num_images": len(images),
            "num_annotations": len(subset["annotations"]),
            "category_ids": sorted(chosen),
            "category_names": [c["name"] for c in subset["categories"]],
            "images_dir": images_dir}


def _copy_images(images, src_dir, dst_dir, overwrite):
    """Copy the images; an identical file already there is kept, a different one is an error."""
    conflicts = set()
    for im in images:
        dst = dst_dir / im["file_name"]
        if dst.exists() and not filecmp.cmp(src_dir / im["file_name"], dst, shallow=False):
            conflicts.add(dst)
    if conflicts and not overwrite:
        raise DatasetError(f"make_subset: {len(conflicts)} files in {dst_dir} differ from the "
                           f"source images, e.g. {min(conflicts)}; pass overwrite=True to "
                           "replace them")
    for im in images:
        src, dst = src_dir / im["file_name"], dst_dir / im["file_name"]
        if dst.exists() and dst not in conflicts:
            continue                                  # already the same file
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
