"""The autograd core: Tensor, Function, the backward engine and no_grad.

The whole engine, in one screen of ideas:

* A :class:`Tensor` wraps an array (NumPy or CuPy) and remembers the :class:`Function`
  application (a :class:`Node`) that produced it.
* A :class:`Function` has two static methods over *raw arrays*: ``forward(ctx, *args)``
  returns the output array, ``backward(ctx, grad)`` returns one gradient per input
  (``None`` for inputs that need none). ``ctx`` carries what forward saved.
* ``Function.apply(*args)`` unwraps Tensors, runs forward, wraps the result and, when a
  gradient is needed, records the Node (the edge to the inputs).
* ``Tensor.backward()`` sorts the recorded graph topologically and walks it in reverse,
  summing the gradients of tensors used more than once, checking every gradient's shape
  and dtype against its tensor, and freeing each Node's saved arrays once used.

Broadcasting in backward is handled in exactly one place: :func:`unbroadcast`.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager

import numpy as np

from .backend import device_of, get_array_module, parse_device, to_device

DEFAULT_DTYPE = np.float32

# --------------------------------------------------------------------------- grad mode
# Whether operations record a graph. Thread-local, like PyTorch's grad mode, so that a
# data-loading thread can never switch it off for the training thread.
_grad_mode = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_grad_mode, "enabled", True)


@contextmanager
def no_grad():
    """Run a block without recording the graph (evaluation, optimiser steps)."""
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


# --------------------------------------------------------------------------- profiling
# The profiler installed on this thread by :func:`profiling` (``bench profile``), else
# None. Thread-local like grad mode; the only cost when off is one attribute read per
# Function application and one per backward walk (a class attribute gives the default:
# ``getattr(local, name, None)`` on a missing name costs ten times more).
class _Profiling(threading.local):
    profiler = None


_profiling = _Profiling()


@contextmanager
def profiling(profiler):
    """Let ``profiler`` watch this thread's Functions and backward walks (restored on exit).

    While active, ``Function.apply`` hands every application to
    ``profiler.apply(cls, args, kwargs)`` (which runs it with ``cls._apply(*args, **kwargs)``),
    and the backward engine runs each node through ``profiler.backward(node, grad)``
    (which returns ``node.fn.backward(node.ctx, grad)``). Used by
    :mod:`minidetr.bench.profile`; nothing else in minidetr installs a profiler.
    """
    previous = _profiling.profiler
    _profiling.profiler = profiler
    try:
        yield profiler
    finally:
        _profiling.profiler = previous


# --------------------------------------------------------------------------- helpers
def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the backward of NumPy broadcasting.

    Broadcasting prepends axes of size 1 and stretches axes of size 1; the gradient of a
    stretched input is the sum over the stretched axes. Every elementwise Function calls
    this, and nothing else in minidetr handles broadcasting in backward.
    """
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)                     # axes that were prepended
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def as_array(x, dtype=None, like=None):
    """Turn a Python number, list or array into an array (of ``like``'s module/dtype)."""
    if isinstance(x, Tensor):
        return x.data
    xp = get_array_module(like) if like is not None else get_array_module(x)
    if dtype is None and like is not None and not hasattr(x, "dtype"):
        dtype = like.dtype
    arr = xp.asarray(x, dtype=dtype)
    if dtype is None and arr.dtype == np.float64 and not hasattr(x, "dtype"):
        arr = arr.astype(DEFAULT_DTYPE)               # Python floats default to float32
    return arr


