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
                        on the CPU by minidetr.testing.fakecupy)
    convert-checkpoint  released weights (``.pth``, ``.safetensors``) -> a minidetr ``.npz``
                        (no torch needed)
    check-reference     a converted checkpoint vs the published reference outputs

Common options: ``--device cpu|cuda|auto``, ``--config tiny|small|paper``,
``--variant plain|refine|two-stage``, ``--data``, ``--out``, ``--epochs``, ``--resume``,
``--overwrite``. Errors in the input (missing files, a checkpoint of another model, a
folder that would be overwritten) end with a one-paragraph message and exit status 2; a
non-finite loss with status 1; Ctrl-C during training saves a checkpoint and exits with 130.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# BLAS threads: the matrices of a model trained on a CPU here are small (d_model 64, a few
# thousand tokens), where OpenBLAS's worker threads cost more than they give and fight with
# the data-loading and Numba threads; on 2 busy cores one BLAS thread trains about 4x
# faster. This must be set before NumPy is first imported (``python -m minidetr`` imports
# nothing before this module); a value already in the environment wins.
for _variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

from .backend import DeviceError  # noqa: E402  (after the BLAS setting)
from .data import DatasetError  # noqa: E402
from .files import write_json  # noqa: E402
from .models.config import PRESETS as MODEL_PRESETS  # noqa: E402
from .models.config import VARIANTS  # noqa: E402
from .training.engine import NonFiniteLossError  # noqa: E402
from .training.run_dir import RunError  # noqa: E402
from .weights.checkpoint import CheckpointError  # noqa: E402

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
        raise UsageError("--data ANN_JSON IMAGE_DIR gives the training split; also pass "
                         "--val-data ANN_JSON IMAGE_DIR for the validation split")
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
    from .training.evaluation import METRIC_NAMES

    print(title)
    for name in METRIC_NAMES:
        if name in metrics:
            print(f"  {name:5s} {metrics[name]:.4f}")


def _load_detector(args):
    """The :class:`~minidetr.inference.Detector` of ``args.checkpoint`` (``--config``,
    ``--variant`` and ``--device`` as given)."""
    from .inference import Detector

    return Detector.from_checkpoint(args.checkpoint, config=args.config, variant=args.variant,
                                    device=args.device)


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
                                             else args.time_limit))
    else:
        if args.data:
            data = _data_paths(args.data, args.val_data)
        else:
            print(f"no --data: using the built-in shapes dataset in {DEMO.data_dir}")
            data = DataPaths.from_shapes(generate_shapes_dataset(
                DEMO.data_dir, DEMO.num_train, DEMO.num_val, (DEMO.image_size,) * 2,
                progress=progress))
        categories = CategoryMap.from_coco(load_coco_json(data.train_annotations),
                                           args.label_map)
        model_cfg = get_config(args.config, args.variant, num_classes=categories.num_classes,
                               seed=args.seed)
        train_cfg = TrainConfig(
            epochs=args.epochs or 50, lr=args.lr, lr_backbone=args.lr_backbone,
            weight_decay=args.weight_decay, clip_max_norm=args.clip_max_norm,
            lr_drop=args.lr_drop, batch_size=args.batch_size, num_workers=args.num_workers,
            seed=args.seed, transforms=args.transforms or args.config,
            max_size=args.max_size, label_map=args.label_map,
            max_train_images=args.max_train_images, max_val_images=args.max_val_images,
            eval_every=args.eval_every, time_limit=args.time_limit,
            backbone_weights=_absolute(args.backbone_weights),
            init_from=_absolute(args.init_from))
        result = run_training(model_cfg, train_cfg, data, args.out, device=args.device,
                              overwrite=args.overwrite, progress=progress,
                              debug_transfers=args.debug_transfers)
    if result.interrupted:
        return 130
    _print_metrics(result.final_metrics, f"final COCO metrics ({result.run_dir}):")
    return 0


