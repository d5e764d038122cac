"""Differential tests against mergekit 0.1.5 for arcee_fusion, karcher, multislerp, nearswap, nuslerp, ram,
ramplus_tl and sce, on tiny Llama and Qwen2 checkpoints and on single tensors of several shapes.

Whole recipes (gradients and filters included) go through ``evomerge.merge.run_merge`` and through mergekit's
Python API on the same folders; single tensors through our kernel (``run_method``) and mergekit's registered
method. float32 must agree within 1e-6; bfloat16 bit for bit, except where mergekit returns float32 for bfloat16
inputs (arcee_fusion, ramplus_tl: a float32 mask or scale promotes its result), where ours equals mergekit's
result rounded to bfloat16. Where mergekit fails (multislerp's error on three or more models whose mean direction
vanishes; arcee_fusion's random quartile estimate on tensors over 1,000,000 elements), a test states what we do.
The in-memory engine's ``materialize`` equals ``evomerge merge`` bit for bit for every method, and a PS search
space can search ``sce``'s ``select_topk`` and ``nuslerp``'s weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.merge import run_merge
from evomerge.methods import METHODS, Workspace, prepare_inputs, run_method
from evomerge.recipe import Recipe
from mergekit_oracle import absolute, load_folder

TOL = 1e-6
NEW_METHODS = ("arcee_fusion", "karcher", "multislerp", "nearswap", "nuslerp", "ram", "ramplus_tl", "sce")


def _merge_both(recipe: dict, fam: dict[str, Path], tmp_path: Path, mergekit_api, name: str):
    recipe = absolute(recipe, fam)
    ours, theirs = tmp_path / f"ours-{name}", tmp_path / f"mk-{name}"
    run_merge(Recipe.from_dict(recipe), ours, progress=False)
    mergekit_api(recipe, theirs)
    a, b = load_folder(ours), load_folder(theirs)
    assert set(a) == set(b), set(a) ^ set(b)
    return a, b


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


GRADIENT_FILTER = [{"filter": "mlp", "value": [0.2, 0.9]}, {"filter": "self_attn", "value": 0.6}, {"value": 0.4}]

RECIPES: dict[str, dict] = {
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": [{"model": "model_1"}],
                 "parameters": {"t": [{"filter": "self_attn", "value": [0.0005, 0.002]}, {"value": 0.001}]}},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "model_1"}]},
    "karcher": {"merge_method": "karcher",
                "models": [{"model": "base"}, {"model": "model_1"}, {"model": "model_2"}]},
    "karcher_options": {"merge_method": "karcher", "parameters": {"max_iter": "3", "tol": [{"filter": "mlp",
                                                                                            "value": "1e-3"}]},
                        "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "multislerp": {"merge_method": "multislerp", "base_model": "base",
                   "models": [{"model": "model_1", "parameters": {"weight": GRADIENT_FILTER}},
                              {"model": "model_2", "parameters": {"weight": [0.7, 0.3]}}]},
    "multislerp_no_base": {"merge_method": "multislerp", "parameters": {"normalize_weights": False, "eps": 1e-6},
                           "models": [{"model": "base", "parameters": {"weight": 0.2}},
                                      {"model": "model_1", "parameters": {"weight": 0.5}},
                                      {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "nuslerp": {"merge_method": "nuslerp", "base_model": "base",
                "models": [{"model": "model_1", "parameters": {"weight": GRADIENT_FILTER}},
                           {"model": "model_2", "parameters": {"weight": 0.5}}]},
    "nuslerp_rows": {"merge_method": "nuslerp", "base_model": "base", "parameters": {"nuslerp_flatten": False},
                     "models": [{"model": "model_1", "parameters": {"weight": [0.1, 0.9]}},
                                {"model": "model_2", "parameters": {"weight": 0.5}}]},
    "nuslerp_row_wise": {"merge_method": "nuslerp", "base_model": "base",
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "models": [{"model": "model_1", "parameters": {"weight": 0.3}},
                                    {"model": "model_2", "parameters": {"weight": GRADIENT_FILTER}}]},
    "nuslerp_no_base": {"merge_method": "nuslerp", "parameters": {"weight": 1.0, "nuslerp_flatten": False},
                        "models": [{"model": "model_1", "parameters": {"weight": 0.25}}, {"model": "model_2"}]},
    "ram": {"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": [0.0005, 0.002]},
            "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "ram_yaml_strings": {"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": "1e-3"},
                         "models": [{"model": "model_1"}, {"model": "model_2"}]},  # YAML's 1e-3 is a string
    "ram_default": {"merge_method": "ram", "base_model": "base",
                    "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base",
                   "parameters": {"epsilon": 0.001, "r": [{"filter": "mlp", "value": [0.1, 0.8]}, {"value": 0.5}],
                                  "alpha": 0.6},
                   "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "sce": {"merge_method": "sce", "base_model": "base",
            "parameters": {"select_topk": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 0.5}]},
            "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "sce_default_int8": {"merge_method": "sce", "base_model": "base", "parameters": {"int8_mask": True},
                         "models": [{"model": "model_1"}, {"model": "model_2"}]},
    "sce_slices": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": 0.4},
                   "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]},
                                           {"model": "model_1", "layer_range": [0, 4]},
                                           {"model": "model_2", "layer_range": [0, 4]}]}]},
    "karcher_stacked": {"merge_method": "karcher",
                        "slices": [{"sources": [{"model": "model_1", "layer_range": [0, 2]},
                                                {"model": "model_2", "layer_range": [0, 2]}]},
                                   {"sources": [{"model": "model_1", "layer_range": [1, 4]},
                                                {"model": "model_2", "layer_range": [1, 4]}]}]},
    "nuslerp_slices": {"merge_method": "nuslerp", "base_model": "base",
                       "slices": [{"sources": [{"model": "base", "layer_range": [0, 4]},
                                               {"model": "model_1", "layer_range": [0, 4],
                                                "parameters": {"weight": [0.2, 0.8]}},
                                               {"model": "model_2", "layer_range": [0, 4],
                                                "parameters": {"weight": 0.5}}],
                                   "parameters": {"nuslerp_flatten": False}}]},
}
F32 = {name: {**recipe, "dtype": "float32"} for name, recipe in RECIPES.items()}
QWEN_CASES = ["nearswap", "arcee_fusion", "karcher", "multislerp", "nuslerp_rows", "ram", "ramplus_tl", "sce"]


@pytest.mark.parametrize("name", list(RECIPES))
def test_llama_recipe_matches_mergekit(name, llama_family, tmp_path, mergekit_api):
    ours, theirs = _merge_both(F32[name], llama_family, tmp_path, mergekit_api, name)
    assert {t.dtype for t in ours.values()} == {t.dtype for t in theirs.values()} == {torch.float32}
    assert _max_diff(ours, theirs) <= TOL


@pytest.mark.parametrize("name", QWEN_CASES)
def test_qwen2_recipe_matches_mergekit(name, qwen2_family, tmp_path, mergekit_api):
    ours, theirs = _merge_both(F32[name], qwen2_family, tmp_path, mergekit_api, name)
    assert _max_diff(ours, theirs) <= TOL


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp("bf16"), n_variants=2, arch="llama", seed=5, dtype=torch.bfloat16)


FLOAT32_RESULT = ("arcee_fusion", "ramplus_tl")  # mergekit's own result dtype for bfloat16 inputs


@pytest.mark.parametrize("name", ["nearswap", "arcee_fusion", "karcher", "multislerp", "multislerp_no_base", "nuslerp",
                                  "nuslerp_row_wise", "nuslerp_no_base", "ram", "ramplus_tl", "sce",
                                  "sce_default_int8"])
def test_bfloat16_recipe_matches_mergekit_bit_for_bit(name, bf16_family, tmp_path, mergekit_api):
    """No `dtype:` -> computed in the sources' bfloat16 as mergekit does; the result stays bfloat16."""
    ours, theirs = _merge_both(RECIPES[name], bf16_family, tmp_path, mergekit_api, name)
    assert {t.dtype for t in ours.values()} == {torch.bfloat16}
    expected = {torch.float32} if RECIPES[name]["merge_method"] in FLOAT32_RESULT else {torch.bfloat16}
    assert {t.dtype for t in theirs.values()} == expected
    for key in ours:
        assert torch.equal(ours[key], theirs[key].to(torch.bfloat16)), key


