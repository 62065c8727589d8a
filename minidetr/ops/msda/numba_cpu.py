"""Multi-scale deformable attention on the CPU with Numba: the fast, default CPU backend.

The kernels compute exactly what :mod:`.reference` computes (same sampling convention,
same skip rule at the borders), one sampling point at a time instead of one level at a
time, so they need none of the reference's large (N, Lq, M, K, D) temporaries.

Parallelism: ``prange`` over tasks of one image and a group of its heads, and inside a
task over the queries, then the group's heads (:func:`head_groups` picks the fewest
groups that keep every thread busy: one group of all M heads when N >= threads). A task
reads only its own heads' value maps and, in the backward pass, scatters only into its
own heads' rows of ``grad_value``: no two threads ever write the same row, so there are
no atomics and no locks. Every row receives its contributions in the same order (query
by query) however the heads are grouped, so the result is deterministic and the same
bits on any number of threads. (The official CUDA op uses one thread per output channel
and atomicAdd instead.) Heads innermost makes every per-query array stream through
memory in order: the M rows of one query are neighbours in ``sampling_locations``,
``attention_weights``, ``grad_output`` and their gradients (with one head per task, as
before, a task read 128 bytes of every 1 KiB and stalled on cache misses).

Memory layout. The value arrives as (N, S, M, D): the M heads of one pixel side by side,
so one head's map uses 128 bytes of every 1 KiB (M*D floats at D = 32). When the value
is read many times (at least one sampling point per value row, as in the encoder), the
kernels first copy it head-major, (N, M, S, D): each head's map is one contiguous block
of S rows of D channels, and neighbouring pixels are neighbouring rows, which the
backward pass's scatter into ``grad_value`` (same layout) likes best. When few rows are
read (the decoder's 300 queries), the copy would cost more than it saves and the
kernels read the input layout directly. Both are "rows of D channels" with strides: the
row of (n, m, s) is n*sn + m*sm + s*ss. The other arrays are viewed as 2-d tables, one
row per (n, q, m):

    value                 (N, M, S, D) or (N, S, M, D) -> rows (N*M*S, D), strides (sn, sm, ss)
    sampling_locations    (N, Lq, M, L, K, 2)  -> rows (N*Lq*M, L*K*2)
    attention_weights     (N, Lq, M, L, K)     -> rows (N*Lq*M, L*K)
    output, grad_output   (N, Lq, M*D)         -> rows (N*Lq*M, D)

Per query and head the kernels first fill a small corner table (:func:`_corners`): for
each of the L*K points its four neighbours' value rows (-1 outside the map or for a
skipped point), their weights a*w_c and the point's (lh, lw). The forward pass then sums
the weighted rows, the backward pass takes the dot products with the rows and scatters
into ``grad_value`` from the same table, and derives the location and attention
gradients from the dot products. The innermost loops run over the D contiguous channels
of a row, which LLVM turns into SIMD instructions.

Precision: coordinates and sums stay in the data's dtype (float32 data is never upcast).
``fastmath`` is off, except ``reassoc`` in :func:`_dot`: it lets LLVM split the
D-channel dot product into SIMD partial sums (the backward kernel runs 40 % faster).
That changes the order of the additions, so the rounding, and nothing else (NaN and
infinity behave as usual).

Small problems (fewer than ``SERIAL_BELOW`` sampling points: gradient checks, toy
models) run on one thread: waking the thread pool costs more than the work, and far
more on a busy machine.

Compilation: the kernels compile on first use, once per dtype (float32, float64), and
are cached on disk (``cache=True``), so later processes start at once.
"""
from __future__ import annotations

from contextlib import contextmanager

import numba
import numpy as np
from numba import njit, prange


def is_available():
    """Numba is a dependency of minidetr; report its version and thread count."""
    return True, f"Numba {numba.__version__} on {numba.get_num_threads()} CPU threads"


