"""`evomerge report DIR`: best trials, the Pareto front as a table, PNG plots (see evomerge/search/report.py)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="DIR", help="a run folder (running, finished or killed)")
    parser.add_argument("--top", type=int, default=10, help="how many best trials to list (default 10)")


def run(args: argparse.Namespace) -> int:
    """Write the report files of a run folder and print the report. Returns 0."""
    # matplotlib and the search modules load only when this command runs, not for every CLI call
    from evomerge.search.report import format_summary, make_report

    report = make_report(args.run_dir, top=args.top)
    print(report.text)
    print(format_summary(report))
    return 0
