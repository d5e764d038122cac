"""What every evaluator is: a name, the metric names it returns, and ``evaluate(model, tokenizer)``.

Evaluators are built once per worker (data loading, task building and other setup happen at build time) and
then called many times on the same model object whose weights the engine rewrites in place. So an evaluator
must never cache anything derived from the weights; caching prompts or token ids (derived from the data and the
tokenizer only) is fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError


@dataclass(frozen=True)
class ItemScores:
    """Per-item values of an evaluator on some of its items (the cheap-fitness modes score subsets).

    Attributes:
        indices: the item positions scored (0 .. ``n_items`` - 1 of the evaluator's item list), in call order.
        values: {metric name: one value per item of ``indices``}; every metric's value on a set of items is the
            mean of its per-item values (accuracy: 1.0 right, 0.0 wrong).
    """

    indices: tuple[int, ...]
    values: dict[str, tuple[float, ...]]

    def __post_init__(self) -> None:
        bad = [m for m, v in self.values.items() if len(v) != len(self.indices)]
        if bad:
            raise EvomergeError(f"per-item metric {bad[0]!r} has {len(self.values[bad[0]])} values for "
                                f"{len(self.indices)} items")

    def __len__(self) -> int:
        return len(self.indices)

    def extend(self, other: ItemScores) -> ItemScores:
        """These items followed by ``other``'s (same metrics)."""
        return ItemScores(self.indices + other.indices,
                          {m: v + other.values[m] for m, v in self.values.items()})

    def means(self) -> dict[str, float]:
        """{metric: mean over the items} (fractions in [0, 1] for accuracies)."""
        n = max(len(self.indices), 1)
        return {m: float(sum(v)) / n for m, v in self.values.items()}


class Evaluator:
    """Base class: subclasses set ``name`` and ``metric_names`` and implement ``evaluate``.

    Evaluators whose metrics are means over items (accuracy on a list of problems) also implement
    ``score_items`` and set ``n_items``: the search's cheap-fitness modes (``fitness: race | minibatch``,
    evomerge/search/fitness.py) then score a candidate on a subset of the items, growing it as needed.
    """

    name: str = "evaluator"
    metric_names: tuple[str, ...] = ()
    n_items: int | None = None  # how many items ``evaluate`` scores (None: not a mean over items, or unknown)

    @property
    def scores_items(self) -> bool:
        """Whether ``score_items`` works (the evaluator overrides it and knows its item count)."""
        return self.n_items is not None and type(self).score_items is not Evaluator.score_items

    def score_items(self, model, tokenizer, indices: Sequence[int]) -> ItemScores:
        """Per-item values of ``metric_names`` on the items at ``indices`` (a subset, in the given order).

        Scoring every index and taking ``ItemScores.means`` gives what ``evaluate`` returns.

        Args:
            model, tokenizer: as for ``evaluate``.
            indices: item positions in 0 .. ``n_items`` - 1, distinct.

        Returns:
            The per-item values, one per index, in the order of ``indices``.

        Raises:
            EvomergeError: the evaluator cannot score single items (perplexity, lm-eval, a custom function that
                does not take ``items``).
        """
        raise EvomergeError(f"evaluator {self.name} cannot score a subset of its items (fitness: race and "
                            "minibatch need per-item scores: math_word, one-task lm_eval, or a custom function "
                            "that takes items=)")

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


def check_indices(indices: Sequence[int], n_items: int, name: str) -> list[int]:
    """``indices`` as a list, checked to be distinct positions in 0 .. n_items - 1.

    Raises:
        EvomergeError: an index out of range or repeated.
    """
    out = [int(i) for i in indices]
    if any(not 0 <= i < n_items for i in out) or len(set(out)) != len(out):
        raise EvomergeError(f"evaluator {name}: item indices must be distinct and in 0..{n_items - 1}")
    return out


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
