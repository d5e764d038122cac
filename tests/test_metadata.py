"""Model metadata carried into merges, exports and the engine's in-memory model: generation_config.json (a list of
EOS ids, decoding defaults) and the tokenizer's chat template, from the tokenizer source (else the base).
A source and a merge of it stop generating on the same ids. Tiny models and tokenizers are built here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import tiny
from evomerge.cli import main
from evomerge.engine import MergeEngine
from evomerge.evaluators.generation import GenerationSettings, eos_token_ids, greedy_generate
from evomerge.merge import run_merge
from evomerge.recipe import Recipe

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}assistant:"
BASE_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": True,
                   "temperature": 0.7, "top_p": 0.9, "repetition_penalty": 1.05, "max_new_tokens": 77}
OTHER_GENERATION = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 0, "temperature": 0.3,
                    "do_sample": True}
HELPERS = Path(__file__).resolve().parent / "search_helpers.py"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """base, model_1, model_2 (tiny Llama) whose generation_config.json stops on [2, 5] (model_2: [2, 7]) and
    whose tokenizer has a chat template."""
    tok = tiny.make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    paths = tiny.make_family(tmp_path_factory.mktemp("meta"), n_variants=2, arch="llama", seed=5, tokenizer=tok)
    for name, generation in (("base", BASE_GENERATION), ("model_1", BASE_GENERATION), ("model_2", OTHER_GENERATION)):
        (paths[name] / "generation_config.json").write_text(json.dumps(generation))
    return paths


def _generation(path: Path) -> dict:
    data = json.loads((path / "generation_config.json").read_text())
    data.pop("transformers_version", None)
    return data


def _ties(family, **extra) -> Recipe:
    return Recipe.from_dict({"merge_method": "ties", "base_model": str(family["base"]), "dtype": "float32",
                             "models": [{"model": str(family["model_1"]),
                                         "parameters": {"weight": 0.5, "density": 0.5}},
                                        {"model": str(family["model_2"]), "parameters": {"weight": 0.5}}], **extra})


def test_merge_output_carries_generation_config_and_chat_template(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = run_merge(_ties(family), tmp_path / "out", progress=False)
    assert _generation(out) == BASE_GENERATION
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generation_config.eos_token_id == [2, 5]
    assert model.generation_config.temperature == 0.7 and model.generation_config.max_new_tokens == 77
    assert GenerationConfig.from_pretrained(out).to_diff_dict() == GenerationConfig.from_pretrained(
        family["base"]).to_diff_dict()
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE


def test_generation_config_follows_the_tokenizer_source(family, tmp_path):
    out = run_merge(_ties(family, tokenizer_source=str(family["model_2"])), tmp_path / "out", progress=False)
    assert _generation(out) == OTHER_GENERATION  # its ids belong to that tokenizer


def test_generation_config_of_a_passthrough_and_a_linear_merge(family, tmp_path):
    linear = Recipe.from_dict({"merge_method": "linear", "models": [
        {"model": str(family["model_2"]), "parameters": {"weight": 1.0}},
        {"model": str(family["model_1"]), "parameters": {"weight": 1.0}}]})
    assert _generation(run_merge(linear, tmp_path / "lin", progress=False)) == OTHER_GENERATION  # first model
    stack = Recipe.from_dict({"merge_method": "passthrough", "tokenizer_source": str(family["model_1"]), "slices": [
        {"sources": [{"model": str(family["model_2"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(family["model_1"]), "layer_range": [2, 4]}]}]})
    assert _generation(run_merge(stack, tmp_path / "stack", progress=False)) == BASE_GENERATION


def test_engine_model_and_saved_merge_stop_on_the_same_ids_as_the_source(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = MergeEngine(_ties(family))
    source = AutoModelForCausalLM.from_pretrained(family["base"])
    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    saved = AutoModelForCausalLM.from_pretrained(engine.save(tmp_path / "saved"))
    assert engine.model.generation_config.eos_token_id == [2, 5]
    assert eos_token_ids(engine.model, tokenizer) == eos_token_ids(source, tokenizer) == {2, 5}
    assert eos_token_ids(saved, engine.tokenizer) == {2, 5}
    assert engine.tokenizer.chat_template == CHAT_TEMPLATE


def test_evaluation_stops_on_the_generation_configs_extra_eos(family):
    """Greedy decoding of the engine's merge ends at token 5 when the model emits it, as the source model does:
    in each model, the head rows of token 5 and of the greedy first token are swapped, so 5 comes first."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(family["base"])
    engine = MergeEngine(_ties(family))
    source = AutoModelForCausalLM.from_pretrained(family["base"])
    prompt = "one two"
    settings = GenerationSettings(max_new_tokens=6, batch_size=1)
    for model in (engine.model, source):
        with torch.no_grad():
            first = int(model(tokenizer([prompt], return_tensors="pt").input_ids).logits[0, -1].argmax())
            head = model.lm_head.weight
            head[[first, 5]] = head[[5, first]].clone()
        [generation] = greedy_generate(model, tokenizer, [prompt], settings)
        assert generation.new_tokens == 1  # stopped at its first token: id 5 is an EOS of the generation config


@pytest.mark.parametrize("kind", ["ps", "dfs"])
def test_export_carries_generation_config_and_chat_template(kind, family, tmp_path):
    """`evomerge export` of a trial (PS: the engine's save; DFS: model a's layers) keeps the metadata."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.search.experiment import load_experiment
    from evomerge.search.records import TrialRecord
    from evomerge.search.run_folder import RunFolder
    from evomerge.search.search_space import build_space

    models = ({"base": str(family["base"]), "sources": {"m1": str(family["model_1"]), "m2": str(family["model_2"])}}
              if kind == "ps" else {"a": str(family["model_1"]), "b": str(family["model_2"])})
    experiment = {"name": f"meta-{kind}", "models": models,
                  "search_space": "ps_ties_dare" if kind == "ps" else "dfs",
                  "evaluators": [{"name": "s", "spec": {"type": "custom", "function": f"{HELPERS}:logit_std",
                                                        "metrics": ["std"]}}],
                  "objectives": [{"metric": "s/std", "direction": "maximize"}], "budget": {"trials": 1}}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(experiment))
    exp = load_experiment(path)
    run = RunFolder.create(tmp_path / "run", exp.raw)
    space = build_space(exp.space, exp.models.to_dict(), exp.dtype)
    x = [0.5] * space.dim
    run.append_trial(TrialRecord.from_json({"trial": 0, "status": "ok", "stage": 0, "stage_name": kind, "x": x,
                                            "genome": space.values(x), "metrics": {"s/std": 1.0},
                                            "objectives": [1.0], "score": 1.0}))
    out = tmp_path / "export"
    assert main(["export", str(run.path), "--out", str(out), "--trial", "0"]) == 0
    expected = BASE_GENERATION  # PS: the base (tokenizer source); DFS: model a
    assert _generation(out) == expected
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.generation_config.eos_token_id == [2, 5]
    assert AutoTokenizer.from_pretrained(out).chat_template == CHAT_TEMPLATE
