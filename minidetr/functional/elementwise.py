"""Elementwise Functions: arithmetic with broadcasting, and the unary maths.

Shapes: inputs broadcast as in NumPy; the output has the broadcast shape. Every backward
sums the gradient back to each input's shape with :func:`minidetr.autograd.unbroadcast`.

Derivation: docs/autograd.md, sections "Arithmetic", "Powers, exponential, logarithm,
square root", "Kinks and ties: which subgradient the code takes" (abs, clamp, maximum,
minimum, where), "Cast" and "Broadcasting in backward: unbroadcast".
"""
from __future__ import annotations

import math

import numpy as np

from ..autograd import Function, unbroadcast
from ._util import operand, same_float_dtype


# --------------------------------------------------------------------------- short inner loops
# NumPy runs a broadcast operation as an outer loop over calls of an inner loop, and the
# inner loop covers only the trailing axes over which every operand is either contiguous
# or stretched (stride 0). In ``offsets / normalizer`` of deformable attention, offsets
# (N, Lq, M, L, K, 2) and normalizer (1, 1, 1, L, 1, 2), the normalizer is stretched
# over K but not over the last axis, so the inner loop is 2 elements long and the
# division is 8x slower than a contiguous one. Copying the small operand stretched over
# its trailing axes first, (1, 1, 1, L, K, 2) here, makes the inner loop L*K*2 long. The
# values are the same (the copy only repeats elements), so the results are bit-identical.
SHORT_RUN = 16       # inner loops shorter than this many elements are widened
SMALL_OUTPUT = 4096  # below this many output elements the call overhead dominates anyway


def _inner_run(shape, out_shape):
    """Elements of NumPy's inner loop for an operand of ``shape`` (padded to the output's
    rank) broadcast to ``out_shape``: the trailing output axes (size-1 axes skipped) over
    which the operand is all stretched or all full."""
    run, stretched = 1, None
    for have, n in zip(reversed(shape), reversed(out_shape)):
        if n == 1:
            continue
        if stretched is None:
            stretched = have == 1
        elif (have == 1) != stretched:
            break
        run *= n
    return run


def widen_inner(x, out_shape):
    """``x`` itself, or a contiguous copy of ``x`` stretched over its trailing axes when
    NumPy's inner loop for ``x`` broadcast to ``out_shape`` would be shorter than
    ``SHORT_RUN`` elements and the copy is at most a quarter of the output.

    Shapes: x (..., 1, ..., n) -> x or (..., out_shape[k], ..., out_shape[-1]) for the
    last stretched axis k that gives a long enough inner loop; e.g. (1, 1, 1, 4, 1, 2)
    for out (2, 1360, 8, 4, 4, 2) -> (1, 1, 1, 4, 4, 2).
    """
    n = len(out_shape)
    shape = (1,) * (n - x.ndim) + tuple(x.shape)                       # padded to rank n
    if _inner_run(shape, out_shape) >= SHORT_RUN:
        return x
    total = math.prod(out_shape)
    for k in reversed(range(n)):
        if shape[k] != 1 or out_shape[k] == 1:                         # not a stretched axis
            continue
        wide = shape[:k] + tuple(out_shape[k:])                        # stretched from axis k on
        if 4 * math.prod(wide) > total:
            return x
        if _inner_run(wide, out_shape) >= SHORT_RUN:
            return np.ascontiguousarray(np.broadcast_to(x.reshape(shape), wide))
    return x


def long_inner_loops(xp, a, b):
    """``(a, b)`` with a small, awkwardly stretched operand widened (:func:`widen_inner`);
    NumPy only (CuPy runs one thread per element and has no inner loop to lengthen)."""
    if xp is not np or a.shape == b.shape or a.size == 1 or b.size == 1:
        return a, b                           # (a one-element operand is one long run)
    out_shape = np.broadcast_shapes(a.shape, b.shape)
    if math.prod(out_shape) < SMALL_OUTPUT:
        return a, b
    return widen_inner(a, out_shape), widen_inner(b, out_shape)


