"""The user's path on real-looking data: a run on images of different sizes, then eval,
predict and the Python API; COCO results files that pycocotools loads; run folders that
move; the files a run leaves (final_metrics.json, run.json after a resume).

One small run (tiny preset, 2 epochs on 8 padded shapes images of four sizes) serves
every test of this module.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from minidetr.cli import main
from minidetr.data import generate_shapes_dataset
from minidetr.inference import Detections, Detector

CANVASES = [(64, 64), (64, 88), (80, 64), (72, 76)]      # (h, w): a batch is always padded


def _mixed_size_copy(src, dst):
    """The shapes dataset at ``src`` with every image placed on a bigger canvas of one of
    four sizes (top-left, so the boxes do not move); the shapes folder layout."""
    for split in ("train", "val"):
        ann = json.loads((src / "annotations" / f"instances_{split}.json").read_text())
        (dst / split).mkdir(parents=True)
        for k, image in enumerate(ann["images"]):
            h, w = CANVASES[k % len(CANVASES)]
            canvas = Image.new("RGB", (w, h), (90, 90, 90))
            canvas.paste(Image.open(src / split / image["file_name"]), (0, 0))
            canvas.save(dst / split / image["file_name"], quality=95)
            image.update(height=h, width=w)
        (dst / "annotations").mkdir(exist_ok=True)
        (dst / "annotations" / f"instances_{split}.json").write_text(json.dumps(ann))
    return dst


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    shapes = generate_shapes_dataset(root / "shapes", num_train=8, num_val=6,
                                     image_size=(64, 64), seed=0)
    data = _mixed_size_copy(shapes.root, root / "data")
    code = main(["train", "--data", str(data), "--out", str(root / "run"), "--epochs", "2",
                 "--batch-size", "4", "--max-size", "96", "--num-workers", "0",
                 "--lr-drop", "2", "--no-progress", "--device", "cpu"])
    assert code == 0, "the fixture run failed"
    return root


def test_train_writes_final_metrics_and_absolute_data_paths(run):
    final = json.loads((run / "run" / "final_metrics.json").read_text())
    history = [json.loads(line) for line in (run / "run" / "metrics.jsonl").read_text().splitlines()]
    assert final["AP"] == history[-1]["AP"], "final_metrics.json is not the last evaluation"
    info = json.loads((run / "run" / "run.json").read_text())
    assert all(p.startswith("/") for p in info["data"].values()), info["data"]
    assert info["data_relative_to_run"]["val_images"] == "../data/val"
    # the tiny preset's recipe, not the ResNet-50 one
    assert (info["train_config"]["lr"], info["train_config"]["batch_size"]) == (5e-4, 4)


@pytest.mark.parametrize("batch_size", ["1", "3"])
def test_eval_reproduces_the_logged_ap_at_any_batch_size(run, batch_size, capsys, tmp_path):
    out = tmp_path / f"dets{batch_size}.json"
    assert main(["eval", str(run / "run"), "--batch-size", batch_size, "--no-progress",
                 "--save-detections", str(out)]) == 0
    text = capsys.readouterr().out
    assert "(reproduced)" in text, f"eval at batch {batch_size} did not reproduce:\n{text}"
    results = json.loads(out.read_text())
    assert results and set(results[0]) == {"image_id", "category_id", "bbox", "score"}


def test_saved_detections_load_in_pycocotools_and_do_not_depend_on_the_batch(run, tmp_path):
    from pycocotools.coco import COCO

    files = []
    for bs in ("1", "4"):
        files.append(tmp_path / f"d{bs}.json")
        assert main(["eval", str(run / "run"), "--batch-size", bs, "--no-progress",
                     "--save-detections", str(files[-1])]) == 0
    gt = COCO(str(run / "data" / "annotations" / "instances_val.json"))
    one, four = (gt.loadRes(str(f)) for f in files)
    assert len(one.anns) == len(four.anns) > 0
    a = np.array([one.anns[i]["bbox"] + [one.anns[i]["score"]] for i in sorted(one.anns)])
    b = np.array([four.anns[i]["bbox"] + [four.anns[i]["score"]] for i in sorted(four.anns)])
    np.testing.assert_allclose(a, b, atol=1e-3, err_msg="detections differ between batch "
                               "sizes 1 and 4")


def test_the_python_api(run):
    detector = Detector.from_checkpoint(run / "run", device="cpu")
    assert detector.checkpoint.path.name == "best.npz"          # a run folder: best.npz
    image_path = sorted((run / "data" / "val").glob("*.jpg"))[1]  # a 64 x 88 canvas
    found = detector.predict(image_path, threshold=0.0)
    assert isinstance(found, Detections) and len(found) > 0
    h, w = found.image_size
    assert (h, w) == (64, 88)
    assert found.boxes.min() >= 0 and found.boxes[:, [0, 2]].max() <= w \
        and found.boxes[:, [1, 3]].max() <= h, "boxes are not clipped to the image"
    assert set(found.names) <= {"circle", "square", "triangle", "cross", "star"}
    assert np.all(np.diff(found.scores) <= 0)
    # the same image as a PIL image, and in a list with others: the same detections
    same = detector.predict(Image.open(image_path), threshold=0.0)
    np.testing.assert_allclose(same.scores, found.scores, atol=1e-6)
    listed = detector.predict(sorted((run / "data" / "val").glob("*.jpg"))[:3],
                              threshold=0.0, batch_size=3)
    np.testing.assert_allclose(listed[1].boxes, found.boxes, atol=1e-3)
    high = detector.predict(image_path, threshold=float(found.scores[0]) + 1e-6)
    assert len(high) == 0
    records = found.to_coco(image_id=7)
    assert records[0]["image_id"] == 7 and len(records[0]["bbox"]) == 4


def test_predict_a_folder_with_bad_files_json_and_batches(run, tmp_path, capsys):
    from pycocotools.coco import COCO

    folder = tmp_path / "images"
    shutil.copytree(run / "data" / "val", folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    ann = run / "data" / "annotations" / "instances_val.json"
    code = main(["predict", str(run / "run"), str(folder), "--out", str(tmp_path / "out"),
                 "--json", str(tmp_path / "results.json"), "--ann", str(ann),
                 "--batch-size", "4", "--threshold", "0.0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 2, "a skipped image must make the exit status non-zero"
    assert "Traceback" not in captured.err
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped:")]
    assert len(skipped) == 2 and any("broken.jpg" in s for s in skipped) \
        and any("empty.png" in s for s in skipped), captured.err
    assert "6 of 8 images done" in captured.err and "2 skipped" in captured.err
    assert len(list((tmp_path / "out").glob("*.jpg"))) == 6       # the good ones all written
    results = COCO(str(ann)).loadRes(str(tmp_path / "results.json"))
    assert len({a["image_id"] for a in results.anns.values()}) == 6


def test_a_run_folder_moved_with_its_data_still_evaluates(run, tmp_path, capsys):
    moved = tmp_path / "moved"
    shutil.copytree(run / "run", moved / "run")
    shutil.copytree(run / "data", moved / "data")
    shutil.move(str(run / "data"), str(tmp_path / "away"))      # the old place is gone
    try:
        assert main(["eval", str(moved / "run"), "--no-progress"]) == 0
        assert "(reproduced)" in capsys.readouterr().out
        shutil.rmtree(moved / "data")                             # now the data is nowhere
        assert main(["eval", str(moved / "run"), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "is not where it was" in err and "--data" in err and "Traceback" not in err
    finally:
        shutil.move(str(tmp_path / "away"), str(run / "data"))


def test_resume_updates_run_json(run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(run / "run", copy)
    assert main(["train", "--resume", str(copy), "--epochs", "3", "--no-progress",
                 "--device", "cpu"]) == 0
    info = json.loads((copy / "run.json").read_text())
    assert info["train_config"]["epochs"] == 3, "run.json still holds the old epochs"
    assert [r["from_epoch"] for r in info["resumed"]] == [2]
    history = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert json.loads((copy / "final_metrics.json").read_text())["AP"] == history[-1]["AP"]
