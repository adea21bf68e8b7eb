"""The image database base class (py-faster-rcnn's ``imdb``) and its file formats.

An imdb names a data set, its classes and its images, and produces a *roidb*: one dict
per image with

* ``boxes`` ``(R, 4)`` -- ground-truth boxes first, then proposals, 0-based inclusive
  pixel corners ``x1, y1, x2, y2`` (ground truth is ``uint16`` as in the original,
  proposals ``float32``);
* ``gt_classes`` ``(R,)`` int32 -- the class of each ground-truth box, 0 for proposals;
* ``gt_overlaps`` ``(R, num_classes)`` float32 -- IoU of each box with the ground truth
  of each class (1 in its own column for a ground-truth box, -1 in every column for a
  COCO crowd box).  The original kept this as a scipy sparse matrix; it is a dense array
  here (the data sets are small, and it spares a scipy dependency);
* ``flipped`` (bool), ``seg_areas`` ``(R,)`` float32 and, for VOC, ``difficult`` ``(R,)``.

Caches and proposal files are ``.npz``/JSON, never pickle: nothing this project writes
needs pickle to read.  py-faster-rcnn's own RPN proposal pickles (a list of arrays) can
still be read, through an unpickler that only rebuilds numpy arrays.
"""
from __future__ import annotations

import io
import json
import os
import os.path as osp
import pickle
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import cfg

__all__ = [
    "imdb", "Roidb", "RoidbEntry", "bbox_overlaps_np", "image_size", "save_roidb", "load_roidb",
    "save_proposals", "load_proposals", "unique_boxes", "filter_small_boxes", "validate_boxes",
    "xywh_to_xyxy", "xyxy_to_xywh",
]

RoidbEntry = Dict[str, Any]
Roidb = List[RoidbEntry]
PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------- box helpers
def bbox_overlaps_np(boxes: np.ndarray, query_boxes: np.ndarray) -> np.ndarray:
    """IoU ``(N, K)`` with ``+1`` widths in float64 (py-faster-rcnn's ``cython_bbox``)."""
    from caffe_compat.boxes import bbox_overlaps
    import torch

    b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float64).reshape(-1, 4))
    q = torch.from_numpy(np.ascontiguousarray(query_boxes, dtype=np.float64).reshape(-1, 4))
    return bbox_overlaps(b, q).numpy()


def unique_boxes(boxes: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Indices (ascending) of the first occurrence of each distinct rounded box."""
    v = np.array([1, 1e3, 1e6, 1e9])
    hashes = np.round(np.asarray(boxes, dtype=np.float64) * scale).dot(v)
    _, index = np.unique(hashes, return_index=True)
    return np.sort(index)


def filter_small_boxes(boxes: np.ndarray, min_size: float) -> np.ndarray:
    """Indices of boxes with ``x2 - x1 >= min_size`` and ``y2 - y1 > min_size``.

    (The original's asymmetric ``>=``/``>`` and missing ``+1`` are kept: they decide
    which proposals survive, so they change trained models.)
    """
    b = np.asarray(boxes, dtype=np.float64)
    w = b[:, 2] - b[:, 0]
    h = b[:, 3] - b[:, 1]
    return np.where((w >= min_size) & (h > min_size))[0]


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    """``[x y w h]`` to inclusive ``[x1 y1 x2 y2]``."""
    return np.hstack((boxes[:, 0:2], boxes[:, 0:2] + boxes[:, 2:4] - 1))


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    """Inclusive ``[x1 y1 x2 y2]`` to ``[x y w h]``."""
    return np.hstack((boxes[:, 0:2], boxes[:, 2:4] - boxes[:, 0:2] + 1))


def validate_boxes(boxes: np.ndarray, width: int = 0, height: int = 0, where: Optional[str] = None) -> None:
    """Raise ``DataError`` unless every box lies inside a ``width x height`` image."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = ~((b[:, 0] >= 0) & (b[:, 1] >= 0) & (b[:, 2] >= b[:, 0]) & (b[:, 3] >= b[:, 1])
            & (b[:, 2] < width) & (b[:, 3] < height))
    if bad.any():
        i = int(np.argmax(bad))
        raise DataError(f"box {b[i].tolist()} is not inside the {width}x{height} image "
                        "(need 0 <= x1 <= x2 < width, 0 <= y1 <= y2 < height)", where=where)


