"""Cheap fitness (evomerge/search/fitness.py): the confidence bounds, the race's reference, the ``fitness:``
section's validation, per-item scoring by the evaluators, and a real race / mini-batch search end to end.

Exact resume with kill -9 mid-race is in test_resume_exact.py.
"""

from __future__ import annotations

import random

import pytest
import yaml

import search_helpers as helpers
from evomerge.cli import main
from evomerge.errors import EvomergeError
from evomerge.evaluators import build_evaluator
from evomerge.search.experiment import validate_experiment
from evomerge.search.fitness import (
    Against,
    Bound,
    FitnessConfig,
    FitnessMode,
    FitnessPlan,
    can_beat,
    checkpoints,
    item_order,
    race,
    reference_score,
    split_bounds,
    trial_seed,
    upper_bound,
)
from evomerge.search.launch import start_run
from evomerge.search.objectives import Objective, best_trial, pareto_front
from evomerge.search.records import TrialRecord, TrialStatus
from evomerge.search.report import best_vs_items


# -- bounds ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bound", list(Bound))
def test_upper_bounds_cover_the_true_accuracy_at_their_confidence(bound):
    rng = random.Random(0)
    delta, trials = 0.1, 400
    for p in (0.05, 0.3, 0.7):
        for n in (15, 60):
            misses = sum(upper_bound([float(rng.random() < p) for _ in range(n)], delta, bound) < p
                         for _ in range(trials))
            assert misses / trials <= delta + 0.04, (bound, p, n, misses)


