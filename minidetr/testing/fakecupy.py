"""A stand-in for CuPy, backed by NumPy, that makes GPU code paths fail on a CPU as on a GPU.

minidetr has one code path for NumPy and CuPy arrays, but a machine without a GPU only ever
runs the NumPy half. Bugs that only CuPy would show stay hidden there: a ``np.`` function
called on a device array, a NumPy array mixed into device arithmetic, a Python number
pulled out of a device array in the middle of a training step (a hidden device -> host
copy that makes the GPU wait), a function that NumPy has and CuPy lacks.

This module imitates the part of CuPy's *behaviour that catches those bugs*, while the
arithmetic underneath is NumPy's, so results equal the NumPy path's::

    from minidetr import fakecupy
    from minidetr.backend import to_device, transfer_guard

    with fakecupy.installed() as cp:               # minidetr now "sees" CuPy and a GPU
        x = to_device(np.ones(3, np.float32), "cuda")    # a fakecupy.ndarray
        np.asarray(x)                              # TypeError, as with CuPy
        x + np.ones(3)                             # TypeError: host and device mixed
        x.sum()                                    # a 0-d device array, not a number
        with transfer_guard():
            float(x.sum())                         # HostTransferError: a hidden copy
        with fakecupy.count_launches() as launches:
            model(images, mask)                    # Counter: kernel launches by call site

What is imitated (CuPy 14):

* :class:`ndarray` wraps a NumPy array and is *not* one: ``numpy.asarray`` refuses it,
  operators accept device arrays, Python and NumPy scalars but raise TypeError for a
  ``numpy.ndarray``; reductions and scalar indexing give 0-d device arrays; NumPy
  functions called on it dispatch here (``__array_ufunc__``, ``__array_function__``).
* Host copies: ``get()`` is the one copy; ``item``, ``tolist``, ``float()``, ``int()``,
  ``bool()``, ``repr``, ``str``, ``format``, pickling ... all go through it, so
  :func:`minidetr.backend.transfer_guard` sees every one. Operations whose output size
  depends on the data (boolean-mask indexing, ``nonzero``, ``unique`` ...) make CuPy read
  a count back from the GPU inside its compiled code, where the real guard cannot see it;
  here that read goes through ``get()`` too, so the guard reports it.
* Module functions delegate to NumPy's of the same name, refusing ``numpy.ndarray``
  arguments except in ``asarray``/``array``/``asnumpy``; names that NumPy has and CuPy
  lacks (:data:`NUMPY_ONLY`) raise AttributeError. ``random`` (``Generator``,
  ``Philox4x3210``), ``cuda`` (one device, whose properties and attributes the runtime
  functions report; events that read the host clock), ``ElementwiseKernel`` (run by
  :mod:`minidetr.testing.elementwise_harness`) and a fake ``cupyx`` with ``scatter_add``.
* Device memory: every device array that owns its data holds a block of
  ``cupy.get_default_memory_pool()`` (rounded up to 512 bytes) until it is garbage
  collected, so ``used_bytes()`` counts what is alive, and ``cupy.cuda.MemoryHook`` s
  are called around every allocation and release, with CuPy's arguments.
* Kernel launches: every operation that would launch a GPU kernel counts one, under the
  call site that asked for it (see :func:`count_launches`); views (reshape, transpose,
  basic slicing) and allocations without initialisation launch nothing.

What is not: speed, streams, memory limits, CUDA compilation (``RawModule`` raises). The
multi-scale deformable attention op's ``"cupy"`` backend runs the Numba CPU kernels on
the wrapped data while :func:`installed` is active.

State. Like CuPy's, the fake device is one per process: its memory pool, its memory hooks
and the open :func:`count_launches` blocks live in this module. :func:`installed` is the
only switch that makes minidetr use it, through the two public seams
:func:`minidetr.backend.substitute_cupy` and :func:`minidetr.ops.msda.substitute_backend`;
it patches no private name and does not nest.
"""
from __future__ import annotations

import collections
import functools
import os
import sys
import threading
import time
import types
import weakref
from contextlib import contextmanager

import numpy as np

__all__ = ["ndarray", "cupy", "cupyx", "installed", "count_launches", "call_site",
           "minidetr_frames", "NUMPY_ONLY", "unwrap", "wrap"]

_THIS_FILE = os.path.abspath(__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(_THIS_FILE)) + os.sep    # minidetr/

# NumPy functions and namespaces that CuPy 14 does not have (``cupy.errstate`` is the
# classic trap: CuPy's lives in cupyx). Asking the fake module for one raises
# AttributeError, and NumPy's own function called on a device array raises TypeError.
NUMPY_ONLY = frozenset({
    "errstate", "geterr", "seterr", "geterrcall", "seterrcall", "getbufsize", "setbufsize",
    "insert", "geomspace", "block", "bmat", "asmatrix", "matrix", "memmap", "nditer",
    "ndenumerate", "nested_iters", "frompyfunc", "fromregex", "spacing", "vecdot",
    "vecmat", "matvec", "unstack", "nanpercentile", "nanquantile", "histogram_bin_edges",
    "einsum_path", "polyder", "polydiv", "polyint", "isnat", "busday_count",
    "busday_offset", "is_busday", "datetime_as_string", "datetime_data", "ma", "char",
    "rec", "strings", "emath", "ctypeslib", "lib", "testing", "polynomial", "typing"})

# Operands that CuPy accepts next to a device array without a copy.
_SCALARS = (bool, int, float, complex, np.generic)


# --------------------------------------------------------------------------- launch counts
_counters = []                     # the Counters of the open count_launches() blocks
_counters_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _minidetr_name(code):
    """``"functional/elementwise.py:Mul.backward"`` for a code object of minidetr, or None."""
    filename = os.path.abspath(code.co_filename)
    if not filename.startswith(_PACKAGE_DIR) or filename == _THIS_FILE:
        return None
    path = filename[len(_PACKAGE_DIR):].replace(os.sep, "/")
    return f"{path}:{code.co_qualname}"


