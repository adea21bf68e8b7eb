"""The SSD fork's inference layers: PriorBox, Permute, Normalize, DetectionOutput.

All four follow weiliu89/caffe, branch ``ssd``, commit
4817bf8b4200b35ada8ed0dc378dceaf38c539e4 (``src/caffe/layers/{prior_box,permute,normalize,
detection_output}_layer.cpp`` and ``src/caffe/util/bbox_util.cpp``), the CPU paths.  Box
maths lives in :mod:`caffe_compat.layers.ssd_boxes` (normalized boxes, no ``+1`` widths).

Points where the fork's exact behaviour is easy to get wrong, all reproduced here:

* PriorBox truncates ``min_size``/``max_size`` to ``int`` before using them (a
  ``min_size: 10.5`` makes 10-pixel priors), orders the priors of a cell as: for each
  ``min_size``, the square ``min_size`` box, the square ``sqrt(min * max)`` box, then one box
  per aspect ratio (1 first, each given ratio followed by its flip, duplicates within 1e-6
  dropped); its coordinates are computed in double from float centres and sizes.  Its
  bottom count is not enforced by the fork (a typo in the header), so one bottom works
  when ``img_size``/``img_h``/``img_w`` say the image size.
* Normalize adds ``eps`` *inside* the square root (``sqrt(sum x^2 + eps)``) in both modes;
  its backward with a per-channel scale is not the gradient of its forward (the fork
  scales ``top_diff`` by the channel's scale only after the projection), so it is a
  custom autograd Function with the fork's formulas.
* DetectionOutput works in float32 (the fork's ``NormalizedBBox`` has float fields), never
  clips decoded boxes (``clip_bbox = false`` in this commit), runs ``ApplyNMSFast`` per
  class with ``std::stable_sort``, and cuts to ``keep_top_k`` with ``std::sort``, whose
  order among equal scores (and so which tied boxes survive the cut) is libstdc++'s
  introsort: ``_gnu_sort`` below is that algorithm, step for step.  Rows come per image,
  by ascending label, in score order within a label; with no detection at all the top is
  ``num`` rows ``[i, -1, -1, -1, -1, -1, -1]``.
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register
from caffe_compat.layers.ssd_boxes import (CENTER_SIZE, CORNER, CORNER_SIZE, decode_boxes,
                                           nms_fast)
from caffe_compat.protos import caffe_pb2

log = logging.getLogger(__name__)

FLT_MAX = float(np.finfo(np.float32).max)
_F32 = np.float32


def _legacy_hw(shape: Shape, *, layer: str, what: str) -> Tuple[int, int]:
    """Caffe's ``height()``/``width()``: axes 2 and 3, 1 where the blob has fewer axes."""
    if len(shape) > 4:
        raise ShapeError(f"{what} must have at most 4 axes for the fork's height()/width(), "
                         f"got {tuple(shape)}", layer=layer)
    h = int(shape[2]) if len(shape) > 2 else 1
    w = int(shape[3]) if len(shape) > 3 else 1
    return h, w


# ============================================================================ PriorBox
def _aspect_ratios(given: Sequence[float], flip: bool) -> List[float]:
    """The fork's list: 1, then each new ratio (float) and, with ``flip``, ``1./ratio``;
    a ratio within 1e-6 of one already listed (computed in float) is skipped."""
    ars: List[float] = [1.0]
    for a in given:
        ar = _F32(a)
        if any(abs(float(_F32(ar - _F32(b)))) < 1e-6 for b in ars):
            continue
        ars.append(float(ar))
        if flip:
            ars.append(float(_F32(1.0 / float(ar))))
    return ars


