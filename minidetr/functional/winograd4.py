"""Winograd F(4x4, 3x3): the larger tile of :mod:`.winograd`, for the big 3x3 convolutions.

F(2x2, 3x3) (:mod:`.winograd`) makes a 2x2 block of outputs from a 4x4 input tile with
16 multiplications, 4 per output pixel (im2col: 9). F(4x4, 3x3) makes a 4x4 block from a
6x6 tile with 36, 2.25 per output: 1.78x fewer than F(2x2). Lavin & Gray's matrices
(interpolation points 0, +-1, +-2 and infinity)::

    B^T = [[4,  0, -5,  0, 1, 0],     G = [[ 1/4,    0,     0  ],     A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],          [-1/6, -1/6,  -1/6 ],            [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],          [-1/6,  1/6,  -1/6 ],            [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],          [ 1/24, 1/12,  1/6 ],            [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],          [ 1/24, -1/12, 1/6 ],
           [0,  4,  0, -5, 0, 1]]          [   0,    0,     1  ]]

    y (4, 4) = A^T [ (G g G^T) * (B^T d B) ] A        (d a 6x6 input tile, * elementwise)

The algorithm, the backward pass (each linear step transposed) and the Function are
those of F(2x2): :class:`.winograd.WinogradConv3x3` with ``m=4`` runs them with 36
positions instead of 16, on the transforms here::

    U (36, C_out, C_in)   filter transform        V (36, C_in, T)   input transform
    M (36, C_out, T) = U @ V, 36 products          y = A^T M A per tile, 16 outputs

Tiles: output rows 4u .. 4u+3 and columns 4v .. 4v+3 form tile (u, v); it reads padded
input rows 4u .. 4u+5 and columns 4v .. 4v+5 (neighbouring tiles overlap by 2). T = N * th
* tw in the order (n, u, v), th = ceil(H / 4), tw = ceil(W / 4); the outputs beyond H x W
are dropped. V is 36/16 = 2.25x the size of the image (F(2x2): 4x).

The price is rounding: the points +-2 put entries up to 8 in A^T and 1/24 in G, so the
transforms add numbers of more different sizes and float32 results differ from im2col's
about 10x more than F(2x2)'s (measured in tests/core/test_winograd.py; docs/autograd.md).

The NumPy functions below are the readable reference (written once for both tile sizes
in :mod:`.winograd`, CuPy-compatible); :mod:`.winograd4_cpu` has the Numba kernels.

Derivation: docs/autograd.md, section "Winograd F(4×4, 3×3) convolution".
"""
from __future__ import annotations

import numpy as np

from ..autograd import Tensor
from . import winograd
from .winograd import TRANSFORMS

M_TILE = 4                                                        # outputs per tile side
B_T = np.array([[4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1]], dtype=np.float64)           # (6, 6) input transform
G = np.array([[1 / 4, 0, 0],
              [-1 / 6, -1 / 6, -1 / 6],
              [-1 / 6, 1 / 6, -1 / 6],
              [1 / 24, 1 / 12, 1 / 6],
              [1 / 24, -1 / 12, 1 / 6],
              [0, 0, 1]], dtype=np.float64)                       # (6, 3) filter transform
A_T = np.array([[1, 1, 1, 1, 1, 0],
                [0, 1, -1, 2, -2, 0],
                [0, 1, 1, 4, 4, 0],
                [0, 1, -1, 8, -8, 1]], dtype=np.float64)          # (4, 6) output transform
KRON_G = np.kron(G, G)                                            # (36, 9)

# With few tiles the products are skinny and the transformed filters U, 36 numbers per
# (o, c) against F(2x2)'s 16, made again every call and read by every product, cost more
# than the products save. Measured, forward + backward, 2 threads, float32, F(4x4) time
# over F(2x2) time (N, C_in = C_out, H = W), T = 4x4 tiles: (2, 512, 8), T = 8: 1.63;
# (4, 512, 8), T = 16: 1.17; (1, 256, 16), T = 16: 1.19; (2, 512, 16), T = 32: 1.04;
# (2, 256, 16), T = 32: 0.97; (4, 512, 16), T = 64: 0.90; (4, 256, 16), T = 64: 0.81;
# (1, 128, 32), T = 64: 0.83; (2, 128, 32), T = 128: 0.72; (2, 64, 64), T = 512: 0.70.
# (Small channel counts win earlier -- (1, 64, 16), T = 16: 0.79 -- but one threshold
# that is right for every width is 64.) Set to None to keep "auto" on F(2x2).
MIN_TILES = 64


def tile_counts(H, W):
    """(th, tw): the 4x4 output tiles that cover an H x W output (ceil(H/4), ceil(W/4))."""
    return winograd.tile_counts(H, W, M_TILE)


def applies(x, weight, stride, padding, dilation) -> bool:
    """True when :func:`.conv.conv2d` with ``algorithm="auto"`` takes F(4x4): where F(2x2)
    would apply (:func:`.winograd.applies`) and there are at least ``MIN_TILES`` 4x4 tiles
    (T = N * ceil(H/4) * ceil(W/4)). Never while ``MIN_TILES`` is None."""
    if MIN_TILES is None or not winograd.applies(x, weight, stride, padding, dilation):
        return False
    x = x.data if isinstance(x, Tensor) else x
    th, tw = tile_counts(*x.shape[2:])
    return x.shape[0] * th * tw >= MIN_TILES


# --------------------------------------------------------------------------- NumPy reference
def filter_transform(weight):
    """U = G g G^T for every filter: weight (C_out, C_in, 3, 3) -> U (36, C_out, C_in)."""
    return winograd.generic_filter_transform(weight, KRON_G)


def filter_transform_adjoint(dU):
    """The gradient of :func:`filter_transform`: dU (36, C_out, C_in) -> (C_out, C_in, 3, 3)."""
    return winograd.generic_filter_transform_adjoint(dU, KRON_G)


def input_transform(x):
    """V = B^T d B for every 6x6 input tile d: x (N, C, H, W) -> V (36, C, T), T = N*th*tw."""
    return winograd.generic_input_transform(x, B_T)


def input_transform_adjoint(dV, x_shape):
    """The gradient of :func:`input_transform`: dV (36, C, T) -> dL/dx (N, C, H, W); every
    tile's B dV B^T is added onto its 6x6 block (neighbouring blocks overlap by 2)."""
    return winograd.generic_input_transform_adjoint(dV, x_shape, B_T)


def output_transform(M, out_shape):
    """y = A^T m A for every tile: M (36, C_out, T) -> y (N, C_out, H, W)."""
    return winograd.generic_output_transform(M, out_shape, A_T)


def output_transform_adjoint(grad):
    """The gradient of :func:`output_transform`: dL/dy (N, C_out, H, W) -> Gy (36, C_out, T),
    A g A^T per 4x4 tile of the gradient (zero beyond H x W)."""
    return winograd.generic_output_transform_adjoint(grad, A_T)


def reference_transforms():
    """The NumPy reference of every transform, ``{name: function}`` for the names in
    ``TRANSFORMS`` (the Numba kernels: same names and signatures in :mod:`.winograd4_cpu`)."""
    return {name: globals()[name] for name in TRANSFORMS}
