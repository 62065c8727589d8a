"""The command line: ``python -m minidetr <command> ...`` (``--help`` on any command).

Commands:
    demo                the main job: shapes data -> train the tiny model -> COCO metrics
    train               train (or ``--resume``) on the shapes data or any COCO-format set
    eval                COCO box AP of a checkpoint on a COCO-format set
    predict             draw a checkpoint's detections on images (PNG) and print them
    subset              carve a small COCO subset (json, optionally images) out of a full one
    bench               benchmarks: ``bench msda`` (multi-scale deformable attention),
                        ``bench train`` (training iterations, and transformers' if installed),
                        ``bench launches`` (GPU kernel launches per training step, counted
                        on the CPU by minidetr.testing.fakecupy), ``bench profile``
                        (where a CPU training step's time goes, by component), ``bench
                        conv`` (a ResNet's 3x3 convolutions, im2col against Winograd)
    convert-checkpoint  released weights (``.pth``, ``.safetensors``) -> a minidetr ``.npz``
                        (no torch needed)
    check-reference     a converted checkpoint vs the published reference outputs

Common options: ``--device cpu|cuda|auto``, ``--config tiny|small|paper``,
``--variant plain|refine|two-stage``, ``--data``, ``--out``, ``--epochs``, ``--resume``,
``--overwrite``. Errors in the input (missing files, a checkpoint of another model, a
folder that would be overwritten) end with a one-paragraph message and exit status 2; a
non-finite loss, a full or read-only disk, or any other failure of a training run with
status 1 (a run that fails after its first step saves a checkpoint first, and says so);
Ctrl-C during training saves a checkpoint and exits with 130, SIGTERM with 143.
"""
from __future__ import annotations

import argparse
import signal
import sys
import warnings
from pathlib import Path

# CPU threads (BLAS one thread per call, Numba's OpenMP workers passive) are set in
# minidetr/__init__.py, which runs before this module and before NumPy is imported.

from .backend import DeviceError
from .data import DatasetError
from .files import DiskWriteError, write_json
from .models.config import PRESETS as MODEL_PRESETS
from .models.config import VARIANTS
from .training.engine import NonFiniteLossError
from .training.run_dir import RunError
from .weights.checkpoint import CheckpointError

CONFIGS = tuple(MODEL_PRESETS)            # tiny, small, paper
VARIANT_NAMES = tuple(VARIANTS)           # plain, refine, two-stage
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class UsageError(ValueError):
    """Bad command-line input; the message says what to change."""


# --------------------------------------------------------------------------- helpers
def _folder_splits(folder):
    """The four paths of a dataset folder in the shapes layout (checked to exist)."""
    root = Path(folder)
    paths = (root / "annotations" / "instances_train.json", root / "train",
             root / "annotations" / "instances_val.json", root / "val")
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise UsageError(f"--data {root}: a single value must be a folder with "
                         "annotations/instances_{train,val}.json and train/, val/ image folders "
                         f"(the shapes layout); missing {missing}. Otherwise pass --data "
                         "ANN_JSON IMAGE_DIR")
    return tuple(str(p) for p in paths)


def _data_paths(values, val_values=None):
    """``--data DIR`` (shapes layout) or ``--data ANN_JSON IMAGE_DIR --val-data ...``."""
    from .training import DataPaths

    if len(values) == 1:
        train_ann, train_images, val_ann, val_images = _folder_splits(values[0])
    elif len(values) == 2:
        (train_ann, train_images), val_ann, val_images = values, None, None
    else:
        raise UsageError(f"--data takes a dataset folder, or ANN_JSON IMAGE_DIR; got "
                         f"{len(values)} values")
    if val_values is not None:
        val_ann, val_images = val_values
    if val_ann is None:
        print("no --val-data: the training images are also the validation split, so the AP "
              "measures how well the model fits them, not how it does on new images (pass "
              "--val-data ANN_JSON IMAGE_DIR for a held-out split)")
        val_ann, val_images = train_ann, train_images
    return DataPaths(train_ann, train_images, val_ann, val_images)


def _eval_split(values):
    """``--data`` of eval: a folder (its val split) or ANN_JSON IMAGE_DIR."""
    if len(values) == 1:
        return _folder_splits(values[0])[2:]
    if len(values) == 2:
        return values[0], values[1]
    raise UsageError(f"--data takes a dataset folder, or ANN_JSON IMAGE_DIR; got {len(values)} "
                     "values")


def _resume_dir(args):
    """The run folder of ``--resume [RUN_DIR]`` (bare ``--resume`` means ``--out``)."""
    if args.resume is True:
        return Path(args.out)
    if args.out is not None and args.out_given and Path(args.out) != Path(args.resume):
        raise UsageError(f"--resume {args.resume} continues in its own folder; drop --out "
                         f"{args.out} (or pass the same folder)")
    return Path(args.resume)


def _absolute(path):
    """``path`` as an absolute path string (None stays None): run files must not depend on
    the folder the command was started in."""
    return None if path is None else str(Path(path).resolve())


def _print_metrics(metrics, title):
    """The six COCO metrics, one a line, with what a -1 means when one is there."""
    from .training.evaluation import METRIC_NAMES, MINUS_ONE_NOTE

    print(title)
    for name in METRIC_NAMES:
        if name in metrics:
            print(f"  {name:5s} {metrics[name]:.4f}")
    if any(metrics.get(name) == -1 for name in METRIC_NAMES):
        print(f"  ({MINUS_ONE_NOTE})")


