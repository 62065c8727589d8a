"""Argument checks shared by the layer constructors (clear errors, not deep tracebacks)."""
from __future__ import annotations

import numbers

import numpy as np


def positive_int(value, name: str, layer: str) -> int:
    """``value`` as an int >= 1, or a ValueError/TypeError naming ``layer`` and ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{layer}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{layer}: {name} must be >= 1, got {value}")
    return int(value)


def non_negative_float(value, name: str, layer: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{layer}: {name} must be a number, got {type(value).__name__}")
    if not value >= 0:
        raise ValueError(f"{layer}: {name} must be >= 0, got {value}")
    return float(value)


def probability(value, name: str, layer: str) -> float:
    """A dropout probability in [0, 1)."""
    p = non_negative_float(value, name, layer)
    if p >= 1:
        raise ValueError(f"{layer}: {name} must be in [0, 1), got {value}")
    return p


def int_pair(value, name: str, layer: str, minimum: int) -> tuple:
    """An int or a pair of ints (height, width), each >= minimum, as a pair."""
    pair = (value, value) if isinstance(value, numbers.Integral) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool)
                                 for v in pair):
        raise TypeError(f"{layer}: {name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{layer}: {name} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in pair)


def generator(rng, layer: str) -> np.random.Generator:
    """The layer's init generator: ``rng`` itself, or a fresh unseeded one when None."""
    if rng is None:
        return np.random.default_rng()
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"{layer}: rng must be a numpy.random.Generator "
                        f"(np.random.default_rng(seed)) or None, got {type(rng).__name__}")
    return rng


def last_dim(x, expected: int, layer: str):
    """Raise when the last axis of ``x`` is not ``expected`` (features/channels last)."""
    if x.ndim == 0 or x.shape[-1] != expected:
        raise ValueError(f"{layer}: expected input with last dimension {expected}, "
                         f"got shape {tuple(x.shape)}")
