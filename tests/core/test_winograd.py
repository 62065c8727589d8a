"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolution (minidetr/functional/winograd.py,
winograd_cpu.py, winograd4.py, winograd4_cpu.py).

* the matrices: A^T [(G g G^T) * (B^T d B)] A is the 3x3 correlation of one tile;
* the transforms: the filter transform is G g G^T; each transform and its adjoint satisfy
  <T a, b> = <a, T* b>; the Numba kernels equal the NumPy reference (float32 and float64,
  sizes that are not multiples of the tile, one-pixel sizes, one and two threads);
* the Function (both tile sizes): forward equals a sum over the 9 taps of shifted images,
  backward passes float64 finite differences, and float32 results match im2col's to
  float32 rounding (F(4x4) rounds about 15x worse than F(2x2): its own bound);
* dispatch: which convolutions ``algorithm="auto"`` sends where, and clear errors.
"""
from __future__ import annotations

import numpy as np
import pytest

from minidetr import functional as F
from minidetr.autograd import Tensor
from minidetr.functional import winograd, winograd4, winograd4_cpu, winograd_cpu
from minidetr.testing import assert_allclose, gradcheck


TOL = {np.float32: dict(rtol=2e-5, atol=2e-5), np.float64: dict(rtol=1e-12, atol=1e-12)}
# (N, C_in, C_out, H, W): even, odd and one-pixel sizes; multiples of 4 and not
SHAPES = [(2, 3, 4, 6, 6), (1, 2, 3, 5, 7), (2, 4, 2, 1, 1), (1, 3, 3, 2, 3), (1, 2, 2, 7, 1),
          (1, 2, 3, 8, 9), (2, 2, 2, 12, 4), (1, 2, 2, 3, 10)]
# tile size m -> (reference module, Numba kernels, conv2d algorithm); P = (m + 2)^2 positions
TILES = {2: (winograd, winograd_cpu, "winograd"), 4: (winograd4, winograd4_cpu, "winograd4")}
# float32 results against im2col's, |error| / max |im2col|, measured at (2, 32, 16, 15) x 24
# filters and at ResNet-18's layer1/layer2 shapes: F(2x2) <= 1e-6, F(4x4) 2e-6 .. 1e-5
# (its G and A^T hold 1/24 and 8); each bound leaves about 3x over what was measured.
F32_REL = {2: 3e-6, 4: 3e-5}


def _transform_inputs(shape, dtype, rng, m=2):
    """Random inputs of the four tile transforms for one convolution shape, F(m x m)."""
    N, C_in, C_out, H, W = shape
    th, tw = winograd.tile_counts(H, W, m)
    T, P = N * th * tw, (m + 2) ** 2
    x = rng.normal(size=(N, C_in, H, W)).astype(dtype)
    dV = rng.normal(size=(P, C_in, T)).astype(dtype)
    M = rng.normal(size=(P, C_out, T)).astype(dtype)
    gy = rng.normal(size=(N, C_out, H, W)).astype(dtype)
    w = rng.normal(size=(C_out, C_in, 3, 3)).astype(dtype)
    dU = rng.normal(size=(P, C_out, C_in)).astype(dtype)
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
@pytest.mark.parametrize("m", [2, 4])
def test_matrices_compute_one_tile_of_the_correlation(m, rng):
    """A^T [(G g G^T) * (B^T d B)] A == y, y[p, q] = sum_ij g[i, j] d[p + i, q + j], for an
    (m + 2) x (m + 2) tile d: the matrices themselves, before any code uses them."""
    module = TILES[m][0]
    d, g = rng.normal(size=(m + 2, m + 2)), rng.normal(size=(3, 3))
    y = module.A_T @ ((module.G @ g @ module.G.T) * (module.B_T @ d @ module.B_T.T)) @ module.A_T.T
    want = np.array([[np.sum(g * d[p:p + 3, q:q + 3]) for q in range(m)] for p in range(m)])
    assert_allclose(y, want, rtol=1e-13, atol=1e-13, what=f"F({m}x{m}, 3x3) on one tile")


@pytest.mark.parametrize("m", [2, 4])
def test_filter_transform_is_g_g_gt(m, rng):
    module, alpha = TILES[m][0], m + 2
    w = rng.normal(size=(3, 2, 3, 3))
    U = module.filter_transform(w)                                     # (alpha^2, 3, 2)
    for o, c in [(0, 0), (2, 1), (1, 0)]:
        want = module.G @ w[o, c] @ module.G.T                          # (alpha, alpha)
        assert_allclose(U[:, o, c].reshape(alpha, alpha), want, rtol=1e-14, atol=1e-14,
                        what=f"F({m}x{m}) U[:, {o}, {c}]")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fast", [False, True], ids=["reference", "numba"])
def test_adjoints_are_transposes(shape, fast, m):
    """<T a, b> == <a, T* b> for every transform T and its adjoint T*, float64."""
    rng = np.random.default_rng(sum(shape))
    module, kernels, _ = TILES[m]
    tf = kernels.transforms() if fast else module.reference_transforms()
    args = _transform_inputs(shape, np.float64, rng, m)
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


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES + [(2, 40, 24, 18, 13), (2, 48, 40, 24, 23)])
def test_kernels_match_reference(dtype, shape, threads, m, monkeypatch):
    # the last shapes' arrays pass 256 KiB (F(4x4), float32: only the last one's), so with
    # 2 threads the channels are split
    monkeypatch.setenv("MINIDETR_NUM_THREADS", threads)
    rng = np.random.default_rng(sum(shape))
    module, kernels, _ = TILES[m]
    reference, fast = module.reference_transforms(), kernels.transforms()
    for name, args in _transform_inputs(shape, dtype, rng, m).items():
        want, got = reference[name](*args), fast[name](*args)
        assert got.dtype == dtype, f"{name}: dtype {got.dtype}, expected {dtype}"
        assert_allclose(got, want, **TOL[dtype],
                        what=f"F({m}x{m}) {name} {shape} {dtype.__name__}")


# =========================================================================== the Function
@pytest.mark.parametrize("algorithm", ["winograd", "winograd4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_winograd_conv_matches_the_sum_over_taps(xp, shape, with_bias, algorithm):
    rng = np.random.default_rng(sum(shape))
    N, C_in, C_out, H, W = shape
    x, w = rng.normal(size=(N, C_in, H, W)), rng.normal(size=(C_out, C_in, 3, 3))
    b = rng.normal(size=C_out) if with_bias else None
    out = F.conv2d(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b),
                   padding=1, algorithm=algorithm)
    assert_allclose(out, conv3x3_by_taps(x, w, b), rtol=1e-12, atol=1e-12,
                    what=f"{algorithm} conv {shape}")


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 6, 6), (1, 2, 3, 5, 7), (1, 2, 2, 1, 4),
                                   (1, 2, 2, 9, 8)])
def test_winograd_conv_gradcheck(xp, shape, algorithm):
    rng = np.random.default_rng(sum(shape))
    N, C_in, C_out, H, W = shape
    inputs = [xp.asarray(rng.normal(size=s)) for s in
              [(N, C_in, H, W), (C_out, C_in, 3, 3), (C_out,)]]
    gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1, algorithm=algorithm), inputs,
              name=f"{algorithm} conv {shape}")


@pytest.mark.parametrize("m", [2, 4])
@pytest.mark.parametrize("needs", [(True, True), (False, True), (True, False)],
                         ids=["x-and-w", "w-only", "x-only"])
def test_winograd_gradients_match_im2col_in_float32(needs, m, monkeypatch):
    """At a ResNet-like shape, with two threads, the gradients that are asked for agree
    with im2col's to float32 rounding (``F32_REL[m]`` of the largest entry), and the
    others stay None."""
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "2")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 32, 16, 15)).astype(np.float32)
    w = (rng.normal(size=(24, 32, 3, 3)) / 17).astype(np.float32)
    b = rng.normal(size=24).astype(np.float32)
    g = rng.normal(size=(2, 24, 16, 15)).astype(np.float32)
    results = {}
    algorithm_m = TILES[m][2]
    for algorithm in ("im2col", algorithm_m):
        xt, wt = Tensor(x, requires_grad=needs[0]), Tensor(w, requires_grad=needs[1])
        bt = Tensor(b, requires_grad=True)
        y = F.conv2d(xt, wt, bt, padding=1, algorithm=algorithm)
        y.backward(g)
        results[algorithm] = (y.data, xt.grad, wt.grad, bt.grad)
    for name, got, want in zip(("y", "grad_x", "grad_w", "grad_b"), results[algorithm_m],
                               results["im2col"]):
        if want is None:
            assert got is None, f"{name}: computed although not required"
            continue
        assert got.dtype == np.float32, f"{name}: dtype {got.dtype}"
        scale = float(np.abs(want).max())
        assert_allclose(got, want, rtol=0, atol=F32_REL[m] * scale,
                        what=f"{algorithm_m} vs im2col {name}")


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


def test_auto_takes_f4x4_from_64_tiles_of_4x4(rng):
    """F(4x4) where there are at least winograd4.MIN_TILES 4x4 tiles, F(2x2) below that
    (and never where F(2x2) itself does not apply)."""
    w3 = np.zeros((8, 8, 3, 3), np.float32)
    one = (1, 1)
    assert winograd4.MIN_TILES == 64
    enough = np.zeros((1, 8, 32, 29), np.float32)          # 8 * 8 = 64 tiles of 4x4
    fewer = np.zeros((1, 8, 32, 28), np.float32)           # 8 * 7 = 56 tiles of 4x4
    assert winograd4.applies(enough, w3, one, one, one)
    assert winograd4.applies(Tensor(enough), Tensor(w3), one, one, one), "Tensors are unwrapped"
    assert not winograd4.applies(fewer, w3, one, one, one), "56 tiles"
    assert winograd.applies(fewer, w3, one, one, one), "...but F(2x2) applies: 224 tiles of 2x2"
    assert not winograd4.applies(enough, w3, (2, 2), one, one), "stride 2"
    assert not winograd4.applies(enough.astype(np.float16), w3.astype(np.float16), one, one, one)


@pytest.mark.parametrize("shape, algorithm", [((2, 3, 16, 15), "winograd"),       # 64 2x2 tiles
                                              ((2, 3, 32, 32), "winograd4")])     # 128 4x4 tiles
def test_auto_gives_the_same_numbers_as_the_algorithm_it_picks(rng, shape, algorithm):
    x, w = rng.normal(size=shape), rng.normal(size=(4, 3, 3, 3))
    auto = F.conv2d(x, w, padding=1)
    assert_allclose(auto, F.conv2d(x, w, padding=1, algorithm=algorithm), rtol=0, atol=0,
                    what=f"auto vs {algorithm}")
    assert_allclose(auto, F.conv2d(x, w, padding=1, algorithm="im2col"), rtol=1e-12,
                    atol=1e-12, what="auto vs im2col")


def test_auto_keeps_f2x2_while_f4x4_is_switched_off(rng, monkeypatch):
    monkeypatch.setattr(winograd4, "MIN_TILES", None)
    x, w = rng.normal(size=(2, 3, 32, 32)), rng.normal(size=(4, 3, 3, 3))
    assert not winograd4.applies(x, w, (1, 1), (1, 1), (1, 1))
    assert_allclose(F.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1, algorithm="winograd"),
                    rtol=0, atol=0, what="auto vs winograd with F(4x4) off")


@pytest.mark.parametrize("algorithm", ["winograd", "winograd4"])
def test_bad_algorithm_requests_are_refused(algorithm):
    x, w = np.zeros((1, 2, 4, 4)), np.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="algorithm must be one of"):
        F.conv2d(x, w, padding=1, algorithm="fft")
    with pytest.raises(ValueError, match=f"'{algorithm}' needs a 3x3 kernel, stride 1, padding 1"):
        F.conv2d(x, w, stride=2, padding=1, algorithm=algorithm)
    with pytest.raises(ValueError, match="needs a 3x3 kernel"):
        F.conv2d(x, np.zeros((3, 2, 5, 5)), padding=1, algorithm=algorithm)
    with pytest.raises(ValueError, match="must be 2 or 4"):
        winograd.WinogradConv3x3.apply(x, w, None, 3)
