"""Weight initialisers, in place, each with an explicit random generator.

Every function fills a Parameter (or a plain array) *in place* and returns it. Random
values are drawn on the host by the NumPy Generator you pass (``rng``), in float64, then
cast to the tensor's dtype and copied to its device, so a CPU run and a GPU run built
from the same seed start from identical weights.

The formulas are PyTorch's (``torch.nn.init``):

=======================  ==========================================================
``xavier_uniform_``      U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))
``kaiming_uniform_``     U(-b, b), b = sqrt(3) * gain / sqrt(fan_in),
                         gain = sqrt(2 / (1 + a^2)) (leaky ReLU slope a)
``default_linear_init_`` PyTorch's Linear/Conv default: kaiming_uniform_ with a = sqrt(5)
                         for the weight, i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in)), and the
                         same bound for the bias
=======================  ==========================================================

Fans of a weight of shape (out, in, *kernel): fan_in = in * prod(kernel),
fan_out = out * prod(kernel) (a Linear weight (out, in) has an empty kernel).
"""
from __future__ import annotations

import math

import numpy as np

from ..autograd import Tensor
from ..backend import device_of, to_device


def _array_of(t):
    """The array inside a Tensor/Parameter, or the array itself."""
    return t.data if isinstance(t, Tensor) else t


def _check_rng(rng, fn_name):
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{fn_name}: pass rng=np.random.default_rng(seed) (a NumPy Generator), "
                        f"got {type(rng).__name__}")


def _fill(t, values):
    """Write host float64 ``values`` into ``t`` in place, cast to its dtype, on its device."""
    target = _array_of(t)
    values = np.asarray(values, dtype=np.float64).astype(target.dtype)
    target[...] = to_device(values, device_of(target))
    return t


def calculate_fan_in_and_fan_out(shape) -> tuple:
    """(fan_in, fan_out) of a weight of shape (out, in, *kernel); needs at least 2 dims."""
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"fans need a weight with at least 2 dimensions, got shape {shape}")
    receptive_field = int(np.prod(shape[2:])) if len(shape) > 2 else 1
    return shape[1] * receptive_field, shape[0] * receptive_field


# --------------------------------------------------------------------------- constants
def constant_(t, value: float):
    """Fill with ``value``."""
    target = _array_of(t)
    target[...] = value
    return t


def zeros_(t):
    return constant_(t, 0.0)


# --------------------------------------------------------------------------- random
def uniform_(t, a: float = 0.0, b: float = 1.0, rng=None):
    """Fill with samples of U(a, b)."""
    _check_rng(rng, "uniform_")
    if not a <= b:
        raise ValueError(f"uniform_: need a <= b, got a={a}, b={b}")
    return _fill(t, rng.uniform(a, b, size=_array_of(t).shape))


def normal_(t, mean: float = 0.0, std: float = 1.0, rng=None):
    """Fill with samples of N(mean, std^2)."""
    _check_rng(rng, "normal_")
    if std < 0:
        raise ValueError(f"normal_: std must be >= 0, got {std}")
    return _fill(t, rng.normal(mean, std, size=_array_of(t).shape))


def xavier_uniform_(t, gain: float = 1.0, rng=None):
    """Glorot/Xavier uniform: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out))."""
    _check_rng(rng, "xavier_uniform_")
    fan_in, fan_out = calculate_fan_in_and_fan_out(_array_of(t).shape)
    bound = gain * math.sqrt(6.0 / (fan_in + fan_out))
    return _fill(t, rng.uniform(-bound, bound, size=_array_of(t).shape))


def kaiming_uniform_(t, a: float = 0.0, rng=None):
    """He/Kaiming uniform for a leaky ReLU of slope ``a`` (mode fan_in), as in PyTorch."""
    _check_rng(rng, "kaiming_uniform_")
    fan_in, _ = calculate_fan_in_and_fan_out(_array_of(t).shape)
    gain = math.sqrt(2.0 / (1.0 + a * a))
    bound = math.sqrt(3.0) * gain / math.sqrt(fan_in)
    return _fill(t, rng.uniform(-bound, bound, size=_array_of(t).shape))


def default_linear_init_(weight, bias=None, rng=None):
    """PyTorch's default for Linear and Conv2d: weight then bias, both U(+-1/sqrt(fan_in)).

    ``kaiming_uniform_(weight, a=sqrt(5))`` simplifies to the bound 1/sqrt(fan_in).
    """
    _check_rng(rng, "default_linear_init_")
    kaiming_uniform_(weight, a=math.sqrt(5.0), rng=rng)
    if bias is not None:
        fan_in, _ = calculate_fan_in_and_fan_out(_array_of(weight).shape)
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        uniform_(bias, -bound, bound, rng=rng)
    return weight, bias
