"""The run folder: everything a search leaves behind, written so that a kill -9 at any moment is recoverable.

    config.yaml      the resolved experiment (defaults filled in; paths relative to the run folder, see below)
    trials.jsonl     one JSON line per finished trial, appended, flushed and fsynced as each finishes
    state.json       the driver's state (the optimizer's state dict, trial counter, asked-but-unfinished trials,
                     elapsed time) as versioned JSON, rewritten atomically (temp file, fsync, rename) after
                     every ask and every tell; a run of an earlier release has state.pkl instead, read once
                     without unpickling any class (see legacy.py)
    pareto.json      the current Pareto front (or the best trial, with one objective)
    optuna.db        the Optuna study (Optuna optimizers only; optuna-dashboard sqlite:///.../optuna.db)
    models/          tiny models built by `models: {build: ...}`
    stages/ps_winner the PS winner that a ps_dfs run hands to its DFS stage

The write order is what makes resume exact: a finished trial is first appended to trials.jsonl, then told,
then the state is checkpointed (asks are checkpointed too where asking has a side effect, i.e. Optuna's
SQLite row; other optimizers re-ask deterministically from the last checkpoint, see driver.SearchDriver._ask).
A trial whose line is in trials.jsonl is never evaluated again (if the crash came before its tell was
checkpointed, resume tells it from the line); a trial whose line is missing (or torn: a last line without its
newline) was not finished and is evaluated again.

No file of a run folder names the machine: config.yaml and trials.jsonl store every path relative to the run
folder, written ``./x`` or ``../x`` (``portable_paths``; also inside ``custom:PATH:fn``-style specs), and reading
resolves them against the folder again (``local_paths``), so a run folder moved together with its models still
resumes and exports; trial lines keep the worker index and pid but not the host name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.search.legacy import read_legacy_state
from evomerge.search.objectives import Objective, pareto_front
from evomerge.search.portable import local_paths, portable_paths, portable_text
from evomerge.search.records import TrialRecord, json_safe

CONFIG = "config.yaml"
TRIALS = "trials.jsonl"
STATE = "state.json"
LEGACY_STATE = "state.pkl"
PARETO = "pareto.json"
STATE_VERSION = 2


@dataclass
class PendingTrial:
    """An asked trial without a line in trials.jsonl yet: its optimizer key, genome x and stage."""

    key: Any
    x: list[float]
    stage: int


@dataclass
class DriverState:
    """The driver's checkpoint (state.json).

    Attributes:
        stage: the stage being searched.
        next_trial: the id the next ask gets.
        pending: asked-but-unfinished trials by id.
        elapsed_s: wall-clock seconds the run has searched, over every part (resumes) so far.
        optimizer: the stage optimizer's ``state_dict()`` (None before the stage's optimizer exists).
        version: the file format's version (2; state.pkl of earlier releases is version 1).
    """

    stage: int = 0
    next_trial: int = 0
    pending: dict[int, PendingTrial] = field(default_factory=dict)
    elapsed_s: float = 0.0
    optimizer: dict[str, Any] | None = None
    version: int = STATE_VERSION

    def to_json(self) -> dict[str, Any]:
        """The JSON document (pending trial ids as strings)."""
        return {"version": self.version, "stage": self.stage, "next_trial": self.next_trial,
                "pending": {str(t): {"key": p.key, "x": p.x, "stage": p.stage} for t, p in self.pending.items()},
                "elapsed_s": self.elapsed_s, "optimizer": self.optimizer}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DriverState:
        """Inverse of ``to_json``.

        Raises:
            EvomergeError: a state of another version.
        """
        if data.get("version") != STATE_VERSION:
            raise EvomergeError(f"{STATE} has version {data.get('version')!r}; this release reads {STATE_VERSION}")
        pending = {int(t): PendingTrial(p["key"], [float(v) for v in p["x"]], int(p["stage"]))
                   for t, p in data["pending"].items()}
        return cls(stage=int(data["stage"]), next_trial=int(data["next_trial"]), pending=pending,
                   elapsed_s=float(data["elapsed_s"]), optimizer=data["optimizer"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, sync: str = "full") -> None:
    """Write via a temporary file and a rename: readers (and a resume after kill -9) see the old or the new
    content, never a mix. ``sync``: "full" fsyncs the file and the folder (survives power loss), "file" only the
    file (the checkpoints rewritten every trial: a power cut may bring back the previous one, which resume
    handles), "none" neither (derived files such as pareto.json)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if sync != "none":
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if sync == "full":
        _fsync_dir(path.parent)


