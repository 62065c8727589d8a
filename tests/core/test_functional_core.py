"""The core Functions: elementwise, activation, reduce, shape and linalg.

For every Function (with several axis / keepdims / broadcasting variants):

* ``test_gradcheck``: float64 central differences (``minidetr.testing.gradcheck``);
* ``test_forward_matches_numpy``: the value against a direct NumPy/SciPy computation, on
  every backend (NumPy, and CuPy when a GPU is present);
* ``test_float32_stays_float32``: no silent upcast in forward or backward;
* ``test_gpu_matches_numpy``: forward and gradients on CuPy equal those on NumPy.

Then known values (max ties, repeated indices, large |x|), clear errors for bad input, and
Hypothesis property tests of broadcasting for the binary ops and batched matmul.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pytest
import scipy.special
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import minidetr.functional as F
from minidetr.autograd import Tensor
from minidetr.backend import cupy_available, to_numpy, why_no_cupy
from minidetr.functional._util import index_add
from minidetr.testing import assert_allclose, gradcheck

R = np.random.default_rng(20240611)     # inputs of the case table below (fixed seed)


def normal(*shape):
    return R.normal(size=shape)


def positive(*shape):
    """Values in [0.5, 2]: safe for log, sqrt, fractional powers and division."""
    return R.uniform(0.5, 2.0, size=shape)


def nonzero(*shape):
    """|values| in [0.3, 1.5] with random signs: safe for abs, division and relu's kink."""
    return R.uniform(0.3, 1.5, size=shape) * R.choice([-1.0, 1.0], size=shape)


