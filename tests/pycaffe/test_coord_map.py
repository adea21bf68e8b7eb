"""pycaffe's ``caffe.coord_map`` (FCN's ``crop(n.upscore, n.data)``) on caffe-compat.

The NetSpec builders of tests/golden/make_coord_map.py ran under real pycaffe and recorded
coord_map.json: every ``coord_map_from_to``/``crop``/``coord_map`` result (or the exception
raised), the prototxt written and, for nets real Caffe built, every blob's shape.  Here the
same builders run on caffe-compat's emulation; the nets it writes are built with
``caffe_compat.Net`` and run forward, and every Crop's output is checked against the slice
of its input that its offsets name.  The rest covers the runner (``from caffe.coord_map
import crop`` in an unchanged script) and the deliberate extensions.
"""
from __future__ import annotations

import importlib.util
import json
import re
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

import caffe_compat.pycaffe as caffe
from caffe_compat import Net
from caffe_compat.protos import caffe_pb2
from caffe_compat.pycaffe import coord_map as cm
from caffe_compat.pycaffe.runner import run_script
from conftest import GOLDEN

GOLDEN_FILE = GOLDEN / "coord_map.json"
L, P = caffe.layers, caffe.params
_SPLIT = re.compile(r"_split_\d+$")  # Caffe's automatic Split blobs, not kept here


def _load_builders():
    spec = importlib.util.spec_from_file_location("make_coord_map",
                                                  GOLDEN / "make_coord_map.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MAKE = _load_builders()
GOLDEN = json.loads(GOLDEN_FILE.read_text())


def _norm(result):
    """A recorded result with scalars as one-element lists (pycaffe mixes 1 and array([1.]))."""
    if "map" not in result:
        return result
    ax, a, b = result["map"]
    return {"map": [ax, [float(x) for x in np.atleast_1d(a)], [float(x) for x in np.atleast_1d(b)]]}


def _parse(text: str) -> caffe_pb2.NetParameter:
    return text_format.Parse(text, caffe_pb2.NetParameter())


def _run(net_param: caffe_pb2.NetParameter, seed: int = 0) -> Net:
    """Build the net, feed seeded normals to its Input layers, run forward."""
    net = Net(net_param, phase="test")
    gen = torch.Generator().manual_seed(seed)
    inputs = {}
    for layer in net_param.layer:
        if layer.type == "Input":
            for top, shape in zip(layer.top, layer.input_param.shape):
                inputs[top] = torch.randn(*shape.dim, generator=gen)
    with torch.no_grad():
        net.forward(**inputs)
    return net


def _check_crops(net: Net, net_param: caffe_pb2.NetParameter) -> int:
    """Every Crop's top is its first bottom cut at its offsets to its second bottom's size."""
    count = 0
    for layer in net_param.layer:
        if layer.type != "Crop":
            continue
        src, ref = (net.blobs[b] for b in layer.bottom)
        axis = layer.crop_param.axis if layer.crop_param.HasField("axis") else 2
        offsets = list(layer.crop_param.offset) or [0]
        window = []
        for i in range(src.dim()):
            if i < axis:
                window.append(slice(None))
            else:
                off = offsets[0] if len(offsets) == 1 else offsets[i - axis]
                window.append(slice(off, off + ref.shape[i]))
        out = net.blobs[layer.top[0]]
        assert tuple(out.shape[axis:]) == tuple(ref.shape[axis:]), layer.name
        assert torch.equal(out, src[tuple(window)]), layer.name
        count += 1
    return count


# ============================================================================ golden
@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_matches_pycaffe(name):
    """Same maps, same exceptions, same prototxt as real pycaffe; shapes as real Caffe's."""
    golden = GOLDEN[name]
    n, results, build = MAKE.CASES[name](caffe, cm)
    try:
        prototxt = str(n.to_proto())
    except Exception as e:  # recorded the same way by the golden script
        prototxt = None
        results["to_proto"] = {"error": type(e).__name__}
    assert sorted(results) == sorted(golden["results"])
    for key, expected in golden["results"].items():
        got, want = _norm(results[key]), _norm(expected)
        if "map" in want and "map" in got:
            assert got["map"][0] == want["map"][0], key
            for g, w in zip(got["map"][1:], want["map"][1:]):
                np.testing.assert_allclose(g, w, rtol=0, atol=1e-12, err_msg=key)
                assert len(g) == len(w), key
        else:
            assert got == want, key
    if golden["prototxt"] is None:
        assert prototxt is None
        return
    # text order of fields differs between protobuf versions: compare the messages
    assert _parse(prototxt) == _parse(golden["prototxt"])
    if "shapes" in golden:
        param = _parse(prototxt)
        net = _run(param)
        shapes = {b: s for b, s in golden["shapes"].items() if not _SPLIT.search(b)}
        assert set(shapes) <= set(net.blobs)
        for blob, shape in shapes.items():
            assert list(net.blobs[blob].shape) == shape, blob
        assert _check_crops(net, param) == sum(1 for l in param.layer if l.type == "Crop")


def test_fcn_offsets_derived_by_hand():
    """FCN's published offsets, re-derived (x_top = a * x_bottom + b per layer):
    conv1_1 (3x3, pad 100): x + 99; each 2x2/2 pool: (x - 1/2) / 2; other 3x3/pad-1 and
    1x1 convs: x; fc6 (7x7, pad 0): x - 3; a k=2s, stride-s deconv: s * x + (2s - 1)/2.
    data -> pool_k: (x + 99 - (2^k - 1)/2) / 2^k, so pool5 = (x + 83.5)/32, fc7 =
    (x - 12.5)/32, upscore (64/32) = x + 19 -> offset 19 (voc-fcn32s);
    upscore2 (4/2) = (x + 11.5)/16 against pool4 = (x + 91.5)/16 -> 5, upscore16 (32/16) =
    x + 27 -> 27 (fcn16s); upscore_pool4 = (x + 23.5)/8 against pool3 = (x + 95.5)/8 -> 9,
    upscore8 (16/8) = x + 31 -> 31 (fcn8s).  These are the offsets of the Crop layers in
    fcn.berkeleyvision.org's voc-fcn*s prototxts."""
    offsets = {}
    for name in ("fcn32s", "fcn16s", "fcn8s"):
        param = _parse(str(MAKE.CASES[name](caffe, cm)[0].to_proto()))
        for layer in param.layer:
            if layer.type == "Crop":
                assert layer.crop_param.axis == 2
                offsets[f"{name}/{layer.name}"] = list(layer.crop_param.offset)
    assert offsets == {"fcn32s/score": [19], "fcn16s/score_pool4c": [5], "fcn16s/score": [27],
                       "fcn8s/score_pool4c": [5], "fcn8s/score_pool3c": [9], "fcn8s/score": [31]}


def test_golden_comparison_can_fail():
    """A wrong offset in the recorded prototxt is noticed."""
    good = GOLDEN["fcn32s"]["prototxt"]
    bad = re.sub(r"offset: 19", "offset: 18", good)
    assert bad != good
    n = MAKE.CASES["fcn32s"](caffe, cm)[0]
    assert _parse(str(n.to_proto())) != _parse(bad)


# ============================================================================ refusals
def _base():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 40, 40]))
    n.conv = L.Convolution(n.data, num_output=1, kernel_size=3, pad=0)
    return n


