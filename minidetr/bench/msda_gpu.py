"""The GPU part of ``python -m minidetr bench msda``: the roofline floor, and PyTorch.

:func:`minidetr.bench.msda.bench_msda` times every backend, the GPU ones with CUDA events.
When some of them ran on the GPU it calls :func:`gpu_section`, which

* reads the GPU's peak memory bandwidth from its device attributes:
  2 x memoryClockRate x memoryBusWidth / 8 (double data rate);
* computes, per shape and pass, the *floor*: the bytes the pass cannot avoid moving
  (:func:`floor_bytes`: every needed input read once, every output written once; for
  value, only the rows that some sampling point touches), and the time that takes at
  the peak bandwidth;
* prints, for each GPU row, the achieved bandwidth = floor bytes / measured time and its
  fraction of the peak (how close the kernel comes to the memory roofline);
* when PyTorch with CUDA is importable, times PyTorch's ``grid_sample`` formulation of
  the op (facts §1, "PyTorch fallback") on the same inputs, as a point of comparison.
  PyTorch is never a dependency of minidetr.

Shapes: see :data:`minidetr.bench.common.SHAPES` (the inputs are
:func:`minidetr.bench.common.msda_inputs`).
"""
from __future__ import annotations

import statistics

import numpy as np

from ..backend import cupy_available, why_no_cupy
from .common import SHAPES, msda_inputs

GPU_BACKENDS = ("cupy", "numba-cuda")
TORCH = "torch-grid_sample"


# --------------------------------------------------------------------------- the floor
def touched_value_rows(xp, spatial_shapes, level_start_index, sampling_locations):
    """How many value rows (n, s, m) at least one sampling point reads (nonzero weight).

    Shapes: spatial_shapes (L, 2) and level_start_index (L,) on the host (NumPy);
    sampling_locations (N, Lq, M, L, K, 2) as an ``xp`` array.
    """
    from ..ops.msda.reference import bilinear_corners
    N, Lq, M, L, K, _ = sampling_locations.shape
    S = int(level_start_index[-1] + spatial_shapes[-1, 0] * spatial_shapes[-1, 1])
    n = xp.arange(N).reshape(N, 1, 1, 1)
    m = xp.arange(M).reshape(1, 1, M, 1)
    keys = []
    for l in range(L):
        (H, W), start = spatial_shapes[l].tolist(), int(level_start_index[l])
        x = sampling_locations[:, :, :, l, :, 0]                             # (N, Lq, M, K)
        y = sampling_locations[:, :, :, l, :, 1]
        for corner in bilinear_corners(x, y, H, W):
            row = (n * S + start + corner.row) * M + m                       # flat (n, s, m)
            keys.append(row[corner.weight != 0])
    return int(xp.unique(xp.concatenate(keys)).size)


def floor_bytes(sizes: dict, touched_rows: int, itemsize: int) -> dict:
    """Bytes each pass must move at least (every array read or written once).

    forward:  touched value rows, locations, weights in; output out.
    backward: grad_output, touched value rows, locations, weights in; grad_value (all of
              it: every element must be written, if only with zero), grad_locations and
              grad_weights out.

    ``sizes`` holds N, S, M, D, Lq, L, K.
    """
    N, S, M, D, Lq, L, K = (sizes[k] for k in ("N", "S", "M", "D", "Lq", "L", "K"))
    points = N * Lq * M * L * K
    value_in = touched_rows * D
    per_point = 3 * points                                   # (x, y) locations + weight
    out = N * Lq * M * D
    return {"forward": itemsize * (value_in + per_point + out),
            "backward": itemsize * (out + value_in + per_point + N * S * M * D + 3 * points)}


def peak_bandwidth(clock_khz: float, bus_width_bits: int) -> float:
    """Bytes per second: two transfers per memory clock, bus width in bytes."""
    return 2.0 * clock_khz * 1e3 * bus_width_bits / 8.0


def device_bandwidth():
    """(name, peak bytes/s) of CuPy's current device, from its attributes."""
    import cupy as cp
    device = cp.cuda.Device().id
    properties = cp.cuda.runtime.getDeviceProperties(device)
    name = properties["name"]
    name = name.decode() if isinstance(name, bytes) else name
    clock = properties.get("memoryClockRate")
    bus = properties.get("memoryBusWidth")
    if not clock or not bus:     # CUDA 13 dropped these fields; the attributes remain
        clock = cp.cuda.runtime.deviceGetAttribute(36, device)   # cudaDevAttrMemoryClockRate
        bus = cp.cuda.runtime.deviceGetAttribute(37, device)     # cudaDevAttrGlobalMemoryBusWidth
    return name, peak_bandwidth(clock, bus)


