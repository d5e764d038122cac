"""The search end to end with real processes: Ray, kill -9 and resume, dying workers, NaN candidates,
export re-scored from disk, report files, NSGA-II over SQLite, and the smoke experiment.

One Ray cluster is started for the test session (conftest's ray_address, in this process); `evomerge run`
subprocesses and in-process runs join it with --address, so only the smoke test pays for an embedded Ray start.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
import yaml

import search_helpers as helpers
from evomerge.cli import main
from evomerge.search.launch import resume_run, start_run
from evomerge.search.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]
SMOKE_EVAL = REPO / "experiments" / "smoke_eval.py"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "evomerge.cli", *args]


def _write(path: Path, exp: dict) -> Path:
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def _ps_experiment(family, evaluator: dict, **over) -> dict:
    exp = {
        "models": {"base": str(family["base"]),
                   "sources": {"m1": str(family["model_1"]), "m2": str(family["model_2"])}},
        "search_space": "ps_ties_dare",
        "evaluators": [{"name": "e", "spec": evaluator}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}],
        "optimizer": {"name": "cmaes"},
        "budget": {"trials": 10},
        "workers": {"count": 1},
        "seed": 5,
    }
    exp.update(over)
    return exp


def _lines(run_dir: Path) -> int:
    p = run_dir / "trials.jsonl"
    return p.read_bytes().count(b"\n") if p.exists() else 0


def _wait_for_lines(run_dir: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while _lines(run_dir) < n:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "the run made no progress"
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def resumed_runs(ray_address, llama_family, tmp_path_factory):
    """An uninterrupted run, and the same experiment killed with SIGKILL twice and resumed twice."""
    tmp = tmp_path_factory.mktemp("resume")
    exp = _write(tmp / "exp.yaml", _ps_experiment(llama_family, helpers.evaluator("logit_std", sleep=0.25)))
    straight = tmp / "straight"
    start_run(exp, out=straight, address=ray_address, progress=False)

    killed = tmp / "killed"
    seen = []
    proc = subprocess.Popen(_cli("run", str(exp), "--out", str(killed), "--address", ray_address, "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(killed, 3, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen.append((killed / "trials.jsonl").read_text())
    proc = subprocess.Popen(_cli("run", "--resume", str(killed), "--address", ray_address, "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_lines(killed, _lines(killed) + 2, proc)
    time.sleep(0.12)  # somewhere inside the next trial
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    seen.append((killed / "trials.jsonl").read_text())
    resume_run(killed, address=ray_address, progress=False)
    return {"straight": straight, "killed": killed, "seen": seen, "exp": exp}


def test_kill9_then_resume_loses_and_repeats_nothing(resumed_runs):
    killed = RunFolder.open(resumed_runs["killed"]).trials()
    straight = RunFolder.open(resumed_runs["straight"]).trials()
    assert sorted(t.trial for t in killed) == list(range(10))  # none lost, none twice, budget honoured
    assert len(straight) == 10
    # every trial finished before a kill is kept as it was
    final_text = (resumed_runs["killed"] / "trials.jsonl").read_text()
    for before in resumed_runs["seen"]:
        complete = before[: before.rfind("\n") + 1]
        assert final_text.startswith(complete)
    assert 3 <= len(resumed_runs["seen"][0].splitlines()) < len(resumed_runs["seen"][1].splitlines()) < 10
    # fixed seed, one worker: the same trials as the uninterrupted run
    by_id = {t.trial: t for t in straight}
    for t in killed:
        assert t.x == by_id[t.trial].x
        assert t.params == by_id[t.trial].params
        assert t.metrics == by_id[t.trial].metrics
        assert t.status == "ok"
    state = RunFolder.open(resumed_runs["killed"]).load_state()
    assert state.pending == {} and state.next_trial == 10


def test_resume_tells_a_finished_but_untold_trial_from_its_line(resumed_runs, ray_address, tmp_path):
    """The narrowest crash window: a trial's line was appended, then the driver died before its tell was
    checkpointed. Resume must not run it again, and must tell its recorded result (CMA-ES: the trial closes a
    generation, so the next generation only matches the uninterrupted run if the tell was right)."""
    straight = RunFolder.open(resumed_runs["straight"]).trials()
    exp = yaml.safe_load(resumed_runs["exp"].read_text())
    exp["budget"] = {"trials": 7}
    part = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    assert [t.x for t in part.trials()] == [t.x for t in straight[:7]]
    with open(part.path / "trials.jsonl", "a") as f:  # trial 7 finished; its tell never reached the state
        f.write(json.dumps(straight[7].to_json()) + "\n")
    config = part.config()
    config["budget"]["trials"] = 10
    part.update_config(config)
    resume_run(part.path, address=ray_address, progress=False)
    trials = RunFolder.open(part.path).trials()
    assert [t.trial for t in trials] == list(range(10))
    assert trials[7] == straight[7]  # not run again (same pid, same finish time)
    assert [t.x for t in trials] == [t.x for t in straight]
    assert [t.metrics for t in trials[8:]] == [t.metrics for t in straight[8:]]


def test_killed_driver_leaves_no_worker_behind(resumed_runs):
    """The workers of the killed drivers were Ray actors of their job: Ray ends them with the driver."""
    pids = {t.pid for t in RunFolder.open(resumed_runs["killed"]).trials()}
    assert len(pids) >= 3  # three driver parts, a worker each
    end = time.time() + 30
    while any(_pid_alive(p) for p in pids) and time.time() < end:
        time.sleep(0.2)
    assert not any(_pid_alive(p) for p in pids)


def test_report_writes_pngs_and_tables(resumed_runs, capsys):
    run = resumed_runs["straight"]
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    records = RunFolder.open(run).trials()
    best = max(records, key=lambda t: t.score)
    assert f"best trial {best.trial}: score" in out
    text = (run / "report" / "report.md").read_text()
    assert "## Pareto front" in text and f"| {best.trial} | {best.objectives[0]:.4g} |" in text
    assert text.count("\n| ") >= 10  # ranked trials + front + genome rows
    assert str(run.parent) not in text  # the report names the run folder, not the machine path
    for png in ("objectives.png", "pareto.png"):
        data = (run / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_ps_export_is_the_recipe_and_rescores_to_the_trial(resumed_runs, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = resumed_runs["straight"]
    records = RunFolder.open(run).trials()
    best = max(records, key=lambda t: t.score)
    out = tmp_path / "best"
    assert main(["export", str(run), "--out", str(out)]) == 0
    assert f"exported trial {best.trial}" in capsys.readouterr().out
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["models"][0]["parameters"] == {"density": best.params["m1.all.density"],
                                                 "weight": best.params["m1.all.weight"]}
    # `evomerge merge` on the exported recipe reproduces the checkpoint bit for bit
    assert main(["merge", str(out / "recipe.yaml"), str(tmp_path / "remerged"), "--no-progress"]) == 0
    exported, remerged = load_file(out / "model.safetensors"), load_file(tmp_path / "remerged" / "model.safetensors")
    assert exported.keys() == remerged.keys()
    assert all(torch.equal(exported[k], remerged[k]) for k in exported)
    # a standard checkpoint: re-scored from disk it gets the trial's score
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert helpers.logit_std(model, AutoTokenizer.from_pretrained(out))["std"] == best.metrics["e/std"]
    # another trial by id
    other = next(t for t in records if t.trial != best.trial)
    assert main(["export", str(run), "--out", str(tmp_path / "other"), "--trial", str(other.trial)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "other").eval()
    assert helpers.logit_std(model, None)["std"] == other.metrics["e/std"]
    assert main(["export", str(run), "--out", str(tmp_path / "x"), "--trial", "99"]) == 2


def test_worker_killed_mid_evaluation_is_retried_then_failed(ray_address, llama_family, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for i in range(3):
        (tokens / f"token{i}").touch()
    exp = _ps_experiment(llama_family, helpers.evaluator("die_on_token", tokens=str(tokens)),
                         optimizer={"name": "random"}, budget={"trials": 3},
                         workers={"count": 1, "max_retries": 1})
    run = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    trials = {t.trial: t for t in run.trials()}
    assert sorted(trials) == [0, 1, 2]
    # trial 0 killed its worker twice: retried once on a fresh worker, then recorded as failed
    assert trials[0].status == "failed" and "worker died 2 times" in trials[0].error
    # trial 1 killed one worker, then finished on the replacement
    assert trials[1].status == "ok" and trials[1].attempts == 2
    assert trials[2].status == "ok" and trials[2].attempts == 1
    assert not list(tokens.glob("token*"))
    assert len({t.pid for t in trials.values() if t.status == "ok"}) == 1


def test_nan_raising_and_oom_candidates_are_failed_trials(ray_address, llama_family, tmp_path):
    exp = _ps_experiment(llama_family, helpers.evaluator("nan_or_raise", base=str(llama_family["base"]),
                                                          source=str(llama_family["model_1"])),
                         optimizer={"name": "random"}, budget={"trials": 12}, seed=1,
                         workers={"count": 1, "sources": "object_store"})
    run = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    trials = run.trials()
    assert sorted(t.trial for t in trials) == list(range(12))
    errors = [t.error or "" for t in trials]
    assert any("metric e/std is nan" in e for e in errors)
    assert any("RuntimeError: candidate rejected" in e for e in errors)
    assert any(e.startswith("out of memory: RuntimeError") for e in errors)
    ok = [t for t in trials if t.status == "ok"]
    assert ok and all(t.objectives == [t.metrics["e/std"]] for t in ok)
    pareto = json.loads((run.path / "pareto.json").read_text())
    assert pareto["trials"][0]["trial"] == max(ok, key=lambda t: t.score).trial
    # sources shipped through Ray's object store (nodes without a shared disk): same scores as from the path
    from evomerge.engine import MergeEngine
    from evomerge.search.experiment import experiment_from_resolved
    from evomerge.search.export import trial_candidate

    torch.set_num_threads(1)
    cand = trial_candidate(run, experiment_from_resolved(run.config()), ok[0])
    model = MergeEngine(cand).materialize(cand).eval()
    assert helpers._logit_score(model) == ok[0].metrics["e/std"]


def test_object_store_sources_are_fetched_once_per_node_by_two_workers(ray_address, llama_family, tmp_path):
    """workers.sources: object_store with two workers on one node: the node fetches each source folder once (the
    first worker writes the node's copy under its lock, the other loads it), as its fetch log records; the copies
    are removed when the search ends."""
    import shutil

    import ray

    from evomerge.search.node_sources import FETCH_LOG, node_cache

    family = {k: tmp_path / "models" / k for k in ("base", "model_1", "model_2")}  # paths no other test ships
    for k, dest in family.items():
        shutil.copytree(llama_family[k], dest)
    exp = _ps_experiment(family, helpers.evaluator("logit_std", sleep=0.2), optimizer={"name": "random"},
                         budget={"trials": 6}, workers={"count": 2, "sources": "object_store"})
    run = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    trials = run.trials()
    assert sorted(t.trial for t in trials) == list(range(6)) and all(t.status == "ok" for t in trials)
    assert len({t.pid for t in trials}) == 2  # both workers evaluated candidates
    log = node_cache(ray.get_runtime_context().get_node_id()) / FETCH_LOG
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    ours = [line for line in lines if line["source"].startswith(str(tmp_path))]
    assert sorted(line["source"] for line in ours) == sorted(str(p) for p in family.values())  # each source once
    # the search ended: the node's copies of this run's sources are gone (their locks and markers too), the log
    # stays; other runs' copies are named by their own object ids and are not touched
    root = log.parent
    assert ours and not [p for line in ours for p in root.glob(f"{line['object']}*")]


def test_relative_evaluator_file_of_an_experiment_in_another_folder(ray_address, llama_family, tmp_path):
    """A custom evaluator named ``../evals/e.py:fn`` (relative to the experiment file, which lives in another folder
    than the run) is found by the workers and by a resume: the run folder stores it relative to itself."""
    (tmp_path / "evals").mkdir()
    (tmp_path / "evals" / "e.py").write_text(
        "def spread(model, tokenizer):\n"
        "    import torch\n"
        "    with torch.no_grad():\n"
        "        return {'std': float(model(torch.arange(8)[None]).logits.float().std())}\n")
    (tmp_path / "sub").mkdir()
    exp = _ps_experiment(llama_family, {"type": "custom", "function": "../evals/e.py:spread"},
                         optimizer={"name": "random"}, budget={"trials": 2})
    run_dir = tmp_path / "runs" / "r"
    start_run(_write(tmp_path / "sub" / "exp.yaml", exp), out=run_dir, address=ray_address, progress=False)
    assert [t.status for t in RunFolder(run_dir).trials()] == ["ok", "ok"]
    config = (run_dir / "config.yaml").read_text()
    assert "../../evals/e.py:spread" in config and str(tmp_path) not in config
    run = resume_run(run_dir, address=ray_address, progress=False)  # a finished run: reads the config back
    assert len(run.trials()) == 2


def test_error_text_keeps_urls_and_makes_paths_relative(tmp_path):
    """Error messages stored in trial lines: absolute paths made relative to the run folder, URLs untouched."""
    from evomerge.search.portable import portable_text

    text = f"see https://huggingface.co/docs/x and {tmp_path}/models/base/config.json"
    assert portable_text(text, tmp_path / "run") == "see https://huggingface.co/docs/x and ../models/base/config.json"


REFUSED_AFTER_RAY = {  # refusals that need the started Ray or a started worker
    "cuda": ({"workers": {"count": 1, "device": "cuda", "devices_per_worker": 2}},
             "workers.device cuda: workers.devices_per_worker 2: no node of the Ray cluster has 2 GPU(s)"),
    "resources": ({"workers": {"count": 1, "resources": {"evomerge_worker": 1}}},
                  "workers.resources: no node of the Ray cluster offers evomerge_worker 1 per worker"),
    "race": ({"fitness": {"mode": "race"}},
             "fitness: race needs per-item scores, and evaluator e cannot score a subset of its items"),
}


def _refusal_experiment(case: str, family) -> dict:
    over, _ = REFUSED_AFTER_RAY[case]
    return _ps_experiment(family, helpers.evaluator("logit_std"), optimizer={"name": "random"},
                          budget={"trials": 2}, **over)


def _skip_on_gpus(case: str) -> None:
    import ray

    if case == "cuda" and ray.cluster_resources().get("GPU", 0) >= 2:
        pytest.skip("the cluster has GPUs: device cuda is not refused")


@pytest.mark.parametrize("case", sorted(REFUSED_AFTER_RAY))
@pytest.mark.parametrize("existing", [False, True])
def test_refusal_after_ray_started_leaves_no_run_folder(case, existing, ray_address, llama_family, tmp_path, capsys):
    """Bad input found once Ray (or a worker) runs: one line naming it, exit 2, and what this call created is gone:
    the run folder and the parents it made; a folder that existed (empty) before stays, empty."""
    _skip_on_gpus(case)
    out = tmp_path / "out" if existing else tmp_path / "new" / "run"
    if existing:
        out.mkdir()
    path = _write(tmp_path / "exp.yaml", _refusal_experiment(case, llama_family))
    code = main(["run", str(path), "--out", str(out), "--address", ray_address, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert err[-1].startswith("evomerge run: error: ") and REFUSED_AFTER_RAY[case][1] in err[-1]
    assert not [line for line in err if line.startswith(("evomerge", "memory per worker", "  device"))][:-1], err
    if existing:
        assert out.is_dir() and not list(out.iterdir())
    else:
        assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("case", ["cuda", "resources"])
def test_refusal_on_resume_leaves_the_run_folder_unchanged(case, ray_address, llama_family, tmp_path, capsys):
    """A run resumed on a cluster that cannot host its workers (GPUs, custom resources) is refused before its
    folder changes: every file byte for byte as it was, also with --workers (which a resume would save)."""
    _skip_on_gpus(case)
    exp = _ps_experiment(llama_family, helpers.evaluator("logit_std"), optimizer={"name": "random"},
                         budget={"trials": 2})
    run = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    config = run.config()
    config["budget"]["trials"] = 3  # unfinished: the resume has a trial to run
    config["workers"].update(REFUSED_AFTER_RAY[case][0]["workers"])  # the cluster it resumes on lacks them
    run.update_config(config)
    with open(run.path / "trials.jsonl", "a") as f:
        f.write('{"torn')  # a torn last line: resume would cut it
    before = {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()}
    capsys.readouterr()
    code = main(["run", "--resume", str(run.path), "--workers", "2", "--address", ray_address, "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and REFUSED_AFTER_RAY[case][1] in err[-1]
    assert {p.name: p.read_bytes() for p in run.path.iterdir() if p.is_file()} == before


def test_nsga2_two_objectives_two_workers_sqlite_study(ray_address, llama_family, tmp_path):
    import optuna

    exp = _ps_experiment(llama_family, {"type": "custom", "function": f"{SMOKE_EVAL}:two_targets"},
                         objectives=[{"metric": "e/mse_a", "direction": "minimize"},
                                     {"metric": "e/mse_b", "direction": "minimize"}],
                         optimizer={"name": "nsga2", "population": 4}, budget={"generations": 2},
                         workers={"count": 2})
    exp["models"]["base"] = exp["models"]["sources"] = None
    exp["models"] = {"build": {"arch": "llama", "n_variants": 2, "seed": 0}}
    run = start_run(_write(tmp_path / "exp.yaml", exp), out=tmp_path / "run", address=ray_address, progress=False)
    trials = run.trials()
    # both workers serve the run; which one takes which trial depends on start-up timing (under load one
    # worker may be ready only after the other has finished all 8 cheap trials)
    assert len(trials) == 8 and {t.worker for t in trials} <= {0, 1}
    study = optuna.load_study(study_name="exp-ps", storage=f"sqlite:///{run.path}/optuna.db")
    assert len(study.directions) == 2
    assert len([t for t in study.trials if t.state.name == "COMPLETE"]) == 8
    pts = {t.trial: t.objectives for t in trials}

    def dominated(i):
        return any(all(b <= a for a, b in zip(pts[i], pts[j])) and pts[i] != pts[j] for j in pts)

    front = [t["trial"] for t in json.loads((run.path / "pareto.json").read_text())["trials"]]
    assert front == sorted(i for i in pts if not dominated(i)) and front


def test_dfs_and_ps_dfs_exports_rescore_to_the_trial(ray_address, llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.search.dataflow import SCALES_FILE, load_dataflow_model

    evaluator = helpers.evaluator("logit_std")
    torch.set_num_threads(1)
    # DFS with a scaling matrix: a checkpoint plus its input scales, loaded by evomerge
    dfs = _ps_experiment(llama_family, evaluator, models={"a": str(llama_family["model_1"]),
                                                          "b": str(llama_family["model_2"])},
                         search_space="dfs", optimizer={"name": "random"}, budget={"trials": 4}, seed=3)
    run = start_run(_write(tmp_path / "dfs.yaml", dfs), out=tmp_path / "dfs", address=ray_address, progress=False)
    best = max(run.trials(), key=lambda t: t.score)
    assert main(["export", str(run.path), "--out", str(tmp_path / "dfs_best")]) == 0
    info = json.loads((tmp_path / "dfs_best" / "evomerge_trial.json").read_text())
    scales = json.loads((tmp_path / "dfs_best" / SCALES_FILE).read_text())["input_scales"]
    assert scales == info["scales"] and any(s != 1.0 for s in scales)
    model = load_dataflow_model(tmp_path / "dfs_best")
    assert len(model.model.layers) == len(info["layers"])
    assert helpers.logit_std(model, None)["std"] == best.metrics["e/std"]
    # `evomerge eval` loads a scaled DFS export with its scales applied
    from evomerge.commands.eval import load_model

    loaded, _ = load_model(str(tmp_path / "dfs_best"))
    assert helpers.logit_std(loaded, None)["std"] == best.metrics["e/std"]

    # PS then DFS without scalings: the winner is a standard checkpoint with the path's layers in order
    ps_dfs = _ps_experiment(llama_family, evaluator, search_space="ps_dfs",
                            space={"dfs": {"kind": "dfs", "repeats": 2, "scaling": "none"}},
                            optimizer={"name": "random"}, budget={"trials": 6}, seed=4)
    ps_dfs["models"]["b"] = str(llama_family["model_2"])
    run = start_run(_write(tmp_path / "ps_dfs.yaml", ps_dfs), out=tmp_path / "ps_dfs", address=ray_address,
                    progress=False)
    trials = run.trials()
    assert [t.stage_name for t in trials] == ["ps"] * 3 + ["dfs"] * 3
    assert (run.path / "stages" / "ps_winner" / "recipe.yaml").is_file()
    best = max((t for t in trials if t.stage_name == "dfs"), key=lambda t: t.score)
    assert main(["export", str(run.path), "--out", str(tmp_path / "ps_dfs_best")]) == 0
    assert not (tmp_path / "ps_dfs_best" / SCALES_FILE).exists()
    info = json.loads((tmp_path / "ps_dfs_best" / "evomerge_trial.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ps_dfs_best").eval()
    assert model.config.num_hidden_layers == len(info["layers"])
    # the provenance names model A relative to the export (no machine path): the run's PS winner
    assert (tmp_path / "ps_dfs_best" / info["a"]).resolve() == (run.path / "stages" / "ps_winner").resolve()
    assert helpers.logit_std(model, None)["std"] == best.metrics["e/std"]


def _session_processes(session: Path) -> list[int]:
    from evomerge.search.reaper import session_processes

    return session_processes(str(session))


def test_smoke_experiment_with_embedded_ray_killed_and_resumed(tmp_path):
    """The README command: a real search on tiny local models, Ray started and stopped by the run itself;
    killed with SIGKILL mid-search (nothing of its Ray may survive it), then resumed to the end."""
    out = tmp_path / "smoke"
    proc = subprocess.Popen(_cli("run", str(REPO / "experiments" / "smoke.yaml"), "--out", str(out)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for_lines(out, 12, proc)
    time.sleep(0.6)  # a progress refresh (every 0.5 s)
    os.kill(proc.pid, signal.SIGKILL)
    _, stderr = proc.communicate()
    assert "trials/h=" in stderr and "best=" in stderr  # the live progress bar
    sessions = list(Path(tempfile.gettempdir()).glob(f"evomerge-ray-{os.getuid()}/session_*_{proc.pid}"))
    assert len(sessions) == 1
    end = time.time() + 30
    while _session_processes(sessions[0]) and time.time() < end:
        time.sleep(0.5)
    assert _session_processes(sessions[0]) == []  # nothing of its Ray survived it

    # resumed in this process (it joins this module's Ray if one is up, else starts its own)
    resume_run(out, progress=False)
    trials = RunFolder.open(out).trials()
    assert sorted(t.trial for t in trials) == list(range(48)) and all(t.status == "ok" for t in trials)
    first_gen = [t.objectives[0] for t in trials[:6]]
    assert min(t.objectives[0] for t in trials) < sum(first_gen) / len(first_gen)


def test_an_evaluator_that_cannot_be_built_stops_the_run_with_one_line(ray_address, llama_family, tmp_path, capsys):
    exp = _ps_experiment(llama_family, "mgsm:xx")
    code = main(["run", str(_write(tmp_path / "exp.yaml", exp)), "--out", str(tmp_path / "run"),
                 "--address", ray_address, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "mgsm needs a language" in err.strip().splitlines()[-1]
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_sigterm_stops_the_run_cleanly_and_it_resumes(tmp_path):
    """A scheduler's SIGTERM ends `evomerge run` like Ctrl-C: exit 130, a one-line hint to resume, its embedded
    Ray stopped, and every trial finished so far kept (none repeated on resume)."""
    exp = yaml.safe_load((REPO / "experiments" / "smoke.yaml").read_text())
    exp["budget"] = {"trials": 400}
    exp["evaluators"][0]["spec"]["function"] = str(REPO / "experiments" / "smoke_eval.py") + ":logit_match"
    out = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", str(_write(tmp_path / "exp.yaml", exp)), "--out", str(out), "--no-progress"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    _wait_for_lines(out, 6, proc)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert f"evomerge run --resume {out}" in stderr
    assert "Traceback" not in stderr
    before = RunFolder.open(out).trials()
    assert 6 <= len(before) < 400
    sessions = list(Path(tempfile.gettempdir()).glob(f"evomerge-ray-{os.getuid()}/session_*_{proc.pid}"))
    assert len(sessions) == 1 and _session_processes(sessions[0]) == []

    config = yaml.safe_load((out / "config.yaml").read_text())
    config["budget"]["trials"] = len(before) + 4
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    resume_run(out, progress=False)
    after = RunFolder.open(out).trials()
    assert after[:len(before)] == before
    assert sorted(t.trial for t in after) == list(range(len(before) + 4))


def test_ps_dfs_starts_from_the_ps_winner_and_never_falls_below_it(ray_address, llama_family, tmp_path):
    """The paper's PS+DFS: the DFS stage's first trial is the PS winner's plain path (model A's layers in
    order, once, every scale 1), which scores exactly what the PS winner scored, so the PS+DFS winner is never
    below its PS model on the search fitness; CMA-ES searches from that path (the indicator's mean turns A's
    first repetition on)."""
    from evomerge.search.objectives import best_trial

    torch.set_num_threads(1)
    exp = _ps_experiment(llama_family, helpers.evaluator("logit_std"), search_space="ps_dfs",
                         budget={"trials": 16}, seed=7)
    exp["models"]["b"] = str(llama_family["model_2"])
    run = start_run(_write(tmp_path / "ps_dfs.yaml", exp), out=tmp_path / "ps_dfs", address=ray_address,
                    progress=False)
    trials = run.trials()
    ps = [t for t in trials if t.stage_name == "ps" and t.ok]
    dfs = sorted((t for t in trials if t.stage_name == "dfs"), key=lambda t: t.trial)
    assert len(ps) == 8 and len(dfs) == 8
    n_a = dfs[0].candidate.n_a
    assert dfs[0].candidate.layers == list(range(n_a)) and dfs[0].candidate.scales == [1.0] * n_a
    ps_best = max(t.score for t in ps)
    assert dfs[0].score == ps_best                       # the plain path IS the PS winner
    assert max(t.score for t in dfs if t.ok) >= ps_best
    assert best_trial(trials).score >= ps_best
    # the other members of the first generation are CMA-ES samples around that path, not the path itself
    assert any(t.candidate.layers != list(range(n_a)) or t.candidate.scales != [1.0] * n_a for t in dfs[1:])
