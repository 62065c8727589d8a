"""Tests of minidetr.nn: layers against closed forms, gradients, state-dict naming, RNG.

Every layer is compared with a direct NumPy computation (or a known formula), checked
with float64 central differences (``module.astype(np.float64)``), and the Module
machinery is checked against PyTorch's naming rules and the official checkpoint's keys.
"""
from __future__ import annotations

import copy
import json
import math
from collections import OrderedDict

import numpy as np
import pytest

import minidetr.nn as nn
from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.testing import assert_allclose, gradcheck


# --------------------------------------------------------------------------- helpers
def device(xp):
    return "cpu" if xp is np else "cuda"


def module_gradcheck(module, inputs, call=None, tol=1e-6):
    """Gradcheck ``module`` w.r.t. its floating inputs *and* all its parameters.

    The parameters are swapped for the checker's tensors during each call (test-only
    surgery on ``_parameters``), so both analytic and numeric derivatives see them.
    """
    call = call or (lambda m, *xs: m(*xs))
    slots = []                                   # (owner module, local name), unique params
    seen = set()
    for m in module.modules():
        for local, p in m._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                slots.append((m, local))
    originals = [owner._parameters[local] for owner, local in slots]
    n_in = len(inputs)

    def fn(*tensors):
        for (owner, local), t in zip(slots, tensors[n_in:]):
            owner._parameters[local] = t
        try:
            return call(module, *tensors[:n_in])
        finally:
            for (owner, local), p in zip(slots, originals):
                owner._parameters[local] = p

    arrays = list(inputs) + [p.data for p in originals]        # gradcheck copies them
    return gradcheck(fn, arrays, tol=tol, name=type(module).__name__)


# --------------------------------------------------------------------------- Linear
def test_linear_matches_x_wT_plus_b(xp, rng):
    layer = nn.Linear(5, 3, rng=rng).to(device(xp))
    x = xp.asarray(rng.normal(size=(2, 4, 5)).astype(np.float32))
    y = layer(Tensor(x))
    W, b = to_numpy(layer.weight.data), to_numpy(layer.bias.data)
    assert y.shape == (2, 4, 3) and y.dtype == np.float32
    assert_allclose(y.data, to_numpy(x) @ W.T + b, rtol=1e-5, atol=1e-6, what="Linear")


def test_linear_default_init_bounds_and_no_bias(rng):
    layer = nn.Linear(400, 300, rng=rng)
    bound = 1 / math.sqrt(400)
    w = layer.weight.data
    assert w.shape == (300, 400) and w.dtype == np.float32
    assert np.abs(w).max() <= bound and np.abs(layer.bias.data).max() <= bound
    # U(-b, b) has std b / sqrt(3): 120000 samples pin it to well under 1 %.
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound
    no_bias = nn.Linear(4, 2, bias=False, rng=rng)
    assert no_bias.bias is None and list(no_bias.state_dict()) == ["weight"]
    x = rng.normal(size=(3, 4)).astype(np.float32)
    assert_allclose(no_bias(x).data, x @ no_bias.weight.data.T, rtol=1e-6, what="no bias")


def test_same_seed_same_init_and_bad_arguments():
    a = nn.Linear(4, 3, rng=np.random.default_rng(7))
    b = nn.Linear(4, 3, rng=np.random.default_rng(7))
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    with pytest.raises(ValueError, match="in_features"):
        nn.Linear(0, 3)
    with pytest.raises(TypeError, match="out_features"):
        nn.Linear(3, 2.5)
    with pytest.raises(TypeError, match="rng"):
        nn.Linear(3, 2, rng=42)
    with pytest.raises(ValueError, match="last dimension 4"):
        a(np.zeros((2, 5), np.float32))


def test_linear_gradcheck(rng):
    layer = nn.Linear(3, 2, rng=rng).astype(np.float64)
    module_gradcheck(layer, [rng.normal(size=(2, 3))])


