"""The recipe: mergekit 0.1.5's YAML, parsed, validated strictly, and written back.

A recipe names a ``merge_method``, its sources (``models:`` with per-model ``parameters``, or ``slices:`` of
``sources`` with ``layer_range`` for passthrough/frankenmerges), an optional ``base_model``, global
``parameters``, ``dtype`` (the compute dtype), ``out_dtype``, ``tokenizer_source`` or a ``tokenizer:`` block and
``chat_template`` (evomerge/tokenizer_config.py), and, for the data-aware methods (fisher, regmean), a
``calibration`` block. A model may be a LoRA reference ``base+adapter`` (evomerge/lora.py).

Where mergekit silently ignores what it does not know, we refuse: unknown keys, unknown parameter names, and
parameters the method does not take (including a global parameter given per model, or per-model parameters on
the base model of a method that ignores them) are ``EvomergeError``s naming the problem.

Parameter values (``resolve_setting``) follow mergekit exactly:

- a scalar (a number written as a string, e.g. ``1e-5``, which YAML 1.1 reads as a string, is that number);
- a list of numbers, a *gradient*: interpolated linearly across the layers of a slice, at
  ``t = layer / (num_layers - 1)``; tensors outside the layers (embeddings, final norm, head) use t = 0;
  lists of booleans or strings pick ``values[int(t * (len - 1))]``;
- a list of ``{filter: substring, value: ...}``: the first entry whose filter occurs in the tensor name wins
  (an entry without filter, or filter ``"*"``, matches everything); when none matches, the next scope
  (slice, then global parameters, then the default) decides.

Relative model paths resolve against the folder of the recipe file (``Recipe.root``); ``to_yaml`` writes them
back exactly as given, so a recipe round-trips.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.alignment.method_params import CALIBRATION_DEFAULTS, DATA_AWARE_METHODS
from evomerge.errors import EvomergeError
from evomerge.lora import model_folder, split_reference
from evomerge.method_registry import get_method, is_data_aware
from evomerge.methods import REQUIRED, MethodSpec, ParamSpec
from evomerge.tokenizer_config import TokenizerSettings, check_chat_template, parse_tokenizer_block

_TOP_KEYS = ("merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "calibration")
_UNSUPPORTED_TOP_KEYS = {"modules": "per-module recipes"}
_DTYPES = ("float32", "float16", "bfloat16", "float64")


@dataclass
class ModelEntry:
    """One entry of ``models:``: a model path (as written) and its per-model parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSource:
    """One source of a slice: layers [start, end) of a model, and per-model parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Slice:
    """One output slice: its sources (all the same number of layers), slice-level parameters, and the slice's own
    ``base_model`` (mergekit's per-slice base, which overrides the recipe's for this slice; None: the recipe's)."""

    sources: list[SliceSource]
    parameters: dict[str, Any] = field(default_factory=dict)
    base_model: str | None = None


@dataclass
class Recipe:
    """A parsed, validated recipe. Build with ``load``, ``from_yaml`` or ``from_dict``; ``validate`` after edits.

    Fields mirror mergekit 0.1.5's YAML: ``merge_method``; ``models`` (entries with per-model ``parameters``)
    or ``slices`` (sources with ``layer_range``, layers ``[start, end)``); ``base_model``; global
    ``parameters`` (each value a scalar, a gradient list or a filter list, see ``resolve_setting``); ``dtype``
    (compute dtype) and ``out_dtype`` (written dtype), each one of float32 / float16 / bfloat16 / float64;
    ``tokenizer_source`` (``base`` or a model path); ``calibration`` (fisher / regmean only). Model paths are
    kept as written; ``root`` is the folder they resolve against.
    """

    merge_method: str
    models: list[ModelEntry] = field(default_factory=list)
    slices: list[Slice] = field(default_factory=list)
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None  # the 'tokenizer:' block (evomerge/tokenizer_config.py)
    chat_template: str | None = None
    calibration: dict[str, Any] | None = None
    root: Path | None = None  # folder that relative model paths resolve against (not written to YAML)

    # ------------------------------------------------------------------ reading and writing

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read and validate a recipe YAML file; relative model paths resolve against its folder.

        Raises:
            EvomergeError: the file cannot be read, is not valid YAML, or the recipe is invalid (see
                ``from_dict`` and ``validate``).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise EvomergeError(f"cannot read recipe {path}: {exc.strerror or exc}") from None
        return cls.from_yaml(text, root=path.resolve().parent, source=str(path))

    @classmethod
    def from_yaml(cls, text: str, root: str | Path | None = None, source: str = "recipe") -> Recipe:
        """Parse (safe YAML loading) and validate a recipe's text.

        Args:
            text: the YAML document.
            root: the folder relative model paths resolve against (default: the current folder at use).
            source: how error messages name the recipe (e.g. its file name).

        Raises:
            EvomergeError: invalid YAML, or an invalid recipe (see ``from_dict``).
        """
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).strip().splitlines()
            raise EvomergeError(f"{source} is not valid YAML: {' '.join(first[:2])}") from None
        return cls.from_dict(data, root=root, source=source)

    @classmethod
    def from_dict(cls, data: Any, root: str | Path | None = None, source: str = "recipe") -> Recipe:
        """Build and validate a recipe from its mergekit mapping (what ``yaml.safe_load`` returns).

        Args:
            data: the mapping; parameter values are deep-copied.
            root: the folder relative model paths resolve against.
            source: how error messages name the recipe.

        Returns:
            The validated recipe.

        Raises:
            EvomergeError: one line naming the first problem: not a mapping, an unknown or unsupported key, a
                wrong type, an unknown merge method (the message lists every method), or anything ``validate``
                rejects.
        """
        if not isinstance(data, Mapping):
            raise EvomergeError(f"{source} must be a mapping with at least 'merge_method'")
        data = dict(data)
        for key in data:
            if key in _UNSUPPORTED_TOP_KEYS:
                raise EvomergeError(f"{source}: {_UNSUPPORTED_TOP_KEYS[key]} ('{key}:') is not supported")
            if key not in _TOP_KEYS:
                raise EvomergeError(f"{source}: unknown key {key!r}; known keys: {', '.join(_TOP_KEYS)}")
        if "merge_method" not in data:
            raise EvomergeError(f"{source}: missing 'merge_method'")
        method = data["merge_method"]
        if not isinstance(method, str):
            raise EvomergeError(f"{source}: merge_method must be a string")
        models = [_parse_model_entry(m, i, source) for i, m in enumerate(_list(data.get("models"), "models", source))]
        slices = [_parse_slice(s, i, source) for i, s in enumerate(_list(data.get("slices"), "slices", source))]
        recipe = cls(
            merge_method=method,
            models=models,
            slices=slices,
            base_model=_optional_str(data.get("base_model"), "base_model", source),
            parameters=_parameters(data.get("parameters"), "parameters", source),
            dtype=_optional_str(data.get("dtype"), "dtype", source),
            out_dtype=_optional_str(data.get("out_dtype"), "out_dtype", source),
            tokenizer_source=_optional_str(data.get("tokenizer_source"), "tokenizer_source", source),
            tokenizer=(parse_tokenizer_block(data["tokenizer"], source) if data.get("tokenizer") is not None
                       else None),
            chat_template=check_chat_template(data.get("chat_template"), source),
            calibration=_optional_mapping(data.get("calibration"), "calibration", source),
            root=Path(root) if root is not None else None,
        )
        recipe.validate(source)
        return recipe

    def to_dict(self) -> dict[str, Any]:
        """The mergekit YAML structure (paths as written, empty fields left out)."""
        out: dict[str, Any] = {"merge_method": self.merge_method}
        if self.base_model is not None:
            out["base_model"] = self.base_model
        if self.models:
            out["models"] = [_entry_dict(m.model, m.parameters) for m in self.models]
        if self.slices:
            out["slices"] = []
            for s in self.slices:
                item: dict[str, Any] = {"sources": [
                    {**{"model": src.model, "layer_range": list(src.layer_range)},
                     **({"parameters": copy.deepcopy(src.parameters)} if src.parameters else {})}
                    for src in s.sources]}
                if s.parameters:
                    item["parameters"] = copy.deepcopy(s.parameters)
                if s.base_model is not None:
                    item["base_model"] = s.base_model
                out["slices"].append(item)
        if self.parameters:
            out["parameters"] = copy.deepcopy(self.parameters)
        for key in ("dtype", "out_dtype", "tokenizer_source"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.tokenizer is not None:
            out["tokenizer"] = copy.deepcopy(self.tokenizer.raw or {"source": self.tokenizer.source})
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        if self.calibration is not None:
            out["calibration"] = copy.deepcopy(self.calibration)
        return out

    def to_yaml(self) -> str:
        """The recipe as mergekit YAML text (``to_dict``; number lists inline); ``from_yaml`` reads it back."""
        return yaml.dump(self.to_dict(), Dumper=_FlowListDumper, sort_keys=False, default_flow_style=False)

    def save(self, path: str | Path) -> Path:
        """Write ``to_yaml()`` to ``path`` (UTF-8); returns it as a ``Path``. Raises ``OSError`` if unwritable."""
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    # ------------------------------------------------------------------ paths and methods

    def resolve_path(self, model: str) -> Path:
        """A model path from the recipe, absolute: relative paths resolve against ``root`` (else the cwd).

        A LoRA reference ``base+adapter`` resolves both parts: the result ``/abs/base+/abs/adapter`` is the
        source's key (see evomerge/lora.py)."""
        model_part, adapter = split_reference(model)
        path = self._resolve_one(model_part)
        return path if adapter is None else Path(f"{path}+{self._resolve_one(adapter)}")

    def _resolve_one(self, model: str) -> Path:
        path = Path(model).expanduser()
        if not path.is_absolute():
            path = (self.root or Path.cwd()) / path
        return path.resolve()

    @property
    def is_data_aware(self) -> bool:
        """Whether the method is a data-aware one (fisher, regmean): whole models plus calibration data."""
        return is_data_aware(self.merge_method)

    @property
    def method(self) -> MethodSpec:
        """The per-tensor method's spec (``EvomergeError`` for a data-aware or unknown method)."""
        return get_method(self.merge_method)

    def model_paths(self) -> list[Path]:
        """Every referenced model, resolved, in first-mention order (models/slices, then base)."""
        seen: dict[Path, None] = {}
        for m in self.models:
            seen.setdefault(self.resolve_path(m.model), None)
        for s in self.slices:
            for src in s.sources:
                seen.setdefault(self.resolve_path(src.model), None)
            if s.base_model is not None:
                seen.setdefault(self.resolve_path(s.base_model), None)
        if self.base_model is not None:
            seen.setdefault(self.resolve_path(self.base_model), None)
        return list(seen)

    def tokenizer_settings(self) -> TokenizerSettings | None:
        """The tokenizer the recipe asks for (the 'tokenizer:' block, or tokenizer_source alone), else None."""
        if self.tokenizer is not None:
            return self.tokenizer
        if self.tokenizer_source is not None:
            return TokenizerSettings(source=self.tokenizer_source)
        return None

    def tokenizer_path(self) -> Path:
        """The folder whose tokenizer the output starts from: the tokenizer source's model, else base_model, else
        the first model (for a LoRA reference, its base model's folder, as mergekit). With ``union`` it is the
        union's starting point (base, else first model); see evomerge/vocabulary.py."""
        settings = self.tokenizer_settings()
        source = settings.source if settings is not None else None
        if source is not None and source not in ("base", "union"):
            return model_folder(self.resolve_path(source))
        if self.base_model is not None:
            return model_folder(self.resolve_path(self.base_model))
        return model_folder(self.model_paths()[0])

    # ------------------------------------------------------------------ validation

    def validate(self, source: str = "recipe") -> None:
        """Check structure, method and parameters (call after editing a recipe).

        Args:
            source: how error messages name the recipe.

        Raises:
            EvomergeError: one line naming the first problem: both or neither of models/slices, an unknown dtype,
                an unknown method (every known method listed), a missing or superfluous base_model, a parameter
                the method does not take, a value of the wrong type or out of range (e.g. density outside
                [0, 1]), too few or too many models, or a data-aware recipe with unknown keys.
        """
        if bool(self.models) == bool(self.slices):
            raise EvomergeError(f"{source}: give exactly one of 'models' or 'slices'")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value.removeprefix("torch.") not in _DTYPES:
                raise EvomergeError(f"{source}: {key} {value!r} is not one of {', '.join(_DTYPES)}")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise EvomergeError(f"{source}: give tokenizer_source or a 'tokenizer:' block, not both")
        if is_data_aware(self.merge_method) and (self.tokenizer is not None or self.chat_template is not None
                                                 or self.tokenizer_source == "union"):
            raise EvomergeError(f"{source}: {self.merge_method} does not take tokenizer: blocks, union "
                                f"tokenizers or chat_template")
        if is_data_aware(self.merge_method):
            self._validate_data_aware(DATA_AWARE_METHODS[self.merge_method], CALIBRATION_DEFAULTS, source)
            return
        spec = get_method(self.merge_method)
        if self.calibration is not None:
            raise EvomergeError(f"{source}: 'calibration' is only for data-aware methods "
                                f"({', '.join(sorted(DATA_AWARE_METHODS))}), not {spec.name}")
        base = self.resolve_path(self.base_model) if self.base_model is not None else None
        if spec.needs_base and base is None and not (self.slices and all(s.base_model for s in self.slices)):
            raise EvomergeError(f"{source}: merge method {spec.name} needs a base_model")
        if not spec.uses_base and base is not None:
            listed = {self.resolve_path(m.model) for m in self.models}
            listed |= {self.resolve_path(src.model) for s in self.slices for src in s.sources}
            if base not in listed:
                raise EvomergeError(f"{source}: merge method {spec.name} does not use a base_model "
                                    f"(remove base_model, or list it among the models)")
        self._check_params(self.parameters, spec, "parameters", allow_per_model=True, source=source)
        for i, m in enumerate(self.models):
            self._check_entry_params(m.parameters, spec, f"models[{i}] ({m.model})",
                                     is_base=base is not None and self.resolve_path(m.model) == base, source=source)
        for i, s in enumerate(self.slices):
            self._check_params(s.parameters, spec, f"slices[{i}].parameters", allow_per_model=True, source=source)
            if not s.sources:
                raise EvomergeError(f"{source}: slices[{i}] has no sources")
            lengths = {src.layer_range[1] - src.layer_range[0] for src in s.sources}
            if len(lengths) != 1:
                raise EvomergeError(f"{source}: slices[{i}]: all sources must span the same number of layers")
            slice_base = self.slice_base(i)
            for j, src in enumerate(s.sources):
                self._check_entry_params(src.parameters, spec, f"slices[{i}].sources[{j}] ({src.model})",
                                         is_base=slice_base is not None and self.resolve_path(src.model) == slice_base,
                                         source=source)
        # an empty slice is valid (mergekit takes it); a model without layers is not
        total = sum(s.sources[0].layer_range[1] - s.sources[0].layer_range[0] for s in self.slices)
        if self.slices and total < 1:
            raise EvomergeError(f"{source}: the slices hold zero layers in total")
        self._check_inputs(spec, base, source)

    def _check_inputs(self, spec: MethodSpec, base: Path | None, source: str) -> None:
        groups: list[tuple[str, list[Path]]] = []
        if self.models:
            paths = [self.resolve_path(m.model) for m in self.models]
            if spec.uses_base and base is not None and base not in paths:
                paths.append(base)
            groups.append(("models", paths))
        bases: list[Path | None] = [base] if self.models else []
        for i, s in enumerate(self.slices):
            paths = [self.resolve_path(src.model) for src in s.sources]
            slice_base = self.slice_base(i)
            if (spec.uses_base or s.base_model is not None) and slice_base is not None and slice_base not in paths:
                raise EvomergeError(f"{source}: slices[{i}] must include its base_model among its sources "
                                    f"for {spec.name}")
            groups.append((f"slices[{i}]", paths))
            bases.append(slice_base)
        for (where, paths), base in zip(groups, bases):
            if len(set(paths)) != len(paths):
                raise EvomergeError(f"{source}: {where} lists the same model twice")
            count = len(paths)
            non_base = count - int(spec.uses_base and base in paths)
            if non_base < spec.min_non_base or (spec.max_non_base is not None and non_base > spec.max_non_base):
                what = (f"exactly {spec.min_non_base}" if spec.max_non_base == spec.min_non_base
                        else f"at least {spec.min_non_base}")
                raise EvomergeError(f"{source}: {spec.name} takes {what} models besides the base in {where}; "
                                    f"got {non_base}")
            if count < spec.min_inputs:
                raise EvomergeError(f"{source}: {spec.name} needs at least {spec.min_inputs} models "
                                    f"(base included) in {where}; got {count}")
            if spec.max_inputs is not None and count > spec.max_inputs:
                exact = spec.max_inputs == spec.min_inputs
                what = f"exactly {spec.max_inputs}" if exact else f"at most {spec.max_inputs}"
                raise EvomergeError(f"{source}: {spec.name} takes {what} models (base included) in {where}; "
                                    f"got {count}")

    def slice_base(self, index: int) -> Path | None:
        """The resolved base model of slice ``index``: its own ``base_model``, else the recipe's (None: neither)."""
        own = self.slices[index].base_model
        chosen = own if own is not None else self.base_model
        return self.resolve_path(chosen) if chosen is not None else None

    def _check_entry_params(self, params: dict[str, Any], spec: MethodSpec, where: str, is_base: bool,
                            source: str) -> None:
        if is_base and params and spec.per_model_scope == "non_base":
            raise EvomergeError(f"{source}: {where}: {spec.name} ignores parameters on the base model "
                                f"(got {', '.join(params)})")
        for name in params:
            p = spec.param(name)
            if p is None:
                raise EvomergeError(_unknown_param(name, spec, where, source))
            if not p.per_model:
                raise EvomergeError(f"{source}: {where}: {name!r} is a global parameter of {spec.name}; "
                                    f"put it under the top-level 'parameters'")
            _check_setting(params[name], p, f"{where}.{name}", source)

    def _check_params(self, params: dict[str, Any], spec: MethodSpec, where: str, allow_per_model: bool,
                      source: str) -> None:
        for name, setting in params.items():
            p = spec.param(name)
            if p is None:
                raise EvomergeError(_unknown_param(name, spec, where, source))
            _check_setting(setting, p, f"{where}.{name}", source)

    def _validate_data_aware(self, table: dict[str, dict[str, Any]], calibration_defaults: dict[str, Any],
                             source: str) -> None:
        if any("+" in str(p) and not p.exists() for p in self.model_paths()):
            raise EvomergeError(f"{source}: {self.merge_method} does not take LoRA references (model+adapter)")
        known_global = table.get("global", {})
        known_per_model = table.get("per_model", {})
        if self.slices:
            raise EvomergeError(f"{source}: {self.merge_method} takes 'models', not 'slices'")
        for name in self.parameters:
            if name not in known_global:
                raise EvomergeError(f"{source}: parameters: unknown parameter {name!r} for {self.merge_method}; "
                                    f"known: {', '.join(sorted(known_global)) or 'none'}")
        for i, m in enumerate(self.models):
            for name in m.parameters:
                if name not in known_per_model:
                    raise EvomergeError(f"{source}: models[{i}]: unknown parameter {name!r} for "
                                        f"{self.merge_method}; known: {', '.join(sorted(known_per_model)) or 'none'}")
        for key in self.calibration or {}:
            if key not in calibration_defaults:
                raise EvomergeError(f"{source}: calibration: unknown key {key!r}; known: "
                                    f"{', '.join(sorted(calibration_defaults))}")


# ---------------------------------------------------------------------- parameter settings


def resolve_setting(setting: Any, tensor_name: str, t: float, kind: type = float) -> Any:
    """A parameter setting's value for one tensor at gradient position t (None when no filter matches).

    Args:
        setting: a scalar, a gradient list, a ``{filter, value}`` mapping or a list of them (mergekit's forms).
        tensor_name: the tensor the value is for (filters match substrings of it).
        t: the tensor's gradient position in [0, 1] (layer ``i`` of ``L``: ``i / (L - 1)``; 0 outside layers).
        kind: the parameter's type (float values are interpolated linearly; other lists pick an element).

    Returns:
        The value (a float for float parameters), or None when no filter matches.

    Raises:
        EvomergeError: a setting of none of these forms.
    """
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return _coerce(setting, kind)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(_is_scalar(v) for v in setting):
            values = [_coerce(v, kind) for v in setting]
            if kind not in (float, int):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            value = (1 - frac) * values[i0] + frac * values[i1]
            return _coerce(value, int) if kind is int else value
        for cond in setting:
            filt = cond.get("filter")
            if filt is None or filt == "*" or (tensor_name and filt in tensor_name):
                return resolve_setting(cond["value"], tensor_name, t, kind)
        return None
    raise EvomergeError(f"unexpected parameter value {setting!r}")


def setting_values(setting: Any) -> list[Any]:
    """Every scalar a setting can produce (gradient points, filter values), for range checks."""
    if isinstance(setting, Mapping):
        return setting_values(setting.get("value"))
    if isinstance(setting, list):
        out: list[Any] = []
        for item in setting:
            out.extend(setting_values(item))
        return out
    return [setting]


def check_value(name: str, value: Any, where: str = "") -> None:
    """Range checks that apply to a resolved value (also used per tensor by the planner).

    Raises:
        EvomergeError: density outside [0, 1], gamma or epsilon outside [0, 1), or a non-finite float.
    """
    prefix = f"{where}: " if where else ""
    if name == "density" and not (0 <= value <= 1):  # 0 drops the whole task vector, as in mergekit
        raise EvomergeError(f"{prefix}density must be in [0, 1], got {value}")
    if name == "gamma" and not (0 <= value < 1):
        raise EvomergeError(f"{prefix}gamma must be in [0, 1), got {value}")
    if name == "epsilon" and not (0 <= value < 1):
        raise EvomergeError(f"{prefix}epsilon must be in [0, 1), got {value}")
    if name == "select_topk" and not (0 <= value <= 1):
        raise EvomergeError(f"{prefix}select_topk must be in [0, 1], got {value}")
    if name in ("tol", "max_iter") and value < 0:
        raise EvomergeError(f"{prefix}{name} must not be negative, got {value}")
    if isinstance(value, float) and not math.isfinite(value):
        raise EvomergeError(f"{prefix}{name} must be finite, got {value}")


def _check_setting(setting: Any, param: ParamSpec, where: str, source: str) -> None:
    _check_shape(setting, where, source)
    for value in setting_values(setting):
        if param.kind in (float, int) and isinstance(value, str):
            value = _numeric_string(value)  # YAML reads 1e-5 as a string; mergekit parses it as a number
        if param.kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                if param.default is None and value is None:
                    continue
                raise EvomergeError(f"{source}: {where} must be a number, got {value!r}")
            check_value(param.name, float(value), f"{source}: {where}")
        elif param.kind is int:
            if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                    or float(value) != int(value)):
                raise EvomergeError(f"{source}: {where} must be a whole number, got {value!r}")
            check_value(param.name, int(value), f"{source}: {where}")
        elif param.kind is bool:
            if not isinstance(value, bool):
                raise EvomergeError(f"{source}: {where} must be true or false, got {value!r}")
        elif param.kind is str:
            if not isinstance(value, str) or (param.choices and value not in param.choices):
                choices = f" ({' or '.join(param.choices)})" if param.choices else ""
                raise EvomergeError(f"{source}: {where} must be a string{choices}, got {value!r}")