# --------------------------------------------------------------------------- helpers
@njit(inline="always", cache=True)
def _point(x, y, height, width, half):
    """The 2x2 pixel cell around one normalised point (x, y) of a height x width map.

    Returns ``(ok, h0, w0, lh, lw)``. ``ok`` is False when the official op skips the
    point (outside -1 < h_im < H_l and -1 < w_im < W_l, or NaN). (h0, w0) is the
    top-left neighbour and (lh, lw) the fractional position inside the cell; the four
    neighbours (h0,w0), (h0,w0+1), (h0+1,w0), (h0+1,w0+1) have the bilinear weights
    (1-lh)(1-lw), (1-lh)lw, lh(1-lw), lh*lw (see :func:`.reference.bilinear_corners`).
    ``height``, ``width`` and ``half`` = 0.5 are in the data's dtype.
    """
    h_im = y * height - half                        # pixel coordinates: centres at j + 0.5
    w_im = x * width - half
    if not (h_im > -1 and w_im > -1 and h_im < height and w_im < width):
        return False, 0, 0, h_im, w_im
    h0 = np.floor(h_im)
    w0 = np.floor(w_im)
    return True, int(h0), int(w0), h_im - h0, w_im - w0


@njit(inline="always", cache=True)
def _axpy(dst, i, alpha, src, j):
    """dst[i, :] += alpha * src[j, :], over the D contiguous channels (SIMD)."""
    for d in range(dst.shape[1]):
        dst[i, d] += alpha * src[j, d]


@njit(fastmath={"reassoc"}, cache=True)
def _dot(a, i, b, j, zero):
    """a[i, :] . b[j, :] over the D channels; ``reassoc`` allows SIMD partial sums."""
    total = zero
    for d in range(a.shape[1]):
        total += a[i, d] * b[j, d]
    return total


@njit(parallel=True, cache=True)
def _to_head_major(value, out):
    """out[n, m, s, :] = value[n, s, m, :]: (N, S, M, D) -> (N, M, S, D)."""
    N, S, M, D = value.shape
    for nm in prange(N * M):
        n, m = nm // M, nm % M
        for s in range(S):
            for d in range(D):
                out[n, m, s, d] = value[n, s, m, d]


@njit(parallel=True, cache=True)
def _from_head_major(value_hm, out):
    """out[n, s, m, :] = value_hm[n, m, s, :]: (N, M, S, D) -> (N, S, M, D)."""
    N, M, S, D = value_hm.shape
    for ns in prange(N * S):
        n, s = ns // S, ns % S
        for m in range(M):
            for d in range(D):
                out[n, s, m, d] = value_hm[n, m, s, d]


# --------------------------------------------------------------------------- corners
@njit(inline="always", cache=True)
def _corners(loc_rows, attn_rows, qi, spatial_shapes, sizes, level_start_index, head_row, ss,
             half, one, rows, weights, fracs):
    """The corner table of one query and head: the row qi = (n, q, m) of loc/attn.

    For point p = l*K + k and corner c (0: (h0, w0), 1: (h0, w0+1), 2: (h0+1, w0),
    3: (h0+1, w0+1)) it writes ``rows[4p + c]``, the value row of the neighbour (-1 when
    the neighbour is outside the map or the point is skipped), ``weights[4p + c]`` = a w_c,
    the attention weight times the bilinear weight, and ``fracs[p] = (lh, lw)``.
    ``head_row`` is the value row of pixel 0 of this (image, head): n*sn + m*sm.
    Shapes: rows, weights (4*L*K,); fracs (L*K, 2).
    """
    L = spatial_shapes.shape[0]
    K = attn_rows.shape[1] // L
    for l in range(L):
        H = spatial_shapes[l, 0]
        W = spatial_shapes[l, 1]
        level = head_row + level_start_index[l] * ss              # value row of pixel (0, 0)
        down = W * ss                                              # one pixel row down
        for k in range(K):
            p = l * K + k                    # the point's column in loc/attn rows
            c = 4 * p                        # its first corner in the table
            ok, h0, w0, lh, lw = _point(loc_rows[qi, 2 * p], loc_rows[qi, 2 * p + 1],
                                        sizes[l, 0], sizes[l, 1], half)
            if not ok:
                rows[c] = rows[c + 1] = rows[c + 2] = rows[c + 3] = -1
                continue
            a = attn_rows[qi, p]
            hh = one - lh
            hw = one - lw
            top, bottom = h0 >= 0, h0 + 1 <= H - 1          # which neighbours exist
            left, right = w0 >= 0, w0 + 1 <= W - 1
            r = level + (h0 * W + w0) * ss                  # row of neighbour (h0, w0)
            rows[c] = r if top and left else -1
            rows[c + 1] = r + ss if top and right else -1
            rows[c + 2] = r + down if bottom and left else -1
            rows[c + 3] = r + down + ss if bottom and right else -1
            weights[c] = a * hh * hw
            weights[c + 1] = a * hh * lw
            weights[c + 2] = a * lh * hw
            weights[c + 3] = a * lh * lw
            fracs[p, 0] = lh
            fracs[p, 1] = lw


