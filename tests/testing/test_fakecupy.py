"""The GPU code paths, run on a CPU through minidetr.testing.fakecupy (a strict stand-in for CuPy).

Issue 7: every Function runs on CuPy arrays, and a training step copies nothing from the
device to the host except the matcher's cost matrices and the one vector of logged
values. Without a GPU those paths never run; here they run on :mod:`minidetr.testing.fakecupy`,
whose arrays refuse what CuPy's refuse and report every host copy to the transfer guard,
while the arithmetic underneath is NumPy's: so the device results must equal the NumPy
path's bit for bit.

1. The fake itself: each behaviour that catches a bug is checked to catch it.
2. Every Function, forward and backward, on the fake device vs NumPy, under the guard.
3. One training step of the tiny model (plain, refine, two-stage) on the fake device.
4. The command line with ``--device cuda``: train, resume, eval, predict.
5. ``bench launches``: the kernel launches of a tiny training step, by component.

Each fix that these tests drove into minidetr has a regression test here (marked so).
"""
from __future__ import annotations

import contextlib
import json
import math
import pickle
import sys
from collections import Counter

import numpy as np
import pytest

import minidetr.functional as F
from minidetr import backend
from minidetr.autograd import Tensor
from minidetr.backend import (HostTransferError, allow_transfers, cupy_available, to_device,
                              to_numpy, transfer_guard)
from minidetr.testing import fakecupy


@pytest.fixture
def cp():
    """The fake CuPy, installed for one test (minidetr sees CuPy and one GPU)."""
    with fakecupy.installed() as module:
        yield module


def device(array):
    return to_device(np.asarray(array), "cuda")


def numbers(shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# =========================================================================== 1. the fake
def test_numpy_refuses_a_device_array(cp):
    x = device(numbers(3))
    for convert in (np.asarray, np.array, lambda a: np.float64(a)):
        with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not "
                                            "allowed"):
            convert(x)
    assert not isinstance(x, np.ndarray)
    with pytest.raises(TypeError, match="device pointer|device address"):
        np.asarray(x.data)                     # CuPy's .data is a pointer, not the values


def test_a_device_integer_is_no_python_index(cp):
    i = device(np.array(1))
    with pytest.raises(TypeError):
        [10, 20][i]                            # CuPy 14 has no __index__: int(i) is a copy
    with transfer_guard(), pytest.raises(HostTransferError, match=r"__int__\(\)"):
        [10, 20][int(i)]
    assert [10, 20][int(i)] == 20


BINARY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a / b, "//": lambda a, b: a // b, "%": lambda a, b: a % b,
          "**": lambda a, b: a ** b, "@": lambda a, b: a @ b, "<": lambda a, b: a < b,
          "==": lambda a, b: a == b, ">=": lambda a, b: a >= b, "!=": lambda a, b: a != b}


@pytest.mark.parametrize("op", sorted(BINARY))
def test_operators_refuse_host_arrays_and_accept_scalars(cp, op):
    fn = BINARY[op]
    a, b = np.full((2, 2), 3.0, np.float32), np.full((2, 2), 2.0, np.float32)
    x, y = device(a), device(b)
    for host in (b, np.asarray(2.0, np.float32), np.ones((2, 2))):     # 0-d too: refused
        with pytest.raises(TypeError, match="numpy.ndarray"):
            fn(x, host)
        with pytest.raises(TypeError, match="numpy.ndarray"):
            fn(host, x)                        # NumPy dispatches to the device array
    assert np.array_equal(to_numpy(fn(x, y)), fn(a, b))
    for scalar in (2.0, 2, np.float32(2.0)):   # scalars: NumPy's result, on the device
        got = fn(x, scalar) if op != "@" else x @ y
        want = fn(a, scalar) if op != "@" else a @ b
        assert isinstance(got, cp.ndarray) and got.dtype == want.dtype
        assert np.array_equal(to_numpy(got), want)


