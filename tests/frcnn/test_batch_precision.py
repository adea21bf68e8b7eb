"""``--batch N`` (several images per forward) and ``--precision`` (fp32/tf32/bf16/fp16).

Batching must give each image batch 1's detections (1e-5): only images of one resized
shape share a forward, and the proposal layer runs each image as alone.  Reduced
precisions are checked for closeness on the tiny Faster R-CNN net, the training paths
for finite losses, and the loss scaler for exactness (power-of-two scales unscale exactly)
and for skipping an overflowing iteration.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import caffe_compat.frcnn.test as T
from caffe_compat.errors import SchemaError
from caffe_compat.frcnn.config import temporary_cfg
from caffe_compat.frcnn.datasets.pascal_voc import pascal_voc
from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset
from caffe_compat.precision import (check_precision, inference_precision,
                                    install_training_precision)
from caffe_compat.solver import Solver

from test_frcnn_test import SMALL, noise_image, rpn_net

RPN_CFG = dict(SMALL, **{"TEST.HAS_RPN": True})


@pytest.fixture(autouse=True)
def _isolate_cfg():
    with temporary_cfg():
        yield


def _close(a, b, tol=1e-5):
    for (sa, ba), (sb, bb) in zip(a, b):
        assert sa.shape == sb.shape and ba.shape == bb.shape
        np.testing.assert_allclose(sa.numpy(), sb.numpy(), rtol=tol, atol=tol)
        np.testing.assert_allclose(ba.numpy(), bb.numpy(), rtol=tol, atol=tol * max(1.0, float(bb.abs().max())))


# ----------------------------------------------------------------------------- batching
def test_batch_groups_only_identical_shapes():
    shapes = [(1, 3, 4, 5), (1, 3, 4, 5), (1, 3, 6, 5), (1, 3, 4, 5), (1, 3, 6, 5), (1, 3, 4, 5)]
    assert T._batch_groups(shapes, 2) == [[0, 1], [2, 4], [3, 5]]
    assert T._batch_groups(shapes, 8) == [[0, 1, 3, 5], [2, 4]]
    assert T._batch_groups(shapes, 1) == [[i] for i in range(6)]


def test_proposal_layer_batch_equals_each_image_alone():
    net = rpn_net()
    ims = [noise_image(70, 80, seed=s) for s in range(3)]
    with temporary_cfg(RPN_CFG):
        singles = []
        for im in ims:
            T.im_detect(net, im)
            singles.append((net.blobs["rpn_cls_prob_reshape"].clone(), net.blobs["rpn_bbox_pred"].clone(),
                            net.blobs["im_info"].clone(), net.blobs["rois"].clone()))
    layer = net.layer("proposal")
    rois, scores = layer._forward(torch.cat([s[0] for s in singles]), torch.cat([s[1] for s in singles]),
                         torch.cat([s[2] for s in singles]))
    assert scores.shape == (rois.shape[0], 1)
    for k, s in enumerate(singles):
        mine = rois[rois[:, 0] == k]
        assert torch.equal(mine[:, 1:], s[3][:, 1:])        # bit-identical per image
        assert (s[3][:, 0] == 0).all()
    assert torch.equal(rois[:, 0], torch.sort(rois[:, 0], stable=True).values)   # in batch order
    with pytest.raises(Exception, match=r"im_info must be \(3, 3\)"):
        layer._forward(torch.cat([s[0] for s in singles]), torch.cat([s[1] for s in singles]),
                       singles[0][2])


def test_im_detect_batch_equals_batch_one():
    net = rpn_net()
    # three images of one size (one forward), one of another size (batch 1 itself)
    ims = [noise_image(50, 90, seed=3), noise_image(70, 80, seed=1), noise_image(70, 80, seed=2),
           noise_image(70, 80, seed=4)]
    with temporary_cfg(RPN_CFG):
        ref = [T.im_detect(net, im) for im in ims]
        got = T.im_detect_batch(net, ims, 4)
        assert tuple(net.blobs["data"].shape)[0] == 3        # the last forward: the 3 same-size images
        _close(got, ref)
        _close(T.im_detect_batch(net, ims, 2), ref)
        # the comparison can fail: the images' results are not interchangeable
        with pytest.raises(AssertionError):
            _close(got[1:2], ref[0:1])


def test_test_net_batch_equals_batch_one(tmp_path):
    d = tmp_path / "voc"
    write_dataset(str(d), 8, seed=3, image_size=(64, 96), num_classes=3, test_fraction=0.5)
    net = rpn_net()
    net.name = "tiny"
    with temporary_cfg(dict(RPN_CFG, **{"DATA_DIR": str(d)})):
        imdb = pascal_voc("test", "2007")
        lines = []
        one = T.test_net(net, imdb, max_per_image=5, thresh=0.0, output_dir=str(tmp_path / "a"),
                         log_fn=lambda s: None)
        three = T.test_net(net, imdb, max_per_image=5, thresh=0.0, output_dir=str(tmp_path / "b"),
                           log_fn=lines.append, batch=3)
    n = imdb.num_images
    assert n >= 2 and sum(1 for ln in lines if ln.startswith("im_detect: ")) == n
    for j in range(1, imdb.num_classes):
        for i in range(n):
            a = np.asarray(one["all_boxes"][j][i], np.float32).reshape(-1, 5)
            b = np.asarray(three["all_boxes"][j][i], np.float32).reshape(-1, 5)
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    assert three["mAP"] == pytest.approx(one["mAP"], abs=1e-6)
    with pytest.raises(Exception, match="batch must be at least 1"):
        T.test_net(net, imdb, batch=0, output_dir=str(tmp_path / "c"))


# ----------------------------------------------------------------------------- precision
def test_check_precision():
    assert check_precision("BF16") == "bf16"
    assert check_precision("fp16", "cuda:0") == "fp16"
    with pytest.raises(SchemaError, match="on the CPU use bf16"):
        check_precision("fp16", "cpu")
    with pytest.raises(SchemaError, match="choose one of fp32, tf32, bf16, fp16"):
        check_precision("fp8")


def test_bf16_inference_is_close_to_fp32_and_tf32_is_exact_on_cpu():
    net = rpn_net()
    im = noise_image(70, 80, seed=5)
    with temporary_cfg(RPN_CFG):
        s32, b32 = T.im_detect(net, im)
        with inference_precision(net, "tf32"):
            assert net.allow_tf32
            s_tf, b_tf = T.im_detect(net, im)
        assert not net.allow_tf32
        with inference_precision(net, "bf16"):
            s16, b16 = T.im_detect(net, im)
            assert net.blobs["conv2"].dtype == torch.bfloat16
    assert torch.equal(s_tf, s32) and torch.equal(b_tf, b32)      # TF32 does not exist on the CPU
    assert s16.dtype == torch.float32 or s16.dtype == torch.bfloat16
    # the best detection of every class: same score to bf16's ~3 digits, box within a pixel or two
    best32 = s32[:, 1:].max(dim=0).values
    best16 = s16.float()[:, 1:].max(dim=0).values
    np.testing.assert_allclose(best16.numpy(), best32.numpy(), rtol=0.05, atol=0.01)
    assert not torch.equal(s16.float(), s32) if s16.shape == s32.shape else True


MLP = """name: "mlp"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 8 dim: 6 } shape { dim: 8 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _batch(k: int, n: int = 8):
    rng = np.random.RandomState(100 + k)
    return {"data": rng.randn(n, 6).astype(np.float32),
            "label": rng.randint(0, 3, size=n).astype(np.float32)}


def _solver(tmp_path, body="", device=None):
    (tmp_path / "net.prototxt").write_text(MLP)
    text = (f'net: "{tmp_path}/net.prototxt"\nsnapshot_prefix: "{tmp_path}/snap"\nrandom_seed: 7\n'
            f'type: "SGD" base_lr: 0.1 lr_policy: "fixed" momentum: 0.9 max_iter: 10 {body}\n')
    return Solver(text, feed=lambda it, p: _batch(10 * it + p), device=device)


def _weights(s):
    return [i.param.detach().clone() for i in s.net.learnable_params()]


def test_bf16_training_steps_are_finite(tmp_path):
    s = _solver(tmp_path, "iter_size: 2")
    w0 = _weights(s)
    losses = []
    s.add_callback(lambda solver, info: losses.append(info.loss))
    assert install_training_precision(s, "bf16") is None         # no loss scaling for bf16
    s.step(3)
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(not torch.equal(a, b) for a, b in zip(w0, _weights(s)))


def test_loss_scaler_is_exact_and_skips_overflow(tmp_path):
    """The GradScaler path on the CPU with fp32 forwards: a power-of-two scale unscales
    exactly, so the weights equal unscaled training bit for bit; a scale that overflows
    the gradients skips the update and halves."""
    ref = _solver(tmp_path)
    ref.step(3)
    s = _solver(tmp_path)
    scaler = install_training_precision(s, "fp32", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    s.step(3)
    for a, b in zip(_weights(ref), _weights(s)):
        assert torch.equal(a, b)
    assert scaler.get_scale() == 2.0 ** 12
    # control: a scale that makes the gradients inf
    big = _solver(tmp_path)
    w0 = _weights(big)
    scaler = install_training_precision(big, "fp32", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 12))
    hook = big.net.learnable_params()[0].param.register_hook(lambda g: g * float("inf"))  # an overflow
    big.step(1)
    hook.remove()
    assert big.skipped_iterations == 1 and scaler.get_scale() == 2.0 ** 11
    for a, b in zip(w0, _weights(big)):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_fp16_training_on_cuda_uses_the_scaler(tmp_path):
    s = _solver(tmp_path, device="cuda:0")
    scaler = install_training_precision(s, "fp16")
    assert isinstance(scaler, torch.amp.GradScaler)
    losses = []
    s.add_callback(lambda solver, info: losses.append(info.loss))
    s.step(3)
    assert all(np.isfinite(losses))


def test_commands_take_batch_and_precision(tmp_path):
    from click.testing import CliRunner

    from caffe_compat.cli.main import main

    runner = CliRunner()
    for cmd in ("test", "detect", "time"):
        out = runner.invoke(main, [cmd, "--help"]).output
        assert "--precision" in out, cmd
        assert ("--batch" in out) == (cmd != "time"), cmd
    net = tmp_path / "n.prototxt"
    net.write_text("name: 'x'\n")
    w = tmp_path / "w.caffemodel"
    w.write_bytes(b"")
    im = tmp_path / "a.png"
    im.write_bytes(b"")
    r = runner.invoke(main, ["detect", str(im), "--model", str(net), "--weights", str(w), "--out",
                             str(tmp_path / "o"), "--precision", "fp16"])
    assert r.exit_code != 0 and "on the CPU use bf16" in r.output
