"""ROIPooling and SmoothL1Loss (the Fast R-CNN fork's C++ layers).

The oracle Caffe lacks both, so they are checked against independent numpy loops written
from the fork's definition (float32 bin arithmetic, C rounding, its input-side backward
loop), on both forward backends (torchvision's kernel and the pure-torch fallback).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat import Net
from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers import fast_rcnn
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.fast_rcnn import ROIPooling, SmoothL1Loss, roi_pooling
from caffe_compat.layers.registry import lookup
from caffe_compat.protos import caffe_pb2

FLT_MAX = float(np.finfo(np.float32).max)
BACKENDS = ["torchvision", "torch"]


# ============================================================================ references
def c_round(v: float) -> int:
    """C round(): half away from zero (exact: no x + 0.5 rounding)."""
    a = abs(float(v))
    r = math.floor(a)
    if a - r >= 0.5:
        r += 1
    return int(r) if v >= 0 else -int(r)


def ref_corners(roi, scale, ft):
    b = int(float(roi[0]))  # C cast truncates toward zero, as Python's int()
    sw, sh, ew, eh = (c_round(ft(roi[k]) * ft(scale)) for k in (1, 2, 3, 4))
    return b, sw, sh, ew, eh


def ref_roi_pool(x, rois, ph_n, pw_n, scale, ft=np.float32):
    """Forward loop from the fork's definition; returns (top, argmax)."""
    n, c, h, w = x.shape
    r = len(rois)
    top = np.zeros((r, c, ph_n, pw_n), ft)
    arg = np.full((r, c, ph_n, pw_n), -1, np.int64)
    for i in range(r):
        b, sw, sh, ew, eh = ref_corners(rois[i], scale, ft)
        bh = ft(max(eh - sh + 1, 1)) / ft(ph_n)
        bw = ft(max(ew - sw + 1, 1)) / ft(pw_n)
        for ph in range(ph_n):
            for pw in range(pw_n):
                hs = min(max(math.floor(ft(ph) * bh) + sh, 0), h)
                he = min(max(math.ceil(ft(ph + 1) * bh) + sh, 0), h)
                ws = min(max(math.floor(ft(pw) * bw) + sw, 0), w)
                we = min(max(math.ceil(ft(pw + 1) * bw) + sw, 0), w)
                for ch in range(c):
                    if he <= hs or we <= ws:
                        continue  # empty: 0, argmax -1
                    best, idx = ft(-FLT_MAX), -1
                    for yy in range(hs, he):
                        for xx in range(ws, we):
                            if x[b, ch, yy, xx] > best:
                                best, idx = x[b, ch, yy, xx], yy * w + xx
                    top[i, ch, ph, pw] = best
                    arg[i, ch, ph, pw] = idx
    return top, arg


def ref_roi_pool_backward(top_diff, arg, rois, x_shape, scale, ft=np.float32):
    """The fork's CPU backward loop: input cells inside the ROI, feasible bins, argmax match."""
    n, c, h, w = x_shape
    r, _, ph_n, pw_n = top_diff.shape
    gx = np.zeros(x_shape, np.float64)
    for i in range(r):
        b, sw, sh, ew, eh = ref_corners(rois[i], scale, ft)
        bh = ft(max(eh - sh + 1, 1)) / ft(ph_n)
        bw = ft(max(ew - sw + 1, 1)) / ft(pw_n)
        for ch in range(c):
            for yy in range(max(0, sh), min(h, eh + 1)):
                for xx in range(max(0, sw), min(w, ew + 1)):
                    p0 = min(max(math.floor(ft(yy - sh) / bh), 0), ph_n)
                    p1 = min(max(math.ceil(ft(yy - sh + 1) / bh), 0), ph_n)
                    q0 = min(max(math.floor(ft(xx - sw) / bw), 0), pw_n)
                    q1 = min(max(math.ceil(ft(xx - sw + 1) / bw), 0), pw_n)
                    g = 0.0
                    for ph in range(p0, p1):
                        for pw in range(q0, q1):
                            if arg[i, ch, ph, pw] == yy * w + xx:
                                g += top_diff[i, ch, ph, pw]
                    gx[b, ch, yy, xx] += g
    return gx


