"""model_stock (Jang et al. 2024), mergekit 0.1.5 semantics.

offsets_i = theta_i - base; cos = mean over pairs i < j of the cosine between offsets (clamped to [-1, 1],
norm product clamped to >= 1e-6); t = N cos / (1 + (N - 1) cos) with N the number of non-base models
(t = 0 where |1 + (N - 1) cos| < 1e-6); result = t * mean_i theta_i + (1 - t) * base.
``filter_wise``: one cosine per row (output filter) instead of one for the whole tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_model_stock(base: torch.Tensor, others: Sequence[torch.Tensor], out: torch.Tensor, *,
                      filter_wise: bool = False) -> torch.Tensor:
    """out = t * mean_i others_i + (1 - t) * base (see the module docstring); returns ``out``.

    ``others`` (at least two) and ``out`` have ``base``'s shape and dtype; ``filter_wise``: one t per row."""
    shape = base.shape
    w0 = base
    ws = list(others)
    if filter_wise:
        if w0.dim() == 1:
            w0 = w0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w0 = w0.reshape(-1)
        ws = [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norm_product = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cosines.append(((oa * ob).sum(dim=-1) / norm_product.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(ws)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), (count * cos) / safe)
    average = sum(ws) / count
    out.copy_((t * average + (1 - t) * w0).reshape(shape))
    return out
