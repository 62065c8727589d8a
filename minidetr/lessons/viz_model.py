"""Drawing helpers for the model notebooks (05-10): pictures, boxes, points, costs, GIoU.

These complement :mod:`minidetr.lessons.viz` (sampling points per head and per level, maps,
scaling plots) with what the detector's notebooks draw: padded pictures, normalised boxes
and points on a picture, the sampling points of every level on one picture, a box refined
layer after layer, a matching cost matrix and the geometry of the generalised IoU.

Every ``show_*``/``draw_*`` function draws on a Matplotlib ``ax`` that the caller
creates, and returns it; nothing here creates figures or changes Matplotlib's settings.
(To feed a bundled picture to the model, see
:func:`minidetr.lessons.notebooks.example_to_sample`.)

Coordinates. The model speaks in *normalised* coordinates: a box (cx, cy, w, h) or a
point (x, y) in [0, 1] relative to some extent of the picture, the valid (unpadded) image
for predicted boxes and reference points, a level's padded map for sampling locations.
The helpers take that extent in pixels of the picture shown, ``extent_hw = (height,
width)``, and place normalised ``x`` at ``x * width - 0.5``, like
:func:`minidetr.lessons.viz.to_pixels` (``imshow`` centres pixel ``j`` at ``j``).

=====================================  ===============================================
function                               draws
=====================================  ===============================================
:func:`image_for_display`              a normalised (3, H, W) array back to (H, W, 3)
:func:`show_image`                     a picture, its padding shaded
:func:`draw_boxes`                     normalised cxcywh boxes as rectangles
:func:`draw_points`                    normalised (x, y) points
:func:`draw_sampling_points_on_image`  one query's points on every level, one picture
:func:`draw_box_trajectory`            one query's box after every decoder layer
:func:`draw_cost_matrix`               a matching cost matrix, the assignment outlined
:func:`draw_giou`                      two boxes, their intersection and enclosing box
=====================================  ===============================================
"""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from ..autograd import Tensor
from ..backend import to_numpy
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .viz import to_pixels

__all__ = ["LEVEL_COLOURS", "image_for_display", "show_image", "draw_boxes", "draw_points",
           "draw_sampling_points_on_image", "draw_box_trajectory", "draw_cost_matrix",
           "draw_giou"]

# one colour per feature level (C3, C4, C5, the extra level, ...)
LEVEL_COLOURS = ("tab:red", "tab:orange", "tab:green", "tab:blue", "tab:purple", "tab:brown")


def _host(x):
    """A Tensor, a NumPy or CuPy array, or a list, as a NumPy array."""
    return to_numpy(x.data if isinstance(x, Tensor) else x)


@contextmanager
def _keep_view(ax):
    """Keep the axes' limits (the picture already shown) while drawing on top of it:
    points or boxes that fall outside the picture are clipped, not zoomed out to."""
    has_picture = bool(ax.images)
    xlim, ylim = ax.get_xlim(), ax.get_ylim()
    yield
    if has_picture:
        ax.set_xlim(xlim)
        ax.set_ylim(ylim)


def image_for_display(image, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """Undo the ImageNet normalisation of a model input.

    Shapes:
        image (3, H, W), normalised as ``(x - mean) / std`` with x in [0, 1]
        -> (H, W, 3) float64 in [0, 1]
    """
    image = _host(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"image_for_display: expected a (3, H, W) array, got "
                         f"{tuple(image.shape)}")
    pixels = image.transpose(1, 2, 0) * np.asarray(std) + np.asarray(mean)   # (H, W, 3)
    return np.clip(pixels, 0.0, 1.0)


def show_image(ax, image, mask=None, title=None):
    """Show a picture, (H, W, 3) in [0, 1] or a normalised model input (3, H, W).

    Args:
        mask: optional (H, W) bool, True on padding; padded pixels are shaded grey.
    """
    from matplotlib.colors import ListedColormap

    image = _host(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = image_for_display(image)
    ax.imshow(image)
    if mask is not None:
        padding = _host(mask).astype(float)                                  # (H, W)
        ax.imshow(np.ma.masked_equal(padding, 0), cmap=ListedColormap(["0.55"]),
                  alpha=0.85, vmin=0, vmax=1)
    if title:
        ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    return ax


def draw_boxes(ax, boxes, extent_hw, colour="tab:red", labels=None, linestyle="-",
               linewidth=1.5, alpha=1.0, fontsize=7):
    """Draw normalised (cx, cy, w, h) boxes as rectangles.

    Args:
        boxes: (B, 4) or (4,) normalised cxcywh.
        extent_hw: (height, width) in pixels of what the boxes are normalised to.
        colour: a colour name, or a list of colours (names or RGBA tuples), one per box.
        labels: optional text per box, written at its top-left corner.
    """
    from matplotlib.patches import Rectangle

    boxes = _host(boxes).reshape(-1, 4).astype(np.float64)                 # (B, 4)
    H, W = extent_hw
    colours = [colour] * len(boxes) if isinstance(colour, str) else list(colour)
    corners = np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2,
                              boxes[:, :2] + boxes[:, 2:] / 2], axis=1)     # (B, 4) xyxy
    top_left = to_pixels(corners[:, :2], H, W)                             # (B, 2)
    with _keep_view(ax):
        for i, (u0, v0) in enumerate(top_left):
            ax.add_patch(Rectangle((u0, v0), boxes[i, 2] * W, boxes[i, 3] * H, fill=False,
                                   edgecolor=colours[i], linestyle=linestyle,
                                   linewidth=linewidth, alpha=alpha))
            if labels is not None:
                ax.text(u0, v0, str(labels[i]), color="black", fontsize=fontsize,
                        va="bottom", clip_on=True, bbox={"facecolor": colours[i],
                                                         "alpha": 0.7, "pad": 1,
                                                         "edgecolor": "none"})
    return ax


