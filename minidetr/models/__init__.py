"""The Deformable DETR model parts: boxes, matching, losses, post-processing, and the network.

Read in the order of one training step: the network's outputs (``deformable_detr``) are
matched to the targets (``matcher``), scored by the set loss (``criterion``, built on the
box geometry of ``box_ops``), and turned into detections by ``postprocess``.
"""
from .box_ops import (box_area, box_cxcywh_to_xyxy, box_iou, box_xyxy_to_cxcywh,  # noqa: F401
                      elementwise_box_iou, elementwise_generalized_box_iou,
                      generalized_box_iou, inverse_sigmoid)
from .matcher import HungarianMatcher, match_single  # noqa: F401
from .criterion import SetCriterion, build_weight_dict, sigmoid_focal_loss, total_loss  # noqa: F401
from .postprocess import PostProcess  # noqa: F401
from .config import ModelConfig, get_config  # noqa: F401
from .deformable_transformer import DeformableTransformer  # noqa: F401
from .deformable_detr import DeformableDETR  # noqa: F401
from .build import build_criterion, build_model, build_postprocess  # noqa: F401
