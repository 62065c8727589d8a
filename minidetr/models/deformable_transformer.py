"""The deformable transformer: encoder, decoder, and the two-stage proposal generator.

The path of one batch through :class:`DeformableTransformer` (see docs/model.md):

1. **Flatten** the L projected feature maps into one sequence of S = sum_l H_l W_l tokens
   (level after level, row-major inside a level), with their padding masks and position
   embeddings plus a learned per-level embedding ``level_embed[l]``.
2. **Valid ratios** (:func:`get_valid_ratio`): the fraction of each level that is not
   padding, so a normalised point can be moved between levels of different padding.
3. **Encoder** (:class:`DeformableTransformerEncoder`): every token is a query that
   attends, with multi-scale deformable attention, to K points per level around its own
   position (:func:`get_reference_points`).
4. **Queries**: single-stage, a learned ``query_embed`` (Nq, 2C) split into a positional
   part and a content part, and reference points sigmoid(Linear(query_pos)); two-stage,
   the top-scoring encoder proposals (:func:`gen_encoder_output_proposals`,
   :func:`get_proposal_pos_embed`).
5. **Decoder** (:class:`DeformableTransformerDecoder`): per layer, self-attention among
   the queries, deformable cross-attention into the encoder memory around each query's
   reference point (or box), and a feed-forward block. With box refinement, each layer
   moves the reference boxes (:func:`box_from_reference`) and detaches them.

Everything is batch first: tokens (N, S, C), queries (N, Nq, C). Symbols as in
docs/notation.md: N batch, S tokens, C = d_model, M heads, L levels, K points, Nq queries.

The module tree and its names follow the official ``deformable_transformer.py``, so the
state-dict keys are those of the released checkpoints (``transformer.level_embed``,
``transformer.encoder.layers.0.self_attn.sampling_offsets.weight``, ...).
"""
from __future__ import annotations

import copy
import math
from typing import NamedTuple

import numpy as np

from .. import functional as F
from .. import nn
from ..autograd import Tensor, no_grad
from ..backend import get_array_module
from ..nn.msdeform_attn import MSDeformAttn
from ..nn._checks import generator
from .box_ops import inverse_sigmoid
from .dense_attention import ATTENTIONS, DenseAttention

__all__ = ["DeformableTransformer", "DeformableTransformerEncoderLayer",
           "DeformableTransformerEncoder", "DeformableTransformerDecoderLayer",
           "DeformableTransformerDecoder", "TransformerOutput", "get_valid_ratio",
           "get_reference_points", "encoder_output_proposals", "get_proposal_pos_embed",
           "box_from_reference"]

# Two-stage proposals: the size of a level-l proposal box is BASE * 2**l (normalised), and
# a proposal is kept only if its four coordinates lie strictly inside this interval.
PROPOSAL_BASE_SIZE = 0.05
PROPOSAL_VALID_RANGE = (0.01, 0.99)


# =========================================================================== geometry helpers
def get_valid_ratio(mask, dtype=np.float32):
    """The unpadded fraction of one level, per image, in (w, h) order.

    Padding is at the bottom and right, so the valid height is the number of non-padding
    entries of column 0 and the valid width that of row 0.

    Shapes:
        mask (N, H, W) bool, True on padding -> (N, 2) of ``dtype``: (valid_W / W, valid_H / H)
    """
    xp = get_array_module(mask)
    dtype = np.dtype(dtype)
    _, H, W = mask.shape
    valid_H = (~mask[:, :, 0]).sum(axis=1)                     # (N,)
    valid_W = (~mask[:, 0, :]).sum(axis=1)                     # (N,)
    ratio_h = valid_H.astype(dtype) / dtype.type(H)
    ratio_w = valid_W.astype(dtype) / dtype.type(W)
    return xp.stack([ratio_w, ratio_h], axis=-1)               # (N, 2)