# ------------------------------------------------------------------ single tensors, several shapes


def _ours(name, tensors, base_index, shared=None, per=None):
    spec = METHODS[name]
    params = {p.name: p.default for p in spec.global_params} | (shared or {})
    scope = [i for i in range(len(tensors)) if spec.per_model_scope == "input" or i != base_index]
    per_model = [{k: v[j] for k, v in (per or {}).items()} for j, _ in enumerate(scope)]
    out = torch.empty_like(tensors[0])
    run_method(spec, prepare_inputs(spec, tensors, base_index), params, per_model, out, ws=Workspace())
    return out


def _theirs(name, tensors, base_index, shared=None, per=None):
    from mergekit import merge_methods
    from mergekit.merge_methods.base import TensorGroup

    group = TensorGroup.from_tensors(tensors, base_index=base_index, name="t")
    ids = [e.id for e in group.entries if not e.is_base]
    params = {k: dict(zip(ids, v)) for k, v in (per or {}).items()} | (shared or {})
    (result,) = merge_methods.get(name)((group,), parameters=params)
    return result


W3 = {"weight": [0.5, 1.3, 0.4]}
# (method, base index or None, number of tensors, global parameters, per-model parameters)
TENSOR_CASES = {
    "nearswap": ("nearswap", 0, 2, {"t": 0.01}, None),
    "nearswap_large_t": ("nearswap", 0, 2, {"t": 0.5}, None),
    "arcee_fusion": ("arcee_fusion", 0, 2, None, None),
    "karcher": ("karcher", None, 4, None, None),
    "karcher_one_step": ("karcher", None, 3, {"max_iter": 1, "tol": 1e-3}, None),
    "multislerp": ("multislerp", 0, 4, None, W3),
    "multislerp_no_base_raw": ("multislerp", None, 3, {"normalize_weights": False}, W3),
    "nuslerp_flatten": ("nuslerp", 0, 3, None, {"weight": [0.3, 0.6]}),
    "nuslerp_rows": ("nuslerp", 0, 3, {"nuslerp_flatten": False}, {"weight": [0.3, 0.6]}),
    "nuslerp_row_wise": ("nuslerp", None, 2, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         {"weight": [0.8, 0.1]}),
    "ram": ("ram", 0, 4, {"epsilon": 0.01}, None),
    "ramplus_tl": ("ramplus_tl", 0, 4, {"epsilon": 0.01, "r": 0.4, "alpha": 0.9}, None),
    "sce": ("sce", 0, 4, {"select_topk": 0.3}, None),
    "sce_all": ("sce", 0, 3, None, None),
}
SHAPES = [(96, 80), (333,), (4, 6, 10), (1, 1), (130, 7)]


