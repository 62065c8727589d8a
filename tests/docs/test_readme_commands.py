"""The README's shell commands work as written.

Every ``python -m minidetr ...`` line of the README's ```bash blocks is parsed by the real
argument parser (so a renamed option fails here), every ``make`` target exists, and the
"Training on your own data" block is *run*, in a scratch folder holding a small shapes set
at the README's paths: the eval, predict and subset lines verbatim; the two training lines
with options appended that shrink them to seconds (``--epochs 1`` ... for the first, a total
of 2 epochs for the resume); then the Python block that follows them.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from minidetr.cli import build_parser, main
from minidetr.data import generate_shapes_dataset

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
AFTER_MARK = "# after the commands above"


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def commands(block):
    """The command lines of a bash block as argv lists (continuations joined, comments out)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            out.append(argv)
    return out


def minidetr_args(argv):
    return argv[3:] if argv[:3] == ["python", "-m", "minidetr"] else None


def test_every_readme_command_parses():
    text = README.read_text(encoding="utf-8")
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    problems, seen = [], 0
    for block in bash_blocks(text):
        for argv in commands(block):
            args = minidetr_args(argv)
            if args is not None:
                seen += 1
                try:
                    build_parser().parse_args(args)
                except SystemExit:
                    problems.append(" ".join(argv))
            elif argv[0] == "make":
                problems += [f"make {t}: no such target" for t in argv[1:] if t not in targets]
            elif argv[0] == "bash":
                problems += [f"{p}: no such script" for p in argv[1:2] if not (REPO / p).is_file()]
    assert seen >= 10, f"only {seen} minidetr commands found in README.md"
    assert not problems, "README.md commands that do not work:\n" + "\n".join(problems)


def _own_data_section():
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Training on your own data"):]
    section = section[:section.index("\n## ", 5)]
    block = bash_blocks(section)[0]
    python = [b for b in re.findall(r"```python\n(.*?)```", section, flags=re.S)
              if b.startswith(AFTER_MARK)]
    return commands(block), python


def test_the_own_data_commands_run_as_written(tmp_path, monkeypatch, capsys):
    lines, python_blocks = _own_data_section()
    assert [minidetr_args(a)[0] for a in lines] == ["train", "train", "eval", "predict",
                                                     "subset"], lines
    monkeypatch.chdir(tmp_path)
    generate_shapes_dataset(tmp_path / "data" / "shapes", num_train=40, num_val=4,
                            image_size=(64, 64), seed=0)
    shrink = ["--epochs", "1", "--max-size", "64", "--batch-size", "4", "--num-workers", "0",
              "--max-train-images", "8", "--no-progress"]
    for argv in lines:
        args = minidetr_args(argv)
        if args[0] == "train" and "--resume" not in args:
            args = args + shrink                          # seconds instead of minutes
        elif args[0] == "train":
            args = args + ["--epochs", "2", "--no-progress"]
        code = main(args)
        assert code == 0, f"README command failed (exit {code}): {' '.join(argv)}\n" \
                          f"{capsys.readouterr().err}"
    assert (tmp_path / "runs" / "detections.json").is_file()
    assert (tmp_path / "runs" / "subset.json").is_file()
    assert len(list((tmp_path / "runs" / "pictures").glob("*.jpg"))) == 4
    capsys.readouterr()
    assert python_blocks, "the own-data section has no Python example"
    for block in python_blocks:
        exec(compile(block, "README.md own-data python block", "exec"), {})
    printed = capsys.readouterr().out
    assert all(len(line.split()) >= 3 for line in printed.splitlines()), printed


def test_the_coco128_baseline_command_names_real_paths(shared_dir):
    text = README.read_text(encoding="utf-8")
    baseline = [a for b in bash_blocks(text) for a in commands(b)
                if "coco128" in " ".join(a) and minidetr_args(a)]
    assert baseline, "README.md has no coco128 command"
    for argv in baseline:
        paths = [a for a in minidetr_args(argv) if "data/coco128" in a]   # the inputs
        missing = [p for p in paths if not (REPO / p).exists()]
        assert not missing, f"README coco128 command names missing paths {missing}"
