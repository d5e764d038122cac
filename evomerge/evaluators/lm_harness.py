"""lm-eval (EleutherAI's evaluation harness) on the in-memory model: any built-in task or a local task YAML.

Built once per worker: the TaskManager and the task objects (dataset loading, prompt setup) at build time, the
HFLM wrapper at the first ``evaluate``. Later calls on the same model object reuse both: HFLM holds a reference
to the model, so weights rewritten in place are what the next evaluation sees; nothing derived from the weights
is kept between calls (lm-eval's request cache is off).

Always offline: HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1, and HF_HOME set to a local folder (the ``hf_home``
option, else an existing HF_HOME, else ``~/.cache/evomerge/hf``) before lm-eval / datasets are imported. Built-in
tasks therefore only run when their data is already in that cache; local task YAMLs (``include_path``) with
``dataset_path: json`` / ``csv`` and local ``data_files`` always work.

Metrics use lm-eval's names, ``METRIC,FILTER`` (e.g. ``exact_match,strict-match``); with several tasks (a
group), ``TASK/METRIC,FILTER``. ``metric`` picks one; by default every metric of every task is returned.
``limit`` draws that many documents per task with ``random.Random(seed)`` (lm-eval's ``samples``), the same for
every candidate.

Per-item scores (``score_items``, what ``fitness: race | minibatch`` need): a single task whose metrics lm-eval
aggregates by their mean (acc, exact_match, ...) is scored on the chosen documents only, and each document's
value is read from lm-eval's logged sample for that metric and filter.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.evaluators.base import Evaluator, ItemScores, check_indices, check_keys, resolve_path

CONFIG_KEYS = {"type", "name", "description", "task", "metric", "include_path", "num_fewshot", "batch_size",
               "max_gen_toks", "gen_kwargs", "apply_chat_template", "fewshot_seed", "hf_home", "log_samples",
               "metrics", "max_length"}


def set_offline_environment(hf_home: str | None = None) -> Path:
    """Offline flags and a local HF_HOME; must run before datasets / lm_eval are imported to take effect."""
    folder = hf_home or os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "evomerge" / "hf")
    os.environ["HF_HOME"] = folder
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # building a local task's split is instant; its progress bar would only add lines to a one-line error
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    Path(folder).mkdir(parents=True, exist_ok=True)
    # Libraries imported earlier read these at import time: switch them to offline too.
    if "huggingface_hub" in sys.modules:
        import huggingface_hub.constants as hub_constants  # only when already loaded (no import for nothing)

        hub_constants.HF_HUB_OFFLINE = True
    if "datasets" in sys.modules:
        import datasets.config as datasets_config  # only when already loaded (no import for nothing)

        datasets_config.HF_DATASETS_OFFLINE = True
        datasets_config.HF_HUB_OFFLINE = True
        import datasets  # already loaded (see above)

        datasets.disable_progress_bars()
    return Path(folder)


class LmEvalEvaluator(Evaluator):
    """An lm-eval task (or group) evaluated on the in-memory model, built once, run many times."""

    def __init__(self, config: dict[str, Any], base_dir: Path, limit: int | None = None, seed: int = 0) -> None:
        check_keys(config, CONFIG_KEYS, "lm_eval evaluator")
        if not config.get("task"):
            raise EvomergeError("lm_eval evaluator needs a 'task'")
        self.hf_home = set_offline_environment(config.get("hf_home"))
        for noisy in ("lm_eval", "lm-eval"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        from lm_eval.tasks import TaskManager  # deferred: heavy, and must follow set_offline_environment()

        self.task_name = str(config["task"])
        self.name = str(config.get("name", self.task_name))
        include = config.get("include_path")
        include_paths = [str(resolve_path(p, base_dir)) for p in
                         (include if isinstance(include, list) else [include] if include else [])]
        for p in include_paths:
            if not Path(p).is_dir():
                raise EvomergeError(f"lm_eval include_path is not a folder: {p}")
        self.batch_size = int(config.get("batch_size", 16))
        self.max_length = config.get("max_length")
        self.apply_chat_template = config.get("apply_chat_template", False)
        self.log_samples = bool(config.get("log_samples", False))
        self.last_samples: dict[str, list[dict]] | None = None

        # Index only the local folders when the task is there (indexing lm-eval's ~10k built-in tasks takes
        # ~10 s); fall back to the built-in index otherwise.
        manager = None
        if include_paths:
            local = TaskManager(include_path=include_paths, include_defaults=False)
            if self.task_name in local.all_subtasks or self.task_name in local.all_tasks:
                manager = local
        if manager is None:
            manager = TaskManager(include_path=include_paths or None)
            if self.task_name not in manager.all_tasks:
                raise EvomergeError(f"unknown lm-eval task {self.task_name!r}"
                                    + (f" (also looked in {', '.join(include_paths)})" if include_paths else ""))
        try:
            self.loaded = manager.load([self.task_name])
        except Exception as exc:  # lm-eval raises many kinds; dataset not cached offline is the usual one
            raise EvomergeError(f"lm-eval task {self.task_name!r} could not be built offline "
                                f"(HF_HOME={self.hf_home}): {type(exc).__name__}: {str(exc).splitlines()[0]}") from None
        self.tasks = self.loaded["tasks"]
        self._configure_tasks(config)
        self.samples = self._subsample(limit, seed)
        self.all_metric_names = self._metric_names()
        metric = config.get("metric")
        wanted = [metric] if metric else list(config.get("metrics") or self.all_metric_names)
        missing = [m for m in wanted if m not in self.all_metric_names]
        if missing:
            raise EvomergeError(f"lm-eval task {self.task_name}: metric(s) {', '.join(missing)} not produced; "
                                f"available: {', '.join(self.all_metric_names)}")
        self.metric_names = tuple(wanted)
        self._lm = None
        self.doc_ids = self._item_docs()
        self.n_items = None if self.doc_ids is None else len(self.doc_ids)

    def _item_docs(self) -> list[int] | None:
        """The documents per-item scoring walks (the subsample, else all), or None when it cannot: several
        tasks, or a metric lm-eval does not aggregate by its mean."""
        if len(self.tasks) != 1:
            return None
        (name, task), = self.tasks.items()
        aggregation = task.aggregation()
        if any(getattr(aggregation.get(m.split(",", 1)[0]), "__name__", "") != "mean" for m in self.metric_names):
            return None
        return list(self.samples[name]) if self.samples is not None else list(range(len(task.eval_docs)))

    def _configure_tasks(self, config: dict[str, Any]) -> None:
        gen_kwargs = dict(config.get("gen_kwargs") or {})
        if config.get("max_gen_toks") is not None:
            gen_kwargs["max_gen_toks"] = int(config["max_gen_toks"])
        for task in self.tasks.values():
            if gen_kwargs and task.get_config("output_type") == "generate_until":
                task.set_config(key="generation_kwargs", value=gen_kwargs, update=True)
            if config.get("num_fewshot") is not None:
                task.set_config(key="num_fewshot", value=int(config["num_fewshot"]))
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=int(config.get("fewshot_seed", 1234)))

    def _subsample(self, limit: int | None, seed: int) -> dict[str, list[int]] | None:
        if limit is None:
            return None
        samples = {}
        for name, task in self.tasks.items():
            n = len(task.eval_docs)
            samples[name] = sorted(random.Random(seed).sample(range(n), limit)) if limit < n else list(range(n))
        return samples

    def _metric_names(self) -> list[str]:
        names = []
        single = len(self.tasks) == 1
        for name, task in self.tasks.items():
            filters = [f.name for f in getattr(task, "_filters", [])] or ["none"]
            for metric in task._metric_fn_list:
                for filter_name in filters:
                    key = f"{metric},{filter_name}"
                    names.append(key if single else f"{name}/{key}")
        return names

    def _wrapper(self, model, tokenizer):
        """HFLM around this model object, made once and reused while the same model and tokenizer come in."""
        if self._lm is None or self._lm.model is not model or self._lm.tokenizer is not tokenizer:
            from lm_eval.models.huggingface import HFLM  # deferred: heavy (see TaskManager above)

            kwargs = {"max_length": int(self.max_length)} if self.max_length else {}
            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, **kwargs)
        return self._lm

    def score_items(self, model, tokenizer, indices: Sequence[int]) -> ItemScores:
        """Per-document metric values (lm-eval's logged samples) of the items at ``indices``.

        Raises:
            EvomergeError: several tasks, a metric not aggregated by its mean, or a document without a value.
        """
        if self.doc_ids is None:
            return super().score_items(model, tokenizer, indices)
        from lm_eval import evaluator  # deferred: heavy (see TaskManager above)

        positions = check_indices(indices, len(self.doc_ids), self.name)
        (task_name,) = self.tasks
        wanted = [self.doc_ids[p] for p in positions]
        results = evaluator.evaluate(lm=self._wrapper(model, tokenizer), task_dict=self.loaded,
                                     samples={task_name: sorted(wanted)}, bootstrap_iters=0, log_samples=True,
                                     apply_chat_template=self.apply_chat_template, verbosity="ERROR")
        by_doc: dict[tuple[int, str], float] = {}
        for sample in results["samples"][task_name]:
            for name in self.metric_names:
                metric, _, filter_name = name.partition(",")
                if sample.get("filter") == filter_name and metric in sample:
                    by_doc[(int(sample["doc_id"]), name)] = float(sample[metric])
        try:
            values = {m: tuple(by_doc[(d, m)] for d in wanted) for m in self.metric_names}
        except KeyError as exc:
            raise EvomergeError(f"lm-eval task {self.task_name} logged no {exc.args[0][1]} for document "
                                f"{exc.args[0][0]}") from None
        return ItemScores(tuple(positions), values)

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """The task's metrics (lm-eval's values: accuracies as fractions) on the in-memory model."""
        from lm_eval import evaluator  # deferred: heavy (see TaskManager above)

        lm = self._wrapper(model, tokenizer)
        results = evaluator.evaluate(lm=lm, task_dict=self.loaded, samples=self.samples, bootstrap_iters=0,
                                     log_samples=self.log_samples, apply_chat_template=self.apply_chat_template,
                                     verbosity="ERROR")
        if self.log_samples:
            self.last_samples = results.get("samples")
        single = len(self.tasks) == 1
        metrics: dict[str, float] = {}
        for task_name, values in results["results"].items():
            if task_name not in self.tasks:
                continue
            for key, value in values.items():
                full = key if single else f"{task_name}/{key}"
                if full in self.metric_names:
                    metrics[full] = float(value)
        missing = [m for m in self.metric_names if m not in metrics]
        if missing:
            raise EvomergeError(f"lm-eval task {self.task_name} returned no {', '.join(missing)}")
        return {m: metrics[m] for m in self.metric_names}
