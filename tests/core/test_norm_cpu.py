"""The fused Numba kernels of minidetr/functional/norm_cpu.py against the NumPy reference.

* layer norm forward and backward against ``_standardize`` / ``_standardize_backward`` and
  the affine map of :mod:`minidetr.functional.norm` (float32 and float64, odd shapes,
  without weight or bias);
* weight/bias gradients do not depend on the number of threads (fixed row blocks);
* frozen batch norm's per-channel multiply-add is bit-identical to NumPy's;
* dispatch: only NumPy float32/float64 C-contiguous arrays take the kernels; a strided view
  takes the reference and gives the same values; float64 gradchecks on both paths.
"""
from __future__ import annotations

import numba
import numpy as np
import pytest

import minidetr.functional as F
from minidetr.autograd import Tensor
from minidetr.functional import norm, norm_cpu
from minidetr.testing import assert_allclose, gradcheck

TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
SHAPES = [(3, 5, 7), (1, 1), (2, 3, 129), (4, 64)]


def reference_layer_norm(x, w, b, eps, g):
    """Forward and gradients by the readable NumPy code of norm.py."""
    x_hat, rstd = norm._standardize(x, eps)
    y = x_hat * (1 if w is None else w) + (0 if b is None else b)
    gx = norm._standardize_backward(g * (1 if w is None else w), x_hat, rstd)
    axes = tuple(range(x.ndim - 1))
    return y, gx, (g * x_hat).sum(axis=axes), g.sum(axis=axes)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernel_matches_reference(dtype, shape, affine):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 3 + 1).astype(dtype)
    g = rng.normal(size=shape).astype(dtype)
    w = rng.normal(size=shape[-1]).astype(dtype) if affine else None
    b = rng.normal(size=shape[-1]).astype(dtype) if affine else None
    y_ref, gx_ref, gw_ref, gb_ref = reference_layer_norm(x, w, b, 1e-5, g)
    y, mean, rstd = norm_cpu.layer_norm_forward(x, w, b, 1e-5)
    gx, gw, gb = norm_cpu.layer_norm_backward(g, x, w, mean, rstd)
    for name, got, want in [("y", y, y_ref), ("grad_x", gx, gx_ref),
                            ("grad_weight", gw, gw_ref), ("grad_bias", gb, gb_ref)]:
        assert got.dtype == dtype, f"layer norm {name}: dtype {got.dtype}, expected {dtype}"
        assert_allclose(got, want, **TOL[dtype], what=f"layer norm kernel {name} {shape}")


def test_layer_norm_kernel_is_stable_for_a_large_mean():
    # float32 rows with mean 1e4 and std 1: float64 statistics keep x_hat accurate
    rng = np.random.default_rng(1)
    x64 = rng.normal(size=(8, 256)) + 1e4
    x = x64.astype(np.float32)
    y, _, _ = norm_cpu.layer_norm_forward(x, None, None, 1e-5)
    exact = (x.astype(np.float64) - x.astype(np.float64).mean(-1, keepdims=True)) / \
        np.sqrt(x.astype(np.float64).var(-1, keepdims=True) + 1e-5)
    assert_allclose(y, exact, rtol=0, atol=1e-5, what="layer norm of rows with mean 1e4")


def test_layer_norm_backward_without_grad_x():
    rng = np.random.default_rng(2)
    x, g = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 3, 8))
    w = rng.normal(size=8)
    _, mean, rstd = norm_cpu.layer_norm_forward(x, w, None, 1e-5)
    gx, gw, gb = norm_cpu.layer_norm_backward(g, x, w, mean, rstd, need_x=False)
    assert gx is None
    _, _, gw_ref, gb_ref = reference_layer_norm(x, w, None, 1e-5, g)
    assert_allclose(gw, gw_ref, rtol=1e-12, atol=1e-12, what="grad_weight, need_x=False")
    assert_allclose(gb, gb_ref, rtol=1e-12, atol=1e-12, what="grad_bias, need_x=False")


