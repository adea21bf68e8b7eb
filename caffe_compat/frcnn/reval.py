"""py-faster-rcnn's ``tools/reval.py``: evaluate saved detections again, without the net.

``caffe-compat test --imdb ...`` writes ``all_boxes[class][image]`` to
``OUTPUT_DIR/detections.npz`` (:func:`caffe_compat.frcnn.test.save_detections`).
:func:`reval` reads them back, optionally re-applies NMS at ``TEST.NMS`` (the original's
``--nms``), and hands them to ``imdb.evaluate_detections`` -- useful after changing the
evaluation (another DATA_DIR annotation fix, competition mode) or the NMS threshold.

py-faster-rcnn's own ``detections.pkl`` is read too when the folder has no ``.npz``, but
never with a plain ``pickle.load``: an unpickler that only rebuilds numpy arrays and plain
lists (as for its proposal pickles, :mod:`caffe_compat.frcnn.datasets.imdb`) refuses any other
object, so a crafted file cannot run code.

Detections that do not fit the imdb (another class count, another image count, or the
``.npz``'s recorded class names / image ids differing from the imdb's) are refused with a
``DataError`` rather than evaluated into a meaningless mAP.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from caffe_compat.errors import DataError
from caffe_compat.frcnn.datasets.imdb import _ArraysOnlyUnpickler

__all__ = ["DETECTION_FILES", "find_detections", "read_detections", "check_detections", "reval"]

#: what ``test`` writes, then the original's name
DETECTION_FILES = ("detections.npz", "detections.pkl")


class _DetectionsUnpickler(_ArraysOnlyUnpickler):
    """Numpy arrays and lists only; says 'detections' in its refusal."""

    what = "a detections pickle"
    allowed = "only numpy arrays and lists are allowed"


def find_detections(output_dir: str) -> str:
    """The detections file in ``output_dir`` (:data:`DETECTION_FILES`, first found)."""
    if not os.path.isdir(output_dir):
        raise DataError("output folder not found (give the folder `caffe-compat test` wrote)",
                        where=output_dir)
    for name in DETECTION_FILES:
        p = os.path.join(output_dir, name)
        if os.path.isfile(p):
            return p
    raise DataError(f"no detections in this folder (expected {' or '.join(DETECTION_FILES)}, as "
                    "`caffe-compat test --imdb ...` writes)", where=output_dir)


def _as_dets(d: Any, c: int, i: int, where: str) -> np.ndarray:
    """One ``all_boxes`` entry as ``(n, 5)`` float32; ``[]``/``None``/empty -> ``(0, 5)``."""
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return np.zeros((0, 5), np.float32)
    a = np.asarray(d) if not isinstance(d, np.ndarray) else d
    if a.dtype.kind not in "fiu":
        raise DataError(f"all_boxes[{c}][{i}] holds {a.dtype} data, not numbers", where=where)
    if a.size == 0:
        return np.zeros((0, 5), np.float32)
    if a.ndim != 2 or a.shape[1] != 5:
        raise DataError(f"all_boxes[{c}][{i}] must be n x 5 (x1 y1 x2 y2 score), got shape "
                        f"{a.shape}", where=where)
    return a.astype(np.float32, copy=False)


def _read_pickle(path: str) -> List[List[np.ndarray]]:
    try:
        with open(path, "rb") as f:
            data = _DetectionsUnpickler(f, encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError,
            TypeError, IndexError) as e:
        raise DataError(f"cannot read detections pickle: {e}", where=path) from None
    if not isinstance(data, (list, tuple)) or not all(isinstance(r, (list, tuple)) for r in data):
        raise DataError("a detections pickle must hold all_boxes[class][image] (a list of lists), "
                        f"got {type(data).__name__}", where=path)
    return [[_as_dets(d, c, i, path) for i, d in enumerate(row)] for c, row in enumerate(data)]


def read_detections(path: str) -> Tuple[List[List[np.ndarray]], Dict[str, List[str]]]:
    """``(all_boxes, meta)`` from a ``.npz`` (``test``'s) or a py-faster-rcnn ``.pkl``.

    ``meta`` holds ``classes`` and ``image_ids`` where the file recorded them (``.npz``).
    """
    from caffe_compat.frcnn.test import load_detections

    if path.endswith(".pkl"):
        return _read_pickle(path), {}
    meta: Dict[str, List[str]] = {}
    return load_detections(path, meta), meta


def _first_difference(a: Sequence[str], b: Sequence[str]) -> str:
    for k, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"at index {k}: {x!r} in the file, {y!r} in the imdb"
    return ""


def check_detections(all_boxes: Sequence[Sequence[Any]], imdb: Any, meta: Dict[str, List[str]],
                     where: str) -> None:
    """Refuse detections that were not made on ``imdb`` (class/image counts, names, ids)."""
    nc = len(all_boxes)
    if nc == 0:
        raise DataError("the detections file holds no classes", where=where)
    if nc != imdb.num_classes:
        raise DataError(f"the detections have {nc} classes but {imdb.name} has {imdb.num_classes} "
                        "(background included); were they made on another data set?", where=where)
    counts = sorted({len(row) for row in all_boxes})
    if counts != [imdb.num_images]:
        got = counts[0] if len(counts) == 1 else f"{counts[0]}..{counts[-1]}"
        raise DataError(f"the detections are for {got} images but {imdb.name} has {imdb.num_images} "
                        "(another image set, or another DATA_DIR?)", where=where)
    classes = meta.get("classes")
    if classes is not None and list(classes) != [str(c) for c in imdb.classes]:
        raise DataError(f"the detections' classes differ from {imdb.name}'s "
                        f"{_first_difference(classes, [str(c) for c in imdb.classes])}", where=where)
    ids = meta.get("image_ids")
    if ids is not None and list(ids) != [str(i) for i in imdb.image_index]:
        raise DataError(f"the detections' images differ from {imdb.name}'s "
                        f"{_first_difference(ids, [str(i) for i in imdb.image_index])}", where=where)


def reval(output_dir: str, imdb: Any, *, nms: bool = False, nms_thresh: Optional[float] = None,
          log_fn: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Evaluate the detections saved in ``output_dir`` on ``imdb``: ``{"ap", "mAP", ...}``.

    With ``nms``, NMS runs again on every class and image at ``nms_thresh`` (default
    ``cfg.TEST.NMS``).  Evaluation files go to ``output_dir`` as with ``test``.  The
    result adds ``det_file``, ``output_dir``, ``num_images`` and ``all_boxes`` (what was
    evaluated) to what ``imdb.evaluate_detections`` returns, with ``mAP`` computed from
    the per-class APs where the imdb gives none.
    """
    from caffe_compat.frcnn.config import cfg
    from caffe_compat.frcnn.test import apply_nms, evaluate

    emit = log_fn or (lambda s: None)
    det_file = find_detections(output_dir)
    all_boxes, meta = read_detections(det_file)
    check_detections(all_boxes, imdb, meta, det_file)
    emit(f"Read detections from {det_file}")
    if nms:
        thresh = float(cfg.TEST.NMS if nms_thresh is None else nms_thresh)
        emit(f"Applying NMS ({thresh:g}) to all detections")
        all_boxes = apply_nms(all_boxes, thresh)
    out = evaluate(imdb, all_boxes, output_dir, emit)
    out.update(det_file=det_file, output_dir=output_dir, num_images=imdb.num_images,
               all_boxes=all_boxes)
    return out
