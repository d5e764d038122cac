"""The data-flow (DFS) candidate: a path through the layers of models A and B, run over SHARED layer modules.

A candidate is model A's shell (embeddings, rotary embedding, final norm, LM head, tokenizer: all A's modules,
shared, not copied) whose decoder stack is a list of ``PathLayer``s. Each ``PathLayer`` holds a reference to
one of the M = n_A + n_B source layers (A's, then B's) and a scale: the input of path position p is multiplied
by ``scales[p]`` (the paper's W[i, j] for the step from layer i to layer j). The same source layer can appear
several times on a path (the r repetitions), and layer i of A and layer i of B share an index, so a layer's
own ``layer_idx`` cannot address the key/value cache: two positions would write one slot and attend to each
other's keys (wrong logits even in one forward pass with ``use_cache``). ``PathLayer`` therefore sets the
``layer_idx`` of every module of its layer to the path position for the duration of its call. That is the
index every attention uses to choose its cache slot, whatever its architecture passes the cache as
(``cache``, GPT-NeoX's and Falcon's ``layer_past``, GPT-2's positional argument) and however it reaches the
slot (``update``, ``layers[i]``), so each position owns its slot and a cached run equals an uncached one.
Blocks are found through ``evomerge.architecture`` (``model.layers``, ``transformer.h``, ``gpt_neox.layers``).

Changing the path is cheap (no weights move): ``DataflowCandidate.set_path(layers, scales)``.

Export (export.py): with every scale 1 the path is a standard checkpoint (layers copied in path order). With
scales, the same layout plus ``evomerge_dataflow.json`` (``{"input_scales": [...]}``); ``load_dataflow_model``
loads it back as a standard transformers model whose layers are wrapped with their scales.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.core_model_loading import revert_weight_conversion

from evomerge import architecture
from evomerge.errors import EvomergeError

SCALES_FILE = "evomerge_dataflow.json"


class PathLayer(nn.Module):
    """One position on the path: a shared decoder layer, its input scale, and its cache slot (the position).

    While it runs, every module of the layer with an integer ``layer_idx`` (the attention: the index it files
    its keys and values under) carries the path position instead; the layer's own indices are restored after
    the call, so the shared layer is unchanged between calls (one candidate runs at a time per worker)."""

    def __init__(self, layer: nn.Module, position: int, scale: float = 1.0):
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)
        self.attention_type = getattr(layer, "attention_type", None)
        self._indexed = [m for m in layer.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The shared layer on ``hidden_states * scale`` (shape (batch, seq, hidden)) in this position's slot."""
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        own = [m.layer_idx for m in self._indexed]
        for m in self._indexed:
            setattr(m, "layer_idx", self.position)  # noqa: B010 (nn.Module types attributes as tensors)
        try:
            return self.layer(hidden_states, *args, **kwargs)
        finally:
            for m, index in zip(self._indexed, own):
                setattr(m, "layer_idx", index)  # noqa: B010


def _decoder_parts(model: PreTrainedModel) -> tuple[nn.Module, str, nn.ModuleList]:
    """(parent module, attribute name, block list) of a model's transformer blocks; raises EvomergeError (one
    line naming the architecture and the reason) when a data-flow path cannot be run over them."""
    arch = architecture.of_model(model)
    reason = architecture.dataflow_refusal(arch, model.config.to_dict())
    if reason:
        raise EvomergeError(reason)
    assert arch.blocks is not None  # dataflow_refusal refuses an architecture without a block list
    parent_path, _, attr = arch.blocks.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    layers = getattr(parent, attr, None)
    if not isinstance(layers, nn.ModuleList):
        raise EvomergeError(f"{arch.name}: {arch.blocks} is not a list of blocks; data-flow merging is refused")
    if not all(any(isinstance(getattr(m, "layer_idx", None), int) for m in layer.modules()) for layer in layers):
        raise EvomergeError(f"{arch.name}: its blocks do not name their key/value cache slot (layer_idx), so a "
                            "path position cannot own its slot; data-flow merging is refused")
    return parent, attr, layers


def _share_children(shell: nn.Module, model: nn.Module, path: list[str], attr: str) -> nn.Module:
    """Put ``model``'s modules into ``shell`` (shared, not copied) everywhere except along ``path`` to the block
    list and the block list ``attr`` itself; returns the shell's module that holds the block list."""
    src, dst = model, shell
    for step in path + [None]:
        keep = attr if step is None else step
        for name, child in src.named_children():
            if name != keep:
                setattr(dst, name, child)
        if step is None:
            return dst
        src, dst = getattr(src, step), getattr(dst, step)
    return dst