# --------------------------------------------------------------------------- binary
class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        a, b = long_inner_loops(ctx.xp, a, b)
        return a + b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if na else None,
                unbroadcast(grad, sb) if nb else None)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.shapes = (a.shape, b.shape)
        a, b = long_inner_loops(ctx.xp, a, b)
        return a - b

    @staticmethod
    def backward(ctx, grad):
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad, sa) if na else None,
                unbroadcast(-grad, sb) if nb else None)


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        a, b = long_inner_loops(ctx.xp, a, b)
        return a * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        ga, gb = long_inner_loops(ctx.xp, grad, b) if na else (None, None)
        ha, hb = long_inner_loops(ctx.xp, grad, a) if nb else (None, None)
        return (unbroadcast(ga * gb, a.shape) if na else None,
                unbroadcast(ha * hb, b.shape) if nb else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        a, b = long_inner_loops(ctx.xp, a, b)
        return a / b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        na, nb = ctx.needs_input_grad
        # d(a/b)/da = 1/b ; d(a/b)/db = -a/b^2
        g, b_wide = long_inner_loops(ctx.xp, grad, b) if na else (None, None)
        return (unbroadcast(g / b_wide, a.shape) if na else None,
                unbroadcast(-grad * a / (b * b), b.shape) if nb else None)


class _Select(Function):
    """Shared forward/backward of maximum and minimum: pick ``a`` or ``b`` elementwise.

    ``take_a`` marks where ``a`` was picked; the gradient goes to the picked operand
    only (on ties to ``a``, as NumPy picks it).
    """

    @staticmethod
    def take_a(a, b):  # pragma: no cover - defined by the subclasses
        raise NotImplementedError

    @classmethod
    def forward(cls, ctx, a, b):
        take_a = cls.take_a(a, b)
        ctx.save_for_backward(take_a)
        ctx.shapes = (a.shape, b.shape)
        return ctx.xp.where(take_a, a, b)

    @staticmethod
    def backward(ctx, grad):
        take_a, = ctx.saved_tensors
        sa, sb = ctx.shapes
        na, nb = ctx.needs_input_grad
        return (unbroadcast(grad * take_a, sa) if na else None,
                unbroadcast(grad * ~take_a, sb) if nb else None)


class Maximum(_Select):
    """max(a, b) elementwise; on ties the gradient goes to ``a``."""

    @staticmethod
    def take_a(a, b):
        return (a >= b) | (a != a)          # a NaN in ``a`` is picked (and propagates)


class Minimum(_Select):
    """min(a, b) elementwise; on ties the gradient goes to ``a``."""

    @staticmethod
    def take_a(a, b):
        return (a <= b) | (a != a)          # a NaN in ``a`` is picked (and propagates)


def _binary(fn, a, b):
    a2, b2 = operand(a, b), operand(b, a)
    same_float_dtype(fn.__name__, a2, b2)
    return fn.apply(a2, b2)


def add(a, b):
    """a + b with broadcasting."""
    return _binary(Add, a, b)


def sub(a, b):
    """a - b with broadcasting."""
    return _binary(Sub, a, b)


def mul(a, b):
    """a * b with broadcasting."""
    return _binary(Mul, a, b)


def div(a, b):
    """a / b with broadcasting."""
    return _binary(Div, a, b)


def maximum(a, b):
    """Elementwise maximum with broadcasting."""
    return _binary(Maximum, a, b)


def minimum(a, b):
    """Elementwise minimum with broadcasting."""
    return _binary(Minimum, a, b)


# --------------------------------------------------------------------------- unary
class Neg(Function):
    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, grad):
        return -grad


class Pow(Function):
    """x ** p for a constant exponent p (a Python number)."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.save_for_backward(x)
        ctx.p = p
        return x ** p

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        if ctx.p == 0:                       # x ** 0 is constant (avoid 0 * 0 ** -1 = NaN)
            return ctx.xp.zeros_like(grad), None
        return grad * ctx.p * x ** (ctx.p - 1), None


class Exp(Function):
    @staticmethod
    def forward(ctx, x):
        y = ctx.xp.exp(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return grad * y


class Log(Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.log(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad / x


class Sqrt(Function):
    @staticmethod
    def forward(ctx, x):
        y = ctx.xp.sqrt(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, = ctx.saved_tensors
        return grad / (2 * y)


class Abs(Function):
    """|x|; the subgradient at 0 is 0 (numpy.sign)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return ctx.xp.abs(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * ctx.xp.sign(x)


class Clamp(Function):
    """Clip to [lo, hi] (either may be None); the gradient is 0 where x was clipped."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        xp = ctx.xp
        inside = xp.ones(x.shape, dtype=bool)
        if lo is not None:
            inside &= x >= lo
        if hi is not None:
            inside &= x <= hi
        ctx.save_for_backward(inside)
        return xp.clip(x, lo, hi).astype(x.dtype, copy=False)

    @staticmethod
    def backward(ctx, grad):
        inside, = ctx.saved_tensors
        return grad * inside, None, None


class Where(Function):
    """cond ? a : b with broadcasting; ``cond`` is a boolean array (no gradient)."""

    @staticmethod
    def forward(ctx, cond, a, b):
        ctx.save_for_backward(cond)
        ctx.shapes = (a.shape, b.shape)
        return ctx.xp.where(cond, a, b)

    @staticmethod
    def backward(ctx, grad):
        cond, = ctx.saved_tensors
        sa, sb = ctx.shapes
        _, na, nb = ctx.needs_input_grad
        zero = grad.dtype.type(0)
        return (None,
                unbroadcast(ctx.xp.where(cond, grad, zero), sa) if na else None,
                unbroadcast(ctx.xp.where(cond, zero, grad), sb) if nb else None)


class Cast(Function):
    """Change the dtype; the gradient is cast back."""

    @staticmethod
    def forward(ctx, x, dtype):
        ctx.dtype = x.dtype
        return x.astype(dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.astype(ctx.dtype), None


def neg(x):
    return Neg.apply(x)


def pow(x, p):
    """x ** p, p a Python number."""
    if not isinstance(p, (int, float)):
        raise TypeError(f"pow: the exponent must be a Python number, got {type(p).__name__}")
    return Pow.apply(x, p)


def exp(x):
    return Exp.apply(x)


def log(x):
    return Log.apply(x)


def sqrt(x):
    return Sqrt.apply(x)


def abs(x):  # noqa: A001 - mirrors numpy.abs
    return Abs.apply(x)


def clamp(x, lo=None, hi=None):
    """Clip ``x`` to [lo, hi]; either bound may be None."""
    return Clamp.apply(x, lo, hi)


def where(cond, a, b):
    """``a`` where ``cond`` is True, else ``b`` (cond: a boolean array or Tensor)."""
    from ..autograd import Tensor
    c = cond.data if isinstance(cond, Tensor) else cond
    a2, b2 = operand(a, b), operand(b, a)
    same_float_dtype("where", a2, b2)
    return Where.apply(c, a2, b2)


def cast(x, dtype):
    """``x`` as ``dtype`` (differentiable between float dtypes)."""
    return Cast.apply(x, dtype)
