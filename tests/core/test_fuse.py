"""The opt-in BatchNorm (+ Scale) folding pass (caffe_compat/fuse.py, ``Net.fuse_batchnorm``).

Folding must not change any number Caffe exposes beyond float rounding: the fused net's
outputs and every blob still present equal the unfused net's (1e-5 relative), on seeded
random statistics, and the real ResNet-50 still matches real Caffe's golden output.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from caffe_compat import Net
from caffe_compat.errors import GraphError, WeightsError

HEAD = ('name: "f"\nlayer { name: "data" type: "Input" top: "data"\n'
        '  input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }\n')


def conv(name: str, bottom: str, top: str, n: int = 6, bias: bool = True, group: int = 1,
         extra: str = "") -> str:
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}" {extra}\n'
            f'  convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 group: {group} '
            f'bias_term: {str(bias).lower()} }} }}\n')


def bn(name: str, bottom: str, top: str, extra: str = "") -> str:
    return f'layer {{ name: "{name}" type: "BatchNorm" bottom: "{bottom}" top: "{top}" {extra} }}\n'


def scale(name: str, bottom: str, top: str, bias: bool = True, extra: str = "") -> str:
    return (f'layer {{ name: "{name}" type: "Scale" bottom: "{bottom}" top: "{top}"\n'
            f'  scale_param {{ bias_term: {str(bias).lower()} {extra} }} }}\n')


def relu(name: str, bottom: str, top: str) -> str:
    return f'layer {{ name: "{name}" type: "ReLU" bottom: "{bottom}" top: "{top}" }}\n'


# every foldable form: in place, bias or not, groups, Scale with/without bias, BN alone,
# scale factor 0, a scalar Scale, and a non-in-place chain whose blobs nothing else reads
FOLDABLE = HEAD + (
    conv("c1", "data", "c1") + bn("bn1", "c1", "c1") + scale("sc1", "c1", "c1") + relu("r1", "c1", "c1")
    + conv("c2", "c1", "c2", bias=False, group=2) + bn("bn2", "c2", "c2")
    + scale("sc2", "c2", "c2", bias=False)
    + conv("c3", "c2", "c3") + bn("bn3", "c3", "c3") + relu("r3", "c3", "c3")
    + conv("c4", "c3", "c4", bias=False) + bn("bn4", "c4", "c4") + scale("sc4", "c4", "c4")
    + conv("c5", "c4", "c5", group=3) + bn("bn5", "c5", "b5") + scale("sc5", "b5", "s5")
    + relu("r5", "s5", "s5")
    + conv("c6", "s5", "c6", bias=False) + bn("bn6", "c6", "c6")
    + scale("sc6", "c6", "c6", extra="num_axes: 0")
)
FOLDED = ["bn1", "sc1", "bn2", "sc2", "bn3", "bn4", "sc4", "bn5", "sc5", "bn6", "sc6"]


def randomize(net: Net, seed: int = 0, zero_sf: tuple = ("bn4",)) -> Net:
    """Seeded random weights and running statistics (Caffe's stored sums and factor)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for e in net.entries:
            m = e.module
            if e.type == "BatchNorm":
                sf = 0.0 if e.name in zero_sf else 0.5 + float(torch.rand((), generator=g))
                m.scale_factor.fill_(sf)
                m.running_mean.copy_(torch.randn(m.channels, generator=g) * (sf or 1))
                m.running_var.copy_((torch.rand(m.channels, generator=g) + 0.1) * (sf or 1))
            else:
                for t in m.caffe_blobs() if m is not None else ():
                    t.copy_(torch.randn(t.shape, generator=g) * (0.3 if e.type == "Convolution" else 1.0))
    return net


def pair(text: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    ref = randomize(Net(text), seed).to(dtype)
    fused = randomize(Net(text), seed).to(dtype)
    return ref, fused


def run(net: Net, x: torch.Tensor):
    with torch.no_grad():
        out = net.forward(data=x)
    return out, dict(net.blobs)


def assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float, what: str) -> None:
    scale = max(float(b.abs().max()), 1e-6)
    err = float((a.double() - b.double()).abs().max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_equals_unfused(dtype):
    ref, fused = pair(FOLDABLE, dtype)
    n_entries, n_blobs = len(ref.entries), len(ref.blob_names)
    assert fused.fuse_batchnorm() == FOLDED
    assert len(fused.entries) == n_entries - len(FOLDED)
    assert [e.type for e in fused.entries].count("BatchNorm") == 0
    # non-in-place chain: its two intermediate blobs are gone, the conv writes the Scale's top
    assert fused.entries[[e.name for e in fused.entries].index("c5")].tops == ["s5"]
    assert len(fused.blob_names) == n_blobs - 2
    assert "c5" not in fused.blob_names and "b5" not in fused.blob_names
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1), dtype=dtype)
    out_r, blobs_r = run(ref, x)
    out_f, blobs_f = run(fused, x)
    assert list(out_f) == list(out_r) == ["c6"]
    assert set(blobs_f) == set(blobs_r) - {"c5", "b5"}
    rtol = 1e-5 if dtype == torch.float32 else 1e-12
    for k, v in blobs_f.items():
        assert v.dtype == dtype
        assert_close(v, blobs_r[k], rtol, k)
    # a second pass finds nothing more
    assert fused.fuse_batchnorm() == []


