"""Opening a weights file of any supported format, without PyTorch.

=======================  ================================================================
file                     read by
=======================  ================================================================
``*.pth`` / ``*.pt`` /   :func:`minidetr.weights.pth.load_pth`: both ``torch.save`` layouts
``*.bin``                (zip and legacy), through a restricted unpickler that runs no code
``*.safetensors``        the ``safetensors`` package's NumPy API
``*.npz``                minidetr's own checkpoint format (:mod:`.checkpoint`)
a folder                 a transformers/hub folder: its ``model.safetensors`` (or
                         ``pytorch_model.bin``) and ``config.json``; or a minidetr run
                         folder (its ``best.npz``, else ``last.npz``)
=======================  ================================================================

:func:`open_weights` returns a :class:`WeightsSource`: the state dict (key -> NumPy array,
in the file's own names) and what came with it -- an official checkpoint's ``args`` and
``epoch``, a hub folder's ``config.json``. Which layout the names follow is decided later
(:mod:`.layouts`).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError

PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class WeightsSource:
    """The contents of a weights file, before any renaming.

    Attributes:
        path: the file read.
        format: "pth", "safetensors" or "npz".
        arrays: OrderedDict key -> NumPy array (the state dict, the file's names).
        args: an official checkpoint's ``args`` (a dict), or None.
        epoch: an official checkpoint's ``epoch``, or None.
        hf_config: a transformers ``config.json`` found beside the file, or None.
        checkpoint: the :class:`~minidetr.weights.checkpoint.Checkpoint` of an ``.npz``.
        ignored: top-level entries of the file that are not the state dict (names).
    """

    path: Path
    format: str
    arrays: "OrderedDict[str, np.ndarray]"
    args: dict | None = None
    epoch: int | None = None
    hf_config: dict | None = None
    checkpoint: object = None
    ignored: list = field(default_factory=list)


def _resolve(path: Path) -> Path:
    """A folder -> the weights file inside it (hub folder or run folder)."""
    if not path.is_dir():
        return path
    for name in HUB_WEIGHT_FILES + ("best.npz", "last.npz"):
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"{path}: a folder with none of {', '.join(HUB_WEIGHT_FILES)} "
                          "(a transformers folder) or best.npz / last.npz (a minidetr run)")


def _state_dict_of(obj, path):
    """The state dict inside a loaded ``.pth`` object, plus (args, epoch, ignored)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    args = epoch = None
    ignored = []
    state = obj
    for wrapper in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj.get(wrapper), dict):
            state = obj[wrapper]
            ignored = [k for k in obj if k != wrapper]
            args = obj.get("args") if isinstance(obj.get("args"), dict) else None
            epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
            break
    arrays = OrderedDict()
    for key, value in state.items():
        if isinstance(value, np.ndarray):
            arrays[str(key)] = value
        else:
            ignored.append(str(key))
    if not arrays:
        raise CheckpointError(f"{path}: no arrays in its state dict (top-level entries: "
                              f"{', '.join(map(str, list(obj)[:8]))})")
    return arrays, args, epoch, ignored


def _hf_config_beside(path: Path):
    config = path.parent / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{config}: not readable JSON ({e})") from None


def open_weights(path) -> WeightsSource:
    """Read the weights file (or folder) ``path``; see the module docstring.

    Raises:
        CheckpointError: the file is missing, of an unknown kind, truncated or corrupt,
            or (``.pth``) its pickle asks for something other than tensors and plain data.
    """
    from .pth import PthError, load_pth

    path = _resolve(Path(path))
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        from .checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        return WeightsSource(path, "npz", ckpt.model_state, checkpoint=ckpt)
    if suffix == ".safetensors":
        from .safetensors_io import load_safetensors

        try:
            arrays = load_safetensors(path)
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        return WeightsSource(path, "safetensors", OrderedDict(arrays),
                             hf_config=_hf_config_beside(path))
    if suffix in PTH_SUFFIXES:
        try:
            obj = load_pth(path)
        except PthError as e:
            raise CheckpointError(str(e)) from None
        arrays, args, epoch, ignored = _state_dict_of(obj, path)
        return WeightsSource(path, "pth", arrays, args=args, epoch=epoch,
                             hf_config=_hf_config_beside(path), ignored=ignored)
    raise CheckpointError(f"{path}: unknown weights format {suffix or '(no suffix)'!r}; "
                          "minidetr reads .pth/.pt/.bin (PyTorch), .safetensors and .npz")


__all__ = ["WeightsSource", "open_weights", "PTH_SUFFIXES"]
