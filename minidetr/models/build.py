"""Factories: a :class:`~minidetr.models.config.ModelConfig` in, model parts out.

::

    from minidetr.models import get_config, build_model, build_criterion, build_postprocess
    cfg = get_config("tiny", "refine")
    model = build_model(cfg)             # DeformableDETR, initialised from cfg.seed
    criterion = build_criterion(cfg)     # HungarianMatcher + SetCriterion with its weights
    postprocess = build_postprocess(cfg)

One generator, ``np.random.default_rng(cfg.seed)``, is handed to every constructor in a
fixed order (backbone, transformer, detector), so a seed always gives the same weights,
on the CPU and on the GPU alike, and the dropout streams are seeded from it too.
"""
from __future__ import annotations

import numpy as np

from .backbone import build_backbone
from .config import ModelConfig
from .criterion import SetCriterion, build_weight_dict
from .deformable_detr import DeformableDETR
from .deformable_transformer import DeformableTransformer
from .matcher import HungarianMatcher
from .postprocess import PostProcess

__all__ = ["build_model", "build_criterion", "build_postprocess"]


def _checked(cfg) -> ModelConfig:
    if not isinstance(cfg, ModelConfig):
        raise TypeError(f"expected a ModelConfig (minidetr.models.get_config(...)), "
                        f"got {type(cfg).__name__}")
    return cfg.validate()


def build_model(cfg: ModelConfig) -> DeformableDETR:
    """The detector of ``cfg``, randomly initialised from ``cfg.seed`` (training mode).

    The backbone is random too: load ImageNet weights with
    :func:`~minidetr.models.backbone.load_torchvision_resnet` (ResNets), or a whole
    checkpoint with ``model.load_state_dict``.
    """
    cfg = _checked(cfg)
    rng = np.random.default_rng(cfg.seed)
    backbone = build_backbone(cfg.backbone, hidden_dim=cfg.d_model,
                              train_backbone=cfg.train_backbone,
                              return_interm_layers=cfg.num_feature_levels > 1,
                              dilation=cfg.dilation, tiny_channels=cfg.tiny_channels, rng=rng,
                              mask_aware_norm=cfg.mask_aware_norm)
    transformer = DeformableTransformer(
        d_model=cfg.d_model, nhead=cfg.nheads, num_encoder_layers=cfg.enc_layers,
        num_decoder_layers=cfg.dec_layers, dim_feedforward=cfg.dim_feedforward,
        dropout=cfg.dropout, num_feature_levels=cfg.num_feature_levels,
        enc_n_points=cfg.n_points, dec_n_points=cfg.n_points, two_stage=cfg.two_stage,
        two_stage_num_proposals=cfg.num_queries, rng=rng, msda_backend=cfg.msda_backend,
        attention=cfg.attention)
    model = DeformableDETR(backbone, transformer, num_classes=cfg.num_classes,
                           num_queries=cfg.num_queries,
                           num_feature_levels=cfg.num_feature_levels, aux_loss=cfg.aux_loss,
                           with_box_refine=cfg.with_box_refine, two_stage=cfg.two_stage,
                           gn_groups=cfg.gn_groups, rng=rng,
                           mask_aware_norm=cfg.mask_aware_norm)
    # one reproducible dropout stream per Dropout module, from the config's seed
    return model.seed_dropout(cfg.seed)


def build_criterion(cfg: ModelConfig) -> SetCriterion:
    """The matcher and set criterion of ``cfg`` (official: costs 2/5/2, weights 2/5/2).

    The weight dict has the final keys, ``_0`` ... ``_{dec_layers-2}`` for the auxiliary
    outputs and ``_enc`` for the two-stage proposals when ``cfg.aux_loss`` is on.
    """
    cfg = _checked(cfg)
    matcher = HungarianMatcher(cost_class=cfg.set_cost_class, cost_bbox=cfg.set_cost_bbox,
                               cost_giou=cfg.set_cost_giou, focal_alpha=cfg.focal_alpha)
    weight_dict = build_weight_dict(cfg.cls_loss_coef, cfg.bbox_loss_coef, cfg.giou_loss_coef,
                                    num_decoder_layers=cfg.dec_layers, aux_loss=cfg.aux_loss)
    return SetCriterion(cfg.num_classes, matcher, weight_dict, focal_alpha=cfg.focal_alpha)


def build_postprocess(cfg: ModelConfig) -> PostProcess:
    """Top-``cfg.num_select`` (query, class) pairs per image, boxes in pixels."""
    cfg = _checked(cfg)
    return PostProcess(num_select=cfg.num_select)
