"""Caffe's binary ``.caffemodel`` (a serialized ``NetParameter``), read and written.

Reading does not go through protobuf for the blob payloads: a VGG16 file is ~550 MB of
packed floats, which protobuf's Python runtime would turn into lists.  The file is
memory-mapped and walked at the wire level (:mod:`caffe_compat.wire`); each blob's packed
``data`` field becomes a zero-copy ``np.frombuffer`` view, and only the small non-blob part
of each layer is parsed by protobuf (a fork's layer with that fork's field numbers,
:mod:`caffe_compat.forks`).  V0, V1 and current layouts are read.  Writing does the reverse
(layer fields by protobuf, blob payloads as raw little-endian bytes) and keeps protobuf's
field order, so a file we write is what protobuf itself would write.

A file is read in memory proportional to what it holds, not to what it declares: layers,
blobs and each layer's repeated fields are counted on the wire before protobuf builds
anything, and every blob's shape (axes, elements, the file's total) is charged to a
``limits.FileBudget`` before its data is gathered.
"""
from __future__ import annotations

import contextlib
import functools
import mmap
import os
import stat
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from caffe_compat import limits, wire
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, WeightsError
from caffe_compat.file_kind import hdf5_hint
from caffe_compat.forks import as_written, decode_layer
from caffe_compat.io import _text_hint
from caffe_compat.protos import caffe_pb2
from caffe_compat.weights.trained_layers import (CaffeBlob, CaffeLayerWeights, check_finite_array,
                                                 copy_blob, load_layers_into, want_finite_check)

__all__ = ["MAX_BLOB_ELEMENTS", "read_caffemodel", "write_caffemodel", "encode_blob",
           "load_caffemodel_into", "net_layers_for_caffemodel", "blob_names_for",
           "caffemodel_state_dict"]

#: Refuse blobs larger than this many elements.  ``None`` (the default) means
#: ``caffe_compat.limits.max_blob_elements()`` (2^31, or $CAFFE_COMPAT_MAX_BLOB_ELEMENTS);
#: assigning an int here overrides it for this module (kept for compatibility).
MAX_BLOB_ELEMENTS: Optional[int] = None


def _max_blob_elements() -> int:
    return MAX_BLOB_ELEMENTS if MAX_BLOB_ELEMENTS is not None else limits.max_blob_elements()


#: packed data runs shorter than this are copied into one buffer instead of kept as views, so
#: a blob written as millions of tiny (or unpacked) data fields costs its bytes, not an array
#: object per field
_SMALL_PART = 256


