"""Fuzzing the readers and the net builder: nothing escapes but CaffeCompatError, in bounded
memory and time.

Five targets, each fed mutated versions of small valid inputs (byte flips, deletions,
duplications, insertions of syntax tokens, numbers replaced by edge values, blob names
swapped, lines duplicated or dropped) and values made to be huge (lengths, counts, indices):

- the text parser (``read_net_text``: decode, parse, upgrade) on mutated prototxts,
- the net builder (``Net``) on mutated small prototxts, plus one forward pass when the
  result is small; numbers such as ``num_output`` and dims set to 2^31, 2^63..., repeated
  fields (dims, tops, param specs, include rules...) and layers copied thousands of times,
- the binary loader (``read_caffemodel``, ``caffemodel_state_dict``, loading into a net)
  on mutated small caffemodels (current and V1 formats), plus thousands of empty layers or
  blobs, blobs declaring huge shapes with no data, length varints past the end of any file,
- Caffe's HDF5 formats (``.caffemodel.h5`` loaded into a net, ``.solverstate.h5`` read) on
  mutated small files (h5py raises many kinds of errors on damaged files: all must become
  one clear error),
- the same HDF5 formats generated from their structure: blob indices such as "4294967296",
  datasets declaring 10^15 elements or 33 axes (chunked and never written: tiny files).

Every example runs in ONE worker process (``Worker``; started once, restarted after a crash)
whose address space is capped at what it has after its imports + ``MEMORY_CAP``
(``RLIMIT_AS``), under a hard timeout (SIGALRM in the worker; the parent waits a bounded
time), with filler allocations capped far below ``caffe_compat.limits`` (speed).  So an input
that would take memory without bound fails its allocation there, and a crash or a hang is
reported as this example's failure instead of taking pytest down.  In the worker, the count
limits are lowered (``WORKER_LIMITS``) so huge counts reach them in milliseconds; the element
limits stay the defaults.  An input that makes the code raise anything but a
``CaffeCompatError`` is a bug: reproduce it exactly in ``KNOWN_BUGS`` (an xfail, strict, test;
the fuzzer then tolerates its signature and keeps finding new ones).  None is known today.

Bounded by default (a few hundred examples per target, about a minute in all);
``CAFFE_COMPAT_FUZZ_EXAMPLES=5000`` runs longer.  Deterministic (``derandomize``).
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time
import traceback
from typing import List, Optional

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caffe_compat import limits
from caffe_compat import weights as W
from caffe_compat.errors import CaffeCompatError
from caffe_compat.io import read_net_text
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2
from caffe_compat.wire import encode_varint

ROOT = pathlib.Path(__file__).resolve().parents[2]  # the repository root (the worker has no conftest)
EXAMPLES = int(os.environ.get("CAFFE_COMPAT_FUZZ_EXAMPLES", "300"))
TIMEOUT_S = 20           # one example taking longer than this is a hang
ALLOC_LIMIT = 5 * 10 ** 6  # elements a fuzzed layer may ask a filler for
FORWARD_LIMIT = 200_000  # run forward only when all blobs together are this small
MEMORY_CAP = 2 << 30     # address space the worker may add to what its imports take (bytes)

FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much])

# ---------------------------------------------------------------------- seeds
NETS = [textwrap.dedent(t) for t in (
    """\
    name: "a"
    input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
    input: "label" input_shape { dim: 2 }
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      convolution_param { num_output: 4 kernel_size: 3 pad: 1 stride: 1 weight_filler { type: "xavier" } } }
    layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
    layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
      pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
    layer { name: "ip1" type: "InnerProduct" bottom: "pool1" top: "ip1"
      inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip1" bottom: "label" top: "loss" }
    """,
    """\
    name: "b"
    input: "data" input_shape { dim: 2 dim: 4 dim: 5 dim: 5 }
    layer { name: "split" type: "Slice" bottom: "data" top: "s1" top: "s2" slice_param { axis: 1 slice_point: 2 } }
    layer { name: "e" type: "Eltwise" bottom: "s1" bottom: "s2" top: "e" eltwise_param { operation: SUM coeff: 1 coeff: -1 } }
    layer { name: "cat" type: "Concat" bottom: "e" bottom: "s1" top: "cat" concat_param { axis: 1 } }
    layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 alpha: 0.1 beta: 0.75 } }
    layer { name: "dc" type: "Deconvolution" bottom: "lrn" top: "dc"
      convolution_param { num_output: 2 kernel_size: 2 stride: 2 group: 2 } }
    layer { name: "crop" type: "Crop" bottom: "dc" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
    layer { name: "flat" type: "Flatten" bottom: "crop" top: "flat" }
    layer { name: "red" type: "Reduction" bottom: "flat" top: "red" reduction_param { operation: SUMSQ axis: 1 } }
    """,
    """\
    name: "c"
    layer { name: "d" type: "DummyData" top: "x" top: "y"
      dummy_data_param { shape { dim: 2 dim: 3 dim: 4 } shape { dim: 2 dim: 3 dim: 4 }
        data_filler { type: "gaussian" std: 1 } } }
    layer { name: "r" type: "Reshape" bottom: "x" top: "r" reshape_param { shape { dim: 0 dim: -1 } } }
    layer { name: "t" type: "Tile" bottom: "r" top: "t" tile_param { axis: 1 tiles: 2 } }
    layer { name: "am" type: "ArgMax" bottom: "t" top: "am" argmax_param { top_k: 2 axis: 1 } }
    layer { name: "p" type: "Power" bottom: "y" top: "p" power_param { power: 2 scale: 0.5 shift: 1 } }
    layer { name: "mvn" type: "MVN" bottom: "p" top: "mvn" }
    layer { name: "prelu" type: "PReLU" bottom: "mvn" top: "prelu" }
    layer { name: "sm" type: "Softmax" bottom: "prelu" top: "sm" softmax_param { axis: 2 } }
    layer { name: "eu" type: "EuclideanLoss" bottom: "sm" bottom: "y" top: "eu" }
    """,
    """\
    name: "d"
    input: "data" input_shape { dim: 3 dim: 4 }
    input: "ids" input_shape { dim: 3 }
    layer { name: "emb" type: "Embed" bottom: "ids" top: "emb" embed_param { num_output: 4 input_dim: 5 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" param { name: "w" }
      inner_product_param { num_output: 4 } }
    layer { name: "ip2" type: "InnerProduct" bottom: "ip" top: "ip2" param { name: "w" }
      inner_product_param { num_output: 4 } }
    layer { name: "bias" type: "Bias" bottom: "ip2" top: "bias" }
    layer { name: "sig" type: "Sigmoid" bottom: "bias" top: "sig" }
    layer { name: "th" type: "Threshold" bottom: "emb" top: "th" threshold_param { threshold: 0.1 } }
    layer { name: "elu" type: "ELU" bottom: "th" top: "elu" }
    layer { name: "sce" type: "SigmoidCrossEntropyLoss" bottom: "sig" bottom: "elu" top: "sce" loss_weight: 2 }
    layer { name: "drop" type: "Dropout" bottom: "ip" top: "drop" include { phase: TRAIN } }
    """,
    """\
    name: "v1"
    input: "data"
    input_dim: 1 input_dim: 2 input_dim: 5 input_dim: 5
    layers { name: "conv" type: CONVOLUTION bottom: "data" top: "conv"
      blobs_lr: 1 blobs_lr: 2 weight_decay: 1 weight_decay: 0
      convolution_param { num_output: 3 kernel_size: 2 } }
    layers { name: "relu" type: RELU bottom: "conv" top: "conv" }
    layers { name: "pool" type: POOLING bottom: "conv" top: "pool" pooling_param { pool: AVE kernel_size: 2 } }
    layers { name: "spp" type: SPLIT bottom: "pool" top: "p1" top: "p2" }
    layers { name: "tanh" type: TANH bottom: "p1" top: "tanh" }
    """,
)]

TEXT_TOKENS = [b"{", b"}", b":", b'"', b"\\", b"#", b"<", b">", b"[", b"]", b"layer {", b"layers {",
               b'bottom: "data"', b'top: "x"', b"-1", b"0", b"4294967296", b"9" * 30, b"1e39", b"nan",
               b"-inf", b"\xff", b"\x00", b"\xe2\x82", b"\\u12", b"\\x", b"MAX", b"TRAIN", b"dim: 0",
               b"input_dim: 1", b'type: "Python"', b'type: "Nope"', b"\n", b"  ", b";", b",",
               b"num_output: 7", b"kernel_size: 0", b"axis: -9", b"include { phase: TEST }",
               b"param { name: \"w\" }", b"loss_weight: 1", b"propagate_down: false"]
INTS = ["0", "1", "2", "3", "-1", "-2", "7", "100", "65536", "2147483647", "4294967295", "1000000000"]
FLOATS = ["0", "-1", "0.5", "1", "2", "1e-30", "1e30", "-1e30", "nan", "inf", "-inf"]
BOTTOMLESS = ["Input", "DummyData", "Parameter"]


def _field_value(fd, arg: int) -> str:
    """An edge value of the right type for field ``fd`` (so the text still parses)."""
    from google.protobuf.descriptor import FieldDescriptor as FD

    if fd.type == FD.TYPE_ENUM:
        return fd.enum_type.values[arg % len(fd.enum_type.values)].name
    if fd.type == FD.TYPE_BOOL:
        return ["true", "false"][arg % 2]
    if fd.type in (FD.TYPE_FLOAT, FD.TYPE_DOUBLE):
        return FLOATS[arg % len(FLOATS)]
    if fd.type == FD.TYPE_STRING:
        return ['""', '"data"', '"x"', '"/nonexistent"'][arg % 4]
    if fd.type == FD.TYPE_MESSAGE:
        if fd.message_type.name == "BlobShape":
            return "{ " + " ".join(f"dim: {INTS[(arg >> (3 * i)) % len(INTS)]}" for i in range(1 + arg % 4)) + " }"
        if fd.message_type.name == "FillerParameter":
            return '{ type: "%s" }' % ["constant", "gaussian", "xavier", "msra", "bilinear", "uniform",
                                       "positive_unitball"][arg % 7]
        return "{ }"
    vals = [v for v in INTS if not (v.startswith("-") and fd.type in (FD.TYPE_UINT32, FD.TYPE_UINT64))]
    return vals[arg % len(vals)]


def _insert_field(text: str, pos: int, arg: int) -> str:
    """Add a random field of the right message, with an edge value, to some ``*_param {``."""
    spots = [(m.end(), m.group(1)) for m in re.finditer(r"(\w+_param) \{", text)]
    if not spots:
        return text
    at, pname = spots[pos % len(spots)]
    fd = caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name.get(pname) or \
        caffe_pb2.V1LayerParameter.DESCRIPTOR.fields_by_name.get(pname)
    if fd is None or fd.message_type is None:
        return text
    fields = fd.message_type.fields
    block = text[at:text.find("}", at)]
    for k in range(len(fields)):  # skip singular fields the block already sets
        f = fields[(arg + k) % len(fields)]
        if f.is_repeated or not re.search(rf"\b{f.name}\b", block):
            break
    value = _field_value(f, arg // len(fields))
    sep = " " if f.type == f.TYPE_MESSAGE else ": "
    return text[:at] + f" {f.name}{sep}{value}" + text[at:]


def _insert_layer(text: str, pos: int, arg: int) -> str:
    from caffe_compat.layers.registry import registered_types

    types = [t for t in registered_types() if t != "Python"]
    blobs = sorted(set(re.findall(r'top: "([^"]+)"', text)) | set(re.findall(r'input: "([^"]+)"', text)))
    if not blobs:
        return text
    t = types[arg % len(types)]
    from caffe_compat.layers.registry import lookup

    cls = lookup(t)
    if t in BOTTOMLESS:
        n_bottom = 0
    elif (arg // len(types)) % 4 == 0:  # now and then a count the layer may refuse
        n_bottom = 1 + (arg // 7) % 3
    else:
        n_bottom = cls.exact_bottoms if cls.exact_bottoms is not None else (cls.min_bottoms or 1)
    bottoms = " ".join(f'bottom: "{blobs[(pos + 7 * i) % len(blobs)]}"' for i in range(n_bottom))
    n_top = cls.exact_tops if cls.exact_tops is not None else (cls.min_tops or 1)
    tops = " ".join(f'top: "z{pos % 1000}_{i}"' for i in range(n_top))
    pname = _PARAM_OF.get(t)
    params = f" {pname} {{ }}" if pname else ""
    layer = f'layer {{ name: "z{pos % 1000}" type: "{t}" {bottoms} {tops}{params} }}\n'
    return text + layer


def _param_of(type_name: str):
    """The LayerParameter field holding ``type_name``'s parameters (by Caffe's naming)."""
    special = {"Deconvolution": "convolution_param", "ROIPooling": "roi_pooling_param",
               "SoftmaxWithLoss": "loss_param"}
    if type_name in special:
        return special[type_name]
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", type_name).lower()
    for cand in (snake + "_param", snake.replace("_", "") + "_param"):
        if cand in caffe_pb2.LayerParameter.DESCRIPTOR.fields_by_name:
            return cand
    return None


_PARAM_OF = {t: _param_of(t) for t in (
    "ArgMax", "BatchNorm", "Bias", "Clip", "Concat", "ContrastiveLoss", "Convolution", "Crop",
    "Deconvolution", "Dropout", "DummyData", "ELU", "Eltwise", "Embed", "Exp", "Flatten", "HingeLoss",
    "InfogainLoss", "InnerProduct", "Input", "LRN", "Log", "MVN", "PReLU", "Parameter", "Pooling", "Power",
    "ROIPooling", "ReLU", "Reduction", "Reshape", "SPP", "Scale", "Sigmoid", "Slice", "Softmax",
    "SoftmaxWithLoss", "Swish", "TanH", "Threshold", "Tile", "SmoothL1Loss", "Accuracy")}


NUMBERS = [b"0", b"1", b"-1", b"2", b"3", b"7", b"-7", b"1000", b"100000", b"2147483647", b"0.5", b"-0.0",
           b"2147483648", b"4294967296", b"9223372036854775807", b"100000000000", b"1000000000"]
#: fields a definition may repeat, and whole blocks (repeated far past max_list_length by "repeat")
REPEATABLE = re.compile(r'\b(?:dim|top|bottom|slice_point|coeff|loss_weight|propagate_down|stage|input_dim)'
                        r': [^\s{}]+|\b(?:param|include|exclude|shape|blobs) \{[^{}]*\}')
REPEATS = [33, 1001, 3000]
#: layers: a layer line copied this many times by "manylayers" (the worker's max_layers is 2,000)
LAYER_COPIES = [10, 2001]


def mutate_bytes(data: bytes, ops, tokens=TEXT_TOKENS) -> bytes:
    """Apply byte-level mutations (positions wrap around the current length)."""
    b = bytearray(data)
    for op, pos, arg in ops:
        p = pos % (len(b) + 1)
        if op == "flip" and b:
            p %= len(b)
            b[p] ^= (arg % 255) + 1
        elif op == "del":
            del b[p:p + 1 + arg % 32]
        elif op == "dup":
            b[p:p] = b[p:p + 1 + arg % 64]
        elif op == "ins":
            b[p:p] = tokens[arg % len(tokens)]
        elif op == "set" and b:
            b[p % len(b)] = arg % 256
    return bytes(b)


def mutate_text(text: str, ops) -> str:
    """Structure-aware mutations: numbers, names, lines (keeps most outputs parseable)."""
    numbers = [m.span() for m in re.finditer(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])", text)]
    names = [m.span(1) for m in re.finditer(r'(?:bottom|top): ("[^"\n]*")', text)]
    for op, pos, arg in ops:
        lines = text.split("\n")
        if op == "num" and numbers:
            a, b = numbers[pos % len(numbers)]
            text = text[:a] + NUMBERS[arg % len(NUMBERS)].decode() + text[b:]
        elif op == "name" and names:
            a, b = names[pos % len(names)]
            c, d = names[arg % len(names)]
            text = text[:a] + text[c:d] + text[b:]
        elif op == "dupline":
            i = pos % len(lines)
            lines.insert(i, lines[arg % len(lines)])
            text = "\n".join(lines)
        elif op == "delline" and len(lines) > 1:
            del lines[pos % len(lines)]
            text = "\n".join(lines)
        elif op == "field":
            text = _insert_field(text, pos, arg)
        elif op == "layer":
            text = _insert_layer(text, pos, arg)
        elif op == "repeat":  # a list far longer than any limit allows
            found = list(REPEATABLE.finditer(text))
            if found:
                m = found[pos % len(found)]
                text = text[:m.end()] + (" " + m.group()) * REPEATS[arg % len(REPEATS)] + text[m.end():]
        elif op == "manylayers":
            spots = [i for i, line in enumerate(lines) if line.lstrip().startswith(("layer {", "layers {"))
                     and line.rstrip().endswith("}")]
            if spots:
                i = spots[pos % len(spots)]
                lines[i:i + 1] = [lines[i]] * LAYER_COPIES[arg % len(LAYER_COPIES)]
                text = "\n".join(lines)
        numbers = [m.span() for m in re.finditer(r"(?<![\w.])-?\d+(\.\d+)?(?![\w.])", text)]
        names = [m.span(1) for m in re.finditer(r'(?:bottom|top): ("[^"\n]*")', text)]
    return text


byte_ops = st.lists(st.tuples(st.sampled_from(["flip", "del", "dup", "ins", "set"]),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), min_size=1, max_size=6)
TEXT_OPS = ["num", "num", "num", "name", "dupline", "delline", "field", "field", "field", "layer", "layer",
            "layer", "repeat", "manylayers"]
text_ops = st.lists(st.tuples(st.sampled_from(TEXT_OPS),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), min_size=1, max_size=4)


# ---------------------------------------------------------------------- wire-level generators
_varint = encode_varint


def _ld(num: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint((num << 3) | 2) + _varint(len(payload)) + payload


#: declared blob shapes past every limit: 10^15 elements, 2^31, an int64 product overflow,
#: 33 axes (Caffe's kMaxBlobAxes is 32), a "negative" uint64, one under the limits but empty
HUGE_DIMS = [(100000, 100000, 100000), (2 ** 31,), (2 ** 62, 4), (1,) * 33, ((1 << 64) - 1, 2), (4096, 4096)]
#: how many empty layers / blobs to declare (the worker's max_layers and max_blobs are 2,000)
COUNTS = [3, 1001, 2001, 30000]
#: a layer's length field claiming more bytes than any file has
HUGE_LENGTHS = [2 ** 31 - 1, 2 ** 32 + 5, 2 ** 62]
LAYER_NAMES = [b"conv1", b"ip1", b"bn1", b"sc1", b"conv", b"nope"]


def mutate_wire(data: bytes, ops) -> bytes:
    """Structure-aware caffemodel mutations: many empty layers or blobs, a blob declaring a
    huge shape with little or no data, a length varint past the end of any file."""
    for op, pos, arg in ops:
        name = _ld(1, LAYER_NAMES[pos % len(LAYER_NAMES)])
        if op == "layers":
            data += _ld(100, b"") * COUNTS[arg % len(COUNTS)]
        elif op == "blobs":
            data += _ld(100, name + _ld(7, b"") * COUNTS[arg % len(COUNTS)])
        elif op == "dims":
            dims = HUGE_DIMS[arg % len(HUGE_DIMS)]
            values = b"".join(b"\x00\x00\x80\x3f" for _ in range(pos % 5))
            blob = _ld(7, _ld(1, b"".join(_varint(d) for d in dims))) + (_ld(5, values) if values else b"")
            data += _ld(100, name + _ld(2, b"Convolution") + _ld(7, blob))
        elif op == "len":
            at = pos % (len(data) + 1)
            data = data[:at] + _varint((100 << 3) | 2) + _varint(HUGE_LENGTHS[arg % len(HUGE_LENGTHS)]) \
                + data[at:at + 16]
    return data


wire_ops = st.lists(st.tuples(st.sampled_from(["layers", "blobs", "dims", "len"]),
                              st.integers(0, 1 << 16), st.integers(0, 1 << 16)), max_size=2)

#: HDF5 structure: dataset names (blob indices among them), declared shapes, dtypes
H5_NAMES = ["0", "1", "2", "3", "65536", "4294967296", "9" * 40, "-1", "01", "x"]
H5_SHAPES = [(4, 3, 3, 3), (4,), (5, 36), (0,), (), (100000, 100000, 100000), (2 ** 31,), (1,) * 33,
             (2 ** 40, 2 ** 20)]
H5_DTYPES = ["<f4", "<f8", "<i4", "|u1", "|S8"]
H5_LAYERS = ["conv1", "bn1", "sc1", "ip1", "nope", "a/b"]
h5_blob = st.tuples(st.sampled_from(H5_NAMES), st.sampled_from(H5_SHAPES), st.sampled_from(H5_DTYPES))
h5_spec = st.lists(st.tuples(st.sampled_from(H5_LAYERS), st.lists(h5_blob, max_size=3)), min_size=1, max_size=4)


def _h5_dataset(group, name: str, shape, dtype: str) -> None:
    """A dataset of a declared shape: chunked and never written when large (the file stays tiny)."""
    import numpy as np

    n = 1
    for d in shape:
        n *= d
    if n <= 4096:
        group.create_dataset(name, data=np.zeros(shape, dtype=dtype))
    else:
        group.create_dataset(name, shape=shape, dtype=dtype, chunks=(1,) * len(shape))


def write_h5_spec(path: str, spec, state: bool) -> bool:
    """A caffemodel.h5 (``data/<layer>/<i>``) or solverstate.h5 (``history/<i>`` and scalars)
    from ``spec``; False when HDF5 itself cannot make it (then there is nothing to read)."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "w") as f:
            if state:
                f.create_dataset("iter", data=np.array([3], np.int32))
                f.create_dataset("current_step", data=np.array([0], np.int32))
                hist = f.create_group("history")
                for _, blobs in spec:
                    for name, shape, dtype in blobs:
                        if name not in hist:
                            _h5_dataset(hist, name, shape, dtype)
            else:
                data = f.create_group("data")
                for layer, blobs in spec:
                    g = data.require_group(layer)
                    for name, shape, dtype in blobs:
                        if name not in g:
                            _h5_dataset(g, name, shape, dtype)
    except (ValueError, TypeError, OverflowError, RuntimeError, OSError):
        return False
    return True


# ---------------------------------------------------------------------- guards
class Hang(Exception):
    """An example that ran past TIMEOUT_S."""


class TooBig(Exception):
    """A filler asked for more than ALLOC_LIMIT elements: within caffe_compat.limits, but too
    much to allocate while fuzzing (a speed guard; the memory guard is the worker's cap)."""


@contextlib.contextmanager
def hard_timeout(seconds: int):
    def on_alarm(signum, frame):
        raise Hang(f"example ran past {seconds} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@contextlib.contextmanager
def capped_fillers():
    """Fillers refuse more than ALLOC_LIMIT elements while fuzzing (a speed guard: the
    builder's own checks are caffe_compat.limits' max_blob_elements and max_total_elements)."""
    import caffe_compat.fillers as fillers

    real = fillers.fill

    def fill(shape, *a, **k):
        n = limits.element_count(shape)
        if n > ALLOC_LIMIT:
            raise TooBig(f"filler asked for {n} elements ({tuple(shape)})")
        return real(shape, *a, **k)

    users = [m for m in list(sys.modules.values()) if getattr(m, "fill", None) is real]
    for m in users:
        m.fill = fill
    try:
        yield
    finally:
        for m in users:
            m.fill = real


def _vm_size() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmSize")


def cap_address_space(extra_bytes: int = MEMORY_CAP) -> None:
    """Cap this process's address space at its current size + ``extra_bytes``: an allocation
    past it fails at once instead of swapping the machine to death (no-op without rlimits)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _vm_size() + extra_bytes
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (OSError, ValueError, AttributeError):
        pass


def signature(exc: BaseException) -> str:
    """'ExcType@file:function' of the innermost project frame (how known bugs are matched)."""
    import traceback

    where = "?"
    for fr in traceback.extract_tb(exc.__traceback__):
        path = fr.filename.replace(os.sep, "/")
        if ("/caffe_compat/" in path or "/layers/" in path) and "/tests/" not in path:
            where = f"{os.path.basename(path)}:{fr.name}"
    return f"{type(exc).__name__}@{where}"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------- what the worker runs
def _build_and_run(text: str) -> None:
    """Build a net from ``text``; run forward (and backward) when it is small enough."""
    net = Net(text, seed=0)
    shapes = [s for s in net.blob_shapes.values()]
    if any(s is None for s in shapes) or sum(limits.element_count(s) for s in shapes) > FORWARD_LIMIT:
        return
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name in net.input_names:
        shape = net.blob_shapes[name]
        if "label" in name or name == "ids":
            inputs[name] = torch.randint(0, 3, shape, generator=g).float()
        else:
            inputs[name] = torch.randn(shape, generator=g)
    net(**inputs)
    if net.loss is not None and net.loss.requires_grad:
        net.backward()


def _each(*calls) -> None:
    """Every call, each allowed its own CaffeCompatError (anything else escapes)."""
    for fn in calls:
        try:
            fn()
        except CaffeCompatError:
            pass


def _target_text(folder: str, data: bytes) -> None:
    path = os.path.join(folder, "fuzz_text.prototxt")
    with open(path, "wb") as f:
        f.write(data)
    read_net_text(path)


def _target_binary(folder: str, data: bytes, with_net: bool) -> None:
    path = os.path.join(folder, "fuzz.caffemodel")
    with open(path, "wb") as f:
        f.write(data)
    _each(lambda: W.read_caffemodel(path), lambda: W.caffemodel_state_dict(path),
          *([lambda: Net(NETS[0]).load_weights(path)] if with_net else []))


def _target_hdf5(folder: str, weights: bytes, state: bytes) -> None:
    from caffe_compat.solver import state_hdf5

    wpath, spath = os.path.join(folder, "fuzz.caffemodel.h5"), os.path.join(folder, "fuzz.solverstate.h5")
    for path, data in ((wpath, weights), (spath, state)):
        with open(path, "wb") as f:
            f.write(data)
    _each(lambda: Net(NETS[0]).load_weights(wpath), lambda: state_hdf5.read_state(spath))


def _target_h5_spec(folder: str, spec, state: bool) -> None:
    from caffe_compat.solver import state_hdf5

    path = os.path.join(folder, "spec.solverstate.h5" if state else "spec.caffemodel.h5")
    if not write_h5_spec(path, spec, state):
        return
    if state:
        _each(lambda: state_hdf5.read_state(path))
    else:
        _each(lambda: Net(NETS[0]).load_weights(path))


def _target_build(folder: str, text: str) -> None:
    _build_and_run(text)


def _target_probe(folder: str, n_bytes: int) -> None:
    """Allocate ``n_bytes`` (the cap's own test: past it, a MemoryError)."""
    bytearray(n_bytes)


TARGETS = {"text": _target_text, "build": _target_build, "binary": _target_binary,
           "hdf5": _target_hdf5, "h5spec": _target_h5_spec, "probe": _target_probe}
#: the worker's count limits: the generators' huge counts reach them in milliseconds (the
#: element limits stay the defaults: they are what bounds memory)
WORKER_LIMITS = {"CAFFE_COMPAT_MAX_LAYERS": "2000", "CAFFE_COMPAT_MAX_BLOBS": "2000",
                 "CAFFE_COMPAT_MAX_LIST_LENGTH": "1000"}


def worker_main(folder: str) -> None:
    """The fuzz worker (``python test_fuzz.py --worker FOLDER``): runs each (target, args)
    it reads on stdin under the guards and answers on stdout, with its whole address space
    capped at what it has after its imports + MEMORY_CAP.  A crash or a hang here is the
    parent's finding, not the parent's death."""
    reply_to = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # what the code under test prints must not mix with the answers
    requests = sys.stdin.buffer
    cap_address_space()
    start = peak_rss_mb()
    while True:
        head = requests.read(4)
        if len(head) < 4:
            return
        target, args = pickle.loads(requests.read(struct.unpack("<I", head)[0]))
        if target == "peak":
            answer: tuple = ("peak", peak_rss_mb() - start)
        else:
            try:
                with hard_timeout(TIMEOUT_S), capped_fillers():
                    TARGETS[target](folder, *args)
                answer = ("ok",)
            except CaffeCompatError:
                answer = ("caffe",)
            except Hang as e:
                answer = ("hang", str(e))
            except Exception as e:  # noqa: BLE001 - every other escape is a finding
                answer = ("bug", signature(e), f"{type(e).__name__}: {str(e)[:300]}",
                          "".join(traceback.format_exception(e)[-6:])[-3000:])
        body = pickle.dumps(answer)
        reply_to.write(struct.pack("<I", len(body)) + body)
        reply_to.flush()


class Worker:
    """The parent's handle on the worker process: ``call(target, *args)`` -> its answer;
    a dead or silent worker is answered for (``crash``/``hang``) and restarted next call."""

    def __init__(self, folder: str):
        self.folder = folder
        self.proc: Optional[subprocess.Popen] = None
        self.log = open(os.path.join(folder, "worker.log"), "ab")

    def _start(self) -> None:
        env = dict(os.environ, **WORKER_LIMITS, OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), str(ROOT)]))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", self.folder], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def _read(self, n: int, deadline: float) -> Optional[bytes]:
        out = b""
        fd = self.proc.stdout.fileno()
        while len(out) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            chunk = os.read(fd, n - len(out))
            if not chunk:
                return b""
            out += chunk
        return out

    def _died(self, what: str) -> tuple:
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait()
        self.log.flush()
        with open(self.log.name, "rb") as f:
            f.seek(max(0, os.path.getsize(self.log.name) - 2000))
            tail = f.read().decode("utf-8", "replace")
        return (what, f"the worker {'died' if what == 'crash' else 'stopped answering'} "
                      f"(exit {rc}); its stderr ends: {tail}")

    def call(self, target: str, *args) -> tuple:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        body = pickle.dumps((target, args))
        try:
            self.proc.stdin.write(struct.pack("<I", len(body)) + body)
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died("crash")
        deadline = time.monotonic() + TIMEOUT_S + (60 if target != "peak" else 10) + WORKER_START_S
        head = self._read(4, deadline)
        if not head:
            return self._died("hang" if head is None else "crash")
        body = self._read(struct.unpack("<I", head)[0], deadline)
        if not body:
            return self._died("hang" if body is None else "crash")
        return pickle.loads(body)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None
        self.log.close()


WORKER_START_S = 60  # a cold start imports torch (on a loaded machine)


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(str(tmp_path_factory.mktemp("fuzz_worker")))
    yield w
    w.close()


def _known(answer: tuple) -> bool:
    return answer[0] == "bug" and any(answer[1].startswith(k) for k in KNOWN_SIGNATURES)


def expect_only_caffe_errors(worker: Worker, target: str, *args) -> None:
    """The target ran to its end or raised a CaffeCompatError, within the worker's memory
    cap and TIMEOUT_S; anything else (another exception, a hang, a crash) fails the example."""
    answer = worker.call(target, *args)
    if answer[0] in ("ok", "caffe") or _known(answer):
        return
    raise AssertionError(f"{target}: {' | '.join(str(a) for a in answer)}")


# ---------------------------------------------------------------------- known bugs
#: (id, exact prototxt, signature prefix it fails with today, reason).  Each is an
#: xfail(strict=True) test below; the fuzzer tolerates failures with these signatures, so
#: it keeps looking for new ones.  Fixed?  Delete the entry (its test then XPASSes).
#: Empty today (every bug the fuzzer found is fixed).
KNOWN_BUGS: List[tuple] = [
]
#: plus any filler asked for more than ALLOC_LIMIT elements (legal, see TooBig, but not
#: worth allocating here)
KNOWN_SIGNATURES = [b[2] for b in KNOWN_BUGS] + ["TooBig@"]


if KNOWN_BUGS:  # an empty parameter set would show up as a skip
    @pytest.mark.parametrize("bug", [pytest.param(b, marks=pytest.mark.xfail(strict=True, reason=b[3]))
                                     for b in KNOWN_BUGS], ids=[b[0] for b in KNOWN_BUGS])
    def test_known_bug(bug, worker):
        """Must raise nothing or only CaffeCompatError once fixed (then drop it from KNOWN_BUGS)."""
        answer = worker.call("build", bug[1])
        assert answer[0] in ("ok", "caffe"), answer


# ---------------------------------------------------------------------- targets
SEED_BYTES = [t.encode() for t in NETS]


def test_fuzz_worker_is_capped(worker):
    """The worker runs under its address-space cap: an allocation of MEMORY_CAP fails there
    (and is reported as a finding), and the worker goes on answering."""
    answer = worker.call("probe", MEMORY_CAP + (1 << 30))
    assert answer[0] == "bug" and answer[1].startswith("MemoryError"), answer
    assert worker.call("probe", 1 << 20) == ("ok",)


@FUZZ
@given(seed=st.integers(0, len(NETS) - 1), ops=byte_ops)
def test_fuzz_text_parser(worker, seed, ops):
    expect_only_caffe_errors(worker, "text", mutate_bytes(SEED_BYTES[seed], ops))


@FUZZ
@given(seed=st.integers(0, len(NETS) - 1), ops=text_ops, raw=st.lists(
    st.tuples(st.sampled_from(["del", "dup", "ins"]), st.integers(0, 1 << 16), st.integers(0, 1 << 16)),
    max_size=1))
def test_fuzz_net_builder(worker, seed, ops, raw):
    text = mutate_text(NETS[seed], ops)
    text = mutate_bytes(text.encode(), raw).decode("utf-8", "replace") if raw else text
    expect_only_caffe_errors(worker, "build", text)


def _seed_caffemodels(folder) -> List[bytes]:
    out = []
    net = Net(NETS[0], seed=1)
    net.save_weights(str(folder / "a.caffemodel"))
    out.append((folder / "a.caffemodel").read_bytes())
    msg = caffe_pb2.NetParameter(name="v1")
    lp = msg.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION)
    for dims in ((3, 2, 2, 2), (1, 1, 1, 3)):
        b = lp.blobs.add()
        b.num, b.channels, b.height, b.width = dims
        b.data.extend(np.arange(int(np.prod(dims)), dtype=np.float32).tolist())
    lp = msg.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU)
    out.append(msg.SerializeToString())
    d = caffe_pb2.NetParameter(name="dbl")
    lp = d.layer.add(name="ip1", type="InnerProduct")
    b = lp.blobs.add()
    b.shape.dim.extend([4, 4])
    b.double_data.extend(np.linspace(-1, 1, 16).tolist())
    out.append(d.SerializeToString())
    return out


