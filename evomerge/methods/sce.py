"""sce: Select, Calculate, Erase (FuseLLM's SCE, https://arxiv.org/abs/2408.07990), mergekit 0.1.5 semantics.

Task vectors ``tau_i = theta_i - base`` (stacked: ``[N, *shape]``):

- **select** (``select_topk < 1``): keep, in every task vector, the elements at the
  ``k = int(count_nonzero(var) * select_topk)`` positions of largest variance across the models (``var`` with
  ``1/N``; ``k`` computed in float32 like mergekit; ties at the cut as ``torch.topk`` breaks them);
  ``select_topk <= 0`` keeps nothing;
- **calculate**: one weight per model, ``mean(tau_i^2) / sum_j mean(tau_j^2)`` (``1/N`` each when that sum is
  below 1e-6);
- **erase**: elect each element's sign by the sign of ``sum_i tau_i`` (``>= 0`` is +) and drop the elements of
  the other sign (and zeros);
- result ``base + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)`` with ``m_i`` the erase mask.

``int8_mask`` only changes the masks' storage, not the result. Computed in the compute dtype with mergekit's
operations in its order, so bfloat16 results round alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

UNIFORM_BELOW = 1e-6
MIN_DIVISOR = 1e-6


def variance_mask(tv: torch.Tensor, select_topk: float, mask_dtype: torch.dtype) -> torch.Tensor:
    """0/1 mask of ``tv.shape[1:]``: the positions of the largest across-model variance (see module docstring)."""
    if select_topk <= 0:
        return torch.zeros_like(tv[0], dtype=mask_dtype)
    if select_topk >= 1:
        return torch.ones_like(tv[0], dtype=mask_dtype)
    variance = torch.var(tv, dim=0, unbiased=False)
    k = int(torch.count_nonzero(variance) * select_topk)
    mask = torch.zeros_like(variance, dtype=mask_dtype)
    if k == 0:
        return mask
    _, top = torch.topk(variance.abs().view(-1), k=k, largest=True)
    mask.view(-1)[top] = 1
    return mask


def model_weights(tv: torch.Tensor) -> torch.Tensor:
    """``[N]``: each task vector's mean square over their sum (uniform when the sum is below 1e-6)."""
    energy = tv.square().reshape(tv.shape[0], -1).mean(dim=1)
    total = torch.sum(energy).item()
    if abs(total) < UNIFORM_BELOW:
        return torch.ones_like(energy) / energy.shape[0]
    return energy / total


def merge_sce(base: torch.Tensor, deltas: Sequence[torch.Tensor], out: torch.Tensor, *, select_topk: float = 1.0,
              int8_mask: bool = False) -> torch.Tensor:
    """SCE of the task vectors ``deltas`` onto ``base``, written to ``out``.

    Args:
        base: the base tensor, in the compute dtype.
        deltas: the task vectors ``theta_i - base``; none: the base.
        out: the result buffer (same shape; the compute dtype).
        select_topk: the fraction of (nonzero-variance) positions kept by the select step.
        int8_mask: store masks as int8 (no effect on the result).

    Returns:
        ``out``.
    """
    if not deltas:
        out.copy_(base)
        return out
    mask_dtype = torch.int8 if int8_mask else base.dtype
    tv = torch.stack(list(deltas), dim=0)
    if select_topk < 1:
        tv = tv * variance_mask(tv, select_topk, mask_dtype).unsqueeze(0)
    elected = (tv.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    agrees = tv.sign().to(mask_dtype) == elected
    weights = model_weights(tv).view((tv.shape[0],) + (1,) * (tv.dim() - 1))
    kept_weights = weights * agrees
    merged = (tv * kept_weights).sum(dim=0) / torch.sum(kept_weights, dim=0).clamp(min=MIN_DIVISOR)
    out.copy_(base + merged)
    return out
