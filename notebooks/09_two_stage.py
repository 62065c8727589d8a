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
# # 9. Two-stage Deformable DETR
#
# **Paper:** Deformable DETR, §4.2 (two-stage Deformable DETR) and Appendix A.4. In a
# first stage, a detection head on the encoder's output turns every pixel of every level
# into a box proposal, relative (in logit space, as in notebook 7) to a box centred on the
# pixel whose size doubles from level to level (base size $s = 0.05$). The top-scoring
# proposals become the decoder's object queries and initial reference boxes. This
# notebook computes:
#
# 1. the encoder proposals: one box per token, their sizes and validity;
# 2. the scoring head and the top-$k$ selection, checked against the model;
# 3. the proposals drawn on a picture, untrained and after a short training;
# 4. the queries made from the proposals (a sine embedding of the boxes);
# 5. where the gradient stops: the proposals are detached.
#
# **Doc:** [model.md](../docs/model.md) §7 (and §11 for why two-stage always comes with
# refinement). **Code:** `minidetr/models/deformable_transformer.py`:
# `encoder_output_proposals`, `DeformableTransformer.gen_encoder_output_proposals`,
# `get_proposal_pos_embed`, and the two-stage branch of `DeformableTransformer.forward`.

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import build_criterion, build_model, get_config
from minidetr.models.deformable_transformer import encoder_output_proposals, get_proposal_pos_embed
from minidetr.optim import AdamW
from minidetr.testing import assert_allclose
from minidetr.training.engine import train_one_epoch

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# The **untrained** `tiny` model in its two-stage variant (with refinement, as always;
# $L = 3$ levels, $k = N_q = 20$ proposals become queries), on the padded batch of
# notebooks 5–7.

