"""The experiment schema: every key validation accepts is used, and every value it accepts works.

Each section is validated with every key set to a value other than its default; the resolved config (what the
run folder keeps and every later step reads) must carry each of them, and the keys whose effect is not a copied
value (optimizer.seed, workers.device, workers.threads, workers.device_memory_gb, workers.sources_mode,
models.build) are followed to where they act.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from evomerge.errors import EvomergeError
from evomerge.memory_plan import GB, MemoryOptions, SourcesMode, plan_worker_memory
from evomerge.search import experiment as schema
from evomerge.search.experiment import validate_experiment
from evomerge.search.objectives import Objective
from evomerge.search.optimizers import Problem, build_optimizer
from evomerge.search.pool import worker_setup
from evomerge.search.run_folder import RunFolder
from evomerge.search.search_space import (
    PS_KEYS,
    DFSSpaceDef,
    GeneBounds,
    IndicatorBounds,
    PSDFSSpaceDef,
    PSSpaceDef,
    load_space_definition,
)
from evomerge.search.stages import stage_space
from evomerge.search.tiny_family import build_models
from evomerge.search.worker import TrialRunner, WorkerSetup


def _full(family) -> dict:
    """An experiment with every key of every section set (PS models; DFS and build are checked apart)."""
    return {
        "name": "full", "seed": 11, "out": "somewhere", "description": "every key set",
        "models": {"base": str(family["base"]), "sources": {"m1": str(family["model_1"])}},
        "search_space": "ps_ties_dare", "space": {"group_size": 2},
        "evaluators": [{"name": "e", "spec": "custom:search_helpers:pairwise", "limit": 3, "seed": 4}],
        "objectives": [{"metric": "e/acc", "direction": "minimize", "weight": 2.0}],
        "optimizer": {"name": "random", "sigma0": 0.25, "population": 5, "multi_objective": "pareto", "seed": 99},
        "budget": {"trials": 7, "generations": 2, "wall_time": "2m"},
        "workers": {"count": 3, "device": "cpu", "gpus_per_worker": 0.5, "cpus_per_worker": 2, "threads": 2,
                    "sources": "object_store", "max_retries": 4, "device_memory_gb": 2.5, "sources_mode": "streamed",
                    "devices_per_worker": 2, "resources": {"evomerge_worker": 1}},
        "python_path": ["lib"], "dtype": "bfloat16",
        "fitness": {"mode": "race", "min_items": 20, "growth": 3.0, "confidence": 0.8, "bound": "bernstein",
                    "against": "quantile", "quantile": 0.25, "window": 6, "seed": 8},
    }


def test_every_accepted_key_reaches_the_resolved_config(llama_family, tmp_path):
    data = _full(llama_family)
    sections = {"models": schema.MODEL_KEYS - {"a", "b", "build"}, "evaluators": schema.EVALUATOR_KEYS,
                "objectives": schema.OBJECTIVE_KEYS, "optimizer": schema.OPTIMIZER_KEYS,
                "budget": schema.BUDGET_KEYS, "workers": schema.WORKER_KEYS, "fitness": schema.FITNESS_KEYS}
    assert set(data) == schema.TOP_KEYS  # the example sets every top-level key
    exp = validate_experiment(data, base_dir=tmp_path)
    raw = exp.raw
    for section, keys in sections.items():
        given = data[section][0] if isinstance(data[section], list) else data[section]
        resolved = raw[section][0] if isinstance(raw[section], list) else raw[section]
        assert set(given) == keys - ({"batch_items"} if section == "fitness" else set()), section  # minibatch's
        for key in keys:
            assert key in resolved, f"{section}.{key} is accepted but dropped"
            if key in given and key not in ("base", "sources", "spec", "wall_time"):  # resolved: paths, seconds
                assert resolved[key] == given[key], f"{section}.{key}"
    assert raw["budget"]["wall_time"] == 120.0
    assert raw["search_space"]["group_size"] == 2  # `space` overrides the named space
    assert raw["description"] == "every key set" and raw["out"].endswith("somewhere")
    assert raw["python_path"] == [str(tmp_path / "lib")] and raw["seed"] == 11 and raw["dtype"] == "bfloat16"
    # the resolved config is what a run folder keeps: read back, nothing changes
    assert schema.experiment_from_resolved(raw).raw == raw
    # fitness.batch_items belongs to the other cheap mode (race refuses it): set there, it is kept too
    data["fitness"] = {"mode": "minibatch", "batch_items": 40, "against": "quantile", "quantile": 0.25,
                       "window": 6, "seed": 8}
    minibatch = validate_experiment(data, base_dir=tmp_path).raw["fitness"]
    assert {k: minibatch[k] for k in data["fitness"]} == data["fitness"]
    assert schema.experiment_from_resolved(raw | {"fitness": minibatch}).raw["fitness"] == minibatch


def test_every_search_space_key_is_kept():
    definition = load_space_definition({"kind": "ps", "name": "x", "description": "d", "merge_method": "ties",
                                        "parameters": {"normalize": True}, "group_size": "block",
                                        "embeddings": "with_blocks", "genes": {"weight": {"high": 2.0}},
                                        "smooth": True, "filters": ["mlp"], "init_seed": 3})
    slerp = load_space_definition({"kind": "ps", "merge_method": "slerp", "select": "top_two",
                                   "genes": {"score": {"init": [0.0, 1.0]}}})
    assert PS_KEYS <= set(definition.to_dict()) | set(slerp.to_dict())
    for d in (definition, slerp):
        assert load_space_definition(d.to_dict()) == d
    assert slerp.to_dict()["genes"]["score"]["init"] == [0.0, 1.0]
    with pytest.raises(EvomergeError, match="unknown key 'dtype'"):  # was accepted and dropped
        load_space_definition({"kind": "ps", "dtype": "float16"})


@pytest.mark.parametrize("change, message", [
    ({"smooth": "yes"}, "smooth must be true or false"),
    ({"filters": "mlp"}, "filters must be a list of tensor-name substrings"),
    ({"filters": ["mlp", "mlp"]}, "filters lists a substring twice"),
    ({"init_seed": 1.5}, "init_seed must be an integer"),
    ({"select": "top_two"}, "select must be top_two, with merge_method slerp"),
    ({"group_size": 2, "embeddings": "separate", "smooth": True}, "smooth with layer groups needs embeddings"),
    ({"genes": {"weight": {"init": [0.5, 0.2]}}}, "init range [0.5, 0.2] must have a < b"),
    ({"genes": {"weight": {"init": [0.0, 2.0]}}}, "init 2.0 is outside [0.0, 1.0]"),
    ({"genes": {"weight": {"init": [0.1]}}}, "init must be a number or a range"),
])
def test_bad_genome_options(change, message):
    """mergekit-evolve's genome options as PS keys: a bad one is one line naming it."""
    with pytest.raises(EvomergeError, match=re.escape(message)):
        load_space_definition({"kind": "ps", "merge_method": "ties", **change})


