"""Caffe's ``extract_features``: run a net's forward N times and store blobs as LMDBs of Datums.

Each of ``num_mini_batches`` forwards (TEST phase, data from the net's own data layers, so
consecutive batches differ as the Data layer advances) stores every item ``n`` of each
requested blob as one ``Datum`` in that blob's dataset, under the key ``"%010d"`` of a running
index per dataset: ``channels/height/width`` are the blob's legacy ``channels()``,
``height()`` and ``width()`` (a missing axis counts 1, so an ``N x D`` fc output is stored as
``D x 1 x 1``; blobs with more than 4 axes are refused, as Caffe's ``LegacyShape`` check does),
``float_data`` the item's values.  Records are committed every ``COMMIT_EVERY`` items and at
the end; the serialized records are byte-identical to Caffe's (``float_data`` is unpacked in
caffe.proto, so each value is a tag and 4 bytes).

Deliberate differences: every check (name counts, unknown blobs, existing datasets,
``num_mini_batches < 1``, a blob with no items) fails before anything is written; each dataset
is built in a temporary folder and renamed into place at the end, so a failed run leaves no
partial database (Caffe left whatever it had committed); leveldb is refused.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from caffe_compat.errors import DataError, SchemaError
from caffe_compat.imageset import (COMMIT_EVERY, INITIAL_MAP_SIZE, LmdbWriter, check_new_db,
                                   new_db_folder, refuse_backend)
from caffe_compat.protos import caffe_pb2

__all__ = ["split_names", "legacy_dims", "datum_bytes", "check_request", "check_blobs",
           "extract_features",
           "ExtractResult", "select_device", "COMMIT_EVERY"]

Log = Callable[[str], None]
_TOOL = "extract_features"
# float_data = 6, wire type 5 (32-bit): the key byte before each unpacked value
_FLOAT_KEY = (6 << 3) | 5
_RECORD = np.dtype([("key", "u1"), ("value", "<f4")])  # packed: 5 bytes per value


def _quiet(_: str) -> None:
    pass


def split_names(text: str) -> List[str]:
    """A comma-separated list, split as Caffe's ``boost::split`` does (empty parts kept)."""
    return text.split(",")


def legacy_dims(shape: Sequence[int], blob: str = "") -> Tuple[int, int, int, int]:
    """Caffe's ``num()/channels()/height()/width()`` of a blob shape (missing axes count 1)."""
    dims = tuple(int(d) for d in shape)
    if len(dims) > 4:
        raise DataError(f"blob '{blob}' has {len(dims)} axes {list(dims)}: a Datum stores at most 4 "
                        "(num, channels, height, width), as Caffe's legacy blob shape")
    n, c, h, w = (dims[i] if i < len(dims) else 1 for i in range(4))
    return n, c, h, w


def datum_bytes(channels: int, height: int, width: int, values: np.ndarray) -> bytes:
    """``Datum(channels, height, width, float_data=values).SerializeToString()``, fast.

    The header comes from protobuf; the values are written as numpy records (tag + float32),
    which is what protobuf writes for an unpacked ``repeated float``.
    """
    head = caffe_pb2.Datum(channels=channels, height=height, width=width).SerializeToString()
    rec = np.empty(values.size, dtype=_RECORD)
    rec["key"] = _FLOAT_KEY
    rec["value"] = values.reshape(-1)
    return head + rec.tobytes()


def select_device(mode: str = "CPU", device_id: int = 0):
    """Caffe's positional ``[CPU|GPU] [DEVICE_ID]``: ``GPU 3`` is ``--gpu 3`` elsewhere, so the
    device itself comes from the one resolver every command uses
    (:func:`caffe_compat.device.resolve_device`); only the mode word is this tool's own."""
    import torch

    from caffe_compat.device import resolve_device

    m = (mode or "CPU").upper()
    if m not in ("CPU", "GPU"):
        raise SchemaError(f"mode must be CPU or GPU, got '{str(mode)[:40]}'")
    if m == "CPU":
        return torch.device("cpu")
    if device_id < 0:  # a negative --gpu means the CPU; in GPU mode it is a mistake
        raise SchemaError(f"DEVICE_ID must be >= 0 in GPU mode, got {device_id}")
    return resolve_device(device_id)