def _load_detector(args):
    """The :class:`~minidetr.inference.Detector` of ``args.checkpoint`` (``--config``,
    ``--variant`` and ``--device`` as given)."""
    from .inference import Detector

    return Detector.from_checkpoint(args.checkpoint, config=args.config, variant=args.variant,
                                    device=args.device, max_size=getattr(args, "max_size", None))


def _image_files(inputs):
    files = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise UsageError(f"{p}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this "
                                 "folder")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise UsageError(f"image not found: {p}")
    return files


# --------------------------------------------------------------------------- commands
def _cmd_demo(args):
    from .training.demo import run_demo, scaled_resolution

    out = args.out or ("runs/demo-quick" if args.quick else "runs/demo")
    if args.resume not in (None, True) and Path(args.resume) != Path(out):
        out = args.resume
    overrides = {}
    if args.lr is not None:
        overrides.update(lr=args.lr, lr_backbone=args.lr)
    if args.train_images is not None:
        overrides["max_train_images"] = args.train_images
    if args.val_images is not None:
        overrides["max_val_images"] = args.val_images
    if args.size is not None:
        overrides.update(scaled_resolution(args.size))
    final = run_demo(out, quick=args.quick, data_dir=args.data_dir, variant=args.variant,
                     epochs=args.epochs, device=args.device, overwrite=args.overwrite,
                     resume=args.resume is not None, progress=not args.no_progress,
                     train_overrides=overrides)
    return 0 if final else 130


def _cmd_train(args):
    from .data import CategoryMap, generate_shapes_dataset, load_coco_json
    from .models.config import get_config
    from .training import DataPaths, TrainConfig, resume_training, run_training
    from .training.demo import DEMO

    progress = not args.no_progress
    if args.resume is not None and (args.backbone_weights or args.init_from):
        raise UsageError("--backbone-weights and --init-from start a new run; a resumed run "
                         "continues from its own last.npz")
    if args.resume is not None:
        data = _data_paths(args.data, args.val_data) if args.data else None
        result = resume_training(_resume_dir(args), epochs=args.epochs, data=data,
                                 device=args.device, progress=progress,
                                 debug_transfers=args.debug_transfers,
                                 time_limit=("keep" if args.time_limit is None
                                             else args.time_limit),
                                 check_images=args.check_images)
    else:
        if args.data:
            data = _data_paths(args.data, args.val_data)
        else:
            print(f"no --data: using the built-in shapes dataset in {DEMO.data_dir}")
            data = DataPaths.from_shapes(generate_shapes_dataset(
                DEMO.data_dir, DEMO.num_train, DEMO.num_val, (DEMO.image_size,) * 2,
                progress=progress))
        train_json = load_coco_json(data.train_annotations)
        categories = CategoryMap.from_coco(train_json, args.label_map)
        queries = {} if args.num_queries is None else {"num_queries": args.num_queries}
        if args.init_from and args.config is None:
            model_cfg = _fine_tune_config(args, categories.num_classes, queries)
        else:
            args.config = args.config or "tiny"
            model_cfg = get_config(args.config, args.variant or "plain",
                                   num_classes=categories.num_classes, seed=args.seed,
                                   **queries)
        _warn_about_crowded_images(train_json, data.train_annotations, model_cfg.num_queries)
        rec = _recipe_of(args)
        train_cfg = TrainConfig(
            epochs=rec["epochs"], lr=rec["lr"], lr_backbone=rec["lr_backbone"],
            weight_decay=rec["weight_decay"], clip_max_norm=rec["clip_max_norm"],
            lr_drop=rec["lr_drop"], batch_size=rec["batch_size"], num_workers=args.num_workers,
            picture_threshold=args.picture_threshold,
            seed=args.seed, transforms=args.transforms or args.config,
            max_size=args.max_size, label_map=args.label_map,
            max_train_images=args.max_train_images, max_val_images=args.max_val_images,
            eval_every=args.eval_every, time_limit=args.time_limit,
            backbone_weights=_absolute(args.backbone_weights),
            init_from=_absolute(args.init_from))
        result = run_training(model_cfg, train_cfg, data, args.out, device=args.device,
                              overwrite=args.overwrite, progress=progress,
                              debug_transfers=args.debug_transfers,
                              check_images=args.check_images)
    if result.interrupted:                       # 130 after Ctrl-C, 143 after SIGTERM
        return 128 + int(result.signal or signal.SIGINT)
    _print_metrics(result.final_metrics, f"final COCO metrics ({result.run_dir}):")
    return 0


def _fine_tune_config(args, num_classes, queries):
    """``train --init-from FILE`` without ``--config``: the model of the checkpoint, with
    the data's number of classes; the recipe and augmentation of the preset with its
    backbone (tiny: tiny; ResNet-18: small; ResNet-34/50: paper)."""
    from .weights.pretrained import detector_config

    cfg = detector_config(args.init_from)
    if args.variant is not None and args.variant != cfg.variant:
        raise UsageError(f"--init-from {args.init_from} holds a {cfg.variant} model, not "
                         f"{args.variant}; drop --variant (or pass --config to build another "
                         "model and load what fits)")
    args.config = {"tiny": "tiny", "resnet18": "small"}.get(cfg.backbone, "paper")
    print(f"--init-from {args.init_from}: building its model ({cfg.backbone}, d_model "
          f"{cfg.d_model}, {cfg.variant}, {cfg.num_classes} classes -> {num_classes}); "
          f"recipe of --config {args.config}")
    return cfg.replace(num_classes=num_classes, seed=args.seed, **queries)