def test_undefined_layer_raises():
    n = _base()
    n.ip = L.InnerProduct(n.conv, num_output=2)
    n.rs = L.Reshape(n.conv, shape=dict(dim=[0, 0, -1, 1]))
    n.after = L.Convolution(n.rs, num_output=1, kernel_size=1)
    for fn in (n.ip.fn, n.rs.fn):
        with pytest.raises(cm.UndefinedMapException):
            cm.coord_map(fn)
    with pytest.raises(RuntimeError, match="connected by spatial layers"):
        cm.coord_map_from_to(n.after, n.data)
    with pytest.raises(RuntimeError):
        cm.crop(n.ip, n.data)


def test_refusals_are_assertion_errors():
    n = _base()
    n.relu = L.ReLU(n.data)
    n.pool = L.Pooling(n.conv, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    with pytest.raises(AssertionError, match="no spatial layer"):
        cm.crop(n.relu, n.data)          # only pointwise layers: no axis to crop on
    with pytest.raises(AssertionError, match="scale mismatch"):
        cm.crop(n.pool, n.data)
    with pytest.raises(AssertionError, match="negative offset"):
        cm.crop(n.conv, n.data)          # conv is smaller than data: it would need padding
    assert list(cm.crop(n.data, n.conv).fn.params["crop_param"]["offset"]) == [1]


# ============================================================================ extensions
def test_legacy_hw_params_and_pooling_param_dict():
    """kernel_h/_w... map as the list form does; a pooling_param dict as bare keywords."""
    n = _base()
    n.a = L.Convolution(n.data, num_output=1, kernel_size=[3, 5], stride=[1, 2], pad=[0, 10])
    n.b = L.Convolution(n.data, num_output=1, kernel_h=3, kernel_w=5, stride_h=1, stride_w=2,
                        pad_h=0, pad_w=10)
    n.c = L.Convolution(n.data, convolution_param=dict(num_output=1, kernel_h=3, kernel_w=5,
                                                       stride_h=1, stride_w=2, pad_h=0, pad_w=10))
    n.p1 = L.Pooling(n.a, pool=P.Pooling.MAX, kernel_size=3, stride=2, pad=1)
    n.p2 = L.Pooling(n.a, pooling_param=dict(pool=P.Pooling.MAX, kernel_size=3, stride=2, pad=1))
    ax, a, b = cm.coord_map_from_to(n.data, n.a)
    assert ax == 1 and a.tolist() == [1.0, 0.5] and b.tolist() == [-1.0, 4.0]
    for top in (n.b, n.c):
        ax2, a2, b2 = cm.coord_map_from_to(n.data, top)
        assert ax2 == ax and a2.tolist() == a.tolist() and b2.tolist() == b.tolist()
    assert [x.tolist() for x in cm.coord_map(n.p1.fn)[1:]] == \
        [x.tolist() for x in cm.coord_map(n.p2.fn)[1:]] == [[0.5], [0.0]]
    n.g = L.Pooling(n.a, pool=P.Pooling.AVE, global_pooling=True)
    with pytest.raises(cm.UndefinedMapException):
        cm.coord_map(n.g.fn)


def test_conv_params_and_crop_params_helpers():
    n = _base()
    n.d = L.Convolution(n.data, num_output=1, kernel_size=3, dilation=4, stride=2, pad=[1, 2])
    n.c = L.Crop(n.d, n.data, crop_param=dict(offset=[3, 4]))
    axis, stride, extent, pad = cm.conv_params(n.d.fn)
    assert (axis, stride.tolist(), extent.tolist(), pad.tolist()) == (1, [2], [9], [1, 2])
    axis, offset = cm.crop_params(n.c.fn)
    assert (axis, offset.tolist()) == (2, [3, 4])
    assert cm.crop_params(L.Crop(n.d, n.data).fn)[1].tolist() == [0]
    ax, a, b = cm.compose((1, np.array([2.0]), np.array([1.0])), (None, 1, 0))
    assert ax == 1 and a.tolist() == [2.0] and b.tolist() == [1.0]
    ax, a, b = cm.inverse((1, np.array([2.0]), np.array([1.0])))
    assert a.tolist() == [0.5] and b.tolist() == [-0.5]
    with pytest.raises(cm.AxisMismatchException):
        cm.compose((1, 1, 0), (2, 1, 0))


def test_concat_on_channels_passes_through():
    """A U-Net-style skip: crop the encoder's map to the decoder's, concat, crop to data."""
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 2, 37, 44]))
    n.enc = L.Convolution(n.data, num_output=2, kernel_size=3, pad=0)
    n.down = L.Pooling(n.enc, pool=P.Pooling.MAX, kernel_size=2, stride=2)
    n.mid = L.Convolution(n.down, num_output=2, kernel_size=3, pad=0)
    n.up = L.Deconvolution(n.mid, convolution_param=dict(num_output=2, kernel_size=2, stride=2))
    n.skip = cm.crop(n.enc, n.up)
    n.cat = L.Concat(n.up, n.skip, axis=1)
    n.head = L.Convolution(n.cat, num_output=1, kernel_size=1)
    n.out = cm.crop(n.data, n.head)
    param = _parse(str(n.to_proto()))
    crops = {l.name: (l.crop_param.axis, list(l.crop_param.offset))
             for l in param.layer if l.type == "Crop"}
    # enc = x - 1; mid = (enc - 1/2)/2 - 1; up = 2 mid + 1/2 = enc - 2 = x - 3
    assert crops == {"skip": (2, [2]), "out": (2, [3])}
    net = _run(param)
    assert _check_crops(net, param) == 2
    n.cat2 = L.Concat(n.up, n.skip, axis=2)
    n.head2 = L.Convolution(n.cat2, num_output=1, kernel_size=1)
    with pytest.raises(RuntimeError):
        cm.coord_map_from_to(n.head2, n.data)


