# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 18. Appendix: testing GPU code without a GPU
#
# *An appendix to [notebook 12](12_gpu_kernels.ipynb), which is about the kernels
# themselves; this one is about the rest of the GPU path: every array operation of a
# training step, on any machine.*
#
# minidetr has one code path: every Function takes its array module from its inputs
# (`xp = get_array_module(x)`), so the same lines run on NumPy and on CuPy arrays. But a
# machine without a GPU only ever runs the NumPy half, and a line that is right for NumPy
# and wrong for CuPy stays hidden until someone has a GPU. `minidetr.testing.fakecupy` is a
# stand-in for CuPy, backed by NumPy, that **fails where CuPy fails**: its `ndarray` wraps
# a NumPy array and refuses to become one, refuses NumPy arrays as operands, sends every
# host conversion (`float()`, `.item()`, `if x:` ...) through one visible copy, and
# counts every operation that would be a kernel launch. Inside
# `with fakecupy.installed():` minidetr sees CuPy and one GPU, and `to_device(x, "cuda")`
# gives fake device arrays. The arithmetic underneath is NumPy's, so results equal those
# of the same code on NumPy bit for bit (on NumPy arrays, the norms and the softmax take
# fused Numba CPU kernels instead, which round differently); what the fake cannot tell
# is speed and memory limits. Details
# and the test suite's use of it:
# [gpu-training.md §3](../docs/gpu-training.md#3-testing-the-gpu-path-without-a-gpu-minidetrtestingfakecupy).
#
# This notebook
#
# 1. replays two bugs the fake found, which NumPy hides and CuPy does not;
# 2. catches a hidden device -> host copy with `transfer_guard`;
# 3. counts the kernel launches of one attention layer, equal to NumPy's results;
# 4. counts the launches of the readable and the fused AdamW;
# 5. counts and attributes the launches of a whole training step.
#
# **Doc:** [gpu-training.md](../docs/gpu-training.md) §2–4 (one code path, host copies,
# testing without a GPU, launch counts). **Code:** `minidetr/testing/fakecupy.py`,
# `minidetr/backend.py` (`transfer_guard`, `allow_transfers`), `minidetr/bench/launches.py`,
# `minidetr/ops/adamw_kernel.py`, `minidetr/testing/elementwise_harness.py`.

# %%
import os
import time
import traceback

import matplotlib.pyplot as plt
import numpy as np

import minidetr.nn as nn
from minidetr.autograd import Tensor
from minidetr.backend import (HostTransferError, allow_transfers, cupy_available, get_array_module,
                              to_device, to_numpy, transfer_guard)
from minidetr.bench import launches as bench_launches
from minidetr.ops import adamw_kernel
from minidetr.optim import AdamW
from minidetr.testing import elementwise_harness, fakecupy

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
GPU = cupy_available()
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}; a real GPU here: {GPU}")

# %% [markdown]
# ## 1. Two planted bugs
#

# The first run on the fake found five bugs that a GPU would have
# hit. Two of them, replayed in tiny functions:
#
# * `tensor > 0.0` once made the `0.0` an array with `np.asarray` before comparing. NumPy
#   compares an array with a 0-d array happily; CuPy refuses a host array beside a device
#   array with a TypeError (using it would need a hidden host -> device copy).
# * `getattr(value, "data", value)` was meant to unwrap a Tensor. But arrays have a
#   `.data` too: on NumPy a `memoryview` of the buffer, which `np.asarray` quietly turns
#   back into the same values, so nothing looked wrong; on CuPy the device pointer.

# %%
def positive_mask_wrong(x):
    """x > 0 elementwise, for a NumPy or CuPy array x. The bug: 0 as a host array."""
    return x > np.asarray(0.0, dtype=x.dtype)


def positive_mask(x):
    """x > 0 elementwise: a Python number goes beside any array (no copy, no upcast)."""
    return x > 0.0


def host_copy_wrong(value):
    """The values of a Tensor or an array, on the host. The bug: arrays have .data too."""
    return to_numpy(getattr(value, "data", value))


def host_copy(value):
    """The values of a Tensor or an array, on the host."""
    return to_numpy(value.data if isinstance(value, Tensor) else value)


