"""Native torch versions of py-faster-rcnn's RPN Python layers.

py-faster-rcnn declares these as ``type: "Python"`` layers (``python_param { module:
'rpn.anchor_target_layer' layer: 'AnchorTargetLayer' }`` ...); the registry resolves those
names to the classes below, so its prototxts run without importing its code:

* :class:`AnchorTargetLayer` ('rpn-data'): labels and regression targets for every anchor;
* :class:`ProposalLayer` ('proposal'): anchors + predicted deltas -> clipped, filtered,
  NMS-ed proposals;
* :class:`ProposalTargetLayer` ('roi-data'): samples proposals (plus ground truth) into
  foreground/background RoIs with class-specific regression targets.

Unlike the originals, which read the global config at every forward, each layer reads
the config keys it uses once, when the net is built (:func:`caffe_compat.frcnn.config.build_cfg`:
the net's ``context={"frcnn_cfg": c}``, else the global ``cfg`` as it is then) into a frozen
options object (detectron2's ``from_config``), so nets built with different configs
coexist in one process.  Like the originals they produce no gradients and use the ``+1``
box convention (:mod:`caffe_compat.boxes`, :mod:`caffe_compat.frcnn.boxes`).
Everything stays on the bottoms' device.  Random subsampling draws from a torch generator
(:meth:`_Sampler.seed` for a per-layer stream, else torch's global RNG), so it matches the
originals' distribution and counts, not numpy's random stream.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.boxes import bbox_overlaps, nms
from caffe_compat.errors import DataError, SchemaError, ShapeError, shorten
from caffe_compat.frcnn.boxes import (bbox_transform, bbox_transform_inv, clip_boxes, filter_boxes,
                                      generate_anchors, shifted_anchors)
from caffe_compat.frcnn.config import AttrDict, build_cfg, parse_param_str
from caffe_compat.host_sync import DeviceConstants
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register_python

__all__ = ["AnchorTargetLayer", "ProposalLayer", "ProposalTargetLayer", "AnchorTargetOptions",
           "ProposalOptions", "ProposalTargetOptions"]


# ---------------------------------------------------------------------------- helpers
def _param_str(param) -> str:
    return param.python_param.param_str if param.HasField("python_param") else ""


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _number_list(v: Any, key: str, layer: str) -> Tuple[float, ...]:
    if isinstance(v, (list, tuple)) and len(v) > 0 and all(_is_number(x) and x > 0 for x in v):
        return tuple(v)
    raise SchemaError(f"param_str '{key}' must be a non-empty list of positive numbers, got {shorten(repr(v), 80)}",
                      layer=layer)


class _AnchorMixin:
    """param_str ``feat_stride``/``scales``/``ratios`` and per-map anchor caching."""

    name: str
    _PARAM_KEYS: Tuple[str, ...] = ("feat_stride", "scales", "ratios")

    def _read_anchor_params(self, param) -> Dict[str, Any]:
        p = parse_param_str(_param_str(param), self.name, self._PARAM_KEYS, required=("feat_stride",))
        stride = p["feat_stride"]
        if not _is_number(stride) or stride <= 0:
            raise SchemaError(f"param_str 'feat_stride' must be a positive number, got {shorten(repr(stride), 80)}",
                              layer=self.name)
        self.feat_stride = stride
        self.scales = _number_list(p.get("scales", (8, 16, 32)), "scales", self.name)
        self.ratios = _number_list(p.get("ratios", (0.5, 1, 2)), "ratios", self.name)
        #: the A reference anchors (float64, on the CPU; per-device copies are cached)
        self.base_anchors = generate_anchors(ratios=self.ratios, scales=self.scales)
        self.num_anchors = int(self.base_anchors.shape[0])
        self._anchor_cache: Dict[Tuple[int, int, str], Tensor] = {}
        return p

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, feat_stride={self.feat_stride}, scales={self.scales}, "
                f"ratios={self.ratios}, num_anchors={self.num_anchors}"
                + (f", allowed_border={self.allowed_border}" if hasattr(self, "allowed_border") else ""))

    def _all_anchors(self, height: int, width: int, device: torch.device) -> Tensor:
        """The ``(H*W*A, 4)`` float64 anchors of an ``H x W`` map, cached per map and device."""
        key = (int(height), int(width), str(device))
        hit = self._anchor_cache.get(key)
        if hit is None:
            if len(self._anchor_cache) > 16:   # image sizes vary; keep the cache small
                self._anchor_cache.clear()
            hit = shifted_anchors(self.base_anchors.to(device), height, width, self.feat_stride)
            self._anchor_cache[key] = hit
        return hit


class _Sampler:
    """Seedable uniform draws on the bottoms' device, for subsampling without replacement.

    ``seed(s)`` gives the layer its own stream (one torch generator per device, created on
    first use); ``generator = g`` uses a given generator (on the bottoms' device); with
    neither, torch's global RNG draws (``torch.manual_seed`` makes runs repeatable).
    """

    name: str

    def _init_sampler(self) -> None:
        self.generator: Optional[torch.Generator] = None
        self._seed: Optional[int] = None
        self._generators: Dict[str, torch.Generator] = {}
        #: the config's weights/means/stds as device tensors, made once per device
        self.constants = DeviceConstants()

    def seed(self, seed: int) -> None:
        """Give this layer its own random stream, starting from ``seed``."""
        self._seed = int(seed)
        self._generators = {}
        self.generator = None

    def _uniform(self, n: int, device: torch.device) -> Tensor:
        """``n`` float64 keys in [0, 1) (float64: ties among keys are negligible)."""
        gen = self.generator
        if gen is None and self._seed is not None:
            gen = self._generators.get(str(device))
            if gen is None:
                gen = torch.Generator(device=device)
                gen.manual_seed(self._seed)
                self._generators[str(device)] = gen
        if gen is not None and torch.device(gen.device).type != torch.device(device).type:
            raise DataError(f"the layer's generator is on {gen.device} but the bottoms are on "
                            f"{device}; use layer.seed(s) for a per-device stream",
                            layer=self.name)
        return torch.rand(n, generator=gen, device=device, dtype=torch.float64)

    def _random_subset(self, mask: Tensor, k: Tensor) -> Tensor:
        """A uniformly random subset of ``mask``'s True entries of size ``min(k, count)``.

        ``k`` may be a 0-d tensor, so the draw needs no host synchronisation: every
        candidate gets a random key, and the ``k`` smallest keys win (the same
        distribution as ``numpy.random.choice(..., replace=False)``).
        """
        n = mask.shape[0]
        keys = torch.where(mask, self._uniform(n, mask.device), torch.full_like(mask, 2.0,
                                                                             dtype=torch.float64))
        order = torch.argsort(keys)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=mask.device)
        return mask & (rank < k)

    def _random_order(self, mask: Tensor, count: Optional[int] = None) -> Tensor:
        """Indices of ``mask``'s True entries (``count`` of them, if the caller read it
        already), in uniformly random order."""
        keys = torch.where(mask, self._uniform(mask.shape[0], mask.device),
                           torch.full_like(mask, 2.0, dtype=torch.float64))
        order = torch.argsort(keys)
        return order[: int(mask.sum()) if count is None else count]


def _check_single_image(layer: Layer, shape: Sequence[int], what: str) -> None:
    if len(shape) != 4:
        raise layer.error(ShapeError, f"{what} must be 4-D (1, C, H, W), got {tuple(shape)}")
    if shape[0] != 1:
        raise layer.error(ShapeError, f"only single-image batches are supported: {what} has "
                                      f"batch size {shape[0]} (expected 1)")


def _check_im_info(layer: Layer, shape: Sequence[int]) -> None:
    n = 1
    for s in shape:
        n *= s
    if len(shape) < 1 or shape[-1] < 3 or n < 3:
        raise layer.error(ShapeError, f"im_info must be (1, 3) = [height, width, scale], got "
                                      f"{tuple(shape)}")


def _check_gt(layer: Layer, gt: Tensor, min_cols: int) -> None:
    if gt.dim() != 2 or (gt.shape[0] > 0 and gt.shape[1] < min_cols):
        raise layer.error(ShapeError, f"gt_boxes must be (G, 5) rows of [x1, y1, x2, y2, class], "
                                      f"got {tuple(gt.shape)}")


def _four(values: Sequence[float], key: str, layer: str) -> Tuple[float, float, float, float]:
    vals = tuple(float(v) for v in values)
    if len(vals) != 4:
        raise SchemaError(f"config key '{key}' must hold 4 numbers, got {shorten(repr(values), 80)}", layer=layer)
    return vals  # type: ignore[return-value]


# ---------------------------------------------------------------------------- build-time options
@dataclass(frozen=True)
class AnchorTargetOptions:
    """The ``cfg.TRAIN.RPN_*`` keys :class:`AnchorTargetLayer` uses, read when it is built."""

    negative_overlap: float
    positive_overlap: float
    clobber_positives: bool
    fg_fraction: float
    batch_size: int
    bbox_inside_weights: Tuple[float, float, float, float]
    positive_weight: float          # < 0: uniform 1 / #labelled

    @classmethod
    def from_config(cls, c: AttrDict, layer: str = "") -> "AnchorTargetOptions":
        t = c.TRAIN
        p = float(t.RPN_POSITIVE_WEIGHT)
        if not p < 0 and not 0 < p < 1:
            raise SchemaError(f"cfg.TRAIN.RPN_POSITIVE_WEIGHT must be in (0, 1) or negative, got {p}",
                              layer=layer)
        return cls(negative_overlap=float(t.RPN_NEGATIVE_OVERLAP),
                   positive_overlap=float(t.RPN_POSITIVE_OVERLAP),
                   clobber_positives=bool(t.RPN_CLOBBER_POSITIVES),
                   fg_fraction=float(t.RPN_FG_FRACTION), batch_size=int(t.RPN_BATCHSIZE),
                   bbox_inside_weights=_four(t.RPN_BBOX_INSIDE_WEIGHTS, "TRAIN.RPN_BBOX_INSIDE_WEIGHTS",
                                             layer),
                   positive_weight=p)


@dataclass(frozen=True)
class ProposalOptions:
    """The ``cfg.<phase>.RPN_*`` keys :class:`ProposalLayer` uses (the section of the net's
    phase), read when it is built."""

    pre_nms_top_n: int              # <= 0: keep all
    post_nms_top_n: int             # <= 0: keep all
    nms_thresh: float
    min_size: float

    @classmethod
    def from_config(cls, c: AttrDict, phase: str) -> "ProposalOptions":
        s = c[phase]
        return cls(pre_nms_top_n=int(s.RPN_PRE_NMS_TOP_N), post_nms_top_n=int(s.RPN_POST_NMS_TOP_N),
                   nms_thresh=float(s.RPN_NMS_THRESH), min_size=float(s.RPN_MIN_SIZE))


@dataclass(frozen=True)
class ProposalTargetOptions:
    """The ``cfg.TRAIN`` keys :class:`ProposalTargetLayer` uses, read when it is built."""

    batch_size: int
    fg_fraction: float
    fg_thresh: float
    bg_thresh_hi: float
    bg_thresh_lo: float
    bbox_inside_weights: Tuple[float, float, float, float]
    #: (means, stds) when ``BBOX_NORMALIZE_TARGETS_PRECOMPUTED``, else None
    normalize: Optional[Tuple[Tuple[float, ...], Tuple[float, ...]]]

    @classmethod
    def from_config(cls, c: AttrDict, layer: str = "") -> "ProposalTargetOptions":
        t = c.TRAIN
        normalize = None
        if t.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
            normalize = (_four(t.BBOX_NORMALIZE_MEANS, "TRAIN.BBOX_NORMALIZE_MEANS", layer),
                         _four(t.BBOX_NORMALIZE_STDS, "TRAIN.BBOX_NORMALIZE_STDS", layer))
        return cls(batch_size=int(t.BATCH_SIZE), fg_fraction=float(t.FG_FRACTION),
                   fg_thresh=float(t.FG_THRESH), bg_thresh_hi=float(t.BG_THRESH_HI),
                   bg_thresh_lo=float(t.BG_THRESH_LO),
                   bbox_inside_weights=_four(t.BBOX_INSIDE_WEIGHTS, "TRAIN.BBOX_INSIDE_WEIGHTS", layer),
                   normalize=normalize)


# ---------------------------------------------------------------------------- AnchorTarget
@register_python("rpn.anchor_target_layer.AnchorTargetLayer")
class AnchorTargetLayer(_AnchorMixin, _Sampler, Layer):
    """Anchor labels (1 fg, 0 bg, -1 ignore) and regression targets for RPN training.

    Bottoms: ``rpn_cls_score`` (1, 2A, H, W) (only H and W are read), ``gt_boxes``
    (G, 5) ``[x1, y1, x2, y2, class]``, ``im_info`` (1, 3) ``[height, width, scale]``,
    and (unused) ``data``.  Tops: labels (1, 1, A*H, W), bbox_targets,
    bbox_inside_weights, bbox_outside_weights (1, 4A, H, W).

    Only anchors inside the image (extended by param_str ``allowed_border``, default 0)
    get labels; the rest are -1 with zero targets and weights.  For inside anchors:
    max IoU < ``RPN_NEGATIVE_OVERLAP`` -> 0; for each gt the inside anchors tying its
    highest IoU -> 1; IoU >= ``RPN_POSITIVE_OVERLAP`` -> 1; ``RPN_CLOBBER_POSITIVES``
    lets the negative rule win.  Positives above ``int(RPN_FG_FRACTION * RPN_BATCHSIZE)``
    and negatives above ``RPN_BATCHSIZE - #positives`` are randomly dropped to -1.
    Targets are computed for every inside anchor w.r.t. its best gt; inside weights are
    ``RPN_BBOX_INSIDE_WEIGHTS`` on positives; outside weights are ``1/#labelled`` (for
    ``RPN_POSITIVE_WEIGHT < 0``) or ``p/#pos`` and ``(1-p)/#neg``.

    A gt that overlaps no inside anchor marks no anchor as "its best" here; the original
    compared zero overlaps with that gt's zero maximum and so labelled *every* anchor not
    touching it positive.  Set ``legacy_zero_overlap_ties = True`` to reproduce that.
    With no gt at all every inside anchor is a negative candidate (the original crashed).
    """

    min_bottoms = 3
    max_bottoms = 4
    exact_tops = 4
    _PARAM_KEYS = ("feat_stride", "scales", "ratios", "allowed_border")
    #: reproduce py-faster-rcnn's labelling of zero-overlap ties for gts that touch no anchor
    legacy_zero_overlap_ties: bool = False

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx) -> None:
        super().__init__(param, bottom_shapes, ctx)
        p = self._read_anchor_params(param)
        border = p.get("allowed_border", 0)
        if not _is_number(border):
            raise self.error(SchemaError, f"param_str 'allowed_border' must be a number, got {shorten(repr(border), 80)}")
        self.allowed_border = border
        #: the config keys it uses, read once now
        self.opts = AnchorTargetOptions.from_config(build_cfg(ctx), self.name)
        self._init_sampler()
        _check_single_image(self, bottom_shapes[0], "rpn_cls_score")
        _check_im_info(self, bottom_shapes[2])

    def infer_top_shapes(self, bottom_shapes: Sequence[Shape],
                         bottom_dtypes=None) -> List[Shape]:
        _check_single_image(self, bottom_shapes[0], "rpn_cls_score")
        h, w = int(bottom_shapes[0][-2]), int(bottom_shapes[0][-1])
        a = self.num_anchors
        return [(1, 1, a * h, w), (1, 4 * a, h, w), (1, 4 * a, h, w), (1, 4 * a, h, w)]

    @torch.compiler.disable  # data-dependent sizes and sampling: run eagerly under torch.compile
    def forward(self, rpn_cls_score: Tensor, gt_boxes: Tensor, im_info: Tensor,
                *unused: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        with torch.no_grad():
            return self._forward(rpn_cls_score.detach(), gt_boxes.detach(), im_info.detach())

    def _forward(self, score: Tensor, gt: Tensor, im_info: Tensor):
        _check_single_image(self, tuple(score.shape), "rpn_cls_score")
        _check_gt(self, gt, 4)
        c = self.opts
        dev, out_dtype = score.device, score.dtype
        height, width = int(score.shape[-2]), int(score.shape[-1])
        A = self.num_anchors
        anchors = self._all_anchors(height, width, dev)                 # (N, 4) float64
        n = anchors.shape[0]
        info = im_info.reshape(-1)[:3].to(torch.float64)
        b = self.allowed_border
        inside = ((anchors[:, 0] >= -b) & (anchors[:, 1] >= -b)
                  & (anchors[:, 2] < info[1] + b) & (anchors[:, 3] < info[0] + b))

        g = gt.shape[0]
        if g > 0:
            gt64 = gt[:, :4].to(torch.float64)
            overlaps = bbox_overlaps(anchors, gt64)                     # (N, G)
            argmax = overlaps.argmax(dim=1)                             # first max, as numpy
            max_ov = overlaps.gather(1, argmax[:, None])[:, 0]
            ov_in = torch.where(inside[:, None], overlaps, torch.full_like(overlaps, -1.0))
            gt_max = ov_in.max(dim=0).values                            # (G,)
            ties = (ov_in == gt_max[None, :]) & inside[:, None]
            if not self.legacy_zero_overlap_ties:
                ties = ties & (gt_max[None, :] > 0)
            best_for_gt = ties.any(dim=1)
            targets = bbox_transform(anchors, gt64[argmax])             # float64, as the original
        else:
            max_ov = torch.zeros(n, dtype=torch.float64, device=dev)
            best_for_gt = torch.zeros(n, dtype=torch.bool, device=dev)
            targets = torch.zeros((n, 4), dtype=torch.float64, device=dev)

        neg = inside & (max_ov < c.negative_overlap)
        pos = inside & (best_for_gt | (max_ov >= c.positive_overlap))
        labels = torch.full((n,), -1, dtype=torch.int8, device=dev)
        one = torch.ones_like(labels)
        zero = torch.zeros_like(labels)
        if c.clobber_positives:
            labels = torch.where(neg, zero, torch.where(pos, one, labels))
        else:
            labels = torch.where(pos, one, torch.where(neg, zero, labels))

        # subsample: at most num_fg positives, then fill the batch with negatives
        num_fg = int(c.fg_fraction * c.batch_size)
        fg = labels == 1
        keep_fg = self._random_subset(fg, num_fg)
        labels = torch.where(fg & ~keep_fg, -one, labels)
        num_bg = (c.batch_size - (labels == 1).sum()).clamp(min=0)
        bg = labels == 0
        keep_bg = self._random_subset(bg, num_bg)
        labels = torch.where(bg & ~keep_bg, -one, labels)

        fg = labels == 1
        bg = labels == 0
        inside_w = self.constants.get(c.bbox_inside_weights, torch.float64, dev)
        zeros4 = torch.zeros((n, 4), dtype=torch.float64, device=dev)
        bbox_inside = torch.where(fg[:, None], inside_w.expand(n, 4), zeros4)
        p = c.positive_weight
        if p < 0:
            num_examples = (labels >= 0).sum().clamp(min=1).to(torch.float64)
            pos_w = neg_w = 1.0 / num_examples
        else:
            pos_w = p / fg.sum().clamp(min=1).to(torch.float64)
            neg_w = (1.0 - p) / bg.sum().clamp(min=1).to(torch.float64)
        bbox_outside = torch.where(fg[:, None], pos_w.expand(n, 4),
                                   torch.where(bg[:, None], neg_w.expand(n, 4), zeros4))
        targets = torch.where(inside[:, None], targets, zeros4)

        def spatial(x: Tensor) -> Tensor:   # (H*W*A, 4) -> (1, 4A, H, W)
            return (x.reshape(1, height, width, A * 4).permute(0, 3, 1, 2)
                    .to(out_dtype).contiguous())

        labels_out = (labels.reshape(1, height, width, A).permute(0, 3, 1, 2)
                      .reshape(1, 1, A * height, width).to(out_dtype).contiguous())
        return labels_out, spatial(targets), spatial(bbox_inside), spatial(bbox_outside)


# ---------------------------------------------------------------------------- Proposal
@register_python("rpn.proposal_layer.ProposalLayer")
class ProposalLayer(_AnchorMixin, Layer):
    """Object proposals from RPN outputs.

    Bottoms: ``rpn_cls_prob_reshape`` (N, 2A, H, W) (channels ``A:`` are the foreground
    probabilities), ``rpn_bbox_pred`` (N, 4A, H, W), ``im_info`` (N, 3).  Tops: ``rois``
    (R, 5) rows ``[n, x1, y1, x2, y2]`` and optionally ``scores`` (R, 1).  The original
    took one image; here each of N images gets exactly the one-image computation (its
    own ``im_info`` row, NMS and top-N) and its rows, tagged with its batch index ``n``,
    follow those of image ``n - 1`` (batch 1 is unchanged).

    With the cfg section of the net's phase (TRAIN or TEST): apply the deltas to the
    anchors, clip to the image, drop boxes whose ``+1`` width or height is below
    ``RPN_MIN_SIZE * im_info[2]``, keep the ``RPN_PRE_NMS_TOP_N`` best scores (if > 0;
    equal scores keep their (h, w, a) order), NMS at ``RPN_NMS_THRESH``, keep
    ``RPN_POST_NMS_TOP_N`` (if > 0).  Arithmetic runs in the bottoms' dtype, as the
    original ran in float32.  Like Caffe's setup, the declared top shapes are (1, 5) and
    (1, 1, 1, 1); the real ones depend on the data.
    """

    exact_bottoms = 3
    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx) -> None:
        super().__init__(param, bottom_shapes, ctx)
        self._read_anchor_params(param)
        #: the config keys of the net's phase it uses, read once now
        self.opts = ProposalOptions.from_config(build_cfg(ctx), self.phase)
        self._check_shapes(bottom_shapes)

    def _check_shapes(self, shapes: Sequence[Shape]) -> None:
        for shape, what in ((shapes[0], "rpn_cls_prob_reshape"), (shapes[1], "rpn_bbox_pred")):
            if len(shape) != 4:
                raise self.error(ShapeError, f"{what} must be 4-D (N, C, H, W), got {tuple(shape)}")
        n = int(shapes[0][0])
        A = self.num_anchors
        if shapes[0][1] != 2 * A:
            raise self.error(ShapeError, f"rpn_cls_prob_reshape must have 2A = {2 * A} channels "
                                         f"({A} anchors), got {tuple(shapes[0])}")
        if tuple(shapes[1]) != (n, 4 * A) + tuple(shapes[0][2:]):
            raise self.error(ShapeError, f"rpn_bbox_pred must be ({n}, {4 * A}, "
                                         f"{shapes[0][2]}, {shapes[0][3]}), got {tuple(shapes[1])}")
        if n == 1:
            _check_im_info(self, shapes[2])
        elif len(shapes[2]) < 2 or int(shapes[2][0]) != n or int(shapes[2][-1]) < 3:
            raise self.error(ShapeError, f"im_info must be ({n}, 3) = one [height, width, scale] "
                                         f"row per image, got {tuple(shapes[2])}")

    def infer_top_shapes(self, bottom_shapes: Sequence[Shape],
                         bottom_dtypes=None) -> List[Shape]:
        self._check_shapes(bottom_shapes)
        return [(1, 5), (1, 1, 1, 1)][: len(self.top_names)]

    @torch.compiler.disable  # data-dependent sizes and sampling: run eagerly under torch.compile
    def forward(self, cls_prob: Tensor, bbox_pred: Tensor, im_info: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            rois, scores = self._forward(cls_prob.detach(), bbox_pred.detach(), im_info.detach())
        return (rois, scores)[: len(self.top_names)]

    def _forward(self, cls_prob: Tensor, bbox_pred: Tensor, im_info: Tensor) -> Tuple[Tensor, Tensor]:
        self._check_shapes([tuple(cls_prob.shape), tuple(bbox_pred.shape), tuple(im_info.shape)])
        n = int(cls_prob.shape[0])
        if n == 1:
            return self._one_image(cls_prob, bbox_pred, im_info.reshape(-1)[:3], 0)
        # several images (``im_detect_batch``): each one exactly as alone, its rows tagged
        # with its batch index, as ROIPooling expects; per-image NMS needs no cross-talk
        info = im_info.reshape(n, -1)
        parts = [self._one_image(cls_prob[i:i + 1], bbox_pred[i:i + 1], info[i, :3], i)
                 for i in range(n)]
        return (torch.cat([r for r, _ in parts], dim=0).contiguous(),
                torch.cat([s for _, s in parts], dim=0).contiguous())

    def _one_image(self, cls_prob: Tensor, bbox_pred: Tensor, im_info: Tensor,
                   index: int) -> Tuple[Tensor, Tensor]:
        """Proposals of one image ``(1, ., H, W)``; rows ``[index, x1, y1, x2, y2]``."""
        c = self.opts
        pre_n, post_n = c.pre_nms_top_n, c.post_nms_top_n
        A = self.num_anchors
        dtype, dev = bbox_pred.dtype, bbox_pred.device
        height, width = int(cls_prob.shape[-2]), int(cls_prob.shape[-1])
        anchors = self._all_anchors(height, width, dev)
        # (1, A, H, W) / (1, 4A, H, W) -> rows in (h, w, a) order, matching the anchors
        scores = cls_prob[:, A:].permute(0, 2, 3, 1).reshape(-1).to(dtype)
        deltas = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
        info = im_info.to(dtype)

        proposals = bbox_transform_inv(anchors, deltas)
        proposals = clip_boxes(proposals, info[:2])
        keep = filter_boxes(proposals, c.min_size * info[2])
        if keep.dtype == torch.bool:  # one nonzero for both (each mask index is a host read)
            keep = keep.nonzero().squeeze(1)
        proposals, scores = proposals[keep], scores[keep]

        order = torch.sort(scores, descending=True, stable=True).indices
        if pre_n > 0:
            order = order[:pre_n]
        proposals, scores = proposals[order], scores[order]

        keep = nms(proposals, scores, c.nms_thresh)
        if post_n > 0:
            keep = keep[:post_n]
        proposals, scores = proposals[keep], scores[keep]
        first = torch.full_like(proposals[:, :1], float(index)) if index else \
            torch.zeros_like(proposals[:, :1])
        rois = torch.cat([first, proposals], dim=1)
        return rois.contiguous(), scores[:, None].contiguous()


# ---------------------------------------------------------------------------- ProposalTarget
@register_python("rpn.proposal_target_layer.ProposalTargetLayer")
class ProposalTargetLayer(_Sampler, Layer):
    """Sample RoIs for the Fast R-CNN head and give them labels and regression targets.

    Bottoms: ``rpn_rois`` (R, 5) ``[0, x1, y1, x2, y2]``, ``gt_boxes`` (G, 5).  The gt
    boxes join the candidates.  A candidate's label is the class of the gt it overlaps
    most; IoU >= ``FG_THRESH`` -> foreground, ``BG_THRESH_LO <= IoU < BG_THRESH_HI`` ->
    background (label 0).  ``round(FG_FRACTION * BATCH_SIZE)`` foregrounds at most are
    drawn without replacement, then background fills up to ``BATCH_SIZE`` (fewer if
    there are not enough candidates).  Tops (foregrounds first, each group in random
    order): rois (N, 5), labels (N,), and (N, 4K) bbox_targets / inside / outside
    weights, where only the 4 columns of a foreground's class are set: its targets
    (normalized by ``BBOX_NORMALIZE_MEANS/STDS`` when
    ``BBOX_NORMALIZE_TARGETS_PRECOMPUTED``), ``BBOX_INSIDE_WEIGHTS``, and 1 where the
    inside weight is > 0.  With no gt every candidate has IoU 0 (the original crashed).
    Caffe's setup declares (1, 5), (1, 1), (1, 4K) x 3.
    """

    exact_bottoms = 2
    exact_tops = 5

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx) -> None:
        super().__init__(param, bottom_shapes, ctx)
        p = parse_param_str(_param_str(param), self.name, ("num_classes",), required=("num_classes",))
        k = p["num_classes"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise self.error(SchemaError, f"param_str 'num_classes' must be a positive integer, "
                                          f"got {shorten(repr(k), 80)}")
        self.num_classes = k
        #: the config keys it uses, read once now
        self.opts = ProposalTargetOptions.from_config(build_cfg(ctx), self.name)
        self._init_sampler()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, num_classes={self.num_classes}"

    def infer_top_shapes(self, bottom_shapes: Sequence[Shape],
                         bottom_dtypes=None) -> List[Shape]:
        k4 = 4 * self.num_classes
        return [(1, 5), (1, 1), (1, k4), (1, k4), (1, k4)]

    @torch.compiler.disable  # data-dependent sizes and sampling: run eagerly under torch.compile
    def forward(self, rpn_rois: Tensor, gt_boxes: Tensor) -> Tuple[Tensor, ...]:
        with torch.no_grad():
            return self._forward(rpn_rois.detach(), gt_boxes.detach())

    def _forward(self, rpn_rois: Tensor, gt: Tensor) -> Tuple[Tensor, ...]:
        if rpn_rois.dim() != 2 or rpn_rois.shape[1] != 5:
            raise self.error(ShapeError, f"rpn_rois must be (R, 5) rows of [0, x1, y1, x2, y2], "
                                         f"got {tuple(rpn_rois.shape)}")
        _check_gt(self, gt, 5)
        c = self.opts
        dtype, dev = rpn_rois.dtype, rpn_rois.device
        K = self.num_classes
        g = gt.shape[0]
        gt = gt.to(dtype)
        gt_rois = torch.cat([torch.zeros((g, 1), dtype=dtype, device=dev), gt[:, :4]], dim=1)
        all_rois = torch.cat([rpn_rois, gt_rois], dim=0)

        def several_images() -> None:
            raise self.error(DataError, "only single-image batches are supported: every rpn_rois "
                                        "row must have batch index 0")

        self.check_later((all_rois[:, 0] != 0).any(), several_images)
        n = all_rois.shape[0]

        rois_per_image = c.batch_size // 1   # one image
        fg_per_image = round(c.fg_fraction * rois_per_image)   # half to even, as np.round

        if g > 0:
            overlaps = bbox_overlaps(all_rois[:, 1:5].to(torch.float64), gt[:, :4].to(torch.float64))
            assignment = overlaps.argmax(dim=1)
            max_ov = overlaps.gather(1, assignment[:, None])[:, 0]
            labels = gt[assignment, 4]
        else:
            assignment = torch.zeros(n, dtype=torch.long, device=dev)
            max_ov = torch.zeros(n, dtype=torch.float64, device=dev)
            labels = torch.zeros(n, dtype=dtype, device=dev)

        fg = max_ov >= c.fg_thresh
        bg = (max_ov < c.bg_thresh_hi) & (max_ov >= c.bg_thresh_lo)
        # the sample's size is data-dependent: the one host read this layer needs
        n_fg_all, n_bg_all = (int(v) for v in torch.stack([fg.sum(), bg.sum()]).tolist())
        fg_inds = self._random_order(fg, n_fg_all)
        fg_inds = fg_inds[: int(min(fg_per_image, n_fg_all))]
        n_fg = int(fg_inds.shape[0])
        bg_inds = self._random_order(bg, n_bg_all)
        bg_inds = bg_inds[: int(max(0, min(rois_per_image - n_fg, n_bg_all)))]
        keep = torch.cat([fg_inds, bg_inds])

        labels = labels[keep].clone()
        labels[n_fg:] = 0
        rois = all_rois[keep]
        cls = labels.to(torch.long)
        bad_cls = (labels != cls.to(dtype)) | (cls < 0) | (cls >= K)

        def bad_classes() -> None:
            raise self.error(DataError, f"gt_boxes classes must be integers in [0, {K - 1}] "
                                        f"(num_classes {K}); got {labels.unique().tolist()}")

        self.check_later(bad_cls.any(), bad_classes)
        cls = torch.where(bad_cls, torch.zeros_like(cls), cls)   # safe until the check settles
        m = rois.shape[0]
        if g > 0:
            targets = bbox_transform(rois[:, 1:5], gt[assignment[keep], :4])   # bottoms' dtype
            if c.normalize is not None:
                means = self.constants.get(c.normalize[0], torch.float64, dev)
                stds = self.constants.get(c.normalize[1], torch.float64, dev)
                targets = (targets.to(torch.float64) - means) / stds
            targets = targets.to(dtype)
        else:
            targets = torch.zeros((m, 4), dtype=dtype, device=dev)

        # class-specific expansion: row i gets its 4 values in columns 4*cls .. 4*cls+3
        onehot = (torch.arange(K, device=dev)[None, :] == cls[:, None]) & (cls[:, None] > 0)
        zeros = torch.zeros((m, K, 4), dtype=dtype, device=dev)
        bbox_targets = torch.where(onehot[..., None], targets[:, None, :], zeros).reshape(m, 4 * K)
        inside_w = self.constants.get(c.bbox_inside_weights, dtype, dev)
        bbox_inside = torch.where(onehot[..., None], inside_w.expand(m, K, 4), zeros).reshape(m, 4 * K)
        bbox_outside = (bbox_inside > 0).to(dtype)
        return (rois.contiguous(), labels.contiguous(), bbox_targets.contiguous(),
                bbox_inside.contiguous(), bbox_outside)
