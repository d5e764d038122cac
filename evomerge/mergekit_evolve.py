"""mergekit-evolve's configuration file, translated into an evomerge experiment (``evomerge run EVOLVE.yaml``).

mergekit-evolve (mergekit 0.1.5's ``mergekit/evo``) reads::

    genome:
      models: [PATH, ...]
      merge_method: ties | dare_ties | task_arithmetic | linear | slerp
      base_model: PATH              # required for ties, dare_ties, task_arithmetic
      tokenizer_source: null
      layer_granularity: 0          # 0: one gene set per model; k: one per k consecutive layers
      normalize: null               # null: true for ties, dare_ties and linear
      allow_negative_weights: false
      smooth: false
      filters: null
    tasks: [{name: TASK, weight: 1.0, metric: "acc,none"}, ...]    # lm-eval tasks; a name alone is weight 1
    limit: null
    num_fewshot: null
    shuffle: false
    random_init: false
    apply_chat_template: true
    fewshot_as_multiturn: true

and searches, with CMA-ES (sigma0 1/6, ``--max-fevals`` 100), a weight per model (and a density for ties and
dare_ties; a score for slerp) per layer group and filter set, maximising ``sum(weight * metric)`` over the tasks.
The translation is a parameter-space experiment (evomerge/search/experiment.py) over the PS space
(search_space.py); docs/METHODS.md ("Moving from mergekit-evolve") has the option-by-option table:

- ``base_model`` is the space's base; for ties, dare_ties and task_arithmetic the other ``models`` are its
  sources (a base listed among ``models`` gets genes in mergekit that these methods ignore; here it gets none);
  linear and slerp take every model as a source (their base_model, if given, must be one of them);
- ``layer_granularity`` 0 -> ``group_size: model``; k -> ``group_size: k`` with ``embeddings: with_blocks``
  (the embedding goes with the first group, the head and final norm with the last, like mergekit's slices);
- genes: ``weight`` (and ``density`` for ties / dare_ties) in [0, 1] (``allow_negative_weights``: [-1, 1]),
  starting at mergekit's 1 / len(models) and density 1; mergekit searches unbounded values and takes their
  absolute value (density also clamped to [0, 1]), evomerge bounds the genes instead (density from 0.01, as a
  density of 0 keeps nothing); slerp: a ``score`` per model in [0, 1] and ``select: top_two``;
- ``smooth`` -> the space's ``smooth`` (gradients through the group genes), ``filters`` -> its ``filters``
  (a gene set per filter), ``random_init`` -> every gene's ``init`` the range [0, 1] (seeded draw);
- ``normalize`` -> the recipe parameter (mergekit-evolve always writes it: true for ties, dare_ties, linear);
  merges run in bfloat16, as mergekit-evolve's;
- each task -> an ``lm_eval`` evaluator (``limit``, ``num_fewshot``, ``apply_chat_template`` passed on; local
  task folders from ``--task-search-path``) and an objective ``TASK/METRIC`` with the task's weight (the
  weighted sum is mergekit-evolve's score);
- optimizer ``cmaes`` with ``--sigma0`` (default 1/6), budget ``--max-fevals`` trials (default 100).

What evomerge cannot reproduce is refused with one line: ``shuffle``, ``fewshot_as_multiturn`` with few-shot
chat prompts, and a ``tokenizer_source`` other than base. ``limit`` draws a seeded random subset of each task's
documents (mergekit-evolve takes the first ``limit``).
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from evomerge.errors import EvomergeError

if TYPE_CHECKING:  # the search stack loads only for `evomerge run`
    from evomerge.search.search_space import PSSpace

METHOD_GENES = {"ties": ["weight", "density"], "dare_ties": ["weight", "density"], "task_arithmetic": ["weight"],
                "linear": ["weight"], "slerp": ["t"]}
GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth"}
TOP_KEYS = {"genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn"}
TASK_KEYS = {"name", "weight", "metric"}


@dataclass
class EvolveOptions:
    """mergekit-evolve's command-line settings that shape the search (its config file does not hold them)."""

    max_fevals: int = 100
    sigma0: float = 1.0 / 6.0
    task_search_path: list[str] = field(default_factory=list)


