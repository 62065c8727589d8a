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
# # 1. Bilinear sampling by hand
#
# **Paper:** Deformable DETR (Zhu et al., ICLR 2021), §3, Eq. (2): *"As
# $p_q + \Delta p_{mqk}$ is fractional, bilinear interpolation is applied as in Dai et al.
# (2017) in computing $x(p_q + \Delta p_{mqk})$."* Every sampling point of deformable
# attention reads the feature map this way, so this notebook takes the one operation apart:
#
# 1. the four neighbours and their weights, by hand, next to the op;
# 2. the $-\tfrac12$ that maps normalised coordinates to pixels;
# 3. the borders: zero padding and the points the op skips;
# 4. the vectorised op against an independent formula, and on a real picture;
# 5. the gradients, against finite differences.
#
# **Doc:** [deformable-attention.md](../docs/deformable-attention.md), sections 2
# ("Bilinear sampling, and why $-\tfrac12$") and 3 ("Gradients of bilinear sampling").
# **Code:** `minidetr/ops/msda/reference.py` (`bilinear_corners`, `forward`, `backward`)
# and the fast `numba` backend.

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr.lessons import viz
from minidetr.lessons.notebooks import load_example
from minidetr.ops import msda
from minidetr.ops.msda.reference import bilinear_corners
from minidetr.testing import assert_allclose, gradcheck

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
rng = np.random.default_rng(SEED)
plt.rcParams["figure.dpi"] = 80
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}; "
      f"MSDA backends here: {msda.available_backends()}")

# %% [markdown]
# ## 1. The map and the $-\tfrac12$
#
# The op receives locations in **normalised** coordinates: $x \in [0, 1]$ spans the whole
# width of the map, edges included, so pixel column $j$ covers $[j/W, (j+1)/W)$ and its
# centre is at $x = (j + \tfrac12)/W$. In pixel-index units, where column $j$ sits at
# $u = j$:
#
# $$u = x W - \tfrac12, \qquad v = y H - \tfrac12 .$$
#
# With $u_0 = \lfloor u \rfloor$, $v_0 = \lfloor v \rfloor$, $\alpha = u - u_0$,
# $\beta = v - v_0$, the sample is the weighted sum of the four neighbours
#
# $$
# s(x, y) = (1-\beta)(1-\alpha)\, V_{v_0, u_0} + (1-\beta)\,\alpha\, V_{v_0, u_0+1}
#         + \beta\,(1-\alpha)\, V_{v_0+1, u_0} + \beta\,\alpha\, V_{v_0+1, u_0+1},
# $$
#
# each neighbour weighted by the area of the rectangle *opposite* to it. A small map of
# integers keeps the arithmetic readable.

# %%
H, W = 5, 7
V = rng.integers(0, 10, size=(H, W)).astype(np.float64)      # (H, W) one channel
print(V)

x, y = 0.43, 0.33                                            # a normalised location
u, v = x * W - 0.5, y * H - 0.5                              # pixel coordinates
u0, v0 = int(np.floor(u)), int(np.floor(v))
alpha, beta = u - u0, v - v0
by_hand = {(v0, u0): (1 - beta) * (1 - alpha), (v0, u0 + 1): (1 - beta) * alpha,
           (v0 + 1, u0): beta * (1 - alpha), (v0 + 1, u0 + 1): beta * alpha}
sample_by_hand = sum(w * V[i, j] for (i, j), w in by_hand.items())
print(f"(u, v) = ({u:.3f}, {v:.3f}); alpha = {alpha:.3f}, beta = {beta:.3f}")
for (i, j), w in by_hand.items():
    print(f"  neighbour (row {i}, col {j}): V = {V[i, j]:.0f}, weight {w:.4f}")
print(f"sample by hand: {sample_by_hand:.6f}; weights sum to {sum(by_hand.values()):.6f}")

