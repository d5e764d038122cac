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

Speed (this is what every search candidate runs): on CPU, sign-consensus merges (ties, dare_ties,
breadcrumbs_ties, della; float32/float64/bfloat16/float16) go through one fused C++ loop (``fused_ties.py``,
built on first use; bit-identical to the torch kernel below, the fallback where no compiler is available).
The torch kernel: steps 2-4 are elementwise, so they run over chunks of ``CHUNK`` elements whose
temporaries stay in the CPU cache; the sources are read from memory once and the output written once.
Each chunk costs about twenty elementwise passes, so the kernel is built to need few:

- TIES' top-k needs no sort per candidate: the precomputed order of ``|delta|`` gives the k-th largest value,
  and keeping ``|delta| >= value`` is one ``hardshrink`` with lambda just below it (a float compare, exact);
  only when the cut splits a run of tied magnitudes are the tied elements mergekit keeps copied back in;
- the weights multiply the kept deltas in place (``(delta * mask) * weight`` is ``delta * weight`` where kept);
- sign election without a +-1 tensor: the sign bit of the weighted sum is the majority sign (a -0 sum means
  every part is a zero, which agrees with neither sign), so ``part * s`` is an integer xor of sign bits,
  ``relu`` of it keeps exactly the agreeing magnitudes, their sum times ``s`` (another xor, after the
  division) is mergekit's agreeing sum, and ``> 0`` of them gives the 0/1 agreement for the divisor;
- with all weights positive a nonzero divisor is at least the smallest weight, so mergekit's "0 -> 1" is a
  ``clamp_min`` to it (0 / w = 0 / 1 = 0); otherwise the zeros are replaced explicitly;
- chunk views, 0-dim weight tensors and buffers are made once per tensor, not per chunk.

Every product and sum is evaluated in the same order and rounding as mergekit (products before sums, no fused
multiply-add where it could change a rounding, bfloat16/float16 sums accumulated in float32 and rounded once),
so the sign election sees bit-identical sums and the result equals mergekit's bit for bit, except that where
the base element is -0 and the merged delta a zero, the output zero's sign may differ (equal values).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

import evomerge.methods.fused_ties as fused_ties  # the module, so tests can switch the kernel off
from evomerge.methods.sparsify import DeltaStats, Sparsification, Threshold, magnitude_threshold, sparsify_into
from evomerge.methods.workspace import Workspace

CHUNK = 1 << 18  # elements per chunk: a few float buffers of this size fit in L2/L3


#: ``weighted(index, start, rows, parts, tmp) -> (rows, parts)``: the weighted task vectors of one chunk
RowsFn = Callable[[int, int, torch.Tensor, Sequence[torch.Tensor], torch.Tensor],
                  tuple[torch.Tensor, Sequence[torch.Tensor]]]


@dataclass(frozen=True)
class TaskArithmeticSettings:
    """One tensor's resolved parameters for the task-arithmetic family (per model: one entry per delta)."""

    weights: Sequence[float]  # per model: scale of its task vector (applied before sign election)
    densities: Sequence[float]  # per model: fraction of its task vector kept, in [0, 1]
    sparsify: str | None  # one of sparsify.SPARSIFY_METHODS, or None (no sparsification)
    consensus: bool  # TIES sign election
    normalize: bool  # divide by the sum of the (agreeing) weights
    rescale: bool  # rescale the kept elements after sparsification
    lambda_: float = 1.0  # scale of the merged task vector
    rescale_mode: str = "l1"  # one of sparsify.RESCALE_MODES
    gammas: Sequence[float] | None = None  # per model, magnitude_outliers only
    epsilons: Sequence[float] | None = None  # per model, della_magprune only

    def sparsification(self, i: int) -> Sparsification:
        """Model ``i``'s sparsification (``sparsify`` must not be None)."""
        assert self.sparsify is not None
        return Sparsification(self.sparsify, self.densities[i], self.rescale, self.rescale_mode,
                              gamma=self.gammas[i] if self.gammas else 0.0,
                              epsilon=self.epsilons[i] if self.epsilons else 0.0)


