"""The forks' schemas: text by name, binaries by each fork's own numbers, user schemas,
user layers, and one error naming everything unknown."""
from __future__ import annotations

import os
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from google.protobuf import text_format

from caffe_compat import Net, forks, wire
from caffe_compat.errors import ParseError, UnknownLayerError
from caffe_compat.layers import registry
from caffe_compat.layers.base import Layer
from caffe_compat.protos import caffe_pb2
from caffe_compat.weights import encode_blob, read_caffemodel


# ------------------------------------------------------------------ wire helpers (by hand)
def varint_field(num: int, v: int) -> bytes:
    return wire.encode_varint(num << 3) + wire.encode_varint(v)


def float_field(num: int, v: float) -> bytes:
    return wire.encode_varint((num << 3) | 5) + np.float32(v).tobytes()


def layer_bytes(name: str, type_: str, *fields: bytes, blobs=()) -> bytes:
    body = wire.len_field(1, name.encode()) + wire.len_field(2, type_.encode()) + b"".join(fields)
    body += b"".join(wire.len_field(7, encode_blob(np.asarray(b, np.float32))) for b in blobs)
    return wire.len_field(100, body)


def write_model(path, *layers: bytes) -> str:
    with open(path, "wb") as f:
        f.write(wire.len_field(1, b"forknet") + b"".join(layers))
    return str(path)


# ------------------------------------------------------------------ the union schema
FORK_SNIPPETS = {
    "ssd": 'type: "PriorBox" prior_box_param { min_size: 30 aspect_ratio: 2 flip: true clip: false '
           'variance: 0.1 step: 8 offset: 0.5 }',
    "segnet": 'type: "BN" bn_param { bn_mode: INFERENCE scale_filler { type: "constant" } }',
    "pspnet": 'type: "Interp" interp_param { zoom_factor: 2 pad_beg: 0 pad_end: -1 }',
    "rfcn": 'type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.0625 output_dim: 21 group_size: 7 }',
    "yolo": 'type: "Reorg" reorg_param { stride: 2 }',
    "shufflenet": 'type: "ShuffleChannel" shuffle_channel_param { group: 3 }',
    "ctpn": 'type: "Lstm" lstm_param { num_output: 128 }',
}


@pytest.mark.parametrize("fork", sorted(FORK_SNIPPETS))
def test_union_schema_parses_each_forks_param_blocks(fork):
    lp = text_format.Parse(f'name: "x" {FORK_SNIPPETS[fork]}', caffe_pb2.LayerParameter())
    assert lp.ListFields()[-1][0].name.endswith("_param")
    assert fork in {f.name for f in forks.forks()}


def test_pooling_ceil_mode_and_pspnet_bn_fields_parse():
    p = text_format.Parse("pool: MAX kernel_size: 3 stride: 2 ceil_mode: false", caffe_pb2.PoolingParameter())
    assert p.HasField("ceil_mode") and not p.ceil_mode
    bn = text_format.Parse("slope_filler { value: 1 } momentum: 0.95 eps: 1e-4 frozen: true",
                           caffe_pb2.BNParameter())
    assert bn.frozen and abs(bn.eps - 1e-4) < 1e-9


def test_union_keeps_bvlc_binary_numbering():
    """Fork fields of BVLC messages live at private numbers: a binary reads as BVLC reads it."""
    lp = caffe_pb2.LayerParameter.DESCRIPTOR
    assert lp.fields_by_name["input_param"].number == 143
    assert lp.fields_by_name["interp_param"].number >= 400_000_000
    assert lp.fields_by_name["psroi_pooling_param"].number >= 400_000_000
    pool = caffe_pb2.PoolingParameter.DESCRIPTOR
    assert pool.fields_by_name["round_mode"].number == 13
    assert pool.fields_by_name["ceil_mode"].number >= 400_000_000
    # a fork's own message keeps the fork's numbers
    assert caffe_pb2.PriorBoxParameter.DESCRIPTOR.fields_by_name["min_size"].number == 1


