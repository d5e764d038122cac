"""Cheap fitness: score a candidate on part of the search split (``fitness:`` in the experiment YAML).

Three modes (``FitnessMode``):

- ``full`` (the default): every candidate is scored on every item of every evaluator.
- ``race``: the objective's evaluator scores the candidate on a seeded permutation of its items, in growing
  prefixes (checkpoints ``min_items``, ``growth`` x that, ... up to all items: successive halving's schedule).
  At each checkpoint a confidence bound on the candidate's accuracy over the WHOLE split is computed; when even
  the optimistic end of it cannot beat the reference (the incumbent: the best fully scored trial, or a quantile
  of recent trials' scores, ``against``), the candidate is stopped there. Survivors are scored on every item.
  This is racing (Maron & Moore 1994, Hoeffding races) with the checkpoints of successive halving (Jamieson &
  Talwalkar 2016) against a fixed reference.
- ``minibatch``: every evaluation scores a fresh seeded subset of ``batch_items`` items per objective evaluator
  (the paper's DFS fitness: Akiba et al. 2024, mini-batches of 200); a candidate whose estimate reaches the
  reference is then scored on the rest of the split, so that it can become the best trial.

What the optimizer receives (``TrialRecord.objectives``, told as any other trial's): for a stopped or
mini-batch-only candidate, the metric's mean over the items it was scored on (an unbiased estimate for a fixed
number of random items; for a stopped candidate biased low by the stopping itself, which only happens to
candidates whose bound already fell below the reference, so their rank below the survivors is kept with the
bound's confidence). Such trials have ``full: false``; only ``full`` trials can be the best trial or reach the
Pareto front (objectives.best_trial / pareto_front).

The bound: with ``n`` of ``N`` items scored at mean ``m``, a one-sided bound ``hi`` on the mean of the items not
scored yet (Wilson score, Hoeffding, or empirical Bernstein: Maurer & Pontil 2009, Thm 4) gives the bound on the
whole split ``(n m + (N - n) hi) / N`` (exact at n = N). The error probability ``1 - confidence`` is split evenly
over the checkpoints (a union bound), so a candidate better than the reference is stopped with at most that
probability over its whole race.

The reference of trial ``t`` comes only from the stage's trials with ids <= t - lag (lag = the worker slots,
2 x workers.count), and the driver asks trial t only when all of those have finished. So the reference is a
function of trials already on disk when t was asked: a resumed run computes the same one, and one worker's
trials do not depend on timing. Different ``workers.count`` give different references (and trials).
"""

from __future__ import annotations

import enum
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from evomerge.errors import EvomergeError
from evomerge.search.objectives import Objective, Scored, scalarize


class FitnessMode(str, enum.Enum):
    """How much of the search split a candidate is scored on (see module docstring)."""

    FULL = "full"
    RACE = "race"
    MINIBATCH = "minibatch"


class Bound(str, enum.Enum):
    """The confidence bound on an accuracy (values in [0, 1]) used by ``race``."""

    WILSON = "wilson"
    HOEFFDING = "hoeffding"
    BERNSTEIN = "bernstein"


class Against(str, enum.Enum):
    """What a raced candidate must be able to beat: the best fully scored trial, or a quantile of the scores of
    the last ``window`` trials (CMA-ES ranks a generation: its parents are the top half, ``quantile: 0.5``)."""

    BEST = "best"
    QUANTILE = "quantile"


