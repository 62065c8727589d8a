"""Checkpoints: everything a run needs to continue, in one ``.npz`` file, without pickle.

A checkpoint is a NumPy ``.npz`` archive (a zip of ``.npy`` arrays). Arrays are stored
under prefixed keys, and everything that is not an array (configurations, the schedule,
the epoch, random-generator states, the category map) is stored as JSON text in a 0-d
string array, so the file loads with ``np.load(path, allow_pickle=False)``: reading a
checkpoint can never run code, unlike PyTorch's pickles.

Layout of the keys::

    format                      JSON {"name": "minidetr-checkpoint", "version": 1}
    model/<state-dict key>      one array per parameter/buffer, e.g.
                                model/transformer.level_embed
    optim/<i>/exp_avg           AdamW moments of parameter i (group order)
    optim/<i>/exp_avg_sq
    meta/optim                  JSON: param groups (lr, betas, ...) and every step count
    meta/schedule               JSON: StepLR state
    meta/progress               JSON: epoch, step within the epoch, metrics history
    meta/rng                    JSON: data-loader seed and the dropout generators' states
    meta/model_config           JSON: the ModelConfig fields
    meta/train_config           JSON: the TrainConfig fields
    meta/category_map           JSON: CategoryMap.to_dict()
    meta/extra                  JSON: anything else (data paths, ...)

Only ``format`` and ``model/...`` are required: a converted official checkpoint has no
optimiser and no progress.

Writing is atomic: the archive goes to a temporary file in the same folder, is flushed
to disk, then renamed over the destination (``os.replace``), so a crash or a Ctrl-C in
the middle of a save leaves the previous checkpoint intact and no half-written file.
"""
from __future__ import annotations

import json
import zipfile
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..files import atomic_write

FORMAT = {"name": "minidetr-checkpoint", "version": 1}
_META_KEYS = ("optim", "schedule", "progress", "rng", "model_config", "train_config",
              "category_map", "extra")


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model it is loaded into."""


class CorruptCheckpointError(CheckpointError):
    """The file is damaged (truncated, not a zip, a corrupt member): it cannot be read at all.

    ``member`` is the archive member at fault (``"model/x.npy"``), or None for the whole file.
    """

    def __init__(self, message, member=None):
        super().__init__(message)
        self.member = member


@dataclass
class Checkpoint:
    """The contents of a checkpoint file (``None`` where the file holds nothing).

    Attributes:
        model_state: OrderedDict key -> NumPy array (the model's ``state_dict()``).
        optimizer_state: ``AdamW.state_dict()`` form, or None.
        schedule_state: ``StepLR.state_dict()``, or None.
        progress: {"epoch": completed epochs, "step": batches done in the next epoch,
            "history": [per-epoch metric dicts], ...}, or None.
        rng: {"data_seed": int, "dropout": Module.rng_state()}, or None.
        model_config, train_config: dicts of the configuration fields, or None.
        category_map: ``CategoryMap.to_dict()``, or None.
        extra: any other JSON data, or None.
        path: where it was read from.
    """

    model_state: "OrderedDict[str, np.ndarray]"
    optimizer_state: dict | None = None
    schedule_state: dict | None = None
    progress: dict | None = None
    rng: dict | None = None
    model_config: dict | None = None
    train_config: dict | None = None
    category_map: dict | None = None
    extra: dict | None = None
    path: Path | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- encoding
def _json_array(obj) -> np.ndarray:
    """A JSON-serialisable object as a 0-d unicode array (loads without pickle)."""
    return np.array(json.dumps(obj, sort_keys=False))


def _from_json_array(array, key, path):
    if array.ndim != 0 or array.dtype.kind != "U":
        raise CheckpointError(f"{path}: entry {key!r} should be JSON text (a 0-d string "
                              f"array), got dtype {array.dtype} shape {array.shape}")
    try:
        return json.loads(str(array[()]))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: entry {key!r} is not valid JSON ({e})") from None


def _encode(ckpt: Checkpoint) -> "OrderedDict[str, np.ndarray]":
    """The flat key -> array dict that goes into the archive."""
    arrays = OrderedDict(format=_json_array(FORMAT))
    for key, value in ckpt.model_state.items():
        arrays[f"model/{key}"] = np.ascontiguousarray(value)
    if ckpt.optimizer_state is not None:
        # moments become arrays; groups and step counts go to JSON
        steps = {}
        for index, s in ckpt.optimizer_state["state"].items():
            arrays[f"optim/{index}/exp_avg"] = np.ascontiguousarray(s["exp_avg"])
            arrays[f"optim/{index}/exp_avg_sq"] = np.ascontiguousarray(s["exp_avg_sq"])
            steps[str(index)] = int(s["step"])
        arrays["meta/optim"] = _json_array({"param_groups": ckpt.optimizer_state["param_groups"],
                                            "steps": steps})
    for name in _META_KEYS[1:]:
        value = getattr(ckpt, {"schedule": "schedule_state"}.get(name, name))
        if value is not None:
            arrays[f"meta/{name}"] = _json_array(value)
    return arrays


# --------------------------------------------------------------------------- saving
def save_checkpoint(path, ckpt: Checkpoint, overwrite: bool = False) -> Path:
    """Write ``ckpt`` to ``path`` (a ``.npz`` file) atomically; return the path.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"save_checkpoint: the file name must end in .npz, got {path}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True (CLI: --overwrite) "
                              "to replace it")
    for key, value in ckpt.model_state.items():
        if not isinstance(value, np.ndarray):
            raise TypeError(f"save_checkpoint: model_state[{key!r}] must be a NumPy array "
                            f"(use model.state_dict()), got {type(value).__name__}")
    arrays = _encode(ckpt)
    nbytes = sum(a.nbytes for a in arrays.values()) + 200 * len(arrays)   # + zip/npy headers
    with atomic_write(path, what="checkpoint", size_hint=nbytes) as f:  # the old file survives
        np.savez(f, **arrays)
    return path


