"""Solutions to the exercises of notebook 15, convergence: standard against deformable
attention.

Each ``exercise_N()`` runs in a second or two on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all).
"""
import numpy as np

from minidetr.autograd import Tensor
from minidetr.lessons import experiments as ex
from minidetr.lessons.trained import attention_focus, dense_head_weights, record_sampling
from minidetr.models import build_model
from minidetr.models.dense_attention import DenseAttention


def dense_focus(n_keys, C=64, M=4, seed=0, sharpen=1.0):
    """attention_focus of an untrained DenseAttention over ``n_keys`` random tokens (64
    queries among them); ``sharpen`` scales the query and key rows of in_proj_weight."""
    rng = np.random.default_rng(seed)
    attn = DenseAttention(C, M, rng=rng)
    attn.in_proj_weight.data[:2 * C] *= sharpen
    tokens = rng.standard_normal((1, n_keys, C)).astype(np.float32)        # (1, S, C)
    with record_sampling(attn) as records:
        attn(Tensor(tokens[:, :64]), None, Tensor(tokens), None, None)
    return attention_focus(records[""][0])


def exercise_1():
    """Prediction: close to N_k (the weights start nearly uniform), more so the larger
    N_k is relative to the spread of the logits. Measured: above 70 % of N_k for both."""
    for n_keys in (64, 1024):
        f = dense_focus(n_keys)
        print(n_keys, f)
        assert f["perplexity"] > 0.7 * n_keys, f
        assert f["max_weight"] < 10 / n_keys, f


def exercise_2():
    """dL/dv_k = A_qk g for each head, checked through the layer's own backward: with
    g_m = (G W_o)[:, head m] and V = value W_v^T, dL/dvalue = sum_m (A_m^T g_m) W_v,m."""
    rng = np.random.default_rng(0)
    C, M, S, Lq = 8, 2, 5, 3
    D = C // M
    attn = DenseAttention(C, M, rng=rng).astype(np.float64)
    query = rng.standard_normal((1, Lq, C))
    value = Tensor(rng.standard_normal((1, S, C)), requires_grad=True)
    G = rng.standard_normal((1, Lq, C))
    out, _ = attn.attend(Tensor(query), value, value)                     # key = value here
    (out * G).sum().backward()
    A = dense_head_weights(attn, query, value.data)[0]                      # (M, Lq, S)
    W_o = attn.out_proj.weight.data                                         # (C, C)
    W_v = attn.in_proj_weight.data[2 * C:]                                  # (C, C)
    g = (G[0] @ W_o).reshape(Lq, M, D)                                      # (Lq, M, D)
    # the value path only: dL/dV_m = A_m^T g_m; the key path adds the softmax term, so
    # compare against a pass where the keys are constants
    value2 = Tensor(value.data.copy(), requires_grad=True)
    out2, _ = attn.attend(Tensor(query), Tensor(value.data.copy()), value2)
    (out2 * G).sum().backward()
    by_hand = sum((A[m].T @ g[:, m]) @ W_v[m * D:(m + 1) * D] for m in range(M))  # (S, C)
    np.testing.assert_allclose(value2.grad[0], by_hand, rtol=1e-10, atol=1e-12)
    assert np.abs(value.grad - value2.grad).max() > 1e-6, "the key path adds gradient too"


def exercise_3():
    """Sharpen the logits 100x (query and key rows x 10): the perplexity collapses far
    below N_k, so the notebook's check 'perplexity > 0.5 n_keys' fails; the weights are
    focused, but on keys chosen by the random initialisation, not by the data."""
    plain, sharp = dense_focus(256), dense_focus(256, sharpen=10.0)
    print(plain, sharp)
    assert plain["perplexity"] > 0.5 * 256
    assert sharp["perplexity"] < 0.5 * 256 and sharp["max_weight"] > 5 * plain["max_weight"]


def exercise_4():
    """The decoder's cross-attention at initialisation: deformable weighs exactly L*K
    points (perplexity 2 at L=1, K=2); dense spreads over nearly all unpadded tokens."""
    micro = dict(d_model=32, nheads=2, dim_feedforward=32, tiny_channels=(8, 16, 16, 16),
                 num_queries=8)
    images = np.random.default_rng(0).standard_normal((2, 3, 96, 96)).astype(np.float32)
    focus = {}
    for name in ("dense-L1", "L1", "dense-L3"):
        model = build_model(ex.setting_config(name, **micro)).eval()
        with record_sampling(model) as records:
            model(Tensor(images))
        focus[name] = attention_focus(records["transformer.decoder.layers.0.cross_attn"][0])
    print(focus)
    assert abs(focus["L1"]["perplexity"] - 2) < 1e-6
    assert focus["dense-L1"]["n_keys"] == 9 and focus["dense-L3"]["n_keys"] == 189
    assert focus["dense-L3"]["perplexity"] > 0.5 * 189
