"""Array backends: NumPy on the CPU, CuPy on a CUDA GPU.

minidetr has exactly one code path for both. Every function finds the array module it
needs from the arrays it is given (``xp = get_array_module(x)``), never from a global
setting, so the same model runs on NumPy arrays or on CuPy arrays.

CuPy is optional: importing minidetr never needs it. ``cupy_available()`` tells whether
CuPy imports *and* sees a CUDA device.

Device -> host copies. A CuPy array reaches the host only when asked: ``x.get()``,
``cupy.asnumpy(x)``, or a conversion to a Python value (``float(x)``, ``int(x)``,
``bool(x)`` and so ``if x:``, ``x.item()``, ``x.tolist()``, printing it). Each one waits
for the GPU to finish its queued work, so one hidden in the training step stalls it.
:func:`transfer_guard` (the debug mode of ``python -m minidetr train --debug-transfers``)
makes every such copy raise :class:`HostTransferError`, except inside
:func:`allow_transfers`, which marks the deliberate ones::

    with transfer_guard() as log:
        values = train_step(...)        # a forbidden copy raises, naming the conversion
    log                                 # Counter({"the matcher's cost matrices": 7, ...})

``np.asarray(cupy_array)`` needs no guard: CuPy always refuses it with a TypeError.
On a machine without CuPy the guard does nothing (NumPy arrays are already on the host).
"""
from __future__ import annotations

import collections
import functools
import threading
from contextlib import contextmanager

import numpy as np


