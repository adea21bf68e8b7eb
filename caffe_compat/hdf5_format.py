"""Caffe's HDF5 weights and solver states (``snapshot_format: HDF5``), through h5py.

Layouts, as BVLC Caffe writes them (``Net::ToHDF5``, ``SGDSolver::SnapshotSolverStateToHDF5``)
and reads them (``CopyTrainedLayersFromHDF5``, ``RestoreSolverStateFromHDF5``):

- weights (``*.caffemodel.h5``): group ``data`` with one group per layer, named by the layer
  name as it is (no encoding: a name with ``/`` makes Caffe's writer fail), holding datasets
  ``0``, ``1``, ... shaped like the layer's blobs (float32; float64 for double nets).  Layers
  without blobs get empty groups; a blob that shares an earlier layer's tensor
  (``param { name }``) is stored only with its owner.  An optional group ``diff`` holds every
  blob's gradient the same way (``write_diff``); loading ignores it.
- solver state (``*.solverstate.h5``): int32 ``(1,)`` datasets ``iter`` and ``current_step``,
  ``learned_net`` (a scalar NUL-terminated fixed-length string, the weights file name) and
  group ``history`` with datasets ``0``, ``1``, ... (the solver's history blobs in order).
  It holds no random generator states (Caffe's neither): a resume from it is exact in
  weights, history, iteration and step, not in later random draws (dropout, shuffling).

Loading applies this project's caffemodel policy (:func:`caffe_compat.weights.load_layers_into`):
net layers with parameters missing from the file are an error unless ``allow_missing``, source
layers the net lacks are reported, blob counts and shapes must match, NaN/Inf is refused.

h5py is imported only when an HDF5 file is read or written.
"""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Iterator, List, Optional, Tuple, Type

import numpy as np
import torch

from caffe_compat.errors import CaffeCompatError, ParseError, SolverError, WeightsError
from caffe_compat.weights import (HDF5_SIGNATURE, CaffeBlob, CaffeLayerWeights, _file_kind_hint,
                                  load_layers_into)

__all__ = ["h5py_module", "load_hdf5_into", "save_hdf5", "write_solver_state_hdf5",
           "read_solver_state_hdf5", "looks_like_hdf5"]

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
def _damaged_file_as(error: Type[CaffeCompatError], what: str, path: str) -> Iterator[None]:
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