_SEED_MODELS: List[bytes] = []
BIN_TOKENS = [b"\x00", b"\xff" * 10, b"\x80" * 10, b"\x0a\xff\xff\xff\xff\x0f", b"\x3a\x05\x0a\x03\xff\xff\x7f",
              b"\x2a\x04", b"\xa2\x06", b"\x12\x00", b"\x08\x80\x80\x80\x80\x08", b"\x0b", b"\x0c", b"\x0f",
              b"\xa2\x06\xff\xff\xff\xff\x07", b"\x3a\x80\x80\x80\x80\x80\x80\x80\x80\x01"]


@FUZZ
@given(seed=st.integers(0, 2), ops=byte_ops, wire=wire_ops)
def test_fuzz_binary_loader(worker, tmp_path_factory, seed, ops, wire):
    if not _SEED_MODELS:
        _SEED_MODELS.extend(_seed_caffemodels(tmp_path_factory.getbasetemp()))
    data = mutate_wire(mutate_bytes(_SEED_MODELS[seed], ops, BIN_TOKENS), wire)
    expect_only_caffe_errors(worker, "binary", data, seed == 0)


_SEED_H5: List[bytes] = []


@FUZZ
@given(ops=byte_ops)
def test_fuzz_hdf5_loader(worker, tmp_path_factory, ops):
    """Mutated Caffe HDF5 weights (``.caffemodel.h5``) and solver states: a clear error or a
    load, nothing else."""
    import h5py  # noqa: F401 - without it every load is refused and nothing is fuzzed
    folder = tmp_path_factory.getbasetemp()
    if not _SEED_H5:
        seed = folder / "seed.caffemodel.h5"
        Net(NETS[0], seed=0).save_weights(str(seed))
        _SEED_H5.append(seed.read_bytes())
        from caffe_compat.solver import SolverState, state_hdf5

        state = folder / "seed.solverstate.h5"
        state_hdf5.write_state(str(state), SolverState(iter=7, current_step=1, learned_net="m.caffemodel.h5",
                                                       history=[torch.ones(3, 2), torch.zeros(3)]))
        _SEED_H5.append(state.read_bytes())
    expect_only_caffe_errors(worker, "hdf5", mutate_bytes(_SEED_H5[0], ops, BIN_TOKENS),
                             mutate_bytes(_SEED_H5[1], ops, BIN_TOKENS))


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(spec=h5_spec, state=st.booleans())
def test_fuzz_hdf5_declared(worker, spec, state):
    """HDF5 files whose metadata declares huge blob indices, huge datasets (never written: the
    file stays tiny), 33 axes or odd types: refused from the metadata, before reading data."""
    expect_only_caffe_errors(worker, "h5spec", spec, state)


def test_fuzz_memory_stayed_bounded(worker):
    """Runs after the targets: fuzzing raised the worker's peak RSS by under 1 GiB."""
    answer = worker.call("peak")
    assert answer[0] == "peak", answer
    assert answer[1] < 1024, f"the worker's peak RSS grew by {answer[1]:.0f} MB"


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    worker_main(sys.argv[2])
