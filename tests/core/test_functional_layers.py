"""Tests of the layer Functions: conv2d, max_pool2d, the norms, dropout, interpolate_nearest.

Every Function is checked three ways: a float64 central-difference gradient check, its
forward against an obviously correct reference written here (nested loops or a closed
form), and the properties that matter to the model (dtypes kept, PyTorch tie-breaking,
the pointwise fast path, the float32 index rule of 'nearest').
"""
from __future__ import annotations

import numpy as np
import pytest

from minidetr import functional as F
from minidetr.autograd import Tensor
from minidetr.functional.conv import col2im, im2col
from minidetr.functional.random import Dropout
from minidetr.functional.sampling import nearest_source_index
from minidetr.testing import assert_allclose, gradcheck


# =========================================================================== references
def conv2d_loops(x, w, b, stride, padding, dilation):
    """Direct convolution: one output element at a time, bounds checked by hand."""
    N, C, H, W = x.shape
    C_out, _, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    # the window starts that fit inside the padded image
    H_out = len(range(0, H + 2 * ph - dh * (kh - 1), sh))
    W_out = len(range(0, W + 2 * pw - dw * (kw - 1), sw))
    out = np.zeros((N, C_out, H_out, W_out))
    for n in range(N):
        for o in range(C_out):
            for p in range(H_out):
                for q in range(W_out):
                    total = 0.0 if b is None else b[o]
                    for c in range(C):
                        for i in range(kh):
                            for j in range(kw):
                                r = p * sh - ph + i * dh          # row in the unpadded image
                                s = q * sw - pw + j * dw
                                if 0 <= r < H and 0 <= s < W:     # outside: zero padding
                                    total += w[o, c, i, j] * x[n, c, r, s]
                    out[n, o, p, q] = total
    return out