def _inputs(shape, count, dtype, seed=0, spread=0.02):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    tensors = [base] + [base + spread * torch.randn(shape, generator=gen) for _ in range(count - 1)]
    return [t.to(dtype) for t in tensors]


@pytest.mark.parametrize("case", list(TENSOR_CASES))
def test_per_tensor_shapes_match_mergekit(case, mergekit_api):
    name, base_index, count, shared, per = TENSOR_CASES[case]
    worst = {}
    for dtype in (torch.float32, torch.bfloat16):
        for i, shape in enumerate(SHAPES):
            tensors = _inputs(shape, count, dtype, seed=i)
            ours = _ours(name, tensors, base_index, shared, per)
            theirs = _theirs(name, tensors, base_index, shared, per)
            assert ours.dtype == dtype and ours.shape == theirs.shape
            diff = (ours.double() - theirs.double()).abs().max().item()
            worst[dtype] = max(worst.get(dtype, 0.0), diff)
            if dtype == torch.float32:
                assert diff <= TOL, (case, shape, diff)
            else:
                assert torch.equal(ours, theirs.to(dtype)), (case, shape, diff)
    print(f"{case}: max |ours - mergekit| float32 {worst[torch.float32]:.3g}, bfloat16 {worst[torch.bfloat16]:.3g}")


