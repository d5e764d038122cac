"""Which tensors a checkpoint must hold: what transformers expects for a config, and whether sources agree.

Two questions, both answered the way transformers 5 loads a checkpoint:

- ``expected_tensors(config)``: the tensor names ``save_pretrained`` writes for a model of that config (its
  state dict without the tied heads, with transformers' checkpoint renamings such as GPT-NeoX's ``embed_out``),
  found by building the model on the meta device (no memory, no weights). ``check_written_tensors`` compares a
  written set with it: a name missing is a tensor transformers would fill with random values, an extra name one
  it would drop.
- ``compare_sources(paths, checkpoints)``: before a merge, every source's tensor names, with the tied aliases a
  tied model loads with (its head IS its embeddings, so a tied model's head is read from its embedding tensor).
  The output is untied when any source has a head of its own (mergekit 0.1.5 does the same); any other
  difference is one ``EvomergeError`` naming the tensors and the models, whatever order they are listed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from evomerge.errors import EvomergeError

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h))\.(?P<index>\d+)\.(?P<rest>.+)$")
_SHOWN = 4  # tensor names shown in an error before "and N more"
_NAMELESS_KEYS = frozenset({"_name_or_path", "transformers_version", "dtype", "torch_dtype", "use_cache",
                            "auto_map"})


@dataclass(frozen=True)
class ArchitectureTensors:
    """The tensors transformers expects in a checkpoint of one config.

    Attributes:
        names: what ``save_pretrained`` writes (tied heads left out, checkpoint renamings applied).
        tied: {head name: embedding name} tied by this config (empty when untied).
        ignore_unexpected / ignore_missing: the model class's regexes of names transformers tolerates.
    """

    names: frozenset[str]
    tied: Mapping[str, str]
    ignore_unexpected: tuple[str, ...] = ()
    ignore_missing: tuple[str, ...] = ()


def expected_tensors(config: Mapping[str, Any]) -> ArchitectureTensors | None:
    """The ``ArchitectureTensors`` of a config.json dict; None when transformers has no such architecture
    (no ``architectures``/``model_type``, remote code): then nothing can be checked against it."""
    # keys that never change which tensors a model has: sources of one architecture then share one meta build
    # (about 4 s for an 80-layer 70B Llama config, 0.15 s for a 0.5B one)
    try:
        key = json.dumps({k: v for k, v in config.items() if k not in _NAMELESS_KEYS}, sort_keys=True)
    except (TypeError, ValueError):
        return None
    return _expected_tensors(key)


@lru_cache(maxsize=16)
def _expected_tensors(config_json: str) -> ArchitectureTensors | None:
    import transformers  # deferred: seconds to import; evomerge.checkpoint imports this module to read files

    config = json.loads(config_json)
    archs, model_type = config.get("architectures") or [], config.get("model_type")
    model_cls = getattr(transformers, str(archs[0]), None) if archs else None
    if model_type is None or model_cls is None or not hasattr(model_cls, "_from_config"):
        return None
    for key in ("_name_or_path", "transformers_version", "auto_map"):
        config.pop(key, None)
    try:
        hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
        with torch.device("meta"):
            model = model_cls._from_config(hf_config)
        # inside the try: older transformers lack these, and then the architecture is not checked
        from transformers.core_model_loading import revert_weight_conversion
        from transformers.modeling_utils import remove_tied_weights_from_state_dict

        state = remove_tied_weights_from_state_dict(model.state_dict(), model)
        names = frozenset(revert_weight_conversion(model, state))
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    except Exception:  # noqa: BLE001 - an architecture transformers cannot build here is not checked
        return None
    return ArchitectureTensors(names=names, tied=tied,
                               ignore_unexpected=tuple(model_cls._keys_to_ignore_on_load_unexpected or ()),
                               ignore_missing=tuple(model_cls._keys_to_ignore_on_load_missing or ()))


def check_written_tensors(names: Iterable[str], config: Mapping[str, Any], where: str | Path) -> None:
    """Raise unless ``names`` are exactly the tensors transformers expects for ``config`` (see module docstring).

    Args:
        names: the tensor names written.
        config: the config.json written with them.
        where: the output, for the message.
    Raises:
        EvomergeError: names missing (transformers would initialise them randomly) or unexpected (dropped).
    """
    expected = expected_tensors(config)
    if expected is None:
        return
    written = set(names)
    missing = sorted(n for n in expected.names - written
                     if not any(re.search(p, n) for p in expected.ignore_missing))
    unexpected = sorted(n for n in written - expected.names
                        if not any(re.search(p, n) for p in expected.ignore_unexpected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if unexpected:
            parts.append(f"not expected {_names(unexpected)}")
        raise EvomergeError(f"refusing to write {where}: its tensors do not match its config.json "
                            f"({config.get('architectures', ['?'])[0]}): " + "; ".join(parts))


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOWN])
    return shown + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


# ------------------------------------------------------------------------------------------------ sources


@dataclass
class SourceTensors:
    """How every source's tensors line up (``compare_sources``).

    Attributes:
        aliases: per source, {name: name in its files} for the tied heads it loads from its embeddings.
        heads: the head names tied in some source (written only when ``untied``).
        untied: True when some source has a head of its own: the output then has one too (tied sources give
            their embeddings as their head).
    """

    aliases: list[dict[str, str]]
    heads: set[str] = field(default_factory=set)
    untied: bool = False

    def resolve(self, model: int, name: str) -> str:
        """The name to read from source ``model``'s files for tensor ``name``."""
        return self.aliases[model].get(name, name)


