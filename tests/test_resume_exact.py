"""Resume is exact: a search killed with SIGKILL at any point and resumed writes the trials.jsonl of the
uninterrupted run (same trial ids, genomes, metrics, statuses), for every optimizer.

Real processes throughout: `evomerge run` command lines (the CLI's main, in processes forked from a server that
imported the heavy modules once, see cli_forkserver.py) join the session's local Ray (conftest's
``ray_address``) and are killed with SIGKILL; the Optuna optimizers keep their study in the run folder's SQLite.

How a kill point is chosen without sleeping (see resume_gate.py): every evaluation, once scored, waits for a
ticket file before it returns. Handing out K - L tickets to a run that has L lines lets it write exactly K lines;
the test kills the driver the moment the K-th line is on disk, which lands in the driver's bookkeeping of that
trial (the tell, the checkpoint, the next ask) or in its wait for the next result, and the resumed run must be
exact from wherever it landed. The kill during a state write is made deterministic with a named pipe put where
the checkpoint's temporary file goes (run_folder.atomic_write_bytes writes ``.state.json.tmp``): opening it for
writing blocks until a reader comes, which none does; the test kills the driver once the kernel reports it
waiting there (``/proc/PID/wchan`` is ``wait_for_partner``), i.e. after the resumed driver told the trials it
found finished but untold (and put the Optuna asks its checkpoint lacks back to WAITING), before that checkpoint
reached the disk. The pipe is then removed (a real crash leaves at most a partial temporary file, which the next
write truncates; a kill in the middle of a write leaves one, which the pipe replaces).

Each optimizer's run (population 4, 12 trials) is killed at two of these points in turn (KILL_POINTS), then
resumed to the end; every kind of point is taken by two optimizers (the full cross product took minutes more).
The narrowest windows are pinned at the optimizer, deterministically, at the end of this file: a CMA-ES
state_dict saved mid-generation in one process and told in other processes (other hash salts), an Optuna ask
committed to SQLite but lost with its checkpoint. With two workers, the optimizers whose asks do not depend on
completion order (cmaes, optuna_cmaes, nsga2: whole generations asked at once behind a barrier; random: tells
are ignored) give the one-worker run's trials; a two-worker run is killed and resumed here for cmaes and
optuna_cmaes (test_search_config.py tells generations of cmaes, optuna_cmaes and nsga2 out of order, without
Ray). TPE's asks see whichever trials finished first, so it is checked with one worker only.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cli_forkserver import ForkServer
from evomerge.search.experiment import OptimizerConfig
from evomerge.search.launch import resume_run, start_run
from evomerge.search.objectives import Objective
from evomerge.search.optimizers import Problem, build_optimizer
from evomerge.search.run_folder import RunFolder

GATE = Path(__file__).resolve().with_name("resume_gate.py")
HELPERS = GATE.with_name("search_helpers.py")
BUDGET = 12
OPTIMIZERS = {
    "cmaes": {"name": "cmaes", "population": 4},
    "tpe": {"name": "tpe"},
    "optuna_cmaes": {"name": "optuna_cmaes", "population": 4},
    "nsga2": {"name": "nsga2", "population": 4},
    "random": {"name": "random"},
}
STATE_WRITE = "state write"
# kill points (trials on disk when killed), one run killed at each in turn, then resumed to the end. With a
# population of 4: 2 = first generation, 6 = mid-generation, 8 = the trial that closes a generation (its tell
# is CMA-ES's update; Optuna's generational samplers then ask the next generation), 11 = the last trial running.
# Each kind is taken by two optimizers, not the full cross product (each kill costs a driver and a worker
# started, seconds on a 2-core CI machine); CMA-ES is killed after every trial at the optimizer (end of the file).
KILL_POINTS = {
    "cmaes": [6, 8],  # the case (mid-generation), then the tell that updates the strategy
    "optuna_cmaes": [8, STATE_WRITE],  # the next generation asked (SQLite rows), then the resumed driver's write
    "nsga2": [2, BUDGET - 1],
    "tpe": [6, STATE_WRITE],
    "random": [2, BUDGET - 1],
}
# cheap fitness (evomerge/search/fitness.py): a trial's race reference comes from older trials' records, so a
# resume must rebuild every pending trial's plan exactly. Killed mid-race: the run stops inside a trial's first
# checkpoint (resume_gate.gated_items takes its ticket there), with older trials stopped early or fully scored.
# 36 items, checkpoints 6, 18, 36; a mini-batch of 6 then the other 30 when it reaches the best.
FITNESS_CASES = {
    "cmaes-race": ({"name": "cmaes", "population": 4},
                   {"mode": "race", "min_items": 6, "growth": 3, "confidence": 0.6}, [5, 9]),
    "tpe-minibatch": ({"name": "tpe"}, {"mode": "minibatch", "batch_items": 6}, [7]),
}
# what must be equal between the resumed and the uninterrupted run (not who ran it, when, or how fast)
COMPARED = ("trial", "stage", "status", "x", "params", "candidate", "metrics", "objectives", "score", "error",
            "items", "full")


class Gate:
    """The test's side of resume_gate.gated: hand out tickets, open the gate, reap waiting workers."""

    def __init__(self, folder: Path):
        self.folder = folder
        folder.mkdir()
        shutil.copy(GATE, folder / GATE.name)
        shutil.copy(HELPERS, folder / HELPERS.name)  # resume_gate imports it from its own folder
        (folder / "GATE").touch()
        self.count = itertools.count()

    def tickets(self, n: int) -> None:
        for _ in range(n):
            (self.folder / f"ticket-{next(self.count):06d}").touch()

    def open(self) -> None:
        (self.folder / "open").touch()

    def reap(self, timeout: float = 60) -> None:
        """Wait until the workers of a killed driver are gone (Ray ends a dead job's actors), so that none of
        them claims a ticket meant for the next part; drop unclaimed tickets."""
        end = time.time() + timeout
        for marker in self.folder.glob("process-*"):
            pid = int(marker.name.split("-")[1])
            if pid == os.getpid():
                continue
            while _alive(pid):
                assert time.time() < end, f"worker {pid} of a killed driver is still alive"
                time.sleep(0.05)
            marker.unlink()
        for ticket in self.folder.glob("ticket-*"):
            ticket.unlink()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wchan(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return ""


def _lines(run_dir: Path) -> int:
    p = run_dir / "trials.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _experiment(tmp: Path, family, optimizer: dict, gate: Gate, workers: int = 1, fitness: dict | None = None
                ) -> Path:
    exp = {
        "name": "exact",
        "models": {"base": str(family["base"]),
                   "sources": {"m1": str(family["model_1"]), "m2": str(family["model_2"])}},
        "search_space": "ps_ties_dare",
        "space": {"group_size": "model"},
        "evaluators": [{"name": "e", "spec": {"type": "custom", "function": f"{gate.folder / GATE.name}:gated",
                                              "kwargs": {"gate": str(gate.folder)}}}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}],
        "optimizer": {**optimizer, "sigma0": 0.25} if "cmaes" in optimizer["name"] else optimizer,
        "budget": {"trials": BUDGET},
        "workers": {"count": workers, "threads": 1},
        "seed": 3,
    }
    if fitness is not None:
        first = fitness.get("min_items", fitness.get("batch_items"))
        exp["evaluators"][0]["spec"].update(function=f"{gate.folder / GATE.name}:gated_items",
                                            kwargs={"gate": str(gate.folder), "first": first})
        exp["objectives"] = [{"metric": "e/acc", "direction": "maximize"}]
        exp["fitness"] = fitness
    path = tmp / f"{optimizer['name']}-{workers}.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


