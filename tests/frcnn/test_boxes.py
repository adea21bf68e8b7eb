"""caffe_compat.boxes (IoU, NMS) and caffe_compat.frcnn.boxes (anchors, regression) against
plain-numpy references written from py-faster-rcnn's formulas."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from caffe_compat.boxes import bbox_overlaps, nms
from caffe_compat.frcnn.boxes import (bbox_transform, bbox_transform_inv, clip_boxes, filter_boxes,
                                      generate_anchors, shifted_anchors)


# ---------------------------------------------------------------------------- references
def ref_anchors(base_size=16, ratios=(0.5, 1, 2), scales=(8, 16, 32)):
    """Anchors from the definition: keep the base area per ratio, round half to even, scale."""
    out = []
    c = (base_size - 1) / 2.0                        # center of (0, 0, base-1, base-1)
    for r in ratios:
        w0 = np.rint(np.sqrt(base_size * base_size / r))   # rint: half to even
        h0 = np.rint(w0 * r)
        for s in scales:
            w, h = w0 * s, h0 * s
            out.append([c - (w - 1) / 2, c - (h - 1) / 2, c + (w - 1) / 2, c + (h - 1) / 2])
    return np.array(out)


def ref_iou(a, b):
    """IoU of two boxes with inclusive pixel corners."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    ua = (a[2] - a[0] + 1) * (a[3] - a[1] + 1) + (b[2] - b[0] + 1) * (b[3] - b[1] + 1) - inter
    return inter / ua


def ref_overlaps(a, b):
    return np.array([[ref_iou(x, y) for y in b] for x in a]).reshape(len(a), len(b))


def ref_nms(boxes, scores, thresh):
    """Greedy NMS: best remaining score first (equal scores: lower index), drop IoU > thresh."""
    remaining = sorted(range(len(boxes)), key=lambda i: (-scores[i], i))
    keep = []
    while remaining:
        i = remaining.pop(0)
        keep.append(i)
        remaining = [j for j in remaining if not ref_iou(boxes[i], boxes[j]) > thresh]
    return keep


def rand_boxes(rng, n, lo=0, hi=60, max_wh=30, integer=True):
    x1 = rng.uniform(lo, hi, n)
    y1 = rng.uniform(lo, hi, n)
    w = rng.uniform(1, max_wh, n)
    h = rng.uniform(1, max_wh, n)
    b = np.stack([x1, y1, x1 + w, y1 + h], 1)
    return np.round(b) if integer else b


# ---------------------------------------------------------------------------- anchors
def test_generate_anchors_default_matches_formula():
    a = generate_anchors()
    assert a.dtype == torch.float64 and a.shape == (9, 4)
    np.testing.assert_array_equal(a.numpy(), ref_anchors())
    # the Python (0-based) result, not the MATLAB table in the original's comment
    assert a[0].tolist() == [-84.0, -40.0, 99.0, 55.0]
    # ratio 0.5 hits a .5 in rounding: 23 * 0.5 = 11.5 -> 12 (half to even), width 23
    assert (a[0, 2] - a[0, 0] + 1).item() == 23 * 8 and (a[0, 3] - a[0, 1] + 1).item() == 12 * 8


@pytest.mark.parametrize("kw", [dict(scales=(4, 8, 16, 32)),
                                dict(base_size=8, ratios=(0.25, 1, 3), scales=(2, 5)),
                                dict(ratios=(2.5,), scales=(1,))])
def test_generate_anchors_other_settings(kw):
    np.testing.assert_array_equal(generate_anchors(**kw).numpy(), ref_anchors(**kw))


def test_shifted_anchors_order():
    base = generate_anchors(scales=(1, 2))
    A = base.shape[0]
    out = shifted_anchors(base, 3, 4, 16)
    assert out.shape == (3 * 4 * A, 4)
    for h in range(3):
        for w in range(4):
            for a in range(A):
                exp = base[a].numpy() + np.array([w, h, w, h]) * 16
                np.testing.assert_array_equal(out[(h * 4 + w) * A + a].numpy(), exp)


# ---------------------------------------------------------------------------- overlaps
def test_bbox_overlaps_plus_one_convention():
    a = torch.tensor([[0.0, 0, 9, 9]], dtype=torch.float64)
    b = torch.tensor([[0.0, 0, 9, 9],        # identical: 1
                      [9, 9, 18, 18],        # touching corner pixel: 1 / (100 + 100 - 1)
                      [10, 0, 19, 9],        # adjacent, no shared pixel: 0
                      [0, 0, 9, 4],          # half: 50 / 100
                      [5, 5, 4, 4],          # degenerate (negative width): 0
                      [3, 3, 3, 3]],         # one pixel: 1 / 100
                     dtype=torch.float64)
    got = bbox_overlaps(a, b)[0].tolist()
    assert got == [1.0, 1 / 199, 0.0, 0.5, 0.0, 1 / 100]


