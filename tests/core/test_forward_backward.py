"""The core Net layer by layer: Caffe's graph with split layers and need-backward flags
(caffe_compat/insert_splits.py), ``forward(start=, end=)`` / ``backward(start=, end=)``
(caffe_compat/forward_backward.py).

Numbers are checked against the whole-graph forward and autograd's backward of the same
net in float64; the flags against what Caffe's Net::Init computes (src/caffe/net.cpp), which
tests/golden/pycaffe/net_basics.npz checks numerically through pycaffe.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat import Net
from caffe_compat.errors import GraphError

NET = """name: "fb"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 dim: 5 dim: 5 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "bn" type: "BatchNorm" bottom: "conv1" top: "bn1" }
layer { name: "relu1" type: "ReLU" bottom: "bn1" top: "bn1" }
layer { name: "pool1" type: "Pooling" bottom: "bn1" top: "pool1"
  pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "pool1" bottom: "conv2" top: "sum" }
layer { name: "ip" type: "InnerProduct" bottom: "sum" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "prob" type: "Softmax" bottom: "ip" top: "prob" }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" loss_weight: 0.5 }
"""

# no BatchNorm (its statistics count as parameters of lr_mult 1 in Net::Init, as Caffe's
# BatchNorm masks them only in its own copy of the LayerParameter); then no force_backward,
# conv1 frozen, conv2 not propagating into pool1 (net_basics' FROZEN)
PLAIN = NET.replace('layer { name: "bn" type: "BatchNorm" bottom: "conv1" top: "bn1" }\n', "").replace(
    '"bn1"', '"conv1"')
FROZEN = PLAIN.replace('top: "conv1"\n  convolution_param',
                     'top: "conv1"\n  param { lr_mult: 0 } param { lr_mult: 0 }\n  convolution_param').replace(
    'bottom: "pool1" top: "conv2"', 'bottom: "pool1" top: "conv2" propagate_down: false')


def make(text: str = NET, phase: str = "train", seed: int = 3) -> Net:
    net = Net(text, phase=phase, seed=seed)
    return net.to(torch.float64)


def inputs(seed: int = 0):
    rng = np.random.RandomState(seed)
    return {"data": torch.from_numpy(rng.randn(2, 3, 5, 5)),
            "label": torch.tensor([0.0, 2.0], dtype=torch.float64)}


def grads(net: Net):
    return {i.key: i.param.grad.clone() for i in net.learnable_params()}


def test_caffe_steps_insert_splits_with_caffe_names():
    net = make()
    steps = net.caffe_steps
    assert [s.name for s in steps] == ["data", "conv1", "bn", "relu1", "pool1", "pool1_pool1_0_split",
                                       "conv2", "sum", "ip", "ip_ip_0_split", "prob", "loss"]
    split = steps[5]
    assert split.is_split and split.bottoms == ["pool1"]
    assert split.tops == ["pool1_pool1_0_split_0", "pool1_pool1_0_split_1"]
    assert steps[6].bottoms == ["pool1_pool1_0_split_0"]
    assert steps[7].bottoms == ["pool1_pool1_0_split_1", "conv2"]
    assert net.split_sources["ip_ip_0_split_1"] == "ip"
    assert [s.name for s in net.entries] == [s.name for s in steps if not s.is_split]  # the core's layers


def test_need_backward_flags_follow_net_init():
    """lr_mult 0 and propagate_down: false cut the backward below conv2; prob's top reaches
    no loss; SoftmaxWithLoss never sends diffs to its labels (Net::Init)."""
    net = make(FROZEN)
    need = {s.name: s.need_backward for s in net.caffe_steps}
    assert need == {"data": False, "conv1": False, "relu1": False, "pool1": False,
                    "pool1_pool1_0_split": False, "conv2": True, "sum": True, "ip": True,
                    "ip_ip_0_split": True, "prob": False, "loss": True}
    by = {s.name: s for s in net.caffe_steps}
    assert by["sum"].bottom_need_backward == [False, True]
    assert by["conv2"].bottom_need_backward == [False] and by["conv2"].param_propagate_down == [True, True]
    assert by["conv1"].param_propagate_down == [False, False]
    assert by["loss"].bottom_need_backward == [True, False]
    assert {s.name: s.need_backward for s in make(NET).caffe_steps}["bn"]  # see PLAIN
    forced = make("force_backward: true\n" + FROZEN)
    by = {s.name: s for s in forced.caffe_steps}
    assert all(s.need_backward for s in forced.caffe_steps)
    assert by["conv1"].param_propagate_down == [True, True]
    assert by["conv2"].bottom_need_backward == [True]       # force_backward overrides propagate_down
    assert by["loss"].bottom_need_backward == [True, False]  # AllowForceBackward(1) is false


def test_ranged_forward_equals_the_whole_forward():
    whole, ranged = make(), make()
    x = inputs()
    out = whole.forward(**x)
    got = ranged.forward(start="data", **x)
    for k in out:
        torch.testing.assert_close(got[k], out[k].detach(), rtol=1e-12, atol=1e-12)
    assert float(ranged.loss) == pytest.approx(float(whole.loss.detach()), rel=1e-12)
    assert ranged.loss.dtype == torch.float64 and not ranged.loss.requires_grad
    # two halves, the second reading what the first left in the blobs
    halves = make()
    halves.forward(end="pool1", **x)
    assert "ip" not in halves.blobs and halves.loss is None
    halves.forward(start="pool1_pool1_0_split")
    torch.testing.assert_close(halves.blobs["prob"], out["prob"].detach(), rtol=1e-12, atol=1e-12)
    assert list(halves.blobs) == [n for n in whole.blob_names]  # Caffe's order


def test_a_range_reads_what_the_blobs_hold():
    net = make()
    x = inputs()
    net.forward(start=0, **x)
    net.blobs["conv2"] = torch.full_like(net.blobs["conv2"], 0.5)
    net.forward(start="sum")
    torch.testing.assert_close(net.blobs["sum"], net.blobs["pool1"] + 0.5)


def test_ranged_backward_equals_autograd():
    whole, ranged = make(), make()
    x = inputs()
    whole.forward(**x)
    whole.backward()
    ranged.forward(start=0, **x)
    ranged.backward()  # after a ranged forward: Caffe's Backward, layer by layer
    g0, g1 = grads(whole), grads(ranged)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-12)
    # every blob has its diff, split tops separately, the source their sum
    d = ranged.diffs
    torch.testing.assert_close(d["pool1"], d["pool1_pool1_0_split_0"] + d["pool1_pool1_0_split_1"])
    assert "ip_ip_0_split_0" not in d                  # prob reaches no loss: no diff written
    assert "data" not in d and "label" not in d        # nothing needs them
    assert ranged.caffe_steps[-1].loss_weights == [0.5] and "loss" not in d  # its weight is the default diff


def test_backward_ranges_and_top_diffs():
    net = make("force_backward: true\n" + NET)
    x = inputs()
    net.forward(start=0, **x)
    g = torch.randn(2, 3, dtype=torch.float64)
    net.backward(start="prob", end="prob", prob=g)       # only the Softmax
    p = net.blobs["prob"]
    want = p * (g - (g * p).sum(1, keepdim=True))
    torch.testing.assert_close(net.diffs["ip_ip_0_split_0"], want)
    assert "ip" not in net.diffs
    net.backward(start="ip_ip_0_split", end="ip")
    assert net.learnable_params()[-1].param.grad is not None
    assert net.learnable_params()[0].param.grad is None  # conv1 not reached
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        net.backward(start="nope")
    with pytest.raises(GraphError, match="not a blob"):
        net.backward(start="prob", nope=g)


def test_backward_without_forward_runs_on_the_blobs():
    """Caffe's Net::BackwardFromTo does not ask whether Forward ran: each layer's backward
    reads the blobs as they are.  A net given another net's blob data (and no forward)
    computes the same diffs; rerunning layers for their gradients changes no state."""
    ran, fresh = make("force_backward: true\n" + NET), make("force_backward: true\n" + NET)
    x = inputs()
    ran.forward(start=0, **x)
    ran.backward()
    bn = fresh.layer("bn")
    stats = [b.clone() for b in bn.buffers()]
    gen = fresh.generator.get_state()
    for k, v in ran.blobs.items():
        fresh.blobs[k] = v.clone()
    fresh.backward(start="loss")  # no forward ever ran in this net
    for k in ran.diffs:
        torch.testing.assert_close(fresh.diffs[k], ran.diffs[k], rtol=1e-10, atol=1e-12, msg=k)
    g0, g1 = grads(ran), grads(fresh)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-10, atol=1e-12, msg=k)
    assert all(torch.equal(a, b) for a, b in zip(stats, bn.buffers()))  # running statistics kept
    assert torch.equal(gen, fresh.generator.get_state())


def test_backward_recomputes_a_layer_whose_bottom_changed():
    net = make("force_backward: true\n" + NET)
    net.forward(start=0, **inputs())
    new = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    net.blobs["sum"] = new                  # written after the forward (a script's edit)
    net.backward(start="ip", end="ip", ip=torch.ones(2, 3, dtype=torch.float64))
    w = net.layer("ip").weight
    torch.testing.assert_close(w.grad, torch.ones(3, 2, dtype=torch.float64) @ new.reshape(2, -1))


def test_whole_forward_after_layerwise_uses_autograd_again():
    net = make()
    x = {k: v.clone().requires_grad_(k == "data") for k, v in inputs().items()}
    net.forward(start=0, **x)
    net.backward()
    net.forward(**x)
    assert net.loss.requires_grad
    net.backward()
    assert x["data"].grad is not None  # the plain path reaches the input tensor


def test_in_place_layer_on_a_shared_blob_is_refused_only_by_the_caffe_view():
    text = NET.replace('layer { name: "relu1" type: "ReLU" bottom: "bn1" top: "bn1" }\n', "") + \
        'layer { name: "relu1" type: "ReLU" bottom: "pool1" top: "pool1" }\n'
    net = make(text)
    net.forward(**inputs())  # the whole-graph net accepts it (names rebind)
    with pytest.raises(GraphError, match="produced by multiple sources"):
        net.forward(start=0)
