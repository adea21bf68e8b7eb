"""HDF5 access shared by Caffe's HDF5 weights and solver states (Caffe's ``util/hdf5``).

h5py is an optional dependency: it is imported only when an HDF5 file is read or written
(:func:`h5py_module`), and its failures on a damaged file -- any exception type, at any
access -- become one located caffe-compat error (:func:`damaged_file_as`).
"""
from __future__ import annotations

import contextlib
import os
from typing import Iterator, Optional, Type

import numpy as np
import torch

from caffe_compat import limits
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, WeightsError, shorten
from caffe_compat.file_kind import HDF5_SIGNATURE, file_kind_hint

__all__ = ["h5py_module", "damaged_file_as", "looks_like_hdf5", "open_hdf5", "as_array",
           "check_group_size", "blob_index", "check_dataset"]


def h5py_module(error: Type[CaffeCompatError] = WeightsError, what: str = "HDF5 weights"):
    """The h5py module, or ``error`` saying how to install it (it is an optional dependency)."""
    try:
        import h5py
    except ImportError:
        raise error(f"{what} need the 'h5py' package, which is not installed: pip install h5py") from None
    return h5py


#: what h5py raises on damaged files, at any access (reading a group's size, a dataset, closing)
_H5_FAILURES = (OSError, KeyError, RuntimeError, ValueError, TypeError, OverflowError, IndexError)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _raised_in_h5py(e: BaseException) -> bool:
    """Whether ``e`` came out of h5py itself (a damaged file), not from copying the values
    (a CUDA out-of-memory error, a bug), which must keep its own type and message."""
    tb, last = e.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is not None and "h5py" in last.tb_frame.f_code.co_filename.split(os.sep)


@contextlib.contextmanager
def damaged_file_as(error: Type[CaffeCompatError], what: str, path: str) -> Iterator[None]:
    """h5py's own failures on a damaged file (any exception type, at any access, closing
    included) become one ``error``; everything else passes unchanged."""
    try:
        yield
    except CaffeCompatError:
        raise
    except _H5_FAILURES as e:
        if not _raised_in_h5py(e):
            raise
        raise error(f"corrupt {what}: {_first_line(e)}", where=path) from None


def looks_like_hdf5(path: str) -> bool:
    """Whether ``path`` starts with HDF5's signature (a readable HDF5 file at offset 0)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def open_hdf5(path: str, error: Type[CaffeCompatError], what: str,
              bad: Type[CaffeCompatError] = ParseError):
    """``h5py.File(path, "r")``, refusing a missing or unreadable file (``error``) or one that
    is not HDF5 (``bad``) clearly."""
    h5py = h5py_module(error, what)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise error(f"cannot read {what}: {e.strerror or e}", where=path) from None
    if os.path.isdir(path):
        raise error(f"is a directory, expected {what}", where=path)
    if not h5py.is_hdf5(path):
        hint = file_kind_hint(path) or " (Caffe reads any file whose name ends in .h5 as HDF5)"
        raise bad(f"not an HDF5 file, expected {what}{hint}", where=path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise bad(f"cannot open HDF5 file: {e}", where=path) from None


def as_array(t: torch.Tensor) -> np.ndarray:
    """A blob as Caffe's HDF5 writer stores it: float64 stays double, anything else float32."""
    t = t.detach()
    if t.dtype != torch.float64:
        t = t.float()
    return t.cpu().contiguous().numpy()


# ---------------------------------------------------------------------- metadata checks
# An HDF5 file declares shapes, entry counts and names in its metadata; chunked, compressed
# or never-written datasets make the declared size unrelated to the file's.  These checks
# read only metadata and run before any data is read.

def check_group_size(group, limit_name: str, what: str, path: str, *,
                     layer: Optional[str] = None) -> int:
    """The number of entries in ``group`` (from its metadata), refused over ``limit_name``
    before the entries are listed."""
    n = len(group)
    limit = limits.get(limit_name)
    if n > limit:
        raise LimitError(f"{what} has {n} entries, over the limit of {limit} "
                         f"({limits.how_to_raise(limit_name)})", where=path, layer=layer)
    return n


def blob_index(name: str, path: str, *, layer: Optional[str] = None) -> Optional[int]:
    """``j`` for a dataset named like a blob ("0", "1", ...), else None; an index past
    ``max_list_length`` (a name such as "1000000000000") is refused before any list is
    sized by it."""
    if not (name.isascii() and name.isdigit()) or (name != "0" and name.startswith("0")):
        return None
    limit = limits.get("max_list_length")
    if len(name) > len(str(limit)) or int(name) >= limit:  # (no int() of a 5000-digit name)
        raise LimitError(f"dataset name '{shorten(name, 40)}' is a blob index over the limit of "
                         f"{limit} blobs per layer ({limits.how_to_raise('max_list_length')})",
                         where=path, layer=layer)
    return int(name)


def check_dataset(ds, budget: "limits.FileBudget", *, name: str, layer: Optional[str] = None,
                  blob: Optional[int] = None, error: Type[CaffeCompatError] = WeightsError) -> int:
    """Charge dataset ``ds``'s declared shape (HDF5 metadata) to ``budget`` before reading it:
    its elements, the file's blob count and elements together.  Returns the element count."""
    shape = ds.shape if ds.shape is not None else (0,)  # (an HDF5 null dataspace holds nothing)
    try:
        return budget.blob(tuple(int(d) for d in shape), what=f"dataset '{shorten(name, 80)}'", layer=layer,
                           blob=blob, error=error)
    except CaffeCompatError as e:
        raise e.located(where=budget.where) from None
