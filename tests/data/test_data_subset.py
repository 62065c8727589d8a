"""make_subset: carving a COCO subset (json + optional image copies), safely."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from minidetr.data.coco import CocoDetection, DatasetError, load_coco_json
from minidetr.data.subset import make_subset

CATS = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 18, "name": "dog"}]


@pytest.fixture
def full(tmp_path):
    """10 images: image i has a car; even ones a person; 7 a dog; 9 a crowd of dogs only."""
    image_dir = tmp_path / "full_images"
    image_dir.mkdir()
    images, anns = [], []
    for i in range(1, 11):
        Image.new("RGB", (32, 24), (i * 20, 0, 0)).save(image_dir / f"{i:012d}.jpg")
        images.append({"id": i, "file_name": f"{i:012d}.jpg", "width": 32, "height": 24})

        def add(cat, crowd=0):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat,
                         "bbox": [1, 2, 10, 8], "iscrowd": crowd, "area": 80})
        if i == 9:
            add(18, crowd=1)
            continue
        add(3)
        if i % 2 == 0:
            add(1)
        if i == 7:
            add(18)
    ann_file = tmp_path / "instances_full.json"
    ann_file.write_text(json.dumps({"info": {"year": 2017}, "licenses": [{"id": 1}],
                                    "images": images, "annotations": anns,
                                    "categories": CATS}))
    return image_dir, ann_file


def test_subset_by_names_and_ids(full, tmp_path):
    image_dir, ann_file = full
    out = tmp_path / "sub" / "dogs_people.json"
    summary = make_subset(ann_file, out, categories=["dog", 1], image_dir=image_dir)
    data = load_coco_json(out)
    assert sorted(im["id"] for im in data["images"]) == [2, 4, 6, 7, 8, 10]   # 9: crowd only
    assert {a["category_id"] for a in data["annotations"]} == {1, 18}          # no cars
    assert [c["id"] for c in data["categories"]] == [1, 18]                    # original ids
    assert summary["num_images"] == 6 and summary["num_annotations"] == 6
    assert summary["category_names"] == ["person", "dog"]
    assert data["licenses"] == [{"id": 1}] and "make_subset" in data["info"]["description"]
    ds = CocoDetection(image_dir, out, label_map="contiguous")
    assert ds.category_map.num_classes == 2 and len(ds) == 6


def test_random_images_are_reproducible(full, tmp_path):
    _, ann_file = full

    def ids(seed, name):
        make_subset(ann_file, tmp_path / name, num_images=4, seed=seed)
        return [im["id"] for im in load_coco_json(tmp_path / name)["images"]]

    a, b = ids(0, "a.json"), ids(0, "b.json")
    assert a == b and len(a) == 4
    assert any(ids(s, f"s{s}.json") != a for s in range(1, 6))
    all_ids = make_subset(ann_file, tmp_path / "all.json")["num_images"]
    assert all_ids == 10
    with pytest.raises(DatasetError, match="asked for 11 images but only 10"):
        make_subset(ann_file, tmp_path / "too_many.json", num_images=11)


def test_copies_images_and_protects_existing_files(full, tmp_path):
    image_dir, ann_file = full
    dst = tmp_path / "copied"
    out = tmp_path / "cars.json"
    summary = make_subset(ann_file, out, categories="car", num_images=3, image_dir=image_dir,
                          copy_images_to=dst)
    names = sorted(p.name for p in dst.iterdir())
    assert len(names) == 3 and summary["images_dir"] == dst
    assert all((dst / n).read_bytes() == (image_dir / n).read_bytes() for n in names)
    CocoDetection(dst, out)                           # the copy is a complete dataset

    with pytest.raises(DatasetError, match="cars.json already exists; pass overwrite=True"):
        make_subset(ann_file, out, categories="car", num_images=3)
    (dst / names[0]).write_bytes(b"my edited file")
    with pytest.raises(DatasetError, match=f"1 files in .* differ .*{names[0]}"):
        make_subset(ann_file, tmp_path / "cars2.json", categories="car", num_images=3,
                    image_dir=image_dir, copy_images_to=dst)
    assert not (tmp_path / "cars2.json").exists()
    assert (dst / names[0]).read_bytes() == b"my edited file"   # untouched
    make_subset(ann_file, out, categories="car", num_images=3, image_dir=image_dir,
                copy_images_to=dst, overwrite=True)
    assert (dst / names[0]).read_bytes() == (image_dir / names[0]).read_bytes()


def test_bad_requests(full, tmp_path):
    image_dir, ann_file = full
    with pytest.raises(DatasetError, match="unknown category 'cat'; known names: "
                                           r"\['car', 'dog', 'person'\]"):
        make_subset(ann_file, tmp_path / "x.json", categories=["cat"])
    with pytest.raises(DatasetError, match="unknown category 99"):
        make_subset(ann_file, tmp_path / "x.json", categories=[99])
    with pytest.raises(DatasetError, match="copy_images_to needs image_dir"):
        make_subset(ann_file, tmp_path / "x.json", copy_images_to=tmp_path / "c")
    with pytest.raises(DatasetError, match="out_json is the input file"):
        make_subset(ann_file, ann_file, overwrite=True)
    (image_dir / "000000000004.jpg").unlink()
    with pytest.raises(DatasetError, match=r"000000000004\.jpg \(image id 4\)"):
        make_subset(ann_file, tmp_path / "x.json", categories=["person"], image_dir=image_dir)
    assert not (tmp_path / "x.json").exists()          # nothing written on failure


def test_subset_of_coco128(shared_dir, tmp_path):
    root = shared_dir / "data" / "coco128"
    out = tmp_path / "animals.json"
    summary = make_subset(root / "annotations" / "instances_train2017.json", out,
                          categories=["cat", "dog", "horse"], image_dir=root / "images")
    ds = CocoDetection(root / "images", out, label_map="contiguous")
    assert len(ds) == summary["num_images"] > 0
    assert ds.category_map.names == ("cat", "dog", "horse")
    assert all(len(ds.load(i)[1]["labels"]) > 0 for i in range(len(ds)))
