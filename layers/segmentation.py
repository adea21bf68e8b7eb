"""The segmentation forks' layers: ``BN``, ``Upsample`` and ``Interp``.

Three type names, five layers: two forks each gave ``BN`` and ``Upsample`` a meaning of their
own, so the registered class looks at the layer (its params, its bottom count) and builds the
matching form.  Each form follows one fork's C++ source, forward and backward:

- ``BN``, SegNet form: alexgkendall/caffe-segnet @ 344c113bf1832886f1cbe9f33ffe28a3beeaf412
  (``src/caffe/layers/bn_layer.cpp``); TimoSaemann/caffe-enet @
  22d356c956cdc5e752e6d40612e4f6c60fc8f471 has the same file (only its includes differ).
- ``BN``, PSPNet form: hszhao/PSPNet @ 798bdc907c8630e8c3997ebfdd0d7cae0c5ab03b
  (``src/caffe/layers/bn_layer.cpp``).
- ``Upsample`` with 2 bottoms (max unpooling): caffe-segnet and caffe-enet at the commits
  above (``upsample_layer.cpp``, the same code in both).
- ``Upsample`` with 1 bottom (nearest neighbour): eric612/MobileNet-YOLO @
  69b4441cb3ec8d553fbdef788ad033e246f901bd (``upsample_layer.cpp``).
- ``Interp``: hszhao/PSPNet at the commit above (``interp_layer.cpp`` and
  ``util/interp.cpp``, George Papandreou's DeepLab code), plus the two-bottom form of later
  Interp variants (output size taken from ``bottom[1]``).

Which form, in brief (each class docstring says why):

- ``BN``: PSPNet's fields (``slope_filler``, ``bias_filler``, ``momentum``, ``eps``,
  ``frozen``) make the PSPNet form (four blobs); SegNet's (``bn_mode``, ``scale_filler``,
  ``shift_filler``) the SegNet form (two blobs); neither: the SegNet form (a build cannot
  see the weights file; loading a PSPNet caffemodel into it then fails on the blob count);
  both: an error.
- ``Upsample``: two bottoms (data and the Pooling layer's mask top) unpool; one bottom
  repeats each value ``scale x scale`` times.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import TEST, Layer, Shape
from caffe_compat.layers.registry import register

#: SegNet's BN adds this to the variance (a constant in its LayerSetUp, not a param)
SEGNET_VAR_EPS = 1e-9

_SEGNET_BN_FIELDS = ("bn_mode", "scale_filler", "shift_filler")
_PSPNET_BN_FIELDS = ("slope_filler", "bias_filler", "momentum", "eps", "frozen")
_CTPN_BN_FIELDS = ("var_eps", "moving_average", "decay", "axis")
_BN_MODES = {0: "LEARN", 1: "INFERENCE"}
_UNPOOL_FIELDS = ("scale_h", "scale_w", "pad_out_h", "pad_out_w", "upsample_h", "upsample_w")


def _set_fields(msg, names: Sequence[str]) -> List[str]:
    return [n for n in names if msg.HasField(n)]


def _as_ncl(layer: Layer, x: Tensor, channels: Optional[int] = None) -> Tensor:
    """(N, C, H, W) (or (N, C) / (N, C, H): Caffe's legacy 4-D view) as (N, C, H * W)."""
    if not 2 <= x.dim() <= 4:
        raise layer.error(ShapeError, f"{layer.param.type} needs a bottom of 2 to 4 axes "
                                      f"(N, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise layer.error(ShapeError, f"the bottom has {x.shape[1]} channels but the layer's "
                                      f"blobs were made for {channels}")
    return x.reshape(x.shape[0], x.shape[1], -1)


# ============================================================================ BN
def segnet_bn_forward(x: Tensor, scale: Tensor, shift: Tensor, learn: bool,
                      eps: float = SEGNET_VAR_EPS) -> Tuple[Tensor, Tensor, Tensor]:
    """SegNet's BN on ``x`` (N, C, L): ``(top, batch mean (C,), batch variance (C,))``.

    LEARN: ``scale * (x - E[x]) / sqrt(E[x^2] - E[x]^2 + eps) + shift`` with the moments
    over N and L, taken as the fork does (spatial means, then their batch mean; the
    variance as ``E[x^2] - E[x]^2``, float cancellation included).  INFERENCE:
    ``scale * x + shift`` (the statistics were folded into scale and shift beforehand), the
    mean and variance returned are then None.  Autograd's gradient is the fork's backward
    (checked against a transcription of it in the tests).
    """
    c = x.shape[1]
    s = scale.reshape(1, c, 1)
    b = shift.reshape(1, c, 1)
    if not learn:
        return x * s + b, None, None
    mean = x.mean(dim=2).mean(dim=0)
    ex2 = (x * x).mean(dim=2).mean(dim=0)
    var = ex2 - mean * mean
    x_norm = (x - mean.reshape(1, c, 1)) / torch.sqrt(var + eps).reshape(1, c, 1)
    return x_norm * s + b, mean, var


class _PSPNetBN(torch.autograd.Function):
    """PSPNet's BN given the statistics to normalise with, and the fork's backward.

    The backward is not always autograd's: at TEST (not frozen) the forward uses the stored
    statistics but the fork's backward still applies the batch-statistics formula to the
    normalised input; frozen, it is ``dy * slope / sqrt(var + eps)`` and no slope/bias diff.
    """

    @staticmethod
    def forward(ctx, x: Tensor, slope: Tensor, bias: Tensor, mean: Tensor,  # type: ignore[override]
                var: Tensor, eps: float, frozen: bool):
        c = x.shape[1]
        inv_std = (var + eps).pow(-0.5)
        x_norm = (x - mean.reshape(1, c, 1)) * inv_std.reshape(1, c, 1)
        y = x_norm * slope.reshape(1, c, 1) + bias.reshape(1, c, 1)
        ctx.save_for_backward(x_norm, inv_std, slope)
        ctx.frozen = frozen
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x_norm, inv_std, slope = ctx.saved_tensors
        c = dy.shape[1]
        s = slope.reshape(1, c, 1)
        if ctx.frozen:
            dx = dy * (s * inv_std.reshape(1, c, 1)) if ctx.needs_input_grad[0] else None
            return dx, None, None, None, None, None, None
        dslope = (x_norm * dy).sum(dim=(0, 2)).reshape(slope.shape) if ctx.needs_input_grad[1] else None
        dbias = dy.sum(dim=(0, 2)).reshape(slope.shape) if ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            m = dy.shape[0] * dy.shape[2]
            g = dy * s
            s1 = (x_norm * g).sum(dim=(0, 2)).reshape(1, c, 1)
            s2 = g.sum(dim=(0, 2)).reshape(1, c, 1)
            dx = (g - (x_norm * s1 + s2) / m) * inv_std.reshape(1, c, 1)
        return dx, dslope, dbias, None, None, None, None


def _bn_form(param) -> type:
    """SegNetBN or PSPNetBN for this ``LayerParameter`` (see the module docstring)."""
    p = param.bn_param
    ctpn = _set_fields(p, _CTPN_BN_FIELDS)
    if ctpn:
        raise SchemaError(f"bn_param.{', '.join(ctpn)} belong to CTPN's BN (tianzhi0549/CTPN), "
                          "whose layer source that fork does not publish; not supported. BN here "
                          "is SegNet's (bn_mode, scale_filler, shift_filler) or PSPNet's "
                          "(slope_filler, bias_filler, momentum, eps, frozen)", layer=param.name)
    seg = _set_fields(p, _SEGNET_BN_FIELDS)
    psp = _set_fields(p, _PSPNET_BN_FIELDS)
    if seg and psp:
        raise SchemaError(f"bn_param mixes SegNet's BN fields ({', '.join(seg)}) with PSPNet's "
                          f"({', '.join(psp)}); two forks' BN layers share this type name, give "
                          "the fields of one", layer=param.name)
    return PSPNetBN if psp else SegNetBN


@register("BN")
class BN(Layer):
    """``BN``: SegNet/ENet's or PSPNet's batch normalisation, chosen per layer.

    Two forks registered different layers under this name, with different params and blobs
    (SegNet: scale, shift; PSPNet: slope, bias, mean, variance).  A build sees only the
    prototxt, so the form is read from the ``bn_param`` fields the layer sets: PSPNet's
    (``slope_filler``, ``bias_filler``, ``momentum``, ``eps``, ``frozen``) -> PSPNetBN;
    SegNet's (``bn_mode``, ``scale_filler``, ``shift_filler``) -> SegNetBN; none -> SegNetBN
    (the default: a PSPNet caffemodel then fails to load with "incompatible number of
    blobs", 4 in the file against 2; set e.g. ``eps`` or ``frozen`` to get the PSPNet form);
    both -> a SchemaError.  Weight loading checks each blob's shape against the file.
    """

    exact_bottoms = 1
    min_tops = 1
    max_tops = 3

    #: state-dict names of a file's blobs read without building the layer
    default_blob_names = ("scale", "shift")

    def __new__(cls, *args, **kwargs):
        if cls is BN and args:
            cls = _bn_form(args[0])
        return super().__new__(cls)

    @staticmethod
    def blob_names_for(param, count: int) -> Tuple[str, ...]:
        """A caffemodel's BN blobs by their count: 4 are PSPNet's, otherwise SegNet's."""
        return ("slope", "bias", "mean", "variance") if count == 4 else ("scale", "shift")

    def _bottom_channels(self, bottom_shapes) -> int:
        shape = tuple(bottom_shapes[0])
        if not 2 <= len(shape) <= 4:
            raise self.error(ShapeError, f"BN needs a bottom of 2 to 4 axes (N, C, H, W), got "
                                         f"shape {shape}")
        return int(shape[1])


class SegNetBN(BN):
    """SegNet/ENet ``BN``: ``bn_param { bn_mode scale_filler shift_filler }``.

    Blobs: ``scale`` and ``shift``, each (1, C, 1, 1).  ``bn_mode: LEARN`` (the default)
    normalises with the statistics of the current batch *in every phase*: the fork has no
    running averages (SegNet's ``compute_bn_statistics.py`` later folds dataset statistics
    into scale/shift and switches the layer to INFERENCE).  The variance is ``E[x^2] -
    E[x]^2`` (biased) plus 1e-9, a constant of the fork (no eps field).  LEARN may have up
    to 3 tops: the output, the batch mean and the batch variance (each (1, C, 1, 1), before
    eps; no gradient flows back through them, as in the fork).  ``bn_mode: INFERENCE``:
    ``scale * x + shift`` and one top.
    """

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bn_param
        mode = int(p.bn_mode)
        if mode not in _BN_MODES:
            allowed = ", ".join(f"{k} ({v})" for v, k in _BN_MODES.items())
            raise self.error(SchemaError, f"bn_param.bn_mode {mode} is not one of {allowed}")
        self.learn = mode == 0
        if not self.learn and len(param.top) > 1:
            raise self.error(GraphError, f"BN with bn_mode INFERENCE has 1 top, got {len(param.top)} "
                                         "(the batch mean/variance tops exist only in LEARN)")
        c = self._bottom_channels(bottom_shapes)
        self.channels = c
        self.add_blob("scale", (1, c, 1, 1), p.scale_filler if p.HasField("scale_filler") else None)
        self.add_blob("shift", (1, c, 1, 1), p.shift_filler if p.HasField("shift_filler") else None)

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        x3 = _as_ncl(self, x, self.channels)
        y, mean, var = segnet_bn_forward(x3, self.scale, self.shift, self.learn)
        tops = [y.reshape(x.shape)]
        stat_shape = (1, self.channels, 1, 1)
        if len(self.top_names) > 1:
            tops.append(mean.detach().reshape(stat_shape))
        if len(self.top_names) > 2:
            tops.append(var.detach().reshape(stat_shape))
        return tuple(tops)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, form=SegNet, channels={self.channels}, "
                f"bn_mode={'LEARN' if self.learn else 'INFERENCE'}")