def test_layer_norm_weight_gradient_does_not_depend_on_threads():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(333, 48)).astype(np.float32)
    g = rng.normal(size=(333, 48)).astype(np.float32)
    w = rng.normal(size=48).astype(np.float32)
    _, mean, rstd = norm_cpu.layer_norm_forward(x, w, None, 1e-5)
    results = []
    previous = numba.get_num_threads()
    try:
        for threads in sorted({1, previous}):
            numba.set_num_threads(threads)
            results.append(norm_cpu.layer_norm_backward(g, x, w, mean, rstd))
    finally:
        numba.set_num_threads(previous)
    for name, a, b in zip(("grad_x", "grad_weight", "grad_bias"), results[0], results[-1]):
        assert np.array_equal(a, b), f"layer norm {name} differs between thread counts"


# --------------------------------------------------------------------------- frozen BN
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 64, 1, 1), (3, 4, 9)])
def test_scale_shift_kernel_is_bit_identical(dtype, shape):
    rng = np.random.default_rng(4)
    x = rng.normal(size=shape).astype(dtype)
    scale = rng.normal(size=shape[1]).astype(dtype)
    shift = rng.normal(size=shape[1]).astype(dtype)
    ch = (shape[1],) + (1,) * (len(shape) - 2)
    want = x * scale.reshape(ch) + shift.reshape(ch)
    got = norm_cpu.scale_shift_channels(x, scale, shift)
    bad = np.argwhere(got != want)
    assert got.dtype == dtype and not len(bad), (
        f"scale_shift {shape} {np.dtype(dtype).name}: {len(bad)} elements differ, first at "
        f"{tuple(bad[0]) if len(bad) else None}")


# --------------------------------------------------------------------------- dispatch
def test_applies_only_to_contiguous_numpy_float_arrays():
    a = np.zeros((4, 6), np.float32)
    assert norm_cpu.applies(a, np.ones(6, np.float32), None)
    assert not norm_cpu.applies(a.T, None), "a transposed view is not C-contiguous"
    assert not norm_cpu.applies(a[:, ::2]), "a strided view is not C-contiguous"
    assert not norm_cpu.applies(a.astype(np.float16)), "float16 has no kernel"
    assert not norm_cpu.applies(a, np.ones(6, np.float64)), "mixed dtypes"
    assert not norm_cpu.applies([[0.0]]), "a list is not an array"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_layer_norm_function_same_on_kernel_and_reference_paths(dtype):
    rng = np.random.default_rng(5)
    base = rng.normal(size=(6, 4, 5)).astype(dtype)
    view = base.transpose(1, 0, 2)                       # (4, 6, 5), not contiguous
    w = rng.normal(size=5).astype(dtype)
    b = rng.normal(size=5).astype(dtype)
    g = rng.normal(size=view.shape).astype(dtype)
    outs = []
    for x in (np.ascontiguousarray(view), view):        # kernel, then reference
        tx, tw, tb = (Tensor(a, requires_grad=True) for a in (x, w, b))
        y = F.layer_norm(tx, tw, tb)
        y.backward(g)
        outs.append((y.data, tx.grad, tw.grad, tb.grad))
    for name, k, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), *outs):
        assert_allclose(k, r, **TOL[dtype], what=f"LayerNorm {name}: kernel vs reference")


@pytest.mark.parametrize("contiguous", [True, False])
def test_layer_norm_gradcheck_on_both_paths(contiguous):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3, 4))
    x = x if contiguous else x.transpose(1, 0, 2)
    w, b = rng.normal(size=4), rng.normal(size=4)
    gradcheck(lambda x, w, b: F.layer_norm(x, w, b), [x, w, b],
              name=f"layer_norm contiguous={contiguous}")


@pytest.mark.parametrize("contiguous", [True, False])
def test_frozen_batch_norm_gradcheck_on_both_paths(contiguous):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 3, 4, 5))
    x = x if contiguous else x.transpose(0, 1, 3, 2)
    w, b, mean = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    var = rng.uniform(0.5, 2, size=3)
    gradcheck(lambda x, w, b: F.frozen_batch_norm(x, w, b, mean, var), [x, w, b],
              name=f"frozen_batch_norm contiguous={contiguous}")
