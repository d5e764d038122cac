"""The trial worker: one per GPU (or CPU slot), sources resident, one preallocated candidate, many trials.

``TrialRunner`` is a plain class (usable without Ray); ``TrialWorker`` is the Ray actor around it. A worker
is set up once per stage: for PS it builds a ``MergeEngine`` (sources loaded once, one model written in
place per trial); for DFS it loads models A and B once and rewires a ``DataflowCandidate`` per trial. Every
trial returns a ``TrialResult``; a candidate that raises, runs out of memory or scores NaN comes back as
``status: failed`` with the reason, and the worker stays usable.

Sources reach the worker either by path (a shared file system) or, with ``workers.sources: object_store``,
as file blobs put in Ray's object store by the driver and copied once per node (node_sources.py).
"""

from __future__ import annotations

import dataclasses
import math
import os
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import ray
import torch
import transformers
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.evaluators import build_evaluator
from evomerge.memory_plan import MemoryOptions
from evomerge.merge import recipe_structure
from evomerge.recipe import Recipe
from evomerge.search.candidates import Candidate, LayerPath
from evomerge.search.dataflow import DataflowCandidate
from evomerge.search.experiment import EvaluatorSpec
from evomerge.search.fitness import FitnessConfig, FitnessMode, FitnessPlan, ItemRun, complete, minibatch, promote, race
from evomerge.search.node_sources import drop_node_copies, node_source_copy
from evomerge.search.objectives import Objective, scalarize
from evomerge.search.records import TrialResult, TrialStatus


