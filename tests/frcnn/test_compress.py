"""Fast R-CNN's truncated-SVD compression (``caffe_compat.frcnn.compress``, ``caffe-compat compress``).

References are independent: numpy's ``np.linalg.svd`` in float64 on the same weights, and
the original net run with its fc weights replaced by numpy's rank-l approximation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat.cli.main import main
from caffe_compat.errors import GraphError, SchemaError, WeightsError
from caffe_compat.frcnn.compress import compress_net, compressed_pairs, default_output
from caffe_compat.io import read_net_text
from caffe_compat.net import Net

from conftest import CORPUS

# conv1 -> fc1 (N=20, K=64: wide) -> fc2 (N=30, K=20: tall) -> out
_HEAD = """name: "tiny"
input: "data"
input_shape { dim: 2 dim: 3 dim: 6 dim: 6 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
"""
_TAIL = """
layer { name: "out" type: "InnerProduct" bottom: "{fc2}" top: "out" inner_product_param { num_output: {out_n} } }
"""
ORIG = _HEAD + """
layer { name: "fc1" type: "InnerProduct" bottom: "conv1" top: "fc1"
  inner_product_param { num_output: 20 {t1} {b1} } }
layer { name: "relu2" type: "ReLU" bottom: "fc1" top: "fc1" }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1" top: "fc2" inner_product_param { num_output: 30 } }
""" + _TAIL

SVD = _HEAD + """
layer { name: "fc1_L" type: "InnerProduct" bottom: "{l1_bottom}" top: "fc1_L"
  inner_product_param { num_output: {l1} bias_term: {l1_bias} {t1} } }
layer { name: "fc1_U" type: "InnerProduct" bottom: "{u1_bottom}" top: "fc1_U"
  inner_product_param { num_output: {u1_n} {t1} {u1b} } }
layer { name: "relu2" type: "ReLU" bottom: "fc1_U" top: "fc1_U" }
layer { name: "fc2_L" type: "InnerProduct" bottom: "fc1_U" top: "fc2_L"
  inner_product_param { num_output: {l2} bias_term: false } }
layer { name: "fc2_U" type: "InnerProduct" bottom: "fc2_L" top: "fc2_U" inner_product_param { num_output: 30 } }
""" + _TAIL


def fill(template: str, **kw) -> str:
    vals = dict(t1="", l1=20, l2=20, l1_bias="false", l1_bottom="conv1", u1_bottom="fc1_L", u1_n=20, b1="", u1b="",
                fc2="fc2", out_n=5)
    vals.update(kw)
    for k, v in vals.items():
        template = template.replace("{" + k + "}", str(v))
    return template


def orig_net(seed: int = 0, **kw) -> Net:
    net = Net(fill(ORIG, **kw), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if name.endswith("bias") else 1 / math.sqrt(p[0].numel())))
    return net


def svd_net(**kw) -> Net:
    kw.setdefault("fc2", "fc2_U")
    return Net(fill(SVD, **kw), seed=5)


def np_truncated(w: np.ndarray, l: int):
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    return u[:, :l], s[:l], vt[:l], np.sqrt((s[l:] ** 2).sum() / (s ** 2).sum())


def data(seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(np.random.RandomState(seed).randn(2, 3, 6, 6).astype(np.float32))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------ synthetic nets
@pytest.mark.parametrize("l1,l2", [(5, 7), (20, 20), (1, 1)])
def test_factors_are_numpys_truncated_svd(l1, l2):
    net, svd = orig_net(), svd_net(l1=l1, l2=l2)
    before_conv = net.layer("conv1").weight.clone()
    ranks = compress_net(net, svd)
    assert list(ranks) == ["fc1", "fc2"] and ranks["fc1"][0] == l1 and ranks["fc2"][0] == l2
    for x, l in (("fc1", l1), ("fc2", l2)):
        w = net.layer(x).weight.detach().numpy()
        u, s, vt, err = np_truncated(w, l)
        lo, up = svd.layer(x + "_L").weight.detach().numpy(), svd.layer(x + "_U").weight.detach().numpy()
        assert lo.shape == (l, w.shape[1]) and up.shape == (w.shape[0], l)
        assert lo.dtype == up.dtype == np.float32
        np.testing.assert_allclose(up @ lo, (u * s) @ vt, atol=1e-5 * np.abs(w).max())
        # the factors themselves, up to each singular pair's sign
        sign = np.sign((up * u).sum(0))
        np.testing.assert_allclose(up, u * sign, atol=1e-5)
        np.testing.assert_allclose(lo, (s[:, None] * vt) * sign[:, None], atol=1e-5 * s[0])
        assert ranks[x][1] == pytest.approx(err, rel=1e-6, abs=1e-7)
        assert torch.equal(svd.layer(x + "_U").bias, net.layer(x).bias)
    for name in ("conv1", "out"):  # the other layers, bit for bit
        for attr in ("weight", "bias"):
            assert torch.equal(getattr(svd.layer(name), attr), getattr(net.layer(name), attr))
    assert torch.equal(net.layer("conv1").weight, before_conv)


def test_full_rank_gives_the_same_outputs():
    net, svd = orig_net(), svd_net()
    ranks = compress_net(net, svd)
    assert all(err < 1e-6 for _, err in ranks.values())
    x = data()
    with torch.no_grad():
        ref, got = net.forward(data=x)["out"], svd.forward(data=x)["out"]
    assert rel(got, ref) < 1e-5


def test_truncation_error_is_the_expected_one():
    """Rank 5 / 7: outputs are those of the original net with numpy's rank-l weights."""
    net, svd = orig_net(), svd_net(l1=5, l2=7)
    compress_net(net, svd)
    x = data()
    with torch.no_grad():
        exact = net.forward(data=x)["out"].clone()
        for name, l in (("fc1", 5), ("fc2", 7)):
            u, s, vt, _ = np_truncated(net.layer(name).weight.numpy(), l)
            net.layer(name).weight.copy_(torch.from_numpy(((u * s) @ vt).astype(np.float32)))
        ref = net.forward(data=x)["out"]
        got = svd.forward(data=x)["out"]
    assert rel(got, ref) < 1e-5
    assert rel(got, exact) > 1e-2  # and the truncation does change the outputs


def test_transposed_inner_products():
    net, svd = orig_net(t1="transpose: true"), svd_net(t1="transpose: true", l1=20)
    assert tuple(svd.layer("fc1_L").weight.shape) == (64, 20)
    compress_net(net, svd)
    x = data()
    with torch.no_grad():
        assert rel(svd.forward(data=x)["out"], net.forward(data=x)["out"]) < 1e-5


def test_original_without_bias_gives_a_zero_bias():
    net, svd = orig_net(b1="bias_term: false"), svd_net()
    with torch.no_grad():
        svd.layer("fc1_U").bias.fill_(3.0)
    compress_net(net, svd)
    assert not svd.layer("fc1_U").bias.any()
    x = data()
    with torch.no_grad():
        assert rel(svd.forward(data=x)["out"], net.forward(data=x)["out"]) < 1e-5


def test_pairs_found_generically():
    assert compressed_pairs(orig_net(), svd_net()) == [("fc1", "fc1_L", "fc1_U"), ("fc2", "fc2_L", "fc2_U")]
    # only fc1 compressed: fc2 stays and is copied
    only1 = _HEAD + """
layer { name: "fc1_L" type: "InnerProduct" bottom: "conv1" top: "fc1_L"
  inner_product_param { num_output: 3 bias_term: false } }
layer { name: "fc1_U" type: "InnerProduct" bottom: "fc1_L" top: "fc1_U" inner_product_param { num_output: 20 } }
layer { name: "fc2" type: "InnerProduct" bottom: "fc1_U" top: "fc2" inner_product_param { num_output: 30 } }
""" + fill(_TAIL)
    net, svd = orig_net(), Net(only1)
    assert compress_net(net, svd).keys() == {"fc1"}
    assert torch.equal(svd.layer("fc2").weight, net.layer("fc2").weight)


# ------------------------------------------------------------------ errors
# conv1 "compressed" into two InnerProducts: only InnerProduct layers can be
CONV_SVD = fill(SVD, fc2="fc2_U").replace(
    'layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"\n'
    '  convolution_param { num_output: 4 kernel_size: 3 } }',
    'layer { name: "conv1_L" type: "InnerProduct" bottom: "data" top: "conv1_L"\n'
    '  inner_product_param { num_output: 4 bias_term: false } }\n'
    'layer { name: "conv1_U" type: "InnerProduct" bottom: "conv1_L" top: "conv1"\n'
    '  inner_product_param { num_output: 64 } }')
assert "conv1_U" in CONV_SVD

ERRORS = [
    ("l_too_big_wide", dict(l1=21), SchemaError, "min(N, K) = 20"),
    ("l_too_big_tall", dict(l2=21), SchemaError, "min(N, K) = 20"),
    ("u_wrong_n", dict(u1_n=19), SchemaError, "num_output N = 20"),
    ("l_has_bias", dict(l1_bias="true"), SchemaError, "bias_term: false"),
    ("k_mismatch", dict(l1_bottom="data"), GraphError, "K = 108"),
    ("u_not_after_l", dict(u1_bottom="conv1"), GraphError, "must take 'fc1_L''s output"),
    ("u_drops_the_bias", dict(u1b="bias_term: false"), SchemaError, "has a bias to carry over"),
    ("other_layer_shape", dict(out_n=6), WeightsError, "differs from the original"),
]


@pytest.mark.parametrize("kw,cls,text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_bad_compressed_definitions(kw, cls, text):
    net, svd = orig_net(), svd_net(**kw)
    before = {k: v.clone() for k, v in svd.state_dict().items()}
    with pytest.raises(cls) as ei:
        compress_net(net, svd)
    assert text in str(ei.value)
    # every check runs before anything is written
    assert all(torch.equal(before[k], v) for k, v in svd.state_dict().items())


def test_other_bad_pairs():
    with pytest.raises(GraphError, match="no compressed layers found"):
        compress_net(orig_net(), orig_net(seed=1))
    with pytest.raises(SchemaError, match="only InnerProduct.*'conv1' is Convolution"):
        compress_net(orig_net(), Net(CONV_SVD))
    renamed = fill(SVD, fc2="fc2_U").replace('name: "out"', 'name: "out2"')
    with pytest.raises(WeightsError, match="layer 'out2'.*no such layer"):
        compress_net(orig_net(), Net(renamed))


def test_default_output_name():
    ranks = {"fc6": (1024, 0.1), "fc7": (256, 0.2)}
    assert default_output("/m/vgg16_fast_rcnn_iter_40000.caffemodel", ranks) == \
        "/m/vgg16_fast_rcnn_iter_40000_svd_fc6_1024_fc7_256.caffemodel"
    assert default_output("w.safetensors", ranks) == "w_svd_fc6_1024_fc7_256.safetensors"
    assert default_output("weights", {"fc6": (8, 0.0)}) == "weights_svd_fc6_8.caffemodel"
    assert default_output("m.caffemodel.h5", ranks) == "m_svd_fc6_1024_fc7_256.caffemodel.h5"  # Caffe's HDF5


# ------------------------------------------------------------------ the CLI
def test_cli_end_to_end(tmp_path):
    net = orig_net()
    (tmp_path / "test.prototxt").write_text(fill(ORIG))
    (tmp_path / "svd.prototxt").write_text(fill(SVD, l1=5, l2=7, fc2="fc2_U"))
    net.save_weights(str(tmp_path / "w.caffemodel"))
    args = ["compress", "--def", str(tmp_path / "test.prototxt"), "--def-svd", str(tmp_path / "svd.prototxt"),
            "--net", str(tmp_path / "w.caffemodel")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    out = tmp_path / "w_svd_fc1_5_fc2_7.caffemodel"
    assert out.exists() and str(out) in r.output
    assert "fc1: l = 5, K = 64, N = 20" in r.output and "fc2: l = 7, K = 20, N = 30" in r.output
    ref = svd_net(l1=5, l2=7)
    compress_net(net, ref)
    loaded = Net(str(tmp_path / "svd.prototxt"), weights=str(out))
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    r = CliRunner().invoke(main, args + ["--out", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 0, r.output
    Net(str(tmp_path / "svd.prototxt"), weights=str(tmp_path / "c.safetensors"))


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "test.prototxt").write_text(fill(ORIG))
    (tmp_path / "svd.prototxt").write_text(fill(SVD, l1=64, fc2="fc2_U"))
    orig_net().save_weights(str(tmp_path / "w.caffemodel"))
    base = ["compress", "--def", str(tmp_path / "test.prototxt"), "--def-svd", str(tmp_path / "svd.prototxt")]
    r = CliRunner().invoke(main, base + ["--net", str(tmp_path / "w.caffemodel")])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "svd.prototxt:" in lines[0]
    assert "layer 'fc1_L'" in lines[0] and "min(N, K) = 20" in lines[0]
    r = CliRunner().invoke(main, base + ["--net", str(tmp_path / "missing.caffemodel")])
    assert r.exit_code == 2 and r.output.strip().splitlines() == [
        f"error: {tmp_path / 'missing.caffemodel'}: weights file not found"]


# ------------------------------------------------------------------ the corpus' compressed nets
FAST_RCNN = CORPUS / "rbgirshick-fast-rcnn" / "models"


def shrunk(path, scale: int = 8):
    """The corpus definition with its fc widths (4096) and ranks divided by ``scale``.

    The structure, names and ROI pooling stay; only the sizes shrink so that the
    4096 x 4096 eigendecompositions (about 20 s each on a 2-core CPU) become 512 x 512.
    """
    p = read_net_text(str(path))
    for lp in p.layer:
        if lp.type == "InnerProduct" and (lp.inner_product_param.num_output == 4096 or lp.name.endswith("_L")):
            lp.inner_product_param.num_output //= scale
    return p


def test_corpus_caffenet_compressed(corpus):
    d = FAST_RCNN / "CaffeNet"
    if not (d / "compressed" / "test.prototxt").is_file():
        pytest.skip(f"rbgirshick/fast-rcnn's CaffeNet definitions not found under {d}")
    net, svd = Net(shrunk(d / "test.prototxt"), seed=0), Net(shrunk(d / "compressed" / "test.prototxt"), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1 / math.sqrt(p[0].numel()) if p.dim() > 1 else 0.1))
    ranks = compress_net(net, svd)
    assert list(ranks) == ["fc6", "fc7"] and ranks["fc6"][0] == 128 and ranks["fc7"][0] == 32
    assert all(0 < err < 1 for _, err in ranks.values())
    rng = np.random.RandomState(0)
    image = rng.randn(1, 3, 128, 160).astype(np.float32) * 50
    rois = np.array([[0, 0, 0, 159, 127], [0, 10, 20, 90, 100], [0, 50, 30, 150, 120], [0, 5, 5, 40, 60]],
                    np.float32)
    with torch.no_grad():
        out = svd.forward(data=image, rois=rois)
    assert tuple(out["cls_prob"].shape) == (4, 21) and tuple(out["bbox_pred"].shape) == (4, 84)
    assert tuple(svd.blobs["fc6_L"].shape) == (4, 128) and tuple(svd.blobs["fc7_U"].shape) == (4, 512)
    assert all(torch.isfinite(t).all() for t in out.values())
    for name in ("conv1", "conv5", "cls_score", "bbox_pred"):
        assert torch.equal(svd.layer(name).weight, net.layer(name).weight)
