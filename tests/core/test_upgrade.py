"""caffe_compat.upgrade against real Caffe's upgrade_proto.cpp.

Goldens (tests/data/upgrade/golden, expected.json, corpus_digests.json) were made by
tests/data/upgrade/oracle/make_golden.py, which runs each hand-written fixture through
Caffe's own UpgradeNetAsNeeded / UpgradeSolverAsNeeded.  Here every fixture is upgraded
by our code and compared message-for-message (field presence included) with Caffe's
output, then the important fields are checked one by one so a failure says what broke.
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import json
import pathlib
import re
from typing import Dict, List

import numpy as np
import pytest
from google.protobuf import text_format
from hypothesis import given, settings
from hypothesis import strategies as st

from caffe_compat import io as cio
from caffe_compat import upgrade as up
from caffe_compat.errors import CaffeCompatError, SchemaError
from caffe_compat.protos import caffe_pb2
from conftest import ROOT

DATA = ROOT / "tests" / "data" / "upgrade"
GOLD = DATA / "golden"
EXPECTED = json.loads((DATA / "expected.json").read_text())
DIGESTS = json.loads((DATA / "corpus_digests.json").read_text())


# ----------------------------------------------------------------------------- helpers

def _sha(msg) -> str:
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()[:10]


def net_digest(net: caffe_pb2.NetParameter) -> Dict:
    """Per-layer hashes of a NetParameter (compare without storing the text)."""
    rest = caffe_pb2.NetParameter()
    rest.CopyFrom(net)
    rest.ClearField("layer")
    rest.ClearField("layers")
    return {"rest": _sha(rest), "layers": [_sha(l) for l in net.layer],
            "v1_layers": len(net.layers)}


def solver_digest(solver: caffe_pb2.SolverParameter) -> Dict:
    rest = caffe_pb2.SolverParameter()
    rest.CopyFrom(solver)
    for f in ("net_param", "train_net_param", "test_net_param"):
        rest.ClearField(f)
    return {"rest": _sha(rest), "type": rest.type if rest.HasField("type") else None}


FORK_PARAMS = ("roi_pooling_param", "smooth_l1_loss_param")
FORK_FIELDS = ("scale_train",)  # DropoutParameter.scale_train


def strip_fork_params(text: str) -> str:
    """Drop the Fast R-CNN fork's additions, unknown to the oracle's schema.

    The upgrade never reads them (they sit in current-format layer params), so comparing
    the rest of such nets with Caffe's upgrade is still a full test of the upgrade.
    """
    text = re.sub(r"\b(?:%s)\s*\{[^{}]*\}" % "|".join(FORK_PARAMS), "", text)
    return re.sub(r"\b(?:%s)\s*:\s*\S+" % "|".join(FORK_FIELDS), "", text)


def load_net(path: pathlib.Path) -> caffe_pb2.NetParameter:
    return cio.parse_text(path.read_text(), caffe_pb2.NetParameter(), str(path))


def load_solver(path: pathlib.Path) -> caffe_pb2.SolverParameter:
    return cio.parse_text(path.read_text(), caffe_pb2.SolverParameter(), str(path))


def assert_same(ours, golden, what: str) -> None:
    """Message equality (set fields incl. presence); on failure show both texts."""
    if ours != golden:
        a = text_format.MessageToString(ours).splitlines()
        b = text_format.MessageToString(golden).splitlines()
        diff = "\n".join(difflib.unified_diff(b, a, "caffe", "ours", lineterm="", n=2))
        pytest.fail(f"{what}: upgraded message differs from Caffe's:\n{diff[:4000]}")


def layer(net: caffe_pb2.NetParameter, name: str) -> caffe_pb2.LayerParameter:
    found = [l for l in net.layer if l.name == name]
    assert len(found) == 1, f"expected one layer '{name}', got {len(found)}"
    return found[0]


def upgraded(name: str):
    net = load_net(DATA / "nets" / f"{name}.prototxt")
    return up.upgrade_net_with_report(net, source=name)


NET_FIXTURES = sorted(p.stem for p in (DATA / "nets").glob("*.prototxt"))


# ----------------------------------------------------------------------------- goldens

def test_goldens_cover_all_fixtures():
    assert sorted(EXPECTED["nets"]) == NET_FIXTURES
    assert sorted(EXPECTED["errors"]) == sorted(p.stem for p in (DATA / "errors").glob("*"))
    assert sorted(EXPECTED["solvers"]) == sorted(p.stem for p in (DATA / "solvers").glob("*"))


@pytest.mark.parametrize("name", NET_FIXTURES)
def test_net_matches_caffe(name):
    src = load_net(DATA / "nets" / f"{name}.prototxt")
    before = copy.deepcopy(src)
    ours, report = up.upgrade_net_with_report(src, source=name)
    golden = load_net(GOLD / "nets" / f"{name}.prototxt")
    assert_same(ours, golden, name)
    exp = EXPECTED["nets"][name]
    assert report.applied == exp["applied"]
    assert report.success == exp["success"]
    assert up.needs_upgrade(src) == exp["applied"]
    assert src == before, "upgrade_net mutated its argument"
    assert ours is not src
    # Upgrading is idempotent and the result needs nothing more.
    assert up.needs_upgrade(ours) == []
    assert up.upgrade_net(ours) == ours


@pytest.mark.parametrize("name", NET_FIXTURES)
def test_io_read_net_text_upgrades(name):
    """The lead's reader applies the same upgrade to files."""
    path = DATA / "nets" / f"{name}.prototxt"
    assert cio.read_net_text(path) == load_net(GOLD / "nets" / f"{name}.prototxt")
    assert cio.read_net_text(path, upgrade=False) == load_net(path)