# ------------------------------------------------------------------ binaries by fork numbers
def test_pspnet_binary_interp_at_143_is_read_as_interp_not_input_param(tmp_path):
    # PSPNet writes interp_param at 143 (BVLC's input_param): InterpParameter{zoom_factor=3: 2,
    # pad_end=6: -1 (varint of a negative int32 is 10 bytes)}
    interp = varint_field(3, 2) + varint_field(6, (1 << 64) - 1)
    path = write_model(tmp_path / "psp.caffemodel",
                       layer_bytes("interp", "Interp", wire.len_field(143, interp)))
    _, layers = read_caffemodel(path)
    p = layers[0].param
    assert not p.HasField("input_param")
    assert p.interp_param.zoom_factor == 2 and p.interp_param.pad_end == -1
    assert layers[0].skipped_fields == []


def test_pspnet_bn_binary_decodes_with_pspnet_numbers_and_blobs_load(tmp_path):
    # PSPNet: bn_param = 152 {slope_filler=1 {value=2: 1.0}, momentum=3: 0.9, eps=4: 1e-5, frozen=5}
    bn = wire.len_field(1, float_field(2, 1.0)) + float_field(3, 0.95) + float_field(4, 1e-4) + varint_field(5, 1)
    blobs = [np.full((1, 3, 1, 1), v, np.float32) for v in (2.0, 0.5, 0.1, 4.0)]
    path = write_model(tmp_path / "bn.caffemodel",
                       layer_bytes("bn1", "BN", wire.len_field(152, bn), blobs=blobs))
    _, layers = read_caffemodel(path)
    p = layers[0].param.bn_param
    assert p.frozen and abs(p.momentum - 0.95) < 1e-7 and abs(p.eps - 1e-4) < 1e-9
    assert not p.HasField("bn_mode")
    assert [b.data.reshape(-1)[0] for b in layers[0].blobs] == list(np.float32([2.0, 0.5, 0.1, 4.0]))


def test_segnet_bn_binary_decodes_with_segnet_numbers(tmp_path):
    # SegNet: bn_param = 45 {bn_mode=3: INFERENCE(1)}
    path = write_model(tmp_path / "segbn.caffemodel",
                       layer_bytes("bn1", "BN", wire.len_field(45, varint_field(3, 1))))
    _, layers = read_caffemodel(path)
    assert layers[0].param.bn_param.bn_mode == caffe_pb2.BNParameter.INFERENCE


def test_ssd_and_yolo_binaries(tmp_path):
    prior = float_field(1, 30.0) + float_field(3, 2.0) + varint_field(4, 1) + float_field(10, 8.0)
    ups_yolo = varint_field(1, 2)  # eric612's upsample_param = 150 {scale=1: 2}
    ups_segnet = varint_field(1, 2) + varint_field(6, 45)  # SegNet's = 137 {scale, upsample_h=6}
    path = write_model(tmp_path / "ssd.caffemodel",
                       layer_bytes("pb", "PriorBox", wire.len_field(203, prior)),
                       layer_bytes("up_y", "Upsample", wire.len_field(150, ups_yolo)),
                       layer_bytes("up_s", "Upsample", wire.len_field(137, ups_segnet)),
                       layer_bytes("ro", "Reorg", wire.len_field(149, varint_field(1, 2))))
    _, layers = read_caffemodel(path)
    by = {l.name: l.param for l in layers}
    assert list(by["pb"].prior_box_param.min_size) == [30.0]
    assert list(by["pb"].prior_box_param.aspect_ratio) == [2.0] and by["pb"].prior_box_param.flip
    assert by["pb"].prior_box_param.step == 8.0
    assert by["up_y"].upsample_param.scale == 2 and not by["up_y"].upsample_param.HasField("upsample_h")
    assert by["up_s"].upsample_param.upsample_h == 45
    assert by["ro"].reorg_param.stride == 2