@dataclass
class Translation:
    """A mergekit-evolve config and the evomerge experiment mapping it became (paths as in the original)."""

    source: Path
    original: dict[str, Any]
    experiment: dict[str, Any]

    def to_yaml(self) -> str:
        header = (f"# evomerge experiment translated from the mergekit-evolve config {self.source.name}\n"
                  f"# (relative paths are relative to that file's folder)\n")
        return header + yaml.safe_dump(self.experiment, sort_keys=False)

    def stored_copies(self, options: EvolveOptions, run_path: Path) -> dict[str, str]:
        """What the run folder keeps, {file name: YAML text}, every path in it relative to the run folder (``./x``,
        ``../x``; search/portable.py), so that both re-run from there, also after the run folder moved together
        with its models and task folders:

        - ``experiment.yaml``: the translation (``evomerge run RUN/experiment.yaml``);
        - ``mergekit_evolve.yaml``: the original config, its model paths rebased; its header names the command
          line options it ran with (``--task-search-path`` relative to the run folder: run it from there).

        Args:
            options: the command-line options the translation was made with.
            run_path: the run folder.
        """
        # deferred: the search package loads only for `evomerge run`
        from evomerge.search.portable import portable_paths

        run_path = run_path.resolve()
        base_dir = self.source.resolve().parent

        def rebase(path: str) -> str:
            p = Path(path).expanduser()
            return str(portable_paths(str((p if p.is_absolute() else base_dir / p).resolve()), run_path))

        experiment = copy.deepcopy(self.experiment)
        models = experiment["models"]
        models["base"], models["sources"] = rebase(models["base"]), [rebase(m) for m in models["sources"]]
        original = copy.deepcopy(self.original)
        genome = original["genome"]
        genome["models"] = [rebase(m) for m in genome["models"]]
        if genome.get("base_model") is not None:
            genome["base_model"] = rebase(genome["base_model"])
        flags = f"--max-fevals {options.max_fevals} --sigma0 {options.sigma0!r}" + "".join(
            f" --task-search-path {rebase(str(Path.cwd() / t))}" for t in options.task_search_path)
        return {
            "experiment.yaml": (f"# evomerge experiment translated from the mergekit-evolve config "
                                f"{self.source.name}\n# (paths relative to this file's folder: the run folder)\n"
                                + yaml.safe_dump(portable_paths(experiment, run_path), sort_keys=False)),
            "mergekit_evolve.yaml": (f"# the mergekit-evolve config {self.source.name} of this run, paths relative "
                                     f"to this folder; from this folder it re-runs with:\n"
                                     f"#   evomerge run mergekit_evolve.yaml {flags}\n"
                                     + yaml.safe_dump(original, sort_keys=False)),
        }


def is_evolve_config(data: Any) -> bool:
    """A mergekit-evolve config has a ``genome`` and no ``search_space``."""
    return isinstance(data, Mapping) and "genome" in data and "search_space" not in data