class Parts:
    """The parts of a killed run: `evomerge run` command lines started through the fork server (forks of one
    process that imported torch, Ray, ... once; see cli_forkserver.py), each killed with SIGKILL."""

    def __init__(self, server: ForkServer, run_dir: Path, gate: Gate):
        self.server, self.run_dir, self.gate = server, run_dir, gate
        self.logs: list[Path] = []

    def _start(self, args: list[str]) -> int:
        log = self.run_dir.parent / f"part{len(self.logs)}.log"
        self.logs.append(log)
        return self.server.run([*args, "--no-progress"], str(log))

    def _check(self, pid: int, end: float, what: str) -> None:
        if not _alive(pid):
            pytest.fail(f"the run ended before {what}: {self.logs[-1].read_text()[-3000:]}")
        assert time.time() < end, f"the run never reached {what}"

    @staticmethod
    def _kill(pid: int) -> None:
        os.killpg(pid, signal.SIGKILL)
        while _alive(pid):
            time.sleep(0.005)

    def kill_at_lines(self, args: list[str], lines: int, timeout: float = 180) -> None:
        """Run `evomerge ARGS` until trials.jsonl has ``lines`` lines, then SIGKILL it."""
        self.gate.tickets(lines - _lines(self.run_dir))
        pid = self._start(args)
        end = time.time() + timeout
        while _lines(self.run_dir) < lines:
            self._check(pid, end, f"{lines} trials")
            time.sleep(0.005)
        self._kill(pid)
        assert _lines(self.run_dir) == lines  # the tickets let no other trial finish
        self.gate.reap()

    def kill_during_state_write(self, args: list[str], timeout: float = 180) -> None:
        """Run `evomerge ARGS` with the checkpoint's temporary file replaced by a named pipe; SIGKILL the driver
        while it waits to write its first checkpoint there."""
        pipe = self.run_dir / ".state.json.tmp"
        pipe.unlink(missing_ok=True)  # what an earlier kill left in the middle of a write (the next one truncates it)
        os.mkfifo(pipe)
        pid = self._start(args)
        end = time.time() + timeout
        while _wchan(pid) != "wait_for_partner":
            self._check(pid, end, "its first state write")
            time.sleep(0.005)
        self._kill(pid)
        pipe.unlink()
        self.gate.reap()


