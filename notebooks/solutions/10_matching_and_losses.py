"""Solutions to the exercises of notebook 10, matching and losses.

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
from itertools import permutations

import numpy as np

from minidetr.autograd import Tensor
from minidetr.models import HungarianMatcher, match_single, sigmoid_focal_loss
from minidetr.models.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from minidetr.testing import gradcheck


def giou_of_areas(I, A, B, C):
    """GIoU as a function of the four areas: I / U + U / |C| - 1, U = |A| + |B| - I."""
    U = A + B - I
    return I / U + U / C - 1


def exercise_1():
    """Check the outline of docs/matching-and-losses.md by finite differences: with
    U = |A| + |B| - I, dGIoU/dI = (U + I) / U^2 - 1/|C|, dGIoU/d|A| = -I / U^2 + 1/|C| (the
    +1/|C| because the union grows with |A|, and U/|C| with it), dGIoU/d|C| = -U / |C|^2.
    Then gradcheck the whole composition on boxes in float64."""
    I, A, B, C = 2.0, 6.0, 5.0, 14.0
    U = A + B - I
    outline = {"I": (U + I) / U**2 - 1 / C, "A": -I / U**2 + 1 / C, "C": -U / C**2}
    eps = 1e-6
    args = dict(I=I, A=A, B=B, C=C)
    for name, expected in outline.items():
        plus, minus = dict(args), dict(args)
        plus[name] += eps
        minus[name] -= eps
        numeric = (giou_of_areas(**plus) - giou_of_areas(**minus)) / (2 * eps)
        assert abs(numeric - expected) < 1e-8, (name, numeric, expected)
    without = -I / U**2                                   # the outline minus the 1/|C| term
    assert abs(without - outline["A"]) > 0.05

    rng = np.random.default_rng(0)
    pred = np.concatenate([rng.uniform(0.3, 0.7, (4, 2)), rng.uniform(0.1, 0.3, (4, 2))], -1)
    target = np.concatenate([rng.uniform(0.3, 0.7, (4, 2)), rng.uniform(0.1, 0.3, (4, 2))], -1)

    def loss(p):
        return 1 - elementwise_generalized_box_iou(box_cxcywh_to_xyxy(p),
                                                   box_cxcywh_to_xyxy(Tensor(target)))

    result = gradcheck(loss, [pred])
    assert result.max_error < 1e-6, result


def exercise_2():
    """Predict: adding a constant to a whole row or column of the cost matrix cannot change
    the optimal assignment (every assignment uses each target once and each prediction at
    most once). Check against match_single and against brute force over all assignments."""
    rng = np.random.default_rng(1)
    cost = rng.uniform(0, 1, (5, 3))
    base = match_single(cost)
    shifted = cost + rng.normal(size=(1, 3)) * 10          # one constant per column (target)
    assert all(np.array_equal(a, b) for a, b in zip(match_single(shifted), base))
    brute = min(permutations(range(5), 3), key=lambda rows: sum(cost[r, t] for t, r in
                                                                enumerate(rows)))
    assert sorted(zip(brute, range(3))) == sorted(zip(*base))
    # a per-row (per-prediction) constant does change it, since a prediction may be unused
    rows = cost.copy()
    rows[base[0][0]] += 10
    assert base[0][0] not in match_single(rows)[0]


def exercise_3():
    """Break the focal loss: gamma = 0 and no alpha gives plain binary cross-entropy. At a
    typical early state (20 queries x 5 classes, 2 matched objects whose class is at
    p = 0.3, every other logit at p = 0.05) the 98 negatives carry most of the BCE, but
    only a small share of the focal loss."""
    Q, K = 20, 5
    logits = np.full((1, Q, K), np.log(0.05 / 0.95), np.float32)
    targets = np.zeros((1, Q, K), np.float32)
    targets[0, [3, 11], [1, 4]] = 1
    logits[0, [3, 11], [1, 4]] = np.log(0.3 / 0.7)
    negative = 1 - targets

    def share_of_negatives(**kw):
        per = [sigmoid_focal_loss(Tensor(logits), targets, 1, **kw).item()]
        only_pos = sigmoid_focal_loss(Tensor(np.where(negative > 0, -50.0, logits)
                                             .astype(np.float32)), targets, 1, **kw).item()
        return 1 - only_pos / per[0]

    bce, focal = share_of_negatives(alpha=-1, gamma=0.0), share_of_negatives()
    print(f"negatives' share: BCE {bce:.2f}, focal {focal:.2f}")
    assert bce > 0.6 and focal < 0.15


def exercise_4():
    """Implement: the matching of a batch equals the matching of each image on its own
    (DETR's test), with an image without targets in the batch."""
    rng = np.random.default_rng(2)
    B, Q, K = 3, 6, 4
    logits = rng.normal(size=(B, Q, K)).astype(np.float32)
    boxes = np.concatenate([rng.uniform(0.2, 0.8, (B, Q, 2)), rng.uniform(0.05, 0.3, (B, Q, 2))],
                           -1).astype(np.float32)
    targets = []
    for n in (2, 0, 3):
        t_boxes = np.concatenate([rng.uniform(0.2, 0.8, (n, 2)), rng.uniform(0.05, 0.3, (n, 2))],
                                 -1).astype(np.float32)
        targets.append({"labels": rng.integers(0, K, n), "boxes": t_boxes})
    matcher = HungarianMatcher()
    batched = matcher({"pred_logits": logits, "pred_boxes": boxes}, targets)
    for b in range(B):
        alone = matcher({"pred_logits": logits[b:b + 1], "pred_boxes": boxes[b:b + 1]},
                        [targets[b]])[0]
        assert all(np.array_equal(x, y) for x, y in zip(batched[b], alone)), b
        assert len(batched[b][0]) == len(targets[b]["labels"])
