"""How much memory one search worker's merge engine needs, and which sources it keeps resident.

The in-memory engine (``evomerge/engine.py``) keeps, per output tensor, what does not change between
candidates: the base, the task vectors ``theta_i - base`` (task-arithmetic family) or the raw sources (linear,
slerp, model_stock, passthrough), and for the magnitude methods (ties, breadcrumbs, breadcrumbs_ties) the int32
sort order of every ``|delta|`` that turns the top-k into a threshold lookup; DELLA keeps its per-row magnitude
ranks. On top come the candidate model itself (written in place) and per-thread scratch for the largest tensor.

When the resident sources do not fit the device budget (``workers.device_memory_gb``, or what the device has),
the plan keeps as many tensors resident as fit, in job order, and *streams* the rest: their sources stay in the
host's page cache (memory-mapped checkpoints) and are read tensor by tensor into each candidate, merged with
the one-shot kernels of ``evomerge merge`` (bit-identical to the resident path). When not even the candidate
and the scratch fit, nothing can run and the plan says so in one line (``EvomergeError``, exit 2).

Bytes per source parameter (``P`` = parameters of one model, ``M`` = models besides the base, ``s`` = bytes of
the compute dtype, 2 for bf16): resident task-arithmetic sources are ``(1 + M) * s * P``, plus ``4 * M * P``
for the magnitude sort orders, ``M * s * P`` for DELLA's ranks; see docs/MEMORY.md for the measured figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from evomerge.errors import EvomergeError
from evomerge.merge import MergePlan, TensorJob, plan_merge
from evomerge.methods import MethodSpec
from evomerge.recipe import Recipe

GB = 1024**3


class SourcesMode(str, Enum):
    """Where a worker keeps its sources: all on the device, streamed from host memory, or decided by the plan."""

    AUTO = "auto"
    RESIDENT = "resident"
    STREAMED = "streamed"


@dataclass(frozen=True)
class MemoryOptions:
    """An engine's memory settings (experiment keys ``workers.device_memory_gb`` and ``workers.sources_mode``).

    Attributes:
        device_memory_gb: device memory one worker may use, in GiB (None: a CUDA device's free memory; on CPU
            no check).
        sources: ``auto``, ``resident`` or ``streamed`` (see ``SourcesMode``).
        keep_order: keep the int32 sort order per task-vector element for the magnitude methods (ties,
            breadcrumbs): a candidate's top-k is then a lookup instead of a selection (and a full sort where the
            cut splits a run of tied magnitudes, the rule in bf16).
    """

    device_memory_gb: float | None = None
    sources: SourcesMode | str = SourcesMode.AUTO
    keep_order: bool = True


@dataclass(frozen=True)
class JobBytes:
    """One output tensor's memory: ``resident`` = its sources and statistics kept on the device (bytes),
    ``candidate`` = its output tensor, ``scratch`` = per-thread temporaries while it is merged."""

    resident: int
    candidate: int
    scratch: int


@dataclass
class MemoryPlan:
    """The memory one worker plans for (bytes on the device), and which jobs keep their sources resident.

    Attributes:
        params: parameters of one merged model.
        candidate: bytes of the candidate model (output dtype).
        sources: bytes of the resident sources and their statistics.
        streamed_sources: bytes of the sources that stay in host memory and are read per candidate.
        scratch: bytes of the kernels' per-thread temporaries (largest tensor times the threads).
        budget: the device budget the plan was made for (None: unknown, nothing was checked).
        resident: per job of the merge plan, True where its sources are kept on the device.
        keep_order: whether the resident magnitude-method tensors keep their int32 sort orders (False when asked,
            or when dropping them lets more sources stay resident; see ``plan_memory``).
    """

    method: str
    params: int
    candidate: int
    sources: int
    streamed_sources: int
    scratch: int
    budget: int | None
    resident: list[bool] = field(default_factory=list)
    keep_order: bool = True

    @property
    def total(self) -> int:
        return self.candidate + self.sources + self.scratch

    @property
    def mode(self) -> SourcesMode:
        if all(self.resident):
            return SourcesMode.RESIDENT
        return SourcesMode.STREAMED

    def describe(self) -> str:
        """One line for ``evomerge run``: the planned bytes per worker and the sources mode."""
        per = self.total / max(self.params, 1)
        budget = "no device budget known" if self.budget is None else f"budget {self.budget / GB:.2f} GB"
        kept = sum(self.resident)
        where = ("all sources resident" if self.mode is SourcesMode.RESIDENT else
                 f"{kept}/{len(self.resident)} tensors resident, "
                 f"{self.streamed_sources / GB:.2f} GB of sources streamed from host memory per candidate")
        return (f"memory per worker ({self.method}): {self.total / GB:.2f} GB = candidate {self.candidate / GB:.2f}"
                f" + sources {self.sources / GB:.2f} + scratch {self.scratch / GB:.2f} ({per:.1f} B/param); "
                f"{where}; {budget}")


def _size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def job_bytes(spec: MethodSpec, job: TensorJob, out_dtype: torch.dtype, keep_order: bool = True) -> JobBytes:
    """The memory of one tensor in the engine (see the module docstring for what each part holds)."""
    n = math.prod(job.shape)
    s = _size(job.compute_dtype)
    others = len(job.sources) - (1 if job.base_pos is not None else 0)
    candidate = n * _size(out_dtype)
    if not job.floating:
        return JobBytes(resident=n * s, candidate=candidate, scratch=0)
    resident = n * s * len(job.sources)  # base + task vectors, or the raw sources
    scratch = 0 if out_dtype == job.compute_dtype else n * s  # an output buffer in the compute dtype
    if spec.family == "task_arithmetic":
        if spec.sparsify in ("magnitude", "magnitude_outliers") and keep_order:
            resident += 4 * n * others  # int32 sort order per delta
        if spec.sparsify == "della_magprune":
            resident += n * (s if job.compute_dtype == torch.bfloat16 else max(s, 4)) * others
        if spec.sparsify is not None and spec.sparsify != "magnitude":
            # the general path: every sparsified row, a float32 draw, a mask and |kept| for the L1 rescale
            scratch += n * (others * s + 4 + s + s)
        elif spec.sparsify == "magnitude" and not keep_order:
            scratch += n * (4 + 8)  # one-shot top-k: float |delta| and, on a split tie, an int64 sort order
    else:
        scratch += n * kernel_scratch(spec, len(job.sources), others, s)
    return JobBytes(resident=resident, candidate=candidate, scratch=scratch)


def kernel_scratch(spec: MethodSpec, inputs: int, others: int, s: int) -> int:
    """Peak temporaries of one merge kernel outside the task-arithmetic family, in bytes per element.

    Read off each kernel's expression (which temporaries are alive together) and checked against the measured
    peak (experiments/benchmarks/method_scratch.py: every figure here is at or above it, bf16 and float32).

    Args:
        spec: the method (its family; RAM+ is the ram family with ``extra["plus"]``).
        inputs: the tensors merged (the base included); others: the non-base ones.
        s: bytes per element of the compute dtype.

    Returns:
        Bytes per element of the tensor (0 for kernels that work in the output buffer).
    """
    f = max(s, 4)  # float32 (float64 for float64): the dtype slerp and linear accumulate in
    table = {
        "linear": 0 if s >= 4 else 2 * f,  # float32 accumulator + one converted input
        "passthrough": 0,
        "slerp": 3 * f + (2 * f if s < f else 0),  # both inputs in float32, their directions and the product
        "model_stock": (others + 4) * s,  # offsets to the base, the mean and the blend's three terms
        "nearswap": 5 * s,  # distance, share, and the blend's three terms
        "arcee_fusion": max(5 * s, 2 * s + 14),  # softmaxes and KL terms; then importance, float32 quartiles, mask
        "karcher": (inputs + 2) * s + 4,  # the unit directions, mean and step, a float32 norm
        "multislerp": (4 * others + 4) * s,  # stacked vectors, unit directions, their tangents and products
        "nuslerp": 6 * s,  # the two deltas, their directions and the interpolation's terms
        "ram": (7 * others * s + others + 20 if spec.extra.get("plus")  # RAM+: the overlap-scaled part too
                else 6 * others * s + others + 18),  # stacked deltas, masks, int64 counts and the kept parts
        # stacked deltas, elected signs and agreeing weights; with select_topk < 1 (a per-candidate parameter)
        # the variance, its top-k values and int64 indices instead
        "sce": max((2 * others + 4) * s + others + 6, (others + 3) * s + 22),
    }
    return table.get(spec.family, 0)


def device_budget(device: torch.device, device_memory_gb: float | None) -> int | None:
    """The configured cap, else what the device has (CUDA: its free memory; CPU: the host's available)."""
    if device_memory_gb is not None:
        return int(float(device_memory_gb) * GB)
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def plan_memory(plan: MergePlan, *, budget: int | None, threads: int = 1,
                sources: SourcesMode | str = SourcesMode.AUTO, keep_order: bool = True,
                jobs: Sequence[int] | None = None, where: str = "the device") -> MemoryPlan:
    """Decide which jobs keep their sources resident within ``budget`` bytes (None: all, unchecked).

    Args:
        plan: the merge plan of the engine's recipe.
        budget: device bytes one worker may use (None: no check).
        threads: tensors merged at once (scratch is per thread).
        sources: ``resident`` (all, fail if they do not fit), ``streamed`` (none), ``auto`` (as many as fit).
        keep_order: keep the magnitude methods' int32 sort orders with the resident sources; when they and
            every source do not fit, the orders are dropped first (a resident tensor without its order costs a
            one-shot top-k per candidate, a streamed one that plus a read from host memory).
        jobs: indices of the plan's jobs this device holds (default: all; ``evomerge/placement.py`` plans one
            device of a worker spanning several).
        where: the device, as named in errors.

    Returns:
        the ``MemoryPlan`` (``resident`` has one entry per planned job, in ``jobs`` order).

    Raises:
        EvomergeError: the candidate and the scratch alone exceed the budget, or ``resident`` was asked for
            and the sources do not fit.
    """
    mode = SourcesMode(sources)
    chosen = [plan.jobs[i] for i in jobs] if jobs is not None else plan.jobs
    parts = [job_bytes(plan.spec, job, plan.out_dtype_for(job), keep_order) for job in chosen]
    candidate = sum(p.candidate for p in parts)
    scratch = max((p.scratch for p in parts), default=0) * max(1, threads)
    params = sum(math.prod(job.shape) for job in chosen)
    method = plan.spec.name
    fixed = candidate + scratch
    if budget is not None and fixed > budget:
        raise EvomergeError(f"nothing fits: one {method} candidate needs {fixed / GB:.2f} GB on {where} "
                            f"(model {candidate / GB:.2f} GB + scratch {scratch / GB:.2f} GB) and the worker "
                            f"has {budget / GB:.2f} GB there")
    resident = _choose_resident([p.resident for p in parts], None if budget is None else budget - fixed, mode)
    ordered = plan.spec.sparsify in ("magnitude", "magnitude_outliers")
    if keep_order and ordered and not all(resident):
        # the orders go before any source does; a streamed tensor is merged one-shot, with that scratch
        try:
            return plan_memory(plan, budget=budget, threads=threads, sources=sources, keep_order=False, jobs=jobs,
                               where=where)
        except EvomergeError:
            if mode is not SourcesMode.RESIDENT:
                raise  # the one-shot selection's scratch does not fit: nothing can be streamed either
    if mode is SourcesMode.RESIDENT and not all(resident):
        assert budget is not None, "without a budget every source is resident"
        need = sum(p.resident for p in parts)
        raise EvomergeError(f"workers.sources_mode resident: the {method} sources need {need / GB:.2f} GB on "
                            f"{where} and {(budget - fixed) / GB:.2f} GB are left after the candidate; "
                            f"use sources_mode auto or streamed")
    kept = sum(p.resident for p, r in zip(parts, resident) if r)
    streamed = sum(_source_bytes(job) for job, r in zip(chosen, resident) if not r)
    return MemoryPlan(method=method, params=params, candidate=candidate, sources=kept, streamed_sources=streamed,
                      scratch=scratch, budget=budget, resident=resident,
                      keep_order=keep_order and ordered)


def _source_bytes(job: TensorJob) -> int:
    return math.prod(job.shape) * _size(job.compute_dtype) * len(job.sources)


def _choose_resident(sizes: Sequence[int], room: int | None, mode: SourcesMode) -> list[bool]:
    if mode is SourcesMode.STREAMED:
        return [False] * len(sizes)
    if room is None:
        return [True] * len(sizes)
    chosen, used = [], 0
    for size in sizes:  # in job order: whatever fits stays, the rest is streamed
        keep = used + size <= room
        used += size if keep else 0
        chosen.append(keep)
    return chosen


def plan_worker_memory(initial: Recipe, device: str, threads: int, memory: MemoryOptions) -> MemoryPlan:
    """The plan ``evomerge run`` prints before a PS search starts (the stage's initial candidate recipe).

    Args:
        initial: the candidate recipe every worker builds its engine from.
        device: the workers' device (``auto``, ``cpu``, ``cuda`` or ``cuda:N``; experiment key ``workers.device``).
        threads: the workers' CPU threads (``workers.threads``; one on CUDA).
        memory: the workers' budget and sources mode (``workers.device_memory_gb``, ``workers.sources_mode``).

    Returns:
        the ``MemoryPlan`` of one worker; budget from ``memory.device_memory_gb``, else the free memory of this
        machine's first GPU when workers use CUDA, else unchecked.

    Raises:
        EvomergeError: nothing fits the budget (or ``sources_mode: resident`` and the sources do not).
    """
    plan = plan_merge(initial)
    budget = None
    if memory.device_memory_gb is not None:
        budget = int(float(memory.device_memory_gb) * GB)
    elif device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        budget = device_budget(torch.device("cuda" if device == "auto" else device), None)
    threads = threads if not device.startswith("cuda") else 1
    return plan_memory(plan, budget=budget, threads=threads, sources=memory.sources, keep_order=memory.keep_order)
