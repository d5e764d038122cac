"""Paths written into run folders and exports without naming the machine (issue 13).

A path inside a run folder's files is written relative to that folder as ``./x`` or ``../x`` (``portable_paths``,
also inside ``custom:PATH:fn``-style specs); reading resolves it against the folder again (``local_paths``), so a
folder moved together with its models still resumes and exports. Free text (error messages) has its absolute paths
made relative too (``portable_text``); URLs are left alone.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

# an absolute path, alone or after a spec prefix such as ``custom:`` (then up to the next ``:``)
_ABSOLUTE = re.compile(r"^(?P<prefix>[A-Za-z_]+:)?(?P<path>/[^:]*)(?P<suffix>:.*)?$", re.DOTALL)
_RELATIVE = re.compile(r"^(?P<prefix>[A-Za-z_]+:)?(?P<path>\.\.?/[^:]*)(?P<suffix>:.*)?$", re.DOTALL)
_ANY_ABSOLUTE = re.compile(r"(?<![\w.:/])/[\w.+-]+(?:/[\w.+-]+)+")


def portable_paths(value: Any, root: Path) -> Any:
    """``value`` (a mapping/list/str tree) with every absolute path made relative to ``root`` as ``./x`` or
    ``../x``, also after a spec prefix (``custom:/p/f.py:fn`` -> ``custom:../f.py:fn``); other values unchanged.
    The inverse is ``local_paths``."""
    if isinstance(value, dict):
        return {k: portable_paths(v, root) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(v, root) for v in value]
    if isinstance(value, str):
        m = _ABSOLUTE.match(value)
        if m and len(m["path"]) > 1:
            rel = os.path.relpath(m["path"], root)
            rel = "../" if rel == ".." else rel if rel.startswith("../") else f"./{rel}"
            return f"{m['prefix'] or ''}{rel}{m['suffix'] or ''}"
    return value


def local_paths(value: Any, root: Path) -> Any:
    """The inverse of ``portable_paths``: every ``./x`` or ``../x`` (also after a spec prefix) resolved against
    ``root`` into an absolute path."""
    if isinstance(value, dict):
        return {k: local_paths(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [local_paths(v, root) for v in value]
    if isinstance(value, str):
        m = _RELATIVE.match(value)
        if m:
            path = os.path.normpath(os.path.join(root, m["path"]))
            return f"{m['prefix'] or ''}{path}{m['suffix'] or ''}"
    return value


def portable_text(text: str, root: Path) -> str:
    """Free text (an error message) with every absolute path in it made relative to ``root``."""
    return _ANY_ABSOLUTE.sub(lambda m: os.path.relpath(m[0], root), text)
