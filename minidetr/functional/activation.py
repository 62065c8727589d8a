"""Activation Functions: sigmoid, relu, softmax, log_softmax, softplus, log_sigmoid.

Shapes: every function maps an array of any shape to an array of the same shape;
``softmax`` and ``log_softmax`` normalise along one ``axis`` (default the last).

Numerical stability is the theme of this file. ``exp`` overflows float32 above about 88,
so no formula here ever exponentiates a large positive number:

* sigmoid, softplus and log_sigmoid are written with ``e = exp(-|x|)``, which lies in (0, 1];
* softmax and log_softmax subtract the maximum along ``axis`` first, which changes
  nothing mathematically (the shift cancels) and makes the largest exponent ``exp(0) = 1``.

Derivation: docs/autograd.md, sections "Softmax and log-softmax", "Sigmoid, softplus,
log-sigmoid: the numerically stable forms" and "Kinks and ties: which subgradient the
code takes" (relu).
"""
from __future__ import annotations

from ..autograd import Function
from ._util import cpu_kernels_apply, single_axis, tensor_or_array


def _stable_sigmoid(xp, x):
    """1 / (1 + exp(-x)) without overflow: with e = exp(-|x|) in (0, 1],
    sigmoid(x) = 1 / (1 + e) for x >= 0 and e / (1 + e) for x < 0 (same value, no inf)."""
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


# --------------------------------------------------------------------------- pointwise
class Sigmoid(Function):
    """y = 1 / (1 + exp(-x)); dy/dx = y (1 - y)."""

    @staticmethod
    def forward(ctx, x):
        y = _stable_sigmoid(ctx.xp, x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return grad * y * (1 - y)


class ReLU(Function):
    """y = max(x, 0); the gradient is 1 where x > 0 and 0 elsewhere (0 at the kink x = 0).

    A NaN propagates (``maximum`` returns it, as PyTorch's relu does) and gets gradient 0.
    Forward saves its own output y, which costs nothing (the next layer keeps it alive
    anyway), and backward recovers the mask from it: y > 0 exactly where x > 0.
    (``maximum`` is one pass; ``where(x > 0, x, 0)`` took 10x longer on NumPy.) NumPy
    float32/float64 C-contiguous arrays take two Numba kernels (:mod:`.relu_cpu`) that
    give exactly these values, 2-3x faster.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.fused = cpu_kernels_apply(x)
        if ctx.fused:
            from . import relu_cpu                                     # Numba, on first use
            y = relu_cpu.relu_forward(x)
        else:
            y = ctx.xp.maximum(x, x.dtype.type(0))
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        if ctx.fused and cpu_kernels_apply(grad, y):
            from . import relu_cpu
            return relu_cpu.relu_backward(grad, y)
        return grad * (y > 0)                  # bool mask: 0 at the kink and at NaN


class Softplus(Function):
    """y = log(1 + exp(x)) = max(x, 0) + log(1 + exp(-|x|)); dy/dx = sigmoid(x)."""

    @staticmethod
    def forward(ctx, x):
        xp = ctx.xp
        ctx.save_for_backward(x)
        return xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * _stable_sigmoid(ctx.xp, x)


class LogSigmoid(Function):
    """y = log(sigmoid(x)) = -softplus(-x) = min(x, 0) - log(1 + exp(-|x|));
    dy/dx = 1 - sigmoid(x) = sigmoid(-x)."""

    @staticmethod
    def forward(ctx, x):
        xp = ctx.xp
        ctx.save_for_backward(x)
        return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * _stable_sigmoid(ctx.xp, -x)


# --------------------------------------------------------------------------- along an axis
class Softmax(Function):
    """y_i = exp(x_i) / sum_j exp(x_j) along ``axis``.

    Backward (docs/autograd.md): dL/dx = y * (g - sum(g * y, axis)), with g = dL/dy.
    Along the last axis of a NumPy float32/float64 C-contiguous array, both passes run a
    fused Numba kernel (:mod:`.softmax_cpu`); the code below is the reference.
    """

    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        ctx.fused = axis == x.ndim - 1 and cpu_kernels_apply(x)
        if ctx.fused:
            from . import softmax_cpu                                  # Numba, on first use
            y = softmax_cpu.softmax_forward(x)
            ctx.save_for_backward(y)
            return y
        xp = ctx.xp
        e = xp.exp(x - x.max(axis=axis, keepdims=True))   # largest exponent is exp(0) = 1
        y = e / e.sum(axis=axis, keepdims=True)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        if ctx.fused:
            from . import softmax_cpu
            return softmax_cpu.softmax_backward(ctx.xp.ascontiguousarray(grad), y), None
        dot = (grad * y).sum(axis=ctx.axis, keepdims=True)  # sum_j g_j y_j, one per row
        return y * (grad - dot), None


class LogSoftmax(Function):
    """y_i = x_i - log sum_j exp(x_j) along ``axis``.

    Backward (docs/autograd.md): dL/dx = g - softmax(x) * sum(g, axis), with g = dL/dy.
    """

    @staticmethod
    def forward(ctx, x, axis):
        xp = ctx.xp
        z = x - x.max(axis=axis, keepdims=True)           # shift so that max(z) = 0
        y = z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
        ctx.save_for_backward(y)
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        softmax = ctx.xp.exp(y)                           # exp(log softmax) = softmax
        return grad - softmax * grad.sum(axis=ctx.axis, keepdims=True), None


# --------------------------------------------------------------------------- user-facing
def sigmoid(x):
    """The logistic function 1 / (1 + exp(-x)), exact for large |x| (no overflow)."""
    return Sigmoid.apply(tensor_or_array(x))


def relu(x):
    """max(x, 0) elementwise."""
    return ReLU.apply(tensor_or_array(x))


def softplus(x):
    """log(1 + exp(x)), computed without overflow."""
    return Softplus.apply(tensor_or_array(x))


def log_sigmoid(x):
    """log(sigmoid(x)), computed without overflow or log(0) for large |x|."""
    return LogSigmoid.apply(tensor_or_array(x))


def softmax(x, axis=-1):
    """exp(x) normalised to sum to 1 along ``axis``.

    Shapes: x (...) -> (...) (same shape).
    """
    x = tensor_or_array(x)
    return Softmax.apply(x, single_axis("softmax", axis, x.ndim))


def log_softmax(x, axis=-1):
    """log(softmax(x, axis)), computed as x - max - log(sum(exp(x - max))).

    Shapes: x (...) -> (...) (same shape).
    """
    x = tensor_or_array(x)
    return LogSoftmax.apply(x, single_axis("log_softmax", axis, x.ndim))