# %% [markdown]
# The op computes the same neighbours and weights, vectorised over every point
# (`bilinear_corners`, in the order top-left, top-right, bottom-left, bottom-right), and
# the full op `msda.forward` returns the same sample. Its inputs have the shapes of the
# multi-scale op: value $(N, S, M, D)$, locations $(N, L_q, M, L, K, 2)$, weights
# $(N, L_q, M, L, K)$; here $N = L_q = M = L = K = D = 1$ and the one attention weight is 1.

# %%
corners = bilinear_corners(np.array([x]), np.array([y]), H, W)
for corner, ((i, j), w) in zip(corners, by_hand.items()):
    assert int(corner.row[0]) == i * W + j, (corner.row, i, j)      # row-major pixel index
    assert abs(float(corner.weight[0]) - w) < 1e-12, (corner.weight, w)

value = V.reshape(1, H * W, 1, 1)                                   # (N, S, M, D)
shapes, starts = np.array([[H, W]]), np.array([0])                   # (L, 2), (L,)
location = np.array([x, y]).reshape(1, 1, 1, 1, 1, 2)               # (N, Lq, M, L, K, 2)
one = np.ones((1, 1, 1, 1, 1))                                      # (N, Lq, M, L, K)
for backend in msda.available_backends():
    out = msda.forward(value, shapes, starts, location, one, backend=backend)  # (1, 1, 1)
    print(f"msda.forward ({backend}): {out.item():.6f}")
    assert abs(out.item() - sample_by_hand) < 1e-12

fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), gridspec_kw={"width_ratios": [1.5, 1]})
viz.draw_bilinear_neighbourhood(axes[0], V, x, y)
viz.draw_bilinear_neighbourhood(axes[1], V, x, y, zoom=True, title="zoomed: the four weights")
plt.show()

# %% [markdown]
# **Pixel centres are read exactly.** At $x = (j + \tfrac12)/W$ we get $u = j$, $\alpha = 0$:
# the whole weight goes to one pixel. The encoder's reference points are pixel centres,
# so a point with zero offset reads its own pixel. One call samples all $HW$ centres
# ($L_q = HW$ queries) and must return the map itself.

# %%
jj, ii = np.meshgrid(np.arange(W), np.arange(H))                     # (H, W) each
centres = np.stack([(jj + 0.5) / W, (ii + 0.5) / H], axis=-1)        # (H, W, 2) (x, y)
locations = centres.reshape(1, H * W, 1, 1, 1, 2)                    # (N, Lq, M, L, K, 2)
out = msda.forward(value, shapes, starts, locations, np.ones((1, H * W, 1, 1, 1)))
assert_allclose(out.reshape(H, W), V, rtol=0, atol=1e-12, what="samples at pixel centres")
print("sampling every pixel centre returns the map: OK")

# %% [markdown]
# ## 2. Borders: zero padding, and the points the op skips
#
# A neighbour outside the map counts as $V = 0$. So at the left edge $x = 0$
# ($u = -\tfrac12$) the sample is half of column 0; at $u \le -1$ all four neighbours are
# outside and the sample is 0. The official CUDA op (and ours) does not even visit such
# points: it samples only when $-1 < u < W$ and $-1 < v < H$. The profile along one row
# shows the three regimes: linear between pixel centres, a ramp down to 0 over the last
# half pixel of padding, then 0.

# %%
row = 2
y_row = (row + 0.5) / H                                              # through the centres
xs = np.linspace(-0.25, 1.25, 121 if SMALL else 601)                 # beyond both edges
loc = np.stack([xs, np.full_like(xs, y_row)], -1).reshape(1, -1, 1, 1, 1, 2)
profile = msda.forward(value, shapes, starts, loc, np.ones((1, xs.size, 1, 1, 1))).ravel()

fig, ax = plt.subplots(figsize=(8, 3))
ax.plot(xs, profile, label="s(x, y) along the row")
ax.plot((np.arange(W) + 0.5) / W, V[row], "o", label="pixel centres $(j + 1/2)/W$")
for edge in (0, 1):
    ax.axvline(edge, color="tab:blue", linewidth=1)
