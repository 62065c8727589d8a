"""Which weights a file holds, and their names as the official code (= minidetr) spells them.

minidetr's state-dict keys are the official Deformable DETR keys, so every file is first
translated into those names; the rest of the package never sees another naming. Four
layouts are recognised from the keys alone (:func:`detect_layout`):

==================  =====================================================================
layout              what the keys look like
==================  =====================================================================
``official``        ``backbone.0.body.*``, ``transformer.*``, ``input_proj.*``,
                    ``class_embed.*``, ``bbox_embed.*``, ``query_embed.weight``: the
                    released checkpoints' ``"model"`` entry, and minidetr's own state dict
``transformers``    ``model.*`` plus the heads: transformers' ``DeformableDetrForObjectDetection``,
                    in either naming generation (see below)
``resnet``          ``conv1.weight``, ``bn1.*``, ``layer1.0.conv1.weight``, ..., ``fc.*``: an
                    ImageNet ResNet-18/34/50 as torchvision (``.pth``) and timm
                    (``.safetensors``) publish it (both use the same names)
``tiny-backbone``   ``stem.*``, ``layer1..4.*``: a :class:`~minidetr.models.backbone.TinyBackbone`
==================  =====================================================================

transformers' two naming generations. The hub files ``SenseTime/deformable-detr``,
``-with-box-refine`` and ``-with-box-refine-two-stage`` were written in 2022 by
transformers' ``convert_deformable_detr_to_pytorch.py`` (its ``rename_key`` and
``read_in_q_k_v``) with a timm ResNet-50 backbone; transformers 5 renames some of them on
load (``conversion_mapping.py``, entry ``"deformable_detr"``) and writes the new names:

=============================================  ==========================================  ==================================
official                                       hub files (transformers 4)                  transformers 5
=============================================  ==========================================  ==================================
``backbone.0.body.<timm/torchvision name>``    ``model.backbone.conv_encoder.model.<name>``  ``model.backbone.model.<name>``
  (an HF ``ResNetBackbone`` instead of timm)   ``...conv_encoder.model.embedder...``         ``model.backbone.model.embedder...``
``transformer.X`` (level_embed, reference_     ``model.X``                                 ``model.X``
points, enc_output(_norm), pos_trans(_norm))
``query_embed.weight``                         ``model.query_position_embeddings.weight``  same
``input_proj.*``                               ``model.input_proj.*``                      same
encoder ``norm1`` / ``norm2``                  ``self_attn_layer_norm`` / ``final_layer_norm``  same
encoder/decoder ``linear1`` / ``linear2``      ``fc1`` / ``fc2``                           ``mlp.fc1`` / ``mlp.fc2``
decoder ``cross_attn``                         ``encoder_attn``                            same
decoder ``norm1`` / ``norm2`` / ``norm3``      ``encoder_attn_layer_norm`` /               same
                                               ``self_attn_layer_norm`` / ``final_layer_norm``
decoder ``self_attn.in_proj_{weight,bias}``    rows split into ``self_attn.{q,k,v}_proj``  same
decoder ``self_attn.out_proj``                 ``self_attn.out_proj``                      ``self_attn.o_proj``
``transformer.decoder.{bbox,class}_embed.i``   ``model.decoder.{bbox,class}_embed.i``      same
``class_embed.i``, ``bbox_embed.i``            unchanged                                   unchanged
=============================================  ==========================================  ==================================

Translating is a pure renaming (plus concatenating q, k, v back into ``in_proj``): the
arrays are the file's, bit for bit. Shared tensors that a writer stored once (safetensors
keeps one name per tensor; transformers 5 drops tied copies) are restored from the model's
own list of aliases by :func:`minidetr.weights.convert.fill_aliases`.
"""
from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np

LAYOUTS = ("official", "transformers", "resnet", "tiny-backbone")

# Entries of a PyTorch state dict that are no weights: thop's counters, and BatchNorm's
# step counter (FrozenBatchNorm2d has none; torchvision's ImageNet files do).
NON_WEIGHT_SUFFIXES = ("total_params", "total_ops", "num_batches_tracked")
BODY = "backbone.0.body."


class LayoutError(ValueError):
    """The keys of a weights file fit none of the known layouts, or break one."""


