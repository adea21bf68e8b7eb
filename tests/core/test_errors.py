"""Bad input and bad luck: every refusal is a CaffeCompatError that says where and what.

``CASES`` is the table of hostile or broken inputs (each a function that must raise a given
error whose message matches); ``tests/make_bad_inputs_doc.py`` turns it into
``docs/bad_inputs.md`` and ``test_doc_is_current`` keeps the two in step.  Also here: the
error tree's structure, the CLI's one-line errors and exit codes, every truncation of a
small caffemodel, Python-layer import gating, and atomic writes that fail midway.
"""
from __future__ import annotations

import errno
import gzip
import os
import pathlib
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat import limits, wire
from caffe_compat import weights as W
from caffe_compat.weights import caffemodel
from caffe_compat.errors import (CaffeCompatError, DataError, GraphError, LimitError, ParseError, PythonLayerError,
                                 SchemaError, ShapeError, SolverError, UnknownLayerError, WeightsError)
from caffe_compat.io import read_binaryproto, read_net_text, read_solver_text
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2

from conftest import ROOT  # noqa: E402  (the repository root)

# ---------------------------------------------------------------------- small inputs
HEAD = 'name: "small"\ninput: "data" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
SMALL = HEAD.replace("dim: 4 dim: 4", "dim: 6 dim: 6") + textwrap.dedent("""\
    layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
      convolution_param { num_output: 2 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
    layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
    layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
      pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
    layer { name: "ip" type: "InnerProduct" bottom: "pool1" top: "ip"
      inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
    """)


def small_caffemodel(d: pathlib.Path, name: str = "small.caffemodel") -> pathlib.Path:
    path = d / name
    Net(SMALL, seed=1).save_weights(str(path))
    return path


def write(d: pathlib.Path, name: str, content) -> pathlib.Path:
    p = d / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content, encoding="utf-8")
    return p


def varint(v: int) -> bytes:
    return wire.encode_varint(v)


def field(num: int, wt: int, payload: bytes) -> bytes:
    if wt == 2:
        return varint((num << 3) | 2) + varint(len(payload)) + payload
    return varint((num << 3) | wt) + payload


def caffemodel_with_blob(d: pathlib.Path, blob: bytes, layer: str = "conv1") -> pathlib.Path:
    """A caffemodel whose layer ``layer`` holds one hand-encoded BlobProto."""
    lp = field(1, 2, layer.encode()) + field(2, 2, b"Convolution") + field(7, 2, blob)
    return write(d, "hand.caffemodel", field(1, 2, b"small") + field(100, 2, lp))


def blob_shape_data(dims, values, *, dtype="<f4", data_field=5) -> bytes:
    shape = field(7, 2, field(1, 2, b"".join(varint(x if x >= 0 else x + (1 << 64)) for x in dims)))
    data = field(data_field, 2, np.asarray(values, dtype).tobytes()) if len(values) else b""
    return data + shape


# ---------------------------------------------------------------------- the case table
@dataclass
class Case:
    id: str
    kind: str                      # the kind of bad input, for the doc table
    run: Callable[[pathlib.Path], object]
    error: type
    match: str                     # regex the message must match
    where: Optional[str] = None    # regex the error's ``where`` must match (file:line:col ...)
    layer: Optional[str] = None    # the layer the error must name
    blob: Optional[int] = None     # the blob index it must name


def _net_file(text, name="net.prototxt"):
    return lambda d: Net(str(write(d, name, text)))


def _net_text(text):
    return lambda d: Net(text)


def _load(weights_fn, net_text=SMALL, **kw):
    return lambda d: Net(net_text).load_weights(str(weights_fn(d)), **kw)


def _limited_text(d):
    with limits.raised(max_text_bytes=1024):
        return Net(str(write(d, "big.prototxt", SMALL + "# padding\n" * 200)))


def _env_limit(d):
    old = os.environ.get("CAFFE_COMPAT_MAX_BLOB_ELEMENTS")
    os.environ["CAFFE_COMPAT_MAX_BLOB_ELEMENTS"] = "lots"
    try:
        return W.read_caffemodel(str(small_caffemodel(d)))
    finally:
        if old is None:
            del os.environ["CAFFE_COMPAT_MAX_BLOB_ELEMENTS"]
        else:
            os.environ["CAFFE_COMPAT_MAX_BLOB_ELEMENTS"] = old


