"""Run the CUDA kernels of ``cupy_kernels.cu`` on the CPU, unchanged, through ctypes.

``cpu_harness.cpp`` defines the handful of CUDA built-ins the kernels use (thread and
block indices, ``atomicAdd``, ``__shfl_down_sync`` with the warp run in lockstep) and
includes the kernel file; g++ compiles it into a shared library. :class:`CpuHarness`
then offers the same ``launch(name, grid, block, args)`` as the cupy backend, for NumPy
arrays, so the cupy backend's own planning and launching code
(:func:`~minidetr.ops.msda.cupy_backend.run_forward`, ``run_backward``) runs the CUDA
arithmetic on a machine without a GPU. It is slow (every thread is a coroutine): for
tests and for stepping through a kernel, not for work.

    >>> harness = build_harness("/tmp/msda-harness")          # doctest: +SKIP
    >>> out = harness.forward(value, shapes, starts, locations, weights)  # doctest: +SKIP
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np

from . import cupy_backend

SOURCE = Path(__file__).with_name("cpu_harness.cpp")
COMPILE_FLAGS = ("-std=c++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing")


def why_no_compiler(compiler: str = "g++") -> str | None:
    """None when ``compiler`` is on the PATH, else a reason (for skip messages)."""
    return None if shutil.which(compiler) else f"{compiler} is not installed"


def build_harness(directory, compiler: str = "g++") -> "CpuHarness":
    """Compile ``cpu_harness.cpp`` (with the kernels) into ``directory`` and load it."""
    reason = why_no_compiler(compiler)
    if reason:
        raise RuntimeError(f"cannot build the CPU harness: {reason}")
    library = Path(directory) / "libmsda_harness.so"
    library.parent.mkdir(parents=True, exist_ok=True)
    command = [compiler, *COMPILE_FLAGS, f"-I{SOURCE.parent}", str(SOURCE), "-o", str(library)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr}")
    return CpuHarness(library)


class CpuHarness:
    """The compiled harness: launch kernels by name on NumPy arrays."""

    def __init__(self, library_path):
        self.library = ctypes.CDLL(str(library_path))
        self.library.harness_launch.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int,
                                                ctypes.POINTER(ctypes.c_void_p)]
        self.library.harness_launch.restype = ctypes.c_int
        self.library.harness_last_error.restype = ctypes.c_char_p

    def launch(self, name, grid, block, args):
        """Run kernel ``name`` (e.g. ``"msda_forward<float, 4>"``) on grid x block threads.

        ``args`` follow the kernel's parameters: C-contiguous NumPy arrays for pointers,
        ``np.int32`` for ``int``. As with cuLaunchKernel, the library receives an array
        of pointers to the argument values.
        """
        holders = []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                if not a.flags.c_contiguous:
                    raise ValueError(f"{name}: argument {i} is not C-contiguous")
                holders.append(ctypes.c_void_p(a.ctypes.data))
            elif isinstance(a, np.int32):
                holders.append(ctypes.c_int32(int(a)))
            elif isinstance(a, np.int64):
                holders.append(ctypes.c_int64(int(a)))
            else:
                raise TypeError(f"{name}: argument {i} has unsupported type {type(a).__name__}")
        params = (ctypes.c_void_p * max(1, len(holders)))(
            *[ctypes.cast(ctypes.pointer(h), ctypes.c_void_p) for h in holders])
        if self.library.harness_launch(name.encode(), int(grid), int(block), params) != 0:
            raise RuntimeError(self.library.harness_last_error().decode())

    # The backend API, on NumPy arrays, through the cupy backend's host code.
    def forward(self, value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights, *, vector_width=None,
                threads_per_block=cupy_backend.THREADS_PER_BLOCK):
        plan = cupy_backend.plan_launch(value.dtype, value.shape[3], (value,), vector_width,
                                        threads_per_block)
        return cupy_backend.run_forward(self.launch, plan, value, spatial_shapes,
                                        level_start_index, sampling_locations,
                                        attention_weights)

    def backward(self, grad_output, value, spatial_shapes, level_start_index,
                 sampling_locations, attention_weights, *, deterministic=False,
                 vector_width=None, threads_per_block=cupy_backend.THREADS_PER_BLOCK):
        plan = cupy_backend.plan_launch(value.dtype, value.shape[3], (value, grad_output),
                                        vector_width, threads_per_block)
        return cupy_backend.run_backward(self.launch, plan, grad_output, value,
                                         spatial_shapes, level_start_index,
                                         sampling_locations, attention_weights,
                                         deterministic=deterministic)
