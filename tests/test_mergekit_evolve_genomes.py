"""Every mergekit-evolve genome option, translated and merged: for one fixed genotype, the translated space's
candidate merges (evomerge.merge.run_merge) to the tensors mergekit 0.1.5 merges (its own ``run_merge``) from the
MergeConfiguration mergekit-evolve's ``ModelGenome.genotype_merge_config`` builds of that genotype; float32
within 1e-6, and bfloat16 (mergekit-evolve's dtype) as well. Short `evomerge run`s of such configs run end to
end (real lm-eval task, real local Ray; tiny Llama checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.merge import run_merge
from evomerge.mergekit_evolve import EvolveOptions, genome_from_genotype, translate
from evomerge.recipe import Recipe
from evomerge.search.experiment import validate_experiment
from evomerge.search.search_space import build_space
from mergekit_oracle import load_folder

TOL = 1e-6

# name: (the genome's models, by family alias; base_model alias or None; the other genome keys)
CASES = {
    "ties_groups": (["base", "model_1", "model_2"], "base", {"merge_method": "ties", "layer_granularity": 2}),
    "dare_ties_blocks": (["model_1", "model_2"], "base", {"merge_method": "dare_ties", "layer_granularity": 1}),
    "task_arithmetic_negative": (["model_1", "model_2"], "base", {"merge_method": "task_arithmetic",
                                                                   "allow_negative_weights": True,
                                                                   "normalize": True}),
    "linear": (["model_1", "model_2"], None, {"merge_method": "linear", "layer_granularity": 2}),
    "linear_base_listed": (["base", "model_1", "model_2"], "base", {"merge_method": "linear", "normalize": False}),
    "smooth": (["model_1", "model_2"], "base", {"merge_method": "ties", "layer_granularity": 1, "smooth": True}),
    "smooth_filters": (["base", "model_1", "model_2"], "base",
                       {"merge_method": "task_arithmetic", "layer_granularity": 2, "smooth": True,
                        "filters": ["mlp", "self_attn"]}),
    "filters_groups": (["model_1", "model_2"], "base", {"merge_method": "ties", "layer_granularity": 2,
                                                        "filters": ["mlp", "q_proj"]}),
    "filters_model": (["model_1", "model_2"], "base", {"merge_method": "dare_ties", "filters": ["self_attn"],
                                                       "normalize": False}),
    "linear_smooth_filters": (["model_1", "model_2"], None, {"merge_method": "linear", "layer_granularity": 1,
                                                             "smooth": True, "filters": ["mlp"]}),
}


def _genome(llama_family, case: str) -> dict:
    models, base, rest = CASES[case]
    genome = {"models": [str(llama_family[m]) for m in models], "merge_method": rest["merge_method"], **rest}
    if base is not None:
        genome["base_model"] = str(llama_family[base])
    return genome


def _genotype(theirs, genome: dict, seed: int):
    """A fixed genotype inside evomerge's bounds: weights in [0.05, 0.95] (signed when negatives are allowed),
    densities in [0.3, 1] (dare_ties: 1, so that no random drop happens and both tools must agree exactly)."""
    shape = theirs.initial_genotype().shape
    gen = torch.Generator().manual_seed(seed)
    genotype = 0.05 + 0.9 * torch.rand(shape, generator=gen)
    if genome.get("allow_negative_weights"):
        genotype[..., 0] *= torch.where(torch.rand(shape[:-1], generator=gen) < 0.5, -1.0, 1.0)
    if shape[-1] > 1:
        genotype[..., 1] = 1.0 if genome["merge_method"] == "dare_ties" else 0.3 + 0.7 * torch.rand(shape[:-1],
                                                                                                     generator=gen)
    return genotype


def _space(genome: dict, dtype: str):
    exp = validate_experiment(translate({"genome": genome, "tasks": ["t"]}, Path("/"), EvolveOptions()))
    return build_space(exp.space, exp.models.to_dict(), dtype)


@pytest.mark.parametrize("case, dtype", [(case, "float32") for case in CASES]
                         + [(case, "bfloat16") for case in ("smooth_filters", "filters_groups", "linear")])
def test_translated_candidate_merges_like_mergekit_evolve(case, dtype, llama_family, tmp_path, mergekit_api):
    """float32 for every genome; bfloat16, mergekit-evolve's own dtype, for a few."""
    mk_genome = pytest.importorskip("mergekit.evo.genome")
    genome = _genome(llama_family, case)
    theirs = mk_genome.ModelGenome(mk_genome.ModelGenomeDefinition.model_validate(genome))
    genotype = _genotype(theirs, genome, seed=len(case))
    config = theirs.genotype_merge_config(genotype).model_copy(update={"dtype": dtype})
    mergekit_api(config, tmp_path / "theirs")

    space = _space(genome, dtype)
    x = genome_from_genotype(space, genome["models"], genotype.tolist())
    recipe = space.decode(x)
    run_merge(recipe, tmp_path / "ours", progress=False)
    ours, mk = load_folder(tmp_path / "ours"), load_folder(tmp_path / "theirs")
    assert set(ours) == set(mk)
    worst = max((ours[k].double() - mk[k].double()).abs().max().item() for k in ours)
    print(f"{case} {dtype}: {space.dim} genes, max |ours - mergekit-evolve| {worst:.3g}")
    assert all(ours[k].dtype == mk[k].dtype == getattr(torch, dtype) for k in ours) and worst <= TOL
    # the candidate recipe is mergekit YAML: it round-trips through evomerge's recipe parser unchanged
    assert Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict()