def _truncated(d):
    data = small_caffemodel(d).read_bytes()
    return Net(SMALL).load_weights(str(write(d, "cut.caffemodel", data[: len(data) // 2])))


def _nan_weights(d):
    net = Net(SMALL, seed=1)
    with torch.no_grad():
        net.layer("ip").weight[1, 2] = float("nan")
    net.save_weights(str(d / "nan.caffemodel"))
    return Net(SMALL).load_weights(str(d / "nan.caffemodel"))


def _python_layer(d):
    write(d, "evil_layer_mod.py", f"open({str(d / 'IMPORTED')!r}, 'w').close()\n")
    text = HEAD + ('layer { name: "py" type: "Python" bottom: "data" top: "x" '
                   'python_param { module: "evil_layer_mod" layer: "Evil" } }')
    try:
        return Net(str(write(d, "py.prototxt", text)), allow_python_layers=False)
    finally:
        assert not (d / "IMPORTED").exists(), "the module was imported"


def _malicious_pt(d):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(d / "PWNED"), "w"))

    (d / "evil.pt").write_bytes(pickle.dumps({"ip.weight": Boom()}, protocol=2))
    try:
        return Net(SMALL).load_weights(str(d / "evil.pt"))
    finally:
        assert not (d / "PWNED").exists(), "the pickle ran"


def _checkpoint_pt(d):
    torch.save({"state_dict": {"ip.weight": torch.zeros(3, 18)}, "epoch": 3}, str(d / "ckpt.pt"))
    return Net(SMALL).load_weights(str(d / "ckpt.pt"))


def _extra_keys_st(d):
    sd = dict(Net(SMALL).state_dict())
    sd["fc8.weight"] = torch.zeros(2)
    W.save_safetensors(sd, str(d / "x.safetensors"))
    return Net(SMALL).load_weights(str(d / "x.safetensors"))


def _renamed(d):
    path = small_caffemodel(d)
    return Net(SMALL.replace('"ip"', '"cls_score"')).load_weights(str(path))


def _shape_mismatch(d):
    path = small_caffemodel(d)
    return Net(SMALL.replace("num_output: 3", "num_output: 4")).load_weights(str(path))


def _blob_count(d):
    path = small_caffemodel(d)
    return Net(SMALL.replace("num_output: 3", "num_output: 3 bias_term: false")).load_weights(str(path))


def _binaryproto_truncated(d):
    b = caffe_pb2.BlobProto()
    b.shape.dim.extend([1, 3, 2, 2])
    b.data.extend([0.5] * 12)
    raw = b.SerializeToString()
    return read_binaryproto(str(write(d, "mean.binaryproto", raw[:-5])))


def _binaryproto_shape(d):
    b = caffe_pb2.BlobProto(num=1, channels=3, height=2, width=2)
    b.data.extend([0.5] * 10)
    return read_binaryproto(str(write(d, "mean.binaryproto", b.SerializeToString())))


# ---- the tools added later: image sets, SVD compression, reval, fused nets
def _imageset_bad_label(d: pathlib.Path):
    from caffe_compat.imageset import convert_imageset

    write(d, "list.txt", "a.jpg 1\nb.jpg cat\n")
    return convert_imageset(str(d) + "/", str(d / "list.txt"), str(d / "db"))


def _imageset_db_exists(d: pathlib.Path):
    from caffe_compat.imageset import convert_imageset

    write(d, "list.txt", "a.jpg 1\n")
    (d / "db").mkdir()
    return convert_imageset(str(d) + "/", str(d / "list.txt"), str(d / "db"))


def _reval_empty(d: pathlib.Path):
    from caffe_compat.frcnn.reval import find_detections

    return find_detections(str(d))


_FC = 'input: "data" input_shape { dim: 1 dim: 8 }\n'
_FC_ORIG = _FC + 'layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 4 } }'
_FC_SVD = _FC + ('layer { name: "fc_L" type: "InnerProduct" bottom: "data" top: "fc_L" '
                 'inner_product_param { num_output: 9 bias_term: false } }\n'
                 'layer { name: "fc_U" type: "InnerProduct" bottom: "fc_L" top: "fc" inner_product_param { num_output: 4 } }')


def _compress_rank(d: pathlib.Path):
    from caffe_compat.frcnn.compress import compress_net

    return compress_net(Net(_FC_ORIG), Net(_FC_SVD))


_BN = ('input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }\n'
       'layer { name: "conv" type: "Convolution" bottom: "data" top: "conv" '
       'convolution_param { num_output: 3 kernel_size: 1 } }\n'
       'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }\n'
       'layer { name: "scale" type: "Scale" bottom: "conv" top: "conv" scale_param { bias_term: true } }')


def _unfused_into_fused(d: pathlib.Path):
    net = Net(_BN)
    net.save_weights(str(d / "unfused.caffemodel"))
    net.fuse_batchnorm()
    return net.load_weights(str(d / "unfused.caffemodel"))


CASES: List[Case] = [
    # --- text definitions
    Case("syntax", "prototxt syntax error (unclosed brace)",
         _net_file(HEAD + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r"\n'),
         ParseError, r'Expected "}"', where=r"net\.prototxt:3:\d+$"),
    Case("unknown-field", "misspelled field name",
         _net_file(HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_parm { pool: MAX } }'),
         ParseError, r'has no field named "pooling_parm" \(did you mean pooling_param', where=r"net\.prototxt:3:\d+$"),
    Case("unknown-fork-things", "a fork's model: several unknown layer types and param blocks",
         _net_file(HEAD + 'layer { name: "y" type: "Yolov3" bottom: "data" top: "y" yolov3_param { num_class: 2 } }\n'
                          'layer { name: "z" type: "Mystery" bottom: "y" top: "z" mystery_param { a: 1 } }\n'
                          'layer { name: "w" type: "Mystery" bottom: "z" top: "w" convolution_param { bogus: 1 } }'),
         ParseError, r"2 unknown layer type\(s\): 'Yolov3' \(from yolo: eric612/MobileNet-YOLO@69b4441\).*"
                     r"'Mystery' \(no fork caffe-compat knows\): layer 'z' \(line 4\), 'w' \(line 5\)\. "
                     r"2 unknown field\(s\): LayerParameter\.mystery_param at line 4; "
                     r"ConvolutionParameter\.bogus at line 5\. Ways forward: .*--schema.*register_layer",
         where=r"net\.prototxt:4:\d+$"),
    Case("enum-name", "enum value name that does not exist",
         _net_file(HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p"\n'
                          '  pooling_param { pool: MAXX kernel_size: 2 } }'),
         ParseError, r"no value named MAXX; allowed: MAX, AVE, STOCHASTIC \(did you mean MAX\?\)",
         where=r"net\.prototxt:4:\d+$"),
    Case("enum-number", "enum value number out of range",
         _net_file(HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" pooling_param { pool: 7 } }'),
         ParseError, r"no value with number 7; allowed: MAX, AVE, STOCHASTIC"),
    Case("v1-enum", "V1 layer type enum misspelled",
         _net_file('layers { name: "c" type: CONVOLUTON }'),
         ParseError, r"no value named CONVOLUTON; allowed: NONE, .*\(did you mean CONVOLUTION\?\)"),
    Case("phase-enum", "phase misspelled",
         _net_file(HEAD + 'layer { name: "r" type: "ReLU" bottom: "data" top: "r" include { phase: TRAINING } }'),
         ParseError, r"no value named TRAINING; allowed: TRAIN, TEST \(did you mean TRAIN\?\)"),
    Case("int-range", "negative value for an unsigned field",
         _net_file(HEAD + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                          'convolution_param { num_output: -3 } }'),
         ParseError, r"Value out of range: -3"),
    Case("int-float", "fraction where an integer is expected",
         _net_file(HEAD + 'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                          'convolution_param { num_output: 3.5 } }'),
         ParseError, r"Couldn't parse integer: 3.5"),
    Case("duplicate-field", "singular field given twice (Caffe refuses it too)",
         _net_file('name: "a"\nname: "b"\n'),
         ParseError, r'field "name" of caffe.NetParameter is given more than once', where=r"net\.prototxt:2:"),
    Case("bad-escape", "broken string escape",
         _net_file(HEAD + 'layer { name: "\\u12" type: "ReLU" bottom: "data" top: "r" }'),
         ParseError, r"truncated \\uXXXX escape"),
    Case("non-utf8", "prototxt that is not UTF-8 (Latin-1 bytes)",
         _net_file(HEAD.encode() + b'layer { name: "caf\xe9" type: "ReLU" bottom: "data" top: "r" }'),
         ParseError, r"not UTF-8 text \(byte 0xe9 at offset \d+\)", where=r"net\.prototxt:3:\d+$"),
    Case("nul-bytes", "NUL bytes in a text file",
         _net_file(HEAD.encode() + b"\x00\x00layer {}"),
         ParseError, r"NUL byte in text at offset \d+; it looks like a binary protobuf"),
    Case("caffemodel-as-prototxt", "a .caffemodel given where a prototxt is expected",
         lambda d: Net(str(small_caffemodel(d))),
         ParseError, r"not UTF-8 text .*it looks like a binary protobuf \(a \.caffemodel or \.binaryproto\?\)"),
    Case("gzip-prototxt", "gzip-compressed prototxt",
         _net_file(gzip.compress(SMALL.encode()), "net.prototxt.gz"),
         ParseError, r"gzip-compressed; decompress it first"),
    Case("empty-prototxt", "empty (or whitespace-only) prototxt",
         _net_file(" \n\n"), ParseError, r"empty file, expected a net prototxt"),
    Case("directory-prototxt", "a directory given as the prototxt",
         lambda d: Net(str(d)), ParseError, r"is a directory, expected a net prototxt file"),
    Case("missing-prototxt", "prototxt that does not exist",
         lambda d: Net(str(d / "nope.prototxt")), ParseError,
         r"cannot read net prototxt: No such file or directory"),
    Case("huge-prototxt", "prototxt over the size limit (limit lowered to 1 KiB here)",
         _limited_text, LimitError,
         r"text definition is \d+ bytes, over the limit of 1024 \(raise it with CAFFE_COMPAT_MAX_PROTOTXT_BYTES"),
    Case("solver-enum", "solver with a bad enum value",
         lambda d: read_solver_text(str(write(d, "solver.prototxt", 'net: "n.prototxt"\nsolver_mode: GPUU\n'))),
         ParseError, r"no value named GPUU; allowed: CPU, GPU \(did you mean GPU\?\)"),
    # --- the graph
    Case("unknown-type", "unknown layer type",
         _net_text(HEAD + 'layer { name: "c" type: "Convolutin" bottom: "data" top: "c" }'),
         UnknownLayerError, r"unknown layer type 'Convolutin'\. Did you mean 'Convolution'.*"
                            r"@caffe_compat\.register_layer\('Type'\)",
         layer="c"),
    Case("unknown-bottom", "bottom that no layer produces",
         _net_text(HEAD + 'layer { name: "r" type: "ReLU" bottom: "dat" top: "r" }'),
         GraphError, r"unknown bottom blob 'dat' \(no earlier layer produces it; known blobs: data\)",
         layer="r"),
    Case("cycle", "cycle / bottom produced by a later layer (Caffe nets are sequential)",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "b" top: "a" }\n'
                          'layer { name: "b" type: "ReLU" bottom: "a" top: "b" }'),
         GraphError, r"unknown bottom blob 'b'", layer="a"),
    Case("duplicate-top", "two layers produce the same top",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" top: "x" }\n'
                          'layer { name: "b" type: "Sigmoid" bottom: "data" top: "x" }'),
         GraphError, r"top blob 'x' is produced by more than one layer", layer="b"),
    Case("missing-top", "layer without its top",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" }'),
         GraphError, r"ReLU takes 1 top blob\(s\), got 0", layer="a"),
    Case("bottom-count", "wrong number of bottoms",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" bottom: "data" top: "x" }'),
         GraphError, r"ReLU takes 1 bottom blob\(s\), got 2", layer="a"),
    Case("inplace-position", "in-place top at the wrong position",
         _net_text(HEAD + 'layer { name: "s" type: "Slice" bottom: "data" top: "a" top: "data" '
                          'slice_param { axis: 1 slice_point: 1 } }'),
         GraphError, r"in-place top at the wrong position", layer="s"),
    Case("loss-weight-count", "loss_weight count differs from the top count",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" top: "x" loss_weight: 1 loss_weight: 2 }'),
         SchemaError, r"loss_weight must be given once per top \(1\), got 2", layer="a"),
    Case("param-count", "more param specs than the layer has blobs",
         _net_text(HEAD + 'layer { name: "a" type: "ReLU" bottom: "data" top: "a" param { lr_mult: 1 } }'),
         SchemaError, r"1 param specs given but the layer has 0 blobs", layer="a"),
    Case("share-shape", "shared parameter with another shape",
         _net_text('input: "data" input_shape { dim: 2 dim: 4 }\n'
                   'layer { name: "a" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } '
                   'inner_product_param { num_output: 3 } }\n'
                   'layer { name: "b" type: "InnerProduct" bottom: "a" top: "b" param { name: "w" } '
                   'inner_product_param { num_output: 3 } }'),
         ShapeError, r"cannot share param 'w' owned by layer 'a': shape \(3, 4\) vs \(3, 3\)", layer="b"),
    Case("shape-mismatch", "bottoms of incompatible shapes (Eltwise)",
         _net_text(HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
                          'pooling_param { pool: MAX kernel_size: 2 stride: 2 } }\n'
                          'layer { name: "e" type: "Eltwise" bottom: "data" bottom: "p" top: "e" }'),
         ShapeError, r"bottom 1 has shape \(2, 3, 2, 2\), expected the shape of bottom 0 \(2, 3, 4, 4\)",
         layer="e"),
    Case("negative-input-dim", "negative input dimension",
         _net_text('input: "data" input_shape { dim: -2 dim: 3 }\n'
                   'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'),
         ShapeError, r"negative dimension in shape \(-2, 3\)"),
    Case("input-dim-count", "legacy input_dim not 4 per input",
         _net_text('input: "data" input_dim: 2 input_dim: 3 input_dim: 4'),
         SchemaError, r"1 net inputs need 4 input_dim values \(4 per input\), got 3"),
    Case("python-layer", "Python layer while Python layers are not allowed (module not imported)",
         _python_layer, PythonLayerError,
         r"needs to import module 'evil_layer_mod', which runs arbitrary code, and Python layers are "
         r"not allowed", layer="py"),
    # --- weights
    Case("truncated-caffemodel", "caffemodel cut in half",
         _truncated, ParseError, r"corrupt or truncated caffemodel: field 100 runs past the end",
         where=r"cut\.caffemodel$"),
    Case("wire-type", "caffemodel with a wrong wire type (layer as varint)",
         lambda d: W.read_caffemodel(str(write(d, "w.caffemodel", small_caffemodel(d).read_bytes()
                                               + field(100, 0, varint(5))))),
         ParseError, r"field 100 \(NetParameter\.layer\) has wire type varint, expected length-delimited"),
    Case("blob-wire-type", "blob data with a wrong wire type",
         lambda d: W.read_caffemodel(str(caffemodel_with_blob(d, field(5, 0, varint(3))))),
         ParseError, r"field 5 \(BlobProto\.data\) has wire type varint, expected length-delimited or fixed32"),
    Case("shape-vs-data", "blob whose declared shape disagrees with its data",
         lambda d: W.read_caffemodel(str(caffemodel_with_blob(d, blob_shape_data((2, 3), [1.0] * 5)))),
         WeightsError, r"blob declares shape \(2, 3\) but holds 5 values \(expected 6 values, got 5\)",
         layer="conv1", blob=0),
    Case("absurd-dims", "blob with absurd dimensions (10^15 elements, no data)",
         lambda d: W.read_caffemodel(str(caffemodel_with_blob(d, blob_shape_data((100000,) * 3, [])))),
         LimitError, r"blob shape \(100000, 100000, 100000\) has 1000000000000000 elements, over the limit "
                     r"of 2147483648 \(raise it with CAFFE_COMPAT_MAX_BLOB_ELEMENTS=N", layer="conv1", blob=0),
    Case("negative-blob-dim", "blob with a negative dimension",
         lambda d: W.read_caffemodel(str(caffemodel_with_blob(d, blob_shape_data((-1, 4), [1.0] * 4)))),
         WeightsError, r"blob has a negative dimension in shape \(-1, 4\)", layer="conv1", blob=0),
    Case("nan-weights", "NaN in the weights",
         _nan_weights, WeightsError,
         r"holds 1 NaN and 0 Inf value\(s\) \(first at flat index 20\); a diverged or corrupt model\? "
         r"\(check_finite=False or CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1", layer="ip", blob=0),
    Case("weights-shape", "weights of another shape than the net's",
         _shape_mismatch, WeightsError,
         r"shape mismatch for 'weight': the net expects \(4, 18\), the file has \(3, 18\)", layer="ip", blob=0),
    Case("weights-blob-count", "weights with another number of blobs",
         _blob_count, WeightsError, r"incompatible number of blobs: the file has 2, the net's InnerProduct "
                                    r"layer has 1", layer="ip"),
    Case("weights-missing", "net layer without weights in the file (renamed layer)",
         _renamed, WeightsError, r"no weights in the file for layer\(s\) cls_score \(renamed layers\? use "
                                 r"allow_missing / --allow-missing"),
    Case("prototxt-as-caffemodel", "a prototxt given where a caffemodel is expected",
         lambda d: Net(SMALL).load_weights(str(write(d, "net.caffemodel", SMALL))),
         ParseError, r"it looks like a text prototxt, not a binary protobuf \(swapped arguments\?\)"),
    Case("empty-caffemodel", "empty caffemodel",
         lambda d: W.read_caffemodel(str(write(d, "e.caffemodel", b""))), ParseError,
         r"empty file, expected a binary \.caffemodel"),
    Case("directory-caffemodel", "a directory given as the caffemodel",
         lambda d: W.read_caffemodel(str(d)), ParseError, r"is a directory, expected a \.caffemodel file"),
    Case("malicious-pt", "pickle with a malicious __reduce__ in a .pt (never executed)",
         _malicious_pt, ParseError, r"not a readable weights-only \.pt file \(refusing to unpickle anything "
                                    r"but tensors\)"),
    Case("prototxt-as-pt", "py-faster-rcnn's .pt net definition given as weights",
         lambda d: Net(SMALL).load_weights(str(write(d, "test.pt", SMALL))), ParseError,
         r"it looks like a text prototxt \(py-faster-rcnn names net definitions \.pt\), not a weights file"),
    Case("checkpoint-pt", ".pt holding a training checkpoint, not a state dict",
         _checkpoint_pt, WeightsError, r"must hold a dict of tensors \(a state dict\), this one holds a dict "
                                       r"with keys state_dict, epoch \(a training checkpoint\?"),
    Case("corrupt-safetensors", "corrupt safetensors file",
         lambda d: Net(SMALL).load_weights(str(write(d, "w.safetensors", b"\xff" * 16))), ParseError,
         r"not a readable safetensors file"),
    Case("extra-keys", "state dict with keys the net lacks",
         _extra_keys_st, WeightsError, r"the file has keys the net lacks: fc8\.weight"),
    Case("binaryproto-truncated", "truncated mean .binaryproto",
         _binaryproto_truncated, ParseError, r"corrupt or truncated BlobProto \(\d+ bytes\)"),
    Case("binaryproto-shape", "mean .binaryproto whose 4-D dims disagree with its data",
         _binaryproto_shape, WeightsError, r"blob declares shape \(1, 3, 2, 2\) but holds 10 values"),
    Case("limit-env", "limit environment variable that is not a number",
         _env_limit, LimitError, r"CAFFE_COMPAT_MAX_BLOB_ELEMENTS='lots' is not a number"),
    Case("imageset-label", "convert-imageset list line whose label is not an integer",
         _imageset_bad_label, DataError, r"bad label 'cat' for 'b\.jpg': labels are integers",
         where=r"list\.txt:2$"),
    Case("imageset-db-exists", "convert-imageset into an existing database",
         _imageset_db_exists, DataError, r"the database already exists", where=r"db$"),
    Case("reval-empty", "reval of a folder without saved detections",
         _reval_empty, DataError, r"no detections in this folder \(expected detections\.npz"),
    Case("compress-rank", "compress: an SVD rank above min(N, K)",
         _compress_rank, SchemaError, r"rank l = num_output 9 of 'fc_L' must be in 1\.\.min\(N, K\) = "),
    Case("unfused-into-fused", "unfused weights loaded into a net after fuse_batchnorm()",
         _unfused_into_fused, WeightsError, r"the net has folded it \(folded into convolution 'conv' by "
                                            r"fuse_batchnorm\(\)\): load the weights first", layer="bn"),
]


#: no error message is longer (values quoted in messages are cut short)
MAX_MESSAGE = 2000


def check_bad_input(case: Case, tmp_path: pathlib.Path) -> CaffeCompatError:
    """Run one bad-input case: one CaffeCompatError of the case's class, located and worded
    as the case says, one line, exit 2 on the command line; returns it."""
    with pytest.raises(case.error) as ei:
        case.run(tmp_path)
    e = ei.value
    assert isinstance(e, CaffeCompatError)
    assert re.search(case.match, str(e)), f"{str(e)!r} does not match {case.match!r}"
    if case.where is not None:
        assert e.where and re.search(case.where, e.where), e.where
    if case.layer is not None:
        assert e.layer == case.layer, e.layer
    if case.blob is not None:
        assert e.blob == case.blob, e.blob
    assert "\n" not in e.one_line() and len(e.one_line()) < MAX_MESSAGE
    assert e.exit_code == 2
    return e


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    check_bad_input(case, tmp_path)


def test_at_least_30_kinds():
    assert len({c.id for c in CASES}) == len(CASES) >= 30


def test_doc_is_current():
    """docs/bad_inputs.md is generated from CASES (python tests/make_bad_inputs_doc.py)."""
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import make_bad_inputs_doc
    finally:
        sys.path.remove(str(ROOT / "tests"))
    doc = ROOT / "docs" / "bad_inputs.md"
    assert doc.exists(), "run: python tests/make_bad_inputs_doc.py"
    recorded = re.search(r"Recorded with Python [\d.]+ and torch [^ ]+?\.(?=\s)", doc.read_text())
    assert recorded, "docs/bad_inputs.md lacks its 'Recorded with' line: regenerate it"
    if recorded.group(0) != make_bad_inputs_doc.made_with():
        pytest.skip(f"docs/bad_inputs.md: {recorded.group(0)[:-1]}; this is {make_bad_inputs_doc.made_with()[13:-1]} "
                    "(pickle messages differ between versions)")
    assert doc.read_text() == make_bad_inputs_doc.render(), \
        "docs/bad_inputs.md is stale: run python tests/make_bad_inputs_doc.py"


# ---------------------------------------------------------------------- the error tree
def test_error_parts_and_located():
    e = WeightsError("shape mismatch", where="m.caffemodel", layer="conv1", blob=0,
                     expected=(4, 3), got=(5, 3))
    assert str(e) == "m.caffemodel: layer 'conv1': blob 0: shape mismatch (expected (4, 3), got (5, 3))"
    assert (e.where, e.layer, e.blob, e.expected, e.got) == ("m.caffemodel", "conv1", 0, (4, 3), (5, 3))
    inner = ShapeError("bad", layer="c")
    outer = inner.located(where="net.prototxt", layer="other", blob=2)
    assert type(outer) is ShapeError and str(outer) == "net.prototxt: layer 'c': blob 2: bad"
    assert inner.located(layer="x") is inner
    assert ShapeError("a\n  b").one_line() == "a b"
    assert SolverError("x").exit_code == 1 and GraphError("x").exit_code == 2
    for cls in (ParseError, SchemaError, GraphError, UnknownLayerError, ShapeError, WeightsError,
                LimitError, SolverError, PythonLayerError):
        assert issubclass(cls, CaffeCompatError)


def test_unicode_names_are_fine(tmp_path):
    text = ('\ufeffname: "网络"\ninput: "données" input_shape { dim: 1 dim: 2 }\n'
            'layer { name: "ReLU→😀" type: "ReLU" bottom: "données" top: "sortie" }\n')
    net = Net(str(write(tmp_path, "u.prototxt", text)))
    assert net.net_name == "网络" and net.layer_names[-1] == "ReLU→😀"
    out = net(**{"données": torch.tensor([[-1.0, 2.0]])})
    assert out["sortie"].tolist() == [[0.0, 2.0]]


def test_prototxt_text_given_directly_is_size_limited():
    with limits.raised(max_text_bytes=100):
        with pytest.raises(LimitError, match=r"<string>: text definition is \d+ bytes"):
            read_net_text(SMALL)


def test_limit_helpers():
    assert limits.element_count((2 ** 40, 2 ** 40)) == 2 ** 80  # no int64 wrap-around
    with pytest.raises(LimitError, match="negative dimension"):
        limits.check_shape((3, -1))
    with limits.raised(max_blob_elements=10):
        assert limits.max_blob_elements() == 10
        with pytest.raises(LimitError, match=r"layer 'x': blob 1: weight shape \(11,\) has 11 elements"):
            limits.check_shape((11,), what="weight", layer="x", blob=1)
    assert limits.max_blob_elements() == 2 ** 31
    with pytest.raises(KeyError):
        limits.set_limits(max_bananas=3)


def test_blob_to_array_overflowing_shape_is_refused():
    """int64 products wrap around: (2^32, 2^32) must not pass as 0 elements."""
    from caffe_compat.io import blob_to_array

    b = caffe_pb2.BlobProto()
    b.shape.dim.extend([2 ** 32, 2 ** 32])
    with pytest.raises(LimitError, match="18446744073709551616 elements"):
        blob_to_array(b)


# ---------------------------------------------------------------------- truncations
def _layer_boundaries(data: bytes) -> set:
    """Offsets where a top-level field of a caffemodel ends (valid shorter messages)."""
    return {b for _, _, _, b in wire.fields(data, 0, len(data))}


def test_every_truncation_of_a_small_caffemodel(tmp_path):
    src = small_caffemodel(tmp_path)
    data = src.read_bytes()
    assert len(data) < 4000
    full = Net(SMALL)
    full.load_weights(str(src))
    want = {k: v.clone() for k, v in full.state_dict().items()}
    boundaries = _layer_boundaries(data)
    cut = tmp_path / "cut.caffemodel"
    loaded = []
    net = Net(SMALL, seed=99)
    for n in range(len(data)):
        cut.write_bytes(data[:n])
        try:
            net.load_weights(str(cut))
        except CaffeCompatError as e:
            assert isinstance(e, ParseError) == (n not in boundaries), (n, str(e))
            continue
        # a cut at a layer boundary that only lost blob-less layers (the Softmax) is a
        # valid, complete file for this net: it must have loaded every weight (a success
        # loads every layer with blobs, so earlier partial loads do not matter)
        loaded.append(n)
        assert all(torch.equal(v, want[k]) for k, v in net.state_dict().items())
    assert loaded == [max(boundaries - {len(data)})]


def test_every_truncation_of_a_v1_caffemodel(tmp_path):
    msg = caffe_pb2.NetParameter(name="v1")
    lp = msg.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT)
    for dims, n in (((1, 1, 3, 4), 12), ((1, 1, 1, 3), 3)):
        b = lp.blobs.add()
        b.num, b.channels, b.height, b.width = dims
        b.data.extend(np.arange(n, dtype=np.float32).tolist())
    data = msg.SerializeToString()
    W.read_caffemodel(str(write(tmp_path, "v1.caffemodel", data)))
    net_text = 'input: "x" input_shape { dim: 2 dim: 4 }\n' \
               'layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y" inner_product_param { num_output: 3 } }'
    boundaries = _layer_boundaries(data)
    for n in range(1, len(data)):
        path = str(write(tmp_path, "v1.caffemodel", data[:n]))
        if n not in boundaries:
            with pytest.raises(ParseError):
                W.read_caffemodel(path)
        with pytest.raises(CaffeCompatError):
            Net(net_text).load_weights(path)


