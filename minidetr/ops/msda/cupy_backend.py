"""The ``"cupy"`` backend: the CUDA C kernels of ``cupy_kernels.cu``, compiled by CuPy.

``cupy.RawModule`` compiles the kernel file with NVRTC once per device (cached), asking
for the template instantiations by name (``msda_forward<float, 4>`` and so on). This
module plans the launch (vector width, lanes per head, grid) and calls the kernels; the
design of the kernels themselves is in ``cupy_kernels.cu`` and ``docs/gpu-kernels.md``.

The planning and launching code is written against a ``launch(name, grid, block, args)``
callable and the array module of the data, so the tests run this very code with NumPy
arrays and :mod:`minidetr.ops.msda.cpu_harness`, which executes the same kernels on
the CPU. Importing this module never needs CuPy; :func:`is_available` says whether it
can run.

Shapes:
    value                (N, S, M, D)
    spatial_shapes       (L, 2)  int64, rows (H_l, W_l)
    level_start_index    (L,)    int64
    sampling_locations   (N, Lq, M, L, K, 2)  normalised (x, y)
    attention_weights    (N, Lq, M, L, K)
    output               (N, Lq, M * D)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...backend import cupy_available, get_array_module, why_no_cupy

KERNEL_FILE = Path(__file__).with_name("cupy_kernels.cu")
COMPILE_OPTIONS = ("--std=c++17",)

# The C++ scalar type of each NumPy dtype, and the vector widths compiled for it (the
# widest first): 16-byte loads are 4 floats or 2 doubles.
SCALAR_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
VECTOR_WIDTHS = {"float": (4, 2, 1), "double": (2, 1)}
THREADS_PER_BLOCK = 256
WARP_SIZE = 32
_INT32_MAX = 2**31 - 1


def kernel_names() -> tuple[str, ...]:
    """The template instantiations to compile, spelled as the kernels are looked up."""
    names = []
    for scalar, widths in VECTOR_WIDTHS.items():
        for vec in widths:
            for kernel in ("msda_forward", "msda_backward", "msda_gather_grad_value"):
                names.append(f"{kernel}<{scalar}, {vec}>")
        names.append(f"msda_value_contributions<{scalar}>")
    return tuple(names)


# --------------------------------------------------------------------------- availability
def is_available():
    """(True, description) when CuPy sees a GPU that can run the kernels, else (False, why)."""
    if not cupy_available():
        return False, why_no_cupy()
    import cupy as cp
    try:
        device = cp.cuda.Device()
        capability = int(device.compute_capability)          # e.g. "90" for 9.0
        if capability < 60:
            return False, (f"GPU {device.id} has compute capability {capability / 10}; "
                           "the kernels need 6.0 or newer (atomicAdd on double)")
        _compiled_module(device.id)
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"the CUDA kernels could not be compiled or loaded: {e}"
    return True, f"CuPy {cp.__version__}, CUDA kernels on GPU {device.id}"


@functools.lru_cache(maxsize=None)
def _compiled_module(device_id: int):
    """``cupy_kernels.cu`` compiled by NVRTC for one device (cached per device)."""
    import cupy as cp
    with cp.cuda.Device(device_id):
        module = cp.RawModule(code=KERNEL_FILE.read_text(), options=COMPILE_OPTIONS,
                              name_expressions=kernel_names())
        module.compile()
    return module


@functools.lru_cache(maxsize=None)
def _compiled_kernel(device_id: int, name: str):
    """One kernel of the module (``RawModule.get_function`` builds a new object per call,
    so the kernels are looked up once and kept)."""
    return _compiled_module(device_id).get_function(name)


def _cupy_launcher(device_id: int):
    """A ``launch(name, grid, block, args)`` that runs the compiled kernels on a GPU."""
    import cupy as cp

    def launch(name, grid, block, args):
        with cp.cuda.Device(device_id):                 # on CuPy's current stream
            _compiled_kernel(device_id, name)((grid,), (block,), args)
    return launch


# --------------------------------------------------------------------------- launch plan
@dataclass(frozen=True)
class LaunchPlan:
    """How the kernels are launched for one problem.

    scalar:            "float" or "double" (the template argument T)
    vector_width:      VEC, scalars per load/store (1, 2 or 4)
    group_size:        G, the lanes that share one head (a power of two <= 32)
    threads_per_block: a multiple of 32
    """
    scalar: str
    vector_width: int
    group_size: int
    threads_per_block: int

    def blocks(self, groups: int) -> int:
        """Blocks needed to give ``groups`` heads (or rows) one group of lanes each."""
        return -(-groups * self.group_size // self.threads_per_block)

    def name(self, kernel: str) -> str:
        return f"{kernel}<{self.scalar}, {self.vector_width}>"


def _address(array) -> int:
    """The device or host address of an array's first element."""
    interface = getattr(array, "__cuda_array_interface__", None) or array.__array_interface__
    return interface["data"][0]


