"""Normalisation layers: layer norm, group norm and frozen batch norm.

Layer norm and group norm share one core, *standardisation* over the last axis::

    mu    = mean(x)                     var = mean((x - mu)^2)     (biased, 1/n, like PyTorch)
    rstd  = 1 / sqrt(var + eps)         x_hat = (x - mu) * rstd

whose backward has the compact closed form (derivation in ``docs/autograd.md``)::

    grad_x = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),     g = dL/dx_hat

Layer norm standardises each row over its last axis (C). Group norm reshapes
(N, C, *) to (N, G, C/G * prod(*)) and standardises each group. Both then apply an
affine map per channel. Frozen batch norm (the ResNet backbone's) is only an affine map
per channel with constants taken from running statistics.

Shapes:
    layer_norm         x (..., C),      weight, bias (C,)
    group_norm         x (N, C, *),     weight, bias (C,), C divisible by num_groups
    frozen_batch_norm  x (N, C, *),     weight, bias, running_mean, running_var (C,)
    frozen_batch_norm_relu  the same, and an optional residual (N, C, *): the ResNet
                       block's relu(bn(x) + residual) as one Function

Derivation: docs/autograd.md, sections "Standardisation: the core of layer norm and group
norm", "Layer normalisation", "Group normalisation" and "Frozen batch normalisation".

Fast path: for NumPy float32/float64 C-contiguous arrays, LayerNorm, FrozenBatchNorm and
FrozenBatchNormReLU run fused Numba kernels (:mod:`.norm_cpu`) instead of the NumPy code
below, which stays the reference (used on CuPy, and by the tests that compare the two).
"""
from __future__ import annotations

from ..autograd import Function, Tensor
from ..backend import get_array_module
from ._util import cpu_kernels_apply, same_float_dtype


# --------------------------------------------------------------------------- shared core
def _standardize(x, eps):
    """(x - mean) / sqrt(var + eps) over the last axis; returns ``x_hat`` and ``rstd``.

    Shapes: x (..., n) -> x_hat (..., n), rstd (..., 1).
    """
    xp = get_array_module(x)
    mu = x.mean(axis=-1, keepdims=True)                                # (..., 1)
    centered = x - mu
    var = (centered * centered).mean(axis=-1, keepdims=True)           # (..., 1), biased
    rstd = 1 / xp.sqrt(var + eps)                                      # (..., 1)
    return centered * rstd, rstd


def _standardize_backward(g, x_hat, rstd):
    """dL/dx from g = dL/dx_hat, for x_hat = standardize(x) over the last axis.

    Shapes: g, x_hat (..., n), rstd (..., 1) -> (..., n).
    """
    g_mean = g.mean(axis=-1, keepdims=True)                            # (..., 1)
    gx_mean = (g * x_hat).mean(axis=-1, keepdims=True)                 # (..., 1)
    return rstd * (g - g_mean - x_hat * gx_mean)


def _check_param(fn, name, p, C):
    if p is not None and tuple(p.shape) != (C,):
        raise ValueError(f"{fn}: {name} must have shape ({C},), got {tuple(p.shape)}")


