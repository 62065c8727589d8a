"""Solutions to the exercises of notebook 14, inside a trained model.

Each ``exercise_N()`` runs in a few seconds on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.lessons import experiments as ex
from minidetr.lessons.trained import (held_out_shapes, load_cached_model, offsets_in_pixels,
                                      record_sampling)
from minidetr.models import build_model, get_config
from minidetr.nn.msdeform_attn import MSDeformAttn

MICRO = dict(d_model=32, nheads=4, dim_feedforward=32, tiny_channels=(8, 16, 16, 16),
             num_queries=8)


def untrained_records(**changes):
    model = build_model(get_config("tiny", **MICRO, **changes)).eval()
    images = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    with no_grad(), record_sampling(model) as records:
        model(Tensor(images))
    return model, records


def exercise_1():
    """At initialisation every point weighs 1/(LK), so every level gets mass 1/L = 1/3;
    head 0 points along +x, so its offsets on level 2 are (1, 0) and (2, 0) pixels."""
    _, records = untrained_records()
    enc = records["transformer.encoder.layers.0.self_attn"][0]
    mass = enc["weights"].sum(-1)                                           # (N, S, M, L)
    np.testing.assert_allclose(mass, 1 / 3, atol=1e-6)
    offsets = offsets_in_pixels(enc)[:, :, 0, 2]                            # (N, S, K, 2)
    np.testing.assert_allclose(offsets, np.broadcast_to([[1, 0], [2, 0]], offsets.shape),
                               atol=1e-4)


def exercise_2():
    """Encoder attention mass per level for tokens inside objects (a C4 token is inside
    a box if its centre is): every token's masses sum to 1 over the levels, and the
    tokens inside objects split into the small and large bins."""
    model, cfg, ckpt = load_cached_model(ex.CACHE / "refine-long.npz")
    batch = held_out_shapes(ex.DATA.parent / "shapes-heldout", 8, batch_size=8,
                            category_map=ckpt.category_map, val_size=128)[0]
    with no_grad(), record_sampling(model) as records:
        model(Tensor(batch.images), batch.mask)
    enc = records["transformer.encoder.layers.0.self_attn"][0]
    H, W = enc["shapes"][1]
    start = int(enc["shapes"][0].prod())
    ys, xs = (np.mgrid[0:H, 0:W] + 0.5) / np.array([H, W])[:, None, None]
    bins = {"small": [], "large": []}
    for n, target in enumerate(batch.targets):
        for cx, cy, w, h in target["boxes"]:
            inside = (np.abs(xs - cx) < w / 2) & (np.abs(ys - cy) < h / 2)    # (H, W)
            tokens = start + np.flatnonzero(inside)
            mass = enc["weights"][n, tokens].sum(-1).mean(1)                 # (T, L)
            bins["small" if np.sqrt(w * h) * 128 < 32 else "large"].append(mass)
    for name, masses in bins.items():
        if masses:
            m = np.concatenate(masses)
            print(name, len(m), m.mean(0).round(3))
            np.testing.assert_allclose(m.sum(1), 1, atol=1e-5)
    assert sum(len(np.concatenate(v)) if v else 0 for v in bins.values()) > 0


def exercise_3():
    """Zero the sampling_offsets bias (its weight is zero at initialisation): every point
    sits on its reference, offsets_in_pixels returns zeros, and the notebook's check
    'the untrained encoder is the ring' would fail."""
    model = build_model(get_config("tiny", **MICRO)).eval()
    for m in model.modules():
        if isinstance(m, MSDeformAttn):
            m.sampling_offsets.bias.data[...] = 0
    images = np.random.default_rng(0).standard_normal((1, 3, 96, 96)).astype(np.float32)
    with no_grad(), record_sampling(model) as records:
        model(Tensor(images))
    offsets = offsets_in_pixels(records["transformer.encoder.layers.0.self_attn"][0])
    assert np.abs(offsets).max() < 1e-5
    ring = np.sqrt((model.transformer.encoder.layers[0].self_attn.initial_offsets() ** 2).sum(-1))
    assert ring.min() >= 1, "the ring's lengths are 1 to 2 sqrt 2: zero is not among them"


def exercise_4():
    """With a box as reference (refine, two-stage) the offsets are fractions of the box:
    doubling the box doubles every offset in pixels. With a point (plain) nothing changes."""
    rng = np.random.default_rng(0)
    attn = MSDeformAttn(16, 1, 2, 2, rng=rng)
    attn.sampling_offsets.weight.data[...] = rng.normal(0, 0.1, attn.sampling_offsets.weight.shape)
    query = Tensor(rng.standard_normal((1, 3, 16)).astype(np.float32))
    shapes = np.array([[8, 8]])
    centre = np.full((1, 3, 1, 2), 0.5, np.float32)

    def pixel_offsets(reference):
        loc, _ = attn.sampling_locations_and_weights(query, reference, shapes)
        return (loc.data - 0.5) * 8                                          # level pixels

    small = np.concatenate([centre, np.full((1, 3, 1, 2), 0.2, np.float32)], -1)
    large = np.concatenate([centre, np.full((1, 3, 1, 2), 0.4, np.float32)], -1)
    np.testing.assert_allclose(pixel_offsets(large), 2 * pixel_offsets(small), rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(pixel_offsets(centre), pixel_offsets(centre.copy()))