def test_other_forks_numbers_on_a_bvlc_layer_are_skipped_not_misread(tmp_path):
    # CaffeOnSpark writes a class name at 10001 (R-FCN's psroi_pooling_param number) on data
    # layers, and a Convolution from an unknown fork may carry anything at 143 (input_param).
    path = write_model(tmp_path / "spark.caffemodel",
                       layer_bytes("data", "MemoryData", wire.len_field(10001, b"com.example.Frame")),
                       layer_bytes("conv", "Convolution", wire.len_field(143, b"\x0a\x03\xff\xff\xff"),
                                   wire.len_field(106, varint_field(1, 4)),
                                   blobs=[np.ones((4, 1, 1, 1))]))
    _, layers = read_caffemodel(path)
    assert not layers[0].param.HasField("psroi_pooling_param")
    conv = layers[1]
    assert conv.param.convolution_param.num_output == 4
    assert conv.skipped_fields == [143]  # not decodable as BVLC's input_param: skipped, reported
    assert conv.blobs[0].data.shape == (4,) or conv.blobs[0].data.size == 4


@pytest.mark.parametrize("snippet,fork_number", [
    ('type: "Interp" interp_param { zoom_factor: 2 }', 143),
    ('type: "BN" bn_param { slope_filler { value: 1 } frozen: true }', 152),
    ('type: "BN" bn_param { bn_mode: INFERENCE }', 45),
    ('type: "PriorBox" prior_box_param { min_size: 30 }', 203),
    ('type: "PSROIPooling" psroi_pooling_param { spatial_scale: 0.5 output_dim: 2 group_size: 3 }', 10001),
    ('type: "Upsample" upsample_param { scale: 2 upsample_h: 9 }', 137),
])
def test_written_caffemodels_use_the_forks_numbers(tmp_path, snippet, fork_number):
    from caffe_compat.weights import write_caffemodel

    lp = text_format.Parse(f'name: "l" {snippet}', caffe_pb2.LayerParameter())
    path = str(tmp_path / "w.caffemodel")
    write_caffemodel(path, "n", [(lp, [np.zeros(2, np.float32)])])
    raw = open(path, "rb").read()
    (num, _, a, b), = [x for x in wire.fields(raw, 0, len(raw)) if x[0] == 100]
    nums = [n for n, *_ in wire.fields(raw, a, b)]
    assert fork_number in nums and all(n < 400_000_000 for n in nums)
    _, back = read_caffemodel(path)
    assert text_format.MessageToString(back[0].param) == text_format.MessageToString(lp)


# ------------------------------------------------------------------ user schema and layers
USER_PROTO = textwrap.dedent("""\
    syntax = "proto2";
    package caffe;
    message LayerParameter {
      optional string name = 1;
      optional MyScaleParameter my_scale_param = 143;   // BVLC's input_param number
    }
    message MyScaleParameter {
      optional float factor = 1 [default = 2.0];
      enum Mode { PLAIN = 0; SQUARED = 1; }
      optional Mode mode = 3 [default = PLAIN];
    }
    message PoolingParameter {
      optional bool my_flag = 77 [default = true];  /* a field added to a BVLC message */
    }
""")

USER_NET = textwrap.dedent("""\
    input: "data" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 }
    layer { name: "s" type: "TestMyScale" bottom: "data" top: "s"
            my_scale_param { factor: 3 mode: SQUARED } }
    layer { name: "p" type: "Pooling" bottom: "s" top: "p"
            pooling_param { pool: MAX kernel_size: 2 stride: 2 my_flag: false } }
""")


class _MyScale(Layer):
    """A user's layer reading its own fork's param block."""

    exact_bottoms = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.my_scale_param
        self.factor, self.squared = float(p.factor), p.mode == 1

    def forward(self, x):
        return ((x * x if self.squared else x) * self.factor,)


@pytest.fixture
def user_layer():
    registry.register("TestMyScale")(_MyScale)
    yield _MyScale
    registry._TYPES.pop("TestMyScale", None)


def test_user_schema_parses_its_blocks_and_user_layer_runs(tmp_path, user_layer):
    proto = tmp_path / "fork.proto"
    proto.write_text(USER_PROTO)
    with pytest.raises(ParseError) as e:
        Net(USER_NET)
    assert "my_scale_param" in str(e.value) and "my_flag" in str(e.value)
    net = Net(USER_NET, schema=str(proto))
    assert any("143" in n for n in net.schema.notes)  # taken number noted
    x = torch.arange(32, dtype=torch.float32).reshape(1, 2, 4, 4)
    out = net.forward(data=x)["p"]
    ref = torch.nn.functional.max_pool2d(x * x * 3, 2)
    assert torch.equal(out, ref)
    assert net.layer("p").param.pooling_param.my_flag is False