def minidetr_frames(frame):
    """``(name, frame)`` of every minidetr function on the stack from ``frame`` outwards
    (innermost first), named ``"path/in/minidetr.py:qualified.name"``; this module's own
    frames are left out."""
    while frame is not None:
        name = _minidetr_name(frame.f_code)
        if name is not None:
            yield name, frame
        frame = frame.f_back


def call_site(frame) -> str:
    """The default key of :func:`count_launches`: the innermost minidetr function on the
    stack from ``frame`` outwards (``"ops/msda/__init__.py:MSDeformAttnFunction.forward"``),
    or ``"<file>:<function>"`` of ``frame`` when no minidetr code is on the stack."""
    for name, _ in minidetr_frames(frame):
        return name
    if frame is None:
        return "<unknown>"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_qualname}"


@contextmanager
def count_launches(site=call_site):
    """Count the kernel launches of the fake device inside the block.

    Yields a :class:`collections.Counter`: ``site(frame) -> count``, where ``frame`` is
    the innermost stack frame outside this module when the launch happened; the default
    :func:`call_site` names the innermost minidetr function, e.g.
    ``{"functional/elementwise.py:Mul.backward": 96, ...}``. Blocks may nest (each
    counts everything inside it). Device operations of any thread are counted.
    """
    counter = collections.Counter()
    entry = (counter, site)
    with _counters_lock:
        _counters.append(entry)
    try:
        yield counter
    finally:
        with _counters_lock:
            _counters.remove(entry)


def _launch():
    """Record one kernel launch for the code that called the fake (see count_launches)."""
    if not _counters:
        return
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    for counter, site in list(_counters):
        counter[site(frame)] += 1


# --------------------------------------------------------------------------- wrap / unwrap
def _refuse_host_array(where):
    raise TypeError(
        f"{where}: got a numpy.ndarray (host memory) where a device array is needed; CuPy "
        "refuses to mix them. Copy it to the device first (cupy.asarray, or "
        "minidetr.backend.to_device(x, 'cuda')).")


def unwrap(x, where="fakecupy"):
    """The NumPy data of a device array (also inside lists and tuples); anything else as
    is. A ``numpy.ndarray`` is refused with a TypeError naming ``where``."""
    if isinstance(x, ndarray):
        return x._array
    if isinstance(x, np.ndarray):
        _refuse_host_array(where)
    if isinstance(x, (list, tuple)):
        values = [unwrap(v, where) for v in x]
        return values if isinstance(x, list) else tuple(values)
    return x


def wrap(x):
    """NumPy results as device arrays: arrays and NumPy scalars (as 0-d arrays, like
    CuPy's reductions), also inside lists and tuples; anything else as is."""
    if isinstance(x, np.ndarray):
        return ndarray._from_numpy(x)
    if isinstance(x, np.generic):
        return ndarray._from_numpy(np.asarray(x))
    if type(x) in (list, tuple):
        return type(x)(wrap(v) for v in x)
    return x


def _arrays_in(x):
    """The NumPy arrays in a (nested) argument, to tell a view from a new array."""
    if isinstance(x, np.ndarray):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _arrays_in(v)


def _count_result(result, inputs):
    """One launch for an operation that made a new array; none for a view of an input
    (reshape, transpose, basic slicing) or a result without arrays (shape queries)."""
    if isinstance(result, np.generic):        # a reduction's scalar: computed
        _launch()
        return
    outputs = list(_arrays_in(result))
    if not outputs:
        return
    sources = list(_arrays_in(inputs))
    if all(any(np.may_share_memory(out, src) for src in sources) for out in outputs):
        return
    _launch()


def _sync_read_size(what):
    """The host read of a data-dependent size (e.g. the number of True elements of a
    mask): CuPy's compiled code waits for the GPU and copies the count back. Here the
    copy goes through ``ndarray.get`` so that transfer_guard reports it, with the reason."""
    from ..backend import HostTransferError
    try:
        ndarray._from_numpy(np.zeros((), np.int64)).get()
    except HostTransferError as e:
        raise HostTransferError(
            f"{what} gives an array whose size depends on the data, so CuPy copies that "
            f"size from the device to the host (and waits for the GPU): {e}") from e


def _call_numpy(function, name, args, kwargs, *, view_ok=True):
    """Run a NumPy function on the unwrapped arguments (host arrays refused), count its
    launch (none for a view when ``view_ok``), wrap the result."""
    where = f"cupy.{name}"
    raw_args = unwrap(args, where)
    raw_kwargs = {k: unwrap(v, where) for k, v in kwargs.items()}
    result = function(*raw_args, **raw_kwargs)
    out = kwargs.get("out")
    if isinstance(out, ndarray) and result is out._array:
        _launch()
        return out
    if view_ok:
        _count_result(result, (raw_args, list(raw_kwargs.values())))
    elif list(_arrays_in(result)) or isinstance(result, np.generic):
        _launch()
    return wrap(result)


# --------------------------------------------------------------------------- ndarray
def _binary(ufunc, reflected=False):
    """An operator method (``__add__``, ``__radd__`` ...) applying ``ufunc``."""

    def operator(self, other):
        if isinstance(other, ndarray):
            other = other._array
        elif isinstance(other, np.ndarray):
            _refuse_host_array(f"cupy.ndarray {ufunc.__name__}")
        elif not isinstance(other, _SCALARS):
            return NotImplemented              # e.g. a Tensor: its reflected operator runs
        a, b = (other, self._array) if reflected else (self._array, other)
        _launch()
        return wrap(ufunc(a, b))

    operator.__name__ = f"__{'r' if reflected else ''}{ufunc.__name__}__"
    return operator


def _inplace(ufunc):
    """An in-place operator method (``__iadd__`` ...): ``ufunc(self, other, out=self)``."""

    def operator(self, other):
        if isinstance(other, ndarray):
            other = other._array
        elif isinstance(other, np.ndarray):
            _refuse_host_array(f"cupy.ndarray in-place {ufunc.__name__}")
        elif not isinstance(other, _SCALARS):
            return NotImplemented
        _launch()
        ufunc(self._array, other, out=self._array)
        return self

    return operator