@functools.lru_cache(maxsize=1)
def _import_real_cupy():
    """Return the cupy module, or None when it is not installed or not usable."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


# The stand-ins of :func:`substitute_cupy` (innermost last); empty in normal use.
_substitutes = []


def _import_cupy():
    """The CuPy module minidetr uses: a :func:`substitute_cupy` stand-in, or the real one."""
    return _substitutes[-1] if _substitutes else _import_real_cupy()


@contextmanager
def substitute_cupy(module):
    """Inside the block, minidetr takes ``module`` for CuPy (and its device for a GPU).

    The one seam for stand-ins such as :mod:`minidetr.testing.fakecupy`, which makes the
    GPU code path run, and fail as it would on a GPU, on a machine without one. The
    choice is process-wide (CuPy itself is), and it is undone on exit.
    """
    _substitutes.append(module)
    try:
        yield module
    finally:
        _substitutes.remove(module)


def cupy_available() -> bool:
    """True when CuPy imports and at least one CUDA device is visible."""
    cp = _import_cupy()
    if cp is None:
        return False
    try:
        return cp.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def why_no_cupy() -> str:
    """A one-line human reason why the GPU backend is unavailable (for skip messages)."""
    cp = _import_cupy()
    if cp is None:
        return "CuPy is not installed (pip install -e .[gpu])"
    try:
        n = cp.cuda.runtime.getDeviceCount()
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"CuPy is installed but CUDA is not usable: {e}"
    return "no CUDA device is visible" if n == 0 else "CuPy and a GPU are available"


def is_cupy_array(x) -> bool:
    cp = _import_cupy()
    return cp is not None and isinstance(x, cp.ndarray)


def get_array_module(*arrays):
    """The array module (numpy or cupy) of the given arrays.

    Non-array arguments (Python scalars, None) are ignored. Mixing NumPy and CuPy arrays
    is an error, raised with the devices named, rather than a silent copy.
    """
    found = None
    for a in arrays:
        if type(a) is np.ndarray:                  # the common case, checked first: cheap
            mod = "numpy"
        elif a is None or isinstance(a, (int, float, bool, np.generic)):
            continue
        else:
            mod = "cupy" if is_cupy_array(a) else "numpy"
        if found is None:
            found = mod
        elif found != mod:
            raise TypeError("arrays live on different devices (NumPy/CPU and CuPy/GPU); "
                            "move them with Tensor.to('cpu') or .to('cuda') first")
    if found == "cupy":
        return _import_cupy()
    return np


def device_of(x) -> str:
    """'cuda' for a CuPy array, 'cpu' otherwise."""
    return "cuda" if is_cupy_array(x) else "cpu"


class DeviceError(ValueError):
    """A device name that is not one, or a GPU asked for where none is usable."""


def parse_device(device) -> str:
    """The canonical name of ``device``: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.

    ``"gpu"`` means ``"cuda"``. The one place where device names are read: the Tensor,
    Module and training code all call it. Raises :class:`DeviceError` for anything else.
    """
    name = str(device).strip().lower()
    if name == "cpu":
        return "cpu"
    if name in ("cuda", "gpu"):
        return "cuda"
    if name.startswith("cuda:") and name[5:].isdigit():
        return name
    raise DeviceError(f"unknown device {device!r}: use 'cpu' or 'cuda' (or 'cuda:N')")


def resolve_device(device) -> str:
    """The device to compute on: ``"auto"`` (or None) means ``"cuda"`` when CuPy sees a
    GPU, else ``"cpu"``; other names are checked by :func:`parse_device`.

    Asking for a GPU without a usable one raises :class:`DeviceError` saying why.
    """
    if device is None or str(device).strip().lower() == "auto":
        return "cuda" if cupy_available() else "cpu"
    name = parse_device(device)
    if name != "cpu" and not cupy_available():
        raise DeviceError(f"--device {device}: the GPU backend is not available "
                          f"({why_no_cupy()}); use --device cpu")
    return name


def to_device(x, device: str):
    """Copy an array to ``'cpu'`` (NumPy) or ``'cuda'`` (CuPy); no copy if already there."""
    device = parse_device(device)
    if device == "cpu":
        if is_cupy_array(x):
            return x.get()
        return np.asarray(x)
    cp = _import_cupy()
    if cp is None or not cupy_available():
        raise RuntimeError(f"cannot move to {device!r}: {why_no_cupy()}")
    if device.startswith("cuda:"):
        with cp.cuda.Device(int(device.split(":")[1])):
            return cp.asarray(x)
    return cp.asarray(x)


def to_numpy(x):
    """Any array (or Tensor's data) as a NumPy array on the host."""
    return x.get() if is_cupy_array(x) else np.asarray(x)


# --------------------------------------------------------------------------- out of memory
def is_out_of_memory(error: BaseException) -> bool:
    """True when ``error`` says an allocation failed for lack of memory.

    That is NumPy's ``MemoryError``, CuPy's ``cupy.cuda.memory.OutOfMemoryError`` (a
    subclass of it), or an error of a CUDA library called through CuPy (cuBLAS, cuDNN,
    the CUDA runtime) whose message reports it (``ALLOC_FAILED``, ``out of memory``).
    """
    if isinstance(error, MemoryError):
        return True
    from_cupy = type(error).__module__.split(".")[0] in ("cupy", "cupy_backends", "cupyx")
    text = str(error)
    return from_cupy and ("out of memory" in text.lower() or "ALLOC_FAILED" in text)


# --------------------------------------------------------------------------- transfer guard
class HostTransferError(RuntimeError):
    """A device -> host copy inside :func:`transfer_guard` that no allowance covered."""


# The methods of cupy.ndarray that copy device memory to the host (each one exists in
# current CuPy; names a CuPy version lacks, e.g. __index__, are skipped, never added).
# ``get`` is the copy itself; the others are conversions that call it.
TRANSFER_METHODS = ("get", "item", "tolist", "tobytes", "tofile", "__float__", "__int__",
                    "__complex__", "__bool__", "__index__", "__bytes__", "__format__",
                    "__repr__", "__str__")


class _GuardState(threading.local):
    """Per thread: the reasons of the open allow_transfers() blocks, and whether a
    guarded conversion is running (a conversion calling another one is checked once)."""

    def __init__(self):
        self.reasons = []
        self.converting = False


_state = _GuardState()
_guard_lock = threading.Lock()


@contextmanager
def allow_transfers(reason: str = "allowed"):
    """Inside an active :func:`transfer_guard`, let this block copy to the host.

    ``reason`` names the copy in the guard's log (e.g. "the matcher's cost matrices").
    Without a guard, or without CuPy, it does nothing. Blocks nest.
    """
    _state.reasons.append(reason)
    try:
        yield
    finally:
        _state.reasons.pop()


def _check_allow(allow):
    unknown = sorted(set(allow) - set(TRANSFER_METHODS))
    if isinstance(allow, str) or unknown:
        raise ValueError(f"transfer_guard: allow must be a collection of names from "
                         f"{TRANSFER_METHODS}, got {allow!r}")


def _guarded(name, method, allowed_names, log):
    """``method`` (a transfer method of an array class), checked before it runs."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        if _state.converting:                 # called by a conversion already checked
            return method(self, *args, **kwargs)
        if _state.reasons:
            reason = _state.reasons[-1]
        elif name in allowed_names:
            reason = f"transfer_guard(allow=...{name}...)"
        else:
            raise HostTransferError(
                f"device -> host copy inside transfer_guard(): "
                f"{type(self).__module__}.{type(self).__qualname__}.{name}() "
                f"of an array of shape {tuple(self.shape)} and dtype {self.dtype} (the "
                "traceback shows the line). Keep the value on the device, or wrap a "
                "deliberate copy in minidetr.backend.allow_transfers('why').")
        log[reason] += 1
        _state.converting = True
        try:
            return method(self, *args, **kwargs)
        finally:
            _state.converting = False

    return guarded


@contextmanager
def guard_array_type(array_type, allow=()):
    """Guard the transfer methods of ``array_type`` (the engine of :func:`transfer_guard`).

    Every method of :data:`TRANSFER_METHODS` that ``array_type`` has is replaced, on the
    class, by a checking wrapper for the duration of the block; afterwards the class is
    exactly as before (its own methods put back, inherited ones uncovered again). Yields
    a :class:`collections.Counter` of the allowed copies by reason.

    ``cupy.ndarray`` is a Python subclass of CuPy's compiled ``_ndarray_base``, so its
    attributes can be set; the compiled base class is never touched. Patching a class is
    process-wide, so guards do not nest (a second one raises RuntimeError).
    """
    _check_allow(allow)
    if not _guard_lock.acquire(blocking=False):
        raise RuntimeError("transfer_guard is already active (guards do not nest)")
    log = collections.Counter()
    own = {}                                  # name -> the class's own attribute, or None
    try:
        for name in TRANSFER_METHODS:
            if not hasattr(array_type, name):
                continue
            attribute = array_type.__dict__.get(name)
            try:
                setattr(array_type, name, _guarded(name, getattr(array_type, name),
                                                   frozenset(allow), log))
            except TypeError as e:            # a compiled (immutable) class
                raise RuntimeError(f"transfer_guard cannot wrap {array_type.__qualname__}."
                                   f"{name} ({e}); it needs CuPy 13 or newer, whose "
                                   "ndarray is a Python class") from e
            own[name] = attribute
        yield log
    finally:
        for name, attribute in own.items():
            if attribute is None:
                delattr(array_type, name)     # inherited: uncover the base class's method
            else:
                setattr(array_type, name, attribute)
        _guard_lock.release()


@contextmanager
def transfer_guard(allow=()):
    """Debug mode: any device -> host copy of a CuPy array in the block raises.

    Args:
        allow: names from :data:`TRANSFER_METHODS` that stay allowed everywhere in the
            block, e.g. ``("__repr__", "__str__")`` to print arrays while debugging.

    Yields:
        a :class:`collections.Counter`: how many copies each :func:`allow_transfers`
        reason (or ``allow`` entry) let through.

    Raises:
        HostTransferError: at the first copy outside an :func:`allow_transfers` block,
            naming the conversion (``__float__``, ``get``, ...) and the array's shape.

    It catches the copies made through the Python-level methods of ``cupy.ndarray``
    (:data:`TRANSFER_METHODS`), which is every copy that minidetr's code or a
    ``float()``/``bool()``/``if`` on an array can make; a copy that CuPy's compiled code
    makes internally without calling them is not seen. With NumPy only (no CuPy
    installed) the guard does nothing and the log stays empty. One guard at a time.
    """
    cp = _import_cupy()
    if cp is None:
        _check_allow(allow)
        yield collections.Counter()
        return
    with guard_array_type(cp.ndarray, allow) as log:
        yield log