def _cmd_eval(args):
    from .data import CocoDetection, DataLoader, FirstImages
    from .models.build import build_criterion
    from .training.engine import evaluate

    if args.checkpoint is None:
        # ``eval --data DIR CHECKPOINT``: the greedy --data took the checkpoint too
        if args.data and len(args.data) > 1:
            args.checkpoint = args.data.pop()
        else:
            raise UsageError("eval needs a checkpoint: python -m minidetr eval CHECKPOINT "
                             "[--data ...]")
    if args.json and Path(args.json).exists() and not args.overwrite:
        raise UsageError(f"{args.json} already exists; pass --overwrite to replace it")
    m = _load_detector(args)
    if args.data:
        ann_file, image_dir = _eval_split(args.data)
    elif m.checkpoint.extra and "data" in m.checkpoint.extra:
        ann_file = m.checkpoint.extra["data"]["val_annotations"]
        image_dir = m.checkpoint.extra["data"]["val_images"]
    else:
        raise UsageError(f"{m.checkpoint.path} does not record its validation data; pass "
                         "--data")
    dataset = CocoDetection(image_dir, ann_file, transforms=m.transforms,
                            label_map=m.category_map or "raw")
    if dataset.category_map.num_classes > m.config.num_classes:
        raise UsageError(f"{ann_file} needs {dataset.category_map.num_classes} class logits, "
                         f"the model has {m.config.num_classes}")
    if args.max_images is not None:
        dataset = FirstImages(dataset, args.max_images)
    loader = DataLoader(dataset, args.batch_size, num_workers=args.num_workers)
    print(f"evaluating {m.checkpoint.path} on {len(dataset)} images of {ann_file} "
          f"({m.device})")
    metrics = evaluate(m.model, build_criterion(m.config), m.postprocess,
                       loader.iter_epoch(0), dataset.coco, dataset.category_map,
                       num_steps=len(loader), device=m.device,
                       progress=not args.no_progress, verbose=True)
    _print_metrics(metrics, "COCO box metrics:")
    if args.json:
        write_json(args.json, metrics)
        print(f"wrote {args.json}")
    return 0


def _cmd_predict(args):
    from .data import load_rgb_image
    from .training.plots import draw_detections

    files = _image_files(args.images)
    pngs = [Path(args.out) / f"{f.stem}.png" for f in files]
    if len(set(pngs)) != len(pngs):
        raise UsageError("two input images have the same file name stem; predict them into "
                         "separate --out folders")
    clashes = [str(p) for p in pngs if p.exists()]
    if clashes and not args.overwrite:
        raise UsageError(f"{len(clashes)} output files already exist (e.g. {clashes[0]}); pass "
                         "--overwrite to replace them, or another --out")
    detector = _load_detector(args)
    for path, png in zip(files, pngs):
        image = load_rgb_image(path)
        det = detector.predict_image(image)
        draw_detections(image, det, detector.class_name, png, score_threshold=args.threshold,
                        title=f"{path.name}: score >= {args.threshold}")
        keep = det["scores"] >= args.threshold
        print(f"{path}: {int(keep.sum())} detections -> {png}")
        for score, label, box in zip(det["scores"][keep], det["labels"][keep],
                                     det["boxes"][keep]):
            print(f"  {detector.class_name(label)} {score:.2f} "
                  f"[{', '.join(f'{v:.0f}' for v in box)}]")
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
        bench_launches(config=args.config, variants=args.variant, batch=args.batch,
                       size=args.size, json_path=args.json)
        return 0
    if args.what == "train":
        from .bench.train import bench_train
        return bench_train(config=args.config, variants=args.variant, device=args.device,
                           batch=args.batch, size=args.size, iterations=args.iterations,
                           warmup=args.warmup, compare_hf=not args.no_hf,
                           json_path=args.json)
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


def _common(parser, *, out_default=None, out=True, data=True, epochs=True, resume=True):
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
                                 "train/, val/) or ANN_JSON IMAGE_DIR")
    if epochs:
        parser.add_argument("--epochs", type=int, default=None, help="number of epochs")
    if resume:
        parser.add_argument("--resume", nargs="?", const=True, default=None, metavar="RUN_DIR",
                            help="continue the run in RUN_DIR (default: --out) from its "
                                 "last.npz, exactly where it stopped")


