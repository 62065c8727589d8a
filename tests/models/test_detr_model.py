"""Tests of the whole detector (minidetr/models/deformable_detr.py, config.py, build.py).

* The paper preset (ResNet-50, 6 + 6 layers, 91 classes) has exactly the official
  checkpoint's state dict: 561 keys (plain), 597 (refine), 630 (two-stage); it loads such
  a dict; its heads are shared or independent as in the official code; its init matches.
  These models are built but never run.
* The tiny preset: output shapes for every variant, refinement detaches the references,
  determinism for a seed, and a backward pass that reaches every trainable parameter.
* Configuration errors are clear.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.models.build import build_criterion, build_model, build_postprocess
from minidetr.models.config import ModelConfig, get_config
from minidetr.models.deformable_detr import DeformableDETR
from minidetr.models.deformable_transformer import box_from_reference
from minidetr.testing import assert_allclose

VARIANTS = ("plain", "refine", "two-stage")
# (number of keys, unique parameter scalars: README 40 / 41 / 41 M, facts 40.07 / 40.85 / 41.18 M)
PAPER_COUNTS = {"plain": (561, 40_069_665), "refine": (597, 40_849_660),
                "two-stage": (630, 41_181_529)}


@pytest.fixture(scope="module")
def paper_models():
    """The three paper models, built once (about a second each), never run."""
    return {v: build_model(get_config("paper", v)) for v in VARIANTS}


def padded_batch(seed=0, B=2, H=64, W=96):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(B, 3, H, W)).astype(np.float32)
    mask = np.zeros((B, H, W), dtype=bool)
    mask[-1, 40:, :] = True
    mask[-1, :, 56:] = True
    images[np.broadcast_to(mask[:, None], images.shape)] = 0.0
    return images, mask


TARGETS = [{"labels": np.array([1, 3]),
            "boxes": np.array([[0.5, 0.5, 0.3, 0.2], [0.2, 0.3, 0.1, 0.2]], np.float32)},
           {"labels": np.array([0]), "boxes": np.array([[0.4, 0.5, 0.2, 0.3]], np.float32)}]


def official_keys(shared_dir):
    lines = (shared_dir / "reference" / "official-state-dict-r50.txt").read_text().splitlines()
    return [(k, tuple(int(n) for n in re.findall(r"\d+", s)))
            for k, s in (line.split(" ", 1) for line in lines)]


# --------------------------------------------------------------------------- paper state dicts
def test_paper_plain_state_dict_equals_official_checkpoint(paper_models, shared_dir):
    """Keys, order and shapes of the released R50 checkpoint (561 keys)."""
    official = official_keys(shared_dir)
    ours = [(k, v.shape) for k, v in paper_models["plain"].state_dict().items()]
    assert len(official) == 561
    assert [k for k, _ in ours] == [k for k, _ in official]
    bad = [(k, a, b) for (k, a), (_, b) in zip(ours, official) if a != b]
    assert not bad, f"shape mismatches (key, ours, official): {bad[:5]}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_state_dict_counts_and_flag_changes(paper_models, variant):
    """561 / 597 / 630 keys; what refinement and two-stage add and remove (facts section 8)."""
    model = paper_models[variant]
    sd = model.state_dict()
    n_keys, n_params = PAPER_COUNTS[variant]
    assert len(sd) == n_keys
    assert model.num_parameters() == n_params
    shapes = {
        "transformer.level_embed": (4, 256),
        "transformer.encoder.layers.5.self_attn.sampling_offsets.weight": (256, 256),
        "transformer.encoder.layers.0.self_attn.attention_weights.weight": (128, 256),
        "transformer.encoder.layers.3.linear1.weight": (1024, 256),
        "transformer.decoder.layers.0.self_attn.in_proj_weight": (768, 256),
        "transformer.decoder.layers.5.cross_attn.value_proj.weight": (256, 256),
        "transformer.decoder.layers.2.norm3.bias": (256,),
        "class_embed.5.weight": (91, 256),
        "bbox_embed.5.layers.2.weight": (4, 256),
        "input_proj.0.0.weight": (256, 512, 1, 1),
        "input_proj.2.0.weight": (256, 2048, 1, 1),
        "input_proj.3.0.weight": (256, 2048, 3, 3),
        "input_proj.3.1.bias": (256,),
        "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
    }
    if variant == "two-stage":
        shapes.update({"transformer.enc_output.weight": (256, 256),
                       "transformer.enc_output_norm.weight": (256,),
                       "transformer.pos_trans.weight": (512, 512),
                       "transformer.pos_trans_norm.bias": (512,),
                       "class_embed.6.bias": (91,),
                       "transformer.decoder.class_embed.6.weight": (91, 256),
                       "transformer.decoder.bbox_embed.6.layers.2.bias": (4,)})
    else:
        shapes.update({"query_embed.weight": (300, 512),
                       "transformer.reference_points.weight": (2, 256)})
    for key, shape in shapes.items():
        assert key in sd, f"missing {key}"
        assert sd[key].shape == shape, f"{key}: {sd[key].shape} vs official {shape}"

    plain = set(paper_models["plain"].state_dict())
    added, removed = set(sd) - plain, plain - set(sd)
    if variant == "plain":
        assert not any(".decoder.bbox_embed" in k or ".decoder.class_embed" in k for k in sd)
    elif variant == "refine":
        assert added == {f"transformer.decoder.bbox_embed.{i}.layers.{j}.{p}"
                         for i in range(6) for j in range(3) for p in ("weight", "bias")}
        assert not removed
    else:
        both = ("", "transformer.decoder.")
        expected = {f"{prefix}bbox_embed.{i}.layers.{j}.{p}" for prefix in both
                    for i in range(7) for j in range(3) for p in ("weight", "bias")}
        expected |= {f"{prefix}class_embed.{i}.{p}" for prefix in both
                     for i in range(7) for p in ("weight", "bias")}
        expected |= {f"transformer.{m}.{p}" for m in ("enc_output", "enc_output_norm",
                                                      "pos_trans", "pos_trans_norm")
                     for p in ("weight", "bias")}
        assert added == expected - plain
        assert removed == {"query_embed.weight", "transformer.reference_points.weight",
                           "transformer.reference_points.bias"}


@pytest.mark.parametrize("variant", VARIANTS)
def test_paper_model_loads_a_checkpoint_shaped_dict(paper_models, variant):
    """load_state_dict accepts a full dict of that variant (values land in place, aliases too)."""
    model = paper_models[variant]
    sd = model.state_dict()
    rng = np.random.default_rng(0)
    for key in ("transformer.level_embed", "input_proj.1.1.weight"):
        sd[key] = rng.normal(size=sd[key].shape).astype(np.float32)
    new_bias = rng.normal(size=91).astype(np.float32)
    if variant == "plain":      # a checkpoint holds identical copies of the shared head
        for i in range(6):
            sd[f"class_embed.{i}.bias"] = new_bias
    else:
        sd["class_embed.0.bias"] = new_bias
        if variant == "two-stage":   # ... and its decoder alias holds the same values
            sd["transformer.decoder.class_embed.0.bias"] = new_bias
    before = model.state_dict()
    try:
        model.load_state_dict(sd)
        after = model.state_dict()
        assert_allclose(after["transformer.level_embed"], sd["transformer.level_embed"], atol=0,
                        what="level_embed")
        assert_allclose(after["class_embed.0.bias"], new_bias, atol=0, what="class_embed.0.bias")
        same = np.array_equal(after["class_embed.1.bias"], new_bias)
        assert same == (variant == "plain"), "heads 0 and 1 are one module only in plain"
        if variant != "plain":   # the decoder's alias keys name the same tensors
            assert_allclose(after["transformer.decoder.bbox_embed.0.layers.2.bias"],
                            after["bbox_embed.0.layers.2.bias"], atol=0, what="alias")
        with pytest.raises(KeyError, match="missing keys"):
            model.load_state_dict({k: v for k, v in sd.items() if k != "class_embed.0.bias"})
    finally:
        model.load_state_dict(before)


def test_paper_heads_shared_or_independent_and_their_init(paper_models):
    plain, refine, two = (paper_models[v] for v in VARIANTS)
    prior = -math.log((1 - 0.01) / 0.01)
    # plain: one module at six indices, counted once by parameters()
    assert all(h is plain.class_embed[0] for h in plain.class_embed)
    assert all(h is plain.bbox_embed[0] for h in plain.bbox_embed)
    assert plain.transformer.decoder.bbox_embed is None
    assert_allclose(plain.class_embed[0].bias.data, np.full(91, prior), atol=1e-6, what="prior")
    last = plain.bbox_embed[0].layers[2]
    assert not last.weight.data.any() and last.bias.data.tolist() == [0, 0, -2, -2]
    # refine: six independent copies; only copy 0 starts with w, h biases of -2
    assert len({id(h) for h in refine.bbox_embed}) == 6
    assert refine.transformer.decoder.bbox_embed is refine.bbox_embed
    assert refine.bbox_embed[0].layers[2].bias.data.tolist() == [0, 0, -2, -2]
    assert all(h.layers[2].bias.data.tolist() == [0, 0, 0, 0] for h in refine.bbox_embed[1:])
    assert np.array_equal(refine.bbox_embed[1].layers[0].weight.data,
                          refine.bbox_embed[4].layers[0].weight.data)   # copies of one init
    # two-stage: seven of each, all size biases 0, the decoder holds both lists
    assert len({id(h) for h in two.class_embed}) == 7
    assert two.transformer.decoder.class_embed is two.class_embed
    assert all(not h.layers[2].bias.data.any() for h in two.bbox_embed)
    assert "query_embed" not in dict(two.named_children())


def test_paper_transformer_init_follows_official_order(paper_models):
    """xavier on every >= 2-dim weight, then MSDeformAttn's init, reference_points, level_embed."""
    model = paper_models["plain"]
    t = model.transformer
    enc0 = t.encoder.layers[0]
    # FFN weights: xavier bound sqrt(6 / (256 + 1024)) = 0.068 > Linear default 1/16
    w = np.abs(enc0.linear1.weight.data)
    assert 0.0625 < w.max() <= math.sqrt(6 / 1280)
    w = np.abs(t.decoder.layers[1].self_attn.out_proj.weight.data)
    assert 0.0625 < w.max() <= math.sqrt(6 / 512)
    # MSDeformAttn init after the xavier pass: offsets weight and attention weights zero
    assert not enc0.self_attn.sampling_offsets.weight.data.any()
    assert not t.decoder.layers[5].cross_attn.attention_weights.bias.data.any()
    # the layers are clones: the FFN biases (Linear default, not re-initialised) agree
    assert np.array_equal(enc0.linear1.bias.data, t.encoder.layers[5].linear1.bias.data)
    assert not np.array_equal(enc0.linear1.weight.data, t.encoder.layers[5].linear1.weight.data)
    # reference_points xavier with bias 0; level_embed N(0, 1)
    assert not t.reference_points.bias.data.any()
    assert np.abs(t.reference_points.weight.data).max() <= math.sqrt(6 / 258)
    assert abs(t.level_embed.data.std() - 1) < 0.1
    # input projections: xavier weight, bias 0, GroupNorm(32) weight 1 bias 0
    assert not model.input_proj[3][0].bias.data.any()
    assert model.input_proj[3][1].num_groups == 32
    assert model.query_embed.weight.shape == (300, 512)
    assert abs(model.query_embed.weight.data.std() - 1) < 0.05


