"""Resource limits for untrusted input, checked *before* anything is allocated.

A hostile or corrupt file can declare a blob of 10^12 elements or be a 20 GB "prototxt";
reading it must fail with one clear line, not exhaust memory.  Each limit has a default
that every real Caffe model fits under, an environment variable, and a programmatic way
to raise it::

    CAFFE_COMPAT_MAX_BLOB_ELEMENTS=8000000000 caffe-compat inspect big.prototxt
    with caffe_compat.limits.raised(max_blob_elements=8 * 10**9): ...
    caffe_compat.limits.set_limits(max_text_bytes=1 << 30)

Precedence: ``set_limits``/``raised`` over the environment over the default.  Values
are read at call time, so changing the environment in a running process works.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Dict, Iterator, Optional, Sequence, Type

from caffe_compat.errors import CaffeCompatError, LimitError

#: name -> (environment variable, default)
LIMITS: Dict[str, tuple] = {
    # elements of one blob (weights in a file, or a shape a definition declares): 2^31
    # float32 values are 8 GiB; VGG16's largest blob has 1.0e8
    "max_blob_elements": ("CAFFE_COMPAT_MAX_BLOB_ELEMENTS", 2 ** 31),
    # bytes of a text prototxt / solver file (the largest real ones are a few MB)
    "max_text_bytes": ("CAFFE_COMPAT_MAX_PROTOTXT_BYTES", 64 * 2 ** 20),
}

_overrides: Dict[str, int] = {}


def get(name: str) -> int:
    """The current value of limit ``name`` (see ``LIMITS``)."""
    if name not in LIMITS:
        raise KeyError(f"unknown limit {name!r}; limits are {', '.join(LIMITS)}")
    if name in _overrides:
        return _overrides[name]
    env, default = LIMITS[name]
    raw = os.environ.get(env, "").strip()
    if not raw:
        return default
    try:
        value = int(float(raw)) if ("e" in raw.lower() or "." in raw) else int(raw)
    except ValueError:
        raise LimitError(f"environment variable {env}={raw!r} is not a number") from None
    if value <= 0:
        raise LimitError(f"environment variable {env}={raw!r} must be positive")
    return value


def max_blob_elements() -> int:
    return get("max_blob_elements")


def max_text_bytes() -> int:
    return get("max_text_bytes")


def set_limits(**values: Optional[int]) -> None:
    """Set limits for this process (``None`` goes back to the environment/default)."""
    for k, v in values.items():
        if k not in LIMITS:
            raise KeyError(f"unknown limit {k!r}; limits are {', '.join(LIMITS)}")
        if v is None:
            _overrides.pop(k, None)
        else:
            _overrides[k] = int(v)


@contextlib.contextmanager
def raised(**values: int) -> Iterator[None]:
    """Temporarily set limits (e.g. ``with raised(max_blob_elements=10**10): ...``)."""
    saved = dict(_overrides)
    try:
        set_limits(**values)
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)


def how_to_raise(name: str) -> str:
    env, _ = LIMITS[name]
    return f"raise it with {env}=N or caffe_compat.limits.set_limits({name}=N)"


def element_count(shape: Sequence[int]) -> int:
    """Exact element count of ``shape`` (Python ints: no int64 overflow)."""
    return math.prod(int(d) for d in shape)


def check_shape(shape: Sequence[int], *, what: str = "blob", where: Optional[str] = None,
                layer: Optional[str] = None, blob: Optional[int] = None,
                error: Type[CaffeCompatError] = LimitError) -> int:
    """Refuse negative dimensions and shapes over ``max_blob_elements``; returns the count.

    Meant for every place a shape comes from a file (weights, Input/DummyData shapes,
    a layer's ``num_output``) before memory for it is allocated.
    """
    dims = tuple(int(d) for d in shape)
    if any(d < 0 for d in dims):
        raise error(f"{what} has a negative dimension in shape {dims}", where=where, layer=layer,
                    blob=blob)
    count = element_count(dims)
    limit = max_blob_elements()
    if count > limit:
        raise LimitError(f"{what} shape {dims} has {count} elements, over the limit of {limit} "
                         f"({how_to_raise('max_blob_elements')})", where=where, layer=layer, blob=blob)
    return count


def check_file_size(size: int, *, what: str = "text file", where: Optional[str] = None) -> None:
    """Refuse a text definition over ``max_text_bytes`` before reading it."""
    limit = max_text_bytes()
    if size > limit:
        raise LimitError(f"{what} is {size} bytes, over the limit of {limit} "
                         f"({how_to_raise('max_text_bytes')})", where=where)