@pytest.mark.parametrize("name", sorted(EXPECTED["errors"]))
def test_refusals_match_caffe(name):
    exp = EXPECTED["errors"][name]
    path = DATA / "errors" / f"{name}.prototxt"
    net = load_net(path)
    # Caffe aborts (CHECK/LOG(FATAL)) or crashes on all of these, except input_dim_short,
    # where it reads a garbage 4th dimension past the end of input_dim.
    if name == "input_dim_short":
        assert exp["outcome"] == "ok"
    else:
        assert exp["outcome"] in ("abort", "crash"), exp
    with pytest.raises(SchemaError) as ei:
        up.upgrade_net(net, source=str(path))
    assert ei.value.where == str(path)
    assert isinstance(ei.value, CaffeCompatError)


ERROR_LAYERS = {  # which layer each refusal names, and a word of Caffe's reason
    "pad_to_relu": ("relu", "conv' or 'pool"),
    "pad_to_pad": ("pad2", "conv' or 'pool"),
    "pad_conv_two_bottoms": ("conv", "exactly 1 bottom, has 2"),
    "pad_two_bottoms": ("pad", "exactly 1 bottom, has 2"),
    "pad_two_tops": ("pad", "exactly 1 top, has 2"),
    "v0_unknown_blob": ("relu", "'nope'"),
    "v0_unknown_type": ("conv", "'Convolution'"),
    "layer_and_layers": ("relu", "both 'layer' and 'layers'"),
    "input_shape_short": (None, "input_shape"),
    "input_dim_short": (None, "input_dim"),
}


@pytest.mark.parametrize("name", sorted(ERROR_LAYERS))
def test_refusal_messages(name):
    lname, words = ERROR_LAYERS[name]
    with pytest.raises(SchemaError) as ei:
        up.upgrade_net(load_net(DATA / "errors" / f"{name}.prototxt"), source="f.prototxt")
    assert ei.value.layer == lname
    assert words in str(ei.value)
    assert str(ei.value).startswith("f.prototxt: ")


def test_refusal_list_is_complete():
    assert sorted(ERROR_LAYERS) == sorted(EXPECTED["errors"])


# ----------------------------------------------------------------------------- V0 -> V1 -> V2

def test_v0_padding_folded():
    net, rep = upgraded("v0_net")
    assert rep.applied == ["v0_to_v1", "v1_to_v2", "input"]
    names = [l.name for l in net.layer]
    assert not [n for n in names if n.startswith("pad")], names
    assert names[0] == "input" and net.layer[0].type == "Input"
    assert list(net.layer[0].input_param.shape[0].dim) == [2, 3, 11, 11]
    assert not net.input and not net.input_dim and net.force_backward
    conv1 = layer(net, "conv1")
    assert list(conv1.bottom) == ["data"]            # rewired around pad1
    assert list(conv1.convolution_param.pad) == [2]   # pad1's pad
    pool1 = layer(net, "pool1")
    assert list(pool1.bottom) == ["conv1"] and pool1.pooling_param.pad == 1
    conv1b = layer(net, "conv1b")                     # also reads pad2: folded, overrides 5
    assert list(conv1b.bottom) == ["conv1"] and list(conv1b.convolution_param.pad) == [1]
    conv2 = layer(net, "conv2")                       # pad3 had no pad: explicit 0
    assert list(conv2.bottom) == ["norm1"] and list(conv2.convolution_param.pad) == [0]
    conv3 = layer(net, "conv3")                       # its own V0 pad
    assert list(conv3.convolution_param.pad) == [1]