# --------------------------------------------------------------------------- tiny forward
@pytest.fixture(scope="module")
def tiny_outputs():
    """Outputs of the tiny model for each variant on one padded batch (train mode)."""
    images, mask = padded_batch()
    result = {}
    for v in VARIANTS:
        model = build_model(get_config("tiny", v))
        result[v] = (model, model(images, mask))
    return result


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_forward_shapes(tiny_outputs, variant):
    model, out = tiny_outputs[variant]
    cfg = get_config("tiny", variant)
    B, Q, K = 2, cfg.num_queries, cfg.num_classes
    assert out["pred_logits"].shape == (B, Q, K) and out["pred_boxes"].shape == (B, Q, 4)
    assert out["pred_logits"].dtype == np.float32
    assert len(out["aux_outputs"]) == cfg.dec_layers - 1
    for aux in out["aux_outputs"]:
        assert aux["pred_logits"].shape == (B, Q, K) and aux["pred_boxes"].shape == (B, Q, 4)
    boxes = out["pred_boxes"].data
    assert ((boxes > 0) & (boxes < 1)).all()
    if variant == "two-stage":
        # 64 x 96 image: C3..C5 are 8x12, 4x6, 2x3 tokens
        S = 8 * 12 + 4 * 6 + 2 * 3
        enc = out["enc_outputs"]
        assert enc["pred_logits"].shape == (B, S, K) and enc["pred_boxes"].shape == (B, S, 4)
    else:
        assert "enc_outputs" not in out