x_host = np.array([-1.5, 0.0, 0.5, 2.0], np.float32)                   # (4,)
print(f"NumPy: positive_mask_wrong -> {positive_mask_wrong(x_host)}, host_copy_wrong -> "
      f"{host_copy_wrong(x_host)} (through a {type(x_host.data).__name__})")
planted_errors = {}
with fakecupy.installed():
    x_device = to_device(x_host, "cuda")                                 # (4,) on the "GPU"
    print(f"fakecupy: x_device is a {type(x_device).__module__}.{type(x_device).__name__}, "
          f"its .data a {type(x_device.data).__name__}")
    for wrong in (positive_mask_wrong, host_copy_wrong):
        try:
            wrong(x_device)
        except TypeError as error:                    # what CuPy raises, on a GPU
            planted_errors[wrong.__name__] = str(error)
            print(f"fakecupy: {wrong.__name__} -> TypeError: {error}")
    fixed_on_device = {"positive_mask": to_numpy(positive_mask(x_device)),
                       "host_copy(array)": host_copy(x_device),
                       "host_copy(Tensor)": host_copy(Tensor(x_device))}
fixed_on_host = {"positive_mask": positive_mask(x_host), "host_copy(array)": host_copy(x_host),
                 "host_copy(Tensor)": host_copy(Tensor(x_host))}
for name, on_host in fixed_on_host.items():
    print(f"fixed {name:<18} NumPy {on_host}   fakecupy {fixed_on_device[name]}")

# %% [markdown]
# minidetr's fixes are the same: `Tensor.__gt__` passes numbers through as numbers, and
# code that unwraps a Tensor asks `isinstance(value, Tensor)`.

# %% [markdown]
# ## 2. A hidden host copy
#
# A device -> host copy makes the CPU wait until the GPU has finished everything queued
# before it, so a training step should copy only on purpose
# ([gpu-training.md](../docs/gpu-training.md) §2: the matcher's cost matrices, and the
# step's logged values once, each marked with `allow_transfers`). The classic hidden one is `float(loss)` to log the loss: free
# on NumPy, a stall per step on a GPU, and nothing fails. `transfer_guard()` (the
# `train --debug-transfers` switch) turns every copy of a device array outside an
# `allow_transfers` block into a `HostTransferError`, and on the fake it sees the same
# copies as on CuPy. A tiny least-squares fit, three steps of plain gradient descent on
# one batch, logged both ways:

# %%
def descent_step(model, x, y, lr=0.1):
    """One gradient-descent step of mean((model(x) - y)^2); returns the loss (0-d Tensor).

    Shapes: x (B, 3), y (B, 1).
    """
    diff = model(x) - y                                   # (B, 1)
    loss = (diff * diff).mean()                           # ()
    model.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.data -= lr * p.grad                             # in place, on the arrays' device
    return loss


def fit_wrong(model, batches):
    """The losses of one pass over ``batches``, as Python floats."""
    losses = []
    for x, y in batches:
        loss = descent_step(model, x, y)
        losses.append(float(loss.data))                   # a device -> host copy per step
    return losses


def fit(model, batches):
    """The losses of one pass over ``batches``, as Python floats: one copy at the end."""
    losses = [descent_step(model, x, y).data for x, y in batches]  # 0-d device arrays
    xp = get_array_module(*losses)
    with allow_transfers("the logged losses"):            # the one copy, on purpose
        return to_numpy(xp.stack(losses)).tolist()        # (steps,) -> list


def small_model():
    return nn.Linear(3, 1, rng=np.random.default_rng(SEED))


fit_x = np.random.default_rng(SEED).standard_normal((8, 3)).astype(np.float32)  # (B, 3)
fit_y = fit_x @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.25             # (B, 1)
fit_batches = [(fit_x, fit_y)] * 3                            # three steps on one batch
losses_numpy = fit_wrong(small_model(), [(Tensor(x), Tensor(y)) for x, y in fit_batches])
print(f"NumPy, fit_wrong: losses {np.round(losses_numpy, 4)} (no guard has anything to see)")
hidden_copy_error = hidden_copy_line = None
with fakecupy.installed():
    device_batches = [(Tensor(to_device(x, "cuda")), Tensor(to_device(y, "cuda")))
                      for x, y in fit_batches]
    with transfer_guard() as logged_copies:
        try:
            fit_wrong(small_model().to("cuda"), device_batches)
        except HostTransferError as error:
            hidden_copy_error = error
            hidden_copy_line = next(frame.line for frame in traceback.extract_tb(
                error.__traceback__) if frame.name == "fit_wrong")
        losses_device = fit(small_model().to("cuda"), device_batches)