def _model_options(parser, default_config="tiny", default_variant="plain"):
    parser.add_argument("--config", default=default_config, choices=CONFIGS,
                        help=f"model size preset (default: {default_config})")
    parser.add_argument("--variant", default=default_variant, choices=VARIANT_NAMES,
                        help=f"architecture variant (default: {default_variant})")


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
                       description="Train Deformable DETR with the official recipe (AdamW, "
                                   "three lr groups, clipping 0.1, StepLR). Without --data: "
                                   "the built-in shapes dataset.")
    _common(t, out_default="runs/train")
    _model_options(t)
    t.add_argument("--val-data", nargs=2, metavar=("ANN_JSON", "IMAGE_DIR"),
                   help="the validation split (with --data ANN_JSON IMAGE_DIR)")
    t.add_argument("--lr", type=float, default=2e-4, help="learning rate (default 2e-4)")
    t.add_argument("--lr-backbone", type=float, default=2e-5,
                   help="backbone learning rate (default 2e-5)")
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--clip-max-norm", type=float, default=0.1,
                   help="gradient clipping (<= 0: off; default 0.1)")
    t.add_argument("--lr-drop", type=int, default=40, help="epochs before lr x 0.1 (default 40)")
    t.add_argument("--batch-size", type=int, default=2)
    t.add_argument("--num-workers", type=int, default=2, help="data-loading threads")
    t.add_argument("--seed", type=int, default=42, help="model and data seed (printed)")
    t.add_argument("--transforms", default=None, choices=["tiny", "small", "paper"],
                   help="augmentation preset (default: the --config's)")
    t.add_argument("--max-size", type=int, default=None,
                   help="cap on the long side of every image in pixels (default: the "
                        "--transforms preset's: 1333 paper, 640 small, 213 tiny); smaller "
                        "images need less memory")
    t.add_argument("--label-map", default="contiguous", choices=["contiguous", "raw"],
                   help="class labels: contiguous 0..K-1, or raw COCO ids (91 logits)")
    t.add_argument("--max-train-images", type=int, default=None)
    t.add_argument("--max-val-images", type=int, default=None)
    t.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs")
    t.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                   help="a time budget: no new epoch starts after MINUTES minutes (the "
                        "running one is finished, evaluated and saved)")
    t.add_argument("--debug-transfers", action="store_true",
                   help="GPU debugging: fail at any device -> host copy inside a training "
                        "step other than the matcher's cost matrices and the logged losses")
    t.add_argument("--backbone-weights", metavar="FILE", default=None,
                   help="start the ResNet from ImageNet weights, as the official recipe does: "
                        "torchvision .pth or timm .safetensors (or a converted .npz); frozen "
                        "batch norm uses the file's statistics (docs/pretrained.md)")
    t.add_argument("--init-from", metavar="FILE", default=None,
                   help="fine-tune from a detector checkpoint (official .pth, transformers "
                        ".safetensors/.bin or folder, minidetr .npz): every weight whose name "
                        "and shape match is loaded; class heads of another number of classes "
                        "are re-initialised (docs/pretrained.md)")
    t.set_defaults(func=_cmd_train)

    e = sub.add_parser("eval", help="COCO box AP of a checkpoint",
                       description="Evaluate a checkpoint with pycocotools' COCOeval (AP, AP50, "
                                   "AP75, APs, APm, APl). The model is the one recorded in "
                                   "the checkpoint unless --config/--variant are given.")
    e.add_argument("checkpoint", nargs="?",
                   help="a .npz checkpoint or a run folder (its last.npz)")
    _common(e, out=False, epochs=False, resume=False)
    e.add_argument("--config", default=None, choices=CONFIGS,
                   help="build this preset instead of the model recorded in the checkpoint")
    e.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="build this variant instead of the recorded one")
    e.add_argument("--batch-size", type=int, default=4)
    e.add_argument("--num-workers", type=int, default=2)
    e.add_argument("--max-images", type=int, default=None, help="only the first N images")
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=_cmd_eval)

    r = sub.add_parser("predict", help="draw detections on images (PNG)",
                       description="Run a checkpoint on image files or folders; write one PNG "
                                   "per image with boxes, class names and scores, and print "
                                   "the detections.")
    r.add_argument("checkpoint", help="a .npz checkpoint or a run folder (its last.npz)")
    r.add_argument("images", nargs="+", help="image files and/or folders of images")
    _common(r, out_default="runs/predict", data=False, epochs=False, resume=False)
    r.add_argument("--config", default=None, choices=CONFIGS,
                   help="build this preset instead of the model recorded in the checkpoint")
    r.add_argument("--variant", default=None, choices=VARIANT_NAMES,
                   help="build this variant instead of the recorded one")
    r.add_argument("--threshold", type=float, default=0.5,
                   help="show detections scoring at least this (default 0.5)")
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
                                   "call site, counted on the CPU (minidetr.testing.fakecupy).")
    b.add_argument("what", choices=["msda", "train", "launches"], help="what to benchmark")
    b.add_argument("--json", default=None, help="where to write the results as JSON "
                                                "(default runs/bench/<what>.json)")
    b.add_argument("--backend", default="all",
                   help="msda: comma-separated backends, or 'all' for every available one")
    b.add_argument("--shapes", default="encoder,decoder",
                   help="msda: comma-separated shape presets: encoder, decoder, tiny")
    b.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                   help="msda: float type")
    b.add_argument("--repeats", type=int, default=5,
                   help="msda: timed repetitions (median reported)")
    b.add_argument("--config", default="tiny", choices=CONFIGS,
                   help="train, launches: model preset (default tiny)")
    b.add_argument("--variant", default="plain,refine,two-stage",
                   help="train, launches: comma-separated variants (default all three)")
    b.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="train: where to run (default: cuda when CuPy sees a GPU)")
    b.add_argument("--batch", type=int, default=2,
                   help="train, launches: images per iteration")
    b.add_argument("--size", default=None,
                   help="train, launches: image HEIGHTxWIDTH (default 128x128 for tiny, "
                        "800x1066 for small and paper)")
    b.add_argument("--iterations", type=int, default=5,
                   help="train: timed iterations (median reported)")
    b.add_argument("--warmup", type=int, default=2,
                   help="train: untimed iterations first (kernel compilation, caches)")
    b.add_argument("--no-hf", action="store_true",
                   help="train: skip transformers' model even when it is installed")
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
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (UsageError, RunError, CheckpointError, DatasetError, DeviceError, FileExistsError,
            FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0 if result is None or not isinstance(result, int) else result


if __name__ == "__main__":
    sys.exit(main())
