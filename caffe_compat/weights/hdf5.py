"""Caffe's HDF5 weights (``*.caffemodel.h5``), through h5py (:mod:`caffe_compat.hdf5_util`).

Layout, as BVLC Caffe writes it (``Net::ToHDF5``) and reads it (``CopyTrainedLayersFromHDF5``):
group ``data`` with one group per layer, named by the layer name as it is (no encoding: a
name with ``/`` makes Caffe's writer fail), holding datasets ``0``, ``1``, ... shaped like
the layer's blobs (float32; float64 for double nets).  Layers without blobs get empty
groups; a blob that shares an earlier layer's tensor (``param { name }``) is stored only
with its owner.  An optional group ``diff`` holds every blob's gradient the same way
(``write_diff``); loading ignores it.

Loading applies this project's caffemodel policy
(:func:`caffe_compat.weights.trained_layers.load_layers_into`): net layers with parameters
missing from the file are an error unless ``allow_missing``, source layers the net lacks are
reported, blob counts and shapes must match, NaN/Inf is refused.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional

import numpy as np
import torch

from caffe_compat.atomic import atomic_path
from caffe_compat.errors import ParseError, WeightsError, shorten
from caffe_compat import limits
from caffe_compat.hdf5_util import (as_array, blob_index, check_dataset, check_group_size, damaged_file_as,
                                    h5py_module, open_hdf5)
from caffe_compat.weights.trained_layers import CaffeBlob, CaffeLayerWeights, load_layers_into

__all__ = ["load_hdf5_into", "save_hdf5"]


class _DatasetSource:
    """An HDF5 dataset as a blob source, read slab by slab along its first axis when copied,
    so a 400 MB fc6 never sits in memory twice (``trained_layers.copy_blob`` calls ``copy_into``)."""

    def __init__(self, ds):
        self.ds = ds

    def __array__(self, dtype=None, copy=None):
        arr = np.asarray(self.ds[()])
        return arr if dtype is None else arr.astype(dtype)

    def copy_into(self, target: torch.Tensor, chunk: int,
                  check: Optional[Callable[[np.ndarray], None]]) -> None:
        ds = self.ds
        if ds.ndim == 0 or not target.is_contiguous():
            slabs = [np.asarray(ds[()])]
        else:
            row = max(1, int(np.prod(ds.shape[1:], dtype=np.int64)))
            step = max(1, chunk // row)
            slabs = (ds[s:s + step] for s in range(0, ds.shape[0], step))
        dst = target.view(-1) if target.is_contiguous() else None
        off = 0
        with torch.no_grad():
            for arr in slabs:
                flat = np.ascontiguousarray(arr).reshape(-1)
                if flat.dtype.kind in "iu":  # Caffe reads integer datasets as floats too
                    flat = flat.astype(np.float64)
                if check is not None:
                    check(flat)  # (a refusal leaves the net partly loaded: the load failed anyway)
                with np.errstate(over="ignore"):  # float64 beyond float32 only with checks off
                    src = torch.from_numpy(flat)
                    if dst is None:
                        target.copy_(src.reshape(target.shape))
                    else:
                        dst[off:off + flat.size].copy_(src)
                off += flat.size


def _read_weight_layers(f, path: str, wanted: Callable[[str], bool]):
    """The ``data`` group as ``CaffeLayerWeights`` (blob data: unread h5py datasets).

    Groups of layers that ``wanted`` rejects are not looked into (Caffe ignores them
    unopened); their blob lists only count their entries, for the "ignoring" note.  Entry
    counts, blob indices and every read dataset's declared shape are checked against the
    limits from the metadata, before any data is read.
    """
    h5py = h5py_module()
    data = f.get("data")
    if not isinstance(data, h5py.Group):
        top = ", ".join(shorten(k, 80) for k in sorted(f.keys())[:8]) or "none"
        hint = ("; it looks like a solver state (.solverstate.h5): restore it with a solver, or load "
                "the weights file its learned_net names") if "history" in f or "iter" in f else ""
        what = "a dataset" if data is not None else "missing"
        raise WeightsError(f"no 'data' group ({what}), so not Caffe HDF5 weights (top-level "
                           f"entries: {top}){hint}", where=path)
    layers = []
    budget = limits.FileBudget(path)
    check_group_size(data, "max_layers", "group 'data' (one entry per layer)", path)
    empty = CaffeBlob((), np.zeros(0, np.float32))
    for name in data.keys():  # HDF5's name order, as Caffe iterates them
        group = data.get(name)
        budget.layer(layer=name)
        if not wanted(name):
            count = len(group) if isinstance(group, h5py.Group) else int(group is not None)
            layers.append(CaffeLayerWeights(name, "", [empty] * min(count, 1 << 16)))
            continue
        if not isinstance(group, h5py.Group):
            raise WeightsError(f"'data/{shorten(name, 80)}' is not a group; a layer's blobs are datasets 0, 1, "
                               "... in a group named after the layer", where=path, layer=name)
        blobs: List[Optional[CaffeBlob]] = []
        check_group_size(group, "max_list_length", f"group 'data/{shorten(name, 80)}'", path, layer=name)
        for key in group.keys():
            j = blob_index(key, path, layer=name)
            ds = group.get(key)
            if j is None or not isinstance(ds, h5py.Dataset):
                kind = "group" if isinstance(ds, h5py.Group) else "entry"
                raise WeightsError(f"unexpected {kind} '{shorten(key, 80)}' in the layer's group: Caffe stores a "
                                   "layer's blobs as datasets named 0, 1, ...", where=path, layer=name)
            if ds.dtype.kind not in "fiu":
                raise WeightsError(f"dataset has type {shorten(ds.dtype, 80)}; Caffe reads blobs from float (or "
                                   "integer) datasets", where=path, layer=name, blob=j)
            check_dataset(ds, budget, name=key, layer=name, blob=j)
            blobs += [None] * (j + 1 - len(blobs))
            blobs[j] = CaffeBlob(tuple(int(d) for d in ds.shape), _DatasetSource(ds))
        layers.append(CaffeLayerWeights(name, "", blobs))
    return layers


def load_hdf5_into(net, path: str, *, allow_missing: bool = False,
                   check_finite: Optional[bool] = None) -> List[str]:
    """Copy Caffe HDF5 weights into ``net`` by layer name; returns notes (ignored layers).

    Caffe's ``CopyTrainedLayersFromHDF5`` with this project's policy (see the module doc):
    a net layer with parameters the file lacks is an error unless ``allow_missing``.
    """
    path = os.fspath(path)

    def wanted(name: str) -> bool:
        e = net._by_name.get(name)
        return e is not None and (e.module is not None or e.unbuilt_reason.startswith("folded into"))

    with damaged_file_as(ParseError, "HDF5 weights file", path), \
            open_hdf5(path, WeightsError, "HDF5 weights") as f:
        layers = _read_weight_layers(f, path, wanted)
        return load_layers_into(net, layers, path, allow_missing=allow_missing,
                                check_finite=check_finite, sparse=True)


def _check_layer_names(net) -> None:
    """Names HDF5 cannot hold as one group name (Caffe's writer aborts on them)."""
    seen = set()
    for e in net.entries:
        if e.name in seen:
            raise WeightsError("two layers have this name; Caffe's HDF5 layout needs unique layer "
                               "names (save as .caffemodel instead)", layer=e.name)
        seen.add(e.name)
        if "/" in e.name or e.name in ("", "."):
            raise WeightsError("this layer name cannot be an HDF5 group name ('/' separates HDF5 "
                               "groups; Caffe's ToHDF5 fails on it too): save as .caffemodel or "
                               ".safetensors instead", layer=e.name or "''")


def save_hdf5(net, path: str, *, write_diff: bool = False) -> None:
    """Write ``net``'s weights in Caffe's HDF5 layout (``Net::ToHDF5``), atomically.

    ``write_diff`` adds the ``diff`` group: every blob's current gradient (zeros where none).
    """
    h5py = h5py_module()
    path = os.fspath(path)
    entries = net.entries  # (layers folded by fuse_batchnorm are gone from it)
    _check_layer_names(net)
    owned = set()
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        data = f.create_group("data")
        diff = f.create_group("diff") if write_diff else None
        for e in entries:
            g = data.create_group(e.name)
            gd = diff.create_group(e.name) if diff is not None else None
            for j, t in enumerate(e.module.caffe_blobs() if e.module is not None else []):
                if id(t) not in owned:  # only owners: sharers read their owner's dataset
                    owned.add(id(t))
                    g.create_dataset(str(j), data=as_array(t))
                if gd is not None:  # diffs regardless of sharing, as Caffe
                    grad = t.grad if t.grad is not None else torch.zeros_like(t)
                    gd.create_dataset(str(j), data=as_array(grad))
