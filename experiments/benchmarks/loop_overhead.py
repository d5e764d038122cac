"""Loop overhead and worker utilisation of the search driver (evomerge/search/driver.py).

1. Overhead per trial, one worker, a zero-cost evaluator: for consecutive trials, the time between two
   finishes minus the worker's own materialize + evaluate time of the second: everything the loop adds to a
   trial's wall time (Ray round trip, and whatever of the driver's bookkeeping - trials.jsonl append + fsync,
   tell, state checkpoint + fsync, next ask - is not overlapped by the two-slot worker queue). The driver's
   bookkeeping time itself is printed too. Target: median < 20 ms. Baseline, measured in the same run: a bare
   loop of Ray calls to an actor that does the same materialize + evaluate, no optimizer, no run folder.
2. Worker utilisation, two workers, a fixed-cost evaluator (0.25 s sleep): the workers' busy time over
   2 x the wall time from the first dispatch to the last finish. Target: >= 90 %.

    .venv/bin/python experiments/benchmarks/loop_overhead.py [--trials 150] [--optimizer random]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
HELPERS = REPO / "tests" / "search_helpers.py"


def experiment(family, evaluator: dict, optimizer: str, trials: int, workers: int) -> dict:
    return {
        "name": "bench",
        "models": {"base": str(family["base"]), "sources": {"m1": str(family["model_1"]),
                                                            "m2": str(family["model_2"])}},
        "search_space": "ps_ties_dare",
        "evaluators": [{"name": "e", "spec": evaluator}],
        "objectives": [{"metric": "e/w", "direction": "maximize"}],
        "optimizer": {"name": optimizer},
        "budget": {"trials": trials},
        "workers": {"count": workers, "threads": 1},
    }


def run(tmp: Path, name: str, exp: dict, address: str) -> list:
    from evomerge.search.launch import start_run

    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(exp))
    return start_run(path, out=tmp / name, address=address, progress=False).trials()


DRIVER_MS: list[float] = []


def time_driver_bookkeeping() -> None:
    """Measure the driver's own work per trial (record + tell + checkpoint + next ask), which the two-slot
    worker queue overlaps with the worker's next trial."""
    from evomerge.search.driver import SearchDriver

    finish, ask = SearchDriver._finish, SearchDriver._ask

    def timed_finish(self, *a, **k):
        t = time.perf_counter()
        finish(self, *a, **k)
        DRIVER_MS.append(1000 * (time.perf_counter() - t))

    def timed_ask(self, *a, **k):
        t = time.perf_counter()
        out = ask(self, *a, **k)
        if DRIVER_MS:
            DRIVER_MS[-1] += 1000 * (time.perf_counter() - t)
        return out

    SearchDriver._finish, SearchDriver._ask = timed_finish, timed_ask


def per_trial_overhead_ms(trials: list) -> list[float]:
    trials = sorted(trials, key=lambda t: t.finished_at)
    return [1000 * ((b.finished_at - a.finished_at) - b.seconds) for a, b in zip(trials, trials[1:])]


def bare_ray_overhead_ms(family, n: int) -> list[float]:
    """Baseline: the same worker class, called back to back from a plain loop (no optimizer, no files)."""
    import ray

    from evomerge.search.experiment import EvaluatorSpec
    from evomerge.search.search_space import PSSpace, load_space_definition
    from evomerge.search.worker import WorkerResources, WorkerSetup, make_worker_class

    space = PSSpace(load_space_definition("ps_ties_dare"), str(family["base"]),
                    {"m1": str(family["model_1"]), "m2": str(family["model_2"])})
    setup = WorkerSetup(kind="ps", initial=space.decode(space.x0()), threads=1, device="cpu",
                        evaluators=[EvaluatorSpec("e", {"type": "custom", "function": f"{HELPERS}:zero_cost"})])
    worker = make_worker_class(WorkerResources(1, 0)).remote(setup)
    assert ray.get(worker.ready.remote()).error is None
    import numpy as np

    rng = np.random.default_rng(0)
    out = []
    prev = time.time()
    for i in range(n):
        cand = space.decode(rng.random(space.dim))
        res = ray.get(worker.evaluate.remote(i, cand))
        now = time.time()
        if i:
            out.append(1000 * ((now - prev) - res.seconds))
        prev = now
    ray.kill(worker)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=150)
    parser.add_argument("--optimizer", default="random", help="random, cmaes, tpe, ... (default random)")
    parser.add_argument("--util-trials", type=int, default=40)
    parser.add_argument("--cost", type=float, default=0.25, help="fixed evaluator cost in seconds")
    args = parser.parse_args()

    import ray

    from evomerge import tiny

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    tmp = Path(tempfile.mkdtemp(prefix="evomerge-bench-"))
    family = tiny.make_family(tmp / "models", n_variants=2)
    ray_tmp = os.path.join(tempfile.gettempdir(), f"evomerge-ray-{os.getuid()}")
    os.makedirs(ray_tmp, exist_ok=True)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_tmp, logging_level="WARNING")
    address = ray.get_runtime_context().gcs_address
    try:
        zero = {"type": "custom", "function": f"{HELPERS}:zero_cost"}
        time_driver_bookkeeping()
        trials = run(tmp, "zero", experiment(family, zero, args.optimizer, args.trials, 1), address)
        loop_ms = per_trial_overhead_ms(trials)
        driver_ms = list(DRIVER_MS)
        work_ms = [1000 * t.seconds for t in trials]
        bare_ms = bare_ray_overhead_ms(family, args.trials)

        fixed = {"type": "custom", "function": f"{HELPERS}:fixed_cost", "kwargs": {"seconds": args.cost}}
        util_trials = run(tmp, "fixed", experiment(family, fixed, args.optimizer, args.util_trials, 2), address)
        start = min(t.finished_at - t.seconds for t in util_trials)
        end = max(t.finished_at for t in util_trials)
        busy = sum(t.seconds for t in util_trials)
        utilisation = busy / (2 * (end - start))
    finally:
        ray.shutdown()

    med_loop, med_bare = statistics.median(loop_ms), statistics.median(bare_ms)
    print(f"machine: {os.cpu_count()} CPUs, optimizer {args.optimizer}, tiny Llama PS space (4 genes)")
    print(f"[1] {len(trials)} trials, 1 worker, zero-cost evaluator")
    print(f"    worker materialize+evaluate per trial: median {statistics.median(work_ms):.2f} ms (excluded)")
    print(f"    evomerge loop overhead per trial:      median {med_loop:.2f} ms  (p90 "
          f"{sorted(loop_ms)[int(0.9 * len(loop_ms))]:.2f} ms)  target < 20 ms: "
          f"{'PASS' if med_loop < 20 else 'FAIL'}")
    print(f"    driver bookkeeping per trial:          median {statistics.median(driver_ms):.2f} ms "
          "(record+fsync, tell, checkpoint+fsync, next ask; overlapped by the 2-slot worker queue)")
    print(f"    baseline, bare Ray call loop:          median {med_bare:.2f} ms")
    print(f"    ratio loop / bare Ray:                 {med_loop / med_bare:.2f}x")
    print(f"[2] {len(util_trials)} trials, 2 workers, fixed {args.cost:.2f} s evaluator")
    print(f"    worker utilisation: {100 * utilisation:.1f} %  target >= 90 %: "
          f"{'PASS' if utilisation >= 0.9 else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
