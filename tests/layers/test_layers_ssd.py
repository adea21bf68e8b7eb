"""The SSD fork's layers (weiliu89/caffe, branch ssd, 4817bf8b): PriorBox, Permute, Normalize,
DetectionOutput, and the box utilities of ``caffe_compat.layers.ssd_boxes``.

Two independent references:

* OpenCV dnn 4.x (``cv2.dnn.readNetFromCaffe``), which ports these layers, wherever it
  follows the fork.  Where it does not, the test uses the numpy reference instead; the
  known deviations of OpenCV from the fork are: PriorBox ``clip`` defaults to true and
  ``img_size``/``img_h``/``img_w`` are ignored, sizes are not truncated to int; Permute needs
  the full order; Normalize has no per-channel scale with ``across_spatial``;
  DetectionOutput pads its top to ``keep_top_k`` rows of zeros (zeros, not ``-1`` rows,
  when nothing is found), sorts rows by score over all labels, needs ``keep_top_k``,
  defaults ``confidence_threshold`` to 0, has no ``eta``, treats ``top_k: 0`` as no limit,
  needs ``nms_threshold > 0``, knows no CORNER_SIZE and cuts ``keep_top_k`` with
  ``partial_sort`` when ``8 * keep_top_k <= candidates``.
* numpy loops transcribed from the fork's C++ (float32 where the fork has float, double
  where C promotes), forward and backward.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess

import cv2
import numpy as np
import pytest
import torch

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers import ssd
from caffe_compat.layers.ssd import _gnu_sort, detection_output
from caffe_compat.layers.ssd_boxes import (box_size, decode_boxes, encode_boxes, jaccard_overlap,
                                           nms_fast)
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2


F = np.float32
FLT_MAX = float(np.finfo(np.float32).max)


# ============================================================================ helpers
def _inputs(shapes):
    return "\n".join(
        f'layer {{ name: "{n}" type: "Input" top: "{n}" input_param {{ shape {{ '
        + " ".join(f"dim: {d}" for d in s) + " } } }" for n, s in shapes.items())


def run_ours(text, feeds):
    net = Net(text, phase="test")
    outs = net.forward(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()})
    return net, {k: v.detach().numpy() for k, v in outs.items()}


def run_cv(net, text, feeds, names, tmp_path):
    proto = tmp_path / "net.prototxt"
    proto.write_text(text)
    model = tmp_path / "net.caffemodel"
    net.save_weights(str(model))
    # Caffe (and so our writer) stores a shared Normalize scale as a 0-axis blob, which
    # OpenCV's importer cannot allocate: hand it the same value as a (1,) blob
    msg = caffe_pb2.NetParameter.FromString(model.read_bytes())
    for blob in (b for lp in msg.layer for b in lp.blobs if b.HasField("shape") and not b.shape.dim):
        blob.shape.dim.append(1)
    model.write_bytes(msg.SerializeToString())
    cvn = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    cvn.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
    for k, v in feeds.items():
        cvn.setInput(np.ascontiguousarray(v), k)
    return dict(zip(names, cvn.forward(names)))


# ============================================================================ PriorBox
def ref_prior_box(lh, lw, ih, iw, min_size, max_size=(), aspect_ratio=(), flip=True, clip=False,
                  variance=(), img_h=0, img_w=0, step_h=0.0, step_w=0.0, offset=0.5):
    """prior_box_layer.cpp LayerSetUp + Forward_cpu, loop for loop."""
    ars = [F(1.0)]
    for a in aspect_ratio:
        a = F(a)
        if any(abs(float(F(a - b))) < 1e-6 for b in ars):
            continue
        ars.append(a)
        if flip:
            ars.append(F(1.0 / float(a)))
    var = [F(v) for v in variance] or [F(0.1)]
    if img_h == 0 or img_w == 0:
        img_w_, img_h_ = iw, ih
    else:
        img_w_, img_h_ = img_w, img_h
    if step_w == 0 or step_h == 0:
        sw, sh = F(F(img_w_) / F(lw)), F(F(img_h_) / F(lh))
    else:
        sw, sh = F(step_w), F(step_h)
    top = []

    def push(cx, cy, bw, bh):
        cx, cy, bw, bh = float(cx), float(cy), float(bw), float(bh)  # C promotes to double
        top.extend([(cx - bw / 2.) / img_w_, (cy - bh / 2.) / img_h_,
                    (cx + bw / 2.) / img_w_, (cy + bh / 2.) / img_h_])

    for h in range(lh):
        for w in range(lw):
            cx = F(F(F(w) + F(offset)) * sw)
            cy = F(F(F(h) + F(offset)) * sh)
            for s in range(len(min_size)):
                m = int(F(min_size[s]))  # int min_size_ = min_sizes_[s]
                push(cx, cy, F(m), F(m))
                if max_size:
                    mx = int(F(max_size[s]))
                    side = F(math.sqrt(m * mx))
                    push(cx, cy, side, side)
                for ar in ars:
                    if abs(float(ar) - 1.) < 1e-6:
                        continue
                    push(cx, cy, F(m * math.sqrt(float(ar))), F(m / math.sqrt(float(ar))))
    top = np.array(top, F)
    if clip:
        top = np.minimum(np.maximum(top, F(0)), F(1))
    if len(var) == 1:
        v = np.full(top.shape, var[0], F)
    else:
        v = np.tile(np.array(var, F), top.size // 4)
    return np.stack([top, v])[None]


def prior_text(params, fh, fw, ih, iw, two_bottoms=True):
    bottoms = 'bottom: "feat" bottom: "data"' if two_bottoms else 'bottom: "feat"'
    return (_inputs({"data": (1, 3, ih, iw), "feat": (1, 2, fh, fw)})
            + f'\nlayer {{ name: "pb" type: "PriorBox" {bottoms} top: "pb" '
              f'prior_box_param {{ {params} }} }}\n')


def prior_feeds(fh, fw, ih, iw):
    return {"data": np.zeros((1, 3, ih, iw), F), "feat": np.zeros((1, 2, fh, fw), F)}


VAR4 = "variance: 0.1 variance: 0.1 variance: 0.2 variance: 0.2"
PRIOR_CV_CASES = [
    # (params, feature h, w, image h, w): clip is always explicit (OpenCV's default differs)
    ("min_size: 10 clip: false variance: 0.1", 3, 4, 30, 40),
    (f"min_size: 10 max_size: 20 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: false {VAR4}",
     3, 4, 30, 40),
    ("min_size: 12 max_size: 25 aspect_ratio: 2 flip: true clip: true variance: 0.1", 5, 5, 50, 50),
    ("min_size: 12 aspect_ratio: 2 aspect_ratio: 0.3 flip: false clip: false variance: 0.2",
     4, 6, 37, 61),
    (f"min_size: 10 max_size: 25 clip: false {VAR4} step: 8 offset: 0.3", 4, 4, 30, 30),
    ("min_size: 10 variance: 0.1 clip: true step_h: 8 step_w: 6 offset: 0", 3, 5, 24, 30),
    ("min_size: 10 min_size: 20 max_size: 15 max_size: 30 aspect_ratio: 2 clip: false "
     f"{VAR4}", 3, 3, 33, 33),
    ("min_size: 10 aspect_ratio: 2 aspect_ratio: 0.5 aspect_ratio: 1 aspect_ratio: 2.0000001 "
     "flip: true clip: false variance: 0.1", 2, 2, 20, 20),
    ("min_size: 30 max_size: 60 aspect_ratio: 2 aspect_ratio: 3 flip: true clip: true "
     f"{VAR4} step: 16 offset: 0.5", 7, 7, 300, 300),
]


@pytest.mark.parametrize("params,fh,fw,ih,iw", PRIOR_CV_CASES)
def test_prior_box_matches_opencv(params, fh, fw, ih, iw, tmp_path):
    text = prior_text(params, fh, fw, ih, iw)
    feeds = prior_feeds(fh, fw, ih, iw)
    net, ours = run_ours(text, feeds)
    theirs = run_cv(net, text, feeds, ["pb"], tmp_path)["pb"]
    assert ours["pb"].shape == theirs.shape
    np.testing.assert_allclose(ours["pb"], theirs, rtol=0, atol=2e-7)


PRIOR_REF_CASES = [
    # cases OpenCV does not follow, plus the OpenCV ones again against the transcription
    (dict(min_size=[10.7], max_size=[20.5], aspect_ratio=[2.0]), 3, 4, 30, 40, True),
    (dict(min_size=[10.0], img_h=50, img_w=70, variance=[0.1, 0.1, 0.2, 0.2]), 3, 4, 30, 40, True),
    (dict(min_size=[10.0], img_h=64, img_w=64, step_h=9.0, step_w=7.0), 3, 4, 30, 40, False),
    (dict(min_size=[10.0], aspect_ratio=[2.0], flip=True), 3, 4, 30, 40, True),  # default clip off
    (dict(min_size=[8.0, 16.0], aspect_ratio=[3.0, 1 / 3.0, 2.0], flip=True, clip=True,
          offset=0.25), 4, 3, 35, 29, True),
] + [(None, fh, fw, ih, iw, True) for (_, fh, fw, ih, iw) in PRIOR_CV_CASES[:3]]


def _params_text(d):
    parts = []
    for k, v in d.items():
        if isinstance(v, (list, tuple)):
            parts += [f"{k}: {x!r}" for x in v]
        elif isinstance(v, bool):
            parts.append(f"{k}: {str(v).lower()}")
        else:
            parts.append(f"{k}: {v!r}")
    return " ".join(parts)


@pytest.mark.parametrize("case", range(len(PRIOR_REF_CASES)))
def test_prior_box_matches_fork_reference(case):
    d, fh, fw, ih, iw, two = PRIOR_REF_CASES[case]
    if d is None:
        d = dict(min_size=[10.0], max_size=[20.0], aspect_ratio=[2.0, 3.0], clip=case % 2 == 0,
                 variance=[0.1, 0.1, 0.2, 0.2], step_h=6.0, step_w=6.0, offset=0.4)
    text = prior_text(_params_text(d), fh, fw, ih, iw, two_bottoms=two)
    _, ours = run_ours(text, prior_feeds(fh, fw, ih, iw))
    ref = ref_prior_box(fh, fw, ih, iw, **d)
    assert ours["pb"].shape == ref.shape
    np.testing.assert_array_equal(ours["pb"], ref)


def test_prior_box_img_size_and_single_bottom():
    text = prior_text("min_size: 10 img_size: 50 clip: false", 3, 4, 30, 40, two_bottoms=False)
    _, ours = run_ours(text, prior_feeds(3, 4, 30, 40))
    np.testing.assert_array_equal(ours["pb"], ref_prior_box(3, 4, 30, 40, [10.0], img_h=50, img_w=50))


def test_prior_box_order_by_hand():
    """One cell, image 100 x 100, min 30 / max 60, ratio 2 with flip: four priors in the fork's
    order (min square, sqrt(min * max) square, ratio 2, ratio 1/2), centre (50, 50)."""
    text = prior_text(f"min_size: 30 max_size: 60 aspect_ratio: 2 clip: false {VAR4}", 1, 1, 100, 100)
    _, ours = run_ours(text, prior_feeds(1, 1, 100, 100))
    pb = ours["pb"][0]
    s = math.sqrt(30 * 60) / 2
    w2, h2 = 30 * math.sqrt(2) / 2, 30 / math.sqrt(2) / 2
    expect = np.array([[35, 35, 65, 65], [50 - s, 50 - s, 50 + s, 50 + s],
                       [50 - w2, 50 - h2, 50 + w2, 50 + h2], [50 - h2, 50 - w2, 50 + h2, 50 + w2]]) / 100
    np.testing.assert_allclose(pb[0].reshape(4, 4), expect, atol=1e-6)
    np.testing.assert_array_equal(pb[1].reshape(4, 4), np.tile(F([0.1, 0.1, 0.2, 0.2]), (4, 1)))


def test_prior_box_shape_dtype_and_no_grad():
    text = prior_text("min_size: 10 max_size: 20 aspect_ratio: 2 aspect_ratio: 3", 5, 7, 50, 70)
    net = Net(text, phase="test")
    assert net.blob_shapes["pb"] == (1, 2, 5 * 7 * 6 * 4)
    feat = torch.zeros(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
    out = net.layer("pb")(feat, torch.zeros(1, 3, 50, 70, dtype=torch.float64))[0]
    assert out.dtype == torch.float64 and not out.requires_grad
    ref = ref_prior_box(5, 7, 50, 70, [10.0], [20.0], [2.0, 3.0])
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-7)


@pytest.mark.parametrize("params,match", [
    ("min_size: 10 max_size: 10", "greater than min_size"),
    ("min_size: 10 min_size: 20 max_size: 30", "as often as min_size"),
    ("min_size: 10 variance: 0.1 variance: 0.2", "1 or 4 values"),
    ("min_size: 10 variance: 0", "variance must be > 0"),
    ("min_size: 10 img_size: 30 img_h: 30 img_w: 30", "not both"),
    ("min_size: 10 img_h: 30", "img_h and img_w"),
    ("min_size: 10 step: 8 step_h: 8 step_w: 8", "not both"),
    ("max_size: 10", "min_size is required"),
    ("min_size: 0", "min_size must be > 0"),
])
def test_prior_box_bad_params(params, match):
    with pytest.raises(SchemaError, match=match):
        Net(prior_text(params, 2, 2, 20, 20), phase="test")


def test_prior_box_needs_image_without_img_size():
    with pytest.raises(ShapeError, match="image as bottom 1"):
        Net(prior_text("min_size: 10", 2, 2, 20, 20, two_bottoms=False), phase="test")


# ============================================================================ Permute
def ref_permute(data, order, forward=True, top=None):
    """permute_layer.cpp's Permute(): index arithmetic with old/new steps."""
    old_shape = data.shape
    new_shape = tuple(old_shape[o] for o in order)
    n = len(order)
    old_steps = [int(np.prod(old_shape[i + 1:])) for i in range(n)]
    new_steps = [int(np.prod(new_shape[i + 1:])) for i in range(n)]
    flat_in = data.reshape(-1)
    if forward:
        out = np.empty(int(np.prod(new_shape)), data.dtype)
    else:
        out = np.zeros(flat_in.size, data.dtype)
        flat_top = top.reshape(-1)
    for i in range(int(np.prod(new_shape))):
        old_idx, idx = 0, i
        for j in range(n):
            old_idx += (idx // new_steps[j]) * old_steps[order[j]]
            idx %= new_steps[j]
        if forward:
            out[i] = flat_in[old_idx]
        else:
            out[old_idx] = flat_top[i]
    return out.reshape(new_shape) if forward else out.reshape(old_shape)


def permute_text(order, shape):
    o = " ".join(f"order: {k}" for k in order)
    return (_inputs({"data": shape})
            + f'\nlayer {{ name: "p" type: "Permute" bottom: "data" top: "p" permute_param {{ {o} }} }}\n')


@pytest.mark.parametrize("order", [(0, 2, 3, 1), (0, 3, 1, 2), (1, 0, 3, 2), (0, 1, 2, 3)])
def test_permute_matches_opencv(order, tmp_path):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 5)).astype(F)
    text = permute_text(order, x.shape)
    net, ours = run_ours(text, {"data": x})
    theirs = run_cv(net, text, {"data": x}, ["p"], tmp_path)["p"]
    np.testing.assert_array_equal(ours["p"], theirs)


