"""Stages of a search and the space of each: what the driver searches and what export decodes, in one place.

A ``ps`` or ``dfs`` experiment has one stage; a ``ps_dfs`` experiment has two (the paper's PS then DFS): the
PS stage gets ``ps_share`` of every budget, the DFS stage the rest, with the PS winner (exported to
``stages/ps_winner`` in the run folder) as its model A.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.search.experiment import Experiment, ModelsConfig
from evomerge.search.search_space import SearchSpace, build_space

PS_WINNER = Path("stages") / "ps_winner"


@dataclass(frozen=True)
class Stage:
    """One stage: its name (``ps``/``dfs``), its space definition, and its budgets (None = no limit).

    ``wall_time`` is in seconds.
    """

    name: str
    space: dict[str, Any]
    trials: int | None
    generations: int | None
    wall_time: float | None


def _share(value: float | None, share: float) -> float | None:
    return None if value is None else value * share


def _count_share(value: int | None, share: float) -> int | None:
    return None if value is None else max(1, int(round(value * share)))


def stage_definitions(exp: Experiment) -> list[Stage]:
    """The stages of ``exp`` in order, with their budgets.

    Returns:
        One ``Stage`` for ps or dfs; two for ps_dfs (counts split by ``ps_share``, each at least 1).
    """
    space, b = exp.space, exp.budget
    if space["kind"] != "ps_dfs":
        return [Stage(space["kind"], space, b.trials, b.generations, b.wall_time)]
    share = float(space["ps_share"])
    ps_trials, ps_gens = _count_share(b.trials, share), _count_share(b.generations, share)
    return [
        Stage("ps", space["ps"], ps_trials, ps_gens, _share(b.wall_time, share)),
        Stage("dfs", space["dfs"],
              None if b.trials is None or ps_trials is None else max(1, b.trials - ps_trials),
              None if b.generations is None or ps_gens is None else max(1, b.generations - ps_gens),
              _share(b.wall_time, 1 - share)),
    ]


def stage_models(exp: Experiment, run_path: Path, stage: int) -> ModelsConfig:
    """The models of one stage: ps_dfs's DFS stage takes the PS winner in the run folder as model A."""
    models = exp.models
    if exp.kind == "ps_dfs" and stage_definitions(exp)[stage].name == "dfs":
        return ModelsConfig(build=models.build, base=models.base, sources=models.sources,
                            a=str(run_path / PS_WINNER), b=models.b)
    return models


def stage_space(exp: Experiment, run_path: Path, stage: int) -> SearchSpace:
    """The concrete search space of one stage (genes, and genome -> candidate), as the driver built it."""
    models = stage_models(exp, run_path, stage)
    return build_space(stage_definitions(exp)[stage].space, models.to_dict(), exp.dtype)
