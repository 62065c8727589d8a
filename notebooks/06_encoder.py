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
# # 6. The encoder
#
# **Paper:** Deformable DETR, §4.1 (the deformable transformer encoder): the encoder
# replaces DETR's self-attention over one feature map by multi-scale deformable
# attention, Eq. (3), over all levels; its input and output are multi-scale maps of the
# same resolutions, the queries are the pixels of every level, and each pixel's reference
# point is the pixel itself. So every one of the $S$ tokens is a query, with its own
# position as the reference point, seen from every level. One encoder serves all
# levels: its parameters are shared across levels (only the offset and weight projections
# grow with $L$, and the level embedding tells the levels apart), and there is no FPN,
# because each query already samples every level, so information moves between scales
# inside every layer ([model.md](../docs/model.md) §2). This notebook computes:
#
# 1. the valid ratios, which move a point between levels of different padding;
# 2. the reference points of every token on every level;
# 3. one encoder layer, step by step, against the layer itself;
# 4. the whole encoder, and why padding cannot leak into the image's tokens.
#
# **Doc:** [model.md](../docs/model.md) §1–2, and
# [deformable-attention.md](../docs/deformable-attention.md) for the attention itself.
# **Code:** `minidetr/models/deformable_transformer.py`: `get_valid_ratio`,
# `get_reference_points`, `DeformableTransformerEncoderLayer`,
# `DeformableTransformerEncoder`; `minidetr/nn/msdeform_attn.py`: `MSDeformAttn`.
#
# The model is the **untrained** `tiny` preset ($C = 64$, $M = 4$ heads, $L = 3$ levels,
# $K = 2$ points, 2 encoder layers), in evaluation mode (no dropout). The geometry does
# not depend on training; the sampling points below are therefore the *initial* pattern
# (notebook 11 trains the model).

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import build_model, get_config
from minidetr.models.deformable_transformer import get_reference_points
from minidetr.ops.msda import ms_deform_attn
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# The input, as in notebook 5: a bus (landscape) and giraffes (portrait) padded into one
# batch, through the backbone and the input projections, flattened into tokens.

