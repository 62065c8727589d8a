"""Differentiable functions over Tensors, each a Function with forward and backward side by side.

Grouped by kind, one file each:

=================  =====================================================================
``elementwise``    add, sub, mul, div, maximum, minimum, neg, pow, exp, log, sqrt, abs,
                   clamp, where, cast
``activation``     sigmoid, relu, softmax, log_softmax, softplus, log_sigmoid
``reduce``         sum, mean, max, cumsum
``shape``          reshape, permute, transpose, flatten, unsqueeze, squeeze, expand,
                   getitem, gather, concat, stack, split
``linalg``         matmul, linear
``conv``           conv2d (im2col; Winograd for 3x3 stride-1), max_pool2d
``winograd``       the Winograd F(2x2, 3x3) convolution conv2d uses on the CPU
``winograd4``      Winograd F(4x4, 3x3), for the convolutions with the most tiles
``norm``           layer_norm, group_norm, frozen_batch_norm, frozen_batch_norm_relu
``random``         dropout
``loss``           sigmoid_focal_loss (one Function, gradient by hand)
``sampling``       interpolate_nearest (masks, no gradient)
=================  =====================================================================

Every function accepts Tensors (and, where it makes sense, plain numbers or arrays) and
returns a Tensor. ``import minidetr.functional as F`` is the usual spelling.

Derivation: docs/autograd.md derives the backward of every Function in this package.
"""
from .elementwise import (abs, add, cast, clamp, div, exp, log, maximum, minimum, mul, neg,  # noqa: F401
                          pow, sqrt, sub, where)
from .activation import log_sigmoid, log_softmax, relu, sigmoid, softmax, softplus  # noqa: F401
from .reduce import cumsum, max, mean, sum  # noqa: F401
from .shape import (concat, expand, flatten, gather, getitem, permute, reshape, split,  # noqa: F401
                    squeeze, stack, transpose, unsqueeze)
from .linalg import linear, matmul  # noqa: F401
from .conv import conv2d, max_pool2d  # noqa: F401
from .norm import frozen_batch_norm, frozen_batch_norm_relu, group_norm, layer_norm  # noqa: F401
from .random import dropout  # noqa: F401
from .loss import sigmoid_focal_loss  # noqa: F401
from .sampling import interpolate_nearest  # noqa: F401
