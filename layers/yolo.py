"""YOLOv2 ports' layers: Reorg (the passthrough) and Region (the deploy-time detection head).

Reorg follows the YOLOv2 Caffe ports gklz1982/caffe-yolov2 @
ebb27029db4ddc0d40e520634633b0fa9cdcc10d and eric612/MobileNet-YOLO @
69b4441cb3ec8d553fbdef788ad033e246f901bd (the same ``reorg_layer`` source in both;
``reorg_param { stride reverse }``), which copy darknet's ``reorg_cpu``.
Region follows Intel's Caffe, openvinotoolkit/training_toolbox_caffe @
2137b635ddb0517ed6ee6e6c061b730d43677217 ("add region layer for yolov2";
``region_param { coords classes num }``, field 214), the one Caffe ``Region`` layer that
is darknet's ``forward_region_layer`` unchanged.

Reorg in brief.  Darknet's reorg is *not* a space-to-depth of the bottom as laid out.  With
``s = stride`` and a bottom (N, C, H, W), the loop walks every bottom position ``(c, h, w)``
and pairs it with the position ``(c % C', h s + o // s, w s + o % s)``, ``o = c // C'``,
of a blob shaped (N, C' = C / s^2, H s, W s):

- ``reverse: false`` (what YOLOv2 uses): the top is (N, C s^2, H / s, W / s), but the copy
  is ``top[bottom_index] = bottom[paired_index]``: the bottom's memory is read *as if* it
  were shaped (C / s^2, H s, W s), gathered into (C, H, W) order and then relabelled
  (C s^2, H / s, W / s).  Channel blocks of the top thus mix rows of several channels;
  weights trained with darknet (and converted) depend on exactly this order.
- ``reverse: true``: ``top[paired_index] = bottom[bottom_index]``, a depth-to-space into
  the top (N, C / s^2, H s, W s).

Both are permutations of the same elements, so the true gradient is the inverse
permutation, which is what darknet's backward computes (the same loop with the direction
flag flipped).  The Caffe ports *meant* the same, but their ``Backward_cpu``/``_gpu`` read
the diff of a private blob (``diff_``) that nothing ever writes, instead of the top's diff:
the bottom's gradient through Reorg is always zero there, so the layers before a
passthrough silently learn only from the main path.  This layer gives the true gradient
(darknet's) by default; ``layer.legacy_zero_backward = True`` reproduces the ports' zeros,
e.g. to match a training run made with them (docs/differences.md).

Region in brief (darknet's forward, no anchors involved: anchors only matter when boxes
are decoded afterwards).  The bottom (N, num * (coords + 1 + classes), H, W) holds, for
each anchor, ``coords + 1 + classes`` planes of H x W: x, y, w, h, (more coords), the
objectness, then the class scores.  The top has the same shape and layout: x and y
planes go through the logistic function, the objectness plane too, and each cell's class
scores through a softmax (over the classes); w, h pass unchanged.  The fork has no
backward (its ``Backward_cpu`` returns without writing), so the top carries no gradient.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register

# ---------------------------------------------------------------------------- Reorg
def reorg_shape(shape: Sequence[int], stride: int, reverse: bool) -> Shape:
    """Top shape of a reorg of a (N, C, H, W) bottom (checks divisibility; raises ValueError)."""
    n, c, h, w = (int(d) for d in shape)
    s = int(stride)
    if s <= 0:
        raise ValueError(f"stride must be positive, got {s}")
    if c % (s * s):
        raise ValueError(f"the channels ({c}) must be a multiple of stride^2 = {s * s}")
    if reverse:
        return (n, c // (s * s), h * s, w * s)
    if h % s or w % s:
        raise ValueError(f"the height and width ({h} x {w}) must be multiples of the stride {s}")
    return (n, c * s * s, h // s, w // s)


def reorg(x: Tensor, stride: int, reverse: bool = False) -> Tensor:
    """Darknet's reorg of ``x`` (N, C, H, W) as a differentiable view-permute-reshape.

    ``reverse=False`` -> (N, C s^2, H / s, W / s); ``reverse=True`` -> (N, C / s^2, H s, W s).
    See the module docstring for the index map; autograd gives the inverse permutation.
    """
    n, c, h, w = x.shape
    s = int(stride)
    top = reorg_shape(x.shape, s, reverse)
    cs = c // (s * s)
    if reverse:
        # top[n, c2, h*s + oh, w*s + ow] = x[n, (oh*s + ow)*C' + c2, h, w]
        v = x.reshape(n, s, s, cs, h, w).permute(0, 3, 4, 1, 5, 2)
        return v.reshape(top)
    # x's memory read as x' (N, C', H s, W s):
    # out[n, (oh*s + ow)*C' + c2, h, w] = x'[n, c2, h*s + oh, w*s + ow]
    v = x.reshape(n, cs, h, s, w, s).permute(0, 3, 5, 1, 2, 4)
    return v.reshape(n, c, h, w).reshape(top)


class _ForkReorg(torch.autograd.Function):
    """Reorg whose backward is the Caffe ports': the bottom's diff is all zeros."""

    @staticmethod
    def forward(ctx, x: Tensor, stride: int, reverse: bool):  # type: ignore[override]
        ctx.x_meta = (x.shape, x.dtype, x.device)
        return reorg(x, stride, reverse)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        shape, dtype, device = ctx.x_meta
        return torch.zeros(shape, dtype=dtype, device=device), None, None


@register("Reorg")
class Reorg(Layer):
    """YOLOv2's passthrough reorg (``reorg_param { stride (required) reverse (false) }``).

    Bottom (N, C, H, W); top (N, C s^2, H / s, W / s), or (N, C / s^2, H s, W s) with
    ``reverse``.  Not in place (the fork CHECKs it).  The bottom must divide evenly (the
    fork would index out of its blobs otherwise).  Backward: the true gradient (darknet's);
    ``legacy_zero_backward = True`` gives the Caffe ports' zero gradient instead.
    """

    exact_bottoms = 1
    exact_tops = 1
    #: reproduce the ports' bug: a zero gradient to the bottom (module docstring)
    legacy_zero_backward: bool = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.reorg_param
        if not p.HasField("stride"):
            raise self.error(SchemaError, "reorg_param.stride is required")
        if p.stride <= 0:
            raise self.error(SchemaError, f"reorg_param.stride must be > 0, got {p.stride}")
        self.stride = int(p.stride)
        self.reverse = bool(p.reverse)
        for t in self.top_names:
            if t in self.bottom_names:
                raise self.error(GraphError, f"Reorg does not allow in-place computation "
                                             f"(top '{t}' is also a bottom)")
        self._top_shape(tuple(bottom_shapes[0]))

    def _top_shape(self, shape: Shape) -> Shape:
        if len(shape) != 4:
            raise self.error(ShapeError, f"bottom must be 4-D (N, C, H, W), got {shape}")
        try:
            return reorg_shape(shape, self.stride, self.reverse)
        except ValueError as e:
            raise self.error(ShapeError, f"cannot reorg a {shape} bottom with stride "
                                         f"{self.stride}{' (reverse)' if self.reverse else ''}: "
                                         f"{e}") from None

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        return [self._top_shape(tuple(bottom_shapes[0]))]

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._top_shape(tuple(x.shape))
        if self.legacy_zero_backward and x.requires_grad:
            return (_ForkReorg.apply(x, self.stride, self.reverse),)
        return (reorg(x, self.stride, self.reverse),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, stride={self.stride}, reverse={self.reverse}"


# ---------------------------------------------------------------------------- Region
def region_activate(x: Tensor, num: int, coords: int, classes: int) -> Tensor:
    """Darknet's region forward on ``x`` (N, num * (coords + 1 + classes), H, W), same shape.

    Per anchor: planes 0 and 1 (x, y) -> logistic, plane ``coords`` (objectness) ->
    logistic, planes ``coords + 1 ...`` (classes) -> softmax across the classes of each
    cell; other coordinate planes unchanged.
    """
    n, c, h, w = x.shape
    k = coords + 1 + classes
    v = x.reshape(n, num, k, h, w)
    parts = [torch.sigmoid(v[:, :, 0:2]), v[:, :, 2:coords],
             torch.sigmoid(v[:, :, coords:coords + 1])]
    if classes:
        parts.append(torch.softmax(v[:, :, coords + 1:], dim=2))
    return torch.cat(parts, dim=2).reshape(n, c, h, w)


@register("Region")
class Region(Layer):
    """YOLOv2's region layer for deploy (``region_param { coords (4) classes (20) num (1) }``).

    Bottom (N, num * (coords + 1 + classes), H, W); top the same shape, activated as
    ``region_activate`` says.  No gradient (the fork has no backward); anchors are not a
    parameter of this layer (they decode boxes after it).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.region_param
        self.coords, self.classes, self.num = int(p.coords), int(p.classes), int(p.num)
        if self.coords < 2:
            raise self.error(SchemaError, f"region_param.coords must be >= 2 (x and y come first), "
                                          f"got {self.coords}")
        if self.classes < 0:
            raise self.error(SchemaError, f"region_param.classes must be >= 0, got {self.classes}")
        if self.num < 1:
            raise self.error(SchemaError, f"region_param.num must be >= 1, got {self.num}")
        # darknet2caffe's prototxts also carry the .cfg's training keys (read, not used at
        # deploy) and anchors (used when boxes are decoded after this layer); only a class
        # activation other than darknet's softmax would change this layer's output
        if p.HasField("softmax") and p.softmax != 1:
            raise self.error(SchemaError, f"region_param.softmax {p.softmax} is not supported "
                                          "(darknet's region layer with softmax: 1 is)")
        self.anchors = [float(a) for a in p.anchors.replace(",", " ").split()] if p.anchors else []
        self._check(tuple(bottom_shapes[0]))

    def _check(self, shape: Shape) -> None:
        if len(shape) != 4:
            raise self.error(ShapeError, f"bottom must be 4-D (N, C, H, W), got {shape}")
        want = self.num * (self.coords + 1 + self.classes)
        if shape[1] != want:
            raise self.error(ShapeError, f"bottom has {shape[1]} channels; num * (coords + 1 + "
                                         f"classes) = {self.num} * ({self.coords} + 1 + "
                                         f"{self.classes}) = {want}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check(tuple(bottom_shapes[0]))
        return [tuple(int(d) for d in bottom_shapes[0])]

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape))
        return (region_activate(x.detach(), self.num, self.coords, self.classes),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num={self.num}, coords={self.coords}, classes={self.classes}"
