"""Training that fails early, loses nothing and never traps the user (through the CLI).

Every case asserts the exit status, that stderr holds no traceback, the message, and that
nothing is lost: the previous checkpoint is intact, no temporary file is left, and where
training continues it ends with exactly (bit for bit) the weights of a run that never
failed. The detector is the small one of tests/conftest.py (``get_config`` is patched).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

import minidetr.files as files_module
from minidetr.cli import main
from minidetr.training.trainer import GracefulInterrupt
from minidetr.weights.checkpoint import CorruptCheckpointError, load_checkpoint

pytestmark = pytest.mark.xdist_group("failures")      # the straight run is made once

# 12 training images / batch 4 = 3 steps per epoch, 2 epochs
OPTIONS = ["--device", "cpu", "--epochs", "2", "--batch-size", "4", "--max-size", "80",
           "--transforms", "tiny", "--num-workers", "0", "--lr", "1e-3", "--no-progress"]


def _small(config_module, small_config):
    real = config_module.get_config
    return lambda name, variant="plain", **kw: (small_config(variant, **kw) if name == "tiny"
                                                else real(name, variant, **kw))


@pytest.fixture(autouse=True)
def small_model(monkeypatch, small_config):
    """``--config tiny`` builds the small test detector (a few seconds per run)."""
    import minidetr.models.config as config_module
    monkeypatch.setattr(config_module, "get_config", _small(config_module, small_config))


@pytest.fixture
def data(shapes_data, tmp_path):
    """A private copy of the shapes data (tests damage its images)."""
    root = tmp_path / "data"
    shutil.copytree(shapes_data.root, root)
    return root


def _train(data, run, *extra):
    return main(["train", "--data", str(data), "--out", str(run), *OPTIONS, *extra])


@pytest.fixture(scope="module")
def straight(shapes_data, small_config, tmp_path_factory):
    """The reference: the same 2-epoch run, never interrupted."""
    import minidetr.models.config as config_module
    run = tmp_path_factory.mktemp("straight") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(config_module, "get_config", _small(config_module, small_config))
        assert _train(shapes_data.root, run) == 0
    return run


def _same_weights(run, reference):
    """Assert that two checkpoints hold the same weights, moments and RNG, bit for bit."""
    a, b = load_checkpoint(run), load_checkpoint(reference)
    assert a.progress["epoch"] == b.progress["epoch"] == 2
    for key, value in b.model_state.items():
        assert a.model_state[key].tobytes() == value.tobytes(), f"weights differ: {key}"
    for index, state in b.optimizer_state["state"].items():
        assert a.optimizer_state["state"][index]["exp_avg"].tobytes() == \
            state["exp_avg"].tobytes(), f"AdamW moment differs: parameter {index}"
    assert a.rng == b.rng
    assert a.progress["history"] == [
        {**h, "seconds": a.progress["history"][i]["seconds"]}
        for i, h in enumerate(b.progress["history"])], "metrics differ"


def _no_traceback(err):
    assert "Traceback" not in err and 'File "' not in err, err


def _stderr(capsys):
    """What the command wrote on stderr, less ``warning:`` lines about the data."""
    return "".join(line + "\n" for line in _error_lines(capsys.readouterr().err))


def _error_lines(err):
    """stderr without ``warning:`` lines (about the data, not the failure under test)."""
    return [line for line in err.splitlines() if not line.startswith("warning: ")]


def _no_temporaries(folder):
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert not left, f"temporary files left behind: {left}"


def _fail_writes(monkeypatch, name, error, after=0, where="fsync"):
    """Make writes of ``name`` fail with ``error`` (an errno) after ``after`` good ones.

    ``where="fsync"``: the data is written, the flush fails (a disk that fills up);
    ``"mkstemp"``: the temporary file cannot even be created (read-only, no permission).
    """
    calls = {"n": 0}
    if where == "fsync":
        real = os.fsync

        def fsync(fd):
            if f".{name}." in os.readlink(f"/proc/self/fd/{fd}"):
                calls["n"] += 1
                if calls["n"] > after:
                    raise OSError(error, os.strerror(error))
            return real(fd)
        monkeypatch.setattr(files_module.os, "fsync", fsync)
    else:
        real = files_module.tempfile.mkstemp

        def mkstemp(prefix="", suffix="", dir=None):
            if prefix == f".{name}.":
                calls["n"] += 1
                if calls["n"] > after:
                    raise OSError(error, os.strerror(error))
            return real(prefix=prefix, suffix=suffix, dir=dir)
        monkeypatch.setattr(files_module.tempfile, "mkstemp", mkstemp)


# --------------------------------------------------------------------------- disk errors
@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_a_full_disk_mid_run_keeps_the_last_checkpoint_and_resumes_exactly(
        data, tmp_path, monkeypatch, capsys, straight):
    run = tmp_path / "run"
    _fail_writes(monkeypatch, "last.npz", errno.ENOSPC, after=1)    # epoch 2's save fails
    assert _train(data, run) == 1
    err = _stderr(capsys)
    _no_traceback(err)
    lines = _error_lines(err)
    assert len(lines) == 2, err
    assert lines[0].startswith(f"error: cannot write the checkpoint {run / 'last.npz'}: no "
                               f"space left on the device of {run} (the checkpoint needs about ")
    assert re.search(r"needs about [0-9.]+ kB; free some space there", lines[0]), lines[0]
    assert lines[1] == (f"Saving a checkpoint failed too; {run / 'last.npz'} (after epoch 1) "
                        f"is intact. Continue from it with `python -m minidetr train --resume "
                        f"{run}` once the cause is fixed.")
    assert load_checkpoint(run / "last.npz").progress["epoch"] == 1          # intact
    _no_temporaries(run)

    monkeypatch.undo()                                   # space freed: continue
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _same_weights(run / "last.npz", straight / "last.npz")


def _mount_tmpfs(folder, size):
    """Mount a tmpfs of ``size`` at ``folder``; False where this is not allowed (not root)."""
    folder.mkdir(parents=True, exist_ok=True)
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True)
    return done.returncode == 0


def test_a_real_full_disk_on_a_small_tmpfs(data, tmp_path, capsys, straight):
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "1500k"):          # room for about 2.5 checkpoints
        pytest.skip("cannot mount a small tmpfs here (needs root on Linux); the patched "
                    "writers above cover the same path")
    try:
        run = disk / "run"
        assert _train(data, run) == 1
        err = _stderr(capsys)
        _no_traceback(err)
        assert err.startswith("error: cannot write the checkpoint ") and \
            f"no space left on the device of {run}" in err, err
        assert "is intact. Continue from it with `python -m minidetr train --resume" in err
        assert load_checkpoint(run / "last.npz").progress["epoch"] >= 1       # readable
        _no_temporaries(run)
        subprocess.run(["mount", "-o", "remount,size=20m", str(disk)], check=True)
        assert main(["train", "--resume", str(run), "--no-progress"]) == 0   # space freed
        _same_weights(run / "last.npz", straight / "last.npz")
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


@pytest.mark.parametrize("error, where, reason", [
    (errno.EROFS, "mkstemp", "is on a read-only file system (write to another folder)"),
    (errno.EACCES, "mkstemp", "permission denied: this user may not write in"),
    (errno.ENOSPC, "fsync", "no space left on the device of"),
])
def test_an_unwritable_output_folder_is_one_error_line(data, tmp_path, monkeypatch, capsys,
                                                       error, where, reason):
    run = tmp_path / "run"
    if where == "fsync" and not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd (Linux)")
    _fail_writes(monkeypatch, "run.json", error, where=where)
    assert _train(data, run) == 1
    err = _stderr(capsys)
    _no_traceback(err)
    assert err.startswith(f"error: cannot write the run description {run / 'run.json'}: ")
    assert reason in err and len(_error_lines(err)) == 1, err
    assert not list(run.iterdir()), "nothing may be left in the folder"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="permissions are not enforced for root")
def test_a_real_read_only_folder(data, tmp_path, capsys):
    parent = tmp_path / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert _train(data, parent / "run") == 1
    finally:
        parent.chmod(0o755)
    err = _stderr(capsys)
    _no_traceback(err)
    assert err.startswith("error: cannot write the run folder") and "permission denied" in err


# --------------------------------------------------------------------------- SIGTERM
_LAUNCHER = """
import json, os, sys
import minidetr.models.config as config_module
import minidetr.training.engine as engine
from minidetr.cli import main
real, step = config_module.get_config, engine.train_step
small = {k: tuple(v) if isinstance(v, list) else v
         for k, v in json.loads(os.environ["SMALL_MODEL"]).items()}
