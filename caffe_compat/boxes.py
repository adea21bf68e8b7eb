"""Pixel boxes with inclusive corners: IoU and non-maximum suppression, ``+1`` widths.

Caffe-era detectors (Fast/Faster R-CNN, R-FCN, CTPN and the tools built on them) treat a
box ``(x1, y1, x2, y2)`` as inclusive pixel indices: it is ``x2 - x1 + 1`` pixels wide,
and its area, overlaps and the suppression that trained models were tuned with all use
that width.  torchvision's ``box_iou``/``nms`` measure ``x2 - x1`` instead, so these two
functions keep the legacy convention (SSD's normalized boxes have their own, in
:mod:`caffe_compat.layers.ssd_boxes`).  py-faster-rcnn's anchor and regression transforms
are in :mod:`caffe_compat.frcnn.boxes`.

Both functions are device-agnostic; boxes are ``(N, 4)`` tensors (extra columns, e.g. a
ground-truth label, are ignored).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["bbox_overlaps", "nms"]


def bbox_overlaps(boxes: Tensor, query_boxes: Tensor) -> Tensor:
    """IoU of every box with every query box, ``(N, K)``, with ``+1`` widths.

    ``iw = min(x2) - max(x1) + 1``, likewise ``ih``; pairs with ``iw <= 0`` or ``ih <= 0``
    have overlap 0; else ``iw * ih / (area_n + area_k - iw * ih)``.  Only the first four
    columns are read (ground-truth boxes may carry a label in column 4).  Computed in the
    inputs' dtype (py-faster-rcnn used float64; pass float64 to reproduce its ties).
    """
    b = boxes[:, :4]
    q = query_boxes[:, :4].to(b.dtype)
    area_b = (b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1)
    area_q = (q[:, 2] - q[:, 0] + 1) * (q[:, 3] - q[:, 1] + 1)
    iw = torch.minimum(b[:, None, 2], q[None, :, 2]) - torch.maximum(b[:, None, 0], q[None, :, 0]) + 1
    ih = torch.minimum(b[:, None, 3], q[None, :, 3]) - torch.maximum(b[:, None, 1], q[None, :, 1]) + 1
    valid = (iw > 0) & (ih > 0)
    inter = iw * ih
    union = area_b[:, None] + area_q[None, :] - inter
    # where() keeps 0/0 of invalid pairs out of the result (and out of gradients)
    safe_union = torch.where(valid, union, torch.ones_like(union))
    return torch.where(valid, inter / safe_union, torch.zeros_like(inter))


def nms(boxes: Tensor, scores: Tensor, thresh: float) -> Tensor:
    """Greedy non-maximum suppression with ``+1`` areas: indices kept, best first.

    Visits boxes by decreasing score (equal scores: lower index first, so the result is
    deterministic) and drops every later box whose IoU with a kept box is ``> thresh``
    -- py-faster-rcnn's GPU kernel and ``py_cpu_nms`` (its default, ``USE_GPU_NMS``).
    Runs ``torchvision.ops.nms`` on ``x2 + 1, y2 + 1``, which gives the same widths,
    areas and intersections, on the boxes' device.
    """
    import torchvision

    n = boxes.shape[0]
    if n == 0:
        return torch.zeros((0,), dtype=torch.long, device=boxes.device)
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices
    b = boxes[order, :4]
    b = torch.cat([b[:, :2], b[:, 2:4] + 1], dim=1)
    # distinct rank scores: torchvision's own sort is not stable, ties would be arbitrary
    rank = torch.arange(n, 0, -1, device=boxes.device, dtype=b.dtype)
    keep = torchvision.ops.nms(b, rank, float(thresh))
    return order[keep]
