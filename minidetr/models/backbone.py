"""The CNN backbone: ResNet-18/34/50 with frozen batch norm, a tiny CNN, and the wrappers.

Deformable DETR reads an image through a ResNet and keeps three of its feature maps:

=======  ==========  ======  ==========================  =========================
level    ResNet      stride  channels (ResNet-18/34)     channels (ResNet-50)
=======  ==========  ======  ==========================  =========================
C3       ``layer2``  8       128                         512
C4       ``layer3``  16      256                         1024
C5       ``layer4``  32      512                         2048
=======  ==========  ======  ==========================  =========================

(The fourth, stride-64 level of the paper is *not* made here: the detector makes it from
C5 with a strided 3x3 convolution, see ``DeformableDETR.input_proj``.) Each level also
gets its own padding mask, the image mask resized by nearest interpolation
(:func:`interpolate_mask`), and its sine position embedding
(:mod:`minidetr.models.position_encoding`).

The module tree and its names follow the official code, so a state dict reads exactly
like the released checkpoint::

    Joiner                         backbone             (an nn.Sequential)
      [0] Backbone                 backbone.0
            .body  ResNet          backbone.0.body.conv1.weight, .bn1.running_mean,
                                   .layer1.0.conv1.weight, .layer2.0.downsample.0.weight ...
      [1] PositionEmbeddingSine    backbone.1          (no parameters, no keys)

What is here:

* :class:`BasicBlock`, :class:`Bottleneck`, :class:`ResNet` (``resnet18``, ``resnet34``,
  ``resnet50``): torchvision's architecture ("v1.5": the stride of a bottleneck is in its
  3x3 ``conv2``) with :class:`~minidetr.nn.FrozenBatchNorm2d` everywhere, no ``avgpool``
  and no ``fc``. ``dilation=True`` gives the DC5 variant (``layer4`` dilated instead of
  strided, so C5 has stride 16).
* :class:`TinyBackbone`: a five-stage CNN with GroupNorm (a minidetr addition, not in the
  paper) that gives the same three strides with small channel counts, for CPU runs.
* :class:`Backbone`: holds a body, freezes what the official recipe freezes and returns
  the chosen levels with their masks.
* :class:`Joiner`: ``[Backbone, PositionEmbeddingSine]``; returns features, masks and
  position embeddings per level.
* :func:`build_backbone`: the factory used by the model builder.
* :func:`load_torchvision_resnet`: copies torchvision ImageNet weights (as arrays) in,
  with a report of missing, unexpected and mis-shaped keys.

Freezing. As in the official code, every parameter whose name contains none of
``layer2``, ``layer3``, ``layer4`` (the stem ``conv1`` and all of ``layer1``) gets
``requires_grad = False``, and with ``train_backbone=False`` (official: ``lr_backbone <= 0``)
every parameter does. Batch norm is always frozen (its four arrays are buffers). A frozen
part costs no memory for the backward pass: the autograd engine records no graph for an
operation none of whose inputs requires grad, so the stem and ``layer1`` run as if under
``no_grad``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .. import functional as F
from .. import nn
from ..autograd import Tensor
from ..backend import get_array_module, is_cupy_array
from .position_encoding import PositionEmbeddingSine

LAYER_NAMES = ("layer1", "layer2", "layer3", "layer4")
# The official multi-scale choice (C3-C5) and the single-scale one (C5 only).
MULTI_SCALE_LAYERS = ("layer2", "layer3", "layer4")
SINGLE_SCALE_LAYERS = ("layer4",)


# --------------------------------------------------------------------------- ResNet
def _conv(in_channels, out_channels, kernel_size, stride=1, dilation=1, rng=None):
    """A bias-free convolution with "same" padding and torchvision's ResNet init.

    torchvision initialises ResNet convolutions with ``kaiming_normal_(mode="fan_out",
    nonlinearity="relu")``: N(0, 2 / fan_out), fan_out = out_channels * kh * kw.
    """
    padding = dilation * (kernel_size - 1) // 2
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                     dilation=dilation, bias=False, rng=rng)
    _, fan_out = nn.init.calculate_fan_in_and_fan_out(conv.weight.shape)
    nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / fan_out), rng=rng)
    return conv


def _downsample(in_channels, out_channels, stride, rng):
    """The projection shortcut: 1x1 conv (strided) + frozen BN, keys ``downsample.0/1``."""
    return nn.Sequential(_conv(in_channels, out_channels, 1, stride=stride, rng=rng),
                         nn.FrozenBatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut (ResNet-18/34).

    Shapes:
        x (B, in_channels, H, W) -> (B, planes, H / stride, W / stride)
    """

    expansion = 1

    def __init__(self, in_channels, planes, stride=1, downsample=None, dilation=1, rng=None):
        super().__init__()
        if dilation != 1:
            raise NotImplementedError("BasicBlock: dilation > 1 is not supported (as in "
                                      "torchvision); DC5 needs ResNet-50")
        self.conv1 = _conv(in_channels, planes, 3, stride=stride, rng=rng)
        self.bn1 = nn.FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, rng=rng)
        self.bn2 = nn.FrozenBatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x), relu=True)                 # relu(bn1(conv1(x)))
        # relu(bn2(conv2(out)) + shortcut): the batch norm, the addition and the ReLU run
        # as one Function (FrozenBatchNorm2d.forward)
        return self.bn2(self.conv2(out), residual=shortcut, relu=True)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, possibly dilated), 1x1 expand by 4, and a shortcut (ResNet-50).

    The stride sits in the 3x3 ``conv2`` (torchvision's "ResNet v1.5"), as in the
    official backbone.

    Shapes:
        x (B, in_channels, H, W) -> (B, 4 * planes, H / stride, W / stride)
    """

    expansion = 4

    def __init__(self, in_channels, planes, stride=1, downsample=None, dilation=1, rng=None):
        super().__init__()
        self.conv1 = _conv(in_channels, planes, 1, rng=rng)
        self.bn1 = nn.FrozenBatchNorm2d(planes)
        self.conv2 = _conv(planes, planes, 3, stride=stride, dilation=dilation, rng=rng)
        self.bn2 = nn.FrozenBatchNorm2d(planes)
        self.conv3 = _conv(planes, planes * self.expansion, 1, rng=rng)
        self.bn3 = nn.FrozenBatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.bn1(self.conv1(x), relu=True)                 # relu(bn1(conv1(x)))
        out = self.bn2(self.conv2(out), relu=True)               # relu(bn2(conv2(out)))
        # relu(bn3(conv3(out)) + shortcut), one fused Function (see BasicBlock)
        return self.bn3(self.conv3(out), residual=shortcut, relu=True)


# name -> (block, number of blocks in layer1..layer4)
RESNET_SPECS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


class ResNet(nn.Module):
    """A torchvision ResNet body with FrozenBatchNorm2d, without ``avgpool`` and ``fc``.

    Args:
        name: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        dilation: DC5; replace the stride of ``layer4`` by a dilation of 2 (ResNet-50 only).
        rng: NumPy Generator for the random init (kaiming normal, fan_out). Real runs
            overwrite it with ImageNet weights (:func:`load_torchvision_resnet`).

    Attributes:
        layer_channels, layer_strides: dicts ``{"layer1": ..., ..., "layer4": ...}``.

    Shapes:
        forward(x (B, 3, H, W), return_layers) -> one Tensor per returned layer,
        (B, layer_channels[name], ceil(H / stride), ceil(W / stride)) for ``layer1`` .. ``layer4``
    """

    def __init__(self, name="resnet50", dilation=False, rng=None):
        super().__init__()
        if name not in RESNET_SPECS:
            raise ValueError(f"ResNet: unknown name {name!r}; choose one of {sorted(RESNET_SPECS)}")
        rng = np.random.default_rng() if rng is None else rng
        block, depths = RESNET_SPECS[name]
        self.name = name
        self.conv1 = _conv(3, 64, 7, stride=2, rng=rng)       # stem: stride 2 ...
        self.bn1 = nn.FrozenBatchNorm2d(64)                    # ... then max-pool: stride 4

        in_channels, current_dilation, stride_so_far = 64, 1, 4
        self.layer_channels, self.layer_strides = {}, {}
        for i, (layer_name, planes, depth) in enumerate(zip(LAYER_NAMES, (64, 128, 256, 512),
                                                            depths)):
            stride = 1 if i == 0 else 2
            first_dilation = current_dilation
            if dilation and layer_name == "layer4":             # DC5: dilate instead of stride
                current_dilation, stride = current_dilation * stride, 1
            out_channels = planes * block.expansion
            downsample = None
            if stride != 1 or in_channels != out_channels:
                downsample = _downsample(in_channels, out_channels, stride, rng)
            blocks = [block(in_channels, planes, stride, downsample, first_dilation, rng=rng)]
            blocks += [block(out_channels, planes, dilation=current_dilation, rng=rng)
                       for _ in range(1, depth)]
            setattr(self, layer_name, nn.Sequential(*blocks))
            in_channels = out_channels
            stride_so_far *= stride
            self.layer_channels[layer_name] = out_channels
            self.layer_strides[layer_name] = stride_so_far

    def forward(self, x, return_layers=MULTI_SCALE_LAYERS):
        """The outputs of ``return_layers`` (in order), computing no layer beyond the last."""
        x = self.bn1(self.conv1(x), relu=True)                 # (B, 64, H/2, W/2)
        x = F.max_pool2d(x, 3, stride=2, padding=1)            # (B, 64, H/4, W/4)
        return run_layers(self, x, return_layers)

    def extra_repr(self):
        return self.name


def resnet18(rng=None):
    return ResNet("resnet18", rng=rng)


def resnet34(rng=None):
    return ResNet("resnet34", rng=rng)


def resnet50(dilation=False, rng=None):
    return ResNet("resnet50", dilation=dilation, rng=rng)


# --------------------------------------------------------------------------- TinyBackbone
class ConvGNReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ReLU; keys ``conv.weight``, ``norm.weight/bias``.

    ``forward(x, valid)`` with a (B, 1, H', W') 0/1 array of the output's valid pixels
    normalises over those pixels only and zeroes the padding (:func:`masked_group_norm`).
    """

    def __init__(self, in_channels, out_channels, stride, num_groups, rng):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1,
                              bias=False, rng=rng)
        self.norm = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x, valid=None):
        if valid is None:
            return F.relu(self.norm(self.conv(x)))
        return F.relu(masked_group_norm(self.conv(x), valid, self.norm))


