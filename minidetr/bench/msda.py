"""The deformable-attention benchmark: ``python -m minidetr bench msda``.

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

To add a backend: register it in :mod:`minidetr.ops.msda`; it then appears here. The
shapes and inputs are :mod:`minidetr.bench.common`'s; the GPU rows get their roofline
columns from :mod:`minidetr.bench.msda_gpu`.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..files import write_json
from .common import SHAPES, cpu_time_ms, cuda_time_ms, machine_info, median_ms, msda_inputs, names

DEFAULT_JSON = Path("runs") / "bench" / "msda.json"


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
    from ..backend import to_device
    from ..ops import msda
    from .msda_gpu import GPU_BACKENDS, gpu_section

    shape_names = names(shapes, SHAPES)
    unknown = [s for s in shape_names if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape preset(s) {unknown}; known: {list(SHAPES)}")
    if backends is None or backends == "all":
        chosen = msda.available_backends()
    else:
        chosen = names(backends, ())
        for name in chosen:
            ok, reason = msda.backend_status(name)        # raises for unknown names
            if not ok:
                print_fn(f"{name}: skipped ({reason})")
        chosen = [n for n in chosen if msda.backend_status(n)[0]]
        if not chosen:
            print_fn("none of the requested backends can run here: nothing to time")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    machine = machine_info()
    print_fn(f"MSDA benchmark: {dtype}, median of {repeats} (after a warm-up call); "
             f"{machine['cpu_count']} CPUs, Numba threads {machine.get('numba_threads')}, "
             f"load average {machine['load_average_1min']:.2f}")
    print_fn(f"{'backend':12} {'shape':8} {'fwd ms':>10} {'bwd ms':>10} {'total ms':>10} {'runs':>5}")
    rows = []
    for shape_name in shape_names:
        host = msda_inputs(SHAPES[shape_name], dtype)
        for name in chosen:
            device = msda.backend_device(name)
            *arrays, grad_output = [to_device(a, device) for a in host]
            inputs = msda.validate_inputs(*arrays)
            module = msda.backend_module(name)
            timer = cpu_time_ms if device == "cpu" else cuda_time_ms
            forward = lambda: module.forward(*inputs)                     # noqa: E731
            backward = lambda: module.backward(grad_output, *inputs)      # noqa: E731
            slow = name == "numpy" and shape_name != "tiny"
            runs = 1 if slow else repeats
            if not slow:                                   # compile / load, not timed
                forward()
                backward()
            fwd = median_ms(timer, forward, runs)
            bwd = median_ms(timer, backward, runs)
            value, _, _, locations, _ = inputs
            N, S, M, D = value.shape
            _, Lq, _, L, K, _ = locations.shape
            row = dict(backend=name, shape=shape_name, dtype=dtype, forward_ms=fwd,
                       backward_ms=bwd, total_ms=fwd + bwd, runs=runs,
                       N=N, S=S, Lq=Lq, M=M, D=D, L=L, K=K)
            rows.append(row)
            print_fn(f"{name:12} {shape_name:8} {fwd:10.1f} {bwd:10.1f} {fwd + bwd:10.1f} {runs:5d}")

    # ---- GPU section (minidetr.bench.msda_gpu): for the GPU rows, the roofline floor and
    # the achieved memory bandwidth; and PyTorch's grid_sample version, if PyTorch is there.
    if any(row["backend"] in GPU_BACKENDS for row in rows):
        rows += gpu_section(rows, shape_names, dtype, repeats, print_fn)

    path = Path(json_path) if json_path else DEFAULT_JSON
    machine["load_average_1min_after"] = os.getloadavg()[0]
    write_json(path, dict(benchmark="msda", dtype=dtype, repeats=repeats, machine=machine,
                          results=rows))
    print_fn(f"results written to {path}")
    return rows
