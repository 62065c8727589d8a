"""Testing helpers that users can call too: the float64 central-difference gradient check.

``gradcheck(fn, inputs)`` compares the gradients that minidetr's backward computes with
central finite differences, element by element, and on failure names the worst element::

    >>> import numpy as np
    >>> from minidetr import functional as F
    >>> from minidetr.testing import gradcheck
    >>> x = np.random.default_rng(0).normal(size=(3, 4))
    >>> gradcheck(lambda t: F.softmax(t, axis=-1), [x])      # raises on failure
    GradcheckResult(max_error=...)

The scalar that is differentiated is ``sum(fn(*inputs) * G)`` for a fixed random ``G``
(the "upstream gradient"), so every output element takes part with a different weight.
The error of one element is ``|analytic - numeric| / max(1, |analytic|, |numeric|)``: a
relative error for large gradients and an absolute one for small ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .autograd import Tensor, no_grad
from .backend import to_numpy


class GradcheckError(AssertionError):
    """A gradient check failed; the message names the input, element and both values."""


@dataclass
class GradcheckResult:
    max_error: float
    worst_input: int
    worst_index: tuple
    analytic: float
    numeric: float

    def __repr__(self):
        return (f"GradcheckResult(max_error={self.max_error:.3g}, input={self.worst_input}, "
                f"index={self.worst_index}, analytic={self.analytic:.10g}, "
                f"numeric={self.numeric:.10g})")


def _scalar_objective(fn, arrays, upstream):
    with no_grad():
        out = fn(*[Tensor(a) for a in arrays])
    return float((to_numpy(out.data).astype(np.float64) * upstream).sum())


def gradcheck(fn, inputs, wrt=None, eps=1e-6, tol=1e-6, seed=0, name=None, raise_on_fail=True):
    """Check the analytic gradients of ``fn`` against central differences in float64.

    Args:
        fn: a callable taking Tensors (one per entry of ``inputs``) and returning a Tensor.
        inputs: arrays (NumPy or CuPy). Floating ones are used in float64.
        wrt: indices of the inputs to differentiate (default: every floating input).
        eps: the finite-difference step.
        tol: the largest accepted error (see the module docstring for its definition).
        seed: seeds the random upstream gradient; printed in failure messages.
        name: a label used in the failure message (default: ``fn.__name__``).
        raise_on_fail: raise :class:`GradcheckError` (default) or just return the result.

    Returns:
        GradcheckResult for the worst element over all checked inputs.
    """
    label = name or getattr(fn, "__name__", "fn")
    arrays = []
    for a in inputs:
        if isinstance(a, np.generic):          # a NumPy scalar: make it a (0-d) array
            a = np.array(a)
        if hasattr(a, "dtype") and a.dtype.kind == "f":
            if a.dtype != np.float64:
                raise TypeError(f"gradcheck({label}): inputs must be float64, got {a.dtype} "
                                "(float32 differences are too noisy to check gradients)")
            arrays.append(a.copy())
        else:
            arrays.append(a)
    if wrt is None:
        wrt = [i for i, a in enumerate(arrays) if hasattr(a, "dtype") and a.dtype.kind == "f"]

    # analytic gradients
    tensors = [Tensor(a, requires_grad=(i in wrt)) for i, a in enumerate(arrays)]
    out = fn(*tensors)
    rng = np.random.default_rng(seed)
    upstream = rng.normal(size=out.shape)
    out.backward(out.xp.asarray(upstream, dtype=out.dtype))

    worst = GradcheckResult(0.0, -1, (), 0.0, 0.0)
    for i in wrt:
        if tensors[i].grad is None:
            analytic = np.zeros(arrays[i].shape)
        else:
            analytic = to_numpy(tensors[i].grad)
        x = arrays[i]
        flat = x.reshape(-1)                     # a view: perturbing it perturbs x
        numeric = np.zeros(x.size)
        for j in range(x.size):
            orig = flat[j].item()
            flat[j] = orig + eps
            f_plus = _scalar_objective(fn, arrays, upstream)
            flat[j] = orig - eps
            f_minus = _scalar_objective(fn, arrays, upstream)
            flat[j] = orig
            numeric[j] = (f_plus - f_minus) / (2 * eps)
        numeric = numeric.reshape(x.shape)
        err = np.abs(analytic - numeric) / np.maximum(1.0, np.maximum(np.abs(analytic), np.abs(numeric)))
        if err.size and err.max() >= worst.max_error:
            k = np.unravel_index(int(err.argmax()), err.shape)
            worst = GradcheckResult(float(err.max()), i, tuple(int(v) for v in k),
                                    float(analytic[k]), float(numeric[k]))
    if raise_on_fail and worst.max_error > tol:
        raise GradcheckError(
            f"gradcheck({label}) failed for input {worst.worst_input} at index "
            f"{worst.worst_index}: analytic {worst.analytic:.10g} vs numeric "
            f"{worst.numeric:.10g} (error {worst.max_error:.3g} > tol {tol:g}; seed {seed})")
    return worst


def assert_allclose(actual, desired, rtol=1e-7, atol=0.0, what="arrays"):
    """Like numpy.testing.assert_allclose, for NumPy or CuPy arrays, naming the worst element."""
    a = to_numpy(actual.data if isinstance(actual, Tensor) else actual).astype(np.float64)
    d = to_numpy(desired.data if isinstance(desired, Tensor) else desired).astype(np.float64)
    if a.shape != d.shape:
        raise AssertionError(f"{what}: shapes differ, {a.shape} vs {d.shape}")
    diff = np.abs(a - d)
    bound = atol + rtol * np.abs(d)
    bad = ~(diff <= bound)
    if bad.any():
        excess = np.where(bad, diff - bound, -np.inf)
        k = np.unravel_index(int(np.nanargmax(np.where(np.isnan(excess), np.inf, excess))), a.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.size} elements differ; worst at index "
            f"{tuple(int(v) for v in k)}: {a[k]!r} vs {d[k]!r} (|diff| {diff[k]:.3g}, "
            f"rtol {rtol:g}, atol {atol:g})")