def test_space_definitions_are_typed_and_round_trip():
    """Validated definitions are frozen dataclasses; to_dict() is the resolved YAML mapping (key order included,
    as config.yaml is written unsorted) and reading it back gives the same definition."""
    ps_dfs = load_space_definition("ps_dfs", {"ps_share": 0.25})
    assert isinstance(ps_dfs, PSDFSSpaceDef) and ps_dfs.ps_share == 0.25
    assert isinstance(ps_dfs.ps, PSSpaceDef) and isinstance(ps_dfs.dfs, DFSSpaceDef)
    assert ps_dfs.ps.genes["density"] == GeneBounds(0.05, 1.0, 0.5, "linear")
    assert ps_dfs.dfs.indicator == IndicatorBounds(-1.0, 1.0, 0.5, -0.5)
    resolved = ps_dfs.to_dict()
    assert list(resolved) == ["kind", "name", "ps", "dfs", "ps_share", "description"]
    assert list(resolved["ps"]) == ["kind", "name", "merge_method", "parameters", "group_size", "embeddings",
                                    "genes", "searched", "description"]
    assert list(resolved["dfs"]["scale"]) == ["low", "high", "init", "transform"]
    assert load_space_definition(resolved) == ps_dfs and load_space_definition(resolved).to_dict() == resolved
    with pytest.raises(dataclasses.FrozenInstanceError):
        ps_dfs.ps.group_size = 2  # type: ignore[misc]
    with pytest.raises(EvomergeError, match="indicator.low must be a number"):
        load_space_definition("dfs", {"indicator": {"low": "a"}})


def test_optimizer_seed_seeds_the_optimizer(llama_family, tmp_path):
    def first_ask(**optimizer):
        data = dict(_full(llama_family), optimizer={"name": "random", **optimizer})
        data["budget"] = {"trials": 3}
        exp = validate_experiment(data, base_dir=tmp_path)
        problem = Problem(["a", "b"], [0.5, 0.5], [Objective("e/std")], exp.optimizer_seed, exp.optimizer)
        return exp.optimizer_seed, build_optimizer(problem, str(tmp_path), "s").ask()

    seed_default, x_default = first_ask()
    seed_given, x_given = first_ask(seed=99)
    assert (seed_default, seed_given) == (11, 99)  # default: the experiment's seed
    assert x_given != x_default and first_ask(seed=99) == (seed_given, x_given)


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "mps", "tpu"])
def test_every_accepted_device_works_in_a_worker(device, llama_family, tmp_path):
    data = dict(_full(llama_family), workers={"device": device, "threads": 1})
    accepted = re.fullmatch(r"auto|cpu|cuda(:\d+)?", device) is not None
    if not accepted:
        with pytest.raises(EvomergeError, match="workers.device must be auto, cpu, cuda or cuda:N"):
            validate_experiment(data, base_dir=tmp_path)
        return
    exp = validate_experiment(data, base_dir=tmp_path)
    if device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("a CUDA device value needs a GPU")
    space = stage_space(exp, tmp_path, 0)
    threads = torch.get_num_threads()
    try:
        runner = TrialRunner(WorkerSetup("ps", space.decode(space.x0()), exp.evaluators, device=exp.workers.device,
                                         threads=exp.workers.threads, python_path=[str(tmp_path)]))
        assert runner.ready().error is None and torch.get_num_threads() == 1  # workers.threads applied
        result = runner.evaluate(0, space.decode(space.x0()))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "ok" and 0 <= result.metrics["e/acc"] <= 1 and result.items == 60


