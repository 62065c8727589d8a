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
# # 11. Training on the built-in dataset, on the CPU
#
# **Paper:** §5, implementation details: the detector is trained with the set loss of
# DETR, applied to the output of *every* decoder layer $d$ (auxiliary losses), each layer
# matched on its own (notebook 10),
#
# $$
# \mathcal{L} = \sum_{d=1}^{D_{\text{dec}}} \Big[\, 2\, \mathcal{L}^{(d)}_{\text{focal}}
#   + 5\, \mathcal{L}^{(d)}_{\text{L1}} + 2\, \mathcal{L}^{(d)}_{\text{GIoU}} \Big],
# $$
#
# minimised with Adam(W) at a learning rate of $2 \cdot 10^{-4}$ ($\times 0.1$ for the
# linear layers that predict sampling offsets and reference points), weight decay
# $10^{-4}$, for 50 epochs with the rate divided by 10 after 40. The official code also
# clips the gradient's total norm at 0.1; the paper does not say so: it is DETR's setting,
# kept as the default of the official `main.py`.
# Results are COCO box AP on the validation set. This notebook runs that loop, the code of
# `python -m minidetr train`, on the CPU:
#
# 1. the built-in shapes dataset (five coloured shapes, real COCO files);
# 2. the `tiny` model and the recipe of the CPU demo;
# 3. training (about a minute on an idle 2-core machine; the time printed below is this
#    build's), with every loss term recorded at every step;
# 4. COCO AP, recomputed from the checkpoint with `minidetr.training.evaluation`;
# 5. detections drawn on validation images with `minidetr.training.plots`.
#
# It is a short version of **`make demo`** (`python -m minidetr demo`), which trains on
# 1000 images for 16 epochs in about 4 minutes on 2 cores and reaches **AP50 ≈ 0.93**
# (AP 0.58); here, 320 images for 8 epochs give a model that clearly works but is far from
# done.
#
# **Doc:** [training.md](../docs/training.md) (recipe, evaluation, run folder, the demo) and
# [data.md](../docs/data.md) (the shapes dataset). **Code:** `minidetr/training/`:
# `trainer.py` (`run_training`), `config.py` (`TrainConfig`), `demo.py` (`DEMO`),
# `engine.py` (`train_one_epoch`, `evaluate`), `evaluation.py` (`CocoEvaluator`),
# `plots.py`; `minidetr/inference.py` (`predict`).

# %%
import os

# Small matrices: BLAS threads would only compete with the data-loading threads for the
# cores (the CLI sets the same). Must be set before NumPy is imported.
for variable in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import shutil
import tempfile
import time
from io import BytesIO
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Image as DisplayImage
from IPython.display import display
from PIL import Image

from minidetr.data import CocoDetection, DataLoader, collate, generate_shapes_dataset
from minidetr.inference import predict
from minidetr.lessons import viz_model as vm
from minidetr.models import (box_xyxy_to_cxcywh, build_criterion, build_model, build_postprocess,
                             get_config)
from minidetr.training import DataPaths, TrainConfig, build_datasets, run_training
from minidetr.training.demo import DEMO
from minidetr.training.engine import build_param_groups
from minidetr.training.evaluation import METRIC_NAMES, CocoEvaluator
from minidetr.weights.checkpoint import load_checkpoint, load_model_state

SMALL = os.environ.get("MINIDETR_NOTEBOOK_PRESET") == "tiny"
N_TRAIN, N_VAL = (16, 8) if SMALL else (320, 64)          # images per split
EPOCHS, LR_DROP, BATCH = (2, 2, 4) if SMALL else (8, 6, 8)
plt.rcParams["figure.dpi"] = 80
WORK = Path(tempfile.mkdtemp(prefix="minidetr-nb11-"))  # data and run folder; removed at the end
print(f"setting: {'tiny' if SMALL else 'full'}; {N_TRAIN} training / {N_VAL} validation "
      f"images, {EPOCHS} epochs of batch {BATCH}; seeds: data 0, model 42, order 42")