def merge_task_arithmetic(base: torch.Tensor, deltas: Sequence[torch.Tensor], stats: Sequence[DeltaStats | None],
                          out: torch.Tensor, settings: TaskArithmeticSettings, *,
                          generator: torch.Generator | None = None, ws: Workspace) -> torch.Tensor:
    """out = base + lambda * combine(weight_i * sparsify(delta_i)) (mergekit's GeneralizedTaskArithmeticMerge).

    Args:
        base: the base model's tensor, any shape, in the compute dtype (float32/float64/bfloat16/float16).
        deltas: one task vector ``theta_i - base`` per model, base's shape and dtype.
        stats: per delta, its sparsification statistics (``prepare_stats``; None without sparsification).
        out: output buffer of base's shape, dtype and device; overwritten.
        settings: the resolved parameters.
        generator: the random stream of DARE / DELLA drops.
        ws: scratch buffers, reused across calls.

    Returns:
        ``out``.
    """
    flat_out = out.view(-1)
    flat_base = base.reshape(-1)
    if not deltas:
        flat_out.copy_(flat_base)
        return out
    flat_deltas = [d.reshape(-1) for d in deltas]
    combine = _Combination.of(settings, len(deltas), flat_base)
    weights = combine.weights
    consensus, normalize, lambda_ = settings.consensus, settings.normalize, settings.lambda_

    # Fast path: no sparsification, or TIES' magnitude top-k without rescale -> thresholds, one chunked pass.
    thresholds = _thresholds(flat_deltas, stats, settings.densities, settings.sparsify, settings.rescale)
    if thresholds is not None:
        if consensus and fused_ties.ties_combine(flat_base, flat_deltas, thresholds, weights, normalize, lambda_,
                                                 flat_out):
            return out
        rows = _thresholded_rows(flat_deltas, thresholds, weights, flat_base.numel(), combine.chunk)
        _combine_chunks(flat_base, flat_out, combine, rows, ws)
        return out

    # General path: sparsify each whole delta (random draws and L1 rescale need the whole tensor), then combine.
    if consensus and fused_ties.accepts(flat_base, flat_deltas, flat_out):
        # the fused kernel rescales (DARE's L1 factor) and weights the sparsified rows as it reads them
        scaled, factors = _sparsified_rows(base.dtype, deltas, stats, settings, None, generator, ws)
        if fused_ties.ties_combine(flat_base, list(scaled.unbind(0)), None, weights, normalize, lambda_, flat_out,
                                   factors=factors):
            return out
        for i, row in enumerate(scaled):  # (the kernel declined after all: rescale and weight here)
            if factors[i] != 1.0:
                row.mul_(torch.tensor(factors[i], dtype=row.dtype))
            row.mul_(weights[i])
    else:
        scaled, _ = _sparsified_rows(base.dtype, deltas, stats, settings, weights, generator, ws)

    def rows_of_scaled(index: int, start: int, rows: torch.Tensor, parts: Sequence[torch.Tensor],
                       tmp: torch.Tensor) -> tuple[torch.Tensor, Sequence[torch.Tensor]]:
        """Chunk ``index``'s slice of the prepared rows (views, nothing copied)."""
        view = scaled[:, start:start + rows.shape[1]]
        return view, view.unbind(0)

    _combine_chunks(flat_base, flat_out, combine, rows_of_scaled, ws)
    return out


@dataclass(frozen=True)
class _Combination:
    """How the weighted task vectors of one tensor are combined, chunk by chunk."""

    count: int  # number of task vectors
    weights: list[float]  # rounded to the deltas' dtype, as mergekit's weight tensor is
    consensus: bool
    normalize: bool
    divisor: float | None  # without consensus: the sum of the weights (|sum| < 1e-8 -> 1), when normalizing
    lambda_: float
    chunk: int  # elements per chunk

    @classmethod
    def of(cls, settings: TaskArithmeticSettings, count: int, flat_base: torch.Tensor) -> _Combination:
        # mergekit multiplies by a weight tensor in the deltas' dtype: use the weights rounded to it.
        """The combination of ``count`` task vectors for ``settings`` (weights rounded to the dtype)."""
        weights = torch.tensor([float(w) for w in settings.weights], dtype=flat_base.dtype).tolist()
        divisor = None
        if settings.normalize and not settings.consensus:
            divisor = float(torch.tensor(list(weights), dtype=flat_base.dtype).sum())
            if abs(divisor) < 1e-8:
                divisor = 1.0
        numel = flat_base.numel()
        # On a GPU the whole tensor is one chunk: kernel launches, not caches, are what costs there.
        chunk = (numel if flat_base.device.type != "cpu" else min(CHUNK, numel)) or 1
        return cls(count=count, weights=weights, consensus=settings.consensus, normalize=settings.normalize,
                   divisor=divisor, lambda_=settings.lambda_, chunk=chunk)


