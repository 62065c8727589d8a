"""Solutions to the exercises of notebook 05, the backbone and the multi-scale input.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import math

import numpy as np

from minidetr.autograd import no_grad
from minidetr.models import build_model, get_config
from minidetr.models.backbone import interpolate_mask
from minidetr.models.deformable_transformer import get_valid_ratio
from minidetr.models.position_encoding import sine_position_embedding


def level_shapes(H, W, strides=(8, 16, 32)):
    """(H_l, W_l) of C3-C5 (ceil(H / s)) and of the extra stride-2 level on C5."""
    shapes = [(math.ceil(H / s), math.ceil(W / s)) for s in strides]
    shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
    return shapes


def exercise_1():
    """Predict the levels and S of the paper's inputs: an 800x1066 image (a 640x480 COCO
    picture resized) gives S = 17 821; an 800x1200 batch gives S = 19 947, the shape of
    minidetr's benchmarks (minidetr.bench.common.PAPER_LEVELS). Then check the rule on the
    tiny model's real backbone with an odd-sized image."""
    s1066 = level_shapes(800, 1066)
    s1200 = level_shapes(800, 1200)
    assert s1066 == [(100, 134), (50, 67), (25, 34), (13, 17)]
    assert sum(h * w for h, w in s1066) == 17_821
    assert sum(h * w for h, w in s1200) == 19_947
    from minidetr.bench.common import PAPER_LEVELS
    assert [tuple(s) for s in PAPER_LEVELS] == s1200

    model = build_model(get_config("tiny", num_feature_levels=4, seed=0)).eval()
    images = np.zeros((1, 3, 70, 90), np.float32)
    mask = np.zeros((1, 70, 90), bool)
    with no_grad():
        srcs, _, _ = model.project_features(images, mask)
    assert [tuple(s.shape[2:]) for s in srcs] == level_shapes(70, 90)


def exercise_2():
    """Predict the valid ratios of a 100 x 60 (h x w) image padded to 128 x 128: not
    100/128 = 0.781 but 13/16 = 0.8125 on the stride-8 level, because the level mask is the
    image mask resized with the "nearest" rule (row i reads image row floor(8 i))."""
    mask = np.ones((1, 128, 128), bool)
    mask[0, :100, :60] = False
    expected = {}
    for size in (16, 8, 4, 2):
        rows = sum(1 for i in range(size) if math.floor(i * 128 / size) < 100)
        cols = sum(1 for j in range(size) if math.floor(j * 128 / size) < 60)
        expected[size] = (cols / size, rows / size)
        got = get_valid_ratio(interpolate_mask(mask, (size, size)))[0]
        np.testing.assert_allclose(got, expected[size], rtol=1e-6)
    assert expected[16] == (8 / 16, 13 / 16) and expected[16][1] != 100 / 128


def exercise_3():
    """Each image's embedding is normalised to its own valid extent: a pixel centre at the
    same *fraction* of two images gets the same embedding, wherever it sits on the padded
    canvas. With extents 16 and 48, pixel i of the small image and pixel 3 i + 1 of the
    large one are both at (i + 1/2) / 16 of their image."""
    mask = np.ones((2, 48, 72), bool)
    mask[0, :16, :24] = False                    # a small image
    mask[1, :, :] = False                        # one that fills the canvas
    pos = sine_position_embedding(mask, num_pos_feats=16, dtype=np.float64)  # (2, 32, 48, 72)
    for i, j in ((0, 0), (5, 7), (15, 23)):
        np.testing.assert_allclose(pos[0, :, i, j], pos[1, :, 3 * i + 1, 3 * j + 1], atol=1e-5)
    assert np.abs(pos[0, :, 15, 23] - pos[1, :, 15, 23]).max() > 0.1   # same canvas pixel


def exercise_4():
    """Predict what going from L = 1 to L = 4 levels adds to one encoder layer: only the rows
    of the offset and weight projections, 3 M K (L - 1)(C + 1) parameters. The value and
    output projections, the norms and the FFN are shared by all levels: there is no
    per-level encoder (and no FPN; the encoder's cross-level sampling does that job)."""
    sizes = {}
    for L in (1, 4):
        cfg = get_config("tiny", num_feature_levels=L, seed=0)
        model = build_model(cfg)
        layer = model.transformer.encoder.layers[0]
        sizes[L] = sum(p.data.size for _, p in layer.named_parameters())
        shared = sum(p.data.size for name, p in layer.named_parameters()
                     if not name.startswith(("self_attn.sampling_offsets",
                                             "self_attn.attention_weights")))
        sizes[L, "shared"] = shared
    C, M, K = cfg.d_model, cfg.nheads, cfg.n_points
    assert sizes[4] - sizes[1] == 3 * M * K * 3 * (C + 1)
    assert sizes[1, "shared"] == sizes[4, "shared"]
