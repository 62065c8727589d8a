"""Opening a trained detector (notebooks 08, 14, 15): its checkpoint, held-out images, what
its attention looks at, and how good each decoder layer's boxes are.

==============================  =========================================================
:func:`load_cached_model`       a checkpoint of ``notebooks/cache/`` as an eval-mode model
:func:`held_out_shapes`         shapes images no run trained on (another seed), batched
:func:`record_sampling`         every attention call of a forward pass: where each head
                                of MSDeformAttn sampled (locations, weights) around which
                                reference; each head's weights of a DenseAttention
:func:`attention_focus`         how concentrated those weights are (points, perplexity)
:func:`offsets_in_pixels`       those locations as offsets from the reference, in pixels
                                of each level
:func:`layer_boxes`             every decoder layer's boxes, (layers, N, Nq, 4)
:func:`per_layer_iou`           the IoU of matched queries after every decoder layer
==============================  =========================================================

The checkpoints of ``notebooks/cache/`` are written by
``python -m minidetr.lessons.experiments collect`` (see :mod:`.experiments`); they hold
float16 weights (to stay small), which are cast back to float32 on loading.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..autograd import Tensor, no_grad
from ..backend import to_numpy
from .experiments import BUDGET

__all__ = ["load_cached_model", "held_out_shapes", "record_sampling", "attention_focus",
           "offsets_in_pixels",
           "layer_boxes", "per_layer_iou", "iou_cxcywh"]


def load_cached_model(path):
    """The model stored in checkpoint ``path``, float32, in evaluation mode.

    Returns:
        (model, ModelConfig, checkpoint) - the checkpoint also holds the category map and
        the training history (``checkpoint.progress["history"]``).

    Raises:
        FileNotFoundError: the file is missing, with the command that makes it.
    """
    from ..models import ModelConfig, build_model
    from ..weights.checkpoint import load_checkpoint
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; make it with: python -m minidetr.lessons.experiments run "
            f"base refine && python -m minidetr.lessons.experiments collect")
    ckpt = load_checkpoint(path)
    cfg = ModelConfig.from_dict(ckpt.model_config)
    model = build_model(cfg)
    state = {k: v.astype(np.float32) if v.dtype == np.float16 else v
             for k, v in ckpt.model_state.items()}
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg, ckpt


def held_out_shapes(root, num_images, batch_size=8, seed=1, image_size=128,
                    category_map=None, val_size=None):
    """Shapes images that no experiment trained or validated on, as collated batches.

    The experiments train and validate on the shapes data of seed 0; these images come
    from ``seed`` (default 1): the same distribution, other pictures. They are written
    under ``root`` once and go through the ``tiny`` validation transform, resized to the
    experiments' validation size (``val_size``, default the ``tiny`` preset's 128 px, or
    ``BUDGET["val_size"]`` if the budget sets one).
    Labels follow ``category_map`` (a checkpoint's ``category_map`` dict; default:
    contiguous 0..4).

    Returns:
        list of :class:`~minidetr.data.loader.Batch` (images (B, 3, H, W), mask (B, H, W),
        targets with normalised cxcywh ``boxes`` and contiguous ``labels``).
    """
    from ..data import (PRESETS, CategoryMap, CocoDetection, collate,
                        generate_shapes_dataset, make_transforms)
    root = Path(root) / f"seed{seed}-{int(num_images)}x{image_size}"        # one per setting
    paths = generate_shapes_dataset(root, num_train=1, num_val=int(num_images),
                                    image_size=(image_size, image_size), seed=seed)
    size = int(val_size or BUDGET.get("val_size") or PRESETS["tiny"].val_size)
    label_map = "contiguous" if category_map is None else CategoryMap.from_dict(category_map)
    data = CocoDetection(str(paths.val_images), str(paths.val_annotations),
                         transforms=make_transforms("val", "tiny", val_size=size,
                                                    max_size=size * 5 // 3),
                         label_map=label_map,
                         warn=False)
    samples = [data[i] for i in range(len(data))]
    return [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]


@contextmanager
def record_sampling(model):
    """Record every multi-scale deformable attention call made inside the ``with`` block.

    Yields a dict ``{module name: [record, ...]}`` (one record per call, e.g.
    ``"transformer.encoder.layers.0.self_attn"``), each record a dict of NumPy arrays:

    * ``reference``: (N, Lq, L, 2) points or (N, Lq, L, 4) boxes, normalised per level;
    * ``locations``: (N, Lq, M, L, K, 2), normalised (x, y) in each level's padded map;
    * ``weights``: (N, Lq, M, L, K), summing to 1 over (L, K) for each head;
    * ``shapes``: (L, 2) rows (H_l, W_l).

    A :class:`~minidetr.models.dense_attention.DenseAttention` (Eq. 1) records instead
    ``weights`` (N, M, Lq, S), every head's softmax over the S keys, and ``key_mask``
    (N, S) bool, True on padding (the padded keys have weight 0).
    """
    from ..models.dense_attention import DenseAttention
    from ..nn.msdeform_attn import MSDeformAttn
    records, patched = {}, []

    def wrap_dense(name, module):
        method = module.attend

        def recording(query, key, value, key_padding_mask=None, need_weights=False):
            weights = dense_head_weights(module, _np(query), _np(key), key_padding_mask)
            mask = np.zeros(weights.shape[::3], bool) if key_padding_mask is None \
                else to_numpy(key_padding_mask)
            records.setdefault(name, []).append(dict(weights=weights, key_mask=mask))
            return method(query, key, value, key_padding_mask=key_padding_mask,
                          need_weights=need_weights)
        object.__setattr__(module, "attend", recording)
        patched.append((module, "attend"))

    def wrap(name, module):
        method = module.sampling_locations_and_weights

        def recording(query, reference_points, input_spatial_shapes):
            locations, weights = method(query, reference_points, input_spatial_shapes)
            ref = reference_points.data if isinstance(reference_points, Tensor) \
                else reference_points
            records.setdefault(name, []).append(dict(
                reference=to_numpy(ref), locations=to_numpy(locations.data),
                weights=to_numpy(weights.data),
                shapes=np.asarray(to_numpy(input_spatial_shapes)
                                  if hasattr(input_spatial_shapes, "dtype")
                                  else input_spatial_shapes, dtype=np.int64)))
            return locations, weights
        object.__setattr__(module, "sampling_locations_and_weights", recording)
        patched.append((module, "sampling_locations_and_weights"))

    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            wrap(name, module)
        elif isinstance(module, DenseAttention):
            wrap_dense(name, module)
    try:
        yield records
    finally:
        for module, attribute in patched:
            object.__delattr__(module, attribute)


def _np(x):
    return to_numpy(x.data if isinstance(x, Tensor) else x)


def dense_head_weights(attn, query, key, key_padding_mask=None):
    """Every head's attention weights of Eq. (1), recomputed from the module's projections.

    Shapes: query (N, Lq, C), key (N, S, C), key_padding_mask (N, S) bool or None
    -> (N, M, Lq, S) float64, each row a softmax over the unpadded keys.
    """
    C, M = attn.embed_dim, attn.num_heads
    D = C // M
    W = to_numpy(attn.in_proj_weight.data).astype(np.float64)               # (3C, C)
    b = to_numpy(attn.in_proj_bias.data).astype(np.float64)                 # (3C,)
    N, Lq, _ = query.shape
    S = key.shape[1]
    q = (query @ W[:C].T + b[:C]) * attn.scaling                            # (N, Lq, C)
    k = key @ W[C:2 * C].T + b[C:2 * C]                                     # (N, S, C)
    scores = np.einsum("nqmd,nkmd->nmqk", q.reshape(N, Lq, M, D),
                       k.reshape(N, S, M, D))                               # (N, M, Lq, S)
    if key_padding_mask is not None:
        scores = np.where(to_numpy(key_padding_mask)[:, None, None, :], -np.inf, scores)
    scores -= scores.max(-1, keepdims=True)
    weights = np.exp(scores)
    return weights / weights.sum(-1, keepdims=True)


def attention_focus(record, query_mask=None):
    """How concentrated one recorded attention call is, averaged over heads and queries.

    Dense (Eq. 1): each head spreads its weight over the ``n_keys`` unpadded keys.
    Deformable (Eq. 2-3): over its L*K sampling points (each point then reads 4 pixels).

    Args:
        record: one record of :func:`record_sampling`.
        query_mask: (N, Lq) bool, the queries to average over (default all).

    Returns:
        dict(kind="dense"|"deformable", n_keys=keys (or points) a head can weigh,
        uniform=1/n_keys, max_weight=mean of the largest weight, perplexity=mean of
        exp(entropy), the effective number of keys (n_keys when uniform, 1 when one key
        takes all)).
    """
    if "locations" in record:
        N, Lq, M, L, K = record["weights"].shape
        w = record["weights"].reshape(N, Lq, M, L * K).astype(np.float64)   # (N, Lq, M, LK)
        kind, n_keys = "deformable", np.full(N, L * K)
    else:
        w = record["weights"].transpose(0, 2, 1, 3)                          # (N, Lq, M, S)
        kind, n_keys = "dense", (~record["key_mask"]).sum(-1)                # (N,)
    N, Lq = w.shape[:2]
    keep = np.ones((N, Lq), bool) if query_mask is None else np.asarray(query_mask, bool)
    entropy = -(w * np.log(np.where(w > 0, w, 1.0))).sum(-1)                 # (N, Lq, M)
    per_image_keys = np.broadcast_to(n_keys[:, None], (N, Lq))[keep]
    return dict(kind=kind, n_keys=float(per_image_keys.mean()),
                uniform=float((1.0 / per_image_keys).mean()),
                max_weight=float(w.max(-1)[keep].mean()),
                perplexity=float(np.exp(entropy)[keep].mean()))


def offsets_in_pixels(record):
    """A recorded call's sampling points as offsets from the reference centre, in pixels
    of each level: (locations - reference_xy) * (W_l, H_l).

    Shapes: record from :func:`record_sampling` -> (N, Lq, M, L, K, 2), (dx, dy).
    """
    L = record["shapes"].shape[0]
    ref_xy = record["reference"][..., :2]                                   # (N, Lq, L, 2)
    N, Lq = ref_xy.shape[:2]
    wh = record["shapes"][:, ::-1].astype(np.float64).reshape(1, 1, 1, L, 1, 2)  # (W_l, H_l)
    return (record["locations"] - ref_xy.reshape(N, Lq, 1, L, 1, 2)) * wh   # (N, Lq, M, L, K, 2)


def layer_boxes(outputs):
    """Every decoder layer's boxes from a detector's outputs: (layers, N, Nq, 4) cxcywh."""
    sets = list(outputs.get("aux_outputs") or []) + [outputs]
    return np.stack([to_numpy(o["pred_boxes"].data) for o in sets])


def iou_cxcywh(a, b):
    """IoU of matched box pairs: a, b (P, 4) normalised cxcywh -> (P,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    lo = np.maximum(a[:, :2] - a[:, 2:] / 2, b[:, :2] - b[:, 2:] / 2)       # (P, 2)
    hi = np.minimum(a[:, :2] + a[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2)       # (P, 2)
    inter = np.clip(hi - lo, 0, None).prod(-1)                              # (P,)
    union = a[:, 2:].prod(-1) + b[:, 2:].prod(-1) - inter
    return inter / union


def per_layer_iou(model, batches, matcher):
    """How good each decoder layer's boxes are, on ``batches`` (held-out images).

    Two measurements, both over every ground-truth object:

    * ``tracked``: the query that the Hungarian matcher pairs with the object on the
      *final* layer's predictions, followed back through the layers: its box's IoU with
      the object after every layer (does a later layer improve the same query's box?);
    * ``own``: every layer matched on its own predictions, as its auxiliary loss is.

    Returns:
        dict(tracked=(layers, T) IoUs, own=(layers, T) IoUs, areas=(T,) object areas as a
        fraction of the image, per_layer_boxes=list of (layers, T, 4) tracked boxes).
    """
    tracked, own, areas = [], [], []
    for images, mask, targets in batches:
        with no_grad():
            outputs = model(Tensor(images), mask)
        boxes = layer_boxes(outputs)                                        # (D, N, Nq, 4)
        sets = list(outputs.get("aux_outputs") or []) + [outputs]
        final = matcher(outputs, targets)
        per_set = [matcher(s, targets) for s in sets]
        for n, target in enumerate(targets):
            gt = np.asarray(target["boxes"], np.float64)                    # (T_n, 4)
            q, t = final[n]
            tracked.append(np.stack([iou_cxcywh(boxes[d, n, q], gt[t])
                                     for d in range(len(boxes))]))          # (D, T_n)
            rows = []
            for d, match in enumerate(per_set):
                qd, td = match[n]
                iou = np.empty(len(gt))
                iou[td] = iou_cxcywh(boxes[d, n, qd], gt[td])
                rows.append(iou[t])                                         # same order
            own.append(np.stack(rows))                                      # (D, T_n)
            areas.append(gt[t, 2] * gt[t, 3])
    return dict(tracked=np.concatenate(tracked, axis=1), own=np.concatenate(own, axis=1),
                areas=np.concatenate(areas))