config_module.get_config = lambda name, variant="plain", **kw: real(name, variant,
                                                                   **{**small, **kw})
def logged(*args, **kwargs):
    values = step(*args, **kwargs)
    print("STEP DONE", file=sys.stderr, flush=True)
    return values
engine.train_step = logged
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_mid_epoch_saves_and_resumes_bit_for_bit(data, tmp_path, straight, capsys):
    from conftest import SMALL_MODEL

    run = tmp_path / "run"
    env = dict(os.environ, SMALL_MODEL=json.dumps(SMALL_MODEL),
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, "train", "--data", str(data),
                             "--out", str(run), *OPTIONS], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    err, sent = [], False
    for line in proc.stderr:                  # SIGTERM as soon as the first step is logged
        err.append(line)
        if line.startswith("STEP DONE") and not sent:
            proc.send_signal(signal.SIGTERM)
            sent = True
    out, err = proc.stdout.read(), "".join(err)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM, err
    _no_traceback(err)
    assert "SIGTERM: stopping after this step and saving a checkpoint" in out
    assert f"interrupted: saved {run / 'last.npz'} (epoch 1, " in out
    progress = load_checkpoint(run / "last.npz").progress
    assert progress["epoch"] == 0 and 1 <= progress["step"] < 3, progress   # mid-epoch
    _no_temporaries(run)

    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _same_weights(run / "last.npz", straight / "last.npz")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers can only be installed in the main thread")
