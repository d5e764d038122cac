"""A worker spanning several devices (issue 14 item 4), checked on CPU: the placement plan for given per-device
caps (embeddings with the first layers, head with the last, contiguous and balanced by bytes), every tensor on
its planned device with accelerate's hooks moving the hidden states, outputs equal to the single-device engine
bit for bit, the memory plan per device, and the experiment key ``workers.devices_per_worker``.

CPU "devices" (``cpu`` repeated) run the same plan, allocation and hooks as CUDA devices; docs/CLUSTER.md says
how the same runs on several GPUs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.memory_plan import GB, MemoryOptions, job_bytes
from evomerge.merge import plan_merge
from evomerge.placement import check_devices, job_groups, partition, plan_placement
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """bf16 Qwen2 (untied head, sharded) and GPT-2 (tied head, ``transformer.h`` blocks), 6 layers each."""
    from evomerge import tiny

    root = tmp_path_factory.mktemp("placed")
    return {"qwen2": tiny.make_family(root / "qwen2", n_variants=2, arch="qwen2", seed=4, dtype=torch.bfloat16,
                                      num_layers=6, max_shard_size="60KB"),
            "gpt2": tiny.make_family(root / "gpt2", n_variants=2, arch="gpt2", seed=5, num_layers=6)}


def _recipe(fam: dict[str, Path], method: str = "dare_ties", weights=(0.4, 0.7)) -> Recipe:
    models = [{"model": str(fam[m]), "parameters": {"weight": w, "density": 0.6}}
              for m, w in zip(("model_1", "model_2"), weights)]
    return Recipe.from_dict({"merge_method": method, "base_model": str(fam["base"]), "models": models})


def test_partition_is_contiguous_and_follows_the_caps():
    assert partition([1] * 10, [1.0, 1.0]) == [0] * 5 + [1] * 5
    # a device with three times the cap takes three times the layers
    assert partition([1] * 8, [3.0, 1.0]) == [0] * 6 + [1] * 2
    # a heavy first group (large embeddings) leaves fewer blocks on the first device
    slots = partition([6, 1, 1, 1, 1, 1, 1, 2], [1.0, 1.0])
    assert slots == [0, 0, 1, 1, 1, 1, 1, 1] and sum(w for w, s in zip([6, 1, 1, 1, 1, 1, 1, 2], slots) if s) == 7
    assert partition([5], [1.0, 1.0, 1.0]) == [0]


def test_the_plan_for_given_caps(families):
    plan = plan_merge(_recipe(families["qwen2"]))
    groups, count = job_groups(plan)
    names = {job.name: g for job, g in zip(plan.jobs, groups)}
    assert names["model.embed_tokens.weight"] == 0 and names["model.norm.weight"] == count - 1
    assert names["lm_head.weight"] == count - 1 and names["model.layers.3.mlp.up_proj.weight"] == 4
    weights = [0] * count
    for job, group in zip(plan.jobs, groups):
        part = job_bytes(plan.spec, job, plan.out_dtype_for(job))
        weights[group] += part.resident + part.candidate
    cap = sum(weights) / 3 * 1.5 / GB  # each of 3 (CUDA) devices can hold half as much again as a third
    placed = plan_placement(plan, ["cuda:0", "cuda:1", "cuda:2"], memory=MemoryOptions(device_memory_gb=cap))
    slot_of = dict(zip((job.name for job in plan.jobs), placed.job_slots))
    assert slot_of["model.embed_tokens.weight"] == 0 == placed.layer_slots[0]  # embeddings with the first layers
    assert slot_of["lm_head.weight"] == slot_of["model.norm.weight"] == 2 == placed.layer_slots[-1]
    assert list(placed.layer_slots) == sorted(placed.layer_slots) and set(placed.layer_slots) == {0, 1, 2}
    for i, job in enumerate(plan.jobs):  # every tensor of block N is on block N's device
        block = job.name.split(".")[2] if job.name.startswith("model.layers.") else None
        if block is not None:
            assert placed.job_slots[i] == placed.layer_slots[int(block)], job.name
    group_slot = dict(zip(groups, placed.job_slots))
    loads = [sum(w for g, w in enumerate(weights) if group_slot[g] == d) for d in range(3)]
    assert max(loads) <= sum(weights) / 3 + max(weights)  # balanced within one layer group
    for device_plan in placed.memory:  # each device's plan: its own cap, all of its sources resident
        assert device_plan.budget == int(cap * GB) and device_plan.total <= device_plan.budget
        assert all(device_plan.resident)
    assert placed.total().candidate == sum(job_bytes(plan.spec, j, plan.out_dtype_for(j)).candidate
                                           for j in plan.jobs)
    lines = placed.describe().splitlines()
    assert len(lines) == 4 and lines[0].endswith("over 3 devices") and "device 2 (cuda:2): layers" in lines[3]
    # a cap that cannot hold a device's share of the candidate is refused in one line naming the device
    with pytest.raises(EvomergeError, match=r"nothing fits: .* on device 0 \(cuda:0\)") as err:
        plan_placement(plan, ["cuda:0", "cuda:1"], memory=MemoryOptions(device_memory_gb=1e-6))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("devices", [["cpu", "cuda:0"], ["cuda:0", "cuda:0"], []])
def test_bad_device_lists_are_refused(devices):
    with pytest.raises(EvomergeError):
        check_devices(devices)


def _hooked_device(module: torch.nn.Module) -> str:
    return str(module._hf_hook.execution_device)


@pytest.mark.parametrize("arch,count", [("qwen2", 2), ("gpt2", 3)])
def test_placed_engine_equals_one_device(families, arch, count):
    fam = families[arch]
    recipe = _recipe(fam)
    one = MergeEngine(recipe, seed=3, threads=1)
    placed = MergeEngine(recipe, device=["cpu"] * count, seed=3, threads=2)
    assert placed.placement is not None and len(set(placed.placement.layer_slots)) == count
    state = dict(placed.tensors())
    for job, slot in zip(placed.plan.jobs, placed.placement.job_slots):  # every tensor where the plan put it
        assert state[job.name].device == torch.device(placed.placement.devices[slot]), job.name
    blocks = placed.model.model.layers if arch == "qwen2" else placed.model.transformer.h
    for block, slot in zip(blocks, placed.placement.layer_slots):  # the hooks run each block on its device
        assert _hooked_device(block) == placed.placement.devices[slot]
    if arch == "qwen2":  # the lean decoding step bypasses the blocks' forward, so not on a placed model
        from evomerge.evaluators.lean_decode import lean_step_for

        assert lean_step_for(one.model) is not None and lean_step_for(placed.model) is None
    if arch == "gpt2":  # the tied head is the embeddings' tensor, on the first device
        assert placed.model.lm_head.weight is placed.model.transformer.wte.weight
    reference = dict(one.tensors())
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)
    ids = torch.tensor([[1, 5, 7, 9, 3, 11], [4, 4, 8, 2, 6, 10]])
    with torch.no_grad():
        assert torch.equal(one.model(ids).logits, placed.model(ids).logits)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(one.model.generate(ids, **kwargs), placed.model.generate(ids, **kwargs))
    # a new candidate is written in place on the same devices, equal to the single-device engine's
    other = _recipe(fam, weights=(0.9, 0.2))
    one.materialize(other)
    placed.materialize(other)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(one.tensors(), placed.tensors()))


def test_memory_plan_per_device_streams_what_a_device_cannot_hold(families):
    recipe = _recipe(families["qwen2"], method="ties")
    full = MergeEngine(recipe, device=["cpu", "cpu"], threads=1)
    per_device = [p.total for p in full.placement.memory]
    # each device's cap holds its candidate share and scratch but only part of its sources: some are streamed
    cap = min(p.candidate + p.scratch + p.sources // 2 for p in full.placement.memory) / GB
    capped = MergeEngine(recipe, device=["cpu", "cpu"], threads=1, memory=MemoryOptions(device_memory_gb=cap))
    for plan in capped.placement.memory:
        assert plan.budget == int(cap * GB) and plan.total <= plan.budget
        assert 0 < sum(plan.resident) < len(plan.resident) and plan.streamed_sources > 0
    assert capped.memory.total < sum(per_device)
    assert capped.memory.resident == capped.placement.resident()
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(full.tensors(), capped.tensors()))


def _experiment(fam: dict[str, Path], workers: dict, space: str = "ps_ties_dare") -> dict:
    helpers = Path(__file__).resolve().parent / "search_helpers.py"
    models = ({"base": str(fam["base"]), "sources": {"m1": str(fam["model_1"]), "m2": str(fam["model_2"])}}
              if space.startswith("ps") else {"a": str(fam["model_1"]), "b": str(fam["model_2"])})
    return {"models": models, "search_space": space,
            "evaluators": [{"name": "e", "spec": {"type": "custom", "function": f"{helpers}:logit_std"}}],
            "objectives": [{"metric": "e/std", "direction": "maximize"}],
            "optimizer": {"name": "random"}, "budget": {"trials": 2}, "workers": {"count": 1, **workers},
            "seed": 1}


@pytest.mark.parametrize("workers,space,message", [
    ({"devices_per_worker": 0}, "ps_ties_dare", "workers.devices_per_worker must be a positive integer, got 0"),
    ({"devices_per_worker": True}, "ps_ties_dare", "must be a positive integer, got True"),
    ({"devices_per_worker": "2"}, "ps_ties_dare", "must be a positive integer, got '2'"),
    ({"devices_per_worker": 1.5}, "ps_ties_dare", "must be a positive integer, got 1.5"),
    ({"devices_per_worker": 2, "device": "cuda:1"}, "ps_ties_dare", "workers.device cuda:1 names one GPU"),
    ({"devices_per_worker": 4, "gpus_per_worker": 2}, "ps_ties_dare", "gpus_per_worker 2 is fewer than"),
    ({"devices_per_worker": 2}, "dfs", "only a ps search places a candidate across devices"),
])
def test_bad_devices_per_worker_exits_2_with_one_line(families, tmp_path, capsys, workers, space, message):
    import yaml

    from evomerge.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_experiment(families["qwen2"], workers, space)))
    code = main(["run", str(exp), "--out", str(tmp_path / "out"), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_run_spans_two_devices_per_worker(families, ray_address, tmp_path, capsys):
    """`evomerge run` with workers.devices_per_worker 2 (CPU stand-ins): the plan is printed per device, Ray
    asks for no GPU on a CPU cluster, and every trial's candidate is evaluated across both devices."""
    import json

    import yaml

    from evomerge.cli import main

    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(_experiment(families["qwen2"], {"device": "cpu", "devices_per_worker": 2,
                                                                  "device_memory_gb": 4})))
    code = main(["run", str(exp), "--out", str(tmp_path / "run"), "--address", ray_address, "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    lines = printed.err.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("memory per worker"))
    assert lines[first].endswith("over 2 devices")
    assert lines[first + 1].startswith("  device 0 (cpu): layers 0-") and "budget 4.00 GB" in lines[first + 1]
    assert lines[first + 2].startswith("  device 1 (cpu): layers ")
    trials = [json.loads(line) for line in (tmp_path / "run" / "trials.jsonl").read_text().splitlines()]
    assert len(trials) == 2 and all(t["status"] == "ok" and t["metrics"]["e/std"] > 0 for t in trials)
