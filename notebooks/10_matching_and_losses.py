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
# # 10. Matching and losses
#
# **Paper:** Deformable DETR keeps DETR's training objective (§4.1), with the focal loss
# for classification (§5, implementation details). From DETR (Carion et al., 2020,
# §3.1): the model predicts a fixed *set* of boxes, a bipartite (Hungarian)
# matching decides which prediction answers which object,
#
# $$
# \hat\sigma = \arg\min_{\sigma} \sum_{t=1}^{T} \mathcal{C}\big(\sigma(t), t\big),
# \qquad
# \mathcal{C}(q, t) = \lambda_{\text{cls}}\, \mathcal{C}_{\text{cls}}(q, t)
#  + \lambda_{\text{L1}} \lVert \hat b_q - b_t \rVert_1
#  - \lambda_{\text{giou}}\, \mathrm{GIoU}(\hat b_q, b_t),
# $$
#
# and the losses are computed on the matched pairs: the sigmoid focal loss (Lin et al.,
# 2017) on the classes, L1 and generalised IoU (Rezatofighi et al., 2019) on the boxes.
# Weights: $\lambda_{\text{cls}} = 2$, $\lambda_{\text{L1}} = 5$, $\lambda_{\text{giou}} = 2$
# in the cost and in the loss. This notebook, on one small example with numbers:
#
# 1. the cost matrix, term by term;
# 2. the Hungarian assignment, against brute force and against a greedy choice;
# 3. the focal loss and its gradient;
# 4. L1 and GIoU, with a picture of GIoU;
# 5. the whole `SetCriterion`, checked against the pieces.
#
# **Doc:** [matching-and-losses.md](../docs/matching-and-losses.md) (all sections).
# **Code:** `minidetr/models/matcher.py` (`HungarianMatcher`, `match_single`),
# `criterion.py` (`sigmoid_focal_loss`, `SetCriterion`), `box_ops.py`. No model is needed:
# the predictions are written by hand.

# %%
import itertools
import os

import matplotlib.pyplot as plt
import numpy as np

from minidetr.autograd import Tensor
from minidetr.lessons import viz_model as vm
from minidetr.lessons.notebooks import load_example
from minidetr.models import (HungarianMatcher, SetCriterion, box_cxcywh_to_xyxy, box_iou,
                             box_xyxy_to_cxcywh, build_weight_dict, elementwise_box_iou,
                             generalized_box_iou, match_single, sigmoid_focal_loss)
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
plt.rcParams["figure.dpi"] = 80
np.set_printoptions(precision=3, suppress=True)
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED} (nothing random below)")

# %% [markdown]
# ## The example
#
# The cat picture has $T = 4$ objects of 3 classes: a cat, two overlapping remotes and a
# potted plant (its "couch" box is left out to keep the tables small). A detector with
# $Q = 6$ queries made the predictions below (written by hand): class logits over the 3
# classes, and boxes. Query 1 sits between the two remotes; query 5 is background.

# %%
example = load_example(2)
CLASSES = ["cat", "remote", "potted plant"]
keep = sorted((i for i, name in enumerate(example.labels) if name in CLASSES),   # cat, the
              key=lambda i: (CLASSES.index(example.labels[i]), example.boxes[i, 1]))  # upper
#                                                         remote, the lower one, the plant
H, W = example.image.shape[:2]
scale = np.float32([W, H, W, H])
tgt_labels = np.array([CLASSES.index(example.labels[i]) for i in keep])         # (T,)
tgt_boxes = box_xyxy_to_cxcywh(example.boxes[keep]) / scale                      # (T, 4)

pred_xyxy = np.float32([[10, 30, 230, 235],      # q0: the cat, roughly
                        [244, 106, 362, 152],    # q1: between the two remotes, confident
                        [240, 96, 348, 134],     # q2: the upper remote, less confident
                        [300, 150, 384, 200],    # q3: a poor box near the lower remote
                        [320, 10, 380, 150],     # q4: the plant
                        [100, 180, 200, 240]])   # q5: background
pred_logits = np.float32([[2.0, -3, -3], [-3, 1.5, -3], [-3, 0.0, -3],
                          [-3, -2.0, -3], [-3, -3, 0.5], [-4, -4, -4]])         # (Q, 3)
