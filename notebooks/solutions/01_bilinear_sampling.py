"""Solutions to the exercises of notebook 01, bilinear sampling by hand.

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.ops import msda

H, W = 5, 7
V = np.random.default_rng(0).integers(1, 10, size=(H, W)).astype(np.float64)  # (H, W), no 0
VALUE = V.reshape(1, H * W, 1, 1)                                  # (N, S, M, D)
SHAPES, STARTS = np.array([[H, W]]), np.array([0])                 # (L, 2), (L,)


def sample(x, y, value=VALUE):
    """s(x, y) through the op: one query, one point, weight 1."""
    loc = np.array([x, y], dtype=np.float64).reshape(1, 1, 1, 1, 1, 2)  # (N, Lq, M, L, K, 2)
    return msda.forward(value, SHAPES, STARTS, loc, np.ones((1, 1, 1, 1, 1))).item()


def grad_x(x, y):
    """ds/dx as the op's backward returns it."""
    loc = np.array([x, y], dtype=np.float64).reshape(1, 1, 1, 1, 1, 2)
    _, grad_loc, _ = msda.backward(np.ones((1, 1, 1)), VALUE, SHAPES, STARTS, loc,
                                   np.ones((1, 1, 1, 1, 1)))
    return grad_loc[0, 0, 0, 0, 0, 0]


def exercise_1():
    """Predict ds/dx exactly on the skip lines u = -1 and u = W, next to the one-sided
    derivatives (grid_sample's backward returns the right-hand one: floor picks the cell
    on the right). Only u = -1 differs; at u = W the right-hand derivative is 0 anyway."""
    y = (2 + 0.5) / H                                              # through row 2's centres
    h = 1e-7
    for u, name in ((-1.0, "u = -1"), (float(W), "u = W")):
        x = (u + 0.5) / W
        right = (sample(x + h, y) - sample(x, y)) / h
        left = (sample(x, y) - sample(x - h, y)) / h
        got = grad_x(x, y)
        print(f"{name}: backward {got:.4f}, left-hand {left:.4f}, right-hand {right:.4f}")
        assert got == 0.0, f"{name}: a skipped point has zero gradient, got {got}"
        if u == -1:       # the right-hand slope is W * V[row, 0]: the skip rule differs here
            assert abs(right - W * V[2, 0]) < 1e-4 and abs(left) < 1e-12
        else:             # ... but not here: both the skip and the right-hand slope give 0
            assert abs(right) < 1e-12 and abs(left + W * V[2, W - 1]) < 1e-4


def sample_align_corners(x, y, value2d=V):
    """Bilinear sampling with align_corners=True: x = 0 and x = 1 are the *centres* of the
    first and last columns, u = x (W - 1); zero padding outside."""
    Hm, Wm = value2d.shape
    u, v = x * (Wm - 1), y * (Hm - 1)
    u0, v0 = int(np.floor(u)), int(np.floor(v))
    a, b = u - u0, v - v0
    total = 0.0
    for i, j, w in ((v0, u0, (1 - b) * (1 - a)), (v0, u0 + 1, (1 - b) * a),
                    (v0 + 1, u0, b * (1 - a)), (v0 + 1, u0 + 1, b * a)):
        if 0 <= i < Hm and 0 <= j < Wm:
            total += w * value2d[i, j]
    return total


def exercise_2():
    """Implement align_corners=True and see which of the notebook's checks fail: the pixel
    centres (j + 1/2)/W are no longer read exactly, the left edge x = 0 reads the whole
    column instead of half of it, and the map's centre is the only place they agree."""
    row = 2
    y = (row + 0.5) / H
    centres = [(j + 0.5) / W for j in range(W)]
    misses = [j for j, x in enumerate(centres)
              if abs(sample_align_corners(x, row / (H - 1)) - V[row, j]) > 1e-12]
    assert misses and misses != list(range(W)) and (W - 1) // 2 not in misses, misses
    # "s(x = 0) = V[row, 0] / 2" holds for align_corners=False only
    assert sample(0.0, y) == V[row, 0] / 2
    assert sample_align_corners(0.0, row / (H - 1)) == V[row, 0]
    # the centre of the map is the same point under both conventions
    assert abs(sample(0.5, 0.5) - sample_align_corners(0.5, 0.5)) < 1e-12
    print(f"align_corners=True misreads pixel centres of columns {misses}")


def exercise_3():
    """Break the scatter-add: write the value gradient with numpy fancy-index ``+=``
    (buffered: a repeated index receives only its last contribution). Two points that
    share neighbours then lose gradient, and the finite-difference check catches it."""
    locs = np.array([[0.43, 0.33], [0.45, 0.35]]).reshape(1, 2, 1, 1, 1, 2)  # share corners
    attn = np.ones((1, 2, 1, 1, 1))
    g = np.ones((1, 2, 1))
    grad_value, _, _ = msda.backward(g, VALUE, SHAPES, STARTS, locs, attn)

    rows, weights = [], []
    for x, y in locs.reshape(2, 2):
        u, v = x * W - 0.5, y * H - 0.5
        u0, v0 = int(np.floor(u)), int(np.floor(v))
        a, b = u - u0, v - v0
        rows += [v0 * W + u0, v0 * W + u0 + 1, (v0 + 1) * W + u0, (v0 + 1) * W + u0 + 1]
        weights += [(1 - b) * (1 - a), (1 - b) * a, b * (1 - a), b * a]
    rows, weights = np.array(rows), np.array(weights)
    broken = np.zeros(H * W)
    broken[rows] += weights                      # buffered: duplicates are not summed
    fixed = np.zeros(H * W)
    np.add.at(fixed, rows, weights)              # unbuffered: duplicates add up

    eps, numeric = 1e-6, np.zeros(H * W)
    for s in np.unique(rows):
        bump = np.zeros_like(VALUE)
        bump[0, s] = eps
        out = lambda val: msda.forward(val, SHAPES, STARTS, locs, attn).sum()  # noqa: E731
        numeric[s] = (out(VALUE + bump) - out(VALUE - bump)) / (2 * eps)
    assert np.allclose(fixed, numeric, atol=1e-8)
    assert np.allclose(grad_value.ravel(), numeric, atol=1e-8)
    assert not np.allclose(broken, numeric, atol=1e-3), "the broken gradient must be caught"
    print(f"fancy-index += loses {np.abs(broken - numeric).max():.3f} of the gradient")


def exercise_4():
    """Predict how many entries of grad_value one point touches: 4 inside the map, 2 on the
    left edge x = 0 (two neighbours are padding), 1 near a corner, 0 when skipped."""
    for (x, y), expected in (((0.43, 0.33), 4), ((0.0, 0.33), 2), ((0.02, 0.05), 1),
                             ((-0.2, 0.5), 0)):
        loc = np.array([x, y]).reshape(1, 1, 1, 1, 1, 2)
        gv, _, _ = msda.backward(np.ones((1, 1, 1)), VALUE, SHAPES, STARTS, loc,
                                 np.ones((1, 1, 1, 1, 1)))
        assert np.count_nonzero(gv) == expected, ((x, y), np.count_nonzero(gv), expected)
