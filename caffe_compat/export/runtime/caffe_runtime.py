"""What plain PyTorch lacks to run a converted Caffe net: a small, readable runtime.

Written out by caffe-compat beside every generated model file (``--to python``); it imports
only torch (and torchvision, lazily, for ROI pooling and NMS).  Each function states the
Caffe rule it keeps where PyTorch's own op differs:

* ``pool2d``: Caffe's pooled sizes (ceil by default; a last window that would start in the
  right padding is dropped only when the layer has padding), windows that lie past the
  input (MAX gives -FLT_MAX there), AVE divided by the window clipped to the padded map;
* ``lrn_within_channel``: LRN over an n x n spatial window (ACROSS_CHANNELS is
  ``F.local_response_norm``);
* ``Scale``: Caffe's Scale layer (a learned factor, and bias, broadcast from an axis);
* ``roi_pool``: Fast R-CNN's ROI max pooling, corners rounded half away from zero;
* ``proposal``: py-faster-rcnn's ProposalLayer (anchors, box decoding, clipping, min size,
  top-N, NMS), all with its ``+1`` pixel widths;
* ``stochastic_pool2d``: STOCHASTIC pooling at test time (torch has none);
* SSD (weiliu89/caffe): ``prior_box``, ``Normalize``, ``detection_output`` (decoding,
  per-class ``nms_fast``, ``keep_top_k`` cut with libstdc++'s ``std::sort``: ``gnu_sort``);
* the forks' layers: ``shuffle_channel``, ``unpool`` (SegNet's Upsample with a pooling
  mask), ``psroi_pool`` (R-FCN), ``reorg`` and ``region`` (YOLOv2);
* BVLC layers torch has no single op for: ``Bias``, ``Embed``, ``mvn``, ``argmax``.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pool2d", "stochastic_pool2d", "lrn_within_channel", "Scale", "roi_pool", "proposal",
           "generate_anchors", "prior_box", "Normalize", "detection_output", "nms_fast", "gnu_sort",
           "shuffle_channel", "unpool", "psroi_pool", "reorg", "region", "Bias", "Embed", "mvn",
           "argmax"]

#: Caffe's -FLT_MAX: what a MAX window with no input cell holds
FLT_MAX = 3.4028234663852886e38


# ---------------------------------------------------------------------------- pooling
def pooled_size(size: int, kernel: int, stride: int, pad: int, ceil: bool, padded: bool) -> int:
    """Caffe's pooled size along one axis (``padded``: the layer pads either axis)."""
    span = size + 2 * pad - kernel
    out = (-(-span // stride) if ceil else span // stride) + 1
    if padded and (out - 1) * stride >= size + pad:
        out -= 1  # the last window would start inside the right padding
    return out


def pool2d(x: Tensor, method: str, kernel: Sequence[int], stride: Sequence[int],
           pad: Sequence[int], ceil: bool = True) -> Tensor:
    """Caffe's MAX or AVE pooling of ``x`` (N, C, H, W) where ``F.max_pool2d``/``F.avg_pool2d``
    size or divide differently: the input is padded explicitly up to the end of the last
    window (``-inf`` for MAX, zeros for AVE) and pooled without padding."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    H, W = int(x.shape[2]), int(x.shape[3])
    padded = bool(ph or pw)
    OH = pooled_size(H, kh, sh, ph, ceil, padded)
    OW = pooled_size(W, kw, sw, pw, ceil, padded)
    bottom = (OH - 1) * sh + kh - H - ph  # padding after the input (negative: crop)
    right = (OW - 1) * sw + kw - W - pw
    if method == "max":
        y = F.max_pool2d(F.pad(x, (pw, right, ph, bottom), value=float("-inf")), (kh, kw), (sh, sw))
        return y.clamp_min(-FLT_MAX)  # an empty window: Caffe leaves -FLT_MAX
    if method != "ave":
        raise ValueError(f"pooling method must be 'max' or 'ave', got {method!r}")
    sums = F.avg_pool2d(F.pad(x, (pw, right, ph, bottom)), (kh, kw), (sh, sw), divisor_override=1)
    # each window divided by its size clipped to the padded map [-pad, size + pad)
    rows = [min(o * sh - ph + kh, H + ph) - (o * sh - ph) for o in range(OH)]
    cols = [min(o * sw - pw + kw, W + pw) - (o * sw - pw) for o in range(OW)]
    sizes = torch.tensor([[r * c for c in cols] for r in rows], dtype=x.dtype, device=x.device)
    return sums / sizes


#: Caffe's FLT_MIN: what STOCHASTIC pooling adds to each window's sum
FLT_MIN = 1.1754943508222875e-38


def stochastic_pool2d(x: Tensor, kernel: Sequence[int], stride: Sequence[int], ceil: bool = True) -> Tensor:
    """Caffe's STOCHASTIC pooling at test time (no padding): each window's values weighted
    by themselves, ``sum(x^2) / (FLT_MIN + sum(x))`` (a zero sum gives ``sum(x^2) / FLT_MIN``);
    Caffe's pooled sizes, windows past the input see zeros."""
    (kh, kw), (sh, sw) = kernel, stride
    H, W = int(x.shape[2]), int(x.shape[3])
    OH, OW = pooled_size(H, kh, sh, 0, ceil, False), pooled_size(W, kw, sw, 0, ceil, False)
    xp = F.pad(x, (0, (OW - 1) * sw + kw - W, 0, (OH - 1) * sh + kh - H))
    sums = F.avg_pool2d(xp, (kh, kw), (sh, sw), divisor_override=1)
    squares = F.avg_pool2d(xp * xp, (kh, kw), (sh, sw), divisor_override=1)
    return torch.where(sums == 0, squares / FLT_MIN, squares / (sums + FLT_MIN))


# ---------------------------------------------------------------------------- LRN
def lrn_within_channel(x: Tensor, size: int, alpha: float, beta: float) -> Tensor:
    """Caffe's WITHIN_CHANNEL LRN: ``x * (1 + alpha / size^2 * sum of x^2 over the size x size
    window, zero padded) ** -beta`` (Caffe ignores ``k`` here)."""
    mean = F.avg_pool2d(x * x, size, 1, (size - 1) // 2, count_include_pad=True)
    return x * (mean * alpha + 1.0).pow(-beta)


# ---------------------------------------------------------------------------- Scale
class Scale(nn.Module):
    """Caffe's Scale layer with a learned factor: ``x * weight (+ bias)``, the parameters'
    dims lined up with ``x``'s dims from ``axis`` on (e.g. one value per channel)."""

    def __init__(self, shape: Sequence[int], axis: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.axis = axis
        self.weight = nn.Parameter(torch.ones(tuple(shape)))
        self.bias = nn.Parameter(torch.zeros(tuple(shape))) if bias else None

    def _along(self, p: Tensor, x: Tensor) -> Tensor:
        if p.dim() == 0:
            return p
        tail = x.dim() - self.axis - p.dim()
        return p.reshape(tuple(p.shape) + (1,) * tail)

    def forward(self, x: Tensor) -> Tensor:
        y = x * self._along(self.weight, x)
        if self.bias is not None:
            y = y + self._along(self.bias, x)
        return y


# ---------------------------------------------------------------------------- ROI pooling
def roi_pool(features: Tensor, rois: Tensor, pooled_h: int, pooled_w: int,
             spatial_scale: float) -> Tensor:
    """Fast R-CNN's ROIPooling: ``rois`` (R, 5) rows ``[batch, x1, y1, x2, y2]`` in image
    pixels -> (R, C, pooled_h, pooled_w).

    The Caffe fork rounds the scaled corners half away from zero (C ``round``), sizes an
    ROI ``max(x2 - x1 + 1, 1)`` cells, gives bin ``i`` the cells
    ``[floor(i * size / pooled), ceil((i + 1) * size / pooled))`` clipped to the map, and 0
    to an empty bin.  ``torchvision.ops.roi_pool`` runs exactly those loops (its C++
    kernel is a copy of the fork's), so it is used as it is.
    """
    from torchvision.ops import roi_pool as tv_roi_pool

    rois = rois.reshape(-1, 5).to(features.dtype)
    return tv_roi_pool(features.contiguous(), rois.contiguous(), (pooled_h, pooled_w), spatial_scale)


# ---------------------------------------------------------------------------- RPN proposals
def generate_anchors(base_size: int = 16, ratios: Sequence[float] = (0.5, 1, 2),
                     scales: Sequence[float] = (8, 16, 32)) -> Tensor:
    """py-faster-rcnn's reference anchors (A, 4), float64, ratio-major: the box
    ``(0, 0, base_size - 1, base_size - 1)`` reshaped to each ratio ``h / w`` at the same area
    (``w = round(sqrt(area / r))``, ``h = round(w * r)``, half to even), then scaled."""
    anchors: List[List[float]] = []
    w0 = h0 = float(base_size)
    cx, cy = 0.5 * (w0 - 1), 0.5 * (h0 - 1)
    for r in ratios:
        ws = float(round(math.sqrt(w0 * h0 / r)))  # Python's round: half to even, as numpy's
        hs = float(round(ws * r))
        for s in scales:
            w, h = ws * s, hs * s
            anchors.append([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)])
    return torch.tensor(anchors, dtype=torch.float64)


def _nms(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """Greedy NMS with ``+1`` areas (py-faster-rcnn's): indices kept, best first; equal
    scores keep their order.  torchvision's NMS on ``x2 + 1, y2 + 1`` measures the same
    widths; the scores it sees are ranks, so its own (unstable) sort cannot reorder ties."""
    from torchvision.ops import nms

    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = torch.sort(scores, descending=True, stable=True).indices
    b = boxes[order]
    b = torch.cat([b[:, :2], b[:, 2:] + 1], dim=1)
    rank = torch.arange(b.shape[0], 0, -1, device=b.device, dtype=b.dtype)
    return order[nms(b, rank, float(thresh))]


def _one_image(fg: Tensor, deltas: Tensor, info: Tensor, anchors: Tensor, feat_stride: float,
               pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float,
               min_size: float) -> Tuple[Tensor, Tensor]:
    """Proposals of one image: ``fg`` (A, H, W) scores, ``deltas`` (4A, H, W)."""
    A, H, W = fg.shape
    dtype = deltas.dtype
    # every anchor at every map position, rows in (h, w, a) order like the score maps
    sx = torch.arange(W, dtype=torch.float64, device=fg.device) * feat_stride
    sy = torch.arange(H, dtype=torch.float64, device=fg.device) * feat_stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
    boxes = (anchors.to(fg.device).reshape(1, A, 4) + shifts).reshape(-1, 4).to(dtype)
    scores = fg.permute(1, 2, 0).reshape(-1).to(dtype)
    d = deltas.permute(1, 2, 0).reshape(-1, 4)

    # decode: centre and size of each anchor moved by its deltas (no -1 on x2, y2)
    widths = boxes[:, 2] - boxes[:, 0] + 1.0
    heights = boxes[:, 3] - boxes[:, 1] + 1.0
    cx = d[:, 0] * widths + (boxes[:, 0] + 0.5 * widths)
    cy = d[:, 1] * heights + (boxes[:, 1] + 0.5 * heights)
    pw = torch.exp(d[:, 2]) * widths
    ph = torch.exp(d[:, 3]) * heights
    x1, y1, x2, y2 = cx - 0.5 * pw, cy - 0.5 * ph, cx + 0.5 * pw, cy + 0.5 * ph

    # clip to the image, drop boxes under min_size (scaled to the image) in +1 pixels
    info = info.to(dtype)
    zero = torch.zeros((), dtype=dtype, device=fg.device)
    x_max, y_max = info[1] - 1, info[0] - 1
    x1, x2 = (torch.maximum(torch.minimum(v, x_max), zero) for v in (x1, x2))
    y1, y2 = (torch.maximum(torch.minimum(v, y_max), zero) for v in (y1, y2))
    proposals = torch.stack([x1, y1, x2, y2], dim=1)
    min_px = min_size * info[2]
    keep = ((x2 - x1 + 1) >= min_px) & ((y2 - y1 + 1) >= min_px)
    proposals, scores = proposals[keep], scores[keep]

    order = torch.sort(scores, descending=True, stable=True).indices
    if pre_nms_top_n > 0:
        order = order[:pre_nms_top_n]
    proposals, scores = proposals[order], scores[order]
    keep = _nms(proposals, scores, nms_thresh)
    if post_nms_top_n > 0:
        keep = keep[:post_nms_top_n]
    return proposals[keep], scores[keep]


@torch.no_grad()
def proposal(cls_prob: Tensor, bbox_pred: Tensor, im_info: Tensor, *, feat_stride: float = 16,
             scales: Sequence[float] = (8, 16, 32), ratios: Sequence[float] = (0.5, 1, 2),
             pre_nms_top_n: int = 6000, post_nms_top_n: int = 300, nms_thresh: float = 0.7,
             min_size: float = 16) -> Tuple[Tensor, Tensor]:
    """py-faster-rcnn's ProposalLayer: RPN outputs -> ``(rois (R, 5), scores (R, 1))``.

    ``cls_prob`` (N, 2A, H, W), channels ``A:`` the foreground probabilities; ``bbox_pred``
    (N, 4A, H, W); ``im_info`` (N, 3) rows ``[height, width, scale]``.  Each image: decode
    the anchors' deltas, clip to the image, drop boxes whose ``+1`` width or height is under
    ``min_size * scale``, keep the ``pre_nms_top_n`` best (<= 0: all), NMS at
    ``nms_thresh``, keep ``post_nms_top_n``.  ROI rows are ``[image index, x1, y1, x2, y2]``.
    """
    anchors = generate_anchors(ratios=ratios, scales=scales)
    A = anchors.shape[0]
    info = im_info.reshape(cls_prob.shape[0], -1)
    rois, scores = [], []
    for n in range(cls_prob.shape[0]):
        boxes, s = _one_image(cls_prob[n, A:], bbox_pred[n], info[n, :3], anchors, feat_stride,
                              pre_nms_top_n, post_nms_top_n, nms_thresh, min_size)
        rois.append(torch.cat([torch.full_like(boxes[:, :1], float(n)), boxes], dim=1))
        scores.append(s[:, None])
    return torch.cat(rois, dim=0), torch.cat(scores, dim=0)


# ---------------------------------------------------------------------------- SSD
# The SSD fork (weiliu89/caffe, branch ssd) works on boxes normalized to the image, widths
# without +1, and in float32 (its NormalizedBBox has float fields); where it widens to
# double (prior corners, exp/log) the functions below widen too, so results match bit for bit.

def _f32(v: float) -> float:
    """``v`` rounded to float32 (a C ``float``), as a Python float."""
    return float(torch.tensor(v, dtype=torch.float32))


def _expand_aspect_ratios(given: Sequence[float], flip: bool) -> List[float]:
    """The fork's aspect ratio list: 1, then each new ratio (as a float32) and, with ``flip``,
    its inverse; a ratio within 1e-6 of one already listed is skipped."""
    ars = [1.0]
    for a in given:
        ar = _f32(a)
        if any(abs(_f32(ar - b)) < 1e-6 for b in ars):
            continue
        ars.append(ar)
        if flip:
            ars.append(_f32(1.0 / ar))
    return ars


def prior_sizes(min_sizes: Sequence[float], max_sizes: Sequence[float] = (),
                aspect_ratios: Sequence[float] = (), flip: bool = True) -> List[Tuple[float, float]]:
    """(width, height) of one cell's priors in the fork's order: per ``min_size`` (truncated
    to int, as the fork's ``int min_size_``), the square min box, the square
    ``sqrt(min * max)`` box, then one box per aspect ratio other than 1."""
    ars = _expand_aspect_ratios(aspect_ratios, flip)
    sizes: List[Tuple[float, float]] = []
    for i, mn in enumerate(min_sizes):
        m = int(mn)
        sizes.append((float(m), float(m)))
        if max_sizes:
            side = _f32(math.sqrt(float(m * int(max_sizes[i]))))
            sizes.append((side, side))
        for ar in ars:
            if abs(ar - 1.0) >= 1e-6:
                sizes.append((_f32(m * math.sqrt(ar)), _f32(m / math.sqrt(ar))))
    return sizes


def prior_box(feature: Tensor, image: Tensor | None = None, *, min_sizes: Sequence[float],
              max_sizes: Sequence[float] = (), aspect_ratios: Sequence[float] = (),
              flip: bool = True, clip: bool = False, variance: Sequence[float] = (0.1,),
              img_size: Tuple[int, int] | None = None, step: Tuple[float, float] | None = None,
              offset: float = 0.5) -> Tensor:
    """SSD's PriorBox layer: (1, 2, H * W * P * 4), channel 0 the priors' normalized
    ``[xmin, ymin, xmax, ymax]`` cell by cell (row, column, prior), channel 1 the variances.

    Depends only on the shapes of ``feature`` (H, W) and ``image`` (or ``img_size`` (h, w)).
    ``step`` (h, w) defaults to image size / map size (float32).  Centres are
    ``(column + offset) * step`` in float32, corners ``(centre -+ size / 2) / image size`` in
    double, stored as float32 and clipped to [0, 1] with ``clip``.
    """
    lh, lw = int(feature.shape[2]), int(feature.shape[3])
    ih, iw = img_size if img_size is not None else (int(image.shape[2]), int(image.shape[3]))
    sh, sw = step if step is not None else (_f32(ih / lh), _f32(iw / lw))
    sizes = prior_sizes(min_sizes, max_sizes, aspect_ratios, flip)
    f32 = torch.float32
    cx = (torch.arange(lw, dtype=f32) + torch.tensor(offset, dtype=f32)) * torch.tensor(sw, dtype=f32)
    cy = (torch.arange(lh, dtype=f32) + torch.tensor(offset, dtype=f32)) * torch.tensor(sh, dtype=f32)
    cx, cy = cx.double().view(1, lw, 1), cy.double().view(lh, 1, 1)
    bw = torch.tensor([s[0] for s in sizes], dtype=torch.float64).view(1, 1, -1)
    bh = torch.tensor([s[1] for s in sizes], dtype=torch.float64).view(1, 1, -1)
    grid = (lh, lw, len(sizes))
    boxes = torch.stack([((cx - bw / 2.0) / iw).expand(grid), ((cy - bh / 2.0) / ih).expand(grid),
                         ((cx + bw / 2.0) / iw).expand(grid), ((cy + bh / 2.0) / ih).expand(grid)],
                        dim=-1).to(feature.dtype).reshape(-1)
    if clip:
        boxes = boxes.clamp(0.0, 1.0)
    var = torch.tensor([_f32(v) for v in variance], dtype=feature.dtype)
    var = var.repeat(boxes.numel() // 4) if var.numel() == 4 else var.expand(boxes.numel())
    return torch.stack([boxes, var]).unsqueeze(0).to(feature.device)


class Normalize(nn.Module):
    """SSD's Normalize layer: L2 normalization times a learned scale (one value, or one per
    channel).  ``eps`` is added inside the square root: ``x / sqrt(sum x^2 + eps)``, the sum
    over the whole sample (``across_spatial``) or over the channels of each position."""

    def __init__(self, channels: int, across_spatial: bool = True, channel_shared: bool = True,
                 eps: float = 1e-10) -> None:
        super().__init__()
        self.across_spatial, self.channel_shared, self.eps = across_spatial, channel_shared, eps
        self.weight = nn.Parameter(torch.ones(() if channel_shared else (channels,)))

    def forward(self, x: Tensor) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        if self.across_spatial:
            norm = torch.sqrt((x3 * x3).sum(dim=(1, 2)) + self.eps)
            y = x3 * (1.0 / norm.double()).to(x.dtype).view(-1, 1, 1)  # the fork: x * (1 / norm)
        else:
            y = x3 / torch.sqrt(self.eps + (x3 * x3).sum(dim=1)).unsqueeze(1)
        scale = self.weight if self.channel_shared else self.weight.view(1, c, 1)
        return (y * scale).reshape(x.shape)


CODE_TYPES = {"CORNER": 1, "CENTER_SIZE": 2, "CORNER_SIZE": 3}


def decode_boxes(priors: Tensor, variances: Tensor, loc: Tensor, code_type: str) -> Tensor:
    """SSD's ``DecodeBBox``: predictions ``loc`` (..., P, 4) relative to ``priors`` (P, 4)
    -> normalized boxes (..., P, 4), never clipped.  CENTER_SIZE: centre moved by
    ``v * l * prior size``, size ``exp(v * l) * prior size`` (exp in double, as C's ``exp``);
    CORNER: ``prior + v * l``; CORNER_SIZE: ``prior + v * l * prior size``."""
    px0, py0, px1, py1 = priors.unbind(-1)
    v0, v1, v2, v3 = variances.unbind(-1)
    l0, l1, l2, l3 = loc.unbind(-1)
    if code_type == "CORNER":
        return torch.stack([px0 + v0 * l0, py0 + v1 * l1, px1 + v2 * l2, py1 + v3 * l3], -1)
    pw, ph = px1 - px0, py1 - py0
    if not bool((pw > 0).all() and (ph > 0).all()):
        raise ValueError("prior width and height must be > 0 (the SSD fork CHECKs this)")
    if code_type == "CORNER_SIZE":
        return torch.stack([px0 + v0 * l0 * pw, py0 + v1 * l1 * ph,
                            px1 + v2 * l2 * pw, py1 + v3 * l3 * ph], -1)
    pcx, pcy = (px0 + px1) * 0.5, (py0 + py1) * 0.5
    cx, cy = v0 * l0 * pw + pcx, v1 * l1 * ph + pcy
    w = (torch.exp((v2 * l2).double()) * pw.double()).to(loc.dtype)
    h = (torch.exp((v3 * l3).double()) * ph.double()).to(loc.dtype)
    return torch.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], -1)


def jaccard(a: Tensor, b: Tensor) -> Tensor:
    """IoU of normalized boxes ``a`` (N, 4) and ``b`` (M, 4) -> (N, M): no +1 widths, 0 when
    the boxes do not overlap (or only touch), an inverted box has size 0."""
    def size(t: Tensor) -> Tensor:
        w, h = t[:, 2] - t[:, 0], t[:, 3] - t[:, 1]
        return torch.where((t[:, 2] < t[:, 0]) | (t[:, 3] < t[:, 1]), torch.zeros_like(w), w * h)

    iw = torch.minimum(a[:, None, 2], b[None, :, 2]) - torch.maximum(a[:, None, 0], b[None, :, 0])
    ih = torch.minimum(a[:, None, 3], b[None, :, 3]) - torch.maximum(a[:, None, 1], b[None, :, 1])
    hit = (iw > 0) & (ih > 0)
    inter = torch.where(hit, iw * ih, torch.zeros_like(iw))
    union = (size(a)[:, None] + size(b)[None, :]) - inter
    return torch.where(hit, inter / torch.where(hit, union, torch.ones_like(union)), torch.zeros_like(inter))


def nms_fast(boxes: Tensor, scores: Tensor, score_threshold: float, nms_threshold: float,
             eta: float = 1.0, top_k: int = -1) -> List[int]:
    """SSD's ``ApplyNMSFast``: indices kept, best first.  Candidates score
    ``> score_threshold``, sorted by score descending with ties in index order
    (``std::stable_sort``), the first ``top_k`` when ``top_k > -1``; one is kept when its IoU
    with every kept box is ``<= threshold``; after each kept box the threshold shrinks by
    ``eta`` while ``eta < 1`` and it is above 0.5 (float32 throughout, as the fork)."""
    idx = torch.nonzero(scores > score_threshold).flatten()
    idx = idx[torch.sort(scores[idx], descending=True, stable=True).indices]
    if top_k > -1:
        idx = idx[:top_k]
    iou = jaccard(boxes[idx], boxes[idx]).tolist()
    thr = _f32(nms_threshold)
    kept: List[int] = []
    for i in range(idx.numel()):
        if all(iou[i][j] <= thr for j in kept):  # NaN overlaps reject
            kept.append(i)
            if eta < 1 and thr > 0.5:
                thr = _f32(thr * eta)
    return [int(idx[i]) for i in kept]


def gnu_sort(a: list, less) -> None:
    """``std::sort(a.begin(), a.end(), less)`` step for step as libstdc++ runs it (introsort:
    median-of-three pivot, unguarded partition, heapsort past the depth limit, insertion sort
    of the last runs of 16).  SSD cuts its detections to ``keep_top_k`` with ``std::sort``,
    which is not stable: which of several equal scores survive the cut, and their order, is
    this algorithm's."""
    n = len(a)
    if n < 2:
        return

    def median_to_first(result: int, x: int, y: int, z: int) -> None:
        if less(a[x], a[y]):
            m = y if less(a[y], a[z]) else (z if less(a[x], a[z]) else x)
        else:
            m = x if less(a[x], a[z]) else (z if less(a[y], a[z]) else y)
        a[result], a[m] = a[m], a[result]

    def partition(first: int, last: int, pivot: int) -> int:
        while True:
            while less(a[first], a[pivot]):
                first += 1
            last -= 1
            while less(a[pivot], a[last]):
                last -= 1
            if not first < last:
                return first
            a[first], a[last] = a[last], a[first]
            first += 1

    def adjust_heap(first: int, hole: int, length: int, value) -> None:
        top = child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if less(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if length % 2 == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and less(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole, parent = parent, (parent - 1) // 2
        a[first + hole] = value

    def heap_sort(first: int, last: int) -> None:
        length = last - first
        for parent in range((length - 2) // 2, -1, -1):  # make_heap
            adjust_heap(first, parent, length, a[first + parent])
        while last - first > 1:  # sort_heap
            last -= 1
            value, a[last] = a[last], a[first]
            adjust_heap(first, 0, last - first, value)

    def introsort(first: int, last: int, depth: int) -> None:
        while last - first > 16:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            median_to_first(first, first + 1, first + (last - first) // 2, last - 1)
            cut = partition(first + 1, last, first)
            introsort(cut, last, depth)
            last = cut

    def linear_insert(i: int) -> None:
        val, j = a[i], i - 1
        while less(val, a[j]):
            a[i], i, j = a[j], j, j - 1
        a[i] = val

    introsort(0, n, 2 * (n.bit_length() - 1))
    for i in range(1, min(n, 16)):  # insertion sort of the first run
        if less(a[i], a[0]):
            a[:i + 1] = [a[i]] + a[:i]
        else:
            linear_insert(i)
    for i in range(16, n):  # unguarded for the rest: a smaller element lies before each
        linear_insert(i)


@torch.no_grad()
def detection_output(loc: Tensor, conf: Tensor, priors: Tensor, *, num_classes: int,
                     share_location: bool = True, background_label_id: int = 0,
                     code_type: str = "CORNER", variance_encoded_in_target: bool = False,
                     nms_threshold: float = 0.3, top_k: int = -1, eta: float = 1.0,
                     keep_top_k: int = -1, confidence_threshold: float = -FLT_MAX) -> Tensor:
    """SSD's DetectionOutput layer: (1, 1, R, 7) rows ``[image, label, score, xmin, ymin,
    xmax, ymax]`` (normalized, unclipped boxes).

    ``loc`` (N, P * L * 4) with L = 1 when ``share_location`` else ``num_classes``,
    prior-major; ``conf`` (N, P * num_classes) class probabilities; ``priors`` the PriorBox
    top (1, 2, P * 4).  Per image and class (background skipped): decode, :func:`nms_fast`;
    when more than ``keep_top_k`` (> -1) boxes remain, keep the best ``keep_top_k`` over
    all classes (``std::sort``: :func:`gnu_sort`).  Rows by image, label ascending, score
    order within a label; no detection at all: N rows ``[i, -1, ..., -1]``.
    """
    n = int(loc.shape[0])
    num_priors = int(priors.shape[2]) // 4
    nl = 1 if share_location else num_classes
    f32 = torch.float32
    pri = priors.reshape(-1).to(f32)
    boxes = pri[:num_priors * 4].view(num_priors, 4)
    var = (torch.ones_like(boxes) if variance_encoded_in_target
           else pri[num_priors * 4:num_priors * 8].view(num_priors, 4))
    locs = loc.reshape(n, num_priors, nl, 4).to(f32).permute(0, 2, 1, 3)
    decoded = decode_boxes(boxes, var, locs, code_type)                     # (N, L, P, 4)
    scores = conf.reshape(n, num_priors, num_classes).to(f32)              # (N, P, C)
    rows: List[Tuple[int, int, int]] = []                                   # image, label, prior
    for i in range(n):
        kept = {c: nms_fast(decoded[i, 0 if share_location else c], scores[i, :, c],
                            confidence_threshold, nms_threshold, eta, top_k)
                for c in range(num_classes) if c != background_label_id}
        if keep_top_k > -1 and sum(map(len, kept.values())) > keep_top_k:
            s = scores[i].tolist()
            pairs = [(s[p][c], c, p) for c in sorted(kept) for p in kept[c]]
            gnu_sort(pairs, lambda x, y: x[0] > y[0])
            kept = {}
            for _, c, p in pairs[:keep_top_k]:
                kept.setdefault(c, []).append(p)
        rows += [(i, c, p) for c in sorted(kept) for p in kept[c]]
    if not rows:
        out = torch.full((1, 1, n, 7), -1.0, dtype=loc.dtype, device=loc.device)
        out[0, 0, :, 0] = torch.arange(n, dtype=loc.dtype, device=loc.device)
        return out
    img, lab, idx = torch.tensor(rows, dtype=torch.int64, device=loc.device).unbind(1)
    box = decoded[img, 0 if share_location else lab, idx]
    out = torch.cat([img[:, None].to(f32), lab[:, None].to(f32), scores[img, idx, lab][:, None], box], 1)
    return out.to(loc.dtype).view(1, 1, -1, 7)


# ---------------------------------------------------------------------------- the forks' layers
def shuffle_channel(x: Tensor, group: int) -> Tensor:
    """ShuffleNet's ShuffleChannel: the channels, read as a (group, C / group) grid, are
    transposed: output channel ``j * group + g`` is input channel ``g * (C / group) + j``."""
    n, c = x.shape[0], x.shape[1]
    return x.reshape(n, group, c // group, *x.shape[2:]).transpose(1, 2).reshape(x.shape)


def unpool(x: Tensor, mask: Tensor, size: Tuple[int, int]) -> Tensor:
    """SegNet/ENet's Upsample with a mask: each value of ``x`` (N, C, H, W) written to the
    flat position ``mask`` (float, from a MAX Pooling's second top) of its (N, C, *size)
    output plane; other positions are 0.  Where two values share a position the later one
    (row-major) stays, as the fork's loop leaves it."""
    n, c, h, w = x.shape
    oh, ow = int(size[0]), int(size[1])
    idx = mask.reshape(n * c, h * w).to(torch.int64)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= oh * ow):
        raise ValueError(f"unpooling mask index out of range for a {oh} x {ow} output")
    # per output position, the last input position that targets it (-1: none)
    source = torch.arange(h * w, device=x.device).expand(n * c, h * w)
    winner = torch.full((n * c, oh * ow), -1, dtype=torch.int64, device=x.device)
    winner.scatter_reduce_(1, idx, source, reduce="amax")
    values = x.reshape(n * c, h * w).gather(1, winner.clamp_min(0))
    return torch.where(winner >= 0, values, torch.zeros_like(values)).reshape(n, c, oh, ow)


def _c_round(v: Tensor) -> Tensor:
    """C's ``round``: half away from zero (exact: no ``x + 0.5`` rounding)."""
    t = torch.trunc(v)
    return t + torch.where((v - t).abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def psroi_pool(features: Tensor, rois: Tensor, output_dim: int, group_size: int,
               spatial_scale: float) -> Tensor:
    """R-FCN's PSROIPooling: (R, output_dim, G, G), G = ``group_size``.

    ROI rows ``[batch, x1, y1, x2, y2]``; corners rounded half away from zero, then scaled,
    the end one past the last pixel (``(round(x2) + 1) * scale``); ROI size at least 0.1;
    bin ``i`` covers ``[floor(i * bin + start), ceil((i + 1) * bin + start))`` clipped to
    the map (float32, with the CUDA kernel's fused multiply-add: one rounding).  Output
    ``(d, i, j)`` is the mean of feature channel ``(d * G + i) * G + j`` over bin (i, j),
    0 for an empty bin.
    """
    n, c, height, width = features.shape
    g = group_size
    f32 = torch.float32
    r = rois.reshape(-1, 5).to(f32)
    scale = torch.tensor(spatial_scale, dtype=f32)
    start_w, start_h = _c_round(r[:, 1]) * scale, _c_round(r[:, 2]) * scale
    end_w, end_h = (_c_round(r[:, 3]) + 1.0) * scale, (_c_round(r[:, 4]) + 1.0) * scale

    def edges(start: Tensor, end: Tensor, limit: int) -> Tuple[List[List[int]], List[List[int]]]:
        size = end - start
        size = torch.where(size.double() < 0.1, torch.full_like(size, 0.1), size)
        bin_ = (size / g).double()[:, None]
        p = torch.arange(g, dtype=torch.float64)[None, :]
        lo = torch.floor((p * bin_ + start.double()[:, None]).float())  # one rounding, as an FMA
        hi = torch.ceil(((p + 1) * bin_ + start.double()[:, None]).float())
        return lo.clamp(0, limit).long().tolist(), hi.clamp(0, limit).long().tolist()

    hs, he = edges(start_h, end_h, height)
    ws, we = edges(start_w, end_w, width)
    out = features.new_zeros((r.shape[0], output_dim, g, g))
    for k, b in enumerate(r[:, 0].long().tolist()):
        for i in range(g):
            for j in range(g):
                if he[k][i] > hs[k][i] and we[k][j] > ws[k][j]:
                    cells = features[b, i * g + j::g * g, hs[k][i]:he[k][i], ws[k][j]:we[k][j]]
                    out[k, :, i, j] = cells.double().mean(dim=(1, 2)).to(features.dtype)
    return out


def reorg(x: Tensor, stride: int, reverse: bool = False) -> Tensor:
    """YOLOv2's Reorg (darknet's ``reorg``): (N, C, H, W) -> (N, C s^2, H / s, W / s) with
    the input's memory read as (N, C / s^2, H s, W s) -- darknet's index map, not
    ``F.pixel_unshuffle``'s; ``reverse`` goes back (N, C / s^2, H s, W s)."""
    n, c, h, w = x.shape
    s = stride
    cs = c // (s * s)
    if reverse:
        return x.reshape(n, s, s, cs, h, w).permute(0, 3, 4, 1, 5, 2).reshape(n, cs, h * s, w * s)
    v = x.reshape(n, cs, h, s, w, s).permute(0, 3, 5, 1, 2, 4)
    return v.reshape(n, c * s * s, h // s, w // s)


def region(x: Tensor, num: int, coords: int, classes: int) -> Tensor:
    """YOLOv2's Region layer at deploy: per anchor, logistic on x, y and the objectness,
    softmax across the classes of each cell, other coordinates unchanged."""
    n, c, h, w = x.shape
    v = x.reshape(n, num, coords + 1 + classes, h, w)
    parts = [torch.sigmoid(v[:, :, 0:2]), v[:, :, 2:coords], torch.sigmoid(v[:, :, coords:coords + 1])]
    if classes:
        parts.append(torch.softmax(v[:, :, coords + 1:], dim=2))
    return torch.cat(parts, dim=2).reshape(n, c, h, w)


# ---------------------------------------------------------------------------- other BVLC layers
class Bias(nn.Module):
    """Caffe's Bias layer with a learned bias: ``x + bias``, the bias's dims lined up with
    ``x``'s dims from ``axis`` on."""

    def __init__(self, shape: Sequence[int], axis: int = 1) -> None:
        super().__init__()
        self.axis = axis
        self.bias = nn.Parameter(torch.zeros(tuple(shape)))

    def forward(self, x: Tensor) -> Tensor:
        b = self.bias
        return x + (b if b.dim() == 0 else b.reshape(tuple(b.shape) + (1,) * (x.dim() - self.axis - b.dim())))


class Embed(nn.Module):
    """Caffe's Embed layer: each input value (an integer stored as a float, truncated)
    selects a row of ``weight`` (input_dim, num_output), plus ``bias``."""

    def __init__(self, input_dim: int, num_output: int, bias: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(input_dim, num_output))
        self.bias = nn.Parameter(torch.zeros(num_output)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        idx = x.to(torch.long)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.weight.shape[0]):
            raise ValueError(f"embedding index out of range [0, {self.weight.shape[0]})")
        y = F.embedding(idx, self.weight)
        return y if self.bias is None else y + self.bias


def mvn(x: Tensor, normalize_variance: bool = True, across_channels: bool = False,
        eps: float = 1e-9) -> Tensor:
    """Caffe's MVN: each (item, channel) -- or each item, ``across_channels`` -- to zero
    mean and, with ``normalize_variance``, unit deviation: ``(x - mean) / (std + eps)`` (eps
    added to the deviation, not the variance).  The top is 4-D, as Caffe's legacy shape."""
    shape4 = tuple(x.shape) + (1,) * (4 - x.dim())
    rows = x.reshape(shape4[0] if across_channels else shape4[0] * shape4[1], -1)
    y = rows - rows.mean(dim=1, keepdim=True)
    if normalize_variance:
        y = y / ((y * y).mean(dim=1, keepdim=True).sqrt() + eps)
    return y.reshape(shape4)


def argmax(x: Tensor, top_k: int = 1, out_max_val: bool = False, axis: int | None = None) -> Tensor:
    """Caffe's ArgMax: indices (as floats) or values of the ``top_k`` largest entries; among
    equal values the larger index first (Caffe sorts (value, index) pairs descending).
    Without ``axis``: per item over everything after dim 0, top (N, 1 or 2, top_k, 1...)
    (with ``out_max_val`` the indices, then the values); with ``axis``: that dim becomes
    ``top_k`` and the top holds the values if ``out_max_val`` else the indices."""
    dim = 1 if axis is None else axis
    v = x.reshape(x.shape[0], -1) if axis is None else x
    n = v.shape[dim]
    vals, idx = torch.sort(v.flip(dim), dim=dim, descending=True, stable=True)
    vals, idx = vals.narrow(dim, 0, top_k), (n - 1 - idx.narrow(dim, 0, top_k)).to(x.dtype)
    if axis is not None:
        return vals if out_max_val else idx
    y = torch.stack([idx, vals], dim=1) if out_max_val else idx.unsqueeze(1)
    return y.reshape((x.shape[0], y.shape[1], top_k) + (1,) * (x.dim() - 3))
