"""Does the TIES engine's int32 sort order per task-vector element pay for itself? CPU time, one thread.

The in-memory engine can keep, per task vector, the int32 order of ``|delta|`` (``MemoryOptions.keep_order``):
a candidate's top-k is then a threshold lookup. Without it every candidate runs the one-shot selection of
``evomerge merge`` (a k-th value, and a full sort wherever the cut splits a run of tied magnitudes: the rule in
bf16). This measures, on tensors of the Qwen2.5-0.5B shape (bf16 base + 2 task vectors, dense fine-tune noise):
the time to build the orders once, a candidate's merge with and without them (median of ``--candidates`` random
weight/density draws, the same draws for both), and their memory; then the number of candidates after which
the orders have paid for their construction. The copy is one copy of the tensor's bytes into a buffer already
written once (no page faults), measured after each candidate: the "/ copy" columns are issue 14's
"materializes in at most 3x the time to copy its bytes" per tensor.

Times are the calling thread's CPU time (``time.thread_time``, torch on one thread), so other jobs on a shared
machine slow the wall clock but not these figures much; both variants and the copy run in this one process,
interleaved; medians.

Last measured (docs/MEMORY.md; shared 2-core AMD EPYC, load 11-13, AVX-512 build of the fused kernel): with the
orders a candidate takes 9.6x / 7.3x / 5.8x one copy at 896x896 / 4864x896 / 37984x896 (before the bitmap of
tied elements and the register-resident kernel: 18.1x / 14.3x / 13.1x); without them 950-1120x.

Usage:
    python experiments/benchmarks/ties_order.py                    # MLP, attention and a 1/4 embedding slice
    python experiments/benchmarks/ties_order.py --candidates 9 --shapes 4864x896,151936x896
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from evomerge.methods import METHODS, Workspace, prepare_inputs, run_method


def one_shape(rows: int, cols: int, candidates: int) -> dict:
    """Build time, per-candidate times with and without orders, and bytes, for one (rows, cols) bf16 tensor."""
    spec = METHODS["ties"]
    gen = torch.Generator().manual_seed(rows * 31 + cols)
    base = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    tensors = [base] + [(base.float() + 0.002 * torch.randn(rows, cols, generator=gen)).to(torch.bfloat16)
                        for _ in range(2)]
    start = time.thread_time()
    ordered = prepare_inputs(spec, tensors, 0, lazy=False)
    build_ordered = time.thread_time() - start
    start = time.thread_time()
    plain = prepare_inputs(spec, tensors, 0, lazy=True)
    build_plain = time.thread_time() - start
    shared = {p.name: p.default for p in spec.global_params}
    rng = random.Random(5)
    draws = [[{"weight": rng.uniform(0.1, 1.0), "density": rng.uniform(0.2, 0.9)} for _ in range(2)]
             for _ in range(candidates)]
    times: dict[str, list[float]] = {"ordered": [], "plain": [], "copy": []}
    outs = {"ordered": torch.zeros_like(base), "plain": torch.zeros_like(base)}
    spaces = {"ordered": Workspace(torch.device("cpu")), "plain": Workspace(torch.device("cpu"))}
    copy = torch.zeros_like(base)  # touched now: a first write's page faults are not the copy's cost
    for per_model in draws:
        for name, inputs in (("ordered", ordered), ("plain", plain)):
            start = time.thread_time()
            run_method(spec, inputs, shared, per_model, outs[name], ws=spaces[name])
            times[name].append(time.thread_time() - start)
        assert torch.equal(outs["ordered"], outs["plain"]), "both paths give mergekit's tensor"
        start = time.thread_time()
        copy.copy_(base)
        times["copy"].append(time.thread_time() - start)
    return {"shape": f"{rows}x{cols}", "elements": rows * cols, "build_ordered_s": build_ordered,
            "build_plain_s": build_plain, "ordered_s": statistics.median(times["ordered"]),
            "plain_s": statistics.median(times["plain"]), "copy_s": statistics.median(times["copy"]),
            "order_bytes": ordered.nbytes - plain.nbytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="896x896,4864x896,37984x896")
    parser.add_argument("--candidates", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"ties, bf16 base + 2 task vectors, one thread, CPU seconds; medians of {args.candidates} candidates")
    print(f"{'shape':>12s} {'build w/ order':>14s} {'w/o':>6s} {'cand w/ order':>13s} {'w/o order':>9s} "
          f"{'copy':>7s} {'w/ / copy':>9s} {'w/o / copy':>10s} {'order B/elem':>12s} {'pays after':>10s}")
    for shape in args.shapes.split(","):
        rows, cols = (int(x) for x in shape.split("x"))
        r = one_shape(rows, cols, args.candidates)
        saved = r["plain_s"] - r["ordered_s"]
        extra = r["build_ordered_s"] - r["build_plain_s"]
        pays = f"{extra / saved:.0f} cand." if saved > 0 else "never"
        print(f"{r['shape']:>12s} {r['build_ordered_s']:14.3f} {r['build_plain_s']:6.3f} {r['ordered_s']:13.4f} "
              f"{r['plain_s']:9.4f} {r['copy_s']:7.4f} {r['ordered_s'] / r['copy_s']:9.1f} "
              f"{r['plain_s'] / r['copy_s']:10.1f} {r['order_bytes'] / r['elements']:12.1f} {pays:>10s}", flush=True)


if __name__ == "__main__":
    main()
