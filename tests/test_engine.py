"""The in-memory engine: equal to `evomerge merge`, bit-identical across repeats, in place, strict about candidates."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.merge import run_merge
from evomerge.recipe import Recipe


def _recipe(fam: dict[str, Path], method: str, models: list[tuple[str, dict]], parameters: dict | None = None,
            **extra) -> Recipe:
    data = {"merge_method": method,
            "models": [{"model": str(fam[name]), **({"parameters": p} if p else {})} for name, p in models],
            **extra}
    if method not in ("linear", "passthrough"):
        data["base_model"] = str(fam["base"])
    if parameters:
        data["parameters"] = parameters
    return Recipe.from_dict(data)


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in folder.glob("*.safetensors"):
        out.update(load_file(file))
    return out


def _engine_state(engine: MergeEngine) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in engine.tensors()}


def _assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


GROUPS = [{"filter": "embed_tokens", "value": 0.3}, {"filter": "layers.0.", "value": 0.5},
          {"filter": "layers.1.", "value": 0.9}, {"filter": "layers.2.", "value": 0.2}, {"value": 0.6}]

CASES = {
    "ties": ("ties", [("model_1", {"weight": GROUPS, "density": [0.3, 0.9]}),
                      ("model_2", {"weight": 0.7, "density": GROUPS})], None, {}),
    "dare_ties": ("dare_ties", [("model_1", {"weight": 0.8, "density": GROUPS}),
                                ("model_2", {"weight": GROUPS, "density": 0.4})], None, {}),
    "task_arithmetic": ("task_arithmetic", [("model_1", {"weight": GROUPS}), ("model_2", {"weight": 0.5})],
                        {"lambda": 0.9}, {}),
    "della": ("della", [("model_1", {"weight": 0.5, "density": 0.5}), ("model_2", {"weight": 0.5, "density": 0.6})],
              {"epsilon": 0.1}, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", [("model_1", {"weight": 0.5, "density": 0.7}),
                                              ("model_2", {"weight": 0.5, "density": 0.8})], None, {}),
    "dare_linear_inverse": ("dare_linear", [("model_1", {"weight": 0.5, "density": 0.5}),
                                            ("model_2", {"weight": 0.5, "density": 0.5})],
                            {"rescale_mode": "inverse_density"}, {}),
    "linear": ("linear", [("model_1", {"weight": 0.3}), ("model_2", {"weight": [0.1, 0.9]})], None, {}),
    "slerp": ("slerp", [("base", {}), ("model_1", {})], {"t": [0.1, 0.8]}, {}),
    "model_stock": ("model_stock", [("model_1", {}), ("model_2", {})], None, {}),
    "ties_bf16_out": ("ties", [("model_1", {"weight": 0.6, "density": 0.5}),
                               ("model_2", {"weight": 0.6, "density": 0.5})], None, {"out_dtype": "bfloat16"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_materialize_equals_evomerge_merge(case, llama_family, tmp_path):
    method, models, params, extra = CASES[case]
    recipe = _recipe(llama_family, method, models, params, **extra)
    engine = MergeEngine(recipe, seed=7)
    out = tmp_path / "merged"
    run_merge(recipe, out, seed=7, progress=False)
    on_disk = _load(out)
    _assert_identical(_engine_state(engine), on_disk)
    # and materialize + save writes exactly what `evomerge merge` wrote
    saved = engine.save(tmp_path / "saved", recipe)
    _assert_identical(_load(saved), on_disk)
    assert (saved / "recipe.yaml").read_text() == (out / "recipe.yaml").read_text()


def test_same_recipe_twice_is_bit_identical_and_in_place(llama_family):
    recipe = _recipe(llama_family, "dare_ties", [("model_1", {"weight": 0.8, "density": 0.5}),
                                                 ("model_2", {"weight": 0.6, "density": 0.3})])
    engine = MergeEngine(recipe, seed=1, threads=1)
    first = _engine_state(engine)
    # the thread count does not change the result
    _assert_identical(_engine_state(MergeEngine(recipe, seed=1, threads=2)), first)
    pointers = [p.data_ptr() for p in engine.model.parameters()]
    other = _recipe(llama_family, "dare_ties", [("model_1", {"weight": GROUPS, "density": 0.9}),
                                                ("model_2", {"weight": 0.1, "density": GROUPS})])
    engine.materialize(other)
    changed = _engine_state(engine)
    assert not all(torch.equal(first[k], changed[k]) for k in first)
    workspace = engine.workspace_bytes
    model = engine.materialize(recipe)
    assert model is engine.model
    _assert_identical(_engine_state(engine), first)
    # written in place: same parameter storage, and no workspace growth once warmed up
    assert [p.data_ptr() for p in engine.model.parameters()] == pointers
    engine.materialize(other)
    assert engine.workspace_bytes == workspace
    # another seed: other drops
    engine.materialize(recipe, seed=2)
    assert not all(torch.equal(first[k], v) for k, v in _engine_state(engine).items())


def test_model_runs_and_tokenizer(llama_family):
    engine = MergeEngine.from_models(llama_family["base"], [llama_family["model_1"], llama_family["model_2"]],
                                     method="ties", model_parameters=[{"density": 0.5}, {"density": 0.5}])
    assert engine.num_layers == 4
    ids = engine.tokenizer("hello world", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = engine.model(ids).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_passthrough_frankenmerge_engine(llama_family, tmp_path):
    recipe = Recipe.from_dict({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(llama_family["model_1"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(llama_family["model_2"]), "layer_range": [1, 4]}]}]})
    engine = MergeEngine(recipe)
    assert engine.num_layers == 6
    assert engine.model.config.num_hidden_layers == 6
    run_merge(recipe, tmp_path / "out", progress=False)
    _assert_identical(_engine_state(engine), _load(tmp_path / "out"))


def test_qwen2_engine_equals_merge(qwen2_family, tmp_path):
    recipe = _recipe(qwen2_family, "ties", [("model_1", {"weight": 0.5, "density": [0.2, 0.8]}),
                                            ("model_2", {"weight": 0.5, "density": 0.5})])
    engine = MergeEngine(recipe)
    run_merge(recipe, tmp_path / "out", progress=False)
    _assert_identical(_engine_state(engine), _load(tmp_path / "out"))


def test_candidate_must_match_the_engine(llama_family):
    recipe = _recipe(llama_family, "ties", [("model_1", {"weight": 0.5}), ("model_2", {"weight": 0.5})])
    engine = MergeEngine(recipe)
    with pytest.raises(EvomergeError, match="merges with ties"):
        engine.materialize(_recipe(llama_family, "dare_ties", [("model_1", {"weight": 0.5}),
                                                               ("model_2", {"weight": 0.5})]))
    with pytest.raises(EvomergeError, match="models differs"):
        engine.materialize(_recipe(llama_family, "ties", [("model_1", {"weight": 0.5})]))
    with pytest.raises(EvomergeError, match="dtype differs"):
        engine.materialize(_recipe(llama_family, "ties", [("model_1", {"weight": 0.5}), ("model_2", {"weight": 0.5})],
                                   dtype="bfloat16"))
    with pytest.raises(EvomergeError, match="density"):
        engine.materialize({"merge_method": "ties", "base_model": str(llama_family["base"]),
                            "models": [{"model": str(llama_family["model_1"]),
                                        "parameters": {"weight": 1, "density": 2}},
                                       {"model": str(llama_family["model_2"]), "parameters": {"weight": 1}}]})
    # a failed candidate leaves the engine usable
    engine.materialize(recipe)


def test_engine_from_mapping_and_cuda_request(llama_family):
    mapping = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
               "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 1.0}}]}
    engine = MergeEngine(mapping)
    base = load_file(llama_family["model_1"] / "model.safetensors")
    state = _engine_state(engine)
    for key in base:
        assert torch.allclose(state[key], base[key], atol=1e-6)
    if not torch.cuda.is_available():
        with pytest.raises(EvomergeError, match="no CUDA"):
            MergeEngine(mapping, device="cuda")
