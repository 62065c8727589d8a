"""The notebooks' exercises have solutions, and the solutions hold.

Convention (see ``notebooks/solutions/README.md``):

* every notebook ``notebooks/NN_name.py`` ends with a markdown cell whose first line is
  ``## Exercises``, holding 3 to 5 numbered exercises (``1. ...``, ``2. ...``), placed after
  every code cell but the last one (the code cell of asserts; a markdown cell such as a
  "## Checks" heading may sit in between);
* its solutions are ``notebooks/solutions/NN_name.py``: a plain module with functions
  ``exercise_1()``, ``exercise_2()``, ... (one per exercise, same numbers) that run in
  seconds on the CPU with tiny sizes and *assert* what the exercise claims.

This file finds the solution modules at collection time (so a new one is picked up without
touching it), imports each one in isolation and calls every ``exercise_*`` function. It
fails when a notebook has no Exercises section, when a solution file has no notebook or
an Exercises section no solution file, or when the numbers differ.
"""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = REPO / "notebooks"
SOLUTIONS = NOTEBOOKS / "solutions"
EXERCISES_HEADING = re.compile(r"^##\s+Exercises\s*$")
NUMBERED_ITEM = re.compile(r"^(\d+)\.\s")              # "1. ..." at the start of a line
EXERCISE_FUNCTION = re.compile(r"^exercise_(\d+)$")
MIN_EXERCISES, MAX_EXERCISES = 3, 5


# --------------------------------------------------------------------------- reading
def notebook_cells(path):
    """``[(kind, text)]`` of a jupytext ``py:percent`` source: kind is ``"markdown"`` or
    ``"code"``; markdown text has the leading ``# `` of each line removed. The jupytext
    header (before the first ``# %%``) is left out."""
    cells, kind, lines = [], None, []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# %%"):
            if kind is not None:
                cells.append((kind, "\n".join(lines).strip("\n")))
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
            continue
        if kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line)
    if kind is not None:
        cells.append((kind, "\n".join(lines).strip("\n")))
    return cells


def exercises_section(path):
    """``(index of the Exercises cell, [kind of every cell], [exercise numbers])``, or None
    when the notebook has no markdown cell headed ``## Exercises``."""
    cells = notebook_cells(path)
    for index, (kind, text) in enumerate(cells):
        first = text.strip().splitlines()[0] if text.strip() else ""
        if kind == "markdown" and EXERCISES_HEADING.match(first):
            numbers = [int(m.group(1)) for line in text.splitlines()
                       if (m := NUMBERED_ITEM.match(line))]
            return index, [k for k, _ in cells], numbers
    return None


def exercise_functions(path):
    """The numbers of the top-level ``exercise_N`` functions of a solution file, sorted
    (read with ``ast``, nothing imported)."""
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=str(path))
    return sorted(int(m.group(1)) for node in tree.body
                  if isinstance(node, ast.FunctionDef)
                  and (m := EXERCISE_FUNCTION.match(node.name)))


def load_solution(path):
    """Import a solution file as a fresh module (never cached in ``sys.modules``)."""
    name = f"_minidetr_solution_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module          # dataclasses and pickling look modules up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def solution_files(folder=SOLUTIONS):
    return sorted(p for p in Path(folder).glob("*.py") if not p.name.startswith("_"))


def notebook_sources(folder=NOTEBOOKS):
    return sorted(Path(folder).glob("[0-9][0-9]_*.py"))


SOLUTION_FILES = solution_files()
CASES = [pytest.param(path, number, id=f"{path.stem}-exercise_{number}")
         for path in SOLUTION_FILES for number in exercise_functions(path)] or \
    [pytest.param(None, None, id="none",
                  marks=pytest.mark.skip(reason="no notebooks/solutions/*.py yet"))]


