"""`evomerge eval` (not built yet)."""

from evomerge.errors import EvomergeError


def add_arguments(parser):
    parser.add_argument("args", nargs="*")


def run(args) -> int:
    raise EvomergeError("'evomerge eval' is not implemented yet")