def draw_points(ax, points, extent_hw, colour="tab:red", size=12, marker="o", **kwargs):
    """Scatter normalised (x, y) points, ``points`` (..., 2), on a picture.

    ``extent_hw``: (height, width) in pixels of what the points are normalised to.
    """
    uv = to_pixels(_host(points).reshape(-1, 2), *extent_hw)                # (P, 2)
    with _keep_view(ax):
        ax.scatter(uv[:, 0], uv[:, 1], s=size, c=colour, marker=marker, **kwargs)
    return ax


def draw_sampling_points_on_image(ax, locations, weights, level_extents_hw, reference=None,
                                  reference_extent_hw=None, max_area=80.0,
                                  colours=LEVEL_COLOURS):
    """One query's sampling points of *all* levels on one picture: colour = level,
    marker area proportional to the attention weight.

    (:func:`minidetr.lessons.viz.draw_levels` draws the same points level by level, coloured by
    head.)

    Args:
        locations: (M, L, K, 2) normalised (x, y) in each level's padded map.
        weights: (M, L, K) attention weights (each head's L*K weights sum to 1).
        level_extents_hw: L pairs (H_l * s_l, W_l * s_l): the picture pixels that level l's
            normalised [0, 1] spans (its padded size times its stride).
        reference: optional (2,) point or (4,) box, drawn as a black cross (and dashed box).
        reference_extent_hw: the extent ``reference`` is normalised to.
        max_area: marker area of the largest weight.
    """
    locations, weights = _host(locations), _host(weights)
    M, L, K, _ = locations.shape
    if weights.shape != (M, L, K) or len(level_extents_hw) != L:
        raise ValueError(f"draw_sampling_points_on_image: locations {locations.shape}, "
                         f"weights {weights.shape} and {len(level_extents_hw)} level "
                         f"extents disagree (expected (M, L, K, 2), (M, L, K), L)")
    scale = max_area / max(float(weights.max()), 1e-12)
    with _keep_view(ax):
        for l in reversed(range(L)):           # the finest level last, on top
            uv = to_pixels(locations[:, l].reshape(-1, 2), *level_extents_hw[l])  # (M*K, 2)
            ax.scatter(uv[:, 0], uv[:, 1], s=weights[:, l].reshape(-1) * scale + 3,
                       color=colours[l % len(colours)], alpha=0.8, edgecolors="white",
                       linewidths=0.5, label=f"level {l}", zorder=3)
        if reference is not None:
            ref = _host(reference).reshape(-1)
            if ref.shape[0] == 4:
                draw_boxes(ax, ref, reference_extent_hw, colour="black", linestyle="--")
            u, v = to_pixels(ref[:2], *reference_extent_hw)
            ax.scatter([u], [v], marker="x", s=70, color="black", linewidths=2, zorder=4,
                       label="reference")
    return ax