# --------------------------------------------------------------------------- Tensor
class Tensor:
    """An array plus what autograd needs: ``grad``, ``requires_grad`` and its creator.

    ``Tensor(data)`` accepts a NumPy/CuPy array (kept as is, no copy) or anything
    ``numpy.asarray`` accepts (Python floats become float32).
    """

    __array_priority__ = 1000          # make ndarray + Tensor call Tensor.__radd__

    def __init__(self, data, requires_grad: bool = False, dtype=None):
        if dtype is not None or type(data) is not np.ndarray:     # (an ndarray is kept as is)
            data = as_array(data, dtype=dtype)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, got {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._node = None               # the Node that produced this tensor (None: leaf)
        self._retain_grad = False

    # -- array-like facts
    shape = property(lambda self: self.data.shape)
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    size = property(lambda self: self.data.size)
    device = property(lambda self: device_of(self.data))
    xp = property(lambda self: get_array_module(self.data))
    is_leaf = property(lambda self: self._node is None)

    def __len__(self):
        return len(self.data)

    def __repr__(self):
        rg = ", requires_grad=True" if self.requires_grad else ""
        fn = f", grad_fn={self._node.fn.__name__}" if self._node is not None else ""
        return f"Tensor(shape={self.shape}, dtype={self.dtype}, device={self.device}{rg}{fn})"

    def numpy(self):
        """The data as a NumPy array (copied from the GPU when needed)."""
        return to_device(self.data, "cpu")

    def item(self):
        return self.data.item()

    def detach(self) -> "Tensor":
        """The same data, cut from the graph (no gradient flows through it)."""
        return Tensor(self.data)

    def to(self, device: str) -> "Tensor":
        """A copy on ``'cpu'`` or ``'cuda'`` (the tensor itself if it is already there).

        The copy is a new leaf: move parameters before building a graph with them.
        """
        if device_of(self.data) == ("cpu" if parse_device(device) == "cpu" else "cuda"):
            return self
        return Tensor(to_device(self.data, device), requires_grad=self.requires_grad)

    def astype(self, dtype) -> "Tensor":
        return _F().cast(self, dtype)

    def retain_grad(self):
        """Keep ``.grad`` on this non-leaf tensor after backward (for inspection)."""
        self._retain_grad = True
        return self

    def zero_grad(self):
        self.grad = None

    # -- the backward engine
    def backward(self, grad=None):
        """Compute d(self)/d(leaf) for every leaf that requires grad, into ``leaf.grad``.

        ``grad`` is the upstream gradient (default 1 for a scalar). Gradients accumulate
        into existing ``.grad`` arrays, as in PyTorch; the graph is freed as it is walked.
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require grad")
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a scalar, "
                                   f"got shape {self.shape}")
            grad = self.xp.ones_like(self.data)
        grad = as_array(grad, dtype=self.dtype, like=self.data)
        _check_grad(grad, self, "backward() argument")

        profiler = _profiling.profiler                 # None unless bench profile
        order = _topological_order(self)
        grads = {id(self): grad}
        handed_out = {id(grad)}                # arrays the caller or a .grad already holds
        for t in reversed(order):
            g = grads.pop(id(t), None)
            if g is None:                      # no gradient reached this tensor
                continue
            if t._node is None or t._retain_grad:
                if t.grad is not None:
                    t.grad = t.grad + g
                elif getattr(g, "base", False) is None and id(g) not in handed_out:
                    t.grad = g                 # a fresh array no one else holds: no copy
                else:
                    # copy: g is a view (of another gradient, or a broadcast) or an array
                    # another .grad or the caller already holds; clipping scales .grad
                    # in place, so no two may share memory
                    t.grad = g.copy()
                handed_out.add(id(t.grad))
            if t._node is None:
                continue
            node = t._node
            if node.ctx is None:
                raise RuntimeError(f"the graph through {node.fn.__name__} was already freed "
                                   "by an earlier backward(); recompute the forward pass")
            if profiler is None:
                in_grads = node.fn.backward(node.ctx, g)
            else:
                in_grads = profiler.backward(node, g)
            if not isinstance(in_grads, tuple):
                in_grads = (in_grads,)
            if len(in_grads) != len(node.inputs):
                raise RuntimeError(f"{node.fn.__name__}.backward returned {len(in_grads)} "
                                   f"gradients for {len(node.inputs)} inputs")
            for parent, pg in zip(node.inputs, in_grads):
                if not isinstance(parent, Tensor) or not parent.requires_grad or pg is None:
                    continue
                _check_grad(pg, parent, node.fn.__name__)
                key = id(parent)
                grads[key] = pg if key not in grads else grads[key] + pg
            node.ctx, node.inputs = None, ()   # free what forward saved, and the edges

    # -- operators (defined in minidetr.functional; imported lazily to avoid a cycle)
    def __add__(self, o): return _F().add(self, o)
    def __radd__(self, o): return _F().add(o, self)
    def __sub__(self, o): return _F().sub(self, o)
    def __rsub__(self, o): return _F().sub(o, self)
    def __mul__(self, o): return _F().mul(self, o)
    def __rmul__(self, o): return _F().mul(o, self)
    def __truediv__(self, o): return _F().div(self, o)
    def __rtruediv__(self, o): return _F().div(o, self)
    def __neg__(self): return _F().neg(self)
    def __pow__(self, p): return _F().pow(self, p)
    def __matmul__(self, o): return _F().matmul(self, o)
    def __rmatmul__(self, o): return _F().matmul(o, self)
    def __getitem__(self, index): return _F().getitem(self, index)

    # comparisons give plain boolean arrays (they have no gradient)
    def __lt__(self, o): return self.data < _comparand(o, self.data)
    def __le__(self, o): return self.data <= _comparand(o, self.data)
    def __gt__(self, o): return self.data > _comparand(o, self.data)
    def __ge__(self, o): return self.data >= _comparand(o, self.data)

    # -- common methods, so model code reads like the paper
    def sum(self, axis=None, keepdims=False): return _F().sum(self, axis, keepdims)
    def mean(self, axis=None, keepdims=False): return _F().mean(self, axis, keepdims)
    def max(self, axis=None, keepdims=False): return _F().max(self, axis, keepdims)
    def reshape(self, *shape):
        return _F().reshape(self, shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape)
    def view(self, *shape): return self.reshape(*shape)
    def transpose(self, a, b): return _F().transpose(self, a, b)
    def permute(self, *axes):
        return _F().permute(self, axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes)
    def flatten(self, start=0, end=-1): return _F().flatten(self, start, end)
    def exp(self): return _F().exp(self)
    def log(self): return _F().log(self)
    def sqrt(self): return _F().sqrt(self)
    def abs(self): return _F().abs(self)
    def sigmoid(self): return _F().sigmoid(self)
    def relu(self): return _F().relu(self)
    def softmax(self, axis=-1): return _F().softmax(self, axis)
    def clamp(self, lo=None, hi=None): return _F().clamp(self, lo, hi)
    def unsqueeze(self, axis): return _F().unsqueeze(self, axis)
    def squeeze(self, axis): return _F().squeeze(self, axis)

    @property
    def T(self):
        return _F().permute(self, tuple(reversed(range(self.ndim))))


def _F():
    from . import functional
    return functional


def _comparand(o, data):
    """The other side of a comparison with ``data``: a Tensor's array, a number as it is
    (CuPy refuses a NumPy array beside a device array, even a 0-d one), anything else
    as an array on ``data``'s device (its dtype unchanged)."""
    if isinstance(o, Tensor):
        return o.data
    if isinstance(o, (int, float, bool, np.generic)):
        return o
    return get_array_module(data).asarray(o)


def _check_grad(grad, tensor, where):
    """The engine's guard: a gradient must have its tensor's shape, dtype and device."""
    data = tensor.data
    if type(grad) is type(data) and grad.shape == data.shape and grad.dtype == data.dtype:
        return                                   # the common case, in three comparisons
    if tuple(grad.shape) != tuple(tensor.shape) or grad.dtype != tensor.dtype:
        raise RuntimeError(f"{where} produced a gradient of shape {tuple(grad.shape)} and "
                           f"dtype {grad.dtype} for a tensor of shape {tuple(tensor.shape)} "
                           f"and dtype {tensor.dtype}")
    if get_array_module(grad) is not get_array_module(tensor.data):
        raise RuntimeError(f"{where} produced a gradient on another device than its tensor")


def _topological_order(root):
    """Tensors reachable from ``root`` through recorded Nodes, inputs before outputs.

    Iterative depth-first search (a deep model would overflow Python's recursion limit).
    """
    order, seen = [], set()
    stack = [(root, False)]
    while stack:
        t, expanded = stack.pop()
        if expanded:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        if t._node is not None:
            for p in t._node.inputs:
                if isinstance(p, Tensor) and p.requires_grad and id(p) not in seen:
                    stack.append((p, False))
    return order


# --------------------------------------------------------------------------- Function
class Context:
    """What forward leaves for backward: ``save_for_backward`` plus free attributes."""

    def __init__(self, needs_input_grad):
        self.needs_input_grad = needs_input_grad   # one bool per positional argument
        self.saved_tensors = ()

    def save_for_backward(self, *arrays):
        self.saved_tensors = arrays


class Node:
    """One recorded application of a Function: the Function, its ctx and its inputs."""

    __slots__ = ("fn", "ctx", "inputs")

    def __init__(self, fn, ctx, inputs):
        self.fn, self.ctx, self.inputs = fn, ctx, inputs


class Function:
    """Base class of every differentiable operation.

    Subclasses write two static methods over raw arrays::

        class Exp(Function):
            @staticmethod
            def forward(ctx, x):            # x: array
                y = ctx.xp.exp(x)
                ctx.save_for_backward(y)
                return y

            @staticmethod
            def backward(ctx, grad):        # grad: dL/dy, same shape as y
                y, = ctx.saved_tensors
                return grad * y             # one gradient per positional input

    Positional arguments may be Tensors or constants (numbers, tuples, arrays); keyword
    arguments are always constants. ``backward`` returns one entry per positional
    argument, ``None`` where no gradient is needed (``ctx.needs_input_grad`` says which).
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs) -> Tensor:
        """Run ``forward`` on the arrays of ``args``; record the Node when grad is needed."""
        profiler = _profiling.profiler                 # None unless bench profile
        if profiler is not None:
            return profiler.apply(cls, args, kwargs)
        return cls._apply(*args, **kwargs)

    @classmethod
    def _apply(cls, *args, **kwargs) -> Tensor:
        raw = [a.data if isinstance(a, Tensor) else a for a in args]
        needs = tuple(isinstance(a, Tensor) and a.requires_grad for a in args)
        record = is_grad_enabled() and any(needs)
        ctx = Context(needs)
        # the array arguments (a dtype class such as np.float32 has .dtype and .shape too)
        ctx.xp = get_array_module(*[r for r in raw if hasattr(r, "dtype") and hasattr(r, "shape")
                                    and not isinstance(r, type)])
        out = cls.forward(ctx, *raw, **kwargs)
        result = Tensor(out, requires_grad=record and out.dtype.kind == "f")
        if result.requires_grad:
            result._node = Node(cls, ctx, args)
        return result