def _template(name: str) -> str:
    match = _LAYER.match(name)
    return f"{match['prefix']}.N.{match['rest']}" if match else name


def source_tied_heads(config: Mapping[str, Any]) -> dict[str, str]:
    """{head: embedding} that transformers ties for this source config (empty when untied or unknown)."""
    expected = expected_tensors(config)
    return dict(expected.tied) if expected is not None else {}


def compare_sources(paths: Sequence[Path], checkpoints: Sequence[Any]) -> SourceTensors:
    """Check that the sources hold the same tensors (tied heads resolved); see the module docstring.

    Args:
        paths: the source folders, in recipe order.
        checkpoints: their opened ``Checkpoint``s (``tensor_names``, ``config``).
    Returns:
        The ``SourceTensors`` the planner reads names through.
    Raises:
        EvomergeError: one line naming the differing tensors (layer index as N) and the models holding them.
    """
    aliases: list[dict[str, str]] = []
    effective: list[set[str]] = []
    heads: set[str] = set()
    for ckpt in checkpoints:
        names = set(ckpt.tensor_names)
        tied = {head: emb for head, emb in source_tied_heads(ckpt.config).items() if emb in names}
        aliases.append(tied)
        heads |= set(tied)
        effective.append({_template(n) for n in names | set(tied)})
    untied = any(not tied for tied in aliases)  # some source has a head of its own
    every = set().union(*effective)
    common = set.intersection(*effective)
    if every != common:
        raise EvomergeError(_difference_message(paths, effective, every - common))
    return SourceTensors(aliases=aliases, heads=heads, untied=untied)


def _difference_message(paths: Sequence[Path], effective: list[set[str]], differing: set[str]) -> str:
    labels = [p.name for p in paths]
    if len(set(labels)) != len(labels):
        labels = [str(p) for p in paths]
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in sorted(differing):
        holders = tuple(i for i, names in enumerate(effective) if name in names)
        groups.setdefault(holders, []).append(name)
    parts = []
    for holders, names in sorted(groups.items(), key=lambda kv: kv[1][0]):
        lacking = [i for i in range(len(paths)) if i not in holders]
        parts.append(f"{_names(names)} in {', '.join(labels[i] for i in holders)} but not in "
                     f"{', '.join(labels[i] for i in lacking)}")
    return "the source models hold different tensors (their architectures differ): " + "; ".join(parts)


__all__ = ["ArchitectureTensors", "SourceTensors", "check_written_tensors", "compare_sources", "expected_tensors",
           "source_tied_heads"]