class TinyBackbone(nn.Module):
    """A small, fully trainable CNN with ResNet's output strides (a minidetr addition).

    Five 3x3 stride-2 ``conv -> GroupNorm -> ReLU`` stages named like a ResNet, so that
    :class:`Backbone` treats both alike::

        stem    3 -> c0      stride 2
        layer1  c0 -> c0     stride 4
        layer2  c0 -> c1     stride 8    (C3)
        layer3  c1 -> c2     stride 16   (C4)
        layer4  c2 -> c3     stride 32   (C5)

    Default channels ``(16, 32, 64, 128)``: C3/C4/C5 have 32/64/128 channels, 0.10 M
    parameters. GroupNorm (``num_groups`` groups, default 8) instead of frozen batch norm,
    because this network is trained from scratch, not loaded from ImageNet weights.

    ``mask_aware=True`` (the ``tiny`` preset's choice, ``ModelConfig.mask_aware_norm``):
    every GroupNorm takes its statistics over the image's own pixels only and the padding
    is set to zero after every stage, so an image gives the same features alone and in a
    zero-padded batch (the official backbones do not: their statistics and their 3x3
    convolutions at the image border see the padding). ``mask_aware=False`` is the plain
    GroupNorm of checkpoints made before this option.

    Shapes:
        forward(x (B, 3, H, W), return_layers) -> one Tensor per returned layer
        forward(x, return_layers, mask (B, H, W) bool) -> (features, masks): also one
            exact padding mask per returned layer (B, H_l, W_l), needed with mask_aware
    """

    def __init__(self, channels=(16, 32, 64, 128), num_groups=8, rng=None, mask_aware=False):
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if len(channels) != 4 or any(c < 1 or c % num_groups for c in channels):
            raise ValueError(f"TinyBackbone: channels must be 4 positive multiples of "
                             f"num_groups={num_groups}, got {channels}")
        rng = np.random.default_rng() if rng is None else rng
        c0, c1, c2, c3 = channels
        self.stem = ConvGNReLU(3, c0, 2, num_groups, rng)
        self.layer1 = ConvGNReLU(c0, c0, 2, num_groups, rng)
        self.layer2 = ConvGNReLU(c0, c1, 2, num_groups, rng)
        self.layer3 = ConvGNReLU(c1, c2, 2, num_groups, rng)
        self.layer4 = ConvGNReLU(c2, c3, 2, num_groups, rng)
        self.layer_channels = dict(zip(LAYER_NAMES, (c0, c1, c2, c3)))
        self.layer_strides = dict(zip(LAYER_NAMES, (4, 8, 16, 32)))
        self.mask_aware = bool(mask_aware)

    def forward(self, x, return_layers=MULTI_SCALE_LAYERS, mask=None):
        if mask is None:
            x = self.stem(x)                                   # (B, c0, H/2, W/2)
            return run_layers(self, x, return_layers)
        return_layers = check_return_layers(return_layers)
        last = LAYER_NAMES.index(return_layers[-1])
        sizes = valid_sizes(mask)                              # (B, 2) rows (h, w)
        features, masks = [], []
        for name in ("stem",) + LAYER_NAMES[:last + 1]:
            sizes = conv_output_sizes(sizes)                   # 3x3, stride 2, padding 1
            stage = getattr(self, name)
            if self.mask_aware:
                level_mask = mask_of_sizes(sizes, _conv_output_shape(x.shape[-2:]), x.xp)
                x = stage(x, (~level_mask)[:, None].astype(x.dtype))  # (B, c, H_s, W_s)
            else:
                x = stage(x)                                   # (B, c, H_s, W_s)
            if name in return_layers:
                features.append(x)
                masks.append(mask_of_sizes(sizes, x.shape[-2:], x.xp) if self.mask_aware
                             else interpolate_mask(mask, x.shape[-2:]))
        return features, masks

    def extra_repr(self):
        return f"mask_aware={self.mask_aware}"