def test_v0_field_renames():
    net, _ = upgraded("v0_net")
    c = layer(net, "conv1")
    assert c.type == "Convolution"
    cp = c.convolution_param
    assert (cp.num_output, list(cp.kernel_size), list(cp.stride), cp.group, cp.bias_term) == \
        (4, [3], [2], 1, True)
    assert cp.weight_filler.type == "gaussian" and cp.weight_filler.std == pytest.approx(0.01)
    assert cp.bias_filler.value == pytest.approx(0.1)
    assert [(p.lr_mult, p.decay_mult) for p in c.param] == [(1, 1), (2, 0)]
    c2 = layer(net, "conv2").convolution_param
    assert c2.group == 2 and c2.bias_term is False and c2.HasField("bias_term")
    P = caffe_pb2.PoolingParameter
    assert layer(net, "pool1").pooling_param.pool == P.MAX
    assert layer(net, "pool2").pooling_param.pool == P.AVE
    assert layer(net, "pool3").pooling_param.pool == P.STOCHASTIC
    assert layer(net, "pool2").pooling_param.HasField("pad")
    lrn = layer(net, "norm1")
    assert lrn.type == "LRN"
    assert (lrn.lrn_param.local_size, lrn.lrn_param.beta, lrn.lrn_param.k) == (3, 0.75, 2)
    assert lrn.lrn_param.alpha == pytest.approx(1e-4)
    assert layer(net, "drop").dropout_param.dropout_ratio == pytest.approx(0.3)
    assert layer(net, "concat").concat_param.concat_dim == 1
    fc = layer(net, "fc")
    assert fc.type == "InnerProduct" and fc.inner_product_param.num_output == 5
    assert [(p.lr_mult, p.decay_mult) for p in fc.param] == [(1, 1), (2, 0)]
    types = {l.name: l.type for l in net.layer}
    assert types == {"input": "Input", "conv1": "Convolution", "relu1": "ReLU",
                     "pool1": "Pooling", "conv1b": "Convolution", "norm1": "LRN",
                     "conv2": "Convolution", "conv3": "Convolution", "pool2": "Pooling",
                     "pool3": "Pooling", "sig": "Sigmoid", "tanh": "TanH", "concat": "Concat",
                     "bnll": "BNLL", "im2col": "Im2col", "flat": "Flatten",
                     "fc": "InnerProduct", "drop": "Dropout", "split": "Split",
                     "prob": "Softmax"}


def test_v0_data_fields():
    net, rep = upgraded("v0_data")
    assert rep.success and rep.applied == ["v0_to_v1", "v1_to_v2"]
    d = layer(net, "data")
    assert d.type == "Data"
    assert (d.data_param.source, d.data_param.batch_size, d.data_param.rand_skip) == \
        ("train_lmdb", 8, 3)
    t = d.transform_param
    assert (t.scale, t.mean_file, t.crop_size, t.mirror) == \
        (pytest.approx(1 / 256), "mean.binaryproto", 7, True)
    assert not d.data_param.HasField("scale") and not d.data_param.HasField("mean_file")
    im = layer(net, "images")
    assert im.type == "ImageData"
    ip = im.image_data_param
    assert (ip.source, ip.batch_size, ip.shuffle, ip.new_height, ip.new_width, ip.rand_skip) \
        == ("list.txt", 4, True, 16, 12, 1)
    assert im.transform_param.HasField("mirror") and not im.transform_param.mirror
    w = layer(net, "windows")
    assert w.type == "WindowData"
    wp = w.window_data_param
    assert (wp.fg_threshold, wp.bg_threshold, wp.fg_fraction, wp.context_pad, wp.crop_mode) \
        == (pytest.approx(0.6), pytest.approx(0.4), pytest.approx(0.3), 16, "square")
    assert (w.transform_param.crop_size, w.transform_param.mean_file,
            w.transform_param.scale) == (9, "win_mean.binaryproto", 2)
    h = layer(net, "h5")
    assert h.type == "HDF5Data" and (h.hdf5_data_param.source, h.hdf5_data_param.batch_size) \
        == ("h5_list.txt", 3)
    assert layer(net, "h5out").hdf5_output_param.file_name == "out.h5"
    assert layer(net, "infogain").infogain_loss_param.source == "H.binaryproto"
    assert [layer(net, n).type for n in ("loss", "acc", "eucl", "mlog")] == \
        ["SoftmaxWithLoss", "Accuracy", "EuclideanLoss", "MultinomialLogisticLoss"]


