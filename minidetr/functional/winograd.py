"""3x3 convolution by Winograd's minimal filtering F(2x2, 3x3), forward and backward.

im2col (:mod:`.conv`) spends 9 multiplications on every output pixel and input channel of
a 3x3 convolution. Winograd's algorithm (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", CVPR 2016) makes a 2x2 block of outputs from a 4x4 block of inputs with
16 multiplications instead of 4 * 9 = 36, so 2.25x fewer, at the price of cheap additions
before and after. With ``d`` a 4x4 input tile and ``g`` a 3x3 filter::

    y (2, 2) = A^T [ (G g G^T) * (B^T d B) ] A         (* elementwise)

    B^T = [[1,  0, -1,  0],     G = [[1,    0,   0],     A^T = [[1, 1,  1,  0],
           [0,  1,  1,  0],          [1/2,  1/2, 1/2],          [0, 1, -1, -1]]
           [0, -1,  1,  0],          [1/2, -1/2, 1/2],
           [0,  1,  0, -1]]          [0,    0,   1]]

which is exactly the 2x2 correlation output ``y[p, q] = sum_ij g[i, j] d[p + i, q + j]``
(multiply it out; docs/autograd.md does). Over channels the elementwise product becomes a
matrix product per position (a, b) of the 4x4 Winograd domain -- that is where the time
goes, and it is 2.25x smaller than im2col's::

    U[ab] (C_out, C_in) = (G g G^T)[a, b]        for every filter (o, c)   filter transform
    V[ab] (C_in, T)     = (B^T d B)[a, b]        for every tile t, channel   input transform
    M[ab] (C_out, T)    = U[ab] @ V[ab]          16 matrix products
    y                   = A^T M A per tile       2x2 outputs per tile          output transform

Tiles: output pixel rows 2u, 2u+1 and columns 2v, 2v+1 form tile (u, v); it reads padded
input rows 2u .. 2u+3 and columns 2v .. 2v+3 (padding 1, stride 1). T = N * th * tw tiles
in the order (n, u, v), th = ceil(H / 2), tw = ceil(W / 2); odd sizes get one more row or
column of zero padding, and the outputs beyond H x W are dropped.

Backward. Every step above is linear, so the gradient runs each one transposed (the
adjoint): with ``Gy`` the output gradient taken into the Winograd domain,

    Gy[ab] (C_out, T) = (A gy A^T)[a, b] per 2x2 tile of dL/dy     output transform, transposed
    dU[ab]            = Gy[ab] @ V[ab]^T                           (C_out, C_in)
    dL/dg             = G^T dU G                                  filter transform, transposed
    dV[ab]            = U[ab]^T @ Gy[ab]                           (C_in, T)
    dL/dx             = sum over tiles of B dV B^T, each added to   input transform, transposed
                        the 4x4 input block it came from (neighbouring tiles overlap)

These are the exact gradients of the forward above, which computes the convolution
exactly in real arithmetic; in floating point the two algorithms round differently (the
tests bound the difference: about 1e-6 relative in float32).

Where it is used. :func:`.conv.conv2d` sends a 3x3, stride 1, padding 1, dilation 1
convolution of NumPy arrays here (``algorithm="auto"``): the 3x3 convolutions of the
ResNet blocks, 85 % of a ResNet-18's convolution work. Anything else, and CuPy arrays, use
im2col. The transforms run as Numba kernels (:mod:`.winograd_cpu`); the NumPy functions
below are their readable reference (and what a CuPy array would use with
``algorithm="winograd"``). Measured (2 CPU threads, ResNet-18 at 2 x 256 x 256, a full
training step): see docs/profile.md, section 7.

Larger tiles. The same algorithm with 4x4 output tiles, F(4x4, 3x3) (:mod:`.winograd4`),
needs 36 products per 16 outputs instead of 16 per 4, 1.78x fewer, and rounds about 15x
worse; ``auto`` takes it from 64 tiles of 4x4 (ResNet-18's ``layer1`` and ``layer2`` at
2 x 256 x 256). The reference transforms here are written once for both tile sizes
(``generic_*``, given the matrices), and :class:`WinogradConv3x3` takes the tile size as
its argument ``m``.

Derivation: docs/autograd.md, section "Winograd F(2×2, 3×3) convolution".
"""
from __future__ import annotations

import numpy as np

from ..autograd import Function, Tensor
from ..backend import get_array_module
from ._parallel import batched_matmul, matmul
from ._util import cpu_kernels_apply

B_T = np.array([[1, 0, -1, 0],
                [0, 1, 1, 0],
                [0, -1, 1, 0],
                [0, 1, 0, -1]], dtype=np.float64)          # (4, 4) input transform
