"""Shape Functions: move, select and join elements without doing arithmetic on them.

=====================  =========================================================
``reshape``            same elements, new shape (``-1`` = inferred)
``permute``            reorder the axes; ``transpose`` swaps two of them
``flatten``            merge the axes ``start..end`` into one
``unsqueeze/squeeze``  insert / remove an axis of size 1
``expand``             broadcast to a bigger shape (a view, no copy)
``getitem``            ``x[index]``: slices, ints, None, ..., integer and boolean arrays
``gather``             pick one element per position along an axis (take_along_axis)
``concat/stack``       join tensors along an existing / a new axis
``split``              cut a tensor into pieces along an axis (a list of getitems)
=====================  =========================================================

The backward of each is the inverse movement: reshape back, permute by the inverse
permutation, sum the broadcast copies (:func:`minidetr.autograd.unbroadcast`), or put the
selected gradient back where the elements came from (a scatter-add, :func:`index_add`).

Shapes: given in each function's docstring.

Derivation: docs/autograd.md, sections "Shape Functions: the backward is the inverse
movement" and "Selecting elements: scatter-add".
"""
from __future__ import annotations

import math

import numpy as np

from ..autograd import Function, Tensor, unbroadcast
from ..backend import get_array_module
from ._util import index_add, operand, single_axis, tensor_or_array


# --------------------------------------------------------------------------- reshape, permute
class Reshape(Function):
    """y = x.reshape(shape); the gradient is reshaped back to x's shape."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape), None


class Permute(Function):
    """y = x.transpose(axes): output axis i is input axis axes[i]."""

    @staticmethod
    def forward(ctx, x, axes):
        inverse = [0] * len(axes)
        for i, a in enumerate(axes):        # input axis a became output axis i
            inverse[a] = i
        ctx.inverse = tuple(inverse)
        return x.transpose(axes)

    @staticmethod
    def backward(ctx, grad):
        return grad.transpose(ctx.inverse), None


class Expand(Function):
    """Broadcast x to ``shape``; backward sums the copies with :func:`unbroadcast`."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return ctx.xp.broadcast_to(x, shape)

    @staticmethod
    def backward(ctx, grad):
        return unbroadcast(grad, ctx.shape), None


