"""``bench conv``: the ResNet stages' 3x3 convolutions, im2col against Winograd F(2x2), F(4x4).

The benchmark is checked for what it reports, never for how fast anything is: the stage
shapes, that every timing is there and positive, that "auto" names the algorithm
``conv2d`` really takes, the JSON file, and the command line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from minidetr import functional as F
from minidetr.bench.conv import auto_choice, bench_conv, stage_shapes
from minidetr.cli import main
from minidetr.functional import winograd


def test_stage_shapes_follow_the_resnet_strides():
    assert stage_shapes(2, 256, 250) == [("layer1", (2, 64, 64, 63)), ("layer2", (2, 128, 32, 32)),
                                         ("layer3", (2, 256, 16, 16)), ("layer4", (2, 512, 8, 8))]


def test_auto_choice_names_the_function_conv2d_really_calls(monkeypatch):
    """auto_choice against the Function conv2d(algorithm="auto") runs, at three tile counts."""
    called = []
    monkeypatch.setattr(winograd.WinogradConv3x3, "apply",
                        lambda *args: called.append(f"winograd{'4' if args[3] == 4 else ''}"))
    monkeypatch.setattr(F.conv.Conv2d, "apply", lambda *args: called.append("im2col"))
    w = np.zeros((8, 8, 3, 3), np.float32)
    for shape, expected in [((2, 8, 32, 32), "winograd4"),   # 128 4x4 tiles
                            ((2, 8, 8, 8), "winograd"),      # 8 4x4 tiles, 32 2x2 tiles
                            ((1, 8, 4, 4), "im2col")]:       # 4 2x2 tiles
        x = np.zeros(shape, np.float32)
        F.conv2d(x, w, padding=1)
        assert auto_choice(x, w) == called[-1] == expected, f"{shape}: {called[-1]}"


def test_bench_conv_reports_every_algorithm_and_the_auto_choice(tmp_path):
    lines = []
    rows = bench_conv(batch=1, size="128x128", repeats=1, json_path=tmp_path / "conv.json",
                      print_fn=lines.append)
    assert [r["stage"] for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    for row in rows:
        for key in ("im2col_forward_ms", "im2col_total_ms", "winograd_forward_ms",
                    "winograd_total_ms", "winograd4_forward_ms", "winograd4_total_ms"):
            assert row[key] > 0, f"{row['stage']}: {key} = {row[key]}"
        x = np.zeros((row["N"], row["C"], row["H"], row["W"]), np.float32)
        w = np.zeros((row["C"], row["C"], 3, 3), np.float32)
        assert row["auto"] == auto_choice(x, w), f"{row['stage']}: auto says {row['auto']}"
        assert row["speedup"] == row["im2col_total_ms"] / row[f"{row['auto']}_total_ms"]
    # layer1 32 x 32: 256 2x2 tiles, 64 4x4 tiles; layer2 16 x 16: 64 and 16; layer3 8 x 8: 16
    assert [r["tiles"] for r in rows] == [256, 64, 16, 4]
    assert [r["tiles4"] for r in rows] == [64, 16, 4, 1]
    assert [r["auto"] for r in rows] == ["winograd4", "winograd", "im2col", "im2col"]
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["benchmark"] == "conv" and len(saved["results"]) == 4
    assert any("results written to" in line for line in lines)


def test_bench_conv_from_the_command_line(tmp_path, capsys):
    assert main(["bench", "conv", "--batch", "1", "--size", "32x32", "--repeats", "1",
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "layer4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--size"):
        bench_conv(size="16x16", repeats=1, json_path=tmp_path / "x.json")
