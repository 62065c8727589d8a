# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 12. The GPU kernels: CUDA C through CuPy, and Numba CUDA
#
# **Paper:** §3, Eq. (3), multi-scale deformable attention, which the official code runs
# as a custom CUDA operator (one thread per output channel). For one head $m$ of query
# $q$ in image $n$, with sampling points $p_{lk}$ and attention weights $A_{lk}$,
#
# $$
# \text{out}[n, q, m, c] = \sum_{l=1}^{L} \sum_{k=1}^{K} A_{nqmlk}\;
#   \text{bilinear}\big(V_l[n, :, m, c],\; p_{nqmlk}\big), \qquad c = 0, \dots, D - 1.
# $$
#
# minidetr has two GPU versions of this op, with one design: the CUDA C kernels of
# `cupy_kernels.cu`, compiled at run time by CuPy (`RawModule`, backend `"cupy"`), and the
# same kernels written in Python with `numba.cuda.jit` (backend `"numba-cuda"`). This
# notebook
#
# 1. shows how the work is split among GPU threads, and the two sources side by side;
# 2. runs the CUDA C kernels **on the CPU**, unchanged, through a C++ harness, against
#    the NumPy reference (§3), and shows what their vector loads compile to (§4);
# 3. runs the Numba kernels under Numba's CUDA simulator, against the reference (§5);
# 4. on a GPU: checks both backends against the reference (§6), times them with CUDA
#    events (§7), and trains on a COCO subset (§8).
#
# The Numba *CPU* kernel, the one that runs on a laptop, is built up step by step from the
# reference in [notebook 17](17_cpu_kernel_walkthrough.ipynb), whose last step is the lane
# groups of §1 below. How the rest of a training step is tested without a GPU (a CuPy
# stand-in that fails where CuPy would, host-copy guards, kernel-launch counts) is the
# appendix, [notebook 18](18_appendix_gpu_code_without_a_gpu.ipynb).
#
# > **This `.ipynb` was executed on a machine without a GPU.** Every GPU cell (§6–§8)
# > checks for CuPy and a device first and, here, says so and skips; §1–§5 run on
# > any machine (§3 needs g++, §4 nvcc, each skipped with a message without it). On a machine with CuPy and a GPU,
# > `python -m minidetr.lessons.notebooks build 12` re-runs it with the GPU parts.
#
# **Doc:** [gpu-kernels.md](../docs/gpu-kernels.md) (design, tests, comparison with the
# official kernel), [gpu-training.md](../docs/gpu-training.md) (training on a GPU). **Code:**
# `minidetr/ops/msda/cupy_kernels.cu`, `cupy_backend.py`, `numba_cuda.py`,
# `cpu_harness.cpp`, `cpu_harness.py`; timing in `minidetr/bench/msda.py`.

# %%
import html
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import HTML, display

from minidetr.backend import cupy_available, why_no_cupy
from minidetr.bench import common as bench
from minidetr.bench import msda as bench_msda
from minidetr.lessons.notebooks import REPO
from minidetr.ops import msda
from minidetr.ops.msda import cpu_harness, cupy_backend, numba_cuda, reference
from minidetr.testing import assert_allclose

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
SEED = 0
GPU = cupy_available()
plt.rcParams["figure.dpi"] = 80
WORK = Path(tempfile.mkdtemp(prefix="minidetr-nb12-"))   # builds and runs; removed at the end
print(f"setting: {'tiny' if SMALL else 'full'}; seed {SEED}")
print(f"GPU: {'yes' if GPU else 'no'} ({why_no_cupy()})")
for name in ("numpy", "numba", "cupy", "numba-cuda"):
    ok, reason = msda.backend_status(name)
    print(f"  backend {name:<11} {'available' if ok else 'not available'}: {reason}")


def tolerance(dtype):
    """(rtol, atol relative to the largest |value|) against the reference: float64 agrees
    to rounding; float32 sums in another order (the test suite's tolerances)."""
    return (1e-10, 1e-10) if np.dtype(dtype) == np.float64 else (1e-5, 1e-5)


