"""LoRA references (``model: path/base+path/adapter``): a source whose tensors are the base's with the adapter
applied, as mergekit 0.1.5 does when it loads such a reference (it merges the adapter with peft's
``merge_and_unload`` and reads the result).

A reference is split the way mergekit splits it: on ``+``, into exactly a model path and an adapter path.
The adapter is a peft LoRA folder: ``adapter_config.json`` and ``adapter_model.safetensors`` (``adapter_model.bin``
only with ``allow_pickle``, then read with ``torch.load(weights_only=True)``).

For every adapted module ``M`` (weight ``W``, shape ``[out, in]``), with ``A = M.lora_A`` (``[r, in]``),
``B = M.lora_B`` (``[out, r]``) and ``s = alpha / r`` (``alpha / sqrt(r)`` with ``use_rslora``; ``r`` and
``alpha`` per module from ``rank_pattern`` / ``alpha_pattern`` when they name it), the source's tensor is
``W + (B @ A) s`` (transposed with ``fan_in_fan_out``); for an embedding (``lora_embedding_A`` ``[r, vocab]``,
``lora_embedding_B`` ``[dim, r]``) it is ``W + (B @ A)^T s`` (Hu et al. 2021, "LoRA"; peft's merge).
The update is computed in float32 and added in float32, then stored in the base tensor's dtype, as peft does on
CPU. Tensors the adapter saves whole (``modules_to_save``, trained biases) replace the base's.
What peft can hold but this does not apply (DoRA, LoRA biases, other adapter kinds, convolution LoRA) is refused
with one line rather than silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from evomerge.checkpoint import Checkpoint, find_tokenizer_files, parse_dtype, read_safetensors_header
from evomerge.errors import EvomergeError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SAFETENSORS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$|"
                       r"^(?P<emodule>.+)\.(?P<ekind>lora_embedding_A|lora_embedding_B)$")


def split_reference(model: str) -> tuple[str, str | None]:
    """``"base+adapter"`` -> ("base", "adapter"); a plain path -> (path, None). Raises on more than one ``+``."""
    parts = model.split("+")
    if len(parts) == 1:
        return model, None
    if len(parts) != 2 or not all(parts):
        raise EvomergeError(f"model reference {model!r} must be PATH or PATH+ADAPTER_PATH (one '+')")
    return parts[0], parts[1]


def model_folder(path: Path) -> Path:
    """The base model folder of a resolved source key (the key itself when it is no LoRA reference)."""
    if (path / "config.json").is_file():
        return path
    return Path(split_reference(str(path))[0])


def open_source(path: Path, allow_pickle: bool = False) -> Checkpoint:
    """A Checkpoint for a resolved source key: plain folder, or ``base+adapter`` with the adapter applied."""
    if "+" in str(path) and not path.exists():
        base, adapter = split_reference(str(path))
        assert adapter is not None, f"{path}: a reference with '+' splits into a model and an adapter"
        return LoraCheckpoint(Path(base), Path(adapter), allow_pickle=allow_pickle)
    return Checkpoint(path, allow_pickle=allow_pickle)


@dataclass
class _Update:
    """One adapted tensor: its low-rank factors (float32) and scale."""

    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    embedding: bool = False
    scale: float = 1.0


@dataclass
class Adapter:
    """A peft LoRA adapter read from its folder: per base tensor name, a low-rank update or a replacement."""

    path: Path
    updates: dict[str, _Update] = field(default_factory=dict)
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    fan_in_fan_out: bool = False

    @classmethod
    def load(cls, path: Path, allow_pickle: bool = False) -> Adapter:
        """Read ``adapter_config.json`` and the adapter weights of folder ``path``.

        Returns: the Adapter (factors in float32, scales from r / lora_alpha and their patterns).
        Raises: EvomergeError for a missing or unreadable folder, pickle weights without ``allow_pickle``,
        unsupported adapter kinds (DoRA, LoRA biases, non-LoRA, non-2-D factors) or inconsistent factors."""
        config = _read_adapter_config(path)
        state = _read_adapter_weights(path, allow_pickle)
        adapter = cls(path)
        for key, tensor in state.items():
            if not key.startswith(_PREFIX):
                raise EvomergeError(f"adapter {path}: tensor {key!r} does not start with {_PREFIX!r}")
            key = key[len(_PREFIX):]
            match = _LORA_KEY.match(key)
            if match is None:
                if ".lora_" in key or "lora_magnitude" in key:
                    raise EvomergeError(f"adapter {path}: tensor {key!r} is a LoRA part evomerge does not apply "
                                        f"(only lora_A/lora_B and lora_embedding_A/B)")
                adapter.replacements[key.replace(".base_layer.", ".")] = tensor  # peft's saved embedding layers
                continue
            module = match["module"] or match["emodule"]
            kind = match["kind"] or match["ekind"]
            update = adapter.updates.setdefault(f"{module}.weight", _Update(embedding=kind.startswith("lora_emb")))
            if tensor.ndim != 2:
                raise EvomergeError(f"adapter {path}: {key} has shape {list(tensor.shape)}; only linear and "
                                    f"embedding LoRA are supported")
            if kind.endswith("A"):
                update.a = tensor.float()
            else:
                update.b = tensor.float()
        for name, update in adapter.updates.items():
            if update.a is None or update.b is None:
                raise EvomergeError(f"adapter {path}: {name} has only one of its two LoRA factors")
            module = name.removesuffix(".weight")
            rank = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
            alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
            update.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            if update.a.shape[0] != update.b.shape[1]:
                raise EvomergeError(f"adapter {path}: {name}: lora_A {list(update.a.shape)} and lora_B "
                                    f"{list(update.b.shape)} do not share a rank")
        adapter.fan_in_fan_out = bool(config.get("fan_in_fan_out"))
        return adapter

    def delta(self, name: str) -> torch.Tensor:
        """The float32 update of base tensor ``name`` (its shape)."""
        update = self.updates[name]
        assert update.a is not None and update.b is not None, f"{name}: Adapter.load checks both LoRA factors"
        product = update.b @ update.a
        if update.embedding or self.fan_in_fan_out:
            product = product.T
        return product * update.scale


def _read_adapter_config(path: Path) -> dict[str, Any]:
    file = path / ADAPTER_CONFIG
    if not path.is_dir():
        raise EvomergeError(f"LoRA adapter folder not found: {path}")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError:
        raise EvomergeError(f"no {ADAPTER_CONFIG} in LoRA adapter folder {path}") from None
    except ValueError as exc:
        raise EvomergeError(f"cannot read {file}: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise EvomergeError(f"cannot read {file}: not a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise EvomergeError(f"{file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "LoRA biases")):
        if config.get(flag):
            raise EvomergeError(f"{file}: {what} ({flag}: true) is not supported")
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise EvomergeError(f"{file}: {key} must be a positive number, got {value!r}")
    return config


def _read_adapter_weights(path: Path, allow_pickle: bool) -> dict[str, torch.Tensor]:
    if (path / ADAPTER_SAFETENSORS).is_file():
        read_safetensors_header(path / ADAPTER_SAFETENSORS)  # truncated / corrupted files: one line
        return load_file(str(path / ADAPTER_SAFETENSORS))
    if (path / ADAPTER_PICKLE).is_file():
        if not allow_pickle:
            raise EvomergeError(f"LoRA adapter {path} has only pickle weights ({ADAPTER_PICKLE}); convert it to "
                                f"safetensors or pass --allow-pickle to load it (weights_only, no code is run)")
        try:
            state = torch.load(path / ADAPTER_PICKLE, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to unpickle is a bad file, reported in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise EvomergeError(f"cannot load pickle weights {path / ADAPTER_PICKLE}: {first}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise EvomergeError(f"pickle weights {path / ADAPTER_PICKLE} do not hold a dict of tensors")
        return dict(state)
    raise EvomergeError(f"no adapter weights in {path} (expected {ADAPTER_SAFETENSORS})")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> float:
    """peft's rank_pattern / alpha_pattern: the first key that matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(default)


