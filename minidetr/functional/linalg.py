"""Matrix products: matmul (batched, broadcasting) and linear (the fused layer product).

For Y = A B with A (m, k), B (k, n) and upstream gradient G = dL/dY (m, n):

    dL/dA = G B^T   (m, n) x (n, k) -> (m, k)
    dL/dB = A^T G   (k, m) x (m, n) -> (k, n)

Everything else in this file is bookkeeping around these two lines: batch axes that
broadcast (summed back by :func:`minidetr.autograd.unbroadcast`), 1-D operands (treated as
a row or a column), and the (out, in) weight layout of ``linear``.

Derivation: docs/autograd.md, section "Matrix products".
"""
from __future__ import annotations

import numpy as np

from ..autograd import Function, unbroadcast
from ._parallel import matmul as parallel_matmul
from ._util import operand, same_float_dtype, tensor_or_array


class MatMul(Function):
    """Y = A @ B with NumPy's matmul rules.

    Shapes: A (*batch_a, m, k), B (*batch_b, k, n) -> (*broadcast(batch_a, batch_b), m, n).
    A 1-D A (k,) is a row (1, k) whose m axis is dropped from the result; a 1-D B (k,) is
    a column (k, 1) whose n axis is dropped.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return ctx.xp.asarray(ctx.xp.matmul(a, b))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad
        # Work with 2-D-or-more operands: a 1-D a is a row, a 1-D b a column; put the
        # dropped axes back into the gradient to match.
        a2 = a[None, :] if a.ndim == 1 else a                # (..., m, k)
        b2 = b[:, None] if b.ndim == 1 else b                # (..., k, n)
        g = grad
        if b.ndim == 1:
            g = g[..., None]                                  # (..., m, 1)
        if a.ndim == 1:
            g = g[..., None, :]                               # (..., 1, n)
        ga = gb = None
        if need_a:
            ga = g @ b2.swapaxes(-1, -2)                      # (..., m, n) x (..., n, k)
            ga = unbroadcast(ga, a2.shape).reshape(a.shape)   # sum broadcast batch axes
        if need_b:
            gb = a2.swapaxes(-1, -2) @ g                      # (..., k, m) x (..., m, n)
            gb = unbroadcast(gb, b2.shape).reshape(b.shape)
        return ga, gb


def matmul(a, b):
    """Matrix product with batch broadcasting, as ``numpy.matmul`` / the ``@`` operator.

    Shapes: (*batch_a, m, k) @ (*batch_b, k, n) -> (*broadcast(batch_a, batch_b), m, n);
    a 1-D operand is a vector (its axis is dropped from the result). E.g. attention scores
    (N, M, Lq, D) @ (N, M, D, Lk) -> (N, M, Lq, Lk).
    """
    a, b = operand(a, b), operand(b, a)
    same_float_dtype("matmul", a, b)
    sa, sb = tuple(a.shape), tuple(b.shape)
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dimension, got shapes "
                         f"{sa} and {sb} (use mul for a scalar factor)")
    k_a = sa[-1]
    k_b = sb[0] if b.ndim == 1 else sb[-2]
    if k_a != k_b:
        raise ValueError(f"matmul: inner dimensions differ: {sa} @ {sb} ({k_a} != {k_b})")
    try:
        np.broadcast_shapes(sa[:-2], sb[:-2])
    except ValueError:
        raise ValueError(f"matmul: batch dimensions {sa[:-2]} and {sb[:-2]} do not "
                         f"broadcast ({sa} @ {sb})") from None
    return MatMul.apply(a, b)


class Linear(Function):
    """y = x W^T + b, for W of PyTorch layout (out, in), as one GEMM.

    Shapes: x (..., in), W (out, in), b (out,) or None -> y (..., out). The leading axes
    of x are flattened into one axis of B rows, so forward and each backward product is a
    single 2-D matrix product (the fastest thing NumPy/CuPy can do; a large one is cut
    into blocks over the CPU's cores by :func:`._parallel.matmul`, same numbers):

        forward   y2 = x2 W^T + b      (B, in) x (in, out) -> (B, out)
        backward  dx2 = g2 W           (B, out) x (out, in) -> (B, in)
                  dW = g2^T x2         (out, B) x (B, in) -> (out, in)
                  db = sum_rows g2     (B, out) -> (out,)
    """

    @staticmethod
    def forward(ctx, x, weight, bias):
        out_features, in_features = weight.shape
        x2 = x.reshape(-1, in_features)                       # (B, in)
        y2 = parallel_matmul(x2, weight.T, bias=bias)         # (B, out)
        ctx.save_for_backward(x2, weight)
        ctx.x_shape = x.shape
        return y2.reshape(x.shape[:-1] + (out_features,))     # (..., out)

    @staticmethod
    def backward(ctx, grad):
        x2, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        g2 = grad.reshape(-1, weight.shape[0])                # (B, out)
        gx = parallel_matmul(g2, weight).reshape(ctx.x_shape) if need_x else None  # (..., in)
        gw = parallel_matmul(g2.T, x2) if need_w else None    # (out, in)
        gb = g2.sum(axis=0) if need_b else None               # (out,)
        return gx, gw, gb


def linear(x, weight, bias=None):
    """The fully connected layer y = x @ weight.T + bias (PyTorch's weight layout).

    Shapes: x (..., in), weight (out, in), bias (out,) or None -> (..., out).
    """
    x = tensor_or_array(x)
    weight = operand(weight, x)
    if bias is not None:
        bias = operand(bias, x)
    same_float_dtype("linear", x, weight, bias)
    if weight.ndim != 2:
        raise ValueError(f"linear: weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if x.ndim == 0 or x.shape[-1] != in_features:
        raise ValueError(f"linear: x of shape {tuple(x.shape)} does not end in in_features="
                         f"{in_features} of weight {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"linear: bias must have shape ({out_features},), got "
                         f"{tuple(bias.shape)}")
    return Linear.apply(x, weight, bias)

