"""The sine position embedding of DETR / Deformable DETR, computed from a padding mask.

Every pixel of every feature level gets a fixed (not learned) vector that says where it
is. For a pixel at row ``i`` and column ``j`` of an image whose valid (unpadded) part is
``h x w`` pixels of the feature map, the normalised coordinates are

    y = (i + 1 - 0.5) / (h + 1e-6) * 2 pi        x = (j + 1 - 0.5) / (w + 1e-6) * 2 pi

(``i + 1`` is the running count of valid pixels, obtained with a cumulative sum over the
*not*-mask, which is how padding is taken into account). Each coordinate is then encoded
with ``F = num_pos_feats`` sinusoids of geometric frequencies

    dim_t[k] = T ** (2 * floor(k / 2) / F)          k = 0 .. F-1,  T = temperature
    e[k] = sin(y / dim_t[k]) if k is even, cos(y / dim_t[k]) if k is odd

so channels ``2k`` and ``2k+1`` are the sine and the cosine of the same frequency
(interleaved, not two blocks). The ``F`` y-features come first, then the ``F`` x-features.

Padded pixels: in a row that is entirely padding, the cumulative count along the row is
0 everywhere, so ``x = (0 - 0.5) / (0 + 1e-6) * 2 pi ~ -3.1e6`` (and likewise ``y`` in an
all-padding column). These huge arguments are what the official implementation computes;
minidetr reproduces them exactly, because padded pixels are still encoder queries there.

This module needs no gradient: the embedding depends only on the mask. It is computed on
plain arrays of the mask's array module (NumPy or CuPy) and returned as a Tensor that does
not require grad.

Implemented by :func:`sine_position_embedding` (the formula, on arrays) and
:class:`PositionEmbeddingSine` (the parameter-free module that sits at index 1 of the
backbone :class:`~minidetr.models.backbone.Joiner`, as in the official code).
"""
from __future__ import annotations

import math

import numpy as np

from .. import nn
from ..autograd import Tensor
from ..backend import get_array_module


def sine_position_embedding(mask, num_pos_feats=128, temperature=10000, normalize=True,
                            scale=2 * math.pi, eps=1e-6, dtype=np.float32):
    """The sine position embedding of a padding mask, as a plain array.

    Args:
        mask: bool array (B, H, W), True on padding (NumPy or CuPy; a Tensor is unwrapped).
        num_pos_feats: F, the number of channels per coordinate (the output has 2F).
        temperature: T, the base of the geometric frequency progression.
        normalize: divide the running counts by the valid extent (minus 0.5) and multiply
            by ``scale`` (Deformable DETR: True; the original DETR default was False).
        scale: the range of the normalised coordinates, 2 pi by default.
        eps: added to the valid extent before dividing (1e-6 in the official code).
        dtype: the float dtype of the computation and of the result (float32 default;
            float64 for gradient checks of a whole model).

    Returns:
        array (B, 2F, H, W): channels [0, F) encode y, [F, 2F) encode x; within each
        block, even channels are sines and odd channels cosines of the same frequency.

    Shapes:
        mask (B, H, W) -> embedding (B, 2F, H, W)
    """
    if isinstance(mask, Tensor):
        mask = mask.data
    if not hasattr(mask, "dtype") or mask.dtype != np.bool_:
        raise TypeError(f"sine_position_embedding: mask must be a bool array, got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.ndim != 3:
        raise ValueError(f"sine_position_embedding: mask must have shape (B, H, W), "
                         f"got {tuple(mask.shape)}")
    if num_pos_feats % 2:
        raise ValueError(f"sine_position_embedding: num_pos_feats must be even (sine/cosine "
                         f"pairs), got {num_pos_feats}")
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise TypeError(f"sine_position_embedding: dtype must be a float dtype, got {dtype}")
    xp = get_array_module(mask)

    not_mask = ~mask
    # running counts of valid pixels: 1, 2, 3, ... along each column (y) and row (x)
    y_embed = xp.cumsum(not_mask, axis=1, dtype=dtype)            # (B, H, W)
    x_embed = xp.cumsum(not_mask, axis=2, dtype=dtype)            # (B, H, W)
    if normalize:
        # the last entry of each column/row is the valid extent h (resp. w)
        y_embed = (y_embed - 0.5) / (y_embed[:, -1:, :] + eps) * scale
        x_embed = (x_embed - 0.5) / (x_embed[:, :, -1:] + eps) * scale

    # The frequencies, computed in float64 and rounded once to ``dtype``: this is the
    # correctly rounded value, which is what PyTorch's float32 ``10000 ** t`` gives
    # (NumPy's float32 power differs in the last bit for 22 of the 128 entries, and a
    # 1-ulp change of dim_t moves the huge padded arguments by ~0.1 rad).
    k = np.arange(num_pos_feats, dtype=np.float64)
    dim_t = xp.asarray((temperature ** (2 * (k // 2) / num_pos_feats)).astype(dtype))  # (F,)

    def encode(coord):
        """(B, H, W) coordinates -> (B, H, W, F): sin on even channels, cos on odd."""
        arg = coord[..., None] / dim_t                             # (B, H, W, F)
        out = xp.empty_like(arg)
        out[..., 0::2] = xp.sin(arg[..., 0::2])
        out[..., 1::2] = xp.cos(arg[..., 1::2])
        return out

    pos = xp.concatenate([encode(y_embed), encode(x_embed)], axis=3)  # (B, H, W, 2F)
    return xp.ascontiguousarray(pos.transpose(0, 3, 1, 2))           # (B, 2F, H, W)


class PositionEmbeddingSine(nn.Module):
    """The parameter-free sine position embedding module (official name and defaults).

    ``PositionEmbeddingSine(num_pos_feats=128)(mask)`` returns a Tensor (B, 256, H, W)
    that does not require grad. See :func:`sine_position_embedding` for the formula.

    Shapes:
        mask (B, H, W) bool -> Tensor (B, 2 * num_pos_feats, H, W)
    """

    def __init__(self, num_pos_feats=128, temperature=10000, normalize=True, scale=None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("PositionEmbeddingSine: scale is only used with normalize=True")
        self.num_pos_feats = int(num_pos_feats)
        self.temperature = temperature
        self.normalize = bool(normalize)
        self.scale = 2 * math.pi if scale is None else float(scale)

    def forward(self, mask, dtype=np.float32):
        """The embedding of ``mask`` (B, H, W) as a Tensor of ``dtype`` (no gradient)."""
        return Tensor(sine_position_embedding(
            mask, self.num_pos_feats, self.temperature, self.normalize, self.scale,
            dtype=dtype))

    def extra_repr(self):
        return (f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
                f"normalize={self.normalize}, scale={self.scale:.4f}")
