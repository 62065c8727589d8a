"""The torch-free ``.pth`` reader: committed fixtures bit for bit, malicious pickles refused
without running them, and one clear PthError for every truncated or corrupt file.

The fixtures (tests/weights/fixtures, written by tools/make_weight_fixtures.py with a real
``torch.save``) are read here without torch; ``expected.json`` holds what
``torch.load(weights_only=True)`` gave for them.
"""
from __future__ import annotations

import collections
import importlib.util
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minidetr.models import build_model, get_config
from minidetr.weights.errors import WeightsFileError
from minidetr.weights.pth import (ALLOWED_GLOBALS, LEGACY_MAGIC, LEGACY_PROTOCOL, PthError,
                                  UnsafePickleError, load_pth)

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
_spec = importlib.util.spec_from_file_location("make_weight_fixtures",
                                               REPO / "tools" / "make_weight_fixtures.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
STEMS = ["official-plain", "official-refine", "official-two-stage", "edge-cases"]
FORMATS = ["zip", "legacy"]


def first_difference(got, want, where="file"):
    """Where two :func:`describe` trees first differ (None if they are equal)."""
    if type(got) is not type(want):
        return f"{where}: {str(got)[:120]} != {str(want)[:120]}"
    if isinstance(got, dict):
        if got.keys() != want.keys():
            return f"{where}: kind {list(got)} != {list(want)}"
        (kind,) = got
        return first_difference(got[kind], want[kind], f"{where}<{kind}>")
    if isinstance(got, list):
        if len(got) != len(want):
            return f"{where}: {len(got)} items != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want)):
            name = f"{where}[{g[0]}]" if isinstance(g, list) and len(g) == 2 else f"{where}[{i}]"
            diff = first_difference(g, w, name)
            if diff:
                return diff
        return None
    return None if got == want else f"{where}: {got!r} != {want!r}"


# --------------------------------------------------------------------------- fixtures
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stem", STEMS)
def test_fixture_equals_torch_load(stem, fmt):
    """Every array (dtype, shape, bytes) and every other value equals torch.load's."""
    got = tool.describe(load_pth(FIXTURES / f"{stem}-{fmt}.pth"))
    diff = first_difference(got, EXPECTED[stem])
    assert diff is None, f"{stem}-{fmt}.pth differs from torch.load: {diff}"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", ["plain", "refine", "two-stage"])
def test_official_layout(variant, fmt):
    """The official main.py layout: the model's own keys and shapes, args as a dict,
    aliased heads one array, a real AdamW state after one step."""
    ckpt = load_pth(FIXTURES / f"official-{variant}-{fmt}.pth")
    assert type(ckpt) is dict and set(ckpt) == {"model", "optimizer", "lr_scheduler", "epoch",
                                                "args"}
    model_state = build_model(get_config("tiny", variant, **tool.MICRO)).state_dict()
    state = ckpt["model"]
    assert isinstance(state, collections.OrderedDict)
    assert list(state) == list(model_state), "keys (or their order) differ from the model's"
    wrong = [(k, state[k].shape, v.shape) for k, v in model_state.items()
             if state[k].shape != v.shape or state[k].dtype != np.float32]
    assert not wrong, f"shapes/dtypes differ from the model: {wrong[:5]}"
    assert all(state[k].flags.writeable for k in state), "arrays should be writable"
    # The official heads are shared modules: state_dict() gives each key its own tensor
    # of one storage, so the arrays share memory, as torch.load's tensors do.
    def shared(a, b):
        return np.shares_memory(state[a], state[b]) and np.array_equal(state[a], state[b])

    if variant == "plain":
        assert shared("class_embed.1.weight", "class_embed.0.weight")
        assert shared("bbox_embed.1.layers.2.bias", "bbox_embed.0.layers.2.bias")
    else:
        assert not shared("class_embed.0.weight", "class_embed.1.weight")
        assert shared("transformer.decoder.bbox_embed.1.layers.0.weight",
                      "bbox_embed.1.layers.0.weight")
    if variant == "two-stage":
        assert shared("transformer.decoder.class_embed.2.bias", "class_embed.2.bias")

    args = ckpt["args"]
    assert type(args) is dict
    assert (args["hidden_dim"], args["nheads"], args["enc_layers"], args["dec_layers"],
            args["dim_feedforward"], args["num_queries"], args["enc_n_points"],
            args["num_classes"], args["tiny_channels"]) == (16, 2, 1, 2, 16, 6, 2, 5,
                                                             [8, 8, 16, 16])
    assert (args["with_box_refine"], args["two_stage"]) == (variant != "plain",
                                                           variant == "two-stage")
    opt = ckpt["optimizer"]
    assert [g["lr"] for g in opt["param_groups"]] == pytest.approx([2e-4, 2e-5, 2e-5])
    assert opt["param_groups"][0]["betas"] == (0.9, 0.999)
    steps = {i: s["step"] for i, s in opt["state"].items()}
    assert steps and all(np.asarray(v).shape == () and float(v) == 1.0
                         for v in steps.values()), f"AdamW steps: {steps}"
    assert ckpt["lr_scheduler"]["last_epoch"] == 1 and ckpt["epoch"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_edge_cases_values(fmt):
    """Dtypes, views and sharing, beyond the hashes: values a reader can get wrong."""
    got = load_pth(FIXTURES / f"edge-cases-{fmt}.pth")
    special = np.array([0.0, -0.0, 1.5, -2.25, np.inf, -np.inf, np.nan], np.float32)
    np.testing.assert_array_equal(got["bfloat16"][:7], special)      # exact in bfloat16
    assert got["bfloat16"].dtype == np.float32
    assert np.signbit(got["bfloat16"][1]) and np.signbit(got["float16"][1]), "-0.0 lost"
    assert got["float16"].dtype == np.float16 and got["float16"][-1] == 65504.0
    assert got["int64"].tolist() == [-2 ** 63, -1, 0, 1, 2 ** 63 - 1]
    assert got["int32"].dtype == np.int32 and got["int8"].tolist() == [-128, 127]
    assert got["uint8"].tolist() == [0, 1, 255] and got["bool"].dtype == np.bool_
    assert got["complex64"].tolist() == [1 + 2j, -3.5j]
    assert got["scalar"].shape == () and got["scalar"] == 3.25
    assert got["int_scalar"].shape == () and got["int_scalar"] == -7
    assert got["empty"].shape == (0, 3) and got["empty_int"].dtype == np.int64
    whole = got["whole"]
    np.testing.assert_array_equal(got["transposed"], got["float64"].T)
    np.testing.assert_array_equal(got["sliced"], whole[5:11])
    np.testing.assert_array_equal(got["shared_row"], whole[6:12])
    np.testing.assert_array_equal(got["shared_column"], whole[2::4])
    assert np.shares_memory(got["sliced"], whole), "a slice of a storage is a view, as in torch"
    np.testing.assert_array_equal(got["expanded"], np.repeat(np.arange(3.0)[:, None], 4, 1))
    assert got["parameter"].shape == (2, 3)
    nested = got["nested"]
    assert nested["list"][:5] == [1, 2.5, "three", None, True]
    assert nested["list"][5][0] == 4 and np.array_equal(nested["list"][5][1], whole[:2])
    assert type(nested["tuple"]) is tuple and nested["tuple"][1] == "x"
    assert list(nested["ordered"].items()) == [("b", 1), ("a", 2)]
    assert nested["int_keys"] == {0: "zero", 1: -1} and nested["set"] == {1, 2, 3}
    assert (got["text"], got["big_int"], got["small_float"], got["none"], got["raw_bytes"]) \
        == ("héllo ✓", 12345678901234567890123, 0.1, None, b"\x00\xff\x80")
    assert (got["size"], got["device"], got["dtype"]) == ((2, 3), "cuda:1", np.float16)


# --------------------------------------------------------------------------- malicious files
class _Payload:
    """An object whose pickle calls ``func(*args)`` on load (what an attacker writes)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _op_string(text):
    return b"X" + struct.pack("<I", len(text.encode())) + text.encode()


def _touch_code(marker):
    return f"open({str(marker)!r}, 'w').close()"


def _payloads(marker):
    """name -> (pickle bytes that create ``marker`` when loaded, global they name)."""
    import builtins
    touch = _touch_code(marker)
    module_of_system = os.system.__module__                         # posix (or nt)
    by_hand = (b"\x80\x02cos\nsystem\nq\x00X" + struct.pack("<I", len(f"touch {marker}"))
               + f"touch {marker}".encode() + b"\x85R.")
    getattr_trick = (b"\x80\x02cbuiltins\ngetattr\n(cbuiltins\n__import__\n" + _op_string("os")
                     + b"\x85R" + _op_string("system") + b"tR" + _op_string(f"touch {marker}")
                     + b"\x85R.")
    return {
        "os.system": (pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2),
                      f"{module_of_system}.system"),
        "os.system by hand": (by_hand, "os.system"),
        "builtins.eval": (pickle.dumps(_Payload(builtins.eval, touch), protocol=2), "eval"),
        "builtins.exec": (pickle.dumps(_Payload(builtins.exec, touch), protocol=2), "exec"),
        "subprocess.Popen": (pickle.dumps(_Payload(subprocess.Popen, ["touch", str(marker)]),
                                          protocol=2), "Popen"),
        "getattr trick": (getattr_trick, "builtins.getattr"),
        "STACK_GLOBAL (protocol 4)": (pickle.dumps(_Payload(os.system, f"touch {marker}"),
                                                   protocol=4), f"{module_of_system}.system"),
        "inside a state dict": (pickle.dumps({"model": collections.OrderedDict(
            w=[1.0, 2.0], b=_Payload(builtins.eval, touch))}, protocol=2), "eval"),
    }


def _zip_pth(path, data_pkl, storages=None):
    """A zip-format .pth around the given pickle bytes (as torch.save lays it out)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data_pkl)
        z.writestr("archive/byteorder", "little")
        for key, raw in (storages or {}).items():
            z.writestr(f"archive/data/{key}", raw)
        z.writestr("archive/version", "3\n")
    return path


def _legacy_pth(path, obj_pkl, keys=(), storages=b""):
    """A legacy-format .pth: magic, protocol, system info, the object, keys, storages."""
    head = b"".join(pickle.dumps(x, protocol=2) for x in (
        LEGACY_MAGIC, LEGACY_PROTOCOL,
        {"protocol_version": LEGACY_PROTOCOL, "little_endian": True,
         "type_sizes": {"short": 2, "int": 4, "long": 8}}))
    path.write_bytes(head + obj_pkl + pickle.dumps(list(keys), protocol=2) + storages)
    return path


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(_payloads(Path("m"))))
def test_malicious_pickle_is_refused_and_not_run(tmp_path, name, fmt):
    marker = tmp_path / "payload-ran"
    payload, global_name = _payloads(marker)[name]
    # The payload is live: plain pickle runs it (so this test could fail).
    result = pickle.loads(payload)
    if isinstance(result, subprocess.Popen):
        result.wait()
    assert marker.exists(), f"the {name} payload does not work, so the test proves nothing"
    marker.unlink()
    path = (_zip_pth(tmp_path / "evil.pth", payload) if fmt == "zip"
            else _legacy_pth(tmp_path / "evil.pth", payload))
    with pytest.raises(UnsafePickleError) as err:
        load_pth(path)
    assert global_name in str(err.value), f"the error should name {global_name}: {err.value}"
    assert str(path) in str(err.value)
    assert not marker.exists(), "the payload ran"