def _unknown_pairs(messages: List[str]) -> List[tuple]:
    out = []
    for m in messages:
        hit = re.search(r"Unknown parameter (\w+) for layer type (\w+)", m) or \
            re.search(r"V0 parameter (\w+) is not valid for layer type '(\w+)'", m)
        if hit:
            out.append(hit.groups())
    return out


def test_v0_misplaced_params_dropped_like_caffe():
    """Caffe logs 'Unknown parameter X for layer type T' for each and continues."""
    net, rep = upgraded("v0_bad_params")
    exp = EXPECTED["nets"]["v0_bad_params"]
    assert not exp["success"] and not rep.success
    assert _unknown_pairs(rep.problems) == _unknown_pairs(exp["errors_logged"])
    assert len(rep.problems) == 28
    relu = layer(net, "relu")
    assert relu.type == "ReLU" and not relu.HasField("convolution_param")
    assert list(layer(net, "conv").convolution_param.kernel_size) == [1]
    with pytest.raises(SchemaError, match="num_output"):
        up.upgrade_net(load_net(DATA / "nets" / "v0_bad_params.prototxt"), strict=True)
    # default: no error, nothing logged
    up.upgrade_net(load_net(DATA / "nets" / "v0_bad_params.prototxt"))


def test_v0_mixed_drops_non_v0_parts():
    net, rep = upgraded("v0_mixed")
    assert rep.success  # Caffe says nothing about these losses...
    assert [l.name for l in net.layer] == ["relu", ""]
    assert net.layer[1].type == "" and list(net.layer[1].bottom) == ["r"]
    assert not net.HasField("state") and not net.HasField("debug_info")
    assert not net.input  # input_shape dropped by the V0 step, so the bare input is removed
    joined = " ".join(rep.notes)  # ...but we note them
    for word in ("'layer {}' entries were dropped", "input_shape", "state", "debug_info",
                 "bottom/top of 1"):
        assert word in joined
    with pytest.raises(SchemaError):
        up.upgrade_net(load_net(DATA / "nets" / "v0_mixed.prototxt"), strict=True)


# ----------------------------------------------------------------------------- V1 -> V2

def test_v1_param_specs():
    net, rep = upgraded("v1_net")
    assert rep.applied == ["data_transform", "v1_to_v2"]
    assert not net.layers
    c = layer(net, "conv1")
    S = caffe_pb2.ParamSpec
    assert [(p.name, p.share_mode, p.lr_mult, p.decay_mult) for p in c.param] == \
        [("conv1_w", S.STRICT, 1, 1), ("conv1_b", S.PERMISSIVE, 2, 0)]
    shared = layer(net, "conv1_shared")
    assert [p.name for p in shared.param] == ["conv1_w", "conv1_b"]
    assert not any(p.HasField("lr_mult") or p.HasField("share_mode") for p in shared.param)
    ip = layer(net, "ip1")  # one blobs_lr, two weight_decay -> two specs
    assert [(p.HasField("lr_mult"), p.lr_mult, p.decay_mult) for p in ip.param] == \
        [(True, 1, 1), (False, 1, 0)]
    assert layer(net, "pool1").param == []


def test_v1_other_fields():
    net, _ = upgraded("v1_net")
    train, test = [l for l in net.layer if l.name == "mnist"]
    assert train.include[0].phase == caffe_pb2.TRAIN
    assert test.include[0].phase == caffe_pb2.TEST and list(test.include[0].stage) == ["val"]
    assert layer(net, "relu1").exclude[0].phase == caffe_pb2.TEST
    assert layer(net, "relu1").relu_param.negative_slope == pytest.approx(0.1)
    loss = layer(net, "loss")
    assert loss.type == "SoftmaxWithLoss" and list(loss.loss_weight) == [2]
    assert loss.loss_param.ignore_label == 3 and loss.loss_param.normalize is False
    assert layer(net, "accuracy").accuracy_param.top_k == 2
    assert layer(net, "drop1").dropout_param.dropout_ratio == 0.25


