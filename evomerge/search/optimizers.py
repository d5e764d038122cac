"""Optimizers behind one ask/tell interface, all searching the unit cube [0, 1]^n.

``ask()`` returns ``(key, x)`` or ``None`` when the optimizer cannot propose before more tells (the CMA-ES
generation barrier); ``tell(key, values)`` gives the raw objective values (``None`` = a failed trial).
Every optimizer is picklable and its pickle is the whole state: the driver checkpoints it after every ask
and every tell, which is what makes resume exact (same proposals as an uninterrupted run).

- ``cmaes``: pycma, sigma0 (default 1/6), population 4 + floor(3 ln n), seeded, [0, 1] bounds by reflection
  (see ``reflect_unit``); pycma draws from numpy's global generator, so the wrapper keeps its own copy of that
  generator's state.
  Generational: a generation is told at once, failed members ranked last.
- ``optuna_cmaes`` / ``tpe`` / ``nsga2``: Optuna samplers over a study stored in SQLite in the run folder
  (optuna-dashboard can open it); asynchronous tells. The sampler (and its random state) is pickled with
  the wrapper; the study lives in the database.
- ``random``: uniform in the cube, seeded numpy generator.

Several objectives are either scalarised (weighted sum, signs by direction) or, with
``multi_objective: pareto``, told as a vector to NSGA-II / MOTPE / random.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from evomerge.errors import EvomergeError


def default_population(n_genes: int) -> int:
    """CMA-ES's default population size: 4 + floor(3 ln n)."""
    return 4 + int(math.floor(3 * math.log(max(1, n_genes))))


class Optimizer:
    """The ask/tell interface (see module docstring)."""

    name = "base"
    population: int | None = None  # trials per generation, where the optimizer has generations
    persistent_ask = False  # True when ask() has a side effect outside the pickle (Optuna's storage)

    def __init__(self, dim: int, x0: Sequence[float], names: Sequence[str], directions: Sequence[str],
                 weights: Sequence[float], pareto: bool, seed: int, options: dict[str, Any]):
        self.dim = dim
        self.x0 = np.asarray(x0, dtype=float)
        self.names = list(names)
        self.directions = list(directions)
        self.weights = list(weights)
        self.pareto = pareto
        self.seed = seed
        self.options = dict(options)

    def score(self, values: Sequence[float]) -> float:
        """The scalar to maximize: a weighted sum of the objectives, minimized ones counted negatively."""
        return float(sum(w * (v if d == "maximize" else -v)
                         for v, d, w in zip(values, self.directions, self.weights)))

    def ask(self) -> tuple[Any, list[float]] | None:
        raise NotImplementedError

    def tell(self, key: Any, values: Sequence[float] | None) -> None:
        raise NotImplementedError

    def reattach(self, run_dir: str) -> None:
        """Called after unpickling (resume): reopen external state such as the Optuna study."""

    def resolve_orphans(self, known_keys: set[Any]) -> None:
        """After a crash: forget proposals made after the last checkpoint (their keys are not in known_keys)."""


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
    name = "cmaes"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        import cma

        if self.pareto:
            raise EvomergeError("cmaes optimizes one objective; use multi_objective: weighted_sum")
        pop = self.options.get("population") or default_population(self.dim)
        saved = np.random.get_state()
        try:
            # pycma samples through opts["randn"], by default numpy's global generator; a pickled strategy would
            # then carry a detached copy of it. Our own generator, pickled with the wrapper, stays one object.
            self.rng = np.random.RandomState(int(self.seed) + 1)
            opts = {"popsize": pop, "randn": self.rng.randn, "seed": int(self.seed) + 1, "verbose": -9,
                    "verb_log": 0, "verb_disp": 0, "CMA_diagonal": False}
            if self.dim == 1:
                raise EvomergeError("cmaes needs at least 2 genes; use tpe or random for a 1-gene space")
            self.es = cma.CMAEvolutionStrategy(self.x0.tolist(), float(self.options["sigma0"]), opts)
            self.rng_state = np.random.get_state()
        finally:
            np.random.set_state(saved)
        self.population = int(self.es.popsize)
        self.generation: list[np.ndarray] = []
        self.asked = 0  # members of the current generation handed out
        self.losses: dict[int, float | None] = {}
        self.gen_index = 0

    def ask(self):
        if not self.generation:
            saved = np.random.get_state()
            np.random.set_state(self.rng_state)
            try:
                self.generation = self.es.ask()
            finally:
                self.rng_state = np.random.get_state()
                np.random.set_state(saved)
            self.asked = 0
            self.losses = {}
        if self.asked >= len(self.generation):
            return None  # barrier: the rest of the generation is still being evaluated
        i = self.asked
        self.asked += 1
        return (self.gen_index, i), [reflect_unit(float(v)) for v in self.generation[i]]

    def tell(self, key, values):
        gen, i = key
        if gen != self.gen_index:
            return  # a stale key (cannot happen in a consistent state)
        self.losses[i] = None if values is None else -self.score(values)
        if len(self.losses) < len(self.generation):
            return
        finite = [v for v in self.losses.values() if v is not None and math.isfinite(v)]
        penalty = (max(finite) + 1.0 + abs(max(finite))) if finite else 1.0
        losses = [self.losses[k] if self.losses[k] is not None else penalty for k in range(len(self.generation))]
        saved = np.random.get_state()
        np.random.set_state(self.rng_state)
        try:
            self.es.tell(self.generation, losses)
        finally:
            self.rng_state = np.random.get_state()
            np.random.set_state(saved)
        self.generation = []
        self.asked = 0
        self.losses = {}
        self.gen_index += 1