def _compared(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in t.to_json().items() if k in COMPARED} for t in RunFolder.open(run_dir).trials()]


@pytest.fixture(scope="module")
def uninterrupted(ray_address, llama_family, tmp_path_factory):
    """The uninterrupted one-worker run of each optimizer (made on first use), as compared records."""
    runs: dict[str, list[dict]] = {}

    def get(name: str) -> list[dict]:
        if name not in runs:
            tmp = tmp_path_factory.mktemp(f"straight-{name}")
            gate = Gate(tmp / "gate")
            gate.open()
            if name in FITNESS_CASES:
                optimizer, fitness, _ = FITNESS_CASES[name]
                exp = _experiment(tmp, llama_family, optimizer, gate, fitness=fitness)
            else:
                exp = _experiment(tmp, llama_family, OPTIMIZERS[name], gate)
            start_run(exp, out=tmp / "run", address=ray_address, progress=False)
            runs[name] = _compared(tmp / "run")
            assert [t["trial"] for t in runs[name]] == list(range(BUDGET))
            assert all(t["status"] == "ok" for t in runs[name])
        return runs[name]

    return get


@pytest.fixture(scope="module")
def forkserver():
    server = ForkServer()
    yield server
    server.close()


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_killed_at_every_kind_of_point_then_resumed_is_the_uninterrupted_run(name, uninterrupted, forkserver,
                                                                             ray_address, llama_family, tmp_path):
    gate = Gate(tmp_path / "gate")
    exp = _experiment(tmp_path, llama_family, OPTIMIZERS[name], gate)
    run = tmp_path / "run"
    parts = Parts(forkserver, run, gate)
    seen = []
    for i, point in enumerate(KILL_POINTS[name]):
        args = ["run", str(exp), "--out", str(run)] if i == 0 else ["run", "--resume", str(run)]
        args += ["--address", ray_address]
        if point == STATE_WRITE:
            parts.kill_during_state_write(args)
        else:
            parts.kill_at_lines(args, point)
        seen.append(_compared(run))
    gate.open()
    resume_run(run, address=ray_address, progress=False)

    expected = uninterrupted(name)
    assert [len(s) for s in seen] == [len(seen[i - 1]) if p == STATE_WRITE else p
                                      for i, p in enumerate(KILL_POINTS[name])]
    for before in seen:  # every finished trial is kept as it was
        assert before == expected[: len(before)]
    assert _compared(run) == expected
    # each trial evaluated to the end once (the tickets of the last kill point; after it the gate was open)
    assert len(list(gate.folder.glob("used-ticket-*"))) == max(p for p in KILL_POINTS[name] if p != STATE_WRITE)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cmaes", "optuna_cmaes"])
