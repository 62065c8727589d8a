"""Pretrained weights in practice, with no torch: the official-format fixtures written by a
real ``torch.save`` convert bit for bit, and ``train --backbone-weights`` / ``--init-from``
start runs from ``.pth``, ``.safetensors`` and ``.npz`` files (also with another number of
classes, whose heads are re-initialised as the official code initialises them).
"""
import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

from minidetr.cli import main
from minidetr.models import build_model, get_config
from minidetr.weights.checkpoint import Checkpoint, CheckpointError, load_checkpoint, \
    save_checkpoint
from minidetr.weights.convert import convert_file
from minidetr.weights.layouts import official_to_transformers
from minidetr.weights.pretrained import (detector_config, init_from_detector,
                                         load_backbone_weights)

safetensors_numpy = pytest.importorskip("safetensors.numpy",
                                        reason="safetensors not installed (a dependency)")

FIXTURES = Path(__file__).parent / "fixtures"
# tools/make_weight_fixtures.py's MICRO: the model inside the official-*.pth fixtures
MICRO = dict(tiny_channels=(8, 8, 16, 16), d_model=16, nheads=2, enc_layers=1, dec_layers=2,
             dim_feedforward=16, num_queries=6, n_points=2, gn_groups=4, num_classes=5)
COUNTS = {"plain": 107, "refine": 119, "two-stage": 144}


def fixture(variant, fmt="zip"):
    return FIXTURES / f"official-{variant}-{fmt}.pth"


def expected_hashes(variant):
    """key -> (dtype, shape, sha) of the ``model`` entry, as torch.load gave it."""
    entry = json.loads((FIXTURES / "expected.json").read_text())[f"official-{variant}"]
    (top,) = entry.values()                                   # {"dict": [[k, v], ...]}
    model = next(v for k, v in top if k == {"str": "model"})
    (items,) = model.values()
    return {k["str"]: tuple(v["array"][:1]) + (tuple(v["array"][1]), v["array"][2])
            for k, v in items}


def describe(array):
    array = np.asarray(array)
    return (array.dtype.str, array.shape, hashlib.sha256(array.tobytes()).hexdigest()[:20])


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_official_fixture_converts_bit_for_bit(variant, fmt):
    ckpt, report = convert_file(fixture(variant, fmt))
    assert ckpt.model_config == get_config("tiny", variant, **MICRO).to_dict()
    assert not report.notes[:-1], report.notes        # only "not weights, left out: ..."
    assert "optimizer" in report.notes[-1] and "args" in report.notes[-1]
    want = expected_hashes(variant)
    assert len(ckpt.model_state) == len(want) == COUNTS[variant]
    for key, array in ckpt.model_state.items():
        assert describe(array) == want[key], f"{key} differs from what torch.load gave"
    assert ckpt.extra["epoch"] is not None and report.layout == "official"


def test_convert_checkpoint_command_on_a_legacy_pth(tmp_path, capsys):
    out = tmp_path / "two-stage.npz"
    assert main(["convert-checkpoint", str(fixture("two-stage", "legacy")), str(out),
                 "--variant", "two-stage"]) == 0
    printed = capsys.readouterr().out
    assert "official layout" in printed and "144 arrays" in printed and "variant two-stage" \
        in printed
    assert main(["convert-checkpoint", str(fixture("plain")), str(tmp_path / "p.npz"),
                 "--variant", "refine"]) == 2
    err = capsys.readouterr().err
    assert "--variant refine does not fit" in err and "plain model" in err
    assert not (tmp_path / "p.npz").exists()
    assert detector_config(out).variant == "two-stage"


# --------------------------------------------------------------------------- init-from
def micro_model(variant="refine", **overrides):
    cfg = get_config("tiny", variant, **{**MICRO, **overrides})
    return cfg, build_model(cfg)


def test_init_from_with_other_classes_reinitialises_only_the_class_heads():
    cfg, model = micro_model("two-stage", num_classes=3)
    fresh = model.state_dict()
    lines = init_from_detector(model, cfg, fixture("two-stage"))
    source = convert_file(fixture("two-stage"))[0].model_state
    got = model.state_dict()
    heads = [k for k in got if "class_embed" in k]
    assert heads and all(np.array_equal(got[k], fresh[k]) for k in heads)
    prior = -math.log((1 - 0.01) / 0.01)                           # the official bias init
    assert np.allclose(got["class_embed.0.bias"], prior)
    others = [k for k in got if k not in heads]
    assert all(np.array_equal(got[k], source[k]) for k in others)
    text = "\n".join(lines)
    assert "5 classes and the model 3" in text and "class_embed.0.weight" in text


def test_init_from_another_size_names_each_key_and_both_shapes():
    cfg, model = micro_model("refine", d_model=32, gn_groups=4)
    with pytest.raises(CheckpointError) as info:
        init_from_detector(model, cfg, fixture("refine", "legacy"))
    message = str(info.value)
    assert "transformer.level_embed: checkpoint (3, 16) vs model (3, 32)" in message
    assert "only the number of classes may differ" in message