def test_malicious_header_of_legacy_file_is_refused(tmp_path):
    """A bare pickle (no PyTorch magic) that would run code: refused at its first global."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_pth(path)
    assert not marker.exists()


@pytest.mark.parametrize("pkl, match", [
    # BUILD on an allowed global (would change the reader's own function)
    (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n}" + _op_string("__defaults__") + b"Nsb.",
     "set the state"),
    # BUILD with a slot state on the Namespace class
    (b"\x80\x02cargparse\nNamespace\nN}" + _op_string("x") + b"Ns\x86b.",
     "corrupt"),
    # numpy object dtype (the way to object arrays)
    (b"\x80\x02cnumpy\ndtype\n" + _op_string("O") + b"\x85R.", "not a number type"),
    # _codecs.encode with another codec
    (b"\x80\x02c_codecs\nencode\n" + _op_string("x") + _op_string("rot13") + b"\x86R.",
     "latin-1"),
    # numpy arrays (pickled objects) and torch's own loader are not allowed
    (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\n.", "numpy.core.multiarray._reconstruct"),
    (b"\x80\x02ctorch.serialization\nload\n.", "torch.serialization.load"),
    (b"\x80\x02c__builtin__\neval\n.", "__builtin__.eval"),
    (b"\x80\x02ccopyreg\n_reconstructor\n.", "copyreg._reconstructor"),
])
def test_other_tricks_are_refused(tmp_path, pkl, match):
    for path in (_zip_pth(tmp_path / "z.pth", pkl), _legacy_pth(tmp_path / "l.pth", pkl)):
        with pytest.raises(PthError, match=match):
            load_pth(path)


def test_rebuild_from_type_needs_a_tensor_function(tmp_path):
    """``_rebuild_from_type_v2`` may call only the tensor builders, not another global."""
    pkl = (b"\x80\x02ctorch._tensor\n_rebuild_from_type_v2\n(c_codecs\nencode\nctorch\nTensor\n"
           + _op_string("abc") + _op_string("latin1") + b"\x86}tR.")
    with pytest.raises(PthError, match="not a plain tensor"):
        load_pth(_zip_pth(tmp_path / "z.pth", pkl))


def test_allowed_globals_are_only_data_builders():
    """The allow-list holds no module that can reach the OS or run code."""
    modules = {g.rsplit(".", 1)[0] for g in ALLOWED_GLOBALS}
    assert modules <= {"torch", "torch._utils", "torch._tensor", "torch.nn.parameter",
                       "torch.nn", "torch.storage", "collections", "argparse", "_codecs",
                       "numpy", "numpy.core.multiarray", "numpy._core.multiarray", "builtins",
                       "__builtin__"}, modules
    builtins_allowed = {g.rsplit(".", 1)[1] for g in ALLOWED_GLOBALS
                        if g.startswith(("builtins.", "__builtin__."))}
    assert builtins_allowed == {"set", "frozenset", "complex", "bytearray"}


def test_error_hierarchy():
    assert issubclass(UnsafePickleError, PthError)
    assert issubclass(PthError, WeightsFileError) and issubclass(WeightsFileError, ValueError)


# --------------------------------------------------------------------------- bad files
def _assert_clear_error(path, *, match=None):
    """load_pth raises a PthError naming the file (never another exception)."""
    try:
        load_pth(path)
    except PthError as e:
        assert str(path) in str(e), f"the message should name the file: {e}"
        if match:
            assert match in str(e), f"expected {match!r} in: {e}"
        return str(e)
    except Exception as e:                       # noqa: BLE001 - the point of the test
        pytest.fail(f"{path.name}: {type(e).__name__} instead of PthError: {e}")
    pytest.fail(f"{path.name} was read without an error")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stem", ["official-plain", "edge-cases"])
def test_truncated_files(tmp_path, stem, fmt):
    data = (FIXTURES / f"{stem}-{fmt}.pth").read_bytes()
    n = len(data)
    cuts = sorted({0, 1, 2, 5, 16, 64, 100, 200, n - 1, n - 2, n - 22, n - 100}
                  | set(range(0, n, max(1, n // 40))))
    for cut in cuts:
        path = tmp_path / f"cut-{cut}.pth"
        path.write_bytes(data[:cut])
        _assert_clear_error(path)
        path.unlink()


def test_flipped_storage_byte_in_zip_is_detected(tmp_path):
    """A zip member's CRC-32 covers its bytes: a flipped bit in a storage is an error."""
    src = FIXTURES / "official-plain-zip.pth"
    with zipfile.ZipFile(src) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size > 64)
    data = bytearray(src.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:
                                                    info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len        # the member's first byte
    for where in (start, start + info.file_size // 2, start + info.file_size - 1):
        flipped = bytearray(data)
        flipped[where] ^= 0x10
        path = tmp_path / "flipped.pth"
        path.write_bytes(bytes(flipped))
        message = _assert_clear_error(path)
        assert "corrupt" in message and info.filename in message, message


@pytest.mark.parametrize("fmt", FORMATS)
def test_random_byte_flips_never_crash(tmp_path, fmt):
    """Anywhere in the file, a damaged byte gives a PthError or (legacy storage bytes,
    which have no checksum) different values -- never another exception."""
    data = (FIXTURES / f"edge-cases-{fmt}.pth").read_bytes()
    rng = np.random.default_rng(0)
    path = tmp_path / "flipped.pth"
    for where in rng.choice(len(data), size=150, replace=False):
        flipped = bytearray(data)
        flipped[where] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(flipped))
        try:
            load_pth(path)
        except PthError as e:
            assert str(path) in str(e)
        except Exception as e:                   # noqa: BLE001
            pytest.fail(f"byte {where}: {type(e).__name__} instead of PthError: {e}")


def test_zip_missing_a_storage(tmp_path):
    src = FIXTURES / "official-plain-zip.pth"
    path = tmp_path / "incomplete.pth"
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(path, "w") as out:
        for info in z.infolist():
            if not info.filename.endswith("/data/3"):
                out.writestr(info, z.read(info))
    _assert_clear_error(path, match="data/3 is missing")


def test_legacy_storage_size_mismatch(tmp_path):
    """The element count before a storage disagrees with the pickle: a clear error."""
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((" + _op_string("storage")
           + b"ctorch\nFloatStorage\n" + _op_string("0") + _op_string("cpu")
           + b"K\x04tQK\x00K\x04\x85K\x01\x85\x89}tR.")
    good = _legacy_pth(tmp_path / "good.pth", pkl, ["0"],
                       struct.pack("<q", 4) + np.arange(4, dtype="<f4").tobytes())
    np.testing.assert_array_equal(load_pth(good), np.arange(4, dtype=np.float32))
    bad = _legacy_pth(tmp_path / "bad.pth", pkl, ["0"],
                      struct.pack("<q", 10 ** 15) + np.arange(4, dtype="<f4").tobytes())
    _assert_clear_error(bad, match="should hold 4 elements")
    wrong_keys = _legacy_pth(tmp_path / "keys.pth", pkl, ["1"], b"")
    _assert_clear_error(wrong_keys, match="key list")


def test_tensor_reading_past_its_storage(tmp_path):
    """size/stride/offset that read past the storage's end: a clear error, not garbage."""
    pkl = (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((" + _op_string("storage")
           + b"ctorch\nFloatStorage\n" + _op_string("0") + _op_string("cpu")
           + b"K\x04tQK\x02K\x04\x85K\x01\x85\x89}tR.")
    path = _zip_pth(tmp_path / "past.pth", pkl, {"0": np.arange(4, dtype="<f4").tobytes()})
    _assert_clear_error(path, match="reads element 5")


@pytest.mark.parametrize("content, match", [
    (b"", "empty"),
    (os.urandom(3000), None),
    (b"\x80\x02" + os.urandom(500), None),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS"),
    (b"<!DOCTYPE html><html>404</html>", "HTML"),
    (pickle.dumps({"a": 1}, protocol=2), "no PyTorch magic"),
    (b"PK\x03\x04" + os.urandom(200), "damaged zip"),
])
def test_not_a_pth_file(tmp_path, content, match):
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    _assert_clear_error(path, match=match)


def test_npz_and_safetensors_renamed_pth(tmp_path):
    npz = tmp_path / "model.pth"
    with open(npz, "wb") as f:
        np.savez(f, w=np.ones(3))
    _assert_clear_error(npz, match=".npz")
    st = tmp_path / "model2.pth"
    st.write_bytes((FIXTURES / "edge-cases.safetensors").read_bytes())
    _assert_clear_error(st, match="safetensors")


def test_missing_file_and_folder(tmp_path):
    _assert_clear_error(tmp_path / "nothing.pth", match="no such file")
    with pytest.raises(PthError, match="a folder, not a file"):
        load_pth(tmp_path)


def test_zip_without_a_pickle(tmp_path):
    path = tmp_path / "other.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hello")
    _assert_clear_error(path, match="data.pkl")


def test_recursive_structure_is_kept(tmp_path):
    """A list that contains itself (possible in a pickle) neither hangs nor crashes."""
    looped = []
    looped.append(looped)
    got = load_pth(_zip_pth(tmp_path / "loop.pth", pickle.dumps({"x": looped}, protocol=2)))
    assert got["x"][0] is got["x"]


def test_big_endian_file_refused(tmp_path):
    path = tmp_path / "be.pth"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({}, protocol=2))
        z.writestr("archive/byteorder", "big")
    _assert_clear_error(path, match="big-endian")


def test_reader_never_imports_torch():
    """The reader works in a process where importing torch fails."""
    code = ("import sys; sys.modules['torch'] = None\n"
            "from minidetr.weights.pth import load_pth\n"
            f"obj = load_pth({str(FIXTURES / 'official-two-stage-legacy.pth')!r})\n"
            "assert len(obj['model']) == 144 and 'torch' not in [m for m in sys.modules if "
            "sys.modules[m] is not None]\nprint('ok')")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_bytes_io_of_written_pickle_is_same_as_file(tmp_path):
    """The zip reader gives the same object for the same pickle in a legacy file."""
    pkl = pickle.dumps({"a": [1, (2, "x")], "b": collections.OrderedDict(c=None)}, protocol=2)
    z = load_pth(_zip_pth(tmp_path / "z.pth", pkl))
    legacy = load_pth(_legacy_pth(tmp_path / "l.pth", pkl))
    assert z == legacy == pickle.load(io.BytesIO(pkl))
