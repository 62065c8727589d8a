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
# # 7. The decoder and box prediction
#
# **Paper:** Deformable DETR, §4.1 (the deformable transformer decoder) and Appendix A.3
# (bounding box prediction). The decoder keeps DETR's self-attention among the object
# queries and replaces only the cross-attention by multi-scale deformable attention,
# Eq. (3). Each query's reference point $\hat p_q$ (a normalised 2-d point) is predicted
# from its query embedding by a linear layer and a sigmoid. It is also the initial guess
# of the box centre: the detection head predicts offsets relative to it,
#
# $$
# \hat b_q = \big\{\sigma\big(b_{qx} + \sigma^{-1}(\hat p_{qx})\big),\
#                  \sigma\big(b_{qy} + \sigma^{-1}(\hat p_{qy})\big),\
#                  \sigma(b_{qw}),\ \sigma(b_{qh})\big\}.
# $$
#
# This notebook computes:
#
# 1. the object queries and their reference points;
# 2. one decoder layer, step by step (self-attention, deformable cross-attention, FFN);
# 3. the heads: boxes relative to the reference through the inverse sigmoid;
# 4. what the initialisation makes of it, and why logit space.
#
# **Doc:** [model.md](../docs/model.md) §3–5. **Code:**
# `minidetr/models/deformable_transformer.py` (`DeformableTransformerDecoderLayer`,
# `DeformableTransformerDecoder`, `box_from_reference`), `deformable_detr.py`
# (`DeformableDETR.forward`), `box_ops.py` (`inverse_sigmoid`).
#
# The model is the **untrained** `tiny` preset ($N_q = 20$ queries, 2 decoder layers,
# single-stage, no refinement), in evaluation mode: everything here is about how the
# numbers flow, which training does not change (notebooks 8 and 11 train).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import build_model, get_config, inverse_sigmoid
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %%
SHORT = 120 if SMALL else 250
to_model_input = Compose([Resize(SHORT, max_size=SHORT * 3 // 2), Normalize()])
examples = [load_example(1), load_example(0)]          # a bus (landscape), giraffes (portrait)
images, mask, targets = collate([example_to_sample(ex, to_model_input) for ex in examples])
sizes = [tuple(int(v) for v in t["size"]) for t in targets]       # valid (h, w) per image
cfg = get_config("tiny", seed=SEED)
model = build_model(cfg).eval()
transformer = model.transformer
with no_grad():
    srcs, masks, pos_embeds = model.project_features(images, mask)
    (src, mask_flatten, pos, spatial_shapes, level_start_index,
     valid_ratios) = transformer.flatten_levels(srcs, masks, pos_embeds)
    memory = transformer.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos,
                                 mask_flatten)
    out = transformer(srcs, masks, pos_embeds, model.query_embed.weight)
N, S, C = memory.shape
L, strides = len(spatial_shapes), model.backbone.strides
print(f"memory {memory.shape}; decoder outputs hs {out.hs.shape} = (layers, N, Nq, C)")

# %% [markdown]
# ## 1. Object queries and reference points
#
# `query_embed` is an $(N_q, 2C)$ embedding: its first $C$ channels are the positional
# part `query_pos`, the last $C$ the content `tgt`, the same for every image. The initial
# reference point of each query is *learned*:
#
# $$ \hat p_q = \sigma(W_r\, \text{query\_pos}_q + b_r) \in (0, 1)^2, $$
#
# normalised to the **valid** image, so on the padded giraffe picture the same points
# spread over the image only, not over its padding.

# %%
query_pos, tgt = F.split(model.query_embed.weight, [C, C], axis=1)      # (Nq, C) each
Nq = query_pos.shape[0]
with no_grad():
    reference = F.sigmoid(transformer.reference_points(query_pos))       # (Nq, 2)
print(f"query_embed {model.query_embed.weight.shape} -> query_pos {query_pos.shape}, "
      f"tgt {tgt.shape}; reference points {reference.shape}")
for b in range(N):
    assert_allclose(out.init_reference.data[b], reference.data, 1e-6, 1e-7,
                    what=f"init_reference of image {b}")

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for b, ax in enumerate(axes):
    vm.show_image(ax, images[b], mask[b], title=f"image {b}: the {Nq} reference points")
    vm.draw_points(ax, reference.data, sizes[b], colour="yellow", size=25, edgecolors="black")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. One decoder layer, step by step
#
# Three post-norm blocks (`DeformableTransformerDecoderLayer`; the official names put
# `norm2` first):
#
# $$
# \begin{aligned}
# t &\leftarrow \mathrm{LN}_2\big(t + \mathrm{MHA}(q = k = t + \text{qpos},\ v = t)\big) && \text{the queries talk to each other}\\
# t &\leftarrow \mathrm{LN}_1\big(t + \mathrm{MSDeformAttn}(t + \text{qpos},\ \hat p \odot r,\ \text{memory})\big) && \text{each query reads the image around } \hat p\\
# t &\leftarrow \mathrm{LN}_3\big(t + W_2\,\mathrm{ReLU}(W_1 t + b_1) + b_2\big) && \text{feed-forward}
# \end{aligned}
# $$
#
# The reference goes into the cross-attention in each level's padded coordinates: times
# the valid ratios $r$ of notebook 6.

# %%
layer = transformer.decoder.layers[0]
qpos = F.expand(query_pos[None], (N, Nq, C))                               # (N, Nq, C)
t = F.expand(tgt[None], (N, Nq, C))                                        # (N, Nq, C)
ref_in = reference.data[None, :, None] * valid_ratios[:, None]             # (N, Nq, L, 2)
with no_grad():
    self_attn, _ = layer.self_attn(t + qpos, t + qpos, t)                 # (N, Nq, C)
    t = layer.norm2(t + self_attn)
    cross_query = t + qpos
    locations, weights = layer.cross_attn.sampling_locations_and_weights(
        cross_query, ref_in, spatial_shapes)                               # (N, Nq, M, L, K, 2)
    cross_attn = layer.cross_attn(cross_query, ref_in, memory, spatial_shapes,
                                  level_start_index, mask_flatten)         # (N, Nq, C)
    t = layer.norm1(t + cross_attn)
    t = layer.norm3(t + layer.linear2(F.relu(layer.linear1(t))))          # (N, Nq, C)
assert_allclose(t.data, out.hs.data[0], 1e-5, 1e-6, what="decoder layer 0, step by step")
print(f"step by step == hs[0], the first decoder layer's output {t.shape}; "
      f"cross-attention samples {locations.shape} = (N, Nq, M, L, K, 2)")

# %% [markdown]
# Where one query reads the memory: its $M \times L \times K$ sampling points around its
# reference point on every level (colour = level; area = attention weight). Untrained,
# this is the initial pattern of notebook 6; notebook 8 shows how a box reference
# spreads the points over the box.

# %%
b, q = 0, int(np.argmin(np.abs(reference.data - [0.5, 0.45]).sum(-1)))   # a central query
fig, ax = plt.subplots(figsize=(5.5, 4.6))
vm.show_image(ax, images[b], mask[b], title=f"image {b}, query {q}: decoder layer 0 samples")
vm.draw_sampling_points_on_image(
    ax, locations.data[b, q], weights.data[b, q],
    [(h * s, w * s) for (h, w), s in zip(spatial_shapes, strides)],
    reference=reference.data[q], reference_extent_hw=sizes[b])
ax.legend(fontsize=7, loc="lower right")
plt.show()

# %% [markdown]
# ## 3. The heads: a box relative to the reference
#
# Every decoder layer $i$ gets a class head (`class_embed[i]`, a Linear to `num_classes`
# logits, no background logit: the focal loss of notebook 10 treats each class as a binary
# problem) and a box head (`bbox_embed[i]`, a 3-layer MLP). The box head does not output a
# box but a correction $\delta$ in **logit space** to the reference $r_i$ that entered
# layer $i$ (`box_from_reference`):
#
# $$
# \hat b_i = \sigma\big(\delta_i + \sigma^{-1}(r_i)\big), \qquad
# \sigma^{-1}(x) = \log\frac{\max(x, \epsilon)}{\max(1 - x, \epsilon)},\ \epsilon = 10^{-5},
# $$
#
# where a 2-d reference offsets only the centre logits (the size logits are $\delta$'s
# own). We recompute the model's outputs from the decoder's `hs` and compare.

# %%
with no_grad():
    outputs = model(images, mask)
    boxes, logits = [], []
    for i in range(out.hs.shape[0]):
        r_i = out.init_reference if i == 0 else out.inter_references[i - 1]   # (N, Nq, 2)
        delta = model.bbox_embed[i](out.hs[i])                             # (N, Nq, 4)
        boxes.append(box_from_reference(delta, r_i))                       # (N, Nq, 4)
        logits.append(model.class_embed[i](out.hs[i]))                     # (N, Nq, classes)
    by_hand = F.sigmoid(F.concat([delta[..., :2] + inverse_sigmoid(r_i), delta[..., 2:]], -1))
assert_allclose(boxes[-1].data, outputs["pred_boxes"].data, 1e-6, 1e-7, what="pred_boxes")
assert_allclose(logits[-1].data, outputs["pred_logits"].data, 1e-6, 1e-7, what="pred_logits")
assert_allclose(boxes[0].data, outputs["aux_outputs"][0]["pred_boxes"].data, 1e-6, 1e-7,
                what="aux_outputs[0] boxes")
assert_allclose(by_hand.data, boxes[-1].data, 1e-6, 1e-7, what="the formula, written out")
print(f"pred_logits {outputs['pred_logits'].shape}, pred_boxes {outputs['pred_boxes'].shape} "
      f"(cxcywh in (0, 1)), {len(outputs['aux_outputs'])} aux output(s)")

# %% [markdown]
# ## 4. The initialisation, and why logit space
#
# The last layer of every box head starts at **zero**, with bias $-2$ on the size logits,
# so at initialisation $\delta = (0, 0, -2, -2)$ for every query: each first box is
# centred *exactly* on its reference point, with $w = h = \sigma(-2) \approx 0.12$. This is
# the code's version of the paper's initial box $b^0_q = (\hat p_{qx}, \hat p_{qy}, 0.1, 0.1)$
# (appendix A.4): the reference stays a 2-d point for the first layer and the $-2$ bias
# supplies a size close to 0.1 ($\sigma^{-1}(0.1) \approx -2.2$; exercise 1). The
# class heads' bias starts at $-\log((1 - 0.01) / 0.01) \approx -4.6$ (their weights are
# random), so every class starts near probability 0.01, which keeps the focal loss of the
# many unmatched queries small.

# %%
delta = model.bbox_embed[0](out.hs[0]).data                               # (N, Nq, 4)
print("delta of a few queries:", np.round(delta[0, :3], 4).tolist())
assert np.array_equal(delta, np.broadcast_to(np.float32([0, 0, -2, -2]), delta.shape))
first = outputs["pred_boxes"].data
assert_allclose(first[..., :2], np.broadcast_to(reference.data, (N, Nq, 2)), 1e-6, 1e-6,
                what="initial box centres = reference points")
assert_allclose(first[..., 2:], np.full((N, Nq, 2), 1 / (1 + np.e ** 2)), 1e-6, 0,
                what="initial box size sigmoid(-2)")
prob = 1 / (1 + np.exp(-outputs["pred_logits"].data))
print(f"class bias {model.class_embed[0].bias.data[0]:.4f}; initial class probabilities "
      f"{prob.min():.4f} .. {prob.max():.4f}, median {np.median(prob):.4f}")
assert np.allclose(model.class_embed[0].bias.data, -np.log(0.99 / 0.01))
assert 0.001 < np.median(prob) < 0.05

fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
for b, ax in enumerate(axes):
    vm.show_image(ax, images[b], mask[b], title=f"image {b}: the {Nq} initial boxes")
    vm.draw_boxes(ax, first[b], sizes[b], colour="yellow", linewidth=1)
    vm.draw_points(ax, reference.data, sizes[b], colour="yellow", size=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# **Why logit space.** Adding $\delta$ to $\sigma^{-1}(r)$ and squashing back keeps every
# box inside $(0, 1)$ whatever the head outputs, $\delta = 0$ reproduces the reference
# exactly, and the same $\delta$ is a big move in the middle of the image and a small one
# near its border. Any target box is reachable from any reference: with
# $\delta = \sigma^{-1}(b^*) - \sigma^{-1}(r)$ on the centre (and $\sigma^{-1}(b^*)$ on
# the size) the head reproduces $b^*$. So the head learns a *residual* with respect to
# the point where the decoder sampled its features: the box is predicted where the
# attention looked.

# %%
target = np.float32([[0.3, 0.6, 0.25, 0.4]])                               # cx, cy, w, h
r = np.float32([[0.55, 0.5]])                                              # a 2-d reference
# centre: logit(target) - logit(reference); size: logit(target) (a 2-d reference has no size)
delta_star = inverse_sigmoid(target) - np.concatenate([inverse_sigmoid(r),
                                                       np.zeros((1, 2), np.float32)], -1)
reached = box_from_reference(Tensor(delta_star), Tensor(r)).data
assert_allclose(reached, target, 1e-5, 1e-6, what="the delta that reaches a target box")
print(f"delta* = {np.array2string(delta_star[0], precision=3)} takes the reference "
      f"{np.array2string(r[0], precision=3)} to {np.array2string(reached[0], precision=3)}")
print("inverse_sigmoid at 0, 1e-7, 0.5, 1:",
      np.array2string(inverse_sigmoid(np.float32([0, 1e-7, 0.5, 1])), precision=3))

d = np.linspace(-6, 6, 121)
fig, ax = plt.subplots(figsize=(5.5, 3))
for r0 in (0.05, 0.3, 0.5, 0.9):
    centre = box_from_reference(Tensor(np.stack([d, np.zeros_like(d), d * 0, d * 0], -1)),
                                Tensor(np.stack([np.full_like(d, r0), np.full_like(d, 0.5)], -1)))
    ax.plot(d, centre.data[:, 0], label=f"reference {r0}")
ax.axvline(0, color="0.6", linewidth=0.8)
ax.set_xlabel(r"$\delta_x$ (head output)")
ax.set_ylabel(r"$\hat b_x = \sigma(\delta_x + \sigma^{-1}(r_x))$")
ax.set_title("the box centre as the head's output moves", fontsize=9)
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/07_decoder_and_boxes.py](solutions/07_decoder_and_boxes.py).
#
# 1. **Predict.** The paper's initial box is $b^0_q = (\hat p_{qx}, \hat p_{qy}, 0.1, 0.1)$; the
#    code's first boxes have size $\sigma(-2) \approx 0.119$. Which size bias reproduces the
#    paper's $b^0$ exactly? Set it in `bbox_embed[0]` and check the first layer's boxes.
# 2. **Break something.** Predict the boxes as $\sigma(\delta)$, without adding
#    $\sigma^{-1}(r)$. Where are all the initial boxes now, and which check of section 4
#    fails?
# 3. **Predict.** The focal loss of 300 unmatched queries $\times$ 91 classes at
#    initialisation (per ground-truth box), with the class bias $-\log 99$ and with bias 0.
#    How many times larger is the second? Compute it by hand from
#    $\alpha_t (1 - p_t)^2\, \mathrm{BCE}$, then with `sigmoid_focal_loss`.
# 4. **Predict.** With refinement or two-stage the decoder's reference is a *box*
#    $(c_x, c_y, w, h)$, and offsets become fractions of it: $\Delta p / K \cdot (w, h)/2$.
#    Where do the $K$ initial points of head 0 (direction $(1, 0)$) land, on each level? And
#    with a 2-d reference?

# %% [markdown]
# ## Checks

# %%
assert out.hs.shape == (cfg.dec_layers, N, cfg.num_queries, cfg.d_model)
assert out.init_reference.shape == (N, cfg.num_queries, 2)
assert out.inter_references.shape == (cfg.dec_layers, N, cfg.num_queries, 2)
assert np.array_equal(out.inter_references.data[-1], out.init_reference.data), \
    "without refinement the reference stays the learned r_0 in every layer"
assert outputs["pred_logits"].shape == (N, cfg.num_queries, cfg.num_classes)
assert outputs["pred_boxes"].shape == (N, cfg.num_queries, 4)
assert ((outputs["pred_boxes"].data > 0) & (outputs["pred_boxes"].data < 1)).all()
assert locations.shape[2:] == (cfg.nheads, cfg.num_feature_levels, cfg.n_points, 2)
assert model.class_embed[0] is model.class_embed[1], "plain variant: one head shared by all layers"
print("all checks passed")
