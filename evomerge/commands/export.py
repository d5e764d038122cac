"""`evomerge export DIR --out PATH [--trial best|ID]`: a trial as a checkpoint (see evomerge/search/export.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="a run folder")
    parser.add_argument("--out", required=True, metavar="PATH", help="checkpoint folder to write")
    parser.add_argument("--trial", default="best", help="'best' (default) or a trial id")
    parser.add_argument("--overwrite", action="store_true", help="replace PATH if it exists")


def run(args: argparse.Namespace) -> int:
    """Export the chosen trial of a run folder as a checkpoint. Returns 0."""
    # torch and transformers load only when this command runs, not for every CLI call
    from evomerge.search.experiment import experiment_from_resolved
    from evomerge.search.export import export_trial
    from evomerge.search.report import find_trial
    from evomerge.search.run_folder import RunFolder

    run_folder = RunFolder.open(args.run_dir)
    record = find_trial(run_folder.trials(), args.trial)
    exp = experiment_from_resolved(run_folder.config())
    out = export_trial(run_folder, exp, record, args.out, overwrite=args.overwrite)
    print(f"exported trial {record.trial} (score {record.score:.6g}) to {out}")
    return 0
