"""Multi-scale deformable attention: the op, its reference and its CPU backends.

* hand-computed samples and gradients on a 2x3 map (centres, cell middles, borders,
  corners, outside);
* the reference equals an independent formula, bilinear sampling written as a sum of
  tent functions over all pixels (what grid_sample with zero padding computes);
* float64 gradient checks of the autograd Function for value, locations and weights,
  with points inside, exactly on and outside the borders, for several (L, K, M, D);
* every other available backend equals the reference on random shapes (Hypothesis;
  1e-10 in float64, 1e-5 relative in float32), GPU backends included when present;
* clear errors for bad inputs; the backend registry.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidetr.autograd import Tensor
from minidetr.backend import to_device, to_numpy
from minidetr.ops import msda
from minidetr.ops.msda import reference
from minidetr.testing import assert_allclose, gradcheck

CPU_BACKENDS = ["numpy", "numba"]


# --------------------------------------------------------------------------- helpers
def make_inputs(rng, N, shapes, M, D, Lq, K, dtype=np.float64, spread=1.4):
    """Random op inputs; locations spread over [-0.2, 1.2] so that some fall outside."""
    shapes = np.asarray(shapes, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    L = len(shapes)
    value = rng.standard_normal((N, int(sizes.sum()), M, D)).astype(dtype)
    loc = (rng.random((N, Lq, M, L, K, 2)) * spread - (spread - 1) / 2).astype(dtype)
    attn = rng.random((N, Lq, M, L, K)) + 0.1
    attn = (attn / attn.sum(axis=(-2, -1), keepdims=True)).astype(dtype)
    return value, shapes, starts, loc, attn


def tent_sample(value_map, x, y):
    """Bilinear sampling with zero padding as a sum over *all* pixels of tent functions.

    A different formula from the reference's four corners: pixel (i, j) contributes
    v[i, j] * max(0, 1 - |h_im - i|) * max(0, 1 - |w_im - j|).
    value_map: (H, W, D); x, y: Python floats. Returns (D,).
    """
    H, W, _ = value_map.shape
    h_im, w_im = y * H - 0.5, x * W - 0.5
    i = np.arange(H)[:, None]
    j = np.arange(W)[None, :]
    k = np.maximum(0, 1 - np.abs(h_im - i)) * np.maximum(0, 1 - np.abs(w_im - j))  # (H, W)
    return (k[..., None] * value_map).sum(axis=(0, 1))


def tent_forward(value, shapes, starts, loc, attn):
    """The whole op, one point at a time, with :func:`tent_sample` (float64, slow)."""
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = loc.shape
    out = np.zeros((N, Lq, M, D))
    for n in range(N):
        for l, ((H, W), s0) in enumerate(zip(shapes.tolist(), starts.tolist())):
            for m in range(M):
                vmap = value[n, s0:s0 + H * W, m].reshape(H, W, D)
                for q in range(Lq):
                    for k in range(K):
                        x, y = loc[n, q, m, l, k]
                        out[n, q, m] += attn[n, q, m, l, k] * tent_sample(vmap, x, y)
    return out.reshape(N, Lq, M * D)


def on_device(arrays, backend):
    """Move the inputs to the device a backend works on (CuPy for GPU backends)."""
    device = "cpu" if "cpu" in msda._DEVICES[backend] else "cuda"
    return [to_device(a, device) for a in arrays]


# --------------------------------------------------------------------------- 2x3 map
# value map (H, W) = (2, 3), channel 0 = [[1, 2, 3], [4, 5, 6]], channel 1 = 10x that.
MAP = np.array([[1., 2., 3.], [4., 5., 6.]])
# (x, y) normalised -> expected sample of channel 0 (pixel coordinates w_im = 3x - 0.5,
# h_im = 2y - 0.5).
HAND_POINTS = [
    ((0.5, 0.25), 2.0),            # centre of pixel (0, 1)
    ((1 / 3, 0.5), 3.0),           # middle of the cell (0,0),(0,1),(1,0),(1,1): (1+2+4+5)/4
    ((0.0, 0.25), 0.5),            # left border: half of pixel (0, 0), half of zero padding
    ((0.0, 0.0), 0.25),            # top-left corner: a quarter of pixel (0, 0)
    ((1.0, 1.0), 1.5),             # bottom-right corner: a quarter of pixel (1, 2) = 6
    ((5 / 6, 0.5), 4.5),           # between rows at column 2: (3 + 6) / 2
    ((-0.5, 0.5), 0.0),            # far outside: nothing
]


def hand_inputs(xp, dtype=np.float64):
    """The 2x3 map (N = M = L = 1, D = 2) and one query per point of HAND_POINTS.

    Every query sees all the points, with attention 1 on its own point and 0 elsewhere.
    """
    K = len(HAND_POINTS)
    value = np.stack([MAP.reshape(6), 10 * MAP.reshape(6)], axis=-1)    # (S, D) = (6, 2)
    value = value.reshape(1, 6, 1, 2)                                   # (N, S, M, D)
    points = np.array([p for p, _ in HAND_POINTS])                      # (K, 2)
    loc = np.broadcast_to(points, (1, K, 1, 1, K, 2))                   # (N, Lq, M, L, K, 2)
    attn = np.eye(K).reshape(1, K, 1, 1, K)                             # (N, Lq, M, L, K)
    floats = [xp.asarray(a, dtype=dtype) for a in (value, loc, attn)]
    return floats[0], xp.asarray([[2, 3]]), xp.asarray([0]), floats[1], floats[2]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_hand_computed_samples_on_2x3_map(backend, dtype):
    out = msda.forward(*hand_inputs(np, dtype), backend=backend)           # (1, K, 2)
    expected = np.array([[e, 10 * e] for _, e in HAND_POINTS])[None]
    assert out.dtype == dtype
    assert_allclose(out, expected, rtol=1e-6, atol=1e-6, what=f"{backend} samples")


def test_hand_computed_samples_reference_on_every_device(xp):
    out = msda.forward(*hand_inputs(xp), backend="numpy")
    expected = np.array([[e, 10 * e] for _, e in HAND_POINTS])[None]
    assert_allclose(out, expected, rtol=1e-12, what="reference samples")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_hand_computed_gradients_in_the_middle_of_a_cell(backend):
    # One point at (x, y) = (1/3, 1/2): w_im = h_im = 0.5, all four weights 1/4.
    value = np.stack([MAP.reshape(6), np.zeros(6)], axis=-1)[None, :, None, :]   # (1, 6, 1, 2)
    loc = np.array([1 / 3, 0.5]).reshape(1, 1, 1, 1, 1, 2)
    attn = np.full((1, 1, 1, 1, 1), 0.5)
    g = np.array([[[1.0, 7.0]]])                                       # dL/d out, (1, 1, 2)
    gv, gl, ga = msda.backward(g, value, [[2, 3]], [0], loc, attn, backend=backend)
    # dL/da = g . sample = 1 * 3 + 7 * 0
    assert_allclose(ga, [[[[[3.0]]]]], rtol=1e-12, what="grad attention")
    # dL/dx = a * W * d sample/d w_im = 0.5 * 3 * ((2-1)/2 + (5-4)/2) = 1.5
    # dL/dy = a * H * d sample/d h_im = 0.5 * 2 * ((4-1)/2 + (5-2)/2) = 3
    assert_allclose(gl[0, 0, 0, 0, 0], [1.5, 3.0], rtol=1e-12, what="grad location")
    # dL/dv = a * w_c * g on the four neighbours (0,0),(0,1),(1,0),(1,1): 0.125 * g
    expected = np.zeros((6, 2))
    expected[[0, 1, 3, 4]] = 0.125 * g[0, 0]
    assert_allclose(gv[0, :, 0], expected, rtol=1e-12, what="grad value")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_points_exactly_on_the_skip_boundary_have_zero_gradient(backend):
    # w_im = -1 exactly (x = -1 / (2W)): the official op skips the point, so the sample
    # and every gradient are 0 (a one-sided derivative would not be).
    value = np.arange(6.0).reshape(1, 6, 1, 1) + 1
    loc = np.array([-1 / 6, 0.5]).reshape(1, 1, 1, 1, 1, 2)
    attn = np.ones((1, 1, 1, 1, 1))
    args = (value, [[2, 3]], [0], loc, attn)
    assert msda.forward(*args, backend=backend).item() == 0.0
    gv, gl, ga = msda.backward(np.ones((1, 1, 1)), *args, backend=backend)
    assert not gv.any() and not gl.any() and not ga.any()


# --------------------------------------------------------------------------- oracles
def test_reference_equals_the_tent_formula(rng):
    args = make_inputs(rng, N=2, shapes=[(3, 4), (2, 3), (1, 1)], M=2, D=3, Lq=4, K=3)
    assert_allclose(msda.forward(*args, backend="numpy"), tent_forward(*args),
                    rtol=1e-12, atol=1e-12, what="reference vs tent formula")


def test_single_scale_is_the_one_level_case(rng):
    value, shapes, starts, loc, attn = make_inputs(rng, N=2, shapes=[(3, 5)], M=2, D=4, Lq=3, K=4)
    single = reference.deformable_attention_single_scale(value, (3, 5), loc[:, :, :, 0],
                                                         attn[:, :, :, 0])
    assert_allclose(single, tent_forward(value, shapes, starts, loc, attn), rtol=1e-12,
                    atol=1e-12, what="single-scale deformable attention")


# --------------------------------------------------------------------------- gradcheck
def gradcheck_locations(rng, N, Lq, M, shapes, K):
    """Locations mixing the interior, the exact borders and the outside of each level.

    Bilinear sampling has kinks where w_im (or h_im) is an integer (pixel centres, and
    -1 or W where a point starts to touch the map); central differences across a kink
    are meaningless, so random points keep their fractional pixel part in [0.05, 0.95].
    The others are exactly on the borders (x or y = 0 or 1, i.e. w_im = -0.5 or
    W - 0.5: half the neighbours are padding) or far outside (all gradients 0).
    """
    L = len(shapes)
    size = np.asarray(shapes)[:, ::-1].reshape(1, 1, 1, L, 1, 2)        # (W_l, H_l)
    shape = (N, Lq, M, L, K, 2)
    pix = rng.integers(-1, size, shape)                                 # -1 .. size-1
    frac = rng.uniform(0.05, 0.95, shape)
    loc = (pix + frac + 0.5) / size                                     # w_im = pix + frac
    kind = rng.integers(0, 6, shape)
    loc = np.where(kind == 3, 0.0, np.where(kind == 4, 1.0, np.where(kind == 5, -0.8, loc)))
    return loc


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("L, K, M, D", [(1, 1, 1, 1), (2, 2, 2, 3), (3, 1, 1, 5), (1, 4, 3, 2)])
def test_gradcheck_value_locations_weights(backend, L, K, M, D):
    rng = np.random.default_rng(100 * L + 10 * K + M + D)
    shapes = [(2, 3), (3, 1), (1, 2)][:L]
    value, shapes, starts, _, attn = make_inputs(rng, N=2, shapes=shapes, M=M, D=D, Lq=3, K=K)
    loc = gradcheck_locations(rng, 2, 3, M, shapes.tolist(), K)
    assert (loc == 0).any() and (loc == 1).any() and (loc < -0.5).any()   # borders, outside

    def op(v, l, a):
        return msda.ms_deform_attn(v, shapes, starts, l, a, backend=backend)
    gradcheck(op, [value, loc, attn], name=f"ms_deform_attn[{backend}] L={L} K={K} M={M} D={D}")


def test_function_returns_gradients_only_where_needed(rng):
    value, shapes, starts, loc, attn = make_inputs(rng, N=1, shapes=[(2, 2)], M=1, D=2, Lq=2, K=2)
    v, l, a = Tensor(value), Tensor(loc, requires_grad=True), Tensor(attn)
    out = msda.ms_deform_attn(v, shapes, starts, l, a, backend="numba")
    out.backward(np.ones(out.shape))
    assert l.grad is not None and l.grad.shape == loc.shape
    assert v.grad is None and a.grad is None


# --------------------------------------------------------------------------- parity
@st.composite
def op_case(draw):
    """A random op configuration and the seed of its random inputs."""
    L = draw(st.integers(1, 3))
    return dict(N=draw(st.integers(1, 2)), M=draw(st.integers(1, 3)), D=draw(st.integers(1, 9)),
                Lq=draw(st.integers(1, 6)), K=draw(st.integers(1, 4)),
                shapes=[(draw(st.integers(1, 7)), draw(st.integers(1, 7))) for _ in range(L)],
                seed=draw(st.integers(0, 2**31 - 1)))


@pytest.mark.parametrize("backend", [b for b in msda._BACKENDS if b != "numpy"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@given(case=op_case())
def test_backend_equals_reference(backend, dtype, case):
    ok, reason = msda.backend_status(backend)
    if not ok:
        pytest.skip(f"backend {backend!r} not available: {reason}")
    seed = case.pop("seed")
    rng = np.random.default_rng(seed)
    args = make_inputs(rng, dtype=dtype, **case)
    grad_out = rng.standard_normal((case["N"], case["Lq"], case["M"] * case["D"])).astype(dtype)
    expected = [msda.forward(*args, backend="numpy")]
    expected += msda.backward(grad_out, *args, backend="numpy")
    dev_args = on_device(args, backend)
    actual = [msda.forward(*dev_args, backend=backend)]
    actual += msda.backward(on_device([grad_out], backend)[0], *dev_args, backend=backend)
    names = ["output", "grad_value", "grad_sampling_locations", "grad_attention_weights"]
    for name, a, e in zip(names, actual, expected):
        assert a.dtype == dtype, f"{backend} {name}: dtype {a.dtype}, expected {dtype}"
        if dtype == np.float64:
            rtol, atol = 1e-10, 1e-10
        else:   # relative to the size of the array (float32 sums of up to L*K*4 terms)
            rtol, atol = 1e-5, 1e-5 * max(1.0, float(np.abs(to_numpy(e)).max()))
        assert_allclose(a, e, rtol=rtol, atol=atol,
                        what=f"{backend} vs reference, {name}, {np.dtype(dtype).name}, "
                             f"case {case}, seed {seed}")


@pytest.mark.parametrize("head_major", [True, False])
def test_numba_memory_layouts_agree_with_reference(head_major, rng):
    """The Numba kernels read the value head-major (a copy) or in place; both are exact."""
    from minidetr.ops.msda import numba_cpu
    args = msda.validate_inputs(*make_inputs(rng, N=2, shapes=[(3, 4), (2, 2)], M=3, D=5,
                                             Lq=4, K=2))
    g = rng.standard_normal((2, 4, 15))
    expected = [reference.forward(*args), *reference.backward(g, *args)]
    actual = [numba_cpu.forward(*args, head_major=head_major),
              *numba_cpu.backward(g, *args, head_major=head_major)]
    for name, a, e in zip(["output", "grad_value", "grad_loc", "grad_attn"], actual, expected):
        assert_allclose(a, e, rtol=1e-12, atol=1e-12, what=f"numba head_major={head_major} {name}")


def test_numba_parallel_path_is_exact_and_deterministic(rng):
    """Above SERIAL_BELOW points the kernels run on all threads; no races, same bits."""
    import numba

    from minidetr.ops.msda import numba_cpu
    args = make_inputs(rng, N=2, shapes=[(12, 16), (6, 8)], M=4, D=8, Lq=300, K=4,
                       dtype=np.float32, spread=1.1)
    points = args[3].size // 2
    assert points >= numba_cpu.SERIAL_BELOW and numba.get_num_threads() >= 1
    g = rng.standard_normal((2, 300, 32)).astype(np.float32)
    expected = [msda.forward(*args), *msda.backward(g, *args)]
    inputs = msda.validate_inputs(*args)
    for head_major in (True, False):
        first = [numba_cpu.forward(*inputs, head_major=head_major),
                 *numba_cpu.backward(g, *inputs, head_major=head_major)]
        for a, e in zip(first, expected):
            assert_allclose(a, e, rtol=1e-5, atol=1e-5 * float(np.abs(e).max()),
                            what=f"numba parallel, head_major={head_major}")
        for groups in (None, 1, 2, 4):     # 2 to 8 tasks on the threads: same bits, no races
            again = [numba_cpu.forward(*inputs, head_major=head_major, groups=groups),
                     *numba_cpu.backward(g, *inputs, head_major=head_major, groups=groups)]
            for name, a, b in zip(["output", "grad_value", "grad_loc", "grad_attn"], first,
                                  again):
                np.testing.assert_array_equal(
                    a, b, err_msg=f"parallel run again, head_major={head_major}, "
                                  f"groups={groups}: {name} differs")


def test_numba_head_groups_give_the_same_bits(rng):
    """The tasks split each image's heads into groups; every grouping gives equal bits.

    Each value row is owned by one task and receives its contributions query by query
    whatever the grouping, so the thread count cannot change the result.
    """
    from minidetr.ops.msda import numba_cpu
    args = msda.validate_inputs(*make_inputs(rng, N=2, shapes=[(5, 6), (3, 3)], M=4, D=6,
                                             Lq=7, K=3, dtype=np.float32))
    g = rng.standard_normal((2, 7, 24)).astype(np.float32)
    results = {}
    for groups in (1, 2, 4):
        for head_major in (True, False):
            results[groups, head_major] = [
                numba_cpu.forward(*args, head_major=head_major, groups=groups),
                *numba_cpu.backward(g, *args, head_major=head_major, groups=groups)]
    for key, arrays in results.items():
        for name, a, b in zip(["output", "grad_value", "grad_loc", "grad_attn"], arrays,
                              results[1, key[1]]):
            np.testing.assert_array_equal(a, b, err_msg=f"groups={key[0]} vs 1, "
                                                        f"head_major={key[1]}: {name}")


@pytest.mark.parametrize("N, M, threads, expected", [
    (2, 8, 2, 1),     # training batch on 2 cores: one task per image, all heads inside
    (1, 8, 2, 2),     # one image: two tasks of 4 heads
    (8, 4, 2, 1),
    (2, 8, 16, 8),    # many cores: one head per task
    (3, 8, 4, 4),     # 12 tasks on 4 threads, 3 each
    (1, 8, 3, 8),     # 8 tasks on 3 threads beat 4 (3/8 of the work at most, not 1/2)
    (2, 8, 1, 1),
])
def test_numba_head_groups_policy(N, M, threads, expected):
    from minidetr.ops.msda import numba_cpu
    groups = numba_cpu.head_groups(N, M, threads)
    assert groups == expected, f"head_groups({N}, {M}, {threads}) = {groups}, expected {expected}"
    assert M % groups == 0


def test_numba_is_the_default_on_the_cpu(rng):
    args = make_inputs(rng, N=1, shapes=[(2, 3)], M=1, D=2, Lq=2, K=1)
    assert msda.resolve_backend(None, args[0]) == "numba"
    assert {"numpy", "numba"} <= set(msda.available_backends())
    np.testing.assert_array_equal(msda.forward(*args, backend=None),
                                  msda.forward(*args, backend="numba"))


# --------------------------------------------------------------------------- errors
@pytest.fixture
def good(rng):
    return make_inputs(rng, N=2, shapes=[(2, 3), (1, 2)], M=2, D=4, Lq=3, K=2)


def _replace(args, i, new):
    return tuple(new if j == i else a for j, a in enumerate(args))


@pytest.mark.parametrize("i, bad, error, words", [
    (0, lambda a: a[0], ValueError, "value must have 4 dimensions"),
    (0, lambda a: a.astype(np.int32), TypeError, "value must be float32 or float64"),
    (0, lambda a: a[:, :-1], ValueError, "cover 8 positions"),
    (1, lambda a: a.astype(np.float64), TypeError, "spatial_shapes must hold integers"),
    (1, lambda a: a[:, :1], ValueError, "spatial_shapes must be (L, 2)"),
    (1, lambda a: a * 0, ValueError, "positive sizes"),
    (2, lambda a: a + 1, ValueError, "running sum"),
    (3, lambda a: a[..., :1], ValueError, "sampling_locations has shape"),
    (3, lambda a: a[:, :, :, :1], ValueError, "sampling_locations has shape"),
    (3, lambda a: a.astype(np.float32), TypeError, "share one dtype"),
    (4, lambda a: a[..., :1], ValueError, "attention_weights has shape"),
    (4, lambda a: a[:1], ValueError, "attention_weights has shape"),
    (4, lambda a: a[None], ValueError, "attention_weights must have 5 dimensions"),
])
def test_bad_inputs_give_clear_errors(good, i, bad, error, words):
    with pytest.raises(error, match=re.escape(words)):
        msda.forward(*_replace(good, i, bad(good[i])), backend="numba")


def test_bad_grad_output_and_backend_names(good):
    with pytest.raises(ValueError, match="grad_output has shape"):
        msda.backward(np.zeros((2, 3, 7)), *good, backend="numpy")
    with pytest.raises(ValueError, match="unknown MSDA backend"):
        msda.forward(*good, backend="fortran")


def test_registry_reports_missing_modules(monkeypatch):
    monkeypatch.setitem(msda._BACKENDS, "nowhere", "minidetr.ops.msda.does_not_exist")
    monkeypatch.setitem(msda._DEVICES, "nowhere", ("cpu",))
    msda.backend_status.cache_clear()
    try:
        ok, reason = msda.backend_status("nowhere")
        assert not ok and "does_not_exist" in reason
        assert "nowhere" not in msda.available_backends()
        with pytest.raises(RuntimeError, match="not available"):
            msda.forward(*make_inputs(np.random.default_rng(0), 1, [(1, 1)], 1, 1, 1, 1),
                         backend="nowhere")
    finally:
        msda.backend_status.cache_clear()