def _conv_output_shape(shape):
    """(H, W) after a 3x3, stride-2, padding-1 convolution: (ceil(H / 2), ceil(W / 2))."""
    return tuple((int(n) + 1) // 2 for n in shape)


# --------------------------------------------------------------------------- mask-aware norm
def valid_sizes(mask):
    """The unpadded (h, w) of every image of a zero-padded batch (padding is bottom/right).

    Shapes:
        mask (B, H, W) bool, True on padding -> (B, 2) int64 rows (h, w), same array module
    """
    xp = get_array_module(mask)
    inside = ~mask                                                     # (B, H, W)
    return xp.stack([inside.any(axis=2).sum(axis=1),                  # rows with an image
                     inside.any(axis=1).sum(axis=1)], axis=1).astype(np.int64)  # (B, 2)


def conv_output_sizes(sizes):
    """Valid sizes after a 3x3, stride-2, padding-1 convolution: ceil(n / 2) (B, 2)."""
    return (sizes + 1) // 2


def mask_of_sizes(sizes, shape, xp):
    """The padding mask of a (H, W) map whose image b covers the top-left ``sizes[b]``.

    Shapes:
        sizes (B, 2) rows (h, w) -> (B, H, W) bool, True on padding
    """
    H, W = (int(n) for n in shape)
    rows = xp.arange(H)[None, :, None] >= sizes[:, 0, None, None]      # (B, H, 1)
    cols = xp.arange(W)[None, None, :] >= sizes[:, 1, None, None]      # (B, 1, W)
    return rows | cols                                                 # (B, H, W)


def masked_group_norm(x, valid, norm):
    """GroupNorm ``norm`` with statistics over the valid pixels only; padding set to 0.

    Each (image, group) is standardised with the mean and variance of its own pixels, as
    if the image were alone; for an image without padding this is ``norm(x)`` (up to
    float rounding). One Function, :func:`minidetr.functional.group_norm` with ``valid``
    (its formulas: docs/autograd.md, "Group normalisation").

    Args:
        x: Tensor (B, C, H, W).
        valid: array (B, 1, H, W) of x's dtype, 1 on the image, 0 on padding.
        norm: the :class:`~minidetr.nn.GroupNorm` whose groups, eps, weight and bias to use.

    Shapes:
        -> Tensor (B, C, H, W), zero on padding
    """
    return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, eps=norm.eps,
                        valid=valid)


