"""The Ray workers of one stage: start them, hand them trials, and wait for what happens next.

``WorkerPool.wait`` turns Ray's object refs into events: a worker became ``Ready`` (or was ``Lost`` during
setup), a trial is ``Done`` (ok or failed in the worker), or a worker ``Died`` while holding a trial. What to do
about them is the driver's and the scheduler's business.
"""

from __future__ import annotations

import dataclasses
import os
import socket
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
from evomerge.search.worker import WorkerInfo, WorkerResources, WorkerSetup, make_worker_class


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
    """A worker died (process gone) while ``trial`` was in its hands; ``node_lost``: the address of its Ray
    node when the node died with it (its raylet gone: a machine lost), else None."""

    worker: int
    trial: int
    error: str
    node_lost: str | None = None


Event = Ready | Lost | Done | Died
DROP_TIMEOUT_S = 30.0  # how long a pool's close waits for the nodes' source copies to be removed


class WorkerPool:
    """Ray actors of one stage, all built from one ``WorkerSetup``.

    Args:
        setup: what every worker is built with (its ``worker`` id is set per worker).
        resources: Ray resources per worker (CPUs, GPUs and custom resources).
    """

    def __init__(self, setup: WorkerSetup, resources: WorkerResources):
        self.setup = setup
        self.actor_class = make_worker_class(resources)
        self.actors: dict[int, Any] = {}
        self.starting: dict[Any, int] = {}  # ready() ref -> worker id
        self.inflight: dict[Any, tuple[int, int]] = {}  # evaluate() ref -> (trial id, worker id)
        self.nodes: dict[int, str] = {}  # worker id -> its Ray node id (once ready)
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
                info: WorkerInfo = ray.get(ref)
                self.nodes[w] = info.node
                return Ready(w, info)
            except ray.exceptions.RayError:  # the actor died (or Ray's memory monitor killed it) during setup
                self.actors.pop(w, None)
                return Lost(w)
        # a worker runs its trials in the order they were submitted: take its oldest result first (done too, if a
        # newer one is), so that one worker's trials are recorded and told in the same order every run
        worker = self.inflight[ref][1]
        ref = next(r for r, (_, w) in self.inflight.items() if w == worker)
        trial, w = self.inflight.pop(ref)
        try:
            return Done(w, ray.get(ref))
        except ray.exceptions.RayError as exc:
            # evaluate() never raises (a failed candidate is a failed result): any Ray error means the worker is
            # gone, its node lost, or Ray's memory monitor killed it (OutOfMemoryError, not a RayActorError)
            self.actors.pop(w, None)
            for other in [r for r, (_, ww) in self.inflight.items() if ww == w]:
                self.inflight.pop(other)
            return Died(w, trial, type(exc).__name__, node_lost(self.nodes.get(w, "")))

    def close(self, drop_sources: bool = False) -> None:
        """Kill every worker of the pool; with ``drop_sources`` (a stage that ended normally, every trial in) one
        ready worker per node first removes the node's copies of the stage's object-store sources (waiting up to
        ``DROP_TIMEOUT_S``; node_sources.py)."""
        if drop_sources and self.setup.blobs:
            one_per_node = {node: w for w, node in sorted(self.nodes.items()) if w in self.actors}
            refs = [self.actors[w].drop_sources.remote() for w in one_per_node.values()]
            try:
                ray.wait(refs, num_returns=len(refs), timeout=DROP_TIMEOUT_S)
            except ray.exceptions.RayError:  # a worker or node gone meanwhile: its copies stay
                pass
        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception:  # already gone
                pass
        self.actors.clear()


def node_lost(node: str) -> str | None:
    """The address of Ray node ``node`` if the node is gone (a worker died with it), else None.

    Ray marks a node dead only after its health checks fail for a while (seconds to a minute), and a worker's
    death may reach the driver first; so a node still listed alive counts as lost when its raylet refuses (or
    does not answer within 5 s) a TCP connection on its node-manager port.

    Args:
        node: the Ray node id (hex) a worker ran on ("" if it never reported one).
    """
    nodes: list[dict[str, Any]] = ray.nodes() if node else []  # type: ignore[no-untyped-call]
    found = [n for n in nodes if n["NodeID"] == node]
    if not found:
        return None
    info = found[0]
    address = str(info["NodeManagerAddress"])
    if not info["Alive"]:
        return address
    try:
        socket.create_connection((address, int(info["NodeManagerPort"])), timeout=5).close()
    except OSError:
        return address
    return None


def worker_setup(exp: Experiment, run_path: Path, stage: int, space: SearchSpace) -> WorkerSetup:
    """The workers' setup for one stage: the space's starting candidate, the evaluators, the device, and with
    ``workers.sources: object_store`` the stage's model folders put in Ray's object store."""
    blobs = None
    if exp.workers.sources == "object_store":
        models = stage_models(exp, run_path, stage)
        paths = [models.base, *(models.sources or {}).values()] if space.kind == "ps" else [models.a, models.b]
        blobs = put_source_blobs([p for p in paths if p is not None])
    return WorkerSetup(kind=space.kind, initial=space.decode(space.x0()), evaluators=exp.evaluators,
                       device=exp.workers.device, devices_per_worker=exp.workers.devices_per_worker,
                       threads=exp.workers.threads, dtype=exp.dtype,
                       memory=memory_options(exp),
                       python_path=[*exp.python_path, os.getcwd()], fitness=exp.fitness,
                       objectives=tuple(exp.objectives), blobs=blobs)


def memory_options(exp: Experiment) -> MemoryOptions:
    """The workers' memory options: ``workers.device_memory_gb`` and ``workers.sources_mode``."""
    return MemoryOptions(device_memory_gb=exp.workers.device_memory_gb, sources=exp.workers.sources_mode)

