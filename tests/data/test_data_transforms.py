"""Detection transforms: the official resize rule, boxes that follow the pixels, presets."""
from __future__ import annotations

import random

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from minidetr.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, PRESETS, Compose,
                                      RandomHorizontalFlip, RandomResize, RandomSelect,
                                      RandomSizeCrop, Resize, crop, hflip, make_transforms, resize,
                                      resize_size, to_normalized_array)


def _target(boxes, labels=None):
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.arange(len(boxes), dtype=np.int64) if labels is None else np.asarray(labels)
    return {"image_id": 1, "boxes": boxes, "labels": labels,
            "orig_size": np.array([0, 0]), "size": np.array([0, 0])}


# --------------------------------------------------------------------------- resize rule
@pytest.mark.parametrize("hw, size, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1066)),     # the facts sheet's example (640x480 -> 1066x800)
    ((640, 480), 800, 1333, (1066, 800)),     # portrait
    ((500, 2000), 800, 1333, (333, 1332)),    # long side capped: size = round(1333*500/2000)
    ((800, 1000), 800, 1333, (800, 1000)),    # short side already 800: unchanged
    ((300, 300), 128, None, (128, 128)),
    ((427, 640), 600, None, (600, 899)),      # crop branch resize, no cap: int(600*640/427)
])
def test_resize_size_known_values(hw, size, max_size, expected):
    assert resize_size(*hw, size, max_size) == expected


@given(h=st.integers(8, 3000), w=st.integers(8, 3000), size=st.integers(8, 900),
       max_size=st.one_of(st.none(), st.integers(900, 2000)))
def test_resize_size_properties(h, w, size, max_size):
    oh, ow = resize_size(h, w, size, max_size)
    short, long = min(h, w), max(h, w)
    o_short, o_long = (oh, ow) if h <= w else (ow, oh)
    if (o_short, o_long) != (short, long):
        target = size
        if max_size is not None and long / short * size > max_size:
            target = int(round(max_size * short / long))
        assert o_short == target, (h, w, size, max_size, oh, ow)
    # the aspect ratio is kept up to the rounding down of the long side
    assert 0 <= o_short * long / short - o_long < 1 + 1e-9
    if max_size is not None:   # the cap holds up to the rounding of the short side
        assert o_long <= max_size + 0.5 * long / short + 1


# --------------------------------------------------------------------------- functional
def test_hflip_known_boxes_and_involution():
    image = Image.new("RGB", (10, 4))
    t = _target([[1, 0, 3, 2], [0, 1, 10, 4]])
    _, f = hflip(image, t)
    np.testing.assert_array_equal(f["boxes"], [[7, 0, 9, 2], [0, 1, 10, 4]])
    _, ff = hflip(image, f)
    np.testing.assert_array_equal(ff["boxes"], t["boxes"])


def test_resize_scales_boxes_per_axis():
    image = Image.new("RGB", (40, 20))                     # W=40, H=20
    img2, t2 = resize(image, _target([[4, 2, 20, 10]]), (30, 120))
    assert img2.size == (120, 30)
    np.testing.assert_allclose(t2["boxes"], [[12, 3, 60, 15]])
    np.testing.assert_array_equal(t2["size"], [30, 120])


def test_crop_moves_clips_and_drops_boxes():
    image = Image.new("RGB", (50, 40))
    t = _target([[10, 10, 30, 30],     # partly inside
                 [40, 0, 50, 5],       # outside the region: dropped with its label
                 [12, 20, 14, 22]],    # fully inside
                labels=[5, 6, 7])
    img2, t2 = crop(image, t, top=15, left=5, height=20, width=20)
    assert img2.size == (20, 20)
    np.testing.assert_allclose(t2["boxes"], [[5, 0, 20, 15], [7, 5, 9, 7]])
    np.testing.assert_array_equal(t2["labels"], [5, 7])
    np.testing.assert_array_equal(t2["size"], [20, 20])


def test_normalize_matches_direct_formula():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(2, 3, 3), dtype=np.uint8)     # (H, W, 3)
    image = Image.fromarray(pixels)
    array, t = to_normalized_array(image, _target([[0, 0, 3, 2], [1, 0.5, 2, 1.5]]))
    assert array.dtype == np.float32 and array.shape == (3, 2, 3)
    expected = ((pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD))
    np.testing.assert_allclose(array, expected.transpose(2, 0, 1), rtol=1e-6, atol=1e-6)
    # cxcywh normalised by (W, H) = (3, 2)
    np.testing.assert_allclose(t["boxes"], [[0.5, 0.5, 1, 1], [0.5, 0.5, 1 / 3, 0.5]])
    assert t["boxes"].dtype == np.float32


# --------------------------------------------------------------------------- rng rules
def test_random_transforms_require_a_generator():
    image, t = Image.new("RGB", (20, 20)), _target([[0, 0, 5, 5]])
    for transform in (RandomHorizontalFlip(0.5), RandomResize([8, 10]), RandomSizeCrop(5, 10),
                      RandomSelect(Resize(8), Resize(10))):
        with pytest.raises(ValueError, match="numpy Generator"):
            transform(image, t, None)
    # deterministic ones do not need one
    Resize(8)(image, t, None)
    RandomResize([8])(image, t, None)
    make_transforms("val", "tiny")(image, t)


