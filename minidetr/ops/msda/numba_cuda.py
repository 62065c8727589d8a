"""The ``"numba-cuda"`` backend: the GPU kernels written in Python with ``numba.cuda.jit``.

The design is that of ``cupy_kernels.cu`` (see ``docs/gpu-kernels.md``), without the
vectorised loads, which Numba does not offer for array elements:

* one *group* of G lanes of a warp per head (n, q, m), G = min(32, next_pow2(D)); lane j
  owns the channels j, j + G, j + 2G, ... so any D works;
* the forward pass writes each output channel once (no atomics);
* the backward pass adds grad_value with ``cuda.atomic.add`` (or, with
  ``deterministic=True``, gathers it per value row in a fixed order, as the cupy
  backend does) and sums the per-channel terms of the location and weight gradients
  over the group with warp shuffles (``_group_sum``); the group's first lane writes them.

The CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, read when Numba is imported) runs these
very kernels in Python threads, but it has no warp shuffles. ``_shfl_down`` is therefore
the only function with two versions: ``cuda.shfl_down_sync`` on a GPU, and under the
simulator a twin that exchanges the values through shared memory between two
``syncthreads`` (a whole-block barrier, stricter than a warp's; the kernels call it
from uniform control flow, so every thread of the block reaches it). The reduction in
``_group_sum`` and everything else is the same code on both.

Kernels are compiled per dtype (``_kernels``) so that constants such as 0.5 and 1 have
the data's type: Numba types Python float literals as float64, which would silently
compute float32 data in float64.

Arrays: CuPy arrays (the device the API routes this backend to), shared with Numba
without a copy and launched on CuPy's current stream. NumPy arrays also work (Numba
copies them to the GPU and back; the simulator works on them directly).

Shapes:
    value (N, S, M, D); spatial_shapes (L, 2) int64; level_start_index (L,) int64;
    sampling_locations (N, Lq, M, L, K, 2); attention_weights (N, Lq, M, L, K);
    output (N, Lq, M * D).
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ...backend import get_array_module, is_cupy_array
from .cupy_backend import sort_entries_by_row

try:  # Numba is a dependency, but its CUDA part may fail to import on some systems
    from numba import config as _numba_config
    from numba import cuda
    _IMPORT_ERROR = None
except Exception as e:  # pragma: no cover - depends on the installation
    cuda, _numba_config, _IMPORT_ERROR = None, None, e

SIMULATOR = bool(cuda is not None and _numba_config.ENABLE_CUDASIM)
FULL_MASK = 0xFFFFFFFF
WARP_SIZE = 32
THREADS_PER_BLOCK = 256


def is_available():
    """(True, description) when Numba can run CUDA kernels here (or simulate them)."""
    if cuda is None:
        return False, f"numba.cuda cannot be imported: {_IMPORT_ERROR}"
    if SIMULATOR:
        return True, "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): correct but very slow"
    try:
        if not cuda.is_available():
            return False, "Numba finds no usable CUDA driver and GPU"
        device = cuda.get_current_device()
        major, minor = device.compute_capability
    except Exception as e:  # pragma: no cover - depends on the machine
        return False, f"Numba cannot use the GPU: {e}"
    if (major, minor) < (6, 0):
        return False, (f"compute capability {major}.{minor}: the kernels need 6.0 or newer "
                       "(atomic add on float64)")
    name = device.name.decode() if isinstance(device.name, bytes) else device.name
    return True, f"Numba CUDA kernels on {name}"


# --------------------------------------------------------------------------- warp reduction
if cuda is not None and not SIMULATOR:
    @cuda.jit(device=True, inline=True)
    def _shfl_down(value, offset):
        """``value`` of the lane ``offset`` above this one in the warp (own value past 31)."""
        return cuda.shfl_down_sync(FULL_MASK, value, offset)

elif cuda is not None:
    @cuda.jit(device=True)
    def _shfl_down(value, offset):
        """Simulator twin of ``cuda.shfl_down_sync(FULL_MASK, value, offset)``.

        Every thread publishes its value in shared memory; after a barrier, each reads the
        slot ``offset`` lanes above its own in the same warp (its own value past lane 31),
        and a second barrier keeps the slots until everyone has read. All threads of the
        block must call it together, as all lanes of a warp must call the real one.
        The slots are the block's *dynamic* shared memory (size 0 below), which
        ``_launch`` reserves under the simulator: the simulator creates a static shared
        array lazily, and threads that ask for it at the same moment can get different
        copies.
        """
        exchange = cuda.shared.array(0, np.dtype(np.float64))
        t = cuda.threadIdx.x
        exchange[t] = value
        cuda.syncthreads()
        result = exchange[t + offset] if t % WARP_SIZE + offset < WARP_SIZE else value
        cuda.syncthreads()
        return result

if cuda is not None:
    @cuda.jit(device=True)
    def _group_sum(x, group_size):
        """The sum of x over the group's lanes, in the group's first lane (tree of shuffles).

        After the step with offset o, lane i holds x[i] + ... + x[i + 2o - 1], so the
        first lane of an aligned group of G lanes ends with exactly its group's sum
        (other lanes may mix in a neighbouring group; their results are not used).
        """
        offset = group_size // 2
        while offset > 0:
            x += _shfl_down(x, offset)
            offset //= 2
        return x


# --------------------------------------------------------------------------- kernels
@functools.lru_cache(maxsize=None)
def _kernels(dtype_name: str):
    """The kernels for one dtype ("float32" or "float64"), its constants typed to match."""
    real = np.float32 if dtype_name == "float32" else np.float64   # a cast, in device code
    zero, half, one = real(0), real(0.5), real(1)

    @cuda.jit(device=True)
    def locate(x, y, H, W):
        """The cell of one normalised point (x, y): ``(inside, h0, w0, lh, lw)``.

        ``inside`` is False when the point is skipped (outside -1 < h_im < H, -1 < w_im
        < W, or NaN); (h0, w0) is the top-left neighbour, (lh, lw) the fractional parts.
        """
        w_im = x * real(W) - half                      # pixel centres at j + 0.5
        h_im = y * real(H) - half
        if not (h_im > -one and h_im < real(H) and w_im > -one and w_im < real(W)):
            return False, 0, 0, zero, zero
        h0 = int(math.floor(h_im))
        w0 = int(math.floor(w_im))
        return True, h0, w0, h_im - real(h0), w_im - real(w0)

    @cuda.jit
    def forward_kernel(value, spatial_shapes, level_start_index, locations, weights, output,
                       group_size):
        """One group of ``group_size`` lanes per head (n, q, m); see the module docstring."""
        N, S, M, D = value.shape
        Lq, L, K = locations.shape[1], locations.shape[3], locations.shape[4]
        thread = cuda.grid(1)
        head = thread // group_size                    # flat (n, q, m)
        lane = thread % group_size
        if head >= N * Lq * M:
            return                                     # no shuffles in this kernel
        m = head % M
        q = (head // M) % Lq
        n = head // (M * Lq)
        c = lane
        while c < D:                                   # this lane's channels
            acc = zero
            for l in range(L):
                H = spatial_shapes[l, 0]
                W = spatial_shapes[l, 1]
                start = level_start_index[l]
                for k in range(K):
                    inside, h0, w0, lh, lw = locate(locations[n, q, m, l, k, 0],
                                                    locations[n, q, m, l, k, 1], H, W)
                    if not inside:
                        continue
                    hh = one - lh
                    hw = one - lw
                    sample = zero                      # bilinear, zero outside the map
                    if h0 >= 0 and w0 >= 0:
                        sample += hh * hw * value[n, start + h0 * W + w0, m, c]
                    if h0 >= 0 and w0 + 1 < W:
                        sample += hh * lw * value[n, start + h0 * W + w0 + 1, m, c]
                    if h0 + 1 < H and w0 >= 0:
                        sample += lh * hw * value[n, start + (h0 + 1) * W + w0, m, c]
                    if h0 + 1 < H and w0 + 1 < W:
                        sample += lh * lw * value[n, start + (h0 + 1) * W + w0 + 1, m, c]
                    acc += weights[n, q, m, l, k] * sample
            output[n, q, m * D + c] = acc
            c += group_size

    @cuda.jit
    def backward_kernel(grad_output, value, spatial_shapes, level_start_index, locations,
                        weights, grad_value, grad_locations, grad_weights, group_size,
                        atomic_grad_value):
        """Gradients; grad_value must be zero on entry (left alone unless atomic_grad_value).

        Per point, with g = grad_output[n, q, m, :] and corners v_c of weight w_c:
        grad_value[row_c] += a w_c g; the dot products g . v_c are summed over the
        group; then grad_weight = sum_c w_c (g . v_c), grad_x = W a sum_c dw_c/dw_im (g . v_c),
        grad_y = H a sum_c dw_c/dh_im (g . v_c), as in reference.backward.
        """
        N, S, M, D = value.shape
        Lq, L, K = locations.shape[1], locations.shape[3], locations.shape[4]
        thread = cuda.grid(1)
        lane = thread % group_size
        num_heads = N * Lq * M
        # Every lane must reach the shuffles: threads past the last head redo its work
        # and write nothing.
        active = thread // group_size < num_heads
        head = thread // group_size if active else num_heads - 1
        m = head % M
        q = (head // M) % Lq
        n = head // (M * Lq)
        for l in range(L):
            H = spatial_shapes[l, 0]
            W = spatial_shapes[l, 1]
            start = level_start_index[l]
            for k in range(K):
                inside, h0, w0, lh, lw = locate(locations[n, q, m, l, k, 0],
                                                locations[n, q, m, l, k, 1], H, W)
                a = weights[n, q, m, l, k]
                hh = one - lh
                hw = one - lw
                top, bottom = h0 >= 0, h0 + 1 < H
                left, right = w0 >= 0, w0 + 1 < W
                row = start + h0 * W + w0              # the top-left neighbour's row
                gv0 = zero                             # this lane's share of g . v_c
                gv1 = zero
                gv2 = zero
                gv3 = zero
                scatter = atomic_grad_value != 0 and active
                c = lane
                while inside and c < D:
                    g = grad_output[n, q, m * D + c]
                    if top and left:
                        gv0 += g * value[n, row, m, c]
                        if scatter:
                            cuda.atomic.add(grad_value, (n, row, m, c), a * hh * hw * g)
                    if top and right:
                        gv1 += g * value[n, row + 1, m, c]
                        if scatter:
                            cuda.atomic.add(grad_value, (n, row + 1, m, c), a * hh * lw * g)
                    if bottom and left:
                        gv2 += g * value[n, row + W, m, c]
                        if scatter:
                            cuda.atomic.add(grad_value, (n, row + W, m, c), a * lh * hw * g)
                    if bottom and right:
                        gv3 += g * value[n, row + W + 1, m, c]
                        if scatter:
                            cuda.atomic.add(grad_value, (n, row + W + 1, m, c), a * lh * lw * g)
                    c += group_size
                # Outside the loop: groups of one warp may differ in `inside`.
                d_weight = _group_sum(hh * hw * gv0 + hh * lw * gv1 + lh * hw * gv2
                                      + lh * lw * gv3, group_size)
                d_w_im = _group_sum(-hh * gv0 + hh * gv1 - lh * gv2 + lh * gv3, group_size)
                d_h_im = _group_sum(-hw * gv0 - lw * gv1 + hw * gv2 + lw * gv3, group_size)
                if active and lane == 0:               # one owner per (head, l, k)
                    grad_weights[n, q, m, l, k] = d_weight
                    grad_locations[n, q, m, l, k, 0] = a * d_w_im * real(W)
                    grad_locations[n, q, m, l, k, 1] = a * d_h_im * real(H)

    @cuda.jit
    def contributions_kernel(spatial_shapes, level_start_index, locations, weights, S,
                             target, coefficient):
        """Deterministic backward, step 1: per corner entry e = 4 * point + corner, the
        value row (n * S + s) * M + m it adds to (N * S * M if outside) and a * w."""
        N, Lq, M, L, K = weights.shape
        point = cuda.grid(1)                           # flat (n, q, m, l, k)
        if point >= N * Lq * M * L * K:
            return
        k = point % K
        l = (point // K) % L
        m = (point // (K * L)) % M
        q = (point // (K * L * M)) % Lq
        n = point // (K * L * M * Lq)
        H = spatial_shapes[l, 0]
        W = spatial_shapes[l, 1]
        inside, h0, w0, lh, lw = locate(locations[n, q, m, l, k, 0],
                                        locations[n, q, m, l, k, 1], H, W)
        a = weights[n, q, m, l, k]
        outside = N * S * M
        for corner in range(4):
            h = h0 + corner // 2
            w = w0 + corner % 2
            e = 4 * point + corner
            if inside and 0 <= h < H and 0 <= w < W:
                wh = lh if corner // 2 == 1 else one - lh
                ww = lw if corner % 2 == 1 else one - lw
                target[e] = (n * S + level_start_index[l] + h * W + w) * M + m
                coefficient[e] = a * wh * ww
            else:
                target[e] = outside
                coefficient[e] = zero

    @cuda.jit
    def gather_kernel(grad_output, order, run_start, coefficient, L, K, grad_value,
                      group_size):
        """Deterministic backward, step 3: one group per value row (n, s, m) sums its
        entries coefficient[e] * grad_output[n, q(e), m, :] in sorted order."""
        N, S, M, D = grad_value.shape
        thread = cuda.grid(1)
        row = thread // group_size                     # flat (n, s, m)
        lane = thread % group_size
        if row >= N * S * M:
            return
        m = row % M
        s = (row // M) % S
        n = row // (M * S)
        c = lane
        while c < D:
            acc = zero
            for i in range(run_start[row], run_start[row + 1]):
                entry = order[i]
                head = entry // (4 * L * K)            # flat (n, q, m)
                q = (head // M) % grad_output.shape[1]
                acc += coefficient[entry] * grad_output[n, q, m * D + c]
            grad_value[n, s, m, c] = acc
            c += group_size

    return forward_kernel, backward_kernel, contributions_kernel, gather_kernel


# --------------------------------------------------------------------------- launching
def group_size_for(D: int) -> int:
    """Lanes per head: D rounded up to a power of two, at most a warp."""
    return min(WARP_SIZE, 1 << (max(D, 1) - 1).bit_length())


def _launch(kernel, threads, threads_per_block, args):
    """Launch ``kernel`` with at least ``threads`` threads on CuPy's current stream."""
    if threads == 0:
        return
    if SIMULATOR:  # one Python thread per CUDA thread: no bigger blocks than needed
        threads_per_block = min(threads_per_block, -(-threads // WARP_SIZE) * WARP_SIZE)
    blocks = -(-threads // threads_per_block)
    if SIMULATOR:  # the dynamic shared memory of the _shfl_down twin: a float64 per thread
        kernel[blocks, threads_per_block, 0, 8 * threads_per_block](*args)
        return
    if any(is_cupy_array(a) for a in args):
        import cupy as cp
        ptr = cp.cuda.get_current_stream().ptr
        stream = cuda.external_stream(ptr) if ptr else cuda.default_stream()
        args = [cuda.as_cuda_array(a, sync=False) if is_cupy_array(a) else a for a in args]
        kernel[blocks, threads_per_block, stream](*args)
    else:
        kernel[blocks, threads_per_block](*args)


def _check_threads_per_block(threads_per_block):
    if threads_per_block % WARP_SIZE or not WARP_SIZE <= threads_per_block <= 1024:
        raise ValueError(f"threads_per_block must be a multiple of 32 in [32, 1024], "
                         f"got {threads_per_block}")


def forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
            *, threads_per_block=THREADS_PER_BLOCK):
    """Multi-scale deformable attention with the Numba CUDA kernels.

    Shapes: see the module docstring; returns (N, Lq, M * D).
    """
    _check_threads_per_block(threads_per_block)
    xp = get_array_module(value)
    N, S, M, D = value.shape
    Lq = sampling_locations.shape[1]
    forward_kernel = _kernels(value.dtype.name)[0]
    output = xp.empty((N, Lq, M * D), dtype=value.dtype)      # every element is written
    G = group_size_for(D)
    if output.size:
        _launch(forward_kernel, N * Lq * M * G, threads_per_block,
                (value, spatial_shapes, level_start_index, sampling_locations,
                 attention_weights, output, G))
    return output


def backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, *, deterministic=False, threads_per_block=THREADS_PER_BLOCK):
    """Gradients w.r.t. value, sampling_locations and attention_weights.

    ``deterministic=True`` gathers grad_value per value row in a fixed order instead of
    using atomics (same three steps as :func:`.cupy_backend.run_backward`).

    Shapes: grad_output (N, Lq, M * D); returns (N, S, M, D), (N, Lq, M, L, K, 2),
    (N, Lq, M, L, K).
    """
    _check_threads_per_block(threads_per_block)
    xp = get_array_module(value)
    N, S, M, D = value.shape
    _, Lq, _, L, K = attention_weights.shape
    _, backward_kernel, contributions_kernel, gather_kernel = _kernels(value.dtype.name)
    grad_value = xp.zeros_like(value)
    grad_locations = xp.zeros_like(sampling_locations)
    grad_weights = xp.zeros_like(attention_weights)
    if attention_weights.size == 0:
        return grad_value, grad_locations, grad_weights
    G = group_size_for(D)
    _launch(backward_kernel, N * Lq * M * G, threads_per_block,
            (grad_output, value, spatial_shapes, level_start_index, sampling_locations,
             attention_weights, grad_value, grad_locations, grad_weights, G,
             0 if deterministic else 1))
    if deterministic and grad_value.size:
        points = N * Lq * M * L * K
        target = xp.empty(4 * points, dtype=np.int64)
        coefficient = xp.empty(4 * points, dtype=value.dtype)
        _launch(contributions_kernel, points, threads_per_block,
                (spatial_shapes, level_start_index, sampling_locations, attention_weights,
                 S, target, coefficient))
        order, run_start = sort_entries_by_row(target, N * S * M)
        _launch(gather_kernel, N * S * M * G, threads_per_block,
                (grad_output, order, run_start, coefficient, L, K, grad_value, G))
    return grad_value, grad_locations, grad_weights
