"""Numba CPU kernels of the Winograd F(2x2, 3x3) transforms (the fast path of winograd.py).

The NumPy functions of :mod:`.winograd` are the reference: they build every 4x4 tile as a
(N, C, th, tw, 4, 4) array and transform it with ``einsum`` (the filters with one matrix
product), several full-size temporaries per call. Each kernel here makes one pass over
its input, applying the 1-D transform along the rows and then along the columns (the tile
matrices are 0/+1/-1, so only additions; the filter transform has halves), and writes
the results to their 16 matrices. The loops are arranged so that the innermost one runs
over contiguous memory (tile columns v, or input channels c for the filters), which LLVM
turns into SIMD code: an input plane is split into its even and odd columns first, since
tile v starts at column 2v. (A first version that worked tile by tile, 16 scalar loads
and stores each, was 3-5x slower; the reference's Kronecker-product matrix product for
the filters, a BLAS call with an inner dimension of 9, is 2-3x slower.) Same names and
signatures as the reference (:func:`transforms`), same numbers up to the order of the
additions (float rounding).

Padding: the even/odd copies of an input plane have zero borders (the convolution's
padding, plus one more row/column for an odd size), so the tile loops have no bounds
checks; the output transforms work on whole tiles, and their wrappers cut (or pad) an
odd size. Tiles and T-order as in :mod:`.winograd`: t = (n, u, v).

Threads: the channels (filters for the filter transforms) are cut into one block per
thread (:func:`._parallel.run_ranges`); kernels are ``nogil`` so the blocks run at once.
Arrays under 256 KiB are transformed in the calling thread. Compilation: on first use,
once per dtype, cached on disk (measured: 4.9 s for the float32 kernels the first time; a
new process then pays 0.6 s at its first call, mostly Numba's own start-up).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._parallel import run_ranges
from .winograd import TRANSFORMS


# --------------------------------------------------------------------------- 1-D transforms
@njit(inline="always")
def _b(v0, v1, v2, v3):
    """B v for a 4-vector v (adjoint of the input transform)."""
    return v0, v1 - v2 + v3, v1 + v2 - v0, -v3


@njit(inline="always")
def _a(g0, g1):
    """A g for a 2-vector g (adjoint of the output transform): 4 outputs."""
    return g0, g0 + g1, g0 - g1, -g1


# --------------------------------------------------------------------------- kernels
@njit(nogil=True, cache=True)
def _input_transform(x, c0, c1, V):
    """V[4a + b, c, t] = (B^T d_t B)[a, b] for channels c0..c1-1.

    x (N, C, H, W) C-contiguous; V (16, C, T), T = N * th * tw.

    Per (n, c) plane: its padded columns are split into even ``ev[row, v] = x_pad[row, 2v]``
    and odd ``od[row, v] = x_pad[row, 2v + 1]`` ones, so that tile column v reads
    ``ev[v], od[v], ev[v + 1], od[v + 1]``: contiguous in v (SIMD). B^T along the width is
    done once per padded row (``E``), then B^T along the height once per tile row.
    """
    N, C, H, W = x.shape
    th, tw = (H + 1) // 2, (W + 1) // 2
    rows = 2 * th + 2
    ev = np.zeros((rows, tw + 1), x.dtype)       # padding rows/columns stay zero
    od = np.zeros((rows, tw + 1), x.dtype)
    E = np.empty((rows, 4, tw), x.dtype)         # E[row, b, v] = (B^T x_pad[row, 2v:2v+4])[b]
    for n in range(N):
        for c in range(c0, c1):
            for i in range(H):                   # x row i is padded row i + 1
                for v in range(1, W // 2 + 1):
                    ev[i + 1, v] = x[n, c, i, 2 * v - 1]       # padded column 2v
                for v in range((W + 1) // 2):
                    od[i + 1, v] = x[n, c, i, 2 * v]           # padded column 2v + 1
            for row in range(rows):
                for v in range(tw):
                    E[row, 0, v] = ev[row, v] - ev[row, v + 1]
                    E[row, 1, v] = od[row, v] + ev[row, v + 1]
                    E[row, 2, v] = ev[row, v + 1] - od[row, v]
                    E[row, 3, v] = od[row, v] - od[row, v + 1]
            for u in range(th):
                r = 2 * u
                t0 = (n * th + u) * tw
                for b in range(4):
                    for v in range(tw):
                        e1, e2 = E[r + 1, b, v], E[r + 2, b, v]
                        V[b, c, t0 + v] = E[r, b, v] - e2
                        V[4 + b, c, t0 + v] = e1 + e2
                        V[8 + b, c, t0 + v] = e2 - e1
                        V[12 + b, c, t0 + v] = e1 - E[r + 3, b, v]


@njit(nogil=True, cache=True)
def _input_transform_adjoint(dV, c0, c1, dx):
    """dx[n, c] = sum over tiles of B dV_t B^T, added at the tile's 4x4 block (c0..c1-1).

    dV (16, C, T); dx (N, C, H, W).

    The reverse of :func:`_input_transform`: B along the height, summed into ``F[row, b, v]``
    per padded row (tile rows overlap by two rows); then B along the width, where tile
    column v adds ``h0..h3`` to padded columns 2v..2v+3, so padded column 2m collects
    ``h0[m] + h2[m - 1]`` and column 2m + 1 ``h1[m] + h3[m - 1]``.
    """
    N, C, H, W = dx.shape
    th, tw = (H + 1) // 2, (W + 1) // 2
    rows = 2 * th + 2
    F = np.empty((rows, 4, tw), dx.dtype)
    h = np.zeros((4, tw + 1), dx.dtype)          # h[k, v]; column tw stays zero
    for n in range(N):
        for c in range(c0, c1):
            F[:] = 0
            for u in range(th):
                r = 2 * u
                t0 = (n * th + u) * tw
                for b in range(4):
                    for v in range(tw):
                        f0, f1, f2, f3 = _b(dV[b, c, t0 + v], dV[4 + b, c, t0 + v],
                                            dV[8 + b, c, t0 + v], dV[12 + b, c, t0 + v])
                        F[r, b, v] += f0
                        F[r + 1, b, v] += f1
                        F[r + 2, b, v] += f2
                        F[r + 3, b, v] += f3
            for i in range(H):                   # x row i is padded row i + 1
                for v in range(tw):
                    h[0, v], h[1, v], h[2, v], h[3, v] = _b(F[i + 1, 0, v], F[i + 1, 1, v],
                                                            F[i + 1, 2, v], F[i + 1, 3, v])
                # x column 2m is padded column 2m + 1; x column 2m + 1 is padded 2m + 2.
                dx[n, c, i, 0] = h[1, 0]
                for m in range(1, (W + 1) // 2):
                    dx[n, c, i, 2 * m] = h[1, m] + h[3, m - 1]
                for m in range(W // 2):
                    dx[n, c, i, 2 * m + 1] = h[0, m + 1] + h[2, m]


@njit(nogil=True, cache=True)
def _output_transform(M, o0, o1, y):
    """y[n, o, 2u:2u+2, 2v:2v+2] = A^T m_t A for filters o0..o1-1.

    M (16, C_out, T); y (N, C_out, 2 th, 2 tw): even sizes (the wrapper cuts odd ones).
    Per tile row: A^T along a into ``P[p, b, v]`` (contiguous in v), then along b.
    """
    N, C_out, H2, W2 = y.shape
    th, tw = H2 // 2, W2 // 2
    P = np.empty((2, 4, tw), y.dtype)
    for o in range(o0, o1):
        for n in range(N):
            for u in range(th):
                t0 = (n * th + u) * tw
                for b in range(4):
                    for v in range(tw):
                        m1, m2 = M[4 + b, o, t0 + v], M[8 + b, o, t0 + v]
                        P[0, b, v] = M[b, o, t0 + v] + m1 + m2
                        P[1, b, v] = m1 - m2 - M[12 + b, o, t0 + v]
                for p in range(2):
                    for v in range(tw):
                        y[n, o, 2 * u + p, 2 * v] = P[p, 0, v] + P[p, 1, v] + P[p, 2, v]
                        y[n, o, 2 * u + p, 2 * v + 1] = P[p, 1, v] - P[p, 2, v] - P[p, 3, v]


@njit(nogil=True, cache=True)
def _output_transform_adjoint(g, o0, o1, Gy):
    """Gy[4a + b, o, t] = (A g_t A^T)[a, b] for filters o0..o1-1, g_t the tile's 2x2
    block of the gradient.

    g (N, C_out, 2 th, 2 tw): even sizes (the wrapper pads odd ones); Gy (16, C_out, T).
    Per tile row: A along the two rows into ``S[a, v]`` for the even (``Se``) and odd
    (``So``) columns, then A along the width, all contiguous in v.
    """
    N, C_out, H2, W2 = g.shape
    th, tw = H2 // 2, W2 // 2
    Se = np.empty((4, tw), g.dtype)
    So = np.empty((4, tw), g.dtype)
    for o in range(o0, o1):
        for n in range(N):
            for u in range(th):
                r = 2 * u
                t0 = (n * th + u) * tw
                for v in range(tw):
                    Se[0, v], Se[1, v], Se[2, v], Se[3, v] = _a(g[n, o, r, 2 * v],
                                                                g[n, o, r + 1, 2 * v])
                    So[0, v], So[1, v], So[2, v], So[3, v] = _a(g[n, o, r, 2 * v + 1],
                                                                g[n, o, r + 1, 2 * v + 1])
                for a in range(4):
                    for v in range(tw):
                        e, d = Se[a, v], So[a, v]
                        Gy[4 * a, o, t0 + v] = e
                        Gy[4 * a + 1, o, t0 + v] = e + d
                        Gy[4 * a + 2, o, t0 + v] = e - d
                        Gy[4 * a + 3, o, t0 + v] = -d


@njit(nogil=True, cache=True)
def _filter_transform(w, o0, o1, U):
    """U[4a + b, o, c] = (G w[o, c] G^T)[a, b] for filters o0..o1-1.

    w (C_out, C_in, 3, 3); U (16, C_out, C_in). Per o, the filters are first copied
    tap-major into ``g`` (9, C_in), so that both passes (G along the width into ``q``,
    then along the height) run contiguous in c.
    """
    C_in = w.shape[1]
    g = np.empty((9, C_in), w.dtype)
    q = np.empty((12, C_in), w.dtype)            # q[4i + b, c] = (G w[o, c, i, :])[b]
    half = w.dtype.type(0.5)
    for o in range(o0, o1):
        for c in range(C_in):
            for k in range(9):
                g[k, c] = w[o, c, k // 3, k % 3]
        for i in range(3):
            for c in range(C_in):
                w0, w1, w2 = g[3 * i, c], g[3 * i + 1, c], g[3 * i + 2, c]
                q[4 * i, c] = w0
                q[4 * i + 1, c] = (w0 + w1 + w2) * half
                q[4 * i + 2, c] = (w0 - w1 + w2) * half
                q[4 * i + 3, c] = w2
        for b in range(4):
            for c in range(C_in):
                w0, w1, w2 = q[b, c], q[4 + b, c], q[8 + b, c]
                U[b, o, c] = w0
                U[4 + b, o, c] = (w0 + w1 + w2) * half
                U[8 + b, o, c] = (w0 - w1 + w2) * half
                U[12 + b, o, c] = w2


@njit(nogil=True, cache=True)
def _filter_transform_adjoint(dU, o0, o1, dw):
    """dw[o, c] = G^T dU[:, o, c] G (3x3) for filters o0..o1-1.

    dU (16, C_out, C_in); dw (C_out, C_in, 3, 3). The reverse of
    :func:`_filter_transform`: G^T along a into ``q``, along b into ``g`` (9, C_in), then
    copied out filter by filter.
    """
    C_in = dw.shape[1]
    g = np.empty((9, C_in), dw.dtype)
    q = np.empty((12, C_in), dw.dtype)           # q[4i + b, c] = (G^T dU[:, b, o, c])[i]
    half = dw.dtype.type(0.5)
    for o in range(o0, o1):
        for b in range(4):
            for c in range(C_in):
                u0, u1, u2, u3 = dU[b, o, c], dU[4 + b, o, c], dU[8 + b, o, c], dU[12 + b, o, c]
                q[b, c] = u0 + (u1 + u2) * half
                q[4 + b, c] = (u1 - u2) * half
                q[8 + b, c] = (u1 + u2) * half + u3
        for i in range(3):
            for c in range(C_in):
                u0, u1, u2, u3 = q[4 * i, c], q[4 * i + 1, c], q[4 * i + 2, c], q[4 * i + 3, c]
                g[3 * i, c] = u0 + (u1 + u2) * half
                g[3 * i + 1, c] = (u1 - u2) * half
                g[3 * i + 2, c] = (u1 + u2) * half + u3
        for c in range(C_in):
            for k in range(9):
                dw[o, c, k // 3, k % 3] = g[k, c]


# --------------------------------------------------------------------------- wrappers
def wrap_kernels(kernels, m):
    """The six transforms of F(m x m, 3x3) around their Numba kernels, by name.

    ``kernels``: ``{name: kernel}`` for the names of ``TRANSFORMS``; each kernel treats the
    channels (filters) ``lo .. hi-1`` of its input and writes into an output made here.
    Returns ``{name: function}`` with the reference's signatures (:mod:`.winograd`):
    the outputs are allocated, the inputs made contiguous, odd sizes padded or cut to
    whole tiles of m x m outputs, and the channels cut into one block per thread
    (:func:`._parallel.run_ranges`). Shared by F(2x2) (this module) and F(4x4)
    (:mod:`.winograd4_cpu`), whose kernels differ and whose wrappers differ only in m.
    """
    positions = (m + 2) ** 2                                  # 16 for F(2x2), 36 for F(4x4)

    def whole(size):                                          # rounded up to whole tiles
        return -(-size // m) * m

    def tiles(H, W):
        return (whole(H) // m) * (whole(W) // m)

    def filter_transform(weight):
        """weight (C_out, C_in, 3, 3) -> U (P, C_out, C_in), P = (m + 2)^2."""
        weight = np.ascontiguousarray(weight)
        U = np.empty((positions,) + weight.shape[:2], dtype=weight.dtype)
        run_ranges(lambda lo, hi: kernels["filter_transform"](weight, lo, hi, U),
                   weight.shape[0], U.nbytes)
        return U

    def filter_transform_adjoint(dU):
        """dU (P, C_out, C_in) -> (C_out, C_in, 3, 3)."""
        dU = np.ascontiguousarray(dU)
        dw = np.empty(dU.shape[1:] + (3, 3), dtype=dU.dtype)
        run_ranges(lambda lo, hi: kernels["filter_transform_adjoint"](dU, lo, hi, dw),
                   dU.shape[1], dU.nbytes)
        return dw

    def input_transform(x):
        """x (N, C, H, W) -> V (P, C, T)."""
        x = np.ascontiguousarray(x)
        N, C, H, W = x.shape
        V = np.empty((positions, C, N * tiles(H, W)), dtype=x.dtype)
        run_ranges(lambda lo, hi: kernels["input_transform"](x, lo, hi, V), C, V.nbytes)
        return V

    def input_transform_adjoint(dV, x_shape):
        """dV (P, C, T) -> dL/dx (N, C, H, W)."""
        dV = np.ascontiguousarray(dV)
        dx = np.empty(tuple(x_shape), dtype=dV.dtype)
        run_ranges(lambda lo, hi: kernels["input_transform_adjoint"](dV, lo, hi, dx),
                   x_shape[1], dV.nbytes)
        return dx

    def output_transform(M, out_shape):
        """M (P, C_out, T) -> y (N, C_out, H, W)."""
        M = np.ascontiguousarray(M)
        N, C_out, H, W = out_shape
        y = np.empty((N, C_out, whole(H), whole(W)), dtype=M.dtype)     # whole tiles
        run_ranges(lambda lo, hi: kernels["output_transform"](M, lo, hi, y), C_out,
                   M.nbytes)
        return y if (H, W) == y.shape[2:] else np.ascontiguousarray(y[:, :, :H, :W])

    def output_transform_adjoint(grad):
        """dL/dy (N, C_out, H, W) -> Gy (P, C_out, T)."""
        N, C_out, H, W = grad.shape
        if (H, W) != (whole(H), whole(W)):                    # whole tiles: pad with zeros
            padded = np.zeros((N, C_out, whole(H), whole(W)), dtype=grad.dtype)
            padded[:, :, :H, :W] = grad
            grad = padded
        grad = np.ascontiguousarray(grad)
        Gy = np.empty((positions, C_out, N * tiles(H, W)), dtype=grad.dtype)
        run_ranges(lambda lo, hi: kernels["output_transform_adjoint"](grad, lo, hi, Gy),
                   C_out, Gy.nbytes)
        return Gy

    made = locals()
    return {name: made[name] for name in TRANSFORMS}


_KERNELS = {"filter_transform": _filter_transform,
            "filter_transform_adjoint": _filter_transform_adjoint,
            "input_transform": _input_transform,
            "input_transform_adjoint": _input_transform_adjoint,
            "output_transform": _output_transform,
            "output_transform_adjoint": _output_transform_adjoint}
_TRANSFORMS = wrap_kernels(_KERNELS, 2)


def transforms():
    """These kernels by name, as :func:`.winograd.reference_transforms` gives the reference."""
    return dict(_TRANSFORMS)
