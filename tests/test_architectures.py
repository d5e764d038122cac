"""Every architecture users bring, end to end: Llama, Mistral, Qwen2, Qwen3, Gemma2, Gemma3 (text-only), Phi-3,
Phi-2 style, GPT-NeoX, GPT-2 and Falcon, as tiny random checkpoints (real safetensors, local tokenizer; tied
heads for Qwen2, the Gemmas and GPT-2).

Per architecture: the block naming of evomerge.architecture against the real checkpoint; `evomerge merge` (ties
and a passthrough frankenmerge) loading in transformers with no missing or unexpected keys; the engine equal to
the merge; the frankenmerge's embeddings from the first slice and its final norm and head from the last, as
mergekit 0.1.5 (compared with mergekit itself where it runs); a data-flow path that repeats layers giving the
same logits with and without the key/value cache; and one `evomerge run` (PS with layer groups, then DFS) on a
real local Ray, whose PS and DFS exports re-score exactly as their trials did. Architectures or settings that
cannot be searched are refused up front with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import search_helpers as helpers
from evomerge import architecture, tiny
from evomerge.checkpoint import checkpoint_architecture
from evomerge.cli import main
from evomerge.engine import MergeEngine

TIED = {"qwen2", "gemma2", "gemma3", "gpt2"}
ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "phi", "gpt_neox", "gpt2", "falcon"]
# mergekit 0.1.5 rejects configs with layer_types whose length changed (Qwen2/3, Gemma2/3 frankenmerges) and
# stock GPT-NeoX checkpoints (it requires buffers transformers no longer writes: see the GPT-NeoX test below)
MERGEKIT_RUNS = ["llama", "mistral", "phi3", "phi", "gpt2", "falcon"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny.make_tokenizer()


@pytest.fixture(scope="module", params=ARCHS)
def family(request, tmp_path_factory, tokenizer):
    """(arch, {base, model_1, model_2}) of one architecture."""
    arch = request.param
    fam = tiny.make_family(tmp_path_factory.mktemp(arch), n_variants=2, arch=arch, seed=3, tokenizer=tokenizer,
                           tie_word_embeddings=arch in TIED)
    return arch, fam


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _load_clean(folder: Path):
    """The checkpoint as a transformers model; asserts that nothing was missing or unexpected."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def _merge(tmp_path: Path, recipe: dict, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    assert main(["merge", str(path), str(tmp_path / name), "--no-progress"]) == 0
    return tmp_path / name


