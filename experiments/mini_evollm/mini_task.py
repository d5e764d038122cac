"""The mini EvoLLM tasks as custom evaluators: language-2 math (the target), language-1 math, language-2 QA.

Use from the search loop as ``custom:experiments/mini_evollm/mini_task.py:evaluate`` (the target on the search
split), or build one with ``make_evaluator(split=..., limit=...)``. Scoring follows the paper: zero-shot, greedy;
a math answer counts only when the last number of the output equals the gold answer AND the output is in the
task's language (the language gate; here a word-level language id, since both languages share one script).

Metrics returned (fractions in 0..1):
- ``accuracy``: the gated score (the fitness);
- ``val``: number right, language ignored (what the merge can at most recover);
- ``lang``: share of outputs in the task's language.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import languages as L  # noqa: E402
import zoo  # noqa: E402
from evomerge.evaluators.answers import answers_equal, extract_answer  # noqa: E402

# split name -> (task kind, language the answer must be in)
SPLITS = {
    "target_search": ("math", 2),
    "target_test": ("math", 2),
    "math_l1_search": ("math", 1),
    "math_l1_test": ("math", 1),
    "qa_l2_search": ("qa", 2),
    "qa_l2_test": ("qa", 2),
}
MAX_NEW_TOKENS = 24


def generate_greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = MAX_NEW_TOKENS,
                    batch_size: int = 256) -> list[str]:
    """Greedy continuations of ``prompts``, decoded without special tokens.

    Uses the product's evaluation decoder (evomerge.evaluators.generation: finished rows leave the batch and
    its KV cache), so the experiment measures the same code path the search uses.
    """
    from evomerge.evaluators.generation import GenerationSettings, greedy_generate

    model.eval()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    return [g.text for g in greedy_generate(model, tokenizer, prompts, settings)]


def score(items: list[L.Item], outputs: list[str], kind: str, lang: int) -> dict[str, float]:
    """Gated accuracy, language-blind accuracy (val) and language share for one split's outputs."""
    right = val = in_lang = 0
    for it, out in zip(items, outputs):
        ok_lang = L.language_of(out) == lang
        if kind == "math":
            ok_val = answers_equal(extract_answer(out, phrases=()), it.gold)
        else:
            # a reading answer is right when its first sentence is the gold one, or names the gold colour or
            # place (in either language: the gate below decides the language)
            first = L.first_sentence(out)
            ok_val = first == it.gold or _same_meaning(first, it)
        right += ok_val and ok_lang
        val += ok_val
        in_lang += ok_lang
    n = max(1, len(items))
    return {"accuracy": right / n, "val": val / n, "lang": in_lang / n, "n": float(len(items))}


def _same_meaning(first: str, item: L.Item) -> bool:
    """Language-blind match for reading answers: the answer's colour or place word, in either language."""
    got = {L.L2_TO_L1.get(w, w) for w in first.split()}
    answer_words = {L.L2_TO_L1.get(w, w) for w in item.gold.split()} & (set(L.COLORS) | set(L.PLACES))
    return bool(answer_words) and answer_words <= got


class MiniTaskEvaluator:
    """Scores a model on one split; ``evaluate`` can be called again after the weights change in place."""

    def __init__(self, split: str = "target_search", limit: int | None = None, seed: int = 0,
                 prefix: str = ""):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
        self.split = split
        self.kind, self.lang = SPLITS[split]
        items = zoo.recipe_splits(zoo.ZooRecipe())[split]
        if limit and limit < len(items):
            items = [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), limit))]
        self.items = items
        self.prompts = [L.prompt(it.question) for it in self.items]
        self.prefix = prefix
        self.last_outputs: list[str] = []

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        self.last_outputs = generate_greedy(model, tokenizer, self.prompts)
        metrics = score(self.items, self.last_outputs, self.kind, self.lang)
        return {f"{self.prefix}{k}": v for k, v in metrics.items()}


class MultiTaskEvaluator:
    """Several splits at once; metrics prefixed by split name, plus ``accuracy`` = the first split's."""

    def __init__(self, splits: list[str], limit: int | None = None, seed: int = 0):
        self.parts = [MiniTaskEvaluator(s, limit, seed, prefix=f"{s}/") for s in splits]

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.evaluate(model, tokenizer))
        out["accuracy"] = out[f"{self.parts[0].split}/accuracy"]
        math_l1 = [p.split for p in self.parts if p.split.startswith("math_l1")]
        qa_l2 = [p.split for p in self.parts if p.split.startswith("qa_l2")]
        if math_l1 and qa_l2:   # the multi-skill score: mean of the two sources' own tasks
            out["own_tasks_mean"] = (out[f"{math_l1[0]}/accuracy"] + out[f"{qa_l2[0]}/accuracy"]) / 2
        return out


def make_evaluator(split: str = "target_search", limit: int | None = None, seed: int = 0):
    """Factory: one split (``split="a,b"`` scores several, prefixed by split name)."""
    if "," in split:
        return MultiTaskEvaluator([s.strip() for s in split.split(",")], limit, seed)
    return MiniTaskEvaluator(split, limit, seed)


_CACHE: dict[tuple, object] = {}


def evaluate(model, tokenizer, split: str = "target_search", limit: int | None = None,
             seed: int = 0) -> dict[str, float]:
    """The search fitness by default: the target task (language-2 math, language-gated) on the search split.

    ``split`` may name several splits joined by commas (metrics then prefixed ``split/``); ``limit`` keeps a
    seeded subsample of the items (the same for every candidate). Built once per (split, limit, seed).
    """
    key = (split, limit, seed)
    if key not in _CACHE:
        _CACHE[key] = make_evaluator(split, limit, seed)
    return _CACHE[key].evaluate(model, tokenizer)


evaluate.metric_names = ("accuracy",)


def evaluate_test(model, tokenizer) -> dict[str, float]:
    """Held-out scoring: the target test split plus both sources' own tasks (for the table and the Pareto plot)."""
    return evaluate(model, tokenizer, split="target_test,math_l1_test,qa_l2_test")
