"""Every merge method evomerge knows, by name: the one place recipes, ``evomerge merge`` and the engine look up.

Methods come in two kinds, each registered by ONE entry in a dict:

- per-tensor methods (``linear``, ``ties``, ``slerp``...): a ``MethodSpec`` in ``evomerge.methods.METHODS``,
  merged tensor by tensor by ``evomerge merge`` and the in-memory engine;
- data-aware methods (``fisher``, ``regmean``): a parameter table in
  ``evomerge.alignment.method_params.DATA_AWARE_METHODS`` (their merge is
  ``evomerge.alignment.recipe_methods.merge_data_aware``); they load whole models and run calibration data, so
  only ``evomerge merge`` runs them.

Every method module is reached by plain ``import`` statements (the per-tensor kernels through
``evomerge.methods``, the data-aware merges through ``evomerge.merge``), never by a name in a string: a method
module that fails to import stops the command with its own traceback instead of turning into an "unknown merge
method". An unknown name is an ``EvomergeError`` (exit code 2) whose one line lists every known method of both
kinds.
"""

from __future__ import annotations

from evomerge.alignment.method_params import DATA_AWARE_METHODS
from evomerge.errors import EvomergeError
from evomerge.methods import METHODS, MethodSpec

__all__ = ["get_method", "is_data_aware", "method_names", "unknown_method_error"]


def method_names() -> list[str]:
    """Every registered method name, per-tensor and data-aware, sorted alphabetically."""
    return sorted({*METHODS, *DATA_AWARE_METHODS})


def is_data_aware(name: str) -> bool:
    """Whether ``name`` is a data-aware method (``fisher``, ``regmean``: whole models plus calibration data)."""
    return name in DATA_AWARE_METHODS


def unknown_method_error(name: object) -> EvomergeError:
    """The one-line error for a name that is no registered method; it lists every known method."""
    return EvomergeError(f"unknown merge method {name!r}; known methods: {', '.join(method_names())}")


def get_method(name: str) -> MethodSpec:
    """The per-tensor method registered as ``name``.

    Args:
        name: a method name as a recipe writes it (``merge_method``), e.g. ``"ties"``.

    Returns:
        The method's ``MethodSpec`` (parameters, defaults, kernel family).

    Raises:
        EvomergeError: ``name`` is a data-aware method (it has no per-tensor kernel), or no method at all; the
            message lists every known method.
    """
    spec = METHODS.get(name)
    if spec is not None:
        return spec
    if is_data_aware(name):
        raise EvomergeError(f"merge method {name!r} is data-aware (whole models and calibration data): only "
                            f"'evomerge merge' runs it, not tensor by tensor")
    raise unknown_method_error(name)
