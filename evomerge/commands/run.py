"""`evomerge run EXPERIMENT.yaml [--out DIR] [--address ADDR] [--workers N] [--seed S]` and
`evomerge run --resume DIR`: start or continue an evolutionary merge search (see evomerge/search/driver.py)."""

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


def run(args: argparse.Namespace) -> int:
    """Start or resume a search; print the run folder, the trial counts and the best trial. Returns 0."""
    # the search stack (Ray, torch, transformers) loads only when this command runs, not for every CLI call
    from evomerge.search.launch import resume_run, start_run
    from evomerge.search.objectives import best_trial

    if args.resume and args.experiment:
        raise EvomergeError("give either EXPERIMENT.yaml or --resume DIR, not both")
    if args.resume:
        if args.seed is not None or args.out is not None:
            raise EvomergeError("--seed and --out cannot change on --resume (the run folder keeps its config)")
        run_folder = resume_run(args.resume, address=args.address, workers=args.workers,
                                progress=not args.no_progress)
    elif args.experiment:
        run_folder = start_run(args.experiment, out=args.out, address=args.address, workers=args.workers,
                               seed=args.seed, progress=not args.no_progress)
    else:
        raise EvomergeError("give an experiment YAML (evomerge run EXPERIMENT.yaml) or --resume DIR")
    records = run_folder.trials()
    best = best_trial(records)
    failed = sum(not r.ok for r in records)
    print(f"run folder: {run_folder.path}")
    print(f"trials: {len(records)} finished, {failed} failed")
    if best is not None and best.score is not None:
        print(f"best trial {best.trial}: score {best.score:.6g} "
              + " ".join(f"{k}={v:.6g}" for k, v in best.metrics.items() if v is not None))
    print(f"next: evomerge report {run_folder.path}   |   evomerge export {run_folder.path} --out MODEL_DIR")
    return 0
