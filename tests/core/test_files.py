"""Atomic writes: a failed write leaves the old file as it was and no temporary behind."""
from __future__ import annotations

import json
import os
import stat

import pytest

from minidetr.files import atomic_write, write_json, write_text


def test_write_json_and_text_round_trip(tmp_path):
    path = write_json(tmp_path / "a" / "run.json", {"epochs": 3, "scales": [1, 2]})
    assert json.loads(path.read_text()) == {"epochs": 3, "scales": [1, 2]}
    assert path.read_text().endswith("\n")
    assert write_text(tmp_path / "m.jsonl", "x\ny\n").read_text() == "x\ny\n"


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, error):
    path = write_text(tmp_path / "metrics.jsonl", "old\n")
    with pytest.raises(type(error)):
        with atomic_write(path, "w") as f:
            f.write("half of the new")
            raise error
    assert path.read_text() == "old\n"
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]


def test_binary_writes_and_the_usual_permissions(tmp_path):
    with atomic_write(tmp_path / "x.bin") as f:
        f.write(b"\x00\x01")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.bin").stat().st_mode) == 0o666 & ~umask


def test_only_write_modes_are_accepted(tmp_path):
    with pytest.raises(ValueError, match="mode must be 'wb' or 'w'"):
        with atomic_write(tmp_path / "x", "a"):
            pass