def _unary(ufunc):
    def operator(self):
        _launch()
        return wrap(ufunc(self._array))
    return operator


def _method(name, *, view_ok=False, data_dependent=False):
    """A method computed on the device: NumPy's method of the same name on the data."""

    def method(self, *args, **kwargs):
        where = f"cupy.ndarray.{name}"
        raw_args = unwrap(args, where)
        raw_kwargs = {k: unwrap(v, where) for k, v in kwargs.items()}
        if data_dependent:
            _sync_read_size(f"cupy.ndarray.{name}()")
        result = getattr(self._array, name)(*raw_args, **raw_kwargs)
        if result is self._array:              # e.g. astype(same dtype, copy=False)
            return self
        if result is None:                     # in place: sort, fill, put
            _launch()
            return None
        if view_ok:
            _count_result(result, self._array)
        else:
            _launch()
        return wrap(result)

    method.__name__ = name
    method.__doc__ = f"Like ``numpy.ndarray.{name}``, computed on the (fake) device."
    return method


class ndarray:
    """A device array of the fake CuPy: holds a NumPy array, refuses to become one.

    Create one with ``cupy.asarray(host_array)`` (a host -> device copy); ``get()``
    copies it back. See the module docstring for the behaviour it imitates.
    """

    __slots__ = ("_array", "__weakref__")
    __array_priority__ = 100                    # CuPy's value

    def __init__(self, shape, dtype=float, order="C"):
        """Uninitialised memory of ``shape`` and ``dtype`` (as ``cupy.ndarray(shape)``)."""
        self._array = np.empty(shape, dtype=dtype, order=order)
        _memory_pool._malloc(self._array)

    @classmethod
    def _from_numpy(cls, array):
        self = cls.__new__(cls)
        self._array = array
        _memory_pool._malloc(array)            # a block of the pool, unless a view
        return self

    # -- facts that live with the array's descriptor (no copy, no kernel)
    shape = property(lambda self: self._array.shape)
    dtype = property(lambda self: self._array.dtype)
    ndim = property(lambda self: self._array.ndim)
    size = property(lambda self: self._array.size)
    itemsize = property(lambda self: self._array.itemsize)
    nbytes = property(lambda self: self._array.nbytes)
    strides = property(lambda self: self._array.strides)
    flags = property(lambda self: self._array.flags)
    device = property(lambda self: cupy.cuda.Device(0))
    data = property(lambda self: _MemoryPointer(self))     # CuPy: the device pointer
    T = property(lambda self: wrap(self._array.T))
    mT = property(lambda self: wrap(self._array.mT))
    real = property(lambda self: wrap(self._array.real))
    imag = property(lambda self: wrap(self._array.imag))

    @property
    def __cuda_array_interface__(self):
        """Where the data lives, as CUDA libraries read it (here: the NumPy buffer)."""
        a = self._array
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, False),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3}

    def __len__(self):
        if self._array.ndim == 0:
            raise TypeError("len() of unsized object")
        return len(self._array)

    def __iter__(self):
        if self._array.ndim == 0:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(len(self._array)))

    # -- no implicit host copies
    def __array__(self, dtype=None, copy=None):
        raise TypeError("Implicit conversion to a NumPy array is not allowed: this is a "
                        "(fake) CuPy device array. Call .get() or cupy.asnumpy() to copy it "
                        "to the host explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        fake = getattr(cupy, ufunc.__name__, None)
        if not isinstance(fake, _Ufunc):
            return NotImplemented
        return getattr(fake, method)(*inputs, **kwargs)

    def __array_function__(self, func, types_, args, kwargs):
        module = {"numpy": cupy, "numpy.linalg": cupy.linalg, "numpy.fft": cupy.fft}.get(
            func.__module__)
        if module is None or func.__name__ in NUMPY_ONLY:
            return NotImplemented              # NumPy raises "no implementation found"
        try:
            fake = getattr(module, func.__name__)
        except AttributeError:
            return NotImplemented
        return fake(*args, **kwargs)

    # -- the device -> host copies (transfer_guard wraps these methods)
    def get(self, stream=None, order="C", out=None, blocking=True):
        """Copy to the host: a new NumPy array (or into ``out``)."""
        if out is not None:
            out[...] = self._array
            return out
        return np.array(self._array, order=order, copy=True)

    def set(self, arr, stream=None):
        """Copy the host array ``arr`` (same shape) into this device array."""
        if not isinstance(arr, np.ndarray) or arr.shape != self.shape:
            raise ValueError(f"cupy.ndarray.set: needs a numpy.ndarray of shape {self.shape}")
        self._array[...] = arr

    def item(self, *args):
        return self.get().item(*args)

    def tolist(self):
        return self.get().tolist()

    def tobytes(self, order="C"):
        return self.get().tobytes(order)

    def tofile(self, fid, sep="", format="%s"):
        self.get().tofile(fid, sep, format)

    def __float__(self):
        return float(self.get())

    def __int__(self):
        return int(self.get())

    def __complex__(self):
        return complex(self.get())

    def __bool__(self):
        return bool(self.get())

    def __bytes__(self):
        return bytes(self.get())

    def __repr__(self):
        return repr(self.get())

    def __str__(self):
        return str(self.get())

    def __format__(self, spec):
        return format(self.get(), spec)

    def __reduce__(self):                       # pickling copies to the host, as CuPy's
        return (_from_host, (self.get(),))

    def __copy__(self):
        _launch()
        return wrap(self._array.copy())

    def __deepcopy__(self, memo):
        return self.__copy__()

    # -- indexing (host index arrays are allowed: CuPy uploads them)
    def __getitem__(self, key):
        if _has_mask(key):
            _sync_read_size("boolean-mask indexing")
        result = self._array[_index_unwrap(key)]
        _count_result(result, self._array)
        return wrap(result)

    def __setitem__(self, key, value):
        raw_value = value._array if isinstance(value, ndarray) else value   # host: uploaded
        _launch()
        self._array[_index_unwrap(key)] = raw_value

    # -- arithmetic (each operator is one kernel)
    __add__, __radd__ = _binary(np.add), _binary(np.add, True)
    __sub__, __rsub__ = _binary(np.subtract), _binary(np.subtract, True)
    __mul__, __rmul__ = _binary(np.multiply), _binary(np.multiply, True)
    __truediv__, __rtruediv__ = _binary(np.true_divide), _binary(np.true_divide, True)
    __floordiv__, __rfloordiv__ = _binary(np.floor_divide), _binary(np.floor_divide, True)
    __mod__, __rmod__ = _binary(np.remainder), _binary(np.remainder, True)
    __pow__, __rpow__ = _binary(np.power), _binary(np.power, True)
    __matmul__, __rmatmul__ = _binary(np.matmul), _binary(np.matmul, True)
    __and__, __rand__ = _binary(np.bitwise_and), _binary(np.bitwise_and, True)
    __or__, __ror__ = _binary(np.bitwise_or), _binary(np.bitwise_or, True)
    __xor__, __rxor__ = _binary(np.bitwise_xor), _binary(np.bitwise_xor, True)
    __lshift__, __rlshift__ = _binary(np.left_shift), _binary(np.left_shift, True)
    __rshift__, __rrshift__ = _binary(np.right_shift), _binary(np.right_shift, True)
    __eq__, __ne__ = _binary(np.equal), _binary(np.not_equal)
    __lt__, __le__ = _binary(np.less), _binary(np.less_equal)
    __gt__, __ge__ = _binary(np.greater), _binary(np.greater_equal)
    __iadd__, __isub__ = _inplace(np.add), _inplace(np.subtract)
    __imul__, __itruediv__ = _inplace(np.multiply), _inplace(np.true_divide)
    __ifloordiv__, __imod__ = _inplace(np.floor_divide), _inplace(np.remainder)
    __ipow__ = _inplace(np.power)
    __iand__, __ior__, __ixor__ = (_inplace(np.bitwise_and), _inplace(np.bitwise_or),
                                   _inplace(np.bitwise_xor))
    __neg__, __pos__ = _unary(np.negative), _unary(np.positive)
    __abs__, __invert__ = _unary(np.absolute), _unary(np.invert)
    __hash__ = None

    # -- the other methods (added below the class): NumPy's, one kernel each or a view


# Methods that give a view when NumPy does (no kernel then), methods that always compute
# (one kernel), and methods whose output size depends on the values (a host copy).
_VIEW_METHODS = ("reshape", "transpose", "swapaxes", "squeeze", "ravel", "view", "diagonal",
                 "astype")
_COMPUTING_METHODS = ("flatten", "copy", "fill", "sort", "put", "sum", "mean", "prod", "max",
                      "min", "argmax", "argmin", "all", "any", "std", "var", "cumsum",
                      "cumprod", "clip", "round", "dot", "take", "repeat", "argsort", "conj",
                      "conjugate", "trace", "searchsorted", "partition", "argpartition",
                      "choose")
_DATA_DEPENDENT_METHODS = ("nonzero", "compress")
for _name in _VIEW_METHODS:
    setattr(ndarray, _name, _method(_name, view_ok=True))
for _name in _COMPUTING_METHODS:
    setattr(ndarray, _name, _method(_name))
for _name in _DATA_DEPENDENT_METHODS:
    setattr(ndarray, _name, _method(_name, data_dependent=True))


def _from_host(host):
    """Unpickle: a host array back on the device."""
    return ndarray._from_numpy(np.array(host, copy=True))


class _MemoryPointer:
    """``ndarray.data`` of CuPy is a pointer into device memory, not the values: code
    that reads ``x.data`` expecting an array (``getattr(x, "data", x)``) gets this."""

    def __init__(self, array):
        self.ptr = array._array.ctypes.data
        self.device = cupy.cuda.Device(0)

    def __array__(self, dtype=None, copy=None):
        raise TypeError("cupy.cuda.MemoryPointer (the .data of a device array) is a device "
                        "address, not an array; use the array itself")


def _has_mask(key):
    """True when ``key`` holds a boolean array (a mask): the result's size is the number
    of True elements, which CuPy reads back from the device."""
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, (ndarray, np.ndarray)) and k.dtype == np.bool_ and k.ndim > 0
               for k in keys)