def test_quantized_deltas_ties_at_the_cuts_match_mergekit(mergekit_api):
    """Task vectors of few distinct values: many ties at sce's top-k cut and ram's epsilon, zero deltas in sce."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(64, 50, generator=gen)
    tensors = [base] + [base + torch.randint(-2, 3, base.shape, generator=gen).float() / 64 for _ in range(3)]
    for name, shared in (("sce", {"select_topk": 0.25}), ("sce", {"select_topk": 0.0}), ("ram", {"epsilon": 1 / 64}),
                         ("ramplus_tl", {"epsilon": 1 / 128}), ("nearswap", {"t": 1 / 64})):
        count = 2 if name == "nearswap" else 4
        ours = _ours(name, tensors[:count], 0, shared)
        theirs = _theirs(name, tensors[:count], 0, shared)
        assert (ours - theirs).abs().max().item() <= TOL, (name, shared)


def test_colinear_and_zero_vectors_match_mergekit(mergekit_api):
    """nuslerp's and multislerp's colinear / two-model zero-mean fallbacks, and karcher with a zero tensor."""
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(40, 30, generator=gen)
    delta = 0.1 * torch.randn(40, 30, generator=gen)
    cases = [
        ("nuslerp", [base, base + delta, base + 2 * delta], 0, None, {"weight": [0.3, 0.7]}),  # colinear
        ("nuslerp", [base, base + delta, base - delta], 0, {"nuslerp_flatten": False}, {"weight": [1.0, 1.0]}),
        ("multislerp", [base, base + delta, base - delta], 0, None, {"weight": [0.5, 0.5]}),  # antipodal pair
        ("karcher", [torch.zeros_like(base), base, base + delta], None, None, None),
        ("karcher", [torch.zeros_like(base), torch.zeros_like(base)], None, None, None),
    ]
    for name, tensors, base_index, shared, per in cases:
        ours = _ours(name, tensors, base_index, shared, per)
        theirs = _theirs(name, tensors, base_index, shared, per)
        assert torch.isfinite(ours).all()
        assert (ours - theirs).abs().max().item() <= TOL, name


def test_multislerp_vanishing_mean_with_three_models_where_mergekit_fails(mergekit_api):
    """Three task vectors whose weighted mean direction is zero: mergekit raises; we take the weighted linear
    combination, the method's own fallback for two models (for all-zero task vectors: the base)."""
    gen = torch.Generator().manual_seed(2)
    base = torch.randint(-64, 64, (30, 20), generator=gen).float() / 32  # exact arithmetic: u and -u cancel
    delta = torch.randint(-8, 8, (30, 20), generator=gen).float() / 256
    antipodal = [base, base + delta, base - delta, base.clone()]
    unchanged = [base, base.clone(), base.clone(), base.clone()]  # a tensor no model changed
    for tensors in (antipodal, unchanged):
        with pytest.raises(ValueError, match="weighted sum of the input tensors is zero"):
            _theirs("multislerp", tensors, 0, None, {"weight": [1.0, 1.0, 1.0]})
        ours = _ours("multislerp", tensors, 0, None, {"weight": [1.0, 1.0, 1.0]})
        linear = base + sum((t - base) / 3 for t in tensors[1:])
        assert (ours - linear).abs().max().item() <= TOL
    ours = _ours("multislerp", unchanged, 0, None, {"weight": [1.0, 1.0, 1.0]})
    assert torch.equal(ours, base)


