"""Tests of the backbone (minidetr/models/backbone.py): structure, names, outputs, masks,
freezing, frozen batch norm, gradients of the TinyBackbone and loading torchvision weights.

ResNet forward passes use ResNet-18 on 64x96 images (ResNet-50 only on a 32x32 image) so
that the whole file runs in a few seconds on a CPU.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

from minidetr import nn
from minidetr.autograd import Tensor
from minidetr.backend import to_numpy
from minidetr.models.backbone import (Backbone, BasicBlock, Bottleneck, Joiner, ResNet,
                                      TinyBackbone, build_backbone, interpolate_mask,
                                      load_torchvision_resnet)
from minidetr.testing import assert_allclose


@pytest.fixture(scope="module")
def resnet50_joiner():
    """The ResNet-50 backbone (DC5 variant: same keys and shapes, cheaper C5)."""
    return build_backbone("resnet50", dilation=True, rng=np.random.default_rng(0))


@pytest.fixture(scope="module")
def resnet18_joiner():
    return build_backbone("resnet18", rng=np.random.default_rng(1))


def padded_batch(rng, B=2, H=64, W=96, valid=(24, 40)):
    """Images (B, 3, H, W) and a mask where the last image is valid only in its top-left."""
    images = rng.normal(size=(B, 3, H, W)).astype(np.float32)
    mask = np.zeros((B, H, W), dtype=bool)
    mask[-1, valid[0]:] = True
    mask[-1, :, valid[1]:] = True
    images[mask[:, None].repeat(3, axis=1)] = 0.0
    return images, mask


# --------------------------------------------------------------------------- names
def test_resnet50_keys_equal_official_checkpoint(resnet50_joiner, shared_dir):
    """backbone.0.body.* keys, shapes and order equal the released checkpoint's (265)."""
    official = []
    for line in (shared_dir / "reference" / "official-state-dict-r50.txt").read_text().splitlines():
        if line.startswith("backbone."):
            key, shape = line.split(" ", 1)
            official.append((key, tuple(int(n) for n in re.findall(r"\d+", shape))))
    ours = [("backbone." + k, v.shape) for k, v in resnet50_joiner.state_dict().items()]
    assert len(official) == 265
    assert [k for k, _ in ours] == [k for k, _ in official]
    bad = [(k, a, b) for (k, a), (_, b) in zip(ours, official) if a != b]
    assert not bad, f"shape mismatches (key, ours, official): {bad[:5]}"


def test_resnet50_keys_hard_coded(resnet50_joiner):
    """A shared-free check of some official keys and shapes."""
    sd = {"backbone." + k: v.shape for k, v in resnet50_joiner.state_dict().items()}
    assert len(sd) == 265
    expected = {
        "backbone.0.body.conv1.weight": (64, 3, 7, 7),
        "backbone.0.body.bn1.running_var": (64,),
        "backbone.0.body.layer1.0.conv1.weight": (64, 64, 1, 1),
        "backbone.0.body.layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "backbone.0.body.layer2.0.conv2.weight": (128, 128, 3, 3),
        "backbone.0.body.layer2.0.downsample.1.running_mean": (512,),
        "backbone.0.body.layer3.5.bn3.weight": (1024,),
        "backbone.0.body.layer4.0.downsample.0.weight": (2048, 1024, 1, 1),
        "backbone.0.body.layer4.2.conv3.weight": (2048, 512, 1, 1),
        "backbone.0.body.layer4.2.bn3.bias": (2048,),
    }
    for key, shape in expected.items():
        assert sd.get(key) == shape, f"{key}: {sd.get(key)} vs official {shape}"
    assert not any("num_batches_tracked" in k or ".fc." in k for k in sd)


@pytest.mark.parametrize("name,blocks,block,channels,num_keys", [
    ("resnet18", (2, 2, 2, 2), BasicBlock, (64, 128, 256, 512), 100),
    ("resnet34", (3, 4, 6, 3), BasicBlock, (64, 128, 256, 512), 180),
])
def test_basic_block_resnets_structure(name, blocks, block, channels, num_keys):
    net = ResNet(name, rng=np.random.default_rng(0))
    layers = [net.layer1, net.layer2, net.layer3, net.layer4]
    assert tuple(len(layer) for layer in layers) == blocks
    assert all(isinstance(b, block) for layer in layers for b in layer)
    assert tuple(net.layer_channels.values()) == channels
    assert tuple(net.layer_strides.values()) == (4, 8, 16, 32)
    # projection shortcuts exactly where the shape changes: block 0 of layer2..4
    with_downsample = [f"layer{i + 1}.{j}" for i, layer in enumerate(layers)
                       for j, b in enumerate(layer) if b.downsample is not None]
    assert with_downsample == ["layer2.0", "layer3.0", "layer4.0"]
    assert net.layer3[0].conv1.stride == (2, 2)
    assert net.layer3[0].conv1.weight.shape == (256, 128, 3, 3)
    assert len(net.state_dict()) == num_keys


