"""Sources whose tensor sets differ, and outputs that must hold exactly what their config makes transformers expect.

Tiny models built here: a tied base (no lm_head.weight in its files) with an untied fine-tune that has its own
head; Llama with attention biases next to one without; every example recipe and every registry method merged
from tied and untied families (float32 and bfloat16, Llama and Qwen2), each output loaded by transformers with
``output_loading_info=True``: no missing and no unexpected keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evomerge import tiny
from evomerge.checkpoint import Checkpoint, write_checkpoint
from evomerge.cli import main
from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.merge import run_merge
from evomerge.methods import METHODS
from evomerge.recipe import Recipe

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load_clean(path: Path):
    """The model at ``path``, asserting transformers found no missing and no unexpected keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.fixture(scope="module")
def tied_and_untied(tmp_path_factory):
    """base_tied (Qwen2, tie_word_embeddings, no head in its files) and ft_untied (same weights + noise, its own
    head: the embeddings plus a distinct perturbation), both float32."""
    root = tmp_path_factory.mktemp("tied")
    family = tiny.make_family(root / "fam", n_variants=1, arch="qwen2", seed=3, tie_word_embeddings=True)
    base = family["base"]
    assert "lm_head.weight" not in Checkpoint(base)
    model = tiny.make_model("qwen2", seed=3, vocab_size=Checkpoint(base).config["vocab_size"],
                            tie_word_embeddings=False)
    ft_tied = Checkpoint(family["model_1"])
    with torch.no_grad():
        state = {n: ft_tied.get(n) for n in ft_tied.tensor_names}
        state["lm_head.weight"] = state["model.embed_tokens.weight"] + 0.1 * torch.randn(
            state["model.embed_tokens.weight"].shape, generator=torch.Generator().manual_seed(9))
        model.load_state_dict(state)
    ft = root / "ft_untied"
    model.save_pretrained(ft)
    shutil.copy(base / "tokenizer.json", ft / "tokenizer.json")
    shutil.copy(base / "tokenizer_config.json", ft / "tokenizer_config.json")
    assert "lm_head.weight" in Checkpoint(ft)
    return {"base": base, "ft": ft, "ft_tied": family["model_1"]}


def _recipe(method: str, models: list[tuple[Path, dict]], base: Path | None = None, **params) -> Recipe:
    data = {"merge_method": method, "models": [{"model": str(p), "parameters": dict(pm)} for p, pm in models],
            "dtype": "float32"}
    if base is not None:
        data["base_model"] = str(base)
    if params:
        data["parameters"] = params
    return Recipe.from_dict(data)


@pytest.mark.parametrize("order", ["tied_first", "untied_first"])
def test_linear_of_tied_and_untied_keeps_the_fine_tunes_head(tied_and_untied, tmp_path, order):
    base, ft = tied_and_untied["base"], tied_and_untied["ft"]
    pair = [(base, {"weight": 0.5}), (ft, {"weight": 0.5})]
    out = run_merge(_recipe("linear", pair if order == "tied_first" else pair[::-1]), tmp_path / "out",
                    progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    written = load_file(out / "model.safetensors")
    b, f = Checkpoint(base), Checkpoint(ft)
    expected_head = 0.5 * b.get("model.embed_tokens.weight") + 0.5 * f.get("lm_head.weight")
    assert torch.allclose(written["lm_head.weight"], expected_head, atol=1e-6)
    expected_embed = 0.5 * b.get("model.embed_tokens.weight") + 0.5 * f.get("model.embed_tokens.weight")
    assert torch.allclose(written["model.embed_tokens.weight"], expected_embed, atol=1e-6)
    model = _load_clean(out)
    assert torch.allclose(model.lm_head.weight, expected_head, atol=1e-6)


def test_task_arithmetic_on_a_tied_base_uses_its_embeddings_as_its_head(tied_and_untied, tmp_path):
    base, ft = tied_and_untied["base"], tied_and_untied["ft"]
    recipe = _recipe("task_arithmetic", [(ft, {"weight": 0.5})], base=base)
    out = run_merge(recipe, tmp_path / "out", progress=False)
    b, f = Checkpoint(base), Checkpoint(ft)
    emb = b.get("model.embed_tokens.weight")
    expected_head = emb + 0.5 * (f.get("lm_head.weight") - emb)
    assert torch.allclose(load_file(out / "model.safetensors")["lm_head.weight"], expected_head, atol=1e-6)
    _load_clean(out)
    # the in-memory engine builds the same untied model
    engine = MergeEngine(recipe)
    assert engine.model.config.tie_word_embeddings is False
    assert torch.allclose(engine.model.lm_head.weight, expected_head, atol=1e-6)
    assert engine.model.lm_head.weight.data_ptr() != engine.model.model.embed_tokens.weight.data_ptr()


def test_all_tied_sources_give_a_tied_output(tied_and_untied, tmp_path):
    recipe = _recipe("ties", [(tied_and_untied["ft_tied"], {"weight": 1.0, "density": 0.5})],
                     base=tied_and_untied["base"])
    out = run_merge(recipe, tmp_path / "out", progress=False)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    _load_clean(out)


@pytest.fixture(scope="module")
def bias_and_no_bias(tmp_path_factory):
    root = tmp_path_factory.mktemp("bias")
    with_bias = tiny.make_family(root / "bias", n_variants=0, arch="llama", seed=0, attention_bias=True)["base"]
    without = tiny.make_family(root / "plain", n_variants=0, arch="llama", seed=0)["base"]
    return with_bias, without


@pytest.mark.parametrize("method,bias_is_base", [("linear", True), ("linear", False), ("task_arithmetic", True),
                                                 ("task_arithmetic", False)])
def test_attention_bias_difference_is_one_error_in_any_order(bias_and_no_bias, tmp_path, method, bias_is_base):
    """16 bias tensors (q/k/v/o in 4 layers) in one model only: one error naming them and both models."""
    with_bias, without = bias_and_no_bias
    first, second = (with_bias, without) if bias_is_base else (without, with_bias)
    if method == "linear":
        recipe = _recipe("linear", [(first, {"weight": 0.5}), (second, {"weight": 0.5})])
    else:
        recipe = _recipe("task_arithmetic", [(second, {"weight": 0.5})], base=first)
    with pytest.raises(EvomergeError) as err:
        run_merge(recipe, tmp_path / "out", progress=False)
    message = str(err.value)
    assert "model.layers.N.self_attn.q_proj.bias" in message and "model.layers.N.self_attn.o_proj.bias" in message
    assert f"in {with_bias.parent.name} but not in {without.parent.name}" in message.replace("/base", "") or \
        f"in {with_bias} but not in {without}" in message
    assert message.count(str(first)) <= 1 and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_attention_bias_difference_through_the_cli_is_exit_2(bias_and_no_bias, tmp_path, capsys):
    with_bias, without = bias_and_no_bias
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(without), "parameters": {"weight": 0.5}},
        {"model": str(with_bias), "parameters": {"weight": 0.5}}]}))
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hold different tensors" in err and "q_proj.bias" in err and len(err.strip().splitlines()) == 1