def ref_smooth_l1(pred, target, w_in=None, w_out=None, sigma=1.0):
    """Loss and the fork's backward formula (f' = sigma^2 x inside, sign(x) outside)."""
    s2 = float(np.float32(sigma) * np.float32(sigma))
    p, t = pred.astype(np.float64), target.astype(np.float64).reshape(pred.shape)
    wi = np.ones_like(p) if w_in is None else w_in.astype(np.float64).reshape(p.shape)
    wo = np.ones_like(p) if w_out is None else w_out.astype(np.float64).reshape(p.shape)
    loss, grad = 0.0, np.zeros_like(p)
    num = p.shape[0]
    for idx in np.ndindex(*p.shape):
        x = wi[idx] * (p[idx] - t[idx])
        if abs(x) < 1.0 / s2:
            f, d = 0.5 * s2 * x * x, s2 * x
        else:
            f, d = abs(x) - 0.5 / s2, float(np.sign(x))
        loss += wo[idx] * f
        grad[idx] = d * wi[idx] * wo[idx] / num
    return loss / num, grad


# ============================================================================ helpers
def roi_param(ph=2, pw=2, scale=1.0):
    return text_format.Parse(
        f'name: "roi" type: "ROIPooling" bottom: "x" bottom: "rois" top: "y" '
        f'roi_pooling_param {{ pooled_h: {ph} pooled_w: {pw} spatial_scale: {scale} }}',
        caffe_pb2.LayerParameter())


def sl1_param(n_bottoms=2, sigma=None):
    bottoms = " ".join(f'bottom: "b{i}"' for i in range(n_bottoms))
    extra = f"smooth_l1_loss_param {{ sigma: {sigma} }}" if sigma is not None else ""
    return text_format.Parse(f'name: "l" type: "SmoothL1Loss" {bottoms} top: "loss" {extra}',
                             caffe_pb2.LayerParameter())


def degenerate_rois(h, w, scale):
    """ROIs (in image pixels) that hit every special case of the fork's geometry."""
    s = 1.0 / scale
    return np.array([
        [0, 0, 0, (w - 1) * s, (h - 1) * s],      # whole map
        [1, 2 * s, 1 * s, 5 * s, 6 * s],          # inner box
        [0, 3 * s, 3 * s, 3 * s, 3 * s],          # single cell
        [1, 6 * s, 5 * s, 2 * s, 1 * s],          # reversed corners -> 1x1 at the start
        [0, -9 * s, -9 * s, -2 * s, -3 * s],      # entirely above-left of the map
        [1, (w + 2) * s, 1 * s, (w + 9) * s, 4 * s],  # entirely right of the map
        [0, -3 * s, -2 * s, (w + 3) * s, (h + 4) * s],  # larger than the map
        [1, 4 * s, 2 * s, 4 * s, (h - 1) * s],    # one column tall
        [0.9, 0, 0, 2 * s, 2 * s],                # batch index truncated to 0
        [1, 0.5 * s, 1.5 * s, 4.5 * s, 6.5 * s],  # .5 after scaling: rounds away from zero
        [0, -0.5 * s, -1.5 * s, 2.5 * s, 3.5 * s],  # negative halves round to -1, -2
    ], np.float32)


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(fast_rcnn, "ROI_POOL_BACKEND", request.param)
    return request.param


# ============================================================================ ROIPooling
def test_registered():
    assert lookup("ROIPooling") is ROIPooling
    assert lookup("SmoothL1Loss") is SmoothL1Loss


@pytest.mark.parametrize("ph,pw,scale", [(2, 2, 1.0), (3, 2, 0.5), (7, 7, 0.0625), (4, 5, 1 / 3)])
def test_roi_pool_matches_reference(backend, ph, pw, scale):
    rng = np.random.RandomState(ph * 10 + pw)
    h, w = 9, 11
    x = rng.randn(2, 3, h, w).astype(np.float32)
    rois = degenerate_rois(h, w, float(np.float32(scale)))
    top_ref, arg_ref = ref_roi_pool(x, rois, ph, pw, scale)
    layer = ROIPooling(roi_param(ph, pw, scale), [x.shape, rois.shape], BuildContext())
    xt = torch.from_numpy(x).requires_grad_(True)
    (top,) = layer(xt, torch.from_numpy(rois))
    np.testing.assert_array_equal(top.detach().numpy(), top_ref)
    np.testing.assert_array_equal(layer.argmax.numpy(), arg_ref)
    assert layer.infer_top_shapes([x.shape, rois.shape]) == [tuple(top.shape)]
    g = rng.randn(*top.shape).astype(np.float32)
    (gx,) = torch.autograd.grad(top, xt, torch.from_numpy(g))
    gx_ref = ref_roi_pool_backward(g, arg_ref, rois, x.shape, scale)
    np.testing.assert_allclose(gx.numpy(), gx_ref, rtol=1e-6, atol=1e-6)