def test_tiny_box_of_layer_i_uses_reference_entering_layer_i(tiny_outputs):
    """With refinement the reference after layer i is the box of layer i (same formula,
    detached), so aux box i equals the reference that layer i + 1 receives."""
    model, out = tiny_outputs["refine"]
    images, mask = padded_batch()
    model.eval()
    try:
        srcs, masks, pos = model.project_features(images, mask)
        t_out = model.transformer(srcs, masks, pos, model.query_embed.weight)
        final = model(images, mask)
    finally:
        model.train()
    assert t_out.init_reference.shape == (2, 20, 2)
    assert t_out.inter_references.shape == (2, 2, 20, 4)
    layer0_box = box_from_reference(model.bbox_embed[0](t_out.hs[0]), t_out.init_reference)
    assert_allclose(t_out.inter_references.data[0], layer0_box.data, atol=1e-6,
                    what="reference after layer 0")
    assert not t_out.inter_references.requires_grad
    last = box_from_reference(model.bbox_embed[1](t_out.hs[1]), t_out.inter_references[0])
    assert_allclose(final["pred_boxes"].data, last.data, atol=1e-6, what="final boxes")


def test_tiny_refinement_detaches_references():
    """A loss on the final output alone gives the previous layer's box head no gradient
    (its only path is through the detached reference); it does reach the decoder layer 0
    and, without refinement, the initial reference_points Linear."""
    images, mask = padded_batch()
    model = build_model(get_config("tiny", "refine", dropout=0.0, aux_loss=False))
    out = model(images, mask)
    (out["pred_boxes"].sum() + out["pred_logits"].sum()).backward()
    assert model.bbox_embed[0].layers[0].weight.grad is None
    assert model.class_embed[0].weight.grad is None
    assert np.abs(model.bbox_embed[1].layers[2].weight.grad).sum() > 0   # (layer 2 starts at 0)
    assert np.abs(model.transformer.decoder.layers[0].linear1.weight.grad).sum() > 0
    assert np.abs(model.transformer.reference_points.weight.grad).sum() > 0

    plain = build_model(get_config("tiny", "plain", dropout=0.0, aux_loss=False))
    out = plain(images, mask)
    out["pred_boxes"].sum().backward()
    # plain: the reference is not detached, the final boxes depend on it directly
    assert np.abs(plain.transformer.reference_points.weight.grad).sum() > 0


