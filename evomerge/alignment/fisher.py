"""Fisher merging (Matena & Raffel 2022): a per-parameter weighted average, weighted by the diagonal Fisher.

    theta* = sum_i w_i F_i theta_i / sum_i w_i F_i,   F = E_x sum_c p(c|x) (d log p(c|x) / d theta)^2

What is exact and what is estimated:

- Plain torch classifiers (``classifier_fisher``), ``mode="exact"``: for every example, the Jacobian of all C
  log-probabilities is taken (torch.func, vmapped over the batch) and sum_c p(c|x) J_c^2 is accumulated: the
  true diagonal Fisher of the model's own predictive distribution, exact per example, no sampling.
  ``mode="empirical"``: the squared per-example gradient of log p(y|x) at the data label y.
  ``mode="sampled"``: y drawn from p(.|x), ``n_samples`` draws per example (unbiased Monte Carlo of "exact").
- Hugging Face causal LMs (``causal_lm_fisher``): the "classes" are the next tokens at every position. The
  exact sum over a vocabulary of tens of thousands of tokens at every position would need one backward pass
  per (position, token), so it is estimated: ``mode="sampled"`` draws one token per position from the model's
  own p(.|prefix) and squares the gradient of the summed log-probs. Each sampled token's score has zero mean
  given its (fixed, data) prefix and the draws are independent, so the cross terms vanish in expectation: the
  squared gradient is an unbiased estimate of the sum over positions (and over the sequences in a batch) of the
  exact per-position Fisher. ``n_samples`` draws are averaged; ``batch_size=1`` lowers the variance.
  ``mode="empirical"`` uses the text's actual next tokens, one sequence per backward pass (a sequence-level
  empirical Fisher: cross terms between positions do not vanish there).

Options: ``floor`` clamps every Fisher entry from below (so a parameter no model's data touches is a plain
average rather than 0/0); ``normalize=True`` divides each model's Fisher by its mean over all parameters, so a
model whose gradients are larger overall does not dominate everywhere. Tensors without a Fisher (buffers such
as BatchNorm statistics, frozen parameters) are averaged with the model weights.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap
from tqdm.auto import tqdm

FISHER_MODES = ("exact", "empirical", "sampled")


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def classifier_fisher(model: nn.Module, batches: Iterable[Any], mode: str = "exact", n_samples: int = 1,
                      chunk_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of a classifier (``model(x) -> logits [N, C]``), averaged over the examples.

    ``batches`` yields ``x`` or ``(x, y)`` (labels needed for ``mode="empirical"``). The model is used in its
    current mode (call ``.eval()`` first so BatchNorm uses running statistics).
    """
    if mode not in FISHER_MODES:
        raise ValueError(f"unknown Fisher mode {mode!r}; choose from {FISHER_MODES}")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    fisher = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in params.items()}
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    count = 0

    def log_probs(p, x):
        """Log-probabilities over the classes of one example ``x`` under parameters ``p``."""
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return torch.log_softmax(out.float(), dim=-1).squeeze(0)

    def log_prob_of(p, x, y):
        """Log-probability of class ``y`` for one example ``x`` under parameters ``p``."""
        return log_probs(p, x).gather(0, y.reshape(1)).squeeze(0)

    per_example_jac = vmap(jacrev(log_probs), in_dims=(None, 0))
    per_example_grad = vmap(torch.func.grad(log_prob_of), in_dims=(None, 0, 0))
    for batch in batches:
        x_all, y_all = _split_batch(batch)
        for start in range(0, x_all.shape[0], chunk_size):
            x = x_all[start:start + chunk_size]
            count += x.shape[0]
            if mode == "exact":
                with torch.no_grad():
                    prob = torch.softmax(functional_call(model, (params, buffers), (x,)).float(), dim=-1)
                jac = per_example_jac(params, x)  # name -> [N, C, *shape]
                for k, j in jac.items():
                    w = prob.reshape(prob.shape + (1,) * (j.dim() - 2))
                    fisher[k] += (w * j.float() ** 2).sum(dim=(0, 1))
                continue
            if mode == "empirical":
                if y_all is None:
                    raise ValueError("empirical Fisher needs labels: batches must yield (x, y)")
                draws = [y_all[start:start + chunk_size]]
            else:
                with torch.no_grad():
                    prob = torch.softmax(functional_call(model, (params, buffers), (x,)).float(), dim=-1)
                draws = [torch.multinomial(prob, 1, generator=gen).squeeze(1) for _ in range(n_samples)]
            for y in draws:
                grads = per_example_grad(params, x, y)
                for k, g in grads.items():
                    fisher[k] += g.float().pow(2).sum(0) / len(draws)
    return {k: v / max(count, 1) for k, v in fisher.items()}


