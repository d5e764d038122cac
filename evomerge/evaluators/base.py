"""What every evaluator is: a name, the metric names it returns, and ``evaluate(model, tokenizer)``.

Evaluators are built once per worker (data loading, task building and other setup happen at build time) and
then called many times on the same model object whose weights the engine rewrites in place. So an evaluator
must never cache anything derived from the weights; caching prompts or token ids (derived from the data and the
tokenizer only) is fine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError


class Evaluator:
    """Base class: subclasses set ``name`` and ``metric_names`` and implement ``evaluate``."""

    name: str = "evaluator"
    metric_names: tuple[str, ...] = ()

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Metrics of the model as it is now (call again after its weights change).

        Args:
            model: a ``transformers`` causal LM (``torch.nn.Module``) on any device, any floating dtype; it is
                only read (eval mode, no gradients), never modified.
            tokenizer: its tokenizer (``transformers`` ``PreTrainedTokenizerBase``).

        Returns:
            ``{metric name: value}`` with exactly the keys ``metric_names``: accuracies as fractions in [0, 1],
            perplexity as exp(mean negative log-likelihood per token) (>= 1, lower is better), custom metrics as
            their function returns them.

        Raises:
            EvomergeError: the model or tokenizer does not fit the evaluator (e.g. a custom function's wrong
                return). Any other exception (NaN logits, out of memory) propagates: the search records a
                failed trial.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, metrics={list(self.metric_names)})"


def check_keys(config: dict[str, Any], allowed: set[str], what: str) -> None:
    """Unknown keys in an evaluator config are errors (a typo must not silently change an experiment)."""
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise EvomergeError(f"{what}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}")


def resolve_path(path: str | Path, base_dir: Path) -> Path:
    """A path from a config, relative to the folder of the YAML that names it (absolute paths stay)."""
    p = Path(str(path)).expanduser()
    return p if p.is_absolute() else (base_dir / p)


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (safe loading).

    Raises:
        EvomergeError: the file cannot be read, is not valid YAML, or its top level is not a mapping.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise EvomergeError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise EvomergeError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise EvomergeError(f"{path}: expected a mapping at the top level")
    return data


def model_device(model):
    """The device of the model's first parameter (evaluators put their tensors there)."""
    import torch  # deferred: evomerge.evaluators (spec parsing, validation) stays torch-free until a model exists

    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