def test_sigterm_is_handled_like_ctrl_c():
    messages = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with GracefulInterrupt(log=messages.append) as interrupt:
        signal.raise_signal(signal.SIGTERM)
        assert interrupt.requested and interrupt.signal == signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):             # a second one stops at once
            signal.raise_signal(signal.SIGTERM)
    assert messages == ["\nSIGTERM: stopping after this step and saving a checkpoint (another "
                        "SIGTERM stops at once, without saving)"]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


# --------------------------------------------------------------------------- bad images
def _truncate(path, keep=0.6):
    content = path.read_bytes()
    path.write_bytes(content[:int(len(content) * keep)])
    return content


def test_a_corrupt_validation_image_stops_the_run_before_training(data, tmp_path, capsys):
    image = sorted((data / "val").iterdir())[1]
    _truncate(image)
    run = tmp_path / "run"
    assert _train(data, run) == 2
    err = _stderr(capsys)
    _no_traceback(err)
    assert err.startswith(f"error: {data / 'annotations' / 'instances_val.json'}: 1 of 4 val "
                          "images failed the pre-flight check (nothing was trained):\n"
                          f"  image {image} (image id ")
    assert "cannot decode" in err
    assert not run.exists(), "a run that never started leaves no folder behind"


def test_a_corrupt_validation_image_found_by_evaluation_loses_no_training(
        data, tmp_path, capsys, straight):
    image = sorted((data / "val").iterdir())[1]
    content = _truncate(image)                       # the header survives: only decoding fails
    run = tmp_path / "run"
    assert _train(data, run, "--check-images", "header") == 2
    err = _stderr(capsys)
    _no_traceback(err)
    lines = _error_lines(err)
    assert lines[0].startswith(f"error: image {image} (image id ") and "cannot decode" in lines[0]
    assert lines[1] == (f"Saved {run / 'last.npz'} (epoch 1, 3 of 3 steps done) before "
                        f"stopping; continue the run with `python -m minidetr train --resume "
                        f"{run}` once the cause is fixed.")
    progress = load_checkpoint(run / "last.npz").progress
    assert (progress["epoch"], progress["step"]) == (0, 3)        # the epoch's training kept

    image.write_bytes(content)                                     # the image is repaired
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    _same_weights(run / "last.npz", straight / "last.npz")


def test_an_image_of_another_size_than_its_json_entry_is_found_before_training(
        data, tmp_path, capsys):
    from PIL import Image

    image = sorted((data / "train").iterdir())[4]
    with Image.open(image) as im:
        im.load()
        im.resize((im.width + 4, im.height)).save(image)
    assert _train(data, tmp_path / "run") == 2
    err = _stderr(capsys)
    _no_traceback(err)
    assert "1 of 12 train images failed the pre-flight check" in err
    assert f"image {image} (image id " in err and "is 64x68 (h x w) but" in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- half-made runs