@pytest.mark.parametrize("memory,mode", [(None, "auto"), (4, "auto"), (4, "resident"), (2.5, "streamed"),
                                         (1e-6, "auto"), (0, "auto"), (True, "auto"), ("4", "auto"), (4, "lazy")])
def test_every_accepted_memory_setting_works_in_a_worker(memory, mode, llama_family, tmp_path):
    """workers.device_memory_gb and workers.sources_mode reach the workers' engine (and the plan `evomerge run`
    prints); a budget nothing fits in is refused in one line before any worker starts."""
    data = dict(_full(llama_family), workers={"device": "cpu", "threads": 1, "device_memory_gb": memory,
                                              "sources_mode": mode})
    if memory is not None and (isinstance(memory, bool) or not isinstance(memory, (int, float)) or memory <= 0):
        with pytest.raises(EvomergeError, match="workers.device_memory_gb must be a positive number"):
            validate_experiment(data, base_dir=tmp_path)
        return
    if mode not in schema.SOURCES_MODES:
        with pytest.raises(EvomergeError, match="workers.sources_mode must be auto, resident or streamed"):
            validate_experiment(data, base_dir=tmp_path)
        return
    exp = validate_experiment(data, base_dir=tmp_path)
    space = stage_space(exp, tmp_path, 0)
    setup = worker_setup(exp, tmp_path, 0, space)
    assert setup.memory == MemoryOptions(device_memory_gb=memory, sources=mode)
    if memory is not None and memory < 1e-3:
        with pytest.raises(EvomergeError, match="nothing fits"):
            plan_worker_memory(setup.initial, setup.device, setup.threads, setup.memory)
        return
    plan = plan_worker_memory(setup.initial, setup.device, setup.threads, setup.memory)
    assert plan.budget == (None if memory is None else int(memory * GB))
    threads = torch.get_num_threads()
    try:
        runner = TrialRunner(setup)
        assert runner.ready().error is None and runner.engine is not None
        expected = SourcesMode.STREAMED if mode == "streamed" else SourcesMode.RESIDENT
        assert runner.engine.memory.mode is expected and plan.mode is expected
        assert runner.engine.memory.resident == plan.resident
        result = runner.evaluate(0, space.decode(space.x0()))
    finally:
        torch.set_num_threads(threads)
    assert result.status == "ok" and 0 <= result.metrics["e/acc"] <= 1 and result.items == 60


def test_models_build_keys_shape_the_built_family(tmp_path):
    data = {"models": {"build": {"arch": "qwen2", "n_variants": 3, "seed": 2, "scale": 0.1, "num_layers": 3,
                                 "hidden_size": 32, "intermediate_size": 48}},
            "search_space": "ps_ties_dare", "evaluators": ["custom:search_helpers:logit_std"],
            "objectives": ["custom/std"], "budget": 1}
    assert set(data["models"]["build"]) == schema.BUILD_KEYS
    exp = validate_experiment(data, base_dir=tmp_path)
    run = RunFolder.create(tmp_path / "run", exp.raw)
    config = build_models(run, run.config())
    assert sorted(config["models"]["sources"]) == ["model_1", "model_2", "model_3"]
    cfg = json.loads((run.path / "models" / "base" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (
        "qwen2", 3, 32, 48)


@pytest.mark.parametrize("resources,error", [
    ({"evomerge_worker": 0.5, "big_node": 2}, None),
    ({"GPU": 1}, "'GPU' is not a custom Ray resource name"),
    ({"evomerge_worker": 0}, "workers.resources.evomerge_worker must be a positive number"),
    ({"evomerge_worker": "1"}, "workers.resources.evomerge_worker must be a positive number"),
    (["evomerge_worker"], "workers.resources must be a mapping"),
])
def test_worker_resources_are_custom_ray_resources(resources, error, llama_family, tmp_path):
    """workers.resources: custom Ray resources with positive amounts (they place the workers on a cluster's
    nodes: tests/test_cluster.py); CPUs and GPUs have keys of their own."""
    data = dict(_full(llama_family), workers={"resources": resources})
    if error:
        with pytest.raises(EvomergeError, match=re.escape(error)):
            validate_experiment(data, base_dir=tmp_path)
        return
    assert validate_experiment(data, base_dir=tmp_path).workers.resources == {"evomerge_worker": 0.5,
                                                                               "big_node": 2.0}
