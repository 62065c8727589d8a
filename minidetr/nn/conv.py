"""Conv2d: a 2-D convolution (cross-correlation, as in every framework) over NCHW input.

Shapes:
    x: (N, C_in, H, W) -> y: (N, C_out, H_out, W_out)
    H_out = floor((H + 2 * padding - dilation * (kh - 1) - 1) / stride) + 1 (same for W)
    weight: (C_out, C_in, kh, kw), bias: (C_out,)
"""
from __future__ import annotations

import numpy as np

from .. import functional as F
from . import _checks, init
from .module import Module, Parameter


class Conv2d(Module):
    """2-D convolution with PyTorch's default init (U(+-1/sqrt(C_in*kh*kw)))."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, bias: bool = True, rng=None):
        super().__init__()
        self.in_channels = _checks.positive_int(in_channels, "in_channels", "Conv2d")
        self.out_channels = _checks.positive_int(out_channels, "out_channels", "Conv2d")
        self.kernel_size = _checks.int_pair(kernel_size, "kernel_size", "Conv2d", minimum=1)
        self.stride = _checks.int_pair(stride, "stride", "Conv2d", minimum=1)
        self.padding = _checks.int_pair(padding, "padding", "Conv2d", minimum=0)
        self.dilation = _checks.int_pair(dilation, "dilation", "Conv2d", minimum=1)
        rng = _checks.generator(rng, "Conv2d")
        kh, kw = self.kernel_size
        self.weight = Parameter(np.empty((out_channels, in_channels, kh, kw), dtype=np.float32))
        self.bias = Parameter(np.empty(out_channels, dtype=np.float32)) if bias else None
        init.default_linear_init_(self.weight, self.bias, rng=rng)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d: expected input (N, {self.in_channels}, H, W), "
                             f"got shape {tuple(x.shape)}")
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding,
                        dilation=self.dilation)

    def extra_repr(self):
        text = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}")
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.bias is None:
            text += ", bias=False"
        return text
