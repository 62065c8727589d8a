"""Where a CPU training step's time goes: ``python -m minidetr bench profile``.

One training iteration (what :func:`minidetr.training.engine.train_step` does: batch to
the device, forward, matcher and losses, backward, clipping, AdamW, reading the logged
values) is run under a :class:`StepProfiler` and broken down by component:

=======================  ==========================================================
``backbone``             the ResNet / tiny CNN (``model.backbone[0]``)
``position encoding``    the sine position embeddings (``model.backbone[1]``)
``input projection``     ``input_proj`` convs + GroupNorm, extra levels (the rest of
                         ``project_features``)
``transformer (other)``  flattening the levels, queries, two-stage proposals
``encoder``              the encoder layers, without the deformable attention op
``encoder msda``         :class:`~minidetr.ops.msda.MSDeformAttnFunction` in the encoder
``decoder``, ``decoder msda``  the same for the decoder
``heads``                class and box heads, and the rest of the model's ``forward``
``matcher``              the Hungarian matcher (cost matrix, assignment)
``losses``               every loss term and their weighted sum
``autograd engine``      the backward walk itself: topological sort, summing gradients
                         of tensors used twice, shape checks
``clipping``             ``clip_grad_norm_`` (max norm 0.1)
``AdamW``                ``zero_grad`` and ``step``
``other``                the batch to the device, reading the logged values
=======================  ==========================================================

How time is attributed. The profiler keeps a stack of *scopes*; at every scope change it
charges the time since the last change to the scope on top, so every microsecond of the
step lands in exactly one row and the rows add up to the step's wall time. Model scopes
come from wrapping the ``forward`` of the model's parts (on those instances only, undone
on exit); the step's phases are ``with`` blocks in :func:`profiled_train_step`. Backward
time is charged to the component whose forward created each autograd node: every node
records its scope when it is made, and the backward engine times each node's
``backward`` through the profiler. What remains of ``backward()`` is the engine's own
overhead. The profiler is installed explicitly with :func:`minidetr.autograd.profiling`;
when none is installed the autograd core pays one attribute lookup per operation.

The idea is the one of ``bench launches`` (:mod:`.launches`): a backward belongs to the
component whose forward recorded the node. The forward side differs: ``launches`` names
the component of each kernel from its call site (a walk up the Python stack), which
suits counting; a time profile must also place the Python between two Functions, and a
stack walk per Function would cost as much as a small Function itself, so the
components here are scopes that the model's parts open and close.

Also per component: the number of Function calls (forward applications and backward
node calls) and the bytes of the arrays they newly allocate (every Function output and
every input gradient that owns its memory; views are free). These are *temporary* bytes:
most are freed within the step. A second table lists the 10 Functions (by class) whose
own forward and backward take the most time, whatever component called them: where to
look inside a slow component.

The profiled iteration costs a little more than a plain one (the bookkeeping); the table
also gives the median time of plain :func:`~minidetr.training.engine.train_step` calls
on the same batch, and the profiler's overhead.

Shapes: images (B, 3, H, W) with ``--batch`` B and ``--size`` H x W (defaults: 8 of
128x128 for ``tiny``, 2 of 256x256 for ``small``, 1 of 512x512 for ``paper``).
"""
from __future__ import annotations

import collections
import math
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..autograd import profiling
from ..files import write_json
from ..models.config import PRESETS as MODEL_PRESETS
from .common import machine_info, parse_size, synthetic_batch, variant_names

DEFAULT_JSON = Path("runs") / "bench" / "profile.json"
DEFAULT_SHAPES = {"tiny": (8, "128x128"), "small": (2, "256x256"), "paper": (1, "512x512")}
FORWARD, BACKWARD, STEP = "forward", "backward", "step"   # the passes of a row
OTHER = ("other", STEP)                                    # the step's root scope
TOP_FUNCTIONS = 10                                         # rows of the Function table
STEP_ROWS = ("clipping", "AdamW", "other")               # neither forward nor backward
COMPONENTS = ("backbone", "position encoding", "input projection", "transformer (other)",
              "encoder", "encoder msda", "decoder", "decoder msda", "heads", "matcher",
              "losses", "autograd engine", "clipping", "AdamW", "other")


