"""Memory in the training loop: nothing piles up from step to step, and running out of
memory ends a run with a message that names the options that shrink a step.

The out-of-memory errors are simulated on the CPU with stand-ins for CuPy's exception
classes (raised from inside the step, where a real allocation would fail).
"""
from __future__ import annotations

import gc

import pytest

from minidetr.autograd import Node, Tensor
from minidetr.cli import main
from minidetr.data import CocoDetection, DataLoader
from minidetr.models.build import build_criterion, build_model
from minidetr.optim import AdamW
from minidetr.training import RunError, TrainConfig, run_training
from minidetr.training.engine import StepOutOfMemoryError, build_param_groups, train_one_epoch

FAST = dict(epochs=1, batch_size=2, lr=1e-3, lr_backbone=1e-3, transforms="tiny",
            train_scales=(48, 64), val_size=64, max_size=96, num_workers=0, num_pictures=0)


def _live(kind):
    gc.collect()
    return sum(isinstance(o, kind) for o in gc.get_objects())


# --------------------------------------------------------------------------- no growth
def test_training_steps_leave_no_tensors_or_graph_nodes_behind(shapes_paths, small_config):
    cfg = small_config("two-stage")
    model = build_model(cfg)
    data = shapes_paths
    dataset = CocoDetection(data.train_images, data.train_annotations, label_map="contiguous")
    loader = DataLoader(dataset, 2, num_workers=0)
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-4)
    counts = []

    def count(epoch, step, values):
        counts.append((_live(Tensor), _live(Node)))

    result = train_one_epoch(model, build_criterion(cfg), optimizer, loader.iter_epoch(0),
                             epoch=0, num_steps=len(loader), on_step=count, progress=False)
    assert result.steps_done == 6 and len(counts) == 6
    # step 1 creates the AdamW moments (arrays, not Tensors); from step 2 on nothing grows
    assert counts[1:] == [counts[1]] * 5, f"live (Tensors, Nodes) after each step: {counts}"
    assert counts[1][1] == 0, "graph nodes outlived their step"
    params = sum(1 for _ in model.parameters())
    assert params <= counts[1][0] <= params + 16, counts   # parameters and a few constants


# --------------------------------------------------------------------------- out of memory
class OutOfMemoryError(MemoryError):
    """Stands in for ``cupy.cuda.memory.OutOfMemoryError`` (a MemoryError subclass)."""


OutOfMemoryError.__module__ = "cupy.cuda.memory"


class CUBLASError(RuntimeError):
    """Stands in for CuPy's cuBLAS error class."""


CUBLASError.__module__ = "cupy_backends.cuda.libs.cublas"


class _FailingCriterion:
    """The real criterion, until call ``fail_at``: then an allocation "fails"."""

    def __init__(self, criterion, error, fail_at=1):
        self.criterion, self.error, self.fail_at, self.calls = criterion, error, fail_at, 0
        self.weight_dict = criterion.weight_dict

    def __call__(self, outputs, targets):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error
        return self.criterion(outputs, targets)

    def total(self, losses):
        return self.criterion.total(losses)


OUT_OF_MEMORY = [
    OutOfMemoryError("Out of memory allocating 1,073,741,824 bytes (allocated so far: "
                     "79,456,000,000 bytes)."),
    CUBLASError("CUBLAS_STATUS_ALLOC_FAILED"),
    MemoryError("Unable to allocate 4.00 GiB for an array with shape (2, 256, 2097152)"),
]


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=lambda e: type(e).__name__)
def test_the_step_names_the_batch_when_memory_runs_out(shapes_paths, error, small_config):
    cfg = small_config()
    model = build_model(cfg)
    data = shapes_paths
    dataset = CocoDetection(data.train_images, data.train_annotations, label_map="contiguous")
    loader = DataLoader(dataset, 3, num_workers=0)
    optimizer = AdamW(build_param_groups(model, TrainConfig()), lr=1e-4)
    criterion = _FailingCriterion(build_criterion(cfg), error, fail_at=2)
    with pytest.raises(StepOutOfMemoryError) as err:
        train_one_epoch(model, criterion, optimizer, loader.iter_epoch(0), epoch=0,
                        num_steps=len(loader), progress=False)
    message = str(err.value)
    assert "out of memory at epoch 1, step 2/4 on cpu" in message
    assert "a batch of 3 images padded to 64x64" in message
    assert str(error) in message and err.value.__cause__ is error


def test_a_run_out_of_memory_is_a_run_error_naming_the_options(shapes_paths, tmp_path,
                                                              monkeypatch, small_config):
    import minidetr.training.trainer as train_module
    real = train_module.build_criterion
    monkeypatch.setattr(train_module, "build_criterion",
                        lambda cfg: _FailingCriterion(real(cfg), OUT_OF_MEMORY[0]))
    with pytest.raises(RunError) as err:
        run_training(small_config(), TrainConfig(**FAST), shapes_paths,
                     tmp_path / "run", progress=False, log=lambda *a: None)
    message = str(err.value)
    assert message.startswith("out of memory at epoch 1, step 1/6 on cpu: a batch of 2 "
                              "images padded to")
    for option in ("--batch-size (this run: 2)", "--max-size (the long side of an image, "
                   "this run: 96 pixels)", "--transforms preset (this run: tiny", "--config"):
        assert option in message, option
    assert err.value.__notes__[0].startswith("Nothing was trained yet and ")   # what is on disk
    assert isinstance(err.value.__cause__, StepOutOfMemoryError)


def test_the_command_line_reports_out_of_memory_with_exit_status_2(shapes_data, tmp_path,
                                                                  monkeypatch, capsys):
    import minidetr.training.trainer as train_module
    real = train_module.build_criterion
    monkeypatch.setattr(train_module, "build_criterion",
                        lambda cfg: _FailingCriterion(real(cfg), OUT_OF_MEMORY[0]))
    code = main(["train", "--data", str(shapes_data.root), "--device", "cpu", "--epochs", "1",
                 "--batch-size", "4", "--max-size", "80", "--transforms", "tiny",
                 "--num-workers", "0", "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: out of memory at epoch 1, step 1/3 on cpu")
    assert "--batch-size (this run: 4)" in err and "this run: 80 pixels" in err


def test_evaluation_out_of_memory_is_a_run_error_too(shapes_paths, tmp_path, monkeypatch,
                                                     small_config):
    import minidetr.training.trainer as train_module

    def evaluate(*args, **kwargs):
        raise OUT_OF_MEMORY[1]                       # e.g. cuBLAS fails to allocate

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    with pytest.raises(RunError) as err:
        run_training(small_config(), TrainConfig(**FAST), shapes_paths,
                     tmp_path / "run", progress=False, log=lambda *a: None)
    message = str(err.value)
    assert message.startswith("out of memory while evaluating on cpu: "
                              "CUBLAS_STATUS_ALLOC_FAILED")
    assert "--batch-size (this run: 2)" in message
