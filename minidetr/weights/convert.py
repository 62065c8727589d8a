"""Any supported weights file -> a minidetr :class:`~minidetr.weights.checkpoint.Checkpoint`.

Three steps, each in its own place:

1. **read** the file without PyTorch (:func:`minidetr.weights.sources.open_weights`);
2. **rename** its keys to the official names (:mod:`minidetr.weights.layouts`);
3. **fit** them to a model: find the :class:`~minidetr.models.ModelConfig` the weights
   belong to (:func:`infer_model_config`), restore the shared-head aliases a writer may
   have stored once (:func:`fill_aliases`), and check every key and shape against that
   model (:func:`~minidetr.weights.checkpoint.check_model_state`).

The arrays are never changed: a converted checkpoint holds the file's values bit for bit
(the decoder's q, k and v of a transformers file are stacked back into one array).

Entry points: :func:`convert_detector` (a whole detector), :func:`convert_backbone` (an
ImageNet ResNet), :func:`convert_file` (either, by what the file holds) and
:func:`load_weights` (a ``.npz`` as it is, anything else converted on the fly).
"""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..models.build import build_model
from ..models.config import PRESETS, VARIANTS, ModelConfig, get_config
from .checkpoint import Checkpoint, CheckpointError, check_model_state, load_checkpoint
from .layouts import (BODY, LayoutError, backbone_to_official, detect_layout, resnet_depth,
                      to_official, transformers_naming)
from .sources import WeightsSource, open_weights


@dataclass
class ConversionReport:
    """What a conversion found and did, for the user.

    Attributes:
        source: the file read; format: "pth", "safetensors" or "npz".
        layout: "official", "transformers", "resnet" or "tiny-backbone" (+ naming).
        kind: "detector" or "backbone".
        config: the ModelConfig the weights fit (a detector), or the backbone name.
        arrays: how many arrays the checkpoint holds.
        dropped: (key, reason) of entries left out.
        restored: aliases of shared heads that the file stored once, restored.
        notes: settings that were assumed (not in the file) and other remarks.
    """

    source: str
    format: str
    layout: str
    kind: str
    config: object = None
    arrays: int = 0
    dropped: list = field(default_factory=list)
    restored: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def lines(self) -> list:
        """The report as lines of text."""
        layout, _, naming = self.layout.partition(", ")
        out = [f"read {self.source} ({self.format}; {layout} layout"
               + (f", {naming}" if naming else "") + f"): {self.kind}"]
        if isinstance(self.config, ModelConfig):
            c = self.config
            out.append(f"  model: backbone {c.backbone}, d_model {c.d_model}, {c.nheads} heads, "
                       f"{c.enc_layers}+{c.dec_layers} layers, {c.num_feature_levels} levels, "
                       f"{c.n_points} points, {c.num_queries} queries, {c.num_classes} classes, "
                       f"variant {c.variant}")
        elif self.config:
            out.append(f"  backbone: {self.config}")
        out.append(f"  {self.arrays} arrays, bit for bit as in the file")
        if self.dropped:
            reasons = OrderedDict()
            for key, why in self.dropped:
                reasons.setdefault(why, []).append(key)
            for why, keys in reasons.items():
                shown = ", ".join(keys[:3]) + (f" ... ({len(keys)} in all)" if len(keys) > 3
                                               else "")
                out.append(f"  dropped {len(keys)}: {why}: {shown}")
        if self.restored:
            out.append(f"  restored {len(self.restored)} keys of shared heads that the file "
                       f"stores once (e.g. {self.restored[0]})")
        out.extend(f"  note: {n}" for n in self.notes)
        return out

    def __str__(self):
        return "\n".join(self.lines())


# --------------------------------------------------------------------------- model config
def _count(state, prefix):
    return len({int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))})


def _shape(state, key, where):
    if key not in state:
        raise CheckpointError(f"{where}: no {key!r}; cannot tell the model's size")
    return tuple(np.shape(state[key]))


