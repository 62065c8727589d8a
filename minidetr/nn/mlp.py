"""MLP: the official DETR feed-forward head (Linear, ReLU, ..., Linear).

Shapes:
    x: (..., input_dim) -> (..., output_dim)

Layer i maps dims[i] -> dims[i+1] with dims = [input_dim, hidden_dim * (num_layers-1),
output_dim]; ReLU follows every layer but the last. The submodule list is named
``layers``, so keys read ``bbox_embed.0.layers.2.weight`` as in the official checkpoint.
"""
from __future__ import annotations

from .. import functional as F
from . import _checks
from .linear import Linear
from .module import Module, ModuleList


class MLP(Module):
    """``num_layers`` Linear layers with ReLU in between (none after the last)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int,
                 rng=None):
        super().__init__()
        for name, value in (("input_dim", input_dim), ("hidden_dim", hidden_dim),
                            ("output_dim", output_dim), ("num_layers", num_layers)):
            _checks.positive_int(value, name, "MLP")
        rng = _checks.generator(rng, "MLP")
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        dims_in, dims_out = [input_dim] + hidden, hidden + [output_dim]
        self.layers = ModuleList(Linear(n_in, n_out, rng=rng)
                                 for n_in, n_out in zip(dims_in, dims_out))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < self.num_layers - 1:
                x = F.relu(x)
        return x
