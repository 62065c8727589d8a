"""COCO-format datasets: annotation cleaning, category maps, image modes, bad input, coco128."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from PIL import Image

from minidetr.data.coco import (CategoryMap, CocoDetection, DatasetError, DatasetWarning,
                                load_coco_json, load_rgb_image)
from minidetr.data.loader import collate, sample_rng
from minidetr.data.transforms import make_transforms

CATS = [{"id": 3, "name": "car"}, {"id": 7, "name": "train"}, {"id": 90, "name": "toothbrush"}]


def write_coco(folder, images, annotations, categories=CATS, write_files=True, raw=None):
    """Write ``images`` [(id, w, h)] as small JPEGs and the json; return (image_dir, ann_file).

    ``raw`` replaces the json dict entirely (for malformed-file tests).
    """
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, w, h in images:
        name = f"{image_id:06d}.jpg"
        if write_files:
            Image.new("RGB", (w, h), (90, 120, 150)).save(image_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    ann_file = folder / "ann.json"
    data = raw if raw is not None else {"images": entries, "annotations": annotations,
                                        "categories": categories}
    ann_file.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return image_dir, ann_file


def ann(ann_id, image_id, bbox, category_id=3, iscrowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": bbox,
            "iscrowd": iscrowd, "area": 1.0}


@pytest.fixture
def small_coco(tmp_path):
    """Image 1 (100x80, w x h) with every kind of box; image 2 without objects."""
    anns = [ann(1, 1, [10, 20, 30, 40], 3),          # normal
            ann(2, 1, [5, 5, 50, 50], 7, iscrowd=1),  # crowd: removed
            ann(3, 1, [80, 60, 40, 40], 90),         # sticks out: clipped to [80, 60, 100, 80]
            ann(4, 1, [10, 10, 0, 5], 3),            # zero width: dropped
            ann(5, 1, [10, 10, 5, -3], 3),           # negative height: dropped
            ann(6, 1, [120, 10, 5, 5], 7)]           # entirely outside: dropped
    return write_coco(tmp_path, [(1, 100, 80), (2, 64, 48)], anns)


# --------------------------------------------------------------------------- cleaning
def test_annotation_cleaning_counts_and_warns_once(small_coco):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(*small_coco)
    ours = [w for w in caught if issubclass(w.category, DatasetWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert "ann.json" in message and "2 boxes with zero or negative" in message
    assert "1 boxes entirely outside" in message

    image, target = ds.load(0)
    np.testing.assert_allclose(target["boxes"], [[10, 20, 40, 60], [80, 60, 100, 80]])
    np.testing.assert_array_equal(target["labels"], [3, 90])          # raw ids
    assert ds.stats == dict(images=2, annotations=6, crowd_removed=1, dropped_nonpositive=2,
                            dropped_outside=1, clipped=1, objects=2, images_without_objects=1)
    assert "1 crowd regions removed" in ds.report() and "1 boxes clipped" in ds.report()
    # the image without objects is kept, with empty arrays of the right shapes
    _, empty = ds.load(1)
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert empty["labels"].dtype == np.int64


def test_clean_dataset_does_not_warn(tmp_path):
    paths = write_coco(tmp_path, [(1, 50, 40)], [ann(1, 1, [1, 2, 3, 4])])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*paths)


@pytest.mark.filterwarnings("ignore::minidetr.data.coco.DatasetWarning")
def test_sample_format_after_transforms(small_coco):
    ds = CocoDetection(*small_coco, transforms=make_transforms("val", "tiny", val_size=40),
                       label_map="contiguous")
    image, target = ds.get(0)
    assert image.dtype == np.float32 and image.shape == (3, 40, 50)     # 80x100 -> 40x50
    assert target["image_id"] == 1
    np.testing.assert_array_equal(target["orig_size"], [80, 100])
    np.testing.assert_array_equal(target["size"], [40, 50])
    assert target["labels"].dtype == np.int64
    np.testing.assert_array_equal(target["labels"], [0, 2])           # car, toothbrush
    # cxcywh normalised by the unpadded size: the resize does not change normalised boxes
    expected = np.array([[25 / 100, 40 / 80, 30 / 100, 40 / 80],
                         [90 / 100, 70 / 80, 20 / 100, 20 / 80]])
    np.testing.assert_allclose(target["boxes"], expected, rtol=1e-6)
    assert target["boxes"].dtype == np.float32
    # train transforms need the generator the loader passes
    ds.transforms = make_transforms("train", "tiny")
    with pytest.raises(ValueError, match="numpy Generator"):
        ds[0]
    ds.get(0, sample_rng(0, 0, 0))


# --------------------------------------------------------------------------- categories
def test_category_map_raw_and_contiguous():
    raw = CategoryMap(CATS, "raw")
    assert raw.num_classes == 91 and raw.labels == (3, 7, 90)
    np.testing.assert_array_equal(raw.label_of([90, 3]), [90, 3])
    np.testing.assert_array_equal(raw.category_of([7, 12]), [7, 12])  # identity, as official
    assert raw.name_of(7) == "train" and raw.name_of(12) == ""

    cont = CategoryMap(list(reversed(CATS)), "contiguous")              # order does not matter
    assert cont.num_classes == 3 and cont.names == ("car", "train", "toothbrush")
    labels = cont.label_of(np.array([[90, 3], [7, 7]]))
    np.testing.assert_array_equal(labels, [[2, 0], [1, 1]])
    np.testing.assert_array_equal(cont.category_of(labels), [[90, 3], [7, 7]])
    with pytest.raises(DatasetError, match="category id 5"):
        cont.label_of([5])
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cont.category_of([3])
    for m in (raw, cont):
        again = CategoryMap.from_json(m.to_json())
        assert again == m and again.num_classes == m.num_classes
    with pytest.raises(DatasetError, match="not valid JSON"):
        CategoryMap.from_json("{")
    with pytest.raises(DatasetError, match="mode"):
        CategoryMap.from_json('{"categories": []}')


@pytest.mark.filterwarnings("ignore::minidetr.data.coco.DatasetWarning")
def test_dataset_uses_a_given_category_map(small_coco, tmp_path):
    train = CocoDetection(*small_coco, label_map="contiguous")
    other = write_coco(tmp_path / "val", [(1, 30, 30)], [ann(1, 1, [1, 1, 5, 5], 7)],
                       categories=[{"id": 7, "name": "train"}])
    val = CocoDetection(*other, label_map=train.category_map)
    assert val.category_map is train.category_map
    np.testing.assert_array_equal(val.load(0)[1]["labels"], [1])       # "train" is label 1
    alien = write_coco(tmp_path / "alien", [(1, 30, 30)], [ann(1, 1, [1, 1, 5, 5], 8)],
                       categories=[{"id": 8, "name": "boat"}])
    with pytest.raises(DatasetError, match=r"category ids \[8\] are not in the given"):
        CocoDetection(*alien, label_map=train.category_map)


# --------------------------------------------------------------------------- image modes
def _save(path, image, **kw):
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK", "I;16",
                                  "1", "RGB"])
def test_image_modes_become_rgb8(tmp_path, mode):
    gray = 200
    if mode == "I;16":
        image = Image.fromarray(np.full((6, 8), gray * 257, dtype=np.uint16))
        assert image.mode == "I;16"
        path = _save(tmp_path / "im.png", image)
    elif mode == "CMYK":
        path = _save(tmp_path / "im.jpg", Image.new("CMYK", (8, 6), (0, 0, 0, 255 - gray)),
                     quality=100)
    elif mode.startswith("P"):
        image = Image.new("RGB", (8, 6), (gray, gray, gray)).quantize(4)
        if mode == "P+transparency":
            image.info["transparency"] = 3                      # an unused palette index
        path = _save(tmp_path / "im.png", image)
    elif mode == "1":
        path = _save(tmp_path / "im.png", Image.new("1", (8, 6), 1))
        gray = 255
    else:
        colour = {"L": gray, "LA": (gray, 128), "RGBA": (gray, gray, gray, 10),
                  "RGB": (gray, gray, gray)}[mode]
        path = _save(tmp_path / "im.png", Image.new(mode, (8, 6), colour))
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # e.g. Pillow's palette-transparency warning
        rgb = load_rgb_image(path, image_id=1)
    pixels = np.asarray(rgb)
    assert rgb.mode == "RGB" and pixels.dtype == np.uint8 and pixels.shape == (6, 8, 3)
    assert np.abs(pixels.astype(int) - gray).max() <= 2, (mode, pixels[0, 0])


def test_grayscale_image_in_a_dataset(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [(1, 20, 10)], [ann(1, 1, [1, 1, 4, 4])])
    Image.new("L", (20, 10), 77).save(image_dir / "000001.jpg")
    image, _ = CocoDetection(image_dir, ann_file).get(0)
    assert image.shape == (3, 10, 20)


# --------------------------------------------------------------------------- bad input
def test_missing_image_file_is_named(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [(1, 20, 10), (42, 20, 10)],
                                     [ann(1, 1, [1, 1, 4, 4])])
    (image_dir / "000042.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 image files are missing: .*000042\.jpg "
                                           r"\(image id 42\)"):
        CocoDetection(image_dir, ann_file)
    # without the up-front check, the error comes when the image is read
    ds = CocoDetection(image_dir, ann_file, check_files=False)
    with pytest.raises(DatasetError, match=r"000042\.jpg \(image id 42\): file not found"):
        ds.load(1)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_or_truncated_image_is_named(tmp_path, damage):
    image_dir, ann_file = write_coco(tmp_path, [(1, 64, 48), (7, 64, 48)],
                                     [ann(1, 1, [1, 1, 4, 4])])
    path = image_dir / "000007.jpg"
    noisy = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes({"garbage": b"this is not a jpeg" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    ds = CocoDetection(image_dir, ann_file)
    ds.load(0)                                                    # the good one still loads
    with pytest.raises(DatasetError, match=r"000007\.jpg \(image id 7\): cannot decode"):
        ds.load(1)
    problems = ds.verify()
    assert len(problems) == 1 and "image id 7" in problems[0]


def test_image_size_disagreeing_with_json_is_named(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [(3, 20, 10)], [ann(1, 3, [1, 1, 4, 4])])
    Image.new("RGB", (10, 20)).save(image_dir / "000003.jpg")     # rotated
    with pytest.raises(DatasetError, match=r"image id 3\) is 20x10 .* says 10x20"):
        CocoDetection(image_dir, ann_file).load(0)


def _valid_dict():
    return {"images": [{"id": 1, "file_name": "000001.jpg", "width": 20, "height": 10}],
            "annotations": [ann(5, 1, [1, 1, 4, 4])], "categories": [dict(CATS[0])]}


def _broken(change):
    d = _valid_dict()
    change(d)
    return d


@pytest.mark.parametrize("raw, message", [
    ('{"images": [', r"not valid JSON \(line 1"),
    ("[1, 2]", "top level must be a JSON object"),
    (_broken(lambda d: d.pop("images")), r"missing required field\(s\) \['images'\]"),
    (_broken(lambda d: d.pop("annotations")), r"\['annotations'\].*image_info"),
    (_broken(lambda d: d.pop("categories")), r"\['categories'\]"),
    (_broken(lambda d: d.update(images={})), "field 'images' must be a list"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, 3])),
     r"annotations\[0\] \(id 5\) field 'bbox' must be a list of 4"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, "3", 4])), "'bbox'"),
    (_broken(lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4])), "'bbox'"),
    (_broken(lambda d: d["annotations"][0].pop("bbox")), r"'bbox' .* got '<missing>'"),
    (_broken(lambda d: d["annotations"][0].update(image_id=99)),
     r"\(id 5\) refers to image_id 99, which is not in 'images'"),
    (_broken(lambda d: d["annotations"][0].update(category_id=4)),
     r"\(id 5\) refers to category_id 4, which is not in 'categories' \(ids \[3\]\)"),
    (_broken(lambda d: d["images"][0].pop("width")),
     r"images\[0\] \(id 1\) field 'width' must be a positive integer"),
    (_broken(lambda d: d["images"][0].update(height=0)), "'height' must be a positive"),
    (_broken(lambda d: d["images"].append(dict(d["images"][0]))), "image id 1 appears twice"),
    (_broken(lambda d: d["annotations"][0].pop("id")), r"annotations\[0\] field 'id'"),
    (_broken(lambda d: d["categories"][0].pop("name")), r"categories\[0\] \(id 3\) field 'name'"),
])
def test_malformed_json_is_named(tmp_path, raw, message):
    image_dir, ann_file = write_coco(tmp_path, [(1, 20, 10)], [], raw=raw)
    with pytest.raises(DatasetError, match=message) as info:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(info.value)


def test_missing_files_and_folders(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [(1, 20, 10)], [ann(1, 1, [1, 1, 4, 4])])
    with pytest.raises(DatasetError, match="annotation file not found: .*nope.json"):
        load_coco_json(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="image folder not found: .*nowhere"):
        CocoDetection(tmp_path / "nowhere", ann_file)


def test_empty_dataset_and_split_without_annotations(tmp_path):
    paths = write_coco(tmp_path / "a", [], [])
    with pytest.raises(DatasetError, match=r"ann\.json: the dataset is empty \(no images\)"):
        CocoDetection(*paths)
    paths = write_coco(tmp_path / "b", [(1, 20, 10), (2, 20, 10)], [])
    with pytest.raises(DatasetError, match="no annotations at all \\(2 images, 0 objects\\)"):
        CocoDetection(*paths)
    ds = CocoDetection(*paths, require_annotations=False)
    assert ds.stats["images_without_objects"] == 2
    paths = write_coco(tmp_path / "c", [(1, 20, 10)], [ann(1, 1, [1, 1, 4, 4])], categories=[])
    with pytest.raises(DatasetError, match="category_id 3"):
        CocoDetection(*paths)


# --------------------------------------------------------------------------- real data
def test_coco128(shared_dir):
    root = shared_dir / "data" / "coco128"
    with warnings.catch_warnings():
        warnings.simplefilter("error", DatasetWarning)       # nothing dropped in coco128
        ds = CocoDetection(root / "images", root / "annotations" / "instances_train2017.json",
                           transforms=make_transforms("val", "tiny", val_size=160))
    s = ds.stats
    assert len(ds) == 128 and s["annotations"] == 939 and s["crowd_removed"] == 10
    assert s["objects"] == 939 - 10
    assert ds.category_map.num_classes == 91                   # raw COCO ids, as official
    assert CocoDetection(root / "images", root / "annotations" / "instances_train2017.json",
                         label_map="contiguous").category_map.num_classes == 80

    # a deterministic batch: boxes equal the json boxes, scaled by hand
    json_anns = {}
    for a in ds.coco.dataset["annotations"]:
        if not a["iscrowd"]:
            json_anns.setdefault(a["image_id"], []).append(a)
    batch = collate([ds.get(i) for i in range(4)])
    B, _, H, W = batch.images.shape
    for b, t in enumerate(batch.targets):
        h, w = t["size"]
        assert not batch.mask[b, :h, :w].any() and batch.mask[b].sum() == H * W - h * w
        oh, ow = t["orig_size"]
        x, y, bw, bh = np.array([a["bbox"] for a in json_anns[t["image_id"]]]).T
        x1, y1 = np.minimum(x + bw, ow), np.minimum(y + bh, oh)
        expected = np.stack([(x + x1) / 2 / ow, (y + y1) / 2 / oh, (x1 - x) / ow, (y1 - y) / oh], 1)
        np.testing.assert_allclose(t["boxes"], expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(
            t["labels"], [a["category_id"] for a in json_anns[t["image_id"]]])
    # the one grayscale image of coco128 is converted to RGB
    gray = next(i for i, image_id in enumerate(ds.ids)
                if Image.open(root / "images" / ds.coco.imgs[image_id]["file_name"]).mode == "L")
    assert ds.get(gray)[0].shape[0] == 3


def test_coco128_training_batch(shared_dir):
    root = shared_dir / "data" / "coco128"
    ds = CocoDetection(root / "images", root / "annotations" / "instances_train2017.json",
                       transforms=make_transforms("train", "small"))
    samples = [ds.get(i, sample_rng(0, 0, i)) for i in range(6)]
    batch = collate(samples)
    for b, t in enumerate(batch.targets):
        h, w = t["size"]
        assert max(h, w) <= 640 and not batch.mask[b, :h, :w].any()
        assert t["boxes"].shape == (len(t["labels"]), 4) and t["boxes"].dtype == np.float32
        cx, cy, bw, bh = t["boxes"].T
        assert np.all((bw > 0) & (bh > 0))
        assert np.all((cx - bw / 2 >= -1e-6) & (cx + bw / 2 <= 1 + 1e-6))
        assert np.all((cy - bh / 2 >= -1e-6) & (cy + bh / 2 <= 1 + 1e-6))
        assert set(t["labels"].tolist()) <= set(ds.load(b)[1]["labels"].tolist())
