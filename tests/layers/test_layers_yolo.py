"""Reorg and Region (the YOLOv2 Caffe ports' layers).

References:
- Reorg: a numpy loop transcribed from the ports' ``reorg_cpu`` (gklz1982/caffe-yolov2,
  eric612/MobileNet-YOLO), forward and the direction-flipped backward; and OpenCV dnn's own
  Reorg (darknet's, built from a Caffe prototxt; OpenCV ignores ``reorg_param`` and always
  uses stride 2, so it is compared at stride 2).
- Region: a numpy loop transcribed from Intel's Caffe Region layer (entry_index,
  activate_array, softmax_cpu); and OpenCV dnn's darknet Region (read from a darknet cfg:
  OpenCV's Caffe importer drops ``region_param``), whose decoded boxes and class scores are
  functions of exactly the activations this layer outputs.
"""
from __future__ import annotations

import struct

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffe_compat.errors import CaffeCompatError, GraphError, SchemaError, ShapeError
from caffe_compat.layers import yolo
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import lookup
from caffe_compat.layers.yolo import Region, Reorg
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2


# ============================================================================ references
def ref_reorg_cpu(x, stride, forward):
    """The ports' ``reorg_cpu(bottom, w, h, c, batch, stride, forward, top)`` loop, dims of ``x``."""
    n_, c_, h_, w_ = x.shape
    src = x.reshape(-1)
    out = np.zeros_like(src)
    t_c, t_w, t_h = c_ // (stride * stride), w_ * stride, h_ * stride
    for n in range(n_):
        for c in range(c_):
            for h in range(h_):
                for w in range(w_):
                    b_idx = w + w_ * (h + h_ * (c + c_ * n))
                    c2 = c % t_c
                    offset = c // t_c
                    w2 = w * stride + offset % stride
                    h2 = h * stride + offset // stride
                    t_idx = w2 + t_w * (h2 + t_h * (c2 + t_c * n))
                    if forward:
                        out[t_idx] = src[b_idx]
                    else:
                        out[b_idx] = src[t_idx]
    return out