def _recipe_of(args) -> dict:
    """The recipe of ``--config`` (training/config.py ``RECIPES``) with the options given;
    printed, so that the run says which numbers it uses."""
    from .training.config import recipe

    rec = recipe(args.config)
    given = {name: getattr(args, name) for name in rec if getattr(args, name) is not None}
    rec.update(given)
    print(f"recipe of --config {args.config}: " + ", ".join(
        f"{name.replace('_', '-')} {_number(value)}" + (" (given)" if name in given else "")
        for name, value in rec.items()))
    return rec


def _warn_about_crowded_images(coco_json, where, num_queries):
    """A warning when some images hold more objects than the model has queries (it can
    detect at most ``num_queries`` objects per image)."""
    from collections import Counter

    counts = Counter(a["image_id"] for a in coco_json["annotations"] if not a.get("iscrowd"))
    crowded = sorted((n, i) for i, n in counts.items() if n > num_queries)
    if crowded:
        most, image_id = crowded[-1]
        print(f"warning: {len(crowded)} images of {where} hold more objects than the model's "
              f"{num_queries} queries (up to {most}, image id {image_id}); it can find at most "
              f"{num_queries} per image; pass --num-queries {max(most, num_queries)} or more")


def _logged_ap(ckpt):
    """(epoch, AP) that training logged for checkpoint ``ckpt``, or None."""
    progress = ckpt.progress or {}
    if progress.get("step"):                     # saved mid-epoch: that epoch was not evaluated
        return None
    for record in progress.get("history") or []:
        if record.get("epoch") == progress.get("epoch") and "AP" in record:
            return int(record["epoch"]), float(record["AP"])
    return None


def _cmd_eval(args):
    from .data import CocoDetection, DataLoader, FirstImages
    from .models.build import build_criterion
    from .training.config import locate_data
    from .training.engine import evaluate
    from .training.evaluation import CocoEvaluator, write_coco_results

    if args.checkpoint is None:
        # ``eval --data DIR CHECKPOINT``: the greedy --data took the checkpoint too
        if args.data and len(args.data) > 1:
            args.checkpoint = args.data.pop()
        else:
            raise UsageError("eval needs a checkpoint: python -m minidetr eval CHECKPOINT "
                             "[--data ...]")
    for path in (args.json, args.save_detections):
        if path and Path(path).exists() and not args.overwrite:
            raise UsageError(f"{path} already exists; pass --overwrite to replace it")
    m = _load_detector(args)
    recorded = m.checkpoint.train_config or {}
    if args.data:
        ann_file, image_dir = _eval_split(args.data)
    elif m.checkpoint.extra and "data" in m.checkpoint.extra:
        found = locate_data(m.checkpoint.extra, Path(m.checkpoint.path).parent, "val")
        ann_file, image_dir = found.val_annotations, found.val_images
    else:
        raise UsageError(f"{m.checkpoint.path} does not record its validation data; pass "
                         "--data")
    dataset = CocoDetection(image_dir, ann_file, transforms=m.transforms,
                            label_map=m.category_map or "raw")
    if dataset.category_map.num_classes > m.config.num_classes:
        raise UsageError(f"{ann_file} needs {dataset.category_map.num_classes} class logits, "
                         f"the model has {m.config.num_classes}")
    # by default the images, batches and order of the evaluation during training
    max_images = args.max_images
    as_in_training = not args.data and max_images is None
    if as_in_training:
        max_images = recorded.get("max_val_images")
    if max_images is not None:
        dataset = FirstImages(dataset, max_images)
    batch_size = args.batch_size or recorded.get("batch_size") or 4
    loader = DataLoader(dataset, batch_size, num_workers=args.num_workers)
    how = " (as in training)" if args.batch_size is None and recorded.get("batch_size") else ""
    print(f"evaluating {m.checkpoint.path} on {len(dataset)} images of {ann_file}, batches of "
          f"{batch_size}{how} ({m.device})")
    if not m.config.mask_aware_norm and batch_size > 1:
        print("note: this model normalises over the padding of a batch (the official input "
              "projections), so its AP depends a little on --batch-size; the batch size of "
              "its training reproduces the logged AP (docs/training.md)")
    evaluator = CocoEvaluator(dataset.coco, dataset.category_map)
    metrics = evaluate(m.model, build_criterion(m.config), m.postprocess,
                       loader.iter_epoch(0), dataset.coco, dataset.category_map,
                       num_steps=len(loader), device=m.device,
                       progress=not args.no_progress, verbose=True, evaluator=evaluator)
    _print_metrics(metrics, "COCO box metrics:")
    logged = _logged_ap(m.checkpoint)
    if logged is not None and as_in_training:
        epoch, ap = logged
        same = abs(ap - metrics["AP"]) <= 1e-6
        print(f"AP logged by training after epoch {epoch}: {ap:.4f} "
              + ("(reproduced)" if same else f"(differs by {metrics['AP'] - ap:+.4f})"))
    if args.json:
        write_json(args.json, metrics)
        print(f"wrote {args.json}")
    if args.save_detections:
        write_coco_results(args.save_detections, evaluator.results)
        print(f"wrote {len(evaluator.results)} detections of {len(set(evaluator.image_ids))} "
              f"images to {args.save_detections} (COCO results format)")
    return 0


