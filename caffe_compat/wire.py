"""The protocol-buffer wire format, read and written by hand.

Why not protobuf's runtime: a caffemodel is mostly packed floats (VGG16: ~550 MB), which
``ParseFromString`` would turn into Python lists; walking the wire format instead gives each
blob as a zero-copy ``np.frombuffer`` view and leaves the small rest to protobuf.  The same
walk lets a file be rewritten without parsing its payloads (``upgrade_files``) and a fork's
message be decoded field by field when protobuf refuses it as a whole (``forks``).

A message is a sequence of fields, each a key (``field_number << 3 | wire_type``) and a
value: a varint (:data:`VARINT`), 8 or 4 little-endian bytes (:data:`I64`, :data:`I32`),
or a length-prefixed byte run (:data:`LEN`: strings, nested messages, packed arrays).
Groups (wire types 3 and 4) are refused: no Caffe schema uses them.

Offsets are into a bytes-like buffer (``bytes``, ``bytearray``, ``mmap``, ``memoryview``);
a damaged message raises ``ValueError`` saying what is wrong, for the caller to locate.
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np

#: wire types
VARINT, I64, LEN, I32 = 0, 1, 2, 5
WIRE_NAMES = {0: "varint", 1: "fixed64", 2: "length-delimited", 3: "start-group",
              4: "end-group", 5: "fixed32"}

#: ``(field number, wire type, a, b)``: for a varint ``a`` is the value and ``b`` None, for
#: any other wire type ``buf[a:b]`` is the value's bytes (a LEN field's payload)
Field = Tuple[int, int, int, Optional[int]]

__all__ = ["VARINT", "I64", "LEN", "I32", "WIRE_NAMES", "Field", "read_varint", "fields",
           "expect_wire", "encode_varint", "encode_key", "len_field", "encode_field",
           "packed_array", "as_int32", "as_int64"]


def read_varint(buf, pos: int, end: int) -> Tuple[int, int]:
    """``(value, position after it)`` of the varint at ``pos`` (unsigned, at most 64 bits)."""
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


def fields(buf, start: int, end: int) -> Iterator[Field]:
    """The fields of the message in ``buf[start:end]``, in file order (see :data:`Field`)."""
    pos = start
    while pos < end:
        key, pos = read_varint(buf, pos, end)
        num, wt = key >> 3, key & 7
        if num == 0:
            raise ValueError("field number 0")
        if wt == VARINT:
            v, pos = read_varint(buf, pos, end)
            yield num, wt, v, None
        elif wt == LEN:
            ln, pos = read_varint(buf, pos, end)
            if pos + ln > end:
                raise ValueError(f"field {num} runs past the end of its message")
            yield num, wt, pos, pos + ln
            pos += ln
        elif wt == I32:
            if pos + 4 > end:
                raise ValueError("truncated fixed32")
            yield num, wt, pos, pos + 4
            pos += 4
        elif wt == I64:
            if pos + 8 > end:
                raise ValueError("truncated fixed64")
            yield num, wt, pos, pos + 8
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wt} (field {num})")
    if pos != end:
        raise ValueError("message overruns its length")


def expect_wire(num: int, wt: int, allowed: Tuple[int, ...], what: str) -> None:
    """Refuse a field whose wire type is not one the schema gives it (a damaged file)."""
    if wt not in allowed:
        raise ValueError(f"field {num} ({what}) has wire type {WIRE_NAMES.get(wt, wt)}, "
                         f"expected {' or '.join(WIRE_NAMES[a] for a in allowed)}")


def encode_varint(v: int) -> bytes:
    """``v`` as a varint; a negative value as its 64-bit two's complement (protobuf's int32/int64)."""
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


def encode_key(num: int, wt: int) -> bytes:
    """A field's key: its number and wire type."""
    return encode_varint((num << 3) | wt)


def len_field(num: int, payload: bytes) -> bytes:
    """A length-delimited field (a string, a nested message, a packed array)."""
    return encode_key(num, LEN) + encode_varint(len(payload)) + payload


def encode_field(num: int, wt: int, buf, a: int, b: Optional[int]) -> bytes:
    """One field as it stood in ``buf``, from what :func:`fields` yielded for it."""
    key = encode_key(num, wt)
    if wt == VARINT:
        return key + encode_varint(a)
    if wt == LEN:
        return key + encode_varint(b - a) + bytes(buf[a:b])
    return key + bytes(buf[a:b])


def packed_array(buf, wt: int, a: int, b: int, dtype: str) -> np.ndarray:
    """A repeated fixed-size field's values (``dtype`` such as ``"<f4"``), zero-copy: a packed
    run (LEN) or one unpacked element (I32/I64)."""
    size = np.dtype(dtype).itemsize
    if wt == LEN:
        if (b - a) % size:
            raise ValueError("packed field length is not a multiple of the element size")
        return np.frombuffer(buf, dtype=dtype, count=(b - a) // size, offset=a)
    return np.frombuffer(buf, dtype=dtype, count=1, offset=a)


def as_int32(v: int) -> int:
    """A varint read for an ``int32`` field: protobuf keeps the low 32 bits, signed."""
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >> 31 else v


def as_int64(v: int) -> int:
    """A varint read for an ``int64`` field, signed."""
    return v - (1 << 64) if v >> 63 else v