def get_reference_points(spatial_shapes, valid_ratios):
    """The encoder's reference points: every token's own position, seen from every level.

    Token (i, j) of level l (an H_l x W_l map whose image occupies the fraction
    (r_w, r_h) = valid_ratios[n, l]) sits at the pixel centre

        x = (j + 0.5) / (r_w W_l),    y = (i + 0.5) / (r_h H_l)

    i.e. normalised to the *valid* part of the image (so the same image point has the
    same (x, y) on every level). Multiplying by valid_ratios[n, l'] expresses it in the
    padded normalised coordinates of level l', which is what the sampling op uses.

    Args:
        spatial_shapes: (L, 2) integer rows (H_l, W_l), a host array or list.
        valid_ratios: (N, L, 2) array, (w, h) order (:func:`get_valid_ratio`).

    Returns:
        array (N, S, L, 2), (x, y), of valid_ratios' dtype and array module (no gradient).
    """
    xp = get_array_module(valid_ratios)
    dtype = valid_ratios.dtype
    points = []
    for lvl, (H, W) in enumerate(np.asarray(spatial_shapes).tolist()):
        ref_y, ref_x = xp.meshgrid(xp.arange(H, dtype=dtype) + dtype.type(0.5),
                                   xp.arange(W, dtype=dtype) + dtype.type(0.5),
                                   indexing="ij")                          # (H, W) each
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * dtype.type(H))
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * dtype.type(W))
        points.append(xp.stack([ref_x, ref_y], axis=-1))                   # (N, H*W, 2)
    reference = xp.concatenate(points, axis=1)                             # (N, S, 2)
    return reference[:, :, None] * valid_ratios[:, None]                   # (N, S, L, 2)


def box_from_reference(delta, reference):
    """sigmoid(delta + inverse_sigmoid(reference)): a box predicted relative to a reference.

    The prediction heads (and box refinement) never output a box directly: they output
    ``delta``, a correction in logit space, to a reference point or box. With a 2-d
    reference (cx, cy) only the centre logits are offset; the size logits are ``delta``'s
    own. With a 4-d reference box all four are offset.

    Shapes:
        delta (..., 4), reference (..., 2) or (..., 4) -> box (..., 4) cxcywh in (0, 1)
    """
    offset = inverse_sigmoid(reference)
    if reference.shape[-1] == 4:
        logits = delta + offset
    elif reference.shape[-1] == 2:
        logits = F.concat([delta[..., :2] + offset, delta[..., 2:]], axis=-1)
    else:
        raise ValueError(f"box_from_reference: reference must end in 2 (cx, cy) or 4 "
                         f"(cx, cy, w, h), got shape {tuple(reference.shape)}")
    return F.sigmoid(logits)


def _argsort_descending(scores):
    """Indices sorting each row of ``scores`` (N, S) from high to low; ties keep the
    lower index first (a stable sort, as CuPy's always is)."""
    xp = get_array_module(scores)
    if xp is np:
        return np.argsort(-scores, axis=1, kind="stable")
    return xp.argsort(-scores, axis=1)


def _attention(kind, d_model, n_levels, n_heads, n_points, dropout, rng, msda_backend):
    """The attention of an encoder layer or of the decoder's cross-attention: deformable
    (:class:`MSDeformAttn`, Eq. 2-3, the default) or dense (:class:`DenseAttention`,
    Eq. 1, for the convergence experiment). Both are called the same way."""
    if kind == "deformable":
        return MSDeformAttn(d_model, n_levels, n_heads, n_points, rng=rng, backend=msda_backend)
    if kind == "dense":
        return DenseAttention(d_model, n_heads, dropout=dropout, rng=rng)
    raise ValueError(f"attention must be one of {ATTENTIONS}, got {kind!r}")


