"""CUDA graph replay of a Net's forward (caffe_compat.cuda_graph).

GPU part (marked ``gpu``): the deploy nets of the corpus, the project's tiny ResNet and the
real nsfw ResNet-50 capture, and a replay equals the eager forward bit for bit on new
inputs; every golden net either captures and matches eager or is refused with a GraphError.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat.cuda_graph import CudaGraphNet
from caffe_compat.errors import GraphError, ShapeError
from caffe_compat.layers.base import TRAIN
from conftest import ROOT, corpus_or_skip
from golden_util import golden_files


def test_refused_without_cuda_or_on_cpu():
    net = Net(str(ROOT / "models" / "tiny_resnet" / "deploy.prototxt"))
    x = torch.zeros(net.blob_shapes[net.input_names[0]])
    with pytest.raises(GraphError, match="CUDA"):
        CudaGraphNet(net, **{net.input_names[0]: x})


def _check_replay(net: Net, seed: int = 0) -> CudaGraphNet:
    inp = net.input_names[0]
    shape = net.blob_shapes[inp]
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, generator=g) for _ in range(3)]
    graph = CudaGraphNet(net, **{inp: xs[0].cuda()})
    for x in xs[1:]:
        with torch.no_grad():
            eager = {k: v.clone() for k, v in net.forward(**{inp: x.cuda()}).items()}
        out = graph(**{inp: x})                     # a CPU tensor is copied in
        assert list(out) == list(eager)
        for k in out:
            assert torch.equal(out[k], eager[k]), k
        assert net.blobs is graph.blobs
    with pytest.raises(ShapeError, match="captured for shape"):
        graph(**{inp: torch.zeros((shape[0] + 1,) + tuple(shape[1:]))})
    with pytest.raises(GraphError, match="not an input"):
        graph(nope=torch.zeros(1))
    return graph


DEPLOY = ["bvlc-caffe/models/bvlc_alexnet/deploy.prototxt",
          "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt",
          "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt"]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("rel", DEPLOY + ["tiny_resnet"])
def test_deploy_nets_replay_like_eager(rel, layout):
    path = ROOT / "models" / "tiny_resnet" / "deploy.prototxt" if rel == "tiny_resnet" else corpus_or_skip() / rel
    net = Net(str(path), seed=0, device="cuda")
    if layout == "nhwc":
        net.channels_last()
    _check_replay(net)


@pytest.mark.gpu
def test_nsfw_resnet50_replays_caffe_numbers():
    from conftest import GOLDEN
    from test_nsfw_resnet50 import nsfw_dir
    from make_nsfw import nsfw_input

    d = nsfw_dir()
    g = np.load(GOLDEN / "nsfw_resnet50.npz")
    net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel"), device="cuda")
    graph = _check_replay(net)
    prob = graph(data=torch.from_numpy(nsfw_input()))["prob"].cpu().numpy()
    np.testing.assert_allclose(prob, g["blob/prob"], rtol=1e-5)


FILES = [p for fam in ("vision", "neuron", "common") for p in golden_files(fam)]


@pytest.mark.gpu
@pytest.mark.parametrize("path", FILES, ids=[f"{p.parent.name}/{p.stem}" for p in FILES])
def test_golden_nets_capture_or_refuse_clearly(path):
    g = np.load(str(path))
    net = Net(str(g["prototxt"]), phase="train" if int(g["phase"]) == 0 else "test", device="cuda")
    inputs = {k[len("input/"):]: torch.from_numpy(g[k]).cuda() for k in g.files if k.startswith("input/")}
    try:
        graph = CudaGraphNet(net, **inputs)
    except GraphError as e:
        assert "cannot be captured" in str(e) or "needs every net input" in str(e)
        return
    with torch.no_grad():
        eager = {k: v.clone() for k, v in net.forward(**inputs).items()}
    out = graph(**inputs)
    assert [tuple(v.shape) for v in out.values()] == [tuple(v.shape) for v in eager.values()]
    if net.phase == TRAIN:
        return  # random and statistics-updating layers make TRAIN runs differ from run to run
    for k in out:
        torch.testing.assert_close(out[k], eager[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.gpu
def test_time_cuda_graph_reports_forward_only():
    from caffe_compat.timing import time_cuda_graph

    net = Net(str(ROOT / "models" / "tiny_resnet" / "deploy.prototxt"), device="cuda")
    r = time_cuda_graph(net, 5)
    assert r.iterations == 5 and r.forward_ms > 0 and r.backward_ms is None
    assert r.lines()[-1].startswith("Average Forward pass")


def test_time_cli_cuda_graph_needs_gpu(tmp_path):
    from click.testing import CliRunner

    from caffe_compat.cli.main import main

    r = CliRunner().invoke(main, ["time", "-m", str(ROOT / "models" / "tiny_resnet" / "deploy.prototxt"),
                                  "--cuda-graph"])
    assert r.exit_code == 2 and "--cuda-graph needs --gpu" in r.output


@pytest.mark.gpu
def test_time_cli_cuda_graph_with_fused_batchnorm():
    from click.testing import CliRunner

    from caffe_compat.cli.main import main

    r = CliRunner().invoke(main, ["time", "-m", str(ROOT / "models" / "tiny_resnet" / "deploy.prototxt"),
                                  "--phase", "test", "--gpu", "0", "--fuse-batchnorm", "--cuda-graph", "-n", "5"])
    assert r.exit_code == 0, r.output
    assert "Folded" in r.output and "Average Forward pass" in r.output and "\tforward" not in r.output


@pytest.mark.gpu
def test_replay_survives_eviction_of_cached_pooling_divisors():
    from caffe_compat.layers.vision import caffe_pool2d

    text = ('input: "data" input_shape { dim: 1 dim: 2 dim: 9 dim: 11 }\n'
            'layer { name: "p" type: "Pooling" bottom: "data" top: "p" '
            'pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }')
    net = Net(text, device="cuda")
    x = torch.randn(1, 2, 9, 11, device="cuda")
    graph = CudaGraphNet(net, data=x)
    with torch.no_grad():
        eager = net.forward(data=x)["p"].clone()
    for h in range(12, 12 + 80):   # more geometries than the cache keeps: the first is evicted
        caffe_pool2d(torch.randn(1, 1, h, 7, device="cuda"), 1, (3, 3), (2, 2), (1, 1))
    junk = [torch.full((4096,), 7.0, device="cuda") for _ in range(64)]  # reuse freed blocks
    assert torch.equal(graph(data=x)["p"], eager)
    del junk


# ----------------------------------------------------------------------------- Faster R-CNN trunk
def _tiny_frcnn(device: str = "cpu"):
    from caffe_compat.frcnn.config import cfg_from_file

    cfg_from_file(str(ROOT / "models" / "faster_rcnn_tiny" / "faster_rcnn_tiny.yml"))
    net = Net(str(ROOT / "models" / "faster_rcnn_tiny" / "test.prototxt"), seed=0, device=device,
              exact_layout=True)
    return net


def _frcnn_inputs(seed: int, device: str = "cpu", size=(160, 200)):
    g = torch.Generator().manual_seed(seed)
    return dict(data=(torch.rand(1, 3, *size, generator=g) * 50).to(device),
                im_info=torch.tensor([[float(size[0]), float(size[1]), 1.0]], device=device))


def test_trunk_split_is_before_the_first_layer_needing_the_host():
    from caffe_compat.cuda_graph import host_free_prefix
    from caffe_compat.frcnn.config import temporary_cfg

    with temporary_cfg():
        net = _tiny_frcnn()
        split = host_free_prefix(net, **_frcnn_inputs(0))
        names = [e.name for e in net.entries]
        assert names[names.index(split) + 1] == "proposal"
        # a net without such a layer is all trunk
        plain = Net(str(ROOT / "models" / "tiny_resnet" / "deploy.prototxt"))
        x = torch.zeros(plain.blob_shapes[plain.input_names[0]])
        assert host_free_prefix(plain, **{plain.input_names[0]: x}) == plain.entries[-1].name


def test_trunk_graphs_run_eagerly_off_cuda_with_the_same_outputs():
    from caffe_compat.cuda_graph import TrunkGraphs
    from caffe_compat.frcnn.config import temporary_cfg

    with temporary_cfg():
        net = _tiny_frcnn()
        tg = TrunkGraphs(net)
        with torch.no_grad():
            a = {k: v.clone() for k, v in tg.forward(**_frcnn_inputs(1)).items()}
            b = net.forward(**_frcnn_inputs(1))
        assert tg.eager == 1 and tg.replays == 0
        assert tg.input_names == net.input_names  # quacks like the net
        tg.allow_tf32 = True                        # settings reach the net
        assert net.allow_tf32 and "allow_tf32" not in tg.__dict__
        for k in b:
            assert torch.equal(a[k], b[k]), k


@pytest.mark.gpu
def test_trunk_graphs_replay_equals_eager_on_cuda():
    from caffe_compat.cuda_graph import TrunkGraphs
    from caffe_compat.frcnn.config import temporary_cfg

    with temporary_cfg():
        net = _tiny_frcnn("cuda")
        tg = TrunkGraphs(net, max_graphs=2)
        for seed, size in [(0, (160, 200)), (1, (160, 200)), (2, (200, 160)), (3, (160, 200)),
                           (4, (128, 128)), (5, (200, 160))]:
            inputs = _frcnn_inputs(seed, "cuda", size)
            with torch.no_grad():
                out = {k: v.clone() for k, v in tg.forward(**inputs).items()}
                ref = net.forward(**inputs)
            for k in ref:
                assert torch.equal(out[k], ref[k]), (seed, k)
        assert tg.captures == 4 and tg.replays == 6  # (128,128) evicted the oldest shape


def test_cudnn_autotune_is_scoped():
    from caffe_compat.precision import cudnn_autotune

    before = torch.backends.cudnn.benchmark
    with cudnn_autotune():
        assert torch.backends.cudnn.benchmark
        with cudnn_autotune():
            assert torch.backends.cudnn.benchmark
        assert torch.backends.cudnn.benchmark
    assert torch.backends.cudnn.benchmark == before
    with cudnn_autotune(False):
        assert torch.backends.cudnn.benchmark == before
