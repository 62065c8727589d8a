"""One epoch of training and one pass of evaluation (the official ``engine.py``).

A training step, top to bottom::

    images, mask, targets = batch                      # loader (data/)
    outputs = model(images, mask)                      # backbone -> encoder -> decoder -> heads
    losses = criterion(outputs, targets)               # matcher + focal/L1/GIoU, every set
    loss = sum(weight_dict[k] * losses[k])             # the weighted total
    loss.backward()
    clip_grad_norm_(model.parameters(), 0.1)           # official max_norm
    optimizer.step()                                   # AdamW, three parameter groups

Parameter groups (official ``main.py``, matched by substrings of parameter names):

=================  =======================================  ===================
group              parameters whose name contains           learning rate
=================  =======================================  ===================
``backbone``       ``backbone.0``                           ``lr_backbone`` 2e-5
``linear_proj``    ``reference_points``, ``sampling_offsets``  ``lr * 0.1`` = 2e-5
``main``           anything else                            ``lr`` 2e-4
=================  =======================================  ===================

Frozen parameters (``requires_grad=False``: the ResNet stem and ``layer1``) are in no
group. Weight decay (1e-4) applies to all groups.

A non-finite loss stops training with :class:`NonFiniteLossError`, whose message names
the epoch, the step and every loss term that is not finite (the official code prints the
loss dict and exits); the step's update is not applied, so the weights stay finite.

On a GPU (CuPy arrays) a step copies two kinds of values to the host, each small: the
matcher's cost matrices (the Hungarian algorithm runs on the host) and, once, a vector
of the numbers it logs (every loss term, the total and the gradient norm), read after
clipping and before the update so that a non-finite value still stops the step. Both are
marked with :func:`~minidetr.backend.allow_transfers`; ``debug_transfers=True`` runs
each step under :func:`~minidetr.backend.transfer_guard`, which fails on any other.
Running out of memory raises :class:`StepOutOfMemoryError`, naming the batch's shape.
"""
from __future__ import annotations

import contextlib
import gc
import math
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from ..autograd import Tensor, no_grad
from ..backend import (allow_transfers, get_array_module, is_out_of_memory, to_device,
                       to_numpy, transfer_guard)
from ..optim import clip_grad_norm_
from .evaluation import CocoEvaluator

