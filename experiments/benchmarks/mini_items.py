"""The mini EvoLLM target task (experiments/mini_evollm/mini_task.py) as a per-item custom evaluator.

``fitness: race | minibatch`` score a candidate on some of the search items; a custom evaluator opts in by
taking ``items=`` (positions in its item list) and returning one value per item (evomerge/evaluators/custom.py).
This wraps the mini task's own items, prompts, greedy decoding and scoring (imported, not copied) that way:

    spec: {type: custom, function: experiments/benchmarks/mini_items.py:target, kwargs: {split: target_search}}
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "mini_evollm"))
import mini_task  # noqa: E402


@lru_cache(maxsize=8)
def _split(split: str) -> mini_task.MiniTaskEvaluator:
    return mini_task.MiniTaskEvaluator(split)


def target(model, tokenizer, split: str = "target_search", items: Sequence[int] | None = None
           ) -> dict[str, float] | dict[str, list[float]]:
    """The mini task's metrics (``accuracy``: language-gated; ``val``; ``lang``) on ``split``.

    Args:
        model, tokenizer: the candidate.
        split: a mini_task split name.
        items: positions in the split to score (None: every item, returning the means).

    Returns:
        With ``items``: {metric: one value (1.0 / 0.0) per position}; without: {metric: mean over the split}.
    """
    ev = _split(split)
    positions = list(range(len(ev.items))) if items is None else list(items)
    outputs = mini_task.generate_greedy(model, tokenizer, [ev.prompts[i] for i in positions]) if positions else []
    per_item: dict[str, list[float]] = {"accuracy": [], "val": [], "lang": []}
    for i, out in zip(positions, outputs):
        one = mini_task.score([ev.items[i]], [out], ev.kind, ev.lang)
        for k in per_item:
            per_item[k].append(one[k])
    if items is not None:
        return per_item
    n = max(len(positions), 1)
    return {k: sum(v) / n for k, v in per_item.items()}


def _n_items(split: str = "target_search", **_: object) -> int:
    return len(_split(split).items)


target.metric_names = ("accuracy", "val", "lang")  # type: ignore[attr-defined]
target.n_items = _n_items  # type: ignore[attr-defined]
