"""PASCAL VOC detection evaluation (py-faster-rcnn's unofficial Python port of the devkit).

The numbers must agree with what py-faster-rcnn printed for the same detections, so the
conventions are the original's, quirks included:

* boxes are inclusive pixel indices: IoU uses ``x2 - x1 + 1`` widths;
* a detection is a true positive only when its best IoU is *strictly* greater than
  ``ovthresh`` and that ground truth was not matched before; a second detection of an
  already matched object is a false positive (duplicates are penalised);
* a detection whose best match is a *difficult* object is neither a TP nor an FP (it is
  ignored), and difficult objects do not count towards the number of positives;
* detections are visited by decreasing confidence;
* precision is ``tp / max(tp + fp, eps)`` (a first detection that hits a difficult object
  gives 0/0 otherwise);
* AP is either the VOC2007 11-point interpolated AP or, from VOC2010 on, the area under
  the monotone (non-increasing) precision envelope.

Two deliberate differences, both about inputs the original crashed or silently misbehaved
on: ties in confidence keep their input order (a stable sort; numpy's default sort is
not stable), and a class with no (non-difficult) positives gets ``AP = nan`` instead of
a division-by-zero warning and a meaningless value; :func:`mean_ap` skips such classes.

Annotations are cached as JSON (never pickle): nothing written here needs pickle to read.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_compat.errors import DataError

__all__ = [
    "parse_rec", "voc_ap", "voc_eval", "read_detections_file", "load_annotations", "mean_ap",
]

PathLike = Union[str, "os.PathLike[str]"]
#: One detection: (image id, confidence, x1, y1, x2, y2), boxes as in the annotation files.
Detection = Tuple[str, float, float, float, float, float]
#: One ground-truth object as :func:`parse_rec` returns it.
Record = Dict[str, Any]


def _text(node: ET.Element, tag: str, default: Optional[str], where: str) -> Optional[str]:
    child = node.find(tag)
    if child is None or child.text is None:
        if default is None:
            raise DataError(f"missing <{tag}> in an <{node.tag}> element", where=where)
        return default
    return child.text.strip()


def parse_rec(filename: PathLike) -> List[Record]:
    """The objects of one VOC XML annotation: name, pose, truncated, difficult, bbox.

    ``bbox`` is ``[xmin, ymin, xmax, ymax]`` as integers exactly as written (1-based, as
    the devkit and the results files use them).  Missing ``pose``/``truncated``/
    ``difficult`` default to ``Unspecified``/0/0 (many converted data sets omit them).
    """
    where = os.fspath(filename)
    try:
        tree = ET.parse(where)
    except (OSError, ET.ParseError) as e:
        raise DataError(f"cannot read VOC annotation: {e}", where=where) from None
    objects: List[Record] = []
    for obj in tree.findall("object"):
        bbox = obj.find("bndbox")
        if bbox is None:
            raise DataError("an <object> without <bndbox>", where=where)
        try:
            coords = [int(float(_text(bbox, t, None, where))) for t in ("xmin", "ymin", "xmax", "ymax")]
            rec = {
                "name": _text(obj, "name", None, where),
                "pose": _text(obj, "pose", "Unspecified", where),
                "truncated": int(float(_text(obj, "truncated", "0", where))),
                "difficult": int(float(_text(obj, "difficult", "0", where))),
                "bbox": coords,
            }
        except ValueError as e:
            raise DataError(f"bad number in an <object>: {e}", where=where) from None
        objects.append(rec)
    return objects


def voc_ap(rec: Sequence[float], prec: Sequence[float], use_07_metric: bool = False) -> float:
    """Average precision from a precision/recall curve (points in detection order).

    ``use_07_metric``: VOC2007's 11-point AP, the mean over ``t in {0, 0.1, ..., 1}`` of
    the highest precision at recall ``>= t`` (0 where no point reaches ``t``).
    Otherwise (VOC2010+): add sentinels ``(0, 0)`` and ``(1, 0)``, make precision
    non-increasing from the right (the envelope), and sum ``delta recall * precision``
    over the points where recall changes.
    """
    rec_a = np.asarray(rec, dtype=np.float64).reshape(-1)
    prec_a = np.asarray(prec, dtype=np.float64).reshape(-1)
    if use_07_metric:
        ap = 0.0
        # np.arange(0., 1.1, 0.1) as the original: its 0.30000000000000004 etc. matter
        # only for recalls exactly at a tenth, which keep the original's behaviour.
        for t in np.arange(0.0, 1.1, 0.1):
            mask = rec_a >= t
            p = float(np.max(prec_a[mask])) if mask.any() else 0.0
            ap += p / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec_a, [1.0]))
    mpre = np.concatenate(([0.0], prec_a, [0.0]))
    # envelope: each precision becomes the max of itself and everything to its right
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def read_detections_file(path: PathLike) -> List[Detection]:
    """Detections from a VOC results file: lines ``image_id score x1 y1 x2 y2``."""
    where = os.fspath(path)
    try:
        with open(where, "r") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise DataError(f"cannot read detections: {e}", where=where) from None
    out: List[Detection] = []
    for n, line in enumerate(lines, 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 6:
            raise DataError(f"expected 'image_id score x1 y1 x2 y2', got {line!r}",
                            where=f"{where}:{n}")
        try:
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            raise DataError(f"bad number in {line!r}", where=f"{where}:{n}") from None
        out.append((parts[0], vals[0], vals[1], vals[2], vals[3], vals[4]))
    return out


def load_annotations(annopath: str, image_ids: Sequence[str],
                     cachefile: Optional[PathLike] = None) -> Dict[str, List[Record]]:
    """``{image_id: parse_rec(annopath.format(image_id))}`` for every id, optionally cached.

    The cache is JSON and records the ids it holds; a cache that lacks any requested id
    is rebuilt (the original's ``annots.pkl`` was reused for any image set and failed
    with a KeyError after switching sets).
    """
    ids = list(image_ids)
    if cachefile is not None and os.path.isfile(cachefile):
        try:
            with open(cachefile, "r") as f:
                cached = json.load(f)
            recs = cached.get("records", {})
            if cached.get("annopath") == annopath and all(i in recs for i in ids):
                return {i: recs[i] for i in ids}
        except (OSError, ValueError, AttributeError):
            pass  # unreadable cache: rebuild it
    recs = {i: parse_rec(annopath.format(i)) for i in ids}
    if cachefile is not None:
        from caffe_compat.atomic import atomic_write

        os.makedirs(os.path.dirname(os.path.abspath(cachefile)), exist_ok=True)
        atomic_write(os.fspath(cachefile),
                     json.dumps({"annopath": annopath, "records": recs}).encode("utf-8"))
    return recs


def voc_eval(detections: Union[PathLike, Iterable[Sequence[Any]]],
             annotations: Mapping[str, Sequence[Record]], classname: str,
             ovthresh: float = 0.5, use_07_metric: bool = False
             ) -> Tuple[np.ndarray, np.ndarray, float]:
    """Recall, precision and AP of one class: ``(rec, prec, ap)``.

    ``detections``: a VOC results file path, or an iterable of
    ``(image_id, score, x1, y1, x2, y2)`` for this class.  ``annotations`` maps *every*
    image of the evaluated set to its objects (``parse_rec`` records); images without
    objects of ``classname`` still matter, since detections on them are false positives.
    ``rec``/``prec`` have one entry per detection, in decreasing confidence.
    """
    dets: List[Sequence[Any]]
    if isinstance(detections, (str, os.PathLike)):
        dets = list(read_detections_file(detections))
    else:
        dets = list(detections)

    class_recs: Dict[str, Dict[str, Any]] = {}
    npos = 0
    for image_id, objs in annotations.items():
        objs_c = [o for o in objs if o["name"] == classname]
        bbox = np.array([o["bbox"] for o in objs_c], dtype=np.float64).reshape(-1, 4)
        difficult = np.array([bool(o["difficult"]) for o in objs_c], dtype=bool)
        npos += int((~difficult).sum())
        class_recs[image_id] = {"bbox": bbox, "difficult": difficult,
                                "det": np.zeros(len(objs_c), dtype=bool)}

    nd = len(dets)
    image_ids = [str(d[0]) for d in dets]
    confidence = np.array([float(d[1]) for d in dets], dtype=np.float64)
    boxes = np.array([[float(v) for v in d[2:6]] for d in dets], dtype=np.float64).reshape(nd, 4)
    order = np.argsort(-confidence, kind="stable")
    boxes = boxes[order]
    image_ids = [image_ids[i] for i in order]

    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs.get(image_ids[d])
        if R is None:
            raise DataError(f"detection for image '{image_ids[d]}', which is not in the "
                            f"evaluated image set ({len(class_recs)} images)")
        bb = boxes[d]
        ovmax = -np.inf
        gt = R["bbox"]
        jmax = -1
        if gt.size > 0:
            iw = np.maximum(np.minimum(gt[:, 2], bb[2]) - np.maximum(gt[:, 0], bb[0]) + 1.0, 0.0)
            ih = np.maximum(np.minimum(gt[:, 3], bb[3]) - np.maximum(gt[:, 1], bb[1]) + 1.0, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0] + 1.0) * (bb[3] - bb[1] + 1.0)
                   + (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0) - inters)
            overlaps = inters / uni
            jmax = int(np.argmax(overlaps))
            ovmax = float(overlaps[jmax])
        if ovmax > ovthresh:
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = True
                else:
                    fp[d] = 1.0          # duplicate detection of a matched object
        else:
            fp[d] = 1.0

    fp = np.cumsum(fp)
    tp = np.cumsum(tp)
    prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    if npos == 0:
        return np.zeros(nd), prec, float("nan")
    rec = tp / float(npos)
    return rec, prec, voc_ap(rec, prec, use_07_metric)


def mean_ap(aps: Iterable[float]) -> float:
    """Mean of the per-class APs, leaving out classes without positives (``nan``)."""
    vals = np.array([a for a in aps], dtype=np.float64)
    vals = vals[~np.isnan(vals)]
    return float(vals.mean()) if vals.size else float("nan")