class DataflowCandidate:
    """Model A's shell over the layers of A and B; ``set_path`` rewires it in place and returns the model."""

    def __init__(self, model_a: PreTrainedModel, model_b: PreTrainedModel):
        _, attr, layers_a = _decoder_parts(model_a)
        _, _, layers_b = _decoder_parts(model_b)
        if type(model_a) is not type(model_b):
            raise EvomergeError(f"models A and B must share an architecture: A is {type(model_a).__name__}, "
                                f"B is {type(model_b).__name__}")
        if model_a.config.hidden_size != model_b.config.hidden_size:
            raise EvomergeError("models A and B have different hidden sizes; their layers cannot be chained")
        self.source_layers = list(layers_a) + list(layers_b)
        self.n_a = len(layers_a)
        types_a = list(getattr(model_a.config, "layer_types", None) or [])
        types_b = list(getattr(model_b.config, "layer_types", None) or [])
        self.layer_types = types_a + types_b if types_a and types_b else None
        config = copy.deepcopy(model_a.config)
        with torch.device("meta"):
            shell_config = copy.deepcopy(config)
            shell_config.num_hidden_layers = 1
            if self.layer_types:
                shell_config.layer_types = self.layer_types[:1]
            shell = type(model_a)(shell_config)
        path = str(architecture.of_model(model_a).blocks).split(".")[:-1]
        self.parent = _share_children(shell, model_a, path, attr)
        self.attr = attr
        for module in (shell, self.parent):
            if hasattr(module, "config"):
                setattr(module, "config", config)  # noqa: B010 (nn.Module types attributes as tensors)
        shell.generation_config = copy.deepcopy(model_a.generation_config)
        shell.train(False)  # evaluation mode
        self.model: nn.Module = shell
        self.config = config  # the shell's config object (its layer count follows the path)

    def set_path(self, layers: Sequence[int], scales: Sequence[float] | None = None) -> nn.Module:
        """Rewire the shell to run ``layers`` (indices into A's then B's blocks) with input ``scales``.

        Args:
            layers: combined block indices along the path (A's 0..n_a-1, then B's).
            scales: the input scale of each path position (default all 1).
        Returns:
            The candidate model (the same object every call).
        Raises:
            EvomergeError: an empty path. ValueError: a layer out of range or a scale count mismatch.
        """
        if not layers:
            raise EvomergeError("a data-flow path needs at least one layer")
        scales = list(scales) if scales is not None else [1.0] * len(layers)
        if len(scales) != len(layers):
            raise ValueError("one scale per path position")
        m = len(self.source_layers)
        if any(not 0 <= i < m for i in layers):
            raise ValueError(f"path layer out of range 0..{m - 1}")
        setattr(self.parent, self.attr, nn.ModuleList(
            PathLayer(self.source_layers[i], p, s) for p, (i, s) in enumerate(zip(layers, scales))))
        self.config.num_hidden_layers = len(layers)
        if self.layer_types:
            self.config.layer_types = [self.layer_types[i] for i in layers]
        return self.model


def path_state_dict(model_a: PreTrainedModel, model_b: PreTrainedModel, layers: Sequence[int]
                    ) -> dict[str, torch.Tensor]:
    """A standard state dict with the path's layers laid out in order (copies: a file has no sharing), under
    checkpoint names (transformers' reverse renaming: GPT-NeoX's head is ``embed_out``); a head tied to the
    input embedding is left out, as ``save_pretrained`` does."""
    _, _, layers_a = _decoder_parts(model_a)
    _, _, layers_b = _decoder_parts(model_b)
    blocks = architecture.of_model(model_a).blocks
    source = list(layers_a) + list(layers_b)
    tied: set[str] = set()
    head = model_a.get_output_embeddings()  # type: ignore[no-untyped-call]  # transformers leaves it untyped
    if getattr(model_a.config, "tie_word_embeddings", False) and head is not None:
        tied = {f"{name}.{k}" for name, module in model_a.named_modules() if module is head
                for k in module.state_dict()}
    out: dict[str, torch.Tensor] = {}
    for k, v in model_a.state_dict().items():
        if not k.startswith(f"{blocks}.") and k not in tied:
            out[k] = v.detach().clone().contiguous()
    for p, i in enumerate(layers):
        for k, v in source[i].state_dict().items():
            out[f"{blocks}.{p}.{k}"] = v.detach().clone().contiguous()
    return dict(revert_weight_conversion(model_a, out))


def path_config(model_a: PreTrainedModel, model_b: PreTrainedModel, layers: Sequence[int]) -> PretrainedConfig:
    """Model A's config with the path's number of layers (and layer types, when both models declare them)."""
    config = copy.deepcopy(model_a.config)
    config.num_hidden_layers = len(layers)
    types_a = list(getattr(model_a.config, "layer_types", None) or [])
    types_b = list(getattr(model_b.config, "layer_types", None) or [])
    if types_a and types_b:
        all_types = types_a + types_b
        config.layer_types = [all_types[i] for i in layers]
    return config


def apply_dataflow_scales(model: PreTrainedModel, folder: str | Path) -> PreTrainedModel:
    """Wrap the layers of a model loaded from ``folder`` with the input scales of ``evomerge_dataflow.json``
    (a DFS export with scalings); a folder without that file leaves the model as it is."""
    scales_file = Path(folder) / SCALES_FILE
    if not scales_file.is_file():
        return model
    scales = json.loads(scales_file.read_text())["input_scales"]
    parent, attr, layers = _decoder_parts(model)
    if any(isinstance(layer, PathLayer) for layer in layers):
        return model  # already wrapped
    if len(scales) != len(layers):
        raise EvomergeError(f"{scales_file}: {len(scales)} scales for {len(layers)} layers")
    setattr(parent, attr, nn.ModuleList(PathLayer(layer, p, s) for p, (layer, s) in enumerate(zip(layers, scales))))
    return model


def load_dataflow_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> PreTrainedModel:
    """Load an exported DFS checkpoint: a standard transformers model, its layers wrapped with their input
    scales when ``evomerge_dataflow.json`` is present (a checkpoint with all scales 1 needs none of this)."""
    auto: Any = AutoModelForCausalLM  # transformers' stubs mistype from_pretrained's first argument
    model = auto.from_pretrained(Path(path), dtype=dtype or "auto", use_safetensors=True)
    scaled = apply_dataflow_scales(model.to(device), path)
    scaled.train(False)  # evaluation mode
    return scaled