def test_v1_data_transform_moved():
    net, _ = upgraded("v1_net")
    train, test = [l for l in net.layer if l.name == "mnist"]
    t = train.transform_param
    # data_param's values override what transform_param held; other fields stay
    assert (t.scale, t.mean_file, t.crop_size, t.mirror, t.force_color) == \
        (pytest.approx(1 / 256), "mean.binaryproto", 5, True, True)
    dp = train.data_param
    assert not any(dp.HasField(f) for f in ("scale", "mean_file", "crop_size", "mirror"))
    assert (dp.source, dp.batch_size, dp.backend) == ("train_lmdb", 4, caffe_pb2.DataParameter.LMDB)
    # every Data layer of the net gets a transform_param, even an empty one (as in Caffe)
    assert test.HasField("transform_param") and test.transform_param.ListFields() == []

    net, _ = upgraded("v1_window_transform")
    im = layer(net, "images")
    assert (im.transform_param.scale, im.transform_param.mean_file,
            im.transform_param.crop_size, im.transform_param.mirror,
            list(im.transform_param.mean_value)) == (0.5, "m.binaryproto", 4, True, [104])
    assert layer(net, "windows").transform_param.HasField("mirror")
    other = layer(net, "other_data")
    assert other.HasField("transform_param") and other.transform_param.ListFields() == []
    assert not layer(net, "hdf5").HasField("transform_param")


def test_v1_every_type():
    net, _ = upgraded("v1_all_types")
    by_name = {l.name: l for l in net.layer}
    src = load_net(DATA / "nets" / "v1_all_types.prototxt")
    for v1 in src.layers:
        new = by_name[v1.name]
        if v1.HasField("type"):
            assert new.type == up.V1_TYPE_NAMES[v1.type]
        else:
            assert not new.HasField("type")
        for f, value in v1.ListFields():
            if f.name.endswith("_param"):
                assert getattr(new, f.name) == value, (v1.name, f.name)
    assert by_name["none"].type == "" and by_name["none"].HasField("type")
    assert by_name["sigmoidxent"].loss_weight == [0.5]
    # the map covers the whole enum of this schema
    assert set(up.V1_TYPE_NAMES) == set(caffe_pb2.V1LayerParameter.LayerType.values())
    assert len(set(up.V1_TYPE_NAMES.values())) == len(up.V1_TYPE_NAMES)


def test_unknown_v1_enum_in_binary_is_refused():
    """A caffemodel with a V1 type number this schema lacks: protobuf keeps it as an unknown
    field (Caffe would then build a layer of type ""), we refuse it by number."""
    good = caffe_pb2.NetParameter()
    l = good.layers.add(name="x", type=caffe_pb2.V1LayerParameter.RELU)
    raw = good.SerializeToString()
    # field 5 (type) varint 18 (RELU) -> 99
    bad_bytes = raw.replace(bytes([0x28, 18]), bytes([0x28, 99]))
    assert bad_bytes != raw
    bad = cio.parse_binary(bad_bytes, caffe_pb2.NetParameter())
    assert not bad.layers[0].HasField("type")
    with pytest.raises(SchemaError, match="99") as ei:
        up.upgrade_net(bad, source="w.caffemodel")
    assert ei.value.layer == "x" and ei.value.where == "w.caffemodel"
    # blob_share_mode 7 (field 1002, varint)
    l.blob_share_mode.append(caffe_pb2.V1LayerParameter.PERMISSIVE)
    raw = good.SerializeToString()
    tag = bytes([0xD0, 0x3E])  # (1002 << 3) | 0
    assert tag + bytes([1]) in raw
    bad = cio.parse_binary(raw.replace(tag + bytes([1]), tag + bytes([7])),
                           caffe_pb2.NetParameter())
    with pytest.raises(SchemaError, match="blob_share_mode"):
        up.upgrade_net(bad)


# ----------------------------------------------------------------------------- input / BN

