"""Shared by the evaluator tests: a tiny Llama trained (in seconds) on synthetic arithmetic word problems.

``arith_model()`` trains it once per test session (cached in-process and saved under a temporary folder) so
that it answers some problems right and some wrong: a real model for per-item comparisons, not a mock.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from pathlib import Path

import torch

NAMES = ["Tom", "Ann", "Bob", "Eva", "Sam", "Mia", "Leo", "Zoe"]
THINGS = ["apples", "books", "coins", "cards", "pens", "shells"]
PROMPT = "Question: {question}\nStep-by-Step Answer:"  # the mgsm_native_cot template in English, zero-shot


def make_problem(rng: random.Random) -> tuple[str, int, str]:
    """(question, answer, worked answer) of a one-step addition or subtraction word problem."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    if rng.random() < 0.5:
        question = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have?"
        answer, work = a + b, f"{a} + {b} = {a + b}."
    else:
        a, b = max(a, b) + 2, min(a, b)
        question = f"{name} has {a} {thing}. {name} gives away {b}. How many {thing} does {name} have?"
        answer, work = a - b, f"{a} - {b} = {a - b}."
    return question, answer, f" {work} The answer is {answer}."


def problems(n: int, seed: int) -> list[tuple[str, int, str]]:
    rng = random.Random(seed)
    return [make_problem(rng) for _ in range(n)]


def write_tsv(path: Path, items: list[tuple[str, int, str]]) -> Path:
    path.write_text("".join(f"{q}\t{a}\n" for q, a, _ in items), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=1)
def arith_model(steps: int = 120) -> Path:
    """Train (once per session) and save the tiny arithmetic model; returns its checkpoint folder."""
    from evomerge import tiny

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train many times faster on one thread here
    try:
        texts = [PROMPT.format(question=q) + work + "\n\n" for q, _, work in problems(2000, seed=1)]
        tok = tiny.make_tokenizer(corpus=texts, vocab_size=400)  # BPE: ~40 tokens per problem
        model = tiny.make_model("llama", seed=0, vocab_size=len(tok), hidden_size=64, num_layers=2,
                                num_heads=4, num_kv_heads=2, intermediate_size=128).train()
        encoded = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
        tiny.train_causal_lm(model, encoded, tok.pad_token_id, steps=steps, batch_size=32, lr=3e-3,
                             rng=random.Random(2), weight_decay=0.0)
    finally:
        torch.set_num_threads(threads)
    folder = tempfile.mkdtemp(prefix="evomerge-arith-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    out = Path(folder) / "model"
    model.eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out


def load_arith_model():
    """A fresh in-memory copy of the trained model and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = arith_model()
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def math_config(data: Path, **overrides) -> dict:
    """Our evaluator with the same prompt as evaluators/lm_eval_tasks/evomerge_mgsm_en.yaml."""
    config = {"type": "math_word", "name": "arith", "data": str(data), "language": "en",
              "template": "mgsm_native_cot", "chat_template": "never",
              "generation": {"max_new_tokens": 32, "batch_size": 8}}
    config.update(overrides)
    return config