def _index_unwrap(key):
    """An index for NumPy: device arrays unwrapped; host index arrays stay (uploaded)."""
    if isinstance(key, ndarray):
        return key._array
    if isinstance(key, tuple):
        return tuple(_index_unwrap(k) for k in key)
    if isinstance(key, list):
        return [_index_unwrap(k) for k in key]
    return key


# --------------------------------------------------------------------------- functions
# Functions whose output size depends on the values (CuPy reads a count back to size it).
_DATA_DEPENDENT = frozenset({"nonzero", "flatnonzero", "argwhere", "unique", "extract",
                             "compress", "unique_values", "unique_counts",
                             "unique_inverse", "unique_all", "trim_zeros"})
# Functions that allocate without initialising: no kernel.
_NO_KERNEL = frozenset({"empty", "empty_like"})


def _function(function, name):
    """``function`` (a NumPy function) on device arrays: unwrap, run, count, wrap."""

    def device_function(*args, **kwargs):
        if name in _DATA_DEPENDENT or (name == "where" and len(args) == 1):
            _sync_read_size(f"cupy.{name}()")
        if name in _NO_KERNEL:
            return wrap(function(*unwrap(args, f"cupy.{name}"), **kwargs))
        return _call_numpy(function, name, args, kwargs)

    device_function.__name__ = device_function.__qualname__ = name
    device_function.__doc__ = f"``numpy.{name}`` on (fake) device arrays."
    return device_function


