"""Measure the torch-free ``.pth`` reader on full paper-size checkpoints (needs torch).

    python tools/measure_pth_reader.py [--variants plain refine two-stage] [--dir /tmp/x]

For each variant, the ``paper`` model's state dict (ResNet-50, 91 classes; aliased heads
sharing one storage, as in the official modules) is saved as an official checkpoint
(``{'model', 'args'}``) with ``torch.save`` in the zip and the legacy format (~160 MB
each). Each file is then read by :func:`minidetr.weights.pth.load_pth` in a fresh Python
process that never imports torch -- reporting the time, the peak resident memory above
the process's baseline (Linux: VmHWM, reset before the read) and tracemalloc's peak -- and
compared with ``torch.load(weights_only=True)``: the same keys (561 / 597 / 630) and every
array bit for bit. The files are deleted afterwards.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

# Run in a fresh process: import what load_pth needs, then read the file.
_CHILD = r"""
import json, sys, time, tracemalloc
import numpy as np
from minidetr.weights.pth import load_pth
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:         # reset the peak (VmHWM) to now
    f.write("5")
before = status("VmHWM")
tracemalloc.start()
start = time.perf_counter()
obj = load_pth(sys.argv[1])
seconds = time.perf_counter() - start
_, traced_peak = tracemalloc.get_traced_memory()
tracemalloc.stop()
peak = status("VmHWM")
assert "torch" not in sys.modules
model = obj["model"]
print(json.dumps({"seconds": seconds, "rss_baseline": before, "rss_peak": peak,
                  "traced_peak": traced_peak, "arrays": len(model),
                  "array_bytes": sum(a.nbytes for a in model.values())}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", nargs="+", default=["plain", "refine", "two-stage"])
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch
    from make_weight_fixtures import alias_of

    from minidetr.models import build_model, get_config
    from minidetr.weights.pth import load_pth

    folder = Path(args.dir or tempfile.mkdtemp(prefix="pth-measure-"))
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in args.variants:
        cfg = get_config("paper", variant)
        state = build_model(cfg).state_dict()
        tensors = {}
        for key, value in state.items():
            tensors.setdefault(alias_of(key, variant), torch.from_numpy(value.copy()))
        model = {k: tensors[alias_of(k, variant)] for k in state}
        ckpt = {"model": model, "args": argparse.Namespace(hidden_dim=256, backbone="resnet50",
                                                           with_box_refine=variant != "plain",
                                                           two_stage=variant == "two-stage")}
        for fmt in ("zip", "legacy"):
            path = folder / f"paper-{variant}-{fmt}.pth"
            torch.save(ckpt, path, _use_new_zipfile_serialization=fmt == "zip")
            child = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True,
                                   capture_output=True, text=True,
                                   env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
            stats = json.loads(child.stdout.strip().splitlines()[-1])
            with torch.serialization.safe_globals([argparse.Namespace]):
                want = torch.load(path, map_location="cpu", weights_only=True)["model"]
            got = load_pth(path)["model"]
            assert list(got) == list(want) == list(state), "keys differ"
            for key, tensor in want.items():
                ref = tensor.numpy()
                assert got[key].dtype == ref.dtype and got[key].shape == ref.shape, key
                assert got[key].tobytes() == ref.tobytes(), f"{key}: bits differ"
                assert np.array_equal(got[key], state[key]), f"{key}: not the saved values"
            size = path.stat().st_size
            row = {"file": path.name, "MB": size / 1e6, "arrays": len(got),
                   "seconds": stats["seconds"],
                   "rss_above_baseline_MB": (stats["rss_peak"] - stats["rss_baseline"]) / 1e6,
                   "tracemalloc_peak_MB": stats["traced_peak"] / 1e6,
                   "peak_over_file": (stats["rss_peak"] - stats["rss_baseline"]) / size}
            rows.append(row)
            print(json.dumps(row), flush=True)
            path.unlink()
            del want, got
    print(f"{len(rows)} files: load_pth equals torch.load bit for bit on every array "
          f"(torch {torch.__version__})")
    return rows


if __name__ == "__main__":
    main()
