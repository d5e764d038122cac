"""mergekit-evolve configuration files run with `evomerge run` (translated into an evomerge experiment).

The end-to-end test uses a local lm-eval multiple-choice task (JSON data in the test folder, real lm-eval) and a
real local Ray (conftest's session cluster), on tiny Llama checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from evomerge.cli import main
from evomerge.mergekit_evolve import EvolveOptions, translate
from evomerge.search.experiment import load_experiment, validate_experiment
from evomerge.search.run_folder import RunFolder
from evomerge.search.search_space import build_space


def _evolve(llama_family, **genome) -> dict:
    return {"genome": {"models": [str(llama_family["model_1"]), str(llama_family["model_2"])],
                       "merge_method": "task_arithmetic", "base_model": str(llama_family["base"]), **genome},
            "tasks": [{"name": "tiny_choice", "weight": 2.0, "metric": "acc,none"}],
            "limit": 4, "apply_chat_template": False}


def test_evolve_config_runs_end_to_end(llama_family, task_dir, ray_address, tmp_path, capsys):
    """A mergekit-evolve config beside its models (relative paths) runs; the run folder keeps the translation
    (experiment.yaml) and the original (mergekit_evolve.yaml) with paths relative to the run folder, so that
    after the whole layout moved both re-run from there into the run's own config."""
    layout = tmp_path / "layout"
    for name in ("base", "model_1", "model_2"):
        shutil.copytree(llama_family[name], layout / "models" / name)
    shutil.copytree(task_dir, layout / "tasks")
    data = _evolve({k: Path("models") / k for k in ("base", "model_1", "model_2")}, layer_granularity=2,
                   allow_negative_weights=True)
    config = layout / "evolve.yml"
    config.write_text(yaml.safe_dump(data))
    out = layout / "runs" / "run"
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(out), "--address", ray_address, "--no-progress",
                 "--max-fevals", "3", "--task-search-path", str(layout / "tasks")])
    printed = capsys.readouterr().out
    assert code == 0
    translated = yaml.safe_load((out / "experiment.yaml").read_text())
    assert translated["models"] == {"base": "../../models/base",
                                    "sources": ["../../models/model_1", "../../models/model_2"]}
    assert translated["evaluators"][0]["spec"]["include_path"] == ["../../tasks"]
    shown = yaml.safe_load(printed.split("run folder:")[0])  # printed as translated: paths as in evolve.yml
    assert shown["models"] == {"base": "models/base", "sources": ["models/model_1", "models/model_2"]}
    assert shown == {**translated, "models": shown["models"], "evaluators": shown["evaluators"]}
    stored = (out / "mergekit_evolve.yaml").read_text()
    assert yaml.safe_load(stored) == {**data, "genome": {**data["genome"], "base_model": "../../models/base",
                                                         "models": ["../../models/model_1",
                                                                    "../../models/model_2"]}}
    assert "#   evomerge run mergekit_evolve.yaml --max-fevals 3 --sigma0 0.16666666666666666 " \
           "--task-search-path ../../tasks\n" in stored
    space = translated["search_space"]
    assert space["merge_method"] == "task_arithmetic" and space["group_size"] == 2
    assert space["searched"] == ["weight"] and space["genes"]["weight"]["low"] == -1.0
    assert space["parameters"] == {"normalize": False}
    assert translated["objectives"] == [{"metric": "tiny_choice/acc,none", "direction": "maximize", "weight": 2.0}]
    assert translated["budget"] == {"trials": 3} and translated["dtype"] == "bfloat16"
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 3 and all(t["status"] == "ok" for t in trials)
    for t in trials:  # score = weight * accuracy on the 4 drawn items
        acc = t["metrics"]["tiny_choice/acc,none"]
        assert acc in (0.0, 0.25, 0.5, 0.75, 1.0) and t["score"] == pytest.approx(2.0 * acc)
    # the layout moved: both stored copies re-run from the run folder into the run's own config
    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(layout, moved)
    run = moved / "runs" / "run"
    own = RunFolder.open(run).config()
    assert own["models"]["base"] == str(moved / "models" / "base")
    again = load_experiment(run / "experiment.yaml").raw
    original = yaml.safe_load((run / "mergekit_evolve.yaml").read_text())
    line = next(t for t in (run / "mergekit_evolve.yaml").read_text().splitlines() if "evomerge run" in t)
    flags = line.split("mergekit_evolve.yaml")[1].split()
    options = EvolveOptions(max_fevals=int(flags[1]), sigma0=float(flags[3]),
                            task_search_path=[str((run / flags[5]).resolve())])  # cwd: the run folder
    evolved = validate_experiment(translate(original, run, options, "mergekit_evolve.yaml"), base_dir=run).raw
    assert again["name"] == own["name"] == "evolve" and evolved["name"] == "mergekit_evolve"  # named after its file
    for fresh in (again, evolved):
        for key in ("models", "search_space", "objectives", "optimizer", "budget", "dtype", "fitness"):
            assert fresh[key] == own[key], key
        spec, own_spec = fresh["evaluators"][0]["spec"], own["evaluators"][0]["spec"]
        assert spec["include_path"] == own_spec["include_path"] == [str(moved / "tasks")]
        assert {k: v for k, v in spec.items() if k != "base_dir"} == {k: v for k, v in own_spec.items()
                                                                      if k != "base_dir"}