def _image_ids(files, ann_file):
    """COCO image ids of ``files`` for ``predict --json``: from ``ann_file`` (matched by file
    name), else the file names when all are numbers (COCO's ``000000039769.jpg``), else
    1..N in order (then each result also carries its ``file_name``)."""
    from .data import load_coco_json

    if ann_file is not None:
        by_name = {Path(im["file_name"]).name: im["id"]
                   for im in load_coco_json(ann_file)["images"]}
        unknown = [f.name for f in files if f.name not in by_name]
        if unknown:
            print(f"warning: {len(unknown)} images are not in --ann {ann_file} (e.g. "
                  f"{unknown[0]}): they are drawn, but have no image id for --json",
                  file=sys.stderr)
        return {f: by_name[f.name] for f in files if f.name in by_name}, False
    if all(f.stem.isdigit() for f in files):
        return {f: int(f.stem) for f in files}, False
    return {f: i + 1 for i, f in enumerate(files)}, True


def _cmd_predict(args):
    from tqdm import tqdm

    from .training.evaluation import write_coco_results
    from .training.plots import draw_detections

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    files = _image_files(args.images)
    outs = [Path(args.out) / f"{f.stem}.{args.format}" for f in files]
    if len(set(outs)) != len(outs):
        raise UsageError("two input images have the same file name stem; predict them into "
                         "separate --out folders")
    clashes = [str(p) for p in outs if p.exists()]
    if args.json and Path(args.json).exists():
        clashes.append(args.json)
    if clashes and not args.overwrite:
        raise UsageError(f"{len(clashes)} output files already exist (e.g. {clashes[0]}); pass "
                         "--overwrite to replace them, or another --out")
    image_ids, numbered = _image_ids(files, args.ann) if args.json else ({}, False)
    detector = _load_detector(args)
    print(f"{detector}: {len(files)} images, batches of {args.batch_size}, score >= "
          f"{args.threshold}")
    results, skipped, done = [], [], 0
    bar = tqdm(total=len(files), desc="predict", unit="image", disable=args.no_progress,
               dynamic_ncols=True)
    try:
        for start in range(0, len(files), args.batch_size):
            chunk, images = [], []
            for path, out in zip(files[start:start + args.batch_size],
                                 outs[start:start + args.batch_size]):
                try:
                    images.append(detector.load_image(path))
                    chunk.append((path, out))
                except DatasetError as e:               # one line, then the next image
                    skipped.append(path)
                    bar.write(f"skipped: {e}", file=sys.stderr)
            raws = detector.predict_batch(images) if images else []
            for (path, out), image, raw in zip(chunk, images, raws):
                found = detector.detections(raw, (image.height, image.width), args.threshold,
                                            str(path))
                draw_detections(image, {"scores": found.scores, "labels": found.labels,
                                        "boxes": found.boxes}, detector.class_name, out,
                                score_threshold=args.threshold,
                                title=f"{path.name}: score >= {args.threshold}")
                lines = [f"{path}: {len(found)} detections -> {out}"] + [
                    f"  {name} {score:.2f} [{', '.join(f'{v:.0f}' for v in box)}]"
                    for name, score, box in zip(found.names, found.scores, found.boxes)]
                bar.write("\n".join(lines))
                if args.json and path in image_ids:
                    extra = {"file_name": path.name} if numbered else {}
                    results.extend({**r, **extra} for r in found.to_coco(image_ids[path]))
                done += 1
            bar.update(len(chunk) + len(files[start:start + args.batch_size]) - len(chunk))
    finally:
        bar.close()
    if args.json:
        write_coco_results(args.json, results)
        print(f"wrote {len(results)} detections to {args.json} (COCO results format"
              + (", image ids 1..N in the order above" if numbered else "") + ")")
    summary = f"predict: {done} of {len(files)} images done -> {args.out}"
    if skipped:
        print(f"{summary}; {len(skipped)} skipped (unreadable, see above): "
              + ", ".join(str(p) for p in skipped[:5]) + (", ..." if len(skipped) > 5 else ""),
              file=sys.stderr)
        return 2
    print(summary)
    return 0


def _cmd_check_reference(args):
    from .data import load_rgb_image
    from .weights.reference_outputs import check_reference_outputs

    m = _load_detector(args)
    variant = m.config.variant
    if m.config.num_classes != 91 or m.config.backbone != "resnet50":
        raise UsageError(f"{m.checkpoint.path}: the reference outputs belong to the released "
                         f"R50 checkpoints (paper preset, 91 classes); this checkpoint is "
                         f"{m.config.backbone} with {m.config.num_classes} classes")
    ok, lines = check_reference_outputs(m.model, load_rgb_image(args.image), variant, m.device)
    print(f"{m.checkpoint.path} ({variant}) on {args.image}:")
    for line in lines:
        print("  " + line)
    print("all values within 1e-4 of the reference" if ok else
          "MISMATCH: see the values marked above")
    return 0 if ok else 1


