"""Host round trips inside a forward (issue 13: GPU inference without needless syncs).

The audit (caffe_compat.host_sync) sees the operations that make a GPU's host wait, on any
device, so the Faster R-CNN forwards are checked here on the CPU: only the proposal layer
(NMS and the min-size filter: data-dependent sizes), the RoI sampler (how many it draws)
and one read settling every validity check at the end of the forward remain.  Deferred
checks raise the same errors as immediate ones.
"""
from __future__ import annotations

import pytest
import torch

from caffe_compat import Net
from caffe_compat.errors import DataError, ShapeError
from caffe_compat.frcnn.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
from caffe_compat.frcnn.train import SolverWrapper, combined_roidb
from caffe_compat.host_sync import DeferredChecks, audit_host_syncs
from caffe_compat.trainer import load_solver_param, resolve_net_paths, seed_everything
from conftest import ROOT

TINY = ROOT / "models" / "faster_rcnn_tiny"


def _ops(report, layer):
    return [op.split(":")[0] for op in report.by_layer.get(layer, [])]


def test_faster_rcnn_test_forward_syncs_only_where_the_algorithm_needs():
    with temporary_cfg():
        cfg_from_file(str(TINY / "faster_rcnn_tiny.yml"))
        net = Net(str(TINY / "test.prototxt"), seed=0, exact_layout=True)  # as the audit runs
        g = torch.Generator().manual_seed(0)
        inputs = dict(data=torch.rand(1, 3, 160, 200, generator=g) * 50,
                      im_info=torch.tensor([[160.0, 200.0, 1.0]]))
        with torch.no_grad():
            ref = {k: v.clone() for k, v in net.forward(**inputs).items()}
            report = audit_host_syncs(net, **inputs)
        # the audited forward computed the same thing (deferred checks change no number)
        for k, v in ref.items():
            torch.testing.assert_close(net.blobs[k], v, rtol=0, atol=0)
    assert set(report.layers()) == {"proposal", "(end of forward: checks)"}, str(report)
    assert _ops(report, "proposal") == ["nonzero", "nms"]
    assert len(report.by_layer["(end of forward: checks)"]) == 1
    assert not net.checks.defer_on_cpu  # restored


def test_faster_rcnn_train_forward_syncs(tmp_path):
    d = str(tmp_path / "voc")
    write_dataset(d, 4, seed=1)
    with temporary_cfg():
        cfg_from_file(str(TINY / "faster_rcnn_tiny.yml"))
        cfg_from_list(["DATA_DIR", d])
        seed_everything(cfg.RNG_SEED)
        roidb = combined_roidb("voc_2007_trainval")[1]
        p = load_solver_param(str(TINY / "solver.prototxt"))
        resolve_net_paths(p, [str(ROOT)])
        sw = SolverWrapper(p, roidb, str(tmp_path / "out"), save_state=False)
        net = sw.solver.net
        net.forward()  # first forward: per-device constants and anchors are made once
        report = audit_host_syncs(net, phase_forward=lambda: net.forward())
    assert set(report.layers()) <= {"input-data", "proposal", "roi-data", "(end of forward: checks)"}, str(report)
    # the minibatch arriving from the host is the only copy in
    assert set(_ops(report, "input-data")) <= {"lift_fresh"}
    assert _ops(report, "proposal") == ["nonzero", "nms"]
    assert _ops(report, "roi-data") == ["tolist"]  # fg/bg counts: the sample's size
    assert len(report.by_layer["(end of forward: checks)"]) == 1


PYLAYER_NET = """
name: "syncs"
input: "x" input_shape { dim: 2 dim: 3 }
layer { name: "reads" type: "Python" bottom: "x" top: "y"
        python_param { module: "host_sync_probe" layer: "ReadsValue" } }
"""


def test_audit_reports_a_layer_reading_a_value(tmp_path, monkeypatch):
    """The audit can fail: a layer calling .item() is named."""
    (tmp_path / "host_sync_probe.py").write_text(
        "import caffe_compat.pycaffe as caffe\n"
        "class ReadsValue(caffe.Layer):\n"
        "    def setup(self, bottom, top): pass\n"
        "    def reshape(self, bottom, top): top[0].reshape(*bottom[0].data.shape)\n"
        "    def forward(self, bottom, top):\n"
        "        top[0].data[...] = bottom[0].data * 2\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    net = Net(PYLAYER_NET, allow_python_layers=True)
    x = torch.ones(2, 3)
    report = audit_host_syncs(net, x=x)
    assert "reads" in report.layers(), str(report)


LOSS_NET = """
name: "labels"
input: "x" input_shape { dim: 4 dim: 3 }
input: "label" input_shape { dim: 4 }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" }
"""

ROI_NET = """
name: "rois"
input: "feat" input_shape { dim: 1 dim: 2 dim: 8 dim: 8 }
input: "rois" input_shape { dim: 2 dim: 5 }
layer { name: "pool" type: "ROIPooling" bottom: "feat" bottom: "rois" top: "pooled"
        roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 1 } }
"""


def _message(net, defer: bool, **inputs) -> str:
    net.checks.defer_on_cpu = defer
    with pytest.raises((DataError, ShapeError)) as e:
        net.forward(**inputs)
    return str(e.value)


@pytest.mark.parametrize("text, inputs", [
    (LOSS_NET, dict(x=torch.zeros(4, 3), label=torch.tensor([0.0, 1.0, 3.0, 2.0]))),
    (ROI_NET, dict(feat=torch.zeros(1, 2, 8, 8),
                   rois=torch.tensor([[0.0, 0, 0, 3, 3], [1.0, 0, 0, 3, 3]]))),
    (ROI_NET, dict(feat=torch.zeros(1, 2, 8, 8),
                   rois=torch.tensor([[0.0, 0, 0, 3, 3], [0.0, 0, float("nan"), 3, 3]]))),
])
def test_deferred_checks_raise_the_immediate_error(text, inputs):
    net = Net(text)
    immediate = _message(net, False, **inputs)
    deferred = _message(net, True, **inputs)
    assert deferred == immediate
    assert "label value 3" in immediate or "ROI 1" in immediate
    # a good forward afterwards: nothing stale is left queued
    good = {k: (torch.zeros_like(v) if k in ("label",) else
                torch.tensor([[0.0, 0, 0, 3, 3], [0.0, 1, 1, 4, 4]]) if k == "rois" else v)
            for k, v in inputs.items()}
    net.forward(**good)


def test_deferred_checks_settle_in_one_read_and_in_order():
    calls = []
    checks = DeferredChecks()
    checks.defer_on_cpu = True

    def fail(tag):
        def f():
            calls.append(tag)
            raise ValueError(tag)
        return f

    checks.check(torch.tensor(False), fail("a"))
    checks.check(torch.tensor(True), fail("b"))
    checks.check(torch.tensor(True), fail("c"))
    with pytest.raises(ValueError, match="b"):
        checks.settle()
    assert calls == ["b"]
    checks.settle()  # emptied
    checks.check(torch.tensor(False), fail("d"))
    checks.settle()
