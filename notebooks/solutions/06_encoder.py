"""Solutions to the exercises of notebook 06, the encoder.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.autograd import Tensor, no_grad
from minidetr.models import build_model, get_config
from minidetr.models.deformable_transformer import get_reference_points


def tokens(seed=0):
    """The untrained tiny model and the flattened tokens of a padded batch of two images
    (64 x 96 and 40 x 56 inside a 64 x 96 canvas)."""
    model = build_model(get_config("tiny", seed=seed)).eval()
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(2, 3, 64, 96)).astype(np.float32)
    mask = np.zeros((2, 64, 96), bool)
    mask[1, 40:, :] = True
    mask[1, :, 56:] = True
    images[1][:, mask[1]] = 0.0
    with no_grad():
        srcs, masks, pos_embeds = model.project_features(images, mask)
        flat = model.transformer.flatten_levels(srcs, masks, pos_embeds)
    return model, flat


def exercise_1():
    """Break the padding: run the encoder without its padding mask. Noise written into the
    padded tokens now leaks into the image's tokens (the notebook's check
    ``change_valid < 1e-5`` fails); with the mask it cannot."""
    model, (src, mask_flatten, pos, shapes, starts, ratios) = tokens()
    encoder = model.transformer.encoder
    noise = np.random.default_rng(1).normal(0, 10, src.shape).astype(np.float32)
    noisy = Tensor(np.where(mask_flatten[..., None], noise, src.data))
    valid = ~mask_flatten
    change = {}
    for name, m in (("with mask", mask_flatten), ("without mask", None)):
        with no_grad():
            clean = encoder(src, shapes, starts, ratios, pos, m).data
            dirty = encoder(noisy, shapes, starts, ratios, pos, m).data
        change[name] = np.abs(dirty - clean)[valid].max()
    print(change)
    assert change["with mask"] < 1e-5 and change["without mask"] > 1e-2


def reference_points_by_hand(shapes, ratios):
    """get_reference_points written directly: (N, S, L, 2)."""
    N, L = ratios.shape[:2]
    per_level = []
    for l, (H, W) in enumerate(shapes):
        ii, jj = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")  # (H, W)
        x = jj.reshape(1, -1) / (ratios[:, l, 0:1] * W)                 # (N, H W), valid-normalised
        y = ii.reshape(1, -1) / (ratios[:, l, 1:2] * H)
        per_level.append(np.stack([x, y], -1))                           # (N, H W, 2)
    ref = np.concatenate(per_level, axis=1)                              # (N, S, 2)
    return ref[:, :, None] * ratios[:, None]                             # (N, S, L, 2)


def exercise_2():
    """Implement the encoder's reference points from the formula and compare; then drop
    the valid ratios (use each token's padded pixel centre on every level): the answer is
    unchanged for the unpadded image and wrong for the padded one."""
    _, (src, mask_flatten, pos, shapes, starts, ratios) = tokens()
    ref = get_reference_points(shapes, ratios)
    np.testing.assert_allclose(reference_points_by_hand(shapes, ratios), ref, rtol=1e-5, atol=1e-6)
    naive = reference_points_by_hand(shapes, np.ones_like(ratios))
    assert np.allclose(naive[0], ref[0], atol=1e-6), "image 0 has no padding"
    assert np.abs(naive[1] - ref[1]).max() > 0.05, "image 1 is padded: the ratios matter"


def exercise_3():
    """Predict where an untrained encoder token looks: head m's point k sits (k + 1) pixels
    of level l from its reference, i.e. (k + 1) * stride_l pixels of the *input image*,
    along the direction of head m; and every point has the weight 1 / (L K)."""
    model, (src, mask_flatten, pos, shapes, starts, ratios) = tokens()
    attn = model.transformer.encoder.layers[0].self_attn
    M, L, K = attn.n_heads, attn.n_levels, attn.n_points
    ref = get_reference_points(shapes, ratios)
    with no_grad():
        loc, w = attn.sampling_locations_and_weights(src + pos, Tensor(ref), shapes)
    loc, w = loc.data, w.data                                            # (N, S, M, L, K, 2)
    assert np.allclose(w, 1 / (L * K))
    strides = np.array(model.backbone.strides + [2 * model.backbone.strides[-1]])[:L]
    image_px = (loc - ref[:, :, None, :, None, :]) * shapes[:, ::-1].reshape(1, 1, 1, L, 1, 2) \
        * strides.reshape(1, 1, 1, L, 1, 1)                              # offsets, image pixels
    expected = attn.initial_offsets() * strides.reshape(1, L, 1, 1)      # (M, L, K, 2)
    np.testing.assert_allclose(image_px, np.broadcast_to(expected, image_px.shape), atol=1e-3)


def exercise_4():
    """Measure the receptive field: how many tokens of the input does one image token of
    the memory depend on, after one layer and after two? At most 1 + 4 M L K after one
    layer (itself, through the residual, and the 4 neighbours of each of its M L K
    points), and more after two (at most that number squared): each sampled token brings
    its own points along. (At initialisation every token uses the same pattern, so many of
    the second layer's reads overlap.)"""
    model, (src, mask_flatten, pos, shapes, starts, ratios) = tokens()
    attn = model.transformer.encoder.layers[0].self_attn
    M, L, K = attn.n_heads, attn.n_levels, attn.n_points
    ref = Tensor(get_reference_points(shapes, ratios))
    token = int(starts[1]) + 3 * int(shapes[1][1]) + 5                  # level 1, pixel (3, 5)
    reached = []
    for depth in (1, 2):
        x0 = Tensor(src.data.copy(), requires_grad=True)
        x = x0
        for layer in model.transformer.encoder.layers[:depth]:
            x = layer(x, pos, ref, shapes, starts, mask_flatten)
        probe = np.random.default_rng(depth).normal(size=x.shape[-1]).astype(np.float32)
        (x[0, token] * Tensor(probe)).sum().backward()   # not .sum(): LayerNorm's output
        #                                                  sums to a constant
        reached.append(int((np.abs(x0.grad[0]).sum(-1) > 0).sum()))
    print(f"token {token} depends on {reached[0]} tokens after 1 layer, {reached[1]} after 2")
    bound = 1 + 4 * M * L * K
    assert 1 < reached[0] <= bound and reached[0] < reached[1] <= bound ** 2
