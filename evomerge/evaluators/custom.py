"""Custom metrics: a user function ``fn(model, tokenizer, **kwargs) -> dict[str, float]``.

``function`` is ``package.module:function`` (imported normally) or ``path/to/file.py:function`` (loaded from that
file, relative to the YAML that names it), so an experiment folder that is not a package can hold its own task
code. As for a script Python runs, the file's own folder is put first on ``sys.path`` of every process that
loads it (the driver, each search worker), so the file can import its sibling modules (``from helpers import
f``); a sibling module name is imported once per process (the first folder that provides it wins).
Declare the metric names up front with ``metrics: [...]`` (or a ``metric_names`` attribute on the function) so
an experiment's objectives can be checked before the search starts; every call is checked against them.
``kwargs`` (a mapping in the YAML) is passed to the function on every call, as are ``limit``/``seed`` when the
function accepts them.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Evaluator, ItemScores, check_indices, check_keys, resolve_path

CONFIG_KEYS = {"type", "name", "description", "function", "kwargs", "metrics", "n_items"}


def load_function(target: str, base_dir: Path) -> Callable:
    """``pkg.mod:fn`` or ``file.py:fn`` -> the function object (a file's folder first on ``sys.path``, see the
    module docstring).

    Raises:
        EvomergeError: a malformed target, a missing file, a failed import, or no such function.
    """
    module_part, sep, func_name = target.rpartition(":")
    if not sep or not module_part or not func_name:
        raise EvomergeError(f"custom evaluator {target!r}: expected package.module:function or path/file.py:function")
    if module_part.endswith(".py"):
        path = resolve_path(module_part, base_dir).resolve()
        if not path.is_file():
            raise EvomergeError(f"custom evaluator file not found: {path}")
        module_name = f"evomerge_custom_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:10]}"
        module = sys.modules.get(module_name)
        if str(path.parent) not in sys.path:  # its sibling modules import as they would from a script
            sys.path.insert(0, str(path.parent))
        if module is None:
            spec = importlib.util.spec_from_file_location(module_name, path)
            if spec is None or spec.loader is None:
                raise EvomergeError(f"custom evaluator file {path} is not a Python module")
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except Exception as exc:
                del sys.modules[module_name]
                raise EvomergeError(f"custom evaluator {path}: import failed: {type(exc).__name__}: {exc}") from None
    else:
        try:
            module = importlib.import_module(module_part)
        except ImportError as exc:
            raise EvomergeError(f"custom evaluator: cannot import {module_part!r} ({exc})") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise EvomergeError(f"custom evaluator: {module_part} has no function {func_name!r}")
    return func


class CustomEvaluator(Evaluator):
    """Calls the user's function on every evaluation and checks what it returns."""

    def __init__(self, config: dict[str, Any], base_dir: Path, limit: int | None = None, seed: int = 0) -> None:
        check_keys(config, CONFIG_KEYS, "custom evaluator")
        if "function" not in config:
            raise EvomergeError("custom evaluator needs a 'function' (package.module:function or file.py:function)")
        self.target = str(config["function"])
        self.function = load_function(self.target, base_dir)
        self.name = str(config.get("name", self.target.rpartition(":")[2]))
        self.kwargs = dict(config.get("kwargs") or {})
        accepted = inspect.signature(self.function).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in accepted.values())
        for key, value in (("limit", limit), ("seed", seed)):
            if value is not None and (takes_any or key in accepted):
                self.kwargs.setdefault(key, value)
        declared = config.get("metrics") or getattr(self.function, "metric_names", None) or ()
        self.metric_names = tuple(str(m) for m in declared)
        self.takes_items = takes_any or "items" in accepted
        self.n_items = self._item_count(config.get("n_items", getattr(self.function, "n_items", None)))

    def _item_count(self, declared: Any) -> int | None:
        if callable(declared):
            declared = declared(**self.kwargs)
        if declared is None or not self.takes_items:
            return None
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 1:
            raise EvomergeError(f"custom evaluator {self.target}: n_items must be a positive integer, "
                                f"got {declared!r}")
        return declared

    def score_items(self, model, tokenizer, indices: Sequence[int]) -> ItemScores:
        """The function's per-item values on the items at ``indices`` (see the module docstring).

        Raises:
            EvomergeError: the function takes no ``items`` or declares no ``n_items``; it returns anything but
                ``{metric: one number per item}`` with the declared metrics.
        """
        if self.n_items is None:
            return super().score_items(model, tokenizer, indices)
        positions = check_indices(indices, self.n_items, self.name)
        result = self.function(model, tokenizer, items=positions, **self.kwargs)
        if not isinstance(result, dict):
            raise EvomergeError(f"custom evaluator {self.target} returned {type(result).__name__}, expected a dict")
        values: dict[str, tuple[float, ...]] = {}
        for metric in self.metric_names or tuple(result):
            try:
                values[str(metric)] = tuple(float(v) for v in result[metric])
            except (KeyError, TypeError, ValueError):
                raise EvomergeError(f"custom evaluator {self.target}: with items= it must return "
                                    f"{{metric: one number per item}}; {metric!r} is not that") from None
        return ItemScores(tuple(positions), values)

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """The user function's metrics: ``{name: float}`` (``EvomergeError`` when it returns anything else)."""
        result = self.function(model, tokenizer, **self.kwargs)
        if not isinstance(result, dict):
            raise EvomergeError(f"custom evaluator {self.target} returned {type(result).__name__}, expected a dict")
        metrics: dict[str, float] = {}
        for key, value in result.items():
            try:
                metrics[str(key)] = float(value)
            except (TypeError, ValueError):
                raise EvomergeError(f"custom evaluator {self.target}: metric {key!r} is not a number ({value!r})") \
                    from None
        missing = [m for m in self.metric_names if m not in metrics]
        if missing:
            raise EvomergeError(f"custom evaluator {self.target} did not return declared metric(s) "
                                f"{', '.join(missing)}")
        return metrics