def read_evolve_config(path: str | Path, options: EvolveOptions) -> Translation | None:
    """The translation of ``path`` when it is a mergekit-evolve config, else None (an ordinary experiment)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None  # the experiment loader reports unreadable files
    if not is_evolve_config(data):
        return None
    where = path.name
    return Translation(source=path, original=copy.deepcopy(data),
                       experiment=translate(data, path.resolve().parent, options, where))


def translate(data: Mapping[str, Any], base_dir: Path, options: EvolveOptions, where: str = "config") -> dict:
    """The experiment mapping (evomerge/search/experiment.py's YAML shape) of a mergekit-evolve config.

    Raises: EvomergeError (one line) for anything unknown, invalid or that evomerge cannot honour.
    """
    _check_keys(data, TOP_KEYS, where)
    genome = data["genome"]
    if not isinstance(genome, Mapping):
        raise EvomergeError(f"{where}: genome must be a mapping")
    _check_keys(genome, GENOME_KEYS, f"{where}: genome")
    _refuse_unsupported(data, genome, where)
    method = genome.get("merge_method")
    assert isinstance(method, str), f"{where}: _refuse_unsupported admits only the METHOD_GENES names"
    base, sources = _models(genome, method, base_dir, where)
    models = genome["models"]
    space = _search_space(genome, method, len(models), base_dir, models[0], where)
    if data.get("random_init"):  # mergekit: every gene starts at a uniform draw from [0, 1)
        for bounds in space["genes"].values():
            bounds["init"] = [max(0.0, bounds["low"]), 1.0]
    evaluators, objectives = _tasks(data, options, base_dir, where)
    return {"name": re.sub(r"[^A-Za-z0-9_\-]+", "_", Path(where).stem) or "evolve", "seed": 0,
            "models": {"base": base, "sources": sources}, "search_space": space,
            "evaluators": evaluators, "objectives": objectives,
            "optimizer": {"name": "cmaes", "sigma0": float(options.sigma0)},
            "budget": {"trials": int(options.max_fevals)}, "dtype": "bfloat16"}


def _models(genome: Mapping[str, Any], method: str, base_dir: Path, where: str) -> tuple[str, list[str]]:
    """The experiment's base and sources: task-vector methods merge the models other than the base (mergekit
    gives a listed base genes that these methods ignore); linear and slerp take every model, the base (a listed
    one, else the first model) only fixing the layer count (slerp picks each group's base itself)."""
    models = genome.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise EvomergeError(f"{where}: genome.models must be a list of model paths")
    base = genome.get("base_model")
    if base is not None and (not isinstance(base, str) or not base):
        raise EvomergeError(f"{where}: genome.base_model must be a model path")
    if method in ("linear", "slerp"):
        if base is not None and not any(_same_path(m, base, base_dir) for m in models):
            why = "linear needs a weight per model" if method == "linear" else "slerp takes two models"
            raise EvomergeError(f"{where}: a {method} genome's base_model must be one of genome.models (mergekit "
                                f"adds it as one more source, and {why})")
        if len(models) < 2:
            raise EvomergeError(f"{where}: a {method} genome needs at least two models")
        return models[0] if base is None else base, list(models)
    if base is None:
        raise EvomergeError(f"{where}: genome.base_model is required for {method}")
    sources = [m for m in models if not _same_path(m, base, base_dir)]
    if not sources:
        raise EvomergeError(f"{where}: genome.models lists no model besides the base_model")
    return base, sources


def _refuse_unsupported(data: Mapping[str, Any], genome: Mapping[str, Any], where: str) -> None:
    method = genome.get("merge_method")
    if method not in METHOD_GENES:
        raise EvomergeError(f"{where}: genome.merge_method {method!r} is not a mergekit-evolve method "
                            f"({', '.join(METHOD_GENES)})")
    if method == "slerp" and (genome.get("smooth") or genome.get("filters")):
        raise EvomergeError(f"{where}: a slerp genome takes neither smooth nor filters (mergekit-evolve refuses "
                            f"them too)")
    filters = genome.get("filters")
    if filters is not None and (not isinstance(filters, list)
                                or not all(isinstance(f, str) and f and f != "*" for f in filters)
                                or len(set(filters)) != len(filters)):
        raise EvomergeError(f"{where}: genome.filters must be a list of distinct tensor-name substrings, "
                            f"got {filters!r}")
    checks = [
        (data.get("shuffle"), "shuffle is not supported (limit already draws a seeded random subset)"),
        (genome.get("tokenizer_source") not in (None, "base"),
         f"genome.tokenizer_source {genome.get('tokenizer_source')!r} is not supported (only base)"),
        (data.get("fewshot_as_multiturn", True) and data.get("apply_chat_template", True)
         and (data.get("num_fewshot") or 0) > 0, "fewshot_as_multiturn with few-shot chat prompts is not "
                                                 "supported (set fewshot_as_multiturn: false)"),
    ]
    for failed, message in checks:
        if failed:
            raise EvomergeError(f"{where}: {message}")
    for key in ("normalize",):
        if genome.get(key) is not None and not isinstance(genome[key], bool):
            raise EvomergeError(f"{where}: genome.{key} must be true, false or null")
    for key in ("allow_negative_weights", "smooth", "shuffle", "random_init", "apply_chat_template",
                "fewshot_as_multiturn"):
        value = genome.get(key) if key in GENOME_KEYS else data.get(key)
        if value is not None and not isinstance(value, bool):
            raise EvomergeError(f"{where}: {key} must be true or false, got {value!r}")


def _search_space(genome: Mapping[str, Any], method: str, n_models: int, base_dir: Path, first: str,
                  where: str) -> dict[str, Any]:
    granularity = genome.get("layer_granularity", 0)
    if isinstance(granularity, bool) or not isinstance(granularity, int) or granularity < 0:
        raise EvomergeError(f"{where}: genome.layer_granularity must be a non-negative integer")
    space: dict[str, Any] = {"kind": "ps", "merge_method": method, "group_size": "model",
                             "embeddings": "with_blocks"}
    if granularity > 0:
        layers = _num_layers(base_dir, first, where)
        if layers % granularity:
            raise EvomergeError(f"{where}: genome.layer_granularity {granularity} does not divide the {layers} "
                                f"layers of {first}")
        space["group_size"] = granularity
    if method == "slerp":  # mergekit-evolve's normalize and int8_mask do nothing to a slerp merge
        space.update(parameters={}, select="top_two", searched=["weight"],
                     genes={"score": {"low": 0.0, "high": 1.0, "init": 1.0 / n_models}})
        return space
    normalize = genome.get("normalize")
    space["parameters"] = {"normalize": method in ("ties", "dare_ties", "linear") if normalize is None
                           else bool(normalize)}
    low = -1.0 if genome.get("allow_negative_weights") else 0.0
    genes = {"weight": {"low": low, "high": 1.0, "init": 1.0 / n_models},
             "density": {"low": 0.01, "high": 1.0, "init": 1.0}}
    space["genes"] = {g: genes[g] for g in METHOD_GENES[method]}
    space["searched"] = list(METHOD_GENES[method])
    if genome.get("smooth"):
        space["smooth"] = True
    if genome.get("filters"):
        space["filters"] = list(genome["filters"])
    return space


def _tasks(data: Mapping[str, Any], options: EvolveOptions, base_dir: Path,
           where: str) -> tuple[list[dict], list[dict]]:
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise EvomergeError(f"{where}: tasks must be a non-empty list of lm-eval task names or {{name, weight, "
                            f"metric}}")
    limit = data.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise EvomergeError(f"{where}: limit must be a positive integer, got {limit!r}")
    fewshot = data.get("num_fewshot")
    if fewshot is not None and (isinstance(fewshot, bool) or not isinstance(fewshot, int) or fewshot < 0):
        raise EvomergeError(f"{where}: num_fewshot must be a non-negative integer, got {fewshot!r}")
    include = [str((Path.cwd() / p).resolve()) for p in options.task_search_path]
    evaluators, objectives, names = [], [], set()
    for i, task in enumerate(tasks):
        task = {"name": task} if isinstance(task, str) else task
        if not isinstance(task, Mapping):
            raise EvomergeError(f"{where}: tasks[{i}] must be a task name or a mapping")
        _check_keys(task, TASK_KEYS, f"{where}: tasks[{i}]")
        name, weight, metric = task.get("name"), task.get("weight", 1.0), task.get("metric", "acc,none")
        if not isinstance(name, str) or not name:
            raise EvomergeError(f"{where}: tasks[{i}].name must be an lm-eval task name")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise EvomergeError(f"{where}: tasks[{i}].weight must be a number, got {weight!r}")
        if not isinstance(metric, str) or not metric:
            raise EvomergeError(f"{where}: tasks[{i}].metric must be an lm-eval metric like 'acc,none'")
        alias = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_") or f"task{i}"
        while alias in names:
            alias += "_"
        names.add(alias)
        spec: dict[str, Any] = {"type": "lm_eval", "task": name, "metric": metric,
                                "apply_chat_template": bool(data.get("apply_chat_template", True))}
        if include:
            spec["include_path"] = include
        if fewshot is not None:
            spec["num_fewshot"] = fewshot
        evaluators.append({"name": alias, "spec": spec, **({"limit": limit} if limit else {})})
        objectives.append({"metric": f"{alias}/{metric}", "direction": "maximize", "weight": float(weight)})
    return evaluators, objectives


def _num_layers(base_dir: Path, model: str, where: str) -> int:
    path = Path(model).expanduser()
    path = path if path.is_absolute() else base_dir / path
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise EvomergeError(f"{where}: cannot read {path / 'config.json'} (needed for layer_granularity)") from None
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int):
        raise EvomergeError(f"{where}: {path / 'config.json'} has no num_hidden_layers")
    return layers


