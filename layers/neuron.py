"""Neuron layers: one bottom, one top of the same shape, applied elementwise.

Each layer is a thin module over one torch expression.  Autograd gives Caffe's backward
wherever Caffe's backward is the derivative of its forward; the exceptions are spelled out:

- ``Power``: Caffe divides ``y / (shift + scale * x)`` in backward, so its gradient is NaN/inf
  where the base is 0 (and exactly 0 when ``power * scale == 0``); ``_CaffePower`` copies that.
- ``Clip``: the gradient passes where ``min <= x <= max`` (bounds included), BVLC master.
- ``ReLU6`` (the YOLO ports): the fork's backward ignores the cap at 6 on the negative-slope
  side, and is 0 at exactly 6; the forward builds that gradient in.
- ``Threshold``: Caffe has no backward (it aborts); here the top is not differentiable,
  i.e. the bottom gets a zero gradient.
- In-place (top == bottom) layers whose Caffe backward reads the bottom (then holding the
  top) reproduce that: e.g. in-place Clip passes the gradient unchanged (the top is always
  within the bounds), in-place ReLU with a negative slope uses the sign of the top.
- ``Dropout``: inverted dropout at TRAIN; the Fast R-CNN fork's ``scale_train: false``
  keeps the train output unscaled and multiplies by ``1 - p`` at TEST instead.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import TRAIN, Layer
from caffe_compat.layers.registry import register
from caffe_compat.protos import caffe_pb2

__all__ = [
    "ReLU", "ReLU6", "PReLU", "ELU", "Sigmoid", "TanH", "AbsVal", "Power", "Exp", "Log", "BNLL",
    "Threshold", "Clip", "Swish", "Dropout", "caffe_power", "random_uniform",
]


def random_uniform(shape, like: Tensor, generator: Optional[torch.Generator]) -> Tensor:
    """U[0, 1) numbers of ``shape`` on ``like``'s device/dtype from ``generator`` (any device)."""
    if generator is None or generator.device == like.device:
        return torch.rand(shape, generator=generator, dtype=like.dtype, device=like.device)
    return torch.rand(shape, generator=generator, dtype=like.dtype,
                      device=generator.device).to(like.device)


class _InPlaceGrad(torch.autograd.Function):
    """Top ``y`` (already computed) whose bottom gradient is ``layer.caffe_inplace_diff(y, dy)``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, layer: "_Neuron") -> Tensor:
        ctx.layer = layer
        ctx.save_for_backward(y)
        return y.clone()

    @staticmethod
    def backward(ctx, dy: Tensor):
        (y,) = ctx.saved_tensors
        return ctx.layer.caffe_inplace_diff(y, dy), None, None


class _Neuron(Layer):
    """Caffe's NeuronLayer: exactly one bottom and one top of the bottom's shape.

    In-place (top == bottom) Caffe overwrites the bottom with the top, so a backward that
    reads ``bottom_data`` reads the top instead (and bottom diff aliases top diff).  Layers
    whose Caffe backward does that override ``caffe_local_grad(bottom_data, top_data)``
    (Caffe's dtop/dbottom factor) and set ``inplace_differs`` where the result can differ;
    ``_finish`` then routes the gradient as Caffe would (``caffe_inplace_diff``).
    """

    exact_bottoms = 1
    exact_tops = 1
    inplace_differs = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.inplace = len(param.bottom) == 1 and len(param.top) == 1 \
            and param.bottom[0] == param.top[0]

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None):
        """Caffe's ``NeuronLayer::Reshape``: the top is shaped like the bottom (no run on meta
        tensors: a net of 200,000 neurons builds in seconds; the net checks every top)."""
        return [tuple(int(d) for d in bottom_shapes[0])]

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def caffe_inplace_diff(self, y: Tensor, dy: Tensor) -> Tensor:
        """Caffe's bottom diff when run in place (bottom data is the top ``y``)."""
        return dy * self.caffe_local_grad(y, y)

    def _finish(self, x: Tensor, y: Tensor) -> Tuple[Tensor]:
        if self.inplace and self.inplace_differs and x.requires_grad and torch.is_grad_enabled():
            return (_InPlaceGrad.apply(x, y.detach(), self),)
        return (y,)


