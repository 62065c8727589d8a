"""The notebooks cannot rot: each one runs, and each committed .ipynb matches its source.

For every ``notebooks/NN_*.py`` (found at collection time, so new notebooks are picked up
without touching this file):

* ``test_notebook_runs_in_tiny_setting``: the source, converted by jupytext, runs top to
  bottom in a fresh kernel of this interpreter with ``MINIDETR_NOTEBOOK_PRESET=tiny``
  (working directory ``notebooks/``; the executed copy goes to a temporary folder, the
  committed files are never touched). Its last cell's asserts are the notebook's checks.
* ``test_notebook_is_paired_and_executed``: the committed ``.ipynb`` exists, has the same
  cells as the source, was executed (outputs, no errors) and is small.
* ``test_notebook_follows_the_conventions``: opens with a markdown cell linking its doc in
  ``../docs/`` (which must exist), reads the preset variable, ends with a code cell of
  asserts.

The machinery itself (kernel choice, environment, pairing check) and the bundled pictures
are tested without a kernel where possible. Skipped, with the reason, when the notebook
extra (jupytext, nbclient, nbformat, ipykernel) is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys

import numpy as np
import pytest

from minidetr.lessons import notebooks as nt

MISSING = [m for m in ("jupytext", "nbclient", "nbformat", "ipykernel")
           if importlib.util.find_spec(m) is None]
needs_notebook_tools = pytest.mark.skipif(
    bool(MISSING), reason=f"notebook tools not installed ({', '.join(MISSING)}); "
                          "install them with: pip install -e '.[notebooks]'")

SOURCES = nt.notebook_sources()
NOTEBOOKS = [pytest.param(p, id=p.stem) for p in SOURCES] or \
    [pytest.param(None, id="none", marks=pytest.mark.skip(reason="no notebooks/NN_*.py yet"))]
TINY_CELL_TIMEOUT_S = 300


# --------------------------------------------------------------------------- every notebook
@needs_notebook_tools
@pytest.mark.slow
@pytest.mark.parametrize("source", NOTEBOOKS)
def test_notebook_runs_in_tiny_setting(source, tmp_path):
    import jupytext
    from nbclient.exceptions import CellExecutionError

    nb = nt.read_source(source)
    try:
        nt.execute(nb, cwd=source.parent, preset="tiny", timeout=TINY_CELL_TIMEOUT_S)
    except CellExecutionError as e:
        pytest.fail(f"{source.name} fails in the tiny setting "
                    f"({nt.PRESET_VARIABLE}=tiny):\n{e}", pytrace=False)
    finally:
        jupytext.write(nb, str(tmp_path / f"{source.stem}.ipynb"), fmt="ipynb")
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), \
        f"{source.name}: not every code cell ran"


@needs_notebook_tools
@pytest.mark.parametrize("source", NOTEBOOKS)
def test_notebook_is_paired_and_executed(source):
    problems = nt.pairing_problems(source)
    assert not problems, "\n".join(problems)


@needs_notebook_tools
@pytest.mark.parametrize("source", NOTEBOOKS)
def test_notebook_follows_the_conventions(source):
    nb = nt.read_source(source)
    first, last = nb.cells[0], nb.cells[-1]
    assert first.cell_type == "markdown", f"{source.name}: the first cell must be markdown"
    links = re.findall(r"\]\((\.\./docs/[^)#\s]+)", first.source)
    assert links, (f"{source.name}: the first cell must link its doc, e.g. "
                   "[deformable-attention.md](../docs/deformable-attention.md)")
    for link in links:
        assert (source.parent / link).is_file(), f"{source.name}: broken link {link}"
    assert nt.PRESET_VARIABLE in source.read_text(encoding="utf-8"), \
        f"{source.name} never reads {nt.PRESET_VARIABLE}, so the tests cannot shrink it"
    assert last.cell_type == "code" and "assert" in last.source, \
        f"{source.name}: the last cell must be code with checks (asserts)"
    text = source.read_text(encoding="utf-8")
    assert "formats: ipynb,py:percent" in text, f"{source.name}: not paired (jupytext header)"


# --------------------------------------------------------------------------- the machinery
@needs_notebook_tools
def test_kernel_is_this_interpreter_without_kernelspec_lookup():
    assert nt.kernel_command()[:3] == [sys.executable, "-m", "ipykernel_launcher"]


def test_kernel_environment_sets_or_removes_the_preset():
    base = {"MINIDETR_NOTEBOOK_PRESET": "tiny", "MPLBACKEND": "Agg", "PYTHONPATH": "/x"}
    full = nt.kernel_environment(None, environ=base)
    tiny = nt.kernel_environment("tiny", environ={})
    assert "MINIDETR_NOTEBOOK_PRESET" not in full and "MPLBACKEND" not in full
    assert full["PYTHONPATH"].split(os.pathsep) == [str(nt.REPO), "/x"]
    assert tiny["MINIDETR_NOTEBOOK_PRESET"] == "tiny"
    assert base["MPLBACKEND"] == "Agg", "the caller's dict must not be changed"


@needs_notebook_tools
@pytest.mark.slow
def test_execute_runs_this_python_with_the_preset_in_the_given_folder(tmp_path):
    """One kernel start: the three things every notebook run relies on."""
    source = tmp_path / "00_probe.py"
    source.write_text("# %%\nimport os, sys\n"
                      "print(sys.executable, os.environ.get('MINIDETR_NOTEBOOK_PRESET'), "
                      "os.getcwd())\n", encoding="utf-8")
    nb = nt.execute(nt.read_source(source), cwd=tmp_path, preset="tiny")
    printed = nb.cells[0].outputs[0]["text"].split()
    assert printed == [sys.executable, "tiny", str(tmp_path)]


@needs_notebook_tools
def test_pairing_problems_catch_missing_stale_and_unexecuted_notebooks(tmp_path):
    import jupytext
    import nbformat

    source = tmp_path / "01_demo.py"
    source.write_text("# %% [markdown]\n# Title\n\n# %%\nx = 1\nprint(x)\n", encoding="utf-8")
    assert "missing" in nt.pairing_problems(source)[0]

    nb = nt.read_source(source)
    jupytext.write(nb, str(source.with_suffix(".ipynb")), fmt="ipynb")     # never executed
    problems = " ".join(nt.pairing_problems(source))
    assert "not executed" in problems and "no outputs" in problems

    nb.cells[1].execution_count = 1
    nb.cells[1].outputs = [nbformat.v4.new_output("stream", name="stdout", text="1\n")]
    jupytext.write(nb, str(source.with_suffix(".ipynb")), fmt="ipynb")
    assert nt.pairing_problems(source) == []

    source.write_text(source.read_text(encoding="utf-8").replace("x = 1", "x = 2"),
                      encoding="utf-8")                                    # edited later
    assert "out of date" in " ".join(nt.pairing_problems(source))


def test_notebook_sources_select_by_stem_or_number(tmp_path):
    for name in ("01_a.py", "02_b.py", "10_c.py", "helper.py"):
        (tmp_path / name).write_text("", encoding="utf-8")
    assert [p.name for p in nt.notebook_sources(folder=tmp_path)] == ["01_a.py", "02_b.py",
                                                                      "10_c.py"]
    assert [p.name for p in nt.notebook_sources(["10", "01_a.ipynb"], folder=tmp_path)] == \
        ["10_c.py", "01_a.py"]
    with pytest.raises(ValueError, match="no notebook source matches '03'"):
        nt.notebook_sources(["03"], folder=tmp_path)


# --------------------------------------------------------------------------- the pictures
def test_bundled_pictures_are_licensed_attributed_and_match_their_annotations():
    data = nt.example_annotations()
    attribution = (nt.IMAGES / "ATTRIBUTION.md").read_text(encoding="utf-8")
    licenses = {lic["id"] for lic in data["licenses"]}
    assert [im["id"] for im in data["images"]] == list(nt.EXAMPLE_IMAGE_IDS)
    for index, info in enumerate(data["images"]):
        assert info["license"] in nt.ALLOWED_LICENSES and info["license"] in licenses, info
        assert info["file_name"] in attribution and info["flickr_url"] in attribution, info
        example = nt.load_example(index)
        H, W = example.image.shape[:2]
        assert (W, H) == (info["width"], info["height"]) and max(H, W) <= 480, info
        assert example.image.dtype == np.float32
        assert 0 <= example.image.min() <= example.image.max() <= 1
        boxes = example.boxes
        assert len(boxes) == len(example.labels) > 0, info
        assert (boxes[:, 2:] > boxes[:, :2]).all(), f"image {info['id']}: empty boxes"
        assert (boxes >= -0.5).all() and (boxes[:, [0, 2]] <= W + 0.5).all() \
            and (boxes[:, [1, 3]] <= H + 0.5).all(), f"image {info['id']}: box outside"
    # ids are COCO's, so every annotation refers to a bundled image and a listed category
    image_ids = {im["id"] for im in data["images"]}
    category_ids = {c["id"] for c in data["categories"]}
    assert all(a["image_id"] in image_ids and a["category_id"] in category_ids
               for a in data["annotations"])
