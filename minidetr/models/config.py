"""Model configurations: one dataclass, three size presets, three architecture variants.

A :class:`ModelConfig` holds every hyper-parameter that decides the *shape* of the
detector and of its loss (training-loop settings such as learning rates live with the
training code). :func:`get_config` returns a preset, optionally changed field by field::

    cfg = get_config("tiny")                          # the CPU model of tests and demos
    cfg = get_config("paper", "two-stage")            # the official two-stage R50 model
    cfg = get_config("small", "refine", num_classes=6, seed=3)

Presets (sizes):

=========  ============  =======  =====  ========  =====  =======  ======  ======  =======
preset     backbone      d_model  heads  enc+dec   FFN    queries  levels  points  classes
=========  ============  =======  =====  ========  =====  =======  ======  ======  =======
``tiny``   TinyBackbone  64       4      2 + 2     128    20       3       2       5
``small``  ResNet-18     128      8      3 + 3     512    100      4       4       91
``paper``  ResNet-50     256      8      6 + 6     1024   300      4       4       91
=========  ============  =======  =====  ========  =====  =======  ======  ======  =======

``paper`` is exactly the official default (``main.py``); ``tiny`` trains in minutes on a
CPU (its 5 classes are the built-in shapes dataset's, labelled 0..4); ``small`` sits in
between (a GPU-sized model that still fits a laptop).

Variants (architecture):

===============  ===================  ==============
variant          ``with_box_refine``  ``two_stage``
===============  ===================  ==============
``plain``        False                False
``refine``       True                 False
``two-stage``    True                 True
===============  ===================  ==============

As in the official README, "two-stage" means two-stage *with* iterative box refinement.
Two-stage without refinement is refused: the official code accepts the flags but fails
at the first forward pass (its proposal head is looked up in ``decoder.bbox_embed``,
which only refinement sets).
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass

BACKBONES = ("tiny", "resnet18", "resnet34", "resnet50")


@dataclass(frozen=True)
class ModelConfig:
    """Every hyper-parameter of the model, its loss and its post-processing.

    Names follow the official ``main.py`` arguments where there is one.
    """

    # --- backbone
    backbone: str = "resnet50"          # "tiny", "resnet18", "resnet34" or "resnet50"
    tiny_channels: tuple = (16, 32, 64, 128)   # TinyBackbone stem/C3/C4/C5 widths
    dilation: bool = False              # DC5 (ResNet-50 only)
    train_backbone: bool = True         # official: lr_backbone > 0
    # --- transformer
    d_model: int = 256                  # C (official: hidden_dim)
    nheads: int = 8                     # M
    enc_layers: int = 6
    dec_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    num_feature_levels: int = 4         # L
    n_points: int = 4                   # K, in encoder and decoder (official enc/dec_n_points)
    num_queries: int = 300              # also the two-stage top-k
    attention: str = "deformable"       # encoder + decoder cross-attention: "deformable"
                                        # (Eq. 2-3) or "dense" (Eq. 1, the convergence
                                        # experiment; see models/dense_attention.py)
    gn_groups: int = 32                 # GroupNorm groups of the input projections
    # GroupNorm statistics over the image only, not the zero padding of a batch (TinyBackbone
    # and input projections): detections independent of the batch. False = official.
    mask_aware_norm: bool = False
    # --- heads and variants
    num_classes: int = 91
    aux_loss: bool = True
    with_box_refine: bool = False
    two_stage: bool = False
    # --- matcher and loss (official defaults)
    set_cost_class: float = 2.0
    set_cost_bbox: float = 5.0
    set_cost_giou: float = 2.0
    cls_loss_coef: float = 2.0
    bbox_loss_coef: float = 5.0
    giou_loss_coef: float = 2.0
    focal_alpha: float = 0.25
    # --- post-processing
    num_select: int = 100               # detections kept per image
    # --- reproducibility and kernels
    seed: int = 42                      # seeds every initialiser and dropout stream
    msda_backend: str | None = None     # MSDA kernel; None picks the fastest available

    def replace(self, **changes) -> "ModelConfig":
        """A validated copy with some fields changed (unknown names are an error)."""
        _check_field_names(changes)
        cfg = dataclasses.replace(self, **changes)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "ModelConfig":
        """The validated config of ``to_dict()``'s output, also after a JSON round trip
        (which turns tuples into lists). Unknown field names are a ValueError."""
        d = dict(d)
        if "tiny_channels" in d:
            d["tiny_channels"] = tuple(d["tiny_channels"])
        _check_field_names(d, where="the stored model configuration: ")
        return cls(**d).validate()

    @property
    def variant(self) -> str:
        """The name of this architecture variant: "plain", "refine" or "two-stage"."""
        return "two-stage" if self.two_stage else "refine" if self.with_box_refine else "plain"

    def validate(self) -> "ModelConfig":
        """Raise ValueError/TypeError naming the offending field; return self if all is well."""
        for name in ("d_model", "nheads", "enc_layers", "dec_layers", "dim_feedforward",
                     "num_feature_levels", "n_points", "num_queries", "gn_groups",
                     "num_classes", "num_select"):
            _positive_int(self, name)
        for name in ("dilation", "train_backbone", "aux_loss", "with_box_refine", "two_stage",
                     "mask_aware_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ModelConfig.{name} must be True or False, "
                                f"got {getattr(self, name)!r}")
        if self.attention not in ("deformable", "dense"):
            raise ValueError(f"ModelConfig.attention must be 'deformable' or 'dense', "
                             f"got {self.attention!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"ModelConfig.backbone must be one of {BACKBONES}, "
                             f"got {self.backbone!r}")
        if self.dilation and self.backbone != "resnet50":
            raise ValueError("ModelConfig.dilation (DC5) needs backbone='resnet50'")
        if self.d_model % self.nheads:
            raise ValueError(f"ModelConfig: d_model ({self.d_model}) must be divisible by "
                             f"nheads ({self.nheads})")
        if self.d_model % 2:
            raise ValueError(f"ModelConfig.d_model must be even (sine position features "
                             f"come in pairs), got {self.d_model}")
        if self.d_model % self.gn_groups:
            raise ValueError(f"ModelConfig: d_model ({self.d_model}) must be divisible by "
                             f"gn_groups ({self.gn_groups})")
        if not (isinstance(self.dropout, numbers.Real) and 0 <= self.dropout < 1):
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.num_feature_levels == 2:
            raise ValueError("ModelConfig.num_feature_levels must be 1 (C5 only) or >= 3 "
                             "(C3-C5, plus extra strided levels), got 2")
        if self.two_stage and not self.with_box_refine:
            raise ValueError("ModelConfig: two_stage=True needs with_box_refine=True (the "
                             "official code fails at run time without it; use the "
                             "'two-stage' variant)")
        if (not isinstance(self.tiny_channels, tuple) or len(self.tiny_channels) != 4
                or not all(isinstance(c, int) and c > 0 for c in self.tiny_channels)):
            raise ValueError(f"ModelConfig.tiny_channels must be a tuple of 4 positive ints, "
                             f"got {self.tiny_channels!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral) \
                or self.seed < 0:
            raise ValueError(f"ModelConfig.seed must be a non-negative int, got {self.seed!r}")
        if self.msda_backend is not None and not isinstance(self.msda_backend, str):
            raise TypeError(f"ModelConfig.msda_backend must be a backend name or None, "
                            f"got {self.msda_backend!r}")
        return self


def _positive_int(cfg, name):
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")


def _check_field_names(changes, where=""):
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"{where}unknown ModelConfig field(s) {unknown}; known fields: "
                         f"{sorted(known)}")


# --------------------------------------------------------------------------- presets
PRESETS = {
    "tiny": dict(backbone="tiny", tiny_channels=(16, 32, 64, 128), d_model=64, nheads=4,
                 enc_layers=2, dec_layers=2, dim_feedforward=128, dropout=0.1,
                 num_feature_levels=3, n_points=2, num_queries=20, num_classes=5,
                 train_backbone=True, mask_aware_norm=True),
    "small": dict(backbone="resnet18", d_model=128, nheads=8, enc_layers=3, dec_layers=3,
                  dim_feedforward=512, dropout=0.1, num_feature_levels=4, n_points=4,
                  num_queries=100, num_classes=91),
    "paper": dict(backbone="resnet50", d_model=256, nheads=8, enc_layers=6, dec_layers=6,
                  dim_feedforward=1024, dropout=0.1, num_feature_levels=4, n_points=4,
                  num_queries=300, num_classes=91),
}

VARIANTS = {
    "plain": dict(with_box_refine=False, two_stage=False),
    "refine": dict(with_box_refine=True, two_stage=False),
    "two-stage": dict(with_box_refine=True, two_stage=True),
}


def get_config(preset: str = "tiny", variant: str = "plain", **overrides) -> ModelConfig:
    """The :class:`ModelConfig` of ``preset`` and ``variant``, with ``overrides`` applied.

    Args:
        preset: ``"tiny"``, ``"small"`` or ``"paper"``.
        variant: ``"plain"``, ``"refine"`` or ``"two-stage"`` (``"two_stage"`` is accepted).
        overrides: any ModelConfig fields, e.g. ``num_classes=6, seed=1``. They are
            applied last, so they win over the preset and the variant.

    Raises:
        ValueError: an unknown preset, variant or field name, or an invalid combination.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    variant_key = variant.replace("_", "-") if isinstance(variant, str) else variant
    if variant_key not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(VARIANTS)}")
    _check_field_names(overrides)
    values = {**PRESETS[preset], **VARIANTS[variant_key], **overrides}
    return ModelConfig(**values).validate()


__all__ = ["ModelConfig", "get_config", "PRESETS", "VARIANTS", "BACKBONES"]
