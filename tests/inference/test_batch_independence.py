"""An image gets the same detections alone and in a zero-padded batch (mask-aware norm).

The ``tiny`` preset sets ``ModelConfig.mask_aware_norm``: the TinyBackbone's and the input
projections' GroupNorms take their statistics over the image only, the padding is zeroed
after every backbone stage and every level's mask is the exact valid region. Then the
batch an image is evaluated in (its size, its neighbours) cannot change its predictions,
so ``eval --batch-size 1`` and ``--batch-size 8`` give the same AP. The official model
(``mask_aware_norm=False``) does depend on the batch; the last test measures that it does.
"""
from types import SimpleNamespace

import numpy as np
import pytest

from minidetr import nn
from minidetr.data import collate
from minidetr.models import build_model, get_config
from minidetr.models.backbone import masked_group_norm
from minidetr.testing import gradcheck

SIZES = [(61, 83), (96, 70), (50, 50), (77, 128)]     # (h, w): every batch gets padded


def _images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(3, h, w)).astype(np.float32) for h, w in SIZES]


def _max_alone_vs_batched(model, images):
    """The largest |difference| of logits and boxes between each image alone and batched."""
    batch = collate([(img, {}) for img in images])
    batched = model(batch.images, batch.mask)
    worst = 0.0
    for b, img in enumerate(images):
        alone = model(img[None], np.zeros((1,) + img.shape[1:], bool))
        for key in ("pred_logits", "pred_boxes"):
            worst = max(worst, float(np.abs(alone[key].data[0] - batched[key].data[b]).max()))
    return worst


@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_tiny_predictions_do_not_depend_on_the_batch(variant):
    model = build_model(get_config("tiny", variant)).eval()
    assert model.mask_aware_norm, "the tiny preset is meant to be mask-aware"
    worst = _max_alone_vs_batched(model, _images())
    assert worst < 1e-5, (f"tiny {variant}: an image's logits/boxes differ by {worst:.2e} "
                          "between alone and in a padded batch")


def test_tiny_with_an_extra_level_does_not_depend_on_the_batch():
    model = build_model(get_config("tiny", "refine", num_feature_levels=4)).eval()
    worst = _max_alone_vs_batched(model, _images(1))
    assert worst < 1e-5, f"tiny with a stride-64 level: alone vs batched differ by {worst:.2e}"


def test_the_official_norm_does_depend_on_the_batch():
    """mask_aware_norm=False (the official input projections, old tiny checkpoints): the
    padding enters the statistics, so the same image scores differently in a batch."""
    model = build_model(get_config("tiny", "plain", mask_aware_norm=False)).eval()
    worst = _max_alone_vs_batched(model, _images())
    assert worst > 1e-3, (f"expected the official model to depend on the padding, but alone "
                          f"and batched differ by only {worst:.2e}")


def test_masked_group_norm_is_group_norm_without_padding():
    rng = np.random.default_rng(0)
    norm = nn.GroupNorm(4, 8)
    norm.weight.data[:] = rng.normal(size=8)
    norm.bias.data[:] = rng.normal(size=8)
    x = rng.normal(size=(2, 8, 5, 7)).astype(np.float32)
    expected = norm(x).data
    got = masked_group_norm(nn.Parameter(x), np.ones((2, 1, 5, 7), np.float32), norm).data
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5,
                               err_msg="masked_group_norm with no padding != GroupNorm")


def test_masked_group_norm_equals_group_norm_of_the_crop_and_zero_padding():
    rng = np.random.default_rng(1)
    norm = nn.GroupNorm(2, 4)
    x = rng.normal(size=(1, 4, 6, 9)).astype(np.float32)
    valid = np.zeros((1, 1, 6, 9), np.float32)
    valid[:, :, :4, :5] = 1
    got = masked_group_norm(nn.Parameter(x), valid, norm).data
    np.testing.assert_allclose(got[:, :, :4, :5], norm(x[:, :, :4, :5]).data, atol=1e-5,
                               err_msg="the valid part is not GroupNorm of the crop")
    assert not got[:, :, 4:].any() and not got[:, :, :, 5:].any(), "padding not zeroed"


def test_masked_group_norm_gradients():
    rng = np.random.default_rng(2)
    valid = np.ones((2, 1, 3, 4))
    valid[1, :, 2:, :] = 0
    valid[1, :, :, 3:] = 0

    def fn(x, weight, bias):      # a GroupNorm-like holder of Tensors (float64)
        return masked_group_norm(x, valid, SimpleNamespace(num_groups=2, eps=1e-5,
                                                           weight=weight, bias=bias))

    gradcheck(fn, [rng.normal(size=(2, 4, 3, 4)), rng.normal(size=4), rng.normal(size=4)],
              name="masked_group_norm")


def test_real_photos_alone_and_in_a_batch(shared_dir):
    """Six coco128 photos of different sizes through the tiny preset's validation resize:
    each one's detections are the same alone as in the padded batch of all six."""
    from minidetr.data import load_rgb_image, make_transforms

    files = sorted((shared_dir / "data" / "coco128" / "images").glob("*.jpg"))[:6]
    transforms = make_transforms("val", "tiny")
    no_boxes = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64)}
    images = [transforms(load_rgb_image(f), dict(no_boxes))[0] for f in files]
    assert len({img.shape for img in images}) > 1, "the photos should differ in size"
    model = build_model(get_config("tiny", "refine", num_classes=80)).eval()
    worst = _max_alone_vs_batched(model, images)
    assert worst < 1e-5, f"coco128 photos: alone vs batched differ by {worst:.2e}"