# --------------------------------------------------------------------------- detection
def detect_layout(keys) -> str:
    """The layout (one of :data:`LAYOUTS`) of a state dict's ``keys``.

    Raises:
        LayoutError: the keys fit none of them (the message shows a few).
    """
    keys = [k for k in keys if not k.endswith(NON_WEIGHT_SUFFIXES)]
    if not keys:
        raise LayoutError("the file holds no weights")
    if any(k.startswith(("transformer.", "input_proj.")) for k in keys) or \
            any(k.startswith(BODY) for k in keys):
        return "official"
    if any(k.startswith("model.") for k in keys) and \
            any(k.startswith(("model.encoder.", "model.input_proj.", "model.backbone."))
                for k in keys):
        return "transformers"
    if "conv1.weight" in keys and any(k.startswith("layer1.0.") for k in keys):
        return "resnet"
    if any(k.startswith("stem.conv.") for k in keys):
        return "tiny-backbone"
    shown = ", ".join(sorted(keys)[:6])
    raise LayoutError(f"the keys fit no known layout (official Deformable DETR, transformers' "
                      f"DeformableDetrForObjectDetection, an ImageNet ResNet): {shown}, ... "
                      f"({len(keys)} keys)")


def transformers_naming(keys) -> str:
    """"hub (transformers 4)" or "transformers 5": which naming generation ``keys`` use."""
    old = any(".conv_encoder." in k or re.search(r"layers\.\d+\.fc[12]\.", k)
              or ".self_attn.out_proj." in k for k in keys)
    return "hub (transformers 4)" if old else "transformers 5"


# --------------------------------------------------------------------------- resnet
# transformers' own ResNet (AutoBackbone) names -> torchvision's.
_HF_RESNET_NORM = {"convolution": "conv", "normalization": "bn"}
_HF_SHORTCUT = {"convolution": "0", "normalization": "1"}


def hf_resnet_to_torchvision(rest: str) -> str:
    """A transformers ``ResNetBackbone`` key (after ``model.``) as the torchvision name.

    ``embedder.embedder.convolution.weight`` -> ``conv1.weight``;
    ``encoder.stages.i.layers.j.layer.k.normalization.bias`` -> ``layer{i+1}.j.bn{k+1}.bias``;
    ``encoder.stages.i.layers.j.shortcut.convolution.weight`` -> ``layer{i+1}.j.downsample.0.weight``.
    A key in torchvision/timm form already is returned unchanged.
    """
    m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(\w+)", rest)
    if m:
        return f"{_HF_RESNET_NORM[m[1]]}1.{m[2]}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\."
                     r"(convolution|normalization)\.(\w+)", rest)
    if m:
        return f"layer{int(m[1]) + 1}.{m[2]}.{_HF_RESNET_NORM[m[4]]}{int(m[3]) + 1}.{m[5]}"
    m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\."
                     r"(convolution|normalization)\.(\w+)", rest)
    if m:
        return f"layer{int(m[1]) + 1}.{m[2]}.downsample.{_HF_SHORTCUT[m[3]]}.{m[4]}"
    return rest