def test_in_place_operators_update_the_device_array(cp):
    a = numbers((2, 3), dtype=np.float32)
    x = device(a)
    same = x
    x += 1.0
    x *= device(np.full(3, 2.0, np.float32))
    assert x is same and np.array_equal(to_numpy(x), (a + 1.0) * 2.0)
    with pytest.raises(TypeError, match="numpy.ndarray"):
        x -= np.ones(3, np.float32)


def test_reductions_and_scalar_indexing_give_zero_d_device_arrays(cp):
    a = numbers((3, 4))
    x = device(a)
    for got, want in ((x.sum(), a.sum()), (x.max(), a.max()), (x[1, 2], a[1, 2]),
                      (cp.sum(x), a.sum()), (np.mean(x), a.mean()), (x.argmax(), a.argmax()),
                      (next(iter(x[0])), a[0, 0])):
        assert isinstance(got, cp.ndarray) and got.shape == (), type(got)
        assert to_numpy(got) == want


CONVERSIONS = {
    "get": lambda x: x.get(), "item": lambda x: x.item(), "tolist": lambda x: x.tolist(),
    "tobytes": lambda x: x.tobytes(), "__float__": float, "__int__": int,
    "__complex__": complex, "__bool__": lambda x: 1 if x else 0, "__repr__": repr,
    "__str__": str, "__format__": lambda x: f"{x:.3f}", "pickle": pickle.dumps,
    "asnumpy": lambda x: fakecupy.cupy.asnumpy(x), "to_numpy": to_numpy,
    "math.isfinite": math.isfinite, "Tensor.item": lambda x: Tensor(x).item(),
}


@pytest.mark.parametrize("name", sorted(CONVERSIONS))
def test_every_host_conversion_is_seen_by_the_transfer_guard(cp, name):
    x = device(np.array(2.5))
    with transfer_guard() as log:
        with pytest.raises(HostTransferError, match=r"fakecupy\.ndarray\.\w+\(\) of an "
                                                    r"array of shape \(\)"):
            CONVERSIONS[name](x)
        with allow_transfers("wanted"):
            CONVERSIONS[name](x)
    assert log == Counter({"wanted": 1})       # a conversion calling get() counts once
    assert float(x) == 2.5                     # fine outside the guard


MASK = np.array([True, False] * 3)
DATA_DEPENDENT = {   # name: (the call on a device array x, the same on a host array a)
    "device mask": (lambda x: x[x > 0], lambda a: a[a > 0]),
    "host mask": (lambda x: x[MASK], lambda a: a[MASK]),
    "cupy.nonzero": (lambda x: fakecupy.cupy.nonzero(x), np.nonzero),
    "ndarray.nonzero": (lambda x: x.nonzero(), np.nonzero),
    "cupy.unique": (lambda x: fakecupy.cupy.unique(x), np.unique),
    "cupy.where(cond)": (lambda x: fakecupy.cupy.where(x > 0), lambda a: np.where(a > 0)),
    "np.flatnonzero": (np.flatnonzero, np.flatnonzero),
}


@pytest.mark.parametrize("name", sorted(DATA_DEPENDENT))
def test_a_size_that_depends_on_the_values_is_a_host_copy(cp, name):
    on_device, on_host = DATA_DEPENDENT[name]
    a = numbers(6)
    x = device(a)
    with transfer_guard(), pytest.raises(HostTransferError, match="depends on the data"):
        on_device(x)
    got, want = on_device(x), on_host(a)       # outside the guard: NumPy's answer
    got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
    assert all(np.array_equal(to_numpy(g), w) for g, w in zip(got, want))


def test_module_functions_run_on_the_device_and_refuse_host_arrays(cp):
    a, b = numbers((2, 3), 1), numbers((2, 3), 2)
    x, y = device(a), device(b)
    for got, want in ((cp.concatenate([x, y], axis=1), np.concatenate([a, b], axis=1)),
                      (np.stack([x, y]), np.stack([a, b])), (cp.exp(x), np.exp(a)),
                      (cp.maximum.reduce(x, axis=0), np.maximum.reduce(a, axis=0)),
                      (cp.linalg.norm(x), np.linalg.norm(a)), (np.where(x > 0, x, y),
                                                                np.where(a > 0, a, b))):
        assert isinstance(got, cp.ndarray)
        assert np.array_equal(to_numpy(got), want)
    for call in (lambda: cp.concatenate([x, b]), lambda: cp.exp(a),
                 lambda: cp.where(x > 0, x, b)):
        with pytest.raises(TypeError, match="numpy.ndarray"):
            call()


