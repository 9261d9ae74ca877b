"""The house rules the code is held to: small modules and functions, imports that flow one way,
and code and docs that speak of the product, not of its history."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "decoderscope"
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
MODULES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(path: Path) -> set[str]:
    """The decoderscope modules `path` imports when it runs (imports under `if TYPE_CHECKING`
    are for annotations only)."""
    tree = ast.parse(path.read_text())
    package = (
        _module_name(path)
        if path.name == "__init__.py"
        else _module_name(path)[: _module_name(path).rfind(".")]
    )
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("decoderscope"):
                found.add(target)
                for alias in node.names:
                    candidate = f"{target}.{alias.name}"
                    if (ROOT / Path(*candidate.split("."))).with_suffix(".py").exists():
                        found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("decoderscope"))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_and_functions_are_small(path: Path) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) <= MAX_MODULE_LINES, f"{path.name}: {len(lines)} lines"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path.name}:{node.name}: {length} lines"


def test_no_import_circles_and_no_import_of_the_package_root() -> None:
    graph = {_module_name(p): _runtime_imports(p) for p in MODULES}
    for name, targets in graph.items():
        if name != "decoderscope":
            assert "decoderscope" not in targets, f"{name} imports the package root"
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt not in graph or nxt == "decoderscope":
                continue
            assert state.get(nxt) != 1, "import circle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                walk(nxt, [*path, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [])


def test_the_walker_sees_a_circle() -> None:
    """The circle test can fail: the walker finds the report's renderer (imported at run
    time) and the renderer's own imports."""
    assert "decoderscope.render" in _runtime_imports(PACKAGE / "report.py")
    assert "decoderscope.report" not in _runtime_imports(PACKAGE / "render.py")


def test_code_and_docs_speak_of_the_product() -> None:
    diary = re.compile(r"\bsessions?[\s-]*[0-9]|/tmp/", re.IGNORECASE)
    paths = [*MODULES, *sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
    paths += sorted((ROOT / "benchmarks").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))
    paths += [p for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_architecture.py"]
    hits = [
        f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
        for p in paths
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if diary.search(line)
    ]
    assert not hits, "\n".join(hits[:20])
