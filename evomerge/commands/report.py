"""`evomerge report` (not built yet)."""

from evomerge.errors import EvomergeError


def add_arguments(parser):
    parser.add_argument("args", nargs="*")


def run(args) -> int:
    raise EvomergeError("'evomerge report' is not implemented yet")