def test_schema_on_every_cli_command(tmp_path, user_layer):
    from caffe_compat.cli.main import main

    proto = tmp_path / "fork.proto"
    proto.write_text(USER_PROTO)
    net = tmp_path / "net.prototxt"
    net.write_text(USER_NET)
    for name, cmd in main.commands.items():
        assert any(p.name == "schema" for p in cmd.params), f"{name} lacks --schema"
    r = CliRunner().invoke(main, ["inspect", str(net)])
    assert r.exit_code == 2 and "my_scale_param" in r.stderr
    r = CliRunner().invoke(main, ["inspect", str(net), "--schema", str(proto)])
    assert r.exit_code == 0, r.output
    assert "TestMyScale" in r.output
    r = CliRunner().invoke(main, ["inspect", str(net), "--schema", str(tmp_path / "none.proto")])
    assert r.exit_code == 2 and "cannot read schema" in r.stderr and "Traceback" not in r.output


def test_bad_user_schema_is_one_clear_error(tmp_path):
    proto = tmp_path / "bad.proto"
    proto.write_text('syntax = "proto2";\nmessage LayerParameter {\n  optional Nope x = 900;\n}\n')
    with pytest.raises(ParseError) as e:
        Net(USER_NET, schema=str(proto))
    assert "unknown type 'Nope'" in str(e.value) and "bad.proto" in str(e.value)
    proto.write_text('syntax = "proto2";\nmessage LayerParameter {\n  optional int32 = 5;\n}\n')
    with pytest.raises(ParseError) as e:
        Net(USER_NET, schema=str(proto))
    assert "bad.proto:3" in str(e.value)


