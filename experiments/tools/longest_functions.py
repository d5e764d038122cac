"""Print the longest functions of a package (by ast: lines from ``def`` to the last line of the body).

    python experiments/tools/longest_functions.py [PACKAGE_DIR] [--top N]

Columns: lines, parameters (self/cls not counted; *args/**kwargs count one each), qualified name, file:line.
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path


def functions(root: Path) -> list[tuple[int, int, str, str]]:
    """(lines, parameters, qualified name, file:line) of every function and method under ``root``."""
    out = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        out += _walk(tree, "", path)
    return out


def _walk(node: ast.AST, prefix: str, path: Path) -> list[tuple[int, int, str, str]]:
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = child.args
            names = [p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
            params = len([n for n in names if n not in ("self", "cls")]) + (a.vararg is not None) + (
                a.kwarg is not None)
            start = min([child.lineno, *(d.lineno for d in child.decorator_list)])
            lines = (child.end_lineno or child.lineno) - start + 1
            found.append((lines, params, prefix + child.name, f"{path}:{child.lineno}"))
            found += _walk(child, f"{prefix}{child.name}.", path)
        elif isinstance(child, ast.ClassDef):
            found += _walk(child, f"{prefix}{child.name}.", path)
        else:
            found += _walk(child, prefix, path)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="evomerge")
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument("--params", action="store_true", help="sort by parameter count instead of length")
    args = parser.parse_args()
    rows = functions(Path(args.root))
    rows.sort(key=lambda r: (-(r[1] if args.params else r[0]), r[2]))
    print(f"{'lines':>5} {'params':>6}  name  (file:line)")
    for lines, params, name, where in rows[: args.top]:
        print(f"{lines:>5} {params:>6}  {name}  ({where})")


if __name__ == "__main__":
    main()
