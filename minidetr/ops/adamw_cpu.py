"""The whole AdamW update of one parameter in one pass, on the CPU (Numba).

Why. The readable update in :meth:`minidetr.optim.AdamW.step` is one NumPy operation
per line: 14 passes over memory per parameter (``p *= ...``, ``m *= b1``, ``(1 - b1) * g``,
``m += ...``, ...), 8 of them into freshly allocated temporaries of the parameter's size,
on one thread. At the ``small`` config (13.3 M float32 elements in 157 tensors) that is
36 ms per training step. Here each element is read once (``param``, ``grad``,
``exp_avg``, ``exp_avg_sq``) and written once (the last three but ``grad``), with no
temporaries, on all of Numba's threads for large parameters: 9 ms, the time it takes to
move those 372 MB (2 cores shared with other jobs).

Same arithmetic, same order, same bits. The element body (:func:`_element`) is the
readable chain's lines, one element at a time, and it is the body of the GPU kernel
(:data:`minidetr.ops.adamw_kernel.OPERATION`) written in Python::

    p = p * decay                                 p *= 1 - lr wd
    m = m * beta1 + one_minus_beta1 * g           m *= b1;  m += (1 - b1) g
    v = v * beta2 + one_minus_beta2 * (g * g)     v *= b2;  v += (1 - b2) (g g)
    denom = sqrt(v) / sqrt_bias_correction2 + eps
    p = p - step_size * m / denom                 p -= (lr / bc1) m / denom

The scalars come from :func:`minidetr.ops.adamw_kernel.step_scalars` (Python floats,
computed as the chain computes them) and are cast to the parameter's dtype before the
call, as NumPy casts a Python float in ``float32_array * 0.9``. Numba then types every
operation in that dtype: float32 stays float32, each product, sum, square root and
quotient is rounded where the chain rounds it. ``fastmath`` is off, so LLVM neither
reorders nor contracts ``a * b + c`` into a fused multiply-add (it does so only when
asked), and its SIMD ``sqrt`` and ``/`` are correctly rounded, as NumPy's are. The
result equals the readable chain's bit for bit (tested in
``tests/core/test_adamw_cpu.py``).

``error_model="numpy"``: a division by zero (``eps = 0`` and ``v = 0``) gives inf or NaN
as in NumPy, where Numba's default (``"python"``) would raise ZeroDivisionError. That
also removes the zero test before each division, which is what lets LLVM compile the
loop to SIMD instructions (8 float32 elements at a time with AVX2): 5x faster.

Threads. :func:`_update_parallel` splits the elements over Numba's threads
(``prange``). Waking the thread pool costs microseconds, more than a small parameter's
whole update (a bias of 256 elements takes 1 us), and most of the model's tensors are
that small, so parameters of fewer than :data:`PARALLEL_FROM` elements run in
:func:`_update_serial` on the calling thread.

Shapes: ``param``, ``exp_avg``, ``exp_avg_sq`` C-contiguous, ``grad`` any layout, all of
the parameter's shape (any, also 0-d) and dtype (float32 or float64). The kernels take
them flattened to (n,).

Compilation: on first use, once per dtype, cached on disk (``cache=True``).
"""
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from .adamw_kernel import step_scalars

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Parameters with at least this many elements are updated on all threads. Measured on 2
# cores (float32, one thread / two) with one other process running: 65 536 elements
# 28 / 17 us, 1 M elements 440 / 230 us. Waking the pool costs 2 us on an idle machine,
# 10-50 us on a busy one, so the threshold errs on the side of one thread.
PARALLEL_FROM = 65536


@njit(inline="always", cache=True)
def _element(p, g, m, v, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, step_size,
             sqrt_bias_correction2, eps):
    """One AdamW update of one element; returns the new ``(p, m, v)``. All in one dtype."""
    p = p * decay                                           # p *= 1 - lr wd
    m = m * beta1 + one_minus_beta1 * g                     # m = b1 m + (1 - b1) g
    v = v * beta2 + one_minus_beta2 * (g * g)               # v = b2 v + (1 - b2) g^2
    denom = np.sqrt(v) / sqrt_bias_correction2 + eps        # sqrt(v) / sqrt(bc2) + eps
    p = p - step_size * m / denom                           # p -= (lr / bc1) m / denom
    return p, m, v