class RandomOptimizer(Optimizer):
    name = "random"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rng = np.random.default_rng(self.seed)
        self.count = 0
        self.population = self.options.get("population")

    def ask(self):
        self.count += 1
        return self.count - 1, [float(v) for v in self.rng.random(self.dim)]

    def tell(self, key, values):
        pass


class OptunaOptimizer(Optimizer):
    """TPE, CMA-ES or NSGA-II from Optuna over a SQLite study in the run folder."""

    persistent_ask = True

    def __init__(self, *args, run_dir: str, study_name: str, **kwargs):
        super().__init__(*args, **kwargs)
        import optuna

        self.name = self.options["name"]
        pop = self.options.get("population")
        x0 = {n: float(v) for n, v in zip(self.names, self.x0)}
        if self.name == "tpe":
            sampler = optuna.samplers.TPESampler(seed=self.seed, multivariate=True, constant_liar=True)
            self.population = pop
        elif self.name == "optuna_cmaes":
            if self.pareto:
                raise EvomergeError("optuna_cmaes optimizes one objective; use nsga2 or multi_objective: weighted_sum")
            self.population = pop or default_population(self.dim)
            import warnings

            with warnings.catch_warnings():  # x0 / sigma0 are deprecated in Optuna 4.9 but still honoured
                warnings.simplefilter("ignore", FutureWarning)
                sampler = optuna.samplers.CmaEsSampler(x0=x0, sigma0=float(self.options["sigma0"]), seed=self.seed,
                                                       popsize=self.population, warn_independent_sampling=False)
        elif self.name == "nsga2":
            self.population = pop or 50
            sampler = optuna.samplers.NSGAIISampler(population_size=self.population, seed=self.seed)
        else:  # pragma: no cover - validated earlier
            raise EvomergeError(f"unknown optuna optimizer {self.name}")
        self.sampler = sampler
        self.study_name = study_name
        self.storage_url = ""
        self.study = None
        self.reattach(run_dir)

    def reattach(self, run_dir: str) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage_url = f"sqlite:///{run_dir}/optuna.db"
        directions = self.directions if self.pareto else ["maximize"]
        self.study = optuna.create_study(storage=self.storage_url, study_name=self.study_name,
                                         sampler=self.sampler, directions=directions, load_if_exists=True)
        self._dists = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["study"] = None
        state["_dists"] = None
        return state

    def _distributions(self):
        if self._dists is None:
            from optuna.distributions import FloatDistribution

            self._dists = {n: FloatDistribution(0.0, 1.0) for n in self.names}
        return self._dists

    def ask(self):
        trial = self.study.ask(fixed_distributions=self._distributions())
        return trial.number, [float(trial.params[n]) for n in self.names]

    def tell(self, key, values):
        from optuna.trial import TrialState

        frozen = self.study._storage.get_trial(self.study._storage.get_trial_id_from_study_id_trial_number(
            self.study._study_id, key))
        if frozen.state.is_finished():
            return  # told before a crash, after which the wrapper's checkpoint did not record it
        if values is None or not all(math.isfinite(v) for v in values):
            self.study.tell(key, state=TrialState.FAIL)
        elif self.pareto:
            self.study.tell(key, list(values))
        else:
            self.study.tell(key, self.score(values))

    def resolve_orphans(self, known_keys: set[Any]) -> None:
        from optuna.trial import TrialState

        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING, TrialState.WAITING)):
            if t.number not in known_keys:
                self.study.tell(t.number, state=TrialState.FAIL)


def build_optimizer(options: dict[str, Any], dim: int, x0: Sequence[float], names: Sequence[str],
                    directions: Sequence[str], weights: Sequence[float], pareto: bool, seed: int,
                    run_dir: str, study_name: str) -> Optimizer:
    name = options["name"]
    args = (dim, x0, names, directions, weights, pareto, seed, options)
    if name == "cmaes":
        return CMAESOptimizer(*args)
    if name == "random":
        return RandomOptimizer(*args)
    return OptunaOptimizer(*args, run_dir=run_dir, study_name=study_name)
