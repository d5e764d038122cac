"""Tokenizer recipes (tokenizer_source, the tokenizer: block, chat_template) against mergekit 0.1.5.

Tiny Llama models with two different byte-level BPE vocabularies (trained locally on different corpora, so the
same token has different ids and each side has tokens the other lacks): the merged embedding and head rows,
config.json's vocab_size and the written tokenizer must equal mergekit's.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from evomerge import tiny
from evomerge.cli import main
from evomerge.merge import run_merge
from evomerge.recipe import Recipe

CORPUS_A = ["the cat sat on the mat and the dog ran", "merging models with evolution is fun",
            "numbers 1 2 3 4 5 add up", "the quick brown fox jumps over the lazy dog"] * 3
CORPUS_B = ["la souris mange le fromage dans la cuisine", "les modèles fusionnés parlent français",
            "deux plus deux font quatre", "the cat and the mouse"] * 3


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory):
    """base and model_1 share tokenizer A (with an added <|im_start|>), model_2 has tokenizer B (more rows)."""
    root = tmp_path_factory.mktemp("vocab")
    tok_a = tiny.make_tokenizer(CORPUS_A, vocab_size=300)
    tok_a.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok_a.chat_template = "{% for m in messages %}A {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok_b = tiny.make_tokenizer(CORPUS_B, vocab_size=320)
    tok_b.chat_template = "{% for m in messages %}B {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fam = tiny.make_family(root / "a", n_variants=1, seed=0, tokenizer=tok_a, num_layers=2)
    other = tiny.make_family(root / "b", n_variants=0, seed=5, tokenizer=tok_b, num_layers=2)
    padded = tiny.make_family(root / "p", n_variants=0, seed=7, tokenizer=tok_a, num_layers=2,
                              vocab_size=len(tok_a) + 19)  # embedding rows beyond the tokenizer (padding)
    half = {}
    for name, path in (("base", fam["base"]), ("model_2", other["base"])):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).save_pretrained(root / f"{name}_bf16")
        AutoTokenizer.from_pretrained(path).save_pretrained(root / f"{name}_bf16")
        half[f"{name}_bf16"] = root / f"{name}_bf16"
    assert len(tok_a) != len(tok_b)
    qwen = tiny.make_family(root / "qa", n_variants=1, arch="qwen2", seed=2, tokenizer=tok_a, num_layers=2,
                            tie_word_embeddings=True)
    qwen_b = tiny.make_family(root / "qb", n_variants=0, arch="qwen2", seed=3, tokenizer=tok_b, num_layers=2,
                              tie_word_embeddings=True)
    return {"base": fam["base"], "model_1": fam["model_1"], "model_2": other["base"], "padded": padded["base"],
            "qwen_base": qwen["base"], "qwen_1": qwen["model_1"], "qwen_2": qwen_b["base"], **half}


def _first_mention(config) -> list:
    """mergekit's referenced_models() in recipe order (models or slice sources, then the base)."""
    found = []
    for part in [config] + list((config.modules or {}).values()):  # mergekit rewrites recipes into modules
        found += [m.model for m in part.models or []] + [src.model for s in part.slices or [] for src in s.sources]
    found += [config.base_model] if config.base_model else []
    return list(dict.fromkeys(found))


