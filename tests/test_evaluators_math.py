"""Math evaluator on a really trained tiny model: item-by-item agreement with lm-eval, splits and subsamples,
no stale state after in-place weight changes, prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import EvomergeError
from evomerge.evaluators import build_evaluator, evaluators_dir
from evomerge.evaluators.generation import GenerationSettings, greedy_generate
from test_evaluators_fixtures import load_arith_model, math_config, problems, write_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


@pytest.fixture(scope="module")
def arith_data(tmp_path_factory) -> Path:
    return write_tsv(tmp_path_factory.mktemp("arith") / "arith.tsv", problems(40, seed=99))


@pytest.fixture(scope="module")
def lm_eval_task_dir(tmp_path_factory, arith_data) -> Path:
    """The vendored lm-eval task (our mgsm:en prompt), pointed at the test's items."""
    task = yaml.safe_load((evaluators_dir() / "lm_eval_tasks/evomerge_mgsm_en.yaml").read_text(encoding="utf-8"))
    task["dataset_kwargs"]["data_files"]["test"] = str(arith_data)
    task["generation_kwargs"]["max_gen_toks"] = 32
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "evomerge_mgsm_en.yaml").write_text(yaml.safe_dump(task, allow_unicode=True), encoding="utf-8")
    return folder


def test_matches_lm_eval_item_by_item(arith_data, lm_eval_task_dir, tmp_path):
    model, tok = load_arith_model()
    ours = build_evaluator(math_config(arith_data))
    our_results = ours.run(model, tok)
    theirs = build_evaluator({"type": "lm_eval", "task": "evomerge_mgsm_en", "include_path": str(lm_eval_task_dir),
                              "batch_size": 8, "log_samples": True, "hf_home": str(tmp_path / "hf")})
    metrics = theirs.evaluate(model, tok)
    samples = sorted(theirs.last_samples["evomerge_mgsm_en"], key=lambda s: s["doc_id"])
    assert len(samples) == len(our_results) == 40
    their_correct = [bool(s["exact_match"]) for s in samples]
    our_correct = [r.correct for r in our_results]
    assert 0 < sum(our_correct) < len(our_correct), "the trained model should get some right and some wrong"
    assert our_correct == their_correct
    # same prompts, same greedy decoding: the very same text, not only the same verdicts
    assert [r.output for r in our_results] == [s["resps"][0][0] for s in samples]
    assert ours.evaluate(model, tok)["acc"] == pytest.approx(metrics["exact_match,flexible-extract"])


def test_generation_matches_transformers_generate():
    """Our batched loop (finished rows dropped from the batch) gives generate()'s greedy tokens."""
    model, tok = load_arith_model()
    prompts = [f"Question: {q}\nStep-by-Step Answer:" for q, _, _ in problems(6, seed=5)] + ["Question:", "7"]
    ours = greedy_generate(model, tok, prompts, GenerationSettings(max_new_tokens=24, batch_size=4))
    for prompt, gen in zip(prompts, ours):
        ids = tok(prompt, return_tensors="pt")
        ref = model.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        ref_tokens = ref[0, ids["input_ids"].shape[1]:].tolist()
        assert gen.token_ids == ref_tokens[:len(gen.token_ids)]
        assert len(gen.token_ids) == 24 or gen.token_ids[-1] == tok.eos_token_id


def test_refilled_batches_give_each_prompt_its_own_answer():
    """Rows that finish are replaced by waiting prompts mid-batch: every answer must still equal the one
    decoded alone (batch of 1) and generate()'s."""
    model, tok = load_arith_model()
    questions = [f"Question: {q}\nStep-by-Step Answer:" for q, _, _ in problems(5, seed=8)]
    prompts = [p for pair in zip(questions, ["Question: Tom", "x y", "The answer", "Ann has", "?"]) for p in pair]
    settings = GenerationSettings(max_new_tokens=20, stop=("\n\n",), batch_size=3)
    refilled = greedy_generate(model, tok, prompts, settings)
    lengths = {g.new_tokens for g in refilled}
    assert len(lengths) > 2, "the test needs answers of different lengths"
    for prompt, gen in zip(prompts, refilled):
        alone = greedy_generate(model, tok, [prompt], GenerationSettings(max_new_tokens=20, stop=("\n\n",)))[0]
        assert gen.token_ids == alone.token_ids and gen.text == alone.text
        ids = tok(prompt, return_tensors="pt")
        ref = model.generate(**ids, max_new_tokens=20, do_sample=False, pad_token_id=tok.pad_token_id)
        assert gen.token_ids == ref[0, ids["input_ids"].shape[1]:].tolist()[:len(gen.token_ids)]