print(f"fakecupy, fit_wrong: HostTransferError: {hidden_copy_error}")
print(f"  raised by the line: {hidden_copy_line}")
print(f"fakecupy, fit: losses {np.round(losses_device, 4)}; the guard let through "
      f"{dict(logged_copies)}")

# %% [markdown]
# ## 3. Counting kernel launches
#
# On a GPU each array operation launches a kernel, and a
# launch costs a few microseconds of CPU time however small the array. Many of
# minidetr's kernels finish sooner than that, so the *number* of launches sets the time
# of a step as much as the arithmetic does. `fakecupy.count_launches()` counts, inside its
# block, every operation that would launch one (views such as `reshape` and `transpose`
# launch nothing), under the innermost minidetr function that asked for it; its `site`
# argument picks another key. One forward and backward pass of a small `MSDeformAttn`
# ($C = 16$, $M = 2$, $L = 2$ levels, $K = 2$, 6 queries), first on NumPy, then on the
# fake, where the op's `"cupy"` backend is one launch each way:

# %%
attn_rng = np.random.default_rng(SEED)
attn_levels = [(6, 8), (3, 4)]                                # (H_l, W_l)
attn = nn.MSDeformAttn(d_model=16, n_levels=2, n_heads=2, n_points=2, rng=attn_rng)
attn_inputs = (attn_rng.standard_normal((1, 6, 16)).astype(np.float32),    # query (N, Lq, C)
               attn_rng.uniform(0.1, 0.9, (1, 6, 2, 2)).astype(np.float32),  # (N, Lq, L, 2)
               attn_rng.standard_normal((1, 60, 16)).astype(np.float32))    # value (N, S, C)
attn_shapes = np.array(attn_levels, np.int64)                 # (L, 2)
attn_starts = np.array([0, 6 * 8], np.int64)                  # (L,)


def attention_pass(device):
    """Forward and backward of ``attn`` on ``device``; host copies of the output and of
    every gradient (inputs first, then the parameters)."""
    inputs = [Tensor(to_device(a, device), requires_grad=True) for a in attn_inputs]
    attn.zero_grad()
    output = attn(*inputs, attn_shapes, attn_starts)         # (N, Lq, C)
    (output * output).sum().backward()
    return [to_numpy(output.data)] + [to_numpy(t.grad) for t in inputs] + \
        [to_numpy(p.grad) for p in attn.parameters()]


attn_numpy = attention_pass("cpu")
with fakecupy.installed():
    attn.to("cuda")
    with fakecupy.count_launches() as attn_launches, \
            fakecupy.count_launches(lambda frame: fakecupy.call_site(frame).split(":")[0]) \
            as attn_launches_by_file:
        attn_fake = attention_pass("cuda")
    attn.to("cpu")
# NumPy's softmax runs a fused Numba kernel (minidetr/functional/softmax_cpu.py) that sums
# in float64, the device the readable code, so the two agree to float32 rounding
attn_worst = max(float(np.max(np.abs(a - b) / (np.abs(b) + 1e-3)))
                 for a, b in zip(attn_numpy, attn_fake))
print(f"{sum(attn_launches.values())} launches; output and all "
      f"{len(attn_fake) - 1} gradients equal to NumPy's within {attn_worst:.0e} "
      f"(relative; float32 rounding)")
print("top call sites:")
for site, n in attn_launches.most_common(8):
    print(f"  {n:>4}  {site}")
print("by file:", ", ".join(f"{name} {n}" for name, n in attn_launches_by_file.most_common()))

# %% [markdown]
# The op itself is 2 of those launches; its four `Linear` projections, the softmax and
# the autograd engine (which adds up the gradients of tensors used more than once) are the
# rest. A small layer is many small launches.

