"""Drawing helpers for the notebooks: sampling points, bilinear neighbourhoods, scaling plots.

Every function draws on a Matplotlib ``ax`` that the caller creates (``fig, ax =
plt.subplots()`` in a notebook) and returns it; nothing here creates figures, picks a
backend or changes rc settings. The helpers draw; the numbers they show come from the
package (for example the bilinear weights from
:func:`minidetr.ops.msda.reference.bilinear_corners`), never recomputed here.

Coordinates. A map of ``H x W`` pixels is drawn with ``imshow``'s default extent, so pixel
``(i, j)`` (row, column) is centred at ``(j, i)`` in the axes. A normalised location
``(x, y)`` in ``[0, 1]^2`` (the op's convention, ``align_corners=False``) lands at

    u = x * W - 0.5,   v = y * H - 0.5          (:func:`to_pixels`)

on a map of that size, whatever its resolution: the same normalised point can be drawn on
the picture and on every feature level.

Shapes (one query):
    locations   (M, K, 2)  normalised (x, y), or (M, L, K, 2) for several levels
    weights     (M, K)     attention weights A, or (M, L, K)
    reference   (2,)       normalised (x, y)
"""
from __future__ import annotations

import numpy as np

from ..ops.msda.reference import bilinear_corners


# --------------------------------------------------------------------------- basics
def head_colors(num_heads):
    """One distinct colour per attention head (Matplotlib's tab10, repeated if needed)."""
    from matplotlib import colormaps
    return [colormaps["tab10"](m % 10) for m in range(num_heads)]