class _Parts:
    """A blob's data fields in file order: large packed runs as zero-copy views, small or
    unpacked ones gathered into shared byte buffers (memory proportional to the bytes)."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self.parts: list = []  # np views and bytearrays, in order
        self.size = 0          # values so far

    def add(self, buf, wt: int, a: int, b: int) -> None:
        if b - a >= _SMALL_PART and wt == wire.LEN:
            part = wire.packed_array(buf, wt, a, b, self.dtype)
            self.parts.append(part)
            self.size += part.size
            return
        if wt == wire.LEN and (b - a) % np.dtype(self.dtype).itemsize:
            raise ValueError("packed field length is not a multiple of the element size")
        if b == a:
            return
        if not self.parts or not isinstance(self.parts[-1], bytearray):
            self.parts.append(bytearray())
        self.parts[-1] += buf[a:b]
        self.size += (b - a) // np.dtype(self.dtype).itemsize

    def array(self) -> np.ndarray:
        arrays = [np.frombuffer(p, dtype=self.dtype) if isinstance(p, bytearray) else p for p in self.parts]
        if len(arrays) == 1:
            return arrays[0]
        return np.concatenate(arrays) if arrays else np.zeros(0, np.float32)


def _parse_blob(buf, start: int, end: int, where: str, budget: Optional[limits.FileBudget] = None,
                index: Optional[int] = None) -> CaffeBlob:
    """One BlobProto; its shape is checked (axes, elements, the file's totals in ``budget``)
    before any of its data is gathered or copied."""
    budget = budget if budget is not None else limits.FileBudget(where)
    dims: List[int] = []
    legacy = {}
    data = _Parts("<f4")
    double = _Parts("<f8")
    for num, wt, a, b in wire.fields(buf, start, end):
        if num == 7:  # shape: BlobShape { repeated int64 dim = 1 [packed] }
            wire.expect_wire(num, wt, (wire.LEN,), "BlobProto.shape")
            for n2, w2, a2, b2 in wire.fields(buf, a, b):
                if n2 != 1:
                    continue
                wire.expect_wire(n2, w2, (wire.LEN, wire.VARINT), "BlobShape.dim")
                if w2 == wire.LEN:
                    p = a2
                    while p < b2:
                        v, p = wire.read_varint(buf, p, b2)
                        dims.append(wire.as_int64(v))
                        budget.axes(len(dims), blob=index, error=WeightsError)  # stop at 33
                else:
                    dims.append(wire.as_int64(a2))
                    budget.axes(len(dims), blob=index, error=WeightsError)
        elif num == 5:
            wire.expect_wire(num, wt, (wire.LEN, wire.I32), "BlobProto.data")
            data.add(buf, wt, a, b)
        elif num == 8:
            wire.expect_wire(num, wt, (wire.LEN, wire.I64), "BlobProto.double_data")
            double.add(buf, wt, a, b)
        elif num in (1, 2, 3, 4):
            wire.expect_wire(num, wt, (wire.VARINT,), "BlobProto.num/channels/height/width")
            legacy[num] = wire.as_int32(a)
        # diff (6) and double_diff (9) are ignored: weights only
    # Caffe's rule (Blob::FromProto and Blob::ShapeEquals alike): when any legacy
    # num/channels/height/width is present, the shape is that 4-D one (unset ones 0) and
    # `shape` is ignored; otherwise shape.dim
    if legacy:
        shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
        is_legacy = True
    elif dims:
        shape, is_legacy = tuple(dims), False
    else:
        shape, is_legacy = None, False
    parts = double if double.size else data
    if shape is None:
        shape = (parts.size,)
    if any(d < 0 for d in shape):
        raise WeightsError(f"blob has a negative dimension in shape {shape}", where=where)
    count = limits.element_count(shape)
    limit = _max_blob_elements()
    if count > limit:
        raise LimitError(f"blob shape {shape} has {count} elements, over the limit of {limit} "
                         f"({limits.how_to_raise('max_blob_elements')})", where=where)
    budget.blob(shape, blob=index, error=WeightsError)
    if parts.size != count:
        raise WeightsError(f"blob declares shape {shape} but holds {parts.size} values", where=where,
                           expected=f"{count} values", got=parts.size)
    return CaffeBlob(tuple(int(d) for d in shape), parts.array().reshape(shape), is_legacy)


@functools.lru_cache(maxsize=None)
def _v1_type_names() -> Dict[int, str]:
    return {v.number: v.name for v in caffe_pb2.V1LayerParameter.LayerType.DESCRIPTOR.values}


def _v1_type_name(value: int) -> str:
    return _v1_type_names().get(value, str(value))


def read_caffemodel(path: str) -> Tuple[str, List[CaffeLayerWeights]]:
    """(net name, layers with blobs) of a binary caffemodel, V0/V1/current formats.

    Blob arrays are read-only views on a memory map of the file (no copy); copy what you
    keep beyond the life of the returned objects.
    """
    path = os.fspath(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ParseError("is a directory, expected a .caffemodel file", where=path)
        f = open(path, "rb")
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ParseError(f"cannot read caffemodel: {reason}", where=str(path)) from None
    with f:
        if stat.S_ISREG(st.st_mode):
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        else:  # a pipe or device: no mmap
            buf = f.read()
            size = len(buf)
    if size == 0:
        raise ParseError("empty file, expected a binary .caffemodel", where=path)
    if hdf5_hint(buf):
        raise ParseError(f"not a binary caffemodel{hdf5_hint(buf)}", where=path)
    layers: List[CaffeLayerWeights] = []
    budget = limits.FileBudget(path)  # layers, blobs and elements of the whole file
    knob = limits.raised(max_blob_elements=MAX_BLOB_ELEMENTS) if MAX_BLOB_ELEMENTS is not None \
        else contextlib.nullcontext()
    try:
        with knob:
            name = _read_layers(buf, size, path, budget, layers)
    except (ValueError, IndexError, OverflowError) as e:
        raise ParseError(f"corrupt or truncated caffemodel: {e}{_text_hint(buf) or hdf5_hint(buf)}",
                         where=path) from None
    if not layers and _text_hint(buf):
        raise ParseError(f"no layers found{_text_hint(buf)}", where=path)
    return name, layers


def _read_layers(buf, size: int, path: str, budget: limits.FileBudget,
                 layers: List[CaffeLayerWeights]) -> str:
    """The NetParameter's layers onto ``layers``; returns its name.  Each layer is counted
    before it is parsed and each blob charged before its data is gathered (``budget``)."""
    name = ""
    for num, wt, a, b in wire.fields(buf, 0, size):
        if num == 1:
            wire.expect_wire(num, wt, (wire.LEN,), "NetParameter.name")
            name = bytes(buf[a:b]).decode("utf-8", "replace")
        elif num in (100, 2):
            wire.expect_wire(num, wt, (wire.LEN,),
                             "NetParameter.layer" if num == 100 else "NetParameter.layers")
            try:
                budget.layer()
                layers.append(_parse_layer(buf, a, b, v1=(num == 2), where=path, budget=budget))
            except CaffeCompatError as e:
                raise e.located(where=path, layer=_layer_name_guess(buf, a, b, num == 2)) from None
    return name


def _layer_name_guess(buf, start: int, end: int, v1: bool) -> Optional[str]:
    """The layer's name (field 1) for error messages, or None when unreadable."""
    try:
        for num, wt, a, b in wire.fields(buf, start, end):
            if num == (4 if v1 else 1) and wt == wire.LEN:
                return bytes(buf[a:b]).decode("utf-8", "replace") or None
    except ValueError:
        return None
    return None


def _append_blob(blobs: List[CaffeBlob], buf, a: int, b: int, where: str,
                 budget: limits.FileBudget) -> None:
    """Parse the BlobProto in ``buf[a:b]`` onto ``blobs``; an error names its index."""
    try:
        blobs.append(_parse_blob(buf, a, b, where, budget, len(blobs)))
    except CaffeCompatError as e:
        raise e.located(blob=len(blobs)) from None


class _ListLengths:
    """Counts each field number of one message on the wire and refuses one repeated more
    than ``max_list_length`` times, before protobuf builds the message (a layer of ten
    million empty ``bottom`` or ``param {}`` fields would cost gigabytes as objects)."""

    def __init__(self, message, where: str):
        self.message = message  # the protobuf class, for the field's name
        self.where = where
        self.limit = limits.get("max_list_length")
        self.counts: Dict[int, int] = {}

    def add(self, num: int) -> None:
        n = self.counts.get(num, 0) + 1
        self.counts[num] = n
        if n > self.limit:
            fd = self.message.DESCRIPTOR.fields_by_number.get(num)
            name = f"{self.message.DESCRIPTOR.name}.{fd.name}" if fd is not None else "an unknown field"
            raise LimitError(f"field {num} ({name}) is repeated more than {self.limit} times "
                             f"({limits.how_to_raise('max_list_length')})", where=self.where)


def _parse_layer(buf, start: int, end: int, *, v1: bool, where: str,
                 budget: limits.FileBudget) -> CaffeLayerWeights:
    blob_field = 6 if v1 else 7
    type_name = ""
    rest = bytearray()
    blobs: List[CaffeBlob] = []
    v0: Optional[Tuple[int, int]] = None
    lengths = _ListLengths(caffe_pb2.V1LayerParameter if v1 else caffe_pb2.LayerParameter, where)
    for num, wt, a, b in wire.fields(buf, start, end):
        lengths.add(num)
        if num == blob_field:
            wire.expect_wire(num, wt, (wire.LEN,), "blobs")
            _append_blob(blobs, buf, a, b, where, budget)
            continue
        if v1 and num == 1:  # V0LayerParameter nested as `layer`
            wire.expect_wire(num, wt, (wire.LEN,), "V1LayerParameter.layer")
            v0 = (a, b)
            continue
        if not v1 and num == 2 and wt == wire.LEN:
            type_name = bytes(buf[a:b]).decode("utf-8", "replace")
        rest += wire.encode_field(num, wt, buf, a, b)  # for protobuf (small: names, params)
    skipped: List[int] = []
    if v1:
        msg = caffe_pb2.V1LayerParameter()
        try:
            msg.ParseFromString(bytes(rest))
        except Exception as e:  # protobuf's DecodeError and friends
            raise ParseError(f"corrupt layer definition: {e}", where=where) from None
    else:  # a fork's layer is read with that fork's field numbers (caffe_compat.forks)
        msg, skipped = decode_layer(bytes(rest), type_name)
    if v1:
        lname, ltype = msg.name, _v1_type_name(msg.type)
        if v0 is not None:  # V0: name, type and blobs (field 50) live in the nested message
            v0msg = caffe_pb2.V0LayerParameter()
            v0rest = bytearray()
            v0lengths = _ListLengths(caffe_pb2.V0LayerParameter, where)
            for num, wt, a, b in wire.fields(buf, v0[0], v0[1]):
                v0lengths.add(num)
                if num == 50:
                    wire.expect_wire(num, wt, (wire.LEN,), "V0LayerParameter.blobs")
                    _append_blob(blobs, buf, a, b, where, budget)
                    continue
                v0rest += wire.encode_field(num, wt, buf, a, b)
            try:
                v0msg.ParseFromString(bytes(v0rest))
            except Exception as e:  # protobuf's DecodeError and friends
                raise ParseError(f"corrupt V0 layer definition: {e}", where=where) from None
            lname, ltype = v0msg.name or lname, v0msg.type.upper() or ltype
    else:
        lname, ltype = msg.name, msg.type
    return CaffeLayerWeights(lname, ltype, blobs, msg, skipped)


def encode_blob(arr: np.ndarray) -> bytes:
    """A BlobProto (shape + packed float data) for ``arr``, as protobuf would serialize it."""
    shape = np.shape(arr)  # before ascontiguousarray, which makes a 0-D array 1-D
    a = np.ascontiguousarray(arr, dtype="<f4")
    data = wire.len_field(5, a.tobytes()) if a.size else b""
    dims = b"".join(wire.encode_varint(int(d)) for d in shape)
    shape = wire.len_field(7, wire.len_field(1, dims) if dims else b"")
    return data + shape


def write_caffemodel(path: str, name: str, layers: List[Tuple[object, List[np.ndarray]]]) -> None:
    """Write ``(LayerParameter, blob arrays)`` pairs as a binary NetParameter, atomically.

    Blobs are placed between the layer's fields numbered below and above 7, which is
    where protobuf's canonical (field-number) order puts them.
    """
    from caffe_compat.atomic import atomic_open

    with atomic_open(os.fspath(path)) as f:
        if name:
            f.write(wire.len_field(1, name.encode("utf-8")))
        for lp, arrays in layers:
            if isinstance(lp, caffe_pb2.LayerParameter):
                lp = as_written(lp)  # a fork's layer keeps that fork's field numbers
            head, tail = type(lp)(), type(lp)()
            head.CopyFrom(lp)
            tail.CopyFrom(lp)
            head.ClearField("blobs")
            tail.ClearField("blobs")
            for fd, _ in list(head.ListFields()):
                if fd.number > 7:
                    head.ClearField(fd.name)
            for fd, _ in list(tail.ListFields()):
                if fd.number < 7:
                    tail.ClearField(fd.name)
            body = [head.SerializeToString()]
            body += [wire.len_field(7, encode_blob(a)) for a in arrays]
            body.append(tail.SerializeToString())
            payload = b"".join(body)
            f.write(wire.encode_key(100, wire.LEN))
            f.write(wire.encode_varint(len(payload)))
            for part in body:
                f.write(part)


# ---------------------------------------------------------------------- names
#: state-dict names of layer types whose blobs are not (weight, bias): the attribute names
#: their ``add_blob`` calls use, so a caffemodel read without a net gets a net's keys
_KNOWN_BLOB_NAMES: Dict[str, Tuple[str, ...]] = {
    "BatchNorm": ("running_mean", "running_var", "scale_factor"),
    "Bias": ("bias",),
    "Parameter": ("blob",),
    "Python": tuple(f"blob{i}" for i in range(16)),
}


def blob_names_for(type_name: str, param, count: int) -> List[str]:
    """State-dict names for a layer's ``count`` blobs, without building the layer."""
    from caffe_compat.layers import registry

    names: Tuple[str, ...] = _KNOWN_BLOB_NAMES.get(type_name, ("weight", "bias"))
    try:
        cls = registry.resolve(param) if param is not None and hasattr(param, "python_param") \
            else registry.lookup(type_name)
        names = getattr(cls, "default_blob_names", names)
        fn = getattr(cls, "blob_names_for", None)
        if fn is not None and param is not None and hasattr(param, "python_param"):
            names = tuple(fn(param, count))
    except Exception:  # unknown type (e.g. a V1 enum name): generic names
        pass
    return [names[i] if i < len(names) else f"blob{i}" for i in range(count)]


_V1_TO_TYPE = {
    "CONVOLUTION": "Convolution", "INNER_PRODUCT": "InnerProduct", "DECONVOLUTION": "Deconvolution",
    "PRELU": "PReLU", "EMBED": "Embed",
}


def caffemodel_state_dict(path: str, *, check_finite: Optional[bool] = None) -> Dict[str, torch.Tensor]:
    """A caffemodel as a ``<layer>.<param>`` state dict, without a net definition.

    Legacy 4-D blobs keep their shape except where the layer type fixes it (InnerProduct
    weights are 2-D, biases and per-channel blobs 1-D); load through a net for exact shapes.
    NaN/Inf values are refused unless ``check_finite=False`` (or the environment says so).
    """
    path = os.fspath(path)
    finite = want_finite_check(check_finite)
    _, layers = read_caffemodel(path)
    sd: Dict[str, torch.Tensor] = {}
    for lw in layers:
        if not lw.blobs:
            continue
        t = _V1_TO_TYPE.get(lw.type, lw.type)
        names = blob_names_for(t, lw.param if not isinstance(lw.param, caffe_pb2.V1LayerParameter) else None,
                               len(lw.blobs))
        for i, (nm, blob) in enumerate(zip(names, lw.blobs)):
            arr = blob.data
            if finite:
                check_finite_array(arr, where=path, layer=lw.name, blob=i)
            if blob.legacy:
                if t == "InnerProduct" and nm == "weight" and blob.shape[0] * blob.shape[1] == 1:
                    arr = arr.reshape(blob.shape[-2], blob.shape[-1])
                elif nm != "weight" or t in ("PReLU",):
                    arr = arr.reshape(-1)
            key = f"{lw.name}.{nm}"
            if key in sd:
                raise WeightsError(f"two layers named '{lw.name}' hold weights; a state dict needs "
                                   "unique names (convert with --model to pick the net's layers)",
                                   where=path, layer=lw.name)
            out = torch.empty(tuple(arr.shape), dtype=torch.float32)
            with np.errstate(over="ignore"):  # double_data over float32 only with check_finite off
                copy_blob(out, arr if arr.dtype == np.float32 else arr.astype(np.float32))
            sd[key] = out
    return sd


def load_caffemodel_into(net, path: str, *, allow_missing: bool = False,
                         check_finite: Optional[bool] = None) -> List[str]:
    """Copy a caffemodel's blobs into ``net`` by layer name (Caffe's CopyTrainedLayersFrom).

    Source layers the net lacks are ignored (reported); net layers with blobs that the
    file lacks are an error unless ``allow_missing`` (the py-faster-rcnn issue-256 trap:
    renamed layers must not be skipped silently).  Every blob's shape must match, and
    every value must be finite unless ``check_finite=False`` (or
    ``$CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1``).
    """
    path = os.fspath(path)
    _, layers = read_caffemodel(path)
    return load_layers_into(net, layers, path, allow_missing=allow_missing, check_finite=check_finite)


def net_layers_for_caffemodel(net) -> List[Tuple[object, List[np.ndarray]]]:
    """``(LayerParameter without blobs, blob arrays)`` of each built layer, for
    :func:`write_caffemodel` (Caffe's ``Net::ToProto``: each layer records its phase)."""
    out = []
    for e in net.entries:
        if e.module is None:
            continue
        blobs = e.module.caffe_blobs()
        lp = caffe_pb2.LayerParameter()
        lp.CopyFrom(e.module.param)
        lp.ClearField("blobs")
        if not lp.HasField("phase"):
            lp.phase = net.state.phase
        out.append((lp, [b.detach().cpu().float().numpy() for b in blobs]))
    return out
