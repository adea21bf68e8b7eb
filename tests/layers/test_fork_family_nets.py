"""Whole small nets of each fork family, end to end: prototxt -> seeded weights -> caffemodel ->
a fresh Net loaded from that caffemodel -> every blob compared with an independent tool.

The nets are our own, written here in each family's style (none is copied from a fork or a
model zoo).  References:
- OpenCV dnn (cv2.dnn.readNetFromCaffe on the same prototxt and caffemodel; fusion and
  Winograd off so that every layer's own output exists and is exact) for every blob of the
  families it reads: ShuffleNet v1/v2, MobileNet v1/v2, DenseNet, R-FCN's head, PSPNet's
  pyramid without its BN, YOLOv3-tiny with Upsample rewritten as the equivalent
  depthwise all-ones Deconvolution, SE-ResNet with Axpy's last two bottoms swapped and one
  image (OpenCV's Axpy reads them the other way round, and fails on a batch of 2);
  OpenCV's fused default configuration for the final outputs as well.
- Plain torch (functional ops on the weights read straight from the caffemodel with
  protobuf, not through caffe_compat.weights) where OpenCV lacks the layers: SE-ResNet
  (Axpy as the SENet fork's a * x + y), ENet/SegNet (BN INFERENCE, PReLU, MAX pooling's
  mask top, the 2-bottom Upsample, Deconvolution), PSPNet (its frozen 4-blob BN, Interp),
  YOLOv3-tiny (the 1-bottom nearest Upsample); these also check the gradients.
- Every family: backward runs with a loss_weight on an output; every learnable parameter
  gets a finite, non-zero gradient.
- 0-axis blobs (ENet's shared PReLU slope and kin): read in Caffe's shape; written in it.

Blob comparison: for every layer, each of its tops against the same layer's output in the
other tool (in-place tops: the last layer that wrote the blob), within 1e-5 relative to the
blob's scale (``|ours - ref| <= 1e-5 * (|ref| + max|ref|)``).
"""
from __future__ import annotations

import pathlib
from typing import Dict, List, Sequence, Tuple

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from google.protobuf import text_format

from caffe_compat import Net
from caffe_compat.protos import caffe_pb2

RTOL = 1e-5


# ============================================================================ prototxt pieces
def _io(bottoms: Sequence[str], tops: Sequence[str]) -> str:
    return "".join(f' bottom: "{b}"' for b in bottoms) + "".join(f' top: "{t}"' for t in tops)


def layer(name: str, type_: str, bottoms, tops=None, body: str = "") -> str:
    bottoms = [bottoms] if isinstance(bottoms, str) else list(bottoms)
    tops = [name] if tops is None else ([tops] if isinstance(tops, str) else list(tops))
    return f'layer {{ name: "{name}" type: "{type_}"{_io(bottoms, tops)} {body} }}\n'


def inputs(**shapes) -> str:
    return "".join(
        f'layer {{ name: "{k}" type: "Input" top: "{k}" input_param {{ shape {{ '
        f'{" ".join(f"dim: {d}" for d in s)} }} }} }}\n' for k, s in shapes.items())


def conv(name, bottom, n, k=1, s=1, p=0, group=None, bias=True, type_="Convolution", top=None) -> str:
    extra = f" group: {group}" if group else ""
    fill = ' bias_filler { type: "gaussian" std: 0.2 }' if bias else " bias_term: false"
    return layer(name, type_, bottom, top or name,
                 f"convolution_param {{ num_output: {n} kernel_size: {k} stride: {s} pad: {p}{extra}"
                 f' weight_filler {{ type: "msra" }}{fill} }}')


def bn_scale(prefix: str, blob: str) -> str:
    """BVLC BatchNorm + Scale, in place (the ShuffleNet/MobileNet/DenseNet/SENet style)."""
    return (layer(f"{prefix}_bn", "BatchNorm", blob, blob,
                  "batch_norm_param { use_global_stats: true eps: 1e-5 }")
            + layer(f"{prefix}_scale", "Scale", blob, blob,
                    'scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } '
                    'bias_filler { type: "gaussian" std: 0.2 } }'))


def relu(name: str, blob: str, slope=None, type_="ReLU") -> str:
    return layer(name, type_, blob, blob, f"relu_param {{ negative_slope: {slope} }}" if slope else "")


def pool(name, bottom, kind, k=None, s=1, p=0, ceil=None, global_=False, tops=None) -> str:
    body = f"pool: {kind}"
    body += " global_pooling: true" if global_ else f" kernel_size: {k} stride: {s} pad: {p}"
    if ceil is not None:
        body += f" ceil_mode: {str(ceil).lower()}"
    return layer(name, "Pooling", bottom, tops or name, f"pooling_param {{ {body} }}")


# ============================================================================ helpers
def randomize_statistics(net: Net, seed: int) -> None:
    """BatchNorm (and PSPNet BN) statistics have no filler: give them seeded random values,
    with a scale factor other than 1 so the divide by blob 2 matters."""
    rng = np.random.RandomState(seed)
    with torch.no_grad():
        for e in net.entries:
            m = e.module
            if e.type == "BatchNorm":
                mean, var, factor = m.caffe_blobs()
                f = 2.0
                mean.copy_(torch.from_numpy(rng.randn(*mean.shape).astype(np.float32) * 0.3 * f))
                var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, var.shape).astype(np.float32) * f))
                factor.fill_(f)
            elif e.type == "BN" and len(m.caffe_blobs()) == 4:
                _, _, mean, var = m.caffe_blobs()
                mean.copy_(torch.from_numpy(rng.randn(*mean.shape).astype(np.float32) * 0.3))
                var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, var.shape).astype(np.float32)))


def build(text: str, seed: int, tmp_path: pathlib.Path, tag: str = "net") -> Tuple[Net, pathlib.Path, pathlib.Path]:
    """Seeded random weights -> caffemodel; returns a fresh Net loaded from that caffemodel."""
    seeded = Net(text, phase="test", seed=seed)
    assert seeded.warnings == []          # the nets are wired as their families wire them
    randomize_statistics(seeded, seed)
    proto, model = tmp_path / f"{tag}.prototxt", tmp_path / f"{tag}.caffemodel"
    proto.write_text(text)
    seeded.save_weights(str(model))
    return Net(str(proto), weights=str(model), phase="test"), proto, model


def caffemodel_arrays(path: pathlib.Path) -> Dict[str, List[np.ndarray]]:
    """The caffemodel read with protobuf alone: layer name -> its blobs as float32 arrays."""
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(path.read_bytes())
    out = {}
    for lp in msg.layer:
        if lp.blobs:
            out[lp.name] = [np.asarray(b.data, np.float32).reshape(tuple(b.shape.dim)) for b in lp.blobs]
    return out


