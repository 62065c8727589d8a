"""Parameter, Module, ModuleList and Sequential: how a model holds its weights.

A :class:`Module` is a tree. Each node owns three ordered collections:

* ``_parameters``: :class:`Parameter` tensors that training updates (``requires_grad``);
* ``_buffers``: plain arrays that are part of the state but not trained (the running
  statistics of :class:`~minidetr.nn.FrozenBatchNorm2d`);
* ``_modules``: child modules.

Assigning an attribute files it automatically: ``self.weight = Parameter(...)`` becomes a
parameter, ``self.norm1 = LayerNorm(256)`` a child. Names are joined with dots along the
tree, exactly as in PyTorch, so ``state_dict()`` keys read like the official checkpoint::

    transformer.decoder.layers.0.self_attn.in_proj_weight
    class_embed.3.bias

Order (PyTorch's): a module's own parameters, then its own buffers, then each child in
the order it was assigned, recursively.

Shared modules. The official checkpoint holds the *same* head at several indices of a
ModuleList (``class_embed.0`` ... ``class_embed.5`` are one Linear). ``state_dict()``
therefore lists every index, while ``parameters()``/``named_modules()`` yield each object
once, so an optimiser never updates one tensor twice.

Dropout randomness lives in the Dropout modules (each owns a NumPy Generator); the model
can re-seed them all (:meth:`Module.seed_dropout`) and save/restore their exact state
(:meth:`Module.rng_state` / :meth:`Module.set_rng_state`) so that a resumed run draws the
same masks as an uninterrupted one.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, NamedTuple

import numpy as np

from ..autograd import Tensor
from ..backend import device_of, parse_device, to_device, to_numpy


# --------------------------------------------------------------------------- Parameter
class Parameter(Tensor):
    """A Tensor that is a trainable weight of a Module (``requires_grad=True`` by default).

    ``Parameter(array)`` keeps the array as is (no copy). Set ``requires_grad=False`` to
    freeze it (the optimiser then skips it, because it never receives a gradient).
    """

    def __init__(self, data, requires_grad: bool = True):
        if isinstance(data, Tensor):
            data = data.data
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        frozen = "" if self.requires_grad else ", requires_grad=False"
        return f"Parameter(shape={self.shape}, dtype={self.dtype}, device={self.device}{frozen})"


class LoadResult(NamedTuple):
    """The keys :meth:`Module.load_state_dict` could not match (both empty after a strict load)."""

    missing_keys: list
    unexpected_keys: list


def _shape_of(x) -> tuple:
    return tuple(x.shape) if hasattr(x, "shape") else tuple(np.shape(x))


def _is_array(x) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype") and not isinstance(x, Tensor)


# --------------------------------------------------------------------------- Module
class Module:
    """Base class of every layer and model: subclasses set attributes and write ``forward``.

    Example::

        class TwoLayer(Module):
            def __init__(self, rng):
                super().__init__()
                self.fc1 = Linear(4, 8, rng=rng)    # registered as child "fc1"
                self.fc2 = Linear(8, 2, rng=rng)

            def forward(self, x):                   # x: (N, 4) -> (N, 2)
                return self.fc2(self.fc1(x).relu())

        TwoLayer(rng).state_dict().keys()
        # ['fc1.weight', 'fc1.bias', 'fc2.weight', 'fc2.bias']
    """

    # State-dict keys a subclass tolerates in a checkpoint without using them (for
    # example torchvision's ``num_batches_tracked`` in FrozenBatchNorm2d).
    _ignored_state_keys: tuple = ()

    def __init__(self):
        # object.__setattr__ bypasses our own __setattr__, which needs these dicts.
        object.__setattr__(self, "_parameters", OrderedDict())
        object.__setattr__(self, "_buffers", OrderedDict())
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", OrderedDict())
        object.__setattr__(self, "training", True)

    # ------------------------------------------------------------------ registration
    def __setattr__(self, name, value):
        if "_parameters" not in self.__dict__:
            raise RuntimeError(f"{type(self).__name__}: call super().__init__() before "
                               f"assigning attribute {name!r}")
        if isinstance(value, Parameter):
            self._forget(name)
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._modules[name] = value
        elif name in self._buffers:
            if value is not None and not _is_array(value):
                raise TypeError(f"buffer {name!r} must be an array, got {type(value).__name__}")
            self._buffers[name] = value
        elif name in self._parameters and value is None:
            self._parameters[name] = None          # an optional parameter switched off
        else:
            if name in self._parameters or name in self._modules:
                raise TypeError(f"cannot replace {type(self).__name__}.{name} (a registered "
                                f"{'parameter' if name in self._parameters else 'module'}) "
                                f"with a {type(value).__name__}")
            object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # Only called when normal lookup fails: look in the three registries.
        d = self.__dict__
        for registry in ("_parameters", "_buffers", "_modules"):
            if registry in d and name in d[registry]:
                return d[registry][name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name):
        if not self._forget(name):
            object.__delattr__(self, name)

    def _forget(self, name) -> bool:
        """Remove ``name`` from every registry and from the instance dict; True if found."""
        found = False
        for registry in (self._parameters, self._buffers, self._modules):
            if name in registry:
                del registry[name]
                found = True
        self._non_persistent.discard(name)
        if name in self.__dict__:
            object.__delattr__(self, name)
            found = True
        return found

    def register_buffer(self, name: str, array, persistent: bool = True):
        """Add a non-trained array to the state (``persistent=False``: not in state_dict)."""
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"buffer name must be a non-empty string without dots, got {name!r}")
        if array is not None and not _is_array(array):
            raise TypeError(f"register_buffer({name!r}): expected a NumPy/CuPy array, got "
                            f"{type(array).__name__}")
        self._forget(name)
        self._buffers[name] = array
        if not persistent:
            self._non_persistent.add(name)

    # ------------------------------------------------------------------ calling
    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # ------------------------------------------------------------------ traversal
    def named_modules(self, prefix: str = "", _memo=None) -> Iterator[tuple]:
        """(dotted name, module) for this module and every descendant, each object once."""
        memo = set() if _memo is None else _memo
        if id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, child in self._modules.items():
            if child is not None:
                yield from child.named_modules(f"{prefix}.{name}" if prefix else name, memo)

    def modules(self) -> Iterator["Module"]:
        for _, m in self.named_modules():
            yield m

    def named_children(self) -> Iterator[tuple]:
        """(name, module) for the direct children, each object once."""
        seen = set()
        for name, child in self._modules.items():
            if child is not None and id(child) not in seen:
                seen.add(id(child))
                yield name, child

    def children(self) -> Iterator["Module"]:
        for _, child in self.named_children():
            yield child

    def named_parameters(self, prefix: str = "") -> Iterator[tuple]:
        """(dotted name, Parameter) for every parameter, each tensor once (first name wins)."""
        seen = set()
        for mod_name, module in self.named_modules(prefix):
            for name, p in module._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    yield (f"{mod_name}.{name}" if mod_name else name), p

    def parameters(self) -> Iterator[Parameter]:
        for _, p in self.named_parameters():
            yield p

    def named_buffers(self, prefix: str = "") -> Iterator[tuple]:
        """(dotted name, array) for every buffer (persistent or not) of unique modules."""
        for mod_name, module in self.named_modules(prefix):
            for name, b in module._buffers.items():
                if b is not None:
                    yield (f"{mod_name}.{name}" if mod_name else name), b

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of scalar weights (each shared tensor counted once)."""
        return sum(p.size for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ modes and grads
    def train(self, mode: bool = True) -> "Module":
        """Switch training mode (dropout active) on this module and all descendants."""
        for m in self.modules():
            m.training = bool(mode)
        return self

    def eval(self) -> "Module":
        """Switch to evaluation mode (dropout off): ``train(False)``."""
        return self.train(False)

    def zero_grad(self):
        """Forget the gradients of every parameter (``grad = None``)."""
        for p in self.parameters():
            p.grad = None

    # ------------------------------------------------------------------ state dict
    def _state_items(self, prefix: str = "") -> Iterator[tuple]:
        """(key, Parameter or buffer array) in PyTorch's state_dict order.

        Unlike :meth:`named_modules` this does not skip repeated modules: a module that
        sits at several places of the tree is listed under every name.
        """
        for name, p in self._parameters.items():
            if p is not None:
                yield prefix + name, p
        for name, b in self._buffers.items():
            if b is not None and name not in self._non_persistent:
                yield prefix + name, b
        for name, child in self._modules.items():
            if child is not None:
                yield from child._state_items(prefix + name + ".")

    def state_dict(self) -> "OrderedDict[str, np.ndarray]":
        """Dotted name -> NumPy array for every parameter and persistent buffer.

        The arrays are copies on the host (a snapshot): training further, or moving the
        model to the GPU, never changes a state dict you hold.
        """
        out = OrderedDict()
        for key, value in self._state_items():
            array = value.data if isinstance(value, Tensor) else value
            out[key] = np.array(to_numpy(array), copy=True)
        return out

    def load_state_dict(self, state_dict, strict: bool = True):
        """Copy ``state_dict``'s values into this model's parameters and buffers, in place.

        Values are cast to each tensor's dtype and moved to its device. Nothing is copied
        unless every shape matches. With ``strict=True`` any missing or unexpected key is
        an error that lists them all; with ``strict=False`` the matching keys are loaded
        and a :class:`LoadResult` (missing_keys, unexpected_keys) is returned. A shape
        mismatch is always an error (remove such keys first, e.g. to fine-tune with a
        different number of classes).
        """
        targets = OrderedDict(self._state_items())
        ignorable = set(self._ignored_keys())
        missing = [k for k in targets if k not in state_dict]
        unexpected = [k for k in state_dict if k not in targets and k not in ignorable]
        mismatched = []
        for key, value in targets.items():
            if key in state_dict:
                got = _shape_of(state_dict[key])
                if got != tuple(value.shape):
                    mismatched.append(f"{key}: checkpoint {got} vs model {tuple(value.shape)}")
        problems = []
        if mismatched:
            problems.append("shape mismatch for " + "; ".join(mismatched))
        else:
            problems.extend(_alias_conflicts(targets, state_dict))
        if strict and missing:
            problems.append("missing keys: " + ", ".join(missing))
        if strict and unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        if problems:
            raise KeyError(f"load_state_dict into {type(self).__name__} failed: "
                           + " | ".join(problems))

        for key, value in targets.items():
            if key not in state_dict:
                continue
            source = state_dict[key]
            source = source.data if isinstance(source, Tensor) else source
            target = value.data if isinstance(value, Tensor) else value
            # Move to the target's device, then cast: the copy is in place (same array).
            target[...] = to_device(source, device_of(target)).astype(target.dtype, copy=False)
        return LoadResult(missing, unexpected)

    def _ignored_keys(self) -> Iterator[str]:
        """Full keys of ``_ignored_state_keys`` for every module of the tree (all names)."""
        def walk(module, prefix):
            for local in module._ignored_state_keys:
                yield prefix + local
            for name, child in module._modules.items():
                if child is not None:
                    yield from walk(child, prefix + name + ".")
        return walk(self, "")

    # ------------------------------------------------------------------ device and dtype
    def _apply_to_arrays(self, fn, floating_only: bool):
        """Replace every parameter's data (in place on the Parameter) and buffer by fn(array)."""
        for module in self.modules():
            for p in module._parameters.values():
                if p is None:
                    continue
                p.data = fn(p.data)
                if p.grad is not None:
                    p.grad = fn(p.grad)
            for name, b in module._buffers.items():
                if b is not None and (b.dtype.kind == "f" or not floating_only):
                    module._buffers[name] = fn(b)

    def to(self, device: str) -> "Module":
        """Move every parameter and buffer to ``'cpu'`` or ``'cuda'``, in place; returns self.

        The Parameter objects stay the same (only their arrays move), so move the model
        *before* building an optimiser's state for it.
        """
        device = parse_device(device)
        self._apply_to_arrays(lambda a: to_device(a, device), floating_only=False)
        return self

    def astype(self, dtype) -> "Module":
        """Cast every floating parameter and buffer to ``dtype`` (e.g. float64 for gradcheck)."""
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"astype: parameters must stay floating point, got {dtype}")
        self._apply_to_arrays(lambda a: a.astype(dtype) if a.dtype.kind == "f" else a,
                              floating_only=True)
        return self

    # ------------------------------------------------------------------ dropout RNG
    # A layer that draws random numbers sets ``has_rng = True`` and keeps its NumPy
    # Generator in ``self.rng`` (Dropout does); the methods below find it by this marker.
    has_rng = False

    def _dropouts(self):
        return [(name, m) for name, m in self.named_modules() if m.has_rng]

    def seed_dropout(self, seed: int) -> "Module":
        """Give every Dropout of the tree its own stream, spawned from ``SeedSequence(seed)``.

        Streams are assigned in ``named_modules()`` order, so the same architecture and
        seed always give the same masks.
        """
        dropouts = self._dropouts()
        children = np.random.SeedSequence(seed).spawn(len(dropouts))
        for (_, m), child in zip(dropouts, children):
            m.rng = np.random.default_rng(child)
        return self

    def rng_state(self) -> dict:
        """Dropout name -> its generator's state (a JSON-serialisable dict)."""
        return {name: m.rng.bit_generator.state for name, m in self._dropouts()}

    def set_rng_state(self, state: dict) -> "Module":
        """Restore what :meth:`rng_state` returned (names must match exactly)."""
        dropouts = dict(self._dropouts())
        missing = sorted(set(dropouts) - set(state))
        unexpected = sorted(set(state) - set(dropouts))
        if missing or unexpected:
            raise KeyError(f"set_rng_state: missing dropout states {missing}, "
                           f"unexpected {unexpected}")
        for name, m in dropouts.items():
            s = state[name]
            bit_generator = getattr(np.random, s["bit_generator"])()
            bit_generator.state = s
            m.rng = np.random.Generator(bit_generator)
        return self

    # ------------------------------------------------------------------ printing
    def extra_repr(self) -> str:
        """The text inside the parentheses of this module's line (override in layers)."""
        return ""

    def __repr__(self):
        """A tree like PyTorch's: one line per leaf module, children indented."""
        extra = self.extra_repr()
        if not self._modules:
            return f"{type(self).__name__}({extra})"
        lines = [f"  {extra}"] if extra else []
        for name, child in self._modules.items():
            child_text = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {child_text}")
        return f"{type(self).__name__}(\n" + "\n".join(lines) + "\n)"


