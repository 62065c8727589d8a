"""The fused Numba kernels of minidetr/functional/norm_cpu.py against the NumPy reference.

* layer norm forward and backward against ``_standardize`` / ``_standardize_backward`` and
  the affine map of :mod:`minidetr.functional.norm` (float32 and float64, odd shapes,
  without weight or bias);
* frozen batch norm's per-channel multiply-add is bit-identical to NumPy's, and so is the
  fused relu(bn(x) + residual) of FrozenBatchNormReLU, forward and backward, against both
  NumPy's formula and the composition of the three Functions;
* dispatch: only NumPy float32/float64 C-contiguous arrays take the kernels; a strided view
  takes the reference and gives the same values; float64 gradchecks on both paths.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import minidetr.functional as F
from minidetr.autograd import Tensor
from minidetr.functional import norm, norm_cpu
from minidetr.functional._util import cpu_kernels_apply
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
def test_kernels_apply_only_to_contiguous_numpy_float_arrays():
    a = np.zeros((4, 6), np.float32)
    assert cpu_kernels_apply(a, np.ones(6, np.float32), None)
    assert not cpu_kernels_apply(a.T, None), "a transposed view is not C-contiguous"
    assert not cpu_kernels_apply(a[:, ::2]), "a strided view is not C-contiguous"
    assert not cpu_kernels_apply(a.astype(np.float16)), "float16 has no kernel"
    assert not cpu_kernels_apply(a, np.ones(6, np.float64)), "mixed dtypes"
    assert not cpu_kernels_apply([[0.0]]), "a list is not an array"
    assert not cpu_kernels_apply(np.zeros((0, 6), np.float32)), "an empty array"


def test_importing_functional_does_not_import_numba():
    """Numba (0.2 s to import) loads with the first kernel call, not with minidetr.functional."""
    code = ("import sys, minidetr.functional; "
            "assert 'numba' not in sys.modules, 'minidetr.functional imported numba'")
    subprocess.run([sys.executable, "-c", code], check=True)


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


def laid_out(x, swap, contiguous):
    """``(input, f)``: the array to hand to gradcheck and the function that turns its
    Tensor into ``x``'s values, contiguous (the kernel's path) or a strided view (the
    reference's path). gradcheck copies its inputs C-contiguous, so a view must be made
    inside the checked function: by swapping two axes (``swap``, its own inverse)."""
    if contiguous:
        return x, lambda t: t
    return np.ascontiguousarray(x.transpose(swap)), lambda t: F.permute(t, swap)


@pytest.mark.parametrize("contiguous", [True, False])
def test_layer_norm_gradcheck_on_both_paths(contiguous):
    rng = np.random.default_rng(6)
    x, view = laid_out(rng.normal(size=(5, 3, 4)), (1, 0, 2), contiguous)
    w, b = rng.normal(size=4), rng.normal(size=4)
    gradcheck(lambda x, w, b: F.layer_norm(view(x), w, b),
              [x, w, b], name=f"layer_norm contiguous={contiguous}")


@pytest.mark.parametrize("contiguous", [True, False])
def test_frozen_batch_norm_gradcheck_on_both_paths(contiguous):
    rng = np.random.default_rng(7)
    x, view = laid_out(rng.normal(size=(2, 3, 4, 5)), (0, 1, 3, 2), contiguous)
    w, b, mean = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    var = rng.uniform(0.5, 2, size=3)
    gradcheck(lambda x, w, b: F.frozen_batch_norm(view(x), w, b, mean, var),
              [x, w, b], name=f"frozen_batch_norm contiguous={contiguous}")


# --------------------------------------------------------------------------- bn + relu
def _bn_vectors(rng, C, dtype):
    w, b, mean = (rng.normal(size=C).astype(dtype) for _ in range(3))
    return w, b, mean, rng.uniform(0.5, 2, size=C).astype(dtype)


def _special_values(x):
    """Put a NaN, infinities and exact zeros where the kernels' branches are."""
    flat = x.reshape(-1)
    flat[:4] = [np.nan, np.inf, -np.inf, 0.0]
    return x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_residual", [True, False])
def test_bn_relu_kernels_equal_the_composition_bit_for_bit(dtype, with_residual):
    """relu(frozen_batch_norm(x) + r) by three Functions (their own kernels) and by the
    fused one: the same operations in the same order, so the same bits, NaN included."""
    rng = np.random.default_rng(11)
    x = _special_values(rng.normal(size=(2, 5, 3, 7)).astype(dtype))
    r = rng.normal(size=x.shape).astype(dtype) if with_residual else None
    g = rng.normal(size=x.shape).astype(dtype)
    vectors = _bn_vectors(rng, 5, dtype)
    results = []
    for fused in (True, False):
        xt = Tensor(x.copy(), requires_grad=True)
        rt = Tensor(r.copy(), requires_grad=True) if with_residual else None
        if fused:
            y = F.frozen_batch_norm_relu(xt, *vectors, residual=rt)
        else:
            z = F.frozen_batch_norm(xt, *vectors)
            y = F.relu(z + rt if with_residual else z)
        y.backward(g)
        results.append([y.data, xt.grad] + ([rt.grad] if with_residual else []))
    for name, got, expected in zip(("y", "grad x", "grad residual"), *results):
        np.testing.assert_array_equal(got, expected, err_msg=f"{name}, fused vs composed")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("need", [(True, True), (True, False), (False, True)])
def test_bn_relu_kernels_equal_the_numpy_reference(dtype, need):
    rng = np.random.default_rng(12)
    x = _special_values(rng.normal(size=(3, 4, 9)).astype(dtype))
    r = rng.normal(size=x.shape).astype(dtype)
    g = rng.normal(size=x.shape).astype(dtype)
    g.reshape(-1)[5] = np.nan
    w, b, mean, var = _bn_vectors(rng, 4, dtype)
    scale = w / np.sqrt(var + dtype(1e-5))
    shift = b - mean * scale
    c = (4, 1)                                                         # (C, 1)
    y = norm_cpu.scale_shift_add_relu(x, scale, shift, r)
    np.testing.assert_array_equal(y, np.maximum(x * scale.reshape(c) + shift.reshape(c) + r, 0))
    np.testing.assert_array_equal(norm_cpu.scale_shift_add_relu(x, scale, shift),
                                  np.maximum(x * scale.reshape(c) + shift.reshape(c), 0))
    gx, gr = norm_cpu.relu_scale_backward(g, y, scale, *need)
    masked = g * (y > 0)
    if need[0]:
        np.testing.assert_array_equal(gx, masked * scale.reshape(c), err_msg="grad x")
    else:
        assert gx is None
    if need[1]:
        np.testing.assert_array_equal(gr, masked, err_msg="grad residual")
    else:
        assert gr is None


@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_bn_relu_gradcheck_on_both_paths(contiguous, with_residual):
    rng = np.random.default_rng(13)
    x, view = laid_out(rng.normal(size=(2, 3, 4, 5)), (0, 1, 3, 2), contiguous)
    r = rng.normal(size=(2, 3, 4, 5))                                   # view(x)'s shape
    vectors = _bn_vectors(rng, 3, np.float64)
    if with_residual:
        gradcheck(lambda x, r: F.frozen_batch_norm_relu(view(x), *vectors, residual=r),
                  [x, r], name=f"frozen_batch_norm_relu contiguous={contiguous}")
    else:
        gradcheck(lambda x: F.frozen_batch_norm_relu(view(x), *vectors), [x],
                  name=f"frozen_batch_norm_relu contiguous={contiguous}")


def test_bn_relu_refuses_what_it_cannot_do():
    x = Tensor(np.ones((1, 2, 3, 3)))
    w, b, m, v = (np.ones(2) for _ in range(4))
    with pytest.raises(ValueError, match="weight requires grad"):
        F.frozen_batch_norm_relu(x, Tensor(w, requires_grad=True), b, m, v)
    with pytest.raises(ValueError, match=r"residual \(1, 2, 3, 2\) must have the shape of x"):
        F.frozen_batch_norm_relu(x, w, b, m, v, residual=np.ones((1, 2, 3, 2)))
    with pytest.raises(ValueError, match=r"bias must have shape \(2,\)"):
        F.frozen_batch_norm_relu(x, w, np.ones(3), m, v)
    from minidetr import nn
    with pytest.raises(ValueError, match="a residual is added only with relu=True"):
        nn.FrozenBatchNorm2d(2)(x, residual=x)


# --------------------------------------------------------------------------- group norm
def composed_masked_group_norm(x, valid, G, w, b, eps):
    """Mask-aware group norm as a composition of differentiable Functions (what
    minidetr.models.backbone.masked_group_norm was before the fused Function)."""
    B, C, H, W = x.shape
    v = valid.reshape(B, 1, 1, H, W)                                   # (B, 1, 1, H, W)
    count = valid.sum(axis=(1, 2, 3)).reshape(B, 1, 1, 1, 1) * (C // G)
    xg = F.reshape(x, (B, G, C // G, H, W))                            # (B, G, C/G, H, W)
    mean = F.sum(xg * v, axis=(2, 3, 4), keepdims=True) / count        # (B, G, 1, 1, 1)
    centred = (xg - mean) * v
    var = F.sum(centred * centred, axis=(2, 3, 4), keepdims=True) / count
    x_hat = F.reshape(centred / F.sqrt(var + eps), (B, C, H, W))
    return (x_hat * F.reshape(w, (1, C, 1, 1)) + F.reshape(b, (1, C, 1, 1))) * valid


def padded_valid(shape, sizes, dtype):
    """(B, 1, H, W) 0/1: image b covers the top-left sizes[b] = (h, w)."""
    B, _, H, W = shape
    v = np.zeros((B, 1, H, W), dtype)
    for i, (h, w) in enumerate(sizes):
        v[i, :, :h, :w] = 1
    return v


def run_group_norm(fn, x, w, b, g):
    tx, tw, tb = (Tensor(a.copy(order="K"), requires_grad=True) for a in (x, w, b))  # layout kept
    y = fn(tx, tw, tb)
    y.backward(g)
    return y.data, tx.grad, tw.grad, tb.grad


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "view"])
def test_group_norm_kernel_and_reference_against_composition(dtype, masked, layout):
    """Kernel (contiguous input) and NumPy reference (a strided view) of GroupNorm both
    against an independent computation: the composition of simpler Functions."""
    rng = np.random.default_rng(10)
    B, C, H, W, G = 3, 6, 5, 7, 3
    base = (rng.normal(size=(B, C, W, H)) * 2 + 1).astype(dtype)
    x = base.transpose(0, 1, 3, 2)                                     # (B, C, H, W) view
    if layout == "contiguous":
        x = np.ascontiguousarray(x)
    w, b = rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype)
    g = rng.normal(size=(B, C, H, W)).astype(dtype)
    valid = padded_valid(x.shape, [(5, 7), (3, 4), (1, 2)] if masked else [(H, W)] * B, dtype)
    got = run_group_norm(lambda x, w, b: F.group_norm(x, G, w, b, valid=valid if masked else None),
                         x, w, b, g)
    want = run_group_norm(lambda x, w, b: composed_masked_group_norm(x, valid, G, w, b, 1e-5),
                          np.ascontiguousarray(x), w, b, g)
    for name, k, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), got, want):
        assert_allclose(k, r, **TOL[dtype], what=f"group_norm masked={masked} {layout} {name}")


