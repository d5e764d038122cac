"""Sparsification of task vectors (deltas), with the precomputation that makes it cheap to repeat.

Semantics follow mergekit 0.1.5 exactly (its ``sparsify.py``), including which element wins a tie:

- ``magnitude`` (TIES): keep the ``k = max(1, int(density * numel))`` largest ``|delta|`` over the whole
  tensor. mergekit takes the first k entries of ``torch.argsort(|delta|, descending=True)``; that sort is not
  stable, so among elements tied at the threshold the ones kept are whichever the sort put first. We precompute
  that same permutation once per tensor (``DeltaStats.order``); a candidate's top-k is then a threshold compare,
  plus an exact fix-up from the permutation only when the threshold value is tied across the cut.
- ``magnitude_outliers`` (breadcrumbs): drop the ``int(gamma * numel)`` largest and enough of the smallest to
  keep ``int(density * numel)``; positions come from ``torch.sort(|delta|)`` (ascending), fixed up the same way.
- ``random`` (DARE): keep each element with probability ``density``. Drawn as ``torch.rand(...) < density``,
  which on CPU is the same stream ``torch.bernoulli(full_like(delta, density))`` consumes, so with the same
  seed our masks equal mergekit's. On CPU the draws come from ``mt_draws.py`` (torch's generator state, the
  same numbers, about 18 times faster than ``torch.rand`` for a mask).
- ``della_magprune`` (DELLA): per row, keep probability ``density - epsilon + 2 * epsilon * rank_norm`` where
  ``rank_norm`` is the normalized rank of ``|delta|`` in its row (precomputed once).

Rescaling the kept elements: ``rescale_mode="l1"`` (mergekit's default, and ours) multiplies the kept tensor by
``||delta||_1 / ||kept||_1`` so the L1 norm is preserved (skipped when either norm is below 1e-7);
``rescale_mode="inverse_density"`` is the DARE paper's ``1 / density`` (per-element ``1 / p`` for DELLA).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

import evomerge.methods.mt_draws as mt_draws
from evomerge.methods.workspace import Workspace

SPARSIFY_METHODS = ("magnitude", "magnitude_outliers", "random", "della_magprune")
RESCALE_MODES = ("l1", "inverse_density")
_RESCALE_EPS = 1e-7


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype mergekit draws random masks in: the tensor's own on GPU or for bfloat16, else float32."""
    if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16:
        return tensor.dtype
    return torch.float32


@dataclass
class DeltaStats:
    """What sparsification needs from a delta that does not depend on the candidate's parameters."""

    l1: torch.Tensor  # sum |delta| (0-dim, in the dtype mergekit sums in): the "before" of the L1 rescale
    order: torch.Tensor | None = None  # magnitude: argsort |delta| descending; outliers: ascending (flat)
    rank_norm: torch.Tensor | None = None  # della: normalized rank of |delta| within its row, 2-D
    keep_order: bool = True  # False (one-shot merges): a sort order a split tie forced is dropped after use


def prepare_stats(delta: torch.Tensor, method: str | None, lazy: bool = False) -> DeltaStats | None:
    """Precompute the parts of ``method``'s sparsification of ``delta`` that are parameter-free.

    ``lazy``: leave the sort order to be computed only if a merge needs it (a one-shot merge finds TIES'
    threshold with a selection instead, and sorts only when the cut splits a tie).
    """
    if method is None:
        return None
    flat = delta.reshape(-1)
    if method in ("magnitude", "magnitude_outliers"):
        stats = DeltaStats(l1=flat.abs().sum(), keep_order=not lazy)
        if not lazy:
            ensure_order(flat, stats, method)
        return stats
    if method == "random":
        return DeltaStats(l1=flat.to(work_dtype(delta)).abs().sum())
    if method == "della_magprune":
        wd = work_dtype(delta)
        rows = delta if delta.dim() >= 2 else delta.unsqueeze(0)
        rows = rows.reshape(rows.shape[0], -1) if rows.dim() > 2 else rows
        ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).to(wd) + 1
        lo = ranks.min(dim=1, keepdim=True).values
        hi = ranks.max(dim=1, keepdim=True).values
        rank_norm = ((ranks - lo) / (hi - lo)).clamp(0, 1)
        return DeltaStats(l1=flat.to(wd).abs().sum(), rank_norm=rank_norm)
    raise ValueError(f"unknown sparsification {method!r}")


