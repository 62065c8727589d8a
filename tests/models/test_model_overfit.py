"""The tiny detector learns: it overfits one image of the shapes dataset, every variant.

The sharpest end-to-end check of training there is. If a gradient were wrong, a head
wired to the wrong layer, a reference not refined or a proposal not selected, the model
could not fit a single image. After 200 AdamW steps (lr 1e-3, no weight decay, dropout
0, gradient clipping 0.1 as in the paper) on one 64 x 64 image with three objects:

* the total loss has fallen by more than 20x (it falls 40-80x);
* the three best-scoring detections of PostProcess are the three objects: each has the
  object's class and IoU > 0.8 with its box (one detection per object; they reach
  0.9-0.99), scores above 0.5, and the fourth-best detection scores below 0.3.

It runs on the model's default MSDA backend (Numba on a CPU) in float32, as training does.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from minidetr.autograd import no_grad
from minidetr.data.shapes import render_shapes_image
from minidetr.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from minidetr.models.box_ops import box_iou
from minidetr.models.build import build_criterion, build_model, build_postprocess
from minidetr.models.config import get_config
from minidetr.optim import AdamW, clip_grad_norm_

SIZE = 64
STEPS = 200


def one_image(seed=6):
    """One SIZE x SIZE shapes image (seed 6: a star, a circle and a cross) as a batch of
    one, its padding mask (none), its targets and its boxes in pixels (xyxy)."""
    pixels, objects = render_shapes_image(np.random.default_rng(seed), SIZE, SIZE)
    image = (pixels / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)   # (H, W, 3)
    images = image.transpose(2, 0, 1)[None].astype(np.float32)                     # (1, 3, H, W)
    x, y, w, h = np.array([o["bbox"] for o in objects], dtype=np.float32).T        # (T,) each
    boxes = np.stack([x + w / 2, y + h / 2, w, h], axis=1) / SIZE                  # (T, 4) cxcywh
    labels = np.array([o["category_id"] - 1 for o in objects])       # classes 0..4
    xyxy = np.stack([x, y, x + w, y + h], axis=1)                                  # (T, 4) pixels
    return images, np.zeros((1, SIZE, SIZE), bool), [{"labels": labels, "boxes": boxes}], xyxy


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_tiny_model_overfits_one_image(variant):
    start = time.perf_counter()
    images, mask, targets, gt_xyxy = one_image()
    labels = targets[0]["labels"]
    T = len(labels)
    assert T == 3 and len(set(labels.tolist())) == 3

    cfg = get_config("tiny", variant, dropout=0.0)
    model = build_model(cfg)
    criterion = build_criterion(cfg)
    optimizer = AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    curve = []
    for step in range(STEPS + 1):
        loss = criterion.total(criterion(model(images, mask), targets))
        curve.append(float(loss.data))
        assert np.isfinite(curve[-1]), f"{variant}: loss {curve[-1]} at step {step}"
        if step == STEPS:
            break
        model.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 0.1)
        optimizer.step()

    model.eval()
    with no_grad():
        detections = build_postprocess(cfg)(model(images, mask), np.array([[SIZE, SIZE]]))[0]
    scores, top_labels = detections["scores"], detections["labels"]
    iou, _ = box_iou(detections["boxes"][:T].astype(np.float64),
                     gt_xyxy.astype(np.float64))                         # (T dets, T objects)
    same_class = top_labels[:T, None] == labels[None, :]
    det, obj = linear_sum_assignment(-(iou * same_class))                # one detection per object
    matched_iou = (iou * same_class)[det, obj]
    report = (f"{variant}: loss {' -> '.join(f'{curve[s]:.3f}' for s in range(0, STEPS + 1, 50))}"
              f"; top-{T} labels {top_labels[:T].tolist()} (objects {labels.tolist()}), IoU "
              f"{[round(float(v), 3) for v in matched_iou[np.argsort(obj)]]}, scores "
              f"{[round(float(v), 3) for v in scores[:T + 1]]}; "
              f"{time.perf_counter() - start:.1f} s")
    print(report)
    final = float(np.mean(curve[-10:]))
    assert curve[0] / final > 20, f"the loss fell only {curve[0] / final:.1f}x: {report}"
    assert (matched_iou > 0.8).all(), f"an object was not found (class + IoU > 0.8): {report}"
    assert (scores[:T] > 0.5).all() and scores[T] < 0.3, f"scores not separated: {report}"
