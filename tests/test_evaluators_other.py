"""Perplexity (equals a direct computation, strided windows) and custom evaluators (module and file paths)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from evomerge import tiny
from evomerge.errors import EvomergeError
from evomerge.evaluators import build_evaluator
from evomerge.evaluators.perplexity import windows

TEXT = "The quick brown fox jumps over the lazy dog. " * 6 + "Pack my box with five dozen liquor jugs."


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


@pytest.fixture(scope="module")
def model_and_tok():
    torch.manual_seed(0)
    tok = tiny.make_tokenizer()
    return tiny.make_model("llama", seed=3, vocab_size=len(tok)), tok


def _token_logprob(model, ids: list[int], context_start: int, t: int) -> float:
    """log p(ids[t] | ids[context_start:t]) by a separate forward pass of just that context."""
    context = torch.tensor([ids[context_start:t]])
    logits = model(input_ids=context).logits[0, -1].double()
    return float(torch.log_softmax(logits, -1)[ids[t]])


def test_windows_score_each_token_once():
    for n, length, stride in [(10, 4, 2), (10, 4, 3), (7, 16, 8), (33, 8, 3), (2, 4, 1)]:
        scored = []
        for begin, end, first in windows(n, length, stride):
            assert 0 <= begin < first < end + 1 and end - begin <= length
            assert first - begin >= min(first, length - stride)  # guaranteed context
            scored += list(range(first, end))
        assert scored == list(range(1, n))
    assert windows(1, 4, 2) == []
    with pytest.raises(ValueError):
        windows(10, 4, 4)


def test_perplexity_single_window_equals_model_loss(tmp_path, model_and_tok):
    model, tok = model_and_tok
    path = tmp_path / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    ev = build_evaluator(f"perplexity:{path}", max_length=512)
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        loss = float(model(input_ids=ids, labels=ids).loss)
    metrics = ev.evaluate(model, tok)
    assert metrics["nll"] == pytest.approx(loss, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_perplexity_strided_equals_direct_token_by_token(tmp_path, model_and_tok):
    model, tok = model_and_tok
    records = [{"text": TEXT[:70]}, {"text": "Sphinx of black quartz, judge my vow."}, {"text": TEXT[60:110]}]
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    max_length, stride = 24, 10
    ev = build_evaluator(f"perplexity:{path}", max_length=max_length, stride=stride, batch_size=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for record in records:
            ids = tok(record["text"])["input_ids"]
            # tokens < max_length: full context from 0; later ones in chunks of `stride` whose window ends
            # at the chunk end and is max_length tokens long
            for t in range(1, len(ids)):
                if t < max_length:
                    start = 0
                else:
                    chunk_end = min(max_length + ((t - max_length) // stride + 1) * stride, len(ids))
                    start = chunk_end - max_length
                total -= _token_logprob(model, ids, start, t)
                count += 1
    metrics = ev.evaluate(model, tok)
    assert metrics["nll"] == pytest.approx(total / count, rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)


def test_perplexity_sees_in_place_changes(tmp_path, model_and_tok):
    _, tok = model_and_tok
    model = tiny.make_model("llama", seed=4, vocab_size=len(tok))
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ev = build_evaluator(f"perplexity:{path}")
    before = ev.evaluate(model, tok)["perplexity"]
    with torch.no_grad():
        model.lm_head.weight.zero_()  # uniform next-token distribution
    after = ev.evaluate(model, tok)["perplexity"]
    assert after == pytest.approx(len(tok), rel=1e-4) and after != before


def test_perplexity_errors(tmp_path):
    with pytest.raises(EvomergeError, match="not found"):
        build_evaluator(f"perplexity:{tmp_path}/missing.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n', encoding="utf-8")
    with pytest.raises(EvomergeError, match="'text' field"):
        build_evaluator(f"perplexity:{bad}")


def test_custom_module_function(tmp_path, monkeypatch, model_and_tok):
    model, tok = model_and_tok
    package = tmp_path / "mytasks"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "metrics.py").write_text(textwrap.dedent("""
        def size(model, tokenizer, scale=1.0):
            return {"n_params": sum(p.numel() for p in model.parameters()) * scale,
                    "vocab": len(tokenizer)}
        size.metric_names = ["n_params", "vocab"]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = build_evaluator("custom:mytasks.metrics:size")
    assert ev.metric_names == ("n_params", "vocab")
    n = sum(p.numel() for p in model.parameters())
    assert ev.evaluate(model, tok) == {"n_params": float(n), "vocab": float(len(tok))}
    sys.modules.pop("mytasks.metrics", None)
    sys.modules.pop("mytasks", None)


