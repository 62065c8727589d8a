"""Dropout: the one Function that draws random numbers.

Inverted dropout zeroes each element with probability p and scales the survivors by
1/(1-p), so the expected value of every element is unchanged and evaluation needs no
rescaling::

    y = x * mask,   mask = keep / (1 - p),   keep ~ Bernoulli(1 - p)   (elementwise)
    dL/dx = dL/dy * mask

The random numbers come from an explicit ``numpy.random.Generator`` (no global seed):
the same Generator state gives the same mask.

* NumPy: one 32-bit random integer u per element, taken straight from the Generator's
  bit generator (``random_raw``: two per 64-bit output), and keep = u >= round(p 2^32),
  so P(keep) = 1 - p to within 2^-33. The mask is made in the array's dtype. This is
  3x cheaper than drawing floats in [0, 1) (``Generator.random`` converts every draw);
  it gives other masks than minidetr before December 2026, which drew those floats.
* CuPy: the uniform draws are made on the device, by a CuPy generator seeded from that
  Generator, so the mask is never copied from host to device.

Shapes: x (any) -> y (same shape and dtype).

Derivation: docs/autograd.md, section "Dropout".
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from ..autograd import Function, Tensor, as_array
from ..backend import get_array_module


class Dropout(Function):
    """y = x * mask, for a given constant ``mask`` (zeros and 1/(1-p))."""

    @staticmethod
    def forward(ctx, x, mask):
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        mask, = ctx.saved_tensors
        return grad * mask, None


def _keep_mask_numpy(rng, shape, p, dtype):
    """The NumPy mask: 1/(1-p) with probability 1 - p, else 0, of ``shape`` and ``dtype``.

    One uint32 per element from ``rng``'s bit generator (its raw 64-bit outputs, each
    split into two; little-endian order), kept where u >= round(p * 2^32).
    """
    n = math.prod(shape)
    raw = rng.bit_generator.random_raw((n + 1) // 2)                  # ceil(n/2) uint64
    bits = raw.view(np.uint32)[:n].reshape(shape)                      # (shape) uint32
    threshold = np.uint32(min(round(p * 2.0**32), 2**32 - 1))
    mask = (bits >= threshold).astype(dtype)                           # 0 or 1
    mask *= dtype.type(1 / (1 - p))                                    # 0 or 1/(1-p)
    return mask


def _uniform(rng, shape, dtype, xp):
    """U[0, 1) samples of ``shape`` and ``dtype`` on the GPU (``xp`` is CuPy or a stand-in).

    Drawn by a device generator (counter-based Philox, cheap to create) seeded by one
    integer drawn from ``rng``, so runs stay reproducible from the one host seed.
    """
    seed = int(rng.integers(2**63))
    device_rng = xp.random.Generator(xp.random.Philox4x3210(seed))
    return device_rng.random(shape, dtype=dtype)


def dropout(x, p, training, rng):
    """Inverted dropout.

    Args:
        x: Tensor or array, floating point (float32 or float64).
        p: probability of zeroing an element, 0 <= p < 1.
        training: if False, or if p == 0, dropout is the identity (``x`` is returned as
            a Tensor, unchanged).
        rng: ``numpy.random.Generator`` that seeds the draw (needed when training).

    Returns:
        Tensor of x's shape and dtype.
    """
    if not isinstance(p, numbers.Real) or not 0 <= p < 1:
        raise ValueError(f"dropout: p must be a number with 0 <= p < 1, got {p!r}")
    if not training or p == 0:
        return x if isinstance(x, Tensor) else Tensor(x)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"dropout: rng must be a numpy.random.Generator, got {type(rng).__name__}")
    data = x.data if isinstance(x, Tensor) else as_array(x)
    if data.dtype not in (np.float32, np.float64):
        raise TypeError(f"dropout: x must be float32 or float64, got {data.dtype}")
    xp = get_array_module(data)
    if xp is np:
        mask = _keep_mask_numpy(rng, data.shape, p, data.dtype)        # 0 or 1/(1-p)
    else:
        keep = _uniform(rng, data.shape, data.dtype, xp) >= p          # P(keep) = 1 - p
        mask = keep.astype(data.dtype) / data.dtype.type(1 - p)        # 0 or 1/(1-p)
    return Dropout.apply(x if isinstance(x, Tensor) else data, mask)