class LoraCheckpoint(Checkpoint):
    """The base checkpoint with a LoRA adapter applied tensor by tensor (see the module docstring)."""

    def __init__(self, base: Path, adapter: Path, allow_pickle: bool = False):
        super().__init__(base, allow_pickle=allow_pickle)
        self.adapter = Adapter.load(adapter, allow_pickle=allow_pickle)
        self.path = Path(f"{base}+{adapter}")
        self.base_path = base
        for name in {**self.adapter.updates, **self.adapter.replacements}:
            if name not in self._info:
                raise EvomergeError(f"adapter {adapter} changes {name!r}, which {base} does not have")
            shape = tuple(self._info[name][0])
            shapes = [tuple(self.adapter.replacements[name].shape)] if name in self.adapter.replacements else []
            shapes += [tuple(self.adapter.delta(name).shape)] if name in self.adapter.updates else []
            if any(new_shape != shape for new_shape in shapes):
                raise EvomergeError(f"adapter {adapter} does not fit {base}: {name} is {list(shape)}, the "
                                    f"adapter's is {list(shapes[0])}")

    def tokenizer_files(self) -> list[Path]:
        return find_tokenizer_files(self.base_path)

    def get(self, name: str, device: str | torch.device = "cpu",
            dtype: str | torch.dtype | None = None, *, copy: bool = True) -> torch.Tensor:
        """The base tensor with the adapter's update applied (float32 math, stored in the base's dtype)."""
        replaced, updated = name in self.adapter.replacements, name in self.adapter.updates
        if not (replaced or updated):
            return super().get(name, device=device, dtype=dtype, copy=copy)
        tensor = self.adapter.replacements[name].to(self.dtype(name)) if replaced else super().get(name)
        if updated:
            tensor = (tensor.float() + self.adapter.delta(name)).to(tensor.dtype)
        dtype = parse_dtype(dtype)
        return tensor.to(device=device, dtype=dtype) if dtype is not None else tensor.to(device=device)