def causal_lm_fisher(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], mode: str = "sampled",
                     n_samples: int = 1, seed: int = 0, progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of a Hugging Face causal LM over next-token predictions, per predicted token.

    ``batches`` yields tokenizer outputs (``input_ids``, ``attention_mask``). See the module docstring for what
    is estimated. Returns the average over predicted (non-padding) positions.
    """
    if mode not in ("sampled", "empirical"):
        raise ValueError(f"causal LM Fisher supports mode 'sampled' or 'empirical', not {mode!r} (the exact sum "
                         f"over the vocabulary at every position is not computed)")
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    fisher = {k: torch.zeros_like(p, dtype=torch.float32) for k, p in params.items()}
    gen = torch.Generator(device=next(iter(params.values())).device).manual_seed(seed)
    positions = 0
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(list(batches), desc="fisher", disable=not progress, leave=False):
            ids = batch["input_ids"]
            mask = batch.get("attention_mask", torch.ones_like(ids))
            rows = [slice(i, i + 1) for i in range(ids.shape[0])] if mode == "empirical" else [slice(None)]
            for rs in rows:
                sub_ids, sub_mask = ids[rs], mask[rs]
                valid = (sub_mask[:, 1:] * sub_mask[:, :-1]).bool()
                n_valid = int(valid.sum())
                if n_valid == 0:
                    continue
                positions += n_valid
                draws = 1 if mode == "empirical" else n_samples
                for _ in range(draws):
                    model.zero_grad(set_to_none=True)
                    logits = model(input_ids=sub_ids, attention_mask=sub_mask).logits[:, :-1].float()
                    logp = torch.log_softmax(logits, dim=-1)
                    if mode == "empirical":
                        target = sub_ids[:, 1:]
                    else:
                        with torch.no_grad():
                            probs = logp.exp().reshape(-1, logp.shape[-1])
                            target = torch.multinomial(probs, 1, generator=gen).reshape(logp.shape[:2])
                    picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                    (picked * valid).sum().backward()
                    for k, p in params.items():
                        if p.grad is not None:
                            fisher[k] += p.grad.float().pow(2) / draws
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {k: v / max(positions, 1) for k, v in fisher.items()}


def fisher_merge(states: Sequence[dict[str, torch.Tensor]], fishers: Sequence[dict[str, torch.Tensor]],
                 weights: Sequence[float] | None = None, floor: float = 1e-8, normalize: bool = False,
                 ) -> dict[str, torch.Tensor]:
    """sum_i w_i F_i theta_i / sum_i w_i F_i per parameter (float32 math, result in the first model's dtypes)."""
    n = len(states)
    weights = list(weights) if weights is not None else [1.0] * n
    if len(weights) != n or len(fishers) != n:
        raise ValueError("states, fishers and weights must have the same length")
    scales = [1.0] * n
    if normalize:
        for i, f in enumerate(fishers):
            total = sum(float(t.double().sum()) for t in f.values())
            numel = sum(t.numel() for t in f.values())
            scales[i] = numel / total if total > 0 else 1.0
    wsum = sum(weights)
    merged: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if not torch.is_floating_point(ref):
            merged[name] = ref.clone()
            continue
        if all(name in f for f in fishers):
            num = torch.zeros(ref.shape, dtype=torch.float32)
            den = torch.zeros(ref.shape, dtype=torch.float32)
            for st, f, w, s in zip(states, fishers, weights, scales):
                fw = (f[name].float() * s).clamp_min(floor) * w
                num += fw * st[name].float()
                den += fw
            merged[name] = (num / den).to(ref.dtype)
        else:
            acc = torch.zeros(ref.shape, dtype=torch.float32)
            for st, w in zip(states, weights):
                acc += w * st[name].float()
            merged[name] = (acc / wsum).to(ref.dtype)
    return merged
