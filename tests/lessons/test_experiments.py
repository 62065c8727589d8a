"""The experiment helpers of notebooks 08 and 14-16 (minidetr/lessons/experiments.py,
minidetr/lessons/trained.py): every setting is one change from the baseline, the records
of the attention are what the layers computed, the measures are right on cases worked
by hand, and a cached checkpoint round-trips."""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import numpy as np
import pytest

from minidetr.autograd import Tensor, no_grad
from minidetr.lessons import experiments as ex
from minidetr.lessons import trained as tr
from minidetr.models import build_criterion, build_model, get_config
from minidetr.weights.checkpoint import Checkpoint, save_checkpoint

MICRO = dict(d_model=16, nheads=2, dim_feedforward=16, tiny_channels=(8, 8, 8, 8), gn_groups=8,
             num_queries=4, dropout=0.0)


def _images(n=2, size=64, seed=0):
    return np.random.default_rng(seed).standard_normal((n, 3, size, size)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ex.SETTINGS))
def test_each_setting_changes_only_its_own_fields(name):
    base, cfg = ex.setting_config("base"), ex.setting_config(name)
    changed = {f.name for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(base, f.name)}
    allowed = set(ex.SETTINGS[name].overrides)
    if ex.SETTINGS[name].variant != "plain":
        allowed |= {"with_box_refine", "two_stage"}
    assert changed <= allowed, f"{name} also changes {sorted(changed - allowed)}"
    assert changed or name == "base", f"{name} is the baseline again"


def test_budget_is_one_valid_train_config():
    from minidetr.training import TrainConfig
    cfg = TrainConfig(**ex.BUDGET)
    assert cfg.epochs >= 1 and cfg.lr_drop <= cfg.epochs


def test_record_sampling_records_what_the_layers_compute_and_restores_them():
    model = build_model(get_config("tiny", **MICRO)).eval()
    images = _images()
    with no_grad():
        plain = model(Tensor(images))["pred_boxes"].data
        with tr.record_sampling(model) as records:
            recorded = model(Tensor(images))["pred_boxes"].data
        again = model(Tensor(images))["pred_boxes"].data
    np.testing.assert_array_equal(plain, recorded)
    np.testing.assert_array_equal(plain, again)
    names = sorted(records)
    assert names == ["transformer.decoder.layers.0.cross_attn",
                     "transformer.decoder.layers.1.cross_attn",
                     "transformer.encoder.layers.0.self_attn",
                     "transformer.encoder.layers.1.self_attn"], names
    assert all("sampling_locations_and_weights" not in vars(m) for m in model.modules())
    enc = records["transformer.encoder.layers.0.self_attn"][0]
    N, S = 2, 8 * 8 + 4 * 4 + 2 * 2                     # 64 px: strides 8, 16, 32
    assert enc["locations"].shape == (N, S, 2, 3, 2, 2)
    np.testing.assert_allclose(enc["weights"].sum((-2, -1)), 1, atol=1e-6)
    # untrained: the offsets are the ring of initial_offsets, in pixels of each level
    ring = model.transformer.encoder.layers[0].self_attn.initial_offsets()   # (M, L, K, 2)
    offsets = tr.offsets_in_pixels(enc)                                      # (N, S, M, L, K, 2)
    np.testing.assert_allclose(offsets, np.broadcast_to(ring, offsets.shape), atol=1e-4)


def test_attention_focus_on_worked_cases():
    uniform = dict(weights=np.full((1, 3, 2, 1, 4), 0.25), locations=np.zeros((1, 3, 2, 1, 4, 2)))
    f = tr.attention_focus(uniform)
    assert f["kind"] == "deformable" and f["n_keys"] == 4
    assert np.isclose(f["perplexity"], 4) and np.isclose(f["max_weight"], 0.25)
    one_hot = np.zeros((1, 2, 3, 5))                                        # (N, M, Lq, S)
    one_hot[..., 0] = 1
    mask = np.zeros((1, 5), bool)
    mask[0, 3:] = True
    f = tr.attention_focus(dict(weights=one_hot, key_mask=mask))
    assert f["kind"] == "dense" and f["n_keys"] == 3
    assert np.isclose(f["perplexity"], 1) and np.isclose(f["max_weight"], 1)


