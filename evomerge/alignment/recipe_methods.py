"""`merge_method: fisher` and `merge_method: regmean` for recipes and `evomerge merge` (Hugging Face causal LMs).

These methods need data, so they cannot run tensor by tensor like the task-arithmetic family: each source model
is loaded whole, run on the recipe's calibration texts to collect its statistics (a diagonal Fisher, or the
Gram matrix of every linear layer's inputs), and the merged state dict is computed from all of them.

Recipe shape (mergekit-style, plus a top-level ``calibration:`` block)::

    merge_method: regmean            # or fisher
    base_model: ./base               # optional: only its tokenizer is used (tokenizes the calibration texts)
    models:
      - model: ./math
        parameters: {weight: 1.0}    # per_model keys below; `calibration:` may give this model its own file
      - model: ./chat
    parameters: {alpha: 0.9}         # global keys below
    calibration: {path: calib.jsonl, field: text, samples: 64, max_length: 256, batch_size: 4}

The recipe module validates keys against ``DATA_AWARE_METHODS`` / ``CALIBRATION_DEFAULTS`` (in the light
``method_params`` module, so validating a recipe loads no model code) and ``evomerge merge`` calls
``merge_data_aware``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from evomerge.alignment.calibration import load_texts, tokenized_batches
from evomerge.alignment.causal_lm import check_same_architecture, load_causal_lm, load_tokenizer
from evomerge.alignment.fisher import causal_lm_fisher, fisher_merge
from evomerge.alignment.method_params import CALIBRATION_DEFAULTS, DATA_AWARE_METHODS
from evomerge.alignment.regmean import HEAD_MODES, linear_input_grams, regmean_merge
from evomerge.checkpoint import Checkpoint
from evomerge.errors import EvomergeError

__all__ = ["CALIBRATION_DEFAULTS", "DATA_AWARE_METHODS", "merge_data_aware"]

def _with_defaults(given: Mapping[str, Any] | None, defaults: Mapping[str, Any], what: str) -> dict[str, Any]:
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise EvomergeError(f"unknown {what} parameter {unknown[0]!r}; known: {', '.join(sorted(defaults))}")
    return {**defaults, **given}


def _check_params(method: str, params: dict[str, Any], per_model: list[dict[str, Any]],
                  calibration: dict[str, Any]) -> None:
    if method == "fisher":
        if params["fisher_mode"] not in ("sampled", "empirical"):
            raise EvomergeError(f"fisher_mode must be 'sampled' or 'empirical' for language models, "
                                f"not {params['fisher_mode']!r}")
        if int(params["n_samples"]) < 1:
            raise EvomergeError("n_samples must be at least 1")
    else:
        if params["heads"] not in HEAD_MODES:
            raise EvomergeError(f"heads must be one of {', '.join(HEAD_MODES)}, not {params['heads']!r}")
        if not 0.0 <= float(params["alpha"]) <= 1.0:
            raise EvomergeError(f"alpha must be between 0 and 1, got {params['alpha']}")
    for p in per_model:
        if float(p["weight"]) <= 0:
            raise EvomergeError(f"{method} model weights must be positive, got {p['weight']}")
    if calibration["path"] is None and any(p["calibration"] is None for p in per_model):
        raise EvomergeError(f"merge_method {method} needs calibration data: add a `calibration: {{path: FILE}}` "
                            f"block to the recipe")
    for key in ("samples", "max_length", "batch_size"):
        if int(calibration[key]) < 1:
            raise EvomergeError(f"calibration {key} must be at least 1, got {calibration[key]}")


def merge_data_aware(method: str, base_path: str | Path | None, model_paths: Sequence[str | Path],
                     per_model_params: Sequence[Mapping[str, Any] | None] | None, params: Mapping[str, Any] | None,
                     calibration: Mapping[str, Any] | None, device: str = "cpu", seed: int = 0,
                     ) -> dict[str, torch.Tensor]:
    """The merged state dict (same tensor names and dtypes as the first model's files) of a fisher/regmean recipe.

    ``per_model_params`` lines up with ``model_paths``; missing keys take their defaults, unknown keys are
    errors. Tied embeddings stay tied (the output has exactly the first model's tensor names).
    """
    if method not in DATA_AWARE_METHODS:
        raise EvomergeError(f"unknown data-aware merge method {method!r}; choose from {', '.join(DATA_AWARE_METHODS)}")
    if len(model_paths) < 2:
        raise EvomergeError(f"merge_method {method} needs at least two models, got {len(model_paths)}")
    spec = DATA_AWARE_METHODS[method]
    glob = _with_defaults(params, spec["global"], method)
    per_model_params = list(per_model_params or [None] * len(model_paths))
    if len(per_model_params) != len(model_paths):
        raise ValueError("per_model_params must line up with model_paths")
    per_model = [_with_defaults(p, spec["per_model"], f"{method} per-model") for p in per_model_params]
    calib = _with_defaults(calibration, CALIBRATION_DEFAULTS, "calibration")
    _check_params(method, glob, per_model, calib)

    ckpts = [Checkpoint(p) for p in model_paths]
    for other in ckpts[1:]:
        check_same_architecture(ckpts[0], other)
    tokenizer = load_tokenizer(base_path if base_path is not None else model_paths[0])
    tied = bool(ckpts[0].config.get("tie_word_embeddings", False))

    def batches_for(p: dict[str, Any]):
        """One model's tokenized calibration batches, on ``device``."""
        path = p["calibration"] if p["calibration"] is not None else calib["path"]
        texts = load_texts(path, field=calib["field"], samples=int(calib["samples"]), seed=seed)
        out = tokenized_batches(texts, tokenizer, max_length=int(calib["max_length"]),
                                batch_size=int(calib["batch_size"]))
        return [{k: v.to(device) for k, v in b.items()} for b in out]

    states: list[dict[str, torch.Tensor]] = []
    stats: list[dict[str, torch.Tensor]] = []
    for i, (path, p) in enumerate(zip(model_paths, per_model)):
        batches = batches_for(p)
        model = load_causal_lm(path).to(device)
        if method == "fisher":
            with torch.random.fork_rng(devices=[]):
                stats.append({k: v.cpu() for k, v in causal_lm_fisher(
                    model, batches, mode=glob["fisher_mode"], n_samples=int(glob["n_samples"]),
                    seed=seed + i).items()})
        else:
            stats.append(linear_input_grams(model, batches, skip=("lm_head",) if tied else (), progress=True))
        states.append({k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()})
        del model

    weights = [float(p["weight"]) for p in per_model]
    if method == "fisher":
        merged = fisher_merge(states, stats, weights=weights, floor=float(glob["floor"]),
                              normalize=bool(glob["normalize"]))
    else:
        merged = regmean_merge(states, stats, alpha=float(glob["alpha"]), ridge=float(glob["ridge"]),
                               weights=weights, head_names=("lm_head",), heads=glob["heads"])
    names = ckpts[0].tensor_names
    missing = [n for n in names if n not in merged]
    if missing:
        raise EvomergeError(f"merged model lacks tensor {missing[0]!r} of {model_paths[0]}")
    return {n: merged[n].to(ckpts[0].dtype(n)) for n in names}
