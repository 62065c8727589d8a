"""The reference multi-scale deformable attention: Eq. (2) and Eq. (3), one line at a time.

This is the oracle every other backend is tested against. It is written for the reader:
vectorised over (N, Lq, M, K) but looping over the L levels and the four bilinear corners,
with every corner index and corner weight spelled out. The array module comes from the
data (``xp = get_array_module(value)``), so the same code runs on NumPy and on CuPy.

The paper's multi-scale deformable attention (Eq. 3), for one query q and head m::

    out[q, m] = sum_l sum_k  A[q, m, l, k] * x_l( phi_l(p_q) + dp[q, m, l, k] ) W'_m

Here the value ``x_l W'_m`` is already projected (``value``), the attention weights
``A`` are already softmax-normalised and the sampling locations ``phi_l(p_q) + dp`` are
given in normalised ``(x, y)`` coordinates of level l. What remains, and what this file
computes, is the sampling ``x_l(location)`` (bilinear interpolation) and the weighted sum.

Sampling convention (identical to the official CUDA op and to PyTorch's
``grid_sample(mode='bilinear', padding_mode='zeros', align_corners=False)``):

* pixel coordinates: ``w_im = x * W_l - 0.5``, ``h_im = y * H_l - 0.5`` (pixel centres
  sit at half-integers of the normalised grid: x = (j + 0.5) / W_l is pixel column j);
* bilinear interpolation between the four neighbours ``floor`` / ``floor + 1``;
* a neighbour outside the map contributes zero (zero padding);
* as in the CUDA op, a point is skipped entirely unless ``-1 < h_im < H_l`` and
  ``-1 < w_im < W_l``. Outside that box every neighbour is outside anyway, so only the
  gradient *exactly on* the line ``h_im = -1`` (or ``w_im = -1``) is affected: it is
  zero there, where ``grid_sample``'s backward (``floor`` picks the cell on the right)
  returns the right-hand derivative, which is not. On ``h_im = H_l`` (or ``w_im = W_l``)
  the right-hand derivative is zero as well, so the skip changes nothing there.

Shapes:
    value                (N, S, M, D)       S = sum_l H_l * W_l
    spatial_shapes       (L, 2)             rows (H_l, W_l), int64
    level_start_index    (L,)               first row of level l in S, int64
    sampling_locations   (N, Lq, M, L, K, 2) normalised (x, y)
    attention_weights    (N, Lq, M, L, K)
    output               (N, Lq, M * D)     channel index m * D + d
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ...backend import allow_transfers, get_array_module
from ...functional._util import index_add


def is_available():
    """The reference needs nothing but NumPy (or CuPy for CuPy arrays)."""
    return True, "NumPy/CuPy reference (always available)"


# --------------------------------------------------------------------------- sampling
class Corner(NamedTuple):
    """One of the four bilinear neighbours of every sampling point of one level.

    Every field has the shape of the sampling points, e.g. (N, Lq, M, K).

    row:      the neighbour's row inside the level, ``y * W_l + x`` (clipped to a valid
              row when the neighbour is outside; its weights are then zero)
    weight:   the bilinear weight of the neighbour (zero when it is outside the map)
    dweight_dw, dweight_dh:
              the derivative of ``weight`` with respect to the pixel coordinates
              ``w_im`` and ``h_im`` (zero when the neighbour is outside)
    """
    row: object
    weight: object
    dweight_dw: object
    dweight_dh: object


def bilinear_corners(x, y, height, width):
    """The four neighbours of normalised points ``(x, y)`` on an ``height x width`` map.

    Args:
        x, y: normalised coordinates (0 = left/top edge, 1 = right/bottom edge), same shape.
        height, width: the map size H_l, W_l (Python ints).

    Returns:
        four :class:`Corner` s, in the order (top-left, top-right, bottom-left,
        bottom-right) = (h0, w0), (h0, w1), (h1, w0), (h1, w1).

    With ``lh = h_im - h0`` and ``lw = w_im - w0`` (the fractional parts) the weights are
    ``(1-lh)(1-lw), (1-lh) lw, lh (1-lw), lh lw``: each neighbour gets the area of the
    rectangle *opposite* to it, so the weights sum to one and the sample is continuous.
    """
    xp = get_array_module(x)
    # Pixel coordinates: pixel j covers [j, j+1) in units of x * W, its centre is j + 0.5.
    w_im = x * width - 0.5                                # same shape as x
    h_im = y * height - 0.5
    # The official op samples a point only strictly inside (-1, H) x (-1, W).
    # (NaN coordinates fail these comparisons too, so they sample nothing.)
    inside = (h_im > -1) & (h_im < height) & (w_im > -1) & (w_im < width)
    h0 = xp.floor(h_im)
    w0 = xp.floor(w_im)
    lh = h_im - h0                                        # fractional parts in [0, 1)
    lw = w_im - w0
    hh = 1 - lh                                           # the complementary parts
    hw = 1 - lw

    corners = []
    # (row step, column step, weight, d weight / d w_im, d weight / d h_im)
    for di, dj, weight, d_dw, d_dh in ((0, 0, hh * hw, -hh, -hw),
                                       (0, 1, hh * lw, hh, -lw),
                                       (1, 0, lh * hw, -lh, hw),
                                       (1, 1, lh * lw, lh, lw)):
        hc = h0 + di                                      # the neighbour's pixel row ...
        wc = w0 + dj                                      # ... and column
        valid = inside & (hc >= 0) & (hc <= height - 1) & (wc >= 0) & (wc <= width - 1)
        # Outside neighbours get row 0 (and weight 0). Replacing them before the integer
        # cast also keeps huge or NaN coordinates away from it.
        hc = xp.where(valid, hc, 0).astype(np.int64)
        wc = xp.where(valid, wc, 0).astype(np.int64)
        zero = xp.zeros((), dtype=weight.dtype)
        corners.append(Corner(hc * width + wc,            # row-major pixel index
                              xp.where(valid, weight, zero),
                              xp.where(valid, d_dw, zero),
                              xp.where(valid, d_dh, zero)))
    return corners


def gather_rows(value_l, rows):
    """``value_l[n, rows[n, q, m, k], m, :]`` for every (n, q, m, k).

    Shapes: value_l (N, H*W, M, D), rows (N, Lq, M, K) -> (N, Lq, M, K, D).
    """
    xp = get_array_module(value_l)
    n_idx, m_idx = _batch_head_index(xp, value_l.shape[0], value_l.shape[2])
    return value_l[n_idx, rows, m_idx]                   # (N, Lq, M, K, D)


def scatter_add_rows(target_l, rows, values):
    """``target_l[n, rows[n, q, m, k], m, :] += values[n, q, m, k, :]``, repeats summed.

    The transpose of :func:`gather_rows`. A plain ``target[idx] += v`` would keep only
    one of several updates of the same row; minidetr's one scatter-add helper
    (``numpy.add.at`` / ``cupyx.scatter_add``) sums all of them.

    Shapes: target_l (N, H*W, M, D) (updated in place), rows (N, Lq, M, K),
    values (N, Lq, M, K, D).
    """
    xp = get_array_module(target_l)
    n_idx, m_idx = _batch_head_index(xp, target_l.shape[0], target_l.shape[2])
    index_add(xp, target_l, (n_idx, rows, m_idx), values)


def _batch_head_index(xp, n, m):
    """Index arrays (N, 1, 1, 1) and (1, 1, M, 1) that broadcast against (N, Lq, M, K)."""
    n_idx = xp.arange(n).reshape(n, 1, 1, 1)
    m_idx = xp.arange(m).reshape(1, 1, m, 1)
    return n_idx, m_idx


def _levels(spatial_shapes, level_start_index):
    """(l, H_l, W_l, start_l) as Python ints, one tuple per level.

    The loops and reshapes need the sizes on the host: on CuPy this is a small, deliberate
    device -> host copy, marked for :func:`~minidetr.backend.transfer_guard`.
    """
    with allow_transfers("the MSDA reference's level sizes"):
        shapes = spatial_shapes.tolist()                  # (L, 2) and (L,): a few ints
        starts = level_start_index.tolist()
    return [(l, int(h), int(w), int(s)) for l, ((h, w), s) in enumerate(zip(shapes, starts))]


# --------------------------------------------------------------------------- forward
def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Multi-scale deformable attention, Eq. (3): sample, weight, sum over levels and points.

    Inputs must be validated (see :func:`minidetr.ops.msda.validate_inputs`).

    Shapes: see the module docstring; returns (N, Lq, M * D).
    """
    xp = get_array_module(value)
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    out = xp.zeros((N, Lq, M, D), dtype=value.dtype)
    for l, H, W, start in _levels(spatial_shapes, level_start_index):
        value_l = value[:, start:start + H * W]            # (N, H*W, M, D)
        x = sampling_locations[:, :, :, l, :, 0]            # (N, Lq, M, K)
        y = sampling_locations[:, :, :, l, :, 1]            # (N, Lq, M, K)
        a = attention_weights[:, :, :, l, :]                # (N, Lq, M, K)
        # Bilinear sample x_l(p) for every point: sum of four weighted neighbours.
        sample = 0
        for corner in bilinear_corners(x, y, H, W):
            sample = sample + corner.weight[..., None] * gather_rows(value_l, corner.row)
        # sample: (N, Lq, M, K, D). Weight the K points by A and add them up.
        out += (a[..., None] * sample).sum(axis=3)          # (N, Lq, M, D)
    return out.reshape(N, Lq, M * D)                        # head-major channels m*D + d


