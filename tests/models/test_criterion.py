"""Focal loss and SetCriterion: closed forms, NumPy reference, gradients, key names, weights."""
from __future__ import annotations

import math

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.models.box_ops import box_cxcywh_to_xyxy, generalized_box_iou
from minidetr.models.criterion import (SetCriterion, build_weight_dict, count_boxes,
                                       sigmoid_focal_loss, sigmoid_focal_loss_reference,
                                       total_loss)
from minidetr.models.matcher import HungarianMatcher
from minidetr.testing import assert_allclose, gradcheck


def numpy_focal(x, t, num_boxes, alpha=0.25, gamma=2.0):
    """The focal loss written directly from its definition (float64 NumPy)."""
    p = 1 / (1 + np.exp(-x))
    bce = -(t * np.log(p) + (1 - t) * np.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    alpha_t = alpha * t + (1 - alpha) * (1 - t) if alpha >= 0 else 1.0
    return (alpha_t * (1 - p_t) ** gamma * bce).sum() / num_boxes


def make_criterion(num_classes=3, **kwargs):
    return SetCriterion(num_classes, HungarianMatcher(), build_weight_dict(), **kwargs)


def random_outputs(rng, xp, B, Q, num_classes, dtype=np.float64):
    centres = rng.uniform(0.3, 0.7, size=(B, Q, 2))
    sizes = rng.uniform(0.1, 0.4, size=(B, Q, 2))
    logits = xp.asarray(rng.normal(size=(B, Q, num_classes)), dtype=dtype)
    boxes = xp.asarray(np.concatenate([centres, sizes], -1), dtype=dtype)
    return {"pred_logits": Tensor(logits, requires_grad=True),
            "pred_boxes": Tensor(boxes, requires_grad=True)}


# --------------------------------------------------------------------------- focal loss
# Both implementations: the hand-written Function training uses, and the composition of
# autograd Functions it is tested against.
FOCAL = pytest.mark.parametrize("focal", [sigmoid_focal_loss, sigmoid_focal_loss_reference],
                                ids=["function", "reference"])


@FOCAL
@pytest.mark.parametrize("alpha", [0.25, -1.0])
def test_focal_loss_equals_numpy_formula(xp, rng, alpha, focal):
    x = rng.normal(scale=3.0, size=(2, 5, 4))
    t = (rng.uniform(size=x.shape) < 0.3).astype(np.float64)
    got = focal(Tensor(xp.asarray(x)), xp.asarray(t), num_boxes=3.0, alpha=alpha)
    assert got.shape == ()
    assert_allclose(got, np.array(numpy_focal(x, t, 3.0, alpha)), rtol=1e-12, what="focal loss")


@FOCAL
@pytest.mark.parametrize("alpha, gamma", [(0.25, 2.0), (-1.0, 2.0), (0.25, 0.0), (0.4, 1.5),
                                          (0.25, 3.0)])
def test_focal_loss_gradcheck(rng, focal, alpha, gamma):
    """Soft targets too: the hand-written gradient holds for any t in [0, 1]."""
    x = rng.normal(scale=2.0, size=(2, 3, 4))
    t = (rng.uniform(size=x.shape) < 0.4).astype(np.float64)
    t[0, 0] = rng.uniform(size=4)
    gradcheck(lambda z: focal(z, t, num_boxes=2.0, alpha=alpha, gamma=gamma), [x],
              name=f"{focal.__name__}(alpha={alpha}, gamma={gamma})")


@FOCAL
def test_focal_loss_gradient_closed_form(rng, focal):
    # d/dx of the per-element loss, derived in docs/matching-and-losses.md:
    #   t = 1: alpha (1-p)^gamma (gamma p log p - (1 - p))
    #   t = 0: (1-alpha) p^gamma (p - gamma (1 - p) log(1 - p))
    x = rng.normal(size=(6,))
    t = np.array([1, 0, 1, 0, 1, 0], dtype=np.float64)
    z = Tensor(x, requires_grad=True)
    focal(z, t, num_boxes=1.0).backward()
    p, a, g = 1 / (1 + np.exp(-x)), 0.25, 2.0
    pos = a * (1 - p) ** g * (g * p * np.log(p) - (1 - p))
    neg = (1 - a) * p ** g * (p - g * (1 - p) * np.log(1 - p))
    assert_allclose(z.grad, np.where(t == 1, pos, neg), rtol=1e-12, what="focal gradient")


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_the_focal_function_agrees_with_the_reference(xp, rng, dtype, rtol):
    """Loss and gradient of the hand-written Function and of the composition, one-hot
    targets as training builds them (mostly zeros), logits up to +-12."""
    x = rng.normal(scale=4.0, size=(2, 50, 7)).clip(-12, 12)
    t = np.zeros(x.shape)
    t[0, rng.integers(0, 50, 5), rng.integers(0, 7, 5)] = 1.0
    results = []
    for focal in (sigmoid_focal_loss, sigmoid_focal_loss_reference):
        z = Tensor(xp.asarray(x, dtype=dtype), requires_grad=True)
        loss = focal(z, xp.asarray(t, dtype=dtype), num_boxes=5.0)
        loss.backward(xp.asarray(2.0, dtype=dtype))              # an upstream factor too
        assert loss.dtype == dtype and z.grad.dtype == dtype
        results.append((to_numpy(loss.data), to_numpy(z.grad)))
    (loss, grad), (ref_loss, ref_grad) = results
    assert_allclose(loss, ref_loss, rtol=rtol, what="focal loss, Function vs reference")
    scale = np.abs(ref_grad).max()
    assert_allclose(grad, ref_grad, rtol=rtol, atol=rtol * scale,
                    what="focal gradient, Function vs reference")


@FOCAL
def test_focal_loss_is_finite_for_huge_float32_logits(focal):
    x = Tensor(np.array([[-200.0, 200.0, 90.0, -90.0]], dtype=np.float32), requires_grad=True)
    t = np.array([[1.0, 0.0, 1.0, 0.0]], dtype=np.float32)
    loss = focal(x, t, num_boxes=1.0)
    loss.backward()
    assert loss.dtype == np.float32 and np.isfinite(loss.item()) and np.isfinite(x.grad).all()
    # the two badly wrong logits dominate: 0.25*200 + 0.75*200 = 200 (to float32 accuracy)
    assert abs(loss.item() - 200.0) < 1e-3


@FOCAL
def test_focal_loss_bad_input(focal):
    with pytest.raises(ValueError, match="targets .* must have the shape of logits"):
        focal(Tensor(np.zeros((2, 3))), np.zeros((3, 2)), 1.0)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        focal(Tensor(np.zeros((2, 3))), np.zeros((2, 3)), 1.0, gamma=-1.0)


# --------------------------------------------------------------------------- SetCriterion
def test_hand_computed_one_image_two_queries_one_box(xp):
    # all logits 0 -> p = 1/2 everywhere, BCE = log 2, (1 - p_t)^2 = 1/4:
    #   loss_ce = log 2 * (1/4 * 0.25 [1 positive] + 5 * 1/4 * 0.75 [5 negatives]) = log 2
    # query 0 (0.5, 0.5, 0.2, 0.2) sits inside the target (0.5, 0.5, 0.4, 0.4); query 1 is far:
    #   L1 = 0.2 + 0.2 = 0.4; IoU = 0.04 / 0.16 = 1/4; enclosing box = target -> GIoU = 1/4
    outputs = {"pred_logits": Tensor(xp.zeros((1, 2, 3))),
               "pred_boxes": Tensor(xp.asarray([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1]]]))}
    targets = [{"labels": xp.asarray([2]), "boxes": xp.asarray([[0.5, 0.5, 0.4, 0.4]])}]
    crit = make_criterion()
    losses = crit(outputs, targets)
    assert set(losses) == {"loss_ce", "class_error", "loss_bbox", "loss_giou", "cardinality_error"}
    assert_allclose(losses["loss_ce"], np.array(math.log(2)), rtol=1e-12, what="loss_ce")
    assert_allclose(losses["loss_bbox"], np.array(0.4), rtol=1e-12, what="loss_bbox")
    assert_allclose(losses["loss_giou"], np.array(0.75), rtol=1e-12, what="loss_giou")
    # argmax of a tie is class 0 != 2: class_error 100%; both queries "predict" an
    # object (argmax != last class), one target: cardinality_error |2 - 1| = 1
    assert_allclose(losses["class_error"], np.array(100.0), what="class_error")
    assert_allclose(losses["cardinality_error"], np.array(1.0), what="cardinality_error")
    assert not losses["class_error"].requires_grad
    total = crit.total(losses)
    assert_allclose(total, np.array(2 * math.log(2) + 5 * 0.4 + 2 * 0.75), rtol=1e-12,
                    what="total loss")


