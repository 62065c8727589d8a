"""COCO box mAP: detections in, the six standard numbers out (pycocotools' ``COCOeval``).

The evaluator is the official COCO one, so the numbers are comparable with published
results. What it needs from us is a list of detections in COCO's result format::

    {"image_id": 42, "category_id": 3, "bbox": [x, y, w, h], "score": 0.91}

with boxes in pixels of the *original* image and ``category_id`` a dataset category id,
not a class label: the :class:`~minidetr.data.CategoryMap` maps labels back.

The six numbers (all averaged over categories; "AP" is the mean over IoU thresholds
0.50:0.05:0.95, the COCO primary metric):

=======  ==================================================================
AP       IoU 0.50:0.95, all object sizes, up to 100 detections per image
AP50     IoU 0.50
AP75     IoU 0.75
APs      small objects (area < 32^2 pixels)
APm      medium objects (32^2 <= area < 96^2)
APl      large objects (area >= 96^2)
=======  ==================================================================

As in COCO, a size range with no ground-truth object in the evaluated images gives -1
(e.g. APl on the 128 x 128 shapes images, whose objects are all smaller than 96^2).
"""
from __future__ import annotations

import contextlib
import copy
import io

from ..backend import to_numpy
from ..files import write_json
from ..inference import coco_results, xyxy_to_xywh

METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")

# What a printed -1 means (COCOeval's convention), for the tables the commands print.
MINUS_ONE_NOTE = ("-1: no ground-truth object of that size in the evaluated images (e.g. APl "
                  "on small images: large means an area of at least 96^2 pixels)")


def write_coco_results(path, results) -> str:
    """Write a list of COCO results dicts as JSON (atomically): the file that
    ``pycocotools.coco.COCO.loadRes`` reads and the COCO evaluation server takes."""
    write_json(path, list(results))
    return str(path)


class CocoEvaluator:
    """Collects detections image by image, then runs ``COCOeval`` on them.

    Args:
        coco_gt: the ground truth, a ``pycocotools.coco.COCO`` (``CocoDetection.coco``).
        category_map: turns predicted labels into category ids.

    Use::

        evaluator = CocoEvaluator(dataset.coco, dataset.category_map)
        evaluator.update(image_ids, postprocess(outputs, orig_sizes))   # per batch
        metrics = evaluator.summarize()                                # {"AP": ..., ...}

    Only the images passed to :meth:`update` are evaluated (as the official code does),
    so evaluating the first few validation images gives their AP, not a diluted one.
    """

    def __init__(self, coco_gt, category_map):
        self.coco_gt = coco_gt
        self.category_map = category_map
        self.image_ids = []
        self.results = []          # COCO result dicts
        self.summary_text = ""     # COCOeval's printed table, after summarize()

    def update(self, image_ids, detections):
        """Add one batch: image ids and PostProcess dicts (scores, labels, boxes xyxy)."""
        if len(image_ids) != len(detections):
            raise ValueError(f"CocoEvaluator.update: {len(image_ids)} image ids for "
                             f"{len(detections)} detection dicts")
        for image_id, det in zip(image_ids, detections):
            image_id = int(image_id)
            if image_id not in self.coco_gt.imgs:
                raise ValueError(f"CocoEvaluator.update: image id {image_id} is not in the "
                                 "ground truth")
            self.image_ids.append(image_id)
            self.results.extend(coco_results(image_id, to_numpy(det["scores"]),
                                             to_numpy(det["labels"]), to_numpy(det["boxes"]),
                                             self.category_map))

    def summarize(self, verbose: bool = False) -> dict:
        """Run COCOeval on everything added; return {"AP", "AP50", ..., "APl"} as floats.

        With no detection at all every metric is 0 (COCOeval itself cannot load an empty
        result list). ``verbose`` prints COCOeval's table; it is kept in ``summary_text``.
        """
        from pycocotools.cocoeval import COCOeval

        if not self.image_ids:
            raise ValueError("CocoEvaluator.summarize: no image was added with update()")
        if not self.results:
            self.summary_text = "no detections: every metric is 0"
            if verbose:
                print(self.summary_text)
            return {name: 0.0 for name in METRIC_NAMES}
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):           # pycocotools prints a lot
            coco_dt = self.coco_gt.loadRes(copy.deepcopy(self.results))
            coco_eval = COCOeval(self.coco_gt, coco_dt, iouType="bbox")
            coco_eval.params.imgIds = sorted(set(self.image_ids))
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        text = buffer.getvalue()
        self.summary_text = text[text.find(" Average Precision"):] if "Average" in text else text
        if verbose:
            print(self.summary_text)
        return {name: float(v) for name, v in zip(METRIC_NAMES, coco_eval.stats[:6])}


__all__ = ["CocoEvaluator", "METRIC_NAMES", "MINUS_ONE_NOTE", "xyxy_to_xywh",
           "write_coco_results"]