def test_init_from_another_variant_lists_the_missing_keys():
    cfg, model = micro_model("two-stage")
    with pytest.raises(CheckpointError, match=r"keys the model has and the checkpoint lacks: .*\n.*the model lacks: .*query_embed.weight"):
        init_from_detector(model, cfg, fixture("refine"))


def test_backbone_weights_must_be_of_the_models_backbone(tmp_path):
    cfg = get_config("small")
    body = build_model(cfg).backbone[0].body.state_dict()
    path = tmp_path / "resnet18.safetensors"
    safetensors_numpy.save_file({k: v + 1 for k, v in body.items()}, str(path))
    model = build_model(cfg)
    load_backbone_weights(model, cfg, path)
    assert np.array_equal(model.state_dict()["backbone.0.body.layer4.1.bn2.running_var"],
                          body["layer4.1.bn2.running_var"] + 1)
    tiny_cfg, tiny = micro_model("plain")
    with pytest.raises(CheckpointError, match="holds a resnet18 backbone, but the model is "
                                              "built with tiny"):
        load_backbone_weights(tiny, tiny_cfg, path)
    # a detector file gives its backbone (here the fixture's TinyBackbone)
    lines = load_backbone_weights(tiny, tiny_cfg, fixture("plain", "legacy"))
    assert "loaded 15 backbone arrays into the tiny body" in lines[-1]


# --------------------------------------------------------------------------- train, end to end
def _three_class_sources(tmp_path):
    """The refine micro model with 3 classes as .npz and as a transformers .safetensors."""
    cfg, model = micro_model("refine", num_classes=3)
    npz = save_checkpoint(tmp_path / "three.npz",
                          Checkpoint(model_state=model.state_dict(), model_config=cfg.to_dict()))
    folder = tmp_path / "hub"
    folder.mkdir()
    safetensors_numpy.save_file(dict(official_to_transformers(model.state_dict())),
                                str(folder / "model.safetensors"))
    # transformers always has 32 GroupNorm groups; the micro model has 4 (d_model 16)
    (folder / "config.json").write_text(json.dumps({"encoder_attention_heads": 2,
                                                    "gn_groups": 4}))
    return {"npz": npz, "safetensors": folder / "model.safetensors",
            "pth": fixture("refine", "legacy")}


@pytest.mark.slow
def test_train_init_from_every_format(tmp_path, shapes_data, capsys):
    """One step of fine-tuning from each format; the shapes set has 5 classes, the .npz and
    .safetensors sources 3 (their class heads are re-initialised), the .pth 5."""
    sources = _three_class_sources(tmp_path)
    for fmt, source in sources.items():
        out = tmp_path / f"run-{fmt}"
        code = main(["train", "--data", str(shapes_data.root), "--init-from", str(source),
                     "--out", str(out), "--epochs", "1", "--batch-size", "4",
                     "--max-train-images", "4", "--max-val-images", "2", "--no-progress",
                     "--num-workers", "0"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "building its model (tiny, d_model 16, refine" in printed.out, fmt
        assert "initialised" in printed.out, fmt
        if fmt != "pth":
            assert "3 classes and the model 5" in printed.out, fmt
        saved = load_checkpoint(out / "last.npz")
        assert saved.model_config["d_model"] == 16 and saved.model_config["num_classes"] == 5
        assert saved.train_config["init_from"] == str(source.resolve())


@pytest.mark.slow
def test_train_backbone_weights_from_every_format(tmp_path, shapes_data, capsys):
    """ImageNet-style weights of the tiny preset's TinyBackbone as .safetensors and as a
    converted .npz; the .pth fixture's (micro widths) into the micro model that --init-from
    builds; and the same .pth into the tiny preset: a clear error, no run folder."""
    body = build_model(get_config("tiny")).backbone[0].body.state_dict()
    st = tmp_path / "tiny-backbone.safetensors"
    safetensors_numpy.save_file({k: v + 0.5 for k, v in body.items()}, str(st))
    npz = tmp_path / "tiny-backbone.npz"
    assert main(["convert-checkpoint", str(st), str(npz)]) == 0
    assert "tiny-backbone layout" in capsys.readouterr().out
    runs = [(st, ["--config", "tiny"]), (npz, ["--config", "tiny"]),
            (fixture("plain", "legacy"), ["--init-from", str(fixture("plain"))])]
    for i, (source, extra) in enumerate(runs):
        out = tmp_path / f"run-{i}"
        code = main(["train", "--data", str(shapes_data.root), "--backbone-weights", str(source),
                     *extra, "--out", str(out), "--epochs", "1", "--no-progress",
                     "--max-train-images", "2", "--max-val-images", "2", "--num-workers", "0",
                     "--batch-size", "2"])
        printed = capsys.readouterr()
        assert code == 0, printed.err
        assert "backbone arrays into the tiny body" in printed.out
    code = main(["train", "--data", str(shapes_data.root), "--backbone-weights",
                 str(fixture("plain")), "--config", "tiny", "--out", str(tmp_path / "bad"),
                 "--epochs", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "TinyBackbone weights do not fit" in err and "Traceback" not in err
    assert "backbone.0.body" not in err or "stem.conv.weight" in err
    assert not (tmp_path / "bad" / "last.npz").exists()
