"""Export forms: layers whose ``forward`` a tracer cannot record, rewritten with their numbers.

Each form (ROIPooling, Proposal, SSD's DetectionOutput, SegNet's Upsample) takes the layer
module (its parameters as built) and the bottoms, returns the tops, and gives the same
values as the layer's ``forward`` (the tests compare them):

* ``ROIPooling`` calls ``torchvision::roi_pool`` directly (the kernel the layer's
  forward runs, without the autograd wrapper that keeps the fork's backward and the
  batch-index check that reads ROI values on the host);
* py-faster-rcnn's ``ProposalLayer`` (batch 1, as the original) keeps every step of
  :meth:`caffe_compat.frcnn.layers.rpn.ProposalLayer._one_image` but decides nothing in
  Python from data: the min-size filter and the pre-NMS top-N are one mask over the
  score-sorted boxes (filtered boxes sort last with score -inf; a stable sort keeps the
  survivors' order exactly as sorting the survivors alone), NMS is torchvision's
  (:func:`ranked_nms`) on ``x2 + 1, y2 + 1`` with distinct rank scores (Caffe's ``+1`` IoU, ties by order, as
  :func:`caffe_compat.boxes.nms`), and the post-NMS top-N is a slice.  Anchors come from
  the feature map's (possibly symbolic) height and width, so the image size may vary.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
from torch import Tensor

from caffe_compat.errors import ShapeError

__all__ = ["EXPORT_FORMS", "roi_pooling_form", "proposal_form", "legacy_nms", "ranked_nms",
           "detection_output_form", "pooling_form", "upsample_form"]

#: an export form: (layer module, *bottom tensors) -> tuple of tops, the forward's numbers
ExportForm = Callable[..., Tuple[Tensor, ...]]

#: Caffe type (or a Python layer's 'module.layer') -> its export form
EXPORT_FORMS: Dict[str, ExportForm] = {}


def _form(*keys: str) -> Callable[[ExportForm], ExportForm]:
    def deco(fn: ExportForm) -> ExportForm:
        for k in keys:
            EXPORT_FORMS[k] = fn
        return fn
    return deco


def _torchvision_ops() -> None:
    """Import torchvision for its registered ops (``torch.ops.torchvision.*``)."""
    try:
        import torchvision  # noqa: F401
    except ImportError as e:  # pragma: no cover - torchvision is a dependency
        raise ShapeError("exporting ROIPooling or the Proposal layer needs torchvision "
                         f"(its roi_pool and nms ops): {e}") from None


@_form("ROIPooling")
def roi_pooling_form(layer, x: Tensor, rois: Tensor) -> Tuple[Tensor]:
    """The fork's ROI max pooling as one ``torchvision::roi_pool`` node (ONNX ``MaxRoiPool``).

    ``x`` (N, C, H, W); ``rois`` (R, 5) ``[batch, x1, y1, x2, y2]`` (or (R, 5, 1, 1));
    top (R, C, pooled_h, pooled_w)."""
    _torchvision_ops()
    r = rois.reshape(-1, 5).to(x.dtype)
    out, _ = torch.ops.torchvision.roi_pool(x, r, float(layer.spatial_scale), int(layer.pooled_h),
                                            int(layer.pooled_w))
    return (out,)


@torch.library.custom_op("caffe_compat_export::nms", mutates_args=())
def ranked_nms(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """``torchvision::nms`` under its own name, for tracing: torchvision's fake kernel
    declares at least 2 kept boxes (``create_unbacked_symint``'s default minimum), which
    torch.export turns into a run-time assertion that fails on images with 0 or 1
    detections; this one declares 0 or more.  ONNX: ``NonMaxSuppression``."""
    _torchvision_ops()
    return torch.ops.torchvision.nms(boxes, scores, float(iou_threshold))


@ranked_nms.register_fake
def _ranked_nms_fake(boxes: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


def legacy_nms(boxes: Tensor, thresh: float) -> Tensor:
    """Greedy NMS with ``+1`` widths over boxes *already sorted best first*: kept
    positions, best first.  One ``torchvision::nms`` node (ONNX ``NonMaxSuppression``) on
    ``x2 + 1, y2 + 1`` -- the same areas and intersections as Caffe's ``+1`` IoU -- with
    strictly decreasing rank scores, so equal scores keep their order in every backend."""
    _torchvision_ops()
    b = torch.cat([boxes[:, :2], boxes[:, 2:4] + 1], dim=1)
    n = boxes.shape[0]
    rank = torch.arange(n, 0, -1, dtype=boxes.dtype, device=boxes.device)
    return ranked_nms(b, rank, float(thresh))


@_form("rpn.proposal_layer.ProposalLayer")
def proposal_form(layer, cls_prob: Tensor, bbox_pred: Tensor, im_info: Tensor) -> Tuple[Tensor, ...]:
    """py-faster-rcnn's proposals for one image without host decisions (module docstring).

    Bottoms ``(1, 2A, H, W)``, ``(1, 4A, H, W)``, ``im_info`` (1, 3); tops ``rois``
    (R, 5) ``[0, x1, y1, x2, y2]`` and ``scores`` (R, 1), R data-dependent."""
    from caffe_compat.frcnn.boxes import bbox_transform_inv, clip_boxes, filter_boxes, shifted_anchors

    if int(cls_prob.shape[0]) != 1:
        raise layer.error(ShapeError, "exporting the Proposal layer needs batch 1 (the original's "
                                      f"one image); the input has batch {int(cls_prob.shape[0])}")
    c = layer.opts
    A = layer.num_anchors
    dtype = bbox_pred.dtype
    height, width = cls_prob.shape[-2], cls_prob.shape[-1]
    anchors = shifted_anchors(layer.base_anchors.to(bbox_pred.device), height, width, layer.feat_stride)
    scores = cls_prob[:, A:].permute(0, 2, 3, 1).reshape(-1).to(dtype)
    deltas = bbox_pred.permute(0, 2, 3, 1).reshape(-1, 4)
    info = im_info.reshape(-1)[:3].to(dtype)

    proposals = clip_boxes(bbox_transform_inv(anchors, deltas), info[:2])
    valid = filter_boxes(proposals, c.min_size * info[2])
    key = torch.where(valid, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.arange(order.shape[0], device=order.device)
    take = rank < valid.sum()
    if c.pre_nms_top_n > 0:
        take = take & (rank < c.pre_nms_top_n)
    order = order[take]
    proposals, scores = proposals[order], scores[order]

    keep = legacy_nms(proposals, c.nms_thresh)
    if c.post_nms_top_n > 0:
        keep = keep[: c.post_nms_top_n]
    proposals, scores = proposals[keep], scores[keep]
    rois = torch.cat([torch.zeros_like(proposals[:, :1]), proposals], dim=1)
    return (rois, scores[:, None])[: len(layer.top_names)]


def _ssd_decode(prior: Tensor, var: Tensor, loc: Tensor, code_type: int, encoded: bool) -> Tensor:
    """SSD's ``DecodeBBox`` as :func:`caffe_compat.layers.ssd_boxes.decode_boxes` computes
    it (double ``exp`` for CENTER_SIZE), without its host-side check of prior sizes."""
    from caffe_compat.layers.ssd_boxes import CENTER_SIZE, CORNER, _in_double

    px0, py0, px1, py1 = prior.unbind(-1)
    v0, v1, v2, v3 = (1.0,) * 4 if encoded else var.unbind(-1)
    l0, l1, l2, l3 = loc.unbind(-1)
    if code_type == CORNER:
        return torch.stack([px0 + v0 * l0, py0 + v1 * l1, px1 + v2 * l2, py1 + v3 * l3], -1)
    pw, ph = px1 - px0, py1 - py0
    if code_type == CENTER_SIZE:
        cx = v0 * l0 * pw + (px0 + px1) * 0.5
        cy = v1 * l1 * ph + (py0 + py1) * 0.5
        w = _in_double(torch.exp, v2 * l2, pw)
        h = _in_double(torch.exp, v3 * l3, ph)
        return torch.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], -1)
    return torch.stack([px0 + v0 * l0 * pw, py0 + v1 * l1 * ph, px1 + v2 * l2 * pw,
                        py1 + v3 * l3 * ph], -1)


def _stable_top(scores: Tensor, mask: Tensor, k: int) -> Tensor:
    """Indices of ``mask``'s entries by score descending (ties in index order), at most
    ``k`` (``k < 0``: all): a stable sort with the others last, then a prefix."""
    key = torch.where(mask, scores, torch.full_like(scores, float("-inf")))
    order = torch.sort(key, descending=True, stable=True).indices
    rank = torch.arange(order.shape[0], device=order.device)
    take = rank < mask.sum()
    if k > -1:
        take = take & (rank < k)
    return order[take]


@_form("DetectionOutput")
def detection_output_form(layer, loc: Tensor, conf: Tensor, prior: Tensor, *_image: Tensor
                          ) -> Tuple[Tensor]:
    """SSD's DetectionOutput for one image without host decisions: per class, candidates
    strictly above ``confidence_threshold`` by score (stable), cut to ``top_k``, greedy NMS
    (``torchvision::nms`` on rank scores: SSD's normalized IoU has no ``+1``); then the
    best ``keep_top_k`` over all classes, rows by label then score; no detection gives
    the fork's ``[0, -1, -1, ...]`` row.  ``eta < 1`` (adaptive NMS) has no form here.
    Ties between equal scores of different classes in ``keep_top_k`` follow a stable
    sort, not libstdc++'s introsort (the interpreter's choice); they need exactly equal
    float scores."""
    from caffe_compat.errors import SchemaError

    if layer.eta < 1:
        raise layer.error(SchemaError, "DetectionOutput with nms_param.eta < 1 (adaptive NMS) has "
                                       "no export form")
    if int(loc.shape[0]) != 1:
        raise layer.error(ShapeError, f"exporting DetectionOutput needs batch 1, got {int(loc.shape[0])}")
    _torchvision_ops()
    f32 = torch.float32
    C = layer.num_classes
    P = int(prior.shape[2]) // 4
    pri = prior.reshape(-1).to(f32)
    boxes_p, var = pri[: P * 4].reshape(P, 4), pri[P * 4: P * 8].reshape(P, 4)
    locs = loc.reshape(P, layer.num_loc_classes, 4).to(f32).permute(1, 0, 2)
    decoded = _ssd_decode(boxes_p, var, locs, layer.code_type, layer.variance_encoded_in_target)
    scores = conf.reshape(P, C).to(f32)
    labels, picks = [], []
    thr = torch.tensor(layer.confidence_threshold, dtype=f32)
    for c in range(C):
        if c == layer.background_label_id:
            continue
        s = scores[:, c]
        cand = _stable_top(s, s > thr, layer.top_k)
        b = decoded[0 if layer.share_location else c][cand]
        rank = torch.arange(cand.shape[0], 0, -1, dtype=f32, device=b.device)
        kept = cand[ranked_nms(b, rank, float(layer.nms_threshold))]
        picks.append(kept)
        labels.append(torch.full_like(kept, c))
    idx, lab = torch.cat(picks), torch.cat(labels)
    score = scores.reshape(-1)[idx * C + lab]  # flat: two index tensors would broadcast
    if layer.keep_top_k > -1:  # the best keep_top_k overall, rows keep (label, score) order
        sel = _stable_top(score, torch.ones_like(score, dtype=torch.bool), layer.keep_top_k)
        keep = torch.zeros_like(score, dtype=torch.bool).index_fill(0, sel, True)
        idx, lab, score = idx[keep], lab[keep], score[keep]
    box = decoded[0][idx] if layer.share_location else decoded.reshape(-1, 4)[lab * P + idx]
    rows = torch.cat([torch.zeros_like(score)[:, None], lab.to(f32)[:, None], score[:, None], box], 1)
    none = torch.tensor([[0.0, -1, -1, -1, -1, -1, -1]], dtype=f32)
    empty = (torch.ones_like(score).sum() == 0).reshape(1)  # a tensor: no host decision
    use = torch.cat([torch.ones_like(score, dtype=torch.bool), empty])
    out = torch.cat([rows, none])[use]
    return (out.to(loc.dtype).reshape(1, 1, -1, 7),)


@_form("Upsample")
def upsample_form(layer, x: Tensor, *mask: Tensor) -> Tuple[Tensor]:
    """SegNet/ENet unpooling without the host-side range check of the mask (its forward's
    scatter as it is); the YOLO ports' one-bottom form is the layer's own forward."""
    if not mask:
        return layer(x)
    from caffe_compat.layers.segmentation import _Unpool

    _, _, oh, ow = layer._out_shape([tuple(x.shape), tuple(mask[0].shape)])
    return (_Unpool.apply(x, mask[0], int(oh), int(ow)),)


@_form("Pooling")
def pooling_form(layer, x: Tensor) -> Tuple[Tensor, ...]:
    """Global MAX/AVE pooling over a *symbolic* (dynamic) map as a reduction (ONNX
    ``ReduceMax``/``ReduceMean``): the layer's own forward would take the map's size as its
    kernel, which ONNX's pooling ops need fixed.  Same numbers up to the sum's float order
    (AVE).  Every other pooling, and any at a fixed size, is the layer's own forward."""
    from caffe_compat.layers.vision import AVE, MAX

    symbolic = x.dim() == 4 and any(isinstance(d, torch.SymInt) for d in x.shape[2:])
    if not (symbolic and layer.global_pooling and layer.method in (MAX, AVE)
            and len(layer.top_names) == 1):
        return layer(x)
    if layer.method == MAX:
        return (x.amax(dim=(2, 3), keepdim=True),)
    return (x.mean(dim=(2, 3), keepdim=True),)
