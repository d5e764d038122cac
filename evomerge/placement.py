"""One search worker spanning several devices of a node: which device holds each layer of the candidate.

A candidate larger than one GPU (issue 14 item 4) is split by layers, as accelerate's ``device_map`` splits a
model for inference: the input embeddings go with the first blocks, the final norm and the head with the last,
and the blocks in between are cut into contiguous runs, one per device, balanced by bytes against each device's
memory cap. The bytes of a layer are what the in-memory engine keeps for it on its device: its candidate
tensors plus its resident sources (``memory_plan.job_bytes``), so a device's share of the sources is its
share of the layers. The merge engine then writes each tensor on its layer's device (sources loaded there,
kernels run there), and evaluation runs across the devices through accelerate's hooks
(``accelerate.dispatch_model``): hidden states move to the next device at each layer boundary.

Each device gets its own memory plan (``memory_plan.plan_memory`` over its jobs, with its cap): what does not
fit a device's budget is streamed from host memory, as on one device; a device whose share of the candidate
alone exceeds its cap refuses the run with one line.

A head tied to the input embeddings (``tie_word_embeddings``) is the embedding tensor itself: it stays on the
first device and the last hidden state moves back to it for the logits.

CPU "devices" (``["cpu", "cpu"]``) give the same plan and the same hooks without an accelerator; the tests use
them to check placement, and that outputs equal one device's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from evomerge.architecture import resolve
from evomerge.errors import EvomergeError
from evomerge.memory_plan import GB, MemoryOptions, MemoryPlan, device_budget, job_bytes, plan_memory
from evomerge.merge import MergePlan, plan_merge
from evomerge.recipe import Recipe


@dataclass(frozen=True)
class Placement:
    """Where each output tensor of a worker's candidate lives.

    Attributes:
        devices: the worker's devices (``cuda:0``, ``cuda:1``... or ``cpu`` repeated), in layer order.
        job_slots: per job of the merge plan, the index into ``devices`` of the device holding it.
        layer_slots: per transformer block of the output, the index of its device.
        memory: per device, its ``MemoryPlan`` over the jobs it holds (``resident`` in job order).
    """

    devices: tuple[str, ...]
    job_slots: tuple[int, ...]
    layer_slots: tuple[int, ...]
    memory: tuple[MemoryPlan, ...]

    def jobs_on(self, slot: int) -> list[int]:
        """Indices of the jobs device ``slot`` holds, in job order."""
        return [i for i, s in enumerate(self.job_slots) if s == slot]

    def resident(self) -> list[bool]:
        """Per job of the merge plan: whether its sources stay on its device (else streamed per candidate)."""
        out = [False] * len(self.job_slots)
        for slot, plan in enumerate(self.memory):
            for index, keep in zip(self.jobs_on(slot), plan.resident):
                out[index] = keep
        return out

    def total(self) -> MemoryPlan:
        """The worker's memory summed over its devices (``budget``: the sum of the caps, None if unknown)."""
        budgets = [p.budget for p in self.memory]
        return MemoryPlan(method=self.memory[0].method, params=sum(p.params for p in self.memory),
                          candidate=sum(p.candidate for p in self.memory), sources=sum(p.sources for p in self.memory),
                          streamed_sources=sum(p.streamed_sources for p in self.memory),
                          scratch=sum(p.scratch for p in self.memory),
                          budget=None if None in budgets else sum(b for b in budgets if b is not None),
                          resident=self.resident(), keep_order=all(p.keep_order for p in self.memory))

    def describe(self) -> str:
        """Lines for ``evomerge run``: the whole worker, then each device's layers and planned memory."""
        lines = [f"{self.total().describe()} over {len(self.devices)} devices"]
        for slot, (device, plan) in enumerate(zip(self.devices, self.memory)):
            layers = [i for i, s in enumerate(self.layer_slots) if s == slot]
            span = f"layers {layers[0]}-{layers[-1]}" if layers else "no layers"
            budget = "no budget known" if plan.budget is None else f"budget {plan.budget / GB:.2f} GB"
            lines.append(f"  device {slot} ({device}): {span}, {len(self.jobs_on(slot))} tensors, "
                         f"{plan.total / GB:.2f} GB = candidate {plan.candidate / GB:.2f} + sources "
                         f"{plan.sources / GB:.2f} + scratch {plan.scratch / GB:.2f}; "
                         f"{sum(plan.resident)}/{len(plan.resident)} tensors resident; {budget}")
        return "\n".join(lines)