def max_pool_loops(x, kernel, stride, padding):
    """Direct max pooling: the max over the real pixels of each window."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    H_out = (H + 2 * ph - kh) // sh + 1
    W_out = (W + 2 * pw - kw) // sw + 1
    out = np.full((N, C, H_out, W_out), -np.inf)
    for p in range(H_out):
        for q in range(W_out):
            for i in range(kh):
                for j in range(kw):
                    r, s = p * sh - ph + i, q * sw - pw + j
                    if 0 <= r < H and 0 <= s < W:
                        out[:, :, p, q] = np.maximum(out[:, :, p, q], x[:, :, r, s])
    return out


# =========================================================================== conv2d
# (x shape, weight shape, stride, padding, dilation, with bias)
CONV_CASES = {
    "3x3-same": ((2, 3, 5, 6), (4, 3, 3, 3), (1, 1), (1, 1), (1, 1), True),
    "3x2-strided-dilated": ((2, 2, 5, 7), (3, 2, 3, 2), (2, 1), (1, 0), (1, 2), False),
    "pointwise-fast-path": ((2, 3, 4, 5), (4, 3, 1, 1), (1, 1), (0, 0), (1, 1), True),
    "1x1-stride-2": ((1, 3, 5, 6), (2, 3, 1, 1), (2, 2), (0, 0), (1, 1), False),
    "3x3-s2-p1-d2": ((1, 2, 7, 6), (3, 2, 3, 3), (2, 2), (1, 1), (2, 2), True),
    "stride-beyond-kernel": ((1, 2, 7, 8), (2, 2, 2, 2), (3, 3), (0, 1), (1, 1), True),
}


def _conv_inputs(case, rng):
    x_shape, w_shape, stride, padding, dilation, with_bias = CONV_CASES[case]
    x = rng.normal(size=x_shape)
    w = rng.normal(size=w_shape)
    b = rng.normal(size=w_shape[0]) if with_bias else None
    return x, w, b, stride, padding, dilation


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_matches_direct_loops(xp, rng, case):
    x, w, b, stride, padding, dilation = _conv_inputs(case, rng)
    expected = conv2d_loops(x, w, b, stride, padding, dilation)
    out = F.conv2d(xp.asarray(x), xp.asarray(w), None if b is None else xp.asarray(b),
                   stride=stride, padding=padding, dilation=dilation)
    assert_allclose(out, expected, rtol=1e-12, atol=1e-12, what=f"conv2d {case}")


@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_gradcheck(xp, rng, case):
    x, w, b, stride, padding, dilation = _conv_inputs(case, rng)
    inputs = [xp.asarray(a) for a in (x, w) + (() if b is None else (b,))]
    gradcheck(lambda *t: F.conv2d(*t, stride=stride, padding=padding, dilation=dilation),
              inputs, name=f"conv2d {case}")


def test_conv2d_pointwise_uses_the_image_as_column_matrix(rng):
    x = rng.normal(size=(2, 3, 4, 5))
    cols = im2col(x, (1, 1), (1, 1), (0, 0), (1, 1))
    assert cols.shape == (2, 3, 20)
    assert np.shares_memory(cols, x), "the 1x1 fast path should not copy the image"
    w = rng.normal(size=(6, 3, 1, 1))
    assert_allclose(F.conv2d(x, w), np.einsum("oc,nchw->nohw", w[:, :, 0, 0], x),
                    rtol=1e-12, atol=1e-12, what="1x1 conv vs einsum")


@pytest.mark.parametrize("case", ["3x3-same", "3x2-strided-dilated", "stride-beyond-kernel"])
def test_col2im_is_the_adjoint_of_im2col(rng, case):
    # <im2col(x), c> == <x, col2im(c)> for all x, c: col2im is exactly im2col's backward.
    x, w, _, stride, padding, dilation = _conv_inputs(case, rng)
    geometry = (w.shape[2:], stride, padding, dilation)
    cols = im2col(x, *geometry)
    c = rng.normal(size=cols.shape)
    np.testing.assert_allclose((cols * c).sum(), (x * col2im(c, x.shape, *geometry)).sum(),
                               rtol=1e-12)


def test_conv2d_keeps_float32(rng):
    x = Tensor(rng.normal(size=(1, 2, 6, 6)).astype(np.float32), requires_grad=True)
    w = Tensor(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), requires_grad=True)
    b = Tensor(np.zeros(3, np.float32), requires_grad=True)
    y = F.conv2d(x, w, b, stride=2, padding=1)
    y.sum().backward()
    assert y.dtype == x.grad.dtype == w.grad.dtype == b.grad.dtype == np.float32


def test_conv2d_resnet_stem_shape():
    # 7x7 stride 2 pad 3 on an 800x1066 image -> 400x533 (then max-pool 3/2/1 -> 200x267)
    y = F.conv2d(np.zeros((1, 1, 800, 1066), np.float32), np.zeros((1, 1, 7, 7), np.float32),
                 stride=2, padding=3)
    assert y.shape == (1, 1, 400, 533)
    assert F.max_pool2d(y, 3, 2, 1).shape == (1, 1, 200, 267)


def test_conv2d_rejects_bad_input():
    x, w = np.zeros((1, 3, 5, 5)), np.zeros((2, 4, 3, 3))
    with pytest.raises(ValueError, match="input channels"):
        F.conv2d(x, w)
    with pytest.raises(ValueError, match="bias"):
        F.conv2d(x, np.zeros((2, 3, 3, 3)), np.zeros(3))
    with pytest.raises(ValueError, match="does not fit"):
        F.conv2d(x, np.zeros((2, 3, 7, 7)))
    with pytest.raises(TypeError, match="stride"):
        F.conv2d(x, np.zeros((2, 3, 3, 3)), stride=1.5)
    with pytest.raises(TypeError, match="float dtypes"):
        F.conv2d(x.astype(np.float32), np.zeros((2, 3, 3, 3)))


# =========================================================================== max_pool2d
POOL_CASES = {                       # kernel, stride, padding
    "resnet-stem-3-2-1": (3, 2, 1),
    "2x2-default-stride": (2, None, 0),
    "3x2-s1x2-p1x0": ((3, 2), (1, 2), (1, 0)),
}


def _distinct(rng, shape):
    """Values 0.01 apart in random order: no ties, and a 1e-6 nudge flips no maximum."""
    return rng.permutation(int(np.prod(shape))).reshape(shape) * 0.01 - 1.0


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_max_pool2d_matches_direct_loops(xp, rng, case):
    kernel, stride, padding = POOL_CASES[case]
    x = rng.normal(size=(2, 3, 7, 6))
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    expected = max_pool_loops(x, pair(kernel), pair(stride or kernel), pair(padding))
    out = F.max_pool2d(xp.asarray(x), kernel, stride, padding)
    assert_allclose(out, expected, rtol=0, atol=0, what=f"max_pool2d {case}")


@pytest.mark.parametrize("case", list(POOL_CASES))
def test_max_pool2d_gradcheck(xp, rng, case):
    kernel, stride, padding = POOL_CASES[case]
    x = xp.asarray(_distinct(rng, (2, 2, 7, 6)))
    gradcheck(lambda t: F.max_pool2d(t, kernel, stride, padding), [x], name=f"max_pool2d {case}")


def test_max_pool2d_ties_send_the_gradient_to_the_first_maximum(xp):
    # All four values of each 2x2 window tie: PyTorch picks the first (top-left) one.
    x = Tensor(xp.ones((1, 1, 4, 4)), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    expected = np.zeros((4, 4))
    expected[::2, ::2] = 1.0
    assert_allclose(x.grad[0, 0], expected, rtol=0, atol=0, what="grad of tied windows")


def test_max_pool2d_overlapping_windows_accumulate(xp):
    # The global maximum wins all four overlapping 3x3 windows (stride 1) around it.
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 2] = 5.0
    x[0, 0, 2, 1] = 4.0
    xt = Tensor(xp.asarray(x), requires_grad=True)
    F.max_pool2d(xt, 3, 1).sum().backward()
    assert float(xt.grad[0, 0, 1, 2]) == 4.0 and float(xt.grad.sum()) == 4.0


def test_max_pool2d_rejects_too_much_padding():
    with pytest.raises(ValueError, match="padding"):
        F.max_pool2d(np.zeros((1, 1, 5, 5)), 3, 2, 2)


# =========================================================================== layer_norm
def test_layer_norm_known_values():
    # mean 2.5, biased variance 1.25
    y = F.layer_norm(np.array([[1.0, 2.0, 3.0, 4.0]]), eps=0.0)
    assert_allclose(y, np.array([[-1.5, -0.5, 0.5, 1.5]]) / np.sqrt(1.25), rtol=1e-14,
                    what="layer_norm([1, 2, 3, 4])")


def test_layer_norm_matches_closed_form(xp, rng):
    x, w, b = rng.normal(size=(2, 3, 8)), rng.normal(size=8), rng.normal(size=8)
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    expected = (x - mu) / np.sqrt(var + 1e-5) * w + b
    out = F.layer_norm(xp.asarray(x), xp.asarray(w), xp.asarray(b))
    assert_allclose(out, expected, rtol=1e-12, atol=1e-12, what="layer_norm")


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_gradcheck(xp, rng, affine):
    x = rng.normal(size=(2, 3, 5)) * 2 + 1
    if affine:
        inputs = [x, rng.normal(size=5), rng.normal(size=5)]
        fn = lambda x, w, b: F.layer_norm(x, w, b)  # noqa: E731
    else:
        inputs, fn = [x], lambda x: F.layer_norm(x)  # noqa: E731
    gradcheck(fn, [xp.asarray(a) for a in inputs], name=f"layer_norm affine={affine}")


# =========================================================================== group_norm
def group_norm_loops(x, G, w, b, eps):
    """Per (sample, group): standardise channels c in [g*C/G, (g+1)*C/G) over all pixels."""
    N, C = x.shape[:2]
    out = np.empty_like(x)
    size = C // G
    for n in range(N):
        for g in range(G):
            block = x[n, g * size:(g + 1) * size]
            out[n, g * size:(g + 1) * size] = (block - block.mean()) / np.sqrt(block.var() + eps)
    shape = (C,) + (1,) * (x.ndim - 2)
    return out * w.reshape(shape) + b.reshape(shape)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_matches_closed_form(xp, rng, groups):
    x, w, b = rng.normal(size=(2, 4, 3, 5)), rng.normal(size=4), rng.normal(size=4)
    out = F.group_norm(xp.asarray(x), groups, xp.asarray(w), xp.asarray(b))
    assert_allclose(out, group_norm_loops(x, groups, w, b, 1e-5), rtol=1e-12, atol=1e-12,
                    what=f"group_norm G={groups}")


def test_group_norm_with_one_group_is_layer_norm_over_all_features(rng):
    x = rng.normal(size=(2, 4, 3, 5))
    expected = F.layer_norm(x.reshape(2, -1)).data.reshape(x.shape)
    assert_allclose(F.group_norm(x, 1), expected, rtol=1e-12, atol=1e-12,
                    what="group_norm(G=1) vs layer_norm")


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_group_norm_gradcheck(xp, rng, groups):
    inputs = [rng.normal(size=(2, 4, 3, 2)) * 3 - 1, rng.normal(size=4), rng.normal(size=4)]
    gradcheck(lambda x, w, b: F.group_norm(x, groups, w, b), [xp.asarray(a) for a in inputs],
              name=f"group_norm G={groups}")


def test_group_norm_gradcheck_without_affine_on_a_sequence(xp, rng):
    x = xp.asarray(rng.normal(size=(2, 6, 4)))                   # (N, C, L)
    gradcheck(lambda t: F.group_norm(t, 3), [x], name="group_norm (N, C, L)")


def test_group_norm_rejects_bad_groups():
    with pytest.raises(ValueError, match="divisor"):
        F.group_norm(np.zeros((1, 6, 2, 2)), 4)


# =========================================================================== frozen_batch_norm
def test_frozen_batch_norm_matches_closed_form(xp, rng):
    x = rng.normal(size=(2, 3, 4, 5))
    w, b, mean = rng.normal(size=3), rng.normal(size=3), rng.normal(size=3)
    var = rng.uniform(0.5, 2.0, size=3)
    c = (slice(None), None, None)                                 # (C,) -> (C, 1, 1)
    expected = (x - mean[c]) / np.sqrt(var[c] + 1e-5) * w[c] + b[c]
    out = F.frozen_batch_norm(*[xp.asarray(a) for a in (x, w, b, mean, var)])
    assert_allclose(out, expected, rtol=1e-12, atol=1e-12, what="frozen_batch_norm")


def test_frozen_batch_norm_gradcheck(xp, rng):
    x, w, b = rng.normal(size=(2, 3, 3, 4)), rng.normal(size=3), rng.normal(size=3)
    mean, var = xp.asarray(rng.normal(size=3)), xp.asarray(rng.uniform(0.5, 2.0, size=3))
    gradcheck(lambda x, w, b: F.frozen_batch_norm(x, w, b, mean, var),
              [xp.asarray(a) for a in (x, w, b)], name="frozen_batch_norm")


def test_frozen_batch_norm_statistics_get_no_gradient(rng):
    stats = [Tensor(rng.uniform(0.5, 2.0, size=3), requires_grad=True) for _ in range(2)]
    x = Tensor(rng.normal(size=(1, 3, 2, 2)), requires_grad=True)
    F.frozen_batch_norm(x, np.ones(3), np.zeros(3), *stats).sum().backward()
    assert x.grad is not None and all(s.grad is None for s in stats)


# =========================================================================== dropout
def test_dropout_gradcheck_with_a_fixed_mask(xp, rng):
    p = 0.25
    mask = xp.asarray((rng.random((3, 4)) >= p) / (1 - p))
    gradcheck(lambda t: Dropout.apply(t, mask), [xp.asarray(rng.normal(size=(3, 4)))],
              name="dropout (fixed mask)")


def test_dropout_backward_is_the_scaled_mask(xp, rng):
    p = 0.3
    x = Tensor(xp.asarray(rng.uniform(1.0, 2.0, size=(4, 50))), requires_grad=True)  # no zeros
    y = F.dropout(x, p, training=True, rng=np.random.default_rng(7))
    kept = y.data != 0
    assert_allclose(y.data[kept], x.data[kept] / (1 - p), rtol=1e-12, what="kept values")
    upstream = xp.asarray(rng.normal(size=x.shape))
    y.backward(upstream)
    assert_allclose(x.grad, upstream * kept / (1 - p), rtol=1e-12, atol=0, what="dropout grad")


def test_dropout_keep_rate_and_expectation(xp):
    p, n = 0.3, 200_000
    y = F.dropout(xp.ones(n, dtype=np.float32), p, training=True, rng=np.random.default_rng(0))
    keep_rate = float((y.data != 0).sum()) / n
    sigma = np.sqrt(p * (1 - p) / n)                           # binomial standard error
    assert abs(keep_rate - (1 - p)) < 5 * sigma, f"keep rate {keep_rate} vs {1 - p}"
    assert abs(float(y.data.mean()) - 1.0) < 5 * sigma / (1 - p)   # E[y] = x
    assert y.dtype == np.float32


def test_dropout_is_reproducible_from_the_seed(xp):
    x = xp.ones((8, 8))
    a = F.dropout(x, 0.5, True, np.random.default_rng(3)).data
    b = F.dropout(x, 0.5, True, np.random.default_rng(3)).data
    rng = np.random.default_rng(3)
    c, d = (F.dropout(x, 0.5, True, rng).data for _ in range(2))
    assert bool((a == b).all()) and not bool((c == d).all())


def test_dropout_is_the_identity_in_eval_mode_or_with_p_zero(rng):
    x = Tensor(rng.normal(size=(3, 4)), requires_grad=True)
    assert F.dropout(x, 0.5, training=False, rng=None) is x
    assert F.dropout(x, 0.0, training=True, rng=rng) is x


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_bad_p(p, rng):
    with pytest.raises(ValueError, match="0 <= p < 1"):
        F.dropout(np.ones(3), p, training=True, rng=rng)


# =========================================================================== interpolate_nearest
@pytest.mark.parametrize("n_in, n_out, expected", [
    (5, 3, [0, 1, 3]),            # scale 5/3: floor(0), floor(1.67), floor(3.33)
    (3, 5, [0, 0, 1, 1, 2]),      # scale 0.6: floor(0, 0.6, 1.2, 1.8, 2.4)
    (7, 4, [0, 1, 3, 5]),         # scale 1.75: floor(0, 1.75, 3.5, 5.25)
    (4, 8, [0, 0, 1, 1, 2, 2, 3, 3]),
    (6, 6, [0, 1, 2, 3, 4, 5]),
])
def test_nearest_source_index_tables(n_in, n_out, expected):
    assert nearest_source_index(n_in, n_out).tolist() == expected


def test_nearest_source_index_uses_float32_like_pytorch():
    # PyTorch computes floorf(float(dst) * float(in) / out): both the scale and the
    # product are rounded to float32.
    # The scale: float32(2/82) is slightly below 1/41, so 41 * scale = 0.99999994 and the
    # floor is 0, where exact arithmetic would give 1.
    idx = nearest_source_index(2, 82)
    assert idx[41] == 0 and idx[42] == 1
    # The product: 25 * float32(0.04) = 0.9999999776 exactly, which rounds to 1.0 in
    # float32 (floor 1); a float64 product would keep it below 1 (floor 0).
    assert nearest_source_index(2, 50)[25] == 1


def test_interpolate_nearest_bool_mask(xp, rng):
    mask = rng.random((2, 5, 7)) < 0.5                             # (N, H, W)
    out = F.interpolate_nearest(xp.asarray(mask), (3, 4))
    expected = mask[:, [0, 1, 3]][:, :, [0, 1, 3, 5]]              # tables 5->3 and 7->4
    assert out.dtype == bool and not out.requires_grad
    assert out.shape == (2, 3, 4)
    assert bool((out.numpy() == expected).all())


def test_interpolate_nearest_upsamples_4d(xp, rng):
    x = rng.normal(size=(1, 2, 3, 2)).astype(np.float32)           # (N, C, H, W)
    out = F.interpolate_nearest(Tensor(xp.asarray(x)), (5, 4))
    expected = x[:, :, [0, 0, 1, 1, 2]][:, :, :, [0, 0, 1, 1]]
    assert out.dtype == np.float32
    assert_allclose(out, expected, rtol=0, atol=0, what="interpolate_nearest 3x2 -> 5x4")


def test_interpolate_nearest_refuses_to_be_differentiated():
    with pytest.raises(ValueError, match="no gradient"):
        F.interpolate_nearest(Tensor(np.zeros((1, 4, 4)), requires_grad=True), (2, 2))
