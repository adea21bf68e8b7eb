"""Weights in and out: ``.caffemodel`` <-> nets <-> ``.pt`` / ``.safetensors`` (and Caffe's
HDF5 ``.h5`` layout, in ``caffe_compat.hdf5_format``).

Reading a caffemodel does not go through protobuf for the blob payloads: a VGG16 file is
~550 MB of packed floats, which protobuf's Python runtime would turn into lists.  The
file is memory-mapped and walked at the wire level; each blob's packed ``data`` field
becomes a zero-copy ``np.frombuffer`` view, and only the small non-blob part of each
layer is parsed by protobuf.  Writing does the reverse (layer fields by protobuf, blob
payloads as raw little-endian bytes) and keeps protobuf's field order, so a file we write
is what protobuf itself would write.

State-dict keys are ``<layer>.<param>`` in PyTorch's vocabulary (see README "Weights"):
Convolution/InnerProduct/Deconvolution/Embed ``weight``, ``bias``; PReLU ``weight``;
Scale ``weight`` (+ ``bias``); Bias ``bias``; BatchNorm ``running_mean``, ``running_var``,
``scale_factor`` holding Caffe's three blobs as stored (the mean/variance *sums* and their
scale factor; the layer divides at run time, so a caffemodel round trip is bit-exact);
``fold_batchnorm`` turns them into plain statistics with a scale factor of 1.
"""
from __future__ import annotations

import mmap
import os
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from caffe_compat import limits
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, WeightsError
from caffe_compat.forks import as_written, decode_layer
from caffe_compat.protos import caffe_pb2

# wire types
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_WIRE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 3: "start-group",
               4: "end-group", 5: "fixed32"}

#: Refuse blobs larger than this many elements.  ``None`` (the default) means
#: ``caffe_compat.limits.max_blob_elements()`` (2^31, or $CAFFE_COMPAT_MAX_BLOB_ELEMENTS);
#: assigning an int here overrides it for this module (kept for compatibility).
MAX_BLOB_ELEMENTS: Optional[int] = None

#: environment variable that turns off the NaN/Inf check when loading weights
ENV_ALLOW_NONFINITE = "CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS"


def _max_blob_elements() -> int:
    return MAX_BLOB_ELEMENTS if MAX_BLOB_ELEMENTS is not None else limits.max_blob_elements()


def _want_finite_check(check_finite: Optional[bool]) -> bool:
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


@dataclass
class CaffeBlob:
    shape: Tuple[int, ...]
    data: np.ndarray          # float32 or float64, already in ``shape``
    legacy: bool = False      # shape came from num/channels/height/width


@dataclass
class CaffeLayerWeights:
    name: str
    type: str
    blobs: List[Optional[CaffeBlob]] = field(default_factory=list)  # None: absent (HDF5 sharers)
    param: Optional[object] = None  # the layer's LayerParameter / V1LayerParameter (no blobs)
    #: top-level field numbers of the layer's definition that no known schema decodes
    #: (skipped by wire type; the blobs do not depend on them)
    skipped_fields: List[int] = field(default_factory=list)


def _varint(buf, pos: int, end: int) -> Tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _expect_wire(num: int, wt: int, allowed: Tuple[int, ...], what: str) -> None:
    """A field we interpret must have the wire type the schema gives it."""
    if wt not in allowed:
        raise ValueError(f"field {num} ({what}) has wire type {_WIRE_NAMES.get(wt, wt)}, "
                         f"expected {' or '.join(_WIRE_NAMES[a] for a in allowed)}")