def torchvision_to_hf_resnet(rest: str) -> str:
    """The inverse of :func:`hf_resnet_to_torchvision`: a torchvision ResNet key as
    transformers' ``ResNetBackbone`` names it (``layer2.0.downsample.1.bias`` ->
    ``encoder.stages.1.layers.0.shortcut.normalization.bias``)."""
    conv = {"conv": "convolution", "bn": "normalization"}
    m = re.fullmatch(r"(conv|bn)1\.(\w+)", rest)
    if m:                                                    # the stem
        return f"embedder.embedder.{conv[m[1]]}.{m[2]}"
    m = re.fullmatch(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(\w+)", rest)
    if m:                                                    # conv k of block j of layer i
        return (f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.layer.{int(m[4]) - 1}."
                f"{conv[m[3]]}.{m[5]}")
    m = re.fullmatch(r"layer(\d)\.(\d+)\.downsample\.([01])\.(\w+)", rest)
    if m:                                                    # the projection shortcut
        part = {"0": "convolution", "1": "normalization"}[m[3]]
        return f"encoder.stages.{int(m[1]) - 1}.layers.{m[2]}.shortcut.{part}.{m[4]}"
    raise LayoutError(f"no transformers ResNet name for backbone key {rest!r}")


def resnet_depth(keys) -> str:
    """"resnet18", "resnet34" or "resnet50" from torchvision-style keys (block counts and
    whether blocks have a third convolution); LayoutError for anything else."""
    blocks = []
    for layer in (1, 2, 3, 4):
        ids = {int(m[1]) for k in keys if (m := re.match(rf"layer{layer}\.(\d+)\.", k))}
        blocks.append(len(ids))
    bottleneck = any(re.match(r"layer1\.0\.conv3\.", k) for k in keys)
    known = {((2, 2, 2, 2), False): "resnet18", ((3, 4, 6, 3), False): "resnet34",
             ((3, 4, 6, 3), True): "resnet50"}
    name = known.get((tuple(blocks), bottleneck))
    if name is None:
        raise LayoutError(f"a ResNet with {blocks} blocks per stage"
                          f"{' (bottleneck)' if bottleneck else ''} is none of ResNet-18/34/50")
    return name


def backbone_to_official(arrays, source_layout):
    """An ImageNet backbone file (``resnet`` or ``tiny-backbone`` layout) -> official names.

    Returns ``(state, dropped)``: ``state`` maps ``backbone.0.body.<name>`` to the arrays
    (the classifier ``fc.*`` and BatchNorm's ``num_batches_tracked`` are dropped, as the
    official backbone has neither); ``dropped`` lists ``(key, reason)``.
    """
    state, dropped = OrderedDict(), []
    for key, value in arrays.items():
        if key.endswith("num_batches_tracked"):
            dropped.append((key, "BatchNorm's step counter (frozen BN has none)"))
        elif source_layout == "resnet" and key.startswith("fc."):
            dropped.append((key, "the ImageNet classifier (the detector has no use for it)"))
        else:
            state[BODY + key] = value
    return state, dropped


# --------------------------------------------------------------------------- transformers
# The modules of an encoder/decoder layer that transformers 5 names otherwise:
# (which layers, official name, transformers 5 name). Each key holds one of them at most.
_LAYER_RENAMES = [
    ("encoder", "norm1", "self_attn_layer_norm"),
    ("encoder", "norm2", "final_layer_norm"),
    ("encoder|decoder", "linear1", "mlp.fc1"),
    ("encoder|decoder", "linear2", "mlp.fc2"),
    ("decoder", "cross_attn", "encoder_attn"),
    ("decoder", "norm1", "encoder_attn_layer_norm"),
    ("decoder", "norm2", "self_attn_layer_norm"),
    ("decoder", "norm3", "final_layer_norm"),
    ("decoder", "self_attn.out_proj", "self_attn.o_proj"),
]


def _rename_layer_module(rest, to_transformers):
    """``encoder.layers.3.norm1.weight`` <-> ``encoder.layers.3.self_attn_layer_norm.weight``
    (a key after ``transformer.`` / ``model.``); other keys unchanged."""
    for layers, official, hf in _LAYER_RENAMES:
        old, new = (official, hf) if to_transformers else (hf, official)
        renamed, count = re.subn(rf"^({layers})\.layers\.(\d+)\.{re.escape(old)}\.",
                                 rf"\1.layers.\2.{new}.", rest)
        if count:
            return renamed
    return rest


def _hub_to_transformers5(rest):
    """The hub-era names of a layer module -> transformers 5's (``fc1`` -> ``mlp.fc1``,
    the decoder self-attention's ``out_proj`` -> ``o_proj``), as its conversion_mapping."""
    rest = re.sub(r"^(encoder|decoder)\.layers\.(\d+)\.fc([12])\.", r"\1.layers.\2.mlp.fc\3.",
                  rest)
    return re.sub(r"^decoder\.layers\.(\d+)\.self_attn\.out_proj\.",
                  r"decoder.layers.\1.self_attn.o_proj.", rest)


def _transformers5_to_hub(rest):
    rest = re.sub(r"\.mlp\.fc([12])\.", r".fc\1.", rest)
    return rest.replace(".self_attn.o_proj.", ".self_attn.out_proj.")


_TRANSFORMER_TOP = ("level_embed", "reference_points.", "enc_output.", "enc_output_norm.",
                    "pos_trans.", "pos_trans_norm.", "encoder.", "decoder.")
_QKV = re.compile(r"^decoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def transformers_to_official(arrays):
    """transformers' ``DeformableDetrForObjectDetection`` state dict -> official names.

    Both naming generations are accepted (see the module docstring). The decoder's
    ``q_proj``, ``k_proj`` and ``v_proj`` are stacked row-wise, in that order, into
    ``in_proj_weight`` / ``in_proj_bias`` (the rows ``read_in_q_k_v`` split).

    Returns ``(state, dropped)``. Raises :class:`LayoutError` naming any key it cannot place.
    """
    state, dropped, qkv, unknown = OrderedDict(), [], {}, []
    for key, value in arrays.items():
        if key.endswith(NON_WEIGHT_SUFFIXES):
            dropped.append((key, "not a weight (a counter)"))
            continue
        if key.startswith(("class_embed.", "bbox_embed.")):
            state[key] = value
            continue
        if not key.startswith("model."):
            unknown.append(key)
            continue
        rest = key[len("model."):]
        if rest.startswith("backbone."):
            body = re.sub(r"^backbone\.(conv_encoder\.)?model\.", "", rest)
            if body == rest:
                unknown.append(key)
                continue
            state[BODY + hf_resnet_to_torchvision(body)] = value
            continue
        if rest == "query_position_embeddings.weight":
            state["query_embed.weight"] = value
            continue
        if rest.startswith("input_proj."):
            state[rest] = value
            continue
        if not rest.startswith(_TRANSFORMER_TOP):
            unknown.append(key)
            continue
        m = _QKV.match(rest)
        if m:
            qkv.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        state["transformer." + _rename_layer_module(_hub_to_transformers5(rest), False)] = value
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            raise LayoutError(f"decoder layer {layer}: self-attention {kind} has only "
                              f"{sorted(parts)} of q_proj, k_proj, v_proj")
        state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{kind}"] = \
            np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)   # (3C, C) | (3C,)
    if unknown:
        raise LayoutError(f"{len(unknown)} keys have no official counterpart: "
                          + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else ""))
    return state, dropped


def official_to_transformers(state, naming="transformers 5", backbone="timm"):
    """Official (minidetr) names -> transformers' names, the inverse of
    :func:`transformers_to_official`. ``naming`` is "transformers 5" or "hub (transformers
    4)"; ``backbone`` "timm" keeps the torchvision/timm names of a timm ResNet,
    "transformers" gives transformers' own ``ResNetBackbone`` names."""
    old = naming.startswith("hub")
    out = OrderedDict()
    for key, value in state.items():
        if key.startswith(BODY):
            body = key[len(BODY):]
            if backbone == "transformers":
                body = torchvision_to_hf_resnet(body)
            out[("model.backbone.conv_encoder.model." if old else "model.backbone.model.")
                + body] = value
        elif key == "query_embed.weight":
            out["model.query_position_embeddings.weight"] = value
        elif key.startswith("input_proj."):
            out["model." + key] = value
        elif key.startswith("transformer."):
            rest = key[len("transformer."):]
            m = re.fullmatch(r"decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)", rest)
            if m:                                    # rows [Wq; Wk; Wv] -> q, k, v
                for name, part in zip("qkv", np.split(value, 3, axis=0)):
                    out[f"model.decoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
                continue
            rest = _rename_layer_module(rest, True)
            out["model." + (_transformers5_to_hub(rest) if old else rest)] = value
        else:
            out[key] = value
    return out


def to_official(arrays, layout=None):
    """Any detector layout -> ``(state, dropped, layout)`` in official names.

    ``layout`` defaults to :func:`detect_layout`. Backbone-only layouts are refused here
    (use :func:`backbone_to_official`).
    """
    layout = layout or detect_layout(arrays)
    if layout == "official":
        state, dropped = OrderedDict(), []
        for key, value in arrays.items():
            if key.endswith(NON_WEIGHT_SUFFIXES):
                dropped.append((key, "not a weight (a counter)"))
            else:
                state[key] = value
        return state, dropped, layout
    if layout == "transformers":
        return (*transformers_to_official(arrays), layout)
    raise LayoutError(f"this file holds a backbone only ({layout}), not a detector: use it "
                      "with `train --backbone-weights`")


__all__ = ["LAYOUTS", "LayoutError", "detect_layout", "transformers_naming", "to_official",
           "transformers_to_official", "official_to_transformers", "backbone_to_official",
           "hf_resnet_to_torchvision", "torchvision_to_hf_resnet", "resnet_depth",
           "NON_WEIGHT_SUFFIXES"]
