"""The mini EvoLLM study: does the verdict hold for every zoo seed and on every CPU instruction set?

    python experiments/mini_evollm/study.py            # zoo seeds 0,1,2 x {avx512 (default dispatch), avx2}

For each zoo seed and instruction set it runs, in a fresh process with that instruction set forced before torch
is imported (``ISA_ENV`` below), the main job's pieces (run.py): the zoo build (cached per seed AND instruction
set), the sources and the no-search TIES / DARE-TIES merges, and PS over the search seeds, then applies the
verdict rule (run.verdict_reached: every PS seed's winner beats every source and no-search merge on the held-out
target with a paired bootstrap 95% interval above 0). Each finished row is kept in
``OUT/<isa>-zoo<seed>/row.json``, so a rerun skips it (``--redo`` reruns it). At the end it writes the committed
summary, experiments/mini_evollm/STUDY.md (``--summary`` elsewhere): a row per zoo seed and instruction set, the
spread across rows, and whether the forced instruction set really changed the numbers (the zoo's weights).

Forcing a lower instruction set needs a CPU that has the higher one too (``avx512`` rows on an AVX2-only machine
run with AVX2 kernels; the row records what torch reported, and the summary says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as mini_run  # noqa: E402

# the instruction-set caps, set in the child's environment before torch is imported: torch's own kernels (ATen
# dispatch), oneDNN (both its names) and MKL
ISA_ENV = {
    "avx512": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "DNNL_MAX_CPU_ISA": "AVX2",
             "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
}
ISA_KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


@dataclass(frozen=True)
class StudySettings:
    """What one study runs: zoo seeds x instruction sets, each with PS over ``search_seeds``."""

    zoo_seeds: tuple[int, ...]
    isas: tuple[str, ...]
    search_seeds: tuple[int, ...]
    ps_trials: int
    workers: int
    tiny: bool = False  # the test-sized zoo and budgets (a pipeline test, not the science)


def log(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def isa_env(isa: str) -> dict[str, str]:
    """The child's environment for ``isa``: this one without any cap, plus ``isa``'s caps."""
    env = {k: v for k, v in os.environ.items() if k not in ISA_KEYS}
    env.update(ISA_ENV[isa])
    return env


def run_row(settings: StudySettings, zoo_seed: int, isa: str, out: Path, cache: Path | None) -> dict:
    """One zoo seed on one instruction set, through run.py in a fresh process; returns the row (row.json)."""
    folder = out / f"{isa}-zoo{zoo_seed}"
    cmd = [sys.executable, str(HERE / "run.py"), "--zoo-seed", str(zoo_seed), "--skip", "dfs,ps_dfs",
           "--multi", "never", "--seeds", ",".join(map(str, settings.search_seeds)),
           "--ps-trials", str(settings.ps_trials), "--workers", str(settings.workers), "--out", str(folder)]
    if settings.tiny:
        cmd += ["--tiny-zoo"]
    env = isa_env(isa)
    if cache is not None:
        env["MINI_EVOLLM_CACHE"] = str(cache)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(folder / "run.log", "w") as fh:
        rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        raise RuntimeError(f"{isa} zoo seed {zoo_seed}: run.py exited with {rc} (see {folder / 'run.log'})")
    ctx = json.loads((folder / "results_ctx.json").read_text())
    row = summarize(ctx, zoo_seed, isa)
    row["wall_s"] = time.perf_counter() - t0
    (folder / "row.json").write_text(json.dumps(row, indent=1))
    return row


def summarize(ctx: dict, zoo_seed: int, isa: str) -> dict:
    """The study's row from run.py's results_ctx.json: accuracies (%), PS's worst interval, the verdict."""
    rows = ctx["rows"]
    acc = {r["label"]: 100 * r["metrics"]["target_test/accuracy"] for r in rows}
    ps = [s for s in ctx["searches"] if s["name"] == "ps"]
    others = [r for r in rows if r["kind"] in ("source", "merge")]
    worst = min(mini_run.bootstrap_diff(s["per_item"], r["per_item"])[1] for s in ps for r in others)
    return {"zoo_seed": zoo_seed, "isa": isa, "isa_reported": ctx.get("isa"), "zoo_path": ctx["zoo_path"],
            "base": acc["base (bilingual, no fine-tune)"], "A": acc["A: language-1 math"],
            "B": acc["B: language-2 text"], "TIES": acc["TIES, no search"],
            "DARE-TIES": acc["DARE-TIES, no search"],
            "PS": [100 * s["metrics"]["target_test/accuracy"] for s in ps],
            "PS_search": [s["search_score"] for s in ps], "worst_lower": worst,
            "verdict": mini_run.verdict_reached(ps, rows), "ps_trials": [s["trials"] for s in ps],
            "n_test": len(ps[0]["per_item"])}


