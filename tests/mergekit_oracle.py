"""mergekit 0.1.5 as the test oracle: run a recipe through mergekit's Python API, read a merged folder back, and
make a recipe's model aliases absolute (shared by the differential tests; conftest's ``mergekit_api`` fixture)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file


def mergekit_runner() -> Callable[[dict, Path], None]:
    """A function merging a recipe mapping into a folder with mergekit's own ``run_merge`` (no tokenizer, no
    model card); skips the test when mergekit does not import. Sets HF_HUB_OFFLINE (nothing is downloaded)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    mk_config = pytest.importorskip("mergekit.config")
    mk_merge = pytest.importorskip("mergekit.merge")
    mk_options = pytest.importorskip("mergekit.options")

    def run(recipe: dict | Any, out: Path) -> None:
        config = recipe if isinstance(recipe, mk_config.MergeConfiguration) else \
            mk_config.MergeConfiguration.model_validate(recipe)
        options = mk_options.MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True)
        mk_merge.run_merge(config, str(out), options)

    return run


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a merged folder's safetensors files, by name."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def absolute(recipe: dict, fam: dict[str, Path]) -> dict:
    """The recipe with the aliases base/model_1/model_2 (values of model, base_model, tokenizer_source) replaced by
    absolute paths (mergekit reads relative paths as hub ids)."""
    def fix(value):
        if isinstance(value, dict):
            return {k: (str(fam[v]) if k in ("model", "base_model", "tokenizer_source") and v in fam else fix(v))
                    for k, v in value.items()}
        if isinstance(value, list):
            return [fix(v) for v in value]
        return value

    return fix(recipe)