# --------------------------------------------------------------------------- the profiler
class StepProfiler:
    """Exclusive time, Function calls and allocated bytes per ``(component, pass)``.

    Install it with ``with minidetr.autograd.profiling(profiler):`` so that the autograd
    core calls :meth:`apply` and :meth:`backward`; open scopes with :meth:`scope` (and
    let :meth:`attach` open those of a model's parts and of the matcher). ``seconds``,
    ``calls`` and ``bytes`` are Counters keyed by ``(component, pass)``, pass
    ``"forward"``, ``"backward"`` (the model's parts, the autograd engine) or ``"step"``
    (clipping, AdamW, other); ``function_seconds`` is keyed by ``(Function name, pass)``.
    Between :meth:`restart` and :meth:`finish`, every second lands in ``seconds``.

    Args:
        op_scopes: ``{Function subclass: suffix}``: applications of that Function open a
            scope "<enclosing component> <suffix>" (default: the MSDA op, "msda").
    """

    def __init__(self, op_scopes=None, clock=time.perf_counter):
        if op_scopes is None:
            from ..ops.msda import MSDeformAttnFunction
            op_scopes = {MSDeformAttnFunction: "msda"}
        self.op_scopes = dict(op_scopes)
        self.clock = clock
        self.seconds = collections.Counter()
        self.calls = collections.Counter()
        self.bytes = collections.Counter()
        self.function_seconds = collections.Counter()    # keyed by (Function name, pass)
        self.stack = [OTHER]
        self.last = clock()

    # -- scopes
    def _switch(self):
        """Charge the time since the last switch to the scope on top; restart the clock."""
        now = self.clock()
        self.seconds[self.stack[-1]] += now - self.last
        self.last = now

    @contextmanager
    def scope(self, component, pass_=FORWARD):
        """Charge the time spent inside (minus inner scopes) to ``(component, pass_)``."""
        self._switch()
        self.stack.append((component, pass_))
        try:
            yield
        finally:
            self._switch()
            self.stack.pop()

    def restart(self):
        """Forget the time before now (call just before the step begins)."""
        self.last = self.clock()

    def finish(self):
        """Charge the time up to now to the scope on top (call when the step ends)."""
        self._switch()

    # -- the autograd core's hooks (see minidetr.autograd.profiling)
    def apply(self, cls, args, kwargs):
        """One Function application: run it, count it, tag its node with the scope."""
        suffix = self.op_scopes.get(cls)
        start = self.clock()
        if suffix is None:
            result = cls._apply(*args, **kwargs)
            key = self.stack[-1]
        else:
            key = (f"{self.stack[-1][0]} {suffix}", FORWARD)
            with self.scope(*key):
                result = cls._apply(*args, **kwargs)
        self.function_seconds[(cls.__name__, FORWARD)] += self.clock() - start
        self.calls[key] += 1
        self.bytes[key] += _owned_bytes(result.data)
        if result._node is not None:
            result._node.ctx.profile_scope = key[0]
        return result

    def backward(self, node, grad):
        """One node of the backward walk, charged to the component that created it."""
        key = (getattr(node.ctx, "profile_scope", "other"), BACKWARD)
        with self.scope(*key):
            start = self.clock()
            grads = node.fn.backward(node.ctx, grad)
            self.function_seconds[(node.fn.__name__, BACKWARD)] += self.clock() - start
        self.calls[key] += 1
        for g in grads if isinstance(grads, tuple) else (grads,):
            if g is not None:
                self.bytes[key] += _owned_bytes(g)
        return grads

    # -- the model's parts
    @contextmanager
    def attach(self, model, criterion):
        """Scope the model's parts and the matcher (see the module docstring); undone on
        exit. Only these instances change: their ``forward`` (the matcher: the
        criterion's ``matcher`` attribute) is wrapped. The losses are scoped by
        :func:`profiled_train_step`."""
        parts = [(model, "forward", "heads"),
                 (model, "project_features", "input projection"),
                 (model.backbone, "forward", "backbone"),
                 (model.backbone[1], "forward", "position encoding"),
                 (model.transformer, "forward", "transformer (other)"),
                 (model.transformer.encoder, "forward", "encoder"),
                 (model.transformer.decoder, "forward", "decoder")]
        parts += [(head, "forward", "heads") for head in [*model.class_embed,
                                                          *model.bbox_embed]]
        wrapped, matcher = [], criterion.matcher
        try:
            for obj, attr, component in parts:
                if attr not in obj.__dict__:          # a module shared by two lists: once
                    object.__setattr__(obj, attr, self._scoped(getattr(obj, attr), component))
                    wrapped.append((obj, attr))
            criterion.matcher = self._scoped(matcher, "matcher")
            yield self
        finally:
            for obj, attr in wrapped:
                del obj.__dict__[attr]
            criterion.matcher = matcher

    def _scoped(self, fn, component):
        def scoped(*args, **kwargs):
            with self.scope(component):
                return fn(*args, **kwargs)
        return scoped


def _owned_bytes(array) -> int:
    """Bytes ``array`` allocated itself (0 for a view of another array)."""
    return 0 if getattr(array, "base", None) is not None else int(getattr(array, "nbytes", 0))


