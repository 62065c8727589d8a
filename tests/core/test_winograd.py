"""Winograd F(2x2, 3x3) convolution (minidetr/functional/winograd.py and winograd_cpu.py).

* the transforms: the filter transform is G g G^T; each transform and its adjoint satisfy
  <T a, b> = <a, T* b>; the Numba kernels equal the NumPy reference (float32 and float64,
  odd sizes, one and two threads);
* the Function: forward equals a sum over the 9 taps of shifted images, backward passes float64
  finite differences, and float32 results match im2col's to float32 rounding;
* dispatch: which convolutions ``algorithm="auto"`` sends here, and clear errors.
"""
from __future__ import annotations

import numpy as np
import pytest

from minidetr import functional as F
from minidetr.autograd import Tensor
from minidetr.functional import winograd, winograd_cpu
from minidetr.testing import assert_allclose, gradcheck


TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
# (N, C_in, C_out, H, W): even, odd and one-pixel sizes
SHAPES = [(2, 3, 4, 6, 6), (1, 2, 3, 5, 7), (2, 4, 2, 1, 1), (1, 3, 3, 2, 3), (1, 2, 2, 7, 1)]


def _transform_inputs(shape, dtype, rng):
    """Random inputs of the four tile transforms for one convolution shape."""
    N, C_in, C_out, H, W = shape
    th, tw = winograd.tile_counts(H, W)
    T = N * th * tw
    x = rng.normal(size=(N, C_in, H, W)).astype(dtype)
    dV = rng.normal(size=(16, C_in, T)).astype(dtype)
    M = rng.normal(size=(16, C_out, T)).astype(dtype)
    gy = rng.normal(size=(N, C_out, H, W)).astype(dtype)
    w = rng.normal(size=(C_out, C_in, 3, 3)).astype(dtype)
    dU = rng.normal(size=(16, C_out, C_in)).astype(dtype)
    return {"filter_transform": (w,), "filter_transform_adjoint": (dU,),
            "input_transform": (x,), "input_transform_adjoint": (dV, x.shape),
            "output_transform": (M, gy.shape), "output_transform_adjoint": (gy,)}


def conv3x3_by_taps(x, w, b):
    """The 3x3, stride 1, padding 1 convolution as a sum over the 9 taps of shifted images."""
    N, C, H, W = x.shape
    x_pad = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = sum(np.einsum("oc,nchw->nohw", w[:, :, i, j], x_pad[:, :, i:i + H, j:j + W])
              for i in range(3) for j in range(3))
    return out if b is None else out + b[:, None, None]


# =========================================================================== transforms
def test_filter_transform_is_g_g_gt(rng):
    w = rng.normal(size=(3, 2, 3, 3))
    U = winograd.filter_transform(w)                                   # (16, 3, 2)
    for o, c in [(0, 0), (2, 1), (1, 0)]:
        want = winograd.G @ w[o, c] @ winograd.G.T                      # (4, 4)
        assert_allclose(U[:, o, c].reshape(4, 4), want, rtol=1e-14, atol=1e-14,
                        what=f"U[:, {o}, {c}]")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "numba"])
def test_adjoints_are_transposes(shape, fast):
    """<T a, b> == <a, T* b> for every transform T and its adjoint T*, float64."""
    rng = np.random.default_rng(sum(shape))
    tf = winograd_cpu.transforms() if fast else winograd.reference_transforms()
    args = _transform_inputs(shape, np.float64, rng)
    x, = args["input_transform"]
    dV = args["input_transform_adjoint"][0]
    lhs = np.vdot(tf["input_transform"](x), dV)
    rhs = np.vdot(x, tf["input_transform_adjoint"](dV, x.shape))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)), f"input transform {shape}: {lhs} vs {rhs}"
    M, out_shape = args["output_transform"]
    gy, = args["output_transform_adjoint"]
    lhs = np.vdot(tf["output_transform"](M, out_shape), gy)
    rhs = np.vdot(M, tf["output_transform_adjoint"](gy))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)), f"output transform {shape}: {lhs} vs {rhs}"
    w, = args["filter_transform"]
    dU, = args["filter_transform_adjoint"]
    lhs = np.vdot(tf["filter_transform"](w), dU)
    rhs = np.vdot(w, tf["filter_transform_adjoint"](dU))
    assert abs(lhs - rhs) <= 1e-10 * max(1.0, abs(lhs)), f"filter transform {shape}: {lhs} vs {rhs}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + [(2, 40, 24, 18, 13)])
def test_kernels_match_reference(dtype, shape, monkeypatch):
    # the last shape's arrays pass 256 KiB, so with 2 threads the channels are split
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "2")
    rng = np.random.default_rng(sum(shape))
    reference, fast = winograd.reference_transforms(), winograd_cpu.transforms()
    for name, args in _transform_inputs(shape, dtype, rng).items():
        want, got = reference[name](*args), fast[name](*args)
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert_allclose(got, want, **TOL[dtype], what=f"{name} {shape} {dtype.__name__}")


