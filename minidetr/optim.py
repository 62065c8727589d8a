"""The optimiser side of training: AdamW, gradient-norm clipping and a step schedule.

AdamW (Loshchilov & Hutter), exactly as PyTorch's ``torch.optim.AdamW`` computes it. For
a parameter p with gradient g at step t (t = 1, 2, ...)::

    p   <- p * (1 - lr * weight_decay)          decoupled weight decay, before Adam
    m   <- beta1 * m + (1 - beta1) * g          first moment  (exp_avg)
    v   <- beta2 * v + (1 - beta2) * g^2        second moment (exp_avg_sq)
    m^  =  m / (1 - beta1^t)                    bias corrections
    p   <- p - lr * m^ / (sqrt(v) / sqrt(1 - beta2^t) + eps)

A parameter without a gradient (``p.grad is None``: frozen, or unused this step) is left
alone: no decay and no step count.

Parameter groups give different hyper-parameters to different parameters (Deformable
DETR trains the backbone and the sampling offsets with a 10x smaller lr)::

    AdamW([{"params": main, "name": "main"},
           {"params": backbone, "lr": 2e-5, "name": "backbone"}],
          lr=2e-4, weight_decay=1e-4)

All updates happen in place on ``p.data`` and the moments live on the parameter's device
(NumPy or CuPy), in its dtype. ``state_dict()`` holds only NumPy arrays and Python
numbers, so a checkpoint written on a GPU resumes on a CPU and vice versa.

The readable lines of :meth:`AdamW.step`, one array operation per line, are the
reference. They are slow where they run: 14 operations per parameter, so 14 kernel
launches on the GPU, and on the CPU 14 passes over memory on one thread, 8 of them into
temporaries of the parameter's size. So ``AdamW(..., fused=None)`` (the default) runs
each parameter's update as one fused kernel that does the same arithmetic in the same
order, in the parameter's dtype:

* a CuPy array: one launch of :mod:`minidetr.ops.adamw_kernel` (a CuPy ElementwiseKernel);
* a float32 or float64 C-ordered NumPy array: one pass of :mod:`minidetr.ops.adamw_cpu`
  (Numba, on all threads for large parameters), bit for bit the lines' result;
* any other NumPy array (float16, Fortran order): the readable lines.

``fused=False`` always runs the readable lines; ``fused=True`` refuses (before updating
anything) a parameter that neither kernel takes.

:func:`clip_grad_norm_` on NumPy float32/float64 gradients sums the squares in one pass
per gradient with :mod:`minidetr.ops.grad_norm_cpu` (the same float64 sums, added in
another order) and skips the scaling pass when there is nothing to clip.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from .autograd import Tensor
from .backend import device_of, get_array_module, is_cupy_array, to_device, to_numpy
from .ops import adamw_cpu, adamw_kernel, grad_norm_cpu

_GROUP_KEYS = ("params", "lr", "betas", "eps", "weight_decay", "name")


# --------------------------------------------------------------------------- AdamW
class AdamW:
    """Adam with decoupled weight decay. See the module docstring for the update.

    Args:
        params: an iterable of Parameters, or a list of group dicts
            ``{"params": [...], "lr": ..., "betas": ..., "eps": ..., "weight_decay": ...,
            "name": ...}`` where every key but "params" is optional (defaults below).
        lr, betas, eps, weight_decay: the defaults of every group.
        fused: how each parameter is updated. ``None`` (default): one fused kernel per
            parameter, the GPU kernel on CuPy arrays, the Numba kernel on float32/float64
            C-ordered NumPy arrays, the readable array operations on any other.
            ``False``: always the readable operations (the reference). ``True``: always a
            fused kernel (a parameter that none takes is then an error). All give the
            same numbers (see the module docstring).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, fused: bool | None = None):
        if fused not in (None, True, False):
            raise ValueError(f"AdamW: fused must be None, True or False, got {fused!r}")
        self.fused = fused
        self.defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        self._check_hyper_parameters(self.defaults, "defaults")
        params = list(params)
        if not params:
            raise ValueError("AdamW got an empty parameter list")
        groups = params if isinstance(params[0], dict) else [{"params": params}]
        self.param_groups = []
        self.state = {}         # id(parameter) -> {"step": int, "exp_avg", "exp_avg_sq"}
        for group in groups:
            self.add_param_group(group)

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_hyper_parameters(group, where):
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", wd)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
                raise ValueError(f"AdamW {where}: {name} must be a number >= 0, got {value!r}")
        betas = group["betas"]
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"AdamW {where}: betas must be two numbers in [0, 1), got {betas!r}")

    def add_param_group(self, group: dict):
        """Add a group; keys not given take the defaults. A parameter may be in one group only."""
        if not isinstance(group, dict) or "params" not in group:
            raise TypeError(f"a parameter group must be a dict with a 'params' entry, "
                            f"got {group!r}")
        unknown = sorted(set(group) - set(_GROUP_KEYS))
        if unknown:
            raise ValueError(f"parameter group has unknown keys {unknown}; allowed: {_GROUP_KEYS}")
        params = group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        where = f"group {len(self.param_groups)}"
        if "name" in group:
            where += f" ({group['name']!r})"
        for p in params:
            if not isinstance(p, Tensor):
                raise TypeError(f"AdamW {where}: expected Parameters/Tensors, "
                                f"got {type(p).__name__}")
        seen = {id(p) for g in self.param_groups for p in g["params"]}
        if len({id(p) for p in params}) != len(params) or any(id(p) in seen for p in params):
            raise ValueError(f"AdamW {where}: a parameter appears twice (within or across groups)")
        full = {**self.defaults, **{k: v for k, v in group.items() if k != "params"}}
        full["betas"] = tuple(full["betas"])
        self._check_hyper_parameters(full, where)
        full["params"] = params
        self.param_groups.append(full)

    # ------------------------------------------------------------------ the update
    def zero_grad(self):
        """Forget every parameter's gradient (``grad = None``)."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _kernel_for(self, p, state) -> str:
        """How parameter ``p`` (with a gradient) is updated: ``"gpu"`` (the CuPy kernel of
        :mod:`minidetr.ops.adamw_kernel`), ``"cpu"`` (the Numba kernel of
        :mod:`minidetr.ops.adamw_cpu`) or ``"readable"`` (the lines of :meth:`step`).

        ``state`` is the parameter's state, or None before its first step.
        """
        if self.fused is False:
            return "readable"
        if is_cupy_array(p.data):
            return "gpu"
        moments = (None, None) if state is None else (state["exp_avg"], state["exp_avg_sq"])
        if adamw_cpu.why_not_fused(p.data, p.grad, *moments) is None:
            return "cpu"
        return "readable"

    def _check_fused_parameters(self):
        """With ``fused=True``, a fused kernel must take every parameter with a gradient.

        Checked before any update, so that an error leaves every parameter as it was.
        """
        for i, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None or is_cupy_array(p.data):
                    continue
                state = self.state.get(id(p))
                moments = (None, None) if state is None else (state["exp_avg"],
                                                              state["exp_avg_sq"])
                reason = adamw_cpu.why_not_fused(p.data, p.grad, *moments)
                if reason is not None:
                    where = f"group {i}" + (f" ({group['name']!r})" if "name" in group else "")
                    raise TypeError(f"AdamW(fused=True): no fused kernel can update the "
                                    f"parameter of {where} with shape {tuple(p.shape)}: "
                                    f"{reason}. Use fused=None (such parameters then get "
                                    "the readable update)")

    def step(self):
        """One AdamW update of every parameter that has a gradient (in place)."""
        if self.fused:
            self._check_fused_parameters()
        for group in self.param_groups:
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                state = self.state.get(id(p))
                kernel = self._kernel_for(p, state)
                if state is None:
                    xp = get_array_module(p.data)
                    state = {"step": 0, "exp_avg": xp.zeros_like(p.data),
                             "exp_avg_sq": xp.zeros_like(p.data)}
                    self.state[id(p)] = state
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if kernel == "gpu":                         # the lines below, one launch
                    adamw_kernel.fused_step(adamw_kernel.kernel_for(get_array_module(p.data)),
                                            p.data, g, m, v, lr=lr, beta1=beta1, beta2=beta2,
                                            eps=eps, weight_decay=wd, step=t)
                    continue
                if kernel == "cpu":                         # the lines below, one pass
                    adamw_cpu.fused_step(p.data, g, m, v, lr=lr, beta1=beta1, beta2=beta2,
                                         eps=eps, weight_decay=wd, step=t, check=False)
                    continue

                # The readable update, one array operation per line (the reference).
                p.data *= 1.0 - lr * wd                     # decoupled weight decay
                m *= beta1
                m += (1.0 - beta1) * g                      # m = b1 m + (1 - b1) g
                v *= beta2
                v += (1.0 - beta2) * (g * g)                # v = b2 v + (1 - b2) g^2
                bias_correction1 = 1.0 - beta1 ** t
                bias_correction2 = 1.0 - beta2 ** t
                xp = get_array_module(v)
                denom = xp.sqrt(v) / math.sqrt(bias_correction2) + eps
                p.data -= (lr / bias_correction1) * m / denom

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain data: per-parameter moments (NumPy copies) by index, and the groups.

        Parameters are numbered in group order (0, 1, ...), as in PyTorch::

            {"state": {0: {"step": 3, "exp_avg": array, "exp_avg_sq": array}, ...},
             "param_groups": [{"lr": ..., "betas": [b1, b2], "eps": ..., "weight_decay": ...,
                               "name": ..., "params": [0, 1, ...]}, ...]}
        """
        state, groups, index = {}, [], 0
        for group in self.param_groups:
            entry = {k: (list(v) if k == "betas" else v) for k, v in group.items() if k != "params"}
            entry["params"] = []
            for p in group["params"]:
                s = self.state.get(id(p))
                if s is not None:
                    state[index] = {"step": int(s["step"]),
                                    "exp_avg": np.array(to_numpy(s["exp_avg"]), copy=True),
                                    "exp_avg_sq": np.array(to_numpy(s["exp_avg_sq"]), copy=True)}
                entry["params"].append(index)
                index += 1
            groups.append(entry)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict):
        """Restore moments and hyper-parameters saved by :meth:`state_dict`.

        The optimiser must have been built over the same parameters in the same order.
        Moments are copied to each parameter's device and dtype.
        """
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"AdamW.load_state_dict: the checkpoint has {len(saved_groups)} "
                             f"parameter groups, this optimiser {len(self.param_groups)}")
        params = []
        for i, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"AdamW.load_state_dict: group {i} has {len(saved['params'])} "
                                 f"parameters in the checkpoint, {len(group['params'])} here")
            params.extend(zip(saved["params"], group["params"]))
        new_state = {}
        for index, p in params:
            s = state_dict["state"].get(index, state_dict["state"].get(str(index)))
            if s is None:
                continue
            moments = {}
            for key in ("exp_avg", "exp_avg_sq"):
                arr = s[key]
                if tuple(np.shape(arr)) != tuple(p.shape):
                    raise ValueError(f"AdamW.load_state_dict: {key} of parameter {index} has "
                                     f"shape {tuple(np.shape(arr))}, the parameter "
                                     f"{tuple(p.shape)}")
                moments[key] = to_device(np.array(to_numpy(arr), dtype=p.dtype, copy=True),
                                         device_of(p.data))
            new_state[id(p)] = {"step": int(s["step"]), **moments}
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key != "params":
                    group[key] = tuple(value) if key == "betas" else value
        self.state = new_state


