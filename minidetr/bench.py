"""Benchmarks: ``python -m minidetr bench msda`` (this module) and ``bench train``
(:mod:`minidetr.bench_train`: whole training iterations, beside transformers' model).

``bench_msda`` times multi-scale deformable attention, forward and backward (all three
gradients), for every requested backend at the paper's shapes, prints a table and writes
the numbers as JSON (default ``runs/bench/msda.json``).

Shape presets (4 levels of an 800 x 1200 padded batch, M = 8 heads, D = 32, K = 4):

    encoder   N=2, Lq = S = 19947: every pixel of every level is a query
    decoder   N=2, Lq = 300 object queries
    tiny      N=1, two small levels, M=2, K=2 (a quick smoke run)

The sampling locations imitate a trained model's: each query's reference point (its own
pixel centre in the encoder, a random point in the decoder) plus offsets of a few pixels
(N(0, 2) pixels per level), so the memory access pattern, and with it the cache
behaviour, is realistic rather than uniformly random.

Timing: one warm-up call of forward and backward first (it includes Numba's compilation
or CUDA's module loading, and is not counted), then ``repeats`` timed calls of each; the
table shows medians, and total = forward + backward. The backends are called through
their modules on inputs validated once, so argument checks are not timed. GPU backends
are timed with CUDA events. The NumPy reference, which compiles nothing and takes
seconds at the paper's shapes, is timed once there (the ``runs`` column says so).

To add a backend: register it in :mod:`minidetr.ops.msda`; it then appears here.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

PAPER_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))
SHAPES = {
    "encoder": dict(N=2, levels=PAPER_LEVELS, M=8, D=32, K=4, Lq=None),   # Lq = S
    "decoder": dict(N=2, levels=PAPER_LEVELS, M=8, D=32, K=4, Lq=300),
    "tiny": dict(N=1, levels=((16, 20), (8, 10)), M=2, D=32, K=2, Lq=None),
}
DEFAULT_JSON = Path("runs") / "bench" / "msda.json"


# --------------------------------------------------------------------------- inputs
def msda_inputs(shape: dict, dtype="float32", seed=0):
    """NumPy inputs for one preset, with realistic sampling locations.

    Returns ``(value, spatial_shapes, level_start_index, sampling_locations,
    attention_weights, grad_output)`` with shapes (N, S, M, D), (L, 2), (L,),
    (N, Lq, M, L, K, 2), (N, Lq, M, L, K), (N, Lq, M*D).
    """
    rng = np.random.default_rng(seed)
    N, M, D, K = shape["N"], shape["M"], shape["D"], shape["K"]
    spatial_shapes = np.array(shape["levels"], dtype=np.int64)              # (L, 2) (H, W)
    sizes = spatial_shapes[:, 0] * spatial_shapes[:, 1]
    level_start_index = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    S, L = int(sizes.sum()), len(sizes)
    if shape["Lq"] is None:           # encoder: a query at every pixel centre of every level
        centres = []
        for H, W in shape["levels"]:
            y, x = np.meshgrid((np.arange(H) + 0.5) / H, (np.arange(W) + 0.5) / W, indexing="ij")
            centres.append(np.stack([x.ravel(), y.ravel()], axis=-1))         # (H*W, 2) (x, y)
        reference = np.broadcast_to(np.concatenate(centres), (N, S, 2))     # (N, Lq, 2)
    else:                             # decoder: object queries anywhere in the image
        reference = rng.uniform(0.05, 0.95, size=(N, shape["Lq"], 2))
    Lq = reference.shape[1]
    pixel = 1.0 / spatial_shapes[:, ::-1]                                    # (L, 2): 1/W, 1/H
    offsets = rng.normal(0.0, 2.0, size=(N, Lq, M, L, K, 2)) * pixel[:, None, :]
    locations = reference[:, :, None, None, None, :] + offsets              # (N, Lq, M, L, K, 2)
    logits = rng.normal(size=(N, Lq, M, L * K))
    weights = np.exp(logits)
    weights /= weights.sum(axis=-1, keepdims=True)                          # softmax over L*K
    value = rng.standard_normal((N, S, M, D))
    grad_output = rng.standard_normal((N, Lq, M * D))
    as_dtype = lambda a: np.ascontiguousarray(a, dtype=dtype)  # noqa: E731
    return (as_dtype(value), spatial_shapes, level_start_index, as_dtype(locations),
            as_dtype(weights.reshape(N, Lq, M, L, K)), as_dtype(grad_output))


# --------------------------------------------------------------------------- timers
def _cpu_timer(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _gpu_timer(fn):
    """Seconds between two CUDA events around ``fn`` on the current stream."""
    import cupy as cp
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) / 1e3


def _median_ms(timer, fn, repeats):
    return 1e3 * statistics.median(timer(fn) for _ in range(repeats))


# --------------------------------------------------------------------------- driver
def _names(x, default):
    if x is None or x == "all":
        return list(default)
    return [s.strip() for s in x.split(",") if s.strip()] if isinstance(x, str) else list(x)


def _machine():
    """What the numbers depend on: CPU count, Numba threads, load, versions."""
    info = dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                numpy=np.__version__, load_average_1min=os.getloadavg()[0])
    try:
        import numba
        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    return info


def bench_msda(backends="all", repeats=5, shapes="encoder,decoder", dtype="float32",
               json_path=None, print_fn=print):
    """Time MSDA forward and backward per backend and shape; print a table, write JSON.

    Args:
        backends: backend names (list or comma-separated), or "all" for every available.
        repeats: timed calls per measurement (the median is reported).
        shapes: preset names from ``SHAPES`` (list or comma-separated).
        dtype: "float32" or "float64".
        json_path: where to write the results (default ``runs/bench/msda.json``).

    Returns:
        the list of result rows (dicts), as written to the JSON file.
    """
    from .backend import to_device
    from .ops import msda
    shape_names = _names(shapes, SHAPES)
    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape preset(s) {unknown}; known: {list(SHAPES)}")
    if backends is None or backends == "all":
        names = msda.available_backends()
    else:
        names = _names(backends, ())
        for name in names:
            ok, reason = msda.backend_status(name)        # raises for unknown names
            if not ok:
                print_fn(f"{name}: skipped ({reason})")
        names = [n for n in names if msda.backend_status(n)[0]]
        if not names:
            print_fn("none of the requested backends can run here: nothing to time")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    machine = _machine()
    print_fn(f"MSDA benchmark: {dtype}, median of {repeats} (after a warm-up call); "
             f"{machine['cpu_count']} CPUs, Numba threads {machine.get('numba_threads')}, "
             f"load average {machine['load_average_1min']:.2f}")
    print_fn(f"{'backend':12} {'shape':8} {'fwd ms':>10} {'bwd ms':>10} {'total ms':>10} {'runs':>5}")
    rows = []
    for shape_name in shape_names:
        host = msda_inputs(SHAPES[shape_name], dtype)
        for name in names:
            device = "cpu" if "cpu" in msda._DEVICES[name] else "cuda"
            *arrays, grad_output = [to_device(a, device) for a in host]
            inputs = msda.validate_inputs(*arrays)
            module = msda._module(name)
            timer = _cpu_timer if device == "cpu" else _gpu_timer
            forward = lambda: module.forward(*inputs)                     # noqa: E731
            backward = lambda: module.backward(grad_output, *inputs)      # noqa: E731
            slow = name == "numpy" and shape_name != "tiny"
            runs = 1 if slow else repeats
            if not slow:                                   # compile / load, not timed
                forward()
                backward()
            fwd = _median_ms(timer, forward, runs)
            bwd = _median_ms(timer, backward, runs)
            value, _, _, locations, _ = inputs
            N, S, M, D = value.shape
            _, Lq, _, L, K, _ = locations.shape
            row = dict(backend=name, shape=shape_name, dtype=dtype, forward_ms=fwd,
                       backward_ms=bwd, total_ms=fwd + bwd, runs=runs,
                       N=N, S=S, Lq=Lq, M=M, D=D, L=L, K=K)
            rows.append(row)
            print_fn(f"{name:12} {shape_name:8} {fwd:10.1f} {bwd:10.1f} {fwd + bwd:10.1f} {runs:5d}")

    # ---- GPU section (minidetr.bench_gpu): for the GPU rows, the roofline floor and the
    # achieved memory bandwidth; and PyTorch's grid_sample version, if PyTorch is there.
    from .bench_gpu import GPU_BACKENDS, gpu_section
    if any(row["backend"] in GPU_BACKENDS for row in rows):
        rows += gpu_section(rows, shape_names, dtype, repeats, print_fn)

    path = Path(json_path) if json_path else DEFAULT_JSON
    path.parent.mkdir(parents=True, exist_ok=True)
    machine["load_average_1min_after"] = os.getloadavg()[0]
    path.write_text(json.dumps(dict(benchmark="msda", dtype=dtype, repeats=repeats,
                                    machine=machine, results=rows), indent=2))
    print_fn(f"results written to {path}")
    return rows
