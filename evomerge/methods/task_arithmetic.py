"""The generalized task-arithmetic family: task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear (mergekit 0.1.5's ``GeneralizedTaskArithmeticMerge``).

Per tensor, with ``delta_i = theta_i - base``:

1. sparsify each delta (magnitude / random / outliers / della, see ``sparsify.py``), rescaling if asked;
2. multiply by its weight: weights are applied BEFORE sign election, as mergekit does;
3. with sign consensus (ties, dare_ties, breadcrumbs_ties, della): the majority sign is the sign of the
   weighted SUM (``>= 0`` counts as +); each delta keeps only the elements that agree with it;
   ``normalize`` divides element-wise by the sum of the agreeing weights (0 -> 1);
   without consensus: the weighted deltas are summed and ``normalize`` divides by the sum of the weights
   (|sum| < 1e-8 -> 1);
4. multiply by ``lambda`` and add to the base.

Speed (this is what every search candidate runs): steps 2-4 are elementwise, so they run over chunks of
``CHUNK`` elements whose temporaries stay in the CPU cache; the sources are read from memory once and the
output written once. TIES' top-k needs no sort per candidate: the precomputed order of ``|delta|`` gives the
k-th largest value, and the mask is a compare against it, done inside the chunk loop. Every product and sum is
evaluated in the same order and rounding as mergekit (0/1 masks as floats, products before sums, no fused
multiply-add where it could change a rounding), so the sign election sees bit-identical sums.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evomerge.methods.sparsify import DeltaStats, Threshold, magnitude_threshold, sparsify_into
from evomerge.methods.workspace import Workspace

CHUNK = 1 << 18  # elements per chunk: a few float buffers of this size fit in L2/L3


def merge_task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], stats: Sequence[DeltaStats | None],
                          out: torch.Tensor, *, weights: Sequence[float], densities: Sequence[float],
                          sparsify: str | None, consensus: bool, normalize: bool, rescale: bool,
                          lambda_: float = 1.0, rescale_mode: str = "l1", gammas: Sequence[float] | None = None,
                          epsilons: Sequence[float] | None = None, generator: torch.Generator | None = None,
                          ws: Workspace) -> torch.Tensor:
    """out = base + lambda * combine(weight_i * sparsify(delta_i)); ``out`` has base's shape and dtype."""
    flat_out = out.view(-1)
    flat_base = base.reshape(-1)
    count = len(deltas)
    if count == 0:
        flat_out.copy_(flat_base)
        return out
    flat_deltas = [d.reshape(-1) for d in deltas]
    # mergekit multiplies by a weight tensor in the deltas' dtype: use the weights rounded to it.
    weights = torch.tensor([float(w) for w in weights], dtype=base.dtype).tolist()
    divisor = None
    if normalize and not consensus:
        divisor = float(torch.tensor(list(weights), dtype=base.dtype).sum())
        if abs(divisor) < 1e-8:
            divisor = 1.0

    # Fast path: no sparsification, or TIES' magnitude top-k without rescale -> thresholds, one chunked pass.
    thresholds = _thresholds(flat_deltas, stats, densities, sparsify, rescale)
    if thresholds is not None:
        _combine_chunks(flat_base, flat_out, count, weights, consensus, normalize, divisor, lambda_, ws,
                        lambda i, s, e, dst, tmp: _fill_thresholded(flat_deltas[i][s:e], thresholds[i],
                                                                    weights[i], s, dst, tmp))
        return out

    # General path: sparsify each whole delta (random draws and L1 rescale need the whole tensor), then combine.
    numel = flat_base.numel()
    scaled = ws.get("gta_scaled", (count, numel), base.dtype)
    for i, delta in enumerate(deltas):
        row = scaled[i]
        if sparsify is None:
            torch.mul(flat_deltas[i], weights[i], out=row)
            continue
        sparsify_into(delta, stats[i], sparsify, row, density=densities[i], rescale=rescale,
                      rescale_mode=rescale_mode, gamma=gammas[i] if gammas else 0.0,
                      epsilon=epsilons[i] if epsilons else 0.0, generator=generator, ws=ws)
        row.mul_(weights[i])
    _combine_chunks(flat_base, flat_out, count, weights, consensus, normalize, divisor, lambda_, ws,
                    lambda i, s, e, dst, tmp: scaled[i][s:e])
    return out


def _thresholds(flat_deltas, stats, densities, sparsify, rescale) -> list[Threshold | None] | None:
    if sparsify is None:
        return [None] * len(flat_deltas)
    if sparsify != "magnitude":
        return None
    if rescale and any(d < 1 for d in densities):
        return None  # the L1 rescale needs the kept tensor's norm first
    return [magnitude_threshold(d, s, density) for d, s, density in zip(flat_deltas, stats, densities)]


