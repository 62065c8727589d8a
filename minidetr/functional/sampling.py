"""Nearest-neighbour resizing of masks, exactly as PyTorch's ``F.interpolate(mode='nearest')``.

Deformable DETR resizes the image's padding mask (B, H, W) to every feature level with
``F.interpolate(mask[None].float(), size=(H_l, W_l)).bool()``. For each output index
``dst`` PyTorch reads the source index::

    scale = float32(in) / float32(out)
    src   = min(floor(float32(dst) * scale), in - 1)       # all in float32

(the legacy OpenCV INTER_NEAREST rule). The float32 rounding matters: for ``in = 2``,
``out = 82`` the exact ``floor(41 * 2 / 82)`` is 1 but PyTorch reads index 0, and so do we.

Shapes: x (..., H, W) -> (..., H_out, W_out), e.g. (N, H, W) masks or (N, C, H, W).
There is no gradient: the result is a constant Tensor.
"""
from __future__ import annotations

import numpy as np

from ..autograd import Tensor, as_array, is_grad_enabled
from ..backend import get_array_module


def nearest_source_index(n_in: int, n_out: int):
    """The source index read by each of the ``n_out`` outputs (a NumPy int64 array).

    >>> nearest_source_index(5, 3).tolist()
    [0, 1, 3]
    """
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    return np.minimum(np.floor(dst * scale).astype(np.int64), n_in - 1)


def interpolate_nearest(x, size):
    """Resize the last two axes of ``x`` to ``size`` by nearest-neighbour lookup.

    Args:
        x: Tensor or array (..., H, W) of any dtype (usually a bool padding mask),
            with at least 2 axes. A Tensor that requires grad is refused: this function
            has no backward.
        size: (H_out, W_out), positive ints.

    Returns:
        Tensor (..., H_out, W_out) with x's dtype, requires_grad False.
    """
    if isinstance(x, Tensor) and x.requires_grad and is_grad_enabled():
        raise ValueError("interpolate_nearest has no gradient; pass x.detach() (it is meant "
                         "for padding masks)")
    data = x.data if isinstance(x, Tensor) else as_array(x)
    if data.ndim < 2:
        raise ValueError(f"interpolate_nearest: x must have at least 2 axes (..., H, W), got "
                         f"shape {tuple(data.shape)}")
    if (not isinstance(size, (tuple, list)) or len(size) != 2
            or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size)):
        raise ValueError(f"interpolate_nearest: size must be a pair of positive ints, got {size!r}")
    xp = get_array_module(data)
    H, W = data.shape[-2:]
    rows = xp.asarray(nearest_source_index(H, int(size[0])))           # (H_out,)
    cols = xp.asarray(nearest_source_index(W, int(size[1])))           # (W_out,)
    return Tensor(data[..., rows[:, None], cols[None, :]])             # (..., H_out, W_out)