# --------------------------------------------------------------------------- Conv2d
def _conv_reference(x, w, b, stride, padding, dilation):
    """Direct loops over output positions: y[n, o, i, j] = sum w * window + b."""
    N, C, H, W = x.shape
    O, _, kh, kw = w.shape
    xp_ = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    Ho = (H + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    Wo = (W + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    y = np.zeros((N, O, Ho, Wo))
    for i in range(Ho):
        for j in range(Wo):
            window = xp_[:, :, i * stride:i * stride + dilation * (kh - 1) + 1:dilation,
                         j * stride:j * stride + dilation * (kw - 1) + 1:dilation]
            y[:, :, i, j] = np.einsum("nchw,ochw->no", window, w) + b
    return y


@pytest.mark.parametrize("stride,padding,dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv2d_matches_direct_loops(xp, rng, stride, padding, dilation):
    conv = nn.Conv2d(2, 3, 3, stride=stride, padding=padding, dilation=dilation, rng=rng)
    conv.to(device(xp))
    x = rng.normal(size=(2, 2, 7, 6)).astype(np.float32)
    y = conv(xp.asarray(x))
    ref = _conv_reference(x, to_numpy(conv.weight.data), to_numpy(conv.bias.data),
                          stride, padding, dilation)
    assert y.shape == ref.shape
    assert_allclose(y.data, ref, rtol=1e-4, atol=1e-5, what="Conv2d")


def test_conv2d_init_keys_and_errors(rng):
    conv = nn.Conv2d(4, 6, (3, 1), rng=rng)
    assert conv.weight.shape == (6, 4, 3, 1)
    assert np.abs(conv.weight.data).max() <= 1 / math.sqrt(4 * 3)
    assert list(conv.state_dict()) == ["weight", "bias"]
    assert "Conv2d(4, 6, kernel_size=(3, 1)" in repr(conv)
    with pytest.raises(ValueError, match="stride"):
        nn.Conv2d(1, 1, 3, stride=0)
    with pytest.raises(ValueError, match=r"expected input \(N, 4, H, W\)"):
        conv(np.zeros((1, 3, 5, 5), np.float32))


def test_conv2d_gradcheck(rng):
    conv = nn.Conv2d(2, 2, 2, stride=1, padding=1, rng=rng).astype(np.float64)
    module_gradcheck(conv, [rng.normal(size=(1, 2, 3, 3))])


# --------------------------------------------------------------------------- norms
def test_layer_norm_statistics_and_affine(xp, rng):
    ln = nn.LayerNorm(6).to(device(xp))
    x = xp.asarray((rng.normal(size=(3, 4, 6)) * 5 + 2).astype(np.float32))
    y = to_numpy(ln(x).data).astype(np.float64)
    assert_allclose(y.mean(-1), np.zeros((3, 4)), atol=1e-5, what="LayerNorm mean")
    assert_allclose(y.var(-1), np.ones((3, 4)), rtol=1e-3, what="LayerNorm variance")
    w, b = rng.normal(size=6).astype(np.float32), rng.normal(size=6).astype(np.float32)
    ln.load_state_dict({"weight": w, "bias": b})
    xn = to_numpy(x).astype(np.float64)
    expected = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5) * w + b
    assert_allclose(ln(x).data, expected, rtol=1e-4, atol=1e-5, what="LayerNorm affine")


def test_group_norm_statistics_per_group(xp, rng):
    gn = nn.GroupNorm(2, 6).to(device(xp))
    x = (rng.normal(size=(2, 6, 3, 4)) * 3 - 1).astype(np.float32)
    y = to_numpy(gn(xp.asarray(x)).data).astype(np.float64)
    y = y.reshape(2, 2, 3 * 3 * 4)                          # (N, G, C/G * H * W)
    assert_allclose(y.mean(-1), np.zeros((2, 2)), atol=1e-5, what="GroupNorm mean")
    assert_allclose(y.var(-1), np.ones((2, 2)), rtol=1e-3, what="GroupNorm variance")
    with pytest.raises(ValueError, match="divisible"):
        nn.GroupNorm(4, 6)


def test_frozen_batch_norm_formula_buffers_and_checkpoint_keys(xp, rng):
    bn = nn.FrozenBatchNorm2d(3)
    values = {k: rng.uniform(0.5, 2.0, size=3).astype(np.float32)
              for k in ("weight", "bias", "running_mean", "running_var")}
    # A torchvision checkpoint also has num_batches_tracked: accepted and ignored.
    bn.load_state_dict({**values, "num_batches_tracked": np.array(5)})
    bn.to(device(xp))
    assert list(bn.parameters()) == []                      # all four are buffers
    assert list(bn.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    x = rng.normal(size=(2, 3, 2, 2)).astype(np.float32)
    v = {k: a[None, :, None, None] for k, a in values.items()}
    scale = v["weight"] / np.sqrt(v["running_var"] + 1e-5)
    expected = (x - v["running_mean"]) * scale + v["bias"]
    assert_allclose(bn(xp.asarray(x)).data, expected, rtol=1e-5, atol=1e-6, what="FrozenBN")


@pytest.mark.parametrize("make,shape", [(lambda: nn.LayerNorm(4), (2, 3, 4)),
                                        (lambda: nn.GroupNorm(2, 4), (2, 4, 2, 2))],
                         ids=["layer_norm", "group_norm"])
def test_norm_gradcheck(rng, make, shape):
    layer = make().astype(np.float64)
    # Non-trivial affine parameters, so their gradients are checked at a generic point.
    layer.load_state_dict({"weight": rng.normal(size=shape[1] if len(shape) == 4 else 4),
                           "bias": rng.normal(size=shape[1] if len(shape) == 4 else 4)})
    module_gradcheck(layer, [rng.normal(size=shape)])


# --------------------------------------------------------------------------- Embedding
def test_embedding_lookup_and_repeated_index_gradient(xp, rng):
    emb = nn.Embedding(5, 3, rng=rng).to(device(xp))
    idx = np.array([[1, 1], [4, 1]])
    out = emb(xp.asarray(idx))
    assert out.shape == (2, 2, 3)
    assert_allclose(out.data, to_numpy(emb.weight.data)[idx], what="lookup")
    upstream = rng.normal(size=(2, 2, 3)).astype(np.float32)
    out.backward(xp.asarray(upstream))
    expected = np.zeros((5, 3), np.float32)
    expected[1] = upstream[0, 0] + upstream[0, 1] + upstream[1, 1]   # row 1 used three times
    expected[4] = upstream[1, 0]
    assert_allclose(emb.weight.grad, expected, rtol=1e-6, atol=1e-6, what="Embedding grad")


def test_embedding_init_and_errors():
    emb = nn.Embedding(300, 64, rng=np.random.default_rng(0))
    w = emb.weight.data
    assert abs(w.mean()) < 0.02 and abs(w.std() - 1.0) < 0.02       # N(0, 1)
    with pytest.raises(IndexError, match=r"\[0, 300\)"):
        emb(np.array([0, 300]))
    with pytest.raises(TypeError, match="integers"):
        emb(np.array([0.0, 1.0]))


# --------------------------------------------------------------------------- MLP
def test_mlp_structure_keys_and_forward(rng):
    mlp = nn.MLP(4, 8, 2, num_layers=3, rng=rng)
    assert list(mlp.state_dict()) == [f"layers.{i}.{p}" for i in range(3)
                                      for p in ("weight", "bias")]
    assert [l.weight.shape for l in mlp.layers] == [(8, 4), (8, 8), (2, 8)]
    x = rng.normal(size=(5, 4)).astype(np.float32)
    h = x
    for i, l in enumerate(mlp.layers):
        h = h @ l.weight.data.T + l.bias.data
        if i < 2:
            h = np.maximum(h, 0)                # ReLU between layers, none after the last
    assert_allclose(mlp(x).data, h, rtol=1e-5, atol=1e-6, what="MLP")
    with pytest.raises(ValueError, match="num_layers"):
        nn.MLP(4, 8, 2, num_layers=0)


def test_mlp_gradcheck(rng):
    mlp = nn.MLP(3, 4, 2, num_layers=2, rng=rng).astype(np.float64)
    module_gradcheck(mlp, [rng.normal(size=(2, 3))])


# --------------------------------------------------------------------------- MultiheadAttention
def _mha_reference(m, q, k, v, mask=None):
    """softmax(Q K^T / sqrt(D)) V per head, with the in_proj split and out_proj, in NumPy."""
    C, M = m.embed_dim, m.num_heads
    D = C // M
    W, b = to_numpy(m.in_proj_weight.data).astype(np.float64), to_numpy(m.in_proj_bias.data)
    Q = q @ W[:C].T + b[:C]
    K = k @ W[C:2 * C].T + b[C:2 * C]
    V = v @ W[2 * C:].T + b[2 * C:]
    N, Lq, Lk = q.shape[0], q.shape[1], k.shape[1]
    out = np.zeros((N, Lq, C))
    weights = np.zeros((N, M, Lq, Lk))
    for n in range(N):
        for h in range(M):
            cols = slice(h * D, (h + 1) * D)
            s = Q[n, :, cols] @ K[n, :, cols].T / math.sqrt(D)          # (Lq, Lk)
            if mask is not None:
                s[:, mask[n]] = -np.inf
            a = np.exp(s - s.max(-1, keepdims=True))
            a /= a.sum(-1, keepdims=True)
            weights[n, h] = a
            out[n, :, cols] = a @ V[n, :, cols]
    Wo, bo = to_numpy(m.out_proj.weight.data), to_numpy(m.out_proj.bias.data)
    return out @ Wo.T + bo, weights.mean(1)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding_mask"])
def test_mha_matches_numpy_per_head(xp, rng, masked):
    m = nn.MultiheadAttention(8, 2, rng=rng).astype(np.float64).to(device(xp))
    # Non-zero biases, so the in_proj split of the bias is checked too.
    m.load_state_dict({**m.state_dict(), "in_proj_bias": rng.normal(size=24),
                       "out_proj.bias": rng.normal(size=8)})
    q, k, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 5, 8))
    mask = np.zeros((2, 5), bool)
    if masked:
        mask[0, [1, 4]] = True
        mask[1, 0] = True
    out, w = m(*(xp.asarray(a) for a in (q, k, v)),
               key_padding_mask=xp.asarray(mask) if masked else None, need_weights=True)
    ref_out, ref_w = _mha_reference(m, q, k, v, mask if masked else None)
    assert out.shape == (2, 3, 8) and w.shape == (2, 3, 5)
    assert_allclose(out.data, ref_out, rtol=1e-10, atol=1e-12, what="MHA output")
    assert_allclose(w.data, ref_w, rtol=1e-10, atol=1e-12, what="MHA weights")
    w_np = to_numpy(w.data)
    assert np.all(w_np[mask[:, None, :].repeat(3, 1)] == 0)           # masked keys: weight 0
    assert_allclose(w_np.sum(-1), np.ones((2, 3)), rtol=1e-12, what="weights sum to 1")


def test_mha_layout_init_and_errors(rng):
    m = nn.MultiheadAttention(16, 4, dropout=0.1, rng=rng)
    assert list(m.state_dict()) == ["in_proj_weight", "in_proj_bias", "out_proj.weight",
                                    "out_proj.bias"]
    assert m.in_proj_weight.shape == (48, 16) and m.in_proj_bias.shape == (48,)
    assert m.scaling == 1 / math.sqrt(4)
    bound = math.sqrt(6 / (16 + 48))                                  # xavier on (3C, C)
    assert np.abs(m.in_proj_weight.data).max() <= bound
    assert np.abs(m.in_proj_weight.data).max() > 0.9 * bound
    assert not m.in_proj_bias.data.any() and not m.out_proj.bias.data.any()
    assert "batch_first=True" in repr(m)
    with pytest.raises(ValueError, match="divisible"):
        nn.MultiheadAttention(10, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        nn.MultiheadAttention(8, 2, dropout=1.0)
    x = np.zeros((2, 3, 16), np.float32)
    with pytest.raises(ValueError, match="batch first"):
        m(x.transpose(1, 0, 2)[:, :, :8], x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=np.zeros((2, 4), bool))
    out, weights = m(x, x, x)
    assert weights is None and out.shape == (2, 3, 16)


def test_mha_gradcheck_with_mask(rng):
    m = nn.MultiheadAttention(4, 2, rng=rng).astype(np.float64)
    m.load_state_dict({**m.state_dict(), "in_proj_bias": rng.normal(size=12),
                       "out_proj.bias": rng.normal(size=4)})
    mask = np.array([[False, True, False]])
    q, k, v = rng.normal(size=(1, 2, 4)), rng.normal(size=(1, 3, 4)), rng.normal(size=(1, 3, 4))
    module_gradcheck(m, [q, k, v], call=lambda mod, a, b, c: mod(a, b, c, key_padding_mask=mask)[0])


def test_mha_attention_dropout_only_in_training(rng):
    m = nn.MultiheadAttention(4, 2, dropout=0.5, rng=rng).seed_dropout(0)
    x = rng.normal(size=(1, 6, 4)).astype(np.float32)
    _, w_train = m(x, x, x, need_weights=True)
    assert (w_train.data == 0).any()                    # some probabilities dropped
    m.eval()
    _, w_eval = m(x, x, x, need_weights=True)
    assert_allclose(w_eval.data.sum(-1), np.ones((1, 6)), rtol=1e-6, what="eval weights")


# --------------------------------------------------------------------------- Module machinery
class _Block(nn.Module):
    """Own params a, b (b assigned after the child), a buffer, one child: order a, b, buf, child."""

    def __init__(self, rng):
        super().__init__()
        self.a = nn.Parameter(np.zeros(2, np.float32))
        self.child = nn.Linear(2, 2, rng=rng)
        self.register_buffer("buf", np.ones(3, np.float32))
        self.register_buffer("scratch", np.ones(1, np.float32), persistent=False)
        self.b = nn.Parameter(np.zeros(1, np.float32))
        self.drop = nn.Dropout(0.5)


def test_state_dict_pytorch_order_and_snapshot(rng):
    block = _Block(rng)
    sd = block.state_dict()
    assert isinstance(sd, OrderedDict)
    assert list(sd) == ["a", "b", "buf", "child.weight", "child.bias"]   # no "scratch"
    assert [n for n, _ in block.named_buffers()] == ["buf", "scratch"]
    assert [n for n, _ in block.named_parameters()] == ["a", "b", "child.weight", "child.bias"]
    assert [n for n, _ in block.named_modules()] == ["", "child", "drop"]
    sd["a"][:] = 7                                        # a snapshot: the model is unchanged
    assert not block.a.data.any()


def test_load_state_dict_reports_keys_by_name_and_is_atomic(rng):
    block = _Block(rng)
    good = block.state_dict()
    before = block.child.weight.data
    new = {k: v + 1 for k, v in good.items()}
    result = block.load_state_dict(new)
    assert block.child.weight.data is before                # copied in place
    np.testing.assert_array_equal(block.child.weight.data, good["child.weight"] + 1)
    assert result == ([], [])

    bad = dict(new)
    del bad["child.bias"]
    bad["child.extra"] = np.zeros(1)
    bad["buf"] = np.zeros(4)
    with pytest.raises(KeyError) as err:
        block.load_state_dict({k: v * 0 for k, v in bad.items()})
    text = str(err.value)
    assert "missing keys: child.bias" in text and "unexpected keys: child.extra" in text
    assert "buf: checkpoint (4,) vs model (3,)" in text
    np.testing.assert_array_equal(block.a.data, good["a"] + 1)   # nothing was loaded

    del bad["buf"]
    result = block.load_state_dict(bad, strict=False)
    assert result.missing_keys == ["buf", "child.bias"]
    assert result.unexpected_keys == ["child.extra"]
    with pytest.raises(KeyError, match="shape mismatch"):
        block.load_state_dict({"buf": np.zeros(2)}, strict=False)


def test_shared_module_in_module_list(rng):
    head = nn.Linear(3, 2, rng=rng)
    heads = nn.ModuleList([head] * 3 + [nn.Linear(3, 2, rng=rng)])
    keys = list(heads.state_dict())
    assert keys == [f"{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert len(list(heads.parameters())) == 4                    # unique tensors only
    assert [n for n, _ in heads.named_parameters()] == ["0.weight", "0.bias", "3.weight", "3.bias"]
    assert heads.num_parameters() == 2 * (3 * 2 + 2)
    assert heads[1] is head and heads[-1] is not head and len(heads) == 4
    assert len(list(heads.children())) == 2 and len(list(heads.modules())) == 3
    sd = heads.state_dict()
    for i in range(3):
        sd[f"{i}.bias"] = np.full(2, 5.0, np.float32)
    heads.load_state_dict(sd)
    np.testing.assert_array_equal(head.bias.data, [5, 5])


def test_deepcopy_keeps_sharing_and_copies_values(rng):
    shared = nn.MLP(2, 3, 1, num_layers=2, rng=rng)
    heads = nn.ModuleList([shared, shared])
    clone = copy.deepcopy(heads)
    assert clone[0] is clone[1]                                  # still one shared head
    assert clone[0].layers[0].weight is not shared.layers[0].weight
    for (k, a), (_, b) in zip(heads.state_dict().items(), clone.state_dict().items()):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_module_modes_grads_dtype_repr_and_errors(rng):
    mlp = nn.MLP(2, 3, 1, num_layers=2, rng=rng)
    assert all(m.training for m in mlp.modules())
    mlp.eval()
    assert not any(m.training for m in mlp.modules())
    mlp.train()
    out = mlp(rng.normal(size=(4, 2)).astype(np.float32)).sum()
    out.backward()
    assert all(p.grad is not None for p in mlp.parameters())
    mlp.zero_grad()
    assert all(p.grad is None for p in mlp.parameters())
    mlp.astype(np.float64)
    assert all(p.dtype == np.float64 for p in mlp.parameters())
    bn = nn.FrozenBatchNorm2d(2).astype(np.float64)
    assert all(b.dtype == np.float64 for _, b in bn.named_buffers())
    assert mlp.to("cpu") is mlp
    text = repr(nn.Sequential(nn.Conv2d(1, 2, 1, rng=rng), nn.GroupNorm(1, 2)))
    assert text.splitlines()[1].strip().startswith("(0): Conv2d(1, 2")
    assert "(1): GroupNorm(1, 2, eps=1e-05)" in text

    class Broken(nn.Module):
        def __init__(self):
            self.w = nn.Parameter(np.zeros(1, np.float32))
    with pytest.raises(RuntimeError, match="super"):
        Broken()
    with pytest.raises(TypeError, match="registered parameter"):
        mlp.layers[0].weight = np.zeros((3, 2))
    with pytest.raises(ValueError, match="unknown device"):
        mlp.to("tpu")
    with pytest.raises(TypeError, match="floating"):
        mlp.astype(np.int32)


def test_sequential_applies_in_order(rng):
    seq = nn.Sequential(nn.Linear(2, 3, rng=rng), nn.ReLU(), nn.Identity(),
                        nn.Linear(3, 1, rng=rng))
    x = rng.normal(size=(4, 2)).astype(np.float32)
    h = np.maximum(x @ seq[0].weight.data.T + seq[0].bias.data, 0)
    assert_allclose(seq(x).data, h @ seq[3].weight.data.T + seq[3].bias.data, rtol=1e-5,
                    atol=1e-6, what="Sequential")
    assert list(seq.state_dict()) == ["0.weight", "0.bias", "3.weight", "3.bias"]


# --------------------------------------------------------------------------- official keys
class _MSDeformAttnNames(nn.Module):
    """Only the parameter names of MSDeformAttn (the real module lives elsewhere)."""

    def __init__(self, d, rng, M=2, L=4, K=4):
        super().__init__()
        self.sampling_offsets = nn.Linear(d, M * L * K * 2, rng=rng)
        self.attention_weights = nn.Linear(d, M * L * K, rng=rng)
        self.value_proj = nn.Linear(d, d, rng=rng)
        self.output_proj = nn.Linear(d, d, rng=rng)


class _EncoderLayer(nn.Module):
    def __init__(self, d, rng):
        super().__init__()
        self.self_attn = _MSDeformAttnNames(d, rng)
        self.dropout1 = nn.Dropout(0.1)
        self.norm1 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, 2 * d, rng=rng)
        self.dropout2 = nn.Dropout(0.1)
        self.linear2 = nn.Linear(2 * d, d, rng=rng)
        self.dropout3 = nn.Dropout(0.1)
        self.norm2 = nn.LayerNorm(d)


class _DecoderLayer(nn.Module):
    def __init__(self, d, rng):
        super().__init__()
        self.cross_attn = _MSDeformAttnNames(d, rng)
        self.dropout1 = nn.Dropout(0.1)
        self.norm1 = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, 2, dropout=0.1, rng=rng)
        self.dropout2 = nn.Dropout(0.1)
        self.norm2 = nn.LayerNorm(d)
        self.linear1 = nn.Linear(d, 2 * d, rng=rng)
        self.dropout3 = nn.Dropout(0.1)
        self.linear2 = nn.Linear(2 * d, d, rng=rng)
        self.dropout4 = nn.Dropout(0.1)
        self.norm3 = nn.LayerNorm(d)


class _Stack(nn.Module):
    def __init__(self, layer, n, d, rng):
        super().__init__()
        self.layers = nn.ModuleList(layer(d, rng) for _ in range(n))


class _Transformer(nn.Module):
    def __init__(self, d, rng):
        super().__init__()
        self.level_embed = nn.Parameter(np.zeros((4, d), np.float32))
        self.encoder = _Stack(_EncoderLayer, 6, d, rng)
        self.decoder = _Stack(_DecoderLayer, 6, d, rng)
        self.reference_points = nn.Linear(d, 2, rng=rng)


class _DeformableDETRHeadNames(nn.Module):
    """The non-backbone part of the official single-stage model, with d_model 8."""

    def __init__(self, rng, d=8):
        super().__init__()
        self.transformer = _Transformer(d, rng)
        class_embed = nn.Linear(d, 91, rng=rng)
        bbox_embed = nn.MLP(d, d, 4, 3, rng=rng)
        self.class_embed = nn.ModuleList([class_embed] * 6)       # one head, six names
        self.bbox_embed = nn.ModuleList([bbox_embed] * 6)
        self.query_embed = nn.Embedding(300, 2 * d, rng=rng)
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, k, stride=s, padding=p, rng=rng), nn.GroupNorm(2, d))
            for c, k, s, p in [(4, 1, 1, 0), (4, 1, 1, 0), (4, 1, 1, 0), (4, 3, 2, 1)])