BACKBONE_NAMES = ("backbone.0",)
LINEAR_PROJ_NAMES = ("reference_points", "sampling_offsets")


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient) became NaN or infinite; the message says where."""


class StepOutOfMemoryError(MemoryError):
    """A training step ran out of (GPU or host) memory; the message names the batch."""


# --------------------------------------------------------------------------- param groups
def _matches(name, keywords):
    return any(k in name for k in keywords)


def param_group_names(model, backbone_names=BACKBONE_NAMES,
                      linear_proj_names=LINEAR_PROJ_NAMES) -> dict:
    """{"main": [...], "backbone": [...], "linear_proj": [...]}: trainable parameter names.

    Each shared tensor appears once (under its first name); frozen parameters nowhere.
    """
    groups = {"main": [], "backbone": [], "linear_proj": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if _matches(name, backbone_names):
            groups["backbone"].append(name)
        elif _matches(name, linear_proj_names):
            groups["linear_proj"].append(name)
        else:
            groups["main"].append(name)
    return groups


def build_param_groups(model, cfg) -> list:
    """The three AdamW parameter groups of the official recipe (see the module docstring).

    Args:
        model: the detector (any Module; names are matched as substrings).
        cfg: anything with ``lr``, ``lr_backbone`` and ``lr_linear_proj_mult`` (0.1), e.g.
            a :class:`~minidetr.training.TrainConfig`.

    Returns:
        ``[{"params", "lr", "name"}, ...]`` in the official order main, backbone,
        linear_proj (a group may be empty, e.g. ``backbone`` when the backbone is frozen).
    """
    names = param_group_names(model)
    params = dict(model.named_parameters())
    lrs = {"main": cfg.lr, "backbone": cfg.lr_backbone,
           "linear_proj": cfg.lr * cfg.lr_linear_proj_mult}
    return [{"params": [params[n] for n in names[g]], "lr": lrs[g], "name": g}
            for g in ("main", "backbone", "linear_proj")]


# --------------------------------------------------------------------------- helpers
def batch_to_device(batch, device):
    """``Batch(images, mask, targets)`` with the arrays the model and loss read on ``device``.

    ``labels`` and ``boxes`` of every target move; ids and sizes stay on the host.
    """
    images, mask, targets = batch
    images = to_device(images, device)                         # (B, 3, H, W)
    mask = to_device(mask, device)                             # (B, H, W)
    moved = [dict(t, labels=to_device(t["labels"], device), boxes=to_device(t["boxes"], device))
             for t in targets]
    return images, mask, moved


def loss_values(losses) -> dict:
    """Scalar losses (Tensors or 0-d arrays, or Python numbers) -> Python floats.

    The values are stacked on their device and copied to the host at once: one transfer
    (and one wait for the GPU) instead of one per value.
    """
    if not losses:
        return {}
    names = list(losses)
    arrays = [v.data if isinstance(v, Tensor) else v for v in losses.values()]
    xp = get_array_module(*arrays)
    stacked = xp.stack([xp.asarray(a, dtype=np.float64).reshape(()) for a in arrays])  # (n,)
    with allow_transfers("the step's logged values"):
        host = to_numpy(stacked)
    return dict(zip(names, host.tolist()))


def _check_finite(values, weight_dict, total, where):
    if math.isfinite(total):
        return
    bad = [f"{k} = {v}" for k, v in values.items() if k in weight_dict and not math.isfinite(v)]
    raise NonFiniteLossError(
        f"non-finite loss at {where}: total loss = {total}; non-finite term(s): "
        + (", ".join(bad) if bad else "none individually (the weighted sum overflowed)")
        + ". Training stopped before this update; lower the learning rate or check the data.")


def _check_outputs(outputs, where):
    """Raise NonFiniteLossError naming the first prediction set that holds NaN or inf.

    Called only when the loss failed (the matcher refuses a non-finite cost matrix) or
    is not finite, so a healthy step copies nothing for it.
    """
    sets = [("", outputs)] + [(f"aux_outputs[{i}].", aux)
                              for i, aux in enumerate(outputs.get("aux_outputs") or [])]
    if outputs.get("enc_outputs") is not None:
        sets.append(("enc_outputs.", outputs["enc_outputs"]))
    for prefix, out in sets:
        for key in ("pred_logits", "pred_boxes"):
            data = out[key].data
            xp = get_array_module(data)
            with allow_transfers("explaining a failed step"):
                finite = bool(xp.isfinite(data).all())
            if not finite:
                raise NonFiniteLossError(
                    f"non-finite model output at {where}: {prefix}{key} holds NaN or inf, so "
                    "no loss can be computed. Training stopped before this update; lower the "
                    "learning rate or check the data.")


class RunningAverages:
    """Sums and counts of logged values, for epoch means that survive a checkpoint."""

    def __init__(self, sums=None, counts=None):
        self.sums = dict(sums or {})
        self.counts = dict(counts or {})

    def update(self, **values):
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def means(self) -> dict:
        return {k: self.sums[k] / self.counts[k] for k in self.sums}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    @classmethod
    def from_state(cls, state):
        return cls(state["sums"], state["counts"]) if state else cls()


@dataclass
class EpochResult:
    """What :func:`train_one_epoch` did: the means of the logged values and the steps run."""

    averages: RunningAverages
    steps_done: int                 # batches of this epoch done so far (from step 0)
    stopped: bool = False           # True when should_stop() ended the epoch early
    last_values: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- training
def train_step(model, criterion, optimizer, batch, *, clip_max_norm=0.1, device="cpu",
               where="this step") -> dict:
    """One update on one batch: forward, losses, backward, clipping, AdamW.

    Args:
        model, criterion, optimizer: the detector, its :class:`SetCriterion`, an AdamW.
        batch: ``Batch(images, mask, targets)`` (host arrays; moved to ``device`` here).
        clip_max_norm: gradient clipping; <= 0 (or None) only measures the norm.
        where: names the step in error messages, e.g. "epoch 2, step 5/100".

    Returns:
        The logged values as Python floats: ``loss`` (the weighted total), every loss
        term (unweighted), and ``grad_norm`` (before clipping).

    Raises:
        NonFiniteLossError: a prediction, the loss or the gradient norm is NaN/inf; the
            update is not applied.
    """
    images, mask, targets = batch_to_device(batch, device)
    outputs = model(images, mask)
    try:
        losses = criterion(outputs, targets)
    except ValueError:
        _check_outputs(outputs, where)        # non-finite predictions: say so instead
        raise
    loss = criterion.total(losses)

    optimizer.zero_grad()
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    measure_only = clip_max_norm is None or clip_max_norm <= 0
    grad_norm = clip_grad_norm_(params, math.inf if measure_only else clip_max_norm,
                                host=False)
    values = loss_values({"loss": loss, **losses, "grad_norm": grad_norm})  # one copy
    total, grad_norm = values["loss"], values["grad_norm"]
    if not math.isfinite(total):
        _check_outputs(outputs, where)
        terms = {k: v for k, v in values.items() if k not in ("loss", "grad_norm")}
        _check_finite(terms, criterion.weight_dict, total, where)
    if not math.isfinite(grad_norm):
        raise NonFiniteLossError(
            f"non-finite gradient at {where}: the gradient norm is {grad_norm} "
            f"(loss {total:.4f} was finite). Training stopped before this update.")
    optimizer.step()
    return values


@contextlib.contextmanager
def long_lived_objects_frozen():
    """Keep Python's cyclic garbage collector off the objects that exist on entry.

    A training step allocates thousands of small Python objects (a Tensor, a Context and
    a Node per Function call), so the collector runs a few times a step, and about every
    tenth step a full collection walks every object of the process: the model, NumPy,
    Numba's compiled kernels, some 135 000 at the ``small`` preset, 30 ms each time (3 ms
    a step on average, measured with ``gc.callbacks``). :func:`gc.freeze` moves the
    objects of the set-up into a permanent generation that collections skip; the step's
    own garbage is collected as before. Undone on exit (``gc.unfreeze``), so that a
    notebook's next model can be collected again; nested uses leave it to the outermost.
    """
    if gc.get_freeze_count():                       # an outer block froze them already
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _out_of_memory(error, batch, device, where) -> StepOutOfMemoryError:
    """The error to raise when a step ran out of memory: it names the batch's shape."""
    B, _, H, W = batch[0].shape
    memory = "GPU memory" if device != "cpu" else "memory"
    return StepOutOfMemoryError(
        f"out of {memory} at {where} on {device}: a batch of {B} images padded to {H}x{W} "
        f"(height x width) did not fit ({type(error).__name__}: {error}). A smaller batch "
        "or smaller images need less.")


