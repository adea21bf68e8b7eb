"""R-FCN's position-sensitive ROI pooling (``PSROIPooling``).

Follows daijifeng001/caffe-rfcn @ 543f8f6a4b7c88256ea1445ae951a12d1ad9cffd
(``src/caffe/layers/psroi_pooling_layer.cu``; the fork has no CPU code, py-R-FCN pins it).
``psroi_pooling_param { spatial_scale output_dim group_size }`` (all three required); the
top is ``(R, output_dim, group_size, group_size)`` and the features must have
``output_dim * group_size^2`` channels.

Per ROI ``[batch, x1, y1, x2, y2]`` and output ``(d, i, j)`` (in the blob's float type):

- ``batch`` truncated to int; corners rounded half away from zero (C ``round``) *before*
  scaling, the end corner plus one: ``start = round(x1) * scale``, ``end = (round(x2) + 1)
  * scale``; the ROI size ``end - start`` is at least 0.1 (unlike ROIPooling, a float);
  ``bin = size / group_size``.
- bin ``i`` covers rows ``[floor(i * bin + start), ceil((i + 1) * bin + start))`` clipped to
  ``[0, H]``, columns likewise.  The CUDA kernel's ``i * bin + start`` is compiled (nvcc's
  default ``--fmad=true``) into one fused multiply-add, rounded once; ``_fused_edge``
  reproduces that for float blobs, which matters only when the product lands within an ulp
  of an integer (never with power-of-two scales such as 1/16).
- the value is the mean of input channel ``(d * group_size + i) * group_size + j`` over the
  bin, 0 for an empty bin.
- backward: each output's gradient divided by its bin area is added to every cell of its
  bin (the kernel's atomicAdd); empty bins give nothing, ROIs get no gradient.

Vectorised with summed-area tables in float64 (float32 on MPS): every bin sum is four
look-ups, and the backward scatters into a difference table that two cumulative sums turn
into the per-cell gradient.  Non-finite inputs are counted separately, so a NaN or inf
reaches exactly the bins that contain it (as the kernel's loop would), not every bin below
and right of it.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from caffe_compat.errors import SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.fast_rcnn import ROILayer, _c_round, _check_rois
from caffe_compat.layers.registry import register

__all__ = ["PSROIPooling", "psroi_pooling", "psroi_bins"]


def _arith_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernel's ``Dtype``: the blob's float type (float for anything narrower)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _acc_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _fused_edge(p: Tensor, size: Tensor, start: Tensor, dt: torch.dtype) -> Tensor:
    """``p * size + start`` rounded once to ``dt`` (CUDA's fused multiply-add).

    For float32 the product and sum are exact in float64 (a small integer times a 24-bit
    float, plus a float of similar magnitude), so one rounding to float32 is the FMA's.
    float64 blobs are computed unfused (no wider type to round from).
    """
    if dt == torch.float32 and p.device.type != "mps":
        return (p.double() * size.double() + start.double()).float()
    return p * size + start


def psroi_bins(rois: Tensor, spatial_scale: float, group_size: int, height: int, width: int,
               dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch index ``(R,)`` and clipped bin edges ``hs, he, ws, we`` ``(R, group_size)`` (int64).

    ``rois`` (R, 5) ``[batch, x1, y1, x2, y2]`` in image pixels; ``dtype`` is the feature
    blob's (the kernel's arithmetic type).
    """
    dt = _arith_dtype(dtype)
    r = rois.detach().to(dt)
    scale = torch.tensor(spatial_scale, dtype=dt, device=r.device)
    batch = r[:, 0].to(torch.int64)  # static_cast<int>: toward zero
    start_w = _c_round(r[:, 1]) * scale
    start_h = _c_round(r[:, 2]) * scale
    # ``round(x2) + 1.`` is a double sum, cast back to Dtype before the scaling
    end_w = (_c_round(r[:, 3]).double() + 1.0).to(dt) * scale
    end_h = (_c_round(r[:, 4]).double() + 1.0).to(dt) * scale
    tenth = torch.tensor(0.1, dtype=dt, device=r.device)

    def size(end: Tensor, start: Tensor) -> Tensor:
        s = end - start
        return torch.where(s.double() < 0.1, tenth, s)  # max(s, 0.1) compared in double

    g = torch.tensor(float(group_size), dtype=dt, device=r.device)
    bin_w = (size(end_w, start_w) / g).unsqueeze(1)
    bin_h = (size(end_h, start_h) / g).unsqueeze(1)
    p = torch.arange(group_size, dtype=dt, device=r.device).unsqueeze(0)

    def edges(bin_: Tensor, start: Tensor, limit: int) -> Tuple[Tensor, Tensor]:
        s = start.unsqueeze(1)
        lo = torch.floor(_fused_edge(p, bin_, s, dt))
        hi = torch.ceil(_fused_edge(p + 1, bin_, s, dt))
        # clip in float first: huge corners must not overflow the int conversion
        return (lo.clamp(0, limit).to(torch.int64), hi.clamp(0, limit).to(torch.int64))

    hs, he = edges(bin_h, start_h, height)
    ws, we = edges(bin_w, start_w, width)
    return batch, hs, he, ws, we


def _box_sums(table: Tensor, batch: Tensor, hs: Tensor, he: Tensor, ws: Tensor, we: Tensor,
              channels: int, output_dim: int, group_size: int) -> Tensor:
    """Bin sums ``(R, D, G, G)`` from a summed-area ``table`` (..., N, C, H + 1, W + 1)."""
    lead = table.shape[:-4]
    n, c, h1, w1 = table.shape[-4:]
    r, g = batch.shape[0], group_size
    chan = torch.arange(output_dim * g * g, device=table.device).view(1, output_dim, g, g)
    base = (batch.view(r, 1, 1, 1) * channels + chan) * (h1 * w1)
    flat = table.reshape(lead + (-1,))
    hs_, he_ = hs.view(r, 1, g, 1) * w1, he.view(r, 1, g, 1) * w1
    ws_, we_ = ws.view(r, 1, 1, g), we.view(r, 1, 1, g)

    def at(hh: Tensor, ww: Tensor) -> Tensor:
        idx = (base + hh + ww).reshape(-1)
        return flat.index_select(-1, idx).reshape(lead + (r, output_dim, g, g))

    return at(he_, we_) - at(hs_, we_) - at(he_, ws_) + at(hs_, ws_)


def _summed_area(t: Tensor) -> Tensor:
    """Zero-led 2-D prefix sums over the last two axes: ``(..., H + 1, W + 1)``."""
    return F.pad(t.cumsum(-2).cumsum(-1), (1, 0, 1, 0))


def _psroi_forward(x: Tensor, rois: Tensor, spatial_scale: float, output_dim: int,
                   group_size: int) -> Tensor:
    n, c, h, w = x.shape
    r, g = rois.shape[0], group_size
    if r == 0:
        return x.new_zeros((0, output_dim, g, g))
    batch, hs, he, ws, we = psroi_bins(rois, spatial_scale, g, h, w, x.dtype)
    acc = _acc_dtype(x.device)
    xv = x.detach().to(acc)
    finite = torch.isfinite(xv)
    sums = _box_sums(_summed_area(torch.where(finite, xv, torch.zeros_like(xv))),
                     batch, hs, he, ws, we, c, output_dim, g)
    # how many NaN / +inf / -inf cells each bin holds: the kernel's float sum is NaN, +inf
    # or -inf exactly when its bin holds them
    bad = torch.stack((torch.isnan(xv), torch.isposinf(xv), torch.isneginf(xv))).to(torch.int32)
    n_nan, n_pos, n_neg = _box_sums(_summed_area(bad), batch, hs, he, ws, we, c, output_dim, g)
    area = ((he - hs).view(r, 1, g, 1) * (we - ws).view(r, 1, 1, g)).to(acc)
    empty = area <= 0
    mean = sums / torch.where(empty, torch.ones_like(area), area)
    inf = torch.tensor(math.inf, dtype=acc, device=x.device)
    mean = torch.where(n_neg > 0, -inf, mean)
    mean = torch.where(n_pos > 0, inf, mean)
    mean = torch.where((n_nan > 0) | ((n_pos > 0) & (n_neg > 0)), inf - inf, mean)
    out = torch.where(empty, torch.zeros_like(mean), mean)
    return out.to(x.dtype)


def _psroi_backward(grad: Tensor, rois: Tensor, x_shape: Tuple[int, ...], x_dtype: torch.dtype,
                    spatial_scale: float, output_dim: int, group_size: int) -> Tensor:
    """The kernel's backward: ``grad / area`` added to every cell of the output's bin."""
    n, c, h, w = x_shape
    r, g = grad.shape[0], group_size
    if r == 0 or grad.numel() == 0:
        return grad.new_zeros(x_shape, dtype=x_dtype)
    batch, hs, he, ws, we = psroi_bins(rois, spatial_scale, g, h, w, x_dtype)
    area = (he - hs).view(r, 1, g, 1) * (we - ws).view(r, 1, 1, g)
    empty = area <= 0
    # top_diff / bin_area in the blob's type, as the kernel divides
    val = torch.where(empty, torch.zeros_like(grad),
                      grad / torch.where(empty, torch.ones_like(area), area).to(grad.dtype))
    acc = _acc_dtype(grad.device)
    val = val.to(acc).reshape(-1)
    h1, w1 = h + 1, w + 1
    chan = torch.arange(output_dim * g * g, device=grad.device).view(1, output_dim, g, g)
    base = (batch.view(r, 1, 1, 1) * c + chan) * (h1 * w1)
    hs_, he_ = hs.view(r, 1, g, 1) * w1, he.view(r, 1, g, 1) * w1
    ws_, we_ = ws.view(r, 1, 1, g), we.view(r, 1, 1, g)
    diff = torch.zeros(n * c * h1 * w1, dtype=acc, device=grad.device)
    for hh, ww, sign in ((hs_, ws_, 1.0), (hs_, we_, -1.0), (he_, ws_, -1.0), (he_, we_, 1.0)):
        diff.index_add_(0, (base + hh + ww).reshape(-1), val, alpha=sign)
    cells = diff.view(n, c, h1, w1).cumsum(2).cumsum(3)[:, :, :h, :w]
    return cells.to(x_dtype)


class _PSROIPool(torch.autograd.Function):
    """Position-sensitive average pooling with the kernel's backward."""

    @staticmethod
    def forward(ctx, x: Tensor, rois: Tensor, spatial_scale: float,  # type: ignore[override]
                output_dim: int, group_size: int) -> Tensor:
        ctx.save_for_backward(rois.detach())
        ctx.meta = (tuple(x.shape), x.dtype, spatial_scale, output_dim, group_size)
        return _psroi_forward(x, rois.detach(), spatial_scale, output_dim, group_size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        x_shape, x_dtype, scale, output_dim, group_size = ctx.meta
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _psroi_backward(grad.contiguous(), rois, x_shape, x_dtype, scale,
                                 output_dim, group_size)
        return gx, None, None, None, None


def psroi_pooling(x: Tensor, rois: Tensor, spatial_scale: float, output_dim: int,
                  group_size: int) -> Tensor:
    """R-FCN position-sensitive ROI average pooling; differentiable in ``x`` only.

    ``x`` (N, output_dim * group_size^2, H, W); ``rois`` (R, 5) ``[batch, x1, y1, x2, y2]``
    (inclusive corners in image pixels); returns (R, output_dim, group_size, group_size).
    """
    if x.dim() != 4 or x.shape[1] != output_dim * group_size * group_size:
        raise ShapeError(f"features of shape {tuple(x.shape)} must be (N, output_dim * "
                         f"group_size^2 = {output_dim * group_size * group_size}, H, W)")
    _check_rois(rois, x.shape[0])
    return _PSROIPool.apply(x, rois, float(spatial_scale), int(output_dim), int(group_size))


@register("PSROIPooling")
class PSROIPooling(ROILayer):
    """R-FCN's PSROIPooling layer (see the module docstring for the exact semantics).

    Bottoms: score maps (N, output_dim * group_size^2, H, W) and ROIs (R, 5) (any (R, ...)
    blob of 5 values per row).  Top (R, output_dim, group_size, group_size).  The fork's
    internal ``mapping_channel_`` blob is not kept (it is ``(d * G + i) * G + j``).
    """

    feature_kind = "score maps"

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.psroi_pooling_param
        missing = [f for f in ("spatial_scale", "output_dim", "group_size") if not p.HasField(f)]
        if missing:
            raise self.error(SchemaError, f"psroi_pooling_param is missing required field(s) "
                                          f"{', '.join(missing)}")
        if p.output_dim <= 0 or p.group_size <= 0:
            raise self.error(SchemaError, f"psroi_pooling_param.output_dim and group_size must "
                                          f"be > 0, got {p.output_dim} and {p.group_size}")
        self.spatial_scale = float(p.spatial_scale)
        self.output_dim = int(p.output_dim)
        self.group_size = int(p.group_size)
        self._check(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))

    def _check_features(self, feat: Shape) -> None:
        need = self.output_dim * self.group_size * self.group_size
        if feat[1] != need:
            raise self.error(ShapeError, f"bottom[0] has {feat[1]} channels; output_dim "
                                         f"{self.output_dim} x group_size^2 "
                                         f"{self.group_size ** 2} needs {need}")

    def _top_shape(self, feat: Shape, rois: Shape) -> Shape:
        return (int(rois[0]), self.output_dim, self.group_size, self.group_size)

    def forward(self, x: Tensor, rois: Tensor) -> Tuple[Tensor]:
        rois2 = self._rois(x, rois)
        return (_PSROIPool.apply(x, rois2, self.spatial_scale, self.output_dim,
                                 self.group_size),)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, output_dim={self.output_dim}, "
                f"group_size={self.group_size}, spatial_scale={self.spatial_scale:g}")
