"""``evomerge run``'s entry points: start a search from an experiment, or resume a run folder."""

from __future__ import annotations

import dataclasses
import shutil
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
        EvomergeError: a bad experiment or option, or a search that cannot go on. When no trial has finished,
            what this call created is removed first (``remove_created``): a refusal leaves no run folder.
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
    path = Path(out) if out else (exp.out or default_out(exp))
    created = first_missing(path)
    run = RunFolder.create(path, exp.raw)
    try:
        exp = experiment_from_resolved(build_models(run, run.config()))
        SearchDriver(run, exp, address, progress).run_search()
    except EvomergeError:
        run.close()
        if not run.trials():  # refused before any trial finished: nothing worth keeping
            remove_created(run.path, created)
        raise
    return run


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (itself included) that does not exist yet, or None when it exists."""
    path = path.resolve()
    missing = None
    for p in [path, *path.parents]:
        if p.exists():
            break
        missing = p
    return missing


def remove_created(path: Path, created: Path | None) -> None:
    """Remove what a refused run created: ``created`` (the outermost folder it made, see ``first_missing``), or,
    when the run folder existed before (it was empty: ``RunFolder.create`` refuses anything else), its
    contents only. A folder that existed before is never removed."""
    if created is not None:
        shutil.rmtree(created, ignore_errors=True)
        return
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


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
        EvomergeError: ``run_dir`` is not a run folder, or the search cannot go on. A refusal of the cluster
            (GPUs, custom resources) or of the memory plan comes before anything in the folder changes.
    """
    run = RunFolder.open(run_dir)
    if workers is not None and workers < 1:
        raise EvomergeError("--workers must be at least 1")
    config = build_models(run, run.config())  # built already: config.yaml is rewritten as it was
    if workers is not None:
        config["workers"]["count"] = workers
    exp = experiment_from_resolved(config)

    def checked() -> None:  # the cluster can host the workers: now the folder may change
        run.repair_trials()
        if workers is not None:
            run.update_config(config)

    SearchDriver(run, exp, address, progress).run_search(checked)
    return run