def test_random_case_against_numpy(rng):
    B, Q, C = 2, 4, 3
    outputs = random_outputs(rng, np, B, Q, C)
    targets = [{"labels": np.array([1, 2]), "boxes": np.array([[0.4, 0.5, 0.2, 0.3],
                                                                [0.6, 0.4, 0.3, 0.1]])},
               {"labels": np.array([0]), "boxes": np.array([[0.5, 0.5, 0.3, 0.3]])}]
    crit = make_criterion(C)
    indices = crit.matcher(outputs, targets)
    losses = crit(outputs, targets)
    onehot = np.zeros((B, Q, C))
    l1 = giou_sum = 0.0
    for b, (src, tgt) in enumerate(indices):
        onehot[b, src, targets[b]["labels"][tgt]] = 1
        pb, tb = outputs["pred_boxes"].data[b, src], targets[b]["boxes"][tgt]
        l1 += np.abs(pb - tb).sum()
        giou_sum += (1 - np.diag(generalized_box_iou(box_cxcywh_to_xyxy(pb),
                                                     box_cxcywh_to_xyxy(tb)))).sum()
    assert_allclose(losses["loss_ce"], np.array(numpy_focal(outputs["pred_logits"].data,
                                                            onehot, 3.0)), rtol=1e-12,
                    what="loss_ce")
    assert_allclose(losses["loss_bbox"], np.array(l1 / 3), rtol=1e-12, what="loss_bbox")
    assert_allclose(losses["loss_giou"], np.array(giou_sum / 3), rtol=1e-12, what="loss_giou")


