"""The ``.safetensors`` reader: the committed fixture bit for bit, bfloat16 converted exactly,
and one clear SafetensorsError for truncated, corrupt or foreign files (no torch needed)."""
from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from minidetr.weights.errors import WeightsFileError
from minidetr.weights.safetensors_io import (SafetensorsError, load_safetensors,
                                             safetensors_metadata)

safetensors_numpy = pytest.importorskip("safetensors.numpy",
                                        reason="safetensors not installed (a dependency)")
REPO = Path(__file__).resolve().parents[2]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "edge-cases.safetensors"
_spec = importlib.util.spec_from_file_location("make_weight_fixtures",
                                               REPO / "tools" / "make_weight_fixtures.py")
tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tool)


def write_raw(path, entries, metadata=None):
    """A .safetensors file written byte by byte: entries name -> (dtype, shape, raw bytes)."""
    header, data, offset = {}, b"", 0
    for name, (dtype, shape, raw) in entries.items():
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)                              # 8-byte alignment
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_fixture_equals_torch():
    """Written by safetensors.torch: every array (dtype, shape, bytes) equals torch's."""
    expected = json.loads((FIXTURE.parent / "expected.json").read_text())[FIXTURE.name]
    got = load_safetensors(FIXTURE)
    assert tool.describe(got) == expected, "differs from safetensors.torch.load_file"
    assert got["bfloat16"].dtype == np.float32 and got["scalar"].shape == ()
    assert got["empty"].shape == (0, 4) and got["int64"].tolist() == [-2 ** 63, 0, 2 ** 63 - 1]
    special = np.array([0.0, -0.0, 1.5, -2.25], np.float32)
    np.testing.assert_array_equal(got["bfloat16"][:4], special)
    assert np.isinf(got["bfloat16"][6]) and np.isnan(got["bfloat16"][7])
    assert all(a.flags.writeable for a in got.values()), "arrays should be writable"
    assert safetensors_metadata(FIXTURE)["made_by"] == "make_weight_fixtures"


def test_round_trip_of_numpy_arrays(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"w": rng.normal(size=(3, 4)).astype(np.float32),
              "h": rng.normal(size=5).astype(np.float16), "i": np.arange(6, dtype=np.int64),
              "u": np.array([0, 65535], np.uint16), "b": np.array([True, False]),
              "d": rng.normal(size=(2, 1, 2)), "s": np.array(1.5, np.float32)}
    path = tmp_path / "a.safetensors"
    safetensors_numpy.save_file(arrays, str(path))
    got = load_safetensors(path)
    assert set(got) == set(arrays)
    for k, a in arrays.items():
        assert got[k].dtype == a.dtype and got[k].shape == a.shape, k
        assert got[k].tobytes() == a.tobytes(), f"{k}: bits differ"


def test_bfloat16_is_exact(tmp_path):
    """Every bfloat16 bit pattern becomes the float32 whose upper half it is."""
    bits = np.arange(0, 1 << 16, dtype=np.uint16)               # all 65536 patterns
    path = write_raw(tmp_path / "bf16.safetensors",
                     {"all": ("BF16", (256, 256), bits.astype("<u2").tobytes()),
                      "after": ("F32", (2,), np.array([1.0, 2.0], "<f4").tobytes())})
    got = load_safetensors(path)
    assert got["all"].dtype == np.float32 and got["all"].shape == (256, 256)
    want = (bits.astype(np.uint32) << 16).view(np.float32).reshape(256, 256)
    assert got["all"].tobytes() == want.tobytes()               # NaN payloads included
    assert got["all"][0, 0] == 0.0 and got["all"].flat[0x3FC0] == 1.5
    assert got["all"].flat[0xC010] == -2.25 and np.isinf(got["all"].flat[0x7F80])
    np.testing.assert_array_equal(got["after"], [1.0, 2.0])


def test_float8_is_a_clear_error(tmp_path):
    path = write_raw(tmp_path / "f8.safetensors", {"x": ("F8_E4M3", (4,), b"\x01\x02\x03\x04")})
    with pytest.raises(SafetensorsError, match="F8_E4M3.*NumPy does not have"):
        load_safetensors(path)


def _assert_clear_error(path, match=None):
    try:
        load_safetensors(path)
    except SafetensorsError as e:
        assert str(path) in str(e), f"the message should name the file: {e}"
        if match:
            assert match in str(e), f"expected {match!r} in: {e}"
        return
    except Exception as e:                       # noqa: BLE001 - the point of the test
        pytest.fail(f"{path.name}: {type(e).__name__} instead of SafetensorsError: {e}")
    pytest.fail(f"{path.name} was read without an error")


def test_truncated_files(tmp_path):
    data = FIXTURE.read_bytes()
    for cut in sorted({0, 1, 7, 8, 9, 50, len(data) - 1} | set(range(0, len(data), 37))):
        path = tmp_path / f"cut-{cut}.safetensors"
        path.write_bytes(data[:cut])
        _assert_clear_error(path)


@pytest.mark.parametrize("content", [
    b"",
    b"\xff" * 8 + b"{}",                                          # header length past the end
    struct.pack("<Q", 5) + b"{nope",                              # not JSON
    struct.pack("<Q", 2) + b"[]",                                 # not an object
    struct.pack("<Q", 56) + b'{"x":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}',
    b"PK\x03\x04 a zip, not safetensors",
])
def test_corrupt_files(tmp_path, content):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    _assert_clear_error(path)


def test_pth_renamed_and_missing(tmp_path):
    pth = tmp_path / "model.safetensors"
    pth.write_bytes((FIXTURE.parent / "edge-cases-zip.pth").read_bytes())
    _assert_clear_error(pth)
    _assert_clear_error(tmp_path / "none.safetensors", match="no such file")


def test_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(SafetensorsError, match="pip install safetensors"):
        load_safetensors(FIXTURE)


def test_error_hierarchy():
    assert issubclass(SafetensorsError, WeightsFileError) and issubclass(SafetensorsError,
                                                                         ValueError)
