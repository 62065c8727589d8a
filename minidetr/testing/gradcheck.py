"""Testing helpers that users can call too: the float64 central-difference gradient check.

:func:`gradcheck` checks a function's gradients with respect to its inputs,
:func:`gradcheck_module` those of a module's parameters (a random sample of elements).

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

from ..autograd import Tensor, no_grad
from ..backend import to_numpy


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


# --------------------------------------------------------------------------- modules
@dataclass
class ModuleGradcheckResult:
    """The outcome of :func:`gradcheck_module`: the worst element and what was checked."""

    max_error: float
    objective: str
    parameter: str
    index: tuple
    analytic: float
    numeric: float
    checked: dict      # parameter name -> list of checked flat indices
    skipped: dict      # parameter name -> list of flat indices skipped at a kink
    largest: dict      # parameter name -> largest |numeric gradient| of its checked elements

    def __repr__(self):
        n_checked = sum(len(v) for v in self.checked.values())
        n_skipped = sum(len(v) for v in self.skipped.values())
        return (f"ModuleGradcheckResult(max_error={self.max_error:.3g}, "
                f"objective={self.objective!r}, parameter={self.parameter!r}, "
                f"index={self.index}, analytic={self.analytic:.10g}, "
                f"numeric={self.numeric:.10g}, checked={n_checked}, skipped={n_skipped})")


def _get_parameter(module, name):
    """The Parameter at the dotted path ``name`` (aliases of shared modules work too)."""
    obj = module
    for part in name.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise KeyError(f"gradcheck_module: {type(module).__name__} has no parameter "
                           f"{name!r} (no attribute {part!r})") from None
    if not isinstance(obj, Tensor) or not obj.requires_grad:
        raise KeyError(f"gradcheck_module: {name!r} is not a trainable parameter")
    return obj


def _objectives(value):
    """loss_fn's result as a dict name -> scalar Tensor."""
    items = value.items() if isinstance(value, dict) else [("loss", value)]
    result = {}
    for key, v in items:
        if not isinstance(v, Tensor) or v.size != 1:
            raise ValueError(f"gradcheck_module: loss_fn must return a scalar Tensor (or a "
                             f"dict of them); objective {key!r} is {type(v).__name__} of "
                             f"shape {getattr(v, 'shape', None)}")
        result[key] = v
    return result


def _same_branches(a, b):
    if len(a) != len(b):
        return False
    return all(np.array_equal(to_numpy(x), to_numpy(y)) for x, y in zip(a, b))