def _frankenmerge(fam: dict) -> dict:
    return {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": str(fam["model_1"]), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(fam["model_2"]), "layer_range": [1, 4]}]}]}


def _owner(arch: architecture.Architecture, name: str) -> str:
    """Which part of the model a non-block tensor belongs to."""
    if arch.is_embedding(name):
        return "embeddings"
    if name.startswith(arch.final_norm + "."):
        return "final_norm"
    assert name.startswith(arch.head + "."), name
    return "head"


def test_block_naming_covers_every_tensor(family):
    arch_name, fam = family
    arch = checkpoint_architecture(fam["base"])
    assert arch.known and arch.blocks is not None
    names = list(_tensors(fam["base"]))
    blocks = {arch.split_block(n)[0] for n in names if arch.split_block(n)}
    assert blocks == set(range(4))
    owners = {_owner(arch, n) for n in names if arch.split_block(n) is None}
    assert owners == ({"embeddings", "final_norm"} if arch_name in TIED else {"embeddings", "final_norm", "head"})
    filters = [arch.block_filter(j) for j in range(4)]
    for j, f in enumerate(filters):  # a block filter selects exactly its block's tensors
        assert {n for n in names if f in n} == {n for n in names if (arch.split_block(n) or (None,))[0] == j}


def test_merge_engine_and_frankenmerge(family, tmp_path):
    arch_name, fam = family
    arch = checkpoint_architecture(fam["base"])
    ties = {"merge_method": "ties", "base_model": str(fam["base"]), "dtype": "float32",
            "models": [{"model": str(fam["model_1"]), "parameters": {"density": 0.6, "weight": 0.7}},
                       {"model": str(fam["model_2"]), "parameters": {"density": [0.3, 0.9], "weight": 0.5}}]}
    merged = _merge(tmp_path, ties, "ties")
    model = _load_clean(merged)
    # the in-memory engine writes the same tensors and runs as the reloaded checkpoint
    engine = MergeEngine(ties)
    written = _tensors(merged)
    ours = dict(engine.tensors())
    assert ours.keys() == written.keys()
    assert all(torch.equal(ours[k], written[k]) for k in written)
    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(engine.materialize().eval()(ids).logits, model(ids).logits)

    # frankenmerge: model_1's blocks 0-1 then model_2's blocks 1-3
    out = _merge(tmp_path, _frankenmerge(fam), "stack")
    stacked = _load_clean(out)
    assert stacked.config.num_hidden_layers == 5
    got, m1, m2 = _tensors(out), _tensors(fam["model_1"]), _tensors(fam["model_2"])
    for name, t in got.items():
        block = arch.split_block(name)
        if block is None:  # embeddings from the first slice; final norm and head from the last (mergekit)
            expected = m1 if _owner(arch, name) == "embeddings" else m2
        else:
            index, rest = block
            expected = {0: m1, 1: m1}.get(index, m2)
            name = arch.block_tensor(index if index < 2 else index - 1, rest)
        assert torch.equal(t, expected[name]), name


@pytest.mark.parametrize("arch_name", MERGEKIT_RUNS)
def test_frankenmerge_equals_mergekit(arch_name, tmp_path, tokenizer):
    import mergekit.config as mk_config
    import mergekit.merge as mk_merge
    import mergekit.options as mk_options

    fam = tiny.make_family(tmp_path / "fam", n_variants=2, arch=arch_name, seed=4, tokenizer=tokenizer,
                           tie_word_embeddings=arch_name in TIED)
    recipe = _frankenmerge(fam)
    ours = _merge(tmp_path, recipe, "ours")
    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
                       mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    a, b = _tensors(ours), _tensors(tmp_path / "mk")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    key = checkpoint_architecture(fam["base"]).num_layers_key  # n_layer for GPT-2
    ours_cfg, their_cfg = (json.loads((folder / "config.json").read_text()) for folder in (ours, tmp_path / "mk"))
    assert ours_cfg[key] == their_cfg[key] == 5


def test_gpt_neox_frankenmerge_head_is_the_last_slices_as_in_mergekit(tmp_path, tokenizer):
    """mergekit 0.1.5 cannot read stock GPT-NeoX checkpoints written by transformers 5 (it requires the
    attention.bias / masked_bias / rotary inv_freq buffers); given copies that carry those buffers it runs, and
    its output equals ours on every tensor both write: embed_in from the first slice, embed_out from the last."""
    import mergekit.config as mk_config
    import mergekit.merge as mk_merge
    import mergekit.options as mk_options

    fam = tiny.make_family(tmp_path / "fam", n_variants=2, arch="gpt_neox", seed=5, tokenizer=tokenizer)
    ours = _merge(tmp_path, _frankenmerge(fam), "ours")
    padded = {}
    buffers = ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq")
    for key in ("model_1", "model_2"):
        tensors = _tensors(fam[key])
        for i in range(4):
            for buffer in buffers:
                tensors[f"gpt_neox.layers.{i}.{buffer}"] = torch.zeros(2)
        padded[key] = tmp_path / f"padded_{key}"
        shutil.copytree(fam[key], padded[key])
        save_file(tensors, padded[key] / "model.safetensors", metadata={"format": "pt"})
    recipe = _frankenmerge(padded)
    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_merge.run_merge(mk_config.MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
                       mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True))
    a, b = _tensors(ours), _tensors(tmp_path / "mk")
    assert set(b) - set(a) == {f"gpt_neox.layers.{i}.{buffer}" for i in range(5) for buffer in buffers}
    assert set(a) <= set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(a["embed_out.weight"], _tensors(fam["model_2"])["embed_out.weight"])
    assert torch.equal(a["gpt_neox.embed_in.weight"], _tensors(fam["model_1"])["gpt_neox.embed_in.weight"])