def train_one_epoch(model, criterion, optimizer, batches, *, epoch, num_steps,
                    clip_max_norm=0.1, device="cpu", first_step=0, averages=None,
                    should_stop=None, on_step=None, progress=True,
                    debug_transfers=False) -> EpochResult:
    """Train on ``batches`` (the rest of epoch ``epoch``, starting at ``first_step``).

    Args:
        model, criterion, optimizer: the detector, its :class:`SetCriterion`, an AdamW.
        batches: iterable of ``Batch(images, mask, targets)`` (host arrays).
        epoch: the 0-based epoch index (for messages and the progress bar).
        num_steps: batches in the whole epoch (for the bar and messages).
        clip_max_norm: gradient clipping; <= 0 only measures the norm.
        device: "cpu" or "cuda"; batches are moved there.
        first_step: batches of this epoch already done (resuming mid-epoch).
        averages: the :class:`RunningAverages` of those batches (resuming), or None.
        should_stop: a callable checked after every step; True ends the epoch early.
        on_step: called as ``on_step(epoch, step, values)`` after every update.
        progress: show a tqdm bar with the live loss.
        debug_transfers: run every step under :func:`~minidetr.backend.transfer_guard`
            (a device -> host copy other than the allowed ones raises).

    Logged per step: ``loss`` (the weighted total), every loss term (unweighted, as the
    criterion returns them), ``grad_norm`` (before clipping) and ``lr`` (the main group's).

    Raises:
        NonFiniteLossError: the loss or the gradient norm is NaN/inf (no update is made).
        StepOutOfMemoryError: a step ran out of memory (the message names the batch).
    """
    model.train()
    averages = averages if averages is not None else RunningAverages()
    step = first_step
    values = {}
    bar = tqdm(total=num_steps, initial=first_step, desc=f"train epoch {epoch + 1}",
               disable=not progress, leave=False, dynamic_ncols=True)
    try:
        for batch in batches:
            where = f"epoch {epoch + 1}, step {step + 1}/{num_steps}"
            guard = transfer_guard() if debug_transfers else contextlib.nullcontext()
            try:
                with guard:
                    values = train_step(model, criterion, optimizer, batch,
                                        clip_max_norm=clip_max_norm, device=device,
                                        where=where)
            except Exception as e:
                if is_out_of_memory(e):
                    raise _out_of_memory(e, batch, device, where) from e
                raise
            step += 1

            grad_norm = values.pop("grad_norm")
            lr = optimizer.param_groups[0]["lr"]
            averages.update(**values, grad_norm=grad_norm, lr=lr)
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.3f}",
                            mean=f"{averages.means()['loss']:.3f}", lr=f"{lr:.1e}")
            if on_step is not None:
                on_step(epoch, step, values)
            if should_stop is not None and should_stop():
                break
    finally:
        bar.close()
    return EpochResult(averages, step, stopped=step < num_steps, last_values=values)


