"""Protobuf text format written the way Caffe's C++ ``WriteProtoToTextFile`` writes it.

Python's ``text_format`` and C++'s ``TextFormat::Print`` agree on everything Caffe's
messages use except numbers: Python prints a float ``1`` as ``1.0`` and ``1.2345678`` in
its shortest form, C++ as ``1`` and ``1.23456776`` (``%.6g``, or ``%.9g`` when six digits do
not give the float back; ``%.15g``/``%.17g`` for doubles).  An upgraded prototxt written
with these rules is byte-identical to what Caffe's ``upgrade_net_proto_text`` writes, so
the result diffs cleanly against files produced by Caffe.
"""
from __future__ import annotations

import math
from typing import List

import numpy as np
from google.protobuf import descriptor
from google.protobuf import text_encoding

__all__ = ["to_text", "format_float", "format_double", "is_repeated"]

_FD = descriptor.FieldDescriptor


def format_float(v: float) -> str:
    """A float field as C++ protobuf prints it (``SimpleFtoa``)."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = "%.6g" % v
    if np.float32(float(s)) != np.float32(v):
        s = "%.9g" % v
    return s


def format_double(v: float) -> str:
    """A double field as C++ protobuf prints it (``SimpleDtoa``)."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    s = "%.15g" % v
    if float(s) != v:
        s = "%.17g" % v
    return s


def _scalar(field, value) -> str:
    t = field.type
    if t == _FD.TYPE_FLOAT:
        return format_float(value)
    if t == _FD.TYPE_DOUBLE:
        return format_double(value)
    if t == _FD.TYPE_BOOL:
        return "true" if value else "false"
    if t == _FD.TYPE_ENUM:
        v = field.enum_type.values_by_number.get(value)
        return v.name if v is not None else str(value)
    if t in (_FD.TYPE_STRING, _FD.TYPE_BYTES):
        return '"' + text_encoding.CEscape(value, False) + '"'
    return str(value)


def is_repeated(field) -> bool:
    """``field.is_repeated`` (protobuf >= 5.28; ``label`` is gone in 7.x) or ``label``."""
    flag = getattr(field, "is_repeated", None)
    return bool(flag) if flag is not None else field.label == _FD.LABEL_REPEATED


def _print(msg, indent: int, out: List[str]) -> None:
    pad = " " * indent
    for field, value in msg.ListFields():  # known fields, in field-number order, as C++
        values = value if is_repeated(field) else [value]
        for v in values:
            if field.type in (_FD.TYPE_MESSAGE, _FD.TYPE_GROUP):
                out.append(f"{pad}{field.name} {{\n")
                _print(v, indent + 2, out)
                out.append(f"{pad}}}\n")
            else:
                out.append(f"{pad}{field.name}: {_scalar(field, v)}\n")


def to_text(msg) -> str:
    """``msg`` in C++ ``TextFormat::Print`` layout (two-space indent, one field a line)."""
    out: List[str] = []
    _print(msg, 0, out)
    return "".join(out)
