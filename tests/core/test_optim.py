"""Tests of minidetr.optim: AdamW against hand-derived updates, clipping, StepLR, checkpoints."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minidetr import nn
from minidetr.backend import to_numpy
from minidetr.optim import AdamW, StepLR, clip_grad_norm_
from minidetr.testing import assert_allclose


def param(xp, values, dtype=np.float64):
    return nn.Parameter(xp.asarray(np.asarray(values, dtype=dtype)))


# --------------------------------------------------------------------------- AdamW
def test_adamw_first_step_is_sign_step_after_decay(xp):
    """With eps = 0, step 1 gives m^ = g and v^ = g^2: p1 = p0 (1 - lr wd) - lr sign(g)."""
    p = param(xp, [1.0, -2.0, 0.5])
    g = np.array([0.3, -4.0, 1e-3])
    opt = AdamW([p], lr=0.1, eps=0.0, weight_decay=0.5)
    p.grad = xp.asarray(g)
    opt.step()
    expected = np.array([1.0, -2.0, 0.5]) * (1 - 0.1 * 0.5) - 0.1 * np.sign(g)
    assert_allclose(p.data, expected, rtol=1e-14, atol=1e-15, what="AdamW step 1")


def test_adamw_two_steps_closed_form_with_groups(xp):
    """Two steps of two groups (different lr and weight decay), written out by hand."""
    b1, b2, eps = 0.9, 0.999, 1e-8
    a, b, frozen = param(xp, [0.5, -1.5]), param(xp, [2.0]), param(xp, [3.0])
    opt = AdamW([{"params": [a], "name": "main"},
                 {"params": [b, frozen], "lr": 0.01, "weight_decay": 0.0, "name": "slow"}],
                lr=0.1, betas=(b1, b2), eps=eps, weight_decay=0.2)
    grads = {"a": [np.array([0.2, -0.7]), np.array([-0.4, 0.1])],
             "b": [np.array([1.5]), np.array([0.5])]}
    for t in range(2):
        a.grad, b.grad = xp.asarray(grads["a"][t]), xp.asarray(grads["b"][t])
        opt.step()                          # ``frozen`` never gets a gradient

    def by_hand(p0, g1, g2, lr, wd):
        p1 = p0 * (1 - lr * wd) - lr * ((1 - b1) * g1 / (1 - b1)) / (
            np.sqrt((1 - b2) * g1 ** 2 / (1 - b2)) + eps)
        m2 = b1 * (1 - b1) * g1 + (1 - b1) * g2
        v2 = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
        return p1 * (1 - lr * wd) - lr * (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + eps)

    assert_allclose(a.data, by_hand(np.array([0.5, -1.5]), *grads["a"], 0.1, 0.2),
                    rtol=1e-13, what="group main")
    assert_allclose(b.data, by_hand(np.array([2.0]), *grads["b"], 0.01, 0.0),
                    rtol=1e-13, what="group slow")
    assert to_numpy(frozen.data)[0] == 3.0                      # no grad: no decay, no step
    sd = opt.state_dict()
    assert sorted(sd["state"]) == [0, 1] and sd["state"][0]["step"] == 2
    assert [g["name"] for g in sd["param_groups"]] == ["main", "slow"]
    assert sd["param_groups"][1]["params"] == [1, 2]


def test_adamw_keeps_float32_and_device(xp):
    p = param(xp, np.ones((3, 2)), dtype=np.float32)
    p.grad = xp.ones((3, 2), dtype=xp.float32)
    opt = AdamW([p], lr=1e-3)
    opt.step()
    assert p.dtype == np.float32 and type(p.data) is type(xp.zeros(1))
    state = opt.state[id(p)]
    assert state["exp_avg"].dtype == np.float32 and type(state["exp_avg"]) is type(p.data)
    opt.zero_grad()
    assert p.grad is None


def _run(params, opt, grads):
    for g in grads:
        for p, gi in zip(params, g):
            p.grad = gi.copy()
        opt.step()
    return [p.data.copy() for p in params]


def test_adamw_state_dict_round_trip_gives_identical_steps(rng):
    shapes = [(3, 2), (4,)]
    grads = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(5)]
    params = [nn.Parameter(rng.normal(size=s).astype(np.float32)) for s in shapes]
    opt = AdamW([{"params": params[:1]}, {"params": params[1:], "lr": 3e-3}], lr=1e-2)
    _run(params, opt, grads[:3])
    saved_params = [p.data.copy() for p in params]
    saved = opt.state_dict()
    uninterrupted = _run(params, opt, grads[3:])

    resumed = [nn.Parameter(a.copy()) for a in saved_params]
    opt2 = AdamW([{"params": resumed[:1]}, {"params": resumed[1:]}], lr=0.5)   # lr restored
    opt2.load_state_dict(saved)
    assert opt2.param_groups[1]["lr"] == 3e-3
    for u, r in zip(uninterrupted, _run(resumed, opt2, grads[3:])):
        np.testing.assert_array_equal(u, r)
    # The saved state is a snapshot: later steps did not change it.
    assert saved["state"][0]["step"] == 3

    with pytest.raises(ValueError, match="parameter groups"):
        AdamW(resumed).load_state_dict(saved)
    wrong = [nn.Parameter(np.zeros((2, 2), np.float32)), resumed[1]]
    with pytest.raises(ValueError, match="shape"):
        AdamW([{"params": wrong[:1]}, {"params": wrong[1:]}]).load_state_dict(saved)


def test_adamw_argument_errors():
    p = nn.Parameter(np.zeros(2))
    with pytest.raises(ValueError, match="empty"):
        AdamW([])
    with pytest.raises(ValueError, match="twice"):
        AdamW([{"params": [p]}, {"params": [p]}])
    with pytest.raises(ValueError, match="unknown keys"):
        AdamW([{"params": [p], "weight_deacy": 0.1}])
    with pytest.raises(ValueError, match="lr"):
        AdamW([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        AdamW([p], betas=(0.9, 1.0))
    with pytest.raises(TypeError, match="Parameters"):
        AdamW([np.zeros(2)])


# --------------------------------------------------------------------------- clipping
def test_clip_grad_norm_scales_all_gradients_together(xp):
    a, b, no_grad = param(xp, [0.0, 0.0]), param(xp, [0.0]), param(xp, [0.0])
    a.grad, b.grad = xp.asarray([3.0, 4.0]), xp.asarray([12.0])          # total norm 13
    total = clip_grad_norm_([a, b, no_grad, a], max_norm=6.5)            # a twice: counted once
    assert isinstance(total, float) and total == pytest.approx(13.0, rel=1e-12)
    scale = 6.5 / (13.0 + 1e-6)
    assert_allclose(a.grad, np.array([3.0, 4.0]) * scale, rtol=1e-12, what="clipped a")
    assert_allclose(b.grad, np.array([12.0]) * scale, rtol=1e-12, what="clipped b")
    # Below the threshold nothing changes, and the norm is still returned.
    before = to_numpy(a.grad).copy()
    assert clip_grad_norm_([a, b], max_norm=100.0) == pytest.approx(6.5, rel=1e-6)
    np.testing.assert_array_equal(to_numpy(a.grad), before)
    assert clip_grad_norm_([no_grad], 1.0) == 0.0
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm_([a], 0.0)


def test_clip_grad_norm_float32_grads_stay_float32(rng):
    p = nn.Parameter(np.zeros(1000, np.float32))
    p.grad = rng.normal(size=1000).astype(np.float32)
    expected = float(np.sqrt((p.grad.astype(np.float64) ** 2).sum()))
    assert clip_grad_norm_([p], 0.1) == pytest.approx(expected, rel=1e-6)   # float32 squares
    assert p.grad.dtype == np.float32
    assert float(np.sqrt((p.grad.astype(np.float64) ** 2).sum())) == pytest.approx(0.1, rel=1e-5)


# --------------------------------------------------------------------------- StepLR
def test_step_lr_schedule_and_state_dict():
    p, q = nn.Parameter(np.zeros(1)), nn.Parameter(np.zeros(1))
    opt = AdamW([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=1.0)
    sched = StepLR(opt, step_size=2, gamma=0.1)
    lrs = [sched.get_last_lr()]
    for _ in range(5):
        sched.step()
        lrs.append(sched.get_last_lr())
    expected = [[1.0 * 0.1 ** (e // 2), 0.5 * 0.1 ** (e // 2)] for e in range(6)]
    for got, want in zip(lrs, expected):
        assert got == pytest.approx(want, rel=1e-15)
    state = sched.state_dict()
    assert state["last_epoch"] == 5

    fresh = AdamW([{"params": [p]}, {"params": [q], "lr": 0.5}], lr=1.0)
    resumed = StepLR(fresh, step_size=7, gamma=0.5)
    resumed.load_state_dict(state)
    assert resumed.get_last_lr() == pytest.approx(expected[5])
    resumed.step()
    assert resumed.get_last_lr() == pytest.approx([1e-3, 5e-4])
    with pytest.raises(ValueError, match="step_size"):
        StepLR(opt, step_size=0)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-2)
