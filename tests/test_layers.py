"""The layering the imports keep (docs/EXTENDING.md, ../ARCHITECTURE): read from the source, every import.

    entry                     unlearn/entry.py, unlearn/__main__.py (the command: interrupts first, then the CLI)
    cli                       unlearn/cli.py
    recipes, perf             unlearn/recipes/ (study/ included), unlearn/perf/
    benchmarks/  attacks/     unlearn.benchmarks, unlearn.attacks (the suites and the attacks)
    library, bottom to top:   core, storage, compute, tasks, evaluation, optim, training (unlearn/<name>/)

Imports only point down (a library package imports only the packages below it), the two suite packages do not
import each other, there is no import cycle, and no folder holds more than 12 modules at one level.
Imports inside functions count (they hid a cycle once); imports under `if TYPE_CHECKING:` do not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"unlearn": ROOT / "unlearn", "unlearn.attacks": ROOT / "attacks", "unlearn.benchmarks": ROOT / "benchmarks"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the toolkit modules it imports (a `from package import name` of a submodule counts as that
    submodule; the implicit import of a package's __init__ by its submodules does not)."""
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_lines(tree)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # a relative import: resolved against the importing package
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


LIBRARY = ("core", "storage", "compute", "tasks", "evaluation", "optim", "training")  # bottom to top


def layer(module: str) -> str:
    if module in ("unlearn.entry", "unlearn.__main__"):
        return "entry"
    if module == "unlearn.cli":
        return "cli"
    if module.startswith(("unlearn.recipes", "unlearn.perf")):
        return "recipes"
    if module.startswith("unlearn.benchmarks"):
        return "benchmarks"
    if module.startswith("unlearn.attacks"):
        return "attacks"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LIBRARY:
        return parts[1]
    return "package"  # unlearn/__init__.py: the package's docstring, importing nothing


_BELOW = {name: set(LIBRARY[: i + 1]) for i, name in enumerate(LIBRARY)}
ALLOWED = {"entry": {"entry", "cli", "recipes", "benchmarks", "attacks", *LIBRARY},
           "cli": {"cli", "recipes", "benchmarks", "attacks", *LIBRARY},
           "recipes": {"recipes", "benchmarks", "attacks", *LIBRARY},
           "benchmarks": {"benchmarks", *LIBRARY}, "attacks": {"attacks", *LIBRARY}, "package": set(), **_BELOW}


def violations(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({layer(a)}) imports {b} ({layer(b)})" for a, targets in graph.items() for b in targets
                  if layer(b) not in ALLOWED[layer(a)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_checks_catch_what_they_guard():
    """A planted back-import and a planted cycle are found (so a pass below means something)."""
    planted = {"unlearn.tasks.data": {"unlearn.benchmarks.wmdp"}, "unlearn.benchmarks.wmdp": {"unlearn.tasks.data"},
               "unlearn.attacks.relearn": {"unlearn.benchmarks.embedded"},
               "unlearn.storage.records": {"unlearn.tasks.task"}}
    assert violations(planted) == [
        "unlearn.attacks.relearn (attacks) imports unlearn.benchmarks.embedded (benchmarks)",
        "unlearn.storage.records (storage) imports unlearn.tasks.task (tasks)",
        "unlearn.tasks.data (tasks) imports unlearn.benchmarks.wmdp (benchmarks)"]
    assert cycles(planted) == [["unlearn.benchmarks.wmdp", "unlearn.tasks.data"]]


def test_imports_point_down_and_never_circle():
    known = modules()
    graph = imports(known)
    assert {"unlearn.evaluation.measures", "unlearn.benchmarks.muse", "unlearn.attacks.relearn",
            "unlearn.recipes.report"} <= set(known)
    assert "unlearn.tasks.task" in graph["unlearn.benchmarks.wmdp"]  # the reader sees real edges
    assert violations(graph) == []
    assert cycles(graph) == []
    assert {layer(m) for m in known} == {"entry", "cli", "recipes", "benchmarks", "attacks", "package", *LIBRARY}


def test_no_folder_holds_more_than_twelve_modules():
    crowded = {}
    for folder in PACKAGES.values():
        for directory in [folder, *(p for p in folder.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
            count = len([p for p in directory.glob("*.py") if p.name != "__init__.py"])
            if count > 12:
                crowded[str(directory.relative_to(ROOT))] = count
    assert crowded == {}