def _cmd_subset(args):
    from .data import make_subset

    categories = None
    if args.categories:
        categories = [int(c) if c.strip().isdigit() else c.strip()
                      for c in args.categories.split(",") if c.strip()]
    summary = make_subset(args.ann_file, args.out_json, categories=categories,
                          num_images=args.num_images, seed=args.seed, image_dir=args.image_dir,
                          copy_images_to=args.copy_images_to, overwrite=args.overwrite)
    print(f"wrote {summary['out_json']}: {summary['num_images']} images, "
          f"{summary['num_annotations']} annotations, categories "
          f"{', '.join(summary['category_names'])}"
          + (f"; images in {summary['images_dir']}" if summary["images_dir"] else ""))
    return 0


def _cmd_bench(args):
    if args.what == "msda":
        from .bench.msda import bench_msda
        return bench_msda(backends=args.backend, repeats=args.repeats, shapes=args.shapes,
                          dtype=args.dtype, json_path=args.json)
    if args.what == "launches":
        from .bench.launches import bench_launches
        bench_launches(config=args.config, variants=args.variant,
                       batch=2 if args.batch is None else args.batch, size=args.size,
                       json_path=args.json)
        return 0
    if args.what == "profile":
        from .bench.profile import bench_profile
        bench_profile(config=args.config, variants=args.variant, batch=args.batch,
                      size=args.size, iterations=args.iterations, warmup=args.warmup,
                      json_path=args.json)
        return 0
    if args.what == "conv":
        from .bench.conv import bench_conv
        bench_conv(batch=2 if args.batch is None else args.batch, size=args.size,
                   repeats=args.repeats, dtype=args.dtype, json_path=args.json)
        return 0
    if args.what == "train":
        from .bench.train import bench_train
        return bench_train(config=args.config, variants=args.variant, device=args.device,
                           batch=2 if args.batch is None else args.batch, size=args.size,
                           iterations=args.iterations, warmup=args.warmup,
                           compare_hf=not args.no_hf, json_path=args.json,
                           torch_threads=args.torch_threads, hf_loss=args.hf_loss,
                           rounds=args.rounds)
    raise SystemExit(f"unknown benchmark {args.what!r}")


def _cmd_convert(args):
    from .weights.checkpoint import save_checkpoint
    from .weights.convert import convert_file

    dst = Path(args.dst)
    if dst.suffix != ".npz":
        raise UsageError(f"{dst}: the output is a minidetr checkpoint and must end in .npz")
    if dst.exists() and not args.overwrite:
        raise UsageError(f"{dst} already exists; pass --overwrite to replace it")
    ckpt, report = convert_file(args.src, variant=args.variant, config=args.config)
    save_checkpoint(dst, ckpt, overwrite=args.overwrite)
    print(report)
    print(f"wrote {dst} ({len(ckpt.model_state)} arrays)")
    return 0


# --------------------------------------------------------------------------- the parser
class _MarkGiven(argparse.Action):
    """``--out`` that remembers whether the user gave it (for ``--resume`` checks)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, "out_given", True)


def _number(v):
    """5e-4, 0.1, 50: a recipe value as people write it."""
    return f"{v:.0e}".replace("e-0", "e-") if 0 < abs(v) < 0.01 else f"{v:g}"


def _recipe_help(field):
    """``(default: 5e-4 for tiny, 2e-4 for small and paper)``: a recipe field's defaults."""
    from .training.config import RECIPES

    number = _number
    by_value = {}
    for preset, values in RECIPES.items():
        by_value.setdefault(values[field], []).append(preset)
    if len(by_value) == 1:
        return f"(default {number(next(iter(by_value)))})"
    return "(default: " + ", ".join(f"{number(value)} for {' and '.join(presets)}"
                                   for value, presets in by_value.items()) + ")"


def _common(parser, *, out_default=None, out=True, data=True, epochs=True, resume=True,
            epochs_help=""):
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where to compute (default: cuda when CuPy sees a GPU, else cpu)")
    if out:
        parser.add_argument("--out", default=out_default, action=_MarkGiven,
                            help=f"output folder (default: {out_default})")
        parser.set_defaults(out_given=False)
    parser.add_argument("--overwrite", action="store_true",
                        help="replace files of an earlier run/output (never done otherwise)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    if data:
        parser.add_argument("--data", nargs="+", metavar="PATH",
                            help="a dataset folder (annotations/instances_{train,val}.json, "
                                 "train/, val/) or ANN_JSON IMAGE_DIR (default: train uses the "
                                 "built-in shapes data, eval the run's validation split)")
    if epochs:
        parser.add_argument("--epochs", type=int, default=None,
                            help=f"number of epochs {epochs_help}".strip())
    if resume:
        parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                            help="continue the run in RUN_DIR (default: --out) from its "
                                 "last.npz, exactly where it stopped (train: or from another "
                                 "of its checkpoints, e.g. RUN_DIR/last.prev.npz)")


