"""nuslerp: spherical interpolation of two models (or their task vectors), by rows or whole, mergekit 0.1.5.

mergekit's NuSLERP (https://github.com/arcee-ai/mergekit, ``nuslerp``), a generalization of slerp (Shoemake
1985): the two non-base models get weights ``w_1, w_2`` and ``t = w_2 / (w_1 + w_2)`` (0.5 when the sum is
within 1e-6 of zero). With a base, the two task vectors ``v_i = theta_i - base`` are interpolated and the base
added back; without one, the models themselves.

The vectors interpolated are, by option:

- ``nuslerp_flatten: true`` (default): the whole tensor as one vector;
- ``nuslerp_flatten: false``: each row along the last axis (for a ``[out, in]`` weight, each output row);
- ``nuslerp_flatten: false, nuslerp_row_wise: true``: each vector along the first axis (each column).

Per vector: directions ``v / max(|v|, 1e-7)``, ``cos = <u_0, u_1>`` clamped to [-1, 1]; if ``1 - cos^2 <= 1e-16``
(colinear) the result is ``(1 - t) v_0 + t v_1``, else ``(sin((1 - t) theta) v_0 + sin(t theta) v_1) /
sin(theta)`` with ``theta = acos(cos)``. Computed in the compute dtype with mergekit's operations in its order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

COLINEAR_EPS = 1e-8
NORM_FLOOR = 1e-7
ZERO_SUM = 1e-6


def _directions(x: torch.Tensor) -> torch.Tensor:
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=NORM_FLOOR)


def interpolate(t: float, v0: torch.Tensor, v1: torch.Tensor, *, row_wise: bool = False,
                flatten: bool = True) -> torch.Tensor:
    """Spherical interpolation from ``v0`` (t = 0) to ``v1`` (t = 1), per vector as the options say.

    Args:
        t: the interpolation factor.
        v0, v1: tensors of one shape and dtype.
        row_wise: (without ``flatten``) vectors along the first axis instead of the last.
        flatten: the whole tensor as one vector.

    Returns:
        A new tensor of ``v0``'s shape and dtype.
    """
    shape = v0.shape
    transposed = False
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
        transposed = True
    cos = torch.sum(_directions(v0) * _directions(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))  # keeps the unused branch finite
    curved = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, curved)
    if transposed:
        result = result.transpose(0, -1)
    return result.reshape(shape)


def merge_nuslerp(models: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, *,
                  weights: Sequence[float], row_wise: bool = False, flatten: bool = True) -> torch.Tensor:
    """NuSLERP of the two ``models`` (around ``base`` when given), written to ``out``.

    Args:
        models: the two non-base tensors, in the compute dtype.
        base: the base tensor or None.
        out: the result buffer (same shape; the compute dtype).
        weights: the two models' weights.
        row_wise, flatten: which vectors are interpolated (see the module docstring).

    Returns:
        ``out``.
    """
    total = sum(weights)
    t = 0.5 if abs(total) < ZERO_SUM else weights[1] / total
    first, second = models
    if base is None:
        out.copy_(interpolate(t, first, second, row_wise=row_wise, flatten=flatten))
    else:
        out.copy_(base + interpolate(t, first - base, second - base, row_wise=row_wise, flatten=flatten))
    return out