pred_boxes = box_xyxy_to_cxcywh(pred_xyxy) / scale                                # (Q, 4)
Q, T = len(pred_boxes), len(tgt_boxes)
outputs = {"pred_logits": pred_logits[None], "pred_boxes": pred_boxes[None]}      # batch of 1
targets = [{"labels": tgt_labels, "boxes": tgt_boxes}]
print("targets:", [f"{t}: {CLASSES[c]}" for t, c in enumerate(tgt_labels)])
print("class probabilities sigma(logits), one row per query:\n", 1 / (1 + np.exp(-pred_logits)))

fig, ax = plt.subplots(figsize=(7.5, 4.9))
vm.show_image(ax, example.image, title="targets (dashed white) and the 6 predictions")
vm.draw_boxes(ax, tgt_boxes, (H, W), colour="white", linestyle="--",
              labels=[f"t{t} {CLASSES[c]}" for t, c in enumerate(tgt_labels)])
vm.draw_boxes(ax, pred_boxes, (H, W), colour=[f"C{q}" for q in range(Q)],
              labels=[f"q{q}" for q in range(Q)])
plt.show()

# %% [markdown]
# ## 1. The cost matrix, term by term
#
# **Class cost.** With $p = \sigma(x_{q, c_t})$, the probability query $q$ gives to target
# $t$'s class, $\alpha = 0.25$, $\gamma = 2$:
#
# $$
# \mathcal{C}_{\text{cls}}(q, t) = \alpha (1-p)^\gamma \big(-\log p\big)
#   - (1-\alpha)\, p^\gamma \big(-\log(1 - p)\big):
# $$
#
# the focal loss of that logit if it were a positive minus its focal loss as a negative,
# i.e. exactly how much the classification loss changes if $q$ is matched to $t$.
# **Box costs.** The L1 distance of the normalised $(c_x, c_y, w, h)$, and the GIoU of the
# corners. We compute the three terms in NumPy and compare with `HungarianMatcher`.

# %%
matcher = HungarianMatcher(cost_class=2.0, cost_bbox=5.0, cost_giou=2.0)
alpha, gamma = 0.25, 2.0
p = 1 / (1 + np.exp(-pred_logits[:, tgt_labels].astype(np.float64)))               # (Q, T)
cost_class = alpha * (1 - p) ** gamma * -np.log(p + 1e-8) \
    - (1 - alpha) * p ** gamma * -np.log(1 - p + 1e-8)
cost_l1 = np.abs(pred_boxes[:, None] - tgt_boxes[None]).sum(-1)                   # (Q, T)


def giou_by_hand(a, b):
    """GIoU of (x0, y0, x1, y1) corners, a (A, 4) and b (B, 4) -> (A, B), plain NumPy."""
    a, b = a[:, None].astype(np.float64), b[None].astype(np.float64)
    area = lambda box: (box[..., 2] - box[..., 0]) * (box[..., 3] - box[..., 1])
    wh_i = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
    inter = wh_i[..., 0] * wh_i[..., 1]
    union = area(a) + area(b) - inter
    wh_c = np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2])
    enclosing = wh_c[..., 0] * wh_c[..., 1]
    return inter / union - (enclosing - union) / enclosing


cost_giou = -giou_by_hand(box_cxcywh_to_xyxy(pred_boxes), box_cxcywh_to_xyxy(tgt_boxes))
cost = 2.0 * cost_class + 5.0 * cost_l1 + 2.0 * cost_giou                          # (Q, T)
cost_matcher = matcher.cost_matrix(outputs, targets)[0]                           # (Q, T)
assert_allclose(cost_matcher, cost, 1e-5, 1e-5, what="cost matrix vs the formula")
print("cost matrix (rows: queries, columns: targets) == the formula:\n", cost_matcher)

fig, axes = plt.subplots(1, 4, figsize=(13, 3))
terms = {"class cost $\\mathcal{C}_{cls}$": cost_class, "L1 distance": cost_l1,
         "$-$GIoU": cost_giou, "total $2 C_{cls} + 5 L1 - 2 GIoU$": cost}
for ax, (name, values) in zip(axes, terms.items()):
    vm.draw_cost_matrix(ax, values)
    ax.set_title(name, fontsize=9)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The Hungarian assignment
#
# `match_single` hands the $Q \times T$ matrix to `scipy.optimize.linear_sum_assignment`
# (a shortest-augmenting-path form of the Hungarian / Jonker–Volgenant algorithm,
# $O(Q T^2)$ here). With $Q = 6$ and $T = 4$ there are only $6 \cdot 5 \cdot 4 \cdot 3 =
# 360$ one-to-one assignments, so we can also try them all. A **greedy** choice (take the
# cheapest remaining pair, repeat) is not the same thing: it gives query 1, the cheapest
# pair overall for the upper remote, to that remote, and is left with a poor query for
# the lower one.

