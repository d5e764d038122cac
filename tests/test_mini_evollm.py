"""The mini EvoLLM zoo: languages, language gate, splits, tokenizer, a miniature build and its scoring."""

from __future__ import annotations

import json
import random
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments" / "mini_evollm"
sys.path.insert(0, str(EXP))

import languages as L  # noqa: E402
import zoo  # noqa: E402


def test_languages_are_disjoint_except_shared_words():
    assert not (L.L1_SPECIFIC & L.L2_SPECIFIC)
    assert not (L.L2_SPECIFIC & set(L.SHARED_WORDS))
    assert not (L.L1_SPECIFIC & set(L.SHARED_WORDS))
    # every switchable L1 word has exactly one L2 word and back
    assert all(L.L2_TO_L1[v] == k for k, v in L.L1_TO_L2.items())


def test_language_gate():
    splits = zoo.make_splits(0)
    l2_item, l1_item = splits["target_test"][0], splits["math_l1_test"][0]
    assert L.language_of(l2_item.answer) == 2
    assert L.language_of(l1_item.answer) == 1
    assert L.language_of("7 . 14 .") is None          # numbers only: no language
    # an L2 solution whose answer phrase is in L1 is mostly L2 still; an L1 one with an L2 phrase is not L2
    l1_words = l1_item.answer.split()
    mixed = " ".join(l1_words[:-4] + L.l2([l1_item.gold, "answer", "is", "."]))
    assert L.language_of(mixed) != 2
    assert L.last_number(l1_item.answer) == l1_item.gold


def test_splits_are_disjoint_by_meaning_and_fixed():
    a = zoo.make_splits(0)
    keys = {name: {it.key for it in items} for name, items in a.items()}
    assert len(a["target_search"]) == 500 and len(a["target_test"]) == 1000
    math = ("target_search", "target_test", "math_l1_test", "math_l1_search", "a_train")
    for x in math:
        assert len(keys[x]) == len(a[x])
        for y in math:
            if x < y:
                assert not (keys[x] & keys[y]), (x, y)
    qa = ("qa_l2_test", "qa_l2_search", "b_train")
    for x in qa:
        for y in qa:
            if x < y:
                assert not (keys[x] & keys[y]), (x, y)
    assert all(it.lang == 2 for it in a["target_test"]) and all(it.lang == 1 for it in a["a_train"])
    zoo.make_splits.cache_clear()
    again = zoo.make_splits(0)
    assert [it.question for it in again["target_test"]] == [it.question for it in a["target_test"]]


def test_specialist_b_plain_texts_are_language_2_facts_and_stories_without_word_problems():
    """B's plain texts: about b_mix_facts of them language-2 arithmetic facts, every one correct and in
    language 2, the rest language-2 stories; no question or answer prompt (B never sees a word problem)."""
    rng = random.Random(0)
    texts = [zoo.b_plain_text(rng, zoo.ZooRecipe()) for _ in range(2000)]
    ops = {L.L2_WORD[o] for o in ("plus", "minus", "times")}
    facts = [t for t in texts if ops & set(t.split())]
    assert 0.45 < len(facts) / len(texts) < 0.55
    for t in texts:
        assert L.language_of(t) == 2 and "<q>" not in t and "<a>" not in t
    for t in facts:
        for fact in t.split(" . "):
            x, op, y, is_, z = fact.replace(" .", "").split()
            assert is_ == L.L2_WORD["is"]
            assert int(z) == {"plus": int(x) + int(y), "minus": int(x) - int(y), "times": int(x) * int(y)}[
                L.L2_TO_L1[op]]
    stories_only = replace(zoo.ZooRecipe(), b_mix_facts=0.0)
    assert not any(ops & set(zoo.b_plain_text(rng, stories_only).split()) for _ in range(300))


def test_math_items_solve_correctly():
    for it in zoo.make_splits(0)["target_search"][:200]:
        steps = it.answer.split(" . ")
        for step in steps:
            w = step.split()
            if len(w) == 5 and w[3] == L.L2_WORD["is"]:
                x, op, y, z = int(w[0]), L.L2_TO_L1[w[1]], int(w[2]), int(w[4])
                assert z == {"plus": x + y, "minus": x - y, "times": x * y}[op]
        assert L.last_number(it.answer) == it.gold and int(it.gold) >= 0


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    tok = zoo.make_tokenizer()
    tok.save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    it = zoo.make_splits(0)["target_test"][3]
    text = f"{L.prompt(it.question)} {it.answer}"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert len(ids) == len(text.split()) + 1          # one word, one token
    assert tok.decode(ids, skip_special_tokens=False) == "<s> " + text