def test_group_norm_kernel_padding_is_zero_and_ignored():
    rng = np.random.default_rng(11)
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    valid = padded_valid(x.shape, [(6, 6), (3, 2)], np.float32)
    y, _, _ = norm_cpu.group_norm_forward(x, valid, None, None, 2, 1e-5)
    assert not y[1, :, 3:, :].any() and not y[1, :, :, 2:].any(), "padding must be 0"
    x2 = x.copy()
    x2[1, :, 3:, :] = 1e6                                  # garbage on the padding
    y2, _, _ = norm_cpu.group_norm_forward(x2, valid, None, None, 2, 1e-5)
    assert np.array_equal(y, y2), "values on the padding must not change the output"


@pytest.mark.parametrize("contiguous", [True, False])
def test_masked_group_norm_gradcheck_on_both_paths(contiguous):
    rng = np.random.default_rng(12)
    x, view = laid_out(rng.normal(size=(2, 4, 3, 5)), (0, 1, 3, 2), contiguous)
    w, b = rng.normal(size=4), rng.normal(size=4)
    valid = padded_valid((2, 4, 3, 5), [(3, 5), (2, 3)], np.float64)
    gradcheck(lambda x, w, b: F.group_norm(view(x), 2, w, b, valid=valid),
              [x, w, b], name=f"masked group_norm contiguous={contiguous}")


def test_group_norm_rejects_a_valid_of_the_wrong_shape():
    x = np.zeros((2, 4, 3, 5), np.float32)
    with pytest.raises(ValueError, match=r"valid must have shape \(2, 1, 3, 5\).*got \(2, 3, 5\)"):
        F.group_norm(x, 2, valid=np.ones((2, 3, 5), np.float32))


def test_the_views_of_these_tests_take_the_reference_path(monkeypatch):
    """The "view" cases above must not reach the kernels (else they test nothing new)."""
    def refuse(*args, **kwargs):
        raise AssertionError("a strided view reached a Numba kernel")
    for name in ("layer_norm_forward", "group_norm_forward", "scale_shift_channels"):
        monkeypatch.setattr(norm_cpu, name, refuse)
    x = np.random.default_rng(13).normal(size=(2, 4, 5, 3))
    _, view = laid_out(x, (0, 1, 3, 2), contiguous=False)
    t = view(Tensor(np.ascontiguousarray(x.transpose(0, 1, 3, 2))))
    F.layer_norm(t, None, None)
    F.group_norm(t, 2, valid=np.ones((2, 1, 5, 3)))
    F.frozen_batch_norm(t, *(np.ones(4),) * 4)
