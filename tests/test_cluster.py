"""A cluster search tested as a cluster (issue 18): three Ray nodes on loopback, no shared disk, nodes lost.

The module's cluster is started by the SLURM recipe itself (examples/cluster/slurm_evomerge.sh ``start``, with
``EVOMERGE_ON=""`` so every "node" runs here): a head on 127.0.0.2 (1 CPU, no ``evomerge_worker``) and worker
nodes on 127.0.0.3 and 127.0.0.4 (1 CPU, one ``evomerge_worker`` each), each with its own --temp-dir and its
own TMPDIR (its "local disk"), 200 MB of object store each; ``stop`` ends it. Every search is a real
`evomerge run ... --address` process (forked from cli_forkserver's server), asking for
``workers: {resources: {evomerge_worker: 1}}``: one worker per worker node, none on the head although it has a
free CPU. The test process itself never joins the cluster (the session's local Ray may live in it); it reads
the cluster through Ray's state API (the head's dashboard) and helper processes.

Evaluations wait on resume_gate.py's tickets where a test needs to stop a run at a known point (kill points by
trial count, never by sleeping). The node-loss test kills a worker node for good, so it runs last.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from ray.util.state import list_actors, list_nodes

from cli_forkserver import ForkServer
from evomerge.search.node_sources import FETCH_LOG
from evomerge.search.run_folder import RunFolder
from test_resume_exact import Gate, Parts, _alive, _compared

# each test takes 30-90 s on a 2-core machine (cluster start ~40 s, once per module): the module costs ~4 min
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "cluster" / "slurm_evomerge.sh"
HEAD, WORKER_NODES = "127.0.0.2", ("127.0.0.3", "127.0.0.4")
PS_TRIALS = 8  # two CMA-ES generations of 4
TIMEOUT = 240


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LoopbackCluster:
    """The module's cluster: the recipe's folder (``root``), the head's address and state-API URL."""

    root: Path
    address: str
    dashboard: str
    env: dict[str, str]

    def script(self, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(SCRIPT), *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def group(self, node: str) -> int:
        """The process group of a node (its `ray start --block`, raylet and agents; not its workers, which
        Ray starts in process groups of their own)."""
        return int((self.root / f"{node}.pid").read_text())

    def processes(self, node: str) -> list[psutil.Process]:
        """Every process of a node: its process group and their descendants (the workers)."""
        group = [p for p in psutil.process_iter() if _pgid(p.pid) == self.group(node)]
        return list({p.pid: p for g in group for p in [g, *g.children(recursive=True)]}.values())

    def node_ids(self) -> dict[str, str]:
        """{Ray node id: node IP} of the nodes that ever joined."""
        return {n.node_id: n.node_ip for n in list_nodes(address=self.dashboard, limit=100)}

    def workers(self) -> list:
        """Every TrialWorker actor the cluster has known (alive or dead), with pid, node and job."""
        return list_actors(address=self.dashboard, filters=[("class_name", "=", "TrialWorker")], detail=True,
                           limit=1000, raise_on_missing_output=False)

    def fetches(self, node: str) -> list[dict]:
        """The fetch log lines of a node (node_sources.py): what crossed the network to it."""
        return [json.loads(line) for log in sorted((self.root / node / "tmp").glob(f"evomerge-sources-*/{FETCH_LOG}"))
                for line in log.read_text().splitlines()]


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="emc-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = dict(os.environ, EVOMERGE_NODES=" ".join([HEAD, *WORKER_NODES]), EVOMERGE_ON="",
               EVOMERGE_RAY_TMP=str(root), EVOMERGE_RAY_PORT=str(_free_port()),
               EVOMERGE_DASHBOARD_PORT=str(_free_port()), EVOMERGE_NODE_CPUS="1", EVOMERGE_SLOTS="1",
               EVOMERGE_STOP_GRACE="2",
               EVOMERGE_OBJECT_STORE_BYTES=str(200 * 1000**2), EVOMERGE=str(Path(sys.executable).with_name("evomerge")),
               RAY=str(Path(sys.executable).with_name("ray")))
    c = LoopbackCluster(root, "", f"http://127.0.0.1:{env['EVOMERGE_DASHBOARD_PORT']}", env)
    groups: list[int] = []
    try:  # stopped even when its start fails or is interrupted
        started = c.script("start")
        assert started.returncode == 0, started.stderr
        groups = [c.group(n) for n in (HEAD, *WORKER_NODES)]
        c.address = started.stdout.strip()
        assert c.address == f"{HEAD}:{env['EVOMERGE_RAY_PORT']}"
        yield c
    finally:
        try:
            groups = groups or [c.group(n) for n in (HEAD, *WORKER_NODES) if (c.root / f"{n}.pid").exists()]
            stopped = c.script("stop", timeout=60)
            assert stopped.returncode == 0, stopped.stderr
            for g in groups:  # every process the recipe started is gone
                with pytest.raises(ProcessLookupError):
                    os.killpg(g, 0)
        finally:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def forkserver():
    server = ForkServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sources(llama_family, tmp_path_factory):
    """The source models on the driver's disk only: {role: folder} in a folder the tests may move away."""
    folder = tmp_path_factory.mktemp("driver-disk") / "models"
    out = {}
    for role in ("base", "model_1", "model_2"):
        out[role] = folder / role
        shutil.copytree(llama_family[role], out[role])
    return out


