"""Run folders written by the previous release (tests/fixtures/legacy_runs, made with main 9654006 and killed
with SIGKILL mid-run) resume with this release: their pickled state is read without unpickling any class,
converted to the versioned state.json, and the search continues."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import optuna
import pytest
import yaml

from evomerge.cli import main
from evomerge.search.launch import resume_run
from evomerge.search.records import TrialStatus
from evomerge.search.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "legacy_runs"


def _copy(name: str, tmp_path: Path) -> Path:
    run = tmp_path / name
    shutil.copytree(FIXTURES / name, run)
    config = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("@RUN@", str(run)).replace("@EXPERIMENTS@",
                                                                              str(REPO / "experiments")))
    return run


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


@pytest.mark.slow
def test_a_killed_cmaes_run_of_the_previous_release_resumes_to_the_uninterrupted_trials(ray_address, tmp_path):
    run = _copy("cmaes", tmp_path)
    old_lines = _lines(run / "trials.jsonl")
    resume_run(run, address=ray_address, progress=False)
    trials = RunFolder.open(run).trials()
    assert [t.trial for t in trials] == list(range(12))
    assert _lines(run / "trials.jsonl")[: len(old_lines)] == old_lines  # finished trials kept as they were
    expected = json.loads((FIXTURES / "cmaes" / "expected_x.json").read_text())
    # CMA-ES rebuilt from the old state: the genomes are those of the old release's uninterrupted run
    assert [t.x for t in trials] == [expected[str(i)] for i in range(12)]
    assert trials[0].params == json.loads(old_lines[0])["genome"]  # old records read, values under `params`
    assert all(t.candidate is not None for t in trials[len(old_lines):])
    state = json.loads((run / "state.json").read_text())
    assert state["version"] == 2 and state["optimizer"]["kind"] == "cmaes" and state["pending"] == {}
    assert len(state["optimizer"]["told"]) == 1  # one full generation of 8 told, the second half-asked
    # a finished run resumed again does nothing
    resume_run(run, address=ray_address, progress=False)
    assert len(_lines(run / "trials.jsonl")) == 12
    # export: an old record's candidate is decoded from its genome, a new one's read from the record
    for trial in (0, 11):
        out = tmp_path / f"export{trial}"
        assert main(["export", str(run), "--out", str(out), "--trial", str(trial)]) == 0
        recipe = yaml.safe_load((out / "recipe.yaml").read_text())
        params = trials[trial].params
        assert [m["parameters"] for m in recipe["models"]] == [
            {"density": params[f"model_{i}.all.density"], "weight": params[f"model_{i}.all.weight"]} for i in (1, 2)]


@pytest.mark.slow
def test_a_killed_optuna_run_of_the_previous_release_resumes(ray_address, tmp_path):
    run = _copy("tpe", tmp_path)
    old_lines = _lines(run / "trials.jsonl")
    assert len(old_lines) == 6  # trial 5 has its line but was never told (pending in state.pkl)
    resume_run(run, address=ray_address, progress=False)
    trials = RunFolder.open(run).trials()
    assert [t.trial for t in trials] == list(range(12))  # trial 5 told from its line, not run again
    assert _lines(run / "trials.jsonl")[:6] == old_lines
    assert all(t.status == TrialStatus.OK for t in trials)
    study = optuna.load_study(study_name="legacy_tpe-ps", storage=f"sqlite:///{run}/optuna.db")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == 12 and set(states) <= {"COMPLETE", "FAIL"}
    state = json.loads((run / "state.json").read_text())
    assert state["version"] == 2 and state["optimizer"] == {"version": 2, "kind": "tpe",
                                                            "study_name": "legacy_tpe-ps", "asks": 12,
                                                            "members": [], "untold": [], "queued": []}
