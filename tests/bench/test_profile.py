"""``python -m minidetr bench profile``: the breakdown of a training step by component is
complete and adds up, the profiled step is the real one, and profiling off changes nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from minidetr.autograd import Tensor, profiling
from minidetr.bench.common import synthetic_batch
from minidetr.bench.profile import (COMPONENTS, STEP_ROWS, StepProfiler, bench_profile,
                                    format_functions, format_table, profile_steps,
                                    profiled_train_step)
from minidetr.cli import main

MODEL_ROWS = [c for c in COMPONENTS if c not in STEP_ROWS and c != "autograd engine"]


@pytest.fixture(scope="module")
def tiny_profile():
    return profile_steps("tiny", "plain", batch=1, size="64x64", iterations=2, warmup=1)


def test_every_component_has_a_row_and_they_add_up(tiny_profile):
    r = tiny_profile
    rows = {row["component"]: row for row in r["rows"]}
    assert list(rows) == list(COMPONENTS), f"rows {list(rows)} != {list(COMPONENTS)}"
    # every microsecond of the profiled step lands in exactly one row
    assert r["sum_ms"] == pytest.approx(r["profiled_ms"], rel=0.02), \
        f"rows sum to {r['sum_ms']:.1f} ms but the profiled step took {r['profiled_ms']:.1f} ms"
    assert sum(row["percent"] for row in rows.values()) == pytest.approx(100, abs=0.01)
    for name, row in rows.items():
        assert row["ms"] == pytest.approx(row["forward_ms"] + row["backward_ms"]
                                          + (row["ms"] if name in STEP_ROWS else 0)), name
    for name in MODEL_ROWS:                  # the model's parts all ran, forward and backward
        assert rows[name]["forward_ms"] > 0, f"{name}: no forward time"
    for name in ("backbone", "input projection", "encoder", "encoder msda", "decoder",
                 "decoder msda", "heads", "losses"):
        assert rows[name]["backward_ms"] > 0, f"{name}: no backward time"
        assert rows[name]["calls"] > 0 and rows[name]["bytes"] > 0, name
    assert rows["matcher"]["backward_ms"] == 0      # the matching has no gradient
    assert rows["autograd engine"]["backward_ms"] > 0
    assert rows["encoder msda"]["calls"] == 2 * 2    # 2 layers, forward + backward
    assert r["calls"] == sum(row["calls"] for row in rows.values()) > 100
    assert r["plain_ms"] > 0 and len(r["plain_times_ms"]) == 2


def test_the_table_prints_every_row(tiny_profile):
    lines = format_table(tiny_profile)
    assert lines[0].startswith("| component | forward ms | backward ms | total ms")
    assert len(lines) == 2 + len(COMPONENTS) + 1 and lines[-1].startswith("| **step** |")
    assert lines[2 + COMPONENTS.index("AdamW")].startswith("| AdamW | - | - |")
    functions = {f["function"]: f for f in tiny_profile["functions"]}
    assert functions["MSDeformAttnFunction"]["backward_ms"] > 0
    assert sum(f["ms"] for f in functions.values()) < tiny_profile["sum_ms"]
    top = format_functions(tiny_profile, top=3)
    assert len(top) == 2 + 3 and top[0].startswith("| Function | forward ms")


def _setup(seed=0):
    from minidetr.models.build import build_criterion, build_model
    from minidetr.models.config import get_config
    from minidetr.optim import AdamW
    from minidetr.training import TrainConfig
    from minidetr.training.engine import build_param_groups

    cfg = get_config("tiny", "two-stage")
    recipe = TrainConfig()
    model = build_model(cfg)
    optimizer = AdamW(build_param_groups(model, recipe), lr=recipe.lr,
                      weight_decay=recipe.weight_decay)
    data = synthetic_batch(1, 64, 64, cfg.num_classes, np.random.default_rng(seed))
    return model, build_criterion(cfg), optimizer, data


def test_the_profiled_step_is_train_step_bit_for_bit():
    from minidetr.training.engine import train_step

    model_a, criterion_a, optimizer_a, data = _setup()
    model_b, criterion_b, optimizer_b, _ = _setup()
    values_a = train_step(model_a, criterion_a, optimizer_a, data)
    profiler = StepProfiler()
    with profiling(profiler), profiler.attach(model_b, criterion_b):
        values_b = profiled_train_step(model_b, criterion_b, optimizer_b, data, profiler)
    assert values_a == values_b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert np.array_equal(p.grad, q.grad), f"{name}: gradients differ"
        assert np.array_equal(p.data, q.data), f"{name}: parameters differ after AdamW"
    # attach() and profiling() are undone: no wrapper, no profiler left behind
    assert "forward" not in model_b.__dict__ and "forward" not in model_b.backbone.__dict__
    assert type(criterion_b.matcher).__name__ == "HungarianMatcher"
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    (x * 2).sum().backward()
    calls = profiler.calls.total()
    (x * 3).sum().backward()
    assert profiler.calls.total() == calls, "the profiler still sees operations"


def test_backward_is_charged_to_the_creating_scope():
    profiler = StepProfiler()
    x = Tensor(np.ones((2, 3), np.float32), requires_grad=True)
    with profiling(profiler):
        with profiler.scope("encoder"):
            y = (x * 2).sum()                       # two Functions made in "encoder"
        with profiler.scope("autograd engine", "backward"):
            y.backward()
    assert profiler.calls[("encoder", "forward")] == 2
    assert profiler.calls[("encoder", "backward")] == 2
    assert profiler.seconds[("encoder", "backward")] > 0
    assert profiler.bytes[("encoder", "forward")] == 2 * 3 * 4 + 4   # x*2 and its sum
    assert np.array_equal(x.grad, np.full((2, 3), 2, np.float32))


def test_a_profiler_watches_its_own_thread_only():
    import threading

    profiler = StepProfiler()
    x = Tensor(np.ones(3, np.float32), requires_grad=True)
    with profiling(profiler):
        worker = threading.Thread(target=lambda: (x * 2).sum().backward())
        worker.start()
        worker.join()
        assert profiler.calls.total() == 0, "another thread's Functions were counted"
        (x * 2).sum()
    assert profiler.calls.total() == 2


def test_the_cli_runs_and_checks_its_options(tmp_path, capsys):
    out = tmp_path / "profile.json"
    code = main(["bench", "profile", "--config", "tiny", "--variant", "plain", "--batch", "1",
                 "--size", "64x64", "--iterations", "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "tiny plain, batch 1 of 64x64 (HxW), cpu" in text and "| encoder msda |" in text
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "profile" and saved["machine"]["cpu_count"] >= 1
    rows = saved["results"]["plain"]["rows"]
    assert [row["component"] for row in rows] == list(COMPONENTS)
    with pytest.raises(ValueError, match="iterations"):
        bench_profile(iterations=0)
    with pytest.raises(ValueError, match="config"):
        bench_profile(config="huge")
    with pytest.raises(ValueError, match="--size"):
        bench_profile(size="16x16")
    assert main(["bench", "profile", "--config", "tiny", "--batch", "0"]) == 2


def test_the_docs_page_runs():
    """docs/profile.md: its Python example runs; its commands parse with the real CLI."""
    import re
    import shlex
    from pathlib import Path

    from minidetr.cli import build_parser

    text = (Path(__file__).resolve().parents[2] / "docs" / "profile.md").read_text("utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "docs/profile.md has no python example"
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/profile.md python block {i}", "exec"), {})
    commands = [line.split("#")[0] for block in re.findall(r"```bash\n(.*?)```", text, re.S)
                for line in block.splitlines() if line.startswith("python -m minidetr ")]
    assert commands, "docs/profile.md shows no command"
    for line in commands:
        args = build_parser().parse_args(shlex.split(line)[3:])
        assert args.what in ("profile", "train", "conv"), line
