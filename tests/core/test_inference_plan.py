"""The default grad-free TEST inference plan (caffe_compat/inference_plan.py) keeps Caffe's
numbers and ``net.blobs``.

The plan (NHWC, prepacked oneDNN weights, BatchNorm/Scale folded and ReLU fused where they
overwrite a convolution's top in place, packed InnerProduct) must give every blob the value
the exact layer-by-layer path (``exact_layout=True``) gives, within 1e-5 of the blob's
largest magnitude; the comparison must be able to fail; the parameters, training and
backward must not change; weights edited after a forward must be used by the next one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat import inference_plan
from golden_util import check_golden, golden_files

pytestmark = pytest.mark.skipif(not inference_plan._has_mkldnn_ops(),
                                reason="torch built without oneDNN: the plan never applies")

HEAD = ('name: "p"\nlayer { name: "data" type: "Input" top: "data"\n'
        '  input_param { shape { dim: 2 dim: 4 dim: 9 dim: 9 } } }\n')


def conv(name, bottom, top, n=6, bias=True, extra=""):
    return (f'layer {{ name: "{name}" type: "Convolution" bottom: "{bottom}" top: "{top}"\n'
            f'  convolution_param {{ num_output: {n} kernel_size: 3 pad: 1 bias_term: {str(bias).lower()} '
            f'{extra} }} }}\n')


def layer(name, typ, bottom, top, extra=""):
    return f'layer {{ name: "{name}" type: "{typ}" bottom: "{bottom}" top: "{top}" {extra} }}\n'


#: conv -> BN -> Scale -> ReLU in place (folded + fused), a conv whose ReLU is not in place
#: (its top must stay visible), a non-in-place BN (not folded), max pooling, an
#: InnerProduct with an in-place ReLU and a softmax
NET = (HEAD + conv("c1", "data", "c1", bias=False) + layer("bn1", "BatchNorm", "c1", "c1")
       + layer("sc1", "Scale", "c1", "c1", "scale_param { bias_term: true }")
       + layer("r1", "ReLU", "c1", "c1")
       + conv("c2", "c1", "c2") + layer("r2", "ReLU", "c2", "r2")
       + conv("c3", "r2", "c3", n=5) + layer("bn3", "BatchNorm", "c3", "bn3")
       + layer("pool", "Pooling", "bn3", "pool", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
       + layer("lrn", "LRN", "pool", "lrn", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 }")
       + layer("ip", "InnerProduct", "lrn", "ip", "inner_product_param { num_output: 7 }")
       + layer("rip", "ReLU", "ip", "ip") + layer("prob", "Softmax", "ip", "prob"))


def seeded(net: Net, seed: int = 0) -> Net:
    """Weights N(0, 1/fan_in), biases and BatchNorm statistics random (var > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(net.named_parameters()) + list(net.named_buffers()):
            if name.endswith("scale_factor"):
                t.fill_(1.0)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() > 1:
                t.copy_(torch.randn(t.shape, generator=g) / t[0].numel() ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return net


def blobs_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    assert list(a) == list(b)
    for k in a:
        x, y = a[k].detach().numpy(), b[k].detach().numpy()
        assert x.shape == y.shape, k
        scale = max(float(np.abs(y).max()), 1e-6)
        err = float(np.abs(x.astype(np.float64) - y).max())
        assert err <= rtol * scale, f"blob '{k}': {err:.3g} > {rtol} * {scale:.3g}"


def pair(proto, shape=None, seed=0):
    kw = {"input_shapes": {"data": shape}} if shape else {}
    fast = seeded(Net(proto, **kw), seed)
    exact = Net(proto, exact_layout=True, **kw)
    exact.load_state_dict(fast.state_dict())
    return fast, exact


def run(net: Net, x: torch.Tensor, mode=torch.no_grad) -> dict:
    with mode():
        net.forward(data=x)
    return {k: v.clone() for k, v in net.blobs.items()}


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_plan_equals_exact_path(mode):
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    got = run(fast, x, mode)
    assert inference_plan.applies(fast) is False  # grad is on again out here
    plan = inference_plan.plan_for(fast)
    names = [e.name for e in fast.entries]
    fused = {names[i]: [names[j] for j in fc.absorbed] for i, fc in plan.convs.items()}
    assert fused == {"c1": ["bn1", "sc1", "r1"], "c2": [], "c3": [], "ip": ["rip"]}
    assert got["c1"].is_contiguous(memory_format=torch.channels_last)  # the plan ran
    blobs_close(got, run(exact, x))
    assert set(got) == {"data", "c1", "c2", "r2", "c3", "bn3", "pool", "lrn", "ip", "prob"}


def test_comparison_can_fail():
    """A plan whose packed weights are stale gives other numbers, and the check sees it."""
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9)
    run(fast, x)
    fc = inference_plan.plan_for(fast).convs[1]  # c1 (entry 0 is the input)
    w, b = fc._packed
    fc._packed = (w, b + 1.0 if b is not None else None)
    with pytest.raises(AssertionError):
        blobs_close(run(fast, x), run(exact, x))


def test_parameters_untouched_and_training_unaffected():
    fast, exact = pair(NET)
    before = {k: (v.clone(), v.stride()) for k, v in fast.state_dict().items()}
    x = torch.randn(2, 4, 9, 9)
    run(fast, x)
    for k, v in fast.state_dict().items():
        assert torch.equal(v, before[k][0]) and v.stride() == before[k][1], k
    # with grad on, the plain path runs and backward is the exact net's
    out = fast.forward(data=x)["prob"]
    assert not fast.blobs["c1"].is_contiguous(memory_format=torch.channels_last)
    (out * torch.arange(7.0)).sum().backward()
    out2 = exact.forward(data=x)["prob"]
    (out2 * torch.arange(7.0)).sum().backward()
    for (k, p), q in zip(fast.named_parameters(), exact.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7), k


def test_weights_edited_after_a_forward_are_used():
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9)
    run(fast, x)
    with torch.no_grad():
        for net in (fast, exact):
            net.layer("c1").weight.mul_(-2.0)
            net.layer("bn1").running_var.add_(3.0)
            net.layer("ip").weight.add_(0.25)
    blobs_close(run(fast, x), run(exact, x))
    # a new batch size re-packs too
    y = torch.randn(3, 4, 9, 9)
    blobs_close(run(fast, y), run(exact, y))


