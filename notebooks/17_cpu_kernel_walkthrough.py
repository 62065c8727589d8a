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
# 3. **the Numba kernel** (`numba_cpu.py`): parallel tasks of one image and a *group* of
#    its heads, the heads innermost so that the per-query arrays stream through memory in
#    order, a table of the four neighbours of every point, rows of $D$ contiguous
#    channels, a backward pass without races and with the same bits however the heads
#    are grouped, against the reference; its own Python source runs too, without
#    compiling;
# 4. **CUDA lane groups**: the same kernel split the GPU's way (a group of lanes per
#    head, the channels dealt out to the lanes, a tree of shuffles for the sums),
#    emulated in NumPy, against the Numba kernel. Notebook 12 runs the real ones.
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
import numba
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
# M = 4 heads, so that section 3 can group them as 1, 2 or 4 heads per task.
SHAPE = dict(N=2, levels=((6, 8), (3, 4)), M=4, D=8, K=2, Lq=6 if SMALL else 24)
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
# of the value when that pays (section 3), and a few kB of array views and small arrays
# (its corner tables, a few hundred bytes per task, are allocated inside the compiled
# code, where `tracemalloc` does not look):

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
extra_bytes = peaks["numba kernel"] - output_bytes - copy_bytes   # views, the level sizes
print(f"(output {output_bytes / 1e6:.2f} MB; the kernel's head-major copy of the value "
      f"{copy_bytes / 1e6:.2f} MB; the rest of its peak {extra_bytes / 1e3:.1f} kB)")

# %% [markdown]
# ## 3. The Numba kernel
#
# `numba_cpu._forward_kernel` is the hand loop, reordered for a CPU:
#
# * `_prepare` views every per-query array as a 2-d table with **one row per
#   $(n, q, m)$**, row $(n L_q + q) M + m$: the locations $(N L_q M, 2LK)$, the weights
#   $(N L_q M, LK)$, the output $(N L_q M, D)$. The value becomes rows of $D$ channels,
#   the row of $(n, m, s)$ at $n s_n + m s_m + s\, s_s$ (three strides), so the same code
#   reads the input layout $(N, S, M, D)$ or a head-major copy $(N, M, S, D)$;
# * the outer loop, a `prange` that Numba runs on all cores, is over **tasks**: one image
#   and a group of its heads. Each image's $M$ heads are split into `groups` groups of
#   $M / \text{groups}$ heads, so there are $N \cdot \text{groups}$ tasks; `head_groups`
#   picks the fewest groups that give the busiest thread the smallest share of the tasks
#   (one group of all $M$ heads when $N \ge$ threads, as in training on two cores;
#   exercise 4);
# * inside a task: the queries, then the group's heads. **Heads innermost**: the rows
#   $(n, q, m)$ of one query are neighbours in every table, so a task reads the locations
#   and weights, and writes the output, row after row, and the memory streams in order.
#   With one head per task a task would jump $M$ rows at every step: in the paper's
#   encoder ($M = 8$, $L = K = 4$, float32) a row of locations is 128 bytes, so it would
#   use 128 bytes of every 1 KiB, and the processor's prefetcher does not follow such
#   jumps (measured in [deformable-attention.md §6](../docs/deformable-attention.md#6-how-the-backends-compute-it),
#   "Tuning");
# * per query and head, `_corners` fills a **corner table**: for each of the $LK$ points
#   the value rows of its four neighbours ($-1$ for a neighbour outside the map, and for
#   all four of a skipped point), their weights $a\,w_c$, and the point's fractions
#   $(l_h, l_w) = (\beta, \alpha)$. The forward pass adds up the weighted rows, one `_axpy`
#   each: a loop over the $D$ **contiguous** channels of a row, which LLVM turns into SIMD
#   instructions. The backward pass reuses the same table for the dot products $p_c$ and
#   for the scatter into $\partial \mathcal L / \partial V$.
#
# Its parallel loop, where `G = M // groups` is the number of heads per task (not the
# $G$ lanes of section 4). The backward kernel has the same loops, then the $p_c$ and the
# gradients of the hand loop:

# %%
source = inspect.getsource(numba_cpu._forward_kernel.py_func)
print(source[source.index("    for task in prange"):])

# %% [markdown]
# Compiled, against the reference, in both layouts. And since an `@njit` function keeps
# its Python source (`.py_func`), where `prange` is a plain `range`, the same kernel also
# runs uncompiled, as ordinary Python (calling the compiled helpers `_corners` and
# `_axpy`): the compiled kernel agrees with it to the last bit here (the forward sums in
# the same order). Its arguments are `_prepare`'s tables and constants, the sizes, and
# `groups`:

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

