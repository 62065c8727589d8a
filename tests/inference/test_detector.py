"""Detector: a checkpoint's model, its classes and its validation transforms, run on images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from minidetr.data import CategoryMap
from minidetr.inference import Detector, model_config_of, validation_transforms
from minidetr.models.build import build_model
from minidetr.weights.checkpoint import (Checkpoint, CheckpointError, load_checkpoint,
                                         save_checkpoint)


@pytest.fixture
def checkpoint(tmp_path, small_config):
    cfg = small_config("refine", num_classes=3)
    categories = CategoryMap([{"id": 1, "name": "cat"}, {"id": 5, "name": "dog"},
                              {"id": 9, "name": "bus"}], "contiguous")
    ckpt = Checkpoint(model_state=build_model(cfg).state_dict(), model_config=cfg.to_dict(),
                      train_config={"transforms": "tiny", "val_size": 64, "max_size": 96},
                      category_map=categories.to_dict())
    return save_checkpoint(tmp_path / "run" / "last.npz", ckpt), cfg


def test_from_checkpoint_builds_the_recorded_model_with_its_classes(checkpoint):
    path, cfg = checkpoint
    detector = Detector.from_checkpoint(path.parent, device="cpu")      # a run folder
    assert detector.config == cfg and detector.device == "cpu"
    assert not detector.model.training
    assert [detector.class_name(i) for i in range(3)] == ["cat", "dog", "bus"]
    assert "refine" in repr(detector) and "3 classes" in repr(detector)


def test_predict_image_gives_boxes_in_pixels_of_the_image(checkpoint):
    detector = Detector.from_checkpoint(checkpoint[0], device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 120, 3), np.uint8))
    det = detector.predict_image(image)
    cfg = detector.config
    k = min(cfg.num_select, cfg.num_queries * cfg.num_classes)       # top-k over (query, class)
    assert det["scores"].shape == (k,) and det["labels"].shape == (k,)
    assert det["boxes"].shape == (k, 4)
    assert np.all(np.diff(det["scores"]) <= 0)                       # best first
    x0, y0, x1, y1 = det["boxes"].T
    assert np.all(x0 <= x1) and np.all(y0 <= y1)
    assert x1.max() <= 120 * 1.5 and y1.max() <= 50 * 1.5             # pixels of the input


def test_another_variant_or_preset_on_request(checkpoint):
    ckpt = load_checkpoint(checkpoint[0])
    assert model_config_of(ckpt, variant="plain").variant == "plain"
    paper = model_config_of(ckpt, config="paper")
    assert paper.backbone == "resnet50" and paper.num_classes == 3 and paper.variant == "refine"


def test_a_checkpoint_without_a_model_config_needs_one(tmp_path):
    ckpt = Checkpoint(model_state={"x": np.zeros(1, np.float32)}, path=tmp_path / "c.npz")
    with pytest.raises(CheckpointError, match="does not say which model.*--config and --variant"):
        model_config_of(ckpt)
    assert model_config_of(ckpt, variant="two-stage").backbone == "resnet50"
    assert Detector(None, None, None, Checkpoint({}), None, None).class_name(4) == "class 4"


def test_validation_transforms_default_to_the_paper_sizes():
    image = Image.new("RGB", (640, 480))
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
              "orig_size": np.array([480, 640]), "size": np.array([480, 640])}
    pixels, _ = validation_transforms(None)(image, target)
    assert pixels.shape == (3, 800, 1066)
    pixels, _ = validation_transforms({"transforms": "tiny", "val_size": 64})(image, target)
    assert pixels.shape[1] == 64
