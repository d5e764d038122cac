"""Objectives: orientation, scalarization, dominance and the Pareto front (the one place they are computed).

An experiment lists objectives ``{metric, direction, weight}``. Oriented, every objective is maximized
(minimized ones change sign). The weighted score is the weighted sum of the oriented values (the
scalarization told to single-objective optimizers and used to rank trials); with
``multi_objective: pareto`` the optimizer gets the raw vector instead. The Pareto front is the set of
successful trials that no other successful trial dominates in the oriented values (Deb et al., NSGA-II, 2002).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar


class Direction(str, enum.Enum):
    """Whether an objective is maximized or minimized (the YAML values ``maximize`` / ``minimize``)."""

    MAXIMIZE = "maximize"
    MINIMIZE = "minimize"


@dataclass(frozen=True)
class Objective:
    """One objective of an experiment: a metric (``EVALUATOR/METRIC``), its direction and its weight.

    ``direction`` is ``"maximize"`` or ``"minimize"``; ``weight`` (unitless) scales the objective in the
    weighted score.
    """

    metric: str
    direction: str = Direction.MAXIMIZE.value
    weight: float = 1.0

    @property
    def sign(self) -> float:
        """+1.0 for a maximized objective, -1.0 for a minimized one."""
        return 1.0 if self.direction == Direction.MAXIMIZE.value else -1.0

    def to_dict(self) -> dict[str, str | float]:
        """The YAML/JSON form ``{metric, direction, weight}``."""
        return {"metric": self.metric, "direction": self.direction, "weight": self.weight}


class Scored(Protocol):
    """What the Pareto front needs of a trial record."""

    @property
    def trial(self) -> int: ...

    @property
    def stage(self) -> int: ...

    @property
    def objectives(self) -> list[float] | None: ...

    @property
    def score(self) -> float | None: ...

    @property
    def ok(self) -> bool: ...

    @property
    def full(self) -> bool: ...


R = TypeVar("R", bound=Scored)


def as_objectives(items: Sequence[Objective | Mapping[str, object]]) -> list[Objective]:
    """Objectives from ``Objective``s or mappings ``{metric, direction[, weight]}`` (a run folder's config)."""
    out = []
    for o in items:
        if isinstance(o, Objective):
            out.append(o)
        else:
            weight = o.get("weight", 1.0)
            out.append(Objective(str(o["metric"]), str(o.get("direction", "maximize")),
                                 float(weight) if isinstance(weight, (int, float)) else 1.0))
    return out


def oriented(values: Sequence[float], objectives: Sequence[Objective]) -> list[float]:
    """The objective values with minimized ones negated, so that larger is better for every entry.

    Args:
        values: one raw value per objective, in the experiment's order.
        objectives: the experiment's objectives.

    Returns:
        ``[sign_k * values[k]]``.
    """
    return [o.sign * float(v) for o, v in zip(objectives, values)]


def scalarize(values: Sequence[float], objectives: Sequence[Objective]) -> float:
    """The weighted score to maximize: ``sum_k weight_k * sign_k * values[k]``.

    Args:
        values: one raw value per objective.
        objectives: the experiment's objectives (their weights and directions).

    Returns:
        The score as a Python float (larger is better).
    """
    return float(sum(o.weight * v for o, v in zip(objectives, oriented(values, objectives))))


def objective_values(metrics: Mapping[str, float], objectives: Sequence[Objective]
                     ) -> tuple[list[float] | None, str | None]:
    """The raw objective values read from a trial's metrics.

    Returns:
        ``(values, None)``, or ``(None, reason)`` when an objective's metric is missing.
    """
    vals = []
    for o in objectives:
        if o.metric not in metrics:
            return None, f"objective {o.metric} not among the metrics ({', '.join(sorted(metrics)) or 'none'})"
        vals.append(float(metrics[o.metric]))
    return vals, None


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when oriented point ``a`` is at least as good as ``b`` everywhere and better somewhere."""
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(records: Sequence[R], objectives: Sequence[Objective]) -> list[R]:
    """Successful trials that no other successful trial dominates, sorted by trial id.

    With one objective that is the best trial(s). Only trials of the last stage that has successful trials
    count (ps_dfs: the DFS stage, whose candidates build on the PS winner), and only fully scored ones (a
    trial stopped early or scored on a mini-batch by ``fitness: race | minibatch`` is not: search/fitness.py).

    Args:
        records: finished trials (any order).
        objectives: the experiment's objectives (directions orient the values).

    Returns:
        The non-dominated records of that stage.
    """
    ok = [t for t in records if t.ok and t.full and t.objectives is not None]
    if ok:
        last_stage = max(t.stage for t in ok)
        ok = [t for t in ok if t.stage == last_stage]
    pts = [oriented(t.objectives or [], objectives) for t in ok]
    front = [t for i, t in enumerate(ok) if not any(dominates(pts[j], pts[i]) for j in range(len(ok)) if j != i)]
    return sorted(front, key=lambda t: t.trial)


def update_front(front: list[R], record: R, objectives: Sequence[Objective]) -> list[R] | None:
    """The front after one more successful trial, or None when it is unchanged (the trial is dominated).

    A trial of a later stage than the front's starts a new front; a trial not fully scored changes nothing.
    """
    if not record.full:
        return None
    if front and front[0].stage != record.stage:
        front = []
    new = oriented(record.objectives or [], objectives)
    if any(dominates(oriented(f.objectives or [], objectives), new) for f in front):
        return None
    return [f for f in front if not dominates(new, oriented(f.objectives or [], objectives))] + [record]


def format_best(score: float | None, objectives: Sequence[Objective]) -> str:
    """A best score for display: with one objective the objective itself, in its own direction and units."""
    if score is None:
        return "-"
    if len(objectives) == 1:
        o = objectives[0]
        return f"{score * o.sign / (o.weight or 1):.4g}"
    return f"{score:.4g} (weighted)"


def best_trial(records: Sequence[R], stage: int | None = None) -> R | None:
    """The fully scored successful trial with the highest weighted score (ties: the earliest), of ``stage``
    (default: the last stage with such a trial); None when there is none."""
    ok = [r for r in records if r.ok and r.full and r.score is not None]
    if stage is None and ok:
        stage = max(r.stage for r in ok)
    ok = [r for r in ok if r.stage == stage]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.score or 0.0, -r.trial))