class _Ufunc:
    """A NumPy ufunc on device arrays (``cupy.exp``, ``cupy.maximum.reduce``, ``.at``)."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__
        self.nin, self.nout, self.nargs = ufunc.nin, ufunc.nout, ufunc.nargs
        self.identity = ufunc.identity

    def __repr__(self):
        return f"<fakecupy ufunc '{self.__name__}'>"

    def __call__(self, *args, **kwargs):
        return _call_numpy(self._ufunc, self.__name__, args, kwargs, view_ok=False)

    def reduce(self, *args, **kwargs):
        return _call_numpy(self._ufunc.reduce, f"{self.__name__}.reduce", args, kwargs,
                           view_ok=False)

    def accumulate(self, *args, **kwargs):
        return _call_numpy(self._ufunc.accumulate, f"{self.__name__}.accumulate", args,
                           kwargs, view_ok=False)

    def reduceat(self, *args, **kwargs):
        return _call_numpy(self._ufunc.reduceat, f"{self.__name__}.reduceat", args, kwargs,
                           view_ok=False)

    def outer(self, *args, **kwargs):
        return _call_numpy(self._ufunc.outer, f"{self.__name__}.outer", args, kwargs,
                           view_ok=False)

    def at(self, a, indices, b=None):
        """Unbuffered in-place ``a[indices] op= b`` (one kernel, with atomics on a GPU)."""
        if not isinstance(a, ndarray):
            raise TypeError(f"cupy.{self.__name__}.at: a must be a device array, got "
                            f"{type(a).__name__}")
        args = () if b is None else (unwrap(b, f"cupy.{self.__name__}.at"),)
        _launch()
        self._ufunc.at(a._array, _index_unwrap(indices), *args)


class _FakeModule(types.ModuleType):
    """A namespace (``cupy``, ``cupy.linalg``, ``cupy.fft``) whose names come from the
    NumPy namespace of the same role: functions run on device arrays, ufuncs keep their
    methods, types (``float32``, ``dtype``) and constants (``pi``, ``newaxis``) pass
    through; names in :data:`NUMPY_ONLY` are missing, as in CuPy."""

    def __init__(self, name, numpy_namespace):
        super().__init__(name, f"fakecupy's stand-in for {name} (NumPy underneath).")
        self._numpy_namespace = numpy_namespace

    def __getattr__(self, name):
        if name.startswith("__") or name in NUMPY_ONLY:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}"
                                 + (" (NumPy has it, CuPy does not)" if name in NUMPY_ONLY
                                    else ""))
        value = getattr(self._numpy_namespace, name)
        if isinstance(value, np.ufunc):
            value = _Ufunc(value)
        elif callable(value) and not isinstance(value, type):
            value = _function(value, name)
        setattr(self, name, value)             # resolved once
        return value


cupy = _FakeModule("cupy", np)
cupy.__version__ = f"fakecupy (NumPy {np.__version__})"
cupy.ndarray = ndarray
cupy.linalg = _FakeModule("cupy.linalg", np.linalg)
cupy.fft = _FakeModule("cupy.fft", np.fft)


def _upload(obj, dtype=None, order="K", ndmin=0):
    """``cupy.asarray``/``cupy.array`` of something that is not a device array: host
    data is copied to the device (no kernel); a list of device arrays is stacked on the
    device (one kernel)."""
    if any(isinstance(a, ndarray) for a in _flatten(obj)):
        _launch()
        return wrap(np.array(_index_unwrap(obj), dtype=dtype, order=order, ndmin=ndmin))
    return wrap(np.array(obj, dtype=dtype, order=order, ndmin=ndmin, copy=True))


def _flatten(obj):
    if isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _flatten(v)
    else:
        yield obj


def asarray(a, dtype=None, order=None, *, blocking=False):
    """The device array ``a`` (no copy if already one of ``dtype``); host data is copied
    to the device."""
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return _upload(a, dtype, order or "K")


def array(obj, dtype=None, copy=True, order="K", subok=False, ndmin=0, *, blocking=False):
    """A new device array (a copy on the device, or a host -> device copy)."""
    if isinstance(obj, ndarray):
        if not copy and ndmin <= obj.ndim:
            return asarray(obj, dtype)
        _launch()
        return wrap(np.array(obj._array, dtype=dtype, order=order, ndmin=ndmin, copy=True))
    return _upload(obj, dtype, order, ndmin)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True):
    """A host (NumPy) array: ``a.get()`` for a device array, ``numpy.asarray`` otherwise."""
    if isinstance(a, ndarray):
        return a.get(stream=stream, order=order, out=out, blocking=blocking)
    return np.asarray(a, order=order)


def get_array_module(*args):
    """This fake module when any argument is a device array, else numpy."""
    return cupy if any(isinstance(a, ndarray) for a in args) else np


cupy.asarray = cupy.asanyarray = asarray
cupy.array = array
cupy.asnumpy = asnumpy
cupy.get_array_module = get_array_module
cupy.is_available = lambda: True


# --------------------------------------------------------------------------- kernels
class ElementwiseKernel:
    """``cupy.ElementwiseKernel``, run on the host by
    :class:`minidetr.testing.elementwise_harness.CpuElementwiseKernel` (the same C loop body,
    compiled by g++). One launch per call; device arrays only."""

    def __init__(self, in_params, out_params, operation, name="kernel", **kwargs):
        self.in_params, self.out_params, self.operation = in_params, out_params, operation
        self.name, self.kwargs = name, kwargs
        self._host_kernel = None

    def __call__(self, *args, **kwargs):
        if self._host_kernel is None:          # imported late: an optional module
            from .elementwise_harness import CpuElementwiseKernel
            self._host_kernel = CpuElementwiseKernel(self.in_params, self.out_params,
                                                     self.operation, name=self.name,
                                                     **self.kwargs)
        raw = [unwrap(a, f"ElementwiseKernel {self.name!r}") for a in args]
        _launch()
        result = self._host_kernel(*raw, **kwargs)
        given = {id(r): a for r, a in zip(raw, args) if isinstance(a, ndarray)}

        def back(r):                           # an output passed in comes back as itself
            return given[id(r)] if id(r) in given else wrap(r)
        return tuple(back(r) for r in result) if isinstance(result, tuple) else back(result)


class _Unsupported:
    def __init__(self, *args, **kwargs):
        raise NotImplementedError(f"fakecupy cannot compile CUDA code "
                                  f"(cupy.{type(self).__name__}); it runs on the CPU")


cupy.ElementwiseKernel = ElementwiseKernel
cupy.RawKernel = type("RawKernel", (_Unsupported,), {})
cupy.RawModule = type("RawModule", (_Unsupported,), {})


# --------------------------------------------------------------------------- random
class _BitGenerator:
    """A device bit generator, seeded like CuPy's (NumPy's Philox draws underneath)."""

    def __init__(self, seed=None, *, size=-1):
        self._numpy = np.random.Philox(seed)


class Generator:
    """``cupy.random.Generator``: draws land on the device (one launch per draw)."""

    def __init__(self, bit_generator):
        self.bit_generator = bit_generator
        self._numpy = np.random.Generator(bit_generator._numpy)

    def _draw(self, method, *args, **kwargs):
        _launch()
        return wrap(getattr(self._numpy, method)(*args, **kwargs))

    def random(self, size=None, dtype=np.float64, out=None):
        if out is not None:
            raise NotImplementedError("fakecupy: Generator.random(out=...)")
        return self._draw("random", size, dtype=dtype)

    def standard_normal(self, size=None, dtype=np.float64):
        return self._draw("standard_normal", size, dtype=dtype)

    def uniform(self, low=0.0, high=1.0, size=None, dtype=np.float64):
        return self._draw("uniform", low, high, size).astype(dtype, copy=False)

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        return self._draw("integers", low, high, size, dtype=dtype, endpoint=endpoint)


cupy.random = types.ModuleType("cupy.random", "fakecupy's cupy.random (NumPy's Philox).")
cupy.random.Philox4x3210 = type("Philox4x3210", (_BitGenerator,), {})
cupy.random.XORWOW = type("XORWOW", (_BitGenerator,), {})
cupy.random.MRG32k3a = type("MRG32k3a", (_BitGenerator,), {})
cupy.random.Generator = Generator
cupy.random.default_rng = lambda seed=None: Generator(cupy.random.XORWOW(seed))


# --------------------------------------------------------------------------- cuda: the device
# The fake GPU as CuPy's runtime functions describe one: an imaginary device with 16 GiB
# and the memory system of an H100 SXM (2619 MHz x 5120 bits: 3.35 TB/s at double data
# rate), compute capability 9.0.
DEVICE_NAME = b"fakecupy (NumPy on the CPU)"
DEVICE_MEMORY = 16 << 30
# cudaDeviceGetAttribute's answers: attribute name (cudaDevAttr<name>) -> (number, value).
DEVICE_ATTRIBUTES = {
    "MaxThreadsPerBlock": (1, 1024),
    "WarpSize": (10, 32),
    "MultiProcessorCount": (16, 132),
    "MemoryClockRate": (36, 2_619_000),               # kHz
    "GlobalMemoryBusWidth": (37, 5120),               # bits
    "L2CacheSize": (38, 50 << 20),                    # bytes
    "ComputeCapabilityMajor": (75, 9),
    "ComputeCapabilityMinor": (76, 0),
}


def _check_device(device):
    if device != 0:
        raise RuntimeError(f"cudaErrorInvalidDevice: fakecupy has one device (0), not "
                           f"{device!r}")


def _device_get_attribute(attrib, device):
    """``cupy.cuda.runtime.deviceGetAttribute(attrib, device)``: one int of the device."""
    _check_device(device)
    for name, (number, value) in DEVICE_ATTRIBUTES.items():
        if number == attrib:
            return value
    raise NotImplementedError(
        f"fakecupy: device attribute {attrib} is not imitated; it knows "
        f"{ {name: number for name, (number, _) in DEVICE_ATTRIBUTES.items()} }")


def _get_device_properties(device):
    """``cupy.cuda.runtime.getDeviceProperties(device)``: a few of its many keys.

    CUDA 13 removed ``clockRate`` and ``memoryClockRate`` from ``cudaDeviceProp`` (CUDA 12
    builds of CuPy report them); the fake leaves them out, as the stricter case, so code
    that needs them must ask ``deviceGetAttribute``, which has them on every version.
    """
    _check_device(device)
    attribute = {name: value for name, (_, value) in DEVICE_ATTRIBUTES.items()}
    return {"name": DEVICE_NAME, "totalGlobalMem": DEVICE_MEMORY,
            "major": attribute["ComputeCapabilityMajor"],
            "minor": attribute["ComputeCapabilityMinor"],
            "multiProcessorCount": attribute["MultiProcessorCount"],
            "memoryBusWidth": attribute["GlobalMemoryBusWidth"],
            "l2CacheSize": attribute["L2CacheSize"],
            "warpSize": attribute["WarpSize"],
            "maxThreadsPerBlock": attribute["MaxThreadsPerBlock"]}


class _Device:
    """``cupy.cuda.Device``: the one fake GPU, id 0."""

    compute_capability = "90"

    def __init__(self, device=None):
        self.id = 0 if device is None else int(device)
        _check_device(self.id)

    @property
    def attributes(self):
        """Every device attribute the fake knows, by name without ``cudaDevAttr``."""
        return {name: value for name, (_, value) in DEVICE_ATTRIBUTES.items()}

    @property
    def mem_info(self):
        """(free, total) bytes of the device."""
        return _mem_get_info()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        pass

    def synchronize(self):
        pass

    def __eq__(self, other):
        return isinstance(other, _Device) and other.id == self.id

    def __hash__(self):
        return hash(self.id)

    def __repr__(self):
        return f"<CUDA Device {self.id} (fakecupy)>"


class _Stream:
    """``cupy.cuda.Stream``: work runs at once, so synchronising does nothing."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def use(self):
        return self

    def synchronize(self):
        pass