def test_bounds_tighten_with_items_and_are_exact_on_the_whole_split():
    values = [1.0, 0.0, 0.0, 1.0, 0.0] * 10  # 40 % right
    widths = [upper_bound(values[:n], 0.05, Bound.WILSON) - 0.4 for n in (10, 20, 50)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert upper_bound(values, 0.05, Bound.HOEFFDING) > upper_bound(values, 0.05, Bound.WILSON)
    lo, hi = split_bounds(values, len(values), 0.05, Bound.BERNSTEIN)
    assert lo == hi == pytest.approx(0.4)
    lo, hi = split_bounds(values[:10], 50, 0.05, Bound.WILSON)
    assert lo < 0.4 < hi and 0 <= lo and hi <= 1


def test_checkpoints_and_item_orders():
    assert checkpoints(500, 50, 2.0) == [50, 100, 200, 400, 500]
    assert checkpoints(36, 6, 3.0) == [6, 18, 36]
    assert checkpoints(10, 50, 2.0) == [10]
    order = item_order(500, trial_seed(0, 7))
    assert sorted(order) == list(range(500)) and order == item_order(500, trial_seed(0, 7))
    assert order != item_order(500, trial_seed(0, 8)) and order != item_order(500, trial_seed(1, 7))


def _plan(reference: float | None, direction: str = "maximize", confidence: float = 0.9) -> FitnessPlan:
    config = FitnessConfig(mode=FitnessMode.RACE, confidence=confidence)
    return FitnessPlan(config, 0, reference, (Objective("e/acc", direction, 1.0),))


def test_can_beat_stops_only_what_its_bound_rules_out():
    poor = [1.0] + [0.0] * 49  # 2 % right on 50 of 500 items
    assert not can_beat(poor, 500, _plan(0.5), 5)
    assert can_beat(poor, 500, _plan(0.1), 5)  # 450 unseen items could still lift it to 10 %
    assert can_beat(poor, 500, _plan(None), 5)
    # minimized (an error rate): a high rate cannot beat a low reference score (-0.5 is -rate)
    assert not can_beat([1.0] * 50, 500, _plan(-0.5, "minimize"), 5)
    assert can_beat([0.0] * 50, 500, _plan(-0.5, "minimize"), 5)


def _record(trial: int, score: float, full: bool = True, stage: int = 0, ok: bool = True) -> TrialRecord:
    return TrialRecord(trial=trial, stage=stage, stage_name="ps", status=TrialStatus.OK if ok else TrialStatus.FAILED,
                       x=[0.5], params={}, objectives=[score] if ok else None, score=score if ok else None,
                       items=100 if full else 10, full=full)


def test_reference_uses_only_trials_old_enough_and_the_best_fully_scored_one():
    records = [_record(0, 0.3), _record(1, 0.6, full=False), _record(2, 0.4), _record(3, 0.9),
               _record(4, 0.2, ok=False), _record(5, 0.95, stage=1)]
    best = FitnessConfig(mode=FitnessMode.RACE)
    assert reference_score(records, trial=1, stage=0, lag=2, config=best, window=4) is None
    assert reference_score(records, trial=4, stage=0, lag=2, config=best, window=4) == 0.4  # 1 is not full
    assert reference_score(records, trial=5, stage=0, lag=2, config=best, window=4) == 0.9
    median = FitnessConfig(mode=FitnessMode.RACE, against=Against.QUANTILE, quantile=0.5)
    assert reference_score(records, trial=6, stage=0, lag=2, config=median, window=3) == pytest.approx(0.6)
    assert reference_score(records, trial=6, stage=0, lag=2, config=median, window=4) == pytest.approx(0.5)


def test_only_fully_scored_trials_become_best_or_reach_the_front():
    records = [_record(0, 0.3), _record(1, 0.8, full=False), _record(2, 0.5)]
    objectives = [Objective("e/acc")]
    assert best_trial(records).trial == 2
    assert [r.trial for r in pareto_front(records, objectives)] == [2]
    assert best_vs_items(records) == [(100, 0.3), (210, 0.5)]


# -- the fitness section ------------------------------------------------------------------------------------
def _experiment(family, evaluator: dict, fitness, **over) -> dict:
    exp = {"models": {"base": str(family["base"]), "sources": {"m1": str(family["model_1"]),
                                                               "m2": str(family["model_2"])}},
           "search_space": "ps_ties_dare", "space": {"group_size": "model"},
           "evaluators": [{"name": "e", "spec": evaluator}],
           "objectives": [{"metric": "e/acc", "direction": "maximize"}],
           "optimizer": {"name": "cmaes", "population": 4, "sigma0": 0.3}, "budget": {"trials": 12},
           "workers": {"count": 1}, "seed": 3, "fitness": fitness}
    exp.update(over)
    return exp


def test_fitness_defaults_to_full_and_is_kept_in_the_resolved_config(llama_family):
    exp = _experiment(llama_family, helpers.evaluator("pairwise"), None)
    del exp["fitness"]
    parsed = validate_experiment(exp)
    assert parsed.fitness == FitnessConfig() and parsed.fitness.mode == FitnessMode.FULL
    race = validate_experiment(_experiment(llama_family, helpers.evaluator("pairwise"), "race"))
    assert race.raw["fitness"]["mode"] == "race" and race.raw["fitness"]["bound"] == "wilson"


@pytest.mark.parametrize("fitness, message", [
    ({"mode": "fast"}, "fitness.mode must be one of full, race, minibatch"),
    ({"mode": "race", "min_items": 0}, "fitness.min_items must be a positive integer"),
    ({"mode": "race", "growth": 1}, "fitness.growth must be a number above 1"),
    ({"mode": "race", "confidence": 1.5}, "fitness.confidence must be a number strictly between 0 and 1"),
    ({"mode": "race", "bound": "chernoff"}, "fitness.bound must be one of wilson, hoeffding, bernstein"),
    ({"mode": "race", "against": "mean"}, "fitness.against must be one of best, quantile"),
    ({"mode": "race", "against": "quantile", "quantile": 2}, "fitness.quantile must be a number in [0, 1]"),
    ({"mode": "minibatch", "batch_items": 2.5}, "fitness.batch_items must be a positive integer"),
    ({"mode": "race", "items": 5}, "unknown key 'items' in fitness"),
    # a key of another mode would silently do nothing: refused
    ({"mode": "minibatch", "min_items": 20}, "fitness.min_items is a setting of fitness mode race, not of minibatch"),
    ({"mode": "full", "batch_items": 20}, "fitness.batch_items is a setting of fitness mode minibatch, not of full"),
    ({"mode": "race", "batch_items": 20}, "fitness.batch_items is a setting of fitness mode minibatch, not of race"),
    ({"mode": "full", "against": "best"}, "fitness.against is a setting of fitness mode race and minibatch, not of"),
    ({"mode": "race", "window": 4}, "fitness.window is a setting of fitness against: quantile, not of against: best"),
])
def test_bad_fitness_values_are_one_line_errors_with_exit_2(fitness, message, llama_family, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_experiment(llama_family, helpers.evaluator("pairwise"), fitness)))
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge run:")]
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "run").exists()


def test_race_needs_one_objective(llama_family):
    exp = _experiment(llama_family, helpers.evaluator("pairwise"), "race",
                      objectives=["e/acc", {"metric": "e/acc2", "direction": "minimize"}])
    with pytest.raises(EvomergeError, match="fitness: race needs exactly one objective"):
        validate_experiment(exp)


# -- per-item scoring ---------------------------------------------------------------------------------------
def test_custom_function_with_items_scores_a_subset(llama_family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_family["model_1"]).eval()
    tok = AutoTokenizer.from_pretrained(llama_family["model_1"])
    ev = build_evaluator(helpers.evaluator("pairwise", n=40))
    assert ev.scores_items and ev.n_items == 40
    whole = ev.evaluate(model, tok)["acc"]
    scores = ev.score_items(model, tok, [5, 0, 17])
    assert scores.indices == (5, 0, 17) and len(scores.values["acc"]) == 3
    every = ev.score_items(model, tok, list(range(40)))
    assert every.means()["acc"] == pytest.approx(whole)
    assert scores.values["acc"] == tuple(every.values["acc"][i] for i in (5, 0, 17))
    with pytest.raises(EvomergeError, match="distinct and in 0..39"):
        ev.score_items(model, tok, [40])
    plain = build_evaluator(helpers.evaluator("logit_std"))
    assert not plain.scores_items
    with pytest.raises(EvomergeError, match="cannot score a subset"):
        plain.score_items(model, tok, [0])


