"""Small helpers shared by the Functions (not part of the public API)."""
from __future__ import annotations

import numpy as np

from ..autograd import Tensor, as_array


def same_float_dtype(name, *args):
    """Raise a clear error when floating operands of one op have different dtypes.

    minidetr does not promote float32 to float64 silently: a float64 gradient check must
    be float64 throughout, and a float32 model must stay float32.
    """
    dts = {a.dtype for a in args if isinstance(a, Tensor) or hasattr(a, "dtype")
           if a.dtype.kind == "f"}
    if len(dts) > 1:
        raise TypeError(f"{name}: operands have different float dtypes {sorted(map(str, dts))}; "
                        "cast one with .astype()")


def operand(x, like):
    """A Tensor stays a Tensor; a number/list/array becomes an array with ``like``'s dtype."""
    if isinstance(x, Tensor):
        return x
    ref = like.data if isinstance(like, Tensor) else like
    if hasattr(x, "dtype") and x.dtype.kind in "biu":
        return as_array(x, like=ref)
    return as_array(x, dtype=ref.dtype if ref.dtype.kind == "f" else None, like=ref)


def single_axis(name, axis, ndim):
    """One axis (an int, negatives allowed) as a non-negative int, or a clear error naming ``name``."""
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"{name}: axis must be an int, got {type(axis).__name__}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{name}: axis {axis} is out of range for a tensor with {ndim} "
                         f"dimension{'s' if ndim != 1 else ''}")
    return int(axis) % ndim


def index_add(xp, target, index, values):
    """``target[index] += values`` in place, *accumulating* over repeated indices.

    Plain ``target[index] += values`` keeps only one contribution when an integer array in
    ``index`` names the same element twice; this is the unbuffered scatter-add that
    the backward of indexing needs (``numpy.add.at`` on NumPy, ``cupyx.scatter_add`` on
    CuPy, which behave identically). ``index`` is anything NumPy accepts between square
    brackets: ints, slices, None, Ellipsis, integer or boolean arrays, or a tuple of them.
    It is the only scatter-add in minidetr.
    """
    if xp is np:
        np.add.at(target, index, values)
    else:
        import cupyx
        cupyx.scatter_add(target, index, values)
    return target


def cpu_kernels_apply(*arrays) -> bool:
    """True when the fused Numba CPU kernels (``norm_cpu``, ``softmax_cpu``) can take these
    arrays (None entries are skipped): non-empty NumPy arrays, all float32 or all float64,
    all C-contiguous. Anything else (CuPy, other dtypes, strided views) takes the NumPy
    reference code of the Function."""
    present = [a for a in arrays if a is not None]
    return (all(type(a) is np.ndarray for a in present)
            and present[0].size > 0
            and present[0].dtype in (np.float32, np.float64)
            and all(a.dtype == present[0].dtype and a.flags.c_contiguous for a in present))


def tensor_or_array(x):
    """A Tensor stays a Tensor; anything else becomes an array (Python floats: float32)."""
    return x if isinstance(x, Tensor) else as_array(x)
