"""Search spaces: the genes, their bounds and transforms, and the genome -> candidate mapping.

Every optimizer searches the unit cube [0, 1]^n: gene ``g`` maps a unit coordinate ``u`` to its declared
range (``low + u (high - low)``, or geometrically for ``transform: log``). That is why the paper's setting
"all genes start at 0.5, sigma0 = 1/6" means the same thing for every space and every optimizer.

Kinds:
- ``ps``: density and weight per source model per layer group -> a mergekit-compatible ``Recipe``. ``genes``
  may also name any other numeric parameter of the method (e.g. ``sce``'s ``select_topk``, ``nearswap``'s ``t``):
  a per-model parameter gets a gene per source model per group, a global one a gene per group (the recipe's
  top-level ``parameters``). density and weight are always searched when the method takes them.
  ``group_size: model`` is one group per model (the paper's 6 genes for 3 models); an integer k groups k
  consecutive transformer blocks; ``embeddings: separate`` makes the input embedding (``embed``) and the output
  head with the final norm (``head``) groups of their own. Per-group values become the recipe's
  ``[{filter, value}]`` lists (block filters from evomerge.architecture: ``layers.I.``, GPT-2's
  ``transformer.h.I.``), so `evomerge merge` reproduces the candidate exactly.
  Weights are not normalised: their sum may exceed 1 (the paper's evolved weights summed to about 2).
  Options mergekit-evolve's genome has (evomerge/mergekit_evolve.py translates its configs into them):
  ``smooth: true`` makes the per-group genes the points of a gradient (mergekit's interpolated parameter lists:
  linear across the layers, the embeddings, final norm and head at the first point) instead of a constant per
  group; ``filters: [substring, ...]`` gives every gene one more set per filter (``NAME[filter]``), used for
  the tensors whose name contains that filter (the first that matches; the plain gene for the rest), written as
  mergekit's ``[{filter, value}]`` lists; with layer groups and without ``smooth`` the candidate is then a
  ``slices:`` recipe, one slice per group (mergekit-evolve's own layout). A gene's ``init`` may be a range
  ``[a, b]``: its start is drawn uniformly from it, seeded by ``init_seed`` (mergekit-evolve's random_init).
  ``select: top_two`` (slerp only; mergekit-evolve's slerp genome): the genes are a ``score`` per source per
  group; each group slerps the two highest-scoring sources, the higher one the group's base, at
  ``t = softmax(score_1, score_2)[1]`` (so t <= 1/2; exact ties go to the earlier source); candidates are
  ``slices:`` recipes with a per-slice base_model, whose sources change from candidate to candidate.
- ``dfs``: indicator genes over T = M x r slots and scalings (an M x M matrix or a small feed-forward net of
  (i, j, t)) -> a ``DataflowPath`` (see dataflow.py).
- ``ps_dfs``: a ``ps`` stage, then a ``dfs`` stage with the PS winner as model A.

A ``dfs`` stage's x0 is model A's plain path (A's layers in order, once, every scale 1: ``init_on`` for A's slots
of the first repetition, ``init_off`` elsewhere, scales at 1), and the driver makes x0 the stage's first trial
(optimizers.Problem.start_at_x0), as in the paper: a PS+DFS winner is never below its PS model on the fitness.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from evomerge import architecture
from evomerge.checkpoint import checkpoint_architecture
from evomerge.errors import EvomergeError, check_keys
from evomerge.methods import METHODS
from evomerge.recipe import Recipe
from evomerge.search.candidates import Candidate, LayerPath

SPACES_DIR = Path(__file__).resolve().parents[2] / "search_spaces"
KINDS = ("ps", "dfs", "ps_dfs")
TRANSFORMS = ("linear", "log")
PS_KEYS = {"kind", "description", "merge_method", "parameters", "group_size", "embeddings", "genes", "name",
           "searched", "smooth", "filters", "init_seed", "select"}
PS_GENES = ("density", "weight")
DFS_KEYS = {"kind", "description", "repeats", "scaling", "ffn_hidden", "indicator", "scale", "ffn_weight", "name"}
PS_DFS_KEYS = {"kind", "description", "ps", "dfs", "ps_share", "name"}
GENE_KEYS = {"low", "high", "init", "transform"}
INDICATOR_KEYS = {"low", "high", "init_on", "init_off"}


@dataclass(frozen=True)
class Gene:
    """One searched number: its name, declared bounds, starting value and unit-cube transform."""

    name: str
    low: float
    high: float
    init: float
    transform: str = "linear"
    init_high: float | None = None  # a random start: drawn uniformly (in value units) from [init, init_high]

    def start(self, rng: random.Random) -> float:
        """The starting value: ``init``, or a uniform draw from [init, init_high] when the start is random."""
        if self.init_high is None:
            return self.init
        return self.init + rng.random() * (self.init_high - self.init)

    def value(self, u: float) -> float:
        """The gene's value of unit coordinate ``u`` (clipped to [0, 1]), linear or log between low and high."""
        u = min(1.0, max(0.0, float(u)))
        if self.transform == "log":
            return float(math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low))))
        return float(self.low + u * (self.high - self.low))

    def unit(self, value: float) -> float:
        """Inverse of ``value``: the unit coordinate of a value in [low, high]."""
        if self.transform == "log":
            return (math.log(value) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (value - self.low) / (self.high - self.low)


def _err(msg: str) -> EvomergeError:
    return EvomergeError(msg)


# ----------------------------------------------------------------------------------------------------------
# definitions (YAML) and their validation

@dataclass(frozen=True)
class GeneBounds:
    """A searched parameter's declared range: ``low < high``, ``init`` in [low, high], ``transform`` linear or
    log (log needs ``low > 0``). Units are the parameter's own (a density, a weight, a scale)."""

    low: float
    high: float
    init: float
    transform: str = "linear"
    init_high: float | None = None  # ``init: [a, b]``: a random start drawn from [a, b] (init = a)

    def gene(self, name: str) -> Gene:
        """The gene ``name`` with these bounds."""
        return Gene(name, self.low, self.high, self.init, self.transform, self.init_high)

    def to_dict(self) -> dict[str, Any]:
        """The YAML form ``{low, high, init, transform}`` (``init`` a list ``[a, b]`` for a random start)."""
        init: float | list[float] = self.init if self.init_high is None else [self.init, self.init_high]
        return {"low": self.low, "high": self.high, "init": init, "transform": self.transform}


@dataclass(frozen=True)
class IndicatorBounds:
    """DFS layer-indicator genes: range [low, high] straddling 0 (a slot is on when its gene is > 0), and the
    starting values of model A's slots (``init_on``) and of every other slot (``init_off``)."""

    low: float = -1.0
    high: float = 1.0
    init_on: float = 0.5
    init_off: float = -0.5

    def to_dict(self) -> dict[str, Any]:
        """The YAML form ``{low, high, init_on, init_off}``."""
        return {"low": self.low, "high": self.high, "init_on": self.init_on, "init_off": self.init_off}


@dataclass(frozen=True)
class PSSpaceDef:
    """A validated ``ps`` definition (parameter space; see the module docstring for the fields' meaning).

    ``group_size`` is ``"model"``, ``"block"`` or a positive block count; ``embeddings`` is ``separate`` or
    ``with_blocks``; ``genes`` maps each searched parameter, in genome order, to its bounds; ``searched`` lists
    which of density and weight mergekit-evolve asked for; ``smooth``, ``filters``, ``init_seed`` and ``select``
    as in the module docstring (defaults: off, none, 0, none; written back only when set, so older definitions
    keep their form).
    """

    name: str | None
    merge_method: str
    parameters: dict[str, Any]
    group_size: str | int
    embeddings: str
    genes: dict[str, GeneBounds]
    searched: tuple[str, ...]
    description: str | None = ""
    smooth: bool = False
    filters: tuple[str, ...] = ()
    init_seed: int = 0
    select: str | None = None
    kind: ClassVar[str] = "ps"

    def to_dict(self) -> dict[str, Any]:
        """The resolved YAML mapping (what a run folder's config.yaml keeps under ``search_space``)."""
        out = {"kind": self.kind, "name": self.name, "merge_method": self.merge_method,
               "parameters": copy.deepcopy(self.parameters), "group_size": self.group_size,
               "embeddings": self.embeddings, "genes": {g: b.to_dict() for g, b in self.genes.items()},
               "searched": list(self.searched), "description": self.description}
        if self.smooth:
            out["smooth"] = True
        if self.filters:
            out["filters"] = list(self.filters)
        if self.init_seed:
            out["init_seed"] = self.init_seed
        if self.select:
            out["select"] = self.select
        return out


@dataclass(frozen=True)
class DFSSpaceDef:
    """A validated ``dfs`` definition (data-flow space): ``repeats`` r, the ``scaling`` kind (matrix, ffn or
    none) with ``ffn_hidden`` units for ffn, the indicator bounds and the scale / FFN-weight gene bounds."""

    name: str | None
    repeats: int
    scaling: str
    ffn_hidden: int
    indicator: IndicatorBounds
    scale: GeneBounds
    ffn_weight: GeneBounds
    description: str | None = ""
    kind: ClassVar[str] = "dfs"

    def to_dict(self) -> dict[str, Any]:
        """The resolved YAML mapping (what a run folder's config.yaml keeps under ``search_space``)."""
        return {"kind": self.kind, "name": self.name, "repeats": self.repeats, "scaling": self.scaling,
                "ffn_hidden": self.ffn_hidden, "indicator": self.indicator.to_dict(),
                "scale": self.scale.to_dict(), "ffn_weight": self.ffn_weight.to_dict(),
                "description": self.description}


@dataclass(frozen=True)
class PSDFSSpaceDef:
    """A validated ``ps_dfs`` definition: a PS stage, then a DFS stage; ``ps_share`` in (0, 1) is the PS
    stage's share of every budget."""

    name: str | None
    ps: PSSpaceDef
    dfs: DFSSpaceDef
    ps_share: float
    description: str | None = ""
    kind: ClassVar[str] = "ps_dfs"

    def to_dict(self) -> dict[str, Any]:
        """The resolved YAML mapping (what a run folder's config.yaml keeps under ``search_space``)."""
        return {"kind": self.kind, "name": self.name, "ps": self.ps.to_dict(), "dfs": self.dfs.to_dict(),
                "ps_share": self.ps_share, "description": self.description}


SpaceDef = PSSpaceDef | DFSSpaceDef | PSDFSSpaceDef
StageSpaceDef = PSSpaceDef | DFSSpaceDef


def load_space_definition(spec: Any, overrides: dict[str, Any] | None = None,
                          base_dir: str | Path = ".") -> SpaceDef:
    """A search-space definition from a name in search_spaces/, a YAML path, or an inline mapping, with the
    experiment's ``space:`` overrides applied; validated and with defaults filled in.

    Args:
        spec: a name in search_spaces/, a YAML path (relative to ``base_dir``), or an inline mapping.
        overrides: the experiment's ``space:`` mapping, merged into the definition (nested mappings merged).
        base_dir: the folder a relative path resolves against.

    Returns:
        A ``PSSpaceDef``, ``DFSSpaceDef`` or ``PSDFSSpaceDef``; its ``to_dict()`` is the resolved mapping.

    Raises:
        EvomergeError: an unknown space or key, or an invalid value (one line naming it).
    """
    data = _read_definition(spec, base_dir)
    overrides = {} if overrides is None else overrides
    if not isinstance(overrides, dict):
        raise _err("space (the search-space overrides) must be a mapping")
    data = _deep_update(data, overrides)
    kind = data.get("kind")
    if kind not in KINDS:
        raise _err(f"search space {data.get('name')!r}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    for key in ("name", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise _err(f"search space {data.get('name')!r}: {key} must be a string")
    if kind == "ps":
        return _validate_ps(data)
    if kind == "dfs":
        return _validate_dfs(data)
    return _validate_ps_dfs(data, base_dir)


def _read_definition(spec: Any, base_dir: str | Path) -> dict[str, Any]:
    """The raw mapping of a space name, YAML path or inline mapping, with ``name`` defaulted."""
    if isinstance(spec, str):
        candidates = [Path(base_dir) / spec, SPACES_DIR / f"{spec}.yaml", SPACES_DIR / spec]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            known = sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))
            raise _err(f"unknown search space {spec!r} (known: {', '.join(known)}; or give a YAML path)")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise _err(f"search space {path} must be a mapping, got {type(data).__name__}")
        data.setdefault("name", path.stem)
        return data
    if isinstance(spec, dict):
        data = copy.deepcopy(spec)
        data.setdefault("name", "inline")
        return data
    raise _err(f"search_space must be a name, a path or a mapping, got {type(spec).__name__}")