def test_module_tree_reproduces_official_key_names_and_order(shared_dir):
    path = shared_dir / "reference" / "official-state-dict-r50.txt"
    official = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    official_heads = [k for k in official if not k.startswith("backbone.")]
    model = _DeformableDETRHeadNames(np.random.default_rng(0))
    keys = list(model.state_dict())
    assert "transformer.decoder.layers.0.self_attn.in_proj_weight" in keys
    assert "transformer.decoder.layers.5.self_attn.out_proj.bias" in keys
    assert "class_embed.5.bias" in keys and "bbox_embed.5.layers.2.weight" in keys
    first_difference = next(((i, a, b) for i, (a, b) in enumerate(zip(keys, official_heads))
                             if a != b), None)
    assert first_difference is None, f"index, ours, official: {first_difference}"
    assert len(keys) == len(official_heads) == 561 - 265
    # The shared heads are one module each: unique parameters exclude the 5 copies.
    n_head_keys = 2 * 5 + 6 * 5
    assert len(list(model.parameters())) == len(keys) - n_head_keys


# --------------------------------------------------------------------------- dropout RNG
def _dropout_masks(model, x):
    return [to_numpy(model(x).data) for _ in range(3)]


def test_seed_dropout_reproducible_and_independent_streams():
    model = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.5))
    x = np.ones((4, 50), np.float32)
    a = _dropout_masks(model.seed_dropout(3), x)
    b = _dropout_masks(model.seed_dropout(3), x)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    first, second = model[0].rng.random(8), model[1].rng.random(8)
    assert not np.array_equal(first, second)                   # spawned, not copies
    model.eval()
    np.testing.assert_array_equal(model(x).data, x)             # identity in evaluation


