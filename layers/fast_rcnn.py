"""The Fast R-CNN fork's C++ layers: ROIPooling and SmoothL1Loss.

Both follow rbgirshick/caffe-fast-rcnn (the fork py-faster-rcnn pins), float arithmetic
included, because detection models trained with it depend on its exact bin boundaries.
They stay here, a fork family of ``caffe_compat.layers`` like ``ssd``, and not with
py-faster-rcnn's Python layers in :mod:`caffe_compat.frcnn`: they are C++ layers of a
Caffe fork, registered by type name, that R-FCN (SmoothL1Loss) and other forks' nets use
without any of py-faster-rcnn's Python code.

ROIPooling in brief (all integer maths is C's):

- ROI ``[batch, x1, y1, x2, y2]``: ``batch`` truncated to int; corners scaled by
  ``spatial_scale`` in the blob's dtype, then rounded half *away from zero* (C ``round``;
  ``torch.round`` rounds half to even and would be wrong for e.g. 8 * 1/16 = 0.5).
- ROI size ``max(end - start + 1, 1)`` (reversed or degenerate ROIs become 1 cell).
- bin ``ph`` covers rows ``[floor(ph * b), ceil((ph + 1) * b))`` + start, ``b = size / pooled``
  (float), clipped to ``[0, H]``; an empty bin gives 0 and argmax -1; otherwise the max
  with the first (row-major) strict maximum as argmax (values <= -FLT_MAX and NaN never win).
- backward: each output gradient goes to its argmax, *but only where the fork's backward
  finds it*: the fork walks the input cells inside the rounded ROI and, for each, the bins
  ``[floor(h' / b), ceil((h' + 1) / b))`` that may contain it.  This differs from plain
  argmax routing (torchvision's backward) in two cases: reversed ROIs (end < start) get no
  gradient at all, and when float rounding makes the last bin spill one cell past the
  ROI end (e.g. a 57-cell ROI with ``pooled_h: 7``: ceil(7 * (57/7)) = 58 in float), a max
  found in that spilled cell gets no gradient.  ``_roi_pool_backward`` reproduces this.

The forward uses torchvision's ``roi_pool`` kernel (same loops as the fork, checked
against an independent numpy reference in the tests) and falls back to pure torch when
torchvision is missing.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import SchemaError, ShapeError
from caffe_compat.host_sync import DeferredChecks, check_now_or_later
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register

FLT_MAX = 3.4028234663852886e38

#: "auto" (torchvision when importable), "torchvision" or "torch" (the pure-torch path)
ROI_POOL_BACKEND = "auto"

_TV_OK: Optional[bool] = None


def _torchvision_available() -> bool:
    global _TV_OK
    if _TV_OK is None:
        try:
            import torchvision  # noqa: F401  (registers torch.ops.torchvision)

            _TV_OK = hasattr(torch.ops.torchvision, "roi_pool")
        except Exception:  # pragma: no cover - depends on the install
            _TV_OK = False
    return _TV_OK


def _use_torchvision(backend: Optional[str], dtype: torch.dtype) -> bool:
    backend = backend or ROI_POOL_BACKEND
    if backend not in ("auto", "torchvision", "torch"):
        raise ValueError(f"unknown ROI pooling backend {backend!r}; allowed: auto, torchvision, torch")
    if backend == "torch":
        return False
    if backend == "torchvision":
        if not _torchvision_available():
            raise RuntimeError("ROI pooling backend 'torchvision' requested but torchvision "
                               "(with its compiled ops) is not importable")
        return True
    return dtype in (torch.float32, torch.float64) and _torchvision_available()


# ---------------------------------------------------------------------------- ROI geometry
def _arith_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fork's ``Dtype`` for bin arithmetic: the blob's float type (float for halves)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _c_round(v: Tensor) -> Tensor:
    """C ``round``: half away from zero, exact in any float dtype (no ``x + 0.5`` rounding)."""
    t = torch.trunc(v)
    frac = v - t  # exact for binary floats
    return t + torch.where(frac.abs() >= 0.5, torch.sign(v), torch.zeros_like(v))


def roi_corners(rois: Tensor, spatial_scale: float, dtype: torch.dtype) -> Tuple[Tensor, ...]:
    """Batch index and rounded, scaled ROI corners as int64: ``(b, x1, y1, x2, y2)``."""
    dt = _arith_dtype(dtype)
    r = rois.detach().to(dt)
    b = r[:, 0].to(torch.int64)  # static_cast<int>: truncation toward zero
    scaled = r[:, 1:5] * torch.tensor(spatial_scale, dtype=dt, device=r.device)
    c = _c_round(scaled).to(torch.int64)
    return b, c[:, 0], c[:, 1], c[:, 2], c[:, 3]


def _bin_size(start: Tensor, end: Tensor, pooled: int, dt: torch.dtype) -> Tensor:
    size = torch.clamp(end - start + 1, min=1)
    return size.to(dt) / torch.tensor(float(pooled), dtype=dt, device=size.device)


def _bins(start: Tensor, end: Tensor, pooled: int, limit: int, dt: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Per ROI and bin: ``[lo, hi)`` cell range (clipped to ``[0, limit]``), shape (R, pooled)."""
    b = _bin_size(start, end, pooled, dt).unsqueeze(1)
    p = torch.arange(pooled, device=start.device, dtype=dt).unsqueeze(0)
    lo = torch.floor(p * b).to(torch.int64) + start.unsqueeze(1)
    hi = torch.ceil((p + 1) * b).to(torch.int64) + start.unsqueeze(1)
    return lo.clamp(0, limit), hi.clamp(0, limit)


