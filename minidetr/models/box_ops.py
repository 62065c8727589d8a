"""Box geometry: format conversions, area, IoU, generalised IoU, inverse sigmoid.

Two box formats appear in the detector:

* ``cxcywh`` = (c_x, c_y, w, h): what the model predicts and what the targets hold,
  normalised by the image's width and height (so every coordinate lies in [0, 1]);
* ``xyxy`` = (x_0, y_0, x_1, y_1): the corners, needed for intersections and for the
  final detections.

Every function here is written once, with the differentiable ops of
:mod:`minidetr.functional`, and accepts either

* Tensors: the result is a Tensor and gradients flow (the box losses), or
* plain arrays (NumPy or CuPy): the same code runs on them without recording a graph and
  the result is a plain array (the matcher's cost matrix, post-processing, data code).

Pairwise functions compare every box of one set with every box of another, ``(A, 4)`` and
``(B, 4)`` giving ``(A, B)``; the ``elementwise_*`` variants compare matched pairs, ``(P, 4)``
and ``(P, 4)`` giving ``(P,)``. Both call the same broadcasting core, so the IoU maths is
written exactly once.

Shapes:
    boxes: (..., 4), any number of leading axes.
    pairwise: boxes1 (A, 4), boxes2 (B, 4) -> (A, B).
    elementwise: boxes1 (P, 4), boxes2 (P, 4) -> (P,).
"""
from __future__ import annotations

import functools

from .. import functional as F
from ..autograd import Tensor, no_grad

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "box_area", "box_iou",
           "generalized_box_iou", "elementwise_box_iou", "elementwise_generalized_box_iou",
           "inverse_sigmoid"]


