"""karcher: the Karcher (Riemannian) mean of the models' directions, scaled by their mean norm; mergekit 0.1.5.

Each tensor ``x_i`` (the whole tensor is one vector) is split into its norm ``n_i`` and direction
``u_i = x_i / n_i``. Directions of tensors with ``n_i <= tol`` are left out; the others get equal weights
``a_i = 1 / k``. Starting from the normalized weighted mean of the directions, the mean ``m`` on the unit sphere
is refined by at most ``max_iter`` Riemannian gradient steps: ``theta_i = acos(<m, u_i>)``, tangent
``v = sum_i a_i theta_i / sin(theta_i) (u_i - cos(theta_i) m)`` (terms with ``theta_i < tol`` skipped); stop
when ``|v| < tol``, else ``m <- cos|v| m + sin|v| v / |v|``, renormalized. The result is
``(sum_i n_i / N) * m`` over all N inputs. Karcher 1977; for model merging: mergekit's ``karcher``
(https://arxiv.org/abs/2603.04972).

Norms are taken in float32 (float64 for float64 inputs) while directions and the mean stay in the compute
dtype, as in mergekit; the operations and their order are mergekit's, so bfloat16 results round alike.
All inputs (a listed base model included) are averaged alike: the method has no base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _norm(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.linalg.vector_norm(x.to(dtype))


def _start(units: list[torch.Tensor], shares: list[float], norm_dtype: torch.dtype, tol: float) -> torch.Tensor:
    """The normalized weighted mean of the directions (the first direction when that mean is ~0)."""
    mean = torch.zeros_like(units[0])
    for share, unit in zip(shares, units):
        mean += share * unit
    length = _norm(mean, norm_dtype)
    if length.item() < tol:
        return units[0].clone()
    return (mean / length).to(mean.dtype)


def _refine(mean: torch.Tensor, units: list[torch.Tensor], shares: list[float], norm_dtype: torch.dtype,
            max_iter: int, tol: float) -> torch.Tensor:
    """At most ``max_iter`` Riemannian gradient steps of the weighted Karcher mean on the unit sphere."""
    for _ in range(max_iter):
        step = torch.zeros_like(mean)
        for share, unit in zip(shares, units):
            cos = torch.clamp(torch.dot(mean.flatten(), unit.flatten()), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue
            step += share * (angle / torch.sin(angle)) * (unit - cos * mean)
        step_norm = _norm(step, norm_dtype)
        if step_norm.item() < tol:
            break
        mean = (torch.cos(step_norm) * mean + torch.sin(step_norm) * (step / step_norm)).to(mean.dtype)
        length = _norm(mean, norm_dtype)
        if length.item() > tol:
            mean = (mean / length).to(mean.dtype)
    return mean


def merge_karcher(tensors: Sequence[torch.Tensor], out: torch.Tensor, *, max_iter: int = 10,
                  tol: float = 1e-5) -> torch.Tensor:
    """The Karcher mean of ``tensors`` (equal weights), written to ``out``.

    Args:
        tensors: N >= 1 tensors of one shape, in the compute dtype.
        out: the result buffer (same shape; the compute dtype).
        max_iter: the most gradient steps.
        tol: the norm below which a tensor is left out, and the step/angle below which iteration stops.

    Returns:
        ``out`` (all zeros when every tensor's norm is at most ``tol``).
    """
    if len(tensors) == 1:
        out.copy_(tensors[0])
        return out
    norm_dtype = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32
    weight = 1.0 / len(tensors)
    norms = [_norm(x, norm_dtype) for x in tensors]
    kept = [i for i, n in enumerate(norms) if n.item() > tol]
    if not kept:
        out.zero_()
        return out
    units = [torch.zeros_like(tensors[i]) if norms[i].item() == 0.0 else (tensors[i] / norms[i]).to(tensors[i].dtype)
             for i in kept]
    total = sum([weight] * len(kept))
    shares = [weight / total for _ in kept]
    mean = _refine(_start(units, shares, norm_dtype, tol), units, shares, norm_dtype, max_iter, tol)
    scale = sum(weight * n for n in norms)
    out.copy_(scale * mean)
    return out
