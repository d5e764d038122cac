"""linear: the weighted average of the models ("model soup"), mergekit 0.1.5 semantics.

result = sum_i w_i theta_i, divided by sum_i w_i when ``normalize`` (default true). Computed in float32
(float64 for float64 inputs) and cast back. A zero weight sum with normalize is rejected when the recipe's
parameters are resolved (mergekit would silently produce inf/nan).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.workspace import Workspace


def merge_linear(tensors: Sequence[torch.Tensor], out: torch.Tensor, *, weights: Sequence[float],
                 normalize: bool = True, ws: Workspace) -> torch.Tensor:
    """out = sum_i w_i t_i (/ sum_i w_i if ``normalize``): ``tensors`` and ``out`` share shape and dtype.

    Accumulated in float32 (float64 for float64) and rounded once into ``out``; returns ``out``."""
    first = tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    acc = out.view(-1) if out.dtype == acc_dtype else ws.get("linear_acc", (first.numel(),), acc_dtype)
    coeffs = torch.tensor(list(weights), dtype=torch.float64).to(acc_dtype)  # mergekit rounds weights to acc dtype
    acc.zero_()
    for tensor, coeff in zip(tensors, coeffs.tolist()):
        flat = tensor.reshape(-1)
        acc.add_(flat if flat.dtype == acc_dtype else flat.to(acc_dtype), alpha=coeff)
    if normalize:
        acc.div_(float(coeffs.sum()))
    if acc.data_ptr() != out.data_ptr():
        out.view(-1).copy_(acc)
    return out