# ---------------------------------------------------------------------- the CLI
def _invoke(*args):
    from caffe_compat.cli.main import main

    return CliRunner().invoke(main, [str(a) for a in args])


def test_cli_bad_input_one_line_exit_2(tmp_path):
    bad = write(tmp_path, "bad.prototxt", HEAD + 'layer { name: "p" type: "Pooling" bottom: "data" top: "p"\n'
                                                 '  pooling_param { pool: MAXX } }\n')
    r = _invoke("inspect", bad)
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:4:")
    assert "allowed: MAX, AVE, STOCHASTIC" in lines[0] and "Traceback" not in r.output
    r = _invoke("--debug", "inspect", bad)
    assert isinstance(r.exception, ParseError)  # propagates (click prints the traceback)


def _temp_command(fn):
    """Attach a throwaway command to the CLI group (for failures no real command makes)."""
    import click

    from caffe_compat.cli.main import friendly, main

    cmd = click.command("zz-test-fail")(friendly(fn))
    main.add_command(cmd)
    return main


@pytest.mark.parametrize("exc,code,line", [
    (SolverError("loss is NaN at iteration 7"), 1, "error: loss is NaN at iteration 7"),
    (ShapeError("bad\nshape", layer="c"), 2, "error: layer 'c': bad shape"),
    (OSError(errno.ENOSPC, "No space left on device", "out.caffemodel"), 1,
     "error: out.caffemodel: No space left on device"),
    (KeyError("oops"), 1, "internal error: KeyError: 'oops' (a bug in caffe-compat; rerun with --debug "
                          "for the traceback and report it)"),
])
def test_cli_exit_codes_and_debug(exc, code, line):
    def boom():
        raise exc

    main = _temp_command(boom)
    try:
        r = CliRunner().invoke(main, ["zz-test-fail"])
        assert r.exit_code == code
        assert r.output.strip().splitlines() == [line]
        r = CliRunner().invoke(main, ["--debug", "zz-test-fail"])
        assert r.exception is exc  # --debug: the exception (and its traceback) comes through
    finally:
        main.commands.pop("zz-test-fail", None)