for skip in (-0.5 / W, 1 + 0.5 / W):                                 # u = -1 and u = W
    ax.axvline(skip, color="tab:red", linestyle=":", linewidth=1)
ax.set_xlabel("normalised x  (blue: map edges; red dotted: u = -1 and u = W)")
ax.legend(fontsize=8)
plt.show()

edge = msda.forward(value, shapes, starts, np.array([0.0, y_row]).reshape(1, 1, 1, 1, 1, 2),
                    one).item()
print(f"s(x = 0) = {edge} = V[{row}, 0] / 2 = {V[row, 0] / 2}")
assert edge == V[row, 0] / 2
assert np.all(profile[(xs <= -0.5 / W) | (xs >= 1 + 0.5 / W)] == 0), "outside must read 0"

# %% [markdown]
# Near a corner, three of the four neighbours lie in the padding: their rectangles still
# have an area, but they multiply a zero. Only the corner pixel contributes, with the
# weight of its (purple) rectangle.

# %%
xc, yc = 0.02, 0.05
corner_sample = msda.forward(value, shapes, starts, np.array([xc, yc]).reshape(1, 1, 1, 1, 1, 2),
                             one).item()
uc, vc = xc * W - 0.5, yc * H - 0.5
print(f"(u, v) = ({uc:.2f}, {vc:.2f}); sample {corner_sample:.4f} = "
      f"{(uc + 1) * (vc + 1):.4f} * V[0, 0] = {(uc + 1) * (vc + 1) * V[0, 0]:.4f}")
assert abs(corner_sample - (uc + 1) * (vc + 1) * V[0, 0]) < 1e-12
fig, ax = plt.subplots(figsize=(4.5, 4))
viz.draw_bilinear_neighbourhood(ax, V, xc, yc, zoom=True)
plt.show()

# %% [markdown]
# The same in two dimensions: the op sampled on a grid ten times finer than the map,
# reaching half a map beyond it on every side. Inside, the picture is the bilinear
# interpolation of the map; around it, the values fade to zero within half a pixel.

# %%
fine = 40 if SMALL else 120
gx, gy = np.meshgrid(np.linspace(-0.15, 1.15, fine), np.linspace(-0.15, 1.15, fine))
grid = np.stack([gx, gy], -1).reshape(1, -1, 1, 1, 1, 2)             # (1, fine^2, 1, 1, 1, 2)
upsampled = msda.forward(value, shapes, starts, grid,
                         np.ones((1, fine * fine, 1, 1, 1))).reshape(fine, fine)
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
axes[0].imshow(V, cmap="gray", extent=(0, 1, 1, 0), interpolation="nearest")
axes[0].set_title("the map V (H x W = 5 x 7), x and y normalised", fontsize=9)
axes[1].imshow(upsampled, cmap="gray", extent=(-0.15, 1.15, 1.15, -0.15))
axes[1].add_patch(plt.Rectangle((0, 0), 1, 1, fill=False, edgecolor="tab:blue"))
axes[1].set_title("msda.forward on a finer grid (blue: the map's extent)", fontsize=9)
plt.show()

# %% [markdown]
# ## 3. The vectorised op against an independent formula
#
# Written over *all* pixels, bilinear interpolation is a sum with the tent kernel
# $\kappa(t) = \max(0, 1 - |t|)$:
#
# $$ s(x, y) = \sum_{i, j} V_{ij}\; \kappa(v - i)\, \kappa(u - j). $$
#
# No floors, no corner bookkeeping, no special case at the borders: a good oracle. We
# draw random points, a third of them outside the map, and compare both backends with it.

