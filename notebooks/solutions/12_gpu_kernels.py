"""Solutions to the exercises of notebook 12, the GPU kernels (no GPU needed).

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.ops.msda import cupy_backend, numba_cuda

WARP = 32


def predicted_plan(dtype, D):
    """(VEC, G): the widest of 4 floats / 2 doubles (16 bytes) that divides D, then
    G = min(32, next power of two >= ceil(D / VEC))."""
    vec = next(v for v in ((4, 2, 1) if np.dtype(dtype) == np.float32 else (2, 1)) if D % v == 0)
    lanes = -(-D // vec)
    return vec, min(WARP, 1 << (lanes - 1).bit_length())


def owners(D, vec, G):
    """The lane of every channel: ``for (c = lane * VEC; c < D; c += G * VEC)``."""
    return np.array([(c // vec) % G for c in range(D)])


def exercise_1():
    """Predict VEC, the group size G and the heads per warp for a few (dtype, D), then ask
    the host code. For D = 64 in float32: VEC 4, 16 lanes, 2 heads per warp, and lane j
    owns channels 4j..4j+3 only (one slice each); for D = 71 nothing but VEC 1 divides,
    so a whole warp serves one head and its lanes take 3 channels (lanes 0..6) or 2."""
    for dtype, D in [(np.float32, 32), (np.float64, 32), (np.float32, 64), (np.float32, 30),
                     (np.float32, 71), (np.float32, 8), (np.float64, 256)]:
        plan = cupy_backend.plan_launch(dtype, D, (np.empty(128, dtype),))
        assert (plan.vector_width, plan.group_size) == predicted_plan(dtype, D), (dtype, D, plan)
    vec, G = predicted_plan(np.float32, 64)
    assert (vec, G, WARP // G) == (4, 16, 2)
    o = owners(64, vec, G)
    assert [int(o[c]) for c in (0, 3, 4, 63)] == [0, 0, 1, 15]
    o71 = owners(71, *predicted_plan(np.float32, 71))
    assert np.bincount(o71).tolist() == [3] * 7 + [2] * 25


def exercise_2():
    """Predict the Numba CUDA kernels' group size: no vector loads (VEC = 1), so
    G = min(32, next power of two >= D); then check that every lane's loop covers each
    channel exactly once, for both backends' plans."""
    for D in (1, 5, 8, 30, 32, 64, 71):
        G = numba_cuda.group_size_for(D)
        assert G == min(WARP, 1 << (D - 1).bit_length()), (D, G)
        for vec, group in ((1, G), predicted_plan(np.float32, D)):
            counts = np.zeros(D, int)
            for lane in range(group):
                for c in range(lane * vec, D, group * vec):
                    counts[c:c + vec] += 1
            assert (counts == 1).all(), (D, vec, group)


def group_sum(values, G, first_offset=None):
    """Simulate the kernels' tree of ``shfl_down`` within groups of G lanes of one warp:
    for offset = G/2, G/4, ..., 1, lane i adds the value of lane i + offset. Lane 0 of
    each group then holds the group's sum. Returns every lane's value."""
    x = np.array(values, dtype=np.float64)
    offset = G // 2 if first_offset is None else first_offset
    while offset >= 1:
        # shfl_down with width G: a lane whose source is outside its group keeps its value
        lane = np.arange(WARP)
        source = lane + offset
        inside = (source % G) > (lane % G)
        shifted = np.where(inside, x[np.minimum(source, WARP - 1)], x)
        x = x + np.where(inside, shifted, 0.0)
        offset //= 2
    return x


def exercise_3():
    """Break the reduction: start the tree at G/4 instead of G/2. The first lane of each
    group then misses the second half of its group's partial sums, so the gradients of a
    point's location and weight (dot products over the D channels) come out wrong, and
    the notebook's comparison with the reference fails."""
    rng = np.random.default_rng(0)
    partial = rng.normal(size=WARP)                                    # one value per lane
    for G in (8, 16, 32):
        right = group_sum(partial, G)
        expected = partial.reshape(-1, G).sum(axis=1)                  # (WARP / G,) groups
        np.testing.assert_allclose(right[::G], expected, rtol=1e-12)
        wrong = group_sum(partial, G, first_offset=G // 4)
        np.testing.assert_allclose(wrong[::G], partial.reshape(-1, G)[:, : G // 2].sum(axis=1),
                                   rtol=1e-12)
        assert np.abs(wrong[::G] - expected).max() > 1e-3
