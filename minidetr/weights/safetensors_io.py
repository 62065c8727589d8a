"""Reading ``.safetensors`` files (Hugging Face's weights format) as NumPy arrays.

A ``.safetensors`` file is::

    8 bytes       N, little-endian uint64: the length of the header
    N bytes       JSON header: {"<name>": {"dtype": "F32", "shape": [d0, ...],
                                           "data_offsets": [begin, end]}, ...,
                                "__metadata__": {"<key>": "<text>", ...}}
    the rest      the tensors' bytes, row-major and little-endian; tensor <name> is
                  bytes [8 + N + begin, 8 + N + end)

It holds no code: unlike a pickle, reading it can run nothing. This module reads it with
the ``safetensors`` package's NumPy API (``safe_open(..., framework="np")``), which checks
the header (offsets in order, no overlaps, sizes that match the shapes and the file). One
addition: NumPy has no bfloat16, and ``safetensors`` refuses ``BF16`` tensors in NumPy, so
those are read from their bytes at the header's offsets and converted to float32, exactly
(a bfloat16 is the upper 16 bits of a float32). The 8-bit float types (``F8_*``) have no
NumPy equivalent either and give a clear error.
"""
from __future__ import annotations

import json
import struct
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import WeightsFileError

# safetensors dtypes that NumPy does not have (bfloat16 is converted; these are refused).
_NO_NUMPY_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C4")


class SafetensorsError(WeightsFileError):
    """A ``.safetensors`` file cannot be read: missing, truncated, corrupt, or not one."""


def _safe_open():
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise SafetensorsError("reading .safetensors files needs the safetensors package (a "
                               "dependency of minidetr): pip install safetensors") from None
    return safe_open, SafetensorError


def _header(path: Path) -> dict:
    """The JSON header of a file (already validated by safetensors)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length)), 8 + length


def _bfloat16_tensor(path: Path, key: str) -> np.ndarray:
    """A BF16 tensor read from its bytes, as float32 (exact). Shapes: ``shape`` of the header."""
    header, data_start = _header(path)
    entry = header[key]
    begin, end = entry["data_offsets"]
    with open(path, "rb") as f:
        f.seek(data_start + begin)
        raw = f.read(end - begin)
    bits = np.frombuffer(raw, dtype="<u2")                           # (prod(shape),)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(entry["shape"])


def load_safetensors(path) -> "OrderedDict[str, np.ndarray]":
    """The tensors of a ``.safetensors`` file, name -> NumPy array (in the file's order).

    Every dtype keeps its NumPy equivalent and bits; ``BF16`` becomes float32 (exactly).
    The arrays are writable and own their memory (the file is not kept open).

    Raises:
        SafetensorsError: the file is missing, truncated, corrupt, not a safetensors file,
            holds a dtype NumPy does not have, or the ``safetensors`` package is missing.
    """
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: " + ("a folder, not a file" if path.is_dir() else
                                              "no such file"))
    safe_open, SafetensorError = _safe_open()
    size = path.stat().st_size
    if size < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short for a .safetensors file "
                               "(truncated?)")
    tensors = OrderedDict()
    try:
        with safe_open(str(path), framework="np") as f:
            keys = f.offset_keys() if hasattr(f, "offset_keys") else f.keys()
            for key in keys:                                   # in the file's order
                dtype = f.get_slice(key).get_dtype()
                if dtype == "BF16":
                    tensors[key] = _bfloat16_tensor(path, key)
                elif dtype in _NO_NUMPY_DTYPES:
                    raise SafetensorsError(f"{path}: tensor {key!r} has dtype {dtype}, which "
                                           "NumPy does not have")
                else:
                    tensors[key] = np.array(f.get_tensor(key), copy=True)
    except WeightsFileError:
        raise
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: not a valid .safetensors file, or truncated ({e})") \
            from None
    except (OSError, ValueError, TypeError, KeyError, struct.error) as e:
        raise SafetensorsError(f"{path}: cannot be read as a .safetensors file "
                               f"({type(e).__name__}: {e})") from None
    return tensors


def safetensors_metadata(path) -> dict:
    """The ``__metadata__`` of a ``.safetensors`` file (text key -> text), or ``{}``."""
    path = Path(path)
    if not path.is_file():
        raise SafetensorsError(f"{path}: no such file")
    safe_open, SafetensorError = _safe_open()
    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise SafetensorsError(f"{path}: not a valid .safetensors file, or truncated ({e})") \
            from None


__all__ = ["load_safetensors", "safetensors_metadata", "SafetensorsError"]