# %%
n_points = 300 if SMALL else 3000
points = rng.uniform(-0.3, 1.3, size=(n_points, 2))                 # (P, 2) normalised (x, y)
pu, pv = points[:, 0] * W - 0.5, points[:, 1] * H - 0.5             # (P,) pixel coordinates
tent = lambda t: np.maximum(0.0, 1.0 - np.abs(t))                   # noqa: E731
oracle = np.einsum("ij,pi,pj->p", V, tent(pv[:, None] - np.arange(H)),
                   tent(pu[:, None] - np.arange(W)))                # (P,)

locs = points.reshape(1, n_points, 1, 1, 1, 2)                       # (N, Lq, M, L, K, 2)
ones = np.ones((1, n_points, 1, 1, 1))
worst = {}
for backend in msda.available_backends():
    got = msda.forward(value, shapes, starts, locs, ones, backend=backend).ravel()
    assert_allclose(got, oracle, rtol=0, atol=1e-12, what=f"{backend} vs tent formula")
    worst[backend] = np.abs(got - oracle).max()
print(f"{n_points} points, largest |op - tent formula|: "
      + ", ".join(f"{b} {e:.1e}" for b, e in worst.items()))

# %% [markdown]
# ## 4. On a real picture: the op is an image resampler
#
# With $D = 3$ channels the value is a colour picture and every query one output pixel:
# sampling it on a rotated and zoomed grid (one point per query, weight 1) warps the
# picture, exactly as `grid_sample` would. Whatever falls outside reads zero padding
# (black).

# %%
example = load_example(0)                      # giraffes (COCO 72), (H, W, 3) in [0, 1]
picture = example.image[::2, ::2] if SMALL else example.image        # (Hp, Wp, 3)
Hp, Wp = picture.shape[:2]
out_h, out_w = (48, 32) if SMALL else (192, 128)
angle, zoom = np.deg2rad(25), 1.15                # rotate, and see a bit more
oy, ox = np.meshgrid(np.linspace(-0.5, 0.5, out_h), np.linspace(-0.5, 0.5, out_w),
                     indexing="ij")                                  # (out_h, out_w)
sx = 0.5 + zoom * (np.cos(angle) * ox - np.sin(angle) * oy * Hp / Wp)
sy = 0.5 + zoom * (np.sin(angle) * ox * Wp / Hp + np.cos(angle) * oy)
warp = np.stack([sx, sy], -1).reshape(1, -1, 1, 1, 1, 2).astype(np.float32)
picture_value = picture.reshape(1, Hp * Wp, 1, 3)                    # (N, S, M=1, D=3)
warp_weights = np.ones((1, out_h * out_w, 1, 1, 1), np.float32)
warped = {b: msda.forward(picture_value, np.array([[Hp, Wp]]), starts, warp, warp_weights,
                          backend=b).reshape(out_h, out_w, 3)
          for b in msda.available_backends()}
fig, axes = plt.subplots(1, 2, figsize=(6, 4.2))
viz.show_map(axes[0], picture, f"value: a {Hp} x {Wp} picture, D = 3")
viz.show_map(axes[1], np.clip(warped["numpy"], 0, 1),
             f"msda.forward, {out_h} x {out_w} queries")
plt.show()
if "numba" in warped:
    assert_allclose(warped["numba"], warped["numpy"], rtol=1e-5, atol=1e-6,
                    what="numba vs numpy on the picture")
print(f"float32 in, {warped['numpy'].dtype} out; backends agree: OK")

# %% [markdown]
# ## 5. Gradients, against finite differences
#
# $s$ is linear in the map, so $\partial s / \partial V_c = w_c$ for the four neighbours
# (zero elsewhere). In the location it is piecewise bilinear:
#
# $$
# \frac{\partial s}{\partial u} = (1-\beta)\,(V_{v_0, u_0+1} - V_{v_0, u_0})
#                               + \beta\,(V_{v_0+1, u_0+1} - V_{v_0+1, u_0}),
# \qquad \frac{\partial s}{\partial x} = W \frac{\partial s}{\partial u},
# $$
#
# and likewise $\partial s/\partial y = H\,\partial s/\partial v$ with the roles of
# $\alpha$ and $\beta$ swapped. With an attention weight $a$ the output is $o = a\,s$, so
# $\partial o/\partial a = s$ and every other gradient is multiplied by $a$.
# `msda.backward` returns all three gradients for an upstream gradient $g$
# ($g = 1$ here). We check each against central differences of `msda.forward` in float64.

