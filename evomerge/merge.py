"""`evomerge merge`: plan a recipe into per-tensor jobs, run them one tensor at a time, write a checkpoint.

Planning (``plan_merge``) opens every source checkpoint (headers only), checks that they can be merged (same
architecture, same vocabulary size, matching tensor shapes, layer ranges that exist) and lays out one
``TensorJob`` per output tensor, the way mergekit 0.1.5 plans a merge: recipes with ``models:`` become one
slice spanning every layer (the base is added as a source when it is not listed); the input embeddings
(``evomerge.architecture``: ``embed_tokens``, GPT-2's ``wte``/``wpe``, GPT-NeoX's ``embed_in``) come from the
first slice's sources, the other non-layer tensors (final norm, head, GPT-NeoX's ``embed_out``) from the last
slice's, as mergekit's pre_weights / post_weights; a layer at position ``i`` of a slice of ``L`` layers has
gradient position ``t = i / (L - 1)`` (``1`` when ``L == 1``); non-layer tensors have ``t = 0``.

Parameters are resolved per job (``resolve_job_parameters``) from, in order of precedence, the source's own
parameters, the slice's, the global ones, then the method's default; filters match the source's tensor name
for per-model parameters and the output name for global ones. All jobs are resolved before anything is
computed, so a bad value anywhere fails before any work. Then each job loads only its source tensors
(memory-mapped), merges them with the method kernel and streams the result to ``write_checkpoint``.

Random drops (DARE, DELLA) use one ``torch.Generator`` per tensor seeded from ``--seed`` and the tensor's
name, so a merge is reproducible, independent of tensor order, and equal to the in-memory engine's
(on the same device: CPU and CUDA random streams differ).
"""

from __future__ import annotations

import threading
import zlib
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from tqdm.auto import tqdm

from evomerge import architecture
from evomerge.alignment.method_params import CALIBRATION_DEFAULTS, DATA_AWARE_METHODS
from evomerge.alignment.recipe_methods import merge_data_aware
from evomerge.checkpoint import (
    Checkpoint,
    dtype_name,
    find_generation_config,
    model_card,
    parse_dtype,
    write_checkpoint,
)
from evomerge.errors import EvomergeError
from evomerge.lora import model_folder, open_source
from evomerge.methods import MethodSpec, ParamSpec, Workspace, prepare_inputs, run_method
from evomerge.recipe import Recipe, check_value, resolve_setting
from evomerge.tensor_sets import SourceTensors, compare_sources
from evomerge.vocabulary import TokenizerPlan, VocabularyPlan, plan_tokenizer, tokenizer_folder


@dataclass
class TensorJob:
    """One output tensor: which source tensors it merges and where its parameters come from."""

    name: str  # output tensor name
    slice_index: int
    sources: list[tuple[int, str]]  # (index into MergePlan.models, tensor name in that model)
    # per source: index of its recipe entry (models[i] / slice sources[i]); None = the base added as a source
    param_refs: list[int | None]
    base_pos: int | None  # position of the base among sources
    t: float  # gradient position
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    floating: bool = True
    vocab: bool = False  # a vocabulary tensor, re-indexed to the output tokenizer when loaded (vocabulary.py)


@dataclass
class MergePlan:
    """A recipe laid out for merging: its opened sources, one job per output tensor, the output config."""

    recipe: Recipe
    spec: MethodSpec
    models: list[Path]
    checkpoints: list[Checkpoint]
    base_index: int | None
    jobs: list[TensorJob]
    config: dict[str, Any]
    out_dtype: torch.dtype | None
    num_layers: int
    tokenizer_dir: Path
    tokenizer: TokenizerPlan  # the output tokenizer and vocabulary re-indexing
    structure: tuple = field(default=())
    generation_config: Path | None = None  # generation_config.json carried into the output (tokenizer source's)

    def out_dtype_for(self, job: TensorJob) -> torch.dtype:
        """The dtype job's tensor is written in: ``out_dtype`` for floating tensors, else its own."""
        if not job.floating:
            return job.compute_dtype
        return self.out_dtype or job.compute_dtype