class _Event:
    """``cupy.cuda.Event``: records the host clock (the fake device is synchronous)."""

    def __init__(self, block=False, disable_timing=False, interprocess=False):
        if interprocess and not disable_timing:
            raise ValueError("Timing must be disabled for interprocess events")
        self.block, self.disable_timing = block, disable_timing
        self._recorded_at = None           # time.perf_counter() of the last record()

    @property
    def done(self):
        return True                        # the work before it has already run

    def record(self, stream=None):
        self._recorded_at = time.perf_counter()

    def synchronize(self):
        pass


def _get_elapsed_time(start_event, end_event):
    """``cupy.cuda.get_elapsed_time``: milliseconds between two recorded timing events
    (CUDA refuses events that were never recorded or do not time)."""
    for event in (start_event, end_event):
        if event.disable_timing or event._recorded_at is None:
            raise RuntimeError("cudaErrorInvalidResourceHandle: get_elapsed_time needs two "
                               "recorded events created without disable_timing")
    return 1e3 * (end_event._recorded_at - start_event._recorded_at)


# --------------------------------------------------------------------------- cuda: memory
# CuPy's pool rounds every allocation up to a multiple of 512 bytes (cudaMalloc's alignment).
ALLOCATION_UNIT = 512
_memory_hooks = threading.local()


