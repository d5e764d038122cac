"""Trial records: one finished trial, as the run folder writes it to trials.jsonl and every reader reads it.

Like Optuna's ``FrozenTrial`` / ``TrialState``: a frozen dataclass with a status enum. Names follow the
field: ``x`` is the genome (the vector in the unit cube the optimizer searches), ``params`` its decoded gene
values (declared ranges), ``candidate`` what the genome decodes to (a ``Recipe`` or a ``LayerPath``).
Records written by earlier releases (decoded values under ``genome``, no ``candidate``) are still read.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evomerge.search.candidates import Candidate, candidate_from_json, candidate_to_json
from evomerge.search.objectives import Objective, objective_values, scalarize
from evomerge.search.search_space import SearchSpace


class TrialStatus(str, enum.Enum):
    """How a trial ended: ``ok`` (scored) or ``failed`` (raised, ran out of memory, NaN, or its worker died)."""

    OK = "ok"
    FAILED = "failed"


@dataclass(frozen=True)
class TrialResult:
    """What a worker returns for one trial (times in seconds, wall clock)."""

    trial: int
    status: TrialStatus
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    worker: int | None = None
    host: str | None = None
    pid: int | None = None
    seconds: float | None = None
    materialize_s: float | None = None
    evaluate_s: float | None = None
    items: int | None = None
    full: bool = True


@dataclass(frozen=True)
class TrialRecord:
    """One finished trial (a line of trials.jsonl).

    Attributes:
        trial: the trial id (0, 1, ... over the whole run, all stages).
        stage: the stage index (0 for ps or dfs; ps_dfs: 0 = ps, 1 = dfs); ``stage_name`` its name.
        status: ``TrialStatus.OK`` or ``TrialStatus.FAILED`` (then ``error`` says why).
        x: the genome, one float in [0, 1] per gene.
        params: the decoded gene values {gene name: value in its declared range}.
        candidate: the decoded candidate (None in records of earlier releases).
        metrics: {"EVALUATOR/METRIC": value} as the evaluators reported them (non-finite values stored as None).
        objectives: the raw objective values in the experiment's order (None unless ok).
        score: the weighted score (see objectives.scalarize; None unless ok).
        worker, host, pid: where it ran; attempts: how many workers it took (retries after worker deaths).
        seconds, materialize_s, evaluate_s: wall-clock seconds in the worker (total, materialize, evaluate).
        finished_at: Unix time the driver recorded it.
        items: item evaluations the trial used, over all its evaluators (one item = one problem scored once;
            None when an evaluator does not count items, and in records of earlier releases).
        full: whether it was scored on the whole search split; ``fitness: race | minibatch`` trials stopped
            early are not, and cannot become the best trial or reach the Pareto front (search/fitness.py).
    """

    trial: int
    stage: int
    stage_name: str
    status: TrialStatus
    x: list[float]
    params: dict[str, float]
    candidate: Candidate | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    objectives: list[float] | None = None
    score: float | None = None
    error: str | None = None
    worker: int | None = None
    host: str | None = None
    pid: int | None = None
    seconds: float | None = None
    materialize_s: float | None = None
    evaluate_s: float | None = None
    attempts: int = 1
    finished_at: float | None = None
    items: int | None = None
    full: bool = True

    @property
    def ok(self) -> bool:
        """True for a scored trial."""
        return self.status == TrialStatus.OK

    def to_json(self) -> dict[str, Any]:
        """The trials.jsonl line as a mapping (strict JSON: non-finite floats become None)."""
        out: dict[str, Any] = {
            "trial": self.trial, "stage": self.stage, "stage_name": self.stage_name, "status": self.status.value,
            "params": dict(self.params), "x": list(self.x),
            "candidate": None if self.candidate is None else candidate_to_json(self.candidate),
            "metrics": dict(self.metrics), "objectives": self.objectives, "score": self.score, "error": self.error,
            "worker": self.worker, "host": self.host, "pid": self.pid, "seconds": self.seconds,
            "materialize_s": self.materialize_s, "evaluate_s": self.evaluate_s, "attempts": self.attempts,
            "finished_at": self.finished_at, "items": self.items, "full": self.full}
        return json_safe(out)  # type: ignore[no-any-return]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRecord:
        """Read a trials.jsonl line (this release's, or an earlier one's with ``genome`` and no candidate)."""
        cand = data.get("candidate")
        return cls(
            trial=int(data["trial"]), stage=int(data.get("stage", 0)), stage_name=str(data.get("stage_name", "")),
            status=TrialStatus(data.get("status", "failed")), x=[float(v) for v in data.get("x") or []],
            params=dict(data.get("params", data.get("genome")) or {}),
            candidate=None if cand is None else candidate_from_json(cand),
            metrics=dict(data.get("metrics") or {}), objectives=data.get("objectives"), score=data.get("score"),
            error=data.get("error"), worker=data.get("worker"), host=data.get("host"), pid=data.get("pid"),
            seconds=data.get("seconds"), materialize_s=data.get("materialize_s"),
            evaluate_s=data.get("evaluate_s"), attempts=int(data.get("attempts", 1)),
            finished_at=data.get("finished_at"), items=data.get("items"), full=bool(data.get("full", True)))


@dataclass(frozen=True)
class Placement:
    """Where a result belongs: the stage (index and name), the genome x, and the attempts it took."""

    stage: int
    stage_name: str
    x: list[float]
    attempts: int = 1


def record_of(result: TrialResult, where: Placement, space: SearchSpace, objectives: Sequence[Objective]
              ) -> TrialRecord:
    """The record of a worker's result: params and candidate decoded from x, objectives and score from the
    metrics (a result without an objective's metric becomes a failed trial)."""
    status, error = result.status, result.error
    values, score = None, None
    if status == TrialStatus.OK:
        values, error = objective_values(result.metrics, objectives)
        if values is None:
            status = TrialStatus.FAILED
        else:
            score = scalarize(values, objectives)
    return TrialRecord(
        trial=result.trial, stage=where.stage, stage_name=where.stage_name, status=status, x=list(where.x),
        params=space.values(where.x), candidate=space.decode(where.x), metrics=dict(result.metrics),
        objectives=values, score=score, error=error, worker=result.worker, host=result.host, pid=result.pid,
        seconds=result.seconds, materialize_s=result.materialize_s, evaluate_s=result.evaluate_s,
        attempts=where.attempts, finished_at=time.time(), items=result.items, full=result.full)


def json_safe(value: Any) -> Any:
    """NaN and infinities become None (recursively through dicts, lists and tuples) so JSON stays strict."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