# %% [markdown]
# ## 1. The data
#
# `generate_shapes_dataset` writes an ordinary COCO dataset: JPEG files and
# `instances_{train,val}.json`, five classes that differ in shape *and* colour on a
# textured grey background, 1–4 objects per 128 × 128 image. Image $i$ of a split is
# drawn from its own generator, made from (seed, split, $i$), so the images below are
# exactly the first ones of the demo's 1000 + 200. Writing them takes about a second.

# %%
start = time.perf_counter()
paths = generate_shapes_dataset(WORK / "shapes", num_train=N_TRAIN, num_val=N_VAL,
                                image_size=(128, 128), seed=0)
train_raw = CocoDetection(paths.train_images, paths.train_annotations, label_map="contiguous")
print(f"wrote {N_TRAIN + N_VAL} images in {time.perf_counter() - start:.1f} s; training "
      f"split: {train_raw.report()}")
print(f"classes (label: name): {dict(enumerate(train_raw.category_map.names))}")

fig, axes = plt.subplots(1, 4, figsize=(8, 2.3))
for index, ax in enumerate(axes):
    image, target = train_raw.load(index)                      # PIL image, boxes xyxy pixels
    H, W = target["size"]
    names = [train_raw.category_map.name_of(label) for label in target["labels"]]
    vm.show_image(ax, np.asarray(image) / 255.0, title=f"train image {target['image_id']}")
    vm.draw_boxes(ax, box_xyxy_to_cxcywh(target["boxes"]) / np.array([W, H, W, H]), (H, W),
                  colour="white", labels=names, fontsize=6)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The model and the recipe
#
# The `tiny` preset: a small convolutional backbone trained from scratch (no ImageNet
# weights), $C = 64$, $M = 4$ heads, 2 encoder + 2 decoder layers, $L = 3$ levels,
# $K = 2$ points, 20 queries, 5 classes: 0.28 M parameters, against the paper's 40 M.
# The training settings are the demo's (`minidetr.training.demo.DEMO`); they differ from the
# paper's where a model trained from scratch on a CPU needs it
# ([training.md §7](../docs/training.md#7-the-demo)):
#
# | setting | paper (clipping: official code) | here |
# |---|---|---|
# | learning rate (main, backbone) | $2 \cdot 10^{-4}$, $2 \cdot 10^{-5}$ | $5 \cdot 10^{-4}$, $5 \cdot 10^{-4}$ |
# | offsets and reference points | $\times 0.1$ | $\times 0.1$ |
# | weight decay, clipping | $10^{-4}$, 0.1 | $10^{-4}$, 0.1 |
# | epochs, lr drop | 50, after 40 | 8, after 6 (demo: 16, after 12) |
# | batch, resolution | 32, 480–800 px | 8, 80–128 px (`transforms="tiny"`) |

# %%
model_cfg = get_config("tiny")
train_cfg = TrainConfig(**{**DEMO.train, "epochs": EPOCHS, "lr_drop": LR_DROP,
                           "batch_size": BATCH, "picture_threshold": 0.3})
criterion = build_criterion(model_cfg)
print(f"model: {model_cfg.backbone} backbone, C = {model_cfg.d_model}, M = {model_cfg.nheads}, "
      f"{model_cfg.enc_layers} + {model_cfg.dec_layers} layers, L = {model_cfg.num_feature_levels}, "
      f"K = {model_cfg.n_points}, {model_cfg.num_queries} queries, "
      f"{model_cfg.num_classes} classes")
print("optimiser parameter groups:")
for group in build_param_groups(build_model(model_cfg), train_cfg):
    print(f"  {group['name']:<12} lr {group['lr']:.0e}  {len(group['params']):>3} tensors, "
          f"{sum(p.data.size for p in group['params']):>7,} numbers")
print("loss weights:", {k: w for k, w in criterion.weight_dict.items() if not k.endswith("_enc")},
      "(and the _enc terms of two-stage models)")

