"""What every benchmark shares: shapes and inputs, timers, memory meters, machine info.

* The MSDA shapes of the paper (:data:`SHAPES`) and their inputs (:func:`msda_inputs`),
  with sampling locations that imitate a trained model's.
* A synthetic training batch (:func:`synthetic_batch`) and image sizes (:func:`parse_size`).
* Timers in milliseconds: wall clock on the CPU (:func:`cpu_time_ms`), CUDA events on
  the GPU (:func:`cuda_time_ms`), and :func:`time_steps` (warm-up, timed steps, peak).
* Memory meters with one interface (``in_use``, ``peak_of_one``, ``summary``): the
  process's resident-size high-water mark (:class:`CpuMemory`) and CuPy's memory pool
  followed by a memory hook (:class:`CupyMemory`).
* :func:`machine_info`: what the numbers depend on.
"""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys
import time

import numpy as np

from ..models.config import VARIANTS

# --------------------------------------------------------------------------- MSDA inputs
PAPER_LEVELS = ((100, 150), (50, 75), (25, 38), (13, 19))
SHAPES = {
    "encoder": dict(N=2, levels=PAPER_LEVELS, M=8, D=32, K=4, Lq=None),   # Lq = S
    "decoder": dict(N=2, levels=PAPER_LEVELS, M=8, D=32, K=4, Lq=300),
    "tiny": dict(N=1, levels=((16, 20), (8, 10)), M=2, D=32, K=2, Lq=None),
}

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


# --------------------------------------------------------------------------- training inputs
DEFAULT_SIZES = {"tiny": (128, 128), "small": (800, 1066), "paper": (800, 1066)}
BOXES_PER_IMAGE = 6


def parse_size(size, config="tiny"):
    """``"800x1066"`` (height x width), a pair, or None (the preset's default) -> (H, W)."""
    if size is None:
        return DEFAULT_SIZES[config]
    if isinstance(size, str):
        parts = size.lower().replace(" ", "").split("x")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"--size must be HEIGHTxWIDTH in pixels, e.g. 800x1066; got "
                             f"{size!r}")
        size = tuple(int(p) for p in parts)
    height, width = size
    if height < 32 or width < 32:
        raise ValueError(f"--size {height}x{width}: each side must be at least 32 pixels "
                         "(the backbone divides it by 32)")
    return int(height), int(width)


def synthetic_batch(batch, height, width, num_classes, rng):
    """A ``Batch`` of noise images with random boxes, as the data loader would give.

    Shapes: images (B, 3, H, W) float32, mask (B, H, W) bool (no padding), each target
    ``labels`` (T,) int64 in [0, num_classes) and ``boxes`` (T, 4) normalised cxcywh,
    T = 6.
    """
    from ..data import Batch

    images = rng.standard_normal((batch, 3, height, width), dtype=np.float32)
    mask = np.zeros((batch, height, width), dtype=bool)
    targets = []
    for b in range(batch):
        centres = rng.uniform(0.2, 0.8, size=(BOXES_PER_IMAGE, 2))
        sizes = rng.uniform(0.05, 0.4, size=(BOXES_PER_IMAGE, 2))
        size = np.array([height, width], dtype=np.int64)
        targets.append({"boxes": np.concatenate([centres, sizes], 1).astype(np.float32),
                        "labels": rng.integers(0, num_classes, BOXES_PER_IMAGE),
                        "image_id": b, "orig_size": size, "size": size})
    return Batch(images, mask, targets)


# --------------------------------------------------------------------------- memory
def _max_rss_bytes():
    """The process's peak resident set size, in bytes.

    On Linux, ``VmHWM`` of /proc/self/status: the high-water mark of this program's own
    memory. ``ru_maxrss`` keeps the peak from before an ``exec`` too, so a process started
    by ``subprocess`` from a bigger one (transformers' rows, started by minidetr's
    process) would report its parent's peak (measured: a child of a 2.3 GiB parent said
    2314 MiB where VmHWM said 11 MiB). Elsewhere ``ru_maxrss`` (macOS reports bytes,
    others KiB).
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024           # "VmHWM:  10904 kB"
    except (OSError, ValueError, IndexError):
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


class CpuMemory:
    """Memory of a CPU row: the process's resident-size high-water mark."""

    note = ("CPU: peak resident size of the whole process (VmHWM, or ru_maxrss where there "
            "is no /proc); rise = its growth during this row")

    def __init__(self):
        self.start = _max_rss_bytes()

    def in_use(self):
        return None                     # not measurable cheaply on the host

    def peak_of_one(self, step):
        step()
        return None

    def summary(self, peak, in_use):
        end = _max_rss_bytes()
        return {"peak_bytes": end, "rise_bytes": end - self.start}


