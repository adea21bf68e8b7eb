"""The small fork layers: Pooling's ceil_mode, the depthwise convolution types, ReLU6,
ShuffleChannel, Axpy, PSROIPooling and ROIAlign.

References (each layer forward and backward):
- ceil_mode (BVLC PR 3057): the golden Pooling files recorded from real Caffe (ceil_mode:
  true is Caffe's default), a numpy transcription of Caffe's pooling loops with PR 3057's
  floor size, BVLC master's round_mode: FLOOR, and OpenCV dnn (its importer reads ceil_mode).
- ConvolutionDepthwise: a numpy transcription of farmingyard/caffe-mobilenet's CPU loops
  (forward and the weight/bias/bottom diffs) and OpenCV dnn (which reads the type);
  DepthwiseConvolution: the grouped Convolution it is (OpenCV does not read the type).
- ReLU6: numpy transcription of eric612/MobileNet-YOLO's relu6_layer.cpp; OpenCV (slope 0;
  OpenCV's ReLU6 ignores negative_slope).
- ShuffleChannel: transcription of farmingyard/ShuffleNet's Resize_cpu; OpenCV.
- Axpy: transcription of hujie-frank/SENet's axpy_layer.cpp; OpenCV (whose importer takes
  the two last bottoms in the other order: compared with them swapped).
- PSROIPooling: transcription of caffe-rfcn's psroi_pooling_layer.cu (with the fused
  multiply-add of its bin edges, and without, to show where that matters); OpenCV.
- ROIAlign: transcription of the Detectron kernels in VitoChien/caffe-fast-rcnn's
  roi_align_layer.cu (forward and bilinear_interpolate_gradient backward); torchvision's
  roi_align(aligned=False), whose semantics coincide, for the pure-torch backend.
"""
from __future__ import annotations

import math
from fractions import Fraction

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from golden_util import check_golden
from caffe_compat import Net
from caffe_compat import forks
from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers import psroi_pooling as psroi_mod
from caffe_compat.layers import roi_align as roi_align_mod
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import lookup, resolve
from caffe_compat.protos import caffe_pb2
from conftest import GOLDEN as GOLDEN_DIR

f32 = np.float32
GOLDEN_POOL = sorted((GOLDEN_DIR / "vision").glob("pool_*.npz"))


# ============================================================================ helpers
def make(text: str, shapes, tops=("y",), phase="TEST"):
    p = text_format.Parse('name: "l" ' + text, caffe_pb2.LayerParameter())
    if not p.bottom:
        p.bottom.extend(["x%d" % i for i in range(len(shapes))])
    if not p.top:
        p.top.extend(tops)
    ctx = BuildContext(phase=phase, generator=torch.Generator().manual_seed(0))
    return resolve(p)(p, [tuple(s) for s in shapes], ctx)


def inputs_text(**shapes) -> str:
    return "".join(f'input: "{k}" input_shape {{ {" ".join(f"dim: {d}" for d in s)} }}\n'
                   for k, s in shapes.items())


def opencv(prototxt: str, feeds: dict, tmp_path, model=None, out=None) -> np.ndarray:
    path = tmp_path / "cv.prototxt"
    path.write_text(prototxt)
    net = cv2.dnn.readNetFromCaffe(str(path), str(model)) if model else \
        cv2.dnn.readNetFromCaffe(str(path))
    for k, v in feeds.items():
        net.setInput(np.ascontiguousarray(v, dtype=np.float32), k)
    return net.forward(out) if out else net.forward()


def c_round(v) -> float:
    """C round(): half away from zero."""
    a = abs(float(v))
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return float(r) if v >= 0 else -float(r)


# ============================================================================ registry
def test_types_registered():
    for t in ("ReLU6", "ShuffleChannel", "Axpy", "PSROIPooling", "ROIAlign",
              "DepthwiseConvolution", "ConvolutionDepthwise"):
        assert lookup(t).type_names == (t,)
    assert issubclass(lookup("DepthwiseConvolution"), lookup("Convolution"))
    assert issubclass(lookup("ConvolutionDepthwise"), lookup("Convolution"))


# ============================================================================ Pooling ceil_mode
def pool_size(size, k, s, p, ceil, padded):
    """PR 3057's PoolingLayer::Reshape: float ceil/floor, then the padding drop rule."""
    r = (size + 2 * p - k) / float(s)
    out = int(math.ceil(r) if ceil else math.floor(r)) + 1
    if padded and (out - 1) * s >= size + p:
        out -= 1
    return out


def ref_pool(x, method, k, s, p, ceil, top_diff_fn=None):
    """Caffe's MAX (first strict maximum) / AVE (divisor clipped to the padded map) loops."""
    n, c, h, w = x.shape
    padded = p > 0
    oh, ow = pool_size(h, k, s, p, ceil, padded), pool_size(w, k, s, p, ceil, padded)
    top = np.zeros((n, c, oh, ow))
    diff = np.zeros_like(x, dtype=np.float64)
    dtop = np.ones_like(top) if top_diff_fn is None else top_diff_fn(top.shape)
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    hs, ws = i * s - p, j * s - p
                    he, we = min(hs + k, h + p), min(ws + k, w + p)
                    size = (he - hs) * (we - ws)
                    hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, h), min(we, w)
                    if method == "MAX":
                        best, arg = -np.inf, None
                        for yy in range(hs, he):
                            for xx in range(ws, we):
                                if x[a, ch, yy, xx] > best:
                                    best, arg = x[a, ch, yy, xx], (yy, xx)
                        top[a, ch, i, j] = best
                        diff[a, ch, arg[0], arg[1]] += dtop[a, ch, i, j]
                    else:
                        top[a, ch, i, j] = x[a, ch, hs:he, ws:we].sum() / size
                        diff[a, ch, hs:he, ws:we] += dtop[a, ch, i, j] / size
    return top, diff