def test_rng_state_round_trip_gives_identical_masks(rng):
    model = _Block(rng)
    model.seed_dropout(11)
    x = np.ones((3, 40), np.float32)
    model.drop(x)                                               # advance the stream
    state = json.loads(json.dumps(model.rng_state()))           # JSON-serialisable
    assert list(state) == ["drop"]
    expected = [to_numpy(model.drop(x).data) for _ in range(2)]
    model.seed_dropout(999)                                     # scramble, then restore
    model.set_rng_state(state)
    got = [to_numpy(model.drop(x).data) for _ in range(2)]
    for u, v in zip(expected, got):
        np.testing.assert_array_equal(u, v)
    with pytest.raises(KeyError, match="missing dropout states"):
        model.set_rng_state({})


# --------------------------------------------------------------------------- init
def test_init_functions(xp):
    rng = np.random.default_rng(0)
    assert nn.init.calculate_fan_in_and_fan_out((64, 3, 7, 7)) == (3 * 49, 64 * 49)
    assert nn.init.calculate_fan_in_and_fan_out((10, 20)) == (20, 10)
    with pytest.raises(ValueError, match="at least 2"):
        nn.init.calculate_fan_in_and_fan_out((5,))
    p = nn.Parameter(xp.zeros((200, 100), dtype=xp.float32))
    data = p.data
    nn.init.xavier_uniform_(p, gain=2.0, rng=rng)
    bound = 2.0 * math.sqrt(6 / 300)
    w = to_numpy(p.data)
    assert p.data is data and p.dtype == np.float32               # in place, dtype kept
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.99 * bound
    nn.init.normal_(p, 3.0, 0.5, rng=rng)
    w = to_numpy(p.data)
    assert abs(w.mean() - 3.0) < 0.01 and abs(w.std() - 0.5) < 0.01
    nn.init.uniform_(p, -1.0, 2.0, rng=rng)
    assert to_numpy(p.data).min() >= -1.0 and to_numpy(p.data).max() <= 2.0
    nn.init.constant_(p, 0.25)
    assert np.all(to_numpy(p.data) == 0.25)
    w = nn.Parameter(xp.zeros((6, 5, 3, 3), dtype=xp.float32))
    b = nn.Parameter(xp.zeros(6, dtype=xp.float32))
    nn.init.default_linear_init_(w, b, rng=rng)
    assert np.abs(to_numpy(w.data)).max() <= 1 / math.sqrt(45)
    assert 0 < np.abs(to_numpy(b.data)).max() <= 1 / math.sqrt(45)
    with pytest.raises(TypeError, match="default_rng"):
        nn.init.normal_(p, 0.0, 1.0)


def test_load_state_dict_rejects_shared_keys_with_different_values():
    head = nn.Linear(3, 2, rng=np.random.default_rng(0))
    heads = nn.ModuleList([head, head, head])           # one module at three indices
    sd = heads.state_dict()
    heads.load_state_dict(sd)                            # consistent copies load fine
    sd["2.bias"] = sd["2.bias"] + 1.0
    with pytest.raises(KeyError, match=r"0\.bias and 2\.bias name the same shared tensor"):
        heads.load_state_dict(sd)
    np.testing.assert_array_equal(head.bias.data, heads.state_dict()["0.bias"])   # untouched
