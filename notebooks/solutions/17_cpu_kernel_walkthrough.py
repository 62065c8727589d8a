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
    (image, head group) tasks. Two threads then add into the same value rows (a race
    without atomics), as the encoder's neighbouring queries read neighbouring pixels. A
    task holds every query of its image and heads, and a point of head m of image n only
    touches rows n*sn + m*sm + s*ss, so two tasks never share a row, for any grouping."""
    shape = dict(N=2, levels=((8, 8), (4, 4)), M=4, D=4, K=2, Lq=None)      # encoder-like
    value, shapes, starts, loc, attn, _ = msda_inputs(shape, "float64", seed=1)
    N, S, M, _ = value.shape
    Lq = loc.shape[1]
    by_query = [rows_written(value, shapes, starts, loc, 0, q, 0) for q in range(Lq)]
    shared = sum(1 for a in range(Lq) for b in range(a + 1, Lq) if by_query[a] & by_query[b])
    print(f"{shared} pairs of queries of head 0 write a common value row")
    assert shared > Lq                                      # many races, if threads were queries
    # per (image, head group) task, in both layouts and every grouping: disjoint rows
    for head_major in (False, True):
        _, (sn, sm, ss), *_ = numba_cpu._prepare(value, shapes, loc, attn, head_major)
        for groups in (1, 2, 4):
            per_task = M // groups
            tasks = [{n * sn + m * sm + s * ss
                      for m in range(g * per_task, (g + 1) * per_task) for s in range(S)}
                     for n in range(N) for g in range(groups)]
            assert sum(map(len, tasks)) == len(set().union(*tasks)) == N * M * S, \
                f"head_major={head_major}, groups={groups}: tasks share value rows"
            # and every row the backward pass of a query writes lies in its task's rows
            for n, q, m in ((0, 0, 0), (1, Lq - 1, M - 1)):
                written = {n * sn + m * sm + r * ss
                           for r in rows_written(value, shapes, starts, loc, n, q, m)}
                assert written <= tasks[n * groups + m // per_task]


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


def exercise_4():
    """Predict ``head_groups(N, M=8, threads)``: the fewest groups (divisors of M) that give
    the busiest thread the smallest share ceil(tasks / threads) / tasks of the N * groups
    tasks.

    * training, N = 2 on 2 threads: 1 group (2 tasks, one each: share 1/2);
    * N = 1 on 2 threads: 2 groups of 4 heads (share 1/2);
    * N = 1 on 3 threads: 8 groups of one head: 8 tasks, the busiest thread runs 3 (3/8),
      better than 4 tasks (2 of 4 = 1/2) or 2 tasks (1/2);
    * N = 1 on 6 threads: 4 groups. 8 tasks would also give the busiest thread 2 of 8 =
      1/4, the same finishing time, so the fewer, longer groups win (longer runs of
      neighbouring rows), and two threads stay idle;
    * N = 2 on 16 threads: 8 groups, 16 tasks of one head, one per thread.
    """
    def share(N, groups, threads):
        tasks = N * groups
        return -(-tasks // threads) / tasks

    expected = {(2, 2): 1, (1, 2): 2, (1, 3): 8, (1, 6): 4, (2, 16): 8}
    for (N, threads), groups in expected.items():
        got = numba_cpu.head_groups(N, 8, threads)
        assert got == groups, f"head_groups({N}, 8, {threads}) = {got}, predicted {groups}"
        best = min(share(N, g, threads) for g in (1, 2, 4, 8))
        assert share(N, got, threads) == best           # no grouping keeps threads busier
        assert all(g >= got for g in (1, 2, 4, 8) if share(N, g, threads) == best)  # fewest
    assert share(1, 8, 6) == share(1, 4, 6) == 0.25
