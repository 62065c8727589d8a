"""Fused Numba CPU kernels of layer, group and frozen batch norm (the fast path of norm.py).

The readable NumPy code in :mod:`.norm` is the reference; these kernels compute the same
thing in one or two passes over each row, without its temporaries (``mu``, ``centered``,
``centered**2``, ``x_hat``, ``x_hat * weight``, ... each a full-size array). The
Functions of :mod:`.norm` call them for NumPy float32/float64 C-contiguous inputs
(:func:`._util.cpu_kernels_apply`) and use the reference otherwise (CuPy, other dtypes,
strided views); they import this module, and so Numba, on first use only.

Layer norm, x viewed as rows (R, C) = (prod(...), C)::

    forward   one pass per row for the mean, one for the variance (the row is in cache),
              one that writes y = (x - mu) * rstd * weight + bias;
              saves mean, rstd (R,) float64 instead of x_hat (R, C)
    backward  per row: x_hat recomputed from x, mean and rstd;
              sum(g w) and sum(g w x_hat) in one pass, then
              grad_x = rstd (g w - mean(g w) - x_hat mean(g w x_hat)) in a second
              grad_weight = sum_rows g * x_hat, grad_bias = sum_rows g (float64)

Statistics and sums are accumulated in float64 whatever the data's dtype (the reference
accumulates float32 data in float32, so the two agree to float32 rounding, not bit for
bit). ``fastmath={"reassoc"}`` lets LLVM split those sums into SIMD partial sums (3x
faster): it changes the order of the additions, so the rounding, and nothing else.

Group norm, x viewed as (B, C, P) with P = prod(*), G groups of C/G channels, and an
optional 0/1 ``valid`` (B, P) that restricts the statistics to the image's own pixels
(the mask-aware group norm of the tiny backbone; all ones for plain group norm)::

    forward   per (image, group): mean and variance over its valid elements (float64),
              y = (x_hat * weight + bias) * valid;  saves mean, rstd (B, G)
    backward  per (image, group), m valid elements, g = grad * weight * valid:
              grad_x = valid * rstd * (g - sum(g)/m - x_hat sum(g x_hat)/m);
              the weight/bias sums of image b go to row b of a (B, C) float64 table,
              then are added over b

Frozen batch norm, x viewed as (N, C, P) with P = prod(*)::

    forward   y = x * scale[c] + shift[c], one multiply-add per element
    (its backward, grad * scale[c], is one NumPy multiply in norm.py)

    with the ReLU (and the block's shortcut r) fused, FrozenBatchNormReLU:
    forward   y = max(x * scale[c] + shift[c] (+ r), 0), one pass
    backward  m = dL/dy * [y > 0]; dL/dr = m, dL/dx = m * scale[c], one pass

Threads: none; every kernel runs in the calling thread. These calls take 0.1-0.5 ms
and are limited by memory bandwidth, and on 2 cores ``parallel=True`` was no faster at
best, while waking Numba's sleeping workers (``OMP_WAIT_POLICY=PASSIVE``, see
``minidetr/__init__.py``) cost up to 5 ms per call on a busy machine (median over 30
calls of the layer norm forward at (2, 1360, 128): 0.25 ms serial, 2-5 ms parallel).

Compilation: on first use, once per dtype, cached on disk (``cache=True``). Measured on
the 2-core development machine (busy): compiling all the kernels of this module and of
:mod:`.softmax_cpu` took 2.3 s for float32 and 1.8 s for float64 the first time; from the
cache, a new process pays 0.3 s at its first kernel call (Numba's own start-up, which
the deformable attention pays anyway) and milliseconds for the rest.
"""
from __future__ import annotations

import numpy as np
from numba import njit


# --------------------------------------------------------------------------- layer norm
@njit(cache=True, fastmath={"reassoc"})
def _layer_norm_forward(x, weight, bias, eps, y, mean, rstd):
    """Rows of x (R, C) standardised, scaled and shifted into y (R, C); mean, rstd (R,)."""
    R, C = x.shape
    for r in range(R):
        s = 0.0                                   # float64 accumulators
        for c in range(C):
            s += x[r, c]
        mu = s / C
        v = 0.0
        for c in range(C):
            d = x[r, c] - mu
            v += d * d
        rs = 1.0 / np.sqrt(v / C + eps)
        mean[r] = mu
        rstd[r] = rs
        for c in range(C):
            y[r, c] = (x[r, c] - mu) * rs * weight[c] + bias[c]