def _experiment(path: Path, models: dict, gate: Gate, **overrides) -> Path:
    exp = {
        "name": "cluster",
        "models": models,
        "search_space": "ps_ties_dare",
        "space": {"group_size": "model"},
        "evaluators": [{"name": "e", "spec": {"type": "custom", "function": f"{gate.folder / 'resume_gate.py'}:gated",
                                              "kwargs": {"gate": str(gate.folder)}}}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}],
        "optimizer": {"name": "cmaes", "population": 4, "sigma0": 0.25},
        "budget": {"trials": PS_TRIALS},
        "workers": {"count": 2, "threads": 1, "device": "cpu", "sources": "object_store",
                    "resources": {"evomerge_worker": 1}},
        "seed": 3,
        **overrides,
    }
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _ps_models(sources: dict) -> dict:
    return {"base": str(sources["base"]), "sources": {"m1": str(sources["model_1"]), "m2": str(sources["model_2"])}}


def _open_when_every_worker_waits(gate: Gate, workers: int, alive, what: str) -> None:
    """Open the gate once ``workers`` workers each hold a scored trial: every worker of the run was placed
    and ran a trial (a fast run would otherwise finish on the first worker up)."""
    end = time.time() + TIMEOUT
    while len({p.name for p in gate.folder.glob("waiting-*")}) < workers:
        assert alive() and time.time() < end, what
        time.sleep(0.05)
    gate.open()


def _wait_exit(pid: int, log: Path, timeout: float = TIMEOUT) -> str:
    end = time.time() + timeout
    while _alive(pid):
        assert time.time() < end, f"the driver did not finish: {log.read_text()[-3000:]}"
        time.sleep(0.1)
    return log.read_text()


@dataclass(frozen=True)
class Placement:
    """Where a run's work happened, from Ray's state API: the node IPs of its worker actors, and {node IP:
    trials} (each trial's worker pid looked up among the actors)."""

    workers: Counter
    trials: Counter


def _placement(cluster: LoopbackCluster, run: Path, known: set[str]) -> Placement:
    """The placement of ``run``, whose worker actors are those not in ``known`` (the actor ids before it; an
    actor still waiting for a node when its run ended was never placed)."""
    nodes = cluster.node_ids()
    actors = [a for a in cluster.workers() if a.actor_id not in known and a.node_id is not None]
    node_of_pid = {a.pid: nodes[a.node_id] for a in actors}
    return Placement(Counter(nodes[a.node_id] for a in actors),
                     Counter(node_of_pid[t.pid] for t in RunFolder.open(run).trials()))


def _new_fetches(cluster: LoopbackCluster, before: dict[str, int]) -> dict[str, Counter]:
    return {n: Counter(f["source"] for f in cluster.fetches(n)[before.get(n, 0):]) for n in (HEAD, *WORKER_NODES)}


def _sorted(run: Path) -> list[dict]:
    """A run's trials as test_resume_exact compares them, by trial id (two workers record in finishing order)."""
    return sorted(_compared(run), key=lambda t: t["trial"])


def _fetch_counts(cluster: LoopbackCluster) -> dict[str, int]:
    return {n: len(cluster.fetches(n)) for n in (HEAD, *WORKER_NODES)}


