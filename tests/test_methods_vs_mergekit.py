"""Differential tests against mergekit 0.1.5 (the test oracle), on tiny Llama and Qwen2 checkpoints.

Whole recipes (gradients and filters included) are merged by ``evomerge.merge.run_merge`` and by mergekit's
own Python API (in-process: one import instead of a slow ``mergekit-yaml`` start per recipe), then compared
tensor by tensor within 1e-6 in float32. Random-drop methods are compared twice: per tensor with identical masks
(both RNGs seeded alike: mergekit draws from torch's global generator, we from a seeded ``torch.Generator``),
and end to end through their deterministic part (density 1) plus statistics of the drops.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from evomerge.merge import run_merge
from evomerge.methods import METHODS, Workspace, prepare_inputs, run_method
from evomerge.recipe import Recipe
from mergekit_oracle import absolute, load_folder

TOL = 1e-6


def _compare(recipe: dict, fam: dict[str, Path], tmp_path: Path, mergekit_api, name: str) -> dict:
    recipe = absolute(recipe, fam)
    ours = tmp_path / f"ours-{name}"
    theirs = tmp_path / f"mk-{name}"
    run_merge(Recipe.from_dict(recipe), ours, progress=False)
    mergekit_api(recipe, theirs)
    a, b = load_folder(ours), load_folder(theirs)
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        assert a[key].dtype == b[key].dtype, key
        diff = (a[key].double() - b[key].double()).abs().max().item()
        assert diff <= TOL, f"{name}: {key} differs by {diff}"
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((theirs / "config.json").read_text())
    assert cfg_a["num_hidden_layers"] == cfg_b["num_hidden_layers"]
    return a


WEIGHT_FILTER = [{"filter": "mlp", "value": 0.7}, {"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.4}]

RECIPES: dict[str, dict] = {
    "linear": {"merge_method": "linear", "dtype": "float32",
               "models": [{"model": "base", "parameters": {"weight": 0.5}},
                          {"model": "model_1", "parameters": {"weight": [0.2, 0.8]}},
                          {"model": "model_2", "parameters": {"weight": WEIGHT_FILTER}}]},
    "linear_unnormalized": {"merge_method": "linear", "dtype": "float32", "parameters": {"normalize": False},
                            "models": [{"model": "model_1", "parameters": {"weight": 0.3}},
                                       {"model": "model_2", "parameters": {"weight": 0.6}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base", "dtype": "float32",
              "models": [{"model": "base"}, {"model": "model_1"}],
              "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]},
                                   {"filter": "mlp", "value": [1.0, 0.3]}, {"value": 0.45}]}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "dtype": "float32",
                        "parameters": {"lambda": 0.8},
                        "models": [{"model": "model_1", "parameters": {"weight": [0.2, 0.9, 0.5]}},
                                   {"model": "model_2", "parameters": {"weight": WEIGHT_FILTER}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "dtype": "float32",
             "models": [{"model": "model_1", "parameters": {"weight": [0.2, 0.9], "density": 0.5}},
                        {"model": "model_2", "parameters": {"weight": WEIGHT_FILTER,
                                                            "density": [{"filter": "mlp", "value": [0.3, 0.8]},
                                                                        {"value": 0.45}]}}]},
    "ties_unnormalized": {"merge_method": "ties", "base_model": "base", "dtype": "float32",
                          "parameters": {"normalize": False, "int8_mask": True, "lambda": 1.3, "density": 0.35},
                          "models": [{"model": "model_1", "parameters": {"weight": 1.0}},
                                     {"model": "model_2", "parameters": {"weight": -0.5}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base", "dtype": "float32",
                    "models": [{"model": "model_1", "parameters": {"weight": 0.5, "density": 0.7, "gamma": 0.05}},
                               {"model": "model_2", "parameters": {"weight": 0.6, "density": [0.5, 0.9]}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base", "dtype": "float32",
                         "parameters": {"gamma": 0.02, "normalize": True},
                         "models": [{"model": "model_1", "parameters": {"weight": 0.5, "density": 0.6}},
                                    {"model": "model_2", "parameters": {"weight": 0.7, "density": 0.8}}]},
    "dare_ties_density1": {"merge_method": "dare_ties", "base_model": "base", "dtype": "float32",
                           "models": [{"model": "model_1", "parameters": {"weight": 0.6}},
                                      {"model": "model_2", "parameters": {"weight": [0.3, 0.7]}}]},
    "dare_linear_density1": {"merge_method": "dare_linear", "base_model": "base", "dtype": "float32",
                             "models": [{"model": "model_1", "parameters": {"weight": 0.6}},
                                        {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "della_density1": {"merge_method": "della", "base_model": "base", "dtype": "float32",
                       "models": [{"model": "model_1", "parameters": {"weight": 0.6}},
                                  {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "della_linear_density1": {"merge_method": "della_linear", "base_model": "base", "dtype": "float32",
                              "models": [{"model": "model_1", "parameters": {"weight": 0.6}},
                                         {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "dtype": "float32",
                    "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "base", "dtype": "float32",
                                "parameters": {"filter_wise": True},
                                "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "passthrough_slices": {"merge_method": "passthrough", "dtype": "float32",
                           "slices": [{"sources": [{"model": "model_1", "layer_range": [0, 3]}]},
                                      {"sources": [{"model": "model_2", "layer_range": [1, 4],
                                                    "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                             {"filter": "up_proj",
                                                                              "value": [1.0, 2.0]}]}}]}]},
    # mergekit 0.1.5 cannot write a Qwen2 config whose layer count changed (layer_types), so the Qwen2
    # frankenmerge keeps the depth: layers 0-1 of model_1 then layers 2-3 of model_2.
    "passthrough_same_depth": {"merge_method": "passthrough", "dtype": "float32",
                               "slices": [{"sources": [{"model": "model_1", "layer_range": [0, 2]}]},
                                          {"sources": [{"model": "model_2", "layer_range": [2, 4],
                                                        "parameters": {"scale": 0.9}}]}]},
}

LLAMA_CASES = list(RECIPES)
QWEN_CASES = ["linear", "slerp", "task_arithmetic", "ties", "breadcrumbs_ties", "dare_ties_density1",
              "della_density1", "model_stock_filter_wise", "passthrough_same_depth"]


@pytest.mark.parametrize("name", LLAMA_CASES)
def test_llama_recipe_matches_mergekit(name, llama_family, tmp_path, mergekit_api):
    _compare(RECIPES[name], llama_family, tmp_path, mergekit_api, name)


@pytest.mark.parametrize("name", QWEN_CASES)
def test_qwen2_recipe_matches_mergekit(name, qwen2_family, tmp_path, mergekit_api):
    _compare(RECIPES[name], qwen2_family, tmp_path, mergekit_api, name)


def test_passthrough_stacks_layers(llama_family, tmp_path, mergekit_api):
    merged = _compare(RECIPES["passthrough_slices"], llama_family, tmp_path, mergekit_api, "stack")
    m2 = load_file(llama_family["model_2"] / "model.safetensors")
    # output layer 3 is model_2's layer 1, o_proj scaled by 0.5
    assert torch.equal(merged["model.layers.3.self_attn.o_proj.weight"],
                       m2["model.layers.1.self_attn.o_proj.weight"] * 0.5)
    assert sum(1 for k in merged if k.endswith("input_layernorm.weight")) == 6


@pytest.fixture(scope="module")
def quantized_family(llama_family, tmp_path_factory):
    """model_1/model_2 whose task vectors take few distinct values: many |delta| ties at every threshold."""
    root = tmp_path_factory.mktemp("quantized")
    base = load_file(llama_family["base"] / "model.safetensors")
    fam = {"base": llama_family["base"]}
    for i, name in enumerate(("model_1", "model_2")):
        gen = torch.Generator().manual_seed(100 + i)
        out = root / name
        shutil.copytree(llama_family[name], out)
        tensors = {k: (v + torch.randint(-3, 4, v.shape, generator=gen).float() * 0.01).contiguous()
                   for k, v in base.items()}
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        fam[name] = out
    return fam


@pytest.mark.parametrize("name", ["ties", "ties_unnormalized", "breadcrumbs", "breadcrumbs_ties"])
def test_tie_breaking_at_threshold_matches_mergekit(name, quantized_family, tmp_path, mergekit_api):
    _compare(RECIPES[name], quantized_family, tmp_path, mergekit_api, name)


# ------------------------------------------------------------------ per tensor, identical random masks


def _ours(name, tensors, weights, densities, shared=None, per=None, seed=0):
    spec = METHODS[name]
    params = {p.name: p.default for p in spec.global_params}
    params.update(shared or {})
    per_model = []
    for i in range(len(weights)):
        entry = {p.name: p.default for p in spec.per_model_params}
        entry.update(weight=weights[i], density=densities[i], **{k: v[i] for k, v in (per or {}).items()})
        per_model.append(entry)
    out = torch.empty_like(tensors[0])
    gen = torch.Generator().manual_seed(seed)
    run_method(spec, prepare_inputs(spec, tensors, 0), params, per_model, out, generator=gen, ws=Workspace())
    return out


def _theirs(name, tensors, weights, densities, shared=None, per=None, seed=0):
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=0, name="t")
    params = {"weight": {i + 1: w for i, w in enumerate(weights)},
              "density": {i + 1: d for i, d in enumerate(densities)}}
    for key, values in (per or {}).items():
        params[key] = {i + 1: v for i, v in enumerate(values)}
    params.update(shared or {})
    torch.manual_seed(seed)
    (result,) = merge_methods.get(name)((group,), parameters=params)
    return result


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
                                  "della_linear", "task_arithmetic"])
@pytest.mark.parametrize("quantized", [False, True])
def test_per_tensor_identical_masks(name, quantized, mergekit_api):
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(96, 80, generator=gen)
    if quantized:
        tensors = [base] + [base + torch.randint(-4, 5, base.shape, generator=gen).float() / 64 for _ in range(3)]
    else:
        tensors = [base] + [base + 0.02 * torch.randn(base.shape, generator=gen) for _ in range(3)]
    weights = [0.7, 1.2, -0.3]
    per = {"gamma": [0.01, 0.05, 0.0]} if "breadcrumbs" in name else None
    if name.startswith("della"):
        per = {"epsilon": [0.1, 0.05, 0.2]}
    for densities in ([0.5, 0.3, 0.7], [0.85, 0.25, 1.0]):
        for normalize in (False, True):
            shared = {"normalize": normalize}
            ours = _ours(name, tensors, weights, densities, shared, per, seed=11)
            theirs = _theirs(name, tensors, weights, densities, shared, per, seed=11)
            assert (ours - theirs).abs().max().item() <= TOL, (name, densities, normalize)


def test_bias_vector_and_rescale_off(mergekit_api):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(333, generator=gen)
    tensors = [base] + [base + torch.randn(333, generator=gen) * 0.1 for _ in range(2)]
    for name in ("dare_ties", "della", "ties"):
        shared = {"rescale": False}
        extra = {"epsilon": [0.1, 0.1]} if name == "della" else None
        ours = _ours(name, tensors, [0.5, 0.5], [0.4, 0.6], shared, extra, seed=5)
        theirs = _theirs(name, tensors, [0.5, 0.5], [0.4, 0.6], shared, extra, seed=5)
        assert (ours - theirs).abs().max().item() <= TOL, name


# ------------------------------------------------------------------ random drops end to end: statistics


@pytest.mark.parametrize("mode", ["l1", "inverse_density"])
def test_dare_drop_statistics(mode, llama_family, tmp_path):
    density = 0.3
    recipe = absolute({"merge_method": "dare_linear", "base_model": "base", "dtype": "float32",
                        "parameters": {"rescale_mode": mode},
                        "models": [{"model": "model_1", "parameters": {"weight": 1.0, "density": density}}]},
                       llama_family)
    out = tmp_path / "dare"
    run_merge(Recipe.from_dict(recipe), out, seed=3, progress=False)
    merged = load_folder(out)
    base = load_file(llama_family["base"] / "model.safetensors")
    m1 = load_file(llama_family["model_1"] / "model.safetensors")
    checked = 0
    for key, value in merged.items():
        delta = m1[key] - base[key]
        kept = value - base[key]
        if delta.numel() < 4000:
            continue
        nonzero = (kept != 0).float().mean().item()
        assert abs(nonzero - density) < 0.03, (key, nonzero)
        if mode == "l1":
            assert kept.abs().sum().item() == pytest.approx(delta.abs().sum().item(), rel=1e-4), key
        else:
            mask = kept != 0
            assert torch.allclose(kept[mask], delta[mask] / density, atol=1e-6), key
        checked += 1
    assert checked >= 10
    # the same seed gives the same drops; another seed different ones
    again = tmp_path / "dare-again"
    run_merge(Recipe.from_dict(recipe), again, seed=3, progress=False)
    other = tmp_path / "dare-other"
    run_merge(Recipe.from_dict(recipe), other, seed=4, progress=False)
    a, b, c = merged, load_folder(again), load_folder(other)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_recipe_yaml_is_accepted_by_mergekit(llama_family, tmp_path):
    """What we write back (recipe.yaml) is valid mergekit YAML."""
    from mergekit.config import MergeConfiguration

    recipe = Recipe.from_dict(absolute(RECIPES["ties"], llama_family))
    config = MergeConfiguration.model_validate(yaml.safe_load(recipe.to_yaml()))
    assert config.merge_method == "ties"


def test_large_tensor_tie_split_across_chunks(mergekit_api):
    """A tensor bigger than the kernel's chunk whose top-k cut splits huge runs of tied magnitudes."""
    from evomerge.methods.task_arithmetic import CHUNK

    gen = torch.Generator().manual_seed(5)
    base = torch.randn(700, 600, generator=gen)
    assert base.numel() > CHUNK
    tensors = [base] + [base + torch.randint(-3, 4, base.shape, generator=gen).float() / 32 for _ in range(2)]
    spec = METHODS["ties"]
    for densities in ([0.3, 0.55], [0.77, 0.12]):
        for normalize in (True, False):
            shared = {"normalize": normalize}
            ours = _ours("ties", tensors, [0.6, 0.9], densities, shared, seed=1)
            theirs = _theirs("ties", tensors, [0.6, 0.9], densities, shared, seed=1)
            assert (ours - theirs).abs().max().item() <= TOL
            # the one-shot path (selection, sorting only on a split tie) gives the same bits as the engine's
            params = {p.name: p.default for p in spec.global_params} | shared
            per_model = [{"weight": w, "density": d} for w, d in zip([0.6, 0.9], densities)]
            lazy = torch.empty_like(base)
            run_method(spec, prepare_inputs(spec, tensors, 0, lazy=True), params, per_model, lazy, ws=Workspace())
            assert torch.equal(lazy, ours)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp("bf16"), n_variants=2, arch="llama", seed=4, dtype=torch.bfloat16)


