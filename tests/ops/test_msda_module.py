"""MSDeformAttn, the layer: names, initial sampling pattern, forward, gradients, mask.

* parameter names and shapes are those of the official state dict;
* the initial sampling pattern is the documented ring: head m looks along angle
  2 pi m / M (on the unit square), point k sits k + 1 pixels out on every level, and
  the attention is uniform;
* the forward pass equals a direct NumPy computation (projections, softmax over L*K per
  head, offsets divided by (W_l, H_l) or scaled by the box, the padding mask);
* a float64 gradient check with respect to query, value input and reference points.
"""
from __future__ import annotations

import ast

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.nn.msdeform_attn import MSDeformAttn
from minidetr.ops.msda import reference
from minidetr.testing import assert_allclose, gradcheck

SQUARE_RING = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
OFFICIAL_KEYS = [("sampling_offsets.weight", (256, 256)), ("sampling_offsets.bias", (256,)),
                 ("attention_weights.weight", (128, 256)), ("attention_weights.bias", (128,)),
                 ("value_proj.weight", (256, 256)), ("value_proj.bias", (256,)),
                 ("output_proj.weight", (256, 256)), ("output_proj.bias", (256,))]


def levels(shapes):
    shapes = np.asarray(shapes, dtype=np.int64)
    sizes = shapes[:, 0] * shapes[:, 1]
    return shapes, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64), int(sizes.sum())


def randomize(module, rng, scale=0.3):
    """Random weights everywhere, so that offsets and weights depend on the query."""
    for p in module.parameters():
        p.data[...] = rng.normal(0, scale, p.shape).astype(p.dtype)
    return module


# --------------------------------------------------------------------------- names, init
def test_parameter_names_and_shapes_are_the_official_ones():
    module = MSDeformAttn(rng=np.random.default_rng(0))
    assert [(k, tuple(v.shape)) for k, v in module.state_dict().items()] == OFFICIAL_KEYS


def test_official_keys_file_agrees(shared_dir):
    lines = (shared_dir / "reference" / "official-state-dict-r50.txt").read_text().splitlines()
    prefix = "transformer.encoder.layers.0.self_attn."
    official = [(name[len(prefix):], ast.literal_eval(shape)) for name, shape in
                (line.split(" ", 1) for line in lines) if name.startswith(prefix)]
    assert official == OFFICIAL_KEYS


def test_initial_offsets_are_the_square_ring():
    module = MSDeformAttn(d_model=16, n_levels=3, n_heads=8, n_points=4,
                          rng=np.random.default_rng(0))
    bias = module.sampling_offsets.bias.numpy().reshape(8, 3, 4, 2)    # (M, L, K, 2)
    expected = np.array(SQUARE_RING, dtype=np.float64)[:, None, None, :] \
        * np.arange(1, 5)[None, None, :, None]                           # (M, 1, K, 2)
    assert_allclose(bias, np.broadcast_to(expected, (8, 3, 4, 2)), atol=1e-6,
                    what="initial sampling offsets")
    assert not module.sampling_offsets.weight.numpy().any()
    assert not module.attention_weights.weight.numpy().any()
    assert not module.attention_weights.bias.numpy().any()
    assert not module.value_proj.bias.numpy().any() and not module.output_proj.bias.numpy().any()
    bound = np.sqrt(6 / (16 + 16))                                       # xavier-uniform
    w = module.value_proj.weight.numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.5 * bound


@pytest.mark.parametrize("boxes", [False, True])
def test_initial_sampling_pattern(boxes):
    """k + 1 pixels along each head's direction, on every level; uniform attention."""
    M, L, K = 8, 2, 3
    shapes, _, _ = levels([(10, 20), (5, 8)])
    module = MSDeformAttn(d_model=16, n_levels=L, n_heads=M, n_points=K,
                          rng=np.random.default_rng(0))
    rng = np.random.default_rng(1)
    query = Tensor(rng.standard_normal((2, 3, 16)).astype(np.float32))  # any query
    ref = rng.uniform(0.2, 0.8, (2, 3, L, 4 if boxes else 2)).astype(np.float32)
    loc, weights = module.sampling_locations_and_weights(query, ref, shapes)
    pixels = np.array(SQUARE_RING, dtype=np.float64)[:, None, None, :] \
        * np.arange(1, K + 1)[None, None, :, None]                        # (M, 1, K, 2)
    if boxes:   # offsets are fractions of the box: offset / K * (w, h) / 2
        expected = ref[:, :, None, :, None, :2] + pixels / K * ref[:, :, None, :, None, 2:] / 2
    else:       # offsets are pixels of level l: divided by (W_l, H_l)
        expected = ref[:, :, None, :, None, :] + pixels / shapes[:, ::-1][:, None, :]
    assert_allclose(loc, expected, atol=1e-6, what="initial sampling locations")
    assert_allclose(weights, np.full((2, 3, M, L, K), 1 / (L * K)), rtol=1e-6,
                    what="initial attention weights")