def get_memory_hooks():
    """``cupy.cuda.memory_hook.get_memory_hooks()``: this thread's registered memory hooks,
    by name (CuPy keeps them per thread)."""
    hooks = getattr(_memory_hooks, "hooks", None)
    if hooks is None:
        hooks = _memory_hooks.hooks = collections.OrderedDict()
    return hooks


class MemoryHook:
    """``cupy.cuda.MemoryHook``: a callback object of the memory pool.

    Registered with ``with hook:`` (in this thread, under its class attribute ``name``),
    the pool calls, with CuPy's keyword arguments: ``malloc_preprocess``/``_postprocess``
    around every allocation from the pool, ``alloc_preprocess``/``_postprocess`` around
    one that takes new memory from the device (none is cached), and ``free_preprocess``/
    ``_postprocess`` around every release of a block to the pool.
    """

    name = "MemoryHook"

    def __enter__(self):
        hooks = get_memory_hooks()
        if self.name in hooks:
            raise KeyError(f"memory hook {self.name} already exists")
        hooks[self.name] = self
        return self

    def __exit__(self, *exc):
        del get_memory_hooks()[self.name]

    def alloc_preprocess(self, **kwargs):
        """Before new device memory is taken: ``device_id``, ``mem_size``."""

    def alloc_postprocess(self, **kwargs):
        """After new device memory was taken: ``device_id``, ``mem_size``, ``mem_ptr``."""

    def malloc_preprocess(self, **kwargs):
        """Before a block is taken from the pool: ``device_id``, ``size``, ``mem_size``."""

    def malloc_postprocess(self, **kwargs):
        """After a block was taken from the pool: ``device_id``, ``size``, ``mem_size``,
        ``mem_ptr`` (0 if the allocation failed), ``pmem_id``."""

    def free_preprocess(self, **kwargs):
        """Before a block goes back to the pool: ``device_id``, ``mem_size``, ``mem_ptr``,
        ``pmem_id``."""

    def free_postprocess(self, **kwargs):
        """After a block went back to the pool: same arguments as free_preprocess."""