def test_resnet50_bottleneck_and_dc5(resnet50_joiner):
    body = resnet50_joiner[0].body
    assert all(isinstance(b, Bottleneck) for b in body.layer2)
    assert body.layer2[0].conv2.stride == (2, 2) and body.layer2[0].conv1.stride == (1, 1)
    # DC5: layer4 keeps the resolution; its first block undilated, the others dilation 2
    assert body.layer4[0].conv2.stride == (1, 1) and body.layer4[0].conv2.dilation == (1, 1)
    assert body.layer4[1].conv2.dilation == (2, 2) and body.layer4[1].conv2.padding == (2, 2)
    assert resnet50_joiner.strides == [8, 16, 16]
    assert resnet50_joiner.num_channels == [512, 1024, 2048]
    with pytest.raises(NotImplementedError, match="dilation"):
        BasicBlock(64, 64, dilation=2, rng=np.random.default_rng(0))


def test_resnet50_forward_tiny_image(resnet50_joiner, rng):
    images, mask = padded_batch(rng, B=1, H=32, W=32, valid=(32, 32))
    features, masks, pos = resnet50_joiner(images, mask)
    assert [f.shape for f in features] == [(1, 512, 4, 4), (1, 1024, 2, 2), (1, 2048, 2, 2)]
    assert all(np.isfinite(to_numpy(f.data)).all() for f in features)


# --------------------------------------------------------------------------- outputs
def expected_level_mask(mask, H_l, W_l):
    """Nearest downsampling with integer arithmetic: out[i, j] = mask[i*H//H_l, j*W//W_l]."""
    H, W = mask.shape[-2:]
    rows = np.arange(H_l) * H // H_l
    cols = np.arange(W_l) * W // W_l
    return mask[:, rows[:, None], cols[None, :]]