def prior_box_sizes(min_sizes: Sequence[float], max_sizes: Sequence[float],
                    aspect_ratios: Sequence[float]) -> List[Tuple[float, float]]:
    """(width, height) of the priors of one cell, in the fork's order, as float32 values.

    ``aspect_ratios`` is the expanded list of :func:`_aspect_ratios` (1 first).  Sizes are
    truncated to int as the fork does (``int min_size_ = min_sizes_[s]``).
    """
    out: List[Tuple[float, float]] = []
    for s, mn in enumerate(min_sizes):
        m = int(mn)  # C++ float -> int conversion truncates
        out.append((float(m), float(m)))
        if max_sizes:
            mx = int(max_sizes[s])
            side = float(_F32(math.sqrt(float(m * mx))))
            out.append((side, side))
        for ar in aspect_ratios:
            if abs(ar - 1.0) < 1e-6:
                continue
            r = math.sqrt(ar)
            out.append((float(_F32(m * r)), float(_F32(m / r))))
    return out


def prior_boxes(layer_h: int, layer_w: int, img_h: int, img_w: int,
                sizes: Sequence[Tuple[float, float]], step_h: float, step_w: float,
                offset: float, clip: bool, variance: Sequence[float], *,
                dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """The PriorBox top (1, 2, layer_h * layer_w * P * 4) for P = ``len(sizes)`` priors.

    Channel 0: ``[xmin, ymin, xmax, ymax]`` per prior, cell-major (row, column, prior);
    ``(cx -+ w / 2) / img_w`` computed in double from float ``cx = (w + offset) * step``,
    as the fork does; clipped to [0, 1] with ``clip``.  Channel 1: the variances (one value
    repeated, or four per prior).  ``step_h``/``step_w`` of 0 mean ``img / layer`` (float).
    """
    if step_h == 0 or step_w == 0:
        step_w = float(_F32(_F32(img_w) / _F32(layer_w)))
        step_h = float(_F32(_F32(img_h) / _F32(layer_h)))
    f32 = torch.float32
    off = torch.tensor(offset, dtype=f32)
    cx = (torch.arange(layer_w, dtype=f32) + off) * torch.tensor(step_w, dtype=f32)  # float maths
    cy = (torch.arange(layer_h, dtype=f32) + off) * torch.tensor(step_h, dtype=f32)
    cx = cx.double().view(1, layer_w, 1)
    cy = cy.double().view(layer_h, 1, 1)
    bw = torch.tensor([s[0] for s in sizes], dtype=torch.float64).view(1, 1, -1)
    bh = torch.tensor([s[1] for s in sizes], dtype=torch.float64).view(1, 1, -1)
    shape = (layer_h, layer_w, len(sizes))
    boxes = torch.stack([((cx - bw / 2.0) / img_w).expand(shape),
                         ((cy - bh / 2.0) / img_h).expand(shape),
                         ((cx + bw / 2.0) / img_w).expand(shape),
                         ((cy + bh / 2.0) / img_h).expand(shape)], dim=-1).to(dtype).reshape(-1)
    if clip:
        boxes = boxes.clamp(0.0, 1.0)
    var = torch.tensor([float(_F32(v)) for v in variance], dtype=torch.float64).to(dtype)
    var = var.repeat(boxes.numel() // var.numel()) if var.numel() == 4 else var.expand(boxes.numel())
    return torch.stack([boxes, var]).unsqueeze(0).to(device)


@register("PriorBox")
class PriorBox(Layer):
    """SSD prior (default) boxes for one feature map (``prior_box_param``).

    Bottoms: the feature map (N, C, H, W) and, unless ``img_size`` or ``img_h``/``img_w``
    give the image size, the image blob (its H and W).  Top (1, 2, H * W * P * 4): normalized
    prior corners, then their variances.  Depends only on shapes; no gradient to the bottoms.
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.prior_box_param
        err = lambda m: self.error(SchemaError, m)  # noqa: E731
        if len(p.min_size) == 0:
            raise err("prior_box_param.min_size is required (one or more values)")
        self.min_sizes = [float(v) for v in p.min_size]
        if any(not v > 0 for v in self.min_sizes):
            raise err(f"prior_box_param.min_size must be > 0, got {self.min_sizes}")
        self.max_sizes = [float(v) for v in p.max_size]
        if self.max_sizes:
            if len(self.max_sizes) != len(self.min_sizes):
                raise err(f"prior_box_param.max_size must be given as often as min_size "
                          f"({len(self.min_sizes)}), got {len(self.max_sizes)}")
            for mn, mx in zip(self.min_sizes, self.max_sizes):
                if not mx > mn:
                    raise err(f"prior_box_param.max_size must be greater than min_size, got "
                              f"max_size {mx:g} <= min_size {mn:g}")
        self.flip = bool(p.flip)
        self.aspect_ratios = _aspect_ratios([float(a) for a in p.aspect_ratio], self.flip)
        self.clip = bool(p.clip)
        var = [float(v) for v in p.variance]
        if len(var) > 1 and len(var) != 4:
            raise err(f"prior_box_param.variance takes 1 or 4 values, got {len(var)}")
        if any(not v > 0 for v in var):
            raise err(f"prior_box_param.variance must be > 0, got {var}")
        self.variance = var or [0.1]
        if p.HasField("img_h") or p.HasField("img_w"):
            if p.HasField("img_size"):
                raise err("give either prior_box_param.img_size or img_h/img_w, not both")
            if p.img_h <= 0 or p.img_w <= 0:
                raise err(f"prior_box_param.img_h and img_w must both be > 0, got "
                          f"{p.img_h} x {p.img_w}")
            self.img_h, self.img_w = int(p.img_h), int(p.img_w)
        elif p.HasField("img_size"):
            if p.img_size <= 0:
                raise err("prior_box_param.img_size must be > 0")
            self.img_h = self.img_w = int(p.img_size)
        else:
            self.img_h = self.img_w = 0
        if p.HasField("step_h") or p.HasField("step_w"):
            if p.HasField("step"):
                raise err("give either prior_box_param.step or step_h/step_w, not both")
            if not (p.step_h > 0 and p.step_w > 0):
                raise err(f"prior_box_param.step_h and step_w must both be > 0, got "
                          f"{p.step_h:g} x {p.step_w:g}")
            self.step_h, self.step_w = float(p.step_h), float(p.step_w)
        elif p.HasField("step"):
            if not p.step > 0:
                raise err(f"prior_box_param.step must be > 0, got {p.step:g}")
            self.step_h = self.step_w = float(p.step)
        else:
            self.step_h = self.step_w = 0.0
        self.offset = float(p.offset)
        self.sizes = prior_box_sizes(self.min_sizes, self.max_sizes, self.aspect_ratios)
        self.num_priors = len(self.sizes)
        self._cache: Dict[tuple, Tensor] = {}
        self._geometry([tuple(s) for s in bottom_shapes])

    def _geometry(self, shapes: List[Shape]) -> Tuple[int, int, int, int]:
        lh, lw = _legacy_hw(shapes[0], layer=self.name, what="bottom 0 (feature map)")
        if self.img_h == 0 or self.img_w == 0:
            if len(shapes) < 2:
                raise self.error(ShapeError, "PriorBox needs the image as bottom 1 unless "
                                             "prior_box_param.img_size or img_h/img_w is given")
            ih, iw = _legacy_hw(shapes[1], layer=self.name, what="bottom 1 (image)")
        else:
            ih, iw = self.img_h, self.img_w
        if lh * lw * self.num_priors == 0:
            raise self.error(ShapeError, f"the feature map {tuple(shapes[0])} has no cells")
        return lh, lw, ih, iw

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        lh, lw, _, _ = self._geometry([tuple(s) for s in bottom_shapes])
        return [(1, 2, lh * lw * self.num_priors * 4)]

    def forward(self, *bottoms: Tensor) -> Tuple[Tensor]:
        x = bottoms[0]
        lh, lw, ih, iw = self._geometry([tuple(b.shape) for b in bottoms])
        if x.device.type == "meta":
            return (torch.empty((1, 2, lh * lw * self.num_priors * 4), dtype=x.dtype, device="meta"),)
        key = (lh, lw, ih, iw, x.dtype, x.device)
        out = self._cache.get(key)
        if out is None:  # depends on shapes only: computed once per geometry and device
            out = prior_boxes(lh, lw, ih, iw, self.sizes, self.step_h, self.step_w, self.offset,
                              self.clip, self.variance, dtype=x.dtype, device=x.device)
            self._cache = {key: out}
        return (out,)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, min_size={self.min_sizes}, max_size={self.max_sizes}, "
                f"aspect_ratios={[round(a, 4) for a in self.aspect_ratios]}, clip={self.clip}, "
                f"num_priors={self.num_priors}")


# ============================================================================ Permute
@register("Permute")
class Permute(Layer):
    """Axis permutation (``permute_param { order }``); unlisted axes follow in their order.

    The fork's backward writes each top diff back to its source position: the inverse
    permutation, which is autograd's gradient of ``Tensor.permute``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.num_axes = len(bottom_shapes[0])
        order: List[int] = []
        for o in param.permute_param.order:
            o = int(o)
            if o >= self.num_axes:
                raise self.error(SchemaError, f"permute_param.order {o} must be less than the "
                                              f"bottom's number of axes ({self.num_axes})")
            if o in order:
                raise self.error(SchemaError, f"permute_param.order has duplicate axis {o}")
            order.append(o)
        order += [i for i in range(self.num_axes) if i not in order]
        self.order = tuple(order)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() != self.num_axes:
            raise self.error(ShapeError, f"bottom has {x.dim()} axes; the layer was set up for "
                                         f"{self.num_axes}")
        return (x.permute(self.order),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, order={self.order}"


# ============================================================================ Normalize
def _normalize_forward(x: Tensor, scale: Tensor, across_spatial: bool,
                       eps: float) -> Tuple[Tensor, Tensor]:
    """(top, norm) with ``x`` viewed (N, C, S) and ``scale`` broadcastable to (1, C, 1)."""
    if across_spatial:
        norm = torch.sqrt((x * x).sum(dim=(1, 2)) + eps)  # (N,): pow(asum + eps, 0.5)
        inv = (1.0 / norm.double()).to(x.dtype)            # Dtype(1.0 / norm)
        top = x * inv.view(-1, 1, 1)
    else:
        norm = torch.sqrt(eps + (x * x).sum(dim=1))       # (N, S): eps + sum_c x^2
        top = x / norm.unsqueeze(1)
    return top * scale, norm


class _NormalizeFn(torch.autograd.Function):
    """The fork's Normalize: forward and its own backward (see ``NormalizeLayer::Backward_cpu``).

    Bottom diff: ``((dy - x * (x . dy) / norm^2) / norm) * scale`` with the dot product over
    the normalized group (the whole sample, or the channels of one position); scale diff:
    ``sum(top * dy) / scale`` (per channel, or one sum for a shared scale).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor,  # type: ignore[override]
                across_spatial: bool, channel_shared: bool, eps: float) -> Tensor:
        n, c = x.shape[0], x.shape[1]
        x3 = x.reshape(n, c, -1)
        s = scale.reshape(()) if channel_shared else scale.reshape(1, c, 1)
        top, norm = _normalize_forward(x3, s, across_spatial, eps)
        ctx.save_for_backward(x3, top, norm, scale)
        ctx.flags = (across_spatial, channel_shared, tuple(x.shape))
        return top.reshape(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x3, top, norm, scale = ctx.saved_tensors
        across_spatial, channel_shared, shape = ctx.flags
        n, c = x3.shape[0], x3.shape[1]
        dy3 = dy.reshape(n, c, -1)
        s = scale.reshape(()) if channel_shared else scale.reshape(1, c, 1)
        gx = gs = None
        if ctx.needs_input_grad[1]:
            if channel_shared:
                gs = ((top * dy3).sum() / scale.reshape(())).reshape(scale.shape)
            else:
                gs = ((top * dy3).sum(dim=(0, 2)) / scale.reshape(c)).reshape(scale.shape)
        if ctx.needs_input_grad[0]:
            if across_spatial:
                a = (x3 * dy3).sum(dim=(1, 2))                     # (N,)
                alpha = (a / norm / norm).view(-1, 1, 1)
                inv = (1.0 / norm.double()).to(x3.dtype).view(-1, 1, 1)
                g = (dy3 - alpha * x3) * inv
            else:
                a = (x3 * dy3).sum(dim=1, keepdim=True)            # (N, 1, S)
                nrm = norm.unsqueeze(1)
                g = ((dy3 - (x3 * a) / (nrm * nrm)) / nrm)
            gx = (g * s).reshape(shape)
        return gx, gs, None, None, None


def normalize(x: Tensor, scale: Tensor, across_spatial: bool = True, channel_shared: bool = True,
              eps: float = 1e-10) -> Tensor:
    """The SSD fork's L2 Normalize with its own backward.

    Shapes: ``x`` (N, C, ...) (the fork needs at most 4 axes: N, C, H, W); ``scale`` one
    value (shape () or (1,)) when ``channel_shared``, else (C,).  ``across_spatial``: one norm
    per sample, ``sqrt(sum over C, H, W of x^2 + eps)``; otherwise one per position,
    ``sqrt(sum over C of x^2 + eps)``.  Top ``x / norm * scale``.
    """
    return _NormalizeFn.apply(x, scale, bool(across_spatial), bool(channel_shared), float(eps))


@register("Normalize")
class Normalize(Layer):
    """SSD's L2 normalization with a learnable scale (``norm_param``); blob 0 ``weight``
    holds the scale: shape () when ``channel_shared`` (the fork's 0-axis blob), else (C,),
    filled by ``scale_filler`` (default constant 1)."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.norm_param
        shape = tuple(bottom_shapes[0])
        self._check(shape)
        self.across_spatial = bool(p.across_spatial)
        self.channel_shared = bool(p.channel_shared)
        self.eps = float(np.float32(p.eps))
        self.channels = int(shape[1])
        if p.HasField("scale_filler"):
            filler = p.scale_filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=1.0)
        blob_shape = () if self.channel_shared else (self.channels,)
        self.add_blob("weight", blob_shape, filler)

    def _check(self, shape: Shape) -> None:
        if len(shape) < 2:
            raise self.error(ShapeError, f"bottom must have at least 2 axes (N, C, ...), got {shape}")
        if len(shape) > 4:
            raise self.error(ShapeError, f"bottom must have at most 4 axes (N, C, H, W) as the "
                                         f"fork's height()/width() require, got {shape}")

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape))
        if x.shape[1] != self.channels:
            raise self.error(ShapeError, f"bottom has {x.shape[1]} channels; the scale blob has "
                                         f"{self.channels}")
        if x.device.type == "meta":
            return (torch.empty_like(x),)
        return (normalize(x, self.weight, self.across_spatial, self.channel_shared, self.eps),)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, across_spatial={self.across_spatial}, "
                f"channel_shared={self.channel_shared}, eps={self.eps:g}")