@register("ReLU")
class ReLU(_Neuron):
    """``max(x, 0) + negative_slope * min(x, 0)``; gradient at 0 is ``negative_slope``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.negative_slope = float(param.relu_param.negative_slope)
        self.inplace_differs = self.negative_slope < 0  # then sign(top) != sign(bottom)

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        return torch.where(b > 0, torch.ones_like(b), torch.full_like(b, self.negative_slope))

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        # F.relu's gradient at 0 is 0 and F.leaky_relu's is the slope: both are Caffe's.
        if self.negative_slope == 0.0:
            return (F.relu(x),)
        return self._finish(x, F.leaky_relu(x, self.negative_slope))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, negative_slope={self.negative_slope}"


@register("ReLU6")
class ReLU6(_Neuron):
    """The YOLO/MobileNet ports' ReLU6 (eric612/MobileNet-YOLO @
    69b4441cb3ec8d553fbdef788ad033e246f901bd, ``relu6_layer.cpp``/``.cu``).

    ``relu6_param`` is a ReLUParameter there and its ``negative_slope`` is honoured:
    ``y = min(max(x, 0) + negative_slope * min(x, 0), 6)``.  The fork's backward is
    ``dy * (x > 0 ? 1 : negative_slope) * (x < 6)``: the slope at exactly 0, zero at exactly 6,
    and, with a negative slope whose ``slope * x`` reaches the cap, still the slope (the
    backward ignores that cap).  The forward below builds that gradient into the graph.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.negative_slope = float(param.relu6_param.negative_slope)
        # in place the fork's backward reads the top: only a negative slope changes its sign
        self.inplace_differs = self.negative_slope < 0

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        slope = torch.where(b > 0, torch.ones_like(b), torch.full_like(b, self.negative_slope))
        return slope * (b < 6).to(b.dtype)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        xd = x.detach()
        six = torch.full_like(xd, 6.0)
        lin = x * self.negative_slope  # the x <= 0 branch, gradient = slope
        lin_d = lin.detach()
        # slope * x above 6 (negative slope only): value 6, gradient still the slope
        neg = torch.where(lin_d > 6, (lin - lin_d) + six, lin)
        pos = torch.where(xd < 6, x, six)  # 6 and above: constant, gradient 0
        return self._finish(x, torch.where(xd > 0, pos, neg))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, negative_slope={self.negative_slope}"


@register("PReLU")
class PReLU(_Neuron):
    """ReLU with a learned slope per channel (axis 1) or one shared slope.

    Blob 0 ``weight``: shape ``(C,)``, or ``()`` (a 0-axis blob, as Caffe) when
    ``channel_shared``; filled with constant 0.25 unless ``prelu_param.filler`` is given.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        pp = param.prelu_param
        shape = tuple(bottom_shapes[0])
        if len(shape) < 2:
            raise self.error(ShapeError, f"PReLU needs a bottom with at least 2 axes, got {shape}")
        self.channel_shared = bool(pp.channel_shared)
        self.channels = int(shape[1])
        if pp.HasField("filler"):
            filler = pp.filler
        else:
            filler = caffe_pb2.FillerParameter(type="constant", value=0.25)
        self.add_blob("weight", () if self.channel_shared else (self.channels,), filler)

    infer_top_shapes = Layer.infer_top_shapes  # a reshape must keep its channels: run forward

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() < 2:
            raise self.error(ShapeError, f"PReLU needs at least 2 axes, got {tuple(x.shape)}")
        if self.channel_shared:
            w = self.weight.reshape(())
        else:
            if x.shape[1] != self.channels:
                raise self.error(ShapeError, f"expected {self.channels} channels on axis 1, "
                                             f"got shape {tuple(x.shape)}")
            w = self.weight.reshape((1, self.channels) + (1,) * (x.dim() - 2))
        # where(): slope gradient sum(dy * x * [x <= 0]), bottom gradient slope at x <= 0.
        return (torch.where(x > 0, x, x * w.to(x.dtype)),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, channel_shared={self.channel_shared}"


@register("ELU")
class ELU(_Neuron):
    """``max(x, 0) + alpha * (exp(min(x, 0)) - 1)``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.alpha = float(param.elu_param.alpha)
        self.inplace_differs = self.alpha < 0

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        return torch.where(b > 0, torch.ones_like(b), y + self.alpha)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return self._finish(x, F.elu(x, self.alpha))


@register("Sigmoid")
class Sigmoid(_Neuron):
    """Logistic function."""

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (torch.sigmoid(x),)


@register("TanH")
class TanH(_Neuron):
    """Hyperbolic tangent."""

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (torch.tanh(x),)


