"""The SSD fork's ``DetectionEvaluate`` layer: per-detection true/false positive rows.

Follows weiliu89/caffe, branch ``ssd``, commit 4817bf8b4200b35ada8ed0dc378dceaf38c539e4
(``src/caffe/layers/detection_evaluate_layer.cpp``; ``GetDetectionResults``,
``GetGroundTruth``, ``OutputBBox``, ``JaccardOverlap`` in ``src/caffe/util/bbox_util.cpp``).
The solver's ``test_compute_loss``/mAP code reads these rows; the layer has no backward.

Bottoms: detections (1, 1, N, 7) rows ``[image_id, label, score, xmin, ymin, xmax, ymax]``
(DetectionOutput's top) and ground truth (1, 1, M, 8) rows ``[image_id, label,
instance_id, xmin, ymin, xmax, ymax, difficult]``.  Top (1, 1, R, 5) rows
``[image_id, label, score, tp, fp]``:

* first one row per class ``c != background_label_id``: ``[-1, c, num_pos, -1, -1]``,
  ``num_pos`` the class's ground-truth count (difficult ones only with
  ``evaluate_difficult_gt``);
* then, per image (ascending id, images with detections only), per label (ascending,
  label -1 skipped): every detection as a false positive ``[id, label, score, 0, 1]`` in
  input order when the image or the label has no ground truth; otherwise the detections
  sorted by score, descending, with ``std::sort`` (libstdc++'s introsort: equal scores end
  in its order, reproduced by :func:`caffe_compat.layers.ssd._gnu_sort`), each matched to
  the ground truth of its label with the largest IoU (first on ties): IoU ``>=
  overlap_threshold`` and not yet taken -> ``[.., 1, 0]``; taken -> ``[.., 0, 1]``; a
  difficult match when difficult boxes are not evaluated -> ``[.., 0, 0]``; below the
  threshold -> ``[.., 0, 1]``.

``R`` is the number of positive classes plus the number of detection rows whose *label*
is not -1 (the fork's count), while rows are written only for rows whose *image id* is not
-1: a row with image id -1 but a real label leaves a zero row at the end, as in the fork.
Ground-truth reading stops at the first row with image id -1 (``break``, unlike the loss).

``name_size_file`` (lines ``name height width``) switches to pixel boxes: the i-th image
the layer evaluates (counted over images that have detections, wrapping after the last
line) is scaled to its size by ``OutputBBox`` (clip to [0, 1] and scale; with
``resize_param`` the fork's WARP / FIT_SMALL_SIZE / FIT_LARGE_SIZE_AND_PAD inverse
mappings) and IoU then uses ``+1`` widths.  A missing file is reported at forward.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import DataError, SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.loss import _legacy_dim
from caffe_compat.layers.multibox_loss import _as_int32
from caffe_compat.layers.registry import register
from caffe_compat.layers.ssd import _gnu_sort, _score_desc
from caffe_compat.layers.ssd_boxes import jaccard_overlap
from caffe_compat.protos import caffe_pb2

__all__ = ["detection_evaluate", "read_name_size_file", "output_bbox", "DetectionEvaluate"]

F32 = np.float32
_R = caffe_pb2.ResizeParameter


# ============================================================================ pixel boxes
class _Box:
    """A ``NormalizedBBox``: float32 corners, an optional stored size, the difficult flag."""

    __slots__ = ("c", "size", "difficult")

    def __init__(self, c, size=None, difficult=False):
        self.c = [F32(v) for v in c]
        self.size = None if size is None else F32(size)
        self.difficult = difficult


def _bbox_size(b: _Box, normalized: bool = True) -> F32:
    x0, y0, x1, y1 = b.c
    if x1 < x0 or y1 < y0:
        return F32(0)
    if b.size is not None:
        return b.size
    w, h = F32(x1 - x0), F32(y1 - y0)
    return F32(w * h) if normalized else F32(F32(w + 1) * F32(h + 1))


def _clip(b: _Box, height: Optional[float] = None, width: Optional[float] = None) -> _Box:
    hi_x = F32(1) if width is None else F32(width)
    hi_y = F32(1) if height is None else F32(height)
    c = [max(min(b.c[0], hi_x), F32(0)), max(min(b.c[1], hi_y), F32(0)),
         max(min(b.c[2], hi_x), F32(0)), max(min(b.c[3], hi_y), F32(0))]
    out = _Box(c, None, b.difficult)
    out.size = _bbox_size(out)  # the fork's ClipBBox sets the normalized size
    return out


def _scale(b: _Box, height: int, width: int) -> _Box:
    c = [F32(b.c[0] * F32(width)), F32(b.c[1] * F32(height)),
         F32(b.c[2] * F32(width)), F32(b.c[3] * F32(height))]
    out = _Box(c, None, b.difficult)
    out.size = _bbox_size(out, normalized=not (width > 1 or height > 1))
    return out


def _project(src: _Box, b: _Box) -> Tuple[bool, Optional[_Box]]:
    if b.c[0] >= src.c[2] or b.c[2] <= src.c[0] or b.c[1] >= src.c[3] or b.c[3] <= src.c[1]:
        return False, None
    sw, sh = F32(src.c[2] - src.c[0]), F32(src.c[3] - src.c[1])
    p = _Box([F32(F32(b.c[0] - src.c[0]) / sw), F32(F32(b.c[1] - src.c[1]) / sh),
              F32(F32(b.c[2] - src.c[0]) / sw), F32(F32(b.c[3] - src.c[1]) / sh)], None, b.difficult)
    p = _clip(p)
    return bool(_bbox_size(p) > 0), p


def output_bbox(b: _Box, img_size: Tuple[int, int], resize_param=None) -> _Box:
    """The fork's ``OutputBBox``: a normalized box to pixels of an (height, width) image,
    undoing ``resize_param``'s mapping when given."""
    height, width = img_size
    temp = b
    if resize_param is not None and resize_param.resize_mode:
        rh, rw = F32(resize_param.height), F32(resize_param.width)
        if not (rh > 0 and rw > 0):
            raise DataError("resize_param.height and width must be > 0")
        resize_aspect = F32(rw / rh)
        hs, ws = int(resize_param.height_scale), int(resize_param.width_scale)
        aspect = F32(F32(width) / F32(height))
        mode = resize_param.resize_mode
        if mode == _R.WARP:
            return _scale(_clip(temp), height, width)
        if mode == _R.FIT_LARGE_SIZE_AND_PAD:
            if aspect > resize_aspect:
                pad = F32(F32(rh - F32(rw / aspect)) / F32(2))
                src = _Box([0.0, F32(pad / rh), 1.0, F32(1.0 - float(F32(pad / rh)))])
            else:
                pad = F32(F32(rw - F32(rh * aspect)) / F32(2))
                src = _Box([F32(pad / rw), 0.0, F32(1.0 - float(F32(pad / rw))), 1.0])
            _, proj = _project(src, b)
            if proj is not None:  # the fork writes the projection whenever they intersect
                temp = proj
            return _scale(_clip(temp), height, width)
        if mode == _R.FIT_SMALL_SIZE:
            if hs == 0 or ws == 0:
                return _scale(_clip(temp), height, width)
            return _clip(_scale(temp, hs, ws), height, width)
        raise DataError(f"unknown resize_param.resize_mode {mode}")
    return _scale(_clip(temp), height, width)


