"""`evomerge align` end to end, and the fisher / regmean recipes through `evomerge merge` on tiny Llama folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from evomerge import tiny
from evomerge.checkpoint import Checkpoint
from evomerge.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SMALL = dict(vocab_size=None, hidden_size=32, num_layers=2, intermediate_size=48, num_heads=4, num_kv_heads=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


def _save(model, tok, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """Two independently initialised tiny Llamas (GQA), a Qwen2 and a wider Llama, plus calibration texts."""
    root = tmp_path_factory.mktemp("align")
    tok = tiny.make_tokenizer()
    cfg = {**SMALL, "vocab_size": len(tok)}
    paths = {
        "a": _save(tiny.make_model("llama", seed=1, **cfg), tok, root / "a"),
        "b": _save(tiny.make_model("llama", seed=2, **cfg), tok, root / "b"),
        "qwen": _save(tiny.make_model("qwen2", seed=3, **cfg), tok, root / "qwen"),
        "wide": _save(tiny.make_model("llama", seed=4, **{**cfg, "intermediate_size": 64}), tok, root / "wide"),
    }
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps({"text": f"calibration text {i}: the cat sat on mat {i * 7}"}) + "\n"
                             for i in range(12)))
    paths["calib"] = calib
    return paths


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    with torch.no_grad():
        return model(ids).logits


def _distance(x: Path, y: Path) -> float:
    cx, cy = Checkpoint(x), Checkpoint(y)
    return sum(float((cx.get(n) - cy.get(n)).pow(2).sum()) for n in cx.tensor_names)


@pytest.mark.parametrize("method", ["weight", "activation"])
def test_align_writes_b_permuted_with_the_same_function(pair, tmp_path, method, capsys):
    out = tmp_path / f"b_{method}"
    extra = ["--calibration", str(pair["calib"])] if method == "activation" else []
    code = main(["align", str(pair["a"]), str(pair["b"]), str(out), "--method", method, *extra])
    assert code == 0, capsys.readouterr().err
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    ids = torch.randint(0, 200, (2, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(out, ids), _logits(pair["b"], ids), rtol=1e-4, atol=1e-5)
    assert Checkpoint(out).tensor_names == Checkpoint(pair["b"]).tensor_names
    # the permuted B is closer to A than B was (that is the point of aligning)
    assert _distance(out, pair["a"]) < _distance(pair["b"], pair["a"])
    assert "units moved" in capsys.readouterr().out


def test_align_errors_are_one_line_exit_2(pair, tmp_path, capsys):
    cases = [
        ([str(pair["a"]), str(pair["qwen"])], "architecture mismatch"),
        ([str(pair["a"]), str(pair["wide"])], "intermediate_size"),
        ([str(pair["a"]), str(tmp_path / "missing")], "not found"),
        ([str(pair["a"]), str(pair["b"]), "--method", "activation"], "--calibration"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code = main(["align", *args[:2], str(out), *args[2:]])
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        assert err.strip().count("\n") == 0 and message in err, err
        assert not out.exists()
    existing = tmp_path / "exists"
    existing.mkdir()
    assert main(["align", str(pair["a"]), str(pair["b"]), str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["align", str(pair["a"]), str(pair["b"]), str(existing), "--overwrite"]) == 0


@pytest.fixture(scope="module")
def workdir(llama_family, tmp_path_factory):
    """examples/fisher.yaml and regmean.yaml next to `models/` (base, model_1, model_2) and the calibration file."""
    root = tmp_path_factory.mktemp("examples")
    (root / "models").symlink_to(Path(llama_family["base"]).parent, target_is_directory=True)
    for name in ("fisher.yaml", "regmean.yaml", "calibration.jsonl"):
        shutil.copy(EXAMPLES / name, root / name)
    return root


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_example_recipes_merge_with_evomerge_merge(workdir, llama_family, tmp_path, method, capsys):
    out = tmp_path / method
    code = main(["merge", str(workdir / f"{method}.yaml"), str(out), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    recipe = yaml.safe_load((workdir / f"{method}.yaml").read_text())
    assert yaml.safe_load((out / "recipe.yaml").read_text()) == recipe
    merged = Checkpoint(out)
    m1, m2 = Checkpoint(llama_family["model_1"]), Checkpoint(llama_family["model_2"])
    assert merged.tensor_names == m1.tensor_names
    name = "model.layers.0.mlp.down_proj.weight"
    w, w1, w2 = merged.get(name), m1.get(name), m2.get(name)
    assert torch.isfinite(w).all()
    assert not torch.allclose(w, w1) and not torch.allclose(w, w2)
    # a data-aware merge of two fine-tunes lands near them (closer to each than they are to each other)
    assert float((w - w1).norm()) < float((w2 - w1).norm()) and float((w - w2).norm()) < float((w2 - w1).norm())
    ids = torch.randint(0, 200, (1, 9), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(_logits(out, ids)).all()


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_data_aware_merge_of_identical_models_returns_the_model(llama_family, tmp_path, method):
    from evomerge.alignment.recipe_methods import merge_data_aware

    twin = tmp_path / "twin"
    shutil.copytree(llama_family["model_1"], twin)
    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(f"line {i} of some calibration text" for i in range(6)))
    params = {"alpha": 1.0} if method == "regmean" else {"normalize": True}
    merged = merge_data_aware(method, None, [llama_family["model_1"], twin], [{"weight": 1.0}, {"weight": 3.0}],
                              params, {"path": str(calib), "samples": 4, "max_length": 16}, "cpu", 0)
    ref = Checkpoint(llama_family["model_1"])
    assert list(merged) == ref.tensor_names
    for n in ref.tensor_names:
        torch.testing.assert_close(merged[n], ref.get(n), rtol=1e-5, atol=1e-6)


def test_lm_fisher_is_zero_for_embedding_rows_of_unseen_tokens(llama_family):
    from evomerge.alignment.calibration import tokenized_batches
    from evomerge.alignment.causal_lm import load_causal_lm, load_tokenizer
    from evomerge.alignment.fisher import causal_lm_fisher

    model = load_causal_lm(llama_family["model_1"])
    batches = tokenized_batches(["abc abc", "cab"], load_tokenizer(llama_family["model_1"]), max_length=8)
    fisher = causal_lm_fisher(model, batches, mode="sampled", n_samples=2, progress=False)
    emb = fisher["model.embed_tokens.weight"]
    seen = torch.unique(torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]))
    unseen = torch.ones(emb.shape[0], dtype=torch.bool)
    unseen[seen] = False
    assert float(emb[unseen].abs().max()) == 0.0
    assert float(emb[seen].sum()) > 0
    assert all(torch.isfinite(v).all() and (v >= 0).all() for v in fisher.values())


def test_data_aware_recipe_errors_are_one_line(llama_family, tmp_path):
    from evomerge.alignment.recipe_methods import merge_data_aware
    from evomerge.errors import EvomergeError

    models = [llama_family["model_1"], llama_family["model_2"]]
    for kwargs, message in (
        (dict(params={"alpha": 2.0}, calibration={"path": "x"}), "alpha"),
        (dict(params={"bogus": 1}, calibration={"path": "x"}), "unknown regmean parameter 'bogus'"),
        (dict(params=None, calibration=None), "needs calibration data"),
        (dict(params=None, calibration={"path": str(tmp_path / "none.jsonl")}), "not found"),
    ):
        with pytest.raises(EvomergeError, match=message) as err:
            merge_data_aware("regmean", None, models, None, kwargs["params"], kwargs["calibration"], "cpu", 0)
        assert "\n" not in str(err.value)