def plan_launch(dtype, D: int, arrays=(), vector_width=None,
                threads_per_block=THREADS_PER_BLOCK) -> LaunchPlan:
    """Choose the vector width and the group size for D channels per head.

    The vector width is the widest of ``VECTOR_WIDTHS`` that divides D and to whose byte
    size every array in ``arrays`` is aligned (a channel slice starting at a multiple of
    VEC is then aligned too), unless ``vector_width`` asks for one. A head's D channels
    need ceil(D / VEC) lanes; the group is that many rounded up to a power of two, at
    most a warp (32): with more channels, each lane takes several VEC-wide slices.
    """
    dtype = np.dtype(dtype)
    if dtype not in SCALAR_TYPES:
        raise TypeError(f"the cupy backend supports float32 and float64, got {dtype}")
    scalar = SCALAR_TYPES[dtype]
    if threads_per_block % WARP_SIZE or not WARP_SIZE <= threads_per_block <= 1024:
        raise ValueError(f"threads_per_block must be a multiple of 32 in [32, 1024], "
                         f"got {threads_per_block}")

    def fits(vec):
        return D % vec == 0 and all(_address(a) % (vec * dtype.itemsize) == 0 for a in arrays)

    if vector_width is None:
        vector_width = next(v for v in VECTOR_WIDTHS[scalar] if fits(v))
    elif vector_width not in VECTOR_WIDTHS[scalar] or not fits(vector_width):
        raise ValueError(f"vector_width={vector_width} is not possible for {scalar} with "
                         f"D={D} (allowed: {VECTOR_WIDTHS[scalar]}, dividing D, aligned)")
    lanes = max(1, -(-D // vector_width))
    group_size = min(WARP_SIZE, 1 << (lanes - 1).bit_length())
    return LaunchPlan(scalar, vector_width, group_size, threads_per_block)


def _sizes(*sizes):
    """Sizes as the kernels' ``int`` arguments, refusing any that do not fit."""
    for s in sizes:
        if s > _INT32_MAX:
            raise ValueError(f"a size of {s} does not fit the kernels' 32-bit int arguments")
    return tuple(np.int32(s) for s in sizes)


# --------------------------------------------------------------------------- host logic
def run_forward(launch, plan: LaunchPlan, value, spatial_shapes, level_start_index,
                sampling_locations, attention_weights):
    """Launch ``msda_forward``: one group of ``plan.group_size`` lanes per head (n, q, m).

    Returns output (N, Lq, M * D).
    """
    xp = get_array_module(value)
    N, S, M, D = value.shape
    _, Lq, _, L, K = attention_weights.shape
    output = xp.empty((N, Lq, M, D), dtype=value.dtype)      # every element is written
    if output.size:
        launch(plan.name("msda_forward"), plan.blocks(N * Lq * M), plan.threads_per_block,
               (value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, output) + _sizes(N, S, M, D, Lq, L, K, plan.group_size))
    return output.reshape(N, Lq, M * D)                      # head-major channels m*D + d


def run_backward(launch, plan: LaunchPlan, grad_output, value, spatial_shapes,
                 level_start_index, sampling_locations, attention_weights,
                 deterministic=False):
    """Launch the backward kernels; returns (grad_value, grad_locations, grad_weights).

    ``msda_backward`` computes the gradients of the locations and weights (each (head,
    l, k) has one owner lane) and, unless ``deterministic``, adds grad_value with
    atomicAdd, whose summation order (hence the last bits of float results) changes from
    run to run. With ``deterministic=True`` grad_value is instead gathered:

    1. ``msda_value_contributions`` lists, for every corner of every sampling point
       (entry e = 4 * point + corner), the value row it feeds and its coefficient a*w;
    2. the entries are sorted by (row, e), here on the host side with ``xp.argsort``,
       and ``xp.searchsorted`` finds where each row's run of entries starts;
    3. ``msda_gather_grad_value`` gives each value row one group of lanes that sums its
       entries in that order: same bits on every run, no atomics, at the price of
       three arrays of 4 * N * Lq * M * L * K int64 and a sort.
    """
    xp = get_array_module(value)
    N, S, M, D = value.shape
    _, Lq, _, L, K = attention_weights.shape
    grad_value = xp.zeros_like(value)                        # (N, S, M, D), accumulated into
    grad_locations = xp.empty_like(sampling_locations)       # (N, Lq, M, L, K, 2), all written
    grad_weights = xp.empty_like(attention_weights)          # (N, Lq, M, L, K), all written
    if attention_weights.size == 0:
        return grad_value, xp.zeros_like(grad_locations), xp.zeros_like(grad_weights)
    sizes = _sizes(N, S, M, D, Lq, L, K, plan.group_size)
    launch(plan.name("msda_backward"), plan.blocks(N * Lq * M), plan.threads_per_block,
           (grad_output, value, spatial_shapes, level_start_index, sampling_locations,
            attention_weights, grad_value, grad_locations, grad_weights)
           + sizes + (np.int32(0 if deterministic else 1),))
    if deterministic and grad_value.size:
        _gather_grad_value(launch, plan, grad_output, spatial_shapes, level_start_index,
                           sampling_locations, attention_weights, grad_value)
    return grad_value, grad_locations, grad_weights


def _gather_grad_value(launch, plan, grad_output, spatial_shapes, level_start_index,
                       sampling_locations, attention_weights, grad_value):
    """Fill grad_value without atomics (see :func:`run_backward`, steps 1 to 3)."""
    xp = get_array_module(grad_value)
    N, S, M, D = grad_value.shape
    _, Lq, _, L, K = attention_weights.shape
    points = N * Lq * M * L * K
    entries = 4 * points                                     # one per corner of a point
    rows = N * S * M                                         # value rows (n, s, m)
    target = xp.empty(entries, dtype=np.int64)               # row of each entry (rows: outside)
    coefficient = xp.empty(entries, dtype=grad_value.dtype)  # a * w of each entry
    block = plan.threads_per_block
    launch(f"msda_value_contributions<{plan.scalar}>", -(-points // block), block,
           (spatial_shapes, level_start_index, sampling_locations, attention_weights,
            target, coefficient) + _sizes(N, S, M, Lq, L, K))
    order, run_start = sort_entries_by_row(target, rows)
    launch(plan.name("msda_gather_grad_value"), plan.blocks(rows), plan.threads_per_block,
           (grad_output, order, run_start, coefficient, grad_value)
           + _sizes(N, S, M, D, L, K, plan.group_size))


def sort_entries_by_row(target, rows):
    """Sort the entries of the deterministic backward by (value row, entry index).

    Args:
        target: (E,) int64, the value row of each entry, ``rows`` for "no row"; it is
            overwritten (used as the sort key).
        rows: the number of value rows, N * S * M.

    Returns:
        ``order`` (E,) int64, the entries sorted, and ``run_start`` (rows + 1,) int64:
        row r's entries are ``order[run_start[r]:run_start[r + 1]]``, in increasing e.

    The key ``row * E + e`` is unique, so the order does not depend on the stability of
    the sort (NumPy and CuPy sorts differ); ``key // E`` is the row again.
    """
    xp = get_array_module(target)
    entries = target.shape[0]
    if (rows + 1) * entries >= 2**63:
        raise ValueError("the problem is too large for deterministic=True "
                         f"({rows} value rows x {entries} entries overflow an int64 key)")
    key = target                                             # reused in place
    key *= entries
    key += xp.arange(entries, dtype=np.int64)
    order = xp.argsort(key)                                  # (E,)
    run_start = xp.searchsorted(key[order], xp.arange(rows + 1, dtype=np.int64) * entries)
    return (xp.ascontiguousarray(order, dtype=np.int64),
            xp.ascontiguousarray(run_start, dtype=np.int64))   # (rows + 1,)


# --------------------------------------------------------------------------- backend API
def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            *, vector_width=None, threads_per_block=THREADS_PER_BLOCK):
    """Multi-scale deformable attention on the GPU (validated CuPy arrays).

    ``vector_width`` and ``threads_per_block`` are tuning knobs for benchmarks and tests;
    the defaults choose the widest aligned vector and 256 threads.

    Shapes: see the module docstring; returns (N, Lq, M * D).
    """
    plan = plan_launch(value.dtype, value.shape[3], (value,), vector_width, threads_per_block)
    return run_forward(_cupy_launcher(value.device.id), plan, value, spatial_shapes,
                       level_start_index, sampling_locations, attention_weights)


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, *, deterministic=False, vector_width=None,
             threads_per_block=THREADS_PER_BLOCK):
    """Gradients of :func:`forward` w.r.t. value, sampling_locations, attention_weights.

    ``deterministic=True`` computes grad_value without atomics, bit-identical from run
    to run (slower, more memory; see :func:`run_backward`).

    Shapes: grad_output (N, Lq, M * D); returns (N, S, M, D), (N, Lq, M, L, K, 2),
    (N, Lq, M, L, K).
    """
    plan = plan_launch(value.dtype, value.shape[3], (value, grad_output), vector_width,
                       threads_per_block)
    return run_backward(_cupy_launcher(value.device.id), plan, grad_output, value,
                        spatial_shapes, level_start_index, sampling_locations,
                        attention_weights, deterministic=deterministic)