def to_pixels(xy, height, width):
    """Normalised ``(..., 2)`` locations (x, y) -> pixel coordinates (u, v) on an H x W map.

    ``u = x W - 0.5``, ``v = y H - 0.5``: pixel column j is centred at ``x = (j + 0.5) / W``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    return np.stack([xy[..., 0] * width - 0.5, xy[..., 1] * height - 0.5], axis=-1)


def feature_to_image(feature):
    """A feature map (H, W, C) as something ``imshow`` shows: RGB for C = 3, else 2-D.

    Three channels are rescaled to [0, 1] together (a colour picture stays a colour
    picture); any other C is summarised by the per-pixel L2 norm over channels.
    """
    feature = np.asarray(feature, dtype=np.float64)
    if feature.ndim == 2:
        return feature
    if feature.ndim != 3:
        raise ValueError(f"feature_to_image: expected (H, W, C) or (H, W), got shape "
                         f"{feature.shape}")
    if feature.shape[-1] == 3:
        lo, hi = feature.min(), feature.max()
        return (feature - lo) / (hi - lo) if hi > lo else np.zeros_like(feature)
    return np.linalg.norm(feature, axis=-1)                      # (H, W)


def show_map(ax, feature, title=None, cmap="gray"):
    """Show a picture or feature map (H, W[, C]) in pixel coordinates, without ticks."""
    image = feature_to_image(feature)
    ax.imshow(image, cmap=None if image.ndim == 3 else cmap, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    return ax


# --------------------------------------------------------------------------- sampling points
def draw_sampling_points(ax, locations, height, width, weights=None, reference=None,
                         area_per_weight=600.0, lines=True, legend=False):
    """Draw one query's sampling points on a map of ``height x width`` pixels.

    Args:
        ax: the axes, already showing the map (see :func:`show_map`).
        locations: (M, K, 2) normalised (x, y) of head m's K points.
        height, width: the size of the map shown on ``ax`` (picture or feature level).
        weights: (M, K) attention weights; a point's marker *area* is
            ``area_per_weight * A``, so the drawing shows where the attention goes.
            None draws every point the same size.
        reference: (2,) normalised reference point, drawn as a white star.
        lines: join each head's points to the reference (which head owns which point).
        legend: add a legend "head m".
    """
    locations = np.asarray(locations, dtype=np.float64)
    if locations.ndim != 3 or locations.shape[-1] != 2:
        raise ValueError(f"draw_sampling_points: locations must be (M, K, 2), got shape "
                         f"{locations.shape}")
    M, K, _ = locations.shape
    if weights is None:
        areas = np.full((M, K), 40.0)
    else:
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (M, K):
            raise ValueError(f"draw_sampling_points: weights must be (M, K) = ({M}, {K}) "
                             f"like locations, got shape {weights.shape}")
        areas = area_per_weight * weights
    uv = to_pixels(locations, height, width)                       # (M, K, 2)
    ref_uv = None if reference is None else to_pixels(reference, height, width)  # (2,)
    for m, color in enumerate(head_colors(M)):
        if lines and ref_uv is not None:
            for k in range(K):
                ax.plot([ref_uv[0], uv[m, k, 0]], [ref_uv[1], uv[m, k, 1]], color=color,
                        linewidth=0.7, alpha=0.6)
        ax.scatter(uv[m, :, 0], uv[m, :, 1], s=areas[m], color=color, edgecolors="black",
                   linewidths=0.5, label=f"head {m}", zorder=3)
    if ref_uv is not None:
        ax.scatter([ref_uv[0]], [ref_uv[1]], marker="*", s=160, color="white",
                   edgecolors="black", linewidths=0.8, zorder=4, label="reference")
    # keep the whole map in view even when points fall outside it
    ax.set_xlim(min(-0.5, uv[..., 0].min() - 1), max(width - 0.5, uv[..., 0].max() + 1))
    ax.set_ylim(max(height - 0.5, uv[..., 1].max() + 1), min(-0.5, uv[..., 1].min() - 1))
    if legend:
        ax.legend(fontsize=7, loc="upper right", framealpha=0.8)
    return ax


def draw_levels(axes, level_maps, locations, weights=None, reference=None, titles=None,
                area_per_weight=600.0):
    """One query's sampling points on every feature level, one axes per level.

    Args:
        axes: L axes.
        level_maps: L maps (H_l, W_l[, C]) (e.g. the levels of a pyramid).
        locations: (M, L, K, 2) normalised (x, y).
        weights: (M, L, K) attention weights (softmax over L*K per head), or None.
        reference: (2,) normalised reference point, or (L, 2) one per level.
        titles: L strings; default "level l: H_l x W_l" and the attention mass of the level.
    """
    locations = np.asarray(locations, dtype=np.float64)
    L = len(level_maps)
    if locations.ndim != 4 or locations.shape[1] != L:
        raise ValueError(f"draw_levels: locations must be (M, L, K, 2) with L = {L} levels, "
                         f"got shape {locations.shape}")
    if reference is not None:
        reference = np.broadcast_to(np.asarray(reference, dtype=np.float64), (L, 2))
    for l, (ax, level) in enumerate(zip(axes, level_maps)):
        H, W = np.asarray(level).shape[:2]
        title = titles[l] if titles else f"level {l}: {H} x {W}"
        if weights is not None and not titles:
            title += f"\nattention mass {np.asarray(weights)[:, l].sum() / len(weights):.2f}"
        show_map(ax, level, title)
        draw_sampling_points(ax, locations[:, l], H, W,
                             None if weights is None else np.asarray(weights)[:, l],
                             None if reference is None else reference[l],
                             area_per_weight=area_per_weight)
    return axes


# --------------------------------------------------------------------------- bilinear
def draw_bilinear_neighbourhood(ax, value_map, x, y, zoom=False, title=None):
    """The four neighbours of one normalised point and their bilinear weights.

    Draws the map (H, W) in pixel coordinates (u, v) with a one-pixel frame of zero
    padding (outside the blue line), the sampling point (yellow cross), its four
    neighbours (pixel centres) and, for each neighbour, the rectangle *opposite* to it in
    the same colour: its area is the neighbour's weight. A neighbour outside the map is
    drawn hollow (it reads the padding, 0). The weights are those of
    :func:`~minidetr.ops.msda.reference.bilinear_corners`.

    ``zoom``: show only the 4 x 4 pixels around the point, with the values and weights
    written out; otherwise the whole map (values written when it is small).
    """
    from matplotlib.patches import Rectangle

    value_map = np.asarray(value_map, dtype=np.float64)
    if value_map.ndim != 2:
        raise ValueError(f"draw_bilinear_neighbourhood: value_map must be (H, W), got shape "
                         f"{value_map.shape}")
    H, W = value_map.shape
    u, v = x * W - 0.5, y * H - 0.5
    u0, v0 = np.floor(u), np.floor(v)
    corners = bilinear_corners(np.array([x]), np.array([y]), H, W)
    padded = np.pad(value_map, 1)                                  # (H + 2, W + 2), zero frame
    lo, hi = min(0.0, value_map.min()), value_map.max()
    ax.imshow(padded, cmap="Greys", extent=(-1.5, W + 0.5, H + 0.5, -1.5),
              interpolation="nearest", vmin=lo, vmax=hi + (hi - lo), alpha=0.9)
    ax.add_patch(Rectangle((-0.5, -0.5), W, H, fill=False, edgecolor="tab:blue", linewidth=2))
    for j in range(-1, W + 1):
        ax.axvline(j + 0.5, color="0.75", linewidth=0.5)
    for i in range(-1, H + 1):
        ax.axhline(i + 0.5, color="0.75", linewidth=0.5)
    if zoom or H * W <= 80:                                        # write the values out
        for i in range(-1, H + 1):
            for j in range(-1, W + 1):
                if zoom and not (u0 - 1 <= j <= u0 + 2 and v0 - 1 <= i <= v0 + 2):
                    continue
                ax.text(j, i - 0.3, f"{padded[i + 1, j + 1]:g}", ha="center", va="center",
                        fontsize=8, color="0.55" if not (0 <= i < H and 0 <= j < W) else "0.2")
    colors = ("tab:red", "tab:orange", "tab:green", "tab:purple")
    for c, (di, dj) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        cu, cv = u0 + dj, v0 + di                                   # the neighbour's centre
        inside = 0 <= cu <= W - 1 and 0 <= cv <= H - 1
        weight = float(corners[c].weight[0])
        # the rectangle between the point and the *opposite* neighbour has area = weight
        ou, ov = u0 + 1 - dj, v0 + 1 - di
        ax.add_patch(Rectangle((min(u, ou), min(v, ov)), abs(ou - u), abs(ov - v),
                               color=colors[c], alpha=0.45, linewidth=0))
        ax.scatter([cu], [cv], s=60, facecolors=colors[c] if inside else "white",
                   edgecolors=colors[c], linewidths=1.5, zorder=3)
        if zoom:                                                    # label outwards
            area = abs(ou - u) * abs(ov - v)            # = weight, unless it reads padding
            label = f"w = {weight:.3f}" if inside else f"w = {area:.3f}\nx 0 (padding)"
            ax.annotate(label, (cu, cv),
                        textcoords="offset points",
                        xytext=(-8 if dj == 0 else 8, 10 if di else -10),
                        ha="right" if dj == 0 else "left", va="top" if di else "bottom",
                        fontsize=8, color=colors[c], fontweight="bold")
    ax.plot([u0, u0 + 1, u0 + 1, u0, u0], [v0, v0, v0 + 1, v0 + 1, v0], color="black",
            linewidth=0.8, linestyle="--")
    ax.scatter([u], [v], marker="x", s=70, color="gold", linewidths=2.5, zorder=4)
    if zoom:
        ax.set_xlim(max(-2.5, u0 - 1.5), min(W + 1.5, u0 + 2.5))
        ax.set_ylim(min(H + 1.5, v0 + 2.5), max(-2.5, v0 - 1.5))
    else:
        ax.set_xlim(-1.5, W + 0.5)
        ax.set_ylim(H + 0.5, -1.5)
    ax.set_xlabel("u = x W - 0.5 (pixel column)")
    ax.set_ylabel("v = y H - 0.5 (pixel row)")
    ax.set_title(title or f"(x, y) = ({x:.3f}, {y:.3f}) -> (u, v) = ({u:.2f}, {v:.2f})",
                 fontsize=9)
    return ax


# --------------------------------------------------------------------------- scaling
def fit_scale(measured, model):
    """The constant c that best fits ``measured ~ c * model`` on a log scale (geometric mean)."""
    measured, model = np.asarray(measured, np.float64), np.asarray(model, np.float64)
    if measured.shape != model.shape or (measured <= 0).any() or (model <= 0).any():
        raise ValueError("fit_scale: measured and model must be positive arrays of one shape, "
                         f"got {measured.shape} and {model.shape}")
    return float(np.exp(np.mean(np.log(measured / model))))


def plot_against_model(ax, x, measured, model, label, color=None, model_label=None):
    """Measured values (markers) and ``c * model`` (dashed) on log-log axes; returns c.

    ``model`` is a cost formula evaluated at ``x`` (e.g. multiply-adds or bytes); ``c`` is
    fitted by :func:`fit_scale`, so the plot compares the *shape* of the growth (the
    slope on log-log axes), not the constant.
    """
    c = fit_scale(measured, model)
    line, = ax.loglog(x, measured, "o", color=color, label=f"{label} (measured)")
    ax.loglog(x, c * np.asarray(model, np.float64), "--", color=line.get_color(),
              label=model_label or f"{label} (formula, fitted constant)")
    ax.grid(True, which="both", alpha=0.3)
    return c


__all__ = ["head_colors", "to_pixels", "feature_to_image", "show_map", "draw_sampling_points",
           "draw_levels", "draw_bilinear_neighbourhood", "fit_scale", "plot_against_model"]