@pytest.fixture(scope="module")
def mergekit_api():
    """mergekit's merge, with one change: its referenced_models() is list(set(...)), so without a base_model the
    tokenizer a union starts from is a different model from run to run; here it is pinned to first-mention
    order, evomerge's rule (the first model), so the two can be compared."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    patch = pytest.MonkeyPatch()
    patch.setattr(mk_config.MergeConfiguration, "referenced_models", _first_mention)

    def run(recipe: dict, out: Path) -> None:
        config = mk_config.MergeConfiguration.model_validate(recipe)
        options = mk_options.MergeOptions(write_model_card=False, quiet=True)
        mk_merge.run_merge(config, str(out), options)

    yield run
    patch.undo()


def _absolute(value, models):
    if isinstance(value, dict):
        return {_absolute(k, models): _absolute(v, models) for k, v in value.items()}
    if isinstance(value, list):
        return [_absolute(v, models) for v in value]
    return str(models[value]) if isinstance(value, str) and value in models else value


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


RECIPES = {
    "union_linear": {"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": "base", "parameters": {"weight": 0.6}}, {"model": "model_2", "parameters": {"weight": 0.4}}]},
    "union_ties": {"merge_method": "ties", "base_model": "base", "tokenizer_source": "union",
                   "parameters": {"density": 0.7}, "models": [
                       {"model": "model_1", "parameters": {"weight": 0.6}},
                       {"model": "model_2", "parameters": {"weight": 0.5}}]},
    "base_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "tokenizer_source": "base",
                             "models": [{"model": "model_1", "parameters": {"weight": 0.5}},
                                        {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "model_path_linear": {"merge_method": "linear", "tokenizer_source": "model_2", "models": [
        {"model": "base", "parameters": {"weight": 0.5}}, {"model": "model_2", "parameters": {"weight": 0.5}}]},
    "block_tokens": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.8}, "models": [
        {"model": "model_1", "parameters": {"weight": 0.7}}, {"model": "model_2", "parameters": {"weight": 0.4}}],
        "tokenizer": {"source": "union", "pad_to_multiple_of": 64, "tokens": {
            "<|im_end|>": {"source": {"kind": "model_token", "model": "model_2", "token": "</s>"}},
            "<tool>": {"source": {"kind": "zero"}},
            "<|im_start|>": {"source": "base", "force": True},
            "the": {"source": {"kind": "model_token", "model": "model_1", "token_id": 5}, "force": True},
            "Ġcat": {"source": "model_2", "force": True}}}},
    "padded_rows_base": {"merge_method": "ties", "base_model": "base", "tokenizer_source": "base",
                         "parameters": {"density": 0.5}, "models": [
                             {"model": "padded", "parameters": {"weight": 0.8}},
                             {"model": "model_2", "parameters": {"weight": 0.3}}]},
    "union_dare_linear_bf16": {"merge_method": "task_arithmetic", "base_model": "base_bf16", "dtype": "bfloat16",
                               "tokenizer_source": "union", "models": [
                                   {"model": "model_2_bf16", "parameters": {"weight": 0.7}}]},
    "union_ties_qwen2_tied": {"merge_method": "ties", "base_model": "qwen_base", "tokenizer_source": "union",
                              "parameters": {"density": 0.6}, "models": [
                                  {"model": "qwen_1", "parameters": {"weight": 0.5}},
                                  {"model": "qwen_2", "parameters": {"weight": 0.5}}]},
    "chat_auto": {"merge_method": "ties", "base_model": "model_2", "tokenizer_source": "union",
                  "chat_template": "auto", "models": [{"model": "base", "parameters": {"weight": 0.5}},
                                                      {"model": "model_1", "parameters": {"weight": 0.5}}]},
    "chat_named": {"merge_method": "linear", "tokenizer_source": "union", "chat_template": "chatml", "models": [
        {"model": "base", "parameters": {"weight": 0.5}}, {"model": "model_2", "parameters": {"weight": 0.5}}]},
    "chat_literal_no_tokenizer": {
        "merge_method": "linear", "chat_template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n"
                                                   "{% endfor %}", "models": [
            {"model": "base", "parameters": {"weight": 0.5}}, {"model": "model_1", "parameters": {"weight": 0.5}}]},
}


def _tokenizer_view(folder: Path) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    texts = ["the cat sat", "la souris<|im_start|>x", "<tool> deux plus <|im_end|>"]
    vocab = tok.get_vocab()
    chat = None
    if tok.chat_template:  # named templates are our own text: compare what they render
        chat = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                       tokenize=False, add_generation_prompt=True)
    return {"vocab": vocab, "chat_template": chat,
            "added": {(t.content, t.special, t.normalized) for t in tok.added_tokens_decoder.values()},
            "tokens": [tok.convert_ids_to_tokens(tok(t)["input_ids"]) for t in texts]}


def _same_tokenizer(a: dict, b: dict) -> None:
    """Same tokens, same ids for every token mergekit numbers reproducibly (those of the starting tokenizer)."""
    assert set(a["vocab"]) == set(b["vocab"])
    assert a["added"] == b["added"] and a["tokens"] == b["tokens"] and a["chat_template"] == b["chat_template"]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_tokenizer_recipe_matches_mergekit(name, vocab_models, tmp_path, mergekit_api):
    recipe = _absolute(RECIPES[name], vocab_models)
    run_merge(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    mergekit_api(recipe, tmp_path / "theirs")
    ours, theirs = _load(tmp_path / "ours"), _load(tmp_path / "theirs")
    view_ours, view_theirs = _tokenizer_view(tmp_path / "ours"), _tokenizer_view(tmp_path / "theirs")
    _same_tokenizer(view_ours, view_theirs)
    # a token's row is compared by token: mergekit numbers the tokens a union adds in a per-run hash order
    rows = torch.tensor([view_theirs["vocab"][t] for t in sorted(view_ours["vocab"], key=view_ours["vocab"].get)])
    assert set(ours) == set(theirs)
    worst = 0.0
    for key in ours:
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype, key
        expected = theirs[key]
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = torch.cat([expected.index_select(0, rows), expected[len(rows):]])
        worst = max(worst, (ours[key].double() - expected.double()).abs().max().item())
    print(f"max |ours - mergekit| {name}: {worst:.3g}")
    assert worst <= 1e-6, worst
    config = [json.loads((tmp_path / f / "config.json").read_text()) for f in ("ours", "theirs")]
    assert config[0]["vocab_size"] == config[1]["vocab_size"] == ours["model.embed_tokens.weight"].shape[0]


def test_union_really_reindexes(vocab_models, tmp_path):
    """A token both vocabularies hold at different ids gets model_2's own row for it (linear, weight 1 on it)."""
    from transformers import AutoTokenizer

    recipe = _absolute({"merge_method": "linear", "tokenizer_source": "union", "models": [
        {"model": "base", "parameters": {"weight": 0.0}}, {"model": "model_2", "parameters": {"weight": 1.0}}]},
        vocab_models)
    run_merge(Recipe.from_dict(recipe), tmp_path / "out", progress=False)
    merged = _load(tmp_path / "out")["model.embed_tokens.weight"]
    out_tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    a = AutoTokenizer.from_pretrained(vocab_models["base"]).get_vocab()
    b = AutoTokenizer.from_pretrained(vocab_models["model_2"]).get_vocab()
    rows_b = load_file(vocab_models["model_2"] / "model.safetensors")["model.embed_tokens.weight"]
    moved = [t for t in a if t in b and a[t] != b[t]]
    assert len(moved) >= 5
    vocab = out_tok.get_vocab()
    for token in moved:
        assert torch.equal(merged[vocab[token]], rows_b[b[token]])
    assert len(vocab) == len(set(a) | set(b))