# %%
pred_idx, tgt_idx = match_single(cost_matcher)
hungarian_total = cost_matcher[pred_idx, tgt_idx].sum()

brute = min(itertools.permutations(range(Q), T),                  # sigma(t) for t = 0..T-1
            key=lambda sigma: cost_matcher[list(sigma), range(T)].sum())
brute_total = cost_matcher[list(brute), range(T)].sum()

remaining = cost_matcher.copy()
greedy = {}
for _ in range(T):
    q, t = np.unravel_index(np.argmin(remaining), remaining.shape)
    greedy[int(t)] = int(q)
    remaining[q, :], remaining[:, t] = np.inf, np.inf
greedy_total = sum(cost_matcher[q, t] for t, q in greedy.items())

print(f"Hungarian:   target -> query {dict(sorted(zip(tgt_idx.tolist(), pred_idx.tolist())))}, "
      f"total cost {hungarian_total:.3f}")
print(f"brute force: target -> query {dict(enumerate(brute))}, total cost {brute_total:.3f} "
      f"(over {len(list(itertools.permutations(range(Q), T)))} assignments)")
print(f"greedy:      target -> query {dict(sorted(greedy.items()))}, total cost {greedy_total:.3f}")
assert np.isclose(hungarian_total, brute_total) and \
    dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == dict(enumerate(brute))
assert greedy_total > hungarian_total + 1.0, "the greedy choice should be clearly worse here"

fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
vm.draw_cost_matrix(axes[0], cost_matcher, (pred_idx, tgt_idx))
axes[0].set_title("the optimal assignment (red)", fontsize=9)
for ax, (name, pairs) in zip(axes[1:], (("Hungarian", dict(zip(tgt_idx, pred_idx))),
                                        ("greedy", greedy))):
    total = sum(cost_matcher[q, t] for t, q in pairs.items())
    vm.show_image(ax, example.image, title=f"{name}: total cost {total:.2f} (the remotes)")
    for t, q in ((t, q) for t, q in pairs.items() if CLASSES[tgt_labels[t]] == "remote"):
        vm.draw_boxes(ax, tgt_boxes[t], (H, W), colour="white", linestyle="--")
        vm.draw_boxes(ax, pred_boxes[q], (H, W), colour=f"C{q}", labels=[f"q{q} -> t{t}"])
    ax.set_xlim(215, W - 0.5)                      # zoom on the two remotes
    ax.set_ylim(190, 85)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The sigmoid focal loss
#
# Each (query, class) logit is a binary problem: its target $t_{q,c}$ is 1 if query $q$
# is matched to an object of class $c$, else 0 (unmatched queries: all zeros). With
# $p = \sigma(x)$, $p_t = p\,t + (1-p)(1-t)$, $\alpha_t = \alpha t + (1-\alpha)(1-t)$:
#
# $$
# \mathrm{FL}(x, t) = \alpha_t\,(1 - p_t)^\gamma\, \mathrm{BCE}(x, t), \qquad
# \mathrm{BCE}(x, t) = \operatorname{softplus}(x) - t\,x, \qquad
# \texttt{loss\_ce} = \frac{1}{\mathcal N} \sum_{q, c} \mathrm{FL}(x_{q,c}, t_{q,c}),
# $$
#
# with $\mathcal N = \max(1, T)$ the number of objects. The factor $(1-p_t)^\gamma$ shrinks
# the loss of the easy logits (most of them: every unmatched query, every wrong class).

# %%
onehot = np.zeros((Q, 3), np.float32)
onehot[pred_idx, tgt_labels[tgt_idx]] = 1                                          # (Q, 3)
x = pred_logits.astype(np.float64)
p_all = 1 / (1 + np.exp(-x))
p_t = p_all * onehot + (1 - p_all) * (1 - onehot)
alpha_t = alpha * onehot + (1 - alpha) * (1 - onehot)
bce = np.logaddexp(0, x) - onehot * x
focal = alpha_t * (1 - p_t) ** gamma * bce                                        # (Q, 3)
print("target one-hot (rows: queries):\n", onehot)
print("focal loss per logit:\n", np.array2string(focal, formatter={"float_kind": "{:.1e}".format}))
print(f"BCE would give {bce.sum() / T:.3f}; the focal loss gives {focal.sum() / T:.3f}: "
      f"the easy logits (p_t > 0.9) carry {bce[p_t > 0.9].sum() / bce.sum():.0%} of the BCE "
      f"but {focal[p_t > 0.9].sum() / focal.sum():.0%} of the focal loss")