def test_every_trial_failing_exits_1_with_the_first_reason_and_stays_resumable(llama_family, task_dir, ray_address,
                                                                              tmp_path, capsys):
    """mergekit-evolve's default apply_chat_template: true on a tokenizer without a chat template: every trial
    fails. The run records them, then exits 1 (not 0, not 2) with one line: the count and the first reason."""
    data = _evolve(llama_family)
    del data["apply_chat_template"]  # mergekit-evolve's default: true
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(out), "--address", ray_address, "--no-progress",
                 "--max-fevals", "2", "--task-search-path", str(task_dir)])
    err = capsys.readouterr().err.strip().splitlines()
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert code == 1
    assert len(trials) == 2 and all(t["status"] == "failed" for t in trials)
    assert err[-1] == f"evomerge run: error: all 2 trials failed; the first (trial 0): {trials[0]['error']}"
    assert "chat template" in trials[0]["error"]
    # resumable: a resume with nothing left says the same; with a larger budget it runs the new trials
    assert main(["run", "--resume", str(out), "--address", ray_address, "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == err[-1]
    stored = yaml.safe_load((out / "config.yaml").read_text())
    stored["budget"]["trials"] = 3
    (out / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    assert main(["run", "--resume", str(out), "--address", ray_address, "--no-progress"]) == 1
    assert "all 3 trials failed; the first (trial 0)" in capsys.readouterr().err.strip().splitlines()[-1]
    assert (out / "trials.jsonl").read_text().startswith("".join(json.dumps(t) + "\n" for t in trials))


def test_translation_matches_mergekit_genome(llama_family):
    """Gene count and starting point are mergekit-evolve's: (layer groups x models x params), weight 1/n,
    density 1; ties/dare_ties normalize by default; the base listed among the models gets no genes."""
    mk_genome = pytest.importorskip("mergekit.evo.genome")
    models = [str(llama_family["base"]), str(llama_family["model_1"]), str(llama_family["model_2"])]
    for method, granularity in (("ties", 0), ("dare_ties", 1), ("task_arithmetic", 4)):
        data = {"genome": {"models": models, "merge_method": method, "base_model": models[0],
                           "layer_granularity": granularity}, "tasks": ["tiny_choice"]}
        exp = validate_experiment(translate(data, Path("/"), EvolveOptions()), check_models=True)
        space = build_space(exp.space, exp.models.to_dict(), exp.dtype)
        theirs = mk_genome.ModelGenome(mk_genome.ModelGenomeDefinition.model_validate(data["genome"]))
        x0 = theirs.initial_genotype()
        groups, n_models, _, n_params = x0.shape
        assert space.dim == groups * (n_models - 1) * n_params  # the base's genes are ignored by these methods
        values = space.values(space.x0())
        assert all(v == pytest.approx(1 / 3) for k, v in values.items() if k.endswith(".weight"))
        assert all(v == 1.0 for k, v in values.items() if k.endswith(".density"))
        recipe = space.candidate(values)
        assert recipe["parameters"]["normalize"] is (method != "task_arithmetic")
        assert theirs.genotype_merge_config(x0).parameters["normalize"] is (method != "task_arithmetic")


@pytest.mark.parametrize("case, change, message", [
    ("slerp_smooth", {"genome": {"merge_method": "slerp", "smooth": True}}, "takes neither smooth nor filters"),
    ("slerp_base", {"genome": {"merge_method": "slerp"}}, "slerp genome's base_model must be one of genome.models"),
    ("filters", {"genome": {"filters": "mlp"}}, "genome.filters must be a list"),
    ("filters_twice", {"genome": {"filters": ["mlp", "mlp"]}}, "genome.filters must be a list of distinct"),
    ("smooth", {"genome": {"smooth": "yes"}}, "smooth must be true or false"),
    ("linear_base", {"genome": {"merge_method": "linear"}}, "base_model must be one of genome.models"),
    ("random_init", {"random_init": 1}, "random_init must be true or false"),
    ("granularity", {"genome": {"layer_granularity": 3}}, "does not divide the 4 layers"),
    ("unknown_key", {"genome": {"layers": 2}}, "unknown key 'layers'"),
    ("no_base", {"genome": {"base_model": None}}, "base_model is required"),
    ("tokenizer", {"genome": {"tokenizer_source": "union"}}, "tokenizer_source"),
    ("bad_task", {"tasks": [{"name": "tiny_choice", "weight": "high"}]}, "tasks[0].weight"),
    ("unknown_metric", {"tasks": [{"name": "tiny_choice", "metric": "f1,none"}]}, "not produced"),
])
def test_bad_evolve_configs(case, change, message, llama_family, task_dir, tmp_path, capsys):
    data = _evolve(llama_family)
    for key, value in change.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) else value
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    capsys.readouterr()
    code = main(["run", str(config), "--out", str(out), "--no-progress", "--max-fevals", "2",
                 "--task-search-path", str(task_dir)])
    captured = capsys.readouterr()
    assert code == 2, captured
    # Ray forwards the previous test's worker output (progress bars, "(TrialWorker pid=...)" lines) to this
    # process's stderr whenever it arrives; of what this command printed, exactly one line is its error
    err = [line for line in captured.err.splitlines() if line.startswith("evomerge run:")]
    assert len(err) == 1 and message in err[0], captured.err
    assert not out.exists() and captured.out == ""


def test_evolve_flags_need_an_evolve_config(tmp_path, capsys):
    experiment = tmp_path / "exp.yaml"
    experiment.write_text("search_space: ps_ties_dare\n")
    assert main(["run", str(experiment), "--max-fevals", "3"]) == 2
    assert "mergekit-evolve configs" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_candidate_merges_like_mergekit_genotype(method, llama_family, tmp_path):
    """One genome, two tools: our translated space's candidate recipe merges to the same tensors as the
    MergeConfiguration mergekit-evolve builds from the same genotype (layer groups as slices, bfloat16)."""
    import os

    import torch
    from safetensors.torch import load_file

    from evomerge.merge import run_merge
    from evomerge.recipe import Recipe

    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_genome = pytest.importorskip("mergekit.evo.genome")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    models = [str(llama_family["base"]), str(llama_family["model_1"]), str(llama_family["model_2"])]
    genome = {"models": models, "merge_method": method, "base_model": models[0], "layer_granularity": 2}
    exp = validate_experiment(translate({"genome": genome, "tasks": ["t"]}, Path("/"), EvolveOptions()))
    space = build_space(exp.space, exp.models.to_dict(), exp.dtype)
    x = torch.linspace(0.15, 0.9, space.dim).tolist()
    values = space.values(x)
    theirs = mk_genome.ModelGenome(mk_genome.ModelGenomeDefinition.model_validate(genome))
    genotype = theirs.initial_genotype()
    groups = ["layers_0-1", "layers_2-3"]
    for g, group in enumerate(groups):
        for m, alias in enumerate(["model_1", "model_2"], start=1):
            for p, gene in enumerate(mk_genome.METHOD_PARAM_MAPS[method]):
                genotype[g, m, 0, p] = values[f"{alias}.{group}.{gene}"]
    mk_merge.run_merge(theirs.genotype_merge_config(genotype), str(tmp_path / "theirs"),
                       mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    run_merge(Recipe.from_dict(space.candidate(values)), tmp_path / "ours", progress=False)
    ours, mk = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "theirs" / "model.safetensors")
    assert set(ours) == set(mk)
    worst = max((ours[k].double() - mk[k].double()).abs().max().item() for k in ours)
    print(f"max |ours - mergekit-evolve genotype| {method}: {worst:.3g}")
    assert all(ours[k].dtype == mk[k].dtype == torch.bfloat16 for k in ours) and worst <= 1e-6