# ============================================================================ std::sort
def _gnu_sort(a: list, less: Callable[[object, object], bool]) -> None:
    """In-place ``std::sort(a.begin(), a.end(), less)`` exactly as libstdc++ does it
    (introsort: median-of-three pivot to the front, unguarded partition, heapsort past the
    depth limit, insertion sort of runs of 16), so elements that compare equal end in the
    order the fork's binary (and OpenCV's) leaves them."""
    n = len(a)
    if n < 2:
        return
    threshold = 16

    def move_median_to_first(result: int, x: int, y: int, z: int) -> None:
        if less(a[x], a[y]):
            if less(a[y], a[z]):
                a[result], a[y] = a[y], a[result]
            elif less(a[x], a[z]):
                a[result], a[z] = a[z], a[result]
            else:
                a[result], a[x] = a[x], a[result]
        elif less(a[x], a[z]):
            a[result], a[x] = a[x], a[result]
        elif less(a[y], a[z]):
            a[result], a[z] = a[z], a[result]
        else:
            a[result], a[y] = a[y], a[result]

    def unguarded_partition(first: int, last: int, pivot: int) -> int:
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
        top = hole
        child = hole
        while child < (length - 1) // 2:
            child = 2 * (child + 1)
            if less(a[first + child], a[first + child - 1]):
                child -= 1
            a[first + hole] = a[first + child]
            hole = child
        if (length & 1) == 0 and child == (length - 2) // 2:
            child = 2 * (child + 1)
            a[first + hole] = a[first + child - 1]
            hole = child - 1
        parent = (hole - 1) // 2
        while hole > top and less(a[first + parent], value):
            a[first + hole] = a[first + parent]
            hole = parent
            parent = (hole - 1) // 2
        a[first + hole] = value

    def heap_sort(first: int, last: int) -> None:
        length = last - first
        if length >= 2:  # make_heap
            parent = (length - 2) // 2
            while True:
                adjust_heap(first, parent, length, a[first + parent])
                if parent == 0:
                    break
                parent -= 1
        while last - first > 1:  # sort_heap
            last -= 1
            value = a[last]
            a[last] = a[first]
            adjust_heap(first, 0, last - first, value)

    def introsort_loop(first: int, last: int, depth: int) -> None:
        while last - first > threshold:
            if depth == 0:
                heap_sort(first, last)
                return
            depth -= 1
            mid = first + (last - first) // 2
            move_median_to_first(first, first + 1, mid, last - 1)
            cut = unguarded_partition(first + 1, last, first)
            introsort_loop(cut, last, depth)
            last = cut

    def unguarded_linear_insert(i: int) -> None:
        val = a[i]
        j = i - 1
        while less(val, a[j]):
            a[i] = a[j]
            i = j
            j -= 1
        a[i] = val

    def insertion_sort(first: int, last: int) -> None:
        for i in range(first + 1, last):
            if less(a[i], a[first]):
                val = a[i]
                a[first + 1:i + 1] = a[first:i]
                a[first] = val
            else:
                unguarded_linear_insert(i)

    introsort_loop(0, n, 2 * (n.bit_length() - 1))
    if n > threshold:
        insertion_sort(0, threshold)
        for i in range(threshold, n):
            unguarded_linear_insert(i)
    else:
        insertion_sort(0, n)


