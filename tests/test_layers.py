"""The layer rule, enforced: synth <- model <- indexer <- app, tests alike, and no import cycle anywhere.

Every import is read with `ast`, including those inside functions (a lazy import is still a dependency).
`python -m tests.test_layers` prints the graph's violations without pytest.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Lower numbers may be imported by higher ones, never the other way.
LAYERS = {"synth": 0, "model": 1, "indexer": 2, "app": 3}
# Test folders sit at their package's layer; tests.helpers is shared by all of them.
TEST_LAYERS = {"tests/synth": 0, "tests/model": 1, "tests/indexer": 2, "tests/app": 3}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = ROOT) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in the file, at any depth, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, node.lineno
            for alias in node.names:  # `from pkg import module` imports pkg.module
                yield f"{base}.{alias.name}", node.lineno


def layer_of(module: str) -> int | None:
    return LAYERS.get(module.split(".")[0])


def source_files(root: Path = ROOT) -> list[Path]:
    files: list[Path] = []
    for top in [*LAYERS, "tests"]:
        files += sorted((root / top).rglob("*.py"))
    return files


def layer_violations(root: Path = ROOT) -> list[str]:
    found = []
    for path in source_files(root):
        rel = path.relative_to(root).as_posix()
        own = next((n for prefix, n in TEST_LAYERS.items() if rel.startswith(prefix + "/")), None)
        if own is None:
            own = layer_of(module_name(path, root)) if not rel.startswith("tests/") else None
        if own is None:  # tests/ top-level files (README commands, deploy files) may use every layer
            continue
        seen: set[int] = set()
        for imported, line in imports_of(path, root):
            theirs = layer_of(imported)
            if theirs is not None and theirs > own and line not in seen:
                seen.add(line)
                found.append(f"{rel}:{line} imports {imported} (a higher layer)")
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Project module -> project modules it imports (tests excluded: nothing imports a test)."""
    modules = {
        module_name(p, root): p for p in source_files(root) if not p.relative_to(root).parts[0] == "tests"
    }
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for imported, _ in imports_of(path, root):
            # `from pkg import name` names a module only when pkg.name is one; a package's __init__ counts.
            if imported in modules and imported != name:
                graph[name].add(imported)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_a_higher_layer() -> None:
    assert layer_violations() == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_checker_catches_a_forbidden_import_and_a_cycle(tmp_path: Path) -> None:
    # A throwaway tree: the checker must flag model -> app (even inside a function) and a <-> b.
    for folder in ("model", "app", "synth", "indexer", "tests/model"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "model" / "a.py").write_text("def f():\n    from app import web\n")
    (tmp_path / "app" / "web.py").write_text("import model.a\n")
    (tmp_path / "indexer" / "x.py").write_text("from . import y\n")
    (tmp_path / "indexer" / "y.py").write_text("from indexer.x import thing\n")
    (tmp_path / "tests" / "model" / "test_z.py").write_text("import indexer.x\n")
    violations = layer_violations(tmp_path)
    assert any(v.startswith("model/a.py:2 imports app") for v in violations), violations
    assert any(v.startswith("tests/model/test_z.py:1 imports indexer.x") for v in violations), violations
    assert ["indexer.x", "indexer.y"] in cycles(import_graph(tmp_path))
    assert ["app.web", "model.a"] in cycles(import_graph(tmp_path))


if __name__ == "__main__":
    print("\n".join(layer_violations()) or "layers: ok")
    print("\n".join(" <-> ".join(c) for c in cycles(import_graph())) or "cycles: none")
