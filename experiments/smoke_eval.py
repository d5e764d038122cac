"""Objectives for the smoke experiment: how close a candidate's logits come to a hidden target merge.

The smoke run builds a tiny family (`models: {build: ...}`: base + seeded perturbations, see evomerge.tiny).
This module rebuilds the same family in memory from the same seeds and defines the target
``base + 0.9 tau_1 + 0.3 tau_2`` (tau_k = model_k - base). A candidate scores the negative mean squared
error between its logits and the target's on fixed token sequences, so the search has a real optimum to find
(weights that do not sum to 1, the kind of amplification the paper found) and scores are cheap to compute.
"""

from __future__ import annotations

import functools

import torch

TARGET_WEIGHTS = (0.9, 0.3)
OTHER_WEIGHTS = (0.2, 1.0)


@functools.lru_cache(maxsize=4)
def _target_logits(weights: tuple[float, ...], arch: str, seed: int, scale: float, vocab_size: int,
                   n_seq: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    from evomerge import tiny

    base = tiny.make_model(arch, seed=seed, vocab_size=vocab_size)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    target = {k: v.clone() for k, v in base_state.items()}
    for i, w in enumerate(weights, 1):
        base.load_state_dict(base_state)
        tiny.perturb_(base, scale, seed=seed * 1000 + i)
        for k, v in base.state_dict().items():
            target[k] += w * (v - base_state[k])
    base.load_state_dict(target)
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(4, vocab_size, (n_seq, seq_len), generator=gen)
    with torch.inference_mode():
        return ids, base(ids).logits.float()


def _mse(model, tokenizer, weights, arch, seed, scale, n_seq, seq_len) -> float:
    ids, target = _target_logits(tuple(weights), arch, seed, scale, len(tokenizer), n_seq, seq_len)
    device = next(model.parameters()).device
    with torch.inference_mode():
        logits = model(ids.to(device)).logits.float().cpu()
    return float(((logits - target) ** 2).mean())


def logit_match(model, tokenizer, arch: str = "llama", seed: int = 0, scale: float = 0.05, n_seq: int = 4,
                seq_len: int = 16) -> dict[str, float]:
    """``mse``: to the target merge (lower is better); ``neg_mse``: its negative (higher is better)."""
    mse = _mse(model, tokenizer, TARGET_WEIGHTS, arch, seed, scale, n_seq, seq_len)
    return {"mse": mse, "neg_mse": -mse}


logit_match.metric_names = ("mse", "neg_mse")


def two_targets(model, tokenizer, arch: str = "llama", seed: int = 0, scale: float = 0.05, n_seq: int = 4,
                seq_len: int = 16) -> dict[str, float]:
    """Two conflicting objectives (distance to two different merges) for multi-objective / Pareto runs."""
    return {"mse_a": _mse(model, tokenizer, TARGET_WEIGHTS, arch, seed, scale, n_seq, seq_len),
            "mse_b": _mse(model, tokenizer, OTHER_WEIGHTS, arch, seed, scale, n_seq, seq_len)}


two_targets.metric_names = ("mse_a", "mse_b")
