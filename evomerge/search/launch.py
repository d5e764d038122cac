"""``evomerge run``'s entry points: start a search from an experiment, or resume a run folder."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from evomerge.errors import EvomergeError
from evomerge.search.driver import SearchDriver
from evomerge.search.experiment import Experiment, experiment_from_resolved, load_experiment
from evomerge.search.run_folder import RunFolder
from evomerge.search.tiny_family import build_models


def default_out(exp: Experiment) -> Path:
    """``runs/NAME-YYYYmmdd-HHMMSS`` (local time)."""
    return Path("runs") / f"{exp.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def start_run(experiment: str | Path | Experiment, out: str | Path | None = None, address: str | None = None,
              workers: int | None = None, seed: int | None = None, progress: bool = True) -> RunFolder:
    """``evomerge run EXPERIMENT.yaml``: validate, create the run folder, search.

    Args:
        experiment: an experiment YAML path or a validated ``Experiment``.
        out: the run folder (default: the experiment's ``out``, else ``default_out``).
        address: a Ray cluster to join (None: an embedded local Ray).
        workers: overrides ``workers.count``.
        seed: overrides ``seed`` (and ``optimizer.seed``).
        progress: show a live progress bar.

    Returns:
        The run folder.

    Raises:
        EvomergeError: a bad experiment or option (nothing is written), or a search that cannot go on.
    """
    exp = experiment if isinstance(experiment, Experiment) else load_experiment(experiment)
    if workers is not None:
        if workers < 1:
            raise EvomergeError("--workers must be at least 1")
        exp.workers.count = workers
    if seed is not None:
        exp.seed, exp.optimizer.seed = seed, None
    exp.raw["workers"] = dataclasses.asdict(exp.workers)
    exp.raw["optimizer"] = dataclasses.asdict(exp.optimizer)
    exp.raw["seed"] = exp.seed
    run = RunFolder.create(Path(out) if out else (exp.out or default_out(exp)), exp.raw)
    exp = experiment_from_resolved(build_models(run, run.config()))
    SearchDriver(run, exp, address, progress).run_search()
    return run


def resume_run(run_dir: str | Path, address: str | None = None, workers: int | None = None,
               progress: bool = True) -> RunFolder:
    """``evomerge run --resume DIR``: continue a run killed at any moment (also one of an earlier release).

    Args:
        run_dir: the run folder.
        address: a Ray cluster to join (None: an embedded local Ray).
        workers: overrides ``workers.count`` (saved to config.yaml).
        progress: show a live progress bar.

    Returns:
        The run folder.

    Raises:
        EvomergeError: ``run_dir`` is not a run folder, or the search cannot go on.
    """
    run = RunFolder.open(run_dir)
    run.repair_trials()
    config = run.config()
    if workers is not None:
        if workers < 1:
            raise EvomergeError("--workers must be at least 1")
        config["workers"]["count"] = workers
        run.update_config(config)
    exp = experiment_from_resolved(build_models(run, config))
    SearchDriver(run, exp, address, progress).run_search()
    return run