def _sparsified_rows(dtype: torch.dtype, deltas: Sequence[torch.Tensor], stats: Sequence[DeltaStats | None],
                     settings: TaskArithmeticSettings, weights: Sequence[float] | None,
                     generator: torch.Generator | None, ws: Workspace) -> tuple[torch.Tensor, list[float]]:
    """A ``(count, numel)`` buffer in ``dtype`` whose row i is weight_i * sparsify(delta_i) (whole tensors).

    ``weights=None``: the rows are sparsified only, and DARE's L1 rescale is deferred where it can be: the
    factors returned (1.0: nothing deferred) are for the fused kernel to apply, before the weights.
    """
    scaled = ws.get("gta_scaled", (len(deltas), deltas[0].numel()), dtype)
    factors = [1.0] * len(deltas)
    for i, delta in enumerate(deltas):
        row = scaled[i]
        if settings.sparsify is None:
            if weights is None:
                row.copy_(delta.reshape(-1))
            else:
                torch.mul(delta.reshape(-1), weights[i], out=row)
            continue
        stat = stats[i]
        assert stat is not None, "prepare_stats gives every delta statistics when it is sparsified"
        factors[i] = sparsify_into(delta, stat, settings.sparsification(i), row, generator=generator, ws=ws,
                                   defer_rescale=weights is None)
        if weights is not None:
            row.mul_(weights[i])
    return scaled, factors


def _thresholds(flat_deltas, stats, densities, sparsify, rescale) -> list[Threshold | None] | None:
    if sparsify is None:
        return [None] * len(flat_deltas)
    if sparsify != "magnitude" or any(d <= 0 for d in densities):
        return None  # density 0 drops the whole task vector: the general path zeroes it (top-k keeps at least 1)
    if rescale and any(d < 1 for d in densities):
        return None  # the L1 rescale needs the kept tensor's norm first
    return [magnitude_threshold(d, s, density) for d, s, density in zip(flat_deltas, stats, densities)]


def _thresholded_rows(flat_deltas: Sequence[torch.Tensor], thresholds: Sequence[Threshold | None],
                      weights: Sequence[float], numel: int, chunk: int):
    """The fast path's ``weighted`` callback: model i's row = weight_i * (delta_i kept by its threshold).

    A threshold keeps ``|delta| >= value`` (or ``> value``), which is one ``hardshrink`` (``x`` where
    ``|x| > lambda``, else 0) with lambda the next value below ``value`` in the tensor's dtype; elements tied at
    the cut that mergekit's sort keeps (``extra``) are copied back in. The kept values are the delta's own, so
    multiplying by the weight afterwards gives mergekit's ``(delta * mask) * weight`` exactly (a dropped element
    is +0 where mergekit has -0 for a negative delta: equal values, and every later use compares or adds it).
    """
    dtype = flat_deltas[0].dtype
    pieces = [d.split(chunk) for d in flat_deltas]
    # 0-dim CPU tensors (scalars to any device): a Python number costs a conversion on every call
    factors = [torch.tensor(w, dtype=dtype) for w in weights]
    lambdas = [t.shrink_lambda(dtype) if t is not None and t.keep is None else None for t in thresholds]
    # per chunk, the slice of each sorted ``extra`` list that falls inside it
    extras = [None if t is None else t.sorted_extra() for t in thresholds]
    bounds = [None if e is None else
              torch.searchsorted(e, torch.arange(0, numel + chunk, chunk, device=e.device)).tolist() for e in extras]

    def fill(index: int, start: int, rows: torch.Tensor, parts: Sequence[torch.Tensor], tmp: torch.Tensor):
        """Fill ``parts`` with chunk ``index``'s thresholded, weighted deltas; return ``rows``, ``parts``."""
        for i, threshold in enumerate(thresholds):
            src, row = pieces[i][index], parts[i]
            if threshold is None:
                torch.mul(src, factors[i], out=row)
                continue
            if threshold.keep is not None:  # GPU: whole tensor in one chunk, scatter the kept positions
                tmp.zero_()
                tmp[threshold.keep] = 1
                torch.mul(src, tmp, out=row)
            else:
                shrink, bound = lambdas[i], bounds[i]
                assert shrink is not None
                torch.hardshrink(src, shrink, out=row)
                lo, hi = (bound[index], bound[index + 1]) if bound is not None else (0, 0)
                extra = extras[i]
                if hi > lo and extra is not None:  # tied elements mergekit keeps: only when the cut
                    positions = extra[lo:hi] - start  # splits a tie (bounds exist only with extra)
                    row[positions] = src[positions]
            if weights[i] != 1:  # x * 1 == x
                row.mul_(factors[i])
        return rows, parts

    return fill