def tensor_seed(seed: int, name: str) -> int:
    """The random seed of one tensor's drops: depends on the run seed and the tensor name only."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63 - 1)


def recipe_structure(recipe: Recipe) -> tuple:
    """What must not change between candidates of one engine: method, sources, layer ranges, dtypes."""
    base = recipe.resolve_path(recipe.base_model) if recipe.base_model else None
    return (recipe.merge_method, base,
            tuple(recipe.resolve_path(m.model) for m in recipe.models),
            tuple((tuple((recipe.resolve_path(s.model), tuple(s.layer_range)) for s in sl.sources),
                   recipe.slice_base(i)) for i, sl in enumerate(recipe.slices)),
            recipe.dtype, recipe.out_dtype, repr(recipe.tokenizer_settings()), recipe.chat_template)


# ------------------------------------------------------------------------------------------------ planning


def open_checkpoints(recipe: Recipe, allow_pickle: bool = False) -> tuple[list[Path], list[Checkpoint]]:
    """Every model of the recipe (``Recipe.model_paths`` order), opened (headers only) and checked compatible.

    Raises:
        EvomergeError: a folder cannot be opened, or architectures / vocabulary sizes differ.
    """
    paths = recipe.model_paths()
    checkpoints = [open_source(p, allow_pickle=allow_pickle) for p in paths]
    _check_compatible(paths, checkpoints, same_vocabulary=recipe.tokenizer_settings() is None)
    compare_sources(paths, checkpoints)  # the same tensors in every source (tied heads resolved), else one error
    return paths, checkpoints


def _check_compatible(paths: list[Path], checkpoints: list[Checkpoint], same_vocabulary: bool = True) -> None:
    def arch(c: Checkpoint) -> str:
        """The checkpoint's architecture name (else its model type)."""
        archs = c.config.get("architectures") or []
        return str(archs[0]) if archs else str(c.config.get("model_type"))

    first = checkpoints[0]
    for path, ckpt in zip(paths[1:], checkpoints[1:]):
        if arch(ckpt) != arch(first) or ckpt.config.get("model_type") != first.config.get("model_type"):
            raise EvomergeError(f"models have different architectures: {paths[0]} is {arch(first)}, "
                                f"{path} is {arch(ckpt)}")
        if same_vocabulary and ckpt.config.get("vocab_size") != first.config.get("vocab_size"):
            raise EvomergeError(f"vocabulary sizes differ: {paths[0]} has {first.config.get('vocab_size')}, "
                                f"{path} has {ckpt.config.get('vocab_size')} (merging needs one shared vocabulary: "
                                f"set tokenizer_source: union, base or a model path, or a 'tokenizer:' block)")


def plan_merge(recipe: Recipe, allow_pickle: bool = False) -> MergePlan:
    """Check the sources and lay out one job per output tensor (see the module docstring).

    Args:
        recipe: a validated per-tensor recipe (not a data-aware one).
        allow_pickle: also open ``.bin`` (pickle) checkpoints, loaded with ``weights_only``.

    Returns:
        The plan: opened checkpoints (headers only, no tensor read), one ``TensorJob`` per output tensor in
        output order, and the output's ``config.json`` (layer count, ``layer_types`` and dtype updated).

    Raises:
        EvomergeError: a source cannot be opened, the sources' architectures, vocabulary sizes or tensor sets
            differ, a slice's sources span different numbers of layers or layers a model lacks, a tensor is
            missing from a source, or tensor shapes differ.
    """
    spec = recipe.method
    paths, checkpoints = open_checkpoints(recipe, allow_pickle)
    tensor_sets = compare_sources(paths, checkpoints)
    index_of = {p: i for i, p in enumerate(paths)}
    base_index = index_of[recipe.resolve_path(recipe.base_model)] if recipe.base_model else None
    tokenizer = plan_tokenizer(recipe, paths, [c.config for c in checkpoints])
    slices = _plan_slices(recipe, spec.uses_base, checkpoints, index_of, base_index)
    _check_slices(slices, paths, checkpoints)
    reference = checkpoints[base_index if base_index is not None else slices[0][0].model]
    arch = architecture.resolve(reference.config, reference.tensor_names, reference.num_layers)
    if recipe.slices:
        arch.require_blocks("slices (layer ranges)")
    slice_bases = [index_of[b] if (b := recipe.slice_base(i)) is not None else None
                   for i in range(len(recipe.slices))] or [base_index]
    ctx = _PlanContext(arch=arch, spec=spec, paths=paths, checkpoints=checkpoints, base_index=base_index,
                       compute=parse_dtype(recipe.dtype), slices=slices, reference=reference, tensor_sets=tensor_sets,
                       vocabulary=tokenizer.vocabulary, slice_bases=slice_bases)
    jobs, num_layers = _plan_jobs(ctx)
    out_dtype = parse_dtype(recipe.out_dtype)
    config = _output_config(ctx, num_layers, out_dtype or ctx.compute)
    return MergePlan(recipe=recipe, spec=spec, models=paths, checkpoints=checkpoints, base_index=base_index,
                     jobs=jobs, config=config, out_dtype=out_dtype, num_layers=num_layers,
                     tokenizer_dir=tokenizer.folder, structure=recipe_structure(recipe), tokenizer=tokenizer,
                     generation_config=find_generation_config(tokenizer.folder, model_folder(reference.path)))


