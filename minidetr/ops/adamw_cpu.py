"""The whole AdamW update of one parameter in one pass, on the CPU (Numba).

Why. The readable update in :meth:`minidetr.optim.AdamW.step` is one NumPy operation
per line: 14 passes over memory per parameter (``p *= ...``, ``m *= b1``, ``(1 - b1) * g``,
``m += ...``, ...), 8 of them into freshly allocated temporaries of the parameter's size,
on one thread. At the ``small`` config (13.3 M float32 elements in 157 tensors) that is
about 40 ms per training step. Here each element is read once (``param``, ``grad``,
``exp_avg``, ``exp_avg_sq``) and written once (the last three but ``grad``), with no
temporaries, on all of Numba's threads for large parameters: about 7 ms.

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
result equals the readable chain's bit for bit (tested in ``tests/core/test_optim.py``).

Threads. :func:`_update_parallel` splits the elements over Numba's threads
(``prange``). Waking the thread pool costs a few microseconds, more than a small
parameter's whole update (a bias of 256 elements takes 1-2 us), and about half of the
model's tensors are that small, so parameters of fewer than :data:`PARALLEL_FROM`
elements run in :func:`_update_serial` on the calling thread.

Shapes: ``param``, ``exp_avg``, ``exp_avg_sq`` C-contiguous, ``grad`` any layout, all of
the parameter's shape (any, also 0-d) and dtype (float32 or float64). The kernels take
them flattened to (n,).

Compilation: on first use, once per dtype, cached on disk (``cache=True``).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from .adamw_kernel import step_scalars

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# Parameters with at least this many elements are updated on all threads. Measured on 2
# cores (float32): 256 elements serial 1.6 us / parallel 2.2 us; 1024: 4.0 / 2.4 us;
# 4096: 14 / 3.0 us. (The serial loop is not SIMD: LLVM gives up on proving that four
# arrays, three of them written, do not overlap; the parallel one is.)
PARALLEL_FROM = 1024


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


@njit(cache=True)
def _update_serial(param, grad, exp_avg, exp_avg_sq, decay, beta1, one_minus_beta1, beta2,
                   one_minus_beta2, step_size, sqrt_bias_correction2, eps):
    """The update of every element of the (n,) arrays, in place, on this thread."""
    for i in range(param.shape[0]):
        param[i], exp_avg[i], exp_avg_sq[i] = _element(
            param[i], grad[i], exp_avg[i], exp_avg_sq[i], decay, beta1, one_minus_beta1,
            beta2, one_minus_beta2, step_size, sqrt_bias_correction2, eps)


@njit(parallel=True, cache=True)
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
    if param.dtype not in DTYPES:
        return f"its dtype is {param.dtype}, not float32 or float64"
    arrays = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    for name, a in arrays.items():
        if a is None:
            continue
        if not isinstance(a, (np.ndarray, np.generic)) or a.dtype != param.dtype \
                or a.shape != param.shape or (name != "grad" and type(a) is not np.ndarray):
            return (f"{name} is {type(a).__name__} {getattr(a, 'dtype', '')} "
                    f"{getattr(a, 'shape', '')}, the parameter {param.dtype} {param.shape}")
        if name != "grad" and not (a.flags.c_contiguous and a.flags.writeable):
            return f"{name} is not a writable C-contiguous array"
    return None


def fused_step(param, grad, exp_avg, exp_avg_sq, *, lr: float, beta1: float, beta2: float,
               eps: float, weight_decay: float, step: int):
    """One AdamW update of one parameter, in place, in one pass (see the module docstring).

    Args:
        param, exp_avg, exp_avg_sq: updated in place; C-contiguous NumPy arrays.
        grad: the gradient, any layout (a non-contiguous one is copied first), or a NumPy
            scalar for a 0-d parameter.
        step: the step number t after this update's increment (1 for the first).

    All four have the parameter's shape and dtype (float32 or float64): anything else
    is a ValueError that says what differs (:func:`why_not_fused` asks without raising).
    """
    reason = why_not_fused(param, grad, exp_avg, exp_avg_sq)
    if reason is not None:
        raise ValueError(f"adamw_cpu.fused_step: {reason}")
    cast = param.dtype.type                      # Python floats -> the arrays' dtype
    scalars = [cast(s) for s in step_scalars(lr, beta1, beta2, eps, weight_decay, step)]
    update = _update_parallel if param.size >= PARALLEL_FROM else _update_serial
    update(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1),     # (n,) views
           exp_avg.reshape(-1), exp_avg_sq.reshape(-1), *scalars)


__all__ = ["DTYPES", "PARALLEL_FROM", "why_not_fused", "fused_step"]