def test_stop_strings_and_max_new_tokens(arith_data):
    model, tok = load_arith_model()
    prompts = ["Question: Tom has 3 apples. Tom gets 4 more. How many apples does Tom have?\nStep-by-Step Answer:"]
    full = greedy_generate(model, tok, prompts, GenerationSettings(max_new_tokens=32))[0]
    assert "The answer is" in full.text
    cut = greedy_generate(model, tok, prompts, GenerationSettings(max_new_tokens=32, stop=("The answer",)))[0]
    assert cut.text == full.text.split("The answer")[0]
    assert cut.new_tokens < full.new_tokens  # stopped early, not only cut afterwards
    short = greedy_generate(model, tok, prompts, GenerationSettings(max_new_tokens=3))[0]
    assert short.new_tokens == 3 and short.token_ids == full.token_ids[:3]


def test_in_place_weight_change_is_seen(arith_data, tmp_path):
    """No stale cache: after rewriting the weights in place, the score is the new model's score."""
    model, tok = load_arith_model()
    ev = build_evaluator(math_config(arith_data))
    trained = ev.evaluate(model, tok)
    other, _ = load_arith_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
        expected = build_evaluator(math_config(arith_data)).evaluate(other, tok)
        for dst, src in zip(model.parameters(), other.parameters()):
            dst.copy_(src)
    changed = ev.evaluate(model, tok)
    assert changed == expected
    assert changed["acc"] < trained["acc"]


def test_lm_eval_reuses_tasks_and_wrapper_after_in_place_change(lm_eval_task_dir, tmp_path):
    model, tok = load_arith_model()
    ev = build_evaluator({"type": "lm_eval", "task": "evomerge_mgsm_en", "include_path": str(lm_eval_task_dir),
                          "batch_size": 8, "hf_home": str(tmp_path / "hf")}, limit=12, seed=1)
    assert ev.metric_names == ("exact_match,flexible-extract",)
    task = ev.tasks["evomerge_mgsm_en"]
    before = ev.evaluate(model, tok)
    wrapper = ev._lm
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    after = ev.evaluate(model, tok)
    assert ev._lm is wrapper and ev.tasks["evomerge_mgsm_en"] is task  # built once
    assert before["exact_match,flexible-extract"] > 0 and after["exact_match,flexible-extract"] == 0.0
    assert len(ev.samples["evomerge_mgsm_en"]) == 12


def test_same_subsample_for_every_candidate(arith_data):
    a = build_evaluator(math_config(arith_data), limit=10, seed=3)
    b = build_evaluator(math_config(arith_data), limit=10, seed=3)
    c = build_evaluator(math_config(arith_data), limit=10, seed=4)
    assert [i.index for i in a.items] == [i.index for i in b.items]
    assert [i.index for i in a.items] != [i.index for i in c.items]
    assert len(a.items) == 10 and len(set(i.index for i in a.items)) == 10
    model, tok = load_arith_model()
    first = a.run(model, tok)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    second = a.run(model, tok)
    assert [r.index for r in first] == [r.index for r in second] == [i.index for i in a.items]


def test_builtin_splits_are_disjoint():
    search = build_evaluator("gsm8k")
    test = build_evaluator("gsm8k:test")
    assert search.split == "search" and [i.index for i in search.items] == list(range(250, 1319))
    assert [i.index for i in test.items] == list(range(250))
    mgsm_en = build_evaluator("mgsm:en")
    assert [i.index for i in mgsm_en.items] == list(range(250))
    # MGSM item k is GSM8K test item k: the search split never sees an MGSM problem
    assert not {i.question for i in search.items} & {i.question for i in mgsm_en.items}
    sub = build_evaluator("gsm8k", limit=50, seed=7)
    assert all(250 <= i.index < 1319 for i in sub.items) and len(sub.items) == 50
    assert build_evaluator("gsm8k:train", limit=5).items[0].question
    with pytest.raises(EvomergeError, match="unknown split"):
        build_evaluator("gsm8k:validation")