def draw_box_trajectory(ax, boxes, extent_hw, target=None, labels=None, cmap="plasma"):
    """One query's successive boxes, e.g. after every decoder layer.

    Args:
        boxes: (T, 4) normalised cxcywh, coloured from dark (first) to bright (last); the
            centres are joined by a line.
        target: optional (4,) ground-truth box, drawn dashed white.
        labels: optional legend text per box (default "0", "1", ...).
    """
    from matplotlib import colormaps

    boxes = _host(boxes).reshape(-1, 4).astype(np.float64)                 # (T, 4)
    T = len(boxes)
    colours = [colormaps[cmap](0.1 + 0.8 * i / max(T - 1, 1)) for i in range(T)]
    if target is not None:
        draw_boxes(ax, target, extent_hw, colour="white", linestyle="--", linewidth=1.5)
    centres = to_pixels(boxes[:, :2], *extent_hw)                          # (T, 2)
    with _keep_view(ax):
        ax.plot(centres[:, 0], centres[:, 1], "-", color="white", linewidth=0.8, alpha=0.8)
        for i in range(T):
            draw_boxes(ax, boxes[i], extent_hw, colour=[colours[i]], linewidth=1.8)
            ax.scatter(centres[i:i + 1, 0], centres[i:i + 1, 1], s=16, color=colours[i],
                       edgecolors="black", linewidths=0.4, zorder=3,
                       label=labels[i] if labels is not None else str(i))
    return ax


def draw_cost_matrix(ax, cost, assignment=None, row_name="query", col_name="target",
                     fmt="{:.2f}", cmap="viridis"):
    """A (Q, T) cost matrix as a heat map with its numbers; matched cells outlined red.

    Args:
        assignment: optional (rows, cols) index arrays, e.g. the output of ``match_single``.
    """
    from matplotlib.patches import Rectangle

    cost = _host(cost).astype(np.float64)
    Q, T = cost.shape
    ax.imshow(cost, cmap=cmap, aspect="auto")
    middle = (cost.max() + cost.min()) / 2
    for q in range(Q):
        for t in range(T):
            ax.text(t, q, fmt.format(cost[q, t]), ha="center", va="center", fontsize=7,
                    color="white" if cost[q, t] < middle else "black")
    if assignment is not None:
        for q, t in zip(*assignment):
            ax.add_patch(Rectangle((t - 0.5, q - 0.5), 1, 1, fill=False, edgecolor="red",
                                   linewidth=2.5))
    ax.set_xticks(range(T), [f"{col_name} {t}" for t in range(T)], fontsize=7)
    ax.set_yticks(range(Q), [f"{row_name} {q}" for q in range(Q)], fontsize=7)
    return ax


def _area(box):
    return max(box[2] - box[0], 0.0) * max(box[3] - box[1], 0.0)


def draw_giou(ax, box_a, box_b, names=("A", "B")):
    """Two (x0, y0, x1, y1) boxes, their intersection (filled) and enclosing box (dashed).

    The title gives IoU = I / U and GIoU = IoU - (|C| - U) / |C|, computed here from the
    corners in plain Python so the picture is self-contained (the notebook checks them
    against :mod:`minidetr.models.box_ops`). Returns ``(ax, iou, giou)``.
    """
    from matplotlib.patches import Rectangle

    a, b = (tuple(float(v) for v in _host(box).reshape(4)) for box in (box_a, box_b))
    inter = (max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3]))
    encl = (min(a[0], b[0]), min(a[1], b[1]), max(a[2], b[2]), max(a[3], b[3]))
    I = _area(inter)
    U = _area(a) + _area(b) - I
    C = _area(encl)
    iou, giou = I / U, I / U - (C - U) / C
    ax.add_patch(Rectangle(encl[:2], encl[2] - encl[0], encl[3] - encl[1], facecolor="0.92",
                           edgecolor="0.3", linestyle="--", label="enclosing box C"))
    if I > 0:
        ax.add_patch(Rectangle(inter[:2], inter[2] - inter[0], inter[3] - inter[1],
                               facecolor="tab:green", alpha=0.5, label="intersection I"))
    for box, colour, name in ((a, "tab:blue", names[0]), (b, "tab:orange", names[1])):
        ax.add_patch(Rectangle(box[:2], box[2] - box[0], box[3] - box[1], fill=False,
                               edgecolor=colour, linewidth=2, label=name))
    pad = 0.08 * max(encl[2] - encl[0], encl[3] - encl[1])
    ax.set_xlim(encl[0] - pad, encl[2] + pad)
    ax.set_ylim(encl[3] + pad, encl[1] - pad)        # y down, as in a picture
    ax.set_aspect("equal")
    ax.set_title(f"IoU = {iou:.3f}   GIoU = {giou:.3f}", fontsize=9)
    return ax, iou, giou
