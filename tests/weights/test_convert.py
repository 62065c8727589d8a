"""Converting weights of every layout to minidetr, with no torch: names, sizes, aliases, errors.

Files are written here with the ``safetensors`` package (and NumPy ``.npz``); the ``.pth``
reader has its own tests (``test_pth_reader.py``) and committed fixtures made by torch
(``test_fixtures.py``). Every conversion must give the source arrays back bit for bit.
"""
import json
from collections import OrderedDict

import numpy as np
import pytest

from minidetr.cli import main
from minidetr.models import build_model, get_config
from minidetr.weights.checkpoint import CheckpointError, load_checkpoint
from minidetr.weights.convert import (convert_backbone, convert_detector, convert_file,
                                      fill_aliases, infer_variant, load_weights)
from minidetr.weights.layouts import (LayoutError, detect_layout, hf_resnet_to_torchvision,
                                      official_to_transformers, resnet_depth, to_official,
                                      transformers_naming)

safetensors_numpy = pytest.importorskip("safetensors.numpy",
                                        reason="safetensors not installed (a dependency)")

MICRO = dict(d_model=32, nheads=2, dim_feedforward=32, num_queries=7, n_points=2)
VARIANTS = ("plain", "refine", "two-stage")


def micro_state(variant, seed=0, **overrides):
    """A tiny-backbone detector's state dict with every array nudged (no two heads alike
    unless they are one shared tensor), and its config."""
    cfg = get_config("tiny", variant, **{**MICRO, **overrides})
    model = build_model(cfg)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():          # unique tensors: aliases stay equal
        p.data += rng.normal(0, 0.05, p.shape).astype(p.dtype)
    return cfg, model.state_dict()


def deduplicated(state):
    """``state`` with every repeated array stored once, as safetensors and transformers 5
    write shared tensors (the first name is kept)."""
    out, seen = OrderedDict(), []
    for key, value in state.items():
        if any(v.shape == value.shape and np.array_equal(v, value) for v in seen):
            continue
        seen.append(value)
        out[key] = value
    return out


def assert_same_arrays(got, want):
    assert list(got) == list(want), f"keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key in want:
        a, b = np.asarray(got[key]), np.asarray(want[key])
        assert a.dtype == b.dtype and a.shape == b.shape, key
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), f"{key} differs in its bits"


# --------------------------------------------------------------------------- layouts
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("naming", ["transformers 5", "hub (transformers 4)"])
def test_transformers_files_convert_back_bit_for_bit(tmp_path, variant, naming):
    cfg, state = micro_state(variant)
    hf = official_to_transformers(state, naming)
    assert transformers_naming(hf) == naming
    assert detect_layout(hf) == "transformers"
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(dict(deduplicated(hf)), str(path))
    (tmp_path / "config.json").write_text(json.dumps(
        {"encoder_attention_heads": cfg.nheads, "two_stage_num_proposals": cfg.num_queries}))
    ckpt, report = convert_detector(tmp_path)                  # the folder, as the hub has it
    assert_same_arrays(ckpt.model_state, state)
    assert ckpt.model_config == cfg.to_dict()
    assert report.layout.startswith("transformers") and naming in report.layout
    assert not report.notes, report.notes                      # nothing had to be assumed


def test_transformers_5_names_are_transformers_own():
    """Spot checks of the names transformers 5 uses (its conversion_mapping renames the
    hub's fc1/fc2/out_proj/conv_encoder)."""
    _, state = micro_state("refine")
    hf = official_to_transformers(state)
    for key in ("model.encoder.layers.0.mlp.fc1.weight", "model.decoder.layers.1.mlp.fc2.bias",
                "model.decoder.layers.0.self_attn.o_proj.weight",
                "model.decoder.layers.0.self_attn.q_proj.bias",
                "model.decoder.layers.0.encoder_attn.sampling_offsets.weight",
                "model.decoder.layers.0.encoder_attn_layer_norm.weight",
                "model.encoder.layers.0.self_attn_layer_norm.bias",
                "model.backbone.model.stem.conv.weight", "model.query_position_embeddings.weight",
                "model.decoder.bbox_embed.0.layers.2.bias", "model.level_embed",
                "model.reference_points.weight", "model.input_proj.0.1.weight"):
        assert key in hf, key
    hub = official_to_transformers(state, "hub (transformers 4)")
    for key in ("model.encoder.layers.0.fc1.weight", "model.decoder.layers.0.self_attn.out_proj.bias",
                "model.backbone.conv_encoder.model.stem.conv.weight"):
        assert key in hub, key


