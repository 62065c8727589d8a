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
# # 2. Deformable attention, Eq. (2)
#
# **Paper:** Deformable DETR (Zhu et al., ICLR 2021), §3 "Deformable Attention Module",
# Eq. (2). A query with content feature $z_q$ at the reference point $p_q$ attends to a
# feature map $x \in \mathbb{R}^{C \times H \times W}$ through $K$ sampled points per head:
#
# $$
# \mathrm{DeformAttn}(z_q, p_q, x) = \sum_{m=1}^{M} W_m \Big[ \sum_{k=1}^{K} A_{mqk}\,
# W'_m\, x(p_q + \Delta p_{mqk}) \Big],
# \qquad \sum_{k=1}^{K} A_{mqk} = 1 .
# $$
#
# Both the **offsets** $\Delta p_{mqk}$ and the **weights** $A_{mqk}$ are linear
# projections of $z_q$ (the weights through a softmax over the $K$ points): there is no
# key and no query-key product, and each query reads $MK$ points however large the map.
# $x(\cdot)$ is the bilinear sampling of [notebook 1](01_bilinear_sampling.ipynb).
#
# Here the feature map is a real picture: $x$ is the colour image itself at 1/8 of its
# resolution ($C = 3$), so the sampled values are colours we can see. The projections
# are those of minidetr's `MSDeformAttn` layer with one level ($L = 1$).
#
# **Doc:** [deformable-attention.md](../docs/deformable-attention.md), section 1
# ("From Eq. (2) to Eq. (3)"). **Code:** `minidetr/nn/msdeform_attn.py` (`MSDeformAttn`),
# `minidetr/ops/msda/reference.py` (`deformable_attention_single_scale`).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.lessons import viz
from minidetr.lessons.notebooks import load_example
from minidetr.nn import MSDeformAttn
from minidetr.ops.msda.reference import bilinear_corners, deformable_attention_single_scale
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
rng = np.random.default_rng(SEED)
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# ## The feature map $x$
#
# A fixed convolution stands in for a backbone: a box filter of size and stride $s$
# (each output pixel is the mean colour of an $s \times s$ patch), computed with
# minidetr's `F.conv2d`. The result is the $C \times H \times W$ map $x$; flattened
# row-major it becomes the op's value input, $(N, S, C)$ with $S = HW$ and pixel
# $(i, j)$ at row $iW + j$.

# %%
example = load_example(1)                              # the bus (COCO 471)
picture = example.image                                # (H_img, W_img, 3) = (256, 384, 3) in [0, 1]
H_img, W_img = picture.shape[:2]
stride = 16 if SMALL else 8
C = 3
box_filter = np.zeros((C, C, stride, stride), np.float32)          # (C_out, C_in, s, s)
for c in range(C):
    box_filter[c, c] = 1.0 / stride**2                              # channel c -> channel c
image_nchw = picture.transpose(2, 0, 1)[None]                        # (1, 3, H_img, W_img)
x_map = F.conv2d(image_nchw, box_filter, stride=stride).data[0]      # (C, H, W)
_, H, W = x_map.shape
x_flat = x_map.reshape(C, H * W).T[None]                             # (N=1, S=H*W, C)
print(f"picture {H_img} x {W_img} -> feature map x: C x H x W = {C} x {H} x {W}, "
      f"value input (N, S, C) = {x_flat.shape}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
viz.show_map(axes[0], picture, f"picture {H_img} x {W_img}")
viz.show_map(axes[1], x_map.transpose(1, 2, 0), f"feature map x: {H} x {W}, C = 3")
plt.show()

# %% [markdown]
# ## The layer: $M = 3$ heads, $K = 4$ points
#
# `MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K)` holds the four projections
# of Eq. (2): `sampling_offsets` ($z_q \mapsto \Delta p$, $MK \cdot 2$ numbers),
# `attention_weights` ($z_q \mapsto$ the $MK$ logits of $A$), `value_proj` ($W'$, all
# heads at once, $C \to C$ split into $M$ heads of $D = C/M$ channels) and `output_proj`
# ($W$, the heads concatenated then projected).
#
# To *see* what each head reads, we set $W'$ and $W$ to the identity: with $D = 1$,
# head $m$ then reads colour channel $m$ (red, green, blue) and writes it back to the same
# channel.

# %%
M, K = 3, 4
layer = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K, rng=rng)
print(layer)
for name, p in layer.named_parameters():
    print(f"  {name:28s} {tuple(p.shape)}")
