"""Tests of the fused AdamW kernel and of the CPU harness that runs it without a GPU.

* ``minidetr/testing/elementwise_harness.py``: a tiny kernel with known values, in-place and
  allocated outputs, strided outputs, scalars, and the errors (a compile error shows the
  kernel's name and g++'s message; dtype, shape and argument mistakes are named).
* ``minidetr/ops/adamw_kernel.py`` through the harness: ``AdamW`` with the fused kernel
  equals ``AdamW`` with the readable chain *bit for bit*, float32 and float64, over
  several steps (weight decay, betas, t = 1, a zero gradient, t large), for a tensor of
  one element and a 3-d one. Bit for bit because the kernel does the chain's roundings in
  the chain's order and the harness compiles with ``-ffp-contract=off``. Through
  ``minidetr.testing.fakecupy`` (skipped when absent) the launches are also counted: 14 per
  parameter for the chain, 1 fused.
* nvcc (skipped without it): the operation wrapped in a ``__global__`` loop compiles for
  sm_90, and its PTX has fused multiply-adds by default and none with the kernel's
  ``--fmad=false``.
* GPU (skipped without CuPy and a device): ``fused=None``/``True`` against ``fused=False``.
"""
from __future__ import annotations

import shutil
import subprocess
import types

import numpy as np
import pytest

from minidetr import nn
from minidetr import optim as optim_module
from minidetr.backend import cupy_available, why_no_cupy
from minidetr.ops import adamw_kernel
from minidetr.optim import AdamW
from minidetr.testing import assert_allclose
from minidetr.testing import elementwise_harness as harness
from minidetr.testing.elementwise_harness import CpuElementwiseKernel, why_no_compiler

needs_gxx = pytest.mark.skipif(why_no_compiler() is not None,
                               reason=f"CPU harness not tested: {why_no_compiler()}")
needs_gpu = pytest.mark.skipif(not cupy_available(),
                               reason=f"GPU backend not tested: {why_no_cupy()}")


def mul_add():
    return CpuElementwiseKernel("T x, T y, T a", "T z", "z = x * y + a", "mul_add")


# --------------------------------------------------------------------------- the harness
@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_harness_known_kernel_allocates_its_output(dtype):
    x = np.array([1.0, 2.0, -3.0], dtype)
    z = mul_add()(x, np.array([4.0, 0.5, 2.0], dtype), 0.25)
    assert z.dtype == dtype and z.shape == (3,)
    np.testing.assert_array_equal(z, np.array([4.25, 1.25, -5.75], dtype))


@needs_gxx
def test_harness_computes_in_the_array_dtype_without_contraction():
    """float32 in, float32 arithmetic: every product and sum rounded as NumPy rounds it."""
    rng = np.random.default_rng(0)
    x, y, a = rng.normal(size=(3, 1000)).astype(np.float32)
    z = CpuElementwiseKernel("T x, T y, T a", "T z", "z = x * y + a", "mul_add_arrays")(x, y, a)
    np.testing.assert_array_equal(z, x * y + a)
    # The check has teeth: double arithmetic, or one fused multiply-add, rounds differently.
    in_double = (x.astype(np.float64) * y + a).astype(np.float32)
    assert (in_double != x * y + a).any()


@needs_gxx
def test_harness_updates_given_outputs_in_place():
    """Outputs are read and written (``acc += x``); passed ones are returned, not copied."""
    kernel = CpuElementwiseKernel("T x", "T acc, int32 count", "acc += x; count = count + 1",
                                  "accumulate")
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    acc, count = np.ones((2, 3)), np.zeros((2, 3), np.int32)
    returned = kernel(x, acc, count)
    assert returned[0] is acc and returned[1] is count
    kernel(x, acc, count)
    np.testing.assert_array_equal(acc, 1 + 2 * x)
    np.testing.assert_array_equal(count, np.full((2, 3), 2))
    # A strided view as output: its elements change, the ones between them do not.
    base = np.zeros((2, 6))
    view = base[:, ::2]                                        # (2, 3), not contiguous
    kernel(x, view, np.zeros((2, 3), np.int32))
    np.testing.assert_array_equal(base[:, ::2], x)
    np.testing.assert_array_equal(base[:, 1::2], 0.0)
    # Outputs not passed are allocated; several outputs come back as a tuple.
    acc2, count2 = kernel(x)
    assert acc2.shape == (2, 3) and count2.dtype == np.int32