class CupyMemory:
    """Memory of a GPU row, from CuPy's memory pool (see the module docstring)."""

    note = ("GPU: peak = most bytes in use in CuPy's pool during one step; reserved = "
            "bytes the pool holds; growth = in use after the last timed step minus after "
            "the first")

    def __init__(self):
        import cupy as cp
        self.cp = cp
        self.pool = cp.get_default_memory_pool()
        self.pool.free_all_blocks()                 # each row starts from an empty cache

    def in_use(self):
        return self.pool.used_bytes()

    def peak_of_one(self, step):
        """Run ``step`` once with a memory hook that follows the bytes in use."""
        cp = self.cp

        class PeakInUse(cp.cuda.MemoryHook):
            name = "minidetr_bench_peak"

            def __init__(self, start):
                self.in_use = self.peak = start

            def malloc_postprocess(self, **kwargs):
                if kwargs["mem_ptr"]:                # 0: the allocation failed
                    self.in_use += kwargs["mem_size"]
                    self.peak = max(self.peak, self.in_use)

            def free_postprocess(self, **kwargs):
                self.in_use -= kwargs["mem_size"]

        with PeakInUse(self.pool.used_bytes()) as hook:
            step()
        return hook.peak

    def summary(self, peak, in_use):
        _, total = self.cp.cuda.runtime.memGetInfo()        # (free, total) bytes
        return {"peak_bytes": peak, "reserved_bytes": self.pool.total_bytes(),
                "growth_bytes": in_use[-1] - in_use[0], "device_total_bytes": total}


# --------------------------------------------------------------------------- timing
def cpu_time_ms(step):
    """Wall-clock milliseconds of ``step``."""
    start = time.perf_counter()
    step()
    return 1e3 * (time.perf_counter() - start)


def cuda_time_ms(step):
    """Milliseconds between two CUDA events around ``step`` on CuPy's current stream."""
    import cupy as cp
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    step()
    end.record()
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end)


def time_steps(step, *, iterations, warmup, timer, memory):
    """Run ``warmup`` untimed steps, then ``iterations`` timed ones, then one for the peak.

    Returns a dict with the times (ms) and the memory summary.
    """
    for _ in range(warmup):
        step()
    times, in_use = [], []
    for _ in range(iterations):
        times.append(timer(step))
        in_use.append(memory.in_use())
    peak = memory.peak_of_one(step)
    return {"ms_median": statistics.median(times), "ms_min": min(times),
            "ms_mean": statistics.fmean(times), "times_ms": times,
            **memory.summary(peak, in_use)}


def median_ms(timer, fn, repeats):
    """The median of ``repeats`` timings of ``fn`` by ``timer`` (:func:`cpu_time_ms` or
    :func:`cuda_time_ms`)."""
    return statistics.median(timer(fn) for _ in range(repeats))


# --------------------------------------------------------------------------- names, machine
def names(x, default):
    """A comma-separated string (or a list) of names; None or "all": ``default``."""
    if x is None or x == "all":
        return list(default)
    return [s.strip() for s in x.split(",") if s.strip()] if isinstance(x, str) else list(x)


def variant_names(variants):
    """The variant names of ``variants`` (comma-separated, a list, or "all"), checked."""
    chosen = names(variants, VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown or not chosen:
        raise ValueError(f"unknown variant(s) {unknown or variants!r}; choose from "
                         f"{list(VARIANTS)} (comma-separated)")
    return chosen


def machine_info(device="cpu"):
    """What the numbers depend on: CPU count, Numba threads, load, versions; and, on
    ``device="cuda"``, the GPU's name and CuPy's version."""
    info = dict(platform=platform.platform(), cpu_count=os.cpu_count(),
                numpy=np.__version__, load_average_1min=os.getloadavg()[0],
                thread_settings={name: os.environ.get(name) for name in (
                    "MINIDETR_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "NUMBA_NUM_THREADS")})
    try:
        import numba
        info.update(numba=numba.__version__, numba_threads=numba.get_num_threads())
    except ImportError:  # pragma: no cover - numba is a dependency
        pass
    if device == "cuda":
        import cupy as cp
        props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        name = props["name"]
        info.update(gpu=name.decode() if isinstance(name, bytes) else str(name),
                    cupy=cp.__version__)
    return info


__all__ = ["SHAPES", "PAPER_LEVELS", "msda_inputs", "DEFAULT_SIZES", "parse_size",
           "synthetic_batch", "CpuMemory", "CupyMemory", "cpu_time_ms", "cuda_time_ms",
           "median_ms", "time_steps", "names", "variant_names", "machine_info"]
