"""Evaluators and experiment builders for the search tests (loaded through the custom evaluator spec).

Every evaluator here is a real function of the candidate model: scores come from the model's logits or
weights, never from a table. Side effects that the tests need (a worker that dies, a slow evaluation) are
real too: a SIGKILL of the worker's own process, a sleep.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def _logit_score(model) -> float:
    gen = torch.Generator().manual_seed(7)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(4, vocab, (2, 8), generator=gen)
    with torch.inference_mode():
        logits = model(ids.to(next(model.parameters()).device)).logits.float()
    return float(logits.std())


def logit_std(model, tokenizer, sleep: float = 0.0) -> dict[str, float]:
    """A cheap deterministic score of the candidate (the spread of its logits); optional fixed extra cost."""
    if sleep:
        time.sleep(sleep)
    return {"std": _logit_score(model)}


logit_std.metric_names = ("std",)


def zero_cost(model, tokenizer) -> dict[str, float]:
    """As close to free as an evaluator gets: one weight read (for the loop-overhead benchmark)."""
    return {"w": float(model.get_input_embeddings().weight[5, 0])}


zero_cost.metric_names = ("w",)


def fixed_cost(model, tokenizer, seconds: float = 0.2) -> dict[str, float]:
    """A fixed cost per evaluation, in wall time (worker-utilisation benchmark)."""
    time.sleep(seconds)
    return {"w": float(model.get_input_embeddings().weight[5, 0])}


fixed_cost.metric_names = ("w",)


def _embedding(path: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(Path(path) / "model.safetensors"), framework="pt") as f:
        return f.get_tensor("model.embed_tokens.weight").float()


def nan_or_raise(model, tokenizer, base: str, source: str, nan_above: float = 1.5, oom_below: float = 0.9,
                 raise_below: float = 0.7) -> dict[str, float]:
    """A real property of the candidate decides: how far its embedding moved from the base's, relative to
    one source's task vector. Far: the score is NaN; near: the evaluator runs out of memory (a real failed
    allocation); nearer: it raises; in between: a score."""
    base_e = _embedding(base)
    delta = model.get_input_embeddings().weight.detach().float() - base_e
    moved = float(delta.norm() / (_embedding(source) - base_e).norm())
    if moved > nan_above:
        return {"std": float("nan")}
    if moved < raise_below:
        raise RuntimeError(f"candidate rejected by the evaluator (moved {moved:.3f})")
    if moved < oom_below:
        torch.empty(2**62, dtype=torch.uint8)  # no machine has 4 EiB: the allocator fails for real
    return {"std": _logit_score(model)}


nan_or_raise.metric_names = ("std",)


def die_on_token(model, tokenizer, tokens: str) -> dict[str, float]:
    """SIGKILL this worker mid-evaluation while the folder ``tokens`` holds token files: each death consumes
    one token (claimed by an atomic rename, so two workers never consume the same one)."""
    for token in sorted(Path(tokens).glob("token*")):
        try:
            os.rename(token, token.with_name("used-" + token.name))
        except FileNotFoundError:
            continue
        os.kill(os.getpid(), signal.SIGKILL)
    return {"std": _logit_score(model)}


die_on_token.metric_names = ("std",)


def evaluator(function: str, **kwargs) -> dict:
    """An experiment's evaluator spec for one of the functions above."""
    return {"type": "custom", "function": f"{HERE}:{function}", "kwargs": kwargs}


def _item_batch(positions: list[int], vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item i: 6 token ids and a pair of candidate next tokens, all drawn from a generator seeded with (seed, i)."""
    ids, pairs = [], []
    for i in positions:
        gen = torch.Generator().manual_seed(seed * 100_003 + i)
        ids.append(torch.randint(4, vocab, (6,), generator=gen))
        pairs.append(torch.randint(4, vocab, (2,), generator=gen))
    return torch.stack(ids), torch.stack(pairs)


def pairwise(model, tokenizer, items=None, n: int = 60, seed: int = 0) -> dict:
    """A per-item accuracy (``fitness: race | minibatch``): item i is right when the candidate's next-token logit
    prefers the item's first token over its second one. Without ``items``: the mean over all ``n`` items."""
    positions = list(range(n)) if items is None else list(items)
    if not positions:
        return {"acc": []}
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, pairs = _item_batch(positions, vocab, seed)
    with torch.inference_mode():
        last = model(ids.to(next(model.parameters()).device)).logits[:, -1].float().cpu()
    right = (last.gather(1, pairs[:, :1]) > last.gather(1, pairs[:, 1:])).squeeze(1)
    values = [float(v) for v in right]
    return {"acc": values} if items is not None else {"acc": sum(values) / len(values)}


pairwise.metric_names = ("acc",)
pairwise.n_items = lambda n=60, **_: n


def pairwise_margin(model, tokenizer, items=None, n: int = 60, seed: int = 0) -> dict:
    """Like ``pairwise``, but each item's value is the logit margin itself (any real number, not in [0, 1])."""
    positions = list(range(n)) if items is None else list(items)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids, pairs = _item_batch(positions, vocab, seed)
    with torch.inference_mode():
        last = model(ids.to(next(model.parameters()).device)).logits[:, -1].float().cpu()
    values = [float(v) for v in (last.gather(1, pairs[:, :1]) - last.gather(1, pairs[:, 1:])).squeeze(1)]
    return {"margin": values} if items is not None else {"margin": sum(values) / len(values)}


pairwise_margin.metric_names = ("margin",)
pairwise_margin.n_items = lambda n=60, **_: n
