"""ram and ramplus_tl: Reinforced Agent Merging (https://arxiv.org/abs/2601.13572), mergekit 0.1.5 semantics.

Task vectors ``tau_i = theta_i - base``; an element of ``tau_i`` *contributes* when ``|tau_i| > epsilon``.
Per element, ``c`` = the number of contributing models.

- ``ram``: elements one model alone changed keep that model's value; elements several changed get their
  contributors' mean: ``base + sum_i [contributes_i] tau_i / max(c, 1)``.
- ``ramplus_tl`` (tensor-local RAM+): each model's uniquely changed elements are further scaled by
  ``lambda_i = 1 + r * clamp(rho_i, 0, alpha)``, ``rho_i`` = (its contributing elements shared with another
  model) / (its contributing elements no other model changed, at least ``epsilon``): a model whose changes
  mostly overlap others' is trusted more where it is alone.

mergekit's operations in its order: in bfloat16, ``lambda`` is float32, so ramplus_tl's sum is float32 (and
mergekit returns float32 tensors; we round them to the compute dtype like every other method).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_ram(base: torch.Tensor, deltas: Sequence[torch.Tensor], out: torch.Tensor, *, epsilon: float = 1e-5,
              plus: bool = False, r: float = 0.1, alpha: float = 0.2) -> torch.Tensor:
    """RAM (``plus=False``) or tensor-local RAM+ (``plus=True``) of the task vectors ``deltas``, into ``out``.

    Args:
        base: the base tensor, in the compute dtype.
        deltas: the task vectors ``theta_i - base`` (each of ``base``'s shape and dtype); none: the base.
        out: the result buffer (same shape; the compute dtype).
        epsilon: |delta| above which an element contributes.
        plus: scale uniquely changed elements by lambda_i (ramplus_tl).
        r, alpha: RAM+'s rescaling strength and the cap on the overlap ratio.

    Returns:
        ``out``.
    """
    if not deltas:
        out.copy_(base)
        return out
    tv = torch.stack(list(deltas), dim=0).view(len(deltas), -1)
    contributes = tv.abs() > epsilon
    count = contributes.sum(dim=0, keepdim=True)
    shared = count > 1
    alone = count == 1
    kept = tv * contributes
    alone_part = kept * alone
    if plus:
        overlap_ratio = (contributes & shared).sum(dim=1) / (contributes & alone).sum(dim=1).clamp(min=epsilon)
        scale = 1 + r * overlap_ratio.clamp(min=0, max=alpha)
        alone_part = alone_part * scale.unsqueeze(-1)
    merged = (alone_part + kept * shared / count.clamp(min=1)).sum(dim=0, keepdim=True)
    out.copy_(base + merged.reshape_as(base))
    return out