def ensure_order(flat: torch.Tensor, stats: DeltaStats, method: str) -> torch.Tensor:
    """The permutation mergekit's sparsification sorts by (computed once, then kept in ``stats``)."""
    if stats.order is None:
        mags = flat.abs()
        if mags.device.type == "cpu":
            mags = mags.float()
        if method == "magnitude":
            order = torch.argsort(mags, descending=True)
        else:
            order = torch.sort(mags, descending=False).indices
        if order.numel() < 2**31 - 1:
            order = order.to(torch.int32)  # half the memory; same positions
        stats.order = order
    return stats.order


def _value(values: torch.Tensor, order: torch.Tensor, position: int) -> float:
    """|values| at sorted position ``position`` (values may be the delta itself or its magnitudes)."""
    return abs(float(values[order[position]]))


def _run_bounds(mags: torch.Tensor, order: torch.Tensor, position: int) -> tuple[int, int]:
    """[start, end) of the run of sorted positions whose value equals the value at ``position``."""
    value = _value(mags, order, position)
    lo, hi = 0, position
    while lo < hi:  # first position with that value
        mid = (lo + hi) // 2
        if _value(mags, order, mid) == value:
            hi = mid
        else:
            lo = mid + 1
    start = lo
    lo, hi = position, order.numel() - 1
    while lo < hi:  # last position with that value
        mid = (lo + hi + 1) // 2
        if _value(mags, order, mid) == value:
            lo = mid
        else:
            hi = mid - 1
    return start, lo + 1


def _run_at(mags: torch.Tensor, order: torch.Tensor, position: int) -> tuple[int, int]:
    """Like ``_run_bounds`` but without a search when the neighbours differ (the usual case)."""
    n = order.numel()
    value = _value(mags, order, position)
    if (position > 0 and _value(mags, order, position - 1) == value) or (
            position + 1 < n and _value(mags, order, position + 1) == value):
        return _run_bounds(mags, order, position)
    return position, position + 1


def _keep_sorted_range(mags: torch.Tensor, order: torch.Tensor, begin: int, end: int, descending: bool,
                       mask: torch.Tensor) -> None:
    """mask = the elements at sorted positions [begin, end) of ``order``, exactly.

    Elements strictly inside the value range are found by comparison; the runs of equal values at the two
    ends, where the cut may split a tie, are resolved with the precomputed permutation.
    """
    n = order.numel()
    if end <= begin:
        mask.zero_()
        return
    if begin == 0 and end == n:
        mask.fill_(1)
        return
    a1, b1 = _run_at(mags, order, begin)
    a2, b2 = _run_at(mags, order, end - 1)
    v_begin = mags[order[begin]]
    if a1 == a2:  # one run holds both ends: every kept element has the same value
        if a1 >= begin and b1 <= end:
            torch.eq(mags, v_begin, out=mask)
        else:
            mask.zero_()
            mask[order[begin:end].long()] = 1
        return
    v_end = mags[order[end - 1]]
    begin_whole = a1 >= begin  # the tie run at `begin` lies entirely inside [begin, end)
    end_whole = b2 <= end
    # In value terms the kept range is [v_end, v_begin] (descending) or [v_begin, v_end] (ascending).
    lower, lower_incl, lower_needed = (v_end, end_whole, end < n) if descending else (v_begin, begin_whole, begin > 0)
    upper, upper_incl, upper_needed = (v_begin, begin_whole, begin > 0) if descending else (v_end, end_whole, end < n)
    if lower_needed:
        (torch.ge if lower_incl else torch.gt)(mags, lower, out=mask)
        if upper_needed:
            mask.mul_((torch.le if upper_incl else torch.lt)(mags, upper).to(mask.dtype))
    else:
        (torch.le if upper_incl else torch.lt)(mags, upper, out=mask)
    if not begin_whole:
        mask[order[begin:b1].long()] = 1
    if not end_whole:
        mask[order[a2:end].long()] = 1


