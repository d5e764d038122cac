"""`evomerge eval` end to end on a saved, really trained tiny model: table, --json, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from evomerge.cli import main
from evomerge.evaluators import build_evaluator
from test_evaluators_fixtures import arith_model, load_arith_model, math_config, problems, write_tsv

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one thread is fastest here


@pytest.fixture(scope="module")
def eval_yaml(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli_eval")
    data = write_tsv(folder / "arith.tsv", problems(24, seed=11))
    config = math_config("arith.tsv")  # relative to the YAML
    path = folder / "arith.yaml"
    path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return path, data


def test_eval_json_matches_the_evaluator(eval_yaml, capsys):
    yaml_path, data = eval_yaml
    model_dir = arith_model()
    assert main(["eval", str(model_dir), "--evaluator", str(yaml_path), "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    metrics = json.loads(out[0])
    model, tok = load_arith_model()
    assert metrics == build_evaluator(math_config(data)).evaluate(model, tok)
    assert set(metrics) == {"acc", "answered"} and 0 < metrics["acc"] < 1


def test_eval_table_and_limit(eval_yaml, capsys):
    yaml_path, _ = eval_yaml
    model_dir = arith_model()
    assert main(["eval", str(model_dir), "--evaluator", str(yaml_path), "--limit", "5", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "arith" in out and "(5 items" in out
    lines = {line.split()[0]: line.split()[1] for line in out.splitlines()[3:] if line.strip()}
    assert set(lines) == {"acc", "answered"}
    assert 0.0 <= float(lines["acc"]) <= 1.0


@pytest.mark.parametrize("argv,message", [
    (["eval", "/nonexistent/model", "--evaluator", "gsm8k"], "model folder not found"),
    (["eval", "{model}", "--evaluator", "nonsense"], "unknown evaluator"),
    (["eval", "{model}", "--evaluator", "mgsm:xx"], "mgsm needs a language"),
    (["eval", "{model}", "--evaluator", "gsm8k", "--limit", "0"], "--limit must be >= 1"),
    (["eval", "{model}", "--evaluator", "gsm8k:nosuchsplit"], "unknown split"),
    (["eval", "{model}", "--evaluator", "gsm8k", "--device", "cuda:7"], "CUDA"),
])
def test_eval_bad_input_exits_2(argv, message, capsys):
    if not torch.cuda.is_available() or "cuda:7" not in argv:
        argv = [a.replace("{model}", str(arith_model())) for a in argv]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1


def test_eval_subprocess_exit_codes(eval_yaml, tmp_path):
    """The installed entry point: JSON on stdout and exit 0; a bad folder is one line and exit 2."""
    yaml_path, _ = eval_yaml
    ok = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(arith_model()), "--evaluator",
                         str(yaml_path), "--json", "--limit", "4"], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == {"acc", "answered"}
    (tmp_path / "empty").mkdir()
    bad = subprocess.run([sys.executable, "-m", "evomerge.cli", "eval", str(tmp_path / "empty"), "--evaluator",
                          str(yaml_path)], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and "no config.json" in bad.stderr
