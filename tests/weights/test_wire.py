"""The protobuf wire codec (caffe_compat/wire.py) that weights, forks and upgrade_files share."""
from __future__ import annotations

import numpy as np
import pytest

from caffe_compat import wire
from caffe_compat.protos import caffe_pb2


def test_fields_read_back_what_was_encoded():
    msg = (wire.encode_key(1, wire.VARINT) + wire.encode_varint(-2) + wire.len_field(2, b"ab")
           + wire.encode_key(3, wire.I32) + np.float32(1.5).tobytes()
           + wire.encode_key(4, wire.I64) + np.float64(-3.0).tobytes())
    fields = list(wire.fields(msg, 0, len(msg)))
    assert [(n, wt) for n, wt, *_ in fields] == [(1, wire.VARINT), (2, wire.LEN), (3, wire.I32), (4, wire.I64)]
    assert wire.as_int64(fields[0][2]) == -2 and wire.as_int32(fields[0][2]) == -2
    assert msg[fields[1][2]:fields[1][3]] == b"ab"
    assert wire.packed_array(msg, wire.I32, fields[2][2], fields[2][3], "<f4").tolist() == [1.5]
    assert wire.packed_array(msg, wire.I64, fields[3][2], fields[3][3], "<f8").tolist() == [-3.0]
    assert b"".join(wire.encode_field(n, wt, msg, a, b) for n, wt, a, b in fields) == msg


def test_encoding_is_protobufs():
    blob = caffe_pb2.BlobProto(num=-1, data=[1.0, 2.0])
    blob.shape.dim.extend([2, 300])
    raw = blob.SerializeToString()
    rebuilt = b"".join(wire.encode_field(n, wt, raw, a, b) for n, wt, a, b in wire.fields(raw, 0, len(raw)))
    assert rebuilt == raw
    data = [f for f in wire.fields(raw, 0, len(raw)) if f[0] == 5][0]
    assert wire.packed_array(raw, data[1], data[2], data[3], "<f4").tolist() == [1.0, 2.0]
    shape = wire.len_field(7, wire.len_field(1, wire.encode_varint(2) + wire.encode_varint(300)))
    assert shape in raw


@pytest.mark.parametrize("cut,match", [(1, "truncated fixed32"), (6, "runs past the end"), (11, "truncated varint")])
def test_damaged_messages_say_what_is_wrong(cut, match):
    msg = wire.encode_key(1, wire.VARINT) + wire.encode_varint(300) + wire.len_field(2, b"abc") \
        + wire.encode_key(3, wire.I32) + b"\0\0\0\0"
    with pytest.raises(ValueError, match=match):
        list(wire.fields(msg, 0, len(msg) - cut))


def test_refusals():
    with pytest.raises(ValueError, match="field number 0"):
        list(wire.fields(b"\x00\x01", 0, 2))
    with pytest.raises(ValueError, match="unsupported wire type 3"):
        list(wire.fields(wire.encode_key(1, 3), 0, 1))
    with pytest.raises(ValueError, match=r"field 7 \(BlobProto.shape\) has wire type varint, expected "
                                         r"length-delimited"):
        wire.expect_wire(7, wire.VARINT, (wire.LEN,), "BlobProto.shape")
    with pytest.raises(ValueError, match="multiple of the element size"):
        wire.packed_array(b"\0" * 6, wire.LEN, 0, 6, "<f4")
