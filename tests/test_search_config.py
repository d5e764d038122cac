"""Experiment validation, search spaces, optimizers and the run folder: no Ray, real files and libraries."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.cli import main
from evomerge.search.experiment import OptimizerConfig, load_experiment
from evomerge.search.objectives import Objective, pareto_front
from evomerge.search.optimizers import Problem, build_optimizer, default_population
from evomerge.search.records import TrialRecord
from evomerge.search.run_folder import RunFolder
from evomerge.search.search_space import DFSSpace, PSSpace, load_space_definition

REPO = Path(__file__).resolve().parents[1]


def _experiment(llama_family, **over):
    exp = {
        "models": {"base": str(llama_family["base"]),
                   "sources": {"m1": str(llama_family["model_1"]), "m2": str(llama_family["model_2"])}},
        "search_space": "ps_ties_dare",
        "evaluators": [{"name": "e", "spec": "custom:search_helpers:logit_std"}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}],
        "optimizer": {"name": "cmaes"},
        "budget": {"trials": 4},
    }
    for k, v in over.items():
        if v is None:
            exp.pop(k, None)
        else:
            exp[k] = v
    return exp


BAD_CONFIGS = [
    ("missing model path", {"models": {"base": "nowhere/base", "sources": ["nowhere/m1"]}}, "does not exist"),
    ("unknown space", {"search_space": "no_such_space"}, "unknown search space 'no_such_space'"),
    ("inverted bounds", {"space": {"genes": {"weight": {"low": 1.0, "high": 0.0}}}}, "inverted bounds"),
    ("no objectives", {"objectives": None}, "no objectives given"),
    ("no evaluators", {"evaluators": []}, "no evaluators given"),
    ("unknown key", {"optimiser": {"name": "cmaes"}}, "unknown key 'optimiser'"),
    ("unknown optimizer", {"optimizer": {"name": "sgd"}}, "unknown optimizer 'sgd'"),
    ("objective of no evaluator", {"objectives": [{"metric": "x/acc"}]}, "names no evaluator"),
    ("no budget", {"budget": None}, "no budget given"),
    ("dfs models for ps", {"models": {"a": "x", "b": "y"}}, "models.base is required"),
    ("bad wall time", {"budget": {"wall_time": "soon"}}, "is not a duration"),
    ("generations without population", {"optimizer": {"name": "tpe"}, "budget": {"generations": 3}},
     "needs optimizer.population"),
]


@pytest.mark.parametrize("what,over,message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_exit_2(what, over, message, llama_family, tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_experiment(llama_family, **over)))
    code = main(["run", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert err.count("\n") == 1 and err.startswith("evomerge run: error: ")
    assert not (tmp_path / "run").exists()  # nothing half-written


def test_bad_config_from_a_real_process(llama_family, tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(_experiment(llama_family, search_space="nope")))
    proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "run", str(path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "unknown search space 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_of_a_non_run_folder_is_exit_2(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err


def test_ps_genome_to_recipe_per_model_and_per_block(llama_family):
    from evomerge.recipe import Recipe

    sources = {"m1": str(llama_family["model_1"]), "m2": str(llama_family["model_2"])}
    paper = PSSpace(load_space_definition("ps_ties_dare"), str(llama_family["base"]), sources)
    assert paper.dim == 4  # density and weight per model (3 models would be the paper's 6 genes)
    assert np.allclose(paper.x0(), [0.5 / 0.95 - 0.05 / 0.95, 0.5] * 2)
    values = paper.values([1.0, 1.0, 0.0, 0.25])
    assert values == {"m1.all.density": 1.0, "m1.all.weight": 1.0, "m2.all.density": 0.05, "m2.all.weight": 0.25}
    recipe = Recipe.from_dict(paper.candidate(values))  # a valid mergekit recipe
    assert recipe.merge_method == "dare_ties"
    assert [m.parameters for m in recipe.models] == [{"density": 1.0, "weight": 1.0},
                                                      {"density": 0.05, "weight": 0.25}]

    blocks = PSSpace(load_space_definition("ps_ties_dare", {"group_size": 2}), str(llama_family["base"]), sources)
    groups = [g for g, _ in blocks.groups]
    assert groups == ["embed", "layers_0-1", "layers_2-3", "head"]  # tiny llama: 4 blocks
    assert blocks.dim == 2 * len(groups) * 2
    values = blocks.values(np.linspace(0, 1, blocks.dim))
    cand = blocks.candidate(values)
    weight = cand["models"][0]["parameters"]["weight"]
    assert weight[0] == {"filter": "embed_tokens", "value": values["m1.embed.weight"]}
    assert {"filter": "layers.3.", "value": values["m1.layers_2-3.weight"]} in weight
    assert weight[-1] == {"value": values["m1.head.weight"]}  # the fallback: lm_head and final norm
    Recipe.from_dict(cand)
    # weights may sum above 1: nothing normalises them
    assert sum(v for k, v in blocks.values(np.ones(blocks.dim)).items() if k.endswith(".weight")) > 1

    # the built-in per-block space (one group per transformer block, embeddings and head separate)
    per_block = PSSpace(load_space_definition("ps_ties_dare_blocks"), str(llama_family["base"]), sources)
    assert [g for g, _ in per_block.groups] == ["embed", "layers_0", "layers_1", "layers_2", "layers_3", "head"]
    assert per_block.dim == 2 * 6 * 2


def test_dfs_genome_to_path(llama_family):
    space = DFSSpace(load_space_definition("dfs"), str(llama_family["model_1"]), str(llama_family["model_2"]))
    assert (space.m, space.t) == (8, 16)
    start = space.candidate(space.values(space.x0()))
    assert start["layers"] == [0, 1, 2, 3] and start["scales"] == [1.0] * 4  # the initial path is model A
    values = space.values(space.x0())
    values.update({"I.1": -0.5, "I.5": 0.7, "I.9": 0.2, "W.0.2": 1.5, "W.2.5": 0.5, "W.5.1": 0.25})
    cand = space.candidate(values)
    assert cand["layers"] == [0, 2, 5, 1, 3]  # A0, A2, B1, A1 of the 2nd repetition, A's last layer (fixed)
    assert cand["scales"] == [1.0, 1.5, 0.5, 0.25, values["W.1.3"]]
    ffn = DFSSpace(load_space_definition("dfs", {"scaling": "ffn", "ffn_hidden": 3}), str(llama_family["model_1"]),
                   str(llama_family["model_2"]))
    assert sum(n.startswith("ffn.") for n in ffn.names) == 3 * 3 + 3 + 3 + 1
    assert ffn.candidate(ffn.values(ffn.x0()))["scales"] == [1.0] * 4  # all-zero net: scale 1


def test_dfs_candidate_shares_layers_and_generates_with_cache():
    import torch

    from evomerge import tiny
    from evomerge.search.dataflow import DataflowCandidate

    a, b = tiny.make_model("llama", seed=0), tiny.make_model("llama", seed=1)
    cand = DataflowCandidate(a, b)
    ids = torch.randint(4, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(cand.set_path([0, 1, 2, 3])(ids).logits, a(ids).logits)
        model = cand.set_path([0, 5, 1, 5, 1, 3], [1.0, 1.3, 0.7, 1.0, 1.1, 0.9])
        assert model.model.layers[1].layer is b.model.layers[1]  # shared, not copied
        assert model.model.layers[1].layer is model.model.layers[3].layer
        cached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("name", ["cmaes", "tpe", "optuna_cmaes", "nsga2", "random"])
def test_optimizer_state_resume_is_exact(name, tmp_path):
    """Saved mid-run (state_dict through JSON) and rebuilt, the optimizer proposes exactly what the
    uninterrupted one proposes."""
    dim = 5
    problem = Problem([f"g{i}" for i in range(dim)], [0.5] * dim, [Objective("m", "maximize", 1.0)], seed=3,
                      options=OptimizerConfig(name=name, sigma0=1 / 6))

    def make(folder):
        folder.mkdir(exist_ok=True)
        return build_optimizer(problem, run_dir=str(folder), study_name="s")

    def f(x):
        return [-float(np.sum((np.asarray(x) - 0.3) ** 2))]

    straight, resumed = make(tmp_path / "a"), make(tmp_path / "b")
    xs_a, xs_b = [], []
    for step in range(14):
        ka, xa = straight.ask()
        xs_a.append(xa)
        straight.tell(ka, f(xa) if step != 3 else None)  # one failed trial
        kb, xb = resumed.ask()
        xs_b.append(xb)
        resumed.tell(kb, f(xb) if step != 3 else None)
        if step in (4, 9):
            state = json.loads(json.dumps(resumed.state_dict()))  # plain data, no pickled classes
            assert state["version"] == 2 and state["kind"] == name
            resumed = make(tmp_path / "b")
            resumed.load_state_dict(state)
    assert xs_a == xs_b
    assert all(0.0 <= v <= 1.0 for x in xs_a for v in x)
    if name == "cmaes":
        assert straight.population == default_population(dim) == 8


def test_run_folder_appends_repairs_and_keeps_pareto(tmp_path):
    run = RunFolder.create(tmp_path / "run", {"name": "x"})
    objs = [Objective("a", "maximize"), Objective("b", "minimize")]
    points = [(1.0, 1.0), (2.0, 2.0), (0.5, 0.5), (1.5, 3.0), (2.0, 2.5)]
    for i, p in enumerate(points):
        run.append_trial(TrialRecord.from_json({"trial": i, "status": "ok", "objectives": list(p),
                                                "score": p[0] - p[1], "genome": {}}))
    run.append_trial(TrialRecord.from_json({"trial": 5, "status": "failed", "objectives": None, "score": None,
                                            "genome": {}, "metrics": {"a": float("nan")}}))
    run.close()
    with open(run.path / "trials.jsonl", "a") as f:
        f.write('{"trial": 6, "status": "o')  # a torn line: killed mid-append
    assert [t.trial for t in run.trials()] == [0, 1, 2, 3, 4, 5]
    run.repair_trials()
    assert (run.path / "trials.jsonl").read_bytes().endswith(b"\n")
    assert json.loads((run.path / "trials.jsonl").read_text().splitlines()[5])["metrics"] == {"a": None}
    front = run.write_pareto(run.trials(), objs)
    assert [t.trial for t in front] == [0, 1, 2]  # (1.5, 3) and (2, 2.5) are dominated by (2, 2)
    assert [t["trial"] for t in json.loads((run.path / "pareto.json").read_text())["trials"]] == [0, 1, 2]
    assert pareto_front(run.trials(), objs[:1])[0].trial in (1, 4)


def test_smoke_experiment_is_valid():
    exp = load_experiment(REPO / "experiments" / "smoke.yaml")
    assert exp.kind == "ps" and exp.models.build is not None and exp.models.build["n_variants"] == 2
    assert exp.evaluators[0].spec["base_dir"] == str(REPO / "experiments")
    for name in ("ps_ties_dare", "dfs", "ps_dfs"):
        assert load_space_definition(name)["kind"] == name.replace("_ties_dare", "")


def test_budget_counts_trials_generations_and_wall_time_of_every_part(llama_family, tmp_path):
    from evomerge.search.experiment import validate_experiment
    from evomerge.search.scheduler import stage_budget
    from evomerge.search.stages import stage_definitions

    def budget(stage=0, population=None, **over):
        exp = validate_experiment(_experiment(llama_family, **over), base_dir=tmp_path)
        return stage_budget(stage_definitions(exp), stage, population, exp.optimizer.name), exp

    b, _ = budget(budget={"trials": 10, "wall_time": "1m"})
    assert b.left(5, 4, elapsed_s=0.0)
    assert not b.left(6, 4, elapsed_s=0.0)  # running trials count against the budget
    assert not b.left(0, 0, elapsed_s=61.0)  # time spent by earlier (killed) parts of the run

    optimizer = build_optimizer(Problem(list("abcd"), [0.5] * 4, [Objective("m")], 0,
                                        OptimizerConfig("cmaes", 1 / 6, 6)), str(tmp_path), "s")
    b, _ = budget(population=optimizer.population, budget={"generations": 3})
    assert b.left(17, 0, 0.0) and not b.left(18, 0, 0.0)

    over = dict(search_space="ps_dfs", models={"base": str(llama_family["base"]), "b": str(llama_family["model_2"]),
                                               "sources": [str(llama_family["model_1"])]},
                budget={"trials": 9, "wall_time": 100})
    ps, exp = budget(0, **over)
    dfs, _ = budget(1, **over)
    stages = stage_definitions(exp)
    assert [(s.name, s.trials, s.wall_time) for s in stages] == [("ps", 4, 50.0), ("dfs", 5, 50.0)]
    assert not ps.left(0, 0, 60.0) and dfs.left(0, 0, 60.0)


def test_per_group_genes_reach_the_right_tensors(llama_family):
    """A group's weight gene moves exactly that group's tensors (checked on the engine's merged weights)."""
    import torch
    from safetensors.torch import load_file

    from evomerge.engine import MergeEngine

    space = PSSpace(load_space_definition("ps_ties_dare", {"group_size": 2}), str(llama_family["base"]),
                    {"m1": str(llama_family["model_1"])})
    values = {n: (1.0 if n.endswith("density") else 0.0) for n in space.names}
    values["m1.layers_2-3.weight"] = 1.0  # only blocks 2 and 3 take model_1's task vector
    model = MergeEngine(space.candidate(values)).materialize(space.candidate(values))
    base = load_file(llama_family["base"] / "model.safetensors")
    m1 = load_file(llama_family["model_1"] / "model.safetensors")
    merged = model.state_dict()
    for name in base:
        expect = m1[name] if (".layers.2." in name or ".layers.3." in name) else base[name]
        assert torch.allclose(merged[name], expect, atol=1e-6), name


@pytest.mark.parametrize("crash_at", [6, 8])  # population 4: ask 8 starts a generation (asked all at once)
@pytest.mark.parametrize("name", ["tpe", "optuna_cmaes", "nsga2"])
def test_an_optuna_ask_lost_in_a_crash_is_made_again(name, crash_at, tmp_path):
    """The ask's SQLite row was written, the driver's checkpoint was not: resume puts that row back to WAITING
    and asks again from the checkpoint, getting the same trial and genome; the run goes on as the uninterrupted
    one."""
    dim = 3
    problem = Problem([f"g{i}" for i in range(dim)], [0.5] * dim, [Objective("m", "maximize", 1.0)], seed=1,
                      options=OptimizerConfig(name=name, population=4))

    def f(x):
        return [-float(np.sum((np.asarray(x) - 0.3) ** 2))]

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = build_optimizer(problem, str(tmp_path / "a"), "s")
    crashed = build_optimizer(problem, str(tmp_path / "b"), "s")
    xs_a, xs_b = [], []
    for step in range(10):
        ka, xa = straight.ask()
        straight.tell(ka, f(xa))
        xs_a.append(xa)
        if step == crash_at:
            checkpoint = json.loads(json.dumps(crashed.state_dict()))
            crashed.ask()  # lost: the process dies before the checkpoint
            crashed = build_optimizer(problem, str(tmp_path / "b"), "s")
            crashed.load_state_dict(checkpoint)
            crashed.recover_lost_asks(set())  # what the driver does on resume (no trial was pending)
        kb, xb = crashed.ask()
        crashed.tell(kb, f(xb))
        xs_b.append(xb)
    assert xs_a == xs_b
    trials = crashed.study.get_trials()  # the lost ask was taken up under its own number, none failed
    assert [t.number for t in trials] == list(range(len(trials))) and "FAIL" not in {t.state.name for t in trials}
    assert [t.state.name for t in trials[:10]] == ["COMPLETE"] * 10


@pytest.mark.parametrize("name", ["optuna_cmaes", "nsga2", "cmaes"])
def test_generational_optimizers_do_not_depend_on_completion_order(name, tmp_path):
    """Several workers finish in any order: a generation is asked only when the previous one is all told, so the
    next generation is the same whatever the order of the tells."""
    dim = 3
    problem = Problem([f"g{i}" for i in range(dim)], [0.5] * dim, [Objective("m", "maximize", 1.0)], seed=2,
                      options=OptimizerConfig(name=name, population=4))

    def f(x):
        return [-float(np.sum((np.asarray(x) - 0.3) ** 2))]

    def in_order(folder):
        folder.mkdir()
        opt = build_optimizer(problem, str(folder), "s")
        xs = []
        for _ in range(3):
            asked = [opt.ask() for _ in range(4)]
            assert opt.ask() is None  # the barrier
            xs += [x for _, x in asked]
            for key, x in asked:
                opt.tell(key, f(x))
        return xs

    def interleaved(folder):  # two workers: a tell comes in before the generation is all handed out
        folder.mkdir()
        opt = build_optimizer(problem, str(folder), "s")
        xs = []
        for _ in range(3):
            first = [opt.ask() for _ in range(2)]
            opt.tell(first[1][0], f(first[1][1]))
            rest = [opt.ask() for _ in range(2)]
            for key, x in [*rest[::-1], first[0]]:
                opt.tell(key, f(x))
            xs += [x for _, x in [*first, *rest]]
        return xs

    assert in_order(tmp_path / "a") == interleaved(tmp_path / "b")