def test_numpy_functions_that_cupy_lacks_are_missing(cp):
    x = device(numbers(4))
    with pytest.raises(AttributeError, match="NumPy has it, CuPy does not"):
        cp.errstate                            # CuPy's is cupyx.errstate
    with pytest.raises(TypeError, match="no implementation found"):
        np.insert(x, 0, 1.0)                   # NumPy's own, on a device array
    assert cp.float32 is np.float32 and cp.newaxis is None and cp.pi == np.pi


def test_host_to_device_copies_and_back_are_copies(cp):
    a = numbers(3)
    x = cp.asarray(a)
    a[0] = 100.0
    assert to_numpy(x)[0] != 100.0             # the device holds its own copy
    assert cp.asarray(x) is x and cp.asarray(x, dtype=np.float64) is x
    host = cp.asnumpy(x)
    host[1] = 100.0
    assert to_numpy(x)[1] != 100.0
    z = cp.asarray([x[0], x[1]])               # a list of device scalars stays on the device
    assert isinstance(z, cp.ndarray) and np.array_equal(to_numpy(z), to_numpy(x)[:2])


def test_indexing_accepts_host_and_device_index_arrays(cp):
    a = numbers((4, 3))
    x = device(a)
    index = np.array([3, 0, 3])
    assert np.array_equal(to_numpy(x[index]), a[index])
    assert np.array_equal(to_numpy(x[device(index), 1:]), a[index, 1:])
    x[index[:2]] = np.zeros(3)                 # a host value is uploaded
    a[index[:2]] = 0.0
    assert np.array_equal(to_numpy(x), a)


def test_kernel_launches_are_counted_by_call_site(cp):
    x = device(numbers((4, 6), dtype=np.float32))
    with fakecupy.count_launches() as outer:
        y = x * 2.0 + 1.0                      # 2 kernels
        views = (y[1:], y.reshape(6, 4), y.T, y[:, None], cp.asarray(y))   # 0: views
        copies = (y.T.reshape(-1), y[[0, 2]], y.astype(np.float64))       # 3 kernels
        with fakecupy.count_launches() as inner:
            F.mul(Tensor(x), 3.0)              # 1 kernel, inside minidetr
    site = "test_fakecupy.py:test_kernel_launches_are_counted_by_call_site"
    assert outer == Counter({site: 5, "functional/elementwise.py:Mul.forward": 1})
    assert inner == Counter({"functional/elementwise.py:Mul.forward": 1})
    assert len(views) == 5 and len(copies) == 3


def test_random_draws_are_made_on_the_device_and_reproducible(cp):
    def draw(seed):
        generator = cp.random.Generator(cp.random.Philox4x3210(seed))
        return generator.random((2, 3), dtype=np.float32)

    with transfer_guard():
        first, again, other = draw(7), draw(7), draw(8)
    assert isinstance(first, cp.ndarray) and first.dtype == np.float32
    assert np.array_equal(to_numpy(first), to_numpy(again))
    assert not np.array_equal(to_numpy(first), to_numpy(other))


def test_cupyx_scatter_add_accumulates_repeated_indices(cp):
    import cupyx
    target, index, values = np.zeros(4), np.array([1, 1, 3]), np.array([1.0, 2.0, 5.0])
    x = device(target)
    cupyx.scatter_add(x, device(index), device(values))
    np.add.at(target, index, values)
    assert np.array_equal(to_numpy(x), target) and target[1] == 3.0