def _score_desc(p, q) -> bool:
    return p[0] > q[0]


# ============================================================================ DetectionOutput
_CODE_NAMES = {CORNER: "CORNER", CENTER_SIZE: "CENTER_SIZE", CORNER_SIZE: "CORNER_SIZE"}


def detection_output(loc: Tensor, conf: Tensor, prior: Tensor, *, num_classes: int,
                     share_location: bool = True, background_label_id: int = 0,
                     code_type: int = CORNER, variance_encoded_in_target: bool = False,
                     nms_threshold: float = 0.3, top_k: int = -1, eta: float = 1.0,
                     keep_top_k: int = -1, confidence_threshold: float = -FLT_MAX) -> Tensor:
    """The fork's ``DetectionOutputLayer::Forward_cpu``: (1, 1, R, 7) detections.

    Shapes: ``loc`` (N, P * L * 4, ...) with L = 1 when ``share_location`` else
    ``num_classes``, laid out prior-major (prior, loc class, 4); ``conf`` (N, P * C, ...)
    class probabilities, prior-major; ``prior`` the PriorBox top (1, 2, P * 4, ...).
    Rows ``[image, label, score, xmin, ymin, xmax, ymax]``: per image, labels ascending,
    kept boxes in score order (ties as the fork breaks them); no detection in the whole
    batch gives N rows ``[i, -1, ..., -1]``.  Boxes are decoded, never clipped.
    """
    n = int(loc.shape[0])
    num_priors = int(prior.shape[2]) // 4
    nl = 1 if share_location else num_classes
    f32 = torch.float32
    with torch.no_grad():
        pri = prior.detach().reshape(-1).to(f32)
        prior_boxes_ = pri[:num_priors * 4].view(num_priors, 4)
        prior_var = (pri.new_ones((num_priors, 4)) if variance_encoded_in_target
                     else pri[num_priors * 4:num_priors * 8].view(num_priors, 4))
        locs = loc.detach().reshape(n, num_priors, nl, 4).to(f32).permute(0, 2, 1, 3)
        decoded = decode_boxes(prior_boxes_, prior_var, locs, code_type,
                               variance_encoded_in_target)                   # (N, L, P, 4)
        scores = conf.detach().reshape(n, num_priors, num_classes).to(f32)    # (N, P, C)
        rows: List[Tuple[int, int, int]] = []   # (image, label, prior index)
        for i in range(n):
            indices: Dict[int, List[int]] = {}
            num_det = 0
            for c in range(num_classes):
                if c == background_label_id:
                    continue
                boxes = decoded[i, 0 if share_location else c]
                kept = nms_fast(boxes, scores[i, :, c], confidence_threshold, nms_threshold,
                                eta, top_k)
                indices[c] = kept.tolist()
                num_det += len(indices[c])
            if keep_top_k > -1 and num_det > keep_top_k:
                sc = scores[i].tolist()
                pairs = [(sc[idx][label], label, idx)
                         for label in sorted(indices) for idx in indices[label]]
                _gnu_sort(pairs, _score_desc)
                new: Dict[int, List[int]] = {}
                for _, label, idx in pairs[:keep_top_k]:
                    new.setdefault(label, []).append(idx)
                indices = new
            for label in sorted(indices):
                rows.extend((i, label, idx) for idx in indices[label])
        dev = loc.device
        if not rows:
            out = torch.full((1, 1, n, 7), -1.0, dtype=loc.dtype, device=dev)
            out[0, 0, :, 0] = torch.arange(n, dtype=loc.dtype, device=dev)
            return out
        r = torch.tensor(rows, dtype=torch.int64, device=dev)
        img, lab, idx = r[:, 0], r[:, 1], r[:, 2]
        box = decoded[img, 0 if share_location else lab, idx]                   # (R, 4)
        score = scores[img, idx, lab]
        out = torch.cat([img.to(f32).unsqueeze(1), lab.to(f32).unsqueeze(1), score.unsqueeze(1),
                         box], dim=1)
        return out.to(loc.dtype).view(1, 1, -1, 7)


