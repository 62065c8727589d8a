"""convert-checkpoint on a real PyTorch .pth (runs only where torch is installed).

The file is made the way the official ``main.py`` saves: a dict with ``model`` (the state
dict, with thop's ``total_params`` counter mixed in), ``optimizer``, ``epoch`` and ``args``
(an ``argparse.Namespace``). Shared heads and decoder aliases hold identical values, as in
the released checkpoints.
"""
import argparse

import numpy as np
import pytest

from minidetr.cli import main
from minidetr.models import build_model, get_config
from minidetr.weights.checkpoint import load_checkpoint, load_model_state

torch = pytest.importorskip("torch", reason="torch not installed (needed only to read .pth)")


@pytest.mark.parametrize("variant", ["plain", "two-stage"])
def test_convert_released_style_checkpoint(tmp_path, variant):
    cfg = get_config("paper", variant)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    for _, p in model.named_parameters():            # unique tensors: aliases stay equal
        p.data += rng.normal(0, 0.01, p.shape).astype(p.dtype)
    state = model.state_dict()
    pth = tmp_path / "official.pth"
    torch.save({"model": {**{k: torch.from_numpy(v.copy()) for k, v in state.items()},
                          "total_params": torch.tensor([1.0])},
                "optimizer": {}, "epoch": 49, "args": argparse.Namespace(lr=2e-4)}, pth)

    npz = tmp_path / "converted.npz"
    assert main(["convert-checkpoint", str(pth), str(npz), "--variant", variant]) == 0
    fresh = build_model(cfg)
    load_model_state(fresh, load_checkpoint(npz), cfg.to_dict())
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    worst = max(float(np.abs(loaded[k] - state[k]).max()) for k in state)
    assert worst == 0.0, f"converted weights differ from the originals by up to {worst}"
