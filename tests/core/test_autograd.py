"""The autograd engine (minidetr/autograd.py): Tensor, Function, backward, no_grad.

What is checked: gradients of a tensor used several times add up; gradients accumulate
over backward calls; no_grad records nothing; the engine's shape/dtype guard names the
Function at fault; retain_grad; a freed graph gives a clear error; unbroadcast; dtype
mismatches; the Tensor operators and methods; .to('cpu'); detach.
"""
from __future__ import annotations

import numpy as np
import pytest

import minidetr.functional as F
from minidetr.autograd import Function, Tensor, is_grad_enabled, no_grad, unbroadcast
from minidetr.backend import cupy_available
from minidetr.testing import GradcheckError, assert_allclose, gradcheck


def leaf(values, dtype=np.float64):
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# --------------------------------------------------------------------------- the walk
def test_a_tensor_used_twice_gets_the_sum_of_both_gradients():
    x = leaf([1.0, -2.0, 3.0])
    y = (x * x + x).sum()                       # dy/dx = 2x + 1
    y.backward()
    assert_allclose(x.grad, [3.0, -3.0, 7.0], rtol=0, what="d(x*x + x)/dx")


def test_diamond_graph():
    x = leaf([0.5, 2.0])
    a, b = F.exp(x), x * 3.0                    # two paths from x ...
    (a * b).sum().backward()                    # ... meeting again: d/dx = 3 e^x (x + 1)
    assert_allclose(x.grad, 3 * np.exp(x.data) * (x.data + 1), rtol=1e-14, what="diamond")


def test_gradients_accumulate_over_backward_calls_until_zero_grad():
    x = leaf([1.0, 2.0])
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    assert_allclose(x.grad, [5.0, 5.0], rtol=0, what="accumulated grad")
    x.zero_grad()
    assert x.grad is None


def test_a_long_chain_does_not_hit_the_recursion_limit():
    x = leaf([1.0])
    y = x
    for _ in range(3000):
        y = y + 1.0
    y.sum().backward()
    assert x.grad.tolist() == [1.0]


def test_constants_get_no_gradient():
    x, c = leaf([1.0, 2.0]), Tensor(np.array([3.0, 4.0]))
    (x * c).sum().backward()
    assert c.grad is None and not c.requires_grad
    assert_allclose(x.grad, [3.0, 4.0], rtol=0, what="grad")


# --------------------------------------------------------------------------- grad mode
def test_no_grad_records_nothing_and_restores_the_mode():
    x = leaf([1.0])
    with no_grad():
        assert not is_grad_enabled()
        y = x * 2.0
    assert is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.backward()
    with pytest.raises(KeyError):
        with no_grad():
            raise KeyError("inside")
    assert is_grad_enabled(), "no_grad must restore the mode after an exception"


# --------------------------------------------------------------------------- the guards
class WrongShape(Function):
    """Deliberately broken: its backward returns a gradient of the wrong shape."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad.sum(axis=0)


class WrongDtype(Function):
    """Deliberately broken: its backward upcasts the gradient to float64."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(np.float64)