def test_a_run_that_saved_nothing_never_traps_the_user(data, tmp_path, capsys, monkeypatch,
                                                       straight):
    import minidetr.training.trainer as train_module

    real = train_module.build_criterion

    class NaNAtFirstStep:                    # the first step's loss is NaN: nothing saved
        def __init__(self, cfg):
            self.criterion, self.weight_dict = real(cfg), real(cfg).weight_dict

        def __call__(self, outputs, targets):
            losses = self.criterion(outputs, targets)
            return {**losses, "loss_giou": losses["loss_giou"] * float("nan")}

        def total(self, losses):
            return self.criterion.total(losses)

    run = tmp_path / "run"
    for attempt in ("again", "resume"):
        monkeypatch.setattr(train_module, "build_criterion", NaNAtFirstStep)
        assert _train(data, run) == 1
        err = _stderr(capsys)
        _no_traceback(err)
        lines = _error_lines(err)
        assert lines[0].startswith("error: non-finite loss at epoch 1, step 1/3")
        assert lines[1] == (f"Nothing was trained yet and {run} holds no checkpoint; once the "
                            "cause is fixed, the same command starts the run again (no "
                            "--overwrite needed).")
        assert (run / "run.json").is_file() and not (run / "last.npz").exists()
        monkeypatch.setattr(train_module, "build_criterion", real)
        if attempt == "again":              # the same command, without --overwrite
            assert _train(data, run) == 0
            assert "holds a run that stopped before saving any checkpoint" in                 capsys.readouterr().out
        else:                               # --resume starts it again from run.json
            assert main(["train", "--resume", str(run), "--no-progress"]) == 0
            assert "holds no checkpoint: the run stopped before its first step finished" in                 capsys.readouterr().out
        _same_weights(run / "last.npz", straight / "last.npz")
        shutil.rmtree(run)


def test_an_unexpected_error_after_the_first_step_saves_and_logs_the_traceback(
        data, tmp_path, capsys, monkeypatch):
    import minidetr.training.trainer as train_module

    def evaluate(*args, **kwargs):
        raise TypeError("boom")

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    run = tmp_path / "run"
    assert _train(data, run) == 1
    err = _stderr(capsys)
    _no_traceback(err)
    assert _error_lines(err) == [
        "error: the run stopped on an unexpected error: TypeError: boom",
        f"Saved {run / 'last.npz'} (epoch 1, 3 of 3 steps done) before stopping; continue the "
        f"run with `python -m minidetr train --resume {run}` once the cause is fixed.",
        f"The full traceback is in {run / 'error.log'}."]
    log = (run / "error.log").read_text()
    assert log.startswith("Traceback") and "TypeError: boom" in log


