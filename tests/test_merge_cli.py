"""`evomerge merge` end to end: every example recipe, reloadable outputs, and every bad input (exit 2, one line)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def workdir(llama_family, tmp_path_factory):
    """The examples copied next to `models/` (base, model_1, model_2), the layout their relative paths expect."""
    root = tmp_path_factory.mktemp("examples")
    (root / "models").symlink_to(Path(llama_family["base"]).parent, target_is_directory=True)
    for example in EXAMPLES.iterdir():  # recipes and the data files they name (e.g. calibration texts)
        if example.is_file():
            shutil.copy(example, root / example.name)
    return root


@pytest.fixture(scope="module")
def odd_models(tmp_path_factory):
    """Models that cannot be merged with the Llama family: other FFN width, other vocabulary size."""
    from evomerge import tiny

    root = tmp_path_factory.mktemp("odd")
    wide = tiny.make_family(root / "wide", n_variants=0, arch="llama", seed=0, intermediate_size=96)["base"]
    vocab = tiny.make_family(root / "vocab", n_variants=0, arch="llama", seed=0, vocab_size=300)["base"]
    return {"wide": wide, "vocab": vocab}


def _merge(capsys, *args: str) -> tuple[int, str]:
    code = main(["merge", *args, "--no-progress"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_every_example_merges_and_reloads(example, workdir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "out"
    code, err = _merge(capsys, str(workdir / f"{example}.yaml"), str(out))
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    recipe = yaml.safe_load((workdir / f"{example}.yaml").read_text())
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe
    card = (out / "README.md").read_text()
    assert recipe["merge_method"] in card
    config = json.loads((out / "config.json").read_text())
    expected_layers = 6 if example == "passthrough" else 4
    assert config["num_hidden_layers"] == expected_layers == model.config.num_hidden_layers
    ids = tokenizer("a merged model", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()


def test_cli_subprocess_shards_dtype_and_overwrite(workdir, tmp_path):
    out = tmp_path / "sharded"
    cmd = [sys.executable, "-m", "evomerge.cli", "merge", str(workdir / "ties.yaml"), str(out),
           "--shard-size", "100KB", "--seed", "3", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    # existing output folder: one-line error, exit 2, nothing touched
    before = sorted(p.name for p in out.iterdir())
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2
    assert again.stderr.strip().count("\n") == 0 and "already exists" in again.stderr
    assert "Traceback" not in again.stderr
    assert sorted(p.name for p in out.iterdir()) == before
    # --overwrite replaces it
    done = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_out_dtype_bfloat16(workdir, tmp_path, capsys):
    recipe = yaml.safe_load((workdir / "ties.yaml").read_text())
    recipe["out_dtype"] = "bfloat16"
    path = workdir / "ties_bf16.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, err = _merge(capsys, str(path), str(tmp_path / "bf16"))
    assert code == 0, err
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    from safetensors.torch import load_file

    assert all(t.dtype == torch.bfloat16 for t in load_file(tmp_path / "bf16" / "model.safetensors").values())


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing written


def _write(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _expect_error(capsys, tmp_path: Path, recipe: dict | Path, match: str, *extra: str) -> None:
    path = recipe if isinstance(recipe, Path) else _write(tmp_path, recipe)
    out = tmp_path / "out"
    code, err = _merge(capsys, str(path), str(out), *extra)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert match in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def _ties(fam, **params) -> dict:
    return {"merge_method": "ties", "base_model": str(fam["base"]),
            "models": [{"model": str(fam["model_1"]), "parameters": {"weight": 0.5, **params}},
                       {"model": str(fam["model_2"]), "parameters": {"weight": 0.5}}]}


def test_different_architectures(llama_family, qwen2_family, tmp_path, capsys):
    recipe = {"merge_method": "linear",
              "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 1}},
                         {"model": str(qwen2_family["model_1"]), "parameters": {"weight": 1}}]}
    _expect_error(capsys, tmp_path, recipe, "different architectures")


def test_different_tensor_shapes(llama_family, odd_models, tmp_path, capsys):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(llama_family["base"]),
              "models": [{"model": str(odd_models["wide"]), "parameters": {"weight": 1}}]}
    _expect_error(capsys, tmp_path, recipe, "tensor shapes differ")


def test_vocabulary_sizes_differ(llama_family, odd_models, tmp_path, capsys):
    recipe = {"merge_method": "linear", "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 1}},
                                                   {"model": str(odd_models["vocab"]), "parameters": {"weight": 1}}]}
    _expect_error(capsys, tmp_path, recipe, "vocabulary sizes differ")


def test_method_needs_base_model(llama_family, tmp_path, capsys):
    recipe = _ties(llama_family)
    del recipe["base_model"]
    _expect_error(capsys, tmp_path, recipe, "needs a base_model")


def test_unknown_method(llama_family, tmp_path, capsys):
    """Exit 2, one line, and the line lists every method `evomerge merge` runs, data-aware ones included."""
    from evomerge.method_registry import method_names

    recipe = _ties(llama_family)
    recipe["merge_method"] = "magic"
    _expect_error(capsys, tmp_path, recipe, "unknown merge method 'magic'")
    code, err = _merge(capsys, str(tmp_path / "recipe.yaml"), str(tmp_path / "out"))
    listed = err.strip().split("known methods: ", 1)[1].split(", ")
    assert code == 2 and listed == method_names()
    assert {"fisher", "regmean", "ties", "linear", "passthrough"} <= set(listed)


@pytest.mark.parametrize("density", [1.5, -1])
def test_density_outside_unit_interval(density, llama_family, tmp_path, capsys):
    _expect_error(capsys, tmp_path, _ties(llama_family, density=density), "density must be in [0, 1]")


def test_zero_weight_sum_with_normalize(llama_family, tmp_path, capsys):
    recipe = {"merge_method": "linear",
              "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 1}},
                         {"model": str(llama_family["model_2"]), "parameters": {"weight": -1}}]}
    _expect_error(capsys, tmp_path, recipe, "sum to zero")


def test_unknown_parameter(llama_family, tmp_path, capsys):
    _expect_error(capsys, tmp_path, _ties(llama_family, t=0.5), "does not take parameter 't'")


def test_missing_model_and_corrupted_safetensors(llama_family, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(llama_family["model_1"], broken)
    recipe = _ties(llama_family)
    recipe["models"][0]["model"] = str(broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    _expect_error(capsys, tmp_path, recipe, "safetensors")
    (broken / "model.safetensors").unlink()
    _expect_error(capsys, tmp_path, recipe, "no weights")
    recipe["models"][0]["model"] = str(tmp_path / "nowhere")
    _expect_error(capsys, tmp_path, recipe, "not found")


def test_bad_recipe_file_and_device(llama_family, tmp_path, capsys):
    _expect_error(capsys, tmp_path, tmp_path / "missing.yaml", "cannot read recipe")
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    _expect_error(capsys, tmp_path, bad, "not valid YAML")
    if not torch.cuda.is_available():
        _expect_error(capsys, tmp_path, _ties(llama_family), "no CUDA", "--device", "cuda")


def test_existing_output_folder(llama_family, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = _merge(capsys, str(_write(tmp_path, _ties(llama_family))), str(out))
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_qwen2_frankenmerge_changes_depth_and_reloads(qwen2_family, tmp_path, capsys):
    """Stacking to 6 layers also rewrites per-layer config lists (Qwen2's layer_types)."""
    from transformers import AutoModelForCausalLM

    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(qwen2_family["model_1"]), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(qwen2_family["model_2"]), "layer_range": [1, 4]}]}]}
    out = tmp_path / "stacked"
    code, err = _merge(capsys, str(_write(tmp_path, recipe)), str(out))
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(config["layer_types"]) == 6
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
