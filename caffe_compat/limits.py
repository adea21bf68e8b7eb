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

from caffe_compat.errors import CaffeCompatError, LimitError, ShapeError

#: name -> (environment variable, default)
LIMITS: Dict[str, tuple] = {
    # elements of one blob (weights in a file, or a shape a definition declares): 2^31
    # float32 values are 8 GiB; VGG16's largest blob has 1.0e8
    "max_blob_elements": ("CAFFE_COMPAT_MAX_BLOB_ELEMENTS", 2 ** 31),
    # bytes of a text prototxt / solver file (the largest real ones are a few MB)
    "max_text_bytes": ("CAFFE_COMPAT_MAX_PROTOTXT_BYTES", 64 * 2 ** 20),
    # elements of all blobs of one weights/solver-state file together, or of one net's
    # parameters and inputs (what building it allocates): 2^28 float32 values are 1 GiB, so a
    # definition within the limits builds in bounded memory; VGG16 has 1.4e8 parameters (the
    # most in the corpus), ResNet-152 6.0e7
    "max_total_elements": ("CAFFE_COMPAT_MAX_TOTAL_ELEMENTS", 2 ** 28),
    # layers of one net definition or weights file (ResNet-152 has ~900, the largest
    # detection nets a few thousand); 2^18 lets a 200,000-layer net build (about 10 KB of
    # memory per layer, so at most ~2.5 GB)
    "max_layers": ("CAFFE_COMPAT_MAX_LAYERS", 2 ** 18),
    # blobs of one weights or solver-state file together (VGG16 has 32, ResNet-152 ~2,000)
    "max_blobs": ("CAFFE_COMPAT_MAX_BLOBS", 100_000),
    # values of one repeated field of a layer definition: tops, bottoms, param specs, blobs,
    # include rules, slice points... (the corpus's longest list has 6)
    "max_list_length": ("CAFFE_COMPAT_MAX_LIST_LENGTH", 65_536),
    # bytes of one YAML text: a Python layer's param_str or a py-faster-rcnn cfg file (the
    # corpus's longest is under 1 KB)
    "max_yaml_bytes": ("CAFFE_COMPAT_MAX_YAML_BYTES", 2 ** 20),
}

#: Caffe's ``kMaxBlobAxes`` (blob.hpp): a blob has at most 32 axes, in a file or a definition
MAX_BLOB_AXES = 32

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
                error: Type[CaffeCompatError] = LimitError, limit: Optional[int] = None) -> int:
    """Refuse negative dimensions and shapes over ``max_blob_elements``; returns the count.

    Meant for every place a shape comes from a file (weights, Input/DummyData shapes,
    a layer's ``num_output``) before memory for it is allocated.  ``limit``: the value of
    ``max_blob_elements`` when the caller has read it already.
    """
    dims = tuple(int(d) for d in shape)
    if len(dims) > MAX_BLOB_AXES:  # Caffe's rule, not a resource limit: not a LimitError
        raise (ShapeError if error is LimitError else error)(
            f"{what} has {len(dims)} axes; Caffe allows at most {MAX_BLOB_AXES} (kMaxBlobAxes)",
            where=where, layer=layer, blob=blob)
    if any(d < 0 for d in dims):
        raise error(f"{what} has a negative dimension in shape {dims}", where=where, layer=layer,
                    blob=blob)
    count = element_count(dims)
    limit = max_blob_elements() if limit is None else limit
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


def _check_count(name: str, value: int, message: str, *, where: Optional[str] = None,
                 layer: Optional[str] = None, blob: Optional[int] = None) -> None:
    """Refuse ``value`` over limit ``name``; ``message`` may use ``{limit}``."""
    limit = get(name)
    if value > limit:
        raise LimitError(f"{message.format(limit=limit)} ({how_to_raise(name)})", where=where,
                         layer=layer, blob=blob)


