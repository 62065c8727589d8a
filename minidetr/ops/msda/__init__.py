"""Multi-scale deformable attention (MSDA): the op at the heart of Deformable DETR.

Two ways to call it:

* plain arrays (notebooks, tests, benchmarks)::

      out = msda.forward(value, spatial_shapes, level_start_index,
                         sampling_locations, attention_weights, backend="numba")
      grad_value, grad_loc, grad_attn = msda.backward(grad_out, value, ..., backend="numba")

* Tensors, with autograd (the model): :func:`ms_deform_attn`, i.e.
  :class:`MSDeformAttnFunction`.

Derivation: docs/deformable-attention.md, sections "3. Gradients of bilinear sampling" and
"4. The softmax-weighted sum and its gradients".

Backends are interchangeable implementations of the same two functions, registered in
``_BACKENDS`` by module name and imported only when first used:

==============  ===========================================  =======================
name            module                                       arrays
==============  ===========================================  =======================
``numpy``       :mod:`.reference` (explicit bilinear; the     NumPy or CuPy
                oracle of every test)
``numba``       :mod:`.numba_cpu` (parallel CPU kernels)      NumPy
``cupy``        ``.cupy_backend`` (CUDA kernels)              CuPy
``numba-cuda``  ``.numba_cuda`` (CUDA kernels via Numba)      CuPy
==============  ===========================================  =======================

A backend module exposes ``is_available() -> (bool, reason)``, ``forward(value,
spatial_shapes, level_start_index, sampling_locations, attention_weights)`` and
``backward(grad_output, value, ...) -> (grad_value, grad_sampling_locations,
grad_attention_weights)``. It receives arrays already checked by :func:`validate_inputs`:
C-contiguous, one float dtype, ``spatial_shapes`` and ``level_start_index`` int64 on the
same device as ``value``. :func:`backend_module` returns the module of an available
backend (the benchmarks call it directly, on inputs checked once), and
:func:`substitute_backend` swaps in a stand-in for a block (the CPU test bed of the GPU
path, :mod:`minidetr.testing.fakecupy`, does).

Shapes:
    value                (N, S, M, D)        S = sum_l H_l * W_l
    spatial_shapes       (L, 2)              integer rows (H_l, W_l)
    level_start_index    (L,)                exclusive cumulative sum of H_l * W_l
    sampling_locations   (N, Lq, M, L, K, 2) normalised (x, y), 0..1 over the padded map
    attention_weights    (N, Lq, M, L, K)
    output               (N, Lq, M * D)      channel index m * D + d
"""
from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager

import numpy as np

from ...autograd import Function, Tensor
from ...backend import get_array_module, is_cupy_array, to_numpy

# The registry. Another backend is one more line here and one module with the three
# functions described above.
_BACKENDS = {"numpy": "minidetr.ops.msda.reference", "numba": "minidetr.ops.msda.numba_cpu",
             "cupy": "minidetr.ops.msda.cupy_backend", "numba-cuda": "minidetr.ops.msda.numba_cuda"}

# Which arrays each backend accepts. The reference is written with ``xp`` from the data,
# so it runs on either device (it is the oracle on the GPU too).
_DEVICES = {"numpy": ("cpu", "cuda"), "numba": ("cpu",), "cupy": ("cuda",),
            "numba-cuda": ("cuda",)}

# backend=None picks the first available backend for the arrays' device.
_AUTO_ORDER = {"cpu": ("numba", "numpy"), "cuda": ("cupy", "numba-cuda", "numpy")}


# Modules standing in for a registered backend (see substitute_backend); empty normally.
_substitutes = {}


# --------------------------------------------------------------------------- registry
def _load(name):
    """The module of backend ``name``: a :func:`substitute_backend` stand-in, or the
    registered module (imported on first use)."""
    if name in _substitutes:
        return _substitutes[name]
    return importlib.import_module(_BACKENDS[name])


