"""The `evomerge` command line: a thin dispatcher over evomerge.commands.<name>."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from evomerge import __version__
from evomerge.commands import COMMANDS
from evomerge.errors import EvomergeError


def build_parser() -> argparse.ArgumentParser:
    """The `evomerge` parser: one sub-command per module of ``evomerge.commands``."""
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge optimization.")
    parser.add_argument("--version", action="version", version=f"evomerge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=f"evomerge.commands.{name}")
        _load(name).add_arguments(p)
    return parser


def _load(name: str):
    return importlib.import_module(f"evomerge.commands.{name}")


def main(argv: list[str] | None = None) -> int:
    """Run the `evomerge` command line.

    Args:
        argv: the arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code: 0 on success, 2 for an ``EvomergeError`` (printed as one line on stderr), 1 for
        ``AllTrialsFailed`` (a search whose every trial failed; one line too), 130 when interrupted. Other
        exceptions propagate with their traceback.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except EvomergeError as exc:
        print(f"evomerge {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"evomerge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