def _model_options(parser, default_config="tiny", default_variant="plain"):
    """``--config`` and ``--variant``; ``train`` passes None for both, so that ``--init-from``
    can build the checkpoint's own model when they are not given (tiny/plain otherwise)."""
    parser.add_argument("--config", default=default_config, choices=CONFIGS,
                        help="model size preset (default: " + (
                            default_config or "tiny, or the --init-from checkpoint's model")
                        + ")")
    parser.add_argument("--variant", default=default_variant, choices=VARIANT_NAMES,
                        help="architecture variant (default: " + (
                            default_variant or "plain, or the --init-from checkpoint's")
                        + ")")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m minidetr",
                                description="Deformable DETR in NumPy/CuPy, for learning.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the main job: train the tiny model on the shapes data",
                       description="Make the built-in shapes dataset (once), train the tiny "
                                   "Deformable DETR on it, evaluate, plot, draw predictions "
                                   "and print the final COCO metrics.")
    _common(d, data=False)
    d.add_argument("--quick", action="store_true",
                   help="a one-minute smoke run (small data and model; default --out "
                        "runs/demo-quick)")
    d.add_argument("--variant", default="plain", choices=VARIANT_NAMES, help="architecture variant")
    d.add_argument("--data-dir", default=None,
                   help="where the shapes dataset is cached (default: data/shapes, "
                        "data/shapes-quick with --quick)")
    d.add_argument("--train-images", type=int, default=None,
                   help="train on the first N images only (default: all 1000)")
    d.add_argument("--val-images", type=int, default=None,
                   help="evaluate on the first N validation images only (default: all 200)")
    d.add_argument("--size", type=int, default=None,
                   help="validation image side in pixels; the training sizes scale with it "
                        "(default 128)")
    d.add_argument("--lr", type=float, default=None,
                   help="learning rate of every group (default 5e-4)")
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a model (or --resume a run)",
                       description="Train Deformable DETR (AdamW, three lr groups, clipping, "
                                   "StepLR). Each --config brings its own recipe: the official "
                                   "one for small and paper, a CPU one for tiny (the defaults "
                                   "below). Without --data: the built-in shapes dataset.")
    _common(t, out_default="runs/train", epochs_help=_recipe_help("epochs"))
    _model_options(t, default_config=None, default_variant=None)
    t.add_argument("--val-data", nargs=2, metavar=("ANN_JSON", "IMAGE_DIR"),
                   help="the validation split (with --data ANN_JSON IMAGE_DIR; default: the "
                        "training split itself, which then measures fitting, not "
                        "generalisation)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate " + _recipe_help("lr"))
    t.add_argument("--lr-backbone", type=float, default=None,
                   help="backbone learning rate " + _recipe_help("lr_backbone"))
    t.add_argument("--weight-decay", type=float, default=None,
                   help="AdamW weight decay " + _recipe_help("weight_decay"))
    t.add_argument("--clip-max-norm", type=float, default=None,
                   help="gradient clipping, <= 0: off " + _recipe_help("clip_max_norm"))
    t.add_argument("--lr-drop", type=int, default=None,
                   help="epochs before lr x 0.1 " + _recipe_help("lr_drop"))
    t.add_argument("--batch-size", type=int, default=None,
                   help="images per step " + _recipe_help("batch_size"))
    t.add_argument("--num-queries", type=int, default=None,
                   help="object queries = most objects found per image (default: the "
                        "--config's, 20 tiny, 100 small, 300 paper); a warning says when "
                        "training images hold more objects")
    t.add_argument("--picture-threshold", type=float, default=0.5,
                   help="score threshold of the predictions drawn at the end (default 0.5)")
    t.add_argument("--num-workers", type=int, default=2,
                   help="data-loading threads (default 2)")
    t.add_argument("--seed", type=int, default=42,
                   help="model and data seed (printed; default 42)")
    t.add_argument("--transforms", default=None, choices=["tiny", "small", "paper"],
                   help="augmentation preset (default: the --config's)")
    t.add_argument("--max-size", type=int, default=None,
                   help="cap on the long side of every image in pixels (default: the "
                        "--transforms preset's: 1333 paper, 640 small, 213 tiny); smaller "
                        "images need less memory")
    t.add_argument("--label-map", default="contiguous", choices=["contiguous", "raw"],
                   help="class labels: contiguous 0..K-1, or raw COCO ids (91 logits; "
                        "default contiguous)")
    t.add_argument("--max-train-images", type=int, default=None,
                   help="train on the first N images only (default: all)")
    t.add_argument("--max-val-images", type=int, default=None,
                   help="evaluate on the first N validation images only (default: all)")
    t.add_argument("--eval-every", type=int, default=1,
                   help="evaluate every N epochs, and after the last (default 1)")
    t.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="a time budget: no new epoch starts after MINUTES minutes (the "
                        "running one is finished, evaluated and saved; default: none)")
    t.add_argument("--debug-transfers", action="store_true",
                   help="GPU debugging: fail at any device -> host copy inside a training "
                        "step other than the matcher's cost matrices and the logged losses")
    t.add_argument("--backbone-weights", metavar="FILE", default=None,
                   help="start the ResNet from ImageNet weights, as the official recipe does: "
                        "torchvision .pth or timm .safetensors (or a converted .npz); frozen "
                        "batch norm uses the file's statistics (docs/pretrained.md; "
                        "default: none, random initialisation)")
    t.add_argument("--init-from", metavar="FILE", default=None,
                   help="fine-tune from a detector checkpoint (official .pth, transformers "
                        ".safetensors/.bin or folder, minidetr .npz): every weight whose name "
                        "and shape match is loaded; class heads of another number of classes "
                        "are re-initialised (docs/pretrained.md; default: none)")
    t.add_argument("--check-images", default="auto", choices=["auto", "decode", "header"],
                   help="the pre-flight check of every image before training: decode every "
                        "image (catches truncated files), or only open its header (size, "
                        "mode, EXIF orientation); default auto: decode splits of up to "
                        "10000 images, headers only beyond")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="COCO box AP of a checkpoint",
                       description="Evaluate a checkpoint with pycocotools' COCOeval (AP, AP50, "
                                   "AP75, APs, APm, APl). The model is the one recorded in "
                                   "the checkpoint unless --config/--variant are given.")
    e.add_argument("checkpoint", nargs="?",
                   help="a checkpoint (.npz, .pth, .safetensors) or a run folder (its "
                        "best.npz, else last.npz)")
    _common(e, out=False, epochs=False, resume=False)
    e.add_argument("--config", default=None, choices=CONFIGS,
                   help="build this preset instead of the model recorded in the checkpoint "
                        "(default: the recorded one)")
    e.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="build this variant instead of the recorded one (default: the "
                        "recorded one)")
    e.add_argument("--batch-size", type=int, default=None,
                   help="images per forward pass (default: the run's training batch size, "
                        "as its evaluation during training; else 4)")
    e.add_argument("--num-workers", type=int, default=2,
                   help="data-loading threads (default 2)")
    e.add_argument("--max-images", type=int, default=None,
                   help="only the first N images (default: those the run was evaluated on "
                        "during training, all of them with --data)")
    e.add_argument("--json", default=None,
                   help="also write the metrics to this JSON file (default: none)")
    e.add_argument("--save-detections", default=None, metavar="RESULTS_JSON",
                   help="also write every detection in COCO results format (what "
                        "pycocotools' COCO.loadRes and the COCO server read; default: none)")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("predict", help="draw detections on images (JPEG/PNG, COCO json)",
                       description="Run a checkpoint on image files or folders; write one "
                                   "picture per image with boxes, class names and scores, "
                                   "print the detections, and optionally save them as COCO "
                                   "results json. Unreadable images are skipped with one line "
                                   "each; the exit status is then 2.")
    r.add_argument("checkpoint", help="a checkpoint (.npz, .pth, .safetensors) or a run "
                                      "folder (its best.npz, else last.npz)")
    r.add_argument("images", nargs="+", help="image files and/or folders of images")
    _common(r, out_default="runs/predict", data=False, epochs=False, resume=False)
    r.add_argument("--config", default=None, choices=CONFIGS,
                   help="build this preset instead of the model recorded in the checkpoint "
                        "(default: the recorded one)")
    r.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="build this variant instead of the recorded one (default: the "
                        "recorded one)")
    r.add_argument("--threshold", type=float, default=0.5,
                   help="keep detections scoring at least this (default 0.5)")
    r.add_argument("--batch-size", type=int, default=1,
                   help="images per forward pass (default 1)")
    r.add_argument("--max-size", type=int, default=None,
                   help="cap on the longer image side in pixels (default: the resolution "
                        "the model was validated at)")
    r.add_argument("--format", default="jpg", choices=["jpg", "png"],
                   help="picture format (default jpg)")
    r.add_argument("--json", default=None, metavar="RESULTS_JSON",
                   help="also write the detections in COCO results format (default: none)")
    r.add_argument("--ann", default=None, metavar="ANN_JSON",
                   help="with --json: take the image ids from this COCO annotation file "
                        "(default: numeric file names, else 1..N)")
    r.set_defaults(func=_cmd_predict)

    s = sub.add_parser("subset", help="carve a small COCO subset out of a full set",
                       description="Write a COCO json with some images (and categories) of a "
                                   "full set; optionally copy those images.")
    s.add_argument("ann_file", help="the full COCO annotation json")
    s.add_argument("out_json", help="where to write the subset's json")
    s.add_argument("--categories", default=None,
                   help="comma-separated category names or ids (default: all)")
    s.add_argument("--num-images", type=int, default=None, help="images to draw at random")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-dir", default=None, help="the full set's image folder")
    s.add_argument("--copy-images-to", default=None, help="copy the chosen images here")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(func=_cmd_subset)

    b = sub.add_parser("bench", help="benchmarks",
                       description="msda: the deformable attention op per backend. train: "
                                   "training iterations (time, images/s, peak memory) of "
                                   "minidetr, and of transformers' Deformable DETR when "
                                   "transformers and torch are installed. launches: the GPU "
                                   "kernel launches of one training step by component and "
                                   "call site, counted on the CPU (minidetr.testing.fakecupy). "
                                   "profile: where a CPU training step's time goes, by "
                                   "component (ms, %, Function calls, temporary bytes). "
                                   "conv: a ResNet's 3x3 stride-1 convolutions by im2col "
                                   "and by Winograd, forward and backward, on the CPU.")
    b.add_argument("what", choices=["msda", "train", "launches", "profile", "conv"],
                   help="what to benchmark")
    b.add_argument("--json", default=None, help="where to write the results as JSON "
                                                "(default runs/bench/<what>.json)")
    b.add_argument("--backend", default="all",
                   help="msda: comma-separated backends, or 'all' for every available one")
    b.add_argument("--shapes", default="encoder,decoder",
                   help="msda: comma-separated shape presets: encoder, decoder, tiny")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="msda, conv: float type")
    b.add_argument("--repeats", type=int, default=5,
                   help="msda, conv: timed repetitions (median reported)")
    b.add_argument("--config", default="tiny", choices=CONFIGS,
                   help="train, launches, profile: model preset (default tiny)")
    b.add_argument("--variant", default="plain,refine,two-stage",
                   help="train, launches, profile: comma-separated variants (default all "
                        "three)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="train: where to run (default: cuda when CuPy sees a GPU)")
    b.add_argument("--batch", type=int, default=None,
                   help="train, launches, profile, conv: images per iteration (default 2; "
                        "profile: 8 for tiny, 2 for small, 1 for paper)")
    b.add_argument("--size", default=None,
                   help="train, launches, profile, conv: image HEIGHTxWIDTH (default "
                        "128x128 for tiny, 800x1066 for small and paper; profile: 128x128, "
                        "256x256, 512x512; conv: 256x256)")
    b.add_argument("--iterations", type=int, default=5,
                   help="train, profile: timed iterations (median reported; profile: "
                        "as many profiled, mean reported)")
    b.add_argument("--warmup", type=int, default=2,
                   help="train, profile: untimed iterations first (kernel compilation, "
                        "caches)")
    b.add_argument("--no-hf", action="store_true",
                   help="train: skip transformers' model even when it is installed")
    b.add_argument("--torch-threads", type=int, default=None,
                   help="train: torch's CPU threads for transformers' rows (default: "
                        "torch's own, in a process of its own)")
    b.add_argument("--rounds", type=int, default=1,
                   help="train: run every row this many times, minidetr's and "
                        "transformers' in turn, and report the medians over the rounds")
    b.add_argument("--hf-loss", choices=("official", "shipped"), default="official",
                   help="train: transformers' two-stage loss; official (default) adds the "
                        "encoder proposals' _enc terms that transformers leaves out and "
                        "minidetr computes, shipped times its own loss as it is")
    b.set_defaults(func=_cmd_bench)

    c = sub.add_parser("convert-checkpoint",
                       help="released weights (.pth, .safetensors, a hub folder) -> minidetr .npz",
                       description="Convert weights without PyTorch: an official Deformable DETR "
                                   "checkpoint (plain, refine, two-stage), transformers' "
                                   "DeformableDetrForObjectDetection weights (the SenseTime hub "
                                   "files or transformers 5 names), or an ImageNet ResNet-18/34/50 "
                                   "(torchvision .pth, timm .safetensors; -> a backbone checkpoint "
                                   "for train --backbone-weights). The model's size and variant "
                                   "are read from the keys and shapes; every key and shape is "
                                   "checked, the arrays are kept bit for bit, and what was "
                                   "dropped is reported. .pth files are read by a restricted "
                                   "unpickler that refuses anything but tensors and plain data "
                                   "(see docs/pretrained.md).")
    c.add_argument("src", help="the weights file (.pth/.pt/.bin, .safetensors) or a folder "
                               "holding model.safetensors / pytorch_model.bin and config.json")
    c.add_argument("dst", help="the .npz to write")
    c.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="check that the weights are of this variant (default: read from the "
                        "keys)")
    c.add_argument("--config", default=None, choices=CONFIGS,
                   help="check that the weights have this preset's sizes")
    c.add_argument("--overwrite", action="store_true")
    c.set_defaults(func=_cmd_convert)

    k = sub.add_parser("check-reference",
                       help="compare a converted official checkpoint with the published outputs",
                       description="Run a converted official R50 checkpoint on COCO val2017 "
                                   "image 000000039769 and compare the first 3x3 logits and "
                                   "boxes with the published reference values (tolerance "
                                   "1e-4). Exit status 0 when all match.")
    k.add_argument("checkpoint", help="a .npz from convert-checkpoint --variant ...")
    k.add_argument("image", help="the path of 000000039769.jpg (COCO val2017)")
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    k.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="the variant, if the checkpoint was converted without --variant")
    k.set_defaults(func=_cmd_check_reference, config=None)
    return p