# --------------------------------------------------------------------------- layer norm
class LayerNorm(Function):
    """y = x_hat * weight + bias, x_hat standardised over the last axis."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        ctx.fused = cpu_kernels_apply(x, weight, bias)
        if ctx.fused:       # one Numba kernel; saves x and the row statistics, not x_hat
            from . import norm_cpu                                     # Numba, on first use
            y, mean, rstd = norm_cpu.layer_norm_forward(x, weight, bias, eps)  # (R,) each
            ctx.save_for_backward(x, mean, rstd, weight)
            return y
        x_hat, rstd = _standardize(x, eps)                             # (..., C), (..., 1)
        y = x_hat if weight is None else x_hat * weight
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(x_hat, rstd, weight)
        return y

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w, need_b, _ = ctx.needs_input_grad
        if ctx.fused:
            from . import norm_cpu
            x, mean, rstd, weight = ctx.saved_tensors
            grad_x, grad_w, grad_b = norm_cpu.layer_norm_backward(
                ctx.xp.ascontiguousarray(grad), x, weight, mean, rstd, need_x)
            return grad_x, grad_w if need_w else None, grad_b if need_b else None, None
        x_hat, rstd, weight = ctx.saved_tensors
        batch_axes = tuple(range(grad.ndim - 1))                       # all but C
        grad_x = grad_w = grad_b = None
        if need_x:
            g = grad if weight is None else grad * weight              # dL/dx_hat
            grad_x = _standardize_backward(g, x_hat, rstd)
        if need_w:
            grad_w = (grad * x_hat).sum(axis=batch_axes)               # (C,)
        if need_b:
            grad_b = grad.sum(axis=batch_axes)                         # (C,)
        return grad_x, grad_w, grad_b, None


def layer_norm(x, weight=None, bias=None, eps=1e-5):
    """Layer normalisation over the last axis (PyTorch ``F.layer_norm(x, (C,), ...)``).

    Args:
        x: Tensor or array (..., C).
        weight, bias: Tensors or arrays (C,), or None (no scale / no shift).
        eps: added to the variance.

    Returns:
        Tensor (..., C).
    """
    if x.ndim < 1:
        raise ValueError("layer_norm: x must have at least one axis")
    C = x.shape[-1]
    _check_param("layer_norm", "weight", weight, C)
    _check_param("layer_norm", "bias", bias, C)
    same_float_dtype("layer_norm", x, weight, bias)
    return LayerNorm.apply(x, weight, bias, float(eps))


# --------------------------------------------------------------------------- group norm
def _channel_shape(x):
    """Shape that broadcasts a (C,) vector over (N, C, *): (C, 1, ..., 1)."""
    return (x.shape[1],) + (1,) * (x.ndim - 2)


class GroupNorm(Function):
    """Standardise each group of C/G channels (over channels and pixels), then affine.

    With ``valid`` (B, 1, *) of 0/1, the statistics of image b are taken over its valid
    pixels only and the output is zero on the others (mask-aware group norm).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, valid):
        ctx.fused = cpu_kernels_apply(x, weight, bias, valid)
        if ctx.fused:       # one Numba kernel; saves x and the (B, G) statistics
            from . import norm_cpu                                     # Numba, on first use
            y, mean, rstd = norm_cpu.group_norm_forward(x, valid, weight, bias,
                                                        num_groups, eps)
            ctx.save_for_backward(x, valid, weight, mean, rstd)
            return y
        N = x.shape[0]
        if valid is None:
            # (N, G, C/G*HW) standardised; rstd (N, G, 1)
            x_hat, rstd = _standardize(x.reshape(N, num_groups, -1), eps)
            x_hat = x_hat.reshape(x.shape)                             # (N, C, *)
        else:
            x_hat, rstd = _standardize_masked(x, valid, num_groups, eps)
        y = x_hat if weight is None else x_hat * weight.reshape(_channel_shape(x))
        if bias is not None:
            y = y + bias.reshape(_channel_shape(x))
        if valid is not None:
            y = y * valid                                              # zero on padding
        ctx.save_for_backward(x_hat, rstd, weight, valid)
        return y

    @staticmethod
    def backward(ctx, grad):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if ctx.fused:
            from . import norm_cpu
            x, valid, weight, mean, rstd = ctx.saved_tensors
            grad_x, grad_w, grad_b = norm_cpu.group_norm_backward(
                ctx.xp.ascontiguousarray(grad), x, valid, weight, mean, rstd, need_x)
            return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                    None, None, None)
        x_hat, rstd, weight, valid = ctx.saved_tensors
        if valid is not None:
            grad = grad * valid                                        # y = (...) * valid
        N, G = rstd.shape[:2]
        sum_axes = (0,) + tuple(range(2, grad.ndim))                   # all but C
        grad_x = grad_w = grad_b = None
        if need_x:
            g = grad if weight is None else grad * weight.reshape(_channel_shape(grad))
            if valid is None:
                grad_x = _standardize_backward(g.reshape(N, G, -1),    # (N, G, C/G*HW)
                                               x_hat.reshape(N, G, -1), rstd)
                grad_x = grad_x.reshape(grad.shape)                    # (N, C, *)
            else:
                grad_x = _standardize_masked_backward(g, x_hat, rstd, valid, G)
        if need_w:
            grad_w = (grad * x_hat).sum(axis=sum_axes)                 # (C,)
        if need_b:
            grad_b = grad.sum(axis=sum_axes)                           # (C,)
        return grad_x, grad_w, grad_b, None, None, None