def test_roi_rounding_is_half_away_from_zero(backend):
    # spatial_scale 1/16: x = 8 -> 0.5 -> 1 (torch.round: 0), 40 -> 2.5 -> 3 (torch.round: 2),
    # -8 -> -0.5 -> -1; a 1x1 pooled output of a one-cell ROI reads exactly that cell
    x = torch.arange(6 * 6, dtype=torch.float32).reshape(1, 1, 6, 6)
    rois = torch.tensor([[0, 8, 40, 8, 40],      # (h, w) = (3, 1)
                         [0, 24, 8, 24, 8],      # 1.5 -> 2, 0.5 -> 1: (1, 2)
                         [0, -8, 56, -8, 56],    # -0.5 -> -1 (outside: empty), 3.5 -> 4
                         [0, 72, 72, 72, 72]],   # 4.5 -> 5: (5, 5)
                        dtype=torch.float32)
    top, arg = roi_pooling(x, rois, 1, 1, 1 / 16)
    assert top.flatten().tolist() == [3 * 6 + 1, 1 * 6 + 2, 0.0, 5 * 6 + 5]
    assert arg.flatten().tolist() == [19, 8, -1, 35]
    assert torch.round(torch.tensor(0.5)) == 0  # why C rounding matters here


def test_roi_ties_pick_first_row_major(backend):
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 3] = 5.0
    x[0, 0, 1, 0] = 5.0  # same max later in row-major order
    x[0, 0, 3, 3] = -1.0
    rois = torch.tensor([[0, 0, 0, 3, 3.0], [0, 0, 1, 3, 3.0]])
    top, arg = roi_pooling(x, rois, 1, 1, 1.0)
    assert arg.flatten().tolist() == [3, 4]
    # all-equal bin: the first cell wins; gradient goes only there
    xr = torch.full((1, 1, 3, 3), 2.0, requires_grad=True)
    top, arg = roi_pooling(xr, torch.tensor([[0, 0, 0, 2, 2.0]]), 1, 1, 1.0)
    top.sum().backward()
    assert arg.item() == 0 and xr.grad[0, 0, 0, 0] == 1 and xr.grad.sum() == 1


def test_roi_non_finite_features(backend):
    # values <= -FLT_MAX and NaN never win the fork's strict '>' against -FLT_MAX
    x = torch.tensor([[[[float("nan"), -float("inf")], [-float("inf"), 1.0]]]])
    rois = torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, 1, 1.0], [0, 0, 0, 0, 0.0]])
    top, arg = roi_pooling(x, rois, 1, 1, 1.0)
    ref_top, ref_arg = ref_roi_pool(x.numpy(), rois.numpy(), 1, 1, 1.0)
    assert top.flatten().tolist() == [-FLT_MAX, 1.0, -FLT_MAX] == ref_top.flatten().tolist()
    assert arg.flatten().tolist() == [-1, 3, -1] == ref_arg.flatten().tolist()


def test_roi_backward_sums_overlaps(backend):
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 9.0
    x.requires_grad_(True)
    rois = torch.tensor([[0, 0, 0, 2, 2.0], [0, 1, 1, 2, 2.0], [0, 0, 0, 1, 1.0]])
    top, _ = roi_pooling(x, rois, 1, 1, 1.0)
    top.backward(torch.tensor([1.0, 2.0, 4.0]).view(3, 1, 1, 1))
    assert x.grad[0, 0, 1, 1] == 7.0 and x.grad.sum() == 7.0