# --------------------------------------------------------------------------- loading
_DAMAGE = (OSError, EOFError, SyntaxError, zipfile.BadZipFile, zlib.error)


def _read_members(path) -> dict:
    """Every member of the archive as an array; a damaged one raises naming the member.

    An ``object`` array (which only pickle can read) is refused as such; any other
    failure to read a member (a bad ``.npy`` header, a CRC mismatch, missing bytes) means
    the file is damaged, and says so.
    """
    arrays = {}
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, *_DAMAGE) as e:
        raise CorruptCheckpointError(f"{path}: damaged: not a readable .npz archive "
                                     f"({type(e).__name__}: {e})") from None
    with archive:
        for key in archive.files:
            member = f"{key}.npy"
            try:
                arrays[key] = archive[key]
            except ValueError as e:
                if "allow_pickle" in str(e):      # an object array: only pickle reads it
                    raise CheckpointError(f"{path}: member {member!r} holds Python objects "
                                          "(an object array), which cannot be read without "
                                          "pickle; minidetr never unpickles (its "
                                          "checkpoints hold only plain arrays)") from None
                raise CorruptCheckpointError(f"{path}: damaged: archive member {member!r} is "
                                             f"corrupt ({e})", member) from None
            except _DAMAGE as e:
                raise CorruptCheckpointError(f"{path}: damaged: archive member {member!r} is "
                                             f"corrupt ({type(e).__name__}: {e})",
                                             member) from None
    return arrays


