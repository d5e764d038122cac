"""`evomerge run EXPERIMENT.yaml [--out DIR] [--address ADDR] [--workers N] [--seed S]` and
`evomerge run --resume DIR`: start or continue an evolutionary merge search (see evomerge/search/loop.py)."""

from __future__ import annotations

import argparse

from evomerge.errors import EvomergeError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("experiment", nargs="?", help="experiment YAML (see experiments/smoke.yaml)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run in DIR (after a crash, kill or stop)")
    parser.add_argument("--out", metavar="DIR", help="run folder (default: the experiment's out, else runs/NAME-TIME)")
    parser.add_argument("--address", metavar="ADDR",
                        help="join an existing Ray cluster (e.g. auto or HOST:6379); default: a local Ray for this run")
    parser.add_argument("--workers", type=int, metavar="N", help="number of workers (overrides workers.count)")
    parser.add_argument("--seed", type=int, metavar="S", help="seed (overrides the experiment's seed)")
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    evolve = parser.add_argument_group("mergekit-evolve configs (genome: + tasks:; see docs/METHODS.md)")
    evolve.add_argument("--max-fevals", type=int, metavar="N", help="trials (mergekit-evolve's default 100)")
    evolve.add_argument("--sigma0", type=float, metavar="S", help="CMA-ES sigma0 (default 1/6)")
    evolve.add_argument("--task-search-path", action="append", default=[], metavar="DIR",
                        help="folder of local lm-eval task YAMLs (repeatable)")


def run(args: argparse.Namespace) -> int:
    from evomerge.search.loop import resume_run, start_run
    from evomerge.search.report import best_trial

    if args.resume and args.experiment:
        raise EvomergeError("give either EXPERIMENT.yaml or --resume DIR, not both")
    if args.resume:
        if args.seed is not None or args.out is not None:
            raise EvomergeError("--seed and --out cannot change on --resume (the run folder keeps its config)")
        run_folder = resume_run(args.resume, address=args.address, workers=args.workers,
                                progress=not args.no_progress)
    elif args.experiment:
        from evomerge.mergekit_evolve import run_evolve_config

        run_folder = run_evolve_config(args, start_run)
        if run_folder is None:
            if args.max_fevals is not None or args.sigma0 is not None or args.task_search_path:
                raise EvomergeError("--max-fevals, --sigma0 and --task-search-path are for mergekit-evolve "
                                    "configs (genome: + tasks:)")
            run_folder = start_run(args.experiment, out=args.out, address=args.address, workers=args.workers,
                                   seed=args.seed, progress=not args.no_progress)
    else:
        raise EvomergeError("give an experiment YAML (evomerge run EXPERIMENT.yaml) or --resume DIR")
    records = run_folder.trials()
    best = best_trial(records, None)
    failed = sum(r["status"] != "ok" for r in records)
    print(f"run folder: {run_folder.path}")
    print(f"trials: {len(records)} finished, {failed} failed")
    if best is not None:
        print(f"best trial {best['trial']}: score {best['score']:.6g} "
              + " ".join(f"{k}={v:.6g}" for k, v in best["metrics"].items()))
    print(f"next: evomerge report {run_folder.path}   |   evomerge export {run_folder.path} --out MODEL_DIR")
    return 0
