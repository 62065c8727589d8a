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
# feature map grows, and puts the measurements next to the paper's formulas:
#
# 1. one encoder layer's forward pass, then the two attention cores alone;
# 2. the backward pass, which training adds, and what each layer must keep for it;
# 3. the decoder's cross-attention, where a few hundred object queries read the map;
# 4. the numbers at the paper's size.
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
# ## The backward pass
#
# Training runs every layer backwards too. For full attention, with $P$ the softmax
# output, $\bar O$ the gradient arriving at $O = PV$ and $D$ channels per head:
#
# $$
# \bar V = P^\top \bar O, \qquad \bar P = \bar O V^\top, \qquad
# \bar S = P \odot \big(\bar P - \mathrm{rowsum}(\bar P \odot P)\big), \qquad
# \bar Q = \bar S K / \sqrt{D}, \qquad \bar K = \bar S^\top Q / \sqrt{D},
# $$
#
# four more products of $HW \times HW \times D$ per head, twice the forward's two: the same
# class $O(H^2W^2C)$, a larger constant (the measured ratio of forward + backward to the
# forward alone is printed below; it depends on the machine). Worse, $P$ (an $M \times HW \times HW$ array) must be
# **kept** from the forward pass until the backward pass, in every layer. The deformable
# op's backward ([deformable-attention.md §3](../docs/deformable-attention.md#3-gradients-of-bilinear-sampling))
# does per point four dot products of $D$ channels and four scatters of $D$ channels,
# again a few times its forward and linear in $HW$, and it keeps only its inputs: the
# value, the locations and the weights, $O(HW(C + 3MK))$. We time forward + backward of one layer with
# autograd and record the peak memory of the whole step.

# %%
train_sides = sides[:-1] if SMALL else [8, 12, 16, 24, 32]


def train_step_of(layer_call, inputs):
    """Forward, a scalar loss and backward through one layer; gradients cleared first."""
    layer = full_layer if layer_call == "full" else deform_layer

    def step():
        layer.zero_grad()
        for t in inputs:
            if isinstance(t, Tensor):
                t.grad = None
        if layer_call == "full":
            out, _ = full_layer(*inputs)
        else:
            out = deform_layer(*inputs)
        (out * out).sum().backward()
    return step


training = {"full": {}, "deformable": {}}
for side in train_sides:
    src, ref = encoder_inputs(side)
    src = Tensor(src.data, requires_grad=True)
    training["full"][side] = measure(train_step_of("full", (src, src, src)))
    training["deformable"][side] = measure(
        train_step_of("deformable", (src, ref, src, [[side, side]], [0])))
    row = "  ".join(f"{name}: {r[side][0] * 1e3:8.1f} ms {r[side][1] / 2**20:7.1f} MiB "
                    f"(forward alone {results[name][side][0] * 1e3:7.1f} ms)"
                    for name, r in training.items())
    print(f"H x W = {side:2d} x {side:<2d}  {row}")

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
for name, color, time_model, mem_model in (
        ("full", "tab:red", paper_full, bytes_full),
        ("deformable", "tab:blue", paper_deformable, bytes_deformable)):
    hw = np.array([s * s for s in training[name]], dtype=np.float64)
    viz.plot_against_model(axes[0], hw, [t for t, _ in training[name].values()],
                           [3 * time_model(h) for h in hw], name, color,
                           model_label=f"{name}: 3 x forward formula x constant")
    viz.plot_against_model(axes[1], hw, [m for _, m in training[name].values()],
                           [mem_model(h) for h in hw], name, color,
                           model_label=f"{name}: largest arrays x constant")
axes[0].set_title("forward + backward of one encoder layer", fontsize=10)
axes[0].set_ylabel("seconds")
axes[1].set_title("peak memory of the training step", fontsize=10)
axes[1].set_ylabel("bytes")
for ax in axes:
    ax.set_xlabel("HW (tokens)")
    ax.legend(fontsize=8)
plt.show()
backward_factor = {name: np.median([training[name][s][0] / results[name][s][0]
                                    for s in train_sides]) for name in training}
print("forward + backward / forward alone (median): "
      + ", ".join(f"{name} {f:.1f}x" for name, f in backward_factor.items()))

# %% [markdown]
# ## Decoder cross-attention
#
# In the decoder, $N_q$ object queries (300 in the paper) read the encoder's $HW$ tokens.
# DETR's cross-attention costs $O(N_q C^2 + HWC^2 + N_q HW C)$: keys and values for every
# token, and an $N_q \times HW$ attention matrix per head. It is *linear* in $HW$ already,
# with the slope $2C^2 + 2 N_q C$ per token. Deformable cross-attention costs
# $O(N_q C^2 + \min(HWC^2,\ N_q K C^2) + 5 N_q K C + 3 N_q C M K)$: the query side does not
# depend on the map at all. What remains of the map is the value projection $W'x$; like
# the official code, minidetr projects every token ($HWC^2$, slope $C^2$ per token), the
# first branch of the $\min$. So in the decoder both are linear, and by the count of
# multiply-adds deformable attention wins by a constant factor per token, about
# $2 + 2N_q/C$ (for $N_q = 300$, $C = 256$: about 4). Measured, the gap can be larger than
# that count says (the two ratios are printed below): the full layer also makes several
# elementwise passes (scale, max, exp, sum, divide) over its $M \times N_q \times HW$
# attention matrix, which multiply-adds do not count and which soon outgrows the caches.
# Either way the decoder is not where the paper's argument lies: its gain there is the
# convergence and the accuracy on small objects that sparse, multi-scale sampling brings.

