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
# 2. measures whether refinement helps: the IoU of matched queries after every decoder
#    layer on held-out images, for a trained `refine` model against a trained `plain` one;
# 3. draws the boxes of one query after every decoder layer, and where the last layer
#    samples;
# 4. shows the gradient flow: why and where the references are detached.
#
# **Doc:** [model.md](../docs/model.md) §5–6. **Code:**
# `minidetr/models/deformable_transformer.py` (`DeformableTransformerDecoder.forward`,
# `box_from_reference`) and `deformable_detr.py` (`DeformableDETR.forward`).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import (box_cxcywh_to_xyxy, build_criterion, build_model,
                             elementwise_generalized_box_iou, get_config)
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# For §1 and §4, an untrained model: the `tiny` preset with refinement and 4 decoder
# layers instead of 2, without dropout, on one picture, a bus and a person, with the
# labels 0 and 1 of the `tiny` model's 5 classes. §2 and §3 open trained models.

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
# ## 2. Does refinement help? Per-layer IoU on held-out images
#
# The claim of refinement is that a later layer, starting from the box of the layer
# before, *improves* it. That is a statement about trained models and about images they
# have not seen, so we measure it there. Two `tiny` detectors (2 decoder layers, the
# preset) were trained with the same budget by `python -m minidetr.lessons.experiments`
# (notebook 16): `refine`, with iterative refinement, and `base`, the plain variant,
# whose layers all predict relative to the same learned reference point. Both are
# cached in `notebooks/cache/`. On held-out shapes images (another seed of the
# generator), for every object:
#
# * **tracked**: the query that the Hungarian matcher pairs with the object on the
#   *final* layer, followed back through the layers: the IoU of its box after each layer
#   (does the last layer improve the box of the same query?);
# * **own**: each layer matched on its own predictions, as its auxiliary loss is.

# %%
from minidetr.lessons import experiments as ex
from minidetr.lessons.trained import (held_out_shapes, layer_boxes, load_cached_model,
                                      per_layer_iou, record_sampling)

trained = {}
for variant, file in (("plain", "plain.npz"), ("refine", "refine.npz")):
    trained[variant] = load_cached_model(ex.CACHE / file)
NUM_HELD_OUT = 16 if SMALL else 200
held_out = held_out_shapes(ex.DATA.parent / "shapes-heldout", NUM_HELD_OUT, batch_size=25,
                           category_map=trained["refine"][2].category_map)
iou = {v: per_layer_iou(m, held_out, build_criterion(c).matcher)
       for v, (m, c, _) in trained.items()}
n_objects = iou["refine"]["tracked"].shape[1]
print(f"{NUM_HELD_OUT} held-out images, {n_objects} objects; mean IoU of the matched "
      f"query's box after each decoder layer:")
print(f"{'model':<8} {'matching':<9} " + " ".join(f"{'layer ' + str(d):>8}"
                                                for d in range(trained['refine'][1].dec_layers))
      + f" {'last - first':>13} {'share improved':>15}")
for v in trained:
    for kind in ("tracked", "own"):
        per_layer = iou[v][kind].mean(1)
        improved = float((iou[v][kind][-1] > iou[v][kind][0]).mean())
        print(f"{v:<8} {kind:<9} " + " ".join(f"{x:>8.3f}" for x in per_layer)
              + f" {per_layer[-1] - per_layer[0]:>+13.3f} {improved:>15.0%}")
for v in trained:
    share = float((iou[v]["tracked"][-1] > iou[v]["tracked"][0]).mean())
    z = (share - 0.5) / np.sqrt(0.25 / n_objects)      # against a coin flip per object
    print(f"{v}: the last layer improves the tracked box of {share:.0%} of the objects "
          f"({z:+.1f} standard errors from 50 %); final AP on its validation split during "
          f"training {trained[v][2].progress['history'][-1]['AP']:.3f}")

fig, ax = plt.subplots(figsize=(5.5, 3))
for v, colour in (("plain", "tab:blue"), ("refine", "tab:orange")):
    per_layer = iou[v]["tracked"].mean(1)
    ax.plot(np.arange(len(per_layer)), per_layer, "-o", color=colour, label=f"{v} (tracked)")
    ax.plot(np.arange(len(per_layer)), iou[v]["own"].mean(1), ":", color=colour,
            label=f"{v} (own matching)")
ax.set(xlabel="decoder layer", ylabel="mean IoU of matched queries",
       xticks=range(trained["refine"][1].dec_layers))
ax.grid(alpha=0.3)
ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# **What the numbers say.** In the trained `refine` model the second layer does improve
# the box of the same query, but only a little: the table shows a mean IoU gain of a few
# thousandths from layer 0 to layer 1, with more than half of the objects improved, several
# standard errors away from a coin flip. The `plain` model, whose layers do not feed each
# other boxes, gains less and improves about half of the objects, as chance would. Both
# models are early in training (150 steps, AP around 0.05, see notebook 16), so this is
# the first sign of the effect, not the paper's +1.6 AP (Table 1); the gain in the paper
# comes from 6 layers trained for 50 epochs. (An earlier version of this notebook
# overfit one picture for 40 steps and printed a table in which layer 3 was *worse* than
# layer 2; that measured nothing about held-out images, so it was replaced by this.)

# %% [markdown]
# ## 3. The box of one query after every decoder layer
#
# For the refine model on one held-out image: each object's matched query, its learned
# reference point $\hat p$ (white cross), its box after each layer (dark to bright) and
# the ground truth (dashed white).

