"""arcee_fusion: take the other model's value only where it changed the most, mergekit 0.1.5 semantics.

Arcee Fusion (Arcee AI, https://arcee.ai; mergekit's ``arcee_fusion``). For base ``a`` and the other model ``b``
(one tensor, the last axis is the "row"):

- ``p = softmax(b) + 1e-8``, ``q = softmax(a) + 1e-8`` along the last axis; ``kl = sum p log(p / q)`` per row;
- importance ``I = |b - a| * kl`` (each element's change, weighted by its row's divergence);
- threshold ``T = median + 1.5 (Q3 - Q1)`` of ``I``, where the quartiles are order statistics
  ``sorted(I)[floor(q (n - 1))]`` for q = 0.25, 0.5, 0.75 (no interpolation);
- result ``a + (b - a) * [I >= T]``.

One deliberate difference: mergekit estimates the quartiles from 1,000,000 elements drawn with replacement from
torch's global random stream when a tensor has more elements; we always use the exact order statistics (numpy's
selection, linear time), so the result is the method's definition and does not depend on random state. On
tensors up to 1,000,000 elements both are identical. Like mergekit, the 0/1 mask is float32, so with bfloat16
inputs ``a + (b - a) * mask`` is evaluated in float32 before it is rounded to the output dtype.
"""

from __future__ import annotations

import numpy as np
import torch

PROB_EPS = 1e-8
QUARTILES = (0.25, 0.5, 0.75)
OUTLIER_FACTOR = 1.5


def fusion_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|other - base|`` times the row-wise KL divergence of softmax(other) from softmax(base); input shape/dtype."""
    change = (other - base).abs()
    p = torch.softmax(other, dim=-1) + PROB_EPS
    q = torch.softmax(base, dim=-1) + PROB_EPS
    divergence = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return change * divergence


def quartile_values(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Q1, median, Q3) of all elements: ``sorted[floor(q (n - 1))]``, as 0-dim tensors of ``values``' dtype.

    The positions are computed in float32 as mergekit computes them; the values are exact order statistics.
    """
    flat = values.reshape(-1)
    positions = (torch.tensor(QUARTILES) * (flat.numel() - 1)).long().tolist()
    host = flat.detach().cpu()
    host = host.float() if host.dtype in (torch.bfloat16, torch.float16) else host
    picked = np.partition(host.numpy(), positions)[positions]
    as_tensor = torch.from_numpy(np.ascontiguousarray(picked)).to(device=values.device, dtype=values.dtype)
    return as_tensor[0], as_tensor[1], as_tensor[2]


def merge_arcee_fusion(base: torch.Tensor, other: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Arcee Fusion of ``other`` into ``base`` (see the module docstring), written to ``out``.

    Args:
        base, other: tensors of one shape (at least 1-D), in the compute dtype.
        out: the result buffer (same shape; the compute dtype).

    Returns:
        ``out``.
    """
    importance = fusion_importance(base, other)
    q1, median, q3 = quartile_values(importance)
    threshold = median + OUTLIER_FACTOR * (q3 - q1)
    keep = (importance >= threshold).to(torch.float32)
    out.copy_(base + (other - base) * keep)
    return out