@pytest.mark.parametrize("order,full", [((0, 2, 3, 1), (0, 2, 3, 1)), ((0, 2), (0, 2, 1, 3)),
                                        ((3,), (3, 0, 1, 2)), ((), (0, 1, 2, 3))])
def test_permute_forward_backward_match_fork(order, full):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 3, 4, 5)).astype(F)
    net = Net(permute_text(order, x.shape), phase="test")
    assert net.layer("p").order == full
    xt = torch.from_numpy(x).requires_grad_(True)
    y = net.layer("p")(xt)[0]
    np.testing.assert_array_equal(y.detach().numpy(), ref_permute(x, full))
    dy = rng.standard_normal(y.shape).astype(F)
    y.backward(torch.from_numpy(dy))
    np.testing.assert_array_equal(xt.grad.numpy(), ref_permute(x, full, forward=False, top=dy))


@pytest.mark.parametrize("order,match", [((0, 4), "less than"), ((1, 1), "duplicate")])
def test_permute_bad_order(order, match):
    with pytest.raises(SchemaError, match=match):
        Net(permute_text(order, (2, 3, 4, 5)), phase="test")


# ============================================================================ Normalize
def ref_normalize(x, scale, across, shared, eps, top_diff=None):
    """normalize_layer.cpp Forward_cpu and Backward_cpu, per sample, in float64."""
    x = x.astype(np.float64)
    num, c = x.shape[:2]
    xs = x.reshape(num, c, -1)
    scale = np.asarray(scale, np.float64).reshape(-1)
    top = np.empty_like(xs)
    norms = []
    for n in range(num):
        b = xs[n]
        if across:
            norm = math.pow(float((b * b).sum()) + eps, 0.5)  # eps inside the root
            top[n] = b * (1.0 / norm)
        else:
            norm = np.sqrt(eps + (b * b).sum(axis=0))          # norm_ preset to eps, gemv adds
            top[n] = b / norm[None, :]
        norms.append(norm)
        top[n] *= scale[0] if shared else scale[:, None]
    if top_diff is None:
        return top.reshape(x.shape)
    td = top_diff.astype(np.float64).reshape(num, c, -1)
    if shared:
        dscale = np.array([(top * td).sum() / scale[0]])
    else:
        dscale = np.zeros(c)
        for n in range(num):
            dscale += (top[n] * td[n]).sum(axis=1) / scale
    dx = np.empty_like(xs)
    for n in range(num):
        b, d, norm = xs[n], td[n], norms[n]
        if across:
            a = float((b * d).sum())
            g = b * (a / norm / norm)
            g = (d - g) * (1.0 / norm)
        else:
            a = (b * d).sum(axis=0)                      # dot over channels per position
            g = b * a[None, :]
            g = g / (norm ** 2)[None, :]
            g = d - g
            g = g / norm[None, :]
        dx[n] = g * (scale[0] if shared else scale[:, None])
    return top.reshape(x.shape), dx.reshape(x.shape), dscale.reshape(() if shared else (c,))


