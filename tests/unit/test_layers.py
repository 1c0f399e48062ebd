"""The import structure: one-way layers and no cycles.

`genq.shared` (the contract, DB, storage, broker, job state) imports neither the API nor the
workers; the API (`genq.services`) and the workers (`genq.workers`) never import each other; the
client imports nothing from the server side. Every import counts, at module level or inside a
function, so a cycle cannot hide behind a lazy import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"genq": "genq", "shared": "genq.shared", "services": "genq.services", "workers": "genq.workers"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")
               if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


GRAPH = _graph()


def _imports(prefix: str) -> set[tuple[str, str]]:
    return {(m, t) for m, targets in GRAPH.items() if m.startswith(prefix) for t in targets}


@pytest.mark.parametrize("layer, forbidden", [
    ("genq.shared", ("genq.services", "genq.workers", "genq.cli", "genq.client")),
    ("genq.services", ("genq.workers", "genq.cli")),
    ("genq.workers", ("genq.services", "genq.cli")),
    ("genq.client", ("genq.shared", "genq.services", "genq.workers")),
])
def test_layers_import_one_way(layer: str, forbidden: tuple[str, ...]) -> None:
    wrong = sorted((m, t) for m, t in _imports(layer) if t.startswith(forbidden))
    assert wrong == []


def test_no_import_cycles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_the_packages() -> None:
    """The checks above look at real modules (a broken scan would pass them vacuously)."""
    assert "genq.services.app" in GRAPH and "genq.shared.db" in GRAPH["genq.shared.jobs"]