def test_same_generator_state_same_result_and_no_global_rng():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 90, 3), np.uint8))
    t = _target([[10, 10, 50, 40], [60, 5, 85, 55]])
    pipeline = make_transforms("train", "tiny")
    np_state, py_state = np.random.get_state(), random.getstate()
    a = pipeline(image, t, np.random.default_rng(7))
    b = pipeline(image, t, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1]["boxes"], b[1]["boxes"])
    # the global generators are untouched
    assert np.random.get_state()[1].tolist() == np_state[1].tolist()
    assert random.getstate() == py_state
    # and different states give different augmentations somewhere
    shapes = {pipeline(image, t, np.random.default_rng(s))[0].shape for s in range(20)}
    assert len(shapes) > 1


def test_transforms_do_not_modify_their_input():
    image = Image.new("RGB", (90, 60))
    t = _target([[10, 10, 50, 40], [60, 5, 85, 55]])
    before = {k: np.copy(v) for k, v in t.items()}
    pipeline = make_transforms("train", "tiny")
    for s in range(10):
        pipeline(image, t, np.random.default_rng(s))
    for k, v in before.items():
        np.testing.assert_array_equal(t[k], v, err_msg=f"target[{k!r}] was modified")


# --------------------------------------------------------------------------- boxes follow pixels
def _two_rectangles():
    """A black 60x90 image with a red and a blue rectangle; boxes are their exact extents."""
    pixels = np.zeros((60, 90, 3), np.uint8)
    pixels[8:30, 5:40] = (255, 0, 0)           # label 0: rows 8..29, cols 5..39
    pixels[25:58, 55:88] = (0, 0, 255)         # label 1
    boxes = [[5, 8, 40, 30], [55, 25, 88, 58]]  # xyxy, pixel edges
    return Image.fromarray(pixels), _target(boxes, labels=[0, 1])


@pytest.mark.parametrize("seed", range(16))
def test_boxes_follow_pixels_through_the_training_pipeline(seed):
    """After flip/resize/crop/normalise, each box is where its colour is (±1.5 px)."""
    image, t = _two_rectangles()
    pipeline = make_transforms("train", "tiny", scales=(40, 50, 70), max_size=120,
                               crop=((45, 60), (20, 40)))
    array, out = pipeline(image, t, np.random.default_rng(seed))
    H, W = array.shape[1:]
    np.testing.assert_array_equal(out["size"], [H, W])
    rgb = array.transpose(1, 2, 0) * np.array(IMAGENET_STD) + np.array(IMAGENET_MEAN)
    masks = {0: (rgb[..., 0] > 0.5) & (rgb[..., 2] < 0.5), 1: (rgb[..., 2] > 0.5)}
    cx, cy, w, h = out["boxes"].T * np.array([[W], [H], [W], [H]])
    present = set(out["labels"].tolist())
    for label, mask in masks.items():
        if label not in present:
            assert mask.sum() <= 2, f"label {label} dropped but its pixels are visible"
            continue
        k = out["labels"].tolist().index(label)
        if min(w[k], h[k]) < 1:   # a sliver left by the crop (kept, as in the official code)
            assert mask.sum() <= 2 * max(H, W)
            continue
        ys, xs = np.nonzero(mask)
        found = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        box = np.array([cx[k] - w[k] / 2, cy[k] - h[k] / 2, cx[k] + w[k] / 2, cy[k] + h[k] / 2])
        assert np.abs(found - box).max() <= 1.5, (seed, label, found, box)
    assert np.all(out["boxes"] >= 0) and np.all(out["boxes"] <= 1)


# --------------------------------------------------------------------------- presets
def test_paper_preset_is_the_official_recipe():
    p = PRESETS["paper"]
    assert p.scales == (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
    assert (p.max_size, p.crop_resize, p.crop_size, p.val_size) == (1333, (400, 500, 600),
                                                                    (384, 600), 800)
    train = make_transforms("train", "paper")
    flip, select, norm = train.transforms
    assert isinstance(flip, RandomHorizontalFlip) and flip.p == 0.5
    assert isinstance(select, RandomSelect) and select.p == 0.5
    assert select.first.sizes == list(p.scales) and select.first.max_size == 1333
    resize_a, crop_t, resize_b = select.second.transforms
    assert resize_a.sizes == [400, 500, 600] and resize_a.max_size is None
    assert (crop_t.min_size, crop_t.max_size) == (384, 600)
    assert resize_b.sizes == list(p.scales) and resize_b.max_size == 1333
    val = make_transforms("val", "paper")
    assert (val.transforms[0].size, val.transforms[0].max_size) == (800, 1333)


def test_paper_pipeline_output_sizes_follow_the_rule():
    image = Image.new("RGB", (640, 480))
    t = _target([[10, 10, 600, 400]])
    pipeline = make_transforms("train", "paper")
    for s in range(6):
        array, out = pipeline(image, t, np.random.default_rng(s))
        H, W = array.shape[1:]
        assert min(H, W) in PRESETS["paper"].scales or max(H, W) >= 1332, (H, W)
        assert max(H, W) <= 1333


def test_make_transforms_options_and_errors():
    no_crop = make_transforms("train", "small", crop=False)
    assert isinstance(no_crop.transforms[1], RandomResize)
    custom = make_transforms("train", "small", crop=((100, 120), (90, 110)), scales=(96, 128))
    assert custom.transforms[1].second.transforms[1].min_size == 90
    assert custom.transforms[1].first.sizes == [96, 128]
    assert isinstance(make_transforms("val", "tiny", val_size=96), Compose)
    with pytest.raises(ValueError, match="preset"):
        make_transforms("train", "huge")
    with pytest.raises(ValueError, match="split"):
        make_transforms("test", "tiny")
    with pytest.raises(ValueError, match="crop"):
        make_transforms("train", "tiny", crop=(1, 2, 3))