def compare_with_reference(outputs, inputs, grad_output, what):
    """Max |difference| of (output, grad_value, grad_locations, grad_weights) against the
    NumPy reference; asserts they agree within ``tolerance``."""
    host = [np.asarray(a) for a in inputs]
    expected = (reference.forward(*host), *reference.backward(grad_output, *host))
    rtol, atol = tolerance(host[0].dtype)
    errors = {}
    for name, actual, desired in zip(("output", "grad_value", "grad_locations",
                                      "grad_weights"), outputs, expected):
        scale = max(1.0, float(np.abs(desired).max()))
        assert_allclose(actual, desired, rtol, atol * scale, what=f"{what}: {name}")
        errors[name] = float(np.abs(actual - desired).max())
    print(f"{what}: max |error| " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    return errors


# %% [markdown]
# ## 1. Who computes what: one group of lanes per head
#
# Per sampling point the work is tiny and the same for every channel: locate the point
# (floor, fractions, bounds), gather four rows of $D$ channels, add them with the bilinear
# weights. The official kernel gives each *channel* its own thread, so $D = 32$ threads
# repeat the same set-up. minidetr gives each **head** $(n, q, m)$ a *group* of $G$
# consecutive threads (lanes) of a warp; lane $j$ owns the channel slices
# $[jV, jV + V) + iGV$, $i = 0, 1, \dots$, where $V$ (`VEC`) is how many scalars one load
# moves: 4 floats or 2 doubles (16 bytes) when $D$ and the alignment allow it. The host
# (`cupy_backend.plan_launch`) picks $V$ and the group size
# $G = \min\big(32, \text{next power of two} \ge \lceil D / V \rceil\big)$; the Numba
# kernels have no vector loads ($V = 1$, `numba_cuda.group_size_for`).

# %%
print(f"{'dtype':<8} {'D':>3}   cupy: VEC  G  heads/warp   numba-cuda: G")
for dtype, D in [(np.float32, 32), (np.float64, 32), (np.float32, 30), (np.float32, 64),
                 (np.float32, 71)]:
    plan = cupy_backend.plan_launch(dtype, D, (np.empty(128, dtype),))
    print(f"{np.dtype(dtype).name:<8} {D:>3}   {plan.vector_width:>9} {plan.group_size:>2} "
          f"{32 // plan.group_size:>11}   {numba_cuda.group_size_for(D):>13}")


def channel_owners(D, vector_width, group_size):
    """The lane that handles each channel: the kernels' loop
    ``for (c = lane * VEC; c < D; c += G * VEC)``, run for every lane."""
    owner = np.full(D, -1)
    for lane in range(group_size):
        for c in range(lane * vector_width, D, group_size * vector_width):
            owner[c:c + vector_width] = lane
    return owner


cases = [("cupy, float32, D = 32", 32, cupy_backend.plan_launch(np.float32, 32)),
         ("numba-cuda, D = 32", 32, None),
         ("cupy, float32, D = 71", 71, cupy_backend.plan_launch(np.float32, 71))]
owners = {}
fig, axes = plt.subplots(len(cases), 1, figsize=(11, 3.2))
for ax, (title, D, plan) in zip(axes, cases):
    vec, G = (1, numba_cuda.group_size_for(D)) if plan is None else \
        (plan.vector_width, plan.group_size)
    owners[title] = owner = channel_owners(D, vec, G)
    ax.imshow(owner[None] % 10, cmap="tab10", aspect="auto", vmin=0, vmax=9)  # colours cycle
    for c in range(D):
        ax.text(c, 0, owner[c], ha="center", va="center", fontsize=6)
    ax.set_yticks([])
    ax.set_title(f"{title}: VEC = {vec}, G = {G} lanes (numbers: the lane of each channel)",
                 fontsize=9)
axes[-1].set_xlabel("channel c of the head")
plt.tight_layout()
plt.show()

# %% [markdown]
# The group computes a point's set-up once per lane (8 times for $D = 32$ in float32
# instead of 32), reads each corner row as 8 consecutive 16-byte loads (one whole
# 128-byte cache line), and never straddles a warp, so it can add up values across its
# lanes with warp shuffles, without shared memory or barriers. That sum is needed in the
# backward pass: the gradients of a point's location and weight are dot products over
# the $D$ channels.
#
# ## 2. The two sources side by side
#
# The same three pieces in CUDA C (left) and Numba (right): the forward kernel from the
# thread index to the output row, the end of the backward kernel (reduce over the group,
# one lane writes), and the reduction itself.

# %%
KERNELS_CU = cupy_backend.KERNEL_FILE
NUMBA_PY = Path(inspect.getsourcefile(numba_cuda))


def excerpt(path, first, last):
    """(first line number, text) of ``path`` from the line containing ``first`` to the
    next line containing ``last``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if first in line)
    stop = next(i for i in range(start, len(lines)) if last in lines[i])
    return start + 1, "\n".join(lines[start:stop + 1])


PAIRS = [
    ("forward: thread -> (head, lane) -> channels -> output",
     (KERNELS_CU, "const index_t thread = static_cast<index_t>(blockIdx.x)",
      "store_vec<T, VEC>(output + head * D + c, out);"),
     (NUMBA_PY, "thread = cuda.grid(1)", "output[n, q, m * D + c] = acc")),
    ("backward: sum over the group's lanes, the first lane writes",
     (KERNELS_CU, "// Outside the branch: groups of one warp", "a * d_h_im * H;"),
     (NUMBA_PY, "# Outside the loop: groups of one warp", "a * d_h_im * real(H)")),
    ("the reduction: a tree of warp shuffles",
     (KERNELS_CU, "__device__ __forceinline__ T group_sum", "return x;"),
     (NUMBA_PY, "def _group_sum(x, group_size):", "return x")),
]
cell = "<td style='vertical-align:top; text-align:left'><pre style='font-size:10px'>{}</pre></td>"
rows = []
for title, *sides in PAIRS:
    texts = []
    for path, first, last in sides:
        line, text = excerpt(path, first, last)
        comment = "//" if path.suffix == ".cu" else "#"
        texts.append(f"{comment} {path.name}, from line {line}\n{textwrap.dedent(text)}")
    rows.append(f"<tr><th colspan=2 style='text-align:left'>{html.escape(title)}</th></tr><tr>"
                + "".join(cell.format(html.escape(text)) for text in texts) + "</tr>")
display(HTML("<table>" + "".join(rows) + "</table>"))

# %% [markdown]
# What differs: the CUDA C kernel moves `VEC` channels per load (`load_vec`, a struct of
# 4 floats aligned to 16 bytes) and indexes flat pointers with 64-bit offsets; Numba
# indexes the 4-d arrays one channel at a time (`value[n, row, m, c]`) and must type its
# constants (`zero`, `one`, `real(H)`) as the data's dtype, since Numba would compute
# float32 data in float64 with plain Python floats. The mapping, the loops and the
# gradient formulas are the same. In the backward pass `group_sum` runs *outside* the
# `if (inside)` branch: every lane of the warp must reach each shuffle, even lanes whose
# point is skipped, and even threads past the last head (they redo its work and write
# nothing).
#
# ## 3. The CUDA C kernels on the CPU
#
# `cpu_harness.cpp` defines the few CUDA built-ins the kernels use and `#include`s the
# unchanged `.cu`: `threadIdx`/`blockIdx`, `atomicAdd` (a plain add) and
# `__shfl_down_sync`, emulated exactly. The threads of a block are coroutines run one
# after the other; at a shuffle every lane of the warp waits until all have published
# their value, as a real warp would. g++ builds it into a shared library that ctypes
# calls with a `cuLaunchKernel`-style argument list. The cupy backend's own host code
# (`run_forward`, `run_backward`: the launch plan, the grid, the deterministic sort) only
# needs a `launch(name, grid, block, args)` function, so it runs unchanged on top of the
# harness. Slow (a coroutine per thread), but it is the kernels' arithmetic, checked
# without a GPU. We print every launch the host code makes:

# %%
problem_shape = dict(N=1, levels=((8, 10), (4, 5)), M=2, D=32, K=2, Lq=None) if SMALL else \
    dict(N=2, levels=((24, 32), (12, 16), (6, 8), (3, 4)), M=4, D=32, K=4, Lq=50)
print(f"problem: {problem_shape}")
harness = None
if cpu_harness.why_no_compiler():
    print(f"skipped: {cpu_harness.why_no_compiler()}, so the CUDA C cannot be built for the CPU")
else:
    start = time.perf_counter()
    harness = cpu_harness.build_harness(WORK / "harness")
    print(f"g++ built the harness with the kernels in {time.perf_counter() - start:.1f} s")


    def traced_launch(name, grid, block, args):
        print(f"  launch {name:<34} grid {grid:>4} blocks x {block} threads")
        harness.launch(name, grid, block, args)


    harness_errors = {}
    for dtype in ("float32", "float64"):
        *inputs, grad_output = bench.msda_inputs(problem_shape, dtype, seed=SEED)
        value = inputs[0]
        plan = cupy_backend.plan_launch(value.dtype, value.shape[3], (value, grad_output))
        print(f"{dtype}: plan {plan}")
        start = time.perf_counter()
        output = cupy_backend.run_forward(traced_launch, plan, *inputs)
        grads = cupy_backend.run_backward(traced_launch, plan, grad_output, *inputs)
        print(f"  ({time.perf_counter() - start:.2f} s on the CPU)")
        harness_errors[dtype] = compare_with_reference((output, *grads), inputs, grad_output,
                                                       f"CUDA C on the CPU, {dtype}")

    # grad_value without atomics: three launches, the same numbers
    print("deterministic grad_value:")
    grad_value = cupy_backend.run_backward(traced_launch, plan, grad_output, *inputs,
                                           deterministic=True)[0]
    assert_allclose(grad_value, reference.backward(grad_output, *inputs)[0], 1e-10, 1e-10,
                    what="deterministic grad_value")
    # every vector width computes each output channel in the same order: same bits
    *inputs32, _ = bench.msda_inputs(problem_shape, "float32", seed=SEED)
    by_width = {vec: harness.forward(*inputs32, vector_width=vec) for vec in (4, 2, 1)}
    assert all(np.array_equal(by_width[4], out) for out in by_width.values())
    print("float32 forward with VEC = 4, 2, 1: identical bits")

# %% [markdown]
# ## 4. What a vector load compiles to
#
# `Vec<float, 4>` is a struct declared `alignas(16)`; reading one through a pointer is
# meant to become a single 16-byte load instruction. nvcc shows it in the PTX (the GPU's
# assembly language) of `msda_forward<float, 4>`: the four corners of a point are four
# `ld.global.nc.v4.f32` (`nc`: through the read-only cache, thanks to
# `const __restrict__`), and the output is written with one `st.global.v4.f32` per lane.
# With `VEC = 1` the same kernel loads one float at a time.

# %%
def ptx_of(kernel):
    """PTX of one instantiation of cupy_kernels.cu (sm_90), or None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    source = WORK / f"{kernel.replace('<', '_').replace('>', '').replace(', ', '_')}.cu"
    source.write_text(f'#include "{KERNELS_CU}"\nvoid* kernel = (void*)&{kernel};\n')
    ptx = source.with_suffix(".ptx")
    subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "-ptx", "-o", str(ptx), str(source)],
                   check=True, capture_output=True, text=True)
    return ptx.read_text()


