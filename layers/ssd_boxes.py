"""Box utilities of the SSD fork (weiliu89/caffe, branch ``ssd``,
commit 4817bf8b4200b35ada8ed0dc378dceaf38c539e4, ``src/caffe/util/bbox_util.cpp``).

Coordinate convention: SSD boxes are ``[xmin, ymin, xmax, ymax]`` *normalized* to the
image (``[0, 1]`` for boxes inside it) and widths have no ``+1``: ``w = xmax - xmin``.
This differs from py-faster-rcnn's pixel boxes (:mod:`caffe_compat.boxes`), so the two
modules do not share code.

What the fork does, and these functions reproduce:

* box size: ``w * h``, but 0 for an inverted box (``xmax < xmin`` or ``ymax < ymin``).
* IoU (``JaccardOverlap`` for normalized boxes): intersection ``min(xmax) - max(xmin)``
  by ``min(ymax) - max(ymin)``; 0 unless both are > 0; otherwise
  ``inter / (size_a + size_b - inter)``, all in float32 as the fork's ``NormalizedBBox``
  (float fields) computes it.
* code types (``PriorBoxParameter.CodeType``): ``CORNER`` (1) offsets of the corners,
  ``CENTER_SIZE`` (2) centre offsets in prior widths and log size ratios, ``CORNER_SIZE``
  (3) corner offsets in prior widths.  The prior variances scale the offsets unless
  ``variance_encoded_in_target`` (then the network has already learnt scaled targets).
* ``ApplyNMSFast`` (the CPU path of ``DetectionOutput``): candidates are the boxes whose
  score is ``> score_threshold``, ordered by score, descending, with ``std::stable_sort``
  (equal scores keep index order); only the first ``top_k`` (when ``top_k > -1``) are
  visited; a candidate is kept when its IoU with every box kept so far is
  ``<= adaptive_threshold``; after each kept box the threshold is multiplied by ``eta``
  while ``eta < 1`` and the threshold is still ``> 0.5``.

Everything is plain torch; ``decode_boxes``/``encode_boxes``/``jaccard_overlap`` are
differentiable where the maths is and run on any device.
"""
from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CORNER", "CENTER_SIZE", "CORNER_SIZE", "code_type_id", "box_size", "clip_boxes",
    "decode_boxes", "encode_boxes", "jaccard_overlap", "nms_fast", "score_order",
]

#: ``PriorBoxParameter.CodeType`` values (the fork's enum numbers)
CORNER = 1
CENTER_SIZE = 2
CORNER_SIZE = 3
_CODE_NAMES = {"CORNER": CORNER, "CENTER_SIZE": CENTER_SIZE, "CORNER_SIZE": CORNER_SIZE}

CodeType = Union[int, str]

#: nms_fast computes the full candidate IoU matrix up to this many candidates
_NMS_MATRIX_MAX = 2048


def code_type_id(code_type: CodeType) -> int:
    """The enum number of a code type given as its number (1, 2, 3) or name."""
    if isinstance(code_type, str):
        key = code_type.upper()
        if key not in _CODE_NAMES:
            raise ValueError(f"unknown code_type {code_type!r}; allowed: CORNER, CENTER_SIZE, "
                             "CORNER_SIZE")
        return _CODE_NAMES[key]
    v = int(code_type)
    if v not in (CORNER, CENTER_SIZE, CORNER_SIZE):
        raise ValueError(f"unknown code_type {code_type!r}; allowed: 1 (CORNER), "
                         "2 (CENTER_SIZE), 3 (CORNER_SIZE)")
    return v


def box_size(boxes: Tensor) -> Tensor:
    """Area of normalized boxes ``(..., 4)`` -> ``(...)``; 0 for inverted boxes (the fork's
    ``BBoxSize``: ``xmax < xmin`` or ``ymax < ymin`` gives 0)."""
    w = boxes[..., 2] - boxes[..., 0]
    h = boxes[..., 3] - boxes[..., 1]
    bad = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return torch.where(bad, torch.zeros_like(w), w * h)


