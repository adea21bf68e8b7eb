"""Loss layers (and Accuracy), with Caffe's exact forward values and Caffe's backward.

Conventions shared by every layer here (Caffe's ``LossLayer``):

- Top 0 is a 0-axis blob (a tensor of shape ``()``); ``is_loss`` gives it loss weight 1.
- Integer labels arrive as float tensors (Caffe keeps labels in float blobs); they are read
  as ``static_cast<int>`` does (truncation toward zero).  Labels never receive gradient:
  Caffe refuses to back-propagate into them, so the layers here return none.
- Where Caffe's backward is not the derivative of its forward (clamped logs, the epsilon in
  the contrastive loss, an ignored probability top) a custom ``autograd.Function`` applies
  Caffe's formula; elsewhere plain autograd gives Caffe's numbers.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.autograd import Function
from torch.autograd.function import once_differentiable

from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.layers.base import BuildContext, Layer, Shape, canonical_axis
from caffe_compat.layers.registry import register
from caffe_compat.protos import caffe_pb2

#: Caffe clamps probabilities at FLT_MIN before the log in SoftmaxWithLoss
FLT_MIN = float(np.finfo(np.float32).tiny)
#: ... and at kLOG_THRESHOLD (a float constant) in the logistic / infogain losses
LOG_THRESHOLD = float(np.float32(1e-20))

_NORM = caffe_pb2.LossParameter
NORMALIZATION_NAMES = {_NORM.FULL: "FULL", _NORM.VALID: "VALID", _NORM.BATCH_SIZE: "BATCH_SIZE",
                       _NORM.NONE: "NONE"}


def _prod(xs: Sequence[int]) -> int:
    return int(math.prod(int(x) for x in xs))


def _legacy_dim(shape: Shape, i: int) -> int:
    """Caffe's ``LegacyShape(i)``: num/channels/height/width, 1 past the blob's last axis."""
    return int(shape[i]) if i < len(shape) else 1


def _as_labels(t: Tensor) -> Tensor:
    """Labels as integers, the way ``static_cast<int>(float)`` reads them; never differentiable."""
    return t.detach().to(torch.long)


def normalizer(mode: int, outer: int, inner: int, valid: Tensor) -> Tensor:
    """Caffe's ``GetNormalizer``: FULL / VALID / BATCH_SIZE / NONE, at least 1.

    ``valid`` is the (0-d, integer) count of non-ignored labels, used by VALID.
    """
    if mode == _NORM.FULL:
        n = valid.new_tensor(outer * inner)
    elif mode == _NORM.VALID:
        n = valid
    elif mode == _NORM.BATCH_SIZE:
        n = valid.new_tensor(outer)
    elif mode == _NORM.NONE:
        n = valid.new_tensor(1)
    else:  # pragma: no cover - checked at build
        raise SchemaError(f"unknown normalization mode {mode}")
    return n.clamp(min=1)


def _check_mode(layer: Layer, mode: int) -> int:
    if mode not in NORMALIZATION_NAMES:
        raise layer.error(SchemaError, f"unknown loss_param.normalization {mode}; allowed: "
                          f"{', '.join(NORMALIZATION_NAMES.values())}")
    return mode


def _check_label_range(layer: Layer, lab: Tensor, valid: Tensor, num_classes: int) -> Tensor:
    """Caffe only DCHECKs label ranges (then reads out of bounds); refuse clearly instead.

    Returns labels safe to index with (on an accelerator the check settles at the end of
    the net's forward; out-of-range labels read class 0 meanwhile).
    """
    if lab.numel() == 0 or lab.device.type == "meta":
        return lab
    bad = ((lab < 0) | (lab >= num_classes)) & valid

    def fail() -> None:
        v = int(lab[bad].flatten()[0])
        raise layer.error(DataError, f"label value {v} out of range [0, {num_classes}) "
                          "(set loss_param.ignore_label to skip it)")

    layer.check_later(bad.any(), fail)
    if layer.checks is None or (lab.device.type == "cpu" and not layer.checks.defer_on_cpu):
        return lab
    return torch.where(bad, torch.zeros_like(lab), lab)


class _LossBase(Layer):
    """Caffe's ``LossLayer``: two bottoms with equal first dimension, a scalar top."""

    is_loss = True
    exact_bottoms: Optional[int] = 2
    exact_tops: Optional[int] = 1

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        super().__init__(param, bottom_shapes, ctx)
        self.setup(param, bottom_shapes)
        self.infer_top_shapes(bottom_shapes)

    def setup(self, param, bottom_shapes: Sequence[Shape]) -> None:
        """Read the layer's parameters (Caffe's LayerSetUp); shapes are checked afterwards."""

    def check_shapes(self, shapes: Sequence[Shape]) -> List[Shape]:
        """Validate bottom shapes (Caffe's Reshape CHECKs) and return the top shapes."""
        if len(shapes[0]) == 0 or len(shapes[1]) == 0:
            raise self.error(ShapeError, f"bottoms need at least one axis, got {[tuple(s) for s in shapes]}")
        if shapes[0][0] != shapes[1][0]:
            raise self.error(ShapeError, "the data and label should have the same first dimension: "
                             f"{tuple(shapes[0])} vs {tuple(shapes[1])}")
        return [()]

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        return self.check_shapes([tuple(int(d) for d in s) for s in bottom_shapes])


# ====================================================================== SoftmaxWithLoss
class _SoftmaxLossFn(Function):
    """Softmax + multinomial log loss with Caffe's FLT_MIN clamp and its (p - 1) gradient."""

    @staticmethod
    def forward(ctx, x3: Tensor, lab: Tensor, valid: Tensor, mode: int) -> Tuple[Tensor, Tensor]:
        outer, _, inner = x3.shape
        prob = torch.softmax(x3, dim=1)
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        p = prob.gather(1, safe.unsqueeze(1)).squeeze(1)
        logp = torch.log(p.clamp(min=FLT_MIN))
        loss = -(torch.where(valid, logp, torch.zeros_like(logp))).sum()
        norm = normalizer(mode, outer, inner, valid.sum())
        ctx.save_for_backward(prob, safe, valid, norm)
        ctx.mark_non_differentiable(prob)
        return loss / norm.to(loss.dtype), prob

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _gprob):
        prob, safe, valid, norm = ctx.saved_tensors
        d = prob.clone()
        d.scatter_add_(1, safe.unsqueeze(1), -torch.ones_like(prob[:, :1]))
        d = d * valid.unsqueeze(1).to(d.dtype)
        return d * (g / norm.to(d.dtype)), None, None, None


