"""The SSD fork's training loss: ``MultiBoxLoss``.

Follows weiliu89/caffe, branch ``ssd``, commit 4817bf8b4200b35ada8ed0dc378dceaf38c539e4:
``src/caffe/layers/multibox_loss_layer.cpp`` and, in ``src/caffe/util/bbox_util.cpp``,
``GetGroundTruth``, ``MatchBBox``, ``FindMatches``, ``MineHardExamples``, ``ApplyNMS``,
``EncodeLocPrediction``, ``ComputeLocLoss``, ``ComputeConfLoss`` and
``EncodeConfPrediction``.  Box maths (IoU, encode/decode) comes from
:mod:`caffe_compat.layers.ssd_boxes`; boxes are normalized, no ``+1`` widths, float32
(the fork keeps every box in a ``NormalizedBBox`` of float fields, whatever the blob type).

What the layer computes, per batch:

1. Ground truth: rows ``[item_id, label, instance_id, xmin, ymin, xmax, ymax, difficult]``;
   ``item_id == -1`` rows are skipped, difficult ones too unless ``use_difficult_gt``;
   a row labelled ``background_label_id`` is an error.
2. Matching (``match_type``): every prior (``use_prior_for_matching``, the default) or every
   decoded prediction is matched greedily to ground truth -- repeatedly the globally largest
   overlap (> 1e-6) among unmatched predictions and unused ground truth, ties to the lower
   prediction index, then the lower ground-truth index (``BIPARTITE``; no threshold);
   ``PER_PREDICTION`` then gives each still-unmatched prediction its best ground truth with
   IoU ``>= overlap_threshold`` (ties to the lower index).  ``ignore_cross_boundary_bbox``
   marks predictions outside ``[0, 1]`` as ignored (-2): never positive, never negative.
3. Mining (``mining_type``): ``MAX_NEGATIVE`` keeps, per image, the
   ``int(num_pos * neg_pos_ratio)`` unmatched priors whose best IoU is ``< neg_overlap``
   with the largest confidence loss (background as the label); ``HARD_EXAMPLE`` ranks all
   priors by confidence + localization loss, keeps ``sample_size`` and turns unkept
   positives into ignored ones.  With ``nms_param`` (threshold > 0) the candidates go
   through the fork's ``ApplyNMS`` on their loss first.  Only the *set* of picked priors
   matters; the fork picks it with ``std::sort`` (not stable), so when equal losses
   straddle the cut the libstdc++ introsort order decides -- reproduced with
   :func:`caffe_compat.layers.ssd._gnu_sort`.  An image with no ground truth gives no
   negatives at all under mining.
4. Loss: localization (``SMOOTH_L1``: ``0.5 d^2`` if ``|d| < 1`` else ``|d| - 0.5``; ``L2``:
   ``0.5 d^2``) summed over the matched predictions' 4 offsets against the encoded ground
   truth; confidence (``SOFTMAX``: ``-log(max(p_label, FLT_MIN))``; ``LOGISTIC``: sigmoid
   cross-entropy summed over classes) summed over positives and mined negatives, or over
   every prior without mining.  ``top = loc_weight * L_loc / n + L_conf / n`` with
   ``n = max(1, normalizer)`` from ``loss_param`` (``VALID``, the default: the number of
   matches; ``FULL``: num * num_priors; ``BATCH_SIZE``: num; ``NONE``: 1); a term is left
   out when ``propagate_down`` says the fork does not back-propagate to its bottom.

The fork's backward computes the inner losses' diffs on the gathered rows and copies them
back to the matched/mined positions of ``loc`` and ``conf``; every position is written at
most once, so autograd through the gather gives the same numbers (checked against a numpy
transcription of the fork in the tests).  No gradient reaches the priors or the labels.

Fork behaviours reproduced on purpose (they look like bugs but change numbers):

* ``bp_inside``: where the matched prior (or decoded box) has a coordinate outside
  ``[0, 1]`` the prediction is replaced by its target, so that offset has zero loss and
  zero gradient.
* ``encode_variance_in_target``: both prediction and target are divided by the prior
  variance before the loss, but the backward copies the gradient w.r.t. the divided
  prediction to ``loc`` as it is (autograd would multiply it by ``1 / variance``).
* ``LOGISTIC`` targets are first filled with ``background_label_id`` (as a float, e.g.
  ``-1``), then positives get a 1 at their label; without mining the fork advances the
  target pointer by ``num_priors`` (not ``num_priors * num_classes``) per image, so the 1s
  of image ``i`` land at flat index ``i * num_priors + j * num_classes + label``.
* ``nms_param`` without ``top_k`` means ``top_k = 0``: the NMS keeps nothing and no
  example is mined.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.loss import FLT_MIN, _legacy_dim
from caffe_compat.layers.registry import register
from caffe_compat.layers.ssd import _gnu_sort, _score_desc
from caffe_compat.layers.ssd_boxes import (box_size, code_type_id, decode_boxes, encode_boxes,
                                           jaccard_overlap)
from caffe_compat.protos import caffe_pb2

__all__ = ["MultiBoxLossOptions", "GroundTruth", "ground_truth", "match_bbox", "find_matches",
           "apply_nms", "multibox_loss", "MultiBoxLoss"]

_P = caffe_pb2.MultiBoxLossParameter
_NORM = caffe_pb2.LossParameter
LOC_LOSS_TYPES = {_P.SMOOTH_L1: "SMOOTH_L1", _P.L2: "L2"}
CONF_LOSS_TYPES = {_P.SOFTMAX: "SOFTMAX", _P.LOGISTIC: "LOGISTIC"}
MATCH_TYPES = {_P.BIPARTITE: "BIPARTITE", _P.PER_PREDICTION: "PER_PREDICTION"}
MINING_TYPES = {_P.NONE: "NONE", _P.MAX_NEGATIVE: "MAX_NEGATIVE", _P.HARD_EXAMPLE: "HARD_EXAMPLE"}
NORMALIZATIONS = {_NORM.FULL: "FULL", _NORM.VALID: "VALID", _NORM.BATCH_SIZE: "BATCH_SIZE",
                  _NORM.NONE: "NONE"}

# the fork's float constants, as floats (compared in float32 like its ``float`` variables)
_F32 = np.float32


@dataclass(frozen=True)
class MultiBoxLossOptions:
    """``multibox_loss_param`` (+ normalization and propagate_down), enum values by name."""

    num_classes: int
    share_location: bool = True
    background_label_id: int = 0
    use_difficult_gt: bool = True
    match_type: str = "PER_PREDICTION"
    overlap_threshold: float = 0.5
    use_prior_for_matching: bool = True
    code_type: int = 1  # CORNER
    encode_variance_in_target: bool = False
    ignore_cross_boundary_bbox: bool = False
    bp_inside: bool = False
    map_object_to_agnostic: bool = False
    mining_type: str = "MAX_NEGATIVE"
    neg_pos_ratio: float = 3.0
    neg_overlap: float = 0.5
    sample_size: int = 64
    has_nms_param: bool = False
    nms_threshold: float = 0.0
    nms_top_k: int = -1
    use_prior_for_nms: bool = False
    loc_loss_type: str = "SMOOTH_L1"
    conf_loss_type: str = "SOFTMAX"
    loc_weight: float = 1.0
    normalization: str = "VALID"
    #: the fork adds a term only when it back-propagates to that bottom (propagate_down)
    loc_in_loss: bool = True
    conf_in_loss: bool = True

    def check(self) -> None:
        """The fork's LayerSetUp CHECKs, as ValueError naming the field."""
        if self.num_classes < 1:
            raise ValueError("num_classes must be given and >= 1")
        for name, val, allowed in (("match_type", self.match_type, MATCH_TYPES),
                                   ("mining_type", self.mining_type, MINING_TYPES),
                                   ("loc_loss_type", self.loc_loss_type, LOC_LOSS_TYPES),
                                   ("conf_loss_type", self.conf_loss_type, CONF_LOSS_TYPES),
                                   ("normalization", self.normalization, NORMALIZATIONS)):
            if val not in allowed.values():
                raise ValueError(f"unknown {name} {val!r}; allowed: {', '.join(allowed.values())}")
        code_type_id(self.code_type)
        if self.mining_type != "NONE" and not self.share_location:
            raise ValueError("negative mining (mining_type MAX_NEGATIVE / HARD_EXAMPLE) needs "
                             "share_location: true (the fork supports nothing else)")
        if self.conf_loss_type == "SOFTMAX" and not 0 <= self.background_label_id < self.num_classes:
            raise ValueError(f"background_label_id {self.background_label_id} must be in "
                             f"[0, num_classes = {self.num_classes}) for the SOFTMAX confidence loss")
        if self.map_object_to_agnostic:
            want = 2 if self.background_label_id >= 0 else 1
            if self.num_classes != want:
                raise ValueError(f"map_object_to_agnostic needs num_classes {want} with "
                                 f"background_label_id {self.background_label_id}")
        if self.mining_type == "HARD_EXAMPLE" and self.sample_size <= 0:
            raise ValueError("sample_size must be > 0 for mining_type HARD_EXAMPLE")