class FileBudget:
    """What one file may declare in all: layers, blobs, and their elements together.

    A reader charges each layer and each blob *as its metadata is read*, before the blob's
    data is touched, so a file whose blobs each fit but together are absurd (or that
    declares a million empty layers) is refused before it costs memory.  One object per
    file read; ``where`` is the file.  ``per_param``: blobs a file may hold per parameter of
    a net within the limits (2 for solver states: Caffe's Adam keeps two history blobs per
    parameter), which multiplies ``max_total_elements``.
    """

    def __init__(self, where: Optional[str] = None, *, per_param: int = 1):
        self.where = where
        self.per_param = per_param
        self.layers = 0
        self.blobs = 0
        self.elements = 0

    def layer(self, *, layer: Optional[str] = None) -> None:
        """Count one more layer (``max_layers``)."""
        self.layers += 1
        _check_count("max_layers", self.layers, "the file has more than {limit} layers",
                     where=self.where, layer=layer)

    def count_blob(self, *, layer: Optional[str] = None, blob: Optional[int] = None) -> None:
        """Count one more blob (``max_blobs``), for a reader that has not read its shape yet."""
        self.blobs += 1
        _check_count("max_blobs", self.blobs, "the file has more than {limit} blobs",
                     where=self.where, layer=layer, blob=blob)

    def axes(self, naxes: int, *, what: str = "blob", layer: Optional[str] = None,
             blob: Optional[int] = None, error: Type[CaffeCompatError] = LimitError) -> None:
        """Refuse more than Caffe's ``kMaxBlobAxes`` (32) axes (a reader may call this while
        still collecting dimensions, to stop early)."""
        if naxes > MAX_BLOB_AXES:
            raise error(f"{what} has {naxes} axes; Caffe allows at most {MAX_BLOB_AXES} "
                        "(kMaxBlobAxes)", where=self.where, layer=layer, blob=blob)

    def blob(self, shape: Sequence[int], *, what: str = "blob", layer: Optional[str] = None,
             blob: Optional[int] = None, error: Type[CaffeCompatError] = LimitError) -> int:
        """Charge one blob of ``shape``: its axes, its elements (``max_blob_elements``), the
        file's blob count (``max_blobs``) and elements together (``max_total_elements``).
        ``error`` is the class for a negative dimension or too many axes.  Returns the count."""
        dims = tuple(shape)
        self.axes(len(dims), what=what, layer=layer, blob=blob, error=error)
        count = check_shape(dims, what=what, where=self.where, layer=layer, blob=blob, error=error)
        self.count_blob(layer=layer, blob=blob)
        self.elements += count
        limit = get("max_total_elements") * self.per_param
        if self.elements > limit:
            times = f"{self.per_param} x max_total_elements for this file; " if self.per_param != 1 else ""
            raise LimitError(f"{what} shape {dims} brings the file's blobs to {self.elements} elements "
                             f"together, over the limit of {limit} ({times}{how_to_raise('max_total_elements')})",
                             where=self.where, layer=layer, blob=blob)
        return count


class NetBudget:
    """What building one net may allocate in all: its parameters and its inputs.

    The net builder makes one per net and every layer charges it *before* allocating a blob
    (``Layer.add_blob``, a DummyData top) and the builder charges the tops a forward makes
    from nothing (inputs, data layers), so a definition whose blobs each fit but together are
    absurd (five InnerProduct layers of 2 GB each) is refused before the memory is taken.
    ``key`` makes a charge idempotent (a top charged by its layer is not charged again).
    """

    def __init__(self, where: Optional[str] = None):
        self.where = where
        self.elements = 0
        self._keys: set = set()
        # read once per net (a build checks every top: the environment is not re-read each time)
        self.blob_limit = get("max_blob_elements")
        self.total_limit = get("max_total_elements")

    def check(self, shape: Sequence[int], *, what: str = "blob", layer: Optional[str] = None,
              error: Type[CaffeCompatError] = LimitError) -> int:
        """``check_shape`` under this net's limits, charging nothing (a top a layer computes)."""
        return check_shape(shape, what=what, where=self.where, layer=layer, error=error,
                           limit=self.blob_limit)

    def charge(self, shape: Sequence[int], *, what: str = "blob", layer: Optional[str] = None,
               key: Optional[tuple] = None, error: Type[CaffeCompatError] = LimitError) -> int:
        """Check ``shape`` (``check_shape``; ``error`` for a negative dimension) and add it to
        the net's total (``max_total_elements``); returns its element count."""
        count = self.check(shape, what=what, layer=layer, error=error)
        if key is not None:
            if key in self._keys:
                return count
            self._keys.add(key)
        total = self.elements + count
        limit = self.total_limit
        if total > limit:
            raise LimitError(f"{what} shape {tuple(int(d) for d in shape)} ({count} elements) brings the "
                             f"net's parameters and inputs to {total} elements together, over the limit "
                             f"of {limit} ({how_to_raise('max_total_elements')})", where=self.where,
                             layer=layer)
        self.elements = total
        return count

    def refund(self, count: int) -> None:
        """Give back ``count`` elements (a blob that was dropped, e.g. replaced by a shared one)."""
        self.elements -= int(count)
