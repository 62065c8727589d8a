"""DenseAttention: standard multi-head attention (Eq. 1) behind MSDeformAttn's interface.

The convergence experiment of the paper (its Table 1, notebook 15) swaps the deformable
attention of the encoder and of the decoder's cross-attention for the attention of the
Transformer and of DETR, Eq. (1):

    MultiHeadAttn(z_q, x) = sum_m W_m [ sum_{k in Omega_k} A_mqk * W'_m x_k ],
    A_mqk ∝ exp( z_q^T U_m^T V_m x_k / sqrt(C_v) ),   sum_k A_mqk = 1,

where every query q attends to *every* key k of the N_k = S tokens (all levels when there
are several). :class:`DenseAttention` is :class:`~minidetr.nn.MultiheadAttention` (so its
parameters are the familiar ``in_proj_weight`` (3C, C), ``in_proj_bias`` (3C,) and
``out_proj``) with a ``forward`` that takes MSDeformAttn's arguments, so an encoder or
decoder layer can hold either one: the reference points and the level layout are
accepted and ignored (dense attention needs neither), and ``key_pos``, the keys'
position embedding, is added to the keys as in DETR (key = x + pos, value = x).

Choose it with ``ModelConfig.attention = "dense"`` (default ``"deformable"``), usually
with ``num_feature_levels=1``: a single-scale map, as DETR (Eq. 1 costs O(N_q N_k C), so
on the paper's multi-scale maps it is out of reach; at the ``tiny`` preset's sizes it
is not, and ``num_feature_levels=3`` then attends to the tokens of all three levels).
Everything else (queries, reference points, box heads, losses) stays that of Deformable
DETR, so the experiment changes one thing: the attention. See docs/deformable-attention.md
§ "Standard attention and convergence".

Shapes:
    query (N, Lq, C), input_flatten (N, S, C), key_pos (N, S, C) or None,
    input_padding_mask (N, S) bool or None -> (N, Lq, C)
"""
from __future__ import annotations

from .. import nn
from ..autograd import Tensor

__all__ = ["DenseAttention", "ATTENTIONS"]

ATTENTIONS = ("deformable", "dense")    # the values of ModelConfig.attention


class DenseAttention(nn.MultiheadAttention):
    """Eq. (1): every query attends to every token; MSDeformAttn's call signature.

    Args:
        d_model: C. n_heads: M (C divisible by M). dropout: on the attention weights.
        rng: NumPy Generator for the initial weights (xavier-uniform ``in_proj_weight``).
    """

    def __init__(self, d_model=256, n_heads=8, dropout=0.0, rng=None):
        super().__init__(d_model, n_heads, dropout=dropout, rng=rng)

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None, key_pos=None):
        """Attend from every query to every one of the S tokens of ``input_flatten``.

        ``reference_points``, ``input_spatial_shapes`` and ``input_level_start_index`` are
        ignored (they are there so that a layer can call either attention the same way).

        Shapes: query (N, Lq, C), input_flatten (N, S, C), key_pos (N, S, C) or None,
        input_padding_mask (N, S) bool or None -> (N, Lq, C).
        """
        value = input_flatten if isinstance(input_flatten, Tensor) else Tensor(input_flatten)
        if key_pos is not None and tuple(key_pos.shape) != tuple(value.shape):
            raise ValueError(f"DenseAttention: key_pos must have input_flatten's shape "
                             f"{tuple(value.shape)}, got {tuple(key_pos.shape)}")
        key = value if key_pos is None else value + key_pos                  # (N, S, C)
        mask = input_padding_mask
        mask = mask.data if isinstance(mask, Tensor) else mask
        out, _ = self.attend(query, key, value, key_padding_mask=mask)       # (N, Lq, C)
        return out

    def attend(self, query, key, value, key_padding_mask=None, need_weights=False):
        """Plain :meth:`MultiheadAttention.forward`: ``(out (N, Lq, C), weights (N, Lq, S)
        averaged over heads or None)``; use it to look at the attention weights."""
        return super().forward(query, key, value, key_padding_mask=key_padding_mask,
                               need_weights=need_weights)
