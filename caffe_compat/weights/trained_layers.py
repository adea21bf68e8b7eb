"""Caffe's ``Net::CopyTrainedLayersFrom``: a weights file's layers copied into a net by name.

Every Caffe weights format (binary ``.caffemodel``, HDF5 ``.caffemodel.h5``) is read into
:class:`CaffeLayerWeights` records and copied by :func:`load_layers_into`, so they share one
policy: source layers the net lacks are reported, net layers with blobs the file lacks are an
error unless ``allow_missing`` (the py-faster-rcnn issue-256 trap: renamed layers must not be
skipped silently), blob counts and shapes must match, and NaN/Inf is refused unless
``check_finite=False`` (or ``$CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1``).  Blobs are copied in
chunks and copied file pages dropped, so a load's peak memory stays near the net's size.
"""
from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch

from caffe_compat.errors import WeightsError

__all__ = ["CaffeBlob", "CaffeLayerWeights", "ENV_ALLOW_NONFINITE", "want_finite_check",
           "check_finite_array", "copy_blob", "release_pages", "shared_non_owners",
           "load_layers_into"]

#: environment variable that turns off the NaN/Inf check when loading weights
ENV_ALLOW_NONFINITE = "CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS"


@dataclass
class CaffeBlob:
    """One blob as a file holds it."""

    shape: Tuple[int, ...]
    data: np.ndarray          # float32 or float64, already in ``shape`` (or a lazy source, see copy_blob)
    legacy: bool = False      # shape came from num/channels/height/width


@dataclass
class CaffeLayerWeights:
    """One layer of a weights file: its name, type and blobs."""

    name: str
    type: str
    blobs: List[Optional[CaffeBlob]] = field(default_factory=list)  # None: absent (HDF5 sharers)
    param: Optional[object] = None  # the layer's LayerParameter / V1LayerParameter (no blobs)
    #: top-level field numbers of the layer's definition that no known schema decodes
    #: (skipped by wire type; the blobs do not depend on them)
    skipped_fields: List[int] = field(default_factory=list)


def want_finite_check(check_finite: Optional[bool]) -> bool:
    """The NaN/Inf check applies unless turned off by argument or environment."""
    if check_finite is not None:
        return bool(check_finite)
    return os.environ.get(ENV_ALLOW_NONFINITE, "").strip() in ("", "0")


def check_finite_array(arr, *, where: str = "", layer: Optional[str] = None,
                       blob: Optional[int] = None, name: str = "") -> None:
    """Refuse NaN/Inf values (a diverged or corrupt model), naming where they are.

    Checked in chunks, so a huge blob does not need a second full-size temporary.
    """
    a = np.asarray(arr).reshape(-1)
    if a.dtype.kind != "f":
        return
    step = 1 << 24
    f32max = float(np.finfo(np.float32).max)
    for s in range(0, a.size, step):
        chunk = a[s:s + step]
        finite = np.isfinite(chunk).all()
        if finite and (a.dtype.itemsize <= 4 or np.abs(chunk).max(initial=0.0) <= f32max):
            continue
        what = f"'{name}' " if name else ""
        hint = (f"a diverged or corrupt model? (check_finite=False or {ENV_ALLOW_NONFINITE}=1 "
                "loads it anyway)")
        if finite:  # double_data that float32 (the net's precision) cannot hold
            big = np.flatnonzero(np.abs(a) > f32max)
            raise WeightsError(f"{what}holds {big.size} double value(s) beyond float32's range "
                               f"(first {a[big[0]]:g} at flat index {big[0]}), which would load as "
                               f"Inf; {hint}", where=where or None, layer=layer, blob=blob)
        n_nan = int(np.isnan(a).sum())
        n_inf = int(np.isinf(a).sum())
        first = s + int(np.flatnonzero(~np.isfinite(chunk))[0])
        raise WeightsError(
            f"{what}holds {n_nan} NaN and {n_inf} Inf value(s) (first at flat index {first}); {hint}",
            where=where or None, layer=layer, blob=blob)


_PAGE = mmap.PAGESIZE


def copy_blob(target: torch.Tensor, data: np.ndarray, chunk: int = 1 << 22,
              check: Optional[Callable[[np.ndarray], None]] = None) -> None:
    """Copy a (memory-mapped) blob into ``target`` in chunks, dropping copied file pages.

    Chunking keeps a load's peak memory near the net's own size even for VGG16's 400 MB
    fc6 blob: at most one chunk of the file is resident beside the copies.  A source with a
    ``copy_into(target, chunk, check)`` method (an HDF5 dataset) reads itself chunk by chunk.
    """
    copy_into = getattr(data, "copy_into", None)
    if copy_into is not None:
        copy_into(target, chunk, check)
        return
    src = np.asarray(data).reshape(-1)
    with torch.no_grad(), warnings.catch_warnings():  # read-only views of the map; copy_ copies
        warnings.simplefilter("ignore", UserWarning)
        dst = target.view(-1) if target.is_contiguous() else None
        if dst is None:
            if check is not None:
                check(src)
            target.copy_(torch.from_numpy(src).reshape(target.shape))
            release_pages(src)
            return
        for s in range(0, src.size, chunk):
            part = src[s:s + chunk]
            if check is not None:
                check(part)  # (a refusal leaves the net partly loaded: the load failed anyway)
            dst[s:s + part.size].copy_(torch.from_numpy(part))
            release_pages(part)