def test_custom_file_path_relative_to_yaml(tmp_path, model_and_tok):
    model, tok = model_and_tok
    exp = tmp_path / "experiment"
    (exp / "tasks").mkdir(parents=True)
    (exp / "tasks" / "score.py").write_text(textwrap.dedent("""
        import torch

        def first_weight(model, tokenizer, offset=0.0, seed=None):
            return {"w": float(next(model.parameters()).detach().flatten()[0]) + offset, "seed": seed}
    """))
    (exp / "custom.yaml").write_text("type: custom\nfunction: tasks/score.py:first_weight\n"
                                     "kwargs: {offset: 1.0}\nmetrics: [w]\n")
    ev = build_evaluator(str(exp / "custom.yaml"), seed=5)
    first = float(next(model.parameters()).detach().flatten()[0])
    assert ev.evaluate(model, tok) == {"w": pytest.approx(first + 1.0), "seed": 5.0}
    # a spec string from an experiment YAML: relative to the folder given as base_dir
    relative = build_evaluator("custom:tasks/score.py:first_weight", base_dir=exp)
    assert relative.evaluate(model, tok)["w"] == pytest.approx(first)
    with pytest.raises(EvomergeError, match="has no function"):
        build_evaluator(f"custom:{exp}/tasks/score.py:nope")
    with pytest.raises(EvomergeError, match="cannot import"):
        build_evaluator("custom:no_such_package_xyz.mod:fn")
    (exp / "bad.py").write_text("def f(model, tokenizer):\n    return [1]\n")
    with pytest.raises(EvomergeError, match="expected a dict"):
        build_evaluator(f"custom:{exp}/bad.py:f").evaluate(model, tok)


def test_custom_file_imports_its_sibling_modules_in_any_process(tmp_path, monkeypatch, model_and_tok):
    """A ``file.py:fn`` evaluator imports the modules beside it: its folder is first on sys.path of whatever
    process loads it (here this one, and a fresh interpreter started in another folder)."""
    model, tok = model_and_tok
    folder = tmp_path / "tasks"
    folder.mkdir()
    helper = f"helper_{tmp_path.name.replace('-', '_')}"  # a name no other test or process has imported
    (folder / f"{helper}.py").write_text("def scale(x):\n    return 2.0 * x\n")
    (folder / "score.py").write_text(textwrap.dedent(f"""
        from {helper} import scale

        def doubled(model, tokenizer):
            return {{"w": scale(float(next(model.parameters()).detach().flatten()[0]))}}
    """))
    monkeypatch.setattr(sys, "path", list(sys.path))  # this test's sys.path change stays in this test
    ev = build_evaluator(f"custom:{folder / 'score.py'}:doubled")
    first = float(next(model.parameters()).detach().flatten()[0])
    assert ev.evaluate(model, tok) == {"w": pytest.approx(2.0 * first)}
    assert sys.path[0] == str(folder)
    code = ("import sys; from evomerge.evaluators import build_evaluator; "
            f"ev = build_evaluator('custom:tasks/score.py:doubled', base_dir={str(tmp_path)!r}); "
            "print(ev.function.__module__, sys.path[0])")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True).stdout
    assert out.split()[1] == str(folder)
    sys.modules.pop(helper, None)