def test_two_workers_killed_and_resumed_give_the_one_worker_trials(name, uninterrupted, forkserver, ray_address,
                                                                   llama_family, tmp_path):
    gate = Gate(tmp_path / "gate")
    exp = _experiment(tmp_path, llama_family, OPTIMIZERS[name], gate, workers=2)
    run = tmp_path / "run"
    Parts(forkserver, run, gate).kill_at_lines(["run", str(exp), "--out", str(run), "--address", ray_address], 5)
    gate.open()
    resume_run(run, address=ray_address, progress=False)
    trials = _compared(run)
    assert sorted(t["trial"] for t in trials) == list(range(BUDGET))
    assert sorted(trials, key=lambda t: t["trial"]) == uninterrupted(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FITNESS_CASES))
def test_killed_mid_race_then_resumed_is_the_uninterrupted_run(name, uninterrupted, forkserver, ray_address,
                                                               llama_family, tmp_path):
    optimizer, fitness, points = FITNESS_CASES[name]
    gate = Gate(tmp_path / "gate")
    exp = _experiment(tmp_path, llama_family, optimizer, gate, fitness=fitness)
    run = tmp_path / "run"
    parts = Parts(forkserver, run, gate)
    seen = []
    for i, point in enumerate(points):
        args = ["run", str(exp), "--out", str(run)] if i == 0 else ["run", "--resume", str(run)]
        parts.kill_at_lines([*args, "--address", ray_address], point)
        seen.append(_compared(run))
    gate.open()
    resume_run(run, address=ray_address, progress=False)

    expected = uninterrupted(name)
    # the case is one: trials stopped early (or mini-batch only) and fully scored ones, before the kills too
    assert {t["full"] for t in expected[: points[0]]} == {True, False}
    assert all(t["items"] < 36 for t in expected if not t["full"]) and all(t["items"] == 36 for t in expected
                                                                           if t["full"])
    for before in seen:
        assert before == expected[: len(before)]
    assert _compared(run) == expected


# ----------------------------------------------------------------------------------------------------------
# the two states that a resume used to re-derive differently, pinned at the optimizer (no Ray, a second each)

def _objective(x: list[float]) -> list[float]:
    """A fixed landscape in the unit cube (smooth, one maximum off-centre)."""
    return [-sum((v - 0.3 - 0.1 * i) ** 2 for i, v in enumerate(x)) + 0.2 * math.sin(9 * x[0])]


def _optimizer(name: str, run_dir: str | Path):
    problem = Problem(list("abcd"), [0.5] * 4, [Objective("e/std", "maximize", 1.0)], seed=3,
                      options=OptimizerConfig(name=name, sigma0=0.25, population=4))
    return build_optimizer(problem, str(run_dir), "s")


def _ask_tell(opt, n: int) -> list[list[float]]:
    xs = []
    for _ in range(n):
        key, x = opt.ask()
        opt.tell(key, _objective(x))
        xs.append(x)
    return xs


