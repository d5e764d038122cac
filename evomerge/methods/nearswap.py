"""nearswap: take the other model's value where it lies near the base's, mergekit 0.1.5 semantics.

Per element, with ``d = |base - other|`` (clamped below at 1e-6), the other model's share is
``s = clamp(t / d, 0, 1)`` and the result ``s * other + (1 - s) * base``: elements closer than ``t`` are taken
from the other model, farther ones move toward it by ``t / d``. From the NearSwap merges of
QuartetAnemoi-70B (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001). Computed in the compute
dtype with mergekit's operations in mergekit's order, so bfloat16 results round alike.
"""

from __future__ import annotations

import torch

MIN_DISTANCE = 1e-6


def merge_nearswap(base: torch.Tensor, other: torch.Tensor, out: torch.Tensor, *, t: float) -> torch.Tensor:
    """NearSwap of ``other`` into ``base``, written to ``out``.

    Args:
        base, other: tensors of one shape, in the compute dtype.
        out: the result buffer (same shape; the compute dtype).
        t: the distance below which an element is swapped (any real; t <= 0 keeps the base).

    Returns:
        ``out``.
    """
    distance = (base - other).abs().clamp(min=MIN_DISTANCE)
    share = (t / distance).clamp(min=0, max=1)  # python / tensor: reciprocal times t, as mergekit computes it
    out.copy_(share * other + (1 - share) * base)
    return out