def with_ceil_mode(path, tmp_path, value: str):
    g = np.load(str(path), allow_pickle=False)
    arrays = {k: g[k] for k in g.keys()}
    proto = str(arrays["prototxt"])
    assert "pooling_param {" in proto
    arrays["prototxt"] = np.array(proto.replace("pooling_param {", f"pooling_param {{ {value}"))
    out = tmp_path / path.name
    np.savez(str(out), **arrays)
    return out


@pytest.mark.parametrize("path", GOLDEN_POOL, ids=[p.stem for p in GOLDEN_POOL])
def test_ceil_mode_true_reproduces_the_golden_caffe_pooling(path, tmp_path):
    """ceil_mode: true is Caffe's own (default) rounding: every golden Pooling file holds."""
    check_golden(with_ceil_mode(path, tmp_path, "ceil_mode: true round_mode: CEIL"))


GEOMETRIES = [  # (H, W, kernel, stride, pad): DenseNet transitions, ResNet/DPN stems, odd maps
    (7, 7, 2, 2, 0), (9, 10, 3, 2, 1), (8, 8, 3, 3, 0), (6, 7, 2, 3, 0), (5, 5, 3, 2, 2),
    (13, 11, 3, 2, 1), (4, 6, 4, 1, 3),
]


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("geom", GEOMETRIES, ids=[str(g) for g in GEOMETRIES])
def test_ceil_mode_false_floors_like_round_mode_floor(geom, method):
    h, w, k, s, p = geom
    rng = np.random.RandomState(h * 100 + w)
    xn = rng.randn(2, 2, h, w)
    dtop_fn = lambda shape: rng.randn(*shape)  # noqa: E731
    top, diff = ref_pool(xn, method, k, s, p, False, dtop_fn)
    base = f"pool: {method} kernel_size: {k} stride: {s} pad: {p}"
    outs = []
    for extra in ("ceil_mode: false", "round_mode: FLOOR", "ceil_mode: false round_mode: FLOOR"):
        x = torch.from_numpy(xn).requires_grad_(True)
        (y,) = make(f'type: "Pooling" pooling_param {{ {base} {extra} }}', [xn.shape])(x)
        assert y.shape == top.shape
        np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-12, atol=1e-12)
        (g,) = torch.autograd.grad(y, x, torch.from_numpy(np.ascontiguousarray(
            np.random.RandomState(7).randn(*top.shape))))
        outs.append(g.numpy())
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    _, rdiff = ref_pool(xn, method, k, s, p, False,
                        lambda shape: np.random.RandomState(7).randn(*shape))
    np.testing.assert_allclose(outs[0], rdiff, rtol=1e-12, atol=1e-12)


def test_ceil_mode_sizes_differ_from_ceil_where_the_model_zoos_need_it():
    # DenseNet transition on an odd map and a ResNeXt/DPN stem: floor vs Caffe's ceil
    for text, shape, floor_hw, ceil_hw in (
            ("pool: AVE kernel_size: 2 stride: 2", (1, 1, 7, 7), (3, 3), (4, 4)),
            ("pool: MAX kernel_size: 3 stride: 2 pad: 1", (1, 1, 112, 112), (56, 56), (57, 57))):
        for mode, hw in (("false", floor_hw), ("true", ceil_hw)):
            layer = make(f'type: "Pooling" pooling_param {{ {text} ceil_mode: {mode} }}', [shape])
            assert layer.infer_top_shapes([shape])[0][2:] == hw


@pytest.mark.parametrize("method", ["MAX", "AVE"])
@pytest.mark.parametrize("mode", ["true", "false"])
def test_ceil_mode_matches_opencv(method, mode, tmp_path):
    for h, w, k, s, p in GEOMETRIES:
        if mode == "true" and k < s and p == 0:
            continue  # Caffe's windows past the input (-FLT_MAX / NaN): OpenCV differs there
        proto = ('name: "t"\n' + inputs_text(x=(1, 3, h, w)) +
                 f'layer {{ name: "p" type: "Pooling" bottom: "x" top: "y" pooling_param {{ '
                 f'pool: {method} kernel_size: {k} stride: {s} pad: {p} ceil_mode: {mode} }} }}\n')
        x = torch.randn(1, 3, h, w)
        y = Net(proto, phase="test").forward(x=x)["y"].numpy()
        ref = opencv(proto, {"x": x.numpy()}, tmp_path)
        assert y.shape == ref.shape, (h, w, k, s, p)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_ceil_mode_and_round_mode_must_agree():
    shape = [(1, 1, 7, 7)]
    for both in ("ceil_mode: false round_mode: CEIL", "ceil_mode: true round_mode: FLOOR"):
        with pytest.raises(SchemaError, match="contradicts round_mode"):
            make(f'type: "Pooling" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 {both} }}',
                 shape)
    for both, ceil in (("ceil_mode: true round_mode: CEIL", True),
                       ("ceil_mode: false round_mode: FLOOR", False), ("", True)):
        layer = make(f'type: "Pooling" pooling_param {{ pool: MAX kernel_size: 2 stride: 2 '
                     f'{both} }}', shape)
        assert layer.ceil is ceil


# ============================================================================ depthwise conv
def ref_conv_dw(x, wgt, bias, k, s, p, d):
    """farmingyard/caffe-mobilenet conv_dw_layer.cpp: forward and the three backward loops."""
    n, c, h, w = x.shape
    oh = (h + 2 * p - (d * (k - 1) + 1)) // s + 1
    ow = (w + 2 * p - (d * (k - 1) + 1)) // s + 1
    top = np.zeros((n, c, oh, ow))
    rng = np.random.RandomState(3)
    dtop = rng.randn(n, c, oh, ow)
    dx, dw, db = np.zeros_like(x), np.zeros_like(wgt), np.zeros(c)
    for a in range(n):
        for ch in range(c):
            for i in range(oh):
                for j in range(ow):
                    v = 0.0
                    for kh in range(k):
                        for kw in range(k):
                            hi, wi = -p + i * s + kh * d, -p + j * s + kw * d
                            if 0 <= hi < h and 0 <= wi < w:
                                v += wgt[ch, 0, kh, kw] * x[a, ch, hi, wi]
                                dw[ch, 0, kh, kw] += x[a, ch, hi, wi] * dtop[a, ch, i, j]
                                dx[a, ch, hi, wi] += wgt[ch, 0, kh, kw] * dtop[a, ch, i, j]
                    top[a, ch, i, j] = v + (bias[ch] if bias is not None else 0.0)
                    db[ch] += dtop[a, ch, i, j]
    return top, dtop, dx, dw, db