def clip_boxes(boxes: Tensor) -> Tensor:
    """Each coordinate of ``(..., 4)`` boxes clamped to ``[0, 1]`` (the fork's ``ClipBBox``)."""
    return boxes.clamp(0.0, 1.0)


def _check_positive(t: Tensor, what: str) -> None:
    """The fork CHECKs (aborts) on these; we raise instead.  Skipped on meta tensors."""
    if t.device.type == "meta" or t.numel() == 0:
        return
    if not bool((t.detach() > 0).all()):
        raise ValueError(f"{what} must be > 0 (the SSD fork CHECKs this)")


def _split(b: Tensor):
    return b[..., 0], b[..., 1], b[..., 2], b[..., 3]


def _in_double(fn, x: Tensor, times=None, divide=None) -> Tensor:
    """``float(fn(double(x)) * times / divide)`` in double: the fork calls C's double
    ``exp``/``log`` on float arguments and finishes the expression in double before storing
    a float.  Float32 tensors get exactly that; other dtypes compute in their own dtype."""
    wide = x.dtype == torch.float32 and x.device.type != "mps"
    y = fn(x.double()) if wide else fn(x)
    if times is not None:
        y = y * (times.double() if wide and isinstance(times, Tensor) else times)
    if divide is not None:
        y = y / (divide.double() if wide and isinstance(divide, Tensor) else divide)
    return y.to(x.dtype)


def decode_boxes(prior: Tensor, prior_variance: Tensor, loc: Tensor, code_type: CodeType = CORNER,
                 variance_encoded_in_target: bool = False, clip: bool = False) -> Tensor:
    """Boxes from location predictions relative to priors (the fork's ``DecodeBBox``).

    Shapes: ``prior`` (P, 4) normalized ``[xmin, ymin, xmax, ymax]``; ``prior_variance``
    (P, 4) or (4,) (ignored when ``variance_encoded_in_target``); ``loc`` (..., P, 4)
    predictions; returns (..., P, 4) normalized boxes (no ``+1`` widths).

    CENTER_SIZE: ``cx = v0 * l0 * pw + pcx``, ``w = exp(v2 * l2) * pw`` (likewise y/h),
    box ``cx -+ w / 2``.  CORNER: ``prior + v * l``.  CORNER_SIZE: ``prior + v * l * pw``
    (x coordinates; ``ph`` for y).  ``clip`` clamps the result to ``[0, 1]``
    (``DetectionOutput`` of this fork never clips).
    """
    ct = code_type_id(code_type)
    pxmin, pymin, pxmax, pymax = _split(prior)
    if variance_encoded_in_target:
        v0 = v1 = v2 = v3 = 1.0
    else:
        var = prior_variance.expand_as(prior) if prior_variance.dim() == 1 else prior_variance
        v0, v1, v2, v3 = _split(var)
    l0, l1, l2, l3 = _split(loc)
    if ct == CORNER:
        out = torch.stack([pxmin + v0 * l0, pymin + v1 * l1, pxmax + v2 * l2, pymax + v3 * l3], -1)
    else:
        pw = pxmax - pxmin
        ph = pymax - pymin
        _check_positive(pw, "prior width")
        _check_positive(ph, "prior height")
        if ct == CENTER_SIZE:
            pcx = (pxmin + pxmax) * 0.5
            pcy = (pymin + pymax) * 0.5
            cx = v0 * l0 * pw + pcx
            cy = v1 * l1 * ph + pcy
            w = _in_double(torch.exp, v2 * l2, pw)
            h = _in_double(torch.exp, v3 * l3, ph)
            out = torch.stack([cx - w * 0.5, cy - h * 0.5, cx + w * 0.5, cy + h * 0.5], -1)
        else:  # CORNER_SIZE
            out = torch.stack([pxmin + v0 * l0 * pw, pymin + v1 * l1 * ph,
                               pxmax + v2 * l2 * pw, pymax + v3 * l3 * ph], -1)
    return clip_boxes(out) if clip else out


