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
  top-N, NMS), all with its ``+1`` pixel widths.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["pool2d", "lrn_within_channel", "Scale", "roi_pool", "proposal", "generate_anchors"]

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