def _check_rois(rois: Tensor, batch: int, *, layer: str = "",
                checks: Optional[DeferredChecks] = None) -> Tensor:
    """The fork CHECKs ``0 <= batch index < N``; also refuse non-finite ROIs (UB in C).

    Returns ROIs safe to index with: on an accelerator (``checks`` given) the check is
    settled at the end of the net's forward and bad rows are zeroed meanwhile.
    """
    if rois.numel() == 0 or rois.device.type == "meta":
        return rois
    b = rois[:, 0].detach().to(torch.int64)
    bad = (b < 0) | (b >= batch) | ~torch.isfinite(rois.detach()).all(dim=1)

    def fail() -> None:
        i = int(torch.nonzero(bad)[0, 0])
        raise ShapeError(f"ROI {i} = {rois[i].tolist()} is invalid: the batch index must be in "
                         f"[0, {batch}) and coordinates finite", layer=layer)

    check_now_or_later(checks, bad.any(), fail)
    if checks is None or (rois.device.type == "cpu" and not checks.defer_on_cpu):
        return rois
    return torch.where(bad[:, None], torch.zeros_like(rois), rois)


# ---------------------------------------------------------------------------- forward
def _roi_pool_forward_torch(x: Tensor, rois: Tensor, ph_: int, pw_: int,
                            scale: float) -> Tuple[Tensor, Tensor]:
    """Pure-torch ROI max pooling with the fork's bins, ties and argmax (row-major index).

    Separable: a column max over each bin's rows, then a max over the bin's columns,
    picking the smallest ``h * W + w`` among equal maxima (the fork's first strict max).
    """
    n, c, h, w = x.shape
    r = rois.shape[0]
    dt = _arith_dtype(x.dtype)
    out = x.new_zeros((r, c, ph_, pw_))
    arg = torch.full((r, c, ph_, pw_), -1, dtype=torch.int32, device=x.device)
    if r == 0 or c == 0:
        return out, arg
    bi, x1, y1, x2, y2 = roi_corners(rois, scale, x.dtype)
    hs, he = _bins(y1, y2, ph_, h, dt)
    ws, we = _bins(x1, x2, pw_, w, dt)
    neg_inf = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    hh = torch.arange(h, device=x.device)
    ww = torch.arange(w, device=x.device)
    chunk = max(1, (1 << 24) // max(1, c * h * w))
    for r0 in range(0, r, chunk):
        sl = slice(r0, min(r, r0 + chunk))
        feats = x.index_select(0, bi[sl])
        # values the fork's strict '>' against -FLT_MAX can ever pick; NaN compares false
        cand = torch.where(feats > -FLT_MAX, feats, neg_inf)  # (Rc, C, H, W)
        for i in range(ph_):
            mh = (hh >= hs[sl, i:i + 1]) & (hh < he[sl, i:i + 1])  # (Rc, H)
            col = torch.where(mh[:, None, :, None], cand, neg_inf)
            m1 = col.amax(dim=2)  # (Rc, C, W)
            first_h = torch.where(col == m1.unsqueeze(2), hh.view(1, 1, h, 1), h).amin(dim=2)
            lin = first_h * w + ww  # row-major index of each column's first max
            for j in range(pw_):
                mw = (ww >= ws[sl, j:j + 1]) & (ww < we[sl, j:j + 1])  # (Rc, W)
                vals = torch.where(mw[:, None, :], m1, neg_inf)
                m = vals.amax(dim=2)  # (Rc, C)
                best = torch.where(mw[:, None, :] & (vals == m.unsqueeze(2)), lin, h * w).amin(dim=2)
                empty = ((he[sl, i] <= hs[sl, i]) | (we[sl, j] <= ws[sl, j])).unsqueeze(1)
                found = m > neg_inf
                out[sl, :, i, j] = torch.where(empty, torch.zeros_like(m),
                                               torch.where(found, m, torch.full_like(m, -FLT_MAX)))
                arg[sl, :, i, j] = torch.where(empty | ~found, -1, best).to(torch.int32)
    return out, arg


def roi_pool_forward(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int,
                     spatial_scale: float, *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """The fork's ROI max pooling, no autograd: ``(top (R, C, ph, pw), argmax int32)``.

    ``x``: (N, C, H, W); ``rois``: (R, 5) rows ``[batch, x1, y1, x2, y2]`` in image
    coordinates (``spatial_scale`` maps them onto ``x``).  ``argmax`` holds ``h * W + w``
    within the ROI's image and channel, -1 for empty bins.
    """
    rois = rois.to(x.dtype)
    if _use_torchvision(backend, x.dtype):
        out, arg = torch.ops.torchvision.roi_pool(x.contiguous(), rois.contiguous(),
                                                  float(spatial_scale), int(pooled_h), int(pooled_w))
        return out, arg
    return _roi_pool_forward_torch(x, rois, int(pooled_h), int(pooled_w), float(spatial_scale))


# ---------------------------------------------------------------------------- backward
def _roi_pool_backward(grad: Tensor, rois: Tensor, argmax: Tensor, x_shape: Sequence[int],
                       spatial_scale: float, dtype: torch.dtype) -> Tensor:
    """The fork's backward: argmax routing restricted to what its input-side loop finds."""
    n, c, h, w = (int(s) for s in x_shape)
    r, _, ph_, pw_ = grad.shape
    gin = grad.new_zeros(n * c * h * w)
    if grad.numel() == 0:
        return gin.view(n, c, h, w)
    dt = _arith_dtype(dtype)
    bi, x1, y1, x2, y2 = (t.view(r, 1, 1, 1) for t in roi_corners(rois, spatial_scale, dtype))
    a = argmax.to(torch.int64)
    ah, aw = torch.div(a, w, rounding_mode="floor"), a.remainder(w)
    in_roi = (ah >= y1) & (ah <= y2) & (aw >= x1) & (aw <= x2)
    bh = _bin_size(y1, y2, ph_, dt)
    bw = _bin_size(x1, x2, pw_, dt)
    rel_h, rel_w = (ah - y1).to(dt), (aw - x1).to(dt)
    p_h = torch.arange(ph_, device=grad.device).view(1, 1, ph_, 1)
    p_w = torch.arange(pw_, device=grad.device).view(1, 1, 1, pw_)
    feas_h = (p_h >= torch.floor(rel_h / bh)) & (p_h < torch.ceil((rel_h + 1) / bh))
    feas_w = (p_w >= torch.floor(rel_w / bw)) & (p_w < torch.ceil((rel_w + 1) / bw))
    keep = (a >= 0) & in_roi & feas_h & feas_w
    chan = torch.arange(c, device=grad.device).view(1, c, 1, 1)
    flat = (bi * c + chan) * (h * w) + a
    # masked rather than boolean-indexed: no host sync on CUDA (dropped entries add 0 at 0)
    gin.index_add_(0, torch.where(keep, flat, 0).reshape(-1),
                   torch.where(keep, grad, torch.zeros_like(grad)).reshape(-1))
    return gin.view(n, c, h, w)


class _ROIPool(torch.autograd.Function):
    """ROI max pooling with the fork's backward (see ``_roi_pool_backward``)."""

    @staticmethod
    def forward(ctx, x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int,  # type: ignore[override]
                spatial_scale: float, backend: Optional[str]):
        out, arg = roi_pool_forward(x, rois.detach(), pooled_h, pooled_w, spatial_scale,
                                    backend=backend)
        ctx.save_for_backward(rois.detach(), arg)
        ctx.x_shape = tuple(x.shape)
        ctx.x_dtype = x.dtype
        ctx.spatial_scale = spatial_scale
        ctx.mark_non_differentiable(arg)
        return out, arg

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor, _grad_arg):  # type: ignore[override]
        rois, arg = ctx.saved_tensors
        gx = None
        if ctx.needs_input_grad[0]:
            gx = _roi_pool_backward(grad.contiguous(), rois, arg, ctx.x_shape,
                                    ctx.spatial_scale, ctx.x_dtype)
        return gx, None, None, None, None, None


def roi_pooling(x: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float = 1.0,
                *, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Differentiable fork ROI pooling: ``(top, argmax)``; no gradient to ``rois``.

    Shapes: ``x`` (N, C, H, W), ``rois`` (R, 5) ``[batch, x1, y1, x2, y2]`` (inclusive
    corners in input-image pixels), top (R, C, pooled_h, pooled_w).
    """
    _check_rois(rois, x.shape[0])
    return _ROIPool.apply(x, rois, int(pooled_h), int(pooled_w), float(spatial_scale), backend)


class ROILayer(Layer):
    """What the ROI layers (ROIPooling, ROIAlign, PSROIPooling) share: bottoms features
    (N, C, H, W) and ROIs (R, 5) -- or any (R, ...) blob of 5 values per row,
    ``[batch, x1, y1, x2, y2]`` -- and a top of R rows.

    Subclasses give ``_top_shape`` and may add feature checks in ``_check_features``."""

    exact_bottoms = 2
    exact_tops = 1
    #: what bottom 0 holds, for messages
    feature_kind = "features"

    def _check_features(self, feat: Shape) -> None:
        """Checks of bottom 0 beyond being 4-D (none by default)."""

    def _top_shape(self, feat: Shape, rois: Shape) -> Shape:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check(self, feat: Shape, rois: Shape) -> None:
        if len(feat) != 4:
            raise self.error(ShapeError, f"bottom[0] ({self.feature_kind}) must be 4-D "
                                         f"(N, C, H, W), got {feat}")
        self._check_features(feat)
        if len(rois) == 0 or math.prod(rois[1:]) != 5:
            raise self.error(ShapeError, f"bottom[1] (ROIs) must hold 5 values per ROI "
                                         f"[batch, x1, y1, x2, y2], e.g. (R, 5); got {rois}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        feat, rois = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
        self._check(feat, rois)
        return [self._top_shape(feat, rois)]

    def _rois(self, x: Tensor, rois: Tensor) -> Tensor:
        """The ROIs as (R, 5), after the shape checks and the batch-index check."""
        self._check(tuple(x.shape), tuple(rois.shape))
        rois2 = rois.reshape(rois.shape[0], 5)
        return _check_rois(rois2, x.shape[0], layer=self.name, checks=self.checks)


@register("ROIPooling")
class ROIPooling(ROILayer):
    """Fast R-CNN ROI max pooling (``roi_pooling_param { pooled_h pooled_w spatial_scale }``).

    Bottoms: features (N, C, H, W) and ROIs (R, 5) (or any (R, ...) blob of 5 values per
    row).  Top (R, C, pooled_h, pooled_w).  The fork's ``max_idx_`` blob is kept as
    ``self.argmax`` after each forward (internal, not a top).
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.roi_pooling_param
        if p.pooled_h <= 0 or p.pooled_w <= 0:
            raise self.error(SchemaError, f"roi_pooling_param.pooled_h and pooled_w must be > 0, "
                                          f"got {p.pooled_h} x {p.pooled_w}")
        self.pooled_h = int(p.pooled_h)
        self.pooled_w = int(p.pooled_w)
        self.spatial_scale = float(p.spatial_scale)
        self.argmax: Optional[Tensor] = None
        self._check(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))

    def _top_shape(self, feat: Shape, rois: Shape) -> Shape:
        return (int(rois[0]), int(feat[1]), self.pooled_h, self.pooled_w)

    # a custom autograd Function with a data-dependent ROI count: graph break, run eagerly
    @torch.compiler.disable
    def forward(self, x: Tensor, rois: Tensor) -> Tuple[Tensor]:
        rois2 = self._rois(x, rois)
        out, arg = _ROIPool.apply(x, rois2, self.pooled_h, self.pooled_w, self.spatial_scale, None)
        self.argmax = arg
        return (out,)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, pooled=({self.pooled_h}, {self.pooled_w}), "
                f"spatial_scale={self.spatial_scale:g}")


