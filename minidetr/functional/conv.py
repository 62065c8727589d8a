"""2-D convolution by im2col + one GEMM, and 2-D max pooling.

(:func:`conv2d` hands the 3x3, stride-1 convolutions of NumPy arrays to Winograd's
algorithm: F(2x2, 3x3), :mod:`.winograd`, 2.25x fewer multiplications, or for the large
ones F(4x4, 3x3), :mod:`.winograd4`, 4x fewer; everything here is the general method, and
the reference the Winograd paths are tested against.)

A convolution is a matrix product in disguise. Unfold every receptive field of the
(zero-padded) input into one column of a matrix ``cols`` -- this is *im2col* -- and the
convolution becomes a single matrix multiplication with the flattened filters::

    cols[n, (c, i, j), (p, q)] = x_pad[n, c, p*s_h + i*d_h, q*s_w + j*d_w]
    out[n, o, (p, q)]          = sum_(c,i,j) W[o, (c, i, j)] * cols[n, (c, i, j), (p, q)]

The backward pass is the transpose of each step: ``grad_cols = W^T @ grad_out`` and then
*col2im* scatter-adds every column back onto the pixels it was read from (pixels that
sit in several receptive fields collect several contributions).

Both unfolding and folding loop over the ``kh * kw`` kernel taps only: for a fixed tap
``(i, j)`` the pixels read at all output positions form one strided slice of the padded
input, so each tap is one vectorised copy (or one vectorised add). The matrix products
are cut into blocks over the CPU's cores (:mod:`._parallel`), and so is col2im.

Shapes:
    x        (N, C_in, H, W)
    weight   (C_out, C_in, kh, kw)           PyTorch layout
    bias     (C_out,)
    cols     (N, C_in*kh*kw, H_out*W_out)    the column matrix
    out      (N, C_out, H_out, W_out)
    H_out = floor((H + 2*pad_h - dil_h*(kh - 1) - 1) / stride_h) + 1   (same for W_out)

Derivation: docs/autograd.md, sections "Convolution as im2col + one matrix product" and
"Max pooling".
"""
from __future__ import annotations

import numpy as np

from ..autograd import Function
from ..backend import get_array_module
from . import winograd, winograd4
from ._parallel import batched_matmul, matmul_sum, run_ranges
from ._util import cpu_kernels_apply, same_float_dtype

ALGORITHMS = ("auto", "im2col", "winograd", "winograd4")
WINOGRAD_TILE = {"winograd": 2, "winograd4": 4}   # outputs per tile side, F(m x m, 3x3)


