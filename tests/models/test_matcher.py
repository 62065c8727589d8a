"""Hungarian matcher: cost matrix formula, optimality (brute force), batching, empty targets.

The Numba cost-matrix kernel against the reference: test_matcher_cpu.py.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from minidetr.backend import to_numpy
from minidetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from minidetr.models.matcher import HungarianMatcher, match_single
from minidetr.testing import assert_allclose


def random_boxes(rng, n):
    """n cxcywh boxes well inside the image."""
    return np.concatenate([rng.uniform(0.3, 0.7, size=(n, 2)),
                           rng.uniform(0.05, 0.4, size=(n, 2))], axis=1)


def make_batch(rng, xp, Q, num_classes, n_targets, dtype=np.float64):
    B = len(n_targets)
    outputs = {"pred_logits": xp.asarray(rng.normal(size=(B, Q, num_classes)), dtype=dtype),
               "pred_boxes": xp.asarray(random_boxes(rng, B * Q).reshape(B, Q, 4), dtype=dtype)}
    targets = [{"labels": xp.asarray(rng.integers(0, num_classes, size=T), dtype=np.int64),
                "boxes": xp.asarray(random_boxes(rng, T), dtype=dtype)} for T in n_targets]
    return outputs, targets


def brute_force(cost):
    """The optimal assignment of a (Q, T) cost matrix by trying every injective map t -> q."""
    Q, T = cost.shape
    best = min(itertools.permutations(range(Q), T),
               key=lambda qs: sum(cost[q, t] for t, q in enumerate(qs)))
    pairs = sorted(zip(best, range(T)))
    return (np.array([q for q, _ in pairs], dtype=np.int64),
            np.array([t for _, t in pairs], dtype=np.int64))


@pytest.mark.parametrize("algorithm", ["auto", "reference"])
def test_cost_matrix_equals_direct_formula(xp, rng, algorithm):
    """Both the reference and the default path (NumPy: the Numba kernel, test_matcher_cpu)."""
    outputs, targets = make_batch(rng, xp, Q=3, num_classes=4, n_targets=[2, 1])
    m = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, focal_alpha=0.25, focal_gamma=2)
    cost = m.cost_matrix(outputs, targets, algorithm=algorithm)
    assert isinstance(cost, np.ndarray) and cost.shape == (2, 3, 3)

    logits = to_numpy(outputs["pred_logits"]).reshape(6, 4)
    boxes = to_numpy(outputs["pred_boxes"]).reshape(6, 4)
    host = [{k: to_numpy(v) for k, v in t.items()} for t in targets]
    labels = np.concatenate([t["labels"] for t in host])
    tboxes = np.concatenate([t["boxes"] for t in host])
    p = 1 / (1 + np.exp(-logits[:, labels]))                       # (6, 3)
    focal = 0.25 * (1 - p) ** 2 * -np.log(p + 1e-8) - 0.75 * p ** 2 * -np.log(1 - p + 1e-8)
    l1 = np.abs(boxes[:, None, :] - tboxes[None, :, :]).sum(-1)
    giou = generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tboxes))
    expected = (5 * l1 + 2 * focal - 2 * giou).reshape(2, 3, 3)
    assert_allclose(cost, expected, rtol=1e-12, atol=1e-12, what="cost matrix")


@pytest.mark.parametrize("n_targets", [[1, 3], [4, 0], [2, 2]])
def test_matching_is_optimal_brute_force(xp, rng, n_targets):
    Q = 4
    outputs, targets = make_batch(rng, xp, Q=Q, num_classes=3, n_targets=n_targets)
    m = HungarianMatcher()
    cost = m.cost_matrix(outputs, targets)
    indices = m(outputs, targets)
    start = 0
    for i, (T, (pred_idx, tgt_idx)) in enumerate(zip(n_targets, indices)):
        block = cost[i, :, start:start + T]
        start += T
        assert pred_idx.dtype == np.int64 and tgt_idx.dtype == np.int64
        assert len(pred_idx) == len(tgt_idx) == T, f"image {i}: one prediction per target"
        assert (np.diff(pred_idx) > 0).all(), f"image {i}: pred indices must be sorted, unique"
        assert sorted(tgt_idx.tolist()) == list(range(T)), f"image {i}: every target matched"
        bf_pred, bf_tgt = brute_force(block)
        np.testing.assert_array_equal(pred_idx, bf_pred, err_msg=f"image {i}: pred indices")
        np.testing.assert_array_equal(tgt_idx, bf_tgt, err_msg=f"image {i}: target indices")


def test_recovers_a_known_permutation(xp):
    # predictions are the targets in a shuffled order, with confident correct classes
    tboxes = np.array([[0.2, 0.3, 0.1, 0.2], [0.7, 0.6, 0.3, 0.2], [0.5, 0.5, 0.4, 0.4]])
    labels = np.array([2, 0, 1])
    order = [2, 0, 1, None]                       # query q shows target order[q]; q=3: nothing
    logits = np.full((1, 4, 3), -5.0)
    boxes = np.tile([0.9, 0.9, 0.05, 0.05], (1, 4, 1))
    for q, t in enumerate(order):
        if t is not None:
            logits[0, q, labels[t]] = 5.0
            boxes[0, q] = tboxes[t]
    outputs = {"pred_logits": xp.asarray(logits), "pred_boxes": xp.asarray(boxes)}
    targets = [{"labels": xp.asarray(labels), "boxes": xp.asarray(tboxes)}]
    (pred_idx, tgt_idx), = HungarianMatcher()(outputs, targets)
    np.testing.assert_array_equal(pred_idx, [0, 1, 2])
    np.testing.assert_array_equal(tgt_idx, [2, 0, 1])


def test_batched_equals_per_image(xp, rng):
    outputs, targets = make_batch(rng, xp, Q=5, num_classes=3, n_targets=[2, 0, 3])
    m = HungarianMatcher()
    batched = m(outputs, targets)
    for i in range(3):
        single = {k: v[i:i + 1] for k, v in outputs.items()}
        (p, t), = m(single, targets[i:i + 1])
        np.testing.assert_array_equal(batched[i][0], p, err_msg=f"image {i}: pred indices")
        np.testing.assert_array_equal(batched[i][1], t, err_msg=f"image {i}: target indices")


def test_all_images_empty(xp, rng):
    outputs, targets = make_batch(rng, xp, Q=3, num_classes=2, n_targets=[0, 0])
    indices = HungarianMatcher()(outputs, targets)
    assert len(indices) == 2
    for p, t in indices:
        assert p.shape == (0,) and t.shape == (0,) and p.dtype == np.int64 and t.dtype == np.int64


def test_float32_and_tensor_inputs(rng):
    from minidetr.autograd import Tensor
    outputs, targets = make_batch(rng, np, Q=4, num_classes=3, n_targets=[2], dtype=np.float32)
    as_tensors = {k: Tensor(v, requires_grad=True) for k, v in outputs.items()}
    m = HungarianMatcher()
    assert m.cost_matrix(outputs, targets).dtype == np.float32
    for a, b in zip(m(outputs, targets), m(as_tensors, targets)):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])


def test_clear_errors(rng):
    outputs, targets = make_batch(rng, np, Q=3, num_classes=2, n_targets=[1])
    with pytest.raises(ValueError, match="1 targets for a batch of 2"):
        HungarianMatcher()({k: np.concatenate([v, v]) for k, v in outputs.items()}, targets)
    with pytest.raises(ValueError, match=r"targets\[0\]: expected labels \(T,\) and boxes"):
        HungarianMatcher()(outputs, [{"labels": np.zeros(2, np.int64), "boxes": np.zeros((1, 4))}])
    outputs["pred_logits"][0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        HungarianMatcher()(outputs, targets)
    with pytest.raises(ValueError, match="at least one must be non-zero"):
        HungarianMatcher(0, 0, 0)
    with pytest.raises(ValueError, match=r"\(Q, T\) matrix"):
        match_single(np.zeros(3))
