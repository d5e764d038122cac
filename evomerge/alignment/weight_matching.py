"""Git Re-Basin weight matching (Ainsworth et al. 2023): permute model B's units to best match model A's weights.

For one permutation P (others held fixed) the objective sum over the tensors P touches of <W_a, P W_b> is a
linear assignment problem: cost[i, j] = sum over those tensors of <row i of W_a, row j of W_b>, where W_b has
already been permuted on its other axes. Coordinate descent visits the permutations in a random order, solves
each assignment exactly (scipy.optimize.linear_sum_assignment, maximize) and stops when a full sweep improves
nothing.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

from evomerge.alignment.permutation_spec import PermutationSpec, identity_perms, permute_tensor
from evomerge.errors import EvomergeError


def check_compatible(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> None:
    """Same tensor names and shapes in both models, else a one-line error naming the first difference."""
    only_a = sorted(set(state_a) - set(state_b))
    only_b = sorted(set(state_b) - set(state_a))
    if only_a or only_b:
        which = f"{only_a[0]!r} only in model A" if only_a else f"{only_b[0]!r} only in model B"
        raise EvomergeError(f"models have different tensors ({len(only_a) + len(only_b)} differ, e.g. {which})")
    for k in state_a:
        if tuple(state_a[k].shape) != tuple(state_b[k].shape):
            raise EvomergeError(f"tensor {k!r} has shape {tuple(state_a[k].shape)} in model A but "
                                f"{tuple(state_b[k].shape)} in model B")


def _unit_rows(tensor: torch.Tensor, axis: int, n: int) -> torch.Tensor:
    """(n, -1): each row is one unit (a block of the axis together with everything else)."""
    return tensor.movedim(axis, 0).reshape(n, -1).double()


def weight_matching(spec: PermutationSpec, state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0, init: dict[str, torch.Tensor] | None = None,
                    verbose: bool = False) -> dict[str, torch.Tensor]:
    """Permutations (perm name -> LongTensor) that bring B's units in line with A's; apply with apply_permutation."""
    check_compatible(state_a, state_b)
    spec.check(state_a)
    by_param = spec.axes_of_param()
    perms = {k: v.clone() for k, v in (init or identity_perms(spec)).items()}
    names = list(spec.perms)
    gen = torch.Generator().manual_seed(seed)
    for it in range(max_iter):
        improved = False
        for idx in torch.randperm(len(names), generator=gen).tolist():
            name = names[idx]
            n = spec.sizes[name]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for ax in spec.perms[name]:
                wa = _unit_rows(state_a[ax.param], ax.axis, n)
                wb = permute_tensor(state_b[ax.param], by_param[ax.param], perms, skip=name)
                cost += wa @ _unit_rows(wb, ax.axis, n).T
            rows, cols = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(cols, dtype=torch.long)
            old_score = float(cost[torch.arange(n), perms[name]].sum())
            new_score = float(cost[torch.arange(n), new].sum())
            if new_score > old_score + 1e-12 * max(1.0, abs(old_score)):
                perms[name] = new
                improved = True
            if verbose:
                print(f"iter {it} {name}: {new_score - old_score:+.6g}")
        if not improved:
            break
    return perms
