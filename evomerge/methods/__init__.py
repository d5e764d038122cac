"""The merge methods: per-tensor math (one module per family) and the registry of their parameters.

Every method, its parameters and defaults equal mergekit 0.1.5's (see docs/METHODS.md). A method's parameter
is either *global* (one value for the merge, e.g. ``normalize``, ``lambda``) or *per model* (``weight``,
``density``...; mergekit lets a per-model parameter also be given globally as a fallback). Parameters without a
default (``REQUIRED``) must be given. ``rescale_mode`` is our addition (see ``sparsify.py``); everything else is
mergekit's.

``prepare_inputs`` turns one output tensor's source tensors into what the method's kernel needs (deltas and
their precomputed sort orders for the task-arithmetic family); ``run_method`` runs the kernel into an output
buffer. ``evomerge merge`` calls both per tensor; the in-memory engine calls ``prepare_inputs`` once per tensor
and ``run_method`` per candidate, which is why both give bit-identical results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from evomerge.methods.arcee_fusion import merge_arcee_fusion
from evomerge.methods.karcher import merge_karcher
from evomerge.methods.linear import merge_linear
from evomerge.methods.model_stock import merge_model_stock
from evomerge.methods.multislerp import merge_multislerp
from evomerge.methods.nearswap import merge_nearswap
from evomerge.methods.nuslerp import merge_nuslerp
from evomerge.methods.passthrough import merge_passthrough
from evomerge.methods.ram import merge_ram
from evomerge.methods.sce import merge_sce
from evomerge.methods.slerp import merge_slerp
from evomerge.methods.sparsify import RESCALE_MODES, DeltaStats, prepare_stats
from evomerge.methods.task_arithmetic import TaskArithmeticSettings, merge_task_arithmetic
from evomerge.methods.workspace import Workspace

__all__ = ["METHODS", "MethodSpec", "ParamSpec", "PreparedInputs", "REQUIRED", "Workspace", "prepare_inputs",
           "run_method"]


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a method: its type, default (or REQUIRED), and whether it is given per model."""

    name: str
    kind: type  # float, int, bool or str
    default: Any = REQUIRED
    per_model: bool = False
    choices: tuple[str, ...] | None = None
    doc: str = ""

    @property
    def required(self) -> bool:
        """Whether the parameter has no default (a recipe must give it)."""
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its parameters, what inputs it takes, and which kernel family runs it."""

    name: str
    family: str  # linear | slerp | task_arithmetic | model_stock | passthrough | nearswap | arcee_fusion | karcher
    #              | multislerp | nuslerp | ram | sce
    params: tuple[ParamSpec, ...]
    needs_base: bool
    min_inputs: int = 1
    max_inputs: int | None = None
    base_optional: bool = False  # a base_model, when given, is the origin (multislerp, nuslerp); else none is used
    min_non_base: int = 0
    max_non_base: int | None = None
    per_model_scope: str = "non_base"  # which inputs per-model parameters bind to: "non_base" or "input"
    sparsify: str | None = None
    consensus: bool = False
    doc: str = ""
    reference: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_base(self) -> bool:
        """Whether a given base_model is an input with a role of its own (required or optional)."""
        return self.needs_base or self.base_optional

    @property
    def random(self) -> bool:
        """Whether the method draws random drops (needs a generator per tensor)."""
        return self.sparsify in ("random", "della_magprune")

    def param(self, name: str) -> ParamSpec | None:
        """The parameter called ``name``, or None."""
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[ParamSpec, ...]:
        """The parameters given once for the merge."""
        return tuple(p for p in self.params if not p.per_model)

    @property
    def per_model_params(self) -> tuple[ParamSpec, ...]:
        """The parameters given per model (with a global fallback)."""
        return tuple(p for p in self.params if p.per_model)


def _gta(name: str, sparsify: str | None, consensus: bool, normalize: bool, rescale: bool, doc: str,
         reference: str) -> MethodSpec:
    params = [
        ParamSpec("weight", float, per_model=True,
                  doc="scale of this model's task vector (applied before sign election)"),
        ParamSpec("density", float, 1.0, per_model=True, doc="fraction of the task vector kept, in [0, 1]"),
        ParamSpec("normalize", bool, normalize, doc="divide by the sum of the (agreeing) weights"),
        ParamSpec("rescale", bool, rescale, doc="rescale the kept elements after sparsification"),
        ParamSpec("lambda", float, 1.0, doc="scale of the merged task vector"),
        ParamSpec("int8_mask", bool, False, doc="accepted for mergekit compatibility; no effect on the result"),
    ]
    if sparsify is not None:
        params.append(ParamSpec("rescale_mode", str, "l1", choices=RESCALE_MODES,
                                doc="l1: preserve the L1 norm (mergekit); inverse_density: divide by the keep "
                                    "probability (DARE paper)"))
    if sparsify == "magnitude_outliers":
        params.append(ParamSpec("gamma", float, 0.01, per_model=True, doc="fraction of the largest |delta| dropped"))
    if sparsify == "della_magprune":
        params.append(ParamSpec("epsilon", float, 0.15, per_model=True,
                                doc="keep probabilities range over density +- epsilon by magnitude rank"))
    return MethodSpec(name=name, family="task_arithmetic", params=tuple(params), needs_base=True,
                      min_inputs=1, sparsify=sparsify, consensus=consensus, doc=doc, reference=reference)


#: The per-tensor methods by name; a new method is one entry here (``evomerge.method_registry`` adds the
#: data-aware ones and is where callers look a name up).
METHODS: dict[str, MethodSpec] = {
    "linear": MethodSpec(
        name="linear", family="linear", needs_base=False, per_model_scope="input",
        params=(ParamSpec("weight", float, per_model=True, doc="this model's weight"),
                ParamSpec("normalize", bool, True, doc="divide by the sum of the weights")),
        doc="Weighted average of the models (model soup).", reference="https://arxiv.org/abs/2203.05482"),
    "slerp": MethodSpec(
        name="slerp", family="slerp", needs_base=True, min_inputs=2, max_inputs=2,
        params=(ParamSpec("t", float, doc="interpolation factor: 0 = base_model, 1 = the other model"),),
        doc="Spherical interpolation between base_model and one other model.",
        reference="https://en.wikipedia.org/wiki/Slerp"),
    "task_arithmetic": _gta("task_arithmetic", None, False, False, False,
                            "base + lambda * sum_i weight_i * (model_i - base).", "https://arxiv.org/abs/2212.04089"),
    "ties": _gta("ties", "magnitude", True, True, False,
                 "TIES: keep the largest |delta| (density), elect the sign by weighted sum, average the agreeing.",
                 "https://arxiv.org/abs/2306.01708"),
    "dare_ties": _gta("dare_ties", "random", True, False, True,
                      "DARE random drop (density) with L1 rescale, then TIES sign election.",
                      "https://arxiv.org/abs/2311.03099"),
    "dare_linear": _gta("dare_linear", "random", False, False, True,
                        "DARE random drop (density) with L1 rescale, summed without sign election.",
                        "https://arxiv.org/abs/2311.03099"),
    "breadcrumbs": _gta("breadcrumbs", "magnitude_outliers", False, False, False,
                        "Model Breadcrumbs: drop the largest outliers (gamma) and the smallest |delta|.",
                        "https://arxiv.org/abs/2312.06795"),
    "breadcrumbs_ties": _gta("breadcrumbs_ties", "magnitude_outliers", True, False, False,
                             "Model Breadcrumbs with TIES sign election.", "https://arxiv.org/abs/2312.06795"),
    "della": _gta("della", "della_magprune", True, True, True,
                  "DELLA: random drop with keep probability by magnitude rank, TIES sign election.",
                  "https://arxiv.org/abs/2406.11617"),
    "della_linear": _gta("della_linear", "della_magprune", False, False, True,
                         "DELLA without sign election.", "https://arxiv.org/abs/2406.11617"),
    "model_stock": MethodSpec(
        name="model_stock", family="model_stock", needs_base=True, min_inputs=3,
        params=(ParamSpec("filter_wise", bool, False, doc="one interpolation ratio per row instead of per tensor"),),
        doc="Model Stock: interpolate between the base and the models' mean by their task vectors' angle.",
        reference="https://arxiv.org/abs/2403.19522"),
    "passthrough": MethodSpec(
        name="passthrough", family="passthrough", needs_base=False, max_inputs=1, per_model_scope="input",
        params=(ParamSpec("scale", float, None, per_model=True,
                          doc="multiply the copied tensor (default: no scaling)"),),
        doc="Copy tensors from one model; with slices, stack layer ranges of several models (frankenmerge).",
        reference=""),
    "nearswap": MethodSpec(
        name="nearswap", family="nearswap", needs_base=True, min_inputs=2, max_inputs=2,
        params=(ParamSpec("t", float, doc="distance below which an element is taken from the other model"),),
        doc="Take the other model's elements within t of the base's; move the others toward it by t / distance.",
        reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001"),
    "arcee_fusion": MethodSpec(
        name="arcee_fusion", family="arcee_fusion", needs_base=True, min_inputs=2, max_inputs=2, params=(),
        doc="Take the other model's elements whose change, weighted by the row's softmax KL divergence, is an "
            "outlier (>= median + 1.5 IQR).",
        reference="https://arcee.ai"),
    "karcher": MethodSpec(
        name="karcher", family="karcher", needs_base=False, per_model_scope="input",
        params=(ParamSpec("max_iter", int, 10, doc="most Riemannian gradient steps"),
                ParamSpec("tol", float, 1e-5, doc="norm / step / angle below which a term is dropped or iteration "
                                                  "stops")),
        doc="Karcher mean of the models' directions on the unit sphere, scaled by their mean norm.",
        reference="https://arxiv.org/abs/2603.04972"),
    "multislerp": MethodSpec(
        name="multislerp", family="multislerp", needs_base=False, base_optional=True, min_non_base=1,
        params=(ParamSpec("weight", float, per_model=True, doc="this model's weight"),
                ParamSpec("normalize_weights", bool, True, doc="divide the weights by their sum"),
                ParamSpec("eps", float, 1e-8, doc="added to norms; below it the mean direction counts as zero")),
        doc="Barycentric spherical interpolation of several models (of their task vectors with a base_model).",
        reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea"),
    "nuslerp": MethodSpec(
        name="nuslerp", family="nuslerp", needs_base=False, base_optional=True, min_inputs=2, max_inputs=3,
        min_non_base=2, max_non_base=2,
        params=(ParamSpec("weight", float, per_model=True, doc="this model's weight; t = w_2 / (w_1 + w_2)"),
                ParamSpec("nuslerp_row_wise", bool, False, doc="without flatten: interpolate the vectors along "
                                                               "the first axis instead of the last"),
                ParamSpec("nuslerp_flatten", bool, True, doc="interpolate the whole tensor as one vector")),
        doc="Spherical interpolation of two models (of their task vectors with a base_model), whole or per row.",
        reference="https://github.com/arcee-ai/mergekit"),
    "ram": MethodSpec(
        name="ram", family="ram", needs_base=True,
        params=(ParamSpec("epsilon", float, 1e-5, doc="|delta| above which an element counts as changed"),),
        doc="Reinforced Agent Merging: elements one model changed keep its delta; shared ones are averaged.",
        reference="https://arxiv.org/abs/2601.13572"),
    "ramplus_tl": MethodSpec(
        name="ramplus_tl", family="ram", needs_base=True, extra={"plus": True},
        params=(ParamSpec("r", float, 0.1, doc="strength of the rescaling of uniquely changed elements"),
                ParamSpec("alpha", float, 0.2, doc="cap on the shared/unique overlap ratio"),
                ParamSpec("epsilon", float, 1e-5, doc="|delta| above which an element counts as changed")),
        doc="RAM+ (tensor-local): RAM with each model's unique elements scaled by 1 + r * min(overlap ratio, alpha).",
        reference="https://arxiv.org/abs/2601.13572"),
    "sce": MethodSpec(
        name="sce", family="sce", needs_base=True,
        params=(ParamSpec("select_topk", float, 1.0, doc="fraction of positions kept, by largest variance across "
                                                         "the models, in [0, 1]"),
                ParamSpec("int8_mask", bool, False, doc="store masks as int8 (no effect on the result)")),
        doc="SCE: select high-variance positions, weight models by task-vector energy, erase minority signs.",
        reference="https://arxiv.org/abs/2408.07990"),
}


@dataclass
class PreparedInputs:
    """One output tensor's inputs in the form its method's kernel uses (built once, reused per candidate)."""

    base: torch.Tensor | None  # the base tensor (methods with a base)
    others: list[torch.Tensor]  # raw non-base tensors (slerp, model_stock), or all inputs (linear, passthrough)
    deltas: list[torch.Tensor] = field(default_factory=list)  # task-arithmetic family: theta_i - base
    stats: list[DeltaStats | None] = field(default_factory=list)

    def base_tensor(self) -> torch.Tensor:
        """The base tensor of a method that merges against one (ValueError for linear / passthrough)."""
        if self.base is None:
            raise ValueError("these inputs have no base tensor (a method without a base prepared them)")
        return self.base

    @property
    def nbytes(self) -> int:
        """Bytes held by the prepared tensors (base, raw inputs, deltas and their sort orders / ranks)."""
        tensors = ([self.base] if self.base is not None else []) + self.others + self.deltas
        total = sum(t.numel() * t.element_size() for t in tensors)
        for s in self.stats:
            if s is not None:
                for t in (s.order, s.rank_norm):
                    if t is not None:
                        total += t.numel() * t.element_size()
        return total


def prepare_inputs(spec: MethodSpec, tensors: Sequence[torch.Tensor], base_pos: int | None,
                   lazy: bool = False) -> PreparedInputs:
    """Deltas and sparsification statistics for the task-arithmetic family; the raw tensors otherwise.

    ``lazy`` (one-shot merges): skip precomputations that only pay off over many candidates (sort orders).
    """
    if spec.family in ("linear", "passthrough") or base_pos is None:
        return PreparedInputs(base=None, others=list(tensors))
    if base_pos is None:
        raise ValueError(f"{spec.name} merges against a base: base_pos must say which tensor it is")
    base = tensors[base_pos]
    rest = [t for i, t in enumerate(tensors) if i != base_pos]
    if spec.family in ("ram", "sce"):
        return PreparedInputs(base=base, others=[], deltas=[t - base for t in rest])
    if spec.family == "task_arithmetic":
        deltas = [t - base for t in rest]
        return PreparedInputs(base=base, others=[], deltas=deltas,
                              stats=[prepare_stats(d, spec.sparsify, lazy=lazy) for d in deltas])
    return PreparedInputs(base=base, others=rest)


def run_method(spec: MethodSpec, inputs: PreparedInputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
               out: torch.Tensor, *, generator: torch.Generator | None = None,
               ws: Workspace) -> torch.Tensor:
    """Merge one tensor into ``out`` (the inputs' shape, in the compute dtype) with resolved parameters."""
    family = spec.family
    if family == "task_arithmetic":
        sparsify = spec.sparsify
        settings = TaskArithmeticSettings(
            weights=[p["weight"] for p in per_model], densities=[p["density"] for p in per_model],
            sparsify=sparsify, consensus=spec.consensus, normalize=shared["normalize"], rescale=shared["rescale"],
            lambda_=shared["lambda"], rescale_mode=shared.get("rescale_mode", "l1"),
            gammas=[p["gamma"] for p in per_model] if sparsify == "magnitude_outliers" else None,
            epsilons=[p["epsilon"] for p in per_model] if sparsify == "della_magprune" else None)
        return merge_task_arithmetic(inputs.base_tensor(), inputs.deltas, inputs.stats, out, settings,
                                     generator=generator, ws=ws)
    if family == "linear":
        return merge_linear(inputs.others, out, weights=[p["weight"] for p in per_model],
                            normalize=shared["normalize"], ws=ws)
    if family == "slerp":
        return merge_slerp(inputs.base_tensor(), inputs.others[0], out, t=shared["t"])
    if family == "model_stock":
        return merge_model_stock(inputs.base_tensor(), inputs.others, out, filter_wise=shared["filter_wise"])
    if family == "passthrough":
        return merge_passthrough(inputs.others[0], out, scale=per_model[0]["scale"])
    return _run_more(spec, inputs, shared, per_model, out)


def _run_more(spec: MethodSpec, inputs: PreparedInputs, shared: dict[str, Any], per_model: list[dict[str, Any]],
              out: torch.Tensor) -> torch.Tensor:
    """The kernels of nearswap, arcee_fusion, karcher, multislerp, nuslerp, ram, ramplus_tl and sce, on one torch
    thread: their whole-tensor reductions (sums, norms, dot products) round differently when torch splits them
    over several threads, and a merge must not depend on the thread count."""
    previous = torch.get_num_threads()
    if previous != 1:
        torch.set_num_threads(1)
    try:
        return _dispatch_more(spec, inputs, shared, per_model, out)
    finally:
        if previous != 1:
            torch.set_num_threads(previous)


def _dispatch_more(spec: MethodSpec, inputs: PreparedInputs, shared: dict[str, Any],
                   per_model: list[dict[str, Any]], out: torch.Tensor) -> torch.Tensor:
    family = spec.family
    if family == "nearswap":
        return merge_nearswap(inputs.base_tensor(), inputs.others[0], out, t=shared["t"])
    if family == "arcee_fusion":
        return merge_arcee_fusion(inputs.base_tensor(), inputs.others[0], out)
    if family == "karcher":
        return merge_karcher(inputs.others, out, max_iter=shared["max_iter"], tol=shared["tol"])
    if family == "multislerp":
        return merge_multislerp(inputs.others, inputs.base, out, weights=[p["weight"] for p in per_model],
                                normalize_weights=shared["normalize_weights"], eps=shared["eps"])
    if family == "nuslerp":
        return merge_nuslerp(inputs.others, inputs.base, out, weights=[p["weight"] for p in per_model],
                             row_wise=shared["nuslerp_row_wise"], flatten=shared["nuslerp_flatten"])
    if family == "ram":
        plus = bool(spec.extra.get("plus"))
        return merge_ram(inputs.base_tensor(), inputs.deltas, out, epsilon=shared["epsilon"], plus=plus,
                         r=shared.get("r", 0.1), alpha=shared.get("alpha", 0.2))
    if family == "sce":
        return merge_sce(inputs.base_tensor(), inputs.deltas, out, select_topk=shared["select_topk"],
                         int8_mask=shared["int8_mask"])
    raise ValueError(f"unknown method family {family!r}")
