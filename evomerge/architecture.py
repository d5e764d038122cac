"""Where each architecture keeps its blocks, embeddings, final norm and head: one table, used by the merge
planner (slices, frankenmerges), the PS layer groups and the data-flow (DFS) candidate.

Names are checkpoint tensor names (what ``save_pretrained`` writes), which are also module paths except where
transformers 5 renames a module on load (GPT-NeoX's ``embed_out`` is the ``lm_head`` module; see
``module_tensors``). The table follows mergekit 0.1.5's architecture definitions (``pre_weights``: the input
embeddings, taken from the FIRST slice of a frankenmerge; ``post_weights``: the final norm and the head, taken
from the LAST slice; ``mergekit/plan.py``, ``plan_module``).

An architecture outside the table is described from its tensor names (``infer``): the block list is the
``P.N.`` prefix whose indices cover every layer, the input embeddings are the other tensors whose name contains
``embed`` (the rule evomerge used before this table). What such a model cannot do is refused up front with
one line naming the architecture and the reason (``require_blocks``, ``dataflow_refusal``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from evomerge.errors import EvomergeError

_INDEXED = re.compile(r"^(?P<prefix>.+?)\.(?P<index>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Architecture:
    """The layout of one causal-LM architecture, in checkpoint tensor names.

    Attributes:
        name: the ``architectures[0]`` of config.json (e.g. ``GPT2LMHeadModel``), or the model_type.
        blocks: prefix of the transformer blocks (``model.layers``, ``transformer.h``, ``gpt_neox.layers``);
            block ``N``'s tensors are ``{blocks}.N.*``. None: no block list was found.
        embeddings: prefixes of the input embeddings (token, and position for GPT-2), mergekit's pre_weights.
        final_norm: prefix of the final norm (``model.norm``, ``transformer.ln_f``, ...), None if unknown.
        head: prefix of the output head (``lm_head``, GPT-NeoX's ``embed_out``).
        num_layers_key: the config.json key holding the number of blocks (``n_layer`` for GPT-2).
        known: True for the table's entries, False when inferred from tensor names.
        dataflow: None when the data-flow candidate supports it, else the reason it is refused.
    """

    name: str
    blocks: str | None
    embeddings: tuple[str, ...]
    final_norm: str | None
    head: str = "lm_head"
    num_layers_key: str = "num_hidden_layers"
    known: bool = True
    dataflow: str | None = None

    def split_block(self, tensor: str) -> tuple[int, str] | None:
        """(block index, the rest of the name) of a block tensor ``{blocks}.N.rest``; None otherwise."""
        if self.blocks is None or not tensor.startswith(self.blocks + "."):
            return None
        index, _, rest = tensor[len(self.blocks) + 1:].partition(".")
        return (int(index), rest) if index.isdigit() and rest else None

    def block_tensor(self, index: int, rest: str) -> str:
        """The name of block ``index``'s tensor ``rest`` (inverse of ``split_block``)."""
        return f"{self.blocks}.{index}.{rest}"

    def is_embedding(self, tensor: str) -> bool:
        """True for the input embeddings (mergekit's pre_weights): they come from a frankenmerge's first slice."""
        return any(tensor == e or tensor.startswith(e + ".") for e in self.embeddings)

    def block_filter(self, index: int) -> str:
        """The recipe filter (a substring of tensor names, as in mergekit) selecting block ``index`` only.

        The short form ``layers.3.`` / ``h.3.`` when the blocks' last name component is ``layers`` (the form
        mergekit users write); otherwise the full prefix ``transformer.h.3.``, which cannot match another block.
        """
        blocks = self.require_blocks("layer groups")
        last = blocks.rsplit(".", 1)[-1]
        return f"{last}.{index}." if last == "layers" else f"{blocks}.{index}."

    def embedding_filters(self) -> list[str]:
        """Recipe filters selecting the input embeddings (``embed_tokens``, ``wte`` and ``wpe``, ...)."""
        return [e.rsplit(".", 1)[-1] if e.rsplit(".", 1)[-1].startswith("embed") else e for e in self.embeddings]

    def require_blocks(self, what: str) -> str:
        """The block prefix (``blocks``) of an architecture that has one.

        Args: what: the feature that needs the blocks, named in the error.
        Returns: ``blocks``. Raises: EvomergeError (one line) when the block list of this architecture is unknown."""
        if self.blocks is None:
            raise EvomergeError(f"{self.name}: {what} need the transformer blocks, and no block list "
                                f"(tensors named PREFIX.N.*) was found in this architecture's checkpoint")
        return self.blocks


def _table() -> dict[str, Architecture]:
    entries = [Architecture(name, "model.layers", ("model.embed_tokens",), "model.norm") for name in (
        "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "GemmaForCausalLM",
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM")]
    entries += [
        Architecture("PhiForCausalLM", "model.layers", ("model.embed_tokens",), "model.final_layernorm"),
        Architecture("GPTNeoXForCausalLM", "gpt_neox.layers", ("gpt_neox.embed_in",), "gpt_neox.final_layer_norm",
                     head="embed_out"),
        Architecture("GPT2LMHeadModel", "transformer.h", ("transformer.wte", "transformer.wpe"), "transformer.ln_f",
                     num_layers_key="n_layer"),
        Architecture("FalconForCausalLM", "transformer.h", ("transformer.word_embeddings",), "transformer.ln_f"),
    ]
    return {a.name: a for a in entries}


KNOWN: dict[str, Architecture] = _table()


def _block_name_pattern() -> re.Pattern[str]:
    prefixes = set()
    for arch in KNOWN.values():
        assert arch.blocks is not None, f"{arch.name}: every table entry names its block list"
        prefixes.add(re.escape(arch.blocks))
    return re.compile("^(?:" + "|".join(sorted(prefixes)) + r")\.(\d+)\.")


#: a block tensor of any architecture in the table; group 1 is the block index
BLOCK_NAME = _block_name_pattern()
NUM_LAYERS_KEYS = tuple(sorted({a.num_layers_key for a in KNOWN.values()}))


def architecture_name(config: Mapping[str, Any]) -> str:
    """``architectures[0]`` of a config.json mapping, else its model_type."""
    archs = config.get("architectures") or []
    return str(archs[0]) if archs else str(config.get("model_type"))


def infer(name: str, tensor_names: Iterable[str], num_layers: int | None) -> Architecture:
    """An architecture outside the table, described from its tensor names (see the module docstring)."""
    names = list(tensor_names)
    indices: dict[str, set[int]] = {}
    counts: Counter[str] = Counter()
    for tensor in names:
        match = _INDEXED.match(tensor)
        if match:
            indices.setdefault(match["prefix"], set()).add(int(match["index"]))
            counts[match["prefix"]] += 1
    full = [p for p, ix in indices.items() if num_layers and ix == set(range(num_layers))]
    blocks = max(full, key=counts.__getitem__) if full else None
    outer = [t for t in names if blocks is None or not t.startswith(blocks + ".")]
    embeddings = tuple(t.removesuffix(".weight") for t in outer if "embed" in t and not t.startswith("lm_head"))
    return Architecture(name, blocks, embeddings, None, known=False)


def resolve(config: Mapping[str, Any], tensor_names: Iterable[str], num_layers: int | None = None) -> Architecture:
    """The architecture of a checkpoint (config.json mapping + its tensor names).

    Args:
        config: config.json as a mapping.
        tensor_names: the checkpoint's tensor names (only used for architectures outside the table).
        num_layers: the number of blocks (for inference; read from the config when None).
    Returns:
        The table's entry for ``architectures[0]``, or one inferred from the tensor names.
    """
    name = architecture_name(config)
    if name in KNOWN:
        return KNOWN[name]
    if num_layers is None:
        num_layers = next((config[k] for k in ("num_hidden_layers", "n_layer", "num_layers")
                           if isinstance(config.get(k), int)), None)
    return infer(name, tensor_names, num_layers)


def of_model(model) -> Architecture:
    """The architecture of a loaded transformers model (its config; its module names when outside the table:
    the block list's checkpoint prefix is also its module path)."""
    config = dict(model.config.to_dict(), architectures=[type(model).__name__])
    return resolve(config, model.state_dict().keys(), model.config.num_hidden_layers)


def checkpoint_tensors(model) -> dict[str, Any]:
    """The model's parameters and persistent buffers under their CHECKPOINT names (transformers' own reverse of
    its load-time renamings, e.g. GPT-NeoX ``lm_head.weight`` -> ``embed_out.weight``), the same tensor objects
    as ``model.state_dict(keep_vars=True)``.

    Raises:
        EvomergeError: transformers stores a tensor in another layout than the checkpoint (e.g. Mixtral's experts,
            stacked on load), so no model tensor can be written in place under that checkpoint name.
    """
    # deferred: architecture.py is a torch-free table; transformers loads only when a model is checked
    from transformers.core_model_loading import revert_weight_conversion

    state = model.state_dict(keep_vars=True)
    own = {id(t) for t in state.values()}
    named = dict(revert_weight_conversion(model, dict(state)))
    converted = next((name for name, t in named.items() if id(t) not in own), None)
    if converted is not None:
        raise EvomergeError(f"{type(model).__name__}: transformers stores {converted} in another layout than the "
                            "checkpoint (converted on load), so the in-memory engine cannot write it in place; "
                            "use `evomerge merge`")
    return named


def check_in_place(path) -> None:
    """Raises EvomergeError (one line) when the in-memory engine cannot write the checkpoint at ``path`` into a
    transformers model in place (see ``checkpoint_tensors``); the model is built on the meta device (no memory)."""
    # deferred: architecture.py is a torch-free table; torch and transformers load only when a model is checked
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError, OSError) as exc:
        raise EvomergeError(f"{path}: transformers cannot build this model: {str(exc).splitlines()[0]}") from None
    checkpoint_tensors(model)


def dataflow_refusal(arch: Architecture, config: Mapping[str, Any]) -> str | None:
    """Why a data-flow (DFS) search cannot run on this architecture, or None when it can."""
    if arch.blocks is None:
        return f"{arch.name}: data-flow merging needs the transformer blocks, and none were found"
    if arch.dataflow:
        return f"{arch.name}: {arch.dataflow}"
    if config.get("scale_attn_by_inverse_layer_idx"):
        return (f"{arch.name}: scale_attn_by_inverse_layer_idx scales each block's attention by its own index, "
                "so a block moved to another path position would change meaning; data-flow merging is refused")
    return None


__all__ = ["Architecture", "BLOCK_NAME", "KNOWN", "NUM_LAYERS_KEYS", "architecture_name", "check_in_place",
           "checkpoint_tensors", "dataflow_refusal", "infer", "of_model", "resolve"]
