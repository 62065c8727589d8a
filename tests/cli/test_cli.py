"""The command line: every subcommand's --help, the quick demo end to end, eval and predict
on its checkpoint, and clear messages (exit status 2) for bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minidetr.backend import cupy_available
from minidetr.cli import build_parser, main
from minidetr.training.evaluation import METRIC_NAMES

pytestmark = pytest.mark.xdist_group("cli")     # one quick demo per worker

SUBCOMMANDS = ("demo", "train", "eval", "predict", "subset", "bench", "convert-checkpoint")


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m minidetr " + command)


def test_common_options_are_there():
    parser = build_parser()
    args = parser.parse_args(["train", "--device", "cpu", "--config", "small", "--variant",
                              "two-stage", "--data", "a.json", "imgs", "--val-data", "b.json",
                              "vimgs", "--out", "o", "--epochs", "3"])
    assert (args.device, args.config, args.variant, args.data, args.out, args.epochs) == \
        ("cpu", "small", "two-stage", ["a.json", "imgs"], "o", 3)
    assert parser.parse_args(["train", "--resume", "runs/x"]).resume == "runs/x"
    assert parser.parse_args(["train", "--resume"]).resume is True


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """``demo --quick`` in a temporary folder (data and run), run once for this module."""
    root = tmp_path_factory.mktemp("cli")
    code = main(["demo", "--quick", "--out", str(root / "run"), "--data-dir",
                 str(root / "data"), "--no-progress", "--device", "cpu"])
    return code, root


def test_demo_quick_end_to_end(quick_demo, capsys):
    code, root = quick_demo
    assert code == 0
    run = root / "run"
    final = json.loads((run / "final_metrics.json").read_text())
    assert list(final) == list(METRIC_NAMES)
    assert all(-1.0 <= v <= 1.0 for v in final.values())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) for h in history)
    for name in ("last.npz", "best.npz", "loss.png", "ap.png", "run.json"):
        assert (run / name).is_file(), name
    pictures = sorted((run / "predictions").glob("*.png"))
    assert len(pictures) == 2 and pictures[0].read_bytes()[:4] == b"\x89PNG"

    # a second demo in the same folder reports the finished run instead of retraining
    assert main(["demo", "--quick", "--out", str(run), "--data-dir", str(root / "data"),
                 "--no-progress"]) == 0
    assert "already holds a finished demo" in capsys.readouterr().out


def test_eval_on_the_demo_checkpoint(quick_demo, capsys):
    _, root = quick_demo
    out_json = root / "eval.json"
    assert main(["eval", str(root / "run" / "last.npz"), "--data", str(root / "data"),
                 "--no-progress", "--json", str(out_json)]) == 0
    metrics = json.loads(out_json.read_text())
    assert set(METRIC_NAMES) <= set(metrics)
    final = json.loads((root / "run" / "final_metrics.json").read_text())
    for name in METRIC_NAMES:                # same model, same images: same numbers
        assert metrics[name] == pytest.approx(final[name]), name
    assert "COCO box metrics" in capsys.readouterr().out
    # the run folder alone is enough (the checkpoint records its validation data)
    assert main(["eval", str(root / "run"), "--no-progress", "--max-images", "2"]) == 0
    # and the metrics file is not overwritten without --overwrite
    assert main(["eval", str(root / "run"), "--no-progress", "--json", str(out_json)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_predict_draws_pictures_and_prints_detections(quick_demo, capsys):
    _, root = quick_demo
    images = sorted((root / "data" / "val").glob("*.jpg"))[:2]
    out = root / "pred"
    assert main(["predict", str(root / "run"), *map(str, images), "--out", str(out),
                 "--threshold", "0.0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for image in images:
        jpg = out / f"{image.stem}.jpg"                   # JPEG by default
        assert jpg.read_bytes()[:3] == b"\xff\xd8\xff", f"{jpg} is not a JPEG"
        assert f"{image}:" in text
    assert main(["predict", str(root / "run"), str(images[0]), "--out", str(out),
                 "--format", "png", "--no-progress"]) == 0
    assert (out / f"{images[0].stem}.png").read_bytes()[:4] == b"\x89PNG"
    # threshold 0: every kept detection is printed with a class name of the shapes data
    assert any(name in text for name in ("circle", "square", "triangle", "cross", "star"))
    assert main(["predict", str(root / "run"), str(images[0]), "--out", str(out)]) == 2
    assert "already exist" in capsys.readouterr().err


def test_checkpoint_of_another_variant_lists_the_keys(quick_demo, capsys):
    _, root = quick_demo
    code = main(["eval", str(root / "run"), "--config", "tiny", "--variant", "refine",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "does not fit this model" in err and "missing keys" in err
    assert "transformer.decoder.bbox_embed.0.layers.0.weight" in err


def test_resume_of_a_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "does not exist" in err and "Traceback" not in err


def test_train_refuses_to_overwrite_a_run(quick_demo, capsys):
    _, root = quick_demo
    before = (root / "run" / "last.npz").read_bytes()
    code = main(["train", "--data", str(root / "data"), "--out", str(root / "run"),
                 "--epochs", "1", "--no-progress"])
    assert code == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (root / "run" / "last.npz").read_bytes() == before


@pytest.mark.skipif(cupy_available(), reason="a GPU is present, so --device cuda works")
def test_device_cuda_without_a_gpu_says_why(quick_demo, capsys):
    _, root = quick_demo
    assert main(["eval", str(root / "run"), "--device", "cuda", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "use --device cpu" in err


def test_convert_checkpoint_of_a_missing_file_says_so(tmp_path, capsys):
    """No torch is needed any more; a missing file is one clear line, and nothing is written."""
    assert main(["convert-checkpoint", str(tmp_path / "r50.pth"), str(tmp_path / "r50.npz")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "r50.pth" in err and "Traceback" not in err
    assert not (tmp_path / "r50.npz").exists()


def test_subset_writes_a_smaller_coco_file(quick_demo, capsys):
    _, root = quick_demo
    out = root / "subset.json"
    assert main(["subset", str(root / "data" / "annotations" / "instances_train.json"),
                 str(out), "--categories", "circle,square", "--num-images", "5"]) == 0
    data = json.loads(out.read_text())
    assert len(data["images"]) == 5
    assert {c["name"] for c in data["categories"]} == {"circle", "square"}
    assert "5 images" in capsys.readouterr().out
    assert main(["subset", str(root / "data" / "annotations" / "instances_train.json"),
                 str(out)]) == 2
