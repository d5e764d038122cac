"""`evomerge report DIR`: best trials, the Pareto front as a table, and PNG plots, from the run folder alone.

Works on a finished run, a running one (it only reads trials.jsonl and config.yaml) and a killed one.
Writes ``report/report.md``, ``report/objectives.png`` (each objective over trials, with best-so-far) and
``report/pareto.png`` (the first two objectives, front highlighted; with one objective: score over wall time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError
from evomerge.search.run_folder import RunFolder, atomic_write_bytes, pareto_front


def _objectives(config: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"metric": o["metric"], "direction": o["direction"], "weight": o.get("weight", 1.0)}
            for o in config["objectives"]]


def best_trial(records: list[dict[str, Any]], exp_or_config: Any, stage: int | None = None) -> dict[str, Any] | None:
    """The successful trial with the highest weighted score (of ``stage``, default the last stage with one)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("score") is not None]
    if stage is None and ok:
        stage = max(r.get("stage", 0) for r in ok)
    ok = [r for r in ok if r.get("stage", 0) == stage]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["score"], -r["trial"]))


def find_trial(records: list[dict[str, Any]], which: str | int, config: dict[str, Any]) -> dict[str, Any]:
    if str(which) == "best":
        best = best_trial(records, config)
        if best is None:
            raise EvomergeError("the run has no successful trial yet")
        return best
    try:
        tid = int(which)
    except ValueError:
        raise EvomergeError(f"--trial must be 'best' or a trial id, got {which!r}") from None
    for r in records:
        if r["trial"] == tid:
            if r["status"] != "ok":
                raise EvomergeError(f"trial {tid} failed ({r.get('error')}); choose a successful one")
            return r
    raise EvomergeError(f"no finished trial {tid} in this run")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def make_report(run_dir: str | Path, top: int = 10) -> dict[str, Any]:
    """Write the report files; returns {"text": markdown, "files": [...], "best": record or None}."""
    run = RunFolder.open(run_dir)
    config = run.config()
    objectives = _objectives(config)
    records = run.trials()
    ok = [r for r in records if r["status"] == "ok"]
    failed = [r for r in records if r["status"] != "ok"]
    out = run.path / "report"
    out.mkdir(exist_ok=True)
    names = [o["metric"] for o in objectives]

    lines = [f"# Run {config.get('name')} ({run.path})", "",
             f"{len(records)} trials finished: {len(ok)} ok, {len(failed)} failed.",
             f"Search space: {config['search_space'].get('name')} ({config['search_space']['kind']}); "
             f"optimizer: {config['optimizer']['name']}; objectives: "
             + ", ".join(f"{o['metric']} ({o['direction']}, weight {o['weight']})" for o in objectives), ""]
    best = best_trial(records, config)
    lines += ["## Best trials (by weighted score)", "",
              "| trial | stage | score | " + " | ".join(names) + " | seconds |",
              "|---|---|---|" + "---|" * len(names) + "---|"]
    last_stage = max((r.get("stage", 0) for r in ok), default=0)
    ranked = sorted((r for r in ok if r.get("stage", 0) == last_stage), key=lambda r: -r["score"])[:top]
    for r in ranked:
        lines.append(f"| {r['trial']} | {r.get('stage_name', '')} | {_fmt(r['score'])} | "
                     + " | ".join(_fmt(v) for v in r["objectives"]) + f" | {_fmt(r.get('seconds'))} |")
    front = pareto_front(records, objectives)
    lines += ["", "## Pareto front", "", "| trial | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in front:
        lines.append(f"| {r['trial']} | " + " | ".join(_fmt(v) for v in r["objectives"]) + " |")
    if best is not None:
        lines += ["", "## Best genome", "", "| gene | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in best["genome"].items()]
    if failed:
        lines += ["", "## Failures", ""]
        reasons: dict[str, int] = {}
        for r in failed:
            reasons[str(r.get("error"))] = reasons.get(str(r.get("error")), 0) + 1
        lines += [f"- {n} x {reason}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
    text = "\n".join(lines) + "\n"
    files = [out / "report.md", out / "objectives.png", out / "pareto.png"]
    atomic_write_bytes(files[0], text.encode())
    _plot_objectives(records, objectives, files[1])
    _plot_pareto(records, objectives, front, files[2])
    return {"text": text, "files": [str(f) for f in files], "best": best, "front": front}


def _plot_objectives(records, objectives, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(objectives)
    fig, axes = plt.subplots(n, 1, figsize=(8, 3 * n), squeeze=False)
    for k, (o, ax) in enumerate(zip(objectives, axes[:, 0])):
        xs = [r["trial"] for r in records if r["status"] == "ok"]
        ys = [r["objectives"][k] for r in records if r["status"] == "ok"]
        bad = [r["trial"] for r in records if r["status"] != "ok"]
        ax.scatter(xs, ys, s=12, alpha=0.6, label="trial")
        better = max if o["direction"] == "maximize" else min
        best, bx, by = None, [], []
        for x, y in sorted(zip(xs, ys)):
            best = y if best is None else better(best, y)
            bx.append(x)
            by.append(best)
        if bx:
            ax.step(bx, by, where="post", color="C3", label="best so far")
        if bad and ys:
            ax.scatter(bad, [min(ys)] * len(bad), marker="x", color="grey", s=12, label="failed")
        ax.set_xlabel("trial")
        ax.set_ylabel(o["metric"])
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pareto(records, objectives, front, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    ok = [r for r in records if r["status"] == "ok"]
    if len(objectives) >= 2:
        ax.scatter([r["objectives"][0] for r in ok], [r["objectives"][1] for r in ok], s=12, alpha=0.5,
                   label="trials")
        pts = sorted((r["objectives"][0], r["objectives"][1]) for r in front)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", color="C3", label="Pareto front")
        ax.set_xlabel(f"{objectives[0]['metric']} ({objectives[0]['direction']})")
        ax.set_ylabel(f"{objectives[1]['metric']} ({objectives[1]['direction']})")
    else:
        t0 = min((r.get("finished_at") or 0 for r in ok), default=0)
        ax.scatter([(r.get("finished_at") or t0) - t0 for r in ok], [r["objectives"][0] for r in ok], s=12,
                   alpha=0.6, label="trials")
        for r in front:
            ax.scatter([(r.get("finished_at") or t0) - t0], [r["objectives"][0]], color="C3", s=40, label="best")
        ax.set_xlabel("seconds since the first finished trial")
        ax.set_ylabel(f"{objectives[0]['metric']} ({objectives[0]['direction']})")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(report: dict[str, Any]) -> str:
    best = report["best"]
    head = "no successful trial yet" if best is None else (
        f"best trial {best['trial']}: score {best['score']:.6g}, objectives "
        + ", ".join(_fmt(v) for v in best["objectives"]))
    return head + "\n" + "\n".join(f"wrote {f}" for f in report["files"])


__all__ = ["best_trial", "find_trial", "make_report", "format_summary"]