def test_stride_three_chain_is_exact():
    n = caffe.NetSpec()
    n.data = L.Input(shape=dict(dim=[1, 1, 80, 70]))
    n.c1 = L.Convolution(n.data, num_output=1, kernel_size=5, stride=3, pad=7)
    n.c2 = L.Convolution(n.c1, num_output=1, kernel_size=3, stride=3, pad=0)
    n.up = L.Deconvolution(n.c2, convolution_param=dict(num_output=1, kernel_size=17, stride=9))
    n.up2 = L.Deconvolution(n.c2, convolution_param=dict(num_output=1, kernel_size=18, stride=9))
    # c1 = (x + 7 - 2)/3; c2 = (c1 - 1)/3 = (x + 2)/9; up = 9 c2 + 8 = x + 10, up2: x + 10.5
    ax, a, b = cm.coord_map_from_to(n.up2, n.data)
    assert ax == 1 and a.tolist() == [1.0] and b.tolist() == [-10.5]
    with pytest.raises(AssertionError, match="noninteger"):
        cm.crop(n.up2, n.data)
    n.out = cm.crop(n.up, n.data)
    param = _parse(str(n.to_proto()))
    assert [list(l.crop_param.offset) for l in param.layer if l.type == "Crop"] == [[10]]
    net = _run(param)
    assert _check_crops(net, param) == 1


