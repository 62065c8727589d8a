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
# # 3. Multi-scale deformable attention, Eq. (3)
#
# **Paper:** Deformable DETR (Zhu et al., ICLR 2021), §3 "Multi-scale Deformable
# Attention Module", Eq. (3). With $L$ feature levels $\{x^l\}_{l=1}^{L}$ and a reference
# point $\hat p_q \in [0, 1]^2$ in normalised coordinates:
#
# $$
# \mathrm{MSDeformAttn}(z_q, \hat p_q, \{x^l\}_{l=1}^{L}) = \sum_{m=1}^{M} W_m \Big[
# \sum_{l=1}^{L} \sum_{k=1}^{K} A_{mlqk}\, W'_m\, x^l\big(\phi_l(\hat p_q) + \Delta p_{mlqk}\big)
# \Big], \qquad \sum_{l=1}^{L} \sum_{k=1}^{K} A_{mlqk} = 1 .
# $$
#
# Three changes from Eq. (2) ([notebook 2](02_deformable_attention.ipynb)):
#
# 1. a sum over the **levels**: each head reads $K$ points on *every* level;
# 2. **normalised coordinates**: $\phi_l$ maps one reference point onto every level, so
#    the same point of the picture is found on maps of different sizes;
# 3. **one softmax over all $LK$ points** of a head: the levels compete for attention.
#
# And one change of layout: the levels are flattened and concatenated into one value
# array, found again through the **spatial shapes** and the **level start index**.
#
# **Doc:** [deformable-attention.md](../docs/deformable-attention.md), section 1.
# **Code:** `minidetr/ops/msda/` (`forward`, `reference.py`), `minidetr/nn/msdeform_attn.py`.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.lessons import viz
from minidetr.lessons.notebooks import load_example
from minidetr.nn import MSDeformAttn
from minidetr.ops import msda
from minidetr.ops.msda.reference import bilinear_corners, deformable_attention_single_scale
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
rng = np.random.default_rng(SEED)
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}; "
      f"MSDA backends here: {msda.available_backends()}")

# %% [markdown]
# ## Levels
#
# Deformable DETR takes the backbone's C3, C4, C5 (strides 8, 16, 32) plus one extra level
# (stride 64). A box filter at each stride (the mean colour of each $s \times s$ patch,
# through minidetr's `F.conv2d`) gives a picture pyramid with the same strides, and
# colours we can see ($C = 3$). The picture is $384 \times 256$, a multiple of 64, so every
# level covers exactly the same area.

# %%
example = load_example(0)                              # the giraffes (COCO 72)
picture = example.image                                # (384, 256, 3) in [0, 1]
H_img, W_img = picture.shape[:2]
C = 3
strides = (8, 16, 32, 64)
image_nchw = picture.transpose(2, 0, 1)[None]          # (1, 3, H_img, W_img)
levels = []
for s in strides:
    box = np.zeros((C, C, s, s), np.float32)            # (C_out, C_in, s, s)
    for c in range(C):
        box[c, c] = 1.0 / s**2
    levels.append(F.conv2d(image_nchw, box, stride=s).data[0])    # (C, H_l, W_l)
L = len(levels)

fig, axes = plt.subplots(1, L + 1, figsize=(12, 3.4))
viz.show_map(axes[0], picture, f"picture {H_img} x {W_img}")
for ax, s, lev in zip(axes[1:], strides, levels):
    viz.show_map(ax, lev.transpose(1, 2, 0), f"stride {s}: {lev.shape[1]} x {lev.shape[2]}")
plt.show()

# %% [markdown]
# ## One value array: spatial shapes and level start index
#
# Each level is flattened row-major, $(C, H_l, W_l) \to (H_l W_l, C)$, and the levels are
# concatenated: $S = \sum_l H_l W_l$ rows. Two small integer arrays find a level again:
#
# * `spatial_shapes` $(L, 2)$, rows $(H_l, W_l)$;
# * `level_start_index` $(L,)$, the first row of each level: the exclusive cumulative sum
#   of $H_l W_l$.
#
# Pixel $(i, j)$ of level $l$ is row $\mathrm{start}_l + i W_l + j$.