def test_folded_layers_leave_nothing_stale(tmp_path):
    ref, fused = pair(FOLDABLE)
    fused.fuse_batchnorm()
    gone = set(FOLDED)
    assert not gone & set(fused.layer_names)
    assert not any(k.split(".")[0] in gone for k in fused.state_dict())
    assert not any(k.split(".")[0] in gone for k in fused.param_infos)
    assert len(list(fused.parameters())) == len(fused.learnable_params())
    # bias-less convolutions received a learnable bias, right after their weight
    keys = list(fused.param_infos)
    for c in ("c2", "c4", "c6"):
        assert fused.layer(c).bias_term and fused.layer(c).bias is not None
        assert keys.index(f"{c}.bias") == keys.index(f"{c}.weight") + 1
    # the kept definition describes the fused net
    assert [lp.name for lp in fused.net_param.layer] == fused.layer_names
    lp = {lp.name: lp for lp in fused.net_param.layer}
    assert lp["c2"].convolution_param.bias_term and list(lp["c5"].top) == ["s5"]
    # the documented workflow: save the fused weights, load them into another fused net
    path = tmp_path / "fused.safetensors"
    fused.save_weights(str(path))
    other = Net(FOLDABLE)
    other.fuse_batchnorm()
    other.load_weights(str(path))
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(run(other, x)[0]["c6"], run(fused, x)[0]["c6"])
    fused.save_weights(str(tmp_path / "fused.caffemodel"))  # two blobs per fused conv
    # reshaping and the inspect table work on the fused graph
    from caffe_compat.summary import layer_rows

    assert fused.reshape(data=(1, 4, 12, 12))["c6"] == (1, 6, 12, 12)
    assert [r.name for r in layer_rows(fused)] == fused.layer_names


def test_unfused_weights_into_a_fused_net_are_refused_untouched(tmp_path):
    ref, fused = pair(FOLDABLE)
    path = tmp_path / "unfused.caffemodel"
    ref.save_weights(str(path))
    fused.fuse_batchnorm()
    before = {k: v.clone() for k, v in fused.state_dict().items()}
    with pytest.raises(WeightsError, match=r"layer 'bn1'.*folded into convolution 'c1'.*load the weights first"):
        fused.load_weights(str(path))
    after = fused.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing copied


def test_layer_lookup_of_folded_layer_says_so():
    _, fused = pair(FOLDABLE)
    fused.fuse_batchnorm()
    with pytest.raises(GraphError, match=r"layer 'bn1'.*folded into convolution 'c1' by fuse_batchnorm"):
        fused.layer("bn1")
    with pytest.raises(GraphError, match=r"folded into convolution 'c5'"):
        fused.layer("sc5")
    with pytest.raises(GraphError, match="no layer named"):
        fused.layer("nope")


SHARED = 'param { name: "w" } param { name: "bb" }'
NOT_FOLDED = [
    # BatchNorm computing batch statistics (a training net)
    ("train", HEAD + conv("c", "data", "c") + bn("b", "c", "c") + scale("s", "c", "c"), "train", []),
    # the conv top is read by another layer as well (non-in-place BN)
    ("shared_top", HEAD + conv("c", "data", "c") + bn("b", "c", "n") + scale("s", "n", "n")
     + 'layer { name: "e" type: "Eltwise" bottom: "c" bottom: "n" top: "e" }\n', "test", []),
    # another layer reads the conv top before the in-place BN
    ("read_before", HEAD + conv("c", "data", "c") + relu("r", "c", "r") + bn("b", "c", "c")
     + 'layer { name: "e" type: "Eltwise" bottom: "c" bottom: "r" top: "e" }\n', "test", []),
    # the BN's top is read elsewhere besides the Scale: BN folds, the Scale does not
    ("bn_top_shared", HEAD + conv("c", "data", "c") + bn("b", "c", "n") + scale("s", "n", "s")
     + 'layer { name: "e" type: "Eltwise" bottom: "n" bottom: "s" top: "e" }\n', "test", ["b"]),
    # Scale with two bottoms: BN folds alone, the Scale stays
    ("scale_two_bottoms", HEAD
     + 'layer { name: "gi" type: "Input" top: "g" input_param { shape { dim: 6 } } }\n'
     + conv("c", "data", "c") + bn("b", "c", "c")
     + 'layer { name: "s" type: "Scale" bottom: "c" bottom: "g" top: "c" scale_param { bias_term: true } }\n',
     "test", ["b"]),
    # Deconvolution
    ("deconv", HEAD + conv("c", "data", "c").replace('"Convolution"', '"Deconvolution"')
     + bn("b", "c", "c"), "test", []),
    # shared convolution weights
    ("shared_weights", HEAD + conv("c", "data", "c", n=4, extra=SHARED) + bn("b", "c", "c")
     + conv("c2", "c", "c2", n=4, extra=SHARED), "test", []),
]


