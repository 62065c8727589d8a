"""The built-in shapes dataset: valid COCO, boxes on the pixels, deterministic, idempotent."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minidetr.data.coco import CocoDetection, DatasetError, load_coco_json
from minidetr.data.shapes import CLASSES, COLOURS, generate_shapes_dataset, render_shapes_image

SMALL = dict(num_train=5, num_val=3, image_size=(64, 80))


@pytest.fixture
def shapes(tmp_path):
    return generate_shapes_dataset(tmp_path / "shapes", **SMALL)


def test_writes_valid_coco_splits(shapes):
    for split, count in (("train", 5), ("val", 3)):
        image_dir, ann_file = shapes.split(split)
        data = load_coco_json(ann_file)                 # every field checked
        assert [c["name"] for c in data["categories"]] == list(CLASSES)
        assert len(data["images"]) == count == len(list(image_dir.glob("*.jpg")))
        per_image = np.bincount([a["image_id"] for a in data["annotations"]],
                                minlength=count + 1)[1:]
        assert per_image.min() >= 1 and per_image.max() <= 4
        for a in data["annotations"]:
            x, y, w, h = a["bbox"]
            assert x >= 0 and y >= 0 and x + w <= 80 and y + h <= 64 and w > 4 and h > 4
            assert 0 < a["area"] <= w * h + 1e-6 and a["iscrowd"] == 0
        ds = CocoDetection(image_dir, ann_file, label_map="contiguous")   # pycocotools index
        assert len(ds) == count and ds.category_map.num_classes == 5
        assert ds.get(0)[0].shape == (3, 64, 80)


def test_boxes_enclose_the_drawn_shapes():
    """Pixels of a class colour lie in that class's boxes, and every box is filled by it."""
    for seed in range(8):
        pixels, objects = render_shapes_image(np.random.default_rng(seed), 96, 96)
        rgb = pixels.astype(float)
        for cls, name in enumerate(CLASSES, start=1):
            near = np.linalg.norm(rgb - np.array(COLOURS[name]), axis=2) < 60      # (H, W)
            inside = np.zeros_like(near)
            for o in (o for o in objects if o["category_id"] == cls):
                x, y, w, h = o["bbox"]
                box = np.zeros_like(near)
                box[int(y):int(np.ceil(y + h)), int(x):int(np.ceil(x + w))] = True
                assert near[box].mean() > 0.2, (seed, name, o)   # the shape is in its box
                inside |= box
                if len(objects) == 1:                            # tight: extents match
                    ys, xs = np.nonzero(near)
                    found = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
                    assert np.abs(np.subtract(found, [x, y, x + w, y + h])).max() <= 1.5
            assert near[~inside].sum() <= 3, (seed, name)        # no colour outside boxes


def test_deterministic_and_prefix_stable(tmp_path, shapes):
    again = generate_shapes_dataset(tmp_path / "again", **SMALL)
    bigger = generate_shapes_dataset(tmp_path / "bigger", **{**SMALL, "num_train": 7})
    other = generate_shapes_dataset(tmp_path / "other", **{**SMALL, "seed": 1})
    name = "000000000003.jpg"
    assert (shapes.train_images / name).read_bytes() == (again.train_images / name).read_bytes()
    assert (shapes.train_images / name).read_bytes() == (bigger.train_images / name).read_bytes()
    assert (shapes.train_images / name).read_bytes() != (other.train_images / name).read_bytes()
    assert shapes.train_annotations.read_text() == again.train_annotations.read_text()


def test_reuses_a_matching_dataset_without_writing(shapes):
    files = [shapes.train_annotations, shapes.train_images / "000000000001.jpg",
             shapes.root / "manifest.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    assert generate_shapes_dataset(shapes.root, **SMALL) == shapes
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_never_overwrites_without_permission(shapes):
    notes = shapes.root / "my_notes.txt"
    notes.write_text("mine")
    with pytest.raises(DatasetError, match=r"other settings \(num_train 5 != 6\).*overwrite=True"):
        generate_shapes_dataset(shapes.root, **{**SMALL, "num_train": 6})
    (shapes.val_images / "000000000002.jpg").unlink()
    with pytest.raises(DatasetError, match="incomplete .*000000000002.jpg"):
        generate_shapes_dataset(shapes.root, **SMALL)
    regenerated = generate_shapes_dataset(shapes.root, **{**SMALL, "num_train": 6},
                                          overwrite=True)
    assert len(list(regenerated.train_images.glob("*.jpg"))) == 6
    assert (regenerated.val_images / "000000000002.jpg").is_file()
    assert notes.read_text() == "mine"                         # other files are left alone
    assert json.loads((shapes.root / "manifest.json").read_text())["num_train"] == 6
    assert not (shapes.root.parent / ".shapes.partial").exists()


def test_foreign_files_are_protected(tmp_path):
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    (root / "train" / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(DatasetError, match="did not make .*overwrite=True"):
        generate_shapes_dataset(root, **SMALL)
    assert (root / "train" / "holiday.jpg").read_bytes() == b"precious"
    # an existing folder with unrelated files only is fine
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed" / "README").write_text("hello")
    generate_shapes_dataset(tmp_path / "mixed", **SMALL)
    assert (tmp_path / "mixed" / "README").read_text() == "hello"


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes_dataset(tmp_path / "x", image_size=(16, 16))
    with pytest.raises(ValueError, match="num_train"):
        generate_shapes_dataset(tmp_path / "x", num_train=0)


def test_ground_truth_round_trip_scores_ap_1_with_cocoeval(shapes):
    """Targets -> (labels -> category ids, cxcywh -> absolute xywh) -> COCOeval gives AP 1."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval

    from minidetr.data.transforms import make_transforms

    ds = CocoDetection(*shapes.split("val"), transforms=make_transforms("val", "tiny", val_size=48),
                       label_map="contiguous")
    results = []
    for i in range(len(ds)):
        _, t = ds.get(i)
        oh, ow = t["orig_size"]
        cx, cy, w, h = (t["boxes"].astype(np.float64) * [ow, oh, ow, oh]).T
        for k, cat in enumerate(ds.category_map.category_of(t["labels"])):
            results.append({"image_id": t["image_id"], "category_id": int(cat), "score": 1.0,
                            "bbox": [cx[k] - w[k] / 2, cy[k] - h[k] / 2, w[k], h[k]]})
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(ds.coco, ds.coco.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert evaluator.stats[0] == pytest.approx(1.0) and evaluator.stats[1] == pytest.approx(1.0)
