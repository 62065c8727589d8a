"""Solutions to the exercises of notebook 09, two-stage Deformable DETR.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.models import box_cxcywh_to_xyxy, box_iou, build_model, get_config
from minidetr.models import sigmoid_focal_loss
from minidetr.models.deformable_transformer import encoder_output_proposals


def level_shapes(H, W, L=4):
    shapes = [(-(-H // s), -(-W // s)) for s in (8, 16, 32)]
    while len(shapes) < L:
        shapes.append((-(-shapes[-1][0] // 2), -(-shapes[-1][1] // 2)))
    return np.array(shapes[:L])


def exercise_1():
    """Predict how many proposals of one unpadded 800 x 1066 image (the paper's four
    levels) are invalid: a coordinate must lie strictly inside (0.01, 0.99), so the
    outermost ring of tokens is invalid wherever 0.5 / v <= 0.01, i.e. on levels 0
    (100 x 134) and 1 (50 x 67; 0.5 / 50 is exactly 0.01): 464 + 230 = 694 tokens. The sizes
    0.05 ... 0.4 are all valid."""
    shapes = level_shapes(800, 1066)
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    _, valid = encoder_output_proposals(np.zeros((1, S), bool), shapes)
    per_level = np.split(valid[0], np.cumsum(shapes[:, 0] * shapes[:, 1])[:-1])
    invalid = [int((~v).sum()) for v in per_level]
    predicted = [100 * 134 - 98 * 132, 50 * 67 - 48 * 65, 0, 0]
    assert invalid == predicted, (invalid, predicted)
    assert sum(invalid) == 694


def two_stage_model(seed=0):
    model = build_model(get_config("tiny", "two-stage", dropout=0.0, seed=seed)).eval()
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(1, 3, 96, 96)).astype(np.float32)
    return model, images, np.zeros((1, 96, 96), bool)


def exercise_2():
    """The paper's first stage is a binary foreground classifier; the code reuses a full
    class head and ranks by channel 0. Show that channel 0 *is* the binary head: (a) the
    selected proposals do not depend on the other channels at all; (b) with every target
    relabelled 0, the focal loss only ever pushes channels 1, 2, ... down (their gradient
    is >= 0 everywhere)."""
    model, images, mask = two_stage_model()
    head = model.class_embed[-1]                           # the proposal head (index L_dec)
    for p in model.bbox_embed[-1].parameters():             # give the box head some life
        p.data[...] = np.random.default_rng(3).normal(0, 0.1, p.data.shape)
    with no_grad():
        before = model.transformer(*model.project_features(images, mask)).init_reference.data
    rng = np.random.default_rng(1)
    head.weight.data[1:] = rng.normal(0, 5, head.weight.data[1:].shape)
    head.bias.data[1:] = rng.normal(0, 5, head.bias.data[1:].shape)
    with no_grad():
        after = model.transformer(*model.project_features(images, mask)).init_reference.data
    np.testing.assert_array_equal(after, before)

    logits = Tensor(rng.normal(0, 2, (1, 50, 5)).astype(np.float32), requires_grad=True)
    targets = np.zeros((1, 50, 5), np.float32)
    targets[0, :7, 0] = 1                                   # 7 tokens matched, all "class 0"
    sigmoid_focal_loss(logits, targets, num_boxes=7).backward()
    assert (logits.grad[..., 1:] >= 0).all(), "channels 1.. only ever see negatives"
    assert (logits.grad[0, :7, 0] < 0).all(), "channel 0 is pulled up on the matched tokens"


def exercise_3():
    """Predict the largest IoU between two untrained proposals, before deciding whether
    NMS before the second stage would change anything at initialisation. Neighbours on a
    level overlap by (s - d) / (s + d) with d = 1 / W_l (0.23 here); a level-l box inside
    a level-(l+1) box gives (1/2)^2 = 0.25, the maximum. So NMS at 0.5 would remove
    nothing at first; the paper applies none at all, and leaves duplicates to the
    decoder's self-attention and the one-to-one set loss."""
    shapes = level_shapes(256, 256, L=3)                      # 32x32, 16x16, 8x8
    S = int((shapes[:, 0] * shapes[:, 1]).sum())
    logits, valid = encoder_output_proposals(np.zeros((1, S), bool), shapes)
    boxes = 1 / (1 + np.exp(-logits[0, valid[0]]))                          # (V, 4)
    iou, _ = box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(boxes))  # (V, V), union
    iou = iou.astype(np.float64)
    np.fill_diagonal(iou, 0)
    s, d = 0.05, 1 / 32
    assert abs(iou[: 32 * 32, : 32 * 32].max() - (s - d) / (s + d)) < 1e-4
    assert abs(iou.max() - 0.25) < 1e-4 and iou.max() < 0.5

    def nms(b, scores, threshold):
        order, keep = list(np.argsort(-scores)), []
        while order:
            i = order.pop(0)
            keep.append(i)
            order = [j for j in order if iou_of(b[i], b[j]) <= threshold]
        return keep

    def iou_of(a, b):
        ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
        bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
        inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
        return inter / (a[2] * a[3] + b[2] * b[3] - inter)

    top = boxes[np.random.default_rng(0).permutation(len(boxes))[:40]]
    assert len(nms(top, np.arange(40.0), 0.5)) == 40


def exercise_4():
    """Predict the heads of the two-stage model: L_dec + 1 class heads and box heads, all
    distinct modules (refinement), and every size bias 0 (proposals bring their sizes)."""
    model, _, _ = two_stage_model()
    n = model.transformer.decoder.num_layers + 1
    assert len(model.class_embed) == len(model.bbox_embed) == n
    assert len({id(h) for h in model.bbox_embed}) == n
    for h in model.bbox_embed:
        assert np.all(h.layers[-1].bias.data[2:] == 0)
