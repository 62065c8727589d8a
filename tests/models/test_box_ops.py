"""Box geometry: conversions, IoU and GIoU on hand-computed boxes, gradients, arrays vs Tensors."""
from __future__ import annotations

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.models.box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,
                                     elementwise_box_iou, elementwise_generalized_box_iou,
                                     generalized_box_iou, inverse_sigmoid)
from minidetr.testing import assert_allclose, gradcheck


def random_xyxy(rng, n):
    """n valid xyxy boxes inside [0, 1]^2 (positive width and height)."""
    xy0 = rng.uniform(0.0, 0.6, size=(n, 2))
    wh = rng.uniform(0.05, 0.4, size=(n, 2))
    return np.concatenate([xy0, xy0 + wh], axis=1)


# --------------------------------------------------------------------------- conversions
def test_conversions_known_values(xp):
    cxcywh = xp.asarray([[0.5, 0.5, 0.2, 0.4], [0.3, 0.6, 0.0, 0.1]], dtype=xp.float32)
    xyxy = box_cxcywh_to_xyxy(cxcywh)
    assert type(xyxy) is type(cxcywh) and xyxy.dtype == xp.float32
    assert_allclose(xyxy, np.array([[0.4, 0.3, 0.6, 0.7], [0.3, 0.55, 0.3, 0.65]]),
                    atol=1e-7, what="cxcywh -> xyxy")
    assert_allclose(box_xyxy_to_cxcywh(xyxy), cxcywh, atol=1e-7, what="xyxy -> cxcywh")


def test_conversions_round_trip_any_leading_shape(rng):
    b = rng.uniform(0.1, 0.9, size=(2, 3, 5, 4))
    assert_allclose(box_xyxy_to_cxcywh(box_cxcywh_to_xyxy(b)), b, atol=1e-12, what="round trip")
    assert_allclose(box_cxcywh_to_xyxy(box_xyxy_to_cxcywh(b)), b, atol=1e-12, what="round trip")


def test_tensor_in_tensor_out():
    t = Tensor(np.array([[0.5, 0.5, 0.2, 0.2]]), requires_grad=True)
    out = box_cxcywh_to_xyxy(t)
    assert isinstance(out, Tensor) and out.requires_grad


def test_bad_box_shape_names_the_function():
    with pytest.raises(ValueError, match="box_cxcywh_to_xyxy.*last axis of size 4"):
        box_cxcywh_to_xyxy(np.zeros((3, 5)))
    with pytest.raises(ValueError, match=r"generalized_box_iou\(boxes2\)"):
        generalized_box_iou(np.zeros((3, 4)), np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="same number of boxes"):
        elementwise_generalized_box_iou(np.zeros((3, 4)), np.zeros((2, 4)))


# --------------------------------------------------------------------------- IoU, GIoU
def test_area(xp):
    assert_allclose(box_area(xp.asarray([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 1.5, 1.25]])),
                    np.array([6.0, 0.125]), what="area")


def test_iou_and_giou_hand_computed(xp):
    # A = [0, 2]^2 (area 4) against:
    #   identical             : inter 4, union 4, C 4           -> IoU 1,   GIoU 1
    #   nested [0.5, 1.5]^2   : inter 1, union 4, C 4           -> IoU 1/4, GIoU 1/4
    #   overlap [1, 3]^2      : inter 1, union 7, C 9           -> IoU 1/7, GIoU 1/7 - 2/9
    #   touching [2, 4]x[0, 2]: inter 0, union 8, C 8           -> IoU 0,   GIoU 0
    #   disjoint [3, 4]x[0, 1]: inter 0, union 5, C = 4 x 2 = 8 -> IoU 0,   GIoU -3/8
    a = xp.asarray([[0.0, 0.0, 2.0, 2.0]])
    others = xp.asarray([[0.0, 0.0, 2.0, 2.0], [0.5, 0.5, 1.5, 1.5], [1.0, 1.0, 3.0, 3.0],
                         [2.0, 0.0, 4.0, 2.0], [3.0, 0.0, 4.0, 1.0]])
    iou, union = box_iou(a, others)
    assert iou.shape == (1, 5) and union.shape == (1, 5)
    assert_allclose(iou, np.array([[1, 1 / 4, 1 / 7, 0, 0]]), atol=1e-15, what="IoU")
    assert_allclose(union, np.array([[4, 4, 7, 8, 5]]), atol=1e-15, what="union")
    giou = generalized_box_iou(a, others)
    assert_allclose(giou, np.array([[1, 1 / 4, 1 / 7 - 2 / 9, 0, -3 / 8]]), atol=1e-15,
                    what="GIoU")
    # the elementwise variant is the diagonal of the pairwise one
    pairs = xp.concatenate([a] * 5)
    assert_allclose(elementwise_generalized_box_iou(pairs, others), giou[0], atol=1e-15,
                    what="elementwise GIoU")
    assert_allclose(elementwise_box_iou(pairs, others)[0], iou[0], atol=1e-15,
                    what="elementwise IoU")