def _loss_normalization(layer: Layer, lp, *, default_unset: int, allow_normalize: bool = True) -> int:
    """Resolve ``normalization`` vs the legacy ``normalize`` flag (Caffe's rule)."""
    if lp.HasField("normalization"):
        return _check_mode(layer, lp.normalization)
    if lp.HasField("normalize"):
        if not allow_normalize:
            raise layer.error(SchemaError, 'loss_param.normalize is deprecated for this layer; '
                              'use "normalization"')
        return _NORM.VALID if lp.normalize else _NORM.BATCH_SIZE
    return default_unset


@register("SoftmaxWithLoss")
class SoftmaxWithLoss(_LossBase):
    """Softmax over ``softmax_param.axis`` then the mean negative log-likelihood of the labels.

    Top 1 (optional) is the softmax probability; like Caffe, its diff is ignored in backward.
    """

    def lint(self, bottom_producers):
        if bottom_producers and bottom_producers[0] == "Softmax":
            return ["bottom 0 is already a Softmax output and SoftmaxWithLoss applies softmax "
                    "itself: the probabilities are softmaxed twice (feed it the scores)"]
        return []

    exact_tops = None
    min_tops = 1
    max_tops = 2

    def setup(self, param, bottom_shapes):
        lp = param.loss_param
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.axis_param = int(param.softmax_param.axis)
        # legacy `normalize` counts only when `normalization` is not set (default VALID)
        self.normalization = _loss_normalization(self, lp, default_unset=_NORM.VALID)

    def _axis(self, shape: Shape) -> int:
        return canonical_axis(self.axis_param, len(shape), layer=self.name, what="softmax_param.axis")

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x = shapes[0]
        a = self._axis(x)
        outer, inner = _prod(x[:a]), _prod(x[a + 1:])
        if outer * inner != _prod(shapes[1]):
            raise self.error(ShapeError, f"number of labels ({_prod(shapes[1])}, label shape {tuple(shapes[1])}) "
                             f"must match number of predictions ({outer * inner}) for prediction shape "
                             f"{tuple(x)} with softmax axis {a}")
        return [()] if len(self.top_names) < 2 else [(), tuple(x)]

    def forward(self, x: Tensor, label: Tensor) -> Tuple[Tensor, ...]:
        a = self._axis(tuple(x.shape))
        outer, c, inner = _prod(x.shape[:a]), int(x.shape[a]), _prod(x.shape[a + 1:])
        x3 = x.reshape(outer, c, inner)
        lab = _as_labels(label).reshape(outer, inner)
        valid = lab != self.ignore_label if self.has_ignore else torch.ones_like(lab, dtype=torch.bool)
        lab = _check_label_range(self, lab, valid, c)
        loss, prob = _SoftmaxLossFn.apply(x3, lab, valid, self.normalization)
        if len(self.top_names) >= 2:
            return loss, prob.reshape(x.shape)
        return (loss,)


