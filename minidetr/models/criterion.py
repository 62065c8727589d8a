"""The training losses: sigmoid focal loss, L1 and GIoU box losses, over matched sets.

:class:`SetCriterion` follows the official Deformable DETR criterion. For one set of
predictions (the final decoder layer, each auxiliary decoder layer, or the two-stage
encoder proposals) it

1. asks the :class:`~minidetr.models.matcher.HungarianMatcher` which prediction answers
   which ground-truth box (a fresh matching for every set);
2. computes ``loss_ce``, the sigmoid focal loss over *all* (image, query, class) logits,
   where a matched query's target is the one-hot vector of its object's class and an
   unmatched query's target is all zeros;
3. computes ``loss_bbox`` (L1 of cxcywh) and ``loss_giou`` (1 - GIoU) over matched pairs;
4. divides every loss by ``num_boxes``, the number of ground-truth boxes in the batch
   (at least 1), so the loss scale does not depend on how crowded the images are.

It also reports two logging numbers without gradient: ``class_error`` (final layer only)
and ``cardinality_error``. Auxiliary losses get the suffix ``_0`` ... ``_{n-2}``, the
encoder's ``_enc``; :func:`total_loss` weighs and sums them. See docs/matching-and-losses.md.

Shapes:
    outputs["pred_logits"]: (B, Q, num_classes); outputs["pred_boxes"]: (B, Q, 4) cxcywh;
    outputs["aux_outputs"]: list of such dicts; outputs["enc_outputs"]: such a dict with
    Q = S (one proposal per encoder token).
    targets: B dicts, "labels" (T_i,) int64 and "boxes" (T_i, 4) cxcywh.
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from ..autograd import Tensor
from ..backend import get_array_module
from ..functional.loss import focal_targets
from .box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou

__all__ = ["sigmoid_focal_loss", "sigmoid_focal_loss_reference", "SetCriterion",
           "build_weight_dict", "total_loss"]


# --------------------------------------------------------------------------- focal loss
def sigmoid_focal_loss(logits, targets, num_boxes, alpha: float = 0.25, gamma: float = 2.0):
    """The sigmoid focal loss (Lin et al., 2017), summed and divided by ``num_boxes``.

    Per element, with p = sigmoid(x) and target t in {0, 1}:

        BCE   = -t log p - (1 - t) log(1 - p) = softplus(x) - t x      (stable form)
        p_t   = p t + (1 - p)(1 - t)
        alpha_t = alpha t + (1 - alpha)(1 - t)        (no weighting when alpha < 0)
        loss  = alpha_t (1 - p_t)^gamma BCE

    The result is sum(loss) / num_boxes. The official code writes
    ``loss.mean(1).sum() / num_boxes`` and its caller multiplies by Q; the two factors of
    Q cancel, so this is the same number.

    Computed by one Function whose gradient is written by hand
    (:class:`minidetr.functional.loss.SigmoidFocalLoss`), tested against
    :func:`sigmoid_focal_loss_reference`, the same formulas composed from autograd's
    Functions: 1.8x as fast (measured in docs/matching-and-losses.md, section 3).

    Args:
        logits: Tensor (..., num_classes) of logits.
        targets: array of the same shape, 0 or 1 (no gradient).
        num_boxes: the normaliser (a positive Python number).
        alpha, gamma: the class weight (< 0: none) and the focusing exponent (>= 0).

    Returns:
        A scalar Tensor.
    """
    return F.sigmoid_focal_loss(logits, targets, num_boxes, alpha=alpha, gamma=gamma)


def sigmoid_focal_loss_reference(logits, targets, num_boxes, alpha: float = 0.25,
                                 gamma: float = 2.0):
    """:func:`sigmoid_focal_loss` composed from autograd's Functions, line by line the
    formulas above; autograd chains their backwards. The reference the hand-written
    gradient is tested against."""
    t = focal_targets("sigmoid_focal_loss_reference", logits, targets, gamma)
    p = F.sigmoid(logits)
    bce = F.softplus(logits) - logits * t
    p_t = p * t + (1.0 - p) * (1.0 - t)
    loss = bce * (1.0 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * t + (1.0 - alpha) * (1.0 - t))
    return loss.sum() / num_boxes


# --------------------------------------------------------------------------- criterion
class SetCriterion:
    """The set loss of Deformable DETR (see the module docstring).

    Args:
        num_classes: number of classification logits (91 for COCO's raw category ids).
        matcher: a :class:`~minidetr.models.matcher.HungarianMatcher`.
        weight_dict: the weight of every loss key (see :func:`build_weight_dict`); kept
            here for :meth:`total` and for the training loop.
        losses: which losses to compute, among "labels", "boxes" and "cardinality".
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2).

    ``criterion(outputs, targets)`` returns a dict of scalar Tensors.
    """

    LOSSES = ("labels", "boxes", "cardinality")

    def __init__(self, num_classes, matcher, weight_dict, losses=LOSSES,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        unknown = [name for name in losses if name not in self.LOSSES]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; choose from {self.LOSSES}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.losses = tuple(losses)
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def __repr__(self):
        return (f"SetCriterion(num_classes={self.num_classes}, matcher={self.matcher!r}, "
                f"losses={self.losses}, focal_alpha={self.focal_alpha})")

    # ------------------------------------------------------------------ the losses
    def loss_labels(self, outputs, targets, indices, num_boxes, log=True):
        """loss_ce: sigmoid focal loss against one-hot targets (unmatched queries: all zeros).

        With ``log``, also class_error: 100 - top-1 accuracy (%) of the matched queries.
        """
        logits = outputs["pred_logits"]                               # (B, Q, num_classes)
        if logits.shape[-1] != self.num_classes:
            raise ValueError(f"SetCriterion: pred_logits has {logits.shape[-1]} classes, "
                             f"expected num_classes={self.num_classes}")
        xp = get_array_module(logits.data)
        batch_idx, query_idx = _matched_queries(indices, xp)         # (P,), (P,)
        tgt_classes = _matched_targets(targets, indices, "labels", xp)   # (P,)
        onehot = xp.zeros(logits.shape, dtype=logits.dtype)          # (B, Q, num_classes)
        onehot[batch_idx, query_idx, tgt_classes] = 1
        losses = {"loss_ce": sigmoid_focal_loss(logits, onehot, num_boxes,
                                                self.focal_alpha, self.focal_gamma)}
        if log:
            # logging only: how often the top class of a matched query is its target's class
            matched = logits.data[batch_idx, query_idx]               # (P, num_classes)
            if matched.shape[0] == 0:
                error = xp.asarray(100.0, dtype=logits.dtype)          # official: accuracy 0
            else:
                correct = (matched.argmax(axis=-1) == tgt_classes).mean(dtype=logits.dtype)
                error = 100.0 - 100.0 * correct
            losses["class_error"] = Tensor(xp.asarray(error, dtype=logits.dtype))
        return losses

    def loss_cardinality(self, outputs, targets, indices, num_boxes):
        """cardinality_error: mean |#predicted objects - #targets| per image (logging only).

        As in the official code (a DETR leftover), a query counts as an object when its
        top-scoring class is not the last one.
        """
        logits = outputs["pred_logits"].data                          # (B, Q, num_classes)
        xp = get_array_module(logits)
        n_pred = (logits.argmax(axis=-1) != logits.shape[-1] - 1).sum(axis=1)   # (B,)
        n_tgt = xp.asarray([len(t["labels"]) for t in targets])                   # (B,)
        error = xp.abs(n_pred - n_tgt).astype(logits.dtype).mean()
        return {"cardinality_error": Tensor(xp.asarray(error, dtype=logits.dtype))}

    def loss_boxes(self, outputs, targets, indices, num_boxes):
        """loss_bbox = sum |b - b_hat|_1 / num_boxes and loss_giou = sum (1 - GIoU) / num_boxes.

        Both over matched pairs only, on normalised boxes (cxcywh for L1, xyxy for GIoU).
        """
        boxes = outputs["pred_boxes"]                                 # (B, Q, 4)
        xp = get_array_module(boxes.data)
        batch_idx, query_idx = _matched_queries(indices, xp)
        src = boxes[batch_idx, query_idx]                             # (P, 4)
        tgt = _matched_targets(targets, indices, "boxes", xp).astype(boxes.dtype, copy=False)
        loss_bbox = F.abs(src - tgt).sum() / num_boxes
        giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src),
                                               box_cxcywh_to_xyxy(tgt))   # (P,)
        loss_giou = (1.0 - giou).sum() / num_boxes
        return {"loss_bbox": loss_bbox, "loss_giou": loss_giou}

    def get_loss(self, name, outputs, targets, indices, num_boxes, **kwargs):
        loss_fn = {"labels": self.loss_labels, "boxes": self.loss_boxes,
                   "cardinality": self.loss_cardinality}[name]
        return loss_fn(outputs, targets, indices, num_boxes, **kwargs)

    # ------------------------------------------------------------------ all sets
    def _set_losses(self, outputs, targets, num_boxes, suffix="", log=True):
        """Match one set of predictions and compute its losses, keys ending in ``suffix``."""
        indices = self.matcher(outputs, targets)
        losses = {}
        for name in self.losses:
            kwargs = {"log": log} if name == "labels" else {}
            for key, value in self.get_loss(name, outputs, targets, indices, num_boxes,
                                            **kwargs).items():
                losses[key + suffix] = value
        return losses

    def __call__(self, outputs, targets):
        """All losses of one batch: final output, auxiliary outputs, encoder proposals."""
        _check_targets(targets)
        num_boxes = count_boxes(targets)
        losses = self._set_losses(outputs, targets, num_boxes)
        for i, aux in enumerate(outputs.get("aux_outputs", None) or []):
            losses.update(self._set_losses(aux, targets, num_boxes, suffix=f"_{i}", log=False))
        if outputs.get("enc_outputs") is not None:
            # two-stage: the encoder proposals learn class-agnostic "object or not", so
            # every target becomes class 0 (the only channel that can be positive)
            binary = [dict(t, labels=_zeros_like(t["labels"])) for t in targets]
            losses.update(self._set_losses(outputs["enc_outputs"], binary, num_boxes,
                                           suffix="_enc", log=False))
        return losses

    forward = __call__

    def total(self, losses):
        """The weighted sum of ``losses`` with this criterion's weight_dict."""
        return total_loss(losses, self.weight_dict)


