"""Optimizers behind one ask/tell interface, all searching the unit cube [0, 1]^n.

``ask()`` returns ``(key, x)`` or ``None`` when the optimizer cannot propose before more tells (the CMA-ES
generation barrier); ``tell(key, values)`` gives the raw objective values (``None`` = a failed trial).
``state_dict()`` is the optimizer's whole state as plain JSON-able data with a version number, and
``load_state_dict`` restores it: the driver checkpoints it after every ask and every tell, which is what makes
resume exact (same proposals as an uninterrupted run). No object is pickled.

- ``cmaes``: pycma, sigma0 (default 1/6), population 4 + floor(3 ln n), seeded, [0, 1] bounds by reflection
  (see ``reflect_unit``). Its state is the losses told so far: pycma is deterministic given its seed, so
  replaying the told generations rebuilds the strategy exactly (Hansen, "The CMA Evolution Strategy: A
  Tutorial", 2016, for the algorithm). Generational: a generation is told at once, failed members ranked last.
- ``optuna_cmaes`` / ``tpe`` / ``nsga2``: Optuna samplers over a study stored in SQLite in the run folder
  (optuna-dashboard can open it); asynchronous tells. Ask number k uses a fresh sampler seeded with
  ``seed + k``, so the study and the count of checkpointed asks are the whole state: an ask lost in a crash
  (its SQLite row made, the checkpoint not) goes back to WAITING on resume and the next ask takes it up under
  its own number (Optuna's samplers seed with the trial number too), as an uninterrupted run would have.
- ``random``: uniform in the cube, seeded numpy generator (its bit-generator state is saved).

Several objectives are either scalarised (objectives.scalarize) or, with ``multi_objective: pareto``, told as a
vector to NSGA-II / MOTPE / random.

Several workers: ``cmaes``, ``optuna_cmaes`` and ``nsga2`` ask a whole generation at once and ask the next only
when every member is told, and ``random`` ignores tells, so their trials do not depend on which worker finishes
first (a run with 2 workers, killed and resumed, gives the 1-worker run's trials). ``tpe`` proposes from the
trials finished so far, so its trials depend on completion order; it is exact across kill and resume with one
worker (the driver takes one worker's results in the order it ran them).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from evomerge.errors import EvomergeError
from evomerge.search.experiment import OptimizerConfig
from evomerge.search.objectives import Objective, scalarize

STATE_VERSION = 2
Key = Any  # an optimizer's handle of one ask: (generation, member) for cmaes, an int otherwise


def default_population(n_genes: int) -> int:
    """CMA-ES's default population size: 4 + floor(3 ln n) (Hansen 2016, Table 1)."""
    return 4 + int(math.floor(3 * math.log(max(1, n_genes))))


@dataclass(frozen=True)
class Problem:
    """What an optimizer searches.

    Attributes:
        names: gene names (length n; the genome is a vector of n floats in [0, 1]).
        x0: the starting genome (length n).
        objectives: the experiment's objectives (directions and weights).
        pareto: tell the objective vector (NSGA-II / MOTPE / random) instead of the weighted score.
        seed: the optimizer's seed.
        options: the experiment's ``optimizer:`` section.
        start_at_x0: the first trial is x0 itself (a DFS stage: model A's plain path, Akiba et al. 2024, so
            the stage starts from what it was handed instead of spending its first generation recovering it).
    """

    names: list[str]
    x0: list[float]
    objectives: list[Objective]
    seed: int
    options: OptimizerConfig = field(default_factory=OptimizerConfig)
    pareto: bool = False
    start_at_x0: bool = False

    @property
    def dim(self) -> int:
        """Number of genes n."""
        return len(self.names)


