"""The import graph of src/teesplit: the trust boundary both ways, no cycles, and leaves that
nothing in the library imports (the CLI, the benchmark).

Every import statement counts, function-local ones too: a cycle hidden inside a function is
still a cycle in the design."""

from __future__ import annotations

import ast
from pathlib import Path

import teesplit

PKG = Path(teesplit.__file__).parent


def module_name(path: Path, root: Path = PKG) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(root: Path = PKG) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The teesplit modules that `name` (at `path`) imports, every statement counted."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            # `from a import b`: b may be a module of its own
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for t in targets:
            while t and t not in known:  # `import a.b.c` where only a.b is ours
                t = t.rpartition(".")[0]
            if t:
                out.add(t)
    out.discard(name)
    return out


def import_graph(root: Path = PKG) -> dict[str, set[str]]:
    modules = all_modules(root)
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, f"import cycles in src/teesplit: {found}"


def test_the_cycle_finder_finds_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "teesplit"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from teesplit.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (pkg / "c.py").write_text("import numpy\nimport teesplit.a as a\n")
    graph = import_graph(pkg)
    assert graph["teesplit.sub.b"] == {"teesplit.c"} and graph["teesplit.c"] == {"teesplit.a"}
    assert cycles(graph) == [["teesplit.a", "teesplit.c", "teesplit.sub.b"]]


def _importers(graph: dict[str, set[str]], prefix: str) -> set[str]:
    return {m for m, deps in graph.items() if any(d == prefix or d.startswith(prefix + ".") for d in deps)}


def test_the_trust_boundary_holds_both_ways():
    graph = import_graph()
    tee = {m for m in graph if m.startswith("teesplit.tee")}
    gpu = {m for m in graph if m.startswith("teesplit.gpu")}
    assert len(tee) >= 10 and len(gpu) >= 4
    assert not {m for m in tee if graph[m] & gpu}, "tee/ imports gpu/"
    assert not {m for m in gpu if graph[m] & tee}, "gpu/ imports tee/"


def test_nothing_in_the_library_imports_the_cli_or_the_benchmark():
    graph = import_graph()
    assert _importers(graph, "teesplit.cli") <= {"teesplit.__main__"}
    assert {m for m in _importers(graph, "teesplit.bench") if not m.startswith("teesplit.bench")} <= {
        "teesplit.cli"
    }
