"""Official Deformable DETR checkpoints -> minidetr: checking and converting their weights.

The released checkpoints (fundamentalvision/Deformable-DETR) store the model's state dict
under ``"model"``, and its keys are exactly minidetr's: the ``paper`` preset with 91
classes has the same 561 (plain), 597 (refine) and 630 (two-stage) keys and shapes, in
the same order (``shared/reference/official-state-dict-r50.txt``). Converting is
therefore dropping the entries that are no weights and checking every key and shape.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..models.build import build_model
from ..models.config import get_config
from .checkpoint import Checkpoint, CheckpointError, check_model_state

# Entries of a PyTorch state dict that are no weights (thop's counters; BatchNorm's step
# counter, which FrozenBatchNorm2d does not have).
_NON_WEIGHT_SUFFIXES = ("total_params", "total_ops", "num_batches_tracked")


def convert_official_state_dict(arrays, variant=None, source=None):
    """An official checkpoint's ``model`` state dict (as NumPy arrays) -> a :class:`Checkpoint`.

    The keys of the released checkpoints are exactly minidetr's, so this only drops
    non-weight entries and, with ``variant`` ("plain", "refine", "two-stage"), checks every
    key and shape against the ``paper`` model of that variant (raising
    :class:`CheckpointError` with the list of mismatches) and records its configuration,
    so ``eval``/``predict`` need no ``--config``. Returns ``(checkpoint, report)``.

    The arrays come from :func:`read_pth_state_dict` (or any other reader).
    """
    state = OrderedDict()
    dropped = []
    for key, value in arrays.items():
        if key.endswith(_NON_WEIGHT_SUFFIXES):
            dropped.append(key)
            continue
        value = np.asarray(value)
        if value.dtype.kind not in "fiub":
            raise CheckpointError(f"convert: entry {key!r} has dtype {value.dtype}, not numbers")
        state[key] = np.ascontiguousarray(value)
    if not state:
        raise CheckpointError("convert: the state dict holds no arrays")
    model_config = None
    report = [f"converted {len(state)} arrays"
              + (f" (dropped {len(dropped)} non-weight entries)" if dropped else "")]
    if variant is not None:
        cfg = get_config("paper", variant)
        check_model_state(build_model(cfg), state, "official checkpoint",
                          model_config=cfg.to_dict())
        model_config = cfg.to_dict()
        report.append(f"every key and shape matches the paper model, variant {variant!r}")
    else:
        report.append("not checked against a model (pass --variant plain|refine|two-stage)")
    ckpt = Checkpoint(model_state=state, model_config=model_config,
                      extra={"converted_from": source, "format": "official PyTorch state dict"})
    return ckpt, "; ".join(report)


def read_pth_state_dict(path) -> dict:
    """The state dict of a PyTorch ``.pth`` file as NumPy arrays (key -> array).

    A file holding ``{"model": state_dict, ...}`` (an official checkpoint) gives its
    ``"model"``; a bare state dict is returned as it is. This reader needs torch, the one
    place in minidetr that imports it; it reads the file with torch's restricted
    (weights-only) unpickler, allowing only ``argparse.Namespace`` beside tensors.

    Raises:
        CheckpointError: torch is not installed, the file is missing, or it holds no
            state dict.
    """
    import argparse

    path = Path(path)
    try:
        import torch
    except ImportError:
        raise CheckpointError("convert-checkpoint reads PyTorch .pth files and needs torch, "
                              "which is not installed (minidetr itself never needs it): pip "
                              "install torch (the CPU build is enough), then run this command "
                              "again") from None
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    # Official checkpoints also hold their argparse.Namespace; allow just that class.
    with torch.serialization.safe_globals([argparse.Namespace]):
        raw = torch.load(path, map_location="cpu", weights_only=True)
    state = raw["model"] if isinstance(raw, dict) and "model" in raw else raw
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict (or a dict with a 'model' "
                              f"entry), got {type(state).__name__}")
    return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}


__all__ = ["convert_official_state_dict", "read_pth_state_dict"]
