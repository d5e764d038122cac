"""Cheap fitness vs full evaluation on the mini EvoLLM zoo: PS (the paper's parameter-space search) over search
seeds, both sides from one run.

    nice -n 10 .venv/bin/python experiments/benchmarks/adaptive_fitness.py [--seeds 0 1 2] [--trials 96]
        [--arms full race] [--workers 2] [--out .cache/adaptive_fitness] [--reuse]

For every search seed and arm (``full``: every candidate on all 500 search items; ``race``: fitness: race;
``minibatch``: fitness: minibatch), the real search loop runs experiments/mini_evollm/ps.yaml's search
(DARE-TIES per block, 24 genes, CMA-ES, sigma0 1/6, 96 trials, 2 workers) with the target task as fitness.
Printed per run and on average over seeds: the winner's held-out target accuracy (re-scored on the full
500-item test split), the item evaluations spent (and their ratio to the full arm's), the wall time (and its
ratio). The issue's target: adaptive winners within 1 point of the full winners on average (or above) with at
most 1/5 of the item evaluations. Printed too: the curve of held-out accuracy against item evaluations for
every arm (the best fully scored trial after each share of the full arm's item evaluations, re-scored on the
test split), which shows what a smaller budget would have given either way.

The zoo is built (about 5 min) or reused from .cache/mini_evollm (experiments/mini_evollm/zoo.py); everything
this writes goes under --out (an ignored folder): run folders, results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO / "experiments" / "mini_evollm"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import mini_task  # noqa: E402
import zoo  # noqa: E402

ARMS: dict[str, dict[str, Any]] = {
    "full": {"mode": "full"},
    # a candidate stops when even the optimistic end of a 90% Wilson bound on its whole-split accuracy falls
    # below the best fully scored trial; checkpoints 25, 50, 100, 200, 400, 500 items
    "race": {"mode": "race", "min_items": 25, "growth": 2.0, "confidence": 0.9, "bound": "wilson",
             "against": "best"},
    # the paper's DFS fitness: a fresh 50-item subset per candidate; the whole split when it reaches the best
    "minibatch": {"mode": "minibatch", "batch_items": 50, "against": "best"},
}
SHARES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)  # of the full arm's item evaluations, for the curve


def log(msg: str) -> None:
    print(f"[adaptive_fitness {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class RunResult:
    """One search: its arm and seed, trials, items, wall time, and the test accuracy of trials re-scored."""

    arm: str
    seed: int
    wall_s: float
    records: list[Any]
    test_acc: dict[int, float] = field(default_factory=dict)  # trial id -> held-out target accuracy

    @property
    def items(self) -> int:
        return sum(r.items or 0 for r in self.records)

    def best_within(self, budget: float) -> Any:
        """The best fully scored trial among those finished within ``budget`` item evaluations (trial order)."""
        spent, best = 0, None
        for r in sorted(self.records, key=lambda r: r.trial):
            spent += r.items or 0
            if spent > budget:
                break
            if r.ok and r.full and r.score is not None and (best is None or r.score > best.score):
                best = r
        return best


def experiment(zoo_path: Path, arm: str, trials: int, workers: int, seed: int) -> dict[str, Any]:
    """ps.yaml's search on the zoo, with the per-item target evaluator and the arm's fitness."""
    return {
        "name": f"adaptive_{arm}",
        "seed": seed,
        "models": {"base": str(zoo_path / "base"),
                   "sources": {"math": str(zoo_path / "spec_a"), "lang": str(zoo_path / "spec_b")}},
        "search_space": "ps_ties_dare_blocks",
        "evaluators": [{"name": "target", "spec": {"type": "custom", "function": f"{HERE / 'mini_items.py'}:target",
                                                   "kwargs": {"split": "target_search"}}}],
        "objectives": [{"metric": "target/accuracy", "direction": "maximize"}],
        "optimizer": {"name": "cmaes", "sigma0": 0.1667},
        "budget": {"trials": trials},
        "workers": {"count": workers, "threads": 1},
        "fitness": ARMS[arm],
    }


def run_arm(zoo_path: Path, out: Path, arm: str, seed: int, args: argparse.Namespace, address: str) -> RunResult:
    import yaml

    from evomerge.search.launch import start_run
    from evomerge.search.run_folder import RunFolder

    run_dir = out / f"{arm}-seed{seed}"
    wall_file = out / f"{arm}-seed{seed}.wall_s"
    if args.reuse and wall_file.is_file():  # a finished run of an earlier invocation (same settings)
        result = RunResult(arm, seed, float(wall_file.read_text()), RunFolder.open(run_dir).trials())
        log(f"{arm} seed {seed}: reused {run_dir} ({len(result.records)} trials, {result.items} item evaluations)")
        return result
    shutil.rmtree(run_dir, ignore_errors=True)
    exp_file = out / "experiments" / f"{arm}-seed{seed}.yaml"
    exp_file.parent.mkdir(parents=True, exist_ok=True)
    exp_file.write_text(yaml.safe_dump(experiment(zoo_path, arm, args.trials, args.workers, seed), sort_keys=False))
    t0 = time.perf_counter()
    run = start_run(exp_file, out=run_dir, address=address, progress=False)
    result = RunResult(arm, seed, time.perf_counter() - t0, run.trials())
    wall_file.write_text(f"{result.wall_s}\n")
    log(f"{arm} seed {seed}: {len(result.records)} trials, {result.items} item evaluations, "
        f"{sum(r.full for r in result.records)} fully scored, {result.wall_s:.0f} s")
    return result


class TestScorer:
    """Re-scores trials' candidates on the held-out 500-item target test split (one engine, weights in place)."""

    def __init__(self, zoo_path: Path):
        from evomerge.engine import MergeEngine

        self.zoo_path = zoo_path
        self.engine_cls = MergeEngine
        self.engine: Any = None
        self.evaluator = mini_task.make_evaluator("target_test")

    def __call__(self, record: Any) -> float:
        if self.engine is None:
            self.engine = self.engine_cls(record.candidate)
        model = self.engine.materialize(record.candidate)
        return float(self.evaluator.evaluate(model, self.engine.tokenizer)["accuracy"])