# --------------------------------------------------------------------------- clipping
def clip_grad_norm_(params, max_norm: float, *, host: bool = True):
    """Scale all gradients together so that their global L2 norm is at most ``max_norm``.

    total = sqrt(sum over parameters of sum(g^2)); every gradient is multiplied by
    min(1, max_norm / (total + 1e-6)), in place (PyTorch's formula: below the threshold
    the factor is exactly 1 and nothing changes; a NaN norm makes every gradient NaN).
    Parameters without a gradient are ignored.

    Returns the norm *before* clipping: a Python float, or with ``host=False`` a float64
    scalar array on the gradients' device. The factor is computed there too, so with
    ``host=False`` no value leaves the GPU (the training step reads the norm later,
    together with its losses, in one copy).

    On NumPy float32/float64 gradients each sum(g^2) is one pass without temporaries
    (:func:`minidetr.ops.grad_norm_cpu.sum_of_squares`: the squares rounded as in
    ``g * g``, summed in float64 in another order, so the norm can differ from the
    readable line's in the last bits), and when the factor is 1 the gradients are not
    touched at all.
    """
    if not isinstance(max_norm, numbers.Real) or not max_norm > 0:
        raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm!r}")
    params = [params] if isinstance(params, Tensor) else list(params)
    unique = {id(p): p for p in params}.values()           # a shared tensor counts once
    with_grad = [p for p in unique if p.grad is not None]
    grads = [p.grad for p in with_grad]
    if not grads:
        return 0.0
    xp = get_array_module(*grads)
    on_cpu = xp is np and all(g.dtype in grad_norm_cpu.DTYPES for g in grads)
    if on_cpu:
        # The same sums in one pass per gradient, no temporaries (Numba).
        total = np.float64(math.sqrt(math.fsum(grad_norm_cpu.sum_of_squares(g)
                                               for g in grads)))
    else:
        # One squared sum per parameter, accumulated in float64 (the reference).
        squares = xp.stack([xp.sum(g * g, dtype=xp.float64) for g in grads])
        total = xp.sqrt(squares.sum())                     # float64 scalar
    scale = xp.minimum(max_norm / (total + 1e-6), 1.0)     # float64 scalar
    if on_cpu and scale == 1.0:
        # Nothing to clip, and g * 1 == g: skip the pass. (On a GPU this test would wait
        # for the device; there the multiplication by 1 runs.) A NaN scale is not 1.
        return float(total) if host else total
    factor = {dtype: scale.astype(dtype) for dtype in {g.dtype for g in grads}}
    for p in with_grad:                        # float32 grads stay float32
        p.grad *= factor[p.grad.dtype]         # in place (a NumPy scalar, as a 0-d's, rebound)
    return float(total) if host else total