# --------------------------------------------------------------------------- containers
class ModuleList(Module):
    """A list of modules named "0", "1", ... (keys like ``layers.0.linear1.weight``).

    The same module object may appear at several indices (shared prediction heads).
    """

    def __init__(self, modules=()):
        super().__init__()
        for m in modules:
            self.append(m)

    def append(self, module: Module) -> "ModuleList":
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        self._modules[str(len(self._modules))] = module
        return self

    def extend(self, modules) -> "ModuleList":
        for m in modules:
            self.append(m)
        return self

    def __getitem__(self, index):
        items = list(self._modules.values())
        if isinstance(index, slice):
            return ModuleList(items[index])
        if not -len(items) <= index < len(items):
            raise IndexError(f"ModuleList index {index} out of range (length {len(items)})")
        return items[index]

    def __setitem__(self, index, module):
        if not isinstance(module, Module):
            raise TypeError(f"ModuleList holds Modules, got {type(module).__name__}")
        n = len(self._modules)
        if not -n <= index < n:
            raise IndexError(f"ModuleList index {index} out of range (length {n})")
        self._modules[str(index % n)] = module

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(list(self._modules.values()))

    def forward(self, *args, **kwargs):
        raise TypeError("a ModuleList is a container: call its elements, not the list")


class Sequential(ModuleList):
    """Modules applied one after the other: ``Sequential(a, b)(x) == b(a(x))``.

    Children are named "0", "1", ... as in PyTorch (``input_proj.0.0.weight``).
    """

    def __init__(self, *modules):
        super().__init__(modules)

    def forward(self, x):
        for m in self:
            x = m(x)
        return x


__all__ = ["Parameter", "Module", "ModuleList", "Sequential", "LoadResult"]


def _alias_conflicts(targets, state_dict):
    """Keys that name one shared tensor (e.g. ``class_embed.0`` ... ``class_embed.5`` of one
    head) but carry different values in ``state_dict``: loading would keep only the last."""

    def host_values(key):
        """The values under ``key`` on the host (``.data`` only of a Tensor: a CuPy
        array's ``.data`` is its device pointer)."""
        value = state_dict[key]
        return to_numpy(value.data if isinstance(value, Tensor) else value)

    by_tensor = OrderedDict()
    for key, value in targets.items():
        if key in state_dict:
            by_tensor.setdefault(id(value), []).append(key)
    problems = []
    for keys in by_tensor.values():
        first = host_values(keys[0])
        for other in keys[1:]:
            if not np.array_equal(first, host_values(other)):
                problems.append(f"{keys[0]} and {other} name the same shared tensor in this "
                                "model but hold different values in the state dict")
    return problems
