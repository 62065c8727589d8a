"""MSDeformAttn: the multi-scale deformable attention layer of Deformable DETR.

For each query q (content feature z_q, reference point p_q) and head m, the layer
predicts, from z_q alone, K sampling offsets per level and L*K attention weights, and
returns (Eq. 3 of the paper)

    MSDeformAttn(z_q, p_q, {x_l}) = sum_m W_m [ sum_l sum_k A_mlqk * W'_m x_l(phi_l(p_q) + dp_mlqk) ]

with

* ``value_proj``  = W' (all heads at once; padded tokens then set to zero),
* ``sampling_offsets`` -> dp (M*L*K*2 numbers per query), in pixels of level l,
* ``attention_weights`` -> A (M*L*K numbers per query), softmax over the L*K points of
  each head jointly,
* the op :func:`minidetr.ops.msda.ms_deform_attn` for the bilinear sampling and the
  weighted sum,
* ``output_proj`` = W (the heads' outputs concatenated, then projected).

Parameter names and shapes are those of the official state dict (for C = 256, M = 8,
L = K = 4): ``sampling_offsets.weight`` (256, 256), ``attention_weights.weight`` (128, 256),
``value_proj.weight`` (256, 256), ``output_proj.weight`` (256, 256), each with its bias.

Shapes:
    query               (N, Lq, C)       content + positional embedding
    reference_points    (N, Lq, L, 2)    normalised (x, y) per level, or
                        (N, Lq, L, 4)    boxes (cx, cy, w, h)
    input_flatten       (N, S, C)        the value input (features without position)
    input_spatial_shapes (L, 2)          rows (H_l, W_l)
    input_level_start_index (L,)
    input_padding_mask  (N, S) bool      True = padding, or None
    output              (N, Lq, C)
"""
from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..backend import device_of, to_device, to_numpy
from ..ops.msda import ms_deform_attn
from . import _checks, init
from .linear import Linear
from .module import Module