@pytest.mark.parametrize("arch_name", ARCHS)
def test_dataflow_path_with_cache_equals_without(arch_name, one_torch_thread):
    """A path that repeats a layer and uses layer i of both models: a forward pass with the cache, token-by-token
    decoding and greedy generation all equal the cache-free forward pass (each position owns its cache slot)."""
    from evomerge.search.dataflow import DataflowCandidate

    a = tiny.make_model(arch_name, seed=1, tie_word_embeddings=arch_name in TIED)
    b = tiny.make_model(arch_name, seed=2, tie_word_embeddings=arch_name in TIED)
    model = DataflowCandidate(a, b).set_path([0, 1, 1, 5, 2, 6, 6, 3], [1.0, 0.9, 1.1, 1.0, 0.8, 1.0, 1.2, 1.0])
    ids = torch.randint(4, 300, (2, 14), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        plain = model(ids, use_cache=False).logits
        assert torch.equal(model(ids, use_cache=True).logits, plain)
        out = model(ids[:, :8], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(8, 14):
            out = model(ids[:, t:t + 1], cache=cache, use_cache=True)
            steps.append(out.logits)
            cache = out.cache
        torch.testing.assert_close(torch.cat(steps, 1), plain, rtol=0, atol=1e-5)
        cached = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids[:, :6], max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def _experiment(fam: dict, tmp_path: Path) -> Path:
    exp = {
        "models": {"base": str(fam["base"]), "sources": {"m1": str(fam["model_1"]), "m2": str(fam["model_2"])},
                   "b": str(fam["model_2"])},
        "search_space": {"kind": "ps_dfs", "ps_share": 0.5,
                         "ps": {"kind": "ps", "merge_method": "ties", "group_size": 2},
                         "dfs": {"kind": "dfs", "repeats": 2, "scaling": "matrix"}},
        "evaluators": [{"name": "e", "spec": helpers.evaluator("logit_std")}],
        "objectives": [{"metric": "e/std", "direction": "maximize"}],
        "optimizer": {"name": "random"},
        "budget": {"trials": 6},
        "workers": {"count": 1},
        "seed": 2,
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def test_search_ps_then_dfs_exports_rescore_to_the_trial(family, ray_address, tmp_path, one_torch_thread):
    from evomerge.search.dataflow import load_dataflow_model
    from evomerge.search.records import TrialStatus
    from evomerge.search.run_folder import RunFolder

    arch_name, fam = family
    arch = checkpoint_architecture(fam["base"])
    run = tmp_path / "run"
    assert main(["run", str(_experiment(fam, tmp_path)), "--out", str(run), "--address", ray_address,
                 "--no-progress"]) == 0
    trials = RunFolder.open(run).trials()
    assert [t.stage_name for t in trials] == ["ps"] * 3 + ["dfs"] * 3
    assert all(t.status is TrialStatus.OK for t in trials), [t.error for t in trials]
    # PS: the layer groups use this architecture's block names; the export re-scores as its trial did
    ps = max((t for t in trials if t.stage_name == "ps"), key=lambda t: t.score or 0.0)
    assert main(["export", str(run), "--out", str(tmp_path / "ps"), "--trial", str(ps.trial)]) == 0
    recipe = (tmp_path / "ps" / "recipe.yaml").read_text()
    assert all(arch.block_filter(j) in recipe for j in range(4))
    assert helpers.logit_std(_load_clean(tmp_path / "ps"), None)["std"] == ps.metrics["e/std"]
    # DFS: a standard checkpoint plus input scales; re-scored from disk it gets its trial's score exactly
    dfs = max((t for t in trials if t.stage_name == "dfs"), key=lambda t: t.score or 0.0)
    assert main(["export", str(run), "--out", str(tmp_path / "dfs")]) == 0
    info = json.loads((tmp_path / "dfs" / "evomerge_trial.json").read_text())
    assert info["trial"] == dfs.trial
    _load_clean(tmp_path / "dfs")
    model = load_dataflow_model(tmp_path / "dfs")
    assert model.config.num_hidden_layers == len(info["layers"])
    assert helpers.logit_std(model, None)["std"] == dfs.metrics["e/std"]


def _run_exit(tmp_path: Path, exp: dict, capsys) -> tuple[int, str]:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    capsys.readouterr()  # what building the models printed
    code = main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    return code, err


def _dfs_exp(a: Path, b: Path) -> dict:
    return {"models": {"a": str(a), "b": str(b)}, "search_space": "dfs",
            "evaluators": [{"name": "e", "spec": helpers.evaluator("logit_std")}],
            "objectives": [{"metric": "e/std"}], "budget": {"trials": 2}}


def test_unsearchable_models_are_refused_up_front(tmp_path, tokenizer, capsys):
    """One line naming the architecture and the reason, exit code 2, no run folder."""
    from evomerge.checkpoint import write_checkpoint

    # GPT-2 that scales attention by the block's own index: moving a block along a path changes its meaning
    scaled = tiny.make_family(tmp_path / "scaled", n_variants=2, arch="gpt2", seed=1, tokenizer=tokenizer,
                              scale_attn_by_inverse_layer_idx=True)
    code, err = _run_exit(tmp_path, _dfs_exp(scaled["model_1"], scaled["model_2"]), capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "GPT2LMHeadModel" in err and "scale_attn_by_inverse_layer_idx" in err
    assert not (tmp_path / "run").exists()
    # A and B of different architectures
    llama = tiny.make_family(tmp_path / "llama", n_variants=1, arch="llama", tokenizer=tokenizer)
    code, err = _run_exit(tmp_path, _dfs_exp(llama["model_1"], scaled["model_1"]), capsys)
    assert code == 2 and "LlamaForCausalLM" in err and "GPT2LMHeadModel" in err and len(err.splitlines()) == 1
    # an architecture outside the table whose tensors have no block list: PS layer groups and slices refused
    odd = tmp_path / "odd"
    config = {"architectures": ["ToyForCausalLM"], "model_type": "toy", "num_hidden_layers": 2}
    for name in ("base", "m1"):
        write_checkpoint(odd / name, {"w.weight": torch.randn(4, 4), "embed.weight": torch.randn(8, 4)}, config,
                         tokenizer_dir=llama["base"])
    exp = {"models": {"base": str(odd / "base"), "sources": [str(odd / "m1")]}, "search_space": "ps_ties_dare",
           "space": {"group_size": 1}, "evaluators": [{"name": "e", "spec": helpers.evaluator("logit_std")}],
           "objectives": [{"metric": "e/std"}], "budget": {"trials": 2}}
    code, err = _run_exit(tmp_path, exp, capsys)
    assert code == 2 and "ToyForCausalLM" in err and "PS layer groups" in err and len(err.splitlines()) == 1
    recipe = tmp_path / "slices.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(odd / "m1"), "layer_range": [0, 1]}]}]}))
    capsys.readouterr()
    assert main(["merge", str(recipe), str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ToyForCausalLM" in err and "slices" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_layout_transformers_converts_is_merged_on_disk_and_refused_by_the_engine(tmp_path, tokenizer, capsys):
    """Mixtral's experts are stacked by transformers on load: `evomerge merge` merges the checkpoint tensors
    (the output loads cleanly), while the in-memory engine, which writes model tensors in place, refuses with
    one line naming the architecture, and so does a PS search, before any run folder exists."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from evomerge.errors import EvomergeError

    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, num_local_experts=2, pad_token_id=0,
                           bos_token_id=1, eos_token_id=2)
    paths = {}
    for i, name in enumerate(("base", "model_1")):
        torch.manual_seed(i)
        AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
        paths[name] = tmp_path / name
    recipe = {"merge_method": "ties", "base_model": str(paths["base"]), "dtype": "float32",
              "models": [{"model": str(paths["model_1"]), "parameters": {"density": 0.5, "weight": 1.0}}]}
    _load_clean(_merge(tmp_path, recipe, "merged"))
    capsys.readouterr()
    with pytest.raises(EvomergeError, match="MixtralForCausalLM.*cannot write it in place"):
        MergeEngine(recipe)
    exp = {"models": {"base": str(paths["base"]), "sources": [str(paths["model_1"])]}, "search_space": "ps_ties_dare",
           "evaluators": [{"name": "e", "spec": helpers.evaluator("logit_std")}],
           "objectives": [{"metric": "e/std"}], "budget": {"trials": 2}}
    code, err = _run_exit(tmp_path, exp, capsys)
    assert code == 2 and "MixtralForCausalLM" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