@register("AbsVal")
class AbsVal(_Neuron):
    """``|x|``; gradient ``sign(x)`` (0 at 0).  Caffe refuses in-place AbsVal."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if self.inplace:
            raise self.error(GraphError, "AbsVal does not allow in-place computation")

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (torch.abs(x),)


@register("BNLL")
class BNLL(_Neuron):
    """Binomial normal log likelihood ``log(1 + exp(x))`` (softplus), gradient sigmoid(x)."""

    inplace_differs = True

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        e = torch.exp(b.clamp_max(50.0))
        return e / (e + 1.0)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return self._finish(x, F.softplus(x))


class _CaffePower(torch.autograd.Function):
    """``(shift + scale * x) ** power`` with Caffe's backward formulas (power not 0 or 1).

    Caffe computes ``dy/dx`` as ``power * y / x`` (shift 0) or
    ``power * scale * y / (shift + scale * x)``; this differs from the derivative only where
    the base is 0 (NaN or inf instead of 0 or inf), which we reproduce on purpose.
    ``power == 2`` uses the exact ``2 * scale * (shift + scale * x)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, power: float, scale: float, shift: float) -> Tensor:
        base = x
        if scale != 1.0:
            base = base * scale
        if shift != 0.0:
            base = base + shift
        y = base.pow(power)
        ctx.power, ctx.scale, ctx.shift = power, scale, shift
        ctx.save_for_backward(x, y)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, y = ctx.saved_tensors
        return dy * _caffe_power_factor(x, y, ctx.power, ctx.scale, ctx.shift), None, None, None


def _caffe_power_factor(x: Tensor, y: Tensor, power: float, scale: float, shift: float) -> Tensor:
    """Caffe's PowerLayer dy/dx from bottom data ``x`` and top data ``y``."""
    diff_scale = power * scale
    if diff_scale == 0.0 or power == 1.0:
        return torch.full_like(x, diff_scale)
    if power == 2.0:
        d = x * (diff_scale * scale)
        if shift != 0.0:
            d = d + diff_scale * shift
        return d
    if shift == 0.0:
        return (y / x) * power
    base = x
    if scale != 1.0:
        base = base * scale
    d = y / (base + shift)
    if diff_scale != 1.0:
        d = d * diff_scale
    return d


