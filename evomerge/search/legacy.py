"""Run folders of earlier releases: their state.pkl, read without unpickling any class, and upgraded.

Releases up to 9654006 pickled the driver's state (the optimizer object itself) to state.pkl. This module
reads such a file with an unpickler that never imports or runs anything: every class and function the
pickle names becomes an inert ``_Stub`` holding its arguments and state, so only the plain data (numbers,
strings, lists, dicts, tuples) is used. The optimizer is then rebuilt from that data:

- ``cmaes``: the told generations are replayed from the seed, each member's loss read from trials.jsonl by its
  genome (exact floats), then the current generation's asks and tells are restored;
- ``random``: a fresh generator asked as many times as the old one was;
- Optuna optimizers: their study is in optuna.db; the count of asks is its number of trials.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.optimizers import CMAESOptimizer, Optimizer, OptunaOptimizer, RandomOptimizer
from evomerge.search.records import TrialRecord

LEGACY_VERSION = 1


class _Stub:
    """Stands in for any class or function a legacy pickle names: keeps what it is given, does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub(*args)

    def __setstate__(self, state: Any) -> None:
        self.__dict__["state"] = state

    def __setitem__(self, key: Any, value: Any) -> None:  # a dict subclass's items
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # a list subclass's items
        self.__dict__.setdefault("list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("list", []).extend(values)


class _InertUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in (("builtins", "set"), ("builtins", "frozenset"), ("builtins", "tuple")):
            return {"set": set, "frozenset": frozenset, "tuple": tuple}[name]
        return _Stub


def _fields(obj: Any) -> dict[str, Any]:
    """The instance attributes of a stubbed object (pickled as its __dict__)."""
    state = obj.__dict__.get("state") if isinstance(obj, _Stub) else None
    if isinstance(state, tuple):  # (dict, slots)
        state = state[0]
    return state if isinstance(state, dict) else {}


def read_legacy_state(path: Path) -> dict[str, Any]:
    """The driver state of an earlier release's state.pkl as plain data.

    Returns:
        ``{stage, next_trial, pending: {id: {key, x, stage}}, elapsed_s, optimizer}`` where ``optimizer`` is
        None or ``{"version": 1, "kind", "seed", "gen_index", "asked", "losses", "count"}``.

    Raises:
        EvomergeError: the file is not a driver state of an earlier release.
    """
    try:
        data = _InertUnpickler(io.BytesIO(path.read_bytes())).load()
    except Exception as exc:
        raise EvomergeError(f"{path}: not a readable driver state ({type(exc).__name__})") from None
    if not isinstance(data, dict) or data.get("version") != LEGACY_VERSION:
        raise EvomergeError(f"{path}: not a driver state of an earlier release")
    opt = None
    if data.get("optimizer") is not None:
        f = _fields(data["optimizer"])
        kind = f.get("name") if f.get("name") in ("tpe", "optuna_cmaes", "nsga2") else (
            "cmaes" if "es" in f else "random")
        opt = {"version": LEGACY_VERSION, "kind": kind, "gen_index": f.get("gen_index", 0),
               "asked": f.get("asked", 0), "losses": dict(f.get("losses") or {}), "count": f.get("count", 0)}
    return {"stage": int(data["stage"]), "next_trial": int(data["next_trial"]),
            "pending": {int(t): dict(p) for t, p in data["pending"].items()},
            "elapsed_s": float(data.get("elapsed_s_saved") or data.get("elapsed_s") or 0.0), "optimizer": opt}


def legacy_key(optimizer: Optimizer, key: Any) -> Any:
    """A pending trial's key in this release's form (cmaes keys were (generation, member) pairs)."""
    if isinstance(optimizer, CMAESOptimizer) and isinstance(key, (tuple, list)):
        return int(key[0]) * (optimizer.population or 1) + int(key[1])
    return key


def upgrade_optimizer(optimizer: Optimizer, state: dict[str, Any], records: Sequence[TrialRecord]) -> None:
    """Bring a freshly built optimizer to the legacy ``state`` (see module docstring).

    Args:
        optimizer: built for the stage's problem, nothing asked yet.
        state: the ``optimizer`` entry of ``read_legacy_state``.
        records: the finished trials of the stage (their genomes and scores give cmaes its told losses).

    Raises:
        EvomergeError: a told genome has no finished trial (the folder does not fit this experiment).
    """
    if isinstance(optimizer, RandomOptimizer):
        for _ in range(int(state["count"])):
            optimizer.ask()
    if isinstance(optimizer, OptunaOptimizer):  # every ask of the old run has its row in the study
        optimizer.asks = len(optimizer.study.get_trials(deepcopy=False))
    if not isinstance(optimizer, CMAESOptimizer):
        return
    by_x = {tuple(r.x): r for r in records}

    def loss_of(x: list[float]) -> float | None:
        record = by_x.get(tuple(x))
        if record is None:
            raise EvomergeError("the run folder's state.pkl does not match its trials.jsonl")
        return None if not record.ok or record.objectives is None else -optimizer.score(record.objectives)

    optimizer.replay(int(state["gen_index"]), loss_of)
    if state["asked"] or state["losses"]:
        optimizer.restore_generation(int(state["asked"]), {int(k): v for k, v in state["losses"].items()})