def test_giou_is_symmetric_bounded_and_pairwise_matches_elementwise(rng):
    b1, b2 = random_xyxy(rng, 5), random_xyxy(rng, 3)
    g = generalized_box_iou(b1, b2)
    assert g.shape == (5, 3)
    assert_allclose(g, generalized_box_iou(b2, b1).T, atol=1e-14, what="GIoU symmetry")
    assert (g > -1).all() and (g <= 1).all()
    assert (g <= box_iou(b1, b2)[0] + 1e-15).all(), "GIoU must never exceed IoU"
    for j in range(3):
        assert_allclose(elementwise_generalized_box_iou(b1, np.repeat(b2[j:j + 1], 5, axis=0)),
                        g[:, j], atol=1e-14, what=f"elementwise vs pairwise, column {j}")


def test_giou_gradcheck(rng):
    # overlapping but distinct boxes: no ties between corners and no empty intersection,
    # so max/min/clamp are away from their kinks
    b1 = np.array([[0.10, 0.20, 0.60, 0.70], [0.30, 0.15, 0.80, 0.55]])
    b2 = np.array([[0.25, 0.05, 0.70, 0.50], [0.05, 0.35, 0.45, 0.90], [0.62, 0.60, 0.95, 0.97]])
    gradcheck(generalized_box_iou, [b1, b2], name="generalized_box_iou")
    gradcheck(elementwise_generalized_box_iou, [b1, b2[:2]], name="elementwise_generalized_box_iou")
    # through the cxcywh conversion, as the loss uses it
    c1 = box_xyxy_to_cxcywh(b1)
    c2 = box_xyxy_to_cxcywh(b2[:2])
    gradcheck(lambda p, q: elementwise_generalized_box_iou(box_cxcywh_to_xyxy(p),
                                                           box_cxcywh_to_xyxy(q)),
              [c1, c2], name="giou(cxcywh)")


# --------------------------------------------------------------------------- inverse sigmoid
def test_inverse_sigmoid_values_and_clamps(xp):
    x = xp.asarray([-0.5, 0.0, 1e-7, 0.25, 0.5, 0.9, 1.0, 2.0], dtype=xp.float64)
    eps = 1e-5
    expected = np.array([np.log(eps / 1), np.log(eps / 1), np.log(eps / (1 - 1e-7)),
                         np.log(1 / 3), 0.0, np.log(9.0), np.log(1 / eps), np.log(1 / eps)])
    assert_allclose(inverse_sigmoid(x), expected, rtol=1e-12, atol=1e-12, what="inverse_sigmoid")


def test_inverse_sigmoid_inverts_sigmoid_and_gradcheck(rng):
    logits = rng.normal(size=(3, 4))
    p = 1 / (1 + np.exp(-logits))
    assert_allclose(inverse_sigmoid(p), logits, rtol=1e-9, atol=1e-9, what="sigma^-1(sigma(x))")
    gradcheck(inverse_sigmoid, [p], name="inverse_sigmoid")
    # outside [0, 1] both clamps are flat: zero gradient. Below eps only the numerator is
    # clamped, so d/dx [log eps - log(1 - x)] = 1 / (1 - x) remains.
    t = Tensor(np.array([-0.2, 1e-6, 1.3]), requires_grad=True)
    inverse_sigmoid(t).sum().backward()
    assert_allclose(t.grad, np.array([0.0, 1 / (1 - 1e-6), 0.0]), rtol=1e-12,
                    what="gradient where clamped")
