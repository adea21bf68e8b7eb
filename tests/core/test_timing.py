"""``caffe_compat.timing`` (``caffe-compat time``): what is timed, as Caffe's ``caffe time``."""
from __future__ import annotations

from caffe_compat import Net
from caffe_compat.timing import time_net

TRAIN_NET = """
input: "data" input_shape { dim: 4 dim: 6 }
input: "label" input_shape { dim: 4 }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_nets_with_a_loss_time_backward_too():
    net = Net(TRAIN_NET, phase="train")
    r = time_net(net, 2, warmup=1)
    assert r.backward_ms is not None and r.backward_ms >= 0
    assert list(r.layer_forward_ms) == ["ip", "loss"]
    assert set(r.layer_backward_ms) == {"ip", "loss"}  # Caffe's per-layer backward lines
    assert "\tbackward: " in "\n".join(r.lines())
    assert any(line.startswith("Average Forward-Backward") for line in r.lines())


def test_nets_without_a_loss_time_forward_only():
    net = Net(TRAIN_NET.replace('layer { name: "loss"', '# layer { name: "loss"'), phase="test")
    r = time_net(net, 2, warmup=1, per_layer=False)
    assert r.backward_ms is None and r.layer_forward_ms == {}
    assert r.lines()[-1].startswith("Average Forward pass")