def _group_view(a, num_groups, valid):
    """(N, C, *) -> (N, G, C/G, P), and valid (N, 1, *) -> (N, 1, 1, P), P = prod(*)."""
    N = a.shape[0]
    return a.reshape(N, num_groups, -1, valid[0].size), valid.reshape(N, 1, 1, -1)


def _standardize_masked(x, valid, num_groups, eps):
    """Standardise each (image, group) over its valid elements only; x_hat is 0 elsewhere.

    Shapes: x (N, C, *), valid (N, 1, *) of 0/1 -> x_hat (N, C, *), rstd (N, G, 1, 1).
    """
    xp = get_array_module(x)
    xg, v = _group_view(x, num_groups, valid)              # (N, G, C/G, P), (N, 1, 1, P)
    count = v.sum(axis=-1, keepdims=True) * xg.shape[2]                # (N, 1, 1, 1): m
    mu = (xg * v).sum(axis=(2, 3), keepdims=True) / count              # (N, G, 1, 1)
    centered = (xg - mu) * v                                           # (N, G, C/G, P)
    var = (centered * centered).sum(axis=(2, 3), keepdims=True) / count
    rstd = 1 / xp.sqrt(var + eps)                                      # (N, G, 1, 1)
    return (centered * rstd).reshape(x.shape), rstd


def _standardize_masked_backward(g, x_hat, rstd, valid, num_groups):
    """dL/dx from g = dL/dx_hat for :func:`_standardize_masked`: the standardisation
    formula over the m valid elements, zero on the others.

    Shapes: g, x_hat (N, C, *), rstd (N, G, 1, 1), valid (N, 1, *) -> (N, C, *).
    """
    gg, v = _group_view(g * valid, num_groups, valid)      # (N, G, C/G, P), (N, 1, 1, P)
    xh, _ = _group_view(x_hat, num_groups, valid)                      # (N, G, C/G, P)
    count = v.sum(axis=-1, keepdims=True) * gg.shape[2]                # (N, 1, 1, 1): m
    g_mean = gg.sum(axis=(2, 3), keepdims=True) / count                # (N, G, 1, 1)
    gx_mean = (gg * xh).sum(axis=(2, 3), keepdims=True) / count        # (N, G, 1, 1)
    return (v * rstd * (gg - g_mean - xh * gx_mean)).reshape(g.shape)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, valid=None):
    """Group normalisation (Wu & He, 2018), PyTorch ``F.group_norm`` semantics.

    The C channels are split into ``num_groups`` groups of consecutive channels; each
    (sample, group) is standardised over its channels and all its pixels, then every
    channel gets its own scale and shift.

    Args:
        x: Tensor or array (N, C, *), e.g. (N, C, H, W).
        num_groups: G, a divisor of C (Deformable DETR uses GN(32, 256)).
        weight, bias: Tensors or arrays (C,), or None.
        eps: added to the variance.
        valid: None, or an array (N, 1, *) of x's dtype, 1 on each image's pixels and 0
            on its padding: the statistics are then taken over the valid pixels only and
            the output is 0 on padding (a constant: no gradient).

    Returns:
        Tensor (N, C, *).
    """
    if x.ndim < 2:
        raise ValueError(f"group_norm: x must be (N, C, *), got shape {tuple(x.shape)}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups < 1 or C % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups!r} must be a positive divisor "
                         f"of the {C} channels of x {tuple(x.shape)}")
    _check_param("group_norm", "weight", weight, C)
    _check_param("group_norm", "bias", bias, C)
    if valid is not None:
        valid = valid.data if isinstance(valid, Tensor) else valid
        expected = (x.shape[0], 1) + tuple(x.shape[2:])
        if tuple(valid.shape) != expected:
            raise ValueError(f"group_norm: valid must have shape {expected} (one 0/1 per "
                             f"pixel of x {tuple(x.shape)}), got {tuple(valid.shape)}")
    same_float_dtype("group_norm", x, weight, bias, valid)
    return GroupNorm.apply(x, weight, bias, num_groups, float(eps), valid)


