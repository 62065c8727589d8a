"""The documentation cannot point at things that are not there.

Checked in ``docs/*.md``, ``README.md`` and the markdown cells of ``notebooks/*.py``:

* every relative link ``[text](path)`` names an existing file or folder, and a
  ``#anchor`` (``path.md#anchor`` or ``#anchor`` in the same page) names a heading of
  that page, with GitHub's slugs (``## 3. Evaluation: COCO box AP`` ->
  ``#3-evaluation-coco-box-ap``);
* every code path in backticks (`` `minidetr/training/engine.py` ``, `` `tests/core/test_x.py` ``,
  `` `minidetr/ops/msda/` ``) exists, and so does a bare file name that follows one in the
  same paragraph or table (`` `minidetr/models/matcher.py`, `criterion.py` ``: the name is
  looked up beside the path before it, or in a folder above);
* every dotted name `` `minidetr.a.b` `` (a call's arguments ignored) imports and
  resolves, attribute by attribute;
* every Python name in an "implemented by" table or sentence resolves in the modules that
  table or sentence names (`` `minidetr/training/engine.py`: `train_one_epoch` `` ->
  ``minidetr.training.engine.train_one_epoch``; `` `box_ops.inverse_sigmoid` `` through the
  submodule ``box_ops``); a name in parentheses after a function or class
  (`` `DeformableTransformer.forward` (`query_embed`) ``) must appear in its source.

Links, paths and names inside fenced code blocks and LaTeX are not checked (they are code
and mathematics, not references). Each failure lists every problem of one page with its
line number.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
NOTEBOOK_SOURCES = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.py"))
PAGES = [*DOCS, REPO / "README.md", *NOTEBOOK_SOURCES]
PATH_ROOTS = ("minidetr", "tests", "notebooks", "docs")

FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
INLINE_MATH = re.compile(r"(?<![\\$])\$(?!\$)[^$\n]+?(?<!\\)\$")
IDENTIFIER = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
REPO_PATH = re.compile(rf"(?:{'|'.join(PATH_ROOTS)})(?:/[\w.\-]+)*/?")
SOURCE_FILE = re.compile(r"[\w\-]+\.(?:py|cu|cpp|md)")
IMPLEMENTED_BY_HEADER = re.compile(r"implemented by|\bwhere\b", re.IGNORECASE)


# --------------------------------------------------------------------------- reading pages
def markdown_lines(path):
    """``(line number, text)`` of the markdown of a page, fenced code blocks left out.

    For a notebook source (jupytext ``py:percent``) that is the text of its markdown
    cells, without the leading ``# `` of each line; line numbers are the source's.
    """
    text = Path(path).read_text(encoding="utf-8").splitlines()
    if Path(path).suffix == ".py":
        lines, in_markdown = [], False
        for number, line in enumerate(text, 1):
            if line.startswith("# %%"):
                in_markdown = "[markdown]" in line
                continue
            if in_markdown and line.startswith("#"):
                lines.append((number, line[2:] if line.startswith("# ") else line[1:]))
            elif in_markdown:
                lines.append((number, ""))
    else:
        lines = list(enumerate(text, 1))
    kept, in_fence, in_math = [], False, False
    for number, line in lines:
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if line.strip() == "$$":                       # a display-math block's delimiter
            in_math = not in_math
            continue
        if in_fence or in_math:
            continue
        kept.append((number, line))
    return kept


def without_math(line):
    """The line without LaTeX: ``$$...$$`` and ``$...$`` (``[i](h_i)`` there is no link)."""
    return INLINE_MATH.sub(" ", re.sub(r"\$\$.*?\$\$", " ", line))


def prose(line):
    """The line without LaTeX and code spans: where links live."""
    return CODE_SPAN.sub(" ", without_math(line))


def code_spans(line):
    """The contents of the line's code spans, outside LaTeX."""
    return [m.group(2).strip() for m in CODE_SPAN.finditer(without_math(line))]