ptx_counts = {}
for kernel in ["msda_forward<float, 4>"] + ([] if SMALL else ["msda_forward<float, 1>",
                                                             "msda_forward<double, 2>"]):
    ptx = ptx_of(kernel)
    if ptx is None:
        print("skipped: nvcc is not installed, so the kernels cannot be compiled to PTX")
        break
    loads = [line.strip() for line in ptx.splitlines() if line.strip().startswith("ld.global")]
    stores = [line.strip() for line in ptx.splitlines() if line.strip().startswith("st.global")]
    ptx_counts[kernel] = {"loads": loads, "stores": stores}
    vector = [x for x in loads if ".v2." in x or ".v4." in x]
    print(f"{kernel}: {len(loads)} loads, {len(vector)} of them vector loads "
          f"{sorted({x.split()[0] for x in vector})}; stores {[x.split()[0] for x in stores]}")
    for line in vector[:4]:
        print("   ", line)

# %% [markdown]
# ## 5. The Numba kernels under the CUDA simulator
#
# With `NUMBA_ENABLE_CUDASIM=1` Numba runs `cuda.jit` kernels on the CPU, one Python
# thread per GPU thread. The variable is read when Numba is imported, so the simulator
# runs in a subprocess (this notebook keeps the real `numba.cuda`). The simulator has
# no warp shuffles: `numba_cuda._shfl_down` is the one function with a simulator twin
# (shared memory between two barriers); everything else is the code that runs on a GPU.
# A small problem, forward and both backward paths, against the reference. The test
# suite runs four such cases (float32 and float64, $D = 5$ and $71$):
# `tests/ops/test_msda_gpu.py::test_numba_cuda_kernels_in_simulator_match_reference`.

