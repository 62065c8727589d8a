"""The training engine: parameter groups, the non-finite guard, COCO evaluation, resume."""
from __future__ import annotations

import json
import math
import signal
import threading

import numpy as np
import pytest

from minidetr.autograd import Tensor
from minidetr.data import CocoDetection, DataLoader
from minidetr.models.build import build_criterion, build_model, build_postprocess
from minidetr.models.config import get_config
from minidetr.optim import AdamW
from minidetr.training import (GracefulInterrupt, RunError, TrainConfig, read_metrics,
                               resume_training, run_training)
from minidetr.training.engine import (NonFiniteLossError, build_param_groups, evaluate,
                                      param_group_names, train_one_epoch)
from minidetr.training.evaluation import METRIC_NAMES, CocoEvaluator
from minidetr.weights.checkpoint import load_checkpoint

FAST = dict(epochs=2, batch_size=4, lr=1e-3, lr_backbone=1e-3, transforms="tiny",
            train_scales=(48, 64), val_size=64, max_size=96, num_workers=0, num_pictures=1)


def _quiet(*args):
    pass


# --------------------------------------------------------------------------- param groups
@pytest.mark.parametrize("variant", ["plain", "two-stage"])
def test_param_groups_follow_the_official_substring_rules(variant, small_config):
    model = build_model(small_config(variant))
    frozen = model.backbone[0].body.layer2.conv.weight
    frozen.requires_grad = False                     # a frozen parameter is in no group
    cfg = TrainConfig(lr=1e-3, lr_backbone=3e-5, lr_linear_proj_mult=0.1)
    groups = build_param_groups(model, cfg)
    assert [g["name"] for g in groups] == ["main", "backbone", "linear_proj"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 3e-5, 1e-4])

    names = param_group_names(model)
    group_of = {id(p): g["name"] for g in groups for p in g["params"]}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(group_of) == len(trainable) == sum(len(g["params"]) for g in groups)
    assert id(frozen) not in group_of
    for name, p in trainable:
        if "backbone.0" in name:
            expected = "backbone"
        elif "reference_points" in name or "sampling_offsets" in name:
            expected = "linear_proj"
        else:
            expected = "main"
        assert group_of[id(p)] == expected, name
        assert name in names[expected]
    # every sampling_offsets (encoder and decoder) is in the 0.1x group
    assert sum("sampling_offsets" in n for n in names["linear_proj"]) == 2 * (1 + 2)
    assert any("reference_points" in n for n in names["linear_proj"]) == (variant == "plain")
    AdamW(groups, lr=cfg.lr, weight_decay=1e-4)     # accepted as they are


# --------------------------------------------------------------------------- non-finite guard
class _PoisonedCriterion:
    """The real criterion, but loss_giou_0 becomes NaN at one step."""

    def __init__(self, criterion, bad_call):
        self.criterion, self.bad_call, self.calls = criterion, bad_call, 0
        self.weight_dict = criterion.weight_dict

    def __call__(self, outputs, targets):
        losses = self.criterion(outputs, targets)
        self.calls += 1
        if self.calls == self.bad_call:
            losses["loss_giou_0"] = losses["loss_giou_0"] * float("nan")
        return losses

    def total(self, losses):
        return self.criterion.total(losses)


def test_non_finite_loss_names_the_step_and_the_term(shapes_paths, small_config):
    cfg = small_config()
    model = build_model(cfg)
    dataset = CocoDetection(shapes_paths.train_images, shapes_paths.train_annotations,
                            label_map="contiguous")
    loader = DataLoader(dataset, 4, num_workers=0)
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-4)
    criterion = _PoisonedCriterion(build_criterion(cfg), bad_call=2)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    steps_seen = []
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(model, criterion, optimizer, loader.iter_epoch(0), epoch=4,
                        num_steps=len(loader), on_step=lambda e, s, v: steps_seen.append(s),
                        progress=False)
    message = str(err.value)
    assert "epoch 5, step 2/3" in message
    assert "loss_giou_0 = nan" in message
    assert "loss_bbox =" not in message                  # finite terms are not blamed
    assert steps_seen == [1]                             # the bad step made no update
    changed = [n for n, p in model.named_parameters() if not np.array_equal(p.data, before[n])]
    assert changed and all(np.isfinite(p.data).all() for p in model.parameters())


