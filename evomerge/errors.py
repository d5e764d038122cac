"""User-facing errors.

Anything the user can fix (a bad recipe, a missing file, mismatched models) raises ``EvomergeError``.
The command line prints its message as one line and exits with code 2, never with a traceback.
A search that finished without one successful trial raises ``AllTrialsFailed`` (exit code 1).
"""


class EvomergeError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2


class AllTrialsFailed(EvomergeError):
    """A search ran, and every trial of it failed: one line (the count and the first failure's reason), exit
    code 1, distinct from bad input (2). The failed trials are recorded; the run folder stays resumable."""

    exit_code = 1


def check_keys(where: str, mapping, allowed: set[str]) -> dict:
    """``mapping`` itself, after checking that it is a mapping whose keys are all in ``allowed``
    (config sections are strict: a misspelt key is an error, never silently ignored)."""
    if not isinstance(mapping, dict):
        raise EvomergeError(f"{where} must be a mapping, got {type(mapping).__name__}")
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise EvomergeError(f"unknown key {unknown[0]!r} in {where} (allowed: {', '.join(sorted(allowed))})")
    return mapping
