"""The cheap NumPy paths of elementwise Functions give exactly what the plain formulas give.

* ``widen_inner`` / ``long_inner_loops`` (minidetr/functional/elementwise.py): a small
  operand stretched over short trailing runs is copied wider first; the values, and so
  the results of Add, Sub, Mul, Div and their gradients, are bit-identical to plain
  NumPy broadcasting.
* ReLU: ``maximum(x, 0)`` forward (NaN propagates, as in PyTorch), gradient 0 at x = 0.
"""
from __future__ import annotations

import numpy as np
import pytest

import minidetr.functional as F
from minidetr.autograd import Tensor
from minidetr.functional.elementwise import SHORT_RUN, long_inner_loops, widen_inner
from minidetr.testing import gradcheck

R = np.random.default_rng(7)


def assert_identical(actual, desired, what):
    """Bit-identical arrays (same shape and dtype), else name the first differing element."""
    actual, desired = np.asarray(actual), np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} vs {desired.shape}"
    assert actual.dtype == desired.dtype, f"{what}: dtype {actual.dtype} vs {desired.dtype}"
    differ = ~((actual == desired) | (np.isnan(actual) & np.isnan(desired)))
    if differ.any():
        k = tuple(int(i) for i in np.argwhere(differ)[0])
        raise AssertionError(f"{what}: {int(differ.sum())} elements differ; first at {k}: "
                             f"{actual[k]!r} vs {desired[k]!r}")


# --------------------------------------------------------------------------- widen_inner
@pytest.mark.parametrize("small, out, wide", [
    ((1, 1, 1, 4, 1, 2), (2, 136, 8, 4, 4, 2), (1, 1, 1, 4, 4, 2)),     # MSDA normaliser
    ((2, 136, 1, 4, 1, 2), (2, 136, 8, 4, 4, 2), (2, 136, 1, 4, 4, 2)),  # reference points
    ((1, 1, 3), (50, 40, 3), (1, 40, 3)),                                # (x, y, z) scales
])
def test_widen_inner_copies_a_short_run_wider(small, out, wide):
    x = R.normal(size=small).astype(np.float32)
    got = widen_inner(x, out)
    assert got.shape == wide, f"widened {small} in {out} to {got.shape}, expected {wide}"
    assert got.flags.c_contiguous, "the widened copy must be contiguous"
    assert_identical(got, np.broadcast_to(x, wide), "widened values")


@pytest.mark.parametrize("shape, out", [
    ((1, 64, 1, 1), (2, 64, 32, 32)),        # stretched over a long trailing run: fast already
    ((2, 64, 32, 32), (2, 64, 32, 32)),      # not broadcast
    ((1, 1, 32), (20, 300, 32)),             # inner run 32 >= SHORT_RUN
    ((20, 300, 1), (20, 300, 2)),            # the copy would be as large as the output
])
def test_widen_inner_leaves_fast_layouts_alone(shape, out):
    x = R.normal(size=shape)
    assert widen_inner(x, out) is x, f"{shape} in {out} should not be copied"


def test_short_run_threshold_is_what_it_says():
    # an inner run of exactly SHORT_RUN is long enough
    x = R.normal(size=(1, 1, SHORT_RUN))
    assert widen_inner(x, (64, 64, SHORT_RUN)) is x


def test_long_inner_loops_ignores_other_array_modules():
    class FakeXp:        # CuPy has no inner loops to lengthen: arrays pass unchanged
        pass
    a, b = R.normal(size=(2, 136, 8, 4, 4, 2)), R.normal(size=(1, 1, 1, 4, 1, 2))
    got_a, got_b = long_inner_loops(FakeXp(), a, b)
    assert got_a is a and got_b is b


@pytest.mark.parametrize("op, fn", [("add", np.add), ("sub", np.subtract),
                                    ("mul", np.multiply), ("div", np.divide)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_binary_ops_bit_identical_to_plain_broadcasting(op, fn, dtype):
    a = R.normal(size=(2, 136, 8, 4, 4, 2)).astype(dtype)
    b = R.uniform(0.5, 2.0, size=(2, 136, 1, 4, 1, 2)).astype(dtype)
    g = R.normal(size=a.shape).astype(dtype)
    ta, tb = Tensor(a, requires_grad=True), Tensor(b, requires_grad=True)
    y = getattr(F, op)(ta, tb)
    assert_identical(y.data, fn(a, b), f"{op} forward")
    y.backward(g)
    ga = {"add": g, "sub": g, "mul": g * b, "div": g / b}[op]
    gb = {"add": g, "sub": -g, "mul": g * a, "div": -g * a / (b * b)}[op]
    assert_identical(ta.grad, ga, f"{op} grad of a")
    assert_identical(tb.grad, gb.sum(axis=(2, 4), keepdims=True), f"{op} grad of b")
    # the other order: the small operand first
    ta2, tb2 = Tensor(b, requires_grad=True), Tensor(a, requires_grad=True)
    y2 = getattr(F, op)(ta2, tb2)
    assert_identical(y2.data, fn(b, a), f"{op} forward, small operand first")


# --------------------------------------------------------------------------- ReLU
def test_relu_propagates_nan_and_zeroes_its_gradient():
    x = Tensor(np.array([np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf], dtype=np.float32),
               requires_grad=True)
    y = F.relu(x)
    assert np.isnan(y.data[0]), f"relu(NaN) must be NaN (as PyTorch's relu), got {y.data[0]}"
    assert_identical(y.data[1:], np.array([0, 0, 2, 0, np.inf], np.float32), "relu forward")
    y.backward(np.ones(6, np.float32))
    assert_identical(x.grad, np.array([0, 0, 0, 1, 0, 1], np.float32),
                     "relu grad (0 at NaN, at the kink and below)")


def test_relu_gradcheck_float64():
    x = R.uniform(0.3, 1.5, size=(3, 5)) * R.choice([-1.0, 1.0], size=(3, 5))
    gradcheck(F.relu, [x])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1,), (3, 5, 7), (2, 64, 9, 9)])
def test_relu_kernels_equal_the_reference_exactly(dtype, shape):
    from minidetr.functional import relu_cpu
    x = R.normal(size=shape).astype(dtype)
    x.flat[::7] = 0.0                                          # kinks
    x.flat[3::11] = np.nan                                     # NaNs
    g = R.normal(size=shape).astype(dtype)
    g.flat[::5] = np.inf                                       # inf * 0 = NaN, as g * mask
    y = relu_cpu.relu_forward(x)
    assert_identical(y, np.maximum(x, dtype(0)), f"relu kernel forward {shape}")
    with np.errstate(invalid="ignore"):                        # inf * 0 on purpose
        want = g * (y > 0)
    assert_identical(relu_cpu.relu_backward(g, y), want, f"relu kernel backward {shape}")


def test_relu_function_same_on_kernel_and_reference_paths():
    base = R.normal(size=(6, 5)).astype(np.float32)
    g = R.normal(size=(5, 6)).astype(np.float32)
    outs = []
    for x in (np.ascontiguousarray(base.T), base.T):          # kernel, then a strided view
        t = Tensor(x, requires_grad=True)
        y = F.relu(t)
        y.backward(g)
        outs.append((y.data, t.grad))
    assert_identical(outs[0][0], outs[1][0], "relu forward: kernel vs reference")
    assert_identical(outs[0][1], outs[1][1], "relu grad: kernel vs reference")