G = np.array([[1, 0, 0],
              [0.5, 0.5, 0.5],
              [0.5, -0.5, 0.5],
              [0, 0, 1]], dtype=np.float64)               # (4, 3) filter transform
A_T = np.array([[1, 1, 1, 0],
                [0, 1, -1, -1]], dtype=np.float64)        # (2, 4) output transform
KRON_G = np.kron(G, G)                                    # (16, 9), see filter_transform


def tile_counts(H, W, m=2):
    """(th, tw): the m x m output tiles that cover an H x W output (ceil(H/m), ceil(W/m));
    m = 2 for F(2x2, 3x3), 4 for F(4x4, 3x3)."""
    return -(-H // m), -(-W // m)


# With few tiles the 16 products are skinny (T columns) and the transformed filters U
# (16 C_out C_in numbers, made again every call) cost more than the products save.
# Measured, forward + backward, 2 threads (N, C_in = C_out, H = W): im2col against
# Winograd in ms: (2, 512, 8), T = 32: 16.1 -> 11.7; (1, 512, 8), T = 16: 9.7 -> 10.2;
# (1, 256, 8), T = 16: 3.8 -> 5.0; (8, 64, 2), T = 8: 0.6 -> 0.8; (8, 64, 8), T = 128:
# 3.6 -> 2.2.
MIN_TILES = 32


def applies(x, weight, stride, padding, dilation) -> bool:
    """True when :func:`.conv.conv2d` with ``algorithm="auto"`` takes the Winograd path:
    a 3x3 kernel, stride 1, padding 1, dilation 1, on NumPy float32/float64 arrays
    (``x`` and ``weight``: Tensors or arrays), with at least ``MIN_TILES`` tiles
    (T = N * th * tw)."""
    x, weight = (a.data if isinstance(a, Tensor) else a for a in (x, weight))
    if not (tuple(weight.shape[2:]) == (3, 3) and stride == (1, 1) and padding == (1, 1)
            and dilation == (1, 1) and type(x) is np.ndarray and type(weight) is np.ndarray
            and x.dtype in (np.float32, np.float64) and weight.dtype == x.dtype
            and x.size > 0):
        return False
    th, tw = tile_counts(*x.shape[2:])
    return x.shape[0] * th * tw >= MIN_TILES


# --------------------------------------------------------------------------- NumPy reference
# The reference transforms are written once for any tile size: m x m outputs from an
# alpha x alpha input tile, alpha = m + 2, given by the matrices B^T (alpha, alpha), G (alpha, 3),
# A^T (m, alpha). The public functions below bind F(2x2)'s; winograd4.py binds F(4x4)'s.
def _const(matrix, like):
    """A transform matrix as an array of ``like``'s module and dtype."""
    return get_array_module(like).asarray(matrix, dtype=like.dtype)


def generic_filter_transform(weight, kron_g):
    """U = G g G^T for every filter: weight (C_out, C_in, 3, 3) -> U (alpha^2, C_out, C_in),
    with ``kron_g`` = kron(G, G) (alpha^2, 9).

    ``(G g G^T)[a, b] = sum_ij G[a, i] G[b, j] g[i, j]``, and ``G[a, i] G[b, j]`` is entry
    (alpha a + b, 3i + j) of the Kronecker product kron(G, G): so all filters go through
    one matrix product, kron(G, G) @ (the filters as columns of 9 numbers).
    """
    C_out, C_in = weight.shape[:2]
    g9 = weight.reshape(C_out * C_in, 9).T                             # (9, C_out*C_in)
    return matmul(_const(kron_g, weight), g9).reshape(-1, C_out, C_in)  # (alpha^2, C_out, C_in)


def generic_filter_transform_adjoint(dU, kron_g):
    """The gradient of :func:`generic_filter_transform`: dU (alpha^2, C_out, C_in) ->
    (C_out, C_in, 3, 3), G^T dU G per filter: the same product transposed, kron(G, G)^T."""
    P, C_out, C_in = dU.shape
    du = dU.reshape(P, C_out * C_in).T                                 # (C_out*C_in, alpha^2)
    return matmul(du, _const(kron_g, dU)).reshape(C_out, C_in, 3, 3)


def _padded_tiles(x, m):
    """The alpha x alpha input block of every tile: x (N, C, H, W) -> d (N, C, th, tw, alpha, alpha).

    ``d[n, c, u, v, a, b] = x_pad[n, c, m u + a, m v + b]`` with x_pad padded by 1 (and
    zeros up to whole tiles at the far side of a size that is not a multiple of m).
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    alpha = m + 2
    th, tw = tile_counts(H, W, m)
    x_pad = xp.zeros((N, C, m * th + 2, m * tw + 2), dtype=x.dtype)
    x_pad[:, :, 1:H + 1, 1:W + 1] = x
    d = xp.empty((N, C, th, tw, alpha, alpha), dtype=x.dtype)
    for a in range(alpha):
        for b in range(alpha):
            d[..., a, b] = x_pad[:, :, a:a + m * th:m, b:b + m * tw:m]  # (N, C, th, tw)
    return d


def generic_input_transform(x, b_t):
    """V = B^T d B for every input tile d: x (N, C, H, W) -> V (alpha^2, C, T), T = N*th*tw,
    with ``b_t`` = B^T (alpha, alpha)."""
    xp = get_array_module(x)
    alpha = b_t.shape[0]
    bt = _const(b_t, x)
    d = _padded_tiles(x, alpha - 2)                                    # (N, C, th, tw, alpha, alpha)
    V = xp.einsum("ai,ncuvij,bj->abcnuv", bt, d, bt)                   # (alpha, alpha, C, N, th, tw)
    return xp.ascontiguousarray(V.reshape(alpha * alpha, x.shape[1], -1))  # (alpha^2, C, T)


def generic_input_transform_adjoint(dV, x_shape, b_t):
    """The gradient of :func:`generic_input_transform`: dV (alpha^2, C, T) -> dL/dx (N, C, H, W).

    Every tile's B dV B^T is added onto the alpha x alpha block of the padded input it was
    read from; neighbouring blocks overlap by two rows or columns, and the sum collects both.
    """
    xp = get_array_module(dV)
    N, C, H, W = x_shape
    alpha = b_t.shape[0]
    m = alpha - 2
    th, tw = tile_counts(H, W, m)
    bt = _const(b_t, dV)
    dV = dV.reshape(alpha, alpha, C, N, th, tw)
    dd = xp.einsum("ai,abcnuv,bj->ncuvij", bt, dV, bt)                 # (N, C, th, tw, alpha, alpha)
    dx_pad = xp.zeros((N, C, m * th + 2, m * tw + 2), dtype=dV.dtype)
    for a in range(alpha):
        for b in range(alpha):
            dx_pad[:, :, a:a + m * th:m, b:b + m * tw:m] += dd[..., a, b]
    return dx_pad[:, :, 1:H + 1, 1:W + 1].copy()                       # (N, C, H, W)


def generic_output_transform(M, out_shape, a_t):
    """y = A^T m A for every tile: M (alpha^2, C_out, T) -> y (N, C_out, H, W), with
    ``a_t`` = A^T (m, alpha)."""
    xp = get_array_module(M)
    N, C_out, H, W = out_shape
    m, alpha = a_t.shape
    th, tw = tile_counts(H, W, m)
    at = _const(a_t, M)
    mm = M.reshape(alpha, alpha, C_out, N, th, tw)
    y = xp.einsum("pa,abonuv,qb->noupvq", at, mm, at)                  # (N, C_out, th, m, tw, m)
    y = y.reshape(N, C_out, m * th, m * tw)
    return xp.ascontiguousarray(y[:, :, :H, :W])                       # (N, C_out, H, W)


def generic_output_transform_adjoint(grad, a_t):
    """The gradient of :func:`generic_output_transform`: dL/dy (N, C_out, H, W) ->
    Gy (alpha^2, C_out, T), A g A^T per m x m tile of the gradient (zero beyond H x W)."""
    xp = get_array_module(grad)
    N, C_out, H, W = grad.shape
    m, alpha = a_t.shape
    th, tw = tile_counts(H, W, m)
    at = _const(a_t, grad)
    g = xp.zeros((N, C_out, m * th, m * tw), dtype=grad.dtype)
    g[:, :, :H, :W] = grad
    g = g.reshape(N, C_out, th, m, tw, m)                              # (N, C_out, th, m, tw, m)
    Gy = xp.einsum("pa,noupvq,qb->abonuv", at, g, at)                  # (alpha, alpha, C_out, N, th, tw)
    return xp.ascontiguousarray(Gy.reshape(alpha * alpha, C_out, -1))  # (alpha^2, C_out, T)


def filter_transform(weight):
    """U = G g G^T for every filter: weight (C_out, C_in, 3, 3) -> U (16, C_out, C_in),
    through one matrix product with kron(G, G) (16, 9) (:func:`generic_filter_transform`)."""
    return generic_filter_transform(weight, KRON_G)


def filter_transform_adjoint(dU):
    """The gradient of :func:`filter_transform`: dU (16, C_out, C_in) -> (C_out, C_in, 3, 3),
    G^T dU G per filter."""
    return generic_filter_transform_adjoint(dU, KRON_G)


def input_transform(x):
    """V = B^T d B for every 4x4 input tile d: x (N, C, H, W) -> V (16, C, T), T = N*th*tw."""
    return generic_input_transform(x, B_T)


def input_transform_adjoint(dV, x_shape):
    """The gradient of :func:`input_transform`: dV (16, C, T) -> dL/dx (N, C, H, W); every
    tile's B dV B^T is added onto its 4x4 block (neighbouring blocks overlap by 2)."""
    return generic_input_transform_adjoint(dV, x_shape, B_T)


def output_transform(M, out_shape):
    """y = A^T m A for every tile: M (16, C_out, T) -> y (N, C_out, H, W)."""
    return generic_output_transform(M, out_shape, A_T)


def output_transform_adjoint(grad):
    """The gradient of :func:`output_transform`: dL/dy (N, C_out, H, W) -> Gy (16, C_out, T),
    A g A^T per 2x2 tile of the gradient (zero beyond H x W)."""
    return generic_output_transform_adjoint(grad, A_T)


TRANSFORMS = ("filter_transform", "filter_transform_adjoint", "input_transform",
              "input_transform_adjoint", "output_transform", "output_transform_adjoint")


def reference_transforms():
    """The NumPy reference of every transform, ``{name: function}`` for the names in
    ``TRANSFORMS`` (the fast kernels have the same names and signatures in
    :mod:`.winograd_cpu`)."""
    return {name: globals()[name] for name in TRANSFORMS}


def _transforms(m, *arrays):
    """The transforms of F(m x m, 3x3), m = 2 or 4: the Numba kernels for NumPy float
    arrays, the NumPy reference otherwise."""
    fast = cpu_kernels_apply(*arrays)
    if m == 2:
        if fast:
            from . import winograd_cpu                                 # Numba, on first use
            return winograd_cpu.transforms()
        return reference_transforms()
    if m == 4:
        if fast:
            from . import winograd4_cpu
            return winograd4_cpu.transforms()
        from . import winograd4
        return winograd4.reference_transforms()
    raise ValueError(f"Winograd tile size m must be 2 or 4, got {m!r}")


# --------------------------------------------------------------------------- Function
class WinogradConv3x3(Function):
    """out = conv2d(x, weight, bias, stride=1, padding=1) by F(m x m, 3x3) (module docstring).

    ``m`` (a constant argument, no gradient): 2 for F(2x2, 3x3), P = 16 positions of the
    Winograd domain; 4 for F(4x4, 3x3) (:mod:`.winograd4`), P = 36. The four steps and
    their adjoints are the same for both; only the transforms differ.

    Shapes: x (N, C_in, H, W), weight (C_out, C_in, 3, 3), bias (C_out,) or None ->
    out (N, C_out, H, W). Saves ``x`` and the transformed filters ``U`` (P/9 the size of
    ``weight``); backward recomputes the input transform V rather than keeping it (4x
    the size of ``x`` for m = 2, 2.25x for m = 4), as im2col's backward recomputes its
    columns.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, m=2):
        x = np.ascontiguousarray(x) if type(x) is np.ndarray else x
        tf = _transforms(m, x, weight)
        U = tf["filter_transform"](weight)                             # (P, C_out, C_in)
        V = tf["input_transform"](x)                                   # (P, C_in, T)
        M = batched_matmul(U, V)                                       # (P, C_out, T)
        out = tf["output_transform"](M, (x.shape[0], weight.shape[0]) + x.shape[2:])
        if bias is not None:
            out += bias[:, None, None]
        ctx.save_for_backward(x, U)
        ctx.m = m
        return out                                                     # (N, C_out, H, W)

    @staticmethod
    def backward(ctx, grad):
        x, U = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad = np.ascontiguousarray(grad) if type(grad) is np.ndarray else grad
        tf = _transforms(ctx.m, x, grad)
        Gy = tf["output_transform_adjoint"](grad)                      # (P, C_out, T)
        grad_x = grad_w = grad_b = None
        if need_x:
            dV = batched_matmul(U.transpose(0, 2, 1), Gy)              # (P, C_in, T)
            grad_x = tf["input_transform_adjoint"](dV, x.shape)        # (N, C_in, H, W)
        if need_w:
            V = tf["input_transform"](x)                               # (P, C_in, T)
            dU = batched_matmul(Gy, V.transpose(0, 2, 1))              # (P, C_out, C_in)
            grad_w = tf["filter_transform_adjoint"](dU)                # (C_out, C_in, 3, 3)
        if need_b:
            grad_b = grad.sum(axis=(0, 2, 3))                          # (C_out,)
        return grad_x, grad_w, grad_b, None