# %%
SIMULATOR_SCRIPT = """
import sys
sys.setswitchinterval(1e-5)      # the simulator's threads hand over the GIL sooner
import numpy as np
from minidetr.ops.msda import numba_cuda
assert numba_cuda.SIMULATOR, "NUMBA_ENABLE_CUDASIM was not seen"
a = np.load(sys.argv[1])
inputs = [a[k] for k in ("value", "shapes", "starts", "locations", "weights")]
output = numba_cuda.forward(*inputs, threads_per_block=32)
grads = numba_cuda.backward(a["grad_output"], *inputs, threads_per_block=32)
grad_value = numba_cuda.backward(a["grad_output"], *inputs, deterministic=True)[0]
np.savez(sys.argv[2], output=output, grad_value=grads[0], grad_locations=grads[1],
         grad_weights=grads[2], deterministic_grad_value=grad_value)
"""
sim_shape = dict(N=1, levels=((4, 5), (2, 3)), M=2, D=5 if SMALL else 12, K=2, Lq=3)
*sim_inputs, sim_grad = bench.msda_inputs(sim_shape, "float64", seed=SEED)
np.savez(WORK / "sim_in.npz", **dict(zip(("value", "shapes", "starts", "locations", "weights"),
                                         sim_inputs)), grad_output=sim_grad)