def release_pages(arr: np.ndarray) -> None:
    """Tell the kernel a memory-mapped blob's pages are no longer needed (after copying).

    The file pages of a big caffemodel would otherwise stay resident next to the copies,
    doubling the peak memory of a load; dropping them keeps it near the weights' own size.
    """
    owner = arr
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base  # views of views: up to the memoryview of the map
    m = getattr(owner, "obj", None)
    if not isinstance(m, mmap.mmap) or not arr.nbytes:
        return
    start = arr.ctypes.data - np.frombuffer(m, np.uint8, count=1).ctypes.data
    lo = -(-start // _PAGE) * _PAGE
    hi = (start + arr.nbytes) // _PAGE * _PAGE
    if hi > lo and hasattr(m, "madvise"):
        try:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):  # advice only
            pass


def _legacy_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Caffe's LegacyShape view of a target blob: left-padded with 1s to 4 axes."""
    return (1,) * (4 - len(shape)) + tuple(shape) if len(shape) <= 4 else tuple(shape)


def _shape_matches(target: Tuple[int, ...], blob: CaffeBlob) -> bool:
    if tuple(target) in ((), (1,)) and blob.shape in ((), (1,)):
        return True  # Caffe writes a 0-D blob (Normalize's shared scale) with no dims at all
    if blob.legacy:
        return len(target) <= 4 and _legacy_shape(target) == blob.shape
    return tuple(target) == blob.shape


def shared_non_owners(net) -> set:
    """``(layer, blob index)`` of every blob that shares (``param { name }``) a tensor an
    earlier layer owns: Caffe's HDF5 writer stores only owners, so these may be absent."""
    seen: set = set()
    out: set = set()
    for e in net.entries:
        if e.module is None:
            continue
        for i, t in enumerate(e.module.caffe_blobs()):
            if id(t) in seen:
                out.add((e.name, i))
            seen.add(id(t))
    return out


def load_layers_into(net, layers: List[CaffeLayerWeights], path: str, *, allow_missing: bool = False,
                     check_finite: Optional[bool] = None, sparse: bool = False) -> List[str]:
    """Copy ``layers``' blobs into ``net`` by layer name, with the policy of the module
    docstring (shared by every Caffe weights format); returns notes (ignored layers).

    ``sparse`` (HDF5): a blob may be ``None`` (or the list short) where the net's blob
    shares an earlier layer's tensor -- Caffe's ``ToHDF5`` stores owners only -- and a
    layer whose blobs are all such sharers counts as loaded.  ``blob.data`` may be any
    array-like (an h5py dataset is read when copied).
    """
    finite = want_finite_check(check_finite)
    notes: List[str] = []
    loaded = set()
    sharers = shared_non_owners(net) if sparse else set()
    for lw in layers:  # before copying anything: unfused weights into a fused net
        entry = net._by_name.get(lw.name)
        if any(b is not None for b in lw.blobs) and entry is not None and entry.module is None \
                and entry.unbuilt_reason.startswith("folded into"):
            raise WeightsError("the file holds this layer's own blobs, but the net has folded it "
                               f"({entry.unbuilt_reason.split(' (')[0]}): load the weights first, "
                               "then call fuse_batchnorm()", where=path, layer=lw.name)
    for lw in layers:
        if not lw.blobs and not sparse:
            continue
        entry = net._by_name.get(lw.name)
        if entry is None or entry.module is None:
            if any(b is not None for b in lw.blobs):
                notes.append(f"ignoring source layer '{lw.name}' (not in the net)")
            continue
        targets = entry.module.caffe_blobs()
        blobs = list(lw.blobs)
        if sparse and len(blobs) < len(targets):
            blobs += [None] * (len(targets) - len(blobs))
        if len(targets) != len(blobs):
            held = sum(b is not None for b in blobs)
            raise WeightsError(f"incompatible number of blobs: the file has {held}, "
                               f"the net's {entry.type} layer has {len(targets)}", where=path, layer=lw.name)
        names = entry.module.blob_names
        for i, (t, blob) in enumerate(zip(targets, blobs)):
            attr = names[i] if i < len(names) else f"blob{i}"
            if blob is None:
                if (lw.name, i) in sharers:
                    continue  # shares an earlier layer's tensor, stored there
                held = sum(b is not None for b in blobs)
                raise WeightsError(f"incompatible number of blobs: the file lacks blob {i} ('{attr}') "
                                   f"of the net's {entry.type} layer (it holds {held} of "
                                   f"{len(targets)})", where=path, layer=lw.name, blob=i)
            if not _shape_matches(tuple(t.shape), blob):
                raise WeightsError(f"shape mismatch for '{attr}': the net expects {tuple(t.shape)}, "
                                   f"the file has {blob.shape}", where=path, layer=lw.name, blob=i)
            check = (lambda part, i=i: check_finite_array(part, where=path, layer=lw.name, blob=i)) \
                if finite else None
            copy_blob(t, blob.data, check=check)
        loaded.add(lw.name)
    missing = [e.name for e in net.entries
               if e.module is not None and e.module.caffe_blobs() and e.name not in loaded]
    if missing:
        msg = (f"no weights in the file for layer(s) {', '.join(missing)} "
               "(renamed layers? use allow_missing / --allow-missing to keep their initial values)")
        if not allow_missing:
            raise WeightsError(msg, where=path)
        notes.append(msg)
    return notes