# %%
spatial_shapes = np.array([lev.shape[1:] for lev in levels], dtype=np.int64)      # (L, 2)
sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]                                 # (L,)
level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]])                   # (L,)
x_flat = np.concatenate([lev.reshape(C, -1).T for lev in levels])[None]            # (1, S, C)
S = x_flat.shape[1]
print("spatial_shapes (H_l, W_l):", spatial_shapes.tolist())
print("level_start_index:        ", level_start_index.tolist(), f"  S = {S}")

for l, (H_l, W_l) in enumerate(spatial_shapes):
    i, j = rng.integers(H_l), rng.integers(W_l)
    row = level_start_index[l] + i * W_l + j
    assert np.array_equal(x_flat[0, row], levels[l][:, i, j]), (l, i, j)
print("pixel (i, j) of level l is row start_l + i * W_l + j: OK")

# %% [markdown]
# ## Normalised coordinates: one reference point, every level
#
# $\hat p_q = (x, y) \in [0, 1]^2$ measures positions as fractions of the map, so it means
# the same place in the picture on every level. On level $l$ it sits at pixel coordinates
#
# $$\phi_l(\hat p_q) \to (u, v) = (x W_l - \tfrac12,\; y H_l - \tfrac12)$$
#
# (the $-\tfrac12$ of notebook 1). We put a reference point on the left giraffe's head,
# taken from the picture's annotations.

# %%
x0, y0, x1, y1 = example.boxes[np.argmin(example.boxes[:, 1])]     # the box reaching highest
ref = np.array([(x0 + 0.3 * (x1 - x0)) / W_img, (y0 + 0.06 * (y1 - y0)) / H_img])  # (2,) x, y
for l, (H_l, W_l) in enumerate(spatial_shapes):
    u, v = viz.to_pixels(ref, H_l, W_l)
    print(f"level {l} ({H_l:2d} x {W_l:2d}): (u, v) = ({u:6.2f}, {v:6.2f})")

# %% [markdown]
# ## Offsets are pixels of *their* level
#
# The layer predicts offsets in pixels of level $l$ and divides them by $(W_l, H_l)$:
# $\ell_{mlqk} = \hat p_q + \Delta p_{mlqk} / (W_l, H_l)$. The official initial pattern
# (head $m$ along the angle $2\pi m / M$, point $k$ at $k + 1$ pixels) is the same on every
# level in *level* pixels, so on the picture the coarse levels reach further: 8, 16, 32
# and 64 picture pixels per step. With zero offset weights the attention weights start
# uniform, $A = 1/(LK)$.
#
# As in notebook 2, $W'$ and $W$ are set to the identity so head $m$ ($D = 1$) reads
# colour channel $m$.

# %%
M, K = 3, 4
layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=K, rng=rng)
for proj in (layer.value_proj, layer.output_proj):
    proj.weight.data[...] = np.eye(C, dtype=np.float32)
    proj.bias.data[...] = 0.0
H0, W0 = spatial_shapes[0]
i0, j0 = int(ref[1] * H0), int(ref[0] * W0)                         # its pixel on level 0
z_q = x_flat[:, [i0 * W0 + j0]]                                      # (N=1, Lq=1, C)
ref_points = np.broadcast_to(ref.astype(np.float32), (1, 1, L, 2)).copy()   # (N, Lq, L, 2)

def sample_pattern(layer):
    with no_grad():
        loc, attn = layer.sampling_locations_and_weights(Tensor(z_q), Tensor(ref_points),
                                                         spatial_shapes)
    return loc.data[0, 0], attn.data[0, 0]                          # (M, L, K, 2), (M, L, K)

