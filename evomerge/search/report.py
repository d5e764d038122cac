"""`evomerge report DIR`: best trials, the Pareto front as a table, and PNG plots, from the run folder alone.

Works on a finished run, a running one (it only reads trials.jsonl and config.yaml) and a killed one.
Writes ``report/report.md``, ``report/objectives.png`` (each objective over trials, with best-so-far),
``report/pareto.png`` (the first two objectives, front highlighted; with one objective: score over wall time)
and ``report/best_vs_items.png`` (the best fully scored weighted score against the item evaluations spent).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.objectives import Objective, as_objectives, best_trial, pareto_front
from evomerge.search.records import TrialRecord
from evomerge.search.run_folder import RunFolder, atomic_write_bytes


@dataclass(frozen=True)
class Report:
    """What ``make_report`` wrote: the markdown ``text``, the ``files``, the ``best`` trial and the ``front``."""

    text: str
    files: list[str]
    best: TrialRecord | None
    front: list[TrialRecord]


def find_trial(records: Sequence[TrialRecord], which: str | int) -> TrialRecord:
    """The trial ``which`` names: ``"best"`` (highest weighted score of the last stage) or a trial id.

    Raises:
        EvomergeError: no successful trial yet, a malformed id, an unknown id, or a failed trial.
    """
    if str(which) == "best":
        best = best_trial(records)
        if best is None:
            raise EvomergeError("the run has no successful trial yet")
        return best
    try:
        tid = int(which)
    except ValueError:
        raise EvomergeError(f"--trial must be 'best' or a trial id, got {which!r}") from None
    for r in records:
        if r.trial == tid:
            if not r.ok:
                raise EvomergeError(f"trial {tid} failed ({r.error}); choose a successful one")
            return r
    raise EvomergeError(f"no finished trial {tid} in this run")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def make_report(run_dir: str | Path, top: int = 10) -> Report:
    """Write ``report/report.md``, ``report/objectives.png`` and ``report/pareto.png`` of a run folder.

    Args:
        run_dir: a run folder (running, finished or killed).
        top: how many best trials the table lists.

    Raises:
        EvomergeError: ``run_dir`` is not a run folder.
    """
    run = RunFolder.open(run_dir)
    config = run.config()
    objectives = as_objectives(config["objectives"])
    records = run.trials()
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    best = best_trial(records)
    front = pareto_front(records, objectives)
    text = "\n".join([*_summary(config, run, records, objectives), *_best_table(records, objectives, top),
                      *_front_table(front, objectives), *_best_params(best), *_failures(records)]) + "\n"
    files = [out / "report.md", out / "objectives.png", out / "pareto.png", out / "best_vs_items.png"]
    atomic_write_bytes(files[0], text.encode())
    _plot_objectives(records, objectives, files[1])
    _plot_pareto(records, objectives, front, files[2])
    _plot_best_vs_items(records, files[3])
    return Report(text, [str(f) for f in files], best, front)


def _summary(config: dict[str, Any], run: RunFolder, records: Sequence[TrialRecord],
             objectives: Sequence[Objective]) -> list[str]:
    n_ok = sum(r.ok for r in records)
    fitness = (config.get("fitness") or {}).get("mode", "full")
    n_full = sum(r.ok and r.full for r in records)
    known = [r.items for r in records if r.items is not None]
    items = (f"Item evaluations spent: {sum(known)}" + ("" if len(known) == len(records) else
                                                       f" (counted in {len(known)} of {len(records)} trials)")
             + f"; fitness: {fitness}; {n_full} trials fully scored.")
    lines = [f"# Run {config.get('name')} ({run.path.name})", ""]  # the folder's name: no machine path
    if config.get("description"):
        lines += [str(config["description"]), ""]
    return lines + [
        f"{len(records)} trials finished: {n_ok} ok, {len(records) - n_ok} failed.",
        f"Search space: {config['search_space'].get('name')} ({config['search_space']['kind']}); "
        f"optimizer: {config['optimizer']['name']}; objectives: "
        + ", ".join(f"{o.metric} ({o.direction}, weight {o.weight})" for o in objectives), items, ""]


def _best_table(records: Sequence[TrialRecord], objectives: Sequence[Objective], top: int) -> list[str]:
    names = [o.metric for o in objectives]
    lines = ["## Best trials (by weighted score, fully scored trials)", "",
             "| trial | stage | score | " + " | ".join(names) + " | items | seconds |",
             "|---|---|---|" + "---|" * len(names) + "---|---|"]
    ok = [r for r in records if r.ok and r.full]
    last_stage = max((r.stage for r in ok), default=0)
    ranked = sorted((r for r in ok if r.stage == last_stage), key=lambda r: -(r.score or 0.0))[:top]
    for r in ranked:
        lines.append(f"| {r.trial} | {r.stage_name} | {_fmt(r.score)} | "
                     + " | ".join(_fmt(v) for v in r.objectives or []) + f" | {_fmt(r.items)} | {_fmt(r.seconds)} |")
    return lines


def _front_table(front: Sequence[TrialRecord], objectives: Sequence[Objective]) -> list[str]:
    names = [o.metric for o in objectives]
    lines = ["", "## Pareto front", "", "| trial | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    return lines + [f"| {r.trial} | " + " | ".join(_fmt(v) for v in r.objectives or []) + " |" for r in front]


def _best_params(best: TrialRecord | None) -> list[str]:
    if best is None:
        return []
    return ["", "## Best genome (decoded gene values)", "", "| gene | value |", "|---|---|",
            *(f"| {k} | {_fmt(v)} |" for k, v in best.params.items())]


def _failures(records: Sequence[TrialRecord]) -> list[str]:
    reasons: dict[str, int] = {}
    for r in records:
        if not r.ok:
            reasons[str(r.error)] = reasons.get(str(r.error), 0) + 1
    if not reasons:
        return []
    ranked = sorted(reasons.items(), key=lambda kv: -kv[1])
    return ["", "## Failures", "", *(f"- {n} x {reason}" for reason, n in ranked)]
def _pyplot() -> Any:
    # matplotlib is only needed for the plots: imported when a report is made, not with the package
    import matplotlib

    matplotlib.use("Agg")
    # deferred: pyplot only after the Agg backend is chosen above
    import matplotlib.pyplot as plt

    return plt


def _plot_objectives(records: Sequence[TrialRecord], objectives: Sequence[Objective], path: Path) -> None:
    """Each objective over trials, with the best so far (in the objective's own direction)."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(objectives), 1, figsize=(8, 3 * len(objectives)), squeeze=False)
    ok = [r for r in records if r.ok and r.objectives is not None]
    bad = [r.trial for r in records if not r.ok]
    for k, (o, ax) in enumerate(zip(objectives, axes[:, 0])):
        xs = [r.trial for r in ok]
        ys = [(r.objectives or [])[k] for r in ok]
        ax.scatter(xs, ys, s=12, alpha=0.6, label="trial")
        better = max if o.sign > 0 else min
        best: float | None = None
        bx, by = [], []
        for x, y in sorted(zip(xs, ys)):
            best = y if best is None else better(best, y)
            bx.append(x)
            by.append(best)
        if bx:
            ax.step(bx, by, where="post", color="C3", label="best so far")
        if bad and ys:
            ax.scatter(bad, [min(ys)] * len(bad), marker="x", color="grey", s=12, label="failed")
        ax.set_xlabel("trial")
        ax.set_ylabel(o.metric)
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pareto(records: Sequence[TrialRecord], objectives: Sequence[Objective], front: Sequence[TrialRecord],
                 path: Path) -> None:
    """The first two objectives with the front highlighted; with one objective: score over wall time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    ok = [r for r in records if r.ok and r.objectives is not None]

    def obj(r: TrialRecord, k: int) -> float:
        return (r.objectives or [])[k]

    if len(objectives) >= 2:
        ax.scatter([obj(r, 0) for r in ok], [obj(r, 1) for r in ok], s=12, alpha=0.5, label="trials")
        pts = sorted((obj(r, 0), obj(r, 1)) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(f"{objectives[0].metric} ({objectives[0].direction})")
        ax.set_ylabel(f"{objectives[1].metric} ({objectives[1].direction})")
    else:
        t0 = min((r.finished_at or 0 for r in ok), default=0)
        ax.scatter([(r.finished_at or t0) - t0 for r in ok], [obj(r, 0) for r in ok], s=12, alpha=0.6,
                   label="trials")
        for r in front:
            ax.scatter([(r.finished_at or t0) - t0], [obj(r, 0)], color="C3", s=40, label="best")
        ax.set_xlabel("seconds since the first finished trial")
        ax.set_ylabel(f"{objectives[0].metric} ({objectives[0].direction})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def best_vs_items(records: Sequence[TrialRecord]) -> list[tuple[int, float]]:
    """(item evaluations spent so far, best fully scored weighted score so far) after each trial that improved
    the best, in trial order over the last stage that has fully scored trials (trials without an item count
    count 0)."""
    full = [r for r in records if r.ok and r.full and r.score is not None]
    stage = max((r.stage for r in full), default=0)
    spent, best, points = 0, None, []
    for r in sorted((r for r in records if r.stage == stage), key=lambda r: r.trial):
        spent += r.items or 0
        if r.ok and r.full and r.score is not None and (best is None or r.score > best):
            best = r.score
            points.append((spent, best))
    return points


def _plot_best_vs_items(records: Sequence[TrialRecord], path: Path) -> None:
    """The best fully scored weighted score against the item evaluations spent (a step curve)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    points = best_vs_items(records)
    total = sum(r.items or 0 for r in records if not points or r.stage == max(x.stage for x in records))
    if points:
        xs = [p[0] for p in points] + [max(total, points[-1][0])]
        ys = [p[1] for p in points] + [points[-1][1]]
        ax.step(xs, ys, where="post", color="C3", label="best fully scored trial")
        ax.legend(loc="best", fontsize=8)
    ax.set_xlabel("item evaluations spent")
    ax.set_ylabel("best weighted score")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(report: Report) -> str:
    """The best trial in one line, then the files written."""
    best = report.best
    head = "no successful trial yet" if best is None else (
        f"best trial {best.trial}: score {_fmt(best.score) if best.score is None else f'{best.score:.6g}'}, "
        "objectives " + ", ".join(_fmt(v) for v in best.objectives or []))
    return head + "\n" + "\n".join(f"wrote {f}" for f in report.files)


__all__ = ["Report", "best_trial", "best_vs_items", "find_trial", "make_report", "format_summary"]
