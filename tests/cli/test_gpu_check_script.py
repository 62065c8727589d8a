"""tools/gpu_check.sh, the one-go GPU check, runs on CPU-only CI with a stand-in Python.

The stand-in records each command the script runs and parses every ``-m minidetr ...``
command line with minidetr's own argument parser, so a renamed option or a typo in the
script fails here rather than during a (rare, expensive) GPU session.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "gpu_check.sh"

STAND_IN = f"""#!{sys.executable}
import json, sys
sys.path.insert(0, {str(REPO)!r})
args = sys.argv[1:]
with open({{log!r}}, "a") as f:
    f.write(json.dumps(args) + "\\n")
if args[:2] == ["-m", "minidetr"]:
    from minidetr.cli import build_parser
    build_parser().parse_args(args[2:])      # exits 2 on an unknown option
elif args[:2] == ["-m", "pytest"]:
    assert "-m" in args[2:] and "gpu" in args, args
elif args[:1] == ["-"]:
    sys.stdin.read()
sys.exit({{exit_code}})
"""


def _run(tmp_path, *extra, exit_code=0):
    log = tmp_path / "calls.jsonl"
    stand_in = tmp_path / "python"
    stand_in.write_text(STAND_IN.format(log=str(log), exit_code=exit_code))
    stand_in.chmod(0o755)
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), *extra], cwd=REPO,
                            env={**os.environ, "PYTHON": str(stand_in)},
                            capture_output=True, text=True, timeout=120)
    calls = ([json.loads(line) for line in log.read_text().splitlines()]
             if log.exists() else [])
    return result, calls


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_every_step_is_a_valid_command_and_is_recorded(tmp_path):
    result, calls = _run(tmp_path, "ann.json", "images", "15")
    assert result.returncode == 0, result.stdout + result.stderr
    status = (tmp_path / "out" / "status.txt").read_text().split("\n")
    names = [line.split()[0] for line in status if line]
    assert names == ["env", "tests", "bench-msda", "bench-train-small", "bench-train-paper",
                     "coco"], status
    assert all("rc=0" in line for line in status if line)
    coco = [c for c in calls if "train" in c and "--time-limit" in c]
    assert len(coco) == 1 and coco[0][coco[0].index("--time-limit") + 1] == "15"


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_a_failing_step_is_reported_and_the_others_still_run(tmp_path):
    result, calls = _run(tmp_path, exit_code=1)
    assert result.returncode == 1
    status = (tmp_path / "out" / "status.txt").read_text()
    assert status.count("rc=1") == 5 and "coco" not in status     # no COCO set given
    assert len(calls) == 5