# ============================================================================ ground truth
@dataclass
class GroundTruth:
    """One image's ground truth, in the order of the label blob (difficult ones dropped
    unless ``use_difficult_gt``): boxes (G, 4) float32, labels (G,) int64, difficult (G,)."""

    boxes: Tensor
    labels: Tensor
    difficult: Tensor


def ground_truth(gt: Tensor, num_gt: int, background_label_id: int,
                 use_difficult_gt: bool) -> Dict[int, GroundTruth]:
    """The fork's ``GetGroundTruth`` (the ``map<int, vector<NormalizedBBox>>`` version).

    ``gt`` holds ``num_gt`` rows of 8 values; ids and labels are truncated to int as
    ``static_cast<int>`` does; ``item_id == -1`` rows are skipped (not a terminator).
    """
    rows = gt.detach().reshape(-1)[:num_gt * 8].reshape(num_gt, 8).to("cpu", torch.float64).numpy()
    if not np.isfinite(rows[:, :2]).all():
        raise DataError("ground truth has a non-finite item id or label")
    per: Dict[int, List[int]] = {}
    for r in range(num_gt):
        item = int(rows[r, 0])
        if item == -1:
            continue
        label = int(rows[r, 1])
        if label == background_label_id:
            raise DataError(f"ground truth row {r} has the background label {label} "
                            "(background_label_id); the fork refuses it")
        difficult = bool(rows[r, 7] != 0)
        if not use_difficult_gt and difficult:
            continue
        per.setdefault(item, []).append(r)
    out: Dict[int, GroundTruth] = {}
    dev = gt.device
    for item, rs in per.items():
        sel = rows[rs]
        out[item] = GroundTruth(
            boxes=torch.from_numpy(sel[:, 3:7].astype(np.float32)).to(dev),
            labels=torch.from_numpy(np.clip(sel[:, 1], -2.0 ** 31, 2.0 ** 31 - 1).astype(np.int64)).to(dev),
            difficult=torch.from_numpy(sel[:, 7] != 0).to(dev))
    return out


