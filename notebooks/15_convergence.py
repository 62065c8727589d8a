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
# # 15. Convergence: standard attention against deformable attention
#
# **Paper:** §1 and §3. The headline claim of Deformable DETR is that it "can achieve
# better performance than DETR (especially on small objects) with 10× less training
# epochs". The reason given is in the attention. DETR uses the multi-head attention of
# the Transformer, **Eq. (1)**:
#
# $$
# \mathrm{MultiHeadAttn}(z_q, x) = \sum_{m=1}^{M} W_m \Big[ \sum_{k \in \Omega_k} A_{mqk}\, W'_m\, x_k \Big],
# \qquad A_{mqk} \propto \exp\!\Big(\frac{z_q^\top U_m^\top V_m x_k}{\sqrt{C_v}}\Big),
# $$
#
# where every query weighs *all* $N_k$ keys. At initialisation the logits are of order 1,
# so $A_{mqk} \approx 1/N_k$: each key gets a $1/N_k$ share of every query's gradient,
# and the attention needs a long schedule to learn to focus. Deformable attention,
# **Eq. (2)–(3)**, looks at $K$ points per level near a reference point from the start.
# The derivation, line by line, is in
# [deformable-attention.md](../docs/deformable-attention.md) §7.
#
# This notebook:
#
# 1. measures the initial weights: $1/N_k$ for Eq. (1), at our size and at the paper's;
# 2. trains the `tiny` detector twice with one budget, once with Eq. (1) in the encoder
#    and the decoder's cross-attention on a single-scale map (`attention="dense"`), once
#    with deformable attention, and plots loss and AP per epoch on one figure;
# 3. measures time and memory per training step of each, and how each attention's cost
#    grows with the number of tokens;
# 4. puts the paper's numbers beside ours, and says which trends reproduce here.
#
# The full runs (minutes each, an hour for all settings on 2 shared cores) are made by
# `python -m minidetr.lessons.experiments run` and cached in `notebooks/cache/`; this
# notebook reads them and re-measures the rest live. **Code:**
# `minidetr/models/dense_attention.py` (`DenseAttention`),
# `minidetr/lessons/experiments.py` (`SETTINGS`, `BUDGET`, `step_cost`),
# `minidetr/lessons/trained.py` (`record_sampling`, `attention_focus`).

# %%
import json
import os
import tempfile
import time
import tracemalloc
from pathlib import Path

for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import matplotlib.pyplot as plt
import numpy as np

from minidetr.autograd import Tensor
from minidetr.lessons import experiments as ex
from minidetr.lessons.trained import attention_focus, held_out_shapes, record_sampling
from minidetr.models import build_model
from minidetr.models.dense_attention import DenseAttention
from minidetr.nn.msdeform_attn import MSDeformAttn

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
results = json.loads(ex.RESULTS_PATH.read_text(encoding="utf-8"))
runs = results["settings"]
print(f"setting: {'tiny' if SMALL else 'full'}; cached settings: {sorted(runs)}")
print(f"the budget of every run: {results['budget']}")

# %% [markdown]
# ## 1. At initialisation: $1/N_k$ against $1/(LK)$
#
# We build three untrained `tiny` detectors (the settings of the experiment) and record,
# for one batch of held-out shapes images, the weights of the first encoder layer's
# attention (`record_sampling`), per head and per query (the unpadded tokens):
#
# * `n_keys`: how many keys (dense) or sampling points (deformable) a head weighs;
# * `max_weight`: the largest weight, averaged over queries and heads;
# * `perplexity`: $\exp(\text{entropy})$, the *effective* number of keys: $N_k$ for
#   uniform weights, 1 for a head that looks at one key.

# %%
heldout = held_out_shapes(ex.DATA.parent / "shapes-heldout", 4 if SMALL else 16,
                          batch_size=4 if SMALL else 16)[0]


def first_layer_focus(model, batch):
    """attention_focus of the first encoder layer, over the unpadded tokens."""
    with record_sampling(model) as records:
        model(Tensor(batch.images), batch.mask)
    tokens = ex.token_mask(model, batch)
    return attention_focus(records["transformer.encoder.layers.0.self_attn"][0], tokens)


