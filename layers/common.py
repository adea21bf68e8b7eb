"""Common layers: inner products, normalisation, element-wise math and blob plumbing, plus
two fork layers of the same kind (ShuffleNet's ShuffleChannel, SENet's Axpy).

Every layer follows Caffe's ``*_layer.cpp`` semantics (shapes, defaults, tie breaking,
quirks such as MVN's 4-D top or ArgMax's index ordering); autograd supplies the backward
pass except where Caffe's backward is not the exact gradient of its forward (MVN).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import TEST, Layer, Shape, canonical_axis
from caffe_compat.layers.registry import register
from caffe_compat.protos import caffe_pb2


# ---------------------------------------------------------------------------- helpers
def _count(shape: Sequence[int], start: int = 0, end: Optional[int] = None) -> int:
    """Caffe's ``Blob::count(start, end)``: product of dims in ``[start, end)``.
    (Symbolic sizes under ``torch.export`` stay symbolic: ``int()`` would specialise them.)"""
    return math.prod(d if isinstance(d, torch.SymInt) else int(d) for d in tuple(shape)[start:end])


def _enum_value(layer: Layer, enum, value: int, what: str) -> int:
    """Check a proto enum value (binary protos may carry unknown numbers)."""
    if value not in enum.values():
        allowed = ", ".join(enum.keys())
        raise layer.error(SchemaError, f"unknown {what} {value}; allowed: {allowed}")
    return int(value)


def _no_in_place(layer: Layer) -> None:
    """Caffe CHECKs that some layers (Flatten, Reshape, Split) are not run in place."""
    for t in layer.top_names:
        if t in layer.bottom_names:
            raise layer.error(GraphError, f"{layer.param.type} does not allow in-place "
                                          f"computation (top '{t}' is also a bottom)")


def _apply_along(x: Tensor, p: Tensor, axis: int, op, layer: Layer, what: str) -> Tensor:
    """``op(x, p)`` with ``p`` broadcast over ``x`` starting at ``axis``, as Caffe's Scale/Bias.

    Caffe only requires ``p.numel()`` to equal ``x.count(axis, axis + p.ndim)`` (it walks
    the data as ``(outer, p.numel(), inner)``), so that is what is checked here.
    """
    end = axis + p.dim()
    if x.dim() < end:
        raise layer.error(ShapeError, f"{what} of shape {tuple(p.shape)} extends past bottom[0] "
                                      f"of shape {tuple(x.shape)} when applied at axis {axis}")
    span = _count(x.shape, axis, end)
    if span != p.numel():
        raise layer.error(ShapeError, f"{what} shape {tuple(p.shape)} does not match bottom[0] "
                                      f"dims {tuple(x.shape[axis:end])} at axis {axis}")
    outer = _count(x.shape, 0, axis)
    inner = _count(x.shape, end)
    y = op(x.reshape(outer, span, inner), p.reshape(1, span, 1))
    return y.reshape(x.shape)


# ---------------------------------------------------------------------------- InnerProduct
@register("InnerProduct")
class InnerProduct(Layer):
    """Fully connected: flattens dims from ``axis`` into K, ``y = x W^T + b``.

    Blobs: ``weight`` (N, K), or (K, N) with ``transpose: true``; ``bias`` (N,).
    Top shape: bottom dims before ``axis`` then N.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.inner_product_param
        if not p.HasField("num_output"):
            raise self.error(SchemaError, "inner_product_param.num_output is required")
        self.num_output = int(p.num_output)
        self.bias_term = bool(p.bias_term)
        self.transpose = bool(p.transpose)
        shape = bottom_shapes[0]
        self.axis = canonical_axis(p.axis, len(shape), layer=self.name)
        self.k = _count(shape, self.axis)
        n, k = self.num_output, self.k
        self.add_blob("weight", (k, n) if self.transpose else (n, k), p.weight_filler)
        if self.bias_term:
            self.add_blob("bias", (n,), p.bias_filler)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        axis = canonical_axis(self.param.inner_product_param.axis, x.dim(), layer=self.name)
        k = _count(x.shape, axis)
        if k != self.k:
            raise self.error(ShapeError, f"input size incompatible with inner product "
                                         f"parameters: expected K = {self.k} from axis {axis}, "
                                         f"got {k} (bottom {tuple(x.shape)})")
        x2 = x.reshape(_count(x.shape, 0, axis), k)
        w = self.weight if self.transpose else self.weight.t()
        y = x2 @ w
        if self.bias_term:
            y = y + self.bias
        return (y.reshape(tuple(x.shape[:axis]) + (self.num_output,)),)


