"""The experiment YAML: what to search, how to score it, which optimizer, how much budget, where it runs.

Validation happens once, up front, in the driver: every problem the user can fix (a missing model folder,
an unknown search space, inverted bounds, no objectives, a misspelt key) becomes one ``EvomergeError`` line,
so a search never starts with a config that would fail an hour later.

Shape (every key is checked; unknown keys are errors)::

    name: smoke                       # optional, default: the file's stem
    seed: 0
    out: runs/smoke                   # optional; `--out` wins
    models:                           # PS: base + sources.  DFS: a + b.  Paths are relative to this file.
      base: path/to/base
      sources: {math: path, lang: path}          # or a list of paths
      build: {arch: llama, n_variants: 2, seed: 0}   # optional: build tiny local models into the run folder
    search_space: ps_ties_dare        # a name from search_spaces/, a path to a YAML, or an inline mapping
    space: {group_size: model}        # overrides of the space's options
    evaluators:
      - {name: acc, spec: "mgsm:ja", limit: 50, seed: 0}
    objectives:
      - {metric: acc/accuracy, direction: maximize, weight: 1.0}
    optimizer: {name: cmaes, sigma0: 0.1667, population: null, multi_objective: weighted_sum,
                seed: null}           # seed: the optimizer's own seed (default: the experiment's seed)
    budget: {trials: 100, generations: null, wall_time: null}
    workers: {count: 1, device: auto, gpus_per_worker: null, cpus_per_worker: 1, threads: 1,
              sources: path, max_retries: 1,
              device_memory_gb: null,         # a worker's budget per device (default: a GPU's free memory)
              devices_per_worker: 1,          # devices one worker spans (layers placed across them, PS only)
              sources_mode: auto,             # auto | resident | streamed (see evomerge/memory_plan.py)
              resources: {}}                  # custom Ray resources per worker, e.g. {evomerge_worker: 1}
    python_path: []                   # extra import folders (relative to this file) for custom evaluators
    dtype: null                       # compute dtype; default: the sources' (bf16 sources merge in bf16)
    fitness: {mode: full}             # or race / minibatch: score candidates on part of the search split
                                      # (min_items, growth, confidence, bound, against, quantile, window,
                                      #  batch_items, seed; see evomerge/search/fitness.py)
    description: ""                   # free text, kept in the run folder's config.yaml and shown by the report

Every key above is used and every value validation accepts works (tests/test_search_schema.py).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError, check_keys
from evomerge.search.fitness import Against, Bound, FitnessConfig, FitnessMode
from evomerge.search.objectives import Direction, Objective
from evomerge.search.portable import local_paths
from evomerge.search.search_space import SpaceDef, check_space_models, load_space_definition

OPTIMIZERS = ("cmaes", "optuna_cmaes", "tpe", "nsga2", "random")
MULTI_OBJECTIVE = ("weighted_sum", "pareto")
DIRECTIONS = tuple(d.value for d in Direction)
TOP_KEYS = {"name", "seed", "out", "models", "search_space", "space", "evaluators", "objectives", "optimizer",
            "budget", "workers", "python_path", "dtype", "description", "fitness"}
MODEL_KEYS = {"base", "sources", "a", "b", "build"}
BUILD_KEYS = {"arch", "n_variants", "seed", "scale", "num_layers", "hidden_size", "intermediate_size"}
EVALUATOR_KEYS = {"name", "spec", "limit", "seed"}
OBJECTIVE_KEYS = {"metric", "direction", "weight"}
OPTIMIZER_KEYS = {"name", "sigma0", "population", "multi_objective", "seed"}
BUDGET_KEYS = {"trials", "generations", "wall_time"}
WORKER_KEYS = {"count", "device", "gpus_per_worker", "cpus_per_worker", "threads", "sources", "max_retries",
               "device_memory_gb", "sources_mode", "devices_per_worker", "resources"}
FITNESS_KEYS = {"mode", "min_items", "growth", "confidence", "bound", "against", "quantile", "window",
                "batch_items", "seed"}
DTYPES = ("float32", "float16", "bfloat16")
SOURCES_MODES = ("auto", "resident", "streamed")  # evomerge.memory_plan.SourcesMode


@dataclass
class EvaluatorSpec:
    """One evaluator of an experiment: metrics are reported as ``NAME/METRIC``."""

    name: str
    spec: Any
    limit: int | None = None
    seed: int = 0


@dataclass
class ModelsConfig:
    """``models:``: PS needs ``base`` + ``sources``, DFS ``a`` + ``b``, ps_dfs ``base`` + ``sources`` + ``b``
    (absolute paths); ``build`` asks the run to build a tiny local family (see stages.build_models)."""

    build: dict[str, Any] | None = None
    base: str | None = None
    sources: dict[str, str] | None = None
    a: str | None = None
    b: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The resolved YAML form (only the keys that are set, ``build`` always)."""
        out: dict[str, Any] = {"build": copy.deepcopy(self.build)}
        for k in ("base", "sources", "a", "b"):
            if getattr(self, k) is not None:
                out[k] = copy.deepcopy(getattr(self, k))
        return out


