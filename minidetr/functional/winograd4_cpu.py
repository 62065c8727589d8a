"""Numba CPU kernels of the Winograd F(4x4, 3x3) transforms (the fast path of winograd4.py).

Built like :mod:`.winograd_cpu` (F(2x2)), with 6x6 tiles at stride 4: each kernel makes
one pass over its input, applying the 1-D transform along the rows and then along the
columns, and writes its 36 matrices. The innermost loops run over tile columns v (or
input channels c for the filters), contiguous memory that LLVM turns into SIMD code: an
input plane is first split into its 4 column phases ``ph[k][row, v] = x_pad[row, 4v + k]``,
since tile column v reads padded columns 4v .. 4v+5 = phases 0..3 at v and phases 0, 1 at
v + 1. The 1-D transforms are written out (:func:`_bt`, :func:`_b`, :func:`_at`, :func:`_a`,
:func:`_g`, :func:`_gt`), entries 0, +-1, +-2, +-4, +-5, +-8 and the filter's 1/4, 1/6,
1/12, 1/24. Same names and signatures as the reference (:func:`transforms`), same numbers
up to the order of the additions (float rounding).

Padding: the phase copies of an input plane have zero borders (the convolution's padding,
plus zeros up to whole tiles), so the tile loops have no bounds checks; the output
transforms work on whole tiles, and their wrappers cut (or pad) other sizes. Tiles and
T-order as in :mod:`.winograd4`: t = (n, u, v).

Threads: the channels (filters for the filter transforms) are cut into one block per
thread (:func:`._parallel.run_ranges`); kernels are ``nogil`` so the blocks run at once.
Compilation: on first use, once per dtype, cached on disk.

Measured (2 threads, float32, ms, F(4x4) against F(2x2)'s kernels at the same shape):
ResNet-18's ``layer2`` at 2 x 256 x 256, x (2, 128, 32, 32): input transform 0.8 against
0.5-0.7, its adjoint 0.7-0.8 against 0.4-0.7, output transform and adjoint 0.2-0.4 both, the
products 1.8 against 3.1-3.9. The loops over all tiles of a plane (rather than per tile row,
``tw`` = 8 tiles: too short for SIMD) made the input transform 2x faster (1.6 -> 0.8) and the
output adjoint 2.5x (1.0 -> 0.4).
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .winograd_cpu import wrap_kernels


# --------------------------------------------------------------------------- 1-D transforms
@njit(inline="always")
def _bt(d0, d1, d2, d3, d4, d5):
    """B^T d for a 6-vector d (input transform)."""
    return (4 * d0 - 5 * d2 + d4,
            d3 + d4 - 4 * (d1 + d2),
            4 * (d1 - d2) + d4 - d3,
            2 * (d3 - d1) + d4 - d2,
            2 * (d1 - d3) + d4 - d2,
            4 * d1 - 5 * d3 + d5)


@njit(inline="always")
def _b(v0, v1, v2, v3, v4, v5):
    """B v for a 6-vector v (adjoint of the input transform)."""
    return (4 * v0,
            4 * (v2 - v1 + v5) + 2 * (v4 - v3),
            -5 * v0 - 4 * (v1 + v2) - v3 - v4,
            v1 - v2 + 2 * (v3 - v4) - 5 * v5,
            v0 + v1 + v2 + v3 + v4,
            v5)


@njit(inline="always")
def _at(m0, m1, m2, m3, m4, m5):
    """A^T m for a 6-vector m (output transform): 4 outputs."""
    s, d = m1 + m2, m1 - m2
    s2, d2 = m3 + m4, m3 - m4
    return m0 + s + s2, d + 2 * d2, s + 4 * s2, d + 8 * d2 + m5


@njit(inline="always")
def _a(g0, g1, g2, g3):
    """A g for a 4-vector g (adjoint of the output transform): 6 outputs."""
    e, o = g0 + g2, g1 + g3
    e4, o2 = g0 + 4 * g2, 2 * g1 + 8 * g3
    return g0, e + o, e - o, e4 + o2, e4 - o2, g3


@njit(inline="always")
def _g(w0, w1, w2, c4, c6, c12, c24):
    """G w for a 3-vector w (filter transform): 6 outputs; c4 .. c24 = 1/4 .. 1/24."""
    s = w0 + w2
    return (w0 * c4, -(s + w1) * c6, (w1 - s) * c6,
            w0 * c24 + w1 * c12 + w2 * c6, w0 * c24 - w1 * c12 + w2 * c6, w2)


@njit(inline="always")
def _gt(u0, u1, u2, u3, u4, u5, c4, c6, c12, c24):
    """G^T u for a 6-vector u (adjoint of the filter transform): 3 outputs."""
    s12, d12 = u1 + u2, u2 - u1
    s34, d34 = u3 + u4, u3 - u4
    return (u0 * c4 - s12 * c6 + s34 * c24,
            d12 * c6 + d34 * c12,
            (s34 - s12) * c6 + u5)


# --------------------------------------------------------------------------- kernels
@njit(nogil=True, cache=True)
def _input_transform(x, c0, c1, V):
    """V[6a + b, c, t] = (B^T d_t B)[a, b] for channels c0..c1-1.

    x (N, C, H, W) C-contiguous; V (36, C, T), T = N * th * tw.

    Per (n, c) plane: the padded plane is split into its phases mod 4 on a grid of tiles,
    ``ph[kr, kc, j] = x_pad[4 ur + kr, 4 vc + kc]`` at j = ur tw + vc (x pixel (i, j') is
    padded (i + 1, j' + 1)), with the next tile column's first two columns beside them,
    ``nx[kr, kc, j] = x_pad[4 ur + kr, 4 (vc + 1) + kc]`` (kc = 0, 1): tile (u, v), j = u tw + v,
    reads ph[0..3, 0..3, j], nx[0..3, 0..1, j] and the next tile row's kr = 0, 1 at j + tw.
    So both passes -- B^T along the width into ``E[kr, b, j]``, then along the height
    straight into V -- are single loops over all tiles j of the plane, contiguous and long
    enough for SIMD even with few tiles per row (``tw`` = 8 at ResNet's layer2).
    """
    N, C, H, W = x.shape
    th, tw = (H + 3) // 4, (W + 3) // 4
    T1 = th * tw
    L = T1 + tw                                   # one more tile row: rows 4 th, 4 th + 1
    ph = np.zeros((4, 4, L), x.dtype)             # padding stays zero
    nx = np.zeros((4, 2, L), x.dtype)
    E = np.empty((4, 6, L), x.dtype)              # E[kr, b, j] = (B^T row kr of tile j)[b]
    for n in range(N):
        t0 = n * T1
        for c in range(c0, c1):
            for i in range(H):                    # x row i is padded row i + 1 = 4 ur + kr
                kr, r0 = (i + 1) % 4, ((i + 1) // 4) * tw
                for kc in range(4):               # padded column 4 vc + kc = x column 4 vc + kc - 1
                    for vc in range(1 if kc == 0 else 0, min(tw, (W - kc + 4) // 4)):
                        ph[kr, kc, r0 + vc] = x[n, c, i, 4 * vc + kc - 1]
                for kc in range(2):               # padded column 4 (vc + 1) + kc
                    for vc in range((W - kc) // 4):
                        nx[kr, kc, r0 + vc] = x[n, c, i, 4 * vc + kc + 3]
            for kr in range(4):
                for j in range(L):
                    e0, e1, e2, e3, e4, e5 = _bt(ph[kr, 0, j], ph[kr, 1, j], ph[kr, 2, j],
                                                 ph[kr, 3, j], nx[kr, 0, j], nx[kr, 1, j])
                    E[kr, 0, j] = e0
                    E[kr, 1, j] = e1
                    E[kr, 2, j] = e2
                    E[kr, 3, j] = e3
                    E[kr, 4, j] = e4
                    E[kr, 5, j] = e5
            for b in range(6):
                for j in range(T1):
                    f0, f1, f2, f3, f4, f5 = _bt(E[0, b, j], E[1, b, j], E[2, b, j], E[3, b, j],
                                                 E[0, b, j + tw], E[1, b, j + tw])
                    V[b, c, t0 + j] = f0
                    V[6 + b, c, t0 + j] = f1
                    V[12 + b, c, t0 + j] = f2
                    V[18 + b, c, t0 + j] = f3
                    V[24 + b, c, t0 + j] = f4
                    V[30 + b, c, t0 + j] = f5


@njit(nogil=True, cache=True)
def _input_transform_adjoint(dV, c0, c1, dx):
    """dx[n, c] = sum over tiles of B dV_t B^T, added at the tile's 6x6 block (c0..c1-1).

    dV (36, C, T); dx (N, C, H, W).

    The reverse of :func:`_input_transform`, on the same grid (j = ur tw + vc): B along the
    height gives tile j's rows 0..3 at j and its rows 4, 5 at j + tw (the next tile row's
    kr = 0, 1, where they add: through ``F45`` so that every loop over j is free of
    dependences); B along the width gives columns 0..3 (``D``, like ph) and 4, 5 (``Dn``,
    like nx); a padded column 4 vc + kc (kc = 0, 1) collects D at vc and Dn at vc - 1.
    """
    N, C, H, W = dx.shape
    th, tw = (H + 3) // 4, (W + 3) // 4
    T1 = th * tw
    L = T1 + tw
    F = np.empty((4, 6, L), dx.dtype)             # F[kr, b, j]
    F45 = np.empty((2, 6, T1), dx.dtype)          # tile rows 4, 5: add at j + tw
    D = np.empty((4, 4, L), dx.dtype)             # the gradient of ph
    Dn = np.empty((4, 2, L), dx.dtype)            # the gradient of nx
    for n in range(N):
        t0 = n * T1
        for c in range(c0, c1):
            for b in range(6):
                for j in range(T1):
                    f0, f1, f2, f3, f4, f5 = _b(dV[b, c, t0 + j], dV[6 + b, c, t0 + j],
                                                dV[12 + b, c, t0 + j], dV[18 + b, c, t0 + j],
                                                dV[24 + b, c, t0 + j], dV[30 + b, c, t0 + j])
                    F[0, b, j] = f0
                    F[1, b, j] = f1
                    F[2, b, j] = f2
                    F[3, b, j] = f3
                    F45[0, b, j] = f4
                    F45[1, b, j] = f5
                for kr in range(4):
                    for j in range(T1, L):
                        F[kr, b, j] = 0
                for kr in range(2):
                    for j in range(T1):
                        F[kr, b, j + tw] += F45[kr, b, j]
            for kr in range(4):
                for j in range(L):
                    h0, h1, h2, h3, h4, h5 = _b(F[kr, 0, j], F[kr, 1, j], F[kr, 2, j],
                                                F[kr, 3, j], F[kr, 4, j], F[kr, 5, j])
                    D[kr, 0, j] = h0
                    D[kr, 1, j] = h1
                    D[kr, 2, j] = h2
                    D[kr, 3, j] = h3
                    Dn[kr, 0, j] = h4
                    Dn[kr, 1, j] = h5
            for i in range(H):                    # x row i is padded row i + 1 = 4 ur + kr
                kr, r0 = (i + 1) % 4, ((i + 1) // 4) * tw
                for vc in range(1, (W + 4) // 4):      # x column 4 vc - 1: padded 4 vc
                    s = Dn[kr, 0, r0 + vc - 1]
                    dx[n, c, i, 4 * vc - 1] = s + D[kr, 0, r0 + vc] if vc < tw else s
                for vc in range((W + 3) // 4):          # x column 4 vc: padded 4 vc + 1
                    s = D[kr, 1, r0 + vc]
                    dx[n, c, i, 4 * vc] = s + Dn[kr, 1, r0 + vc - 1] if vc > 0 else s
                for vc in range((W + 2) // 4):          # x column 4 vc + 1: padded 4 vc + 2
                    dx[n, c, i, 4 * vc + 1] = D[kr, 2, r0 + vc]
                for vc in range((W + 1) // 4):          # x column 4 vc + 2: padded 4 vc + 3
                    dx[n, c, i, 4 * vc + 2] = D[kr, 3, r0 + vc]


@njit(nogil=True, cache=True)
def _output_transform(M, o0, o1, y):
    """y[n, o, 4u:4u+4, 4v:4v+4] = A^T m_t A for filters o0..o1-1.

    M (36, C_out, T); y (N, C_out, 4 th, 4 tw): whole tiles (the wrapper cuts the rest).
    Per (n, o): A^T along a into ``P[p, b, j]``, then along b into ``Y[p, q, j]``, both
    loops over all tiles j = u tw + v of the image (contiguous, SIMD); then ``Y`` is
    interleaved into y (pixel (4u + p, 4v + q)).
    """
    N, C_out, H4, W4 = y.shape
    th, tw = H4 // 4, W4 // 4
    T1 = th * tw
    P = np.empty((4, 6, T1), y.dtype)
    Y = np.empty((4, 4, T1), y.dtype)
    for o in range(o0, o1):
        for n in range(N):
            t0 = n * T1
            for b in range(6):
                for j in range(T1):
                    p0, p1, p2, p3 = _at(M[b, o, t0 + j], M[6 + b, o, t0 + j],
                                         M[12 + b, o, t0 + j], M[18 + b, o, t0 + j],
                                         M[24 + b, o, t0 + j], M[30 + b, o, t0 + j])
                    P[0, b, j] = p0
                    P[1, b, j] = p1
                    P[2, b, j] = p2
                    P[3, b, j] = p3
            for p in range(4):
                for j in range(T1):
                    q0, q1, q2, q3 = _at(P[p, 0, j], P[p, 1, j], P[p, 2, j], P[p, 3, j],
                                         P[p, 4, j], P[p, 5, j])
                    Y[p, 0, j] = q0
                    Y[p, 1, j] = q1
                    Y[p, 2, j] = q2
                    Y[p, 3, j] = q3
            for u in range(th):
                for p in range(4):
                    for v in range(tw):
                        for q in range(4):
                            y[n, o, 4 * u + p, 4 * v + q] = Y[p, q, u * tw + v]


@njit(nogil=True, cache=True)
def _output_transform_adjoint(g, o0, o1, Gy):
    """Gy[6a + b, o, t] = (A g_t A^T)[a, b] for filters o0..o1-1, g_t the tile's 4x4
    block of the gradient.

    g (N, C_out, 4 th, 4 tw): whole tiles (the wrapper pads other sizes); Gy (36, C_out, T).
    Per (n, o): the plane is split into its 16 phases ``gp[p, q, j] = g[4u + p, 4v + q]``,
    j = u tw + v; then A along p into ``S[q, a, j]`` and along q into Gy, loops over all
    tiles j of the image (contiguous, SIMD).
    """
    N, C_out, H4, W4 = g.shape
    th, tw = H4 // 4, W4 // 4
    T1 = th * tw
    gp = np.empty((4, 4, T1), g.dtype)
    S = np.empty((4, 6, T1), g.dtype)
    for o in range(o0, o1):
        for n in range(N):
            t0 = n * T1
            for u in range(th):
                for p in range(4):
                    for v in range(tw):
                        for q in range(4):
                            gp[p, q, u * tw + v] = g[n, o, 4 * u + p, 4 * v + q]
            for q in range(4):
                for j in range(T1):
                    s0, s1, s2, s3, s4, s5 = _a(gp[0, q, j], gp[1, q, j], gp[2, q, j], gp[3, q, j])
                    S[q, 0, j] = s0
                    S[q, 1, j] = s1
                    S[q, 2, j] = s2
                    S[q, 3, j] = s3
                    S[q, 4, j] = s4
                    S[q, 5, j] = s5
            for a in range(6):
                for j in range(T1):
                    k0, k1, k2, k3, k4, k5 = _a(S[0, a, j], S[1, a, j], S[2, a, j], S[3, a, j])
                    Gy[6 * a, o, t0 + j] = k0
                    Gy[6 * a + 1, o, t0 + j] = k1
                    Gy[6 * a + 2, o, t0 + j] = k2
                    Gy[6 * a + 3, o, t0 + j] = k3
                    Gy[6 * a + 4, o, t0 + j] = k4
                    Gy[6 * a + 5, o, t0 + j] = k5


@njit(nogil=True, cache=True)
def _filter_transform(w, o0, o1, U):
    """U[6a + b, o, c] = (G w[o, c] G^T)[a, b] for filters o0..o1-1.

    w (C_out, C_in, 3, 3); U (36, C_out, C_in). Per o, the filters are first copied
    tap-major into ``g`` (9, C_in), so that both passes (G along the width into ``q``,
    then along the height) run contiguous in c.
    """
    C_in = w.shape[1]
    g = np.empty((9, C_in), w.dtype)
    q = np.empty((18, C_in), w.dtype)             # q[6i + b, c] = (G w[o, c, i, :])[b]
    one = w.dtype.type(1)
    c4, c6, c12, c24 = one / 4, one / 6, one / 12, one / 24
    for o in range(o0, o1):
        for c in range(C_in):
            for k in range(9):
                g[k, c] = w[o, c, k // 3, k % 3]
        for i in range(3):
            for c in range(C_in):
                r0, r1, r2, r3, r4, r5 = _g(g[3 * i, c], g[3 * i + 1, c], g[3 * i + 2, c],
                                            c4, c6, c12, c24)
                q[6 * i, c] = r0
                q[6 * i + 1, c] = r1
                q[6 * i + 2, c] = r2
                q[6 * i + 3, c] = r3
                q[6 * i + 4, c] = r4
                q[6 * i + 5, c] = r5
        for b in range(6):
            for c in range(C_in):
                r0, r1, r2, r3, r4, r5 = _g(q[b, c], q[6 + b, c], q[12 + b, c], c4, c6, c12, c24)
                U[b, o, c] = r0
                U[6 + b, o, c] = r1
                U[12 + b, o, c] = r2
                U[18 + b, o, c] = r3
                U[24 + b, o, c] = r4
                U[30 + b, o, c] = r5


@njit(nogil=True, cache=True)
def _filter_transform_adjoint(dU, o0, o1, dw):
    """dw[o, c] = G^T dU[:, o, c] G (3x3) for filters o0..o1-1.

    dU (36, C_out, C_in); dw (C_out, C_in, 3, 3). The reverse of
    :func:`_filter_transform`: G^T along a into ``q``, along b into ``g`` (9, C_in), then
    copied out filter by filter.
    """
    C_in = dw.shape[1]
    g = np.empty((9, C_in), dw.dtype)
    q = np.empty((18, C_in), dw.dtype)            # q[6i + b, c] = (G^T dU[:, b, o, c])[i]
    one = dw.dtype.type(1)
    c4, c6, c12, c24 = one / 4, one / 6, one / 12, one / 24
    for o in range(o0, o1):
        for b in range(6):
            for c in range(C_in):
                s0, s1, s2 = _gt(dU[b, o, c], dU[6 + b, o, c], dU[12 + b, o, c],
                                 dU[18 + b, o, c], dU[24 + b, o, c], dU[30 + b, o, c],
                                 c4, c6, c12, c24)
                q[b, c] = s0
                q[6 + b, c] = s1
                q[12 + b, c] = s2
        for i in range(3):
            for c in range(C_in):
                s0, s1, s2 = _gt(q[6 * i, c], q[6 * i + 1, c], q[6 * i + 2, c], q[6 * i + 3, c],
                                 q[6 * i + 4, c], q[6 * i + 5, c], c4, c6, c12, c24)
                g[3 * i, c] = s0
                g[3 * i + 1, c] = s1
                g[3 * i + 2, c] = s2
        for c in range(C_in):
            for k in range(9):
                dw[o, c, k // 3, k % 3] = g[k, c]


# --------------------------------------------------------------------------- wrappers
_KERNELS = {"filter_transform": _filter_transform,
            "filter_transform_adjoint": _filter_transform_adjoint,
            "input_transform": _input_transform,
            "input_transform_adjoint": _input_transform_adjoint,
            "output_transform": _output_transform,
            "output_transform_adjoint": _output_transform_adjoint}
_TRANSFORMS = wrap_kernels(_KERNELS, 4)        # the same wrappers as F(2x2)'s, m = 4


def transforms():
    """These kernels by name, as :func:`.winograd4.reference_transforms` gives the reference."""
    return dict(_TRANSFORMS)