def job_groups(plan: MergePlan) -> tuple[list[int], int]:
    """Per job, its layer group: 0 = input embeddings (and any other tensor outside the blocks), ``1 + N`` =
    block N, ``1 + num_layers`` = the final norm and the head. Returns (groups, number of groups)."""
    arch = resolve(plan.config, [job.name for job in plan.jobs], plan.num_layers)
    last = 1 + plan.num_layers
    tails = tuple(p for p in (arch.final_norm, arch.head) if p)
    groups = []
    for job in plan.jobs:
        block = arch.split_block(job.name)
        if block is not None:
            groups.append(1 + block[0])
        elif any(job.name == p or job.name.startswith(p + ".") for p in tails):
            groups.append(last)
        else:
            groups.append(0)
    return groups, last + 1


def partition(weights: Sequence[int], caps: Sequence[float]) -> list[int]:
    """Contiguous runs of ``weights`` (layer groups, in order) over devices with capacities ``caps``, so that the
    largest load / capacity ratio is as small as possible (binary search on that ratio, greedy fill).

    Args:
        weights: bytes per group, in layer order.
        caps: the devices' capacities (bytes, or equal numbers when unknown), in device order.

    Returns:
        Per group, the index of its device (non-decreasing; the first group on device 0).
    """
    def fill(ratio: float) -> list[int] | None:
        slots, slot, load = [], 0, 0.0
        for w in weights:
            while slot < len(caps) and load + w > ratio * caps[slot] and (load > 0 or w > ratio * caps[slot]):
                slot, load = slot + 1, 0.0
            if slot == len(caps):
                return None
            slots.append(slot)
            load += w
        return slots

    lo, hi = 0.0, max(1.0, sum(weights) / max(min(caps), 1e-9))
    best = fill(hi)
    assert best is not None, "at the largest ratio the first device takes everything"
    for _ in range(60):
        mid = (lo + hi) / 2
        slots = fill(mid)
        if slots is None:
            lo = mid
        else:
            hi, best = mid, slots
    return best


def check_devices(devices: Sequence[str]) -> tuple[str, ...]:
    """The devices of one worker, checked: all CUDA and distinct, or all ``cpu``.

    Raises:
        EvomergeError: an empty list, a mix of CPU and CUDA, or a CUDA device named twice.
    """
    names = tuple(str(torch.device(d)) for d in devices)
    kinds = {torch.device(d).type for d in names}
    if not names:
        raise EvomergeError("a worker needs at least one device")
    if len(kinds) > 1:
        raise EvomergeError(f"a worker's devices must all be CPU or all CUDA, got {', '.join(names)}")
    if "cuda" in kinds and len(set(names)) != len(names):
        raise EvomergeError(f"a worker's CUDA devices must be distinct, got {', '.join(names)}")
    return names