@needs_gxx
def test_harness_return_options_and_generated_source():
    x = np.ones(2, np.float32)
    quiet = CpuElementwiseKernel("T x", "T y", "y = x", "copy_quiet", no_return=True)
    out = np.zeros(2, np.float32)
    assert quiet(x, out) is None and out.tolist() == [1.0, 1.0]
    as_tuple = CpuElementwiseKernel("T x", "T y", "y = 2 * x", "twice", return_tuple=True)
    assert as_tuple(x)[0].tolist() == [2.0, 2.0]
    source = mul_add().source(x, x, 0.5)
    assert "typedef float T;" in source
    assert "const T& x = _raw_x[i];" in source and "T& z = _raw_z[i];" in source
    assert "const T a = *static_cast<const T*>(_args[2]);" in source    # a scalar, by value


@needs_gxx
def test_harness_reuses_a_compiled_library(monkeypatch):
    """The same kernel source is compiled once, also for a new kernel object."""
    x = np.ones(2)
    mul_add()(x, x, 1.0)

    def no_compiler(*args, **kwargs):
        raise AssertionError("the compiler ran for a kernel already compiled")

    monkeypatch.setattr(harness.subprocess, "run", no_compiler)
    assert mul_add()(x, x, 1.0).tolist() == [2.0, 2.0]


@needs_gxx
def test_harness_compile_error_names_the_kernel_and_shows_gxx():
    broken = CpuElementwiseKernel("T x", "T y", "y = x * undeclared_factor", "broken_kernel")
    with pytest.raises(RuntimeError) as error:
        broken(np.ones(3))
    message = str(error.value)
    assert "broken_kernel" in message and "does not compile" in message
    assert "g++" in message and "-ffp-contract=off" in message            # the command
    assert "undeclared_factor" in message and "error" in message            # g++'s stderr
    assert "broken_kernel operation:1" in message                           # where


def test_harness_argument_errors():
    """Checked before anything is compiled, so these run without g++."""
    kernel = mul_add()
    x32, x64 = np.ones(3, np.float32), np.ones(3, np.float64)
    with pytest.raises(TypeError, match=r"placeholder T: T = float32 \(from 'x'\) but 'y' has "
                                        r"dtype float64"):
        kernel(x32, x64, 1.0)
    with pytest.raises(ValueError, match="one shape.*'x': \\(3,\\), 'y': \\(2,\\)"):
        kernel(x32, np.ones(2, np.float32), 1.0)
    with pytest.raises(TypeError, match="takes 3 arguments .* or 4 .* got 2"):
        kernel(x32, x32)
    with pytest.raises(TypeError, match="output 'z' must be a NumPy array"):
        kernel(x32, x32, 1.0, 2.0)
    with pytest.raises(TypeError, match="input 'a' must be a NumPy array or a real number"):
        kernel(x32, x32, "1")
    with pytest.raises(TypeError, match="float16"):
        kernel(x32.astype(np.float16), x32, 1.0)
    with pytest.raises(TypeError, match="cannot determine the type placeholder T"):
        kernel(1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="read-only"):
        kernel(x32, x32, 1.0, np.broadcast_to(np.float32(0), (3,)))
    counted = CpuElementwiseKernel("float64 x, int32 n", "float64 y", "y = x * n", "scaled")
    with pytest.raises(TypeError, match="'x' is declared float64 but the array has dtype float32"):
        counted(x32, 2)
    with pytest.raises(TypeError, match="scalar 2.5 for 'n' cannot be cast to int32"):
        counted(x64, 2.5)


