"""What a net input may be: numbers a Caffe blob (float) can hold, checked before a forward.

Caffe's blobs are float; pycaffe converts whatever is assigned to ``blob.data[...]`` through
numpy.  Here an input converts when it converts *without loss*: float arrays and tensors of
any precision (cast to the net's float type, as pycaffe casts to float32), booleans, and
integers whose magnitude the float type holds exactly (up to 2**24 for float32).  Anything
else is one :class:`~caffe_compat.errors.InputError` naming the input, what it got and what
is expected: strings, ``None``, objects, complex numbers (numpy would drop the imaginary part
with a warning), dates, ragged lists, integers a float blob would round.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import InputError

__all__ = ["as_blob_tensor", "as_blob_array", "describe"]

_EXPECTED = ("numbers a float blob holds: a float, integer or boolean tensor or numpy array "
             "(or nested lists of numbers)")


def describe(x: Any) -> str:
    """A short description of a value for a message (never the value itself, which may be huge)."""
    if isinstance(x, Tensor):
        return f"a {str(x.dtype).replace('torch.', '')} tensor of shape {tuple(x.shape)}"
    if isinstance(x, np.ndarray):
        return f"a numpy array of dtype {x.dtype} and shape {x.shape}"
    if x is None:
        return "None"
    if isinstance(x, (str, bytes)):
        return f"a {type(x).__name__} of {len(x)} characters" if isinstance(x, str) else \
            f"bytes ({len(x)})"
    if isinstance(x, (list, tuple)):
        kinds = sorted({type(v).__name__ for v in x[:100]})
        return f"a {type(x).__name__} of {len(x)} item(s) ({', '.join(kinds[:4]) or 'empty'})"
    return f"a {type(x).__name__}"


def _exact_limit(dtype: torch.dtype) -> int:
    """The largest integer ``dtype`` (a float type) holds exactly, with all below it."""
    return int(round(2 / torch.finfo(dtype).eps))


def _check_integers(name: str, lo: int, hi: int, dtype: torch.dtype, got: str) -> None:
    limit = _exact_limit(dtype)
    if lo < -limit or hi > limit:
        worst = hi if hi > limit else lo
        raise InputError(f"input '{name}' holds the integer {worst}, which a "
                         f"{str(dtype).replace('torch.', '')} blob cannot hold exactly (integers up to "
                         f"{limit} in magnitude convert without loss); Caffe blobs are float: convert "
                         f"the data to floats yourself if rounding is meant",
                         expected=f"integers within +-{limit}", got=got)


def as_blob_array(name: str, x: Any) -> np.ndarray:
    """``x`` as a numeric numpy array (bool, integer or float kind), or an InputError."""
    if isinstance(x, (str, bytes)) or x is None:
        raise InputError(f"input '{name}' is not numeric data", expected=_EXPECTED, got=describe(x))
    try:
        arr = np.asarray(x)
    except (ValueError, TypeError) as e:  # ragged nested lists, objects numpy refuses
        reason = " ".join(str(e).split())[:200]
        raise InputError(f"input '{name}' does not convert to an array ({reason})",
                         expected=_EXPECTED, got=describe(x)) from None
    if arr.dtype.kind not in "biuf":
        what = {"c": "complex numbers (a blob has no imaginary part)", "U": "strings, not numbers",
                "S": "bytes, not numbers", "O": "Python objects, not numbers", "M": "dates, not numbers",
                "m": "time spans, not numbers", "V": "raw records, not numbers"}
        raise InputError(f"input '{name}' holds {what.get(arr.dtype.kind, arr.dtype.name)}",
                         expected=_EXPECTED, got=describe(x if isinstance(x, np.ndarray) else arr))
    return arr


def as_blob_tensor(name: str, x: Any, dtype: torch.dtype, device: Optional[torch.device] = None, *,
                   keep_float: bool = False) -> Tensor:
    """``x`` as a tensor a net can take for input ``name``.

    A float tensor of ``dtype`` is returned as it is (no copy, autograd intact); another float
    tensor is cast to ``dtype`` (differentiably), or kept as it is with ``keep_float`` (a net
    without parameters has no float type of its own).  Boolean and integer tensors and arrays
    are cast to ``dtype`` when every value converts exactly.  Everything else is refused.
    """
    if isinstance(x, Tensor):
        if x.is_complex():
            raise InputError(f"input '{name}' holds complex numbers (a blob has no imaginary part)",
                             expected=_EXPECTED, got=describe(x))
        if x.is_floating_point():
            return x if (keep_float or x.dtype == dtype) else x.to(dtype)
        if x.dtype != torch.bool and x.numel():
            _check_integers(name, int(x.min()), int(x.max()), dtype, describe(x))
        return x.to(dtype)
    arr = as_blob_array(name, x)
    if arr.dtype.kind in "iu" and arr.size:
        _check_integers(name, int(arr.min()), int(arr.max()), dtype, describe(arr))
    return torch.as_tensor(arr, dtype=dtype, device=device)