def test_elementwise_kernel_runs_through_the_cpu_harness(cp):
    harness = pytest.importorskip("minidetr.testing.elementwise_harness")
    if harness.why_no_compiler():
        pytest.skip(f"ElementwiseKernel not run on the CPU: {harness.why_no_compiler()}")
    kernel = cp.ElementwiseKernel("T x, T a", "T y", "y = y * a + x", "fake_axpy")
    a, b = numbers(5, 1), numbers(5, 2)
    x, y = device(a), device(b)
    with fakecupy.count_launches() as launches:
        out = kernel(x, 0.5, y)                # the output passed in is updated in place
    assert out is y and np.array_equal(to_numpy(y), b * 0.5 + a)
    assert sum(launches.values()) == 1
    with pytest.raises(TypeError, match="numpy.ndarray"):
        kernel(a, 0.5, y)


def test_installed_patches_minidetr_and_restores_everything():
    from minidetr.ops import msda

    before = (backend._import_cupy, sys.modules.get("cupy"), sys.modules.get("cupyx"),
              dict(msda._BACKENDS), cupy_available())
    with fakecupy.installed() as cp:
        assert cupy_available() and backend.get_array_module(device([1.0])) is cp
        assert msda.resolve_backend(None, device(np.zeros((1, 1, 1, 1)))) == "cupy"
        import cupy
        assert cupy is cp
        with pytest.raises(RuntimeError, match="does not nest"):
            with fakecupy.installed():
                pass
    after = (backend._import_cupy, sys.modules.get("cupy"), sys.modules.get("cupyx"),
             dict(msda._BACKENDS), cupy_available())
    assert after == before


# =========================================================================== 2. Functions
def _gather_index(x):
    return Tensor(to_device(np.array([[0, 2], [1, 1]]), x.device))


FUNCTIONS = {   # name: (function of Tensors, input shapes); float64 inputs
    "add sub": (lambda a, b: F.sub(F.add(a, b), a * 0.5), [(2, 3), (3,)]),
    "mul div": (lambda a, b: F.div(F.mul(a, b), F.abs(b) + 1.0), [(2, 3), (2, 1)]),
    "maximum minimum": (lambda a, b: F.maximum(a, b) + F.minimum(a, 0.1), [(2, 3), (3,)]),
    "neg pow exp log sqrt": (lambda a: F.sqrt(F.log(F.exp(F.neg(a)) + 1.0)) + F.pow(a, 3),
                             [(2, 3)]),
    "abs clamp": (lambda a: F.clamp(F.abs(a), 0.2, 0.9) + F.clamp(a, lo=0.1), [(2, 3)]),
    "where": (lambda a, b: F.where(a > 0.0, a, b), [(2, 3), (2, 3)]),
    "cast": (lambda a: F.cast(F.cast(a, np.float32) * 2.0, np.float64), [(2, 3)]),  # regression
    "activations": (lambda a: F.sigmoid(a) + F.relu(a) + F.softplus(a) + F.log_sigmoid(a),
                     [(2, 3)]),
    "softmax": (lambda a: F.softmax(a, axis=-1) * F.log_softmax(a, axis=0), [(2, 3)]),
    "reductions": (lambda a: F.sum(a, axis=1) + F.mean(a, axis=1) + F.max(a, axis=1)
                   + F.sum(a) + F.cumsum(a, 1)[:, -1], [(2, 3)]),
    "shape": (lambda a: F.flatten(F.transpose(F.permute(F.reshape(a, (3, 2, 2)), (2, 0, 1)),
                                              0, 1), 1), [(2, 6)]),
    "unsqueeze squeeze expand": (lambda a: F.expand(F.squeeze(F.unsqueeze(a, 0), 0),
                                                    (4, 1, 3)), [(1, 3)]),
    "getitem": (lambda a: a[0, :] + a[:, None][1, 0, ::2].sum() + a[[0, 1, 1], [2, 0, 2]],
                [(2, 3)]),
    "gather": (lambda a: F.gather(a, 1, _gather_index(a)), [(2, 3)]),
    "concat stack split": (lambda a, b: F.split(F.concat([a, b], 0), [1, 3], 0)[1].sum(0)
                           + F.stack([a, b], 1).sum(1), [(2, 3), (2, 3)]),
    "matmul linear": (lambda a, w, b: F.linear(F.matmul(a, w), w.T, b), [(2, 3), (3, 3), (3,)]),
    "conv2d": (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding=1), [(1, 2, 5, 5),
                                                                        (3, 2, 3, 3), (3,)]),
    "conv2d dilated": (lambda x, w: F.conv2d(x, w, None, padding=2, dilation=2),
                       [(1, 2, 5, 5), (3, 2, 3, 3)]),
    "max_pool2d": (lambda x: F.max_pool2d(x, 3, 2, 1), [(1, 2, 5, 5)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, w, b), [(2, 4), (4,), (4,)]),
    "group_norm": (lambda x, w, b: F.group_norm(x, 2, w, b), [(2, 4, 3, 3), (4,), (4,)]),
    "frozen_batch_norm": (lambda x, w, b, m, v: F.frozen_batch_norm(x, w, b, m, F.abs(v) + 1),
                          [(2, 4, 3, 3), (4,), (4,), (4,), (4,)]),
    "frozen_batch_norm_relu": (lambda x, r: _frozen_bn_relu(x, r), [(2, 4, 3, 3), (2, 4, 3, 3)]),
    "interpolate_nearest": (lambda x: F.interpolate_nearest(x.detach(), (5, 7)) * x.sum(),
                            [(1, 2, 3, 3)]),
    "ms_deform_attn": (lambda v, loc, w: _msda(v, loc, w),
                       [(2, 26, 2, 4), (2, 3, 2, 2, 2, 2), (2, 3, 2, 2, 2)]),
}