@pytest.mark.parametrize("which", ["resnet18", "tiny"])
def test_levels_strides_channels_masks(which, resnet18_joiner, rng):
    joiner = resnet18_joiner if which == "resnet18" else build_backbone(
        "tiny", hidden_dim=64, rng=np.random.default_rng(2))
    channels = [128, 256, 512] if which == "resnet18" else [32, 64, 128]
    images, mask = padded_batch(rng)
    features, masks, pos = joiner(images, mask)
    assert joiner.strides == [8, 16, 32] and joiner.num_channels == channels
    for l, (f, m, p) in enumerate(zip(features, masks, pos)):
        s = joiner.strides[l]
        H_l, W_l = -(-64 // s), -(-96 // s)
        assert f.shape == (2, channels[l], H_l, W_l) and f.dtype == np.float32
        assert m.shape == (2, H_l, W_l) and m.dtype == np.bool_
        assert (m == expected_level_mask(mask, H_l, W_l)).all(), f"mask of level {l}"
        assert not m[0].any() and m[1].any() and not m[1, 0, 0]
        C_pos = 256 if which == "resnet18" else 64
        assert p.shape == (2, C_pos, H_l, W_l) and p.dtype == np.float32
        assert not p.requires_grad
        assert_allclose(p, joiner[1](m), what=f"pos of level {l}")


def test_single_scale_float64_on_each_backend(xp, rng):
    """C5 only; a float64 model gives float64 features and position embeddings."""
    joiner = build_backbone("tiny", hidden_dim=32, return_interm_layers=False,
                            rng=np.random.default_rng(3))
    joiner.astype(np.float64).to("cpu" if xp is np else "cuda")
    images, mask = padded_batch(rng, H=32, W=64, valid=(20, 30))
    features, masks, pos = joiner(xp.asarray(images.astype(np.float64)), xp.asarray(mask))
    assert joiner.strides == [32] and joiner.num_channels == [128]
    assert [f.shape for f in features] == [(2, 128, 1, 2)]
    assert features[0].dtype == np.float64 and pos[0].dtype == np.float64
    assert pos[0].shape == (2, 32, 1, 2) and type(pos[0].data) is type(masks[0])
    assert to_numpy(masks[0]).tolist() == [[[False, False]], [[False, True]]]


def test_interpolate_mask_values(xp):
    mask = np.zeros((1, 5, 7), dtype=bool)
    mask[0, 3:] = True
    mask[0, :, 5:] = True
    got = interpolate_mask(xp.asarray(mask), (3, 4))
    assert type(got) is type(xp.asarray(mask)) and got.dtype == np.bool_
    # rows read 0, 1, 3 (floor(i * 5 / 3)); columns read 0, 1, 3, 5 (floor(j * 7 / 4))
    want = mask[:, [0, 1, 3]][:, :, [0, 1, 3, 5]]
    assert (to_numpy(got) == want).all()


def test_bad_inputs_are_named(resnet18_joiner, rng):
    images, mask = padded_batch(rng, H=32, W=32, valid=(20, 20))
    with pytest.raises(TypeError, match="bool"):
        resnet18_joiner(images, mask.astype(np.float32))
    with pytest.raises(ValueError, match="does not match"):
        resnet18_joiner(images, mask[:, :16])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resnet18_joiner(images[:, :2], mask)
    with pytest.raises(ValueError, match="return_layers"):
        Backbone(TinyBackbone(rng=np.random.default_rng(0)), return_layers=("layer4", "layer2"))
    with pytest.raises(ValueError, match="unknown name"):
        ResNet("resnet101")


# --------------------------------------------------------------------------- freezing
def test_official_freezing_rule(resnet18_joiner, rng):
    named = dict(resnet18_joiner.named_parameters())
    assert named, "the backbone has parameters"
    for name, p in named.items():
        trained = any(layer in name for layer in ("layer2", "layer3", "layer4"))
        assert p.requires_grad == trained, f"{name}: requires_grad {p.requires_grad}"
    assert not named["0.body.conv1.weight"].requires_grad
    assert not named["0.body.layer1.1.conv2.weight"].requires_grad
    assert named["0.body.layer2.0.conv1.weight"].requires_grad
    # The frozen part records no graph: layer1's output needs no gradient, layer2's does.
    images, _ = padded_batch(rng, H=32, W=32)
    out1, out2 = resnet18_joiner[0].body(images, ("layer1", "layer2"))
    assert not out1.requires_grad and out1._node is None
    assert out2.requires_grad


def test_train_backbone_false_freezes_everything_and_tiny_trains_everything(rng):
    frozen = build_backbone("resnet18", train_backbone=False, rng=np.random.default_rng(0))
    assert not any(p.requires_grad for p in frozen.parameters())
    images, mask = padded_batch(rng, H=32, W=32)
    features, _, _ = frozen(images, mask)
    assert not any(f.requires_grad for f in features)
    tiny = build_backbone("tiny", rng=np.random.default_rng(0))
    assert all(p.requires_grad for p in tiny.parameters())


def test_frozen_batch_norm_formula(xp, rng):
    """y = x * scale + shift, scale = w / sqrt(var + eps), shift = b - mean * scale."""
    C = 5
    bn = nn.FrozenBatchNorm2d(C)
    w, b, mean = (rng.normal(size=C).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.1, 2.0, size=C).astype(np.float32)
    bn.load_state_dict({"weight": w, "bias": b, "running_mean": mean, "running_var": var})
    bn.to("cpu" if xp is np else "cuda")
    x = rng.normal(size=(2, C, 3, 4)).astype(np.float32)
    y = bn(Tensor(xp.asarray(x)))
    scale = w / np.sqrt(var.astype(np.float64) + 1e-5)
    want = x * scale[:, None, None] + (b - mean * scale)[:, None, None]
    assert_allclose(y, want, rtol=1e-5, atol=1e-6, what="FrozenBatchNorm2d output")


# --------------------------------------------------------------------------- gradients
def test_tiny_backbone_gradients_float64(rng):
    """Backward of the TinyBackbone against central differences, for a few weights."""
    body = TinyBackbone(channels=(8, 8, 8, 8), num_groups=4, rng=np.random.default_rng(4))
    body.astype(np.float64)
    x = rng.normal(size=(1, 3, 40, 40))
    params = dict(body.named_parameters())
    outs = body(Tensor(x))                               # C3 5x5, C4 3x3, C5 2x2
    upstream = [rng.normal(size=o.shape) for o in outs]

    def objective():
        return sum(float((o.data * g).sum()) for o, g in zip(body(Tensor(x)), upstream))

    loss = sum((o * g).sum() for o, g in zip(outs, upstream))
    loss.backward()
    eps = 1e-6
    for name in ("stem.conv.weight", "layer1.norm.bias", "layer2.conv.weight",
                 "layer3.norm.weight", "layer4.conv.weight"):
        p = params[name]
        for flat_index in rng.choice(p.size, size=3, replace=False):
            index = np.unravel_index(flat_index, p.shape)
            original = p.data[index]
            p.data[index] = original + eps
            f_plus = objective()
            p.data[index] = original - eps
            f_minus = objective()
            p.data[index] = original
            numeric = (f_plus - f_minus) / (2 * eps)
            analytic = p.grad[index]
            assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), \
                f"{name}{index}: analytic {analytic:.10g} vs numeric {numeric:.10g}"