def _deep_update(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _err(f"{where} must be a number, got {value!r}")
    return float(value)


def _gene_bounds(where: str, given: Any, default: dict[str, float]) -> GeneBounds:
    spec: dict[str, Any] = dict(default, **check_keys(where, given if given is not None else {}, GENE_KEYS))
    low, high = (_number(f"{where}.{k}", spec.get(k)) for k in ("low", "high"))
    given_init = spec.get("init")
    if isinstance(given_init, list):  # a random start drawn from [a, b]
        if len(given_init) != 2:
            raise _err(f"{where}.init must be a number or a range [a, b], got {given_init!r}")
        init, init_high = (_number(f"{where}.init", v) for v in given_init)
        if not init < init_high:
            raise _err(f"{where}.init range [{init}, {init_high}] must have a < b")
    else:
        init, init_high = _number(f"{where}.init", given_init), None
    if not low < high:
        raise _err(f"{where}: inverted bounds (low {low} must be below high {high})")
    for v in (init, init if init_high is None else init_high):
        if not low <= v <= high:
            raise _err(f"{where}.init {v} is outside [{low}, {high}]")
    transform = spec.get("transform", "linear")
    if transform not in TRANSFORMS:
        raise _err(f"{where}.transform must be linear or log, got {transform!r}")
    if transform == "log" and low <= 0:
        raise _err(f"{where}: a log transform needs low > 0")
    return GeneBounds(low, high, init, str(transform), init_high)


def _validate_ps(data: dict[str, Any]) -> PSSpaceDef:
    where = f"search space {data.get('name')!r}"
    check_keys(where, data, PS_KEYS)
    method = data.get("merge_method", "dare_ties")
    if not isinstance(method, str):
        raise _err(f"{where}: merge_method must be a name")
    group = data.get("group_size", "model")
    if not (group in ("model", "block") or (isinstance(group, int) and not isinstance(group, bool) and group > 0)):
        raise _err(f"{where}: group_size must be 'model', 'block' or a positive integer, got {group!r}")
    embeddings = data.get("embeddings", "separate")
    if embeddings not in ("separate", "with_blocks"):
        raise _err(f"{where}: embeddings must be separate or with_blocks, got {embeddings!r}")
    options = _evolve_options(where, data, embeddings)
    genes_in = data.get("genes") or {}
    numeric = {"score": True} if options["select"] == "top_two" else _numeric_parameters(method)
    check_keys(f"{where} genes", genes_in, set(PS_GENES) if numeric is None else set(numeric))
    defaults = {"density": {"low": 0.05, "high": 1.0, "init": 0.5}, "weight": {"low": 0.0, "high": 1.0, "init": 0.5}}
    searched = data.get("searched", list(PS_GENES))  # e.g. [weight] for methods without density
    if not isinstance(searched, list) or not searched or not set(searched) <= set(PS_GENES):
        raise _err(f"{where}: searched must be a non-empty list of {', '.join(PS_GENES)}, got {searched!r}")
    names = [g for g in PS_GENES if g in searched and (numeric is None or g in numeric)]
    names += [g for g in genes_in if g not in PS_GENES]
    if not names:
        raise _err(f"{where}: {method} has no parameter to search; name one under genes")
    unit = {"low": 0.0, "high": 1.0, "init": 0.5}
    genes = {g: _gene_bounds(f"{where} genes.{g}", genes_in.get(g), defaults.get(g, unit)) for g in names}
    params = data.get("parameters") or {}
    if not isinstance(params, dict):
        raise _err(f"{where}: parameters must be a mapping")
    return PSSpaceDef(name=data.get("name"), merge_method=method, parameters=params, group_size=group,
                      embeddings=embeddings, genes=genes, searched=tuple(g for g in PS_GENES if g in searched),
                      description=data.get("description", ""), **options)


def _evolve_options(where: str, data: dict[str, Any], embeddings: str) -> dict[str, Any]:
    """``smooth``, ``filters``, ``init_seed`` and ``select`` of a ps definition, checked (see the module
    docstring), as PSSpaceDef keyword arguments."""
    smooth = data.get("smooth", False)
    if not isinstance(smooth, bool):
        raise _err(f"{where}: smooth must be true or false, got {smooth!r}")
    filters = data.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f and f != "*" for f in filters):
        raise _err(f"{where}: filters must be a list of tensor-name substrings, got {filters!r}")
    if len(set(filters)) != len(filters):
        raise _err(f"{where}: filters lists a substring twice")
    seed = data.get("init_seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _err(f"{where}: init_seed must be an integer, got {seed!r}")
    select = data.get("select")
    if select is not None:
        if select != "top_two" or data.get("merge_method") != "slerp":
            raise _err(f"{where}: select must be top_two, with merge_method slerp, got {select!r}")
        if smooth or filters:
            raise _err(f"{where}: select: top_two takes neither smooth nor filters (one pair and t per group)")
    if (smooth or filters or select) and embeddings == "separate" and data.get("group_size", "model") != "model":
        what = "smooth" if smooth else "filters" if filters else "select"
        raise _err(f"{where}: {what} with layer groups needs embeddings: with_blocks (the embeddings go with the "
                   f"first group, the head with the last, as in mergekit-evolve)")
    return {"smooth": smooth, "filters": tuple(filters), "init_seed": seed, "select": select}


def _numeric_parameters(method: str) -> dict[str, bool] | None:
    """{name: per model?} of the method's numeric parameters; None for a method without a registry entry."""
    spec = METHODS.get(method)
    if spec is None:
        return None
    return {p.name: p.per_model for p in spec.params if p.kind is float}


def _indicator(where: str, given: Any) -> IndicatorBounds:
    ind = dict(IndicatorBounds().to_dict(), **check_keys(f"{where} indicator", given or {}, INDICATOR_KEYS))
    low, high, init_on, init_off = (_number(f"{where} indicator.{k}", ind[k])
                                    for k in ("low", "high", "init_on", "init_off"))
    if not low < 0 < high:
        raise _err(f"{where}: indicator bounds must straddle 0 (a slot is on when its gene is > 0)")
    for k, v in (("init_on", init_on), ("init_off", init_off)):
        if not low <= v <= high:
            raise _err(f"{where}: indicator.{k} is outside the indicator bounds")
    return IndicatorBounds(low, high, init_on, init_off)


def _validate_dfs(data: dict[str, Any]) -> DFSSpaceDef:
    where = f"search space {data.get('name')!r}"
    check_keys(where, data, DFS_KEYS)
    repeats = data.get("repeats", 2)
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise _err(f"{where}: repeats must be a positive integer, got {repeats!r}")
    scaling = data.get("scaling", "matrix")
    if scaling not in ("matrix", "ffn", "none"):
        raise _err(f"{where}: scaling must be matrix, ffn or none, got {scaling!r}")
    hidden = data.get("ffn_hidden", 4)
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise _err(f"{where}: ffn_hidden must be a positive integer")
    indicator = _indicator(where, data.get("indicator"))
    scale = _gene_bounds(f"{where} scale", data.get("scale"), {"low": 0.0, "high": 2.0, "init": 1.0})
    ffn = _gene_bounds(f"{where} ffn_weight", data.get("ffn_weight"), {"low": -3.0, "high": 3.0, "init": 0.0})
    return DFSSpaceDef(name=data.get("name"), repeats=repeats, scaling=scaling, ffn_hidden=hidden,
                       indicator=indicator, scale=scale, ffn_weight=ffn, description=data.get("description", ""))


def _validate_ps_dfs(data: dict[str, Any], base_dir: str | Path) -> PSDFSSpaceDef:
    where = f"search space {data.get('name')!r}"
    check_keys(where, data, PS_DFS_KEYS)
    ps = load_space_definition(data.get("ps", "ps_ties_dare"), {}, base_dir)
    dfs = load_space_definition(data.get("dfs", "dfs"), {}, base_dir)
    if not isinstance(ps, PSSpaceDef) or not isinstance(dfs, DFSSpaceDef):
        raise _err(f"{where}: ps must name a ps space and dfs a dfs space")
    share = data.get("ps_share", 0.5)
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share < 1:
        raise _err(f"{where}: ps_share (the PS stage's share of the budget) must be in (0, 1)")
    return PSDFSSpaceDef(name=data.get("name"), ps=ps, dfs=dfs, ps_share=float(share),
                         description=data.get("description", ""))


# ----------------------------------------------------------------------------------------------------------
# concrete spaces (definition + the actual models)

def read_num_layers(model_dir: str | Path) -> int:
    """The number of decoder layers a model folder's config.json declares.

    Raises:
        EvomergeError: no readable config.json, or no layer count in it.
    """
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise _err(f"cannot read {model_dir}/config.json: {exc}") from None
    cfg = cfg.get("text_config", cfg)
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    if not isinstance(n, int):
        raise _err(f"{model_dir}/config.json has no num_hidden_layers")
    return n


def dataflow_architecture(a: str | Path, b: str | Path) -> architecture.Architecture:
    """The common architecture of DFS models A and B; raises EvomergeError (one line naming the architecture
    and the reason) when a data-flow search cannot run on them."""
    arch_a, arch_b = checkpoint_architecture(a), checkpoint_architecture(b)
    if arch_a.name != arch_b.name:
        raise _err(f"data-flow models A and B must share an architecture: A is {arch_a.name}, B is {arch_b.name}")
    cfg = json.loads((Path(a) / "config.json").read_text())
    reason = architecture.dataflow_refusal(arch_a, cfg.get("text_config", cfg))
    if reason:
        raise _err(reason)
    return arch_a


def check_space_models(definition: SpaceDef, models: dict[str, Any]) -> None:
    """Refuse up front (one EvomergeError line) a search the models' architecture cannot run: PS layer groups
    without a known block list, a model the in-memory engine cannot write in place, a data-flow search on an
    architecture it does not support."""
    kind = definition.kind
    ps = definition.ps if isinstance(definition, PSDFSSpaceDef) else definition
    if isinstance(ps, PSSpaceDef) and ps.group_size != "model":
        checkpoint_architecture(models["base"]).require_blocks("PS layer groups (group_size)")
    if isinstance(ps, PSSpaceDef):
        architecture.check_in_place(models["base"])
    if kind == "dfs":
        dataflow_architecture(models["a"], models["b"])
    if kind == "ps_dfs":
        dataflow_architecture(models["base"], models["b"])


class SearchSpace:
    """Genes + the mapping from a unit-cube genome to a candidate description."""

    kind: str
    genes: list[Gene]
    init_seed: int = 0  # seeds the starts of genes whose init is a range

    @property
    def dim(self) -> int:
        """Number of genes n."""
        return len(self.genes)

    @property
    def names(self) -> list[str]:
        """Gene names in genome order."""
        return [g.name for g in self.genes]

    def x0(self) -> list[float]:
        """The starting genome: every gene's ``init`` in unit coordinates (length ``dim``); a gene whose init is a
        range starts at a uniform draw from it (``random.Random(init_seed)``, in genome order: reproducible)."""
        rng = random.Random(self.init_seed)
        return [float(g.unit(g.start(rng))) for g in self.genes]

    def values(self, x: Sequence[float]) -> dict[str, float]:
        """The decoded gene values {name: value in its declared range} of a genome x (n floats in [0, 1])."""
        return {g.name: g.value(u) for g, u in zip(self.genes, x)}

    def candidate(self, values: dict[str, float]) -> dict[str, Any]:  # pragma: no cover - abstract
        """The candidate of decoded gene values, as a plain mapping (a recipe mapping or a layer path)."""
        raise NotImplementedError

    def decode(self, x: Sequence[float]) -> Candidate:
        """The typed candidate of a genome.

        Args:
            x: the genome, one float in [0, 1] per gene (length ``dim``).

        Returns:
            A ``Recipe`` (PS) or a ``LayerPath`` (DFS).
        """
        mapping = self.candidate(self.values(x))
        if self.kind == "dfs":
            return LayerPath.from_dict(mapping)
        return Recipe.from_dict(mapping, source="the candidate recipe")


class PSSpace(SearchSpace):
    """Density and weight per source model per layer group -> a mergekit-compatible recipe mapping.

    Gene names: ``ALIAS.GROUP.PARAM`` per source model (``GROUP.PARAM`` for a global parameter), with a
    ``[FILTER]`` suffix for each of the definition's filters, in genome order source, group, filter set
    (the filters', then the plain one), parameter.
    """

    kind = "ps"

    def __init__(self, definition: PSSpaceDef, base: str, sources: dict[str, str], dtype: str | None = None):
        self.definition = definition
        self.base = base
        self.sources = dict(sources)
        self.dtype = dtype
        self.init_seed = definition.init_seed
        self.num_layers = read_num_layers(base)
        self.arch = checkpoint_architecture(base)
        self.groups = self._layer_groups()
        self.uses_base = METHODS[definition.merge_method].uses_base if definition.merge_method in METHODS else True
        scopes = _numeric_parameters(definition.merge_method) or {}
        self.model_genes = [g for g in definition.genes if scopes.get(g, True)]
        self.global_genes = [g for g in definition.genes if not scopes.get(g, True)]
        sets = [f"[{f}]" for f in definition.filters] + [""]
        self.genes = [definition.genes[g].gene(f"{alias}.{group}.{g}{suffix}")
                      for alias in self.sources for group, _ in self.groups for suffix in sets
                      for g in self.model_genes]
        self.genes += [definition.genes[g].gene(f"{group}.{g}{suffix}") for group, _ in self.groups
                       for suffix in sets for g in self.global_genes]
        if definition.select == "top_two" and (len(self.sources) < 2 or base not in self.sources.values()):
            raise _err("select: top_two needs at least two sources, the base among them (it only names the "
                       "reference model; each group picks its own base)")

    def _layer_groups(self) -> list[tuple[str, list[str] | None]]:
        """(group name, recipe filters) in the order genes are laid out; filters None = the whole model."""
        size = self.definition.group_size
        if size == "model":
            return [("all", None)]
        self.arch.require_blocks("PS layer groups (group_size)")
        size = 1 if size == "block" else int(size)
        n = self.num_layers
        blocks = [list(range(s, min(s + size, n))) for s in range(0, n, size)]
        groups: list[tuple[str, list[str] | None]] = []
        separate = self.definition.embeddings == "separate"
        embed = self.arch.embedding_filters()
        if separate:
            groups.append(("embed", embed))
        for i, blk in enumerate(blocks):
            name = f"layers_{blk[0]}" if len(blk) == 1 else f"layers_{blk[0]}-{blk[-1]}"
            filters = [self.arch.block_filter(j) for j in blk]
            if not separate and i == 0:
                filters += embed
            groups.append((name, filters))
        if separate:
            groups.append(("head", []))  # the fallback: lm_head, the final norm, anything else
        # without a separate head group the last block group is the fallback
        return groups

    def _filter_sets(self, values: dict[str, float], names: list[str]) -> Any:
        """A parameter's value from the genes ``names`` (one: a scalar; several: a gradient through them, as
        mergekit-evolve writes a smooth genome), over the filter sets: alone without filters, else mergekit's
        ``[{filter, value}, ..., {value}]`` (the plain set last, for every other tensor)."""
        def one(suffix: str) -> float | list[float]:
            points = [values[f"{name}{suffix}"] for name in names]
            return points[0] if len(points) == 1 else points

        if not self.definition.filters:
            return one("")
        return [*({"filter": f, "value": one(f"[{f}]")} for f in self.definition.filters), {"value": one("")}]

    def _parameter_value(self, prefix: str, gene: str, values: dict[str, float]) -> Any:
        """The recipe value of one parameter: a scalar, a gradient over the groups (``smooth``), or one filter
        entry per group's layers (``prefix``: the source alias and a dot for per-model genes, empty for global
        ones); with filters, one such value per filter set."""
        if self.groups[0][1] is None:
            return self._filter_sets(values, [f"{prefix}all.{gene}"])
        if self.definition.smooth:  # mergekit-evolve's smooth genome: the group values as gradient points
            return self._filter_sets(values, [f"{prefix}{group}.{gene}" for group, _ in self.groups])
        entries: list[dict[str, Any]] = []
        for group, filters in self.groups:
            v = values[f"{prefix}{group}.{gene}"]
            entries.extend({"filter": f, "value": v} for f in filters or [])
        fallback_group = self.groups[-1][0]
        entries.append({"value": values[f"{prefix}{fallback_group}.{gene}"]})
        return entries

    def _top_two_slices(self, values: dict[str, float]) -> list[dict[str, Any]]:
        """One slerp slice per group between the two highest-scoring sources (mergekit-evolve's slerp genome)."""
        slices: list[dict[str, Any]] = []
        aliases = list(self.sources)
        for i, (group, _) in enumerate(self.groups):
            ranked = sorted(range(len(aliases)), key=lambda k: (-values[f"{aliases[k]}.{group}.score"], k))
            first, second = (self.sources[aliases[k]] for k in ranked[:2])
            gap = values[f"{aliases[ranked[1]]}.{group}.score"] - values[f"{aliases[ranked[0]]}.{group}.score"]
            t = math.exp(gap) / (1.0 + math.exp(gap))  # softmax of the pair, the second's share (as torch computes)
            layer_range = self._group_range(i)
            slices.append({"sources": [{"model": first, "layer_range": layer_range},
                                       {"model": second, "layer_range": layer_range}],
                           "base_model": first, "parameters": {"t": t}})
        return slices

    def _group_range(self, index: int) -> list[int]:
        """Layers [start, end) of layer group ``index`` (the whole model for ``group_size: model``)."""
        if self.groups[0][1] is None:
            return [0, self.num_layers]
        size = 1 if self.definition.group_size == "block" else int(self.definition.group_size)
        return [index * size, min((index + 1) * size, self.num_layers)]

    @property
    def sliced(self) -> bool:
        """Whether candidates are ``slices:`` recipes: filters over layer groups without smooth (a tensor's
        value then depends on its group and on its name, which one list of substring filters cannot say)."""
        return bool(self.definition.filters) and self.groups[0][1] is not None and not self.definition.smooth

    def candidate(self, values: dict[str, float]) -> dict[str, Any]:
        """The recipe (mergekit YAML as a mapping) of this genome."""
        recipe: dict[str, Any] = {"merge_method": self.definition.merge_method}
        if self.uses_base:  # a method without a base (linear) refuses one that is not among its models
            recipe["base_model"] = self.base
        if self.dtype is not None:  # else computed in the sources' dtype, as mergekit does
            recipe["dtype"] = self.dtype
        parameters = copy.deepcopy(self.definition.parameters)
        if self.definition.select == "top_two":
            if parameters:
                recipe["parameters"] = parameters
            recipe.update(slices=self._top_two_slices(values), tokenizer_source="base")
            return recipe
        if self.sliced:
            if parameters:
                recipe["parameters"] = parameters
            recipe.update(slices=self._slices(values), tokenizer_source="base")
            return recipe
        parameters.update({g: self._parameter_value("", g, values) for g in self.global_genes})
        if parameters:
            recipe["parameters"] = parameters
        recipe["models"] = []
        for alias, path in self.sources.items():
            per_model = {g: self._parameter_value(f"{alias}.", g, values) for g in self.model_genes}
            recipe["models"].append({"model": path, "parameters": per_model} if per_model else {"model": path})
        recipe["tokenizer_source"] = "base"
        return recipe

    def _slices(self, values: dict[str, float]) -> list[dict[str, Any]]:
        """One slice per layer group (embeddings with the first, head and final norm with the last, as mergekit
        plans them): every source with its filter-set values, then the base when the method uses one."""
        slices: list[dict[str, Any]] = []
        for i, (group, _) in enumerate(self.groups):
            layer_range = self._group_range(i)
            sources: list[dict[str, Any]] = []
            for alias, path in self.sources.items():
                params = {g: self._filter_sets(values, [f"{alias}.{group}.{g}"]) for g in self.model_genes}
                source: dict[str, Any] = {"model": path, "layer_range": layer_range}
                sources.append({**source, "parameters": params} if params else source)
            if self.uses_base and self.base not in self.sources.values():
                sources.append({"model": self.base, "layer_range": layer_range})
            item: dict[str, Any] = {"sources": sources}
            shared = {g: self._filter_sets(values, [f"{group}.{g}"]) for g in self.global_genes}
            if shared:
                item["parameters"] = shared
            slices.append(item)
        return slices


class DFSSpace(SearchSpace):
    """Indicator over T = M x r slots + scalings -> the layer path through models A and B."""

    kind = "dfs"

    def __init__(self, definition: DFSSpaceDef, a: str, b: str):
        self.definition = definition
        self.a, self.b = a, b
        self.arch = dataflow_architecture(a, b)
        self.n_a, self.n_b = read_num_layers(a), read_num_layers(b)
        if self.n_a < 2:
            raise _err("model A needs at least 2 layers (its first and last are the fixed ends of the path)")
        self.m = self.n_a + self.n_b
        self.r = definition.repeats
        self.t = self.m * self.r
        # slot 0 (A's first layer) and slot n_a - 1 (A's last layer) of the first repetition are fixed ends
        self.free_slots = [s for s in range(self.t) if s not in (0, self.n_a - 1)]
        ind = definition.indicator
        self.genes = [Gene(f"I.{s}", ind.low, ind.high, ind.init_on if s < self.n_a else ind.init_off)
                      for s in self.free_slots]
        if definition.scaling == "matrix":
            self.genes += [definition.scale.gene(f"W.{i}.{j}") for i in range(self.m) for j in range(self.m)]
        elif definition.scaling == "ffn":
            h = definition.ffn_hidden
            names = [f"ffn.w1.{k}.{c}" for k in range(h) for c in range(3)] + [f"ffn.b1.{k}" for k in range(h)]
            names += [f"ffn.w2.{k}" for k in range(h)] + ["ffn.b2"]
            self.genes += [definition.ffn_weight.gene(n) for n in names]

    def path(self, values: dict[str, float]) -> tuple[list[int], list[int]]:
        """(layers, slots): combined layer indices (A's 0..n_a-1, then B's) along the path, and their slots."""
        slots = [0] + [s for s in self.free_slots if values[f"I.{s}"] > 0] + [self.n_a - 1]
        return [s % self.m for s in slots], slots

    def scale(self, i: int, j: int, t: int, values: dict[str, float]) -> float:
        """The input scale W[i, j] for the step from layer i to layer j at slot t (unitless, matrix or FFN)."""
        sc = self.definition.scaling
        if sc == "none":
            return 1.0
        if sc == "matrix":
            return float(values[f"W.{i}.{j}"])
        h = self.definition.ffn_hidden
        x = (i / max(1, self.m - 1), j / max(1, self.m - 1), t / max(1, self.t - 1))
        out = values["ffn.b2"]
        for k in range(h):
            pre = values[f"ffn.b1.{k}"] + sum(values[f"ffn.w1.{k}.{c}"] * x[c] for c in range(3))
            out += values[f"ffn.w2.{k}"] * math.tanh(pre)
        return float(2.0 / (1.0 + math.exp(-out)))

    def candidate(self, values: dict[str, float]) -> dict[str, Any]:
        """{a, b, layers, scales}: scales[p] multiplies the input of path position p (1 for the first)."""
        layers, slots = self.path(values)
        scales = [1.0] + [self.scale(layers[p - 1], layers[p], slots[p], values) for p in range(1, len(layers))]
        return {"a": self.a, "b": self.b, "n_a": self.n_a, "layers": layers, "scales": scales}


def build_space(definition: SpaceDef, models: dict[str, Any], dtype: str | None = None) -> SearchSpace:
    """The concrete space of one stage: ``definition`` is a validated ps or dfs definition."""
    if isinstance(definition, PSSpaceDef):
        return PSSpace(definition, models["base"], models["sources"], dtype)
    if isinstance(definition, DFSSpaceDef):
        return DFSSpace(definition, models["a"], models["b"])
    raise _err(f"a {definition.kind} space has stages; build each stage's space separately")
