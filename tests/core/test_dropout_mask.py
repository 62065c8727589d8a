"""Dropout's NumPy mask (minidetr/functional/random.py): one uint32 per element from the
Generator's bit generator, kept where u >= round(p 2^32), made in the array's dtype."""
from __future__ import annotations

import numpy as np
import pytest

import minidetr.functional as F
from minidetr.functional.random import _keep_mask_numpy


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5, 7), (2, 1, 4)])
def test_mask_is_the_documented_stream(dtype, shape):
    p = 0.3
    mask = _keep_mask_numpy(np.random.default_rng(11), shape, p, np.dtype(dtype))
    n = int(np.prod(shape))
    bits = np.random.default_rng(11).bit_generator.random_raw((n + 1) // 2).view(np.uint32)[:n]
    expected = np.where(bits >= np.uint32(round(p * 2**32)), dtype(1 / (1 - p)), dtype(0))
    assert mask.dtype == dtype, f"mask dtype {mask.dtype}, expected {np.dtype(dtype)}"
    differ = np.flatnonzero(mask.ravel() != expected)
    assert not len(differ), (f"mask differs from the documented stream at {len(differ)} "
                             f"elements, first at flat index {differ[:1]}")


def test_keep_rate_and_values():
    p = 0.1
    mask = _keep_mask_numpy(np.random.default_rng(0), (1000, 1000), p, np.dtype(np.float32))
    kept = mask > 0
    assert abs(kept.mean() - (1 - p)) < 2e-3, f"keep rate {kept.mean()}, expected {1 - p}"
    assert np.all(mask[kept] == np.float32(1 / (1 - p))), "kept elements must be 1/(1-p)"


def test_same_generator_state_same_mask_and_the_state_advances():
    x = np.ones((33, 17), np.float32)
    a = F.dropout(x, 0.5, True, np.random.default_rng(5)).data
    b = F.dropout(x, 0.5, True, np.random.default_rng(5)).data
    assert np.array_equal(a, b), "the same seed must give the same mask"
    rng = np.random.default_rng(5)
    c, d = (F.dropout(x, 0.5, True, rng).data for _ in range(2))
    assert not np.array_equal(c, d), "consecutive draws from one Generator must differ"


def test_p_close_to_one_drops_everything_without_overflow():
    mask = _keep_mask_numpy(np.random.default_rng(1), (1000,), 1 - 1e-12, np.dtype(np.float64))
    assert not mask.any(), f"{int((mask > 0).sum())} elements kept with p = 1 - 1e-12"
