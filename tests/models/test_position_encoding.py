"""Tests of the sine position embedding (minidetr/models/position_encoding.py).

The reference is a direct loop over (image, row, column, channel) that follows the
official formula step by step in float32 scalar arithmetic (so that the huge arguments at
padded positions are rounded exactly as the official code rounds them) and evaluates sin
and cos in float64. A few values are also hard-coded from the official PyTorch code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.models.position_encoding import PositionEmbeddingSine, sine_position_embedding
from minidetr.testing import assert_allclose

f32 = np.float32


def reference_embedding(mask, num_pos_feats, temperature=10000, normalize=True,
                        scale=2 * math.pi, eps=1e-6):
    """The formula, one scalar at a time (float32 arguments, float64 sin/cos)."""
    B, H, W = mask.shape
    F = num_pos_feats
    out = np.zeros((B, 2 * F, H, W))
    valid = ~mask
    for b in range(B):
        for i in range(H):
            for j in range(W):
                # running counts of valid pixels (1-based) and the valid extents
                y, x = f32(valid[b, :i + 1, j].sum()), f32(valid[b, i, :j + 1].sum())
                h, w = f32(valid[b, :, j].sum()), f32(valid[b, i, :].sum())
                if normalize:
                    y = (y - f32(0.5)) / (h + f32(eps)) * f32(scale)
                    x = (x - f32(0.5)) / (w + f32(eps)) * f32(scale)
                for k in range(F):
                    dim_t = f32(temperature ** (2 * (k // 2) / F))
                    trig = math.sin if k % 2 == 0 else math.cos
                    out[b, k, i, j] = trig(float(y / dim_t))
                    out[b, F + k, i, j] = trig(float(x / dim_t))
    return out


def padded_mask(xp):
    """3 images 5x7: unpadded; padded below and right (valid 3x4); padded right (valid 5x2)."""
    mask = np.zeros((3, 5, 7), dtype=bool)
    mask[1, 3:] = True
    mask[1, :, 4:] = True
    mask[2, :, 2:] = True
    return xp.asarray(mask)


@pytest.mark.parametrize("num_pos_feats,normalize", [(16, True), (128, True), (6, False)])
def test_matches_reference_loop(xp, num_pos_feats, normalize):
    mask = padded_mask(xp)
    got = sine_position_embedding(mask, num_pos_feats, normalize=normalize)
    want = reference_embedding(to_numpy(mask), num_pos_feats, normalize=normalize)
    pad = np.broadcast_to(to_numpy(mask)[:, None], want.shape)
    assert_allclose(to_numpy(got)[~pad], want[~pad], atol=1e-6, what="valid positions")
    assert_allclose(to_numpy(got)[pad], want[pad], atol=1e-6, what="padded positions")


def test_padded_positions_are_huge_arguments():
    """A fully padded row has x-count 0, so x = -0.5 / 1e-6 * 2 pi (official behaviour)."""
    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 2:] = True                                   # rows 2, 3 are padding
    pos = sine_position_embedding(mask, 128)
    arg = (f32(0) - f32(0.5)) / (f32(0) + f32(1e-6)) * f32(2 * math.pi)
    assert abs(float(arg) + 3.1416e6) < 1e2
    assert_allclose(pos[0, 128, 3], np.full(5, math.sin(float(arg))), atol=1e-6,
                    what="channel 128 (x, sin, dim_t = 1) on the padded row")
    assert_allclose(pos[0, 129, 3], np.full(5, math.cos(float(arg))), atol=1e-6,
                    what="channel 129 (x, cos, dim_t = 1) on the padded row")


# Values of the official PyTorch implementation (float32, PyTorch 2.x on CPU) for a 4x5
# mask whose valid part is the top-left 2x3, at channels CHANNELS of four pixels.
CHANNELS = [0, 1, 2, 3, 100, 127, 128, 129, 130, 131, 228, 255]
OFFICIAL = {
    (1, 2): [-1.0, -1.9e-06, -0.8070661, -0.590461, 0.0035338, 0.9999999,
             -0.8660262, 0.4999987, -0.9841623, -0.1772699, 0.0039264, 0.9999998],
    (3, 1): [-1.0, -1.9e-06, -0.8070661, -0.590461, 0.0035338, 0.9999999,
             -0.0962609, 0.9953561, -0.8953991, 0.4452644, 0.3263406, -0.0684365],
    (1, 4): [-0.0962609, 0.9953561, -0.8953991, 0.4452644, 0.3263406, -0.0684365,
             -0.8660262, 0.4999987, -0.9841623, -0.1772699, 0.0039264, 0.9999998],
    (3, 4): [-0.0962609, 0.9953561, -0.8953991, 0.4452644, 0.3263406, -0.0684365,
             -0.0962609, 0.9953561, -0.8953991, 0.4452644, 0.3263406, -0.0684365],
}


@pytest.mark.parametrize("pixel", sorted(OFFICIAL))
def test_matches_official_values(xp, pixel):
    mask = np.zeros((1, 4, 5), dtype=bool)
    mask[0, 2:] = True
    mask[0, :, 3:] = True
    pos = PositionEmbeddingSine(128)(xp.asarray(mask))
    i, j = pixel
    assert_allclose(to_numpy(pos.data)[0, CHANNELS, i, j], np.array(OFFICIAL[pixel]),
                    atol=2e-6, what=f"embedding at pixel {pixel}, channels {CHANNELS}")


def test_shape_dtype_and_no_grad(xp):
    mask = padded_mask(xp)
    module = PositionEmbeddingSine(num_pos_feats=8)
    pos = module(mask)
    assert isinstance(pos, Tensor) and not pos.requires_grad
    assert pos.shape == (3, 16, 5, 7) and pos.dtype == np.float32
    assert type(pos.data) is type(mask)                  # same array module as the mask
    pos64 = module(mask, dtype=np.float64)
    assert pos64.dtype == np.float64
    valid = ~np.broadcast_to(to_numpy(mask)[:, None], pos.shape)
    # (at padded positions the ~3e6 arguments round differently in float32 and float64)
    assert_allclose(to_numpy(pos64.data)[valid], to_numpy(pos.data)[valid], atol=1e-6,
                    what="float64 vs float32 embedding at valid positions")
    assert module.state_dict() == {} and list(module.parameters()) == []


def test_sine_cosine_pairs_share_a_frequency():
    """Channels 2k (sin) and 2k+1 (cos) encode the same argument: sin^2 + cos^2 = 1."""
    pos = sine_position_embedding(padded_mask(np), 16, dtype=np.float64)
    for block in (pos[:, :16], pos[:, 16:]):
        assert_allclose(block[:, 0::2] ** 2 + block[:, 1::2] ** 2, np.ones((3, 8, 5, 7)),
                        atol=1e-12, what="sin^2 + cos^2 per channel pair")


def test_y_block_depends_on_rows_x_block_on_columns():
    pos = sine_position_embedding(np.zeros((1, 4, 6), dtype=bool), 8)
    y, x = pos[0, :8], pos[0, 8:]
    assert np.all(y == y[:, :, :1]) and not np.all(y == y[:, :1, :])
    assert np.all(x == x[:, :1, :]) and not np.all(x == x[:, :, :1])


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="bool"):
        sine_position_embedding(np.zeros((1, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        sine_position_embedding(np.zeros((2, 2), dtype=bool))
    with pytest.raises(ValueError, match="even"):
        sine_position_embedding(np.zeros((1, 2, 2), dtype=bool), num_pos_feats=5)
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(normalize=False, scale=1.0)