def test_arcee_fusion_exact_quartiles_on_large_tensors(mergekit_api):
    """Over 1,000,000 elements mergekit estimates the quartiles from a random sample (torch's global stream);
    we use the exact order statistics: our result is the definition's, and agrees with mergekit's on all but a
    sliver of elements near the threshold."""
    from evomerge.methods.arcee_fusion import fusion_importance

    gen = torch.Generator().manual_seed(4)
    base = torch.randn(1100, 1000, generator=gen)
    other = base + 0.01 * torch.randn(base.shape, generator=gen)
    ours = _ours("arcee_fusion", [base, other], 0)
    importance = fusion_importance(base, other)
    ordered = importance.reshape(-1).sort().values
    n = ordered.numel()
    q1, median, q3 = (ordered[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    expected = torch.where(importance >= median + 1.5 * (q3 - q1), other, base)
    assert torch.equal(ours, expected)
    torch.manual_seed(0)
    theirs = _theirs("arcee_fusion", [base, other], 0)
    assert (ours != theirs).float().mean().item() < 1e-3


# ------------------------------------------------------------------ engine, examples, recipes, search


ENGINE_CASES = ["nearswap", "arcee_fusion", "karcher_options", "multislerp", "nuslerp_row_wise", "nuslerp_no_base",
                "ram", "ramplus_tl", "sce"]


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_materialize_equals_evomerge_merge(name, llama_family, tmp_path):
    recipe = Recipe.from_dict(absolute(F32[name], llama_family))
    engine = MergeEngine(recipe, threads=2)
    out = tmp_path / "merged"
    run_merge(recipe, out, progress=False, threads=1)
    on_disk = load_folder(out)
    state = {k: t.detach().clone() for k, t in engine.tensors()}
    assert set(state) == set(on_disk)
    for key in state:
        assert torch.equal(state[key], on_disk[key]), key


def test_materialize_new_parameters_in_place(llama_family, tmp_path):
    """A candidate with other sce/nuslerp parameters equals `evomerge merge` of that candidate."""
    for name, change in (("sce", {"select_topk": 0.2}), ("nuslerp", {"nuslerp_flatten": False})):
        recipe = absolute(F32[name], llama_family)
        engine = MergeEngine(recipe)
        candidate = {**recipe, "parameters": {**recipe.get("parameters", {}), **change}}
        engine.materialize(candidate)
        out = tmp_path / name
        run_merge(Recipe.from_dict(candidate), out, progress=False)
        on_disk = load_folder(out)
        for key, tensor in engine.tensors():
            assert torch.equal(tensor, on_disk[key]), (name, key)


BAD_RECIPES = [
    ({"merge_method": "nuslerp", "base_model": "base",
      "models": [{"model": "model_1", "parameters": {"weight": 1.0}}]}, "exactly 2 models besides the base"),
    ({"merge_method": "nearswap", "base_model": "base", "models": [{"model": "model_1"}, {"model": "model_2"}],
      "parameters": {"t": 0.1}}, "exactly 2 models"),
    ({"merge_method": "nearswap", "base_model": "base", "models": [{"model": "model_1"}]},
     "missing required parameter 't'"),
    ({"merge_method": "sce", "base_model": "base", "models": [{"model": "model_1"}],
      "parameters": {"select_topk": 1.5}}, "select_topk must be in [0, 1]"),
    ({"merge_method": "karcher", "models": [{"model": "model_1"}, {"model": "model_2"}],
      "parameters": {"max_iter": 2.5}}, "must be a whole number"),
    ({"merge_method": "karcher", "models": [{"model": "model_1"}, {"model": "model_2"}],
      "parameters": {"max_iter": [1, 2]}}, "max_iter: expected a whole number, got 1.33"),
    ({"merge_method": "karcher", "base_model": "base", "models": [{"model": "model_1"}]}, "does not use a base_model"),
    ({"merge_method": "multislerp", "models": [{"model": "model_1", "parameters": {"weight": 0.5}},
                                              {"model": "model_2", "parameters": {"weight": -0.5}}]},
     "sum to zero"),
    ({"merge_method": "multislerp", "models": [{"model": "model_1"}, {"model": "model_2"}]},
     "missing required parameter 'weight'"),
    ({"merge_method": "ram", "base_model": "base", "models": [{"model": "model_1", "parameters": {"weight": 1.0}}]},
     "does not take parameter 'weight'"),
    ({"merge_method": "ramplus_tl", "base_model": "base", "models": [{"model": "model_1"}],
      "parameters": {"r": "high"}}, "must be a number"),
]


@pytest.mark.parametrize("index", range(len(BAD_RECIPES)))
def test_bad_recipe_is_one_line_exit_2_nothing_written(index, llama_family, tmp_path, capsys):
    recipe, message = BAD_RECIPES[index]
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(absolute({**recipe, "dtype": "float32"}, llama_family)))
    out = tmp_path / "out"
    code = main(["merge", str(path), str(out), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_every_new_method_has_example_doc_and_readme_row():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    methods_doc = (root / "docs" / "METHODS.md").read_text()
    for name in NEW_METHODS:
        assert name in METHODS
        assert (root / "examples" / f"{name}.yaml").is_file(), name
        assert f"| `{name}` | [{name}.yaml](examples/{name}.yaml)" in readme, name
        assert f"examples/{name}.yaml" in methods_doc, name


def test_search_space_searches_sce_select_topk_and_nuslerp_weights(llama_family):
    """A PS space may name any numeric parameter of its method: a global one (sce's select_topk) becomes one gene
    per layer group (filters in the recipe's `parameters`), a per-model one a gene per model per group. Through
    the experiment's validation and the engine: a group's gene moves exactly that group's tensors."""
    from evomerge.search.experiment import validate_experiment
    from evomerge.search.search_space import build_space, load_space_definition

    sources = {"m1": str(llama_family["model_1"]), "m2": str(llama_family["model_2"])}
    exp = validate_experiment({
        "models": {"base": str(llama_family["base"]), "sources": sources},
        "search_space": "ps_sce",  # search_spaces/ps_sce.yaml: select_topk in [0.05, 1], groups of 2 blocks
        "evaluators": [{"name": "e", "spec": "custom:search_helpers:logit_std"}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}], "budget": {"trials": 2}})
    space = build_space(exp.space, exp.models.to_dict(), exp.dtype)
    assert space.names == ["embed.select_topk", "layers_0-1.select_topk", "layers_2-3.select_topk",
                           "head.select_topk"]
    low = space.candidate(space.values([1.0, 0.0, 1.0, 1.0]))
    assert {"filter": "layers.1.", "value": pytest.approx(0.05)} in low["parameters"]["select_topk"]
    assert all("parameters" not in m for m in low["models"])
    engine = MergeEngine(low)
    before = {k: t.detach().clone() for k, t in engine.tensors()}
    engine.materialize(space.candidate(space.values([1.0, 1.0, 1.0, 1.0])))
    changed = {k for k, t in engine.tensors() if not torch.equal(t, before[k])}
    assert changed and all(".layers.0." in k or ".layers.1." in k for k in changed), changed
    assert any("mlp" in k for k in changed)

    nuslerp = load_space_definition({"kind": "ps", "merge_method": "nuslerp"})
    assert set(nuslerp.genes) == {"weight"}
    space = build_space(nuslerp, exp.models.to_dict())
    assert space.names == ["m1.all.weight", "m2.all.weight"]
    MergeEngine(space.candidate(space.values(space.x0())))
    with pytest.raises(EvomergeError, match="select_topk"):
        load_space_definition({"kind": "ps", "merge_method": "nuslerp", "genes": {"select_topk": {}}})
    with pytest.raises(EvomergeError, match="has no parameter to search"):
        load_space_definition({"kind": "ps", "merge_method": "arcee_fusion"})


def test_large_tensors_do_not_depend_on_torch_threads(mergekit_api):
    """A tensor big enough for torch to split whole-tensor reductions over threads (1M elements): our result is
    the same at 1 and 2 torch threads (the kernels run on one) and equals mergekit's at one thread bit for bit.
    mergekit's own result depends on the thread count (karcher's dot products: about 1e-6 apart here; the other
    reductions happen to agree at this size)."""
    threads = torch.get_num_threads()
    try:
        for case in ("karcher", "multislerp", "nuslerp_flatten"):
            name, base_index, count, shared, per = TENSOR_CASES[case]
            tensors = _inputs((1024, 1024), count, torch.float32, seed=9)
            torch.set_num_threads(2)
            two = _ours(name, tensors, base_index, shared, per)
            theirs_two = _theirs(name, tensors, base_index, shared, per)
            assert torch.get_num_threads() == 2
            torch.set_num_threads(1)
            one = _ours(name, tensors, base_index, shared, per)
            theirs_one = _theirs(name, tensors, base_index, shared, per)
            assert torch.equal(one, two), case
            assert torch.equal(one, theirs_one), case
            assert (one - theirs_two).abs().max().item() <= 1e-5, case
    finally:
        torch.set_num_threads(threads)