# --------------------------------------------------------------------------- Tensor or array
def _tensors_or_arrays(fn):
    """Let ``fn`` (written over Tensors) take plain arrays too.

    If any positional argument is a Tensor, ``fn`` runs as written and returns Tensors.
    Otherwise the arrays are wrapped in Tensors that need no gradient, ``fn`` runs under
    :func:`no_grad`, and the result (a Tensor or a tuple of Tensors) is unwrapped again.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if any(isinstance(a, Tensor) for a in args):
            return fn(*args, **kwargs)
        with no_grad():
            out = fn(*[Tensor(a) for a in args], **kwargs)
        if isinstance(out, tuple):
            return tuple(o.data for o in out)
        return out.data
    return wrapper


def _check_boxes(name, boxes, ndim=None):
    """A clear error unless ``boxes`` ends in 4 coordinates (and has ``ndim`` axes if given)."""
    if boxes.ndim == 0 or boxes.shape[-1] != 4:
        raise ValueError(f"{name}: boxes must have a last axis of size 4, got shape "
                         f"{tuple(boxes.shape)}")
    if ndim is not None and boxes.ndim != ndim:
        raise ValueError(f"{name}: expected boxes of shape ({'P' if ndim == 1 else 'A'}, 4) "
                         f"with {ndim} axes, got shape {tuple(boxes.shape)}")


# --------------------------------------------------------------------------- conversions
@_tensors_or_arrays
def box_cxcywh_to_xyxy(boxes):
    """(c_x, c_y, w, h) -> (x_0, y_0, x_1, y_1) = (c_x - w/2, c_y - h/2, c_x + w/2, c_y + h/2).

    Shapes:
        boxes: (..., 4) -> (..., 4).
    """
    _check_boxes("box_cxcywh_to_xyxy", boxes)
    cx, cy, w, h = (boxes[..., i] for i in range(4))          # each (...)
    half_w, half_h = 0.5 * w, 0.5 * h                         # each once (exact: x 0.5)
    return F.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], axis=-1)


@_tensors_or_arrays
def box_xyxy_to_cxcywh(boxes):
    """(x_0, y_0, x_1, y_1) -> (c_x, c_y, w, h): centre ((x_0 + x_1)/2, (y_0 + y_1)/2), size
    (x_1 - x_0, y_1 - y_0). The inverse of :func:`box_cxcywh_to_xyxy`.

    Shapes:
        boxes: (..., 4) -> (..., 4).
    """
    _check_boxes("box_xyxy_to_cxcywh", boxes)
    x0, y0, x1, y1 = (boxes[..., i] for i in range(4))        # each (...)
    return F.stack([(x0 + x1) * 0.5, (y0 + y1) * 0.5, x1 - x0, y1 - y0], axis=-1)


@_tensors_or_arrays
def box_area(boxes):
    """Area (x_1 - x_0)(y_1 - y_0) of ``xyxy`` boxes.

    Shapes:
        boxes: (..., 4) -> (...).
    """
    _check_boxes("box_area", boxes)
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


# --------------------------------------------------------------------------- IoU core
def _iou_union_enclosing(boxes1, boxes2):
    """IoU, union area and enclosing-box area of two broadcastable sets of ``xyxy`` boxes.

    The one implementation behind both the pairwise and the elementwise functions:
    the caller arranges the axes so that ``boxes1[..., :]`` and ``boxes2[..., :]``
    broadcast against each other.

    Shapes:
        boxes1, boxes2: (..., 4), broadcastable -> iou, union, enclosing: (...).
    """
    area1, area2 = box_area(boxes1), box_area(boxes2)                  # (...)
    # intersection: the overlap of the two boxes, empty (0) when they do not overlap
    top_left = F.maximum(boxes1[..., :2], boxes2[..., :2])            # (..., 2)
    bottom_right = F.minimum(boxes1[..., 2:], boxes2[..., 2:])        # (..., 2)
    wh = F.clamp(bottom_right - top_left, lo=0.0)                    # (..., 2)
    inter = wh[..., 0] * wh[..., 1]                                   # (...)
    union = area1 + area2 - inter
    iou = inter / union
    # enclosing box: the smallest box that contains both
    top_left_c = F.minimum(boxes1[..., :2], boxes2[..., :2])          # (..., 2)
    bottom_right_c = F.maximum(boxes1[..., 2:], boxes2[..., 2:])      # (..., 2)
    wh_c = F.clamp(bottom_right_c - top_left_c, lo=0.0)               # (..., 2)
    enclosing = wh_c[..., 0] * wh_c[..., 1]                           # (...)
    return iou, union, enclosing


def _giou(boxes1, boxes2):
    """GIoU = IoU - (|C| - |A u B|) / |C| for broadcastable ``xyxy`` boxes (see the core)."""
    iou, union, enclosing = _iou_union_enclosing(boxes1, boxes2)
    return iou - (enclosing - union) / enclosing


def _pairwise(boxes1, boxes2):
    """(A, 4), (B, 4) -> (A, 1, 4), (1, B, 4): every box of set 1 against every box of set 2."""
    return boxes1[:, None, :], boxes2[None, :, :]


# --------------------------------------------------------------------------- pairwise
@_tensors_or_arrays
def box_iou(boxes1, boxes2):
    """Pairwise IoU of two sets of ``xyxy`` boxes, and the union areas.

    Shapes:
        boxes1: (A, 4), boxes2: (B, 4) -> iou: (A, B), union: (A, B).
    """
    _check_boxes("box_iou(boxes1)", boxes1, ndim=2)
    _check_boxes("box_iou(boxes2)", boxes2, ndim=2)
    iou, union, _ = _iou_union_enclosing(*_pairwise(boxes1, boxes2))
    return iou, union


@_tensors_or_arrays
def generalized_box_iou(boxes1, boxes2):
    """Pairwise generalised IoU (Rezatofighi et al., 2019) of two sets of ``xyxy`` boxes.

    GIoU = IoU - (|C| - |A u B|) / |C| with C the smallest box enclosing A and B. It lies in
    (-1, 1]: 1 for identical boxes, and unlike IoU it keeps decreasing (towards -1) as
    disjoint boxes move apart, so ``1 - GIoU`` gives a gradient even without overlap.
    Boxes must not be degenerate (x_1 >= x_0, y_1 >= y_0, and positive enclosing area).

    Shapes:
        boxes1: (A, 4), boxes2: (B, 4) -> (A, B).
    """
    _check_boxes("generalized_box_iou(boxes1)", boxes1, ndim=2)
    _check_boxes("generalized_box_iou(boxes2)", boxes2, ndim=2)
    return _giou(*_pairwise(boxes1, boxes2))


# --------------------------------------------------------------------------- elementwise
@_tensors_or_arrays
def elementwise_box_iou(boxes1, boxes2):
    """IoU of matched pairs: ``boxes1[p]`` with ``boxes2[p]`` (the diagonal of :func:`box_iou`).

    Shapes:
        boxes1: (P, 4), boxes2: (P, 4) -> iou: (P,), union: (P,).
    """
    _check_boxes("elementwise_box_iou(boxes1)", boxes1, ndim=2)
    _check_boxes("elementwise_box_iou(boxes2)", boxes2, ndim=2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"elementwise_box_iou: boxes1 {tuple(boxes1.shape)} and boxes2 "
                         f"{tuple(boxes2.shape)} must hold the same number of boxes")
    iou, union, _ = _iou_union_enclosing(boxes1, boxes2)
    return iou, union


@_tensors_or_arrays
def elementwise_generalized_box_iou(boxes1, boxes2):
    """GIoU of matched pairs (the diagonal of :func:`generalized_box_iou`, in O(P) not O(P^2)).

    Used by the GIoU loss, which compares each matched prediction with its own target.

    Shapes:
        boxes1: (P, 4), boxes2: (P, 4) -> (P,).
    """
    _check_boxes("elementwise_generalized_box_iou(boxes1)", boxes1, ndim=2)
    _check_boxes("elementwise_generalized_box_iou(boxes2)", boxes2, ndim=2)
    if boxes1.shape != boxes2.shape:
        raise ValueError(f"elementwise_generalized_box_iou: boxes1 {tuple(boxes1.shape)} and "
                         f"boxes2 {tuple(boxes2.shape)} must hold the same number of boxes")
    return _giou(boxes1, boxes2)


# --------------------------------------------------------------------------- inverse sigmoid
@_tensors_or_arrays
def inverse_sigmoid(x, eps=1e-5):
    """The logit, sigma^-1(x) = log(x / (1 - x)), made safe at 0 and 1 as in the official code.

    x is clamped to [0, 1], then sigma^-1(x) = log(max(x, eps) / max(1 - x, eps)), so the
    result is finite (|.| <= log(1/eps) ~ 11.5) and its gradient is 0 where a clamp is
    active. Box refinement uses it to turn a reference box back into logits.

    Shapes:
        x: any -> same shape.
    """
    x = F.clamp(x, lo=0.0, hi=1.0)
    return F.log(F.clamp(x, lo=eps) / F.clamp(1.0 - x, lo=eps))