def deformable_attention_single_scale(value, spatial_shape, sampling_locations, attention_weights):
    """Single-scale deformable attention, Eq. (2): the L = 1 case of the same code.

    Args:
        value: (N, H*W, M, D), the projected value map of one level, flattened row-major.
        spatial_shape: (H, W).
        sampling_locations: (N, Lq, M, K, 2) normalised (x, y).
        attention_weights: (N, Lq, M, K), normalised over K per head.

    Returns:
        (N, Lq, M * D).
    """
    from . import validate_inputs
    xp = get_array_module(value)
    H, W = (int(s) for s in spatial_shape)
    locations = sampling_locations[:, :, :, None]           # (N, Lq, M, 1, K, 2)
    weights = attention_weights[:, :, :, None]              # (N, Lq, M, 1, K)
    arrays = validate_inputs(value, xp.asarray([[H, W]]), xp.asarray([0]), locations, weights)
    return forward(*arrays)


# --------------------------------------------------------------------------- backward
def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights):
    """Gradients of :func:`forward` with respect to value, locations and weights.

    For one point p = (l, k) of query q and head m, with g = dLoss/d out[q, m] (D,),
    a = A[q, m, l, k] and neighbours v_c = value rows with bilinear weights w_c:

        out[q, m]      += a * sum_c w_c v_c
        dL/da           = g . sum_c w_c v_c                    (the sample, dotted with g)
        dL/dv_c        += a * w_c * g                          (scattered back to the rows)
        dL/dw_im        = a * sum_c (d w_c / d w_im) (g . v_c),   dL/dx = W_l * dL/dw_im
        dL/dh_im        = a * sum_c (d w_c / d h_im) (g . v_c),   dL/dy = H_l * dL/dh_im

    Shapes: grad_output (N, Lq, M * D); returns grad_value (N, S, M, D),
    grad_sampling_locations (N, Lq, M, L, K, 2), grad_attention_weights (N, Lq, M, L, K).
    """
    xp = get_array_module(value)
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    g = grad_output.reshape(N, Lq, M, 1, D)                 # one D-vector per (n, q, m)
    grad_value = xp.zeros_like(value)                       # (N, S, M, D)
    grad_loc = xp.zeros_like(sampling_locations)            # (N, Lq, M, L, K, 2)
    grad_attn = xp.zeros_like(attention_weights)            # (N, Lq, M, L, K)
    for l, H, W, start in _levels(spatial_shapes, level_start_index):
        value_l = value[:, start:start + H * W]            # (N, H*W, M, D)
        grad_value_l = grad_value[:, start:start + H * W]  # a view: updates land in grad_value
        x = sampling_locations[:, :, :, l, :, 0]            # (N, Lq, M, K)
        y = sampling_locations[:, :, :, l, :, 1]
        a = attention_weights[:, :, :, l, :]                # (N, Lq, M, K)
        grad_sample = g * a[..., None]                      # dL/d sample: (N, Lq, M, K, D)
        dL_da = 0
        dL_dw_im = 0
        dL_dh_im = 0
        for corner in bilinear_corners(x, y, H, W):
            v = gather_rows(value_l, corner.row)            # (N, Lq, M, K, D)
            g_dot_v = (g * v).sum(axis=-1)                  # (N, Lq, M, K)
            dL_da = dL_da + corner.weight * g_dot_v
            dL_dw_im = dL_dw_im + corner.dweight_dw * g_dot_v
            dL_dh_im = dL_dh_im + corner.dweight_dh * g_dot_v
            scatter_add_rows(grad_value_l, corner.row, corner.weight[..., None] * grad_sample)
        grad_attn[:, :, :, l, :] = dL_da
        # Chain rule through w_im = x * W - 0.5 and h_im = y * H - 0.5.
        grad_loc[:, :, :, l, :, 0] = a * dL_dw_im * W
        grad_loc[:, :, :, l, :, 1] = a * dL_dh_im * H
    return grad_value, grad_loc, grad_attn