def _resolve_shape(name, shape, size):
    """``shape`` (an int or a sequence of ints, at most one -1) with the -1 filled in."""
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) for n in shape):
        raise TypeError(f"{name}: the shape must contain ints, got {shape!r}")
    shape = tuple(int(n) for n in shape)
    if shape.count(-1) > 1 or any(n < -1 for n in shape):
        raise ValueError(f"{name}: invalid shape {shape} (sizes must be >= 0, one -1 at most)")
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        if known == 0 or size % known:
            raise ValueError(f"{name}: cannot infer the -1 in {shape} for {size} elements")
        shape = tuple(size // known if n == -1 else n for n in shape)
    elif known != size:
        raise ValueError(f"{name}: cannot reshape {size} elements into shape {shape}")
    return shape


def reshape(x, shape):
    """The same elements in a new ``shape`` (one entry may be -1: inferred).

    Shapes: x (...) with n elements -> ``shape`` with n elements.
    """
    x = tensor_or_array(x)
    return Reshape.apply(x, _resolve_shape("reshape", shape, x.size))


def permute(x, axes):
    """Reorder the axes: output axis i is input axis ``axes[i]`` (negatives allowed).

    Shapes: x (d_0, ..., d_{n-1}) -> (d_axes[0], ..., d_axes[n-1]).
    """
    x = tensor_or_array(x)
    axes = tuple(single_axis("permute", a, x.ndim) for a in axes)
    if sorted(axes) != list(range(x.ndim)):
        raise ValueError(f"permute: axes {axes} are not a permutation of the "
                         f"{x.ndim} axes of a tensor of shape {tuple(x.shape)}")
    return Permute.apply(x, axes)


def transpose(x, a, b):
    """Swap axes ``a`` and ``b``. Shapes: (..., d_a, ..., d_b, ...) -> (..., d_b, ..., d_a, ...)."""
    x = tensor_or_array(x)
    a, b = single_axis("transpose", a, x.ndim), single_axis("transpose", b, x.ndim)
    axes = list(range(x.ndim))
    axes[a], axes[b] = b, a
    return Permute.apply(x, tuple(axes))


def flatten(x, start=0, end=-1):
    """Merge axes ``start`` to ``end`` (both included) into one.

    Shapes: (N, C, H, W) with start=2 -> (N, C, H*W); a 0-d tensor becomes (1,).
    """
    x = tensor_or_array(x)
    if x.ndim == 0:
        return Reshape.apply(x, (1,))
    start, end = single_axis("flatten", start, x.ndim), single_axis("flatten", end, x.ndim)
    if start > end:
        raise ValueError(f"flatten: start axis {start} comes after end axis {end}")
    s = tuple(x.shape)
    return Reshape.apply(x, s[:start] + (math.prod(s[start:end + 1]),) + s[end + 1:])


def unsqueeze(x, axis):
    """Insert an axis of size 1 at position ``axis`` (in -ndim-1 .. ndim).

    Shapes: (A, B) with axis=1 -> (A, 1, B); axis=-1 -> (A, B, 1).
    """
    x = tensor_or_array(x)
    axis = single_axis("unsqueeze", axis, x.ndim + 1)
    s = tuple(x.shape)
    return Reshape.apply(x, s[:axis] + (1,) + s[axis:])


def squeeze(x, axis):
    """Remove the size-1 axis ``axis`` (an int or a tuple of ints).

    Unlike PyTorch, naming an axis whose size is not 1 is an error, not a silent no-op.
    Shapes: (A, 1, B) with axis=1 -> (A, B).
    """
    x = tensor_or_array(x)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    axes = {single_axis("squeeze", a, x.ndim) for a in axes}
    for a in sorted(axes):
        if x.shape[a] != 1:
            raise ValueError(f"squeeze: axis {a} of shape {tuple(x.shape)} has size "
                             f"{x.shape[a]}, not 1")
    return Reshape.apply(x, tuple(n for i, n in enumerate(x.shape) if i not in axes))


def expand(x, shape):
    """Broadcast ``x`` to ``shape`` (numpy.broadcast_to); -1 keeps an existing size.

    Shapes: (3, 1) with shape (2, 3, 4) -> (2, 3, 4). The result is a read-only view.
    """
    x = tensor_or_array(x)
    shape = tuple(shape)
    new = len(shape) - x.ndim                          # axes prepended in front
    if new < 0:
        raise ValueError(f"expand: cannot expand shape {tuple(x.shape)} to fewer "
                         f"dimensions {shape}")
    target = []
    for i, n in enumerate(shape):
        have = x.shape[i - new] if i >= new else None
        if n == -1 and have is not None:
            n = have
        if have not in (None, 1, n) or n < 0:
            raise ValueError(f"expand: cannot expand shape {tuple(x.shape)} to {shape} "
                             f"(axis {i})")
        target.append(n)
    return Expand.apply(x, tuple(target))


# --------------------------------------------------------------------------- indexing
class GetItem(Function):
    """y = x[index]; the gradient goes back to the selected positions of a zero array.

    When ``index`` contains an integer array, the same element can be selected twice
    (``x[[0, 0]]``) and its gradients must add up: :func:`index_add` (a scatter-add) does
    that. Slices, ints, None, ... and boolean masks select each element at most once, so
    a plain assignment ``g[index] = grad`` suffices there (and is faster).
    """

    @staticmethod
    def forward(ctx, x, index):
        ctx.shape, ctx.index = x.shape, index
        return ctx.xp.asarray(x[index])

    @staticmethod
    def backward(ctx, grad):
        xp, index = ctx.xp, ctx.index
        g = xp.zeros(ctx.shape, dtype=grad.dtype)
        if any(_is_integer_array(i) for i in index):
            index_add(xp, g, index, grad)
        else:
            g[index] = grad
        return g, None


def _xp_of(x):
    """The array module of a Tensor or an array."""
    return get_array_module(x.data if isinstance(x, Tensor) else x)


def _is_integer_array(i):
    return hasattr(i, "ndim") and not isinstance(i, np.generic) and i.dtype.kind in "iu"


def _normalize_index(xp, index):
    """``index`` as a tuple whose arrays live on ``xp`` (lists and Tensors become arrays)."""
    if not isinstance(index, tuple):
        index = (index,)
    out = []
    for i in index:
        if isinstance(i, Tensor):
            i = i.data
        if isinstance(i, np.integer):
            i = int(i)
        elif isinstance(i, list):
            i = np.asarray(i)
            if i.size == 0:                            # x[[]]: an empty integer index
                i = i.astype(np.intp)
        if hasattr(i, "dtype") and hasattr(i, "ndim"):
            if i.dtype.kind not in "biu":
                raise IndexError(f"getitem: index arrays must be integer or boolean, "
                                 f"got dtype {i.dtype}")
            i = xp.asarray(i)
        out.append(i)
    return tuple(out)


def getitem(x, index):
    """``x[index]`` with NumPy semantics: basic slicing, ints, None, Ellipsis, integer
    arrays (repeats allowed: their gradients add up) and boolean masks.

    Shapes: as NumPy's indexing, e.g. x (N, Lq, C): x[:, 0] (N, C); x[mask] with mask
    (N, Lq) gives (number of True, C); x[[0, 0, 1]] (3, Lq, C).
    """
    x = tensor_or_array(x)
    return GetItem.apply(x, _normalize_index(_xp_of(x), index))


class Gather(Function):
    """y[..., j, ...] = x[..., index[..., j, ...], ...] along ``axis`` (take_along_axis).

    Backward scatters each gradient back to the element it was taken from, adding up
    where the same element was taken several times (:func:`index_add`).
    """

    @staticmethod
    def forward(ctx, x, axis, index):
        ctx.shape, ctx.axis = x.shape, axis
        ctx.save_for_backward(index)
        return ctx.xp.take_along_axis(x, index, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        xp, axis = ctx.xp, ctx.axis
        index, = ctx.saved_tensors
        ndim = grad.ndim
        # Build a full integer index: along `axis` use `index`; along every other axis d
        # the position itself (arange), or 0 where x had size 1 and was broadcast.
        where = []
        for d in range(ndim):
            if d == axis:
                where.append(index)
                continue
            n = grad.shape[d]
            pos = xp.arange(n) if ctx.shape[d] == n else xp.zeros(n, dtype=np.intp)
            where.append(pos.reshape((1,) * d + (n,) + (1,) * (ndim - 1 - d)))
        g = xp.zeros(ctx.shape, dtype=grad.dtype)
        index_add(xp, g, tuple(where), grad)
        return g, None, None


def gather(x, axis, index):
    """Pick elements of ``x`` along ``axis`` at the positions in ``index``
    (``numpy.take_along_axis`` semantics; like ``torch.gather``).

    Shapes: x (A, B, C), axis=1, index (A, J, C) integer -> (A, J, C); the axes other
    than ``axis`` of ``x`` and ``index`` broadcast against each other.
    """
    x = tensor_or_array(x)
    axis = single_axis("gather", axis, x.ndim)
    index = _xp_of(x).asarray(index.data if isinstance(index, Tensor) else index)
    if index.dtype.kind not in "iu":
        raise TypeError(f"gather: index must be an integer array, got dtype {index.dtype}")
    if index.ndim != x.ndim:
        raise ValueError(f"gather: index has {index.ndim} dimensions, x has {x.ndim} "
                         f"(shapes {tuple(index.shape)} and {tuple(x.shape)})")
    others_x = tuple(1 if d == axis else n for d, n in enumerate(x.shape))
    others_i = tuple(1 if d == axis else n for d, n in enumerate(index.shape))
    try:
        np.broadcast_shapes(others_x, others_i)
    except ValueError:
        raise ValueError(f"gather: index shape {tuple(index.shape)} does not broadcast "
                         f"against x shape {tuple(x.shape)} outside axis {axis}") from None
    return Gather.apply(x, axis, index)


# --------------------------------------------------------------------------- join and split
class Concat(Function):
    """y = the inputs laid end to end along ``axis``; backward slices the gradient apart."""

    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.axis = axis
        ctx.bounds = np.cumsum([0] + [a.shape[axis] for a in arrays]).tolist()
        return ctx.xp.concatenate(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        lead = (slice(None),) * ctx.axis                  # select along `axis` only
        b = ctx.bounds
        return tuple(grad[lead + (slice(b[i], b[i + 1]),)] if need else None
                     for i, need in enumerate(ctx.needs_input_grad))


class Stack(Function):
    """y = the inputs stacked along a new ``axis``; backward takes each slice back."""

    @staticmethod
    def forward(ctx, *arrays, axis):
        ctx.axis = axis
        return ctx.xp.stack(arrays, axis=axis)

    @staticmethod
    def backward(ctx, grad):
        lead = (slice(None),) * ctx.axis
        return tuple(grad[lead + (i,)] if need else None
                     for i, need in enumerate(ctx.needs_input_grad))


def _operands(name, tensors):
    """A non-empty list of Tensors/arrays of one dtype (constants take the Tensors' dtype)."""
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)) or not tensors:
        raise TypeError(f"{name}: expected a non-empty list of tensors")
    ref = next((t for t in tensors if isinstance(t, Tensor)), None)
    if ref is None:
        ref = tensor_or_array(tensors[0])
    items = [operand(t, ref) for t in tensors]
    dtypes = {str(t.dtype) for t in items}
    if len(dtypes) > 1:
        raise TypeError(f"{name}: the tensors have different dtypes {sorted(dtypes)}; "
                        "cast them to one with .astype()")
    return items


def concat(tensors, axis=0):
    """Join tensors along an existing ``axis``.

    Shapes: (A, B1, C), (A, B2, C) with axis=1 -> (A, B1 + B2, C).
    """
    items = _operands("concat", tensors)
    ndim = items[0].ndim
    axis = single_axis("concat", axis, ndim)
    for t in items:
        ok = t.ndim == ndim and all(t.shape[d] == items[0].shape[d]
                                    for d in range(ndim) if d != axis)
        if not ok:
            raise ValueError(f"concat: shapes {[tuple(t.shape) for t in items]} differ "
                             f"outside axis {axis}")
    return Concat.apply(*items, axis=axis)


def stack(tensors, axis=0):
    """Join tensors of one shape along a new ``axis`` (in -ndim-1 .. ndim).

    Shapes: T tensors (A, B) with axis=0 -> (T, A, B); with axis=-1 -> (A, B, T).
    """
    items = _operands("stack", tensors)
    shapes = {tuple(t.shape) for t in items}
    if len(shapes) > 1:
        raise ValueError(f"stack: tensors must have one shape, got {sorted(shapes)}")
    axis = single_axis("stack", axis, items[0].ndim + 1)
    return Stack.apply(*items, axis=axis)


def split(x, sizes, axis=0):
    """Cut ``x`` along ``axis`` into pieces; returns a list of Tensors.

    ``sizes`` is a list of piece sizes that add up to ``x.shape[axis]``, or one int: pieces
    of that size, the last one smaller if needed (as ``torch.split``). Each piece is a
    :func:`getitem` with a slice, so its backward is the getitem backward (a zero array
    of x's shape per piece, summed by the engine: simple, at the cost of memory).

    Shapes: (A, 10, C), sizes [3, 7], axis=1 -> [(A, 3, C), (A, 7, C)].
    """
    x = tensor_or_array(x)
    axis = single_axis("split", axis, x.ndim)
    total = x.shape[axis]
    if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool):
        if sizes <= 0:
            raise ValueError(f"split: the section size must be positive, got {sizes}")
        sizes = [min(int(sizes), total - start) for start in range(0, total, int(sizes))]
    sizes = [int(s) for s in sizes]
    if any(s < 0 for s in sizes) or sum(sizes) != total:
        raise ValueError(f"split: sizes {sizes} do not add up to {total}, the size of "
                         f"axis {axis} of shape {tuple(x.shape)}")
    lead = (slice(None),) * axis
    pieces, start = [], 0
    for s in sizes:
        pieces.append(GetItem.apply(x, lead + (slice(start, start + s),)))
        start += s
    return pieces