for proj in (layer.value_proj, layer.output_proj):
    proj.weight.data[...] = np.eye(C, dtype=np.float32)            # W' = W = identity
    proj.bias.data[...] = 0.0

# %% [markdown]
# **The initial sampling pattern.** The official initialisation sets the offset layer's
# weight to zero and its bias to a fixed pattern: head $m$ looks along the angle
# $2\pi m / M$ (scaled onto the square $\max(|x|, |y|) = 1$), point $k$ at $k + 1$ pixels.
# The weight layer starts at zero, so $A_{mqk} = 1/K$. Before training every query
# therefore samples the same pattern around its own pixel, whatever its content.

# %%
print("initial offsets (M, K, 2), pixels (x, y):")
print(layer.initial_offsets()[:, 0])                                # (M, L=1, K, 2) -> (M, K, 2)

def queries_at(pixels):
    """Query features and normalised reference points of feature-map pixels (i, j)."""
    rows = np.array([i * W + j for i, j in pixels])                 # rows of the flat map
    z = x_flat[:, rows]                                             # (1, Lq, C)
    ref = np.array([[(j + 0.5) / W, (i + 0.5) / H] for i, j in pixels], np.float32)
    return z, ref.reshape(1, len(pixels), 1, 2)                     # (N, Lq, L=1, 2)

