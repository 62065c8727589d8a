"""Array backends: NumPy on the CPU, CuPy on a CUDA GPU.

minidetr has exactly one code path for both. Every function finds the array module it
needs from the arrays it is given (``xp = get_array_module(x)``), never from a global
setting, so the same model runs on NumPy arrays or on CuPy arrays.

CuPy is optional: importing minidetr never needs it. ``cupy_available()`` tells whether
CuPy imports *and* sees a CUDA device.
"""
from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=1)
def _import_cupy():
    """Return the cupy module, or None when it is not installed or not usable."""
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CUDA library that fails to load
        return None
    return cupy


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
        if a is None or isinstance(a, (int, float, bool, np.generic)):
            continue
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


def to_device(x, device: str):
    """Copy an array to ``'cpu'`` (NumPy) or ``'cuda'`` (CuPy); no copy if already there."""
    if device == "cpu":
        if is_cupy_array(x):
            return x.get()
        return np.asarray(x)
    if device in ("cuda", "gpu") or device.startswith("cuda:"):
        cp = _import_cupy()
        if cp is None or not cupy_available():
            raise RuntimeError(f"cannot move to {device!r}: {why_no_cupy()}")
        if device.startswith("cuda:"):
            with cp.cuda.Device(int(device.split(":")[1])):
                return cp.asarray(x)
        return cp.asarray(x)
    raise ValueError(f"unknown device {device!r}: use 'cpu' or 'cuda'")


def to_numpy(x):
    """Any array (or Tensor's data) as a NumPy array on the host."""
    return x.get() if is_cupy_array(x) else np.asarray(x)
