"""The CPU fast paths of the optimiser step against their readable references.

* ``minidetr/ops/adamw_cpu.py``: ``AdamW(fused=None)`` on NumPy arrays (the Numba kernel)
  equals ``AdamW(fused=False)`` (the readable lines of ``AdamW.step``) *bit for bit*,
  float32 and float64, over several steps (t = 1, a zero gradient, large gradients,
  t large), for two groups with different lr and weight decay, a parameter without a
  gradient, a 0-d parameter, parameters below and above ``PARALLEL_FROM`` (both
  kernels) and a non-contiguous gradient. Checkpoints move between the two paths.
  Which path runs: the kernel for float32/float64 C-contiguous NumPy parameters, the
  readable lines for the others (float16, a Fortran-ordered parameter).
* ``minidetr/ops/grad_norm_cpu.py``: the one-pass float64 sum of squares against NumPy's
  ``np.sum(g * g, dtype=np.float64)``, and ``clip_grad_norm_`` on the CPU against the
  reference formula (the clipping tests with known values are in test_optim.py).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minidetr import nn
from minidetr.ops import adamw_cpu, grad_norm_cpu
from minidetr.optim import AdamW, clip_grad_norm_


def _assert_same_bits(actual, expected, what):
    """Equal arrays, element for element (NaN equals NaN); else name the first that differs."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, \
        f"{what}: {actual.dtype} {actual.shape} vs {expected.dtype} {expected.shape}"
    differ = ~((actual == expected) | (np.isnan(actual) & np.isnan(expected)))
    if differ.any():
        k = tuple(int(i) for i in np.argwhere(differ)[0])
        raise AssertionError(f"{what}: {int(differ.sum())} of {actual.size} elements differ; "
                             f"first at {k}: {actual[k]!r} vs {expected[k]!r} (readable)")


def _live(opt):
    return [p for group in opt.param_groups for p in group["params"]]


# --------------------------------------------------------------------------- AdamW
SHAPES = [(), (3,), (2, 3, 4), (256, 300), (3, 26000)]   # 0-d; serial, parallel kernels


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_cpu_equals_readable_bit_for_bit(dtype):
    assert min(math.prod(s) for s in SHAPES[3:]) >= adamw_cpu.PARALLEL_FROM > 24
    rng = np.random.default_rng(11)
    start = [rng.normal(size=s).astype(dtype) for s in SHAPES]
    frozen0 = np.array([1.5, -2.0], dtype)

    def build(fused):
        params = [nn.Parameter(a.copy()) for a in start]
        frozen = nn.Parameter(frozen0.copy())                        # never gets a gradient
        return AdamW([{"params": params[:2], "name": "main"},
                      {"params": [params[2], frozen, params[3]], "lr": 3e-3,
                       "weight_decay": 0.0, "betas": (0.85, 0.99)},
                      {"params": params[4:], "lr": 0.5, "weight_decay": 0.3}],
                     lr=0.02, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.05, fused=fused)

    fused, readable = build(None), build(False)
    calls = []
    original = adamw_cpu.fused_step

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    gradients = [[rng.normal(size=s).astype(dtype) for s in SHAPES],                # t = 1
                 [np.zeros(s, dtype) for s in SHAPES],                              # zeros
                 [(rng.normal(size=s) * 10.0 ** rng.integers(-6, 4, s)).astype(dtype)
                  for s in SHAPES],                                                 # scales
                 [rng.normal(size=s).astype(dtype) for s in SHAPES]]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(adamw_cpu, "fused_step", counting)
        for step, grads in enumerate(gradients, 1):
            if step == 4:                                    # t large: bias corrections -> 1
                for opt in (fused, readable):
                    for state in opt.state.values():
                        state["step"] = 100_000
            for opt in (fused, readable):
                live = [p for p in _live(opt) if p.shape != frozen0.shape]
                for p, g in zip(live, grads):
                    p.grad = g.copy()
                live[3].grad = np.ascontiguousarray(grads[3].T).T   # (256, 300), F-ordered
                opt.step()
            for p_f, p_r in zip(_live(fused), _live(readable)):
                what = f"step {step}, {np.dtype(dtype)} parameter {p_f.shape}"
                _assert_same_bits(p_f.data, p_r.data, what)
                if p_r.grad is None:
                    continue
                for key in ("exp_avg", "exp_avg_sq"):
                    _assert_same_bits(fused.state[id(p_f)][key], readable.state[id(p_r)][key],
                                      f"{key}, {what}")
    assert len(calls) == len(SHAPES) * len(gradients)       # fused=None ran the kernel
    frozen = fused.param_groups[1]["params"][1]
    np.testing.assert_array_equal(frozen.data, frozen0)
    assert id(frozen) not in fused.state                     # no grad: no state, no step
    assert all(not np.array_equal(p.data, a) for p, a in zip(_live(fused), start[:2]))


