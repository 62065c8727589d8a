"""Kernel launches of one training step, counted without a GPU: ``bench launches``.

On a GPU every array operation is at least one kernel launch, and launching costs a few
microseconds however small the array. At the sizes of the ``tiny`` and ``small`` models
many kernels finish faster than that, so the *number* of launches, not the arithmetic,
sets the time of a step. This benchmark counts them on :mod:`minidetr.testing.fakecupy`
(NumPy underneath: no GPU needed, the counts are those CuPy would make): it runs two
training steps of :func:`minidetr.training.engine.train_step` (forward, losses with the
matcher, backward, clipping, AdamW) on a synthetic batch and counts the second one (the
first also creates the AdamW moments). For each variant it prints and writes (default
``runs/bench/launches.json``):

* launches per component, forward and backward: where in the model the kernels come
  from. A backward kernel belongs to the component whose forward created the operation
  (while the benchmark runs, every autograd node is tagged with the component of the code
  that recorded it). ``msda`` is the deformable attention op itself (its projections
  belong to the encoder or decoder layer that calls it); ``autograd engine`` sums the
  gradients of tensors used more than once; ``optimiser`` is clipping and AdamW;
  ``engine`` reads the logged values;
* the 15 call sites (the innermost minidetr function) that launch the most kernels;
* the step's device -> host copies, by reason (as the transfer guard logs them).

Shapes: images (B, 3, H, W) with ``--batch`` B (default 2) and ``--size`` H x W (the
preset's default of ``bench train``: 128x128 for ``tiny``, 800x1066 for ``small`` and
``paper``; on a CPU a step of ``small`` at that size takes about ten seconds, one of
``paper`` longer).
"""
from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np

from ..autograd import profiling
from ..backend import transfer_guard
from ..files import write_json
from ..models.config import PRESETS as MODEL_PRESETS
from ..testing import fakecupy
from .common import parse_size, synthetic_batch, variant_names

DEFAULT_JSON = Path("runs") / "bench" / "launches.json"
TOP_SITES = 15

# Components, by the minidetr function that launched a kernel: the innermost function on
# the stack whose "path:qualified.name" starts with one of the prefixes picks the row.
COMPONENTS = (
    ("msda", ("ops/msda/",)),
    ("optimiser", ("optim.py:", "ops/adamw_kernel.py:")),
    ("losses+matcher", ("models/criterion.py:", "models/matcher.py:")),
    ("encoder", ("models/deformable_transformer.py:DeformableTransformerEncoder",)),
    ("decoder", ("models/deformable_transformer.py:DeformableTransformerDecoder",)),
    ("transformer (other)", ("models/deformable_transformer.py:",)),
    ("position encoding", ("models/position_encoding.py:",)),
    ("backbone", ("models/backbone.py:",)),
    ("input projections, heads", ("models/deformable_detr.py:",)),
    ("engine", ("training/engine.py:",)),
)
NOT_THE_MODEL = ("optimiser", "engine")          # their launches are neither pass
ROWS = ("backbone", "position encoding", "input projections, heads", "transformer (other)",
        "encoder", "decoder", "msda", "losses+matcher", "autograd engine", "engine",
        "optimiser", "other")                    # the table's order: the data's path
BACKWARD = "autograd.py:Tensor.backward"


# --------------------------------------------------------------------------- attribution
def forward_component(frame) -> str:
    """The component of the code running at ``frame`` (see :data:`COMPONENTS`)."""
    for name, _ in fakecupy.minidetr_frames(frame):
        for component, prefixes in COMPONENTS:
            if name.startswith(prefixes):
                return component
    return "other"


def component_and_pass(frame):
    """``(component, "forward" | "backward")`` of a kernel launched at ``frame``."""
    for depth, (name, outer) in enumerate(fakecupy.minidetr_frames(frame)):
        if name == BACKWARD:
            if depth == 0:                    # the engine itself: gradient sums, copies
                return "autograd engine", "backward"
            node = outer.f_locals.get("node")  # the node whose backward is running
            return getattr(node.ctx, "component", "other"), "backward"
    return forward_component(frame), "forward"


class NodeTagger:
    """A profiler for :func:`minidetr.autograd.profiling`: each recorded autograd node keeps
    the component of the code that created it in ``ctx.component``; backward runs as usual."""

    def apply(self, cls, args, kwargs):
        result = cls._apply(*args, **kwargs)
        if result._node is not None:          # frame 1 is Function.apply, 2 its caller
            result._node.ctx.component = forward_component(sys._getframe(2))
        return result

    def backward(self, node, grad):
        return node.fn.backward(node.ctx, grad)


