"""The Numba max-pooling forward of minidetr/functional/pool_cpu.py against the reference.

Max pooling does not round, so the kernel must equal ``MaxPool2d.reference_forward``
exactly: for the ResNet stem's geometry and others (rectangular kernels, strides larger
and smaller than the kernel, padding on one axis only), float32 and float64, with NaN
propagating as NumPy's ``maximum`` does and -inf kept.
"""
from __future__ import annotations

import numpy as np
import pytest

from minidetr import functional as F
from minidetr.functional import pool_cpu
from minidetr.functional.conv import MaxPool2d
from minidetr.testing import assert_allclose

# (x shape, kernel, stride, padding)
CASES = [((2, 3, 16, 16), (3, 3), (2, 2), (1, 1)),        # the ResNet stem's pooling
         ((1, 2, 9, 7), (2, 2), (2, 2), (0, 0)),
         ((1, 2, 8, 11), (3, 2), (1, 2), (1, 0)),
         ((2, 1, 13, 12), (5, 5), (3, 2), (2, 2)),
         ((1, 1, 1, 1), (1, 1), (1, 1), (0, 0))]


def _equal(got, want, what):
    assert got.shape == want.shape and got.dtype == want.dtype, \
        f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    if not same.all():
        k = np.unravel_index(int(np.argmin(same)), got.shape)
        raise AssertionError(f"{what}: element {k} is {got[k]}, the reference gives {want[k]}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[str(c[1:]) for c in CASES])
def test_kernel_equals_reference(case, dtype):
    shape, kernel, stride, padding = case
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(dtype)
    _equal(pool_cpu.max_pool2d_forward(x, kernel, stride, padding),
           MaxPool2d.reference_forward(x, kernel, stride, padding), f"max pool {case}")


def test_nan_propagates_and_minus_inf_stays():
    x = np.zeros((1, 1, 6, 6), np.float32)
    x[0, 0, 2, 3] = np.nan
    x[0, 0, 4:, 4:] = -np.inf
    args = ((3, 3), (2, 2), (1, 1))
    got = pool_cpu.max_pool2d_forward(x, *args)
    _equal(got, MaxPool2d.reference_forward(x, *args), "NaN and -inf")
    assert np.isnan(got[0, 0, 1, 1]) and np.isnan(got[0, 0, 1, 2]), "a NaN in the window wins"


def test_max_pool2d_takes_the_kernel_for_numpy_and_the_reference_for_views(rng):
    x = rng.normal(size=(2, 3, 10, 10)).astype(np.float32)
    strided = x[:, :, ::1, ::-1]                                   # not C-contiguous
    want = MaxPool2d.reference_forward(strided, (3, 3), (2, 2), (1, 1))
    assert_allclose(F.max_pool2d(strided, 3, 2, 1), want, rtol=0, atol=0, what="strided view")
    want = MaxPool2d.reference_forward(x, (3, 3), (2, 2), (1, 1))
    assert_allclose(F.max_pool2d(x, 3, 2, 1), want, rtol=0, atol=0, what="contiguous")