def test_input_dim_to_input_layer():
    net, rep = upgraded("v1_deploy")
    assert rep.applied == ["v1_to_v2", "input"]
    first = net.layer[0]
    assert (first.name, first.type, list(first.top)) == ("input", "Input", ["data", "im_info"])
    assert [list(s.dim) for s in first.input_param.shape] == [[2, 3, 6, 6], [1, 3, 1, 1]]
    assert [l.name for l in net.layer] == ["input", "conv", "prob", "silence"]
    assert not net.input and not net.input_dim and not net.input_shape


def test_input_shape_variants():
    net, _ = upgraded("input_shape")
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 3, 5, 5], [4, 5]]
    assert [l.name for l in net.layer] == ["input", "relu", "flat"]
    net, rep = upgraded("input_dim_extra")
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[1, 2, 3, 4]]
    assert rep.success and "beyond 4 per input" in " ".join(rep.notes)
    net, rep = upgraded("input_shape_and_dim")
    assert [list(s.dim) for s in net.layer[0].input_param.shape] == [[7, 8]]
    assert "input_dim is ignored" in " ".join(rep.notes)
    net, rep = upgraded("input_bare")
    assert [l.name for l in net.layer] == ["relu"] and not net.input
    assert rep.applied == ["input"] and rep.notes == []


def test_batchnorm_params():
    net, rep = upgraded("batchnorm")
    assert rep.applied == ["batch_norm"]
    assert len(layer(net, "bn3").param) == 0
    assert layer(net, "bn3").batch_norm_param.eps == pytest.approx(1e-3)
    assert len(layer(net, "bn2").param) == 2
    assert len(layer(net, "scale3").param) == 3


def test_current_net_untouched():
    src = load_net(DATA / "nets" / "current.prototxt")
    assert up.needs_upgrade(src) == []
    assert up.upgrade_net(src) == src


def test_v1_chain_keeps_net_fields():
    net, _ = upgraded("v1_input_chain")
    assert net.force_backward and net.debug_info
    assert (net.state.phase, net.state.level, list(net.state.stage)) == (caffe_pb2.TRAIN, 2, ["a"])
    assert [l.name for l in net.layer] == ["input", "t", "p"]


# ----------------------------------------------------------------------------- binary

@pytest.mark.parametrize("name", sorted(EXPECTED["binaries"]))
def test_caffemodel_matches_caffe(name):
    data = (DATA / "binaries" / f"{name}.pb").read_bytes()
    src = cio.parse_binary(data, caffe_pb2.NetParameter())
    ours, rep = up.upgrade_net_with_report(src, source=name)
    golden = cio.parse_binary((GOLD / "binaries" / f"{name}.pb").read_bytes(),
                              caffe_pb2.NetParameter())
    assert_same(ours, golden, name)
    assert rep.applied == EXPECTED["binaries"][name]["applied"]
    # blobs are carried unchanged, in order, to the layer of the same name
    old = {}
    for conn in src.layers:
        v = conn.layer if conn.HasField("layer") else conn
        old[v.name] = list(v.blobs)
    n = 0
    for l in ours.layer:
        assert list(l.blobs) == old.get(l.name, [])
        n += len(l.blobs)
    assert n == sum(len(b) for b in old.values()) > 0