def ref_reorg_layer(x, stride, reverse):
    """Forward_cpu: ``reorg_cpu(bottom, ..., reverse_, top)``, top shaped as LayerSetUp says."""
    n, c, h, w = x.shape
    s = stride
    shape = (n, c // (s * s), h * s, w * s) if reverse else (n, c * s * s, h // s, w // s)
    return ref_reorg_cpu(x, stride, reverse).reshape(shape)


def ref_reorg_backward_darknet(top_diff, bottom_shape, stride, reverse):
    """What the ports' backward meant (darknet's): ``reorg_cpu(top_diff, ..., !reverse_, bottom_diff)``
    with the bottom's dims (the loop's w, h, c are always the bottom's)."""
    return ref_reorg_cpu(top_diff.reshape(bottom_shape), stride, not reverse).reshape(bottom_shape)


def ref_region(x, num, coords, classes):
    """Intel's Region Forward_cpu: copy, logistic on 2*w*h entries from entry 0 and on the
    objectness entry, then softmax (from the bottom) over classes with stride w*h."""
    batch, channels, height, width = x.shape
    out = x.reshape(-1).astype(np.float64).copy()
    src = x.reshape(-1).astype(np.float64)
    wh = width * height
    inputs = wh * num * (classes + coords + 1)

    def entry_index(b, location, entry):
        n, loc = location // wh, location % wh
        return b * inputs + n * wh * (coords + classes + 1) + entry * wh + loc

    def logistic(v):
        return 1.0 / (1.0 + np.exp(-v))

    for b in range(batch):
        for n in range(num):
            i = entry_index(b, n * wh, 0)
            for k in range(2 * wh):
                out[i + k] = logistic(out[i + k])
            i = entry_index(b, n * wh, coords)
            for k in range(wh):
                out[i + k] = logistic(out[i + k])
    base = entry_index(0, 0, coords + 1)
    for g_b in range(batch * num):
        for g in range(wh):
            start = base + g_b * (inputs // num) + g
            vals = [src[start + j * wh] for j in range(classes)]
            if not vals:
                continue
            largest = max(vals)
            e = [np.exp(v - largest) for v in vals]
            s = sum(e)
            for j in range(classes):
                out[start + j * wh] = e[j] / s
    return out.reshape(x.shape)


# ============================================================================ helpers
def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def reorg_layer(shape, stride=2, reverse=False, top="y"):
    rev = " reverse: true" if reverse else ""
    p = layer_param(f'name: "reorg" type: "Reorg" bottom: "x" top: "{top}" '
                    f'reorg_param {{ stride: {stride}{rev} }}')
    return Reorg(p, [shape], BuildContext())


def region_layer(shape, num, coords, classes):
    p = layer_param(f'name: "region" type: "Region" bottom: "x" top: "y" '
                    f'region_param {{ num: {num} coords: {coords} classes: {classes} }}')
    return Region(p, [shape], BuildContext())


def opencv_forward(prototxt, x, tmp_path, model=None, out=None):
    path = tmp_path / "net.prototxt"
    path.write_text(prototxt)
    net = cv2.dnn.readNetFromCaffe(str(path), str(model)) if model else cv2.dnn.readNetFromCaffe(str(path))
    net.setInput(x)
    return net.forward(out) if out else net.forward()


# ============================================================================ Reorg
def test_registered():
    assert lookup("Reorg") is Reorg
    assert lookup("Region") is Region


REORG_CASES = [
    ((2, 8, 4, 6), 2, False),
    ((2, 8, 4, 6), 2, True),
    ((1, 4, 2, 2), 2, False),    # C = s^2: one reorged channel
    ((1, 4, 2, 2), 2, True),
    ((2, 18, 6, 3), 3, False),
    ((1, 27, 2, 4), 3, True),
    ((2, 3, 5, 4), 1, False),    # stride 1: identity
    ((3, 32, 4, 8), 4, False),
]


@pytest.mark.parametrize("shape,stride,reverse", REORG_CASES)
def test_reorg_forward_matches_fork_loop(shape, stride, reverse):
    x = np.random.RandomState(sum(shape) + stride).randn(*shape).astype(np.float32)
    layer = reorg_layer(shape, stride, reverse)
    (y,) = layer(torch.from_numpy(x))
    ref = ref_reorg_layer(x, stride, reverse)
    assert tuple(y.shape) == ref.shape
    np.testing.assert_array_equal(y.numpy(), ref)
    assert layer.infer_top_shapes([shape]) == [ref.shape]


def test_reorg_is_not_space_to_depth():
    # darknet's index map reads the bottom's memory as (C/s^2, H s, W s): with C = 4,
    # s = 2 the first top channel is NOT the even-row/even-column samples of channel 0
    x = torch.arange(4 * 4 * 4, dtype=torch.float32).reshape(1, 4, 4, 4)
    (y,) = reorg_layer((1, 4, 4, 4), 2)(x)
    s2d = F.pixel_unshuffle(x, 2)
    assert not torch.equal(y, s2d)
    # top channel 0 holds the bottom's first 16 values read as row 0 of an 8 x 8 plane,
    # every second column: 0, 2, 4, 6 (space-to-depth would give 0, 2, 8, 10)
    assert y[0, 0].flatten().tolist() == [0.0, 2.0, 4.0, 6.0]
    assert s2d[0, 0].flatten().tolist() == [0.0, 2.0, 8.0, 10.0]


@pytest.mark.parametrize("shape,stride,reverse", REORG_CASES)
def test_reorg_backward_modes(shape, stride, reverse):
    rng = np.random.RandomState(7 + stride)
    x = rng.randn(*shape).astype(np.float32)
    layer = reorg_layer(shape, stride, reverse)
    # darknet: the direction-flipped loop applied to the top's diff (the inverse permutation)
    assert not layer.legacy_zero_backward
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    g = rng.randn(*y.shape).astype(np.float32)
    (gx,) = torch.autograd.grad(y, xt, torch.from_numpy(g))
    np.testing.assert_array_equal(gx.numpy(), ref_reorg_backward_darknet(g, shape, stride, reverse))
    # fork: the ports read a never-written private diff blob: zeros, same forward (opt-in)
    layer.legacy_zero_backward = True
    (y2,) = layer(xt)
    np.testing.assert_array_equal(y2.detach().numpy(), y.detach().numpy())
    (gx2,) = torch.autograd.grad(y2, xt, torch.from_numpy(g))
    assert gx2.shape == xt.shape and not gx2.any()


def test_reorg_backward_default_is_the_true_gradient():
    assert yolo.Reorg.legacy_zero_backward is False


@pytest.mark.parametrize("shape", [(1, 8, 4, 6), (2, 8, 4, 6), (1, 64, 26, 26), (2, 12, 2, 10)])
def test_reorg_matches_opencv(shape, tmp_path):
    x = np.random.RandomState(shape[1]).randn(*shape).astype(np.float32)
    proto = (f'name: "t" input: "data" input_shape {{ dim: {shape[0]} dim: {shape[1]} '
             f'dim: {shape[2]} dim: {shape[3]} }}\n'
             'layer { name: "reorg" type: "Reorg" bottom: "data" top: "reorg" '
             'reorg_param { stride: 2 } }\n')
    want = opencv_forward(proto, x, tmp_path)
    (y,) = reorg_layer(shape, 2)(torch.from_numpy(x))
    np.testing.assert_array_equal(y.numpy(), want)


@pytest.mark.parametrize("text,err,match", [
    ('reorg_param { reverse: true }', SchemaError, "stride is required"),
    ('', SchemaError, "stride is required"),
    ('reorg_param { stride: 0 }', SchemaError, "must be > 0"),
])
def test_reorg_param_errors(text, err, match):
    with pytest.raises(err, match=match):
        Reorg(layer_param(f'name: "r" type: "Reorg" bottom: "x" top: "y" {text}'),
              [(1, 4, 2, 2)], BuildContext())


@pytest.mark.parametrize("shape,stride,reverse,match", [
    ((1, 8, 5, 6), 2, False, "multiples of the stride"),
    ((1, 8, 4, 7), 2, False, "multiples of the stride"),
    ((1, 6, 4, 4), 2, False, "multiple of stride"),
    ((1, 2, 4, 4), 2, False, "multiple of stride"),  # C / s^2 = 0: the fork divides by zero
    ((1, 6, 4, 4), 2, True, "multiple of stride"),
    ((8, 4, 4), 2, False, "4-D"),
])
def test_reorg_shape_errors(shape, stride, reverse, match):
    with pytest.raises(ShapeError, match=match):
        reorg_layer(shape, stride, reverse)


def test_reorg_not_in_place():
    with pytest.raises(GraphError, match="in-place"):
        Reorg(layer_param('name: "r" type: "Reorg" bottom: "x" top: "x" reorg_param { stride: 2 }'),
              [(1, 4, 2, 2)], BuildContext())


# ============================================================================ Region
REGION_CASES = [
    # (N, H, W), num, coords, classes
    ((1, 3, 4), 2, 4, 3),
    ((2, 5, 3), 5, 4, 20),
    ((2, 2, 2), 1, 4, 1),     # one class: softmax gives 1
    ((1, 4, 3), 3, 4, 0),     # no classes: no softmax
    ((2, 3, 3), 2, 6, 2),     # extra coordinate planes pass unchanged
    ((1, 1, 1), 2, 2, 4),     # coords = 2: objectness right after x, y
]


@pytest.mark.parametrize("nhw,num,coords,classes", REGION_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_region_matches_fork_loop(nhw, num, coords, classes, dtype):
    n, h, w = nhw
    c = num * (coords + 1 + classes)
    rng = np.random.RandomState(c + h)
    x = (rng.randn(n, c, h, w) * 3).astype(dtype)
    layer = region_layer((n, c, h, w), num, coords, classes)
    (y,) = layer(torch.from_numpy(x))
    ref = ref_region(x, num, coords, classes)
    tol = 1e-6 if dtype == np.float32 else 1e-13
    np.testing.assert_allclose(y.numpy(), ref, rtol=tol, atol=tol)
    assert layer.infer_top_shapes([x.shape]) == [x.shape]


def test_region_takes_no_gradient():
    x = torch.randn(1, 16, 2, 3, requires_grad=True)
    (y,) = region_layer(tuple(x.shape), 2, 4, 3)(x)
    assert not y.requires_grad


def test_region_matches_opencv_darknet_region(tmp_path):
    """OpenCV's darknet Region decodes boxes from the same activations:
    x = (col + sig(tx)) / W, y = (row + sig(ty)) / H, w = exp(tw) a_w / W, h = exp(th) a_h / H,
    objectness sig(to), class score softmax * objectness (kept above thresh = 0).  Boxes are
    made tiny so OpenCV's built-in NMS suppresses nothing."""
    h, w, num, classes = 3, 5, 2, 4
    anchors = [1.0, 2.0, 3.0, 1.5]
    c = num * (4 + 1 + classes)
    rng = np.random.RandomState(3)
    x = rng.randn(1, c, h, w).astype(np.float32)
    xv = x.reshape(num, 4 + 1 + classes, h, w)
    xv[:, 2:4] = -8.0 - rng.rand(num, 2, h, w)  # exp(-8) * anchor / W: no two boxes overlap
    cfg = (f"[net]\nwidth={w}\nheight={h}\nchannels={c}\n\n[region]\n"
           f"anchors = {', '.join(str(a) for a in anchors)}\nbias_match=1\nclasses={classes}\n"
           f"coords=4\nnum={num}\nsoftmax=1\nthresh=0\n")
    (tmp_path / "r.cfg").write_text(cfg)
    (tmp_path / "r.weights").write_bytes(struct.pack("<iiii", 0, 2, 0, 0))
    net = cv2.dnn.readNetFromDarknet(str(tmp_path / "r.cfg"), str(tmp_path / "r.weights"))
    net.setInput(x)
    got = net.forward()  # rows (row * W + col) * num + n: [x, y, w, h, obj, class scores]
    (act,) = region_layer(x.shape, num, 4, classes)(torch.from_numpy(x))
    a = act.numpy().reshape(num, 4 + 1 + classes, h, w)
    rows = np.arange(h)[:, None] * np.ones((1, w))
    cols = np.ones((h, 1)) * np.arange(w)[None, :]
    want = np.zeros((h, w, num, 5 + classes), np.float64)
    for n in range(num):
        want[:, :, n, 0] = (cols + a[n, 0]) / w
        want[:, :, n, 1] = (rows + a[n, 1]) / h
        want[:, :, n, 2] = np.exp(a[n, 2]) * anchors[2 * n] / w
        want[:, :, n, 3] = np.exp(a[n, 3]) * anchors[2 * n + 1] / h
        want[:, :, n, 4] = a[n, 4]
        want[:, :, n, 5:] = np.moveaxis(a[n, 5:] * a[n, 4], 0, -1)
    np.testing.assert_allclose(got, want.reshape(h * w * num, 5 + classes), rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("text,shape,err,match", [
    ("num: 2 coords: 4 classes: 3", (1, 15, 2, 2), ShapeError, "num \\* \\(coords"),
    ("num: 2 coords: 4 classes: 3", (16, 2, 2), ShapeError, "4-D"),
    ("num: 0 coords: 4 classes: 3", (1, 0, 2, 2), SchemaError, "num must be >= 1"),
    ("num: 1 coords: 1 classes: 3", (1, 5, 2, 2), SchemaError, "coords must be >= 2"),
    ("num: 1 coords: 4 classes: -1", (1, 4, 2, 2), SchemaError, "classes must be >= 0"),
])
def test_region_errors(text, shape, err, match):
    with pytest.raises(err, match=match):
        Region(layer_param(f'name: "r" type: "Region" bottom: "x" top: "y" region_param {{ {text} }}'),
               [shape], BuildContext())


def test_region_param_defaults_and_fork_numbers(tmp_path):
    p = caffe_pb2.RegionParameter()
    assert (p.coords, p.classes, p.num) == (4, 20, 1)  # Intel's defaults
    # default region_param: 1 anchor, 4 coords, 20 classes -> 25 channels
    layer = Region(layer_param('name: "r" type: "Region" bottom: "x" top: "y"'), [(1, 25, 2, 2)],
                   BuildContext())
    assert (layer.num, layer.coords, layer.classes) == (1, 4, 20)
    # a caffemodel keeps Intel's field number 214 for region_param, and reads back
    from caffe_compat.weights import read_caffemodel, write_caffemodel

    lp = layer_param('name: "r" type: "Region" bottom: "x" top: "y" '
                     'region_param { num: 5 coords: 4 classes: 80 }')
    path = tmp_path / "r.caffemodel"
    write_caffemodel(str(path), "t", [(lp, [])])
    raw = path.read_bytes()
    assert bytes([0xB2, 0x0D]) in raw  # tag of field 214, wire type 2
    _, layers = read_caffemodel(str(path))
    assert layers[0].param.region_param.classes == 80 and layers[0].param.region_param.num == 5


# ============================================================================ a tiny YOLOv2-style net
NUM, CLASSES = 2, 3
YOLO_NET = f"""
name: "tiny_yolo2"
input: "data"
input_shape {{ dim: 2 dim: 3 dim: 8 dim: 8 }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param {{ negative_slope: 0.1 }} }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 12 kernel_size: 3 pad: 1
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "reorg" type: "Reorg" bottom: "conv1" top: "reorg" reorg_param {{ stride: 2 }} }}
layer {{ name: "concat" type: "Concat" bottom: "reorg" bottom: "conv2" top: "concat" }}
layer {{ name: "conv_out" type: "Convolution" bottom: "concat" top: "conv_out"
  convolution_param {{ num_output: {NUM * (4 + 1 + CLASSES)} kernel_size: 1
    weight_filler {{ type: "gaussian" std: 0.3 }} bias_filler {{ type: "gaussian" std: 0.1 }} }} }}
layer {{ name: "region" type: "Region" bottom: "conv_out" top: "region"
  region_param {{ classes: {CLASSES} coords: 4 num: {NUM} }} }}
"""


def _independent_yolo(net, x, reorg_grad):
    """The same net from torch ops and the numpy references (reorg via the fork's loop)."""
    p = {n: (net.layer(n).weight, net.layer(n).bias) for n in ("conv1", "conv2", "conv_out")}
    c1 = F.leaky_relu(F.conv2d(x, *p["conv1"], padding=1), 0.1)
    c2 = F.conv2d(F.max_pool2d(c1, 2, 2), *p["conv2"], padding=1)
    # reorg as a fixed permutation built from the loop (gather indices of each top element)
    idx = ref_reorg_layer(np.arange(c1.numel(), dtype=np.float64).reshape(c1.shape), 2, False)
    src = c1 if reorg_grad else c1.detach()
    r = src.reshape(-1)[torch.from_numpy(idx.reshape(-1).astype(np.int64))].reshape(idx.shape)
    out = F.conv2d(torch.cat([r, c2], 1), *p["conv_out"])
    return out


@pytest.mark.parametrize("mode", ["fork", "darknet"])
def test_tiny_yolo2_net_forward_backward(mode):
    torch.manual_seed(0)
    net = Net(YOLO_NET.replace('top: "conv_out"\n', 'top: "conv_out" loss_weight: 1\n'), phase="test")
    net.layer("reorg").legacy_zero_backward = (mode == "fork")
    assert net.blob_shapes["reorg"] == (2, 32, 4, 4)
    x = torch.randn(2, 3, 8, 8)
    outs = net.forward(data=x)
    ref = _independent_yolo(net, x, reorg_grad=(mode == "darknet"))
    np.testing.assert_allclose(net.blobs["conv_out"].detach().numpy(), ref.detach().numpy(),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["region"].numpy(),
                               ref_region(ref.detach().numpy(), NUM, 4, CLASSES), rtol=1e-5, atol=1e-6)
    net.backward()
    params = [net.layer(n).weight for n in ("conv1", "conv2", "conv_out")]
    want = torch.autograd.grad(ref.sum(), params)
    for prm, g in zip(params, want):
        np.testing.assert_allclose(prm.grad.numpy(), g.numpy(), rtol=1e-4, atol=1e-5)
    # the passthrough matters: conv1's gradient differs between the two backward modes
    other = _independent_yolo(net, x, reorg_grad=(mode != "darknet"))
    (g_other,) = torch.autograd.grad(other.sum(), [params[0]])
    assert not torch.allclose(g_other, params[0].grad, rtol=1e-3, atol=1e-4)


def test_tiny_yolo2_net_matches_opencv(tmp_path):
    torch.manual_seed(1)
    net = Net(YOLO_NET, phase="test")
    x = torch.randn(2, 3, 8, 8)
    outs = net.forward(data=x)
    model = tmp_path / "w.caffemodel"
    net.save_weights(str(model))
    # OpenCV's Caffe importer cannot configure a Region (it drops region_param): compare the
    # blob feeding it, which goes through Reorg and Concat
    head = YOLO_NET.split('layer { name: "region"')[0]
    got = opencv_forward(head, x.numpy(), tmp_path, model, "conv_out")
    np.testing.assert_allclose(net.blobs["conv_out"].detach().numpy(), got, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(outs["region"].numpy(), ref_region(got, NUM, 4, CLASSES),
                               rtol=1e-4, atol=1e-4)


def test_region_errors_are_caffe_compat_errors():
    with pytest.raises(CaffeCompatError):
        Net(YOLO_NET.replace("num: 2 }", "num: 3 }"), phase="test")


def test_region_reads_darknet2caffe_region_param():
    """darknet2caffe writes the .cfg's keys into region_param (anchors as one string)."""
    text = ('input: "x" input_shape { dim: 1 dim: 30 dim: 2 dim: 2 }\n'
            'layer { name: "region" type: "Region" bottom: "x" top: "r" region_param {\n'
            '  anchors: "1.08, 1.19,  3.42,4.41" bias_match: 1 classes: 10 coords: 4 num: 2\n'
            '  softmax: 1 jitter: .2 rescore: 1 object_scale: 5 noobject_scale: 1 class_scale: 1\n'
            '  coord_scale: 1 absolute: 1 thresh: .6 random: 0 } }\n')
    net = Net(text, phase="test")
    assert net.layer("region").anchors == [1.08, 1.19, 3.42, 4.41]
    x = torch.randn(1, 30, 2, 2)
    np.testing.assert_array_equal(net.forward(x=x)["r"].numpy(),
                                  yolo.region_activate(x, 2, 4, 10).numpy())
    with pytest.raises(SchemaError, match="softmax 0 is not supported"):
        Net(text.replace("softmax: 1", "softmax: 0"), phase="test")
