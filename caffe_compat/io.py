"""Reading and writing Caffe's file formats: text prototxt, binary caffemodel, binaryproto.

Everything read here is upgraded to the current schema (``caffe_compat.upgrade``) exactly as
Caffe's ``ReadNetParamsFromTextFileOrDie`` / ``ReadProtoFromBinaryFile`` + ``upgrade_proto``
would, so the rest of the project only ever sees V2 ``layer {}`` definitions.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
from google.protobuf import message as _pb_message
from google.protobuf import text_format

from caffe_compat.errors import ParseError
from caffe_compat.protos import caffe_pb2

PathOrText = Union[str, "os.PathLike[str]"]


def _looks_like_text(s: str) -> bool:
    return "\n" in s or "{" in s or ":" in s and not os.path.exists(s)


def parse_text(text: str, message, filename: str = "<string>"):
    """Parse prototxt ``text`` into ``message``; errors name file:line:col and the token."""
    try:
        text_format.Merge(text, message, allow_unknown_extension=False)
    except text_format.ParseError as e:
        line, col = e.GetLine(), e.GetColumn()
        msg = str(e)
        # protobuf prefixes "line:col : "; keep only the reason
        if line is not None and msg.startswith(f"{line}:"):
            msg = msg.split(" : ", 1)[-1]
        src = ""
        lines = text.splitlines()
        if line is not None and 1 <= line <= len(lines):
            snippet = lines[line - 1].strip()
            if len(snippet) > 80:
                snippet = snippet[:77] + "..."
            src = f" (in: {snippet!r})"
        where = f"{filename}:{line}:{col}" if line is not None else filename
        raise ParseError(msg + src, where=where) from None
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text: {e}", where=filename) from None
    return message


def read_text_file(path: PathOrText) -> str:
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ParseError(f"cannot read: {e.strerror}", where=path) from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ParseError(f"not UTF-8 text (byte {e.start}); is this a binary caffemodel?",
                         where=path) from None


def read_net_text(source: PathOrText, *, upgrade: bool = True) -> "caffe_pb2.NetParameter":
    """A NetParameter from a prototxt path (or prototxt text), upgraded to the current format."""
    src = os.fspath(source)
    if os.path.exists(src) or not _looks_like_text(src):
        text, name = read_text_file(src), src
    else:
        text, name = src, "<string>"
    net = parse_text(text, caffe_pb2.NetParameter(), name)
    if upgrade:
        from caffe_compat.upgrade import upgrade_net

        net = upgrade_net(net, source=name)
    return net


def read_solver_text(source: PathOrText, *, upgrade: bool = True) -> "caffe_pb2.SolverParameter":
    """A SolverParameter from a path (or text), with the solver-type enum upgraded."""
    src = os.fspath(source)
    if os.path.exists(src) or not _looks_like_text(src):
        text, name = read_text_file(src), src
    else:
        text, name = src, "<string>"
    solver = parse_text(text, caffe_pb2.SolverParameter(), name)
    if upgrade:
        from caffe_compat.upgrade import upgrade_solver

        solver = upgrade_solver(solver, source=name)
    return solver


def parse_binary(data: bytes, message, filename: str = "<bytes>"):
    """Parse binary protobuf bytes into ``message`` with a clear error when corrupt."""
    try:
        message.ParseFromString(data)
    except (_pb_message.DecodeError, RuntimeError, ValueError) as e:
        raise ParseError(f"corrupt or truncated {message.DESCRIPTOR.name} ({len(data)} bytes): {e}",
                         where=filename) from None
    return message


def read_binaryproto(path: PathOrText) -> np.ndarray:
    """A ``.binaryproto`` mean file (a BlobProto) as a float32 array in the blob's shape."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ParseError(f"cannot read: {e.strerror}", where=path) from None
    blob = parse_binary(data, caffe_pb2.BlobProto(), path)
    return blob_to_array(blob, where=path)


def blob_shape(blob: "caffe_pb2.BlobProto") -> tuple:
    """A BlobProto's shape: ``shape.dim``, else the legacy 4-D num/channels/height/width."""
    if blob.HasField("shape"):
        return tuple(int(d) for d in blob.shape.dim)
    if any(blob.HasField(f) for f in ("num", "channels", "height", "width")):
        return (blob.num, blob.channels, blob.height, blob.width)
    n = len(blob.data) or len(blob.double_data)
    return (n,) if n else (0,)


def blob_to_array(blob: "caffe_pb2.BlobProto", *, where: Optional[str] = None,
                  dtype=np.float32) -> np.ndarray:
    """A BlobProto's data as an array in its shape (double_data when that is what it holds)."""
    from caffe_compat.errors import WeightsError

    shape = blob_shape(blob)
    if len(blob.double_data):
        arr = np.asarray(blob.double_data, dtype=np.float64)
    else:
        arr = np.asarray(blob.data, dtype=np.float32)
    expected = int(np.prod(shape, dtype=np.int64))
    if arr.size != expected:
        raise WeightsError(f"blob declares shape {shape} ({expected} values) but holds {arr.size}",
                           where=where)
    return arr.reshape(shape).astype(dtype, copy=False)


def array_to_blob(arr, blob: Optional["caffe_pb2.BlobProto"] = None,
                  *, legacy_dims: bool = False) -> "caffe_pb2.BlobProto":
    """An array as a BlobProto (``shape`` field, or legacy 4-D dims when asked)."""
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    b = blob if blob is not None else caffe_pb2.BlobProto()
    b.Clear()
    if legacy_dims:
        dims = (1,) * (4 - a.ndim) + a.shape if a.ndim <= 4 else a.shape
        b.num, b.channels, b.height, b.width = (int(d) for d in dims[-4:])
    else:
        b.shape.dim.extend(int(d) for d in a.shape)
    b.data.extend(a.ravel().tolist())
    return b


def write_text(message, path: PathOrText) -> None:
    from caffe_compat.atomic import atomic_write

    atomic_write(os.fspath(path), text_format.MessageToString(message).encode("utf-8"))
