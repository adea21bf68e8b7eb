"""One error tree for everything caffe-compat refuses.

Every error says *where* (file:line:col, layer name, blob index) and *what was expected*,
so the CLI can print one line and exit non-zero.  Code that catches ``CaffeCompatError``
catches every refusal of bad input; anything else escaping is a bug.

The message is built from structured parts, which stay available as attributes::

    <where>: layer '<layer>': blob <i>: <message> (expected <expected>, got <got>)

``exit_code`` is 2 for bad input (the default) and 1 for failures at run time
(``SolverError``, ``LimitError`` raised while running, ...).
"""
from __future__ import annotations

from typing import Any, Optional

_UNSET: Any = object()


class CaffeCompatError(Exception):
    """Base of every error raised for bad input or a failed run.

    ``where``: a file (``path`` or ``path:line:col``); ``layer``: the Caffe layer name;
    ``blob``: a blob index within that layer; ``expected``/``got``: what the input should
    have been and what it was (appended to the message when given).
    ``exit_code`` is what the CLI exits with: 2 for bad input, 1 for failures at run time.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: Optional[str] = None, layer: Optional[str] = None,
                 blob: Optional[int] = None, expected: Any = _UNSET, got: Any = _UNSET):
        self.where = where
        self.layer = layer
        self.blob = blob
        self.message = message
        self.expected = None if expected is _UNSET else expected
        self.got = None if got is _UNSET else got
        self._has_expected = expected is not _UNSET
        self._has_got = got is not _UNSET
        super().__init__(self._format())

    def _format(self) -> str:
        prefix = ""
        if self.where:
            prefix += f"{self.where}: "
        if self.layer:
            prefix += f"layer '{self.layer}': "
        if self.blob is not None:
            prefix += f"blob {self.blob}: "
        tail = ""
        if self._has_expected and self._has_got:
            tail = f" (expected {self.expected}, got {self.got})"
        elif self._has_expected:
            tail = f" (expected {self.expected})"
        return prefix + self.message + tail

    def located(self, *, where: Optional[str] = None, layer: Optional[str] = None,
                blob: Optional[int] = None) -> "CaffeCompatError":
        """This error with missing location parts filled in (re-raise the result ``from None``).

        Parts the error already has win: the innermost code knows best where it failed.
        """
        if (where is None or self.where) and (layer is None or self.layer) \
                and (blob is None or self.blob is not None):
            return self
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.where = self.where or where
        new.layer = self.layer or layer
        new.blob = self.blob if self.blob is not None else blob
        new.args = (new._format(),)
        return new

    def __reduce__(self):
        # keep the parts across pickling (multiprocessing workers re-raise in the parent)
        return (_rebuild, (type(self), self.__dict__.copy(), self.args))

    def one_line(self) -> str:
        """The message on one line (what the CLI prints)."""
        return " ".join(str(self).split())


def _rebuild(cls, state, args):
    err = cls.__new__(cls)
    err.__dict__.update(state)
    err.args = args
    return err


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


class LimitError(CaffeCompatError):
    """An input over a resource limit (blob elements, file size), refused before allocation.

    The message names the limit and how to raise it (``caffe_compat.limits``).
    """


class SolverError(CaffeCompatError):
    """A bad solver definition or a training run that failed (e.g. NaN loss)."""

    exit_code = 1


class PythonLayerError(CaffeCompatError):
    """A ``type: "Python"`` layer that cannot be resolved or is not allowed to import."""