# %%
Nq = 50 if SMALL else 300
cross_sides = sides if SMALL else [8, 16, 24, 32, 48, 64]
queries = Tensor(rng.normal(size=(1, Nq, C)).astype(np.float32))                 # (1, Nq, C)
query_refs = Tensor(rng.uniform(0.1, 0.9, size=(1, Nq, 1, 2)).astype(np.float32))  # (1, Nq, 1, 2)
cross = {"full": {}, "deformable": {}}
for side in cross_sides:
    memory, _ = encoder_inputs(side)                                              # (1, HW, C)
    with no_grad():
        cross["full"][side] = measure(lambda: full_layer(queries, memory, memory))
        cross["deformable"][side] = measure(
            lambda: deform_layer(queries, query_refs, memory, [[side, side]], [0]))
    print(f"H x W = {side:2d} x {side:<2d}, {Nq} queries  " + "  ".join(
        f"{name}: {r[side][0] * 1e3:7.2f} ms {r[side][1] / 2**20:6.1f} MiB"
        for name, r in cross.items()))


def paper_cross_full(hw):            # N_q C^2 + N_k C^2 (K and V: 2) + N_q N_k C (QK^T and AV: 2)
    return Nq * C**2 + 2 * hw * C**2 + 2 * Nq * hw * C


def paper_cross_deformable(hw):      # N_q C^2 + HW C^2 + 5 N_q K C + 3 N_q C M K (+ output)
    return 2 * Nq * C**2 + hw * C**2 + 5 * Nq * K * C + 3 * Nq * C * M * K


fig, ax = plt.subplots(figsize=(6.5, 4.2))
for name, color, model in (("full", "tab:red", paper_cross_full),
                           ("deformable", "tab:blue", paper_cross_deformable)):
    hw = np.array([s * s for s in cross[name]], dtype=np.float64)
    viz.plot_against_model(ax, hw, [t for t, _ in cross[name].values()],
                           [model(h) for h in hw], name, color,
                           model_label=f"{name}: formula x fitted constant")
ax.set_xlabel("HW (memory tokens)")
ax.set_ylabel("seconds")
ax.set_title(f"decoder cross-attention, {Nq} queries: both linear in HW", fontsize=10)
ax.legend(fontsize=8)
plt.show()
largest_cross = cross_sides[-1]
cross_ratio = cross["full"][largest_cross][0] / cross["deformable"][largest_cross][0]
formula_ratio = paper_cross_full(largest_cross**2) / paper_cross_deformable(largest_cross**2)
print(f"at {largest_cross} x {largest_cross}: full / deformable time = {cross_ratio:.1f} "
      f"measured, {formula_ratio:.1f} by the multiply-add formulas (measured "
      f"{'above' if cross_ratio > formula_ratio else 'below'} the count)")

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
Nq_paper = 300
decoder_full = Nq_paper * Cp**2 + 2 * S * Cp**2 + 2 * Nq_paper * S * Cp
decoder_deform = 2 * Nq_paper * Cp**2 + S * Cp**2 + Nq_paper * Mp * Lp * Kp * 4 * (Cp // Mp) \
    + 3 * Nq_paper * Cp * Mp * Lp * Kp
print(f"decoder cross-attention, {Nq_paper} queries: full {decoder_full:.2e}, deformable "
      f"{decoder_deform:.2e} multiply-adds ({decoder_full / decoder_deform:.1f}x); training "
      f"keeps the encoder's attention matrices: {6 * Mp * S * S * 4 / 1e9:.0f} GB for 6 "
      f"full-attention layers")

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer (with formulas and memory, not
# timings, which depend on the machine):
# [solutions/04_complexity.py](solutions/04_complexity.py).
#
# 1. **Predict.** For which number of tokens $HW$ does full attention's $N_q N_k C = (HW)^2 C$
#    term overtake the key and value projections, $2HWC^2$, at $C = 256$? Where is DETR's
#    single C5 map of an $800 \times 1066$ image ($25 \times 34$) on that scale?
# 2. **Predict, then measure.** How many bytes of attention probabilities must full
#    attention keep for the backward pass, per layer, on all $S = 19\,947$ tokens of the
#    paper's levels, and for six encoder layers? Then check the rule at a small size: how
#    much more memory does `MultiheadAttention`'s forward pass keep when gradients are on?
# 3. **Implement, then predict.** The paper's $\min(HWC^2, N_q K C^2)$: the value projection
#    $W'$ can be applied to every token before sampling or to the sampled points after it.
#    Prove with the op that both give the same output (hint: sample the raw features once per
#    head, then apply each head's $D \times C$ block of $W'$). Which is cheaper in the paper's
#    decoder (300 queries, $LK = 16$ points per head), and which in the encoder?

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
# training: full attention keeps its M (HW)^2 probabilities for the backward pass
train_largest = train_sides[-1]
assert training["full"][train_largest][1] >= bytes_full(train_largest**2)
train_ratios = [training["full"][s][1] / training["deformable"][s][1] for s in train_sides]
assert all(b > a for a, b in zip(train_ratios, train_ratios[1:])), train_ratios
# decoder: the full layer holds an (M, Nq, HW) matrix, the deformable one nothing of it
assert cross["full"][largest_cross][1] >= M * Nq * largest_cross**2 * 4
assert cross["deformable"][largest_cross][1] < M * Nq * largest_cross**2 * 4
assert 3.5 < decoder_full / decoder_deform < 4.5
print(f"memory ratio full / deformable: {[round(r, 1) for r in ratios]}; training "
      f"{[round(r, 1) for r in train_ratios]}")
print("all checks passed")
