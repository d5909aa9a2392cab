"""The shape of the source tree: one opener of SQLite files, no import cycles, no huge modules.

Read from the source text (``ast``), nothing is imported or run."""

from __future__ import annotations

import ast
from pathlib import Path


SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "bastion"
OPENER = PKG / "sqlite" / "connect.py"
MAX_LINES = 700
# Modules allowed over MAX_LINES, each with its reason. Shrink this list; never grow it silently.
BIG = {
    "bastion/sql/service.py": "one concept (the SQL server's sessions and transactions)",
}

def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of bastion that ``name`` imports, at the top or inside functions (a function-level
    import still makes the two modules depend on each other; it only hides the cycle from Python)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                pkg = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                mod = ".".join(pkg + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]   # `from . import x`: x may be a module
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {m: _imports(m, p, set(mods)) for m, p in mods.items()}
    # a package's __init__ importing its own submodules is not a dependency loop of concepts
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_only_sqlite_connect_opens_database_files() -> None:
    offenders = [f"{p.relative_to(SRC)}:{i}" for p in sorted(PKG.rglob("*.py")) if p != OPENER
                 for i, line in enumerate(p.read_text().splitlines(), 1) if "apsw.Connection(" in line]
    assert not offenders, f"open SQLite files through bastion.sqlite.connect, not here: {offenders}"


def test_no_import_cycles_outside_the_known_ones() -> None:
    cycles = _cycles(_graph())
    assert not cycles, f"import cycles: {cycles}"


def test_the_cycle_finder_sees_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_over_the_size_limit_unless_allowed() -> None:
    big = {str(p.relative_to(SRC)): n for p in PKG.rglob("*.py")
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(big) <= set(BIG), f"modules over {MAX_LINES} lines: {big}; split them or add to BIG with a reason"
    stale = set(BIG) - set(big)
    assert not stale, f"no longer over {MAX_LINES} lines, take them off BIG: {stale}"
