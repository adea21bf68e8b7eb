"""Weights I/O: caffemodel <-> net <-> .pt / .safetensors, exactly and safely.

Round trips are bit-identical (blob bytes always; whole files when we wrote the original),
legacy V1 files with 4-D dims and double_data blobs load, mismatches name layer, blob index
and both shapes, missing layers are an error unless allowed, shared params are stored once,
NaN/Inf weights are refused with an opt-out, and ``.pt`` files never run code.
"""
from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat import weights as W
from caffe_compat.weights import caffemodel
from caffe_compat.cli.main import main
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, SchemaError, WeightsError
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2

BN_FACTOR = 999.982

TINY = """name: "tiny"
input: "data" input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3
    weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" }
layer { name: "sc1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true
    filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
  inner_product_param { num_output: 5 weight_filler { type: "xavier" }
    bias_filler { type: "gaussian" std: 0.5 } } }
"""

SHARED = """name: "shared"
input: "data" input_shape { dim: 2 dim: 4 }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "a" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 }
    bias_filler { type: "gaussian" std: 1 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "a" top: "out" param { name: "w" } param { name: "b" }
  inner_product_param { num_output: 4 } }
"""


def tiny_net(seed: int = 0, text: str = TINY) -> Net:
    net = Net(text, seed=seed)
    bn = net.layer("bn1")
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # BatchNorm statistics as Caffe stores them: sums and their factor
        bn.running_mean.copy_(torch.randn(4, generator=g) * BN_FACTOR)
        bn.running_var.copy_(torch.rand(4, generator=g) * BN_FACTOR + 1)
        bn.scale_factor.fill_(BN_FACTOR)
    return net


def blob_bytes(path) -> dict:
    """{(layer, i): raw little-endian bytes} of every blob in a caffemodel."""
    _, layers = W.read_caffemodel(str(path))
    return {(lw.name, i): np.ascontiguousarray(b.data).tobytes()
            for lw in layers for i, b in enumerate(lw.blobs)}


