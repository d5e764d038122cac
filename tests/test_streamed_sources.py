"""Sources that do not fit the device budget are streamed tensor by tensor into each candidate: a streamed
candidate equals the resident one bit for bit (a CPU engine with a configured device-memory cap), the plan
says what it keeps, and a budget too small for even the candidate is refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.memory_plan import GB, MemoryOptions, SourcesMode
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    from evomerge import tiny

    return tiny.make_family(tmp_path_factory.mktemp("bf16s"), n_variants=2, arch="qwen2", seed=3,
                            dtype=torch.bfloat16, max_shard_size="40KB")


def _recipe(fam: dict[str, Path], method: str, parameters: dict | None = None, dtype: str | None = None) -> Recipe:
    per = {"weight": [0.3, 0.8], "density": [0.4, 0.7]} if method != "linear" else {"weight": 0.5}
    data = {"merge_method": method, "models": [{"model": str(fam[m]), "parameters": per}
                                              for m in ("model_1", "model_2")]}
    if method != "linear":
        data["base_model"] = str(fam["base"])
    if parameters:
        data["parameters"] = parameters
    if dtype:
        data["dtype"] = dtype
    return Recipe.from_dict(data)


def _state(engine: MergeEngine) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in engine.tensors()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method,dtype", [("ties", None), ("dare_ties", None), ("della", None),
                                          ("breadcrumbs_ties", "float32"), ("linear", None)])
def test_streamed_candidate_equals_resident_bit_for_bit(bf16_family, method, dtype):
    params = {"epsilon": 0.1} if method == "della" else None
    recipe = _recipe(bf16_family, method, params, dtype)
    resident = MergeEngine(recipe, threads=2, seed=5)
    assert resident.memory.mode is SourcesMode.RESIDENT and all(resident.memory.resident)
    plan = resident.memory
    # a cap that holds the candidate, the scratch and about half the sources: the rest is streamed
    cap = (plan.candidate + plan.scratch + plan.sources // 2) / GB
    capped = MergeEngine(recipe, threads=2, seed=5, memory=MemoryOptions(device_memory_gb=cap))
    streamed = MergeEngine(recipe, threads=1, seed=5, memory=MemoryOptions(sources="streamed"))
    assert capped.memory.mode is SourcesMode.STREAMED and 0 < sum(capped.memory.resident) < len(plan.resident)
    assert capped.memory.total <= cap * GB and capped.source_bytes <= capped.memory.sources
    assert not any(streamed.memory.resident) and streamed.source_bytes == 0
    other = _recipe(bf16_family, method, params, dtype)
    for m in other.models:
        m.parameters = {k: (0.55 if k == "weight" else 0.6) for k in m.parameters}
    for candidate in (recipe, other):
        want = _state(resident.materialize(candidate) and resident)
        _same(want, _state(capped.materialize(candidate) and capped))
        _same(want, _state(streamed.materialize(candidate) and streamed))


# the methods of issue 15 item 1, with each method's own parameters (models: the non-base sources)
NEW_METHODS = {"karcher": ({}, {}, ("base", "model_1", "model_2"), False),
               "multislerp": ({}, {"weight": 0.5}, ("model_1", "model_2"), True),
               "nuslerp": ({}, {"weight": 0.5}, ("model_1", "model_2"), True),
               "nearswap": ({"t": 0.5}, {}, ("model_1",), True),
               "arcee_fusion": ({}, {}, ("model_1",), True),
               "ram": ({}, {}, ("model_1", "model_2"), True),
               "ramplus_tl": ({}, {}, ("model_1", "model_2"), True),
               "sce": ({"select_topk": 0.5}, {}, ("model_1", "model_2"), True)}


@pytest.mark.parametrize("method", sorted(NEW_METHODS))
def test_streamed_equals_resident_for_every_method(bf16_family, method):
    """Every per-tensor method streams: its one-shot merge of sources read per candidate equals the resident one."""
    parameters, per, models, with_base = NEW_METHODS[method]
    data: dict = {"merge_method": method,
                  "models": [{"model": str(bf16_family[m]), **({"parameters": per} if per else {})} for m in models]}
    if with_base:
        data["base_model"] = str(bf16_family["base"])
    if parameters:
        data["parameters"] = parameters
    recipe = Recipe.from_dict(data)
    resident = MergeEngine(recipe, seed=5)
    streamed = MergeEngine(recipe, seed=5, memory=MemoryOptions(sources="streamed"))
    assert all(resident.memory.resident) and not any(streamed.memory.resident) and streamed.source_bytes == 0
    _same(_state(resident), _state(streamed))


def test_plan_is_one_line_and_nothing_fits_is_refused(bf16_family):
    recipe = _recipe(bf16_family, "ties")
    engine = MergeEngine(recipe, threads=1)
    line = engine.memory.describe()
    assert "\n" not in line and "B/param" in line and "all sources resident" in line
    # ties keeps base + 2 task vectors (bf16) + 2 int32 orders: 2 + 2*2 + 2*4 = 14 bytes per parameter
    assert engine.memory.sources == 14 * engine.memory.params
    without = MergeEngine(recipe, threads=1, memory=MemoryOptions(keep_order=False))
    assert without.memory.sources == 6 * without.memory.params == without.source_bytes
    _same(_state(engine), _state(without))
    with pytest.raises(EvomergeError, match="nothing fits") as err:
        MergeEngine(recipe, memory=MemoryOptions(device_memory_gb=1e-6))
    assert "\n" not in str(err.value)
    with pytest.raises(EvomergeError, match="workers.sources_mode resident"):
        MergeEngine(recipe, memory=MemoryOptions(device_memory_gb=engine.memory.candidate * 1.5 / GB,
                                                 sources="resident"))


def _experiment(family: dict[str, Path], workers: dict) -> dict:
    helpers = Path(__file__).resolve().parent / "search_helpers.py"
    return {"models": {"base": str(family["base"]),
                       "sources": {"m1": str(family["model_1"]), "m2": str(family["model_2"])}},
            "search_space": "ps_ties_dare",
            "evaluators": [{"name": "e", "spec": {"type": "custom", "function": f"{helpers}:logit_std"}}],
            "objectives": [{"metric": "e/std", "direction": "maximize"}],
            "optimizer": {"name": "random"}, "budget": {"trials": 2}, "workers": {"count": 1, **workers},
            "seed": 1}


def test_run_prints_the_plan_and_refuses_when_nothing_fits(bf16_family, ray_address, tmp_path, capsys):
    import yaml

    from evomerge.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_experiment(bf16_family, {"device_memory_gb": 1e-6})))
    code = main(["run", str(exp), "--out", str(tmp_path / "no"), "--address", ray_address, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "nothing fits" in err[-1] and not any("Traceback" in line for line in err)
    exp.write_text(yaml.safe_dump(_experiment(bf16_family, {"device_memory_gb": 4, "sources_mode": "streamed"})))
    code = main(["run", str(exp), "--out", str(tmp_path / "yes"), "--address", ray_address, "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.out
    plan = next(line for line in printed.err.splitlines() if line.startswith("memory per worker"))
    assert "streamed from host memory" in plan and "budget 4.00 GB" in plan


def test_sort_orders_go_before_any_source_is_streamed(bf16_family):
    """ties with a budget that holds every source but not their int32 sort orders: the plan drops the orders
    (a resident tensor without one costs a one-shot top-k, a streamed one that plus a read) and streams nothing;
    the candidates equal the ordered engine's bit for bit."""
    recipe = _recipe(bf16_family, "ties")
    ordered = MergeEngine(recipe, threads=1)
    plain = MergeEngine(recipe, threads=1, memory=MemoryOptions(keep_order=False))
    assert ordered.memory.keep_order and not plain.memory.keep_order
    cap = (plain.memory.total + (ordered.memory.total - plain.memory.total) // 2) / GB  # between the two
    capped = MergeEngine(recipe, threads=1, memory=MemoryOptions(device_memory_gb=cap))
    assert not capped.memory.keep_order and all(capped.memory.resident)
    assert capped.source_bytes == plain.source_bytes == 6 * capped.memory.params
    _same(_state(ordered), _state(capped))
    other = _recipe(bf16_family, "ties", {"lambda": 0.7})
    ordered.materialize(other)
    capped.materialize(other)
    _same(_state(ordered), _state(capped))
