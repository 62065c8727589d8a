"""DeformableDETR: backbone -> input projections -> deformable transformer -> heads.

The detector of the paper, with the official module names (so the state dict is the
released checkpoint's, key for key)::

    DeformableDETR
      transformer   DeformableTransformer        (encoder, decoder, two-stage parts)
      class_embed   ModuleList of Linear(C, num_classes), one per prediction set
      bbox_embed    ModuleList of MLP(C, C, 4, 3)
      query_embed   Embedding(Nq, 2C)            (single-stage only)
      input_proj    ModuleList of Sequential(Conv2d, GroupNorm(32, C)), one per level
      backbone      Joiner [Backbone, PositionEmbeddingSine]

Forward, in words (docs/model.md has the details):

1. The backbone gives C3, C4, C5 (strides 8, 16, 32), their padding masks and their sine
   position embeddings.
2. ``input_proj[l]`` maps each to C channels (1x1 conv + GroupNorm). Extra levels (the
   paper's stride-64 map) come from a 3x3 stride-2 conv + GroupNorm, applied to the *raw*
   C5 for the first extra level and to the previous projected level after that; their
   masks are the image mask resized (nearest) and their embeddings are computed from it.
3. The transformer returns the decoder output h_i of every layer i and the references.
4. Heads, for every decoder layer i, with r_i the reference *entering* layer i (r_0 the
   initial reference, r_i the reference after layer i - 1)::

       logits_i = class_embed[i](h_i)
       box_i    = sigmoid(bbox_embed[i](h_i) + inverse_sigmoid(r_i))   (2-d r: xy only)

   The last layer gives ``pred_logits``/``pred_boxes``; the others ``aux_outputs``.

Heads per variant (num_pred = decoder layers, + 1 for the two-stage proposal head):

* plain: *one* class head and *one* box head, repeated num_pred times in the ModuleLists
  (the state dict lists every index; the optimiser sees each tensor once);
* refine: num_pred independent deep copies, made after the initialisation; the decoder
  gets the box heads for iterative refinement;
* two-stage (with refinement): the same, plus the decoder gets the class heads; the
  last pair (index num_pred - 1) scores the encoder proposals (``enc_outputs``).
"""
from __future__ import annotations

import copy
import math

import numpy as np

from .. import functional as F
from .. import nn
from ..autograd import Tensor
from .backbone import (_conv_output_shape, conv_output_sizes, interpolate_mask, mask_of_sizes,
                       masked_group_norm, valid_sizes)
from .deformable_transformer import DeformableTransformer, box_from_reference

__all__ = ["DeformableDETR"]

PRIOR_PROB = 0.01     # the class head starts predicting p = 0.01 for every class