def test_non_finite_output_is_caught_before_the_matcher(shapes_paths, small_config):
    cfg = small_config()
    model = build_model(cfg)
    model.bbox_embed[0].layers[2].bias.data[:] = np.nan
    dataset = CocoDetection(shapes_paths.train_images, shapes_paths.train_annotations,
                            label_map="contiguous")
    loader = DataLoader(dataset, 4, num_workers=0)
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-4)
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, step 1/3: pred_boxes holds NaN"):
        train_one_epoch(model, build_criterion(cfg), optimizer, loader.iter_epoch(0), epoch=0,
                        num_steps=len(loader), progress=False)


def test_a_run_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(
        shapes_paths, tmp_path, monkeypatch, small_config):
    import minidetr.training.trainer as train_module
    real = train_module.build_criterion
    # 3 steps per epoch: the 5th call of the criterion is epoch 2, step 2
    monkeypatch.setattr(train_module, "build_criterion",
                        lambda cfg: _PoisonedCriterion(real(cfg), bad_call=5))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as err:
        run_training(small_config(), TrainConfig(**{**FAST, "eval_every": 5}),
                     shapes_paths, run, progress=False, log=_quiet)
    message = str(err.value)
    assert "epoch 2, step 2/3" in message and "loss_giou_0 = nan" in message
    # the failure saved the last completed step (epoch 2, step 1) and says so
    assert err.value.__notes__ == [f"Saved {run / 'last.npz'} (epoch 2, 1 of 3 steps done) "
                                   "before stopping; continue the run with `python -m minidetr "
                                   f"train --resume {run}` once the cause is fixed."]
    ckpt = load_checkpoint(run / "last.npz")
    assert (ckpt.progress["epoch"], ckpt.progress["step"]) == (1, 1)
    assert load_checkpoint(run / "last.prev.npz").progress["epoch"] == 1   # epoch 1 kept
    assert all(np.isfinite(a).all() for a in ckpt.model_state.values())


# --------------------------------------------------------------------------- evaluation
def _val_set(shapes_paths):
    return CocoDetection(shapes_paths.val_images, shapes_paths.val_annotations, label_map="contiguous")


def test_perfect_detections_score_ap_one(shapes_paths):
    val = _val_set(shapes_paths)
    evaluator = CocoEvaluator(val.coco, val.category_map)
    for index in range(len(val)):
        _, target = val.load(index)                      # absolute xyxy, contiguous labels
        evaluator.update([target["image_id"]],
                         [{"scores": np.ones(len(target["labels"])),
                           "labels": target["labels"], "boxes": target["boxes"]}])
    metrics = evaluator.summarize()
    assert set(metrics) == set(METRIC_NAMES)
    for name in ("AP", "AP50", "AP75"):
        assert metrics[name] == pytest.approx(1.0), name
    for name in ("APs", "APm", "APl"):               # 1, or -1 when no object has that size
        assert metrics[name] in (pytest.approx(1.0), -1.0), name


def test_wrong_classes_and_empty_predictions_score_zero(shapes_paths):
    val = _val_set(shapes_paths)
    wrong, empty = CocoEvaluator(val.coco, val.category_map), CocoEvaluator(val.coco,
                                                                            val.category_map)
    for index in range(len(val)):
        _, target = val.load(index)
        labels = (target["labels"] + 1) % val.category_map.num_classes
        wrong.update([target["image_id"]], [{"scores": np.ones(len(labels)), "labels": labels,
                                             "boxes": target["boxes"]}])
        empty.update([target["image_id"]], [{"scores": np.zeros(0), "labels": np.zeros(0, int),
                                             "boxes": np.zeros((0, 4))}])
    assert wrong.summarize()["AP"] == 0.0
    assert empty.summarize() == {name: 0.0 for name in METRIC_NAMES}


