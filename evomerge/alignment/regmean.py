"""RegMean (Jin et al. 2023): merge each linear layer so it best reproduces every model's outputs on its own inputs.

For a linear layer y = x W^T, with model i's inputs X_i stacked as rows, the merged W minimising
sum_i ||X_i W^T - X_i W_i^T||^2 is

    W^T = (sum_i G_i)^-1 sum_i G_i W_i^T,      G_i = X_i^T X_i,

the least-squares solution on the concatenated inputs. ``alpha`` scales the off-diagonal entries of every G_i
(alpha = 1: plain RegMean; alpha = 0: each input feature weighted by its energy, no cross terms; the RegMean
paper finds values a little below 1 best for transformers). When sum_i G_i is singular or ill-conditioned a
ridge of ``ridge * mean(diag)`` is added that pulls towards the plain average (so directions no calibration
input spans are averaged, and identical models merge to themselves). Every other tensor (biases, norms,
embeddings) is a weighted average.

Task heads: list them in ``head_names`` (module names) and pick ``heads``: "merge" (RegMean like any linear
layer), "average" (plain average) or "keep" (copied from model ``head_source``; ``with_task_head`` swaps in
another model's head, which is how each task keeps its own head over the shared merged body).

Memory: a Gram is in_features^2 float64 numbers per linear layer and model (for a 7B Llama, mostly the
11008^2 down_proj inputs: about 1 GB per layer), so RegMean on large models needs that much host memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from evomerge.alignment.activation_matching import run_model

HEAD_MODES = ("merge", "average", "keep")


@torch.no_grad()
def linear_input_grams(model: nn.Module, batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] = run_model,
                       skip: Sequence[str] = (), progress: bool = False) -> dict[str, torch.Tensor]:
    """Module name -> G = X^T X (float64) of every nn.Linear's inputs over all ``batches``.

    For tokenizer batches (dicts with an ``attention_mask``) padding positions are left out.
    """
    grams: dict[str, torch.Tensor] = {}
    current: dict[str, Any] = {}

    def hook(name):
        """A forward pre-hook accumulating the Gram matrix of layer ``name``'s inputs."""
        def fn(module, args):
            """Add ``x^T x`` of this call's (unpadded) inputs to the layer's Gram."""
            x = args[0].detach()
            mask = current.get("mask")
            if mask is not None and x.dim() == 3 and mask.shape == x.shape[:2]:
                x = x[mask.bool()]
            x = x.reshape(-1, x.shape[-1]).double()
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n not in skip]
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="regmean grams", disable=not progress, leave=False):
            current["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: g.cpu() for name, g in grams.items()}


def _solve(gram_sum: torch.Tensor, rhs: torch.Tensor, ridge: float, fallback: torch.Tensor) -> torch.Tensor:
    """(sum G)^-1 rhs; when the Gram is singular or ill-conditioned, a ridge pulling towards ``fallback``.

    The ridge solves (G + lam I) W^T = rhs + lam fallback with lam = ``ridge * mean(diag G)``: in input
    directions the data never visits, the merged weights are the plain average rather than zero.
    """
    chol, info = torch.linalg.cholesky_ex(gram_sum)
    if int(info) == 0:
        diag = chol.diagonal()
        # (max/min of the Cholesky diagonal)^2 is a cheap lower bound of the condition number
        if float(diag.min()) > 0 and float((diag.max() / diag.min()) ** 2) < 1e10:
            return torch.cholesky_solve(rhs, chol)
    lam = ridge * float(gram_sum.diagonal().mean().clamp_min(1e-12))
    eye = torch.eye(gram_sum.shape[0], dtype=gram_sum.dtype)
    return torch.linalg.solve(gram_sum + lam * eye, rhs + lam * fallback)


def regmean_merge(states: Sequence[dict[str, torch.Tensor]], grams: Sequence[dict[str, torch.Tensor]],
                  alpha: float = 1.0, ridge: float = 1e-6, weights: Sequence[float] | None = None,
                  head_names: Sequence[str] = (), heads: str = "merge", head_source: int = 0,
                  ) -> dict[str, torch.Tensor]:
    """Merged state dict: RegMean for every Linear weight with a Gram (``grams[i][module]``), average elsewhere.

    ``weights`` scale each model's Gram (and its share of the plain averages); default all 1.
    """
    if heads not in HEAD_MODES:
        raise ValueError(f"unknown heads mode {heads!r}; choose from {HEAD_MODES}")
    n = len(states)
    weights = list(weights) if weights is not None else [1.0] * n
    wsum = sum(weights)
    head_params = {f"{h}.{suffix}" for h in head_names for suffix in ("weight", "bias")}
    regmean_weights = {f"{m}.weight": m for m in grams[0] if all(m in g for g in grams)}
    if heads != "merge":
        regmean_weights = {k: m for k, m in regmean_weights.items() if k not in head_params}
    merged: dict[str, torch.Tensor] = {}
    for name, ref in states[0].items():
        if heads == "keep" and name in head_params:
            merged[name] = states[head_source][name].clone()
        elif name in regmean_weights and ref.dim() == 2:
            module = regmean_weights[name]
            gram_sum = None
            rhs = None
            for st, g, w in zip(states, grams, weights):
                gi = g[module].double()
                if alpha != 1.0:
                    gi = alpha * gi + (1.0 - alpha) * torch.diag(gi.diagonal())
                gi = w * gi
                term = gi @ st[name].double().T
                gram_sum = gi if gram_sum is None else gram_sum + gi
                rhs = term if rhs is None else rhs + term
            average = sum(w * st[name].double().T for st, w in zip(states, weights)) / wsum
            assert gram_sum is not None and rhs is not None and isinstance(average, torch.Tensor)  # n >= 1 models
            merged[name] = _solve(gram_sum, rhs, ridge, average).T.contiguous().to(ref.dtype)
        elif not torch.is_floating_point(ref):
            merged[name] = ref.clone()
        else:
            acc = torch.zeros(ref.shape, dtype=torch.float64)
            for st, w in zip(states, weights):
                acc += w * st[name].double()
            merged[name] = (acc / wsum).to(ref.dtype)
    return merged


def with_task_head(merged: dict[str, torch.Tensor], task_state: dict[str, torch.Tensor],
                   head_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``merged`` with the head tensors of ``head_names`` taken from ``task_state`` (a task keeps its own head)."""
    out = dict(merged)
    for h in head_names:
        for suffix in ("weight", "bias"):
            key = f"{h}.{suffix}"
            if key in task_state:
                out[key] = task_state[key].clone()
    return out
