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
# # 4. Complexity: full attention vs deformable attention
#
# **Paper:** Deformable DETR (Zhu et al., ICLR 2021), §3 and Appendix A.1 "Complexity for
# deformable attention". DETR's encoder lets every pixel attend to every pixel; its cost
# grows with the *square* of the number of pixels, which is what kept DETR on one small,
# coarse feature map. Deformable attention reads a fixed number of points per query, and
# its cost grows *linearly*. This notebook measures both, in time and in memory, as the
# feature map grows, and puts the measurements next to the paper's formulas.
#
# **Doc:** [deformable-attention.md](../docs/deformable-attention.md), section 5
# ("Complexity: why the encoder becomes affordable"). **Code:**
# `minidetr/nn/attention.py` (`MultiheadAttention`, DETR's attention),
# `minidetr/nn/msdeform_attn.py` (`MSDeformAttn`), `minidetr/ops/msda/numba_cpu.py`.

# %% [markdown]
# ## The paper's formulas
#
# For multi-head attention with $N_q$ queries, $N_k$ keys and width $C$:
#
# $$ O\big(N_q C^2 + N_k C^2 + N_q N_k C\big). $$
#
# In DETR's encoder every pixel of an $H \times W$ map is both a query and a key,
# $N_q = N_k = HW$, and the last term dominates: $O(H^2 W^2 C)$.
#
# For deformable attention with $M$ heads and $K$ points (Appendix A.1):
#
# $$ O\big(N_q C^2 + \min(HWC^2,\ N_q K C^2) + 5 N_q K C + 3 N_q C M K\big), $$
#
# where $5 N_q K C$ is the bilinear interpolation and weighted sum and $3 N_q C M K$ the
# offset and weight projections. Since $5K + 3MK < C$ for $M = 8$, $K \le 4$, $C = 256$, this
# is $O(2 N_q C^2 + \min(HWC^2, N_q K C^2))$; in the encoder ($N_q = HW$):
#
# $$ O(HWC^2), $$
#
# linear in the number of pixels. (Decoder cross-attention, $N_q = N$ object queries:
# $O(NKC^2)$, independent of the map size.)

# %%
import os

# One thread for everything, so that both methods run on one core and the comparison is
# about the work, not about parallel speed-ups (and not about a busy machine's other
# jobs). BLAS reads this when NumPy is first imported: it holds in a fresh kernel.
os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"

import math  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numba  # noqa: E402
import numpy as np  # noqa: E402

from minidetr import functional as F  # noqa: E402
from minidetr.autograd import Tensor, no_grad  # noqa: E402
from minidetr.lessons import viz  # noqa: E402
from minidetr.nn import MSDeformAttn, MultiheadAttention  # noqa: E402
from minidetr.ops import msda  # noqa: E402

numba.set_num_threads(1)

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
rng = np.random.default_rng(SEED)
plt.rcParams["figure.dpi"] = 80

C, M, K = (64, 4, 4) if SMALL else (256, 8, 4)        # paper: C = 256, M = 8, K = 4
D = C // M
sides = [8, 12, 16] if SMALL else [8, 12, 16, 24, 32, 40, 48]   # the map is side x side
deform_only_sides = [] if SMALL else [64, 96]          # too large for full attention here
repeats = 2 if SMALL else 5
backend = "numba" if "numba" in msda.available_backends() else "numpy"
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}; C = {C}, M = {M}, K = {K}; "
      f"deformable backend {backend}; one thread (Numba: {numba.get_num_threads()})")

# %% [markdown]
# ## What is measured
#
# One encoder attention layer on a single $H \times W$ map ($H = W$), batch $N = 1$,
# float32, forward only (under `no_grad`):
#
# * **full attention**: minidetr's `MultiheadAttention`, DETR's layer: projections
#   $Q, K, V$, $\operatorname{softmax}(QK^\top/\sqrt{D})\,V$ per head, output projection;
# * **deformable attention**: `MSDeformAttn` with one level, every pixel a query with its
#   own centre as reference point: value, offset and weight projections, the op (Numba
#   backend), output projection.
#
# Time is the best of a few runs after a warm-up call (which also absorbs Numba's
# compilation), on one thread; memory is the peak of the arrays allocated during one
# call, from Python's `tracemalloc` (NumPy reports its buffers to it). Times depend on
# the machine and its load; memory does not.

# %%
full_layer = MultiheadAttention(C, M, rng=rng)
deform_layer = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K, rng=rng,
                            backend=backend)