def test_roi_backward_follows_fork_not_plain_argmax(backend):
    """Where the fork's backward drops gradients that torchvision's routes (documented)."""
    # (1) float spill: a 57-cell-wide ROI with pooled_w 7 has its last bin end at
    # ceil(7 * float(57/7)) = 58, one column past the ROI; a max there gets no gradient
    assert math.ceil(np.float32(7) * (np.float32(57) / np.float32(7))) == 58
    x = torch.zeros(1, 1, 2, 60)
    x[0, 0, 0, 57] = 3.0
    x.requires_grad_(True)
    rois = torch.tensor([[0, 0, 0, 56, 1.0]])
    top, arg = roi_pooling(x, rois, 1, 7, 1.0)
    assert top[0, 0, 0, 6] == 3.0 and arg[0, 0, 0, 6] == 57
    top.sum().backward()
    ref = ref_roi_pool_backward(np.ones((1, 1, 1, 7), np.float32), arg.numpy(), rois.numpy(),
                                (1, 1, 2, 60), 1.0)
    assert ref[0, 0, 0, 57] == 0 and x.grad[0, 0, 0, 57] == 0
    np.testing.assert_array_equal(x.grad.numpy(), ref)
    # (2) reversed ROI: pooled from its start cell, but no gradient at all
    x2 = torch.arange(16.0).reshape(1, 1, 4, 4).requires_grad_(True)
    top2, arg2 = roi_pooling(x2, torch.tensor([[0, 2, 2, 1, 1.0]]), 2, 2, 1.0)
    assert (top2 == 10.0).all() and (arg2 == 10).all()
    top2.sum().backward()
    assert x2.grad.abs().sum() == 0
    # torchvision's own autograd routes both (the reason we keep our own backward)
    import torchvision as tv

    x3 = x.detach().clone().requires_grad_(True)
    tv.ops.roi_pool(x3, rois, (1, 7), 1.0).sum().backward()
    assert x3.grad[0, 0, 0, 57] == 1.0


def test_roi_gradcheck_float64(backend):
    rng = np.random.RandomState(3)
    x = torch.from_numpy(rng.randn(2, 2, 6, 7)).requires_grad_(True)
    rois = torch.tensor([[0, 0, 0, 6, 5], [1, 1, 2, 4, 5], [1, 3, 0, 9, 2], [0, 2, 2, 2, 2]],
                        dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda t: roi_pooling(t, rois, 3, 2, 1.0)[0], (x,))


def test_roi_float64_matches_reference(backend):
    rng = np.random.RandomState(5)
    x = rng.randn(2, 2, 9, 11)
    rois = degenerate_rois(9, 11, 0.5).astype(np.float64)
    top, arg = roi_pooling(torch.from_numpy(x), torch.from_numpy(rois), 3, 4, 0.5)
    rt, ra = ref_roi_pool(x, rois, 3, 4, 0.5, ft=np.float64)
    np.testing.assert_array_equal(top.numpy(), rt)
    np.testing.assert_array_equal(arg.numpy(), ra)


def test_roi_backends_agree_randomized():
    rng = np.random.RandomState(11)
    for trial in range(20):
        n, c, h, w = 2, 2, rng.randint(1, 12), rng.randint(1, 12)
        x = torch.from_numpy(rng.randint(-3, 4, size=(n, c, h, w)).astype(np.float32))  # ties
        r = rng.randint(0, 6)
        scale = float(np.float32([1.0, 0.5, 0.25, 1 / 16][trial % 4]))
        rois = np.c_[rng.randint(0, n, r), rng.uniform(-4, 14, (r, 4)) / scale].astype(np.float32)
        ph, pw = rng.randint(1, 5), rng.randint(1, 5)
        a = fast_rcnn.roi_pool_forward(x, torch.from_numpy(rois), ph, pw, scale, backend="torchvision")
        b = fast_rcnn.roi_pool_forward(x, torch.from_numpy(rois), ph, pw, scale, backend="torch")
        rt, ra = ref_roi_pool(x.numpy(), rois, ph, pw, scale)
        for top, arg in (a, b):
            np.testing.assert_array_equal(top.numpy(), rt)
            np.testing.assert_array_equal(arg.numpy(), ra)


