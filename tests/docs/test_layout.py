"""The package layout stays one a newcomer maps in a minute.

* The imports between the package's parts (its root modules and its subpackages) form no
  cycle, except the one documented binding ``autograd`` <-> ``functional`` (a Tensor's
  operators call Functions, which build Tensors; ``autograd`` imports ``functional``
  lazily, on first use). Every ``import`` counts, also one inside a function: a lazy
  import hides a cycle from Python, not from a reader.
* At most 8 modules sit at the package root; everything else is in a subpackage named by
  its job.
* The README's map ("What is inside") names every root module and every subpackage.

The imports are read from the source (``ast``), so nothing is imported or run.
"""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "minidetr"
ALLOWED_CYCLES = [{"autograd", "functional"}]
MAX_ROOT_MODULES = 8


def part_of(module: str):
    """``"minidetr.training.engine"`` -> ``"training"``; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "minidetr" else None


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """``(line, module)`` of every minidetr module ``path`` imports (relative ones resolved)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            yield node.lineno, module
            for alias in node.names:                 # ``from . import functional``
                yield node.lineno, f"{module}.{alias.name}"


def parts():
    """The names of the package's parts: root modules (without .py) and subpackages."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.name != "__init__.py"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    return modules | packages


def import_graph():
    """part -> {imported part: "file:line" of the first import that makes the edge}."""
    known = parts()
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = part_of(module_name(path))
        if source is None:                           # minidetr/__init__.py
            continue
        for line, module in imported_modules(path):
            target = part_of(module)
            if target in known and target != source:
                graph.setdefault(source, {}).setdefault(
                    target, f"{path.relative_to(REPO)}:{line}")
    return graph


def cycles(graph):
    """The strongly connected components with more than one part (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_between_the_parts_of_the_package():
    graph = import_graph()
    bad = [c for c in cycles(graph) if c not in ALLOWED_CYCLES]
    described = []
    for component in bad:
        edges = [f"{a} -> {b} ({where})" for a in sorted(component)
                 for b, where in sorted(graph.get(a, {}).items()) if b in component]
        described.append(f"cycle {sorted(component)}: " + "; ".join(edges))
    assert not bad, "import cycles between parts of minidetr:\n  " + "\n  ".join(described)


def test_the_checker_finds_a_cycle():
    graph = {"a": {"b": "x"}, "b": {"c": "y"}, "c": {"a": "z"}, "d": {"a": "w"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b": "x"}, "b": {}}) == []


def test_the_documented_binding_is_the_only_allowed_cycle():
    assert cycles(import_graph()) == ALLOWED_CYCLES, (
        "the autograd <-> functional binding disappeared or changed: update ALLOWED_CYCLES "
        "and docs/autograd.md")


def test_at_most_eight_modules_at_the_package_root():
    modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, (
        f"{len(modules)} modules at the package root ({', '.join(modules)}); at most "
        f"{MAX_ROOT_MODULES}: put the new one in the subpackage that names its job")


def test_the_readme_map_names_every_part():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    inside = readme[readme.index("## What is inside"):]
    inside = inside[:inside.index("\n## ", 3)]
    missing = sorted(p for p in parts()
                     if f" {p}.py " not in inside and f" {p}/ " not in inside
                     and p != "__main__")
    assert not missing, f"README.md's 'What is inside' map does not name {missing}"
