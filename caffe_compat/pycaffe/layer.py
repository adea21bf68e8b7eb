"""pycaffe's ``Blob``, ``Layer`` and phase constants, in plain Python over numpy.

What a user's ``type: "Python"`` layer sees, as BVLC's pycaffe (and the Fast R-CNN fork's)
gives it:

- ``Blob``: ``.data`` / ``.diff`` float32 numpy arrays (read-only attributes whose
  contents are written in place, e.g. ``top[0].data[...] = x``), ``.shape``, ``.count``,
  the legacy ``.num/.channels/.height/.width`` (axes past the blob's end read 1) and
  ``.reshape(*shape)`` (contents kept when the count does not change, as Caffe does).
- ``Layer``: ``setup(bottom, top)``, ``reshape(bottom, top)``, ``forward(bottom, top)``,
  ``backward(top, propagate_down, bottom)``; attributes ``param_str`` (BVLC) and
  ``param_str_`` (the fork), ``phase`` and ``blobs`` (learnable blobs, grown with
  ``self.blobs.add_blob(*shape)``).
- ``phase``: BVLC gives an int (0 TRAIN, 1 TEST); the fork gives an enum whose ``str()``
  is ``'TRAIN'``/``'TEST'`` (py-faster-rcnn's ``cfg_key = str(self.phase)``).  ``Phase``
  is both: an ``int`` subclass whose ``str()`` is the name.
"""
from __future__ import annotations

import math
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np


class Phase(int):
    """Caffe's phase: equal to the int (0 TRAIN, 1 TEST); ``str()`` gives the name."""

    _NAMES = ("TRAIN", "TEST")

    def __new__(cls, value: int) -> "Phase":
        if int(value) not in (0, 1):
            raise ValueError(f"phase must be 0 (TRAIN) or 1 (TEST), got {value!r}")
        return super().__new__(cls, int(value))

    @classmethod
    def of(cls, phase: Any) -> "Phase":
        """From 0/1, 'TRAIN'/'TEST' (any case) or another Phase."""
        if isinstance(phase, str):
            try:
                return cls(cls._NAMES.index(phase.upper()))
            except ValueError:
                raise ValueError(f"unknown phase {phase!r}; allowed: TRAIN, TEST") from None
        return cls(int(phase))

    @property
    def name(self) -> str:
        return self._NAMES[int(self)]

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"caffe.{self.name}"

    def __format__(self, spec: str) -> str:
        return self.name if not spec else int.__format__(int(self), spec)


TRAIN = Phase(0)
TEST = Phase(1)


def _shape_of(args: Tuple[Any, ...]) -> Tuple[int, ...]:
    """``reshape(2, 3)`` as pycaffe, plus the forgiving ``reshape((2, 3))``."""
    if len(args) == 1 and isinstance(args[0], (tuple, list, np.ndarray)):
        args = tuple(args[0])
    shape = tuple(int(d) for d in args)
    if any(d < 0 for d in shape):
        raise ValueError(f"blob dimensions must be non-negative, got {shape}")
    return shape