@functools.lru_cache(maxsize=None)
def backend_status(name: str):
    """``(available, reason)`` for one backend name; the module is imported on first use.

    A module that does not exist yet, or fails to import, is reported as unavailable.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown MSDA backend {name!r}; known: {sorted(_BACKENDS)}")
    try:
        module = _load(name)
    except ImportError as e:
        return False, f"{_BACKENDS[name]} cannot be imported ({e})"
    try:
        ok, reason = module.is_available()
    except Exception as e:  # a broken driver must not break the CPU path
        return False, f"{name}.is_available() failed: {e}"
    return bool(ok), str(reason)


@contextmanager
def substitute_backend(name: str, module):
    """Inside the block, backend ``name`` is ``module`` (any object with the three
    functions ``is_available``, ``forward`` and ``backward``).

    The seam for stand-ins: :mod:`minidetr.testing.fakecupy` runs the ``"cupy"`` backend
    on the CPU this way. Undone on exit.
    """
    if name not in _BACKENDS:
        raise ValueError(f"unknown MSDA backend {name!r}; known: {sorted(_BACKENDS)}")
    if name in _substitutes:
        raise RuntimeError(f"MSDA backend {name!r} is already substituted")
    _substitutes[name] = module
    backend_status.cache_clear()
    try:
        yield module
    finally:
        del _substitutes[name]
        backend_status.cache_clear()


def backend_device(name: str) -> str:
    """``"cpu"`` or ``"cuda"``: where the arrays of backend ``name`` live (the reference,
    which runs on both, counts as a CPU backend)."""
    if name not in _DEVICES:
        raise ValueError(f"unknown MSDA backend {name!r}; known: {sorted(_DEVICES)}")
    return "cpu" if "cpu" in _DEVICES[name] else "cuda"


def available_backends():
    """Names of the backends that can run here, e.g. ``['numpy', 'numba']``."""
    return [name for name in _BACKENDS if backend_status(name)[0]]


def backend_module(name):
    """The module of an available backend (its ``forward``/``backward`` take arrays that
    :func:`validate_inputs` has checked); a RuntimeError says why one is unavailable."""
    ok, reason = backend_status(name)
    if not ok:
        raise RuntimeError(f"MSDA backend {name!r} is not available: {reason}")
    return _load(name)


def resolve_backend(backend, value) -> str:
    """The backend name to use for ``value``'s device; ``None`` picks automatically."""
    device = "cuda" if is_cupy_array(value) else "cpu"
    if backend is None:
        for name in _AUTO_ORDER[device]:
            if backend_status(name)[0]:
                return name
        raise RuntimeError(f"no MSDA backend is available for {device} arrays")  # pragma: no cover
    if backend not in _BACKENDS:
        raise ValueError(f"unknown MSDA backend {backend!r}; known: {sorted(_BACKENDS)}")
    if device not in _DEVICES[backend]:
        kind = "CuPy (GPU)" if device == "cuda" else "NumPy (CPU)"
        raise TypeError(f"MSDA backend {backend!r} does not take {kind} arrays; move the "
                        f"arrays with minidetr.backend.to_device or pick a backend for "
                        f"{device} arrays: {[n for n in _BACKENDS if device in _DEVICES[n]]}")
    return backend


# --------------------------------------------------------------------------- validation
def validate_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                    attention_weights, grad_output=None):
    """Check shapes and dtypes; return the arrays as the backends need them.

    Returns ``(value, spatial_shapes, level_start_index, sampling_locations,
    attention_weights)`` (and ``grad_output`` last when given): C-contiguous, floats of
    one dtype (float32 or float64; nothing is upcast), ``spatial_shapes`` and
    ``level_start_index`` as int64 arrays on ``value``'s device.

    Raises:
        TypeError: non-floating or mixed float dtypes, non-integer shapes, arrays on
            different devices.
        ValueError: wrong ranks, sizes that disagree between arguments, spatial shapes
            that do not add up to S, a level_start_index that is not their running sum.
    """
    floats = {"value": value, "sampling_locations": sampling_locations,
              "attention_weights": attention_weights}
    if grad_output is not None:
        floats["grad_output"] = grad_output
    for name, arr in floats.items():
        if not (hasattr(arr, "dtype") and hasattr(arr, "shape")):
            raise TypeError(f"msda: {name} must be a NumPy or CuPy array, got {type(arr).__name__}")
        if arr.dtype not in (np.float32, np.float64):
            raise TypeError(f"msda: {name} must be float32 or float64, got {arr.dtype}")
    dtypes = {name: str(arr.dtype) for name, arr in floats.items()}
    if len(set(dtypes.values())) > 1:
        raise TypeError(f"msda: all float arguments must share one dtype, got {dtypes}; "
                        "cast with .astype() (nothing is upcast silently)")
    xp = get_array_module(*floats.values())              # raises if devices are mixed

    _check_rank("value", value, 4, "(N, S, M, D)")
    _check_rank("sampling_locations", sampling_locations, 6, "(N, Lq, M, L, K, 2)")
    _check_rank("attention_weights", attention_weights, 5, "(N, Lq, M, L, K)")
    N, S, M, D = value.shape
    shapes_host = _integer_host_array("spatial_shapes", spatial_shapes)
    starts_host = _integer_host_array("level_start_index", level_start_index)
    if shapes_host.ndim != 2 or shapes_host.shape[1] != 2:
        raise ValueError(f"msda: spatial_shapes must be (L, 2) rows (H_l, W_l), "
                         f"got shape {shapes_host.shape}")
    L = shapes_host.shape[0]
    if L == 0 or (shapes_host <= 0).any():
        raise ValueError(f"msda: spatial_shapes must hold at least one level of positive "
                         f"sizes, got {shapes_host.tolist()}")
    sizes = shapes_host[:, 0] * shapes_host[:, 1]        # H_l * W_l
    if int(sizes.sum()) != S:
        raise ValueError(f"msda: spatial_shapes {shapes_host.tolist()} cover "
                         f"{int(sizes.sum())} positions but value has S = {S} (shape "
                         f"{tuple(value.shape)} = (N, S, M, D))")
    expected_starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    if starts_host.shape != (L,) or (starts_host != expected_starts).any():
        raise ValueError(f"msda: level_start_index must be the running sum of H_l * W_l, "
                         f"{expected_starts.tolist()}, got {starts_host.tolist()}")

    Lq = sampling_locations.shape[1]
    K = sampling_locations.shape[4]
    expected = {"sampling_locations": (N, Lq, M, L, K, 2),
                "attention_weights": (N, Lq, M, L, K)}
    if grad_output is not None:
        expected["grad_output"] = (N, Lq, M * D)
    for name, shape in expected.items():
        if tuple(floats[name].shape) != shape:
            raise ValueError(
                f"msda: {name} has shape {tuple(floats[name].shape)}, expected {shape} from "
                f"value (N, S, M, D) = {tuple(value.shape)}, {L} levels in spatial_shapes "
                f"and sampling_locations (N, Lq, M, L, K, 2) = "
                f"{tuple(sampling_locations.shape)}")

    out = [xp.ascontiguousarray(value), xp.asarray(shapes_host, dtype=np.int64),
           xp.asarray(starts_host, dtype=np.int64), xp.ascontiguousarray(sampling_locations),
           xp.ascontiguousarray(attention_weights)]
    if grad_output is not None:
        out.append(xp.ascontiguousarray(grad_output))
    return tuple(out)


