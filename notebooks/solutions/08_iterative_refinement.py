"""Solutions to the exercises of notebook 08, iterative bounding-box refinement.

Each ``exercise_N()`` runs in a few seconds on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.lessons import experiments as ex
from minidetr.lessons.trained import (held_out_shapes, iou_cxcywh, layer_boxes,
                                      load_cached_model, per_layer_iou)
from minidetr.models import (box_cxcywh_to_xyxy, build_criterion, build_model,
                             elementwise_generalized_box_iou, get_config)
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.optim import AdamW

MICRO = dict(d_model=32, nheads=2, dim_feedforward=32, tiny_channels=(8, 16, 16, 16),
             num_queries=6, dropout=0.0)


def exercise_1():
    """Prediction: one. Every head after the first starts at delta = 0, so each layer
    returns the box it was given: all 6 layers predict the same box per query."""
    model = build_model(get_config("tiny", "refine", dec_layers=6, **MICRO)).eval()
    images = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    with no_grad():
        boxes = layer_boxes(model(Tensor(images)))                          # (6, 1, Nq, 4)
    assert boxes.shape[0] == 6
    np.testing.assert_allclose(boxes, np.broadcast_to(boxes[:1], boxes.shape), atol=1e-6)


def final_loss(model, criterion, images, targets, attached):
    """The final layer's set loss; ``attached`` rebuilds its box by chaining every box
    head *with* gradient (the references no longer detached)."""
    outputs = model(Tensor(images))
    final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
    if attached:
        mask = np.zeros((images.shape[0],) + images.shape[2:], bool)        # no padding
        srcs, masks, pos = model.project_features(Tensor(images), mask)
        out = model.transformer(srcs, masks, pos, model.query_embed.weight)
        box = out.init_reference
        for i in range(len(model.bbox_embed)):
            box = box_from_reference(model.bbox_embed[i](out.hs[i]), box)
        final["pred_boxes"] = box
    return criterion.total(criterion(final, targets))


def exercise_2():
    """Without the detach the final loss reaches the first box head (the notebook's check
    'bbox_embed[0] gets no gradient from the final loss' fails); with it, it does not.
    Both versions still train: 8 steps on one image lower the loss."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((1, 3, 64, 64)).astype(np.float32)
    targets = [{"labels": np.array([1]), "boxes": np.array([[0.4, 0.5, 0.3, 0.4]], np.float32)}]
    for attached in (False, True):
        cfg = get_config("tiny", "refine", dec_layers=3, **MICRO)
        model, criterion = build_model(cfg), build_criterion(cfg)
        model.zero_grad()
        final_loss(model, criterion, images, targets, attached).backward()
        first = model.bbox_embed[0].layers[-1].weight.grad
        reached = first is not None and np.abs(first).max() > 0
        assert reached == attached, (attached, reached)
        optimizer = AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            model.zero_grad()
            loss = final_loss(model, criterion, images, targets, attached)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.data))
        print("attached" if attached else "detached", [round(x, 3) for x in losses])
        assert np.isfinite(losses).all() and losses[-1] < losses[0]


def cached_models(num_images=16):
    models = {v: load_cached_model(ex.CACHE / f"{v}.npz") for v in ("plain", "refine")}
    batches = held_out_shapes(ex.DATA.parent / "shapes-heldout", num_images, batch_size=16,
                              category_map=models["refine"][2].category_map)
    return models, batches


def exercise_3():
    """GIoU instead of IoU: GIoU <= IoU for every box (it subtracts the empty part of the
    enclosing box), and it is computed here for the tracked boxes of both cached models."""
    models, batches = cached_models()
    for variant, (model, cfg, _) in models.items():
        matcher = build_criterion(cfg).matcher
        ious, gious = [], []
        for images, mask, targets in batches:
            with no_grad():
                outputs = model(Tensor(images), mask)
            boxes = layer_boxes(outputs)
            for n, (q, t) in enumerate(matcher(outputs, targets)):
                gt = np.asarray(targets[n]["boxes"], np.float64)[t]
                for d in range(len(boxes)):
                    pred = boxes[d, n, q].astype(np.float64)
                    ious.append(iou_cxcywh(pred, gt))
                    gious.append(elementwise_generalized_box_iou(box_cxcywh_to_xyxy(pred),
                                                                 box_cxcywh_to_xyxy(gt)))
        ious, gious = np.concatenate(ious), np.concatenate(gious)
        print(variant, ious.mean().round(3), gious.mean().round(3))
        assert np.all(gious <= ious + 1e-9) and np.all(gious >= -1)


def exercise_4():
    """How far is layer 1's box from layer 0's? Prediction: closer in the refine model,
    whose layer 1 starts from layer 0's box and corrects it, than in the plain model,
    whose layers predict independently around the same reference point. Measured as the
    mean L1 distance (over the four coordinates) between the two layers' boxes of every
    query, for the cached models: about 0.02 (refine) against 0.05 (plain)."""
    models, batches = cached_models()
    moved = {}
    for variant, (model, _, _) in models.items():
        d = []
        for images, mask, _ in batches:
            with no_grad():
                boxes = layer_boxes(model(Tensor(images), mask))            # (D, N, Nq, 4)
            d.append(np.abs(boxes[-1] - boxes[0]).sum(-1).reshape(-1))
        moved[variant] = float(np.concatenate(d).mean())
    print(moved)
    assert all(v > 0 for v in moved.values()), moved
    assert moved["refine"] < moved["plain"], moved