# --------------------------------------------------------------------------- masks
def interpolate_mask(mask, size):
    """The padding mask of a feature map of ``size`` = (H_l, W_l), from the image mask.

    As in the official code, the mask is resized with PyTorch's "nearest" rule: output
    row ``i`` reads input row ``floor(float32(i) * float32(H / H_l))`` (columns alike),
    which :func:`minidetr.functional.interpolate_nearest` reproduces exactly. (The
    official code resizes a float copy and casts back to bool; picking elements of the
    bool mask directly gives the same result.)

    Shapes:
        mask (B, H, W) bool -> (B, H_l, W_l) bool (same array module)
    """
    if isinstance(mask, Tensor):
        mask = mask.data
    if mask.dtype != np.bool_ or mask.ndim != 3:
        raise TypeError(f"interpolate_mask: mask must be a bool array (B, H, W), got "
                        f"{mask.dtype} {tuple(mask.shape)}")
    return F.interpolate_nearest(mask, tuple(int(s) for s in size)).data  # (B, H_l, W_l)


# --------------------------------------------------------------------------- wrappers
def check_return_layers(return_layers):
    """``return_layers`` as a non-empty tuple of layer names in network order."""
    names = (return_layers,) if isinstance(return_layers, str) else tuple(return_layers)
    if not names or any(n not in LAYER_NAMES for n in names) or \
            list(names) != sorted(set(names), key=LAYER_NAMES.index):
        raise ValueError(f"return_layers must be distinct names from {LAYER_NAMES} in "
                         f"network order, got {return_layers!r}")
    return names


