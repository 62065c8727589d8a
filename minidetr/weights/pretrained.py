"""Starting a model from pretrained weights: an ImageNet backbone, or a whole detector.

Two ways in, as users of the official code start (``train --backbone-weights`` and
``train --init-from`` call these):

* :func:`load_backbone_weights`: the official recipe. The ResNet body gets the ImageNet
  weights of a torchvision ``.pth`` or timm ``.safetensors`` file; its frozen batch norm
  uses the file's running statistics and affine parameters. The transformer and the heads
  keep their initialisation.
* :func:`init_from_detector`: fine-tuning. Every weight of a detector checkpoint (official
  ``.pth``, transformers ``.safetensors``/``.bin``, minidetr ``.npz``) whose name and shape
  match is loaded. When the number of classes differs, the class heads keep the model's own
  initialisation (the official one: default Linear weights, bias −log((1 − 0.01)/0.01) for a
  0.01 prior) and are listed. Any other mismatch -- another backbone, d_model, number of
  levels, queries or variant -- is an error naming each key and both shapes.

Both leave every array bit for bit as in the file and return a list of lines for the log.
"""
from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..models.backbone import load_torchvision_resnet
from .checkpoint import CheckpointError, load_checkpoint
from .convert import convert_backbone, convert_detector, fill_aliases
from .layouts import BODY

# Keys whose shape depends on the number of classes: the class heads (and their decoder
# aliases in two-stage).
CLASS_HEAD = re.compile(r"^(transformer\.decoder\.)?class_embed\.\d+\.(weight|bias)$")


def _body_of(model):
    """The backbone's body (ResNet or TinyBackbone) of a DeformableDETR."""
    return model.backbone[0].body


def load_backbone_weights(model, cfg, path):
    """Copy an ImageNet backbone file into ``model``'s backbone (see the module docstring).

    Raises:
        CheckpointError: unreadable file, a detector file, or a backbone other than
            ``cfg.backbone`` (the message names both).
    """
    ckpt, report = convert_backbone(path)
    name = ckpt.extra["backbone"]
    if name != cfg.backbone:
        raise CheckpointError(f"{path}: holds a {name} backbone, but the model is built with "
                              f"{cfg.backbone}; pick the --config whose backbone it is "
                              "(small: resnet18, paper: resnet50) or another file")
    body = OrderedDict((k[len(BODY):], v) for k, v in ckpt.model_state.items())
    if name == "tiny":
        expected = _body_of(model).state_dict()
        bad = [f"{k}: file {np.shape(body[k])} vs model {tuple(v.shape)}"
               for k, v in expected.items() if k in body and np.shape(body[k]) != v.shape]
        missing = [k for k in expected if k not in body]
        if bad or missing:
            raise CheckpointError(f"{path}: the TinyBackbone weights do not fit the model: "
                                  + "; ".join(bad + [f"{k} missing" for k in missing]))
        _body_of(model).load_state_dict(body, strict=True)
    else:
        try:
            load_torchvision_resnet(model.backbone, body, strict=True)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
    return report.lines() + [f"loaded {len(body)} backbone arrays into the {name} body "
                             "(frozen batch norm uses the file's statistics)"]


def _detector_checkpoint(path):
    path = Path(path)
    if path.suffix.lower() == ".npz" or path.is_dir() and (path / "last.npz").exists():
        ckpt = load_checkpoint(path)
        return ckpt, [f"read {ckpt.path} (minidetr checkpoint)"]
    ckpt, report = convert_detector(path)
    return ckpt, report.lines()


def detector_config(path):
    """The :class:`~minidetr.models.ModelConfig` of a detector checkpoint (recorded in a
    minidetr ``.npz``, inferred from the keys, args and config.json of any other file): the
    model ``train --init-from`` builds when no ``--config`` is given."""
    from ..models.config import ModelConfig

    ckpt, _ = _detector_checkpoint(path)
    if not ckpt.model_config:
        raise CheckpointError(f"{path}: records no model configuration; pass --config and "
                              "--variant")
    return ModelConfig.from_dict(ckpt.model_config)


def init_from_detector(model, cfg, path):
    """Load every matching weight of the detector checkpoint ``path`` into ``model``.

    Returns the log lines. Raises :class:`CheckpointError` for a mismatch other than the
    number of classes, listing every such key with both shapes.
    """
    ckpt, lines = _detector_checkpoint(path)
    state = OrderedDict(ckpt.model_state)
    fill_aliases(model, state)
    expected = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    heads, wrong = [], []
    for key, shape in expected.items():
        if key not in state:
            continue
        got = tuple(np.shape(state[key]))
        if got == shape:
            continue
        if CLASS_HEAD.match(key) and got[1:] == shape[1:]:
            heads.append(key)
        else:
            wrong.append(f"{key}: checkpoint {got} vs model {shape}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if wrong or missing or unexpected:
        problems = []
        if wrong:
            problems.append(f"{len(wrong)} keys with other shapes: " + "; ".join(wrong[:12])
                            + (" ..." if len(wrong) > 12 else ""))
        if missing:
            problems.append(f"{len(missing)} keys the model has and the checkpoint lacks: "
                            + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""))
        if unexpected:
            problems.append(f"{len(unexpected)} keys the checkpoint has and the model lacks: "
                            + ", ".join(unexpected[:8]) + (" ..." if len(unexpected) > 8 else ""))
        raise CheckpointError(f"--init-from {path} does not fit this model (only the number of "
                              "classes may differ when fine-tuning):\n  " + "\n  ".join(problems)
                              + "\n  Build the model the checkpoint was trained with (--config, "
                              "--variant).")
    loaded = OrderedDict((k, v) for k, v in state.items() if k not in heads)
    model.load_state_dict(loaded, strict=False)
    lines.append(f"initialised {len(loaded)} of {len(expected)} arrays from {path}")
    if heads:
        got = np.shape(state[heads[0]])[0]
        lines.append(f"the checkpoint has {got} classes and the model {cfg.num_classes}: "
                     f"{len(heads)} class-head arrays keep the official initialisation "
                     f"({', '.join(heads[:4])}{' ...' if len(heads) > 4 else ''})")
    return lines


def load_pretrained(model, cfg, train_cfg):
    """Apply a :class:`~minidetr.training.config.TrainConfig`'s ``backbone_weights`` and
    ``init_from`` (either, both -- the detector last -- or neither) to a new model.

    Returns the log lines (none without pretrained weights).
    """
    lines = []
    if getattr(train_cfg, "backbone_weights", None):
        lines += load_backbone_weights(model, cfg, train_cfg.backbone_weights)
    if getattr(train_cfg, "init_from", None):
        lines += init_from_detector(model, cfg, train_cfg.init_from)
    return lines


__all__ = ["load_backbone_weights", "init_from_detector", "load_pretrained",
           "detector_config", "CLASS_HEAD"]