@njit(cache=True, fastmath={"reassoc"})
def _layer_norm_backward(grad, x, weight, mean, rstd, need_x, grad_x, sum_w, sum_b):
    """grad_x (R, C) (when ``need_x``); sum_w, sum_b (C,) float64 += the weight/bias sums."""
    R, C = x.shape
    for r in range(R):
        mu = mean[r]
        rs = rstd[r]
        s_g = 0.0                                 # sum_c g_c w_c
        s_gx = 0.0                                # sum_c g_c w_c x_hat_c
        for c in range(C):
            x_hat = (x[r, c] - mu) * rs
            g = grad[r, c]
            sum_w[c] += g * x_hat
            sum_b[c] += g
            gw = g * weight[c]
            s_g += gw
            s_gx += gw * x_hat
        if need_x:
            m_g = s_g / C
            m_gx = s_gx / C
            for c in range(C):
                x_hat = (x[r, c] - mu) * rs
                grad_x[r, c] = rs * (grad[r, c] * weight[c] - m_g - x_hat * m_gx)


def layer_norm_forward(x, weight, bias, eps):
    """Layer norm over the last axis with the fused kernel.

    Shapes: x (..., C) C-contiguous, weight, bias (C,) or None ->
    y (..., C) of x's dtype, mean (R,), rstd (R,) float64 with R = prod(...).
    """
    C = x.shape[-1]
    rows = x.reshape(-1, C)                                            # (R, C), a view
    weight = np.ones(C, x.dtype) if weight is None else weight
    bias = np.zeros(C, x.dtype) if bias is None else bias
    y = np.empty_like(rows)                                            # (R, C)
    mean = np.empty(rows.shape[0], np.float64)                         # (R,)
    rstd = np.empty(rows.shape[0], np.float64)                         # (R,)
    _layer_norm_forward(rows, weight, bias, float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


def layer_norm_backward(grad, x, weight, mean, rstd, need_x=True):
    """Gradients of layer norm from what :func:`layer_norm_forward` returned.

    Shapes: grad, x (..., C) C-contiguous, weight (C,) or None, mean, rstd (R,) ->
    grad_x (..., C) (None unless ``need_x``), grad_weight (C,), grad_bias (C,) in x's dtype.
    """
    C = x.shape[-1]
    rows = x.reshape(-1, C)                                            # (R, C)
    grad_rows = grad.reshape(-1, C)                                    # (R, C)
    weight = np.ones(C, x.dtype) if weight is None else weight
    sum_w = np.zeros(C, np.float64)                                    # (C,)
    sum_b = np.zeros(C, np.float64)                                    # (C,)
    grad_x = np.empty_like(rows) if need_x else np.empty((0, C), x.dtype)
    _layer_norm_backward(grad_rows, rows, weight, mean, rstd, need_x, grad_x, sum_w, sum_b)
    return (grad_x.reshape(x.shape) if need_x else None,
            sum_w.astype(x.dtype), sum_b.astype(x.dtype))


# --------------------------------------------------------------------------- group norm
@njit(cache=True, fastmath={"reassoc"})
def _group_norm_forward(x, valid, weight, bias, eps, y, mean, rstd):
    """x (B, C, P) standardised per (image, group) over its valid pixels into y (B, C, P).

    valid (B, P) is 1 on the image and 0 on padding (all ones: plain group norm); y is
    (x_hat * weight + bias) * valid, zero on padding; mean, rstd (B, G).
    """
    B, C, P = x.shape
    G = mean.shape[1]
    Cg = C // G
    for bg in range(B * G):
        b = bg // G
        g = bg % G
        count = 0.0
        for p in range(P):
            count += valid[b, p]
        count *= Cg                                # valid elements of the group
        s = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            for p in range(P):
                s += x[b, c, p] * valid[b, p]
        mu = s / count
        v = 0.0
        for c in range(g * Cg, (g + 1) * Cg):
            for p in range(P):
                d = (x[b, c, p] - mu) * valid[b, p]
                v += d * d
        rs = 1.0 / np.sqrt(v / count + eps)
        mean[b, g] = mu
        rstd[b, g] = rs
        for c in range(g * Cg, (g + 1) * Cg):
            for p in range(P):
                x_hat = (x[b, c, p] - mu) * rs
                y[b, c, p] = (x_hat * weight[c] + bias[c]) * valid[b, p]


@njit(cache=True, fastmath={"reassoc"})
def _group_norm_backward(grad, x, valid, weight, mean, rstd, need_x, grad_x, partial_w,
                         partial_b):
    """grad_x (B, C, P) (when ``need_x``) and per-image sums partial_w, partial_b (B, C).

    Per (image, group), over its m valid elements, with g = grad * weight * valid:
    grad_x = valid * rstd * (g - sum(g) / m - x_hat * sum(g * x_hat) / m).
    """
    B, C, P = x.shape
    G = mean.shape[1]
    Cg = C // G
    for bg in range(B * G):
        b = bg // G
        gr = bg % G
        mu = mean[b, gr]
        rs = rstd[b, gr]
        count = 0.0
        for p in range(P):
            count += valid[b, p]
        count *= Cg
        s_g = 0.0                                 # sum of g over the group
        s_gx = 0.0                                # sum of g * x_hat
        for c in range(gr * Cg, (gr + 1) * Cg):
            w_sum = 0.0
            b_sum = 0.0
            for p in range(P):
                gv = grad[b, c, p] * valid[b, p]
                x_hat = (x[b, c, p] - mu) * rs
                w_sum += gv * x_hat
                b_sum += gv
            partial_w[b, c] = w_sum
            partial_b[b, c] = b_sum
            s_g += b_sum * weight[c]
            s_gx += w_sum * weight[c]
        if need_x:
            m_g = s_g / count
            m_gx = s_gx / count
            for c in range(gr * Cg, (gr + 1) * Cg):
                for p in range(P):
                    x_hat = (x[b, c, p] - mu) * rs
                    g = grad[b, c, p] * weight[c] * valid[b, p]
                    grad_x[b, c, p] = valid[b, p] * rs * (g - m_g - x_hat * m_gx)


def group_norm_forward(x, valid, weight, bias, num_groups, eps):
    """Group norm with statistics over the valid pixels (all of them when ``valid`` is None).

    Shapes: x (B, C, *) C-contiguous, valid (B, 1, *) of 0/1 or None, weight, bias (C,)
    or None -> y (B, C, *) of x's dtype, zero where valid is 0; mean, rstd (B, G) float64.
    """
    B, C = x.shape[:2]
    planes = x.reshape(B, C, -1)                                       # (B, C, P)
    P = planes.shape[2]
    valid = np.ones((B, P), x.dtype) if valid is None else valid.reshape(B, P)  # (B, P)
    weight = np.ones(C, x.dtype) if weight is None else weight
    bias = np.zeros(C, x.dtype) if bias is None else bias
    y = np.empty_like(planes)                                          # (B, C, P)
    mean = np.empty((B, num_groups), np.float64)                       # (B, G)
    rstd = np.empty((B, num_groups), np.float64)                       # (B, G)
    _group_norm_forward(planes, valid, weight, bias, float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


def group_norm_backward(grad, x, valid, weight, mean, rstd, need_x=True):
    """Gradients of :func:`group_norm_forward` from its saved mean and rstd.

    Shapes: grad, x (B, C, *) C-contiguous, valid (B, 1, *) or None, weight (C,) or None,
    mean, rstd (B, G) -> grad_x (B, C, *) (None unless ``need_x``), grad_weight,
    grad_bias (C,) in x's dtype.
    """
    B, C = x.shape[:2]
    planes = x.reshape(B, C, -1)                                       # (B, C, P)
    P = planes.shape[2]
    valid = np.ones((B, P), x.dtype) if valid is None else valid.reshape(B, P)  # (B, P)
    weight = np.ones(C, x.dtype) if weight is None else weight
    partial_w = np.empty((B, C), np.float64)                           # (B, C)
    partial_b = np.empty((B, C), np.float64)                           # (B, C)
    grad_x = np.empty_like(planes) if need_x else np.empty((0, 0, 0), x.dtype)
    _group_norm_backward(grad.reshape(B, C, P), planes, valid, weight, mean, rstd, need_x,
                         grad_x, partial_w, partial_b)
    return (grad_x.reshape(x.shape) if need_x else None,
            partial_w.sum(axis=0).astype(x.dtype), partial_b.sum(axis=0).astype(x.dtype))


# --------------------------------------------------------------------------- frozen batch norm
@njit(cache=True)
def _scale_shift_channels(x, scale, shift, y):
    """y[n, c, p] = x[n, c, p] * scale[c] + shift[c] for x, y (N, C, P)."""
    N, C, P = x.shape
    for nc in range(N * C):
        n = nc // C
        c = nc % C
        a = scale[c]
        b = shift[c]
        for p in range(P):
            y[n, c, p] = x[n, c, p] * a + b


def scale_shift_channels(x, scale, shift):
    """Per-channel affine map, frozen batch norm's forward.

    Shapes: x (N, C, *) C-contiguous, scale, shift (C,) of x's dtype -> y (N, C, *).
    """
    N, C = x.shape[:2]
    planes = x.reshape(N, C, -1)                                       # (N, C, P)
    y = np.empty_like(planes)
    _scale_shift_channels(planes, scale, shift, y)
    return y.reshape(x.shape)


@njit(cache=True)
def _scale_shift_add_relu(x, scale, shift, r, zero, y):
    """y[n, c, p] = max(x[n, c, p] * scale[c] + shift[c] + r[n, c, p], 0) for (N, C, P)
    arrays; ``r`` of shape (0, 0, 0) means no residual; ``zero`` is 0 in the dtype. NaN
    propagates, as in relu (:mod:`.relu_cpu`)."""
    N, C, P = x.shape
    add = r.shape[0] > 0
    for nc in range(N * C):
        n = nc // C
        c = nc % C
        a = scale[c]
        b = shift[c]
        for p in range(P):
            v = x[n, c, p] * a + b
            if add:
                v = v + r[n, c, p]
            y[n, c, p] = v if (v > 0 or v != v) else zero


def scale_shift_add_relu(x, scale, shift, residual=None):
    """FrozenBatchNormReLU's forward: max(x * scale + shift (+ residual), 0) per channel.

    Shapes: x (N, C, *) C-contiguous, scale, shift (C,), residual None or x's shape ->
    y (N, C, *).
    """
    N, C = x.shape[:2]
    planes = x.reshape(N, C, -1)                                       # (N, C, P)
    r = (residual.reshape(N, C, -1) if residual is not None
         else np.empty((0, 0, 0), dtype=x.dtype))                      # (N, C, P) or none
    y = np.empty_like(planes)
    _scale_shift_add_relu(planes, scale, shift, r, x.dtype.type(0), y)
    return y.reshape(x.shape)


@njit(cache=True)
def _relu_scale_backward(g, y, scale, zero, one, gx, gr, need_x, need_r):
    """m = g * [y > 0]; gr = m, gx = m * scale[c] for (N, C, P) arrays (``zero``, ``one``
    in the dtype: a NaN g stays NaN, as in g * mask)."""
    N, C, P = g.shape
    for nc in range(N * C):
        n = nc // C
        c = nc % C
        a = scale[c]
        for p in range(P):
            m = g[n, c, p] * (one if y[n, c, p] > 0 else zero)
            if need_r:
                gr[n, c, p] = m
            if need_x:
                gx[n, c, p] = m * a


def relu_scale_backward(grad, y, scale, need_x=True, need_residual=True):
    """FrozenBatchNormReLU's backward: (dL/dx or None, dL/dresidual or None).

    Shapes: grad, y (N, C, *) C-contiguous, scale (C,) -> two arrays of grad's shape.
    """
    N, C = grad.shape[:2]
    g = grad.reshape(N, C, -1)                                         # (N, C, P)
    none = np.empty((0, 0, 0), dtype=grad.dtype)
    gx = np.empty_like(g) if need_x else none
    gr = np.empty_like(g) if need_residual else none
    _relu_scale_backward(g, y.reshape(N, C, -1), scale, grad.dtype.type(0),
                         grad.dtype.type(1), gx, gr, need_x, need_residual)
    return (gx.reshape(grad.shape) if need_x else None,
            gr.reshape(grad.shape) if need_residual else None)