def norm_text(params, shape):
    return (_inputs({"data": shape})
            + '\nlayer { name: "n" type: "Normalize" bottom: "data" top: "n" '
              f'norm_param {{ {params} }} }}\n')


NORM_CASES = [(True, True, None), (False, True, None), (False, False, None), (True, False, None),
              (True, True, 0.5), (False, False, 2.0), (False, True, 0.3)]
FILLER = 'scale_filler { type: "uniform" min: 0.5 max: 3 }'


def _norm_params(across, shared, eps):
    return (f"across_spatial: {str(across).lower()} channel_shared: {str(shared).lower()} {FILLER}"
            + (f" eps: {eps}" if eps is not None else ""))


@pytest.mark.parametrize("across,shared,eps", [c for c in NORM_CASES if not (c[0] and not c[1])])
def test_normalize_matches_opencv(across, shared, eps, tmp_path):
    # OpenCV has no per-channel scale across_spatial (it treats C*H*W as the planes)
    x = np.random.default_rng(3).standard_normal((2, 3, 4, 5)).astype(F) * 0.2
    text = norm_text(_norm_params(across, shared, eps), x.shape)
    net, ours = run_ours(text, {"data": x})
    theirs = run_cv(net, text, {"data": x}, ["n"], tmp_path)["n"]
    np.testing.assert_allclose(ours["n"], theirs, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("across,shared,eps", NORM_CASES)
def test_normalize_forward_backward_match_fork(across, shared, eps):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 3, 4, 5)) * 0.2).astype(F)
    net = Net(norm_text(_norm_params(across, shared, eps), x.shape), phase="test")
    layer = net.layer("n")
    scale = layer.weight.detach().numpy().copy()
    assert scale.shape == (() if shared else (3,))
    xt = torch.from_numpy(x).requires_grad_(True)
    y = layer(xt)[0]
    dy = rng.standard_normal(x.shape).astype(F)
    y.backward(torch.from_numpy(dy))
    e = 1e-10 if eps is None else eps
    top, dx, dscale = ref_normalize(x, scale, across, shared, float(F(e)), dy)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(xt.grad.numpy(), dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(layer.weight.grad.numpy(), dscale, rtol=1e-4, atol=1e-6)


def test_normalize_per_channel_backward_is_the_forks_not_autograds():
    """With a per-channel scale the fork's bottom diff is not the gradient of its forward;
    the layer follows the fork (the test would fail with plain autograd)."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((1, 3, 2, 2)).astype(np.float64)).requires_grad_(True)
    scale = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    dy = torch.from_numpy(rng.standard_normal((1, 3, 2, 2)))
    ssd.normalize(x, scale, across_spatial=True, channel_shared=False).backward(dy)
    ours = x.grad.clone()
    x.grad = None
    norm = torch.sqrt((x * x).sum() + 1e-10)
    (x / norm * scale.view(1, 3, 1, 1)).backward(dy)
    assert not torch.allclose(ours, x.grad, atol=1e-3)
    _, dx, _ = ref_normalize(x.detach().numpy(), scale.numpy(), True, False, 1e-10, dy.numpy())
    np.testing.assert_allclose(ours.numpy(), dx, rtol=1e-10)


def test_normalize_blob_default_filler_and_checks():
    net = Net(norm_text("channel_shared: false", (1, 4, 2, 2)), phase="test")
    w = net.layer("n").weight
    assert tuple(w.shape) == (4,) and torch.all(w == 1)
    assert net.layer("n").blob_names == ["weight"]
    with pytest.raises(ShapeError, match="at least 2 axes"):
        Net(norm_text("", (4,)), phase="test")


def test_normalize_shared_scale_roundtrip(tmp_path):
    text = norm_text('scale_filler { type: "constant" value: 3 }', (1, 3, 2, 2))
    net = Net(text, phase="test")
    net.save_weights(str(tmp_path / "n.caffemodel"))
    other = Net(norm_text("", (1, 3, 2, 2)), phase="test")
    other.load_weights(str(tmp_path / "n.caffemodel"))
    assert float(other.layer("n").weight.detach()) == 3.0


# ============================================================================ box utilities
def ref_decode(p, v, l, code, vet):
    """bbox_util.cpp DecodeBBox for one box, float fields, C's double promotions."""
    p = [F(a) for a in p]
    v = [F(1)] * 4 if vet else [F(a) for a in v]
    l = [F(a) for a in l]
    if code == 1:
        return [F(p[k] + F(v[k] * l[k])) if not vet else F(p[k] + l[k]) for k in range(4)]
    pw, ph = F(p[2] - p[0]), F(p[3] - p[1])
    if code == 2:
        pcx, pcy = F(float(F(p[0] + p[2])) / 2.), F(float(F(p[1] + p[3])) / 2.)
        if vet:
            cx, cy = F(F(l[0] * pw) + pcx), F(F(l[1] * ph) + pcy)
            w = F(math.exp(float(l[2])) * float(pw))
            h = F(math.exp(float(l[3])) * float(ph))
        else:
            cx, cy = F(F(F(v[0] * l[0]) * pw) + pcx), F(F(F(v[1] * l[1]) * ph) + pcy)
            w = F(math.exp(float(F(v[2] * l[2]))) * float(pw))
            h = F(math.exp(float(F(v[3] * l[3]))) * float(ph))
        return [F(float(cx) - float(w) / 2.), F(float(cy) - float(h) / 2.),
                F(float(cx) + float(w) / 2.), F(float(cy) + float(h) / 2.)]
    size = [pw, ph, pw, ph]
    if vet:
        return [F(p[k] + F(l[k] * size[k])) for k in range(4)]
    return [F(p[k] + F(F(v[k] * l[k]) * size[k])) for k in range(4)]


def ref_size(b):
    if b[2] < b[0] or b[3] < b[1]:
        return F(0)
    return F(F(b[2] - b[0]) * F(b[3] - b[1]))


def ref_iou(b1, b2):
    """JaccardOverlap(NormalizedBBox, normalized = true)."""
    if b2[0] > b1[2] or b2[2] < b1[0] or b2[1] > b1[3] or b2[3] < b1[1]:
        inter = [F(0)] * 4
    else:
        inter = [max(b1[0], b2[0]), max(b1[1], b2[1]), min(b1[2], b2[2]), min(b1[3], b2[3])]
    iw, ih = F(inter[2] - inter[0]), F(inter[3] - inter[1])
    if iw > 0 and ih > 0:
        isz = F(iw * ih)
        return F(isz / F(F(ref_size(b1) + ref_size(b2)) - isz))
    return F(0)


def ref_nms(boxes, scores, thr, nms, eta, top_k):
    """ApplyNMSFast(NormalizedBBox): stable sort, erase from the front, adaptive eta."""
    pairs = [(F(s), i) for i, s in enumerate(scores) if F(s) > F(thr)]
    pairs = sorted(pairs, key=lambda t: -float(t[0]))  # Python's sort is stable
    if -1 < top_k < len(pairs):
        pairs = pairs[:top_k]
    adaptive = F(nms)
    kept = []
    while pairs:
        idx = pairs[0][1]
        keep = True
        for k in kept:
            if not keep:
                break
            keep = ref_iou(boxes[idx], boxes[k]) <= adaptive
        if keep:
            kept.append(idx)
        pairs.pop(0)
        if keep and eta < 1 and adaptive > 0.5:
            adaptive = F(adaptive * F(eta))
    return kept


def random_priors(rng, p, lo=0.03, hi=0.45):
    c = rng.uniform(0.05, 0.95, (p, 2))
    wh = rng.uniform(lo, hi, (p, 2))
    return np.concatenate([c - wh / 2, c + wh / 2], 1).astype(F)


@pytest.mark.parametrize("code", [1, 2, 3])
@pytest.mark.parametrize("vet", [False, True])
def test_decode_matches_fork_and_encode_inverts_it(code, vet):
    rng = np.random.default_rng(6)
    pri = random_priors(rng, 50)
    var = np.tile(F([0.1, 0.1, 0.2, 0.2]), (50, 1))
    loc = rng.normal(0, 1, (50, 4)).astype(F)
    ours = decode_boxes(torch.from_numpy(pri), torch.from_numpy(var), torch.from_numpy(loc), code, vet)
    ref = np.array([ref_decode(pri[i], var[i], loc[i], code, vet) for i in range(50)], F)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=0, atol=3e-7)
    # encode is the inverse (the MultiBoxLoss targets)
    gt = random_priors(rng, 50)
    enc = encode_boxes(torch.from_numpy(pri).double(), torch.from_numpy(var).double(),
                       torch.from_numpy(gt).double(), code, vet)
    back = decode_boxes(torch.from_numpy(pri).double(), torch.from_numpy(var).double(), enc, code, vet)
    np.testing.assert_allclose(back.numpy(), gt, atol=1e-12)
    # names as strings, batched leading axes, clipping
    name = {1: "CORNER", 2: "center_size", 3: "CORNER_SIZE"}[code]
    b2 = decode_boxes(torch.from_numpy(pri), torch.from_numpy(var)[0],
                      torch.from_numpy(loc)[None].repeat(2, 1, 1), name, vet, clip=True)
    assert b2.shape == (2, 50, 4) and float(b2.min()) >= 0 and float(b2.max()) <= 1