loc0, attn0 = sample_pattern(layer)
fig, axes = plt.subplots(1, L + 1, figsize=(13, 3.6))
viz.show_map(axes[0], picture, "all levels on the picture")
viz.draw_sampling_points(axes[0], loc0.reshape(M, L * K, 2), H_img, W_img,
                         attn0.reshape(M, L * K), ref, area_per_weight=400)
viz.draw_levels(axes[1:], [lev.transpose(1, 2, 0) for lev in levels], loc0, attn0, ref,
                area_per_weight=400)
plt.show()

# %% [markdown]
# ## Query-dependent offsets and one softmax over levels and points
#
# Seeded random weights stand in for training (the picture shows the mechanism, not
# learned behaviour). The logits of a head are reshaped to $L K$ numbers and normalised
# *together*: a head may put most of its attention on one level. The panel titles give
# each level's share, averaged over the heads; the bars below give it per head.

# %%
layer.sampling_offsets.weight.data[...] = rng.normal(0, 2.0, size=(M * L * K * 2, C))
layer.attention_weights.weight.data[...] = rng.normal(0, 2.0, size=(M * L * K, C))
loc, attn = sample_pattern(layer)
print("attention mass per level (rows: heads):\n", attn.sum(-1).round(3))
assert np.allclose(attn.sum(axis=(-2, -1)), 1, atol=1e-6), "joint softmax over L*K"

fig, axes = plt.subplots(1, L, figsize=(11, 3.8))
viz.draw_levels(axes, [lev.transpose(1, 2, 0) for lev in levels], loc, attn, ref,
                area_per_weight=400)
plt.show()

fig, ax = plt.subplots(figsize=(6, 2.6))
bottom = np.zeros(M)
for l in range(L):
    ax.barh([f"head {m}" for m in range(M)], attn[:, l].sum(-1), left=bottom,
            label=f"level {l}")
    bottom += attn[:, l].sum(-1)
ax.set_xlabel("sum over k of A_mlqk (each head's bar sums to 1)")
ax.legend(ncol=L, fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0))
plt.show()

# %% [markdown]
# ## Eq. (3) by hand, through the level start index
#
# For one head, the loop over levels and points: the four bilinear neighbours of a point
# on level $l$ are rows of that level, found at `level_start_index[l] + row`.