def _same_path(a: str, b: str, base_dir: Path) -> bool:
    def resolve(p: str) -> Path:
        path = Path(p).expanduser()
        return (path if path.is_absolute() else base_dir / path).resolve()

    return resolve(a) == resolve(b)


def _check_keys(data: Mapping[str, Any], known: set[str], where: str) -> None:
    for key in data:
        if key not in known:
            raise EvomergeError(f"{where}: unknown key {key!r} (mergekit-evolve knows: {', '.join(sorted(known))})")


def genome_from_genotype(space: PSSpace, models: Sequence[str], genotype: Sequence[Any]) -> list[float]:
    """The evomerge genome (unit coordinates, ``space.names`` order) of a mergekit-evolve genotype.

    Args:
        space: the PS space of a translated config (built from the experiment ``translate`` returned).
        models: the genome's ``models``, as absolute paths, in the config's order (the genotype's model axis).
        genotype: mergekit's genotype as nested lists, shape (layer groups, models, filter sets, parameters)
            (``ModelGenome.initial_genotype().tolist()``; the filter sets in ``filters`` order, the plain one
            last; the parameters in ``METHOD_GENES`` order). A base listed among the models has genes that
            task-vector methods ignore; they are skipped here too.

    Returns:
        One float in [0, 1] per gene of ``space``. mergekit's own transforms come first: the absolute value of
        a weight (unless negative weights are allowed, i.e. the weight gene's low is below 0) and of a density,
        which is also clamped to [0, 1].

    Raises:
        EvomergeError: a value outside the space's bounds (e.g. a density below 0.01), or a genotype whose
            shape does not match the space.
    """
    definition = space.definition
    params = ["score"] if definition.select == "top_two" else METHOD_GENES[definition.merge_method]
    suffixes = [f"[{f}]" for f in definition.filters] + [""]
    alias_of = {str(Path(path).resolve()): alias for alias, path in space.sources.items()}
    values: dict[str, float] = {}
    for g, (group, _) in enumerate(space.groups):
        for m, model in enumerate(models):
            alias = alias_of.get(str(Path(model).resolve()))
            for s, suffix in enumerate(suffixes):
                for p, param in enumerate(params):
                    value = float(genotype[g][m][s][p])
                    if param == "density":
                        value = min(1.0, abs(value))
                    elif param == "weight" and definition.genes[param].low >= 0:
                        value = abs(value)  # a slerp score is used as it is
                    if alias is not None:
                        values[f"{alias}.{group}.{param}{suffix}"] = value
    if set(values) != set(space.names):
        raise EvomergeError(f"the genotype's genes do not match the space's ({len(values)} vs {space.dim})")
    out = []
    for gene in space.genes:
        if not gene.low <= values[gene.name] <= gene.high:
            raise EvomergeError(f"gene {gene.name} = {values[gene.name]} is outside [{gene.low}, {gene.high}]")
        out.append(gene.unit(values[gene.name]))
    return out