# ====================================================================== EuclideanLoss
@register("EuclideanLoss")
class EuclideanLoss(_LossBase):
    """``sum((a - b)^2) / (2 N)``; both bottoms get gradients (Caffe allows both)."""

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        if _prod(shapes[0][1:]) != _prod(shapes[1][1:]):
            raise self.error(ShapeError, f"inputs must have the same dimension: {tuple(shapes[0])} "
                             f"vs {tuple(shapes[1])}")
        return [()]

    def forward(self, a: Tensor, b: Tensor) -> Tuple[Tensor]:
        diff = a - b.reshape(a.shape)
        return ((diff * diff).sum() / a.shape[0] / 2,)


# ====================================================================== SigmoidCrossEntropyLoss
class _SigmoidCEFn(Function):
    """Caffe's numerically stable sigmoid cross-entropy; gradient ``sigmoid(x) - t``."""

    @staticmethod
    def forward(ctx, x: Tensor, t: Tensor, valid: Tensor, mode: int) -> Tensor:
        pos = (x >= 0).to(x.dtype)
        term = x * (t - pos) - torch.log(1 + torch.exp(x - 2 * x * pos))
        loss = -(torch.where(valid, term, torch.zeros_like(term))).sum()
        n = x.shape[0]
        inner = _prod(x.shape[1:])
        norm = normalizer(mode, n, inner, valid.sum())
        ctx.save_for_backward(x, t, valid, norm)
        return loss / norm.to(loss.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        x, t, valid, norm = ctx.saved_tensors
        d = (torch.sigmoid(x) - t) * valid.to(x.dtype)
        return d * (g / norm.to(d.dtype)), None, None, None


@register("SigmoidCrossEntropyLoss")
class SigmoidCrossEntropyLoss(_LossBase):
    """Cross-entropy of ``sigmoid(x)`` against targets in [0, 1] (BVLC master semantics).

    ``loss_param.ignore_label`` skips targets whose integer value equals it; normalization
    defaults to BATCH_SIZE when neither ``normalization`` nor ``normalize`` is given.
    """

    def setup(self, param, bottom_shapes):
        lp = param.loss_param
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.normalization = _loss_normalization(self, lp, default_unset=_NORM.BATCH_SIZE)

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        if _prod(shapes[0]) != _prod(shapes[1]):
            raise self.error(ShapeError, f"inputs must have the same count: {tuple(shapes[0])} "
                             f"vs {tuple(shapes[1])}")
        return [()]

    def forward(self, x: Tensor, target: Tensor) -> Tuple[Tensor]:
        t = target.detach().reshape(x.shape).to(x.dtype)
        if self.has_ignore:
            valid = _as_labels(target).reshape(x.shape) != self.ignore_label
        else:
            valid = torch.ones(x.shape, dtype=torch.bool, device=x.device)
        return (_SigmoidCEFn.apply(x, t, valid, self.normalization),)


# ====================================================================== HingeLoss
@register("HingeLoss")
class HingeLoss(_LossBase):
    """One-vs-all hinge: ``sum max(0, 1 - y_k x_k) / N`` (L1) or its square (L2), y = +-1."""

    def setup(self, param, bottom_shapes):
        norm = param.hinge_loss_param.norm
        if norm not in (caffe_pb2.HingeLossParameter.L1, caffe_pb2.HingeLossParameter.L2):
            raise self.error(SchemaError, f"unknown hinge_loss_param.norm {norm}; allowed: L1, L2")
        self.norm = norm

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        if _prod(shapes[1]) < shapes[0][0]:
            raise self.error(ShapeError, f"need one label per item: label shape {tuple(shapes[1])} "
                             f"for data shape {tuple(shapes[0])}")
        return [()]

    def forward(self, x: Tensor, label: Tensor) -> Tuple[Tensor]:
        n = int(x.shape[0])
        x2 = x.reshape(n, -1)
        lab = _as_labels(label).reshape(-1)[:n]
        lab = _check_label_range(self, lab, torch.ones_like(lab, dtype=torch.bool), x2.shape[1])
        # sign +1 everywhere except -1 at the true class; relu's zero gradient at the kink
        # equals Caffe's sign(0) = 0.
        sign = torch.ones_like(x2).scatter(1, lab.unsqueeze(1), -1.0)
        margin = torch.relu(1 + sign * x2)
        if self.norm == caffe_pb2.HingeLossParameter.L1:
            return (margin.sum() / n,)
        return ((margin * margin).sum() / n,)


# ====================================================================== InfogainLoss
class _InfogainFn(Function):
    """BVLC master's infogain loss on softmax(x): ``-sum_l H[y, l] log max(p_l, 1e-20)``.

    Caffe's gradient ``p * sum_l H[y, l] - H[y, :]`` ignores the clamp; so does this one.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, lab: Tensor, valid: Tensor, H: Tensor, mode: int):
        outer, c, inner = x3.shape
        prob = torch.softmax(x3, dim=1)
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        rows = H[safe].permute(0, 2, 1)  # (outer, C, inner): H[label, l]
        term = (rows * torch.log(prob.clamp(min=LOG_THRESHOLD))).sum(1)
        loss = -(torch.where(valid, term, torch.zeros_like(term))).sum()
        norm = normalizer(mode, outer, inner, valid.sum())
        ctx.save_for_backward(prob, rows, valid, norm)
        ctx.mark_non_differentiable(prob)
        return loss / norm.to(loss.dtype), prob

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor, _gprob):
        prob, rows, valid, norm = ctx.saved_tensors
        d = prob * rows.sum(1, keepdim=True) - rows
        d = d * valid.unsqueeze(1).to(d.dtype)
        return d * (g / norm.to(d.dtype)), None, None, None, None


@register("InfogainLoss")
class InfogainLoss(_LossBase):
    """Infogain-weighted log loss of softmax(bottom[0]) (BVLC master: scores, not probabilities).

    H (C x C) comes from bottom[2] or the BlobProto file ``infogain_loss_param.source``
    (relative paths against the current directory, as Caffe opens it).  ``axis``,
    ``loss_param.ignore_label`` and ``normalization`` (default VALID) as in SoftmaxWithLoss;
    the legacy ``normalize`` flag is refused as in master.  Top 1 (optional): the softmax.
    """

    def lint(self, bottom_producers):
        # BVLC Caffe before 2017 (and the Fast R-CNN fork) took probabilities here, so old
        # models put a Softmax in front; master, which this follows, applies softmax itself
        if bottom_producers and bottom_producers[0] == "Softmax":
            return ["bottom 0 is a Softmax output, but InfogainLoss applies softmax itself (BVLC "
                    "master; Caffe before 2017 took probabilities): the probabilities are softmaxed "
                    "twice; feed it the scores, as current Caffe expects"]
        return []

    exact_bottoms = None
    min_bottoms = 2
    max_bottoms = 3
    exact_tops = None
    min_tops = 1
    max_tops = 2

    def setup(self, param, bottom_shapes):
        lp = param.loss_param
        self.has_ignore = lp.HasField("ignore_label")
        self.ignore_label = int(lp.ignore_label)
        self.axis_param = int(param.infogain_loss_param.axis)
        self.normalization = _loss_normalization(self, lp, default_unset=_NORM.VALID,
                                                 allow_normalize=False)
        self.source: Optional[str] = None
        self._source_error: Optional[str] = None
        self.register_buffer("infogain", torch.zeros(0), persistent=False)
        if len(bottom_shapes) < 3:
            ip = param.infogain_loss_param
            if not ip.HasField("source") or not ip.source:
                raise self.error(SchemaError, "Infogain matrix source must be specified "
                                 "(infogain_loss_param.source) when there is no third bottom")
            self.source = ip.source
            self._load_source()

    def _load_source(self) -> None:
        from caffe_compat.io import read_binaryproto

        path = self.source
        if not os.path.exists(path):
            self._source_error = f"infogain matrix file '{path}' not found (cwd {os.getcwd()})"
            return
        try:
            arr = read_binaryproto(path)
        except Exception as e:  # ParseError / WeightsError: report as a data problem
            self._source_error = f"cannot read infogain matrix '{path}': {e}"
            return
        self.infogain = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def _axis(self, shape: Shape) -> int:
        return canonical_axis(self.axis_param, len(shape), layer=self.name,
                              what="infogain_loss_param.axis")

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        x = shapes[0]
        a = self._axis(x)
        outer, c, inner = _prod(x[:a]), int(x[a]), _prod(x[a + 1:])
        if outer * inner != _prod(shapes[1]):
            raise self.error(ShapeError, f"number of labels ({_prod(shapes[1])}) must match number "
                             f"of predictions ({outer * inner}) for shape {tuple(x)}, axis {a}")
        h = None
        if len(shapes) > 2:
            h = _prod(shapes[2])
        elif self.source is not None and self._source_error is None:
            h = int(self.infogain.numel())
        if h is not None and h != c * c:
            raise self.error(ShapeError, f"H must be {c}x{c} ({c * c} values), got {h} values")
        return [()] if len(self.top_names) < 2 else [(), tuple(x)]

    def forward(self, x: Tensor, label: Tensor, H: Optional[Tensor] = None) -> Tuple[Tensor, ...]:
        a = self._axis(tuple(x.shape))
        outer, c, inner = _prod(x.shape[:a]), int(x.shape[a]), _prod(x.shape[a + 1:])
        if H is None:
            if self._source_error is not None:
                raise self.error(DataError, self._source_error)
            H = self.infogain
        H = H.detach().to(device=x.device, dtype=x.dtype).reshape(-1)
        if H.numel() != c * c:
            raise self.error(ShapeError, f"H must be {c}x{c}, got {H.numel()} values")
        x3 = x.reshape(outer, c, inner)
        lab = _as_labels(label).reshape(outer, inner)
        valid = lab != self.ignore_label if self.has_ignore else torch.ones_like(lab, dtype=torch.bool)
        lab = _check_label_range(self, lab, valid, c)
        loss, prob = _InfogainFn.apply(x3, lab, valid, H.reshape(c, c), self.normalization)
        if len(self.top_names) >= 2:
            return loss, prob.reshape(x.shape)
        return (loss,)


# ====================================================================== ContrastiveLoss
class _ContrastiveFn(Function):
    """Caffe's contrastive loss; its backward divides by ``dist + 1e-4`` (not the derivative)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, sim: Tensor, margin: float, legacy: bool) -> Tensor:
        n = a.shape[0]
        diff = a - b
        dist_sq = (diff * diff).sum(1)
        if legacy:
            dis = (margin - dist_sq).clamp(min=0)
        else:
            dis = (margin - dist_sq.sqrt()).clamp(min=0) ** 2
        loss = torch.where(sim, dist_sq, dis).sum() / n / 2
        ctx.save_for_backward(diff, dist_sq, sim)
        ctx.margin, ctx.legacy = margin, legacy
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        diff, dist_sq, sim = ctx.saved_tensors
        n = diff.shape[0]
        alpha = g / n
        if ctx.legacy:
            mdist = ctx.margin - dist_sq
            beta = torch.full_like(dist_sq, -1.0)
        else:
            dist = dist_sq.sqrt()
            mdist = ctx.margin - dist
            beta = -mdist / (dist + 1e-4)
        coef = torch.where(sim, torch.ones_like(dist_sq),
                           torch.where(mdist > 0, beta, torch.zeros_like(beta)))
        da = alpha * coef.unsqueeze(1) * diff
        return da, -da, None, None, None


@register("ContrastiveLoss")
class ContrastiveLoss(_LossBase):
    """Siamese contrastive loss of pairs (a, b) with similarity labels y (nonzero = similar).

    Similar: ``d^2``; dissimilar: ``max(margin - d, 0)^2`` or, with ``legacy_version``,
    ``max(margin - d^2, 0)``; summed, divided by 2N.  a and b get gradients, y none.
    """

    exact_bottoms = 3

    def setup(self, param, bottom_shapes):
        cp = param.contrastive_loss_param
        self.margin = float(cp.margin)
        self.legacy = bool(cp.legacy_version)

    def check_shapes(self, shapes):
        a, b, y = shapes
        if len(a) == 0 or len(b) == 0 or len(y) == 0:
            raise self.error(ShapeError, "bottoms need at least one axis")
        if a[0] != b[0] or a[0] != y[0]:
            raise self.error(ShapeError, f"the three bottoms need the same first dimension: "
                             f"{tuple(a)}, {tuple(b)}, {tuple(y)}")
        if _legacy_dim(a, 1) != _legacy_dim(b, 1):
            raise self.error(ShapeError, f"a and b need the same channels: {tuple(a)} vs {tuple(b)}")
        for what, s in (("bottom[0]", a), ("bottom[1]", b)):
            if len(s) > 4 or _legacy_dim(s, 2) != 1 or _legacy_dim(s, 3) != 1:
                raise self.error(ShapeError, f"{what} must be N x C (x 1 x 1), got {tuple(s)}")
        if len(y) > 4 or _legacy_dim(y, 1) != 1 or _legacy_dim(y, 2) != 1 or _legacy_dim(y, 3) != 1:
            raise self.error(ShapeError, f"the similarity label must be N (x 1 x 1 x 1), got {tuple(y)}")
        return [()]

    def forward(self, a: Tensor, b: Tensor, y: Tensor) -> Tuple[Tensor]:
        n = int(a.shape[0])
        sim = _as_labels(y).reshape(n) != 0
        return (_ContrastiveFn.apply(a.reshape(n, -1), b.reshape(n, -1), sim, self.margin, self.legacy),)


# ====================================================================== MultinomialLogisticLoss
class _MultinomialLogisticFn(Function):
    """``-mean log max(p[y], 1e-20)``; Caffe's gradient ``-1 / max(p[y], 1e-20)`` ignores the clamp."""

    @staticmethod
    def forward(ctx, p2: Tensor, lab: Tensor) -> Tensor:
        n = p2.shape[0]
        py = p2.gather(1, lab.unsqueeze(1)).squeeze(1).clamp(min=LOG_THRESHOLD)
        ctx.save_for_backward(py, lab)
        ctx.shape = p2.shape
        return -torch.log(py).sum() / n

    @staticmethod
    @once_differentiable
    def backward(ctx, g: Tensor):
        py, lab = ctx.saved_tensors
        n = ctx.shape[0]
        d = torch.zeros(ctx.shape, dtype=py.dtype, device=py.device)
        d.scatter_(1, lab.unsqueeze(1), (-(g / n) / py).unsqueeze(1))
        return d, None


@register("MultinomialLogisticLoss")
class MultinomialLogisticLoss(_LossBase):
    """Negative log of the given probabilities at the labels (no softmax inside)."""

    def check_shapes(self, shapes):
        super().check_shapes(shapes)
        y = shapes[1]
        if len(y) > 4 or any(_legacy_dim(y, i) != 1 for i in (1, 2, 3)):
            raise self.error(ShapeError, f"label must be N (x 1 x 1 x 1), got {tuple(y)}")
        return [()]

    def forward(self, p: Tensor, label: Tensor) -> Tuple[Tensor]:
        n = int(p.shape[0])
        p2 = p.reshape(n, -1)
        lab = _as_labels(label).reshape(n)
        lab = _check_label_range(self, lab, torch.ones_like(lab, dtype=torch.bool), p2.shape[1])
        return (_MultinomialLogisticFn.apply(p2, lab).reshape(()),)


# ====================================================================== Accuracy
@register("Accuracy")
class Accuracy(Layer):
    """Top-k classification accuracy (no gradient; not a loss).

    BVLC master's rule: an item counts as correct when fewer than ``top_k`` *other* classes
    score at least as high as the true class (ties count against it).  Top 1 (optional) is
    the per-class accuracy (0 for a class with no items).  With every label ignored the
    accuracy is 0.
    """

    exact_bottoms = 2
    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        ap = param.accuracy_param
        self.top_k = int(ap.top_k)
        self.axis_param = int(ap.axis)
        self.has_ignore = ap.HasField("ignore_label")
        self.ignore_label = int(ap.ignore_label)
        self.infer_top_shapes(bottom_shapes)

    def _axis(self, shape: Shape) -> int:
        return canonical_axis(self.axis_param, len(shape), layer=self.name, what="accuracy_param.axis")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        x, y = (tuple(int(d) for d in s) for s in bottom_shapes)
        a = self._axis(x)
        if _prod(y) == 0 or self.top_k > _prod(x) // _prod(y):
            raise self.error(ShapeError, f"top_k ({self.top_k}) must be at most the number of classes "
                             f"({_prod(x) // max(_prod(y), 1)})")
        outer, inner = _prod(x[:a]), _prod(x[a + 1:])
        if outer * inner != _prod(y):
            raise self.error(ShapeError, f"number of labels ({_prod(y)}, shape {y}) must match number "
                             f"of predictions ({outer * inner}) for shape {x}, axis {a}")
        return [()] if len(self.top_names) < 2 else [(), (int(x[a]),)]

    @torch.no_grad()
    def forward(self, x: Tensor, label: Tensor) -> Tuple[Tensor, ...]:
        x = x.detach()
        a = self._axis(tuple(x.shape))
        outer, c, inner = _prod(x.shape[:a]), int(x.shape[a]), _prod(x.shape[a + 1:])
        x3 = x.reshape(outer, c, inner)
        lab = _as_labels(label).reshape(outer, inner)
        valid = lab != self.ignore_label if self.has_ignore else torch.ones_like(lab, dtype=torch.bool)
        lab = _check_label_range(self, lab, valid, c)
        safe = torch.where(valid, lab, torch.zeros_like(lab))
        true_score = x3.gather(1, safe.unsqueeze(1))
        better = (x3 >= true_score).sum(1) - 1  # the true class itself is counted once
        correct = (better < self.top_k) & valid
        count = valid.sum()
        acc = torch.where(count > 0, correct.sum().to(x.dtype) / count.clamp(min=1).to(x.dtype),
                          torch.zeros((), dtype=x.dtype, device=x.device))
        if len(self.top_names) < 2:
            return (acc,)
        nums = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, safe[valid], torch.ones_like(safe[valid], dtype=x.dtype))
        hits = torch.zeros(c, dtype=x.dtype, device=x.device).index_add_(
            0, safe[correct], torch.ones_like(safe[correct], dtype=x.dtype))
        per_class = torch.where(nums > 0, hits / nums.clamp(min=1), torch.zeros_like(nums))
        return acc, per_class