def test_aux_and_enc_keys_and_binary_encoder_targets(rng):
    B, Q, S, C = 2, 3, 6, 3
    final = random_outputs(rng, np, B, Q, C)
    outputs = dict(final, aux_outputs=[random_outputs(rng, np, B, Q, C), dict(final)],
                   enc_outputs=random_outputs(rng, np, B, S, C))
    targets = [{"labels": np.array([2, 1]), "boxes": np.array([[0.4, 0.5, 0.2, 0.3],
                                                                [0.6, 0.4, 0.3, 0.1]])},
               {"labels": np.array([1]), "boxes": np.array([[0.5, 0.5, 0.3, 0.3]])}]
    crit = make_criterion(C)
    losses = crit(outputs, targets)
    base = ["loss_ce", "loss_bbox", "loss_giou", "cardinality_error"]
    expected = set(base) | {"class_error"} | {k + s for k in base for s in ("_0", "_1", "_enc")}
    assert set(losses) == expected
    # an aux output identical to the final one gives identical losses
    for k in ("loss_ce", "loss_bbox", "loss_giou"):
        assert_allclose(losses[k + "_1"], losses[k], rtol=1e-15, what=k + "_1 vs " + k)
    # encoder: every target is class 0, matched over all S proposals
    binary = [dict(t, labels=np.zeros_like(t["labels"])) for t in targets]
    enc = outputs["enc_outputs"]
    onehot = np.zeros((B, S, C))
    for b, (src, _) in enumerate(crit.matcher(enc, binary)):
        onehot[b, src, 0] = 1
    assert_allclose(losses["loss_ce_enc"], np.array(numpy_focal(enc["pred_logits"].data,
                                                                onehot, 3.0)), rtol=1e-12,
                    what="loss_ce_enc")
    # every weighted loss enters the total
    total = total_loss(losses, crit.weight_dict)
    manual = sum(crit.weight_dict[k] * losses[k].item() for k in losses if k in crit.weight_dict)
    assert_allclose(total, np.array(manual), rtol=1e-12, what="total")


def test_no_boxes_num_boxes_clamped_to_one(xp, rng):
    outputs = random_outputs(rng, xp, 2, 3, 2)
    empty = [{"labels": xp.zeros((0,), dtype=np.int64), "boxes": xp.zeros((0, 4))}] * 2
    assert count_boxes(empty) == 1.0
    losses = make_criterion(2)(outputs, empty)
    logits = to_numpy(outputs["pred_logits"].data)
    assert_allclose(losses["loss_ce"], np.array(numpy_focal(logits,
                                                            np.zeros((2, 3, 2)), 1.0)),
                    rtol=1e-12, what="loss_ce with no boxes (all negatives, / 1)")
    assert_allclose(losses["loss_bbox"], np.array(0.0), what="loss_bbox")
    assert_allclose(losses["loss_giou"], np.array(0.0), what="loss_giou")
    assert_allclose(losses["class_error"], np.array(100.0), what="class_error")
    total = total_loss(losses, build_weight_dict())
    total.backward()
    assert outputs["pred_logits"].grad.shape == (2, 3, 2)
    assert_allclose(outputs["pred_boxes"].grad, np.zeros((2, 3, 4)), what="no box gradient")


def test_criterion_gradcheck(rng):
    outputs = random_outputs(rng, np, 1, 3, 2)
    targets = [{"labels": np.array([1, 0]), "boxes": np.array([[0.45, 0.5, 0.2, 0.3],
                                                                [0.6, 0.4, 0.3, 0.2]])}]
    crit = make_criterion(2)

    def loss(logits, boxes):
        return crit.total(crit({"pred_logits": logits, "pred_boxes": boxes}, targets))

    gradcheck(loss, [outputs["pred_logits"].data, outputs["pred_boxes"].data],
              name="SetCriterion total")


def test_weight_dict_and_total_loss_errors():
    w = build_weight_dict()
    assert len(w) == 3 * (1 + 5 + 1)
    assert w["loss_ce_4"] == 2 and w["loss_bbox_enc"] == 5 and w["loss_giou_0"] == 2
    assert "loss_ce_5" not in w
    assert set(build_weight_dict(aux_loss=False)) == {"loss_ce", "loss_bbox", "loss_giou"}
    with pytest.raises(ValueError, match="no loss key has a weight"):
        total_loss({"class_error": Tensor(np.array(1.0))}, w)
    with pytest.raises(ValueError, match="unknown losses"):
        make_criterion(losses=("labels", "masks"))
    crit = make_criterion(3)
    outputs = {"pred_logits": Tensor(np.zeros((1, 2, 4))),
               "pred_boxes": Tensor(np.full((1, 2, 4), 0.5))}
    with pytest.raises(ValueError, match="4 classes, expected num_classes=3"):
        crit(outputs, [{"labels": np.array([0]), "boxes": np.array([[0.5, 0.5, 0.2, 0.2]])}])