# ============================================================================ matching
def match_bbox(gt_boxes: Tensor, gt_labels: Tensor, pred_boxes: Tensor, label: int,
               match_type: str, overlap_threshold: float,
               ignore_cross_boundary_bbox: bool = False) -> Tuple[Tensor, Tensor]:
    """The fork's ``MatchBBox``: ``(match_indices (P,) int64, match_overlaps (P,) float32)``.

    ``gt_boxes`` (G, 4), ``pred_boxes`` (P, 4), float32 normalized.  ``label == -1`` matches
    against every ground truth, otherwise only against those with that label.  Indices
    are ground-truth rows (into ``gt_boxes``), -1 for unmatched, -2 for ignored
    cross-boundary predictions.  ``match_overlaps`` is each prediction's largest IoU
    (counting only IoU > 1e-6; 0 for ignored ones), or the IoU of its match.
    """
    dev = pred_boxes.device
    num_pred = pred_boxes.shape[0]
    idx = torch.full((num_pred,), -1, dtype=torch.int64, device=dev)
    ov = torch.zeros(num_pred, dtype=torch.float32, device=dev)
    if label == -1:
        gsel = torch.arange(gt_boxes.shape[0], device=dev)
    else:
        gsel = torch.nonzero(gt_labels == label).reshape(-1)
    g = int(gsel.numel())
    if g == 0 or num_pred == 0:
        return idx, ov
    pred = pred_boxes.detach().to(torch.float32)
    O = jaccard_overlap(pred, gt_boxes.to(torch.float32)[gsel])  # (P, g)
    present = O.double() > 1e-6
    if ignore_cross_boundary_bbox:
        cross = ((pred < 0) | (pred > 1)).any(dim=1)
        idx[cross] = -2
        present &= ~cross.unsqueeze(1)
    ov = torch.where(present, O, torch.zeros_like(O)).amax(dim=1)
    neg_inf = torch.tensor(float("-inf"), dtype=O.dtype, device=dev)
    W = torch.where(present, O, neg_inf)
    # bipartite: the global maximum among free predictions x unused ground truth, first in
    # (prediction, ground truth) order on ties -- torch.argmax returns the first maximum
    free_row = (idx == -1) & present.any(dim=1)
    pool = torch.ones(g, dtype=torch.bool, device=dev)
    for _ in range(g):
        M = torch.where(free_row.unsqueeze(1) & pool.unsqueeze(0), W, neg_inf)
        flat = int(torch.argmax(M.reshape(-1)))
        i, j = divmod(flat, g)
        if not bool(M[i, j] > neg_inf):
            break
        idx[i] = gsel[j]
        ov[i] = O[i, j]
        free_row[i] = False
        pool[j] = False
    if match_type == "PER_PREDICTION":
        thr = torch.tensor(overlap_threshold, dtype=torch.float32, device=dev)
        cand = present & (O >= thr) & (idx == -1).unsqueeze(1)
        rows = torch.nonzero(cand.any(dim=1)).reshape(-1)
        if rows.numel():
            best = torch.argmax(torch.where(cand[rows], O[rows], neg_inf), dim=1)
            idx[rows] = gsel[best]
            ov[rows] = O[rows, best]
    elif match_type != "BIPARTITE":
        raise ValueError(f"unknown match_type {match_type!r}; allowed: BIPARTITE, PER_PREDICTION")
    return idx, ov


Matches = Dict[int, Tuple[Tensor, Tensor]]  # label key -> (match_indices, match_overlaps)