def _fields(buf, start: int, end: int):
    """Yield (field_number, wire_type, value_start, value_end_or_int) over a message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wt == _VARINT:
            v, pos = _varint(buf, pos, end)
            yield num, wt, v, None
        elif wt == _LEN:
            ln, pos = _varint(buf, pos, end)
            if pos + ln > end:
                raise ValueError(f"field {num} runs past the end of its message")
            yield num, wt, pos, pos + ln
            pos += ln
        elif wt == _I32:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            yield num, wt, pos, pos + 4
            pos += 4
        elif wt == _I64:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            yield num, wt, pos, pos + 8
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wt} (field {num})")
    if pos != end:
        raise ValueError("message overruns its length")


def _packed_or_single(buf, wt, a, b, dtype: str, size: int, acc: list) -> None:
    if wt == _LEN:
        if (b - a) % size:
            raise ValueError("packed field length is not a multiple of the element size")
        acc.append(np.frombuffer(buf, dtype=dtype, count=(b - a) // size, offset=a))
    else:
        acc.append(np.frombuffer(buf, dtype=dtype, count=1, offset=a))


def _parse_blob(buf, start: int, end: int, where: str) -> CaffeBlob:
    dims: List[int] = []
    legacy = {}
    data_parts: list = []
    double_parts: list = []
    for num, wt, a, b in _fields(buf, start, end):
        if num == 7:  # shape: BlobShape { repeated int64 dim = 1 [packed] }
            _expect_wire(num, wt, (_LEN,), "BlobProto.shape")
            for n2, w2, a2, b2 in _fields(buf, a, b):
                if n2 != 1:
                    continue
                _expect_wire(n2, w2, (_LEN, _VARINT), "BlobShape.dim")
                if w2 == _LEN:
                    p = a2
                    while p < b2:
                        v, p = _varint(buf, p, b2)
                        dims.append(v - (1 << 64) if v >> 63 else v)
                else:
                    dims.append(a2 - (1 << 64) if a2 >> 63 else a2)
        elif num == 5:
            _expect_wire(num, wt, (_LEN, _I32), "BlobProto.data")
            _packed_or_single(buf, wt, a, b, "<f4", 4, data_parts)
        elif num == 8:
            _expect_wire(num, wt, (_LEN, _I64), "BlobProto.double_data")
            _packed_or_single(buf, wt, a, b, "<f8", 8, double_parts)
        elif num in (1, 2, 3, 4):
            _expect_wire(num, wt, (_VARINT,), "BlobProto.num/channels/height/width")
            v = a & 0xFFFFFFFF  # int32 fields: protobuf keeps the low 32 bits
            legacy[num] = v - (1 << 32) if v >> 31 else v
        # diff (6) and double_diff (9) are ignored: weights only
    if dims:
        shape, is_legacy = tuple(dims), False
    elif legacy:
        shape = tuple(legacy.get(i, 0) for i in (1, 2, 3, 4))
        is_legacy = True
    else:
        shape, is_legacy = None, False
    parts = double_parts if double_parts else data_parts
    if len(parts) == 1:
        data = parts[0]
    elif parts:
        data = np.concatenate(parts)
    else:
        data = np.zeros(0, np.float32)
    if shape is None:
        shape = (data.size,)
    if any(d < 0 for d in shape):
        raise WeightsError(f"blob has a negative dimension in shape {shape}", where=where)
    count = limits.element_count(shape)
    limit = _max_blob_elements()
    if count > limit:
        raise LimitError(f"blob shape {shape} has {count} elements, over the limit of {limit} "
                         f"({limits.how_to_raise('max_blob_elements')})", where=where)
    if data.size != count:
        raise WeightsError(f"blob declares shape {shape} but holds {data.size} values", where=where,
                           expected=f"{count} values", got=data.size)
    return CaffeBlob(tuple(int(d) for d in shape), data.reshape(shape), is_legacy)


_V1_TYPE_NAMES = None


def _v1_type_name(value: int) -> str:
    global _V1_TYPE_NAMES
    if _V1_TYPE_NAMES is None:
        from caffe_compat.protos.caffe_pb2 import V1LayerParameter

        _V1_TYPE_NAMES = {v.number: v.name for v in V1LayerParameter.LayerType.DESCRIPTOR.values}
    return _V1_TYPE_NAMES.get(value, str(value))



_PAGE = mmap.PAGESIZE


def _copy_blob(target: torch.Tensor, data: np.ndarray, chunk: int = 1 << 22,
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


def read_caffemodel(path: str) -> Tuple[str, List[CaffeLayerWeights]]:
    """(net name, layers with blobs) of a binary caffemodel, V0/V1/current formats.

    Blob arrays are read-only views on a memory map of the file (no copy); copy what you
    keep beyond the life of the returned objects.
    """
    import stat

    from caffe_compat.io import _text_hint

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
    if _hdf5_hint(buf):
        raise ParseError(f"not a binary caffemodel{_hdf5_hint(buf)}", where=path)
    name = ""
    layers: List[CaffeLayerWeights] = []
    try:
        for num, wt, a, b in _fields(buf, 0, size):
            if num == 1:
                _expect_wire(num, wt, (_LEN,), "NetParameter.name")
                name = bytes(buf[a:b]).decode("utf-8", "replace")
            elif num in (100, 2):
                _expect_wire(num, wt, (_LEN,), "NetParameter.layer" if num == 100 else "NetParameter.layers")
                try:
                    layers.append(_parse_layer(buf, a, b, v1=(num == 2), where=path))
                except CaffeCompatError as e:
                    raise e.located(where=path, layer=_layer_name_guess(buf, a, b, num == 2)) from None
    except (ValueError, IndexError, OverflowError) as e:
        raise ParseError(f"corrupt or truncated caffemodel: {e}{_text_hint(buf) or _hdf5_hint(buf)}",
                         where=path) from None
    if not layers and _text_hint(buf):
        raise ParseError(f"no layers found{_text_hint(buf)}", where=path)
    return name, layers


def _layer_name_guess(buf, start: int, end: int, v1: bool) -> Optional[str]:
    """The layer's name (field 1) for error messages, or None when unreadable."""
    try:
        for num, wt, a, b in _fields(buf, start, end):
            if num == (4 if v1 else 1) and wt == _LEN:
                return bytes(buf[a:b]).decode("utf-8", "replace") or None
    except ValueError:
        return None
    return None


