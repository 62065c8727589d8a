"""The check of converted official checkpoints against the published reference outputs."""
import numpy as np
import pytest
from PIL import Image

from minidetr.weights.reference_outputs import REFERENCE_OUTPUTS, TOLERANCE, compare, preprocess


def _outputs(variant, q=5, classes=91):
    logits, boxes = (np.asarray(a, dtype=np.float32) for a in REFERENCE_OUTPUTS[variant])
    out_logits = np.zeros((1, q, classes), np.float32)
    out_boxes = np.full((1, q, 4), 0.5, np.float32)
    out_logits[0, :3, :3] = logits
    out_boxes[0, :3, :3] = boxes
    return {"pred_logits": out_logits, "pred_boxes": out_boxes}


@pytest.mark.parametrize("variant", sorted(REFERENCE_OUTPUTS))
def test_compare_accepts_the_reference_values(variant):
    ok, lines = compare(_outputs(variant), variant)
    assert ok, "\n".join(lines)
    assert len(lines) == 18 and all(line.endswith("ok") for line in lines)


def test_compare_names_the_element_that_differs():
    outputs = _outputs("refine")
    outputs["pred_boxes"][0, 2, 1] += 3 * TOLERANCE
    ok, lines = compare(outputs, "refine")
    assert not ok
    bad = [line for line in lines if "MISMATCH" in line]
    assert len(bad) == 1 and bad[0].startswith("pred_boxes[0, 2, 1]"), bad


def test_compare_rejects_unknown_variant():
    with pytest.raises(ValueError, match="unknown variant"):
        compare(_outputs("plain"), "deformable")


def test_preprocess_matches_the_reference_resolution():
    # the reference image is 640x480: the official rule gives 1066x800, no padding
    image = Image.fromarray(np.full((480, 640, 3), 128, np.uint8))
    images, mask = preprocess(image)
    assert images.shape == (1, 3, 800, 1066) and images.dtype == np.float32
    assert mask.shape == (1, 800, 1066) and not mask.any()
    # a mid-grey pixel normalised with the ImageNet statistics
    expected = (128 / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(images[0, :, 400, 500], expected, rtol=1e-5)
