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
# # 5. The backbone and the multi-scale input
#
# **Paper:** Deformable DETR (Zhu et al., ICLR 2021), §4.1 (multi-scale feature maps and
# the scale-level embedding $e_l$) and Appendix A.2 (Fig. 4): the input feature maps
# $\{x^l\}_{l=1}^{L-1}$ ($L = 4$) are the ResNet stages $C_3$–$C_5$, each through a
# $1 \times 1$ convolution, and the lowest-resolution map $x^L$ is a $3 \times 3$ stride-2
# convolution on $C_5$; all have $C = 256$ channels. Before any attention, a padded batch
# of images becomes $L$ feature maps, each with a padding mask and a position embedding,
# and then one sequence of $S = \sum_l H_l W_l$ tokens. This notebook follows that path:
#
# 1. a padded batch and its mask;
# 2. the backbone: $C_3$–$C_5$ at strides 8, 16, 32, and a mask per level;
# 3. the input projections and the extra (stride 64) level;
# 4. the sine position embedding, checked against its formula;
# 5. the level embedding, the flattening and the valid ratios.
#
# **Doc:** [backbone-and-positions.md](../docs/backbone-and-positions.md) (all sections)
# and [model.md](../docs/model.md) §1.
# **Code:** `minidetr/models/backbone.py` (`TinyBackbone`, `ResNet`, `Backbone`, `Joiner`,
# `interpolate_mask`), `position_encoding.py` (`sine_position_embedding`),
# `deformable_detr.py` (`DeformableDETR.project_features`) and
# `deformable_transformer.py` (`DeformableTransformer.flatten_levels`, `get_valid_ratio`).
#
# The model here is the **untrained** `tiny` preset: shapes, masks and embeddings do not
# depend on training (notebook 11 trains it). Its CPU-sized `TinyBackbone` has the
# ResNet's strides; the paper's ResNet-50 is built once below to compare.

# %%
import math
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr.autograd import no_grad
from minidetr.data import Compose, Normalize, Resize, collate
from minidetr.lessons import viz
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import example_to_sample, load_example
from minidetr.models import build_model, get_config
from minidetr.models.backbone import build_backbone, interpolate_mask
from minidetr.models.deformable_transformer import get_valid_ratio
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")

# %% [markdown]
# ## 1. A padded batch
#
# Two pictures of different shapes, resized by the official rule (shorter side `SHORT`,
# longer side at most 1.5 times that), normalised with the ImageNet mean and standard
# deviation, and zero-padded at the bottom and right to a common size by `collate`. The
# mask is **True on padding**; it follows the features to every level.

