"""Fused Numba CPU kernels of softmax along the last axis (the fast path of activation.py).

The readable NumPy code of :class:`.activation.Softmax` is the reference; it makes four
full-size temporaries (``x - max``, ``exp``, the quotient, and in backward ``g * y`` and
``g - dot``). These kernels take x viewed as rows (R, n) = (prod(...), n) and allocate
only their result::

    forward   per row: z_i = x_i - max(x)            (kernel)
              e = exp(z), in place               (NumPy: its exp is SIMD, Numba's is not)
              per row: s = sum(e);  y_i = e_i / s   (kernel)
    backward  per row: d = sum_i g_i y_i;  grad_x_i = y_i (g_i - d)

The exponentials are in the data's dtype (as in the reference); the sums ``s`` and ``d``
are accumulated in float64 (``reassoc``: LLVM may split them into SIMD partial sums,
which changes the rounding and nothing else). :class:`.activation.Softmax` calls them
for NumPy float32/float64 C-contiguous arrays along the last axis
(:func:`._util.cpu_kernels_apply`), and imports this module, and so Numba, on first use.

Threads: none (the calling thread), as for the kernels of :mod:`.norm_cpu` and for the
same reason. Compilation: on first use, once per dtype, cached on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def _subtract_row_max(x, z):
    """z (R, n) = x - max of its row, for x (R, n); a NaN in a row makes the max NaN."""
    R, n = x.shape
    for r in range(R):
        m = x[r, 0]
        for i in range(1, n):
            if x[r, i] > m or x[r, i] != x[r, i]:     # NaN wins, as in NumPy's max
                m = x[r, i]
        for i in range(n):
            z[r, i] = x[r, i] - m


@njit(cache=True, fastmath={"reassoc"})
def _divide_by_row_sum(e):
    """e (R, n) divided in place by the sum of its row (accumulated in float64)."""
    R, n = e.shape
    for r in range(R):
        s = 0.0
        for i in range(n):
            s += e[r, i]
        inv = 1.0 / s
        for i in range(n):
            e[r, i] = e[r, i] * inv


@njit(cache=True, fastmath={"reassoc"})
def _softmax_backward(grad, y, grad_x):
    """grad_x (R, n) = y (g - sum(g y)) for each row of grad, y (R, n)."""
    R, n = y.shape
    for r in range(R):
        d = 0.0                                       # float64 accumulator
        for i in range(n):
            d += grad[r, i] * y[r, i]
        for i in range(n):
            grad_x[r, i] = y[r, i] * (grad[r, i] - d)


def softmax_forward(x):
    """Softmax over the last axis. Shapes: x (..., n) C-contiguous -> y (..., n)."""
    rows = x.reshape(-1, x.shape[-1])                                  # (R, n), a view
    y = np.empty_like(rows)                                            # (R, n)
    _subtract_row_max(rows, y)
    np.exp(y, out=y)            # NumPy's SIMD exp: Numba's scalar exp would be 3x slower
    _divide_by_row_sum(y)
    return y.reshape(x.shape)


def softmax_backward(grad, y):
    """dL/dx from g = dL/dy and y = softmax(x) over the last axis.

    Shapes: grad, y (..., n) C-contiguous -> (..., n).
    """
    n = y.shape[-1]
    grad_x = np.empty(y.shape, y.dtype)
    _softmax_backward(grad.reshape(-1, n), y.reshape(-1, n), grad_x.reshape(-1, n))  # (R, n)
    return grad_x