def test_v1_caffemodel_blobs_roundtrip():
    """A V1 caffemodel written here with protobuf: weights survive parse + upgrade."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 2, 2, 2)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    w2 = rng.standard_normal((4, 12)).astype(np.float64)
    net = caffe_pb2.NetParameter(name="weights")
    net.input.append("data")  # legacy caffemodels: input without dims -> just dropped
    conv = net.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION,
                          bottom=["data"], top=["conv"], blobs_lr=[1, 2], weight_decay=[1, 0])
    conv.convolution_param.num_output = 3
    cio.array_to_blob(w, conv.blobs.add(), legacy_dims=True)
    cio.array_to_blob(b, conv.blobs.add())
    ip = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT,
                        bottom=["conv"], top=["ip"])
    blob = ip.blobs.add()
    blob.shape.dim.extend([4, 12])
    blob.double_data.extend(w2.ravel().tolist())
    net.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU, bottom=["ip"], top=["ip"])
    data = net.SerializeToString()

    parsed = cio.parse_binary(data, caffe_pb2.NetParameter(), "m.caffemodel")
    new = up.upgrade_net(parsed, source="m.caffemodel")
    assert up.needs_upgrade(parsed) == ["v1_to_v2", "input"]
    assert [l.name for l in new.layer] == ["conv", "ip", "relu"]  # no Input layer: no dims
    assert not new.input
    c = layer(new, "conv")
    assert c.type == "Convolution"
    assert [(p.lr_mult, p.decay_mult) for p in c.param] == [(1, 1), (2, 0)]
    assert cio.blob_shape(c.blobs[0]) == (3, 2, 2, 2)
    np.testing.assert_array_equal(cio.blob_to_array(c.blobs[0]), w)
    np.testing.assert_array_equal(cio.blob_to_array(c.blobs[1]), b)
    i = layer(new, "ip")
    np.testing.assert_array_equal(cio.blob_to_array(i.blobs[0], dtype=np.float64), w2)
    assert len(layer(new, "relu").blobs) == 0
    # and the upgraded model serializes / reparses to the same thing
    again = cio.parse_binary(new.SerializeToString(), caffe_pb2.NetParameter())
    assert again == new


def test_v0_caffemodel_blobs_follow_padding_fold():
    data = (DATA / "binaries" / "v0_net_weights.pb").read_bytes()
    src = cio.parse_binary(data, caffe_pb2.NetParameter())
    new = up.upgrade_net(src)
    conv1 = layer(new, "conv1")
    assert list(conv1.bottom) == ["data"] and list(conv1.convolution_param.pad) == [2]
    assert [cio.blob_shape(b) for b in conv1.blobs] == [(4, 3, 3, 3), (1, 1, 1, 4)]
    v0conv1 = [c for c in src.layers if c.layer.name == "conv1"][0].layer
    np.testing.assert_array_equal(cio.blob_to_array(conv1.blobs[0]),
                                  cio.blob_to_array(v0conv1.blobs[0]))


# ----------------------------------------------------------------------------- solvers

@pytest.mark.parametrize("name", sorted(EXPECTED["solvers"]))
def test_solver_matches_caffe(name):
    src = load_solver(DATA / "solvers" / f"{name}.prototxt")
    before = copy.deepcopy(src)
    ours = up.upgrade_solver(src, source=name)
    assert_same(ours, load_solver(GOLD / "solvers" / f"{name}.prototxt"), name)
    assert src == before
    assert not ours.HasField("solver_type")
    assert up.solver_needs_upgrade(src) == name.startswith("enum_")
    assert cio.read_solver_text(DATA / "solvers" / f"{name}.prototxt") == ours


def test_solver_type_names():
    S = caffe_pb2.SolverParameter
    want = {S.SGD: "SGD", S.NESTEROV: "Nesterov", S.ADAGRAD: "AdaGrad",
            S.RMSPROP: "RMSProp", S.ADADELTA: "AdaDelta", S.ADAM: "Adam"}
    assert up.SOLVER_TYPE_NAMES == want
    assert set(want) == set(S.SolverType.values())
    for enum, name in want.items():
        assert up.upgrade_solver(S(solver_type=enum)).type == name


@pytest.mark.parametrize("name", sorted(EXPECTED["solver_errors"]))
def test_solver_both_fields_refused(name):
    exp = EXPECTED["solver_errors"][name]
    assert exp["outcome"] == "abort" and "cannot be both specified" in exp["message"]
    with pytest.raises(SchemaError, match="cannot both be given") as ei:
        up.upgrade_solver(load_solver(DATA / "solver_errors" / f"{name}.prototxt"),
                          source="s.prototxt")
    assert ei.value.where == "s.prototxt"


# ----------------------------------------------------------------------------- corpus

def _corpus(corpus: pathlib.Path, rel: str) -> pathlib.Path:
    path = corpus / rel
    if not path.is_file():
        pytest.skip(f"{rel} not in the shared corpus at {corpus}")
    entry = DIGESTS[rel]
    if hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
        pytest.skip(f"{rel} changed since the goldens were made; rerun "
                    f"tests/data/upgrade/oracle/make_golden.py")
    return path


def _compare_digest(net: caffe_pb2.NetParameter, caffe: Dict, what: str) -> None:
    """Our upgraded net vs the hashes of Caffe's; a failure names the first differing layer."""
    ours = net_digest(net)
    assert ours["v1_layers"] == caffe["v1_layers"], what
    for i, (a, b) in enumerate(zip(ours["layers"], caffe["layers"])):
        assert a == b, (f"{what}: layer {i} (ours: '{net.layer[i].name}', "
                        f"type '{net.layer[i].type}') differs from Caffe's upgrade")
    assert len(ours["layers"]) == len(caffe["layers"]), \
        f"{what}: {len(ours['layers'])} layers, Caffe's upgrade has {len(caffe['layers'])}"
    assert ours["rest"] == caffe["rest"], f"{what}: net-level fields differ from Caffe's"


