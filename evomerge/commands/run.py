"""`evomerge run EXPERIMENT.yaml [--out DIR] [--address ADDR] [--workers N] [--seed S]` and
`evomerge run --resume DIR`: start or continue an evolutionary merge search (see evomerge/search/driver.py)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from evomerge.errors import AllTrialsFailed, EvomergeError

#: Keys of a run's config.yaml that may differ on --resume (the worker count can change between sessions).
RESUME_MAY_CHANGE = ("workers",)


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
    """Start or resume a search; print the run folder, the trial counts and the best trial.

    Returns:
        0.

    Raises:
        EvomergeError: bad input (exit code 2).
        AllTrialsFailed: the run has trials and every one failed (exit code 1), after the summary.
    """
    # the search stack (Ray, torch, transformers) loads only when this command runs, not for every CLI call
    from evomerge.search.launch import resume_run, start_run
    from evomerge.search.objectives import best_trial

    if args.resume:
        check_resume_flags(args)
        run_folder = resume_run(args.resume, address=args.address, workers=args.workers,
                                progress=not args.no_progress)
    elif args.experiment:
        # deferred: the mergekit-evolve translator loads only when an experiment file is given
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
    best = best_trial(records)
    failed = sum(not r.ok for r in records)
    print(f"run folder: {run_folder.path}")
    print(f"trials: {len(records)} finished, {failed} failed")
    if best is not None and best.score is not None:
        print(f"best trial {best.trial}: score {best.score:.6g} "
              + " ".join(f"{k}={v:.6g}" for k, v in best.metrics.items() if v is not None))
    print(f"next: evomerge report {run_folder.path}   |   evomerge export {run_folder.path} --out MODEL_DIR")
    if records and failed == len(records):
        first = min(records, key=lambda r: r.trial)
        reason = (first.error or "no reason recorded").strip().splitlines()[0]
        raise AllTrialsFailed(f"all {len(records)} trials failed; the first (trial {first.trial}): {reason}")
    return 0


def check_resume_flags(args: argparse.Namespace) -> None:
    """Repeating the original command line with ``--resume DIR`` is allowed: EXPERIMENT.yaml, ``--seed`` and
    ``--out`` are accepted when they equal the run's own values and refused, naming the value, when they differ
    (a resumed run keeps the config its folder holds).

    Args:
        args: the parsed ``evomerge run`` arguments, ``args.resume`` set.
    Raises:
        EvomergeError: DIR is not a run folder, or a repeated value differs from the run's.
    """
    # deferred: the search stack loads only when `evomerge run` runs, not for every CLI call
    from evomerge.search.run_folder import RunFolder

    run = RunFolder.open(args.resume)
    config = run.config()
    if args.seed is not None and args.seed != config.get("seed"):
        raise EvomergeError(f"--seed {args.seed} differs from the seed of the run in {run.path} "
                            f"({config.get('seed')}); a resumed run keeps its seed")
    if args.out is not None and Path(args.out).resolve() != run.path.resolve():
        raise EvomergeError(f"--out {args.out} differs from the run folder being resumed ({args.resume})")
    if args.experiment:
        _check_same_experiment(args, config)


def _check_same_experiment(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """EXPERIMENT.yaml given with --resume must resolve to the run's config (seed override included)."""
    # deferred: the search stack loads only when `evomerge run` runs, not for every CLI call
    from evomerge.search.experiment import experiment_from_resolved, load_experiment

    fresh = dict(load_experiment(args.experiment).raw)
    if args.seed is not None:
        fresh["seed"] = args.seed
    # read through this release's schema: a run folder of an earlier release lacks keys added since (defaults)
    stored = dict(experiment_from_resolved(config).raw)
    if stored.get("models", {}).get("build"):  # a run that builds its models records their paths once built
        fresh_models, stored_models = fresh.get("models", {}), stored.get("models", {})
        stored["models"] = {k: v for k, v in stored_models.items() if k in fresh_models and fresh_models[k]}
        fresh["models"] = {k: v for k, v in fresh_models.items() if k in stored["models"]}
    for key in sorted(set(fresh) | set(stored)):
        if key in RESUME_MAY_CHANGE:
            continue
        if fresh.get(key) != stored.get(key):
            raise EvomergeError(f"{args.experiment} differs from the config of the run in {args.resume} "
                                f"(its {key!r}); a resumed run keeps its config: give --resume DIR alone")