@dataclass
class Threshold:
    """TIES' top-k as a compare: keep ``|delta| >= value`` (``inclusive``) or ``> value`` plus ``extra``, the
    flat indices (int32 or int64, in the sort order's sequence, not sorted) of the elements tied at ``value``
    that mergekit's sort puts inside the top k."""

    value: float
    inclusive: bool = True
    extra: torch.Tensor | None = None
    keep: torch.Tensor | None = None  # on a GPU: the top-k positions themselves (a scatter, no host syncs)
    _sorted: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def sorted_extra(self) -> torch.Tensor | None:
        """``extra`` sorted ascending, int64 (computed on first use: only the chunked torch kernel needs it)."""
        if self._sorted is None and self.extra is not None:
            self._sorted = torch.sort(self.extra.long()).values
        return self._sorted

    def shrink_lambda(self, dtype: torch.dtype) -> float:
        """The ``lambda`` of ``torch.hardshrink`` (keeps ``x`` where ``|x| > lambda``) that keeps what this
        threshold keeps by value, for ``x`` of ``dtype``: ``value`` itself when exclusive, else the largest
        ``dtype`` number below it (no ``dtype`` number lies between the two, so ``>`` it is ``>= value``)."""
        if not self.inclusive:
            return self.value
        value = torch.tensor(self.value, dtype=dtype)
        return float(torch.nextafter(value, torch.tensor(-math.inf, dtype=dtype)))


def magnitude_threshold(delta: torch.Tensor, stats: DeltaStats, density: float) -> Threshold | None:
    """TIES' magnitude top-k of ``delta`` as a ``Threshold`` (None: keep everything).

    With a precomputed sort order this is a lookup. Without one (a one-shot merge) the k-th largest value is
    found by selection, and the order is computed only if that value is tied across the cut, where only the
    permutation can say which of the tied elements mergekit keeps.
    """
    flat = delta.reshape(-1)
    n = flat.numel()
    if density >= 1 or n == 0:
        return None
    k = max(1, int(density * n))
    if k >= n:
        return None
    if flat.device.type != "cpu":
        return Threshold(float("nan"), keep=ensure_order(flat, stats, "magnitude")[:k])
    if stats.order is None:
        mags = flat.abs()
        value = float(torch.kthvalue(mags.float() if mags.device.type == "cpu" else mags, n - k + 1).values)
        if int((mags >= value).sum()) == k:
            return Threshold(value)
        del mags  # before the sort: it needs about 16 bytes per element of its own
    order = ensure_order(flat, stats, "magnitude")
    if not stats.keep_order:
        stats.order = None  # one-shot: the threshold below is all that is needed from it
    value = float(flat[order[k - 1]].abs())
    if float(flat[order[k]].abs()) != value:
        return Threshold(value)
    start, _ = _run_bounds(flat, order, k - 1)
    # the tied elements kept, unsorted (the fused kernel marks them in a bitmap; a sort of a bf16 tie run of
    # up to ~1M elements cost more than the merge): a view of a kept order, a copy of a one-shot one
    extra = order[start:k] if stats.keep_order else order[start:k].clone()
    return Threshold(value, inclusive=False, extra=extra)


@dataclass(frozen=True)
class Sparsification:
    """How one task vector is sparsified: mergekit 0.1.5's ``sparsify`` arguments (plus ``rescale_mode``)."""

    method: str  # one of SPARSIFY_METHODS
    density: float  # fraction of the elements kept (expected fraction for random / della_magprune), in [0, 1]
    rescale: bool  # rescale the kept elements (see ``rescale_mode``)
    rescale_mode: str = "l1"  # one of RESCALE_MODES
    gamma: float = 0.0  # magnitude_outliers: fraction of the largest |delta| dropped, in [0, 1)
    epsilon: float = 0.0  # della_magprune: keep probabilities span density +- epsilon by magnitude rank