CORPUS_NETS = sorted(k for k, v in DIGESTS.items() if v["kind"] == "net")
CORPUS_SOLVERS = sorted(k for k, v in DIGESTS.items() if v["kind"] == "solver")


def test_corpus_digests_present():
    assert len(CORPUS_NETS) > 30 and CORPUS_SOLVERS


@pytest.mark.parametrize("rel", CORPUS_NETS)
def test_corpus_net_matches_caffe(corpus, rel):
    path = _corpus(corpus, rel)
    entry = DIGESTS[rel]
    if entry["oracle"]["outcome"] != "ok":
        pytest.skip(f"the oracle could not read {rel}: {entry['oracle']['outcome']}")
    if entry.get("stripped"):
        net = cio.parse_text(strip_fork_params(path.read_text()), caffe_pb2.NetParameter(), rel)
    else:
        net = load_net(path)
    ours, rep = up.upgrade_net_with_report(net, source=rel)
    assert rep.applied == entry["oracle"]["applied"]
    assert rep.success == entry["oracle"]["success"]
    _compare_digest(ours, entry["digest"], rel)


@pytest.mark.parametrize("rel", CORPUS_SOLVERS)
def test_corpus_solver_matches_caffe(corpus, rel):
    path = _corpus(corpus, rel)
    entry = DIGESTS[rel]
    solver = load_solver(path)
    assert entry["oracle"]["outcome"] == "ok"
    assert solver_digest(up.upgrade_solver(solver, source=rel)) == entry["digest"]
    if "net_param_digest" in entry:  # an inline V1 net (lenet_consolidated_solver)
        ours, rep = up.upgrade_net_with_report(solver.net_param, source=rel)
        assert rep.applied == entry["net_param_oracle"]["applied"]
        _compare_digest(ours, entry["net_param_digest"], rel + ":net_param")


# ----------------------------------------------------------------------------- properties

_floats = st.floats(min_value=-4, max_value=4, width=32)


@settings(max_examples=60, deadline=None)
@given(lrs=st.lists(_floats, max_size=4), decays=st.lists(_floats, max_size=4),
       names=st.lists(st.text("abc", min_size=1, max_size=3), max_size=4),
       modes=st.lists(st.sampled_from([0, 1]), max_size=4),
       ltype=st.sampled_from(sorted(caffe_pb2.V1LayerParameter.LayerType.values())),
       nblobs=st.integers(0, 3))
def test_v1_param_spec_property(lrs, decays, names, modes, ltype, nblobs):
    """ParamSpec i holds the i-th entry of each list; as many specs as the longest list."""
    net = caffe_pb2.NetParameter()
    v1 = net.layers.add(name="l", type=ltype, blobs_lr=lrs, weight_decay=decays, param=names,
                        blob_share_mode=modes)
    for k in range(nblobs):
        v1.blobs.add().data.extend([float(k)] * (k + 1))
    new = up.upgrade_net(net).layer[0]
    assert len(new.param) == max(len(lrs), len(decays), len(names), len(modes))
    for i, p in enumerate(new.param):
        assert p.HasField("lr_mult") == (i < len(lrs))
        assert p.HasField("decay_mult") == (i < len(decays))
        assert p.HasField("name") == (i < len(names))
        assert p.HasField("share_mode") == (i < len(modes))
        if i < len(lrs):
            assert p.lr_mult == lrs[i]
        if i < len(decays):
            assert p.decay_mult == decays[i]
        if i < len(names):
            assert p.name == names[i]
        if i < len(modes):
            assert p.share_mode == modes[i]
    assert list(new.blobs) == list(v1.blobs)
    assert new.type == up.V1_TYPE_NAMES[ltype]


def test_upgrade_logs_and_warns_nothing(caplog, recwarn, capsys):
    for name in NET_FIXTURES:
        up.upgrade_net_with_report(load_net(DATA / "nets" / f"{name}.prototxt"))
    assert caplog.records == [] and len(recwarn) == 0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