def test_race_refuses_per_item_values_outside_0_1_and_races_a_minimized_rate(llama_family):
    """The race's bounds are those of a mean of values in [0, 1]: a metric outside it is refused by name (in a
    worker: a failed trial saying so). A minimized objective in [0, 1] (an error rate) races as well."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(llama_family["model_1"]).eval()
    tok = AutoTokenizer.from_pretrained(llama_family["model_1"])
    config = FitnessConfig(mode=FitnessMode.RACE, min_items=8, growth=2.0, confidence=0.5)
    margin = build_evaluator(helpers.evaluator("pairwise_margin", n=40))
    plan = FitnessPlan(config, 0, 0.0, (Objective("e/margin", "maximize", 1.0),))
    with pytest.raises(EvomergeError, match=r"race needs per-item values in \[0, 1\].*reported margin = "):
        race(margin, model, tok, plan)
    acc = build_evaluator(helpers.evaluator("pairwise", n=40))
    whole = acc.evaluate(model, tok)["acc"]
    # minimized: reference 0.0 (the score of a 0 % rate) is out of reach of this candidate: stopped early
    stopped = race(acc, model, tok, FitnessPlan(config, 0, 0.0, (Objective("e/acc", "minimize", 1.0),)))
    assert whole > 0.2 and not stopped.full and len(stopped.scores) < 40
    # a reference every rate beats (-1: a 100 % rate) lets it run to the end, scored on every item
    kept = race(acc, model, tok, FitnessPlan(config, 0, -1.0, (Objective("e/acc", "minimize", 1.0),)))
    assert kept.full and kept.scores.means()["acc"] == pytest.approx(whole)


# -- searches end to end ------------------------------------------------------------------------------------
def test_race_search_stops_poor_candidates_and_reports_item_evaluations(ray_address, llama_family, tmp_path,
                                                                        capsys):
    fitness = {"mode": "race", "min_items": 8, "growth": 2, "confidence": 0.5}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_experiment(llama_family, helpers.evaluator("pairwise", n=60), fitness)))
    run = start_run(path, out=tmp_path / "run", address=ray_address, progress=False)
    records = run.trials()
    assert len(records) == 12 and all(r.ok for r in records)
    stopped = [r for r in records if not r.full]
    assert stopped and all(r.items in (8, 16, 32) for r in stopped)  # the checkpoints 8, 16, 32 before 60
    assert all(r.items == 60 for r in records if r.full)
    assert all(r.full for r in records[:2])  # no trial 2 ids older yet: nothing to race against
    best = best_trial(records)
    assert best.full and best.score == max(r.score for r in records if r.full)
    assert all(not r.full for r in records if r.score > best.score)  # higher estimates never win
    pareto = (tmp_path / "run" / "pareto.json").read_text()
    assert all(f'"trial": {r.trial},' not in pareto for r in stopped)

    assert main(["report", str(tmp_path / "run")]) == 0
    text = (tmp_path / "run" / "report" / "report.md").read_text()
    spent = sum(r.items for r in records)
    assert f"Item evaluations spent: {spent}; fitness: race; {12 - len(stopped)} trials fully scored." in text
    png = (tmp_path / "run" / "report" / "best_vs_items.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_minibatch_search_scores_subsets_and_completes_the_promising(ray_address, llama_family, tmp_path):
    fitness = {"mode": "minibatch", "batch_items": 10}
    exp = _experiment(llama_family, helpers.evaluator("pairwise", n=60), fitness, optimizer={"name": "random"},
                      budget={"trials": 8})
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    records = start_run(path, out=tmp_path / "run", address=ray_address, progress=False).trials()
    assert {r.items for r in records} == {10, 60} and {r.full for r in records} == {True, False}
    for r in records:  # a promoted candidate scored the other 50 items: its score is the whole split's
        assert r.full == (r.items == 60)
    assert best_trial(records).full


def test_an_evaluator_without_item_scores_stops_a_race_with_one_line(ray_address, llama_family, tmp_path, capsys):
    exp = _experiment(llama_family, helpers.evaluator("logit_std"), "race",
                      objectives=[{"metric": "e/std", "direction": "maximize"}])
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--address", ray_address, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evomerge run:")]
    assert code == 2 and len(err) == 1
    assert "fitness: race needs per-item scores, and evaluator e cannot score a subset" in err[0]
    assert not (tmp_path / "run").exists()  # refused before any trial: no half-written run folder