# ============================================================================ scripts
FCN_SCRIPT = """
    import sys
    import caffe
    from caffe import layers as L, params as P
    from caffe.coord_map import crop

    def conv_relu(bottom, nout, ks=3, stride=1, pad=1):
        conv = L.Convolution(bottom, kernel_size=ks, stride=stride, num_output=nout, pad=pad,
                             param=[dict(lr_mult=1, decay_mult=1), dict(lr_mult=2, decay_mult=0)])
        return conv, L.ReLU(conv, in_place=True)

    def max_pool(bottom, ks=2, stride=2):
        return L.Pooling(bottom, pool=P.Pooling.MAX, kernel_size=ks, stride=stride)

    def fcn():
        n = caffe.NetSpec()
        n.data = L.Input(shape=[dict(dim=[1, 3, 37, 52])])
        n.conv1_1, n.relu1_1 = conv_relu(n.data, 2, pad=100)
        n.conv1_2, n.relu1_2 = conv_relu(n.relu1_1, 2)
        n.pool1 = max_pool(n.relu1_2)
        bottom = n.pool1
        for b, convs in ((2, 2), (3, 3), (4, 3), (5, 3)):
            for c in range(1, convs + 1):
                conv, relu = conv_relu(bottom, 2)
                n['conv%d_%d' % (b, c)], n['relu%d_%d' % (b, c)] = conv, relu
                bottom = relu
            n['pool%d' % b] = max_pool(bottom)
            bottom = n['pool%d' % b]
        n.fc6, n.relu6 = conv_relu(n.pool5, 4, ks=7, pad=0)
        n.drop6 = L.Dropout(n.relu6, dropout_ratio=0.5, in_place=True)
        n.fc7, n.relu7 = conv_relu(n.drop6, 4, ks=1, pad=0)
        n.drop7 = L.Dropout(n.relu7, dropout_ratio=0.5, in_place=True)
        n.score_fr = L.Convolution(n.drop7, num_output=3, kernel_size=1, pad=0)
        n.upscore = L.Deconvolution(n.score_fr,
            convolution_param=dict(num_output=3, kernel_size=64, stride=32, bias_term=False),
            param=[dict(lr_mult=0)])
        n.score = crop(n.upscore, n.data)
        return n.to_proto()

    assert caffe.coord_map.crop is crop
    with open(sys.argv[1], 'w') as f:
        f.write(str(fcn()))
"""


def test_fcn_script_through_runner(tmp_path):
    """An unchanged voc-fcn32s/net.py-style script: Crop offset 19, the net builds and its
    score has data's spatial size."""
    script = tmp_path / "net.py"
    script.write_text(textwrap.dedent(FCN_SCRIPT))
    out = tmp_path / "deploy.prototxt"
    run_script(script, [str(out)], shadow=True)
    param = _parse(out.read_text())
    crop_layer = [l for l in param.layer if l.type == "Crop"]
    assert len(crop_layer) == 1 and list(crop_layer[0].bottom) == ["upscore", "data"]
    assert crop_layer[0].crop_param.axis == 2 and list(crop_layer[0].crop_param.offset) == [19]
    net = Net(str(out), phase="test")
    x = torch.randn(1, 3, 37, 52, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        outputs = net.forward(data=x)
    assert list(outputs) == ["score"]
    assert tuple(outputs["score"].shape) == (1, 3, 37, 52)
    assert torch.equal(outputs["score"], net.blobs["upscore"][:, :, 19:19 + 37, 19:19 + 52])
