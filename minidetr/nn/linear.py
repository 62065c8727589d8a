"""Linear: y = x W^T + b, with PyTorch's parameter layout and default initialisation.

Shapes:
    x: (..., in_features) -> y: (..., out_features)
    weight: (out_features, in_features), bias: (out_features,)
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from . import _checks, init
from .module import Module, Parameter


class Linear(Module):
    """A fully connected layer. Init: U(+-1/sqrt(in_features)) for weight and bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rng=None):
        super().__init__()
        self.in_features = _checks.positive_int(in_features, "in_features", "Linear")
        self.out_features = _checks.positive_int(out_features, "out_features", "Linear")
        rng = _checks.generator(rng, "Linear")
        self.weight = Parameter(np.empty((out_features, in_features), dtype=np.float32))
        self.bias = Parameter(np.empty(out_features, dtype=np.float32)) if bias else None
        init.default_linear_init_(self.weight, self.bias, rng=rng)

    def forward(self, x):
        _checks.last_dim(x, self.in_features, f"Linear({self.in_features}, {self.out_features})")
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