class DeformableDETR(nn.Module):
    """The Deformable DETR detector.

    Args:
        backbone: a :class:`~minidetr.models.backbone.Joiner` (``build_backbone``):
            ``backbone(images, mask)`` returns (features, masks, pos) per level, it has
            ``num_channels`` (per level) and ``backbone[1]`` is the position embedding.
        transformer: a :class:`DeformableTransformer` of the same width C.
        num_classes: number of classification logits (91 for COCO's raw ids).
        num_queries: Nq; the transformer's two-stage top-k must be the same.
        num_feature_levels: L; 1 (C5 only) or at least the backbone's number of levels.
        aux_loss: also return the predictions of every decoder layer but the last.
        with_box_refine: iterative bounding-box refinement.
        two_stage: encoder proposals as queries (needs ``with_box_refine``).
        gn_groups: GroupNorm groups of the input projections (official 32).
        mask_aware_norm: the input projections' GroupNorms take their statistics over
            the image only, not the padding, and extra levels get exact masks, so that an
            image gives the same detections alone and in a padded batch (a minidetr
            option; False is the official model, whose statistics include the padding).
        rng: NumPy Generator for the initialisers (and the dropout streams' seed).

    Shapes:
        forward(images (B, 3, H, W), mask (B, H, W) bool or None) -> dict with
        pred_logits (B, Nq, num_classes), pred_boxes (B, Nq, 4) cxcywh in (0, 1),
        aux_outputs (list of dec_layers - 1 such dicts, if aux_loss),
        enc_outputs (two-stage: dict with pred_logits (B, S, num_classes),
        pred_boxes (B, S, 4)).
    """

    def __init__(self, backbone, transformer, num_classes, num_queries, num_feature_levels,
                 aux_loss=True, with_box_refine=False, two_stage=False, gn_groups=32,
                 rng=None, mask_aware_norm=False):
        super().__init__()
        if rng is None:
            rng = np.random.default_rng()
        if not isinstance(rng, np.random.Generator):
            raise TypeError(f"DeformableDETR: rng must be a numpy.random.Generator or None, "
                            f"got {type(rng).__name__}")
        if not isinstance(transformer, DeformableTransformer):
            raise TypeError(f"DeformableDETR: transformer must be a DeformableTransformer, "
                            f"got {type(transformer).__name__}")
        C = transformer.d_model
        n_backbone = len(backbone.num_channels)
        if num_feature_levels != transformer.num_feature_levels:
            raise ValueError(f"DeformableDETR: num_feature_levels={num_feature_levels} but "
                             f"the transformer has {transformer.num_feature_levels}")
        if num_feature_levels > 1 and num_feature_levels < n_backbone:
            raise ValueError(f"DeformableDETR: num_feature_levels={num_feature_levels} is "
                             f"fewer than the backbone's {n_backbone} levels; use 1 (with a "
                             f"C5-only backbone) or >= {n_backbone}")
        if num_feature_levels == 1 and n_backbone != 1:
            raise ValueError("DeformableDETR: num_feature_levels=1 needs a backbone that "
                             "returns C5 only (build_backbone(return_interm_layers=False))")
        if two_stage and not with_box_refine:
            raise ValueError("DeformableDETR: two_stage=True needs with_box_refine=True (the "
                             "official code fails at run time without it: the proposal "
                             "head is looked up in decoder.bbox_embed, set only by "
                             "refinement)")
        if two_stage != transformer.two_stage:
            raise ValueError(f"DeformableDETR: two_stage={two_stage} but the transformer "
                             f"was built with two_stage={transformer.two_stage}")
        if two_stage and transformer.two_stage_num_proposals != num_queries:
            raise ValueError(f"DeformableDETR: two-stage uses the transformer's top-"
                             f"{transformer.two_stage_num_proposals} proposals as queries, "
                             f"but num_queries={num_queries}")
        self.num_classes, self.num_queries = num_classes, num_queries
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.hidden_dim = C
        self.mask_aware_norm = bool(mask_aware_norm)

        # ---- construct (official order: heads, query_embed, input projections)
        class_embed = nn.Linear(C, num_classes, rng=rng)
        bbox_embed = nn.MLP(C, C, 4, 3, rng=rng)
        query_embed = None if two_stage else nn.Embedding(num_queries, 2 * C, rng=rng)
        input_proj = []
        for l in range(num_feature_levels):
            if l < n_backbone:            # a backbone level: 1x1 conv
                conv = nn.Conv2d(backbone.num_channels[l], C, 1, rng=rng)
            else:                         # an extra level: 3x3 stride-2 conv
                in_channels = backbone.num_channels[-1] if l == n_backbone else C
                conv = nn.Conv2d(in_channels, C, 3, stride=2, padding=1, rng=rng)
            input_proj.append(nn.Sequential(conv, nn.GroupNorm(gn_groups, C)))

        # ---- initialise
        bias_value = -math.log((1 - PRIOR_PROB) / PRIOR_PROB)              # ~ -4.595
        nn.init.constant_(class_embed.bias, bias_value)
        nn.init.zeros_(bbox_embed.layers[-1].weight)
        nn.init.zeros_(bbox_embed.layers[-1].bias)
        for proj in input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1.0, rng=rng)
            nn.init.zeros_(proj[0].bias)

        # ---- one head per prediction set: shared, or independent copies
        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            class_heads = [copy.deepcopy(class_embed) for _ in range(num_pred)]
            box_heads = [copy.deepcopy(bbox_embed) for _ in range(num_pred)]
            _set_size_bias(box_heads[0], -2.0)       # only the first layer's head
        else:
            _set_size_bias(bbox_embed, -2.0)
            class_heads = [class_embed] * num_pred   # the same module at every index
            box_heads = [bbox_embed] * num_pred
        if two_stage:
            for head in box_heads:
                _set_size_bias(head, 0.0)

        # ---- register, in the official state-dict order
        self.transformer = transformer
        self.class_embed = nn.ModuleList(class_heads)
        self.bbox_embed = nn.ModuleList(box_heads)
        if query_embed is not None:
            self.query_embed = query_embed
        self.input_proj = nn.ModuleList(input_proj)
        self.backbone = backbone
        if with_box_refine:       # the official "hack": the decoder refines with these heads
            transformer.decoder.bbox_embed = self.bbox_embed
        if two_stage:             # ... and scores the encoder proposals with the last pair
            transformer.decoder.class_embed = self.class_embed
        self.seed_dropout(int(rng.integers(2**63)))

    # ------------------------------------------------------------------ forward
    def project_features(self, images, mask):
        """Backbone and input projections: the L levels the transformer reads.

        Returns:
            srcs: L Tensors (B, C, H_l, W_l); masks: L bool arrays (B, H_l, W_l);
            pos: L Tensors (B, C, H_l, W_l).
        """
        features, masks, pos = self.backbone(images, mask)
        masks, pos = list(masks), list(pos)
        if self.mask_aware_norm:
            srcs = [_project_masked(proj, f, m)
                    for proj, f, m in zip(self.input_proj, features, masks)]
        else:
            srcs = [proj(f) for proj, f in zip(self.input_proj, features)]
        for l in range(len(features), self.num_feature_levels):
            # the first extra level reads the raw last backbone map, later ones the
            # previous projected level
            src_in = features[-1] if l == len(features) else srcs[-1]
            if self.mask_aware_norm:            # 3x3 stride-2 conv: ceil(n / 2) valid
                sizes = conv_output_sizes(valid_sizes(masks[-1]))           # (B, 2)
                level_mask = mask_of_sizes(sizes, _conv_output_shape(src_in.shape[-2:]),
                                           src_in.xp)                       # (B, H_l, W_l)
                src = _project_masked(self.input_proj[l], src_in, level_mask)
            else:
                src = self.input_proj[l](src_in)
                level_mask = interpolate_mask(mask, src.shape[-2:])         # (B, H_l, W_l)
            srcs.append(src)
            masks.append(level_mask)
            pos.append(self.backbone[1](level_mask, dtype=src.dtype))
        return srcs, masks, pos

    def forward(self, images, mask=None):
        """Detect objects in a padded batch; see the class docstring for the outputs.

        Args:
            images: Tensor or array (B, 3, H, W), normalised, float32 (float64 for
                gradient checks).
            mask: bool array (B, H, W), True on padding; None means no padding.
        """
        if not isinstance(images, Tensor):
            images = Tensor(images)
        if images.ndim != 4:
            raise ValueError(f"DeformableDETR: images must be (B, 3, H, W), got "
                             f"{tuple(images.shape)}")
        if mask is None:
            B, _, H, W = images.shape
            mask = images.xp.zeros((B, H, W), dtype=bool)
        elif isinstance(mask, Tensor):
            mask = mask.data

        srcs, masks, pos = self.project_features(images, mask)
        query_embed = None if self.two_stage else self.query_embed.weight
        out = self.transformer(srcs, masks, pos, query_embed)

        logits, boxes = [], []
        for i in range(out.hs.shape[0]):
            reference = out.init_reference if i == 0 else out.inter_references[i - 1]
            h = out.hs[i]                                                    # (B, Nq, C)
            logits.append(self.class_embed[i](h))                           # (B, Nq, cls)
            boxes.append(box_from_reference(self.bbox_embed[i](h), reference))  # (B, Nq, 4)

        result = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            result["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b}
                                     for a, b in zip(logits[:-1], boxes[:-1])]
        if self.two_stage:
            result["enc_outputs"] = {"pred_logits": out.enc_outputs_class,
                                     "pred_boxes": F.sigmoid(out.enc_outputs_coord_unact)}
        return result

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, num_queries={self.num_queries}, "
                f"num_feature_levels={self.num_feature_levels}, aux_loss={self.aux_loss}, "
                f"with_box_refine={self.with_box_refine}, two_stage={self.two_stage}")


def _project_masked(proj, x, level_mask):
    """``input_proj[l]`` (conv, GroupNorm) with the norm's statistics over the image only.

    Shapes: x (B, C_in, H, W), level_mask (B, H_l, W_l) of the conv's output ->
    Tensor (B, C, H_l, W_l), zero on padding.
    """
    y = proj[0](x)                                                    # (B, C, H_l, W_l)
    return masked_group_norm(y, (~level_mask)[:, None].astype(y.dtype), proj[1])


def _set_size_bias(mlp, value):
    """Set the (w, h) logit biases of a box head's last layer: sigmoid(-2) ~ 0.12 boxes."""
    mlp.layers[-1].bias.data[2:] = value
