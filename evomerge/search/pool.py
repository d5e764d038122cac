"""The Ray workers of one stage: start them, hand them trials, and wait for what happens next.

``WorkerPool.wait`` turns Ray's object refs into events: a worker became ``Ready`` (or was ``Lost`` during
setup), a trial is ``Done`` (ok or failed in the worker), or a worker ``Died`` while holding a trial. What to do
about them is the driver's and the scheduler's business.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from evomerge.memory_plan import MemoryOptions
from evomerge.search.candidates import Candidate
from evomerge.search.experiment import Experiment
from evomerge.search.fitness import FitnessPlan
from evomerge.search.ray_runtime import put_source_blobs
from evomerge.search.records import TrialResult
from evomerge.search.search_space import SearchSpace
from evomerge.search.stages import stage_models
from evomerge.search.worker import WorkerInfo, WorkerSetup, make_worker_class


@dataclass(frozen=True)
class Ready:
    """A worker finished its setup (``info.error`` is None when it can take trials)."""

    worker: int
    info: WorkerInfo


@dataclass(frozen=True)
class Lost:
    """A worker died during its setup."""

    worker: int


@dataclass(frozen=True)
class Done:
    """A trial came back from its worker."""

    worker: int
    result: TrialResult


@dataclass(frozen=True)
class Died:
    """A worker died (process gone) while ``trial`` was in its hands."""

    worker: int
    trial: int
    error: str


Event = Ready | Lost | Done | Died


class WorkerPool:
    """Ray actors of one stage, all built from one ``WorkerSetup``.

    Args:
        setup: what every worker is built with (its ``worker`` id is set per worker).
        cpus: Ray CPUs per worker; gpus: Ray GPUs per worker.
    """

    def __init__(self, setup: WorkerSetup, cpus: float, gpus: float):
        self.setup = setup
        self.actor_class = make_worker_class(cpus, gpus)
        self.actors: dict[int, Any] = {}
        self.starting: dict[Any, int] = {}  # ready() ref -> worker id
        self.inflight: dict[Any, tuple[int, int]] = {}  # evaluate() ref -> (trial id, worker id)
        self.next_id = 0

    def start(self) -> int:
        """Start one more worker; returns its id."""
        w = self.next_id
        self.next_id += 1
        self.actors[w] = self.actor_class.remote(dataclasses.replace(self.setup, worker=w))
        self.starting[self.actors[w].ready.remote()] = w
        return w

    def submit(self, worker: int, trial: int, candidate: Candidate, plan: FitnessPlan | None = None) -> None:
        """Queue ``trial`` on ``worker`` (it runs after the worker's earlier trials), scored as ``plan`` says
        (None: on every item)."""
        self.inflight[self.actors[worker].evaluate.remote(trial, candidate, plan)] = (trial, worker)

    @property
    def empty(self) -> bool:
        """No worker starting and no trial in flight: ``wait`` would wait forever."""
        return not self.inflight and not self.starting

    def wait(self) -> Event:
        """Block until the next event (see module docstring); one worker's results come in submission order."""
        ready, _ = ray.wait([*self.inflight, *self.starting], num_returns=1)
        ref = ready[0]
        if ref in self.starting:
            w = self.starting.pop(ref)
            try:
                return Ready(w, ray.get(ref))
            except ray.exceptions.RayActorError:
                self.actors.pop(w, None)
                return Lost(w)
        # a worker runs its trials in the order they were submitted: take its oldest result first (done too, if a
        # newer one is), so that one worker's trials are recorded and told in the same order every run
        worker = self.inflight[ref][1]
        ref = next(r for r, (_, w) in self.inflight.items() if w == worker)
        trial, w = self.inflight.pop(ref)
        try:
            return Done(w, ray.get(ref))
        except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
            self.actors.pop(w, None)
            for other in [r for r, (_, ww) in self.inflight.items() if ww == w]:
                self.inflight.pop(other)
            return Died(w, trial, type(exc).__name__)

    def close(self) -> None:
        """Kill every worker of the pool."""
        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors.clear()


def worker_setup(exp: Experiment, run_path: Path, stage: int, space: SearchSpace) -> WorkerSetup:
    """The workers' setup for one stage: the space's starting candidate, the evaluators, the device, and with
    ``workers.sources: object_store`` the stage's model folders put in Ray's object store."""
    blobs = None
    if exp.workers.sources == "object_store":
        models = stage_models(exp, run_path, stage)
        paths = [models.base, *(models.sources or {}).values()] if space.kind == "ps" else [models.a, models.b]
        blobs = put_source_blobs([p for p in paths if p is not None])
    return WorkerSetup(kind=space.kind, initial=space.decode(space.x0()), evaluators=exp.evaluators,
                       device=exp.workers.device, threads=exp.workers.threads, dtype=exp.dtype,
                       memory=MemoryOptions(device_memory_gb=exp.workers.device_memory_gb,
                                            sources=exp.workers.sources_mode),
                       python_path=[*exp.python_path, os.getcwd()], fitness=exp.fitness,
                       objectives=tuple(exp.objectives), blobs=blobs)