def run_evolve_config(args: Any, start_run: Any):
    """`evomerge run EVOLVE.yaml`: translate, print and validate the experiment, run it, and keep the
    translation in the run folder (``mergekit_evolve.yaml``: the original; ``experiment.yaml``: the translation;
    both re-runnable from there, ``Translation.stored_copies``).
    Returns the RunFolder, or None when ``args.experiment`` is not a mergekit-evolve config."""
    # deferred: the search stack loads only for `evomerge run`, not when a config is only translated
    from evomerge.search.experiment import validate_experiment
    from evomerge.search.launch import default_out

    options = EvolveOptions(task_search_path=list(args.task_search_path or []))
    if args.max_fevals is not None:
        if args.max_fevals < 1:
            raise EvomergeError("--max-fevals must be at least 1")
        options.max_fevals = args.max_fevals
    if args.sigma0 is not None:
        options.sigma0 = args.sigma0
    translation = read_evolve_config(args.experiment, options)
    if translation is None:
        return None
    source = Path(args.experiment)
    experiment = validate_experiment(translation.experiment, base_dir=source.resolve().parent,
                                     default_name=source.stem, source_file=source)
    # deferred: the evaluators (lm-eval, transformers) load only when the translated experiment runs
    from evomerge.evaluators import build_evaluator

    for evaluator in experiment.evaluators:  # a misspelt task or metric fails here, before any folder exists
        build_evaluator(evaluator.spec, limit=evaluator.limit, seed=evaluator.seed)
    print(translation.to_yaml(), end="", flush=True)
    out = Path(args.out) if args.out else (experiment.out or default_out(experiment))
    try:
        return start_run(experiment, out=out, address=args.address, workers=args.workers, seed=args.seed,
                         progress=not args.no_progress)
    finally:
        if (out / "config.yaml").is_file():
            for name, text in translation.stored_copies(options, out).items():
                (out / name).write_text(text, encoding="utf-8")