value_rows, strides, sizes, loc_rows, attn_rows, zero, half, one = numba_cpu._prepare(
    value, shapes, locations, weights, head_major=False)     # value_rows (N*S*M, D)
groups = numba_cpu.head_groups(N, M, threads=2)               # 1: one task per image
as_python = np.empty((N * Lq * M, D))                         # output rows (N*Lq*M, D)
numba_cpu._forward_kernel.py_func(value_rows, strides, N, M, groups, Lq, shapes, sizes,
                                  starts, loc_rows, attn_rows, zero, half, one, as_python)
python_equal = np.array_equal(as_python.reshape(N, Lq, M * D), kernel[False][0])
print(f"the kernel's Python source, uncompiled (groups={groups}): bit-equal to the compiled "
      f"kernel: {python_equal}")

# %% [markdown]
# **The corner table** of image 0, query 0, head 0, filled by the kernel's own `_corners`
# in the input layout (strides $(s_n, s_m, s_s) = (SM, 1, M)$). Its first point is the
# one placed outside the map: four $-1$. The hand loop's `point_corners` finds the same
# neighbours: pixel $(i, j)$ of level $l$ is value row
# $n s_n + m s_m + (\text{start}_l + i W_l + j)\, s_s$, with the weight $a\, w_c$. Every
# query and head of the problem is compared, rows exactly, weights to rounding (the
# kernel multiplies $(a\,(1 - l_h))\,(1 - l_w)$, the hand loop $a\,((1-\beta)(1-\alpha))$):

# %%
sn, sm, ss = strides
P = L * K                                                  # points per query and head
table_rows = np.empty(4 * P, dtype=np.int64)               # (4*L*K,) value row or -1
table_weights = np.empty(4 * P)                            # (4*L*K,) a * w_c
table_fracs = np.empty((P, 2))                             # (L*K, 2) (lh, lw)


def kernel_table(n, q, m):
    """[(value row, a w_c) of the neighbours inside the map] per point, from `_corners`."""
    numba_cpu._corners(loc_rows, attn_rows, (n * Lq + q) * M + m, shapes, sizes, starts,
                       n * sn + m * sm, ss, half, one, table_rows, table_weights,
                       table_fracs)
    return [[(int(table_rows[c]), float(table_weights[c]))
             for c in range(4 * p, 4 * p + 4) if table_rows[c] >= 0] for p in range(P)]


def hand_table(n, q, m):
    """The same table from the hand loop's point_corners."""
    table = []
    for l in range(L):
        H, W = shapes[l]
        for k in range(K):
            corners = point_corners(*locations[n, q, m, l, k], H, W) or []
            a = weights[n, q, m, l, k]
            table.append([(n * sn + m * sm + (starts[l] + i * W + j) * ss, a * w)
                          for i, j, w, _, _ in corners])
    return table


kernel_table(0, 0, 0)
print("point (l, k)   value rows of the corners (-1: outside)   a * w_c")
for p in range(P):
    c = slice(4 * p, 4 * p + 4)
    shown = ["    -   " if r < 0 else f"{w:8.5f}" for r, w in zip(table_rows[c], table_weights[c])]
    print(f"   ({p // K}, {p % K})       {str(table_rows[c].tolist()):<36} {' '.join(shown)}")


def tables_agree(n, q, m):
    ours, theirs = kernel_table(n, q, m), hand_table(n, q, m)
    return all([r for r, _ in a] == [r for r, _ in b]
               and np.allclose([w for _, w in a], [w for _, w in b], rtol=1e-15, atol=0)
               for a, b in zip(ours, theirs))


tables_equal = all(tables_agree(n, q, m) for n in range(N) for q in range(Lq) for m in range(M))
print(f"corner tables of all {N * Lq * M} (image, query, head): same rows and weights as the "
      f"hand loop: {tables_equal}")

# %% [markdown]
# **Heads innermost.** In which order does a task visit the rows $(n, q, m)$ of the
# tables? The kernel's own Python source can tell: in place of the output table, give it
# an object that records the row of every write `out_rows[qi, :] = ...`. With `prange` a
# plain `range`, the tasks run one after the other, so the record splits into tasks.
# One group of all $M$ heads (`groups=1`, what training on two cores gets) walks every
# row in order; one head per task (`groups=M`, the way the kernel worked before) jumps
# $M$ rows at every step:

# %%
class RowOrder:
    """Stands in for the output table: records the row of each `out_rows[qi, :] = ...`."""

    def __init__(self):
        self.rows = []

    def __setitem__(self, index, row):
        self.rows.append(index[0])