def test_named_chat_templates_render_like_mergekit():
    """Each named template renders mergekit's text; EXAONE's mergekit template leaks its indentation (a bug)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    from evomerge.chat_templates import TEMPLATES

    mk = pytest.importorskip("mergekit._data.chat_templates")
    conversations = [[{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi "},
                      {"role": "assistant", "content": " Hello!"}, {"role": "user", "content": "2+2?"}],
                     [{"role": "user", "content": "Q"}, {"role": "user_context", "content": "ctx"},
                      {"role": "assistant", "content": "A"}]]

    def render(template, conversation, gen):
        try:
            return render_jinja_template(conversations=[conversation], chat_template=template,
                                         add_generation_prompt=gen, bos_token="<s>", eos_token="</s>")[0][0]
        except Exception as exc:  # noqa: BLE001 - mistral's template raises on user_context; both must
            return type(exc).__name__

    for name, ours in TEMPLATES.items():
        theirs = importlib.resources.files(mk).joinpath(f"{name}.jinja").read_text()
        for conversation in conversations:
            for gen in (False, True):
                a, b = render(ours, conversation, gen), render(theirs, conversation, gen)
                if name == "exaone":  # the same text once whitespace is ignored; ours without the indentation
                    assert re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b)
                    assert "    " not in a and "    " in b
                else:
                    assert a == b, (name, gen)


@pytest.mark.parametrize("case", ["different_vocab_no_source", "both_sources", "bad_block_key", "bad_kind",
                                  "unknown_template", "force_without_source", "short_template",
                                  "token_from_missing_model",
                                  "token_not_in_model"])
def test_bad_tokenizer_recipes(case, vocab_models, tmp_path, capsys):
    models = [{"model": "base", "parameters": {"weight": 0.5}}, {"model": "model_2", "parameters": {"weight": 0.5}}]
    recipe = {"merge_method": "linear", "models": models}
    extra, message = {
        "different_vocab_no_source": ({}, "vocabulary sizes differ"),
        "both_sources": ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "not both"),
        "bad_block_key": ({"tokenizer": {"sources": "union"}}, "unknown key 'sources'"),
        "bad_kind": ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "mean"}}}}}, "kind: zero"),
        "unknown_template": ({"chat_template": "vicuna"}, "unknown chat_template 'vicuna'"),
        "force_without_source": ({"tokenizer": {"tokens": {"the": {"force": True}}}}, "force: true needs a source"),
        "short_template": ({"chat_template": "{{ x }}"}, "neither a known name nor a Jinja template"),
        "token_from_missing_model": ({"tokenizer": {"tokens": {"<x>": {"source": "model_1"}}}},
                                     "not among the models"),
        "token_not_in_model": ({"tokenizer": {"tokens": {"<x>": {"source": {"kind": "model_token", "model": "base",
                                                                             "token": "<nope>"}}}}},
                               "not in the vocabulary"),
    }[case]
    path = tmp_path / "r.yaml"
    import yaml

    path.write_text(yaml.safe_dump(_absolute({**recipe, **extra}, vocab_models)))
    capsys.readouterr()
    code = main(["merge", str(path), str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def test_engine_materializes_what_merge_writes(vocab_models, tmp_path):
    """The in-memory engine re-indexes the same way: saving a candidate gives `evomerge merge`'s files."""
    from evomerge.engine import MergeEngine

    recipe = Recipe.from_dict(_absolute(RECIPES["block_tokens"], vocab_models))
    run_merge(recipe, tmp_path / "merged", progress=False)
    engine = MergeEngine(recipe)
    assert engine.model.get_input_embeddings().weight.shape[0] == 384  # 354 tokens padded to a multiple of 64
    assert len(engine.tokenizer) == 354  # the union (352) and two added tokens
    engine.save(tmp_path / "engine")
    a, b = _load(tmp_path / "merged"), _load(tmp_path / "engine")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _tokenizer_view(tmp_path / "merged") == _tokenizer_view(tmp_path / "engine")