# --------------------------------------------------------------------------- schedule
class StepLR:
    """Multiply every group's lr by ``gamma`` each ``step_size`` calls of :meth:`step`.

    lr(epoch) = base_lr * gamma ** (epoch // step_size), with ``epoch`` the number of
    ``step()`` calls so far (Deformable DETR: step_size 40 epochs, gamma 0.1).
    """

    def __init__(self, optimizer: AdamW, step_size: int, gamma: float = 0.1):
        if isinstance(step_size, bool) or not isinstance(step_size, numbers.Integral) \
                or step_size < 1:
            raise ValueError(f"StepLR: step_size must be an int >= 1, got {step_size!r}")
        if not isinstance(gamma, numbers.Real) or not gamma > 0:
            raise ValueError(f"StepLR: gamma must be > 0, got {gamma!r}")
        self.optimizer = optimizer
        self.step_size = int(step_size)
        self.gamma = float(gamma)
        self.base_lrs = [group["lr"] for group in optimizer.param_groups]
        self.last_epoch = 0

    def _set_lrs(self):
        factor = self.gamma ** (self.last_epoch // self.step_size)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor

    def step(self):
        """Advance one epoch (or one step) and update the optimiser's learning rates."""
        self.last_epoch += 1
        self._set_lrs()

    def get_last_lr(self) -> list:
        """The learning rate of every group, as now set in the optimiser."""
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"step_size": self.step_size, "gamma": self.gamma,
                "last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state_dict: dict):
        if len(state_dict["base_lrs"]) != len(self.optimizer.param_groups):
            raise ValueError(f"StepLR.load_state_dict: {len(state_dict['base_lrs'])} base lrs "
                             f"for {len(self.optimizer.param_groups)} parameter groups")
        self.step_size = int(state_dict["step_size"])
        self.gamma = float(state_dict["gamma"])
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = list(state_dict["base_lrs"])
        self._set_lrs()