# =========================================================================== the Function
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_conv_matches_the_sum_over_taps(xp, shape, with_bias):
    rng = np.random.default_rng(sum(shape))
    N, C_in, C_out, H, W = shape
    x, w = rng.normal(size=(N, C_in, H, W)), rng.normal(size=(C_out, C_in, 3, 3))
    b = rng.normal(size=C_out) if with_bias else None
    out = F.conv2d(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b),
                   padding=1, algorithm="winograd")
    assert_allclose(out, conv3x3_by_taps(x, w, b), rtol=1e-12, atol=1e-12,
                    what=f"winograd conv {shape}")


@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 6), (1, 2, 3, 5, 7), (1, 2, 2, 1, 4)])
def test_winograd_conv_gradcheck(xp, shape):
    rng = np.random.default_rng(sum(shape))
    N, C_in, C_out, H, W = shape
    inputs = [xp.asarray(rng.normal(size=s)) for s in
              [(N, C_in, H, W), (C_out, C_in, 3, 3), (C_out,)]]
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1, algorithm="winograd"), inputs,
              name=f"winograd conv {shape}")


@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)],
                         ids=["x-and-w", "w-only", "x-only"])
def test_winograd_gradients_match_im2col_in_float32(needs, monkeypatch):
    """At a ResNet-like shape, with two threads, the gradients that are asked for agree
    with im2col's to float32 rounding, and the others stay None."""
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "2")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 32, 16, 15)).astype(np.float32)
    w = (rng.normal(size=(24, 32, 3, 3)) / 17).astype(np.float32)
    b = rng.normal(size=24).astype(np.float32)
    g = rng.normal(size=(2, 24, 16, 15)).astype(np.float32)
    results = {}
    for algorithm in ("im2col", "winograd"):
        xt, wt = Tensor(x, requires_grad=needs[0]), Tensor(w, requires_grad=needs[1])
        bt = Tensor(b, requires_grad=True)
        y = F.conv2d(xt, wt, bt, padding=1, algorithm=algorithm)
        y.backward(g)
        results[algorithm] = (y.data, xt.grad, wt.grad, bt.grad)
    for name, got, want in zip(("y", "grad_x", "grad_w", "grad_b"), results["winograd"],
                               results["im2col"]):
        if want is None:
            assert got is None, f"{name}: computed although not required"
            continue
        assert got.dtype == np.float32, f"{name}: dtype {got.dtype}"
        scale = float(np.abs(want).max())
        assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, what=f"winograd vs im2col {name}")


# =========================================================================== dispatch
def test_auto_chooses_winograd_only_where_it_pays(rng):
    w3 = np.zeros((8, 8, 3, 3), np.float32)
    many = np.zeros((2, 8, 8, 8), np.float32)             # T = 2 * 4 * 4 = 32 tiles
    few = np.zeros((1, 8, 8, 7), np.float32)              # T = 16 tiles
    one = (1, 1)
    assert winograd.applies(many, w3, one, one, one)
    assert winograd.applies(Tensor(many), Tensor(w3), one, one, one), "Tensors are unwrapped"
    assert winograd.MIN_TILES == 32
    assert not winograd.applies(few, w3, one, one, one), "too few tiles"
    assert not winograd.applies(many, w3, (2, 2), one, one), "stride 2"
    assert not winograd.applies(many, w3, one, (0, 0), one), "no padding"
    assert not winograd.applies(many, w3, one, one, (2, 2)), "dilation"
    assert not winograd.applies(many, np.zeros((8, 8, 1, 1), np.float32), one, one, one)
    assert not winograd.applies(many.astype(np.float16), w3.astype(np.float16), one, one, one)


def test_auto_gives_the_same_numbers_as_both_algorithms(rng):
    x, w = rng.normal(size=(2, 3, 16, 15)), rng.normal(size=(4, 3, 3, 3))   # 64 tiles
    auto = F.conv2d(x, w, padding=1)
    assert_allclose(auto, F.conv2d(x, w, padding=1, algorithm="winograd"), rtol=0, atol=0,
                    what="auto vs winograd")
    assert_allclose(auto, F.conv2d(x, w, padding=1, algorithm="im2col"), rtol=1e-12,
                    atol=1e-12, what="auto vs im2col")


def test_bad_algorithm_requests_are_refused():
    x, w = np.zeros((1, 2, 4, 4)), np.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        F.conv2d(x, w, padding=1, algorithm="fft")
    with pytest.raises(ValueError, match="needs a 3x3 kernel, stride 1, padding 1"):
        F.conv2d(x, w, stride=2, padding=1, algorithm="winograd")
    with pytest.raises(ValueError, match="needs a 3x3 kernel"):
        F.conv2d(x, np.zeros((3, 2, 5, 5)), padding=1, algorithm="winograd")