# %% [markdown]
# ## 3. Training
#
# `run_training` is the whole loop of the official `main.py`: for every epoch,
# `train_one_epoch` (forward, set loss, backward, clipping, AdamW), then `evaluate`
# (validation losses and COCO AP), the lr schedule, a checkpoint, a line of
# `metrics.jsonl` and the plots. The `on_step` callback receives every step's loss
# terms; we keep them for the curves. (Times vary with the load of the machine.)

# %%
steps = []                                                  # one dict per training step


def record(epoch, step, values):
    steps.append({"epoch": epoch, **values})


start = time.perf_counter()
result = run_training(model_cfg, train_cfg, DataPaths.from_shapes(paths), WORK / "run",
                      progress=False, on_step=record,
                      log=lambda line: print(line.replace(str(WORK), "$WORK")))
train_seconds = time.perf_counter() - start
print(f"\n{len(steps)} steps and {EPOCHS} evaluations in {train_seconds:.0f} s "
      f"({train_seconds / len(steps):.2f} s per step, evaluation included)")

# %% [markdown]
# ## 4. The loss terms, step by step
#
# Every step logs the weighted total and each term unweighted: `loss_ce` (focal),
# `loss_bbox` (L1), `loss_giou` for the last decoder layer, the same with `_0` for the
# first (auxiliary) layer, and two numbers that are logged but not optimised:
# `class_error`, the percentage of matched queries whose best class is wrong, and
# `cardinality_error`, a DETR leftover kept for comparison with the official logs: it
# counts a query as an object when its best class is not the *last* one, which meant
# "not background" in DETR but means nothing with the sigmoid focal loss (no background
# class), so ignore its level. First a check of the formula above on every step, then
# the curves (thin: each step; thick: a running mean; dotted: the lr drop).

# %%
weights = {key: w for key, w in criterion.weight_dict.items() if key in steps[0]}
for values in steps:                          # (the _enc terms exist only for two-stage)
    weighted = sum(weight * values[key] for key, weight in weights.items())
    assert abs(weighted - values["loss"]) <= 1e-5 * values["loss"], (values, weighted)
print(f"loss = sum of weight x term, {weights}: checked on all {len(steps)} steps")

panels = [("loss", ["loss"], "weighted total"),
          ("loss_ce", ["loss_ce", "loss_ce_0"], "focal (x 2)"),
          ("loss_bbox", ["loss_bbox", "loss_bbox_0"], "L1 (x 5)"),
          ("loss_giou", ["loss_giou", "loss_giou_0"], "1 - GIoU (x 2)"),
          ("class_error", ["class_error"], "matched, wrong class (%)"),
          ("cardinality_error", ["cardinality_error"], "DETR leftover, not optimised")]