def test_builtin_specs_and_templates():
    ja = build_evaluator("mgsm:ja")
    assert ja.metric_names == ("acc", "acc_lang", "lang_rate", "answered")
    prompt = ja.render_prompt(ja.items[0].question)
    assert prompt.startswith("以下に、あるタスクを説明する指示があります。") and prompt.endswith("### 応答:")
    assert "Response" in ja.settings.stop and ja.settings.max_new_tokens == 512
    zh = build_evaluator("mgsm:zh", fewshot=2)
    zh_prompt = zh.render_prompt("Q?")
    assert zh_prompt.startswith("问题：罗杰有 5 个网球") and zh_prompt.endswith("问题：Q?\n逐步解答：")
    assert zh_prompt.count("问题：") == 3 and "问题：" in zh.settings.stop
    en = build_evaluator("mgsm:en", template="plain_qa")
    assert en.render_prompt("What is 2+2?") == "Question: What is 2+2?\nAnswer:"
    assert build_evaluator("mgsm:de", batch_size=3, max_new_tokens=7).settings.batch_size == 3
    with pytest.raises(EvomergeError, match="mgsm needs a language"):
        build_evaluator("mgsm:xx")
    with pytest.raises(EvomergeError, match="unknown evaluator"):
        build_evaluator("nonsense")
    with pytest.raises(EvomergeError, match="unknown key"):
        build_evaluator("mgsm:en", tempalte="plain_qa")
    with pytest.raises(EvomergeError, match="unknown prompt template"):
        build_evaluator("mgsm:en", template="no_such_template")


def test_chat_template_used_when_the_tokenizer_has_one(arith_data):
    _, tok = load_arith_model()
    ev = build_evaluator(math_config(arith_data, chat_template="auto"))
    assert ev.render_prompt("Q?", tok) == "Question: Q?\nStep-by-Step Answer:"
    tok.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    assert ev.render_prompt("Q?", tok) == "<|user|>Question: Q?\nStep-by-Step Answer:<|assistant|>"
    never = build_evaluator(math_config(arith_data, chat_template="never"))
    assert never.render_prompt("Q?", tok) == "Question: Q?\nStep-by-Step Answer:"


def test_language_gate_metrics(arith_data):
    """The English-speaking model is right but never in Japanese: acc_lang is 0 while acc is not."""
    model, tok = load_arith_model()
    ev = build_evaluator(math_config(arith_data, language="ja", template={"prompt": "Question: {question}\n"
                                                                         "Step-by-Step Answer:",
                                                                         "stop": ["\n\n"]},
                                     language_gate=True))
    metrics = ev.evaluate(model, tok)
    assert metrics["acc"] > 0 and metrics["acc_lang"] == 0.0 and metrics["lang_rate"] == 0.0
    en = build_evaluator(math_config(arith_data, language_gate={"threshold": 0.5}))
    en_metrics = en.evaluate(model, tok)
    assert en_metrics["acc_lang"] == en_metrics["acc"] and en_metrics["lang_rate"] == 1.0


def test_score_items_gives_each_item_its_full_run_verdict(arith_data):
    """Per-item scores (fitness: race | minibatch) of a subset, in the asked order, are the full run's verdicts
    of those items; over every item their means are ``evaluate``'s metrics."""
    model, tok = load_arith_model()
    ev = build_evaluator(math_config(arith_data, metrics=["acc", "answered"]))
    assert ev.scores_items and ev.n_items == 40
    full = ev.run(model, tok)
    subset = [31, 2, 17, 8]
    scores = ev.score_items(model, tok, subset)
    assert scores.indices == tuple(subset)
    assert scores.values["acc"] == tuple(float(full[i].correct) for i in subset)
    assert scores.values["answered"] == tuple(float(full[i].predicted is not None) for i in subset)
    every = ev.score_items(model, tok, list(range(40)))
    assert every.means() == pytest.approx(ev.evaluate(model, tok))


def test_lm_eval_score_items_are_lm_evals_own_per_document_values(arith_data, lm_eval_task_dir, tmp_path):
    model, tok = load_arith_model()
    ev = build_evaluator({"type": "lm_eval", "task": "evomerge_mgsm_en", "include_path": str(lm_eval_task_dir),
                          "batch_size": 8, "metric": "exact_match,flexible-extract", "hf_home": str(tmp_path / "hf")})
    assert ev.scores_items and ev.n_items == 40
    ours = [r.correct for r in build_evaluator(math_config(arith_data)).run(model, tok)]
    subset = [9, 30, 1, 22, 14]
    scores = ev.score_items(model, tok, subset)
    assert scores.values["exact_match,flexible-extract"] == tuple(float(ours[i]) for i in subset)
    every = ev.score_items(model, tok, list(range(40)))
    assert every.means() == pytest.approx(ev.evaluate(model, tok))