class _MemoryPool:
    """``cupy.get_default_memory_pool()``: the blocks of the live device arrays.

    A device array that owns its data (not a view of another one's) holds one block of
    its size rounded up to :data:`ALLOCATION_UNIT`, from its creation until it is
    garbage collected, as with CuPy's pool; empty arrays hold none. ``used_bytes`` is the
    sum of the blocks held. Released blocks stay cached (``free_bytes``) until
    ``free_all_blocks``, and an allocation takes new device memory only when the cache
    holds less than it needs: the cache is one piece, without CuPy's fragmentation, so
    ``total_bytes`` is the most ever in use since the last ``free_all_blocks``. Memory
    hooks are called as CuPy calls them. Not imitated: memory limits (``set_limit``).
    """

    def __init__(self):
        # Re-entrant: the garbage collector may free a block while another is allocated.
        self._lock = threading.RLock()
        self._blocks = {}       # id(owning NumPy array) -> (weak reference, mem_size, mem_ptr)
        self._used = 0          # bytes in the blocks of live arrays
        self._held = 0          # bytes taken from the device: used + cached

    def _malloc(self, array):
        """Give the memory under ``array`` a block, unless it has one (a view)."""
        owner = array
        while isinstance(owner.base, np.ndarray):
            owner = owner.base
        pmem_id = id(owner)
        if owner.nbytes == 0 or pmem_id in self._blocks:
            return
        size = owner.nbytes
        mem_size = -(-size // ALLOCATION_UNIT) * ALLOCATION_UNIT
        mem_ptr = owner.ctypes.data
        hooks = list(get_memory_hooks().values())
        for hook in hooks:
            hook.malloc_preprocess(device_id=0, size=size, mem_size=mem_size)
        if self._held - self._used < mem_size:                # nothing cached fits
            for hook in hooks:
                hook.alloc_preprocess(device_id=0, mem_size=mem_size)
            with self._lock:
                self._held += mem_size
            for hook in hooks:
                hook.alloc_postprocess(device_id=0, mem_size=mem_size, mem_ptr=mem_ptr)
        with self._lock:
            self._used += mem_size
            self._blocks[pmem_id] = (weakref.ref(owner, lambda _: self._free(pmem_id)),
                                     mem_size, mem_ptr)
        for hook in hooks:
            hook.malloc_postprocess(device_id=0, size=size, mem_size=mem_size,
                                    mem_ptr=mem_ptr, pmem_id=pmem_id)

    def _free(self, pmem_id):
        """The owner of block ``pmem_id`` was garbage collected: its block goes back."""
        with self._lock:
            _, mem_size, mem_ptr = self._blocks.pop(pmem_id)
        hooks = list(get_memory_hooks().values())
        for hook in hooks:
            hook.free_preprocess(device_id=0, mem_size=mem_size, mem_ptr=mem_ptr,
                                 pmem_id=pmem_id)
        with self._lock:
            self._used -= mem_size
        for hook in hooks:
            hook.free_postprocess(device_id=0, mem_size=mem_size, mem_ptr=mem_ptr,
                                  pmem_id=pmem_id)

    def used_bytes(self):
        """Bytes in the blocks of live device arrays."""
        return self._used

    def total_bytes(self):
        """Bytes the pool holds from the device: used plus cached."""
        return self._held

    def free_bytes(self):
        """Bytes cached in the pool for later allocations."""
        return self._held - self._used

    def n_free_blocks(self):
        """Cached blocks: the cache is one piece here, so 1 when it holds bytes, else 0."""
        return int(self._held > self._used)

    def free_all_blocks(self, stream=None):
        """Give the cached bytes back to the device."""
        with self._lock:
            self._held = self._used

    def set_limit(self, size=None, fraction=None):
        pass                            # not imitated: allocations never fail

    def get_limit(self):
        return 0                        # CuPy's "no limit"


class _PinnedMemoryPool:
    """``cupy.get_default_pinned_memory_pool()``: a stub (the fake uses no pinned memory)."""

    def n_free_blocks(self):
        return 0

    def free_all_blocks(self):
        pass


_memory_pool, _pinned_memory_pool = _MemoryPool(), _PinnedMemoryPool()


def _mem_get_info():
    """``cupy.cuda.runtime.memGetInfo()``: (free, total) bytes of the device."""
    return DEVICE_MEMORY - _memory_pool.total_bytes(), DEVICE_MEMORY


_Stream.null = _Stream()
cupy.cuda = types.ModuleType("cupy.cuda", "fakecupy's cupy.cuda: one device, no streams.")
cupy.cuda.Device = _Device
cupy.cuda.Stream = _Stream
cupy.cuda.Event = _Event
cupy.cuda.MemoryHook = MemoryHook
cupy.cuda.get_current_stream = lambda device=None: _Stream.null
cupy.cuda.get_elapsed_time = _get_elapsed_time
cupy.cuda.is_available = lambda: True
cupy.cuda.memory_hook = types.ModuleType("cupy.cuda.memory_hook",
                                         "fakecupy's cupy.cuda.memory_hook.")
cupy.cuda.memory_hook.MemoryHook = MemoryHook
cupy.cuda.memory_hook.get_memory_hooks = get_memory_hooks
cupy.cuda.runtime = types.SimpleNamespace(
    getDeviceCount=lambda: 1,
    getDevice=lambda: 0,
    deviceSynchronize=lambda: None,
    memGetInfo=_mem_get_info,
    deviceGetAttribute=_device_get_attribute,
    getDeviceProperties=_get_device_properties,
    **{f"cudaDevAttr{name}": number for name, (number, _) in DEVICE_ATTRIBUTES.items()})
cupy.get_default_memory_pool = lambda: _memory_pool
cupy.get_default_pinned_memory_pool = lambda: _pinned_memory_pool


# --------------------------------------------------------------------------- cupyx
def _scatter(ufunc):
    def scatter(a, slices, value):
        if not isinstance(a, ndarray):
            raise TypeError(f"cupyx.scatter_{ufunc.__name__}: a must be a device array, got "
                            f"{type(a).__name__}")
        _launch()
        ufunc.at(a._array, _index_unwrap(slices), unwrap(value, "cupyx.scatter_*: value"))
    scatter.__name__ = f"scatter_{ufunc.__name__}"
    scatter.__doc__ = (f"``a[slices] {ufunc.__name__}= value``, accumulating over repeated "
                       "indices (``numpy.{ufunc.__name__}.at`` underneath).")
    return scatter


cupyx = types.ModuleType("cupyx", "fakecupy's cupyx: the scatter operations.")
cupyx.scatter_add = _scatter(np.add)
cupyx.scatter_max = _scatter(np.maximum)
cupyx.scatter_min = _scatter(np.minimum)


# --------------------------------------------------------------------------- MSDA backend
_MSDA_MODULE = "minidetr.testing.fakecupy_msda"


def _msda_backend():
    """The MSDA op's ``"cupy"`` backend on the fake device: the Numba CPU kernels on the
    wrapped data, one launch per call (kernel emulation, not a host copy)."""
    module = types.ModuleType(_MSDA_MODULE, _msda_backend.__doc__)

    def is_available():
        return True, "fakecupy: the Numba CPU kernels on the device arrays' data"

    def forward(*arrays):
        from ..ops.msda import numba_cpu
        _launch()
        return wrap(numba_cpu.forward(*unwrap(arrays, "msda (fakecupy)")))

    def backward(*arrays):
        from ..ops.msda import numba_cpu
        _launch()
        return wrap(tuple(numba_cpu.backward(*unwrap(arrays, "msda (fakecupy)"))))

    module.is_available, module.forward, module.backward = is_available, forward, backward
    return module


# --------------------------------------------------------------------------- installing
_installed_lock = threading.Lock()


@contextmanager
def installed():
    """Make minidetr (and ``import cupy``, ``cupyx``, ``cupy.cuda.memory_hook``) see this
    fake CuPy with one GPU.

    Inside the block ``minidetr.backend.cupy_available()`` is True, ``to_device(x,
    "cuda")`` gives :class:`ndarray` s, :func:`~minidetr.backend.transfer_guard` guards
    them, and the MSDA op's ``"cupy"`` backend runs the Numba CPU kernels. Everything is
    restored on exit. Yields the fake ``cupy`` module. Does not nest.
    """
    from .. import backend
    from ..ops import msda

    if not _installed_lock.acquire(blocking=False):
        raise RuntimeError("fakecupy.installed() is already active (it does not nest)")
    names = ("cupy", "cupy.cuda", "cupy.cuda.memory_hook", "cupyx", _MSDA_MODULE)
    saved_modules = {name: sys.modules.get(name) for name in names}
    try:
        sys.modules.update({"cupy": cupy, "cupy.cuda": cupy.cuda,
                            "cupy.cuda.memory_hook": cupy.cuda.memory_hook, "cupyx": cupyx,
                            _MSDA_MODULE: _msda_backend()})
        with backend.substitute_cupy(cupy), \
                msda.substitute_backend("cupy", sys.modules[_MSDA_MODULE]):
            yield cupy
    finally:
        for name, module in saved_modules.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        _installed_lock.release()
