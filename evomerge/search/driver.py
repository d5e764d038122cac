"""The search driver: optimizer <-> workers, with the run folder as the single source of truth.

One trial: ``optimizer.ask`` -> checkpoint -> a worker materializes and evaluates -> the record is appended to
trials.jsonl (fsynced) -> ``optimizer.tell`` -> checkpoint. Workers are refilled as soon as the optimizer can
propose (scheduler.py); there is no other barrier. A failed candidate (exception, OOM, NaN) is a failed trial;
a dead worker is replaced and its trial retried (scheduler.py).

Resume (see run_folder.py for the write order): trials in trials.jsonl are never re-run (told from their line
if the crash came before the tell was checkpointed); asked-but-unfinished trials run again first, with their
recorded genomes; the optimizer continues from its saved state, so with a fixed seed and one worker the trials
are those of an uninterrupted run. The budget counts every part.

Cheap fitness (``fitness: race | minibatch``, search/fitness.py): each trial is submitted with a plan whose
reference score comes from the stage's trials at least ``lag`` ids older (lag = the worker slots); a trial is
asked only once all of those have finished, so the plan is the same after a resume.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.memory_plan import plan_worker_memory
from evomerge.placement import worker_placement
from evomerge.recipe import Recipe
from evomerge.search import legacy
from evomerge.search.experiment import Experiment
from evomerge.search.export import export_ps_winner
from evomerge.search.fitness import FitnessMode, FitnessPlan, reference_score, trial_seed
from evomerge.search.objectives import pareto_front, update_front
from evomerge.search.optimizers import Optimizer, Problem, build_optimizer
from evomerge.search.pool import Died, Done, Event, Lost, Ready, WorkerPool, memory_options, worker_setup
from evomerge.search.progress import Progress
from evomerge.search.ray_runtime import check_cluster, gpus_per_worker, ray_session
from evomerge.search.records import Placement, TrialRecord, TrialResult, TrialStatus, record_of
from evomerge.search.run_folder import DriverState, PendingTrial, RunFolder
from evomerge.search.scheduler import SLOTS_PER_WORKER, Scheduler, StageBudget, stage_budget
from evomerge.search.search_space import SearchSpace
from evomerge.search.stages import Stage, stage_definitions, stage_space
from evomerge.search.worker import WorkerResources


@dataclass
class StageRun:
    """One stage being searched: its space and optimizer, its budget and its running tallies."""

    index: int
    stage: Stage
    space: SearchSpace
    optimizer: Optimizer
    budget: StageBudget
    done: int = 0
    failed: int = 0
    best: float | None = None  # the best weighted score so far
    nodes_lost: list[str] = field(default_factory=list)  # Ray nodes lost with workers on them (this part)
    items: int = 0  # item evaluations spent by the stage's finished trials
    front: list[TrialRecord] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress(False, None, 0, ""))
    memory_text: str | None = None  # the workers' memory plan, printed once the first worker is ready


class SearchDriver:
    """Runs (or resumes) the search of one run folder.

    Args:
        run: the run folder (config.yaml already resolved, models built).
        exp: the experiment read from it.
        address: a Ray cluster to join, or None for an embedded local Ray.
        progress: show a live progress bar on stderr.
    """

    def __init__(self, run: RunFolder, exp: Experiment, address: str | None = None, progress: bool = True):
        self.run = run
        self.exp = exp
        self.address = address
        self.show_progress = progress
        self.stages = stage_definitions(exp)
        self.records = run.trials()
        self.by_id = {r.trial: r for r in self.records}
        self.state = run.load_state() or DriverState()
        self.elapsed_before = self.state.elapsed_s  # seconds searched by earlier parts of the run
        self.part_start = time.monotonic()
        self._memory_texts: dict[int, str | None] = {}  # stage index -> its workers' memory plan, made once

    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.part_start)

    def _checkpoint(self, sr: StageRun) -> None:
        self.state.optimizer = sr.optimizer.state_dict()
        self.state.elapsed_s = self._elapsed()
        self.run.save_state(self.state)

    # -- main ---------------------------------------------------------------------------------------------
    def run_search(self, checked: Callable[[], None] | None = None) -> None:
        """Search every stage until its budget is spent (a finished run resumed does nothing).

        Before anything is written to the run folder, the cluster is checked (``check_cluster``: GPUs, custom
        resources) and the current stage's memory plan is made (refused if nothing fits); then ``checked`` is
        called (resume saves a changed worker count there).

        Raises:
            EvomergeError: the cluster cannot host the workers, nothing fits in memory, a worker cannot be set
                up, an objective is not a metric, or every worker died.
            KeyboardInterrupt: Ctrl-C or SIGTERM; every finished trial is saved and the run can be resumed.
        """
        if self._finished():
            return
        with ray_session(self.address, self.exp):
            check_cluster(self.exp)
            self._memory_text(self.state.stage)
            if checked is not None:
                checked()
            try:
                self._run_stages()
            except KeyboardInterrupt:
                print(f"evomerge run: stopped; every finished trial is saved. Continue with: "
                      f"evomerge run --resume {self.run.path}", file=sys.stderr)
                raise
            finally:
                self.run.close()

    def _run_stages(self) -> None:
        while True:
            index = self.state.stage
            sr = self._open_stage(index)
            try:
                self._search(sr)
                if index + 1 == len(self.stages):
                    return  # the last stage keeps its optimizer: a resume with a larger budget continues it
                self.state.pending = {}  # asks that will never run (a wall-time stop): the optimizer forgets them
                sr.optimizer.resolve_orphans(set())
            finally:
                sr.optimizer.close()
            export_ps_winner(self.run, self.exp, self.records, index)
            self.state.stage, self.state.optimizer = index + 1, None
            self.run.save_state(self.state)

    def _finished(self) -> bool:
        """Whether a resumed run has nothing left: last stage, no pending trial, budget spent."""
        st = self.state
        if st.stage + 1 < len(self.stages) or st.optimizer is None or st.pending:
            return False
        sr = self._open_stage(st.stage, checkpoint=False)
        sr.optimizer.close()
        return not sr.budget.left(sr.done, 0, self._elapsed())

    def _open_stage(self, index: int, checkpoint: bool = True) -> StageRun:
        """The stage's space and optimizer (restored from the checkpoint), reconciled with trials.jsonl, then
        checkpointed (unless ``checkpoint`` is False: a look that writes nothing)."""
        exp = self.exp
        space = stage_space(exp, self.run.path, index)
        problem = Problem(space.names, [float(v) for v in space.x0()], exp.objectives,
                          exp.optimizer_seed + 1000 * index, exp.optimizer, exp.pareto,
                          start_at_x0=space.kind == "dfs")
        optimizer = build_optimizer(problem, str(self.run.path), f"{exp.name}-{self.stages[index].name}")
        done = [r for r in self.records if r.stage == index]
        sr = StageRun(index, self.stages[index], space, optimizer,
                      stage_budget(self.stages, index, optimizer.population, exp.optimizer.name), done=len(done),
                      failed=sum(not r.ok for r in done), best=max((r.score for r in done if r.ok and r.full
                                                                    and r.score is not None), default=None),
                      items=sum(r.items or 0 for r in done), front=pareto_front(self.records, exp.objectives))
        saved, pending = self.state.optimizer, self.state.pending
        if saved is not None and saved.get("version") == legacy.LEGACY_VERSION:
            legacy.upgrade_optimizer(optimizer, saved, done)
            for p in pending.values():
                p.key = legacy.legacy_key(optimizer, p.key)
        elif saved is not None:
            optimizer.load_state_dict(saved)
        # reconcile after a crash: finished-but-untold trials are told from their records
        for tid in sorted(pending):
            rec = self.by_id.get(tid)
            if rec is not None:
                optimizer.tell(pending.pop(tid).key, rec.objectives if rec.ok else None)
        optimizer.recover_lost_asks({p.key for p in pending.values()})
        if checkpoint:
            self._checkpoint(sr)
        return sr

    def _memory_text(self, index: int) -> str | None:
        """The workers' planned memory for stage ``index`` (PS: a recipe), as printed lines; None for DFS.
        Planned once per stage (before anything is written, then again when the stage starts: the same plan).

        Raises:
            EvomergeError: nothing fits (memory_plan / placement).
        """
        if index not in self._memory_texts:
            self._memory_texts[index] = self._plan_memory(index)
        return self._memory_texts[index]

    def _plan_memory(self, index: int) -> str | None:
        initial = stage_space(self.exp, self.run.path, index)
        candidate = initial.decode(initial.x0())
        if not isinstance(candidate, Recipe):
            return None
        w, memory = self.exp.workers, memory_options(self.exp)
        if w.devices_per_worker > 1:
            return worker_placement(candidate, w.device, w.devices_per_worker, w.threads, memory).describe()
        return plan_worker_memory(candidate, w.device, w.threads, memory).describe()

    # -- one stage ----------------------------------------------------------------------------------------
    def _search(self, sr: StageRun) -> None:
        queue = sorted(self.state.pending)  # unfinished asks, evaluated again first, in order
        if not queue and not sr.budget.left(sr.done, 0, self._elapsed()):
            return  # nothing left to do here (a finished stage, or a finished run resumed)
        w = self.exp.workers
        sr.progress = Progress(self.show_progress, sr.budget.max_trials, sr.done, f"{self.exp.name}:{sr.stage.name}")
        self._show(sr)
        setup = worker_setup(self.exp, self.run.path, sr.index, sr.space)
        sr.memory_text = self._memory_text(sr.index)  # refused here (exit 2) if nothing fits
        scheduler = Scheduler.start(queue, w.max_retries, w.count)
        pool = WorkerPool(setup, WorkerResources(w.cpus_per_worker, gpus_per_worker(self.exp), w.resources))
        ended = False  # the stage's search ended normally: its nodes' source copies can go
        try:
            for _ in range(w.count):
                pool.start()
            while True:
                while (assignment := scheduler.next_assignment(lambda: self._ask(sr))) is not None:
                    tid, worker = assignment
                    pool.submit(worker, tid, sr.space.decode(self.state.pending[tid].x), self._plan(sr, tid))
                work_left = bool(scheduler.queue) or self._budget_left(sr)
                if pool.empty or (not pool.inflight and not work_left):  # replacements still starting (their
                    if work_left and not scheduler.has_idle:            # node may be gone) are not waited for
                        hint = "; the run can be resumed with --resume" if self.records else (
                            " before any trial finished")  # then start_run removes the run folder it made
                        raise EvomergeError(f"no live workers left (every worker died and the replacements "
                                            f"ran out){hint}")
                    ended = True
                    return
                self._handle(sr, pool.wait(), scheduler, pool)
        finally:
            sr.progress.close()
            pool.close(drop_sources=ended)

    @property
    def _lag(self) -> int:
        """How many ids older a trial's fitness reference must be (every worker slot may hold a newer trial)."""
        return SLOTS_PER_WORKER * self.exp.workers.count

    def _plan(self, sr: StageRun, tid: int) -> FitnessPlan | None:
        """Trial ``tid``'s fitness plan (None: full scoring), from the trials at least ``_lag`` ids older."""
        fitness = self.exp.fitness
        if fitness.mode == FitnessMode.FULL:
            return None
        window = fitness.window or sr.optimizer.population or 8
        reference = reference_score(self.records, tid, sr.index, self._lag, fitness, window)
        seed = self.exp.seed if fitness.seed is None else fitness.seed
        return FitnessPlan(fitness, trial_seed(seed, tid), reference, tuple(self.exp.objectives))

    def _reference_pending(self) -> bool:
        """Cheap fitness: whether a trial the next one's reference needs is still running (then wait)."""
        if self.exp.fitness.mode == FitnessMode.FULL:
            return False
        return any(t <= self.state.next_trial - self._lag for t in self.state.pending)

    def _budget_left(self, sr: StageRun) -> bool:
        return sr.budget.left(sr.done, len(self.state.pending), self._elapsed())

    def _handle(self, sr: StageRun, event: Event, scheduler: Scheduler, pool: WorkerPool) -> None:
        if isinstance(event, Ready):
            event.info.check(self.exp.objectives)
            self._show_memory(sr)  # after the workers' own checks: a refusal stays one line
            scheduler.worker_ready(event.worker)
        elif isinstance(event, Lost):
            self._show_memory(sr)  # a worker died loading: the plan helps to see why
            scheduler.worker_lost(event.worker)
        elif isinstance(event, Done):
            self._finish(sr, event.result, scheduler.finished(event.result.trial, event.worker))
        elif isinstance(event, Died):
            if event.node_lost is not None and event.node_lost not in sr.nodes_lost:
                sr.nodes_lost.append(event.node_lost)
                sr.progress.note(f"evomerge run: Ray node {event.node_lost} lost (worker {event.worker} died with "
                                 f"it); its trials are retried on the other workers")
                self._show(sr)
            death = scheduler.worker_died(event.worker, event.trial)
            if death.replace:
                pool.start()
            if death.failed is not None:
                error = f"worker died {death.attempts} times: {event.error}"
                self._finish(sr, TrialResult(death.failed, TrialStatus.FAILED, error=error, worker=event.worker),
                             death.attempts)

    @staticmethod
    def _show_memory(sr: StageRun) -> None:
        """Print the workers' memory plan once (stderr; stdout holds the run's YAML and summary only)."""
        if sr.memory_text is not None:
            sr.progress.note(sr.memory_text)
            sr.memory_text = None

    def _ask(self, sr: StageRun) -> int | None:
        """A new trial id with its genome in ``pending``, or None (budget spent or generation barrier).

        An ask made after the last checkpoint is lost in a crash; asking again from the checkpointed optimizer
        state reproduces it (same id, same genome: no tell happened in between, since every tell checkpoints).
        If that trial had already finished (its line is in trials.jsonl), it is told from its line, not run.
        """
        pending = self.state.pending
        while self._budget_left(sr) and not self._reference_pending():
            asked = sr.optimizer.ask()
            if asked is None:
                return None
            key, x = asked
            tid = self.state.next_trial
            self.state.next_trial += 1
            done = self.by_id.get(tid)
            if done is not None and done.x != x:
                # the checkpoint is older than the lines in an unreproducible way (several workers and a lost
                # disk cache): keep the old lines as they are and give this genome a fresh id
                tid = max(self.by_id) + 1
                self.state.next_trial = tid + 1
                done = None
            if done is not None:
                sr.optimizer.tell(key, done.objectives if done.ok else None)
                self._checkpoint(sr)
                continue
            pending[tid] = PendingTrial(key, x, sr.index)
            if sr.optimizer.persistent_ask:
                self._checkpoint(sr)  # Optuna's ask has a side effect (a trial row in SQLite): checkpoint it
            return tid
        return None

    def _finish(self, sr: StageRun, result: TrialResult, attempts: int) -> None:
        """Record, then tell, then checkpoint: the order resume relies on."""
        entry = self.state.pending[result.trial]
        record = record_of(result, Placement(sr.index, sr.stage.name, entry.x, attempts), sr.space,
                           self.exp.objectives)
        self.run.append_trial(record)
        self.records.append(record)
        self.by_id[record.trial] = record
        sr.optimizer.tell(entry.key, record.objectives if record.ok else None)
        del self.state.pending[record.trial]
        self._checkpoint(sr)
        sr.done += 1
        sr.items += record.items or 0
        if not record.ok:
            sr.failed += 1
        elif record.full and record.score is not None and (sr.best is None or record.score > sr.best):
            sr.best = record.score
        if record.ok and (front := update_front(sr.front, record, self.exp.objectives)) is not None:
            sr.front = front
            self.run.write_pareto(front, self.exp.objectives)
        self._show(sr)

    def _show(self, sr: StageRun) -> None:
        sr.progress.update(sr.done, sr.failed, sr.best, self.exp.objectives, sr.items, len(sr.nodes_lost))
