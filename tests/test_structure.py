"""The code's shape, as CONTRIBUTING.md promises it: imports go one way, modules stay small."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 430  # "~400": a module past this gets split


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module in ("jobs", "serving"):
                found |= {f"{node.module}.{alias.name}" for alias in node.names}
            elif node.module.startswith(("jobs.", "serving.")):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(("jobs.", "serving."))}
    return found


def _graph() -> dict[str, set[str]]:
    modules = {}
    for package in ("jobs", "serving"):
        for path in (ROOT / package).glob("*.py"):
            name = f"{package}.{path.stem}"
            modules[name] = _imports(path) - {name}  # a `__main__` may import its own module
    return modules


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append([*stack[stack.index(target) :], target])
            elif not state.get(target):
                visit(target, [*stack, target])
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module, [module])
    assert not cycles, cycles


def test_jobs_never_import_serving():
    offenders = {
        module: sorted(t for t in targets if t.startswith("serving"))
        for module, targets in _graph().items()
        if module.startswith("jobs.")
    }
    assert not {m: t for m, t in offenders.items() if t}


def test_modules_stay_small():
    sizes = {
        str(path.relative_to(ROOT)): len(path.read_text().splitlines())
        for package in ("jobs", "serving")
        for path in (ROOT / package).glob("*.py")
    }
    assert not {path: n for path, n in sizes.items() if n > MAX_LINES}
