"""The in-memory merge engine the search calls: sources loaded once, one model, candidates written in place.

``MergeEngine(recipe)`` plans the recipe exactly like ``evomerge merge`` (same jobs, same parameter
resolution), then loads every source tensor once onto the device and keeps what does not change between
candidates: the base and the task vectors ``theta_i - base`` of the task-arithmetic family, plus their
sparsification statistics (the sort order of ``|delta|`` that turns TIES' top-k into a threshold lookup,
DELLA's magnitude ranks). It builds ONE transformers model (``AutoModelForCausalLM.from_config``, no remote
code) whose parameters are the output buffers.

``materialize(recipe)`` resolves the candidate's parameters per tensor and runs the same kernels as
``evomerge merge`` straight into the model's parameters, with temporaries from one reused ``Workspace``: no
model-sized allocation per candidate, no disk. Because the kernels and the per-tensor random seeds are the
same, materializing a recipe and saving gives the same tensors as ``evomerge merge`` on that recipe (on the
same device), and the same recipe twice gives bit-identical weights.

A candidate must keep the engine's method, sources, layer ranges and dtypes; only parameters may change
(scalars, gradients or filter lists, as in mergekit).

Memory (``evomerge/memory_plan.py``, docs/MEMORY.md): the engine plans its bytes per tensor before loading
anything. Tensors whose sources do not fit the device budget (``MemoryOptions.device_memory_gb``; by default a
CUDA device's free memory, no cap on CPU) are *streamed*: nothing of them is kept, and each candidate reads
their sources from the checkpoints (host memory / page cache) and merges them with the one-shot kernels of
``evomerge merge``, which give the same tensors as the resident path. When not even the candidate fits, the
engine refuses with an ``EvomergeError``.

Several devices (``device=["cuda:0", "cuda:1"]``, experiment key ``workers.devices_per_worker``): the layers
are placed across them (``evomerge/placement.py``: embeddings with the first blocks, head with the last,
balanced by bytes against each device's cap), each tensor's sources are loaded and merged on its layer's
device, the model is built without memory (accelerate's ``init_empty_weights``) and each parameter allocated on
its device, and accelerate's hooks (``dispatch_model``) move the hidden states between devices during evaluation.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate import dispatch_model, init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from evomerge.architecture import checkpoint_tensors, resolve
from evomerge.checkpoint import model_card, write_checkpoint
from evomerge.errors import EvomergeError
from evomerge.memory_plan import MemoryOptions, MemoryPlan, device_budget, plan_memory
from evomerge.merge import (
    MergePlan,
    check_device,
    job_generator,
    load_job_sources,
    plan_merge,
    recipe_structure,
    resolve_job_parameters,
)
from evomerge.method_registry import get_method
from evomerge.methods import PreparedInputs, Workspace, prepare_inputs, run_method
from evomerge.placement import Placement, check_devices, device_map, plan_placement
from evomerge.recipe import ModelEntry, Recipe
from evomerge.vocabulary import tokenizer_folder


class MergeEngine:
    """Sources loaded once; ``materialize(recipe)`` writes a candidate into ``self.model`` in place.

    Memory: the resident sources in the compute dtype (the base plus one task vector per model for the
    task-arithmetic family, with an int32 sort order per vector for magnitude sparsification), one model, and
    kernel scratch (``source_bytes``, ``workspace_bytes``); tensors the device budget cannot hold are streamed (read
    per candidate, see ``memory``). Attributes: ``model`` (a ``transformers`` causal LM on ``device`` whose
    parameters are the merge's output tensors, in the recipe's ``out_dtype`` or compute dtype), ``plan`` (the
    ``MergePlan`` shared with ``evomerge merge``), ``spec`` (the method), ``memory`` (the ``MemoryPlan``: which
    tensors are resident, planned bytes).
    """

    def __init__(self, recipe: Recipe | Mapping[str, Any], device: str | torch.device | Sequence[str] = "cpu", *,
                 allow_pickle: bool = False, seed: int = 0, progress: bool = False, threads: int | None = None,
                 memory: MemoryOptions | None = None):
        """Plan ``recipe``, load its sources once, build the model and materialize ``recipe`` into it.

        Args:
            recipe: a per-tensor recipe (a ``Recipe`` or its mergekit mapping); later candidates may change its
                parameters only.
            device: ``"cpu"`` or a CUDA device; sources, model and kernels live there. A list of devices
                (distinct CUDA devices, or ``"cpu"`` repeated) spans them: layers placed across them
                (``placement``), each tensor merged on its layer's device, evaluation through accelerate's hooks.
            allow_pickle: also read ``.bin`` (pickle) checkpoints, with ``torch.load(weights_only=True)``.
            seed: default seed of the random drops (DARE, DELLA); one generator per tensor, seeded from it and
                the tensor name, so results do not depend on tensor order or ``threads``.
            progress: show a progress bar while the sources load.
            threads: CPU threads merging tensors in parallel (default: torch's thread count); results do not
                depend on it.
            memory: the device budget in GiB (per device; default: a CUDA device's free memory, no cap on CPU),
                the sources mode (``auto``, ``resident`` or ``streamed``) and whether TIES keeps its sort orders
                (``MemoryOptions``; docs/MEMORY.md).

        Raises:
            EvomergeError: the recipe is invalid or data-aware (fisher, regmean), the device is unknown or
                unavailable, the sources cannot be merged (see ``plan_merge``), or the budget cannot hold even a
                streamed candidate.
        """
        if not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe)
        if recipe.is_data_aware:
            raise EvomergeError(f"the in-memory engine does not run data-aware method {recipe.merge_method!r}; "
                                f"use 'evomerge merge'")
        names = [str(device)] if isinstance(device, (str, torch.device)) else [str(d) for d in device]
        self.devices = [check_device(d) for d in check_devices(names)]
        self.device = self.devices[0]  # the first layers', embeddings' and inputs' device
        self.recipe = recipe
        self.seed = seed
        self.plan: MergePlan = plan_merge(recipe, allow_pickle=allow_pickle)
        self.spec = self.plan.spec
        # CPU: tensors are merged by `threads` Python threads running one torch thread each (the chunked
        # kernels are too fine-grained for torch's intra-op threads). Results never depend on the thread count.
        self.threads = 1 if self.device.type != "cpu" else max(1, threads or torch.get_num_threads())
        memory = memory or MemoryOptions()
        self.keep_order = memory.keep_order
        self.placement: Placement | None = None
        if len(self.devices) > 1:
            self.placement = plan_placement(self.plan, names, threads=self.threads, memory=memory)
            self.memory: MemoryPlan = self.placement.total()
            self._job_device = [self.devices[slot] for slot in self.placement.job_slots]
            self._keep_order = [self.placement.memory[slot].keep_order for slot in self.placement.job_slots]
        else:
            budget = device_budget(self.device, memory.device_memory_gb)
            if memory.device_memory_gb is None and self.device.type == "cpu":
                budget = None  # host memory: no cap unless one is configured
            self.memory = plan_memory(self.plan, budget=budget, threads=self.threads,
                                      sources=memory.sources, keep_order=memory.keep_order)
            self._job_device = [self.device] * len(self.plan.jobs)
            self._keep_order = [self.memory.keep_order] * len(self.plan.jobs)
        self._prepared: list[PreparedInputs | None] = [None] * len(self.plan.jobs)
        self._raw_first: list[torch.Tensor | None] = [None] * len(self.plan.jobs)  # non-floating: first source's
        self._local = threading.local()
        self._workspaces: list[Workspace] = []
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None
        self._load_sources(progress)
        # biggest tensors first, so the pool's threads finish together
        self._schedule = sorted(range(len(self.plan.jobs)), key=lambda i: -math.prod(self.plan.jobs[i].shape))
        self.model = self._build_model()
        self._targets = self._bind_targets() if self.placement is None else self._place_targets()
        self._tokenizer: Any = None  # loaded on first use (the `tokenizer` property)
        self.materialize(recipe)

    # ------------------------------------------------------------------ construction

    def _load_sources(self, progress: bool) -> None:
        """Read the resident jobs' sources once (sequentially: I/O) and precompute deltas and sort orders (in
        parallel on CPU: the sorts dominate the engine's start-up). Streamed jobs are read per candidate."""
        indices = [i for i, keep in enumerate(self.memory.resident) if keep]
        bar = tqdm(total=len(indices), desc="loading sources", unit="tensor", disable=not progress)

        def prepare(index: int, tensors: list[torch.Tensor]) -> None:
            """Keep job ``index``'s prepared inputs (floating tensors) or its first source (others)."""
            self._prepared[index], self._raw_first[index] = self._prepare(index, tensors,
                                                                          lazy=not self._keep_order[index])
            bar.update()

        try:
            self._run_each(indices, prepare, load=True)
        finally:
            bar.close()

    def _prepare(self, index: int, tensors: list[torch.Tensor],
                 lazy: bool) -> tuple[PreparedInputs | None, torch.Tensor | None]:
        job = self.plan.jobs[index]
        if job.floating:
            return prepare_inputs(self.spec, tensors, job.base_pos, lazy=lazy), None
        return None, tensors[0]

    def _run_each(self, indices: Sequence[int], fn, load: bool) -> None:
        """``fn(index)`` (``fn(index, sources)`` with ``load``) for each index, on the pool when there is one;
        with ``load`` the sources are read on this thread and at most ``threads + 1`` jobs' are held at once."""
        if self._pool is None:
            for index in indices:
                fn(index, load_job_sources(self.plan, index, self._job_device[index])) if load else fn(index)
            return
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if not load:
                for _ in self._pool.map(fn, indices):
                    pass
                return
            pending = []
            for index in indices:
                sources = load_job_sources(self.plan, index, self._job_device[index])
                pending.append(self._pool.submit(fn, index, sources))
                if len(pending) > self.threads:
                    pending.pop(0).result()
            for future in pending:
                future.result()
        finally:
            torch.set_num_threads(previous)

    @classmethod
    def from_models(cls, base_model: str | Path | None, models: Sequence[str | Path], method: str = "ties",
                    device: str | torch.device = "cpu", *, parameters: Mapping[str, Any] | None = None,
                    model_parameters: Sequence[Mapping[str, Any]] | None = None, dtype: str | None = None,
                    **kwargs: Any) -> MergeEngine:
        """An engine from paths: per-model parameters default to weight 1.0 (and mergekit's other defaults).

        Args:
            base_model: the base checkpoint folder (None for methods without a base, e.g. linear).
            models: the other checkpoint folders.
            method: a per-tensor merge method (``evomerge.method_registry.method_names``).
            device: as for ``MergeEngine``.
            parameters: global parameters of the recipe.
            model_parameters: per-model parameters, one mapping per entry of ``models``.
            dtype: compute dtype (``"float32"``, ``"bfloat16"``...; default: the sources' own).
            **kwargs: the other keyword arguments of ``MergeEngine``.

        Returns:
            The engine, with the recipe materialized.

        Raises:
            EvomergeError: an unknown or data-aware method, an invalid parameter, or sources that cannot be merged.
        """
        spec = get_method(method)
        entries = []
        for i, path in enumerate(models):
            params = dict(model_parameters[i]) if model_parameters else {}
            if spec.param("weight") is not None:
                params.setdefault("weight", 1.0)
            entries.append(ModelEntry(model=str(Path(path).resolve()), parameters=params))
        recipe = Recipe(merge_method=method, models=entries,
                        base_model=str(Path(base_model).resolve()) if base_model is not None else None,
                        parameters=dict(parameters or {}), dtype=dtype)
        recipe.validate()
        return cls(recipe, device=device, **kwargs)

    def _build_model(self) -> torch.nn.Module:
        config = dict(self.plan.config)
        model_type = config.pop("model_type", None)
        if model_type is None:
            raise EvomergeError(f"config.json of {self.plan.models[0]} has no model_type")
        for key in ("_name_or_path", "transformers_version", "architectures_map"):
            config.pop(key, None)
        layer_types = config.get("layer_types")
        if isinstance(layer_types, list) and layer_types and len(layer_types) != self.plan.num_layers:
            if len(set(layer_types)) == 1:
                config["layer_types"] = [layer_types[0]] * self.plan.num_layers
        try:
            hf_config = AutoConfig.for_model(model_type, **config)
        except (ValueError, KeyError) as exc:
            raise EvomergeError(f"cannot build a {model_type!r} model from the config: {exc}".splitlines()[0]) from None
        dtype = self._model_dtype()
        if self.placement is not None:  # parameters on no device; _place_targets allocates each on its own
            with init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
        else:
            with torch.device(self.device):
                model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
        if self.plan.generation_config is not None:  # the same stop ids and defaults as the saved merge
            model.generation_config = GenerationConfig.from_pretrained(str(self.plan.generation_config.parent))
        return model.eval()

    def _model_dtype(self) -> torch.dtype:
        floating = [self.plan.out_dtype_for(j) for j in self.plan.jobs if j.floating]
        return max(set(floating), key=floating.count) if floating else torch.float32

    def _bind_targets(self) -> list[torch.Tensor]:

        state = checkpoint_tensors(self.model)  # checkpoint names (GPT-NeoX: embed_out is the lm_head module)
        targets = []
        for job in self.plan.jobs:
            target = state.get(job.name)
            if target is None:
                raise EvomergeError(f"the {type(self.model).__name__} built from the config has no tensor "
                                    f"{job.name!r}")
            if tuple(target.shape) != tuple(job.shape):
                raise EvomergeError(f"the model's {job.name} has shape {list(target.shape)}, "
                                    f"the sources {list(job.shape)}")
            targets.append(target.data)
        return targets

    def _place_targets(self) -> list[torch.Tensor]:
        """Allocate each job's parameter (or buffer) on its placed device, check that the merge writes every
        parameter, and dispatch the model with accelerate's hooks (hidden states follow the layers)."""
        assert self.placement is not None, "only a placed engine allocates its tensors per device"
        state = checkpoint_tensors(self.model)
        owners: dict[int, list[str]] = {}
        for name, tensor in [*self.model.named_parameters(remove_duplicate=False),
                             *self.model.named_buffers(remove_duplicate=False)]:
            owners.setdefault(id(tensor), []).append(name)
        for job, device in zip(self.plan.jobs, self._job_device):
            meta = state.get(job.name)
            if meta is None or tuple(meta.shape) != tuple(job.shape):
                raise EvomergeError(f"the {type(self.model).__name__} built from the config has no tensor "
                                    f"{job.name!r} of shape {list(job.shape)}")
            fresh = torch.empty(job.shape, dtype=meta.dtype, device=device)
            for name in owners.get(id(meta), []):  # a tied tensor: every module that shares it gets the new one
                module_name, _, leaf = name.rpartition(".")
                module = self.model.get_submodule(module_name)
                if leaf in module._parameters:
                    module._parameters[leaf] = torch.nn.Parameter(fresh, requires_grad=False)
                else:
                    module._buffers[leaf] = fresh
        model: Any = self.model  # transformers' stubs type tie_weights as a tensor attribute
        model.tie_weights()  # init_empty_weights re-creates each parameter, so ties are made again here
        missing = [n for n, p in self.model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]
        if missing:
            raise EvomergeError(f"the merge writes no tensor for the model's parameter {missing[0]}, so it cannot "
                                f"be placed across devices")
        arch = resolve(self.plan.config, [job.name for job in self.plan.jobs], self.plan.num_layers)
        mapping = device_map(self.model, arch.blocks, self.placement.layer_slots, self.placement.devices)
        skip = getattr(self.model, "_skip_keys_device_placement", None)  # the cache: each layer keeps its own
        quiet = logging.getLogger("accelerate.big_modeling")  # its "offloaded to the cpu" warning: nothing is
        level = quiet.level  # offloaded here, "cpu" devices are the test stand-in for accelerators
        quiet.setLevel(logging.ERROR)
        try:
            self.model = dispatch_model(self.model, mapping, main_device=self.placement.devices[0],
                                        force_hooks=True, skip_keys=skip)
        finally:
            quiet.setLevel(level)
        placed = checkpoint_tensors(self.model)
        return [placed[job.name].data for job in self.plan.jobs]

    # ------------------------------------------------------------------ public API

    @property
    def tokenizer(self) -> Any:
        """The output's tokenizer (``Recipe.tokenizer_path``), loaded on first use."""
        if self._tokenizer is None:
            built = self.plan.tokenizer.tokenizer
            self._tokenizer = (built if built is not None
                               else AutoTokenizer.from_pretrained(str(self.plan.tokenizer_dir)))
        return self._tokenizer

    @property
    def num_layers(self) -> int:
        """Decoder layers of the merged model (the slices' layers together)."""
        return self.plan.num_layers

    @property
    def source_bytes(self) -> int:
        """Bytes held for the resident sources (base, task vectors, precomputed statistics); 0 when streamed."""
        total = sum(p.nbytes for p in self._prepared if p is not None)
        return total + sum(t.numel() * t.element_size() for t in self._raw_first if t is not None)

    def check_recipe(self, recipe: Recipe) -> None:
        """A candidate may change parameters only: same method, sources, layer ranges and dtypes."""
        if recipe.merge_method != self.recipe.merge_method:
            raise EvomergeError(f"this engine merges with {self.recipe.merge_method}; the candidate asks for "
                                f"{recipe.merge_method}")
        if recipe_structure(recipe) != self.plan.structure:
            mine, theirs = self.plan.structure, recipe_structure(recipe)
            labels = ("merge_method", "base_model", "models", "slices", "dtype", "out_dtype")
            diff = next(label for label, a, b in zip(labels, mine, theirs) if a != b)
            raise EvomergeError(f"the candidate recipe's {diff} differs from the engine's sources "
                                f"(an engine loads its sources once; only parameters may change)")

    def materialize(self, recipe: Recipe | Mapping[str, Any] | None = None, seed: int | None = None) -> torch.nn.Module:
        """Write the merge of ``recipe`` (default: the engine's own) into ``self.model`` in place; returns it.

        Every tensor equals ``evomerge merge``'s for the same recipe and seed on the same device, bit for bit;
        no model-sized memory is allocated (scratch comes from reused workspaces).

        Args:
            recipe: the candidate: a ``Recipe`` or mapping with the engine's method, sources, layer ranges and
                dtypes; only parameters (scalars, gradients, filter lists) may differ. Relative paths in a mapping
                resolve against the engine recipe's folder.
            seed: seed of the random drops for this candidate (default: the engine's).

        Returns:
            ``self.model``, its parameters overwritten (output dtype, on the engine's device).

        Raises:
            EvomergeError: the recipe changes more than parameters, or a parameter value is invalid (checked for
                every tensor before any weight is written, so a failed call leaves the model unchanged).
        """
        if recipe is None:
            recipe = self.recipe
        elif not isinstance(recipe, Recipe):
            recipe = Recipe.from_dict(recipe, root=self.recipe.root)
        self.check_recipe(recipe)
        seed = self.seed if seed is None else seed
        params = [resolve_job_parameters(self.plan, recipe, job) for job in self.plan.jobs]  # fail before writing

        def work(index: int) -> None:
            """Merge job ``index`` into its model parameter."""
            job, prepared, target = self.plan.jobs[index], self._prepared[index], self._targets[index]
            raw = self._raw_first[index]
            device = self._job_device[index]
            if not self.memory.resident[index]:  # streamed: read from host memory, merged one-shot
                prepared, raw = self._prepare(index, load_job_sources(self.plan, index, device), lazy=True)
            if prepared is None:
                assert raw is not None, "a job without prepared inputs is a non-floating one, kept raw"
                target.copy_(raw)
                return
            ws = self._workspace(device)
            shared, per_model = params[index]
            direct = target.dtype == job.compute_dtype and target.is_contiguous()
            out = target if direct else ws.get("engine_out", job.shape, job.compute_dtype)
            generator = job_generator(self.spec, job, seed, device)
            run_method(self.spec, prepared, shared, per_model, out, generator=generator, ws=ws)
            if not direct:
                target.copy_(out)

        with torch.no_grad():
            self._run_each(self._schedule, work, load=False)
        return self.model

    def _workspace(self, device: torch.device) -> Workspace:
        """This thread's scratch on ``device`` (one workspace per thread and device)."""
        spaces = getattr(self._local, "spaces", None)
        if spaces is None:
            spaces = self._local.spaces = {}
        ws = spaces.get(device)
        if ws is None:
            ws = spaces[device] = Workspace(device)
            self._workspaces.append(ws)
        return ws

    @property
    def workspace_bytes(self) -> int:
        """Scratch memory held by the kernels (grows only until the largest tensor has been merged once)."""
        return sum(ws.nbytes for ws in self._workspaces)

    def close(self) -> None:
        """Stop the worker threads (also done when the engine is garbage-collected)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __del__(self) -> None:
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=False)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of the current candidate, in checkpoint naming, for ``write_checkpoint``."""
        for job, target in zip(self.plan.jobs, self._targets):
            yield job.name, target

    def save(self, out_dir: str | Path, recipe: Recipe | None = None, *, overwrite: bool = False,
             max_shard_size: str | int = "2GB") -> Path:
        """Materialize ``recipe`` (if given) and write the model as ``evomerge merge`` would.

        Args:
            out_dir: the checkpoint folder to create (written atomically: a temporary folder renamed at the end).
            recipe: a candidate, materialized first; without one the model is written as it is now (the last
                candidate materialized), with the engine's own recipe in ``recipe.yaml`` and the model card.
            overwrite: replace an existing ``out_dir``.
            max_shard_size: largest safetensors shard, bytes or a string such as ``"2GB"``.

        Returns:
            ``out_dir`` as a ``Path``.

        Raises:
            EvomergeError: ``out_dir`` exists (without ``overwrite``) or cannot be written, or ``recipe`` is not a
                valid candidate for this engine.
        """
        if recipe is not None:
            self.materialize(recipe)
        recipe = recipe or self.recipe
        recipe_yaml = recipe.to_yaml()
        with tokenizer_folder(self.plan.tokenizer) as tokenizer_dir:
            return write_checkpoint(out_dir, self.tensors(), self.plan.config, tokenizer_dir=tokenizer_dir,
                                    recipe_yaml=recipe_yaml,
                                    model_card=model_card(recipe_yaml, [str(p) for p in self.plan.models],
                                                          recipe.merge_method),
                                    max_shard_size=max_shard_size, overwrite=overwrite,
                                    generation_config=self.plan.generation_config)