def test_harness_definition_errors():
    with pytest.raises(ValueError, match="invalid kernel name"):
        CpuElementwiseKernel("T x", "T y", "y = x", "not a name")
    with pytest.raises(ValueError, match="'raw' parameters"):
        CpuElementwiseKernel("raw T x", "T y", "y = x[i]", "raw_kernel")
    with pytest.raises(ValueError, match="invalid parameter name 'i'"):
        CpuElementwiseKernel("T i", "T y", "y = i", "bad")
    with pytest.raises(ValueError, match="'floatt'"):
        CpuElementwiseKernel("floatt x", "T y", "y = x", "bad")
    with pytest.raises(ValueError, match="more than once"):
        CpuElementwiseKernel("T x", "T x", "x = x", "bad")
    with pytest.raises(TypeError, match="unsupported arguments \\['size'\\]"):
        CpuElementwiseKernel("T x", "T y", "y = x", "bad", size=3)


# --------------------------------------------------------------------------- AdamW, fused
@pytest.fixture
def harness_as_cupy(monkeypatch):
    """Let AdamW take NumPy arrays for CuPy's and build its kernel with the CPU harness.

    Returns the stand-in array module: NumPy's functions plus the harness as its
    ``ElementwiseKernel``. The fused kernel it builds counts its launches.
    """
    class CountingKernel(CpuElementwiseKernel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.launches = 0

        def __call__(self, *args):
            self.launches += 1
            return super().__call__(*args)

    xp = types.ModuleType("numpy_with_the_cpu_harness")
    xp.zeros_like, xp.sqrt, xp.ElementwiseKernel = np.zeros_like, np.sqrt, CountingKernel
    monkeypatch.setattr(optim_module, "is_cupy_array", lambda x: True)
    monkeypatch.setattr(optim_module, "get_array_module", lambda *arrays: xp)
    yield xp
    adamw_kernel.kernel_for.cache_clear()          # forget the stand-in module


def _assert_same_state(fused, readable, step):
    for group_f, group_r in zip(fused.param_groups, readable.param_groups):
        for p_f, p_r in zip(group_f["params"], group_r["params"]):
            what = f"after step {step}, shape {p_f.shape}"
            np.testing.assert_array_equal(p_f.data, p_r.data, err_msg=f"param {what}")
            if p_r.grad is None:
                continue
            s_f, s_r = fused.state[id(p_f)], readable.state[id(p_r)]
            assert s_f["step"] == s_r["step"]
            for key in ("exp_avg", "exp_avg_sq"):
                np.testing.assert_array_equal(s_f[key], s_r[key], err_msg=f"{key} {what}")


@needs_gxx
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_kernel_equals_readable_chain_bit_for_bit(harness_as_cupy, dtype):
    rng = np.random.default_rng(7)
    shapes = [(1,), (2, 3, 4)]
    start = [rng.normal(size=s).astype(dtype) for s in shapes]
    frozen0 = np.array([1.5, -2.0], dtype)

    def build(fused):
        params = [nn.Parameter(a.copy()) for a in start]
        frozen = nn.Parameter(frozen0.copy())                      # never gets a gradient
        return AdamW([{"params": params[:1]},
                      {"params": [params[1], frozen], "lr": 3e-3, "weight_decay": 0.0}],
                     lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05, fused=fused)

    fused, readable = build(None), build(False)       # None: fused, as for CuPy arrays
    gradients = [[rng.normal(size=s).astype(dtype) for s in shapes],           # t = 1
                 [np.zeros(s, dtype) for s in shapes],                         # zero grads
                 [(1e3 * rng.normal(size=s)).astype(dtype) for s in shapes],
                 [rng.normal(size=s).astype(dtype) for s in shapes]]
    for step, grads in enumerate(gradients, 1):
        if step == 4:                                   # t large: bias corrections -> 1
            for opt in (fused, readable):
                for state in opt.state.values():
                    state["step"] = 100_000
        for opt in (fused, readable):
            live = [p for g in opt.param_groups for p in g["params"]][:2]
            for p, g in zip(live, grads):
                p.grad = g.copy()
            opt.step()
        _assert_same_state(fused, readable, step)

    kernel = adamw_kernel.kernel_for(harness_as_cupy)
    assert kernel.launches == 2 * len(gradients)      # one launch per parameter and step
    moved = fused.param_groups[0]["params"][0].data
    assert moved.dtype == dtype and not np.array_equal(moved, start[0])
    np.testing.assert_array_equal(fused.param_groups[1]["params"][1].data, frozen0)
    assert fused.state[id(fused.param_groups[0]["params"][0])]["step"] == 100_001


@needs_gxx
def test_fused_adamw_on_fake_cupy_is_one_launch_per_parameter():
    """Through minidetr.testing.fakecupy (CuPy's behaviour on NumPy, kernels by the harness): the
    launch counts of the docs, 1 instead of 14 per parameter, and the same bits."""
    fakecupy = pytest.importorskip("minidetr.testing.fakecupy")
    from minidetr.backend import to_device

    rng = np.random.default_rng(1)
    shapes = [(1,), (2, 3, 4)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(3)]
    results, launches = {}, {}
    try:
        with fakecupy.installed():
            for fused in (None, False):
                params = [nn.Parameter(to_device(a.copy(), "cuda")) for a in start]
                opt = AdamW(params, lr=0.01, weight_decay=0.1, fused=fused)
                for step_grads in grads:
                    for p, g in zip(params, step_grads):
                        p.grad = to_device(g, "cuda")
                    with fakecupy.count_launches() as counter:
                        opt.step()
                launches[fused] = sum(counter.values())            # the last step's
                results[fused] = [p.data.get() for p in params]
    finally:
        adamw_kernel.kernel_for.cache_clear()                     # forget the fake module
    assert launches == {None: 1 * len(shapes), False: 14 * len(shapes)}
    for i, (fused, readable) in enumerate(zip(results[None], results[False])):
        np.testing.assert_array_equal(fused, readable, err_msg=f"parameter {i}")


@needs_gxx
def test_fused_kernel_first_step_closed_form():
    """t = 1, eps = 0: m^ = g and v^ = g^2, so p1 = p0 (1 - lr wd) - lr sign(g)."""
    kernel = CpuElementwiseKernel(adamw_kernel.IN_PARAMS, adamw_kernel.OUT_PARAMS,
                                  adamw_kernel.OPERATION, adamw_kernel.NAME,
                                  options=adamw_kernel.OPTIONS)
    p0, g = np.array([[1.0, -2.0, 0.5]]), np.array([[0.3, -4.0, 1e-3]])
    p, m, v = p0.copy(), np.zeros_like(p0), np.zeros_like(p0)
    adamw_kernel.fused_step(kernel, p, g, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=0.0,
                            weight_decay=0.5, step=1)
    assert_allclose(p, p0 * (1 - 0.1 * 0.5) - 0.1 * np.sign(g), rtol=1e-14, atol=1e-15,
                    what="fused step 1")
    assert_allclose(m, 0.1 * g, rtol=1e-15, what="exp_avg after step 1")
    assert_allclose(v, 0.001 * g * g, rtol=1e-12, what="exp_avg_sq after step 1")


def test_fused_option_errors():
    """fused=True with a parameter no kernel takes (float16 on NumPy) names it; the CPU
    kernel itself is tested in test_adamw_cpu.py."""
    p = nn.Parameter(np.array([1.0, 2.0], np.float16))
    p.grad = np.array([0.5, -0.5], np.float16)
    with pytest.raises(TypeError, match=r"AdamW\(fused=True\): no fused kernel .* group 0 .* "
                                        r"shape \(2,\): its dtype is float16"):
        AdamW([p], fused=True).step()
    assert p.data.tolist() == [1.0, 2.0]                     # nothing was updated
    with pytest.raises(ValueError, match="fused must be None, True or False"):
        AdamW([p], fused="auto")


def test_fused_none_on_numpy_never_builds_the_gpu_kernel(monkeypatch):
    def no_kernel(xp):
        raise AssertionError("a GPU kernel was requested for NumPy arrays")

    monkeypatch.setattr(adamw_kernel, "kernel_for", no_kernel)
    p = nn.Parameter(np.array([1.0, 2.0]))
    p.grad = np.array([0.5, -0.5])
    AdamW([p], lr=0.1, weight_decay=0.0).step()
    assert_allclose(p.data, [0.9, 2.1], rtol=1e-7, what="one step on the CPU")


# --------------------------------------------------------------------------- nvcc
def _cuda_wrapper(dtype_name, c_type):
    """The operation in a minimal ``__global__`` grid-stride loop, as CuPy wraps it:
    a typedef for T, scalars by value, one reference per array element."""
    params = (harness.parse_params(adamw_kernel.IN_PARAMS, True)
              + harness.parse_params(adamw_kernel.OUT_PARAMS, False))
    signature, bindings = [], []
    for p in params:
        if p.is_input and p.name != "grad":
            signature.append(f"const T {p.name}")
        else:
            const = "const " if p.is_input else ""
            signature.append(f"{const}T* _raw_{p.name}")
            bindings.append(f"    {const}T& {p.name} = _raw_{p.name}[i];")
    return "\n".join([
        f"namespace as_{dtype_name} {{",
        f"typedef {c_type} T;",
        f"__global__ void {adamw_kernel.NAME}({', '.join(signature)}, long long n) {{",
        "  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;",
        "       i += (long long)gridDim.x * blockDim.x) {",
        *bindings, adamw_kernel.OPERATION + ";", "  }", "}", "}"])


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_kernel_compiles_with_nvcc_and_fmad_false_removes_contraction(tmp_path):
    source = tmp_path / "adamw.cu"
    source.write_text(_cuda_wrapper("float", "float") + "\n" + _cuda_wrapper("double", "double"))
    ptx = {}
    for label, flags in (("default", []), ("kernel", list(adamw_kernel.OPTIONS))):
        command = ["nvcc", "-arch=sm_90", "--ptx", "-Werror", "all-warnings", *flags,
                   str(source), "-o", str(tmp_path / f"{label}.ptx")]
        result = subprocess.run(command, capture_output=True, text=True)
        assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr}"
        ptx[label] = (tmp_path / f"{label}.ptx").read_text()
    # By default nvcc fuses a * b + c into one rounding: the docstring's FMA note.
    assert "fma.rn.f32" in ptx["default"] and "fma.rn.f64" in ptx["default"]
    # With the kernel's options every product and sum is rounded, as in the chain.
    assert "fma.rn" not in ptx["kernel"]
    for instruction in ("mul.rn.f32", "add.rn.f32", "div.rn.f32", "sqrt.rn.f32", "div.rn.f64"):
        assert instruction in ptx["kernel"], instruction


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-6), (np.float64, 1e-15)])
def test_fused_matches_readable_on_gpu(dtype, rtol):
    import cupy

    rng = np.random.default_rng(3)
    shapes = [(1,), (2, 3, 4), (257,)]
    start = [rng.normal(size=s).astype(dtype) for s in shapes]
    optimisers = {}
    for fused in (None, True, False):
        params = [nn.Parameter(cupy.asarray(a)) for a in start]
        optimisers[fused] = AdamW(params, lr=0.02, betas=(0.8, 0.95), weight_decay=0.05,
                                  fused=fused)
    for step in range(5):
        grads = [rng.normal(size=s).astype(dtype) * (0.0 if step == 2 else 1.0)
                 for s in shapes]
        for opt in optimisers.values():
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = cupy.asarray(g)
            opt.step()
    for i in range(len(shapes)):
        auto, fused, readable = (optimisers[f].param_groups[0]["params"][i].data.get()
                                 for f in (None, True, False))
        np.testing.assert_array_equal(auto, fused)          # None picks the fused kernel
        assert auto.dtype == dtype
        assert_allclose(fused, readable, rtol=rtol, atol=rtol * 1e-3,
                        what=f"fused vs readable AdamW, parameter {i}, {np.dtype(dtype)}")
