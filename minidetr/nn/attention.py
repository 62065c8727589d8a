"""MultiheadAttention: standard scaled dot-product attention with M heads.

Used by the Deformable DETR decoder for self-attention among the object queries. The
parameters have PyTorch's ``nn.MultiheadAttention`` layout, so official weights load
unchanged:

=================  ===========  =============================================
``in_proj_weight``  (3C, C)     rows [W_q; W_k; W_v] = 0:C, C:2C, 2C:3C
``in_proj_bias``    (3C,)       [b_q; b_k; b_v]
``out_proj``        Linear(C,C) keys ``out_proj.weight``, ``out_proj.bias``
=================  ===========  =============================================

For each head m (channels m*D ... (m+1)*D - 1 of the projections, D = C / M)::

    A_m = softmax(Q_m K_m^T / sqrt(D))          (Lq, Lk), over the keys
    O_m = A_m V_m                               (Lq, D)
    out = concat_m(O_m) W_o^T + b_o             (Lq, C)

with Q = query W_q^T + b_q, K = key W_k^T + b_k, V = value W_v^T + b_v. Keys marked True
in ``key_padding_mask`` get the score -inf, hence the weight 0. (A query whose keys are
all masked gets NaN weights, as in PyTorch; DETR never masks all keys.)

**Batch first.** Inputs are (N, L, C), batch first, unlike PyTorch's default (L, N, C).

Shapes:
    query (N, Lq, C), key (N, Lk, C), value (N, Lk, C), key_padding_mask (N, Lk) bool
    -> output (N, Lq, C), weights averaged over heads (N, Lq, Lk) or None

Init (as PyTorch): xavier_uniform_ on in_proj_weight, zeros on in_proj_bias and
out_proj.bias, out_proj.weight keeps the Linear default.
"""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..backend import get_array_module
from . import _checks, init
from .activation import Dropout
from .linear import Linear
from .module import Module, Parameter


class MultiheadAttention(Module):
    """Multi-head attention over batch-first inputs (N, L, C); see the module docstring."""

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, rng=None):
        super().__init__()
        C = _checks.positive_int(embed_dim, "embed_dim", "MultiheadAttention")
        M = _checks.positive_int(num_heads, "num_heads", "MultiheadAttention")
        if C % M != 0:
            raise ValueError(f"MultiheadAttention: embed_dim ({C}) must be divisible by "
                             f"num_heads ({M})")
        rng = _checks.generator(rng, "MultiheadAttention")
        self.embed_dim, self.num_heads, self.head_dim = C, M, C // M
        self.scaling = 1.0 / math.sqrt(self.head_dim)
        # Registration order gives the official key order:
        # in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias.
        self.in_proj_weight = Parameter(np.empty((3 * C, C), dtype=np.float32))
        self.in_proj_bias = Parameter(np.zeros(3 * C, dtype=np.float32))
        self.out_proj = Linear(C, C, rng=rng)
        # Dropout on the attention probabilities (a module, so it owns its random stream).
        self.attn_dropout = Dropout(_checks.probability(dropout, "dropout", "MultiheadAttention"))
        init.xavier_uniform_(self.in_proj_weight, rng=rng)
        init.zeros_(self.out_proj.bias)

    def _check_inputs(self, query, key, value, key_padding_mask):
        C = self.embed_dim
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.ndim != 3 or t.shape[-1] != C:
                raise ValueError(f"MultiheadAttention: {name} must be (N, L, {C}) (batch "
                                 f"first), got shape {tuple(t.shape)}")
        if key.shape != value.shape:
            raise ValueError(f"MultiheadAttention: key and value shapes differ: "
                             f"{tuple(key.shape)} vs {tuple(value.shape)}")
        if query.shape[0] != key.shape[0]:
            raise ValueError(f"MultiheadAttention: query batch {query.shape[0]} != key "
                             f"batch {key.shape[0]}")
        if key_padding_mask is not None:
            N, Lk = key.shape[0], key.shape[1]
            if tuple(key_padding_mask.shape) != (N, Lk) or key_padding_mask.dtype != bool:
                raise ValueError(f"MultiheadAttention: key_padding_mask must be a bool array "
                                 f"of shape {(N, Lk)}, got {key_padding_mask.dtype} "
                                 f"{tuple(key_padding_mask.shape)}")

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = False):
        """Attend from ``query`` to ``key``/``value`` (all batch first). See module docstring.

        Returns:
            (output (N, Lq, C), head-averaged attention weights (N, Lq, Lk) or None).
            The weights are the probabilities after attention dropout, as in PyTorch.
        """
        query, key, value = (t if isinstance(t, Tensor) else Tensor(t)
                             for t in (query, key, value))
        mask = key_padding_mask.data if isinstance(key_padding_mask, Tensor) else key_padding_mask
        self._check_inputs(query, key, value, mask)
        N, Lq, C = query.shape
        Lk = key.shape[1]
        M, D = self.num_heads, self.head_dim

        # Input projections: row blocks of in_proj_weight (3C, C) -> three (C, C) matrices.
        W, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, W[0:C], b[0:C]) * self.scaling          # (N, Lq, C)
        k = F.linear(key, W[C:2 * C], b[C:2 * C])                   # (N, Lk, C)
        v = F.linear(value, W[2 * C:3 * C], b[2 * C:3 * C])         # (N, Lk, C)

        # Split channels into heads: channel m*D + d belongs to head m.
        q = q.reshape(N, Lq, M, D).transpose(1, 2)                  # (N, M, Lq, D)
        k = k.reshape(N, Lk, M, D).transpose(1, 2)                  # (N, M, Lk, D)
        v = v.reshape(N, Lk, M, D).transpose(1, 2)                  # (N, M, Lk, D)

        scores = q @ k.transpose(2, 3)                              # (N, M, Lq, Lk)
        if mask is not None:
            get_array_module(mask, scores.data)      # a clear error if on another device
            ignore = mask[:, None, None, :]                         # (N, 1, 1, Lk)
            scores = F.where(ignore, -np.inf, scores)
        attn = F.softmax(scores, axis=-1)                           # (N, M, Lq, Lk)
        attn = self.attn_dropout(attn)

        out = attn @ v                                              # (N, M, Lq, D)
        out = out.transpose(1, 2).reshape(N, Lq, C)                 # (N, Lq, M*D)
        out = self.out_proj(out)                                    # (N, Lq, C)
        weights = attn.mean(axis=1) if need_weights else None       # (N, Lq, Lk)
        return out, weights

    def extra_repr(self):
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"dropout={self.attn_dropout.p}, batch_first=True")
