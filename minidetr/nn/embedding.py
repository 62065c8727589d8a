"""Embedding: a learned lookup table, rows picked by integer indices.

Shapes:
    indices: any integer shape (...) -> output (..., embedding_dim)
    weight: (num_embeddings, embedding_dim), init N(0, 1) as in PyTorch

The gradient of a lookup is a scatter-add: a row used twice receives the sum of both
upstream gradients (done by the backward of ``F.getitem``).
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..backend import get_array_module
from . import _checks, init
from .module import Module, Parameter


class Embedding(Module):
    """``num_embeddings`` learned vectors of size ``embedding_dim``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rng=None):
        super().__init__()
        self.num_embeddings = _checks.positive_int(num_embeddings, "num_embeddings", "Embedding")
        self.embedding_dim = _checks.positive_int(embedding_dim, "embedding_dim", "Embedding")
        rng = _checks.generator(rng, "Embedding")
        self.weight = Parameter(np.empty((num_embeddings, embedding_dim), dtype=np.float32))
        init.normal_(self.weight, 0.0, 1.0, rng=rng)

    def forward(self, indices):
        idx = indices.data if isinstance(indices, Tensor) else indices
        xp = get_array_module(self.weight.data)
        idx = xp.asarray(idx)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"Embedding: indices must be integers, got dtype {idx.dtype}")
        if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= self.num_embeddings):
            raise IndexError(f"Embedding: indices must be in [0, {self.num_embeddings}), got "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return F.getitem(self.weight, idx)          # (..., embedding_dim)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"
