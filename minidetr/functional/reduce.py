"""Reductions: sum, mean, max over one or more axes, and the running sum cumsum.

Shapes: ``axis`` is None (every axis), an int or a tuple of ints (negatives allowed).
With ``keepdims=False`` the reduced axes disappear; with ``keepdims=True`` they stay with
size 1. For x (2, 3, 4): ``sum(x, axis=1)`` is (2, 4), ``sum(x, axis=(0, -1), keepdims=True)``
is (1, 3, 1), ``sum(x)`` is () (a scalar).

Every backward first puts the removed axes back as size-1 axes (:func:`_keepdims_shape`),
so that the gradient broadcasts against the input: each input element receives the
gradient of the output element it was reduced into.

Derivation: docs/autograd.md, sections "Broadcasting in backward: unbroadcast" (sum,
mean, max) and "Running sum" (cumsum).
"""
from __future__ import annotations

import math

from ..autograd import Function
from ._util import single_axis, tensor_or_array


def _axes(name, axis, ndim):
    """``axis`` (None, int or tuple of ints) as a sorted tuple of distinct non-negative ints."""
    if axis is None:
        return tuple(range(ndim))
    items = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    axes = tuple(single_axis(name, a, ndim) for a in items)
    if len(set(axes)) != len(axes):
        raise ValueError(f"{name}: axis {axis!r} names the same axis twice")
    return tuple(sorted(axes))


def _keepdims_shape(shape, axes):
    """``shape`` with the reduced ``axes`` set to 1: (2, 3, 4), (1,) -> (2, 1, 4)."""
    return tuple(1 if i in axes else n for i, n in enumerate(shape))


class Sum(Function):
    """y = sum of x over ``axes``; every input element gets the gradient of its sum."""

    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.shape, ctx.axes = x.shape, axes
        return ctx.xp.asarray(x.sum(axis=axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(_keepdims_shape(ctx.shape, ctx.axes))   # reduced axes back, size 1
        return ctx.xp.broadcast_to(g, ctx.shape).copy(), None, None


class Mean(Function):
    """y = sum of x over ``axes`` / n, n = the number of elements averaged."""

    @staticmethod
    def forward(ctx, x, axes, keepdims):
        ctx.shape, ctx.axes = x.shape, axes
        ctx.n = math.prod(x.shape[a] for a in axes)        # a Python int: keeps grad's dtype
        return ctx.xp.asarray(x.mean(axis=axes, keepdims=keepdims))

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(_keepdims_shape(ctx.shape, ctx.axes)) / ctx.n
        return ctx.xp.broadcast_to(g, ctx.shape).copy(), None, None


class Max(Function):
    """y = max of x over ``axes``.

    The gradient goes to the element(s) that attain the maximum. When several elements tie
    for the maximum, the gradient is split equally among them (each gets 1/count), so the
    total gradient is the same as with a single maximum. (PyTorch's ``amax`` does the same;
    ``torch.max(dim)`` picks one index instead.)
    """

    @staticmethod
    def forward(ctx, x, axes, keepdims):
        xp = ctx.xp
        y = x.max(axis=axes, keepdims=True)                 # (…, 1, …): broadcasts against x
        if ctx.needs_input_grad[0]:
            is_max = x == y
            count = is_max.sum(axis=axes, keepdims=True, dtype=x.dtype)
            ctx.save_for_backward(is_max / count)           # each max's share, summing to 1
        ctx.axes = axes
        return xp.asarray(y if keepdims else y.reshape(tuple(
            n for i, n in enumerate(y.shape) if i not in axes)))

    @staticmethod
    def backward(ctx, grad):
        share, = ctx.saved_tensors
        g = grad.reshape(_keepdims_shape(share.shape, ctx.axes))
        return share * g, None, None


class Cumsum(Function):
    """y_i = x_0 + ... + x_i along ``axis``.

    x_j appears in every y_i with i >= j, so dL/dx_j = sum_{i >= j} g_i: the cumulative
    sum of the gradient taken from the end, i.e. flip, cumsum, flip.
    """

    @staticmethod
    def forward(ctx, x, axis):
        ctx.axis = axis
        return ctx.xp.cumsum(x, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp, axis = ctx.xp, ctx.axis
        return xp.flip(xp.cumsum(xp.flip(grad, axis), axis=axis), axis), None


# --------------------------------------------------------------------------- user-facing
def sum(x, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy.sum
    """Sum over ``axis`` (None: all axes; int or tuple; negatives allowed)."""
    x = tensor_or_array(x)
    return Sum.apply(x, _axes("sum", axis, x.ndim), bool(keepdims))


def mean(x, axis=None, keepdims=False):
    """Mean over ``axis`` (None: all axes; int or tuple; negatives allowed)."""
    x = tensor_or_array(x)
    return Mean.apply(x, _axes("mean", axis, x.ndim), bool(keepdims))


def max(x, axis=None, keepdims=False):  # noqa: A001 - mirrors numpy.max
    """Maximum over ``axis``; tied maxima share the gradient equally (see :class:`Max`)."""
    x = tensor_or_array(x)
    if x.size == 0:
        raise ValueError(f"max: the tensor of shape {tuple(x.shape)} is empty")
    return Max.apply(x, _axes("max", axis, x.ndim), bool(keepdims))


def cumsum(x, axis):
    """Running sum along one ``axis``; same shape as ``x``."""
    x = tensor_or_array(x)
    return Cumsum.apply(x, single_axis("cumsum", axis, x.ndim))