# --------------------------------------------------------------------------- evaluation
def evaluate(model, criterion, postprocess, batches, coco_gt, category_map, *,
             num_steps=None, device="cpu", should_stop=None, progress=True,
             verbose=False, evaluator=None) -> dict:
    """Validation losses and COCO box AP over ``batches`` (the official ``evaluate``).

    Args:
        batches: iterable of ``Batch`` from a loader with deterministic (val) transforms.
        coco_gt, category_map: the ground truth (``dataset.coco``) and the label map.
        num_steps: for the progress bar.
        should_stop: checked after every batch; True aborts (returns None).
        verbose: print COCOeval's table.
        evaluator: a fresh :class:`CocoEvaluator` to fill (its ``results`` are then the
            detections in COCO's format); default: a new one.

    Returns:
        {"loss": ..., every loss term, "AP", "AP50", "AP75", "APs", "APm", "APl"}, or None
        when ``should_stop`` aborted the pass. Model left in eval mode.
    """
    model.eval()
    averages = RunningAverages()
    if evaluator is None:
        evaluator = CocoEvaluator(coco_gt, category_map)
    bar = tqdm(batches, total=num_steps, desc="evaluate", disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for batch in bar:
            images, mask, targets = batch_to_device(batch, device)
            with no_grad():
                outputs = model(images, mask)
                losses = criterion(outputs, targets)
                values = loss_values({"loss": criterion.total(losses), **losses})
                orig_sizes = np.stack([t["orig_size"] for t in targets])      # (B, 2)
                detections = postprocess(outputs, orig_sizes)
            averages.update(**values)
            evaluator.update([t["image_id"] for t in targets],
                             [{k: to_numpy(v) for k, v in d.items()} for d in detections])
            bar.set_postfix(loss=f"{averages.means()['loss']:.3f}")
            if should_stop is not None and should_stop():
                return None
    finally:
        bar.close()
    return {**averages.means(), **evaluator.summarize(verbose=verbose)}


__all__ = ["build_param_groups", "param_group_names", "train_step", "train_one_epoch",
           "evaluate", "batch_to_device", "loss_values", "NonFiniteLossError",
           "StepOutOfMemoryError", "RunningAverages", "EpochResult", "BACKBONE_NAMES",
           "LINEAR_PROJ_NAMES", "long_lived_objects_frozen"]