# --------------------------------------------------------------------------- loading
def torchvision_like_weights(name, seed):
    """A torchvision-style state dict: the body's keys plus fc.* and num_batches_tracked."""
    sd = ResNet(name, rng=np.random.default_rng(seed)).state_dict()
    r = np.random.default_rng(seed)
    for key in sd:
        if key.endswith(("running_mean", "bias")):
            sd[key] = r.normal(size=sd[key].shape).astype(np.float32)
    sd["bn1.num_batches_tracked"] = np.array(0, dtype=np.int64)
    sd["layer1.0.bn1.num_batches_tracked"] = np.array(0, dtype=np.int64)
    sd["fc.weight"] = np.zeros((1000, 512), dtype=np.float32)
    sd["fc.bias"] = np.zeros(1000, dtype=np.float32)
    return sd


def test_load_torchvision_resnet_copies_every_array():
    weights = torchvision_like_weights("resnet18", seed=7)
    joiner = build_backbone("resnet18", rng=np.random.default_rng(0))
    report = load_torchvision_resnet(joiner, weights)
    assert report.ok and len(report.loaded) == 100
    assert sorted(report.dropped) == ["bn1.num_batches_tracked", "fc.bias", "fc.weight",
                                      "layer1.0.bn1.num_batches_tracked"]
    for key, value in joiner[0].body.state_dict().items():
        assert np.array_equal(value, weights[key]), key
    # freezing is unchanged by loading
    assert not joiner[0].body.conv1.weight.requires_grad


def test_load_torchvision_resnet_reports_problems():
    weights = torchvision_like_weights("resnet18", seed=7)
    del weights["layer3.1.bn2.running_var"]
    weights["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), dtype=np.float32)
    weights["layer2.0.conv1.weight"] = np.zeros((128, 64, 1, 1), dtype=np.float32)
    net = ResNet("resnet18", rng=np.random.default_rng(0))
    before = net.state_dict()
    with pytest.raises(ValueError) as info:
        load_torchvision_resnet(net, weights)
    message = str(info.value)
    for fragment in ("missing from the weights (1): layer3.1.bn2.running_var",
                     "unexpected in the weights (1): layer5.0.conv1.weight",
                     "layer2.0.conv1.weight weights (128, 64, 1, 1) vs model (128, 64, 3, 3)"):
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert all(np.array_equal(before[k], v) for k, v in net.state_dict().items()), \
        "a failed strict load must not change the model"

    report = load_torchvision_resnet(net, weights, strict=False)
    assert not report.ok and len(report.loaded) == 98
    assert np.array_equal(net.layer4[1].bn2.running_mean, weights["layer4.1.bn2.running_mean"])
    key = "layer2.0.conv1.weight"                        # the mis-shaped one is skipped
    assert np.array_equal(net.state_dict()[key], before[key])
    with pytest.raises(TypeError, match="ResNet"):
        load_torchvision_resnet(TinyBackbone(rng=np.random.default_rng(0)), weights)


def test_joiner_is_a_sequential_of_backbone_and_position_embedding(resnet18_joiner):
    assert isinstance(resnet18_joiner, Joiner) and isinstance(resnet18_joiner, nn.Sequential)
    assert isinstance(resnet18_joiner[0], Backbone) and len(resnet18_joiner) == 2
    assert all(k.startswith("0.body.") for k in resnet18_joiner.state_dict())