def find_matches(loc: Tensor, gts: Dict[int, GroundTruth], priors: Tensor, variances: Tensor,
                 opts: MultiBoxLossOptions) -> List[Matches]:
    """The fork's ``FindMatches`` for every image: ``[ {label key: (indices, overlaps)} ]``.

    ``loc`` (N, P, loc_classes, 4).  Keys are ``-1`` with ``share_location``, else each
    non-background class (in ascending order, the ``std::map`` order); an image without
    ground truth gets no key at all.
    """
    num = loc.shape[0]
    loc_classes = 1 if opts.share_location else opts.num_classes
    out: List[Matches] = []
    for i in range(num):
        m: Matches = {}
        gt = gts.get(i)
        if gt is None:
            out.append(m)
            continue
        if not opts.use_prior_for_matching:
            for c in range(loc_classes):
                label = -1 if opts.share_location else c
                if not opts.share_location and label == opts.background_label_id:
                    continue
                boxes = decode_boxes(priors, variances, loc[i, :, c].detach().to(torch.float32),
                                     opts.code_type, opts.encode_variance_in_target, clip=False)
                m[label] = match_bbox(gt.boxes, gt.labels, boxes, label, opts.match_type,
                                      opts.overlap_threshold, opts.ignore_cross_boundary_bbox)
        else:
            idx, ov = match_bbox(gt.boxes, gt.labels, priors, -1, opts.match_type,
                                 opts.overlap_threshold, opts.ignore_cross_boundary_bbox)
            if opts.share_location:
                m[-1] = (idx, ov)
            else:
                matched_label = torch.where(idx > -1, gt.labels[idx.clamp(min=0)],
                                            torch.full_like(idx, -10 ** 9))
                for c in range(loc_classes):
                    if c == opts.background_label_id:
                        continue
                    m[c] = (torch.where(matched_label == c, idx, torch.full_like(idx, -1)), ov.clone())
        out.append(dict(sorted(m.items())))
    return out


# ============================================================================ mining helpers
def apply_nms(boxes: Tensor, scores: np.ndarray, threshold: float, top_k: int) -> List[int]:
    """The fork's ``ApplyNMS`` (the one hard example mining uses, not ``ApplyNMSFast``).

    Candidates sorted by score, descending, stably; cut to ``top_k`` when ``top_k > -1``;
    boxes of size < 1e-5 are dropped; a kept box removes later ones with IoU > threshold;
    stops once ``top_k`` are kept.  Returns positions into ``boxes``/``scores``.
    """
    n = len(scores)
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")
    if top_k > -1:
        order = order[:top_k]
    b = boxes.detach().to(torch.float32).reshape(-1, 4)
    small = (box_size(b).double() < 1e-5).cpu().numpy()
    thr = torch.tensor(threshold, dtype=torch.float32, device=b.device)
    kept: List[int] = []
    remaining = [int(k) for k in order]
    while remaining and n:
        best = remaining.pop(0)
        if small[best]:
            continue
        kept.append(best)
        if top_k > -1 and len(kept) >= top_k:
            break
        if not remaining:
            break
        rem = torch.tensor(remaining, dtype=torch.int64, device=b.device)
        ov = jaccard_overlap(b[best:best + 1], b[rem])[0]
        keep = (~torch.from_numpy(small[remaining]).to(b.device)) & ~(ov > thr)
        remaining = [r for r, k in zip(remaining, keep.tolist()) if k]
    return kept