@dataclass
class OptimizerConfig:
    """``optimizer:``. ``seed`` (default: the experiment's ``seed``) seeds the optimizer; ``sigma0`` is the
    initial CMA-ES step in unit-cube coordinates; ``population`` the trials per generation."""

    name: str = "cmaes"
    sigma0: float = 1.0 / 6.0
    population: int | None = None
    multi_objective: str = "weighted_sum"
    seed: int | None = None


@dataclass
class BudgetConfig:
    """``budget:``: trials, generations (x population) and wall time in seconds; the first reached ends it."""

    trials: int | None = None
    generations: int | None = None
    wall_time: float | None = None


@dataclass
class WorkersConfig:
    """``workers:``: how many, on which device, with which Ray resources (CPUs, GPUs and custom ``resources``);
    ``sources`` is ``path`` (a shared disk) or ``object_store`` (model files shipped through Ray);
    ``max_retries`` after a worker died."""

    count: int = 1
    device: str = "auto"
    gpus_per_worker: float | None = None
    cpus_per_worker: float = 1
    threads: int = 1
    sources: str = "path"
    max_retries: int = 1
    device_memory_gb: float | None = None  # a worker's device budget in GiB (None: a GPU's free memory; no cap on CPU)
    sources_mode: str = "auto"  # auto | resident | streamed (evomerge.memory_plan.MemoryOptions.sources)
    devices_per_worker: int = 1  # devices one worker spans: its candidate's layers placed across them (placement.py)
    # custom Ray resources each worker needs ({name: amount}): places workers on the nodes that offer them
    # (``ray start --resources``; docs/CLUSTER.md)
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class Experiment:
    """A validated experiment. Paths are absolute; ``raw`` is the resolved mapping written to the run folder."""

    name: str
    seed: int
    out: Path | None
    models: ModelsConfig
    space: SpaceDef
    evaluators: list[EvaluatorSpec]
    objectives: list[Objective]
    optimizer: OptimizerConfig
    budget: BudgetConfig
    workers: WorkersConfig
    python_path: list[str]
    dtype: str | None  # None: the sources' dtype
    description: str = ""
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    source_file: Path | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The search space's kind: ``ps``, ``dfs`` or ``ps_dfs``."""
        return self.space.kind

    @property
    def pareto(self) -> bool:
        """Several objectives told to the optimizer as a vector (NSGA-II / MOTPE) instead of a weighted sum."""
        return len(self.objectives) > 1 and self.optimizer.multi_objective == "pareto"

    @property
    def optimizer_seed(self) -> int:
        """The optimizer's seed: ``optimizer.seed`` when given, else the experiment's ``seed``."""
        return self.seed if self.optimizer.seed is None else self.optimizer.seed


def _err(msg: str) -> EvomergeError:
    return EvomergeError(msg)


def parse_duration(value: Any) -> float | None:
    """Seconds from 90, '90s', '15m', '2h', '1d' (None stays None)."""
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhd]?)\s*", str(value))
        if not m:
            raise _err(f"budget.wall_time {value!r} is not a duration like 90, '15m' or '2h'")
        seconds = float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if seconds <= 0:
        raise _err(f"budget.wall_time must be positive, got {value!r}")
    return seconds