# --------------------------------------------------------------------------- forward
@njit(parallel=True, cache=True)
def _forward_kernel(value_rows, strides, N, M, groups, Lq, spatial_shapes, sizes,
                    level_start_index, loc_rows, attn_rows, zero, half, one, out_rows):
    """out[n, q, m, :] = sum_{l,k} a * sum_c w_c * value[n, row_c, m, :]   (Eq. 3)."""
    P = attn_rows.shape[1]                          # L*K points per query and head
    D = value_rows.shape[1]
    sn, sm, ss = strides                            # value row of (n, m, s): n*sn + m*sm + s*ss
    G = M // groups                                 # heads per task
    for task in prange(N * groups):                 # one (image, head group) per task
        n, first = task // groups, (task % groups) * G
        acc = np.empty((1, D), dtype=value_rows.dtype)   # the output row being summed
        rows = np.empty(4 * P, dtype=np.int64)           # the corner table, (4*L*K,)
        weights = np.empty(4 * P, dtype=value_rows.dtype)
        fracs = np.empty((P, 2), dtype=value_rows.dtype)
        for q in range(Lq):
            for m in range(first, first + G):       # the heads of one query: adjacent rows
                qi = (n * Lq + q) * M + m            # row of (n, q, m) in loc/attn/out
                _corners(loc_rows, attn_rows, qi, spatial_shapes, sizes, level_start_index,
                         n * sn + m * sm, ss, half, one, rows, weights, fracs)
                acc[0, :] = zero
                for c in range(4 * P):
                    if rows[c] >= 0:
                        _axpy(acc, 0, weights[c], value_rows, rows[c])
                out_rows[qi, :] = acc[0, :]


