"""The data-flow (DFS) candidate: a path through the layers of models A and B, run over SHARED layer modules.

A candidate is model A's shell (embeddings, rotary embedding, final norm, LM head, tokenizer: all A's modules,
shared, not copied) whose decoder stack is a list of ``PathLayer``s. Each ``PathLayer`` holds a reference to
one of the M = n_A + n_B source layers (A's, then B's) and a scale: the input of path position p is multiplied
by ``scales[p]`` (the paper's W[i, j] for the step from layer i to layer j). The same source layer can appear
several times on a path (the r repetitions), so a layer's own ``layer_idx`` cannot address the KV cache;
``PathLayer`` hands its layer a cache view that redirects every cache update to the path position, so
``generate()`` with a KV cache works along the path (the evaluators generate).

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

from evomerge.errors import EvomergeError

SCALES_FILE = "evomerge_dataflow.json"


class _PositionCache:
    """A view of a transformers Cache that files every update under one path position."""

    def __init__(self, cache: Any, position: int):
        self._cache = cache
        self._position = position

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int | None = None,
               *args: Any, **kwargs: Any) -> Any:
        return self._cache.update(key_states, value_states, self._position, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cache, name)


class PathLayer(nn.Module):
    """One position on the path: a shared decoder layer, its input scale, and its cache position."""

    def __init__(self, layer: nn.Module, position: int, scale: float = 1.0):
        super().__init__()
        self.layer = layer
        self.position = position
        self.scale = float(scale)
        self.attention_type = getattr(layer, "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The shared layer on ``hidden_states * scale`` (shape (batch, seq, hidden)), with the path's cache."""
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        for key in ("cache", "past_key_values", "past_key_value"):
            if kwargs.get(key) is not None:
                kwargs[key] = _PositionCache(kwargs[key], self.position)
        return self.layer(hidden_states, *args, **kwargs)


def _decoder_parts(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """(the decoder module, its layer list) of a causal LM."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    layers = getattr(inner, "layers", None) if inner is not None else None
    if inner is None or not isinstance(layers, nn.ModuleList):
        raise EvomergeError(f"{type(model).__name__}: data-flow merging needs a decoder with model.layers "
                            "(Llama, Mistral, Qwen2 and similar)")
    return inner, layers


class DataflowCandidate:
    """Model A's shell over the layers of A and B; ``set_path`` rewires it in place and returns the model."""

    def __init__(self, model_a: PreTrainedModel, model_b: PreTrainedModel):
        inner_a, layers_a = _decoder_parts(model_a)
        _, layers_b = _decoder_parts(model_b)
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
        inner = getattr(shell, shell.base_model_prefix)
        for name, child in model_a.named_children():
            if name != model_a.base_model_prefix:
                setattr(shell, name, child)
        for name, child in inner_a.named_children():
            if name != "layers":
                setattr(inner, name, child)
        shell.config = config
        inner.config = config
        shell.generation_config = copy.deepcopy(model_a.generation_config)
        shell.train(False)  # evaluation mode
        self.model: nn.Module = shell
        self.config = config  # the shell's config object (its layer count follows the path)
        self.inner = inner

    def set_path(self, layers: Sequence[int], scales: Sequence[float] | None = None) -> nn.Module:
        """Rewire the shell to ``layers`` (combined indices: A's 0..n_a-1, then B's) with input ``scales``.

        Returns:
            The candidate model (the same module object every call).

        Raises:
            EvomergeError: an empty path. ValueError: a layer index out of range or a scale count mismatch.
        """
        if not layers:
            raise EvomergeError("a data-flow path needs at least one layer")
        scales = list(scales) if scales is not None else [1.0] * len(layers)
        if len(scales) != len(layers):
            raise ValueError("one scale per path position")
        m = len(self.source_layers)
        if any(not 0 <= i < m for i in layers):
            raise ValueError(f"path layer out of range 0..{m - 1}")
        self.inner.layers = nn.ModuleList(
            PathLayer(self.source_layers[i], p, s) for p, (i, s) in enumerate(zip(layers, scales)))
        self.config.num_hidden_layers = len(layers)
        if self.layer_types:
            self.config.layer_types = [self.layer_types[i] for i in layers]
        return self.model


def path_state_dict(model_a: PreTrainedModel, model_b: PreTrainedModel, layers: Sequence[int]
                    ) -> dict[str, torch.Tensor]:
    """A standard state dict with the path's layers laid out in order (copies: a file has no sharing)."""
    _, layers_a = _decoder_parts(model_a)
    _, layers_b = _decoder_parts(model_b)
    prefix = model_a.base_model_prefix
    source = list(layers_a) + list(layers_b)
    out: dict[str, torch.Tensor] = {}
    for k, v in model_a.state_dict().items():
        if not k.startswith(f"{prefix}.layers."):
            out[k] = v.detach().clone().contiguous()
    for p, i in enumerate(layers):
        for k, v in source[i].state_dict().items():
            out[f"{prefix}.layers.{p}.{k}"] = v.detach().clone().contiguous()
    return out


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


def apply_dataflow_scales(model: nn.Module, folder: str | Path) -> nn.Module:
    """Wrap the layers of a model loaded from ``folder`` with the input scales of ``evomerge_dataflow.json``
    (a DFS export with scalings); a folder without that file leaves the model as it is."""
    scales_file = Path(folder) / SCALES_FILE
    if not scales_file.is_file():
        return model
    scales = json.loads(scales_file.read_text())["input_scales"]
    inner, layers = _decoder_parts(model)
    if any(isinstance(layer, PathLayer) for layer in layers):
        return model  # already wrapped
    if len(scales) != len(layers):
        raise EvomergeError(f"{scales_file}: {len(scales)} scales for {len(layers)} layers")
    inner.layers = nn.ModuleList(PathLayer(layer, p, s) for p, (layer, s) in enumerate(zip(layers, scales)))
    return model


def load_dataflow_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load an exported DFS checkpoint: a standard transformers model, its layers wrapped with their input
    scales when ``evomerge_dataflow.json`` is present (a checkpoint with all scales 1 needs none of this)."""
    auto: Any = AutoModelForCausalLM  # transformers' stubs mistype from_pretrained's first argument
    model = auto.from_pretrained(Path(path), dtype=dtype or "auto", use_safetensors=True)
    return apply_dataflow_scales(model.to(device), path).eval()