def test_roi_empty_and_4d_rois(backend):
    x = torch.randn(1, 2, 5, 5, requires_grad=True)
    layer = ROIPooling(roi_param(2, 3), [(1, 2, 5, 5), (0, 5)], BuildContext())
    (top,) = layer(x, torch.zeros(0, 5))
    assert top.shape == (0, 2, 2, 3)
    top.sum().backward()
    assert x.grad.abs().sum() == 0
    layer4 = ROIPooling(roi_param(2, 2), [(1, 2, 5, 5), (3, 5, 1, 1)], BuildContext())
    rois = torch.tensor([[0, 0, 0, 4, 4], [0, 1, 1, 3, 3], [0, 2, 2, 2, 2.0]])
    (t4,) = layer4(x, rois.view(3, 5, 1, 1))
    np.testing.assert_array_equal(t4.detach().numpy(),
                                  roi_pooling(x.detach(), rois, 2, 2, 1.0)[0].numpy())


def test_roi_errors():
    ctx = BuildContext()
    with pytest.raises(SchemaError, match="pooled_h"):
        ROIPooling(roi_param(0, 2), [(1, 1, 4, 4), (1, 5)], ctx)
    with pytest.raises(ShapeError, match="5 values"):
        ROIPooling(roi_param(), [(1, 1, 4, 4), (1, 4)], ctx)
    with pytest.raises(ShapeError, match="4-D"):
        ROIPooling(roi_param(), [(1, 4, 4), (1, 5)], ctx)
    with pytest.raises(GraphError):
        ROIPooling(roi_param(), [(1, 1, 4, 4)], ctx)
    layer = ROIPooling(roi_param(), [(1, 1, 4, 4), (1, 5)], ctx)
    with pytest.raises(ShapeError, match=r"layer 'roi'.*batch index must be in \[0, 1\)"):
        layer(torch.zeros(1, 1, 4, 4), torch.tensor([[1, 0, 0, 1, 1.0]]))
    with pytest.raises(ShapeError, match="finite"):
        layer(torch.zeros(1, 1, 4, 4), torch.tensor([[0, 0, float("nan"), 1, 1.0]]))
    with pytest.raises(ShapeError):
        layer(torch.zeros(1, 1, 4, 4), torch.tensor([[-1, 0, 0, 1, 1.0]]))


def test_roi_no_gradient_to_rois():
    x = torch.randn(1, 1, 4, 4, requires_grad=True)
    rois = torch.tensor([[0, 0, 0, 3, 3.0]], requires_grad=True)
    top, _ = roi_pooling(x, rois, 2, 2, 1.0)
    gx, gr = torch.autograd.grad(top.sum(), (x, rois), allow_unused=True)
    assert gr is None and gx.sum() == 4