# --------------------------------------------------------------------------- geometry
def _pair(name, value):
    """An int or a pair of ints as a pair of Python ints (``3`` -> ``(3, 3)``)."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    if (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)):
        return int(value[0]), int(value[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def _out_size(size, kernel, stride, padding, dilation):
    """How many window positions fit along one axis (PyTorch's formula, floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _tap(offset, dilation, stride, n_out):
    """The slice of the padded input that kernel tap ``offset`` reads, over all outputs.

    Output position p reads padded index ``p * stride + offset * dilation``, so over
    p = 0 .. n_out-1 the tap reads ``start, start + stride, ...``: a strided slice.
    """
    start = offset * dilation
    return slice(start, start + stride * (n_out - 1) + 1, stride)


def _is_pointwise(kernel, stride, padding):
    """A 1x1 kernel with stride 1 and no padding: the input already *is* its column matrix."""
    return kernel == (1, 1) and stride == (1, 1) and padding == (0, 0)


# --------------------------------------------------------------------------- im2col / col2im
def im2col(x, kernel, stride, padding, dilation):
    """Unfold every receptive field of ``x`` into a column.

    Args:
        x: array (N, C, H, W).
        kernel, stride, padding, dilation: pairs of ints (kh, kw), (s_h, s_w), ...

    Returns:
        cols (N, C*kh*kw, H_out*W_out) with
        ``cols[n, (c, i, j), (p, q)] = x_pad[n, c, p*s_h + i*d_h, q*s_w + j*d_w]``,
        rows ordered (c, i, j) like ``weight.reshape(C_out, -1)``. For a pointwise
        (1x1, stride 1, no padding) convolution this is a view of ``x``: no copy.
    """
    xp = get_array_module(x)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if _is_pointwise(kernel, stride, padding):
        return x.reshape(N, C, H * W)                                  # (N, C, H*W)
    H_out, W_out = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    x_pad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
    # x_pad: (N, C, H+2ph, W+2pw)
    cols = xp.empty((N, C, kh, kw, H_out, W_out), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            ys, xs = _tap(i, dh, sh, H_out), _tap(j, dw, sw, W_out)
            cols[:, :, i, j] = x_pad[:, :, ys, xs]                     # (N, C, H_out, W_out)
    return cols.reshape(N, C * kh * kw, H_out * W_out)                 # (N, C*kh*kw, P) P = H_out*W_out


def col2im(cols, x_shape, kernel, stride, padding, dilation):
    """Fold columns back onto the image, summing overlaps: the adjoint of :func:`im2col`.

    ``col2im(im2col(.))`` is not the identity: a pixel that lies in k receptive fields
    is counted k times. That sum is exactly the gradient of im2col.

    Args:
        cols: array (N, C*kh*kw, H_out*W_out), e.g. the gradient of the column matrix.
        x_shape: (N, C, H, W), the shape of the image the columns came from.

    Returns:
        array (N, C, H, W).
    """
    xp = get_array_module(cols)
    N, C, H, W = x_shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    if _is_pointwise(kernel, stride, padding):
        return cols.reshape(N, C, H, W)
    H_out, W_out = _out_size(H, kh, sh, ph, dh), _out_size(W, kw, sw, pw, dw)
    cols = cols.reshape(N, C, kh, kw, H_out, W_out)
    image = xp.empty((N, C, H, W), dtype=cols.dtype)

    def fold(c0, c1):                                                  # channels c0 .. c1-1
        image_pad = xp.zeros((N, c1 - c0, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
        for i in range(kh):
            for j in range(kw):
                ys, xs = _tap(i, dh, sh, H_out), _tap(j, dw, sw, W_out)
                # Within one tap the slice hits distinct pixels, so a plain += is a correct
                # scatter-add; overlaps between taps accumulate over the loop.
                image_pad[:, :, ys, xs] += cols[:, c0:c1, i, j]        # (N, c1-c0, H_out, W_out)
        image[:, c0:c1] = image_pad[:, :, ph:ph + H, pw:pw + W]        # (N, c1-c0, H, W)

    # Channel blocks on separate threads (col2im treats every channel on its own): 25 %
    # faster at the ResNet-18 shapes on 2 cores. (im2col is a plain copy, bound by memory
    # bandwidth: blocks gave nothing there, and neither did Numba kernels for both, which
    # were 1.3-2x slower than NumPy's strided copies.)
    run_ranges(fold, C, cols.nbytes if isinstance(cols, np.ndarray) else 0)
    return image                                                       # (N, C, H, W)


# --------------------------------------------------------------------------- conv2d
class Conv2d(Function):
    """out = W @ im2col(x) + b, batched over N.

    Backward (derivation in docs/autograd.md):
        grad_x = col2im(W^T @ grad_out)
        grad_W = sum_n grad_out[n] @ cols[n]^T
        grad_b = sum over n and pixels of grad_out
    Forward saves ``x`` (not ``cols``): the column matrix is kh*kw times larger than the
    image, so backward rebuilds it, trading one cheap copy for a lot of memory.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation):
        N = x.shape[0]
        C_out, _, kh, kw = weight.shape
        geometry = ((kh, kw), stride, padding, dilation)
        cols = im2col(x, *geometry)                                    # (N, C_in*kh*kw, P)
        out = batched_matmul(weight.reshape(C_out, -1), cols)          # (N, C_out, P)
        if bias is not None:
            out += bias[:, None]
        ctx.save_for_backward(x, weight)
        ctx.geometry = geometry
        H_out = _out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
        W_out = _out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
        return out.reshape(N, C_out, H_out, W_out)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        N, C_out = grad.shape[:2]
        g = grad.reshape(N, C_out, -1)                                 # (N, C_out, P)
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_cols = batched_matmul(weight.reshape(C_out, -1).T, g)  # (N, C_in*kh*kw, P)
            grad_x = col2im(grad_cols, x.shape, *ctx.geometry)         # (N, C_in, H, W)
        if need_w:
            cols = im2col(x, *ctx.geometry)                            # (N, C_in*kh*kw, P)
            grad_w = matmul_sum(g, cols.transpose(0, 2, 1))            # (C_out, C_in*kh*kw)
            grad_w = grad_w.reshape(weight.shape)                      # (C_out, C_in, kh, kw)
        if need_b:
            grad_b = g.sum(axis=(0, 2))                                # (C_out,)
        return grad_x, grad_w, grad_b, None, None, None


def conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, algorithm="auto"):
    """2-D cross-correlation (PyTorch's ``conv2d``), with zero padding.

    Args:
        x: Tensor or array (N, C_in, H, W).
        weight: Tensor or array (C_out, C_in, kh, kw).
        bias: Tensor or array (C_out,), or None.
        stride, padding, dilation: int or pair of ints (height, width).
        algorithm: ``"im2col"`` (:class:`Conv2d`, any geometry), ``"winograd"``
            (:class:`.winograd.WinogradConv3x3` with F(2x2, 3x3)), ``"winograd4"`` (the
            same with F(4x4, 3x3), :mod:`.winograd4`) -- both for 3x3 kernels, stride 1,
            padding 1, dilation 1 only -- or ``"auto"``: F(4x4) where
            :func:`.winograd4.applies`, else F(2x2) where :func:`.winograd.applies` (NumPy
            arrays, enough tiles), im2col everywhere else.

    Returns:
        Tensor (N, C_out, H_out, W_out).

    Shapes: see the module docstring. A 1x1 kernel with stride 1 and no padding is a
    plain matrix product over channels (the image is used as its own column matrix).
    """
    stride, padding, dilation = (_pair("stride", stride), _pair("padding", padding),
                                 _pair("dilation", dilation))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(f"conv2d: need stride >= 1, dilation >= 1, padding >= 0; got "
                         f"stride={stride}, padding={padding}, dilation={dilation}")
    if x.ndim != 4:
        raise ValueError(f"conv2d: x must be (N, C_in, H, W), got shape {tuple(x.shape)}")
    if weight.ndim != 4:
        raise ValueError(f"conv2d: weight must be (C_out, C_in, kh, kw), got shape "
                         f"{tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv2d: weight {tuple(weight.shape)} expects {weight.shape[1]} input "
                         f"channels but x {tuple(x.shape)} has {x.shape[1]}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv2d: bias must have shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    H_out = _out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
    W_out = _out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
    if H_out < 1 or W_out < 1:
        raise ValueError(f"conv2d: kernel {(kh, kw)} with dilation {dilation} does not fit in "
                         f"the padded input {tuple(x.shape[2:])} + 2*{padding}")
    same_float_dtype("conv2d", x, weight, bias)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"conv2d: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    if algorithm in WINOGRAD_TILE and not ((kh, kw) == (3, 3) and stride == (1, 1)
                                           and padding == (1, 1) and dilation == (1, 1)):
        raise ValueError(f"conv2d: algorithm={algorithm!r} needs a 3x3 kernel, stride 1, "
                         f"padding 1 and dilation 1; got kernel {(kh, kw)}, stride={stride}, "
                         f"padding={padding}, dilation={dilation}")
    if algorithm == "auto":
        geometry = (stride, padding, dilation)
        algorithm = ("winograd4" if winograd4.applies(x, weight, *geometry) else
                     "winograd" if winograd.applies(x, weight, *geometry) else "im2col")
    if algorithm in WINOGRAD_TILE:
        return winograd.WinogradConv3x3.apply(x, weight, bias, WINOGRAD_TILE[algorithm])
    return Conv2d.apply(x, weight, bias, stride, padding, dilation)


# --------------------------------------------------------------------------- max_pool2d
class MaxPool2d(Function):
    """The maximum of every window; the gradient goes to the element that won.

    Forward is one elementwise maximum per kernel tap (:meth:`reference_forward`; NumPy
    float arrays take the one-pass Numba kernel of :mod:`.pool_cpu`, same numbers).
    Backward finds, per window, the first tap (in row-major order) whose value equals the
    maximum -- PyTorch's choice on ties -- and sends the output gradient to that pixel; a
    pixel that wins several overlapping windows collects several gradients. Finding the
    winners in backward keeps forward cheap when no gradient is needed (the frozen ResNet
    stem).
    """

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):
        ctx.geometry = (kernel, stride, padding)
        if cpu_kernels_apply(x):                                       # one pass, Numba
            from . import pool_cpu
            out = pool_cpu.max_pool2d_forward(x, kernel, stride, padding)
        else:
            out = MaxPool2d.reference_forward(x, kernel, stride, padding)
        ctx.save_for_backward(x, out)
        return out                                                     # (N, C, H_out, W_out)

    @staticmethod
    def reference_forward(x, kernel, stride, padding):
        """The maximum over the kernel taps, one NumPy/CuPy ``maximum`` per tap."""
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        H_out, W_out = _out_size(x.shape[2], kh, sh, ph, 1), _out_size(x.shape[3], kw, sw, pw, 1)
        x_pad = _pad_with_minus_inf(x, padding)                        # (N, C, H+2ph, W+2pw)
        xp = get_array_module(x)
        out = None
        for i in range(kh):
            for j in range(kw):
                window_ij = x_pad[:, :, _tap(i, 1, sh, H_out), _tap(j, 1, sw, W_out)]
                out = window_ij.copy() if out is None else xp.maximum(out, window_ij)
        return out                                                     # (N, C, H_out, W_out)

    @staticmethod
    def backward(ctx, grad):
        x, out = ctx.saved_tensors
        (kh, kw), (sh, sw), (ph, pw) = ctx.geometry
        xp = ctx.xp
        N, C, H, W = x.shape
        H_out, W_out = out.shape[2:]
        x_pad = _pad_with_minus_inf(x, (ph, pw))
        grad_pad = xp.zeros(x_pad.shape, dtype=grad.dtype)             # (N, C, H+2ph, W+2pw)
        found = xp.zeros(out.shape, dtype=bool)                        # winner already seen?
        for i in range(kh):
            for j in range(kw):
                ys, xs = _tap(i, 1, sh, H_out), _tap(j, 1, sw, W_out)
                wins = (x_pad[:, :, ys, xs] == out) & ~found           # (N, C, H_out, W_out)
                found |= wins
                grad_pad[:, :, ys, xs] += grad * wins
        # Every window holds at least one real pixel (padding <= kernel/2), so the -inf
        # padding never wins over a finite value and cropping the border drops only zeros.
        return grad_pad[:, :, ph:ph + H, pw:pw + W], None, None, None


def _pad_with_minus_inf(x, padding):
    """Pad the last two axes with -inf (which never wins a maximum)."""
    ph, pw = padding
    if not (ph or pw):
        return x
    xp = get_array_module(x)
    return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=-np.inf)


def max_pool2d(x, kernel_size, stride=None, padding=0):
    """2-D max pooling with -inf padding (PyTorch semantics, floor mode, no dilation).

    Args:
        x: Tensor or array (N, C, H, W), floating point.
        kernel_size: int or pair.
        stride: int or pair; default ``kernel_size`` (non-overlapping windows).
        padding: int or pair, at most half the kernel size (as PyTorch requires).

    Returns:
        Tensor (N, C, H_out, W_out), H_out = floor((H + 2*pad - k) / stride) + 1.
        The ResNet stem uses ``max_pool2d(x, 3, 2, 1)``: (N, 64, 400, 533) -> (N, 64, 200, 267).
    """
    kernel = _pair("kernel_size", kernel_size)
    stride = kernel if stride is None else _pair("stride", stride)
    padding = _pair("padding", padding)
    if x.ndim != 4:
        raise ValueError(f"max_pool2d: x must be (N, C, H, W), got shape {tuple(x.shape)}")
    if x.dtype.kind != "f":
        raise TypeError(f"max_pool2d: x must be floating point, got {x.dtype}")
    if min(kernel) < 1 or min(stride) < 1:
        raise ValueError(f"max_pool2d: kernel_size and stride must be >= 1, got {kernel}, {stride}")
    if not all(0 <= p <= k // 2 for p, k in zip(padding, kernel)):
        raise ValueError(f"max_pool2d: padding {padding} must be between 0 and half the "
                         f"kernel size {kernel}")
    H_out = _out_size(x.shape[2], kernel[0], stride[0], padding[0], 1)
    W_out = _out_size(x.shape[3], kernel[1], stride[1], padding[1], 1)
    if H_out < 1 or W_out < 1:
        raise ValueError(f"max_pool2d: kernel {kernel} does not fit in the padded input "
                         f"{tuple(x.shape[2:])} + 2*{padding}")
    return MaxPool2d.apply(x, kernel, stride, padding)