# --------------------------------------------------------------------------- one step
def profiled_train_step(model, criterion, optimizer, batch, profiler, *, clip_max_norm=0.1,
                        device="cpu"):
    """:func:`minidetr.training.engine.train_step`, the same calls in the same order, with
    the step's phases in scopes of ``profiler`` (which must be installed and attached).

    Returns the logged values, as ``train_step`` does. A test checks that both give
    bit-identical gradients and parameters.
    """
    from ..optim import clip_grad_norm_
    from ..training.engine import batch_to_device, loss_values

    images, mask, targets = batch_to_device(batch, device)
    outputs = model(images, mask)
    with profiler.scope("losses"):
        losses = criterion(outputs, targets)
        loss = criterion.total(losses)
    with profiler.scope("AdamW", STEP):
        optimizer.zero_grad()
    with profiler.scope("autograd engine", BACKWARD):
        loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    measure_only = clip_max_norm is None or clip_max_norm <= 0
    with profiler.scope("clipping", STEP):
        grad_norm = clip_grad_norm_(params, math.inf if measure_only else clip_max_norm,
                                    host=False)
    values = loss_values({"loss": loss, **losses, "grad_norm": grad_norm})
    if not (math.isfinite(values["loss"]) and math.isfinite(values["grad_norm"])):
        raise FloatingPointError(f"bench profile: non-finite loss or gradient norm {values}")
    with profiler.scope("AdamW", STEP):
        optimizer.step()
    return values


def profile_steps(config="tiny", variant="plain", batch=None, size=None, iterations=3,
                  warmup=1, seed=0) -> dict:
    """Profile ``iterations`` training iterations on the CPU after ``warmup`` plain ones.

    Returns a dict with ``rows`` (one per component: ``forward_ms``, ``backward_ms``,
    ``ms``, ``percent``, ``calls``, ``bytes``, per iteration), ``profiled_ms`` (the
    mean wall time of a profiled iteration, measured around it), ``sum_ms`` (the rows'
    sum), ``plain_ms`` (median of ``iterations`` plain ``train_step`` calls), and the
    shapes.
    """
    from ..models.build import build_criterion, build_model
    from ..models.config import get_config
    from ..optim import AdamW
    from ..training import TrainConfig
    from ..training.engine import build_param_groups, long_lived_objects_frozen, train_step

    default_batch, default_size = DEFAULT_SHAPES[config]
    batch = default_batch if batch is None else batch
    height, width = parse_size(default_size if size is None else size, config)
    cfg = get_config(config, variant)
    recipe = TrainConfig()
    model = build_model(cfg)
    model.train()
    criterion = build_criterion(cfg)
    optimizer = AdamW(build_param_groups(model, recipe), lr=recipe.lr,
                      weight_decay=recipe.weight_decay)
    data = synthetic_batch(batch, height, width, cfg.num_classes, np.random.default_rng(seed))

    def plain():
        start = time.perf_counter()
        train_step(model, criterion, optimizer, data, clip_max_norm=recipe.clip_max_norm,
                   device="cpu", where="the benchmark")
        return (time.perf_counter() - start) * 1e3

    with long_lived_objects_frozen():                   # as Trainer.fit does
        for _ in range(warmup):
            plain()
        plain_ms = [plain() for _ in range(iterations)]

    profiler = StepProfiler()
    walls = []
    with profiling(profiler), profiler.attach(model, criterion), long_lived_objects_frozen():
        for _ in range(iterations):
            start = time.perf_counter()
            profiler.restart()
            profiled_train_step(model, criterion, optimizer, data, profiler,
                                clip_max_norm=recipe.clip_max_norm)
            profiler.finish()
            walls.append((time.perf_counter() - start) * 1e3)
    return dict(config=config, variant=variant, batch=batch, height=height, width=width,
                iterations=iterations, warmup=warmup,
                plain_ms=statistics.median(plain_ms), plain_times_ms=plain_ms,
                profiled_ms=sum(walls) / iterations, profiled_times_ms=walls,
                **_rows(profiler, iterations))