def _clones(module, n):
    """``n`` independent deep copies of ``module`` (the official ``_get_clones``)."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(n))


# =========================================================================== encoder
class DeformableTransformerEncoderLayer(nn.Module):
    """One encoder layer, post-norm, as in the official code::

        x = norm1(x + dropout1(MSDeformAttn(query = x + pos, reference, value = x)))
        x = norm2(x + dropout3(linear2(dropout2(relu(linear1(x))))))

    With ``attention="dense"`` the self-attention is :class:`DenseAttention` (Eq. 1, as
    in DETR: query = key = x + pos, value = x, over all S tokens).

    Shapes:
        src, pos (N, S, C); reference_points (N, S, L, 2); padding_mask (N, S) bool
        -> (N, S, C)
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, rng=None, msda_backend=None, attention="deformable"):
        super().__init__()
        rng = generator(rng, "DeformableTransformerEncoderLayer")
        # self attention (registration order = the official key order)
        self.self_attn = _attention(attention, d_model, n_levels, n_heads, n_points, dropout,
                                    rng, msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # feed-forward block
        self.linear1 = nn.Linear(d_model, d_ffn, rng=rng)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model, rng=rng)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index,
                padding_mask=None):
        extra = {"key_pos": pos} if isinstance(self.self_attn, DenseAttention) else {}
        attn = self.self_attn(src + pos, reference_points, src, spatial_shapes,
                              level_start_index, padding_mask, **extra)    # (N, S, C)
        src = self.norm1(src + self.dropout1(attn))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))       # (N, S, C)
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    """``num_layers`` clones of an encoder layer; the reference points are computed once.

    No final normalisation (each layer already ends with a LayerNorm).

    Shapes:
        src, pos (N, S, C); valid_ratios (N, L, 2); padding_mask (N, S) bool -> (N, S, C)
    """

    def __init__(self, encoder_layer, num_layers):
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers

    get_reference_points = staticmethod(get_reference_points)

    def forward(self, src, spatial_shapes, level_start_index, valid_ratios, pos=None,
                padding_mask=None):
        reference_points = Tensor(get_reference_points(spatial_shapes, valid_ratios))
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index,
                           padding_mask)
        return output