class _PlanSource(NamedTuple):
    """One source of a planned slice."""

    model: int  # index into the plan's models
    layers: tuple[int, int]  # [start, end) layer range
    ref: int | None  # index of its recipe entry (models[i] / slice sources[i]); None = the base added as a source


@dataclass
class _PlanContext:
    """What every step of planning reads: the method, the opened sources, the slices and the compute dtype."""

    arch: architecture.Architecture  # where the reference's blocks, embeddings and head are
    spec: MethodSpec
    paths: list[Path]
    checkpoints: list[Checkpoint]
    base_index: int | None
    compute: torch.dtype | None
    slices: list[list[_PlanSource]]
    reference: Checkpoint  # the base (else the first source): its non-layer tensors and config are the output's
    tensor_sets: SourceTensors  # the sources' tensor sets compared (tied heads resolved per source)
    vocabulary: VocabularyPlan | None = None  # the output tokenizer's rows, when the recipe re-indexes vocabularies
    slice_bases: list[int | None] = field(default_factory=list)  # each slice's base (its own, else the recipe's)


def _plan_slices(recipe: Recipe, needs_base: bool, checkpoints: list[Checkpoint], index_of: dict[Path, int],
                 base_index: int | None) -> list[list[_PlanSource]]:
    """The recipe as slices: ``models:`` is one slice over every layer (plus the base when it is not listed)."""
    if not recipe.models:
        return [[_PlanSource(index_of[recipe.resolve_path(src.model)], src.layer_range, j)
                 for j, src in enumerate(s.sources)] for s in recipe.slices]
    sources = []
    for i, entry in enumerate(recipe.models):
        model = index_of[recipe.resolve_path(entry.model)]
        sources.append(_PlanSource(model, (0, checkpoints[model].num_layers), i))
    if needs_base and base_index is not None and base_index not in [s.model for s in sources]:
        sources.append(_PlanSource(base_index, (0, checkpoints[base_index].num_layers), None))
    return [sources]


def _check_slices(slices: list[list[_PlanSource]], paths: list[Path], checkpoints: list[Checkpoint]) -> None:
    for si, sources in enumerate(slices):
        lengths = {end - start for _, (start, end), _ in sources}
        if len(lengths) != 1:
            raise EvomergeError(f"slice {si}: sources have different numbers of layers: "
                                + ", ".join(f"{paths[m].name} has {checkpoints[m].num_layers}" for m, _, _ in sources))
        for m, (start, end), _ in sources:
            if end > checkpoints[m].num_layers:
                raise EvomergeError(f"slice {si}: layer_range [{start}, {end}) is outside {paths[m]}, "
                                    f"which has {checkpoints[m].num_layers} layers")


def _plan_jobs(ctx: _PlanContext) -> tuple[list[TensorJob], int]:
    """The jobs in output order (embeddings, the slices' layers, then the other non-layer tensors) and the
    number of output layers."""
    names = _output_names(ctx.reference.tensor_names, ctx.tensor_sets)
    outer = [name for name in names if ctx.arch.split_block(name) is None]
    first, last = ctx.slices[0], ctx.slices[-1]
    # embeddings from the first slice, every other non-block tensor (final norm, head) from the last (as mergekit)
    jobs = [_plan_job(ctx, name, 0, [name] * len(first), 0.0) for name in outer if ctx.arch.is_embedding(name)]
    out_layer = 0
    for si, sources in enumerate(ctx.slices):
        start0, end0 = sources[0].layers
        count = end0 - start0
        for offset in range(count):
            t = offset / (count - 1) if count > 1 else 1.0
            for rest in _layer_template(ctx, sources[0].model, start0 + offset):
                names = [ctx.arch.block_tensor(source.layers[0] + offset, rest) for source in sources]
                jobs.append(_plan_job(ctx, ctx.arch.block_tensor(out_layer, rest), si, names, t))
            out_layer += 1
    jobs += [_plan_job(ctx, name, len(ctx.slices) - 1, [name] * len(last), 0.0)
             for name in outer if not ctx.arch.is_embedding(name)]
    return jobs, out_layer