def image_size(path: PathLike) -> Tuple[int, int]:
    """``(width, height)`` of an image, from its header when Pillow is there (fast)."""
    p = os.fspath(path)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow comes with torchvision
        Image = None  # type: ignore[assignment]
    if Image is not None:
        try:
            with Image.open(p) as im:
                return int(im.size[0]), int(im.size[1])
        except FileNotFoundError:
            raise DataError("image file not found", where=p) from None
        except Exception:
            pass  # fall back to OpenCV, which reads a few more formats
    import cv2

    im = cv2.imread(p, cv2.IMREAD_UNCHANGED)
    if im is None:
        raise DataError("cannot read image (missing or not an image)", where=p)
    return int(im.shape[1]), int(im.shape[0])


# ----------------------------------------------------------------------------- roidb files
_PER_IMAGE = "__image__"


def save_roidb(path: PathLike, roidb: Roidb, meta: Optional[Mapping[str, Any]] = None) -> None:
    """Write a roidb as one ``.npz``: each per-box array concatenated over images.

    Array keys are stored as ``<key>`` plus ``<key>__counts`` (rows per image); scalar
    keys (``flipped``, ``image``, sizes...) as one array with an entry per image.  ``meta``
    (JSON-serialisable) lets the reader check that the cache matches the data set.
    """
    from caffe_compat.atomic import atomic_open

    arrays: Dict[str, np.ndarray] = {"__meta__": np.array(json.dumps(dict(meta or {})))}
    keys: List[str] = []
    for e in roidb:
        for k in e:
            if k not in keys:
                keys.append(k)
    for k in keys:
        vals = [e.get(k) for e in roidb]
        if any(v is None for v in vals):
            raise DataError(f"roidb key '{k}' is missing from some entries")
        if isinstance(vals[0], np.ndarray):
            cat = (np.concatenate(vals, axis=0) if vals
                   else np.zeros((0,), dtype=np.float32))
            arrays[k] = cat
            arrays[k + "__counts"] = np.array([v.shape[0] for v in vals], dtype=np.int64)
            arrays[k + "__shape1"] = np.array([v.shape[1:] for v in vals][0] if vals else (),
                                              dtype=np.int64)
        else:
            arrays[_PER_IMAGE + k] = np.array(vals)
    arrays["__num__"] = np.array(len(roidb), dtype=np.int64)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(osp.dirname(osp.abspath(os.fspath(path))) or ".", exist_ok=True)
    with atomic_open(os.fspath(path)) as f:
        f.write(buf.getvalue())


def load_roidb(path: PathLike) -> Tuple[Roidb, Dict[str, Any]]:
    """Read a roidb written by :func:`save_roidb`: ``(roidb, meta)``."""
    p = os.fspath(path)
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read roidb file: {e}", where=p) from None
    with z:
        n = int(z["__num__"])
        meta = json.loads(str(z["__meta__"]))
        roidb: Roidb = [{} for _ in range(n)]
        for name in z.files:
            if name.startswith("__") or name.endswith(("__counts", "__shape1")):
                if name.startswith(_PER_IMAGE):
                    key = name[len(_PER_IMAGE):]
                    vals = z[name]
                    for i in range(n):
                        v = vals[i]
                        roidb[i][key] = v.item() if hasattr(v, "item") else v
                continue
            cat = z[name]
            counts = z[name + "__counts"]
            rest = tuple(int(s) for s in z[name + "__shape1"])
            cat = cat.reshape((-1,) + rest) if cat.size or rest else cat
            offsets = np.concatenate(([0], np.cumsum(counts)))
            for i in range(n):
                roidb[i][name] = cat[offsets[i]:offsets[i + 1]].copy()
    return roidb, meta