def test_configs_without_vocab_size_share_the_vocabulary(vocab_models, tmp_path):
    """Sources whose config.json states no vocab_size (a tokenizer: block, base source): the merge sizes them
    from their tokenizers and writes the same tensors as with vocab_size stated (was a TypeError, int >= None)."""
    import shutil

    stripped = {}
    for name in ("base", "model_1"):
        stripped[name] = shutil.copytree(vocab_models[name], tmp_path / name)
        config = json.loads((stripped[name] / "config.json").read_text())
        assert isinstance(config.pop("vocab_size"), int)
        (stripped[name] / "config.json").write_text(json.dumps(config))
    recipe = {"merge_method": "linear", "tokenizer": {"source": "base"}, "models": [
        {"model": "base", "parameters": {"weight": 0.3}}, {"model": "model_1", "parameters": {"weight": 0.7}}]}
    run_merge(Recipe.from_dict(_absolute(recipe, stripped)), tmp_path / "stripped", progress=False)
    run_merge(Recipe.from_dict(_absolute(recipe, vocab_models)), tmp_path / "stated", progress=False)
    a, b = _load(tmp_path / "stripped"), _load(tmp_path / "stated")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert _tokenizer_view(tmp_path / "stripped") == _tokenizer_view(tmp_path / "stated")