@dataclass
class PSRun:
    run: Path
    log: str
    compared: list[dict]
    fetched: dict[str, Counter]
    placement: Placement


@pytest.fixture(scope="module")
def ps_run(cluster, forkserver, sources, tmp_path_factory) -> PSRun:
    """The uninterrupted PS search, one worker per worker node, whose workers start only after the source
    folders were moved out of reach: the driver has put them in the object store (its first worker actor exists,
    created after the put, waiting for a node), a helper process held both nodes' ``evomerge_worker`` until
    then. Its evaluations go on once both workers hold a trial."""
    tmp = tmp_path_factory.mktemp("ps")
    gate = Gate(tmp / "gate")
    exp = _experiment(tmp / "ps.yaml", _ps_models(sources), gate)
    before, known = _fetch_counts(cluster), {a.actor_id for a in cluster.workers()}
    hold = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cluster_hold.py")), cluster.address,
                             "evomerge_worker", str(len(WORKER_NODES))], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    folder, away = sources["base"].parent, sources["base"].parent.with_name("moved-away")
    pid = None
    try:
        assert hold.stdout.readline().strip() == "held"
        log = tmp / "driver.log"
        pid = forkserver.run(["run", str(exp), "--out", str(tmp / "run"), "--address", cluster.address,
                              "--no-progress"], str(log))
        end = time.time() + TIMEOUT
        while not {a.actor_id for a in cluster.workers()} - known:  # its first worker exists (pending: held)
            assert _alive(pid) and time.time() < end, log.read_text()[-3000:] if log.exists() else ""
            time.sleep(0.2)
        folder.rename(away)  # from here on nobody can read the driver's source paths
        hold.stdin.close()
        assert hold.wait(timeout=60) == 0
        _open_when_every_worker_waits(gate, len(WORKER_NODES), lambda: _alive(pid), log.read_text()[-3000:])
        text = _wait_exit(pid, log)
    finally:
        if away.exists():
            away.rename(folder)
        if hold.poll() is None:
            hold.kill()
        if pid is not None and _alive(pid):  # a driver left running would hold the nodes' slots
            Parts._kill(pid)
    return PSRun(tmp / "run", text, _sorted(tmp / "run"), _new_fetches(cluster, before),
                 _placement(cluster, tmp / "run", known))


def test_ps_search_runs_on_the_worker_nodes_without_the_driver_s_disk(ps_run, sources):
    trials = ps_run.compared
    assert [t["trial"] for t in trials] == list(range(PS_TRIALS)), ps_run.log[-3000:]
    assert all(t["status"] == "ok" for t in trials), [t["error"] for t in trials]
    # placed by resources: a worker on each worker node, none on the head (a free CPU, no evomerge_worker)
    assert ps_run.placement.workers == Counter(WORKER_NODES)
    assert set(ps_run.placement.trials) == set(WORKER_NODES) and sum(ps_run.placement.trials.values()) == PS_TRIALS
    # each worker node fetched each source folder once, the head none (the driver's put is not a fetch)
    expected = Counter(str(sources[r]) for r in ("base", "model_1", "model_2"))
    assert ps_run.fetched == {HEAD: Counter(), **{n: expected for n in WORKER_NODES}}