@dataclass
class _ChunkBuffers:
    """Per-tensor scratch of ``_combine_chunks`` (chunk-sized; the last chunk uses a prefix of each)."""

    rows: torch.Tensor  # (count, chunk): the weighted task vectors of one chunk
    tmp: torch.Tensor
    rounded: bool  # bfloat16/float16: sums accumulate in float32 and are rounded once
    bits: torch.dtype  # an integer dtype of the floats' width: the sign flip is an exact xor
    sign_bit: torch.Tensor
    total: torch.Tensor | None  # the weighted sum whose sign is elected
    signs: torch.Tensor | None
    mixed: torch.Tensor | None  # where the sum over models accumulates when rounded
    div_acc: torch.Tensor | None  # the agreeing weights' sum
    div: torch.Tensor | None  # ... rounded to the dtype
    min_weight: float | None  # the smallest weight when all are positive (the zero-divisor clamp)

    @classmethod
    def of(cls, dtype: torch.dtype, combine: _Combination, ws: Workspace) -> _ChunkBuffers:
        """The buffers a combination needs (from ``ws``: reused across calls)."""
        count, chunk, consensus = combine.count, combine.chunk, combine.consensus
        acc_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
        rounded = acc_dtype != dtype
        bits = _SIGN_BITS[dtype.itemsize]
        total = ws.get("gta_total", (chunk,), acc_dtype) if consensus and (count > 1 or rounded) else None
        div_acc = None
        if consensus and combine.normalize:  # the divisor accumulates where the sum was (free once signs are taken)
            div_acc = total if total is not None else ws.get("gta_div_acc", (chunk,), acc_dtype)
        # mergekit replaces a zero divisor by 1; when every weight is positive a nonzero divisor (a sum of some of
        # the weights) is at least the smallest weight, so clamping to it changes only the zeros, and 0 / w = 0 / 1.
        weights = combine.weights
        return cls(rows=ws.get("gta_rows", (count, chunk), dtype), tmp=ws.get("gta_tmp", (chunk,), dtype),
                   rounded=rounded, bits=bits, sign_bit=torch.tensor(torch.iinfo(bits).min, dtype=bits),
                   total=total, signs=ws.get("gta_signs", (chunk,), bits) if consensus else None,
                   mixed=ws.get("gta_mixed", (chunk,), acc_dtype) if rounded else None, div_acc=div_acc,
                   div=ws.get("gta_div", (chunk,), dtype) if (consensus and combine.normalize and rounded) else None,
                   min_weight=min(weights) if min(weights) > 0 else None)