def infer_variant(state) -> str:
    """"plain", "refine" or "two-stage" from official-named keys (and head values)."""
    if "transformer.enc_output.weight" in state:
        return "two-stage"
    if any(k.startswith("transformer.decoder.bbox_embed.") for k in state):
        return "refine"
    heads = sorted({int(m[1]) for k in state if (m := re.match(r"bbox_embed\.(\d+)\.", k))})
    first = {k[len("bbox_embed.0."):]: v for k, v in state.items() if k.startswith("bbox_embed.0.")}
    for i in heads[1:]:                 # independent heads (refine) hold different values
        for rest, value in first.items():
            other = state.get(f"bbox_embed.{i}.{rest}")
            if other is not None and not np.array_equal(other, value):
                return "refine"
    return "plain"


def _backbone_of(state, where):
    body = [k[len(BODY):] for k in state if k.startswith(BODY)]
    if any(k.startswith("stem.conv.") for k in body):
        c0 = _shape(state, BODY + "stem.conv.weight", where)[0]
        rest = [_shape(state, BODY + f"layer{i}.conv.weight", where)[0] for i in (2, 3, 4)]
        return "tiny", (c0, *rest)
    if not body:
        raise CheckpointError(f"{where}: no backbone weights ({BODY}...)")
    try:
        return resnet_depth(body), None
    except LayoutError as e:
        raise CheckpointError(f"{where}: {e}") from None


# ModelConfig fields the shapes decide, and those an official checkpoint's args can add.
_SHAPE_FIELDS = ("backbone", "tiny_channels", "d_model", "enc_layers", "dec_layers",
                 "dim_feedforward", "num_feature_levels", "num_queries", "num_classes",
                 "with_box_refine", "two_stage", "nheads", "n_points", "gn_groups")
_SETTING_FIELDS = ("dropout", "dilation", "aux_loss", "set_cost_class", "set_cost_bbox",
                   "set_cost_giou", "cls_loss_coef", "bbox_loss_coef", "giou_loss_coef",
                   "focal_alpha", "mask_aware_norm")