def _frozen_bn_relu(x, r):
    """relu(frozen batch norm(x) + r), the four vectors constants on x's device."""
    from minidetr.backend import get_array_module
    xp = get_array_module(x.data)
    w, b, m = (xp.linspace(lo, hi, 4) for lo, hi in ((0.5, 2.0), (-0.3, 0.3), (-1.0, 1.0)))
    return F.frozen_batch_norm_relu(x, w, b, m, xp.linspace(0.5, 1.5, 4), residual=r)


def _msda(value, locations, weights):
    from minidetr.ops.msda import ms_deform_attn
    return ms_deform_attn(value, [[4, 5], [2, 3]], [0, 20], F.sigmoid(locations),
                          F.softmax(weights, axis=-1))


@contextlib.contextmanager
def numpy_references():
    """The NumPy run takes the reference code that the device runs too, not the fused
    Numba CPU kernels (layer/group/frozen batch norm, softmax: minidetr/functional/
    norm_cpu.py, softmax_cpu.py), which round differently; those kernels are compared
    with the references in tests/core/test_norm_cpu.py and test_softmax_cpu.py."""
    from minidetr.functional import activation, norm
    with pytest.MonkeyPatch.context() as patch:
        for module in (activation, norm):
            patch.setattr(module, "cpu_kernels_apply", lambda *arrays: False)
        yield


def _forward_backward(fn, arrays, where, guard):
    """fn's output and every input's gradient (host arrays), computed on ``where``."""
    tensors = [Tensor(to_device(a, where), requires_grad=True) for a in arrays]
    with guard:
        out = fn(*tensors)
        upstream = np.linspace(-1.0, 1.0, out.size).reshape(out.shape)
        out.backward(to_device(upstream, where))
    return [to_numpy(out.data)] + [to_numpy(t.grad) for t in tensors]


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_every_function_on_the_device_equals_numpy_without_host_copies(cp, name):
    fn, shapes = FUNCTIONS[name]
    arrays = [numbers(s, seed=i) for i, s in enumerate(shapes)]
    expected = _forward_backward(fn, arrays, "cpu", numpy_references())
    guard = transfer_guard()
    got = _forward_backward(fn, arrays, "cuda", guard)
    for i, (g, e) in enumerate(zip(got, expected)):
        what = "output" if i == 0 else f"gradient of input {i - 1}"
        assert g.dtype == e.dtype and np.array_equal(g, e), f"{name}: {what} differs"