def test_entry_point_layer_is_found_without_import(tmp_path, monkeypatch):
    pkg = tmp_path / "mylayers_ep"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""\
        from caffe_compat import Layer
        class Twice(Layer):
            def forward(self, x):
                return (2 * x,)
    """))
    dist = tmp_path / "mylayers_ep-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mylayers-ep\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[caffe_compat.layers]\nEpTwice = mylayers_ep:Twice\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        net = Net('input: "d" input_shape { dim: 2 }\nlayer { name: "t" type: "EpTwice" bottom: "d" top: "t" }')
        assert torch.equal(net.forward(d=torch.tensor([1.0, 2.0]))["t"], torch.tensor([2.0, 4.0]))
    finally:
        registry._TYPES.pop("EpTwice", None)
        sys.modules.pop("mylayers_ep", None)


# ------------------------------------------------------------------ everything unknown at once
def test_every_unknown_type_and_field_is_named_at_once():
    text = textwrap.dedent("""\
        input: "data" input_shape { dim: 1 dim: 3 dim: 8 dim: 8 }
        layer { name: "a" type: "Yolov3" bottom: "data" top: "a" yolov3_param { num_class: 3 } }
        layer { name: "b" type: "NoSuchThing" bottom: "a" top: "b" whatever_param { x: 1 } }
        layer { name: "c" type: "NoSuchThing" bottom: "b" top: "c" convolution_param { bogus: 2 } }
    """)
    with pytest.raises(ParseError) as e:
        Net(text)
    msg = str(e.value)
    for part in ("'Yolov3' (from yolo: eric612/MobileNet-YOLO", "'NoSuchThing' (no fork",
                 "LayerParameter.whatever_param at line 3", "ConvolutionParameter.bogus at line 4",
                 "layer 'b' (line 3), 'c' (line 4)", "--schema", "register_layer", "entry point"):
        assert part in msg, (part, msg)
    # parses, but two types lack implementations: both named, with their forks
    text2 = text.replace(' whatever_param { x: 1 }', '').replace('convolution_param { bogus: 2 }', '')
    with pytest.raises(UnknownLayerError) as e:
        Net(text2)
    assert "'Yolov3' (from yolo" in str(e.value) and "'NoSuchThing'" in str(e.value)


def test_single_unknown_type_keeps_near_match_hint():
    with pytest.raises(UnknownLayerError) as e:
        Net('input: "d" input_shape { dim: 2 }\nlayer { name: "r" type: "Relu" bottom: "d" top: "r" }')
    assert "Did you mean" in str(e.value) and "'ReLU'" in str(e.value)


def test_fork_table_facts_are_consistent():
    """Each fork table names a repo and commit, and each fork type it lists is known by name."""
    for f in forks.forks():
        assert f.repo and f.commit
        for m, field, typ, num, kind in f.rows:
            assert 0 <= num < 400_000_000 and kind in ("new", "renumbered")
            assert typ == "enum" or num > 0
    assert forks.fork_of_type("PriorBox").name == "ssd"
    assert [f.name for f in forks.forks_of_type("BN")][:2] == ["segnet", "enet"]
    assert os.path.exists(os.path.join(forks.FORKS_DIR, "FORKS.tsv"))


@pytest.mark.parametrize("type_,number,payload,check", [
    # (layer type, the fork's LayerParameter field number, the param message's bytes, check)
    ("Upsample", 147, varint_field(1, 3),  # ENet: upsample_param = 147 (BVLC's swish_param)
     lambda p: p.upsample_param.scale == 3 and not p.HasField("swish_param")),
    ("DenseImageData", 46, wire.len_field(1, b"list.txt") + varint_field(2, 4),  # ENet: 46
     lambda p: p.dense_image_data_param.source == "list.txt" and p.dense_image_data_param.batch_size == 4),
    ("PSROIPooling", 10001, float_field(1, 0.0625) + varint_field(2, 21) + varint_field(3, 7),  # R-FCN
     lambda p: p.psroi_pooling_param.output_dim == 21 and p.psroi_pooling_param.group_size == 7),
    ("ShuffleChannel", 164, varint_field(1, 3),  # ShuffleNet's README: 164
     lambda p: p.shuffle_channel_param.group == 3),
    ("Lstm", 140, varint_field(1, 64) + float_field(2, 0.5),  # CTPN: lstm_param = 140
     lambda p: p.lstm_param.num_output == 64 and abs(p.lstm_param.clipping_threshold - 0.5) < 1e-7),
    ("Reverse", 143, varint_field(1, 0),  # CTPN: reverse_param = 143 (BVLC's input_param)
     lambda p: p.HasField("reverse_param") and not p.HasField("input_param")),
    ("Transpose", 142, varint_field(1, 1) + varint_field(1, 0),  # CTPN: transpose_param = 142
     lambda p: list(p.transpose_param.dim) == [1, 0]),
    ("Region", 214, varint_field(1, 4) + varint_field(2, 80) + varint_field(3, 5),  # Intel's Caffe
     lambda p: (p.region_param.classes, p.region_param.num) == (80, 5)),
    ("ReLU6", 211, float_field(2, 0.0),  # eric612: relu6_param = 211 (a ReLUParameter)
     lambda p: p.HasField("relu6_param")),
    ("Normalize", 206, varint_field(1, 0) + varint_field(3, 1) + float_field(4, 1e-10),  # SSD
     lambda p: not p.norm_param.across_spatial and p.norm_param.channel_shared),
    ("DetectionOutput", 204, varint_field(1, 21) + varint_field(7, 200)  # SSD, nested nms_param
     + wire.len_field(4, float_field(1, 0.45) + varint_field(2, 400)),
     lambda p: p.detection_output_param.keep_top_k == 200
     and p.detection_output_param.nms_param.top_k == 400),
])
def test_each_forks_binary_numbers_are_read_by_layer_type(tmp_path, type_, number, payload, check):
    path = write_model(tmp_path / "fork.caffemodel", layer_bytes("l", type_, wire.len_field(number, payload)))
    _, layers = read_caffemodel(path)
    assert check(layers[0].param), layers[0].param
    assert layers[0].skipped_fields == []