class Optimizer:
    """The ask/tell interface (see module docstring)."""

    name = "base"
    population: int | None = None  # trials per generation, where the optimizer has generations
    persistent_ask = False  # True when ask() has a side effect outside the state dict (Optuna's storage)

    def __init__(self, problem: Problem):
        self.problem = problem

    def score(self, values: Sequence[float]) -> float:
        """The scalar to maximize: the weighted score of raw objective values (objectives.scalarize)."""
        return scalarize(values, self.problem.objectives)

    def ask(self) -> tuple[Key, list[float]] | None:
        """Propose a genome.

        Returns:
            ``(key, x)``: a key to tell the result with and x, n floats in [0, 1]; or None when the
            optimizer must be told more results first (CMA-ES waits for the rest of its generation).
        """
        raise NotImplementedError

    def tell(self, key: Key, values: Sequence[float] | None) -> None:
        """Report the raw objective values of the trial asked with ``key`` (None = a failed trial).

        Args:
            key: as returned by ``ask``.
            values: one raw value per objective, in the experiment's order (directions not applied).
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """The whole state as plain data (JSON-able), with ``version`` and ``kind``."""
        return {"version": STATE_VERSION, "kind": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state from ``state_dict`` (of an optimizer built for the same problem).

        Raises:
            EvomergeError: the state is of another optimizer or of an unknown version.
        """
        if state.get("version") != STATE_VERSION or state.get("kind") != self.name:
            raise EvomergeError(f"optimizer state of {state.get('kind')!r} version {state.get('version')!r} "
                                f"does not fit optimizer {self.name!r} version {STATE_VERSION}")

    def recover_lost_asks(self, known_keys: set[Key]) -> None:
        """On resume: proposals recorded outside the state (Optuna's SQLite rows) whose keys the checkpoint does
        not know were made after it; the next asks must make them again."""

    def resolve_orphans(self, known_keys: set[Key]) -> None:
        """At the end of a stage: forget proposals that will never run (their keys are not in known_keys)."""

    def close(self) -> None:
        """Release external resources (the Optuna study's database connection)."""


def reflect_unit(g: float) -> float:
    """Fold an unbounded CMA-ES coordinate into [0, 1] by reflection at the bounds (period 2).

    pycma's own bound handling looks asked solutions up by ``hash(x.tobytes())`` at tell time, and Python's
    bytes hash differs between processes, so a resumed run would tell differently than an uninterrupted one.
    Searching unbounded and folding here keeps CMA-ES's state a pure function of what it asked and was told.
    """
    y = math.fmod(g, 2.0)
    if y < 0:
        y += 2.0
    return y if y <= 1.0 else 2.0 - y