environment = dict(os.environ, NUMBA_ENABLE_CUDASIM="1",
                   PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
start = time.perf_counter()
run = subprocess.run([sys.executable, "-c", SIMULATOR_SCRIPT, str(WORK / "sim_in.npz"),
                      str(WORK / "sim_out.npz")], env=environment, capture_output=True,
                     text=True, timeout=120)
assert run.returncode == 0, f"the simulator run failed:\n{run.stderr[-3000:]}"
sim = np.load(WORK / "sim_out.npz")
print(f"simulator, {sim_shape}: {time.perf_counter() - start:.1f} s (subprocess included)")
simulator_errors = compare_with_reference(
    [sim[k] for k in ("output", "grad_value", "grad_locations", "grad_weights")],
    sim_inputs, sim_grad, "Numba CUDA kernels in the simulator, float64")
assert_allclose(sim["deterministic_grad_value"], sim["grad_value"], 1e-12, 1e-12,
                what="deterministic vs atomic grad_value")
assert not numba_cuda.SIMULATOR, "the simulator must stay in its subprocess"

# %% [markdown]
# ## 6. On a GPU: both backends against the reference
#
# The real thing: CuPy arrays on the device, the two GPU backends through the public
# `msda.forward` / `msda.backward`, compared with the NumPy reference on the host copies,
# in float32 and float64 (the decoder shape of the paper: $N = 2$, $L_q = 300$, four
# levels of an 800 × 1200 image, $M = 8$, $D = 32$, $K = 4$).

# %%
gpu_errors = {}
if not GPU:
    print(f"skipped: no GPU here ({why_no_cupy()}); the CUDA C kernels were checked on the "
          "CPU in §3 and the Numba kernels in the simulator in §5")
else:
    import cupy as cp

    gpu_shape = bench.SHAPES["tiny" if SMALL else "decoder"]
    for backend in ("cupy", "numba-cuda"):
        ok, reason = msda.backend_status(backend)
        if not ok:
            print(f"{backend}: skipped ({reason})")
            continue
        for dtype in ("float32", "float64"):
            *host, host_grad = bench.msda_inputs(gpu_shape, dtype, seed=SEED)
            *device, device_grad = [cp.asarray(a) for a in (*host, host_grad)]
            output = msda.forward(*device, backend=backend)
            grads = msda.backward(device_grad, *device, backend=backend)
            gpu_errors[backend, dtype] = compare_with_reference(
                [cp.asnumpy(a) for a in (output, *grads)], host, host_grad,
                f"{backend} on the GPU, {dtype}")

# %% [markdown]
# ## 7. Timing with CUDA events
#
# `minidetr.bench.msda.bench_msda` (`python -m minidetr bench msda`) times each backend: a
# warm-up call (compilation, module loading), then the median of several calls, each
# between two CUDA events recorded on the stream, so the time is the GPU's, not Python's.
# For the GPU rows it adds the memory roofline: the bytes a pass must move at least, and
# the bandwidth achieved. The timer:

# %%
print(inspect.getsource(bench.cuda_time_ms))
bench_rows = []
if not GPU:
    print(f"skipped: no GPU here ({why_no_cupy()}); nothing to time")
else:
    shapes = "tiny" if SMALL else "encoder,decoder"
    bench_rows = [row for row in bench_msda.bench_msda(
        backends="cupy,numba-cuda", shapes=shapes, repeats=3 if SMALL else 10,
        json_path=WORK / "msda.json") if "forward_ms" in row]
    labels = [f"{row['backend']}\n{row['shape']}" for row in bench_rows]
    x = np.arange(len(bench_rows))
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar(x - 0.2, [row["forward_ms"] for row in bench_rows], 0.4, label="forward")
    ax.bar(x + 0.2, [row["backward_ms"] for row in bench_rows], 0.4, label="backward")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("ms (median, CUDA events)")
    ax.legend()
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## 8. Training on a COCO subset on one GPU
#
# The whole detector on the device: `run_training(..., device="cuda")` moves the model
# and every batch to CuPy arrays; the MSDA layers then pick the `"cupy"` backend. The
# data: the 128 COCO images of `../shared/data/coco128` (when present), used as both
# training and validation split; overfitting these images is the classic check that a
# detection pipeline learns. The model: the `small` preset (ResNet-18 from scratch,
# $C = 128$, 3 + 3 layers, 100 queries) with one logit per category of the file.

# %%
COCO = REPO.parent / "shared" / "data" / "coco128"
coco_result = None
if not GPU:
    print(f"skipped: no GPU here ({why_no_cupy()}); notebook 11 trains on the CPU")
elif not (COCO / "annotations" / "instances_train2017.json").is_file():
    print(f"skipped: {COCO} is not here (it sits beside the repository in the development "
          "checkout)")
else:
    from minidetr.data import CategoryMap, load_coco_json
    from minidetr.models import get_config
    from minidetr.training import DataPaths, TrainConfig, run_training

    annotations = str(COCO / "annotations" / "instances_train2017.json")
    images = str(COCO / "images")
    categories = CategoryMap.from_coco(load_coco_json(annotations), "contiguous")
    coco_cfg = get_config("small", num_classes=categories.num_classes)
    coco_train = TrainConfig(epochs=2 if SMALL else 12, lr=2e-4, lr_backbone=2e-4,
                             lr_drop=10, batch_size=4, transforms="small",
                             label_map="contiguous", eval_every=1 if SMALL else 4,
                             max_train_images=8 if SMALL else None,
                             max_val_images=8 if SMALL else None, num_pictures=2)
    coco_steps = []
    start = time.perf_counter()
    coco_result = run_training(coco_cfg, coco_train, DataPaths(annotations, images, annotations,
                                                               images),
                               WORK / "coco-run", device="cuda", progress=False,
                               on_step=lambda epoch, step, values: coco_steps.append(values),
                               log=lambda line: print(line.replace(str(WORK), "$WORK")))
    print(f"{len(coco_steps)} steps in {time.perf_counter() - start:.0f} s on the GPU; final "
          f"metrics {coco_result.final_metrics}")
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot([s["loss"] for s in coco_steps], linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("weighted total loss")
    ax.set_title("coco128 on one GPU", fontsize=9)
    plt.tight_layout()
    plt.show()

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/12_gpu_kernels.py](solutions/12_gpu_kernels.py).
#
# 1. **Predict.** For float32 with $D = 64$, and for $D = 71$: what are `VEC`, the group size
#    $G$ and the number of heads per warp? Which lane owns channel 63? How many channels does
#    each lane take for $D = 71$? Check with `cupy_backend.plan_launch`.
# 2. **Predict.** The Numba CUDA kernels have no vector loads. What is their $G$ for
#    $D = 5, 30, 71$? Show that, for both backends' plans, the lanes' loop
#    `for (c = lane * VEC; c < D; c += G * VEC)` covers every channel exactly once.
# 3. **Break something.** Simulate the group's tree of `shfl_down` in NumPy (offsets
#    $G/2, G/4, \dots, 1$) and check that lane 0 ends with the group's sum. Then start the
#    tree at $G/4$: what does lane 0 hold now, and which gradients of the backward pass would
#    be wrong?

# %% [markdown]
# ## Checks

# %%
assert cupy_backend.plan_launch(np.float32, 32, (np.empty(128, np.float32),)).vector_width == 4
assert cupy_backend.plan_launch(np.float32, 32).group_size == 8
assert cupy_backend.plan_launch(np.float64, 32).group_size == 16
assert numba_cuda.group_size_for(32) == 32 and numba_cuda.group_size_for(5) == 8
for title, owner in owners.items():            # every channel has exactly one lane
    assert (owner >= 0).all() and owner.max() < 32, title
assert list(owners["cupy, float32, D = 32"][:8]) == [0, 0, 0, 0, 1, 1, 1, 1]
if harness is not None:
    assert set(harness_errors) == {"float32", "float64"}
    assert max(harness_errors["float64"].values()) < 1e-9, harness_errors
if ptx_counts:
    forward4 = ptx_counts["msda_forward<float, 4>"]
    assert sum("ld.global.nc.v4.f32" in x for x in forward4["loads"]) == 4, forward4
    assert sum("st.global.v4.f32" in x for x in forward4["stores"]) == 1, forward4
assert max(simulator_errors.values()) < 1e-9, simulator_errors
if GPU:            # (compare_with_reference asserted the GPU results within tolerance)
    assert {backend for backend, _ in gpu_errors} == \
        {b for b in ("cupy", "numba-cuda") if msda.backend_status(b)[0]}, gpu_errors
    assert all(r["forward_ms"] > 0 and r["backward_ms"] > 0 for r in bench_rows)
    if coco_result is not None:
        assert np.isfinite([s["loss"] for s in coco_steps]).all()
        assert set(coco_result.final_metrics) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}
shutil.rmtree(WORK)
print("all checks passed" + ("" if GPU else " (the GPU parts were skipped: no GPU)"))