class RunFolder:
    """A run folder (see module docstring): created once, then opened by resume, report and export.

    Args:
        path: the folder (made absolute).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self._trials_file: IO[str] | None = None

    # -- creation and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> RunFolder:
        """Create the folder with config.yaml and an empty trials.jsonl.

        Raises:
            EvomergeError: the folder exists and is not empty (a run there is named, with how to resume it).
        """
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if (path / CONFIG).is_file():
                raise EvomergeError(f"run folder {path} already holds a run; resume it with "
                                    f"`evomerge run --resume {path}` or choose another --out")
            raise EvomergeError(f"output folder {path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        run.update_config(config)
        (run.path / TRIALS).touch()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunFolder:
        """Open an existing run folder.

        Raises:
            EvomergeError: ``path`` has no config.yaml.
        """
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise EvomergeError(f"{path} is not a run folder (no {CONFIG})")
        return cls(path)

    def config(self) -> dict[str, Any]:
        """The resolved experiment mapping (config.yaml), its paths absolute again (``local_paths``)."""
        data: dict[str, Any] = local_paths(yaml.safe_load((self.path / CONFIG).read_text()), self.path)
        return data

    def update_config(self, config: dict[str, Any]) -> None:
        """Rewrite config.yaml atomically, its paths relative to the run folder (``portable_paths``)."""
        portable = portable_paths(config, self.path)
        atomic_write_bytes(self.path / CONFIG, yaml.safe_dump(portable, sort_keys=False).encode())

    # -- trials -------------------------------------------------------------------------------------------
    def repair_trials(self) -> None:
        """Cut a torn last line (a kill -9 in the middle of an append) so appends start on a fresh line."""
        p = self.path / TRIALS
        if not p.exists():
            p.touch()
            return
        data = p.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(p, "r+b") as f:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())

    def append_trial(self, record: TrialRecord) -> None:
        """Append one finished trial to trials.jsonl, flushed and fsynced before returning (paths relative to the
        run folder, no host name)."""
        if self._trials_file is None:
            self._trials_file = open(self.path / TRIALS, "a", encoding="utf-8")
        line = record.to_json()
        line["host"] = None
        line["candidate"] = portable_paths(line["candidate"], self.path)
        if line.get("error"):
            line["error"] = portable_text(line["error"], self.path)
        self._trials_file.write(json.dumps(line, sort_keys=False, allow_nan=False) + "\n")
        self._trials_file.flush()
        os.fsync(self._trials_file.fileno())

    def trials(self) -> list[TrialRecord]:
        """The finished trials in file order (a torn last line is not a finished trial)."""
        p = self.path / TRIALS
        if not p.exists():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # torn last line: that trial did not finish
            line = line.strip()
            if line:
                data = json.loads(line)
                data["candidate"] = local_paths(data.get("candidate"), self.path)
                out.append(TrialRecord.from_json(data))
        return out

    def close(self) -> None:
        """Close trials.jsonl (appends reopen it)."""
        if self._trials_file is not None:
            self._trials_file.close()
            self._trials_file = None

    # -- driver state -------------------------------------------------------------------------------------
    def save_state(self, state: DriverState) -> None:
        """Checkpoint the driver's state (state.json, atomically; the file is fsynced, the folder not)."""
        atomic_write_bytes(self.path / STATE, json.dumps(state.to_json()).encode(), sync="file")

    def load_state(self) -> DriverState | None:
        """The last checkpoint: state.json, else an earlier release's state.pkl (converted), else None."""
        p = self.path / STATE
        if p.exists():
            return DriverState.from_json(json.loads(p.read_text()))
        if (self.path / LEGACY_STATE).exists():
            old = read_legacy_state(self.path / LEGACY_STATE)
            pending = {t: PendingTrial(p["key"], list(p["x"]), int(p.get("stage", 0)))
                       for t, p in old["pending"].items()}
            return DriverState(stage=old["stage"], next_trial=old["next_trial"], pending=pending,
                               elapsed_s=old["elapsed_s"], optimizer=old["optimizer"])
        return None

    # -- Pareto front -------------------------------------------------------------------------------------
    def write_pareto(self, trials: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[TrialRecord]:
        """Write pareto.json: the objectives and the Pareto front of ``trials`` (objectives.pareto_front).

        Returns:
            The front.
        """
        front = pareto_front(trials, objectives)
        doc = {"objectives": [o.to_dict() for o in objectives],
               "trials": [{"trial": t.trial, "stage": t.stage, "objectives": t.objectives, "score": t.score,
                           "params": t.params} for t in front]}
        atomic_write_bytes(self.path / PARETO, json.dumps(json_safe(doc), indent=1).encode(), sync="none")
        return front
