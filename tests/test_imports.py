"""perq's modules import one another in one direction: no module imports one that imports it back.

Imports inside functions count too: they are how commands keep `perq --help` fast, and a cycle through them
still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROOMS = ("shared", "producer", "worker")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each of perq's modules and the perq modules it imports; `from a import b` imports the module `a.b`
    when there is one, else `a`."""
    files = {module_name(p): p for room in ROOMS for p in (ROOT / room).rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in files}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    target = f"{node.module}.{a.name}"
                    graph[name].add(target if target in files else node.module)
        graph[name] &= files.keys() - {name}
    return graph


def test_no_import_cycle() -> None:
    graph = import_graph()
    # the graph sees imports inside functions and through packages
    assert "producer.cli.run" in graph["producer.cli"]
    assert "worker.models.script" in graph["worker.models.select"]
    cycles: list[list[str]] = []
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph[module]):
            if target in path:
                cycles.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)


def test_arq_is_imported_only_by_the_queue_rooms() -> None:
    """arq's API, and the private parts perq still uses, are reached through shared/queue and worker/queue
    alone: an arq release that changes them changes those two rooms, nothing else."""
    importers = set()
    for room in ROOMS:
        for path in (ROOT / room).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                if any(n == "arq" or n.startswith("arq.") for n in names):
                    importers.add(module_name(path))
    assert importers, "the walk must see the queue rooms' imports of arq"
    outside = sorted(m for m in importers if not m.startswith(("shared.queue", "worker.queue")))
    assert outside == []