# --------------------------------------------------------------------------- frozen batch norm
def _frozen_affine(xp, weight, bias, running_mean, running_var, eps):
    """rstd = (running_var + eps)^-1/2, scale = weight * rstd, shift = bias - mean * scale:
    frozen batch norm as the per-channel map x * scale + shift. Shapes: (C,) each."""
    rstd = 1 / xp.sqrt(running_var + eps)                              # (C,)
    scale = weight * rstd
    return rstd, scale, bias - running_mean * scale


class FrozenBatchNorm(Function):
    """y = x * scale + shift per channel, with constant statistics.

    scale = weight / sqrt(running_var + eps), shift = bias - running_mean * scale
    (torchvision's / DETR's FrozenBatchNorm2d). The statistics are constants; weight
    and bias get gradients when they require them (in DETR they never do).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        rstd, scale, shift = _frozen_affine(ctx.xp, weight, bias, running_mean, running_var,
                                            eps)
        shape = _channel_shape(x)                                      # (C, 1, ..., 1)
        ctx.save_for_backward(x, scale, rstd, running_mean)
        if cpu_kernels_apply(x, scale, shift):                         # one multiply-add
            from . import norm_cpu                                     # Numba, on first use
            return norm_cpu.scale_shift_channels(x, scale, shift)
        return x * scale.reshape(shape) + shift.reshape(shape)

    @staticmethod
    def backward(ctx, grad):
        x, scale, rstd, running_mean = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        shape = _channel_shape(grad)
        sum_axes = (0,) + tuple(range(2, grad.ndim))                   # all but C
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = grad * scale.reshape(shape)
        if need_w:   # y = (x - mean) * weight * rstd + bias
            grad_w = (grad * (x - running_mean.reshape(shape))).sum(axis=sum_axes) * rstd
        if need_b:
            grad_b = grad.sum(axis=sum_axes)
        return grad_x, grad_w, grad_b, None, None, None


class FrozenBatchNormReLU(Function):
    """y = relu(x * scale + shift + residual) per channel: a ResNet block's frozen batch
    norm, shortcut addition and ReLU as one Function (``residual`` may be None).

    The statistics and the affine (``weight``, ``bias``) are constants here, as they are
    in the DETR backbone (buffers). With m = [y > 0] (ReLU's subgradient: 0 at the kink,
    and for NaN):

        dL/dx = dL/dy * m * scale,     dL/dresidual = dL/dy * m

    Forward saves y, not x: the mask is y > 0. Same numbers as ``relu(frozen_batch_norm(x)
    + residual)`` (the same operations in the same order), in one pass each way instead of
    two or three.
    """

    @staticmethod
    def forward(ctx, x, residual, weight, bias, running_mean, running_var, eps):
        xp = ctx.xp
        _, scale, shift = _frozen_affine(xp, weight, bias, running_mean, running_var, eps)
        if cpu_kernels_apply(x, residual, scale, shift):
            from . import norm_cpu                                     # Numba, on first use
            y = norm_cpu.scale_shift_add_relu(x, scale, shift, residual)
        else:
            shape = _channel_shape(x)                                  # (C, 1, ..., 1)
            y = x * scale.reshape(shape) + shift.reshape(shape)
            if residual is not None:
                y = y + residual
            y = xp.maximum(y, 0)
        ctx.save_for_backward(y, scale)
        return y                                                       # (N, C, *)

    @staticmethod
    def backward(ctx, grad):
        y, scale = ctx.saved_tensors
        need_x, need_residual = ctx.needs_input_grad[:2]
        if cpu_kernels_apply(grad, y, scale) and (need_x or need_residual):
            from . import norm_cpu
            grad_x, grad_residual = norm_cpu.relu_scale_backward(grad, y, scale, need_x,
                                                                 need_residual)
        else:
            masked = grad * (y > 0)                                    # dL/d(pre-ReLU)
            grad_residual = masked if need_residual else None
            grad_x = masked * scale.reshape(_channel_shape(grad)) if need_x else None
        return grad_x, grad_residual, None, None, None, None, None


def frozen_batch_norm_relu(x, weight, bias, running_mean, running_var, eps=1e-5,
                           residual=None):
    """``relu(frozen_batch_norm(x) + residual)`` (``residual`` optional) as one Function.

    The backbone's conv-BN-ReLU and conv-BN-add-ReLU (:class:`FrozenBatchNormReLU`). The
    batch norm's four vectors must be constants (arrays, or Tensors that do not require
    grad); with a trainable weight or bias use the composition instead.

    Shapes: x (N, C, *), residual None or (N, C, *), the four vectors (C,) -> (N, C, *).
    """
    fn = "frozen_batch_norm_relu"
    if residual is not None and tuple(residual.shape) != tuple(x.shape):
        raise ValueError(f"{fn}: residual {tuple(residual.shape)} must have the shape of x "
                         f"{tuple(x.shape)}")
    for name, p in zip(("weight", "bias"), (weight, bias)):
        if isinstance(p, Tensor) and p.requires_grad:
            raise ValueError(f"{fn}: {name} requires grad; this fused form treats the batch "
                             f"norm as constants (compose relu(frozen_batch_norm(x) + "
                             f"residual) instead)")
    vectors = _checked_vectors(fn, x, weight, bias, running_mean, running_var, residual)
    arrays = [p.data if isinstance(p, Tensor) else p for p in vectors]
    return FrozenBatchNormReLU.apply(x, residual, *arrays, float(eps))


def _checked_vectors(fn, x, weight, bias, running_mean, running_var, residual=None):
    """The four vectors of a frozen batch norm, checked against x (N, C, *): present, of
    shape (C,), of x's float dtype (so is ``residual``); the statistics as arrays."""
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must be (N, C, *), got shape {tuple(x.shape)}")
    C = x.shape[1]
    stats = [s.data if isinstance(s, Tensor) else s for s in (running_mean, running_var)]
    vectors = (weight, bias, *stats)
    for name, p in zip(("weight", "bias", "running_mean", "running_var"), vectors):
        if p is None:
            raise ValueError(f"{fn}: {name} is required")
        _check_param(fn, name, p, C)
    same_float_dtype(fn, x, residual, *vectors)
    return vectors


def frozen_batch_norm(x, weight, bias, running_mean, running_var, eps=1e-5):
    """Batch norm with frozen statistics and affine: ``x * scale + shift`` per channel.

    Args:
        x: Tensor or array (N, C, *).
        weight, bias: Tensors or arrays (C,) (the BN affine, usually frozen buffers).
        running_mean, running_var: Tensors or arrays (C,): constants, never differentiated.
        eps: 1e-5 as in torchvision/DETR.

    Returns:
        Tensor (N, C, *).
    """
    vectors = _checked_vectors("frozen_batch_norm", x, weight, bias, running_mean, running_var)
    return FrozenBatchNorm.apply(x, *vectors, float(eps))