def distinct(*shape, offset=0.0):
    """Values on a grid (spacing 0.5) plus ``offset``, shuffled: no ties, none near another.

    With offset 0.25 the values never come within 0.25 of a grid without offset, so
    maximum/minimum and max never see a tie within the finite-difference step.
    """
    n = int(np.prod(shape))
    return ((R.permutation(n) - n // 2) * 0.5 + offset).reshape(shape)


def like(t, array):
    """A constant array on the same backend as Tensor ``t``."""
    return t.xp.asarray(array)


@dataclass(frozen=True)
class Case:
    id: str
    fn: Callable          # Tensors -> Tensor
    ref: Callable         # NumPy arrays -> NumPy array: the direct computation
    inputs: tuple         # float64 NumPy arrays, each differentiated


def case(id, fn, ref, *inputs):
    return pytest.param(Case(id, fn, ref, tuple(inputs)), id=id)


def _weighted_concat(pieces, axis):
    """Piece i times (i + 1), joined again: a different weight per piece, so that a
    gradient sent to the wrong piece would show."""
    return F.concat([p * (i + 1) for i, p in enumerate(pieces)], axis)


def _np_getitem(idx):
    return lambda x: x[idx]


# Fixed index arrays used by the indexing cases.
MASK_23 = np.array([[True, False, True], [False, True, True]])
GATHER_IDX = np.array([[[0, 2, 2, 1]], [[1, 1, 0, 0]]])            # (2, 1, 4) into (2, 3, 4)
WHERE_COND = np.array([[True, False, True], [False, False, True]])

CASES = [
    # ---------------------------------------------------------------- elementwise, binary
    case("add", F.add, np.add, normal(2, 3), normal(3)),
    case("add-both-stretched", F.add, np.add, normal(2, 1), normal(1, 3)),
    case("add-python-number", lambda a: F.add(a, 2.5), lambda a: a + 2.5, normal(3)),
    case("sub", F.sub, np.subtract, normal(2, 1, 3), normal(4, 1)),
    case("sub-number-first", lambda a: F.sub(1.5, a), lambda a: 1.5 - a, normal(2, 2)),
    case("mul", F.mul, np.multiply, normal(2, 3), normal(2, 1)),
    case("div", F.div, np.divide, normal(3, 2), nonzero(2)),
    case("div-number-first", lambda a: F.div(2.0, a), lambda a: 2.0 / a, nonzero(4)),
    case("maximum", F.maximum, np.maximum, distinct(2, 3), distinct(3, offset=0.25)),
    case("minimum", F.minimum, np.minimum, distinct(2, 1), distinct(1, 3, offset=0.25)),
    # ---------------------------------------------------------------- elementwise, unary
    case("neg", F.neg, np.negative, normal(2, 3)),
    case("pow-3", lambda x: F.pow(x, 3), lambda x: x ** 3, normal(2, 3)),
    case("pow-half", lambda x: F.pow(x, 0.5), np.sqrt, positive(5)),
    case("pow-minus-1.5", lambda x: F.pow(x, -1.5), lambda x: x ** -1.5, positive(2, 2)),
    case("exp", F.exp, np.exp, normal(2, 3)),
    case("log", F.log, np.log, positive(2, 3)),
    case("sqrt", F.sqrt, np.sqrt, positive(2, 3)),
    case("abs", F.abs, np.abs, nonzero(2, 3)),
    case("clamp", lambda x: F.clamp(x, -0.5, 0.5), lambda x: np.clip(x, -0.5, 0.5),
         distinct(2, 3, offset=0.25) * 0.5),
    case("clamp-lo-only", lambda x: F.clamp(x, lo=0.0), lambda x: np.maximum(x, 0.0),
         nonzero(2, 3)),
    case("where", lambda a, b: F.where(like(a, WHERE_COND), a, b),
         lambda a, b: np.where(WHERE_COND, a, b), normal(2, 3), normal(3)),
    case("cast", lambda x: F.cast(x, np.float64) * 2, lambda x: x * 2, normal(3)),
    # ---------------------------------------------------------------- activation
    case("sigmoid", F.sigmoid, scipy.special.expit, normal(2, 3) * 4),
    case("relu", F.relu, lambda x: np.maximum(x, 0), nonzero(2, 3)),
    case("softplus", F.softplus, lambda x: np.logaddexp(0, x), normal(2, 3) * 4),
    case("log_sigmoid", F.log_sigmoid, scipy.special.log_expit, normal(2, 3) * 4),
    case("softmax-last", F.softmax, lambda x: scipy.special.softmax(x, axis=-1), normal(2, 3, 4)),
    case("softmax-axis0", lambda x: F.softmax(x, 0),
         lambda x: scipy.special.softmax(x, axis=0), normal(3, 2)),
    case("softmax-axis-2", lambda x: F.softmax(x, axis=-2),
         lambda x: scipy.special.softmax(x, axis=-2), normal(2, 3, 2)),
    case("log_softmax-last", F.log_softmax,
         lambda x: scipy.special.log_softmax(x, axis=-1), normal(2, 3, 4)),
    case("log_softmax-axis1", lambda x: F.log_softmax(x, 1),
         lambda x: scipy.special.log_softmax(x, axis=1), normal(2, 3, 2)),
    # ---------------------------------------------------------------- reduce
    case("sum-all", F.sum, np.sum, normal(2, 3)),
    case("sum-axis0", lambda x: F.sum(x, 0), lambda x: x.sum(0), normal(2, 3)),
    case("sum-axis-1-keepdims", lambda x: F.sum(x, -1, keepdims=True),
         lambda x: x.sum(-1, keepdims=True), normal(2, 3, 2)),
    case("sum-axes-0-2", lambda x: F.sum(x, (0, 2)), lambda x: x.sum((0, 2)), normal(2, 3, 2)),
    case("sum-axes-keepdims", lambda x: F.sum(x, (-1, 0), keepdims=True),
         lambda x: x.sum((0, 2), keepdims=True), normal(2, 3, 2)),
    case("sum-scalar", F.sum, np.sum, normal()),
    case("mean-all", F.mean, np.mean, normal(2, 3)),
    case("mean-axis1", lambda x: F.mean(x, 1), lambda x: x.mean(1), normal(2, 3, 2)),
    case("mean-axes-keepdims", lambda x: F.mean(x, (0, -1), keepdims=True),
         lambda x: x.mean((0, 2), keepdims=True), normal(2, 3, 2)),
    case("max-all", F.max, np.max, distinct(2, 3)),
    case("max-axis0", lambda x: F.max(x, 0), lambda x: x.max(0), distinct(3, 2)),
    case("max-axis-1-keepdims", lambda x: F.max(x, -1, keepdims=True),
         lambda x: x.max(-1, keepdims=True), distinct(2, 3, 2)),
    case("max-axes", lambda x: F.max(x, (0, 2)), lambda x: x.max((0, 2)), distinct(2, 3, 2)),
    case("cumsum-axis0", lambda x: F.cumsum(x, 0), lambda x: np.cumsum(x, 0), normal(3, 2)),
    case("cumsum-axis-1", lambda x: F.cumsum(x, -1), lambda x: np.cumsum(x, -1), normal(2, 2, 3)),
    # ---------------------------------------------------------------- shape
    case("reshape", lambda x: F.reshape(x, (3, -1)), lambda x: x.reshape(3, -1), normal(2, 3, 2)),
    case("reshape-int", lambda x: F.reshape(x, 6), lambda x: x.reshape(6), normal(2, 3)),
    case("permute", lambda x: F.permute(x, (2, 0, 1)), lambda x: x.transpose(2, 0, 1),
         normal(2, 3, 4)),
    case("permute-negative", lambda x: F.permute(x, (-1, 0, -2)),
         lambda x: x.transpose(2, 0, 1), normal(2, 3, 4)),
    case("transpose", lambda x: F.transpose(x, 0, -1), lambda x: np.swapaxes(x, 0, 2),
         normal(2, 3, 4)),
    case("flatten-all", F.flatten, lambda x: x.reshape(-1), normal(2, 3, 2)),
    case("flatten-from-1", lambda x: F.flatten(x, 1), lambda x: x.reshape(2, -1),
         normal(2, 3, 2)),
    case("flatten-middle", lambda x: F.flatten(x, 1, 2), lambda x: x.reshape(2, 6, 2),
         normal(2, 3, 2, 2)),
    case("unsqueeze-0", lambda x: F.unsqueeze(x, 0), lambda x: x[None], normal(2, 3)),
    case("unsqueeze-last", lambda x: F.unsqueeze(x, -1), lambda x: x[..., None], normal(2, 3)),
    case("squeeze", lambda x: F.squeeze(x, 1), lambda x: x[:, 0], normal(2, 1, 3)),
    case("squeeze-tuple", lambda x: F.squeeze(x, (0, -1)), lambda x: x[0, :, 0],
         normal(1, 3, 1)),
    case("expand", lambda x: F.expand(x, (2, 3, 4)),
         lambda x: np.broadcast_to(x, (2, 3, 4)), normal(3, 1)),
    case("expand-minus-1", lambda x: F.expand(x, (2, -1, 3)),
         lambda x: np.broadcast_to(x, (2, 2, 3)), normal(2, 1)),
    case("getitem-slices", lambda x: x[1:, ::-2], _np_getitem((slice(1, None), slice(None, None, -2))),
         normal(3, 4)),
    case("getitem-int-none-ellipsis", lambda x: x[0, None, ..., 1],
         _np_getitem((0, None, Ellipsis, 1)), normal(2, 3, 4)),
    case("getitem-repeated-ints", lambda x: x[[0, 2, 0, 0]], _np_getitem([0, 2, 0, 0]),
         normal(3, 2)),
    case("getitem-int-array-and-slice", lambda x: x[:, np.array([[1, 1], [0, 2]])],
         _np_getitem((slice(None), np.array([[1, 1], [0, 2]]))), normal(2, 3)),
    case("getitem-two-int-arrays", lambda x: x[[0, 1, 1], [2, 0, 2]],
         _np_getitem(([0, 1, 1], [2, 0, 2])), normal(2, 3)),
    case("getitem-bool-mask", lambda x: x[like(x, MASK_23)], _np_getitem(MASK_23),
         normal(2, 3, 2)),
    case("getitem-bool-axis1", lambda x: x[:, [True, False, True]],
         _np_getitem((slice(None), np.array([True, False, True]))), normal(2, 3)),
    case("gather", lambda x: F.gather(x, 1, like(x, GATHER_IDX)),
         lambda x: np.take_along_axis(x, GATHER_IDX, 1), normal(2, 3, 4)),
    case("gather-last-repeated", lambda x: F.gather(x, -1, like(x, np.array([[0, 0, 2], [1, 1, 1]]))),
         lambda x: np.take_along_axis(x, np.array([[0, 0, 2], [1, 1, 1]]), -1), normal(2, 3)),
    case("concat", lambda a, b, c: F.concat([a, b, c], 1),
         lambda a, b, c: np.concatenate([a, b, c], 1), normal(2, 1), normal(2, 3), normal(2, 2)),
    case("concat-negative-axis", lambda a, b: F.concat((a, b), axis=-1),
         lambda a, b: np.concatenate([a, b], -1), normal(2, 2, 1), normal(2, 2, 2)),
    case("concat-with-constant", lambda a: F.concat([a, like(a, np.ones((1, 3)))], 0),
         lambda a: np.concatenate([a, np.ones((1, 3))], 0), normal(2, 3)),
    case("stack", lambda a, b: F.stack([a, b]), lambda a, b: np.stack([a, b]),
         normal(2, 3), normal(2, 3)),
    case("stack-last", lambda a, b, c: F.stack([a, b, c], axis=-1),
         lambda a, b, c: np.stack([a, b, c], -1), normal(2, 2), normal(2, 2), normal(2, 2)),
    case("split-sizes", lambda x: _weighted_concat(F.split(x, [1, 3], 1), 1),
         lambda x: x * np.array([1.0, 2, 2, 2]), normal(2, 4)),
    case("split-int", lambda x: _weighted_concat(F.split(x, 2, axis=-1), -1),
         lambda x: x * np.array([1.0, 1, 2, 2, 3]), normal(2, 5)),
    # ---------------------------------------------------------------- linalg
    case("matmul-2d", F.matmul, np.matmul, normal(2, 3), normal(3, 4)),
    case("matmul-batched-broadcast", F.matmul, np.matmul, normal(2, 1, 2, 3), normal(3, 3, 2)),
    case("matmul-vector-left", F.matmul, np.matmul, normal(3), normal(2, 3, 2)),
    case("matmul-vector-right", F.matmul, np.matmul, normal(2, 2, 3), normal(3)),
    case("matmul-dot", F.matmul, np.matmul, normal(4), normal(4)),
    case("linear", F.linear, lambda x, w, b: x @ w.T + b, normal(2, 3, 4), normal(5, 4), normal(5)),
    case("linear-no-bias", F.linear, lambda x, w: x @ w.T, normal(3, 4), normal(2, 4)),
    case("linear-vector-input", F.linear, lambda x, w, b: w @ x + b, normal(4), normal(3, 4),
         normal(3)),
]


# --------------------------------------------------------------------------- every Function
@pytest.mark.parametrize("c", CASES)
def test_gradcheck(c):
    gradcheck(c.fn, list(c.inputs), name=c.id)


@pytest.mark.parametrize("c", CASES)
def test_forward_matches_numpy(c, xp):
    out = c.fn(*[Tensor(xp.asarray(a)) for a in c.inputs])
    assert out.xp is xp, f"{c.id}: the result left the {xp.__name__} backend"
    assert_allclose(out.data, c.ref(*c.inputs), rtol=1e-12, atol=1e-12, what=c.id)


@pytest.mark.parametrize("c", [p for p in CASES if p.values[0].id != "cast"])
def test_float32_stays_float32(c):
    tensors = [Tensor(a.astype(np.float32), requires_grad=True) for a in c.inputs]
    out = c.fn(*tensors)
    assert out.dtype == np.float32, f"{c.id}: forward gave {out.dtype}"
    out.backward(np.ones(out.shape, np.float32))     # the engine checks every grad's dtype
    for i, t in enumerate(tensors):
        assert t.grad is not None and t.grad.dtype == np.float32, f"{c.id}: input {i}"


@pytest.fixture
def cupy():
    if not cupy_available():
        pytest.skip(f"GPU backend not tested: {why_no_cupy()}")
    import cupy
    return cupy


def _forward_backward(fn, arrays, upstream):
    tensors = [Tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(out.xp.asarray(upstream))
    return to_numpy(out.data), [to_numpy(t.grad) for t in tensors]


@pytest.mark.gpu
@pytest.mark.parametrize("c", CASES)
def test_gpu_matches_numpy(c, cupy):
    upstream = np.random.default_rng(0).normal(size=np.shape(c.ref(*c.inputs)))
    out_np, grads_np = _forward_backward(c.fn, list(c.inputs), upstream)
    out_cp, grads_cp = _forward_backward(c.fn, [cupy.asarray(a) for a in c.inputs], upstream)
    assert_allclose(out_cp, out_np, rtol=1e-10, atol=1e-12, what=f"{c.id} forward")
    for i, (gc, gn) in enumerate(zip(grads_cp, grads_np)):
        assert_allclose(gc, gn, rtol=1e-10, atol=1e-12, what=f"{c.id} grad of input {i}")


# --------------------------------------------------------------------------- known values
def _grad_of(fn, x, upstream=None):
    t = Tensor(x, requires_grad=True)
    out = fn(t)
    out.backward(upstream)
    return t.grad


def test_cast_changes_dtype_and_casts_the_gradient_back():
    x = Tensor(np.array([1.0, 2.0], np.float32), requires_grad=True)
    y = F.cast(x, np.float64)
    assert y.dtype == np.float64
    y.backward(np.array([3.0, 4.0]))
    assert x.grad.dtype == np.float32 and x.grad.tolist() == [3.0, 4.0]


def test_max_splits_gradient_equally_among_ties(xp):
    x = xp.asarray([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 5.0, 0.0]])
    g = _grad_of(lambda t: F.max(t, axis=1).sum(), x)
    assert_allclose(g, [[0, 0.5, 0.5, 0], [1 / 3, 1 / 3, 1 / 3, 0]], rtol=1e-15, what="max ties")
    g = _grad_of(F.max, xp.asarray([2.0, 7.0, 7.0]))           # axis=None
    assert_allclose(g, [0, 0.5, 0.5], rtol=1e-15, what="max ties, all axes")


def test_getitem_repeated_indices_accumulate(xp):
    x = xp.asarray([10.0, 20.0, 30.0])
    g = _grad_of(lambda t: t[[0, 2, 0, 0]], x, xp.asarray([1.0, 2.0, 3.0, 4.0]))
    assert_allclose(g, [1 + 3 + 4, 0, 2], rtol=0, what="x[[0, 2, 0, 0]] backward")
    g = _grad_of(lambda t: F.gather(t, 0, xp.asarray([[1, 1], [1, 0]])),
                 xp.asarray([[1.0, 2.0], [3.0, 4.0]]), xp.ones((2, 2)))
    assert_allclose(g, [[0, 1], [2, 1]], rtol=0, what="gather backward with repeats")


def test_index_add_accumulates_where_plain_assignment_does_not(xp):
    target = xp.zeros((2, 3))
    index = (xp.asarray([1, 1, 0]), slice(None))
    index_add(xp, target, index, xp.ones((3, 3)))
    assert_allclose(target, [[1, 1, 1], [2, 2, 2]], rtol=0, what="index_add")
    naive = xp.zeros((2, 3))
    naive[index] += xp.ones((3, 3))                            # the trap index_add avoids
    assert to_numpy(naive)[1, 0] == 1


def test_cumsum_backward_is_reverse_cumsum():
    g = _grad_of(lambda t: F.cumsum(t, 0), np.zeros(4), np.array([1.0, 2.0, 3.0, 4.0]))
    assert_allclose(g, [10, 9, 7, 4], rtol=0, what="cumsum backward")


def test_mean_gradient_is_one_over_count():
    g = _grad_of(lambda t: F.mean(t, axis=(0, 2)).sum(), np.zeros((2, 3, 5)))
    assert_allclose(g, np.full((2, 3, 5), 1 / 10), rtol=1e-15, what="mean backward")


def test_activations_are_stable_for_large_inputs(xp):
    x = xp.asarray([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0], dtype=xp.float32)
    x64 = np.array([-1000.0, -100.0, -20.0, 0.0, 20.0, 100.0, 1000.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")                         # no overflow warnings either
        sig, sp, ls = F.sigmoid(x), F.softplus(x), F.log_sigmoid(x)
        sm, lsm = F.softmax(x), F.log_softmax(x)
        g = _grad_of(F.softplus, x, xp.ones(7, dtype=xp.float32))
    for name, got, want in [("sigmoid", sig, scipy.special.expit(x64)),
                            ("softplus", sp, np.logaddexp(0, x64)),
                            ("log_sigmoid", ls, scipy.special.log_expit(x64)),
                            ("softmax", sm, scipy.special.softmax(x64)),
                            ("log_softmax", lsm, scipy.special.log_softmax(x64)),
                            ("softplus grad", g, scipy.special.expit(x64))]:
        assert np.all(np.isfinite(to_numpy(got.data if isinstance(got, Tensor) else got))), name
        assert_allclose(got, want, rtol=1e-6, atol=1e-30, what=name)


def test_softmax_rows_sum_to_one_and_log_softmax_matches_log_of_softmax():
    x = np.random.default_rng(1).normal(size=(3, 5)) * 10
    assert_allclose(F.softmax(x, axis=0).sum(axis=0), np.ones(5), rtol=1e-14, what="sum")
    assert_allclose(F.log_softmax(x), np.log(F.softmax(x).data), rtol=1e-12, what="log")


def test_relu_gradient_at_zero_is_zero():
    g = _grad_of(lambda t: F.relu(t).sum(), np.array([-1.0, 0.0, 2.0]))
    assert_allclose(g, [0, 0, 1], rtol=0, what="relu grad")


def test_split_returns_pieces_like_torch_split():
    x = Tensor(np.arange(14.0).reshape(2, 7))
    assert [p.shape for p in F.split(x, 3, axis=1)] == [(2, 3), (2, 3), (2, 1)]
    assert [p.shape for p in F.split(x, [2, 5], axis=-1)] == [(2, 2), (2, 5)]
    assert_allclose(F.split(x, [2, 5], axis=1)[1], x.data[:, 2:], rtol=0, what="piece")


def test_plain_arrays_and_lists_are_accepted():
    assert F.sum([1.0, 2.0]).dtype == np.float32                  # Python floats: float32
    assert_allclose(F.softmax(np.zeros(4)), np.full(4, 0.25), rtol=0, what="softmax")
    assert F.concat([np.ones((1, 2)), [[2.0, 3.0]]]).shape == (2, 2)
    assert F.linear(np.ones((2, 3)), np.ones((4, 3))).shape == (2, 4)
    assert not F.matmul(np.ones((2, 3)), np.ones(3)).requires_grad


def test_linear_equals_matmul_plus_bias():
    r = np.random.default_rng(2)
    x, w, b = r.normal(size=(2, 5, 3)), r.normal(size=(4, 3)), r.normal(size=4)
    assert_allclose(F.linear(x, w, b), F.matmul(x, F.transpose(w, 0, 1)) + b, rtol=1e-13,
                    what="linear vs matmul")


def test_expand_result_is_a_broadcast_view_and_backward_sums():
    g = _grad_of(lambda t: F.expand(t, (4, 2, 3)), np.ones((2, 1)), np.ones((4, 2, 3)))
    assert_allclose(g, np.full((2, 1), 12.0), rtol=0, what="expand backward")


# --------------------------------------------------------------------------- errors
X23 = Tensor(np.zeros((2, 3), np.float32))


@pytest.mark.parametrize("call, error, words", [
    (lambda: F.softmax(X23, axis=2), ValueError, "softmax: axis 2"),
    (lambda: F.log_softmax(X23, axis=-3), ValueError, "log_softmax: axis -3"),
    (lambda: F.softmax(X23, axis=(0, 1)), TypeError, "softmax: axis must be an int"),
    (lambda: F.sum(X23, axis=(0, -2)), ValueError, "same axis twice"),
    (lambda: F.mean(X23, axis=5), ValueError, "mean: axis 5"),
    (lambda: F.max(X23, axis="a"), TypeError, "max: axis must be an int"),
    (lambda: F.max(np.zeros((0, 3))), ValueError, "empty"),
    (lambda: F.cumsum(X23, None), TypeError, "cumsum: axis must be an int"),
    (lambda: F.reshape(X23, (4, 2)), ValueError, "cannot reshape 6 elements"),
    (lambda: F.reshape(X23, (-1, -1)), ValueError, "one -1 at most"),
    (lambda: F.reshape(X23, (4, -1)), ValueError, "cannot infer"),
    (lambda: F.permute(X23, (0, 0)), ValueError, "not a permutation"),
    (lambda: F.transpose(X23, 0, 2), ValueError, "transpose: axis 2"),
    (lambda: F.flatten(X23, 1, 0), ValueError, "comes after"),
    (lambda: F.unsqueeze(X23, 3), ValueError, "unsqueeze: axis 3"),
    (lambda: F.squeeze(X23, 0), ValueError, "has size 2, not 1"),
    (lambda: F.expand(X23, (3, 3)), ValueError, "cannot expand shape (2, 3) to (3, 3)"),
    (lambda: F.expand(X23, (3,)), ValueError, "fewer dimensions"),
    (lambda: F.getitem(X23, np.array([0.5])), IndexError, "integer or boolean"),
    (lambda: F.gather(X23, 0, np.zeros(2, int)), ValueError, "index has 1 dimensions"),
    (lambda: F.gather(X23, 0, np.zeros((1, 3))), TypeError, "integer array"),
    (lambda: F.gather(X23, 1, np.zeros((3, 1), int)), ValueError, "does not broadcast"),
    (lambda: F.concat([X23, np.zeros((2, 3, 1), np.float32)]), ValueError, "differ outside"),
    (lambda: F.concat([X23, np.zeros((3, 2), np.float32)], axis=1), ValueError, "differ outside"),
    (lambda: F.concat([X23, Tensor(np.zeros((2, 3)))]), TypeError, "different dtypes"),
    (lambda: F.concat(X23), TypeError, "non-empty list"),
    (lambda: F.stack([]), TypeError, "non-empty list"),
    (lambda: F.stack([X23, np.zeros((3, 2), np.float32)]), ValueError, "one shape"),
    (lambda: F.split(X23, [1, 1], axis=1), ValueError, "do not add up to 3"),
    (lambda: F.split(X23, 0), ValueError, "must be positive"),
    (lambda: F.matmul(X23, np.zeros((2, 3), np.float32)), ValueError, "inner dimensions differ"),
    (lambda: F.matmul(X23, np.float32(2)), ValueError, "at least 1 dimension"),
    (lambda: F.matmul(np.zeros((2, 2, 3)), np.zeros((3, 3, 2))), ValueError, "do not broadcast"),
    (lambda: F.matmul(X23, Tensor(np.zeros((3, 2)))), TypeError, "different float dtypes"),
    (lambda: F.linear(X23, np.zeros((4, 2), np.float32)), ValueError, "in_features=2"),
    (lambda: F.linear(X23, np.zeros(3, np.float32)), ValueError, "must be 2-D"),
    (lambda: F.linear(X23, np.zeros((4, 3), np.float32), np.zeros(3, np.float32)), ValueError,
     "bias must have shape (4,)"),
    (lambda: F.linear(X23, Tensor(np.zeros((4, 3)))), TypeError, "different float dtypes"),
])
def test_bad_input_gives_a_clear_error(call, error, words):
    with pytest.raises(error) as info:
        call()
    assert words in str(info.value), f"message {str(info.value)!r} lacks {words!r}"


# --------------------------------------------------------------------------- properties
BINARY = {"add": (F.add, np.add), "sub": (F.sub, np.subtract), "mul": (F.mul, np.multiply),
          "div": (F.div, np.divide), "maximum": (F.maximum, np.maximum),
          "minimum": (F.minimum, np.minimum)}


@pytest.mark.parametrize("name", sorted(BINARY))
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
       seed=st.integers(0, 2**32 - 1))
def test_binary_ops_broadcast_like_numpy(name, shapes, seed):
    fn, ref = BINARY[name]
    (sa, sb), result = shapes
    r = np.random.default_rng(seed)
    # b: multiples of 0.5, never 0 (safe for div); a: multiples of 0.5 shifted by
    # 0.25 +- 0.05, so no a is within 0.2 of any b (no ties for maximum/minimum).
    b = np.asarray(r.integers(1, 5, size=sb) * 0.5 * r.choice([-1.0, 1.0], size=sb))
    a = np.asarray(r.integers(-4, 5, size=sa) * 0.5 + 0.25 + r.uniform(-0.05, 0.05, size=sa))
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    out = fn(ta, tb)
    assert out.shape == result
    assert_allclose(out, ref(a, b), rtol=1e-15, what=f"{name}{sa}{sb} forward")
    out.backward(np.ones(result))
    assert ta.grad.shape == sa and tb.grad.shape == sb
    gradcheck(fn, [a, b], name=f"{name}{sa}{sb}", seed=seed % 1000)


@given(shapes=mutually_broadcastable_shapes(signature="(m?,n),(n,p?)->(m?,p?)", max_dims=4,
                                            max_side=3),
       seed=st.integers(0, 2**32 - 1))
def test_matmul_batch_broadcasting_like_numpy(shapes, seed):
    (sa, sb), result = shapes
    r = np.random.default_rng(seed)
    a, b = r.normal(size=sa), r.normal(size=sb)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    out = F.matmul(ta, tb)
    assert out.shape == result
    assert_allclose(out, np.matmul(a, b), rtol=1e-12, atol=1e-12, what=f"matmul{sa}{sb}")
    out.backward(np.ones(result))
    assert ta.grad.shape == sa and tb.grad.shape == sb
    gradcheck(F.matmul, [a, b], name=f"matmul{sa}{sb}", seed=seed % 1000)


def test_pow_zero_exponent_has_zero_gradient_everywhere():
    x = Tensor(np.array([0.0, 2.0, -1.5]), requires_grad=True)
    F.pow(x, 0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 0.0, 0.0])


@pytest.mark.parametrize("fn", [F.maximum, F.minimum])
def test_maximum_minimum_propagate_nan_from_either_side(fn):
    a = np.array([np.nan, 1.0, 2.0])
    b = np.array([1.0, np.nan, 3.0])
    out = fn(Tensor(a), Tensor(b)).data
    assert np.isnan(out[0]) and np.isnan(out[1]), out
    assert out[2] == (3.0 if fn is F.maximum else 2.0)