def _parse_layer(buf, start: int, end: int, *, v1: bool, where: str) -> CaffeLayerWeights:
    blob_field = 6 if v1 else 7
    type_name = ""
    rest = bytearray()
    blobs: List[CaffeBlob] = []
    v0: Optional[Tuple[int, int]] = None
    for num, wt, a, b in _fields(buf, start, end):
        if num == blob_field:
            _expect_wire(num, wt, (_LEN,), "blobs")
            try:
                blobs.append(_parse_blob(buf, a, b, where))
            except CaffeCompatError as e:
                raise e.located(blob=len(blobs)) from None
            continue
        if v1 and num == 1:  # V0LayerParameter nested as `layer`
            _expect_wire(num, wt, (_LEN,), "V1LayerParameter.layer")
            v0 = (a, b)
            continue
        if not v1 and num == 2 and wt == _LEN:
            type_name = bytes(buf[a:b]).decode("utf-8", "replace")
        # re-encode this field for protobuf (small: names, params)
        key = (num << 3) | wt
        rest += _encode_varint(key)
        if wt == _VARINT:
            rest += _encode_varint(a)
        elif wt == _LEN:
            rest += _encode_varint(b - a)
            rest += buf[a:b]
        else:
            rest += buf[a:b]
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
            for num, wt, a, b in _fields(buf, v0[0], v0[1]):
                if num == 50:
                    _expect_wire(num, wt, (_LEN,), "V0LayerParameter.blobs")
                    try:
                        blobs.append(_parse_blob(buf, a, b, where))
                    except CaffeCompatError as e:
                        raise e.located(blob=len(blobs)) from None
                    continue
                v0rest += _encode_varint((num << 3) | wt)
                if wt == _VARINT:
                    v0rest += _encode_varint(a)
                elif wt == _LEN:
                    v0rest += _encode_varint(b - a)
                    v0rest += buf[a:b]
                else:
                    v0rest += buf[a:b]
            try:
                v0msg.ParseFromString(bytes(v0rest))
            except Exception as e:  # protobuf's DecodeError and friends
                raise ParseError(f"corrupt V0 layer definition: {e}", where=where) from None
            lname, ltype = v0msg.name or lname, v0msg.type.upper() or ltype
    else:
        lname, ltype = msg.name, msg.type
    return CaffeLayerWeights(lname, ltype, blobs, msg, skipped)


