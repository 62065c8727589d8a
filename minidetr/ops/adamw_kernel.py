"""The whole AdamW update of one parameter in one GPU kernel (a ``cupy.ElementwiseKernel``).

Why. The readable update in :meth:`minidetr.optim.AdamW.step` is one array operation
per line. On CuPy every operation is a kernel launch, 14 per parameter::

    p *= 1 - lr wd                              1 launch
    m *= b1;  m += (1 - b1) * g                 1 + 2
    v *= b2;  v += (1 - b2) * (g * g)           1 + 3
    denom = sqrt(v) / sqrt(bc2) + eps           3
    p -= (lr / bc1) * m / denom                 3

so 4 172 launches per training step for the paper model's 298 trainable tensors, most
of them on tiny arrays, each costing a few microseconds of launch overhead, and 8
temporary arrays per parameter. Here the same arithmetic is the body of one
ElementwiseKernel: thread ``i`` reads ``grad[i]``, ``param[i]``, ``exp_avg[i]`` and
``exp_avg_sq[i]`` once and writes the last three back. One launch per parameter, no
temporaries.

Same arithmetic, same order. The body (:data:`OPERATION`) computes the update with the
operations of the readable chain in the chain's order, in the parameter's dtype ``T``
(float32 or float64). The scalars are computed on the host exactly as the chain computes
them (Python floats, :func:`step_scalars`) and passed as ``T``: for float32 parameters
they are rounded to float32 once, which is what NumPy 2 and CuPy do with a Python scalar
in ``float32_array * 0.9``. So each product, sum, square root and quotient is rounded
to ``T`` exactly where the chain rounds it.

Floating-point contraction (FMA). By default nvcc and NVRTC (which CuPy uses to
compile ElementwiseKernels) *contract* ``a * b + c`` into one fused multiply-add
instruction: the product is not rounded before the addition, so the result can differ
from the chain's in the last bit (e.g. in ``exp_avg * beta1 + one_minus_beta1 * grad``).
The chain itself can never contract: every CuPy operation rounds its result to memory.
Such a difference is harmless for training, but it would make ``fused=True`` and
``fused=False`` drift apart bit by bit over a run. This kernel is therefore compiled
with ``--fmad=false`` (:data:`OPTIONS`): every product and sum is rounded, as in the
chain, at the cost of a few extra instructions in a kernel whose time is memory
traffic. (The GPU's float ``/`` and ``sqrt`` are correctly rounded under CuPy's default
flags, as NumPy's are.) The CPU harness that tests this body compiles it with g++'s
``-ffp-contract=off`` for the same reason, and there it equals the chain bit for bit.

    >>> kernel = kernel_for(cupy)                             # doctest: +SKIP
    >>> fused_step(kernel, p, g, m, v, lr=2e-4, beta1=0.9, beta2=0.999, eps=1e-8,
    ...            weight_decay=1e-4, step=1)                 # doctest: +SKIP

Shapes: ``param``, ``grad``, ``exp_avg``, ``exp_avg_sq`` all have the parameter's
shape (any, also 0-d or one element) and dtype; the scalars are numbers.
"""
from __future__ import annotations

import functools
import math

NAME = "minidetr_adamw_step"

# Inputs: the gradient, then the per-step scalars (in the order of step_scalars()).
IN_PARAMS = ("T grad, T decay, T beta1, T one_minus_beta1, T beta2, T one_minus_beta2, "
             "T step_size, T sqrt_bias_correction2, T eps")
# Outputs, updated in place (read, then written, by the body).
OUT_PARAMS = "T param, T exp_avg, T exp_avg_sq"

# One AdamW update of element i; the comments give the line of the readable chain.
OPERATION = """
param = param * decay;                                          // p *= 1 - lr wd
exp_avg = exp_avg * beta1 + one_minus_beta1 * grad;             // m = b1 m + (1 - b1) g
exp_avg_sq = exp_avg_sq * beta2 + one_minus_beta2 * (grad * grad);  // v = b2 v + (1 - b2) g^2
const T denom = sqrt(exp_avg_sq) / sqrt_bias_correction2 + eps; // sqrt(v) / sqrt(bc2) + eps
param = param - step_size * exp_avg / denom;                    // p -= (lr / bc1) m / denom
"""

# NVRTC flags: no fused multiply-add contraction (see the module docstring).
OPTIONS = ("--fmad=false",)


@functools.lru_cache(maxsize=None)
def kernel_for(xp):
    """The fused AdamW kernel of the array module ``xp`` (cupy, or any module with CuPy's
    ``ElementwiseKernel``, e.g. :mod:`minidetr.testing.fakecupy`). Built once per module; one
    object serves float32 and float64 (CuPy compiles each dtype on first use)."""
    return xp.ElementwiseKernel(IN_PARAMS, OUT_PARAMS, OPERATION, NAME, options=OPTIONS)


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: int) -> tuple:
    """The scalar inputs of step ``step`` (1, 2, ...), after ``grad``, in kernel order:
    ``(1 - lr wd, b1, 1 - b1, b2, 1 - b2, lr / bc1, sqrt(bc2), eps)`` with the bias
    corrections ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``, computed in Python floats as
    the readable chain computes them."""
    bias_correction1 = 1.0 - beta1 ** step
    bias_correction2 = 1.0 - beta2 ** step
    return (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
            lr / bias_correction1, math.sqrt(bias_correction2), eps)


def fused_step(kernel, param, grad, exp_avg, exp_avg_sq, *, lr: float, beta1: float,
               beta2: float, eps: float, weight_decay: float, step: int):
    """One AdamW update of one parameter, in place, in one launch of ``kernel``.

    Args:
        kernel: :func:`kernel_for` of the arrays' module (or the CPU harness's
            ``CpuElementwiseKernel`` built from :data:`IN_PARAMS`, :data:`OUT_PARAMS`,
            :data:`OPERATION`).
        param, exp_avg, exp_avg_sq: updated in place.
        grad: the gradient, same shape and dtype as ``param``.
        step: the step number t after this update's increment (1 for the first).
    """
    kernel(grad, *step_scalars(lr, beta1, beta2, eps, weight_decay, step),
           param, exp_avg, exp_avg_sq)


__all__ = ["NAME", "IN_PARAMS", "OUT_PARAMS", "OPERATION", "OPTIONS", "kernel_for",
           "step_scalars", "fused_step"]
