"""Solutions to the exercises of notebook 13, pretrained weights and fine-tuning.

Each ``exercise_N()`` runs in a few seconds on the CPU and asserts its claims
(``tests/lessons/test_solutions.py`` calls them all). None needs torch.
"""
import pickle
import pickletools
import re
import zipfile
from pathlib import Path

import numpy as np

from minidetr.models import build_model, get_config
from minidetr.weights.layouts import official_to_transformers
from minidetr.weights.pretrained import CLASS_HEAD
from minidetr.weights.pth import UnsafePickleError, load_pth

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "weights" / "fixtures"


def exercise_1():
    """The micro plain model's two class heads are one module: the file stores it once.

    The zip holds one member per storage; the pickle names a storage by its key in a
    persistent id each time a tensor uses it, so the ids outnumber the storages. After
    ``load_pth`` the arrays of the shared head share memory, as after ``torch.load``."""
    path = FIXTURES / "official-plain-zip.pth"
    with zipfile.ZipFile(path) as archive:
        storages = [n for n in archive.namelist() if "/data/" in n]
        data = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    # Each BINPERSID pops the tuple ('storage', type, key, location, numel) built just
    # before it. Strings are memoised (BINPUT) and reused (BINGET), so follow the memo:
    # the key is the first string pushed after 'storage'.
    keys_used, strings, memo, last = [], [], {}, None
    for op, arg, _ in pickletools.genops(data):
        if op.name in ("BINUNICODE", "SHORT_BINUNICODE"):
            last = arg
        elif op.name in ("BINGET", "LONG_BINGET"):
            last = memo.get(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT"):
            memo[arg] = last
            continue                                  # PUT leaves the stack as it was
        elif op.name == "BINPERSID":
            keys_used.append(strings[0])
            last = None
            continue
        else:
            last = None
            continue
        if last == "storage":
            strings = []
        elif isinstance(last, str):
            strings.append(last)
    obj = load_pth(path)
    model = obj["model"]
    print(f"{len(storages)} storages, {len(keys_used)} references to them, "
          f"{len(set(keys_used))} distinct; the model holds {len(model)} arrays")
    assert len(set(keys_used)) == len(storages) < len(keys_used)
    heads = sorted({m[1] for k in model if (m := re.match(r"class_embed\.(\d+)\.", k))})
    assert len(heads) == 2
    for i in heads[1:]:
        for part in ("weight", "bias"):
            a, b = model[f"class_embed.0.{part}"], model[f"class_embed.{i}.{part}"]
            assert np.shares_memory(a, b) and np.array_equal(a, b)
    # the plain model's box heads are shared too: every repeated reference is a model
    # array that shares memory with an earlier one (the optimizer's moments share nothing)
    arrays = list(model.values())
    shared = sum(any(np.shares_memory(a, b) for b in arrays[:i]) for i, a in enumerate(arrays))
    assert shared == len(keys_used) - len(storages), shared


def exercise_2():
    """``STACK_GLOBAL`` (protocol 4) takes module and name from the stack instead of the
    opcode's argument, and protocol 0 writes the same ``GLOBAL`` as text; both reach
    ``find_class``, so the restricted reader refuses both. Plain pickle evaluates them."""
    stack_global = (b"\x80\x04"                                  # PROTO 4
                    b"\x8c\x08builtins\x8c\x04eval\x93"               # STACK_GLOBAL
                    b"\x8c\x056 * 7\x85R.")                           # (code,) REDUCE
    text = b"cbuiltins\neval\n(S'6 * 7'\ntR."
    ops = [op.name for op, _, _ in pickletools.genops(stack_global)]
    assert "STACK_GLOBAL" in ops and "GLOBAL" not in ops
    for data in (stack_global, text):
        assert pickle.loads(data) == 42                 # plain pickle runs eval
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in (("stack-global.pth", stack_global), ("text.pth", text)):
            path = Path(tmp) / name
            with zipfile.ZipFile(path, "w") as z:   # a torch.save zip around the pickle
                z.writestr("archive/data.pkl", data)
            try:
                load_pth(path)
            except UnsafePickleError as error:
                assert "builtins.eval" in str(error) and "Nothing was run" in str(error)
            else:
                raise AssertionError(f"{name} was not refused")


def exercise_3():
    """Stack transformers' q, k, v rows back into the official ``in_proj_weight``."""
    cfg = get_config("tiny", seed=0)
    state = build_model(cfg).state_dict()
    hf = official_to_transformers(state)
    C = cfg.d_model
    for layer in range(cfg.dec_layers):
        prefix = f"model.decoder.layers.{layer}.self_attn."
        for part in ("weight", "bias"):
            stacked = np.concatenate([hf[f"{prefix}{n}_proj.{part}"] for n in "qkv"], axis=0)
            original = state[f"transformer.decoder.layers.{layer}.self_attn.in_proj_{part}"]
            assert stacked.shape == ((3 * C, C) if part == "weight" else (3 * C,))
            assert np.array_equal(stacked, original)            # bit for bit
        assert hf[f"{prefix}q_proj.weight"].shape == (C, C)


def exercise_4():
    """Predict: the class heads change shape, one Linear per decoder layer (weight and
    bias): 2 * dec_layers arrays for plain. Two-stage adds the encoder's proposal head
    (class_embed.<dec_layers>) and names each head again under
    transformer.decoder.class_embed: 2 * (dec_layers + 1) * 2 arrays."""
    for variant in ("plain", "two-stage"):
        three = build_model(get_config("tiny", variant, num_classes=3)).state_dict()
        five = build_model(get_config("tiny", variant, num_classes=5)).state_dict()
        assert list(three) == list(five)
        changed = {k for k in three if three[k].shape != five[k].shape}
        D = get_config("tiny").dec_layers
        predicted = 2 * D if variant == "plain" else 2 * (D + 1) * 2
        assert len(changed) == predicted, (variant, sorted(changed))
        assert changed == {k for k in three if CLASS_HEAD.match(k)}, variant
        assert all(three[k].shape[0] == 3 and five[k].shape[0] == 5 for k in changed)
