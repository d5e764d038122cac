"""The generalized task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``).

Per tensor, with ``delta_i = theta_i - base``:

1. sparsify each delta (magnitude / random / outliers / della, see ``sparsify.py``), rescaling if asked;
2. multiply by its weight: weights are applied BEFORE sign election, as mergekit does;
3. with sign consensus (ties, dare_ties, breadcrumbs_ties, della): the majority sign is the sign of the
   weighted SUM (``>= 0`` counts as +); each delta keeps only the elements that agree with it;
   ``normalize`` divides element-wise by the sum of the agreeing weights (0 -> 1);
   without consensus: the weighted deltas are summed and ``normalize`` divides by the sum of the weights
   (|sum| < 1e-8 -> 1);
4. multiply by ``lambda`` and add to the base.

The kernel writes into a caller-provided output buffer and takes its temporaries from a ``Workspace``, so the
in-memory engine can run it thousands of times without allocating tensor-sized memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.sparsify import DeltaStats, sparsify_into
from evomerge.methods.workspace import Workspace


def merge_task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], stats: Sequence[DeltaStats | None],
                          out: torch.Tensor, *, weights: Sequence[float], densities: Sequence[float],
                          sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
                          lambda_: float = 1.0, rescale_mode: str = "l1", gammas: Sequence[float] | None = None,
                          epsilons: Sequence[float] | None = None, generator: torch.Generator | None = None,
                          ws: Workspace) -> torch.Tensor:
    """out = base + lambda * combine(weight_i * sparsify(delta_i)); ``out`` has base's shape and dtype."""
    flat_out = out.view(-1)
    flat_base = base.reshape(-1)
    count = len(deltas)
    if count == 0:
        flat_out.copy_(flat_base)
        return out
    numel = flat_base.numel()
    dtype = base.dtype

    if sparsify is None and not consensus:
        # Plain task arithmetic: no per-model temporaries needed.
        torch.mul(deltas[0].reshape(-1), weights[0], out=flat_out)
        for delta, weight in zip(deltas[1:], weights[1:]):
            flat_out.add_(delta.reshape(-1), alpha=weight)
        _finish(flat_out, flat_base, weights, normalize, lambda_, dtype)
        return out

    scaled = ws.get("gta_scaled", (count, numel), dtype)
    for i, delta in enumerate(deltas):
        row = scaled[i]
        if sparsify is None:
            row.copy_(delta.reshape(-1))
        else:
            sparsify_into(delta, stats[i], sparsify, row, density=densities[i], rescale=rescale,
                          rescale_mode=rescale_mode, gamma=gammas[i] if gammas else 0.0,
                          epsilon=epsilons[i] if epsilons else 0.0, generator=generator, ws=ws)
        row.mul_(weights[i])

    if not consensus:
        torch.sum(scaled, dim=0, out=flat_out)
        _finish(flat_out, flat_base, weights, normalize, lambda_, dtype)
        return out

    # Sum-based sign election: majority = +1 where sum_i w_i delta_i >= 0, else -1.
    majority = ws.get("gta_majority", (numel,), dtype)
    torch.sum(scaled, dim=0, out=majority)
    positive = ws.get("gta_positive", (numel,), torch.bool)
    torch.ge(majority, 0, out=positive)
    torch.mul(positive, 2, out=majority)
    majority.sub_(1)
    # agree_i: sign(w_i delta_i) == majority (zeros agree with neither sign).
    product = ws.get("gta_product", (count, numel), dtype)
    torch.mul(scaled, majority, out=product)
    agree = ws.get("gta_agree", (count, numel), torch.bool)
    torch.gt(product, 0, out=agree)
    torch.mul(scaled, agree, out=product)
    torch.sum(product, dim=0, out=flat_out)
    if normalize:
        weight_col = torch.tensor(list(weights), dtype=dtype, device=base.device).unsqueeze(1)
        torch.mul(agree, weight_col, out=product)
        divisor = ws.get("gta_divisor", (numel,), dtype)
        torch.sum(product, dim=0, out=divisor)
        divisor.masked_fill_(divisor == 0, 1)
        flat_out.div_(divisor)
    if lambda_ != 1:
        flat_out.mul_(lambda_)
    flat_out.add_(flat_base)
    return out


def _finish(flat_out: torch.Tensor, flat_base: torch.Tensor, weights: Sequence[float], normalize: bool,
            lambda_: float, dtype: torch.dtype) -> None:
    if normalize:
        divisor = float(torch.tensor(list(weights), dtype=dtype).sum())
        if abs(divisor) < 1e-8:
            divisor = 1.0
        flat_out.div_(divisor)
    if lambda_ != 1:
        flat_out.mul_(lambda_)
    flat_out.add_(flat_base)
