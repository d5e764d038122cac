"""LoRA references (``model: base+adapter``) against mergekit 0.1.5, with adapters made by peft on tiny models.

The adapter's factors are set to seeded random values (peft initialises lora_B to zero, which would make the
update vanish), saved with ``save_pretrained``, and the same recipe is merged by evomerge and by mergekit
(which applies the adapter with peft's ``merge_and_unload``).
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from evomerge.cli import main
from evomerge.lora import open_source
from evomerge.merge import run_merge
from evomerge.recipe import Recipe


def _make_adapter(base_dir: Path, out: Path, *, seed: int, targets: list[str], r: int = 4, alpha: float = 8,
                  rslora: bool = False, fan_in_fan_out: bool = False, safe: bool = True,
                  modules_to_save: list[str] | None = None, rank_pattern: dict | None = None) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                        fan_in_fan_out=fan_in_fan_out, modules_to_save=modules_to_save,
                        rank_pattern=rank_pattern or {}, init_lora_weights=True)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    peft_model.save_pretrained(out, safe_serialization=safe)
    return out


@pytest.fixture(scope="module")
def mergekit_api(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")
    cache = tmp_path_factory.mktemp("lora_cache")

    def run(recipe: dict, out: Path) -> None:
        config = mk_config.MergeConfiguration.model_validate(recipe)
        options = mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True,
                                          lora_merge_cache=str(cache))
        mk_merge.run_merge(config, str(out), options)

    return run


def _load(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b), set(a) ^ set(b)
    worst = 0.0
    for key in a:
        assert a[key].shape == b[key].shape and a[key].dtype == b[key].dtype, key
        worst = max(worst, (a[key].double() - b[key].double()).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def adapters(llama_family, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "attn": _make_adapter(llama_family["model_1"], root / "attn", seed=1, targets=["q_proj", "v_proj"]),
        "wide": _make_adapter(llama_family["model_2"], root / "wide", seed=2, r=8, alpha=4, rslora=True,
                              targets=["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj", "embed_tokens"],
                              rank_pattern={"down_proj": 2}, modules_to_save=["lm_head"]),
    }


RECIPES = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "model_1+attn", "parameters": {"weight": 0.6}},
        {"model": "model_2+wide", "parameters": {"weight": 0.4}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.6}, "models": [
        {"model": "model_1+attn", "parameters": {"weight": 0.7}},
        {"model": "model_2+wide", "parameters": {"weight": 0.5}}]},
    "lora_base": {"merge_method": "task_arithmetic", "base_model": "base+attn", "models": [
        {"model": "model_1", "parameters": {"weight": 0.8}},
        {"model": "model_2+wide", "parameters": {"weight": 0.3}}]},
}


def _resolve(recipe, fam, adapters):
    def path(ref: str) -> str:
        model, _, adapter = ref.partition("+")
        return str(fam[model]) + (f"+{adapters[adapter]}" if adapter else "")

    out = dict(recipe)
    if "base_model" in out:
        out["base_model"] = path(out["base_model"])
    out["models"] = [{**m, "model": path(m["model"])} for m in recipe["models"]]
    return out


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_lora_reference_matches_mergekit(name, llama_family, adapters, tmp_path, mergekit_api):
    recipe = _resolve(RECIPES[name], llama_family, adapters)
    run_merge(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    mergekit_api(recipe, tmp_path / "theirs")
    ours, theirs = _load(tmp_path / "ours"), _load(tmp_path / "theirs")
    worst = _max_diff(ours, theirs)
    print(f"max |ours - mergekit| {name}: {worst:.3g}")
    assert worst <= 1e-6
    # the adapter really changed the result: merging the plain models differs
    plain = {**recipe, "models": [{**m, "model": m["model"].split("+")[0]} for m in recipe["models"]]}
    plain["base_model"] = recipe.get("base_model", "").split("+")[0] or None
    if plain["base_model"] is None:
        del plain["base_model"]
    run_merge(Recipe.from_dict(plain), tmp_path / "plain", progress=False)
    assert _max_diff(ours, _load(tmp_path / "plain")) > 1e-3


def test_lora_source_equals_peft_merge_and_unload(llama_family, adapters, tmp_path):
    """The source tensors themselves (passthrough of one LoRA reference) equal peft's merged model bitwise."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ref = f"{llama_family['model_2']}+{adapters['wide']}"
    run_merge(Recipe.from_dict({"merge_method": "passthrough", "models": [{"model": ref}]}), tmp_path / "ours",
              progress=False)
    model = AutoModelForCausalLM.from_pretrained(llama_family["model_2"], dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapters["wide"]).merge_and_unload()
    expected = merged.state_dict()
    ours = _load(tmp_path / "ours")
    assert set(ours) == set(expected)
    for key, tensor in ours.items():
        assert torch.equal(tensor, expected[key]), key