class MSDeformAttn(Module):
    """Multi-scale deformable attention with the official layout and initialisation.

    Args:
        d_model: C, the feature width (divisible by n_heads).
        n_levels: L, feature levels sampled by every query.
        n_heads: M, attention heads; each head has D = C / M channels.
        n_points: K, sampling points per head and level.
        rng: NumPy Generator for the initial weights.
        backend: the op's backend name (``None``: the fastest for the arrays' device).
    """

    def __init__(self, d_model=256, n_levels=4, n_heads=8, n_points=4, rng=None, backend=None):
        super().__init__()
        name = "MSDeformAttn"
        self.d_model = _checks.positive_int(d_model, "d_model", name)
        self.n_levels = _checks.positive_int(n_levels, "n_levels", name)
        self.n_heads = _checks.positive_int(n_heads, "n_heads", name)
        self.n_points = _checks.positive_int(n_points, "n_points", name)
        if d_model % n_heads:
            raise ValueError(f"{name}: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.backend = backend
        rng = _checks.generator(rng, name)
        M, L, K = n_heads, n_levels, n_points
        # registration order = the official state-dict order
        self.sampling_offsets = Linear(d_model, M * L * K * 2, rng=rng)
        self.attention_weights = Linear(d_model, M * L * K, rng=rng)
        self.value_proj = Linear(d_model, d_model, rng=rng)
        self.output_proj = Linear(d_model, d_model, rng=rng)
        self._reset_parameters(rng)

    # ------------------------------------------------------------------ init
    def _reset_parameters(self, rng):
        """The official initialisation.

        * sampling_offsets: weight 0; bias = the initial offsets, in pixels: head m
          points along the angle 2 pi m / M, scaled onto the square of half-side 1
          (so M = 8 gives (1,0), (1,1), (0,1), (-1,1), (-1,0), (-1,-1), (0,-1), (1,-1)),
          the same for every level, and point k (0-based) is k + 1 pixels out.
        * attention_weights: weight 0 and bias 0, so every point starts with 1 / (L*K).
        * value_proj, output_proj: xavier-uniform weight, bias 0.
        """
        init.zeros_(self.sampling_offsets.weight)
        bias = self.sampling_offsets.bias
        bias.data[...] = to_device(self.initial_offsets().reshape(-1).astype(bias.dtype),
                                   device_of(bias.data))
        init.zeros_(self.attention_weights.weight)
        init.zeros_(self.attention_weights.bias)
        init.xavier_uniform_(self.value_proj.weight, rng=rng)
        init.zeros_(self.value_proj.bias)
        init.xavier_uniform_(self.output_proj.weight, rng=rng)
        init.zeros_(self.output_proj.bias)

    def initial_offsets(self):
        """The offsets of the initial sampling pattern, in pixels: (M, L, K, 2) float64."""
        M, L, K = self.n_heads, self.n_levels, self.n_points
        theta = np.arange(M) * (2 * math.pi / M)                       # (M,)
        direction = np.stack([np.cos(theta), np.sin(theta)], axis=-1)  # (M, 2) as (x, y)
        direction /= np.abs(direction).max(axis=-1, keepdims=True)     # onto the unit square
        scale = np.arange(1, K + 1, dtype=np.float64)                  # point k: k + 1 pixels
        return np.broadcast_to(direction[:, None, None, :] * scale[None, None, :, None],
                               (M, L, K, 2)).copy()                     # (M, L, K, 2)

    # ------------------------------------------------------------------ forward
    def sampling_locations_and_weights(self, query, reference_points, input_spatial_shapes):
        """Where each head looks and how much each point counts.

        Returns ``(sampling_locations (N, Lq, M, L, K, 2), attention_weights
        (N, Lq, M, L, K))`` as Tensors: normalised (x, y) locations and weights that sum
        to one over the L*K points of each head.
        """
        N, Lq, _ = query.shape
        M, L, K = self.n_heads, self.n_levels, self.n_points
        reference_points = self._check_reference(reference_points, N, Lq, query.dtype)
        offsets = self.sampling_offsets(query).reshape(N, Lq, M, L, K, 2)   # pixels
        logits = self.attention_weights(query).reshape(N, Lq, M, L * K)
        weights = F.softmax(logits, axis=-1).reshape(N, Lq, M, L, K)       # jointly over L*K
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of level l: divide x by W_l and y by H_l
            shapes = _host(input_spatial_shapes)                           # (L, 2) (H_l, W_l)
            normalizer = _as_like(shapes[:, ::-1], query).reshape(1, 1, 1, L, 1, 2)  # (W_l, H_l)
            ref = reference_points.reshape(N, Lq, 1, L, 1, 2)
            locations = ref + offsets / normalizer
        else:
            # boxes: offsets are fractions of the box size, K points covering half of it
            ref_xy = reference_points[..., :2].reshape(N, Lq, 1, L, 1, 2)
            ref_wh = reference_points[..., 2:].reshape(N, Lq, 1, L, 1, 2)
            locations = ref_xy + offsets / K * ref_wh * 0.5
        return locations, weights

    def forward(self, query, reference_points, input_flatten, input_spatial_shapes,
                input_level_start_index, input_padding_mask=None):
        """Eq. (3) for every query: project, sample, weight, sum, project.

        Shapes: query (N, Lq, C), reference_points (N, Lq, L, 2 | 4), input_flatten
        (N, S, C), input_spatial_shapes (L, 2), input_level_start_index (L,),
        input_padding_mask (N, S) bool or None -> (N, Lq, C).
        """
        N, Lq, C = query.shape
        if C != self.d_model:
            raise ValueError(f"MSDeformAttn: query must be (N, Lq, {self.d_model}), "
                             f"got shape {tuple(query.shape)}")
        if input_flatten.ndim != 3 or input_flatten.shape[0] != N or input_flatten.shape[2] != C:
            raise ValueError(f"MSDeformAttn: input_flatten must be (N, S, C) = ({N}, S, {C}), "
                             f"got shape {tuple(input_flatten.shape)}")
        S = input_flatten.shape[1]
        shapes = _host(input_spatial_shapes)                               # (L, 2) (H_l, W_l)
        if shapes.shape != (self.n_levels, 2) or int((shapes[:, 0] * shapes[:, 1]).sum()) != S:
            raise ValueError(f"MSDeformAttn: input_spatial_shapes {shapes.tolist()} must hold "
                             f"{self.n_levels} levels covering S = {S} tokens")
        M, D = self.n_heads, C // self.n_heads

        value = self.value_proj(input_flatten)                              # (N, S, C)
        if input_padding_mask is not None:
            mask = input_padding_mask
            mask = mask.data if isinstance(mask, Tensor) else mask
            if tuple(mask.shape) != (N, S):
                raise ValueError(f"MSDeformAttn: input_padding_mask must be (N, S) = "
                                 f"({N}, {S}), got shape {tuple(mask.shape)}")
            mask = to_device(mask, device_of(value.data)).reshape(N, S, 1)
            value = F.where(mask, 0.0, value)                              # padded tokens: 0
        value = value.reshape(N, S, M, D)                                   # (N, S, M, D)
        locations, weights = self.sampling_locations_and_weights(query, reference_points,
                                                                 shapes)
        out = ms_deform_attn(value, shapes, input_level_start_index, locations, weights,
                             backend=self.backend)                          # (N, Lq, C)
        return self.output_proj(out)

    # ------------------------------------------------------------------ helpers
    def _check_reference(self, reference_points, N, Lq, dtype):
        ref = reference_points if isinstance(reference_points, Tensor) else Tensor(reference_points)
        if ref.ndim != 4 or tuple(ref.shape[:3]) != (N, Lq, self.n_levels) \
                or ref.shape[-1] not in (2, 4):
            raise ValueError(f"MSDeformAttn: reference_points must be (N, Lq, L, 2) points or "
                             f"(N, Lq, L, 4) boxes with (N, Lq, L) = ({N}, {Lq}, "
                             f"{self.n_levels}), got shape {tuple(ref.shape)}")
        if ref.dtype != dtype:
            raise TypeError(f"MSDeformAttn: reference_points are {ref.dtype} but the query is "
                            f"{dtype}; cast one of them")
        return ref

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
                f"n_points={self.n_points}, backend={self.backend!r}")


def _as_like(array, like):
    """A host array as an array of ``like``'s dtype on ``like``'s device."""
    data = like.data if isinstance(like, Tensor) else like
    return to_device(np.ascontiguousarray(array, dtype=data.dtype), device_of(data))


def _host(spatial_shapes):
    """Integer spatial shapes (list, array or Tensor, on any device) as a host int64 array."""
    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = spatial_shapes.data
    return np.asarray(to_numpy(spatial_shapes) if hasattr(spatial_shapes, "dtype")
                      else spatial_shapes, dtype=np.int64)