logits_t = Tensor(pred_logits.astype(np.float64), requires_grad=True)
loss_ce = sigmoid_focal_loss(logits_t, onehot, num_boxes=float(T))
assert_allclose(loss_ce.item(), focal.sum() / T, 1e-10, 0, what="loss_ce vs the formula")
loss_ce.backward()
grad_positive = alpha * (1 - p_all) ** gamma * (gamma * p_all * np.log(p_all) - (1 - p_all))
grad_negative = (1 - alpha) * p_all ** gamma * (p_all - gamma * (1 - p_all) * np.log(1 - p_all))
grad_formula = np.where(onehot == 1, grad_positive, grad_negative) / T
assert_allclose(logits_t.grad, grad_formula, 1e-9, 1e-12, what="focal loss gradient")
print(f"loss_ce = {loss_ce.item():.4f}; autograd gradient == the closed forms of the doc")

# %%
pp = np.linspace(0.001, 0.999, 300)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for g in (0.0, 1.0, 2.0, 5.0):
    axes[0].plot(pp, (1 - pp) ** g * -np.log(pp), label=f"$\\gamma$ = {g:g}")
    d = (1 - pp) ** g * (g * pp * np.log(pp) - (1 - pp))
    axes[1].plot(pp, -d, label=f"$\\gamma$ = {g:g}")
axes[0].set_title(r"positive: $(1-p)^\gamma \cdot (-\log p)$ (without $\alpha$)", fontsize=9)
axes[1].set_title(r"positive: $-\partial \mathrm{FL} / \partial x$ (without $\alpha$)", fontsize=9)
for ax in axes:
    ax.set_xlabel("p, the probability of the true class")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
axes[0].set_ylim(0, 4)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The box losses: L1 and GIoU
#
# Over the matched pairs only:
#
# $$
# \texttt{loss\_bbox} = \frac{1}{\mathcal N} \sum_{(q,t)} \lVert \hat b_q - b_t \rVert_1,
# \qquad
# \texttt{loss\_giou} = \frac{1}{\mathcal N} \sum_{(q,t)} \big(1 - \mathrm{GIoU}(\hat b_q, b_t)\big),
# \qquad
# \mathrm{GIoU} = \frac{I}{U} - \frac{|C| - U}{|C|},
# $$
#
# with $I$ the intersection, $U$ the union and $C$ the smallest enclosing box. L1 weighs
# a 10-pixel error the same on a small and on a large box; GIoU is scale invariant.

# %%
src, tgt = pred_boxes[pred_idx], tgt_boxes[tgt_idx]                               # (P, 4)
l1_pairs = np.abs(src - tgt).sum(-1)
giou_pairs = np.diag(giou_by_hand(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt)))
print(f"{'pair':>8} {'L1':>7} {'IoU':>7} {'GIoU':>7} {'1 - GIoU':>9}")
iou_pairs, _ = elementwise_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))   # (P,)
for q, t, a, i, g in zip(pred_idx, tgt_idx, l1_pairs, iou_pairs, giou_pairs):
    print(f"q{q} -> t{t} {a:7.3f} {i:7.3f} {g:7.3f} {1 - g:9.3f}")
print(f"loss_bbox = {l1_pairs.sum() / T:.4f}, loss_giou = {(1 - giou_pairs).sum() / T:.4f}")
assert_allclose(giou_pairs, np.diag(generalized_box_iou(box_cxcywh_to_xyxy(src),
                                                         box_cxcywh_to_xyxy(tgt))), 1e-5, 1e-6,
                what="GIoU by hand vs box_ops")

# %% [markdown]
# **GIoU, pictured.** Left: an overlapping pair from the example. Middle: two disjoint
# boxes, where IoU is 0 whatever the distance, but GIoU is negative and keeps falling as
# they move apart, because the empty part of the enclosing box $C$ grows. Right: sliding
# one box across the other: IoU is flat (zero gradient) as soon as they stop overlapping,
# GIoU still says which way to move.

# %%
q_show, t_show = pred_idx[1], tgt_idx[1]
fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
_, iou_a, giou_a = vm.draw_giou(axes[0], pred_xyxy[q_show], example.boxes[keep][t_show],
                                names=(f"q{q_show}", f"t{t_show}"))
_, iou_b, giou_b = vm.draw_giou(axes[1], [0, 0, 4, 3], [6, 2, 9, 6])
axes[1].legend(fontsize=7, loc="lower left")
assert np.isclose(giou_a, giou_by_hand(pred_xyxy[q_show][None],
                                       example.boxes[keep][t_show][None])[0, 0])
