"""Every Function with a hand-written backward has its derivation in docs/.

The project promises a derivation page for every :class:`minidetr.autograd.Function`,
naming the class that implements it. These tests hold the promise as the code grows:

* every Function subclass defined in the package (found by importing every module and
  walking ``Function.__subclasses__()`` recursively) is named in a code span of some
  ``docs/*.md`` page, e.g. `` `Sigmoid` `` or `` `Sigmoid.backward` ``. Private classes
  (``_Select``) count only when they write their own ``backward``; a public subclass that
  inherits its backward (``Maximum``) must still be named;
* each module of ``minidetr/functional/`` that defines a Function says in its docstring
  where the derivation is (``Derivation: docs/autograd.md, section "Cast".``), and that
  page and those sections exist;
* every page that ``docs/README.md`` links to exists.
"""
from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import minidetr
from minidetr.autograd import Function

REPO = Path(__file__).resolve().parents[2]
DOCS_DIR = REPO / "docs"
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
FENCE = re.compile(r"^\s*(```|~~~)")


# --------------------------------------------------------------------------- collecting
def import_every_module():
    """Import every module of the package (not ``__main__``, which would run the CLI)."""
    for info in pkgutil.walk_packages(minidetr.__path__, "minidetr."):
        if info.name.rsplit(".", 1)[-1] != "__main__":
            importlib.import_module(info.name)


def package_functions():
    """``{qualified name: class}`` of every Function subclass defined in minidetr.

    Subclasses defined elsewhere (in tests) are left out, and so are private classes
    that do not define ``backward`` themselves.
    """
    import_every_module()
    found, todo = {}, list(Function.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if cls.__module__.split(".")[0] != "minidetr":
            continue
        if cls.__name__.startswith("_") and "backward" not in vars(cls):
            continue
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def code_spans(text):
    """The contents of the inline code spans of a markdown text, fenced blocks left out."""
    spans, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence:
            spans += [m.group(2) for m in CODE_SPAN.finditer(line)]
    return spans


def named_in(name, spans):
    """True when ``name`` is a whole word of one of ``spans`` (`` `Max` `` yes,
    `` `MaxPool2d` `` no; `` `minidetr.ops.msda.MSDeformAttnFunction` `` yes)."""
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    return any(word.search(span) for span in spans)


def headings(page):
    """The headings of a markdown page, without ``#`` marks and backticks."""
    out, in_fence = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            out.add(m.group(1).replace("`", ""))
    return out


# --------------------------------------------------------------------------- the checks
def test_the_collector_sees_the_package_functions():
    """Guards against a test that passes because it found nothing."""
    names = {cls.__name__ for cls in package_functions().values()}
    expected = {"Add", "Sigmoid", "Cumsum", "Permute", "MatMul", "Conv2d", "LayerNorm",
                "Dropout", "MSDeformAttnFunction", "_Select", "Maximum", "Minimum"}
    assert expected <= names, f"not collected: {sorted(expected - names)}"
    assert len(names) >= 40, f"only {len(names)} Functions found: {sorted(names)}"


def test_the_name_matcher_wants_whole_words_in_code_spans():
    spans = code_spans("The `MaxPool2d` op; `Sum.backward`; Max in prose.\n"
                       "```python\nclass Exp(Function): ...\n```\n"
                       "`minidetr.ops.msda.MSDeformAttnFunction`\n")
    assert named_in("Sum", spans) and named_in("MSDeformAttnFunction", spans)
    assert not named_in("Max", spans)           # prose, and part of MaxPool2d
    assert not named_in("Exp", spans)           # only in a fenced block


def test_every_function_is_named_on_a_docs_page():
    spans = [s for page in sorted(DOCS_DIR.glob("*.md"))
             for s in code_spans(page.read_text(encoding="utf-8"))]
    missing = sorted(f"{cls.__name__} ({qualified})"
                     for qualified, cls in package_functions().items()
                     if not named_in(cls.__name__, spans))
    assert not missing, ("these Functions have a backward but no docs/*.md page names them "
                         "in backticks (add a derivation, e.g. to docs/autograd.md):\n  "
                         + "\n  ".join(missing))


def test_functional_modules_point_to_their_derivation():
    modules = sorted({cls.__module__ for cls in package_functions().values()
                      if cls.__module__.startswith(("minidetr.functional.", "minidetr.ops."))})
    assert len(modules) >= 8, modules
    problems = []
    for name in modules:
        doc = importlib.import_module(name).__doc__ or ""
        paragraph = re.search(r"^Derivation:(.*?)(?:\n\s*\n|\Z)", doc, re.MULTILINE | re.DOTALL)
        if not paragraph:
            problems.append(f"{name}: no 'Derivation: docs/<page>.md, section \"...\"' "
                            "line in the module docstring")
            continue
        text = " ".join(paragraph.group(1).split())
        page = re.search(r"docs/[\w\-]+\.md", text)
        if not page or not (REPO / page.group()).is_file():
            problems.append(f"{name}: the Derivation line names no existing docs page: {text!r}")
            continue
        known = headings(REPO / page.group())
        for section in re.findall(r'"([^"]+)"', text):
            if section not in known:
                problems.append(f"{name}: {page.group()} has no section {section!r}")
    assert not problems, "\n".join(problems)


def test_every_page_linked_from_the_docs_index_exists():
    index = (DOCS_DIR / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\(\s*<?([^)\s>#]+)", index)
    pages = [t for t in targets if not re.match(r"[a-zA-Z][\w+.\-]*:", t)]   # not http:
    assert len([p for p in pages if p.endswith(".md")]) >= 10, pages
    missing = sorted({p for p in pages if not (DOCS_DIR / p).exists()})
    assert not missing, f"docs/README.md links pages that do not exist: {missing}"