def _fill_thresholded(delta: torch.Tensor, threshold: Threshold | None, weight: float, start: int,
                      dst: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """dst = weight * delta where kept by the threshold, else 0 (== mergekit's (delta * mask) * weight)."""
    if threshold is None:
        return torch.mul(delta, weight, out=dst)
    if threshold.keep is not None:  # GPU: whole tensor in one chunk, scatter the kept positions
        tmp.zero_()
        tmp[threshold.keep] = 1
        tmp.mul_(weight)
        return torch.mul(delta, tmp, out=dst)
    torch.abs(delta, out=tmp)
    (torch.ge if threshold.inclusive else torch.gt)(tmp, threshold.value, out=tmp)  # 0/1 in the tensor's dtype
    if threshold.extra is not None:  # tied elements mergekit keeps: only when the cut splits a tie
        lo, hi = torch.searchsorted(threshold.extra, torch.tensor([start, start + delta.numel()],
                                                                    device=threshold.extra.device)).tolist()
        if hi > lo:
            tmp[threshold.extra[lo:hi] - start] = 1
    tmp.mul_(weight)  # {0, weight} exactly
    return torch.mul(delta, tmp, out=dst)


def _combine_chunks(flat_base: torch.Tensor, flat_out: torch.Tensor, count: int, weights: Sequence[float],
                    consensus: bool, normalize: bool, divisor: float | None, lambda_: float, ws: Workspace,
                    weighted) -> None:
    """flat_out = base + lambda * combination of the weighted deltas, chunk by chunk.

    ``weighted(i, start, end, dst, tmp)`` returns model i's weighted (sparsified) delta for [start, end),
    written into ``dst`` or a view of an existing buffer. Sums over the models accumulate in float32 for
    bfloat16/float16 and are rounded once, as ``torch.sum`` (mergekit's reduction) does.
    """
    numel = flat_base.numel()
    # On a GPU the whole tensor is one chunk: kernel launches, not caches, are what costs there.
    chunk = (numel if flat_base.device.type != "cpu" else min(CHUNK, numel)) or 1
    dtype = flat_base.dtype
    acc_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    rounded = acc_dtype != dtype
    rows = ws.get("gta_rows", (count, chunk), dtype)
    tmp_buf = ws.get("gta_tmp", (chunk,), dtype)
    total_buf = ws.get("gta_total", (chunk,), acc_dtype)
    sign_buf = ws.get("gta_sign", (chunk,), dtype)
    mixed_buf = ws.get("gta_mixed", (chunk,), acc_dtype) if rounded else None
    div_acc_buf = ws.get("gta_div_acc", (chunk,), acc_dtype) if (consensus and normalize) else None
    div_buf = ws.get("gta_div", (chunk,), dtype) if (consensus and normalize and rounded) else None
    for start in range(0, numel, chunk):
        end = min(numel, start + chunk)
        size = end - start
        out = flat_out[start:end]
        tmp = tmp_buf[:size]
        parts = [weighted(i, start, end, rows[i, :size], tmp) for i in range(count)]
        mixed = mixed_buf[:size] if rounded else out  # where the sum over models accumulates
        if not consensus:
            _sum_into(parts, mixed)
            if rounded:
                out.copy_(mixed)
            if divisor is not None:
                out.div_(divisor)
        else:
            total = total_buf[:size]
            _sum_into(parts, total)
            sign = sign_buf[:size]
            if rounded:
                sign.copy_(total)  # the rounded sum decides, like mergekit's reduced-precision sum
                torch.ge(sign, 0, out=sign)
            else:
                torch.ge(total, 0, out=sign)
            sign.mul_(2).sub_(1)  # majority sign: +1 where the weighted sum is >= 0, else -1
            div = div_acc_buf[:size] if div_acc_buf is not None else None
            for i, part in enumerate(parts):
                torch.mul(part, sign, out=tmp)
                torch.gt(tmp, 0, out=tmp)  # agrees with the majority (zeros agree with neither sign)
                if i == 0:
                    torch.mul(part, tmp, out=mixed)
                    if div is not None:
                        torch.mul(tmp, weights[0], out=div)
                else:
                    mixed.addcmul_(part, tmp)  # exact product (tmp is 0/1), so one rounding like a plain sum
                    if div is not None:
                        div.add_(tmp, alpha=weights[i])
            if rounded:
                out.copy_(mixed)
            if div is not None:
                if rounded:
                    div_buf[:size].copy_(div)
                    div = div_buf[:size]
                torch.eq(div, 0, out=tmp)
                div.add_(tmp)  # 0 -> 1
                out.div_(div)
        if lambda_ != 1:
            out.mul_(lambda_)
        out.add_(flat_base[start:end])


def _sum_into(parts: Sequence[torch.Tensor], acc: torch.Tensor) -> None:
    """acc = parts[0] + parts[1] + ... in order (what torch.sum over the model axis computes for few models)."""
    if len(parts) == 1 or parts[0].dtype != acc.dtype:  # reduced precision: add in acc's (float32) dtype
        acc.copy_(parts[0])
        rest = parts[1:]
    else:
        torch.add(parts[0], parts[1], out=acc)
        rest = parts[2:]
    for part in rest:
        acc.add_(part)