def github_slug(heading):
    """The anchor GitHub gives a heading: its text lower-cased, punctuation removed
    (letters, digits, ``_``, ``-`` and spaces stay), spaces turned into hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(2), heading)             # `code` keeps its text
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)         # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def heading_anchors(path):
    """Every anchor of a markdown page (repeated headings get ``-1``, ``-2``, ...)."""
    anchors, seen = set(), {}
    for _, line in markdown_lines(path):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            slug = github_slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def blocks(lines):
    """Paragraphs and tables: runs of non-blank lines, as lists of ``(number, line)``."""
    block = []
    for number, line in lines:
        if line.strip():
            block.append((number, line))
        elif block:
            yield block
            block = []
    if block:
        yield block


# --------------------------------------------------------------------------- the checks
def link_problems(page):
    """Relative links of ``page`` whose file, or heading anchor, does not exist."""
    problems = []
    for number, line in markdown_lines(page):
        for target in LINK.findall(prose(line)):
            if re.match(r"[a-zA-Z][a-zA-Z0-9+.\-]*:", target):    # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            resolved = (page.parent / file_part).resolve() if file_part else page
            where = f"{page.relative_to(REPO)}:{number}: link {target!r}"
            if not resolved.exists():
                problems.append(f"{where}: {resolved.relative_to(REPO.parent)} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in heading_anchors(resolved):
                problems.append(f"{where}: no heading of {resolved.name} has the anchor "
                                f"#{anchor} (known: {sorted(heading_anchors(resolved))})")
    return problems


def repo_path(span):
    """The repository path a code span names (``minidetr/x.py``), or None."""
    return span if REPO_PATH.fullmatch(span) and "/" in span else None


def path_problems(page):
    """Backticked repository paths, and bare file names after them, that do not exist."""
    problems = []
    for block in blocks(markdown_lines(page)):
        folder = None                       # the folder of the last path in this block
        for number, line in block:
            for span in code_spans(line):
                where = f"{page.relative_to(REPO)}:{number}: `{span}`"
                if repo_path(span):
                    if not (REPO / span).exists():
                        problems.append(f"{where} does not exist")
                    folder = span if span.endswith("/") else span.rsplit("/", 1)[0] + "/"
                elif folder and SOURCE_FILE.fullmatch(span):
                    if beside(folder, span) is None:
                        problems.append(f"{where}: no such file in {folder} or a folder "
                                        "above it (the path before it)")
    return problems


def beside(folder, name):
    """The path of file ``name`` in ``folder`` or the nearest folder above it (inside
    its root: ``minidetr/data/`` then ``minidetr/``), or None.

    ``minidetr/models/matcher.py`, `criterion.py`` names ``minidetr/models/criterion.py``;
    ``minidetr/data/`, `optim.py`` names ``minidetr/optim.py``.
    """
    parts = folder.strip("/").split("/")
    for depth in range(len(parts), 0, -1):
        path = "/".join(parts[:depth]) + "/" + name
        if (REPO / path).is_file():
            return path
    return None


def resolve_dotted(name):
    """``minidetr.a.b.c`` -> the object: import the longest module prefix, then getattr."""
    parts = name.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)          # AttributeError names the missing part
        return obj
    raise ImportError(f"no module of {name!r} can be imported")


def dotted_name_problems(page):
    """Backticked ``minidetr.x.y`` names that do not import or resolve."""
    problems = []
    for number, line in markdown_lines(page):
        for span in code_spans(line):
            name = re.sub(r"\(.*\)$", "", span)                      # a call: its name
            if not (name.startswith("minidetr.") and IDENTIFIER.fullmatch(name)):
                continue
            try:
                resolve_dotted(name)
            except (ImportError, AttributeError) as e:
                problems.append(f"{page.relative_to(REPO)}:{number}: `{span}` does not "
                                f"resolve: {e}")
    return problems


def module_of_path(path):
    """``minidetr/data/coco.py`` -> ``minidetr.data.coco``; ``minidetr/nn/`` -> ``minidetr.nn``;
    None for what is not a Python module (``.cu``, ``tests/...``)."""
    if not path.startswith("minidetr/"):
        return None
    if path.endswith("/"):
        return path.rstrip("/").replace("/", ".")
    if path.endswith(".py"):
        return path[:-3].replace("/", ".").removesuffix(".__init__")
    return None


def named_modules(page):
    """The modules a page names, in order: backticked paths of Python files and packages
    (bare file names resolved as in :func:`path_problems`) and dotted module names; then
    every other module of their packages (a page on ``minidetr/models/backbone.py`` may
    also name ``DeformableTransformer`` of ``minidetr.models.deformable_transformer``)."""
    modules = []
    for block in blocks(markdown_lines(page)):
        folder = None
        for _, line in block:
            for span in code_spans(line):
                path = repo_path(span) or (beside(folder, span) if folder and
                                            SOURCE_FILE.fullmatch(span) else None)
                if path:
                    folder = path if path.endswith("/") else path.rsplit("/", 1)[0] + "/"
                    modules.append(module_of_path(path))
                elif span.startswith("minidetr.") and IDENTIFIER.fullmatch(span):
                    try:
                        if inspect.ismodule(resolve_dotted(span)):
                            modules.append(span)
                    except (ImportError, AttributeError):
                        pass                      # reported by dotted_name_problems
    modules = [m for m in dict.fromkeys(modules) if m and _importable(m)]
    for name in list(modules):                  # (a missing file is a path problem)
        package = importlib.import_module(name)
        if not hasattr(package, "__path__"):      # a module: its package's other modules
            package = importlib.import_module(name.rsplit(".", 1)[0])
        modules += [f"{package.__name__}.{info.name}"      # not __main__: it would run
                    for info in pkgutil.iter_modules(package.__path__)
                    if not info.name.startswith("_")
                    and f"{package.__name__}.{info.name}" not in modules]
    return modules


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:                         # a parent package is missing
        return False


def implemented_by_spans(lines):
    """``(line number, text before the span, span)`` for each code span that says what
    implements something: every span of an "implemented by" (or "where") table, and
    the spans of each sentence from the words "implemented by" on."""
    for block in blocks(lines):
        if block[0][1].lstrip().startswith("|"):
            if IMPLEMENTED_BY_HEADER.search(block[0][1]):
                for number, line in block:
                    text = without_math(line)
                    for match in CODE_SPAN.finditer(text):
                        yield number, text[:match.start()], match.group(2).strip()
            continue
        for number, line in block:
            text = without_math(line)
            for said in re.finditer(r"implemented by", text, re.IGNORECASE):
                # the sentence goes on to its full stop, possibly on the next lines
                rest = [text[said.end():]] + [without_math(later) for n, later in block
                                              if n > number]
                sentence = re.split(r"\.(?:\s|$)", " ".join(rest), maxsplit=1)[0]
                for match in CODE_SPAN.finditer(sentence):
                    yield number, sentence[:match.start()], match.group(2).strip()


def _resolve_in(name, modules):
    """The object ``name`` names in one of ``modules``, or None. ``name`` may start
    with a module's last component (``box_ops.inverse_sigmoid``)."""
    for module_name in modules:
        module = importlib.import_module(module_name)
        parts = name.split(".")
        if len(parts) > 1 and module_name.rsplit(".", 1)[-1] == parts[0]:
            parts = parts[1:]
        obj = module
        try:
            for attr in parts:
                obj = getattr(obj, attr)
        except AttributeError:
            continue
        return obj
    return None