assert iou_b == 0 and -1 < giou_b < 0

shifts = np.linspace(-8, 8, 161 if not SMALL else 41)
a = np.array([[0.0, 0.0, 4.0, 3.0]])
moved = np.stack([np.array([s, 0.5, s + 4.0, 3.5]) for s in shifts])             # (n, 4)
axes[2].plot(shifts, box_iou(moved, a)[0][:, 0], label="IoU")       # (iou, union)
axes[2].plot(shifts, generalized_box_iou(moved, a)[:, 0], label="GIoU")
axes[2].axhline(0, color="0.6", linewidth=0.8)
axes[2].set_xlabel("horizontal shift of a 4 x 3 box against another")
axes[2].legend(fontsize=7)
axes[2].grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. The whole criterion
#
# `SetCriterion` runs the matcher and the three losses, each divided by
# $\mathcal N = \max(1, \sum_i T_i)$, and two logging numbers without gradient
# (`class_error`, `cardinality_error`). The weighted total is
# $2\,\texttt{loss\_ce} + 5\,\texttt{loss\_bbox} + 2\,\texttt{loss\_giou}$ (plus the same for
# every auxiliary decoder layer and the two-stage proposals, notebooks 8 and 9).

# %%
criterion = SetCriterion(3, matcher, build_weight_dict(aux_loss=False))
losses = criterion({"pred_logits": Tensor(outputs["pred_logits"]),
                    "pred_boxes": Tensor(outputs["pred_boxes"])}, targets)
for key, value in losses.items():
    print(f"  {key:<18} {value.item():.4f}")
total = criterion.total(losses)
print(f"weighted total = {total.item():.4f}")
assert_allclose(losses["loss_ce"].item(), focal.sum() / T, 1e-5, 1e-6, what="loss_ce")
assert_allclose(losses["loss_bbox"].item(), l1_pairs.sum() / T, 1e-5, 1e-6, what="loss_bbox")
assert_allclose(losses["loss_giou"].item(), (1 - giou_pairs).sum() / T, 1e-5, 1e-6,
                what="loss_giou")
assert_allclose(total.item(), 2 * focal.sum() / T + 5 * l1_pairs.sum() / T
                + 2 * (1 - giou_pairs).sum() / T, 1e-5, 1e-6, what="weighted total")

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/10_matching_and_losses.py](solutions/10_matching_and_losses.py).
#
# 1. **Derive, then check.** Writing $\mathrm{GIoU} = I/U + U/|C| - 1$ with
#    $U = |A| + |B| - I$, derive $\partial\,\mathrm{GIoU}/\partial I$,
#    $\partial\,\mathrm{GIoU}/\partial |A|$ and $\partial\,\mathrm{GIoU}/\partial |C|$ (the outline
#    of [matching-and-losses.md](../docs/matching-and-losses.md)). Where does the $+1/|C|$ in
#    $\partial/\partial |A|$ come from? Check all three by finite differences, then gradcheck
#    $1 - \mathrm{GIoU}$ of cxcywh boxes in float64.
# 2. **Predict.** Add a different constant to every *column* (target) of a cost matrix: does the
#    Hungarian assignment change? And a constant on the *row* of a matched prediction? Check
#    with `match_single` and by brute force over all assignments.
# 3. **Break something.** Replace the focal loss by plain binary cross-entropy ($\gamma = 0$,
#    no $\alpha$). Early in training (20 queries $\times$ 5 classes, 2 objects at $p = 0.3$,
#    every other logit at $p = 0.05$), what share of each loss comes from the negatives?
# 4. **Implement.** Show that matching a batch gives the same pairs as matching each image on
#    its own, with an image without any target in the batch (DETR's own test).

# %% [markdown]
# ## Checks

# %%
assert cost_matcher.shape == (Q, T)
assert sorted(tgt_idx.tolist()) == list(range(T)) and len(set(pred_idx.tolist())) == T
assert 5 not in pred_idx, "the background query stays unmatched"
assert dict(zip(tgt_idx.tolist(), pred_idx.tolist())) == {0: 0, 1: 2, 2: 1, 3: 4}, \
    "the optimal assignment of this example"
assert greedy == {0: 0, 1: 1, 2: 2, 3: 4}, "the greedy assignment of this example"
assert onehot.sum() == T and set(losses) >= {"loss_ce", "loss_bbox", "loss_giou"}
assert all(np.isfinite(v.item()) for v in losses.values())
print("all checks passed")
