#!/usr/bin/env bash
# Everything minidetr checks and measures on a GPU, in one go (about 10 minutes on a
# recent GPU, plus the optional COCO-subset run).
#
#   bash tools/gpu_check.sh OUT_DIR [COCO_ANN_JSON COCO_IMAGE_DIR [MINUTES]]
#
# Run it from the repository root with a Python that has minidetr's dependencies, CuPy
# (pip install -e .[gpu,dev]) and a visible CUDA GPU; PYTHON=... picks the interpreter
# (default: .venv/bin/python if present, else python3). With torch and transformers
# installed, the benchmarks also time PyTorch's grid_sample formulation and transformers'
# DeformableDetrForObjectDetection on the same GPU. It writes into OUT_DIR:
#
#   env.txt              GPU, driver, CuPy / Numba / torch versions
#   tests.log            every GPU test (pytest -m gpu): kernels vs the NumPy reference,
#                        float64 gradchecks on the device, the transfer guard, ...
#   bench_msda.txt/json  deformable attention: CuPy and Numba CUDA kernels, roofline, grid_sample
#   bench_train_*.txt    training iterations of small and paper (plain/refine/two-stage)
#   coco/                with a COCO set: `train --config small --time-limit MINUTES` run
#                        folder (metrics.jsonl, loss.png, ap.png, predictions/)
#
# Each step's exit status is recorded in OUT_DIR/status.txt; a failing step does not stop
# the ones after it (the script exits non-zero at the end if any step failed).
set -u
out=${1:?usage: bash tools/gpu_check.sh OUT_DIR [COCO_ANN_JSON COCO_IMAGE_DIR [MINUTES]]}
ann=${2:-}
images=${3:-}
minutes=${4:-20}
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1
mkdir -p "$out"
: > "$out/status.txt"
failed=0

step() {    # step NAME LOGFILE COMMAND...: run, tee the output, record the exit status
    local name=$1 log=$2
    shift 2
    echo "=== $name: $*"
    local start=$SECONDS
    "$@" 2>&1 | tee "$out/$log"
    local rc=${PIPESTATUS[0]}
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$out/status.txt"
    [ "$rc" -eq 0 ] || failed=1
}

step env env.txt "$PYTHON" - <<'EOF'
import platform, subprocess
print("python", platform.python_version())
print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
from minidetr.backend import cupy_available, why_no_cupy
print("cupy usable:", cupy_available(), "-", why_no_cupy())
for name in ("numpy", "cupy", "numba", "torch", "transformers"):
    try:
        module = __import__(name)
        print(name, module.__version__)
    except Exception as e:
        print(name, "not available:", type(e).__name__)
EOF
step tests tests.log "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests
step bench-msda bench_msda.txt "$PYTHON" -m minidetr bench msda --backend all \
    --json "$out/bench_msda.json"
for config in small paper; do
    step "bench-train-$config" "bench_train_$config.txt" "$PYTHON" -m minidetr bench train \
        --config "$config" --device cuda --json "$out/bench_train_$config.json"
done
if [ -n "$ann" ]; then
    step coco coco.log "$PYTHON" -m minidetr train --device cuda --config small \
        --data "$ann" "$images" --val-data "$ann" "$images" --epochs 1000 --lr-drop 1000 \
        --time-limit "$minutes" --eval-every 5 --no-progress --out "$out/coco" --overwrite
fi
echo "=== summary"
cat "$out/status.txt"
exit $failed