def _positive_int(where: str, value: Any, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _err(f"{where} must be a positive integer, got {value!r}")
    return int(value)


def _model_path(where: str, value: Any, base_dir: Path, must_exist: bool) -> str:
    if not isinstance(value, str) or not value:
        raise _err(f"{where} must be a path to a model folder, got {value!r}")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (base_dir / path).resolve()
    if must_exist and not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json"
        raise _err(f"{where}: model folder {path} {what}")
    return str(path)


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment YAML file."""
    path = Path(path)
    if not path.is_file():
        raise _err(f"experiment file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise _err(f"{path}: not valid YAML ({first})") from None
    if data is None:
        raise _err(f"{path} is empty")
    return validate_experiment(data, base_dir=path.resolve().parent, default_name=path.stem, source_file=path)


def validate_experiment(data: Any, base_dir: str | Path = ".", default_name: str = "experiment",
                        source_file: Path | None = None, check_models: bool = True, resolved: bool = False
                        ) -> Experiment:
    """Validate a mapping into an ``Experiment``.

    Args:
        data: the experiment mapping (as read from YAML).
        base_dir: the folder relative paths (models, python_path, evaluator files) resolve against.
        default_name: the name when ``name`` is not given.
        source_file: the YAML file it came from, if any.
        check_models: whether model folders must exist (False for a run folder's resolved config).
        resolved: ``data`` is a run folder's resolved config (every ``fitness`` key written, whatever the mode),
            not what a user wrote (where a key of another mode is refused).

    Returns:
        The validated ``Experiment`` with ``raw`` set to its resolved mapping.

    Raises:
        EvomergeError: the first problem, as one line naming the key.
    """
    base_dir = Path(base_dir).resolve()
    data = copy.deepcopy(check_keys("the experiment", data, TOP_KEYS))

    name = str(data.get("name") or default_name)
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise _err(f"seed must be an integer, got {seed!r}")
    out = data.get("out")
    out_path = None if out is None else (Path(out).expanduser() if Path(out).is_absolute() else Path(out).resolve())

    # search space first: it decides which models are needed
    if "search_space" not in data:
        raise _err("no search_space given (e.g. search_space: ps_ties_dare)")
    space = load_space_definition(data["search_space"], data.get("space") or {}, base_dir)

    models = _validate_models(data.get("models"), space.kind, base_dir, check_models)
    if check_models and models.build is None:
        check_space_models(space, models.to_dict())  # an architecture that cannot run this search: refused here

    evaluators = _validate_evaluators(data.get("evaluators"), base_dir)
    objectives = _validate_objectives(data.get("objectives"), evaluators)
    optimizer = _validate_optimizer(data.get("optimizer") or {}, len(objectives))
    budget = _validate_budget(data.get("budget"), optimizer)
    workers = _validate_workers(data.get("workers") or {})
    if workers.devices_per_worker > 1 and space.kind != "ps":
        raise _err(f"workers.devices_per_worker {workers.devices_per_worker}: only a ps search places a "
                   f"candidate across devices ({space.kind} workers rewire two whole models on one device)")
    fitness = _validate_fitness(data.get("fitness"), objectives, resolved)

    python_path = data.get("python_path") or []
    if not isinstance(python_path, list) or not all(isinstance(p, str) for p in python_path):
        raise _err("python_path must be a list of folders")
    python_path = [str((base_dir / p).resolve()) for p in python_path]
    dtype = data.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise _err(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")

    description = data.get("description") or ""
    if not isinstance(description, str):
        raise _err("description must be a string")
    exp = Experiment(name=name, seed=seed, out=out_path, models=models, space=space, evaluators=evaluators,
                     objectives=objectives, optimizer=optimizer, budget=budget, workers=workers,
                     python_path=python_path, dtype=dtype, description=description, fitness=fitness,
                     source_file=source_file)
    exp.raw = experiment_to_dict(exp)
    return exp


def experiment_to_dict(exp: Experiment) -> dict[str, Any]:
    """The resolved config (absolute paths, defaults filled in): what the run folder keeps as config.yaml."""
    return {
        "name": exp.name,
        "seed": exp.seed,
        "out": str(exp.out) if exp.out else None,
        "description": exp.description,
        "models": exp.models.to_dict(),
        "search_space": exp.space.to_dict(),
        "evaluators": [{"name": e.name, "spec": e.spec, "limit": e.limit, "seed": e.seed} for e in exp.evaluators],
        "objectives": [o.to_dict() for o in exp.objectives],
        "optimizer": dataclasses.asdict(exp.optimizer),
        "budget": dataclasses.asdict(exp.budget),
        "workers": dataclasses.asdict(exp.workers),
        "python_path": list(exp.python_path),
        "dtype": exp.dtype,
        "fitness": exp.fitness.to_dict(),
    }


def experiment_from_resolved(data: dict[str, Any]) -> Experiment:
    """Rebuild an Experiment from a run folder's config.yaml (already resolved: no re-validation of paths
    that a resumed run may have built itself)."""
    data = copy.deepcopy(data)
    space = data.pop("search_space")
    data["search_space"] = space  # inline, already resolved
    exp = validate_experiment({k: v for k, v in data.items() if k != "space"}, check_models=False, resolved=True)
    return exp


def _validate_models(models: Any, kind: str, base_dir: Path, check: bool) -> ModelsConfig:
    """PS needs base + sources, DFS needs a + b, ps_dfs needs base + sources + b.

    ``build`` asks the run to build a tiny local family (base, model_1..n) into its folder; the paths are
    then filled in at run time (base/sources for PS, a = model_1 and b = model_2 for DFS), so they must
    not be given as well.
    """
    if models is None:
        raise _err("no models given (models: {base: ..., sources: ...} for PS, {a: ..., b: ...} for DFS)")
    models = check_keys("models", models, MODEL_KEYS)
    out: dict[str, Any] = {"build": None}
    build = models.get("build")
    if build is not None and not all(models.get(k) is None for k in ("base", "sources", "a", "b")):
        # a resolved config (resumed run) carries both the build recipe and the built paths
        if not all(models.get(k) is not None for k in _needed(kind)):
            raise _err("models.build builds the models itself: do not also give model paths")
    elif build is not None:
        build = dict(check_keys("models.build", build, BUILD_KEYS))
        build.setdefault("arch", "llama")
        build.setdefault("n_variants", 2)
        build.setdefault("seed", 0)
        if kind != "ps" and build["n_variants"] < 2:
            raise _err("models.build needs n_variants >= 2 for a data-flow search (a = model_1, b = model_2)")
        return ModelsConfig(build=build)
    out["build"] = build
    needed = _needed(kind)
    for k in ("base", "sources", "a", "b"):
        if k in needed and models.get(k) in (None, "", [], {}):
            what = {"base": "the task vectors' origin", "sources": "the models to merge",
                    "a": "the model whose embeddings and first/last layers are kept", "b": "the second model"}[k]
            raise _err(f"models.{k} is required for a {kind} search ({what})")
        if k not in needed and models.get(k) is not None:
            raise _err(f"models.{k} is not used by a {kind} search")
    if "base" in needed:
        out["base"] = _model_path("models.base", models["base"], base_dir, check)
        sources = models["sources"]
        if isinstance(sources, list):
            names = [Path(str(s)).name for s in sources]
            if len(set(names)) != len(names):
                names = [f"model_{i}" for i in range(1, len(sources) + 1)]
            sources = dict(zip(names, sources))
        if not isinstance(sources, dict):
            raise _err("models.sources must be a list of paths or a mapping name -> path")
        out["sources"] = {}
        for alias, p in sources.items():
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", str(alias)):
                raise _err(f"models.sources name {alias!r} may only use letters, digits, '_' and '-'")
            out["sources"][str(alias)] = _model_path(f"models.sources.{alias}", p, base_dir, check)
    for k in ("a", "b"):
        if k in needed:
            out[k] = _model_path(f"models.{k}", models[k], base_dir, check)
    return ModelsConfig(**out)


def _needed(kind: str) -> tuple[str, ...]:
    return {"ps": ("base", "sources"), "dfs": ("a", "b"), "ps_dfs": ("base", "sources", "b")}[kind]


def _anchor_spec(spec: Any, base_dir: Path) -> Any:
    """Relative file paths in an evaluator spec are relative to the experiment file; workers run elsewhere,
    so they are made absolute here."""
    if isinstance(spec, dict):  # ./x and ../x values made absolute too: a run folder reads them back from itself
        return {"base_dir": str(base_dir), **local_paths(spec, base_dir)}
    if not isinstance(spec, str):
        return spec
    if spec.endswith((".yaml", ".yml")) and (base_dir / spec).is_file():
        return str((base_dir / spec).resolve())
    kind, sep, rest = spec.partition(":")
    if kind == "perplexity" and rest and not Path(rest).is_absolute() and (base_dir / rest).exists():
        return f"perplexity:{(base_dir / rest).resolve()}"
    if kind == "custom" and ".py:" in rest:
        file, _, fn = rest.rpartition(":")
        if not Path(file).is_absolute() and (base_dir / file).is_file():
            return f"custom:{(base_dir / file).resolve()}:{fn}"
    return spec


def _validate_evaluators(evaluators: Any, base_dir: Path = Path(".")) -> list[EvaluatorSpec]:
    if not evaluators:
        raise _err("no evaluators given (evaluators: [{name: acc, spec: 'mgsm:ja'}])")
    if not isinstance(evaluators, list):
        evaluators = [evaluators]
    out: list[EvaluatorSpec] = []
    for i, ev in enumerate(evaluators):
        if isinstance(ev, str):
            ev = {"spec": ev}
        ev = check_keys(f"evaluators[{i}]", ev, EVALUATOR_KEYS)
        if "spec" not in ev:
            raise _err(f"evaluators[{i}] has no spec")
        spec = ev["spec"]
        default = spec.get("name") if isinstance(spec, dict) else str(spec).split(":")[0]
        name = str(ev.get("name") or re.sub(r"[^A-Za-z0-9_]+", "_", str(default)).strip("_") or f"eval{i}")
        if "/" in name:
            raise _err(f"evaluators[{i}].name {name!r} may not contain '/' (metrics are named EVALUATOR/METRIC)")
        if any(e.name == name for e in out):
            raise _err(f"two evaluators are named {name!r}; give them distinct names")
        limit = _positive_int(f"evaluators[{i}].limit", ev.get("limit"))
        seed = ev.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _err(f"evaluators[{i}].seed must be an integer")
        out.append(EvaluatorSpec(name=str(name), spec=_anchor_spec(spec, base_dir), limit=limit, seed=seed))
    return out


def _validate_objectives(objectives: Any, evaluators: list[EvaluatorSpec]) -> list[Objective]:
    if not objectives:
        raise _err("no objectives given (objectives: [{metric: EVALUATOR/METRIC, direction: maximize}])")
    if not isinstance(objectives, list):
        objectives = [objectives]
    names = {e.name for e in evaluators}
    out: list[Objective] = []
    for i, ob in enumerate(objectives):
        if isinstance(ob, str):
            ob = {"metric": ob}
        ob = check_keys(f"objectives[{i}]", ob, OBJECTIVE_KEYS)
        metric = ob.get("metric")
        if not isinstance(metric, str) or "/" not in metric:
            raise _err(f"objectives[{i}].metric must look like EVALUATOR/METRIC, got {metric!r}")
        if metric.split("/", 1)[0] not in names:
            raise _err(f"objectives[{i}].metric {metric!r} names no evaluator (have: {', '.join(sorted(names))})")
        direction = ob.get("direction", "maximize")
        if direction not in DIRECTIONS:
            raise _err(f"objectives[{i}].direction must be maximize or minimize, got {direction!r}")
        weight = ob.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise _err(f"objectives[{i}].weight must be a number")
        if any(o.metric == metric for o in out):
            raise _err(f"objective {metric!r} is listed twice")
        out.append(Objective(metric=metric, direction=direction, weight=float(weight)))
    return out


def _validate_optimizer(opt: Any, n_objectives: int) -> OptimizerConfig:
    if isinstance(opt, str):
        opt = {"name": opt}
    opt = dict(check_keys("optimizer", opt, OPTIMIZER_KEYS))
    name = opt.get("name", "cmaes")
    if name not in OPTIMIZERS:
        raise _err(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")
    sigma0 = opt.get("sigma0", 1.0 / 6.0)
    if isinstance(sigma0, bool) or not isinstance(sigma0, (int, float)) or not 0 < sigma0 <= 1:
        raise _err(f"optimizer.sigma0 must be in (0, 1] (genes are searched in [0, 1]), got {sigma0!r}")
    population = _positive_int("optimizer.population", opt.get("population"))
    default_mo = "pareto" if name == "nsga2" else "weighted_sum"
    mo = opt.get("multi_objective", default_mo)
    if mo not in MULTI_OBJECTIVE:
        raise _err(f"optimizer.multi_objective must be weighted_sum or pareto, got {mo!r}")
    if mo == "pareto" and n_objectives > 1 and name not in ("nsga2", "tpe", "random"):
        raise _err(f"optimizer {name} cannot optimize a Pareto front; use nsga2 (or tpe) or "
                   "multi_objective: weighted_sum")
    seed = opt.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _err(f"optimizer.seed must be an integer, got {seed!r}")
    return OptimizerConfig(name=name, sigma0=float(sigma0), population=population, multi_objective=mo, seed=seed)


def _validate_budget(budget: Any, optimizer: OptimizerConfig) -> BudgetConfig:
    if budget is None:
        raise _err("no budget given (budget: {trials: N} or {generations: N} or {wall_time: '2h'})")
    if isinstance(budget, int) and not isinstance(budget, bool):
        budget = {"trials": budget}
    budget = check_keys("budget", budget, BUDGET_KEYS)
    trials = _positive_int("budget.trials", budget.get("trials"))
    generations = _positive_int("budget.generations", budget.get("generations"))
    wall = parse_duration(budget.get("wall_time"))
    if trials is None and generations is None and wall is None:
        raise _err("budget needs trials, generations or wall_time")
    if generations is not None and optimizer.name in ("tpe", "random") and optimizer.population is None:
        raise _err(f"budget.generations needs optimizer.population for {optimizer.name} "
                   "(it has no generations of its own)")
    return BudgetConfig(trials=trials, generations=generations, wall_time=wall)


def _choice(where: str, value: Any, kind: type[enum.Enum]) -> Any:
    choices = [str(c.value) for c in kind]
    if value not in choices:
        raise _err(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return kind(value)


def _number_in(where: str, value: Any, low: float, high: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low < value < high:
        raise _err(f"{where} must be a number {what}, got {value!r}")
    return float(value)


def _validate_fitness(fitness: Any, objectives: list[Objective], resolved: bool = False) -> FitnessConfig:
    """``fitness:`` (see search/fitness.py): race needs exactly one objective (the raced accuracy); a key that
    the mode (or ``against``) does not use is refused, unless ``resolved`` (a run folder's config keeps them all).
    """
    if fitness is None:
        return FitnessConfig()
    if isinstance(fitness, str):
        fitness = {"mode": fitness}
    fitness = check_keys("fitness", fitness, FITNESS_KEYS)
    d = FitnessConfig()
    mode = _choice("fitness.mode", fitness.get("mode", d.mode.value), FitnessMode)
    if not resolved:
        _check_fitness_keys(fitness, mode)
    quantile = fitness.get("quantile", d.quantile)
    if isinstance(quantile, bool) or not isinstance(quantile, (int, float)) or not 0 <= quantile <= 1:
        raise _err(f"fitness.quantile must be a number in [0, 1], got {quantile!r}")
    seed = fitness.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise _err(f"fitness.seed must be an integer, got {seed!r}")
    config = FitnessConfig(
        mode=mode, min_items=_positive_int("fitness.min_items", fitness.get("min_items", d.min_items), False) or 1,
        growth=_number_in("fitness.growth", fitness.get("growth", d.growth), 1, math.inf, "above 1"),
        confidence=_number_in("fitness.confidence", fitness.get("confidence", d.confidence), 0, 1,
                              "strictly between 0 and 1"),
        bound=_choice("fitness.bound", fitness.get("bound", d.bound.value), Bound),
        against=_choice("fitness.against", fitness.get("against", d.against.value), Against),
        quantile=float(quantile), window=_positive_int("fitness.window", fitness.get("window")),
        batch_items=_positive_int("fitness.batch_items", fitness.get("batch_items", d.batch_items), False) or 1,
        seed=seed)
    if mode == FitnessMode.RACE and len(objectives) != 1:
        raise _err(f"fitness: race needs exactly one objective (the accuracy it races), got {len(objectives)}; "
                   "use fitness: minibatch or full")
    return config


#: The ``fitness`` keys each mode uses (besides ``mode``); ``quantile`` and ``window`` only with ``against: quantile``.
FITNESS_MODE_KEYS = {
    FitnessMode.FULL: set(),
    FitnessMode.RACE: {"min_items", "growth", "confidence", "bound", "against", "quantile", "window", "seed"},
    FitnessMode.MINIBATCH: {"batch_items", "against", "quantile", "window", "seed"},
}


def _check_fitness_keys(fitness: dict[str, Any], mode: FitnessMode) -> None:
    """Refuse a ``fitness`` key that ``mode`` ignores (e.g. ``min_items`` with ``minibatch``): a setting that
    would silently do nothing."""
    used = FITNESS_MODE_KEYS[mode]
    for key in sorted(set(fitness) - {"mode"}):
        if key not in used:
            modes = [m.value for m, keys in FITNESS_MODE_KEYS.items() if key in keys]
            raise _err(f"fitness.{key} is a setting of fitness mode {' and '.join(modes)}, not of {mode.value}")
    if fitness.get("against", Against.BEST.value) == Against.BEST.value:
        for key in ("quantile", "window"):
            if key in fitness:
                raise _err(f"fitness.{key} is a setting of fitness against: quantile, not of against: best")


def _validate_workers(workers: Any) -> WorkersConfig:
    if isinstance(workers, int) and not isinstance(workers, bool):
        workers = {"count": workers}
    workers = check_keys("workers", workers, WORKER_KEYS)
    count = _positive_int("workers.count", workers.get("count", 1), allow_none=False)
    device = workers.get("device", "auto")
    # mps is not offered: the workers' engine and Ray's resources know CPUs and CUDA GPUs only
    if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise _err(f"workers.device must be auto, cpu, cuda or cuda:N, got {device!r}")
    gpus = workers.get("gpus_per_worker")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0):
        raise _err(f"workers.gpus_per_worker must be a non-negative number, got {gpus!r}")
    cpus = workers.get("cpus_per_worker", 1)
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or cpus <= 0:
        raise _err(f"workers.cpus_per_worker must be a positive number, got {cpus!r}")
    threads = _positive_int("workers.threads", workers.get("threads", 1), allow_none=False)
    sources = workers.get("sources", "path")
    if sources not in ("path", "object_store"):
        raise _err(f"workers.sources must be path or object_store, got {sources!r}")
    retries = workers.get("max_retries", 1)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise _err(f"workers.max_retries must be a non-negative integer, got {retries!r}")
    memory = workers.get("device_memory_gb")
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        raise _err(f"workers.device_memory_gb must be a positive number, got {memory!r}")
    mode = workers.get("sources_mode", "auto")
    if mode not in SOURCES_MODES:
        raise _err(f"workers.sources_mode must be auto, resident or streamed, got {mode!r}")
    spans = _positive_int("workers.devices_per_worker", workers.get("devices_per_worker", 1), allow_none=False)
    assert count is not None and threads is not None and spans is not None
    if spans > 1 and re.fullmatch(r"cuda:\d+", device):
        raise _err(f"workers.device {device} names one GPU; a worker spanning {spans} devices uses device cuda "
                   f"(Ray gives each worker its own {spans} GPUs)")
    if spans > 1 and gpus is not None and device != "cpu" and gpus < spans:
        raise _err(f"workers.gpus_per_worker {gpus} is fewer than workers.devices_per_worker {spans}")
    return WorkersConfig(count=count, device=device, gpus_per_worker=None if gpus is None else float(gpus),
                         cpus_per_worker=cpus, threads=threads, sources=sources, max_retries=retries,
                         device_memory_gb=None if memory is None else float(memory), sources_mode=mode,
                         devices_per_worker=spans,
                         resources=_validate_resources(workers.get("resources") or {}))


def _validate_resources(resources: Any) -> dict[str, float]:
    """``workers.resources``: {custom Ray resource name: a positive amount per worker}."""
    if not isinstance(resources, dict):
        raise _err(f"workers.resources must be a mapping of Ray resource names to amounts, got {resources!r}")
    out: dict[str, float] = {}
    for name, amount in resources.items():
        if not isinstance(name, str) or name in ("CPU", "GPU", "memory", "object_store_memory") or not name:
            raise _err(f"workers.resources: {name!r} is not a custom Ray resource name "
                       "(CPUs and GPUs are cpus_per_worker and gpus_per_worker)")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not 0 < amount < math.inf:
            raise _err(f"workers.resources.{name} must be a positive number, got {amount!r}")
        out[name] = float(amount)
    return out
