"""The recipe's tokenizer settings (mergekit 0.1.5's ``tokenizer_source``, ``tokenizer:`` block, ``chat_template``),
parsed and validated; evomerge/vocabulary.py carries them out.

- ``tokenizer_source: union | base | PATH``: the output tokenizer (the union of every source's vocabulary, the
  base model's, or a given model's); source embeddings are re-indexed to it.
- ``tokenizer: {source: union | base | PATH, tokens: {TOKEN: {source: ..., force: bool}}, pad_to_multiple_of: N}``:
  the same, plus tokens to add and how each token's embedding row is filled: ``source`` is a model path (that
  model's row for the token), ``{kind: zero}``, or ``{kind: model_token, model: PATH, token: STR | token_id: N}``
  (a given row of a given model); ``force: true`` uses it for every model even where the model has the token.
  ``source`` defaults to ``union``. Giving both ``tokenizer_source`` and ``tokenizer`` is an error (as in mergekit).
- ``chat_template``: a named template (see evomerge/chat_templates.py), ``auto`` (the most common template among
  the sources), or a literal Jinja string.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from evomerge.chat_templates import TEMPLATES
from evomerge.errors import EvomergeError

ZERO = "zero"
MODEL_TOKEN = "model_token"


@dataclass(frozen=True)
class TokenSource:
    """Where a token's embedding row comes from: ``kind`` zero, model (``model``'s row for this token) or
    model_token (``model``'s row ``token_id``, or the row of ``token`` in that model's own vocabulary)."""

    kind: str
    model: str | None = None
    token_id: int | None = None
    token: str | None = None


@dataclass(frozen=True)
class TokenSetting:
    """One entry of ``tokenizer.tokens``: its row's source (None: the model's own row) and ``force``."""

    source: TokenSource | None = None
    force: bool = False


@dataclass
class TokenizerSettings:
    """The ``tokenizer:`` block (or ``tokenizer_source`` alone: ``source`` only)."""

    source: str = "union"
    tokens: dict[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None
    raw: dict[str, Any] | None = None  # the block as written (None when it came from tokenizer_source)


def parse_tokenizer_block(value: Any, source: str) -> TokenizerSettings:
    """Validate the ``tokenizer:`` mapping; raises EvomergeError naming the first problem."""
    where = f"{source}: tokenizer"
    if not isinstance(value, Mapping):
        raise EvomergeError(f"{where} must be a mapping with source, tokens, pad_to_multiple_of")
    extra = set(value) - {"source", "tokens", "pad_to_multiple_of"}
    if extra:
        raise EvomergeError(f"{where}: unknown key {sorted(extra)[0]!r} (known: source, tokens, pad_to_multiple_of)")
    src = value.get("source", "union")
    if not isinstance(src, str) or not src:
        raise EvomergeError(f"{where}.source must be union, base or a model path, got {src!r}")
    pad = value.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise EvomergeError(f"{where}.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens_in = value.get("tokens") or {}
    if not isinstance(tokens_in, Mapping):
        raise EvomergeError(f"{where}.tokens must be a mapping of token -> {{source, force}}")
    tokens = {}
    for token, setting in tokens_in.items():
        if not isinstance(token, str) or not token:
            raise EvomergeError(f"{where}.tokens: a token must be a non-empty string, got {token!r}")
        tokens[token] = _token_setting(setting, f"{where}.tokens[{token!r}]")
    return TokenizerSettings(source=src, tokens=tokens, pad_to_multiple_of=pad, raw=copy.deepcopy(dict(value)))


def _token_setting(value: Any, where: str) -> TokenSetting:
    if value is None:
        return TokenSetting()
    if not isinstance(value, Mapping):
        raise EvomergeError(f"{where} must be a mapping with source and force")
    extra = set(value) - {"source", "force"}
    if extra:
        raise EvomergeError(f"{where}: unknown key {sorted(extra)[0]!r} (known: source, force)")
    force = value.get("force", False)
    if not isinstance(force, bool):
        raise EvomergeError(f"{where}.force must be true or false, got {force!r}")
    token_source = _token_source(value.get("source"), f"{where}.source")
    if force and token_source is None:
        raise EvomergeError(f"{where}: force: true needs a source (the row every model takes)")
    return TokenSetting(source=token_source, force=force)


def _token_source(value: Any, where: str) -> TokenSource | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value:
            raise EvomergeError(f"{where} must be a model path")
        return TokenSource(kind="model", model=value)
    if not isinstance(value, Mapping) or value.get("kind") not in (ZERO, MODEL_TOKEN):
        raise EvomergeError(f"{where} must be a model path, {{kind: zero}} or {{kind: model_token, model, "
                            f"token | token_id}}")
    if value["kind"] == ZERO:
        if set(value) != {"kind"}:
            raise EvomergeError(f"{where}: {{kind: zero}} takes no other keys")
        return TokenSource(kind=ZERO)
    extra = set(value) - {"kind", "model", "token", "token_id"}
    if extra:
        raise EvomergeError(f"{where}: unknown key {sorted(extra)[0]!r} (known: kind, model, token, token_id)")
    model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
    if not isinstance(model, str) or not model:
        raise EvomergeError(f"{where}: model_token needs a model path")
    if (token is None) == (token_id is None):
        raise EvomergeError(f"{where}: model_token needs exactly one of token or token_id")
    if token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        raise EvomergeError(f"{where}.token_id must be a non-negative integer, got {token_id!r}")
    if token is not None and not isinstance(token, str):
        raise EvomergeError(f"{where}.token must be a string, got {token!r}")
    return TokenSource(kind=MODEL_TOKEN, model=model, token_id=token_id, token=token)


def token_source_models(settings: TokenizerSettings) -> list[str]:
    """Every model path the settings name (output source and token sources), as written."""
    names = [settings.source] if settings.source not in ("union", "base") else []
    for setting in settings.tokens.values():
        if setting.source is not None and setting.source.model is not None:
            names.append(setting.source.model)
    return names


def check_chat_template(value: Any, source: str) -> str | None:
    """mergekit's rule: a short name without '{' or newlines is a named template (or ``auto``); anything else
    must be a Jinja template (at least 20 characters, with a '{')."""
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise EvomergeError(f"{source}: chat_template must be a template name or a Jinja string, got {value!r}")
    if is_template_name(value):
        if value != "auto" and value not in TEMPLATES:
            raise EvomergeError(f"{source}: unknown chat_template {value!r} (named: auto, "
                                f"{', '.join(sorted(TEMPLATES))}; or a Jinja string)")
        return value
    if len(value) < 20 or "{" not in value:
        raise EvomergeError(f"{source}: chat_template {value[:40]!r} is neither a known name nor a Jinja template")
    return value


def is_template_name(value: str) -> bool:
    return len(value) < 256 and "\n" not in value and "{" not in value
