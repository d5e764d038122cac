"""The trial worker: one per GPU (or CPU slot), sources resident, one preallocated candidate, many trials.

``TrialRunner`` is a plain class (usable without Ray); ``TrialWorker`` is the Ray actor around it. A worker
is set up once per stage: for PS it builds a ``MergeEngine`` (sources loaded once, one model written in
place per trial); for DFS it loads models A and B once and rewires a ``DataflowCandidate`` per trial. Every
trial returns a plain dict; a candidate that raises, runs out of memory or scores NaN comes back as
``status: failed`` with the reason, and the worker stays usable.

Sources reach the worker either by path (a shared file system) or, with ``workers.sources: object_store``,
as file blobs put in Ray's object store by the driver and written to a local temporary folder here.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def recipe_from_mapping(mapping: dict[str, Any]):
    """The engine's Recipe from a recipe mapping (the mergekit YAML structure)."""
    from evomerge.recipe import Recipe

    for name in ("from_dict", "from_mapping", "parse"):
        fn = getattr(Recipe, name, None)
        if callable(fn):
            return fn(mapping)
    import yaml

    return Recipe.from_yaml(yaml.safe_dump(mapping, sort_keys=False))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


class TrialRunner:
    """Materializes and scores candidates of one search stage (see module docstring)."""

    def __init__(self, setup: dict[str, Any]):
        self.setup = setup
        self.worker_id = setup.get("worker", 0)
        self.error: str | None = None
        self.metric_names: list[str] = []
        self.path_map: dict[str, str] = {}
        try:
            self._init()
        except EvomergeError as exc:
            self.error = str(exc)
        except Exception as exc:  # reported to the driver, which stops with this line
            self.error = f"worker setup failed: {_one_line(exc)}"
            traceback.print_exc()

    def _init(self) -> None:
        for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_NO_ADVISORY_WARNINGS"):
            os.environ.setdefault(key, "1")
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()

        for p in reversed(self.setup.get("python_path", [])):
            if p not in sys.path:
                sys.path.insert(0, p)
        torch.set_num_threads(int(self.setup.get("threads", 1)))
        self.device = resolve_device(self.setup.get("device", "auto"))
        dtype = self.setup.get("dtype")
        self.dtype = getattr(torch, dtype) if dtype else "auto"  # None: the sources' dtype
        blobs = self.setup.get("blobs")
        if blobs:
            self._unpack_blobs(blobs)
        self.kind = self.setup["kind"]
        initial = self._local(self.setup["initial"])
        if self.kind == "ps":
            from evomerge.engine import MergeEngine
            from evomerge.memory_plan import MemoryOptions

            memory = self.setup.get("memory") or {}
            self.engine = MergeEngine(recipe_from_mapping(initial), device=self.device,
                                      memory=MemoryOptions(**memory))
            self.engine.model.eval()
            self.tokenizer = self.engine.tokenizer
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            from evomerge.search.dataflow import DataflowCandidate

            load = dict(dtype=self.dtype, use_safetensors=True)
            self.model_a = AutoModelForCausalLM.from_pretrained(initial["a"], **load).to(self.device).eval()
            self.model_b = AutoModelForCausalLM.from_pretrained(initial["b"], **load).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(initial["a"])
            self.dataflow = DataflowCandidate(self.model_a, self.model_b)
        from evomerge.evaluators import build_evaluator

        self.evaluators = []
        for ev in self.setup["evaluators"]:
            built = build_evaluator(ev["spec"], limit=ev.get("limit"), seed=ev.get("seed", 0))
            self.evaluators.append((ev["name"], built))
            self.metric_names += [f"{ev['name']}/{m}" for m in getattr(built, "metric_names", [])]

    def _unpack_blobs(self, blobs: dict[str, Any]) -> None:
        """Write source folders shipped through Ray's object store to a local temporary folder."""
        import ray

        root = Path(tempfile.mkdtemp(prefix="evomerge-sources-"))
        for i, (orig, ref) in enumerate(sorted(blobs.items())):
            files = ray.get(ref) if not isinstance(ref, dict) else ref
            local = root / f"m{i}"
            for rel, data in files.items():
                target = local / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            self.path_map[orig] = str(local)

    def _local(self, candidate: dict[str, Any]) -> dict[str, Any]:
        if not self.path_map:
            return candidate
        c = dict(candidate)
        for key in ("base_model", "a", "b"):
            if key in c and c[key] in self.path_map:
                c[key] = self.path_map[c[key]]
        if "models" in c:
            c["models"] = [dict(m, model=self.path_map.get(m["model"], m["model"])) for m in c["models"]]
        return c

    def ready(self) -> dict[str, Any]:
        return {"ok": self.error is None, "error": self.error, "metric_names": self.metric_names,
                "pid": os.getpid(), "host": socket.gethostname(), "device": getattr(self, "device", None)}

    def materialize(self, candidate: dict[str, Any]):
        if self.kind == "ps":
            return self.engine.materialize(recipe_from_mapping(self._local(candidate)))
        return self.dataflow.set_path(candidate["layers"], candidate["scales"])

    def evaluate(self, trial: int, candidate: dict[str, Any]) -> dict[str, Any]:
        import torch

        out: dict[str, Any] = {"trial": trial, "worker": self.worker_id, "pid": os.getpid(),
                               "host": socket.gethostname(), "metrics": {}, "error": None}
        t0 = time.perf_counter()
        t1 = t0
        try:
            if self.error:
                raise RuntimeError(self.error)
            with torch.inference_mode():
                model = self.materialize(candidate)
                t1 = time.perf_counter()
                for name, ev in self.evaluators:
                    for k, v in ev.evaluate(model, self.tokenizer).items():
                        if isinstance(v, (int, float)) and not isinstance(v, bool):
                            out["metrics"][f"{name}/{k}"] = float(v)
            bad = [k for k, v in out["metrics"].items() if not math.isfinite(v)]
            out["status"] = "failed" if bad else "ok"
            if bad:
                out["error"] = f"metric {bad[0]} is {out['metrics'][bad[0]]}"
        except torch.OutOfMemoryError as exc:
            out["status"], out["error"] = "failed", f"out of memory: {_one_line(exc)}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception as exc:
            text = str(exc)
            oom = isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)
            out["status"], out["error"] = "failed", ("out of memory: " if oom else "") + _one_line(exc)
        t2 = time.perf_counter()
        out["materialize_s"] = t1 - t0
        out["evaluate_s"] = t2 - t1
        out["seconds"] = t2 - t0
        return out


def make_worker_class(num_cpus: float, num_gpus: float):
    """The Ray actor class with this run's resources (one candidate at a time, never restarted by Ray:
    the driver replaces a dead worker itself and retries its candidate elsewhere)."""
    import ray

    @ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=1)
    class TrialWorker(TrialRunner):
        pass

    return TrialWorker
