"""multislerp: barycentric interpolation of several models on the hypersphere, mergekit 0.1.5 semantics.

From Charles Goddard's Multi-SLERP (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea). With an
optional base, the inputs are the task vectors ``x_i = theta_i - base``, else the models themselves; each
tensor is one vector. With weights ``w`` (divided by their sum when ``normalize_weights``):

- ``u_i = x_i / (|x_i| + eps)`` (projection onto the unit sphere);
- ``m = sum_i w_i u_i``, normalized (the weighted Euclidean mean, projected);
- tangent vectors ``v_i = u_i - <u_i, m> m`` at ``m``, interpolated: ``v = sum_i w_i v_i``;
- exponential map back: ``r = m cos(|v| + eps) + v sin(|v| + eps) / (|v| + eps)``;
- result ``r * sum_i w_i |x_i|`` (plus the base).

A single model is returned unchanged. When the weighted mean of the directions vanishes (``|m| < eps``:
antipodal inputs with balancing weights, or all task vectors zero), mergekit falls back to the weighted linear
combination ``sum_i w_i x_i`` for two models and raises an error for three or more; we take the same linear
combination for any number of models, which for all-zero task vectors (tensors no model changed) is the base.
Computed in the compute dtype with mergekit's operations in mergekit's order (the weights too are rounded to
it), so bfloat16 results round alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_multislerp(models: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, *,
                     weights: Sequence[float], normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Multi-SLERP of ``models`` (around ``base`` when given), written to ``out``.

    Args:
        models: N >= 1 non-base tensors of one shape, in the compute dtype.
        base: the base tensor or None.
        out: the result buffer (same shape; the compute dtype).
        weights: one weight per model.
        normalize_weights: divide the weights by their sum (a zero sum is rejected when parameters are resolved).
        eps: added to norms against division by zero; also the threshold of the linear fallback.

    Returns:
        ``out``.
    """
    if len(models) == 1:
        out.copy_(models[0])
        return out
    vectors = torch.stack(list(models), dim=0)
    if base is not None:
        vectors -= base
    flat = vectors.view(vectors.shape[0], -1)
    w = torch.tensor(list(weights), dtype=flat.dtype, device=flat.device)
    if normalize_weights:
        w = w / w.sum()
    column = w.view(-1, 1)
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    center = (units * column).sum(0)
    center_norm = torch.norm(center)
    if center_norm < eps:
        result = vectors[0] * w[0]
        for i in range(1, vectors.shape[0]):
            result = result + vectors[i] * w[i]
    else:
        center = center / center_norm
        tangents = units - (units * center).sum(-1, keepdim=True) * center
        tangent = (tangents * column).sum(0)
        length = torch.norm(tangent) + eps
        on_sphere = center * torch.cos(length) + tangent * (torch.sin(length) / length)
        result = (on_sphere * (norms.squeeze(-1) * w).sum()).view(vectors.shape[1:])
    if base is not None:
        result = result + base
    out.copy_(result)
    return out