# %%
a = 0.7
weight = np.full((1, 1, 1, 1, 1), a)
g = np.ones((1, 1, 1))                                               # dL/d out: (N, Lq, M*D)
grad_value, grad_loc, grad_attn = msda.backward(g, value, shapes, starts, location, weight)

def forward_at(val=value, loc=location, attn=weight):
    return msda.forward(val, shapes, starts, loc, attn).item()

eps = 1e-6
numeric = {}
for name, axis in (("x", 0), ("y", 1)):
    step = np.zeros(2)
    step[axis] = eps
    step = step.reshape(1, 1, 1, 1, 1, 2)                            # like location
    plus, minus = location + step, location - step
    numeric[name] = (forward_at(loc=plus) - forward_at(loc=minus)) / (2 * eps)
numeric["a"] = (forward_at(attn=weight + eps) - forward_at(attn=weight - eps)) / (2 * eps)
analytic = {"x": grad_loc.ravel()[0], "y": grad_loc.ravel()[1], "a": grad_attn.item()}

# by hand, from the formulas above
ds_du = (1 - beta) * (V[v0, u0 + 1] - V[v0, u0]) + beta * (V[v0 + 1, u0 + 1] - V[v0 + 1, u0])
ds_dv = (1 - alpha) * (V[v0 + 1, u0] - V[v0, u0]) + alpha * (V[v0 + 1, u0 + 1] - V[v0, u0 + 1])
formula = {"x": a * W * ds_du, "y": a * H * ds_dv, "a": sample_by_hand}
for name in analytic:
    print(f"d out / d {name}: backward {analytic[name]: .8f}   formula {formula[name]: .8f}   "
          f"finite differences {numeric[name]: .8f}")
    assert abs(analytic[name] - numeric[name]) < 1e-6 and abs(analytic[name] - formula[name]) < 1e-9

# the value gradient: a * w_c on the four neighbours, zero elsewhere
expected = np.zeros((H, W))
for (i, j), w in by_hand.items():
    expected[i, j] = a * w
assert_allclose(grad_value.reshape(H, W), expected, rtol=0, atol=1e-12, what="grad_value")
print("grad_value = a * (bilinear weights) on the four neighbours: OK")

# %% [markdown]
# **Many points at once.** `minidetr.testing.gradcheck` does the same for every element
# of value, locations and weights of a random problem with several heads, levels and
# points (float64, random upstream gradient), through the autograd Function
# `ms_deform_attn` that the model uses.

# %%
N, Lq, M, L, K, D = 1, 3, 2, 2, 2, 3
level_shapes = np.array([[4, 5], [2, 3]])                            # (L, 2)
level_starts = np.array([0, 20])                                     # (L,)
S = int((level_shapes[:, 0] * level_shapes[:, 1]).sum())
rand_value = rng.normal(size=(N, S, M, D))
rand_locs = rng.uniform(0.05, 0.95, size=(N, Lq, M, L, K, 2))
rand_attn = rng.dirichlet(np.ones(L * K), size=(N, Lq, M)).reshape(N, Lq, M, L, K)

def op(val, loc, attn):
    return msda.ms_deform_attn(val, level_shapes, level_starts, loc, attn, backend="numpy")

result = gradcheck(op, [rand_value, rand_locs, rand_attn])
print(result)