GROUPINGS = (1, 2, M)                        # the divisors of M = 4: heads per task M // groups
visits = {}
for groups in GROUPINGS:
    order = RowOrder()
    numba_cpu._forward_kernel.py_func(value_rows, strides, N, M, groups, Lq, shapes, sizes,
                                      starts, loc_rows, attn_rows, zero, half, one, order)
    visits[groups] = np.array(order.rows).reshape(N * groups, Lq * (M // groups))  # (tasks, steps)
    jumps = np.diff(visits[groups], axis=1)                   # rows between two steps of a task
    print(f"groups={groups} ({N * groups} tasks of {M // groups} head{'s' * (M > groups)}): "
          f"task 0 visits rows {visits[groups][0, :8].tolist()} ...; steps to the next row: "
          f"{np.mean(jumps == 1):4.0%}, jumps of {sorted(set(jumps.ravel().tolist()))} rows")

SHOWN = 8 * M                                # the rows of image 0's first 8 queries
fig, ax = plt.subplots(figsize=(10, 1.9))
step_of_row = np.full((len(GROUPINGS), SHOWN), np.nan)  # (groupings, rows): task 0's step
for index, groups in enumerate(GROUPINGS):
    for step, row in enumerate(visits[groups][0]):
        if row < SHOWN:
            step_of_row[index, row] = step
            ax.text(row, index, step, ha="center", va="center", fontsize=7)
ax.imshow(step_of_row, aspect="auto", cmap="viridis_r", vmin=0, vmax=2 * SHOWN,
          interpolation="nearest")
ax.set_xticks(np.arange(0, SHOWN, M))
ax.set_xticklabels([f"q={q}" for q in range(SHOWN // M)], fontsize=8)
ax.set_yticks(range(len(GROUPINGS)))
ax.set_yticklabels([f"groups={g}" for g in GROUPINGS], fontsize=8)
ax.set_xlabel(f"rows (n=0, q, m) of the locations, weights and output: {M} heads per query")
ax.set_title("the steps at which task 0 visits each row (blank: another task's row)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Why the backward pass needs no atomics.** Every point adds $a\,w_c\,g$ into the value
# rows of its four neighbours, and points of different queries hit the same rows. The
# reference sums those with `np.add.at`; the official CUDA op with `atomicAdd`. Here a
# task holds every query of its image and heads, and a point of head $m$ of image $n$
# touches only rows of $(n, m)$, at $n s_n + m s_m + s\, s_s$: two tasks (another image, or
# other heads) can never write the same row, so each adds into its own rows with plain
# `+=`. The strides of the two layouts, and the rows each task owns, for every grouping:

# %%
def owned_rows(head_major, groups):
    """{task: the value rows its scatter may write}: every pixel s of its image and heads."""
    _, (sn, sm, ss), *_ = numba_cpu._prepare(value, shapes, locations, weights, head_major)
    per_task = M // groups                                     # heads per task
    return {task: {task // groups * sn + m * sm + s * ss
                   for m in range(task % groups * per_task, (task % groups + 1) * per_task)
                   for s in range(S)}
            for task in range(N * groups)}


def disjoint_cover(owned):
    """The tasks' row sets are disjoint and cover all N*M*S rows."""
    sets = list(owned.values())
    return sum(len(r) for r in sets) == len(set().union(*sets)) == N * M * S


owned = {(head_major, groups): owned_rows(head_major, groups)
         for head_major in (False, True) for groups in GROUPINGS}
for head_major in (False, True):
    _, layout_strides, *_ = numba_cpu._prepare(value, shapes, locations, weights, head_major)
    print(f"head_major={head_major!s:<5} strides (sn, sm, ss) = {layout_strides}; the tasks own "
          f"disjoint rows covering all {N * M * S}, for groups = "
          + ", ".join(f"{g}: {disjoint_cover(owned[head_major, g])}" for g in GROUPINGS))

fig, axes = plt.subplots(len(GROUPINGS), 2, figsize=(10, 3.6))
for row, groups in enumerate(GROUPINGS):
    for col, head_major in enumerate((False, True)):
        ax = axes[row, col]
        owner = np.zeros(N * M * S, int)
        for task, rows_of_task in owned[head_major, groups].items():
            owner[sorted(rows_of_task)] = task
        ax.imshow(owner[None], aspect="auto", cmap="tab10", vmin=0, vmax=9,
                  interpolation="nearest")
        ax.set_yticks([])
        ax.set_ylabel(f"groups={groups}", fontsize=8, rotation=0, ha="right", va="center")
        if row == 0:
            ax.set_title("head-major (N, M, S, D)" if head_major else "input layout (N, S, M, D)",
                         fontsize=9)
        if row < len(GROUPINGS) - 1:
            ax.set_xticks([])
for ax in axes[-1]:
    ax.set_xlabel("value row (colour: the task that writes it)")
plt.tight_layout()
plt.show()

# %% [markdown]
# **The same bits for every grouping.** A value row of head $m$ receives its additions
# from one task, in the order that task makes them: query by query, point by point,
# corner by corner, whichever other heads share the task and whichever thread runs it.
# An output row, a location or weight gradient is computed by one (query, head) alone.
# So the grouping changes which thread does what, and when, but not a single addition,
# and nothing races. Shown on an encoder-like problem ($L_q = S$) with enough sampling
# points that the kernels run on all of Numba's threads (below `SERIAL_BELOW` points they
# keep to one): forward and backward with 1, 2 and $M$ groups, both layouts, compared bit
# for bit with `groups=1` in the input layout:

# %%
PAR = dict(N=2, levels=((16, 16), (8, 8)), M=4, D=8, K=4, Lq=None)   # encoder-like: Lq = S
par = msda_inputs(PAR, "float64", seed=SEED)
par_points = par[3].size // 2                                  # N*Lq*M*L*K sampling points
threads = numba.get_num_threads()
results = {}
for head_major in (False, True):
    for groups in GROUPINGS:
        results[head_major, groups] = (
            numba_cpu.forward(*par[:5], head_major=head_major, groups=groups),
            *numba_cpu.backward(par[5], *par[:5], head_major=head_major, groups=groups))
same_bits = {key: all(np.array_equal(a, b) for a, b in zip(arrays, results[False, 1]))
             for key, arrays in results.items()}
print(f"{par_points:,} sampling points (SERIAL_BELOW = {numba_cpu.SERIAL_BELOW:,}) on {threads} "
      f"Numba threads; head_groups would pick groups={numba_cpu.head_groups(2, 4, threads)}")
for (head_major, groups), equal in same_bits.items():
    print(f"head_major={head_major!s:<5} groups={groups}: output and the three gradients "
          f"bit-equal to groups=1, input layout: {equal}")

# %% [markdown]
# ## 4. CUDA lane groups
#
# A GPU needs thousands of threads, so the CPU kernel's tasks, at most $N M$ (one per
# image and head), are far too few. minidetr's GPU kernels (notebook 12) give every **head of every query**, $(n, q, m)$, a
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
# An emulation in NumPy, one group at a time, against the Numba kernel:

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
      f"(the CPU kernel: at most {N * M} tasks)")
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
# 2. **Break something.** Parallelise the backward pass over *queries* instead of (image,
#    head group) tasks. Count the pairs of queries whose scatter into `grad_value` hits a
#    common row (each one a race without atomics) at an encoder-like shape. Why can two
#    tasks never collide, however the heads are grouped?
# 3. **Predict.** In float32, is the compiled kernel bit-equal to the reference? Which of the
#    two is closer to a float64 computation?
# 4. **Predict.** Which `groups` does `head_groups(N, M, threads)` pick for $M = 8$ heads:
#    training ($N = 2$) on 2 threads; one image on 2, 3 and 6 threads; $N = 2$ on 16
#    threads? For each, what share of the tasks does the busiest thread run? Why does one
#    image on 6 threads get 4 tasks, leaving two threads idle, rather than 8?

# %% [markdown]
# ## Checks

# %%
assert all(v <= 1e-12 for errs in errors.values() for v in errs.values()), errors
assert hand[0].shape == (N, Lq, M * D) and hand[1].shape == value.shape
assert not hand[2][0, 0, 0, 0, 0].any() and hand[3][0, 0, 0, 0, 0] == 0, "skipped point"
assert python_equal, "the kernel's own Python source computes what the compiled kernel does"
assert tables_equal, "the corner tables hold the hand loop's neighbours and weights"
assert (np.diff(visits[1], axis=1) == 1).all(), "one group of all heads walks the rows in order"
assert (np.diff(visits[M], axis=1) == M).all(), "one head per task jumps M rows per step"
for groups in GROUPINGS:
    assert sorted(visits[groups].ravel()) == list(range(N * Lq * M)), f"groups={groups}"
assert peaks["reference"] > 3 * peaks["numba kernel"], peaks
assert 0 <= extra_bytes < 8192, (peaks, output_bytes, copy_bytes)
assert all(disjoint_cover(rows_of_tasks) for rows_of_tasks in owned.values())
assert par_points >= numba_cpu.SERIAL_BELOW, "the grouping comparison runs on the thread pool"
assert all(same_bits.values()), same_bits
assert G == 8 and tree_sum(np.arange(8.0)) == 28.0
print("all checks passed")