class CMAESOptimizer(Optimizer):
    """pycma's CMA-ES in the unit cube (see module docstring); keys are ``generation * population + member``."""

    name = "cmaes"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        # pycma is imported with its optimizer only (a dependency only this optimizer needs)
        import cma

        if problem.pareto:
            raise EvomergeError("cmaes optimizes one objective; use multi_objective: weighted_sum")
        if problem.dim == 1:
            raise EvomergeError("cmaes needs at least 2 genes; use tpe or random for a 1-gene space")
        pop = problem.options.population or default_population(problem.dim)
        saved = np.random.get_state()
        try:
            # pycma samples through opts["randn"], by default numpy's global generator: it gets a generator of
            # its own, and numpy's global state is swapped in and out around every pycma call
            self.rng = np.random.RandomState(int(problem.seed) + 1)
            opts = {"popsize": pop, "randn": self.rng.randn, "seed": int(problem.seed) + 1, "verbose": -9,
                    "verb_log": 0, "verb_disp": 0, "CMA_diagonal": False}
            self.es = cma.CMAEvolutionStrategy(list(problem.x0), float(problem.options.sigma0), opts)
            if problem.start_at_x0:  # the first generation's first member is the mean itself
                self.es.inject([np.asarray(problem.x0, dtype=float)], force=True)
            self.rng_state = np.random.get_state()
        finally:
            np.random.set_state(saved)
        self.popsize = int(self.es.popsize)
        self.population = self.popsize
        self.generation: list[Any] = []  # the current generation's members (unbounded coordinates)
        self.asked = 0  # members of the current generation handed out
        self.losses: dict[int, float | None] = {}  # told members of the current generation (None = failed)
        self.told: list[list[float | None]] = []  # the losses of every told generation, in member order

    def _pycma(self, call: Any, *args: Any) -> Any:
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            return call(*args)
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)

    def _tell_generation(self, losses: list[float | None]) -> None:
        finite = [v for v in losses if v is not None and math.isfinite(v)]
        penalty = (max(finite) + 1.0 + abs(max(finite))) if finite else 1.0
        self._pycma(self.es.tell, self.generation, [penalty if v is None else v for v in losses])
        self.told.append(list(losses))
        self.generation, self.asked, self.losses = [], 0, {}

    def ask(self) -> tuple[Key, list[float]] | None:
        """See ``Optimizer.ask``; None while the rest of the generation is out (the barrier)."""
        if not self.generation:
            self.generation = self._pycma(self.es.ask)
            self.asked, self.losses = 0, {}
        if self.asked >= len(self.generation):
            return None  # barrier: the rest of the generation is still being evaluated
        i = self.asked
        self.asked += 1
        return len(self.told) * self.popsize + i, [reflect_unit(float(v)) for v in self.generation[i]]

    def tell(self, key: Key, values: Sequence[float] | None) -> None:
        """See ``Optimizer.tell``; the generation is told to pycma once all its members are in (failed: last)."""
        gen, i = divmod(int(key), self.popsize)
        if gen != len(self.told):
            return  # a stale key (cannot happen in a consistent state)
        self.losses[i] = None if values is None else -self.score(values)
        if len(self.losses) == len(self.generation):
            self._tell_generation([self.losses[k] for k in range(len(self.generation))])

    def state_dict(self) -> dict[str, Any]:
        """``{version, kind, told: [[loss or None per member] per generation], in_generation, asked, losses}``."""
        return {**super().state_dict(), "told": [list(g) for g in self.told],
                "in_generation": bool(self.generation), "asked": self.asked,
                "losses": {str(k): v for k, v in self.losses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replay the told generations from the seed (pycma is deterministic), then the current one's asks."""
        super().load_state_dict(state)
        if self.told or self.generation:
            raise EvomergeError("load_state_dict needs a freshly built cmaes optimizer")
        for losses in state["told"]:
            self.generation = self._pycma(self.es.ask)
            self._tell_generation(losses)
        if state["in_generation"]:
            self.restore_generation(int(state["asked"]), {int(k): v for k, v in state["losses"].items()})

    def restore_generation(self, asked: int, losses: dict[int, float | None]) -> None:
        """Sample the current generation again and mark ``asked`` members asked, ``losses`` told."""
        self.generation = self._pycma(self.es.ask)
        self.asked, self.losses = asked, dict(losses)

    def replay(self, generations: int, loss_of: Any) -> None:
        """Rebuild ``generations`` told generations from the losses ``loss_of(x)`` of their genomes (a run
        folder of an earlier release, whose trials.jsonl has every told member).

        Raises:
            EvomergeError: a member's genome has no loss (the run folder does not fit this optimizer).
        """
        for _ in range(generations):
            self.generation = self._pycma(self.es.ask)
            losses = [loss_of([reflect_unit(float(v)) for v in member]) for member in self.generation]
            self._tell_generation(losses)


class RandomOptimizer(Optimizer):
    """Uniform samples in the unit cube from a seeded numpy generator (PCG64)."""

    name = "random"

    def __init__(self, problem: Problem):
        super().__init__(problem)
        self.rng = np.random.default_rng(problem.seed)
        self.count = 0
        self.population = problem.options.population

    def ask(self) -> tuple[Key, list[float]] | None:
        """See ``Optimizer.ask``; never None (the first is x0 when ``start_at_x0``)."""
        self.count += 1
        if self.count == 1 and self.problem.start_at_x0:
            return 0, [float(v) for v in self.problem.x0]
        return self.count - 1, [float(v) for v in self.rng.random(self.problem.dim)]

    def tell(self, key: Key, values: Sequence[float] | None) -> None:
        """Nothing to learn from."""
        pass

    def state_dict(self) -> dict[str, Any]:
        """``{version, kind, count, bit_generator}`` (numpy's PCG64 state, plain ints)."""
        return {**super().state_dict(), "count": self.count, "bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See ``Optimizer.load_state_dict``."""
        super().load_state_dict(state)
        self.count = int(state["count"])
        self.rng.bit_generator.state = state["bit_generator"]


class OptunaOptimizer(Optimizer):
    """TPE, CMA-ES or NSGA-II from Optuna over a SQLite study in the run folder (the study is the state)."""

    persistent_ask = True

    def __init__(self, problem: Problem, run_dir: str, study_name: str):
        super().__init__(problem)
        optuna = _optuna()
        self.name = problem.options.name
        if self.name not in ("tpe", "optuna_cmaes", "nsga2"):  # pragma: no cover - validated earlier
            raise EvomergeError(f"unknown optuna optimizer {self.name}")
        if self.name == "optuna_cmaes" and problem.pareto:
            raise EvomergeError("optuna_cmaes optimizes one objective; use nsga2 or multi_objective: weighted_sum")
        pop = problem.options.population
        self.popsize = pop or (50 if self.name == "nsga2" else default_population(problem.dim))
        self.population = pop if self.name == "tpe" else self.popsize  # TPE has no generations of its own
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study_name = study_name
        self.asks = 0  # asks made (and checkpointed: every Optuna ask is)
        # optuna_cmaes and nsga2 ask a whole generation at once, and the next one only when this one is all told:
        # what the sampler sees at an ask then does not depend on the order in which workers finish
        self.generational = self.name in ("optuna_cmaes", "nsga2")
        self.members: list[int] = []  # trial numbers asked in the current generation
        self.untold: set[int] = set()  # of them, those not told yet
        self.queued: list[tuple[int, list[float]]] = []  # of them, those asked but not handed out yet
        maximize, minimize = optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE
        directions = [maximize if o.sign > 0 else minimize for o in problem.objectives] if problem.pareto else [
            maximize]
        self.storage_url = f"sqlite:///{run_dir}/optuna.db"
        self.study = optuna.create_study(storage=self.storage_url, study_name=study_name,
                                         sampler=self._sampler(0), directions=directions, load_if_exists=True)
        self.distributions: dict[str, Any] = {
            n: optuna.distributions.FloatDistribution(0.0, 1.0) for n in problem.names}
        if problem.start_at_x0 and not self.study.get_trials(deepcopy=False):  # a new study: x0 is its trial 0
            self.study.enqueue_trial(dict(zip(problem.names, problem.x0)))

    def _sampler(self, ask: int) -> Any:
        """A fresh sampler for ask number ``ask``, seeded with ``seed + ask``."""
        optuna = _optuna()
        seed = self.problem.seed + ask
        if self.name == "tpe":
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)
        if self.name == "nsga2":
            return optuna.samplers.NSGAIISampler(population_size=self.popsize, seed=seed)
        x0 = dict(zip(self.problem.names, self.problem.x0))
        with warnings.catch_warnings():  # x0 / sigma0 are deprecated in Optuna 4.9 but still honoured
            warnings.simplefilter("ignore", FutureWarning)
            return optuna.samplers.CmaEsSampler(x0=x0, sigma0=float(self.problem.options.sigma0), seed=seed,
                                                popsize=self.popsize, warn_independent_sampling=False)

    def ask(self) -> tuple[Key, list[float]] | None:
        """See ``Optimizer.ask``; adds a RUNNING trial to the study (``persistent_ask``); optuna_cmaes and nsga2
        return None while their generation is not all told."""
        if not self.generational:
            return self._ask_one()
        if not self.queued:
            if self.untold:
                return None  # barrier: the rest of the generation is still being evaluated
            self.queued = [self._ask_one() for _ in range(self.popsize)]
            self.members = [k for k, _ in self.queued]
            self.untold = set(self.members)
        key, x = self.queued.pop(0)
        return key, x

    def _ask_one(self) -> tuple[int, list[float]]:
        self.study.sampler = self._sampler(self.asks)
        trial = self.study.ask(fixed_distributions=self.distributions)
        self.asks += 1
        return trial.number, [float(trial.params[n]) for n in self.problem.names]

    def tell(self, key: Key, values: Sequence[float] | None) -> None:
        """See ``Optimizer.tell``; a trial already finished in the study is left as it is."""
        TrialState = _optuna().trial.TrialState
        self.untold.discard(int(key))
        # skip_if_finished: told before a crash, after which the driver's checkpoint did not record it
        if values is None or not all(math.isfinite(v) for v in values):
            self.study.tell(int(key), state=TrialState.FAIL, skip_if_finished=True)
        elif self.problem.pareto:
            self.study.tell(int(key), list(values), skip_if_finished=True)
        else:
            self.study.tell(int(key), self.score(values), skip_if_finished=True)

    def state_dict(self) -> dict[str, Any]:
        """``{version, kind, study_name, asks, members, untold, queued}``: everything else is in the study."""
        return {**super().state_dict(), "study_name": self.study_name, "asks": self.asks,
                "members": list(self.members), "untold": sorted(self.untold),
                "queued": [[k, list(x)] for k, x in self.queued]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """See ``Optimizer.load_state_dict``; the study names must match."""
        super().load_state_dict(state)
        if state["study_name"] != self.study_name:
            raise EvomergeError(f"optimizer state of study {state['study_name']!r}, not {self.study_name!r}")
        self.asks = int(state["asks"])
        self.members = [int(k) for k in state["members"]]
        self.untold = {int(k) for k in state["untold"]}
        self.queued = [(int(k), [float(v) for v in x]) for k, x in state["queued"]]

    def recover_lost_asks(self, known_keys: set[Key]) -> None:
        """Put the study's RUNNING trials whose keys are not known back to WAITING (storage API: the study has
        no public way to do it), so that the next ask takes each up again under its number."""
        optuna = _optuna()
        storage = optuna.storages.RDBStorage(self.storage_url)
        study_id = storage.get_study_id_from_name(self.study_name)
        known = set(known_keys) | {k for k, _ in self.queued}  # asked with the generation, not handed out yet
        for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.number not in known:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.WAITING)

    def resolve_orphans(self, known_keys: set[Key]) -> None:
        """Mark the study's RUNNING/WAITING trials whose keys are not known as FAIL."""
        TrialState = _optuna().trial.TrialState
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if t.number not in known_keys:
                self.study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        self.untold &= set(known_keys)
        self.queued = [(k, x) for k, x in self.queued if k in known_keys]


def _optuna() -> Any:
    # Optuna (and its SQLAlchemy) loads with the Optuna optimizers only: a cmaes or random run never needs it
    import optuna

    return optuna


def build_optimizer(problem: Problem, run_dir: str, study_name: str) -> Optimizer:
    """The optimizer ``problem.options.name`` for ``problem``.

    Args:
        problem: genes, start, objectives, seed and the ``optimizer:`` section.
        run_dir: the run folder (Optuna optimizers keep their study in ``optuna.db`` there).
        study_name: the Optuna study's name (one per stage).

    Raises:
        EvomergeError: the optimizer cannot search this problem (e.g. cmaes with one gene or a Pareto front).
    """
    name = problem.options.name
    if name == "cmaes":
        return CMAESOptimizer(problem)
    if name == "random":
        return RandomOptimizer(problem)
    return OptunaOptimizer(problem, run_dir, study_name)
