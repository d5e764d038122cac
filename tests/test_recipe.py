"""Recipes: parsing, strict validation, parameter resolution (equal to mergekit's), round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe, resolve_setting

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

TIES = """
merge_method: ties
base_model: models/base
models:
  - model: models/model_1
    parameters:
      weight: [0.2, 0.9]
      density: 0.5
  - model: models/model_2
    parameters:
      weight:
        - filter: mlp
          value: 0.7
        - value: 0.4
parameters:
  normalize: true
  density: 0.6
dtype: bfloat16
out_dtype: float32
tokenizer_source: base
"""


def test_parse_fields_and_paths(tmp_path):
    path = tmp_path / "sub" / "r.yaml"
    path.parent.mkdir()
    path.write_text(TIES)
    recipe = Recipe.load(path)
    assert recipe.merge_method == "ties"
    assert recipe.base_model == "models/base"
    assert [m.model for m in recipe.models] == ["models/model_1", "models/model_2"]
    assert recipe.models[0].parameters == {"weight": [0.2, 0.9], "density": 0.5}
    assert recipe.parameters == {"normalize": True, "density": 0.6}
    assert (recipe.dtype, recipe.out_dtype, recipe.tokenizer_source) == ("bfloat16", "float32", "base")
    # relative paths resolve against the recipe's folder, not the working directory
    assert recipe.resolve_path("models/base") == (tmp_path / "sub" / "models" / "base").resolve()
    assert recipe.tokenizer_path() == (tmp_path / "sub" / "models" / "base").resolve()
    assert recipe.model_paths()[-1] == (tmp_path / "sub" / "models" / "base").resolve()


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.stem)
def test_round_trip(example):
    recipe = Recipe.load(example)
    again = Recipe.from_yaml(recipe.to_yaml(), root=example.parent)
    assert again.to_dict() == recipe.to_dict()
    assert yaml.safe_load(recipe.to_yaml()) == recipe.to_dict()
    # what we write keeps the values the user wrote
    original = yaml.safe_load(example.read_text())
    assert recipe.to_dict() == original


def test_round_trip_with_slices_and_filters():
    text = """
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
        parameters:
          scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]
  - sources:
      - model: b
        layer_range: [1, 3]
