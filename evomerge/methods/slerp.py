"""slerp: spherical interpolation between the base (t = 0) and one other model (t = 1), mergekit 0.1.5.

The whole tensor is treated as one vector, in float32 (float64 for float64 inputs). Both are normalized,
``dot`` is their cosine clamped to [-1, 1]; when ``|dot| > 0.9995`` (near-parallel or antiparallel) the
result is plain linear interpolation ``(1 - t) a + t b``, otherwise
``sin((1 - t) theta) / sin(theta) * a + sin(t theta) / sin(theta) * b`` with ``theta = acos(dot)``.
The coefficients multiply the unnormalized tensors. Norms below 1e-8 count as 1.
"""

from __future__ import annotations

import torch

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def merge_slerp(base: torch.Tensor, other: torch.Tensor, out: torch.Tensor, *, t: float) -> torch.Tensor:
    """out = slerp(base, other, t) over the flattened tensors (see the module docstring); returns ``out``.

    ``base``, ``other`` and ``out`` share shape and dtype; ``t`` in [0, 1] (0 = base, 1 = other)."""
    dtype = torch.float64 if base.dtype == torch.float64 else torch.float32
    a = base.reshape(-1).to(dtype)
    b = other.reshape(-1).to(dtype)
    if a.numel() == 0:
        return out
    norm_a = torch.linalg.vector_norm(a)
    norm_b = torch.linalg.vector_norm(b)
    norm_a = torch.where(norm_a > NORM_EPS, norm_a, torch.ones_like(norm_a))
    norm_b = torch.where(norm_b > NORM_EPS, norm_b, torch.ones_like(norm_b))
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    t32 = float(torch.tensor(t, dtype=dtype))
    if abs(dot) > DOT_THRESHOLD:
        coef_a, coef_b = 1 - t32, t32
    else:
        theta = torch.acos(torch.tensor(dot, dtype=dtype))
        sin_theta = torch.sin(theta)
        coef_a = float(torch.sin((1 - t32) * theta) / sin_theta)
        coef_b = float(torch.sin(t32 * theta) / sin_theta)
    result = a.mul(coef_a).add_(b.mul(coef_b))
    out.view(-1).copy_(result)
    return out
