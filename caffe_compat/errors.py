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
        if self.layer:  # names and values come from the input: quoted cut to a bounded size
            prefix += f"layer '{shorten(self.layer, 200)}': "
        if self.blob is not None:
            prefix += f"blob {self.blob}: "
        tail = ""
        if self._has_expected and self._has_got:
            tail = f" (expected {shorten(self.expected, 200)}, got {shorten(self.got, 200)})"
        elif self._has_expected:
            tail = f" (expected {shorten(self.expected, 200)})"
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


class SolverDefinitionError(SolverError):
    """A solver definition that breaks Caffe's rules (a field out of range, a rate that would
    overflow): bad input, refused before any net is built, so it exits 2 (``SolverError``'s
    failures at run time exit 1)."""

    exit_code = 2


class SolverStateError(SolverError):
    """A solver state (``.solverstate``, ``.solverstate.h5``) that cannot be restored: not a
    state, corrupt, over a limit, or not this net's.  Bad input, so it exits 2 (writing a
    state that fails is a ``SolverError``, exit 1)."""

    exit_code = 2


class InputError(DataError):
    """A value given as a net input (``forward``/``feed``) that is not blob data: strings,
    objects, complex numbers, integers a float blob cannot hold exactly."""


class SameFileError(CaffeCompatError):
    """An output that is the same file as one of the command's inputs (same path, a symlink
    or a hard link): writing it would replace the input, so nothing is written."""


class WriteError(CaffeCompatError, OSError):
    """Writing an output failed for lack of room (full disk, quota, file size limit); names
    the file and the bytes attempted.  Also an ``OSError`` with the original ``errno``.
    A failure at run time: exit 1."""

    exit_code = 1

    def __init__(self, message: str, *, errno: Optional[int] = None, **kw: Any):
        super().__init__(message, **kw)
        self.errno = errno

    def __reduce__(self):
        return (_rebuild_write, (type(self), self.__dict__.copy(), self.args, self.errno))


def _rebuild_write(cls, state, args, errno):
    err = _rebuild(cls, state, args)
    err.errno = errno
    return err


#: paths are quoted whole up to Linux's PATH_MAX: a user needs the exact path, and no real one is longer
PATH_WIDTH = 4096


def shorten(value: Any, width: int = 80) -> str:
    """``str(value)`` cut to about ``width`` characters (a message never quotes unbounded input)."""
    text = str(value)
    if len(text) <= width:
        return text
    return f"{text[:width]}... ({len(text)} characters)"


def name_list(names: Any, limit: int = 10, width: int = 80) -> str:
    """'a, b, c' of the first ``limit`` names (each ``shorten``-ed), then '... (N more)'."""
    shown, count = [], 0
    for n in names:
        if count < limit:
            shown.append(shorten(n, width))
        count += 1
    more = f", ... ({count - limit} more)" if count > limit else ""
    return ", ".join(shown) + more