def test_opt_out_and_train_phase_keep_the_plain_path():
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9)
    assert not run(exact, x)["c1"].is_contiguous(memory_format=torch.channels_last)
    fast.exact_layout = True
    assert not run(fast, x)["c1"].is_contiguous(memory_format=torch.channels_last)
    train = Net(NET, phase="train")
    with torch.no_grad():
        assert not inference_plan.applies(train)


def test_after_fuse_batchnorm_and_channels_last():
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9)
    ref = run(exact, x)
    fast.fuse_batchnorm()
    fast.channels_last()
    got = run(fast, x)
    blobs_close(got, {k: ref[k] for k in got})


def test_pooling_and_lrn_without_grad_equal_the_grad_path():
    x = torch.randn(2, 5, 11, 10)
    for extra in ("pool: MAX kernel_size: 3 stride: 2", "pool: MAX kernel_size: 2 stride: 3 pad: 1",
                  "pool: MAX kernel_size: 1 stride: 1"):
        proto = (HEAD.replace("dim: 4 dim: 9 dim: 9", "dim: 5 dim: 11 dim: 10")
                 + layer("p", "Pooling", "data", "p", f"pooling_param {{ {extra} }}")
                 + layer("l", "LRN", "p", "l", "lrn_param { local_size: 5 alpha: 0.3 beta: 0.75 k: 2 }"))
        net = Net(proto, phase="train")
        out = net.forward(data=x.clone().requires_grad_())
        with torch.no_grad():
            out2 = net.forward(data=x)
        for k in out:
            np.testing.assert_allclose(out2[k].numpy(), out[k].detach().numpy(), rtol=1e-6, atol=1e-7)
        assert net.blobs["p"].data_ptr() != x.data_ptr()


GOLDEN = [p for fam in ("vision", "common", "neuron") for p in golden_files(fam)]


@pytest.mark.parametrize("path", GOLDEN, ids=[f"{p.parent.name}/{p.stem}" for p in GOLDEN])
def test_golden_without_grad(path):
    """Real Caffe's recorded blobs, forward under no_grad (the plan for TEST nets)."""
    with torch.no_grad():
        check_golden(path, check_backward=False)


CORPUS_NETS = [
    ("bvlc-caffe/models/bvlc_alexnet/deploy.prototxt", (1, 3, 227, 227)),
    ("bvlc-caffe/models/bvlc_googlenet/deploy.prototxt", (1, 3, 224, 224)),
    ("forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt", (1, 3, 227, 227)),
    ("KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt", (1, 3, 224, 224)),
    ("shicai-MobileNet-Caffe/mobilenet_deploy.prototxt", (1, 3, 224, 224)),
]


@pytest.mark.parametrize("rel,shape", CORPUS_NETS, ids=[r.split("/")[-2] if "models" in r else r.split("/")[0]
                                                         for r, _ in CORPUS_NETS])
def test_corpus_nets_plan_equals_exact(corpus, rel, shape):
    p = corpus / rel
    if not p.exists():
        pytest.skip(f"{rel} not in the corpus")
    fast, exact = pair(p, shape)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    got = run(fast, x, torch.inference_mode)
    assert inference_plan.plan_for(fast).convs
    blobs_close(got, run(exact, x))