# %% [markdown]
# **Kinks.** The derivative in $x$ is piecewise constant: it jumps wherever $u$ crosses an
# integer (a pixel centre, where the pair of columns changes) and at the skip lines.
# There `floor` picks the cell on the right, so the kernels return the right-hand
# derivative, as `grid_sample`'s backward does, with one exception: exactly on $u = -1$
# (or $v = -1$) the point is skipped and its gradient is 0, where the right-hand derivative
# is $W\,V_{	ext{row}, 0} 
e 0$. On $u = W$ (or $v = H$) both right-hand neighbours are
# outside, so the right-hand derivative is 0 anyway and the skip changes nothing (exercise
# 1 measures both). Finite differences straddling a kink average the two sides, which is
# why gradient tests keep their random points away from pixel centres.

# %%
xs_fine = np.linspace(-0.2, 1.2, 141 if SMALL else 701)
loc_row = np.stack([xs_fine, np.full_like(xs_fine, y_row)], -1).reshape(1, -1, 1, 1, 1, 2)
ones_row = np.ones((1, xs_fine.size, 1, 1, 1))
_, dloc, _ = msda.backward(np.ones((1, xs_fine.size, 1)), value, shapes, starts, loc_row, ones_row)
fig, axes = plt.subplots(2, 1, figsize=(8, 4.5), sharex=True)
axes[0].plot(xs_fine, msda.forward(value, shapes, starts, loc_row, ones_row).ravel())
axes[0].set_ylabel("s(x)")
axes[1].step(xs_fine, dloc[0, :, 0, 0, 0, 0], where="post", color="tab:orange")
axes[1].set_ylabel("ds/dx (backward)")
for ax in axes:
    for c in (np.arange(W) + 0.5) / W:
        ax.axvline(c, color="0.8", linewidth=0.6)
axes[1].set_xlabel("normalised x (grey: pixel centres, where ds/dx jumps)")
plt.show()

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/01_bilinear_sampling.py](solutions/01_bilinear_sampling.py).
#
# 1. **Predict.** On the two skip lines $u = -1$ and $u = W$ the op returns $\partial s/\partial x = 0$.
#    `grid_sample`'s backward returns the right-hand derivative there (`floor` picks the cell on
#    the right). On which of the two lines do they differ, and why not on the other? Check with
#    one-sided finite differences of `msda.forward`.
# 2. **Implement, and watch checks fail.** Write `sample_align_corners(x, y)` with
#    `align_corners=True` ($u = x\,(W - 1)$: $x = 0$ and $x = 1$ are the centres of the outer
#    columns). Which of this notebook's checks fail with it: "pixel centres are read exactly",
#    "$s(x = 0) = V_{\text{row}, 0}/2$"? Where do the two conventions agree?
# 3. **Break something.** Compute the value gradient of two points that share neighbours with
#    NumPy fancy indexing, `grad[rows] += weights`, instead of a scatter-add (`np.add.at`).
#    What do finite differences say? (NumPy buffers fancy-index `+=`: a repeated row gets only
#    its last contribution.)
# 4. **Predict.** How many entries of `grad_value` does one point make non-zero: inside the map,
#    exactly on the left edge $x = 0$, near the top-left corner at $(0.02, 0.05)$, and at
#    $x = -0.2$?

# %% [markdown]
# ## Checks
#
# These fail loudly if the op changes under this notebook.

# %%
assert abs(sum(by_hand.values()) - 1) < 1e-12, "bilinear weights must sum to 1"
assert abs(forward_at(attn=one) - sample_by_hand) < 1e-12, "the op must match the hand sample"
assert upsampled.shape == (fine, fine) and upsampled.min() >= 0
assert warped["numpy"].shape == (out_h, out_w, 3) and warped["numpy"].dtype == np.float32
assert edge == V[row, 0] / 2 and profile.max() <= V[row].max(), "border and range of the profile"
assert result.max_error < 1e-6, result
assert grad_value.shape == value.shape and grad_loc.shape == location.shape
assert grad_attn.shape == weight.shape
print("all checks passed")
