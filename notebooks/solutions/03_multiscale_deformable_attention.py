"""Solutions to the exercises of notebook 03, multi-scale deformable attention (Eq. (3)).

Each ``exercise_N()`` runs in well under a second on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr import functional as F
from minidetr.autograd import Tensor, no_grad
from minidetr.nn import MSDeformAttn

C, M, L, K = 8, 2, 3, 2
SHAPES = np.array([[8, 12], [4, 6], [2, 3]])                   # (L, 2) rows (H_l, W_l), 2:3


def make_layer(seed=0):
    rng = np.random.default_rng(seed)
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=K, rng=rng)
    layer.sampling_offsets.weight.data[...] = rng.normal(0, 1.0, (M * L * K * 2, C))
    layer.attention_weights.weight.data[...] = rng.normal(0, 1.0, (M * L * K, C))
    return layer


def locations_and_weights(layer, z, ref, shapes=SHAPES):
    with no_grad():
        loc, attn = layer.sampling_locations_and_weights(Tensor(z), Tensor(ref), shapes)
    return loc.data, attn.data               # (N, Lq, M, L, K, 2), (N, Lq, M, L, K)


def queries(Lq=4, seed=1):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(1, Lq, C)).astype(np.float32)                        # (N, Lq, C)
    ref = np.repeat(rng.uniform(0.2, 0.8, (1, Lq, 1, 2)), L, axis=2).astype(np.float32)
    return z, ref                                                             # (N, Lq, L, 2)


def exercise_1():
    """Predict: the initial offsets are the same number of pixels on every level, so in the
    picture (normalised units) a point of level l lies 2^l times farther from the reference
    than the same point of level 0 (each level halves the resolution)."""
    layer = MSDeformAttn(d_model=C, n_levels=L, n_heads=M, n_points=K,
                         rng=np.random.default_rng(0))
    z, ref = queries()
    loc, _ = locations_and_weights(layer, z, ref)
    reach = loc - ref[:, :, None, :, None, :]                       # (N, Lq, M, L, K, 2)
    for level in range(1, L):
        np.testing.assert_allclose(reach[:, :, :, level], reach[:, :, :, 0] * 2 ** level,
                                   rtol=1e-5, atol=1e-6)


def exercise_2():
    """Break the joint softmax: normalise each level's K logits on its own. Then every
    level gets weight 1 whatever the query, the weights of a head sum to L, and raising one
    level's logits can no longer take attention away from the other levels."""
    layer = make_layer()
    z, _ = queries()
    with no_grad():
        logits = layer.attention_weights(Tensor(z)).data.reshape(1, -1, M, L, K)
    joint = F.softmax(Tensor(logits.reshape(1, -1, M, L * K)), axis=-1).data.reshape(logits.shape)
    per_level = F.softmax(Tensor(logits), axis=-1).data
    assert np.allclose(joint.sum(axis=(-2, -1)), 1, atol=1e-6)
    assert np.allclose(per_level.sum(axis=(-2, -1)), L, atol=1e-5)   # the check fails
    boosted = logits.copy()
    boosted[..., 0, :] += 3.0                                          # favour level 0
    joint_b = F.softmax(Tensor(boosted.reshape(1, -1, M, L * K)), axis=-1).data.reshape(logits.shape)
    per_level_b = F.softmax(Tensor(boosted), axis=-1).data
    assert (joint_b[..., 1:, :].sum(-1) < joint[..., 1:, :].sum(-1)).all(), "levels compete"
    np.testing.assert_allclose(per_level_b, per_level, rtol=1e-5, atol=1e-6)


def exercise_3():
    """Break the normaliser: divide the x offset by H_l and the y offset by W_l (the order the
    official code used before its 2020-12-07 fix). On square levels nothing changes; on
    these 2:3 levels every point with a non-zero offset moves."""
    layer = make_layer()
    z, ref = queries()
    loc, _ = locations_and_weights(layer, z, ref)
    with no_grad():
        offsets = layer.sampling_offsets(Tensor(z)).data.reshape(1, -1, M, L, K, 2)
    right = ref[:, :, None, :, None, :] + offsets / SHAPES[:, ::-1].reshape(1, 1, 1, L, 1, 2)
    swapped = ref[:, :, None, :, None, :] + offsets / SHAPES.reshape(1, 1, 1, L, 1, 2)
    np.testing.assert_allclose(loc, right, rtol=1e-5, atol=1e-6)
    assert np.abs(swapped - loc).max() > 0.05
    square = np.array([[8, 8], [4, 4], [2, 2]])
    loc_sq, _ = locations_and_weights(layer, z, ref, square)
    swapped_sq = ref[:, :, None, :, None, :] + offsets / square.reshape(1, 1, 1, L, 1, 2)
    np.testing.assert_allclose(swapped_sq, loc_sq, rtol=1e-5, atol=1e-6)


def exercise_4():
    """Predict the sizes: each query reads M L K points; the offset and weight projections
    hold 3 M L K (C + 1) parameters, independent of the map's size (for the paper's
    C = 256, M = 8, L = K = 4: 98 688)."""
    layer = make_layer()
    z, ref = queries()
    loc, attn = locations_and_weights(layer, z, ref)
    assert attn[0, 0].size == M * L * K and loc[0, 0].size == 2 * M * L * K
    counted = sum(p.data.size for name, p in layer.named_parameters()
                  if name.startswith(("sampling_offsets", "attention_weights")))
    assert counted == 3 * M * L * K * (C + 1)
    paper = MSDeformAttn(d_model=256, n_levels=4, n_heads=8, n_points=4,
                         rng=np.random.default_rng(0))
    assert sum(p.data.size for name, p in paper.named_parameters()
               if name.startswith(("sampling_offsets", "attention_weights"))) == 98_688