def _layer_template(ctx: _PlanContext, model: int, layer: int) -> list[str]:
    """The in-block name of every tensor of one layer of a model, e.g. "mlp.up_proj.weight"."""
    blocks = map(ctx.arch.split_block, ctx.checkpoints[model].tensor_names)
    template = [block[1] for block in blocks if block and block[0] == layer]
    if not template:
        raise EvomergeError(f"{ctx.paths[model]} has no tensors for layer {layer}")
    return template


def _plan_job(ctx: _PlanContext, out_name: str, si: int, names: list[str], t: float) -> TensorJob:
    """The job of one output tensor from its source tensor names (one per source of slice ``si``)."""
    sources = ctx.slices[si]
    refs = [(source.model, ctx.tensor_sets.resolve(source.model, name)) for source, name in zip(sources, names)]
    shapes = []
    for m, n in refs:
        if n not in ctx.checkpoints[m]:
            raise EvomergeError(f"tensor {n!r} is missing from {ctx.paths[m]}")
        shapes.append(tuple(ctx.checkpoints[m].shape(n)))
    vocabulary = ctx.vocabulary
    vocab = (vocabulary is not None and ctx.arch.split_block(out_name) is None and len(shapes[0]) == 2
             and all(s[0] == vocabulary.vocab_sizes[ctx.paths[m]] for (m, _), s in zip(refs, shapes)))
    if vocab:
        assert vocabulary is not None, f"{out_name}: a vocabulary tensor implies a vocabulary plan"
        shapes = [(vocabulary.size, *s[1:]) for s in shapes]
    if len(set(shapes)) != 1:
        detail = ", ".join(f"{ctx.paths[m].name} {list(s)}" for (m, _), s in zip(refs, shapes))
        raise EvomergeError(f"tensor shapes differ for {out_name}: {detail}")
    dtypes = [ctx.checkpoints[m].dtype(n) for m, n in refs]
    floating = all(d.is_floating_point for d in dtypes)
    job_dtype = dtypes[0]
    for d in dtypes[1:]:
        job_dtype = torch.promote_types(job_dtype, d)
    if ctx.compute is not None and floating:
        job_dtype = ctx.compute
    base_pos = None
    base_index = ctx.slice_bases[si] if ctx.slice_bases else ctx.base_index
    if ctx.spec.uses_base and base_index is not None:
        base_pos = next(i for i, (m, _) in enumerate(refs) if m == base_index)
    return TensorJob(name=out_name, slice_index=si, sources=refs, param_refs=[s.ref for s in sources],
                     base_pos=base_pos, t=t, shape=shapes[0], compute_dtype=job_dtype, floating=floating,
                     vocab=vocab)


def _output_config(ctx: _PlanContext, num_layers: int, final_dtype: torch.dtype | None) -> dict[str, Any]:
    """The reference's config with the output's layer count, per-layer lists and dtype."""
    config = dict(ctx.reference.config)
    if ctx.tensor_sets.untied and ctx.tensor_sets.heads:
        config["tie_word_embeddings"] = False  # a source has its own head: the output keeps one (as mergekit)
    if isinstance(config.get(ctx.arch.num_layers_key), int):
        config[ctx.arch.num_layers_key] = num_layers
    # per-layer config lists (e.g. Qwen2's layer_types) follow the layers they describe
    layer_types = []
    for sources in ctx.slices:
        model, (start, end), _ = sources[0]
        types = ctx.checkpoints[model].config.get("layer_types")
        layer_types += list(types[start:end]) if isinstance(types, list) and len(types) >= end else []
    if isinstance(config.get("layer_types"), list):
        complete = len(layer_types) == num_layers
        config["layer_types"] = layer_types if complete else [config["layer_types"][0]] * num_layers
    if final_dtype is not None:
        config["dtype"] = dtype_name(final_dtype)
        if "torch_dtype" in config:
            config["torch_dtype"] = dtype_name(final_dtype)
    if ctx.vocabulary is not None:
        config["vocab_size"] = ctx.vocabulary.size
    return config