# --------------------------------------------------------------------------- backward
@njit(parallel=True, cache=True)
def _backward_kernel(grad_rows, value_rows, strides, N, M, groups, Lq, spatial_shapes, sizes,
                     level_start_index, loc_rows, attn_rows, zero, half, one,
                     grad_value_rows, grad_loc_rows, grad_attn_rows):
    """Gradients of :func:`_forward_kernel` (derivation: :func:`.reference.backward`).

    Per point, with g = dL/d out[n, q, m, :], a its attention weight and v_c its
    neighbours: p_c = g . v_c;  dL/da = sum_c w_c p_c;  dL/dv_c += a w_c g;
    dL/dx = a W_l sum_c (dw_c/dw_im) p_c;  dL/dy = a H_l sum_c (dw_c/dh_im) p_c.
    """
    L = spatial_shapes.shape[0]
    K = attn_rows.shape[1] // L
    P = L * K
    sn, sm, ss = strides
    G = M // groups
    for task in prange(N * groups):                 # a task owns its heads' rows: no races
        n, first = task // groups, (task % groups) * G
        rows = np.empty(4 * P, dtype=np.int64)
        weights = np.empty(4 * P, dtype=value_rows.dtype)
        fracs = np.empty((P, 2), dtype=value_rows.dtype)
        dots = np.empty(4 * P, dtype=value_rows.dtype)   # p_c = g . v_c, 0 outside
        for q in range(Lq):
            for m in range(first, first + G):
                qi = (n * Lq + q) * M + m
                _corners(loc_rows, attn_rows, qi, spatial_shapes, sizes, level_start_index,
                         n * sn + m * sm, ss, half, one, rows, weights, fracs)
                for c in range(4 * P):
                    r = rows[c]
                    if r < 0:
                        dots[c] = zero
                        continue
                    dots[c] = _dot(grad_rows, qi, value_rows, r, zero)
                    _axpy(grad_value_rows, r, weights[c], grad_rows, qi)   # own rows only
                for l in range(L):
                    for k in range(K):
                        p = l * K + k
                        c = 4 * p
                        if rows[c] < 0 and rows[c + 1] < 0 and rows[c + 2] < 0 and rows[c + 3] < 0:
                            continue   # skipped (a kept point has a neighbour inside): gradients 0
                        lh, lw = fracs[p, 0], fracs[p, 1]
                        hh = one - lh
                        hw = one - lw
                        a = attn_rows[qi, p]
                        p00, p01, p10, p11 = dots[c], dots[c + 1], dots[c + 2], dots[c + 3]
                        grad_attn_rows[qi, p] = (hh * hw * p00 + hh * lw * p01
                                                 + lh * hw * p10 + lh * lw * p11)
                        # dw_c/dw_im = (-hh, +hh, -lh, +lh), dw_c/dh_im = (-hw, -lw, +hw, +lw)
                        grad_loc_rows[qi, 2 * p] = a * sizes[l, 1] * (hh * (p01 - p00)
                                                                      + lh * (p11 - p10))
                        grad_loc_rows[qi, 2 * p + 1] = a * sizes[l, 0] * (hw * (p10 - p00)
                                                                          + lw * (p11 - p01))


# --------------------------------------------------------------------------- the API
SERIAL_BELOW = 16384      # sampling points N*Lq*M*L*K under which one thread is faster