def test_tiny_forward_is_deterministic_for_a_seed():
    images, mask = padded_batch(seed=1)
    a, b = (build_model(get_config("tiny", "two-stage", seed=7)) for _ in range(2))
    sa, sb = a.state_dict(), b.state_dict()
    assert all(np.array_equal(sa[k], sb[k]) for k in sa)
    oa, ob = a(images, mask), b(images, mask)             # train mode: dropout active
    assert np.array_equal(oa["pred_logits"].data, ob["pred_logits"].data)
    assert np.array_equal(oa["enc_outputs"]["pred_boxes"].data,
                          ob["enc_outputs"]["pred_boxes"].data)
    c = build_model(get_config("tiny", "two-stage", seed=8))
    assert not np.array_equal(c.state_dict()["class_embed.0.weight"], sa["class_embed.0.weight"])


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_backward_reaches_every_trainable_parameter(tiny_outputs, variant):
    model, out = tiny_outputs[variant]
    model.zero_grad()
    criterion = build_criterion(get_config("tiny", variant))
    losses = criterion(out, TARGETS)
    expected = {"loss_ce", "loss_bbox", "loss_giou", "loss_ce_0"}
    if variant == "two-stage":
        expected |= {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"}
    assert expected <= set(losses)
    total = criterion.total(losses)
    assert np.isfinite(total.item())
    total.backward()
    missing, bad = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            missing.append(name)
        elif not np.isfinite(p.grad).all():
            bad.append(name)
    assert not missing, f"no gradient for {missing}"
    assert not bad, f"non-finite gradient for {bad}"


def test_tiny_extra_level_and_float64():
    """num_feature_levels=4 adds a stride-64 level from the raw C5; float64 stays float64."""
    images, mask = padded_batch()
    # the official masks (nearest resize of the image mask): mask_aware_norm=False
    model = build_model(get_config("tiny", "two-stage", num_feature_levels=4,
                                   mask_aware_norm=False)).eval()
    model.astype(np.float64)
    srcs, masks, pos = model.project_features(images.astype(np.float64), mask)
    assert [s.shape[-2:] for s in srcs] == [(8, 12), (4, 6), (2, 3), (1, 2)]
    assert model.input_proj[3][0].weight.shape == (64, 128, 3, 3)
    assert masks[3].tolist() == [[[False, False]], [[False, False]]]
    # mask-aware: exact sizes, ceil(n / 2) per stride-2 conv; image 1 (40 x 56) is
    # 1 x 1 at stride 64 (56 -> 28 -> 14 -> 7 -> 4 -> 2 -> 1), so its 2nd column is padding
    aware = build_model(get_config("tiny", "two-stage", num_feature_levels=4)).eval()
    _, aware_masks, _ = aware.project_features(images, mask)
    assert aware_masks[3].tolist() == [[[False, False]], [[False, True]]], \
        f"mask-aware stride-64 masks: {aware_masks[3].tolist()}"
    assert pos[3].dtype == np.float64 and srcs[3].dtype == np.float64
    out = model(Tensor(images.astype(np.float64)), mask)
    assert out["pred_boxes"].dtype == np.float64
    assert out["enc_outputs"]["pred_logits"].shape == (2, 96 + 24 + 6 + 2, 5)


# --------------------------------------------------------------------------- config, build
def test_config_presets_variants_and_errors():
    paper = get_config("paper")
    assert (paper.backbone, paper.d_model, paper.nheads, paper.enc_layers, paper.dec_layers,
            paper.dim_feedforward, paper.dropout, paper.num_queries, paper.num_feature_levels,
            paper.n_points, paper.num_classes) == ("resnet50", 256, 8, 6, 6, 1024, 0.1, 300,
                                                   4, 4, 91)
    assert get_config("small", "refine").with_box_refine
    two = get_config("tiny", "two_stage")
    assert two.two_stage and two.with_box_refine
    assert get_config("tiny", num_classes=7).num_classes == 7
    assert get_config("tiny").replace(seed=3).seed == 3
    with pytest.raises(ValueError, match="unknown preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="unknown variant"):
        get_config("tiny", "three-stage")
    with pytest.raises(ValueError, match=r"unknown ModelConfig field\(s\) \['hidden'\]"):
        get_config("tiny", hidden=3)
    with pytest.raises(ValueError, match="needs with_box_refine"):
        get_config("tiny", two_stage=True)
    with pytest.raises(ValueError, match="divisible by nheads"):
        get_config("tiny", nheads=5)
    with pytest.raises(ValueError, match="num_feature_levels"):
        get_config("tiny", num_feature_levels=2)
    with pytest.raises(ValueError, match="backbone"):
        get_config("tiny", backbone="vgg")
    with pytest.raises(TypeError, match="ModelConfig"):
        build_model({"backbone": "tiny"})


def test_config_from_dict_survives_json_and_names_unknown_fields():
    cfg = get_config("tiny", "two-stage", num_classes=7)
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))   # tuples -> lists
    assert again == cfg and isinstance(again.tiny_channels, tuple)
    assert [get_config("tiny", v).variant for v in ("plain", "refine", "two-stage")] == \
        ["plain", "refine", "two-stage"]
    with pytest.raises(ValueError, match=r"stored model configuration: unknown ModelConfig "
                                         r"field\(s\) \['colour'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "colour": "red"})
    with pytest.raises(ValueError, match="num_queries must be a positive int"):
        ModelConfig.from_dict({**cfg.to_dict(), "num_queries": 0})


def test_build_criterion_and_postprocess():
    cfg = get_config("tiny", "two-stage")
    criterion = build_criterion(cfg)
    m = criterion.matcher
    assert (m.cost_class, m.cost_bbox, m.cost_giou) == (2, 5, 2)
    w = criterion.weight_dict
    assert w["loss_ce"] == 2 and w["loss_bbox"] == 5 and w["loss_giou"] == 2
    assert w["loss_giou_0"] == 2 and w["loss_ce_enc"] == 2 and "loss_ce_1" not in w
    assert criterion.num_classes == 5
    assert build_postprocess(cfg).num_select == 100
    assert isinstance(cfg, ModelConfig)
    import minidetr
    assert isinstance(minidetr.build_model(cfg), DeformableDETR)


def test_detector_argument_errors():
    from minidetr.models.backbone import build_backbone
    from minidetr.models.deformable_transformer import DeformableTransformer
    rng = np.random.default_rng(0)
    backbone = build_backbone("tiny", hidden_dim=32, rng=rng)
    t = DeformableTransformer(32, 4, 1, 1, 64, num_feature_levels=3, rng=rng)
    with pytest.raises(ValueError, match="needs with_box_refine"):
        DeformableDETR(backbone, t, 5, 10, 3, two_stage=True)
    with pytest.raises(ValueError, match="num_feature_levels=4"):
        DeformableDETR(backbone, t, 5, 10, 4)
    with pytest.raises(TypeError, match="DeformableTransformer"):
        DeformableDETR(backbone, object(), 5, 10, 3)


def test_docs_model_md_example_runs(capsys):
    """The Python example of docs/model.md runs and prints what it says."""
    doc = Path(__file__).resolve().parents[2] / "docs" / "model.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    for i, code in enumerate(blocks):
        exec(compile(code, f"model.md (python block {i})", "exec"), {"__name__": "__doc__"})
    assert "(2, 20, 5) (2, 20, 4) 1" in capsys.readouterr().out