def _check_shape(setting: Any, where: str, source: str) -> None:
    if _is_scalar(setting) or setting is None:
        return
    if isinstance(setting, Mapping):
        setting = [setting]
    if not isinstance(setting, list):
        raise EvomergeError(f"{source}: {where}: a value must be a scalar, a list (gradient) or a list of "
                            f"{{filter, value}}")
    if all(_is_scalar(v) for v in setting):
        return
    for cond in setting:
        if not isinstance(cond, Mapping):
            raise EvomergeError(f"{source}: {where}: mix of scalars and filters; use a list of {{filter, value}}")
        extra = set(cond) - {"filter", "value"}
        if extra or "value" not in cond:
            raise EvomergeError(f"{source}: {where}: each filter entry needs 'value' and optional 'filter' "
                                f"(got keys {sorted(cond)})")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise EvomergeError(f"{source}: {where}: filter must be a string")
        _check_shape(cond["value"], where, source)


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str))


def _numeric_string(value: str) -> Any:
    """A number written as a string (``1e-5``, which YAML 1.1 reads as a string), else the string unchanged."""
    try:
        return float(value)
    except ValueError:
        return value


def _coerce(value: Any, kind: type) -> Any:
    if kind in (float, int) and isinstance(value, str):
        value = _numeric_string(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or float(value) != int(value):
            raise EvomergeError(f"expected a whole number, got {value}")
        return int(value)
    return value


def _unknown_param(name: str, spec: MethodSpec, where: str, source: str) -> str:
    known = ", ".join(p.name for p in spec.params) or "none"
    return f"{source}: {where}: {spec.name} does not take parameter {name!r} (it takes: {known})"


# ---------------------------------------------------------------------- structure helpers


def _list(value: Any, what: str, source: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise EvomergeError(f"{source}: '{what}' must be a list")
    return value


def _optional_str(value: Any, what: str, source: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, Mapping):
        raise EvomergeError(f"{source}: {what} must be a path string (mergekit's mapping form is not supported)")
    if not isinstance(value, str):
        raise EvomergeError(f"{source}: {what} must be a string, got {value!r}")
    return value


def _path_str(value: Any, what: str, source: str) -> str:
    text = _optional_str(value, what, source)
    if text is None:
        raise EvomergeError(f"{source}: {what} must be a path string, got nothing")
    return text


def _optional_mapping(value: Any, what: str, source: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise EvomergeError(f"{source}: '{what}' must be a mapping")
    return dict(value)


def _parameters(value: Any, what: str, source: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise EvomergeError(f"{source}: '{what}' must be a mapping of parameter names to values")
    return copy.deepcopy(dict(value))


def _parse_model_entry(item: Any, index: int, source: str) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(model=item)
    if not isinstance(item, Mapping):
        raise EvomergeError(f"{source}: models[{index}] must be a mapping with 'model'")
    extra = set(item) - {"model", "parameters"}
    if extra:
        raise EvomergeError(f"{source}: models[{index}]: unknown key {sorted(extra)[0]!r} (known: model, parameters)")
    if "model" not in item:
        raise EvomergeError(f"{source}: models[{index}] has no 'model'")
    model = _path_str(item["model"], f"models[{index}].model", source)
    return ModelEntry(model=model, parameters=_parameters(item.get("parameters"), f"models[{index}].parameters",
                                                          source))


def _parse_slice(item: Any, index: int, source: str) -> Slice:
    if not isinstance(item, Mapping):
        raise EvomergeError(f"{source}: slices[{index}] must be a mapping with 'sources'")
    for key in item:
        if key == "residual_weight":
            raise EvomergeError(f"{source}: slices[{index}]: per-slice {key!r} is not supported")
        if key not in ("sources", "parameters", "base_model"):
            raise EvomergeError(f"{source}: slices[{index}]: unknown key {key!r} (known: sources, parameters, "
                                f"base_model)")
    sources = []
    for j, src in enumerate(_list(item.get("sources"), f"slices[{index}].sources", source)):
        where = f"slices[{index}].sources[{j}]"
        if not isinstance(src, Mapping):
            raise EvomergeError(f"{source}: {where} must be a mapping with 'model' and 'layer_range'")
        extra = set(src) - {"model", "layer_range", "parameters"}
        if extra:
            raise EvomergeError(f"{source}: {where}: unknown key {sorted(extra)[0]!r} "
                                f"(known: model, layer_range, parameters)")
        if "model" not in src or "layer_range" not in src:
            raise EvomergeError(f"{source}: {where} needs 'model' and 'layer_range'")
        lr = src["layer_range"]
        if (not isinstance(lr, (list, tuple)) or len(lr) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                         for x in lr) or not 0 <= lr[0] <= lr[1]):
            raise EvomergeError(f"{source}: {where}.layer_range must be [start, end) with 0 <= start <= end")
        sources.append(SliceSource(model=_path_str(src["model"], f"{where}.model", source),
                                   layer_range=(int(lr[0]), int(lr[1])),
                                   parameters=_parameters(src.get("parameters"), f"{where}.parameters", source)))
    return Slice(sources=sources, parameters=_parameters(item.get("parameters"), f"slices[{index}].parameters",
                                                         source),
                 base_model=_optional_str(item.get("base_model"), f"slices[{index}].base_model", source))


def _entry_dict(model: str, parameters: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model}
    if parameters:
        out["parameters"] = copy.deepcopy(parameters)
    return out


class _FlowListDumper(yaml.SafeDumper):
    """Writes lists of numbers inline (``[0.2, 0.8]``), like mergekit, and everything else block style."""


def _represent_list(dumper: yaml.SafeDumper, data: Sequence[Any]) -> yaml.SequenceNode:
    flow = bool(data) and all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


_FlowListDumper.add_representer(list, _represent_list)
_FlowListDumper.add_representer(tuple, _represent_list)

__all__ = ["ModelEntry", "Recipe", "REQUIRED", "Slice", "SliceSource", "check_value", "resolve_setting",
           "setting_values"]
