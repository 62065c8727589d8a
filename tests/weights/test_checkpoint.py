"""Checkpoints: exact round trips, atomic writes, no pickle, clear errors on misfits."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

from minidetr.models.build import build_model
from minidetr.optim import AdamW, StepLR
from minidetr.training import TrainConfig
from minidetr.training.engine import build_param_groups
from minidetr.weights.checkpoint import (Checkpoint, CheckpointError, check_model_state,
                                         load_checkpoint, load_model_state, save_checkpoint)
from minidetr.weights.convert import convert_official_state_dict

def _model(small_config, variant="plain", **overrides):
    cfg = small_config(variant, **{"num_queries": 5, **overrides})     # 5: named in messages
    return cfg, build_model(cfg)


def _trained_checkpoint(small_config):
    """A model, AdamW and StepLR after two updates with random gradients."""
    cfg, model = _model(small_config)
    train_cfg = TrainConfig(lr=1e-3, lr_backbone=1e-4)
    opt = AdamW(build_param_groups(model, train_cfg), lr=1e-3, weight_decay=1e-4)
    sched = StepLR(opt, 3)
    rng = np.random.default_rng(0)
    for _ in range(2):
        for p in model.parameters():
            p.grad = rng.normal(size=p.shape).astype(p.dtype) if p.requires_grad else None
        opt.step()
        sched.step()
    ckpt = Checkpoint(model_state=model.state_dict(), optimizer_state=opt.state_dict(),
                      schedule_state=sched.state_dict(),
                      progress={"epoch": 2, "step": 0, "history": [{"epoch": 1, "AP": 0.25}]},
                      rng={"data_seed": 7, "dropout": model.rng_state()},
                      model_config=cfg.to_dict(), train_config=train_cfg.to_dict(),
                      category_map={"mode": "contiguous",
                                    "categories": [{"id": 1, "name": "circle"}]},
                      extra={"note": "ünïcode ok"})
    return cfg, model, opt, sched, ckpt


def test_round_trip_is_bit_identical(tmp_path, small_config):
    cfg, model, opt, sched, ckpt = _trained_checkpoint(small_config)
    path = save_checkpoint(tmp_path / "last.npz", ckpt)
    loaded = load_checkpoint(path)

    assert list(loaded.model_state) == list(ckpt.model_state)          # order kept
    for key, value in ckpt.model_state.items():
        got = loaded.model_state[key]
        assert got.dtype == value.dtype and got.shape == value.shape, key
        assert got.tobytes() == value.tobytes(), f"model/{key} changed in the round trip"
    saved_opt = ckpt.optimizer_state
    assert loaded.optimizer_state["param_groups"] == saved_opt["param_groups"]
    assert sorted(loaded.optimizer_state["state"]) == sorted(saved_opt["state"])
    for index, s in saved_opt["state"].items():
        got = loaded.optimizer_state["state"][index]
        assert got["step"] == s["step"] == 2
        for k in ("exp_avg", "exp_avg_sq"):
            assert got[k].tobytes() == s[k].tobytes(), f"optim/{index}/{k} changed"
    for name in ("schedule_state", "progress", "rng", "model_config", "train_config",
                 "category_map", "extra"):
        # JSON keeps everything but the tuple type (tuples come back as lists)
        assert getattr(loaded, name) == json.loads(json.dumps(getattr(ckpt, name))), name

    # ... and it restores the objects: the optimiser's next step is the same
    _, model2 = _model(small_config)
    opt2 = AdamW(build_param_groups(model2, TrainConfig(lr=1e-3, lr_backbone=1e-4)),
                 lr=1e-3, weight_decay=1e-4)
    load_model_state(model2, loaded, cfg.to_dict())
    opt2.load_state_dict(loaded.optimizer_state)
    model2.set_rng_state(loaded.rng["dropout"])
    for p, q in zip(model.parameters(), model2.parameters()):
        if p.requires_grad:
            p.grad = np.full(p.shape, 0.5, p.dtype)
            q.grad = np.full(q.shape, 0.5, q.dtype)
    opt.step()
    opt2.step()
    for (name, p), q in zip(model.named_parameters(), model2.parameters()):
        assert np.array_equal(p.data, q.data), f"{name} differs after one more step"


def test_the_file_loads_without_pickle(tmp_path, small_config):
    *_, ckpt = _trained_checkpoint(small_config)
    path = save_checkpoint(tmp_path / "c.npz", ckpt)
    with np.load(path, allow_pickle=False) as archive:
        names = archive.files
        assert all(archive[k].dtype != object for k in names)
    assert "model/transformer.level_embed" in names
    assert "optim/0/exp_avg" in names and "meta/model_config" in names


def test_atomic_write_leaves_only_the_file(tmp_path, small_config):
    *_, ckpt = _trained_checkpoint(small_config)
    save_checkpoint(tmp_path / "last.npz", ckpt)
    save_checkpoint(tmp_path / "last.npz", ckpt, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]


def test_a_failed_write_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch,
                                                             small_config):
    *_, ckpt = _trained_checkpoint(small_config)
    path = save_checkpoint(tmp_path / "last.npz", ckpt)
    before = path.read_bytes()

    def broken_savez(file, **arrays):
        file.write(b"half a zip")
        raise KeyboardInterrupt                 # e.g. Ctrl-C in the middle of a save

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, ckpt, overwrite=True)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["last.npz"]


def test_refuses_to_overwrite_without_permission(tmp_path, small_config):
    *_, ckpt = _trained_checkpoint(small_config)
    path = save_checkpoint(tmp_path / "mine.npz", ckpt)
    before = path.read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(path, ckpt)
    assert path.read_bytes() == before


def test_mismatched_checkpoint_lists_the_keys(tmp_path, small_config):
    refine_cfg, refine_model = _model(small_config, "refine")
    path = save_checkpoint(tmp_path / "refine.npz",
                           Checkpoint(model_state=refine_model.state_dict(),
                                      model_config=refine_cfg.to_dict()))
    plain_cfg, plain_model = _model(small_config, "plain")
    with pytest.raises(CheckpointError) as err:
        load_model_state(plain_model, load_checkpoint(path), plain_cfg.to_dict())
    message = str(err.value)
    extra = [k for k in refine_model.state_dict() if k not in plain_model.state_dict()]
    assert extra and all(k.startswith("transformer.decoder.bbox_embed.") for k in extra)
    assert f"{len(extra)} unexpected keys" in message
    for key in extra:
        assert key in message, f"{key} not listed"
    assert "variant refine" in message and "variant plain" in message
    assert "with_box_refine: True vs False" in message


def test_shape_mismatch_is_listed_with_both_shapes(small_config):
    _, model = _model(small_config)
    state = model.state_dict()
    state["query_embed.weight"] = np.zeros((7, 64), np.float32)
    with pytest.raises(CheckpointError, match=r"query_embed.weight \(7, 64\) vs model \(5, 64\)"):
        check_model_state(model, state)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.npz")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        load_checkpoint(tmp_path / "garbage.npz")
    np.savez(tmp_path / "plain.npz", weights=np.zeros(3))
    with pytest.raises(CheckpointError, match="not a minidetr checkpoint"):
        load_checkpoint(tmp_path / "plain.npz")
    # an object array would need pickle: refused, never unpickled
    with zipfile.ZipFile(tmp_path / "pickled.npz", "w") as z:
        with z.open("format.npy", "w") as f:
            np.lib.format.write_array(f, np.array('{"name": "minidetr-checkpoint", '
                                                  '"version": 1}'))
        with z.open("model/w.npy", "w") as f:
            np.lib.format.write_array(f, np.array([{"a": 1}], dtype=object),
                                      allow_pickle=True)
    with pytest.raises(CheckpointError, match="without pickle"):
        load_checkpoint(tmp_path / "pickled.npz")
    with pytest.raises(ValueError, match=".npz"):
        save_checkpoint(tmp_path / "x.pth", Checkpoint(model_state={"w": np.zeros(1)}))


def test_a_run_folder_means_its_last_checkpoint(tmp_path, small_config):
    *_, ckpt = _trained_checkpoint(small_config)
    save_checkpoint(tmp_path / "last.npz", ckpt)
    assert load_checkpoint(tmp_path).path == tmp_path / "last.npz"


@pytest.mark.shared
def test_convert_matches_the_official_key_list(shared_dir):
    """The released R50 checkpoint's 561 keys/shapes are exactly our paper model's."""
    arrays = {}
    for line in (shared_dir / "reference" / "official-state-dict-r50.txt").read_text().splitlines():
        key, shape = line.split(" ", 1)
        dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
        arrays[key] = np.zeros(dims, np.float32)
    arrays["total_ops"] = np.zeros(1)                     # thop counters are dropped
    ckpt, report = convert_official_state_dict(arrays, variant="plain", source="r50.pth")
    assert len(ckpt.model_state) == 561 and "total_ops" not in ckpt.model_state
    assert "every key and shape matches" in report
    assert ckpt.model_config["d_model"] == 256 and not ckpt.model_config["with_box_refine"]
    with pytest.raises(CheckpointError, match="transformer.decoder.bbox_embed.0.layers.0.weight"):
        convert_official_state_dict(arrays, variant="refine")


def test_saved_checkpoint_has_the_usual_file_permissions(tmp_path):
    import stat

    path = save_checkpoint(tmp_path / "ckpt.npz",
                           Checkpoint(model_state={"w": np.zeros(3, np.float32)}))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