def _output_names(reference_names: list[str], tensor_sets: SourceTensors) -> list[str]:
    """The reference's tensor names, with the tied heads added when the output is untied and dropped when tied."""
    names = [n for n in reference_names if tensor_sets.untied or n not in tensor_sets.heads]
    if tensor_sets.untied:
        names += sorted(tensor_sets.heads - set(names))
    return names


# ------------------------------------------------------------------------------------------------ parameters


def _entry_parameters(recipe: Recipe, job: TensorJob, ref: int | None) -> dict[str, Any]:
    if ref is None:
        return {}
    if recipe.models:
        return recipe.models[ref].parameters
    return recipe.slices[job.slice_index].sources[ref].parameters


def _resolve(param: ParamSpec, scopes: list[dict[str, Any]], tensor_name: str, t: float, where: str) -> Any:
    for scope in scopes:
        if param.name in scope:
            try:
                value = resolve_setting(scope[param.name], tensor_name, t, param.kind)
            except EvomergeError as exc:  # e.g. a whole-number parameter's gradient between two layers
                raise EvomergeError(f"{where}: {param.name}: {exc}") from None
            if value is not None:
                if param.kind in (float, int):
                    check_value(param.name, value, where)
                return value
    if param.required:
        raise EvomergeError(f"missing required parameter {param.name!r} for {where}")
    return param.default


def resolve_job_parameters(plan: MergePlan, recipe: Recipe, job: TensorJob) -> tuple[dict[str, Any],
                                                                                       list[dict[str, Any]]]:
    """(global parameters, per-model parameters of the inputs the method binds them to) for one job."""
    spec = plan.spec
    slice_params = recipe.slices[job.slice_index].parameters if recipe.slices else {}
    shared_scopes = [slice_params, recipe.parameters]
    shared = {p.name: _resolve(p, shared_scopes, job.name, job.t, job.name) for p in spec.global_params}
    per_model = []
    for pos, ((m, name), ref) in enumerate(zip(job.sources, job.param_refs)):
        if spec.per_model_scope == "non_base" and pos == job.base_pos:
            continue
        scopes = [_entry_parameters(recipe, job, ref), slice_params, recipe.parameters]
        where = f"{plan.models[m].name}: {name}"
        per_model.append({p.name: _resolve(p, scopes, name, job.t, where) for p in spec.per_model_params})
    _check_job(spec, shared, per_model, job)
    return shared, per_model


def _check_job(spec: MethodSpec, shared: dict[str, Any], per_model: list[dict[str, Any]], job: TensorJob) -> None:
    if spec.family == "linear" or (spec.family == "task_arithmetic" and not spec.consensus):
        if shared.get("normalize") and abs(sum(p["weight"] for p in per_model)) < 1e-8:
            raise EvomergeError(f"{spec.name}: the weights of {job.name} sum to zero, which normalize cannot divide "
                                f"by (set normalize: false or change the weights)")
    if spec.family == "multislerp" and shared["normalize_weights"] and len(per_model) > 1:
        if abs(sum(p["weight"] for p in per_model)) < 1e-8:
            raise EvomergeError(f"{spec.name}: the weights of {job.name} sum to zero, which normalize_weights cannot "
                                f"divide by (set normalize_weights: false or change the weights)")
    if spec.sparsify == "della_magprune":
        for p in per_model:
            if 0 < p["density"] < 1 and not (0 < p["density"] - p["epsilon"] and p["density"] + p["epsilon"] < 1):
                raise EvomergeError(f"{spec.name}: density +- epsilon must lie in (0, 1) for {job.name} "
                                    f"(density {p['density']}, epsilon {p['epsilon']})")


def resolve_all(plan: MergePlan, recipe: Recipe) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """``resolve_job_parameters`` for every job, in plan order (raises on the first invalid value)."""
    return [resolve_job_parameters(plan, recipe, job) for job in plan.jobs]


# ------------------------------------------------------------------------------------------------ running


def merge_job(plan: MergePlan, job: TensorJob, tensors: list[torch.Tensor], shared: dict[str, Any],
              per_model: list[dict[str, Any]], out: torch.Tensor, *, seed: int, ws: Workspace) -> torch.Tensor:
    """Merge one job's (already loaded) source tensors into ``out`` (compute dtype); the CLI's path.

    ``tensors`` is consumed (emptied once the task vectors exist), so the raw sources' memory is freed early."""
    if not job.floating:
        out.copy_(tensors[0])
        return out
    prepared = prepare_inputs(plan.spec, tensors, job.base_pos, lazy=True)
    tensors.clear()  # consumed: what the kernel needs is in `prepared` (base and task vectors); the rest goes now
    generator = job_generator(plan.spec, job, seed, out.device)
    return run_method(plan.spec, prepared, shared, per_model, out, generator=generator, ws=ws)


