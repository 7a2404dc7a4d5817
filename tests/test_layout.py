"""The shape of the code: no module over 600 lines, no import cycle among modules at import time, and the query-time
answerers in ragkit/readers import nothing from the memory models' training."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ragkit"
TRAINING = ("ragkit.memory.train", "ragkit.memory.tasks", "ragkit.memory.probes", "ragkit.memory.recall_eval",
            "ragkit.memory.recipes", "ragkit.cli")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The ragkit modules `path` imports (at module level only, or anywhere)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ragkit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ragkit")}
    return found


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def test_no_module_is_over_600_lines():
    long = {name: n for name, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_no_import_cycle_at_import_time():
    graph = {name: {m for m in imports(p, top_level_only=True) if m in MODULES} for name, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for other in graph[name]:
            assert state.get(other) != 1, " -> ".join(path + [name, other])
            if other not in state:
                visit(other, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_the_readers_import_nothing_from_memory_training():
    for name, path in MODULES.items():
        if name.startswith("ragkit.readers"):
            wrong = {m for m in imports(path, top_level_only=False) if m.startswith(TRAINING)}
            assert not wrong, (name, wrong)