def _pixel_overlap(a: _Box, b: _Box) -> F32:
    """``JaccardOverlap(.., normalized = false)``: ``+1`` intersection widths, stored sizes."""
    if b.c[0] > a.c[2] or b.c[2] < a.c[0] or b.c[1] > a.c[3] or b.c[3] < a.c[1]:
        ix = [F32(0)] * 4
    else:
        ix = [max(a.c[0], b.c[0]), max(a.c[1], b.c[1]), min(a.c[2], b.c[2]), min(a.c[3], b.c[3])]
    w = F32(F32(ix[2] - ix[0]) + F32(1))
    h = F32(F32(ix[3] - ix[1]) + F32(1))
    if w > 0 and h > 0:
        inter = F32(w * h)
        return F32(inter / F32(F32(_bbox_size(a) + _bbox_size(b)) - inter))
    return F32(0)


def read_name_size_file(path: str) -> List[Tuple[int, int]]:
    """``name height width`` triples, read token by token until one fails (``>>``)."""
    with open(path) as f:
        toks = f.read().split()
    sizes: List[Tuple[int, int]] = []
    for k in range(0, len(toks) - 2, 3):
        try:
            h, w = int(toks[k + 1]), int(toks[k + 2])
        except ValueError:
            break
        sizes.append((h, w))
    return sizes


