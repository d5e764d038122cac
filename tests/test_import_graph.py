"""The import graph of evomerge/ has no cycle (house rule: data flows one way).

The graph is read statically with ``ast`` from every module's source, so no module is imported and imports
inside functions count as much as module-level ones. A module depends on every evomerge module its import
statements name: ``import a.b.c`` -> ``a.b.c``; ``from a.b import c`` -> ``a.b`` (its ``__init__`` runs and
provides ``c``), and also ``a.b.c`` when ``c`` is a submodule; relative imports resolve against the module's
package. The implicit import of a module's parent packages is not an edge (it would make every package that
imports its own submodules a cycle). Imports under ``if TYPE_CHECKING:`` count too: a type-only cycle is still
two modules that each depend on the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "evomerge"
ROOT = Path(__file__).resolve().parents[1]


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """Module name -> source file, for every ``.py`` file under ``root/package`` (packages by ``__init__``)."""
    out: dict[str, Path] = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imported_names(module: str, path: Path) -> list[str]:
    """Every dotted name one module's import statements (anywhere in the file) can load, in source order."""
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package_parts) - (node.level - 1)
                prefix = ".".join(package_parts[:keep])
                base = f"{prefix}.{node.module}" if node.module else prefix
            else:
                base = node.module or ""
            names.append(base)
            names.extend(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return names


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the evomerge modules it imports (only names that are modules of the package count)."""
    files = module_files(root, package)
    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        graph[module] = {name for name in imported_names(module, path) if name in files and name != module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan), as a closed path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_in(graph, set(component)) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted(graph[node] & component):
                if nxt == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if nxt not in parents:
                    parents[nxt] = node
                    following.append(nxt)
        frontier = following
    raise AssertionError("a strongly connected component always holds a cycle")


def test_evomerge_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles in evomerge/:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_graph_sees_function_level_and_from_package_imports(tmp_path):
    """The walker itself: a cycle closed by a function-local ``from pkg import sibling`` is found and printed."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from pkg.a import f\n")
    (pkg / "a.py").write_text("def f():\n    from pkg import b\n    return b\n")
    (pkg / "b.py").write_text("import os\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from .. import b\nfrom . import d\n")
    (pkg / "sub" / "d.py").write_text("from ..sub.c import x\n")
    graph = import_graph(tmp_path, "pkg")
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg", "pkg.b"}, "pkg.b": set(), "pkg.sub": set(),
                     "pkg.sub.c": {"pkg", "pkg.b", "pkg.sub", "pkg.sub.d"}, "pkg.sub.d": {"pkg.sub.c"}}
    cycles = find_cycles(graph)
    assert cycles == [["pkg", "pkg.a", "pkg"], ["pkg.sub.c", "pkg.sub.d", "pkg.sub.c"]]


@pytest.mark.parametrize("module", ["evomerge.methods", "evomerge.recipe", "evomerge.merge", "evomerge.engine"])
def test_graph_knows_the_core_modules(module):
    """Guards the walker against silently reading nothing (a renamed package would make the cycle test vacuous)."""
    graph = import_graph()
    assert module in graph and graph[module], f"{module} has no evomerge imports in the graph"


def undocumented_local_imports(root: Path = ROOT, package: str = PACKAGE) -> list[str]:
    """``path:line: statement`` for every import inside a function with no comment giving its reason.

    House rule (issue 11): a function-local import is allowed only where something is deferred (an optional heavy
    dependency, the search stack, a cycle), and says why in a comment on its line or on the line above. A run of
    consecutive import statements directly under one comment shares that comment (the import lines between count
    as "the line above").
    """
    offenders: list[str] = []
    for path in sorted((root / package).rglob("*.py")):
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines), filename=str(path))
        imports = [node for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for node in ast.walk(fn) if isinstance(node, (ast.Import, ast.ImportFrom))]
        import_lines = {n for node in imports for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
        for node in sorted({(node.lineno, id(node)): node for node in imports}.values(), key=lambda n: n.lineno):
            own = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            above = node.lineno - 1
            while above in import_lines:
                above -= 1
            if any("#" in line for line in own) or (above >= 1 and lines[above - 1].strip().startswith("#")):
                continue
            offenders.append(f"{path.relative_to(root)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    return offenders


def test_every_function_local_import_says_why_it_is_deferred():
    offenders = undocumented_local_imports()
    assert not offenders, ("function-local imports without a reason comment (move them to module level, or add "
                           "`# deferred: <reason>` on or above the line):\n" + "\n".join(offenders))


def test_local_import_check_sees_missing_reasons(tmp_path):
    """The checker itself: a bare local import is reported; one with a comment above (or a block under one
    comment, or a trailing comment) is not; module-level imports are never reported."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\n")
    (pkg / "a.py").write_text(
        "import json\n\n"
        "def f():\n    import re\n    return re\n\n"
        "def g():\n    # deferred: heavy\n    import re\n    from os import path\n\n    import sys\n    return sys\n\n"
        "def h():\n    import re  # deferred: heavy\n    return re\n")
    assert undocumented_local_imports(tmp_path, "pkg") == ["pkg/a.py:4: import re", "pkg/a.py:12: import sys"]