@dataclass(frozen=True)
class Scores:
    """A candidate's metrics {"EVALUATOR/METRIC": value}, the item evaluations they took (None: an evaluator
    does not count items) and whether they cover the whole search split."""

    metrics: dict[str, float]
    items: int | None
    full: bool = True


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker is built with, once per stage.

    Attributes:
        kind: ``ps`` or ``dfs``.
        initial: the stage's starting candidate (its models are loaded once from it).
        evaluators: the experiment's evaluators.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``; threads: torch's CPU threads.
        devices_per_worker: devices the PS engine spans (``cuda:0..N-1`` of those Ray gave the worker, or
            ``cpu`` N times), its layers placed across them (``evomerge/placement.py``).
        dtype: the candidates' torch dtype name (``float32``, ``float16``, ``bfloat16``; None: the sources').
        memory: the PS engine's device budget and sources mode (``workers.device_memory_gb``,
            ``workers.sources_mode``).
        python_path: folders custom evaluators import from.
        fitness: the experiment's ``fitness:`` (cheap fitness needs evaluators that score single items).
        objectives: the experiment's objectives (which evaluators the cheap fitness scores).
        blobs: {model folder: object ref of its files} with ``workers.sources: object_store``, else None.
        worker: this worker's id.
    """

    kind: str
    initial: Candidate
    evaluators: list[EvaluatorSpec]
    device: str = "auto"
    devices_per_worker: int = 1
    threads: int = 1
    dtype: str | None = None
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    python_path: list[str] = field(default_factory=list)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    objectives: tuple[Objective, ...] = ()
    blobs: dict[str, Any] | None = None
    worker: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """A worker's answer once set up: ``error`` (None when ready), its metric names, where it runs (``node``:
    its Ray node id)."""

    error: str | None
    metric_names: list[str]
    pid: int
    host: str
    device: str | None
    node: str = ""

    def check(self, objectives: Sequence[Objective]) -> None:
        """Raise when the worker could not be set up, or an objective is not among its metrics.

        Raises:
            EvomergeError: the setup error, or the first objective whose metric no evaluator reports.
        """
        if self.error is not None:
            raise EvomergeError(self.error)
        missing = [o.metric for o in objectives if o.metric not in self.metric_names]
        if self.metric_names and missing:
            raise EvomergeError(f"objective {missing[0]} is not a metric of the evaluators "
                                f"(they report: {', '.join(self.metric_names)})")


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; other values as given."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def worker_devices(device: str, count: int) -> list[str]:
    """The devices one worker spans: ``device`` alone, or ``count`` of them (``cuda:0``... of the GPUs this
    process sees, which Ray restricts to the worker's own; ``cpu`` repeated on CPU).

    Raises:
        EvomergeError: fewer CUDA devices are visible than ``count``.
    """
    if count <= 1:
        return [device]
    if device == "cpu":
        return ["cpu"] * count
    visible = torch.cuda.device_count()
    if visible < count:
        raise EvomergeError(f"workers.devices_per_worker {count}: this worker sees {visible} CUDA devices")
    return [f"cuda:{i}" for i in range(count)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class TrialRunner:
    """Materializes and scores candidates of one search stage (see module docstring)."""

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.error: str | None = None
        self.metric_names: list[str] = []
        self.path_map: dict[str, str] = {}
        self.device = resolve_device(setup.device)
        self.engine: MergeEngine | None = None
        self.dataflow: DataflowCandidate | None = None
        self.tokenizer: Any = None
        self.evaluators: list[tuple[str, Any]] = []
        try:
            self._init()
        except EvomergeError as exc:
            self.error = str(exc)
        except Exception as exc:  # reported to the driver, which stops with this line
            self.error = f"worker setup failed: {_one_line(exc)}"
            traceback.print_exc()

    def _init(self) -> None:
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
            os.environ.setdefault(key, "1")
        transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
        for p in reversed(self.setup.python_path):
            if p not in sys.path:
                sys.path.insert(0, p)
        torch.set_num_threads(int(self.setup.threads))
        if self.setup.blobs:
            self._unpack_blobs(self.setup.blobs)
        initial = self._local(self.setup.initial)
        if isinstance(initial, Recipe):
            devices = worker_devices(self.device, self.setup.devices_per_worker)
            self.engine = MergeEngine(initial, device=devices, memory=self.setup.memory)
            self.engine.model.eval()
            self.tokenizer = self.engine.tokenizer
        else:
            dtype = getattr(torch, self.setup.dtype) if self.setup.dtype else "auto"  # None: the sources' dtype
            load: dict[str, Any] = dict(dtype=dtype, use_safetensors=True)
            auto: Any = AutoModelForCausalLM  # transformers' stubs mistype from_pretrained's first argument
            model_a = auto.from_pretrained(initial.a, **load).to(self.device).eval()
            model_b = auto.from_pretrained(initial.b, **load).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(initial.a)
            self.dataflow = DataflowCandidate(model_a, model_b)
        for ev in self.setup.evaluators:
            built = build_evaluator(ev.spec, limit=ev.limit, seed=ev.seed)
            self.evaluators.append((ev.name, built))
            self.metric_names += [f"{ev.name}/{m}" for m in getattr(built, "metric_names", [])]
        if self.setup.fitness.mode != FitnessMode.FULL:
            for name in self._objective_evaluators():
                ev = dict(self.evaluators)[name]
                if not getattr(ev, "scores_items", False):
                    raise EvomergeError(f"fitness: {self.setup.fitness.mode.value} needs per-item scores, and "
                                        f"evaluator {name} cannot score a subset of its items (use a math_word "
                                        "evaluator, a one-task lm_eval one, or a custom function that takes items=)")

    def _objective_evaluators(self) -> list[str]:
        """The names of the evaluators the objectives read, in evaluator order."""
        wanted = {o.metric.split("/", 1)[0] for o in self.setup.objectives}
        return [name for name, _ in self.evaluators if name in wanted]

    def _unpack_blobs(self, blobs: dict[str, Any]) -> None:
        """Source folders shipped through Ray's object store, as local folders of this node (see
        ``node_source_copy``: the first worker of a node fetches and writes them, the others reuse them)."""
        node = ray.get_runtime_context().get_node_id()
        for orig, ref in sorted(blobs.items()):
            self.path_map[orig] = str(node_source_copy(orig, ref, node))

    def drop_sources(self) -> int:
        """Remove this node's copies of the stage's source folders (``workers.sources: object_store``; called on
        one worker per node once the stage's search ended). Returns how many were removed."""
        if not self.setup.blobs or not ray.is_initialized():
            return 0
        keys = [str(ref.hex()) for ref in self.setup.blobs.values()]
        return drop_node_copies(keys, ray.get_runtime_context().get_node_id())

    def _local(self, candidate: Candidate) -> Candidate:
        """The candidate with model folders shipped as blobs replaced by their local copies."""
        if not self.path_map:
            return candidate
        if isinstance(candidate, LayerPath):
            return dataclasses.replace(candidate, a=self.path_map.get(candidate.a, candidate.a),
                                       b=self.path_map.get(candidate.b, candidate.b))
        mapping = candidate.to_dict()
        if mapping.get("base_model") in self.path_map:
            mapping["base_model"] = self.path_map[mapping["base_model"]]
        local = self.path_map.get
        if "models" in mapping:
            mapping["models"] = [dict(m, model=local(m["model"], m["model"])) for m in mapping["models"]]
        for item in mapping.get("slices", []):  # a sliced PS candidate (filters over layer groups)
            item["sources"] = [dict(src, model=local(src["model"], src["model"])) for src in item["sources"]]
            if "base_model" in item:
                item["base_model"] = local(item["base_model"], item["base_model"])
        return Recipe.from_dict(mapping, source="the candidate recipe")

    def ready(self) -> WorkerInfo:
        """Whether setup worked (``error``), and the metric names the evaluators declare."""
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        return WorkerInfo(self.error, list(self.metric_names), os.getpid(), socket.gethostname(), self.device, node)

    def materialize(self, candidate: Candidate) -> nn.Module:
        """The candidate's model (written in place into the worker's one preallocated model)."""
        candidate = self._local(candidate)
        if isinstance(candidate, LayerPath):
            assert self.dataflow is not None
            return self.dataflow.set_path(candidate.layers, candidate.scales)
        assert self.engine is not None and isinstance(candidate, Recipe)
        if recipe_structure(candidate) != self.engine.plan.structure:
            # other sources than the engine holds (select: top_two picks each group's pair per candidate): the
            # old engine goes first, then one for these sources is built (loads them; slower than in place)
            self.engine = None
            self.engine = MergeEngine(candidate, device=self.device, memory=self.setup.memory)
            self.engine.model.eval()
        model: nn.Module = self.engine.materialize(candidate)
        return model

    def evaluate(self, trial: int, candidate: Candidate, plan: FitnessPlan | None = None) -> TrialResult:
        """Materialize and score one candidate; any failure is a failed result, never an exception.

        Args:
            trial: the trial id.
            candidate: a ``Recipe`` (PS) or ``LayerPath`` (DFS).
            plan: how much of the search split to score it on (None: all of it; see search/fitness.py).

        Returns:
            The metrics {"EVALUATOR/METRIC": float} with status ok, or status failed with a one-line error
            (an exception, out of memory, or a non-finite metric); times in seconds.
        """
        metrics: dict[str, float] = {}
        scores = Scores({}, None)
        error: str | None = None
        t0 = time.perf_counter()
        t1 = t0
        try:
            if self.error:
                raise RuntimeError(self.error)
            with torch.inference_mode():
                model = self.materialize(candidate)
                t1 = time.perf_counter()
                scores = self._score(model, plan)
                metrics = scores.metrics
            bad = [k for k, v in metrics.items() if not math.isfinite(v)]
            if bad:
                error = f"metric {bad[0]} is {metrics[bad[0]]}"
        except torch.OutOfMemoryError as exc:
            error = f"out of memory: {_one_line(exc)}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as exc:
            text = str(exc)
            oom = isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
            error = ("out of memory: " if oom else "") + _one_line(exc)
        t2 = time.perf_counter()
        return TrialResult(trial=trial, status=TrialStatus.FAILED if error else TrialStatus.OK, metrics=metrics,
                           error=error, worker=self.setup.worker, host=socket.gethostname(), pid=os.getpid(),
                           seconds=t2 - t0, materialize_s=t1 - t0, evaluate_s=t2 - t1, items=scores.items,
                           full=scores.full)

    def _score(self, model: nn.Module, plan: FitnessPlan | None) -> Scores:
        """Every evaluator on every item (``full``), or the plan's cheap fitness on the objectives' evaluators
        and, when that reaches the whole split, the other evaluators in full."""
        if plan is None or plan.config.mode == FitnessMode.FULL:
            return self._score_full(model, [name for name, _ in self.evaluators])
        names = self._objective_evaluators()
        evs = dict(self.evaluators)
        if plan.config.mode == FitnessMode.RACE:
            runs = {names[0]: race(evs[names[0]], model, self.tokenizer, plan)}
        else:
            runs = {n: minibatch(evs[n], model, self.tokenizer, plan) for n in names}
            if promote(self._estimate(runs, plan), plan.reference):
                runs = {n: complete(evs[n], model, self.tokenizer, r) for n, r in runs.items()}
        metrics = {f"{n}/{k}": v for n, r in runs.items() for k, v in r.scores.means().items()}
        items = sum(len(r.scores) for r in runs.values())
        if not all(r.full for r in runs.values()):
            return Scores(metrics, items, full=False)
        rest = self._score_full(model, [n for n, _ in self.evaluators if n not in runs])
        return Scores({**metrics, **rest.metrics}, None if rest.items is None else items + rest.items)

    def _score_full(self, model: nn.Module, names: Sequence[str]) -> Scores:
        metrics: dict[str, float] = {}
        items: int | None = 0
        for name, ev in self.evaluators:
            if name not in names:
                continue
            for k, v in ev.evaluate(model, self.tokenizer).items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    metrics[f"{name}/{k}"] = float(v)
            n = getattr(ev, "n_items", None)
            items = None if items is None or n is None else items + int(n)
        return Scores(metrics, items)

    @staticmethod
    def _estimate(runs: dict[str, ItemRun], plan: FitnessPlan) -> float:
        """The weighted score of the objectives on the mini-batch (a missing metric counts as -inf)."""
        metrics = {f"{n}/{k}": v for n, r in runs.items() for k, v in r.scores.means().items()}
        if any(o.metric not in metrics for o in plan.objectives):
            return -math.inf
        return scalarize([metrics[o.metric] for o in plan.objectives], plan.objectives)


@dataclass(frozen=True)
class WorkerResources:
    """The Ray resources of one worker: ``cpus`` and ``gpus`` (may be fractional), and custom resources
    {name: amount} that place it on the nodes offering them (``workers.resources``)."""

    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)


def make_worker_class(resources: WorkerResources) -> Any:
    """The Ray actor class with this run's resources (one candidate at a time, never restarted by Ray:
    the driver replaces a dead worker itself and retries its candidate elsewhere)."""

    remote: Any = ray.remote  # Ray's stubs lack the actor options (max_concurrency)
    return remote(num_cpus=resources.cpus, num_gpus=resources.gpus, resources=dict(resources.custom) or None,
                  max_restarts=0, max_concurrency=1)(TrialWorker)


class TrialWorker(TrialRunner):
    """The class the Ray actor is made of (named apart from ``TrialRunner`` in Ray's logs and dashboard)."""