def measure(fn):
    """(best time in seconds over `repeats` runs, peak traced bytes of one run)."""
    fn()                                                # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return min(times), peak

def encoder_inputs(side):
    """Features (1, HW, C) and pixel-centre reference points (1, HW, 1, 2) of a side x side map."""
    src = Tensor(rng.normal(size=(1, side * side, C)).astype(np.float32))
    jj, ii = np.meshgrid(np.arange(side), np.arange(side))
    ref = np.stack([(jj + 0.5) / side, (ii + 0.5) / side], -1).reshape(1, -1, 1, 2)
    return src, Tensor(ref.astype(np.float32))

results = {"full": {}, "deformable": {}}
for side in sides + deform_only_sides:
    src, ref = encoder_inputs(side)
    with no_grad():
        if side in sides:
            results["full"][side] = measure(lambda: full_layer(src, src, src))
        results["deformable"][side] = measure(
            lambda: deform_layer(src, ref, src, [[side, side]], [0]))
    row = "  ".join(f"{name}: {r[side][0] * 1e3:8.1f} ms {r[side][1] / 2**20:8.1f} MiB"
                    for name, r in results.items() if side in r)
    print(f"H x W = {side:3d} x {side:<3d} ({side * side:5d} tokens)  {row}")

# %% [markdown]
# ## Measured, next to the formulas
#
# Each dashed line is a formula from above evaluated at these sizes, multiplied by one
# constant fitted to the measurements (the constant is the machine's speed; the formula
# gives the *shape* of the growth). On log-log axes a cost $\propto (HW)^p$ is a straight
# line of slope $p$: 2 for full attention, 1 for deformable attention.
#
# For memory the formulas count the largest arrays alive at once: full attention holds
# the $M \times HW \times HW$ attention matrix (and a temporary of the same size in the
# softmax); deformable attention only arrays of $HW \times C$ and
# $HW \times M K \times (2 + 1)$ (locations and weights).

# %%
def paper_full(hw):                    # N_q C^2 + N_k C^2 + N_q N_k C with N_q = N_k = HW
    return hw * C**2 + hw * C**2 + hw * hw * C

def paper_deformable(hw):              # N_q C^2 + min(HW C^2, N_q K C^2) + 5 N_q K C + 3 N_q C M K
    return hw * C**2 + min(hw * C**2, hw * K * C**2) + 5 * hw * K * C + 3 * hw * C * M * K

def bytes_full(hw):                    # the attention matrix, float32
    return M * hw * hw * 4

def bytes_deformable(hw):              # (HW, C) arrays + locations and weights, float32
    return hw * C * 4 + hw * M * K * 3 * 4

fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
fitted = {}
for name, color, time_model, mem_model in (
        ("full", "tab:red", paper_full, bytes_full),
        ("deformable", "tab:blue", paper_deformable, bytes_deformable)):
    hw = np.array([s * s for s in results[name]], dtype=np.float64)
    seconds = np.array([t for t, _ in results[name].values()])
    peak = np.array([p for _, p in results[name].values()], dtype=np.float64)
    fitted[name] = viz.plot_against_model(
        axes[0], hw, seconds, [time_model(h) for h in hw], name, color,
        model_label=f"{name}: paper's formula x fitted constant")
    viz.plot_against_model(axes[1], hw, peak, [mem_model(h) for h in hw], name, color,
                           model_label=f"{name}: largest arrays x fitted constant")
axes[0].set_title(f"time of one encoder attention layer (C = {C}, M = {M}, K = {K})", fontsize=10)
axes[0].set_ylabel("seconds")
axes[1].set_title("peak memory of the call", fontsize=10)
axes[1].set_ylabel("bytes")
for ax in axes:
    ax.set_xlabel("HW (tokens)")
    ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## The two cores alone
#
# Without the projections (which both layers pay, $O(HWC^2)$), what remains is the part
# that differs: $\operatorname{softmax}(QK^\top/\sqrt{D})\,V$, two products of
# $HW \times HW \times D$ per head, against the deformable op, which reads $MK$ points of
# $D$ channels per query. Dotted guide lines have slopes 1 and 2.

