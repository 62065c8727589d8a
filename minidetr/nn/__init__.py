"""Layers with parameters, built from :mod:`minidetr.functional`, PyTorch-style.

=================  =========================================================
``module``         Parameter, Module (registration, state_dict, device, RNG),
                   ModuleList, Sequential
``init``           in-place initialisers with an explicit ``rng``
``linear``         Linear
``conv``           Conv2d
``norm``           LayerNorm, GroupNorm, FrozenBatchNorm2d
``embedding``      Embedding
``activation``     ReLU, Identity, Dropout
``mlp``            MLP (the DETR box head)
``attention``      MultiheadAttention (batch first, PyTorch parameter layout)
=================  =========================================================

``import minidetr.nn as nn`` is the usual spelling.
"""
from . import init  # noqa: F401
from .module import LoadResult, Module, ModuleList, Parameter, Sequential  # noqa: F401
from .linear import Linear  # noqa: F401
from .conv import Conv2d  # noqa: F401
from .norm import FrozenBatchNorm2d, GroupNorm, LayerNorm  # noqa: F401
from .embedding import Embedding  # noqa: F401
from .activation import Dropout, Identity, ReLU  # noqa: F401
from .mlp import MLP  # noqa: F401
from .attention import MultiheadAttention  # noqa: F401
from .msdeform_attn import MSDeformAttn  # noqa: F401

__all__ = ["Parameter", "Module", "ModuleList", "Sequential", "LoadResult", "Linear", "Conv2d",
           "LayerNorm", "GroupNorm", "FrozenBatchNorm2d", "Embedding", "Dropout", "ReLU",
           "Identity", "MLP", "MultiheadAttention", "MSDeformAttn", "init"]
