"""The pre-flight check: every image opened (and decoded) before training, EXIF orientation
as detectron2 applies it, one error naming every bad image, and the per-split summary."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from minidetr.data import CocoDetection, DatasetError, FirstImages, load_rgb_image
from minidetr.data import preflight as preflight_module
from minidetr.data.preflight import preflight

CATS = [{"id": 1, "name": "box"}]


def _write(folder, images, annotations=None):
    """``images``: [(id, PIL image or bytes, json (w, h))]; return a CocoDetection."""
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for image_id, image, (w, h) in images:
        name = f"{image_id:04d}.png"
        if isinstance(image, bytes):
            name = f"{image_id:04d}.jpg"
            (image_dir / name).write_bytes(image)
        else:
            if image.mode in ("CMYK",):
                name = f"{image_id:04d}.jpg"
            image.save(image_dir / name)
        entries.append({"id": image_id, "file_name": name, "width": w, "height": h})
    if annotations is None:
        annotations = [{"id": i, "image_id": e["id"], "category_id": 1, "bbox": [1, 1, 8, 8],
                        "iscrowd": 0} for i, e in enumerate(entries, 1)]
    ann_file = folder / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": annotations,
                                    "categories": CATS}))
    return CocoDetection(image_dir, ann_file, label_map="contiguous", warn=False)


def _jpeg(size=(40, 30), orientation=None, color=(200, 30, 30)) -> bytes:
    """A JPEG of ``size`` (w, h) with a white top-left corner, optionally an EXIF tag."""
    import io
    image = Image.new("RGB", size, color)
    image.paste((255, 255, 255), (0, 0, 8, 6))
    out = io.BytesIO()
    if orientation is None:
        image.save(out, "JPEG", quality=95)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        image.save(out, "JPEG", quality=95, exif=exif.tobytes())
    return out.getvalue()


def test_the_shapes_set_is_fully_checked_and_summarised(shapes_data):
    ds = CocoDetection(*shapes_data.split("train"), label_map="contiguous")
    summary = preflight(ds, "train", progress=False)
    assert summary.checked == "decode" and summary.images == len(ds) == 12
    assert summary.objects == ds.stats["objects"] > 0
    lines = summary.lines()
    assert lines[0].startswith(f"train split (instances_train.json): 12 images, "
                               f"{ds.stats['objects']} objects (every image decoded, ")


def test_a_corrupt_or_truncated_image_is_named_before_training(tmp_path):
    import io
    noise = np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", quality=90)     # pixel data >> header
    good = buffer.getvalue()
    ds = _write(tmp_path, [(1, good, (40, 30)), (2, good[:len(good) * 4 // 5], (40, 30)),
                           (3, b"not an image at all", (40, 30))])
    with pytest.raises(DatasetError) as err:
        preflight(ds, "val", progress=False)
    message = str(err.value)
    assert message.startswith(f"{ds.ann_file}: 2 of 3 val images failed the pre-flight check "
                              "(nothing was trained):")
    assert "0002.jpg (image id 2): cannot decode (OSError: " in message
    assert "0003.jpg (image id 3): cannot decode (not an image file Pillow can read" in message
    assert "0001.jpg" not in message
    # a header-only check cannot see the truncation (that is why small sets are decoded)
    with pytest.raises(DatasetError, match="1 of 3 val images") as err:
        preflight(ds, "val", decode="header", progress=False)
    assert "image id 3" in str(err.value) and "image id 2" not in str(err.value)


def test_many_bad_images_are_counted_and_the_first_five_named(tmp_path):
    ds = _write(tmp_path, [(i, Image.new("RGB", (20, 10)), (21, 10)) for i in range(1, 9)])
    with pytest.raises(DatasetError) as err:
        preflight(ds, "train", progress=False, num_workers=0)
    lines = str(err.value).splitlines()
    assert "8 of 8 train images failed" in lines[0]
    assert len(lines) == 1 + 5 + 1 and lines[-1] == "  ... and 3 more"
    assert "is 10x20 (h x w) but" in lines[1] and "says 10x21" in lines[1]


def test_exif_orientation_is_applied_as_detectron2_does(tmp_path):
    # stored 40 wide x 30 high, tagged "rotate 90 CW": upright it is 30 wide x 40 high
    ds = _write(tmp_path, [(1, _jpeg((40, 30), orientation=6), (30, 40)),
                           (2, _jpeg((40, 30), orientation=1), (40, 30))])
    summary = preflight(ds, "train", progress=False)
    assert summary.rotated == [1]
    assert "  turned upright by their EXIF orientation: 1 image (image id 1)" in summary.lines()
    image, target = ds.load(0)
    assert (image.width, image.height) == (30, 40)
    pixels = np.asarray(image)                               # (H, W, 3)
    # the white top-left corner of the stored pixels is at the top right once upright
    assert pixels[:4, -4:].min() > 230 and pixels[:4, :4].max(axis=-1).min() < 230
    assert load_rgb_image(ds.image_dir / "0002.jpg").size == (40, 30)


def test_a_json_matching_the_unrotated_pixels_is_explained(tmp_path):
    ds = _write(tmp_path, [(7, _jpeg((40, 30), orientation=6), (40, 30))])
    with pytest.raises(DatasetError) as err:
        preflight(ds, "train", progress=False)
    message = str(err.value)
    assert "0007.jpg (image id 7) is 40x30 (h x w) but" in message and "says 30x40" in message
    assert 'EXIF orientation tag 6, "rotate 90 CW"' in message
    assert "the stored pixels are 30x40" in message and "unrotated pixels" in message
    with pytest.raises(DatasetError, match="EXIF"):        # the loader says the same
        ds.load(0)


def test_converted_modes_crowds_drops_and_empty_images_are_reported_with_ids(tmp_path):
    gray16 = Image.fromarray(np.full((10, 12), 40000, np.uint16))
    images = [(1, Image.new("RGB", (12, 10)), (12, 10)),
              (2, Image.new("L", (12, 10)), (12, 10)),
              (3, Image.new("P", (12, 10)), (12, 10)),
              (4, Image.new("RGBA", (12, 10)), (12, 10)),
              (5, Image.new("CMYK", (12, 10)), (12, 10)),
              (6, gray16, (12, 10)),
              (7, Image.new("L", (12, 10)), (12, 10))]
    box = {"category_id": 1, "iscrowd": 0}
    anns = [dict(box, id=1, image_id=1, bbox=[1, 1, 5, 5]),
            dict(box, id=2, image_id=1, bbox=[1, 1, 5, 5], iscrowd=1),     # crowd
            dict(box, id=3, image_id=2, bbox=[1, 1, 0, 5]),                # zero width
            dict(box, id=4, image_id=3, bbox=[50, 50, 5, 5]),              # outside
            dict(box, id=5, image_id=4, bbox=[8, 8, 10, 10])]              # clipped
    ds = _write(tmp_path, images, anns)
    summary = preflight(ds, "train", progress=False)
    assert summary.modes == {"L": [2, 7], "P": [3], "RGBA": [4], "CMYK": [5], "I;16": [6]}
    lines = summary.lines()
    assert lines[0].startswith("train split (ann.json): 7 images, 2 objects (every image "
                               "decoded, ")
    assert lines[1:] == [
        "  kept without objects: 5 images (image ids 2, 3, 5, 6, 7)",
        "  ignored: 1 crowd region (iscrowd=1, as the official code; image id 1)",
        "  dropped: 1 box with zero or negative width or height (image id 2); 1 box entirely "
        "outside the image (image id 3)",
        "  clipped to the image: 1 box (image id 4)",
        "  converted to 8-bit RGB: 2 grayscale (L; image ids 2, 7); 1 palette (P; image id 3); "
        "1 RGBA (alpha dropped) (RGBA; image id 4); 1 CMYK (CMYK; image id 5); "
        "1 16-bit grayscale (I;16; image id 6)"]
    # only the images a run uses are counted
    first = preflight(FirstImages(ds, 2), "train", progress=False)
    assert (first.images, first.objects, first.modes) == (2, 1, {"L": [2]})
    assert [i for i, _ in first.notes["without_objects"]] == [2]


def test_auto_decodes_small_splits_and_reads_only_headers_beyond_the_limit(shapes_data,
                                                                           monkeypatch):
    ds = CocoDetection(*shapes_data.split("val"), label_map="contiguous")
    assert preflight(ds, "val", progress=False).checked == "decode"
    monkeypatch.setattr(preflight_module, "DECODE_LIMIT", 3)
    summary = preflight(ds, "val", progress=False)
    assert summary.checked == "header" and "header read" in summary.lines()[0]
    assert preflight(ds, "val", decode="decode", progress=False).checked == "decode"
    with pytest.raises(ValueError, match="decode must be one of"):
        preflight(ds, "val", decode="yes")


def test_coco128_summary(shared_dir):
    root = shared_dir / "data" / "coco128"
    ds = CocoDetection(root / "images", root / "annotations" / "instances_train2017.json",
                       label_map="contiguous")
    summary = preflight(ds, "train", progress=False)
    assert summary.checked == "decode" and summary.images == 128
    assert summary.modes == {"L": [86]}                      # one grayscale photo
    assert [i for i, _ in summary.notes["without_objects"]] == [250, 508]
    assert sum(c for _, c in summary.notes["crowd_removed"]) == 10
    assert summary.rotated == []


def test_large_splits_show_a_progress_bar(shapes_data, monkeypatch, capsys):
    ds = CocoDetection(*shapes_data.split("val"), label_map="contiguous")
    preflight(ds, "val")
    assert "check val images" not in capsys.readouterr().err     # 4 images: no bar
    monkeypatch.setattr(preflight_module, "PROGRESS_MIN", 4)
    preflight(ds, "val")
    assert "check val images" in capsys.readouterr().err
    preflight(ds, "val", progress=False)
    assert "check val images" not in capsys.readouterr().err
