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
# # 8. Iterative bounding-box refinement
#
# **Paper:** Deformable DETR, §4.2 (iterative bounding box refinement) and Appendix A.4:
# each decoder layer refines the boxes predicted by the previous one. With $\hat b^{d-1}$
# the box predicted by layer $d - 1$ and $\Delta b^d$ the output of layer $d$'s box head,
#
# $$
# \hat b^{d} = \sigma\big(\Delta b^{d} + \sigma^{-1}(\hat b^{d-1})\big),
# $$
#
# and the new box is the reference of the next layer: its cross-attention samples around
# it, with offsets scaled by the box size. The paper blocks the gradient at
# $\sigma^{-1}(\hat b^{d-1})$ to stabilise training. This notebook:
#
# 1. shows that the untrained refinement heads start as the identity;
# 2. trains the `tiny` model a few dozen steps on one picture so the boxes move;
# 3. draws the boxes of one query after every decoder layer;
# 4. shows the gradient flow: why and where the references are detached.
#
# **Doc:** [model.md](../docs/model.md) §5–6. **Code:**
# `minidetr/models/deformable_transformer.py` (`DeformableTransformerDecoder.forward`,
# `box_from_reference`) and `deformable_detr.py` (`DeformableDETR.forward`).

# %%
import os
import time

import matplotlib.pyplot as plt
import numpy as np

from minidetr.autograd import no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import (box_cxcywh_to_xyxy, build_criterion, build_model,
                             elementwise_generalized_box_iou, get_config)
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.optim import AdamW
from minidetr.testing import assert_allclose
from minidetr.training.engine import train_one_epoch

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# The model: the `tiny` preset with refinement and 4 decoder layers instead of 2 (so
# there is a trajectory to draw), without dropout. The data: one picture, a bus and a
# person, with the labels 0 and 1 of the `tiny` model's 5 classes.

# %%
cfg = get_config("tiny", "refine", dec_layers=4, dropout=0.0, seed=SEED)
model = build_model(cfg)
criterion = build_criterion(cfg)

