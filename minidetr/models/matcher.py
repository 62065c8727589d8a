"""The Hungarian matcher: a one-to-one assignment of predictions to ground-truth boxes.

DETR-style detectors predict a fixed set of ``Q`` boxes per image and are trained with a
*set* loss: each ground-truth object is paired with exactly one prediction (the one that
makes the total cost smallest), the other predictions learn "no object". The cost of
pairing prediction ``q`` with target ``t`` is (official weights in brackets)

    C[q, t] = w_bbox [5] * |b_q - b_t|_1
            + w_class [2] * (focal cost of class c_t at query q)
            - w_giou [2] * GIoU(b_q, b_t),

and the assignment minimising sum_t C[sigma(t), t] is found per image by the Hungarian
algorithm (:func:`scipy.optimize.linear_sum_assignment`) on the host. The cost matrix of
the whole batch is computed at once on the device of the predictions; it is the only array
the matcher copies from the device to the host. NumPy predictions take a one-pass Numba
kernel (:mod:`.matcher_cpu`), the others the Tensor-op reference
(``HungarianMatcher.reference_cost``), same numbers. See docs/matching-and-losses.md.

Shapes:
    outputs["pred_logits"]: (B, Q, num_classes); outputs["pred_boxes"]: (B, Q, 4) cxcywh.
    targets[i]["labels"]: (T_i,) int64; targets[i]["boxes"]: (T_i, 4) cxcywh.
    result: B pairs (pred_idx, tgt_idx), each int64 (min(Q, T_i),), on the host.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

from .. import functional as F
from ..autograd import Tensor, no_grad
from ..backend import allow_transfers, get_array_module, to_numpy
from .box_ops import box_cxcywh_to_xyxy, generalized_box_iou

__all__ = ["HungarianMatcher", "match_single", "COST_ALGORITHMS"]

#: The ways to build the cost matrix (``HungarianMatcher.cost_matrix(algorithm=...)``).
COST_ALGORITHMS = ("auto", "reference", "numba")


def match_single(cost):
    """Optimal assignment for one image's cost matrix (a thin wrapper of SciPy's solver).

    Args:
        cost: host array (Q, T) with Q >= T; entry [q, t] is the cost of giving target t
            to prediction q.

    Returns:
        (pred_idx, tgt_idx): int64 arrays of length T; prediction ``pred_idx[k]`` is
        matched with target ``tgt_idx[k]``, and ``pred_idx`` is sorted increasingly (as in
        the official implementation). Empty arrays when T = 0.
    """
    cost = np.asarray(cost)
    if cost.ndim != 2:
        raise ValueError(f"match_single: cost must be a (Q, T) matrix, got shape {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("match_single: the cost matrix holds NaN or infinite entries; "
                         "check for degenerate boxes (x1 < x0 or zero-size enclosing box) "
                         "or non-finite predictions")
    pred_idx, tgt_idx = linear_sum_assignment(cost)     # rows come back sorted
    return pred_idx.astype(np.int64), tgt_idx.astype(np.int64)


class HungarianMatcher:
    """Matches the predictions of every image with its targets, minimising the set cost.

    Args:
        cost_class: weight of the focal-style classification cost (official 2).
        cost_bbox: weight of the L1 distance between cxcywh boxes (official 5).
        cost_giou: weight of the negative generalised IoU (official 2).
        focal_alpha, focal_gamma: the alpha and gamma of the focal classification cost,
            the same as those of the focal loss (0.25 and 2).

    Call ``matcher(outputs, targets)``; see the module docstring for the shapes.
    ``matcher.cost_matrix(outputs, targets)`` returns the host cost matrix on its own
    (B, Q, sum_i T_i), the images' targets side by side along the last axis (its
    ``algorithm`` argument picks the Numba kernel or the Tensor-op reference).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("HungarianMatcher: all costs are 0; at least one must be non-zero")
        self.cost_class = cost_class
        self.cost_bbox = cost_bbox
        self.cost_giou = cost_giou
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self):
        return (f"HungarianMatcher(cost_class={self.cost_class}, cost_bbox={self.cost_bbox}, "
                f"cost_giou={self.cost_giou}, focal_alpha={self.focal_alpha}, "
                f"focal_gamma={self.focal_gamma})")

    # ------------------------------------------------------------------ the cost
    def class_cost(self, prob):
        """Focal-style cost of predicting each target's class, one column per target.

        cost = alpha (1 - p)^gamma (-log p) - (1 - alpha) p^gamma (-log(1 - p)), with p the
        probability of the target's class: the focal loss of that logit if it were positive,
        minus its focal loss if it were negative (1e-8 keeps the logs finite, as in the
        official code).

        Shapes:
            prob: (P, T) Tensor, sigmoid probabilities at the targets' classes
            (``sigmoid(logits[:, tgt_labels])``) -> (P, T).
        """
        alpha, gamma = self.focal_alpha, self.focal_gamma
        pos = alpha * (1.0 - prob) ** gamma * -F.log(prob + 1e-8)
        neg = (1.0 - alpha) * prob ** gamma * -F.log(1.0 - prob + 1e-8)
        return pos - neg

    def cost_matrix(self, outputs, targets, algorithm="auto"):
        """The (B, Q, sum_i T_i) cost matrix of the batch, copied to the host.

        Row block ``b`` compares image b's Q predictions with the targets of *all* images
        (as the official code does, it is one batched computation); only the columns of
        image b's own targets are used for its matching.

        ``algorithm``: ``"reference"`` (:meth:`reference_cost`, Tensor ops on the
        predictions' device), ``"numba"`` (the one-pass kernel of :mod:`.matcher_cpu`,
        NumPy float32/float64 only) or ``"auto"``: the kernel for NumPy float32/float64
        predictions, the reference for anything else (CuPy). Both give the same numbers
        (to rounding).
        """
        if algorithm not in COST_ALGORITHMS:
            raise ValueError(f"HungarianMatcher.cost_matrix: algorithm must be one of "
                             f"{COST_ALGORITHMS}, got {algorithm!r}")
        logits, boxes = _unwrap(outputs, "pred_logits"), _unwrap(outputs, "pred_boxes")
        if logits.ndim != 3 or boxes.ndim != 3 or boxes.shape[-1] != 4 \
                or logits.shape[:2] != boxes.shape[:2]:
            raise ValueError(f"HungarianMatcher: expected pred_logits (B, Q, num_classes) and "
                             f"pred_boxes (B, Q, 4), got {tuple(logits.shape)} and "
                             f"{tuple(boxes.shape)}")
        B, Q, num_classes = logits.shape
        if len(targets) != B:
            raise ValueError(f"HungarianMatcher: {len(targets)} targets for a batch of {B} images")
        kernel_fits = _kernel_fits(logits, boxes)
        if algorithm == "numba" and not kernel_fits:
            raise ValueError(f"HungarianMatcher.cost_matrix: algorithm='numba' needs NumPy "
                             f"pred_logits and pred_boxes of one dtype, float32 or float64; got "
                             f"{type(logits).__name__} {logits.dtype} and "
                             f"{type(boxes).__name__} {boxes.dtype}")
        xp = get_array_module(logits)
        tgt_labels, tgt_boxes = _concat_targets(targets, xp, boxes.dtype,
                                                num_classes)          # (T,), (T, 4)
        T = int(tgt_labels.shape[0])
        if T == 0:
            return np.zeros((B, Q, 0), dtype=boxes.dtype)
        logits = logits.reshape(B * Q, num_classes)                   # (B*Q, num_classes)
        boxes = boxes.reshape(B * Q, 4)                               # (B*Q, 4)
        if algorithm == "reference" or not kernel_fits:
            cost = self.reference_cost(logits, boxes, tgt_labels, tgt_boxes)
        else:
            from . import matcher_cpu                                 # Numba, on first use
            cost = matcher_cpu.cost_matrix(logits, tgt_labels, boxes, tgt_boxes,
                                           self.cost_class, self.cost_bbox, self.cost_giou,
                                           self.focal_alpha, self.focal_gamma)
        return cost.reshape(B, Q, T)                                  # (B, Q, T)

    def reference_cost(self, logits, boxes, tgt_labels, tgt_boxes):
        """The (P, T) cost from Tensor ops, on the arrays' device, copied to the host.

        The reference that :mod:`.matcher_cpu`'s kernel is tested against, and the path
        for CuPy arrays. Only the logits of the targets' classes go through the sigmoid.

        Shapes:
            logits: (P, num_classes), boxes: (P, 4) cxcywh, tgt_labels: (T,) int,
            tgt_boxes: (T, 4) cxcywh; arrays of one module (NumPy or CuPy) -> host (P, T).
        """
        with no_grad():
            prob = F.sigmoid(Tensor(logits[:, tgt_labels]))                  # (P, T)
            out_boxes = Tensor(boxes)                                        # (P, 4)
            tgt_boxes = Tensor(tgt_boxes)                                    # (T, 4)
            cost = 0.0
            if self.cost_class:
                cost = cost + self.cost_class * self.class_cost(prob)          # (P, T)
            if self.cost_bbox:
                # L1 distance of every prediction to every target (torch.cdist with p=1)
                l1 = F.abs(out_boxes[:, None, :] - tgt_boxes[None, :, :]).sum(axis=-1)
                cost = cost + self.cost_bbox * l1                              # (P, T)
            if self.cost_giou:
                giou = generalized_box_iou(box_cxcywh_to_xyxy(out_boxes),
                                           box_cxcywh_to_xyxy(tgt_boxes))
                cost = cost - self.cost_giou * giou                            # (P, T)
        with allow_transfers("the matcher's cost matrices"):
            return to_numpy(cost.data)                     # the device -> host copy

    # ------------------------------------------------------------------ the assignment
    def __call__(self, outputs, targets):
        """One (pred_idx, tgt_idx) pair of int64 host arrays per image (see match_single)."""
        cost = self.cost_matrix(outputs, targets)            # (B, Q, sum_i T_i)
        sizes = [int(t["boxes"].shape[0]) for t in targets]
        starts = np.cumsum([0] + sizes)
        return [match_single(cost[i, :, starts[i]:starts[i + 1]])
                for i in range(len(targets))]