def job_generator(spec: MethodSpec, job: TensorJob, seed: int, device: torch.device) -> torch.Generator | None:
    """The random generator of one job's drops (seeded by ``tensor_seed``), or None for deterministic methods."""
    if not spec.random:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(tensor_seed(seed, job.name))
    return generator


def _merged_tensors(plan: MergePlan, params: list, device: torch.device, seed: int, progress: bool,
                    threads: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, merged tensor) in plan order. Tensors are read here; with ``threads`` > 1 on CPU, merged by a
    small pool (one torch thread each, at most ``threads + 1`` tensors in flight, so memory stays bounded)."""
    local = threading.local()

    def work(index: int, tensors: list[torch.Tensor]) -> tuple[str, torch.Tensor]:
        """(name, merged tensor in its output dtype, on CPU) of job ``index``."""
        job = plan.jobs[index]
        ws = getattr(local, "ws", None)
        if ws is None:
            ws = local.ws = Workspace(device)
        shared, per_model = params[index]
        out = torch.empty(job.shape, dtype=job.compute_dtype, device=device)
        merge_job(plan, job, tensors, shared, per_model, out, seed=seed, ws=ws)
        return job.name, out.to(plan.out_dtype_for(job)).cpu()

    yield from map_jobs(plan, work, device, threads if device.type == "cpu" else 1, "merging tensors", progress)


def load_job_sources(plan: MergePlan, index: int, device: torch.device) -> list[torch.Tensor]:
    """The source tensors of job ``index``, read from the checkpoints onto ``device`` in its compute dtype."""
    job = plan.jobs[index]
    tensors = [plan.checkpoints[m].get(name, device=device, dtype=job.compute_dtype if job.floating else None)
               for m, name in job.sources]
    if job.vocab:
        vocabulary = plan.tokenizer.vocabulary
        assert vocabulary is not None, f"{job.name}: a vocabulary job implies a vocabulary plan"
        tensors = vocabulary.align([plan.models[m] for m, _ in job.sources], tensors)
    return tensors


def map_jobs(plan: MergePlan, fn, device: torch.device, threads: int, desc: str, progress: bool) -> Iterator[Any]:
    """``fn(index, sources)`` for every job of the plan, results yielded in job order, with a progress bar.

    Sources are read on the calling thread (sequential I/O); with ``threads > 1`` the calls run on a thread pool
    of one torch thread each (the merge kernels are too fine-grained for torch's intra-op threads), and at most
    ``threads + 1`` jobs' sources are held at once."""
    bar = tqdm(total=len(plan.jobs), desc=desc, unit="tensor", disable=not progress)
    if threads <= 1:
        for index in range(len(plan.jobs)):
            yield fn(index, load_job_sources(plan, index, device))
            bar.update()
        bar.close()
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            pending: deque = deque()
            for index in range(len(plan.jobs)):
                pending.append(pool.submit(fn, index, load_job_sources(plan, index, device)))
                if len(pending) > threads:
                    yield pending.popleft().result()
                    bar.update()
            while pending:
                yield pending.popleft().result()
                bar.update()
    finally:
        torch.set_num_threads(previous)
        bar.close()


def check_device(device: str) -> torch.device:
    """``device`` as a ``torch.device``.

    Raises:
        EvomergeError: the name is not a device, is neither CPU nor CUDA, or CUDA is not available.
    """
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EvomergeError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvomergeError("--device cuda was asked for but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise EvomergeError(f"unsupported device {device!r}; use cpu or cuda")
    return dev


def run_merge(recipe: Recipe, out_dir: str | Path, *, device: str = "cpu", seed: int = 0, overwrite: bool = False,
              allow_pickle: bool = False, shard_size: str | int = "2GB", progress: bool = True,
              threads: int | None = None) -> Path:
    """Merge ``recipe`` into a checkpoint folder at ``out_dir`` (written atomically); returns it.

    Per-tensor methods stream: one output tensor's sources are read (memory-mapped), merged in the recipe's
    compute ``dtype`` (default: the sources' own, promoted) and written in ``out_dtype`` (default: the compute
    dtype), so peak memory is a few tensors, not a model. Data-aware methods (fisher, regmean) load each model
    whole and run its calibration texts. The folder gets ``config.json`` (layer count and dtype updated), the
    safetensors shards and index, the tokenizer files, ``recipe.yaml`` and a model card.

    Args:
        recipe: a validated recipe (``Recipe.load``).
        out_dir: the checkpoint folder to create.
        device: ``"cpu"`` or ``"cuda"``/``"cuda:N"``: where tensors are merged (CPU and CUDA random drops differ).
        seed: seed of the random drops (DARE, DELLA) and calibration sampling; each tensor's generator is
            seeded from it and the tensor name.
        overwrite: replace an existing ``out_dir``.
        allow_pickle: also read ``.bin`` (pickle) weights, with ``torch.load(weights_only=True)``.
        shard_size: largest safetensors shard, bytes or a string such as ``"2GB"`` / ``"500MB"``.
        progress: show a progress bar on stderr.
        threads: tensors merged in parallel on CPU (default: torch's thread count); results do not depend on it.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        EvomergeError: ``out_dir`` exists without ``overwrite``, the device is unknown or unavailable, the sources
            cannot be merged (see ``plan_merge``), or a parameter value is invalid for some tensor (checked for
            every tensor before anything is computed or written). Nothing is left at ``out_dir`` on failure.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise EvomergeError(f"output folder {out_dir} already exists (pass --overwrite to replace it)")
    dev = check_device(device)
    if recipe.is_data_aware:
        return _run_data_aware(recipe, out_dir, dev, seed, overwrite, allow_pickle, shard_size)
    plan = plan_merge(recipe, allow_pickle=allow_pickle)
    params = resolve_all(plan, recipe)  # every bad value fails here, before any work
    recipe_yaml = recipe.to_yaml()
    sources = [str(p) for p in plan.models]
    threads = torch.get_num_threads() if threads is None else max(1, int(threads))
    with tokenizer_folder(plan.tokenizer) as tokenizer_dir:
        return write_checkpoint(out_dir, _merged_tensors(plan, params, dev, seed, progress, threads), plan.config,
                                tokenizer_dir=tokenizer_dir, recipe_yaml=recipe_yaml,
                                model_card=model_card(recipe_yaml, sources, recipe.merge_method),
                                max_shard_size=shard_size, overwrite=overwrite,
                                generation_config=plan.generation_config)


def _run_data_aware(recipe: Recipe, out_dir: Path, device: torch.device, seed: int, overwrite: bool,
                    allow_pickle: bool, shard_size: str | int) -> Path:
    table = DATA_AWARE_METHODS[recipe.merge_method]
    paths, checkpoints = open_checkpoints(recipe, allow_pickle)
    base = recipe.resolve_path(recipe.base_model) if recipe.base_model else None
    model_paths = [recipe.resolve_path(m.model) for m in recipe.models]
    per_model = [{**table.get("per_model", {}), **m.parameters} for m in recipe.models]
    params = {**table.get("global", {}), **recipe.parameters}
    calibration = {**CALIBRATION_DEFAULTS, **(recipe.calibration or {})}
    if isinstance(calibration.get("path"), str):
        calibration["path"] = str(recipe.resolve_path(calibration["path"]))
    for pm in per_model:
        if isinstance(pm.get("calibration"), str):
            pm["calibration"] = str(recipe.resolve_path(pm["calibration"]))
    merged = merge_data_aware(recipe.merge_method, base, model_paths, per_model, params, calibration,
                              str(device), seed)
    reference = checkpoints[paths.index(base)] if base is not None else checkpoints[paths.index(model_paths[0])]
    config = dict(reference.config)
    out_dtype = parse_dtype(recipe.out_dtype) or parse_dtype(recipe.dtype)
    recipe_yaml = recipe.to_yaml()
    tensors = ((name, t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t)
               for name, t in merged.items())
    return write_checkpoint(out_dir, tensors, config, tokenizer_dir=recipe.tokenizer_path(), recipe_yaml=recipe_yaml,
                            model_card=model_card(recipe_yaml, [str(p) for p in paths], recipe.merge_method),
                            max_shard_size=shard_size, overwrite=overwrite,
                            generation_config=find_generation_config(recipe.tokenizer_path(), reference.path))
