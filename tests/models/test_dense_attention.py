"""DenseAttention (Eq. 1) and ModelConfig.attention = "dense": the convergence experiment's
baseline. Shapes, float64 gradients, padding, DETR's key = x + pos, and that the default
(deformable) model is exactly what it was."""
from __future__ import annotations

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.models import build_model, get_config
from minidetr.models.config import ModelConfig
from minidetr.models.dense_attention import DenseAttention
from minidetr.nn import MultiheadAttention
from minidetr.nn.msdeform_attn import MSDeformAttn
from minidetr.testing import gradcheck, gradcheck_module

SHAPES = np.array([[3, 4], [2, 2]])          # L = 2 levels, S = 12 + 4 = 16 tokens
LEVEL_START = np.array([0, 12])


def _micro(dtype=np.float64, seed=0):
    rng = np.random.default_rng(seed)
    attn = DenseAttention(d_model=8, n_heads=2, dropout=0.0, rng=rng).astype(dtype)
    query = rng.standard_normal((2, 5, 8)).astype(dtype)                    # (N, Lq, C)
    value = rng.standard_normal((2, 16, 8)).astype(dtype)                   # (N, S, C)
    pos = rng.standard_normal((2, 16, 8)).astype(dtype)                     # (N, S, C)
    ref = rng.uniform(0.1, 0.9, (2, 5, 2, 2)).astype(dtype)                 # (N, Lq, L, 2)
    return attn, query, value, pos, ref


def test_shapes_and_ignored_reference_points():
    attn, query, value, pos, ref = _micro(np.float32)
    out = attn(Tensor(query), ref, Tensor(value), SHAPES, LEVEL_START, key_pos=Tensor(pos))
    assert out.shape == (2, 5, 8), f"output shape {out.shape}, expected (N, Lq, C) = (2, 5, 8)"
    other = attn(Tensor(query), ref * 0.5, Tensor(value), SHAPES, LEVEL_START,
                 key_pos=Tensor(pos))
    np.testing.assert_array_equal(out.data, other.data,
                                  err_msg="dense attention must not depend on reference points")


def test_equals_multihead_attention_with_key_plus_pos():
    """forward(query, ..., value, key_pos) is MultiheadAttention(query, value + pos, value)."""
    attn, query, value, pos, ref = _micro()
    out = attn(Tensor(query), ref, Tensor(value), SHAPES, LEVEL_START, key_pos=Tensor(pos))
    plain, _ = MultiheadAttention.forward(attn, Tensor(query), Tensor(value + pos),
                                          Tensor(value))
    np.testing.assert_allclose(out.data, plain.data, rtol=0, atol=1e-12)
    without_pos = attn(Tensor(query), ref, Tensor(value), SHAPES, LEVEL_START)
    assert np.abs(without_pos.data - out.data).max() > 1e-3, \
        "key_pos had no effect: the keys must be value + key_pos"


def test_padded_tokens_get_no_weight():
    attn, query, value, pos, ref = _micro()
    mask = np.zeros((2, 16), bool)
    mask[1, 10:] = True                                                     # (N, S)
    out = attn(Tensor(query), ref, Tensor(value), SHAPES, LEVEL_START, mask, Tensor(pos))
    changed = value.copy()
    changed[1, 10:] = 1e3                                                   # padded values
    out2 = attn(Tensor(query), ref, Tensor(changed), SHAPES, LEVEL_START, mask, Tensor(pos))
    np.testing.assert_allclose(out.data, out2.data, rtol=0, atol=1e-9,
                               err_msg="values at padded tokens leaked into the output")
    _, weights = attn.attend(Tensor(query), Tensor(value + pos), Tensor(value),
                             key_padding_mask=mask, need_weights=True)      # (N, Lq, S)
    assert np.all(weights.data[1, :, 10:] == 0), "padded keys got attention weight"
    np.testing.assert_allclose(weights.data.sum(-1), 1.0, atol=1e-12)


def test_gradcheck_float64_inputs_and_parameters():
    attn, query, value, pos, ref = _micro()
    gradcheck(lambda q, v, p: attn(q, ref, v, SHAPES, LEVEL_START, key_pos=p),
              [query, value, pos], name="DenseAttention")
    G = np.random.default_rng(1).standard_normal((2, 5, 8))
    gradcheck_module(attn, lambda m: (m(Tensor(query), ref, Tensor(value), SHAPES,
                                        LEVEL_START, key_pos=Tensor(pos)) * G).sum(),
                     ["in_proj_weight", "in_proj_bias", "out_proj.weight"],
                     n_elements_per_param=4)


def test_bad_key_pos_shape_is_one_clear_error():
    attn, query, value, pos, ref = _micro()
    with pytest.raises(ValueError, match="key_pos must have input_flatten's shape"):
        attn(Tensor(query), ref, Tensor(value), SHAPES, LEVEL_START, key_pos=Tensor(pos[:, :3]))


MICRO = dict(d_model=16, nheads=2, enc_layers=1, dec_layers=2, dim_feedforward=16,
             num_queries=4, tiny_channels=(8, 8, 8, 8), gn_groups=8, dropout=0.0)


@pytest.mark.parametrize("levels", [1, 3])
def test_dense_model_forward_and_state_keys(levels):
    model = build_model(get_config("tiny", attention="dense", num_feature_levels=levels,
                                   **MICRO)).eval()
    keys = list(model.state_dict())
    assert not any("sampling_offsets" in k for k in keys), "dense model kept MSDeformAttn"
    for k in ("transformer.encoder.layers.0.self_attn.in_proj_weight",
              "transformer.decoder.layers.0.cross_attn.in_proj_weight"):
        assert k in keys, f"{k} missing from the dense model's state dict"
    images = np.random.default_rng(0).standard_normal((2, 3, 64, 48)).astype(np.float32)
    out = model(Tensor(images))
    assert out["pred_boxes"].shape == (2, 4, 4)
    assert np.isfinite(out["pred_logits"].data).all()


def test_default_model_is_unchanged():
    """attention defaults to "deformable": same modules, keys and outputs as before, and
    configurations stored before the field existed still load."""
    cfg = get_config("tiny", **MICRO)
    assert cfg.attention == "deformable"
    old = {k: v for k, v in cfg.to_dict().items() if k != "attention"}      # an older file
    assert ModelConfig.from_dict(old) == cfg
    a, b = build_model(cfg).eval(), build_model(cfg.replace(attention="deformable")).eval()
    layers = list(a.transformer.encoder.layers) + list(a.transformer.decoder.layers)
    assert all(isinstance(getattr(layer, "self_attn", None), MSDeformAttn)
               or isinstance(layer.cross_attn, MSDeformAttn) for layer in layers)
    assert sum("sampling_offsets" in k for k in a.state_dict()) == 2 * (1 + 2)  # w+b/layer
    images = Tensor(np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32))
    np.testing.assert_array_equal(a(images)["pred_boxes"].data, b(images)["pred_boxes"].data)
    with pytest.raises(ValueError, match="attention must be 'deformable' or 'dense'"):
        get_config("tiny", attention="sparse")