def test_miniature_build_loads_and_scores(tmp_path):
    """A zoo with tiny step counts: cached, loadable checkpoints, and the evaluator's metrics on them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import mini_task

    recipe = zoo.TINY_RECIPE
    path = zoo.build_zoo(recipe, cache=tmp_path, threads=1)
    info = json.loads((path / "zoo.json").read_text())
    assert info["digest"] == recipe.digest()
    mtime = (path / "zoo.json").stat().st_mtime
    assert zoo.build_zoo(recipe, cache=tmp_path, threads=1) == path          # cached: not rebuilt
    assert (path / "zoo.json").stat().st_mtime == mtime
    assert sum(1 for _ in open(path / "data" / "target_test.jsonl")) == recipe.n_test + recipe.n_test_late == 1000
    weights = {}
    for name in ("base", "spec_a", "spec_b"):
        assert (path / name / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(path / name)
        weights[name] = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert not weights["spec_a"].equal(weights["base"]) and not weights["spec_b"].equal(weights["spec_a"])
    tok = AutoTokenizer.from_pretrained(path / "spec_a")
    metrics = mini_task.evaluate(model, tok, split="target_test,math_l1_test,qa_l2_test", limit=8, seed=1)
    for key in ("target_test/accuracy", "target_test/val", "target_test/lang", "qa_l2_test/accuracy", "accuracy",
                "own_tasks_mean"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["target_test/n"] == 8

    # the same function through the product's custom-evaluator spec, as the experiment YAMLs use it
    from evomerge.evaluators import build_evaluator

    ev = build_evaluator({"type": "custom", "function": f"{EXP / 'mini_task.py'}:evaluate",
                          "kwargs": {"split": "target_search"}, "metrics": ["accuracy", "val", "lang"]}, limit=8)
    out = ev.evaluate(model, tok)
    assert out["n"] == 8 and 0.0 <= out["accuracy"] <= out["val"] + 1e-9


def test_experiment_yamls_validate():
    """ps / dfs / ps_dfs / ps_multi are valid experiments for the real loop (model folders not required here)."""
    import yaml

    from evomerge.search.experiment import validate_experiment

    kinds = {}
    for name in ("ps", "dfs", "ps_dfs", "ps_multi"):
        data = yaml.safe_load((EXP / f"{name}.yaml").read_text())
        exp = validate_experiment(data, base_dir=EXP, default_name=name, check_models=False)
        kinds[name] = exp.kind
        assert exp.objectives[0].direction == "maximize"
    assert kinds == {"ps": "ps", "dfs": "dfs", "ps_dfs": "ps_dfs", "ps_multi": "ps"}


def test_scoring_counts_only_gated_right_answers():
    import mini_task

    items = zoo.make_splits(0)["target_test"][:4]
    in_l1 = " ".join(L.L2_TO_L1.get(w, w) for w in items[1].answer.split())   # word by word into L1
    outs = [items[0].answer,                                   # right, in L2
            in_l1,                                             # right number, in L1: gated out
            items[2].answer.replace(items[2].gold + " ", "999 "),  # wrong number, L2
            ""]
    m = mini_task.score(items, outs, "math", 2)
    assert m["accuracy"] == pytest.approx(0.25)
    assert m["val"] == pytest.approx(0.5)
    assert m["lang"] == pytest.approx(0.5)


def test_training_batches_teach_next_token_prediction():
    """Both batch makers hand transformers labels aligned with the inputs (it shifts them itself), so the loss
    it reports is the next-token cross-entropy. (Pre-shifted labels made the first zoo's base learn to predict
    the token after next, and the specialists then had to re-learn next-token prediction.)"""
    import torch
    import torch.nn.functional as F

    recipe = zoo.TINY_RECIPE
    tok = zoo.make_tokenizer()
    splits = zoo.recipe_splits(recipe)
    torch.manual_seed(0)
    model = zoo.make_model(recipe, len(tok)).eval()
    pretrain = zoo._packed_batches(tok, recipe, recipe.base, zoo.held_out_keys(splits))
    finetune = zoo._qa_batches(tok, splits["a_train"], recipe.spec_a, seed=1)
    for next_batch in (pretrain, finetune):
        ids, labels = next_batch(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            reported = model(input_ids=ids, labels=labels).loss
        # position t predicts token t + 1: compare with a direct next-token cross-entropy
        expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        assert torch.allclose(reported, expected, atol=1e-5)
        kept = labels != -100
        assert kept.any() and torch.equal(labels[kept], ids[kept])  # the targets are the inputs' own tokens


def _load_run_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_evollm_run", EXP / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cross_skill_verdict_needs_every_seed_beyond_the_spread():
    run = _load_run_module()

    def row(kind, acc):
        return {"kind": kind, "label": kind, "metrics": {"target_test/accuracy": acc}}

    others = [row("source", 0.05), row("source", 0.07), row("merge", 0.10)]
    assert run.cross_skill_reached([row("ps", 0.31), row("ps", 0.25), row("ps", 0.29)], others)   # 15 > 6 points
    assert not run.cross_skill_reached([row("ps", 0.31), row("ps", 0.12), row("ps", 0.29)], others)  # 2 < 19
    assert not run.cross_skill_reached([], others)


def _git_status() -> str:
    import subprocess

    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=REPO, capture_output=True,
                          text=True, check=True).stdout


# an absolute path: a slash that starts a path (not one inside a relative path such as ../x/y)
ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/[\w.+-]+/")


def test_pipeline_end_to_end_on_a_miniature_zoo(ray_address, tmp_path, monkeypatch):
    """run.py on the test-sized zoo with tiny budgets: every stage runs through the real loop, each winner is
    exported and re-scored from disk, and RESULTS.md / pareto.png / summary.json agree with each other. It
    writes only into its run folder and the cache (both ignored by git, here private to this test): the tracked
    tree is unchanged, and no written text file names a machine path (absolute path, host name)."""
    import shutil
    import socket
    import uuid

    run = _load_run_module()
    tag = f"test-{uuid.uuid4().hex[:8]}"
    out, cache = REPO / "runs" / tag, REPO / ".cache" / tag   # where the real job writes: ignored folders
    monkeypatch.setenv("MINI_EVOLLM_CACHE", str(cache))        # never touch the real zoo's cache
    before = _git_status()
    try:
        assert run.main(["--tiny-zoo", "--quick", "--multi", "always", "--address", ray_address,
                         "--out", str(out)]) == 0
        assert _git_status() == before
        summary = json.loads((out / "summary.json").read_text())
        trials = {s["name"]: s["trials"] for s in summary["searches"]}
        assert trials == {"ps": 8, "dfs": 8, "ps_dfs": 8, "ps_multi": 8}     # PS+DFS: PS's budget in all
        for s in summary["searches"]:
            run_dir = out / s["run_dir"]
            best = run_dir / "best"
            assert (best / "model.safetensors").is_file() and (best / "evomerge_trial.json").is_file()
            # a PS winner is reproducible from its recipe; a data-flow winner from its layer path
            info = json.loads((best / "evomerge_trial.json").read_text())
            assert info["layers"] if info["kind"] == "dfs" else (best / "recipe.yaml").is_file()
            assert sum(1 for _ in open(run_dir / "trials.jsonl")) == s["trials"]
        text = (out / "RESULTS.md").read_text()
        for label, acc in summary["target_test"].items():   # the table shows the re-scored test accuracies
            assert f"| {label} | {acc:.1f} |" in text
        assert "## Compared with the paper's Table 1" in text and "## Multi-skill case" in text
        assert "## PS vs PS+DFS at equal total trial budgets" in text
        assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        written = [p for p in out.rglob("*") if p.is_file() and p.suffix in (".md", ".json", ".jsonl", ".yaml")]
        assert len(written) > 20
        host = socket.gethostname()
        for p in written:
            body = p.read_text()
            assert not ABSOLUTE_PATH.search(body), (p.relative_to(out), ABSOLUTE_PATH.search(body))
            assert str(REPO) not in body and f'"{host}"' not in body, p.relative_to(out)
        # the path-free run folder still exports: a PS run's best trial again, from its relative records
        from evomerge.search.experiment import experiment_from_resolved
        from evomerge.search.export import export_trial
        from evomerge.search.objectives import best_trial
        from evomerge.search.run_folder import RunFolder

        folder = RunFolder.open(out / "ps-seed0")
        again = export_trial(folder, experiment_from_resolved(folder.config()), best_trial(folder.trials()),
                             tmp_path / "again")
        assert (again / "model.safetensors").read_bytes() == (out / "ps-seed0" / "best" / "model.safetensors"
                                                               ).read_bytes()
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    assert _git_status() == before


def test_same_seeds_give_the_same_table_with_one_or_two_workers(ray_address, tmp_path):
    """The main job's PS piece (run.run_search) on a test-sized zoo trained just enough for its candidates to score
    differently (language-blind `val` as the fitness, so the optimizer's ranking matters): with 1 and with 2
    workers, the same seed gives the same trials (genomes, metrics, scores), the same exported winner (bitwise)
    and the same held-out row of the table."""

    run = _load_run_module()
    recipe = replace(zoo.TINY_RECIPE, base=zoo.TrainSpec(steps=150, lr=3e-3, batch=8, warmup=10),
                     spec_a=zoo.TrainSpec(steps=40, lr=1e-3, batch=8, warmup=5),
                     spec_b=zoo.TrainSpec(steps=40, lr=1e-3, batch=8, warmup=5))
    zoo_path = zoo.build_zoo(recipe, cache=tmp_path / "cache", threads=1)
    overrides = {"budget": {"trials": 24},   # two CMA-ES generations of 12: the second depends on the first's ranks
                 "objectives": [{"metric": "target/val", "direction": "maximize"}]}
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        s = run.run_search("ps", EXP / "ps.yaml", zoo_path, out, 3, overrides, workers, ray_address)
        trials = [json.loads(line) for line in open(out / "ps-seed3" / "trials.jsonl")]
        results[workers] = {
            "trials": sorted((t["trial"], t["x"], t["metrics"], t["score"]) for t in trials),
            "row": (s["metrics"], s["per_item"], s["search_score"], s["best_trial"]),
            "weights": (out / "ps-seed3" / "best" / "model.safetensors").read_bytes()}
    assert len({t[3] for t in results[1]["trials"]}) > 1          # the candidates do score differently
    assert results[1]["trials"] == results[2]["trials"]
    assert results[1]["row"] == results[2]["row"]
    assert results[1]["weights"] == results[2]["weights"]


def _load_study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("mini_evollm_study", EXP / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module   # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_study_forces_the_instruction_set_in_a_fresh_process():
    """The study's avx2 rows run in a process whose torch dispatches to AVX2 kernels (the caps are set before
    torch is imported), and the zoo cache key differs between the two instruction sets."""
    import subprocess

    study = _load_study_module()
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import zoo; "
             "print(zoo.instruction_set(), zoo.ZooRecipe().digest())")
    got = {isa: subprocess.run([sys.executable, "-c", probe, str(EXP)], env=study.isa_env(isa), check=True,
                               capture_output=True, text=True).stdout.split() for isa in ("avx512", "avx2")}
    assert got["avx2"][0] == "avx2"
    assert got["avx512"][0] != "avx2" or got["avx512"][1] == got["avx2"][1]  # an AVX2-only CPU: one zoo
    if got["avx512"][0] != "avx2":
        assert got["avx512"][1] != got["avx2"][1]                             # else one zoo per instruction set


def test_study_row_applies_the_verdict_rule_to_every_ps_seed(tmp_path):
    """A study row from run.py's results: accuracies in %, the smallest bootstrap lower bound over every PS seed
    against every source and merge, and the verdict (one PS seed inside a merge's interval fails the row)."""
    study = _load_study_module()
    n = 200

    def row(label, kind, right, first=0):
        per_item = [first <= i < first + right for i in range(n)]
        return {"label": label, "kind": kind, "metrics": {"target_test/accuracy": right / n},
                "per_item": per_item}

    rows = [row("base (bilingual, no fine-tune)", "source", 16), row("A: language-1 math", "source", 32),
            row("B: language-2 text", "source", 12), row("TIES, no search", "merge", 40),
            row("DARE-TIES, no search", "merge", 24)]

    def ctx(ps_right):
        searches = [{"name": "ps", "seed": i, "trials": 96, "search_score": 0.3, **row("ps", "ps", r, first=20)}
                    for i, r in enumerate(ps_right)]
        return {"rows": rows, "searches": searches, "isa": "avx2", "zoo_path": "zoo-seed0-avx2"}

    good = study.summarize(ctx([60, 56, 64]), 0, "avx2")
    assert good["verdict"] and good["TIES"] == pytest.approx(20.0) and good["PS"] == pytest.approx([30.0, 28.0, 32.0])
    assert good["worst_lower"] > 0
    bad = study.summarize(ctx([60, 42, 64]), 0, "avx2")   # 21.0 vs TIES 20.0: inside the interval
    assert not bad["verdict"] and bad["worst_lower"] < 0
    settings = study.StudySettings((0, 1), ("avx2",), (0, 1, 2), 96, 2)
    study.write_summary(tmp_path / "STUDY.md", settings, [good], ["zoo seed 1, avx2: not run yet"], [], "python x")
    text = (tmp_path / "STUDY.md").read_text()
    assert "| 0 | avx2 | 8.0 | 16.0 | 6.0 | 20.0 | 12.0 | 30.0 / 28.0 / 32.0 |" in text
    assert "## Missing rows" in text and "zoo seed 1, avx2: not run yet" in text
