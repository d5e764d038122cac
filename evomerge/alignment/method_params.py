"""The data-aware merge methods' parameters (``fisher``, ``regmean``) and the recipe's ``calibration:`` block.

Only tables, no model code: recipe validation and the method registry read them without importing the
merges themselves (``recipe_methods``). A new data-aware method is one entry in ``DATA_AWARE_METHODS`` plus
its branch in ``recipe_methods.merge_data_aware``.
"""

from __future__ import annotations

from typing import Any

#: method -> {"global": {param: default}, "per_model": {param: default}}
DATA_AWARE_METHODS: dict[str, dict[str, dict[str, Any]]] = {
    "fisher": {
        "global": {
            "fisher_mode": "sampled",  # "sampled" (tokens drawn from the model: unbiased) or "empirical"
            "n_samples": 1,            # sampled draws per calibration batch
            "floor": 1e-8,             # Fisher entries are clamped to at least this (no 0/0)
            "normalize": False,        # divide each model's Fisher by its mean so models count equally
        },
        "per_model": {"weight": 1.0, "calibration": None},
    },
    "regmean": {
        "global": {
            "alpha": 0.9,              # off-diagonal scale of each Gram (1.0: plain least squares)
            "ridge": 1e-6,             # ridge (times mean diagonal) when the summed Gram is singular
            "heads": "merge",          # lm_head: "merge" (RegMean), "average", or "keep" (first model's)
        },
        "per_model": {"weight": 1.0, "calibration": None},
    },
}

#: the recipe's top-level ``calibration:`` block.
CALIBRATION_DEFAULTS: dict[str, Any] = {
    "path": None,        # JSONL (text in `field`) or a text file with one sample per line
    "field": "text",
    "samples": 64,
    "max_length": 256,   # tokens per text
    "batch_size": 4,
}
