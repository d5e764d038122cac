"""Evaluators: ``build_evaluator(spec) -> Evaluator``; ``Evaluator.evaluate(model, tokenizer) -> dict[str, float]``.

Specs (strings are what the command line and experiment YAMLs use):

| spec | what |
|---|---|
| ``mgsm:LANG`` | MGSM in LANG (bn de en es fr ja ru sw te th zh): ``evaluators/mgsm_LANG.yaml``, else ``mgsm.yaml`` |
| ``gsm8k`` / ``gsm8k:SPLIT`` | GSM8K: search split (test items 250..1318) by default; ``test`` (0..249), ``train`` |
| ``NAME`` / ``NAME:SPLIT`` | any ``evaluators/NAME.yaml`` |
| ``lm_eval:TASK[,METRIC]`` | an lm-eval task (offline), e.g. ``lm_eval:gsm8k,exact_match,strict-match`` |
| ``perplexity:PATH`` | perplexity of a text file or a JSONL field (``field`` option, default ``text``) |
| ``custom:pkg.mod:fn`` / ``custom:path/file.py:fn`` | ``fn(model, tokenizer) -> dict`` |
| ``path/to/file.yaml`` | an evaluator YAML (``type: math_word | lm_eval | perplexity | custom``), or an lm-eval task |
| a dict | the same as an evaluator YAML's content (relative paths from ``base_dir``, default the current folder) |

``limit`` and ``seed`` subsample items (the same items for every candidate); other keyword options override the
YAML's keys (``split``, ``batch_size``, ``max_new_tokens``, ``stop``, ``fewshot``, ``template``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Evaluator, load_yaml, resolve_path
from evomerge.evaluators.custom import CustomEvaluator
from evomerge.evaluators.language import SUPPORTED_LANGUAGES
from evomerge.evaluators.lm_harness import LmEvalEvaluator

__all__ = ["Evaluator", "build_evaluator", "evaluators_dir", "builtin_names", "EVALUATOR_TYPES"]

EVALUATOR_TYPES = ("math_word", "lm_eval", "perplexity", "custom")
_GENERATION_OPTIONS = ("batch_size", "max_new_tokens", "stop")


def evaluators_dir() -> Path:
    """The top-level ``evaluators/`` folder (data, templates, evaluator YAMLs); EVOMERGE_EVALUATORS_DIR overrides."""
    override = os.environ.get("EVOMERGE_EVALUATORS_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "evaluators"


def builtin_names() -> list[str]:
    """Names of the evaluator YAMLs shipped in ``evaluators/`` (``mgsm`` is used as ``mgsm:LANG``)."""
    return sorted(p.stem for p in evaluators_dir().glob("*.yaml") if p.stem != "languages")


def build_evaluator(spec: str | dict | os.PathLike, limit: int | None = None, seed: int = 0,
                    base_dir: str | os.PathLike | None = None, **options: Any) -> Evaluator:
    """Build an evaluator once (expensive setup here); then call ``.evaluate(model, tokenizer)`` many times.

    Args:
        spec: what to evaluate (see the module docstring): a spec string such as ``"mgsm:ja"``,
            ``"lm_eval:TASK"``, ``"perplexity:PATH"``, ``"custom:pkg.mod:fn"``, a YAML path, or a mapping.
        limit: evaluate a seeded subsample of this many items (the same items for every candidate).
        seed: seed of that subsample.
        base_dir: the folder relative paths in the spec are resolved against (e.g. the experiment YAML's
            folder); default the current folder. Paths inside an evaluator YAML are relative to that YAML.
        **options: override the evaluator YAML's keys (``split``, ``batch_size``, ``max_new_tokens``,
            ``stop``, ``fewshot``, ``template``...); None values are ignored.

    Returns:
        The evaluator; its ``metric_names`` are the keys ``evaluate`` returns.

    Raises:
        EvomergeError: an unknown spec or evaluator type, a missing file, an unknown key, or an invalid
            ``limit``.
    """
    config, base_dir = _resolve_spec(spec, Path(base_dir) if base_dir is not None else Path.cwd())
    config = _apply_options(config, options)
    kind = config.pop("type", "math_word")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise EvomergeError(f"limit must be a positive integer, got {limit!r}")
    if kind == "math_word":
        from evomerge.evaluators.math_word import MathWordEvaluator  # deferred: imports torch and transformers

        return MathWordEvaluator(config, base_dir=base_dir, evaluators_dir=evaluators_dir(), limit=limit,
                                 seed=seed)
    if kind == "lm_eval":
        return LmEvalEvaluator(config, base_dir=base_dir, limit=limit, seed=seed)
    if kind == "perplexity":
        from evomerge.evaluators.perplexity import PerplexityEvaluator  # deferred: imports torch

        return PerplexityEvaluator(config, base_dir=base_dir, limit=limit, seed=seed)
    if kind == "custom":
        return CustomEvaluator(config, base_dir=base_dir, limit=limit, seed=seed)
    raise EvomergeError(f"unknown evaluator type {kind!r}; choose from {', '.join(EVALUATOR_TYPES)}")


def _apply_options(config: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    config = dict(config)
    for key, value in options.items():
        if value is None:
            continue
        if key in _GENERATION_OPTIONS and config.get("type", "math_word") == "math_word":
            generation = dict(config.get("generation") or {})
            generation[key] = tuple(value) if key == "stop" else value
            config["generation"] = generation
        else:
            config[key] = value
    return config


def _resolve_spec(spec: str | dict | os.PathLike, base_dir: Path) -> tuple[dict[str, Any], Path]:
    if isinstance(spec, dict):
        config = dict(spec)
        return config, resolve_path(config.pop("base_dir", base_dir), base_dir)
    text = os.fspath(spec).strip()
    if not text:
        raise EvomergeError("empty evaluator spec")
    if text.endswith((".yaml", ".yml")):
        path = resolve_path(text, base_dir)
        if not path.is_file():
            raise EvomergeError(f"evaluator YAML not found: {text}")
        config = load_yaml(path)
        if "type" not in config and "task" in config:  # an lm-eval task YAML: run it from its folder
            return {"type": "lm_eval", "task": str(config["task"]), "include_path": str(path.parent.resolve())}, \
                path.parent
        return config, path.parent.resolve()
    kind, _, rest = text.partition(":")
    if kind == "lm_eval":
        task, _, metric = rest.partition(",")
        if not task:
            raise EvomergeError("lm_eval spec needs a task: lm_eval:TASK[,METRIC]")
        return {"type": "lm_eval", "task": task, **({"metric": metric} if metric else {})}, base_dir
    if kind == "perplexity":
        if not rest:
            raise EvomergeError("perplexity spec needs a file: perplexity:PATH")
        return {"type": "perplexity", "path": rest}, base_dir
    if kind == "custom":
        if not rest:
            raise EvomergeError("custom spec needs a function: custom:package.module:function")
        return {"type": "custom", "function": rest}, base_dir
    return _builtin(kind, rest)


def _builtin(name: str, arg: str) -> tuple[dict[str, Any], Path]:
    folder = evaluators_dir()
    if name == "mgsm":
        if arg not in SUPPORTED_LANGUAGES:
            raise EvomergeError(f"mgsm needs a language: mgsm:LANG with LANG one of {', '.join(SUPPORTED_LANGUAGES)}")
        specific = folder / f"mgsm_{arg}.yaml"
        if specific.is_file():
            return load_yaml(specific), folder
        config = load_yaml(folder / "mgsm.yaml")
        return _fill_language(config, arg), folder
    path = folder / f"{name}.yaml"
    if not name or not path.is_file() or name == "languages":
        raise EvomergeError(f"unknown evaluator {name!r}; built-in: {', '.join(builtin_names())} "
                            "(as mgsm:LANG), or lm_eval:TASK, perplexity:PATH, custom:MODULE:FN, a YAML file")
    config = load_yaml(path)
    if arg:
        config["split"] = arg
    return config, folder


def _fill_language(value: Any, language: str) -> Any:
    if isinstance(value, str):
        return value.replace("{language}", language)
    if isinstance(value, dict):
        return {k: _fill_language(v, language) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill_language(v, language) for v in value]
    return value
