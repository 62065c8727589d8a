"""The CPU thread blocks of minidetr.functional._parallel give the serial results (to the last bits)."""
import threading
import time

import numpy as np
import pytest

from minidetr.functional import _parallel
from minidetr.functional._parallel import (batched_matmul, cpu_threads, matmul, matmul_sum,
                                           run_blocks)
from minidetr.functional.conv import col2im, im2col


def _assert_same(actual, expected, what):
    """Equal up to the last bits: a block edge may move an element to another BLAS kernel."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tolerance = 16 * np.finfo(expected.dtype).eps * max(1.0, float(np.abs(expected).max()))
    error = np.abs(actual.astype(np.float64) - expected)
    if not error.max() <= tolerance:
        where = np.unravel_index(np.argmax(error), actual.shape)
        raise AssertionError(f"{what}: element {where} is {actual[where]!r}, serial gives "
                             f"{expected[where]!r} (tolerance {tolerance:.3g})")


@pytest.mark.parametrize("shape", [(300, 64, 40), (40, 64, 300), (257, 129, 255), (8, 2000, 8)])
@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matmul_blocks_equal_the_serial_product(shape, threads, dtype, monkeypatch):
    monkeypatch.setattr(_parallel, "MIN_FLOPS", 0)          # split even small products
    M, K, N = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((M, K)).astype(dtype)
    b = rng.standard_normal((K, N)).astype(dtype)
    _assert_same(matmul(a, b, threads=threads), a @ b, f"matmul {shape} on {threads} threads")
    # transposed operands (views), as Linear's backward passes them
    _assert_same(matmul(b.T, a.T, threads=threads), b.T @ a.T, "matmul of transposed views")
    out = np.full((M, N), np.nan, dtype)
    assert matmul(a, b, out=out, threads=threads) is out
    _assert_same(out, a @ b, "matmul into out")
    bias = rng.standard_normal(N).astype(dtype)
    _assert_same(matmul(a, b, threads=threads, bias=bias), a @ b + bias,
                 f"matmul + bias {shape} on {threads} threads (each block adds its part)")


@pytest.mark.parametrize("threads", [1, 2])
def test_matmul_adds_the_bias_when_not_split_too(threads):
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((5, 4)), rng.standard_normal((4, 3))
    bias = np.array([1.0, -2.0, 30.0])
    _assert_same(matmul(a, b, threads=threads, bias=bias), a @ b + bias, "small matmul + bias")


@pytest.mark.parametrize("batch", [1, 2, 5])
@pytest.mark.parametrize("threads", [2, 3])
def test_batched_products_equal_the_serial_ones(batch, threads, monkeypatch):
    monkeypatch.setattr(_parallel, "MIN_FLOPS", 0)
    rng = np.random.default_rng(1)
    w = rng.standard_normal((24, 36)).astype(np.float32)       # (M, K), shared
    cols = rng.standard_normal((batch, 36, 50)).astype(np.float32)  # (B, K, N)
    g = rng.standard_normal((batch, 24, 50)).astype(np.float32)     # (B, M, N)
    _assert_same(batched_matmul(w, cols, threads=threads), w @ cols, "W @ cols[n]")
    _assert_same(batched_matmul(w.T, g, threads=threads), w.T @ g, "W^T @ g[n]")
    a = rng.standard_normal((batch, 24, 36)).astype(np.float32)
    _assert_same(batched_matmul(a, cols, threads=threads), a @ cols, "a[n] @ cols[n]")
    expected = (g @ cols.transpose(0, 2, 1)).sum(axis=0)           # (M, K)
    actual = matmul_sum(g, cols.transpose(0, 2, 1), threads=threads)
    # The sum over n is grouped per thread, so only the order of additions may differ.
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5,
                               err_msg="sum_n g[n] @ cols[n]^T")


def test_col2im_by_channel_blocks_equals_one_block(monkeypatch):
    rng = np.random.default_rng(2)
    x_shape = (2, 7, 19, 23)
    geometry = ((3, 3), (2, 1), (1, 2), (1, 2))                    # kernel, stride, pad, dil
    cols = im2col(np.zeros(x_shape, np.float32), *geometry)
    cols = rng.standard_normal(cols.shape).astype(np.float32)
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "1")
    image_1 = col2im(cols, x_shape, *geometry)
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "3")
    monkeypatch.setattr("minidetr.functional._parallel.MIN_BLOCK_BYTES", 0)
    calls = []
    real = _parallel.run_blocks
    monkeypatch.setattr("minidetr.functional._parallel.run_blocks",
                        lambda *a: calls.append(a[1]) or real(*a))
    # a sum per pixel over the taps, in the same order: the same numbers
    np.testing.assert_array_equal(col2im(cols, x_shape, *geometry), image_1,
                                  err_msg="col2im on 3 threads")
    assert calls == [3], "col2im must have run as 3 blocks of channels"


def test_run_blocks_returns_in_order_and_raises_a_blocks_error():
    assert run_blocks(lambda i: i * i, 5, threads=2) == [0, 1, 4, 9, 16]
    finished = []

    def block(i):
        if i == 2:
            raise KeyError("block 2 failed")
        finished.append(i)
        return i

    with pytest.raises(KeyError, match="block 2 failed"):
        run_blocks(block, 4, threads=2)
    assert sorted(finished) == [0, 1, 3], "every other block still ran to its end"


def test_blocks_inside_a_block_run_serially():
    names = []

    def outer(i):
        return run_blocks(lambda j: (names.append(threading.current_thread().name), j)[1], 3,
                          threads=2)

    assert run_blocks(outer, 2, threads=2) == [[0, 1, 2], [0, 1, 2]]
    assert len(names) == 6


def test_the_thread_count_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "3")
    assert cpu_threads() == 3
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="MINIDETR_NUM_THREADS must be a positive integer"):
        cpu_threads()
    monkeypatch.setenv("MINIDETR_NUM_THREADS", "0")
    with pytest.raises(ValueError, match="got 0"):
        cpu_threads()
    monkeypatch.delenv("MINIDETR_NUM_THREADS")
    assert cpu_threads() >= 1


def test_thread_t_runs_blocks_t_plus_multiples_of_the_thread_count():
    caller = threading.current_thread().name
    where = run_blocks(lambda i: threading.current_thread().name, 5, threads=2)
    assert [name == caller for name in where] == [True, False, True, False, True], where
    assert where[1] == where[3] and where[1].startswith("minidetr-"), where


def test_the_pool_is_reused_and_rebuilt_when_the_thread_count_changes():
    def names(threads):
        return set(run_blocks(lambda i: threading.current_thread().name, threads,
                              threads=threads)) - {threading.current_thread().name}

    three = names(3)
    assert len(three) == 2 and names(3) == three, "the same two workers serve every call"
    assert len(names(2)) == 1
    _parallel._POOL.retire()                   # what an interrupted wait does
    assert len(names(2)) == 1 and run_blocks(lambda i: -i, 3, threads=2) == [0, -1, -2]


def test_callers_on_two_threads_share_the_pool_safely():
    """One call uses the pool at a time; a caller that finds it busy runs its blocks
    itself. Either way every call gets its own results, and nothing deadlocks."""
    failures = []

    def caller(offset):
        for _ in range(200):
            got = run_blocks(lambda i: (time.sleep(0.0001), offset + i)[1], 3, threads=2)
            if got != [offset, offset + 1, offset + 2]:
                failures.append((offset, got))

    threads = [threading.Thread(target=caller, args=(k * 100,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a caller hung"
    assert not failures, failures[:3]