window = max(1, len(steps) // 20)
step_axis = np.arange(1, len(steps) + 1)
fig, axes = plt.subplots(2, 3, figsize=(12, 5.5))
for ax, (name, keys, title) in zip(axes.ravel(), panels):
    for key, colour in zip(keys, ("tab:blue", "tab:orange")):
        series = np.array([s[key] for s in steps])
        smooth = np.convolve(series, np.ones(window) / window, mode="valid")
        layer = "first layer" if key.endswith("_0") else "last layer"
        ax.plot(step_axis, series, color=colour, alpha=0.3, linewidth=0.8)
        ax.plot(step_axis[window - 1:], smooth, color=colour, linewidth=2,
                label=layer if len(keys) > 1 else "running mean")
    ax.axvline(LR_DROP * len(steps) / EPOCHS, color="0.4", linestyle=":", linewidth=1)
    ax.set_title(f"{name}: {title}", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
plt.tight_layout()
plt.show()

# %% [markdown]
# The run folder holds the epoch-level view, drawn by `minidetr.training.plots.plot_losses`
# (`loss.png`: training solid, validation dashed) and `plot_ap` (`ap.png`), the same
# files `make demo` writes to `runs/demo/`:

# %%
run_dir = result.run_dir
print("run folder:", sorted(p.name for p in run_dir.iterdir()))
fig, axes = plt.subplots(2, 1, figsize=(12, 6.5), gridspec_kw={"height_ratios": [1, 1.2]})
for ax, name in zip(axes, ("loss.png", "ap.png")):
    ax.imshow(plt.imread(run_dir / name))
    ax.set_axis_off()
plt.tight_layout()
plt.show()
print(f"metrics.jsonl, one line per epoch; the last one's keys: {sorted(result.history[-1])}")
print("lr per epoch:", [h["lr"] for h in result.history])

# %% [markdown]
# ## 5. COCO AP, from the checkpoint
#
# COCO's primary metric averages precision over recall levels (0, 0.01, …, 1), over
# classes, and over ten IoU thresholds $0.50, 0.55, \dots, 0.95$ that decide when a
# detection matches an object: **AP**. **AP50** uses the threshold 0.5 alone (a box
# roughly in the right place), AP75 0.75 (a tight box); APs and APm restrict it to small
# ($< 32^2$ px) and medium objects. No shape here is large ($\ge 96^2$ px), so APl is
# $-1$, COCO's "no such objects".
#
# To see every step we redo the evaluation by hand: load `last.npz` into a new model,
# run it on the validation images, let `PostProcess` keep the 100 best (query, class)
# pairs per image with boxes in pixels of the original image, and hand them to
# `CocoEvaluator`, which converts them to COCO's result format and runs `pycocotools`.
# The numbers must equal those the run computed after its last epoch.

# %%
model = build_model(model_cfg)
load_model_state(model, load_checkpoint(run_dir / "last.npz"))
_, val_set = build_datasets(DataPaths.from_shapes(paths), train_cfg)
postprocess = build_postprocess(model_cfg)
evaluator = CocoEvaluator(val_set.coco, val_set.category_map)
for batch in DataLoader(val_set, BATCH, num_workers=0):
    orig_sizes = np.stack([t["orig_size"] for t in batch.targets])             # (B, 2)
    detections = predict(model, postprocess, batch.images, batch.mask, orig_sizes)
    evaluator.update([t["image_id"] for t in batch.targets], detections)
first = evaluator.results[0]
print(f"{len(evaluator.image_ids)} images, {len(evaluator.results)} detections; the first in "
      f"COCO's format: {dict(first, bbox=[round(v, 1) for v in first['bbox']])}")
metrics = evaluator.summarize(verbose=True)
for name in METRIC_NAMES:
    assert abs(metrics[name] - result.final_metrics[name]) < 1e-9, (name, metrics, result)
print("same numbers as the run's last evaluation:",
      {k: round(v, 3) for k, v in metrics.items()})

# %% [markdown]
# ## 6. Detections on validation images
#
# At the end of a run, `minidetr.training.plots.draw_detections` draws the detections above a
# score threshold (coloured, with class and score) and the ground truth (dashed white)
# on the first validation images, in `predictions/`. COCO AP ranks all 100 detections of
# an image by score and needs no threshold; a picture does. The demo draws scores
# $\ge 0.5$; after this short run the scores are still low (the focal loss raises them
# only as the model becomes sure), so this run draws $\ge 0.3$ (`picture_threshold`).
# Look for what a short run still gets wrong: loose boxes, missed objects, and
# duplicates. DETR has no non-maximum suppression: only the one-to-one matching of the
# loss teaches a query to stay silent when another one has the object, and that takes
# longer to learn than finding the object.

# %%
print("\n".join(str(path.relative_to(WORK)) for path in result.pictures))
# The PNGs two by two, shown as one JPEG: noisy pictures compress badly as PNG, and this
# notebook's file stays small. (All are the same size: the images are 128 x 128.)
pictures = [Image.open(path).convert("RGB") for path in result.pictures]
w, h = pictures[0].size
montage = Image.new("RGB", (2 * w, -(-len(pictures) // 2) * h), "white")
for index, picture in enumerate(pictures):
    montage.paste(picture, ((index % 2) * w, (index // 2) * h))
jpeg = BytesIO()
montage.save(jpeg, "JPEG", quality=80)
display(DisplayImage(jpeg.getvalue()))

image, target = val_set.get(0)                        # validation transforms: no randomness
batch = collate([(image, target)])
detections_first = predict(model, postprocess, batch.images, batch.mask,
                           target["orig_size"][None])[0]
truth = val_set.load(0)[1]                            # boxes in pixels of the original
print(f"image {target['image_id']}: ground truth "
      f"{[val_set.category_map.name_of(l) for l in truth['labels']]} at "
      f"{np.array2string(truth['boxes'], precision=1)}; its 5 best detections of 100:")
for score, label, box in zip(*(detections_first[k][:5] for k in ("scores", "labels", "boxes"))):
    print(f"  {val_set.category_map.name_of(label):<9} {score:.2f}  box (x0, y0, x1, y1) = "
          f"{np.array2string(box, precision=1)}")

# %% [markdown]
# ## Exercises
#
# Solutions, each a function that asserts its answer:
# [solutions/11_training_on_cpu.py](solutions/11_training_on_cpu.py).
#
# 1. **Predict.** Which tensors of the `tiny` model land in the `linear_proj` group (learning
#    rate $\times 0.1$), and how many numbers do they hold? Write it in terms of $C$, $M$, $L$,
#    $K$ and the numbers of layers, then compare with `build_param_groups`.
# 2. **Measure, then predict.** Run one `train_step` of an untrained model: what is the
#    gradient's norm before and after clipping at 0.1? Now predict how much clipping changes
#    AdamW's *first* update (hint: what does Adam do with a gradient multiplied by a
#    constant?). When does clipping matter, then?
# 3. **Predict.** Write down the three groups' learning rates for each of this notebook's
#    8 epochs (drop after 6), then step a `StepLR` through them.
# 4. **Measure.** Train one step twice with the same seeds and once with
#    another model seed. Which parameters are bit-identical? (Reproducibility is what makes
#    every number in these notebooks checkable.)

# %% [markdown]
# ## Checks

# %%
history = result.history
first, last = np.mean([s["loss"] for s in steps[:len(steps) // 4]]), \
    np.mean([s["loss"] for s in steps[-(len(steps) // 4):]])
assert last < 0.9 * first, f"the training loss did not fall: {first:.3f} -> {last:.3f}"
assert [h["epoch"] for h in history] == list(range(1, EPOCHS + 1))
assert len(steps) == EPOCHS * (N_TRAIN // BATCH)
assert set(METRIC_NAMES) <= set(history[-1]) and set(result.final_metrics) == set(METRIC_NAMES)
assert all(-1 <= metrics[k] <= 1 for k in METRIC_NAMES) and metrics["APl"] == -1, metrics
assert set(steps[0]) >= {"loss", "loss_ce", "loss_bbox", "loss_giou", "loss_ce_0",
                         "loss_bbox_0", "loss_giou_0", "class_error", "cardinality_error"}
assert detections_first["scores"].shape == (100,) and detections_first["boxes"].shape == (100, 4)
assert np.all(np.diff(detections_first["scores"]) <= 0), "detections sorted by score"
assert len(evaluator.image_ids) == N_VAL and len(evaluator.results) == 100 * N_VAL
assert len(result.pictures) == train_cfg.num_pictures and all(p.is_file() for p in result.pictures)
assert {"last.npz", "best.npz", "metrics.jsonl", "loss.png", "ap.png"} <= \
    {p.name for p in run_dir.iterdir()}
if not SMALL:
    assert history[-1]["train_loss"] < 0.6 * history[0]["train_loss"], history
    assert metrics["AP50"] > 0.3, f"AP50 {metrics['AP50']:.3f}: the model did not learn"
shutil.rmtree(WORK)
print("all checks passed")
