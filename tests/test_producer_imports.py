"""The producer's modules import one another in one direction: no module imports one that imports it back.

Imports inside functions count too: they are how commands keep `perq --help` fast, and a cycle through them
still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each producer module and the producer modules it imports; `from a import b` imports the module `a.b`
    when there is one, else `a`."""
    files = {module_name(p): p for p in (ROOT / "producer").rglob("*.py")}
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


def test_no_import_cycle_in_producer() -> None:
    graph = import_graph()
    assert "producer.cli.run" in graph["producer.cli"]
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