def run_ours(net: Net, feeds: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    with torch.no_grad():
        net.forward(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return {k: v.numpy().copy() for k, v in net.blobs.items()}


def last_writers(net: Net) -> Dict[str, Tuple[str, int]]:
    """blob -> (name, top index) of the last layer writing it (Input layers excluded)."""
    out = {}
    for e in net.entries:
        if e.type == "Input":
            continue
        for i, t in enumerate(e.tops):
            out[t] = (e.name, i)
    return out


def opencv_net(proto, model, fusion: bool):
    net = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
    net.enableFusion(fusion)
    if hasattr(net, "enableWinograd"):
        net.enableWinograd(False)
    return net


def opencv_blobs(net: Net, proto, model, feeds) -> Dict[str, np.ndarray]:
    """Every blob of ``net`` as OpenCV computes it (each layer's own outputs, no fusion)."""
    cv = opencv_net(proto, model, fusion=False)
    for k, v in feeds.items():
        cv.setInput(np.ascontiguousarray(v, np.float32), k)
    writers = last_writers(net)
    single = sorted({n for n, _ in writers.values()
                     if len(net._by_name[n].tops) == 1})
    got = dict(zip(single, cv.forward(single)))
    out = {}
    for blob, (name, i) in writers.items():
        if name in got:
            out[blob] = got[name]
        else:  # several tops: all outputs of the layer
            out[blob] = cv.forward(None, name)[i]
    return out


def opencv_outputs(proto, model, feeds, names) -> List[np.ndarray]:
    """OpenCV's default (fused) configuration, outputs ``names`` (layer names)."""
    cv = opencv_net(proto, model, fusion=True)
    for k, v in feeds.items():
        cv.setInput(np.ascontiguousarray(v, np.float32), k)
    return cv.forward(list(names))


def close(ours: np.ndarray, ref: np.ndarray, what: str, rtol: float = RTOL) -> None:
    ref = np.asarray(ref)
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs {ref.shape}"
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    assert np.isfinite(ours).all(), what
    np.testing.assert_allclose(ours, ref, rtol=rtol, atol=rtol * scale, err_msg=what)


def compare_every_blob(ours: Dict[str, np.ndarray], ref: Dict[str, np.ndarray],
                       must: Sequence[str]) -> List[str]:
    """Compare each blob both sides have; ``must`` lists blobs that must be among them."""
    common = [b for b in ours if b in ref]
    missing = [b for b in must if b not in common]
    assert not missing, f"blobs not compared: {missing}"
    for b in common:
        close(ours[b], ref[b], f"blob '{b}'")
    return common


def with_loss(text: str, tops_weights: Dict[str, float]) -> caffe_pb2.NetParameter:
    """The net with ``loss_weight`` on the named tops (0 on the other tops of their layers)."""
    msg = text_format.Parse(text, caffe_pb2.NetParameter())
    found = set()
    for lp in msg.layer:
        if any(t in tops_weights for t in lp.top) and not set(lp.top) & set(lp.bottom):
            del lp.loss_weight[:]
            lp.loss_weight.extend(tops_weights.get(t, 0.0) for t in lp.top)
            found.update(t for t in lp.top if t in tops_weights)
    assert found == set(tops_weights), f"no layer writes {set(tops_weights) - found}"
    return msg


def check_backward(text: str, model, feeds, loss_tops: Dict[str, float]) -> Net:
    """Backward through the net from ``loss_tops``: every learnable blob and every float
    input get a finite, not all-zero gradient."""
    net = Net(with_loss(text, loss_tops), weights=str(model), phase="test")
    xs = {k: torch.from_numpy(v).requires_grad_(k != "rois") for k, v in feeds.items()}
    net.forward(**xs)
    assert net.loss is not None and torch.isfinite(net.loss)
    net.backward()
    params = net.learnable_params()
    assert params
    for info in params:
        g = info.param.grad
        assert g is not None, f"{info.key}: no gradient"
        assert torch.isfinite(g).all(), f"{info.key}: non-finite gradient"
        assert g.abs().sum() > 0, f"{info.key}: all-zero gradient"
    for k, x in xs.items():
        if x.requires_grad:
            assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, k
    return net


def check_against_opencv(net: Net, proto, model, feeds, must: Sequence[str], finals: Sequence[str]):
    ours = run_ours(net, feeds)
    compared = compare_every_blob(ours, opencv_blobs(net, proto, model, feeds), must)
    writers = last_writers(net)
    assert set(compared) == set(writers)  # every blob a layer writes
    fused = opencv_outputs(proto, model, feeds, [writers[b][0] for b in finals])
    for b, r in zip(finals, fused):
        close(ours[b], r, f"final '{b}' (OpenCV fused)")
    return ours, compared


# ============================================================================ 1. ShuffleNet
def shufflenet_v1_unit(name: str, bottom: str, c_in: int, c_out: int, mid: int, groups: int,
                       stride: int, first_group: int = None) -> Tuple[str, str]:
    """ShuffleNet v1 unit: 1x1 GConv -> BN -> ReLU -> shuffle -> 3x3 DWConv (stride) -> BN ->
    1x1 GConv -> BN; stride 1: Eltwise SUM with the input; stride 2: Concat with a 3x3 AVE pool
    of the input (the output then has c_in + branch channels).  Returns (text, top)."""
    g1 = first_group or groups
    t = conv(f"{name}/gconv1", bottom, mid, 1, group=g1, bias=False)
    t += bn_scale(f"{name}/gconv1", f"{name}/gconv1") + relu(f"{name}/gconv1_relu", f"{name}/gconv1")
    t += layer(f"{name}/shuffle", "ShuffleChannel", f"{name}/gconv1", None,
               f"shuffle_channel_param {{ group: {groups} }}")
    t += conv(f"{name}/dwconv", f"{name}/shuffle", mid, 3, stride, 1, bias=False,
              type_="ConvolutionDepthwise")
    t += bn_scale(f"{name}/dwconv", f"{name}/dwconv")
    branch_out = c_out - c_in if stride == 2 else c_out
    t += conv(f"{name}/gconv2", f"{name}/dwconv", branch_out, 1, group=groups, bias=False)
    t += bn_scale(f"{name}/gconv2", f"{name}/gconv2")
    if stride == 1:
        t += layer(f"{name}/sum", "Eltwise", [bottom, f"{name}/gconv2"], None,
                   "eltwise_param { operation: SUM }")
        top = f"{name}/sum"
    else:
        t += pool(f"{name}/avg", bottom, "AVE", 3, 2)
        t += layer(f"{name}/concat", "Concat", [f"{name}/avg", f"{name}/gconv2"])
        top = f"{name}/concat"
    t += relu(f"{name}/relu", top)
    return t, top


def shufflenet_v1() -> str:
    t = 'name: "tiny_shufflenet_v1_g3"\n' + inputs(data=(2, 3, 32, 32))
    t += conv("conv1", "data", 12, 3, 1, 1, bias=False)
    t += bn_scale("conv1", "conv1") + relu("conv1_relu", "conv1")
    t += pool("pool1", "conv1", "MAX", 3, 2)                                 # 16 x 16
    u, top = shufflenet_v1_unit("stage2_1", "pool1", 12, 24, 6, 3, 2, first_group=1)  # 8 x 8
    t += u
    u, top = shufflenet_v1_unit("stage2_2", top, 24, 24, 6, 3, 1)
    t += u
    u, top = shufflenet_v1_unit("stage2_3", top, 24, 24, 9, 3, 1)
    t += u
    t += pool("pool_ave", top, "AVE", global_=True)
    t += layer("fc", "InnerProduct", "pool_ave", None,
               'inner_product_param { num_output: 10 weight_filler { type: "xavier" } '
               'bias_filler { type: "gaussian" std: 0.2 } }')
    t += layer("prob", "Softmax", "fc")
    return t


def shufflenet_v2() -> str:
    """ShuffleNet v2: a down-sampling unit (two stride-2 branches) and a basic unit (Slice
    half the channels off, transform the other half, Concat, ShuffleChannel group 2)."""
    t = 'name: "tiny_shufflenet_v2"\n' + inputs(data=(2, 8, 16, 16))
    # down-sampling unit: both branches see the whole input
    t += conv("s1/b1_dw", "data", 8, 3, 2, 1, group=8, bias=False)
    t += bn_scale("s1/b1_dw", "s1/b1_dw")
    t += conv("s1/b1_pw", "s1/b1_dw", 8, 1, bias=False)
    t += bn_scale("s1/b1_pw", "s1/b1_pw") + relu("s1/b1_pw_relu", "s1/b1_pw")
    t += conv("s1/b2_pw1", "data", 8, 1, bias=False)
    t += bn_scale("s1/b2_pw1", "s1/b2_pw1") + relu("s1/b2_pw1_relu", "s1/b2_pw1")
    t += conv("s1/b2_dw", "s1/b2_pw1", 8, 3, 2, 1, type_="ConvolutionDepthwise", bias=False)
    t += bn_scale("s1/b2_dw", "s1/b2_dw")
    t += conv("s1/b2_pw2", "s1/b2_dw", 8, 1, bias=False)
    t += bn_scale("s1/b2_pw2", "s1/b2_pw2") + relu("s1/b2_pw2_relu", "s1/b2_pw2")
    t += layer("s1/concat", "Concat", ["s1/b1_pw", "s1/b2_pw2"])
    t += layer("s1/shuffle", "ShuffleChannel", "s1/concat", None, "shuffle_channel_param { group: 2 }")
    # basic unit
    t += layer("s2/slice", "Slice", "s1/shuffle", ["s2/keep", "s2/in"],
               "slice_param { axis: 1 slice_point: 8 }")
    t += conv("s2/pw1", "s2/in", 8, 1, bias=False)
    t += bn_scale("s2/pw1", "s2/pw1") + relu("s2/pw1_relu", "s2/pw1")
    t += conv("s2/dw", "s2/pw1", 8, 3, 1, 1, type_="ConvolutionDepthwise", bias=False)
    t += bn_scale("s2/dw", "s2/dw")
    t += conv("s2/pw2", "s2/dw", 8, 1, bias=False)
    t += bn_scale("s2/pw2", "s2/pw2") + relu("s2/pw2_relu", "s2/pw2")
    t += layer("s2/concat", "Concat", ["s2/keep", "s2/pw2"])
    t += layer("s2/shuffle", "ShuffleChannel", "s2/concat", None, "shuffle_channel_param { group: 2 }")
    t += conv("conv_last", "s2/shuffle", 16, 1)
    t += pool("pool_last", "conv_last", "AVE", global_=True)
    return t


@pytest.mark.parametrize("which", ["v1", "v2"])
def test_shufflenet(which, tmp_path):
    text = shufflenet_v1() if which == "v1" else shufflenet_v2()
    net, proto, model = build(text, 11, tmp_path)
    rng = np.random.RandomState(1)
    feeds = {"data": rng.randn(*net.blob_shapes["data"]).astype(np.float32)}
    if which == "v1":
        must = ["stage2_1/shuffle", "stage2_1/dwconv", "stage2_1/avg", "stage2_1/concat",
                "stage2_2/sum", "stage2_3/sum", "pool_ave", "fc", "prob"]
        finals = ["prob"]
    else:
        must = ["s1/shuffle", "s2/keep", "s2/in", "s2/dw", "s2/concat", "s2/shuffle", "pool_last"]
        finals = ["pool_last"]
    ours, _ = check_against_opencv(net, proto, model, feeds, must, finals)
    if which == "v1":
        assert ours["stage2_1/concat"].shape == (2, 24, 8, 8)
        assert ours["prob"].shape == (2, 10)
        check_backward(text, model, feeds, {"fc": 1.0})
    else:
        assert ours["s2/shuffle"].shape == (2, 16, 8, 8)
        check_backward(text, model, feeds, {"pool_last": 1.0})


# ============================================================================ 2. MobileNet
def mobilenet() -> str:
    """MobileNet v1 (conv / dw / pw, BN + Scale + ReLU) then two MobileNet v2 inverted
    residual blocks (expand 1x1 -> ReLU6 -> depthwise 3x3 -> ReLU6 -> linear project 1x1;
    the second adds its input).  Depthwise layers use both fork types: the MobileNet fork's
    "DepthwiseConvolution" (group = channels given) and the ShuffleNet/MobileNet-SSD fork's
    "ConvolutionDepthwise" (group implied)."""
    t = 'name: "tiny_mobilenet_v1_v2"\n' + inputs(data=(2, 3, 32, 32))
    t += conv("conv0", "data", 8, 3, 2, 1, bias=False)
    t += bn_scale("conv0", "conv0") + relu("conv0/relu", "conv0")          # 16 x 16
    t += conv("conv1/dw", "conv0", 8, 3, 1, 1, group=8, bias=False, type_="DepthwiseConvolution")
    t += bn_scale("conv1/dw", "conv1/dw") + relu("conv1/dw/relu", "conv1/dw")
    t += conv("conv1", "conv1/dw", 16, 1, bias=False)
    t += bn_scale("conv1", "conv1") + relu("conv1/relu", "conv1")
    t += conv("conv2/dw", "conv1", 16, 3, 2, 1, bias=False, type_="ConvolutionDepthwise")  # 8 x 8
    t += bn_scale("conv2/dw", "conv2/dw") + relu("conv2/dw/relu", "conv2/dw")
    t += conv("conv2", "conv2/dw", 16, 1, bias=False)
    t += bn_scale("conv2", "conv2") + relu("conv2/relu", "conv2")
    # v2 inverted residual, stride 2 (no shortcut), DepthwiseConvolution
    t += conv("b1/expand", "conv2", 32, 1, bias=False)
    t += bn_scale("b1/expand", "b1/expand") + relu("b1/expand/relu", "b1/expand", type_="ReLU6")
    t += conv("b1/dw", "b1/expand", 32, 3, 2, 1, group=32, bias=False, type_="DepthwiseConvolution")
    t += bn_scale("b1/dw", "b1/dw") + relu("b1/dw/relu", "b1/dw", type_="ReLU6")      # 4 x 4
    t += conv("b1/project", "b1/dw", 16, 1, bias=False)
    t += bn_scale("b1/project", "b1/project")
    # v2 inverted residual, stride 1 with shortcut, ConvolutionDepthwise
    t += conv("b2/expand", "b1/project", 32, 1, bias=False)
    t += bn_scale("b2/expand", "b2/expand") + relu("b2/expand/relu", "b2/expand", type_="ReLU6")
    t += conv("b2/dw", "b2/expand", 32, 3, 1, 1, bias=False, type_="ConvolutionDepthwise")
    t += bn_scale("b2/dw", "b2/dw") + relu("b2/dw/relu", "b2/dw", type_="ReLU6")
    t += conv("b2/project", "b2/dw", 16, 1, bias=False)
    t += bn_scale("b2/project", "b2/project")
    t += layer("b2/add", "Eltwise", ["b1/project", "b2/project"])
    t += pool("pool6", "b2/add", "AVE", global_=True)
    t += conv("fc7", "pool6", 10, 1)
    t += layer("prob", "Softmax", "fc7")
    return t


def test_mobilenet(tmp_path):
    text = mobilenet()
    net, proto, model = build(text, 12, tmp_path)
    # OpenCV has no "DepthwiseConvolution" type; that fork's layer *is* the grouped
    # Convolution it names (weights (C, 1, k, k)), so OpenCV reads it as Convolution
    cv_proto = tmp_path / "opencv.prototxt"
    cv_proto.write_text(text.replace('type: "DepthwiseConvolution"', 'type: "Convolution"'))
    # inputs scaled so that ReLU6 caps values (its upper bound matters)
    feeds = {"data": np.random.RandomState(2).randn(2, 3, 32, 32).astype(np.float32) * 3}
    must = ["conv1/dw", "conv2/dw", "b1/expand", "b1/dw", "b1/project", "b2/dw", "b2/add",
            "pool6", "fc7", "prob"]
    ours, _ = check_against_opencv(net, cv_proto, model, feeds, must, ["prob"])
    for b in ("b1/expand", "b1/dw", "b2/expand", "b2/dw"):  # ReLU6 clipped at both ends
        assert ours[b].max() == 6.0 and ours[b].min() == 0.0, b
        assert (ours[b] == 6.0).mean() < 0.9
    check_backward(text, model, feeds, {"fc7": 1.0})


# ============================================================================ 3. DenseNet
def dense_layer(name: str, bottom: str, growth: int) -> Tuple[str, str]:
    """BN-Scale-ReLU-1x1 conv (bottleneck) - BN-Scale-ReLU-3x3 conv, concatenated onto the
    input (new blobs, as the DenseNet model-zoo prototxts: the input is read by two layers)."""
    t = layer(f"{name}/x1/bn", "BatchNorm", bottom, f"{name}/x1/bn",
              "batch_norm_param { use_global_stats: true eps: 1e-5 }")
    t += layer(f"{name}/x1/scale", "Scale", f"{name}/x1/bn", f"{name}/x1/bn",
               'scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } '
               'bias_filler { type: "gaussian" std: 0.2 } }')
    t += relu(f"{name}/relu1", f"{name}/x1/bn")
    t += conv(f"{name}/x1", f"{name}/x1/bn", 2 * growth, 1, bias=False)
    t += bn_scale(f"{name}/x2", f"{name}/x1") + relu(f"{name}/relu2", f"{name}/x1")
    t += conv(f"{name}/x2", f"{name}/x1", growth, 3, 1, 1, bias=False)
    t += layer(f"{name}/concat", "Concat", [bottom, f"{name}/x2"])
    return t, f"{name}/concat"


def densenet(ceil: bool = False) -> str:
    """conv1 -> MAX 3x3/2 pad 1 on a 14 x 14 map -> dense block (2 layers) at 7 x 7 ->
    transition (1x1 conv, AVE 2x2/2 on the odd 7 x 7 map) -> dense block (1 layer) -> BN ->
    global AVE -> 1x1 classifier.  The pools say ``ceil_mode: false`` (floor) as the
    model-zoo DenseNets do; ``ceil=True`` writes ``ceil_mode: true`` instead (Caffe's own
    rounding), whose shapes must differ."""
    t = f'name: "tiny_densenet_{"ceil" if ceil else "floor"}"\n' + inputs(data=(1, 3, 28, 28))
    t += conv("conv1", "data", 8, 3, 2, 1, bias=False)                     # 14 x 14
    t += bn_scale("conv1", "conv1") + relu("relu1", "conv1")
    t += pool("pool1", "conv1", "MAX", 3, 2, 1, ceil=ceil)                 # floor 7, ceil 8
    top = "pool1"
    for i in (1, 2):
        d, top = dense_layer(f"conv2_{i}", top, 4)
        t += d
    t += layer("conv2_blk/bn", "BatchNorm", top, "conv2_blk/bn",
               "batch_norm_param { use_global_stats: true eps: 1e-5 }")
    t += layer("conv2_blk/scale", "Scale", "conv2_blk/bn", "conv2_blk/bn",
               'scale_param { bias_term: true filler { type: "uniform" min: 0.5 max: 1.5 } }')
    t += relu("relu2_blk", "conv2_blk/bn")
    t += conv("conv2_blk", "conv2_blk/bn", 8, 1, bias=False)
    t += pool("pool2", "conv2_blk", "AVE", 2, 2, ceil=ceil)                # floor 3, ceil 4
    d, top = dense_layer("conv3_1", "pool2", 4)
    t += d
    t += bn_scale("conv3_blk", top) + relu("relu3_blk", top)
    t += pool("pool3", top, "AVE", global_=True)
    t += conv("fc", "pool3", 10, 1)
    return t


def test_densenet_floor_pooling(tmp_path):
    text = densenet(ceil=False)
    net, proto, model = build(text, 13, tmp_path)
    ceil_net = Net(densenet(ceil=True), phase="test")
    default_net = Net(densenet(ceil=False).replace(" ceil_mode: false", ""), phase="test")
    for b, floor_hw, ceil_hw in (("pool1", 7, 8), ("pool2", 3, 4)):
        assert net.blob_shapes[b][2:] == (floor_hw, floor_hw)
        assert ceil_net.blob_shapes[b][2:] == (ceil_hw, ceil_hw)
        assert default_net.blob_shapes[b] == ceil_net.blob_shapes[b]  # Caffe's default is ceil
    feeds = {"data": np.random.RandomState(3).randn(1, 3, 28, 28).astype(np.float32)}
    must = ["pool1", "conv2_1/x1", "conv2_1/concat", "conv2_2/concat", "conv2_blk", "pool2",
            "conv3_1/concat", "pool3", "fc"]
    ours, _ = check_against_opencv(net, proto, model, feeds, must, ["fc"])
    assert ours["conv3_1/concat"].shape == (1, 12, 3, 3)
    check_backward(text, model, feeds, {"fc": 1.0})


# ============================================================================ 4. SE-ResNet
def se_unit(name: str, bottom: str, c_in: int, c: int, stride: int) -> str:
    """Basic residual block with squeeze-excitation fused by SENet's Axpy:
    top = ReLU(sigmoid(fc(ReLU(fc(avgpool(r))))) * r + shortcut)."""
    t = conv(f"{name}_branch2a", bottom, c, 3, stride, 1, bias=False)
    t += bn_scale(f"{name}_branch2a", f"{name}_branch2a") + relu(f"{name}_branch2a_relu", f"{name}_branch2a")
    t += conv(f"{name}_branch2b", f"{name}_branch2a", c, 3, 1, 1, bias=False)
    t += bn_scale(f"{name}_branch2b", f"{name}_branch2b")
    t += pool(f"{name}_global_pool", f"{name}_branch2b", "AVE", global_=True)
    t += conv(f"{name}_down", f"{name}_global_pool", c // 4, 1)
    t += layer(f"{name}_down_relu", "ReLU", f"{name}_down", f"{name}_down")
    t += conv(f"{name}_up", f"{name}_down", c, 1)
    t += layer(f"{name}_prob", "Sigmoid", f"{name}_up")
    if stride != 1 or c_in != c:
        t += conv(f"{name}_branch1", bottom, c, 1, stride, bias=False)
        t += bn_scale(f"{name}_branch1", f"{name}_branch1")
        shortcut = f"{name}_branch1"
    else:
        shortcut = bottom
    t += layer(f"{name}_axpy", "Axpy", [f"{name}_prob", f"{name}_branch2b", shortcut])
    t += layer(f"{name}_relu", "ReLU", f"{name}_axpy", name)
    return t


def se_resnet(batch: int = 2) -> str:
    t = 'name: "tiny_se_resnet"\n' + inputs(data=(batch, 8, 16, 16))
    t += se_unit("res2a", "data", 8, 16, 2)
    t += se_unit("res2b", "res2a", 16, 16, 1)
    return t


def t_batchnorm(x, blobs, eps=1e-5):
    mean, var, factor = blobs
    f = 0.0 if factor.reshape(-1)[0] == 0 else 1.0 / factor.reshape(-1)[0]
    m, v = (mean * f).reshape(1, -1, 1, 1), (var * f).reshape(1, -1, 1, 1)
    return (x - m) / torch.sqrt(v + eps)


def t_scale(x, blobs):
    return x * blobs[0].reshape(1, -1, 1, 1) + blobs[1].reshape(1, -1, 1, 1)


def torch_weights(model) -> Dict[str, List[torch.Tensor]]:
    return {k: [torch.from_numpy(a).requires_grad_(True) for a in v]
            for k, v in caffemodel_arrays(model).items()}


def ref_se_resnet(x, W):
    """Plain torch; Axpy as the SENet fork's axpy_layer: top = a * x + y with bottoms (a, x, y)."""
    blobs = {}

    def cbs(name, inp, stride, pad, relu_=False):
        y = F.conv2d(inp, W[name][0], None, stride, pad)
        y = t_scale(t_batchnorm(y, W[name + "_bn"]), W[name + "_scale"])
        blobs[name] = y.relu() if relu_ else y
        return blobs[name]

    def unit(name, inp, stride, project):
        a = cbs(f"{name}_branch2a", inp, stride, 1, relu_=True)
        r = cbs(f"{name}_branch2b", a, 1, 1)
        s = blobs[f"{name}_global_pool"] = r.mean(dim=(2, 3), keepdim=True)
        d = blobs[f"{name}_down"] = F.conv2d(s, *W[f"{name}_down"]).relu()
        u = blobs[f"{name}_up"] = F.conv2d(d, *W[f"{name}_up"])
        p = blobs[f"{name}_prob"] = torch.sigmoid(u)
        sc = cbs(f"{name}_branch1", inp, stride, 0) if project else inp
        blobs[f"{name}_axpy"] = p * r + sc
        blobs[name] = blobs[f"{name}_axpy"].relu()
        return blobs[name]

    unit("res2b", unit("res2a", x, 2, True), 1, False)
    return blobs


def compare_grads(net: Net, W: Dict[str, List[torch.Tensor]]) -> int:
    """Our parameter gradients (Caffe order per layer) against the reference's."""
    n = 0
    for e in net.entries:
        if e.module is None or e.name not in W:
            continue
        for attr, ref in zip(e.module.blob_names, W[e.name]):
            ours = getattr(e.module, attr)
            if not ours.requires_grad:
                continue
            assert ours.grad is not None and ref.grad is not None, f"{e.name}.{attr}"
            # (a 0-axis blob, e.g. a shared PReLU slope, is written as (1,): see
            # test_scalar_blobs_keep_caffe_shape)
            close(ours.grad.numpy(), ref.grad.numpy().reshape(ours.shape), f"grad {e.name}.{attr}",
                  rtol=1e-4)
            n += 1
    return n


def test_se_resnet_axpy(tmp_path):
    text = se_resnet()
    net, proto, model = build(text, 14, tmp_path)
    x = np.random.RandomState(4).randn(2, 8, 16, 16).astype(np.float32)
    ours = run_ours(net, {"data": x})
    W = torch_weights(model)
    xt = torch.from_numpy(x).requires_grad_(True)
    ref = ref_se_resnet(xt, W)
    compared = compare_every_blob(ours, {k: v.detach().numpy() for k, v in ref.items()},
                                  ["res2a_global_pool", "res2a_prob", "res2a_branch1", "res2a_axpy",
                                   "res2a", "res2b_prob", "res2b_axpy", "res2b"])
    assert len(compared) == len(ours) - 1  # every blob but the input
    # the excitation really varies per channel, so a * x vs a * y would show
    assert ours["res2a_prob"].std() > 0.05

    # gradients: loss = sum(res2b), against autograd through the reference
    check = check_backward(text, model, {"data": x}, {"res2b": 1.0})
    ref["res2b"].sum().backward()
    assert compare_grads(check, W) >= 10

    # OpenCV's importer reads Axpy's last two bottoms the other way round (a * y + x): with
    # residual and shortcut swapped in its copy it computes the same net, as given it does
    # not.  Its Axpy also fails on a batch of 2 ("end <= dims"): one image, same weights.
    one = se_resnet(batch=1)
    net1 = Net(one, weights=str(model), phase="test")
    ours1 = run_ours(net1, {"data": x[1:]})
    swapped = tmp_path / "opencv_swapped.prototxt"
    swapped.write_text(one.replace('bottom: "res2a_branch2b" bottom: "res2a_branch1"',
                                   'bottom: "res2a_branch1" bottom: "res2a_branch2b"')
                          .replace('bottom: "res2b_branch2b" bottom: "res2a"',
                                   'bottom: "res2a" bottom: "res2b_branch2b"'))
    assert swapped.read_text().count('type: "Axpy"') == 2 and swapped.read_text() != one
    compare_every_blob(ours1, opencv_blobs(net1, swapped, model, {"data": x[1:]}),
                       ["res2a_axpy", "res2a", "res2b_axpy", "res2b"])
    close(ours1["res2b"], ours["res2b"][1:], "batch of 1 vs 2")
    as_given = tmp_path / "opencv_as_given.prototxt"
    as_given.write_text(one)
    theirs = opencv_outputs(as_given, model, {"data": x[1:]}, ["res2b_relu"])[0]
    assert not np.allclose(theirs, ours1["res2b"], atol=1e-2)


# ============================================================================ 5. R-FCN
K, CLASSES = 3, 3   # position-sensitive grid k x k, classes including background


def rfcn_head(n_rois: int) -> str:
    t = 'name: "tiny_rfcn_head"\n' + inputs(data=(2, 3, 32, 32), rois=(n_rois, 5))
    t += conv("conv1", "data", 16, 3, 1, 1) + relu("relu1", "conv1")
    t += pool("pool1", "conv1", "MAX", 2, 2)                               # stride 2: 16 x 16
    t += conv("conv_new_1", "pool1", 16, 3, 1, 1) + relu("conv_new_1_relu", "conv_new_1")
    t += conv("rfcn_cls", "conv_new_1", K * K * CLASSES, 1)
    t += layer("psroipooled_cls_rois", "PSROIPooling", ["rfcn_cls", "rois"], None,
               f"psroi_pooling_param {{ spatial_scale: 0.5 output_dim: {CLASSES} group_size: {K} }}")
    t += pool("cls_score", "psroipooled_cls_rois", "AVE", K, K)
    t += layer("cls_prob", "Softmax", "cls_score")
    return t


# image coordinates (x1, y1, x2, y2) on the 32 x 32 input, both images; inside the map
# (OpenCV rounds negative halves and sizes reversed boxes differently from the fork)
RFCN_ROIS = np.array([[0, 0, 0, 31, 31], [0, 4, 6, 20, 13], [0, 10, 10, 12, 11],
                      [1, 3, 3, 29, 25], [1, 16, 0, 31, 9], [1, 7, 7, 7, 7],
                      [0, 5.6, 2.2, 17.4, 30.8], [1, 22, 22, 24, 30]], np.float32)


def test_rfcn_head(tmp_path):
    text = rfcn_head(len(RFCN_ROIS))
    net, proto, model = build(text, 15, tmp_path)
    feeds = {"data": np.random.RandomState(5).randn(2, 3, 32, 32).astype(np.float32),
             "rois": RFCN_ROIS}
    must = ["rfcn_cls", "psroipooled_cls_rois", "cls_score", "cls_prob"]
    ours, _ = check_against_opencv(net, proto, model, feeds, must, ["cls_prob"])
    assert ours["psroipooled_cls_rois"].shape == (len(RFCN_ROIS), CLASSES, K, K)
    assert ours["cls_prob"].shape == (len(RFCN_ROIS), CLASSES, 1, 1)
    # the position-sensitive maps really differ per bin (a plain ROI pooling would not match)
    assert np.abs(np.diff(ours["psroipooled_cls_rois"].reshape(len(RFCN_ROIS), -1), axis=1)).max() > 0.1
    # softmax outputs sum to one whatever the weights: the loss sits on the scores
    check_backward(text, model, feeds, {"cls_score": 1.0})


# ============================================================================ 6. ENet / SegNet
def segnet_bn(name: str, bottom: str) -> str:
    """SegNet's BN after compute_bn_statistics folded the statistics in: INFERENCE mode."""
    return layer(name, "BN", bottom, None,
                 'bn_param { bn_mode: INFERENCE scale_filler { type: "uniform" min: 0.5 max: 1.5 } '
                 'shift_filler { type: "gaussian" std: 0.3 } }')


def prelu(name: str, blob: str, shared: bool = False) -> str:
    return layer(name, "PReLU", blob, blob,
                 f"prelu_param {{ channel_shared: {str(shared).lower()} "
                 'filler { type: "uniform" min: 0.05 max: 0.5 } }')


def enet_segnet() -> str:
    """Encoder: conv-BN-PReLU-MAX pool (pooled + mask tops) twice, the first on an odd
    15 x 15 map; decoder: conv-BN-PReLU-Upsample(pooled path, mask) twice (the last back to
    15 x 15 with upsample_h/upsample_w, as SegNet's odd-size decoders), then a stride-2
    Deconvolution."""
    t = 'name: "tiny_enet_segnet"\n' + inputs(data=(2, 3, 15, 15))
    t += conv("conv1", "data", 8, 3, 1, 1) + segnet_bn("bn1", "conv1") + prelu("prelu1", "bn1")
    t += pool("pool1", "bn1", "MAX", 2, 2, tops=["pool1", "pool1_mask"])    # 8 x 8
    t += conv("conv2", "pool1", 8, 3, 1, 1) + segnet_bn("bn2", "conv2") + prelu("prelu2", "bn2", True)
    t += pool("pool2", "bn2", "MAX", 2, 2, tops=["pool2", "pool2_mask"])    # 4 x 4
    t += conv("conv3", "pool2", 8, 3, 1, 1) + segnet_bn("bn3", "conv3") + prelu("prelu3", "bn3")
    t += layer("upsample2", "Upsample", ["bn3", "pool2_mask"], None, "upsample_param { scale: 2 }")
    t += conv("conv4", "upsample2", 8, 3, 1, 1) + segnet_bn("bn4", "conv4") + prelu("prelu4", "bn4")
    t += layer("upsample1", "Upsample", ["bn4", "pool1_mask"], None,
               "upsample_param { upsample_h: 15 upsample_w: 15 }")
    t += layer("fullconv", "Deconvolution", "upsample1", None,
               'convolution_param { num_output: 4 kernel_size: 2 stride: 2 '
               'weight_filler { type: "msra" } bias_filler { type: "gaussian" std: 0.2 } }')
    return t


def ref_enet_segnet(x, W):
    """Plain torch: BN INFERENCE is scale * x + shift; MAX pooling's mask top is the
    flat index in the input plane (torch's max_pool2d indices, Caffe's ceil rounding);
    the 2-bottom Upsample scatters by it (max_unpool2d)."""
    b = {}

    def cbp(i, inp):
        y = F.conv2d(inp, *W[f"conv{i}"], padding=1)
        b[f"conv{i}"] = y
        s, sh = W[f"bn{i}"]
        y = y * s.reshape(1, -1, 1, 1) + sh.reshape(1, -1, 1, 1)
        b[f"bn{i}"] = F.prelu(y, W[f"prelu{i}"][0])
        return b[f"bn{i}"]

    def maxpool(i, inp):
        p, idx = F.max_pool2d(inp, 2, 2, ceil_mode=True, return_indices=True)
        b[f"pool{i}"], b[f"pool{i}_mask"] = p, idx.to(p.dtype)
        return p, idx

    p1, i1 = maxpool(1, cbp(1, x))
    p2, i2 = maxpool(2, cbp(2, p1))
    u2 = b["upsample2"] = F.max_unpool2d(cbp(3, p2), i2, 2, 2, output_size=(8, 8))
    u1 = b["upsample1"] = F.max_unpool2d(cbp(4, u2), i1, 2, 2, output_size=(15, 15))
    b["fullconv"] = F.conv_transpose2d(u1, *W["fullconv"], stride=2)
    return b


def test_enet_segnet(tmp_path):
    text = enet_segnet()
    net, proto, model = build(text, 16, tmp_path)
    x = np.random.RandomState(6).randn(2, 3, 15, 15).astype(np.float32)
    ours = run_ours(net, {"data": x})
    W = torch_weights(model)
    ref = ref_enet_segnet(torch.from_numpy(x), W)
    compared = compare_every_blob(ours, {k: v.detach().numpy() for k, v in ref.items()},
                                  ["conv1", "bn1", "pool1", "pool1_mask", "bn2", "pool2_mask",
                                   "upsample2", "upsample1", "fullconv"])
    assert len(compared) == len(ours) - 1
    assert ours["fullconv"].shape == (2, 4, 30, 30)
    # the masks index the unpadded input planes, last row/column of 15 included
    assert ours["pool1_mask"].max() == 15 * 15 - 1 or (ours["pool1_mask"] >= 14 * 15).any()
    # unpooling leaves exactly the un-selected cells zero (random data: no ties)
    assert ((ours["upsample1"] != 0).sum(axis=(2, 3)) == 64).all()
    # PReLU slopes: per channel in prelu1, one shared in prelu2
    assert W["prelu1"][0].shape == (8,) and W["prelu2"][0].numel() == 1

    check = check_backward(text, model, {"data": x}, {"fullconv": 1.0})
    W2 = torch_weights(model)
    ref2 = ref_enet_segnet(torch.from_numpy(x), W2)
    ref2["fullconv"].sum().backward()
    assert compare_grads(check, W2) >= 14


# ============================================================================ 7. PSPNet
PSP_BINS = (1, 2, 3, 6)


def psp_bn(name: str, blob: str) -> str:
    """PSPNet's BN (4 blobs: slope, bias, mean, variance), frozen as in its deploy nets."""
    return layer(name, "BN", blob, blob,
                 'bn_param { slope_filler { type: "uniform" min: 0.5 max: 1.5 } '
                 'bias_filler { type: "gaussian" std: 0.3 } frozen: true momentum: 0.95 eps: 1e-5 }')


def pspnet(side: int = 24) -> str:
    """Backbone conv -> pyramid pooling (AVE pools of 1, 2, 3, 6 bins, each 1x1 conv -> BN ->
    ReLU -> Interp back to the map size with height/width) -> Concat -> 3x3 conv -> BN ->
    ReLU -> 1x1 classifier -> Interp zoom_factor 2."""
    t = 'name: "tiny_pspnet"\n' + inputs(data=(2, 3, side, side))
    t += conv("conv5_3", "data", 16, 3, 1, 1, bias=False)
    t += psp_bn("conv5_3/bn", "conv5_3") + relu("conv5_3/relu", "conv5_3")
    branches = ["conv5_3"]
    for b in PSP_BINS:
        k = side // b
        t += pool(f"conv5_3_pool{b}", "conv5_3", "AVE", k, k)
        t += conv(f"conv5_3_pool{b}_conv", f"conv5_3_pool{b}", 4, 1, bias=False)
        t += psp_bn(f"conv5_3_pool{b}_conv/bn", f"conv5_3_pool{b}_conv")
        t += relu(f"conv5_3_pool{b}_conv/relu", f"conv5_3_pool{b}_conv")
        t += layer(f"conv5_3_pool{b}_interp", "Interp", f"conv5_3_pool{b}_conv", None,
                   f"interp_param {{ height: {side} width: {side} }}")
        branches.append(f"conv5_3_pool{b}_interp")
    t += layer("conv5_3_concat", "Concat", branches)
    t += conv("conv5_4", "conv5_3_concat", 16, 3, 1, 1, bias=False)
    t += psp_bn("conv5_4/bn", "conv5_4") + relu("conv5_4/relu", "conv5_4")
    t += conv("conv6", "conv5_4", 5, 1)
    t += layer("conv6_interp", "Interp", "conv6", None, "interp_param { zoom_factor: 2 }")
    return t


def ref_pspnet(x, W, side: int = 24, with_bn: bool = True):
    """Plain torch: PSPNet's frozen BN is slope * (x - mean) / sqrt(var + eps) + bias; Interp
    is bilinear with corners aligned (align_corners=True)."""
    b = {}

    def bn(name, y):
        if not with_bn:
            return y
        slope, bias, mean, var = (w.reshape(1, -1, 1, 1) for w in W[name])
        return slope * (y - mean) / torch.sqrt(var + 1e-5) + bias

    y = b["conv5_3"] = bn("conv5_3/bn", F.conv2d(x, W["conv5_3"][0], padding=1)).relu()
    branches = [y]
    for n in PSP_BINS:
        p = b[f"conv5_3_pool{n}"] = F.avg_pool2d(y, side // n)
        c = b[f"conv5_3_pool{n}_conv"] = bn(f"conv5_3_pool{n}_conv/bn",
                                            F.conv2d(p, W[f"conv5_3_pool{n}_conv"][0])).relu()
        up = b[f"conv5_3_pool{n}_interp"] = F.interpolate(c, size=(side, side), mode="bilinear",
                                                          align_corners=True)
        branches.append(up)
    cat = b["conv5_3_concat"] = torch.cat(branches, 1)
    y = b["conv5_4"] = bn("conv5_4/bn", F.conv2d(cat, W["conv5_4"][0], padding=1)).relu()
    y = b["conv6"] = F.conv2d(y, *W["conv6"])
    b["conv6_interp"] = F.interpolate(y, size=(2 * side - 1,) * 2, mode="bilinear", align_corners=True)
    return b


def test_pspnet_pyramid(tmp_path):
    text = pspnet()
    net, proto, model = build(text, 38, tmp_path)
    x = np.random.RandomState(7).randn(2, 3, 24, 24).astype(np.float32)
    ours = run_ours(net, {"data": x})
    for b in PSP_BINS:  # (a seed whose pyramid branches are not dead after their ReLU)
        assert (ours[f"conv5_3_pool{b}_conv"] > 0).any(axis=(0, 2, 3)).sum() >= 3, b
    W = torch_weights(model)
    assert all(len(v) == 4 for k, v in W.items() if k.endswith("/bn"))   # PSPNet's 4 blobs
    ref = ref_pspnet(torch.from_numpy(x), W)
    must = [f"conv5_3_pool{b}{s}" for b in PSP_BINS for s in ("", "_conv", "_interp")]
    compared = compare_every_blob(ours, {k: v.detach().numpy() for k, v in ref.items()},
                                  must + ["conv5_3", "conv5_3_concat", "conv5_4", "conv6", "conv6_interp"])
    assert len(compared) == len(ours) - 1
    assert ours["conv6_interp"].shape == (2, 5, 47, 47)
    # the 6-bin branch is not constant within a bin after Interp (bilinear, not nearest)
    assert np.abs(np.diff(ours["conv5_3_pool6_interp"], axis=3)).min() < \
        np.abs(np.diff(ours["conv5_3_pool6_interp"], axis=3)).max() / 10

    # gradients (frozen BN: no slope/bias diff; dx = dy * slope / sqrt(var + eps))
    check = check_backward(text, model, {"data": x}, {"conv6_interp": 1.0})
    xt = torch.from_numpy(x).requires_grad_(True)
    W2 = torch_weights(model)
    for k in W2:
        if k.endswith("/bn"):
            W2[k] = [w.detach() for w in W2[k]]
    ref_pspnet(xt, W2)["conv6_interp"].sum().backward()
    assert compare_grads(check, W2) == 8       # seven convolutions' weights, conv6's bias
    assert not any("/bn" in p.key for p in check.learnable_params())

    # OpenCV reads Interp (not this BN): the same net without its BN layers, same caffemodel
    no_bn = "".join(line + "\n" for line in text.splitlines() if 'type: "BN"' not in line)
    assert no_bn.count("Interp") == len(PSP_BINS) + 1 and "BN" not in no_bn
    cv_proto = tmp_path / "no_bn.prototxt"
    cv_proto.write_text(no_bn)
    net2 = Net(str(cv_proto), weights=str(model), phase="test")
    ours2, _ = check_against_opencv(net2, cv_proto, model, {"data": x},
                                    [b for b in must if "pool" in b] + ["conv5_3_concat", "conv6_interp"],
                                    ["conv6_interp"])
    ref2 = ref_pspnet(torch.from_numpy(x), W, with_bn=False)
    close(ours2["conv6_interp"], ref2["conv6_interp"].detach().numpy(), "no-BN net vs torch")


# ============================================================================ 8. YOLOv3-tiny
def conv_leaky(name: str, bottom: str, n: int, k: int) -> str:
    """darknet's conv (no bias) + batch_normalize + leaky 0.1, as the YOLO ports write it."""
    return (conv(name, bottom, n, k, 1, k // 2, bias=False) + bn_scale(name, name)
            + relu(f"{name}_leaky", name, slope=0.1))


def yolov3_tiny(upsample: str = None) -> str:
    """Backbone (conv-leaky / MAX 2x2/2, and a MAX 3x3/1 pad 1 that keeps the size), a 1x1
    route point, head 1 at 8 x 8; 1x1 conv -> Upsample (1 bottom, scale 2) -> Concat with
    the 16 x 16 feature -> head 2.  ``upsample`` replaces the Upsample layer's text."""
    t = 'name: "tiny_yolov3_tiny"\n' + inputs(data=(2, 3, 32, 32))
    t += conv_leaky("conv1", "data", 8, 3) + pool("pool1", "conv1", "MAX", 2, 2)    # 16
    t += conv_leaky("conv2", "pool1", 16, 3) + pool("pool2", "conv2", "MAX", 2, 2)  # 8
    t += conv_leaky("conv3", "pool2", 32, 3) + pool("pool3", "conv3", "MAX", 3, 1, 1)  # 8
    t += conv_leaky("conv4", "pool3", 16, 1)
    t += conv_leaky("conv5", "conv4", 32, 3) + conv("yolo1", "conv5", 18, 1)        # 3 x (5 + 1)
    t += conv_leaky("conv7", "conv4", 8, 1)
    t += upsample or layer("upsample", "Upsample", "conv7", None, "upsample_param { scale: 2 }")
    t += layer("route", "Concat", ["upsample", "conv2"])
    t += conv_leaky("conv8", "route", 16, 3) + conv("yolo2", "conv8", 18, 1)
    return t


# nearest 2x upsampling *is* a depthwise 2x2/2 deconvolution with all-ones weights, no bias
UPSAMPLE_AS_DECONV = layer("upsample", "Deconvolution", "conv7", None,
                           'convolution_param { num_output: 8 group: 8 kernel_size: 2 stride: 2 '
                           'bias_term: false weight_filler { type: "constant" value: 1 } }')


def ref_yolov3_tiny(x, W):
    """Plain torch: BatchNorm + Scale + leaky ReLU 0.1; Upsample = each value repeated 2 x 2."""
    b = {}

    def cl(name, inp, k):
        y = F.conv2d(inp, W[name][0], padding=k // 2)
        y = t_scale(t_batchnorm(y, W[name + "_bn"]), W[name + "_scale"])
        b[name] = F.leaky_relu(y, 0.1)
        return b[name]

    p1 = b["pool1"] = F.max_pool2d(cl("conv1", x, 3), 2, 2)
    p2 = b["pool2"] = F.max_pool2d(cl("conv2", p1, 3), 2, 2)
    p3 = b["pool3"] = F.max_pool2d(cl("conv3", p2, 3), 3, 1, 1)
    c4 = cl("conv4", p3, 1)
    b["yolo1"] = F.conv2d(cl("conv5", c4, 3), *W["yolo1"])
    c7 = cl("conv7", c4, 1)
    up = b["upsample"] = c7.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    r = b["route"] = torch.cat([up, b["conv2"]], 1)
    b["yolo2"] = F.conv2d(cl("conv8", r, 3), *W["yolo2"])
    return b


def test_yolov3_tiny(tmp_path):
    text = yolov3_tiny()
    net, proto, model = build(text, 18, tmp_path)
    x = np.random.RandomState(8).randn(2, 3, 32, 32).astype(np.float32)
    ours = run_ours(net, {"data": x})
    assert ours["yolo1"].shape == (2, 18, 8, 8) and ours["yolo2"].shape == (2, 18, 16, 16)
    assert ours["pool3"].shape == (2, 32, 8, 8)
    W = torch_weights(model)
    ref = ref_yolov3_tiny(torch.from_numpy(x), W)
    compared = compare_every_blob(ours, {k: v.detach().numpy() for k, v in ref.items()},
                                  ["conv1", "pool1", "conv2", "pool3", "conv4", "yolo1", "conv7",
                                   "upsample", "route", "yolo2"])
    assert len(compared) == len(ours) - 1
    assert (ours["conv1"] < 0).any()                      # leaky: negatives kept, scaled
    np.testing.assert_array_equal(ours["upsample"][:, :, ::2, ::2], ours["upsample"][:, :, 1::2, 1::2])

    check = check_backward(text, model, {"data": x}, {"yolo1": 1.0, "yolo2": 0.5})
    W2 = torch_weights(model)
    r2 = ref_yolov3_tiny(torch.from_numpy(x), W2)
    (r2["yolo1"].sum() + 0.5 * r2["yolo2"].sum()).backward()
    assert compare_grads(check, W2) == 7 * 3 + 2 * 2       # 7 x (conv, scale, shift), 2 heads

    # OpenCV has no Upsample layer: the same net with the equivalent deconvolution
    cv_text = yolov3_tiny(UPSAMPLE_AS_DECONV)
    seeded = Net(cv_text, phase="test", seed=0, weights=str(model), allow_missing=True)
    cv_proto, cv_model = tmp_path / "deconv.prototxt", tmp_path / "deconv.caffemodel"
    cv_proto.write_text(cv_text)
    seeded.save_weights(str(cv_model))
    net2 = Net(str(cv_proto), weights=str(cv_model), phase="test")
    ours2, _ = check_against_opencv(net2, cv_proto, cv_model, {"data": x},
                                    ["pool3", "upsample", "route", "yolo1", "yolo2"], ["yolo1", "yolo2"])
    for b in ("upsample", "yolo2"):
        close(ours[b], ours2[b], f"{b}: Upsample vs its deconvolution")


# ============================================================================ 0-axis blobs
SCALAR_BLOBS = 'name: "scalars"\n' + inputs(data=(1, 2, 3, 3)) + \
    prelu("prelu", "data", shared=True) + \
    layer("scale", "Scale", "data", "scaled", "scale_param { num_axes: 0 bias_term: true }") + \
    layer("norm", "Normalize", "scaled", None, "norm_param { channel_shared: true }")


def test_scalar_blobs_load_with_caffe_shape(tmp_path):
    """ENet's shared PReLU slope (like Scale/Bias with num_axes 0 and SSD's shared Normalize)
    is a 0-axis blob in Caffe (``Blob(vector<int>(0))``): a caffemodel written by Caffe
    stores ``shape {}`` with no dims, and loads here."""
    net = Net(SCALAR_BLOBS, phase="test", seed=3)
    msg = caffe_pb2.NetParameter(name="scalars")
    for e in net.entries:
        if e.module is not None and e.module.caffe_blobs():
            lp = msg.layer.add(name=e.name, type=e.type)
            for b in e.module.caffe_blobs():
                assert b.dim() == 0
                blob = lp.blobs.add(data=[float(b.detach()) + 0.5])
                blob.shape.SetInParent()              # present, no dims: Caffe's scalar
    path = tmp_path / "caffe_written.caffemodel"
    path.write_bytes(msg.SerializeToString())
    loaded = Net(SCALAR_BLOBS, weights=str(path), phase="test")
    for e in loaded.entries:
        for b, ref in zip(e.module.caffe_blobs(), net.layer(e.name).caffe_blobs() if e.module else ()):
            assert b.dim() == 0 and float(b.detach()) == pytest.approx(float(ref.detach()) + 0.5)


def test_scalar_blobs_written_with_caffe_shape(tmp_path):
    net = Net(SCALAR_BLOBS, phase="test", seed=3)
    path = tmp_path / "ours.caffemodel"
    net.save_weights(str(path))
    msg = caffe_pb2.NetParameter()
    msg.ParseFromString(path.read_bytes())
    shapes = {lp.name: [(b.HasField("shape"), list(b.shape.dim)) for b in lp.blobs]
              for lp in msg.layer if lp.blobs}
    assert shapes == {"prelu": [(True, [])], "scale": [(True, []), (True, [])],
                      "norm": [(True, [])]}
