"""The GPU kernels of multi-scale deformable attention, tested with and without a GPU.

Continuous integration has no GPU, so the kernels are checked three ways:

1. ``cupy_kernels.cu`` (the "cupy" backend) is compiled by nvcc for sm_80 and sm_90,
   both dtypes and every vector width, and must compile without warnings or register
   spills; and its arithmetic runs on the CPU in ``cpu_harness.cpp`` (built with g++),
   through the cupy backend's own launch code, against the NumPy reference: forward
   and all three gradients, float32 and float64, atomic and deterministic grad_value,
   shapes with borders, D = 5, 30, 32, 71. The harness's warp emulation is tested too.
2. ``numba_cuda.py`` runs under Numba's CUDA simulator, in a subprocess (the simulator
   is chosen when Numba is imported, so ``NUMBA_ENABLE_CUDASIM=1`` must not reach this
   process), on tiny shapes, against the reference.
3. With CuPy and a GPU: both backends against the reference to 1e-10 (float64) and
   1e-5 relative (float32), bit-reproducible deterministic gradients, and float64
   gradient checks of the autograd Function.

The benchmark's GPU helpers (floor bytes, peak bandwidth, touched rows) are plain
arithmetic and are tested here too. Each part is skipped, with the reason, where its tool (g++, nvcc, a GPU) is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from minidetr.backend import cupy_available, why_no_cupy
from minidetr.ops.msda import cupy_backend, numba_cuda, reference
from minidetr.testing import assert_allclose

REPO = Path(__file__).resolve().parents[2]
GRAD_NAMES = ("grad_value", "grad_sampling_locations", "grad_attention_weights")


def gpu(test):
    """Mark a test that needs CuPy and a CUDA device (skipped with the reason otherwise)."""
    skip = pytest.mark.skipif(not cupy_available(), reason=f"no GPU to test on: {why_no_cupy()}")
    return pytest.mark.gpu(skip(test))


# --------------------------------------------------------------------------- problems
@dataclass
class Problem:
    """One MSDA problem: the five inputs and an upstream gradient (NumPy arrays)."""
    value: np.ndarray                  # (N, S, M, D)
    spatial_shapes: np.ndarray         # (L, 2) int64
    level_start_index: np.ndarray      # (L,) int64
    sampling_locations: np.ndarray     # (N, Lq, M, L, K, 2)
    attention_weights: np.ndarray      # (N, Lq, M, L, K)
    grad_output: np.ndarray            # (N, Lq, M * D)

    @property
    def inputs(self):
        return (self.value, self.spatial_shapes, self.level_start_index,
                self.sampling_locations, self.attention_weights)


def make_problem(seed, *, N=1, Lq=3, M=2, D=5, levels=((4, 5), (2, 3), (1, 1)), K=2,
                 dtype=np.float64, smooth=False):
    """A small problem whose points fall inside, across the borders and outside the maps.

    Locations are uniform over [-0.25, 1.25] of each map, so some points have one to
    three neighbours outside and some are skipped; the first head's first points sit
    exactly on a map corner and on the opposite corner. With ``smooth=True`` (gradient
    checks) every point lies inside (-1, H) x (-1, W) with fractional pixel parts in
    [0.1, 0.9], away from the kinks of bilinear interpolation.
    """
    rng = np.random.default_rng(seed)
    shapes = np.array(levels, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    S, L = int(sizes.sum()), len(levels)
    value = rng.normal(size=(N, S, M, D))
    if smooth:
        hw = shapes[:, ::-1].astype(np.float64)                 # (L, 2) as (W_l, H_l)
        whole = rng.integers(-1, hw.astype(np.int64), size=(N, Lq, M, K, L, 2))
        pixel = whole + rng.uniform(0.1, 0.9, size=whole.shape)   # w_im, h_im
        locations = ((pixel + 0.5) / hw).transpose(0, 1, 2, 4, 3, 5)  # (N, Lq, M, L, K, 2)
    else:
        locations = rng.uniform(-0.25, 1.25, size=(N, Lq, M, L, K, 2))
        locations[0, 0, 0, 0, 0] = (0.0, 0.0)                    # top-left map corner
        locations[0, 0, 0, 0, K - 1] = (1.0, 1.0)                # bottom-right map corner
    weights = rng.uniform(0.05, 1.0, size=(N, Lq, M, L, K))
    grad_output = rng.normal(size=(N, Lq, M * D))
    f = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return Problem(f(value), shapes, starts, f(locations), f(weights), f(grad_output))


def tolerance(dtype):
    """(rtol, atol relative to the array's largest |value|) for comparisons with the
    reference: float64 agrees to rounding, float32 sums in another order."""
    return (1e-10, 1e-10) if np.dtype(dtype) == np.float64 else (1e-5, 1e-5)


def assert_matches_reference(outputs, problem, what, dtype):
    """outputs = (output, grad_value, grad_locations, grad_weights) vs the reference."""
    expected = (reference.forward(*problem.inputs),
                *reference.backward(problem.grad_output, *problem.inputs))
    rtol, atol = tolerance(dtype)
    for name, actual, desired in zip(("output",) + GRAD_NAMES, outputs, expected):
        assert actual.dtype == desired.dtype, f"{what} {name}: dtype {actual.dtype}"
        scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
        assert_allclose(actual, desired, rtol=rtol, atol=atol * scale, what=f"{what} {name}")


# --------------------------------------------------------------------------- planning
@pytest.mark.parametrize("dtype, D, vector_width, group_size", [
    (np.float32, 32, 4, 8),        # the paper's D: 8 lanes x float4
    (np.float32, 30, 2, 16),       # D not a multiple of 4: float2, 15 lanes -> 16
    (np.float32, 71, 1, 32),       # odd D > 32: scalars, each lane 2 or 3 channels
    (np.float32, 5, 1, 8),
    (np.float64, 32, 2, 16),       # doubles: at most 2 per 16-byte load
    (np.float64, 64, 2, 32),
])
def test_plan_picks_vector_width_and_group(dtype, D, vector_width, group_size):
    plan = cupy_backend.plan_launch(dtype, D, (np.empty(64, dtype),))
    assert (plan.vector_width, plan.group_size) == (vector_width, group_size)
    assert numba_cuda.group_size_for(D) == min(32, 1 << (D - 1).bit_length())


def test_plan_falls_back_to_scalars_on_misaligned_arrays():
    misaligned = np.empty(65, np.float32)[1:]                  # 4 bytes past an aligned start
    assert cupy_backend.plan_launch(np.float32, 32, (misaligned,)).vector_width == 1
    with pytest.raises(ValueError, match="vector_width=4"):
        cupy_backend.plan_launch(np.float32, 32, (misaligned,), vector_width=4)
    with pytest.raises(ValueError, match="threads_per_block"):
        cupy_backend.plan_launch(np.float32, 32, threads_per_block=100)


def test_gpu_backends_report_availability_cleanly():
    """Importing never fails; is_available says why not, instead of raising."""
    for module in (cupy_backend, numba_cuda):
        ok, reason = module.is_available()
        assert isinstance(ok, bool) and isinstance(reason, str) and reason
    assert cupy_backend.is_available()[0] == cupy_available()
    if not cupy_available():
        assert cupy_backend.is_available()[1] == why_no_cupy()


# --------------------------------------------------------------------------- nvcc
NVCC_ARCHS = ("sm_80", "sm_90")


@pytest.fixture(scope="module")
def nvcc_instantiations(tmp_path_factory):
    """A .cu file that includes the kernels and instantiates every name CuPy asks for."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed: the CUDA C source is not compiled")
    path = tmp_path_factory.mktemp("nvcc") / "instantiate.cu"
    entries = ",\n".join(f"    (void*)&{name}" for name in cupy_backend.kernel_names())
    path.write_text(f'#include "{cupy_backend.KERNEL_FILE}"\n'
                    f"void* msda_kernels[] = {{\n{entries}\n}};\n")
    return path