# ----------------------------------------------------------------------------- proposals
class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and plain containers only (legacy proposal pickles)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),   # how Python 3's protocol-2 pickles spell bytes
        ("__builtin__", "bytes"), ("builtins", "bytes"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    }

    #: how refusals name the file and what it may hold
    what = "a proposal pickle"
    allowed = "only numpy arrays are allowed"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from {self.what} "
                                     f"({self.allowed})")


def save_proposals(path: PathLike, box_list: Sequence[np.ndarray],
                   scores: Optional[Sequence[np.ndarray]] = None) -> None:
    """Write per-image proposals ``[(R_i, 4)]`` (and optional scores) as one ``.npz``.

    Keys: ``boxes`` ``(sum R_i, 4)`` float32, ``counts`` ``(num_images,)``, optionally
    ``scores`` ``(sum R_i,)``.  This is the format ``rpn-generate`` writes.
    """
    from caffe_compat.atomic import atomic_open

    boxes = [np.asarray(b, dtype=np.float32).reshape(-1, 4) for b in box_list]
    arrays = {"boxes": np.concatenate(boxes, 0) if boxes else np.zeros((0, 4), np.float32),
              "counts": np.array([b.shape[0] for b in boxes], dtype=np.int64)}
    if scores is not None:
        sc = [np.asarray(s, dtype=np.float32).reshape(-1) for s in scores]
        if [s.shape[0] for s in sc] != arrays["counts"].tolist():
            raise DataError("proposal scores and boxes differ in count per image")
        arrays["scores"] = np.concatenate(sc) if sc else np.zeros((0,), np.float32)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(osp.dirname(osp.abspath(os.fspath(path))) or ".", exist_ok=True)
    with atomic_open(os.fspath(path)) as f:
        f.write(buf.getvalue())


