"""The big CPU array operations on every core: matrix products cut into blocks.

NumPy runs a matrix product on the BLAS library's own threads, and minidetr's command line
sets ``OPENBLAS_NUM_THREADS=1`` (see ``minidetr/cli.py``): OpenBLAS's idle worker threads
spin on the CPU while they wait for the next product, and on a small machine they steal
it from the Numba kernels (the deformable attention) that run between two products. So
minidetr splits the large products itself, on a small pool of Python threads that sleep
when idle, each running a single-threaded BLAS product on its block (NumPy releases the
GIL during the product):

    a (M, K) @ b (K, N), M >= N:   out[rows] = a[rows] @ b        one block of rows each
                         M <  N:   out[:, cols] = a @ b[:, cols]  one block of columns each

Every element of ``out`` is still one dot product over the whole K axis, in one BLAS call.
Where a block boundary falls, OpenBLAS may compute an element with its edge-tile kernel
instead of its full-tile one, which can change the last bit or two of a float32 (the tests
bound the difference); a given thread count always gives the same numbers.

Products under ``MIN_FLOPS`` (5e7 floating-point operations, about half a millisecond on
one core) run in the calling thread. Handing a block to another thread and waiting for it
costs 15-30 microseconds on an idle machine (two locks, see ``_Pool``), but during
training the data loader's threads want the cores too. Three epochs of the demo (the
`tiny` model, products of 10-40 MFLOP) took 49 s with a threshold of 4e6, 44 s with 3e7,
43 s with 1e8 and 41 s with everything on one thread. 5e7 keeps the `tiny` model's
products at 128 x 128 on one thread (up to 40 MFLOP; the same 70 ms step as 1e8; the
demo's augmented batches of up to 128 x 213 reach 66 MFLOP and split) and splits the
`small` model's 63-89 MFLOP projections (369 against 378 ms a step, interleaved in one
process).

``run_blocks`` is the general tool; ``run_ranges`` cuts a range of independent items
(col2im's channels, the Winograd transforms' channels) into one block per thread;
``matmul``, ``batched_matmul`` and ``matmul_sum`` are the products the layers need.

How many threads: ``MINIDETR_NUM_THREADS`` if set, else the CPUs this process may run on
(``os.sched_getaffinity``). ``MINIDETR_NUM_THREADS=1`` turns all of this off. Arrays that
are not NumPy arrays (CuPy) go straight to their own ``matmul``.
"""
from __future__ import annotations

import functools
import os
import threading

import numpy as np

MIN_FLOPS = 5e7          # products below this many floating-point operations stay serial


def cpu_threads() -> int:
    """The number of threads the big CPU operations use (see the module docstring)."""
    setting = os.environ.get("MINIDETR_NUM_THREADS", "").strip()
    if setting:
        try:
            value = int(setting)
        except ValueError:
            raise ValueError(f"MINIDETR_NUM_THREADS must be a positive integer, got "
                             f"{setting!r}") from None
        if value < 1:
            raise ValueError(f"MINIDETR_NUM_THREADS must be a positive integer, got {value}")
        return value
    return _cores()