def test_encode_checks_and_gradients():
    pri = torch.tensor([[0.1, 0.1, 0.3, 0.4]])
    var = torch.tensor([0.1, 0.1, 0.2, 0.2])
    with pytest.raises(ValueError, match="box width"):
        encode_boxes(pri, var, torch.tensor([[0.2, 0.2, 0.2, 0.5]]), "CENTER_SIZE")
    with pytest.raises(ValueError, match="variance"):
        encode_boxes(pri, torch.tensor([0.1, 0.0, 0.2, 0.2]), pri, "CORNER")
    with pytest.raises(ValueError, match="code_type"):
        decode_boxes(pri, var, pri, "CENTRE")
    loc = torch.zeros(1, 4, requires_grad=True)
    decode_boxes(pri, var, loc, "CENTER_SIZE").sum().backward()
    assert loc.grad is not None and torch.isfinite(loc.grad).all()


def test_jaccard_overlap_matches_fork():
    rng = np.random.default_rng(7)
    a = random_priors(rng, 30, 0.0, 0.5)
    b = random_priors(rng, 20, 0.0, 0.5)
    b[0] = a[0]                               # identical
    b[1] = [a[1][2], a[1][1], a[1][2] + 0.1, a[1][3]]  # touching: empty intersection
    b[2] = [0.5, 0.5, 0.4, 0.6]               # inverted box: size 0
    ours = jaccard_overlap(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    ref = np.array([[ref_iou(x, y) for y in b] for x in a], F)
    np.testing.assert_array_equal(ours, ref)
    assert ours[0, 0] == 1 and ours[1, 1] == 0
    assert box_size(torch.from_numpy(b[2:3]))[0] == 0


@pytest.mark.parametrize("matrix", [True, False])
@pytest.mark.parametrize("eta,top_k,thr", [(1.0, -1, 0.0), (0.7, -1, 0.1), (1.0, 5, 0.2),
                                           (0.9, 0, -FLT_MAX), (1.0, -1, 0.5)])
def test_nms_fast_matches_fork(eta, top_k, thr, matrix, monkeypatch):
    from caffe_compat.layers import ssd_boxes
    if not matrix:  # the row-at-a-time path for candidate sets too big for an IoU matrix
        monkeypatch.setattr(ssd_boxes, "_NMS_MATRIX_MAX", 0)
    rng = np.random.default_rng(8)
    boxes = random_priors(rng, 120, 0.1, 0.6)
    scores = np.round(rng.uniform(0, 1, 120) * 6).astype(F) / 6  # many ties
    for nms in (0.0, 0.3, 0.6, 0.9):
        ours = nms_fast(torch.from_numpy(boxes), torch.from_numpy(scores), thr, nms, eta, top_k)
        assert ours.tolist() == ref_nms(boxes, scores, thr, nms, eta, top_k), nms


# ============================================================================ std::sort
def test_gnu_sort_is_libstdcxx_sort(tmp_path):
    """``_gnu_sort`` against the real ``std::sort`` (pairs, score-descending comparator) on
    tie-heavy inputs of many lengths: the order of equal scores must be libstdc++'s."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to run std::sort")
    src = tmp_path / "s.cpp"
    src.write_text(
        "#include <algorithm>\n#include <cstdio>\n#include <utility>\n#include <vector>\n"
        "static bool desc(const std::pair<float,int>& a, const std::pair<float,int>& b)"
        "{ return a.first > b.first; }\n"
        "int main(){ int n; while (std::scanf(\"%d\", &n) == 1) { std::vector<std::pair<float,int> > v;"
        " for (int i = 0; i < n; ++i) { float s; std::scanf(\"%f\", &s); v.push_back(std::make_pair(s, i)); }"
        " std::sort(v.begin(), v.end(), desc);"
        " for (int i = 0; i < n; ++i) std::printf(\"%d \", v[i].second); std::printf(\"\\n\"); } }\n")
    exe = tmp_path / "s"
    subprocess.run([cxx, "-O1", "-o", str(exe), str(src)], check=True, capture_output=True)
    rng = np.random.default_rng(9)
    seqs = []
    for n in list(range(0, 40)) + [64, 100, 257, 600]:
        levels = int(rng.integers(1, 6))
        seqs.append(rng.integers(0, levels, n).astype(F) / 4)
    seqs.append(np.zeros(300, F))                                   # all equal
    seqs.append(np.arange(200, dtype=F) % 3)                          # periodic ties
    seqs.append(np.concatenate([np.arange(150, dtype=F), np.arange(150, dtype=F)]))  # pairs
    text = "".join(f"{len(s)} " + " ".join(repr(float(x)) for x in s) + "\n" for s in seqs)
    res = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
    for s, line in zip(seqs, res.stdout.splitlines()):
        items = [(float(x), i) for i, x in enumerate(s)]
        _gnu_sort(items, lambda p, q: p[0] > q[0])
        assert [i for _, i in items] == [int(t) for t in line.split()], len(s)


# ============================================================================ DetectionOutput
def ref_detection_output(loc, conf, prior, num_classes, share_location=True, background=0,
                         code=1, vet=False, nms=0.3, top_k=-1, eta=1.0, keep_top_k=-1,
                         thr=-FLT_MAX):
    """detection_output_layer.cpp Forward_cpu with the bbox_util.cpp helpers, in loops.
    (The keep_top_k cut uses a stable sort; cases with ties at the cut are compared
    against OpenCV, whose binary runs libstdc++'s std::sort as the fork's does.)"""
    num = loc.shape[0]
    num_priors = prior.shape[2] // 4
    nl = 1 if share_location else num_classes
    pri = prior.reshape(-1)
    pboxes = [pri[i * 4:(i + 1) * 4] for i in range(num_priors)]
    pvars = [pri[(num_priors + i) * 4:(num_priors + i + 1) * 4] if not vet else None
             for i in range(num_priors)]
    rows = []
    for i in range(num):
        l = loc[i].reshape(num_priors, nl, 4)
        s = conf[i].reshape(num_priors, num_classes)
        decoded = {}
        for c in range(nl):
            label = -1 if share_location else c
            if label == background:
                continue
            decoded[label] = [ref_decode(pboxes[p], pvars[p], l[p, c], code, vet) for p in range(num_priors)]
        indices = {}
        num_det = 0
        for c in range(num_classes):
            if c == background:
                continue
            boxes = decoded[-1 if share_location else c]
            indices[c] = ref_nms(boxes, s[:, c], thr, nms, eta, top_k)
            num_det += len(indices[c])
        if -1 < keep_top_k < num_det:
            pairs = [(F(s[idx, label]), label, idx) for label in sorted(indices) for idx in indices[label]]
            pairs = sorted(pairs, key=lambda t: -float(t[0]))[:keep_top_k]
            indices = {}
            for _, label, idx in pairs:
                indices.setdefault(label, []).append(idx)
        for label in sorted(indices):
            for idx in indices[label]:
                b = decoded[-1 if share_location else label][idx]
                rows.append([i, label, s[idx, label]] + list(b))
    if not rows:
        return np.array([[i] + [-1] * 6 for i in range(num)], F).reshape(1, 1, num, 7)
    return np.array(rows, F).reshape(1, 1, -1, 7)


def det_case(seed, num=1, num_priors=60, num_classes=4, share=True, ties=0, score_scale=1.0,
             loc_scale=1.0, one_channel_prior=False):
    rng = np.random.default_rng(seed)
    pri = random_priors(rng, num_priors)
    var = np.tile(F([0.1, 0.1, 0.2, 0.2]), (num_priors, 1))
    prior = (pri.reshape(1, 1, -1) if one_channel_prior
             else np.stack([pri.reshape(-1), var.reshape(-1)])[None]).astype(F)
    nl = 1 if share else num_classes
    loc = (rng.normal(0, loc_scale, (num, num_priors * nl * 4))).astype(F)
    logits = rng.normal(0, 2.0 * score_scale, (num, num_priors, num_classes))
    conf = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    if ties:
        conf = np.round(conf * ties) / ties
    return loc, conf.reshape(num, -1).astype(F), prior


def det_text(loc, conf, prior, params):
    return (_inputs({"loc": loc.shape, "conf": conf.shape, "prior": prior.shape})
            + '\nlayer { name: "det" type: "DetectionOutput" bottom: "loc" bottom: "conf" '
              f'bottom: "prior" top: "det" detection_output_param {{ {params} }} }}\n')


def _cv_explicit(params):
    """OpenCV insists on share_location and background_label_id: spell out the defaults."""
    for field, default in (("share_location", "true"), ("background_label_id", "0")):
        if field not in params:
            params += f" {field}: {default}"
    return params


def match_rows(ours, theirs, tol=1e-5):
    """Same detections in any order: each of our rows has its own OpenCV row with the same
    image and label and score/box within ``tol``."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    free = list(range(len(theirs)))
    for r in ours:
        cand = [j for j in free if theirs[j, 0] == r[0] and theirs[j, 1] == r[1]
                and np.abs(theirs[j, 2:] - r[2:]).max() <= tol]
        assert cand, f"no OpenCV row for {r}"
        best = min(cand, key=lambda j: np.abs(theirs[j, 2:] - r[2:]).max())
        free.remove(best)


DET_CV_CASES = [
    # (case kwargs, params): every param set explicitly for OpenCV
    (dict(seed=10), "num_classes: 4 code_type: CENTER_SIZE keep_top_k: 400 confidence_threshold: 0.05 "
                    "nms_param { nms_threshold: 0.45 }"),
    (dict(seed=11), "num_classes: 4 code_type: CORNER keep_top_k: 400 confidence_threshold: 0.1 "
                    "nms_param { nms_threshold: 0.3 top_k: 20 }"),
    (dict(seed=12, ties=4), "num_classes: 4 code_type: CENTER_SIZE keep_top_k: 400 "
                            "confidence_threshold: 0.1 nms_param { nms_threshold: 0.4 }"),   # NMS ties
    (dict(seed=13, share=False), "num_classes: 4 share_location: false code_type: CENTER_SIZE "
                                 "keep_top_k: 400 confidence_threshold: 0.1 "
                                 "nms_param { nms_threshold: 0.5 }"),
    (dict(seed=14, share=False), "num_classes: 4 background_label_id: -1 share_location: false "
                                 "code_type: CENTER_SIZE keep_top_k: 400 confidence_threshold: 0.2 "
                                 "nms_param { nms_threshold: 0.45 }"),
    (dict(seed=15), "num_classes: 4 background_label_id: 2 code_type: CENTER_SIZE keep_top_k: 15 "
                    "confidence_threshold: 0.05 nms_param { nms_threshold: 0.45 }"),      # keep_top_k cut
    (dict(seed=16, num=2), "num_classes: 4 code_type: CENTER_SIZE keep_top_k: 12 "
                           "confidence_threshold: 0.05 nms_param { nms_threshold: 0.6 top_k: 30 }"),
    (dict(seed=17, one_channel_prior=True, loc_scale=0.1),
     "num_classes: 4 code_type: CENTER_SIZE variance_encoded_in_target: true keep_top_k: 400 "
     "confidence_threshold: 0.1 nms_param { nms_threshold: 0.45 }"),
    (dict(seed=18, num=2, ties=3, num_classes=3), "num_classes: 3 code_type: CORNER keep_top_k: 400 "
                                   "confidence_threshold: 0.3 nms_param { nms_threshold: 0.2 }"),
]


@pytest.mark.parametrize("kw,params", DET_CV_CASES)
def test_detection_output_matches_opencv(kw, params, tmp_path):
    loc, conf, prior = det_case(**kw)
    text = det_text(loc, conf, prior, _cv_explicit(params))
    feeds = {"loc": loc, "conf": conf, "prior": prior}
    net, ours = run_ours(text, feeds)
    theirs = run_cv(net, text, feeds, ["det"], tmp_path)["det"][0, 0]
    ours = ours["det"][0, 0]
    assert len(ours) >= 8, "the case should keep a fair number of boxes"
    # OpenCV pads to keep_top_k * num rows of zeros; real rows have a score > 0
    match_rows(ours, theirs[theirs[:, 2] > 0])


@pytest.mark.parametrize("kw,params", DET_CV_CASES)
def test_detection_output_matches_fork_reference(kw, params):
    """Exact rows *and* order (per image, labels ascending, score order within a label)."""
    loc, conf, prior = det_case(**kw)
    text = det_text(loc, conf, prior, params)
    _, ours = run_ours(text, {"loc": loc, "conf": conf, "prior": prior})
    layer = Net(text, phase="test").layer("det")
    ref = ref_detection_output(
        loc, conf, prior, layer.num_classes, layer.share_location, layer.background_label_id,
        layer.code_type, layer.variance_encoded_in_target, layer.nms_threshold, layer.top_k,
        layer.eta, layer.keep_top_k, layer.confidence_threshold)
    np.testing.assert_array_equal(ours["det"], ref)


DET_REF_CASES = [
    # behaviour OpenCV does not share: CORNER_SIZE, eta, top_k 0, default threshold,
    # no keep_top_k, nms_threshold 0
    (dict(seed=20), "num_classes: 4 code_type: CORNER_SIZE confidence_threshold: 0.1 "
                    "nms_param { nms_threshold: 0.45 }"),
    (dict(seed=21), "num_classes: 4 code_type: CENTER_SIZE confidence_threshold: 0.05 "
                    "nms_param { nms_threshold: 0.9 eta: 0.8 }"),
    (dict(seed=22), "num_classes: 4 nms_param { nms_threshold: 0.45 top_k: 0 } keep_top_k: 5"),
    (dict(seed=23, num_priors=30, num_classes=3), "num_classes: 3 code_type: CENTER_SIZE "
                                                  "nms_param { nms_threshold: 0.45 }"),
    (dict(seed=24, num_priors=30, num_classes=3), "num_classes: 3 nms_param { nms_threshold: 0 }"),
    (dict(seed=25, share=False, num=2), "num_classes: 4 share_location: false code_type: CORNER_SIZE "
                                        "background_label_id: -1 "
                                        "nms_param { nms_threshold: 0.5 eta: 0.9 top_k: 10 }"
                                        " keep_top_k: 7 confidence_threshold: 0.1"),
]


@pytest.mark.parametrize("kw,params", DET_REF_CASES)
def test_detection_output_fork_only_behaviour(kw, params):
    loc, conf, prior = det_case(**kw)
    text = det_text(loc, conf, prior, params)
    net, ours = run_ours(text, {"loc": loc, "conf": conf, "prior": prior})
    layer = net.layer("det")
    ref = ref_detection_output(
        loc, conf, prior, layer.num_classes, layer.share_location, layer.background_label_id,
        layer.code_type, layer.variance_encoded_in_target, layer.nms_threshold, layer.top_k,
        layer.eta, layer.keep_top_k, layer.confidence_threshold)
    np.testing.assert_array_equal(ours["det"], ref)
    assert ours["det"][0, 0, 0, 1] >= 0 or "top_k: 0" in params


def test_detection_output_default_threshold_keeps_zero_scores():
    """Without confidence_threshold the fork uses -FLT_MAX: scores of exactly 0 pass."""
    loc, conf, prior = det_case(30, num_priors=10, num_classes=2)
    conf[:] = 0
    text = det_text(loc, conf, prior, "num_classes: 2 nms_param { nms_threshold: 1.0 }")
    _, ours = run_ours(text, {"loc": loc, "conf": conf, "prior": prior})
    assert ours["det"].shape == (1, 1, 10, 7)
    assert np.all(ours["det"][0, 0, :, 1] == 1) and np.all(ours["det"][0, 0, :, 2] == 0)
    # index order among the equal scores (stable sort)
    dec = decode_boxes(torch.from_numpy(prior[0, 0].reshape(-1, 4)),
                       torch.from_numpy(prior[0, 1].reshape(-1, 4)),
                       torch.from_numpy(loc.reshape(-1, 4)), 1).numpy()
    np.testing.assert_array_equal(ours["det"][0, 0, :, 3:], dec)


def test_detection_output_empty_and_partly_empty_batch():
    loc, conf, prior = det_case(31, num=2)
    params = "num_classes: 4 confidence_threshold: 0.999 nms_param { nms_threshold: 0.45 }"
    text = det_text(loc, conf, prior, params)
    _, ours = run_ours(text, {"loc": loc, "conf": conf, "prior": prior})
    expect = np.array([[0, -1, -1, -1, -1, -1, -1], [1, -1, -1, -1, -1, -1, -1]], F).reshape(1, 1, 2, 7)
    np.testing.assert_array_equal(ours["det"], expect)
    # image 1 finds something, image 0 nothing: no placeholder row for image 0
    conf2 = conf.copy().reshape(2, -1, 4)
    conf2[1, 5] = [0.0, 1.0, 0.0, 0.0]
    _, ours = run_ours(text, {"loc": loc, "conf": conf2.reshape(2, -1), "prior": prior})
    assert ours["det"].shape == (1, 1, 1, 7)
    assert ours["det"][0, 0, 0, :3].tolist() == [1.0, 1.0, 1.0]
    # keep_top_k: 0 cuts everything: the placeholder rows again
    text0 = det_text(loc, conf, prior, "num_classes: 4 keep_top_k: 0 nms_param { nms_threshold: 0.45 }")
    _, ours = run_ours(text0, {"loc": loc, "conf": conf, "prior": prior})
    np.testing.assert_array_equal(ours["det"], expect)


def test_detection_output_keep_top_k_ties_match_opencv(tmp_path):
    """Equal scores straddling the keep_top_k cut over more than 16 candidates: which boxes
    survive is decided by std::sort's introsort (OpenCV's binary runs libstdc++'s, as the
    fork's does; OpenCV uses std::sort here while 8 * keep_top_k > candidates)."""
    loc, conf, prior = det_case(40, num_priors=80, num_classes=3, ties=3)
    params = ("num_classes: 3 code_type: CENTER_SIZE keep_top_k: 25 confidence_threshold: 0.2 "
              "nms_param { nms_threshold: 0.7 }")
    text = det_text(loc, conf, prior, _cv_explicit(params))
    feeds = {"loc": loc, "conf": conf, "prior": prior}
    net, ours = run_ours(text, feeds)
    layer = net.layer("det")
    ref_all = ref_detection_output(loc, conf, prior, 3, code=2, nms=layer.nms_threshold,
                                   thr=layer.confidence_threshold)
    scores = np.sort(ref_all[0, 0, :, 2])[::-1]
    assert 25 < len(scores) < 200 and scores[24] == scores[25], "the cut must fall inside a tie"
    theirs = run_cv(net, text, feeds, ["det"], tmp_path)["det"][0, 0]
    match_rows(ours["det"][0, 0], theirs[theirs[:, 2] > 0])


def test_detection_output_shapes_and_errors():
    loc, conf, prior = det_case(50)
    text = det_text(loc, conf, prior, "num_classes: 4 nms_param { nms_threshold: 0.45 }")
    net = Net(text, phase="test")
    assert net.blob_shapes["det"] == (1, 1, 1, 7)
    with pytest.raises(SchemaError, match="num_classes is required"):
        Net(det_text(loc, conf, prior, "nms_param { nms_threshold: 0.45 }"), phase="test")
    with pytest.raises(SchemaError, match="eta"):
        Net(det_text(loc, conf, prior, "num_classes: 4 nms_param { eta: 1.5 }"), phase="test")
    with pytest.raises(SchemaError, match="nms_threshold"):
        Net(det_text(loc, conf, prior, "num_classes: 4 nms_param { nms_threshold: -0.1 }"), phase="test")
    with pytest.raises(SchemaError, match="share_location: false"):
        Net(det_text(loc, conf, prior, "num_classes: 4 background_label_id: -1"), phase="test")
    with pytest.raises(ShapeError, match="confidence"):
        Net(det_text(loc, conf, prior, "num_classes: 5"), phase="test")
    with pytest.raises(ShapeError, match="location"):
        Net(det_text(loc, conf, prior, "num_classes: 4 share_location: false"), phase="test")
    with pytest.raises(GraphError):
        Net(_inputs({"loc": loc.shape, "conf": conf.shape})
            + '\nlayer { name: "d" type: "DetectionOutput" bottom: "loc" bottom: "conf" top: "d" '
              'detection_output_param { num_classes: 4 } }', phase="test")
    # the function form, and no gradient
    out = detection_output(torch.from_numpy(loc).requires_grad_(True), torch.from_numpy(conf),
                           torch.from_numpy(prior), num_classes=4, nms_threshold=0.45,
                           confidence_threshold=0.1)
    assert out.dim() == 4 and out.shape[-1] == 7 and not out.requires_grad


def test_detection_output_save_output_param_accepted(tmp_path, caplog):
    loc, conf, prior = det_case(51)
    out_dir = tmp_path / "results"
    params = ("num_classes: 4 nms_param { nms_threshold: 0.45 } confidence_threshold: 0.1 "
              f'save_output_param {{ output_directory: "{out_dir}" output_name_prefix: "x" '
              'output_format: "VOC" }')
    _, ours = run_ours(det_text(loc, conf, prior, params), {"loc": loc, "conf": conf, "prior": prior})
    assert ours["det"].shape[2] > 0 and not out_dir.exists()
    assert "writes no result files" in caplog.text


def test_registered():
    from caffe_compat.layers.registry import lookup
    for t in ("PriorBox", "Permute", "Normalize", "DetectionOutput"):
        assert lookup(t).__module__ == "caffe_compat.layers.ssd"
    assert os.path.basename(ssd.__file__) == "ssd.py"