def tagging_nodes():
    """While active, each recorded autograd node keeps its creator's component in
    ``ctx.component`` (through the autograd profiling hook; nothing is patched)."""
    return profiling(NodeTagger())


# --------------------------------------------------------------------------- one variant
def count_step_launches(config="tiny", variant="plain", batch=2, size=None, seed=0) -> dict:
    """Launches of the second of two training steps on the fake GPU (see the module
    docstring). Returns ``{"total", "by_component": {component: {"forward", "backward"}},
    "top_call_sites": [(site, count), ...], "host_copies": {reason: count}}``."""
    from ..models.build import build_criterion, build_model
    from ..models.config import get_config
    from ..optim import AdamW
    from ..training import TrainConfig
    from ..training.engine import build_param_groups, train_step

    height, width = parse_size(size, config)
    cfg = get_config(config, variant)
    data = synthetic_batch(batch, height, width, cfg.num_classes, np.random.default_rng(seed))
    with fakecupy.installed():
        model = build_model(cfg).to("cuda")
        train_cfg = TrainConfig()
        optimizer = AdamW(build_param_groups(model, train_cfg), lr=train_cfg.lr,
                          weight_decay=train_cfg.weight_decay)
        criterion = build_criterion(cfg)
        with tagging_nodes():
            train_step(model, criterion, optimizer, data, device="cuda")   # makes moments
            with fakecupy.count_launches(component_and_pass) as by_component, \
                    fakecupy.count_launches() as by_site, transfer_guard() as copies:
                train_step(model, criterion, optimizer, data, device="cuda")
    table = collections.defaultdict(lambda: {"forward": 0, "backward": 0})
    for (component, direction), n in by_component.items():
        table[component][direction] += n
    return {"total": sum(by_site.values()),
            "by_component": {c: table[c] for c in sorted(table, key=ROWS.index)},
            "top_call_sites": by_site.most_common(TOP_SITES),
            "host_copies": dict(copies)}


# --------------------------------------------------------------------------- the command
def _print_result(variant, result, print_fn):
    total = result["total"]
    print_fn(f"\n{variant}: {total} kernel launches per training step")
    print_fn(f"  {'component':<26}{'forward':>9}{'backward':>10}{'total':>8}{'share':>7}")
    for component, counts in result["by_component"].items():
        n = counts["forward"] + counts["backward"]
        if component in NOT_THE_MODEL:
            forward = backward = "-"
        else:
            forward, backward = counts["forward"], counts["backward"]
        print_fn(f"  {component:<26}{forward:>9}{backward:>10}{n:>8}{n / total:>7.0%}")
    print_fn(f"  top {len(result['top_call_sites'])} call sites:")
    for site, n in result["top_call_sites"]:
        print_fn(f"  {n:>8}  {site}")
    copies = ", ".join(f"{reason} x{n}" for reason, n in result["host_copies"].items())
    print_fn(f"  device -> host copies: {copies or 'none'}")


def bench_launches(config="tiny", variants="plain", batch=2, size=None, json_path=None,
                   seed=0, print_fn=print):
    """Count and print the kernel launches of a training step per variant; write JSON.

    Args:
        config: "tiny", "small" or "paper".
        variants: comma-separated names among plain, refine, two-stage, or "all".
        batch, size: images per step and their "HxW" (None: the preset's default).
        json_path: where to write the results (default ``runs/bench/launches.json``).

    Returns:
        ``{variant: result}`` with the results of :func:`count_step_launches`.
    """
    if config not in MODEL_PRESETS:
        raise ValueError(f"unknown config {config!r}; choose from {list(MODEL_PRESETS)}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an int >= 1, got {batch!r}")
    height, width = parse_size(size, config)
    print_fn(f"kernel launches of one training step (the second), config {config}, batch "
             f"{batch} of {height}x{width} (HxW), counted on minidetr.testing.fakecupy")
    results = {}
    for variant in variant_names(variants):
        results[variant] = count_step_launches(config, variant, batch, (height, width), seed)
        _print_result(variant, results[variant], print_fn)
    path = Path(json_path) if json_path else DEFAULT_JSON
    write_json(path, dict(benchmark="launches", config=config, batch=batch, height=height,
                          width=width, results=results))
    print_fn(f"\nwrote {path}")
    return results


__all__ = ["bench_launches", "count_step_launches", "component_and_pass",
           "forward_component", "tagging_nodes", "COMPONENTS"]