def test_tensor_comparisons_with_numbers_stay_on_the_device(cp):
    # regression: Tensor < 0.5 turned 0.5 into a NumPy array, which CuPy refuses
    a = numbers(5)
    t = Tensor(device(a))
    with transfer_guard():
        checks = [(t < 0.5, a < 0.5), (t >= 0, a >= 0), (t > Tensor(device(a[::-1])),
                                                         a > a[::-1]), (t <= [0.0] * 5, a <= 0)]
    for got, want in checks:
        assert isinstance(got, cp.ndarray) and np.array_equal(to_numpy(got), want)


def test_msda_reference_backend_on_the_device_copies_only_the_level_sizes(cp):
    from minidetr.ops import msda
    rng = np.random.default_rng(0)
    value, locations = rng.standard_normal((2, 26, 2, 4)), rng.uniform(0, 1, (2, 3, 2, 2, 2, 2))
    weights, grad = rng.uniform(0, 1, (2, 3, 2, 2, 2)), rng.standard_normal((2, 3, 8))
    shapes, starts = np.array([[4, 5], [2, 3]]), np.array([0, 20])
    expected = [msda.forward(value, shapes, starts, locations, weights, backend="numpy"),
                *msda.backward(grad, value, shapes, starts, locations, weights, backend="numpy")]
    v, loc, w, g = map(device, (value, locations, weights, grad))
    with transfer_guard() as log:
        got = [msda.forward(v, shapes, starts, loc, w, backend="numpy"),
               *msda.backward(g, v, shapes, starts, loc, w, backend="numpy")]
    assert log == Counter({"the MSDA reference's level sizes": 4})   # 2 per pass
    assert all(np.array_equal(to_numpy(a), b) for a, b in zip(got, expected))


def test_msda_cuda_backend_launch_code_runs_on_device_arrays(cp, tmp_path):
    """The cupy backend's own host code (plan, allocations, the deterministic sort by
    row) on device arrays, its CUDA kernels run by the CPU harness: same bits as the
    harness on NumPy arrays, no host copy."""
    from minidetr.ops.msda import cpu_harness, cupy_backend
    if cpu_harness.why_no_compiler():
        pytest.skip(f"the CUDA kernels are not run on the CPU: {cpu_harness.why_no_compiler()}")
    harness = cpu_harness.build_harness(tmp_path)
    kernels = Counter()

    def launch(name, grid, block, args):
        kernels[name.split("<")[0]] += 1
        harness.launch(name, grid, block, [fakecupy.unwrap(a) for a in args])

    rng = np.random.default_rng(1)
    host = (rng.standard_normal((2, 26, 2, 8)).astype(np.float32),
            np.array([[4, 5], [2, 3]]), np.array([0, 20]),
            rng.uniform(0, 1, (2, 3, 2, 2, 2, 2)).astype(np.float32),
            rng.uniform(0, 1, (2, 3, 2, 2, 2)).astype(np.float32))
    grad = rng.standard_normal((2, 3, 16)).astype(np.float32)
    plan = cupy_backend.plan_launch(np.float32, 8, (host[0],))
    expected = [cupy_backend.run_forward(harness.launch, plan, *host),
                *cupy_backend.run_backward(harness.launch, plan, grad, *host,
                                           deterministic=True)]
    on_device = [device(a) for a in host]
    with transfer_guard() as log:
        got = [cupy_backend.run_forward(launch, plan, *on_device),
               *cupy_backend.run_backward(launch, plan, device(grad), *on_device,
                                          deterministic=True)]
    assert log == Counter()
    assert kernels == Counter({"msda_forward": 1, "msda_backward": 1,
                               "msda_value_contributions": 1, "msda_gather_grad_value": 1})
    assert all(np.array_equal(to_numpy(a), b) for a, b in zip(got, expected))