# %% [markdown]
# ## 4. The optimiser: one fused kernel per parameter
#
# The optimiser is the extreme case. The readable AdamW update
# (`minidetr.optim.AdamW.step`) is 14 array operations per parameter, each a launch on a
# small array. On CuPy, `AdamW` (`fused=None`, the default) runs the same arithmetic in the
# same order as **one** `ElementwiseKernel` launch per parameter, whose body is the CUDA C
# below (`minidetr/ops/adamw_kernel.py`,
# [gpu-kernels.md](../docs/gpu-kernels.md#fused-adamw)); the fake runs that body through a
# loop that g++ compiles (`minidetr.testing.elementwise_harness`). Three steps on four
# parameters, with the readable update (`fused=False`) and with the kernel, counted per
# step; the first step also creates the moments (two launches per parameter):

# %%
print(adamw_kernel.OPERATION)
adamw_shapes = [(16, 16), (16,), (4, 16), (4,)]               # weights and biases
adamw_rng = np.random.default_rng(SEED)
adamw_initial = [adamw_rng.standard_normal(s).astype(np.float32) for s in adamw_shapes]
adamw_grads = [[adamw_rng.standard_normal(s).astype(np.float32) for s in adamw_shapes]
               for _ in range(3)]                              # per step, per parameter
adamw_launches, adamw_params = {}, {}
if elementwise_harness.why_no_compiler():
    print(f"skipped: {elementwise_harness.why_no_compiler()}, so the fake cannot run the "
          "fused kernel")
else:
    with fakecupy.installed():
        for fused in (False, None):
            params = [nn.Parameter(to_device(a, "cuda")) for a in adamw_initial]
            optimizer = AdamW(params, lr=1e-2, weight_decay=1e-2, fused=fused)
            adamw_launches[fused] = []
            for step_grads in adamw_grads:
                for p, g in zip(params, step_grads):
                    p.grad = to_device(g, "cuda")
                with fakecupy.count_launches() as launches:
                    optimizer.step()
                adamw_launches[fused].append(sum(launches.values()))
            adamw_params[fused] = [to_numpy(p.data) for p in params]
            print(f"fused={str(fused):<5} launches per step {adamw_launches[fused]} for "
                  f"{len(params)} parameters, from {sorted(launches)}")
    adamw_bit_equal = all(np.array_equal(a, b) for a, b in zip(adamw_params[False],
                                                                 adamw_params[None]))
    print(f"after 3 steps the parameters of both are bit-equal: {adamw_bit_equal}")

# %% [markdown]
# ## 5. A whole training step
#
# `minidetr.bench.launches.count_step_launches` (the command
# `python -m minidetr bench launches`) runs two training steps of
# `minidetr.training.engine.train_step` (forward, matcher and losses, backward, clipping, AdamW) on
# the fake device and counts the second, attributing each launch to a component of the
# model; a backward kernel belongs to the component whose forward recorded the operation.
# The `tiny` model on a synthetic batch (the full table for the larger presets is in the
# [doc's §4](../docs/gpu-training.md#4-kernel-launches-per-step)):

# %%
launch_variants = ("plain",) if SMALL else ("plain", "two-stage")
launch_batch, launch_size = (1, (64, 64)) if SMALL else (2, (128, 128))   # B, (H, W)
launch_results = {}
start = time.perf_counter()
for variant in launch_variants:
    launch_results[variant] = result = bench_launches.count_step_launches(
        "tiny", variant, batch=launch_batch, size=launch_size, seed=SEED)
    print(f"tiny {variant}, batch {launch_batch} of {launch_size[0]}x{launch_size[1]}: "
          f"{result['total']} launches; host copies {result['host_copies']}")
    for site, n in result["top_call_sites"][:5]:
        print(f"  {n:>5}  {site}")
print(f"({time.perf_counter() - start:.1f} s)")

fig, axes = plt.subplots(1, len(launch_variants), figsize=(5 * len(launch_variants), 3.6),
                         sharex=True, sharey=True, squeeze=False)