def test_writer_refuses_tensors_the_config_does_not_declare(llama_family, tmp_path):
    """A config saying attention_bias: true without bias tensors (or a tensor too many) is never written."""
    src = Checkpoint(llama_family["base"])
    config = dict(src.config, attention_bias=True)
    with pytest.raises(EvomergeError, match="missing model.layers.0.self_attn.k_proj.bias"):
        write_checkpoint(tmp_path / "a", src.tensors(), config)
    extra = ((n, t) for n, t in [*src.tensors(), ("model.extra.weight", torch.zeros(2))])
    with pytest.raises(EvomergeError, match="not expected model.extra.weight"):
        write_checkpoint(tmp_path / "b", extra, src.config)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------- every method's output loads cleanly


@pytest.fixture(scope="module", params=["llama_f32_untied", "qwen2_bf16_tied"])
def example_root(request, tmp_path_factory):
    """examples/ next to a `models/` family: untied Llama float32, or tied Qwen2 bfloat16 (sharded)."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "llama_f32_untied":
        tiny.make_family(root / "models", n_variants=2, arch="llama", seed=0)
    else:
        tiny.make_family(root / "models", n_variants=2, arch="qwen2", seed=1, dtype=torch.bfloat16,
                         tie_word_embeddings=True, max_shard_size="40KB")
    for example in EXAMPLES.iterdir():
        if example.is_file():
            shutil.copy(example, root / example.name)
    return root


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_example_output_loads_without_missing_or_unexpected_keys(example, example_root, tmp_path):
    out = tmp_path / "out"
    assert main(["merge", str(example_root / f"{example}.yaml"), str(out), "--no-progress"]) == 0
    _load_clean(out)


def _registry_recipe(name: str, models: dict[str, Path]) -> dict:
    spec = METHODS[name]
    per_model = {p.name: 0.5 for p in spec.per_model_params if p.required and p.kind is float}
    shared = {p.name: 0.5 for p in spec.global_params if p.required and p.kind is float}
    if spec.family == "passthrough":
        return {"merge_method": name, "slices": [{"sources": [{"model": str(models["model_1"]),
                                                               "layer_range": [0, 2]}]},
                                                 {"sources": [{"model": str(models["model_2"]),
                                                               "layer_range": [1, 4]}]}]}
    room = 2 if spec.max_inputs is None else spec.max_inputs - (1 if spec.needs_base else 0)
    inputs = ["model_1", "model_2"][:min(2, room)]
    recipe = {"merge_method": name, "models": [{"model": str(models[m]), "parameters": dict(per_model)}
                                               for m in inputs], "dtype": "float32"}
    if spec.needs_base:
        recipe["base_model"] = str(models["base"])
    if shared:
        recipe["parameters"] = shared
    return recipe


@pytest.fixture(scope="module")
def tied_family(tmp_path_factory):
    """base, model_1, model_2: tiny Qwen2 with tied embeddings, bfloat16."""
    return tiny.make_family(tmp_path_factory.mktemp("tied_family"), n_variants=2, arch="qwen2", seed=4,
                            dtype=torch.bfloat16, tie_word_embeddings=True)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registry_method_output_loads_clean_on_tied_and_untied(method, tied_family, llama_family, tmp_path):
    for label, models in {"untied": llama_family, "tied": tied_family}.items():
        out = run_merge(Recipe.from_dict(_registry_recipe(method, models)), tmp_path / label, progress=False)
        _load_clean(out)
        tied = json.loads((out / "config.json").read_text()).get("tie_word_embeddings")
        assert ("lm_head.weight" in Checkpoint(out)) == (label == "untied") and tied == (label == "tied")