@pytest.mark.gpu
def test_roi_cuda_matches_cpu():
    rng = np.random.RandomState(7)
    x = rng.randn(2, 3, 9, 11).astype(np.float32)
    rois = degenerate_rois(9, 11, 0.0625)
    g = rng.randn(len(rois), 3, 7, 7).astype(np.float32)
    outs = {}
    for dev in ("cpu", "cuda"):
        xt = torch.from_numpy(x).to(dev).requires_grad_(True)
        top, arg = roi_pooling(xt, torch.from_numpy(rois).to(dev), 7, 7, 0.0625)
        (gx,) = torch.autograd.grad(top, xt, torch.from_numpy(g).to(dev))
        outs[dev] = (top.detach().cpu(), arg.cpu(), gx.cpu())
    for a, b in zip(outs["cpu"], outs["cuda"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    rt, ra = ref_roi_pool(x, rois, 7, 7, 0.0625)
    np.testing.assert_array_equal(outs["cuda"][1].numpy(), ra)


# ============================================================================ SmoothL1Loss
@pytest.mark.parametrize("sigma,weights", [(None, False), (3.0, True), (0.5, True), (1.0, True)])
def test_smooth_l1_matches_reference(sigma, weights):
    rng = np.random.RandomState(0)
    shape = (3, 8, 2, 2)
    pred = rng.randn(*shape).astype(np.float32)
    target = rng.randn(*shape).astype(np.float32)
    bottoms = [pred, target]
    if weights:
        w_in = (rng.rand(*shape) > 0.3).astype(np.float32) * 2.0
        w_out = rng.rand(*shape).astype(np.float32)
        bottoms += [w_in, w_out]
    layer = SmoothL1Loss(sl1_param(len(bottoms), sigma), [b.shape for b in bottoms], BuildContext())
    assert layer.is_loss and layer.infer_top_shapes([b.shape for b in bottoms]) == [()]
    ts = [torch.from_numpy(b).requires_grad_(True) for b in bottoms]
    (loss,) = layer(*ts)
    assert loss.shape == ()
    ref_loss, ref_grad = ref_smooth_l1(*bottoms, sigma=1.0 if sigma is None else sigma)
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-6)
    top_diff = 0.7  # a loss weight
    grads = torch.autograd.grad(loss * top_diff, ts, allow_unused=True)
    np.testing.assert_allclose(grads[0].numpy(), ref_grad * top_diff, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads[1].numpy(), -ref_grad * top_diff, rtol=1e-5, atol=1e-7)
    for g in grads[2:]:
        assert g is None  # the fork never writes the weights' diffs


def test_smooth_l1_rpn_shape_divides_by_num():
    # RPN: (1, 4A, H, W) divided by num = 1; the same data as (4, ...) divides by 4
    rng = np.random.RandomState(1)
    p, t = rng.randn(1, 8, 3, 3).astype(np.float32), rng.randn(1, 8, 3, 3).astype(np.float32)
    l1 = SmoothL1Loss(sl1_param(2, 3.0), [p.shape, t.shape], BuildContext())
    a = l1(torch.from_numpy(p), torch.from_numpy(t))[0].item()
    l4 = SmoothL1Loss(sl1_param(2, 3.0), [(4, 2, 3, 3)] * 2, BuildContext())
    b = l4(torch.from_numpy(p).view(4, 2, 3, 3), torch.from_numpy(t).view(4, 2, 3, 3))[0].item()
    np.testing.assert_allclose(a, 4 * b, rtol=1e-6)
    np.testing.assert_allclose(a, ref_smooth_l1(p, t, sigma=3.0)[0], rtol=1e-6)


def test_smooth_l1_threshold_exact():
    # sigma 2: threshold 1/4 exactly; |x| = 0.25 takes the linear branch:
    # 0.25 - 0.5/4 = 0.125 (= the quadratic's value: f is C1 there), gradient sign(x) = +-1
    layer = SmoothL1Loss(sl1_param(2, 2.0), [(1, 4), (1, 4)], BuildContext())
    pred = torch.tensor([[0.25, -0.25, 0.0, 1.0]], requires_grad=True)
    (loss,) = layer(pred, torch.zeros(1, 4))
    assert loss.item() == pytest.approx(0.125 + 0.125 + 0.0 + (1.0 - 0.125))
    loss.backward()
    assert pred.grad.tolist() == [[1.0, -1.0, 0.0, 1.0]]
    # sigma 3 (RPN): just inside / outside 1/9
    thr = 1.0 / 9.0
    x = np.array([np.nextafter(np.float32(thr), np.float32(0)), np.float32(thr) * 1.0001,
                  -np.float32(thr) * 1.0001], np.float32)
    l3 = SmoothL1Loss(sl1_param(2, 3.0), [(1, 3)] * 2, BuildContext())
    xt = torch.from_numpy(x[None]).requires_grad_(True)
    (v,) = l3(xt, torch.zeros(1, 3))
    ref, ref_g = ref_smooth_l1(x[None], np.zeros((1, 3), np.float32), sigma=3.0)
    np.testing.assert_allclose(v.item(), ref, rtol=1e-6)
    v.backward()
    np.testing.assert_allclose(xt.grad.numpy(), ref_g, rtol=1e-6)
    assert xt.grad[0, 1] == 1.0 and xt.grad[0, 2] == -1.0 and 0.99 < xt.grad[0, 0] < 1.0


def test_smooth_l1_gradcheck_float64():
    rng = np.random.RandomState(2)
    shape = (2, 3, 2)
    p = torch.from_numpy(rng.randn(*shape)).requires_grad_(True)
    t = torch.from_numpy(rng.randn(*shape)).requires_grad_(True)
    wi = torch.from_numpy(rng.rand(*shape) + 0.5)
    wo = torch.from_numpy(rng.rand(*shape))
    layer = SmoothL1Loss(sl1_param(4, 3.0), [shape] * 4, BuildContext())
    assert torch.autograd.gradcheck(lambda a, b: layer(a, b, wi, wo)[0], (p, t))


def test_smooth_l1_sigma_zero_and_compatible_shapes():
    layer = SmoothL1Loss(sl1_param(2, 0.0), [(2, 3), (2, 3, 1, 1)], BuildContext())
    (v,) = layer(torch.randn(2, 3), torch.randn(2, 3, 1, 1))
    assert v.item() == 0.0  # 1/sigma^2 = inf: all quadratic with a zero factor


def test_smooth_l1_three_bottoms_is_fast_rcnn_2015_form():
    """rbgirshick/fast-rcnn's layer: the third bottom (bbox_loss_weights) scales the difference."""
    rng = np.random.RandomState(3)
    p, t, w = (rng.randn(3, 8).astype(np.float32) for _ in range(3))
    w = (w > 0).astype(np.float32)
    layer = SmoothL1Loss(sl1_param(3), [(3, 8)] * 3, BuildContext())
    (v,) = layer(torch.from_numpy(p), torch.from_numpy(t), torch.from_numpy(w))
    x = w * (p - t)
    ref = np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5).sum() / 3
    assert abs(v.item() - ref) <= 1e-5 * abs(ref)