def test_dense_head_weights_match_the_layer_average():
    model = build_model(get_config("tiny", attention="dense", **MICRO)).eval()
    attn = model.transformer.encoder.layers[0].self_attn
    x = np.random.default_rng(1).standard_normal((2, 7, 16))
    mask = np.zeros((2, 7), bool)
    mask[1, 5:] = True
    per_head = tr.dense_head_weights(attn, x, x, mask)                      # (N, M, Lq, S)
    _, average = attn.attend(Tensor(x.astype(np.float32)), Tensor(x.astype(np.float32)),
                             Tensor(x.astype(np.float32)), key_padding_mask=mask,
                             need_weights=True)
    np.testing.assert_allclose(per_head.mean(1), average.data, atol=1e-5)
    assert np.all(per_head[1, :, :, 5:] == 0)


def test_iou_and_per_layer_iou():
    a = np.array([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.2, 0.2]])
    b = np.array([[0.5, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])
    np.testing.assert_allclose(tr.iou_cxcywh(a, b), [1.0, 0.1 * 0.2 / (0.08 - 0.02)])
    cfg = get_config("tiny", "refine", **MICRO)
    model = build_model(cfg).eval()
    targets = [{"labels": np.array([0, 2]),
                "boxes": np.array([[0.3, 0.3, 0.2, 0.2], [0.6, 0.7, 0.3, 0.2]], np.float32)},
               {"labels": np.array([1]), "boxes": np.array([[0.5, 0.5, 0.4, 0.4]], np.float32)}]
    batch = (_images(), np.zeros((2, 64, 64), bool), targets)
    result = tr.per_layer_iou(model, [batch], build_criterion(cfg).matcher)
    assert result["tracked"].shape == (2, 3) and result["own"].shape == (2, 3)
    # untrained refinement is the identity: every layer has the same boxes
    np.testing.assert_allclose(result["tracked"][0], result["tracked"][1], atol=1e-6)
    np.testing.assert_allclose(np.sort(result["areas"][:2]), [0.04, 0.06], atol=1e-6)
    np.testing.assert_allclose(result["areas"][2], 0.16, atol=1e-6)


def test_cached_checkpoint_round_trip(tmp_path):
    cfg = get_config("tiny", **MICRO)
    model = build_model(cfg).eval()
    state = {k: v.astype(np.float16) if v.dtype == np.float32 else v
             for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "m.npz", Checkpoint(state, model_config=cfg.to_dict(),
                                                         category_map={},
                                                         progress={"history": []}))
    loaded, loaded_cfg, _ = tr.load_cached_model(path)
    assert loaded_cfg == cfg and not loaded.training
    images = Tensor(_images(1))
    with no_grad():
        a, b = model(images)["pred_boxes"].data, loaded(images)["pred_boxes"].data
    assert np.abs(a - b).max() < 5e-3, "float16 weights should change boxes only slightly"
    with pytest.raises(FileNotFoundError, match="experiments run"):
        tr.load_cached_model(tmp_path / "missing.npz")


def test_token_mask_and_step_cost():
    batch = SimpleNamespace(images=_images(1), mask=np.zeros((1, 64, 64), bool))
    for levels, tokens in ((1, 4), (3, 84)):
        model = build_model(get_config("tiny", num_feature_levels=levels, **MICRO))
        assert ex.token_mask(model, batch).shape == (1, tokens)
    cost = ex.step_cost(get_config("tiny", **MICRO), batch_size=1, image_size=64, steps=1)
    assert cost["seconds"] > 0 and cost["peak_mib"] > 0 and cost["tokens"] == 84


def test_results_file_when_present_is_consistent():
    if not ex.RESULTS_PATH.is_file():
        pytest.skip(f"{ex.RESULTS_PATH} not made yet (python -m minidetr.lessons.experiments "
                    "collect)")
    results = json.loads(ex.RESULTS_PATH.read_text(encoding="utf-8"))
    budgets = {json.dumps(e["train_config"], sort_keys=True)
               for e in results["settings"].values()}
    assert len(budgets) == 1, "the cached settings were trained with different budgets"
    for name, entry in results["settings"].items():
        assert name in ex.SETTINGS, f"cached setting {name} is not in SETTINGS"
        assert [r["epoch"] for r in entry["epochs"]] == list(range(1, len(entry["epochs"]) + 1))
