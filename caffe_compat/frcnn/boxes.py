"""py-faster-rcnn's anchors and box regression in torch, with its ``+1`` pixel convention.

py-faster-rcnn treats box corners as inclusive pixel indices: a box ``(x1, y1, x2, y2)``
is ``x2 - x1 + 1`` pixels wide, and every width, area and regression target below uses
that convention (IoU and NMS with the same convention are generic, in
:mod:`caffe_compat.boxes`).  Trained models depend on it (a regressor trained with ``+1``
widths predicts different boxes under the ``x2 - x1`` convention of torchvision), so
these functions reproduce the original formulas exactly, including its quirks:

* ``bbox_transform_inv`` returns ``x2 = cx + 0.5 * w`` (no ``- 1``), while
  ``bbox_transform`` measures ``w = x2 - x1 + 1``; a zero delta therefore grows a box
  by one pixel to the right and bottom.  That asymmetry is what py-faster-rcnn trained
  and tested with (Detectron later added the ``- 1``).
* anchor sizes are rounded half to even (numpy's ``round``; ``torch.round`` agrees).

Every function is device-agnostic and differentiable where the math is; boxes are
``(N, 4)`` tensors (``bbox_transform_inv``/``clip_boxes`` accept ``(N, 4k)``, several
boxes per row as class-specific regressors produce).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = [
    "generate_anchors", "shifted_anchors", "bbox_transform", "bbox_transform_inv", "clip_boxes",
    "filter_boxes",
]

Number = Union[int, float]


def _whctrs(anchor: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    w = anchor[..., 2] - anchor[..., 0] + 1
    h = anchor[..., 3] - anchor[..., 1] + 1
    return w, h, anchor[..., 0] + 0.5 * (w - 1), anchor[..., 1] + 0.5 * (h - 1)


def _mkanchors(ws: Tensor, hs: Tensor, x_ctr: Tensor, y_ctr: Tensor) -> Tensor:
    return torch.stack([x_ctr - 0.5 * (ws - 1), y_ctr - 0.5 * (hs - 1),
                        x_ctr + 0.5 * (ws - 1), y_ctr + 0.5 * (hs - 1)], dim=-1)


def generate_anchors(base_size: int = 16, ratios: Sequence[Number] = (0.5, 1, 2),
                     scales: Sequence[Number] = (8, 16, 32), *,
                     device: Optional[Union[str, torch.device]] = None,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """The ``len(ratios) * len(scales)`` reference anchors of an RPN, shape ``(A, 4)``.

    Start from the box ``(0, 0, base_size - 1, base_size - 1)``; for each aspect ratio
    ``r = h / w`` keep its area: ``w = round(sqrt(area / r))``, ``h = round(w * r)``
    (rounded half to even), same center; then multiply ``w`` and ``h`` by each scale.
    Rows are ordered ratio-major: all scales of the first ratio, then the next ratio.
    The default gives ``[-84, -40, 99, 55]`` first (the table in py-faster-rcnn's comment,
    ``[-83, -39, 100, 56]``, is the MATLAB code's 1-based output).
    """
    ratios_t = torch.as_tensor([float(r) for r in ratios], dtype=torch.float64)
    scales_t = torch.as_tensor([float(s) for s in scales], dtype=torch.float64)
    base = torch.tensor([0.0, 0.0, base_size - 1.0, base_size - 1.0], dtype=torch.float64)
    w, h, cx, cy = _whctrs(base)
    ws = torch.round(torch.sqrt(w * h / ratios_t))
    hs = torch.round(ws * ratios_t)
    ratio_anchors = _mkanchors(ws, hs, cx.expand_as(ws), cy.expand_as(ws))       # (R, 4)
    rw, rh, rcx, rcy = _whctrs(ratio_anchors)                                    # (R,)
    anchors = _mkanchors(rw[:, None] * scales_t[None], rh[:, None] * scales_t[None],
                         rcx[:, None].expand(-1, len(scales_t)),
                         rcy[:, None].expand(-1, len(scales_t)))                 # (R, S, 4)
    return anchors.reshape(-1, 4).to(device=device, dtype=dtype)


def shifted_anchors(anchors: Tensor, height: int, width: int, feat_stride: Number) -> Tensor:
    """All anchors of a ``height x width`` feature map, shape ``(height * width * A, 4)``.

    Row ``(h * width + w) * A + a`` is reference anchor ``a`` moved by
    ``(w * feat_stride, h * feat_stride)``: the (h, w, a) order in which py-faster-rcnn
    flattens its (1, A, H, W) score and (1, 4A, H, W) delta maps.
    """
    sx = torch.arange(width, device=anchors.device, dtype=anchors.dtype) * feat_stride
    sy = torch.arange(height, device=anchors.device, dtype=anchors.dtype) * feat_stride
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)            # (K, 1, 4)
    return (anchors.reshape(1, -1, 4) + shifts).reshape(-1, 4)


def bbox_transform(ex_rois: Tensor, gt_rois: Tensor) -> Tensor:
    """Regression targets ``(dx, dy, dw, dh)`` taking ``ex_rois`` to ``gt_rois``, ``(N, 4)``.

    ``w = x2 - x1 + 1``, ``cx = x1 + 0.5 * w`` for both; ``dx = (gcx - ecx) / ew``,
    ``dw = log(gw / ew)`` (likewise y, h).  Computed in the promoted dtype of the inputs,
    as numpy would.
    """
    dtype = torch.promote_types(ex_rois.dtype, gt_rois.dtype)
    e = ex_rois[:, :4].to(dtype)
    g = gt_rois[:, :4].to(dtype)
    ew = e[:, 2] - e[:, 0] + 1.0
    eh = e[:, 3] - e[:, 1] + 1.0
    ecx = e[:, 0] + 0.5 * ew
    ecy = e[:, 1] + 0.5 * eh
    gw = g[:, 2] - g[:, 0] + 1.0
    gh = g[:, 3] - g[:, 1] + 1.0
    gcx = g[:, 0] + 0.5 * gw
    gcy = g[:, 1] + 0.5 * gh
    return torch.stack([(gcx - ecx) / ew, (gcy - ecy) / eh,
                        torch.log(gw / ew), torch.log(gh / eh)], dim=1)


def bbox_transform_inv(boxes: Tensor, deltas: Tensor) -> Tensor:
    """Apply ``deltas`` ``(N, 4k)`` to ``boxes`` ``(N, 4)``: predicted boxes ``(N, 4k)``.

    ``w = x2 - x1 + 1``, ``cx = x1 + 0.5 * w``; ``pcx = dx * w + cx``,
    ``pw = exp(dw) * w``; output ``(pcx - 0.5 pw, pcy - 0.5 ph, pcx + 0.5 pw, pcy + 0.5 ph)``
    -- py-faster-rcnn's formula, *without* a ``- 1`` on x2/y2 (see the module docstring).
    Computed in ``deltas``' dtype (the original casts boxes to it).
    """
    if deltas.shape[0] == 0:
        return deltas.new_zeros((0, deltas.shape[1]))
    b = boxes.to(deltas.dtype)
    widths = b[:, 2] - b[:, 0] + 1.0
    heights = b[:, 3] - b[:, 1] + 1.0
    ctr_x = b[:, 0] + 0.5 * widths
    ctr_y = b[:, 1] + 0.5 * heights
    d = deltas.reshape(deltas.shape[0], -1, 4)
    pcx = d[..., 0] * widths[:, None] + ctr_x[:, None]
    pcy = d[..., 1] * heights[:, None] + ctr_y[:, None]
    pw = torch.exp(d[..., 2]) * widths[:, None]
    ph = torch.exp(d[..., 3]) * heights[:, None]
    out = torch.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], dim=-1)
    return out.reshape(deltas.shape)


def clip_boxes(boxes: Tensor, im_shape: Union[Sequence[Number], Tensor]) -> Tensor:
    """Clip ``(N, 4k)`` boxes to ``[0, width - 1] x [0, height - 1]``; ``im_shape = (height, width)``.

    ``im_shape`` may be a tensor (e.g. ``im_info[0, :2]``) on the boxes' device, so no
    host round trip is needed.  Out of place.
    """
    if isinstance(im_shape, Tensor):
        hw = im_shape.to(device=boxes.device, dtype=boxes.dtype)
        h_max, w_max = hw[0] - 1, hw[1] - 1
    else:
        h_max = torch.tensor(float(im_shape[0]) - 1, dtype=boxes.dtype, device=boxes.device)
        w_max = torch.tensor(float(im_shape[1]) - 1, dtype=boxes.dtype, device=boxes.device)
    b = boxes.reshape(boxes.shape[0], boxes.shape[1] // 4, 4)  # -1 fails when N == 0
    zero = torch.zeros((), dtype=boxes.dtype, device=boxes.device)
    xs = torch.maximum(torch.minimum(b[..., 0::2], w_max), zero)
    ys = torch.maximum(torch.minimum(b[..., 1::2], h_max), zero)
    out = torch.stack([xs[..., 0], ys[..., 0], xs[..., 1], ys[..., 1]], dim=-1)
    return out.reshape(boxes.shape)


def filter_boxes(boxes: Tensor, min_size: Union[Number, Tensor]) -> Tensor:
    """Boolean mask of boxes whose ``+1`` width and height are both ``>= min_size``."""
    ws = boxes[:, 2] - boxes[:, 0] + 1
    hs = boxes[:, 3] - boxes[:, 1] + 1
    return (ws >= min_size) & (hs >= min_size)