# --------------------------------------------------------------------------- PyTorch
def torch_grid_sample(torch, value, spatial_shapes, sampling_locations, attention_weights):
    """The op with ``torch.nn.functional.grid_sample``, one call per level (facts §1).

    Shapes: value (N, S, M, D) -> per level (N*M, D, H, W); grid (N*M, Lq, K, 2) in
    [-1, 1]; samples (N*M, D, Lq, K) per level -> weighted sum -> (N, Lq, M*D).
    ``spatial_shapes`` is a list of (H, W).
    """
    import torch.nn.functional as TF
    N, S, M, D = value.shape
    _, Lq, _, L, K, _ = sampling_locations.shape
    grids = 2 * sampling_locations - 1                                    # [0, 1] -> [-1, 1]
    samples = []
    for l, value_l in enumerate(value.split([h * w for h, w in spatial_shapes], dim=1)):
        H, W = spatial_shapes[l]
        value_l = value_l.permute(0, 2, 3, 1).reshape(N * M, D, H, W)      # (N*M, D, H, W)
        grid_l = grids[:, :, :, l].transpose(1, 2).reshape(N * M, Lq, K, 2)
        samples.append(TF.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros",
                                      align_corners=False))               # (N*M, D, Lq, K)
    stacked = torch.cat(samples, dim=-1)                                  # (N*M, D, Lq, L*K)
    weights = attention_weights.transpose(1, 2).reshape(N * M, 1, Lq, L * K)
    out = (stacked * weights).sum(-1)                                     # (N*M, D, Lq)
    return out.reshape(N, M * D, Lq).transpose(1, 2)                      # (N, Lq, M*D)


def _torch_ms(torch, fn, repeats, prepare=None, warmup=2):
    """Median milliseconds of fn() between two torch CUDA events (after warm-up)."""
    times = []
    for i in range(warmup + repeats):
        if prepare:
            prepare()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        if i >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def _time_torch(torch, host, repeats):
    """(forward ms, backward ms) of :func:`torch_grid_sample` on the host inputs."""
    value, spatial_shapes, _, locations, weights, grad_output = host
    device = torch.device("cuda")
    tv, tl, tw = (torch.tensor(a, device=device, requires_grad=True)
                  for a in (value, locations, weights))
    tg = torch.tensor(grad_output, device=device)
    shapes = [tuple(s) for s in spatial_shapes.tolist()]
    forward = lambda: torch_grid_sample(torch, tv, shapes, tl, tw)       # noqa: E731
    state = {}

    def prepare():                      # backward needs a fresh graph, built untimed
        tv.grad = tl.grad = tw.grad = None
        state["out"] = forward()
    with torch.no_grad():
        fwd = _torch_ms(torch, forward, repeats)
    bwd = _torch_ms(torch, lambda: state["out"].backward(tg), repeats, prepare)
    return fwd, bwd


# --------------------------------------------------------------------------- the section
def gpu_section(rows, shape_names, dtype, repeats, print_fn=print):
    """Add the floor and achieved bandwidth to the GPU rows of ``bench_msda``; time PyTorch.

    Args:
        rows: result rows of :func:`minidetr.bench.msda.bench_msda` (dicts with backend, shape,
            forward_ms, backward_ms, ...); the GPU ones gain ``floor_*``, ``*_gbps`` and
            ``*_fraction_of_peak`` fields, in place.
        shape_names, dtype, repeats: as given to ``bench_msda``.

    Returns:
        new rows for PyTorch's grid_sample (empty when PyTorch with CUDA is missing).
    """
    if not cupy_available():
        print_fn(f"GPU section skipped: {why_no_cupy()}")
        return []
    import cupy as cp
    name, peak = device_bandwidth()
    print_fn(f"\nGPU {name}: peak memory bandwidth {peak / 1e9:.0f} GB/s "
             "(2 x memoryClockRate x memoryBusWidth / 8)")
    try:
        import torch
        torch_ok = torch.cuda.is_available()
    except Exception:                   # not installed, or broken: just not compared
        torch, torch_ok = None, False
    extra = []
    floors = {}
    for shape_name in shape_names:
        host = msda_inputs(SHAPES[shape_name], dtype)
        value, spatial_shapes, level_start_index, locations = host[:4]
        N, S, M, D = value.shape
        _, Lq, _, L, K, _ = locations.shape
        sizes = dict(N=N, S=S, M=M, D=D, Lq=Lq, L=L, K=K)
        touched = touched_value_rows(cp, spatial_shapes, level_start_index,
                                     cp.asarray(locations))
        floors[shape_name] = floor_bytes(sizes, touched, value.dtype.itemsize)
        if torch_ok:
            fwd, bwd = _time_torch(torch, host, repeats)
            extra.append(dict(backend=TORCH, shape=shape_name, dtype=dtype, forward_ms=fwd,
                              backward_ms=bwd, total_ms=fwd + bwd, runs=repeats, **sizes))
    print_fn(f"{'backend':18} {'shape':8} {'pass':8} {'ms':>9} {'floor MB':>9} "
             f"{'floor us':>9} {'GB/s':>7} {'% peak':>7}")
    for row in [r for r in rows if r["backend"] in GPU_BACKENDS] + extra:
        row["peak_gbps"] = peak / 1e9
        for pass_name in ("forward", "backward"):
            ms = row[f"{pass_name}_ms"]
            floor = floors[row["shape"]][pass_name]
            row[f"floor_{pass_name}_bytes"] = floor
            row[f"floor_{pass_name}_ms"] = floor / peak * 1e3
            row[f"{pass_name}_gbps"] = floor / (ms * 1e-3) / 1e9
            row[f"{pass_name}_fraction_of_peak"] = floor / (ms * 1e-3) / peak
            print_fn(f"{row['backend']:18} {row['shape']:8} {pass_name:8} {ms:9.3f} "
                     f"{floor / 1e6:9.1f} {floor / peak * 1e6:9.1f} "
                     f"{row[f'{pass_name}_gbps']:7.0f} "
                     f"{100 * row[f'{pass_name}_fraction_of_peak']:6.1f}%")
    if not torch_ok:
        print_fn("(PyTorch with CUDA is not importable: its grid_sample version is not timed)")
    return extra