def encode_boxes(prior: Tensor, prior_variance: Tensor, boxes: Tensor, code_type: CodeType = CORNER,
                 encode_variance_in_target: bool = False) -> Tensor:
    """Regression targets of ``boxes`` relative to priors (the fork's ``EncodeBBox``), the
    inverse of :func:`decode_boxes` (same code type and variance flag).

    Shapes: ``prior`` (P, 4), ``prior_variance`` (P, 4) or (4,), ``boxes`` (..., P, 4)
    normalized ``[xmin, ymin, xmax, ymax]``; returns (..., P, 4).

    CENTER_SIZE: ``((bcx - pcx) / pw / v0, (bcy - pcy) / ph / v1, log(bw / pw) / v2,
    log(bh / ph) / v3)``; CORNER: ``(box - prior) / v``; CORNER_SIZE:
    ``(box - prior) / pw / v`` (``ph`` for y).  Without ``encode_variance_in_target`` the
    variances must be > 0; CENTER_SIZE needs boxes and priors of positive width and height
    (the fork aborts on a CHECK; this raises ValueError).
    """
    ct = code_type_id(code_type)
    pxmin, pymin, pxmax, pymax = _split(prior)
    if encode_variance_in_target:
        v0 = v1 = v2 = v3 = 1.0
    else:
        var = prior_variance.expand_as(prior) if prior_variance.dim() == 1 else prior_variance
        _check_positive(var, "prior variance")
        v0, v1, v2, v3 = _split(var)
    bxmin, bymin, bxmax, bymax = _split(boxes)
    if ct == CORNER:
        return torch.stack([(bxmin - pxmin) / v0, (bymin - pymin) / v1,
                            (bxmax - pxmax) / v2, (bymax - pymax) / v3], -1)
    pw = pxmax - pxmin
    ph = pymax - pymin
    _check_positive(pw, "prior width")
    _check_positive(ph, "prior height")
    if ct == CENTER_SIZE:
        pcx = (pxmin + pxmax) * 0.5
        pcy = (pymin + pymax) * 0.5
        bw = bxmax - bxmin
        bh = bymax - bymin
        _check_positive(bw, "box width")
        _check_positive(bh, "box height")
        bcx = (bxmin + bxmax) * 0.5
        bcy = (bymin + bymax) * 0.5
        return torch.stack([(bcx - pcx) / pw / v0, (bcy - pcy) / ph / v1,
                            _in_double(torch.log, bw / pw, divide=v2),
                            _in_double(torch.log, bh / ph, divide=v3)], -1)
    return torch.stack([(bxmin - pxmin) / pw / v0, (bymin - pymin) / ph / v1,
                        (bxmax - pxmax) / pw / v2, (bymax - pymax) / ph / v3], -1)


