"""From raw predictions to detections: top-k (query, class) pairs with absolute boxes.

The official ``PostProcess`` of Deformable DETR: every (query, class) pair is a candidate
detection scored by sigmoid(logit), so one query may yield several labels. The ``k`` best
pairs of each image are kept (k = 100), with

    query = flat_index // num_classes,     label = flat_index % num_classes,

and the query's box is converted from normalised cxcywh to xyxy and scaled to the image's
pixel size. There is no score threshold and no NMS (COCO evaluation wants the top 100);
``threshold`` optionally drops detections scoring at or below it, as HuggingFace does.

Shapes:
    outputs["pred_logits"]: (B, Q, num_classes); outputs["pred_boxes"]: (B, Q, 4) cxcywh.
    target_sizes: (B, 2) rows (height, width) of the *original* images.
    result: B dicts {"scores": (k,), "labels": (k,) int64, "boxes": (k, 4) xyxy pixels},
    arrays on the predictions' device, sorted by decreasing score.
"""
from __future__ import annotations

from .. import functional as F
from ..autograd import Tensor, no_grad
from ..backend import get_array_module
from .box_ops import box_cxcywh_to_xyxy

__all__ = ["PostProcess"]


class PostProcess:
    """Turns model outputs into per-image detections (see the module docstring).

    Args:
        num_select: how many (query, class) pairs to keep per image (official 100).
        threshold: if not None, also drop detections with score <= threshold.
    """

    def __init__(self, num_select: int = 100, threshold=None):
        if num_select < 1:
            raise ValueError(f"PostProcess: num_select must be >= 1, got {num_select}")
        self.num_select = int(num_select)
        self.threshold = threshold

    def __repr__(self):
        return f"PostProcess(num_select={self.num_select}, threshold={self.threshold})"

    def __call__(self, outputs, target_sizes):
        logits = outputs["pred_logits"]
        boxes = outputs["pred_boxes"]
        logits = logits.data if isinstance(logits, Tensor) else logits     # (B, Q, num_classes)
        boxes = boxes.data if isinstance(boxes, Tensor) else boxes          # (B, Q, 4)
        if logits.ndim != 3 or boxes.shape != logits.shape[:2] + (4,):
            raise ValueError(f"PostProcess: expected pred_logits (B, Q, num_classes) and "
                             f"pred_boxes (B, Q, 4), got {tuple(logits.shape)} and "
                             f"{tuple(boxes.shape)}")
        B, Q, num_classes = logits.shape
        xp = get_array_module(logits)
        sizes = xp.asarray(target_sizes)
        if sizes.shape != (B, 2):
            raise ValueError(f"PostProcess: target_sizes must be (B, 2) = ({B}, 2) rows "
                             f"(height, width), got shape {tuple(sizes.shape)}")

        with no_grad():
            prob = F.sigmoid(Tensor(logits)).data                     # (B, Q, num_classes)
        k = min(self.num_select, Q * num_classes)
        flat = prob.reshape(B, Q * num_classes)                       # (B, Q*num_classes)
        top = xp.argsort(-flat, axis=1)[:, :k]                        # (B, k), best first
        scores = xp.take_along_axis(flat, top, axis=1)                # (B, k)
        query = top // num_classes                                    # (B, k)
        labels = top % num_classes                                    # (B, k)

        xyxy = box_cxcywh_to_xyxy(boxes)                              # (B, Q, 4), normalised
        xyxy = xp.take_along_axis(xyxy, query[:, :, None], axis=1)    # (B, k, 4)
        img_h, img_w = sizes[:, 0], sizes[:, 1]                       # (B,), (B,)
        scale = xp.stack([img_w, img_h, img_w, img_h], axis=1).astype(xyxy.dtype)   # (B, 4)
        xyxy = xyxy * scale[:, None, :]                               # (B, k, 4) pixels

        results = []
        for s, lab, box in zip(scores, labels, xyxy):
            if self.threshold is not None:
                keep = s > self.threshold
                s, lab, box = s[keep], lab[keep], box[keep]
            results.append({"scores": s, "labels": lab.astype("int64"), "boxes": box})
        return results