def implementation_problems(page):
    """Names in "implemented by" tables and sentences that resolve in none of the
    modules the page names (see the module docstring)."""
    problems, modules = [], named_modules(page)
    previous = {}                               # line -> the last object resolved on it
    for number, before, span in implemented_by_spans(markdown_lines(page)):
        if (repo_path(span) or SOURCE_FILE.fullmatch(span) or not IDENTIFIER.fullmatch(span)
                or span.startswith("minidetr.")):
            continue                            # paths and minidetr.x.y: checked elsewhere
        obj = _resolve_in(span, modules)
        if obj is not None:
            previous[number] = obj
            continue
        in_parentheses = before.rfind("(") > before.rfind(")")
        if in_parentheses and number in previous and _mentions(previous[number], span):
            continue
        problems.append(f"{page.relative_to(REPO)}:{number}: `{span}` is found in none of "
                        f"the modules the page names ({', '.join(modules) or 'none'})")
    return problems


def _mentions(obj, word):
    """True when ``word`` appears as a whole word in the source of ``obj``."""
    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError):
        return False
    return re.search(rf"\b{re.escape(word)}\b", source) is not None


# --------------------------------------------------------------------------- the pages
def _page_id(page):
    return str(page.relative_to(REPO))


CHECKS = {"links": link_problems, "paths": path_problems, "dotted names": dotted_name_problems,
          "implemented by": implementation_problems}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
