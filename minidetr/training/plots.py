"""Pictures of a run: loss curves, AP curves, and detections drawn on images (PNG).

Everything is drawn with Matplotlib's Agg canvas directly (``Figure`` +
``FigureCanvasAgg``), never through ``pyplot``, so no global backend or figure state is
touched: these functions work the same in a script, a test or a notebook.

``history`` below is the list of per-epoch metric dicts a run writes to
``metrics.jsonl``: ``{"epoch": 1, "train_loss": ..., "train_loss_ce": ..., "val_loss": ...,
"AP": ..., ...}`` (keys may be missing for epochs without evaluation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..files import atomic_write

LOSS_TERMS = ("loss", "loss_ce", "loss_bbox", "loss_giou")
AP_CURVES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def new_figure(width, height):
    """A Matplotlib ``Figure`` of ``width`` x ``height`` inches on its own Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, tight=True):
    """Save ``fig`` at ``path``, atomically (folders made); return the path.

    The format follows the suffix: ``.jpg``/``.jpeg`` JPEG (quality 90; a 640 x 480 COCO
    photo with its boxes: 110 KB, against 650 KB as PNG), anything else PNG. ``tight`` first lays the axes out with
    ``tight_layout``.
    """
    if tight:
        fig.tight_layout()
    jpeg = Path(path).suffix.lower() in (".jpg", ".jpeg")
    with atomic_write(path) as f:
        if jpeg:
            fig.savefig(f, format="jpg", dpi=100, pil_kwargs={"quality": 90})
        else:
            fig.savefig(f, format="png", dpi=100)
    return Path(path)


def _epoch_axis(ax):
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _series(history, key):
    """(epochs, values) of the epochs where ``key`` was logged (and is not -1 = "no data")."""
    points = [(h["epoch"], h[key]) for h in history if h.get(key) is not None and h[key] != -1]
    if not points:
        return np.zeros(0), np.zeros(0)
    e, v = zip(*points)
    return np.asarray(e), np.asarray(v, dtype=np.float64)


def plot_losses(history, path, terms=LOSS_TERMS):
    """One panel per loss term (train solid, validation dashed) over epochs; returns path.

    ``loss`` is the weighted total; the others are the unweighted terms of the last
    decoder layer (their weights are 2, 5 and 2 in the total).
    """
    fig = new_figure(4.0 * len(terms), 3.4)
    axes = fig.subplots(1, len(terms), squeeze=False)[0]
    for ax, term in zip(axes, terms):
        for split, style in (("train", "-"), ("val", "--")):
            epochs, values = _series(history, f"{split}_{term}")
            if len(epochs):
                ax.plot(epochs, values, style, marker="o", markersize=3, label=split)
        ax.set_title(term if term != "loss" else "loss (weighted total)")
        _epoch_axis(ax)
        ax.grid(alpha=0.3)
        ax.legend()
    return save_figure(fig, path)


def ap_axis_top(history, curves=AP_CURVES) -> float:
    """The top of the AP axis: 15% above the highest value drawn, at least 0.01, at most 1."""
    values = [v for name in curves for v in _series(history, name)[1]]
    return min(1.0, max(1.15 * max(values, default=0.0), 0.01))


def plot_ap(history, path, curves=AP_CURVES):
    """COCO AP (and AP50, AP75, by size) on the validation set over epochs; returns path.

    The y axis runs from 0 to a little above the highest value drawn (so curves that stay
    below 0.1, as early in a real-data run, are readable), the legend sits outside the
    axes, and a metric that is -1 at every epoch (no object of that size in the validation
    images, e.g. APl on small images) is listed as such instead of drawn.
    """
    fig = new_figure(7.2, 4.0)
    ax = fig.subplots()
    absent = []
    for name in curves:
        epochs, values = _series(history, name)
        if len(epochs):
            ax.plot(epochs, values, marker="o", markersize=3, label=name)
        elif any(h.get(name) == -1 for h in history):
            absent.append(name)
    ax.set_ylim(0, ap_axis_top(history, curves))
    _epoch_axis(ax)
    ax.set_ylabel("COCO average precision")
    ax.set_title("validation AP")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    if absent:
        ax.text(1.02, 0.0, "\n".join(f"{name} = -1:" for name in absent)
                + "\nno object of\nthat size in\nthe images", transform=ax.transAxes,
                fontsize=7, va="bottom", ha="left")
    return save_figure(fig, path)


def draw_detections(image, detections, class_names, path, score_threshold=0.5,
                    ground_truth=None, title=None):
    """Draw boxes with class names and scores on an image and save it; returns path.

    The format follows the suffix of ``path`` (``.jpg`` or ``.png``, see
    :func:`save_figure`). Boxes are clipped to the image (the official post-processing
    does not clip; the numbers printed and evaluated are not changed by this), and every
    label stays inside the image: above its box when there is room, inside it otherwise.

    Args:
        image: a PIL image or an (H, W, 3) uint8 array (the original image).
        detections: {"scores" (k,), "labels" (k,), "boxes" (k, 4) xyxy pixels}.
        class_names: a callable ``label -> name`` or a sequence indexed by label.
        score_threshold: detections scoring below it are not drawn.
        ground_truth: optional {"labels" (T,), "boxes" (T, 4) xyxy}, drawn dashed white.
        title: text above the image.
    """
    from matplotlib.patches import Rectangle

    pixels = np.asarray(image)
    h, w = pixels.shape[:2]
    name_of = class_names if callable(class_names) else (lambda label: class_names[label])
    colours = _palette()
    scale = max(1.0, 512 / max(h, w))            # small images are shown larger
    fig = new_figure(w * scale / 100, h * scale / 100 + (0.3 if title else 0))
    ax = fig.add_axes((0, 0, 1, 1 if not title else h / (h + 30 / scale)))
    ax.imshow(pixels)
    ax.set_axis_off()
    if ground_truth is not None:
        for box in np.asarray(ground_truth["boxes"]).reshape(-1, 4):
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white",
                                   linestyle="--", linewidth=1.0))
    scores = np.asarray(detections["scores"])
    keep = np.flatnonzero(scores >= score_threshold)
    text_h = 13 / scale                               # a label's height in image pixels
    char_w = 5.5 / scale                              # ... and its width per character
    for i in keep[np.argsort(scores[keep])]:          # best drawn last (on top)
        label = int(detections["labels"][i])
        x0, y0, x1, y1 = np.clip(np.asarray(detections["boxes"][i], dtype=np.float64),
                                 0, [w, h, w, h])     # clipped to the image
        colour = colours[label % len(colours)]
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour,
                               linewidth=2.0))
        text = f"{name_of(label)} {scores[i]:.2f}"
        above = y0 >= text_h                          # room above the box?
        tx = min(x0, max(0.0, w - len(text) * char_w))   # not past the right edge
        ax.text(tx, y0 if above else min(y0, h - text_h), text, color="black", fontsize=8,
                va="bottom" if above else "top", clip_on=True,
                bbox={"facecolor": colour, "alpha": 0.8, "pad": 1, "edgecolor": "none"})
    if title:
        fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, tight=False)


def _palette():
    from matplotlib import colormaps
    return [colormaps["tab10"](i) for i in range(10)]


__all__ = ["plot_losses", "plot_ap", "ap_axis_top", "draw_detections", "new_figure", "save_figure",
           "LOSS_TERMS", "AP_CURVES"]