def _combine_chunks(flat_base: torch.Tensor, flat_out: torch.Tensor, combine: _Combination, weighted: RowsFn,
                    ws: Workspace) -> None:
    """flat_out = base + lambda * combination of the weighted deltas, chunk by chunk.

    ``weighted(index, start, rows, parts, tmp)`` returns model i's weighted (sparsified) deltas for chunk
    ``index`` (elements ``[start, start + size)``) as a ``(count, size)`` tensor and its rows: either ``rows``
    (and its row views ``parts``) filled in, or views of an existing buffer. The combination may overwrite them.
    Sums over the models accumulate in float32 for bfloat16/float16 and are rounded once, as ``torch.sum``
    (mergekit's reduction) does.
    """
    chunk = combine.chunk
    buf = _ChunkBuffers.of(flat_base.dtype, combine, ws)
    full_rows = buf.rows.unbind(0)
    for index, (base, out) in enumerate(zip(flat_base.split(chunk), flat_out.split(chunk))):
        size = out.numel()
        if size == chunk:
            rows, parts = weighted(index, index * chunk, buf.rows, full_rows, buf.tmp)
        else:
            rows = buf.rows[:, :size]
            rows, parts = weighted(index, index * chunk, rows, rows.unbind(0), buf.tmp[:size])
        mixed = buf.mixed[:size] if buf.mixed is not None else out  # where the sum over models accumulates
        if combine.consensus:
            _combine_agreeing(combine, buf, rows, parts, mixed, base, out)
            continue
        _sum_into(parts, mixed)
        if buf.rounded:
            out.copy_(mixed)
        if combine.divisor is not None:
            out.div_(combine.divisor)
        if combine.lambda_ != 1:
            out.mul_(combine.lambda_)
        out.add_(base)


def _combine_agreeing(combine: _Combination, buf: _ChunkBuffers, rows: torch.Tensor, parts: Sequence[torch.Tensor],
                      mixed: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> None:
    """One chunk with TIES sign election: out = base + lambda * (sum of the agreeing parts [/ their weights]).

    The majority sign s is + where the weighted sum is >= 0 (a sum is -0 only when every part is a zero, which
    agrees with neither sign, so its sign bit can stand for s). Part i agrees where part_i * s > 0, so
    relu(part_i * s) is |part_i| there and 0 elsewhere; the agreeing sum is s times the sum of those, and a flip
    of the sign bit is an exact multiplication by -1.
    """
    size = out.numel()
    assert buf.signs is not None
    if buf.total is None:
        total = parts[0]
    else:
        total = buf.total[:size]
        _sum_into(parts, total)
        if buf.rounded:
            tmp = buf.tmp[:size]
            tmp.copy_(total)  # the rounded sum decides, like mergekit's reduced-precision sum
            total = tmp
    signs = buf.signs[:size]
    torch.bitwise_and(total.view(buf.bits), buf.sign_bit, out=signs)
    rows.view(buf.bits).bitwise_xor_(signs)
    rows.relu_()
    _sum_into(parts, mixed)
    if buf.rounded:
        out.copy_(mixed)
    if combine.normalize:
        out.div_(_agreeing_weights(combine, buf, rows, parts, size))
    if combine.lambda_ != 1:
        out.mul_(combine.lambda_)
    out.view(buf.bits).bitwise_xor_(signs)  # times s
    out.add_(base)


def _agreeing_weights(combine: _Combination, buf: _ChunkBuffers, rows: torch.Tensor, parts: Sequence[torch.Tensor],
                      size: int) -> torch.Tensor:
    """Per element, the sum of the weights of the agreeing parts (``rows`` holds their magnitudes; 0 -> 1)."""
    assert buf.div_acc is not None
    weights = combine.weights
    torch.gt(rows, 0, out=rows)  # 1 where part i agrees, else 0
    div = buf.div_acc[:size]
    torch.mul(parts[0], weights[0], out=div)
    for i in range(1, combine.count):
        div.add_(parts[i], alpha=weights[i])  # exact product (0 or w), so one rounding like a plain sum
    if buf.div is not None:  # rounded
        div = buf.div[:size]
        div.copy_(buf.div_acc[:size])
    if buf.min_weight is not None:
        div.clamp_min_(buf.min_weight)
    else:
        tmp = buf.tmp[:size]
        torch.eq(div, 0, out=tmp)
        div.add_(tmp)  # 0 -> 1
    return div


_SIGN_BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}


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
