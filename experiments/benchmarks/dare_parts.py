"""Where a bf16 DARE-TIES candidate's time goes, per element of one tensor, against one copy of its bytes.

One tensor of ``--elements`` (default 2**25, about a quarter of a 0.5B model's embedding) in bfloat16, a base
and two task vectors, one torch thread: the whole merge as the engine runs it (``run_method``: our Mersenne
Twister masks, ``mask * delta``, ``|kept|`` and its sum for the L1 rescale, then the fused rescale, weighting
and sign-consensus combine), and each per-task-vector part on its own. Medians of ``--repeats`` runs,
nanoseconds per element; the ratio is against ``out.copy_(base)`` measured in the same process.

Usage:
    python experiments/benchmarks/dare_parts.py [--elements N] [--repeats R]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evomerge.methods import METHODS, Workspace, mt_draws, prepare_inputs, run_method


def per_element(fn, n: int, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` calls, in nanoseconds per element of ``n``."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) / n * 1e9


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--elements", type=int, default=1 << 25)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    n, r = args.elements, args.repeats
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(n, generator=gen).to(torch.bfloat16)
    tensors = [base] + [(base.float() + torch.randn(n, generator=gen) * 0.01).to(torch.bfloat16) for _ in range(2)]
    spec = METHODS["dare_ties"]
    prepared = prepare_inputs(spec, tensors, 0)
    shared = {p.name: p.default for p in spec.global_params}
    per_model = [{p.name: p.default for p in spec.per_model_params} | {"weight": 0.6, "density": 0.4}] * 2
    out, ws = torch.empty_like(base), Workspace()

    def candidate() -> None:
        run_method(spec, prepared, shared, per_model, out, ws=ws, generator=torch.Generator().manual_seed(1))

    whole = per_element(candidate, n, r)
    copy = per_element(lambda: out.copy_(base), n, r)
    delta, kept, scratch = tensors[1] - base, torch.empty_like(base), torch.empty_like(base)
    draws = torch.Generator().manual_seed(1)
    parts = {
        "mask (mt_draws)": per_element(lambda: mt_draws.keep_mask_into(kept, 0.4, draws), n, r),
        "mask * delta": per_element(lambda: kept.mul_(delta), n, r),
        "|kept|": per_element(lambda: torch.abs(kept, out=scratch), n, r),
        "sum": per_element(lambda: scratch.sum(), n, r),
    }
    print(f"bf16 dare_ties, 2 task vectors, {n} elements, 1 thread, medians of {r} (ns per element)")
    print(f"  candidate {whole:.3f}   copy {copy:.3f}   ratio {whole / copy:.1f}x")
    print("  per task vector: " + "   ".join(f"{k} {v:.3f}" for k, v in parts.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