class _Oracle:
    """A 'model' whose outputs are the ground truth of each batch, in loader order."""

    def __init__(self, batches, num_classes, num_queries=5):
        self.batches, self.num_classes, self.Q = iter(batches), num_classes, num_queries

    def eval(self):
        return self

    def __call__(self, images, mask):
        targets = next(self.batches).targets
        B = len(targets)
        logits = np.full((B, self.Q, self.num_classes), -10.0, np.float32)
        boxes = np.full((B, self.Q, 4), 0.05, np.float32)        # tiny decoy boxes
        for b, t in enumerate(targets):
            n = len(t["labels"])
            logits[b, np.arange(n), t["labels"]] = 10.0
            boxes[b, :n] = t["boxes"]
        return {"pred_logits": Tensor(logits), "pred_boxes": Tensor(boxes)}


def test_evaluate_maps_labels_back_and_scales_boxes(shapes_paths, small_config):
    from minidetr.data import make_transforms
    val = CocoDetection(shapes_paths.val_images, shapes_paths.val_annotations, label_map="contiguous",
                        transforms=make_transforms("val", "tiny", val_size=48))   # resized
    loader = DataLoader(val, 3, num_workers=0)
    cfg = get_config("tiny", num_queries=5)
    metrics = evaluate(_Oracle(loader.iter_epoch(0), val.category_map.num_classes),
                       build_criterion(cfg), build_postprocess(cfg), loader.iter_epoch(0),
                       val.coco, val.category_map, progress=False)
    assert metrics["AP"] == pytest.approx(1.0)
    assert metrics["loss_bbox"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["loss_giou"] == pytest.approx(0.0, abs=1e-6)


# --------------------------------------------------------------------------- resume
def _record_steps(store):
    def on_step(epoch, step, values):
        store.append((epoch, step, values["loss"]))
    return on_step


def _train(small_config, shapes_paths, run, epochs, **kwargs):
    return run_training(small_config(), TrainConfig(**{**FAST, "epochs": epochs}),
                        shapes_paths, run, progress=False, log=_quiet, **kwargs)


def test_resume_reproduces_an_uninterrupted_run_exactly(shapes_paths, tmp_path, small_config):
    straight = []
    _train(small_config, shapes_paths, tmp_path / "straight", 2, on_step=_record_steps(straight))

    # stop in the middle of epoch 1 (as Ctrl-C would), then resume
    parted = []
    stop_at = {(0, 2)}
    record = _record_steps(parted)

    def stop_mid_epoch(epoch, step, values):
        record(epoch, step, values)
        return (epoch, step) in stop_at

    first = _train(small_config, shapes_paths, tmp_path / "parted", 2, on_step=stop_mid_epoch)
    assert first.interrupted and (first.epoch, first.step) == (0, 2)
    assert load_checkpoint(tmp_path / "parted").progress["step"] == 2
    resumed = resume_training(tmp_path / "parted", on_step=_record_steps(parted),
                              progress=False, log=_quiet)
    assert not resumed.interrupted

    # a run of 1 epoch, extended to 2 by a resume at the epoch boundary
    extended = []
    _train(small_config, shapes_paths, tmp_path / "extended", 1, on_step=_record_steps(extended))
    resume_training(tmp_path / "extended", epochs=2, on_step=_record_steps(extended),
                    progress=False, log=_quiet)

    assert [s[:2] for s in straight] == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]
    assert parted == straight, "losses differ after a mid-epoch resume"
    assert extended == straight, "losses differ after resuming at an epoch boundary"
    reference = load_checkpoint(tmp_path / "straight")
    for other in ("parted", "extended"):
        ckpt = load_checkpoint(tmp_path / other)
        for key, value in reference.model_state.items():
            assert ckpt.model_state[key].tobytes() == value.tobytes(), f"{other}: {key}"
        assert ckpt.rng == reference.rng
        history = read_metrics(tmp_path / other)
        assert [h["epoch"] for h in history] == [1, 2]
        for h, r in zip(history, read_metrics(tmp_path / "straight")):
            assert h["train_loss"] == r["train_loss"] and h["AP"] == r["AP"]