def _top_set(values: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` largest ``values`` as the fork's ``std::sort`` (descending by
    value) and a cut at ``k`` pick them.  The set is all that matters: when no tie crosses
    the cut any sort gives it; otherwise the libstdc++ introsort order decides."""
    n = len(values)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n, dtype=np.int64)
    v = np.asarray(values, np.float32)
    if not np.isnan(v).any():
        order = np.argsort(-v, kind="stable")
        if v[order[k - 1]] != v[order[k]]:
            return order[:k]
    pairs = [(float(x), i) for i, x in enumerate(v)]
    _gnu_sort(pairs, _score_desc)
    return np.asarray([p[1] for p in pairs[:k]], dtype=np.int64)


def _conf_losses(conf: Tensor, labels: Tensor, loss_type: str) -> Tensor:
    """Per-prior confidence loss (the fork's ``ComputeConfLoss``): ``conf`` (N, P, C),
    ``labels`` (N, P) (-1 or out of range: no positive class, LOGISTIC only) -> float32."""
    x = conf.detach()
    if loss_type == "SOFTMAX":
        prob = torch.softmax(x, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        loss = -torch.log(prob.clamp(min=FLT_MIN))
    else:
        c = x.shape[-1]
        t = (labels.unsqueeze(-1) == torch.arange(c, device=x.device)).to(x.dtype)
        loss = F.binary_cross_entropy_with_logits(x, t, reduction="none").sum(-1)
    return loss.to(torch.float32)


def _loc_elementwise(d: Tensor, loss_type: str) -> Tensor:
    if loss_type == "SMOOTH_L1":
        a = d.abs()
        return torch.where(a < 1, 0.5 * d * d, a - 0.5)
    return 0.5 * d * d


# ============================================================================ the loss
@dataclass
class MultiBoxStats:
    """What one forward matched and mined (for inspection and tests)."""

    num_matches: int
    num_negs: int
    num_conf: int
    normalizer: float
    loc_loss: float
    conf_loss: float
    matches: List[Matches]
    neg_indices: List[Tensor]


def _encode_loc(loc: Tensor, gts: Dict[int, GroundTruth], matches: List[Matches], priors: Tensor,
                variances: Tensor, opts: MultiBoxLossOptions
                ) -> Tuple[Tensor, Tensor, List[Tuple[int, Tensor]]]:
    """The fork's ``EncodeLocPrediction``: gathered predictions (differentiable) and targets,
    (K, 4) each, in (image, label key, prior) order; plus where each block came from."""
    preds: List[Tensor] = []
    tgts: List[Tensor] = []
    where: List[Tuple[int, Tensor]] = []
    for i, m in enumerate(matches):
        for key, (idx, _) in m.items():
            js = torch.nonzero(idx > -1).reshape(-1)
            if js.numel() == 0:
                continue
            slot = 0 if opts.share_location else key
            pred = loc[i, js, slot]
            gt = gts[i]
            tgt = encode_boxes(priors[js], variances[js], gt.boxes[idx[js]], opts.code_type,
                               opts.encode_variance_in_target).to(loc.dtype)
            if opts.bp_inside:
                if opts.use_prior_for_matching:
                    mb = priors[js]
                else:
                    mb = decode_boxes(priors[js], variances[js], pred.detach().to(torch.float32),
                                      opts.code_type, opts.encode_variance_in_target, clip=False)
                outside = (mb < 0) | (mb > 1)
                pred = torch.where(outside, tgt, pred)
            if opts.encode_variance_in_target:
                v = variances[js]
                if not bool((v > 0).all()):
                    raise DataError("prior variances must be > 0 with encode_variance_in_target "
                                    "(the fork CHECKs this)")
                v = v.to(loc.dtype)
                # the fork copies the diff w.r.t. the *divided* prediction back to loc
                # unscaled (no 1 / variance chain factor): identity gradient here
                pred = pred + (pred / v - pred).detach()
                tgt = tgt / v
            preds.append(pred)
            tgts.append(tgt)
            where.append((i, js))
    if preds:
        return torch.cat(preds), torch.cat(tgts).detach(), where
    empty = loc.new_zeros((0, 4))
    return empty, empty, where


def multibox_loss(loc: Tensor, conf: Tensor, prior: Tensor, gt: Tensor, opts: MultiBoxLossOptions,
                  *, num_gt: Optional[int] = None) -> Tuple[Tensor, MultiBoxStats]:
    """The fork's ``MultiBoxLoss`` forward (autograd gives its backward): ``(loss, stats)``.

    Shapes: ``loc`` (N, P * loc_classes * 4), ``conf`` (N, P * num_classes) (any trailing
    layout with that count per image, read flat as the fork does), ``prior`` (1, 2, P * 4)
    (boxes then variances), ``gt`` (1, 1, G, 8) rows ``[item_id, label, instance_id, xmin,
    ymin, xmax, ymax, difficult]`` (``num_gt`` rows are read; default: all).  ``loss`` is a
    0-d tensor in ``loc``'s dtype; no gradient reaches ``prior`` or ``gt``.
    """
    opts.check()
    num = loc.shape[0]
    loc_classes = 1 if opts.share_location else opts.num_classes
    num_priors = prior.numel() // 8
    C = opts.num_classes
    locv = loc.reshape(num, num_priors, loc_classes, 4)
    confv = conf.reshape(num, num_priors, C)
    pv = prior.detach().reshape(-1).to(torch.float32)
    priors = pv[:num_priors * 4].reshape(num_priors, 4)
    variances = pv[num_priors * 4:num_priors * 8].reshape(num_priors, 4)
    if num_gt is None:
        num_gt = gt.numel() // 8
    gts = ground_truth(gt, num_gt, opts.background_label_id, opts.use_difficult_gt)

    matches = find_matches(locv, gts, priors, variances, opts)
    num_matches = sum(int((idx > -1).sum()) for m in matches for idx, _ in m.values())
    do_mining = opts.mining_type != "NONE"

    def gt_label(i: int, gidx: Tensor) -> Tensor:
        if opts.map_object_to_agnostic:
            return torch.full_like(gidx, opts.background_label_id + 1)
        return gts[i].labels[gidx]

    # per-prior label the confidence loss uses for mining: first key with a match
    def prior_labels() -> Tensor:
        lab = torch.full((num, num_priors), opts.background_label_id, dtype=torch.int64,
                         device=loc.device)
        for i, m in enumerate(matches):
            done = torch.zeros(num_priors, dtype=torch.bool, device=loc.device)
            for idx, _ in m.values():
                hit = (idx > -1) & ~done
                if bool(hit.any()):
                    got = gts[i].labels[idx[hit]]
                    if bool(((got < 0) | (got >= C)).any()):
                        raise DataError(f"ground-truth label {int(got[(got < 0) | (got >= C)][0])} "
                                        f"out of range [0, num_classes = {C})")
                    lab[i, hit] = got
                    done |= hit
        return lab

    neg_indices: List[Tensor] = [torch.zeros(0, dtype=torch.int64, device=loc.device)] * num
    num_negs = 0
    if do_mining:
        conf_loss_pp = _conf_losses(confv, prior_labels(), opts.conf_loss_type).cpu().numpy()
        loc_loss_pp = np.zeros((num, num_priors), np.float32)
        if opts.mining_type == "HARD_EXAMPLE" and num_matches:
            lp, lt, where = _encode_loc(locv.detach(), gts, matches, priors, variances, opts)
            per = _loc_elementwise(lp - lt, opts.loc_loss_type).sum(-1).to(torch.float32).cpu().numpy()
            k = 0
            for i, js in where:
                n = int(js.numel())
                loc_loss_pp[i, js.cpu().numpy()] = per[k:k + n]
                k += n
        loss_pp = conf_loss_pp + loc_loss_pp  # float32, as the fork's vector<float>
        neg_overlap = _F32(opts.neg_overlap)
        new_matches: List[Matches] = []
        for i, m in enumerate(matches):
            negs: List[np.ndarray] = []
            nm: Matches = {}
            for key, (idx, ov) in m.items():
                orig = idx.cpu().numpy()
                idx_np = orig.copy()
                ov_np = ov.cpu().numpy()
                if opts.mining_type == "MAX_NEGATIVE":
                    elig = np.nonzero((idx_np == -1) & (ov_np < neg_overlap))[0]
                    num_pos = int((idx_np > -1).sum())
                    num_sel = min(int(_F32(num_pos) * _F32(opts.neg_pos_ratio)), len(elig))
                else:
                    elig = np.arange(num_priors)
                    num_sel = min(opts.sample_size, len(elig))
                sel_loss = loss_pp[i, elig]
                if opts.has_nms_param and opts.nms_threshold > 0:
                    if opts.use_prior_for_nms:
                        boxes = priors[torch.from_numpy(elig).to(loc.device)]
                    else:
                        slot = 0 if opts.share_location else key
                        dec = decode_boxes(priors, variances, locv[i, :, slot].detach().to(torch.float32),
                                           opts.code_type, opts.encode_variance_in_target, clip=False)
                        boxes = dec[torch.from_numpy(elig).to(loc.device)]
                    kept = apply_nms(boxes, sel_loss, opts.nms_threshold, opts.nms_top_k)
                    num_sel = min(len(kept), num_sel)
                    chosen = elig[np.asarray(kept[:num_sel], dtype=np.int64)]
                else:
                    chosen = elig[_top_set(sel_loss, num_sel)]
                sel = np.zeros(num_priors, dtype=bool)
                sel[chosen] = True
                if opts.mining_type == "HARD_EXAMPLE":
                    drop = (idx_np > -1) & ~sel
                    idx_np[drop] = -1
                # negatives: unmatched before this step (ignored -2 never) and picked
                negs.append(np.nonzero((orig == -1) & sel)[0])
                nm[key] = (torch.from_numpy(idx_np).to(loc.device), ov)
            new_matches.append(nm)
            neg = np.concatenate(negs) if negs else np.zeros(0, np.int64)
            neg_indices[i] = torch.from_numpy(neg.astype(np.int64)).to(loc.device)
            num_negs += len(neg)
        matches = new_matches
        num_matches = sum(int((idx > -1).sum()) for m in matches for idx, _ in m.values())

    # ---------------------------------------------------------------- localization
    zero = loc.reshape(-1)[:0].sum() + conf.reshape(-1)[:0].sum()  # 0 inside the graph
    loc_loss = zero
    if num_matches >= 1:
        lp, lt, _ = _encode_loc(locv, gts, matches, priors, variances, opts)
        loc_loss = _loc_elementwise(lp - lt, opts.loc_loss_type).sum()

    # ---------------------------------------------------------------- confidence
    num_conf = num_matches + num_negs if do_mining else num * num_priors
    conf_loss = zero
    if num_conf >= 1:
        if do_mining:
            rows: List[Tensor] = []
            labs: List[Tensor] = []
            kinds: List[Tensor] = []  # True: positive
            for i, m in enumerate(matches):
                if i not in gts:
                    continue
                for key, (idx, _) in m.items():
                    js = torch.nonzero(idx > -1).reshape(-1)
                    rows.append(i * num_priors + js)
                    labs.append(gt_label(i, idx[js]))
                    kinds.append(torch.ones_like(js, dtype=torch.bool))
                js = neg_indices[i]
                rows.append(i * num_priors + js)
                labs.append(torch.full_like(js, opts.background_label_id))
                kinds.append(torch.zeros_like(js, dtype=torch.bool))
            row = torch.cat(rows)
            lab = torch.cat(labs)
            pos = torch.cat(kinds)
            x = confv.reshape(num * num_priors, C)[row]
        else:
            x = confv.reshape(num * num_priors, C)
            lab = torch.full((num * num_priors,), opts.background_label_id, dtype=torch.int64,
                             device=loc.device)
            pos = torch.zeros(num * num_priors, dtype=torch.bool, device=loc.device)
            flat_pos: List[Tensor] = []  # LOGISTIC: the fork's flat target positions
            for i, m in enumerate(matches):
                if i not in gts:
                    continue
                for key, (idx, _) in m.items():
                    js = torch.nonzero(idx > -1).reshape(-1)
                    gl = gt_label(i, idx[js])
                    lab[i * num_priors + js] = gl
                    pos[i * num_priors + js] = True
                    flat_pos.append(i * num_priors + js * C + gl)
        used = lab[pos]
        if used.numel() and bool(((used < 0) | (used >= C)).any()):
            bad = int(used[(used < 0) | (used >= C)][0])
            raise DataError(f"ground-truth label {bad} out of range [0, num_classes = {C})")
        if opts.conf_loss_type == "SOFTMAX":
            lsm = torch.log_softmax(x, dim=1).gather(1, lab.unsqueeze(1)).squeeze(1)
            floor = torch.tensor(float(np.log(FLT_MIN)), dtype=lsm.dtype, device=lsm.device)
            # value: log(max(p, FLT_MIN)); gradient: p - onehot, as the fork's backward
            clamped = lsm + (torch.maximum(lsm, floor) - lsm).detach()
            conf_loss = -clamped.sum()
        else:
            t = torch.full_like(x, float(opts.background_label_id))
            if do_mining:
                t[pos, lab[pos]] = 1
                if 0 <= opts.background_label_id < C:
                    t[~pos, opts.background_label_id] = 1
            elif flat_pos:
                t.view(-1)[torch.cat(flat_pos)] = 1
            conf_loss = F.binary_cross_entropy_with_logits(x, t.detach(), reduction="sum")

    # ---------------------------------------------------------------- normalization
    if opts.normalization == "VALID":
        norm = num_matches
    elif opts.normalization == "FULL":
        norm = num * num_priors
    elif opts.normalization == "BATCH_SIZE":
        norm = num
    else:
        norm = 1
    norm = float(max(1, norm))
    total = zero
    if opts.loc_in_loss:
        total = total + loc_loss * (opts.loc_weight / norm)
    if opts.conf_in_loss:
        total = total + conf_loss / norm
    stats = MultiBoxStats(num_matches, num_negs, num_conf, norm, float(loc_loss.detach()),
                          float(conf_loss.detach()), matches, neg_indices)
    return total, stats


# ============================================================================ the layer
def _as_int32(v: int) -> int:
    """A ``uint32`` proto field stored into a C++ ``int`` (the fork's background_label_id):
    4294967295 reads as -1."""
    v = int(v) & 0xFFFFFFFF
    return v - (1 << 32) if v >= (1 << 31) else v


def options_from_param(param, *, layer: Optional[Layer] = None) -> MultiBoxLossOptions:
    """``MultiBoxLossOptions`` from a ``LayerParameter`` (the fork's LayerSetUp)."""
    p = param.multibox_loss_param

    def err(msg: str):
        return layer.error(SchemaError, msg) if layer is not None else SchemaError(msg)

    if not p.HasField("num_classes"):
        raise err("multibox_loss_param.num_classes is required")
    mining = MINING_TYPES.get(p.mining_type)
    if mining is None:
        raise err(f"unknown multibox_loss_param.mining_type {p.mining_type}; allowed: "
                  f"{', '.join(MINING_TYPES.values())}")
    if p.HasField("do_neg_mining") and bool(p.do_neg_mining) != (mining != "NONE"):
        raise err(f"do_neg_mining: {str(p.do_neg_mining).lower()} contradicts mining_type {mining} "
                  "(do_neg_mining is deprecated; the fork requires them to agree: set "
                  "mining_type: NONE for no mining)")
    for name, val, table in (("loc_loss_type", p.loc_loss_type, LOC_LOSS_TYPES),
                             ("conf_loss_type", p.conf_loss_type, CONF_LOSS_TYPES),
                             ("match_type", p.match_type, MATCH_TYPES)):
        if val not in table:
            raise err(f"unknown multibox_loss_param.{name} {val}; allowed: {', '.join(table.values())}")
    lp = param.loss_param
    if lp.HasField("normalization") or not lp.HasField("normalize"):
        norm_id = int(lp.normalization)
    else:  # the legacy flag counts only without `normalization`
        norm_id = _NORM.VALID if lp.normalize else _NORM.BATCH_SIZE
    if norm_id not in NORMALIZATIONS:
        raise err(f"unknown loss_param.normalization {norm_id}; allowed: "
                  f"{', '.join(NORMALIZATIONS.values())}")
    pd = list(param.propagate_down)
    loc_in = bool(pd[0]) if len(pd) == 4 else True
    conf_in = bool(pd[1]) if len(pd) == 4 else True
    try:
        code = code_type_id(int(p.code_type))
    except ValueError as e:
        raise err(f"multibox_loss_param.code_type: {e}") from None
    opts = MultiBoxLossOptions(
        num_classes=int(p.num_classes), share_location=bool(p.share_location),
        background_label_id=_as_int32(p.background_label_id), use_difficult_gt=bool(p.use_difficult_gt),
        match_type=MATCH_TYPES[p.match_type], overlap_threshold=float(p.overlap_threshold),
        use_prior_for_matching=bool(p.use_prior_for_matching), code_type=code,
        encode_variance_in_target=bool(p.encode_variance_in_target),
        ignore_cross_boundary_bbox=bool(p.ignore_cross_boundary_bbox), bp_inside=bool(p.bp_inside),
        map_object_to_agnostic=bool(p.map_object_to_agnostic), mining_type=mining,
        neg_pos_ratio=float(p.neg_pos_ratio), neg_overlap=float(p.neg_overlap),
        sample_size=int(p.sample_size), has_nms_param=p.HasField("nms_param"),
        nms_threshold=float(p.nms_param.nms_threshold), nms_top_k=int(p.nms_param.top_k),
        use_prior_for_nms=bool(p.use_prior_for_nms), loc_loss_type=LOC_LOSS_TYPES[p.loc_loss_type],
        conf_loss_type=CONF_LOSS_TYPES[p.conf_loss_type], loc_weight=float(p.loc_weight),
        normalization=NORMALIZATIONS[norm_id], loc_in_loss=loc_in,
        conf_in_loss=conf_in)
    try:
        opts.check()
    except ValueError as e:
        raise err(f"multibox_loss_param: {e}") from None
    return opts


@register("MultiBoxLoss")
class MultiBoxLoss(Layer):
    """SSD's MultiBox loss (weiliu89/caffe@4817bf8, ``multibox_loss_layer.cpp``).

    Bottoms: ``loc`` (N, P * loc_classes * 4), ``conf`` (N, P * num_classes), ``priors``
    (1, 2, P * 4) from PriorBox, ``label`` (1, 1, G, 8) from AnnotatedData.  Top: the
    scalar loss.  See :mod:`caffe_compat.layers.multibox_loss` for the semantics.
    """

    is_loss = True
    exact_bottoms = 4
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self.opts = options_from_param(param, layer=self)
        self.last_stats: Optional[MultiBoxStats] = None
        self.infer_top_shapes(bottom_shapes)

    def _check(self, shapes: Sequence[Shape]) -> Tuple[int, int]:
        loc, conf, prior, gt = (tuple(int(d) for d in s) for s in shapes)
        o = self.opts
        if not loc or not conf:
            raise self.error(ShapeError, "loc and conf need at least one axis")
        if loc[0] != conf[0]:
            raise self.error(ShapeError, f"loc and conf must have the same num: {loc} vs {conf}")
        num_priors = _legacy_dim(prior, 2) // 4
        loc_classes = 1 if o.share_location else o.num_classes
        n = loc[0]

        def count(s):
            c = 1
            for d in s:
                c *= d
            return c

        per_loc = num_priors * loc_classes * 4
        if _legacy_dim(loc, 1) != per_loc or count(loc) != n * per_loc:
            raise self.error(ShapeError, f"loc {loc} must be (N, num_priors * {loc_classes} * 4) "
                                         f"with num_priors = {num_priors} (from priors {prior})")
        per_conf = num_priors * o.num_classes
        if _legacy_dim(conf, 1) != per_conf or count(conf) != n * per_conf:
            raise self.error(ShapeError, f"conf {conf} must be (N, num_priors * num_classes) = "
                                         f"(N, {num_priors} * {o.num_classes})")
        if count(prior) < 2 * num_priors * 4:
            raise self.error(ShapeError, f"priors {prior} must hold boxes and variances "
                                         "(1, 2, num_priors * 4)")
        num_gt = _legacy_dim(gt, 2)
        if count(gt) < num_gt * 8:
            raise self.error(ShapeError, f"label {gt} must be (1, 1, num_gt, 8)")
        return num_priors, num_gt

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check(bottom_shapes)
        return [()]

    def forward(self, loc: Tensor, conf: Tensor, prior: Tensor, gt: Tensor) -> Tuple[Tensor]:
        _, num_gt = self._check([tuple(loc.shape), tuple(conf.shape), tuple(prior.shape),
                                 tuple(gt.shape)])
        try:
            loss, stats = multibox_loss(loc, conf, prior.detach(), gt.detach(), self.opts,
                                        num_gt=num_gt)
        except DataError as e:
            raise self.error(DataError, str(e)) from None
        except ValueError as e:
            raise self.error(DataError, str(e)) from None
        self.last_stats = stats
        return (loss,)

    def extra_repr(self) -> str:
        o = self.opts
        return (f"name={self.name!r}, num_classes={o.num_classes}, match={o.match_type}, "
                f"mining={o.mining_type}, loc={o.loc_loss_type}, conf={o.conf_loss_type}, "
                f"normalization={o.normalization}")
