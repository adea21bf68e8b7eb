"""``Net.compile_forward``: torch.compile where it pays, with a tested fallback (issue 13).

Compiling costs seconds per net on this CPU, so the nets are tiny and the "eager" backend
(Dynamo's tracing, no code generation) stands in for Inductor; the GPU check script times
Inductor on the Faster R-CNN nets.
"""
from __future__ import annotations

import logging

import pytest
import torch

from caffe_compat import Net
from caffe_compat.errors import CaffeCompatError

TINY = """
name: "tiny"
input: "data" input_shape { dim: 4 dim: 6 }
input: "label" input_shape { dim: 4 }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
        inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
        inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _inputs():
    g = torch.Generator().manual_seed(0)
    return dict(data=torch.randn(4, 6, generator=g), label=torch.tensor([0.0, 2.0, 1.0, 2.0]))


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def test_compiled_forward_and_backward_equal_eager():
    eager = Net(TINY, phase="train", seed=1)
    comp = Net(TINY, phase="train", seed=1).compile_forward(backend="eager")
    for net in (eager, comp):
        net.forward(**_inputs())
        net.backward()
    c = comp.__dict__["_compiled_forward"]
    assert c.failed is None and c.calls_compiled == 1
    assert torch.equal(eager.blobs["loss"], comp.blobs["loss"])
    ge, gc = _grads(eager), _grads(comp)
    for k in ge:
        assert torch.equal(ge[k], gc[k]), k
    comp.compile_forward(None)
    assert "_compiled_forward" not in comp.__dict__


def _failing_backend(gm, example_inputs):
    raise RuntimeError("no C++ compiler here")


def test_compiler_failure_falls_back_to_eager_with_one_warning(caplog):
    eager = Net(TINY, seed=1)
    comp = Net(TINY, seed=1).compile_forward(backend=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="caffe_compat.compile"):
        with torch.no_grad():
            for _ in range(2):
                out = comp.forward(**_inputs())
    ref = eager.forward(**_inputs())
    assert torch.equal(out["loss"], ref["loss"])
    c = comp.__dict__["_compiled_forward"]
    assert c.failed is not None and c.calls_compiled == 0
    warnings = [r for r in caplog.records if "torch.compile of net 'tiny' failed" in r.getMessage()]
    assert len(warnings) == 1 and "no C++ compiler here" in warnings[0].getMessage()


def test_without_fallback_the_compiler_error_is_raised():
    comp = Net(TINY, seed=1).compile_forward(backend=_failing_backend, fallback=False)
    with pytest.raises(Exception, match="no C\\+\\+ compiler"):
        comp.forward(**_inputs())


def test_bad_input_is_the_nets_error_not_a_fallback():
    comp = Net(TINY, seed=1).compile_forward(backend="eager")
    bad = dict(_inputs(), label=torch.tensor([0.0, 7.0, 1.0, 2.0]))  # label out of range
    with pytest.raises(CaffeCompatError, match="label value 7"):
        comp.forward(**bad)
    assert comp.__dict__["_compiled_forward"].failed is None