def test_genome_options_shape_the_space(llama_family):
    """Gene counts are mergekit-evolve's (groups x models x filter sets x parameters, less a listed base's ignored
    genes); smooth writes gradients, filters write [{filter, value}] lists, layer groups with filters a slice
    per group; normalize follows mergekit-evolve's default."""
    mk_genome = pytest.importorskip("mergekit.evo.genome")
    for case in CASES:
        genome = _genome(llama_family, case)
        space = _space(genome, "float32")
        groups, n_models, sets, params = mk_genome.ModelGenome(
            mk_genome.ModelGenomeDefinition.model_validate(genome)).initial_genotype().shape
        listed_base = genome["merge_method"] != "linear" and genome.get("base_model") in genome["models"]
        assert space.dim == groups * (n_models - listed_base) * sets * params, case
        recipe = space.candidate(space.values(space.x0()))
        normalize = genome.get("normalize", genome["merge_method"] in ("ties", "dare_ties", "linear"))
        assert recipe["parameters"]["normalize"] is normalize
        assert ("base_model" in recipe) is (genome["merge_method"] != "linear")
        if "slices" in recipe:
            assert case == "filters_groups" and len(recipe["slices"]) == groups
            weight = recipe["slices"][0]["sources"][0]["parameters"]["weight"]
        else:
            weight = recipe["models"][0]["parameters"]["weight"]
        if genome.get("filters"):
            assert [e.get("filter") for e in weight] == [*genome["filters"], None]
            weight = weight[-1]["value"]
        if genome.get("smooth") and groups > 1:
            assert weight == [pytest.approx(1 / n_models)] * groups
        elif isinstance(weight, list):  # layer groups: one entry per layer (embeddings with the first group)
            assert all(e["value"] == pytest.approx(1 / n_models) for e in weight)
        else:
            assert weight == pytest.approx(1 / n_models)


def test_random_init_draws_the_start(llama_family):
    """random_init: every gene starts at a uniform draw from [0, 1) (mergekit's torch.rand), here seeded, so a
    resumed or repeated run starts at the same point; without it, mergekit's fixed start (1/n, density 1)."""
    genome = _genome(llama_family, "ties_groups")
    exp = validate_experiment(translate({"genome": genome, "tasks": ["t"], "random_init": True}, Path("/"),
                                        EvolveOptions()))
    assert exp.space.genes["weight"].to_dict()["init"] == [0.0, 1.0]
    assert exp.space.genes["density"].to_dict()["init"] == [0.01, 1.0]
    space = build_space(exp.space, exp.models.to_dict(), "float32")
    values = space.values(space.x0())
    assert space.x0() == build_space(exp.space, exp.models.to_dict(), "float32").x0()
    assert len(set(values.values())) == space.dim and all(0 <= v <= 1 for v in values.values())
    assert all(v >= 0.01 for k, v in values.items() if k.endswith("density"))


@pytest.mark.parametrize("case", ["smooth_filters", "filters_groups", "linear"])
def test_genome_configs_run_end_to_end(case, llama_family, task_dir, ray_address, tmp_path):
    genome = _genome(llama_family, case)
    data = {"genome": genome, "tasks": [{"name": "tiny_choice", "weight": 1.5}], "limit": 4,
            "apply_chat_template": False, "random_init": case == "filters_groups"}
    config = tmp_path / "evolve.yml"
    config.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    code = main(["run", str(config), "--out", str(out), "--address", ray_address, "--no-progress",
                 "--max-fevals", "2", "--task-search-path", str(task_dir)])
    assert code == 0
    space = yaml.safe_load((out / "experiment.yaml").read_text())["search_space"]
    assert space.get("filters") == genome.get("filters") and space.get("smooth", False) is genome.get("smooth", False)
    trials = [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 and all(t["status"] == "ok" for t in trials)
    assert all(t["score"] == pytest.approx(1.5 * t["metrics"]["tiny_choice/acc,none"]) for t in trials)