def test_bit_equality_is_a_strong_check():
    """The same chain computed in float64 and rounded once differs from the float32 chain
    somewhere, so equal float32 bits mean the kernel rounds where the chain rounds."""
    rng = np.random.default_rng(2)
    p32, g32 = rng.normal(size=(2, 1000)).astype(np.float32)
    p64 = p32.astype(np.float64)
    fused = [p32.copy(), np.zeros_like(p32), np.zeros_like(p32)]
    in_double = [p64, np.zeros_like(p64), np.zeros_like(p64)]
    kwargs = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=1)
    adamw_cpu.fused_step(fused[0], g32, fused[1], fused[2], **kwargs)
    adamw_cpu.fused_step(in_double[0], g32.astype(np.float64), in_double[1], in_double[2],
                         **kwargs)
    assert (in_double[0].astype(np.float32) != fused[0]).any()


@pytest.mark.parametrize("n", [5, adamw_cpu.PARALLEL_FROM])
def test_division_by_zero_gives_what_numpy_gives(n):
    """eps = 0 and a zero gradient at t = 1: m = v = 0, so the step is 0 / 0 = NaN (and
    x / 0 = inf for a nonzero m), as in NumPy, not a ZeroDivisionError."""
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=0.0, weight_decay=0.0, step=1)
    p = np.ones(n, np.float32)
    g = np.zeros(n, np.float32)
    m, v = np.zeros_like(p), np.zeros_like(p)
    adamw_cpu.fused_step(p, g, m, v, **kwargs)
    assert np.isnan(p).all() and (m == 0).all() and (v == 0).all()
    p, m, v = np.ones(n, np.float32), np.ones(n, np.float32), np.zeros(n, np.float32)
    adamw_cpu.fused_step(p, g, m, v, **kwargs)                   # m = 0.9, v = 0: -inf
    assert (p == -np.inf).all()


@pytest.mark.parametrize("save_with, resume_with", [(None, False), (False, None)])
def test_checkpoint_moves_between_fused_and_readable(save_with, resume_with):
    rng = np.random.default_rng(5)
    shapes = [(4, 300), (7,)]
    start = [rng.normal(size=s).astype(np.float32) for s in shapes]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(5)]

    def run(opt, params, steps):
        for step_grads in steps:
            for p, g in zip(params, step_grads):
                p.grad = g.copy()
            opt.step()

    params = [nn.Parameter(a.copy()) for a in start]
    opt = AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-2,
                fused=save_with)
    run(opt, params, grads[:3])
    saved, saved_params = opt.state_dict(), [p.data.copy() for p in params]
    run(opt, params, grads[3:])                                      # uninterrupted

    resumed = [nn.Parameter(a) for a in saved_params]
    opt2 = AdamW([{"params": resumed[:1]}, {"params": resumed[1:]}], fused=resume_with)
    opt2.load_state_dict(saved)
    run(opt2, resumed, grads[3:])
    for i, (a, b) in enumerate(zip(params, resumed)):
        _assert_same_bits(b.data, a.data, f"parameter {i} resumed with fused={resume_with}")
        for key in ("exp_avg", "exp_avg_sq"):
            _assert_same_bits(opt2.state[id(b)][key], opt.state[id(a)][key], f"{key} {i}")


def test_parameters_the_kernel_cannot_take_get_the_readable_update():
    """float16 and a Fortran-ordered parameter: fused=None falls back, with the same result
    as fused=False; fused=True refuses before updating anything."""
    rng = np.random.default_rng(3)
    half = rng.normal(size=(5,)).astype(np.float16)
    fortran = np.asfortranarray(rng.normal(size=(3, 4)).astype(np.float32))
    grads = [rng.normal(size=a.shape).astype(a.dtype) for a in (half, fortran)]
    assert "float16" in adamw_cpu.why_not_fused(half, grads[0])
    assert "C-contiguous" in adamw_cpu.why_not_fused(fortran, grads[1])
    results = {}
    for fused in (None, False):
        params = [nn.Parameter(half.copy()), nn.Parameter(fortran.copy(order="F"))]
        for p, g in zip(params, grads):
            p.grad = g.copy()
        AdamW(params, lr=0.1, fused=fused).step()
        results[fused] = params
    for a, b in zip(results[None], results[False]):
        _assert_same_bits(a.data, b.data, f"{a.dtype} parameter, fused=None vs False")
        assert not np.array_equal(a.data, half if a.dtype == np.float16 else fortran)
    p = nn.Parameter(fortran.copy(order="F"))
    p.grad = grads[1]
    with pytest.raises(TypeError, match=r"group 0 with shape \(3, 4\): param is not a "
                                        r"writable C-contiguous array"):
        AdamW([p], fused=True).step()
    np.testing.assert_array_equal(p.data, fortran)


