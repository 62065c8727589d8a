"""The GPU benchmarks, run end to end: on :mod:`minidetr.testing.fakecupy`, or on a real GPU.

``python -m minidetr bench train --device cuda`` and ``bench msda --backend cupy`` are the
first things a (rare) GPU session runs (tools/gpu_check.sh), so a crash in their GPU-only
code (CUDA-event timing, the memory pool's peak hook, device properties, the roofline
section) would waste it. Here they run at the smallest sizes through the command line:

* on the fake CuPy (NumPy underneath, with CuPy's memory pool, hooks, events and device
  queries imitated), everywhere, and where a GPU is present also on the real CuPy
  ("cupy" cases, marked ``gpu``; the ``device_cupy`` fixture of conftest.py);
* the fake's timing and memory APIs that the benchmarks rely on are checked first, with
  properties that real CuPy has too, so the same checks run on both.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

from minidetr.bench.common import CupyMemory
from minidetr.bench.msda_gpu import GPU_BACKENDS, device_bandwidth, floor_bytes, touched_value_rows
from minidetr.cli import main
from minidetr.models.build import build_model
from minidetr.models.config import VARIANTS, get_config
from minidetr.testing import fakecupy

POOL_UNIT = 512          # CuPy's pool rounds each allocation up to a multiple of this


@pytest.fixture
def cp(device_cupy):
    """The CuPy the benchmarks run on: minidetr.testing.fakecupy, and the real one with a GPU."""
    return device_cupy


def pool_round(nbytes):
    return -(-nbytes // POOL_UNIT) * POOL_UNIT


# =========================================================================== the APIs
def test_cuda_events_time_what_happens_between_them(cp):
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    time.sleep(0.02)                     # the host waits; an idle GPU stamps at once
    end.record()
    end.synchronize()
    assert 19 <= cp.cuda.get_elapsed_time(start, end) < 2000          # milliseconds
    with pytest.raises(RuntimeError):    # cudaErrorInvalidResourceHandle
        cp.cuda.get_elapsed_time(cp.cuda.Event(), end)                 # never recorded
    untimed = cp.cuda.Event(disable_timing=True)
    untimed.record()
    with pytest.raises(RuntimeError):
        cp.cuda.get_elapsed_time(start, untimed)


def test_the_memory_pool_counts_live_arrays_in_rounded_blocks(cp):
    pool = cp.get_default_memory_pool()
    start = pool.used_bytes()
    a = cp.zeros(1000, dtype=np.float32)                     # 4000 bytes (zeros: a * 2 below)
    assert pool.used_bytes() - start == pool_round(4000) == 4096
    view = a.reshape(10, 100)[::2].T                         # views hold no block
    assert pool.used_bytes() - start == 4096
    b = a * 2                                                # a new array holds one
    assert pool.used_bytes() - start == 2 * 4096
    del a                                                    # its view keeps it alive
    assert pool.used_bytes() - start == 2 * 4096
    del view, b
    assert pool.used_bytes() == start
    assert pool.free_bytes() == pool.total_bytes() - pool.used_bytes() >= 2 * 4096
    pool.free_all_blocks()
    free, total = cp.cuda.runtime.memGetInfo()
    assert 0 < free <= total


def test_the_benchmark_peak_hook_follows_allocations_and_releases(cp):
    """CupyMemory.peak_of_one (bench train's 'peak'): the most bytes in use at once."""
    memory = CupyMemory()
    start = memory.in_use()

    def step():
        a = cp.empty(1000, dtype=np.float32)                 # 4000 B -> 4096 in use
        b = cp.empty(100, dtype=np.float64)                  # 800 B -> 1024: the peak
        del a
        c = cp.empty(256, dtype=np.float32)                  # 1024 B, after a's release
        del b, c

    assert memory.peak_of_one(step) == start + 4096 + 1024
    assert memory.in_use() == start
    assert not cp.cuda.memory_hook.get_memory_hooks()        # unregistered afterwards


def test_the_peak_bandwidth_comes_from_the_device_attributes(cp, monkeypatch):
    clock = cp.cuda.runtime.deviceGetAttribute(36, 0)        # cudaDevAttrMemoryClockRate
    bus = cp.cuda.runtime.deviceGetAttribute(37, 0)          # ...GlobalMemoryBusWidth
    name, peak = device_bandwidth()
    assert name and peak == 2 * clock * 1e3 * bus / 8 > 100e9    # any GPU: > 100 GB/s
    # CUDA 12 builds of CuPy report the two fields in getDeviceProperties, and CUDA 13
    # ones do not: where they are there, they are used.
    monkeypatch.setattr(cp.cuda.runtime, "getDeviceProperties",
                        lambda device: {"name": b"GPU", "memoryClockRate": 1_000_000,
                                        "memoryBusWidth": 1024})
    assert device_bandwidth() == ("GPU", 2 * 1e9 * 1024 / 8)


def test_the_fake_device_describes_itself_as_cuda_13_cupy_does():
    with fakecupy.installed() as fake:
        runtime = fake.cuda.runtime
        props = runtime.getDeviceProperties(0)
        assert props["name"] == b"fakecupy (NumPy on the CPU)"
        assert "memoryClockRate" not in props                # removed in CUDA 13
        assert (props["major"], props["minor"]) == (9, 0)
        assert fake.cuda.Device().attributes["MemoryClockRate"] == \
            runtime.deviceGetAttribute(runtime.cudaDevAttrMemoryClockRate, 0) == 2_619_000
        with pytest.raises(NotImplementedError, match="attribute 999"):
            runtime.deviceGetAttribute(999, 0)
        with pytest.raises(RuntimeError, match="cudaErrorInvalidDevice"):
            runtime.getDeviceProperties(1)
        from cupy.cuda import memory_hook  # importable, as CuPy's
        assert memory_hook.MemoryHook is fake.cuda.MemoryHook


# =========================================================================== bench train
def test_bench_train_on_the_gpu(cp, tmp_path, capsys):
    out = tmp_path / "train.json"
    code = main(["bench", "train", "--config", "tiny", "--device", "cuda", "--size", "64x64",
                 "--iterations", "2", "--warmup", "1", "--no-hf", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "batch 2 of 64x64 (HxW), cuda" in text and "peak MiB" in text
    assert "memory: GPU: peak = most bytes in use in CuPy's pool" in text
    saved = json.loads(out.read_text())
    assert saved["machine"]["gpu"] and saved["machine"]["cupy"] == cp.__version__
    rows = saved["results"]
    assert [(r["framework"], r["variant"]) for r in rows] == [("minidetr", v)
                                                              for v in VARIANTS]
    for r in rows:
        assert (r["device"], r["batch"], r["height"], r["width"]) == ("cuda", 2, 64, 64)
        assert len(r["times_ms"]) == 2 and r["ms_median"] > 0
        assert r["images_per_s"] == pytest.approx(2 / (r["ms_median"] / 1e3))
        # The step holds at least the weights, and the gradients and both AdamW moments
        # of the trainable ones (float32, each array rounded up to a pool block).
        model = build_model(get_config("tiny", r["variant"]))
        held = sum(pool_round(p.data.nbytes) * (4 if p.requires_grad else 1)
                   for p in model.parameters())
        assert held < r["peak_bytes"] <= r["reserved_bytes"] <= r["device_total_bytes"], r
        assert r["growth_bytes"] == 0, r     # the moments exist after the warm-up step


# =========================================================================== bench msda
def test_bench_msda_on_the_gpu_with_the_roofline(cp, tmp_path, capsys):
    from minidetr.bench.common import SHAPES, msda_inputs

    out = tmp_path / "msda.json"
    code = main(["bench", "msda", "--backend", "cupy,numba-cuda", "--shapes", "tiny",
                 "--repeats", "2", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())["results"]
    assert "cupy" in [r["backend"] for r in rows]
    if "numba-cuda" not in [r["backend"] for r in rows]:     # the fake: no Numba CUDA
        assert "numba-cuda: skipped (" in text
    name, peak = device_bandwidth()
    assert f"GPU {name}: peak memory bandwidth {peak / 1e9:.0f} GB/s" in text

    _, shapes, starts, locations = msda_inputs(SHAPES["tiny"])[:4]
    touched = touched_value_rows(cp, shapes, starts, cp.asarray(locations))
    for r in [r for r in rows if r["backend"] in GPU_BACKENDS]:
        assert (r["shape"], r["dtype"], r["runs"]) == ("tiny", "float32", 2)
        assert r["peak_gbps"] == pytest.approx(peak / 1e9)
        sizes = {k: r[k] for k in ("N", "S", "M", "D", "Lq", "L", "K")}
        assert sizes == dict(N=1, S=400, M=2, D=32, Lq=400, L=2, K=2)
        for pass_name, floor in floor_bytes(sizes, touched, 4).items():
            seconds = r[f"{pass_name}_ms"] / 1e3
            assert seconds > 0
            assert r[f"floor_{pass_name}_bytes"] == floor
            assert r[f"floor_{pass_name}_ms"] == pytest.approx(1e3 * floor / peak)
            assert r[f"{pass_name}_gbps"] == pytest.approx(floor / seconds / 1e9)
            assert r[f"{pass_name}_fraction_of_peak"] == pytest.approx(floor / seconds / peak)
        assert f"{r['backend']:18} tiny     forward" in text


def test_bench_msda_says_so_when_no_requested_backend_can_run(cp, tmp_path, capsys):
    from minidetr.ops import msda

    available, _ = msda.backend_status("numba-cuda")
    if available:
        pytest.skip("Numba CUDA works here: its skip path is not taken")
    out = tmp_path / "msda.json"
    assert main(["bench", "msda", "--backend", "numba-cuda", "--shapes", "tiny",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "numba-cuda: skipped (" in text and "nothing to time" in text
    assert "peak memory bandwidth" not in text               # no roofline section
    assert json.loads(out.read_text())["results"] == []