def jaccard_overlap(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise IoU of normalized boxes: ``a`` (N, 4), ``b`` (M, 4) -> (N, M).

    The fork's ``JaccardOverlap`` with ``normalized = true``: no ``+1`` widths; an empty
    or touching intersection (width or height ``<= 0``) gives 0; sizes of inverted boxes
    count as 0.  The union is ``(size_a + size_b) - inter``, in that order, so float32
    inputs give the fork's float results bit for bit.
    """
    ax0, ay0, ax1, ay1 = (t.unsqueeze(1) for t in _split(a))
    bx0, by0, bx1, by1 = (t.unsqueeze(0) for t in _split(b))
    iw = torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)
    ih = torch.minimum(ay1, by1) - torch.maximum(ay0, by0)
    hit = (iw > 0) & (ih > 0)
    inter = torch.where(hit, iw * ih, torch.zeros_like(iw))
    union = (box_size(a).unsqueeze(1) + box_size(b).unsqueeze(0)) - inter
    # divide only where the boxes meet: elsewhere the union may be 0 (0 / 0)
    safe = torch.where(hit, union, torch.ones_like(union))
    return torch.where(hit, inter / safe, torch.zeros_like(inter))


def score_order(scores: Tensor, score_threshold: Optional[float] = None, top_k: int = -1) -> Tensor:
    """Indices of ``scores`` (N,) above ``score_threshold`` (strictly; None: all), by score
    descending, equal scores in index order (``std::stable_sort``), cut to ``top_k`` when
    ``top_k > -1`` (so ``top_k = 0`` keeps nothing).  NaN scores are never above a threshold.
    """
    idx = torch.arange(scores.numel(), device=scores.device)
    s = scores.reshape(-1)
    if score_threshold is not None:
        # compared in the scores' dtype (float32 for the fork's vector<float>)
        mask = s > torch.tensor(score_threshold, dtype=s.dtype, device=s.device)
        idx = idx[mask]
        s = s[mask]
    order = torch.sort(s, descending=True, stable=True).indices
    idx = idx[order]
    if top_k > -1:
        idx = idx[:top_k]
    return idx


def nms_fast(boxes: Tensor, scores: Tensor, score_threshold: Optional[float],
             nms_threshold: float, eta: float = 1.0, top_k: int = -1) -> Tensor:
    """The fork's ``ApplyNMSFast``: kept indices (int64, in the order the fork keeps them).

    Shapes: ``boxes`` (N, 4) normalized, ``scores`` (N,).  Candidates come from
    :func:`score_order`; each is kept when its IoU with every box kept before it is
    ``<= threshold`` (so NaN overlaps reject), where the threshold starts at
    ``nms_threshold`` and is multiplied by ``eta`` after each kept box while ``eta < 1``
    and the threshold is ``> 0.5``.  The fork computes in float32; pass float32 tensors to
    get its results bit for bit.
    """
    cand = score_order(scores, score_threshold, top_k)
    n = int(cand.numel())
    if n == 0:
        return cand
    cb = boxes.detach().reshape(-1, 4)[cand]
    if n <= _NMS_MATRIX_MAX:
        # all candidate overlaps at once, then the greedy pass on the host (the usual case:
        # top_k bounds n; IoU is symmetric in float, so rows serve as the fork's pairs)
        iou = jaccard_overlap(cb, cb).cpu().numpy()
        rows = lambda j: iou[j, j + 1:]  # noqa: E731
        worst = np.full(n, -np.inf, dtype=iou.dtype)
        first_ok = lambda w: np.flatnonzero(w <= thr)[:1].tolist()  # noqa: E731
        grow = np.maximum
    else:  # too many for an n x n matrix: one row of overlaps per kept box, on the device
        rows = lambda j: jaccard_overlap(cb[j:j + 1], cb[j + 1:])[0]  # noqa: E731
        worst = torch.full((n,), float("-inf"), dtype=cb.dtype, device=cb.device)
        first_ok = lambda w: torch.nonzero(w <= thr)[:1, 0].tolist()  # noqa: E731
        grow = torch.maximum
    # worst[i]: the highest IoU of candidate i with the boxes kept so far; a candidate is
    # kept iff it is <= the threshold in force when the fork reaches it (NaN never is)
    thr = float(np.float32(nms_threshold))  # the fork holds the threshold in a C float
    kept = []
    pos = 0
    while pos < n:
        ok = first_ok(worst[pos:])
        if not ok:
            break
        j = pos + int(ok[0])
        kept.append(j)
        if j + 1 < n:
            worst[j + 1:] = grow(worst[j + 1:], rows(j))  # both propagate NaN
        if eta < 1 and thr > 0.5:
            thr = float(np.float32(thr) * np.float32(eta))
        pos = j + 1
    return cand[torch.tensor(kept, dtype=torch.int64, device=cand.device)]
