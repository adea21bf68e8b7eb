"""ROIAlign as the Caffe forks that port Detectron's RoIAlign compute it.

Caffe has no one ROIAlign: the forks' layers of that name disagree (max over four
"normalised" samples in the Mask R-CNN port copied into many forks, one centre sample in
others, a (pooled + 1)-point grid in Cascade R-CNN...).  The one implemented here is
Detectron's (Caffe2's ``RoIAlign``), the semantics of the Mask R-CNN models people convert,
of torchvision's ``roi_align(aligned=False)`` and of the vendor Caffes that run them.  The
parameter block and kernels followed are VitoChien/caffe-fast-rcnn @
3c166de9503e0e7558ecc2d2fe895eef4287028b (``roi_align_layer.cu``: ``ROIAlignForward`` and
``ROIAlignBackward``; ``roi_align_param { pooled_h pooled_w spatial_scale sampling_ratio }``,
field 8266713 of LayerParameter, next to caffe-fast-rcnn's ROIPooling).

Per ROI ``[batch, x1, y1, x2, y2]`` (in the blob's float type):

- ``start = x1 * scale``, ``end = x2 * scale``: no rounding and no half-pixel shift (not
  "aligned"); ``size = max(end - start, 1)``; ``bin = size / pooled``.
- each bin averages ``grid_h x grid_w`` bilinear samples at ``start + p * bin + (i + 0.5) *
  bin / grid``; ``grid = sampling_ratio`` if positive, else ``ceil(size / pooled)`` per ROI.
  ``sampling_ratio`` is a float in the fork's schema, truncated to int as the kernel's
  argument (the fork's layer never copies it from the parameter; we do).
- a sample with ``y < -1`` or ``y > H`` (``x`` likewise) counts as 0; otherwise ``y`` is
  clamped at 0, its rows are ``int(y)`` and ``int(y) + 1`` with weights ``1 - ly``, ``ly``,
  or row ``H - 1`` alone once ``int(y) >= H - 1``.
- backward: every sample adds ``dtop * weight / count`` to its four cells (the kernel's
  atomicAdd): the exact gradient, so autograd gives it; ROIs get no gradient.

Backends: torchvision's ``roi_align`` kernel (the same loops, checked against an independent
numpy transcription of the fork's kernel in the tests) when importable, else pure torch:
the bilinear weights are separable, so each image's bins are two matrix products
``A_y X A_x^T`` with the per-bin sample weights summed into ``A_y``, ``A_x``.  (In that
fallback a NaN or inf in the features spreads through the products to every bin of its
row or column, where the kernel confines it to the samples that touch it.)
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import SchemaError, ShapeError
from caffe_compat.layers.base import Shape
from caffe_compat.layers.fast_rcnn import ROILayer, _check_rois, _torchvision_available
from caffe_compat.layers.registry import register

__all__ = ["ROIAlign", "roi_align"]

#: "auto" (torchvision when importable), "torchvision" or "torch" (the pure-torch path)
ROI_ALIGN_BACKEND = "auto"


def _use_torchvision(backend: Optional[str], dtype: torch.dtype) -> bool:
    backend = backend or ROI_ALIGN_BACKEND
    if backend not in ("auto", "torchvision", "torch"):
        raise ValueError(f"unknown ROIAlign backend {backend!r}; allowed: auto, torchvision, torch")
    if backend == "torch":
        return False
    ok = _torchvision_available() and hasattr(torch.ops.torchvision, "roi_align")
    if backend == "torchvision":
        if not ok:
            raise RuntimeError("ROIAlign backend 'torchvision' requested but torchvision "
                               "(with its compiled ops) is not importable")
        return True
    return ok and dtype in (torch.float32, torch.float64)


def _blob_scale(spatial_scale: float) -> float:
    """``spatial_scale`` as the fork holds it: a float32 value (the schema's type)."""
    return float(np.float32(spatial_scale))


def _axis_weights(start: Tensor, end: Tensor, pooled: int, limit: int, ratio: int,
                  dt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per ROI: summed bilinear sample weights ``(R, pooled, limit)`` and the grid ``(R,)``.

    ``start``/``end`` are the scaled ROI edges on this axis (dtype ``dt``); ``limit`` is the
    map's size on it.  Entry ``[r, p, k]`` is the total weight the samples of bin ``p`` put
    on row (or column) ``k``; out-of-range samples put none.
    """
    r = start.shape[0]
    size = torch.clamp(end - start, min=1.0)
    pooled_t = torch.tensor(float(pooled), dtype=dt, device=start.device)
    bin_ = size / pooled_t
    if ratio > 0:
        grid = torch.full((r,), ratio, dtype=torch.int64, device=start.device)
    else:
        grid = torch.ceil(size / pooled_t).to(torch.int64)
    gmax = max(int(grid.max()) if r else 1, 1)
    p = torch.arange(pooled, dtype=dt, device=start.device).view(1, pooled, 1)
    i = torch.arange(gmax, device=start.device).view(1, 1, gmax)
    g = grid.view(r, 1, 1)
    b = bin_.view(r, 1, 1)
    # the kernel's order: (start + p * bin) + ((i + 0.5) * bin) / grid
    pos = (start.view(r, 1, 1) + p * b) + ((i.to(dt) + 0.5) * b) / g.to(dt)
    use = (i < g) & (pos >= -1.0) & (pos <= float(limit))
    pos = torch.clamp(pos, 0.0, float(limit))  # used samples already lie in [-1, limit]
    low = torch.floor(pos).to(torch.int64)
    top = low >= limit - 1
    low = torch.where(top, torch.full_like(low, limit - 1), low)
    high = torch.where(top, low, low + 1)
    frac = torch.where(top, torch.zeros_like(pos), pos - low.to(dt))
    keep = use.to(dt)
    weights = torch.zeros((r, pooled, limit), dtype=dt, device=start.device)
    weights.scatter_add_(2, low, (1.0 - frac) * keep)
    weights.scatter_add_(2, high, frac * keep)
    return weights, grid


def _roi_align_torch(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int,
                     spatial_scale: float, ratio: int) -> Tensor:
    """Pure-torch Detectron RoIAlign: ``A_y X A_x^T / count`` per ROI (differentiable in x)."""
    n, c, h, w = x.shape
    r = rois.shape[0]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    if r == 0:
        return x.new_zeros((0, c, pooled_h, pooled_w))
    ro = rois.detach().to(dt)
    scale = torch.tensor(_blob_scale(spatial_scale), dtype=dt, device=x.device)
    batch = ro[:, 0].to(torch.int64)
    x1, y1, x2, y2 = (ro[:, k] * scale for k in (1, 2, 3, 4))
    ay, grid_h = _axis_weights(y1, y2, pooled_h, h, ratio, dt)   # (R, PH, H)
    ax, grid_w = _axis_weights(x1, x2, pooled_w, w, ratio, dt)   # (R, PW, W)
    count = (grid_h * grid_w).to(dt).view(r, 1, 1, 1)
    ay, ax = ay.to(x.dtype), ax.to(x.dtype)
    out = x.new_zeros((r, c, pooled_h, pooled_w))
    for b in range(n):  # each image's ROIs; other ROIs get zero weights (no host sync)
        mine = (batch == b).to(x.dtype).view(r, 1, 1)
        cols = torch.matmul(x[b].reshape(c * h, w), (ax * mine).reshape(r * pooled_w, w).t())
        cols = cols.view(c, h, r, pooled_w)
        out = out + torch.einsum("rph,chrq->rcpq", ay, cols)
    return out / count.to(x.dtype)


def roi_align(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float = 1.0,
              sampling_ratio: int = 0, *, backend: Optional[str] = None) -> Tensor:
    """Detectron's RoIAlign (not aligned) as the Caffe ROIAlign ports; differentiable in ``x``.

    ``x`` (N, C, H, W); ``rois`` (R, 5) ``[batch, x1, y1, x2, y2]`` in image coordinates
    (``spatial_scale`` maps them onto ``x``); ``sampling_ratio <= 0`` samples
    ``ceil(roi size / pooled)`` points per bin and axis.  Returns (R, C, pooled_h, pooled_w).
    """
    rois = rois.to(x.dtype)
    _check_rois(rois, x.shape[0])
    ratio = int(sampling_ratio)
    if _use_torchvision(backend, x.dtype):
        return torch.ops.torchvision.roi_align(x, rois, _blob_scale(spatial_scale),
                                               int(pooled_h), int(pooled_w), ratio, False)
    return _roi_align_torch(x, rois, int(pooled_h), int(pooled_w), spatial_scale, ratio)


@register("ROIAlign")
class ROIAlign(ROILayer):
    """``ROIAlign`` with ``roi_align_param { pooled_h pooled_w spatial_scale sampling_ratio }``.

    Bottoms: features (N, C, H, W) and ROIs (R, 5) (any (R, ...) blob of 5 values per
    row).  Top (R, C, pooled_h, pooled_w).  See the module docstring for the semantics.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.roi_align_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(SchemaError, f"roi_align_param.pooled_h and pooled_w must be > 0, "
                                          f"got {p.pooled_h} x {p.pooled_w}")
        ratio = float(p.sampling_ratio)
        if not math.isfinite(ratio):
            raise self.error(SchemaError, f"roi_align_param.sampling_ratio must be finite, "
                                          f"got {ratio}")
        self.pooled_h = int(p.pooled_h)
        self.pooled_w = int(p.pooled_w)
        self.spatial_scale = float(p.spatial_scale)
        self.sampling_ratio = int(math.trunc(ratio))  # float in the schema, int in the kernel
        self._check(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))

    def _check_features(self, feat: Shape) -> None:
        if feat[2] <= 0 or feat[3] <= 0:
            raise self.error(ShapeError, f"bottom[0] (features) has an empty map: {feat}")

    def _top_shape(self, feat: Shape, rois: Shape) -> Shape:
        return (int(rois[0]), int(feat[1]), self.pooled_h, self.pooled_w)

    def forward(self, x: Tensor, rois: Tensor) -> Tuple[Tensor]:
        rois2 = self._rois(x, rois)
        return (roi_align(x, rois2, self.pooled_h, self.pooled_w, self.spatial_scale,
                          self.sampling_ratio),)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, pooled=({self.pooled_h}, {self.pooled_w}), "
                f"spatial_scale={self.spatial_scale:g}, sampling_ratio={self.sampling_ratio}")
