"""A ResNet's 3x3 stride-1 convolutions by im2col and by Winograd: ``bench conv``.

Stage k = 0..3 of a ResNet (``layer1`` .. ``layer4``) holds 3x3 stride-1 convolutions with
64 * 2^k channels in and out, on the image downsampled 4 * 2^k times: both convolutions
of a ResNet-18/34 block, the middle one of a ResNet-50 bottleneck. For a batch of images
of one size, this times each stage's convolution forward, and forward + backward (the
gradients of the input and of the weights), with ``conv2d(algorithm="im2col")``,
``"winograd"`` (F(2x2, 3x3)) and ``"winograd4"`` (F(4x4, 3x3)), and says which one
``algorithm="auto"`` takes (:func:`auto_choice`). The numbers behind the Winograd entry
of docs/profile.md, section 7.

Shapes: x (N, C, ceil(H / s), ceil(W / s)) with s = 4 * 2^k, weight (C, C, 3, 3).
"""
from __future__ import annotations

import os
import statistics
from pathlib import Path

import numpy as np

from ..files import write_json
from .common import cpu_time_ms, machine_info, parse_size

DEFAULT_JSON = Path("runs/bench/conv.json")
STAGES = ("layer1", "layer2", "layer3", "layer4")
ALGORITHMS = ("im2col", "winograd", "winograd4")


def stage_shapes(batch, height, width):
    """``[(stage, (N, C, H_k, W_k)), ...]``: the input of each stage's 3x3 convolutions."""
    shapes = []
    for k, stage in enumerate(STAGES):
        stride = 4 * 2 ** k
        shapes.append((stage, (batch, 64 * 2 ** k, -(-height // stride), -(-width // stride))))
    return shapes


def auto_choice(x, w):
    """The algorithm ``conv2d(x, w, padding=1, algorithm="auto")`` takes (stride 1)."""
    from ..functional import winograd, winograd4

    geometry = ((1, 1), (1, 1), (1, 1))
    if winograd4.applies(x, w, *geometry):
        return "winograd4"
    return "winograd" if winograd.applies(x, w, *geometry) else "im2col"


def _timed_calls(x, w, grad, algorithm):
    """(forward, forward_backward): closures that run one convolution with ``algorithm``."""
    from .. import functional as F
    from ..autograd import Tensor

    def forward():
        F.conv2d(x, w, padding=1, algorithm=algorithm)

    def forward_backward():
        xt, wt = Tensor(x, requires_grad=True), Tensor(w, requires_grad=True)
        F.conv2d(xt, wt, padding=1, algorithm=algorithm).backward(grad)

    return forward, forward_backward


def bench_conv(batch=2, size=None, repeats=5, dtype="float32", json_path=None,
               print_fn=print):
    """Time each stage's 3x3 convolution by each algorithm; print a table, write JSON.

    Args:
        batch: images per call (N).
        size: the network's input ``"HEIGHTxWIDTH"`` or (H, W); default 256x256 (the
            ``small`` profile's).
        repeats: timed calls per measurement (the median is reported).
        dtype: "float32" or "float64".
        json_path: where to write the results (default ``runs/bench/conv.json``).

    Returns:
        the list of result rows (dicts), as written to the JSON file: per stage the shape,
        ``tiles`` (2x2 tiles) and ``tiles4`` (4x4 tiles), ``auto``, ``<algorithm>_forward_ms``
        and ``<algorithm>_total_ms`` (forward + backward), and ``speedup``: im2col's
        forward + backward over that of the algorithm auto takes.
    """
    from ..functional import winograd

    if batch < 1 or repeats < 1:
        raise ValueError(f"batch and repeats must be >= 1, got {batch} and {repeats}")
    height, width = parse_size((256, 256) if size is None else size)
    rng = np.random.default_rng(0)
    machine = machine_info()
    print_fn(f"3x3 stride-1 convolutions of a ResNet, input {batch}x3x{height}x{width}, "
             f"{dtype}, median of {repeats} interleaved (after a warm-up call); {machine['cpu_count']} "
             f"CPUs, load average {machine['load_average_1min']:.2f}")
    print_fn(f"{'stage':7} {'x shape':>20} {'tiles':>6} {'tiles4':>6} {'auto':>9} "
             f"{'im2col fwd':>11} {'fwd+bwd':>9} {'winograd fwd':>13} {'fwd+bwd':>9} "
             f"{'winograd4 fwd':>14} {'fwd+bwd':>9} {'speed-up':>9}")
    rows = []
    for stage, shape in stage_shapes(batch, height, width):
        N, C, H, W = shape
        x = rng.standard_normal(shape).astype(dtype)                     # (N, C, H, W)
        w = (rng.standard_normal((C, C, 3, 3)) / np.sqrt(9 * C)).astype(dtype)
        grad = rng.standard_normal(shape).astype(dtype)                  # dL/dy, (N, C, H, W)
        th, tw = winograd.tile_counts(H, W)
        th4, tw4 = winograd.tile_counts(H, W, 4)
        auto = auto_choice(x, w)
        row = dict(stage=stage, N=N, C=C, H=H, W=W, tiles=N * th * tw, tiles4=N * th4 * tw4,
                   auto=auto, dtype=dtype, repeats=repeats)
        calls = {algorithm: _timed_calls(x, w, grad, algorithm) for algorithm in ALGORITHMS}
        for forward, forward_backward in calls.values():
            forward_backward()                                 # compile / warm up, not timed
        # Interleaved: round r times every algorithm once, so that a slow spell of a
        # shared machine hits them all alike; then the median of each.
        times = {(algorithm, kind): [] for algorithm in ALGORITHMS for kind in ("forward", "total")}
        for _ in range(repeats):
            for algorithm, (forward, forward_backward) in calls.items():
                times[algorithm, "forward"].append(cpu_time_ms(forward))
                times[algorithm, "total"].append(cpu_time_ms(forward_backward))
        for (algorithm, kind), values in times.items():
            row[f"{algorithm}_{kind}_ms"] = statistics.median(values)
        row["speedup"] = row["im2col_total_ms"] / row[f"{auto}_total_ms"]
        rows.append(row)
        print_fn(f"{stage:7} {str(shape):>20} {row['tiles']:6d} {row['tiles4']:6d} {auto:>9} "
                 f"{row['im2col_forward_ms']:11.2f} {row['im2col_total_ms']:9.2f} "
                 f"{row['winograd_forward_ms']:13.2f} {row['winograd_total_ms']:9.2f} "
                 f"{row['winograd4_forward_ms']:14.2f} {row['winograd4_total_ms']:9.2f} "
                 f"{row['speedup']:8.2f}x")
    print_fn("ms per call; winograd: F(2x2, 3x3), winograd4: F(4x4, 3x3); tiles: 2x2 tiles, "
             "tiles4: 4x4 tiles; fwd+bwd: forward and the gradients of input and weights; "
             "speed-up: im2col's fwd+bwd over that of auto's choice")
    path = Path(json_path) if json_path else DEFAULT_JSON
    machine["load_average_1min_after"] = os.getloadavg()[0]
    write_json(path, dict(benchmark="conv", batch=batch, height=height, width=width,
                          dtype=dtype, repeats=repeats, machine=machine, results=rows))
    print_fn(f"results written to {path}")
    return rows


__all__ = ["auto_choice", "bench_conv", "stage_shapes"]
