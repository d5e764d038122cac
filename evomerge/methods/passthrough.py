"""passthrough: copy one model's tensor, optionally multiplied by ``scale``; with ``slices`` this stacks
layers of several models (frankenmerge). mergekit 0.1.5 semantics.
"""

from __future__ import annotations

import torch


def merge_passthrough(tensor: torch.Tensor, out: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """out = tensor (times ``scale`` when given), same shape and dtype; returns ``out``."""
    if scale is None:
        out.copy_(tensor)
    else:
        torch.mul(tensor, scale, out=out)
    return out