# =========================================================================== decoder
class DeformableTransformerDecoderLayer(nn.Module):
    """One decoder layer, post-norm: self-attention, deformable cross-attention, FFN::

        q = k = tgt + query_pos
        tgt = norm2(tgt + dropout2(MultiheadAttention(q, k, value = tgt)))
        tgt = norm1(tgt + dropout1(MSDeformAttn(tgt + query_pos, reference, memory)))
        tgt = norm3(tgt + dropout4(linear2(dropout3(relu(linear1(tgt))))))

    (The official names: ``norm2`` belongs to the self-attention that runs first, ``norm1``
    to the cross-attention.) With ``attention="dense"`` the cross-attention is
    :class:`DenseAttention` (Eq. 1, as in DETR: key = memory + src_pos, value = memory).

    Shapes:
        tgt, query_pos (N, Nq, C); reference_points (N, Nq, L, 2 or 4); src (N, S, C);
        src_padding_mask (N, S) bool; src_pos (N, S, C) or None -> (N, Nq, C)
    """

    def __init__(self, d_model=256, d_ffn=1024, dropout=0.1, n_levels=4, n_heads=8,
                 n_points=4, rng=None, msda_backend=None, attention="deformable"):
        super().__init__()
        rng = generator(rng, "DeformableTransformerDecoderLayer")
        # cross attention
        self.cross_attn = _attention(attention, d_model, n_levels, n_heads, n_points, dropout,
                                     rng, msda_backend)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        # self attention
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, rng=rng)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        # feed-forward block
        self.linear1 = nn.Linear(d_model, d_ffn, rng=rng)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model, rng=rng)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, src_spatial_shapes,
                level_start_index, src_padding_mask=None, src_pos=None):
        # 1. self-attention among the queries (no mask: every query sees every query)
        q = k = tgt + query_pos
        attn, _ = self.self_attn(q, k, tgt)                                 # (N, Nq, C)
        tgt = self.norm2(tgt + self.dropout2(attn))
        # 2. deformable cross-attention into the encoder memory
        extra = {"key_pos": src_pos} if isinstance(self.cross_attn, DenseAttention) else {}
        attn = self.cross_attn(tgt + query_pos, reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask, **extra)  # (N, Nq, C)
        tgt = self.norm1(tgt + self.dropout1(attn))
        # 3. feed-forward block
        ffn = self.linear2(self.dropout3(F.relu(self.linear1(tgt))))        # (N, Nq, C)
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    """``num_layers`` clones of a decoder layer; returns every layer's output.

    Box refinement: the detector sets ``bbox_embed`` to its list of box heads (the
    official "hack"; the keys then also appear as ``transformer.decoder.bbox_embed.*``).
    After layer i the reference becomes

        new_ref = sigmoid(bbox_embed[i](h_i) + inverse_sigmoid(ref))    (2-d ref: xy only)

    and is **detached** before layer i + 1 uses it: gradients never flow through the
    references (each layer's head learns only from its own loss). With a 2-d reference
    the first refinement makes it a 4-d box. Two-stage: ``class_embed`` is set too; the
    decoder does not call it, the transformer uses its last entry for the proposals.

    Shapes:
        tgt, query_pos (N, Nq, C); reference_points (N, Nq, 2 or 4); src (N, S, C);
        src_valid_ratios (N, L, 2); src_padding_mask (N, S) bool; src_pos (N, S, C), the
        memory's position embedding (used by dense cross-attention only)
        -> hs (num_layers, N, Nq, C), references (num_layers, N, Nq, 2 or 4), the
           reference *after* each layer (all equal to the input without refinement)
    """

    def __init__(self, decoder_layer, num_layers):
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        # set by DeformableDETR for refinement / two-stage (plain attributes until then)
        self.bbox_embed = None
        self.class_embed = None

    def forward(self, tgt, reference_points, src, src_spatial_shapes, src_level_start_index,
                src_valid_ratios, query_pos=None, src_padding_mask=None, src_pos=None):
        if reference_points.shape[-1] not in (2, 4):
            raise ValueError(f"decoder: reference_points must end in 2 or 4, got shape "
                             f"{tuple(reference_points.shape)}")
        xp = get_array_module(src_valid_ratios)
        output = tgt
        intermediate, intermediate_references = [], []
        for lid, layer in enumerate(self.layers):
            # the reference in each level's padded normalised coordinates
            if reference_points.shape[-1] == 4:                              # (w, h) too
                ratios = xp.concatenate([src_valid_ratios, src_valid_ratios],
                                        axis=-1)[:, None]                   # (N, 1, L, 4)
            else:
                ratios = src_valid_ratios[:, None]                          # (N, 1, L, 2)
            reference_input = reference_points[:, :, None] * ratios         # (N, Nq, L, 2|4)
            output = layer(output, query_pos, reference_input, src, src_spatial_shapes,
                           src_level_start_index, src_padding_mask, src_pos)  # (N, Nq, C)
            if self.bbox_embed is not None:
                # Iterative refinement. Computed without recording a graph, which is the
                # same as computing it and then detaching: the next layer's reference is
                # a constant. (The detector recomputes this box, with gradient, for the
                # loss of layer lid.)
                with no_grad():
                    new_reference = box_from_reference(self.bbox_embed[lid](output),
                                                       reference_points)
                reference_points = new_reference.detach()                    # (N, Nq, 4)
            intermediate.append(output)
            intermediate_references.append(reference_points)
        hs = F.stack(intermediate, axis=0)                                  # (layers, N, Nq, C)
        references = F.stack(intermediate_references, axis=0)              # (layers, N, Nq, 2|4)
        return hs, references


