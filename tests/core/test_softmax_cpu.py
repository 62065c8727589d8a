"""The fused softmax kernels of minidetr/functional/softmax_cpu.py against the NumPy reference.

Forward and backward against the readable formulas of ``Softmax`` (float32 and float64,
odd shapes, rows of one element, large and NaN inputs); dispatch: only the last axis of
NumPy float32/float64 C-contiguous arrays takes the kernels, and both paths agree and pass
the float64 gradcheck.
"""
from __future__ import annotations

import numpy as np
import pytest

import minidetr.functional as F
from minidetr.autograd import Tensor
from minidetr.functional import softmax_cpu
from minidetr.testing import assert_allclose, gradcheck

TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-15)}


def reference(x, g):
    """Softmax over the last axis and its backward, as activation.Softmax writes them."""
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    y = e / e.sum(axis=-1, keepdims=True)
    return y, y * (g - (g * y).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 7, 3, 16), (5, 1), (3, 101), (1, 4, 2, 9)])
def test_softmax_kernel_matches_reference(dtype, shape):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 4).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    y_ref, gx_ref = reference(x, g)
    y = softmax_cpu.softmax_forward(x)
    gx = softmax_cpu.softmax_backward(g, y)
    assert y.dtype == dtype and gx.dtype == dtype, f"dtypes {y.dtype}, {gx.dtype}, not {dtype}"
    assert_allclose(y, y_ref, **TOL[dtype], what=f"softmax kernel forward {shape}")
    assert_allclose(gx, gx_ref, **TOL[dtype], what=f"softmax kernel backward {shape}")


def test_softmax_kernel_large_values_and_nan():
    x = np.array([[1000.0, 1000.0, -1000.0], [0.0, np.nan, 1.0], [-np.inf, 0.0, 0.0]],
                 dtype=np.float32)
    y = softmax_cpu.softmax_forward(x)
    assert_allclose(y[0], [0.5, 0.5, 0.0], rtol=0, atol=1e-7, what="softmax of large values")
    assert np.isnan(y[1]).all(), f"a NaN in a row makes the row NaN (as NumPy), got {y[1]}"
    assert_allclose(y[2], [0.0, 0.5, 0.5], rtol=0, atol=1e-7, what="softmax with -inf")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("axis", [-1, 1])
def test_softmax_function_same_on_kernel_and_reference_paths(dtype, axis):
    rng = np.random.default_rng(8)
    base = rng.normal(size=(4, 6, 5)).astype(dtype)
    g = rng.normal(size=(6, 4, 5)).astype(dtype)
    outs = []
    for x in (np.ascontiguousarray(base.transpose(1, 0, 2)), base.transpose(1, 0, 2)):
        t = Tensor(x, requires_grad=True)        # contiguous (kernel at axis -1), then a view
        y = F.softmax(t, axis=axis)
        y.backward(g)
        outs.append((y.data, t.grad))
    for name, k, r in zip(("y", "grad_x"), *outs):
        assert_allclose(k, r, **TOL[dtype], what=f"Softmax axis={axis} {name}: contiguous vs view")


@pytest.mark.parametrize("contiguous", [True, False])
def test_softmax_gradcheck_on_both_paths(contiguous):
    x = np.random.default_rng(9).normal(size=(3, 4, 5))

    def fn(x):     # gradcheck copies its inputs C-contiguous: make the view inside
        y = x if contiguous else F.permute(x, (1, 0, 2))
        assert y.data.flags.c_contiguous == contiguous
        return F.softmax(y, axis=-1)
    gradcheck(fn, [x], name=f"softmax contiguous={contiguous}")