def gradcheck_module(module, loss_fn, param_names, n_elements_per_param=3, eps=1e-6,
                     tol=1e-6, seed=0, branches=None, max_tries_per_param=None,
                     raise_on_fail=True):
    """Check the gradients of a whole module's *parameters* against central differences.

    :func:`gradcheck` differentiates a function with respect to its inputs; here the
    variables are a module's parameters, of which only a random sample of elements is
    checked (a model has far too many for all of them)::

        model = build_model(get_config("tiny", dropout=0.0)).eval().astype(np.float64)
        gradcheck_module(model, lambda m: (m(images, mask)["pred_boxes"] * G).sum(),
                         ["transformer.level_embed", "class_embed.0.weight"])

    For every objective, the analytic gradient comes from one ``backward()``; for every
    sampled element ``x`` of a parameter, the numeric one is
    ``(loss(x + eps) - loss(x - eps)) / (2 eps)`` (both evaluated under ``no_grad``, all
    objectives from the same forward passes). The error is that of :func:`gradcheck`.

    **Kinks.** A piecewise-smooth model (ReLU, bilinear sampling, |x|, min/max) has no
    derivative where a branch changes, and a central difference that straddles such a
    point is wrong by O(1). If ``branches`` is given, it is called right after every
    evaluation of ``loss_fn`` and returns a list of arrays describing the discrete
    decisions of that evaluation (ReLU signs, bilinear cells, ...). An element whose
    ``x +- eps`` evaluations take other branches than ``x`` lies within ``eps`` of a kink:
    it is skipped (recorded in ``result.skipped``) and another element of the same
    parameter is drawn instead. Tolerances are never loosened.

    Args:
        module: a :class:`~minidetr.nn.Module` whose parameters are float64.
        loss_fn: ``loss_fn(module)`` -> a scalar Tensor, or a dict of named scalar
            Tensors (each is checked separately, from the same numeric evaluations).
        param_names: dotted parameter names (``"transformer.level_embed"``); names of
            shared modules' aliases are accepted.
        n_elements_per_param: how many elements of each parameter to check (all of a
            smaller parameter); drawn without replacement from ``seed``.
        eps, tol: finite-difference step and largest accepted error.
        seed: seeds the choice of elements; printed in failure messages.
        branches: optional callable returning the branch fingerprint described above.
        max_tries_per_param: elements tried per parameter before giving up on finding
            ``n_elements_per_param`` away from kinks (default 4x that number).
        raise_on_fail: raise :class:`GradcheckError` (default) or just return the result.

    Returns:
        :class:`ModuleGradcheckResult`: the worst element over all objectives, the checked
        and skipped elements of every parameter, and the largest |numeric gradient| seen
        per parameter (a parameter whose gradient is ~0 everywhere makes a vacuous check).

    Raises:
        GradcheckError: an error above ``tol`` (the message names the objective, the
            parameter, the element and both values), or a parameter for which no element
            away from a kink was found.
    """
    if n_elements_per_param < 1:
        raise ValueError(f"gradcheck_module: n_elements_per_param must be >= 1, "
                         f"got {n_elements_per_param}")
    max_tries = max_tries_per_param or 4 * n_elements_per_param
    params = {name: _get_parameter(module, name) for name in param_names}
    for name, p in params.items():
        if p.dtype != np.float64:
            raise TypeError(f"gradcheck_module: parameter {name!r} is {p.dtype}; cast the "
                            f"module with module.astype(np.float64) first")

    for name, p in params.items():
        if not p.data.flags.c_contiguous:
            raise ValueError(f"gradcheck_module: parameter {name!r} is not C-contiguous")

    # analytic gradients, one forward + backward per objective (backward frees the graph)
    module.zero_grad()
    values = _objectives(loss_fn(module))
    names, analytic = list(values), {}
    for i, key in enumerate(names):
        if i > 0:
            module.zero_grad()
            values = _objectives(loss_fn(module))
        values[key].backward()
        analytic[key] = {name: (np.zeros(p.shape) if p.grad is None else to_numpy(p.grad))
                         for name, p in params.items()}
    module.zero_grad()

    def evaluate():
        with no_grad():
            values = _objectives(loss_fn(module))
            fingerprint = branches() if branches is not None else []   # of this call
        return {k: float(to_numpy(v.data)) for k, v in values.items()}, fingerprint

    _, base_branches = evaluate()
    rng = np.random.default_rng(seed)
    all_checked, all_skipped, largest = {}, {}, {}    # keyed by parameter name
    worst = ModuleGradcheckResult(0.0, "", "", (), 0.0, 0.0, all_checked, all_skipped,
                                  largest)
    for name, p in params.items():
        flat = p.data.reshape(-1)                # a view: perturbing it perturbs p
        checked, skipped = [], []
        for j in rng.permutation(flat.size)[:max_tries].tolist():
            if len(checked) == n_elements_per_param:
                break
            orig = flat[j].item()
            flat[j] = orig + eps
            f_plus, branches_plus = evaluate()
            flat[j] = orig - eps
            f_minus, branches_minus = evaluate()
            flat[j] = orig
            if not (_same_branches(branches_plus, base_branches)
                    and _same_branches(branches_minus, base_branches)):
                skipped.append(j)
                continue
            checked.append(j)
            index = tuple(int(v) for v in np.unravel_index(j, p.shape))
            for key in names:
                a = float(analytic[key][name].reshape(-1)[j])
                n = (f_plus[key] - f_minus[key]) / (2 * eps)
                err = abs(a - n) / max(1.0, abs(a), abs(n))
                largest[name] = max(largest.get(name, 0.0), abs(n))
                if err >= worst.max_error:
                    worst = ModuleGradcheckResult(err, key, name, index, a, n,
                                                  all_checked, all_skipped, largest)
        if not checked:
            raise GradcheckError(f"gradcheck_module: every element tried of {name!r} "
                                 f"({len(skipped)}) lies within eps={eps:g} of a kink; "
                                 f"move the parameters off the kinks (seed {seed})")
        all_checked[name], all_skipped[name] = checked, skipped
    if raise_on_fail and worst.max_error > tol:
        raise GradcheckError(
            f"gradcheck_module failed for objective {worst.objective!r}, parameter "
            f"{worst.parameter!r} at index {worst.index}: analytic {worst.analytic:.10g} vs "
            f"numeric {worst.numeric:.10g} (error {worst.max_error:.3g} > tol {tol:g}; "
            f"seed {seed})")
    return worst