# =========================================================================== two-stage helpers
def encoder_output_proposals(padding_mask, spatial_shapes, dtype=np.float32):
    """One proposal box per encoder token (two-stage), in logit space, and its validity.

    Token (i, j) of level l, in an image whose valid part of that level is vH x vW
    tokens, proposes the box

        cx = (j + 0.5) / vW,  cy = (i + 0.5) / vH,  w = h = 0.05 * 2**l

    (so 0.05, 0.1, 0.2, 0.4 of the image for the four levels). A proposal is *valid* if
    all four coordinates lie in (0.01, 0.99); padded tokens are never valid (their
    centres lie beyond 1). Valid proposals are returned as logits log(p / (1 - p)),
    the others as +inf (sigmoid(+inf) = 1: they can still be selected, as in the
    official code, but their boxes are the whole image corner).

    Args:
        padding_mask: (N, S) bool, True on padding.
        spatial_shapes: (L, 2) integer rows (H_l, W_l).
        dtype: float dtype of the result.

    Returns:
        (proposals (N, S, 4) cxcywh logits with +inf where invalid, valid (N, S) bool)
    """
    xp = get_array_module(padding_mask)
    dtype = np.dtype(dtype)
    N, S = padding_mask.shape
    proposals, start = [], 0
    for lvl, (H, W) in enumerate(np.asarray(spatial_shapes).tolist()):
        mask = padding_mask[:, start:start + H * W].reshape(N, H, W)        # (N, H, W)
        valid_H = (~mask[:, :, 0]).sum(axis=1).astype(dtype)                # (N,)
        valid_W = (~mask[:, 0, :]).sum(axis=1).astype(dtype)                # (N,)
        grid_y, grid_x = xp.meshgrid(xp.arange(H, dtype=dtype), xp.arange(W, dtype=dtype),
                                     indexing="ij")                          # (H, W) each
        grid = xp.stack([grid_x, grid_y], axis=-1)                           # (H, W, 2)
        scale = xp.stack([valid_W, valid_H], axis=-1).reshape(N, 1, 1, 2)    # (N, 1, 1, 2)
        centre = (grid[None] + dtype.type(0.5)) / scale                      # (N, H, W, 2)
        size = xp.full_like(centre, PROPOSAL_BASE_SIZE * 2.0 ** lvl)         # (N, H, W, 2)
        proposals.append(xp.concatenate([centre, size], axis=-1).reshape(N, H * W, 4))
        start += H * W
    if start != S:
        raise ValueError(f"encoder_output_proposals: spatial_shapes cover {start} tokens, "
                         f"padding_mask has S = {S}")
    boxes = xp.concatenate(proposals, axis=1)                                # (N, S, 4)
    lo, hi = PROPOSAL_VALID_RANGE
    valid = ((boxes > lo) & (boxes < hi)).all(axis=-1) & ~padding_mask       # (N, S)
    safe = xp.where(valid[..., None], boxes, dtype.type(0.5))   # no log of x <= 0 below
    logits = xp.log(safe / (1 - safe))
    logits = xp.where(valid[..., None], logits, dtype.type(np.inf))         # (N, S, 4)
    return logits, valid


