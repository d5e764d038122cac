"""The search driver: optimizer <-> Ray workers, with the run folder as the single source of truth.

Flow of one trial: ``optimizer.ask`` -> state checkpoint -> a free worker materializes and evaluates ->
the record is appended to trials.jsonl (fsynced) -> ``optimizer.tell`` -> state checkpoint. Workers stay
busy: each worker holds up to two trials (one running, one queued behind it), refilled as soon as the
optimizer can propose (Optuna samplers and random always can; pycma waits for the rest of its generation).
There is no other barrier.

Ray: without ``address`` a local Ray is started for the run and stopped after it (RAY_TMPDIR kept local,
auth off, num_cpus from the workers); with ``address`` the run joins an existing cluster. The run folder
stays with the driver; workers only return metrics.

Failures: a candidate that raises, runs out of memory or scores NaN is a failed trial (the optimizer is told
so) and the search goes on. A worker process that dies mid-trial is replaced, and its candidate is retried
on another worker up to ``workers.max_retries`` times, then recorded as failed.

Resume (see run_folder.py for the write order): trials already in trials.jsonl are never re-run (told from
their line if the crash came before the tell was checkpointed); asked-but-unfinished trials are evaluated
again first, with their recorded genomes; the optimizer continues from its pickled state, so with a fixed
seed and one worker the trials are those of an uninterrupted run. The budget counts every part.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.experiment import Experiment, experiment_from_resolved, load_experiment
from evomerge.search.optimizers import Optimizer, build_optimizer
from evomerge.search.run_folder import RunFolder, dominates, pareto_front
from evomerge.search.search_space import SearchSpace, build_space

STATE_VERSION = 1
MAX_REPLACEMENTS_PER_WORKER = 3
# trials handed to a worker at once: the second waits in the actor's queue, so the worker starts it the moment
# it finishes the first, without waiting for the driver's bookkeeping (record, tell, checkpoint) in between
SLOTS_PER_WORKER = 2


# ----------------------------------------------------------------------------------------------------------
# stages, models, objectives

def stage_definitions(exp: Experiment) -> list[dict[str, Any]]:
    """[(name, space definition, trial budget, generation budget, wall budget)] for each stage of the search."""
    space = exp.space
    trials, gens, wall = exp.budget["trials"], exp.budget["generations"], exp.budget["wall_time"]
    if space["kind"] != "ps_dfs":
        return [{"name": space["kind"], "space": space, "trials": trials, "generations": gens, "wall_time": wall}]
    share = space["ps_share"]

    def part(v, s, whole=False):
        if v is None:
            return None
        return v * s if whole else max(1, int(round(v * s)))

    return [
        {"name": "ps", "space": space["ps"], "trials": part(trials, share), "generations": part(gens, share),
         "wall_time": part(wall, share, True)},
        {"name": "dfs", "space": space["dfs"],
         "trials": None if trials is None else max(1, trials - part(trials, share)),
         "generations": None if gens is None else max(1, gens - part(gens, share)),
         "wall_time": part(wall, 1 - share, True)},
    ]


def build_models(run: RunFolder, config: dict[str, Any]) -> dict[str, Any]:
    """Build the tiny local family that ``models.build`` asks for (once; atomically) and fill in the paths."""
    import transformers

    from evomerge import tiny

    transformers.utils.logging.disable_progress_bar()
    models = config["models"]
    build = models.get("build")
    if not build:
        return config
    kind = config["search_space"]["kind"]
    target = run.path / "models"
    for stale in run.path.glob(".models-*"):  # a build interrupted by a kill
        shutil.rmtree(stale, ignore_errors=True)
    if not (target / "base" / "config.json").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".models-", dir=run.path))
        kwargs = {k: v for k, v in build.items() if k not in ("arch", "n_variants", "seed", "scale")}
        tiny.make_family(tmp, n_variants=build["n_variants"], arch=build["arch"], seed=build["seed"],
                         scale=build.get("scale", 0.05), **kwargs)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    names = [f"model_{i}" for i in range(1, build["n_variants"] + 1)]
    if kind in ("ps", "ps_dfs"):
        models["base"] = str(target / "base")
        models["sources"] = {n: str(target / n) for n in names}
    if kind == "dfs":
        models["a"], models["b"] = str(target / names[0]), str(target / names[1])
    if kind == "ps_dfs":
        models["b"] = str(target / names[-1])
    run.update_config(config)
    return config


def objective_values(exp: Experiment, metrics: dict[str, float]) -> tuple[list[float] | None, str | None]:
    vals = []
    for o in exp.objectives:
        if o.metric not in metrics:
            return None, f"objective {o.metric} not among the metrics ({', '.join(sorted(metrics)) or 'none'})"
        vals.append(metrics[o.metric])
    return vals, None


def weighted_score(exp: Experiment, values: list[float]) -> float:
    return float(sum(o.weight * (v if o.direction == "maximize" else -v) for o, v in zip(exp.objectives, values)))


# ----------------------------------------------------------------------------------------------------------
# Ray

_REAPER: Any = None  # the watchdog of the embedded Ray started by this process (see reaper.py)


def start_ray(address: str | None, exp: Experiment) -> bool:
    """Connect to ``address`` or start an embedded local Ray; returns True when we started it."""
    import ray

    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TMPDIR", os.path.join(tempfile.gettempdir(), f"evomerge-ray-{os.getuid()}"))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # workers import custom evaluators from the experiment's python_path and the driver's cwd
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [*exp.python_path, os.getcwd(), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except Exception as exc:
            raise EvomergeError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
        return False
    w = exp.workers
    num_gpus = 0
    if w["device"] in ("auto",) or w["device"].startswith("cuda"):
        try:
            import torch

            num_gpus = torch.cuda.device_count()
        except Exception:
            num_gpus = 0
    os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
    # the embedded Ray lives on loopback: nothing of it listens on or talks to other addresses
    ray.init(num_cpus=max(1, math.ceil(w["count"] * w["cpus_per_worker"])), num_gpus=num_gpus,
             _temp_dir=os.environ["RAY_TMPDIR"], _node_ip_address="127.0.0.1", **kwargs)
    _start_reaper()
    return True


def _sigterm_as_interrupt():
    """Make SIGTERM (e.g. a scheduler's stop) end the run like Ctrl-C: the loop's clean-up runs and the run
    folder stays resumable. Returns a function that restores the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    return lambda: signal.signal(signal.SIGTERM, previous)


def stop_ray() -> None:
    """Stop the embedded Ray and its watchdog (a normal end: Ray stops its own processes)."""
    global _REAPER
    import ray

    ray.shutdown()
    if _REAPER is not None:
        _REAPER.kill()
        _REAPER.wait()
        _REAPER = None


def _start_reaper() -> None:
    """Watchdog that ends this run's Ray agents if the driver is SIGKILLed (see reaper.py)."""
    global _REAPER
    import subprocess

    import ray

    try:
        session_dir = ray._private.worker.global_worker.node.get_session_dir_path()
    except Exception:
        return
    _REAPER = subprocess.Popen([sys.executable, "-m", "evomerge.search.reaper", str(os.getpid()), session_dir],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)


def _gpus_per_worker(exp: Experiment) -> float:
    w = exp.workers
    if w["gpus_per_worker"] is not None:
        return float(w["gpus_per_worker"])
    if w["device"] == "cpu":
        return 0.0
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _source_blobs(paths: list[str]) -> dict[str, Any]:
    """Model folders as {relative path: bytes} in Ray's object store (for nodes without a shared disk)."""
    import ray

    blobs = {}
    for p in paths:
        files = {str(f.relative_to(p)): f.read_bytes() for f in Path(p).rglob("*") if f.is_file()}
        blobs[p] = ray.put(files)
    return blobs


# ----------------------------------------------------------------------------------------------------------
# the driver

class SearchDriver:
    def __init__(self, run: RunFolder, exp: Experiment, address: str | None, progress: bool = True):
        self.run = run
        self.exp = exp
        self.address = address
        self.progress = progress
        self.stages = stage_definitions(exp)
        self.records = run.trials()

    # -- state --------------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.state["elapsed_s"] + (time.monotonic() - self.part_start)

    def _save(self) -> None:
        self.state["elapsed_s_saved"] = self._elapsed()
        self.run.save_state(self.state)

    def _stage_models(self, stage: int) -> dict[str, Any]:
        models = dict(self.exp.models)
        if self.stages[stage]["name"] == "dfs" and self.exp.kind == "ps_dfs":
            models["a"] = str(self.run.path / "stages" / "ps_winner")
        return models

    def _new_optimizer(self, stage: int, space: SearchSpace) -> Optimizer:
        exp = self.exp
        return build_optimizer(exp.optimizer, space.dim, space.x0(), space.names,
                               [o.direction for o in exp.objectives], [o.weight for o in exp.objectives],
                               exp.pareto, exp.seed + 1000 * stage, str(self.run.path),
                               study_name=f"{exp.name}-{self.stages[stage]['name']}")

    # -- main -----------------------------------------------------------------------------------------------
    def run_search(self) -> None:
        self.state = self.run.load_state() or {"version": STATE_VERSION, "stage": 0, "next_trial": 0,
                                               "pending": {}, "elapsed_s": 0.0, "optimizer": None}
        self.state["elapsed_s"] = self.state.get("elapsed_s_saved", self.state["elapsed_s"])
        self.part_start = time.monotonic()
        if self._finished():
            return  # a finished run resumed: nothing to start
        we_started = start_ray(self.address, self.exp)
        restore_sigterm = _sigterm_as_interrupt()  # after ray.init, which installs a crash handler for it
        try:
            while True:
                stage = self.state["stage"]
                self._run_stage(stage)
                if stage + 1 == len(self.stages):
                    # the last stage keeps its optimizer: a resume with a larger budget continues it
                    break
                # asks that will never run (a wall-time stop): the optimizer forgets them
                self.state["pending"] = {}
                self.state["optimizer"].resolve_orphans(set())
                self._hand_over(stage)
                self.state["stage"] = stage + 1
                self.state["optimizer"] = None
                self._save()
        except KeyboardInterrupt:
            print(f"evomerge run: stopped; every finished trial is saved. Continue with: "
                  f"evomerge run --resume {self.run.path}", file=sys.stderr)
            raise
        finally:
            restore_sigterm()
            self.run.close()
            if we_started:
                stop_ray()

    def _finished(self) -> bool:
        stage = self.state["stage"]
        if stage + 1 < len(self.stages) or self.state["optimizer"] is None or self.state["pending"]:
            return False
        self.optimizer = self.state["optimizer"]
        done = sum(r.get("stage", 0) == stage for r in self.records)
        return not self._stage_budget_left(stage, done, 0)

    def _hand_over(self, stage: int) -> None:
        """ps_dfs: the PS winner becomes model A of the DFS stage (exported once, atomically)."""
        from evomerge.search.export import export_trial
        from evomerge.search.report import best_trial

        target = self.run.path / "stages" / "ps_winner"
        if (target / "config.json").is_file():
            return
        best = best_trial(self.records, self.exp, stage=stage)
        if best is None:
            raise EvomergeError("the PS stage has no successful trial; the DFS stage has no model A")
        target.parent.mkdir(parents=True, exist_ok=True)
        export_trial(self.run, self.exp, best, target, overwrite=True)

    def _stage_budget_left(self, stage: int, finished: int, pending: int) -> bool:
        st = self.stages[stage]
        limit = st["trials"]
        if st["generations"] is not None:
            pop = getattr(self.optimizer, "population", None)
            if not pop:
                raise EvomergeError(f"budget.generations needs a population size for optimizer "
                                    f"{self.exp.optimizer['name']} (set optimizer.population)")
            limit = min(limit or math.inf, st["generations"] * pop)
        if limit is not None and finished + pending >= limit:
            return False
        if st["wall_time"] is not None:
            # stages share the wall time in order: stage i ends when the run's elapsed time reaches the sum of
            # the wall budgets of stages 0..i (so a resumed run counts the time of every part)
            allotted = sum(s["wall_time"] or 0.0 for s in self.stages[: stage + 1])
            if self._elapsed() >= allotted:
                return False
        return True

    def _run_stage(self, stage: int) -> None:
        import ray

        exp = self.exp
        st = self.stages[stage]
        models = self._stage_models(stage)
        space = build_space(st["space"], models, exp.dtype)
        self.space = space
        if self.state["optimizer"] is None:
            self.state["optimizer"] = self._new_optimizer(stage, space)
            self._save()
        else:
            self.state["optimizer"].reattach(str(self.run.path))
        self.optimizer: Optimizer = self.state["optimizer"]
        pending: dict[int, dict[str, Any]] = self.state["pending"]

        # reconcile after a crash: finished-but-untold trials are told from their records
        by_id = {r["trial"]: r for r in self.records}
        for tid in sorted(pending):
            if tid in by_id:
                rec = by_id[tid]
                self.optimizer.tell(pending[tid]["key"], rec["objectives"] if rec["status"] == "ok" else None)
                del pending[tid]
        self.optimizer.resolve_orphans({p["key"] for p in pending.values()})
        self._save()
        queue = deque(sorted(pending))  # unfinished asks, evaluated again first, in order
        if not queue and not self._stage_budget_left(stage, len([r for r in self.records
                                                                 if r.get("stage", 0) == stage]), 0):
            return  # nothing left to do here (a finished stage, or a finished run resumed)

        self.by_id = {r["trial"]: r for r in self.records}
        self.objective_dicts = [{"metric": o.metric, "direction": o.direction} for o in self.exp.objectives]
        self.front = pareto_front(self.records, self.objective_dicts)
        stage_records = [r for r in self.records if r.get("stage", 0) == stage]
        self.n_done = len(stage_records)
        self.n_failed = sum(r["status"] != "ok" for r in stage_records)
        self.best = max((r["score"] for r in stage_records if r["status"] == "ok"), default=None)
        self._open_progress(st)

        setup = {"kind": space.kind, "initial": space.candidate(space.values(space.x0())),
                 "evaluators": [{"name": e.name, "spec": e.spec, "limit": e.limit, "seed": e.seed}
                                for e in exp.evaluators],
                 "device": exp.workers["device"], "threads": exp.workers["threads"], "dtype": exp.dtype,
                 "python_path": [*exp.python_path, os.getcwd()],
                 "memory": {"device_memory_gb": exp.workers.get("device_memory_gb"),
                            "sources": exp.workers.get("sources_mode", "auto")}}
        if space.kind == "ps":  # the planned memory per worker; refused here (exit 2) when nothing fits
            from evomerge.memory_plan import plan_worker_memory

            print(plan_worker_memory(setup["initial"], exp.workers).describe(), flush=True)
        if exp.workers["sources"] == "object_store":
            paths = [models["base"], *models["sources"].values()] if space.kind == "ps" else [models["a"], models["b"]]
            setup["blobs"] = _source_blobs(paths)
        from evomerge.search.worker import make_worker_class

        worker_cls = make_worker_class(exp.workers["cpus_per_worker"], _gpus_per_worker(exp))
        n_workers = exp.workers["count"]
        workers: dict[int, Any] = {}
        starting: dict[Any, int] = {}  # ready() ref -> worker id
        for w in range(n_workers):
            workers[w] = worker_cls.remote(dict(setup, worker=w))
            starting[workers[w].ready.remote()] = w
        next_worker_id = n_workers
        replacements = 0
        idle: deque[int] = deque()
        inflight: dict[Any, tuple[int, int]] = {}  # ref -> (trial id, worker id)
        assigned: dict[int, list[int]] = {}  # worker id -> its trials in flight, oldest (running) first
        attempts: dict[int, int] = {}
        checked_metrics = False

        try:
            while True:
                # hand out work to idle workers
                while idle:
                    if idle[0] not in workers:  # a slot of a worker that died meanwhile
                        idle.popleft()
                        continue
                    tid = queue.popleft() if queue else self._ask(stage)
                    if tid is None:
                        break
                    w = idle.popleft()
                    cand = space.candidate(space.values(pending[tid]["x"]))
                    inflight[workers[w].evaluate.remote(tid, cand)] = (tid, w)
                    assigned.setdefault(w, []).append(tid)
                if not inflight and not starting:
                    if not idle and (queue or self._stage_budget_left(stage, self.n_done, len(pending))):
                        raise EvomergeError("no live workers left (every worker died and the replacements "
                                            "ran out); the run can be resumed with --resume")
                    break
                ready, _ = ray.wait([*inflight, *starting], num_returns=1)
                ref = ready[0]
                if ref in starting:
                    w = starting.pop(ref)
                    try:
                        info = ray.get(ref)
                    except ray.exceptions.RayActorError:
                        workers.pop(w, None)
                        continue
                    if not info["ok"]:
                        raise EvomergeError(info["error"])
                    if not checked_metrics and info["metric_names"]:
                        checked_metrics = True
                        missing = [o.metric for o in exp.objectives if o.metric not in info["metric_names"]]
                        if missing:
                            raise EvomergeError(f"objective {missing[0]} is not a metric of the evaluators "
                                                f"(they report: {', '.join(info['metric_names'])})")
                    idle.extend([w] * SLOTS_PER_WORKER)
                    continue
                tid, w = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as exc:
                    # the worker died: the trial it was running (its oldest) counts an attempt; the one
                    # queued behind it never started. Both go back to the queue, in trial order.
                    order = assigned.pop(w, [tid])
                    workers.pop(w, None)
                    for other in [r for r, (_, ww) in inflight.items() if ww == w]:
                        inflight.pop(other)
                    if replacements < MAX_REPLACEMENTS_PER_WORKER * n_workers:
                        replacements += 1
                        nw = next_worker_id
                        next_worker_id += 1
                        workers[nw] = worker_cls.remote(dict(setup, worker=nw))
                        starting[workers[nw].ready.remote()] = nw
                    running = order[0]
                    attempts[running] = attempts.get(running, 0) + 1
                    retry = [t for t in order if t != running or attempts[t] <= exp.workers["max_retries"]]
                    queue = deque(sorted([*queue, *retry]))
                    if running not in retry:
                        self._finish(stage, running, {"trial": running, "worker": w, "status": "failed",
                                                      "metrics": {}, "seconds": None,
                                                      "error": f"worker died {attempts[running]} times: "
                                                               f"{type(exc).__name__}"})
                    continue
                result["attempts"] = attempts.get(tid, 0) + 1
                assigned[w].remove(tid)
                self._finish(stage, tid, result)
                if w in workers:
                    idle.append(w)
        finally:
            if self.bar is not None:
                self.bar.close()
            for actor in workers.values():
                try:
                    ray.kill(actor)
                except Exception:
                    pass

    def _ask(self, stage: int) -> int | None:
        """A new trial id with its genome in ``pending``, or None (budget spent or generation barrier).

        An ask made after the last checkpoint is lost in a crash; asking again from the checkpointed optimizer
        state reproduces it (same id, same genome: no tell happened in between, since every tell checkpoints).
        If that trial had already finished (its line is in trials.jsonl), it is told from its line, not run.
        """
        pending = self.state["pending"]
        while self._stage_budget_left(stage, self.n_done, len(pending)):
            asked = self.optimizer.ask()
            if asked is None:
                return None
            key, x = asked
            tid = self.state["next_trial"]
            self.state["next_trial"] += 1
            done = self.by_id.get(tid)
            if done is not None and done["x"] != x:
                # the checkpoint is older than the lines in an unreproducible way (several workers and a lost
                # disk cache): keep the old lines as they are and give this genome a fresh id
                tid = max(self.by_id) + 1
                self.state["next_trial"] = tid + 1
                done = None
            pending[tid] = {"key": key, "x": x, "stage": stage}
            if done is not None:
                self.optimizer.tell(key, done["objectives"] if done["status"] == "ok" else None)
                del pending[tid]
                self._save()
                continue
            if self.optimizer.persistent_ask:
                self._save()  # Optuna's ask has a side effect (a trial row in SQLite): checkpoint it
            return tid
        return None

    def _finish(self, stage: int, tid: int, result: dict[str, Any]) -> None:
        """Record, then tell, then checkpoint: the order resume relies on."""
        pending = self.state["pending"]
        entry = pending[tid]
        values = self.space.values(entry["x"])
        objectives, score = None, None
        status, error = result.get("status", "failed"), result.get("error")
        if status == "ok":
            objectives, error = objective_values(self.exp, result["metrics"])
            if objectives is None:
                status = "failed"
            else:
                score = weighted_score(self.exp, objectives)
        record = {"trial": tid, "stage": stage, "stage_name": self.stages[stage]["name"], "status": status,
                  "genome": values, "x": entry["x"], "metrics": result.get("metrics", {}),
                  "objectives": objectives, "score": score, "error": error, "worker": result.get("worker"),
                  "host": result.get("host"), "pid": result.get("pid"), "seconds": result.get("seconds"),
                  "materialize_s": result.get("materialize_s"), "evaluate_s": result.get("evaluate_s"),
                  "attempts": result.get("attempts", 1), "finished_at": time.time()}
        self.run.append_trial(record)
        self.records.append(record)
        self.by_id[tid] = record
        self.optimizer.tell(entry["key"], objectives if status == "ok" else None)
        del pending[tid]
        self._save()
        self.n_done += 1
        if status != "ok":
            self.n_failed += 1
        elif self.best is None or score > self.best:
            self.best = score
        if status == "ok":
            self._update_front(record)
        self._update_progress()

    def _update_front(self, record: dict[str, Any]) -> None:
        """Keep pareto.json current, incrementally: only a new non-dominated trial changes the front."""
        signs = [1.0 if o.direction == "maximize" else -1.0 for o in self.exp.objectives]

        def oriented(r):
            return [s * v for s, v in zip(signs, r["objectives"])]

        if self.front and self.front[0].get("stage", 0) != record.get("stage", 0):
            self.front = []
        new = oriented(record)
        if any(dominates(oriented(f), new) for f in self.front):
            return
        self.front = [f for f in self.front if not dominates(new, oriented(f))] + [record]
        self.run.write_pareto(self.front, self.objective_dicts)

    # -- progress ---------------------------------------------------------------------------------------------
    def _open_progress(self, st: dict[str, Any]) -> None:
        self.bar = None
        self.part_done0 = self.n_done
        self.rate_from: tuple[float, int] | None = None
        if not self.progress:
            return
        from tqdm import tqdm

        total = st["trials"]
        if st["generations"] is not None and getattr(self.optimizer, "population", None):
            total = min(total or math.inf, st["generations"] * self.optimizer.population)
        self.bar = tqdm(total=total, initial=self.n_done, desc=f"{self.exp.name}:{st['name']}", unit="trial",
                        file=sys.stderr, mininterval=0.5, dynamic_ncols=True)
        self._update_progress()

    def _update_progress(self) -> None:
        if self.bar is None:
            return
        # the rate counts from the first finished trial of this part (not Ray's and the workers' start-up)
        if self.rate_from is None and self.n_done > self.part_done0:
            self.rate_from = (time.monotonic(), self.n_done)
        rate = 0.0
        if self.rate_from is not None and self.n_done > self.rate_from[1]:
            rate = (self.n_done - self.rate_from[1]) / max(1e-9, time.monotonic() - self.rate_from[0]) * 3600
        if self.best is None:
            best = "-"
        elif len(self.exp.objectives) == 1:  # the objective itself, in its own direction
            o = self.exp.objectives[0]
            best = f"{self.best * (1 if o.direction == 'maximize' else -1) / (o.weight or 1):.4g}"
        else:
            best = f"{self.best:.4g} (weighted)"
        self.bar.set_postfix_str(f"best={best} failed={self.n_failed} trials/h={rate:.0f}", refresh=False)
        self.bar.n = self.n_done
        self.bar.refresh()


# ----------------------------------------------------------------------------------------------------------
# entry points

def default_out(exp: Experiment) -> Path:
    return Path("runs") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(experiment: str | Path | Experiment, out: str | Path | None = None, address: str | None = None,
              workers: int | None = None, seed: int | None = None, progress: bool = True) -> RunFolder:
    """`evomerge run EXPERIMENT.yaml`: validate, create the run folder, search."""
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    if workers is not None:
        if workers < 1:
            raise EvomergeError("--workers must be at least 1")
        exp.workers["count"] = workers
    if seed is not None:
        exp.seed = seed
    exp.raw["workers"] = dict(exp.workers)
    exp.raw["seed"] = exp.seed
    out_dir = Path(out) if out else (exp.out or default_out(exp))
    run = RunFolder.create(out_dir, exp.raw)
    config = build_models(run, run.config())
    exp = experiment_from_resolved(config)
    SearchDriver(run, exp, address, progress).run_search()
    return run


def resume_run(run_dir: str | Path, address: str | None = None, workers: int | None = None,
               progress: bool = True) -> RunFolder:
    """`evomerge run --resume DIR`: continue a run killed at any moment."""
    run = RunFolder.open(run_dir)
    run.repair_trials()
    config = run.config()
    if workers is not None:
        if workers < 1:
            raise EvomergeError("--workers must be at least 1")
        config["workers"]["count"] = workers
        run.update_config(config)
    config = build_models(run, config)
    exp = experiment_from_resolved(config)
    SearchDriver(run, exp, address, progress).run_search()
    return run
