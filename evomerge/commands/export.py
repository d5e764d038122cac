"""`evomerge export` (not built yet)."""

from evomerge.errors import EvomergeError


def add_arguments(parser):
    parser.add_argument("args", nargs="*")


def run(args) -> int:
    raise EvomergeError("'evomerge export' is not implemented yet")