def run_layers(body, x, return_layers):
    """Run ``body.layer1`` ... on ``x`` up to the last of ``return_layers`` (no layer
    beyond it is computed) and return the outputs of ``return_layers``, in order."""
    return_layers = check_return_layers(return_layers)
    last = LAYER_NAMES.index(return_layers[-1])
    outputs = []
    for layer_name in LAYER_NAMES[:last + 1]:
        x = getattr(body, layer_name)(x)
        if layer_name in return_layers:
            outputs.append(x)
    return outputs


class Backbone(nn.Module):
    """A body (ResNet or TinyBackbone) plus the official freezing and the per-level masks.

    Args:
        body: the CNN (keys ``backbone.0.body.*`` in the full model).
        train_backbone: False freezes every parameter of the body.
        return_layers: which outputs to return (C3-C5 = layer2..4, or ``("layer4",)``
            for single scale).
        freeze_stem_and_layer1: the official rule (True for the ImageNet ResNets):
            parameters whose names contain none of layer2/3/4 are frozen.

    Attributes:
        strides, num_channels: one entry per returned level.

    Shapes:
        forward(images (B, 3, H, W), mask (B, H, W) bool) ->
            features: list of L Tensors (B, num_channels[l], H_l, W_l)
            masks:    list of L bool arrays (B, H_l, W_l)
    """

    def __init__(self, body, train_backbone=True, return_layers=MULTI_SCALE_LAYERS,
                 freeze_stem_and_layer1=True):
        super().__init__()
        self.body = body
        self.return_layers = check_return_layers(return_layers)
        self.strides = [body.layer_strides[n] for n in self.return_layers]
        self.num_channels = [body.layer_channels[n] for n in self.return_layers]
        for name, p in body.named_parameters():
            trained_layer = any(n in name for n in ("layer2", "layer3", "layer4"))
            if not train_backbone or (freeze_stem_and_layer1 and not trained_layer):
                p.requires_grad = False

    def forward(self, images, mask):
        images, mask = _check_inputs(images, mask)
        if getattr(self.body, "mask_aware", False):
            return self.body(images, self.return_layers, mask)  # exact masks per level
        features = self.body(images, self.return_layers)
        masks = [interpolate_mask(mask, f.shape[-2:]) for f in features]
        return features, masks

    def extra_repr(self):
        return f"return_layers={self.return_layers}"