def test_decoder_q_k_v_are_stacked_back_in_order():
    _, state = micro_state("plain")
    hf = official_to_transformers(state)
    q = hf["model.decoder.layers.0.self_attn.q_proj.weight"]
    assert q.shape == (32, 32)
    back, _, _ = to_official(hf)
    w = back["transformer.decoder.layers.0.self_attn.in_proj_weight"]           # (3C, C)
    assert np.array_equal(w[:32], q)
    assert np.array_equal(w[64:], hf["model.decoder.layers.0.self_attn.v_proj.weight"])


def test_a_key_without_counterpart_is_named():
    _, state = micro_state("plain")
    hf = official_to_transformers(state)
    hf["model.something_new.weight"] = np.zeros(3, np.float32)
    with pytest.raises(LayoutError, match="model.something_new.weight"):
        to_official(hf)
    del hf["model.something_new.weight"], hf["model.decoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(LayoutError, match=r"decoder layer 0.*\['q', 'v'\]"):
        to_official(hf)


def test_unknown_layout_shows_some_keys():
    with pytest.raises(LayoutError, match="fit no known layout.*encoder.weight"):
        detect_layout({"encoder.weight": 0, "decoder.weight": 1})
    with pytest.raises(LayoutError, match="no weights"):
        detect_layout({"model.total_ops": 0})


@pytest.mark.parametrize("hf_key, torchvision_key", [
    ("embedder.embedder.convolution.weight", "conv1.weight"),
    ("embedder.embedder.normalization.running_var", "bn1.running_var"),
    ("encoder.stages.0.layers.1.layer.2.convolution.weight", "layer1.1.conv3.weight"),
    ("encoder.stages.3.layers.0.layer.0.normalization.bias", "layer4.0.bn1.bias"),
    ("encoder.stages.2.layers.0.shortcut.convolution.weight", "layer3.0.downsample.0.weight"),
    ("encoder.stages.1.layers.0.shortcut.normalization.weight", "layer2.0.downsample.1.weight"),
    ("layer2.0.downsample.1.weight", "layer2.0.downsample.1.weight"),      # timm: unchanged
])
def test_transformers_resnet_names(hf_key, torchvision_key):
    assert hf_resnet_to_torchvision(hf_key) == torchvision_key


# --------------------------------------------------------------------------- official layout
@pytest.mark.parametrize("variant", VARIANTS)
def test_official_npz_state_and_inferred_variant(variant):
    cfg, state = micro_state(variant)
    assert infer_variant(state) == variant
    assert infer_variant(deduplicated(state)) == variant     # also with aliases stored once
    src_cfg, _ = micro_state(variant)
    ckpt, report = convert_detector(_source(state, args={"nheads": 2, "num_queries": 7}))
    assert_same_arrays(ckpt.model_state, state)
    assert ckpt.model_config == src_cfg.to_dict()


def _source(arrays, args=None, hf_config=None):
    from pathlib import Path

    from minidetr.weights.sources import WeightsSource
    return WeightsSource(Path("memory.pth"), "pth", OrderedDict(arrays), args=args,
                         hf_config=hf_config)


def test_args_decide_what_shapes_cannot():
    """M x K is one number in the shapes: 2 heads x 2 points and 1 head x 4 points have the
    same arrays. An official checkpoint's args (or config.json) says which."""
    _, state = micro_state("plain")
    two, notes = convert_detector(_source(state, args={"nheads": 2, "dropout": 0.0}))
    assert two.model_config["nheads"] == 2 and two.model_config["n_points"] == 2
    assert two.model_config["dropout"] == 0.0 and not notes.notes
    four, _ = convert_detector(_source(state, hf_config={"encoder_attention_heads": 1}))
    assert four.model_config["nheads"] == 1 and four.model_config["n_points"] == 4
    guessed, report = convert_detector(_source(state))
    assert any("number of heads is not in the file" in n for n in report.notes)


def test_variant_and_config_are_checked(tmp_path):
    _, state = micro_state("plain")
    src = _source(state, args={"nheads": 2})
    with pytest.raises(CheckpointError, match="--variant refine.*no transformer.decoder.bbox_embed"):
        convert_detector(src, variant="refine")
    with pytest.raises(CheckpointError, match="not the 'paper' preset: backbone: file 'tiny'"):
        convert_detector(src, config="paper")


def test_fill_aliases_restores_shared_heads():
    cfg, state = micro_state("two-stage")
    model = build_model(cfg)
    once = deduplicated(state)
    added = fill_aliases(model, once)
    assert "transformer.decoder.class_embed.0.weight" in added or "class_embed.0.weight" in added
    assert set(once) == set(state)
    assert all(np.array_equal(once[k], state[k]) for k in state)


def test_a_wrong_shape_is_named_with_both_shapes():
    _, state = micro_state("plain")
    state["transformer.encoder.layers.0.linear2.weight"] = np.zeros((32, 5), np.float32)
    with pytest.raises(CheckpointError, match=r"linear2.weight \(32, 5\) vs model \(32, 32\)"):
        convert_detector(_source(state, args={"nheads": 2}))


# --------------------------------------------------------------------------- ImageNet backbones
def resnet_file(tmp_path, name, layout="torchvision"):
    """An ImageNet-style ResNet state dict (random values, the real names and shapes),
    with the classifier and BatchNorm counters a torchvision file has."""
    cfg = get_config("small", backbone=name)
    body = build_model(cfg).backbone[0].body.state_dict()
    rng = np.random.default_rng(1)
    arrays = OrderedDict()
    for key, value in body.items():
        arrays[key] = (value + rng.normal(0, 0.1, value.shape)).astype(np.float32)
        if key.endswith("running_var"):
            arrays[key[:-len("running_var")] + "num_batches_tracked"] = np.array(7, np.int64)
    width = 2048 if name == "resnet50" else 512
    arrays["fc.weight"] = np.zeros((1000, width), np.float32)
    arrays["fc.bias"] = np.zeros(1000, np.float32)
    path = tmp_path / f"{name}.safetensors"
    safetensors_numpy.save_file(dict(arrays), str(path))
    return path, arrays


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_imagenet_resnet_becomes_a_backbone_checkpoint(tmp_path, name):
    path, arrays = resnet_file(tmp_path, name)
    assert detect_layout(arrays) == "resnet" and resnet_depth(arrays) == name
    ckpt, report = convert_file(path)
    assert report.kind == "backbone" and ckpt.extra["backbone"] == name
    kept = {k: v for k, v in arrays.items() if not k.startswith("fc.")
            and not k.endswith("num_batches_tracked")}
    want = OrderedDict(("backbone.0.body." + k, kept[k]) for k in sorted(kept))
    assert_same_arrays(OrderedDict(sorted(ckpt.model_state.items())), want)
    text = str(report)
    assert "dropped 2: the ImageNet classifier" in text and "fc.weight" in text
    assert "BatchNorm's step counter" in text
    with pytest.raises(CheckpointError, match="backbone, not a detector"):
        convert_file(path, variant="plain")


def test_a_detector_file_is_not_loaded_as_weights_of_another_kind(tmp_path):
    path, _ = resnet_file(tmp_path, "resnet18")
    with pytest.raises(CheckpointError, match="backbone only"):
        convert_detector(path)
    assert convert_backbone(path)[0].extra["backbone"] == "resnet18"


# --------------------------------------------------------------------------- the command line
def test_convert_checkpoint_command_then_predict_from_either_file(tmp_path, capsys):
    from PIL import Image

    from minidetr.inference import Detector

    cfg, state = micro_state("refine")
    folder = tmp_path / "hub"
    folder.mkdir()
    safetensors_numpy.save_file(dict(deduplicated(official_to_transformers(state))),
                                str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"encoder_attention_heads": 2}))
    out = tmp_path / "converted.npz"
    assert main(["convert-checkpoint", str(folder), str(out), "--variant", "refine"]) == 0
    printed = capsys.readouterr().out
    assert "transformers 5" in printed and "variant refine" in printed and "wrote" in printed
    assert_same_arrays(load_checkpoint(out).model_state, state)
    assert main(["convert-checkpoint", str(folder), str(out)]) == 2          # no --overwrite
    assert "already exists" in capsys.readouterr().err

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), np.uint8))
    from_npz = Detector.from_checkpoint(out).predict_image(image)
    from_file = Detector.from_checkpoint(folder / "model.safetensors").predict_image(image)
    for key in ("scores", "labels", "boxes"):
        assert np.array_equal(from_npz[key], from_file[key]), key
    assert load_weights(folder / "model.safetensors").model_config == cfg.to_dict()


def test_float16_weights_are_kept_and_noted_integer_weights_refused():
    cfg, state = micro_state("plain")
    half = OrderedDict((k, v.astype(np.float16)) for k, v in state.items())
    ckpt, report = convert_detector(_source(half, args={"nheads": 2}))
    assert all(v.dtype == np.float16 for v in ckpt.model_state.values())
    assert any("stored as float16" in n for n in report.notes)
    model = build_model(cfg)
    model.load_state_dict(ckpt.model_state)               # cast on load
    assert np.array_equal(model.state_dict()["transformer.level_embed"],
                          half["transformer.level_embed"].astype(np.float32))
    state["transformer.level_embed"] = state["transformer.level_embed"].astype(np.int64)
    with pytest.raises(CheckpointError, match="transformer.level_embed: int64 .the model's is "
                                              "float32"):
        convert_detector(_source(state, args={"nheads": 2}))
