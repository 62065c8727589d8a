"""Check a converted official checkpoint against the published reference outputs.

The official Deformable DETR release comes with three R50 checkpoints (plain, iterative
box refinement, refinement + two-stage). HuggingFace's converter tested them on COCO
val2017 image 000000039769 (two cats on a couch, 640x480) with this preprocessing:
shorter side resized to 800 (longer side at most 1333, bilinear), pixels scaled to [0, 1]
and normalised with the ImageNet mean and standard deviation. It recorded the first three
logits and the first three box coordinates of the first three queries (below, from
``shared/reference/deformable-detr-facts.md`` §8), with a tolerance of 1e-4.

A user who has a released checkpoint runs::

    python -m minidetr convert-checkpoint r50_deformable_detr-checkpoint.pth plain.npz --variant plain
    python -m minidetr check-reference plain.npz 000000039769.jpg

and sees every value side by side with the reference. minidetr's ``paper`` model, fed
the converted weights, must reproduce them: same keys, same initial reference points,
same sampling convention, same heads.

Shapes:
    logits  (3, 3)   pred_logits[0, :3, :3]
    boxes   (3, 3)   pred_boxes[0, :3, :3]  (cx, cy, w of the first three queries)
"""
from __future__ import annotations

import numpy as np

REFERENCE_IMAGE = "000000039769.jpg"  # COCO val2017; http://images.cocodataset.org/val2017/
TOLERANCE = 1e-4

# variant -> (logits[0, :3, :3], boxes[0, :3, :3])
REFERENCE_OUTPUTS = {
    "plain": (
        [[-9.6645, -4.3449, -5.8705], [-9.7035, -3.8504, -5.0724], [-10.5634, -5.3379, -7.5116]],
        [[0.8693, 0.2289, 0.2492], [0.3150, 0.5489, 0.5845], [0.5563, 0.7580, 0.8518]],
    ),
    "refine": (
        [[-8.8895, -5.4187, -6.8153], [-8.4706, -6.1668, -7.6184], [-9.0042, -5.5359, -6.9141]],
        [[0.7828, 0.2208, 0.4323], [0.0892, 0.5996, 0.1319], [0.5524, 0.6389, 0.8914]],
    ),
    "two-stage": (
        [[-6.7108, -4.3213, -6.3777], [-8.9014, -6.1799, -6.7240], [-6.9315, -4.4735, -6.2298]],
        [[0.2583, 0.5499, 0.4683], [0.7652, 0.9068, 0.4882], [0.5490, 0.2763, 0.0564]],
    ),
}


def preprocess(image):
    """The reference preprocessing: (1, 3, H, W) float32 images and a (1, H, W) mask.

    ``image`` is a PIL image (any mode; converted to RGB). The resize follows the official
    rule (shorter side 800, longer side at most 1333, bilinear), as HuggingFace's
    processor does; 640x480 becomes 1066x800.
    """
    from ..data import collate, make_transforms
    from ..data.coco import to_rgb8

    image = to_rgb8(image)
    size = np.array([image.height, image.width], dtype=np.int64)
    target = {"boxes": np.zeros((0, 4), np.float32), "labels": np.zeros(0, np.int64),
              "orig_size": size, "size": size}
    batch = collate([make_transforms("val", "paper")(image, target)])
    return batch.images, batch.mask                           # (1, 3, H, W), (1, H, W)


def compare(outputs, variant):
    """Compare model outputs with the reference of ``variant``.

    Args:
        outputs: the model's output dict (``pred_logits`` (1, Q, 91), ``pred_boxes`` (1, Q, 4)).
        variant: "plain", "refine" or "two-stage".

    Returns:
        ``(ok, lines)``: whether every value is within :data:`TOLERANCE`, and a printable
        table naming each element, its value, the reference and the difference.
    """
    if variant not in REFERENCE_OUTPUTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(REFERENCE_OUTPUTS)}")
    from ..autograd import Tensor
    from ..backend import to_numpy

    ok = True
    lines = []
    for key, reference in zip(("pred_logits", "pred_boxes"), REFERENCE_OUTPUTS[variant]):
        value = outputs[key]
        if isinstance(value, Tensor):         # not getattr(value, "data"): a CuPy array's
            value = value.data                # .data is its device pointer
        got = to_numpy(value)[0, :3, :3]                                          # (3, 3)
        reference = np.asarray(reference)
        for (q, c), ref in np.ndenumerate(reference):
            diff = abs(float(got[q, c]) - ref)
            good = diff <= TOLERANCE
            ok &= good
            lines.append(f"{key}[0, {q}, {c}] = {got[q, c]: .5f}   reference {ref: .4f}   "
                         f"|diff| {diff:.1e}  {'ok' if good else 'MISMATCH'}")
    return bool(ok), lines


def check_reference_outputs(model, image, variant, device="cpu"):
    """Run ``model`` (eval mode) on the reference image; return :func:`compare`'s result."""
    from ..autograd import no_grad
    from ..backend import to_device

    images, mask = preprocess(image)
    model.eval()
    with no_grad():
        outputs = model(to_device(images, device), to_device(mask, device))
    return compare(outputs, variant)