class Joiner(nn.Sequential):
    """``[Backbone, PositionEmbeddingSine]`` as in the official code (keys ``backbone.0.body.*``).

    Shapes:
        forward(images (B, 3, H, W), mask (B, H, W) bool) -> (features, masks, pos), lists
        over the L returned levels:
            features[l]: Tensor (B, num_channels[l], H_l, W_l)
            masks[l]:    bool array (B, H_l, W_l), True on padding
            pos[l]:      Tensor (B, 2 * num_pos_feats, H_l, W_l), no gradient, the
                         features' dtype
    """

    def __init__(self, backbone, position_embedding):
        super().__init__(backbone, position_embedding)
        self.strides = backbone.strides
        self.num_channels = backbone.num_channels

    def forward(self, images, mask):
        features, masks = self[0](images, mask)
        pos = [self[1](m, dtype=f.dtype) for f, m in zip(features, masks)]
        return features, masks, pos


def _check_inputs(images, mask):
    """``images`` as a Tensor (B, 3, H, W) and ``mask`` as a bool array (B, H, W), or an error."""
    if not isinstance(images, Tensor):
        images = Tensor(images)
    if isinstance(mask, Tensor):
        mask = mask.data
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"backbone: images must have shape (B, 3, H, W), got "
                         f"{tuple(images.shape)}")
    if not hasattr(mask, "dtype") or mask.dtype != np.bool_:
        raise TypeError(f"backbone: mask must be a bool array (True = padding), got "
                        f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if tuple(mask.shape) != (images.shape[0],) + tuple(images.shape[2:]):
        raise ValueError(f"backbone: mask shape {tuple(mask.shape)} does not match images "
                         f"{tuple(images.shape)} (expected (B, H, W))")
    return images, mask


def build_backbone(name="resnet50", hidden_dim=256, train_backbone=True,
                   return_interm_layers=True, dilation=False, tiny_channels=(16, 32, 64, 128),
                   rng=None, mask_aware_norm=False):
    """The backbone Joiner of the detector.

    Args:
        name: ``"resnet18"``, ``"resnet34"``, ``"resnet50"`` or ``"tiny"`` (TinyBackbone).
        hidden_dim: C; the position embedding has C channels (num_pos_feats = C / 2).
        train_backbone: False freezes the whole body (official: ``lr_backbone <= 0``).
        return_interm_layers: True: C3-C5 (multi-scale); False: C5 only (single scale).
        dilation: DC5 (ResNet-50 only).
        tiny_channels: the TinyBackbone's channel counts.
        rng: NumPy Generator for the random init.
        mask_aware_norm: the TinyBackbone's GroupNorms ignore the padding (see
            :class:`TinyBackbone`); no effect on the ResNets (frozen batch norm).
    """
    if hidden_dim % 2:
        raise ValueError(f"build_backbone: hidden_dim must be even, got {hidden_dim}")
    return_layers = MULTI_SCALE_LAYERS if return_interm_layers else SINGLE_SCALE_LAYERS
    if name == "tiny":
        if dilation:
            raise ValueError("build_backbone: dilation (DC5) is only for ResNet-50")
        body = TinyBackbone(tiny_channels, rng=rng, mask_aware=mask_aware_norm)
        backbone = Backbone(body, train_backbone, return_layers, freeze_stem_and_layer1=False)
    else:
        body = ResNet(name, dilation=dilation, rng=rng)
        backbone = Backbone(body, train_backbone, return_layers, freeze_stem_and_layer1=True)
    return Joiner(backbone, PositionEmbeddingSine(hidden_dim // 2, normalize=True))


# --------------------------------------------------------------------------- weights
@dataclass
class ResNetLoadReport:
    """What :func:`load_torchvision_resnet` did, key by key."""

    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)        # in the model, not in the weights
    unexpected: list = field(default_factory=list)     # in the weights, not in the model
    mismatched: list = field(default_factory=list)     # (key, weights shape, model shape)
    dropped: list = field(default_factory=list)        # fc.* and num_batches_tracked

    @property
    def ok(self):
        return not (self.missing or self.unexpected or self.mismatched)

    def __str__(self):
        lines = [f"loaded {len(self.loaded)} arrays; dropped {len(self.dropped)} "
                 f"(fc.* and num_batches_tracked)"]
        if self.missing:
            lines.append(f"missing from the weights ({len(self.missing)}): "
                         + ", ".join(self.missing))
        if self.unexpected:
            lines.append(f"unexpected in the weights ({len(self.unexpected)}): "
                         + ", ".join(self.unexpected))
        if self.mismatched:
            lines.append(f"shape mismatches ({len(self.mismatched)}): " + ", ".join(
                f"{k} weights {a} vs model {b}" for k, a, b in self.mismatched))
        return "\n".join(lines)


def _resnet_of(model):
    """The ResNet inside a Joiner, a Backbone or the ResNet itself."""
    if isinstance(model, Joiner):
        model = model[0]
    if isinstance(model, Backbone):
        model = model.body
    if not isinstance(model, ResNet):
        raise TypeError(f"load_torchvision_resnet: expected a ResNet, Backbone or Joiner "
                        f"holding a ResNet, got {type(model).__name__}")
    return model


def load_torchvision_resnet(model, state_dict, strict=True):
    """Copy torchvision ImageNet ResNet weights (a dict name -> array) into the backbone.

    The torchvision keys (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
    ``layer2.0.downsample.1.bias`` ...) are exactly the body's keys; ``fc.*`` (the
    classifier) and ``*.num_batches_tracked`` (a counter of BatchNorm2d) are dropped.
    Values may be NumPy arrays or anything ``numpy.asarray`` accepts; they are cast to the
    model's dtype and moved to its device.

    Args:
        model: a :class:`ResNet`, or a :class:`Backbone` / :class:`Joiner` holding one.
        state_dict: the torchvision weights as arrays.
        strict: raise ``ValueError`` (with the full report) when any key is missing,
            unexpected or mis-shaped; with False, load the keys that match and return the
            report.

    Returns:
        ResNetLoadReport
    """
    body = _resnet_of(model)
    expected = {k: tuple(v.shape) for k, v in body.state_dict().items()}
    report, matching = ResNetLoadReport(), {}
    for key, value in state_dict.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            report.dropped.append(key)
            continue
        if key not in expected:
            report.unexpected.append(key)
            continue
        if not (isinstance(value, np.ndarray) or is_cupy_array(value)):
            value = np.asarray(value)                          # lists, torch tensors ...
        if tuple(value.shape) != expected[key]:
            report.mismatched.append((key, tuple(value.shape), expected[key]))
            continue
        matching[key] = value
    report.missing = [k for k in expected if k not in state_dict]
    if strict and not report.ok:
        raise ValueError(f"load_torchvision_resnet into {body.name}: the weights do not "
                         f"fit\n{report}")
    body.load_state_dict(matching, strict=False)
    report.loaded = list(matching)
    return report
