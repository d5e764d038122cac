"""Git Re-Basin activation matching: permute B's units to maximise the correlation of its activations with A's.

Both models see the same calibration batches; at every ``ActivationPoint`` of a permutation the per-unit
activations are gathered, and the assignment maximises the sum of Pearson correlations between A's unit i and
B's unit j (for block units, e.g. whole attention heads, the correlations of the matching elements inside the
block are summed; for a residual stream seen at several layers, the correlations at every point are summed).
Permutations are solved independently, each exactly, with scipy.optimize.linear_sum_assignment.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from evomerge.alignment.permutation_spec import ActivationPoint, PermutationSpec


def run_model(model: nn.Module, batch: Any) -> Any:
    """Default forward: a dict of tensors is keyword arguments, a tuple/list's first item is the input."""
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _first_tensor(value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)):
        return _first_tensor(value[0])
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find a tensor in {type(value).__name__}")


class ActivationRecorder:
    """Forward hooks that hand each observed tensor, as (rows, units, block), to ``sink(point_index, tensor)``."""

    def __init__(self, model: nn.Module, points: list[ActivationPoint], sizes: list[int],
                 sink: Callable[[int, torch.Tensor], None], mask: Callable[[], torch.Tensor | None] | None = None):
        modules = dict(model.named_modules())
        self.handles = []
        for i, (pt, n) in enumerate(zip(points, sizes)):
            module = modules[pt.module]

            def grab(value, i=i, pt=pt, n=n):
                t = _first_tensor(value).detach().float()
                t = t.movedim(pt.channel_dim, -1)
                keep = mask() if mask is not None else None
                if keep is not None and t.dim() == 3 and keep.shape == t.shape[:2]:
                    t = t[keep.bool()]
                sink(i, t.reshape(-1, n, pt.block))

            if pt.where == "input":
                self.handles.append(module.register_forward_pre_hook(lambda m, args, g=grab: g(args[0])))
            else:
                self.handles.append(module.register_forward_hook(lambda m, args, out, g=grab: g(out)))

    def close(self) -> None:
        """Remove the forward hooks."""
        for h in self.handles:
            h.remove()


class _CorrelationStats:
    """Running sums for the Pearson correlation between A's and B's units, per element of a block."""

    def __init__(self, n: int, block: int):
        z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
        self.count = 0
        self.sa, self.sb, self.saa, self.sbb = z(n, block), z(n, block), z(n, block), z(n, block)
        self.sab = z(block, n, n)

    def add(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Accumulate one batch of paired activations ``a``, ``b`` (rows = samples, columns = channels)."""
        a, b = a.double(), b.double()
        self.count += a.shape[0]
        self.sa += a.sum(0)
        self.sb += b.sum(0)
        self.saa += (a * a).sum(0)
        self.sbb += (b * b).sum(0)
        self.sab += torch.einsum("rik,rjk->kij", a, b)

    def correlation(self) -> torch.Tensor:
        """(n, n): summed over the block's elements, correlation of A's unit i with B's unit j."""
        c = max(self.count, 1)
        ma, mb = self.sa / c, self.sb / c
        va = (self.saa / c - ma * ma).clamp_min(0).sqrt() + 1e-12
        vb = (self.sbb / c - mb * mb).clamp_min(0).sqrt() + 1e-12
        cov = self.sab / c - torch.einsum("ik,jk->kij", ma, mb)
        corr = cov / (va.T[:, :, None] * vb.T[:, None, :])
        return corr.sum(0)


@torch.no_grad()
def activation_correlations(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module,
                            batches: Iterable[Any], forward: Callable[[nn.Module, Any], Any] = run_model,
                            ) -> dict[str, torch.Tensor]:
    """Perm name -> (n, n) summed correlation matrix of A's and B's activations over ``batches``."""
    points: list[ActivationPoint] = []
    owners: list[str] = []
    for name, pts in spec.activations.items():
        for pt in pts:
            points.append(pt)
            owners.append(name)
    sizes = [spec.sizes[o] for o in owners]
    stats = [_CorrelationStats(n, pt.block) for n, pt in zip(sizes, points)]
    current: dict[str, Any] = {}
    seen_a: dict[int, list[torch.Tensor]] = {}
    seen_b: dict[int, list[torch.Tensor]] = {}
    mask = lambda: current.get("mask")  # noqa: E731
    rec_a = ActivationRecorder(model_a, points, sizes, lambda i, t: seen_a.setdefault(i, []).append(t), mask)
    rec_b = ActivationRecorder(model_b, points, sizes, lambda i, t: seen_b.setdefault(i, []).append(t), mask)
    try:
        for batch in batches:
            current["mask"] = batch.get("attention_mask") if isinstance(batch, dict) else None
            seen_a.clear()
            seen_b.clear()
            forward(model_a, batch)
            forward(model_b, batch)
            for i in seen_a:
                stats[i].add(torch.cat(seen_a[i]), torch.cat(seen_b[i]))
    finally:
        rec_a.close()
        rec_b.close()
    out: dict[str, torch.Tensor] = {}
    for owner, st in zip(owners, stats):
        corr = st.correlation()
        out[owner] = out[owner] + corr if owner in out else corr
    return out


def activation_matching(spec: PermutationSpec, model_a: nn.Module, model_b: nn.Module, batches: Iterable[Any],
                        forward: Callable[[nn.Module, Any], Any] = run_model) -> dict[str, torch.Tensor]:
    """Permutations (perm name -> LongTensor) of B's units that maximise activation correlation with A."""
    missing = [name for name in spec.perms if not spec.activations.get(name)]
    if missing:
        raise ValueError(f"permutation spec has no activation points for {missing}")
    corr = activation_correlations(spec, model_a, model_b, batches, forward)
    perms = {}
    for name, c in corr.items():
        _, cols = linear_sum_assignment(torch.nan_to_num(c).numpy(), maximize=True)
        perms[name] = torch.as_tensor(cols, dtype=torch.long)
    return perms