@pytest.mark.parametrize("k,s,p,d,bias", [(3, 1, 1, 1, True), (3, 2, 1, 1, True),
                                          (3, 2, 2, 2, False), (5, 1, 0, 1, True)])
def test_convolution_depthwise_against_the_forks_loops(k, s, p, d, bias):
    c = 3
    text = (f'type: "ConvolutionDepthwise" convolution_param {{ num_output: {c} kernel_size: {k} '
            f'stride: {s} pad: {p} dilation: {d} bias_term: {str(bias).lower()} '
            f'weight_filler {{ type: "gaussian" std: 1 }} '
            f'bias_filler {{ type: "gaussian" std: 1 }} }}')
    layer = make(text, [(2, c, 7, 6)]).double()
    assert tuple(layer.weight.shape) == (c, 1, k, k)
    assert (layer.bias is not None) == bias
    xn = np.random.RandomState(1).randn(2, c, 7, 6)
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = layer(x)
    bn = layer.bias.detach().numpy() if bias else None
    top, dtop, dx, dw, db = ref_conv_dw(xn, layer.weight.detach().numpy(), bn, k, s, p, d)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-10, atol=1e-10)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, torch.from_numpy(dtop))
    np.testing.assert_allclose(grads[0].numpy(), dx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(grads[1].numpy(), dw, rtol=1e-10, atol=1e-10)
    if bias:
        np.testing.assert_allclose(grads[2].numpy(), db, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("extra", ["", "dilation: 2", "bias_term: false", "kernel_h: 3 kernel_w: 1 "
                                   "pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1"])
def test_convolution_depthwise_matches_opencv(extra, tmp_path):
    geo = "" if "kernel_h" in extra else "kernel_size: 3 stride: 2 pad: 1"
    proto = ('name: "t"\n' + inputs_text(x=(2, 4, 9, 8)) +
             'layer { name: "dw" type: "ConvolutionDepthwise" bottom: "x" top: "y" '
             f'convolution_param {{ num_output: 4 {geo} {extra} '
             'weight_filler { type: "gaussian" std: 1 } '
             'bias_filler { type: "gaussian" std: 1 } } }\n')
    net = Net(proto, phase="test")
    x = torch.randn(2, 4, 9, 8)
    y = net.forward(x=x)["y"].detach().numpy()
    model = tmp_path / "dw.caffemodel"
    net.save_weights(str(model))
    np.testing.assert_allclose(y, opencv(proto, {"x": x.numpy()}, tmp_path, model),
                               rtol=1e-5, atol=1e-5)


def test_convolution_depthwise_ignores_num_output_and_group_like_the_fork():
    c = 4
    dw = make('type: "ConvolutionDepthwise" convolution_param { num_output: 6 group: 1 '
              'kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 1 } }', [(1, c, 5, 5)])
    assert tuple(dw.weight.shape) == (c, 1, 3, 3) and tuple(dw.bias.shape) == (c,)
    assert dw.infer_top_shapes([(1, c, 5, 5)]) == [(1, c, 5, 5)]
    assert any("num_output 6 is ignored" in m for m in dw.lint([None]))
    grouped = make(f'type: "Convolution" convolution_param {{ num_output: {c} group: {c} '
                   'kernel_size: 3 pad: 1 }', [(1, c, 5, 5)])
    with torch.no_grad():
        grouped.weight.copy_(dw.weight)
        grouped.bias.copy_(dw.bias)
    x = torch.randn(1, c, 5, 5)
    torch.testing.assert_close(dw(x)[0], grouped(x)[0], rtol=0, atol=0)
    assert make(f'type: "ConvolutionDepthwise" convolution_param {{ num_output: {c} '
                'kernel_size: 3 }', [(1, c, 5, 5)]).lint([None]) == []


def test_convolution_depthwise_errors():
    with pytest.raises(SchemaError, match="axis 1"):
        make('type: "ConvolutionDepthwise" convolution_param { kernel_size: 3 axis: 2 }',
             [(1, 2, 5, 5)])
    with pytest.raises(GraphError, match="4-D"):
        make('type: "ConvolutionDepthwise" convolution_param { kernel_size: 3 }', [(1, 2, 5)])
    with pytest.raises(GraphError):
        make('type: "ConvolutionDepthwise" convolution_param { kernel_size: 3 }',
             [(1, 2, 5, 5), (1, 2, 5, 5)], tops=("a", "b"))


def test_depthwise_convolution_is_the_grouped_convolution(tmp_path):
    """yonghenglh6's type keeps Convolution's blobs and group; OpenCV reads the same net as
    a plain grouped Convolution."""
    body = ('convolution_param { num_output: 6 group: 3 kernel_size: 3 stride: 2 pad: 1 '
            'weight_filler { type: "gaussian" std: 1 } bias_filler { type: "gaussian" std: 1 } }')
    proto = 'name: "t"\n' + inputs_text(x=(2, 3, 8, 7)) + \
        f'layer {{ name: "c" type: "DepthwiseConvolution" bottom: "x" top: "y" {body} }}\n'
    net = Net(proto, phase="test")
    layer = net.layer("c")
    assert tuple(layer.weight.shape) == (6, 1, 3, 3) and layer.group == 3
    x = torch.randn(2, 3, 8, 7, requires_grad=True)
    y = net.forward(x=x)["y"]
    model = tmp_path / "c.caffemodel"
    net.save_weights(str(model))
    ref = opencv(proto.replace('"DepthwiseConvolution"', '"Convolution"'),
                 {"x": x.detach().numpy()}, tmp_path, model)
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-5, atol=1e-5)
    conv = make(f'type: "Convolution" {body}', [(2, 3, 8, 7)])
    with torch.no_grad():
        conv.weight.copy_(layer.weight)
        conv.bias.copy_(layer.bias)
    g1 = torch.autograd.grad(y.sum(), [x, layer.weight])
    g2 = torch.autograd.grad(conv(x)[0].sum(), [x, conv.weight])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # group != channels or num_output != channels: the fork's GPU kernel would differ
    assert layer.lint([None]) and "GPU kernel" in layer.lint([None])[0]
    dw = make('type: "DepthwiseConvolution" convolution_param { num_output: 3 group: 3 '
              'kernel_size: 3 }', [(1, 3, 5, 5)])
    assert dw.lint([None]) == []


# ============================================================================ ReLU6
def ref_relu6(x, ns):
    """relu6_layer.cpp: forward with std::max/std::min, backward factor."""
    x = x.astype(np.float64)
    top = np.minimum(np.maximum(x, 0) + ns * np.minimum(x, 0), 6.0)
    factor = ((x > 0) + ns * (x <= 0)) * (x < 6.0)
    return top, factor


RELU6_X = np.array([-7.0, -3.0, -1e-3, -0.0, 0.0, 1e-3, 2.5, 5.999, 6.0, 6.001, 9.0, 13.0])


@pytest.mark.parametrize("ns", [0.0, 0.1, -2.0])
def test_relu6_forward_backward(ns):
    layer = make(f'type: "ReLU6" relu6_param {{ negative_slope: {ns} }}', [(1, RELU6_X.size)])
    x = torch.tensor(RELU6_X).view(1, -1).requires_grad_(True)
    (y,) = layer(x)
    ns = float(f32(ns))  # relu6_param.negative_slope is a float in the schema
    top, factor = ref_relu6(RELU6_X, ns)
    np.testing.assert_array_equal(y.detach().numpy().ravel(), top)
    dtop = torch.linspace(0.5, 2.0, RELU6_X.size, dtype=torch.float64).view(1, -1)
    (g,) = torch.autograd.grad(y, x, dtop)
    np.testing.assert_array_equal(g.numpy().ravel(), dtop.numpy().ravel() * factor)
    # exactly 0: the slope; exactly 6: nothing
    assert g[0, 4] == dtop[0, 4] * ns and g[0, 8] == 0
    if ns == -2.0:  # -7 * -2 = 14 is capped at 6, but the fork's backward still gives the slope
        assert y[0, 0] == 6.0 and g[0, 0] == dtop[0, 0] * ns


def test_relu6_in_place_uses_the_top_like_the_fork():
    """In place, the fork's backward reads the top: a negative slope flips its sign test."""
    proto = ('name: "t" force_backward: true\n' + inputs_text(x=(1, RELU6_X.size)) +
             'layer { name: "r" type: "ReLU6" bottom: "x" top: "x" '
             'relu6_param { negative_slope: -0.5 } }\n')
    net = Net(proto, phase="test")
    x = torch.tensor(RELU6_X, dtype=torch.float32).view(1, -1).requires_grad_(True)
    y = net.forward(x=x)["x"]
    (g,) = torch.autograd.grad(y.sum(), x)
    top, _ = ref_relu6(RELU6_X, -0.5)
    _, factor_on_top = ref_relu6(top, -0.5)  # bottom_data is the top in place
    np.testing.assert_allclose(g.numpy().ravel(), factor_on_top, rtol=0, atol=0)


def test_relu6_matches_opencv(tmp_path):
    proto = 'name: "t"\n' + inputs_text(x=(2, 3, 4, 5)) + \
        'layer { name: "r" type: "ReLU6" bottom: "x" top: "y" }\n'
    x = torch.randn(2, 3, 4, 5) * 5
    x[0, 0, 0, :2] = torch.tensor([0.0, 6.0])
    np.testing.assert_array_equal(Net(proto).forward(x=x)["y"].numpy(),
                                  opencv(proto, {"x": x.numpy()}, tmp_path))


# ============================================================================ ShuffleChannel
def ref_shuffle(x, group, backward=False):
    """Resize_cpu(out, in, group_row, group_column, len) per sample; backward swaps the grid."""
    n, c = x.shape[:2]
    length = int(np.prod(x.shape[2:]))
    rows, cols = (c // group, group) if backward else (group, c // group)
    src = x.reshape(n, c, length)
    out = np.zeros_like(src)
    for a in range(n):
        for i in range(rows):
            for j in range(cols):
                out[a, j * rows + i] = src[a, i * cols + j]
    return out


@pytest.mark.parametrize("shape,group", [((2, 6, 3, 4), 3), ((2, 6, 3, 4), 2), ((1, 12, 2, 2), 4),
                                         ((3, 6), 3), ((2, 6, 5), 2), ((2, 5, 2, 2), 1)])
def test_shuffle_channel_forward_backward(shape, group):
    layer = make(f'type: "ShuffleChannel" shuffle_channel_param {{ group: {group} }}', [shape])
    xn = np.random.RandomState(0).randn(*shape)
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = layer(x)
    legacy = tuple(shape) + (1,) * (4 - len(shape))
    assert tuple(y.shape) == legacy == layer.infer_top_shapes([shape])[0]
    np.testing.assert_array_equal(y.detach().numpy().reshape(shape[0], shape[1], -1),
                                  ref_shuffle(xn, group))
    dtop = np.random.RandomState(1).randn(*legacy)
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(dtop))
    np.testing.assert_array_equal(g.numpy().reshape(shape[0], shape[1], -1),
                                  ref_shuffle(dtop, group, backward=True))


def test_shuffle_channel_matches_opencv(tmp_path):
    proto = 'name: "t"\n' + inputs_text(x=(2, 12, 3, 4)) + \
        'layer { name: "s" type: "ShuffleChannel" bottom: "x" top: "y" ' \
        'shuffle_channel_param { group: 3 } }\n'
    x = torch.randn(2, 12, 3, 4)
    np.testing.assert_array_equal(Net(proto).forward(x=x)["y"].numpy(),
                                  opencv(proto, {"x": x.numpy()}, tmp_path))


def test_shuffle_channel_errors():
    with pytest.raises(ShapeError, match="cannot be split"):
        make('type: "ShuffleChannel" shuffle_channel_param { group: 4 }', [(1, 6, 2, 2)])
    with pytest.raises(SchemaError, match="group must be > 0"):
        make('type: "ShuffleChannel" shuffle_channel_param { group: 0 }', [(1, 6, 2, 2)])
    with pytest.raises(ShapeError, match="2 to 4 axes"):
        make('type: "ShuffleChannel" shuffle_channel_param { group: 2 }', [(1, 6, 2, 2, 2)])
    layer = make('type: "ShuffleChannel" shuffle_channel_param { group: 2 }', [(1, 6, 2, 2)])
    with pytest.raises(ShapeError):
        layer(torch.zeros(1, 5, 2, 2))


# ============================================================================ Axpy
def ref_axpy(a, x, y, dtop):
    """axpy_layer.cpp: top = y, then axpy per (n, c); backward: x_diff = dtop * x summed
    over space for a, a * dtop for x, dtop for y."""
    n, c = x.shape[:2]
    sp = int(np.prod(x.shape[2:]))
    av = a.reshape(n * c)
    xv, yv, dv = x.reshape(n * c, sp), y.reshape(n * c, sp), dtop.reshape(n * c, sp)
    top = yv.copy()
    da, dx = np.zeros(n * c), np.zeros_like(xv)
    for o in range(n * c):
        top[o] += av[o] * xv[o]
        da[o] = np.dot(dv[o] * xv[o], np.ones(sp))
        dx[o] = av[o] * dv[o]
    return top.reshape(x.shape), da.reshape(a.shape), dx.reshape(x.shape), dtop.copy()


@pytest.mark.parametrize("ashape,xshape", [((2, 3, 1, 1), (2, 3, 4, 5)), ((2, 3), (2, 3, 4, 5)),
                                           ((2, 3), (2, 3)), ((1, 4, 1, 1), (1, 4, 6))])
def test_axpy_forward_backward(ashape, xshape):
    rng = np.random.RandomState(0)
    an, xn, yn, dn = rng.randn(*ashape), rng.randn(*xshape), rng.randn(*xshape), rng.randn(*xshape)
    layer = make('type: "Axpy"', [ashape, xshape, xshape])
    a, x, y = (torch.from_numpy(v).requires_grad_(True) for v in (an, xn, yn))
    (top,) = layer(a, x, y)
    rtop, da, dx, dy = ref_axpy(an, xn, yn, dn)
    np.testing.assert_allclose(top.detach().numpy(), rtop, rtol=1e-12, atol=1e-12)
    ga, gx, gy = torch.autograd.grad(top, [a, x, y], torch.from_numpy(dn))
    np.testing.assert_allclose(ga.numpy(), da, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(gx.numpy(), dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(gy.numpy(), dy)


def test_axpy_matches_opencv_with_its_bottom_order(tmp_path):
    """OpenCV's importer builds Axpy as Scale(bottom 2, bottom 0) + bottom 1, i.e. it takes
    the fork's x and y the other way round: fed swapped, it must give our a * x + y."""
    body = inputs_text(a=(1, 3, 1, 1), x=(1, 3, 4, 5), z=(1, 3, 4, 5))
    ours = 'name: "t"\n' + body + 'layer { name: "s" type: "Axpy" bottom: "a" bottom: "x" ' \
        'bottom: "z" top: "y" }\n'
    theirs = ours.replace('bottom: "x" bottom: "z"', 'bottom: "z" bottom: "x"')
    a, x, z = torch.randn(1, 3, 1, 1), torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)
    y = Net(ours).forward(a=a, x=x, z=z)["y"].numpy()
    ref = opencv(theirs, {"a": a.numpy(), "x": x.numpy(), "z": z.numpy()}, tmp_path)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert not np.allclose(y, opencv(ours, {"a": a.numpy(), "x": x.numpy(), "z": z.numpy()},
                                     tmp_path), atol=1e-3)


def test_axpy_errors():
    with pytest.raises(ShapeError, match="batch and channels"):
        make('type: "Axpy"', [(2, 4, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5)])
    with pytest.raises(ShapeError, match="1, 1"):
        make('type: "Axpy"', [(2, 3, 2, 1), (2, 3, 4, 5), (2, 3, 4, 5)])
    with pytest.raises(ShapeError, match="same shape"):
        make('type: "Axpy"', [(2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 5, 4)])
    with pytest.raises(ShapeError, match="one value per"):
        make('type: "Axpy"', [(2, 3, 2), (2, 3, 4, 5), (2, 3, 4, 5)])
    with pytest.raises(GraphError, match="in place"):
        make('type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "x"',
             [(2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5)])
    make('type: "Axpy" bottom: "a" bottom: "x" bottom: "y" top: "y"',
         [(2, 3, 1, 1), (2, 3, 4, 5), (2, 3, 4, 5)])  # in place on y is the residual form


# ============================================================================ PSROIPooling
def fork_edge(p, size, start, fma):
    """``p * size + start`` in float: one rounding (CUDA FMA) or two."""
    if fma:
        return f32(float(Fraction(p) * Fraction(float(size)) + Fraction(float(start))))
    return f32(f32(f32(p) * size) + start)


def ref_psroi(x, rois, scale, out_dim, group, dtop, fma=True):
    """PSROIPoolingForward / PSROIPoolingBackwardAtomic, one thread per output, float32."""
    n_, c_, h_, w_ = x.shape
    r_ = len(rois)
    top = np.zeros((r_, out_dim, group, group), np.float32)
    dx = np.zeros(x.shape, np.float64)
    s = f32(scale)
    for n in range(r_):
        roi = rois[n].astype(np.float32)
        b = int(roi[0])
        sw, sh = f32(c_round(roi[1])) * s, f32(c_round(roi[2])) * s
        ew, eh = f32(c_round(roi[3]) + 1.0) * s, f32(c_round(roi[4]) + 1.0) * s
        rw = ew - sw if float(ew - sw) >= 0.1 else f32(0.1)
        rh = eh - sh if float(eh - sh) >= 0.1 else f32(0.1)
        bh, bw = rh / f32(group), rw / f32(group)
        for ct in range(out_dim):
            for ph in range(group):
                for pw in range(group):
                    hs = min(max(math.floor(fork_edge(ph, bh, sh, fma)), 0), h_)
                    he = min(max(math.ceil(fork_edge(ph + 1, bh, sh, fma)), 0), h_)
                    ws = min(max(math.floor(fork_edge(pw, bw, sw, fma)), 0), w_)
                    we = min(max(math.ceil(fork_edge(pw + 1, bw, sw, fma)), 0), w_)
                    empty = he <= hs or we <= ws
                    c = (ct * group + ph) * group + pw
                    acc = f32(0)
                    for hh in range(hs, he):
                        for ww in range(ws, we):
                            acc = f32(acc + x[b, c, hh, ww])
                    area = f32((he - hs) * (we - ws))
                    top[n, ct, ph, pw] = 0.0 if empty else acc / area
                    if not empty:
                        dx[b, c, hs:he, ws:we] += f32(dtop[n, ct, ph, pw]) / area
    return top, dx


PS_ROIS = np.array([
    [0, 3, 4, 17, 15],        # inside
    [1, 0, 0, 23, 19],        # the whole map, batch 1
    [1, 8.5, 2.5, 9.4, 3.4],  # C round half away from zero (8.5 -> 9), tiny ROI
    [0, -10, -10, 40, 40],    # larger than the map: clipped bins
    [1, 30, 30, 50, 50],      # outside the map: every bin empty -> 0
    [0, 12, 10, 4, 2],        # reversed: size forced to 0.1
    [0, -2.5, 5, -0.5, 9],    # round(-2.5) = -3, left of the map
    [1.9, 5, 5, 5, 5],        # one pixel; batch index truncated (1.9 -> 1)
], dtype=np.float32)


def psroi_layer(scale, out_dim, group, feat, n_rois):
    return make(f'type: "PSROIPooling" psroi_pooling_param {{ spatial_scale: {scale} '
                f'output_dim: {out_dim} group_size: {group} }}', [feat, (n_rois, 5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale,out_dim,group", [(0.5, 2, 3), (0.0625 * 8, 1, 2), (1.0, 2, 4)])
def test_psroi_pooling_against_the_kernel(scale, out_dim, group, dtype):
    feat = (2, out_dim * group * group, 10, 12)
    rng = np.random.RandomState(0)
    xn = rng.randn(*feat).astype(np.float32)
    dtop = rng.randn(len(PS_ROIS), out_dim, group, group).astype(np.float32)
    layer = psroi_layer(scale, out_dim, group, feat, len(PS_ROIS))
    x = torch.from_numpy(xn).to(dtype).requires_grad_(True)
    (y,) = layer(x, torch.from_numpy(PS_ROIS).to(dtype))
    assert y.dtype == dtype
    assert tuple(y.shape) == layer.infer_top_shapes([feat, PS_ROIS.shape])[0]
    top, dx = ref_psroi(xn, PS_ROIS, scale, out_dim, group, dtop)
    np.testing.assert_allclose(y.detach().double().numpy(), top, rtol=1e-5, atol=1e-6)
    assert (y[4] == 0).all()  # outside the map: all bins empty
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(dtop).to(dtype))
    np.testing.assert_allclose(g.double().numpy(), dx, rtol=1e-5, atol=1e-6)
    assert g[1, :, :, :].abs().sum() > 0 and g.abs().sum() > 0


def test_psroi_pooling_bin_edges_are_the_fused_multiply_add():
    """scale 0.1, group 3, ROI [2, 9]: the last bin ends at 3 * 0.7/3 + 0.2, exactly 1.0
    fused and 1.0000001 unfused; ceil gives 1 vs 2 rows."""
    feat = (1, 9, 4, 4)
    rois = np.array([[0, 2, 2, 9, 9]], np.float32)
    xn = np.random.RandomState(2).randn(*feat).astype(np.float32)
    dtop = np.ones((1, 1, 3, 3), np.float32)
    fused, dfused = ref_psroi(xn, rois, 0.1, 1, 3, dtop, fma=True)
    plain, _ = ref_psroi(xn, rois, 0.1, 1, 3, dtop, fma=False)
    assert not np.allclose(fused, plain)  # the rounding is observable here
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = psroi_layer(0.1, 1, 3, feat, 1)(x, torch.from_numpy(rois))
    np.testing.assert_allclose(y.detach().numpy(), fused, rtol=1e-6, atol=1e-7)
    (g,) = torch.autograd.grad(y.sum(), x)
    np.testing.assert_allclose(g.numpy(), dfused, rtol=1e-6, atol=1e-7)


def test_psroi_pooling_non_finite_stays_in_its_bins():
    feat = (1, 4, 6, 6)
    xn = np.random.RandomState(3).randn(*feat).astype(np.float32)
    xn[0, 0, 1, 1] = np.nan
    xn[0, 3, 4, 4] = np.inf
    xn[0, 3, 4, 5] = -np.inf
    xn[0, 1, 0, 5] = np.inf
    rois = np.array([[0, 0, 0, 5, 5], [0, 2, 2, 5, 5]], np.float32)
    (y,) = psroi_layer(1.0, 1, 2, feat, 2)(torch.from_numpy(xn), torch.from_numpy(rois))
    with np.errstate(invalid="ignore"):  # inf + -inf in the reference's float sum
        top, _ = ref_psroi(xn, rois, 1.0, 1, 2, np.zeros((2, 1, 2, 2), np.float32))
    np.testing.assert_array_equal(np.isnan(y.numpy()), np.isnan(top))
    np.testing.assert_array_equal(np.isposinf(y.numpy()), np.isposinf(top))
    fin = np.isfinite(top)
    assert (~fin).sum() >= 3 and fin.sum() >= 3
    np.testing.assert_allclose(y.numpy()[fin], top[fin], rtol=1e-5, atol=1e-6)


def test_psroi_pooling_matches_opencv(tmp_path):
    out_dim, group = 2, 3
    # OpenCV sizes reversed ROIs differently and rounds negative halves up (-2.5 -> -2; the
    # fork's C round gives -3), so the ROI left of the map differs: compare the others
    rois = PS_ROIS[[0, 1, 2, 3, 4, 7]]
    proto = ('name: "t"\n' + inputs_text(x=(2, out_dim * group * group, 10, 12),
                                          rois=(len(rois), 5)) +
             f'layer {{ name: "p" type: "PSROIPooling" bottom: "x" bottom: "rois" top: "y" '
             f'psroi_pooling_param {{ spatial_scale: 0.5 output_dim: {out_dim} '
             f'group_size: {group} }} }}\n')
    x = torch.randn(2, out_dim * group * group, 10, 12)
    y = Net(proto, phase="test").forward(x=x, rois=torch.from_numpy(rois))["y"].numpy()
    ref = opencv(proto, {"x": x.numpy(), "rois": rois}, tmp_path)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)


def test_psroi_pooling_errors():
    with pytest.raises(ShapeError, match="needs 18"):
        psroi_layer(0.5, 2, 3, (1, 17, 5, 5), 3)
    with pytest.raises(SchemaError, match="must be > 0"):
        psroi_layer(0.5, 0, 3, (1, 0, 5, 5), 3)
    with pytest.raises(SchemaError, match="required"):
        make('type: "PSROIPooling" psroi_pooling_param { output_dim: 1 group_size: 1 }',
             [(1, 1, 4, 4), (2, 5)])
    layer = psroi_layer(0.5, 1, 2, (2, 4, 5, 5), 1)
    with pytest.raises(ShapeError, match="batch index"):
        layer(torch.zeros(2, 4, 5, 5), torch.tensor([[2.0, 0, 0, 3, 3]]))
    with pytest.raises(ShapeError, match="5 values"):
        psroi_layer(0.5, 1, 2, (2, 4, 5, 5), 1).infer_top_shapes([(2, 4, 5, 5), (3, 4)])
    (y,) = layer(torch.zeros(2, 4, 5, 5), torch.zeros(0, 5))  # no ROIs
    assert tuple(y.shape) == (0, 1, 2, 2)


@pytest.mark.gpu
def test_psroi_fused_edges_match_cuda():
    """Compile the kernel's ``p * bin + start`` with NVRTC (nvcc's default --fmad=true) and
    check that _fused_edge rounds as the GPU does."""
    from torch.cuda import jiterator

    fn = jiterator._create_jit_fn(
        "template <typename T> T edge(T p, T b, T s) { return p * b + s; }")
    rng = np.random.RandomState(0)
    p = torch.from_numpy(rng.randint(0, 8, 200000).astype(np.float32))
    b = torch.from_numpy((rng.rand(200000) * 5).astype(np.float32))
    s = torch.from_numpy((rng.rand(200000) * 60 - 5).astype(np.float32))
    gpu = fn(p.cuda(), b.cuda(), s.cuda()).cpu()
    torch.testing.assert_close(psroi_mod._fused_edge(p, b, s, torch.float32), gpu, rtol=0, atol=0)


# ============================================================================ ROIAlign
def bilinear(data, h, w, y, x):
    """bilinear_interpolate(_gradient): value and the four (row, col, weight) taps."""
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return f32(0), []
    y, x = (f32(0) if y <= 0 else y), (f32(0) if x <= 0 else x)
    yl, xl = int(y), int(x)
    if yl >= h - 1:
        yh = yl = h - 1
        y = f32(yl)
    else:
        yh = yl + 1
    if xl >= w - 1:
        xh = xl = w - 1
        x = f32(xl)
    else:
        xh = xl + 1
    ly, lx = f32(y - f32(yl)), f32(x - f32(xl))
    hy, hx = f32(f32(1) - ly), f32(f32(1) - lx)
    taps = [(yl, xl, hy * hx), (yl, xh, hy * lx), (yh, xl, ly * hx), (yh, xh, ly * lx)]
    val = f32(0)
    for yy, xx, wt in taps:
        val = f32(val + wt * data[yy, xx])
    return val, taps


def ref_roi_align(x, rois, ph_n, pw_n, scale, ratio, dtop):
    """ROIAlignForward / ROIAlignBackward of the fork's .cu (Detectron's), in float32."""
    n_, c_, h_, w_ = x.shape
    top = np.zeros((len(rois), c_, ph_n, pw_n), np.float32)
    dx = np.zeros(x.shape, np.float64)
    s = f32(scale)
    for n, roi in enumerate(rois.astype(np.float32)):
        b = int(roi[0])
        sw, sh, ew, eh = roi[1] * s, roi[2] * s, roi[3] * s, roi[4] * s
        rw, rh = max(ew - sw, f32(1)), max(eh - sh, f32(1))
        bh, bw = rh / f32(ph_n), rw / f32(pw_n)
        gh = ratio if ratio > 0 else int(math.ceil(rh / f32(ph_n)))
        gw = ratio if ratio > 0 else int(math.ceil(rw / f32(pw_n)))
        count = f32(gh * gw)
        for c in range(c_):
            for ph in range(ph_n):
                for pw in range(pw_n):
                    acc = f32(0)
                    for iy in range(gh):
                        yy = f32(f32(sh + f32(ph) * bh) + f32(f32(iy + 0.5) * bh) / f32(gh))
                        for ix in range(gw):
                            xx = f32(f32(sw + f32(pw) * bw) + f32(f32(ix + 0.5) * bw) / f32(gw))
                            val, taps = bilinear(x[b, c], h_, w_, yy, xx)
                            acc = f32(acc + val)
                            for r_, c2, wt in taps:
                                dx[b, c, r_, c2] += f32(dtop[n, c, ph, pw]) * wt / count
                    top[n, c, ph, pw] = acc / count
    return top, dx


AL_ROIS = np.array([
    [0, 3.3, 4.1, 17.8, 15.2],   # inside, fractional
    [1, 0, 0, 23, 19],           # the whole map, batch 1
    [1, 8.2, 2.6, 8.9, 3.1],     # smaller than a cell: size forced to 1
    [0, -10, -10, 40, 40],       # larger than the map: outer samples are 0
    [1, 50, 50, 60, 60],         # outside the map: all 0
    [0, 22.5, 18.5, 26, 22],     # straddles the bottom-right border (row H-1 clamp)
    [0, 12, 10, 4, 2],           # reversed: size forced to 1
    [1.7, 5.5, 6.5, 9.5, 8.5],   # batch index truncated (1.7 -> 1)
], dtype=np.float32)


def roi_align_layer(scale, ph, pw, ratio, feat, n_rois):
    return make(f'type: "ROIAlign" roi_align_param {{ pooled_h: {ph} pooled_w: {pw} '
                f'spatial_scale: {scale} sampling_ratio: {ratio} }}', [feat, (n_rois, 5)])


@pytest.mark.parametrize("backend", ["torchvision", "torch"])
@pytest.mark.parametrize("scale,ph,pw,ratio", [(0.5, 3, 2, 0), (0.5, 2, 3, 2), (0.1, 2, 2, 0),
                                               (1.0, 3, 3, 1)])
def test_roi_align_against_the_kernel(scale, ph, pw, ratio, backend, monkeypatch):
    monkeypatch.setattr(roi_align_mod, "ROI_ALIGN_BACKEND", backend)
    feat = (2, 2, 10, 12)
    rng = np.random.RandomState(0)
    xn = rng.randn(*feat).astype(np.float32)
    dtop = rng.randn(len(AL_ROIS), 2, ph, pw).astype(np.float32)
    layer = roi_align_layer(scale, ph, pw, ratio, feat, len(AL_ROIS))
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = layer(x, torch.from_numpy(AL_ROIS))
    assert tuple(y.shape) == layer.infer_top_shapes([feat, AL_ROIS.shape])[0]
    top, dx = ref_roi_align(xn, AL_ROIS, ph, pw, scale, ratio, dtop)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-5, atol=1e-6)
    if scale >= 0.5:
        assert (y[4] == 0).all()  # every sample past the map
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(dtop))
    np.testing.assert_allclose(g.numpy(), dx, rtol=1e-5, atol=1e-6)


def test_roi_align_torch_backend_matches_torchvision():
    import torchvision as tv

    torch.manual_seed(0)
    x = torch.randn(2, 5, 13, 17, dtype=torch.float64, requires_grad=True)
    rois = torch.tensor(AL_ROIS, dtype=torch.float64)
    for ratio in (0, 1, 3):
        ours = roi_align_mod.roi_align(x, rois, 4, 3, 0.5, ratio, backend="torch")
        ref = tv.ops.roi_align(x, rois, (4, 3), 0.5, ratio, aligned=False)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        w = torch.randn_like(ref)
        torch.testing.assert_close(torch.autograd.grad((ours * w).sum(), x)[0],
                                   torch.autograd.grad((ref * w).sum(), x)[0],
                                   rtol=1e-12, atol=1e-12)


def test_roi_align_param_is_the_forks():
    # sampling_ratio is a float in the fork's schema; the kernel takes it as an int
    layer = roi_align_layer(0.0625, 7, 7, 2.9, (1, 4, 8, 8), 3)
    assert layer.sampling_ratio == 2
    assert roi_align_layer(0.0625, 7, 7, -1, (1, 4, 8, 8), 3).sampling_ratio == -1
    lp = text_format.Parse('name: "a" type: "ROIAlign" roi_align_param { pooled_h: 7 pooled_w: 7 '
                           'spatial_scale: 0.0625 sampling_ratio: 2 }', caffe_pb2.LayerParameter())
    raw = forks.as_written(lp).SerializeToString()
    tag = (8266713 << 3) | 2  # the fork's field number for roi_align_param
    enc = bytearray()
    while True:
        enc.append((tag & 0x7F) | (0x80 if tag > 0x7F else 0))
        tag >>= 7
        if not tag:
            break
    assert bytes(enc) in raw
    back, skipped = forks.decode_layer(raw, "ROIAlign")
    assert not skipped and back.roi_align_param == lp.roi_align_param


def test_roi_align_in_a_net_and_errors():
    proto = ('name: "t"\n' + inputs_text(x=(1, 3, 8, 8), rois=(2, 5)) +
             'layer { name: "a" type: "ROIAlign" bottom: "x" bottom: "rois" top: "y" '
             'roi_align_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 } }\n')
    net = Net(proto, phase="test")
    y = net.forward(x=torch.randn(1, 3, 8, 8),
                    rois=torch.tensor([[0.0, 0, 0, 7, 7], [0, 2, 2, 9, 9]]))["y"]
    assert tuple(y.shape) == (2, 3, 2, 2)
    with pytest.raises(SchemaError, match="pooled_h and pooled_w"):
        roi_align_layer(0.5, 0, 2, 0, (1, 3, 8, 8), 2)
    layer = roi_align_layer(0.5, 2, 2, 0, (1, 3, 8, 8), 1)
    with pytest.raises(ShapeError, match="batch index"):
        layer(torch.zeros(1, 3, 8, 8), torch.tensor([[1.0, 0, 0, 3, 3]]))
    with pytest.raises(ShapeError, match="5 values"):
        roi_align_layer(0.5, 2, 2, 0, (1, 3, 8, 8), 1).infer_top_shapes([(1, 3, 8, 8), (2, 4)])