CMAES_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[2])
from test_resume_exact import _ask_tell, _objective, _optimizer
rest = []
for case in json.loads(open(sys.argv[1]).read()):
    opt = _optimizer("cmaes", sys.argv[2])
    opt.load_state_dict(case["state"])
    key, x = case["asked"] or opt.ask()  # told as asked before the kill, or asked again from the checkpoint
    opt.tell(key, _objective(x))
    rest.append([x, *_ask_tell(opt, case["left"])])
open(sys.argv[1], "w").write(json.dumps(rest))
"""


def test_cmaes_state_saved_mid_generation_tells_alike_in_other_processes(tmp_path):
    """pycma looks told solutions up by ``hash(x.tobytes())``, salted per process: a generation saved in one
    process and told in another used to be told as unknown solutions, whose length pycma clips to
    sqrt(n) + 2n/(n+2) Mahalanobis units, so the search went elsewhere whenever a member was that far out.
    Killed after each trial of 12 generations, its state_dict saved as JSON (before trial k's ask, as the
    driver checkpoints, and after it, the trial out), then loaded and told in child processes with two other
    hash salts: the same trials as the uninterrupted run."""
    total = 48
    straight = _ask_tell(_optimizer("cmaes", tmp_path), total)
    cases = []
    for k in range(total):
        opt = _optimizer("cmaes", tmp_path)
        _ask_tell(opt, k)
        cases.append({"state": opt.state_dict(), "asked": None, "left": total - k - 1})
        asked = opt.ask()  # trial k asked (its genome evaluated); the process dies before its tell
        cases.append({"state": opt.state_dict(), "asked": asked, "left": total - k - 1})
    children = []
    for seed in ("1", "2"):
        path = tmp_path / f"killed-{seed}.json"
        path.write_text(json.dumps(cases))
        children.append((path, subprocess.Popen([sys.executable, "-c", CMAES_CHILD, str(path),
                                                 str(Path(__file__).parent)],
                                                env=dict(os.environ, PYTHONHASHSEED=seed))))
    for path, child in children:
        assert child.wait(timeout=300) == 0
        resumed = json.loads(path.read_text())
        assert len(resumed) == 2 * total
        for i, rest in enumerate(resumed):
            assert rest == straight[i // 2:], f"{path.name}: killed at trial {i // 2} " \
                                              f"({'after' if i % 2 else 'before'} its ask)"


@pytest.mark.parametrize("name", ["tpe", "optuna_cmaes", "nsga2"])
def test_an_optuna_ask_lost_in_a_crash_is_asked_again_alike(name, tmp_path):
    """An Optuna ask commits its trial to SQLite before the driver's checkpoint records it. After a crash in
    between, the resumed optimizer (built anew in the same run folder, its state_dict loaded from the older
    checkpoint, the lost asks put back to WAITING as the driver does on resume) must propose that trial again,
    same number and parameters, and go on as the uninterrupted run did."""
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    straight = _ask_tell(_optimizer(name, tmp_path / "straight"), 14)
    opt = _optimizer(name, tmp_path / "killed")
    _ask_tell(opt, 8)
    checkpoint = json.dumps(opt.state_dict())
    lost_key, lost_x = opt.ask()  # in SQLite (with the rest of its generation), not in the checkpoint
    opt.close()
    resumed = _optimizer(name, tmp_path / "killed")
    resumed.load_state_dict(json.loads(checkpoint))
    resumed.recover_lost_asks(set())  # no trial was pending at the checkpoint
    key, x = resumed.ask()
    assert (key, x) == (lost_key, lost_x)
    resumed.tell(key, _objective(x))
    assert [x, *_ask_tell(resumed, 5)] == straight[8:]
    states = [t.state.name for t in resumed.study.get_trials()]
    assert states[:14] == ["COMPLETE"] * 14 and "FAIL" not in states  # taken up under its own number