# --------------------------------------------------------------------------- helpers
def _unwrap(outputs, key):
    """outputs[key] as a raw array (Tensors are read without their graph)."""
    if key not in outputs:
        raise KeyError(f"HungarianMatcher: outputs has no {key!r} (keys: {sorted(outputs)})")
    x = outputs[key]
    return x.data if isinstance(x, Tensor) else x


def _kernel_fits(logits, boxes):
    """True when :mod:`.matcher_cpu`'s kernel takes these predictions: NumPy arrays of one
    dtype, float32 or float64."""
    return (isinstance(logits, np.ndarray) and isinstance(boxes, np.ndarray)
            and logits.dtype == boxes.dtype and logits.dtype in (np.float32, np.float64))


def _concat_targets(targets, xp, dtype, num_classes):
    """All images' labels (T,) and boxes (T, 4) concatenated, on the predictions' device.

    Host (NumPy) labels are checked to lie in [0, num_classes); device labels are not (that
    would cost a device-to-host copy).
    """
    labels, boxes = [], []
    for i, t in enumerate(targets):
        lab, box = t["labels"], t["boxes"]
        if lab.ndim != 1 or box.ndim != 2 or box.shape[-1] != 4 or box.shape[0] != lab.shape[0]:
            raise ValueError(f"targets[{i}]: expected labels (T,) and boxes (T, 4), got "
                             f"{tuple(lab.shape)} and {tuple(box.shape)}")
        if lab.dtype.kind not in "iu":
            raise TypeError(f"targets[{i}]['labels'] must be integers, got {lab.dtype}")
        if isinstance(lab, np.ndarray) and lab.size and (lab.min() < 0
                                                         or lab.max() >= num_classes):
            raise ValueError(f"targets[{i}]['labels'] must lie in [0, {num_classes}) "
                             f"(num_classes of pred_logits), got values from {lab.min()} "
                             f"to {lab.max()}")
        labels.append(xp.asarray(lab))
        boxes.append(xp.asarray(box).astype(dtype, copy=False))
    if not labels:
        return xp.zeros((0,), dtype=np.int64), xp.zeros((0, 4), dtype=dtype)
    return xp.concatenate(labels), xp.concatenate(boxes)
