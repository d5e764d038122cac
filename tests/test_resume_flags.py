"""`evomerge run --resume DIR` with the original command line repeated: the run's own seed, folder and
experiment are accepted; only a value that differs from the run's is refused (exit code 2, one line).
The accepted case resumes for real (a local Ray, the tiny Llama family, a real evaluator)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import search_helpers as helpers
from evomerge.cli import main
from evomerge.search.experiment import load_experiment
from evomerge.search.run_folder import RunFolder


def _experiment(family, path: Path, **over) -> Path:
    exp = {"models": {"base": str(family["base"]),
                      "sources": {"m1": str(family["model_1"]), "m2": str(family["model_2"])}},
           "search_space": "ps_ties_dare",
           "evaluators": [{"name": "e", "spec": helpers.evaluator("logit_std")}],
           "objectives": [{"metric": "e/std", "direction": "maximize"}],
           "optimizer": {"name": "random"}, "budget": {"trials": 2}, "workers": {"count": 1}, "seed": 5}
    exp.update(over)
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


@pytest.fixture
def run_dir(llama_family, tmp_path):
    """A run folder as `evomerge run exp.yaml --seed 7 --out DIR` leaves it before its first trial."""
    exp = load_experiment(_experiment(llama_family, tmp_path / "exp.yaml"))
    exp.seed = 7
    exp.raw["seed"] = 7
    return RunFolder.create(tmp_path / "run", exp.raw).path


@pytest.mark.parametrize("flags,message", [
    (["--seed", "8"], "--seed 8 differs from the seed of the run"),
    (["--out", "elsewhere"], "--out elsewhere differs from the run folder being resumed"),
    (["EXP", "--seed", "7"], "differs from the config of the run"),  # the YAML's budget changed
])
def test_a_value_that_differs_from_the_runs_is_refused(flags, message, run_dir, llama_family, tmp_path, capsys):
    changed = _experiment(llama_family, tmp_path / "changed.yaml", budget={"trials": 3})
    flags = [str(changed) if f == "EXP" else f for f in flags]
    assert main(["run", "--resume", str(run_dir), *flags, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (run_dir / "trials.jsonl").exists() or not (run_dir / "trials.jsonl").read_text()


def test_the_original_command_line_plus_resume_continues_the_run(run_dir, llama_family, tmp_path, ray_address,
                                                                 capsys):
    exp = tmp_path / "exp.yaml"  # the file the run was started from
    code = main(["run", str(exp), "--seed", "7", "--out", str(run_dir), "--resume", str(run_dir),
                 "--address", ray_address, "--no-progress"])
    assert code == 0, capsys.readouterr().err
    records = RunFolder.open(run_dir).trials()
    assert len(records) == 2 and all(r.status == "ok" for r in records)
    # and once more, with only the seed repeated: nothing left to do, nothing refused
    assert main(["run", "--resume", str(run_dir), "--seed", "7", "--address", ray_address, "--no-progress"]) == 0
    assert len(RunFolder.open(run_dir).trials()) == 2