# ---------------------------------------------------------------------------- BatchNorm
@register("BatchNorm")
class BatchNorm(Layer):
    """Caffe's BatchNorm: ``(x - mean) / sqrt(var + eps)`` per channel (axis 1), no affine part.

    Buffers, in Caffe's blob order, hold exactly what a caffemodel holds so round trips
    are bit exact: ``running_mean`` = blob 0 (a *sum* of batch means), ``running_var`` =
    blob 1 (sum of unbiased batch variances), ``scale_factor`` = blob 2, shape (1,) (the
    matching sum of moving-average weights).  The statistics used at run time are
    blob0 / blob2 and blob1 / blob2 (a zero scale factor gives zero statistics).

    ``use_global_stats`` defaults to ``phase == TEST``.  Without global stats the layer
    normalises with the batch mean and biased variance and, like Caffe, updates the buffers
    on every forward (under ``torch.no_grad``): ``blob2 = maf*blob2 + 1``,
    ``blob0 = maf*blob0 + mean``, ``blob1 = maf*blob1 + m/(m-1)*var`` with
    ``m = count / channels``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.batch_norm_param
        self.use_global_stats = bool(p.use_global_stats) if p.HasField("use_global_stats") \
            else ctx.phase == TEST
        self.moving_average_fraction = float(p.moving_average_fraction)
        self.eps = float(p.eps)
        shape = bottom_shapes[0]
        if len(shape) < 2:
            raise self.error(ShapeError, f"BatchNorm needs a bottom with a channel axis (axis 1), "
                                         f"got shape {tuple(shape)}")
        self.channels = int(shape[1])
        c = self.channels
        self.add_blob("running_mean", (c,), buffer=True, value=torch.zeros(c))
        self.add_blob("running_var", (c,), buffer=True, value=torch.zeros(c))
        self.add_blob("scale_factor", (1,), buffer=True, value=torch.zeros(1))

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise self.error(ShapeError, f"expected a bottom with {self.channels} channels on "
                                         f"axis 1, got shape {tuple(x.shape)}")
        bshape = (1, self.channels) + (1,) * (x.dim() - 2)
        if self.use_global_stats:
            sf = self.scale_factor.to(x.dtype).reshape(())
            inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
            mean = (self.running_mean.to(x.dtype) * inv).reshape(bshape)
            var = (self.running_var.to(x.dtype) * inv).reshape(bshape)
            # (x - mean) / std as one pass over x: x * (1/std) + (-mean/std).  Differs from
            # Caffe's two passes by rounding only (~1 ulp); the goldens hold it to 1e-5.
            inv_std = torch.rsqrt(var + self.eps)
            return (torch.addcmul(-mean * inv_std, x, inv_std),)
        dims = [0] + list(range(2, x.dim()))
        mean = x.mean(dim=dims, keepdim=True)
        xc = x - mean
        var = (xc * xc).mean(dim=dims, keepdim=True)
        if x.device.type != "meta":
            self._update_stats(x, mean.detach().reshape(-1), var.detach().reshape(-1))
        return (xc / torch.sqrt(var + self.eps),)

    @torch.no_grad()
    def _update_stats(self, x: Tensor, mean: Tensor, var: Tensor) -> None:
        maf = self.moving_average_fraction
        m = x.numel() // self.channels
        correction = m / (m - 1) if m > 1 else 1.0
        dt = self.running_mean.dtype
        self.scale_factor.mul_(maf).add_(1.0)
        self.running_mean.mul_(maf).add_(mean.to(dt))
        self.running_var.mul_(maf).add_(var.to(dt) * correction)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, channels={self.channels}, eps={self.eps:g}, "
                f"use_global_stats={self.use_global_stats}")


# ---------------------------------------------------------------------------- Scale / Bias
def _blob_span(layer: Layer, shape: Shape, axis_param: int, num_axes: int, what: str) -> Shape:
    """Shape of a learned Scale/Bias blob: bottom dims ``[axis, axis + num_axes)``."""
    axis = canonical_axis(axis_param, len(shape), layer=layer.name)
    if num_axes < -1:
        raise layer.error(SchemaError, "num_axes must be non-negative, or -1 to extend to the "
                                       f"end of bottom[0]; got {num_axes}")
    if num_axes >= 0 and len(shape) < axis + num_axes:
        raise layer.error(ShapeError, f"{what} blob's shape extends past bottom[0]'s shape "
                                      f"{tuple(shape)} when applied at axis {axis} with "
                                      f"num_axes {num_axes}")
    end = len(shape) if num_axes == -1 else axis + num_axes
    return tuple(int(d) for d in shape[axis:end])


def _param_axis(layer: Layer, axis_param: int, x: Tensor, p: Tensor) -> int:
    """Caffe uses axis 0 for a scalar (0-axis) scale/bias, else the canonical ``axis``."""
    if p.dim() == 0:
        return 0
    return canonical_axis(axis_param, x.dim(), layer=layer.name)


@register("Scale")
class Scale(Layer):
    """``y = x * s (+ b)``, ``s`` broadcast over bottom[0] from ``axis``.

    One bottom: ``s`` is the learned blob ``weight`` of shape bottom dims
    ``[axis, axis + num_axes)`` (filler default constant 1).  Two bottoms: ``s`` is
    bottom[1].  ``bias_term`` adds a learned ``bias`` shaped like Caffe's inner Bias layer
    (``num_axes`` = bottom[1]'s axis count in the two-bottom form; filler ``bias_filler``).
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.scale_param
        self.axis_param = int(p.axis)
        shape = bottom_shapes[0]
        if len(bottom_shapes) == 1:
            s_shape = _blob_span(self, shape, p.axis, int(p.num_axes), "scale")
            filler = p.filler if p.HasField("filler") else caffe_pb2.FillerParameter(
                type="constant", value=1.0)
            self.add_blob("weight", s_shape, filler)
        else:
            s = bottom_shapes[1]
            axis = 0 if len(s) == 0 else canonical_axis(p.axis, len(shape), layer=self.name)
            if len(shape) < axis + len(s) or _count(shape, axis, axis + len(s)) != _count(s):
                raise self.error(ShapeError, f"scale bottom[1] of shape {tuple(s)} does not fit "
                                             f"bottom[0] of shape {tuple(shape)} at axis {axis}")
        self.bias_term = bool(p.bias_term)
        if self.bias_term:
            nb = len(bottom_shapes[1]) if len(bottom_shapes) > 1 else int(p.num_axes)
            b_shape = _blob_span(self, shape, p.axis, nb, "bias")
            self.add_blob("bias", b_shape, p.bias_filler)

    def forward(self, x: Tensor, *scale: Tensor) -> Tuple[Tensor]:
        s = scale[0] if scale else self.weight
        axis = _param_axis(self, self.axis_param, x, s)
        if self.bias_term and self.bias.shape == s.shape and axis == _param_axis(self, self.axis_param, x, self.bias):
            # x * s + b in one pass (the common BatchNorm-then-Scale case)
            b = self.bias
            return (_apply_along(x, s, axis, lambda xv, sv: torch.addcmul(b.reshape(sv.shape), xv, sv),
                                 self, "scale"),)
        y = _apply_along(x, s, axis, torch.mul, self, "scale")
        if self.bias_term:
            y = _apply_along(y, self.bias, _param_axis(self, self.axis_param, y, self.bias),
                             torch.add, self, "bias")
        return (y,)


@register("Bias")
class Bias(Layer):
    """``y = x + b``, ``b`` broadcast over bottom[0] from ``axis`` (learned ``bias`` or bottom[1])."""

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bias_param
        self.axis_param = int(p.axis)
        shape = bottom_shapes[0]
        if len(bottom_shapes) == 1:
            self.add_blob("bias", _blob_span(self, shape, p.axis, int(p.num_axes), "bias"),
                          p.filler)
        else:
            self._check_bias_shape(tuple(shape), tuple(bottom_shapes[1]))

    def _check_bias_shape(self, shape: Shape, b: Shape) -> None:
        axis = 0 if len(b) == 0 else canonical_axis(self.axis_param, len(shape), layer=self.name)
        if tuple(shape[axis:axis + len(b)]) != tuple(b):
            raise self.error(ShapeError, f"bias bottom[1] of shape {b} does not match bottom[0] "
                                         f"dims {tuple(shape[axis:axis + len(b)])} at axis {axis}")

    def forward(self, x: Tensor, *bias: Tensor) -> Tuple[Tensor]:
        if bias:
            b = bias[0]
            self._check_bias_shape(tuple(x.shape), tuple(b.shape))
        else:
            b = self.bias
        return (_apply_along(x, b, _param_axis(self, self.axis_param, x, b), torch.add, self, "bias"),)


# ---------------------------------------------------------------------------- Eltwise
_ELT = caffe_pb2.EltwiseParameter


@register("Eltwise")
class Eltwise(Layer):
    """Element-wise SUM (with per-bottom ``coeff``), PROD or MAX of equally sized bottoms.

    MAX picks like Caffe's loop: bottom 1 unless bottom 0 is strictly greater, then each
    later bottom only where strictly greater; so on ties the gradient goes to bottom 1
    over bottom 0, and to the earlier bottom among the others.  Chained ``torch.where``
    routes gradients exactly that way.  PROD's gradient is the product of the other
    bottoms (Caffe's default ``stable_prod_grad``).
    """

    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.eltwise_param
        self.op = _enum_value(self, _ELT.EltwiseOp, p.operation, "eltwise operation")
        n = len(bottom_shapes)
        if len(p.coeff) not in (0, n):
            raise self.error(SchemaError, f"Eltwise takes one coefficient per bottom blob "
                                          f"({n}), got {len(p.coeff)}")
        if self.op == _ELT.PROD and len(p.coeff):
            raise self.error(SchemaError, "Eltwise only takes coefficients for summation (SUM)")
        self.coeffs: List[float] = [float(c) for c in p.coeff] if len(p.coeff) else [1.0] * n
        for i, s in enumerate(bottom_shapes[1:], 1):
            if _count(s) != _count(bottom_shapes[0]):
                raise self.error(ShapeError, f"bottom {i} has shape {tuple(s)}, expected the "
                                             f"shape of bottom 0 {tuple(bottom_shapes[0])}")

    def forward(self, *xs: Tensor) -> Tuple[Tensor]:
        shape = xs[0].shape
        for i, x in enumerate(xs[1:], 1):
            if x.numel() != xs[0].numel():
                raise self.error(ShapeError, f"bottom {i} has shape {tuple(x.shape)}, expected "
                                             f"{tuple(shape)}")
        xs = tuple(x if x.shape == shape else x.reshape(shape) for x in xs)
        if self.op == _ELT.SUM:
            y = xs[0] * self.coeffs[0] if self.coeffs[0] != 1.0 else xs[0]
            for c, x in zip(self.coeffs[1:], xs[1:]):
                y = y + (x * c if c != 1.0 else x)
            return (y,)
        if self.op == _ELT.PROD:
            y = xs[0] * xs[1]
            for x in xs[2:]:
                y = y * x
            return (y,)
        y = torch.where(xs[0] > xs[1], xs[0], xs[1])
        for x in xs[2:]:
            y = torch.where(x > y, x, y)
        return (y,)


# ---------------------------------------------------------------------------- plumbing
@register("Concat")
class Concat(Layer):
    """Concatenate along ``axis`` (or legacy non-negative ``concat_dim``)."""

    min_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.concat_param
        if p.HasField("axis") and p.HasField("concat_dim"):
            raise self.error(SchemaError, "either axis or concat_dim should be specified; not both")
        self._axis(len(bottom_shapes[0]))
        self._check_shapes([tuple(s) for s in bottom_shapes])

    def _axis(self, ndim: int) -> int:
        p = self.param.concat_param
        if p.HasField("concat_dim"):
            if not 0 <= p.concat_dim < ndim:
                raise self.error(ShapeError, f"concat_dim {p.concat_dim} out of range for a "
                                             f"{ndim}-D blob")
            return int(p.concat_dim)
        return canonical_axis(p.axis, ndim, layer=self.name)

    def _check_shapes(self, shapes: List[Shape]) -> int:
        axis = self._axis(len(shapes[0]))
        for i, s in enumerate(shapes[1:], 1):
            if len(s) != len(shapes[0]) or any(a != b for j, (a, b) in enumerate(zip(s, shapes[0]))
                                               if j != axis):
                raise self.error(ShapeError, f"all inputs must have the same shape except at "
                                             f"axis {axis}: bottom 0 {shapes[0]}, bottom {i} {s}")
        return axis

    def forward(self, *xs: Tensor) -> Tuple[Tensor]:
        axis = self._check_shapes([tuple(x.shape) for x in xs])
        if len(xs) == 1:
            return (xs[0].view_as(xs[0]),)
        return (torch.cat(xs, dim=axis),)


@register("Slice")
class Slice(Layer):
    """Split along ``axis`` (or legacy ``slice_dim``) at ``slice_point`` s; equal parts if none."""

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.slice_param
        if p.HasField("axis") and p.HasField("slice_dim"):
            raise self.error(SchemaError, "either axis or slice_dim should be specified; not both")
        self.points = [int(v) for v in p.slice_point]
        self.n_tops = len(param.top)
        self._sizes(tuple(bottom_shapes[0]))

    def _sizes(self, shape: Shape) -> Tuple[int, List[int]]:
        p = self.param.slice_param
        ndim = len(shape)
        if p.HasField("slice_dim"):
            if not 0 <= p.slice_dim < ndim:
                raise self.error(ShapeError, f"slice_dim {p.slice_dim} out of range for a "
                                             f"{ndim}-D blob")
            axis = int(p.slice_dim)
        else:
            axis = canonical_axis(p.axis, ndim, layer=self.name)
        dim = int(shape[axis])
        n = self.n_tops
        if self.points:
            if len(self.points) != n - 1:
                raise self.error(SchemaError, f"{len(self.points)} slice_point(s) need "
                                              f"{len(self.points) + 1} tops, got {n}")
            if n > dim:
                raise self.error(ShapeError, f"cannot slice axis {axis} of size {dim} into {n} tops")
            sizes, prev = [], 0
            for sp in self.points:
                if sp <= prev:
                    raise self.error(SchemaError, f"slice_point must be strictly increasing and "
                                                  f"positive, got {self.points}")
                sizes.append(sp - prev)
                prev = sp
            if dim - prev < 0:
                raise self.error(ShapeError, f"slice_point {prev} beyond axis {axis} of size {dim}")
            sizes.append(dim - prev)
        else:
            if dim % n:
                raise self.error(ShapeError, f"number of top blobs ({n}) should evenly divide "
                                             f"input slice axis ({dim})")
            sizes = [dim // n] * n
        return axis, sizes

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        axis, sizes = self._sizes(tuple(x.shape))
        if len(sizes) == 1:
            return (x.view_as(x),)
        return tuple(torch.split(x, sizes, dim=axis))


@register("Split")
class Split(Layer):
    """Copies of the bottom, one per top; the bottom's gradient is the sum of the tops' ones."""

    exact_bottoms = 1
    min_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        _no_in_place(self)
        self.n_tops = len(param.top)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        return tuple(x.view_as(x) for _ in range(self.n_tops))


@register("Flatten")
class Flatten(Layer):
    """Merge dims ``[axis, end_axis]`` into one (defaults 1 and -1)."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        _no_in_place(self)
        self._shape(tuple(bottom_shapes[0]))

    def _shape(self, shape: Shape) -> Shape:
        p = self.param.flatten_param
        a = canonical_axis(p.axis, len(shape), layer=self.name)
        e = canonical_axis(p.end_axis, len(shape), layer=self.name, what="end_axis")
        if e < a:
            raise self.error(ShapeError, f"end_axis ({p.end_axis}) comes before axis ({p.axis}) "
                                         f"for a {len(shape)}-D bottom")
        return tuple(shape[:a]) + (_count(shape, a, e + 1),) + tuple(shape[e + 1:])

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (x.reshape(self._shape(tuple(x.shape))),)


@register("Reshape")
class Reshape(Layer):
    """Replace dims ``[axis, axis + num_axes)`` by ``shape``: 0 copies a dim, one -1 is inferred."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        _no_in_place(self)
        dims = [int(d) for d in param.reshape_param.shape.dim]
        if sum(1 for d in dims if d == -1) > 1:
            raise self.error(SchemaError, f"new shape {dims} contains multiple -1 dims; at most "
                                          "one may be specified")
        if any(d < -1 for d in dims):
            raise self.error(SchemaError, f"new shape {dims} has a negative dim other than -1")
        self.dims = dims
        self._shape(tuple(bottom_shapes[0]))

    def _shape(self, shape: Shape) -> Shape:
        p = self.param.reshape_param
        nd = len(shape)
        start = p.axis if p.axis >= 0 else nd + p.axis + 1
        if not 0 <= start <= nd:
            raise self.error(ShapeError, f"axis {p.axis} out of range for a {nd}-D bottom")
        if p.num_axes < -1:
            raise self.error(SchemaError, f"num_axes must be >= 0, or -1 for all; got {p.num_axes}")
        end = nd if p.num_axes == -1 else start + p.num_axes
        if end > nd:
            raise self.error(ShapeError, f"axis + num_axes = {end} is out of range for a "
                                         f"{nd}-D bottom")
        new = list(shape[:start]) + list(self.dims) + list(shape[end:])
        inferred = None
        for i, d in enumerate(self.dims):
            if d == 0:
                if start + i >= nd:
                    raise self.error(ShapeError, f"new shape contains a 0 at position {i}, but "
                                                 "there is no corresponding bottom axis to copy")
                d0 = shape[start + i]  # a symbolic size stays one (torch.export)
                new[start + i] = d0 if isinstance(d0, torch.SymInt) else int(d0)
            elif d == -1:
                inferred = start + i
        total = _count(shape)
        if inferred is not None:
            known = math.prod(d for j, d in enumerate(new) if j != inferred)
            if known == 0 or total % known:
                raise self.error(ShapeError, f"bottom count ({total}) must be divisible by the "
                                             f"product of the specified dimensions ({known})")
            new[inferred] = total // known
        if math.prod(new) != total:
            raise self.error(ShapeError, f"cannot reshape bottom {tuple(shape)} (count {total}) "
                                         f"to {tuple(new)}: output count must match input count")
        return tuple(new)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (x.reshape(self._shape(tuple(x.shape))),)


@register("Crop")
class Crop(Layer):
    """Crop bottom[0] to bottom[1]'s shape on dims from ``axis`` (default 2) at ``offset`` s."""

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.crop_param
        nd = len(bottom_shapes[0])
        self.start = canonical_axis(p.axis, nd, layer=self.name)
        self.offsets_param = [int(o) for o in p.offset]
        if len(self.offsets_param) > 1 and self.start + len(self.offsets_param) != nd:
            raise self.error(SchemaError, f"{len(self.offsets_param)} offsets given, expected one "
                                          f"or one per dimension from axis {self.start} "
                                          f"({nd - self.start})")
        self._window(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))

    def _window(self, a: Shape, b: Shape) -> List[slice]:
        if len(b) < len(a):  # Caffe reads bottom[1]'s dims up to bottom[0]'s last axis
            raise self.error(ShapeError, f"bottom[1] must have at least as many axes as "
                                         f"bottom[0] {a}, got {b}")
        out = []
        for i in range(len(a)):
            if i < self.start:
                out.append(slice(None))
                continue
            if len(self.offsets_param) == 1:
                off = self.offsets_param[0]
            elif self.offsets_param:
                off = self.offsets_param[i - self.start]
            else:
                off = 0
            if a[i] - off < b[i]:
                raise self.error(ShapeError, f"the crop for dimension {i} is out of bounds with "
                                             f"size {b[i]} and offset {off} (bottom size {a[i]})")
            out.append(slice(off, off + b[i]))
        return out

    def forward(self, x: Tensor, ref: Tensor) -> Tuple[Tensor]:
        return (x[tuple(self._window(tuple(x.shape), tuple(ref.shape)))],)


@register("Tile")
class Tile(Layer):
    """Repeat the whole block of dims from ``axis`` ``tiles`` times along ``axis``."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.tile_param
        if not p.HasField("tiles"):
            raise self.error(SchemaError, "tile_param.tiles must be specified")
        if p.tiles <= 0:
            raise self.error(SchemaError, f"number of tiles must be positive, got {p.tiles}")
        self.tiles = int(p.tiles)
        canonical_axis(p.axis, len(bottom_shapes[0]), layer=self.name)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        axis = canonical_axis(self.param.tile_param.axis, x.dim(), layer=self.name)
        reps = [1] * x.dim()
        reps[axis] = self.tiles
        return (x.repeat(*reps),)


# ---------------------------------------------------------------------------- Reduction
_RED = caffe_pb2.ReductionParameter


@register("Reduction")
class Reduction(Layer):
    """SUM, ASUM, SUMSQ or MEAN over all dims from ``axis`` (default 0), times ``coeff``.

    The top keeps the dims before ``axis`` (axis 0 gives a 0-axis scalar blob).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.reduction_param
        self.op = _enum_value(self, _RED.ReductionOp, p.operation, "reduction operation")
        self.coeff = float(p.coeff)
        canonical_axis(p.axis, len(bottom_shapes[0]), layer=self.name)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        axis = canonical_axis(self.param.reduction_param.axis, x.dim(), layer=self.name)
        num, dim = _count(x.shape, 0, axis), _count(x.shape, axis)
        x2 = x.reshape(num, dim)
        coeff = self.coeff
        if self.op == _RED.ASUM:
            y = x2.abs().sum(1)
        elif self.op == _RED.SUMSQ:
            y = (x2 * x2).sum(1)
        else:
            y = x2.sum(1)
            if self.op == _RED.MEAN:
                # Caffe divides the (float) coefficient by dim once, in the blob's dtype
                coeff = float(torch.tensor(coeff, dtype=x.dtype) / dim) if dim else coeff
        if coeff != 1.0:
            y = y * coeff
        return (y.reshape(tuple(x.shape[:axis])),)


# ---------------------------------------------------------------------------- MVN
class _MVNNormalize(torch.autograd.Function):
    """Rows of ``x`` to zero mean and unit std, ``(x - mean) / (std + eps)``.

    Caffe's backward is ``(g - mean(g) - y * mean(y * g)) / (std + eps)``, which drops
    a ``(std + eps) / std`` factor of the true gradient: the two agree only for eps -> 0,
    so the backward is Caffe's formula, written out.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:  # type: ignore[override]
        xc = x - x.mean(dim=1, keepdim=True)
        std = (xc * xc).mean(dim=1, keepdim=True).sqrt() + eps
        y = xc / std
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        y, std = ctx.saved_tensors
        gx = (g - g.mean(dim=1, keepdim=True) - y * (y * g).mean(dim=1, keepdim=True)) / std
        return gx, None


@register("MVN")
class MVN(Layer):
    """Mean-variance normalisation per (item, channel), or per item with ``across_channels``.

    ``eps`` (default 1e-9) is added to the standard deviation, not the variance.  Caffe
    reads the bottom through its legacy 4-D accessors, so bottoms have at most 4 axes and
    the top is always 4-D ``(num, channels, height, width)`` (missing dims are 1).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.mvn_param
        self.normalize_variance = bool(p.normalize_variance)
        self.across_channels = bool(p.across_channels)
        self.eps = float(p.eps)
        self._legacy_shape(tuple(bottom_shapes[0]))

    def _legacy_shape(self, shape: Shape) -> Shape:
        if len(shape) > 4:
            raise self.error(ShapeError, f"MVN takes blobs of at most 4 axes (Caffe's legacy "
                                         f"accessors), got shape {shape}")
        return tuple(shape) + (1,) * (4 - len(shape))

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        shape4 = self._legacy_shape(tuple(x.shape))
        rows = shape4[0] if self.across_channels else shape4[0] * shape4[1]
        x2 = x.reshape(rows, -1) if rows else x.reshape(0, 0)
        if self.normalize_variance:
            y = _MVNNormalize.apply(x2, self.eps)
        else:
            y = x2 - x2.mean(dim=1, keepdim=True)
        return (y.reshape(shape4),)


# ---------------------------------------------------------------------------- ArgMax
@register("ArgMax")
class ArgMax(Layer):
    """Indices (and/or values) of the ``top_k`` largest entries; no gradient.

    Without ``axis``: per item over all dims after 0, top shape ``(N, 1 or 2, top_k)``
    padded with 1s to the bottom's axis count; with ``out_max_val`` channel 0 holds the
    indices and channel 1 the values.  With ``axis``: that dim becomes ``top_k`` and the
    top holds values if ``out_max_val`` else indices.  Ties: Caffe sorts (value, index)
    pairs in descending order, so among equal values the *larger* index comes first.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.argmax_param
        self.out_max_val = bool(p.out_max_val)
        self.top_k = int(p.top_k)
        self.has_axis = p.HasField("axis")
        if self.top_k < 1:
            raise self.error(SchemaError, f"top_k must not be less than 1, got {self.top_k}")
        shape = tuple(bottom_shapes[0])
        if self.has_axis:
            axis = canonical_axis(p.axis, len(shape), layer=self.name)
            if self.top_k > shape[axis]:
                raise self.error(ShapeError, f"top_k ({self.top_k}) must be less than or equal to "
                                             f"the dimension of axis {axis} ({shape[axis]})")
        elif self.top_k > _count(shape, 1):
            raise self.error(ShapeError, f"top_k ({self.top_k}) must be less than or equal to the "
                                         f"size of one item ({_count(shape, 1)})")

    def _sorted(self, x: Tensor, dim: int) -> Tuple[Tensor, Tensor]:
        """Top-k values and indices along ``dim`` with Caffe's tie order (larger index first)."""
        n = x.shape[dim]
        vals, idx = torch.sort(x.flip(dim), dim=dim, descending=True, stable=True)
        k = self.top_k
        return vals.narrow(dim, 0, k), (n - 1 - idx.narrow(dim, 0, k)).to(x.dtype)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        x = x.detach()
        if self.has_axis:
            axis = canonical_axis(self.param.argmax_param.axis, x.dim(), layer=self.name)
            vals, idx = self._sorted(x, axis)
            return (vals if self.out_max_val else idx,)
        n = x.shape[0]
        vals, idx = self._sorted(x.reshape(n, -1), 1)
        y = torch.stack([idx, vals], dim=1) if self.out_max_val else idx.unsqueeze(1)
        shape = [1] * max(x.dim(), 3)
        shape[0], shape[1], shape[2] = n, y.shape[1], self.top_k
        return (y.reshape(shape),)


# ---------------------------------------------------------------------------- Softmax
@register("Softmax")
class Softmax(Layer):
    """Softmax along ``axis`` (default 1)."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        canonical_axis(param.softmax_param.axis, len(bottom_shapes[0]), layer=self.name)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        axis = canonical_axis(self.param.softmax_param.axis, x.dim(), layer=self.name)
        return (torch.softmax(x, dim=axis),)


# ---------------------------------------------------------------------------- Embed
@register("Embed")
class Embed(Layer):
    """Table lookup: each bottom value (an integer stored as float) selects a row.

    Blobs: ``weight`` (input_dim, num_output) (transposed from InnerProduct), ``bias``
    (num_output,).  Top shape: bottom shape + (num_output,).  No gradient to the indices
    (Caffe refuses to backpropagate to them).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.embed_param
        self.num_output = int(p.num_output)
        self.input_dim = int(p.input_dim)
        if self.num_output <= 0:
            raise self.error(SchemaError, "embed_param.num_output must be positive")
        if self.input_dim <= 0:
            raise self.error(SchemaError, "embed_param.input_dim must be positive")
        self.bias_term = bool(p.bias_term)
        self.add_blob("weight", (self.input_dim, self.num_output), p.weight_filler)
        if self.bias_term:
            self.add_blob("bias", (self.num_output,), p.bias_filler)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        idx = x.detach().to(torch.long)  # static_cast<int>: truncation toward zero
        if idx.device.type != "meta" and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.input_dim:
                raise self.error(ShapeError, f"embedding index out of range [0, {self.input_dim}): "
                                             f"got values from {lo} to {hi}")
        y = F.embedding(idx, self.weight)
        if self.bias_term:
            y = y + self.bias
        return (y,)


# ---------------------------------------------------------------------------- Filter
@register("Filter")
class Filter(Layer):
    """Keep the items (along axis 0) whose selector (the last bottom) is non-zero.

    Tops correspond to all bottoms but the selector.  The number of kept items depends on
    the data, so ``infer_top_shapes`` reports the bottoms' shapes as an upper bound
    (Caffe itself reshapes on every forward).
    """

    min_bottoms = 2
    min_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if len(param.top) != len(bottom_shapes) - 1:
            raise self.error(GraphError, f"Filter needs one top per filtered bottom "
                                         f"({len(bottom_shapes) - 1}), got {len(param.top)}")
        self._check([tuple(s) for s in bottom_shapes])

    def _check(self, shapes: List[Shape]) -> None:
        sel = shapes[-1]
        if len(sel) == 0 or any(d != 1 for d in sel[1:]):
            raise self.error(ShapeError, f"selector blob dimensions must be singletons (1) except "
                                         f"the first, got shape {sel}")
        for i, s in enumerate(shapes[:-1]):
            if len(s) == 0 or s[0] != sel[0]:
                raise self.error(ShapeError, f"bottom {i} of shape {s} must have the selector's "
                                             f"0th dimension {sel[0]}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check([tuple(s) for s in bottom_shapes])
        return [tuple(int(d) for d in s) for s in bottom_shapes[:-1]]

    def forward(self, *xs: Tensor) -> Tuple[Tensor, ...]:
        self._check([tuple(x.shape) for x in xs])
        sel = xs[-1].detach().reshape(-1)
        keep = torch.nonzero(sel != 0).reshape(-1)
        return tuple(x.index_select(0, keep) for x in xs[:-1])


# ---------------------------------------------------------------------------- Silence etc.
@register("Silence")
class Silence(Layer):
    """Consumes its bottoms so they are not net outputs; no tops, no gradient."""

    min_bottoms = 1
    exact_tops = 0

    def forward(self, *xs: Tensor) -> Tuple[Tensor, ...]:
        return ()


@register("Parameter")
class Parameter(Layer):
    """A learnable blob ``blob`` of ``parameter_param.shape`` (zeros until loaded) as the top."""

    exact_bottoms = 0
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        shape = tuple(int(d) for d in param.parameter_param.shape.dim)
        self.add_blob("blob", shape)

    def forward(self) -> Tuple[Tensor]:
        return (self.blob.view_as(self.blob),)


@register("BatchReindex")
class BatchReindex(Layer):
    """``top[i] = bottom[0][bottom[1][i]]`` along axis 0; no gradient to the 1-D index bottom."""

    exact_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self._check(tuple(bottom_shapes[0]), tuple(bottom_shapes[1]))

    def _check(self, a: Shape, idx: Shape) -> None:
        if len(idx) != 1:
            raise self.error(ShapeError, f"the index bottom must be 1-D, got shape {idx}")
        if len(a) == 0:
            raise self.error(ShapeError, "bottom[0] must have at least one axis")

    def forward(self, x: Tensor, index: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape), tuple(index.shape))
        idx = index.detach().to(torch.long)
        if idx.device.type != "meta" and idx.numel():
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= x.shape[0]:
                raise self.error(ShapeError, f"reindex index out of range [0, {x.shape[0]}): "
                                             f"got values from {lo} to {hi}")
        return (x.index_select(0, idx),)


# ---------------------------------------------------------------------------- fork layers
@register("ShuffleChannel")
class ShuffleChannel(Layer):
    """ShuffleNet's channel shuffle (farmingyard/ShuffleNet @
    b9624442bd410bbd2aadc820122b138e63039d70, ``shuffle_channel_layer.cpp``).

    ``shuffle_channel_param { group }``: the channels, seen as a ``group x (C / group)``
    matrix, are transposed: input channel ``i * (C / group) + j`` becomes output channel
    ``j * group + i``.  The fork's backward applies the inverse permutation, which is
    autograd's.  ``group`` must be positive and divide ``C`` (the fork's CHECKs).  The top
    has the fork's legacy 4-D shape ``(num, channels, height, width)``: a 2-D or 3-D bottom
    gains trailing 1s; more than 4 axes is an error, as in the fork.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.group = int(param.shuffle_channel_param.group)
        if self.group <= 0:
            raise self.error(SchemaError, f"shuffle_channel_param.group must be > 0, got "
                                          f"{self.group}")
        self._check(tuple(bottom_shapes[0]))

    def _check(self, shape: Shape) -> Shape:
        if not 2 <= len(shape) <= 4:
            raise self.error(ShapeError, f"ShuffleChannel needs a bottom with 2 to 4 axes "
                                         f"(N, C[, H[, W]]), got {shape}")
        c = int(shape[1])
        if c % self.group:
            raise self.error(ShapeError, f"{c} channels cannot be split into "
                                         f"shuffle_channel_param.group {self.group} groups")
        return tuple(int(d) for d in shape) + (1,) * (4 - len(shape))

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        n, c, h, w = self._check(tuple(x.shape))
        y = x.reshape(n, self.group, c // self.group, h, w).transpose(1, 2)
        return (y.reshape(n, c, h, w),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, group={self.group}"


@register("Axpy")
class Axpy(Layer):
    """SENet's fused channel scale + shortcut (hujie-frank/SENet @
    0262d43d44c561fd53c3dba210cc8bacfc60500d, ``axpy_layer.cpp``/``.cu``).

    Bottoms ``a`` (N, C) or (N, C, 1, 1), ``x`` and ``y`` (N, C, ...), same shape; top
    ``a * x + y`` of ``x``'s shape.  The fork's backward is the exact gradient: ``a``
    gets ``sum over the spatial positions of dtop * x`` (its gemv / block reduction),
    ``x`` gets ``a * dtop`` and ``y`` gets ``dtop``, so autograd gives it.

    Checks are the fork's Reshape CHECKs (batch and channel of ``a`` and ``x`` agree; a 4-D
    ``a`` is 1 x 1; ``x`` and ``y`` have one shape), plus: ``a`` holds exactly N * C values
    (the fork would read the first N * C of a larger blob).  Running in place on ``a`` or
    ``x`` is refused: the fork's CPU forward then overwrites ``x`` with ``y`` before adding
    (in place on ``y``, the usual residual form, is fine).
    """

    exact_bottoms = 3
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if self.top_names and self.top_names[0] in self.bottom_names[:2]:
            raise self.error(GraphError, f"Axpy cannot run in place on its scale or x bottom "
                                         f"('{self.top_names[0]}'); only on y")
        self._check(*[tuple(s) for s in bottom_shapes])

    def _check(self, a: Shape, x: Shape, y: Shape) -> None:
        if len(a) < 2 or len(x) < 2:
            raise self.error(ShapeError, f"Axpy needs a scale (N, C[, 1, 1]) and x (N, C, ...) "
                                         f"with at least 2 axes, got {a} and {x}")
        if a[0] != x[0] or a[1] != x[1]:
            raise self.error(ShapeError, f"scale shape {a} must match x {x} in batch and "
                                         "channels")
        if len(a) == 4 and (a[2] != 1 or a[3] != 1):
            raise self.error(ShapeError, f"a 4-D scale must be (N, C, 1, 1), got {a}")
        if _count(a) != _count(x, 0, 2):
            raise self.error(ShapeError, f"scale shape {a} must hold one value per (n, c) of "
                                         f"x {x}")
        if tuple(x) != tuple(y):
            raise self.error(ShapeError, f"x {x} and y {y} must have the same shape")

    def forward(self, a: Tensor, x: Tensor, y: Tensor) -> Tuple[Tensor]:
        self._check(tuple(a.shape), tuple(x.shape), tuple(y.shape))
        scale = a.reshape(tuple(x.shape[:2]) + (1,) * (x.dim() - 2))
        return (scale * x + y,)