# --------------------------------------------------------------------------- weights, total
def build_weight_dict(cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0,
                      giou_loss_coef: float = 2.0, num_decoder_layers: int = 6,
                      aux_loss: bool = True):
    """The loss weights of the official ``build()``: the same three weights for every set.

    Keys: loss_ce, loss_bbox, loss_giou; with ``aux_loss`` also the same keys with
    suffixes ``_0`` ... ``_{num_decoder_layers - 2}`` and ``_enc`` (the official code adds
    ``_enc`` whenever aux_loss is on; without two-stage there is simply no loss to weigh).
    """
    base = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
    weights = dict(base)
    if aux_loss:
        for suffix in [f"_{i}" for i in range(num_decoder_layers - 1)] + ["_enc"]:
            weights.update({k + suffix: v for k, v in base.items()})
    return weights


def total_loss(losses, weight_dict):
    """sum_k weight_dict[k] * losses[k] over the keys present in both (a scalar Tensor).

    Keys without a weight (class_error, cardinality_error) are logging only.
    """
    keys = [k for k in losses if k in weight_dict]
    if not keys:
        raise ValueError(f"total_loss: no loss key has a weight (losses: {sorted(losses)}, "
                         f"weights: {sorted(weight_dict)})")
    total = losses[keys[0]] * weight_dict[keys[0]]
    for k in keys[1:]:
        total = total + losses[k] * weight_dict[k]
    return total


