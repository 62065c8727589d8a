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
# # 17. From the formula to the Numba CPU kernel, step by step
#
# **Paper:** §3, Eq. (3), multi-scale deformable attention. For query $q$ of image $n$ and
# head $m$, with attention weights $A_{lk}$ and sampling points on every level $l$,
#
# $$
# \text{out}[n, q, m, :] = \sum_{l=1}^{L} \sum_{k=1}^{K} A_{nqmlk}\;
#   \text{bilinear}\big(V_l[n, :, m, :],\; p_{nqmlk}\big) \in \mathbb{R}^{D}.
# $$
#
# Notebooks 1–3 compute it by hand for a point or two; notebook 12 shows the GPU kernels.
# In between sits the code a learner actually runs on a laptop, the Numba CPU kernel
# (`numba`, the default CPU backend). This notebook climbs from the formula to it, and one
# step beyond, each step checked against the one before:
#
# 1. **the hand loop**: seven nested Python loops, one scalar at a time, forward and
#    backward, straight from the formulas;
# 2. **the vectorised reference** (`reference.py`): one level at a time, every point at
#    once, against the hand loop, and what its temporaries cost;
# 3. **the per-point kernel** (`numba_cpu.py`): one (image, head) pair per thread, four
#    contiguous rows of $D$ channels per point, a backward pass without races, against
#    the reference; its own Python source runs too, without compiling;
# 4. **CUDA lane groups**: the same kernel split the GPU's way (a group of lanes per
#    head, the channels dealt out to the lanes, a tree of shuffles for the sums),
#    emulated in NumPy, against the per-point kernel. Notebook 12 runs the real ones.
#
# **Doc:** [deformable-attention.md](../docs/deformable-attention.md) §2–3 (the sampling
# and its gradients) and §6 (the backends), [gpu-kernels.md](../docs/gpu-kernels.md)
# (the GPU design). **Code:** `minidetr/ops/msda/reference.py`, `numba_cpu.py`,
# `numba_cuda.py`.

# %%
import inspect
import os
import tracemalloc

import matplotlib.pyplot as plt
import numpy as np

from minidetr.bench.common import msda_inputs
from minidetr.ops.msda import numba_cpu, numba_cuda, reference
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# One small problem for every step, in float64 so that the steps agree to rounding.
# Points are scattered around each query (some fall outside the map and are skipped).
SHAPE = dict(N=2, levels=((6, 8), (3, 4)), M=2, D=8, K=2, Lq=6 if SMALL else 24)
value, shapes, starts, locations, weights, grad_out = msda_inputs(SHAPE, "float64", seed=SEED)
locations[0, 0, 0, 0, 0] = (-0.3, 0.5)                       # one point surely skipped
N, S, M, D = value.shape
_, Lq, _, L, K, _ = locations.shape
print(f"value {value.shape} (N, S, M, D); locations {locations.shape} (N, Lq, M, L, K, 2); "
      f"weights {weights.shape}; levels {shapes.tolist()}, starts {starts.tolist()}")

# %% [markdown]
# ## 1. The hand loop
#
# Every index gets its own loop: image $n$, query $q$, head $m$, level $l$, point $k$, then
# the four neighbours $c$ of the point and the $D$ channels. Inside, the arithmetic of
# notebook 1: pixel coordinates $u = xW - \tfrac12$, $v = yH - \tfrac12$, the skip rule
# ($-1 < u < W$ and $-1 < v < H$, or the point is ignored), the bilinear weights $w_c$,
# zero padding. The backward pass is the derivation of
# [deformable-attention.md §3](../docs/deformable-attention.md#3-gradients-of-bilinear-sampling):
# with $g$ the gradient arriving at out$[n, q, m, :]$, $a$ the point's weight and
# $p_c = g \cdot V_c$,
#
# $$
# \frac{\partial \mathcal L}{\partial a} = \sum_c w_c\, p_c, \qquad
# \frac{\partial \mathcal L}{\partial V_c} \mathrel{+}= a\, w_c\, g, \qquad
# \frac{\partial \mathcal L}{\partial x} = a\, W \sum_c \frac{\partial w_c}{\partial u}\, p_c, \qquad
# \frac{\partial \mathcal L}{\partial y} = a\, H \sum_c \frac{\partial w_c}{\partial v}\, p_c .
# $$