# %%
cfg = get_config("tiny", "two-stage", dropout=0.0, seed=SEED)
model = build_model(cfg).eval()
transformer = model.transformer
SHORT = 120 if SMALL else 250
to_model_input = Compose([Resize(SHORT, max_size=SHORT * 3 // 2), Normalize()])
images, mask, targets = collate([example_to_sample(load_example(1), to_model_input),
                                 example_to_sample(load_example(0), to_model_input)])
sizes = [tuple(int(v) for v in t["size"]) for t in targets]
with no_grad():
    srcs, masks, pos = model.project_features(images, mask)
    (src, mask_flatten, lvl_pos, spatial_shapes, level_start_index,
     valid_ratios) = transformer.flatten_levels(srcs, masks, pos)
    memory = transformer.encoder(src, spatial_shapes, level_start_index, valid_ratios,
                                 lvl_pos, mask_flatten)
N, S, C = memory.shape
L, strides = len(spatial_shapes), model.backbone.strides
print(f"memory {memory.shape}; levels {spatial_shapes.tolist()}; "
      f"{len(model.class_embed)} class heads = {cfg.dec_layers} decoder layers + 1 for the "
      f"proposals")

# %% [markdown]
# ## 1. One proposal per token
#
# Token $(i, j)$ of level $l$, in an image whose level $l$ has a valid extent of
# $v_H \times v_W$ tokens, proposes (`encoder_output_proposals`)
#
# $$
# c_x = \frac{j + 0.5}{v_W}, \quad c_y = \frac{i + 0.5}{v_H}, \quad
# w = h = 0.05 \cdot 2^{l},
# $$
#
# like one anchor per pixel whose size grows with the level's stride. A proposal is
# **valid** iff its four coordinates lie in $(0.01, 0.99)$ and the token is not padding;
# valid proposals are stored as logits $\log\frac{p}{1-p}$, invalid ones as $+\infty$.

# %%
proposals, valid = encoder_output_proposals(mask_flatten, spatial_shapes, memory.dtype)
print(f"proposal logits {proposals.shape}, valid {valid.shape}: "
      f"{valid.sum(1).tolist()} of {S} tokens valid per image")
for b in range(N):
    for l in range(L):
        Hl, Wl = spatial_shapes[l]
        start = level_start_index[l]
        v_h = int((~masks[l][b, :, 0]).sum())
        v_w = int((~masks[l][b, 0, :]).sum())
        jj, ii = np.meshgrid(np.arange(Wl), np.arange(Hl))
        boxes = np.stack([(jj + 0.5) / v_w, (ii + 0.5) / v_h, np.full(jj.shape, 0.05 * 2 ** l),
                          np.full(jj.shape, 0.05 * 2 ** l)], -1).reshape(-1, 4)  # (H_l W_l, 4)
        ok = ((boxes > 0.01) & (boxes < 0.99)).all(-1) & ~masks[l][b].reshape(-1)
        assert np.array_equal(valid[b, start:start + Hl * Wl], ok), (b, l)
        logits = proposals[b, start:start + Hl * Wl]
        assert_allclose(logits[ok], np.log(boxes[ok] / (1 - boxes[ok])), 1e-5, 1e-5,
                        what=f"proposal logits, image {b}, level {l}")
        assert np.isinf(logits[~ok]).all()
print("proposals == the formula; invalid <=> padded or outside (0.01, 0.99)")

# %% [markdown]
# On the padded giraffe picture: the proposal centres of each level (green: valid, red:
# invalid) and the boxes of a few of them, drawn to scale. Here the invalid tokens are
# exactly the padded ones; on a full-size image the outermost tokens of the finest level
# are invalid too (with 100 columns, $0.5 / v_W = 0.005 < 0.01$).

# %%
b = 1
fig, axes = plt.subplots(1, L, figsize=(4 * L, 3.8))
for l, ax in enumerate(axes):
    Hl, Wl = spatial_shapes[l]
    start = level_start_index[l]
    proposal_boxes = 1 / (1 + np.exp(-np.where(valid[b, :, None], proposals[b], 0)))  # (S, 4)
    level = slice(start, start + Hl * Wl)
    vm.show_image(ax, images[b], mask[b], title=f"level {l}: {Hl} x {Wl} tokens, "
                                                f"w = h = {0.05 * 2 ** l:.2f}")
    v = valid[b, level]
    grid = np.stack(np.meshgrid((np.arange(Wl) + 0.5) / Wl, (np.arange(Hl) + 0.5) / Hl),
                    -1).reshape(-1, 2)              # token centres in the padded level (H_l W_l, 2)
    extent_l = (Hl * strides[l], Wl * strides[l])
    vm.draw_points(ax, grid[v], extent_l, colour="tab:green", size=2 + 3 * l)
    vm.draw_points(ax, grid[~v], extent_l, colour="tab:red", size=4 + 4 * l, marker="x")
    few = np.flatnonzero(v)[(np.linspace(0.15, 0.85, 5) * v.sum()).astype(int)]
    vm.draw_boxes(ax, proposal_boxes[level][few], sizes[b], colour="yellow")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Scoring and the top-$k$
#
# The memory is zeroed at invalid tokens and passed through `enc_output` (Linear) and
# `enc_output_norm` (LayerNorm) (`gen_encoder_output_proposals`). The extra head pair,
# index $L_{dec}$ of `class_embed` / `bbox_embed`, gives every token class logits and
# refined box logits $\delta + \text{proposal logits}$ (the `enc_outputs`). The score of a
# token is its **first** class logit, trained as class-agnostic "objectness"; the $k$
# best tokens are kept (top-$k$ over $S$, per image), their box logits are **detached**,
# and $r_0 = \sigma(\cdot)$, a 4-d box, is the decoder's initial reference.
#
# Two differences from the paper's wording (§4.2, appendix A.4), neither a change of
# behaviour. The paper's first stage has a **binary** foreground classifier; the official
# code, and minidetr, reuse a full class head of `num_classes` logits, train it with
# every target relabelled 0 (so channels $1, 2, \dots$ only ever see negatives) and rank by
# channel 0, which therefore *is* the binary score (exercise 2). And, as in the paper,
# there is **no NMS** before the second stage: overlapping proposals all go to the decoder,
# whose self-attention and one-to-one matching deal with duplicates (exercise 3).

# %%
head = cfg.dec_layers                                 # the extra, proposal head
k = transformer.two_stage_num_proposals
with no_grad():
    output_memory, output_proposals = transformer.gen_encoder_output_proposals(
        memory, mask_flatten, spatial_shapes)
    enc_class = model.class_embed[head](output_memory)                     # (N, S, classes)
    enc_coord_logits = model.bbox_embed[head](output_memory) + output_proposals   # (N, S, 4)
    topk = np.argsort(-enc_class.data[..., 0], axis=1, kind="stable")[:, :k]       # (N, k)
    topk_logits = np.take_along_axis(enc_coord_logits.data, topk[..., None], 1)    # (N, k, 4)
    reference = 1 / (1 + np.exp(-topk_logits))                            # (N, k, 4)
    out = transformer(srcs, masks, pos)
    outputs = model(images, mask)

assert_allclose(out.enc_outputs_class.data, enc_class.data, 1e-6, 1e-6, what="enc class")
assert_allclose(out.init_reference.data, reference, 1e-6, 1e-6, what="top-k reference boxes")
enc_boxes = outputs["enc_outputs"]["pred_boxes"].data                     # (N, S, 4)
assert (enc_boxes[~valid] == 1).all(), "invalid tokens: sigmoid(+inf) = 1"
# untrained, the proposal box head outputs exactly 0: enc boxes = the proposals themselves
assert_allclose(enc_coord_logits.data[valid], proposals[valid], 1e-6, 1e-6,
                what="untrained: box head delta = 0")
print(f"enc_outputs: pred_logits {outputs['enc_outputs']['pred_logits'].shape}, pred_boxes "
      f"{enc_boxes.shape}; top-{k} tokens per image -> init_reference {out.init_reference.shape}")
print("levels of the selected tokens:",
      [np.bincount(np.searchsorted(level_start_index, topk[b], side="right") - 1,
                   minlength=L).tolist() for b in range(N)])

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for b, ax in enumerate(axes):
    vm.show_image(ax, images[b], mask[b], title=f"untrained: the top-{k} proposals, image {b}")
    vm.draw_boxes(ax, reference[b], sizes[b], colour="yellow", linewidth=1)
plt.tight_layout()
plt.show()

# %% [markdown]
# Untrained, the objectness scores are random, so the top-$k$ is a random choice of
# proposals. To see what the first stage learns we train the model a few dozen steps on
# one picture (the bus, labels bus = 0 and person = 1), with the full set loss: final,
# auxiliary and **encoder** (`_enc`) terms. The encoder loss matches all $S$ proposals to
# the objects with every label replaced by 0, so channel 0 learns "object or not".

# %%
example = load_example(1)
names = sorted(set(example.labels))
TRAIN_SHORT = 96 if SMALL else 128
to_train_input = Compose([Resize(TRAIN_SHORT, max_size=TRAIN_SHORT * 3 // 2), Normalize()])
batch = collate([example_to_sample(example, to_train_input, names)])
train_images, train_mask, train_targets = batch
criterion = build_criterion(cfg)
STEPS = 3 if SMALL else 40
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
history = []
start = time.perf_counter()
train_one_epoch(model.train(), criterion, optimizer, [batch] * STEPS, epoch=0,
                num_steps=STEPS, progress=False,
                on_step=lambda epoch, step, values: history.append(values))
print(f"{STEPS} steps in {time.perf_counter() - start:.1f} s: loss {history[0]['loss']:.2f} "
      f"-> {history[-1]['loss']:.2f}; encoder terms: " +
      ", ".join(f"{key} {history[-1][key]:.3f}" for key in history[-1]
                if key.startswith("loss") and key.endswith("_enc")))

# %% [markdown]
# ## 3. What the first stage learned
#
# Top: the objectness $\sigma(x_{s,0})$ of every token, level by level. Bottom left: the
# top-$k$ proposals, i.e. the decoder's initial reference boxes (ground truth dashed
# white). Bottom right: for the queries matched to the two objects, the proposal they
# started from (dashed yellow) and the box the decoder made of it (red).

# %%
model.eval()
with no_grad():
    trained = model(train_images, train_mask)
    srcs_t, masks_t, pos_t = model.project_features(train_images, train_mask)
    out_t = model.transformer(srcs_t, masks_t, pos_t)
shapes_t = model.transformer.flatten_levels(srcs_t, masks_t, pos_t)[3]
starts_t = np.concatenate([[0], np.cumsum(shapes_t[:, 0] * shapes_t[:, 1])[:-1]])
objectness = 1 / (1 + np.exp(-trained["enc_outputs"]["pred_logits"].data[0, :, 0]))   # (S,)
extent = example.image.shape[:2]

fig = plt.figure(figsize=(12, 5.4))
grid = fig.add_gridspec(2, 2 * L)
for l in range(L):
    Hl, Wl = shapes_t[l]
    ax = fig.add_subplot(grid[0, 2 * l:2 * l + 2])
    viz.show_map(ax, objectness[starts_t[l]:starts_t[l] + Hl * Wl].reshape(Hl, Wl),
                 f"objectness, level {l} ({Hl} x {Wl})", cmap="magma")
ax = fig.add_subplot(grid[1, :L])
vm.show_image(ax, example.image, title=f"after {STEPS} steps: the top-{k} proposals "
                                       f"(decoder's initial boxes)")
vm.draw_boxes(ax, out_t.init_reference.data[0], extent, colour="yellow", linewidth=1)
vm.draw_boxes(ax, train_targets[0]["boxes"], extent, colour="white", linestyle="--")
ax = fig.add_subplot(grid[1, L:])
pred_idx, tgt_idx = criterion.matcher(trained, train_targets)[0]
vm.show_image(ax, example.image, title="the matched queries: proposal (dashed) -> final box")
vm.draw_boxes(ax, out_t.init_reference.data[0, pred_idx], extent, colour="yellow",
              linestyle="--")
vm.draw_boxes(ax, trained["pred_boxes"].data[0, pred_idx], extent, colour="tab:red",
              labels=[names[train_targets[0]["labels"][t]] for t in tgt_idx])
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Queries from proposals
#
# A two-stage model has no `query_embed` and no `reference_points` layer: both parts of a
# query come from its proposal box (`get_proposal_pos_embed`). Each of the four
# coordinates $p = \sigma(\text{logit}) \cdot 2\pi$ is encoded with $F = C/2$ sinusoids,
#
# $$
# \text{channel } 2i: \sin\big(p / T^{2i/F}\big), \qquad
# \text{channel } 2i + 1: \cos\big(p / T^{2i/F}\big), \qquad T = 10000,
# $$
#
# the four blocks in $(c_x, c_y, w, h)$ order: $2C$ channels. Then `pos_trans` (Linear
# $2C \to 2C$) and `pos_trans_norm` (LayerNorm); the first $C$ channels are `query_pos`,
# the last $C$ the content `tgt`. We rebuild the queries and run the first decoder layer
# on them.

# %%
topk_logits_t = np.log(out_t.init_reference.data / (1 - out_t.init_reference.data))   # (1, k, 4)
embedding = get_proposal_pos_embed(topk_logits_t, C // 2)                  # (1, k, 2C)
p = out_t.init_reference.data * 2 * np.pi                                  # (1, k, 4)
F_half = C // 2
i2 = 2 * (np.arange(F_half) // 2)
angles = p[..., None] / 10000.0 ** (i2 / F_half)                           # (1, k, 4, F)
by_formula = np.where(np.arange(F_half) % 2 == 0, np.sin(angles), np.cos(angles))
assert_allclose(embedding, by_formula.reshape(1, k, 4 * F_half), 2e-4, 2e-4,
                what="proposal embedding")
with no_grad():
    query = transformer.pos_trans_norm(transformer.pos_trans(Tensor(embedding)))
    query_pos, tgt = F.split(query, [C, C], axis=2)                        # (1, k, C) each
    (src_t, maskf_t, lvl_t, _, _, ratios_t) = transformer.flatten_levels(srcs_t, masks_t, pos_t)
    memory_t = transformer.encoder(src_t, shapes_t, starts_t, ratios_t, lvl_t, maskf_t)
    ref_in = out_t.init_reference.data[:, :, None] * np.concatenate([ratios_t, ratios_t],
                                                                    -1)[:, None]  # (1, k, L, 4)
    h0 = transformer.decoder.layers[0](tgt, query_pos, ref_in, memory_t, shapes_t, starts_t,
                                       maskf_t)
assert_allclose(h0.data, out_t.hs.data[0], 1e-4, 1e-5,
                what="decoder layer 0 on the proposal queries")
print(f"proposal embedding {embedding.shape} -> pos_trans -> query_pos {query_pos.shape}, "
      f"tgt {tgt.shape}; decoder layer 0 reproduced")

# %% [markdown]
# ## 5. Where the gradient stops
#
# The top-$k$ box logits are detached, so the decoder's losses never reach the proposal
# head through the queries (and the top-$k$ choice itself is discrete). The proposal
# head, `enc_output` and `enc_output_norm` learn from the encoder loss (`_enc`) alone.

# %%
def grad_norm(module):
    """The L2 norm of the gradients of a module's parameters (0 if none has a gradient)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))) if grads else 0.0


parts = {"proposal class head": model.class_embed[head],
         "proposal box head": model.bbox_embed[head], "enc_output": transformer.enc_output,
         "pos_trans": transformer.pos_trans, "decoder": transformer.decoder.layers,
         "encoder": transformer.encoder}
norms = {}
for loss_name, keep in (("decoder losses only", lambda key: not key.endswith("_enc")),
                        ("encoder loss only", lambda key: key.endswith("_enc"))):
    model.zero_grad()
    losses = criterion(model(train_images, train_mask), train_targets)
    total = sum(losses[key] * w for key, w in criterion.weight_dict.items()
                if key in losses and keep(key))
    total.backward()
    norms[loss_name] = {name: grad_norm(m) for name, m in parts.items()}
print(f"{'gradient norm from':<22}" + "".join(f"{name:>21}" for name in norms))
for name in parts:
    print(f"{name:<22}" + "".join(f"{norms[n][name]:>21.2e}" for n in norms))

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/09_two_stage.py](solutions/09_two_stage.py).
#
# 1. **Predict.** How many of the proposals of one *unpadded* $800 \times 1066$ image (the
#    paper's four levels, $100 \times 134$ to $13 \times 17$) are invalid, and on which
#    levels? Check with `encoder_output_proposals`.
# 2. **Predict, then prove.** The paper's first stage has a *binary* foreground head; the code
#    ranks by channel 0 of a full class head. Show that channel 0 is that binary head:
#    randomise channels $1, 2, \dots$ of the proposal head and compare the selected boxes; and
#    show that with every target relabelled 0 the focal loss only pushes channels
#    $1, 2, \dots$ down.
# 3. **Predict.** No NMS is applied before the second stage. What is the largest IoU between
#    two *untrained* proposals (same level neighbours? a small box inside a larger one of the
#    next level?), and would NMS at IoU 0.5 remove any of them? Implement greedy NMS to
#    check.
# 4. **Predict.** How many class and box heads does the two-stage model have, are any of them
#    shared, and what are their size biases? Why is the $-2$ of notebook 7 gone?

# %% [markdown]
# ## Checks

# %%
assert proposals.shape == (N, S, 4) and valid.shape == (N, S) and valid.dtype == bool
assert not valid[mask_flatten].any(), "padded tokens never propose"
assert out.init_reference.shape == (N, k, 4)
assert out.enc_outputs_class.shape == (N, S, cfg.num_classes)
assert outputs["enc_outputs"]["pred_boxes"].shape == (N, S, 4)
keys = model.state_dict()
assert "query_embed.weight" not in keys and "transformer.reference_points.weight" not in keys
assert "transformer.pos_trans.weight" in keys and "transformer.enc_output.weight" in keys
assert out_t.hs.shape == (cfg.dec_layers, 1, k, C)
dec, enc = norms["decoder losses only"], norms["encoder loss only"]
assert dec["proposal class head"] == dec["proposal box head"] == dec["enc_output"] == 0, dec
assert enc["proposal class head"] > 0 and enc["proposal box head"] > 0 and enc["enc_output"] > 0
assert dec["pos_trans"] > 0 and enc["pos_trans"] == 0, "queries are built from detached boxes"
assert np.isfinite(history[-1]["loss"]) and history[-1]["loss"] < history[0]["loss"]
print("all checks passed")