@pytest.mark.parametrize("name,text,phase,expected", NOT_FOLDED, ids=[c[0] for c in NOT_FOLDED])
def test_left_unfused(name, text, phase, expected):
    ref = randomize(Net(text, phase=phase))
    fused = randomize(Net(text, phase=phase))
    n = len(fused.entries)
    assert fused.fuse_batchnorm() == expected
    assert len(fused.entries) == n - len(expected)
    feeds = {"data": torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(3))}
    if "g" in ref.input_names:
        feeds["g"] = torch.randn(6, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out_r = ref.forward(**feeds)
        out_f = fused.forward(**feeds)
    assert list(out_f) == list(out_r)
    for k in fused.blobs:
        assert_close(fused.blobs[k], ref.blobs[k], 1e-5, k)


@pytest.mark.parametrize("order", ["fuse_first", "layout_first"])
def test_fused_channels_last(order):
    ref, fused = pair(FOLDABLE)
    if order == "fuse_first":
        fused.fuse_batchnorm()
        fused.channels_last()
    else:
        fused.channels_last()
        fused.fuse_batchnorm()
    for e in fused.entries:
        if e.type == "Convolution":
            assert e.module.weight.is_contiguous(memory_format=torch.channels_last), e.name
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(5))
    out_r, blobs_r = run(ref, x)
    out_f, blobs_f = run(fused, x)
    for k, v in blobs_f.items():
        assert_close(v, blobs_r[k], 1e-5, k)


def _nsfw_fused(device="cpu", channels_last=False):
    from conftest import GOLDEN
    from test_nsfw_resnet50 import nsfw_dir

    d = nsfw_dir()
    g = np.load(GOLDEN / "nsfw_resnet50.npz")
    net = Net(d / "deploy.prototxt", weights=str(d / "resnet_50_1by2_nsfw.caffemodel"), device=device)
    n = len(net.entries)
    folded = net.fuse_batchnorm()
    if channels_last:
        net.channels_last()
    return net, g, n, folded


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_nsfw_resnet50_fused_matches_caffe(layout):
    net, g, n, folded = _nsfw_fused(channels_last=layout == "nhwc")
    from make_nsfw import KEEP, nsfw_input
    convs = sum(e.type == "Convolution" for e in net.entries)
    assert len(folded) == 2 * convs == 106  # every conv has its BN and Scale, in place
    assert len(net.entries) == n - len(folded)
    with torch.no_grad():
        out = net.forward(data=nsfw_input())
    np.testing.assert_allclose(out["prob"].numpy(), g["blob/prob"], rtol=1e-5)
    for k in KEEP:  # in-place folding keeps every blob Caffe exposes
        a = net.blobs[k].numpy()
        ref = g[f"blob/{k}"] if f"blob/{k}" in g else g[f"sample/{k}"]
        a = a if f"blob/{k}" in g else a.reshape(-1)[::997]
        np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.gpu
def test_nsfw_resnet50_fused_cuda():
    net, g, _, folded = _nsfw_fused(device="cuda")
    from make_nsfw import nsfw_input
    assert len(folded) == 106
    with torch.no_grad():
        prob = net.forward(data=torch.from_numpy(nsfw_input()).cuda())["prob"].cpu().numpy()
    np.testing.assert_allclose(prob, g["blob/prob"], rtol=1e-5)


def test_time_cli_fuse_batchnorm(tmp_path):
    from caffe_compat.cli.main import main

    model = tmp_path / "net.prototxt"
    model.write_text(HEAD + conv("c", "data", "c") + bn("b", "c", "c") + scale("s", "c", "c"))
    r = CliRunner().invoke(main, ["time", "--model", str(model), "--phase", "test", "-n", "2",
                                  "--fuse-batchnorm", "--channels-last"])
    assert r.exit_code == 0, r.output
    assert "Folded 2 BatchNorm/Scale layer(s) into convolutions" in r.output
    assert "Average Forward pass" in r.output and "\tforward" in r.output
    assert " b\tforward" not in r.output  # the folded layers are not timed
    r = CliRunner().invoke(main, ["time", "--model", str(model), "-n", "1", "--fuse-batchnorm"])
    assert r.exit_code == 0, r.output
    assert "Folded 0" in r.output and "--phase test" in r.output  # TRAIN: batch statistics