# %%
def point_corners(x, y, H, W):
    """The point's neighbours inside the map: [(i, j, w, dw/du, dw/dv)], or None when the
    official op skips it. Plain Python floats."""
    u, v = x * W - 0.5, y * H - 0.5
    if not (-1 < u < W and -1 < v < H):
        return None
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    al, be = u - u0, v - v0                                   # alpha, beta
    corners = [(v0, u0, (1 - be) * (1 - al), -(1 - be), -(1 - al)),
               (v0, u0 + 1, (1 - be) * al, (1 - be), -al),
               (v0 + 1, u0, be * (1 - al), -be, (1 - al)),
               (v0 + 1, u0 + 1, be * al, be, al)]
    return [c for c in corners if 0 <= c[0] < H and 0 <= c[1] < W]


def hand_forward(value, shapes, starts, locations, weights):
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = locations.shape
    out = np.zeros((N, Lq, M, D))
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = shapes[l]
                    for k in range(K):
                        x, y = locations[n, q, m, l, k]
                        a = weights[n, q, m, l, k]
                        for i, j, w, _, _ in point_corners(x, y, H, W) or []:
                            row = starts[l] + i * W + j
                            for d in range(D):
                                out[n, q, m, d] += a * w * value[n, row, m, d]
    return out.reshape(N, Lq, M * D)


def hand_backward(grad_out, value, shapes, starts, locations, weights):
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = locations.shape
    g = grad_out.reshape(N, Lq, M, D)
    grad_value = np.zeros_like(value)
    grad_loc = np.zeros_like(locations)
    grad_attn = np.zeros_like(weights)
    for n in range(N):
        for q in range(Lq):
            for m in range(M):
                for l in range(L):
                    H, W = shapes[l]
                    for k in range(K):
                        x, y = locations[n, q, m, l, k]
                        a = weights[n, q, m, l, k]
                        du = dv = 0.0
                        for i, j, w, dw_du, dw_dv in point_corners(x, y, H, W) or []:
                            row = starts[l] + i * W + j
                            p = sum(g[n, q, m, d] * value[n, row, m, d] for d in range(D))
                            grad_attn[n, q, m, l, k] += w * p
                            du += dw_du * p
                            dv += dw_dv * p
                            for d in range(D):
                                grad_value[n, row, m, d] += a * w * g[n, q, m, d]
                        grad_loc[n, q, m, l, k] = (a * W * du, a * H * dv)
    return grad_value, grad_loc, grad_attn


hand = (hand_forward(value, shapes, starts, locations, weights),
        *hand_backward(grad_out, value, shapes, starts, locations, weights))
loops = N * Lq * M * L * K * 4 * D
print(f"hand loop: about {loops:,} innermost iterations forward, twice that backward")
print(f"the skipped point (x = -0.3): gradients {hand[2][0, 0, 0, 0, 0]}, "
      f"{hand[3][0, 0, 0, 0, 0]}")

# %% [markdown]
# ## 2. The vectorised reference
#
# `reference.forward` keeps only the loop over levels. For level $l$ it computes the four
# corners of *every* point at once (`bilinear_corners`: arrays of shape
# $(N, L_q, M, K)$), gathers the four neighbour rows of every point
# (`gather_rows`: $(N, L_q, M, K, D)$), weights them, and sums over $k$. The backward pass
# forms the same dot products $p_c$ and scatters $a\,w_c\,g$ back with a scatter-add
# (`np.add.at`), because several points may hit one pixel. Same arithmetic as the hand
# loop, so in float64 the two agree to rounding:

# %%
NAMES = ("output", "grad_value", "grad_locations", "grad_weights")


def max_errors(results, expected):
    """Max |difference| per array, asserting agreement to float64 rounding."""
    errors = {}
    for name, got, want in zip(NAMES, results, expected):
        assert_allclose(got, want, 1e-12, 1e-12, what=name)
        errors[name] = float(np.abs(got - want).max())
    return errors


ref = (reference.forward(value, shapes, starts, locations, weights),
       *reference.backward(grad_out, value, shapes, starts, locations, weights))
errors = {"reference vs hand loop": max_errors(ref, hand)}
print("reference vs hand loop:", {k: f"{v:.1e}" for k, v in errors["reference vs hand loop"].items()})