def test_dfs_search_through_the_recipe_s_driver_step(cluster, sources, tmp_path):
    """`slurm_evomerge.sh run` (the recipe's driver step, on the head) runs a DFS search on the worker nodes."""
    gate = Gate(tmp_path / "gate")
    exp = _experiment(tmp_path / "dfs.yaml", {"a": str(sources["model_1"]), "b": str(sources["model_2"])}, gate,
                      search_space="dfs", space={}, optimizer={"name": "random"}, budget={"trials": 4})
    before, known = _fetch_counts(cluster), {a.actor_id for a in cluster.workers()}
    driver = subprocess.Popen(["bash", str(SCRIPT), "run", str(exp), str(tmp_path / "run"), "--no-progress"],
                              env=cluster.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        _open_when_every_worker_waits(gate, len(WORKER_NODES), lambda: driver.poll() is None, "the driver ended")
        _, err = driver.communicate(timeout=TIMEOUT)
    finally:  # a driver left running would hold the nodes' slots in the next tests
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert driver.returncode == 0, err[-3000:]
    trials = RunFolder.open(tmp_path / "run").trials()
    assert sorted(t.trial for t in trials) == [0, 1, 2, 3] and all(t.ok for t in trials)
    placement = _placement(cluster, tmp_path / "run", known)
    assert placement.workers == Counter(WORKER_NODES) and set(placement.trials) == set(WORKER_NODES)
    fetched = _new_fetches(cluster, before)  # each worker node fetched A and B once, the head nothing
    assert fetched == {HEAD: Counter(), **{n: Counter([str(sources["model_1"]), str(sources["model_2"])])
                                           for n in WORKER_NODES}}


def test_driver_killed_and_resumed_on_the_same_cluster_continues_exactly(cluster, forkserver, sources, ps_run,
                                                                        tmp_path):
    """The driver SIGKILLed mid-generation (5 of 8 trials on disk), then `evomerge run --resume DIR --address`
    on the same cluster: the trials of the uninterrupted run (ps_run: CMA-ES, one worker per node); the killed
    driver's worker actors are dead (Ray's state API), and no worker of the run is left."""
    gate = Gate(tmp_path / "gate")
    exp = _experiment(tmp_path / "ps.yaml", _ps_models(sources), gate)
    run = tmp_path / "run"
    parts = Parts(forkserver, run, gate)
    known = {a.actor_id for a in cluster.workers()}
    parts.kill_at_lines(["run", str(exp), "--out", str(run), "--address", cluster.address], 5)  # mid-generation
    old = [a.actor_id for a in cluster.workers() if a.actor_id not in known]
    assert len(old) == 2
    gate.open()
    log = tmp_path / "resumed.log"
    pid = forkserver.run(["run", "--resume", str(run), "--address", cluster.address, "--no-progress"], str(log))
    _wait_exit(pid, log)
    assert _sorted(run) == ps_run.compared  # the uninterrupted run's trials (1 worker per node)
    states = {a.actor_id: a.state for a in cluster.workers()}
    assert all(states[a] == "DEAD" for a in old)  # the killed driver's workers were ended with it
    assert not [a for a, s in states.items() if s != "DEAD"]  # and the resumed run's at its end


def test_worker_node_killed_mid_run_its_trials_finish_on_the_surviving_node(cluster, forkserver, sources,
                                                                             tmp_path):
    """SIGKILL of every process of a worker node (its raylet and agents, and its worker, which Ray starts in a
    process group of its own) while its worker holds trials: they are retried on the other node, every trial
    is recorded once, the progress line counts the lost node. The replacement worker finds no room (the
    surviving node's slot is taken) and the run still ends. Runs last: the node stays lost."""
    gate = Gate(tmp_path / "gate")
    trials = 6
    exp = _experiment(tmp_path / "ps.yaml", _ps_models(sources), gate, optimizer={"name": "random"},
                      budget={"trials": trials})
    log = tmp_path / "driver.log"
    pid = forkserver.run(["run", str(exp), "--out", str(tmp_path / "run"), "--address", cluster.address], str(log))
    victim = WORKER_NODES[1]
    end = time.time() + TIMEOUT
    while True:  # until the victim's worker holds a scored trial (it waits for a ticket)
        waiting = {int(p.name.split("-")[1]) for p in gate.folder.glob("waiting-*")}
        held = [p.pid for p in cluster.processes(victim) if p.pid in waiting]
        if held:
            break
        assert _alive(pid) and time.time() < end, f"driver alive: {_alive(pid)}; {log.read_text()[-3000:]}"
        time.sleep(0.1)
    doomed = cluster.processes(victim)
    assert any("raylet" in p.name() for p in doomed)
    for p in doomed:  # the node's raylet, agents and workers, all at once
        p.send_signal(signal.SIGKILL)
    gate.open()
    text = _wait_exit(pid, log)
    records = RunFolder.open(tmp_path / "run").trials()
    assert sorted(r.trial for r in records) == list(range(trials)), text[-3000:]  # each once, none lost
    assert all(r.ok for r in records)
    retried = [r for r in records if r.attempts == 2]
    assert retried and all(r.pid != held[0] for r in records)  # what the lost node held finished elsewhere
    assert f"Ray node {victim} lost" in text and "nodes_lost=1" in text