# --------------------------------------------------------------------------- checkpoints
def test_a_damaged_last_npz_offers_the_previous_one_and_best(tmp_path, capsys, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    assert load_checkpoint(run / "last.prev.npz").progress["epoch"] == 1
    _truncate(run / "last.npz", keep=0.5)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = _stderr(capsys)
    _no_traceback(err)
    lines = _error_lines(err)
    assert lines[0].startswith(f"error: {run / 'last.npz'}: damaged: not a readable .npz")
    best = load_checkpoint(run / "best.npz").progress["epoch"]
    assert lines[1] == (
        "Resume from an earlier checkpoint instead (the training after it is redone, and "
        "last.npz is replaced at the next save): `python -m minidetr train --resume "
        f"{run / 'last.prev.npz'}` (after epoch 1); `python -m minidetr train --resume "
        f"{run / 'best.npz'}` (after epoch {best}).")

    assert main(["train", "--resume", str(run / "last.prev.npz"), "--no-progress"]) == 0
    _same_weights(run / "last.npz", straight / "last.npz")        # epoch 2 redone exactly
    # the damaged file was not kept as last.prev.npz: the good epoch-1 checkpoint still is
    assert load_checkpoint(run / "last.prev.npz").progress["epoch"] == 1
    _no_temporaries(run)


def test_a_missing_last_npz_points_to_the_other_checkpoints(tmp_path, capsys, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    (run / "last.npz").unlink()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = _stderr(capsys)
    _no_traceback(err)
    assert err.startswith(f"error: cannot resume: {run} holds no last.npz. Resume from an "
                          "earlier checkpoint instead")
    assert f"`python -m minidetr train --resume {run / 'last.prev.npz'}` (after epoch 1)" in err
    assert sorted(p.name for p in run.glob("*.npz")) == ["best.npz", "last.prev.npz"]


def _damage_member(src, dst, key):
    """Copy the archive ``src`` to ``dst`` with the ``.npy`` header of ``key`` garbled."""
    import zipfile
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            content = zin.read(info)
            if info.filename == f"{key}.npy":
                content = content.replace(b"'descr'", b"'d#scr'", 1)
            zout.writestr(info.filename, content)


def test_a_corrupt_npy_member_is_reported_as_corruption_not_pickle(tmp_path, capsys, straight):
    run = tmp_path / "run"
    shutil.copytree(straight, run)
    key = next(k for k in load_checkpoint(run).model_state)
    _damage_member(straight / "last.npz", run / "last.npz", f"model/{key}")
    with pytest.raises(CorruptCheckpointError) as err:
        load_checkpoint(run / "last.npz")
    assert err.value.member == f"model/{key}.npy"
    assert str(err.value).startswith(f"{run / 'last.npz'}: damaged: archive member "
                                     f"'model/{key}.npy' is corrupt (")
    assert "pickle" not in str(err.value)

    assert main(["train", "--resume", str(run), "--no-progress"]) == 2
    err = _stderr(capsys)
    _no_traceback(err)
    assert err.startswith(f"error: {run / 'last.npz'}: damaged: archive member") and \
        "pickle" not in err
    assert f"--resume {run / 'last.prev.npz'}` (after epoch 1)" in err


# --------------------------------------------------------------------------- messages
def test_dropped_boxes_are_reported_once_per_split_without_python_warnings(
        data, tmp_path, capsys):
    ann = data / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    first = coco["annotations"][0]
    coco["annotations"].append({**first, "id": 10_000, "bbox": [3, 3, 0, 5]})   # zero width
    ann.write_text(json.dumps(coco))
    run = tmp_path / "run"
    assert main(["train", "--data", str(ann), str(data / "train"), "--val-data", str(ann),
                 str(data / "train"), "--out", str(run), *OPTIONS, "--epochs", "1",
                 "--max-val-images", "4"]) == 0
    captured = capsys.readouterr()
    assert "Warning" not in captured.err and "warnings.warn" not in captured.err, captured.err
    dropped = (f"  dropped: 1 box with zero or negative width or height (image id "
               f"{first['image_id']})")
    lines = captured.out.splitlines()
    assert lines.count(dropped) == 2, captured.out            # once for train, once for val
    assert any(line.startswith("val split (instances_train.json, the same file as the train "
                               "split): 4 images") for line in lines), captured.out


def test_other_commands_print_a_dataset_warning_as_one_plain_line(data, capsys, straight):
    ann = data / "annotations" / "instances_val.json"
    coco = json.loads(ann.read_text())
    coco["annotations"].append({**coco["annotations"][0], "id": 10_000, "bbox": [3, 3, 0, 5]})
    ann.write_text(json.dumps(coco))
    assert main(["eval", str(straight / "last.npz"), "--data", str(data),
                 "--no-progress", "--device", "cpu", "--num-workers", "0"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"warning: {ann}: 4 images (0 without objects), 11 annotations -> 10 objects; 0 crowd "
        "regions removed; 1 boxes with zero or negative width/height dropped; 0 boxes clipped "
        "to the image"], err


def test_a_warning_raised_twice_in_one_command_is_printed_once(monkeypatch, capsys):
    import warnings

    import minidetr.cli as cli
    from minidetr.data import DatasetWarning

    def command(args):
        for split in ("train", "val"):          # e.g. both splits read the same json
            warnings.warn("ann.json: 1 boxes dropped", DatasetWarning, stacklevel=2)
        warnings.warn("another one", UserWarning)
    monkeypatch.setattr(cli, "_cmd_eval", command)
    assert main(["eval", "x.npz"]) == 0
    assert capsys.readouterr().err.splitlines() == ["warning: ann.json: 1 boxes dropped",
                                                    "warning: another one"]