# %%
core = {"softmax(QK^T) V": {}, f"MSDA op ({backend})": {}}
for side in sides:
    hw = side * side
    q, k, v = (Tensor(rng.normal(size=(1, M, hw, D)).astype(np.float32)) for _ in range(3))
    value = rng.normal(size=(1, hw, M, D)).astype(np.float32)                 # (N, S, M, D)
    locations = rng.uniform(0, 1, size=(1, hw, M, 1, K, 2)).astype(np.float32)
    weights = np.full((1, hw, M, 1, K), 1.0 / K, np.float32)

    def full_core():
        with no_grad():
            scores = q @ k.transpose(2, 3) * (1.0 / math.sqrt(D))           # (N, M, HW, HW)
            return F.softmax(scores, axis=-1) @ v                           # (N, M, HW, D)

    core["softmax(QK^T) V"][side] = measure(full_core)
    core[f"MSDA op ({backend})"][side] = measure(
        lambda: msda.forward(value, [[side, side]], [0], locations, weights, backend=backend))

fig, ax = plt.subplots(figsize=(6.5, 4.2))
for (name, r), color in zip(core.items(), ("tab:red", "tab:blue")):
    hw = np.array([s * s for s in r], dtype=np.float64)
    ax.loglog(hw, [t for t, _ in r.values()], "o-", color=color, label=name)
t0 = core["softmax(QK^T) V"][sides[0]][0]
hw = np.array([s * s for s in sides], dtype=np.float64)
for p in (1, 2):
    ax.loglog(hw, t0 * (hw / hw[0]) ** p, ":", color="0.5")
    ax.annotate(f"slope {p}", (hw[-1], t0 * (hw[-1] / hw[0]) ** p), fontsize=8, color="0.4")
ax.set_xlabel("HW (tokens)")
ax.set_ylabel("seconds")
ax.set_title("the attention cores alone", fontsize=10)
ax.grid(True, which="both", alpha=0.3)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# ## At the paper's size
#
# The formulas at the shapes of the paper's encoder: a $\sim 800 \times 1200$ image gives
# four levels, $S = 19947$ tokens (`minidetr.bench.common.PAPER_LEVELS`), $C = 256$, $M = 8$,
# $L = K = 4$. Full attention over all of them would store an $S \times S$ matrix per
# head; deformable attention stores $MLK$ locations and weights per token.

# %%
from minidetr.bench.common import PAPER_LEVELS

S = sum(h * w for h, w in PAPER_LEVELS)
Cp, Mp, Lp, Kp = 256, 8, 4, 4
full_macs = 2 * S * S * Cp                                  # QK^T and the weighted sum
deform_proj = S * (Cp**2 + Cp * 2 * Mp * Lp * Kp + Cp * Mp * Lp * Kp + Cp**2)
deform_sampling = S * Mp * Lp * Kp * 4 * (Cp // Mp)         # four corners of D channels
print(f"S = {S} tokens")
print(f"full attention:       {full_macs:.2e} multiply-adds for QK^T and AV, attention "
      f"matrix {Mp * S * S * 4 / 1e9:.1f} GB per image and layer (float32)")
print(f"deformable attention: {deform_proj:.2e} multiply-adds for the four projections, "
      f"{deform_sampling:.2e} for the sampling; locations + weights "
      f"{S * Mp * Lp * Kp * 3 * 4 / 1e6:.0f} MB")

# %% [markdown]
# ## Checks
#
# Memory is deterministic, so the checks use it: full attention must hold its
# $M\,(HW)^2$ matrix, deformable attention must stay within a constant times $HW \cdot C$,
# and the ratio between them must grow with the map.

# %%
largest = sides[-1]
hw_max = largest * largest
full_peak = results["full"][largest][1]
deform_peak = results["deformable"][largest][1]
assert full_peak >= bytes_full(hw_max), (full_peak, bytes_full(hw_max))
assert deform_peak < 20 * bytes_deformable(hw_max), (deform_peak, bytes_deformable(hw_max))
ratios = [results["full"][s][1] / results["deformable"][s][1] for s in sides]
assert all(b > a for a, b in zip(ratios, ratios[1:])), f"memory ratio must grow: {ratios}"
assert S == 19947 and abs(full_macs - 2.04e11) / 2.04e11 < 0.01
assert abs(deform_proj - 4.6e9) / 4.6e9 < 0.01 and abs(deform_sampling - 3.3e8) / 3.3e8 < 0.01
with no_grad():
    src, ref = encoder_inputs(sides[0])
    out_full, _ = full_layer(src, src, src)
    out_deform = deform_layer(src, ref, src, [[sides[0], sides[0]]], [0])
assert out_full.shape == out_deform.shape == (1, sides[0] ** 2, C)
assert np.isfinite(out_full.data).all() and np.isfinite(out_deform.data).all()
print(f"memory ratio full / deformable: {[round(r, 1) for r in ratios]}")
print("all checks passed")