def test_load_state_dict_takes_device_arrays(cp):
    # regression: the shared-key check read ``value.data``, a CuPy array's device pointer
    from minidetr.models.build import build_model
    from minidetr.models.config import get_config
    model = build_model(get_config("tiny", "plain")).to("cuda")
    state = {k: device(v) for k, v in model.state_dict().items()}
    shared = [k for k in state if k.startswith("class_embed.1.")]
    assert shared                                      # plain: one class head, 2 names
    model.load_state_dict(state)
    state[shared[0]] = state[shared[0]] + 1.0
    with pytest.raises(KeyError, match="same shared tensor"):
        model.load_state_dict(state)


def test_reference_output_comparison_takes_device_arrays_and_tensors(cp):
    # regression: compare() read ``value.data``, a CuPy array's device pointer
    from minidetr.weights.reference_outputs import compare
    host = {"pred_logits": numbers((1, 4, 91), dtype=np.float32),
            "pred_boxes": numbers((1, 4, 4), dtype=np.float32)}
    expected = compare(host, "plain")
    assert compare({k: device(v) for k, v in host.items()}, "plain") == expected
    assert compare({k: Tensor(device(v)) for k, v in host.items()}, "plain") == expected


# =========================================================================== 3. training
def _training_setup(variant, where, dropout=0.0):
    from minidetr.bench.common import synthetic_batch
    from minidetr.models.build import build_criterion, build_model
    from minidetr.models.config import get_config
    from minidetr.optim import AdamW
    from minidetr.training import TrainConfig
    from minidetr.training.engine import build_param_groups

    cfg = get_config("tiny", variant, dropout=dropout)
    model = build_model(cfg)
    if where != "cpu":
        model.to(where)
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-3, weight_decay=1e-4)
    batch = synthetic_batch(2, 64, 64, cfg.num_classes, np.random.default_rng(0))
    return cfg, model, build_criterion(cfg), optimizer, batch


@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_training_steps_on_the_device_equal_numpy_and_copy_only_what_is_allowed(variant):
    from minidetr.training.engine import train_step

    _, model, criterion, optimizer, batch = _training_setup(variant, "cpu")
    with numpy_references():
        expected = [train_step(model, criterion, optimizer, batch) for _ in range(3)]
    expected_state = model.state_dict()
    with fakecupy.installed():
        cfg, model, criterion, optimizer, batch = _training_setup(variant, "cuda")
        got, launches = [], []
        for _ in range(3):
            with transfer_guard() as log, fakecupy.count_launches() as counted:
                got.append(train_step(model, criterion, optimizer, batch, device="cuda"))
            prediction_sets = cfg.dec_layers + (1 if cfg.two_stage else 0)
            assert log == Counter({"the matcher's cost matrices": prediction_sets,
                                   "the step's logged values": 1}), log
            launches.append(counted)
        state = model.state_dict()
        trainable = sum(1 for p in model.parameters() if p.requires_grad)
    # every logged value bit for bit, except the gradient norm: on the host its float64
    # sum of squares runs in Numba's order (minidetr/ops/grad_norm_cpu.py), on the device
    # in the reference's, which can differ in the last bit (the gradients themselves are
    # compared bit for bit through the parameters below)
    for step, (g, e) in enumerate(zip(got, expected)):
        assert g.keys() == e.keys()
        assert {k: v for k, v in g.items() if k != "grad_norm"} == \
            {k: v for k, v in e.items() if k != "grad_norm"}, f"step {step}"
        assert g["grad_norm"] == pytest.approx(e["grad_norm"], rel=1e-14, abs=0), \
            f"step {step}: grad_norm {g['grad_norm']!r} != {e['grad_norm']!r}"
    for key, value in expected_state.items():
        assert np.array_equal(state[key], value), f"{key} differs after 3 steps"
    totals = [sum(c.values()) for c in launches]
    assert totals[1] == totals[2] > 1000 and launches[1] == launches[2], totals
    assert totals[0] - totals[1] == 2 * trainable      # step 1 also creates the moments
    assert launches[1]["ops/msda/__init__.py:MSDeformAttnFunction.forward"] > 0


