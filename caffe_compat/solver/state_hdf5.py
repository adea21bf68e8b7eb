"""Caffe's HDF5 solver state (``*.solverstate.h5``, ``snapshot_format: HDF5``), through h5py.

Layout, as BVLC Caffe writes it (``SGDSolver::SnapshotSolverStateToHDF5``) and reads it
(``RestoreSolverStateFromHDF5``): int32 ``(1,)`` datasets ``iter`` and ``current_step``,
``learned_net`` (a scalar NUL-terminated fixed-length string, the weights file name) and
group ``history`` with datasets ``0``, ``1``, ... (the history blobs in Caffe's layout).
It holds no random generator states (Caffe's neither): a resume from it is exact in
weights, history, iteration and step, not in later random draws (dropout, shuffling).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from caffe_compat.atomic import atomic_path
from caffe_compat import limits
from caffe_compat.errors import SolverError, SolverStateError, shorten
from caffe_compat.hdf5_util import (as_array, check_dataset, check_group_size, damaged_file_as, h5py_module,
                                    open_hdf5)
from caffe_compat.solver.state import SolverState

__all__ = ["write_state", "read_state"]


def _h5py():
    return h5py_module(SolverError, "HDF5 solver states")


def _write_string(f, name: str, value: str) -> None:
    """A scalar NUL-terminated fixed-length string dataset (HDF5 Lite's make_dataset_string,
    which Caffe's reader expects: it sizes its buffer from the type and reads up to the NUL)."""
    h5py = _h5py()
    raw = os.fsencode(value) + b"\0"
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(raw))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    dset = h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    dset.write(h5py.h5s.ALL, h5py.h5s.ALL, np.array(raw, dtype=f"S{len(raw)}"), mtype=tid)


def write_state(path: str, state: SolverState) -> None:
    """Write Caffe's HDF5 solver state (``SnapshotSolverStateToHDF5``), atomically."""
    h5py = _h5py()
    for what, v in (("iteration", state.iter), ("current_step", state.current_step)):
        if not -2 ** 31 <= int(v) < 2 ** 31:
            raise SolverError(f"{what} {v} does not fit the HDF5 solver state's int32")
    with atomic_path(os.fspath(path)) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("iter", data=np.array([state.iter], dtype=np.int32))
        _write_string(f, "learned_net", state.learned_net or "")
        f.create_dataset("current_step", data=np.array([state.current_step], dtype=np.int32))
        g = f.create_group("history")
        for i, h in enumerate(state.history):
            g.create_dataset(str(i), data=as_array(h))


def _read_int(f, name: str, path: str) -> int:
    h5py = _h5py()
    ds = f.get(name)
    if not isinstance(ds, h5py.Dataset):
        raise SolverStateError(f"no '{name}' dataset, so not a Caffe HDF5 solver state (top-level entries: "
                          f"{', '.join(shorten(k, 80) for k in sorted(f.keys())[:8]) or 'none'})", where=path)
    if ds.size != 1:  # from the metadata, before reading (a huge declared shape reads nothing)
        raise SolverStateError(f"'{name}' must hold one integer, it declares shape {shorten(ds.shape, 80)}",
                          where=path)
    arr = np.asarray(ds[()]).reshape(-1)
    if arr.size != 1 or arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and arr[0] != int(arr[0])):
        raise SolverStateError(f"'{name}' must hold one integer, it holds {arr.size} value(s) of type "
                          f"{arr.dtype}", where=path)
    return int(arr[0])


#: bytes of the ``learned_net`` string (a file name; PATH_MAX is 4096)
_MAX_NAME_BYTES = 1 << 16


def _read_string(ds, path: str) -> str:
    if ds.size > 1:  # metadata only: a declared array of strings is not read
        raise SolverStateError(f"'learned_net' must hold one string, it declares shape {shorten(ds.shape, 80)}",
                          where=path)
    if ds.dtype.itemsize > _MAX_NAME_BYTES:  # a fixed-length string type of gigabytes
        raise SolverStateError(f"'learned_net' is a string of {ds.dtype.itemsize} bytes; a file name has at "
                          f"most {_MAX_NAME_BYTES}", where=path)
    value = ds[()]
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise SolverStateError(f"'learned_net' must hold one string, it holds {value.size} values",
                              where=path)
        value = value.reshape(-1)[0]
    if isinstance(value, np.bytes_):
        value = bytes(value)
    if isinstance(value, bytes):
        return os.fsdecode(value.split(b"\0", 1)[0])
    if isinstance(value, str):
        return value.split("\0", 1)[0]
    raise SolverStateError(f"'learned_net' must be a string dataset, it holds {type(value).__name__}",
                      where=path)


def read_state(path: str, *, max_elements: Optional[int] = None) -> SolverState:
    """Caffe's HDF5 solver state (``RestoreSolverStateFromHDF5``); ``learned_net`` is None
    where the file has none.

    Every history dataset's declared shape is checked before any is read: against the limits
    and, with ``max_elements`` (the solver's own history size), against what the solver can
    take, so a small compressed or never-written file declaring gigabytes reads nothing."""
    h5py = _h5py()
    path = os.fspath(path)
    with damaged_file_as(SolverStateError, "HDF5 solver state", path), \
            open_hdf5(path, SolverStateError, "an HDF5 solver state", SolverStateError) as f:
        iteration = _read_int(f, "iter", path)
        ds = f.get("learned_net")
        learned = None
        if isinstance(ds, h5py.Dataset):
            learned = _read_string(ds, path)
        step = _read_int(f, "current_step", path)
        g = f.get("history")
        if not isinstance(g, h5py.Group):
            raise SolverStateError("no 'history' group, so not a Caffe HDF5 solver state", where=path)
        check_group_size(g, "max_blobs", "group 'history'", path)
        names = list(g.keys())
        want = [str(i) for i in range(len(names))]
        if sorted(names) != sorted(want):
            raise SolverStateError(f"'history' holds {', '.join(shorten(k, 40) for k in sorted(names)[:8])}; "
                              f"expected datasets named 0..{len(names) - 1}", where=path)
        # every declared shape is charged before any history is read (Caffe's Adam keeps two
        # history blobs per parameter: twice the net's total)
        budget = limits.FileBudget(path, per_param=2)
        for key in want:
            ds = g[key]
            if not isinstance(ds, h5py.Dataset) or ds.dtype.kind not in "fiu":
                raise SolverStateError(f"history entry '{key}' is not a numeric dataset", where=path)
            check_dataset(ds, budget, name=f"history/{key}", blob=int(key), error=SolverStateError)
        if max_elements is not None and budget.elements > max_elements:
            raise SolverStateError(f"the state's history declares {budget.elements} values, more than the "
                              f"solver's {max_elements} (a state of another net or solver type?)", where=path)
        history = []
        for key in want:
            arr = np.asarray(g[key][()])
            history.append(torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=False)))
    return SolverState(iteration, step, learned, history)