def _rows(profiler, iterations):
    """The per-component table (per iteration) from a profiler's counters."""
    keys = set(profiler.seconds) | set(profiler.calls)
    names = [c for c in COMPONENTS if any(k[0] == c for k in keys)]
    names += sorted({k[0] for k in keys} - set(names))        # anything unforeseen, last
    total_ms = sum(profiler.seconds.values()) * 1e3 / iterations
    rows = []
    for name in names:
        ms = {p: profiler.seconds[(name, p)] * 1e3 / iterations
              for p in (FORWARD, BACKWARD, STEP)}
        row_ms = sum(ms.values())
        rows.append(dict(component=name, forward_ms=ms[FORWARD], backward_ms=ms[BACKWARD],
                         ms=row_ms, percent=100 * row_ms / total_ms,
                         calls=sum(profiler.calls[(name, p)] for p in
                                   (FORWARD, BACKWARD, STEP)) // iterations,
                         bytes=sum(profiler.bytes[(name, p)] for p in
                                   (FORWARD, BACKWARD, STEP)) // iterations))
    functions = []
    for name in {k[0] for k in profiler.function_seconds}:
        ms = [profiler.function_seconds[(name, p)] * 1e3 / iterations
              for p in (FORWARD, BACKWARD)]
        functions.append(dict(function=name, forward_ms=ms[0], backward_ms=ms[1],
                              ms=sum(ms), percent=100 * sum(ms) / total_ms))
    functions.sort(key=lambda f: -f["ms"])
    return dict(rows=rows, functions=functions, sum_ms=total_ms,
                calls=sum(profiler.calls.values()) // iterations,
                bytes=sum(profiler.bytes.values()) // iterations)


# --------------------------------------------------------------------------- the command
def format_table(result) -> list:
    """The result of :func:`profile_steps` as lines of text (a Markdown table)."""
    lines = [f"| component | forward ms | backward ms | total ms | % of step | "
             f"Function calls | temporary MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        step_row = r["component"] in STEP_ROWS
        fwd = "-" if step_row or r["component"] == "autograd engine" else f"{r['forward_ms']:.1f}"
        bwd = "-" if step_row else f"{r['backward_ms']:.1f}"
        lines.append(f"| {r['component']} | {fwd} | {bwd} | {r['ms']:.1f} | "
                     f"{r['percent']:.1f} | {r['calls']} | {r['bytes'] / 2**20:.1f} |")
    lines.append(f"| **step** | | | **{result['sum_ms']:.1f}** | 100.0 | "
                 f"{result['calls']} | {result['bytes'] / 2**20:.1f} |")
    return lines


def format_functions(result, top=TOP_FUNCTIONS) -> list:
    """The ``top`` Functions by time (their own forward and backward, every component)."""
    lines = ["| Function | forward ms | backward ms | total ms | % of step |",
             "|---|---:|---:|---:|---:|"]
    for f in result["functions"][:top]:
        lines.append(f"| {f['function']} | {f['forward_ms']:.1f} | {f['backward_ms']:.1f} | "
                     f"{f['ms']:.1f} | {f['percent']:.1f} |")
    return lines


def bench_profile(config="tiny", variants="plain", batch=None, size=None, iterations=3,
                  warmup=1, json_path=None, seed=0, print_fn=print):
    """Profile a CPU training iteration per variant; print the tables, write JSON.

    Args:
        config: "tiny", "small" or "paper".
        variants: comma-separated names among plain, refine, two-stage, or "all".
        batch, size: images per step and their "HxW" (None: see :data:`DEFAULT_SHAPES`).
        iterations, warmup: profiled (and plain, timed) iterations; untimed ones first.
        json_path: where to write the results (default ``runs/bench/profile.json``).

    Returns:
        ``{variant: result}``, results of :func:`profile_steps`.
    """
    if config not in MODEL_PRESETS:
        raise ValueError(f"unknown config {config!r}; choose from {list(MODEL_PRESETS)}")
    for name, value, least in (("batch", batch, 1), ("iterations", iterations, 1),
                               ("warmup", warmup, 0)):
        if value is None and name == "batch":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    names = variant_names(variants)
    if size is not None:
        parse_size(size, config)                  # a bad --size fails before any work
    results = {}
    for variant in names:
        r = profile_steps(config, variant, batch, size, iterations, warmup, seed)
        results[variant] = r
        print_fn(f"\n{config} {variant}, batch {r['batch']} of {r['height']}x{r['width']} "
                 f"(HxW), cpu, mean of {iterations} profiled iterations after {warmup} "
                 "plain warm-up")
        for line in format_table(r):
            print_fn(line)
        print_fn(f"\nthe {TOP_FUNCTIONS} Functions that take the most time (all components):")
        for line in format_functions(r):
            print_fn(line)
        overhead = r["profiled_ms"] / r["plain_ms"] - 1
        print_fn(f"plain train_step: {r['plain_ms']:.1f} ms (median of {iterations}); "
                 f"profiled: {r['profiled_ms']:.1f} ms ({overhead:+.0%} vs plain); rows "
                 f"sum to {r['sum_ms']:.1f} ms")
    path = Path(json_path) if json_path else DEFAULT_JSON
    write_json(path, dict(benchmark="profile", config=config, machine=machine_info("cpu"),
                          results=results))
    print_fn(f"\nwrote {path}")
    return results


__all__ = ["StepProfiler", "bench_profile", "profile_steps", "profiled_train_step",
           "format_table", "format_functions", "COMPONENTS"]
