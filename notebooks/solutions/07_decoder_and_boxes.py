"""Solutions to the exercises of notebook 07, the decoder and box prediction.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import math

import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.models import build_model, get_config, sigmoid_focal_loss
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.nn import MSDeformAttn


def model_and_batch(seed=0):
    model = build_model(get_config("tiny", seed=seed)).eval()
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(1, 3, 64, 64)).astype(np.float32)
    mask = np.zeros((1, 64, 64), bool)
    return model, images, mask


def set_first_size_bias(model, value):
    model.bbox_embed[0].layers[-1].bias.data[2:] = value


def exercise_1():
    """The paper's initial box is b0 = (p_x, p_y, 0.1, 0.1); the code starts the first
    layer's boxes at (p_x, p_y, sigmoid(-2)) = (p_x, p_y, 0.119, 0.119). Predict the size
    bias that reproduces the paper exactly: logit(0.1) = -2.197. Set it and check."""
    model, images, mask = model_and_batch()
    with no_grad():
        boxes = model(images, mask)["aux_outputs"][0]["pred_boxes"].data    # layer 0, (1, Nq, 4)
    assert np.allclose(boxes[..., 2:], 1 / (1 + math.e ** 2), atol=1e-6)
    bias = math.log(0.1 / 0.9)
    assert abs(bias - (-2.197)) < 1e-3
    set_first_size_bias(model, bias)
    with no_grad():
        out = model(images, mask)
        reference = F.sigmoid(model.transformer.reference_points(
            F.split(model.query_embed.weight, [model.transformer.d_model] * 2, axis=1)[0])).data
    b0 = out["aux_outputs"][0]["pred_boxes"].data[0]
    np.testing.assert_allclose(b0[:, :2], reference, atol=1e-6)
    np.testing.assert_allclose(b0[:, 2:], 0.1, atol=1e-6)


def exercise_2():
    """Break the residual: predict boxes as sigmoid(delta), without adding the reference's
    logit. At initialisation delta = (0, 0, -2, -2), so every query's box sits at the
    image centre (0.5, 0.5): the check "initial box centres = reference points" fails, and
    all queries start from the same box."""
    model, images, mask = model_and_batch()
    with no_grad():
        out = model.transformer(*model.project_features(images, mask),
                                model.query_embed.weight)
        delta = model.bbox_embed[0](out.hs[0])                              # (N, Nq, 4)
        right = box_from_reference(delta, out.init_reference).data
        wrong = F.sigmoid(delta).data
    np.testing.assert_allclose(right[..., :2], out.init_reference.data, atol=1e-6)
    np.testing.assert_allclose(wrong[..., :2], 0.5, atol=1e-6)
    assert np.abs(wrong[..., :2] - out.init_reference.data).max() > 0.05


def exercise_3():
    """Predict the focal loss of 300 unmatched queries x 91 classes at initialisation, per
    ground-truth box, with the prior bias -log(99) (p = 0.01) and with bias 0 (p = 0.5):
    alpha_t (1 - p_t)^2 BCE is 0.75 * 1e-4 * 0.01 per element with the prior and
    0.75 * 0.25 * 0.69 without: 0.021 against 3 548 in total, about 170 000 times more.
    Without the prior the first gradient steps would be spent pushing 27 300 negatives
    down instead of learning the few positives."""
    Q, classes = 300, 91
    negatives = np.zeros((1, Q, classes), np.float32)
    prior = -math.log(0.99 / 0.01)
    loss = {b: sigmoid_focal_loss(Tensor(np.full((1, Q, classes), b, np.float32)), negatives,
                                  num_boxes=1).item() for b in (prior, 0.0)}
    per_element = {b: 0.75 * (1 / (1 + math.exp(-b))) ** 2 * math.log1p(math.exp(b))
                   for b in (prior, 0.0)}
    for b in loss:
        assert abs(loss[b] - Q * classes * per_element[b]) / loss[b] < 1e-4
    print(f"initial negative focal loss: {loss[prior]:.3f} with the prior, {loss[0.0]:.1f} "
          f"without")
    assert 150_000 < loss[0.0] / loss[prior] < 200_000


def exercise_4():
    """Predict where a query's initial cross-attention points land around a reference *box*
    (what refinement and two-stage pass to the decoder): offsets are fractions of the box,
    Delta p / K * (w, h) / 2, so along head 0's direction (1, 0) the points sit at
    cx + (k + 1) / K * w / 2 and the last one is on the box's right edge, on every level."""
    M, L, K, C = 8, 2, 4, 32
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=K,
                         rng=np.random.default_rng(0))
    box = np.array([0.4, 0.5, 0.3, 0.2], np.float32)                       # cx, cy, w, h
    ref = np.broadcast_to(box, (1, 1, L, 4)).copy()                         # (N, Lq, L, 4)
    z = np.random.default_rng(1).normal(size=(1, 1, C)).astype(np.float32)
    with no_grad():
        loc, _ = layer.sampling_locations_and_weights(Tensor(z), Tensor(ref), [[8, 8], [4, 4]])
    head0 = loc.data[0, 0, 0]                                               # (L, K, 2)
    expected_x = box[0] + (np.arange(1, K + 1) / K) * box[2] / 2
    for level in range(L):
        np.testing.assert_allclose(head0[level, :, 0], expected_x, atol=1e-6)
        np.testing.assert_allclose(head0[level, :, 1], box[1], atol=1e-6)
    assert abs(head0[0, -1, 0] - (box[0] + box[2] / 2)) < 1e-6            # the right edge
    # a 2-d reference instead: pixels of each level, so the reach halves with the level size
    with no_grad():
        loc2, _ = layer.sampling_locations_and_weights(Tensor(z), Tensor(ref[..., :2].copy()),
                                                       [[8, 8], [4, 4]])
    reach = loc2.data[0, 0, 0, :, -1, 0] - box[0]
    np.testing.assert_allclose(reach, [K / 8, K / 4], atol=1e-6)