def _encode_varint(v: int) -> bytes:
    if v < 0:
        v += 1 << 64
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _len_field(num: int, payload: bytes) -> bytes:
    return _encode_varint((num << 3) | _LEN) + _encode_varint(len(payload)) + payload


def encode_blob(arr: np.ndarray) -> bytes:
    """A BlobProto (shape + packed float data) for ``arr``, as protobuf would serialize it."""
    a = np.ascontiguousarray(arr, dtype="<f4")
    data = _len_field(5, a.tobytes()) if a.size else b""
    dims = b"".join(_encode_varint(int(d)) for d in a.shape)
    shape = _len_field(7, _len_field(1, dims) if dims else b"")
    return data + shape


def write_caffemodel(path: str, name: str, layers: List[Tuple[object, List[np.ndarray]]]) -> None:
    """Write ``(LayerParameter, blob arrays)`` pairs as a binary NetParameter, atomically.

    Blobs are placed between the layer's fields numbered below and above 7, which is
    where protobuf's canonical (field-number) order puts them.
    """
    from caffe_compat.atomic import atomic_open

    with atomic_open(os.fspath(path)) as f:
        if name:
            f.write(_len_field(1, name.encode("utf-8")))
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
            body += [_len_field(7, encode_blob(a)) for a in arrays]
            body.append(tail.SerializeToString())
            payload = b"".join(body)
            f.write(_encode_varint((100 << 3) | _LEN))
            f.write(_encode_varint(len(payload)))
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
    finite = _want_finite_check(check_finite)
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
                _copy_blob(out, arr if arr.dtype == np.float32 else arr.astype(np.float32))
            sd[key] = out
    return sd


