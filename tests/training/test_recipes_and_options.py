"""Honest defaults: each --config brings its recipe, --help prints every default, the
own-data command works with one split, and crowded images are reported."""
from __future__ import annotations

import argparse

import pytest

from minidetr.cli import _data_paths, _warn_about_crowded_images, build_parser, main
from minidetr.training.config import RECIPES, TrainConfig, recipe


def _subparser(name):
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", ["train", "eval", "predict"])
def test_help_prints_every_default(command):
    missing = []
    for action in _subparser(command)._actions:
        if (not action.option_strings or action.nargs == 0 or action.dest == "help"
                or isinstance(action, argparse._StoreTrueAction)):
            continue                          # positional arguments and on/off flags
        if "default" not in (action.help or ""):
            missing.append(action.option_strings[0])
    assert not missing, f"{command} --help shows no default for {missing}"


def test_each_config_brings_its_recipe():
    assert recipe("tiny")["lr"] == 5e-4 and recipe("tiny")["batch_size"] == 8
    official = TrainConfig()
    for name in ("paper", "small"):
        for field, value in RECIPES[name].items():
            assert getattr(official, field) == value, f"{name}.{field} is not official"
    from minidetr.cli import _recipe_help
    assert _recipe_help("lr") == "(default: 2e-4 for paper and small, 5e-4 for tiny)"
    assert _recipe_help("epochs") == "(default 50)"
    with pytest.raises(ValueError, match="no training recipe"):
        recipe("huge")


def test_one_split_is_also_the_validation_split(capsys):
    paths = _data_paths(["ann.json", "images"])
    assert (paths.val_annotations, paths.val_images) == ("ann.json", "images")
    assert "no --val-data" in capsys.readouterr().out


def test_images_with_more_objects_than_queries_are_reported(capsys):
    coco = {"annotations": [{"image_id": 1}] * 5 + [{"image_id": 2}] * 2
            + [{"image_id": 1, "iscrowd": 1}] * 3}
    _warn_about_crowded_images(coco, "a.json", 4)
    out = capsys.readouterr().out
    assert "1 images of a.json hold more objects than the model's 4 queries" in out
    assert "up to 5, image id 1" in out and "--num-queries 5" in out
    _warn_about_crowded_images(coco, "a.json", 5)
    assert capsys.readouterr().out == ""


def test_num_queries_reaches_the_model(tmp_path):
    from minidetr.data import generate_shapes_dataset
    from minidetr.weights.checkpoint import load_checkpoint

    data = generate_shapes_dataset(tmp_path / "d", num_train=2, num_val=1, image_size=(48, 48))
    assert main(["train", "--data", str(data.train_annotations), str(data.train_images),
                 "--out", str(tmp_path / "run"), "--epochs", "1", "--num-queries", "7",
                 "--batch-size", "2", "--max-size", "64", "--num-workers", "0",
                 "--no-progress", "--device", "cpu"]) == 0
    assert load_checkpoint(tmp_path / "run" / "last.npz").model_config["num_queries"] == 7
