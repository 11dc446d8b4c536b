"""The core's shape: no import circles (a module calls down, never back up), and no core module importing a plugin."""

from __future__ import annotations

import ast
from pathlib import Path

import aipaint

CORE = Path(aipaint.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The aipaint modules ``path`` imports, at module level or inside functions (a call that
    imports a module above it is a call back up), leaving out ``if TYPE_CHECKING:`` blocks."""
    found: set[str] = set()

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            if "TYPE_CHECKING" in ast.unparse(node.test):
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.update(alias.name for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.module and node.level == 0:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name.startswith("aipaint")}


def core_graph() -> dict[str, set[str]]:
    # The package ``aipaint`` itself is left out: importing any of its modules imports it first,
    # and it reaches the rest only lazily, for its public names.
    modules = {module_name(p): p for p in CORE.rglob("*.py") if p != CORE / "__init__.py"}
    graph = {}
    for name, path in modules.items():
        graph[name] = {m for m in imported_modules(path) if m in modules and m != name}
    return graph


def test_the_core_has_no_import_circles():
    graph = core_graph()
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_graph_sees_real_imports():
    """The check above would pass on an empty graph: make sure it reads the engine's imports."""
    graph = core_graph()
    assert "aipaint.engine.loop" in graph["aipaint.engine.run"]
    assert "aipaint.engine.modes" in graph["aipaint.engine.run"]


def test_no_core_module_imports_a_plugin():
    offenders = []
    for path in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.relative_to(CORE)}: {n}" for n in names if n.startswith("aipaint_plugins")]
    assert offenders == []