def get_proposal_pos_embed(proposals, num_pos_feats=128, temperature=10000,
                           scale=2 * math.pi):
    """Sine embedding of proposal boxes given as logits (two-stage queries).

    Each of the four coordinates p = sigmoid(logit) * scale is encoded like the image
    position embedding: with dim_t[k] = T ** (2 floor(k / 2) / F), channel 2k is
    sin(p / dim_t[2k]) and channel 2k + 1 is cos(p / dim_t[2k + 1]); the four blocks of
    F channels are concatenated in (cx, cy, w, h) order.

    Args:
        proposals: array (N, Nq, 4) of box logits (no gradient: they are detached).
        num_pos_feats: F (official 128, i.e. d_model / 2, so the result has 2 d_model).

    Returns:
        array (N, Nq, 4 F) of the proposals' dtype.
    """
    xp = get_array_module(proposals)
    dtype = proposals.dtype
    k = np.arange(num_pos_feats, dtype=np.float64)
    # frequencies rounded once from float64, as position_encoding.py does
    dim_t = xp.asarray((temperature ** (2 * (k // 2) / num_pos_feats)).astype(dtype))  # (F,)
    with no_grad():
        p = F.sigmoid(Tensor(proposals)).data * dtype.type(scale)           # (N, Nq, 4)
    arg = p[..., None] / dim_t                                               # (N, Nq, 4, F)
    pos = xp.empty_like(arg)
    pos[..., 0::2] = xp.sin(arg[..., 0::2])
    pos[..., 1::2] = xp.cos(arg[..., 1::2])
    N, Nq = proposals.shape[:2]
    return pos.reshape(N, Nq, 4 * num_pos_feats)                             # (N, Nq, 4F)


# =========================================================================== the transformer
class TransformerOutput(NamedTuple):
    """What :meth:`DeformableTransformer.forward` returns (a tuple, unpack it freely).

    hs:               (layers, N, Nq, C) decoder output of every layer
    init_reference:   (N, Nq, 2) single-stage / (N, Nq, 4) two-stage, in (0, 1)
    inter_references: (layers, N, Nq, 2 or 4) the reference after each layer
    enc_outputs_class:       (N, S, num_classes) two-stage proposal logits, else None
    enc_outputs_coord_unact: (N, S, 4) two-stage proposal box logits, else None
    """

    hs: Tensor
    init_reference: Tensor
    inter_references: Tensor
    enc_outputs_class: Tensor | None
    enc_outputs_coord_unact: Tensor | None


class DeformableTransformer(nn.Module):
    """Encoder + decoder of Deformable DETR, with single-stage or two-stage queries.

    Args:
        d_model: C. nhead: M. num_encoder_layers, num_decoder_layers: 6 and 6 officially.
        dim_feedforward: FFN width. dropout: in every layer (and the decoder's MHA).
        num_feature_levels: L. enc_n_points, dec_n_points: K of the encoder / decoder.
        two_stage: queries from the encoder's top-scoring proposals (needs the detector
            to set ``decoder.class_embed`` and ``decoder.bbox_embed``).
        two_stage_num_proposals: how many proposals become queries (= num_queries).
        rng: NumPy Generator for every initialiser (and the dropout streams' seed).
        msda_backend: the multi-scale deformable attention kernel (None: automatic).
        attention: ``"deformable"`` (the paper's model) or ``"dense"`` (Eq. 1 in the
            encoder and the decoder's cross-attention, for the convergence experiment;
            see :mod:`minidetr.models.dense_attention`).

    Initialisation (as the official ``_reset_parameters``): xavier-uniform on every
    parameter with >= 2 dimensions, then each MSDeformAttn's own init, then
    ``reference_points`` xavier-uniform with bias 0, then ``level_embed`` ~ N(0, 1).
    The biases of the FFNs, ``enc_output`` and ``pos_trans`` keep the Linear default, and
    since the layers are deep copies of one layer (``_clones``), they start equal in
    every layer, as in the official code.

    Shapes: see :meth:`forward`.
    """

    def __init__(self, d_model=256, nhead=8, num_encoder_layers=6, num_decoder_layers=6,
                 dim_feedforward=1024, dropout=0.1, num_feature_levels=4, enc_n_points=4,
                 dec_n_points=4, two_stage=False, two_stage_num_proposals=300, rng=None,
                 msda_backend=None, attention="deformable"):
        super().__init__()
        rng = generator(rng, "DeformableTransformer")
        if d_model % nhead:
            raise ValueError(f"DeformableTransformer: d_model ({d_model}) must be divisible "
                             f"by nhead ({nhead})")
        self.d_model, self.nhead = d_model, nhead
        self.num_feature_levels = num_feature_levels
        if attention not in ATTENTIONS:
            raise ValueError(f"DeformableTransformer: attention must be one of {ATTENTIONS}, "
                             f"got {attention!r}")
        self.attention = attention
        self.two_stage = bool(two_stage)
        self.two_stage_num_proposals = two_stage_num_proposals

        # level_embed first: parameters precede children in the state dict
        self.level_embed = nn.Parameter(np.zeros((num_feature_levels, d_model), np.float32))
        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points,
            rng=rng, msda_backend=msda_backend, attention=attention)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points,
            rng=rng, msda_backend=msda_backend, attention=attention)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        if self.two_stage:
            self.enc_output = nn.Linear(d_model, d_model, rng=rng)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(2 * d_model, 2 * d_model, rng=rng)
            self.pos_trans_norm = nn.LayerNorm(2 * d_model)
        else:
            self.reference_points = nn.Linear(d_model, 2, rng=rng)
        self._reset_parameters(rng)
        self.seed_dropout(int(rng.integers(2**63)))   # the clones' dropouts share a state

    def _reset_parameters(self, rng):
        for p in self.parameters():
            if p.ndim > 1:
                nn.init.xavier_uniform_(p, rng=rng)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters(rng=rng)
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0, rng=rng)
            nn.init.zeros_(self.reference_points.bias)
        nn.init.normal_(self.level_embed, 0.0, 1.0, rng=rng)

    # ------------------------------------------------------------------ helpers
    get_valid_ratio = staticmethod(get_valid_ratio)
    get_proposal_pos_embed = staticmethod(get_proposal_pos_embed)

    def gen_encoder_output_proposals(self, memory, memory_padding_mask, spatial_shapes):
        """Proposal logits (:func:`encoder_output_proposals`) and the memory they are
        scored from: zeroed at padded or invalid tokens, then ``enc_output`` and
        ``enc_output_norm``.

        Shapes:
            memory (N, S, C), memory_padding_mask (N, S) bool
            -> output_memory (N, S, C), output_proposals (N, S, 4) array (+inf = invalid)
        """
        proposals, valid = encoder_output_proposals(memory_padding_mask, spatial_shapes,
                                                    memory.dtype)
        output_memory = F.where(valid[..., None], memory, 0.0)              # (N, S, C)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, proposals

    # ------------------------------------------------------------------ forward
    def flatten_levels(self, srcs, masks, pos_embeds):
        """Concatenate the L levels into one token sequence.

        Returns:
            src_flatten (N, S, C), mask_flatten (N, S) bool, lvl_pos_embed_flatten
            (N, S, C) (position embedding + level_embed[l]), spatial_shapes (L, 2) int64
            host array, level_start_index (L,) int64 host array, valid_ratios (N, L, 2).
        """
        L = self.num_feature_levels
        if not (len(srcs) == len(masks) == len(pos_embeds) == L):
            raise ValueError(f"DeformableTransformer: expected {L} levels of srcs, masks and "
                             f"pos_embeds, got {len(srcs)}, {len(masks)}, {len(pos_embeds)}")
        src_list, mask_list, pos_list, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            mask = mask.data if isinstance(mask, Tensor) else mask
            N, C, H, W = src.shape
            if C != self.d_model or tuple(mask.shape) != (N, H, W) or \
                    tuple(pos.shape) != (N, C, H, W):
                raise ValueError(f"DeformableTransformer: level {lvl} has src "
                                 f"{tuple(src.shape)}, mask {tuple(mask.shape)}, pos "
                                 f"{tuple(pos.shape)}; expected (N, {self.d_model}, H, W), "
                                 f"(N, H, W), (N, {self.d_model}, H, W)")
            shapes.append((H, W))
            src_list.append(src.flatten(2).transpose(1, 2))                  # (N, H*W, C)
            mask_list.append(mask.reshape(N, H * W))                         # (N, H*W)
            pos = pos.flatten(2).transpose(1, 2)                             # (N, H*W, C)
            pos_list.append(pos + self.level_embed[lvl].reshape(1, 1, C))    # (N, H*W, C)
        xp = get_array_module(mask_list[0])
        spatial_shapes = np.asarray(shapes, dtype=np.int64)                  # (L, 2)
        sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        dtype = srcs[0].dtype
        valid_ratios = xp.stack([get_valid_ratio(m.data if isinstance(m, Tensor) else m,
                                                 dtype) for m in masks], axis=1)  # (N, L, 2)
        return (F.concat(src_list, axis=1), xp.concatenate(mask_list, axis=1),
                F.concat(pos_list, axis=1), spatial_shapes, level_start_index, valid_ratios)

    def forward(self, srcs, masks, pos_embeds, query_embed=None) -> TransformerOutput:
        """Encode the multi-scale features and decode the object queries.

        Args:
            srcs: L Tensors (N, C, H_l, W_l), the projected feature maps.
            masks: L bool arrays (N, H_l, W_l), True on padding.
            pos_embeds: L Tensors (N, C, H_l, W_l), the sine position embeddings.
            query_embed: single-stage, the (Nq, 2C) query embedding (first C channels:
                query_pos, last C: the content tgt); None for two-stage.

        Returns:
            :class:`TransformerOutput`.
        """
        if not self.two_stage and query_embed is None:
            raise ValueError("DeformableTransformer: single-stage needs query_embed (Nq, 2C)")
        (src_flatten, mask_flatten, lvl_pos_embed_flatten, spatial_shapes, level_start_index,
         valid_ratios) = self.flatten_levels(srcs, masks, pos_embeds)

        # encoder
        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios,
                              lvl_pos_embed_flatten, mask_flatten)           # (N, S, C)
        N, S, C = memory.shape
        xp = get_array_module(mask_flatten)

        # queries and their initial reference points
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            if self.decoder.class_embed is None or self.decoder.bbox_embed is None:
                raise RuntimeError("DeformableTransformer: two-stage needs the detector's "
                                   "heads in decoder.class_embed and decoder.bbox_embed")
            k = self.two_stage_num_proposals
            if k > S:
                raise ValueError(f"DeformableTransformer: two-stage selects {k} proposals "
                                 f"but the feature maps have only S = {S} tokens")
            output_memory, output_proposals = self.gen_encoder_output_proposals(
                memory, mask_flatten, spatial_shapes)
            head = self.decoder.num_layers                   # the extra, encoder head
            enc_outputs_class = self.decoder.class_embed[head](output_memory)  # (N, S, cls)
            enc_outputs_coord_unact = (self.decoder.bbox_embed[head](output_memory)
                                       + output_proposals)                     # (N, S, 4)
            # top-k tokens by the first class logit (the "object" score), then detach:
            # the queries are built from constants, no gradient reaches the proposal head
            scores = enc_outputs_class.data[..., 0]                           # (N, S)
            topk = _argsort_descending(scores)[:, :k]                          # (N, k)
            topk_coords_unact = xp.take_along_axis(enc_outputs_coord_unact.data,
                                                   topk[..., None], axis=1)   # (N, k, 4)
            reference_points = F.sigmoid(Tensor(topk_coords_unact))           # (N, k, 4)
            pos_embed = Tensor(get_proposal_pos_embed(topk_coords_unact, C // 2))  # (N, k, 2C)
            pos_trans_out = self.pos_trans_norm(self.pos_trans(pos_embed))    # (N, k, 2C)
            query_pos, tgt = F.split(pos_trans_out, [C, C], axis=2)           # (N, k, C) x 2
        else:
            Nq = query_embed.shape[0]
            query_pos, tgt = F.split(query_embed, [C, C], axis=1)             # (Nq, C) x 2
            query_pos = F.expand(query_pos[None], (N, Nq, C))                 # (N, Nq, C)
            tgt = F.expand(tgt[None], (N, Nq, C))                             # (N, Nq, C)
            reference_points = F.sigmoid(self.reference_points(query_pos))    # (N, Nq, 2)
        init_reference = reference_points

        # decoder
        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes,
                                            level_start_index, valid_ratios, query_pos,
                                            mask_flatten, lvl_pos_embed_flatten)
        return TransformerOutput(hs, init_reference, inter_references, enc_outputs_class,
                                 enc_outputs_coord_unact)
