"""Numba CPU kernel of the Hungarian matcher's cost matrix (the fast path of
:meth:`.matcher.HungarianMatcher.cost_matrix` for NumPy arrays).

The reference in :mod:`.matcher` builds the cost out of the Tensor ops of
:mod:`minidetr.functional` and :mod:`.box_ops`: some 90 small NumPy passes, most of them
over (P, T, 2) broadcasts whose inner axis is only 2 wide, each into a fresh temporary.
Here one pass over the (p, t) pairs writes every entry from the prediction's logit at the
target's class and the two boxes, with the reference's formulas in the reference's order::

    s = sigmoid(x[p, c_t])                                  (x: the logits, c_t: t's class)
    class = alpha (1 - s)^gamma (-log(s + 1e-8)) - (1 - alpha) s^gamma (-log(1 - s + 1e-8))
    l1    = |b_p - b_t|_1                                   (cxcywh)
    giou  = I/U - (|C| - U)/|C|                             (xyxy corners; see box_ops)
    cost[p, t] = w_class * class + w_bbox * l1 - w_giou * giou

(a weight of 0 drops its term, as in the reference). Every operation is done in the
inputs' dtype, float32 or float64, without ``fastmath``, so the entries agree with the
reference to rounding: float64 within ~1e-12, float32 within ~1e-6 relative where the
sigmoid is not close to 1 (see below). Degenerate boxes give NaN or inf where
the reference does (0/0, x/0 follow IEEE rules: ``error_model="numpy"``), so that
:func:`.matcher.match_single` still rejects them.

The class cost depends on the target only through its class, so it is computed once per
prediction and distinct target class: the encoder's proposals, matched class-agnostically
(every label 0), need one sigmoid and two logs per row.

Measured (2 CPU cores, float32, T = 12 targets, 91 classes, ``HungarianMatcher.cost_matrix``,
minimum of 20 calls), the reference before it took the sigmoid of the targets' classes only
/ the reference / here:

* the two-stage encoder's proposals, P = 2720 rows, labels 0: 8.3 / 5.4 / 0.31 ms
  (12 distinct labels: 0.63 ms here);
* a decoder layer's predictions, P = 200 rows, 12 distinct labels: 1.05 / 1.0 / 0.07 ms.

NumPy's float32 ``exp`` and ``log`` (SIMD, up to ~3 ulp) and the kernel's (libm, under
1 ulp) can differ in the last bits; ``log(1 - s + 1e-8)`` turns a relative difference d in
s into about d / (1 - s), so for large logits the float32 class costs of the two can
differ by more than 1e-6 relative (both are that far from the exact value). The box terms
are bit for bit the reference's.

Threads: none (the calling thread). Compilation: on first use, once per dtype (about 1 s),
cached on disk (0.2 s to load).
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cost_matrix"]


@njit(inline="always")
def _max(a, b):
    """max(a, b) where a NaN in either wins (as ``F.maximum``)."""
    return a if (a >= b or a != a) else b


@njit(inline="always")
def _min(a, b):
    """min(a, b) where a NaN in either wins (as ``F.minimum``)."""
    return a if (a <= b or a != a) else b


@njit(inline="always")
def _clamp0(v, zero):
    """max(v, 0) keeping a NaN (as ``F.clamp(v, lo=0)``, i.e. ``np.clip``)."""
    return zero if v < zero else v


@njit(inline="always")
def _power(v, gamma, two):
    """v ** gamma; v * v for gamma = 2 (what NumPy's ``x ** 2.0`` computes)."""
    return v * v if gamma == two else v ** gamma


@njit(inline="always")
def _class_cost(x, a_pos, a_neg, g, eps, zero, one, two):
    """The focal-style class cost of one logit x, in x's dtype (stable sigmoid first)."""
    e = np.exp(-abs(x))
    s = one / (one + e) if x >= zero else e / (one + e)
    pos = a_pos * _power(one - s, g, two) * -np.log(s + eps)
    neg = a_neg * _power(s, g, two) * -np.log(one - s + eps)
    return pos - neg


@njit(cache=True, error_model="numpy")
def _cost_matrix(logits, classes, column_class, boxes, tgt_boxes, w_class, w_bbox, w_giou,
                 alpha, gamma, out):
    """out (P, T) = the weighted matching cost of every prediction against every target.

    The class cost of prediction p depends on the target only through its class, so it is
    computed once per distinct class (``classes``) and read back per column through
    ``column_class``: the encoder's proposals, matched class-agnostically (every label 0),
    need one sigmoid and two logs per row instead of T.

    Shapes:
        logits: (P, num_classes); classes: (U,) int64, the distinct target classes, in
        [0, num_classes); column_class: (T,) int64, target t's class is classes[column_class[t]];
        boxes: (P, 4) cxcywh; tgt_boxes: (T, 4) cxcywh; out: (P, T). All floats of one
        dtype; the scalars are Python floats, rounded to that dtype here (as the
        reference's operands are).
    """
    P, T = out.shape
    U = classes.shape[0]
    f = out.dtype.type
    zero, half, one, two, eps = f(0.0), f(0.5), f(1.0), f(2.0), f(1e-8)
    wc, wb, wg = f(w_class), f(w_bbox), f(w_giou)
    a_pos, a_neg, g = f(alpha), f(1.0 - alpha), f(gamma)   # 1 - alpha in Python floats

    # the targets' corners and areas, once
    tgt_xyxy = np.empty((T, 4), out.dtype)                                    # (T, 4)
    tgt_area = np.empty(T, out.dtype)                                         # (T,)
    for t in range(T):
        cx, cy, w, h = tgt_boxes[t, 0], tgt_boxes[t, 1], tgt_boxes[t, 2], tgt_boxes[t, 3]
        hw, hh = half * w, half * h
        tgt_xyxy[t, 0], tgt_xyxy[t, 1] = cx - hw, cy - hh
        tgt_xyxy[t, 2], tgt_xyxy[t, 3] = cx + hw, cy + hh
        tgt_area[t] = (tgt_xyxy[t, 2] - tgt_xyxy[t, 0]) * (tgt_xyxy[t, 3] - tgt_xyxy[t, 1])

    cls = np.empty(U, out.dtype)                   # (U,) prediction p's class cost per class
    for p in range(P):
        if wc != zero:
            for u in range(U):
                cls[u] = _class_cost(logits[p, classes[u]], a_pos, a_neg, g, eps, zero, one,
                                     two)
        cx, cy, w, h = boxes[p, 0], boxes[p, 1], boxes[p, 2], boxes[p, 3]
        hw, hh = half * w, half * h
        x0, y0, x1, y1 = cx - hw, cy - hh, cx + hw, cy + hh                  # the corners
        area = (x1 - x0) * (y1 - y0)
        for t in range(T):
            c = zero
            if wc != zero:
                c = c + wc * cls[column_class[t]]
            if wb != zero:
                l1 = abs(cx - tgt_boxes[t, 0]) + abs(cy - tgt_boxes[t, 1])
                l1 = l1 + abs(w - tgt_boxes[t, 2])
                l1 = l1 + abs(h - tgt_boxes[t, 3])
                c = c + wb * l1
            if wg != zero:
                u0, v0, u1, v1 = tgt_xyxy[t, 0], tgt_xyxy[t, 1], tgt_xyxy[t, 2], tgt_xyxy[t, 3]
                # intersection (empty: 0) and union
                iw = _clamp0(_min(x1, u1) - _max(x0, u0), zero)
                ih = _clamp0(_min(y1, v1) - _max(y0, v0), zero)
                inter = iw * ih
                union = area + tgt_area[t] - inter
                iou = inter / union
                # the smallest enclosing box
                cw = _clamp0(_max(x1, u1) - _min(x0, u0), zero)
                ch = _clamp0(_max(y1, v1) - _min(y0, v0), zero)
                enclosing = cw * ch
                c = c - wg * (iou - (enclosing - union) / enclosing)
            out[p, t] = c


def cost_matrix(logits, labels, boxes, tgt_boxes, w_class, w_bbox, w_giou, alpha, gamma):
    """The (P, T) matching cost, one pass (see the module docstring for the formula).

    Shapes:
        logits: (P, num_classes), boxes: (P, 4), tgt_boxes: (T, 4) NumPy float32 or float64,
        all one dtype; labels: (T,) integers in [0, num_classes) (the caller checks them:
        the kernel does not bounds-check). -> (P, T) of that dtype.
    """
    dtype = boxes.dtype
    classes, column_class = np.unique(labels, return_inverse=True)          # (U,), (T,)
    out = np.empty((boxes.shape[0], tgt_boxes.shape[0]), dtype=dtype)       # (P, T)
    _cost_matrix(np.ascontiguousarray(logits), classes.astype(np.int64),
                 column_class.reshape(-1).astype(np.int64), np.ascontiguousarray(boxes),
                 np.ascontiguousarray(tgt_boxes, dtype=dtype), float(w_class), float(w_bbox),
                 float(w_giou), float(alpha), float(gamma), out)
    return out