@pytest.mark.slow
def test_cli_subprocess_no_traceback_without_debug(tmp_path):
    bad = write(tmp_path, "m.caffemodel", b"\x0a\x05small\xa2\x06\x10")
    net = write(tmp_path, "net.prototxt", SMALL)
    cmd = [sys.executable, "-m", "caffe_compat.cli"]
    env = {k: v for k, v in os.environ.items() if k != "CAFFE_COMPAT_DEBUG"}
    p = subprocess.run(cmd + ["inspect", str(net), "-w", str(bad)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: {bad}: corrupt or truncated caffemodel: field 100 runs past the end of its message"]
    assert "Traceback" not in p.stderr
    p = subprocess.run(cmd + ["--debug", "inspect", str(net), "-w", str(bad)], capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode != 0 and "Traceback (most recent call last)" in p.stderr
    assert "caffe_compat.errors.ParseError" in p.stderr


# ---------------------------------------------------------------------- Python layers
def test_python_layer_imports_only_when_allowed(tmp_path, monkeypatch):
    monkeypatch.delenv("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", raising=False)
    marker = tmp_path / "IMPORTED"
    write(tmp_path, "marker_layer_mod.py", f"open({str(marker)!r}, 'w').close()\nraise ImportError('stop')\n")
    text = HEAD + ('layer { name: "py" type: "Python" bottom: "data" top: "x" '
                   'python_param { module: "marker_layer_mod" layer: "L" } }')
    proto = write(tmp_path, "py.prototxt", text)
    with pytest.raises(PythonLayerError, match="not allowed"):
        Net(str(proto))
    assert not marker.exists() and "marker_layer_mod" not in sys.modules
    r = _invoke("inspect", proto)
    assert r.exit_code == 2 and "not allowed" in r.output and not marker.exists()
    # the control: allowed, the module is imported (so the checks above can fail)
    try:
        with pytest.raises(PythonLayerError, match="cannot import Python layer module 'marker_layer_mod'"):
            Net(str(proto), allow_python_layers=True)
        assert marker.exists()
    finally:
        sys.modules.pop("marker_layer_mod", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


# ---------------------------------------------------------------------- absurd shapes in definitions
def _guard_allocations(monkeypatch, limit=10 ** 8):
    """Make a filler allocation over ``limit`` elements fail fast (a test guard, not a fix)."""
    import caffe_compat.fillers as fillers

    real = fillers.fill

    def fill(shape, *a, **k):
        if limits.element_count(shape) > limit:
            raise MemoryError(f"test guard: filler asked for {limits.element_count(shape)} elements")
        return real(shape, *a, **k)

    for mod in list(sys.modules.values()):
        if getattr(mod, "fill", None) is real:
            monkeypatch.setattr(mod, "fill", fill)


ABSURD_DEFINITIONS = [
    ("input", 'input: "data" input_shape { dim: 200000 dim: 300000 dim: 400000 dim: 400000 }\n'
              'layer { name: "r" type: "ReLU" bottom: "data" top: "r" }'),
    ("dummydata", 'layer { name: "d" type: "DummyData" top: "d" '
                  'dummy_data_param { shape { dim: 100000 dim: 100000 dim: 100000 } } }'),
    ("innerproduct", 'input: "data" input_shape { dim: 1 dim: 100000 }\n'
                     'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "r" '
                     'inner_product_param { num_output: 1000000000 } }'),
    ("convolution", 'input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }\n'
                    'layer { name: "c" type: "Convolution" bottom: "data" top: "c" '
                    'convolution_param { num_output: 100000000 kernel_size: 3 } }'),
    ("embed", 'input: "ids" input_shape { dim: 3 }\n'
              'layer { name: "e" type: "Embed" bottom: "ids" top: "e" '
              'embed_param { num_output: 100000000 input_dim: 100000000 } }'),
    ("parameter", 'layer { name: "p" type: "Parameter" top: "p" '
                  'parameter_param { shape { dim: 100000 dim: 100000 dim: 100000 } } }'),
]


@pytest.mark.parametrize("what,text", ABSURD_DEFINITIONS, ids=[a for a, _ in ABSURD_DEFINITIONS])
def test_absurd_shapes_in_definitions_refused_before_allocation(what, text, monkeypatch):
    _guard_allocations(monkeypatch)
    with pytest.raises(LimitError, match="over the limit"):
        Net(text)


# ---------------------------------------------------------------------- atomic writes
def _no_temp_files(folder: pathlib.Path) -> List[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("ext", ["caffemodel", "safetensors", "pt"])
def test_write_failing_midway_keeps_previous_file(tmp_path, monkeypatch, ext):
    path = tmp_path / f"snap.{ext}"
    Net(SMALL, seed=1).save_weights(str(path))
    before = path.read_bytes()
    net2 = Net(SMALL, seed=2)
    import caffe_compat.atomic as atomic

    real_fsync = os.fsync

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        net2.save_weights(str(path))
    monkeypatch.setattr(atomic.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert _no_temp_files(tmp_path) == []


def test_atomic_writes_get_the_umask_permissions(tmp_path):
    """Output files read like plain open()'s (0666 & ~umask), not mkstemp's private 0600."""
    from caffe_compat.atomic import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(str(tmp_path / "a.bin"), b"x")
        os.umask(0o077)
        atomic_write(str(tmp_path / "b.bin"), b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.bin").stat().st_mode & 0o777 == 0o600


def test_caffemodel_writer_raising_between_layers(tmp_path, monkeypatch):
    path = tmp_path / "snap.caffemodel"
    Net(SMALL, seed=1).save_weights(str(path))
    before = path.read_bytes()
    calls = []
    real = W.encode_blob

    def flaky(a):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while writing")
        return real(a)

    monkeypatch.setattr(caffemodel, "encode_blob", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        Net(SMALL, seed=2).save_weights(str(path))
    assert path.read_bytes() == before and _no_temp_files(tmp_path) == []


def test_real_write_error_from_file_size_limit(tmp_path):
    """A genuine EFBIG from write(2) (RLIMIT_FSIZE), in a child process: like a full disk."""
    path = tmp_path / "snap.caffemodel"
    Net(SMALL, seed=1).save_weights(str(path))
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from caffe_compat.net import Net
        import torch
        text = {SMALL.replace('num_output: 3', 'num_output: 300')!r}
        net = Net(text, seed=2)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))
        try:
            net.save_weights({str(path)!r})
        except OSError as e:
            print("OSError", e.errno)
            sys.exit(0)
        print("no error")
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["OSError", str(errno.EFBIG)]
    assert path.read_bytes() == before and _no_temp_files(tmp_path) == []


def test_full_tmpfs(tmp_path):
    """A real full disk: a 64 KiB tmpfs (needs root and mount; skipped otherwise)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        path = mnt / "snap.caffemodel"
        Net(SMALL, seed=1).save_weights(str(path))
        before = path.read_bytes()
        big = Net(SMALL.replace("num_output: 3", "num_output: 2000"), seed=2)  # ~140 KB of weights
        with pytest.raises(OSError) as ei:
            big.save_weights(str(path))
        assert ei.value.errno == errno.ENOSPC
        assert path.read_bytes() == before and _no_temp_files(mnt) == []
        r = _invoke("convert", str(path), "-o", str(mnt / "x.safetensors"), "--model",
                    str(write(tmp_path, "big.prototxt", SMALL.replace("num_output: 3", "num_output: 2000"))))
        assert r.exit_code == 2  # the small file does not fit the big net: bad input, one line
        del r  # its exception chain holds the file's memory map, which keeps the mount busy
    finally:
        import gc

        gc.collect()
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_locate_layer_for_graph_errors(tmp_path):
    """io.locate_layer finds a layer's line, so graph errors can say file:line (lead: net.py)."""
    from caffe_compat.io import locate_layer

    text = ('name: "n"\ninput: "data"\nlayer {\n  name: "conv1"  # first\n  type: "Convolution"\n'
            '  convolution_param { num_output: 1 }\n}\nlayers {\n  bottom: "conv1"\n  name: "ip"\n'
            '  include { stage: "name: \\"x\\"" }\n}\n')
    p = write(tmp_path, "n.prototxt", text)
    assert locate_layer(str(p), "conv1") == f"{p}:4"
    assert locate_layer(str(p), "ip") == f"{p}:10"
    assert locate_layer(str(p), "x") is None and locate_layer(str(p), "n") is None
    assert locate_layer(text, "ip") == "<string>:10"
    assert locate_layer(str(tmp_path / "missing.prototxt"), "ip") is None


def test_errors_pickle_with_their_parts():
    import pickle

    e = WeightsError("bad", where="f.caffemodel", layer="ip", blob=1, expected=(2,), got=(3,))
    e2 = pickle.loads(pickle.dumps(e))
    assert type(e2) is WeightsError and str(e2) == str(e) and (e2.layer, e2.blob, e2.got) == ("ip", 1, (3,))
