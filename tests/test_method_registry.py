"""The merge-method registry: every method by name, unknown names listed in full, broken method modules loud."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evomerge.alignment.method_params import DATA_AWARE_METHODS
from evomerge.engine import MergeEngine
from evomerge.errors import EvomergeError
from evomerge.method_registry import get_method, is_data_aware, method_names
from evomerge.methods import METHODS
from evomerge.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]


def test_registry_holds_both_kinds_of_method():
    names = method_names()
    assert names == sorted(set(METHODS) | set(DATA_AWARE_METHODS))
    assert {"fisher", "regmean"} <= set(names) and {"ties", "linear", "slerp", "model_stock"} <= set(names)
    assert is_data_aware("fisher") and is_data_aware("regmean") and not is_data_aware("ties")
    assert get_method("ties") is METHODS["ties"]


def _listed(message: str) -> list[str]:
    assert "\n" not in message
    return message.split("known methods: ", 1)[1].split(", ")


def test_recipe_validation_lists_every_method():
    with pytest.raises(EvomergeError) as info:
        Recipe.from_yaml("merge_method: frobnicate\nbase_model: b\nmodels: [{model: a}]\n")
    assert info.value.exit_code == 2
    assert str(info.value).startswith("unknown merge method 'frobnicate'; ")
    assert _listed(str(info.value)) == method_names()


def test_engine_names_every_method_and_refuses_data_aware_ones(llama_family):
    with pytest.raises(EvomergeError) as info:
        MergeEngine.from_models(llama_family["base"], [llama_family["model_1"]], method="frobnicate")
    assert _listed(str(info.value)) == method_names()
    with pytest.raises(EvomergeError, match="'fisher' is data-aware"):
        get_method("fisher")


@pytest.fixture(scope="module")
def broken_copy(tmp_path_factory):
    """A copy of the evomerge package whose regmean module does not import (a real broken file)."""
    root = tmp_path_factory.mktemp("broken")
    shutil.copytree(REPO / "evomerge", root / "evomerge", ignore=shutil.ignore_patterns("__pycache__"))
    regmean = root / "evomerge" / "alignment" / "regmean.py"
    regmean.write_text(regmean.read_text() + "\nfrom evomerge.alignment.calibration import no_such_name\n")
    return root


@pytest.mark.parametrize("method", ["regmean", "ties"])
def test_a_broken_method_module_fails_loudly(broken_copy, llama_family, tmp_path, method):
    """A method module that fails to import stops `evomerge merge` with its ImportError (not exit 2, not
    "unknown merge method"), for the data-aware method it defines and for every other method alike."""
    recipe = {"merge_method": method, "base_model": str(llama_family["base"]),
              "models": [{"model": str(llama_family["model_1"]), "parameters": {"weight": 1.0}},
                         {"model": str(llama_family["model_2"]), "parameters": {"weight": 1.0}}]}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code = ("import sys, evomerge; assert evomerge.__file__.startswith(sys.argv[1]), evomerge.__file__; "
            "from evomerge.cli import main; sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": str(broken_copy)}
    done = subprocess.run([sys.executable, "-c", code, str(broken_copy), "merge", str(path), str(tmp_path / "out"),
                           "--no-progress"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "ImportError: cannot import name 'no_such_name'" in done.stderr
    assert "evomerge/alignment/regmean.py" in done.stderr
    assert "unknown merge method" not in done.stderr
    assert not (tmp_path / "out").exists()