for ax, (variant, result) in zip(axes[0], launch_results.items()):
    components = list(result["by_component"])[::-1]           # the data's path, top down
    forward = np.array([result["by_component"][c]["forward"] for c in components])
    backward = np.array([result["by_component"][c]["backward"] for c in components])
    outside = np.isin(components, bench_launches.NOT_THE_MODEL)  # neither pass
    ax.barh(components, np.where(outside, 0, forward), label="forward")
    ax.barh(components, backward, left=np.where(outside, 0, forward), label="backward")
    ax.barh(components, np.where(outside, forward, 0), label="not the model",
            color="0.6")
    ax.set_title(f"tiny {variant}: {result['total']} launches per step", fontsize=9)
    ax.set_xlabel("kernel launches")
    ax.tick_params(labelsize=8)
axes[0][0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# The deformable-attention op is a handful of launches; the losses (computed once per
# decoder layer, as in the official code) and the optimiser, with its per-parameter
# clipping, are the largest groups, and the readable AdamW would add 13 more launches per
# parameter to the latter. Which of these costs real time is for a GPU profile to say
# (`bash tools/gpu_check.sh`, [gpu-training.md](../docs/gpu-training.md) §6); the counts say where to look.

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/18_appendix_gpu_code_without_a_gpu.py](solutions/18_appendix_gpu_code_without_a_gpu.py).
#
# 1. **Predict.** With `x` a device array, which of these does CuPy refuse (a `TypeError`),
#    which become a device -> host copy (a `HostTransferError` under `transfer_guard`), and
#    which are fine: `x + np.ones(4)`, `x * 2.0`, `float(x.sum())`, `if x.sum() > 0:`,
#    `x.reshape(2, 2).T`? Check on the fake.
# 2. **Predict.** How many kernel launches is `((x * 2.0) + 1.0).sum()`? Copy the result to the
#    host the way a training step should: what does the guard record?
# 3. **Predict.** How many launches does the readable AdamW (`fused=False`) make for
#    $P$ parameters on its first step, and on every later one? Count them on the fake.

# %% [markdown]
# ## Checks

# %%
# the fake fails where CuPy fails, and computes what NumPy computes
assert set(planted_errors) == {"positive_mask_wrong", "host_copy_wrong"}, planted_errors
assert "numpy.ndarray" in planted_errors["positive_mask_wrong"], planted_errors
assert "MemoryPointer" in planted_errors["host_copy_wrong"], planted_errors
for name, on_host in fixed_on_host.items():
    assert np.array_equal(on_host, fixed_on_device[name]), name
assert list(fixed_on_host["positive_mask"]) == [False, False, True, True]
assert isinstance(hidden_copy_error, HostTransferError), hidden_copy_error
assert "__float__" in str(hidden_copy_error), hidden_copy_error
assert hidden_copy_line.startswith("losses.append(float(loss.data))"), hidden_copy_line
assert dict(logged_copies) == {"the logged losses": 1}, logged_copies
assert losses_device == losses_numpy, (losses_device, losses_numpy)     # bit for bit
assert losses_numpy[0] > losses_numpy[1] > losses_numpy[2], losses_numpy  # it descends
assert attn_worst < 1e-4, attn_worst
msda_launches = sum(n for site, n in attn_launches.items() if site.startswith("ops/msda/"))
assert msda_launches == 2, attn_launches                  # one kernel each way
assert sum(attn_launches_by_file.values()) == sum(attn_launches.values())
if not elementwise_harness.why_no_compiler():
    n_params = len(adamw_shapes)
    assert adamw_launches[False][1:] == [14 * n_params] * 2, adamw_launches
    assert adamw_launches[None][1:] == [n_params] * 2, adamw_launches
    assert adamw_launches[False][0] - adamw_launches[False][1] == 2 * n_params  # moments
    assert adamw_bit_equal
    assert not any(np.array_equal(a, b) for a, b in zip(adamw_params[None], adamw_initial))
for variant, result in launch_results.items():
    counts = result["by_component"]
    assert result["total"] == sum(c["forward"] + c["backward"] for c in counts.values())
    assert counts["msda"]["forward"] >= 1 and counts["msda"]["backward"] >= 1, variant
    assert counts["optimiser"]["forward"] > 0 and counts["optimiser"]["backward"] == 0
    assert result["host_copies"]["the step's logged values"] == 1, result["host_copies"]
    assert set(result["host_copies"]) == {"the matcher's cost matrices",
                                          "the step's logged values"}, result["host_copies"]
assert cupy_available() == GPU, "leaving fakecupy.installed() restores the real state"
print("all checks passed")