@pytest.mark.parametrize("arch", NVCC_ARCHS)
def test_cuda_source_compiles_with_nvcc(nvcc_instantiations, arch):
    cubin = nvcc_instantiations.with_suffix(f".{arch}.cubin")
    command = ["nvcc", "-std=c++17", f"-arch={arch}", "-cubin", "-Werror", "all-warnings",
               "-Xptxas", "-v", "-o", str(cubin), str(nvcc_instantiations)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
    assert cubin.stat().st_size > 0
    compiled = re.findall(r"Compiling entry function '(\w+)'", result.stderr)
    assert len(compiled) == len(cupy_backend.kernel_names()), result.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", result.stderr)]
    assert spills and not any(spills), f"register spills on {arch}:\n{result.stderr}"


# --------------------------------------------------------------------------- CPU harness
@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """cupy_kernels.cu compiled with g++ inside cpu_harness.cpp, loaded with ctypes."""
    from minidetr.ops.msda import cpu_harness
    reason = cpu_harness.why_no_compiler()
    if reason:
        pytest.skip(f"the CUDA kernels are not run on the CPU: {reason}")
    return cpu_harness.build_harness(tmp_path_factory.mktemp("harness"))


def _run_harness(harness, problem, deterministic=False, **knobs):
    output = harness.forward(*problem.inputs, **knobs)
    grads = harness.backward(problem.grad_output, *problem.inputs,
                             deterministic=deterministic, **knobs)
    return (output, *grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("D", [5, 30, 32, 71])
def test_cuda_kernels_on_cpu_match_reference(harness, dtype, D):
    # 27 heads: with 8 or 16 lanes per head the last warp is part idle, and its idle
    # lanes must still take part in the shuffles (the harness reports them otherwise).
    problem = make_problem(D, N=3, Lq=3, M=3, D=D, dtype=dtype)
    assert_matches_reference(_run_harness(harness, problem), problem,
                             f"CUDA kernels on the CPU ({np.dtype(dtype).name}, D={D})", dtype)
    # The deterministic path computes grad_value with other kernels; the rest is shared.
    grad_value = harness.backward(problem.grad_output, *problem.inputs, deterministic=True)[0]
    expected = reference.backward(problem.grad_output, *problem.inputs)[0]
    rtol, atol = tolerance(dtype)
    assert_allclose(grad_value, expected, rtol=rtol, atol=atol * np.abs(expected).max(),
                    what=f"deterministic grad_value ({np.dtype(dtype).name}, D={D})")


@pytest.mark.parametrize("vector_width", [1, 2, 4])
def test_cuda_kernels_on_cpu_every_vector_width_and_several_blocks(harness, vector_width):
    """Blocks of one warp: 27 heads x 8 (VEC 4) or 16 (VEC 2) lanes span 7 or 14 blocks,
    the last one part idle; with VEC 1 a head fills a warp."""
    problem = make_problem(7, N=3, Lq=3, M=3, D=32, dtype=np.float32)
    outputs = _run_harness(harness, problem, vector_width=vector_width, threads_per_block=32)
    assert_matches_reference(outputs, problem, f"vector width {vector_width}", np.float32)


def test_cuda_kernels_on_cpu_with_misaligned_arrays(harness):
    """A view that starts 4 bytes into an allocation forces scalar loads; still right."""
    problem = make_problem(11, D=32, dtype=np.float32)
    buffer = np.empty(problem.value.size + 1, np.float32)
    problem.value = buffer[1:].reshape(problem.value.shape)
    problem.value[...] = make_problem(11, D=32, dtype=np.float32).value
    assert_matches_reference(_run_harness(harness, problem), problem, "misaligned", np.float32)


def test_cpu_harness_knows_every_kernel(harness):
    for name in cupy_backend.kernel_names():
        harness.launch(name, 0, 32, ())                        # an empty grid: lookup only
    with pytest.raises(RuntimeError, match="no kernel named"):
        harness.launch("msda_forward<half, 8>", 0, 32, ())


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
@pytest.mark.parametrize("delta, width", [(1, 32), (2, 8), (3, 4), (16, 32), (1, 1)])
def test_cpu_harness_shuffle_follows_cuda_semantics(harness, dtype, delta, width):
    """Lane i of a width-segment reads lane i + delta, or keeps its value past the end."""
    out = np.zeros(64, dtype)                                   # two warps
    name = f"harness_shuffle_probe<{'int' if dtype == np.int32 else 'double'}>"
    harness.launch(name, 1, 64, (out, np.int32(delta), np.int32(width)))
    t = np.arange(64)
    source = np.where(t % 32 % width + delta < width, t + delta, t)
    expected = source + (0.5 if dtype == np.float64 else 0)
    np.testing.assert_array_equal(out, expected.astype(dtype))


def test_cpu_harness_catches_lanes_missing_from_a_shuffle(harness):
    out = np.zeros(32, np.int32)
    harness.launch("harness_early_exit_probe", 1, 32, (out, np.int32(32)))
    assert (out == 1).all()
    with pytest.raises(RuntimeError, match="exited"):
        harness.launch("harness_early_exit_probe", 1, 32, (out, np.int32(16)))


# --------------------------------------------------------------------------- Numba simulator
# name: (make_problem arguments, backend knobs)
SIMULATOR_CASES = {
    "float64_D5": (dict(seed=1, D=5), dict(threads_per_block=32)),
    "float32_D5": (dict(seed=2, D=5, dtype=np.float32), dict(threads_per_block=32)),
    "float64_D5_deterministic": (dict(seed=3, D=5), dict(deterministic=True)),
    "float64_D71": (dict(seed=4, D=71, Lq=1, levels=((2, 3), (1, 2)), K=1), {}),
}

_SIMULATOR_SCRIPT = """
import sys
sys.setswitchinterval(1e-5)   # the simulator's threads hand over the GIL sooner: faster
import numpy as np
from minidetr.ops.msda import numba_cuda
assert numba_cuda.SIMULATOR, "NUMBA_ENABLE_CUDASIM was not seen"
cases = np.load(sys.argv[1])
names = sorted({key.split("/")[0] for key in cases.files})
results = {}
for name in names:
    a = {key.split("/")[1]: cases[key] for key in cases.files if key.startswith(name + "/")}
    inputs = (a["value"], a["spatial_shapes"], a["level_start_index"],
              a["sampling_locations"], a["attention_weights"])
    tpb = int(a["threads_per_block"])
    results[name + "/output"] = numba_cuda.forward(*inputs, threads_per_block=tpb)
    grads = numba_cuda.backward(a["grad_output"], *inputs, threads_per_block=tpb,
                                deterministic=bool(a["deterministic"]))
    for grad_name, grad in zip(%r, grads):
        results[name + "/" + grad_name] = grad
np.savez(sys.argv[2], **results)
""" % (GRAD_NAMES,)


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """Run every SIMULATOR_CASES case through numba_cuda under the simulator, once."""
    folder = tmp_path_factory.mktemp("numba_sim")
    arrays = {}
    for name, (problem_args, knobs) in SIMULATOR_CASES.items():
        problem = make_problem(**problem_args)
        for field in ("value", "spatial_shapes", "level_start_index", "sampling_locations",
                      "attention_weights", "grad_output"):
            arrays[f"{name}/{field}"] = getattr(problem, field)
        arrays[f"{name}/threads_per_block"] = np.array(knobs.get("threads_per_block", 256))
        arrays[f"{name}/deterministic"] = np.array(knobs.get("deterministic", False))
    np.savez(folder / "cases.npz", **arrays)
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", _SIMULATOR_SCRIPT, str(folder / "cases.npz"),
                             str(folder / "results.npz")], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"the simulator run failed:\n{result.stderr[-4000:]}"
    return np.load(folder / "results.npz")


def test_simulator_is_confined_to_its_subprocess():
    """This process must see the real numba.cuda (or none), never the simulator."""
    assert not numba_cuda.SIMULATOR
    assert os.environ.get("NUMBA_ENABLE_CUDASIM", "0") in ("", "0")


@pytest.mark.parametrize("name", list(SIMULATOR_CASES))
def test_numba_cuda_kernels_in_simulator_match_reference(simulated, name):
    problem_args, _ = SIMULATOR_CASES[name]
    problem = make_problem(**problem_args)
    outputs = [simulated[f"{name}/{field}"] for field in ("output",) + GRAD_NAMES]
    assert_matches_reference(outputs, problem, f"Numba CUDA simulator ({name})",
                             problem.value.dtype)


# --------------------------------------------------------------------------- real GPU
GPU_BACKENDS = ["cupy", "numba-cuda"]


def _to_gpu(problem):
    import cupy
    return [cupy.asarray(a) for a in (*problem.inputs, problem.grad_output)]


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("D", [5, 30, 32, 64, 71])
def test_gpu_kernels_match_reference(backend, dtype, D):
    from minidetr.ops import msda
    problem = make_problem(100 + D, N=2, Lq=5, M=3, D=D, K=3, dtype=dtype)
    *inputs, grad_output = _to_gpu(problem)
    output = msda.forward(*inputs, backend=backend)
    grads = msda.backward(grad_output, *inputs, backend=backend)
    outputs = [a.get() for a in (output, *grads)]
    assert_matches_reference(outputs, problem, f"{backend} on the GPU", dtype)


@gpu
@pytest.mark.parametrize("vector_width", [1, 2, 4])
def test_gpu_cupy_every_vector_width(vector_width):
    problem = make_problem(5, N=2, Lq=7, D=32, dtype=np.float32)
    *inputs, grad_output = _to_gpu(problem)
    output = cupy_backend.forward(*inputs, vector_width=vector_width, threads_per_block=64)
    grads = cupy_backend.backward(grad_output, *inputs, vector_width=vector_width,
                                  threads_per_block=64)
    assert_matches_reference([a.get() for a in (output, *grads)], problem,
                             f"cupy, vector width {vector_width}", np.float32)


@gpu
@pytest.mark.parametrize("module", [cupy_backend, numba_cuda], ids=GPU_BACKENDS)
def test_gpu_deterministic_grad_value_is_reproducible(module):
    """Many points share few value rows (a 3x3 map), so atomics race; the deterministic
    path must give the same bits on every run, and agree with the atomic one."""
    problem = make_problem(9, N=2, Lq=64, M=2, D=32, levels=((3, 3),), K=4,
                           dtype=np.float32)
    *inputs, grad_output = _to_gpu(problem)
    runs = [module.backward(grad_output, *inputs, deterministic=True)[0].get()
            for _ in range(3)]
    for run in runs[1:]:
        np.testing.assert_array_equal(run, runs[0])
    atomic = module.backward(grad_output, *inputs)[0].get()
    assert_allclose(runs[0], atomic, rtol=1e-5, atol=1e-5 * np.abs(atomic).max(),
                    what="deterministic vs atomic grad_value")


@gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("D", [3, 30])
def test_gpu_gradcheck_through_autograd(backend, D):
    import cupy

    from minidetr.ops.msda import ms_deform_attn
    from minidetr.testing import gradcheck
    problem = make_problem(21 + D, D=D, Lq=2, levels=((3, 4), (2, 2)), smooth=True)
    value, shapes, starts, locations, weights = [cupy.asarray(a) for a in problem.inputs]

    def msda(v, loc, w):
        return ms_deform_attn(v, shapes, starts, loc, w, backend=backend)
    msda.__name__ = f"ms_deform_attn[{backend}]"
    gradcheck(msda, [value, locations, weights])


# --------------------------------------------------------------------------- benchmark helpers
def test_bench_floor_bytes_by_hand():
    """N=1, S=10, M=2, D=4, Lq=3, L=2, K=1, 5 value rows touched, float32."""
    from minidetr.bench.msda_gpu import floor_bytes
    sizes = dict(N=1, S=10, M=2, D=4, Lq=3, L=2, K=1)
    points = 1 * 3 * 2 * 2 * 1                       # 12 sampling points
    value_in, per_query, out = 5 * 4, 3 * points, 1 * 3 * 2 * 4
    assert floor_bytes(sizes, 5, 4) == {
        "forward": 4 * (value_in + per_query + out),
        "backward": 4 * (out + value_in + per_query + 1 * 10 * 2 * 4 + 3 * points)}


def test_bench_peak_bandwidth_of_a_known_gpu():
    """H100 SXM: 2619 MHz HBM3 clock, 5120-bit bus -> the datasheet's 3.35 TB/s."""
    from minidetr.bench.msda_gpu import peak_bandwidth
    assert peak_bandwidth(2_619_000, 5120) == pytest.approx(3.352e12, rel=1e-3)


def test_bench_touched_rows_are_the_rows_with_a_gradient():
    """A value row is touched iff the backward pass gives it a (nonzero) gradient."""
    from minidetr.bench.common import SHAPES, msda_inputs
    from minidetr.bench.msda_gpu import touched_value_rows
    value, shapes, starts, locations, weights, grad_output = msda_inputs(SHAPES["tiny"], "float64")
    grad_value = reference.backward(grad_output, value, shapes, starts, locations, weights)[0]
    expected = int(np.count_nonzero(np.abs(grad_value).sum(axis=-1)))
    assert touched_value_rows(np, shapes, starts, locations) == expected
    # All points near one corner leave most of the map untouched.
    locations[...] = 0.05
    grad_value = reference.backward(grad_output, value, shapes, starts, locations, weights)[0]
    expected = int(np.count_nonzero(np.abs(grad_value).sum(axis=-1)))
    assert touched_value_rows(np, shapes, starts, locations) == expected < grad_value[..., 0].size


def test_bench_gpu_section_without_a_gpu_says_why():
    from minidetr.bench.msda_gpu import gpu_section
    if cupy_available():
        pytest.skip("a GPU is present: the GPU section would run")
    lines = []
    assert gpu_section([], ["tiny"], "float32", 1, print_fn=lines.append) == []
    assert lines == [f"GPU section skipped: {why_no_cupy()}"]