@contextmanager
def _threads_for(sampling_locations):
    """Run the enclosed kernels on one thread when the problem is small.

    ``numba.set_num_threads`` is thread-local, so this affects only the calling thread,
    and the previous setting is restored.
    """
    points = sampling_locations.size // 2
    if points >= SERIAL_BELOW:
        yield
        return
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def head_groups(N: int, M: int, threads: int) -> int:
    """Into how many groups to split each image's M heads: N * groups parallel tasks.

    The fewest groups (so the longest runs of neighbouring rows per query) that give the
    busiest thread the smallest share of the tasks, ceil(tasks / threads) / tasks. Only
    divisors of M, so that every task has as many heads. With N >= threads (training:
    2 images on 2 threads) that is one group of all M heads; with N = 1 on 2 threads, two
    groups of M/2 heads; on 16 threads, N = 2 images, M = 8: eight groups of one head.
    """
    best, best_share = M, 1.0
    for groups in range(M, 0, -1):           # from the most groups to the fewest
        if M % groups:
            continue
        tasks = N * groups
        share = -(-tasks // threads) / tasks
        if share <= best_share:
            best, best_share = groups, share
    return best


def use_head_major(value, sampling_locations) -> bool:
    """Copy the value head-major only when it pays: at least one point per value row.

    The encoder (Lq = S, L*K = 16 points per query and head) reads every row about 16
    times, and a contiguous map per head makes those reads cache friendly. The decoder
    (Lq = 300) touches a few thousand of the S*N*M rows, and copying all of them would
    cost more than the scattered reads.
    """
    _, S, _, _ = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    return Lq * L * K >= S


def _prepare(value, spatial_shapes, sampling_locations, attention_weights, head_major):
    """What both kernels take: the value as rows with their strides, 2-d views, constants.

    Returns ``(value_rows, strides, sizes, loc_rows, attn_rows, zero, half, one)``.
    ``strides = (sn, sm, ss)`` locate the value row of (n, m, s) at n*sn + m*sm + s*ss:
    (M*S, S, 1) head-major, (S*M, 1, M) in the input's (N, S, M, D) layout. The level
    sizes (H_l, W_l) and the constants 0, 0.5, 1 are in the data's dtype: Numba types a
    bare Python literal as int64/float64 and would promote float32 arithmetic with it.
    """
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    if head_major:
        value_hm = np.empty((N, M, S, D), dtype=value.dtype)
        _to_head_major(value, value_hm)                              # (N, M, S, D)
        value_rows, strides = value_hm.reshape(N * M * S, D), (M * S, S, 1)
    else:
        value_rows, strides = value.reshape(N * S * M, D), (S * M, 1, M)
    t = value.dtype.type
    return (value_rows, strides,                                     # (N*M*S, D) or (N*S*M, D)
            spatial_shapes.astype(value.dtype),                      # (L, 2) (H_l, W_l)
            sampling_locations.reshape(N * Lq * M, L * K * 2),       # (N*Lq*M, L*K*2)
            attention_weights.reshape(N * Lq * M, L * K),            # (N*Lq*M, L*K)
            t(0), t(0.5), t(1))


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            head_major=None, groups=None):
    """Eq. (3) on validated arrays (see :mod:`minidetr.ops.msda`); returns (N, Lq, M * D).

    ``head_major``: copy the value head-major first (None: :func:`use_head_major`).
    ``groups``: head groups per image, a divisor of M (None: :func:`head_groups` for the
    threads at hand). Neither changes the result, only the speed.
    """
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if head_major is None:
        head_major = use_head_major(value, sampling_locations)
    out = np.empty((N, Lq, M * D), dtype=value.dtype)
    with _threads_for(sampling_locations):
        value_rows, strides, sizes, loc_rows, attn_rows, zero, half, one = _prepare(
            value, spatial_shapes, sampling_locations, attention_weights, head_major)
        groups = groups or head_groups(N, M, numba.get_num_threads())
        _forward_kernel(value_rows, strides, N, M, groups, Lq, spatial_shapes, sizes,
                        level_start_index, loc_rows, attn_rows, zero, half, one,
                        out.reshape(N * Lq * M, D))                  # rows (N*Lq*M, D)
    return out


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, head_major=None, groups=None):
    """(grad_value, grad_sampling_locations, grad_attention_weights) on validated arrays.

    ``head_major`` and ``groups`` as in :func:`forward`: speed only, the same bits.
    """
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    if head_major is None:
        head_major = use_head_major(value, sampling_locations)
    with _threads_for(sampling_locations):
        value_rows, strides, sizes, loc_rows, attn_rows, zero, half, one = _prepare(
            value, spatial_shapes, sampling_locations, attention_weights, head_major)
        grad_value_rows = np.zeros_like(value_rows)                 # same layout as value_rows
        grad_loc = np.zeros_like(sampling_locations)                # skipped points keep 0
        grad_attn = np.zeros_like(attention_weights)
        groups = groups or head_groups(N, M, numba.get_num_threads())
        _backward_kernel(grad_output.reshape(N * Lq * M, D),        # rows (N*Lq*M, D)
                         value_rows, strides, N, M, groups, Lq, spatial_shapes, sizes,
                         level_start_index, loc_rows, attn_rows, zero, half, one,
                         grad_value_rows, grad_loc.reshape(loc_rows.shape),
                         grad_attn.reshape(attn_rows.shape))
        if not head_major:
            return grad_value_rows.reshape(N, S, M, D), grad_loc, grad_attn
        grad_value = np.empty_like(value)
        _from_head_major(grad_value_rows.reshape(N, M, S, D), grad_value)   # (N, S, M, D)
    return grad_value, grad_loc, grad_attn