def infer_model_config(state, args=None, hf_config=None, variant=None, where="weights"):
    """The :class:`ModelConfig` whose model has the keys and shapes of ``state``.

    Sizes come from the shapes; what shapes cannot tell (the split of M x K between heads
    and points, dropout, dilation, the two-stage number of proposals, GroupNorm groups) comes
    from an official checkpoint's ``args``, a transformers ``config.json`` or, failing both,
    the preset with the same ``d_model`` (the official defaults for 256): those guesses are
    listed in the returned notes.

    Returns ``(config, notes)``. ``variant`` (when given) must agree with the keys.
    """
    args, hf = dict(args or {}), dict(hf_config or {})
    notes = []
    found = infer_variant(state)
    if variant is not None:
        variant = variant.replace("_", "-")
        if variant != found:
            need = {"refine": "transformer.decoder.bbox_embed.0.layers.0.weight",
                    "two-stage": "transformer.enc_output.weight"}.get(variant)
            detail = (f"it has no {need}" if need and need not in state else
                      "its keys are those of another variant")
            raise CheckpointError(f"{where}: --variant {variant} does not fit these weights "
                                  f"({detail}); they hold a {found} model")
    level_embed = _shape(state, "transformer.level_embed", where)          # (L, C)
    levels, d_model = level_embed
    backbone, tiny_channels = _backbone_of(state, where)
    enc_layers = _count(state, "transformer.encoder.layers.")
    dec_layers = _count(state, "transformer.decoder.layers.")
    ffn = _shape(state, "transformer.encoder.layers.0.linear1.weight", where)[0]
    heads = [k for k in ("class_embed.0.weight", "transformer.decoder.class_embed.0.weight")
             if k in state]
    num_classes = _shape(state, heads[0] if heads else "class_embed.0.weight", where)[0]
    mlk = _shape(state, "transformer.encoder.layers.0.self_attn.attention_weights.weight",
                 where)[0]                                                 # M * L * K

    nheads = args.get("nheads") or hf.get("encoder_attention_heads")
    if not nheads:                # the preset's heads for this d_model, else the most that fit
        same = [p["nheads"] for p in PRESETS.values() if p["d_model"] == d_model]
        nheads = next(m for m in same + [8, 4, 2, 1]
                      if d_model % m == 0 and (mlk // levels) % m == 0)
        notes.append(f"the number of heads is not in the file: assumed {nheads}, so "
                     f"{mlk // levels // nheads} sampling points (only heads x points = "
                     f"{mlk // levels} shows in the shapes); a file with its args or "
                     "config.json says which")
    if mlk % (nheads * levels):
        raise CheckpointError(f"{where}: attention_weights has {mlk} rows, not a multiple of "
                              f"{nheads} heads x {levels} levels")
    n_points = mlk // (nheads * levels)
    if variant is None:
        variant = found
    if "query_embed.weight" in state:
        num_queries = _shape(state, "query_embed.weight", where)[0]
    else:
        num_queries = (args.get("num_queries") or hf.get("two_stage_num_proposals")
                       or hf.get("num_queries"))
        if not num_queries:
            num_queries = 300
            notes.append("two-stage proposals (num_queries) are not in the file: assumed "
                         "300, the official default")
    # minidetr's own settings of the tiny backbone come from its preset; a ResNet model
    # has the official defaults (ModelConfig's)
    base = {k: v for k, v in PRESETS["tiny"].items() if k not in _SHAPE_FIELDS} \
        if backbone == "tiny" else {}
    fields = dict(base, backbone=backbone, d_model=d_model, nheads=int(nheads),
                  enc_layers=enc_layers, dec_layers=dec_layers, dim_feedforward=ffn,
                  num_feature_levels=levels, n_points=n_points, num_queries=int(num_queries),
                  num_classes=num_classes, **VARIANTS[variant])
    if tiny_channels:
        fields["tiny_channels"] = tuple(int(c) for c in tiny_channels)
    gn = args.get("gn_groups") or hf.get("gn_groups") or 32
    if d_model % gn:
        raise CheckpointError(f"{where}: d_model {d_model} is not a multiple of {gn} GroupNorm "
                              "groups; record gn_groups in the checkpoint's args")
    fields["gn_groups"] = int(gn)
    for name in _SETTING_FIELDS:           # what the shapes cannot tell, from the args
        if args.get(name) is not None and hasattr(ModelConfig, name):
            fields[name] = type(getattr(ModelConfig, name))(args[name])
    if hf.get("dilation") is not None and "dilation" not in fields:
        fields["dilation"] = bool(hf["dilation"])
    try:
        return ModelConfig(**fields).validate(), notes
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the weights describe no valid model ({e})") from None


# --------------------------------------------------------------------------- aliases
def fill_aliases(model, state):
    """Add to ``state`` the keys of shared tensors that it holds under another name only.

    The model knows which of its keys name one tensor (``class_embed.0..5`` of a plain
    model; ``bbox_embed.i`` and ``transformer.decoder.bbox_embed.i`` with refinement). A
    file that stored each tensor once (safetensors; transformers 5's tied weights) lacks
    the other names. Returns the keys added (in place).
    """
    groups = OrderedDict()
    for key, value in model._state_items():
        groups.setdefault(id(value), []).append(key)
    added = []
    for keys in groups.values():
        present = [k for k in keys if k in state]
        if present and len(present) < len(keys):
            for key in keys:
                if key not in state:
                    state[key] = state[present[0]]
                    added.append(key)
    return added


def _untie_transformers_heads(model, state):
    """transformers' ``DeformableDetrForObjectDetection`` ties ``class_embed.i`` and
    ``bbox_embed.i`` (i > 0) to head 0 (its ``_tied_weights_keys``), and ``save_pretrained``
    writes tied arrays once. Where the model has a head of which ``state`` holds neither
    the name nor its decoder alias, it is head 0's: copy it (in place); return the keys."""
    added = []
    for key in model.state_dict():
        m = re.fullmatch(r"(?:transformer\.decoder\.)?(class_embed|bbox_embed)\.(\d+)\.(.+)", key)
        if not m or key in state or int(m[2]) == 0:
            continue
        head, rest = m[1], m[3]
        if f"{head}.{m[2]}.{rest}" in state or f"transformer.decoder.{head}.{m[2]}.{rest}" in state:
            continue
        first = state.get(f"{head}.0.{rest}", state.get(f"transformer.decoder.{head}.0.{rest}"))
        if first is not None:
            state[key] = first
            added.append(key)
    return added


def _dtype_notes(model, state, where):
    """Refuse arrays of another kind than the model's (integers for weights); note
    floating dtypes other than the model's (kept as they are; cast when loaded)."""
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    wrong = [f"{k}: {np.asarray(v).dtype} (the model's is {expected[k]})"
             for k, v in state.items() if k in expected
             and np.asarray(v).dtype.kind != expected[k].kind]
    if wrong:
        raise CheckpointError(f"{where}: {len(wrong)} arrays are not floating point like the "
                              "model's weights: " + "; ".join(wrong[:6])
                              + (" ..." if len(wrong) > 6 else ""))
    other = sorted({np.asarray(v).dtype.name for k, v in state.items()
                    if np.asarray(v).dtype != expected.get(k, np.asarray(v).dtype)})
    if other:
        return [f"stored as {', '.join(other)}: kept so in the checkpoint (bit for bit); "
                "cast to the model's float32 when loaded"]
    return []


def _ordered(model, state):
    """``state`` in the model's key order (keys the model lacks keep their place at the end)."""
    order = list(model.state_dict().keys())
    out = OrderedDict((k, state[k]) for k in order if k in state)
    out.update((k, v) for k, v in state.items() if k not in out)
    return out


# --------------------------------------------------------------------------- conversions
def convert_detector(source, variant=None, config=None):
    """A detector's weights (official or transformers layout) -> ``(Checkpoint, report)``.

    Args:
        source: a path, or a :class:`~minidetr.weights.sources.WeightsSource`.
        variant: when given, checked against the keys.
        config: a preset name ("tiny", "small", "paper") to check the sizes against.

    Raises:
        CheckpointError: unreadable file, unknown layout, or weights that fit no model
            (the message names the keys and shapes at fault).
    """
    src = source if isinstance(source, WeightsSource) else open_weights(source)
    where = str(src.path)
    try:
        state, dropped, layout = to_official(src.arrays)
    except LayoutError as e:
        raise CheckpointError(f"{where}: {e}") from None
    naming = f", {transformers_naming(src.arrays)} names" if layout == "transformers" else ""
    cfg, notes = infer_model_config(state, src.args, src.hf_config, variant, where)
    if config is not None:
        preset = get_config(config, cfg.variant, num_classes=cfg.num_classes)
        differs = [f"{k}: file {getattr(cfg, k)!r} vs {config} {getattr(preset, k)!r}"
                   for k in ("backbone", "d_model", "nheads", "enc_layers", "dec_layers",
                             "dim_feedforward", "num_feature_levels", "n_points")
                   if getattr(cfg, k) != getattr(preset, k)]
        if differs:
            raise CheckpointError(f"{where}: these weights are not the {config!r} preset: "
                                  + "; ".join(differs))
    model = build_model(cfg)
    restored = fill_aliases(model, state)
    untied = _untie_transformers_heads(model, state) if layout == "transformers" else []
    if untied:
        restored += fill_aliases(model, state)
        notes.append(f"transformers ties every prediction head to head 0 and writes it once: "
                     f"{len(untied)} arrays of heads 1.. copied from head 0 ({untied[0]}, ...)")
    check_model_state(model, state, f"weights in {where}", model_config=cfg.to_dict())
    notes += _dtype_notes(model, state, where)
    state = _ordered(model, state)
    report = ConversionReport(where, src.format, layout + naming, "detector", cfg, len(state),
                              dropped, restored, notes)
    if src.ignored:
        report.notes.append("not weights, left out: " + ", ".join(src.ignored[:8]))
    extra = {"converted_from": where, "format": src.format, "layout": layout + naming}
    if src.epoch is not None:
        extra["epoch"] = src.epoch
    return Checkpoint(model_state=state, model_config=cfg.to_dict(), extra=extra,
                      path=Path(where)), report


def convert_backbone(source):
    """An ImageNet ResNet (torchvision/timm) or TinyBackbone file -> ``(Checkpoint, report)``.

    The checkpoint holds ``backbone.0.body.*`` arrays only (``fc.*`` and
    ``num_batches_tracked`` dropped) and records ``{"backbone": name}`` in its ``extra``.
    """
    src = source if isinstance(source, WeightsSource) else open_weights(source)
    where = str(src.path)
    try:
        layout = detect_layout(src.arrays)
    except LayoutError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if layout in ("official", "transformers"):
        state, dropped, _ = to_official(src.arrays, layout)
        dropped += [(k, "not part of the backbone") for k in state if not k.startswith(BODY)]
        state = OrderedDict((k, v) for k, v in state.items() if k.startswith(BODY))
    elif layout in ("resnet", "tiny-backbone"):
        state, dropped = backbone_to_official(src.arrays, layout)
    else:                                              # pragma: no cover - LAYOUTS is closed
        raise CheckpointError(f"{where}: no backbone in a {layout} file")
    name, channels = _backbone_of(state, where)
    label = name + (f" {channels}" if channels else "")
    report = ConversionReport(where, src.format, layout, "backbone", label, len(state), dropped)
    return Checkpoint(model_state=state, extra={"converted_from": where, "format": src.format,
                                                "layout": layout, "backbone": name,
                                                "tiny_channels": channels},
                      path=Path(where)), report


def convert_file(source, variant=None, config=None):
    """:func:`convert_detector` or :func:`convert_backbone`, by what the file holds."""
    src = source if isinstance(source, WeightsSource) else open_weights(source)
    try:
        layout = detect_layout(src.arrays)
    except LayoutError as e:
        raise CheckpointError(f"{src.path}: {e}") from None
    if layout in ("resnet", "tiny-backbone"):
        if variant is not None or config is not None:
            raise CheckpointError(f"{src.path}: an ImageNet backbone, not a detector; "
                                  "--variant/--config do not apply")
        return convert_backbone(src)
    return convert_detector(src, variant, config)


def load_weights(path, variant=None, config=None):
    """The :class:`Checkpoint` of ``path``: a minidetr ``.npz`` (or run folder) as it is,
    any other file (``.pth``, ``.safetensors``, a hub folder) converted on the fly."""
    path = Path(path)
    if path.suffix.lower() == ".npz" or (path.is_dir() and any(
            (path / n).is_file() for n in ("last.npz", "best.npz"))):
        return load_checkpoint(path)
    ckpt, _ = convert_detector(path, variant, config)
    return ckpt


def convert_official_state_dict(arrays, variant=None, source=None):
    """An official ``model`` state dict (key -> array) -> ``(Checkpoint, report text)``:
    :func:`convert_detector` on arrays already in memory."""
    src = WeightsSource(Path(source or "state dict"), "arrays", OrderedDict(arrays))
    ckpt, report = convert_detector(src, variant)
    return ckpt, "\n".join(report.lines() + [
        f"every key and shape matches the {report.config.variant} model"])


__all__ = ["ConversionReport", "convert_detector", "convert_backbone", "convert_file",
           "load_weights", "infer_model_config", "infer_variant", "fill_aliases",
           "convert_official_state_dict"]