# %%
value = (x_flat[0] @ layer.value_proj.weight.data.T).reshape(S, M, C // M)   # (S, M, D)
heads = np.zeros((M, C // M))
for m in range(M):
    for l, (H_l, W_l) in enumerate(spatial_shapes):
        for k in range(K):
            x_loc, y_loc = loc[m, l, k]
            corners = bilinear_corners(np.array(x_loc), np.array(y_loc), int(H_l), int(W_l))
            sample = sum(c.weight * value[level_start_index[l] + c.row, m] for c in corners)
            heads[m] += attn[m, l, k] * sample
by_hand = layer.output_proj.weight.data @ heads.reshape(C)

with no_grad():
    out = layer(Tensor(z_q), Tensor(ref_points), Tensor(x_flat), spatial_shapes,
                level_start_index).data[0, 0]                       # (C,)
print("by hand     :", by_hand.round(6))
print("MSDeformAttn:", out.round(6))
assert_allclose(out, by_hand, rtol=1e-5, atol=1e-6, what="Eq. (3) by hand vs layer")

# %% [markdown]
# **Eq. (3) is a sum of Eq. (2)s.** Sampling is linear, so the multi-scale op equals the
# sum over levels of the single-scale op on each level's slice of the value, each with its
# level's share of the (jointly normalised) weights.

# %%
value_b = value[None].astype(np.float32)                            # (1, S, M, D)
loc_b = loc[None, None]                                             # (N=1, Lq=1, M, L, K, 2)
attn_b = attn[None, None]                                           # (N=1, Lq=1, M, L, K)
per_level = [deformable_attention_single_scale(
                 value_b[:, start:start + H_l * W_l], (H_l, W_l),
                 loc_b[:, :, :, l], attn_b[:, :, :, l])              # (1, 1, M * D)
             for l, ((H_l, W_l), start) in enumerate(zip(spatial_shapes, level_start_index))]
multi = msda.forward(value_b, spatial_shapes, level_start_index, loc_b, attn_b)
assert_allclose(multi, sum(per_level), rtol=1e-5, atol=1e-6, what="Eq. (3) = sum of Eq. (2)")
for l, part in enumerate(per_level):
    print(f"level {l}: {part.ravel().round(4)}")
print(f"sum    : {sum(per_level).ravel().round(4)}\nEq. (3): {multi.ravel().round(4)}")

# %% [markdown]
# ## Many queries, every backend
#
# The encoder runs one query per token of every level; here the pixels of the finest
# level are the queries, each with its pixel centre as reference point on all levels.
# Every available backend must give the same output.

# %%
step = 4 if SMALL else 1
jj, ii = np.meshgrid(np.arange(0, W0, step), np.arange(0, H0, step))
refs = np.stack([(jj + 0.5) / W0, (ii + 0.5) / H0], -1).reshape(1, -1, 1, 2)
refs = np.repeat(refs, L, axis=2).astype(np.float32)                 # (1, Lq, L, 2)
rows = (ii * W0 + jj).ravel()                                        # level 0 starts at 0
queries = x_flat[:, rows]                                            # (1, Lq, C)
with no_grad():
    locs_all, attn_all = layer.sampling_locations_and_weights(Tensor(queries), Tensor(refs),
                                                              spatial_shapes)
outs = {b: msda.forward(value_b, spatial_shapes, level_start_index, locs_all.data,
                        attn_all.data, backend=b) for b in msda.available_backends()}
for b, o in outs.items():
    assert_allclose(o, outs["numpy"], rtol=1e-5, atol=1e-6, what=f"{b} vs numpy")
print(f"{queries.shape[1]} queries, {M} heads x {L} levels x {K} points; backends "
      f"{list(outs)} agree")

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/03_multiscale_deformable_attention.py](solutions/03_multiscale_deformable_attention.py).
#
# 1. **Predict.** At initialisation every level gets the same offsets *in pixels of its own
#    level*. How far from the reference point, in the picture, is a point of level $l$
#    compared with the same point of level 0?
# 2. **Break something.** Replace the joint softmax over the $LK$ points of a head by a softmax
#    over the $K$ points of each level. What do the weights of a head sum to now? Can a query
#    still move attention from one level to another?
# 3. **Break something.** Divide the $x$ offset by $H_l$ and the $y$ offset by $W_l$, the order
#    of the official code before its fix of 2020-12-07. On which maps does nothing change, and
#    by how much do the points move on the 2:3 maps of the solution?
# 4. **Predict.** How many points does one query read, and how many parameters do the offset
#    and weight projections hold, for the paper's $C = 256$, $M = 8$, $L = K = 4$? Does the
#    number depend on the size of the map?

# %% [markdown]
# ## Checks

# %%
assert spatial_shapes.tolist() == [[48, 32], [24, 16], [12, 8], [6, 4]]
assert level_start_index.tolist() == [0, 1536, 1920, 2016] and S == 2040
assert loc.shape == (M, L, K, 2) and attn.shape == (M, L, K)
assert np.allclose(attn0, 1.0 / (L * K)), "initial weights are uniform over L*K"
assert_allclose((loc0 - ref) * spatial_shapes[None, :, None, ::-1],   # back to level pixels
                np.broadcast_to(layer.initial_offsets(), (M, L, K, 2)), rtol=1e-4, atol=1e-4,
                what="initial pattern, in pixels of each level")
assert_allclose(out, by_hand, rtol=1e-5, atol=1e-6, what="Eq. (3)")
assert_allclose(multi, sum(per_level), rtol=1e-5, atol=1e-6, what="sum over levels")
print("all checks passed")