def test_forward_hooks_keep_the_layers():
    """Per-layer observers (``caffe-compat time``) see every layer run."""
    fast, _ = pair(NET)
    seen = []
    h = fast.layer("r1").register_forward_hook(lambda m, i, o: seen.append(m.name))
    try:
        with torch.no_grad():
            assert not inference_plan.applies(fast)
            fast.forward(data=torch.randn(2, 4, 9, 9))
    finally:
        h.remove()
    assert seen == ["r1"]
    with torch.no_grad():
        assert inference_plan.applies(fast)


def test_a_deep_copy_builds_its_own_plan():
    import copy

    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9)
    run(fast, x)
    twin = copy.deepcopy(fast)
    blobs_close(run(twin, x), run(exact, x))
    assert twin.__dict__["_inference_plan"][1] is not fast.__dict__["_inference_plan"][1]


# ----------------------------------------------------------------------------- ranged (pycaffe)
def _ranged(net: Net, x: torch.Tensor, start=0, end=None) -> dict:
    net.forward(data=x, start=start, end=end)   # grad mode on, as in a pycaffe script
    return {k: v.detach().clone() for k, v in net.blobs.items()}


def test_ranged_forward_takes_the_plan(monkeypatch):
    """pycaffe's net.forward() is Caffe's ForwardFromTo: the plan's groups run there too."""
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(1))
    calls = []
    orig = inference_plan.FusedConv.run
    monkeypatch.setattr(inference_plan.FusedConv, "run", lambda self, t: calls.append(1) or orig(self, t))
    got = _ranged(fast, x)
    assert len(calls) == 3  # c1 (+ bn1, sc1, r1), c2, c3
    blobs_close(got, _ranged(exact, x))


def test_ranged_forward_ending_inside_a_group_keeps_caffes_blob():
    """A range that stops after c1's BatchNorm leaves c1 holding the BatchNorm's output, not
    the folded conv + Scale + ReLU: the group runs layer by layer there."""
    fast, exact = pair(NET)
    x = torch.randn(2, 4, 9, 9, generator=torch.Generator().manual_seed(2))
    got = _ranged(fast, x, end="bn1")
    ref = _ranged(exact, x, end="bn1")
    blobs_close({"c1": got["c1"]}, {"c1": ref["c1"]})
    assert (ref["c1"] < 0).any()  # the ReLU did not run
    # then on from sc1: the rest of the net as a second range
    got2 = _ranged(fast, x, start="sc1")
    blobs_close(got2, _ranged(exact, x, start="sc1"))


def test_pycaffe_forward_takes_the_plan(tmp_path):
    import caffe_compat.pycaffe as caffe

    proto = tmp_path / "net.prototxt"
    proto.write_text(NET)
    fast, exact = pair(NET)
    w = tmp_path / "w.caffemodel"
    fast.save_weights(str(w))
    x = np.random.RandomState(3).randn(2, 4, 9, 9).astype(np.float32)
    net = caffe.Net(str(proto), str(w), caffe.TEST)
    out = net.forward(data=x)["prob"].copy()
    assert "_inference_plan" in net._core.__dict__  # the plan was built by the forward
    ref = run(exact, torch.from_numpy(x))["prob"].numpy()
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


def test_pycaffe_weight_edits_through_arrays_reach_the_plan(tmp_path):
    """numpy writes do not bump torch's version counters: parameters whose arrays the script
    still holds are marked changed at each forward, dropped arrays cost nothing."""
    import caffe_compat.pycaffe as caffe

    proto = tmp_path / "net.prototxt"
    proto.write_text(NET)
    fast, exact = pair(NET)
    w = tmp_path / "w.caffemodel"
    fast.save_weights(str(w))
    x = np.random.RandomState(4).randn(2, 4, 9, 9).astype(np.float32)
    net = caffe.Net(str(proto), str(w), caffe.TEST)
    net.forward(data=x)
    held = net.params["c2"][0].data
    held *= 2                                   # surgery through a held array
    net.params["ip"][0].data[...] *= 0.5        # through a temporary one
    got = net.forward(data=x)["prob"].copy()
    with torch.no_grad():
        exact.layer("c2").weight.mul_(2)
        exact.layer("ip").weight.mul_(0.5)
    ref = run(exact, torch.from_numpy(x))["prob"].numpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    ip_w = net._core.layer("ip").weight
    v = ip_w._version
    net.forward(data=x)
    assert ip_w._version == v                   # the temporary array is gone: no more bumps
    c2_w = net._core.layer("c2").weight
    v2 = c2_w._version
    net.forward(data=x)
    assert c2_w._version > v2                   # still held
    del held
