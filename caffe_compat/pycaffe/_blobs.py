"""The blobs a pycaffe ``Net`` hands out: activations (``net.blobs``) and weights (``net.params``).

pycaffe's contract is that ``blob.data`` and ``blob.diff`` are numpy views of the net's
memory: writing into them (``net.blobs['data'].data[...] = img``,
``net.params['conv1'][0].data[...] = w``) changes what the net computes, and arrays held
across a forward see the new values.  The net itself runs in torch, so:

- :class:`NetBlob` (an activation) keeps float32 numpy buffers with Caffe's capacity rule
  (a reshape within the allocated size keeps the memory, a larger one reallocates zeros)
  plus, per side (data, diff), an optional *pending* torch tensor: the newest value a
  layer computed, copied into the numpy buffer only when the user asks for the array.
  Once an array has been handed out, later results are copied into it at once, so an
  array the script holds stays live, as in Caffe's CPU mode.
- :class:`ParamBlob` (a learnable or state blob) reads the layer's torch tensor itself: on
  the CPU in float32 ``data`` and ``diff`` are zero-copy numpy views of the parameter and
  of its ``.grad``; elsewhere (CUDA) they are host copies that are uploaded before the
  net runs next (:func:`upload_dirty`), Caffe's SyncedMemory behaviour in GPU mode.
"""
from __future__ import annotations

import math
import weakref
from typing import Iterable, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from caffe_compat.pycaffe.layer import Blob, BlobVec, _shape_of

_DIRTY: Set["ParamBlob"] = set()


def upload_dirty() -> None:
    """Copy host-side edits of device parameters (GPU mode) into the tensors."""
    while _DIRTY:
        _DIRTY.pop()._upload()


def _shareable(t: Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def _as_numpy(t: Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float32).numpy()


class NetBlob(Blob):
    """An activation blob of a pycaffe Net (see the module docstring)."""

    __slots__ = ("_bufs", "_pend", "_handed")

    def __init__(self, shape: Tuple[int, ...] = ()):
        self._dtype = np.dtype(np.float32)
        s = tuple(int(d) for d in shape)
        n = math.prod(s)
        self._bufs = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
        self._data = self._bufs[0][:n].reshape(s)
        self._diff = self._bufs[1][:n].reshape(s)
        self._pend: List[Optional[Tensor]] = [None, None]
        self._handed = [False, False]

    # ------------------------------------------------------------------ user side
    @property
    def data(self) -> np.ndarray:
        return self._array(0)

    @property
    def diff(self) -> np.ndarray:
        return self._array(1)

    def reshape(self, *shape: int) -> None:
        """Caffe's ``Blob::Reshape``: memory kept within capacity, zeros beyond it."""
        s = _shape_of(shape)
        if s == tuple(self._data.shape):
            return
        n = math.prod(s)
        for k in (0, 1):
            p = self._pend[k]
            if p is not None:
                if p.numel() >= n:
                    self._pend[k] = p.reshape(-1)[:n].reshape(s)
                else:
                    self._materialize(k)
        if n > self._bufs[0].size:
            self._bufs = [np.zeros(n, np.float32), np.zeros(n, np.float32)]
        self._data = self._bufs[0][:n].reshape(s)
        self._diff = self._bufs[1][:n].reshape(s)

    # ------------------------------------------------------------------ net side
    def _array(self, k: int) -> np.ndarray:
        self._materialize(k)
        self._handed[k] = True
        return self._data if k == 0 else self._diff

    def _materialize(self, k: int) -> None:
        p = self._pend[k]
        if p is None:
            return
        self._pend[k] = None
        np.copyto(self._data if k == 0 else self._diff, _as_numpy(p).reshape(self._data.shape))

    def _put(self, k: int, t: Tensor) -> None:
        """A layer's result for data (k=0) or diff (k=1); reshapes the blob as Caffe does."""
        t = t.detach()
        s = tuple(int(d) for d in t.shape)
        if s != tuple(self._data.shape):
            self.reshape(*s)
        if self._handed[k]:
            self._pend[k] = None
            np.copyto(self._data if k == 0 else self._diff, _as_numpy(t))
        else:
            self._pend[k] = t

    def _fill(self, k: int, value: float) -> None:
        self._pend[k] = None
        (self._data if k == 0 else self._diff).fill(value)

    def _current(self, k: int) -> "Tuple[Optional[Tensor], Optional[np.ndarray]]":
        """Where the current value is: a pending tensor, or else the numpy array."""
        p = self._pend[k]
        if p is not None:
            return p, None
        return None, (self._data if k == 0 else self._diff)

    def _tensor(self, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        """The current contents as a tensor the net may keep (never aliasing the numpy array)."""
        p = self._pend[k]
        if p is not None:
            return p if (p.device == device and p.dtype == dtype) else p.to(device=device, dtype=dtype)
        arr = self._data if k == 0 else self._diff
        t = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True, order="C"))
        return t if (t.device == device and t.dtype == dtype) else t.to(device=device, dtype=dtype)

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