def net_values(net: Net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def run_cli(*args, env=None):
    res = CliRunner().invoke(main, list(map(str, args)), env=env)
    return res


# ---------------------------------------------------------------------- round trips
def test_caffemodel_safetensors_caffemodel_whole_file_identical(tmp_path):
    net = tiny_net()
    src = tmp_path / "orig.caffemodel"
    net.save_weights(str(src))
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    st = tmp_path / "w.safetensors"
    back = tmp_path / "back.caffemodel"
    r = run_cli("convert", src, "-o", st)
    assert r.exit_code == 0, r.output
    r = run_cli("convert", st, "-o", back, "--model", proto)
    assert r.exit_code == 0, r.output
    assert back.read_bytes() == src.read_bytes()
    # the BatchNorm factor 999.982 and its sums came through bit-exact
    sd = W.read_state_file(str(st))
    assert sd["bn1.scale_factor"].item() == np.float32(BN_FACTOR)
    assert torch.equal(sd["bn1.running_mean"], net.layer("bn1").running_mean)


def test_caffemodel_pt_caffemodel_whole_file_identical(tmp_path):
    net = tiny_net(1)
    src = tmp_path / "orig.caffemodel"
    net.save_weights(str(src))
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    pt = tmp_path / "w.pt"
    back = tmp_path / "back.caffemodel"
    assert run_cli("convert", src, "-o", pt, "--model", proto).exit_code == 0
    # what we write is a plain state dict: weights_only loading suffices
    sd = torch.load(str(pt), weights_only=True)
    assert_same_state(sd, net_values(net))
    assert run_cli("convert", pt, "-o", back, "--model", proto).exit_code == 0
    assert back.read_bytes() == src.read_bytes()


def _caffe_style_file(path, net: Net, *, double: bool = False) -> dict:
    """A caffemodel serialized by protobuf itself (as Caffe's WriteProtoToBinaryFile does),
    with full layer params and blobs in the ``shape`` form; returns the arrays."""
    np_ = caffe_pb2.NetParameter(name="tiny")
    arrays = {}
    rng = np.random.RandomState(3)
    for e in net.entries:
        lp = np_.layer.add()
        lp.CopyFrom(e.module.param)
        lp.phase = caffe_pb2.TEST
        for i, t in enumerate(e.module.caffe_blobs()):
            a = (rng.randn(*t.shape) * 3).astype(np.float64 if double else np.float32)
            if e.type == "BatchNorm" and i == 2:
                a[...] = BN_FACTOR
            b = lp.blobs.add()
            b.shape.dim.extend(t.shape)
            (b.double_data if double else b.data).extend(a.ravel().tolist())
            arrays[(e.name, i)] = a
    path.write_bytes(np_.SerializeToString())
    return arrays


def test_protobuf_written_caffemodel_round_trips_blob_bytes(tmp_path):
    net = tiny_net()
    src = tmp_path / "caffe.caffemodel"
    arrays = _caffe_style_file(src, net)
    for (name, i), raw in blob_bytes(src).items():
        assert raw == arrays[(name, i)].astype("<f4").tobytes()
    st, back = tmp_path / "w.safetensors", tmp_path / "back.caffemodel"
    W.save_safetensors(W.caffemodel_state_dict(str(src)), str(st))
    net2 = Net(TINY)
    net2.load_weights(str(st))
    net2.save_weights(str(back))
    assert blob_bytes(back) == blob_bytes(src)
    # and protobuf reads our file back to the same NetParameter layers (names, params, blobs)
    ours = caffe_pb2.NetParameter.FromString(back.read_bytes())
    theirs = caffe_pb2.NetParameter.FromString(src.read_bytes())
    assert [l.name for l in ours.layer] == [l.name for l in theirs.layer]
    for a, b in zip(ours.layer, theirs.layer):
        assert [list(x.data) for x in a.blobs] == [list(x.data) for x in b.blobs]


def test_double_data_blobs_load(tmp_path):
    net = tiny_net()
    src = tmp_path / "double.caffemodel"
    arrays = _caffe_style_file(src, net, double=True)
    _, layers = W.read_caffemodel(str(src))
    assert all(b.data.dtype == np.float64 for lw in layers for b in lw.blobs)
    fresh = Net(TINY)
    fresh.load_weights(str(src))
    for (name, i), a in arrays.items():
        got = fresh.layer(name).caffe_blobs()[i].detach().numpy()
        np.testing.assert_array_equal(got, a.astype(np.float32))


def _v1_file(path, conv_w, conv_b, ip_w, ip_b) -> None:
    """A V1 (``layers``) caffemodel with legacy num/channels/height/width dims."""
    msg = caffe_pb2.NetParameter(name="v1")
    for name, typ, arrays, dims in (
            ("conv1", caffe_pb2.V1LayerParameter.CONVOLUTION, (conv_w, conv_b),
             (conv_w.shape, (1, 1, 1, conv_b.size))),
            ("ip", caffe_pb2.V1LayerParameter.INNER_PRODUCT, (ip_w, ip_b),
             ((1, 1) + ip_w.shape, (1, 1, 1, ip_b.size)))):
        lp = msg.layers.add(name=name, type=typ)
        for a, d in zip(arrays, dims):
            b = lp.blobs.add()
            b.num, b.channels, b.height, b.width = d
            b.data.extend(a.ravel().tolist())
    path.write_bytes(msg.SerializeToString())


V1_NET = """name: "v1"
input: "data" input_dim: 1 input_dim: 3 input_dim: 5 input_dim: 5
layers { name: "conv1" type: CONVOLUTION bottom: "data" top: "conv1"
  convolution_param { num_output: 2 kernel_size: 3 } }
layers { name: "ip" type: INNER_PRODUCT bottom: "conv1" top: "ip" inner_product_param { num_output: 3 } }
"""


def test_v1_caffemodel_with_legacy_dims(tmp_path):
    rng = np.random.RandomState(0)
    cw, cb = rng.randn(2, 3, 3, 3).astype(np.float32), rng.randn(2).astype(np.float32)
    iw, ib = rng.randn(3, 18).astype(np.float32), rng.randn(3).astype(np.float32)
    path = tmp_path / "v1.caffemodel"
    _v1_file(path, cw, cb, iw, ib)
    _, layers = W.read_caffemodel(str(path))
    assert [(l.name, l.type) for l in layers] == [("conv1", "CONVOLUTION"), ("ip", "INNER_PRODUCT")]
    assert layers[1].blobs[0].legacy and layers[1].blobs[0].shape == (1, 1, 3, 18)
    for text in (V1_NET, V1_NET.replace("layers {", "layer {").replace("CONVOLUTION", '"Convolution"')
                 .replace("INNER_PRODUCT", '"InnerProduct"')):
        net = Net(text)
        net.load_weights(str(path))
        np.testing.assert_array_equal(net.layer("conv1").weight.detach().numpy(), cw)
        np.testing.assert_array_equal(net.layer("conv1").bias.detach().numpy(), cb)
        np.testing.assert_array_equal(net.layer("ip").weight.detach().numpy(), iw)
        np.testing.assert_array_equal(net.layer("ip").bias.detach().numpy(), ib)
    sd = W.caffemodel_state_dict(str(path))  # without a net: the layer types fix the shapes
    assert tuple(sd["ip.weight"].shape) == (3, 18) and tuple(sd["ip.bias"].shape) == (3,)
    assert tuple(sd["conv1.weight"].shape) == (2, 3, 3, 3) and tuple(sd["conv1.bias"].shape) == (2,)
    # the legacy view also has to match: a 4-D (1, 1, 3, 18) blob does not fit a (3, 17) net blob
    bad = Net(V1_NET.replace("kernel_size: 3", "kernel_size: 3 pad: 0 stride: 1").replace(
        "num_output: 3", "num_output: 4"))
    with pytest.raises(WeightsError, match=r"layer 'ip': blob 0: shape mismatch"):
        bad.load_weights(str(path))


# ---------------------------------------------------------------------- .pt / safetensors
def test_pt_loads_strictly_into_net(tmp_path):
    net = tiny_net(2)
    pt = tmp_path / "w.pt"
    net.save_weights(str(pt))
    assert isinstance(torch.load(str(pt), weights_only=True), dict)
    fresh = Net(TINY)
    fresh.load_weights(str(pt))
    assert_same_state(net_values(fresh), net_values(net))
    # plain torch works too: the keys are exactly the net's state dict
    other = Net(TINY, seed=42)
    other.load_state_dict(torch.load(str(pt), weights_only=True), strict=True)
    assert_same_state(net_values(other), net_values(net))
    # strict: an extra key is refused
    sd = torch.load(str(pt), weights_only=True)
    sd["ghost.weight"] = torch.zeros(1)
    torch.save(sd, str(tmp_path / "extra.pt"))
    with pytest.raises(WeightsError, match="keys the net lacks: ghost.weight"):
        Net(TINY).load_weights(str(tmp_path / "extra.pt"))
    # a missing key too, unless allowed
    sd = torch.load(str(pt), weights_only=True)
    del sd["ip.bias"]
    torch.save(sd, str(tmp_path / "less.pt"))
    with pytest.raises(WeightsError, match=r"lacks keys: ip.bias .*allow_missing"):
        Net(TINY).load_weights(str(tmp_path / "less.pt"))
    notes = Net(TINY).load_weights(str(tmp_path / "less.pt"), allow_missing=True)
    assert any("ip.bias" in n for n in notes)


def test_everything_we_write_loads_with_weights_only(tmp_path):
    net = tiny_net(3)
    net.save_weights(str(tmp_path / "a.pt"))
    src = tmp_path / "a.caffemodel"
    net.save_weights(str(src))
    assert run_cli("convert", src, "-o", tmp_path / "b.pt").exit_code == 0
    assert run_cli("convert", src, "-o", tmp_path / "c.pt", "--fold-batchnorm").exit_code == 0
    for name in ("a.pt", "b.pt", "c.pt"):
        obj = torch.load(str(tmp_path / name), weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in obj.values())


class _Evil:
    """A pickle payload that would create a marker file when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pt_is_refused_and_never_executed(tmp_path, how):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    payload = {"conv1.weight": torch.zeros(4, 3, 3, 3), "x": _Evil(str(marker))}
    if how == "torch.save":
        torch.save(payload, str(path))
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(ParseError, match=r"weights-only .pt file \(refusing to unpickle"):
        W.read_state_file(str(path))
    with pytest.raises(ParseError):
        Net(TINY).load_weights(str(path))
    r = run_cli("convert", path, "-o", tmp_path / "out.safetensors")
    assert r.exit_code == 2 and "refusing to unpickle" in r.output
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()


def test_shape_mismatch_names_layer_blob_index_and_shapes(tmp_path):
    src = tmp_path / "w.caffemodel"
    tiny_net().save_weights(str(src))
    other = Net(TINY.replace("num_output: 5", "num_output: 6"))
    with pytest.raises(WeightsError) as ei:
        other.load_weights(str(src))
    e = ei.value
    assert (e.layer, e.blob, e.where) == ("ip", 0, str(src))
    assert re.search(r"layer 'ip': blob 0: shape mismatch for 'weight': the net expects \(6, 64\), "
                     r"the file has \(5, 64\)", str(e))
    st = tmp_path / "w.safetensors"
    tiny_net().save_weights(str(st))
    with pytest.raises(WeightsError, match=r"layer 'ip': blob 0: shape mismatch for 'ip.weight': the net "
                                           r"expects \(6, 64\), the file has \(5, 64\)"):
        other.load_weights(str(st))


def test_wrong_blob_count_is_an_error(tmp_path):
    src = tmp_path / "w.caffemodel"
    tiny_net().save_weights(str(src))
    nobias = Net(TINY.replace("inner_product_param { num_output: 5",
                              "inner_product_param { bias_term: false num_output: 5"))
    with pytest.raises(WeightsError, match="layer 'ip': incompatible number of blobs: the file has 2, "
                                           "the net's InnerProduct layer has 1"):
        nobias.load_weights(str(src))


def test_missing_layers_are_an_error_unless_allowed(tmp_path):
    """py-faster-rcnn issue 256: renamed layers silently kept random weights."""
    src = tmp_path / "w.caffemodel"
    tiny_net().save_weights(str(src))
    renamed = TINY.replace('name: "ip"', 'name: "cls_score"')
    with pytest.raises(WeightsError, match=r"no weights in the file for layer\(s\) cls_score .*--allow-missing"):
        Net(renamed).load_weights(str(src))
    net = Net(renamed, seed=5)
    before = net.layer("cls_score").weight.detach().clone()
    notes = net.load_weights(str(src), allow_missing=True)
    assert any("cls_score" in n for n in notes) and any("ignoring source layer 'ip'" in n for n in notes)
    assert torch.equal(net.layer("cls_score").weight, before)
    proto = tmp_path / "renamed.prototxt"
    proto.write_text(renamed)
    r = run_cli("convert", src, "-o", tmp_path / "x.safetensors", "--model", proto)
    assert r.exit_code == 2 and "cls_score" in r.output
    r = run_cli("convert", src, "-o", tmp_path / "x.safetensors", "--model", proto, "--allow-missing")
    assert r.exit_code == 0, r.output


def test_shared_params_saved_once_and_restored(tmp_path):
    net = Net(SHARED, seed=4)
    assert net.layer("ip2").weight is net.layer("ip1").weight
    st = tmp_path / "s.safetensors"
    net.save_weights(str(st))
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        assert sorted(f.keys()) == ["ip1.bias", "ip1.weight"]
    fresh = Net(SHARED, seed=9)
    fresh.load_weights(str(st))
    assert fresh.layer("ip2").weight is fresh.layer("ip1").weight
    assert torch.equal(fresh.layer("ip1").weight, net.layer("ip1").weight)
    assert torch.equal(fresh.layer("ip2").bias, net.layer("ip1").bias)
    x = torch.randn(2, 4)
    assert torch.equal(fresh(data=x)["out"], net(data=x)["out"])
    # a caffemodel stores the shared blob in each layer (as Caffe does) and loads back
    cm = tmp_path / "s.caffemodel"
    net.save_weights(str(cm))
    b = blob_bytes(cm)
    assert b[("ip1", 0)] == b[("ip2", 0)]
    again = Net(SHARED, seed=11)
    again.load_weights(str(cm))
    assert torch.equal(again.layer("ip2").weight, net.layer("ip1").weight)


def test_fold_batchnorm_cli_equals_sums_over_factor(tmp_path):
    net = tiny_net(6)
    src = tmp_path / "w.caffemodel"
    net.save_weights(str(src))
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    bn = net.layer("bn1")
    inv = np.float32(1) / np.float32(BN_FACTOR)  # Caffe: 1 / blobs_[2][0] in float
    want_mean = bn.running_mean.numpy() * inv
    want_var = bn.running_var.numpy() * inv
    for extra in ([], ["--model", proto]):
        out = tmp_path / f"folded{len(extra)}.safetensors"
        r = run_cli("convert", src, "-o", out, "--fold-batchnorm", *extra)
        assert r.exit_code == 0, r.output
        sd = W.read_state_file(str(out))
        np.testing.assert_array_equal(sd["bn1.running_mean"].numpy(), want_mean)
        np.testing.assert_array_equal(sd["bn1.running_var"].numpy(), want_var)
        assert sd["bn1.scale_factor"].tolist() == [1.0]
        np.testing.assert_allclose(want_mean, bn.running_mean.numpy() / BN_FACTOR, rtol=1e-6)
    # the folded weights give the same outputs
    folded = Net(TINY)
    folded.load_weights(str(tmp_path / "folded2.safetensors"))
    x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(folded(data=x)["ip"], net(data=x)["ip"], rtol=1e-6, atol=1e-6)
    # folding into a caffemodel is refused (Caffe files hold the sums)
    r = run_cli("convert", src, "-o", tmp_path / "f.caffemodel", "--model", proto, "--fold-batchnorm")
    assert r.exit_code == 2 and "--fold-batchnorm applies to .pt/.safetensors" in r.output


def test_one_table_names_the_format_of_every_weights_file():
    """load, save and convert all read the format from W.FORMATS (Caffe: any *.h5 is HDF5,
    any name no row claims is a binary caffemodel)."""
    names = ["a.caffemodel", "a.caffemodel.h5", "x.h5", "a.safetensors", "a.pt", "a.pth", "weights.bin"]
    assert [W.format_of(n).name for n in names] == ["caffemodel", "hdf5", "hdf5", "safetensors", "pt",
                                                    "pt", "caffemodel"]
    assert [f.name for f in W.FORMATS] == ["hdf5", "safetensors", "pt", "caffemodel"]
    assert [f.name for f in W.FORMATS if f.read_state is None] == ["hdf5"]
    assert [f.name for f in W.FORMATS if f.write_state is not None] == ["safetensors", "pt"]

def test_convert_to_caffemodel_needs_model(tmp_path):
    st = tmp_path / "w.safetensors"
    tiny_net().save_weights(str(st))
    r = run_cli("convert", st, "-o", tmp_path / "w.caffemodel")
    assert r.exit_code == 2
    assert r.output.strip() == "error: writing a .caffemodel needs the net definition: add --model NET.prototxt"
    assert not (tmp_path / "w.caffemodel").exists()


def test_convert_safetensors_to_pt_and_back(tmp_path):
    net = tiny_net(7)
    st, pt, st2 = tmp_path / "a.safetensors", tmp_path / "b.pt", tmp_path / "c.safetensors"
    net.save_weights(str(st))
    assert run_cli("convert", st, "-o", pt).exit_code == 0
    assert run_cli("convert", pt, "-o", st2).exit_code == 0
    assert_same_state(W.read_state_file(str(st2)), W.read_state_file(str(st)))


# ---------------------------------------------------------------------- NaN / Inf
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_weights_refused_with_layer_and_opt_out(tmp_path, monkeypatch, bad):
    net = tiny_net()
    with torch.no_grad():
        net.layer("sc1").bias[2] = float(bad)
    for ext in ("caffemodel", "safetensors", "pt"):
        path = tmp_path / f"w.{ext}"
        net.save_weights(str(path))
        with pytest.raises(WeightsError) as ei:
            Net(TINY).load_weights(str(path))
        assert ei.value.layer == "sc1" and ei.value.blob == 1, str(ei.value)
        kind = "NaN" if np.isnan(bad) else "Inf"
        assert re.search(rf"holds {1 if kind == 'NaN' else 0} NaN and {1 if kind == 'Inf' else 0} Inf "
                         r"value\(s\) \(first at flat index 2\)", str(ei.value))
        fresh = Net(TINY)
        W.load_into(fresh, str(path), check_finite=False)
        assert torch.equal(fresh.layer("sc1").bias, net.layer("sc1").bias, ) or np.isnan(bad)
    with pytest.raises(WeightsError, match="layer 'sc1': blob 1"):
        W.caffemodel_state_dict(str(tmp_path / "w.caffemodel"))
    r = run_cli("convert", tmp_path / "w.caffemodel", "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "layer 'sc1': blob 1" in r.output
    monkeypatch.setenv(W.ENV_ALLOW_NONFINITE, "1")
    Net(TINY).load_weights(str(tmp_path / "w.caffemodel"))
    assert run_cli("convert", tmp_path / "w.caffemodel", "-o", tmp_path / "x.safetensors").exit_code == 0


# ---------------------------------------------------------------------- limits
def test_blob_limit_refuses_before_allocation_and_can_be_raised(tmp_path, monkeypatch):
    from caffe_compat import limits

    src = tmp_path / "w.caffemodel"
    tiny_net().save_weights(str(src))
    with limits.raised(max_blob_elements=100):
        with pytest.raises(LimitError, match=r"layer 'conv1': blob 0: blob shape \(4, 3, 3, 3\) has 108 "
                                             r"elements, over the limit of 100 \(raise it with "
                                             r"CAFFE_COMPAT_MAX_BLOB_ELEMENTS=N"):
            W.read_caffemodel(str(src))
    monkeypatch.setenv("CAFFE_COMPAT_MAX_BLOB_ELEMENTS", "107")
    with pytest.raises(LimitError, match="over the limit of 107"):
        W.read_caffemodel(str(src))
    monkeypatch.setenv("CAFFE_COMPAT_MAX_BLOB_ELEMENTS", "320")
    W.read_caffemodel(str(src))
    monkeypatch.setattr(caffemodel, "MAX_BLOB_ELEMENTS", 10)  # the module-level knob still works
    with pytest.raises(LimitError, match="over the limit of 10 "):
        W.read_caffemodel(str(src))


def test_convert_refuses_duplicate_layer_names_without_model(tmp_path):
    msg = caffe_pb2.NetParameter()
    for _ in range(2):
        lp = msg.layer.add(name="ip", type="InnerProduct")
        lp.blobs.add().data.extend([1.0, 2.0])
    path = tmp_path / "dup.caffemodel"
    path.write_bytes(msg.SerializeToString())
    with pytest.raises(WeightsError, match="two layers named 'ip'"):
        W.caffemodel_state_dict(str(path))


def test_read_caffemodel_matches_protobuf_on_real_corpus_shapes(tmp_path):
    """Our wire-level reader and protobuf's parser agree on every blob of a file."""
    net = tiny_net(8)
    src = tmp_path / "w.caffemodel"
    net.save_weights(str(src))
    from caffe_compat.io import blob_to_array

    parsed = caffe_pb2.NetParameter.FromString(src.read_bytes())
    ours = blob_bytes(src)
    for lp in parsed.layer:
        for i, b in enumerate(lp.blobs):
            assert blob_to_array(b).tobytes() == ours[(lp.name, i)]
    assert isinstance(W.read_caffemodel(str(src))[0], str)


def test_schema_error_is_caffe_compat_error():
    assert issubclass(SchemaError, CaffeCompatError) and issubclass(LimitError, CaffeCompatError)
    assert os.environ.get(W.ENV_ALLOW_NONFINITE) in (None, "", "0")
