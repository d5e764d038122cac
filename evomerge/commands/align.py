"""`evomerge align` (not built yet)."""

from evomerge.errors import EvomergeError


def add_arguments(parser):
    parser.add_argument("args", nargs="*")


def run(args) -> int:
    raise EvomergeError("'evomerge align' is not implemented yet")
