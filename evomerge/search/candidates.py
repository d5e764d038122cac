"""Candidates: what a genome decodes to, the thing a worker materializes and export writes.

- PS: a ``Recipe`` (mergekit-compatible; ``evomerge merge`` on it gives the same weights).
- DFS: a ``LayerPath``: the layers of models A and B in path order, with the input scale of every position.

Both have a JSON form (``candidate_to_json`` / ``candidate_from_json``) that trial records store, so export
reads a trial's candidate instead of rebuilding it from the genome.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from evomerge.recipe import Recipe


@dataclass(frozen=True)
class LayerPath:
    """A data-flow candidate: a path over the M = n_a + n_b layers of models A and B.

    Attributes:
        a: model A's folder (embeddings, final norm, head and tokenizer come from A).
        b: model B's folder.
        n_a: number of decoder layers of A; layer index i < n_a is A's layer i, else B's layer i - n_a.
        layers: the path, as combined layer indices (length P >= 1).
        scales: ``scales[p]`` multiplies the input of path position p (length P; 1.0 for the first).
    """

    a: str
    b: str
    n_a: int
    layers: list[int] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form ``{a, b, n_a, layers, scales}``."""
        return {"a": self.a, "b": self.b, "n_a": self.n_a, "layers": list(self.layers), "scales": list(self.scales)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerPath:
        """Inverse of ``to_dict``."""
        return cls(str(data["a"]), str(data["b"]), int(data["n_a"]), [int(i) for i in data["layers"]],
                   [float(s) for s in data["scales"]])


Candidate = Recipe | LayerPath


def candidate_to_json(candidate: Candidate) -> dict[str, Any]:
    """``{"kind": "ps", "recipe": {...}}`` or ``{"kind": "dfs", "path": {...}}``."""
    if isinstance(candidate, LayerPath):
        return {"kind": "dfs", "path": candidate.to_dict()}
    return {"kind": "ps", "recipe": candidate.to_dict()}


def candidate_from_json(data: dict[str, Any]) -> Candidate:
    """Inverse of ``candidate_to_json``.

    Raises:
        EvomergeError: the stored recipe is no longer valid (e.g. a source model folder was removed).
    """
    if data["kind"] == "dfs":
        return LayerPath.from_dict(data["path"])
    return Recipe.from_dict(data["recipe"], source="the trial's recipe")