def weight_difference(zoo_a: Path, zoo_b: Path) -> dict[str, float] | None:
    """How far two zoos' specialist-A weights are apart: the largest |difference| and the share of differing
    elements over all tensors (None when either zoo is missing)."""
    from safetensors.numpy import load_file

    fa, fb = zoo_a / "spec_a" / "model.safetensors", zoo_b / "spec_a" / "model.safetensors"
    if not (fa.is_file() and fb.is_file()):
        return None
    a, b = load_file(str(fa)), load_file(str(fb))
    diff, differing, total = 0.0, 0, 0
    for k, v in a.items():
        d = abs(v.astype("float64") - b[k].astype("float64"))
        diff = max(diff, float(d.max()))
        differing += int((d > 0).sum())
        total += d.size
    return {"max_abs": diff, "share_differing": differing / max(1, total)}


COLUMNS = ("base", "A", "B", "TIES", "DARE-TIES")


def write_summary(path: Path, settings: StudySettings, rows: list[dict], missing: list[str],
                  isa_check: list[str], command: str) -> None:
    """STUDY.md: the per-row table, the spread across rows, the instruction-set check, what is missing."""
    n_test = " / ".join(str(n) for n in sorted({r.get("n_test", 500) for r in rows})) or "?"
    lines = ["# Mini EvoLLM study: zoo seeds x instruction sets", "",
             "Written by `experiments/mini_evollm/study.py` (numbers from the run that wrote this file).", "",
             f"Command: `{command}`  ",
             f"Zoo seeds {list(settings.zoo_seeds)}, instruction sets {list(settings.isas)}; per row: the zoo "
             f"(built for that seed and instruction set), the sources, the no-search merges, PS over search seeds "
             f"{list(settings.search_seeds)} ({settings.ps_trials} trials each, {settings.workers} workers).", "",
             f"Held-out target test accuracy % (language-2 math, gated, {n_test} items). Verdict rule: every PS seed's "
             "winner beats every source and both no-search merges, paired bootstrap 95% interval (2000 "
             "resamples) above 0; `worst lower` is the smallest lower bound over all those pairs (points).", "",
             "| zoo seed | ISA | base | A | B | TIES | DARE-TIES | PS per seed | worst lower | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        isa = r["isa"] + ("" if r.get("isa_reported") in (None, r["isa"]) else f" (ran {r['isa_reported']})")
        lines.append(f"| {r['zoo_seed']} | {isa} | " + " | ".join(f"{r[c]:.1f}" for c in COLUMNS)
                     + f" | {' / '.join(f'{p:.1f}' for p in r['PS'])} | {r['worst_lower']:+.1f} | "
                     + ("reached" if r["verdict"] else "NOT REACHED") + " |")
    if rows:
        lines += ["", "## Spread across rows (min - max)", "", "| column | min | max |", "|---|---|---|"]
        for c in COLUMNS:
            vals = [r[c] for r in rows]
            lines.append(f"| {c} | {min(vals):.1f} | {max(vals):.1f} |")
        ps = [p for r in rows for p in r["PS"]]
        best_other = [max(r[c] for c in COLUMNS) for r in rows]
        lines += [f"| PS (every seed) | {min(ps):.1f} | {max(ps):.1f} |",
                  f"| best source or no-search merge | {min(best_other):.1f} | {max(best_other):.1f} |",
                  f"| worst lower bound | {min(r['worst_lower'] for r in rows):+.1f} | "
                  f"{max(r['worst_lower'] for r in rows):+.1f} |",
                  "", f"Verdict reached in {sum(r['verdict'] for r in rows)} of {len(rows)} rows."]
    lines += ["", "## Does the forced instruction set change the numbers?", "", *isa_check]
    if missing:
        lines += ["", "## Missing rows", "", *[f"- {m}" for m in missing]]
    path.write_text("\n".join(lines) + "\n")


def isa_checks(rows: list[dict], settings: StudySettings, cache: Path) -> list[str]:
    """One line per zoo seed run on two instruction sets: do the zoos' weights and the table differ?"""
    out = []
    by = {(r["zoo_seed"], r["isa"]): r for r in rows}
    for seed in settings.zoo_seeds:
        if len(settings.isas) < 2 or not all((seed, i) in by for i in settings.isas[:2]):
            continue
        ra, rb = (by[(seed, i)] for i in settings.isas[:2])
        d = weight_difference(cache / Path(ra["zoo_path"]).name, cache / Path(rb["zoo_path"]).name)
        same_table = all(ra[c] == rb[c] for c in COLUMNS) and ra["PS"] == rb["PS"]
        w = ("weights missing" if d is None else
             f"specialist A's weights differ in {100 * d['share_differing']:.1f}% of elements "
             f"(largest |difference| {d['max_abs']:.3g})")
        out.append(f"- zoo seed {seed}: {ra['isa']} ran {ra.get('isa_reported')}, {rb['isa']} ran "
                   f"{rb.get('isa_reported')}; {w}; the table is {'IDENTICAL' if same_table else 'different'}.")
    return out or ["- no zoo seed ran on two instruction sets"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo-seeds", default="0,1,2")
    ap.add_argument("--isas", default="avx512,avx2", help=f"comma-separated, from {sorted(ISA_ENV)}")
    ap.add_argument("--search-seeds", default="0,1,2")
    ap.add_argument("--ps-trials", type=int, default=mini_run.PS_TRIALS)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="runs/mini_evollm_study")
    ap.add_argument("--summary", default=str(HERE / "STUDY.md"))
    ap.add_argument("--redo", action="store_true", help="rerun rows that already have a row.json")
    ap.add_argument("--tiny", action="store_true", help="the test-sized zoo (a pipeline test, not the science)")
    ap.add_argument("--summary-only", action="store_true",
                    help="run nothing: write the summary from the rows already in OUT (the others listed as missing)")
    args = ap.parse_args(argv)
    settings = StudySettings(tuple(int(s) for s in args.zoo_seeds.split(",")), tuple(args.isas.split(",")),
                             tuple(int(s) for s in args.search_seeds.split(",")), args.ps_trials, args.workers,
                             args.tiny)
    out = Path(args.out)
    cache = Path(os.environ.get("MINI_EVOLLM_CACHE") or mini_run.zoo.DEFAULT_CACHE)
    command = "python " + " ".join(mini_run.portable(a) for a in
                                   ["experiments/mini_evollm/study.py", *(sys.argv[1:] if argv is None else argv)])
    rows, missing = [], []
    for seed in settings.zoo_seeds:
        for isa in settings.isas:
            done = out / f"{isa}-zoo{seed}" / "row.json"
            try:
                if done.is_file() and not args.redo:
                    row = json.loads(done.read_text())
                elif args.summary_only:
                    continue
                else:
                    log(f"zoo seed {seed}, {isa}: running")
                    row = run_row(settings, seed, isa, out, Path(os.environ["MINI_EVOLLM_CACHE"])
                                  if os.environ.get("MINI_EVOLLM_CACHE") else None)
                rows.append(row)
                log(f"zoo seed {seed}, {isa}: PS {row['PS']}, worst lower {row['worst_lower']:+.1f}, "
                    f"verdict {'reached' if row['verdict'] else 'NOT reached'}")
            except (RuntimeError, OSError, KeyError, ValueError) as e:
                missing.append(f"zoo seed {seed}, {isa}: failed: {e}")
                log(f"zoo seed {seed}, {isa}: FAILED: {e}")
            ran = {(r["zoo_seed"], r["isa"]) for r in rows}
            pending = [f"zoo seed {s}, {i}: not run yet" for s in settings.zoo_seeds for i in settings.isas
                       if (s, i) not in ran and not any(m.startswith(f"zoo seed {s}, {i}:") for m in missing)]
            write_summary(Path(args.summary), settings, rows, missing + pending, isa_checks(rows, settings, cache),
                          command)
    return 0 if rows and not missing and all(r["verdict"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