def sparsify_into(delta: torch.Tensor, stats: DeltaStats, how: Sparsification, out: torch.Tensor, *,
                  generator: torch.Generator | None = None, ws: Workspace, defer_rescale: bool = False) -> float:
    """out = sparsified ``delta`` (rescaled if ``how.rescale``), like mergekit's ``sparsify``.

    Args:
        delta: a task vector ``theta - base``, any shape, float32/float64/bfloat16/float16.
        stats: its parameter-free statistics (``prepare_stats`` for ``how.method``); a missing sort order is
            computed here and kept in it.
        how: the method and its parameters.
        out: flat buffer of ``delta.numel()`` elements in ``delta``'s dtype and device; overwritten.
        generator: the random stream of ``random`` / ``della_magprune`` (mergekit's masks for the same seed).
        ws: scratch buffers, reused across calls.
        defer_rescale: leave DARE's L1 rescale (a multiply in ``delta``'s dtype) to the caller and return its
            factor, where it is one (``random``, ``rescale_mode="l1"``, drawn in the delta's own dtype).

    Returns:
        The deferred rescale factor (a value of ``delta``'s dtype), or 1.0: nothing left to multiply.

    Raises:
        ValueError: ``how.method`` is not one of ``SPARSIFY_METHODS``.
    """
    flat = delta.reshape(-1)
    if how.density >= 1:
        out.copy_(flat)
    elif how.method in ("magnitude", "magnitude_outliers"):
        _magnitude_into(flat, stats, how, out, ws)
    elif how.method == "random":
        return _random_into(flat, stats, how, out, generator, ws, defer_rescale)
    elif how.method == "della_magprune":
        _della_into(flat, stats, how, out, generator, ws)
    else:
        raise ValueError(f"unknown sparsification {how.method!r}")
    return 1.0


def _magnitude_into(flat: torch.Tensor, stats: DeltaStats, how: Sparsification, out: torch.Tensor,
                    ws: Workspace) -> None:
    """TIES' top-k (``magnitude``) or breadcrumbs' band (``magnitude_outliers``) of ``flat`` into ``out``."""
    n = flat.numel()
    mags = ws.get("sp_mags", (n,), flat.dtype)
    torch.abs(flat, out=mags)
    mask = ws.get("sp_maskf", (n,), flat.dtype)  # float 0/1: multiplying by a bool mask is 5x slower
    order = ensure_order(flat, stats, how.method)
    if not stats.keep_order:
        stats.order = None  # one-shot: dropped after this use (the local reference keeps it alive until then)
    if how.method == "magnitude":
        if how.density <= 0 or n == 0:
            out.zero_()
            return
        k = max(1, int(how.density * n))
        _keep_sorted_range(mags, order, 0, k, True, mask)
    else:
        target = int(how.density * n)
        n_top = int(how.gamma * n)
        n_bot = max(0, n - target - n_top)
        _keep_sorted_range(mags, order, n_bot, n_bot + target, False, mask)
    del order
    torch.mul(flat, mask, out=out)
    if how.rescale:
        _rescale(out, stats.l1, how.rescale_mode, how.density, ws)


def _random_into(flat: torch.Tensor, stats: DeltaStats, how: Sparsification, out: torch.Tensor,
                 generator: torch.Generator | None, ws: Workspace, defer_rescale: bool = False) -> float:
    """DARE: keep each element with probability ``density`` (drawn in mergekit's dtype, see ``work_dtype``);
    returns the L1 rescale factor left to the caller (``defer_rescale``), else 1.0."""
    n = flat.numel()
    wd = work_dtype(flat)
    src = flat if flat.dtype == wd else flat.to(wd)
    target = out if out.dtype == wd else ws.get("sp_work", (n,), wd)
    if (wd in (torch.float32, torch.float64) or _float_draws(flat, wd)) and flat.device.type == "cpu":
        _random_mask_into(target, float(torch.tensor(how.density, dtype=wd)), _draw_dtype(wd), generator, ws)
        target.mul_(src)  # mask * delta == delta * mask (one rounding of the same product)
    else:
        mask: torch.Tensor
        if wd in (torch.float32, torch.float64):
            draw = ws.get("sp_rand", (n,), wd)
            torch.rand(n, generator=generator, out=draw, dtype=wd, device=flat.device)
            mask = ws.get("sp_maskf", (n,), wd)
            torch.lt(draw, how.density, out=mask)
        else:
            mask = torch.bernoulli(torch.full_like(src, how.density), generator=generator)
        torch.mul(src, mask, out=target)
    factor = 1.0
    if how.rescale and how.density > 0:  # density 0 kept nothing (the draw still advances the stream, as mergekit's)
        if defer_rescale and target is out and how.rescale_mode == "l1" and out.device.type == "cpu":
            factor = float(_l1_factor(target, stats.l1, ws))
        else:
            _rescale(target, stats.l1, how.rescale_mode, how.density, ws)
    if target is not out:
        out.copy_(target)
    return factor