def _open(path: str, error: Type[CaffeCompatError], what: str,
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
        hint = _file_kind_hint(path) or " (Caffe reads any file whose name ends in .h5 as HDF5)"
        raise bad(f"not an HDF5 file, expected {what}{hint}", where=path)
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise bad(f"cannot open HDF5 file: {e}", where=path) from None


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A blob as Caffe's HDF5 writer stores it: float64 stays double, anything else float32."""
    t = t.detach()
    if t.dtype != torch.float64:
        t = t.float()
    return t.cpu().contiguous().numpy()


# ---------------------------------------------------------------------- weights
class _DatasetSource:
    """An HDF5 dataset as a blob source, read slab by slab along its first axis when copied,
    so a 400 MB fc6 never sits in memory twice (``weights._copy_blob`` calls ``copy_into``)."""

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


def _blob_index(name: str) -> Optional[int]:
    """``j`` for a dataset named like Caffe's ``j``-th blob ("0", "1", ...), else None."""
    return int(name) if name.isdigit() and str(int(name)) == name else None


def _read_weight_layers(f, path: str, wanted: Callable[[str], bool]):
    """The ``data`` group as ``CaffeLayerWeights`` (blob data: unread h5py datasets).

    Groups of layers that ``wanted`` rejects are not looked into (Caffe ignores them
    unopened); their blob lists only count their entries, for the "ignoring" note.
    """
    h5py = h5py_module()
    data = f.get("data")
    if not isinstance(data, h5py.Group):
        top = ", ".join(sorted(f.keys())[:8]) or "none"
        hint = ("; it looks like a solver state (.solverstate.h5): restore it with a solver, or load "
                "the weights file its learned_net names") if "history" in f or "iter" in f else ""
        what = "a dataset" if data is not None else "missing"
        raise WeightsError(f"no 'data' group ({what}), so not Caffe HDF5 weights (top-level "
                           f"entries: {top}){hint}", where=path)
    layers = []
    for name in data.keys():  # HDF5's name order, as Caffe iterates them
        group = data.get(name)
        if not wanted(name):
            count = len(group) if isinstance(group, h5py.Group) else int(group is not None)
            layers.append(CaffeLayerWeights(name, "", [CaffeBlob((), np.zeros(0, np.float32))] * count))
            continue
        if not isinstance(group, h5py.Group):
            raise WeightsError(f"'data/{name}' is not a group; a layer's blobs are datasets 0, 1, "
                               "... in a group named after the layer", where=path, layer=name)
        blobs: List[Optional[CaffeBlob]] = []
        for key in group.keys():
            j = _blob_index(key)
            ds = group.get(key)
            if j is None or not isinstance(ds, h5py.Dataset):
                kind = "group" if isinstance(ds, h5py.Group) else "entry"
                raise WeightsError(f"unexpected {kind} '{key}' in the layer's group: Caffe stores a "
                                   "layer's blobs as datasets named 0, 1, ...", where=path, layer=name)
            if ds.dtype.kind not in "fiu":
                raise WeightsError(f"dataset has type {ds.dtype}; Caffe reads blobs from float (or "
                                   "integer) datasets", where=path, layer=name, blob=j)
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

    with _damaged_file_as(ParseError, "HDF5 weights file", path), \
            _open(path, WeightsError, "HDF5 weights") as f:
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
    from caffe_compat.atomic import atomic_path

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
                    g.create_dataset(str(j), data=_as_array(t))
                if gd is not None:  # diffs regardless of sharing, as Caffe
                    grad = t.grad if t.grad is not None else torch.zeros_like(t)
                    gd.create_dataset(str(j), data=_as_array(grad))


# ---------------------------------------------------------------------- solver states
def _write_string(f, name: str, value: str) -> None:
    """A scalar NUL-terminated fixed-length string dataset (HDF5 Lite's make_dataset_string,
    which Caffe's reader expects: it sizes its buffer from the type and reads up to the NUL)."""
    h5py = h5py_module(SolverError, "HDF5 solver states")
    raw = os.fsencode(value) + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    dset = h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"), mtype=tid)


def write_solver_state_hdf5(path: str, *, iteration: int, current_step: int, learned_net: str,
                            history: List[torch.Tensor]) -> None:
    """Write Caffe's HDF5 solver state (``SnapshotSolverStateToHDF5``), atomically."""
    from caffe_compat.atomic import atomic_path

    h5py = h5py_module(SolverError, "HDF5 solver states")
    for what, v in (("iteration", iteration), ("current_step", current_step)):
        if not -2 ** 31 <= int(v) < 2 ** 31:
            raise SolverError(f"{what} {v} does not fit the HDF5 solver state's int32")
    with atomic_path(os.fspath(path)) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("iter", data=np.array([iteration], dtype=np.int32))
        _write_string(f, "learned_net", learned_net)
        f.create_dataset("current_step", data=np.array([current_step], dtype=np.int32))
        g = f.create_group("history")
        for i, h in enumerate(history):
            g.create_dataset(str(i), data=_as_array(h))


def _read_int(f, name: str, path: str) -> int:
    h5py = h5py_module(SolverError, "HDF5 solver states")
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise SolverError(f"no '{name}' dataset, so not a Caffe HDF5 solver state (top-level entries: "
                          f"{', '.join(sorted(f.keys())[:8]) or 'none'})", where=path)
    arr = np.asarray(ds[()]).reshape(-1)
    if arr.size != 1 or arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and arr[0] != int(arr[0])):
        raise SolverError(f"'{name}' must hold one integer, it holds {arr.size} value(s) of type "
                          f"{arr.dtype}", where=path)
    return int(arr[0])


def _read_string(ds, path: str) -> str:
    value = ds[()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise SolverError(f"'learned_net' must hold one string, it holds {value.size} values",
                              where=path)
        value = value.reshape(-1)[0]
    if isinstance(value, np.bytes_):
        value = bytes(value)
    if isinstance(value, bytes):
        return os.fsdecode(value.split(b"\0", 1)[0])
    if isinstance(value, str):
        return value.split("\0", 1)[0]
    raise SolverError(f"'learned_net' must be a string dataset, it holds {type(value).__name__}",
                      where=path)


def read_solver_state_hdf5(path: str) -> Tuple[int, int, Optional[str], List[np.ndarray]]:
    """``(iter, current_step, learned_net or None, history arrays)`` of Caffe's HDF5 state."""
    h5py = h5py_module(SolverError, "HDF5 solver states")
    path = os.fspath(path)
    with _damaged_file_as(SolverError, "HDF5 solver state", path), \
            _open(path, SolverError, "an HDF5 solver state", SolverError) as f:
        iteration = _read_int(f, "iter", path)
        ds = f.get("learned_net")
        learned = None
        if isinstance(ds, h5py.Dataset):
            learned = _read_string(ds, path)
        step = _read_int(f, "current_step", path)
        g = f.get("history")
        if not isinstance(g, h5py.Group):
            raise SolverError("no 'history' group, so not a Caffe HDF5 solver state", where=path)
        names = list(g.keys())
        want = [str(i) for i in range(len(names))]
        if sorted(names) != sorted(want):
            raise SolverError(f"'history' holds {', '.join(sorted(names)[:8])}; expected datasets "
                              f"named 0..{len(names) - 1}", where=path)
        history = []
        for key in want:
            ds = g[key]
            if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "fiu":
                raise SolverError(f"history entry '{key}' is not a numeric dataset", where=path)
            history.append(np.asarray(ds[()]))
    return iteration, step, learned, history
