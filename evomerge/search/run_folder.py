"""The run folder: everything a search leaves behind, written so that a kill -9 at any moment is recoverable.

    config.yaml      the resolved experiment (absolute paths, defaults filled in)
    trials.jsonl     one JSON line per finished trial, appended, flushed and fsynced as each finishes
    state.pkl        the driver's state (optimizer, trial counter, asked-but-unfinished trials, elapsed time),
                     rewritten atomically (temp file, fsync, rename) after every ask and every tell
    pareto.json      the current Pareto front (or the best trial, with one objective)
    optuna.db        the Optuna study (Optuna optimizers only; optuna-dashboard sqlite:///.../optuna.db)
    models/          tiny models built by `models: {build: ...}`
    stages/ps_winner the PS winner that a ps_dfs run hands to its DFS stage

The write order is what makes resume exact: a finished trial is first appended to trials.jsonl, then told,
then the state is checkpointed (asks are checkpointed too where asking has a side effect, i.e. Optuna's
SQLite row; other optimizers re-ask deterministically from the last checkpoint, see loop.SearchDriver._ask).
A trial whose line is in trials.jsonl is never evaluated again (if the crash came before its tell was
checkpointed, resume tells it from the line); a trial whose line is missing (or torn: a last line without its
newline) was not finished and is evaluated again.
"""

from __future__ import annotations

import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError

CONFIG = "config.yaml"
TRIALS = "trials.jsonl"
STATE = "state.pkl"
PARETO = "pareto.json"


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


def json_safe(value: Any) -> Any:
    """NaN and infinities become None so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        self._trials_file = None

    # -- creation and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: dict[str, Any]) -> "RunFolder":
        path = Path(path)
        if path.exists() and any(path.iterdir()):
            if (path / CONFIG).is_file():
                raise EvomergeError(f"run folder {path} already holds a run; resume it with "
                                    f"`evomerge run --resume {path}` or choose another --out")
            raise EvomergeError(f"output folder {path} exists and is not empty")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        atomic_write_bytes(run.path / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())
        (run.path / TRIALS).touch()
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise EvomergeError(f"{path} is not a run folder (no {CONFIG})")
        return cls(path)

    def config(self) -> dict[str, Any]:
        return yaml.safe_load((self.path / CONFIG).read_text())

    def update_config(self, config: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / CONFIG, yaml.safe_dump(config, sort_keys=False).encode())

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

    def append_trial(self, record: dict[str, Any]) -> None:
        if self._trials_file is None:
            self._trials_file = open(self.path / TRIALS, "a", encoding="utf-8")
        self._trials_file.write(json.dumps(json_safe(record), sort_keys=False, allow_nan=False) + "\n")
        self._trials_file.flush()
        os.fsync(self._trials_file.fileno())

    def trials(self) -> list[dict[str, Any]]:
        p = self.path / TRIALS
        if not p.exists():
            return []
        out = []
        for line in p.read_text(encoding="utf-8").splitlines(keepends=True):
            if not line.endswith("\n"):
                break  # torn last line: that trial did not finish
            line = line.strip()
            if line:
                out.append(json.loads(line))
        return out

    def close(self) -> None:
        if self._trials_file is not None:
            self._trials_file.close()
            self._trials_file = None

    # -- driver state -------------------------------------------------------------------------------------
    def save_state(self, state: dict[str, Any]) -> None:
        atomic_write_bytes(self.path / STATE, pickle.dumps(state, protocol=pickle.HIGHEST_PROTOCOL), sync="file")

    def load_state(self) -> dict[str, Any] | None:
        p = self.path / STATE
        if not p.exists():
            return None
        with open(p, "rb") as f:
            return pickle.load(f)  # our own file, written by this driver (never user-supplied weights)

    # -- Pareto front -------------------------------------------------------------------------------------
    def write_pareto(self, trials: list[dict[str, Any]], objectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
        front = pareto_front(trials, objectives)
        doc = {"objectives": objectives,
               "trials": [{k: t.get(k) for k in ("trial", "stage", "objectives", "score", "genome")} for t in front]}
        atomic_write_bytes(self.path / PARETO, json.dumps(json_safe(doc), indent=1).encode(), sync="none")
        return front


def dominates(a: list[float], b: list[float]) -> bool:
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(trials: list[dict[str, Any]], objectives: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Successful trials that no other successful trial dominates (all objectives oriented to maximize).

    With one objective that is the best trial(s). Trials of the last stage only (ps_dfs: the DFS stage,
    whose candidates build on the PS winner), unless no later stage has finished trials yet.
    """
    ok = [t for t in trials if t.get("status") == "ok" and t.get("objectives") is not None]
    if ok:
        last_stage = max(t.get("stage", 0) for t in ok)
        ok = [t for t in ok if t.get("stage", 0) == last_stage]
    signs = [1.0 if o["direction"] == "maximize" else -1.0 for o in objectives]
    pts = [[s * v for s, v in zip(signs, t["objectives"])] for t in ok]
    front = [t for i, t in enumerate(ok) if not any(dominates(pts[j], pts[i]) for j in range(len(ok)) if j != i)]
    return sorted(front, key=lambda t: t["trial"])
