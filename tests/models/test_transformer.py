"""Tests of minidetr/models/deformable_transformer.py: the geometry helpers (valid ratios,
encoder reference points, two-stage proposals and their position embedding, boxes
relative to references) against hand-computed values, the flattening of the levels, and
the order of the operations inside an encoder and a decoder layer.

Whole-model behaviour (shapes, refinement, gradients, state dicts) is in
tests/models/test_detr_model.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from minidetr import functional as F
from minidetr import nn
from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.models.deformable_transformer import (DeformableTransformer,
                                                    DeformableTransformerDecoderLayer,
                                                    DeformableTransformerEncoderLayer,
                                                    box_from_reference, encoder_output_proposals,
                                                    get_proposal_pos_embed, get_reference_points,
                                                    get_valid_ratio)
from minidetr.testing import assert_allclose

INF = np.inf


def logit(p):
    return math.log(p / (1 - p))


# --------------------------------------------------------------------------- valid ratios
def test_valid_ratio_counts_unpadded_rows_and_columns(xp):
    """(valid_W / W, valid_H / H) per image, from column 0 and row 0 of the mask."""
    mask = np.zeros((2, 4, 6), dtype=bool)
    mask[1, 3:, :] = True                     # image 1: 3 valid rows ...
    mask[1, :, 4:] = True                     # ... and 4 valid columns
    ratios = get_valid_ratio(xp.asarray(mask))
    assert ratios.dtype == np.float32
    assert_allclose(to_numpy(ratios), [[1.0, 1.0], [4 / 6, 3 / 4]], rtol=0, atol=1e-7,
                    what="valid ratios (w, h)")
    assert get_valid_ratio(xp.asarray(mask), np.float64).dtype == np.float64


# --------------------------------------------------------------------------- reference points
def test_encoder_reference_points_hand_computed(xp):
    """Two levels, (2, 3) and (1, 2), of one padded image.

    Level ratios (w, h): level 0 (2/3, 1/2), level 1 (1/2, 1). Token (i, j) of level l sits
    at ((j + .5) / (r_w W_l), (i + .5) / (r_h H_l)), then is scaled by each level's ratios.
    """
    shapes = np.array([[2, 3], [1, 2]])
    ratios = xp.asarray(np.array([[[2 / 3, 1 / 2], [1 / 2, 1.0]]], dtype=np.float32))
    ref = to_numpy(get_reference_points(shapes, ratios))
    assert ref.shape == (1, 2 * 3 + 1 * 2, 2, 2)
    # token (0, 0) of level 0: (0.25, 0.5) in valid coords -> (1/6, 1/4) on level 0,
    # (1/8, 1/2) on level 1
    assert_allclose(ref[0, 0], [[1 / 6, 1 / 4], [1 / 8, 1 / 2]], atol=1e-7, what="token (0,0) l0")
    # token (1, 2) of level 0 (a padded token): (1.25, 1.5) -> (5/6, 3/4) and (5/8, 3/2)
    assert_allclose(ref[0, 5], [[5 / 6, 3 / 4], [5 / 8, 3 / 2]], atol=1e-6, what="token (1,2) l0")
    # token (0, 0) of level 1: (0.5, 0.5) -> (1/3, 1/4) and (1/4, 1/2)
    assert_allclose(ref[0, 6], [[1 / 3, 1 / 4], [1 / 4, 1 / 2]], atol=1e-7, what="token (0,0) l1")

    # every token, by a direct loop over the formula
    r = to_numpy(ratios)
    expected, row = np.zeros((1, 8, 2, 2)), 0
    for lvl, (H, W) in enumerate(shapes):
        for i in range(H):
            for j in range(W):
                x = (j + 0.5) / (r[0, lvl, 0] * W)
                y = (i + 0.5) / (r[0, lvl, 1] * H)
                expected[0, row] = [[x * r[0, m, 0], y * r[0, m, 1]] for m in range(2)]
                row += 1
    assert_allclose(ref, expected, rtol=1e-6, atol=1e-7, what="reference points")


def test_reference_points_without_padding_are_pixel_centres():
    """An unpadded level: the points are ((j + .5) / W, (i + .5) / H) on every level."""
    ref = get_reference_points([[2, 4]], np.ones((3, 1, 2), np.float32))
    xs, ys = ref[0, :, 0, 0], ref[0, :, 0, 1]
    assert_allclose(xs, np.tile([0.125, 0.375, 0.625, 0.875], 2), atol=0, what="x")
    assert_allclose(ys, np.repeat([0.25, 0.75], 4), atol=0, what="y")


# --------------------------------------------------------------------------- two-stage proposals
def test_encoder_proposals_on_padded_maps(xp):
    """Levels (3, 4) and (2, 2); image 1 is valid on 2 x 2 tokens of level 0, 1 x 1 of level 1."""
    shapes = np.array([[3, 4], [2, 2]])
    level0 = np.zeros((2, 3, 4), bool)
    level0[1, 2:, :] = True
    level0[1, :, 2:] = True
    level1 = np.zeros((2, 2, 2), bool)
    level1[1, 1:, :] = True
    level1[1, :, 1:] = True
    mask = np.concatenate([level0.reshape(2, 12), level1.reshape(2, 4)], axis=1)   # (2, 16)
    logits, valid = encoder_output_proposals(xp.asarray(mask), shapes)
    logits, valid = to_numpy(logits), to_numpy(valid)
    assert logits.shape == (2, 16, 4) and logits.dtype == np.float32 and valid.shape == (2, 16)

    # image 0, level 0, token (0, 0): centre (0.5/4, 0.5/3), size 0.05
    assert_allclose(logits[0, 0], [logit(0.125), logit(1 / 6), logit(0.05), logit(0.05)],
                    atol=1e-5, what="image 0 level 0 token (0,0)")
    # image 0, level 1, token (1, 1): centre (0.75, 0.75), size 0.1
    assert_allclose(logits[0, 12 + 3], [logit(0.75), logit(0.75), logit(0.1), logit(0.1)],
                    atol=1e-5, what="image 0 level 1 token (1,1)")
    # image 1: centres normalised by the *valid* extent
    assert_allclose(logits[1, 0], [logit(0.25), logit(0.25), logit(0.05), logit(0.05)],
                    atol=1e-5, what="image 1 level 0 token (0,0)")
    assert_allclose(logits[1, 12], [0.0, 0.0, logit(0.1), logit(0.1)], atol=1e-5,
                    what="image 1 level 1 token (0,0)")
    # padded tokens are invalid: +inf in all four coordinates
    assert (valid[0]).all()
    assert valid[1].tolist() == (~mask[1]).tolist()
    assert np.isposinf(logits[1][mask[1]]).all()
    assert np.isfinite(logits[~mask]).all()


def test_encoder_proposals_validity_interval():
    """Valid iff all coordinates lie in (0.01, 0.99): edge centres of a wide map and the
    sizes 0.05 * 2**l >= 0.99 (level 5) are invalid."""
    _, valid = encoder_output_proposals(np.zeros((1, 60), bool), [[1, 60]])
    # centres (j + .5) / 60: j = 0 -> 0.0083 and j = 59 -> 0.9917 lie outside
    assert valid[0, [0, 59]].tolist() == [False, False]
    assert valid[0, 1:59].all()
    logits, valid = encoder_output_proposals(np.zeros((1, 6), bool), [[1, 1]] * 6)
    assert valid[0].tolist() == [True] * 5 + [False]     # sizes 0.05 ... 0.8, then 1.6
    assert_allclose(logits[0, 4], [0, 0, logit(0.8), logit(0.8)], atol=1e-5, what="level 4")
    assert np.isposinf(logits[0, 5]).all()


def test_gen_encoder_output_proposals_zeroes_memory_at_invalid_tokens():
    """Memory rows of padded tokens and of out-of-range proposals are zeroed before
    enc_output + enc_output_norm; the proposals there are +inf."""
    transformer = small_transformer(two_stage=True)
    rng = np.random.default_rng(3)
    shapes = np.array([[1, 60], [1, 2]])          # level 0: tokens 0 and 59 are out of range
    mask = np.zeros((2, 62), bool)
    mask[1, 30:60] = True                         # image 1: right half of level 0 padded
    mask[1, 61] = True                            # ... and the right token of level 1
    memory = Tensor(rng.normal(size=(2, 62, 16)).astype(np.float32))
    out, proposals = transformer.gen_encoder_output_proposals(memory, mask, shapes)
    _, valid = encoder_output_proposals(mask, shapes)
    assert valid[0].tolist() == [False] + [True] * 58 + [False, True, True]
    # image 1: valid width 30, so (0.5 / 30, 29.5 / 30) = (0.017, 0.983) are in range
    assert valid[1].tolist() == [True] * 30 + [False] * 30 + [True, False]
    head = lambda x: transformer.enc_output_norm(transformer.enc_output(Tensor(x))).data
    expected = np.where(valid[..., None], head(memory.data), head(np.zeros((1, 16), np.float32)))
    assert_allclose(out.data, expected, atol=1e-6, what="output memory")
    assert np.isposinf(proposals[~valid]).all() and np.isfinite(proposals[valid]).all()


# --------------------------------------------------------------------------- proposal embedding
def test_proposal_pos_embed_values(xp):
    """p = sigmoid(logit) * 2 pi; channel c*F + k is sin (k even) or cos (k odd) of
    p_c / 10000 ** (2 floor(k/2) / F)."""
    Fe = 8
    proposals = np.array([[[0.0, math.log(3), -math.log(3), INF]]], dtype=np.float32)
    pos = to_numpy(get_proposal_pos_embed(xp.asarray(proposals), num_pos_feats=Fe))
    assert pos.shape == (1, 1, 4 * Fe) and pos.dtype == np.float32
    # hand values at the highest frequency (dim_t = 1): p = pi, 3pi/2, pi/2, 2pi
    assert_allclose(pos[0, 0, [0, 1]], [0.0, -1.0], atol=1e-6, what="cx = 0.5")
    assert_allclose(pos[0, 0, [Fe, Fe + 1]], [-1.0, 0.0], atol=1e-6, what="cy = 0.75")
    assert_allclose(pos[0, 0, [2 * Fe, 2 * Fe + 1]], [1.0, 0.0], atol=1e-6, what="w = 0.25")
    assert_allclose(pos[0, 0, [3 * Fe, 3 * Fe + 1]], [0.0, 1.0], atol=1e-6, what="h = 1 (inf)")
    # all channels, by the formula
    p = np.array([0.5, 0.75, 0.25, 1.0]) * 2 * math.pi
    expected = [(math.sin if k % 2 == 0 else math.cos)(p[c] / 10000 ** (2 * (k // 2) / Fe))
                for c in range(4) for k in range(Fe)]
    assert_allclose(pos[0, 0], expected, atol=1e-6, what="proposal pos embed")


# --------------------------------------------------------------------------- boxes from references
def test_box_from_reference_2d_and_4d():
    delta = Tensor(np.array([[math.log(3), 0.0, 1.0, -1.0]], np.float32))
    box = box_from_reference(delta, Tensor(np.array([[0.25, 0.5]], np.float32)))
    sig = lambda x: 1 / (1 + math.exp(-x))
    # 2-d: the centre logits are offset by logit(ref), the size logits are delta's own
    assert_allclose(box.data, [[0.5, 0.5, sig(1.0), sig(-1.0)]], atol=1e-6, what="2-d ref")
    ref4 = np.array([[0.5, 0.3, 0.2, 0.8]], np.float32)
    box = box_from_reference(Tensor(np.zeros((1, 4), np.float32)), Tensor(ref4))
    assert_allclose(box.data, ref4, atol=1e-6, what="4-d ref, zero delta")
    # references at 0 / 1 are clamped by inverse_sigmoid's eps = 1e-5
    box = box_from_reference(Tensor(np.zeros((1, 4), np.float32)),
                             Tensor(np.array([[0.0, 1.0, 0.5, 0.5]], np.float32)))
    assert_allclose(box.data[0, :2], [1e-5, 1 - 1e-5], atol=1e-7, what="clamped ref")
    with pytest.raises(ValueError, match="end in 2"):
        box_from_reference(delta, Tensor(np.zeros((1, 3), np.float32)))


# --------------------------------------------------------------------------- layers
def small_transformer(two_stage=False, levels=2, seed=0):
    transformer = DeformableTransformer(d_model=16, nhead=2, num_encoder_layers=1,
                                        num_decoder_layers=2, dim_feedforward=32, dropout=0.0,
                                        num_feature_levels=levels, enc_n_points=2,
                                        dec_n_points=2, two_stage=two_stage,
                                        two_stage_num_proposals=3,
                                        rng=np.random.default_rng(seed))
    if two_stage:          # the detector's job: heads for the proposals (index num_layers)
        rng = np.random.default_rng(seed + 1)
        transformer.decoder.class_embed = nn.ModuleList(nn.Linear(16, 3, rng=rng)
                                                        for _ in range(3))
        transformer.decoder.bbox_embed = nn.ModuleList(nn.MLP(16, 16, 4, 3, rng=rng)
                                                       for _ in range(3))
    return transformer


def test_flatten_levels_order_level_embed_and_valid_ratios():
    t = small_transformer()
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (2, 2)]
    srcs = [Tensor(rng.normal(size=(2, 16, H, W)).astype(np.float32)) for H, W in shapes]
    pos = [Tensor(rng.normal(size=(2, 16, H, W)).astype(np.float32)) for H, W in shapes]
    masks = [np.zeros((2, H, W), bool) for H, W in shapes]
    masks[0][1, :, 3:] = True
    masks[1][1, :, 1:] = True
    src, mask, lvl_pos, spatial_shapes, starts, ratios = t.flatten_levels(srcs, masks, pos)
    assert src.shape == (2, 16, 16) and mask.shape == (2, 16)
    assert spatial_shapes.tolist() == [[3, 4], [2, 2]] and starts.tolist() == [0, 12]
    for lvl, (H, W) in enumerate(shapes):
        for y in range(H):
            for x in range(W):
                row = starts[lvl] + y * W + x          # pixel (y, x) of level lvl
                assert_allclose(src.data[:, row], srcs[lvl].data[:, :, y, x], atol=0,
                                what=f"src row {row}")
                assert_allclose(lvl_pos.data[:, row],
                                pos[lvl].data[:, :, y, x] + t.level_embed.data[lvl],
                                atol=1e-6, what=f"pos + level_embed row {row}")
                assert (mask[:, row] == masks[lvl][:, y, x]).all()
    assert_allclose(ratios, [[[1, 1], [1, 1]], [[0.75, 1], [0.5, 1]]], atol=0, what="ratios")
    with pytest.raises(ValueError, match="expected 2 levels"):
        t.flatten_levels(srcs[:1], masks[:1], pos[:1])


def test_encoder_layer_is_post_norm_attention_then_ffn():
    rng = np.random.default_rng(2)
    layer = DeformableTransformerEncoderLayer(16, 32, 0.1, n_levels=1, n_heads=2, n_points=2,
                                              rng=rng).eval()
    src = Tensor(rng.normal(size=(1, 6, 16)).astype(np.float32))
    pos = Tensor(rng.normal(size=(1, 6, 16)).astype(np.float32))
    ref = Tensor(rng.uniform(size=(1, 6, 1, 2)).astype(np.float32))
    shapes, starts = np.array([[2, 3]]), np.array([0])
    out = layer(src, pos, ref, shapes, starts)
    x = layer.norm1(src + layer.self_attn(src + pos, ref, src, shapes, starts))
    x = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
    assert_allclose(out.data, x.data, atol=1e-6, what="encoder layer")


def test_decoder_layer_order_self_attn_cross_attn_ffn():
    """norm2 after self-attention (first), norm1 after cross-attention, norm3 after the FFN."""
    rng = np.random.default_rng(3)
    layer = DeformableTransformerDecoderLayer(16, 32, 0.1, n_levels=1, n_heads=2, n_points=2,
                                              rng=rng).eval()
    tgt = Tensor(rng.normal(size=(1, 4, 16)).astype(np.float32))
    qpos = Tensor(rng.normal(size=(1, 4, 16)).astype(np.float32))
    memory = Tensor(rng.normal(size=(1, 6, 16)).astype(np.float32))
    ref = Tensor(rng.uniform(size=(1, 4, 1, 2)).astype(np.float32))
    shapes, starts = np.array([[2, 3]]), np.array([0])
    mask = np.array([[False] * 5 + [True]])
    out = layer(tgt, qpos, ref, memory, shapes, starts, mask)
    t = layer.norm2(tgt + layer.self_attn(tgt + qpos, tgt + qpos, tgt)[0])
    t = layer.norm1(t + layer.cross_attn(t + qpos, ref, memory, shapes, starts, mask))
    t = layer.norm3(t + layer.linear2(F.relu(layer.linear1(t))))
    assert_allclose(out.data, t.data, atol=1e-6, what="decoder layer")


def test_transformer_two_stage_queries_are_detached_top_k_proposals():
    """Two-stage: the init reference is sigmoid of the top-3 proposal logits by class
    channel 0, carries no gradient, and the queries come from pos_trans(proposal embed)."""
    t = small_transformer(two_stage=True)
    rng = np.random.default_rng(4)
    shapes = [(3, 4), (2, 2)]
    srcs = [Tensor(rng.normal(size=(2, 16, H, W)).astype(np.float32), requires_grad=True)
            for H, W in shapes]
    pos = [Tensor(rng.normal(size=(2, 16, H, W)).astype(np.float32)) for H, W in shapes]
    masks = [np.zeros((2, H, W), bool) for H, W in shapes]
    masks[0][1, 2:] = True
    masks[1][1, 1:] = True
    out = t(srcs, masks, pos)
    assert out.hs.shape == (2, 2, 3, 16) and out.inter_references.shape == (2, 2, 3, 4)
    assert out.enc_outputs_class.shape == (2, 16, 3)
    assert out.enc_outputs_coord_unact.shape == (2, 16, 4)
    scores = out.enc_outputs_class.data[..., 0]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    coords = np.take_along_axis(out.enc_outputs_coord_unact.data, top[..., None], axis=1)
    assert_allclose(out.init_reference.data, 1 / (1 + np.exp(-coords)), atol=1e-6,
                    what="init reference = sigmoid(top-k proposal logits)")
    assert not out.init_reference.requires_grad
    # padded tokens of image 1 carry +inf proposal logits
    flat_mask = np.concatenate([m.reshape(2, -1) for m in masks], axis=1)
    assert np.isposinf(out.enc_outputs_coord_unact.data[flat_mask]).all()


def test_transformer_single_stage_needs_query_embed_and_init_is_official():
    t = small_transformer()
    with pytest.raises(ValueError, match="query_embed"):
        t([], [], [], None)
    # MSDeformAttn's own init runs after the transformer-wide xavier init
    attns = [l.self_attn for l in t.encoder.layers] + [l.cross_attn for l in t.decoder.layers]
    for attn in attns:
        assert not attn.sampling_offsets.weight.data.any()
        assert not attn.attention_weights.weight.data.any()
    assert not t.reference_points.bias.data.any()
    bound = math.sqrt(6 / (16 + 2))
    assert np.abs(t.reference_points.weight.data).max() <= bound