@njit(error_model="numpy", cache=True)
def _update_serial(param, grad, exp_avg, exp_avg_sq, decay, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, step_size, sqrt_bias_correction2, eps):
    """The update of every element of the (n,) arrays, in place, on this thread."""
    for i in range(param.shape[0]):
        param[i], exp_avg[i], exp_avg_sq[i] = _element(
            param[i], grad[i], exp_avg[i], exp_avg_sq[i], decay, beta1, one_minus_beta1,
            beta2, one_minus_beta2, step_size, sqrt_bias_correction2, eps)


@njit(parallel=True, error_model="numpy", cache=True)
def _update_parallel(param, grad, exp_avg, exp_avg_sq, decay, beta1, one_minus_beta1, beta2,
                     one_minus_beta2, step_size, sqrt_bias_correction2, eps):
    """The update of every element of the (n,) arrays, in place, on all Numba threads."""
    for i in prange(param.shape[0]):
        param[i], exp_avg[i], exp_avg_sq[i] = _element(
            param[i], grad[i], exp_avg[i], exp_avg_sq[i], decay, beta1, one_minus_beta1,
            beta2, one_minus_beta2, step_size, sqrt_bias_correction2, eps)


def why_not_fused(param, grad, exp_avg=None, exp_avg_sq=None):
    """None if :func:`fused_step` can update these arrays, else the reason, as a phrase.

    It needs NumPy arrays of one dtype, float32 or float64, of one shape, and the three
    updated arrays C-contiguous and writable (so that their flat views are the arrays
    themselves). ``grad`` may have any layout, or be a NumPy scalar (for a 0-d
    parameter). Moments given as None are not created yet
    (AdamW makes them with ``zeros_like(param)``) and are not checked.
    """
    if type(param) is not np.ndarray or not isinstance(grad, (np.ndarray, np.generic)):
        return (f"param is a {type(param).__module__}.{type(param).__name__}, grad a "
                f"{type(grad).__module__}.{type(grad).__name__}; both must be NumPy arrays")
    dtype, shape = param.dtype, param.shape
    if dtype not in DTYPES:
        return f"its dtype is {dtype}, not float32 or float64"
    if grad.dtype != dtype or grad.shape != shape:
        return f"grad is {grad.dtype} {grad.shape}, the parameter {dtype} {shape}"
    for name, a in (("param", param), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if a is None:
            continue
        if type(a) is not np.ndarray or a.dtype != dtype or a.shape != shape:
            return (f"{name} is {type(a).__name__} {getattr(a, 'dtype', '')} "
                    f"{getattr(a, 'shape', '')}, the parameter {dtype} {shape}")
        flags = a.flags
        if not (flags.c_contiguous and flags.writeable):
            return f"{name} is not a writable C-contiguous array"
    return None


@functools.lru_cache(maxsize=256)
def _scalars(dtype, lr, beta1, beta2, eps, weight_decay, step) -> tuple:
    """:func:`~minidetr.ops.adamw_kernel.step_scalars` cast to ``dtype`` (as NumPy casts
    a Python float beside a float32 array), computed once per group, step and dtype."""
    return tuple(dtype.type(s) for s in step_scalars(lr, beta1, beta2, eps, weight_decay,
                                                      step))


def fused_step(param, grad, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int, check: bool = True):
    """One AdamW update of one parameter, in place, in one pass (see the module docstring).

    Args:
        param, exp_avg, exp_avg_sq: updated in place; C-contiguous NumPy arrays.
        grad: the gradient, any layout (a non-contiguous one is copied first), or a NumPy
            scalar for a 0-d parameter.
        step: the step number t after this update's increment (1 for the first).
        check: False skips :func:`why_not_fused`, for a caller that has just asked it
            (:meth:`minidetr.optim.AdamW.step` does, to choose the kernel).

    All four have the parameter's shape and dtype (float32 or float64): anything else
    is a ValueError that says what differs.
    """
    if check:
        reason = why_not_fused(param, grad, exp_avg, exp_avg_sq)
        if reason is not None:
            raise ValueError(f"adamw_cpu.fused_step: {reason}")
    scalars = _scalars(param.dtype, lr, beta1, beta2, eps, weight_decay, step)
    update = _update_parallel if param.size >= PARALLEL_FROM else _update_serial
    update(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1),     # (n,) views
           exp_avg.reshape(-1), exp_avg_sq.reshape(-1), *scalars)


__all__ = ["DTYPES", "PARALLEL_FROM", "why_not_fused", "fused_step"]