@dataclass(frozen=True)
class FitnessConfig:
    """``fitness:`` of an experiment.

    Attributes:
        mode: ``full``, ``race`` or ``minibatch``.
        min_items: race: the first checkpoint (items).
        growth: race: each checkpoint is ceil(growth x the previous one), the last one all items (> 1).
        confidence: race: the probability that a candidate able to beat the reference is not stopped (0..1).
        bound: race: ``wilson``, ``hoeffding`` or ``bernstein``.
        against: race and minibatch: ``best`` or ``quantile``.
        quantile: with ``against: quantile``: which quantile (0..1) of the recent scores.
        window: with ``against: quantile``: how many recent trials (None: the optimizer's population, else 8).
        batch_items: minibatch: items per evaluation (k).
        seed: seeds the item order of every trial (None: the experiment's seed).
    """

    mode: FitnessMode = FitnessMode.FULL
    min_items: int = 50
    growth: float = 2.0
    confidence: float = 0.95
    bound: Bound = Bound.WILSON
    against: Against = Against.BEST
    quantile: float = 0.5
    window: int | None = None
    batch_items: int = 200
    seed: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved YAML form (enum values as strings)."""
        return {"mode": self.mode.value, "min_items": self.min_items, "growth": self.growth,
                "confidence": self.confidence, "bound": self.bound.value, "against": self.against.value,
                "quantile": self.quantile, "window": self.window, "batch_items": self.batch_items,
                "seed": self.seed}


@dataclass(frozen=True)
class FitnessPlan:
    """What a worker does for one trial: the config, the trial's item seed and the reference score to beat
    (a weighted score, objectives.scalarize; None: nothing to beat yet, the candidate is scored fully)."""

    config: FitnessConfig
    seed: int
    reference: float | None
    objectives: tuple[Objective, ...] = field(default_factory=tuple)


class ItemScorer(Protocol):
    """What the race needs of an evaluator (evomerge.evaluators.base.Evaluator)."""

    name: str
    n_items: int | None

    def score_items(self, model: Any, tokenizer: Any, indices: Sequence[int]) -> Any: ...


def trial_seed(seed: int, trial: int) -> int:
    """The item-order seed of trial ``trial`` (a fresh, reproducible order per candidate)."""
    return (int(seed) * 1_000_003 + int(trial)) % (2**63)


def item_order(n_items: int, seed: int) -> list[int]:
    """A seeded permutation of 0 .. n_items - 1 (Python's Mersenne Twister: the same on every machine)."""
    order = list(range(n_items))
    random.Random(seed).shuffle(order)
    return order


def checkpoints(n_items: int, min_items: int, growth: float) -> list[int]:
    """Race checkpoints: min_items, ceil(growth x previous), ..., n_items (increasing, the last = n_items)."""
    out: list[int] = []
    n = min(min_items, n_items)
    while n < n_items:
        out.append(n)
        n = max(n + 1, math.ceil(n * growth))
    return [*out, n_items]


def upper_bound(values: Sequence[float], delta: float, bound: Bound) -> float:
    """One-sided (1 - delta) upper confidence bound on the mean of i.i.d. values in [0, 1].

    Args:
        values: the observed values (n >= 1), each in [0, 1].
        delta: the error probability.
        bound: Wilson score (binomial, normal quantile), Hoeffding (any [0,1] values), or empirical Bernstein
            (Maurer & Pontil 2009, Thm 4: mean + sqrt(2 V ln(2/delta) / n) + 7 ln(2/delta) / (3 (n - 1)), V the
            sample variance; n = 1 falls back to 1).

    Returns:
        The bound, clipped to [0, 1].
    """
    n = len(values)
    mean = sum(values) / n
    if bound == Bound.HOEFFDING:
        hi = mean + math.sqrt(math.log(1 / delta) / (2 * n))
    elif bound == Bound.WILSON:
        z = statistics.NormalDist().inv_cdf(1 - delta)
        centre = mean + z * z / (2 * n)
        half = z * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        hi = (centre + half) / (1 + z * z / n)
    else:
        if n < 2:
            return 1.0
        var = statistics.variance(values)
        log = math.log(2 / delta)
        hi = mean + math.sqrt(2 * var * log / n) + 7 * log / (3 * (n - 1))
    return min(1.0, max(0.0, hi))


def split_bounds(values: Sequence[float], n_items: int, delta: float, bound: Bound) -> tuple[float, float]:
    """(lower, upper) bound on the mean over all ``n_items`` items given the first ``len(values)`` of a random
    order: the scored items count as they are, the rest at their one-sided bound (each side with ``delta``)."""
    n = len(values)
    rest = n_items - n
    seen = float(sum(values))
    hi = upper_bound(values, delta, bound)
    lo = 1.0 - upper_bound([1.0 - v for v in values], delta, bound)
    return (seen + rest * lo) / n_items, (seen + rest * hi) / n_items


def can_beat(values: Sequence[float], n_items: int, plan: FitnessPlan, n_checkpoints: int) -> bool:
    """Whether a candidate with ``values`` on its first items may still reach ``plan.reference`` (race rule).

    The objective's weight and direction turn the metric into the weighted score: the candidate's best possible
    score is that of the metric's upper bound (maximized) or lower bound (minimized).
    """
    if plan.reference is None:
        return True
    delta = (1 - plan.config.confidence) / max(n_checkpoints, 1)
    lo, hi = split_bounds(values, n_items, delta, plan.config.bound)
    best = max(scalarize([lo], plan.objectives), scalarize([hi], plan.objectives))
    return best >= plan.reference


def reference_score(records: Sequence[Scored], trial: int, stage: int, lag: int, config: FitnessConfig,
                    window: int) -> float | None:
    """The score trial ``trial`` must be able to beat: from the stage's ok trials with ids <= trial - lag.

    ``against: best``: the best score among the fully scored ones; ``quantile``: the ``quantile`` of the scores
    of the last ``window`` of them (full or not). None when there are none (the candidate is scored fully).
    """
    known = sorted((r for r in records if r.stage == stage and r.trial <= trial - lag and r.ok
                    and r.score is not None), key=lambda r: r.trial)
    if config.against == Against.BEST:
        return max((float(r.score) for r in known if r.full and r.score is not None), default=None)
    scores = sorted(float(r.score) for r in known[-window:] if r.score is not None)
    if not scores:
        return None
    pos = config.quantile * (len(scores) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(scores) - 1)
    return scores[low] + (scores[high] - scores[low]) * (pos - low)


@dataclass(frozen=True)
class ItemRun:
    """What a cheap-fitness evaluation of one evaluator gave: the per-item scores and whether they cover
    every item."""

    scores: Any  # evomerge.evaluators.base.ItemScores
    full: bool


def race(ev: ItemScorer, model: Any, tokenizer: Any, plan: FitnessPlan) -> ItemRun:
    """Score ``ev``'s items in the trial's seeded order, checkpoint by checkpoint, until the candidate cannot
    beat the reference (stopped, ``full`` False) or every item is scored.

    A minimized objective (an error rate) races as well as a maximized one: ``can_beat`` compares the weighted
    score, oriented by the objective's direction.

    Raises:
        EvomergeError: the evaluator cannot score single items, or reports a per-item value outside [0, 1]
            (in a worker: a failed trial naming it).
    """
    n_items = _n_items(ev)
    order = item_order(n_items, plan.seed)
    marks = checkpoints(n_items, plan.config.min_items, plan.config.growth)
    metric = plan.objectives[0].metric.split("/", 1)[1]
    scores = None
    for n in marks:
        chunk = ev.score_items(model, tokenizer, order[len(scores or ()):n])
        scores = chunk if scores is None else scores.extend(chunk)
        if metric not in scores.values:
            raise EvomergeError(f"evaluator {ev.name} reports no per-item {metric!r}")
        outside = [v for v in scores.values[metric] if not 0.0 <= v <= 1.0]
        if outside:  # the bounds are those of a mean of values in [0, 1]
            raise EvomergeError(f"fitness: race needs per-item values in [0, 1] (an accuracy or an error rate); "
                                f"evaluator {ev.name} reported {metric} = {outside[0]:g}")
        if n < n_items and not can_beat(scores.values[metric], n_items, plan, len(marks)):
            return ItemRun(scores, False)
    return ItemRun(scores, True)


def minibatch(ev: ItemScorer, model: Any, tokenizer: Any, plan: FitnessPlan) -> ItemRun:
    """Score a seeded subset of ``batch_items`` of ``ev``'s items (all when it has no more)."""
    n_items = _n_items(ev)
    order = item_order(n_items, plan.seed)
    k = min(plan.config.batch_items, n_items)
    return ItemRun(ev.score_items(model, tokenizer, order[:k]), k == n_items)


def complete(ev: ItemScorer, model: Any, tokenizer: Any, run: ItemRun) -> ItemRun:
    """The run extended by the items it has not scored yet (the whole split; nothing is scored twice)."""
    if run.full:
        return run
    done = set(run.scores.indices)
    rest = [i for i in range(_n_items(ev)) if i not in done]
    return ItemRun(run.scores.extend(ev.score_items(model, tokenizer, rest)), True)


def _n_items(ev: ItemScorer) -> int:
    if ev.n_items is None or not getattr(ev, "scores_items", True):
        raise EvomergeError(f"evaluator {ev.name} cannot score a subset of its items (fitness: race and "
                            "minibatch need per-item scores: a math_word evaluator, a one-task lm_eval one, or a "
                            "custom function that takes items= and declares n_items)")
    return int(ev.n_items)


def promote(estimate: float, reference: float | None) -> bool:
    """Minibatch: whether a candidate's estimate earns it the whole split (it may become the best trial)."""
    return reference is None or estimate >= reference
