"""The package's layering (docs/architecture.md): the import-linter contracts of pyproject.toml hold,
the whole-package import graph (imports inside functions and under TYPE_CHECKING included) has no
cycle, and cellkit-internal imports inside functions stay in the documented torch-free faces."""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from importlinter.cli import lint_imports

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cellkit"
FACES = ("cellkit.cli", "cellkit", "cellkit.data")
"""Modules whose functions may import cellkit modules: the command line, the package face and the
data face stay torch-free."""


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, name: str, modules: set[str]) -> list[tuple[str, ast.stmt, bool]]:
    """``(target module, statement, inside a function or TYPE_CHECKING)`` of every cellkit import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, ast.stmt, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                else:
                    base = package
                    for _ in range(child.level - 1):
                        base = base.rpartition(".")[0]
                    root = f"{base}.{child.module or ''}".strip(".") if child.level else (child.module or "")
                    targets = [root] + [f"{root}.{a.name}" for a in child.names]
                for t in targets:
                    while t and t not in modules:
                        t = t.rpartition(".")[0]
                    if t and t != name:
                        out.append((t, child, nested))
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return out


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """cellkit module -> every cellkit module it imports, wherever the import statement is."""
    paths = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for name, path in paths.items():
        graph[name] = {t for t, _, _ in imports_of(path, name, set(paths))}
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


def test_the_import_linter_contracts_hold() -> None:
    # layers (each imports only those below it), structures import nothing above them, the
    # evaluation is torch-free; grimp counts imports inside functions and under TYPE_CHECKING
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), no_cache=True) == 0


def test_a_broken_layer_is_caught(tmp_path: Path) -> None:
    """The contracts can fail: a lower layer importing a higher one, inside a function, breaks them."""
    pkg = tmp_path / "toy"
    (pkg / "low").mkdir(parents=True)
    (pkg / "high").mkdir()
    for f, text in {"__init__.py": "", "low/__init__.py": "", "high/__init__.py": "",
                    "high/a.py": "from ..low import b\n",
                    "low/b.py": "def f():\n    from ..high import a\n    return a\n"}.items():
        (pkg / f).write_text(text)
    (tmp_path / "setup.cfg").write_text(textwrap.dedent("""
        [importlinter]
        root_package = toy

        [importlinter:contract:layers]
        name = toy layers
        type = layers
        containers = toy
        layers =
            high
            low
    """))
    r = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports; "
                        "sys.exit(lint_imports(config_filename='setup.cfg', no_cache=True))"],
                       cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 1 and "toy.low.b -> toy.high.a" in r.stdout, r.stdout + r.stderr
    assert find_cycle(import_graph(pkg)) == ["toy.high.a", "toy.low.b", "toy.high.a"]


def test_no_import_cycle_between_modules() -> None:
    graph = import_graph()
    assert len(graph) > 80
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_only_in_the_torch_free_faces() -> None:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    offenders = []
    for name, path in paths.items():
        lines = path.read_text().splitlines()
        for target, node, nested in imports_of(path, name, set(paths)):
            if not nested:
                continue
            face = name in ("cellkit", "cellkit.data") or name.startswith("cellkit.cli.")
            commented = "#" in lines[node.lineno - 1]
            if not (face and commented):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {target}")
    assert offenders == []


def test_no_library_module_imports_the_cli() -> None:
    graph = import_graph()
    offenders = {m: sorted(t for t in ts if t.startswith("cellkit.cli")) for m, ts in graph.items()
                 if not m.startswith("cellkit.cli") and m not in ("cellkit.__main__",)}
    assert not {m: t for m, t in offenders.items() if t}


@pytest.mark.parametrize("face", ["cellkit.evaluation", "cellkit.structures", "cellkit.cli", "cellkit.runs",
                                  "cellkit.grid.worker", "cellkit.data.coco", "cellkit.data.synth"])
def test_the_torch_free_faces_import_no_torch(face: str) -> None:
    r = subprocess.run([sys.executable, "-c", f"import sys, {face}; print('torch' in sys.modules)"],
                       capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