# ============================================================================ evaluation
def detection_evaluate(det: Tensor, gt: Tensor, *, num_classes: int, background_label_id: int = 0,
                       overlap_threshold: float = 0.5, evaluate_difficult_gt: bool = True,
                       sizes: Sequence[Tuple[int, int]] = (), start: int = 0,
                       resize_param=None) -> Tuple[Tensor, int]:
    """The fork's DetectionEvaluate forward: ``(top (1, 1, R, 5), next image counter)``.

    ``det`` (.., 7) and ``gt`` (.., 8) rows as in the module docstring; ``sizes``
    (height, width) per evaluated image turns on pixel evaluation starting at index
    ``start`` (the layer's running counter).
    """
    d = det.detach().reshape(-1, 7).to("cpu", torch.float32).numpy()
    g = gt.detach().reshape(-1, 8).to("cpu", torch.float32).numpy()
    if not (np.isfinite(d[:, :2]).all() and np.isfinite(g[:, :2]).all()):
        raise DataError("a detection or ground-truth row has a non-finite image id or label")
    bg = background_label_id
    num_pos_classes = num_classes if bg == -1 else num_classes - 1
    num_valid = int((d[:, 1] != -1).sum())
    top = np.zeros((num_pos_classes + num_valid, 5), np.float32)

    dets: Dict[int, Dict[int, List[Tuple[F32, List[F32]]]]] = {}
    for r in range(d.shape[0]):
        item = int(d[r, 0])
        if item == -1:
            continue
        label = int(d[r, 1])
        if label == bg:
            raise DataError(f"detection row {r} has the background label {label}")
        dets.setdefault(item, {}).setdefault(label, []).append((F32(d[r, 2]), [F32(v) for v in d[r, 3:7]]))
    gts: Dict[int, Dict[int, List[_Box]]] = {}
    for r in range(g.shape[0]):
        item = int(g[r, 0])
        if item == -1:
            break  # this GetGroundTruth stops at the first padding row
        label = int(g[r, 1])
        if label == bg:
            raise DataError(f"ground truth row {r} has the background label {label}")
        b = _Box(g[r, 3:7], None, bool(g[r, 7] != 0))
        b.size = _bbox_size(b)
        gts.setdefault(item, {}).setdefault(label, []).append(b)

    num_pos: Dict[int, int] = {}
    for labels in gts.values():
        for label, boxes in labels.items():
            n = len(boxes) if evaluate_difficult_gt else sum(1 for b in boxes if not b.difficult)
            num_pos[label] = num_pos.get(label, 0) + n
    k = 0
    for c in range(num_classes):
        if c == bg:
            continue
        top[k] = (-1, c, num_pos.get(c, 0), -1, -1)
        k += 1

    normalized = len(sizes) == 0
    count = start
    for image in sorted(dets):
        labels = dets[image]
        for label in sorted(labels):
            if label == -1:
                continue
            boxes = labels[label]
            gl = gts.get(image, {}).get(label)
            if gl is None:
                for score, _ in boxes:
                    top[k] = (image, label, score, 0, 1)
                    k += 1
                continue
            if not normalized:
                gl = [output_bbox(b, sizes[count], resize_param) for b in gl]
                for src, new in zip(gts[image][label], gl):
                    new.difficult = src.difficult
            order = [(float(s), n) for n, (s, _) in enumerate(boxes)]
            _gnu_sort(order, _score_desc)
            visited = [False] * len(gl)
            gt_t = torch.tensor(np.asarray([b.c for b in gl], np.float32)) if normalized else None
            for _, n in order:
                score, coords = boxes[n]
                top[k, :3] = (image, label, score)
                if normalized:
                    ov = jaccard_overlap(torch.tensor(np.asarray([coords], np.float32)), gt_t)[0].numpy()
                    overlaps = [F32(v) for v in ov]
                else:
                    db = _Box(coords)
                    db.size = _bbox_size(db)
                    db = output_bbox(db, sizes[count], resize_param)
                    overlaps = [_pixel_overlap(db, b) for b in gl]
                best, jmax = F32(-1), -1
                for j, o in enumerate(overlaps):
                    if o > best:
                        best, jmax = o, j
                if best >= F32(overlap_threshold):
                    if evaluate_difficult_gt or not gl[jmax].difficult:
                        if not visited[jmax]:
                            top[k, 3:] = (1, 0)
                            visited[jmax] = True
                        else:
                            top[k, 3:] = (0, 1)
                else:
                    top[k, 3:] = (0, 1)
                k += 1
        if sizes:
            count += 1
            if count == len(sizes):
                count = 0
    return torch.from_numpy(top).reshape(1, 1, -1, 5), count