def score_curves(results: list[RunResult], scorer: TestScorer) -> None:
    """Re-score, for every run, the winner and the best trial within each share of the full arm's items."""
    full_items = {r.seed: r.items for r in results if r.arm == "full"}
    for res in results:
        budget = full_items.get(res.seed, res.items)
        wanted = [res.best_within(s * budget) for s in SHARES] + [res.best_within(float("inf"))]
        for rec in wanted:
            if rec is not None and rec.trial not in res.test_acc:
                res.test_acc[rec.trial] = scorer(rec)


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def report(results: list[RunResult], arms: list[str]) -> dict[str, Any]:
    """Print the per-run table, the means, the target's verdict and the curve; return them as a mapping."""
    full = {r.seed: r for r in results if r.arm == "full"}
    print("\n| arm | seed | trials | fully scored | item evals | items / full | wall s | wall / full | "
          "search acc % | held-out acc % |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[str, Any] = {"runs": [], "means": {}, "curve": {}}
    for r in results:
        best = r.best_within(float("inf"))
        base = full.get(r.seed)
        row = {"arm": r.arm, "seed": r.seed, "trials": len(r.records), "full": sum(x.full for x in r.records),
               "items": r.items, "items_ratio": r.items / base.items if base else None, "wall_s": r.wall_s,
               "wall_ratio": r.wall_s / base.wall_s if base else None,
               "search_acc": best.score if best else None, "test_acc": r.test_acc.get(best.trial) if best else None}
        summary["runs"].append(row)
        print(f"| {r.arm} | {r.seed} | {row['trials']} | {row['full']} | {r.items} | "
              f"{row['items_ratio']:.3f} | {r.wall_s:.0f} | {row['wall_ratio']:.2f} | {pct(row['search_acc'])} | "
              f"{pct(row['test_acc'])} |")
    print("\nMeans over seeds:")
    for arm in arms:
        rows = [x for x in summary["runs"] if x["arm"] == arm]
        m = {k: statistics.mean(x[k] for x in rows) for k in ("test_acc", "items_ratio", "wall_ratio", "items")}
        summary["means"][arm] = m
        print(f"  {arm}: held-out acc {pct(m['test_acc'])} %, items / full {m['items_ratio']:.3f}, "
              f"wall / full {m['wall_ratio']:.2f}, item evaluations {m['items']:.0f}")
    for arm in arms:
        if arm == "full":
            continue
        diff = 100 * (summary["means"][arm]["test_acc"] - summary["means"]["full"]["test_acc"])
        ratio = summary["means"][arm]["items_ratio"]
        ok = diff >= -1.0 and ratio <= 0.2
        summary["means"][arm]["diff_points"] = diff
        print(f"  target ({arm} vs full: held-out within 1 point or above, items <= 1/5): "
              f"{diff:+.1f} points at {ratio:.3f} of the items -> {'MET' if ok else 'NOT MET'}")
    print("\nHeld-out accuracy % of the best fully scored trial after a share of the full arm's item evaluations "
          "(mean over seeds):")
    print("| share of full items | " + " | ".join(arms) + " |")
    print("|---|" + "---|" * len(arms))
    for s in SHARES:
        cells = []
        for arm in arms:
            vals = []
            for r in (x for x in results if x.arm == arm):
                rec = r.best_within(s * full[r.seed].items if r.seed in full else s * r.items)
                vals.append(None if rec is None else r.test_acc.get(rec.trial))
            known = [v for v in vals if v is not None]
            mean = statistics.mean(known) if len(known) == len(vals) and known else None
            summary["curve"].setdefault(arm, {})[str(s)] = mean
            cells.append(pct(mean) if mean is not None else "- (no fully scored trial yet)")
        print(f"| {s:.2f} | " + " | ".join(cells) + " |")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--arms", nargs="+", default=["full", "race"], choices=sorted(ARMS))
    ap.add_argument("--out", default=str(REPO / ".cache" / "adaptive_fitness"))
    ap.add_argument("--reuse", action="store_true",
                    help="reuse the finished runs an earlier invocation left in --out (same settings), run the rest")
    args = ap.parse_args(argv)
    if "full" not in args.arms:
        ap.error("--arms must include full (the baseline)")
    import ray
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    zoo_path = zoo.build_zoo()
    log(f"zoo ready ({time.perf_counter() - t0:.0f} s)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_tmp = tempfile.mkdtemp(prefix="evomerge-ray-adaptive-")  # short: Ray's socket paths have a length limit
    ray.init(num_cpus=args.workers, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
    try:
        address = ray.get_runtime_context().gcs_address
        results = [run_arm(zoo_path, out, arm, seed, args, address) for seed in args.seeds for arm in args.arms]
    finally:
        ray.shutdown()
    log("re-scoring winners and curve points on the held-out test split")
    score_curves(results, TestScorer(zoo_path))
    summary = report(results, args.arms)
    summary["command"] = " ".join(["experiments/benchmarks/adaptive_fitness.py", *(argv or sys.argv[1:])])
    summary["arms"] = {a: ARMS[a] for a in args.arms}
    summary["total_s"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    log(f"done in {summary['total_s']:.0f} s; {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