def check_request(blob_names: Sequence[str], dataset_names: Sequence[str], num_mini_batches: int,
                  backend: str = "lmdb") -> None:
    """What can be refused before the net is built: counts, names, backend, datasets."""
    if len(blob_names) != len(dataset_names):
        raise SchemaError(f"{len(blob_names)} blob names ({','.join(blob_names)}) but "
                          f"{len(dataset_names)} dataset names ({','.join(dataset_names)}): the "
                          "number of blob names and dataset names must be equal")
    if any(not b for b in blob_names):
        raise SchemaError(f"empty blob name in '{','.join(blob_names)}' (names are separated by "
                          "single commas)")
    if any(not d for d in dataset_names):
        raise SchemaError(f"empty dataset name in '{','.join(dataset_names)}' (names are "
                          "separated by single commas)")
    if num_mini_batches < 1:
        raise SchemaError(f"num_mini_batches must be >= 1, got {num_mini_batches}")
    refuse_backend(backend, use="db_type lmdb")
    seen = {}
    for d in dataset_names:
        real = os.path.realpath(d)
        if real in seen:
            raise SchemaError(f"dataset '{d}' is named twice (as '{seen[real]}'): each blob needs "
                              "its own dataset")
        seen[real] = d
        check_new_db(d, _TOOL)


def check_blobs(net, blob_names: Sequence[str]) -> None:
    """Every name is a blob of ``net`` (Caffe's ``has_blob``) with at most 4 axes if known."""
    known = list(net.blob_names)
    for b in blob_names:
        if b not in known:
            raise SchemaError(f"unknown feature blob name '{b}' in the network "
                              f"{net.source or net.net_name}; its blobs: {', '.join(known)}")
        shape = net.blob_shapes.get(b)
        if shape is not None:
            legacy_dims(shape, b)


@dataclass
class ExtractResult:
    datasets: List[str]
    blobs: List[str]
    counts: List[int]                                  # records written per dataset
    item_shapes: List[Tuple[int, int, int]] = field(default_factory=list)  # (C, H, W) per dataset


def extract_features(net, blob_names: Sequence[str], dataset_names: Sequence[str],
                     num_mini_batches: int, *, backend: str = "lmdb", log: Log = _quiet,
                     map_size: int = INITIAL_MAP_SIZE) -> ExtractResult:
    """Caffe's ``extract_features`` loop over a built, weighted ``caffe_compat.Net``.

    Runs ``net.forward()`` ``num_mini_batches`` times (no inputs: the net's data layers
    supply them) and writes ``dataset_names[i]`` from blob ``blob_names[i]``.
    """
    import torch

    blob_names, dataset_names = list(blob_names), list(dataset_names)
    check_request(blob_names, dataset_names, num_mini_batches, backend)
    check_blobs(net, blob_names)
    log(f"Extracting features of {', '.join(blob_names)} over {num_mini_batches} mini-batches")
    tmps: List[str] = []
    writers: List[Optional[LmdbWriter]] = []
    counts = [0] * len(blob_names)
    item_shapes: List[Tuple[int, int, int]] = [(0, 0, 0)] * len(blob_names)
    try:
        for d in dataset_names:
            log(f"Opening dataset {d}")
            tmps.append(new_db_folder(d, _TOOL))
            writers.append(LmdbWriter(tmps[-1], map_size))
        for _ in range(num_mini_batches):
            with torch.no_grad():
                net.forward()
            for i, b in enumerate(blob_names):
                t = net.blobs[b]
                num, c, h, w = legacy_dims(t.shape, b)
                if num < 1:
                    raise DataError(f"blob '{b}' has no items (shape {list(t.shape)}): Caffe divides "
                                    "by its num() and fails")
                item_shapes[i] = (c, h, w)
                vals = t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
                vals = vals.reshape(num, -1)
                for n in range(num):
                    writers[i].put(f"{counts[i]:010d}".encode("ascii"), datum_bytes(c, h, w, vals[n]))
                    counts[i] += 1
                    if counts[i] % COMMIT_EVERY == 0:
                        writers[i].commit()
                        log(f"Extracted features of {counts[i]} query images for feature blob {b}")
        for i, b in enumerate(blob_names):
            if writers[i].pending:
                writers[i].commit()
            log(f"Extracted features of {counts[i]} query images for feature blob {b}")
        for i in range(len(writers)):
            writers[i].close()
            writers[i] = None
        for d in dataset_names:  # nothing appeared meanwhile: rename all or none
            check_new_db(d, _TOOL)
        placed: List[str] = []
        try:
            for tmp, d in zip(tmps, dataset_names):
                os.rename(tmp, d)
                placed.append(d)
        except BaseException:
            for d in placed:  # a later rename failed: take back the ones already in place
                shutil.rmtree(d, ignore_errors=True)
            raise
        tmps = []
    except BaseException:
        for wr in writers:
            if wr is not None:
                wr.close()
        for tmp in tmps:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    log("Successfully extracted the features!")
    return ExtractResult(dataset_names, blob_names, counts, item_shapes)
