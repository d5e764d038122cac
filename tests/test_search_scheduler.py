"""The scheduler without Ray: slots, queue order, retries after worker deaths, replacements, budgets."""

from __future__ import annotations

from evomerge.search.scheduler import MAX_REPLACEMENTS_PER_WORKER, SLOTS_PER_WORKER, Scheduler, StageBudget


class Asker:
    """An optimizer stand-in that hands out trial ids 100, 101, ... up to a limit (then None: a barrier)."""

    def __init__(self, limit: int):
        self.next, self.limit = 100, 100 + limit

    def __call__(self) -> int | None:
        if self.next >= self.limit:
            return None
        self.next += 1
        return self.next - 1


def drain(s: Scheduler, ask) -> list[tuple[int, int]]:
    out = []
    while (a := s.next_assignment(ask)) is not None:
        out.append(a)
    return out


def test_queued_trials_go_first_then_new_asks_two_slots_per_worker():
    s = Scheduler.start([7, 3], max_retries=1, workers=2)
    assert drain(s, Asker(10)) == []  # no worker ready yet
    s.worker_ready(0)
    s.worker_ready(1)
    assert SLOTS_PER_WORKER == 2
    assert drain(s, Asker(10)) == [(3, 0), (7, 0), (100, 1), (101, 1)]
    assert s.assigned == {0: [3, 7], 1: [100, 101]} and not s.has_idle


def test_a_barrier_keeps_the_slot_idle():
    s = Scheduler.start([], max_retries=1, workers=1)
    s.worker_ready(0)
    assert drain(s, Asker(1)) == [(100, 0)]
    assert s.has_idle  # the optimizer had nothing: the slot waits
    assert s.finished(100, 0) == 1
    assert list(s.idle) == [0, 0]


def test_worker_death_retries_the_running_trial_then_fails_it():
    s = Scheduler.start([], max_retries=1, workers=1)
    s.worker_ready(0)
    assert drain(s, Asker(2)) == [(100, 0), (101, 0)]
    death = s.worker_died(0, 100)
    assert (death.failed, death.attempts, death.replace) == (None, 1, True)
    assert list(s.queue) == [100, 101] and not s.has_idle  # both back, in order; the dead worker's slots gone
    s.worker_ready(1)  # the replacement
    assert drain(s, Asker(0)) == [(100, 1), (101, 1)]
    death = s.worker_died(1, 101)  # dies again while running 100 (its oldest): 100 is out of retries
    assert (death.failed, death.attempts) == (100, 2)
    assert list(s.queue) == [101]
    s.worker_ready(2)
    assert drain(s, Asker(0)) == [(101, 2)]
    assert s.finished(101, 2) == 1  # 101 never ran when the workers died: no attempt counted


def test_replacements_run_out():
    s = Scheduler.start([], max_retries=100, workers=1)
    replaced = []
    for w in range(MAX_REPLACEMENTS_PER_WORKER + 2):
        s.worker_ready(w)
        drain(s, Asker(1) if w == 0 else Asker(0))
        replaced.append(s.worker_died(w, 100).replace)
    assert replaced == [True] * MAX_REPLACEMENTS_PER_WORKER + [False, False]


def test_a_dead_workers_slots_are_skipped():
    s = Scheduler.start([], max_retries=1, workers=2)
    s.worker_ready(0)
    s.worker_ready(1)
    assert s.next_assignment(Asker(1)) == (100, 0)
    s.worker_died(0, 100)
    assert drain(s, Asker(0)) == [(100, 1)]  # the queued retry goes to worker 1, never to dead worker 0's slot


def test_stage_budget_counts_running_trials_and_the_shared_wall_time():
    b = StageBudget(max_trials=10, wall_until=60.0)
    assert b.left(5, 4, 0.0) and not b.left(6, 4, 0.0) and not b.left(0, 0, 60.0)
    assert StageBudget(float("inf"), None).left(10**6, 10**6, 1e9)