def load_proposals(path: PathLike) -> List[np.ndarray]:
    """Per-image proposal boxes ``[(R_i, 4)]`` from a ``.npz`` or a legacy ``.pkl``.

    A ``.pkl`` is py-faster-rcnn's ``rpn_generate`` output (a list of ``(R, 4)`` arrays,
    possibly Python 2 pickles); only numpy arrays are unpickled.  Extra columns (a score
    in column 4) are dropped.
    """
    p = os.fspath(path)
    if not osp.exists(p):
        raise DataError("proposal file not found (write one with `caffe-compat rpn-generate`)", where=p)
    if p.endswith(".pkl"):
        try:
            with open(p, "rb") as f:
                data = _ArraysOnlyUnpickler(f, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
            raise DataError(f"cannot read proposal pickle: {e}", where=p) from None
        if not isinstance(data, (list, tuple)):
            raise DataError(f"a proposal pickle must hold a list of arrays, got {type(data).__name__}",
                            where=p)
        return [np.asarray(b)[:, :4] if np.asarray(b).size else np.zeros((0, 4), np.float32)
                for b in data]
    try:
        with np.load(p, allow_pickle=False) as z:
            boxes, counts = z["boxes"], z["counts"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"cannot read proposal file (want an .npz with 'boxes' and 'counts'): {e}",
                        where=p) from None
    offsets = np.concatenate(([0], np.cumsum(counts)))
    boxes = boxes.reshape(-1, boxes.shape[-1] if boxes.ndim == 2 else 4)
    if boxes.shape[1] < 4 or offsets[-1] != boxes.shape[0]:
        raise DataError(f"proposal file holds {boxes.shape[0]} boxes of {boxes.shape[1]} columns "
                        f"but its counts add up to {int(offsets[-1])}", where=p)
    return [boxes[offsets[i]:offsets[i + 1], :4] for i in range(len(counts))]


# ----------------------------------------------------------------------------- imdb
class imdb:  # noqa: N801 - py-faster-rcnn's name, kept so ported scripts read the same
    """An image database: classes, image ids and a lazily built roidb.

    Subclasses set ``_classes`` and ``_image_index`` and implement ``image_path_at``
    and ``gt_roidb``; ``roidb`` is produced by ``roidb_handler`` (chosen with
    :meth:`set_proposal_method`: ``gt``, ``rpn``, ...).
    """

    def __init__(self, name: str, classes: Optional[Sequence[str]] = None) -> None:
        self._name = name
        self._classes: Tuple[str, ...] = tuple(classes or ())
        self._image_index: List[Any] = []
        self._obj_proposer = "gt"
        self._roidb: Optional[Roidb] = None
        self._roidb_handler: Callable[[], Roidb] = self.default_roidb
        #: data-set specific options (py-faster-rcnn's names: ``rpn_file``, ``use_diff``...)
        self.config: Dict[str, Any] = {}

    # --- names and sizes
    @property
    def name(self) -> str:
        return self._name

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    @property
    def classes(self) -> Tuple[str, ...]:
        return self._classes

    @property
    def image_index(self) -> List[Any]:
        return self._image_index

    @property
    def num_images(self) -> int:
        return len(self._image_index)

    def image_path_at(self, i: int) -> str:
        raise NotImplementedError

    # --- roidb
    @property
    def roidb_handler(self) -> Callable[[], Roidb]:
        return self._roidb_handler

    @roidb_handler.setter
    def roidb_handler(self, val: Callable[[], Roidb]) -> None:
        self._roidb_handler = val

    def proposal_methods(self) -> List[str]:
        """The names :meth:`set_proposal_method` accepts (methods ``<name>_roidb``)."""
        return sorted(a[:-len("_roidb")] for a in dir(self)
                      if a.endswith("_roidb") and not a.startswith("_") and a != "default_roidb"
                      and callable(getattr(self, a, None)))

    def set_proposal_method(self, method: str) -> None:
        """Use ``<method>_roidb`` (``gt``, ``rpn``, ...) to build the roidb.

        The original ``eval``-ed the name; here it must be one of :meth:`proposal_methods`.
        """
        handler = getattr(self, f"{method}_roidb", None) if isinstance(method, str) else None
        if handler is None or not callable(handler) or method.startswith("_") or method == "default":
            raise DataError(f"unknown proposal method {method!r} for {self.name}; "
                            f"valid: {', '.join(self.proposal_methods())}")
        self._obj_proposer = method
        self.roidb_handler = handler
        self._roidb = None

    @property
    def roidb(self) -> Roidb:
        """The roidb, built by the handler on first use (then mutated in place by training)."""
        if self._roidb is None:
            self._roidb = self.roidb_handler()
        return self._roidb

    def default_roidb(self) -> Roidb:
        return self.gt_roidb()

    def gt_roidb(self) -> Roidb:
        raise NotImplementedError

    @property
    def cache_path(self) -> str:
        """``DATA_DIR/cache``, created on first use."""
        path = osp.abspath(osp.join(cfg.DATA_DIR, "cache"))
        os.makedirs(path, exist_ok=True)
        return path

    def _has_gt(self) -> bool:
        """Whether this image set has ground truth to merge with proposals."""
        return True

    def rpn_roidb(self) -> Roidb:
        """Ground truth (where the set has it) followed by the proposals of ``config['rpn_file']``."""
        if self._has_gt():
            gt = self.gt_roidb()
            return self.merge_roidbs(gt, self._load_rpn_roidb(gt))
        return self._load_rpn_roidb(None)

    def _load_rpn_roidb(self, gt_roidb: Optional[Roidb]) -> Roidb:
        filename = self.config.get("rpn_file")
        if not filename:
            raise DataError(f"{self.name}: proposal method 'rpn' needs imdb.config['rpn_file'] "
                            "(a proposals file from `caffe-compat rpn-generate`)")
        return self.create_roidb_from_box_list(load_proposals(filename), gt_roidb)

    def evaluate_detections(self, all_boxes: Sequence[Sequence[Any]], output_dir: Optional[str] = None) -> Any:
        """Score detections ``all_boxes[class][image]`` (``(K, 5)`` arrays: x1 y1 x2 y2 score)."""
        raise NotImplementedError

    def competition_mode(self, on: bool) -> None:
        """Turn competition mode (no salt in file names, keep result files) on or off."""

    # --- flipping, proposals
    def _get_widths(self) -> List[int]:
        return [image_size(self.image_path_at(i))[0] for i in range(self.num_images)]

    def append_flipped_images(self) -> None:
        """Append a horizontally mirrored copy of every roidb entry; double the index.

        A box ``(x1, x2)`` in an image of width ``W`` becomes ``(W - x2 - 1, W - x1 - 1)``.
        """
        num_images = self.num_images
        widths = self._get_widths()
        roidb = self.roidb
        for i in range(num_images):
            entry = roidb[i]
            boxes = entry["boxes"].copy()
            oldx1 = boxes[:, 0].astype(np.int64) if boxes.dtype == np.uint16 else boxes[:, 0].copy()
            oldx2 = boxes[:, 2].astype(np.int64) if boxes.dtype == np.uint16 else boxes[:, 2].copy()
            nx1 = widths[i] - oldx2 - 1
            nx2 = widths[i] - oldx1 - 1
            # Ground truth must fit; proposals (gt_classes 0) only need x2 >= x1, as
            # py-faster-rcnn checked: float proposals may overhang by under a pixel (clipped)
            gt = np.asarray(entry.get("gt_classes", np.ones(len(boxes)))) > 0
            if len(gt) != len(boxes):
                gt = np.ones(len(boxes), bool)
            if (~gt).any() and boxes.dtype.kind == "f":
                nx1 = np.where(~gt, np.maximum(nx1, 0), nx1)
            bad = (nx2 < nx1) | ((nx1 < 0) & gt)
            if bad.any():
                j = int(np.argmax(bad))
                raise DataError(f"box {entry['boxes'][j].tolist()} of image {self.image_index[i]!r} "
                                f"does not fit in its width {widths[i]}: cannot flip it "
                                "(VOC annotations are 1-based; are these 0-based or out of range?)",
                                where=self.image_path_at(i))
            boxes[:, 0] = nx1
            boxes[:, 2] = nx2
            flipped = {k: v for k, v in entry.items()
                       if k not in ("boxes", "flipped", "image", "width", "height", "max_classes",
                                    "max_overlaps", "bbox_targets")}
            flipped["boxes"] = boxes
            flipped["flipped"] = True
            roidb.append(flipped)
        self._image_index = self._image_index * 2

    def create_roidb_from_box_list(self, box_list: Sequence[np.ndarray],
                                   gt_roidb: Optional[Roidb]) -> Roidb:
        """A roidb of proposal boxes; ``gt_overlaps`` = best IoU with the gt of each class."""
        if len(box_list) != self.num_images:
            raise DataError(f"{self.name}: {len(box_list)} proposal lists for {self.num_images} "
                            "images (was the proposal file made for another image set?)")
        roidb: Roidb = []
        for i in range(self.num_images):
            boxes = np.asarray(box_list[i])
            num_boxes = boxes.shape[0]
            overlaps = np.zeros((num_boxes, self.num_classes), dtype=np.float32)
            if gt_roidb is not None and gt_roidb[i]["boxes"].size > 0 and num_boxes > 0:
                gt_boxes = gt_roidb[i]["boxes"]
                gt_classes = gt_roidb[i]["gt_classes"]
                gt_overlaps = bbox_overlaps_np(boxes, gt_boxes)
                argmaxes = gt_overlaps.argmax(axis=1)
                maxes = gt_overlaps.max(axis=1)
                I = np.where(maxes > 0)[0]
                overlaps[I, gt_classes[argmaxes[I]]] = maxes[I]
            entry: RoidbEntry = {
                "boxes": boxes,
                "gt_classes": np.zeros((num_boxes,), dtype=np.int32),
                "gt_overlaps": overlaps,
                "flipped": False,
                "seg_areas": np.zeros((num_boxes,), dtype=np.float32),
            }
            if gt_roidb is not None and "difficult" in gt_roidb[i]:
                entry["difficult"] = np.zeros((num_boxes,), dtype=bool)
            roidb.append(entry)
        return roidb

    @staticmethod
    def merge_roidbs(a: Roidb, b: Roidb) -> Roidb:
        """Append ``b[i]``'s boxes to ``a[i]``'s (ground truth first, then proposals)."""
        if len(a) != len(b):
            raise DataError(f"cannot merge roidbs of {len(a)} and {len(b)} images")
        for ea, eb in zip(a, b):
            # numpy promotion as the original: uint16 gt + float32 proposals -> float32
            ea["boxes"] = np.vstack((ea["boxes"], eb["boxes"]))
            ea["gt_classes"] = np.hstack((ea["gt_classes"], eb["gt_classes"]))
            ea["gt_overlaps"] = np.vstack((ea["gt_overlaps"], eb["gt_overlaps"]))
            ea["seg_areas"] = np.hstack((ea["seg_areas"], eb["seg_areas"]))
            if "difficult" in ea:
                ea["difficult"] = np.hstack((ea["difficult"],
                                             eb.get("difficult", np.zeros(len(eb["gt_classes"]), bool))))
        return a

    def evaluate_recall(self, candidate_boxes: Optional[Sequence[np.ndarray]] = None,
                        thresholds: Optional[np.ndarray] = None, area: str = "all",
                        limit: Optional[int] = None) -> Dict[str, Any]:
        """Proposal recall at IoU thresholds (default 0.5:0.05:0.95) and its mean (AR).

        Each gt box is greedily paired with the proposal that covers it best (best pair
        first, both removed), as the original.
        """
        area_ranges = {"all": (0 ** 2, 1e5 ** 2), "small": (0 ** 2, 32 ** 2),
                       "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1e5 ** 2),
                       "96-128": (96 ** 2, 128 ** 2), "128-256": (128 ** 2, 256 ** 2),
                       "256-512": (256 ** 2, 512 ** 2), "512-inf": (512 ** 2, 1e5 ** 2)}
        if area not in area_ranges:
            raise DataError(f"unknown area range {area!r}; valid: {', '.join(area_ranges)}")
        lo, hi = area_ranges[area]
        all_ovr: List[np.ndarray] = []
        num_pos = 0
        for i in range(self.num_images):
            e = self.roidb[i]
            max_gt = e["gt_overlaps"].max(axis=1) if e["gt_overlaps"].size else np.zeros(0)
            gt_inds = np.where((e["gt_classes"] > 0) & (max_gt == 1))[0]
            gt_boxes = e["boxes"][gt_inds, :]
            gt_areas = e["seg_areas"][gt_inds]
            valid = np.where((gt_areas >= lo) & (gt_areas <= hi))[0]
            gt_boxes = gt_boxes[valid, :]
            num_pos += len(valid)
            if candidate_boxes is None:
                boxes = e["boxes"][np.where(e["gt_classes"] == 0)[0], :]
            else:
                boxes = candidate_boxes[i]
            if boxes.shape[0] == 0 or gt_boxes.shape[0] == 0:
                continue
            if limit is not None and boxes.shape[0] > limit:
                boxes = boxes[:limit, :]
            overlaps = bbox_overlaps_np(boxes, gt_boxes)
            got = np.zeros(gt_boxes.shape[0])
            for j in range(gt_boxes.shape[0]):
                argmax_ov = overlaps.argmax(axis=0)
                max_ov = overlaps.max(axis=0)
                gt_ind = int(max_ov.argmax())
                box_ind = int(argmax_ov[gt_ind])
                got[j] = overlaps[box_ind, gt_ind]
                overlaps[box_ind, :] = -1
                overlaps[:, gt_ind] = -1
            all_ovr.append(got)
        gt_overlaps = np.sort(np.concatenate(all_ovr)) if all_ovr else np.zeros(0)
        if thresholds is None:
            thresholds = np.arange(0.5, 0.95 + 1e-5, 0.05)
        recalls = np.array([(gt_overlaps >= t).sum() / float(max(num_pos, 1)) for t in thresholds])
        return {"ar": float(recalls.mean()), "recalls": recalls, "thresholds": thresholds,
                "gt_overlaps": gt_overlaps}
