"""``bench conv``: the ResNet stages' 3x3 convolutions, im2col against Winograd.

The benchmark is checked for what it reports, never for how fast anything is: the stage
shapes, that every timing is there and positive, that "auto" names the algorithm
``conv2d`` really takes, the JSON file, and the command line.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from minidetr.bench.conv import bench_conv, stage_shapes
from minidetr.cli import main
from minidetr.functional import winograd


def test_stage_shapes_follow_the_resnet_strides():
    assert stage_shapes(2, 256, 250) == [("layer1", (2, 64, 64, 63)), ("layer2", (2, 128, 32, 32)),
                                         ("layer3", (2, 256, 16, 16)), ("layer4", (2, 512, 8, 8))]


def test_bench_conv_reports_both_algorithms_and_the_auto_choice(tmp_path):
    lines = []
    rows = bench_conv(batch=1, size="64x96", repeats=1, json_path=tmp_path / "conv.json",
                      print_fn=lines.append)
    assert [r["stage"] for r in rows] == ["layer1", "layer2", "layer3", "layer4"]
    for row in rows:
        for key in ("im2col_forward_ms", "im2col_total_ms", "winograd_forward_ms",
                    "winograd_total_ms"):
            assert row[key] > 0, f"{row['stage']}: {key} = {row[key]}"
        x = np.zeros((row["N"], row["C"], row["H"], row["W"]), np.float32)
        w = np.zeros((row["C"], row["C"], 3, 3), np.float32)
        expected = "winograd" if winograd.applies(x, w, (1, 1), (1, 1), (1, 1)) else "im2col"
        assert row["auto"] == expected, f"{row['stage']}: auto says {row['auto']}"
    assert rows[0]["auto"] == "winograd" and rows[3]["auto"] == "im2col"  # 96 tiles, 2 tiles
    saved = json.loads((tmp_path / "conv.json").read_text())
    assert saved["benchmark"] == "conv" and len(saved["results"]) == 4
    assert any("results written to" in line for line in lines)


def test_bench_conv_from_the_command_line(tmp_path, capsys):
    assert main(["bench", "conv", "--batch", "1", "--size", "32x32", "--repeats", "1",
                 "--json", str(tmp_path / "c.json")]) == 0
    assert "layer4" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--size"):
        bench_conv(size="16x16", repeats=1, json_path=tmp_path / "x.json")