"""
    recipe = Recipe.from_yaml(text)
    assert recipe.slices[0].sources[0].layer_range == (0, 2)
    assert Recipe.from_yaml(recipe.to_yaml()).to_dict() == recipe.to_dict() == yaml.safe_load(text)
    assert "[0, 2]" in recipe.to_yaml()  # number lists are written inline, like mergekit


def _bad(text: str, match: str):
    with pytest.raises(EvomergeError, match=match):
        Recipe.from_yaml(text)


def test_unknown_top_level_key():
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nfoo: 1\n", "unknown key 'foo'")


def test_unsupported_mergekit_keys():
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\nmodules: {}\n", "not supported")


def test_model_without_a_path():
    _bad("merge_method: linear\nmodels: [{model: null}]\n", r"models\[0\]\.model must be a path string")
    _bad("merge_method: passthrough\nslices: [{sources: [{model: null, layer_range: [0, 1]}]}]\n",
         r"slices\[0\]\.sources\[0\]\.model must be a path string")


def test_unknown_method():
    _bad("merge_method: frobnicate\nbase_model: b\nmodels: [{model: a}]\n", "unknown merge method 'frobnicate'")


def test_unknown_parameter_name():
    _bad("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, densty: 0.5}}]\n",
         "does not take parameter 'densty'")


def test_parameter_the_method_does_not_take():
    # mergekit silently ignores `density` for linear and `t` for ties; we do not
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1, density: 0.5}}]\n",
         "linear does not take parameter 'density'")
    _bad("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\nparameters: {t: 0.5}\n",
         "does not take parameter 't'")
    _bad("merge_method: task_arithmetic\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, gamma: 0.1}}]\n",
         "does not take parameter 'gamma'")


def test_global_parameter_given_per_model():
    _bad("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1, normalize: false}}]\n",
         "global parameter")


def test_parameters_on_the_base_model_are_rejected():
    _bad("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}, "
         "{model: b, parameters: {weight: 1}}]\n", "ignores parameters on the base model")


@pytest.mark.parametrize("density", [-0.1, 1.5, "[0.5, 1.2]", "[{filter: mlp, value: -0.5}, {value: 0.5}]"])
def test_density_outside_unit_interval(density):
    _bad(f"merge_method: ties\nbase_model: b\nmodels: [{{model: a, parameters: {{weight: 1, density: {density}}}}}]\n",
         r"density must be in \[0, 1\]")


def test_method_needing_base_without_one():
    _bad("merge_method: ties\nmodels: [{model: a, parameters: {weight: 1}}]\n", "needs a base_model")
    _bad("merge_method: slerp\nmodels: [{model: a}, {model: b}]\nparameters: {t: 0.5}\n", "needs a base_model")


def test_input_counts():
    _bad("merge_method: slerp\nbase_model: b\nmodels: [{model: a}, {model: c}]\nparameters: {t: 0.5}\n",
         "exactly 2 models")
    _bad("merge_method: model_stock\nbase_model: b\nmodels: [{model: a}]\n", "at least 3 models")
    _bad("merge_method: passthrough\nmodels: [{model: a}, {model: c}]\n", "exactly 1 models")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}, {model: a, parameters: {weight: 1}}]\n",
         "same model twice")


def test_linear_base_model_must_be_listed():
    _bad("merge_method: linear\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n",
         "does not use a base_model")
    Recipe.from_yaml("merge_method: linear\nbase_model: a\nmodels: [{model: a, parameters: {weight: 1}}]\n")


def test_structure_errors():
    _bad("merge_method: linear\n", "exactly one of 'models' or 'slices'")
    _bad("models: [{model: a}]\n", "missing 'merge_method'")
    _bad("- 1\n- 2\n", "must be a mapping")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}, extra: 2}]\n", "unknown key 'extra'")
    _bad("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [2, 1]}]}]\n", "layer_range")
    _bad("merge_method: passthrough\nslices: [{sources: [{model: a, layer_range: [0, 2]}], residual_weight: 1}]\n",
         "not supported")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ndtype: float8\n", "dtype")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: [{filter: x}]}}]\n", "needs 'value'")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: yes}}]\n", "must be a number")
    _bad("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n"
         "parameters: {normalize: 1}\n", "true or false")
    _bad("merge_method: dare_ties\nbase_model: b\nmodels: [{model: a, parameters: {weight: 1}}]\n"
         "parameters: {rescale_mode: l2}\n", "inverse_density")
    _bad("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\ncalibration: {path: x}\n",
         "only for data-aware")
    _bad("merge_method: [", "not valid YAML")


def test_gradients_and_filters_equal_mergekit():
    from mergekit.config import ConditionalParameter, evaluate_setting

    settings = [0.5, [0.0, 1.0], [0.1, 0.9, 0.3], [0.2, 0.4, 0.8, 0.1, 0.5], [1, 2]]
    for setting in settings:
        for step in range(11):
            t = step / 10
            assert resolve_setting(setting, "x", t) == pytest.approx(
                evaluate_setting("x", setting, t, validate=float), abs=0, rel=0)
    filt = [{"filter": "mlp", "value": [0.1, 0.7]}, {"filter": "*", "value": 0.3}]
    theirs = [ConditionalParameter(filter="mlp", value=[0.1, 0.7]), ConditionalParameter(filter="*", value=0.3)]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"):
        for t in (0.0, 0.4, 1.0):
            assert resolve_setting(filt, name, t) == evaluate_setting(name, theirs, t, validate=float)
    # no filter matches: None, so the next scope (slice, global, default) decides
    assert resolve_setting([{"filter": "mlp", "value": 1.0}], "model.norm.weight", 0.0) is None
    assert resolve_setting({"filter": "norm", "value": 2.0}, "model.norm.weight", 0.0) == 2.0
    # booleans pick, they do not interpolate
    assert resolve_setting([False, True], "x", 0.4, bool) is False
    assert resolve_setting([False, True], "x", 1.0, bool) is True


def test_data_aware_recipe_validates():
    pytest.importorskip("evomerge.alignment.recipe_methods")
    recipe = Recipe.from_yaml("merge_method: regmean\nmodels: [{model: a}, {model: b, parameters: {weight: 2}}]\n"
                              "parameters: {alpha: 0.5}\ncalibration: {path: c.jsonl, samples: 8}\n")
    assert recipe.is_data_aware
    assert recipe.to_dict()["calibration"] == {"path": "c.jsonl", "samples": 8}
    _bad("merge_method: regmean\nmodels: [{model: a}]\ncalibration: {pth: c.jsonl}\n", "unknown key 'pth'")
    _bad("merge_method: fisher\nmodels: [{model: a, parameters: {density: 0.5}}]\n", "unknown parameter 'density'")
    _bad("merge_method: fisher\nmodels: [{model: a}]\nparameters: {alpha: 0.5}\n", "unknown parameter 'alpha'")


def test_from_dict_programmatic_recipe(tmp_path):
    data = {"merge_method": "dare_ties", "base_model": str(tmp_path / "b"),
            "models": [{"model": str(tmp_path / "a"),
                        "parameters": {"weight": [{"filter": "layers.0.", "value": 0.3}, {"value": 0.5}],
                                       "density": 0.4}}]}
    recipe = Recipe.from_dict(data)
    assert recipe.resolve_path(recipe.base_model) == (tmp_path / "b").resolve()
    assert recipe.to_dict() == data


def test_methods_doc_lists_every_method_parameter_and_example():
    from evomerge.methods import METHODS

    doc = (Path(__file__).resolve().parents[1] / "docs" / "METHODS.md").read_text()
    for name, spec in METHODS.items():
        assert f"### {name}" in doc or f"and {name}" in doc, name
        assert (EXAMPLES / f"{name}.yaml").is_file(), name
        assert f"examples/{name}.yaml" in doc, name
        for param in spec.params:
            assert f"| {param.name} |" in doc, (name, param.name)