# ---------------------------------------------------------------------- nets
def _legacy_shape(shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """Caffe's LegacyShape view of a target blob: left-padded with 1s to 4 axes."""
    return (1,) * (4 - len(shape)) + tuple(shape) if len(shape) <= 4 else tuple(shape)


def _shape_matches(target: Tuple[int, ...], blob: CaffeBlob) -> bool:
    if tuple(target) in ((), (1,)) and blob.shape in ((), (1,)):
        return True  # Caffe writes a 0-D blob (Normalize's shared scale) with no dims at all
    if blob.legacy:
        return len(target) <= 4 and _legacy_shape(target) == blob.shape
    return tuple(target) == blob.shape


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
    """Copy ``layers``' blobs into ``net`` by layer name, with the policy of
    :func:`load_caffemodel_into` (shared by every Caffe weights format).

    ``sparse`` (HDF5): a blob may be ``None`` (or the list short) where the net's blob
    shares an earlier layer's tensor -- Caffe's ``ToHDF5`` stores owners only -- and a
    layer whose blobs are all such sharers counts as loaded.  ``blob.data`` may be any
    array-like (an h5py dataset is read when copied).
    """
    finite = _want_finite_check(check_finite)
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
            _copy_blob(t, blob.data, check=check)
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


def net_state_dict(net, *, dedupe_shared: bool = False) -> Dict[str, torch.Tensor]:
    """The net's state dict; with ``dedupe_shared`` only the owner's key of a shared param."""
    sd = net.state_dict()
    if not dedupe_shared:
        return sd
    seen: Dict[int, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.data_ptr(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out


def _key_location(net, key: str) -> Tuple[str, Optional[int]]:
    """(layer, blob index) of state-dict key ``<layer>.<attr>``, for error messages."""
    layer, _, attr = key.rpartition(".")
    mod = net._modules.get(layer)
    names = getattr(mod, "blob_names", None) or []
    return layer, (names.index(attr) if attr in names else None)


def load_state_into(net, sd: Dict[str, torch.Tensor], *, allow_missing: bool = False,
                    where: str = "", check_finite: Optional[bool] = None) -> List[str]:
    """Load a state dict (from .pt/.safetensors) strictly, naming any mismatch clearly."""
    finite = _want_finite_check(check_finite)
    own = net.state_dict()
    notes = []
    # shared params saved once: fill the sharers' keys from their owners
    for k, v in own.items():
        if k not in sd:
            for k2, v2 in own.items():
                if k2 in sd and v.numel() and v2.data_ptr() == v.data_ptr() and v2.shape == v.shape:
                    sd[k] = sd[k2]
                    break
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if unexpected:
        raise WeightsError(f"the file has keys the net lacks: {', '.join(unexpected[:10])}"
                           + (" ..." if len(unexpected) > 10 else ""), where=where)
    if missing:
        msg = f"the file lacks keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
        if not allow_missing:
            raise WeightsError(msg + " (use allow_missing / --allow-missing)", where=where)
        notes.append(msg)
    for k in [k for k in own if k in sd]:  # the net's (Caffe's) order, not the file's
        v = sd[k]
        layer, idx = _key_location(net, k)
        if tuple(v.shape) != tuple(own[k].shape):
            raise WeightsError(f"shape mismatch for '{k}': the net expects {tuple(own[k].shape)}, "
                               f"the file has {tuple(v.shape)}", where=where or None, layer=layer, blob=idx)
        if not (v.is_floating_point() or v.dtype == own[k].dtype):
            raise WeightsError(f"'{k}' has dtype {v.dtype}, expected a floating-point tensor",
                               where=where or None, layer=layer, blob=idx)
        if finite and v.is_floating_point():
            check_finite_array(v.detach().cpu().float().numpy() if v.dtype == torch.bfloat16
                               else v.detach().cpu().numpy(), where=where, layer=layer, blob=idx, name=k)
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return notes


def _file_kind_hint(path: str) -> str:
    """'; it looks like ...' for a weights file that is something else."""
    from caffe_compat.io import _text_hint

    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return ""
    if head.startswith(b"PK\x03\x04"):
        return ""
    hint = _text_hint(head)
    if hint:
        return ("; it looks like a text prototxt (py-faster-rcnn names net definitions .pt), "
                "not a weights file")
    if head[:1] in (b"\x0a", b"\xa2"):
        return "; it looks like a binary caffemodel: name it .caffemodel"
    return _hdf5_hint(head)


#: Caffe reads any weights file whose name ends like this as HDF5 (CopyTrainedLayersFrom)
HDF5_SUFFIX = ".h5"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _hdf5_hint(head) -> str:
    """'; it looks like an HDF5 file ...' for HDF5 content under another name."""
    if bytes(head[:8]) == HDF5_SIGNATURE:
        return ("; it looks like an HDF5 file: Caffe's HDF5 weights must be named *.h5 "
                "(e.g. model.caffemodel.h5)")
    return ""


def _torch_load_reason(e: Exception) -> str:
    """The reason in torch.load's error, without its advice to turn weights_only off."""
    import re

    text = str(e)
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Please use|\s*Check the documentation|$)", text, re.S)
    reason = " ".join((m.group(1) if m else text).split()).rstrip(".")
    return reason if len(reason) <= 300 else reason[:297] + "..."


def read_state_file(path: str) -> Dict[str, torch.Tensor]:
    """A .pt or .safetensors file as a state dict, never running code from it.

    ``.pt`` files load with ``torch.load(weights_only=True)``: a pickle that would import or
    call anything beyond tensors and containers is refused, not executed.
    """
    import stat

    path = os.fspath(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ParseError(f"cannot read weights: {reason}", where=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ParseError("is a directory, expected a weights file", where=path)
    if st.st_size == 0:
        raise ParseError("empty file, expected a weights file", where=path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return dict(load_file(path))
        except Exception as e:
            raise ParseError(f"not a readable safetensors file: {e}{_file_kind_hint(path)}",
                             where=path) from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = _torch_load_reason(e)
        raise ParseError(f"not a readable weights-only .pt file (refusing to unpickle anything "
                         f"but tensors): {msg}{_file_kind_hint(path)}", where=path) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        held = type(obj).__name__
        if isinstance(obj, dict):
            held = f"a dict with keys {', '.join(map(str, list(obj)[:5]))}"
            if "state_dict" in obj:
                held += " (a training checkpoint? save its 'state_dict')"
        raise WeightsError(f"a .pt weights file must hold a dict of tensors (a state dict), "
                           f"this one holds {held}", where=path)
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise WeightsError(f"state dict keys must be strings, got {bad[:3]}", where=path)
    return dict(obj)


def load_into(net, path: str, *, allow_missing: bool = False,
              check_finite: Optional[bool] = None) -> List[str]:
    """Load .caffemodel/.pt/.safetensors/.h5 weights into ``net`` (format by extension;
    like Caffe's CopyTrainedLayersFrom, any name ending in ``.h5`` is Caffe's HDF5 layout).

    ``check_finite`` (default: on, unless ``$CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1``)
    refuses NaN/Inf values, naming the layer and blob.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError("weights file not found", where=path)
    if path.endswith((".pt", ".pth", ".safetensors")):
        return load_state_into(net, read_state_file(path), allow_missing=allow_missing, where=path,
                               check_finite=check_finite)
    if path.endswith(HDF5_SUFFIX):
        from caffe_compat.hdf5_format import load_hdf5_into

        return load_hdf5_into(net, path, allow_missing=allow_missing, check_finite=check_finite)
    return load_caffemodel_into(net, path, allow_missing=allow_missing, check_finite=check_finite)


def net_layers_for_caffemodel(net) -> List[Tuple[object, List[np.ndarray]]]:
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


def save(net, path: str, **kw) -> None:
    """Write ``net``'s weights as .caffemodel, .pt, .safetensors or Caffe's HDF5 layout
    (``.h5``, e.g. ``model.caffemodel.h5``; ``write_diff=True`` adds the gradients), by
    extension."""
    from caffe_compat.atomic import atomic_open

    path = os.fspath(path)
    if path.endswith(HDF5_SUFFIX):
        from caffe_compat.hdf5_format import save_hdf5

        save_hdf5(net, path, **kw)
    elif path.endswith(".safetensors"):
        save_safetensors(net_state_dict(net, dedupe_shared=True), path)
    elif path.endswith((".pt", ".pth")):
        sd = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        with atomic_open(path) as f:
            torch.save(sd, f)
    else:
        write_caffemodel(path, net.net_name, net_layers_for_caffemodel(net))


def save_safetensors(sd: Dict[str, torch.Tensor], path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors, streamed tensor by tensor and atomically.

    The format (8-byte header length, JSON header, raw little-endian data) is written
    directly so that no second in-memory copy of the weights is built; any safetensors
    reader loads it.
    """
    import json

    from caffe_compat.atomic import atomic_open

    clean = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "caffe-compat"})}
    offset = 0
    for k, v in clean.items():
        if v.dtype not in _ST_DTYPES:
            raise WeightsError(f"cannot write dtype {v.dtype} to safetensors", layer=k.rsplit(".", 1)[0])
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_open(os.fspath(path)) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for v in clean.values():
            if v.numel():
                f.write(memoryview(v.view(torch.uint8).numpy() if v.dtype == torch.bfloat16
                                   else v.numpy()).cast("B"))


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def fold_batchnorm(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Divide BatchNorm mean/variance sums by their scale factor (0 -> 0); factor becomes 1.

    The result holds plain statistics, what ``torch.nn.BatchNorm*d`` expects in
    ``running_mean``/``running_var`` (Caffe's BatchNorm has no affine part: a following
    Scale layer's ``weight``/``bias`` are the BN's affine parameters).  The inverse is
    taken in the blob's own dtype, as Caffe's ``1 / blobs_[2][0]`` in ``Dtype``, so the
    folded statistics are bit-identical to what the layer computes at run time.
    """
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(".scale_factor"):
            base = k[: -len(".scale_factor")]
            s = v.reshape(-1)[:1] if v.numel() else torch.ones(1, dtype=v.dtype)
            inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
            for nm in ("running_mean", "running_var"):
                if f"{base}.{nm}" in out:
                    stat = sd[f"{base}.{nm}"]
                    out[f"{base}.{nm}"] = stat * inv.to(stat.dtype)
            out[k] = torch.ones_like(v)
    return out
