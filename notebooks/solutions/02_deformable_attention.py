"""Solutions to the exercises of notebook 02, deformable attention (Eq. (2)).

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import math

import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.nn import MSDeformAttn
from minidetr.ops.msda.reference import bilinear_corners

C, M, K = 6, 3, 4                    # model width, heads, points (D = C / M = 2)
H, W = 9, 11                         # the single feature map


def make_layer(seed=0, scale=1.0):
    """A single-level layer whose offset and weight projections are not zero."""
    rng = np.random.default_rng(seed)
    layer = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K, rng=rng)
    layer.sampling_offsets.weight.data[...] = rng.normal(0, scale, (M * K * 2, C))
    layer.attention_weights.weight.data[...] = rng.normal(0, scale, (M * K, C))
    return layer


def inputs(seed=1, Lq=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(1, Lq, C)).astype(np.float32)                   # (N, Lq, C)
    ref = rng.uniform(0.2, 0.8, size=(1, Lq, 1, 2)).astype(np.float32)   # (N, Lq, L=1, 2)
    x = rng.normal(size=(1, H * W, C)).astype(np.float32)               # (N, S, C)
    return z, ref, x


def exercise_1():
    """Merge the two Linears into the paper's single projection of z_q to 3MK numbers
    (2MK offsets, then MK weight logits) and prove it is the same layer: same sampling
    locations, same weights, same output, and the same gradient with respect to z_q."""
    layer = make_layer()
    z, ref, x = inputs()
    W3 = np.concatenate([layer.sampling_offsets.weight.data,
                         layer.attention_weights.weight.data])           # (3MK, C)
    b3 = np.concatenate([layer.sampling_offsets.bias.data, layer.attention_weights.bias.data])
    assert W3.shape == (3 * M * K, C)

    def merged_locations_and_weights(zq):
        """The paper's one projection, split after the fact."""
        proj = F.matmul(zq, Tensor(W3.T)) + Tensor(b3)                   # (N, Lq, 3MK)
        N, Lq, _ = zq.shape
        offsets = proj[..., : 2 * M * K].reshape(N, Lq, M, 1, K, 2)      # pixels
        logits = proj[..., 2 * M * K:].reshape(N, Lq, M, K)
        weights = F.softmax(logits, axis=-1).reshape(N, Lq, M, 1, K)
        normalizer = Tensor(np.array([W, H], np.float32).reshape(1, 1, 1, 1, 1, 2))
        return Tensor(ref).reshape(N, Lq, 1, 1, 1, 2) + offsets / normalizer, weights

    zt = Tensor(z, requires_grad=True)
    loc_a, w_a = layer.sampling_locations_and_weights(zt, Tensor(ref), [[H, W]])
    zm = Tensor(z, requires_grad=True)
    loc_b, w_b = merged_locations_and_weights(zm)
    np.testing.assert_allclose(loc_a.data, loc_b.data, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(w_a.data, w_b.data, rtol=1e-6, atol=1e-7)
    probe = np.random.default_rng(2).normal(size=loc_a.shape).astype(np.float32)
    ((loc_a * Tensor(probe)).sum() + (w_a * w_a).sum()).backward()
    ((loc_b * Tensor(probe)).sum() + (w_b * w_b).sum()).backward()
    np.testing.assert_allclose(zt.grad, zm.grad, rtol=1e-5, atol=1e-6)
    n_params = sum(p.data.size for name, p in layer.named_parameters()
                   if name.startswith(("sampling_offsets", "attention_weights")))
    assert n_params == W3.size + b3.size == 3 * M * K * (C + 1)


def exercise_2():
    """Predict the initial layer: weights exactly 1/K, and head m's points k + 1 pixels from
    the reference along the angle 2 pi m / M, scaled onto the unit square (for M = 3:
    (1, 0), (-0.577, 1), (-0.577, -1))."""
    layer = MSDeformAttn(d_model=C, n_levels=1, n_heads=M, n_points=K,
                         rng=np.random.default_rng(0))
    z, ref, _ = inputs()
    with no_grad():
        loc, attn = layer.sampling_locations_and_weights(Tensor(z), Tensor(ref), [[H, W]])
    assert np.allclose(attn.data, 1 / K)
    offsets_px = (loc.data - ref.reshape(1, -1, 1, 1, 1, 2)) * np.array([W, H])  # (N,Lq,M,1,K,2)
    directions = np.array([[1.0, 0.0], [-1 / math.sqrt(3), 1.0], [-1 / math.sqrt(3), -1.0]])
    expected = directions[:, None, :] * np.arange(1, K + 1)[None, :, None]    # (M, K, 2)
    np.testing.assert_allclose(offsets_px[0, :, :, 0], np.broadcast_to(expected, (5, M, K, 2)),
                               atol=1e-4)


def exercise_3():
    """Locality: a query's output depends only on the (at most) 4 neighbours of each of its
    M K points. Change the map everywhere else: the output does not move; change one
    neighbour: it does. (Full attention's output would change in both cases.)"""
    layer = make_layer()
    z, ref, x = inputs(Lq=1)
    with no_grad():
        out = layer(Tensor(z), Tensor(ref), Tensor(x), [[H, W]], [0]).data
        loc, _ = layer.sampling_locations_and_weights(Tensor(z), Tensor(ref), [[H, W]])
    loc = loc.data[0, 0, :, 0]                                          # (M, K, 2)
    read = set()
    for c in bilinear_corners(loc[..., 0].ravel(), loc[..., 1].ravel(), H, W):
        read |= {int(r) for r, w in zip(c.row, c.weight) if w > 0}
    assert 0 < len(read) <= 4 * M * K
    elsewhere = np.setdiff1d(np.arange(H * W), sorted(read))
    x_far = x.copy()
    x_far[0, elsewhere] += 100.0
    x_near = x.copy()
    x_near[0, min(read)] += 1.0
    with no_grad():
        out_far = layer(Tensor(z), Tensor(ref), Tensor(x_far), [[H, W]], [0]).data
        out_near = layer(Tensor(z), Tensor(ref), Tensor(x_near), [[H, W]], [0]).data
    np.testing.assert_array_equal(out_far, out)
    assert np.abs(out_near - out).max() > 1e-4
    print(f"the query reads {len(read)} of {H * W} pixels")


def exercise_4():
    """Break the softmax: normalise over the M heads instead of the K points. The
    notebook's check "A sums to 1 over the K points of a head" fails."""
    layer = make_layer()
    z, _, _ = inputs()
    with no_grad():
        logits = layer.attention_weights(Tensor(z)).data.reshape(1, -1, M, K)   # (N, Lq, M, K)
    wrong = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)        # over heads
    right = np.exp(logits) / np.exp(logits).sum(axis=3, keepdims=True)        # over points
    assert np.allclose(right.sum(-1), 1, atol=1e-6)
    assert not np.allclose(wrong.sum(-1), 1, atol=1e-6), "the check must catch it"
    assert np.allclose(wrong.sum(2), 1, atol=1e-6)
