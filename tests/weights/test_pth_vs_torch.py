"""The torch-free ``.pth`` reader against ``torch.load`` on random files (needs torch).

Random nests of tensors (every dtype, 0-4 dims, empty dims, transposes, permutations,
strided slices, expanded tensors, views sharing one storage, Parameters) and plain values
are saved with ``torch.save`` in both formats; :func:`load_pth` must give exactly what
``torch.load(weights_only=True)`` gives: the same structure and, array by array, the same
dtype, shape and bits. Skipped where torch is not installed (minidetr never needs it).
"""
from __future__ import annotations

import collections
import importlib.util
import random
from pathlib import Path

import numpy as np
import pytest

from minidetr.weights.pth import load_pth

torch = pytest.importorskip("torch", reason="torch not installed (needed only for this "
                                            "comparison)")
REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("make_weight_fixtures",
                                               REPO / "tools" / "make_weight_fixtures.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8,
          torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64,
          torch.complex128]
ZIP_ONLY_DTYPES = [torch.uint16, torch.uint32, torch.uint64]   # torch's legacy loader fails


def random_base(r: random.Random, g, dtype):
    """A contiguous tensor of a random shape (0-4 dims, some of size 0 or 1)."""
    shape = [r.choice([0, 1, 2, 3, 4, 5]) if r.random() < 0.15 else r.randint(1, 5)
             for _ in range(r.randint(0, 4))]
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=dtype)
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** r.randint(-3, 3)
        return values.to(dtype)
    info = torch.iinfo(dtype)
    values = torch.randint(-2 ** 31, 2 ** 31, shape, generator=g, dtype=torch.int64)
    if dtype in ZIP_ONLY_DTYPES:                       # no random ops for these: from a list
        return torch.tensor(values.abs().remainder(min(info.max, 2 ** 31)).tolist(),
                            dtype=dtype).reshape(shape)
    return values.clamp(info.min, info.max).to(dtype)


def random_view(r: random.Random, t):
    """A view of ``t`` (sharing its storage): transposed, permuted, sliced, expanded..."""
    kinds = ["same", "slice"]
    if t.dim() >= 2:
        kinds += ["transpose", "permute", "select"]
    if t.dim() >= 1 and 1 in t.shape:
        kinds.append("expand")
    if t.dim() >= 1 and t.numel() > 0:
        kinds.append("narrow")
    kind = r.choice(kinds)
    if kind == "transpose":
        return t.transpose(0, t.dim() - 1)
    if kind == "permute":
        order = list(range(t.dim()))
        r.shuffle(order)
        return t.permute(order)
    if kind == "select":
        return t.select(0, r.randrange(t.shape[0])) if t.shape[0] else t
    if kind == "expand":
        return t.expand(*[3 if n == 1 else n for n in t.shape])
    if kind == "narrow":
        dim = r.randrange(t.dim())
        start = r.randrange(t.shape[dim]) if t.shape[dim] else 0
        return t.narrow(dim, start, t.shape[dim] - start)
    if kind == "slice" and t.dim() >= 1:
        return t[r.randint(0, 1)::r.randint(1, 3)]
    return t


def random_nest(r: random.Random, g, dtypes, depth=0, pool=None):
    """A random dict/list/tuple nest of tensors, views of earlier tensors, and values."""
    pool = [] if pool is None else pool

    def leaf():
        roll = r.random()
        if roll < 0.15 and pool:
            return random_view(r, r.choice(pool))              # shares a storage
        if roll < 0.6:
            t = random_view(r, random_base(r, g, r.choice(dtypes)))
            if r.random() < 0.15 and t.dtype.is_floating_point:
                t = torch.nn.Parameter(t.detach().clone())
            pool.append(t)
            return t
        return r.choice([None, True, 0, -(2 ** 70), 3.5, float("inf"), "text ✓", b"\x00\x01",
                         1 - 2j, (1, "a")])

    if depth >= 3 or r.random() < 0.3:
        return leaf()
    kind = r.choice(["dict", "ordered", "list", "tuple"])
    items = [random_nest(r, g, dtypes, depth + 1, pool) for _ in range(r.randint(0, 5))]
    if kind == "list":
        return items
    if kind == "tuple":
        return tuple(items)
    keys = [r.choice([f"k{i}", i]) for i in range(len(items))]
    return (dict if kind == "dict" else collections.OrderedDict)(zip(keys, items))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("seed", range(25))
def test_random_file_equals_torch_load(tmp_path, seed, fmt):
    r = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    dtypes = DTYPES + (ZIP_ONLY_DTYPES if fmt == "zip" else [])
    obj = {"nest": random_nest(r, g, dtypes), "tensor": random_base(r, g, r.choice(dtypes))}
    path = tmp_path / f"random-{seed}.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    want = tool.describe(tool.torch_to_numpy(torch.load(path, weights_only=True)))
    got = tool.describe(load_pth(path))
    assert got == want, f"seed {seed}, {fmt}: load_pth differs from torch.load"


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_shared_storage_is_shared_memory(tmp_path, fmt):
    """Tensors that share a storage in torch share memory in NumPy (contiguous views)."""
    base = torch.arange(20.0)
    obj = {"a": base[2:10], "b": base.view(4, 5)[1], "c": base}
    path = tmp_path / "shared.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=fmt == "zip")
    got = load_pth(path)
    assert np.shares_memory(got["a"], got["c"]) and np.shares_memory(got["b"], got["c"])
    got["c"][3] = -1.0
    assert got["a"][1] == -1.0, "a write through one view is seen by the other, as in torch"


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_unsupported_tensors_are_clear_errors(tmp_path, fmt):
    """Tensors NumPy cannot hold: a PthError that says what they are (not 'unsafe')."""
    from minidetr.weights.pth import PthError, UnsafePickleError

    cases = {"a sparse tensor": torch.eye(3).to_sparse(),
             "float8_e4m3fn": torch.zeros(3).to(torch.float8_e4m3fn)}
    for match, tensor in cases.items():
        path = tmp_path / "unsupported.pth"
        torch.save({"w": tensor}, path, _use_new_zipfile_serialization=fmt == "zip")
        with pytest.raises(PthError, match=match) as err:
            load_pth(path)
        assert not isinstance(err.value, UnsafePickleError), err.value