# --------------------------------------------------------------------------- forward
def direct_forward(module, query, ref, x, shapes, starts, mask):
    """The layer in plain NumPy (float64), using the reference op for the sampling."""
    p = {k: v.astype(np.float64) for k, v in module.state_dict().items()}
    N, Lq, C = query.shape
    M, L, K = module.n_heads, module.n_levels, module.n_points
    value = x @ p["value_proj.weight"].T + p["value_proj.bias"]
    if mask is not None:
        value = np.where(mask[..., None], 0.0, value)
    offsets = (query @ p["sampling_offsets.weight"].T + p["sampling_offsets.bias"])
    offsets = offsets.reshape(N, Lq, M, L, K, 2)
    logits = (query @ p["attention_weights.weight"].T + p["attention_weights.bias"])
    logits = logits.reshape(N, Lq, M, L * K)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights = (weights / weights.sum(-1, keepdims=True)).reshape(N, Lq, M, L, K)
    if ref.shape[-1] == 2:
        W_H = shapes[:, ::-1].astype(np.float64)                         # (L, 2)
        loc = ref[:, :, None, :, None, :] + offsets / W_H[None, None, None, :, None, :]
    else:
        loc = ref[:, :, None, :, None, :2] + offsets / K * ref[:, :, None, :, None, 2:] * 0.5
    out = reference.forward(value.reshape(N, -1, M, C // M), shapes, starts, loc, weights)
    return out @ p["output_proj.weight"].T + p["output_proj.bias"]


@pytest.mark.parametrize("boxes", [False, True])
@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_forward_equals_direct_numpy(boxes, backend):
    rng = np.random.default_rng(2)
    shapes, starts, S = levels([(4, 5), (2, 3)])
    module = randomize(MSDeformAttn(d_model=12, n_levels=2, n_heads=3, n_points=2,
                                    rng=rng, backend=backend), rng).astype(np.float64)
    query = rng.standard_normal((2, 4, 12))
    x = rng.standard_normal((2, S, 12))
    ref = rng.uniform(0.1, 0.9, (2, 4, 2, 4 if boxes else 2))
    mask = np.zeros((2, S), dtype=bool)
    mask[1, 3:5] = mask[1, -2:] = True
    out = module(Tensor(query), ref, Tensor(x), shapes, starts, mask)
    assert out.shape == (2, 4, 12) and out.dtype == np.float64
    assert_allclose(out, direct_forward(module, query, ref, x, shapes, starts, mask),
                    rtol=1e-10, atol=1e-10, what="MSDeformAttn vs direct NumPy")


def test_padded_tokens_do_not_matter():
    rng = np.random.default_rng(3)
    shapes, starts, S = levels([(3, 4), (2, 2)])
    module = randomize(MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2, rng=rng), rng)
    query = Tensor(rng.standard_normal((1, 5, 8)).astype(np.float32))
    x = rng.standard_normal((1, S, 8)).astype(np.float32)
    ref = rng.uniform(0, 1, (1, 5, 2, 2)).astype(np.float32)
    mask = np.zeros((1, S), dtype=bool)
    mask[0, [2, 3, 7, 12, 15]] = True
    before = module(query, ref, Tensor(x), shapes, starts, mask).numpy()
    x2 = x.copy()
    x2[mask] = 1e3                                               # change the padding only
    after = module(query, ref, Tensor(x2), shapes, starts, mask).numpy()
    np.testing.assert_array_equal(before, after)
    x2[0, 0] += 1                                                # an unpadded token does count
    assert not np.array_equal(module(query, ref, Tensor(x2), shapes, starts, mask).numpy(), before)


def test_gradcheck_query_value_and_reference():
    rng = np.random.default_rng(4)
    shapes, starts, S = levels([(3, 3), (1, 2)])
    module = randomize(MSDeformAttn(d_model=4, n_levels=2, n_heads=2, n_points=2, rng=rng),
                       rng, scale=0.5).astype(np.float64)
    query = rng.standard_normal((1, 3, 4))
    x = rng.standard_normal((1, S, 4))
    ref = rng.uniform(0.1, 0.9, (1, 3, 2, 2))
    mask = np.zeros((1, S), dtype=bool)
    mask[0, 4] = True

    def layer(q, v, r):
        return module(q, r, v, shapes, starts, mask)
    gradcheck(layer, [query, x, ref], name="MSDeformAttn")


# --------------------------------------------------------------------------- errors
def test_bad_arguments_give_clear_errors():
    rng = np.random.default_rng(5)
    shapes, starts, S = levels([(2, 2), (1, 1)])
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1, rng=rng)
    query = Tensor(np.zeros((1, 2, 8), np.float32))
    x = Tensor(np.zeros((1, S, 8), np.float32))
    with pytest.raises(ValueError, match="must be divisible by n_heads"):
        MSDeformAttn(d_model=10, n_heads=4)
    with pytest.raises(ValueError, match=r"\(N, Lq, L, 4\) boxes"):
        module(query, np.zeros((1, 2, 2, 3), np.float32), x, shapes, starts)
    with pytest.raises(TypeError, match="reference_points are float64"):
        module(query, np.zeros((1, 2, 2, 2)), x, shapes, starts)
    with pytest.raises(ValueError, match="covering S = 5 tokens"):
        module(query, np.zeros((1, 2, 2, 2), np.float32), x, np.array([[2, 2], [1, 2]]), starts)
    with pytest.raises(ValueError, match="input_padding_mask must be"):
        module(query, np.zeros((1, 2, 2, 2), np.float32), x, shapes, starts,
               np.zeros((1, S + 1), bool))