# --------------------------------------------------------------------------- the solutions
@pytest.mark.parametrize("path, number", CASES)
def test_solution_runs_and_its_asserts_hold(path, number):
    module = load_solution(path)
    try:
        start = time.perf_counter()
        getattr(module, f"exercise_{number}")()
        elapsed = time.perf_counter() - start
    finally:
        sys.modules.pop(module.__name__, None)
    print(f"{path.stem} exercise_{number}: {elapsed:.2f} s")


# --------------------------------------------------------------------------- the pairing
@pytest.mark.parametrize("path", [pytest.param(p, id=p.stem) for p in SOLUTION_FILES])
def test_each_solution_file_matches_its_notebooks_exercises(path):
    notebook = NOTEBOOKS / path.name
    assert notebook.is_file(), (f"{path.relative_to(REPO)} has no notebook "
                                f"notebooks/{path.name}: name it after the notebook's stem")
    section = exercises_section(notebook)
    assert section is not None, (f"{path.relative_to(REPO)} solves exercises, but "
                                 f"notebooks/{path.name} has no markdown cell '## Exercises'")
    index, kinds, numbers = section
    assert "code" not in kinds[index + 1:-1], (
        f"notebooks/{path.name}: the Exercises cell must come after the last code cell but "
        f"the final one (the asserts); code cells {[i + 1 for i, k in enumerate(kinds) if k == 'code' and index < i < len(kinds) - 1]} follow it")
    assert numbers == list(range(1, len(numbers) + 1)), \
        f"notebooks/{path.name}: exercises must be numbered 1, 2, 3, ...; found {numbers}"
    assert MIN_EXERCISES <= len(numbers) <= MAX_EXERCISES, \
        f"notebooks/{path.name}: {len(numbers)} exercises; want {MIN_EXERCISES} to {MAX_EXERCISES}"
    functions = exercise_functions(path)
    assert functions == numbers, (f"notebooks/{path.name} has exercises {numbers}, but "
                                  f"{path.relative_to(REPO)} defines exercise_ functions "
                                  f"{functions}")


@pytest.mark.parametrize("notebook", [pytest.param(p, id=p.stem) for p in notebook_sources()])
def test_every_notebook_has_exercises_with_a_solution_file(notebook):
    assert exercises_section(notebook) is not None, (
        f"{notebook.name} has no Exercises section: end it with a markdown cell '## Exercises' "
        f"(3 to {MAX_EXERCISES} numbered exercises) before its final cell of asserts")
    solution = SOLUTIONS / notebook.name
    assert solution.is_file(), (f"{notebook.name} has an Exercises section but no solutions: "
                                f"add {solution.relative_to(REPO)} with exercise_1(), ...")


# --------------------------------------------------------------------------- the machinery
def test_the_reader_finds_sections_numbers_and_functions(tmp_path):
    notebook = tmp_path / "01_demo.py"
    notebook.write_text(
        "# ---\n# jupyter: {}\n# ---\n\n# %% [markdown]\n# # Title\n\n# %%\nx = 1\n\n"
        "# %% [markdown]\n# ## Exercises\n#\n# 1. **Predict.** a\n#    2. not an item\n"
        "# 2. **Break.** b\n# 3. c\n\n# %%\nassert x == 1\n", encoding="utf-8")
    assert [kind for kind, _ in notebook_cells(notebook)] == ["markdown", "code", "markdown",
                                                              "code"]
    assert exercises_section(notebook) == (2, ["markdown", "code", "markdown", "code"],
                                           [1, 2, 3])
    notebook.write_text("# %% [markdown]\n# ## Exercises are fun\n\n# %%\nx = 1\n",
                        encoding="utf-8")
    assert exercises_section(notebook) is None

    solution = tmp_path / "solutions.py"
    solution.write_text("def exercise_2():\n    pass\n\ndef exercise_1():\n    assert 1\n\n"
                        "def helper():\n    pass\n\nclass exercise_3:\n    pass\n",
                        encoding="utf-8")
    assert exercise_functions(solution) == [1, 2]
    module = load_solution(solution)
    try:
        assert callable(module.helper) and module.exercise_1() is None
    finally:
        sys.modules.pop(module.__name__, None)