@pytest.mark.parametrize("check", list(CHECKS))
def test_page_references_exist(page, check):
    problems = CHECKS[check](page)
    assert not problems, f"{len(problems)} broken {check} in {_page_id(page)}:\n" + \
        "\n".join(problems)


def test_every_doc_is_checked_and_indexed():
    """docs/README.md links every page of docs/ (the reading order misses none)."""
    index = (REPO / "docs" / "README.md").read_text(encoding="utf-8")
    assert len(DOCS) >= 10 and NOTEBOOK_SOURCES
    missing = [p.name for p in DOCS if p.name != "README.md" and f"]({p.name})" not in index]
    assert not missing, f"docs/README.md does not link {missing}"


# --------------------------------------------------------------------------- the checker
def test_github_slugs_of_known_headings():
    assert github_slug("3. Evaluation: COCO box AP") == "3-evaluation-coco-box-ap"
    assert github_slug("The `tiny` model (CPU)") == "the-tiny-model-cpu"
    assert github_slug("Backward: atomics, or a deterministic gather") == \
        "backward-atomics-or-a-deterministic-gather"
    assert github_slug("Reducing over the `D` channels with warp shuffles") == \
        "reducing-over-the-d-channels-with-warp-shuffles"
    assert github_slug("Eq. (1) → Eq. (2)") == "eq-1--eq-2"


def test_the_checker_finds_broken_links_anchors_paths_and_names(tmp_path, monkeypatch):
    """A page with good and bad references of every kind: only the bad are reported.
    (Paths are looked up under tmp_path; names are resolved in the real package.)"""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)    # paths: under tmp_path
    (tmp_path / "minidetr").mkdir()
    for name in ("engine.py", "testing.py"):
        (tmp_path / "minidetr" / name).write_text("")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "other.md").write_text("# Other page\n\n## 2. The run: data, model\n")
    page = docs / "page.md"
    page.write_text(
        "# Title\n\n"
        "[ok](other.md), [anchor ok](other.md#2-the-run-data-model), [self](#title),\n"
        "[gone](missing.md), [bad anchor](other.md#nope), [web](https://example.org)\n\n"
        "```\n[in code](nowhere.md) `minidetr/nowhere.py`\n```\n\n"
        "$$\n\\mathrm{f}[i](h_i)\n$$\n\n"
        "Files: `minidetr/engine.py`, `missing.py`, `minidetr/gone.py`.\n\n"
        "| concept | implemented by |\n|---|---|\n"
        "| resolving | `minidetr/testing.py`: `gradcheck`, `no_such_function` |\n"
        "| dotted | `minidetr.testing.assert_allclose(a, b)`, `minidetr.testing.nope` |\n",
        encoding="utf-8")
    links = link_problems(page)
    assert len(links) == 2 and "missing.md" in links[0] and "#nope" in links[1], links
    paths = path_problems(page)
    assert len(paths) == 2 and "missing.py" in paths[0] and "minidetr/gone.py" in paths[1], \
        paths
    names = dotted_name_problems(page)
    assert len(names) == 1 and "minidetr.testing.nope" in names[0], names
    implemented = implementation_problems(page)
    assert len(implemented) == 1 and "no_such_function" in implemented[0], implemented