@register("DetectionOutput")
class DetectionOutput(Layer):
    """SSD's decoding + per-class NMS + keep_top_k (``detection_output_param``).

    Bottoms: loc (N, P * L * 4), conf (N, P * C) probabilities, priors (1, 2, P * 4), and an
    optional image blob the fork reads only to visualize.  Top (1, 1, R, 7) with R known
    only after the forward (the build-time shape is the fork's placeholder (1, 1, 1, 7)).
    ``save_output_param`` and ``visualize`` are accepted but nothing is written or shown.
    No backward.
    """

    min_bottoms = 3
    max_bottoms = 4
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.detection_output_param
        if not p.HasField("num_classes"):
            raise self.error(SchemaError, "detection_output_param.num_classes is required")
        self.num_classes = int(p.num_classes)
        if self.num_classes <= 0:
            raise self.error(SchemaError, "detection_output_param.num_classes must be > 0")
        self.share_location = bool(p.share_location)
        self.num_loc_classes = 1 if self.share_location else self.num_classes
        self.background_label_id = int(p.background_label_id)
        if self.share_location and self.background_label_id == -1:
            # the shared location predictions carry label -1: the fork skips decoding them
            # as "background" and then aborts (LOG(FATAL) "Could not find location
            # predictions for label -1"); refuse the combination up front
            raise self.error(SchemaError, "detection_output_param.background_label_id -1 needs "
                                          "share_location: false (with shared locations the fork "
                                          "takes label -1 for the background and aborts)")
        self.code_type = int(p.code_type)
        if self.code_type not in _CODE_NAMES:
            raise self.error(SchemaError, f"detection_output_param.code_type {self.code_type} is "
                                          "not one of CORNER, CENTER_SIZE, CORNER_SIZE")
        self.variance_encoded_in_target = bool(p.variance_encoded_in_target)
        self.keep_top_k = int(p.keep_top_k)
        self.confidence_threshold = (float(np.float32(p.confidence_threshold))
                                     if p.HasField("confidence_threshold") else -FLT_MAX)
        nms = p.nms_param
        self.nms_threshold = float(np.float32(nms.nms_threshold))
        if not self.nms_threshold >= 0:
            raise self.error(SchemaError, f"nms_param.nms_threshold must be >= 0, got "
                                          f"{self.nms_threshold:g}")
        self.eta = float(np.float32(nms.eta))
        if not 0 < self.eta <= 1:
            raise self.error(SchemaError, f"nms_param.eta must be in (0, 1], got {self.eta:g}")
        self.top_k = int(nms.top_k) if nms.HasField("top_k") else -1
        if p.HasField("save_output_param") and p.save_output_param.output_directory:
            log.warning("layer '%s': detection_output_param.save_output_param is accepted but "
                        "caffe-compat writes no result files", self.name)
        if p.visualize:
            log.warning("layer '%s': detection_output_param.visualize is accepted but "
                        "caffe-compat shows no window", self.name)
        self._check([tuple(s) for s in bottom_shapes])

    def _check(self, shapes: List[Shape]) -> int:
        loc, conf, prior = shapes[0], shapes[1], shapes[2]
        if len(loc) == 0 or len(conf) == 0 or loc[0] != conf[0]:
            raise self.error(ShapeError, f"loc {loc} and conf {conf} must have the same batch size")
        if len(prior) < 3 or len(prior) > 4:
            raise self.error(ShapeError, f"priors must be the PriorBox top (1, 2, P * 4), got {prior}")
        num_priors = int(prior[2]) // 4
        loc_per = math.prod(loc[1:])
        conf_per = math.prod(conf[1:])
        if num_priors * self.num_loc_classes * 4 != loc_per:
            raise self.error(ShapeError, f"number of priors ({num_priors}) must match the location "
                                         f"predictions: expected {num_priors * self.num_loc_classes * 4}"
                                         f" values per image, got {loc_per}")
        if num_priors * self.num_classes != conf_per:
            raise self.error(ShapeError, f"number of priors ({num_priors}) must match the confidence "
                                         f"predictions: expected {num_priors * self.num_classes} values "
                                         f"per image, got {conf_per}")
        # the variances are read (and used) only without variance_encoded_in_target; the
        # fork then still reads past a 1-channel prior blob, which here is simply allowed
        need = num_priors * (4 if self.variance_encoded_in_target else 8)
        if math.prod(prior) < need:
            raise self.error(ShapeError, f"priors {prior} must hold corners and variances "
                                         "(2 channels of P * 4 values)")
        return num_priors

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check([tuple(s) for s in bottom_shapes])
        return [(1, 1, 1, 7)]  # the fork's placeholder; the real row count is data-dependent

    def forward(self, loc: Tensor, conf: Tensor, prior: Tensor, *_image: Tensor) -> Tuple[Tensor]:
        self._check([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape)])
        try:
            out = detection_output(
                loc, conf, prior, num_classes=self.num_classes, share_location=self.share_location,
                background_label_id=self.background_label_id, code_type=self.code_type,
                variance_encoded_in_target=self.variance_encoded_in_target,
                nms_threshold=self.nms_threshold, top_k=self.top_k, eta=self.eta,
                keep_top_k=self.keep_top_k, confidence_threshold=self.confidence_threshold)
        except ValueError as e:  # a CHECK of the fork's box coding (e.g. a zero-width prior)
            raise self.error(DataError, str(e)) from e
        return (out,)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, "
                f"share_location={self.share_location}, background={self.background_label_id}, "
                f"code_type={_CODE_NAMES[self.code_type]}, nms={self.nms_threshold:g}, "
                f"top_k={self.top_k}, keep_top_k={self.keep_top_k}, "
                f"confidence_threshold={self.confidence_threshold:g}")