# %%
refine_model, refine_cfg, _ = trained["refine"]
batch = held_out[0]
with no_grad(), record_sampling(refine_model) as records:
    outputs = refine_model(Tensor(batch.images), batch.mask)
boxes = layer_boxes(outputs)                                               # (D, N, Nq, 4)
matching = build_criterion(refine_cfg).matcher(outputs, batch.targets)
cross = [records[f"transformer.decoder.layers.{d}.cross_attn"][0]
         for d in range(refine_cfg.dec_layers)]
extent = tuple(batch.images.shape[2:])
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, i in zip(axes, range(3)):
    vm.show_image(ax, batch.images[i], batch.mask[i], title=f"held-out image {i}")
    for q, t in zip(*matching[i]):
        vm.draw_box_trajectory(ax, boxes[:, i, q], extent, target=batch.targets[i]["boxes"][t],
                               labels=[f"after layer {d}" for d in range(refine_cfg.dec_layers)])
        vm.draw_points(ax, cross[0]["reference"][i, q, 0, :2], extent, colour="white", size=50,
                       marker="x")
plt.tight_layout()
plt.show()

# %% [markdown]
# The refinement equation itself: the reference that layer $d + 1$'s cross-attention
# receives (recorded by `record_sampling`, in each level's coordinates; these images
# have no padding, so every level sees the same numbers) *is* the box that layer $d$
# predicted. With a box as reference, the cross-attention samples *inside the current
# box estimate*: the offsets are fractions of the box size,
# $\text{loc} = (c_x, c_y) + \frac{\Delta p}{K} \cdot \frac{(w, h)}{2}$. The last layer's
# sampling points for one object's query (colour = level, area = weight), around the
# box that the layer before predicted (dashed):

# %%
for d in range(1, refine_cfg.dec_layers):
    assert_allclose(cross[d]["reference"][:, :, 0], boxes[d - 1], 1e-5, 1e-6,
                    what=f"reference of layer {d} = box of layer {d - 1}")
print(f"reference of layer d + 1 == box of layer d, for d < {refine_cfg.dec_layers - 1}")
last = cross[-1]
strides = refine_model.backbone.strides
level_extents = [tuple(np.array(hw) * s) for hw, s in zip(last["shapes"], strides)]
q, t = matching[0][0][0], matching[0][1][0]
fig, ax = plt.subplots(figsize=(4.5, 4.5))
vm.show_image(ax, batch.images[0], batch.mask[0],
              title=f"layer {refine_cfg.dec_layers - 1} samples inside the layer-"
                    f"{refine_cfg.dec_layers - 2} box")
vm.draw_sampling_points_on_image(ax, last["locations"][0, q], last["weights"][0, q],
                                 level_extents, reference=last["reference"][0, q, 0],
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
# ## Exercises
#
# 1. **Predict.** An untrained refine model with 6 decoder layers: how many different
#    boxes does it predict per query across the layers? Check (`exercise_1`).
# 2. **Break it: remove the detach.** Give the decoder a flag that keeps the gradient
#    through the references (replace `no_grad()` + `detach()` by the plain computation)
#    and train a micro model for a few steps on one image with and without it. Which
#    assertion of §4 fails (`bbox_embed[0]` gets a gradient from the final loss)? Does
#    the loss still fall? (`exercise_2`)
# 3. **Implement.** Compute the per-layer IoU with *GIoU* instead of IoU
#    (`elementwise_generalized_box_iou`) for the two cached models, and check that the
#    ordering of the layers is the same (`exercise_3`).
# 4. **Predict, then measure.** In the plain model, all layers' boxes are predicted
#    relative to the same reference point. Is layer 1's box closer to layer 0's box in
#    the plain model or in the refine model? (`exercise_4`)
#
# Solutions: `notebooks/solutions/08_iterative_refinement.py` (run by the tests).

# %% [markdown]
# ## Checks

# %%
assert out.inter_references.shape == (cfg.dec_layers, 1, cfg.num_queries, 4)
assert not out.inter_references.requires_grad, "references must be constants for autograd"
assert all(detached[f"bbox_embed[{i}]"] == 0 for i in range(cfg.dec_layers - 1)), detached
assert detached[f"bbox_embed[{cfg.dec_layers - 1}]"] > 0
assert all(rows[f"decoder.layers[{i}]"] > 0 for i in range(cfg.dec_layers)), rows
assert rows["transformer.reference_points"] > 0, "the initial reference is learned"
assert all(v > 0 for v in attached.values()), attached
assert len({id(h) for h in model.bbox_embed}) == cfg.dec_layers, "independent heads"
for v in ("plain", "refine"):
    assert iou[v]["tracked"].shape == (trained[v][1].dec_layers, n_objects)
    assert 0 <= iou[v]["tracked"].min() and iou[v]["tracked"].max() <= 1
if not SMALL:       # the claims of the text, on the 200 held-out images of the full run
    gain = {v: iou[v]["tracked"].mean(1)[-1] - iou[v]["tracked"].mean(1)[0] for v in iou}
    share = {v: float((iou[v]["tracked"][-1] > iou[v]["tracked"][0]).mean()) for v in iou}
    assert 0 < gain["refine"] < 0.02 and gain["refine"] > gain["plain"], gain
    assert (share["refine"] - 0.5) / np.sqrt(0.25 / n_objects) > 2, share
    assert abs(share["plain"] - 0.5) / np.sqrt(0.25 / n_objects) < 2, share
print("all checks passed")