def load_checkpoint(path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (never unpickles anything).

    ``path`` may also be a run folder, in which case its ``last.npz`` is read.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.npz"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):
        raise CorruptCheckpointError(f"{path}: damaged: not a readable .npz archive (not a zip "
                                     f"file; {path.stat().st_size} bytes), e.g. a truncated "
                                     "copy or an interrupted download")
    arrays = _read_members(path)
    if "format" not in arrays:
        raise CheckpointError(f"{path}: not a minidetr checkpoint (no 'format' entry); a "
                              "PyTorch .pth file must first be converted with `python -m "
                              "minidetr convert-checkpoint`")
    fmt = _from_json_array(arrays.pop("format"), "format", path)
    if fmt.get("name") != FORMAT["name"] or fmt.get("version") != FORMAT["version"]:
        raise CheckpointError(f"{path}: unsupported checkpoint format {fmt}, expected {FORMAT}")

    model_state = OrderedDict()
    moments, meta = {}, {}
    for key, value in arrays.items():
        kind, _, rest = key.partition("/")
        if kind == "model":
            model_state[rest] = value
        elif kind == "optim":
            index, _, name = rest.partition("/")
            moments.setdefault(int(index), {})[name] = value
        elif kind == "meta" and rest in _META_KEYS:
            meta[rest] = _from_json_array(value, key, path)
        else:
            raise CheckpointError(f"{path}: unexpected entry {key!r}")
    if not model_state:
        raise CheckpointError(f"{path}: holds no model weights (no 'model/...' entries)")

    optimizer_state = None
    if "optim" in meta:
        steps = meta["optim"]["steps"]
        state = {}
        for index, m in moments.items():
            if set(m) != {"exp_avg", "exp_avg_sq"} or str(index) not in steps:
                raise CheckpointError(f"{path}: optimiser state of parameter {index} is "
                                      "incomplete")
            state[index] = {"step": steps[str(index)], **m}
        optimizer_state = {"state": state, "param_groups": meta["optim"]["param_groups"]}
    return Checkpoint(model_state=model_state, optimizer_state=optimizer_state,
                      schedule_state=meta.get("schedule"), progress=meta.get("progress"),
                      rng=meta.get("rng"), model_config=meta.get("model_config"),
                      train_config=meta.get("train_config"),
                      category_map=meta.get("category_map"), extra=meta.get("extra"),
                      path=path)


# --------------------------------------------------------------------------- model fit
def _describe_config(cfg: dict | None) -> str:
    if not cfg:
        return "an unknown configuration"
    variant = ("two-stage" if cfg.get("two_stage") else
               "refine" if cfg.get("with_box_refine") else "plain")
    return (f"backbone {cfg.get('backbone')}, d_model {cfg.get('d_model')}, "
            f"{cfg.get('enc_layers')}+{cfg.get('dec_layers')} layers, "
            f"{cfg.get('num_queries')} queries, {cfg.get('num_classes')} classes, "
            f"variant {variant}")


def _listing(keys, limit=25):
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_model_state(model, state, source="checkpoint", source_config=None,
                      model_config=None):
    """Raise :class:`CheckpointError` listing every key that does not fit ``model``.

    Lists the keys the model needs but ``state`` lacks (missing), the keys ``state`` has
    but the model does not (unexpected), and the keys whose shapes differ; with the two
    configurations (dicts) it also says how they differ, which usually explains it (a
    checkpoint of another preset or variant).
    """
    expected = OrderedDict((k, tuple(v.shape)) for k, v in model.state_dict().items())
    ignorable = set(model._ignored_keys())
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k not in ignorable]
    mismatched = [f"{k} {tuple(np.shape(state[k]))} vs model {shape}"
                  for k, shape in expected.items()
                  if k in state and tuple(np.shape(state[k])) != shape]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"the {source} does not fit this model:"]
    if missing:
        lines.append(f"  {len(missing)} missing keys (in the model, not in the {source}): "
                     + _listing(missing))
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys (in the {source}, not in the "
                     "model): " + _listing(unexpected))
    if mismatched:
        lines.append(f"  {len(mismatched)} keys with other shapes: " + _listing(mismatched))
    if source_config is not None or model_config is not None:
        # compare as JSON sees them (tuples in a config become lists in a file)
        source_config, model_config = (None if c is None else json.loads(json.dumps(c))
                                       for c in (source_config, model_config))
        lines.append(f"  the {source} was made with {_describe_config(source_config)};")
        lines.append(f"  this model is {_describe_config(model_config)}.")
        if source_config and model_config:
            diffs = [f"{k}: {source_config.get(k)!r} vs {v!r}" for k, v in model_config.items()
                     if k in source_config and source_config[k] != v
                     and k not in ("seed", "msda_backend")]
            if diffs:
                lines.append("  differing settings (checkpoint vs model): " + "; ".join(diffs))
    lines.append("  Use the --config/--variant the checkpoint was trained with.")
    raise CheckpointError("\n".join(lines))


def load_model_state(model, ckpt: Checkpoint, model_config: dict | None = None):
    """Check (see :func:`check_model_state`) then copy ``ckpt``'s weights into ``model``."""
    where = f"checkpoint {ckpt.path}" if ckpt.path is not None else "checkpoint"
    check_model_state(model, ckpt.model_state, where, ckpt.model_config, model_config)
    model.load_state_dict(ckpt.model_state, strict=True)


__all__ = ["Checkpoint", "CheckpointError", "CorruptCheckpointError", "save_checkpoint",
           "load_checkpoint",
           "check_model_state", "load_model_state", "FORMAT"]
