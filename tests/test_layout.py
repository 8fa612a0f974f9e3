"""The package's layering: module-level imports between cellkit modules form no cycle, no library
module imports the CLI, and the evaluation package imports nothing of the training side."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "cellkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(tree: ast.Module) -> list[ast.stmt]:
    """Import statements that run when the module is imported (not inside functions or
    ``if TYPE_CHECKING:``; try/except and other top-level blocks are followed)."""
    out: list[ast.stmt] = []

    def walk(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                out.append(node)
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    walk(node.body)
                    walk(node.orelse)
            elif isinstance(node, ast.Try):
                walk(node.body)
                for h in node.handlers:
                    walk(h.body)
                walk(node.orelse)
                walk(node.finalbody)
    walk(tree.body)
    return out


def import_graph() -> dict[str, set[str]]:
    """cellkit module -> the cellkit modules it imports at import time."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _top_level_imports(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = node.module or ""
                root = f"{base}.{mod}".strip(".") if node.level else mod
                targets = [root] + [f"{root}.{a.name}" for a in node.names]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("cellkit"):
                    graph[name].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    # packages import their own submodules in __init__; a submodule importing its package back is
    # what makes a cycle, so the package -> child edges are kept and checked like the rest
    assert len(graph) > 60
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_the_cli() -> None:
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("cellkit.cli")) for m, ts in graph.items()
                 if not m.startswith("cellkit.cli") and m not in ("cellkit.__main__",)}
    assert not {m: t for m, t in offenders.items() if t}


def test_evaluation_depends_on_nothing_of_training() -> None:
    graph = import_graph()
    for m, targets in graph.items():
        if m.startswith("cellkit.evaluation"):
            bad = [t for t in targets if t.startswith(("cellkit.engine", "cellkit.models", "cellkit.data.dataset",
                                                       "cellkit.viz", "cellkit.cli"))]
            assert not bad, f"{m} imports {bad}"
