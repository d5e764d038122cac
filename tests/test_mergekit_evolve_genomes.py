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
from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.merge import recipe_structure, run_merge
from evomerge.mergekit_evolve import EvolveOptions, genome_from_genotype, translate
from evomerge.recipe import Recipe
from evomerge.search.experiment import validate_experiment
from evomerge.search.search_space import build_space
from evomerge.search.worker import TrialRunner, WorkerSetup
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
    # slerp: per group the two highest-scoring models, the higher one the group's base
    "slerp_pair": (["model_1", "model_2"], None, {"merge_method": "slerp", "layer_granularity": 2}),
    "slerp_three_blocks": (["base", "model_1", "model_2"], "base", {"merge_method": "slerp",
                                                                     "layer_granularity": 1}),
    "slerp_whole_model": (["model_2", "base", "model_1"], None, {"merge_method": "slerp"}),
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
    # float64, as the genotypes CMA-ES hands mergekit-evolve (numpy arrays)
    genotype = 0.05 + 0.9 * torch.rand(shape, generator=gen, dtype=torch.float64)
    if genome.get("allow_negative_weights"):
        genotype[..., 0] *= torch.where(torch.rand(shape[:-1], generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    if shape[-1] > 1:
        genotype[..., 1] = 1.0 if genome["merge_method"] == "dare_ties" else 0.3 + 0.7 * torch.rand(
            shape[:-1], generator=gen, dtype=torch.float64)
    return genotype


def _space(genome: dict, dtype: str):
    exp = validate_experiment(translate({"genome": genome, "tasks": ["t"]}, Path("/"), EvolveOptions()))
    return build_space(exp.space, exp.models.to_dict(), dtype)


@pytest.mark.parametrize("case, dtype", [(case, "float32") for case in CASES]
                         + [(case, "bfloat16") for case in ("smooth_filters", "filters_groups", "linear",
                                                            "slerp_three_blocks")])
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
    if case == "slerp_three_blocks":  # the groups pick different pairs and bases; the engine merges them alike
        slices = recipe.to_dict()["slices"]
        assert len({s["base_model"] for s in slices}) > 1
        assert len({tuple(src["model"] for src in s["sources"]) for s in slices}) > 1
        engine = MergeEngine(recipe)
        assert all(torch.equal(t, ours[k]) for k, t in engine.tensors())


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
        method = genome["merge_method"]
        listed_base = method not in ("linear", "slerp") and genome.get("base_model") in genome["models"]
        assert space.dim == groups * (n_models - listed_base) * sets * params, case
        recipe = space.candidate(space.values(space.x0()))
        assert ("base_model" in recipe) is (method != "linear")
        if method == "slerp":  # at the start every score is 1/n: the first two models, t = 1/2
            assert "parameters" not in recipe and len(recipe["slices"]) == groups
            assert all(s["base_model"] == genome["models"][0] and s["parameters"] == {"t": 0.5}
                       and [src["model"] for src in s["sources"]] == genome["models"][:2] for s in recipe["slices"])
            continue
        normalize = genome.get("normalize", method in ("ties", "dare_ties", "linear"))
        assert recipe["parameters"]["normalize"] is normalize
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


@pytest.mark.parametrize("case", ["smooth_filters", "filters_groups", "filters_model", "linear",
                                  "slerp_three_blocks"])
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


def test_worker_follows_slerp_pairs(llama_family, tmp_path):
    """A search worker holds one engine; a slerp candidate whose groups pick other pairs than the engine's sources
    gets an engine of its own, and its model equals `evomerge merge` of that candidate."""
    genome = _genome(llama_family, "slerp_three_blocks")
    space = _space(genome, "float32")
    runner = TrialRunner(WorkerSetup("ps", space.decode(space.x0()), [], device="cpu"))
    assert runner.error is None
    values = {name: (0.9 if name.startswith("model_2") else 0.2 if name.startswith("base") else 0.5)
              for name in space.names}
    candidate = space.decode([space.genes[i].unit(values[n]) for i, n in enumerate(space.names)])
    assert recipe_structure(candidate) != recipe_structure(space.decode(space.x0()))
    runner.materialize(candidate)
    run_merge(candidate, tmp_path / "merged", progress=False)
    on_disk = load_folder(tmp_path / "merged")
    assert runner.engine is not None
    assert all(torch.equal(t, on_disk[k]) for k, t in runner.engine.tensors())
    # with workers.sources: object_store a worker reads its local copies: slice sources and bases are mapped too
    original = str(llama_family["model_2"])
    runner.path_map = {original: str(tmp_path / "copy_of_model_2")}
    local = runner._local(candidate).to_dict()
    assert original not in json.dumps(local) and all(s["base_model"] == runner.path_map[original]
                                                     for s in local["slices"])


def test_per_slice_base_model_merges_like_mergekit(llama_family, tmp_path, mergekit_api):
    """mergekit's per-slice base_model (which slerp genomes write): each slice merges against its own base, here a
    task_arithmetic recipe whose two slices have different bases; a slice base missing from its sources is refused
    in one line."""
    fam = {k: str(v) for k, v in llama_family.items()}

    def recipe_of(bases: list[str]) -> dict:
        slices = [{"sources": [{"model": fam[m], "layer_range": [lo, lo + 2],
                                **({"parameters": {"weight": 0.7}} if m != base else {})}
                               for m in ("base", "model_1", "model_2")], "base_model": fam[base]}
                  for lo, base in zip((0, 2), bases)]
        return {"merge_method": "task_arithmetic", "base_model": fam["base"], "dtype": "float32", "slices": slices}

    recipe = recipe_of(["model_1", "base"])
    slices = recipe["slices"]
    run_merge(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    mergekit_api(recipe, tmp_path / "theirs")
    ours, mk = load_folder(tmp_path / "ours"), load_folder(tmp_path / "theirs")
    assert set(ours) == set(mk) and all(torch.equal(ours[k], mk[k]) for k in ours)
    run_merge(Recipe.from_dict(recipe_of(["base", "base"])), tmp_path / "plain", progress=False)
    assert not torch.equal(load_folder(tmp_path / "plain")["model.layers.0.mlp.up_proj.weight"],
                           ours["model.layers.0.mlp.up_proj.weight"])  # the slice's own base made a difference
    bad = {**recipe, "slices": [{**slices[0], "sources": slices[0]["sources"][:1] + slices[0]["sources"][2:]}]}
    with pytest.raises(EvomergeError, match=r"slices\[0\] must include its base_model among its sources"):
        Recipe.from_dict(bad)