# ---------------------------------------------------------------------------- SmoothL1Loss
def smooth_l1_loss(pred: Tensor, target: Tensor, inside: Optional[Tensor] = None,
                   outside: Optional[Tensor] = None, sigma: float = 1.0) -> Tensor:
    """The fork's SmoothL1Loss: ``sum(w_out * f(w_in * (pred - target))) / pred.shape[0]``.

    ``f(x) = 0.5 * (sigma x)^2`` if ``|x| < 1 / sigma^2`` else ``|x| - 0.5 / sigma^2``;
    ``sigma^2`` is computed in float and the threshold ``1.0 / sigma^2`` compared in double,
    as the fork does.  Gradients reach ``pred`` and ``target`` (negated); the weights get
    none (the fork never writes their diffs), so they are detached.
    """
    s32 = np.float32(sigma)
    sigma2 = float(s32 * s32)  # squared in float, as the fork (host arithmetic: no device round trip)
    thr = 1.0 / sigma2 if sigma2 > 0 else math.inf
    num = pred.shape[0] if pred.dim() else 1
    x = pred - target.reshape(pred.shape)
    if inside is not None:
        x = inside.detach().reshape(pred.shape) * x
    ax = x.abs()
    # the fork compares in double; MPS has no float64 (there the float compare may differ
    # from the fork's by one ulp at the threshold, where f is continuous anyway)
    quad = (ax.detach() if ax.device.type == "mps" else ax.detach().to(torch.float64)) < thr
    half_s2 = 0.5 * sigma2
    f = torch.where(quad, half_s2 * x * x, ax - (0.5 / sigma2 if sigma2 > 0 else 0.0))
    if outside is not None:
        f = outside.detach().reshape(pred.shape) * f
    return f.sum() / num


