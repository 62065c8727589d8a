"""PostProcess: top-k over (query, class) pairs, label/query decoding, absolute xyxy boxes."""
from __future__ import annotations

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.models.postprocess import PostProcess
from minidetr.testing import assert_allclose


def sigmoid(x):
    return 1 / (1 + np.exp(-np.asarray(x, dtype=np.float64)))


def hand_made(xp):
    # flat index = query * 3 + class:  q0 -> 0, 1, 2;  q1 -> 3, 4, 5
    logits = np.array([[2.0, -1.0, 0.5],        # q0
                       [1.0, 3.0, -2.0]])       # q1
    # by decreasing logit: (q1, c1) 3.0, (q0, c0) 2.0, (q1, c0) 1.0, (q0, c2) 0.5, ...
    boxes = np.array([[0.5, 0.5, 0.2, 0.4],     # q0 -> xyxy (0.4, 0.3, 0.6, 0.7)
                      [0.25, 0.75, 0.5, 0.5]])  # q1 -> xyxy (0.0, 0.5, 0.5, 1.0)
    outputs = {"pred_logits": Tensor(xp.asarray(np.stack([logits, logits]), dtype=xp.float32)),
               "pred_boxes": Tensor(xp.asarray(np.stack([boxes, boxes]), dtype=xp.float32))}
    sizes = xp.asarray([[100, 200], [50, 10]])  # rows (height, width)
    return outputs, sizes


def test_top_k_order_decoding_and_scaling(xp):
    outputs, sizes = hand_made(xp)
    results = PostProcess(num_select=4)(outputs, sizes)
    assert len(results) == 2
    r0, r1 = results
    assert_allclose(r0["scores"], sigmoid([3.0, 2.0, 1.0, 0.5]), rtol=1e-6, what="scores")
    np.testing.assert_array_equal(to_numpy(r0["labels"]), [1, 0, 0, 2])
    assert r0["labels"].dtype == np.int64 and r0["boxes"].dtype == np.float32
    q0, q1 = [80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]     # x by 200, y by 100
    assert_allclose(r0["boxes"], np.array([q1, q0, q1, q0]), rtol=1e-6, atol=1e-4,
                    what="image 0 boxes")
    # same predictions, other image size (h 50, w 10): each row uses its own size
    q0, q1 = [4.0, 15.0, 6.0, 35.0], [0.0, 25.0, 5.0, 50.0]
    assert_allclose(r1["boxes"], np.array([q1, q0, q1, q0]), rtol=1e-6, atol=1e-5,
                    what="image 1 boxes")


def test_default_keeps_min_of_100_and_all_pairs_and_threshold(xp):
    outputs, sizes = hand_made(xp)
    r = PostProcess()(outputs, sizes)[0]
    assert r["scores"].shape == (6,) and r["boxes"].shape == (6, 4)
    assert (np.diff(to_numpy(r["scores"])) <= 0).all(), "scores must be sorted, best first"
    kept = PostProcess(threshold=0.8)(outputs, sizes)[0]             # sigmoid(2) = 0.88 > 0.8
    np.testing.assert_array_equal(to_numpy(kept["labels"]), [1, 0])


def test_bad_target_sizes():
    outputs, _ = hand_made(np)
    with pytest.raises(ValueError, match=r"target_sizes must be \(B, 2\)"):
        PostProcess()(outputs, np.array([100, 200]))
