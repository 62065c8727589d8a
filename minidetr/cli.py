"""The command line: ``python -m minidetr <command> ...``.

Commands:
    demo    the main job (until the detector demo exists: the small training example)
    bench   benchmarks, e.g. ``bench msda`` (multi-scale deformable attention)
"""
from __future__ import annotations

import argparse
import sys


def _cmd_demo(args):
    from .examples import run_demo
    return run_demo(steps=args.steps, seed=args.seed, out_dir=args.out)


def _cmd_bench(args):
    from . import bench
    if args.what == "msda":
        return bench.bench_msda(backends=args.backend, repeats=args.repeats,
                                shapes=args.shapes, dtype=args.dtype, json_path=args.json)
    raise SystemExit(f"unknown benchmark {args.what!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minidetr",
                                description="Deformable DETR in NumPy/CuPy, for learning.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run the main job (training demo on built-in data)")
    d.add_argument("--steps", type=int, default=300, help="training steps")
    d.add_argument("--seed", type=int, default=0, help="random seed (printed)")
    d.add_argument("--out", default="runs/demo", help="run folder for metrics and plots")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks")
    b.add_argument("what", choices=["msda"], help="what to benchmark")
    b.add_argument("--backend", default="all",
                   help="comma-separated backends, or 'all' for every available one")
    b.add_argument("--shapes", default="encoder,decoder",
                   help="comma-separated shape presets: encoder, decoder, tiny")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    b.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    b.add_argument("--json", default=None, help="where to write the results as JSON")
    b.set_defaults(func=_cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return 0 if result is None or not isinstance(result, int) else result


if __name__ == "__main__":
    sys.exit(main())