@register("SmoothL1Loss")
class SmoothL1Loss(Layer):
    """Fast R-CNN's smooth L1 loss (``smooth_l1_loss_param { sigma }``, default 1).

    Bottoms: pred, target and optionally inside and outside weights.  Three bottoms are
    Fast R-CNN's 2015 form (rbgirshick/fast-rcnn: pred, targets, ``bbox_loss_weights``),
    whose third bottom multiplies the difference like the later inside weights.
    Top: a scalar (shape ()), the loss divided by pred's first dimension.
    """

    is_loss = True
    min_bottoms = 2
    max_bottoms = 4
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.sigma = float(param.smooth_l1_loss_param.sigma)
        self._check([tuple(s) for s in bottom_shapes])

    def _check(self, shapes: List[Shape]) -> None:
        pred = shapes[0]
        count = math.prod(pred)
        names = ["target", "inside weights", "outside weights"]
        for name, s in zip(names, shapes[1:]):
            if math.prod(s) != count or (len(pred) and (not len(s) or s[0] != pred[0])):
                raise self.error(ShapeError, f"{name} of shape {s} must match the prediction's "
                                             f"shape {pred}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check([tuple(s) for s in bottom_shapes])
        return [()]

    def forward(self, pred: Tensor, target: Tensor, *weights: Tensor) -> Tuple[Tensor]:
        self._check([tuple(t.shape) for t in (pred, target) + weights])
        inside = weights[0] if weights else None
        outside = weights[1] if len(weights) > 1 else None
        return (smooth_l1_loss(pred, target, inside, outside, self.sigma),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sigma={self.sigma:g}"