@pytest.mark.parametrize("name", ["ties", "linear_unnormalized", "model_stock", "breadcrumbs_ties"])
def test_bfloat16_sources_without_dtype_match_mergekit(name, bf16_family, tmp_path, mergekit_api):
    """No `dtype:` -> computed in the sources' bfloat16, as mergekit does, and the result stays bfloat16."""
    recipe = {k: v for k, v in RECIPES[name].items() if k != "dtype"}
    merged = _compare(recipe, bf16_family, tmp_path, mergekit_api, name)
    assert {t.dtype for t in merged.values()} == {torch.bfloat16}


@pytest.mark.parametrize("name", ["ties", "dare_ties", "task_arithmetic", "dare_linear", "breadcrumbs_ties", "della"])
def test_bfloat16_four_models_per_tensor(name, mergekit_api):
    """bfloat16 compute with 4 models: weights rounded like mergekit's weight tensor, sums rounded once."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(300, 200, generator=gen).bfloat16()
    tensors = [base] + [(base.float() + torch.randn(300, 200, generator=gen) * 0.02).bfloat16() for _ in range(4)]
    weights, densities = [0.37, 0.71, -0.23, 0.53], [0.5, 0.3, 0.8, 0.6]
    per = {"epsilon": [0.1] * 4} if name == "della" else None
    for normalize in (True, False):
        shared = {"normalize": normalize}
        ours = _ours(name, tensors, weights, densities, shared, per, seed=9)
        theirs = _theirs(name, tensors, weights, densities, shared, per, seed=9)
        assert ours.dtype == theirs.dtype == torch.bfloat16
        assert torch.equal(ours, theirs), (name, normalize)