at_init = {}
for name in ("dense-L1", "L1", "base", "dense-L3"):
    at_init[name] = first_layer_focus(build_model(ex.setting_config(name)).eval(), heldout)
print(f"{'setting':<10} {'attention':<11} {'n_keys':>6} {'1/n_keys':>8} {'max weight':>10} "
      f"{'perplexity':>10}")
for name, f in at_init.items():
    print(f"{name:<10} {f['kind']:<11} {f['n_keys']:>6.0f} {f['uniform']:>8.4f} "
          f"{f['max_weight']:>10.4f} {f['perplexity']:>10.1f}")

# %% [markdown]
# Dense attention starts close to uniform over its $N_k$ keys (perplexity near $N_k$,
# largest weight a small multiple of $1/N_k$); deformable attention starts *exactly*
# uniform over its $LK$ points ($1/(LK)$, the zero-initialised weight projection), but
# those points sit within $K$ pixels of the query. On the runs' $96 \times 96$ images the
# C5 map (stride 32) has only $N_k = 9$ tokens, so $1/N_k$ is not small; on all three
# levels there are 189 tokens. At the paper's size it is: the same measurement on one
# `DenseAttention` layer of the paper's width ($C = 256$, $M = 8$) over the C5 map of an
# $800 \times 1333$ image ($25 \times 42 = 1050$ tokens) and its DC5 map (stride 16,
# $4200$ tokens), with random unit-variance features:

# %%
rng = np.random.default_rng(SEED)
paper_sizes = [(25, 42)] if SMALL else [(25, 42), (50, 84)]
paper_focus = {}
for h, w in paper_sizes:
    attn = DenseAttention(256, 8, rng=rng)
    tokens = rng.standard_normal((1, h * w, 256)).astype(np.float32)        # (1, S, C)
    queries = tokens[:, :: max(1, h * w // 200)]                            # 200 queries
    with record_sampling(attn) as records:
        attn(Tensor(queries), None, Tensor(tokens), None, None)
    paper_focus[h * w] = attention_focus(records[""][0])
    f = paper_focus[h * w]
    print(f"N_k = {h * w:>5}: 1/N_k = {f['uniform']:.5f}, largest weight {f['max_weight']:.5f} "
          f"({f['max_weight'] * h * w:.1f} x 1/N_k), perplexity {f['perplexity']:.0f} "
          f"({f['perplexity'] / (h * w):.0%} of N_k)")

# %% [markdown]
# ## 2. The experiment: one detector, two attentions, one budget
#
# The settings differ in the attention only (`minidetr/lessons/experiments.py`):
#
# * **`dense-L1`**: Eq. (1) in every encoder layer (query = key = $x$ + pos, value $= x$)
#   and in the decoder's cross-attention (key = memory + pos), on the single-scale C5 map,
#   as DETR;
# * **`L1`**: deformable attention (Eq. 2) on the same single-scale map, $K = 2$;
# * **`dense-L3`**: Eq. (1) over the tokens of all $L = 3$ levels at once (189 tokens on a
#   96-pixel image): out of reach at the paper's sizes, affordable here, and the cleanest
#   comparison, since it sees exactly what the next setting sees;
# * **`base`**: multi-scale deformable attention (Eq. 3) on $L = 3$ levels, $K = 2$, the
#   `tiny` preset.
#
# Everything else is shared: the backbone, the queries and reference points, the box
# heads, the loss, the data (the first 400 of the demo's 1000 shapes images at 64–96 px,
# validation on the first 100 of its 200 at 96 px), the schedule (3 epochs of 50 steps,
# the learning rate divided by 10 after 2) and the seeds (`experiments.BUDGET`, printed at
# the top). It is a short budget, 7 % of our CPU demo's 2000 steps, forced by a 2-core
# machine shared with other jobs: the models are far from trained, which is the regime
# where convergence speed shows.

# %%
CURVES = [("dense-L1", "tab:red", "dense (Eq. 1), L=1"), ("L1", "tab:blue", "deformable, L=1"),
          ("dense-L3", "tab:orange", "dense (Eq. 1), L=3"), ("base", "tab:green", "deformable, L=3")]
present = [(n, c, label) for n, c, label in CURVES if n in runs]
fig, (ax_loss, ax_ap) = plt.subplots(1, 2, figsize=(10, 3.6))
for name, colour, label in present:
    epochs = runs[name]["epochs"]
    e = [r["epoch"] for r in epochs]
    ax_loss.plot(e, [r["train_loss"] for r in epochs], "-o", color=colour, label=f"{label} train")
    ax_loss.plot(e, [r["val_loss"] for r in epochs], "--", color=colour, label=f"{label} val")
    ax_ap.plot(e, [r["AP"] for r in epochs], "-o", color=colour, label=f"{label} AP")
    ax_ap.plot(e, [r["AP50"] for r in epochs], ":", color=colour, label=f"{label} AP50")
ax_loss.set(xlabel="epoch", ylabel="weighted set loss (all decoder layers)")
ax_ap.set(xlabel="epoch", ylabel="COCO AP on the validation split")
for ax in (ax_loss, ax_ap):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
fig.suptitle("convergence: the same tiny detector with standard or deformable attention",
             fontsize=10)
plt.tight_layout()
plt.show()

epoch_numbers = [r["epoch"] for r in runs[present[0][0]]["epochs"]]
print(f"{'setting':<10} " + " ".join(f"{'AP@' + str(e):>7}" for e in epoch_numbers)
      + "   final APs  s/epoch (wall, shared machine)")
for name, _, _ in present:
    epochs = runs[name]["epochs"]
    print(f"{name:<10} " + " ".join(f"{r['AP']:>7.3f}" for r in epochs)
          + f"   {epochs[-1]['APs']:>9.3f}  {np.mean([r['seconds'] for r in epochs]):>7.0f}"
          + ("" if runs[name]["finished"] else "  (run unfinished)"))

# %% [markdown]
# And the attention after training, measured the same way as in §1 (first encoder layer,
# 16 held-out images; `experiments.collect` stores it): has dense attention learned to
# focus?

# %%
print(f"{'setting':<10} {'n_keys':>6} {'perplexity at init':>18} {'after training':>14}  "
      f"{'max weight at init':>18} {'after':>6}")
trained_focus = {}
for name in ("dense-L1", "L1", "base", "dense-L3"):
    if name in runs and "focus" in runs[name]:
        f0, f1 = at_init[name], runs[name]["focus"]["encoder"]
        trained_focus[name] = f1
        print(f"{name:<10} {f1['n_keys']:>6.0f} {f0['perplexity']:>18.2f} {f1['perplexity']:>14.2f}"
              f"  {f0['max_weight']:>18.3f} {f1['max_weight']:>6.3f}")

# %% [markdown]
# ## 3. Time and memory per training step
#
# `experiments.step_cost` times one full training step (forward, set loss, backward,
# AdamW) on a fixed batch of 8 images of $96 \times 96$ pixels (the runs' validation
# size), the fastest of 5 steps after a warm-up in each of 3 rounds that interleave the
# settings, and measures the step's peak of Python-traced allocations (NumPy arrays
# included) with `tracemalloc`. The cached numbers were measured by `collect` on a 2-core
# machine shared with other jobs: the fastest step is the least disturbed one, but the
# times remain rougher than the memory.

# %%
print(f"{'setting':<10} {'tokens S':>8} {'s / step':>9} {'peak MiB':>9}")
for name in ("dense-L1", "L1", "base", "dense-L3"):
    if name in runs and "step_cost" in runs[name]:
        c = runs[name]["step_cost"]
        print(f"{name:<10} {c['tokens']:>8} {c['seconds']:>9.3f} {c['peak_mib']:>9.1f}")

# %% [markdown]
# At these sizes the whole step is dominated by the backbone and the heads, so the
# attention's own cost hides. Measured on one attention layer alone (forward and
# backward of the encoder's self-attention, $C = 64$, $M = 4$, every token a query, live
# in this notebook), the scaling the paper's §3 derives appears: dense attention's time
# and memory grow as $S^2$, deformable attention's as $S$.

# %%
def layer_cost(kind, side, C=64, M=4, L=1, K=2, repeats=2):
    """Seconds and peak MiB of forward + backward of one encoder attention layer on one
    image whose single-scale map is side x side (S = side^2 queries and keys)."""
    rng = np.random.default_rng(SEED)
    S = side * side
    x = Tensor(rng.standard_normal((1, S, C)).astype(np.float32), requires_grad=True)
    shapes = np.array([[side, side]])
    start = np.array([0])
    grid = (np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij")[::-1], -1)
            .reshape(1, S, 1, 2) + 0.5) / side                              # (1, S, L, 2)
    ref = grid.astype(np.float32)
    attn = (DenseAttention(C, M, rng=rng) if kind == "dense"
            else MSDeformAttn(C, L, M, K, rng=rng))

    def run():
        out = attn(x, ref, x, shapes, start)
        (out * out).sum().backward()

    run()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    tracemalloc.start()
    run()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return min(times), peak


SIDES = (16, 24, 32) if SMALL else (8, 16, 24, 32, 48)
cost = {kind: [layer_cost(kind, s) for s in SIDES] for kind in ("dense", "deformable")}
S_values = np.array(SIDES) ** 2
print(f"{'S':>6} " + " ".join(f"{k + ' ms':>14} {k + ' MiB':>15}" for k in cost))
for i, S in enumerate(S_values):
    print(f"{S:>6} " + " ".join(f"{cost[k][i][0] * 1e3:>14.1f} {cost[k][i][1]:>15.2f}"
                                for k in cost))
fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for k, colour in (("dense", "tab:red"), ("deformable", "tab:blue")):
    axes[0].loglog(S_values, [c[0] * 1e3 for c in cost[k]], "-o", color=colour, label=k)
    axes[1].loglog(S_values, [c[1] for c in cost[k]], "-o", color=colour, label=k)
axes[0].set(xlabel="tokens S", ylabel="ms (forward + backward)")
axes[1].set(xlabel="tokens S", ylabel="peak MiB")
for ax in axes:
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()
slope = {k: float(np.polyfit(np.log(S_values[-3:]), np.log([c[1] for c in cost[k][-3:]]), 1)[0])
         for k in cost}
print("memory growth exponent over the largest three sizes (S^a): "
      + ", ".join(f"{k} a = {a:.2f}" for k, a in slope.items()))

# %% [markdown]
# ## 4. Beside the paper
#
# The paper's Table 1 (COCO val, ResNet-50, numbers as we recall them from arXiv v4; not
# re-verified against the PDF here) and our runs:
#
# | model | epochs | AP | AP$_S$ | training |
# |---|---:|---:|---:|---|
# | DETR | 500 | 42.0 | 20.5 | 2000 GPU-hours |
# | DETR-DC5 | 500 | 43.3 | 22.5 | 7000 GPU-hours |
# | DETR-DC5 | 50 | 35.3 | 15.2 | |
# | DETR-DC5+ (focal loss, 300 queries) | 50 | 36.2 | 16.3 | |
# | Deformable DETR (single scale, Table 2) | 50 | 39.7 | 21.2 | |
# | Deformable DETR | 50 | 43.8 | 26.4 | 325 GPU-hours |
#
# (mmdetection's re-implementation reports 44.3 / 46.2 / 47.0 AP for plain / refine /
# two-stage.) The paper's comparison at equal epochs: DETR-DC5+ 36.2 against
# 43.8 AP, +7.6 AP, and 10× fewer epochs than DETR for better AP. Ours, at equal budget:

# %%
final = {n: runs[n]["epochs"][-1] for n in ("dense-L1", "L1", "dense-L3", "base") if n in runs}
for n, r in final.items():
    print(f"{n:<10} AP {r['AP']:.3f}  AP50 {r['AP50']:.3f}  APs {r['APs']:.3f}  "
          f"APm {r['APm']:.3f}  val loss {r['val_loss']:.3f}  (epoch {r['epoch']})")
gaps = {}
for dense, deformable in (("dense-L1", "L1"), ("dense-L3", "base")):
    if dense in final and deformable in final:
        a, b = final[dense], final[deformable]
        gaps[deformable] = (b["AP"] - a["AP"], b["AP50"] - a["AP50"], b["val_loss"] - a["val_loss"])
        print(f"deformable - dense, {deformable} vs {dense}: {gaps[deformable][0]:+.3f} AP, "
              f"{gaps[deformable][1]:+.3f} AP50, {gaps[deformable][2]:+.3f} validation loss")

# %% [markdown]
# **What reproduces at this scale, and what does not.** Each statement refers to a number
# printed above; the checks at the end hold the notebook to them.
#
# * *Initial weights: reproduces.* Eq. (1) starts close to uniform: the perplexity of the
#   first encoder layer is most of $N_k$ (125 of 189 keys for `dense-L3`), and at the
#   paper's token counts (1050 and 4200) the largest weight is about 5 times $1/N_k$, i.e.
#   a few thousandths: the regime of the paper's argument. Deformable attention starts at
#   exactly $1/(LK)$ over 2 or 6 nearby points.
# * *Convergence on the same tokens: reproduces, strongly.* With the same 189 multi-scale
#   tokens, the same detector and the same 150 steps, deformable attention (`base`)
#   reaches AP 0.046 (AP50 0.18) while Eq. (1) (`dense-L3`) is still at AP 0.002
#   (AP50 0.01), with a validation loss higher by 0.8. After training, the dense
#   attention has only begun to focus (perplexity down from 125 to 67 keys).
# * *Single scale: no conclusion.* On the C5 map alone ($3 \times 3$ tokens on a 96-pixel
#   image) *both* attentions fail (AP ≤ 0.003): a stride-32 map cannot localise these
#   objects, whatever attends to it, and with $N_k = 9$ the $1/N_k$ argument has no
#   force. The paper's single-scale comparison (DETR-DC5 against single-scale Deformable
#   DETR) runs on maps of thousands of tokens; ours cannot test it.
# * *Cost: reproduces.* On one attention layer, memory grows as $S^{1.97}$ for Eq. (1) and
#   $S^{0.99}$ for deformable attention; at $S = 2304$ the dense layer needs 329 MiB
#   against 5 MiB, and several times the time (the milliseconds of that table, measured
#   live, move with the load of the machine; the memory does not). In a whole training
#   step at 189 tokens, dense attention costs 2.4 times the memory of deformable attention
#   (93 against 38 MiB) and about 2.4 times the time. (The seconds per *epoch* of the table
#   in §2 were measured on a machine shared with other jobs and say little; the per-step
#   times are the fastest of 15 steps in 3 interleaved rounds.)
# * *The size of the effect: not comparable.* The paper's gap (36.2 against 43.8 AP at 50
#   epochs, and DETR's 500 epochs) is measured after full training on COCO; ours after 150
#   steps on toy shapes. That deformable attention learns faster reproduces; by how much
#   it would matter at convergence, this notebook cannot say.

# %% [markdown]
# ## 5. The same experiment in miniature (the code path, live)
#
# The cached runs came from `experiments.run_setting`. Here the same function trains a
# micro version of both settings for one short epoch on a few shapes images, so that the
# path from `ModelConfig.attention` to a trained, evaluated run is exercised every time
# this notebook runs (its numbers mean nothing).

# %%
micro = dict(d_model=32, nheads=2, dim_feedforward=32, tiny_channels=(8, 16, 16, 16),
             num_queries=8)
budget = dict(ex.BUDGET, epochs=1, lr_drop=1, max_train_images=8 if SMALL else 32,
              max_val_images=4 if SMALL else 16, num_workers=0)
with tempfile.TemporaryDirectory() as tmp:
    from minidetr.data import generate_shapes_dataset
    from minidetr.training import DataPaths, TrainConfig, run_training
    data = DataPaths.from_shapes(generate_shapes_dataset(
        Path(tmp) / "shapes", num_train=budget["max_train_images"],
        num_val=budget["max_val_images"], image_size=(96, 96), seed=SEED))
    mini = {}
    for name in ("dense-L1", "L1"):
        result = run_training(ex.setting_config(name, **micro), TrainConfig(**budget), data,
                              Path(tmp) / name, progress=False, log=lambda *a: None)
        mini[name] = result.final_metrics
        print(f"{name}: one micro epoch, AP {mini[name]['AP']:.3f} (meaningless, a smoke run)")

# %% [markdown]
# ## Exercises
#
# 1. **Predict, then measure.** Before running it: what perplexity will an untrained
#    `DenseAttention` (C = 64, M = 4) have over $N_k = 64$ random tokens? Over 1024?
#    Check with `record_sampling` and `attention_focus` (solution: `exercise_1`).
# 2. **Derive and check.** §7 of the doc says $\partial\mathcal{L}/\partial v_k = A_{qk}\,g$.
#    Verify it numerically for one head: build the weights with `dense_head_weights`,
#    backpropagate through `DenseAttention.attend` and compare the value gradient of the
#    head with $A^\top g$ (`exercise_2`).
# 3. **Break it.** Make the dense logits 100× sharper at initialisation (scale
#    `in_proj_weight`'s query rows by 10 and key rows by 10) and measure the perplexity:
#    attention that starts focused is no longer uniform, but it is focused on keys chosen
#    at random. Which assertion of §1 fails? (`exercise_3`)
# 4. **Implement.** Add the decoder's cross-attention to `first_layer_focus` (the record
#    `transformer.decoder.layers.0.cross_attn`) and compare dense and deformable queries'
#    perplexity at initialisation (`exercise_4`).
#
# Solutions: `notebooks/solutions/15_convergence.py` (run by the tests).

# %% [markdown]
# ## Checks

# %%
assert abs(at_init["L1"]["max_weight"] - 1 / 2) < 1e-6, "deformable starts at 1/(LK)"
assert abs(at_init["base"]["perplexity"] - 6) < 1e-3
assert at_init["dense-L1"]["perplexity"] > 0.5 * at_init["dense-L1"]["n_keys"], at_init
assert at_init["dense-L3"]["perplexity"] > 0.5 * at_init["dense-L3"]["n_keys"], at_init
for n_k, f in paper_focus.items():
    assert f["perplexity"] > 0.5 * n_k and f["max_weight"] < 20 / n_k, (n_k, f)
assert slope["dense"] > 1.5 and slope["deformable"] < 1.3, slope
if not SMALL:
    assert cost["dense"][-1][1] > 20 * cost["deformable"][-1][1], cost       # 329 vs 5 MiB
    assert cost["dense"][-1][0] > 2 * cost["deformable"][-1][0], cost        # several times
assert {"dense-L1", "L1", "base"} <= set(runs), sorted(runs)
for name in ("dense-L1", "L1", "base"):
    assert all(np.isfinite(r["train_loss"]) for r in runs[name]["epochs"]), name
assert all(np.isfinite(m["AP"]) for m in mini.values())
# the claims of the text, on the cached full runs
assert gaps["base"][0] > 0.03 and gaps["base"][2] < -0.5, gaps          # same tokens
assert final["L1"]["AP"] < 0.01 and final["dense-L1"]["AP"] < 0.01, final  # single scale
cost_of = {n: runs[n]["step_cost"] for n in ("dense-L3", "base")}
assert cost_of["dense-L3"]["peak_mib"] > 2 * cost_of["base"]["peak_mib"], cost_of
assert trained_focus["dense-L3"]["perplexity"] < at_init["dense-L3"]["perplexity"]
print("all checks passed")
