"""`evomerge run` (not built yet)."""

from evomerge.errors import EvomergeError


def add_arguments(parser):
    parser.add_argument("args", nargs="*")


def run(args) -> int:
    raise EvomergeError("'evomerge run' is not implemented yet")