query_pixels = [(H // 4, W // 5), (H // 2, W // 2), (3 * H // 4, 4 * W // 5)]
z_q, p_q = queries_at(query_pixels)
with no_grad():
    loc0, attn0 = layer.sampling_locations_and_weights(Tensor(z_q), Tensor(p_q), [[H, W]])
loc0 = loc0.data                                                    # (N, Lq, M, L=1, K, 2)
attn0 = attn0.data                                                  # (N, Lq, M, L=1, K)
print("sampling_locations", loc0.shape, "attention_weights", attn0.shape)

fig, ax = plt.subplots(figsize=(7, 4.8))
viz.show_map(ax, picture, "initial pattern: every query samples the same shape")
for q in range(len(query_pixels)):
    viz.draw_sampling_points(ax, loc0[0, q, :, 0], H_img, W_img, attn0[0, q, :, 0],
                             p_q[0, q, 0], legend=(q == 0))
plt.show()

# %% [markdown]
# ## Offsets and weights that depend on the query
#
# Training moves the offset and weight layers' *weights* away from zero, so that each
# query chooses where to look from its own content $z_q$:
#
# $$\Delta p_{mqk} = (W^{\Delta} z_q + b^{\Delta})_{mk}, \qquad
#   A_{mqk} = \operatorname{softmax}_k\big((W^{A} z_q + b^{A})_{mk}\big).$$
#
# We have no trained layer here, so seeded random weights stand in for training: the
# pictures below show the mechanism, not learned behaviour. Queries with different
# colours now look in different places, with different weights (marker area
# $\propto A_{mqk}$).

# %%
layer.sampling_offsets.weight.data[...] = rng.normal(0, 2.0, size=(M * K * 2, C))
layer.attention_weights.weight.data[...] = rng.normal(0, 1.5, size=(M * K, C))
with no_grad():
    loc, attn = layer.sampling_locations_and_weights(Tensor(z_q), Tensor(p_q), [[H, W]])
loc, attn = loc.data, attn.data

fig, axes = plt.subplots(1, len(query_pixels), figsize=(12, 3.4))
for q, ax in enumerate(axes):
    viz.show_map(ax, picture, f"query at pixel {query_pixels[q]} of x")
    viz.draw_sampling_points(ax, loc[0, q, :, 0], H_img, W_img, attn[0, q, :, 0],
                             p_q[0, q, 0], area_per_weight=300, legend=(q == 0))
plt.show()
print("attention weights of the middle query (M, K):\n", attn[0, 1, :, 0].round(3))
assert np.allclose(attn.sum(axis=-1), 1, atol=1e-6), "A sums to 1 over the K points of a head"

# %% [markdown]
# ## Eq. (2) by hand, for one query
#
# In pixel units (pixel $(i, j)$ centred at $(u, v) = (j, i)$, as in notebook 1) the
# query's reference point is $p_q = (j, i)$ and its points are $p_q + \Delta p_{mqk}$; the
# op takes the same points normalised, $((u + \tfrac12)/W, (v + \tfrac12)/H)$, which is
# what `sampling_locations_and_weights` returned. We evaluate the bracket of Eq. (2) with
# explicit loops over heads and points, then apply $W_m$, and compare with the layer.

# %%
q = 1
i, j = query_pixels[q]
z = x_flat[0, i * W + j]                                            # (C,) the query's feature
offsets = (layer.sampling_offsets.weight.data @ z
           + layer.sampling_offsets.bias.data).reshape(M, K, 2)     # (M, K, 2) pixels
logits = (layer.attention_weights.weight.data @ z
          + layer.attention_weights.bias.data).reshape(M, K)        # (M, K)
A = np.exp(logits - logits.max(-1, keepdims=True))
A /= A.sum(-1, keepdims=True)                                       # softmax over k
value = x_flat[0] @ layer.value_proj.weight.data.T                  # (S, C): W' x, all heads
value = value.reshape(H * W, M, C // M)                             # (S, M, D)

heads = np.zeros((M, C // M))                                       # the bracket, per head
for m in range(M):
    for k in range(K):
        u = j + offsets[m, k, 0]                                    # p_q + dp, pixel units
        v = i + offsets[m, k, 1]
        x_norm, y_norm = (u + 0.5) / W, (v + 0.5) / H
        sample = sum(c.weight * value[c.row, m]                     # bilinear: 4 neighbours
                     for c in bilinear_corners(np.array(x_norm), np.array(y_norm), H, W))
        heads[m] += A[m, k] * sample
by_hand = layer.output_proj.weight.data @ heads.reshape(C) + layer.output_proj.bias.data

with no_grad():
    full = layer(Tensor(z_q), Tensor(p_q), Tensor(x_flat), [[H, W]], [0]).data   # (1, Lq, C)
print("by hand     :", by_hand.round(6))
print("MSDeformAttn:", full[0, q].round(6))
assert_allclose(full[0, q], by_hand, rtol=1e-5, atol=1e-6, what="Eq. (2) by hand vs layer")
assert_allclose(loc[0, q, :, 0], (np.array([j, i]) + offsets + 0.5) / np.array([W, H]),
                rtol=1e-5, atol=1e-6, what="normalised sampling locations")

# the bracket alone is the op on the projected value: the single-scale reference
single = deformable_attention_single_scale(value[None].astype(np.float32), (H, W),
                                           loc[:, :, :, 0], attn[:, :, :, 0])  # (1, Lq, C)
assert_allclose(single[0, q], heads.reshape(C), rtol=1e-5, atol=1e-6, what="bracket of Eq. (2)")
print("layer = by hand = W [single-scale op]: OK")

# %% [markdown]
# ## Every pixel a query
#
# In the encoder every pixel is a query, with its own centre as reference point. Running
# the layer on all $HW$ queries gives a new map. With the initial pattern each head
# averages four pixels along its direction, so each colour channel is smeared along
# its own head's direction (the colour fringes), and near the borders some points read
# the zero padding (the dark, coloured frame). With the random offset weights, each
# pixel's colour decides where its samples come from.

# %%
all_pixels = [(i, j) for i in range(H) for j in range(W)]
z_all, p_all = queries_at(all_pixels)                               # (1, HW, C), (1, HW, 1, 2)
outputs = {}
for label, weights_std in (("initial pattern", 0.0), ("random offset weights", 2.0)):
    fresh = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K,
                         rng=np.random.default_rng(SEED))
    for proj in (fresh.value_proj, fresh.output_proj):
        proj.weight.data[...] = np.eye(C, dtype=np.float32)
        proj.bias.data[...] = 0.0
    fresh.sampling_offsets.weight.data[...] = np.random.default_rng(SEED + 1).normal(
        0, weights_std, size=(M * K * 2, C))
    with no_grad():
        out = fresh(Tensor(z_all), Tensor(p_all), Tensor(x_flat), [[H, W]], [0]).data
    outputs[label] = out[0].reshape(H, W, C)                        # (H, W, C)

fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
viz.show_map(axes[0], x_map.transpose(1, 2, 0), "x")
for ax, (label, out) in zip(axes[1:], outputs.items()):
    viz.show_map(ax, np.clip(out, 0, 1), f"DeformAttn(x), {label}")
plt.show()
print(f"{H * W} queries x {M * K} points = {H * W * M * K} samples; full attention would "
      f"compare every query with every key: {(H * W) ** 2} pairs per head")

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/02_deformable_attention.py](solutions/02_deformable_attention.py).
#
# 1. **Implement.** The paper describes *one* linear projection of $z_q$ to $3MK$ numbers: $2MK$
#    offsets and $MK$ attention logits. minidetr (like the official code) has two Linears,
#    `sampling_offsets` and `attention_weights`. Merge their weights into one $(3MK, C)$
#    matrix, split its output, and prove the two layers are the same: equal sampling
#    locations, equal weights, equal gradients with respect to $z_q$, and equal parameter
#    counts.
# 2. **Predict.** For a freshly initialised layer with $M = 3$ heads and $K = 4$ points, write
#    down every attention weight and the pixel offsets of every point before running
#    `sampling_locations_and_weights`. (Hint: $\theta_m = 2\pi m / M$, scaled onto the square
#    $\max(|x|, |y|) = 1$.)
# 3. **Predict, then measure.** A query reads at most $4MK$ pixels of the map. Add 100 to every
#    *other* pixel of $x$: how much does that query's output change? And if you change one of
#    the pixels it reads? What would full attention do?
# 4. **Break something.** Normalise the attention logits with a softmax over the $M$ heads
#    instead of the $K$ points. Which check of this notebook fails?

# %% [markdown]
# ## Checks
#
# Shapes and values that fail loudly if the layer or the op changes.

# %%
assert x_flat.shape == (1, H * W, C) and x_flat.dtype == np.float32
Lq = len(query_pixels)
assert loc.shape == (1, Lq, M, 1, K, 2) and attn.shape == (1, Lq, M, 1, K)
assert_allclose(loc0[0, :, :, 0] - p_q[0, :, None, None, 0],      # the initial pattern
                np.broadcast_to(layer.initial_offsets()[:, 0] / np.array([W, H]), (Lq, M, K, 2)),
                rtol=1e-5, atol=1e-6, what="initial offsets / (W, H)")
assert np.allclose(attn0, 1.0 / K), "initial attention weights are uniform"
assert_allclose(full[0, q], by_hand, rtol=1e-5, atol=1e-6, what="Eq. (2)")
for label, out in outputs.items():
    assert out.shape == (H, W, C) and np.isfinite(out).all(), label
    assert 0 <= out.min() and out.max() <= 1 + 1e-6, f"{label}: a convex mix of colours"
print("all checks passed")