# --------------------------------------------------------------------------- main
def _print_error(message, error=None):
    """``error: message`` on stderr, then the notes a failed run attached (what was saved,
    how to continue), one line each; never a traceback."""
    print(f"error: {message}", file=sys.stderr)
    for note in getattr(error, "__notes__", None) or []:
        print(note, file=sys.stderr)


def _plain_warning(message, category, filename, lineno, file=None, line=None):
    """Warnings as one plain ``warning: ...`` line (no Python source line)."""
    print(f"warning: {message}", file=sys.stderr if file is None else file)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():          # restores the filters and showwarning
            warnings.filterwarnings("once", category=UserWarning)   # each one once
            warnings.showwarning = _plain_warning
            result = args.func(args)
    except (NonFiniteLossError, DiskWriteError) as e:     # the run failed: status 1
        _print_error(e, e)
        return 1
    except (UsageError, RunError, CheckpointError, DatasetError, DeviceError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        _print_error(e, e)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.func is not _cmd_train:
            raise
        # training: the trainer saved what it could and wrote the traceback to error.log
        _print_error(f"the run stopped on an unexpected error: {type(e).__name__}: {e}", e)
        return 1
    return 0 if result is None or not isinstance(result, int) else result


if __name__ == "__main__":
    sys.exit(main())
