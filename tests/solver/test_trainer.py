"""The generic trainer (``caffe_compat.trainer``: ``caffe train``) and its progress output
(``caffe_compat.progress``), on nets that read their own data layers."""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys

import numpy as np

from caffe_compat.progress import GlogFormatter, TrainingMonitor, draw_loss_curve, format_duration
from caffe_compat.trainer import train_plain

PLAIN_NET = """
name: "plain"
layer { name: "data" type: "DummyData" top: "x" top: "y"
  dummy_data_param { shape { dim: 8 dim: 4 } shape { dim: 8 dim: 1 }
                     data_filler { type: "constant" value: 1 } data_filler { type: "constant" value: 0.5 } } }
layer { name: "fc" type: "InnerProduct" bottom: "x" top: "p"
  inner_product_param { num_output: 1 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "p" bottom: "y" top: "loss" }
"""


def test_plain_net_trains_like_caffe_train(tmp_path, monkeypatch):
    """No RoIDataLayer: the solver runs on its own (max_iter, snapshot interval, prefix);
    resuming its snapshot elsewhere ends with the same weights.  (Constant DummyData: the
    random stream of a DummyData layer is the layer's own, which solver states do not keep.)"""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(PLAIN_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 20 snapshot: 10 '
        'snapshot_prefix: "snap/plain" display: 5 random_seed: 1')
    (tmp_path / "snap").mkdir()
    r = train_plain("solver.prototxt", progress=False)
    assert r.iterations == 20
    assert [os.path.basename(p) for p in r.model_paths] == ["plain_iter_10.caffemodel", "plain_iter_20.caffemodel"]
    losses = [h[1] for h in r.history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    assert r.loss_curve == str(tmp_path / "snap" / "plain_loss.png")
    r2 = train_plain("solver.prototxt", progress=False, resume="snap/plain_iter_10.solverstate",
                     output_dir=str(tmp_path / "again"))
    assert r2.model_paths == [str(tmp_path / "again" / "plain_iter_20.caffemodel")]
    with open(r.final_model, "rb") as fa, open(r2.final_model, "rb") as fb:
        assert fa.read() == fb.read()


# ----------------------------------------------------------------------------- progress
def test_progress_outputs(tmp_path):
    import io

    import cv2

    class Info:
        def __init__(self, it):
            self.iter, self.loss, self.smoothed_loss, self.lr = it, 2.0 / it, 2.0 / it, 0.01

    buf = io.StringIO()
    mon = TrainingMonitor(10, stream=buf, tty=True, refresh=0.0)
    for i in range(1, 11):
        mon.on_iteration(None, Info(i))
    mon.close()
    text = buf.getvalue()
    assert "\r\x1b[K" in text and "10/10" in text and "ETA" in text and text.endswith("\n")
    buf = io.StringIO()
    mon = TrainingMonitor(10, stream=buf, tty=False, every=5)
    for i in range(1, 11):
        mon.on_iteration(None, Info(i))
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2 and lines[1].startswith("progress: iteration 10/10 (100.0%)")
    assert "\r" not in buf.getvalue()
    img = draw_loss_curve(str(tmp_path / "c.png"), mon.iterations, mon.losses, mon.smoothed_losses)
    back = cv2.imread(str(tmp_path / "c.png"))
    assert back is not None and back.shape == img.shape == (520, 900, 3)
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"
    rec = logging.LogRecord("caffe_compat.solver", logging.INFO, "solver.py", 459,
                            "Iteration %d, loss = %s", (20, "0.5"), None)
    line = GlogFormatter().format(rec)
    # what Caffe's tools/extra/parse_log.py expects
    assert re.match(r"^I\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ solver\.py:459\] Iteration 20, loss = 0\.5$", line)


def test_plain_train_command_never_imports_frcnn(tmp_path):
    """`caffe-compat train` on a plain solver (Caffe's `caffe train`) trains without loading
    any of py-faster-rcnn's code (caffe_compat.frcnn), in a fresh interpreter."""
    (tmp_path / "net.prototxt").write_text(PLAIN_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 4 snapshot: 4 '
        'snapshot_prefix: "plain" random_seed: 1')
    code = ("import sys\n"
            "from caffe_compat.cli.main import main\n"
            "try:\n"
            "    main.main(['train', '--solver', 'solver.prototxt', '--no-progress'], standalone_mode=False)\n"
            "finally:\n"
            "    print('FRCNN MODULES', sorted(m for m in sys.modules if m.startswith('caffe_compat.frcnn')))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "final model: plain_iter_4.caffemodel" in r.stdout
    assert "FRCNN MODULES []" in r.stdout, r.stdout
    assert (tmp_path / "plain_iter_4.solverstate").exists()


# ----------------------------------------------------------------------------- precision
def test_train_command_precision(tmp_path, monkeypatch):
    """`caffe-compat train --precision bf16` trains a plain net under CPU autocast (finite
    losses, the loss falls); fp16 is refused on the CPU before any step, exit 2."""
    from click.testing import CliRunner

    from caffe_compat.cli.main import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(PLAIN_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 20 snapshot: 20 '
        'snapshot_prefix: "bf" random_seed: 1')
    r = CliRunner().invoke(main, ["train", "--solver", "solver.prototxt", "--no-progress",
                                  "--precision", "bf16"])
    assert r.exit_code == 0, (r.output, r.exception)
    assert (tmp_path / "bf_iter_20.caffemodel").exists()
    plain = train_plain("solver.prototxt", progress=False, output_dir=str(tmp_path / "fp32"))
    bf16 = train_plain("solver.prototxt", progress=False, output_dir=str(tmp_path / "bf16"),
                       precision="bf16")
    a, b = [h[1] for h in plain.history], [h[1] for h in bf16.history]
    assert all(np.isfinite(b)) and np.mean(b[-5:]) < 0.5 * np.mean(b[:5]), b
    assert a != b  # bf16 really ran: its rounding shows in the losses
    r = CliRunner().invoke(main, ["train", "--solver", "solver.prototxt", "--no-progress",
                                  "--precision", "fp16"])
    assert r.exit_code == 2 and "fp16 needs a CUDA device" in r.output, r.output


def test_train_compiled_equals_eager_and_reports_peak_memory(tmp_path, monkeypatch, caplog):
    """`train --compile BACKEND` (Dynamo's eager backend here: tracing and graph breaks, no
    code generation) trains to the same weights as eager; the end of training logs the
    peak memory."""
    import torch

    from caffe_compat.weights import caffemodel_state_dict

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(PLAIN_NET)
    (tmp_path / "solver.prototxt").write_text(
        'net: "net.prototxt" base_lr: 0.1 lr_policy: "fixed" max_iter: 3 snapshot: 3 '
        'snapshot_prefix: "c" random_seed: 1')
    with caplog.at_level(logging.INFO, logger="caffe_compat"):
        comp = train_plain("solver.prototxt", progress=False, output_dir=str(tmp_path / "comp"),
                           compile_backend="eager")
    assert comp.solver.net.__dict__["_compiled_forward"].calls_compiled >= 3
    assert any("peak memory:" in r.getMessage() for r in caplog.records)
    eager = train_plain("solver.prototxt", progress=False, output_dir=str(tmp_path / "eager"))
    a, b = (caffemodel_state_dict(r.final_model) for r in (comp, eager))
    for k in a:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