def caffe_power(x: Tensor, power: float, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    """Caffe's Power layer as a function: ``(shift + scale * x) ** power``, Caffe's gradient."""
    if power * scale == 0.0:
        # Caffe ignores the input: constant top, zero bottom gradient (even for inf/NaN x).
        with np.errstate(all="ignore"):  # C pow: 0 ** -1 = inf, (-1) ** 0.5 = NaN
            value = 1.0 if power == 0.0 else float(np.power(np.float64(shift), power))
        return torch.where(torch.zeros_like(x, dtype=torch.bool), x, torch.full_like(x, value))
    if power == 1.0:
        y = x
        if scale != 1.0:
            y = y * scale
        if shift != 0.0:
            y = y + shift
        return y
    return _CaffePower.apply(x, power, scale, shift)


@register("Power")
class Power(_Neuron):
    """``(shift + scale * x) ** power`` (see ``caffe_power`` for the gradient)."""

    inplace_differs = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.power_param
        self.power, self.scale, self.shift = float(p.power), float(p.scale), float(p.shift)

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        return _caffe_power_factor(b, y, self.power, self.scale, self.shift)

    def caffe_inplace_diff(self, y: Tensor, dy: Tensor) -> Tensor:
        # In place, Caffe writes the factor into bottom diff (= top diff) before multiplying
        # by top diff: the result is factor ** 2 and ignores the incoming gradient.
        return self.caffe_local_grad(y, y).square()

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return self._finish(x, caffe_power(x, self.power, self.scale, self.shift))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, power={self.power}, scale={self.scale}, shift={self.shift}"


def _log_base(layer: Layer, base: float) -> float:
    """``log(base)``; base -1 means e.  Caffe rejects base <= 0 and base 1 (for Log)."""
    if base == -1.0:
        return 1.0
    if not base > 0.0:
        raise layer.error(SchemaError, f"base must be strictly positive (or -1 for e), got {base}")
    return math.log(base)


@register("Exp")
class Exp(_Neuron):
    """``base ** (shift + scale * x)``, computed as Caffe: ``outer * exp(inner * x)``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.exp_param
        base, scale, shift = float(p.base), float(p.scale), float(p.shift)
        self.inner_scale = _log_base(self, base) * scale
        if shift == 0.0:
            self.outer_scale = 1.0
        else:
            self.outer_scale = math.pow(base, shift) if base != -1.0 else math.exp(shift)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        y = torch.exp(x if self.inner_scale == 1.0 else x * self.inner_scale)
        if self.outer_scale != 1.0:
            y = y * self.outer_scale
        return (y,)


@register("Log")
class Log(_Neuron):
    """``log_base(shift + scale * x)``; base -1 means e."""

    inplace_differs = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.log_param
        log_base = _log_base(self, float(p.base))
        if log_base == 0.0:
            raise self.error(SchemaError, "base 1 has no logarithm (1 / log(base) is infinite)")
        self.base_scale = 1.0 / log_base
        self.scale, self.shift = float(p.scale), float(p.shift)
        self.backward_num_scale = self.scale / log_base

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        return self.backward_num_scale / (b * self.scale + self.shift)

    def caffe_inplace_diff(self, y: Tensor, dy: Tensor) -> Tensor:
        # As Power: in place, Caffe's bottom diff overwrites the top diff before the product.
        return self.caffe_local_grad(y, y).square()

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        u = x
        if self.scale != 1.0:
            u = u * self.scale
        if self.shift != 0.0:
            u = u + self.shift
        y = torch.log(u)
        if self.base_scale != 1.0:
            y = y * self.base_scale
        return self._finish(x, y)


@register("Threshold")
class Threshold(_Neuron):
    """``1 if x > threshold else 0``.

    Caffe has no backward for this layer (it aborts if asked); the top here carries no
    gradient, so whatever is below it receives zero gradient through it.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.threshold = float(param.threshold_param.threshold)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return ((x.detach() > self.threshold).to(x.dtype),)


@register("Clip")
class Clip(_Neuron):
    """BVLC master: ``max(min, min(x, max))``; gradient passes where ``min <= x <= max``.

    The forward follows C++ ``std::max``/``std::min`` exactly (NaN becomes ``min``).
    """

    inplace_differs = True

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.clip_param
        if not (p.HasField("min") and p.HasField("max")):
            raise self.error(SchemaError, "Clip needs clip_param { min: ... max: ... }")
        self.min, self.max = float(p.min), float(p.max)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        xd = x.detach()
        m = torch.where(xd > self.max, torch.full_like(xd, self.max), xd)     # std::min(x, max)
        clipped = torch.where(m > self.min, m, torch.full_like(xd, self.min))  # std::max(min, m)
        passes = (xd >= self.min) & (xd <= self.max)
        return self._finish(x, torch.where(passes, x, clipped))

    def caffe_local_grad(self, b: Tensor, y: Tensor) -> Tensor:
        return ((b >= self.min) & (b <= self.max)).to(b.dtype)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, min={self.min}, max={self.max}"


@register("Swish")
class Swish(_Neuron):
    """BVLC master: ``x * sigmoid(beta * x)``."""

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.beta = float(param.swish_param.beta)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        return (x * torch.sigmoid(x * self.beta if self.beta != 1.0 else x),)


@register("Dropout")
class Dropout(_Neuron):
    """Dropout with Caffe's phase handling.

    TRAIN: keep each element with probability ``1 - p`` and scale kept ones by
    ``1 / (1 - p)``; TEST: identity.  With the Fast R-CNN fork's ``scale_train: false``,
    TRAIN does not scale and TEST multiplies by ``1 / scale = 1 - p``.  The mask comes from
    the build context's generator.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        dp = param.dropout_param
        self.ratio = float(dp.dropout_ratio)
        if not 0.0 <= self.ratio < 1.0:
            raise self.error(SchemaError, f"dropout_ratio must be in [0, 1), got {self.ratio}")
        # Caffe: float scale_ = 1. / (1. - threshold_)
        self.scale = float(np.float32(1.0 / (1.0 - self.ratio)))
        self.scale_train = bool(dp.scale_train)

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if self.phase == TRAIN:
            if x.device.type == "meta":
                return (x * 1.0,)
            keep = random_uniform(x.shape, x, self.ctx.generator) >= self.ratio
            mask = keep.to(x.dtype)
            if self.scale_train:
                mask = mask * self.scale
            return (x * mask,)
        if self.scale_train:
            return (x,)
        return (x * (1.0 / self.scale),)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, dropout_ratio={self.ratio}, phase={self.phase}, "
                f"scale_train={self.scale_train}")