def test_fan_in_fan_out_and_bf16_base(tmp_path):
    """GPT-2's Conv1D weights are [in, out] (fan_in_fan_out); a bfloat16 base keeps its dtype."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32))
    base.to(torch.bfloat16).save_pretrained(tmp_path / "gpt2")
    adapter = _make_adapter(tmp_path / "gpt2", tmp_path / "ad", seed=3, targets=["c_attn", "c_fc"],
                            fan_in_fan_out=True)
    source = open_source(Path(f"{tmp_path / 'gpt2'}+{adapter}"))  # the planner has no GPT-2 layer naming yet
    ours = {name: source.get(name) for name in source.tensor_names}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2", dtype=torch.bfloat16)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    changed = 0
    for key, tensor in ours.items():
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[key]), key
        changed += not torch.equal(tensor, base.state_dict()[key].to(torch.bfloat16)) if key in base.state_dict() else 0
    assert changed >= 4


def _cli(capsys, *args: str) -> SimpleNamespace:
    """`evomerge ARGS` in-process: exit code and stderr."""
    capsys.readouterr()
    code = main(list(args))
    return SimpleNamespace(returncode=code, stderr=capsys.readouterr().err)


def test_pickle_adapter_needs_allow_pickle(llama_family, tmp_path, capsys):
    adapter = _make_adapter(llama_family["model_1"], tmp_path / "bin_adapter", seed=4, targets=["q_proj"],
                            safe=False)
    assert (adapter / "adapter_model.bin").is_file()
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: {llama_family['model_1']}+{adapter}\n")
    refused = _cli(capsys, "merge", str(recipe), str(tmp_path / "out"), "--no-progress")
    assert refused.returncode == 2
    assert "--allow-pickle" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    ok = _cli(capsys, "merge", str(recipe), str(tmp_path / "out"), "--no-progress", "--allow-pickle")
    assert ok.returncode == 0, ok.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llama_family["model_1"], dtype=torch.float32)
    expected = PeftModel.from_pretrained(model, adapter).merge_and_unload().state_dict()
    ours = _load(tmp_path / "out")
    assert all(torch.equal(ours[k], expected[k]) for k in ours)


@pytest.mark.parametrize("case", ["three_parts", "missing_adapter", "no_config", "dora", "wrong_model"])
def test_bad_lora_references(case, llama_family, adapters, tmp_path, capsys):
    import json
    import shutil

    ref = {"three_parts": f"{llama_family['model_1']}+{adapters['attn']}+x",
           "missing_adapter": f"{llama_family['model_1']}+{tmp_path / 'nope'}",
           "no_config": f"{llama_family['model_1']}+{tmp_path}",
           "dora": None, "wrong_model": None}[case]
    if case == "dora":
        shutil.copytree(adapters["attn"], tmp_path / "dora")
        config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
        (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
        ref = f"{llama_family['model_1']}+{tmp_path / 'dora'}"
    if case == "wrong_model":  # the adapter's down_proj update is [64, 128]; this model's down_proj is [64, 96]
        from evomerge import tiny

        other = tiny.make_family(tmp_path / "other", n_variants=0, intermediate_size=96)["base"]
        ref = f"{other}+{adapters['wide']}"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: passthrough\nmodels:\n  - model: '{ref}'\n")
    result = _cli(capsys, "merge", str(recipe), str(tmp_path / "out"), "--no-progress")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / "out").exists()
    assert {"three_parts": "one '+'", "missing_adapter": "not found", "no_config": "adapter_config.json",
            "dora": "DoRA", "wrong_model": "does not"}[case] in result.stderr


def test_lora_on_sharded_qwen2_matches_mergekit(qwen2_family, tmp_path, mergekit_api):
    """Another architecture, a sharded base checkpoint, an adapter on every projection."""
    adapter = _make_adapter(qwen2_family["model_1"], tmp_path / "qa", seed=6, r=2, alpha=3,
                            targets=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
    recipe = {"merge_method": "dare_linear", "base_model": str(qwen2_family["base"]),
              "parameters": {"rescale": False, "density": 1.0}, "models": [
                  {"model": f"{qwen2_family['model_1']}+{adapter}", "parameters": {"weight": 0.7}},
                  {"model": str(qwen2_family["model_2"]), "parameters": {"weight": 0.4}}]}
    run_merge(Recipe.from_dict(recipe), tmp_path / "ours", progress=False)
    mergekit_api(recipe, tmp_path / "theirs")
    worst = _max_diff(_load(tmp_path / "ours"), _load(tmp_path / "theirs"))
    print(f"max |ours - mergekit| qwen2 dare_linear: {worst:.3g}")
    assert worst <= 1e-6