def test_smooth_l1_errors():
    ctx = BuildContext()
    with pytest.raises(GraphError):
        SmoothL1Loss(sl1_param(1), [(2, 4)], ctx)
    with pytest.raises(ShapeError, match="target"):
        SmoothL1Loss(sl1_param(2), [(2, 4), (2, 5)], ctx)
    with pytest.raises(ShapeError, match="outside weights"):
        SmoothL1Loss(sl1_param(4), [(2, 4)] * 3 + [(4, 2)], ctx)


def test_roi_backend_selection(monkeypatch):
    monkeypatch.setattr(fast_rcnn, "ROI_POOL_BACKEND", "auto")
    assert fast_rcnn._use_torchvision(None, torch.float32)
    monkeypatch.setattr(fast_rcnn, "_TV_OK", False)  # as if torchvision were not installed
    assert not fast_rcnn._use_torchvision(None, torch.float32)
    with pytest.raises(RuntimeError, match="torchvision"):
        fast_rcnn._use_torchvision("torchvision", torch.float32)
    x = torch.randn(1, 2, 5, 5)
    rois = torch.tensor([[0, 0, 1, 4, 3.0]])
    top, _ = roi_pooling(x, rois, 2, 2, 1.0)  # runs on the fallback
    np.testing.assert_array_equal(top.numpy(), ref_roi_pool(x.numpy(), rois.numpy(), 2, 2, 1.0)[0])
    with pytest.raises(ValueError, match="allowed"):
        fast_rcnn._use_torchvision("cuda", torch.float32)


def test_through_net_roi_pool_then_smooth_l1():
    net = Net("""name: "frcn_tiny" force_backward: true
        layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 2 dim: 6 dim: 6 } } }
        layer { name: "rois" type: "Input" top: "rois" input_param { shape { dim: 3 dim: 5 } } }
        layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 3 dim: 2 dim: 2 dim: 2 } } }
        layer { name: "pool" type: "ROIPooling" bottom: "x" bottom: "rois" top: "pool"
                roi_pooling_param { pooled_h: 2 pooled_w: 2 spatial_scale: 0.5 } }
        layer { name: "loss" type: "SmoothL1Loss" bottom: "pool" bottom: "t" top: "loss"
                smooth_l1_loss_param { sigma: 3 } }""", phase="train")
    assert net.blob_shapes["pool"] == (3, 2, 2, 2) and net.blob_shapes["loss"] == ()
    rng = np.random.RandomState(9)
    x = rng.randn(2, 2, 6, 6).astype(np.float32)
    rois = np.array([[0, 0, 0, 11, 11], [1, 2, 3, 9, 7], [1, 5, 5, 1, 1]], np.float32)
    t = rng.randn(3, 2, 2, 2).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    net.forward(x=xt, rois=torch.from_numpy(rois), t=torch.from_numpy(t))
    pooled, arg = ref_roi_pool(x, rois, 2, 2, 0.5)
    loss, dpool = ref_smooth_l1(pooled, t, sigma=3.0)
    np.testing.assert_allclose(net.loss.item(), loss, rtol=1e-6)
    net.backward()
    gx = ref_roi_pool_backward(dpool.astype(np.float32), arg, rois, x.shape, 0.5)
    np.testing.assert_allclose(xt.grad.numpy(), gx, rtol=1e-5, atol=1e-7)
