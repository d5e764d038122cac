"""Which trial runs on which worker: the queue, idle worker slots, retries after worker deaths, and budgets.

Plain bookkeeping, no Ray (tests/test_search_scheduler.py drives it without workers). Every worker has
``SLOTS_PER_WORKER`` slots: the second trial waits in the worker's own queue, so the worker starts it the moment
it finishes the first, without waiting for the driver's bookkeeping (record, tell, checkpoint) in between.

When a worker dies, the trial it was running (its oldest) counts an attempt and the one queued behind it never
started; both go back to the queue in trial order, unless the running one has used up its retries, then it is
a failed trial. A dead worker is replaced while replacements last (``MAX_REPLACEMENTS_PER_WORKER`` per worker).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from evomerge.errors import EvomergeError
from evomerge.search.stages import Stage

SLOTS_PER_WORKER = 2
MAX_REPLACEMENTS_PER_WORKER = 3


@dataclass(frozen=True)
class Death:
    """What follows a worker's death: the trial that ran out of retries (None if none) with its attempts,
    and whether a replacement worker may be started."""

    failed: int | None
    attempts: int
    replace: bool


@dataclass
class Scheduler:
    """The assignment of trials to worker slots (see module docstring).

    Args:
        queue: trial ids to run first (asked before a crash and not finished), in order.
        max_retries: how often a trial whose worker died is run again.
        workers: the number of workers (bounds the replacements).
    """

    queue: deque[int]
    max_retries: int
    workers: int
    idle: deque[int] = field(default_factory=deque)  # worker slots free to take a trial
    assigned: dict[int, list[int]] = field(default_factory=dict)  # worker -> its trials, running one first
    attempts: dict[int, int] = field(default_factory=dict)  # trial -> worker deaths while running it
    live: set[int] = field(default_factory=set)
    replacements: int = 0

    @classmethod
    def start(cls, queue: Iterable[int], max_retries: int, workers: int) -> Scheduler:
        """A scheduler with ``queue`` (sorted) and no worker ready yet."""
        return cls(deque(sorted(queue)), max_retries, workers)

    def worker_ready(self, worker: int) -> None:
        """A worker finished its setup: its slots become idle."""
        self.live.add(worker)
        self.idle.extend([worker] * SLOTS_PER_WORKER)

    def worker_lost(self, worker: int) -> None:
        """A worker died before it was ready (it held no trial)."""
        self.live.discard(worker)

    def next_assignment(self, ask: Callable[[], int | None]) -> tuple[int, int] | None:
        """The next (trial, worker): a queued trial first, else a new one from ``ask``.

        Returns:
            None when no slot is idle or ``ask`` has nothing (budget spent, generation barrier).
        """
        while self.idle and self.idle[0] not in self.live:  # slots of a worker that died meanwhile
            self.idle.popleft()
        if not self.idle:
            return None
        trial = self.queue.popleft() if self.queue else ask()
        if trial is None:
            return None
        worker = self.idle.popleft()
        self.assigned.setdefault(worker, []).append(trial)
        return trial, worker

    def finished(self, trial: int, worker: int) -> int:
        """A trial came back from its worker (ok or failed); the slot is free again.

        Returns:
            The trial's attempts (1 + the worker deaths it went through).
        """
        self.assigned[worker].remove(trial)
        if worker in self.live:
            self.idle.append(worker)
        return self.attempts.get(trial, 0) + 1

    def worker_died(self, worker: int, trial: int) -> Death:
        """The worker died while ``trial`` was in its hands (see module docstring)."""
        self.live.discard(worker)
        order = self.assigned.pop(worker, [trial])
        running = order[0]
        self.attempts[running] = self.attempts.get(running, 0) + 1
        retry = [t for t in order if t != running or self.attempts[t] <= self.max_retries]
        self.queue = deque(sorted([*self.queue, *retry]))
        replace = self.replacements < MAX_REPLACEMENTS_PER_WORKER * self.workers
        self.replacements += replace
        return Death(None if running in retry else running, self.attempts[running], replace)

    @property
    def has_idle(self) -> bool:
        """Whether a live worker has a free slot."""
        return any(w in self.live for w in self.idle)


@dataclass(frozen=True)
class StageBudget:
    """When a stage ends: at ``max_trials`` finished-or-running trials or at ``wall_until`` elapsed seconds of
    the run (stages share the wall time in order: stage i ends when the run's elapsed time reaches the sum of
    the wall budgets of stages 0..i, so a resumed run counts the time of every part)."""

    max_trials: float
    wall_until: float | None

    def left(self, finished: int, pending: int, elapsed_s: float) -> bool:
        """Whether another trial may be asked, with ``finished`` + ``pending`` trials of the stage so far."""
        if finished + pending >= self.max_trials:
            return False
        return self.wall_until is None or elapsed_s < self.wall_until


def stage_budget(stages: Sequence[Stage], index: int, population: int | None, optimizer: str) -> StageBudget:
    """The budget of stage ``index`` for an optimizer with ``population`` trials per generation.

    Raises:
        EvomergeError: ``budget.generations`` with an optimizer that has no population.
    """
    st = stages[index]
    limit = math.inf if st.trials is None else float(st.trials)
    if st.generations is not None:
        if not population:
            raise EvomergeError(f"budget.generations needs a population size for optimizer {optimizer} "
                                f"(set optimizer.population)")
        limit = min(limit, float(st.generations * population))
    wall = None
    if st.wall_time is not None:
        wall = sum(s.wall_time or 0.0 for s in stages[: index + 1])
    return StageBudget(limit, wall)