def test_a_training_step_with_dropout_draws_its_masks_on_the_device():
    from minidetr.training.engine import train_step

    with fakecupy.installed():
        _, model, criterion, optimizer, batch = _training_setup("plain", "cuda", dropout=0.1)
        with transfer_guard() as log, fakecupy.count_launches() as launches:
            values = train_step(model, criterion, optimizer, batch, device="cuda")
    assert set(log) == {"the matcher's cost matrices", "the step's logged values"}
    assert launches["functional/random.py:_uniform"] > 0
    assert all(np.isfinite(v) for v in values.values())


# =========================================================================== 4. command line
def test_the_command_line_trains_resumes_evaluates_and_predicts_on_the_device(tmp_path,
                                                                              capsys):
    from minidetr.cli import main
    from minidetr.data import generate_shapes_dataset
    from minidetr.weights.checkpoint import load_checkpoint

    data, run = tmp_path / "data", tmp_path / "run"
    generate_shapes_dataset(data, num_train=4, num_val=2, image_size=(48, 48), seed=0)
    on_device = ["--device", "cuda", "--no-progress"]
    with fakecupy.installed(), fakecupy.count_launches() as launches:
        assert main(["train", "--data", str(data), "--out", str(run), "--epochs", "1",
                     "--batch-size", "2", "--num-workers", "0", "--transforms", "tiny",
                     "--max-size", "64", "--debug-transfers", *on_device]) == 0
        after_one_epoch = sum(launches.values())
        assert main(["train", "--resume", str(run), "--epochs", "2", "--debug-transfers",
                     *on_device]) == 0
        assert main(["eval", str(run), "--max-images", "2", *on_device]) == 0
        assert main(["predict", str(run), str(data / "val"), "--out", str(tmp_path / "png"),
                     *on_device]) == 0
    out = capsys.readouterr().out
    assert "on cuda" in out and "resuming" in out and "COCO box metrics" in out
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    assert after_one_epoch > 0 and sum(launches.values()) > after_one_epoch
    assert len(list((tmp_path / "png").glob("*.jpg"))) == 2
    ckpt = load_checkpoint(run / "last.npz")           # written from the device: host arrays
    assert all(type(v) is np.ndarray for v in ckpt.model_state.values())
    assert main(["eval", str(run), "--max-images", "2", "--device", "cpu",
                 "--no-progress"]) == 0                # and it loads on the CPU


# =========================================================================== 5. bench
def test_bench_launches_counts_a_tiny_step_by_component(tmp_path, capsys):
    from minidetr.autograd import Function
    from minidetr.cli import main
    from minidetr.models.config import get_config

    apply = Function.__dict__["apply"]
    path = tmp_path / "launches.json"
    assert main(["bench", "launches", "--config", "tiny", "--variant", "plain", "--size",
                 "64x64", "--json", str(path)]) == 0
    assert Function.__dict__["apply"] is apply             # the node tagging is undone
    result = json.loads(path.read_text())["results"]["plain"]
    rows = result["by_component"]
    assert sum(r["forward"] + r["backward"] for r in rows.values()) == result["total"] > 1000
    cfg = get_config("tiny")
    calls = cfg.enc_layers + cfg.dec_layers                # one MSDA op per layer
    assert rows["msda"] == {"forward": calls, "backward": calls}
    for component in ("backbone", "encoder", "decoder", "losses+matcher"):
        assert rows[component]["forward"] > 0 and rows[component]["backward"] > 0, component
    assert rows["autograd engine"]["forward"] == 0 and rows["optimiser"]["backward"] == 0
    assert result["host_copies"] == {"the matcher's cost matrices": cfg.dec_layers,
                                     "the step's logged values": 1}
    sites = dict(result["top_call_sites"])
    assert len(sites) == 15 and sites["ops/adamw_kernel.py:fused_step"] > 0   # 1 per tensor
    out = capsys.readouterr().out
    assert f"plain: {result['total']} kernel launches per training step" in out
    assert "top 15 call sites" in out
