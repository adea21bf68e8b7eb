"""One error tree for everything caffe-compat refuses.

Every error says *where* (file:line:col, layer name, blob index) and *what was expected*,
so the CLI can print one line and exit non-zero.  Code that catches ``CaffeCompatError``
catches every refusal of bad input; anything else escaping is a bug.
"""
from __future__ import annotations

from typing import Optional


class CaffeCompatError(Exception):
    """Base of every error raised for bad input or a failed run.

    ``exit_code`` is what the CLI exits with: 2 for bad input, 1 for failures at run time.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: Optional[str] = None, layer: Optional[str] = None):
        self.where = where
        self.layer = layer
        self.message = message
        prefix = ""
        if where:
            prefix += f"{where}: "
        if layer:
            prefix += f"layer '{layer}': "
        super().__init__(prefix + message)


class ParseError(CaffeCompatError):
    """A prototxt or binary file that does not parse (``where`` is file:line:col)."""


class SchemaError(CaffeCompatError):
    """A parsed definition that violates Caffe's schema or cannot be upgraded."""


UpgradeError = SchemaError


class GraphError(CaffeCompatError):
    """Bad wiring: missing bottoms, duplicate tops, unknown layer types."""


class UnknownLayerError(GraphError):
    """A layer type that no registered implementation serves."""


class ShapeError(CaffeCompatError):
    """Blob shapes that a layer cannot accept."""


class WeightsError(CaffeCompatError):
    """A weight file that does not match the net (names, counts, shapes) or is corrupt."""


class DataError(CaffeCompatError):
    """A data source that is missing or unreadable."""


class SolverError(CaffeCompatError):
    """A bad solver definition or a training run that failed (e.g. NaN loss)."""

    exit_code = 1


class PythonLayerError(CaffeCompatError):
    """A ``type: "Python"`` layer that cannot be resolved or is not allowed to import."""