@register("DetectionEvaluate")
class DetectionEvaluate(Layer):
    """SSD's DetectionEvaluate (weiliu89/caffe@4817bf8); see the module docstring.

    The top's row count depends on the detections; at build time it is reported as if
    every detection row were valid (the fork's Reshape reads the data, which does not
    exist yet).  The fork does not enforce its bottom count (a misspelt override): the
    first two bottoms are read, others ignored.
    """

    min_bottoms = 2
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.detection_evaluate_param
        if not p.HasField("num_classes"):
            raise self.error(SchemaError, "detection_evaluate_param.num_classes is required")
        self.num_classes = int(p.num_classes)
        self.background_label_id = _as_int32(p.background_label_id)
        if not (self.background_label_id == -1 or 0 <= self.background_label_id < self.num_classes):
            # the fork would write one row too many (past the end of its top)
            raise self.error(SchemaError, f"detection_evaluate_param.background_label_id "
                                          f"{self.background_label_id} must be -1 or in [0, "
                                          f"num_classes = {self.num_classes})")
        self.overlap_threshold = float(p.overlap_threshold)
        if not self.overlap_threshold > 0:
            raise self.error(SchemaError, "detection_evaluate_param.overlap_threshold must be > 0, "
                                          f"got {self.overlap_threshold}")
        self.evaluate_difficult_gt = bool(p.evaluate_difficult_gt)
        self.resize_param = p.resize_param if p.HasField("resize_param") else None
        if self.resize_param is not None and self.resize_param.resize_mode not in (
                _R.WARP, _R.FIT_SMALL_SIZE, _R.FIT_LARGE_SIZE_AND_PAD):
            raise self.error(SchemaError, f"unknown resize_param.resize_mode "
                                          f"{self.resize_param.resize_mode}; allowed: WARP, "
                                          "FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD")
        self.name_size_file = p.name_size_file if p.HasField("name_size_file") else None
        self.sizes: List[Tuple[int, int]] = []
        self._problem: Optional[str] = None
        if self.name_size_file is not None:
            self._load_sizes()
        self.count = 0
        self.infer_top_shapes(bottom_shapes)

    def _load_sizes(self) -> None:
        path = self.name_size_file
        if not os.path.isfile(path):
            self._problem = f"name_size_file '{path}' not found (cwd {os.getcwd()})"
            return
        self.sizes = read_name_size_file(path)
        self._problem = None

    def _check(self, shapes: Sequence[Shape]) -> Tuple[int, int]:
        d, g = (tuple(int(x) for x in s) for s in shapes[:2])
        if _legacy_dim(d, 0) != 1 or _legacy_dim(d, 1) != 1 or _legacy_dim(d, 3) != 7:
            raise self.error(ShapeError, f"detections must be (1, 1, N, 7), got {d}")
        if _legacy_dim(g, 0) != 1 or _legacy_dim(g, 1) != 1 or _legacy_dim(g, 3) != 8:
            raise self.error(ShapeError, f"ground truth must be (1, 1, M, 8), got {g}")
        return _legacy_dim(d, 2), _legacy_dim(g, 2)

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        n_det, _ = self._check(bottom_shapes)
        bg = self.background_label_id
        pos = self.num_classes if bg == -1 else self.num_classes - 1
        return [(1, 1, pos + n_det, 5)]

    def forward(self, det: Tensor, gt: Tensor, *_ignored: Tensor) -> Tuple[Tensor]:
        self._check([tuple(det.shape), tuple(gt.shape)])
        if self.name_size_file is not None and self._problem is not None:
            self._load_sizes()
            if self._problem is not None:
                raise self.error(DataError, self._problem)
        try:
            top, self.count = detection_evaluate(
                det, gt, num_classes=self.num_classes, background_label_id=self.background_label_id,
                overlap_threshold=self.overlap_threshold, evaluate_difficult_gt=self.evaluate_difficult_gt,
                sizes=self.sizes, start=self.count, resize_param=self.resize_param)
        except DataError as e:
            raise self.error(DataError, str(e)) from None
        return (top.to(device=det.device, dtype=det.dtype if det.is_floating_point() else torch.float32),)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_classes={self.num_classes}, "
                f"background_label_id={self.background_label_id}, "
                f"overlap_threshold={self.overlap_threshold}")