class WrongCount(Function):
    """Deliberately broken: two gradients for one input."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad, grad


@pytest.mark.parametrize("fn, words", [
    (WrongShape, "WrongShape produced a gradient of shape (3,)"),
    (WrongDtype, "WrongDtype produced a gradient of shape (2, 3) and dtype float64"),
    (WrongCount, "WrongCount.backward returned 2 gradients for 1 inputs"),
])
def test_the_engine_names_the_function_whose_backward_is_wrong(fn, words):
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    y = fn.apply(x).sum()
    with pytest.raises(RuntimeError) as info:
        y.backward()
    assert words in str(info.value)


def test_gradcheck_catches_a_wrong_backward():
    class Doubling(Function):                   # claims d(x^2)/dx = x instead of 2x
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x * x

        @staticmethod
        def backward(ctx, grad):
            x, = ctx.saved_tensors
            return grad * x

    with pytest.raises(GradcheckError, match="input 0 at index"):
        gradcheck(Doubling.apply, [np.array([1.0, 2.0])])


def test_backward_argument_checks():
    x = leaf([1.0, 2.0])
    with pytest.raises(RuntimeError, match="needs a scalar"):
        (x * 2.0).backward()
    with pytest.raises(RuntimeError, match=r"backward\(\) argument produced a gradient of shape \(3,\)"):
        (x * 2.0).backward(np.ones(3))
    with pytest.raises(TypeError, match="only floating-point tensors"):
        Tensor(np.array([1, 2]), requires_grad=True)


def test_retain_grad_keeps_an_intermediate_gradient():
    x = leaf([1.0, 2.0])
    h = x * 3.0
    kept = (x * 5.0).retain_grad()
    (h * h + kept).sum().backward()
    assert h.grad is None, "non-leaf gradients are dropped unless retained"
    assert_allclose(kept.grad, [1.0, 1.0], rtol=0, what="retained grad")
    assert_allclose(x.grad, 18 * x.data + 5, rtol=0, what="leaf grad")


def test_backward_twice_through_a_freed_graph_is_a_clear_error():
    x = leaf([1.0, 2.0])
    y = F.exp(x)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="graph through Exp was already freed"):
        (y * 2.0).sum().backward()


def test_mixed_float_dtypes_are_an_error_not_an_upcast():
    a = Tensor(np.ones(2, np.float32))
    b = Tensor(np.ones(2, np.float64))
    for op in (F.add, F.mul, F.maximum, F.matmul):
        with pytest.raises(TypeError, match="different float dtypes"):
            op(a, b)
    # a plain Python float or a constant array takes the Tensor's dtype instead
    assert (a * 0.5).dtype == np.float32 and (a + np.ones(2)).dtype == np.float32


# --------------------------------------------------------------------------- unbroadcast
@pytest.mark.parametrize("grad_shape, shape, axes", [
    ((2, 3), (2, 3), None),                     # nothing to do
    ((2, 3), (3,), (0,)),                       # a prepended axis
    ((2, 3), (1, 3), (0,)),                     # a stretched size-1 axis
    ((2, 3), (2, 1), (1,)),
    ((4, 2, 3), (2, 1), (0, 2)),                # both at once
    ((4, 2, 3), (), (0, 1, 2)),                 # a scalar
    ((4, 1, 3), (1, 1, 3), (0,)),               # size 1 in both: nothing summed there
])
def test_unbroadcast_sums_the_broadcast_axes(grad_shape, shape, axes):
    g = np.random.default_rng(0).normal(size=grad_shape)
    out = unbroadcast(g, shape)
    want = g if axes is None else g.sum(axis=axes)
    assert out.shape == shape
    assert_allclose(out, want.reshape(shape), rtol=1e-14, what=f"{grad_shape} -> {shape}")
    if axes is None:
        assert out is g, "a gradient of the right shape is returned as is"


# --------------------------------------------------------------------------- Tensor API
def test_operators_match_numpy_and_mix_with_numbers_and_arrays():
    a = np.array([[1.0, 2.0], [3.0, 4.0]])
    b = np.array([0.5, -1.5])
    t, u = Tensor(a), Tensor(b)
    cases = {
        "t + u": (t + u, a + b), "u + t": (u + t, b + a), "t - 1": (t - 1.0, a - 1),
        "2 - t": (2.0 - t, 2 - a), "t * u": (t * u, a * b), "3 * t": (3.0 * t, 3 * a),
        "t / u": (t / u, a / b), "1 / t": (1.0 / t, 1 / a), "-t": (-t, -a),
        "t ** 2": (t ** 2, a ** 2), "t @ t": (t @ t, a @ a), "array @ t": (a @ t, a @ a),
        "array + t": (b + t, b + a), "t[1]": (t[1], a[1]), "t[:, ::-1]": (t[:, ::-1], a[:, ::-1]),
        "t.T": (t.T, a.T), "t.sum()": (t.sum(), a.sum()), "t.mean(0)": (t.mean(0), a.mean(0)),
        "t.max(axis=1, keepdims=True)": (t.max(axis=1, keepdims=True), a.max(1, keepdims=True)),
        "t.reshape(4)": (t.reshape(4), a.reshape(4)), "t.view(1, 4)": (t.view(1, 4), a.reshape(1, 4)),
        "t.reshape((4, 1))": (t.reshape((4, 1)), a.reshape(4, 1)),
        "t.transpose(0, 1)": (t.transpose(0, 1), a.T), "t.permute(1, 0)": (t.permute(1, 0), a.T),
        "t.flatten()": (t.flatten(), a.ravel()), "t.exp()": (t.exp(), np.exp(a)),
        "t.log()": (t.log(), np.log(a)), "t.sqrt()": (t.sqrt(), np.sqrt(a)),
        "u.abs()": (u.abs(), np.abs(b)), "t.relu()": (t.relu(), a),
        "t.sigmoid()": (t.sigmoid(), 1 / (1 + np.exp(-a))),
        "t.softmax()": (t.softmax(), np.exp(a) / np.exp(a).sum(-1, keepdims=True)),
        "t.clamp(2, 3)": (t.clamp(2.0, 3.0), np.clip(a, 2, 3)),
        "t.unsqueeze(0)": (t.unsqueeze(0), a[None]), "t[None].squeeze(0)": (t[None].squeeze(0), a),
    }
    for name, (got, want) in cases.items():
        assert isinstance(got, Tensor), name
        assert_allclose(got, want, rtol=1e-15, what=name)
    assert (t < 2.5).tolist() == [[True, True], [False, False]]
    assert (t >= 2.0).sum() == 3 and (t > u).dtype == bool and (t <= 1.0).sum() == 1


def test_tensor_facts():
    t = Tensor([1.0, 2.0, 3.0])
    assert t.dtype == np.float32, "Python floats become float32"
    assert (t.shape, t.ndim, t.size, len(t), t.device) == ((3,), 1, 3, 3, "cpu")
    assert Tensor(np.zeros(2)).dtype == np.float64, "an array keeps its dtype"
    assert Tensor(np.array(2.5)).item() == 2.5
    assert "requires_grad=True" in repr(leaf([1.0]))
    assert "grad_fn=Mul" in repr(leaf([1.0]) * 2.0)
    assert t.astype(np.float64).dtype == np.float64


def test_to_cpu_and_numpy():
    t = leaf([1.0, 2.0])
    assert t.to("cpu") is t, "a tensor already on the CPU is returned as is"
    assert isinstance(t.numpy(), np.ndarray) and t.numpy().tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="unknown device"):
        t.to("tpu")
    if not cupy_available():
        with pytest.raises(RuntimeError, match="cannot move to 'cuda'"):
            t.to("cuda")


def test_to_cuda_and_back(xp):
    if xp is np:
        pytest.skip("a NumPy-only run: the round trip needs a GPU")
    t = leaf([1.0, 2.0])
    g = t.to("cuda")
    assert g.device == "cuda" and g.requires_grad and g.is_leaf
    back = g.to("cpu")
    assert back.device == "cpu" and back.numpy().tolist() == [1.0, 2.0]


def test_detach_cuts_the_graph_and_shares_the_data():
    x = leaf([1.0, 2.0])
    d = (x * 2.0).detach()
    assert not d.requires_grad and d.is_leaf
    y = (x * d).sum()                           # d is a constant here
    y.backward()
    assert_allclose(x.grad, [2.0, 4.0], rtol=0, what="grad through a detached factor")
    assert x.detach().data is x.data


def test_leaf_gradients_never_share_memory_with_each_other_or_the_caller():
    # The engine hands a fresh gradient array to a leaf without copying it; an array
    # that another .grad or the caller holds, or a view, is copied (clipping scales
    # .grad in place, so shared memory would scale twice).
    a = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    b = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    upstream = np.full((2, 3), 2.0, np.float32)
    (a + b).backward(upstream)                  # Add's backward passes one array to both
    assert not np.shares_memory(a.grad, b.grad), "a.grad and b.grad share memory"
    assert not np.shares_memory(a.grad, upstream) and not np.shares_memory(b.grad, upstream)
    a.grad *= 0.5                               # what clip_grad_norm_ does
    np.testing.assert_array_equal(b.grad, upstream, err_msg="scaling a.grad changed b.grad")
    np.testing.assert_array_equal(upstream, np.full((2, 3), 2.0, np.float32),
                                  err_msg="the caller's gradient was changed")
    c = Tensor(np.ones(3, np.float32), requires_grad=True)
    (F.expand(c.reshape(1, 3), (4, 3)) * 1.0).sum().backward()   # a broadcast view upstream
    c.grad *= 2
    np.testing.assert_array_equal(c.grad, np.full(3, 8.0, np.float32))


def test_the_engine_refuses_a_gradient_on_another_device():
    """A backward that hands back a host array for a device tensor is named (the check's
    fast path compares array types first, and the slow path must still catch this)."""
    from minidetr.testing import fakecupy

    class ToHost(Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return fakecupy.unwrap(grad) * 2            # a NumPy array: the wrong device

    with fakecupy.installed() as cp:
        x = Tensor(cp.ones((2, 3), dtype=cp.float32), requires_grad=True)
        y = ToHost.apply(x).sum()
        with pytest.raises(RuntimeError, match="ToHost produced a gradient on another device"):
            y.backward()
