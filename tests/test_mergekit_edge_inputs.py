"""Valid mergekit input we used to refuse: a zero-length passthrough slice, ``density: 0``, and a shard index that
lists a tied head no shard holds. Each is compared with mergekit 0.1.5 (the oracle) or with transformers loading
the same folder; tiny models are built here, real files are written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge import tiny
from evomerge.checkpoint import Checkpoint
from evomerge.errors import EvomergeError
from evomerge.merge import run_merge
from evomerge.recipe import Recipe
from mergekit_oracle import load_folder

TOL = 1e-6


def _same_as_mergekit(recipe: dict, tmp_path: Path, mergekit_api, name: str) -> dict[str, torch.Tensor]:
    ours, theirs = tmp_path / f"ours-{name}", tmp_path / f"mk-{name}"
    run_merge(Recipe.from_dict(recipe), ours, progress=False)
    mergekit_api(recipe, theirs)
    a, b = load_folder(ours), load_folder(theirs)
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        diff = (a[key].double() - b[key].double()).abs().max().item()
        assert a[key].dtype == b[key].dtype and diff <= TOL, f"{name}: {key} differs by {diff}"
    assert (json.loads((ours / "config.json").read_text())["num_hidden_layers"]
            == json.loads((theirs / "config.json").read_text())["num_hidden_layers"])
    return a


# ------------------------------------------------------------------------------ zero-length passthrough slice


@pytest.mark.parametrize("ranges", [([0, 0], [1, 4]), ([0, 3], [4, 4]), ([0, 2], [2, 2], [1, 3])])
def test_zero_length_slice_is_merged_like_mergekit(ranges, llama_family, tmp_path, mergekit_api):
    models = ["model_1", "model_2", "model_1"]
    recipe = {"merge_method": "passthrough", "dtype": "float32",
              "slices": [{"sources": [{"model": str(llama_family[models[i]]), "layer_range": list(r)}]}
                         for i, r in enumerate(ranges)]}
    merged = _same_as_mergekit(recipe, tmp_path, mergekit_api, "zero_slice")
    layers = sum(r[1] - r[0] for r in ranges)
    assert sum(1 for k in merged if k.endswith("input_layernorm.weight")) == layers


def test_only_a_total_of_zero_layers_is_refused(llama_family):
    recipe = {"merge_method": "passthrough",
              "slices": [{"sources": [{"model": str(llama_family["model_1"]), "layer_range": [2, 2]}]},
                         {"sources": [{"model": str(llama_family["model_2"]), "layer_range": [0, 0]}]}]}
    with pytest.raises(EvomergeError, match="zero layers in total"):
        Recipe.from_dict(recipe)
    recipe["slices"][0]["sources"][0]["layer_range"] = [3, 2]
    with pytest.raises(EvomergeError, match="0 <= start <= end"):
        Recipe.from_dict(recipe)


# ------------------------------------------------------------------------------ density 0


DENSITY_ZERO = {
    # model_1's task vector dropped whole; model_2 kept (density 1: no random draw) or sparsified by magnitude
    "ties": ({"density": 0.0}, {"density": 0.5}),
    "ties_both": ({"density": 0.0}, {"density": 0.0}),
    "breadcrumbs": ({"density": 0.0}, {"density": 0.7}),
    "breadcrumbs_ties": ({"density": 0.0}, {"density": 0.6}),
    "dare_ties": ({"density": 0.0}, {"density": 1.0}),
    "dare_linear": ({"density": 0.0}, {"density": 1.0}),
    "della": ({"density": 0.0}, {"density": 1.0}),
    "della_linear": ({"density": 0.0}, {"density": 1.0}),
    "ties_gradient": ({"density": [0.0, 1.0]}, {"density": 0.5}),
}


@pytest.mark.parametrize("case", sorted(DENSITY_ZERO))
def test_density_zero_matches_mergekit(case, llama_family, tmp_path, mergekit_api):
    method = case.removesuffix("_both").removesuffix("_gradient")
    first, second = DENSITY_ZERO[case]
    recipe = {"merge_method": method, "base_model": str(llama_family["base"]), "dtype": "float32",
              "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 0.6, **first}},
                         {"model": str(llama_family["model_2"]), "parameters": {"weight": 0.3, **second}}]}
    merged = _same_as_mergekit(recipe, tmp_path, mergekit_api, case)
    if case == "ties_both":  # nothing kept: the base itself
        base = load_folder(llama_family["base"])
        assert all(torch.equal(merged[k], base[k]) for k in base)


def test_density_zero_drops_the_task_vector_on_the_engine_too(llama_family):
    """dare_linear with model_1 at density 0 and normalize off equals the base plus model_2's weighted delta."""
    from evomerge.engine import MergeEngine

    recipe = Recipe.from_dict({"merge_method": "dare_linear", "base_model": str(llama_family["base"]),
                               "dtype": "float32", "parameters": {"normalize": False},
                               "models": [{"model": str(llama_family["model_1"]),
                                           "parameters": {"weight": 0.6, "density": 0.0}},
                                          {"model": str(llama_family["model_2"]),
                                           "parameters": {"weight": 0.3, "density": 1.0}}]})
    state = MergeEngine(recipe).model.state_dict()
    base, m2 = Checkpoint(llama_family["base"]), Checkpoint(llama_family["model_2"])
    for name in base.tensor_names:
        expected = base.get(name) + 0.3 * (m2.get(name) - base.get(name))
        assert torch.allclose(state[name], expected, atol=1e-6), name


# ------------------------------------------------------------------------------ index listing a tied alias


@pytest.fixture(scope="module")
def tied_sharded_with_alias(tmp_path_factory):
    """A tied Qwen2 in shards whose index also lists lm_head.weight (no shard holds it), as some hub uploads do."""
    root = tmp_path_factory.mktemp("alias")
    family = tiny.make_family(root / "fam", n_variants=1, arch="qwen2", seed=2, tie_word_embeddings=True,
                              max_shard_size="40KB")
    for name in ("base", "model_1"):
        index_path = family[name] / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        assert "lm_head.weight" not in index["weight_map"]
        index["weight_map"]["lm_head.weight"] = index["weight_map"]["model.embed_tokens.weight"]
        index_path.write_text(json.dumps(index))
    return family


def test_index_listing_a_tied_alias_opens_and_merges(tied_sharded_with_alias, tmp_path):
    from transformers import AutoModelForCausalLM

    base = tied_sharded_with_alias["base"]
    model, info = AutoModelForCausalLM.from_pretrained(base, output_loading_info=True)  # transformers loads it
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ckpt = Checkpoint(base)
    assert "lm_head.weight" not in ckpt.tensor_names and "model.embed_tokens.weight" in ckpt.tensor_names
    recipe = Recipe.from_dict({"merge_method": "ties", "base_model": str(base), "dtype": "float32",
                               "models": [{"model": str(tied_sharded_with_alias["model_1"]),
                                           "parameters": {"weight": 1.0, "density": 0.5}}]})
    out = run_merge(recipe, tmp_path / "out", progress=False)
    merged, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()


def test_index_naming_a_real_tensor_no_shard_holds_is_still_an_error(tied_sharded_with_alias, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tied_sharded_with_alias["base"], broken)
    index_path = broken / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.extra"] = index["weight_map"]["model.embed_tokens.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(EvomergeError, match="model.norm.extra"):
        Checkpoint(broken)
