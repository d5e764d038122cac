"""The Ray a search runs on: an embedded local Ray started for the run (and its reaper), or a joined cluster.

Without ``address`` a local Ray is started for the run and stopped after it (RAY_TMPDIR kept local, auth off,
num_cpus from the workers, loopback only) with a reaper (reaper.py) that ends its agents if the driver is
killed with SIGKILL; with ``address`` the run joins an existing cluster. While the search runs, SIGTERM (a
scheduler's stop) ends it like Ctrl-C, so the run folder stays resumable. Only Ray's public API is used.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import ray
import torch

from evomerge.errors import EvomergeError
from evomerge.search.experiment import Experiment


@contextmanager
def ray_session(address: str | None, exp: Experiment) -> Iterator[None]:
    """Ray for one search: joined or embedded (see module docstring), SIGTERM as KeyboardInterrupt inside.

    Args:
        address: a cluster to join (``auto``, ``HOST:PORT``) or None for an embedded local Ray.
        exp: the experiment (its workers' CPUs/GPUs size the embedded Ray; its python_path reaches workers).

    Raises:
        EvomergeError: the cluster at ``address`` cannot be joined.
    """
    reaper = start_ray(address, exp)
    restore_sigterm = sigterm_as_interrupt()  # after ray.init, which installs a crash handler for it
    try:
        yield
    finally:
        restore_sigterm()
        if reaper is not None:
            stop_ray(reaper)


def start_ray(address: str | None, exp: Experiment) -> subprocess.Popen[bytes] | None:
    """Connect to ``address`` or start an embedded local Ray.

    Returns:
        The reaper of the embedded Ray we started (pass it to ``stop_ray``), or None when we started none
        (joined a cluster, or Ray was already initialized in this process).
    """
    if ray.is_initialized():
        return None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"evomerge-ray-{os.getuid()}"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers import custom evaluators from the experiment's python_path and the driver's cwd
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [*exp.python_path, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise EvomergeError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return None
    w = exp.workers
    num_gpus = torch.cuda.device_count() if w.device == "auto" or w.device.startswith("cuda") else 0
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
    # the embedded Ray lives on loopback: nothing of it listens on or talks to other addresses
    context = ray.init(num_cpus=max(1, math.ceil(w.count * w.cpus_per_worker)), num_gpus=num_gpus,
                       _temp_dir=os.environ["RAY_TMPDIR"], _node_ip_address="127.0.0.1", **kwargs)
    info: dict[str, Any] = getattr(context, "address_info", {})  # ray.init returns a RayContext
    return start_reaper(str(info["session_dir"]))


def start_reaper(session_dir: str) -> subprocess.Popen[bytes]:
    """The watchdog that ends this Ray session's agents if this driver is SIGKILLed (see reaper.py)."""
    return subprocess.Popen([sys.executable, "-m", "evomerge.search.reaper", str(os.getpid()), session_dir],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def stop_ray(reaper: subprocess.Popen[bytes]) -> None:
    """Stop the embedded Ray and its reaper (a normal end: Ray stops its own processes)."""
    ray.shutdown()
    reaper.kill()
    reaper.wait()


def sigterm_as_interrupt() -> Callable[[], None]:
    """Make SIGTERM raise KeyboardInterrupt in the main thread.

    Returns:
        A function that restores the previous handler (a no-op outside the main thread).
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def gpus_per_worker(exp: Experiment) -> float:
    """``workers.gpus_per_worker``, else ``workers.devices_per_worker`` (1 by default) when the cluster has GPUs
    and the device is not cpu, else 0."""
    w = exp.workers
    if w.gpus_per_worker is not None:
        return float(w.gpus_per_worker)
    if w.device == "cpu":
        return 0.0
    resources: dict[str, float] = ray.cluster_resources()  # type: ignore[no-untyped-call]
    return float(w.devices_per_worker) if resources.get("GPU", 0) > 0 else 0.0


def check_cluster(exp: Experiment) -> None:
    """Refuse, before a run writes anything, workers that the cluster cannot host: ``check_devices`` and
    ``check_custom_resources``.

    Raises:
        EvomergeError: the first problem, as one line.
    """
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]  # type: ignore[no-untyped-call]
    check_devices(exp, nodes)
    check_custom_resources(exp, nodes)


def check_devices(exp: Experiment, nodes: list[dict[str, float]]) -> None:
    """Refuse ``workers.device: cuda`` (or ``cuda:N``) when no live node has the GPUs one worker needs
    (``devices_per_worker``, at least 1), and ``workers.gpus_per_worker`` more than any node has (a worker
    asking for them would wait for a node forever). ``auto`` falls back to the CPU and is never refused.

    Args:
        exp: the experiment.
        nodes: the live nodes' Ray resources ({"GPU": count, ...}).

    Raises:
        EvomergeError: one line naming the key, the GPUs needed and the most one node has.
    """
    w = exp.workers
    most = max((float(r.get("GPU", 0.0)) for r in nodes), default=0.0)
    if w.device.startswith("cuda") and most < w.devices_per_worker:
        spans = f"workers.devices_per_worker {w.devices_per_worker}: " if w.devices_per_worker > 1 else ""
        raise EvomergeError(f"workers.device {w.device}: {spans}no node of the Ray cluster has "
                            f"{w.devices_per_worker} GPU(s) for a worker (the most one node has is {most:g}; "
                            f"use device: auto or cpu)")
    if w.gpus_per_worker is not None and most < w.gpus_per_worker:
        raise EvomergeError(f"workers.gpus_per_worker {w.gpus_per_worker:g}: no node of the Ray cluster has that "
                            f"many GPUs (the most one node has is {most:g})")


def check_custom_resources(exp: Experiment, nodes: list[dict[str, float]]) -> None:
    """Refuse ``workers.resources`` that no live node of the cluster offers (a worker asking for them would wait
    for a node forever).

    Args:
        exp: the experiment.
        nodes: the live nodes' Ray resources.

    Raises:
        EvomergeError: a custom resource whose amount per worker exceeds what every live node offers.
    """
    for name, amount in exp.workers.resources.items():
        most = max((float(r.get(name, 0.0)) for r in nodes), default=0.0)
        if most < amount:
            raise EvomergeError(f"workers.resources: no node of the Ray cluster offers {name} {amount:g} per worker "
                                f"(the most one node has is {most:g}; start nodes with ray start --resources)")


def put_source_blobs(paths: list[str]) -> dict[str, Any]:
    """Model folders as {folder: object ref of {relative path: bytes}} in Ray's object store (for clusters
    without a shared disk: ``workers.sources: object_store``)."""
    blobs = {}
    for p in paths:
        files = {str(f.relative_to(p)): f.read_bytes() for f in Path(p).rglob("*") if f.is_file()}
        blobs[p] = ray.put(files)
    return blobs