def plan_placement(plan: MergePlan, devices: Sequence[str], *, threads: int = 1,
                   memory: MemoryOptions | None = None) -> Placement:
    """Place the candidate of ``plan`` across ``devices`` and plan each device's memory.

    Args:
        plan: the merge plan of the worker's recipe.
        devices: the worker's devices in layer order (see ``check_devices``).
        threads: CPU threads merging at once (scratch is per thread; 1 on CUDA).
        memory: ``device_memory_gb`` is the cap of EACH device (default: each CUDA device's free memory; on CPU
            no cap, the layers then split evenly by bytes); sources mode and sort orders as for one device.

    Returns:
        The ``Placement``.

    Raises:
        EvomergeError: the devices are invalid (``check_devices``), or a device's share of the candidate does not
            fit its cap (one line naming the device), or ``sources_mode: resident`` and its sources do not.
    """
    names = check_devices(devices)
    memory = memory or MemoryOptions()
    budgets: list[int | None] = []
    for name in names:
        dev = torch.device(name)
        # no cap configured: a CUDA device's free memory where this machine has it; CPU "devices" have none
        known = memory.device_memory_gb is not None or (dev.type == "cuda" and torch.cuda.is_available()
                                                          and (dev.index or 0) < torch.cuda.device_count())
        budgets.append(device_budget(dev, memory.device_memory_gb) if known else None)
    caps = [float(b) if b is not None else 1.0 for b in budgets]
    if None in budgets:
        caps = [1.0] * len(names)
    groups, count = job_groups(plan)
    weights = [0] * count
    for job, group in zip(plan.jobs, groups):
        part = job_bytes(plan.spec, job, plan.out_dtype_for(job), memory.keep_order)
        weights[group] += part.resident + part.candidate
    slots = partition(weights, caps)
    job_slots = tuple(slots[g] for g in groups)
    plans = []
    for slot, name in enumerate(names):
        jobs = [i for i, s in enumerate(job_slots) if s == slot]
        plans.append(plan_memory(plan, budget=budgets[slot], threads=threads if name == "cpu" else 1,
                                 sources=memory.sources, keep_order=memory.keep_order, jobs=jobs,
                                 where=f"device {slot} ({name})"))
    return Placement(devices=names, job_slots=job_slots, layer_slots=tuple(slots[1:1 + plan.num_layers]),
                     memory=tuple(plans))


def worker_placement(initial: Recipe, device: str, count: int, threads: int, memory: MemoryOptions) -> Placement:
    """The placement ``evomerge run`` prints before a PS search whose workers span ``count`` devices.

    Args:
        initial: the candidate recipe every worker builds its engine from.
        device: the workers' device (``workers.device``: ``auto``, ``cpu`` or ``cuda``).
        count: ``workers.devices_per_worker``.
        threads: the workers' CPU threads.
        memory: the cap per device and the sources mode (``workers.device_memory_gb``, ``workers.sources_mode``).

    Returns:
        The ``Placement`` over ``cuda:0..count-1`` (caps: ``device_memory_gb``, else this machine's GPUs' free
        memory when it has them, else an even split by bytes), or over ``cpu`` repeated for CPU workers.

    Raises:
        EvomergeError: a device's share of the candidate does not fit its cap (see ``plan_placement``).
    """
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    devices = ["cpu"] * count if on_cpu else [f"cuda:{i}" for i in range(count)]
    return plan_placement(plan_merge(initial), devices, threads=threads if on_cpu else 1, memory=memory)


def device_map(model: torch.nn.Module, blocks: str | None, layer_slots: Sequence[int],
               devices: Sequence[str]) -> dict[str, str]:
    """accelerate's ``device_map`` of a model whose tensors already lie where the placement put them.

    Block ``N`` (module ``{blocks}.N``) maps to its device; every other module holding tensors maps to the device
    of its parameters (a tied head: the embeddings' device), or to the first device when it holds buffers only
    (e.g. the rotary embedding, whose output the hooks move on to each block).

    Args:
        model: the engine's model, its parameters on their devices.
        blocks: the module path of the block list (``model.layers``...).
        layer_slots: per block, the index of its device.
        devices: the worker's devices.

    Returns:
        {module name: device name}, covering every parameter and buffer (``accelerate.dispatch_model``'s input).
    """
    out: dict[str, str] = {}
    if blocks is not None:
        out.update({f"{blocks}.{i}": devices[slot] for i, slot in enumerate(layer_slots)})
    inside = tuple(f"{b}." for b in out)
    for name, module in model.named_modules():
        if name in out or name.startswith(inside):
            continue
        params = list(module.parameters(recurse=False))
        buffers = list(module.buffers(recurse=False))
        if params:
            out[name] = str(params[0].device)
        elif buffers:
            out[name] = devices[0]
    return out


__all__ = ["Placement", "check_devices", "device_map", "job_groups", "partition", "plan_placement",
           "worker_placement"]