class PSPNetBN(BN):
    """PSPNet ``BN``: ``bn_param { slope_filler bias_filler momentum eps frozen }``.

    Blobs, in the fork's order, each (1, C, 1, 1): ``slope``, ``bias``, ``mean`` and
    ``variance`` (the running statistics: buffers, never learned -- the fork forces their
    lr_mult and decay_mult to 0).  ``frozen: true`` also freezes slope and bias (buffers
    here; the fork forces their lr_mult/decay_mult to 0 and writes no diff) and starts the
    variance at 1 instead of 0.

    Forward: ``slope * (x - mean) / sqrt(var + eps) + bias``.  At TRAIN, not frozen, mean
    and var are the batch's (over N, H, W; the biased variance of ``x - mean``) and the
    running statistics become ``(1 - momentum) * batch + momentum * running`` on every
    forward (no m/(m-1) correction, unlike BVLC's BatchNorm).  At TEST, or frozen, the stored
    ``mean``/``variance`` are used.  Backward as the fork (see ``_PSPNetBN``).
    """

    exact_tops = 1
    max_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.bn_param
        self.frozen = bool(p.frozen)
        self.momentum = float(p.momentum)
        self.eps = float(p.eps)
        c = self._bottom_channels(bottom_shapes)
        self.channels = c
        self.use_global_stats = self.frozen or ctx.phase == TEST
        shape = (1, c, 1, 1)
        self.add_blob("slope", shape, p.slope_filler if p.HasField("slope_filler") else None,
                      buffer=self.frozen)
        self.add_blob("bias", shape, p.bias_filler if p.HasField("bias_filler") else None,
                      buffer=self.frozen)
        self.add_blob("mean", shape, buffer=True, value=torch.zeros(shape))
        self.add_blob("variance", shape, buffer=True,
                      value=torch.ones(shape) if self.frozen else torch.zeros(shape))

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        x3 = _as_ncl(self, x, self.channels)
        c = self.channels
        if self.use_global_stats:
            mean = self.mean.to(x.dtype).reshape(c)
            var = self.variance.to(x.dtype).reshape(c)
        else:
            xd = x3.detach()
            mean = xd.mean(dim=2).mean(dim=0)
            xc = xd - mean.reshape(1, c, 1)
            var = (xc * xc).mean(dim=2).mean(dim=0)
            if x.device.type != "meta":
                self._update_stats(mean, var)
        y = _PSPNetBN.apply(x3, self.slope, self.bias, mean, var, self.eps, self.frozen)
        return (y.reshape(x.shape),)

    @torch.no_grad()
    def _update_stats(self, mean: Tensor, var: Tensor) -> None:
        m = self.momentum
        for buf, batch in ((self.mean, mean), (self.variance, var)):
            buf.copy_((1.0 - m) * batch.reshape(buf.shape).to(buf.dtype) + m * buf)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, form=PSPNet, channels={self.channels}, eps={self.eps:g}, "
                f"momentum={self.momentum:g}, frozen={self.frozen}, "
                f"use_global_stats={self.use_global_stats}")


