"""Normalisation layers: LayerNorm, GroupNorm and FrozenBatchNorm2d.

Shapes:
    LayerNorm(C):           x (..., C), normalised over the last axis
    GroupNorm(G, C):        x (N, C, H, W), normalised over each group of C/G channels
                            and all pixels
    FrozenBatchNorm2d(C):   x (N, C, H, W), per channel:
                            y = (x - running_mean) * weight / sqrt(running_var + eps) + bias

LayerNorm and GroupNorm learn ``weight`` (init 1) and ``bias`` (init 0). FrozenBatchNorm2d
is the ResNet backbone's batch norm with everything fixed: its four arrays are *buffers*,
as in the official checkpoint (``backbone.0.body.bn1.running_mean`` ...), and there is
no ``num_batches_tracked`` (a checkpoint that has one is accepted and the key ignored).
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from . import _checks
from .module import Module, Parameter


class LayerNorm(Module):
    """Layer normalisation over the last axis (size ``normalized_shape``)."""

    def __init__(self, normalized_shape: int, eps: float = 1e-5):
        super().__init__()
        self.normalized_shape = _checks.positive_int(normalized_shape, "normalized_shape",
                                                     "LayerNorm")
        self.eps = _checks.non_negative_float(eps, "eps", "LayerNorm")
        self.weight = Parameter(np.ones(normalized_shape, dtype=np.float32))
        self.bias = Parameter(np.zeros(normalized_shape, dtype=np.float32))

    def forward(self, x):
        _checks.last_dim(x, self.normalized_shape, "LayerNorm")
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"({self.normalized_shape},), eps={self.eps}"


class GroupNorm(Module):
    """Group normalisation: C channels in ``num_groups`` groups of C/num_groups."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups = _checks.positive_int(num_groups, "num_groups", "GroupNorm")
        self.num_channels = _checks.positive_int(num_channels, "num_channels", "GroupNorm")
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by "
                             f"num_groups ({num_groups})")
        self.eps = _checks.non_negative_float(eps, "eps", "GroupNorm")
        self.weight = Parameter(np.ones(num_channels, dtype=np.float32))
        self.bias = Parameter(np.zeros(num_channels, dtype=np.float32))

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.num_channels:
            raise ValueError(f"GroupNorm: expected input (N, {self.num_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class FrozenBatchNorm2d(Module):
    """Batch norm with fixed statistics and affine parameters (all four are buffers)."""

    _ignored_state_keys = ("num_batches_tracked",)

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = _checks.positive_int(num_features, "num_features",
                                                 "FrozenBatchNorm2d")
        self.eps = _checks.non_negative_float(eps, "eps", "FrozenBatchNorm2d")
        self.register_buffer("weight", np.ones(num_features, dtype=np.float32))
        self.register_buffer("bias", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_mean", np.zeros(num_features, dtype=np.float32))
        self.register_buffer("running_var", np.ones(num_features, dtype=np.float32))

    def forward(self, x, residual=None, relu=False):
        """``bn(x)``; with ``relu=True``, ``relu(bn(x) + residual)`` (``residual`` optional)
        as one Function (:func:`minidetr.functional.frozen_batch_norm_relu`): a ResNet
        block's batch norm, shortcut and ReLU in one pass each way."""
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(f"FrozenBatchNorm2d: expected input (N, {self.num_features}, H, W), "
                             f"got shape {tuple(x.shape)}")
        if relu:
            return F.frozen_batch_norm_relu(x, self.weight, self.bias, self.running_mean,
                                            self.running_var, eps=self.eps, residual=residual)
        if residual is not None:
            raise ValueError("FrozenBatchNorm2d: a residual is added only with relu=True "
                             "(the fused relu(bn(x) + residual))")
        return F.frozen_batch_norm(x, self.weight, self.bias, self.running_mean,
                                   self.running_var, eps=self.eps)

    def extra_repr(self):
        return f"{self.num_features}, eps={self.eps}"