def count_boxes(targets):
    """num_boxes: the ground-truth boxes in the batch, as a float, at least 1.

    (Single process; the official code also averages it over GPUs.) Read from the
    arrays' shapes, so no device -> host copy is needed.
    """
    return max(float(sum(int(t["labels"].shape[0]) for t in targets)), 1.0)


# --------------------------------------------------------------------------- helpers
def _check_targets(targets):
    for i, t in enumerate(targets):
        if "labels" not in t or "boxes" not in t:
            raise KeyError(f"targets[{i}] needs 'labels' and 'boxes', has {sorted(t)}")


def _zeros_like(labels):
    return get_array_module(labels).zeros_like(labels)


def _matched_queries(indices, xp):
    """(image index, query index) of every matched prediction, on the device ``xp``.

    Shapes: indices: B pairs of (P_i,) host arrays -> two (P,) int64 arrays, P = sum_i P_i.
    """
    batch = np.concatenate([np.full(len(src), i, dtype=np.int64)
                            for i, (src, _) in enumerate(indices)] or [np.zeros(0, np.int64)])
    query = np.concatenate([src for src, _ in indices] or [np.zeros(0, np.int64)])
    return xp.asarray(batch), xp.asarray(query.astype(np.int64, copy=False))


def _matched_targets(targets, indices, key, xp):
    """targets[i][key][tgt_idx_i] for every image, concatenated on the device ``xp``."""
    parts = [xp.asarray(t[key])[xp.asarray(tgt)] for t, (_, tgt) in zip(targets, indices)]
    if not parts:
        raise ValueError("SetCriterion: empty batch (no targets)")
    return xp.concatenate(parts)