# ============================================================================ Upsample
class _Unpool(torch.autograd.Function):
    """SegNet's unpooling: scatter by the mask; backward gathers (the fork's, see below)."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor, out_h: int, out_w: int):  # type: ignore[override]
        n, c, h, w = x.shape
        planes, hw, ohw = n * c, h * w, out_h * out_w
        idx = mask.detach().reshape(planes, hw).to(torch.int64)
        target = (idx + torch.arange(planes, device=x.device).reshape(planes, 1) * ohw).reshape(-1)
        # The fork's CPU loop writes in input order, so where two inputs share a target the
        # later one stays: keep, per target, the largest input position that writes it.
        source = torch.arange(planes * hw, device=x.device)
        winner = torch.full((planes * ohw,), -1, dtype=torch.int64, device=x.device)
        winner.scatter_reduce_(0, target, source, reduce="amax")
        flat = x.reshape(-1)
        out = torch.where(winner >= 0, flat[winner.clamp_min(0)], torch.zeros((), dtype=x.dtype,
                                                                               device=x.device))
        ctx.save_for_backward(target)
        ctx.x_shape = x.shape
        return out.reshape(n, c, out_h, out_w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (target,) = ctx.saved_tensors
        gx = grad.reshape(-1)[target].reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        return gx, None, None, None


def unpool(x: Tensor, mask: Tensor, out_h: int, out_w: int, *, layer: str = "") -> Tensor:
    """SegNet/ENet max unpooling of ``x`` (N, C, H, W) into (N, C, out_h, out_w).

    ``mask`` (N, C, H, W) holds, per value, its flat position ``h * out_w + w`` in its
    output plane (what Caffe's MAX Pooling puts in its second top, as floats, truncated
    here as the fork's ``static_cast<int>``).  Positions no value targets are 0; where
    several values target one position the last in row-major order wins (the fork's CPU
    loop).  Backward: each input gets its target's gradient -- also an input that lost
    its position to a later one (the fork gathers, it does not route).
    """
    if mask.device.type != "meta" and mask.numel():
        idx = mask.detach().to(torch.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= out_h * out_w:
            bad = lo if lo < 0 else hi
            raise ShapeError(f"upsample top index {bad} out of range [0, {out_h * out_w}) for a "
                             f"{out_h} x {out_w} output: the scale/upsample_h/upsample_w settings "
                             "must match the Pooling layer that made the mask", layer=layer)
    return _Unpool.apply(x, mask, int(out_h), int(out_w))


def nearest_upsample(x: Tensor, scale: int) -> Tensor:
    """YOLOv3 ports' Upsample: each value repeated ``scale x scale`` times (N, C, sH, sW).

    Autograd's backward sums each block, as the fork's ``Backward_cpu``.
    """
    n, c, h, w = x.shape
    s = int(scale)
    return x.reshape(n, c, h, 1, w, 1).expand(n, c, h, s, w, s).reshape(n, c, h * s, w * s)


@register("Upsample")
class Upsample(Layer):
    """``Upsample``: SegNet/ENet unpooling (2 bottoms) or YOLOv3 nearest neighbour (1 bottom).

    Both forms use ``upsample_param``, so the bottom count decides: SegNet's layer takes the
    data and the mask top of a MAX Pooling layer (exactly 2 bottoms), the YOLO ports' a
    single blob (exactly 1).  See UnpoolUpsample and NearestUpsample.
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __new__(cls, *args, **kwargs):
        if cls is Upsample and len(args) >= 2:
            n = len(args[1])
            cls = UnpoolUpsample if n == 2 else NearestUpsample if n == 1 else cls
        return super().__new__(cls)


class UnpoolUpsample(Upsample):
    """SegNet/ENet ``Upsample`` (bottoms: data (N, C, H, W), mask of the same shape).

    Output size, as the fork: ``upsample_h``/``upsample_w`` when both are given (each > 1);
    otherwise ``H * scale_h - pad_out_h`` by ``W * scale_w - pad_out_w``, with
    ``scale_h = scale_w = scale`` (default 2) unless ``scale_h`` and ``scale_w`` are both
    given (then ``scale`` must not be), each scale > 1, and ``pad_out_*`` (dropping the last
    row/column to undo a ceil-mode pooling of an odd size) only with a scale of 2.
    """

    exact_bottoms = 2
    min_bottoms = max_bottoms = None

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.upsample_param
        has = {f: p.HasField(f) for f in ("scale", "scale_h", "scale_w", "upsample_h", "upsample_w")}
        if has["upsample_h"] != has["upsample_w"]:
            raise self.error(SchemaError, "upsample_param.upsample_h and upsample_w must be given "
                                          "together")
        self.upsample_hw: Optional[Tuple[int, int]] = None
        if has["upsample_h"]:
            uh, uw = int(p.upsample_h), int(p.upsample_w)
            if uh <= 1 or uw <= 1:
                raise self.error(SchemaError, f"upsample_param.upsample_h and upsample_w must be "
                                              f"> 1, got {uh} x {uw}")
            self.upsample_hw = (uh, uw)
            self.scale_hw, self.pad_out = (0, 0), (0, 0)
        else:
            if has["scale_h"] != has["scale_w"]:
                raise self.error(SchemaError, "upsample_param.scale_h and scale_w must be given "
                                              "together")
            if has["scale_h"] and has["scale"]:
                raise self.error(SchemaError, "give upsample_param.scale or scale_h/scale_w, not both")
            sh, sw = (int(p.scale_h), int(p.scale_w)) if has["scale_h"] else (int(p.scale),) * 2
            if sh <= 1 or sw <= 1:
                raise self.error(SchemaError, f"upsample_param scale must be > 1, got {sh} x {sw} "
                                              "(or give upsample_h and upsample_w)")
            ph, pw = int(bool(p.pad_out_h)), int(bool(p.pad_out_w))
            if (ph and sh != 2) or (pw and sw != 2):
                raise self.error(SchemaError, "pad_out_h/pad_out_w need a scale of 2 on that axis "
                                              "(otherwise the output size is ill-defined)")
            self.scale_hw, self.pad_out = (sh, sw), (ph, pw)
        self._out_shape([tuple(s) for s in bottom_shapes])

    def lint(self, bottom_producers):
        fed = (None, "Pooling", "Input", "Split", "Python", "DummyData", "MemoryData", "HDF5Data")
        if len(bottom_producers) > 1 and bottom_producers[1] not in fed:
            return [f"bottom 1 (the unpooling mask) comes from a {bottom_producers[1]} layer; "
                    "it should be the second (mask) top of the MAX Pooling this Upsample undoes"]
        return []

    def _out_shape(self, shapes: Sequence[Shape]) -> Shape:
        data, mask = (tuple(int(d) for d in s) for s in shapes)
        if len(data) != 4 or len(mask) != 4:
            raise self.error(ShapeError, f"Upsample needs 4-D data and mask (N, C, H, W), got "
                                         f"{data} and {mask}")
        if data != mask:
            raise self.error(ShapeError, f"the mask's shape {mask} must equal the data's {data} "
                                         "(bottom[1] is the mask top of the matching Pooling layer)")
        n, c, h, w = data
        if self.upsample_hw is not None:
            oh, ow = self.upsample_hw
        else:
            oh = h * self.scale_hw[0] - self.pad_out[0]
            ow = w * self.scale_hw[1] - self.pad_out[1]
        return (n, c, oh, ow)

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        return [self._out_shape([tuple(s) for s in bottom_shapes])]

    def forward(self, x: Tensor, mask: Tensor) -> Tuple[Tensor]:
        _, _, oh, ow = self._out_shape([tuple(x.shape), tuple(mask.shape)])
        return (unpool(x, mask, oh, ow, layer=self.name),)

    def extra_repr(self) -> str:
        if self.upsample_hw is not None:
            how = f"upsample={self.upsample_hw}"
        else:
            how = f"scale={self.scale_hw}, pad_out={self.pad_out}"
        return f"name={self.name!r}, form=unpool, {how}"


class NearestUpsample(Upsample):
    """YOLOv3 ports' ``Upsample`` (1 bottom, ``upsample_param { scale }``): every value
    repeated ``scale x scale`` times.  The fork's own default for ``scale`` is 1 (SegNet's,
    which the shared schema carries, is 2), so an unset ``scale`` means 1 here."""

    exact_bottoms = 1
    min_bottoms = max_bottoms = None

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.upsample_param
        unpool_only = _set_fields(p, _UNPOOL_FIELDS)
        if unpool_only:
            raise self.error(SchemaError, f"upsample_param.{', '.join(unpool_only)} belong to "
                                          "SegNet's unpooling Upsample, which takes 2 bottoms (the "
                                          "data and the Pooling layer's mask top); with 1 bottom "
                                          "Upsample is the YOLO ports' nearest neighbour (scale only)")
        self.scale = int(p.scale) if p.HasField("scale") else 1
        if self.scale < 1:
            raise self.error(SchemaError, f"upsample_param.scale must be >= 1, got {self.scale}")
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(ShapeError, f"Upsample needs a 4-D bottom (N, C, H, W), got {shape}")

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() != 4:
            raise self.error(ShapeError, f"Upsample needs a 4-D bottom (N, C, H, W), got "
                                         f"{tuple(x.shape)}")
        return (nearest_upsample(x, self.scale),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, form=nearest, scale={self.scale}"


# ============================================================================ Interp
def _interp_axis(n_in: int, n_out: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The fork's per-axis taps: first index, second index, weight of the second (float32).

    ``r = float(n_in - 1) / (n_out - 1)`` (0 for one output), source ``r * i`` in float,
    truncated; the second tap is the next cell, or the same one at the last cell.
    """
    r = np.float32(n_in - 1) / np.float32(n_out - 1) if n_out > 1 else np.float32(0)
    src = np.arange(n_out, dtype=np.float32) * np.float32(r)
    i0 = src.astype(np.int64)
    i1 = i0 + (i0 < n_in - 1).astype(np.int64)
    lam1 = src - i0.astype(np.float32)
    return i0, i1, lam1


def interp_bilinear(x: Tensor, out_h: int, out_w: int, pad_beg: int = 0, pad_end: int = 0) -> Tensor:
    """PSPNet/DeepLab ``Interp``: bilinear resize of ``x`` (N, C, H, W) to (N, C, out_h, out_w).

    The input is first cropped to rows and columns ``[-pad_beg, H + pad_end)`` (both pads
    <= 0; the same pair for both axes).  Corners map onto corners: output ``i`` reads input
    ``i * (h_in - 1) / (h_out - 1)`` (computed in float32 as the fork, for any dtype), with
    weights ``1 - l`` and ``l`` on the two neighbours, combined in the fork's order
    ``h0 * (w0 * a + w1 * b) + h1 * (w0 * c + w1 * d)``.  Equal sizes copy.  The backward is
    autograd's, the adjoint scatter-add the fork writes.
    """
    h, w = int(x.shape[-2]), int(x.shape[-1])
    b = -int(pad_beg)
    h1, w1 = h + pad_beg + pad_end, w + pad_beg + pad_end
    xc = x[..., b:b + h1, b:b + w1]
    if (h1, w1) == (out_h, out_w):
        return xc.clone()
    taps = []
    for n_in, n_out in ((h1, out_h), (w1, out_w)):
        i0, i1, lam1 = _interp_axis(n_in, n_out)
        l1 = torch.from_numpy(lam1).to(device=x.device, dtype=x.dtype)
        taps.append((torch.from_numpy(i0).to(x.device), torch.from_numpy(i1).to(x.device),
                     1 - l1, l1))
    (hi0, hi1, h0, h1l), (wi0, wi1, w0, w1l) = taps
    top = xc.index_select(-2, hi0)
    bot = xc.index_select(-2, hi1)
    h0, h1l = h0.reshape(-1, 1), h1l.reshape(-1, 1)
    return (h0 * (w0 * top.index_select(-1, wi0) + w1l * top.index_select(-1, wi1))
            + h1l * (w0 * bot.index_select(-1, wi0) + w1l * bot.index_select(-1, wi1)))


@register("Interp")
class Interp(Layer):
    """PSPNet/DeepLab ``Interp``: bilinear resize, corners aligned (see ``interp_bilinear``).

    ``interp_param { height width zoom_factor shrink_factor pad_beg pad_end }``; the input
    size is ``h_in = H + pad_beg + pad_end`` (pads <= 0 crop).  Output size, first rule that
    applies, in the fork's order: ``shrink_factor`` alone: ``(h_in - 1) / shrink + 1``;
    ``zoom_factor`` alone: ``h_in + (h_in - 1) * (zoom - 1)``; ``height`` and ``width``;
    both factors: shrink, then zoom.  Factors must be >= 1.

    A second bottom (later Interp variants; PSPNet's own takes one): the output takes
    ``bottom[1]``'s height and width (its batch size must match; its values are not read
    and get no gradient); the size fields must then be unset (ambiguous otherwise).
    """

    min_bottoms = 1
    max_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.interp_param
        self.pad_beg, self.pad_end = int(p.pad_beg), int(p.pad_end)
        if self.pad_beg > 0 or self.pad_end > 0:
            raise self.error(SchemaError, f"interp_param.pad_beg and pad_end must be <= 0 (only "
                                          f"cropping is supported), got {self.pad_beg}, {self.pad_end}")
        self.has = {f: p.HasField(f) for f in ("height", "width", "zoom_factor", "shrink_factor")}
        self.height, self.width = int(p.height), int(p.width)
        self.zoom, self.shrink = int(p.zoom_factor), int(p.shrink_factor)
        if len(bottom_shapes) == 2:
            given = [f for f, v in self.has.items() if v]
            if given:
                raise self.error(SchemaError, f"Interp with a second bottom takes its size from it; "
                                              f"interp_param.{', '.join(given)} must not be set too "
                                              "(ambiguous)")
        self.infer_top_shapes(bottom_shapes)

    def _factor(self, name: str, value: int) -> int:
        if value < 1:
            raise self.error(SchemaError, f"interp_param.{name} must be >= 1, got {value}")
        return value

    def _out_size(self, shapes: Sequence[Shape]) -> Shape:
        shape = tuple(int(d) for d in shapes[0])
        if len(shape) != 4:
            raise self.error(ShapeError, f"Interp needs a 4-D bottom (N, C, H, W), got {shape}")
        n, c, h, w = shape
        h_in, w_in = h + self.pad_beg + self.pad_end, w + self.pad_beg + self.pad_end
        if h_in <= 0 or w_in <= 0:
            raise self.error(ShapeError, f"cropping {-self.pad_beg} + {-self.pad_end} leaves no input "
                                         f"of the {h} x {w} bottom")
        has = self.has
        if len(shapes) == 2:
            ref = tuple(int(d) for d in shapes[1])
            if len(ref) != 4 or ref[0] != n:
                raise self.error(ShapeError, f"bottom[1] (the size reference) must be 4-D with the "
                                             f"batch size of bottom[0] ({n}), got {ref}")
            oh, ow = ref[2], ref[3]
        elif has["shrink_factor"] and not has["zoom_factor"]:
            s = self._factor("shrink_factor", self.shrink)
            oh, ow = (h_in - 1) // s + 1, (w_in - 1) // s + 1
        elif has["zoom_factor"] and not has["shrink_factor"]:
            z = self._factor("zoom_factor", self.zoom)
            oh, ow = h_in + (h_in - 1) * (z - 1), w_in + (w_in - 1) * (z - 1)
        elif has["height"] and has["width"]:
            oh, ow = self.height, self.width
        elif has["shrink_factor"] and has["zoom_factor"]:
            s = self._factor("shrink_factor", self.shrink)
            z = self._factor("zoom_factor", self.zoom)
            oh, ow = (h_in - 1) // s + 1, (w_in - 1) // s + 1
            oh, ow = oh + (oh - 1) * (z - 1), ow + (ow - 1) * (z - 1)
        else:
            raise self.error(SchemaError, "interp_param needs zoom_factor, shrink_factor (or both), "
                                          "or height and width (or a second bottom to take the size "
                                          "from)")
        if oh <= 0 or ow <= 0:
            raise self.error(ShapeError, f"Interp output size {oh} x {ow} must be positive")
        return (n, c, oh, ow)

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        return [self._out_size([tuple(s) for s in bottom_shapes])]

    def forward(self, x: Tensor, *ref: Tensor) -> Tuple[Tensor]:
        _, _, oh, ow = self._out_size([tuple(x.shape)] + [tuple(r.shape) for r in ref])
        return (interp_bilinear(x, oh, ow, self.pad_beg, self.pad_end),)

    def extra_repr(self) -> str:
        rule = ", ".join(f"{k}={getattr(self, {'zoom_factor': 'zoom', 'shrink_factor': 'shrink'}.get(k, k))}"
                         for k, v in self.has.items() if v)
        return f"name={self.name!r}, {rule or 'size from bottom[1]'}, pad=({self.pad_beg}, {self.pad_end})"