class SplitTopBlob(NetBlob):
    """A top of an inserted split layer.  Its diff is its own; its data is its own memory
    until the split layer first runs forward, and from then on *is* the source blob's:
    Caffe's SplitLayer only reshapes its tops at set-up and calls ``ShareData`` in Forward,
    so before any forward (a script writing blobs by hand, then ``net.backward()``) each
    split top holds what was written into it."""

    __slots__ = ("_src", "_shared")

    def __init__(self, src: NetBlob):
        NetBlob.__init__(self, src.shape)
        self._src = src
        self._shared = False

    def share(self) -> None:
        """The split layer ran forward: from now on the data is the source's (ShareData)."""
        self._shared = True

    @property
    def shared(self) -> bool:
        return self._shared

    def _match(self) -> None:
        s = self._src.shape
        if tuple(self._data.shape) != s:
            NetBlob.reshape(self, *s)

    @property
    def data(self) -> np.ndarray:
        if self._shared:
            return self._src.data
        self._match()
        return self._array(0)

    @property
    def diff(self) -> np.ndarray:
        self._match()
        return self._array(1)

    @property
    def shape(self) -> Tuple[int, ...]:
        return self._src.shape

    @property
    def count(self) -> int:
        return self._src.count

    def _legacy(self, index: int) -> int:
        return self._src._legacy(index)

    def _put(self, k: int, t: Tensor) -> None:
        if k == 1 or not self._shared:
            NetBlob._put(self, k, t)

    def _fill(self, k: int, value: float) -> None:
        if k == 0 and self._shared:
            self._src._fill(0, value)
            return
        self._match()
        NetBlob._fill(self, k, value)

    def _current(self, k: int) -> "Tuple[Optional[Tensor], Optional[np.ndarray]]":
        if k == 0 and self._shared:
            return self._src._current(0)
        self._match()
        return NetBlob._current(self, k)

    def _tensor(self, k: int, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        if k == 0 and self._shared:
            return self._src._tensor(0, device, dtype)
        self._match()
        return NetBlob._tensor(self, k, device, dtype)


class ParamBlob(Blob):
    """A layer blob of a pycaffe Net, backed by the layer's torch parameter or buffer."""

    __slots__ = ("_module", "_attr", "_host")

    def __init__(self, module: nn.Module, attr: str):
        self._dtype = np.dtype(np.float32)
        self._module = module
        self._attr = attr
        self._host: List[Optional[np.ndarray]] = [None, None]

    def tensor(self) -> Tensor:
        """The torch tensor behind this blob (looked up each time: sharing may replace it)."""
        return getattr(self._module, self._attr)

    # ------------------------------------------------------------------ user side
    @property
    def data(self) -> np.ndarray:
        t = self.tensor()
        if _shareable(t):
            arr = t.detach().numpy()
            _hand_out(self._module, self._attr, arr)
            return arr
        return self._host_array(0, t)

    @property
    def diff(self) -> np.ndarray:
        t = self.tensor()
        if not isinstance(t, nn.Parameter):  # a buffer (e.g. BatchNorm statistics): no gradient
            if self._host[1] is None or self._host[1].shape != tuple(t.shape):
                self._host[1] = np.zeros(tuple(t.shape), np.float32)
            return self._host[1]
        if t.grad is None:
            with torch.no_grad():
                t.grad = torch.zeros_like(t, memory_format=torch.contiguous_format)
        g = t.grad
        if _shareable(g):
            return g.numpy()
        return self._host_array(1, g)

    @property
    def shape(self) -> Tuple[int, ...]:
        return tuple(int(d) for d in self.tensor().shape)

    @property
    def count(self) -> int:
        return int(self.tensor().numel())

    def _legacy(self, index: int) -> int:
        s = self.shape
        if len(s) > 4:
            raise ValueError(f"legacy accessors (num/channels/height/width) need a blob of at most "
                             f"4 axes, this one has shape {s}")
        return int(s[index]) if index < len(s) else 1

    def reshape(self, *shape: int) -> None:
        s = _shape_of(shape)
        if s != self.shape:
            raise ValueError(f"cannot reshape learnable blob '{self._attr}' of shape {self.shape} to "
                             f"{s}: the layer was built for its shape (build a net with the new "
                             "shape and copy the values over, as Caffe's net surgery does)")

    # ------------------------------------------------------------------ device copies
    def _host_array(self, k: int, t: Tensor) -> np.ndarray:
        h = self._host[k]
        if h is None or h.shape != tuple(t.shape):
            h = self._host[k] = np.array(_as_numpy(t), copy=True)
        _DIRTY.add(self)
        return h

    def _upload(self) -> None:
        t = self.tensor()
        with torch.no_grad():
            for k in (0, 1):
                h = self._host[k]
                self._host[k] = None
                if h is None:
                    continue
                dst = t if k == 0 else t.grad
                if dst is None:
                    continue
                dst.copy_(torch.from_numpy(h).reshape(dst.shape))

    def __repr__(self) -> str:
        return f"Blob(shape={self.shape})"


def _hand_out(module: nn.Module, attr: str, arr: np.ndarray) -> None:
    """Remember (weakly) an array sharing a parameter's memory that a script now holds."""
    refs = module.__dict__.setdefault("_handed_arrays", {}).setdefault(attr, [])
    refs[:] = [r for r in refs if r() is not None]
    refs.append(weakref.ref(arr))
    module.__dict__.setdefault("_handed_since_push", set()).add(attr)


def bump_held_params(modules: Iterable[nn.Module]) -> None:
    """Mark as changed the parameters whose arrays a script still holds.

    A numpy write into such an array (``w *= 3``, net surgery through a held
    ``net.params[...][0].data``) changes the tensor without bumping torch's version counter,
    and caches keyed on versions (the CPU inference plan's packed weights) would miss it.
    Arrays handed out since the last forward count too (a temporary one may have written
    before it went); arrays the script dropped cannot write any more, so once every one is
    gone nothing is bumped (``net.params['conv1'][0].data[...] = W`` costs one repack).
    """
    for m in modules:
        handed = m.__dict__.get("_handed_arrays")
        if not handed:
            continue
        fresh = m.__dict__.pop("_handed_since_push", set())
        for attr in list(handed):
            refs = [r for r in handed[attr] if r() is not None]
            if refs or attr in fresh:
                torch.autograd.graph.increment_version(getattr(m, attr))
            if refs:
                handed[attr] = refs
            else:
                del handed[attr]


def param_blobs(module: Optional[nn.Module]) -> BlobVec:
    """The layer's blobs in Caffe's order as ParamBlobs (empty without a module)."""
    vec = BlobVec()
    if module is not None:
        for attr in getattr(module, "blob_names", []):
            vec.append(ParamBlob(module, attr))
    return vec
