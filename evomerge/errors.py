"""User-facing errors.

Anything the user can fix (a bad recipe, a missing file, mismatched models) raises ``EvomergeError``.
The command line prints its message as one line and exits with code 2, never with a traceback.
"""


class EvomergeError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2