example = load_example(1)
names = sorted(set(example.labels))                              # ["bus", "person"]
SHORT = 96 if SMALL else 128
to_model_input = Compose([Resize(SHORT, max_size=SHORT * 3 // 2), Normalize()])
batch = collate([example_to_sample(example, to_model_input, names)])
images, mask, targets = batch
extent = example.image.shape[:2]              # draw the normalised boxes on the full picture
print(f"input {images.shape}; targets: {[names[i] for i in targets[0]['labels']]}, boxes "
      f"(cxcywh) {np.array2string(targets[0]['boxes'], precision=3)}")
print(f"heads: {len(model.bbox_embed)} independent box heads, the decoder holds the same "
      f"list: {model.transformer.decoder.bbox_embed is model.bbox_embed}")

# %% [markdown]
# ## 1. At initialisation the refinement is the identity
#
# Layer 0's box head starts at $\delta = (0, 0, -2, -2)$: a box of size
# $\sigma(-2) \approx 0.12$ centred on the learned 2-d reference point. Every later head
# starts at $\delta = 0$ (only copy 0 keeps the $-2$ size bias), so
# $\sigma(0 + \sigma^{-1}(\hat b^{d-1})) = \hat b^{d-1}$: each layer is asked "improve
# this box" and starts by changing nothing. All layers' boxes coincide.

# %%
with no_grad():
    outputs = model(images, mask)
per_layer = [aux["pred_boxes"].data for aux in outputs["aux_outputs"]] + \
    [outputs["pred_boxes"].data]                                           # layers x (1, Nq, 4)
for d, boxes in enumerate(per_layer):
    assert_allclose(boxes, per_layer[0], 1e-5, 1e-6, what=f"layer {d} box = layer 0 box")
print(f"untrained: the {len(per_layer)} layers predict the same boxes, e.g. query 0: "
      f"{np.array2string(per_layer[0][0, 0], precision=3)}")

# %% [markdown]
# ## 2. A few dozen training steps on one picture
#
# To see the refinement at work we overfit this one picture (the real recipe is in
# notebook 11): the set loss of notebook 10 on all 4 layers, AdamW with a learning rate
# of $3 \cdot 10^{-3}$ (the paper's $2 \cdot 10^{-4}$ is for long runs on COCO), gradient
# clipping at 0.1, through `minidetr.training.engine.train_one_epoch`. We stop once early on, to
# look at the boxes while the layers still disagree, then train on.

# %%
EARLY, STEPS = (2, 3) if SMALL else (13, 40)
optimizer = AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
history = []


def train(steps):
    start = time.perf_counter()
    train_one_epoch(model.train(), criterion, optimizer, [batch] * steps, epoch=0,
                    num_steps=steps, progress=False,
                    on_step=lambda epoch, step, values: history.append(values))
    print(f"{steps} steps in {time.perf_counter() - start:.1f} s; loss now "
          f"{history[-1]['loss']:.2f} (step 1: {history[0]['loss']:.2f})")


def boxes_after_every_layer():
    """Eval-mode forward: every layer's boxes (layers, 1, Nq, 4), the learned reference
    points (Nq, 2) and the matching of the final layer."""
    model.eval()
    with no_grad():
        outputs = model(images, mask)
        query_pos = model.query_embed.weight[:, :cfg.d_model]             # (Nq, C)
        reference = model.transformer.reference_points(query_pos).sigmoid().data
    boxes = np.stack([aux["pred_boxes"].data for aux in outputs["aux_outputs"]] +
                     [outputs["pred_boxes"].data])
    return boxes, reference, criterion.matcher(outputs, targets)[0]


train(EARLY)
snapshots = {f"after {EARLY} steps": boxes_after_every_layer()}
train(STEPS - EARLY)
snapshots[f"after {STEPS} steps"] = boxes_after_every_layer()

fig, ax = plt.subplots(figsize=(5.5, 2.8))
for d in range(cfg.dec_layers):
    key = "loss_bbox" if d == cfg.dec_layers - 1 else f"loss_bbox_{d}"
    ax.plot(np.arange(1, STEPS + 1), [h[key] for h in history], label=f"layer {d}")
ax.axvline(EARLY, color="0.5", linestyle=":", linewidth=1)
ax.set_xlabel("step")
ax.set_ylabel("L1 box loss")
ax.legend(fontsize=7)
ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The box of one query after every decoder layer
#
# The matcher pairs each object with one query. For that query we draw its learned
# reference point $\hat p$ (a white cross) and its box after each layer, from dark
# (layer 0) to bright (layer 3); the ground truth is dashed white. Early in training the
# later layers correct the earlier ones; after more steps every layer, trained by its own
# loss, has learned to land close to the object and the boxes nearly coincide. The table
# gives the numbers: L1 distance to the target and GIoU per layer.

# %%
fig, axes = plt.subplots(len(snapshots), 2, figsize=(10, 3.5 * len(snapshots)))
for row, (when, (layer_boxes, reference, (pred_idx, tgt_idx))) in enumerate(snapshots.items()):
    print(f"{when}:\n{'object':>8} {'query':>5}  " +
          "  ".join(f"L1 / GIoU layer {d}" for d in range(cfg.dec_layers)))
    for ax, q, t in zip(axes[row], pred_idx, tgt_idx):
        name = names[targets[0]["labels"][t]]
        target_box = targets[0]["boxes"][t]
        trajectory = layer_boxes[:, 0, q]                                  # (layers, 4)
        l1 = np.abs(trajectory - target_box).sum(-1)                       # (layers,)
        giou = elementwise_generalized_box_iou(
            box_cxcywh_to_xyxy(trajectory),
            box_cxcywh_to_xyxy(np.repeat(target_box[None], len(trajectory), 0)))
        print(f"{name:>8} {q:>5}  " + "  ".join(f"{a:.3f} / {g:+.3f}   " for a, g in zip(l1, giou)))
        vm.show_image(ax, example.image, title=f"{when}: {name}, query {q}")
        vm.draw_box_trajectory(ax, trajectory, extent, target=target_box,
                               labels=[f"after layer {d}" for d in range(cfg.dec_layers)])
        vm.draw_points(ax, reference[q], extent, colour="white", size=60, marker="x",
                       label="reference point")
        ax.legend(fontsize=6, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# The refinement equation itself: the reference after layer $d$ (`inter_references[d]`,
# what layer $d + 1$ samples around) *is* the box that layer $d$ predicts.

# %%
model.eval()
with no_grad():
    srcs, masks, pos = model.project_features(images, mask)
    out = model.transformer(srcs, masks, pos, model.query_embed.weight)
layer_boxes, reference, (pred_idx, tgt_idx) = snapshots[f"after {STEPS} steps"]
assert_allclose(out.init_reference.data[0], reference, 1e-6, 1e-7, what="learned reference")
for d in range(cfg.dec_layers):
    assert_allclose(out.inter_references.data[d], layer_boxes[d], 1e-5, 1e-6,
                    what=f"reference after layer {d} = box of layer {d}")
print(f"inter_references {out.inter_references.shape}: reference after layer d == box of layer d")

# %% [markdown]
# With a box as reference, the cross-attention of layer $d$ samples *inside the current
# box estimate*: the offsets are fractions of the box size,
# $\text{loc} = (c_x, c_y) + \frac{\Delta p}{K} \cdot \frac{(w, h)}{2}$, so the sampling
# follows the box as it is refined. The last layer's sampling points for each object's
# query (colour = level, area = weight), around the box that layer 2 predicted (dashed):

# %%
d = cfg.dec_layers - 1
layer = model.transformer.decoder.layers[d]
C = cfg.d_model
spatial_shapes, valid_ratios = model.transformer.flatten_levels(srcs, masks, pos)[3::2]
query_pos = model.query_embed.weight.data[None, :, :C]                     # (1, Nq, C)
with no_grad():
    t = out.hs[d - 1]                                      # the input of the last layer
    self_attn, _ = layer.self_attn(t + query_pos, t + query_pos, t)
    t = layer.norm2(t + self_attn)                                         # (1, Nq, C)
    ref_in = out.inter_references.data[d - 1][:, :, None] * \
        np.concatenate([valid_ratios, valid_ratios], -1)[:, None]          # (1, Nq, L, 4)
    locations, weights = layer.cross_attn.sampling_locations_and_weights(
        t + query_pos, ref_in, spatial_shapes)                             # (1, Nq, M, L, K, 2)
scale = np.array(extent) / np.array(images.shape[2:])                      # picture / input
level_extents = [tuple(np.array([h * s, w * s]) * scale)
                 for (h, w), s in zip(spatial_shapes, model.backbone.strides)]
fig, axes = plt.subplots(1, len(pred_idx), figsize=(5 * len(pred_idx), 3.8))
for ax, q, t_i in zip(np.atleast_1d(axes), pred_idx, tgt_idx):
    vm.show_image(ax, example.image, title=f"{names[targets[0]['labels'][t_i]]}: layer {d} "
                                           f"samples around the layer-{d - 1} box")
    vm.draw_sampling_points_on_image(ax, locations.data[0, q], weights.data[0, q],
                                     level_extents, reference=layer_boxes[d - 1, 0, q],
                                     reference_extent_hw=extent)
    ax.legend(fontsize=6, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Gradient flow: the references are detached
#
# After layer $d$ the decoder computes $\hat b^d$ under `no_grad()`, which gives the same
# numbers as computing it and calling `.detach()`: for autograd, the next layer's reference
# is a **constant**. `DeformableDETR.forward` recomputes $\hat b^d$ *with* gradient for
# layer $d$'s own loss. Consequences, checked below with a loss on the **final** layer only:
#
# * the box heads of layers 0–2 get **no** gradient: they are trained by their own
#   (auxiliary) losses alone;
# * the final head, and every decoder layer (through the query features $h$), do get one;
# * the learned initial reference point (`transformer.reference_points`) gets one too:
#   $\hat p$ is *not* detached, it is the sampling reference of layer 0.

# %%
def grad_norm(module):
    """The L2 norm of the gradients of a module's parameters (0 if none has a gradient)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(np.sqrt(sum((g.astype(np.float64) ** 2).sum() for g in grads))) if grads else 0.0


def final_layer_loss(outputs):
    """The weighted set loss of the final decoder layer alone (no auxiliary losses)."""
    final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    return criterion.total(criterion(final, targets))


model.zero_grad()
outputs = model(images, mask)
final_layer_loss(outputs).backward()
detached = {f"bbox_embed[{i}]": grad_norm(model.bbox_embed[i]) for i in range(cfg.dec_layers)}
rows = {**detached,
        **{f"class_embed[{i}]": grad_norm(model.class_embed[i]) for i in range(cfg.dec_layers)},
        **{f"decoder.layers[{i}]": grad_norm(model.transformer.decoder.layers[i])
           for i in range(cfg.dec_layers)},
        "transformer.reference_points": grad_norm(model.transformer.reference_points),
        "query_embed": grad_norm(model.query_embed),
        "encoder": grad_norm(model.transformer.encoder)}
print("\ngradient norms from the final layer's loss:")
for name, value in rows.items():
    print(f"  {name:<30} {value:.2e}")

# %% [markdown]
# **What detaching prevents.** Re-attach the box path by hand: chain the heads with
# gradient, $\hat b^d = \sigma(\Delta b^d + \sigma^{-1}(\hat b^{d-1}))$ from
# $\hat b^{-1} = \hat p$, with `retain_grad()` on every intermediate box. The values are
# the model's, but now the final loss reaches every box head through the earlier boxes.
# (This re-attaches only the box arithmetic; without the detach, a real model would also
# send gradient through the sampling locations of every later layer.)

# %%
model.zero_grad()
srcs, masks, pos = model.project_features(images, mask)
out = model.transformer(srcs, masks, pos, model.query_embed.weight)
print(f"with gradients on: init_reference requires grad {out.init_reference.requires_grad}, "
      f"inter_references require grad {out.inter_references.requires_grad}")
box = out.init_reference                                                   # (1, Nq, 2)
chained = []
for i in range(cfg.dec_layers):
    box = box_from_reference(model.bbox_embed[i](out.hs[i]), box).retain_grad()   # (1, Nq, 4)
    chained.append(box)
outputs = model(images, mask)
assert_allclose(box.data, outputs["pred_boxes"].data, 1e-5, 1e-6, what="re-attached chain")
model.zero_grad()
final_layer_loss({"pred_logits": model.class_embed[-1](out.hs[-1]), "pred_boxes": box}).backward()
attached = {f"bbox_embed[{i}]": grad_norm(model.bbox_embed[i]) for i in range(cfg.dec_layers)}
print("gradient reaching each intermediate box:",
      [f"{np.abs(b.grad).sum():.2e}" for b in chained])

fig, ax = plt.subplots(figsize=(6, 2.8))
x = np.arange(cfg.dec_layers)
ax.bar(x - 0.2, list(detached.values()), 0.4, label="references detached (the model)")
ax.bar(x + 0.2, list(attached.values()), 0.4, label="box path re-attached (counterfactual)")
ax.set_xticks(x, list(detached))
ax.set_ylabel("gradient norm")
ax.set_title("gradient of each box head from the final layer's loss", fontsize=9)
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Checks

# %%
assert layer_boxes.shape == (cfg.dec_layers, 1, cfg.num_queries, 4)
assert out.inter_references.shape == (cfg.dec_layers, 1, cfg.num_queries, 4)
assert not out.inter_references.requires_grad, "references must be constants for autograd"
assert all(detached[f"bbox_embed[{i}]"] == 0 for i in range(cfg.dec_layers - 1)), detached
assert detached[f"bbox_embed[{cfg.dec_layers - 1}]"] > 0
assert all(rows[f"decoder.layers[{i}]"] > 0 for i in range(cfg.dec_layers)), rows
assert rows["transformer.reference_points"] > 0, "the initial reference is learned"
assert all(v > 0 for v in attached.values()), attached
assert len({id(h) for h in model.bbox_embed}) == cfg.dec_layers, "independent heads"
assert np.isfinite(history[-1]["loss"]) and history[-1]["loss"] < history[0]["loss"]
print("all checks passed")