# %%
SHORT = 120 if SMALL else 250         # not multiples of 32: the levels then need ceil()
to_model_input = Compose([Resize(SHORT, max_size=SHORT * 3 // 2), Normalize()])
examples = [load_example(1), load_example(0)]          # a bus (landscape), giraffes (portrait)
images, mask, targets = collate([example_to_sample(ex, to_model_input) for ex in examples])
B, _, H, W = images.shape
sizes = [t["size"] for t in targets]                    # (h, w) of each image before padding
print(f"images {images.shape} {images.dtype}, mask {mask.shape} {mask.dtype}")
for b, (h, w) in enumerate(sizes):
    print(f"  image {b}: {h} x {w} valid, padding {mask[b].mean():.0%} of the {H} x {W} canvas")
    assert not mask[b, :h, :w].any() and mask[b].sum() == H * W - h * w, "mask != padding"

fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
for b, ax in enumerate(axes):
    vm.show_image(ax, images[b], mask[b], title=f"image {b}: {sizes[b][0]} x {sizes[b][1]} "
                                                 f"(grey = padding)")
fig.suptitle(f"a padded batch of {H} x {W}", fontsize=9)
plt.show()

# %% [markdown]
# ## 2. The backbone: $C_3$, $C_4$, $C_5$ and their masks
#
# Every stage of a ResNet (or of the `TinyBackbone`) halves the resolution with "same"
# padding, so level $l$ with stride $s_l \in \{8, 16, 32\}$ has
# $H_l = \lceil H / s_l \rceil$, $W_l = \lceil W / s_l \rceil$. We build the `tiny` model
# with `num_feature_levels=4` so that it also has the paper's fourth level (the `tiny`
# preset itself uses 3), and with `mask_aware_norm=False`, the official model's masks
# (the `tiny` preset's default computes each level's mask as the exact valid region
# instead: [model.md §11](../docs/model.md#11-deliberate-deviations-from-the-official-implementation),
# item 10).

# %%
cfg = get_config("tiny", num_feature_levels=4, mask_aware_norm=False, seed=SEED)
model = build_model(cfg).eval()
joiner = model.backbone                         # Joiner = [Backbone, PositionEmbeddingSine]
with no_grad():
    features, level_masks, pos = joiner(images, mask)

print(f"{'level':>5} {'layer':>7} {'stride':>6} {'channels':>8} {'H_l x W_l':>10}"
      f" {'ceil(H/s) x ceil(W/s)':>22}")
for l, (f, s) in enumerate(zip(features, joiner.strides)):
    expected = (math.ceil(H / s), math.ceil(W / s))
    print(f"{l:>5} {joiner[0].return_layers[l]:>7} {s:>6} {f.shape[1]:>8} "
          f"{f.shape[2]:>4} x {f.shape[3]:<4} {expected[0]:>11} x {expected[1]}")
    assert f.shape[2:] == expected, f"level {l}: {f.shape[2:]} != {expected}"

resnet50 = build_backbone("resnet50", rng=np.random.default_rng(SEED))
print(f"\nthe paper's ResNet-50: strides {resnet50.strides}, channels {resnet50.num_channels}, "
      f"{resnet50.num_parameters() / 1e6:.1f} M parameters "
      f"({resnet50.num_parameters(trainable_only=True) / 1e6:.1f} M trained: the stem and "
      f"layer1 are frozen); TinyBackbone: {joiner.num_parameters() / 1e6:.2f} M")

# %% [markdown]
# Each level's mask is the image mask resized with PyTorch's "nearest" rule
# (`interpolate_mask`): output row $i$ reads input row
# $r(i) = \min(\lfloor \mathrm{fl}(i \cdot \mathrm{fl}(H / H_l)) \rfloor, H - 1)$, with
# $\mathrm{fl}$ the rounding to float32 (columns alike). A feature pixel is padding when
# the top-left image pixel of its cell is. We recompute it directly:

# %%
for l, m in enumerate(level_masks):
    Hl, Wl = m.shape[1:]
    rows = np.minimum(np.floor(np.arange(Hl, dtype=np.float32) * np.float32(H / Hl)), H - 1)
    cols = np.minimum(np.floor(np.arange(Wl, dtype=np.float32) * np.float32(W / Wl)), W - 1)
    direct = mask[:, rows.astype(int)][:, :, cols.astype(int)]             # (B, H_l, W_l)
    assert np.array_equal(m, direct), f"level {l}: interpolate_mask differs from the rule"
    valid = [(int((~m[b, :, 0]).sum()), int((~m[b, 0, :]).sum())) for b in range(B)]
    print(f"level {l}: mask {m.shape}; valid (rows, cols) per image: {valid}")

fig, axes = plt.subplots(2, 3, figsize=(9, 4.6))
for l in range(3):
    feature = features[l].data[1].transpose(1, 2, 0)                        # (H_l, W_l, C_l)
    viz.show_map(axes[0, l], feature, f"C{l + 3}: |feature| (image 1)", cmap="magma")
    viz.show_map(axes[1, l], level_masks[l][1], f"mask level {l}: "
                 f"{level_masks[l].shape[1]} x {level_masks[l].shape[2]}")
fig.suptitle("per-pixel norm of the (untrained) backbone features, and the level masks "
             "(white = padding)", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Input projections and the extra level
#
# The transformer works at one width $C$ (`d_model`, 256 in the paper, 64 in `tiny`).
# `input_proj[l]` maps each backbone level to $C$ channels with a $1 \times 1$ convolution
# and a GroupNorm(32). The extra level ($x^L$, stride 64) is a $3 \times 3$ stride-2
# convolution + GroupNorm applied to the **raw** $C_5$ (128 channels in `tiny`, 2048 in the
# paper), not to its projection. Its mask is resized from the *image* mask and its
# position embedding computed from that mask (`DeformableDETR.project_features`).

# %%
with no_grad():
    srcs, masks, pos_embeds = model.project_features(images, mask)
    extra = model.input_proj[3](features[2])         # the extra level, from the raw C5
for l, (s, m, p) in enumerate(zip(srcs, masks, pos_embeds)):
    print(f"level {l}: src {s.shape}, mask {m.shape}, pos {p.shape}")
print("input_proj[3] convolution weight:", model.input_proj[3][0].weight.shape,
      "= (C, C5 channels, 3, 3)")
assert model.input_proj[3][0].weight.shape == (cfg.d_model, joiner.num_channels[-1], 3, 3)
assert_allclose(srcs[3].data, extra.data, 1e-6, 1e-6, what="extra level from raw C5")
assert srcs[3].shape[2:] == (math.ceil(srcs[2].shape[2] / 2), math.ceil(srcs[2].shape[3] / 2))
assert np.array_equal(masks[3], interpolate_mask(mask, srcs[3].shape[2:]))

# %% [markdown]
# ## 4. The sine position embedding
#
# Attention does not know where a token comes from, so every pixel of every level gets a
# fixed vector computed from the level's mask alone. With running counts of valid pixels
# $\tilde y_{i,j} = \sum_{i' \le i} [\lnot m_{i',j}]$ (and $\tilde x$ along rows),
# normalised by the valid extent $h_j$ (resp. $w_i$) of that column (row):
#
# $$
# y = \frac{\tilde y - 0.5}{h + 10^{-6}} \cdot 2\pi, \qquad
# \tau_k = 10000^{2 \lfloor k/2 \rfloor / F}, \qquad
# e_k(u) = \begin{cases} \sin(u/\tau_k) & k \text{ even} \\ \cos(u/\tau_k) & k \text{ odd}\end{cases}
# $$
#
# and the embedding is $[e_0(y), \dots, e_{F-1}(y), e_0(x), \dots, e_{F-1}(x)]$, $2F = C$
# channels. We recompute it with plain NumPy from the formula, for every level:

# %%
def sine_embedding_by_formula(m, F_half, T=10000.0):
    """The formula above, written directly (float64), for a (B, H, W) mask."""
    valid = ~m
    y_t = np.cumsum(valid, axis=1).astype(np.float64)                      # (B, H, W)
    x_t = np.cumsum(valid, axis=2).astype(np.float64)
    y = (y_t - 0.5) / (y_t[:, -1:, :] + 1e-6) * 2 * np.pi
    x = (x_t - 0.5) / (x_t[:, :, -1:] + 1e-6) * 2 * np.pi
    k = np.arange(F_half)
    tau = T ** (2 * (k // 2) / F_half)                                    # (F,)
    def e(u):                                                              # (B, H, W, F)
        arg = u[..., None] / tau
        return np.where(k % 2 == 0, np.sin(arg), np.cos(arg))
    return np.concatenate([e(y), e(x)], axis=-1).transpose(0, 3, 1, 2)     # (B, 2F, H, W)


F_half = cfg.d_model // 2
for l in range(4):
    m = masks[l]
    # padded rows/columns of a level have huge arguments (see the doc); compare the valid
    # pixels tightly, the rest loosely (float32 vs float64 rounding of ~1e6 radians)
    direct = sine_embedding_by_formula(m, F_half)
    valid = ~m[:, None].repeat(cfg.d_model, axis=1)
    assert_allclose(pos_embeds[l].data[valid], direct[valid].astype(np.float32), 1e-5, 1e-5,
                    what=f"sine embedding, level {l}, valid pixels")
print("sine embedding == formula on every level (valid pixels)")

# %%
shown = {"y, k=0 (sin)": 0, "y, k=1 (cos)": 1, "y, k=8 (sin)": 8,
         "x, k=0 (sin)": F_half, "x, k=1 (cos)": F_half + 1, "x, k=8 (sin)": F_half + 8}
fig, axes = plt.subplots(2, len(shown), figsize=(12, 4.2))
for row, b in enumerate((0, 1)):
    for ax, (name, c) in zip(axes[row], shown.items()):
        ax.imshow(pos_embeds[0].data[b, c], cmap="RdBu", vmin=-1, vmax=1)
        ax.set_title(f"image {b}, {name}", fontsize=8)
        ax.set_axis_off()
fig.suptitle("position embedding channels on level 0 (C3): each image is normalised to its "
             "own valid extent, so a wave spans the image, not the padded canvas", fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Level embedding, flattening, valid ratios
#
# The sine embedding says *where* in its level a pixel is, not *which* level: the same
# normalised position has the same embedding on every level. A learned vector per level,
# `level_embed[l]` $= e_l$ ($\mathcal N(0, 1)$ at initialisation), is added:
# $\mathrm{pos}'_l = \mathrm{pos}_l + e_l$. Then the levels are flattened, level after level
# and row-major inside a level, into $S = \sum_l H_l W_l$ tokens: pixel $(i, j)$ of level
# $l$ is token $s_l + i W_l + j$ with $s_l$ = `level_start_index[l]`
# (`DeformableTransformer.flatten_levels`).
#
# The **valid ratios** $r_{b,l} = (\text{valid}_W / W_l,\ \text{valid}_H / H_l)$, counted on
# row 0 and column 0 of the level mask (`get_valid_ratio`), convert a point normalised to
# the valid image into the padded coordinates of level $l$ (notebook 6 uses them).

# %%
with no_grad():
    (src_flatten, mask_flatten, lvl_pos_embed, spatial_shapes, level_start_index,
     valid_ratios) = model.transformer.flatten_levels(srcs, masks, pos_embeds)
S = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
print(f"spatial_shapes (H_l, W_l): {spatial_shapes.tolist()}")
print(f"level_start_index: {level_start_index.tolist()}, S = {S}")
print(f"src_flatten {src_flatten.shape}, mask_flatten {mask_flatten.shape}, "
      f"pos {lvl_pos_embed.shape}, valid_ratios {valid_ratios.shape}")

rng = np.random.default_rng(SEED)
level_embed = model.transformer.level_embed.data                           # (L, C)
for _ in range(20):                                       # random pixels of random levels
    l = int(rng.integers(4))
    i, j = (int(rng.integers(n)) for n in spatial_shapes[l])
    s = level_start_index[l] + i * spatial_shapes[l, 1] + j
    assert np.array_equal(src_flatten.data[:, s], srcs[l].data[:, :, i, j]), (l, i, j)
    assert np.array_equal(mask_flatten[:, s], masks[l][:, i, j]), (l, i, j)
    assert_allclose(lvl_pos_embed.data[:, s], pos_embeds[l].data[:, :, i, j] + level_embed[l],
                    1e-6, 1e-6, what=f"pos + level_embed at level {l}, pixel ({i}, {j})")
for l in range(4):
    counted = np.stack([(~masks[l][:, 0, :]).sum(1) / masks[l].shape[2],
                        (~masks[l][:, :, 0]).sum(1) / masks[l].shape[1]], axis=-1)
    assert_allclose(valid_ratios[:, l], counted, 1e-6, 0, what=f"valid ratio level {l}")
    assert np.array_equal(get_valid_ratio(masks[l]), valid_ratios[:, l])
print("token s_l + i W_l + j == pixel (i, j) of level l; pos' = pos + level_embed[l]")
print("valid ratios (w, h) per level:")
for b in range(B):
    print(f"  image {b}: " + ", ".join(f"({r[0]:.3f}, {r[1]:.3f})" for r in valid_ratios[b]))

# %% [markdown]
# What the level embedding changes. Take one token of level 0 (the centre of image 0) and
# compare its position vector with every token of every level (cosine similarity, one
# colour scale per row). Without the level embedding (top), the same normalised place is
# the most similar one on *every* level; with it (bottom), the token's own level stands
# out and the other levels are far away.

# %%
def cosine_to_all(vector, tokens):
    return tokens @ vector / (np.linalg.norm(tokens, axis=-1) * np.linalg.norm(vector) + 1e-12)


W0 = spatial_shapes[0, 1]
valid_h0, valid_w0 = (~masks[0][0, :, 0]).sum(), (~masks[0][0, 0, :]).sum()
s0 = level_start_index[0] + (valid_h0 // 2) * W0 + valid_w0 // 2    # centre of image 0
pos_flat = lvl_pos_embed.data[0] - np.repeat(level_embed, spatial_shapes.prod(1), axis=0)
rows = {"sine embedding only": pos_flat, "+ level embedding": lvl_pos_embed.data[0]}
fig, axes = plt.subplots(2, 4, figsize=(11, 4.2))
for r, (name, tokens) in enumerate(rows.items()):
    similarity = cosine_to_all(tokens[s0], tokens)                         # (S,)
    lo, hi = similarity.min(), similarity.max()
    for l in range(4):
        Hl, Wl = spatial_shapes[l]
        start = level_start_index[l]
        level_map = similarity[start:start + Hl * Wl].reshape(Hl, Wl)      # (H_l, W_l)
        axes[r, l].imshow(level_map, cmap="viridis", vmin=lo, vmax=hi)
        axes[r, l].set_title(f"{name}\nlevel {l} ({Hl} x {Wl}), max {level_map.max():.2f}",
                             fontsize=8)
        axes[r, l].set_axis_off()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/05_backbone_and_multiscale_input.py](solutions/05_backbone_and_multiscale_input.py).
#
# 1. **Predict.** Write down the four $H_l \times W_l$ and $S$ for an $800 \times 1066$ image
#    (a $640 \times 480$ COCO picture after the resize) and for an $800 \times 1200$ batch, the
#    shape of minidetr's benchmarks. Then check the $\lceil H / s \rceil$ rule on the tiny
#    model with a $70 \times 90$ image.
# 2. **Predict.** A $100 \times 60$ image is padded to $128 \times 128$. What are its valid
#    ratios on the stride-8, 16, 32 and 64 levels? (Careful: the level masks are the image
#    mask resized with the "nearest" rule, not the image size divided by the stride.)
# 3. **Predict, then measure.** In one padded batch, a $16 \times 24$ image and a
#    $48 \times 72$ one. Which pixel of the large image has the same position embedding as
#    pixel $(5, 7)$ of the small one? Does the same *canvas* pixel have the same embedding?
# 4. **Predict.** How many parameters does going from $L = 1$ to $L = 4$ levels add to one
#    encoder layer? Which parts of the layer are shared by all levels? (Deformable DETR has no
#    per-level encoder and no FPN: its encoder layer samples every level, so information
#    already flows between scales.)

# %% [markdown]
# ## Checks
#
# If the code changes under this notebook, these fail loudly.

# %%
assert images.shape == (2, 3, H, W) and mask.shape == (2, H, W) and mask.dtype == bool
assert joiner.strides == [8, 16, 32] and joiner.num_channels == list(cfg.tiny_channels[1:])
assert resnet50.strides == [8, 16, 32] and resnet50.num_channels == [512, 1024, 2048]
assert [tuple(s.shape[2:]) for s in srcs] == [tuple(r) for r in spatial_shapes.tolist()]
assert all(s.shape[:2] == (2, cfg.d_model) for s in srcs), "projected levels must have C channels"
assert S == src_flatten.shape[1] == mask_flatten.shape[1] == lvl_pos_embed.shape[1]
assert level_start_index[0] == 0 and np.all(np.diff(level_start_index) > 0)
assert level_embed.shape == (4, cfg.d_model)
assert all((valid_ratios[b, 0] == 1.0).any() for b in range(2)), \
    "each image fills the padded canvas in at least one direction"
assert np.all((valid_ratios > 0) & (valid_ratios <= 1))
assert pos_embeds[0].requires_grad is False, "the sine embedding has no parameters"
print("all checks passed")