def test_fused_step_argument_errors():
    p = np.zeros((2, 3), np.float32)
    kwargs = dict(lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, step=1)
    with pytest.raises(ValueError, match=r"grad is float64 \(2, 3\), the parameter "
                                         r"float32 \(2, 3\)"):
        adamw_cpu.fused_step(p, np.zeros((2, 3)), p.copy(), p.copy(), **kwargs)
    with pytest.raises(ValueError, match=r"exp_avg_sq is ndarray float32 \(3, 2\)"):
        adamw_cpu.fused_step(p, p.copy(), p.copy(), np.zeros((3, 2), np.float32), **kwargs)
    with pytest.raises(ValueError, match="must be NumPy arrays"):
        adamw_cpu.fused_step(p, [0.0] * 6, p.copy(), p.copy(), **kwargs)
    read_only = p.copy()
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="exp_avg is not a writable C-contiguous array"):
        adamw_cpu.fused_step(p, p.copy(), read_only, p.copy(), **kwargs)


# --------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(0,), (5,), (37, 11), (520, 510)])      # serial, parallel
def test_sum_of_squares_matches_numpy(dtype, shape):
    assert 520 * 510 >= grad_norm_cpu.PARALLEL_FROM > 37 * 11
    rng = np.random.default_rng(8)
    g = (rng.normal(size=shape) * 10.0 ** rng.integers(-3, 3, shape)).astype(dtype)
    expected = float(np.sum(g * g, dtype=np.float64))         # squares rounded to dtype
    got = grad_norm_cpu.sum_of_squares(g)
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-13, abs=0.0), (got, expected)
    if g.ndim == 2:                                           # strided views read the same
        assert grad_norm_cpu.sum_of_squares(g.T) == got
        assert grad_norm_cpu.sum_of_squares(g[:, ::2]) == pytest.approx(
            float(np.sum(g[:, ::2] ** 2, dtype=np.float64)), rel=1e-13)
    if dtype == np.float32 and g.size > 1000:                 # the squares are in float32
        exact = float(np.sum(g.astype(np.float64) ** 2))
        assert abs(got - exact) > 1e-13 * exact


def test_sum_of_squares_known_values_and_errors():
    assert grad_norm_cpu.sum_of_squares(np.full(300_000, 0.5, np.float32)) == 75_000.0
    assert grad_norm_cpu.sum_of_squares(np.array([3.0, 4.0, 12.0])) == 169.0
    assert math.isnan(grad_norm_cpu.sum_of_squares(np.array([1.0, np.nan], np.float32)))
    assert grad_norm_cpu.sum_of_squares(np.array([np.inf, 1.0])) == math.inf
    with pytest.raises(ValueError, match="float32 or float64 NumPy arrays, got ndarray int64"):
        grad_norm_cpu.sum_of_squares(np.arange(3))


def test_clip_on_cpu_matches_the_reference_formula():
    """Total norm and clipped gradients of a model-like set (float32, tiny and large)
    against the readable formula of clip_grad_norm_'s docstring."""
    rng = np.random.default_rng(4)
    shapes = [(256,), (256, 256), (70_000,), (3, 3, 8, 8), ()]
    grads = [(rng.normal(size=s) * 0.01).astype(np.float32) for s in shapes]
    params = [nn.Parameter(np.zeros(s, np.float32)) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.copy()
    total = clip_grad_norm_(params, max_norm=0.1)
    expected = math.sqrt(sum(float(np.sum(g * g, dtype=np.float64)) for g in grads))
    assert total == pytest.approx(expected, rel=1e-13)
    factor = np.float32(min(0.1 / (expected + 1e-6), 1.0))
    for i, (p, g) in enumerate(zip(params, grads)):
        assert p.grad.dtype == np.float32
        np.testing.assert_allclose(p.grad, g * factor, rtol=2e-7, atol=0,
                                   err_msg=f"clipped gradient {i} {g.shape}")
    clipped_norm = math.sqrt(sum(float(np.sum(p.grad.astype(np.float64) ** 2)) for p in params))
    assert clipped_norm == pytest.approx(0.1, rel=1e-5)


def test_clip_on_cpu_writes_nothing_below_the_threshold_and_nan_everywhere_above():
    g = np.array([3.0, 4.0], np.float32)
    g.flags.writeable = False                 # any write would raise
    p = nn.Parameter(np.zeros(2, np.float32))
    p.grad = g
    assert clip_grad_norm_([p], max_norm=5.1) == pytest.approx(5.0)
    assert clip_grad_norm_([p], max_norm=math.inf) == pytest.approx(5.0)   # measure only
    with pytest.raises(ValueError, match="read-only"):
        clip_grad_norm_([p], max_norm=1.0)            # above: the gradient is scaled in place
    q = nn.Parameter(np.zeros(3))
    q.grad, p.grad = np.array([1.0, np.nan, 2.0]), np.array([3.0, 4.0], np.float32)
    total = clip_grad_norm_([p, q], max_norm=1.0, host=False)
    assert isinstance(total, np.float64) and math.isnan(total)
    assert np.isnan(p.grad).all() and np.isnan(q.grad).all()     # as PyTorch does