def test_bbox_overlaps_random_vs_reference():
    rng = np.random.default_rng(0)
    a = rand_boxes(rng, 40)
    b = rand_boxes(rng, 7)
    b[0] = a[3]                             # exact ties
    b[1] = [a[5, 0], a[5, 1], a[5, 0] - 1, a[5, 3]]   # zero width
    b[2] = [a[6, 0], a[6, 1], a[6, 0] - 5, a[6, 3]]   # negative width
    got = bbox_overlaps(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    np.testing.assert_array_equal(got, ref_overlaps(a, b))
    # extra columns (a gt's class) are ignored; empty inputs give empty results
    b5 = np.concatenate([b, np.full((7, 1), 3.0)], 1)
    np.testing.assert_array_equal(bbox_overlaps(torch.from_numpy(a), torch.from_numpy(b5)).numpy(), got)
    assert bbox_overlaps(torch.from_numpy(a), torch.zeros((0, 5), dtype=torch.float64)).shape == (40, 0)
    fa = rand_boxes(rng, 20, integer=False)
    fb = rand_boxes(rng, 5, integer=False)
    np.testing.assert_allclose(bbox_overlaps(torch.from_numpy(fa), torch.from_numpy(fb)).numpy(),
                               ref_overlaps(fa, fb), rtol=1e-12, atol=0)


def test_bbox_overlaps_gradient():
    a = torch.tensor([[0.0, 0, 9.5, 9.2], [2.0, 1, 12, 14]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 2, 8, 11], [30, 30, 40, 40]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(bbox_overlaps, (a, b))


# ---------------------------------------------------------------------------- transforms
def ref_transform(ex, gt):
    out = []
    for e, g in zip(ex, gt):
        ew, eh = e[2] - e[0] + 1, e[3] - e[1] + 1
        gw, gh = g[2] - g[0] + 1, g[3] - g[1] + 1
        ecx, ecy = e[0] + 0.5 * ew, e[1] + 0.5 * eh
        gcx, gcy = g[0] + 0.5 * gw, g[1] + 0.5 * gh
        out.append([(gcx - ecx) / ew, (gcy - ecy) / eh, np.log(gw / ew), np.log(gh / eh)])
    return np.array(out).reshape(-1, 4)


def ref_transform_inv(boxes, deltas):
    out = np.zeros_like(deltas)
    for i, b in enumerate(boxes):
        w, h = b[2] - b[0] + 1, b[3] - b[1] + 1
        cx, cy = b[0] + 0.5 * w, b[1] + 0.5 * h
        for k in range(deltas.shape[1] // 4):
            dx, dy, dw, dh = deltas[i, 4 * k:4 * k + 4]
            pcx, pcy = dx * w + cx, dy * h + cy
            pw, ph = np.exp(dw) * w, np.exp(dh) * h
            out[i, 4 * k:4 * k + 4] = [pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph]
    return out


def test_bbox_transform_vs_reference():
    rng = np.random.default_rng(1)
    ex, gt = rand_boxes(rng, 30, integer=False), rand_boxes(rng, 30, integer=False)
    got = bbox_transform(torch.from_numpy(ex), torch.from_numpy(gt)).numpy()
    np.testing.assert_allclose(got, ref_transform(ex, gt), rtol=1e-12, atol=1e-14)
    # same box -> zero targets; a float32 gt with float64 anchors computes in float64
    z = bbox_transform(torch.from_numpy(ex), torch.from_numpy(ex).float())
    assert z.dtype == torch.float64
    assert bbox_transform(torch.from_numpy(ex), torch.from_numpy(ex)).abs().max() == 0


def test_bbox_transform_inv_vs_reference_and_no_minus_one():
    rng = np.random.default_rng(2)
    boxes = rand_boxes(rng, 25)
    deltas = rng.normal(0, 0.3, (25, 12))
    got = bbox_transform_inv(torch.from_numpy(boxes), torch.from_numpy(deltas)).numpy()
    np.testing.assert_allclose(got, ref_transform_inv(boxes, deltas), rtol=1e-12, atol=1e-12)
    # zero deltas: x2 = cx + 0.5 * w = x2 + 1 (py-faster-rcnn has no "- 1")
    z = bbox_transform_inv(torch.from_numpy(boxes), torch.zeros((25, 4), dtype=torch.float64)).numpy()
    np.testing.assert_array_equal(z, boxes + np.array([0, 0, 1, 1]))
    # computed in the deltas' dtype; empty input keeps the column count
    f = bbox_transform_inv(torch.from_numpy(boxes), torch.from_numpy(deltas[:, :4]).float())
    assert f.dtype == torch.float32
    assert bbox_transform_inv(torch.zeros((0, 4)), torch.zeros((0, 8))).shape == (0, 8)


def test_transform_round_trip():
    rng = np.random.default_rng(3)
    ex, gt = rand_boxes(rng, 20, integer=False), rand_boxes(rng, 20, integer=False)
    t = bbox_transform(torch.from_numpy(ex), torch.from_numpy(gt))
    back = bbox_transform_inv(torch.from_numpy(ex), t).numpy()
    np.testing.assert_allclose(back, gt + np.array([0, 0, 1, 1]), rtol=0, atol=1e-9)


def test_clip_boxes():
    rng = np.random.default_rng(4)
    b = rng.uniform(-50, 150, (10, 8))
    h, w = 60, 90
    ref = b.copy()
    ref[:, 0::2] = np.clip(ref[:, 0::2], 0, w - 1)
    ref[:, 1::2] = np.clip(ref[:, 1::2], 0, h - 1)
    t = torch.from_numpy(b)
    np.testing.assert_array_equal(clip_boxes(t, (h, w)).numpy(), ref)
    info = torch.tensor([h, w, 1.5], dtype=torch.float32)
    np.testing.assert_array_equal(clip_boxes(t, info[:2]).numpy(), ref)
    np.testing.assert_array_equal(t.numpy(), b)          # out of place


def test_filter_boxes():
    b = torch.tensor([[0.0, 0, 15, 15], [0, 0, 14, 15], [0, 0, 15, 14], [5, 5, 30, 40]])
    assert filter_boxes(b, 16).tolist() == [True, False, False, True]
    assert filter_boxes(b, torch.tensor(15.0)).tolist() == [True, True, True, True]


# ---------------------------------------------------------------------------- nms
def test_nms_threshold_is_strict_and_plus_one():
    boxes = torch.tensor([[0.0, 0, 9, 9],     # area 100
                          [0, 0, 9, 4],       # IoU 0.5 exactly with box 0 (+1 widths)
                          [0, 0, 9, 5]],      # IoU 0.6
                         dtype=torch.float64)
    scores = torch.tensor([0.9, 0.8, 0.7], dtype=torch.float64)
    assert nms(boxes, scores, 0.5).tolist() == [0, 1]       # 0.5 is not > 0.5: kept
    assert nms(boxes, scores, 0.49).tolist() == [0]
    # without the +1 the pair [0,0,9,4]/[0,0,9,9] would have IoU 36/81 < 0.45: suppression proves +1
    assert nms(boxes[:2], scores[:2], 0.45).tolist() == [0]


def test_nms_ties_in_scores_keep_lower_index_first():
    boxes = torch.tensor([[0.0, 0, 9, 9], [0, 0, 9, 9], [20, 20, 29, 29], [20, 20, 29, 29]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    assert nms(boxes, scores, 0.7).tolist() == [0, 2]
    scores = torch.tensor([0.5, 0.5, 0.9, 0.9])
    assert nms(boxes, scores, 0.7).tolist() == [2, 0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("thresh", [0.3, 0.5, 0.7])
def test_nms_random_vs_reference(seed, thresh):
    rng = np.random.default_rng(seed)
    n = 60
    boxes = rand_boxes(rng, n, hi=40, max_wh=25, integer=seed % 2 == 0)
    scores = np.round(rng.uniform(0, 1, n), 1)           # many exact ties
    boxes[5] = boxes[4]                                   # duplicate boxes
    keep = nms(torch.from_numpy(boxes), torch.from_numpy(scores), thresh).tolist()
    assert keep == ref_nms(boxes, scores, thresh)
    # float32 (the layers' dtype) agrees on integer coordinates
    if seed % 2 == 0:
        keep32 = nms(torch.from_numpy(boxes).float(), torch.from_numpy(scores).float(), thresh)
        assert keep32.tolist() == ref_nms(boxes, scores.astype(np.float32), thresh)


def test_nms_empty():
    assert nms(torch.zeros((0, 4)), torch.zeros(0), 0.5).shape == (0,)


@pytest.mark.gpu
def test_nms_on_cuda_matches_cpu():
    rng = np.random.default_rng(7)
    boxes = torch.from_numpy(rand_boxes(rng, 500, hi=200, max_wh=60)).float()
    scores = torch.from_numpy(np.round(rng.uniform(0, 1, 500), 2)).float()
    cpu = nms(boxes, scores, 0.7)
    gpu = nms(boxes.cuda(), scores.cuda(), 0.7)
    assert gpu.device.type == "cuda" and gpu.cpu().tolist() == cpu.tolist()