# %% [markdown]
# Vectorising trades loops for memory: each gather materialises one $D$-vector per point,
# $(N, L_q, M, K, D)$ numbers per corner and level, far more than the output when each
# query reads many points. `tracemalloc` sees NumPy's allocations; at a decoder-like shape
# (300 queries, float32) the reference's peak is many times the size of its output,
# while the kernel (next step) allocates little beyond the output, plus a head-major copy
# of the value when that pays (section 3):

# %%
BIG = dict(N=1, levels=((32, 32), (16, 16), (8, 8)), M=4, D=16, K=4,
           Lq=100 if SMALL else 300)
big = msda_inputs(BIG, "float32", seed=SEED)
numba_cpu.forward(*big[:5])                            # compile outside the measurement


def peak_bytes(fn, *args):
    tracemalloc.start()
    fn(*args)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


peaks = {"reference": peak_bytes(reference.forward, *big[:5]),
         "numba kernel": peak_bytes(numba_cpu.forward, *big[:5])}
output_bytes = big[5].nbytes                           # grad_output has the output's shape
copy_bytes = big[0].nbytes if numba_cpu.use_head_major(big[0], big[3]) else 0
for name, peak in peaks.items():
    print(f"{name:<13} peak {peak / 1e6:6.2f} MB = {peak / output_bytes:5.1f} x the output")
print(f"(output {output_bytes / 1e6:.2f} MB; the kernel's head-major copy of the value "
      f"{copy_bytes / 1e6:.2f} MB)")

# %% [markdown]
# ## 3. The per-point kernel
#
# `numba_cpu._forward_kernel` is the hand loop, reordered for a CPU:
#
# * the outer loop is over the $N M$ (image, head) pairs, a `prange`: Numba runs the pairs
#   on all cores;
# * inside, query, level, point: one point at a time, and for each of its (at most four)
#   neighbours one `_axpy`, a loop over the $D$ **contiguous** channels of one row, which
#   LLVM turns into SIMD instructions;
# * the arrays are seen as 2-d tables with one row per $(n, q, m)$, and the value as rows
#   of $D$ channels located by strides (`_prepare`), so the same code reads the input
#   layout $(N, S, M, D)$ or a head-major copy $(N, M, S, D)$.
#
# Its source (the backward kernel has the same loops, and the $p_c$ of the hand loop):

# %%
source = inspect.getsource(numba_cpu._forward_kernel.py_func)
print(source[source.index("    for nm in prange"):])

# %% [markdown]
# Compiled, against the reference, in both layouts. And since an `@njit` function keeps
# its Python source (`.py_func`), where `prange` is a plain `range`, the same kernel also
# runs uncompiled, as ordinary Python: the compiled kernel agrees with it to the last bit
# here (the forward sums in the same order).

# %%
kernel = {}
for head_major in (False, True):
    kernel[head_major] = (
        numba_cpu.forward(value, shapes, starts, locations, weights, head_major=head_major),
        *numba_cpu.backward(grad_out, value, shapes, starts, locations, weights,
                            head_major=head_major))
    errors[f"kernel (head_major={head_major}) vs reference"] = max_errors(kernel[head_major], ref)
for name in ("kernel (head_major=False) vs reference", "kernel (head_major=True) vs reference"):
    print(f"{name}:", {k: f"{v:.1e}" for k, v in errors[name].items()})

rows, strides, sizes, loc_rows, attn_rows, zero, half, one = numba_cpu._prepare(
    value, shapes, locations, weights, head_major=False)
as_python = np.empty((N * Lq * M, D))
numba_cpu._forward_kernel.py_func(rows, strides, N, M, Lq, shapes, sizes, starts, loc_rows,
                                  attn_rows, zero, half, one, as_python)
python_equal = np.array_equal(as_python.reshape(N, Lq, M * D), kernel[False][0])
print(f"the kernel's Python source, uncompiled: bit-equal to the compiled kernel: {python_equal}")

# %% [markdown]
# **Why the backward pass needs no atomics.** Every point adds $a\,w_c\,g$ into the value
# rows of its four neighbours, and points of different queries hit the same rows. The
# reference sums those with `np.add.at`; the official CUDA op with `atomicAdd`. Here a
# thread owns a whole (image, head) pair, and the value row of $(n, m, s)$ is
# $n s_n + m s_m + s\, s_s$: two different pairs can never write the same row, so each
# thread adds into its own rows with plain `+=`, and the result is deterministic. The
# strides of the two layouts, and the rows each pair owns:

# %%
owned = {}
for head_major in (False, True):
    _, (sn, sm, ss), *_ = numba_cpu._prepare(value, shapes, locations, weights, head_major)
    owned[head_major] = {(n, m): {n * sn + m * sm + s * ss for s in range(S)}
                         for n in range(N) for m in range(M)}
    sets = list(owned[head_major].values())
    disjoint = sum(len(r) for r in sets) == len(set().union(*sets)) == N * M * S
    print(f"head_major={head_major!s:<5} strides (sn, sm, ss) = {(sn, sm, ss)}; the {N * M} "
          f"pairs own disjoint rows covering all {N * M * S}: {disjoint}")

fig, axes = plt.subplots(1, 2, figsize=(10, 1.9))
for ax, head_major in zip(axes, (False, True)):
    owner = np.zeros(N * M * S, int)
    for index, ((n, m), rows_of_pair) in enumerate(owned[head_major].items()):
        owner[sorted(rows_of_pair)] = index
    ax.imshow(owner[None], aspect="auto", cmap="tab10", vmin=0, vmax=9,
              interpolation="nearest")
    ax.set_yticks([])
    ax.set_title(("head-major (N, M, S, D)" if head_major else "input layout (N, S, M, D)")
                 + ": which pair owns each value row", fontsize=9)
    ax.set_xlabel("value row (colour: the (image, head) pair that writes it)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. CUDA lane groups
#
# A GPU needs thousands of threads, so one thread per (image, head) pair is far too few.
# minidetr's GPU kernels (notebook 12) give every **head of every query**, $(n, q, m)$, a
# group of $G$ lanes of a warp, and deal the $D$ channels out to the lanes: lane $j$ owns
# channels $j, j + G, j + 2G, \dots$ (the Numba CUDA layout; the CUDA C kernel moves
# `VEC` channels per load). Every lane repeats the point's set-up (floor, fractions,
# skip rule) and handles its own channels. Two things change in the backward pass:
#
# * a dot product $p_c = g \cdot V_c$ runs over all $D$ channels, so the lanes' partial
#   sums must be added up: a tree of `shfl_down` (lane $i$ adds the value of lane
#   $i + G/2$, then $i + G/4$, ..., 1), after which lane 0 holds the sum and writes the
#   gradients of the location and weight;
# * queries are now different threads, and their points hit the same value rows, so
#   $\partial \mathcal L / \partial V$ needs `atomicAdd` (here: `+=` in a serial loop,
#   which is what an atomic add guarantees).
#
# An emulation in NumPy, one group at a time, against the per-point kernel:

# %%
G = numba_cuda.group_size_for(D)                  # the Numba CUDA kernels' group size


def tree_sum(partials):
    """The group's shfl_down tree: lane 0 ends with the sum of all G partial sums."""
    x = np.array(partials, dtype=float)
    offset = len(x) // 2
    while offset >= 1:
        x[:offset] += x[offset:2 * offset]        # lane i += lane i + offset (the rest idle)
        offset //= 2
    return x[0]


def lanes_forward(value, shapes, starts, locations, weights, G):
    out = np.zeros((N, Lq, M, D))
    for head in range(N * Lq * M):                # one group of G lanes per (n, q, m)
        n, q, m = head // (Lq * M), head // M % Lq, head % M
        for lane in range(G):
            channels = np.arange(lane, D, G)      # this lane's channels
            for l in range(L):
                H, W = shapes[l]
                for k in range(K):
                    a = weights[n, q, m, l, k]
                    for i, j, w, _, _ in point_corners(*locations[n, q, m, l, k], H, W) or []:
                        row = starts[l] + i * W + j
                        out[n, q, m, channels] += a * w * value[n, row, m, channels]
    return out.reshape(N, Lq, M * D)


def lanes_backward(grad_out, value, shapes, starts, locations, weights, G):
    g = grad_out.reshape(N, Lq, M, D)
    grad_value = np.zeros_like(value)
    grad_loc = np.zeros_like(locations)
    grad_attn = np.zeros_like(weights)
    lane_channels = [np.arange(lane, D, G) for lane in range(G)]
    for head in range(N * Lq * M):
        n, q, m = head // (Lq * M), head // M % Lq, head % M
        for l in range(L):
            H, W = shapes[l]
            for k in range(K):
                a = weights[n, q, m, l, k]
                da = du = dv = 0.0
                for i, j, w, dw_du, dw_dv in point_corners(*locations[n, q, m, l, k], H, W) or []:
                    row = starts[l] + i * W + j
                    partials = [g[n, q, m, c] @ value[n, row, m, c] for c in lane_channels]
                    p = tree_sum(partials)                       # what lane 0 holds
                    da, du, dv = da + w * p, du + dw_du * p, dv + dw_dv * p
                    for c in lane_channels:                      # each lane, "atomically"
                        grad_value[n, row, m, c] += a * w * g[n, q, m, c]
                grad_attn[n, q, m, l, k] = da                    # lane 0 writes
                grad_loc[n, q, m, l, k] = (a * W * du, a * H * dv)
    return grad_value, grad_loc, grad_attn


lanes = (lanes_forward(value, shapes, starts, locations, weights, G),
         *lanes_backward(grad_out, value, shapes, starts, locations, weights, G))
errors["lane groups vs kernel"] = max_errors(lanes, kernel[True])
print(f"G = {G} lanes per head for D = {D}; {N * Lq * M} groups, {N * Lq * M * G} threads "
      f"(the CPU kernel: {N * M} pairs)")
print("lane groups vs kernel:", {k: f"{v:.1e}" for k, v in errors["lane groups vs kernel"].items()})

# %% [markdown]
# Every step agrees with the one before to float64 rounding: exactly where the arithmetic
# runs in the same order, and otherwise within a few units in the last place of the values
# (the location gradients, scaled by $W$ and $H$, are the largest numbers here). The sums
# are regrouped in places: the reference adds the $K$ points with one `sum`, the kernel's
# `_dot` lets LLVM split a dot product into SIMD partial sums, and the lane groups add
# partial sums in a tree.

# %%
fig, ax = plt.subplots(figsize=(9, 3))
steps = list(errors)
width = 0.2
for index, name in enumerate(NAMES):
    heights = [max(errors[s][name], 1e-18) for s in steps]       # 0 drawn at the floor
    ax.bar(np.arange(len(steps)) + (index - 1.5) * width, heights, width, label=name)
ax.set_yscale("log")
ax.set_ylim(1e-18, 1e-10)
ax.set_xticks(np.arange(len(steps)))
ax.set_xticklabels([s.replace(" vs ", "\nvs ") for s in steps], fontsize=8)
ax.set_ylabel("max |difference| (float64)")
ax.axhline(1e-12, color="tab:red", linewidth=0.8, linestyle=":")
ax.set_title("each step against the one before (red: the tolerance; bars at 1e-18 are exactly 0)",
             fontsize=9)
ax.legend(fontsize=7, ncol=4)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/17_cpu_kernel_walkthrough.py](solutions/17_cpu_kernel_walkthrough.py).
#
# 1. **Predict.** How many bytes does one of the reference's gathers, $(N, L_q, M, K, D)$
#    numbers, take at the paper's decoder shape ($N = 2$, $L_q = 300$, $M = 8$, $K = 4$,
#    $D = 32$, float32)? And in the encoder, where all $S = 19\,947$ tokens are queries? Check
#    the formula against `gather_rows` at a small shape.
# 2. **Break something.** Parallelise the backward pass over *queries* instead of (image, head)
#    pairs. Count the pairs of queries whose scatter into `grad_value` hits a common row (each
#    one a race without atomics) at an encoder-like shape. Why can two (image, head) pairs
#    never collide?
# 3. **Predict.** In float32, is the compiled kernel bit-equal to the reference? Which of the
#    two is closer to a float64 computation?

# %% [markdown]
# ## Checks

# %%
assert all(v <= 1e-12 for errs in errors.values() for v in errs.values()), errors
assert hand[0].shape == (N, Lq, M * D) and hand[1].shape == value.shape
assert not hand[2][0, 0, 0, 0, 0].any() and hand[3][0, 0, 0, 0, 0] == 0, "skipped point"
assert python_equal, "the kernel's own Python source computes what the compiled kernel does"
assert peaks["reference"] > 3 * peaks["numba kernel"], peaks
assert peaks["numba kernel"] < 1.1 * (output_bytes + copy_bytes), (peaks, output_bytes, copy_bytes)
for head_major in (False, True):
    sets = list(owned[head_major].values())
    assert sum(len(r) for r in sets) == len(set().union(*sets)) == N * M * S
assert G == 8 and tree_sum(np.arange(8.0)) == 28.0
print("all checks passed")