def _check_rank(name, arr, ndim, layout):
    if arr.ndim != ndim:
        raise ValueError(f"msda: {name} must have {ndim} dimensions {layout}, "
                         f"got shape {tuple(arr.shape)}")


def _integer_host_array(name, arr):
    """An integer argument (array, Tensor or list) as a NumPy int64 array on the host."""
    if isinstance(arr, Tensor):
        arr = arr.data
    host = to_numpy(arr) if hasattr(arr, "dtype") else np.asarray(arr)
    if host.size == 0 and not hasattr(arr, "dtype"):
        host = host.astype(np.int64)                 # an empty list: no levels, no dtype
    if host.dtype.kind not in "iu":
        raise TypeError(f"msda: {name} must hold integers, got dtype {host.dtype}")
    return host.astype(np.int64)


# --------------------------------------------------------------------------- plain arrays
def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            backend="numpy"):
    """Multi-scale deformable attention on plain arrays: returns (N, Lq, M * D).

    ``backend``: a name from ``available_backends()``, or ``None`` to pick the fastest
    one for the arrays' device.
    """
    arrays = validate_inputs(value, spatial_shapes, level_start_index, sampling_locations,
                             attention_weights)
    return backend_module(resolve_backend(backend, arrays[0])).forward(*arrays)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, backend="numpy"):
    """Gradients of :func:`forward`: ``(grad_value, grad_sampling_locations,
    grad_attention_weights)``, shaped like value, sampling_locations, attention_weights.
    """
    *arrays, grad_output = validate_inputs(value, spatial_shapes, level_start_index,
                                           sampling_locations, attention_weights, grad_output)
    return backend_module(resolve_backend(backend, arrays[0])).backward(grad_output, *arrays)


# --------------------------------------------------------------------------- autograd
class MSDeformAttnFunction(Function):
    """The op as an autograd Function: gradients for value, locations and weights.

    ``spatial_shapes`` and ``level_start_index`` are constants (no gradient); ``backend``
    is a keyword constant (``None``: pick automatically).
    """

    @staticmethod
    def forward(ctx, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, backend=None):
        arrays = validate_inputs(value, spatial_shapes, level_start_index,
                                 sampling_locations, attention_weights)
        ctx.backend = resolve_backend(backend, arrays[0])
        ctx.save_for_backward(*arrays)
        return backend_module(ctx.backend).forward(*arrays)

    @staticmethod
    def backward(ctx, grad):
        arrays = ctx.saved_tensors
        xp = get_array_module(grad)
        grad_value, grad_loc, grad_attn = backend_module(ctx.backend).backward(
            xp.ascontiguousarray(grad), *arrays)
        need_value, _, _, need_loc, need_attn = ctx.needs_input_grad
        return (grad_value if need_value else None, None, None,
                grad_loc if need_loc else None, grad_attn if need_attn else None)


def ms_deform_attn(value, spatial_shapes, level_start_index, sampling_locations,
                   attention_weights, backend=None):
    """Multi-scale deformable attention on Tensors (differentiable in value, locations
    and weights). Shapes as in the module docstring; returns a Tensor (N, Lq, M * D).

    ``spatial_shapes`` and ``level_start_index`` may be lists or host arrays even when
    the value lives on the GPU (the model keeps them on the host). They are handed to the
    Function as nested lists, constants that autograd ignores, and copied to the value's
    device by :func:`validate_inputs`, so the GPU never has to send them back.
    """
    spatial_shapes = _integer_host_array("spatial_shapes", spatial_shapes).tolist()
    level_start_index = _integer_host_array("level_start_index", level_start_index).tolist()
    return MSDeformAttnFunction.apply(value, spatial_shapes, level_start_index,
                                      sampling_locations, attention_weights, backend=backend)


__all__ = ["forward", "backward", "available_backends", "backend_status", "backend_module",
           "backend_device", "substitute_backend", "validate_inputs", "resolve_backend",
           "MSDeformAttnFunction", "ms_deform_attn"]