# %%
SHORT = 120 if SMALL else 250
to_model_input = Compose([Resize(SHORT, max_size=SHORT * 3 // 2), Normalize()])
examples = [load_example(1), load_example(0)]          # a bus (landscape), giraffes (portrait)
images, mask, targets = collate([example_to_sample(ex, to_model_input) for ex in examples])
cfg = get_config("tiny", seed=SEED)
model = build_model(cfg).eval()
transformer = model.transformer
with no_grad():
    srcs, masks, pos_embeds = model.project_features(images, mask)
    (src, mask_flatten, pos, spatial_shapes, level_start_index,
     valid_ratios) = transformer.flatten_levels(srcs, masks, pos_embeds)
N, S, C = src.shape
L = len(spatial_shapes)
strides = model.backbone.strides
print(f"images {images.shape}; tokens src {src.shape}, pos {pos.shape}, "
      f"padding {mask_flatten.shape}")
print(f"levels (H_l, W_l): {spatial_shapes.tolist()}, start index {level_start_index.tolist()}")

# %% [markdown]
# ## 1. Valid ratios
#
# Images are padded at the bottom and right, and every level is padded a little
# differently (sizes are rounded up at every stride). For image $b$ and level $l$,
#
# $$
# r_{b,l} = \Big(\frac{\text{valid}_W}{W_l},\ \frac{\text{valid}_H}{H_l}\Big),
# $$
#
# the valid width counted on row 0 of the level mask and the valid height on column 0
# (`get_valid_ratio`). A point $\hat p$ normalised to the *valid image* sits at
# $\hat p \odot r_{b,l}$ in the *padded* normalised coordinates of level $l$, the
# coordinates in which the sampling op reads the map.

# %%
for b in range(N):
    for l in range(L):
        Hl, Wl = spatial_shapes[l]
        valid_h = int((~masks[l][b, :, 0]).sum())
        valid_w = int((~masks[l][b, 0, :]).sum())
        r_w, r_h = valid_ratios[b, l]
        print(f"image {b}, level {l}: valid {valid_h:>2} x {valid_w:<2} of {Hl} x {Wl}"
              f" -> r = ({r_w:.4f}, {r_h:.4f})")
        assert_allclose(valid_ratios[b, l], np.array([valid_w / Wl, valid_h / Hl]), 1e-6, 0,
                        what=f"valid ratio of image {b}, level {l}")

# %% [markdown]
# ## 2. Reference points: every token, on every level
#
# Token $(i, j)$ of level $l$ is at its pixel centre, normalised to the valid part of the
# image, then seen from each level $l'$ (`get_reference_points`):
#
# $$
# \hat p = \Big(\frac{j + 0.5}{r_{w,l} W_l},\ \frac{i + 0.5}{r_{h,l} H_l}\Big), \qquad
# \hat p^{(l')} = \hat p \odot r_{l'} \quad (l' = 1, \dots, L).
# $$
#
# Three properties follow, checked below: on its own level a token's reference is its
# pixel centre in padded coordinates; divided by the valid ratios, the $L$ references of
# a token coincide (one place in the image); and tokens in the padding lie beyond 1.

# %%
reference_points = get_reference_points(spatial_shapes, valid_ratios)        # (N, S, L, 2)
print("reference_points:", reference_points.shape, "= (N, S, L, 2)")

for l in range(L):
    Hl, Wl = spatial_shapes[l]
    start = level_start_index[l]
    own = reference_points[:, start:start + Hl * Wl, l].reshape(N, Hl, Wl, 2)   # (N, H_l, W_l, 2)
    jj, ii = np.meshgrid(np.arange(Wl), np.arange(Hl))
    centres = np.stack([(jj + 0.5) / Wl, (ii + 0.5) / Hl], axis=-1)            # (H_l, W_l, 2)
    assert_allclose(own, np.broadcast_to(centres, own.shape), 1e-6, 1e-6,
                    what=f"own-level reference = pixel centre, level {l}")
in_valid_image = reference_points / valid_ratios[:, None]                      # (N, S, L, 2)
assert_allclose(in_valid_image, np.broadcast_to(in_valid_image[:, :, :1], in_valid_image.shape),
                1e-5, 1e-6, what="the same image point on every level")
beyond = (in_valid_image[:, :, 0] > 1).any(-1)                                 # (N, S)
assert np.array_equal(beyond, mask_flatten), "padded tokens <=> references beyond the image"
print("own level = pixel centre; one image point on every level; padding <=> beyond 1")

# %% [markdown]
# The references of the coarsest level's tokens on the padded giraffe picture: the image's
# tokens (green) tile it, the padding's tokens (red crosses) lie to the right, beyond the
# image. For one token (white star) we also draw its reference on each of the $L$ levels:
# the same place, up to the slightly different padding of each level.

# %%
b, l = 1, L - 1
Hl, Wl = spatial_shapes[l]
start = level_start_index[l]
level_refs = reference_points[b, start:start + Hl * Wl, l]                    # (H_l W_l, 2)
padded = mask_flatten[b, start:start + Hl * Wl]
extent = (Hl * strides[l], Wl * strides[l])                 # picture pixels spanned by [0, 1]
fig, axes = plt.subplots(1, 2, figsize=(9, 4))
vm.show_image(axes[0], images[b], mask[b], title=f"level {l} ({Hl} x {Wl}) token references")
vm.draw_points(axes[0], level_refs[~padded], extent, colour="tab:green", size=14)
vm.draw_points(axes[0], level_refs[padded], extent, colour="tab:red", size=20, marker="x")
token = start + (Hl // 2) * Wl + (Wl // 4)
vm.show_image(axes[1], images[b], mask[b], title=f"token {token}: its reference on every level")
for lp in reversed(range(L)):                         # nested markers, the finest on top
    Hp, Wp = spatial_shapes[lp]
    vm.draw_points(axes[1], reference_points[b, token, lp], (Hp * strides[lp], Wp * strides[lp]),
                   colour=vm.LEVEL_COLOURS[lp], size=40 + 60 * lp, marker="o",
                   label=f"level {lp}", edgecolors="white")
axes[1].legend(fontsize=7, loc="lower right")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. One encoder layer, step by step
#
# A layer is post-norm (`DeformableTransformerEncoderLayer`); the attention's query adds
# the position embedding, its values do not:
#
# $$
# x \leftarrow \mathrm{LN}_1\big(x + \mathrm{MSDeformAttn}(x + \mathrm{pos},\ \hat p,\ x)\big),
# \qquad
# x \leftarrow \mathrm{LN}_2\big(x + W_2\,\mathrm{ReLU}(W_1 x + b_1) + b_2\big).
# $$
#
# Inside `MSDeformAttn` (Eq. 3): the values $W' x$ are zeroed at padded tokens; each query
# predicts $M \cdot L \cdot K$ offsets (in pixels of each level) and weights (a softmax over
# the $L K$ points of each head); the op samples and sums; `output_proj` mixes the heads.

# %%
layer = transformer.encoder.layers[0]
attn_module = layer.self_attn
M, K = attn_module.n_heads, attn_module.n_points
ref = Tensor(reference_points)
with no_grad():
    query = src + pos                                                           # (N, S, C)
    locations, weights = attn_module.sampling_locations_and_weights(query, ref, spatial_shapes)
    value = attn_module.value_proj(src)                                         # (N, S, C)
    value = F.where(mask_flatten[..., None], 0.0, value).reshape(N, S, M, C // M)  # (N, S, M, D)
    sampled = ms_deform_attn(value, spatial_shapes, level_start_index, locations,
                             weights)                                           # (N, S, C)
    attn = attn_module.output_proj(sampled)                                     # (N, S, C)
    x = layer.norm1(src + attn)                                                 # (N, S, C)
    x = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))                # (N, S, C)
    by_layer = layer(src, pos, ref, spatial_shapes, level_start_index, mask_flatten)

print(f"sampling locations {locations.shape} = (N, S, M, L, K, 2), weights {weights.shape}")
assert_allclose(attn.data, attn_module(query, ref, src, spatial_shapes, level_start_index,
                                       mask_flatten).data, 1e-5, 1e-6, what="MSDeformAttn")
assert_allclose(x.data, by_layer.data, 1e-5, 1e-6, what="encoder layer, step by step")
assert_allclose(weights.data.sum(axis=(-2, -1)), np.ones((N, S, M)), 1e-5, 0,
                what="attention weights of a head sum to 1 over L*K points")
print("step by step == DeformableTransformerEncoderLayer; weights sum to 1 per head")

# %% [markdown]
# Where one token looks. At initialisation the offset weights are zero, so every token
# uses the same pattern from the biases: head $m$ points in direction $2\pi m / M$, point
# $k$ is $k + 1$ pixels *of each level* away, so the pattern is $2\times$ wider on every
# coarser level, and all $L K$ weights are equal. Training makes the offsets and weights
# depend on the token (notebooks 2 and 3 show such patterns, with random weights standing
# in for training; notebook 8 those of a briefly trained decoder). Left: all levels on the
# picture (colour = level); right: level by level on the feature maps (colour = head), as
# in notebook 3.

# %%
b = 1
l_tok = 1
Hq, Wq = spatial_shapes[l_tok]
token = level_start_index[l_tok] + (Hq // 2) * Wq + Wq // 3
loc = locations.data[b, token]                                                  # (M, L, K, 2)
wts = weights.data[b, token]                                                    # (M, L, K)
fig = plt.figure(figsize=(12, 3.6))
ax0 = fig.add_subplot(1, L + 1, 1)
vm.show_image(ax0, images[b], mask[b], title=f"token {token} (level {l_tok}): all levels")
vm.draw_sampling_points_on_image(
    ax0, loc, wts, [(h * s, w * s) for (h, w), s in zip(spatial_shapes, strides)],
    reference=reference_points[b, token, l_tok],
    reference_extent_hw=(Hq * strides[l_tok], Wq * strides[l_tok]))
ax0.legend(fontsize=6, loc="lower right")
level_maps = [srcs[l].data[b].transpose(1, 2, 0) for l in range(L)]             # (H_l, W_l, C)
viz.draw_levels([fig.add_subplot(1, L + 1, 2 + l) for l in range(L)], level_maps, loc, wts,
                reference=reference_points[b, token])
plt.tight_layout()
plt.show()
print("initial offsets (x, y) in pixels of each level, per head (rows) and point:")
print(np.round(attn_module.initial_offsets()[:, 0], 3) + 0.0)           # (M, K, 2), level 0

# %% [markdown]
# ## 4. The whole encoder, and the padding
#
# `DeformableTransformerEncoder` computes the reference points once and applies its
# layers in turn; there is no final norm. Its output is the *memory* $(N, S, C)$ that the
# decoder reads.
#
# Padded tokens are still queries (they are computed, as in the official code), but they
# can never influence the image's tokens: their values are zeroed in every layer, and
# LayerNorm and the feed-forward block act token by token. We check it by filling the
# padded tokens with noise.

# %%
with no_grad():
    memory = transformer.encoder(src, spatial_shapes, level_start_index, valid_ratios, pos,
                                 mask_flatten)
    x = src
    for enc_layer in transformer.encoder.layers:
        x = enc_layer(x, pos, ref, spatial_shapes, level_start_index, mask_flatten)
    noise = np.random.default_rng(SEED).normal(0, 10, src.shape).astype(np.float32)
    noisy_src = Tensor(np.where(mask_flatten[..., None], noise, src.data))
    noisy_memory = transformer.encoder(noisy_src, spatial_shapes, level_start_index,
                                       valid_ratios, pos, mask_flatten)
print(f"memory {memory.shape} = (N, S, C), from {len(transformer.encoder.layers)} layers")
assert_allclose(memory.data, x.data, 1e-6, 1e-6, what="encoder == its layers in turn")
valid = ~mask_flatten
change_valid = np.abs(noisy_memory.data - memory.data)[valid].max()
change_padded = np.abs(noisy_memory.data - memory.data)[mask_flatten].max()
print(f"noise in the padding changes the image's tokens by {change_valid:.1e}, "
      f"the padding's own tokens by {change_padded:.2f}")
assert change_valid < 1e-5 and change_padded > 0.1

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/06_encoder.py](solutions/06_encoder.py).
#
# 1. **Break something.** Run the encoder without its padding mask (`None`) and fill the
#    padded tokens with noise, as in section 4. Which check fails, and by how much do the
#    image's tokens change?
# 2. **Implement.** Write `get_reference_points` from the formula of section 2 and compare.
#    Then drop the valid ratios (use each token's *padded* pixel centre on every level): for
#    which image of a padded batch does the answer stay right?
# 3. **Predict.** Before any training, how far from its reference, in pixels of the *input
#    image*, does head $m$'s point $k$ on level $l$ sample? Check with
#    `sampling_locations_and_weights` and the backbone's strides.
# 4. **Measure.** How many input tokens does one token of the memory depend on after one
#    encoder layer, and after two? Find out with a backward pass (careful: the sum of a
#    LayerNorm's output is a constant, so project it on a random vector first). What bound do
#    you expect after one layer?

# %% [markdown]
# ## Checks

# %%
assert reference_points.shape == (N, S, L, 2) and reference_points.dtype == np.float32
assert valid_ratios.shape == (N, L, 2) and np.all((valid_ratios > 0) & (valid_ratios <= 1))
assert locations.shape == (N, S, M, L, K, 2) and weights.shape == (N, S, M, L, K)
assert memory.shape == (N, S, C) == src.shape
assert np.isfinite(memory.data).all()
assert np.allclose(attn_module.attention_weights.weight.data, 0), \
    "untrained: attention weights start from zero weights (uniform 1 / (L K))"
assert_allclose(wts, np.full((M, L, K), 1 / (L * K)), 1e-6, 0, what="uniform initial weights")
print("all checks passed")
