"""Solutions to the exercises of notebook 17, from the formula to the Numba CPU kernel.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.bench.common import msda_inputs
from minidetr.ops.msda import numba_cpu, reference
from minidetr.ops.msda.reference import bilinear_corners, gather_rows


def exercise_1():
    """Predict the size of one of the reference's gathers, (N, Lq, M, K, D) numbers per
    corner and level: 2.5 MB at the paper's decoder shape (N = 2, Lq = 300, M = 8, K = 4,
    D = 32, float32), but 163 MB in the encoder, where every one of S = 19 947 tokens is a
    query. That is why the fast backends work one point at a time."""
    def gather_bytes(N, Lq, M, K, D, itemsize=4):
        return N * Lq * M * K * D * itemsize

    assert round(gather_bytes(2, 300, 8, 4, 32) / 1e6, 1) == 2.5
    assert round(gather_bytes(2, 19_947, 8, 4, 32) / 1e6) == 163
    # the formula against a real gather, at a small shape
    shape = dict(N=2, levels=((6, 8),), M=3, D=5, K=4, Lq=7)
    value, shapes, starts, loc, attn, _ = msda_inputs(shape, "float32", seed=0)
    corner = bilinear_corners(loc[:, :, :, 0, :, 0], loc[:, :, :, 0, :, 1], 6, 8)[0]
    rows = gather_rows(value[:, :48], corner.row)                       # (N, Lq, M, K, D)
    assert rows.nbytes == gather_bytes(2, 7, 3, 4, 5)


def rows_written(value, shapes, starts, loc, n, q, m):
    """The value rows into which the backward pass of query q, head m adds (all levels)."""
    written = set()
    for l, (H, W) in enumerate(shapes):
        for corner in bilinear_corners(loc[n, q, m, l, :, 0], loc[n, q, m, l, :, 1], H, W):
            written |= {int(starts[l] + r) for r, w in zip(corner.row, corner.weight) if w > 0}
    return written


def exercise_2():
    """Break the race-free design: parallelise the backward pass over *queries* instead of
    (image, head) pairs. Two threads then add into the same value rows (a race without
    atomics), as the encoder's neighbouring queries read neighbouring pixels; over pairs,
    no row is ever shared."""
    shape = dict(N=1, levels=((8, 8), (4, 4)), M=2, D=4, K=2, Lq=None)      # encoder-like
    value, shapes, starts, loc, attn, _ = msda_inputs(shape, "float64", seed=1)
    Lq = loc.shape[1]
    by_query = [rows_written(value, shapes, starts, loc, 0, q, 0) for q in range(Lq)]
    shared = sum(1 for a in range(Lq) for b in range(a + 1, Lq) if by_query[a] & by_query[b])
    print(f"{shared} pairs of queries of head 0 write a common value row")
    assert shared > Lq                                      # many races, if threads were queries
    # per (image, head) pair: head 0 and head 1 never share a row of the (N, S, M, D) value
    _, (sn, sm, ss), *_ = numba_cpu._prepare(value, shapes, loc, attn, head_major=False)
    head_rows = [{m * sm + s * ss for s in range(value.shape[1])} for m in range(2)]
    assert not head_rows[0] & head_rows[1]


def exercise_3():
    """Predict: in float32, is the compiled kernel bit-equal to the reference? No: both
    keep float32 arithmetic, but they add in different orders (the reference sums the K
    points at the end, the kernel accumulates point after point), so the results differ
    in the last bits, well within 1e-5 relative."""
    shape = dict(N=2, levels=((12, 16), (6, 8)), M=2, D=32, K=4, Lq=50)
    value, shapes, starts, loc, attn, _ = msda_inputs(shape, "float32", seed=2)
    ref = reference.forward(value, shapes, starts, loc, attn)
    fast = numba_cpu.forward(value, shapes, starts, loc, attn)
    assert ref.dtype == fast.dtype == np.float32
    assert not np.array_equal(ref, fast)
    np.testing.assert_allclose(fast, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    ref64 = reference.forward(*(a.astype(np.float64) if a.dtype == np.float32 else a
                                for a in (value, shapes, starts, loc, attn)))
    worst = {name: float(np.abs(out - ref64).max()) for name, out in (("reference", ref),
                                                                      ("kernel", fast))}
    print(f"float32 error against float64: {worst}")
    assert max(worst.values()) < 1e-5