def _della_into(flat: torch.Tensor, stats: DeltaStats, how: Sparsification, out: torch.Tensor,
                generator: torch.Generator | None, ws: Workspace) -> None:
    """DELLA: keep each element with probability ``density - epsilon + 2 * epsilon * rank_norm`` (per row)."""
    if how.density <= 0:
        out.zero_()
        return
    n = flat.numel()
    wd = work_dtype(flat)
    rank_norm = stats.rank_norm
    assert rank_norm is not None, "prepare_stats(delta, 'della_magprune') computes the ranks"
    probs = ws.get("sp_probs", rank_norm.shape, wd)
    torch.mul(rank_norm, 2, out=probs)
    probs.mul_(how.epsilon).add_(how.density - how.epsilon)
    src = (flat if flat.dtype == wd else flat.to(wd)).view(rank_norm.shape)
    target = out if out.dtype == wd else ws.get("sp_work", (n,), wd)
    target2 = target.view(rank_norm.shape)
    if wd in (torch.float32, torch.float64) or _float_draws(flat, wd):
        draw = ws.get("sp_rand", rank_norm.shape, _draw_dtype(wd))
        if not mt_draws.uniform_into(draw, generator):
            torch.rand(rank_norm.shape, generator=generator, out=draw, dtype=draw.dtype, device=flat.device)
        mask = ws.get("sp_maskf", rank_norm.shape, wd)
        torch.lt(draw, probs, out=mask)
    else:
        mask = torch.bernoulli(probs, generator=generator)
    torch.mul(src, mask, out=target2)
    if how.rescale:
        _rescale(target, stats.l1, how.rescale_mode, probs.reshape(-1), ws)
    if target is not out:
        out.copy_(target)


DRAW_CHUNK = 1 << 18  # random draws per call: the stream is the same whatever the split (one draw per element)


def _random_mask_into(mask: torch.Tensor, p: float, draw_dtype: torch.dtype, generator: torch.Generator | None,
                      ws: Workspace) -> None:
    """mask (flat, any float dtype) = 1.0 where a uniform draw < p else 0.0: ``torch.bernoulli``'s stream on CPU
    (one ``torch.rand`` draw per element, in order), drawn in chunks so no tensor-sized draw buffer is needed."""
    if draw_dtype == torch.float32 and mt_draws.keep_mask_into(mask, p, generator):
        return  # the same stream, drawn by our kernel (mt_draws.py)
    n = mask.numel()
    draw = ws.get("sp_rand", (min(n, DRAW_CHUNK),), draw_dtype)
    for start in range(0, n, DRAW_CHUNK):
        size = min(DRAW_CHUNK, n - start)
        chunk = draw[:size]
        torch.rand(size, generator=generator, out=chunk, dtype=draw_dtype)
        torch.lt(chunk, p, out=mask[start:start + size])


def _float_draws(flat: torch.Tensor, wd: torch.dtype) -> bool:
    """bfloat16 on CPU: ``torch.bernoulli`` of a bf16 probability draws one float32 uniform per element and keeps
    it where it is below the probability (as a float), the stream ``torch.rand`` in float32 gives, 4x faster
    and without a probability tensor per call."""
    return wd == torch.bfloat16 and flat.device.type == "cpu"


def _draw_dtype(wd: torch.dtype) -> torch.dtype:
    return torch.float32 if wd == torch.bfloat16 else wd


def _rescale(kept: torch.Tensor, before: torch.Tensor, mode: str, keep_prob, ws: Workspace) -> None:
    """Scale the kept elements in place: L1 norm preserving (mergekit) or 1 / keep probability (DARE paper)."""
    if mode == "inverse_density":
        kept.div_(keep_prob)
        return
    kept.mul_(_l1_factor(kept, before, ws))


def _l1_factor(kept: torch.Tensor, before: torch.Tensor, ws: Workspace) -> torch.Tensor:
    """mergekit's L1 rescale factor ``||delta||_1 / ||kept||_1`` (0-dim, kept's dtype and device), exactly 1
    where either norm is below 1e-7 (mergekit then skips the rescale; multiplying by 1 does the same without a
    device-to-host sync)."""
    scratch = ws.get("sp_abs", kept.shape, kept.dtype)
    torch.abs(kept, out=scratch)
    after = scratch.sum()
    skip = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return torch.where(skip, torch.ones_like(after), before / after)