def test_a_run_folder_is_never_overwritten_silently(shapes_paths, tmp_path, small_config):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    _train(small_config, shapes_paths, run, 1)
    assert (run / "last.npz").is_file() and (run / "metrics.jsonl").is_file()
    before = (run / "last.npz").read_bytes()
    with pytest.raises(RunError, match="already holds a run .*--resume.*--overwrite"):
        _train(small_config, shapes_paths, run, 1)
    assert (run / "last.npz").read_bytes() == before
    _train(small_config, shapes_paths, run, 1, overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"           # not a run file: kept
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1
    for name in ("loss.png", "ap.png", "best.npz", "run.json"):
        assert (run / name).is_file(), name
    assert len(list((run / "predictions").glob("*.png"))) == 1


def test_resume_errors_are_clear(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        resume_training(tmp_path / "nowhere", log=_quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no checkpoint"):
        resume_training(tmp_path / "empty", log=_quiet)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be installed in the main thread")
def test_first_ctrl_c_requests_a_stop_second_one_interrupts():
    with GracefulInterrupt(log=_quiet) as interrupt:
        signal.raise_signal(signal.SIGINT)
        assert interrupt.requested and interrupt()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_running_means_are_exact():
    from minidetr.training.engine import RunningAverages
    a = RunningAverages()
    a.update(loss=1.0, lr=2.0)
    a.update(loss=2.0)
    b = RunningAverages.from_state(json.loads(json.dumps(a.state())))
    b.update(loss=6.0)
    assert b.means() == {"loss": 3.0, "lr": 2.0}
    assert math.isclose(a.means()["loss"], 1.5)


def test_the_python_examples_of_docs_training_run(tmp_path, monkeypatch, capsys):
    import re
    from pathlib import Path
    doc = Path(__file__).resolve().parents[2] / "docs" / "training.md"
    blocks = re.findall(r"```python\n(.*?)```", doc.read_text(encoding="utf-8"), flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    for i, code in enumerate(blocks):
        exec(compile(code, f"training.md (python block {i})", "exec"), {"__name__": "__doc__"})
    assert "linear_proj" in capsys.readouterr().out


# --------------------------------------------------------------------------- time limit
def test_a_time_limit_ends_the_run_after_the_running_epoch_which_is_evaluated(
        shapes_paths, tmp_path, small_config):
    run = tmp_path / "timed"
    cfg = TrainConfig(**{**FAST, "epochs": 3, "eval_every": 5, "time_limit": 1e-9})
    result = run_training(small_config(), cfg, shapes_paths, run, progress=False,
                          log=_quiet)
    assert not result.interrupted
    assert [h["epoch"] for h in result.history] == [1]          # epochs 2 and 3 never start
    assert "AP" in result.history[0], "the last epoch of a timed run must be evaluated"
    assert set(result.final_metrics) == set(METRIC_NAMES)
    assert load_checkpoint(run / "last.npz").progress["epoch"] == 1

    resumed = resume_training(run, progress=False, log=_quiet, time_limit=None)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize("bad", [0, -1.0, "20"])
def test_a_time_limit_must_be_positive_minutes(bad):
    with pytest.raises(ValueError, match="time_limit"):
        TrainConfig(time_limit=bad)


def test_long_lived_objects_are_frozen_only_inside_and_only_once():
    import gc

    from minidetr.training.engine import long_lived_objects_frozen

    assert gc.get_freeze_count() == 0
    with long_lived_objects_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 1000, "the objects that existed on entry are frozen"
        # (the count only falls when a frozen object is freed, as happens any time)
        with long_lived_objects_frozen():                 # nested: left to the outer one
            assert gc.get_freeze_count() > frozen // 2
        assert gc.get_freeze_count() > frozen // 2, "the inner block must not unfreeze"
        import weakref

        class Node:
            pass
        cycle = Node()
        cycle.me = cycle                                    # a cycle made inside
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None, "garbage made inside is still collected"
    assert gc.get_freeze_count() == 0, "unfrozen on exit"
    try:
        with long_lived_objects_frozen():
            raise KeyError("inside")
    except KeyError:
        pass
    assert gc.get_freeze_count() == 0, "unfrozen after an exception too"