class Blob:
    """A Caffe blob: ``data`` and ``diff`` arrays of one shape."""

    __slots__ = ("_data", "_diff", "_dtype")

    def __init__(self, *shape: int, dtype=np.float32):
        self._dtype = np.dtype(dtype)
        s = _shape_of(shape)
        self._data = np.zeros(s, self._dtype)
        self._diff = np.zeros(s, self._dtype)

    @classmethod
    def from_array(cls, data: np.ndarray, diff: Optional[np.ndarray] = None, dtype=np.float32) -> "Blob":
        """A blob holding a copy of ``data`` (and ``diff``, else zeros)."""
        b = cls(dtype=dtype)
        b._data = np.array(data, dtype=b._dtype, copy=True, order="C")
        b._diff = (np.zeros_like(b._data) if diff is None
                   else np.array(diff, dtype=b._dtype, copy=True, order="C").reshape(b._data.shape))
        return b

    # -- pycaffe's properties
    @property
    def data(self) -> np.ndarray:
        return self._data

    @property
    def diff(self) -> np.ndarray:
        return self._diff

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def count(self) -> int:
        return int(math.prod(self._data.shape))

    def _legacy(self, index: int) -> int:
        nd = self._data.ndim
        if nd > 4:
            raise ValueError(f"legacy accessors (num/channels/height/width) need a blob of at most "
                             f"4 axes, this one has shape {self.shape}")
        return int(self._data.shape[index]) if index < nd else 1

    num = property(lambda self: self._legacy(0))
    channels = property(lambda self: self._legacy(1))
    height = property(lambda self: self._legacy(2))
    width = property(lambda self: self._legacy(3))

    def reshape(self, *shape: int) -> None:
        """Caffe's ``Blob::Reshape``: new shape; contents kept if the count is unchanged."""
        s = _shape_of(shape)
        if math.prod(s) == self._data.size:
            self._data = self._data.reshape(s)
            self._diff = self._diff.reshape(s)
        else:
            self._data = np.zeros(s, self._dtype)
            self._diff = np.zeros(s, self._dtype)

    # -- for the shim
    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def retype(self, dtype) -> None:
        """Switch the element type (float32 normally; float64 when a net runs in float64)."""
        dtype = np.dtype(dtype)
        if dtype != self._dtype:
            self._dtype = dtype
            self._data = self._data.astype(dtype)
            self._diff = self._diff.astype(dtype)

    def set_data(self, array: np.ndarray) -> None:
        """Replace the contents (and shape) with a copy of ``array``."""
        self._data = np.array(array, dtype=self._dtype, copy=True, order="C")
        if self._diff.shape != self._data.shape:
            self._diff = np.zeros_like(self._data)

    def set_diff(self, array: Optional[np.ndarray]) -> None:
        """Replace the diff (zeros when None), keeping the data's shape."""
        if array is None:
            self._diff = np.zeros_like(self._data)
        else:
            self._diff = np.array(array, dtype=self._dtype, copy=True, order="C").reshape(self._data.shape)

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


class BlobVec(list):
    """A layer's learnable blobs (pycaffe's ``BlobVec``); ``add_blob(*shape)`` appends one."""

    def add_blob(self, *shape: int) -> None:
        self.append(Blob(*shape))


class Layer:
    """Base class of user Python layers (``caffe.Layer``).

    Built as Caffe builds it: ``Layer(layer_param)``; then the runner sets ``param_str``,
    ``param_str_`` and ``phase`` and calls ``setup`` and ``reshape``.
    """

    def __init__(self, param: Any = None):
        self.layer_param = param
        python_param = getattr(param, "python_param", None)
        text = python_param.param_str if python_param is not None else ""
        self.param_str = text
        self.param_str_ = text
        phase = getattr(param, "phase", 1) if param is not None else 1
        self.phase = Phase.of(phase)

    @property
    def blobs(self) -> BlobVec:
        """Learnable blobs; created on first use so subclasses may skip ``__init__``."""
        d = self.__dict__
        if "_blobs" not in d:
            d["_blobs"] = BlobVec()
        return d["_blobs"]

    @property
    def type(self) -> str:
        return "Python"

    def setup(self, bottom: List[Blob], top: List[Blob]) -> None:
        """Once, at net build (Caffe's ``LayerSetUp``)."""

    def reshape(self, bottom: List[Blob], top: List[Blob]) -> None:
        """Before every forward: reshape the tops for the bottoms' shapes."""

    def forward(self, bottom: List[Blob], top: List[Blob]) -> None:
        """Fill ``top[i].data`` from ``bottom[i].data``."""

    def backward(self, top: List[Blob], propagate_down: Sequence[bool], bottom: List[Blob]) -> None:
        """Fill ``bottom[i].diff`` (where ``propagate_down[i]``) from ``top[i].diff``."""