@functools.lru_cache(maxsize=None)
def _cores() -> int:
    """The CPUs this process may run on, asked once (a system call: it was 2 us of every
    product's bookkeeping, thousands of times a step)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                  # not Linux
        return os.cpu_count() or 1


class _Worker:
    """One thread of the pool: sleeps on its ``go`` lock until handed a task, runs it, and
    releases ``done``. Two plain locks are the cheapest hand-off Python has (see _Pool)."""

    def __init__(self, index, inside):
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()                               # held: the worker waits on it
        self.done.acquire()                             # held: the caller waits on it
        self.task = None
        self.inside = inside
        self.thread = threading.Thread(target=self._loop, name=f"minidetr-{index}",
                                       daemon=True)
        self.thread.start()

    def _loop(self):
        self.inside.worker = True
        while True:
            self.go.acquire()                           # sleep until handed a task
            task = self.task
            if task is None:                            # told to stop
                return
            task()                                      # never raises (run_blocks catches)
            self.done.release()

    def stop(self):
        self.task = None
        self.go.release()


class _Pool:
    """``cpu_threads() - 1`` worker threads (the caller is one more), started on first use.

    A call hands each worker its task through a lock the worker sleeps on, and waits for
    it on a second lock: one wake-up each way, 15 us for an empty call here, against 77 us
    through ``concurrent.futures.ThreadPoolExecutor`` (a Future, a queue and a waiter per
    block; a `small` training step hands work over about 200 times). One call uses the
    pool at a time: a second thread that asks meanwhile (a data loader's, say) runs its
    blocks itself. Rebuilt when the thread count changes, and forgotten in a forked child
    (its threads do not exist there). A block that itself asks for blocks runs them
    serially: a worker waiting for the pool it belongs to could wait forever.
    """

    def __init__(self):
        self.workers = []
        self.busy = threading.Lock()
        self.inside = threading.local()

    def workers_for(self, threads):
        """The workers for ``threads`` threads in all (call with ``busy`` held)."""
        if len(self.workers) != threads - 1:
            self.retire()
            self.workers = [_Worker(i, self.inside) for i in range(threads - 1)]
        return self.workers

    def in_worker(self):
        return getattr(self.inside, "worker", False)

    def retire(self):
        """Let the workers end after their current task; the next call starts new ones."""
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def forget(self):
        self.workers = []
        self.busy = threading.Lock()


_POOL = _Pool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.forget)


def run_blocks(function, n_blocks, threads=None):
    """Call ``function(i)`` for i in 0 .. n_blocks-1, spread over the CPU threads.

    Thread t runs blocks t, t + threads, t + 2 threads, ...; thread 0 is the calling
    thread, the others the pool's. Returns the results in order. An exception in any
    block is raised here (the first block's, by number), after all blocks have finished.
    """
    threads = cpu_threads() if threads is None else threads
    if (n_blocks <= 1 or threads <= 1 or _POOL.in_worker()
            or not _POOL.busy.acquire(blocking=False)):         # pool in use: run them here
        return [function(i) for i in range(n_blocks)]
    results, errors = [None] * n_blocks, [None] * n_blocks

    def share(first):                                 # this thread's blocks
        for i in range(first, n_blocks, threads):
            try:
                results[i] = function(i)
            except BaseException as error:            # noqa: B036 - raised again below
                errors[i] = error

    try:
        workers = _POOL.workers_for(threads)[:min(threads, n_blocks) - 1]
        for t, worker in enumerate(workers, start=1):
            worker.task = functools.partial(share, t)
            worker.go.release()
        share(0)
        try:
            for worker in workers:                    # never leave a block running
                worker.done.acquire()
        except BaseException:                         # interrupted (Ctrl-C) while waiting:
            _POOL.retire()                            # these workers must not be reused
            raise
    finally:
        _POOL.busy.release()
    for error in errors:
        if error is not None:
            raise error
    return results


MIN_BLOCK_BYTES = 1 << 18    # run_ranges: arrays under 256 KiB are worked on in one block


def run_ranges(work, count, nbytes, threads=None):
    """Call ``work(lo, hi)`` over blocks [lo, hi) that cover range(count), one per thread.

    For work that treats each of ``count`` items (channels, filters) on its own: col2im
    and the Winograd transforms. ``nbytes`` is the size of the array the work goes
    through; under ``MIN_BLOCK_BYTES`` (or with one thread, or one item) it is one call
    ``work(0, count)`` in the calling thread.
    """
    threads = cpu_threads() if threads is None else threads
    blocks = min(threads, count)
    if blocks <= 1 or nbytes < MIN_BLOCK_BYTES:
        work(0, count)
        return
    cuts = _bounds(count, blocks)
    run_blocks(lambda b: work(cuts[b], cuts[b + 1]), blocks, threads)   # the pool of all threads


def _bounds(length, parts):
    """``parts + 1`` cut points splitting range(length) into nearly equal blocks."""
    return [length * k // parts for k in range(parts + 1)]


def _worth_splitting(a, b, flops):
    return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and flops >= MIN_FLOPS)


def matmul(a, b, out=None, threads=None, bias=None):
    """``a @ b (+ bias)`` for 2-D arrays a (M, K), b (K, N) -> (M, N), large ones split
    over threads.

    Args:
        a, b: 2-D NumPy (or CuPy: passed through) arrays of one float dtype.
        out: optional (M, N) array to write into.
        threads: override of :func:`cpu_threads` (tests).
        bias: optional (N,) array added to every row (a Linear layer's bias). Each block
            adds it to its own rows or columns right after its product, while they are
            still in the core's cache, and on its own thread.

    Row blocks when M >= N, column blocks otherwise (see the module docstring).
    """
    M, K = a.shape
    N = b.shape[1]
    threads = cpu_threads() if threads is None else threads
    if (not _worth_splitting(a, b, 2.0 * M * K * N) or threads <= 1
            or max(M, N) < 2 * threads):                          # most products: at once
        out = a @ b if out is None else np.matmul(a, b, out=out)
        if bias is not None:
            out += bias
        return out
    if out is None:
        out = np.empty((M, N), dtype=np.result_type(a, b))
    cuts = _bounds(M if M >= N else N, threads)

    def block(i):
        lo, hi = cuts[i], cuts[i + 1]
        if M >= N:
            np.matmul(a[lo:hi], b, out=out[lo:hi])                 # (rows, K) @ (K, N)
            if bias is not None:
                out[lo:hi] += bias
        else:
            np.matmul(a, b[:, lo:hi], out=out[:, lo:hi])           # (M, K) @ (K, cols)
            if bias is not None:
                out[:, lo:hi] += bias[lo:hi]

    run_blocks(block, threads, threads)
    return out


def batched_matmul(a, b, threads=None):
    """``a[n] @ b[n]`` for every n: a (B, M, K) or (M, K), b (B, K, N) or (K, N) -> (B, M, N).

    With at least as many items as threads, each thread takes whole items; otherwise each
    item is split by :func:`matmul`.
    """
    threads = cpu_threads() if threads is None else threads
    B = a.shape[0] if a.ndim == 3 else b.shape[0]
    M, K = a.shape[-2:]
    N = b.shape[-1]
    if threads <= 1 or not _worth_splitting(a, b, 2.0 * B * M * K * N):
        return a @ b
    out = np.empty((B, M, N), dtype=np.result_type(a, b))
    item_a = (lambda n: a[n]) if a.ndim == 3 else (lambda n: a)
    item_b = (lambda n: b[n]) if b.ndim == 3 else (lambda n: b)
    if B < threads:
        for n in range(B):
            matmul(item_a(n), item_b(n), out=out[n], threads=threads)
        return out
    cuts = _bounds(B, threads)

    def block(i):
        for n in range(cuts[i], cuts[i + 1]):
            np.matmul(item_a(n), item_b(n), out=out[n])            # (M, K) @ (K, N)

    run_blocks(block, threads, threads)
    return out


def matmul_sum(a, b, threads=None):
    """``sum_n a[n] @ b[n]``: a (B, M, K), b (B, K, N) -> (M, N), without B partial products.

    The weight gradient of a convolution. Each thread sums its items' products in its own
    (M, N) buffer; the buffers are added at the end (one per thread, not one per item).
    With fewer items than threads, each product is split by :func:`matmul` instead.
    """
    threads = cpu_threads() if threads is None else threads
    B, M, K = a.shape
    N = b.shape[-1]
    if threads <= 1 or not _worth_splitting(a, b, 2.0 * B * M * K * N):
        return (a @ b).sum(axis=0)
    if B < threads:
        total = matmul(a[0], b[0], threads=threads)
        for n in range(1, B):
            total += matmul(a[n], b[n], threads=threads)
        return total
    cuts = _bounds(B, threads)

    def block(i):
        lo, hi = cuts[i], cuts[i + 1]
        total = np.matmul(a[lo], b[lo])                            # (M, N)
        if hi - lo > 1:
            product = np.empty_like(total)
            for n in range(lo + 1, hi):
                total += np.matmul(a[n], b[n], out=product)
        return total

    partial = run_blocks(block, threads, threads)
    total = partial[0]
    for p in partial[1:]:
        total += p
    return total
