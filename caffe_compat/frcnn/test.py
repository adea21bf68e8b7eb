"""py-faster-rcnn's test-time pipeline: ``im_detect`` on one image, ``test_net`` on an imdb.

What a trained detector's numbers depend on, kept from ``lib/fast_rcnn/test.py``:

* the image is BGR minus ``PIXEL_MEANS``, resized (``cv2.INTER_LINEAR``) so the shorter
  side is each of ``TEST.SCALES`` unless the longer side would round above
  ``TEST.MAX_SIZE``; several scales make an image pyramid in one zero-padded blob;
* RPN nets (``TEST.HAS_RPN``) take ``data`` and ``im_info = [[H, W, scale]]`` (the blob's
  height and width) and test at one scale; their proposals are read back from the net's
  ``rois`` blob and divided by the scale;
* nets fed precomputed proposals take ``data`` and ``rois``: each box goes to the pyramid
  level whose scaled area is closest to 224 x 224, and boxes that fall on the same
  feature cells (``DEDUP_BOXES``) are computed once and mapped back;
* scores are ``cls_prob`` (``cls_score`` with ``TEST.SVM``), boxes the ``bbox_pred``
  deltas applied to the proposals and clipped to the image (``TEST.BBOX_REG``);
* ``test_net`` keeps, per class, scores strictly above ``thresh``, runs NMS at
  ``TEST.NMS``, then keeps the ``max_per_image`` best over all classes (ties at the cut
  all stay), and hands ``all_boxes[class][image]`` to ``imdb.evaluate_detections``.

Everything after the image blob runs in torch on the net's device under ``no_grad``.
Detections are cached as ``.npz`` (never pickle); :func:`load_detections` reads them.
"""
from __future__ import annotations

import io
import logging
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.boxes import nms
from caffe_compat.errors import DataError, GraphError, ShapeError
from caffe_compat.frcnn.boxes import bbox_transform_inv, clip_boxes
from caffe_compat.frcnn.config import ConfigError, cfg, get_output_dir

__all__ = [
    "Timer", "im_detect", "im_detect_batch", "test_net", "apply_nms", "detections_per_class", "limit_per_image",
    "save_detections", "load_detections", "read_image", "test_imdb", "format_ap",
]

log = logging.getLogger(__name__)

Detector = Callable[[Any, np.ndarray, Optional[np.ndarray]], Tuple[Tensor, Tensor]]


# ----------------------------------------------------------------------------- helpers
class Timer:
    """Wall-clock timer with a running average (py-faster-rcnn's ``utils.timer.Timer``).

    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each reading so that
    asynchronous device work is counted where it was launched.
    """

    def __init__(self, sync: Optional[Callable[[], None]] = None) -> None:
        self.total_time = 0.0
        self.calls = 0
        self.start_time = 0.0
        self.diff = 0.0
        self.average_time = 0.0
        self._sync = sync

    def tic(self) -> None:
        if self._sync is not None:
            self._sync()
        self.start_time = time.perf_counter()

    def toc(self, average: bool = True) -> float:
        if self._sync is not None:
            self._sync()
        self.diff = time.perf_counter() - self.start_time
        self.total_time += self.diff
        self.calls += 1
        self.average_time = self.total_time / self.calls
        return self.average_time if average else self.diff


def _device_sync(device: torch.device) -> Optional[Callable[[], None]]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def _net_device(net: Any) -> torch.device:
    dev = getattr(net, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


def _net_dtype(net: Any) -> torch.dtype:
    dt = getattr(net, "dtype", None)
    return dt if isinstance(dt, torch.dtype) else torch.float32


def read_image(path: str) -> np.ndarray:
    """A BGR ``uint8`` image (``cv2.imread``), or ``DataError`` naming the file."""
    import cv2

    if not os.path.isfile(path):
        raise DataError("image file not found", where=path)
    im = cv2.imread(path, cv2.IMREAD_COLOR)
    if im is None:
        raise DataError("cannot read image (not an image file OpenCV can decode)", where=path)
    return im


# ----------------------------------------------------------------------------- blobs
def _get_image_blob(im: np.ndarray, config: Any = None) -> Tuple[np.ndarray, np.ndarray]:
    """The image pyramid blob ``(len(TEST.SCALES), 3, H, W)`` and each level's scale.

    Host-side with OpenCV, as the original: bilinear resizing is where a torch port
    would silently change the pixels a trained model sees.
    """
    from caffe_compat.frcnn.roidb import im_list_to_blob, prep_im_for_blob

    c = cfg if config is None else config
    if im is None or np.ndim(im) != 3 or np.shape(im)[2] != 3:
        raise DataError(f"im_detect needs an H x W x 3 BGR image, got shape {np.shape(im)}")
    scales = tuple(c.TEST.SCALES)
    if not scales:
        raise ConfigError("TEST.SCALES is empty; give at least one test scale, e.g. (600,)")
    ims, factors = [], []
    for target in scales:
        resized, s = prep_im_for_blob(im, c.PIXEL_MEANS, target, c.TEST.MAX_SIZE)
        ims.append(resized)
        factors.append(s)
    return im_list_to_blob(ims), np.array(factors, dtype=np.float64)


def _project_im_rois(im_rois: Tensor, scales: Tensor) -> Tuple[Tensor, Tensor]:
    """Boxes ``(R, 4)`` in image coordinates to pyramid coordinates and levels ``(R, 1)``.

    With several scales each box goes to the level where its scaled ``+1`` area is
    closest to ``224 * 224`` (first such level on ties); with one scale, level 0.
    Float64, as the original.
    """
    rois = im_rois.to(torch.float64)
    scales = scales.to(device=rois.device, dtype=torch.float64)
    if scales.numel() > 1:
        widths = rois[:, 2] - rois[:, 0] + 1
        heights = rois[:, 3] - rois[:, 1] + 1
        areas = widths * heights
        scaled = areas[:, None] * scales[None, :] ** 2
        diff = (scaled - 224 * 224).abs()
        levels = diff.argmin(dim=1, keepdim=True) if rois.shape[0] else \
            torch.zeros((0, 1), dtype=torch.long, device=rois.device)
    else:
        levels = torch.zeros((rois.shape[0], 1), dtype=torch.long, device=rois.device)
    return rois * scales[levels], levels


def _get_rois_blob(im_rois: Tensor, scales: Tensor) -> Tensor:
    """``(R, 5)`` float32 rows ``[level, x1, y1, x2, y2]`` for a ``rois`` input."""
    rois, levels = _project_im_rois(im_rois, scales)
    return torch.cat([levels.to(torch.float64), rois], dim=1).to(torch.float32)


def _dedup(rois_blob: Tensor, dedup: float) -> Tuple[Tensor, Tensor]:
    """Indices of the first of each group of rois equal after scaling by ``dedup`` and
    rounding, in the order of their hashes (as ``np.unique``), and the inverse map."""
    v = torch.tensor([1.0, 1e3, 1e6, 1e9, 1e12], dtype=torch.float64, device=rois_blob.device)
    hashes = torch.round(rois_blob * dedup).to(torch.float64) @ v
    uniq, inverse = torch.unique(hashes, sorted=True, return_inverse=True)
    n = hashes.shape[0]
    first = torch.full((uniq.shape[0],), n, dtype=torch.long, device=hashes.device)
    first = first.scatter_reduce(0, inverse, torch.arange(n, device=hashes.device), reduce="amin")
    return first, inverse


def _rows(t: Tensor) -> Tensor:
    """``(N, ...)`` as ``(N, C)``; works for ``N == 0`` (``reshape(0, -1)`` cannot)."""
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        return t.reshape(-1, 1)
    return t.flatten(1)


def _blob(outputs: Dict[str, Tensor], net: Any, name: str) -> Optional[Tensor]:
    if name in outputs:
        return outputs[name]
    blobs = getattr(net, "blobs", None) or {}
    return blobs.get(name) if hasattr(blobs, "get") else None


def _blob_names(outputs: Dict[str, Tensor], net: Any) -> str:
    names = list(outputs)
    for n in (getattr(net, "blobs", None) or {}):
        if n not in names:
            names.append(n)
    return ", ".join(names) or "none"


def _check_inputs(net: Any, has_rpn: bool) -> None:
    inputs = list(getattr(net, "input_names", ()) or ())
    need = ("data", "im_info") if has_rpn else ("data", "rois")
    missing = [n for n in need if n not in inputs]
    if not missing:
        return
    shown = ", ".join(inputs) or "none"
    if has_rpn and "rois" in inputs and "im_info" not in inputs:
        hint = ("; it takes precomputed proposals: set TEST.HAS_RPN False (and give the imdb "
                "proposals) or use the net's RPN test definition")
    elif not has_rpn and "im_info" in inputs:
        hint = ("; it computes its own proposals (an RPN net): set TEST.HAS_RPN True "
                "(`--set TEST.HAS_RPN True` or `--cfg experiments/cfgs/faster_rcnn_end2end.yml`)")
    else:
        hint = ""
    mode = "an RPN net (TEST.HAS_RPN)" if has_rpn else "a net fed proposals (TEST.HAS_RPN False)"
    raise GraphError(f"im_detect on {mode} needs net inputs {', '.join(need)}; this net has no "
                     f"{', '.join(repr(m) for m in missing)} (inputs: {shown}){hint}")


# ----------------------------------------------------------------------------- im_detect
def _rpn_rois(outputs: Any, net: Any) -> Tensor:
    """The proposal layer's ``rois`` top as R x 5 rows ``[batch, x1, y1, x2, y2]``."""
    rois = _blob(outputs, net, "rois")
    if rois is None:
        raise GraphError("RPN net has no 'rois' blob (the proposal layer's top) after "
                         f"forward; blobs: {_blob_names(outputs, net)}")
    rois = _rows(rois)
    if rois.shape[1] != 5:
        raise ShapeError(f"'rois' must be R x 5 [batch, x1, y1, x2, y2], got {tuple(rois.shape)}")
    return rois


def _head_outputs(outputs: Any, net: Any, n_rois: int) -> Tuple[Tensor, Optional[Tensor]]:
    """The class scores (``cls_prob``, or ``cls_score`` with TEST.SVM) and, with TEST.BBOX_REG,
    the box deltas (``bbox_pred``) of ``n_rois`` rois, as rows, checked against each other."""
    c = cfg
    score_name = "cls_score" if c.TEST.SVM else "cls_prob"
    scores = _blob(outputs, net, score_name)
    if scores is None:
        raise GraphError(f"net has no '{score_name}' blob to read class scores from "
                         f"({'TEST.SVM' if c.TEST.SVM else 'softmax probabilities'}); "
                         f"blobs: {_blob_names(outputs, net)}")
    scores = _rows(scores)
    if scores.shape[0] != n_rois:
        raise ShapeError(f"'{score_name}' has {scores.shape[0]} rows but there are {n_rois} rois")
    if not c.TEST.BBOX_REG:
        return scores, None
    num_classes = scores.shape[1]
    deltas = _blob(outputs, net, "bbox_pred")
    if deltas is None:
        raise GraphError("net has no 'bbox_pred' blob for box regression (set TEST.BBOX_REG "
                         f"False to use the proposals as they are); blobs: {_blob_names(outputs, net)}")
    deltas = _rows(deltas)
    if tuple(deltas.shape) != (n_rois, 4 * num_classes):
        raise ShapeError(f"'bbox_pred' must be ({n_rois}, {4 * num_classes}) "
                         f"(4 deltas per class of '{score_name}'), got {tuple(deltas.shape)}")
    return scores, deltas


def im_detect(net: Any, im: np.ndarray, boxes: Optional[Any] = None) -> Tuple[Tensor, Tensor]:
    """Detect objects in a BGR image: ``(scores (R, K), pred_boxes (R, 4K))`` torch tensors.

    ``boxes`` are ``(R, 4)`` proposals in image coordinates for nets fed proposals, and
    ``None`` for RPN nets (``cfg.TEST.HAS_RPN``), whose proposals come from the net's
    ``rois`` blob.  ``K`` includes the background as class 0.  Results are on the net's
    device, in its dtype for scores and float32 (or the deltas' dtype) for boxes.
    """
    c = cfg
    has_rpn = bool(c.TEST.HAS_RPN)
    _check_inputs(net, has_rpn)
    device = _net_device(net)
    dtype = _net_dtype(net)
    data_np, scales_np = _get_image_blob(im, c)
    if has_rpn and len(scales_np) != 1:
        raise ConfigError(f"RPN nets (TEST.HAS_RPN) test one image at one scale; TEST.SCALES has "
                          f"{len(scales_np)}: {tuple(c.TEST.SCALES)}")
    scales = torch.as_tensor(scales_np, dtype=torch.float64, device=device)
    index = inverse = None
    with torch.no_grad():
        inputs: Dict[str, Tensor] = {
            "data": torch.as_tensor(data_np, device=device).to(dtype)}
        if has_rpn:
            inputs["im_info"] = torch.tensor(
                [[data_np.shape[2], data_np.shape[3], scales_np[0]]], dtype=torch.float32,
                device=device).to(dtype)
            props: Optional[Tensor] = None
        else:
            if boxes is None:
                raise DataError("this net is fed proposals (TEST.HAS_RPN False): im_detect needs "
                                "boxes (R x 4 proposals); for an RPN net set TEST.HAS_RPN True")
            props = torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
                                    if not isinstance(boxes, Tensor) else boxes.to(torch.float64),
                                    device=device).reshape(-1, 4)
            rois_blob = _get_rois_blob(props, scales)
            if c.DEDUP_BOXES > 0:
                index, inverse = _dedup(rois_blob, float(c.DEDUP_BOXES))
                rois_blob = rois_blob[index]
                props = props[index]
            inputs["rois"] = rois_blob.to(dtype)

        outputs = net.forward(**inputs)

        if has_rpn:
            props = _rpn_rois(outputs, net)[:, 1:5] / float(scales_np[0])
        assert props is not None

        scores, deltas = _head_outputs(outputs, net, int(props.shape[0]))
        num_classes = scores.shape[1]

        if deltas is not None:
            pred_boxes = bbox_transform_inv(props, deltas)
            if pred_boxes.shape[0]:   # (clip_boxes cannot reshape an empty (0, 4K) tensor)
                pred_boxes = clip_boxes(pred_boxes, (im.shape[0], im.shape[1]))
        else:
            pred_boxes = props.to(torch.float32 if props.dtype == torch.float64 else props.dtype)
            pred_boxes = pred_boxes.repeat(1, num_classes)

        if inverse is not None:
            scores = scores[inverse]
            pred_boxes = pred_boxes[inverse]
    return scores, pred_boxes


def _batch_groups(shapes: Sequence[Tuple[int, ...]], batch: int) -> List[List[int]]:
    """Indices of images to forward together: those of identical blob shape, at most
    ``batch`` per group, in order of first appearance (a group of one is plain batch 1).

    Only identical shapes batch: padding an image to a larger one would change the conv
    features near its right and bottom borders (the zeros enter the receptive fields), so
    its detections would differ from batch 1.
    """
    groups: List[List[int]] = []
    open_group: Dict[Tuple[int, ...], List[int]] = {}
    for i, shape in enumerate(shapes):
        g = open_group.get(shape)
        if g is None or len(g) >= batch:
            g = []
            groups.append(g)
            open_group[shape] = g
        g.append(i)
    return groups


def im_detect_batch(net: Any, ims: Sequence[np.ndarray], batch: Optional[int] = None
                    ) -> List[Tuple[Tensor, Tensor]]:
    """:func:`im_detect` on several images of an RPN net, several per forward.

    Images whose resized blobs have the same shape go through the net together (at most
    ``batch`` per forward, default all), ``im_info`` one row per image; the proposal
    layer tags each roi with its image (``rois[:, 0]``), which splits the rows back.
    Each image's ``(scores, boxes)`` equals :func:`im_detect`'s up to the kernels'
    rounding for a larger batch (1e-5).  An image alone in its shape, and nets fed
    precomputed proposals, go through :func:`im_detect` itself.
    """
    c = cfg
    n = len(ims)
    if n == 0:
        return []
    if not c.TEST.HAS_RPN:
        raise ConfigError("im_detect_batch needs an RPN net (TEST.HAS_RPN); nets fed proposals "
                          "take one image per forward (im_detect)")
    _check_inputs(net, True)
    if len(tuple(c.TEST.SCALES)) != 1:
        raise ConfigError(f"RPN nets (TEST.HAS_RPN) test one image at one scale; TEST.SCALES has "
                          f"{len(tuple(c.TEST.SCALES))}: {tuple(c.TEST.SCALES)}")
    blobs = [_get_image_blob(im, c) for im in ims]
    size = n if batch is None else max(1, int(batch))
    results: List[Optional[Tuple[Tensor, Tensor]]] = [None] * n
    for group in _batch_groups([tuple(b[0].shape) for b in blobs], size):
        if len(group) == 1:
            results[group[0]] = im_detect(net, ims[group[0]])
            continue
        for i, out in zip(group, _detect_group(net, [ims[i] for i in group],
                                               [blobs[i] for i in group])):
            results[i] = out
    return [r for r in results if r is not None]


def _detect_group(net: Any, ims: Sequence[np.ndarray], blobs: Sequence[Tuple[np.ndarray, np.ndarray]]
                  ) -> List[Tuple[Tensor, Tensor]]:
    """One forward of same-shape image blobs; per image ``(scores, boxes)`` as im_detect."""
    device, dtype = _net_device(net), _net_dtype(net)
    data_np = np.concatenate([b[0] for b in blobs], axis=0)
    info_np = np.array([[data_np.shape[2], data_np.shape[3], b[1][0]] for b in blobs], dtype=np.float32)
    with torch.no_grad():
        outputs = net.forward(data=torch.as_tensor(data_np, device=device).to(dtype),
                              im_info=torch.as_tensor(info_np, device=device).to(dtype))
        rois = _rpn_rois(outputs, net)
        all_scores, all_deltas = _head_outputs(outputs, net, int(rois.shape[0]))
        num_classes = all_scores.shape[1]
        index = rois[:, 0]
        out: List[Tuple[Tensor, Tensor]] = []
        for k, (im, (_, scales_np)) in enumerate(zip(ims, blobs)):
            sel = torch.nonzero(index == k).reshape(-1)
            props = rois[sel, 1:5] / float(scales_np[0])
            scores = all_scores[sel]
            if all_deltas is not None:
                pred_boxes = bbox_transform_inv(props, all_deltas[sel])
                if pred_boxes.shape[0]:
                    pred_boxes = clip_boxes(pred_boxes, (im.shape[0], im.shape[1]))
            else:
                pred_boxes = props.to(torch.float32 if props.dtype == torch.float64 else props.dtype)
                pred_boxes = pred_boxes.repeat(1, num_classes)
            out.append((scores, pred_boxes))
    return out


# ----------------------------------------------------------------------------- post-processing
def detections_per_class(scores: Tensor, boxes: Tensor, thresh: float, nms_thresh: float,
                         skip_background: bool = True) -> List[np.ndarray]:
    """For each class, ``(n, 5)`` float32 ``x1 y1 x2 y2 score`` with score ``> thresh``
    after NMS at ``nms_thresh`` (best first); entry 0 (background) is an empty array."""
    num_classes = scores.shape[1]
    out: List[np.ndarray] = [np.zeros((0, 5), dtype=np.float32)]
    for j in range(1 if skip_background else 0, num_classes):
        inds = torch.nonzero(scores[:, j] > thresh).reshape(-1)
        cls_scores = scores[inds, j].to(torch.float32)
        cls_boxes = boxes[inds, j * 4:(j + 1) * 4].to(torch.float32)
        keep = nms(cls_boxes, cls_scores, float(nms_thresh))
        dets = torch.cat([cls_boxes[keep], cls_scores[keep, None]], dim=1)
        arr = dets.cpu().numpy().astype(np.float32, copy=False)
        if j == 0:
            out[0] = arr
        else:
            out.append(arr)
    return out


def limit_per_image(per_class: List[np.ndarray], max_per_image: int) -> List[np.ndarray]:
    """Keep the ``max_per_image`` best detections over classes 1.. (all ties at the cut)."""
    if max_per_image <= 0:
        return per_class
    scores = np.hstack([d[:, -1] for d in per_class[1:]]) if len(per_class) > 1 else np.zeros(0)
    if len(scores) <= max_per_image:
        return per_class
    image_thresh = np.sort(scores)[-max_per_image]
    return [per_class[0]] + [d[d[:, -1] >= image_thresh] for d in per_class[1:]]


def apply_nms(all_boxes: Sequence[Sequence[Any]], thresh: float) -> List[List[Any]]:
    """NMS at ``thresh`` on every ``all_boxes[class][image]`` (empty entries stay ``[]``)."""
    out: List[List[Any]] = []
    for per_image in all_boxes:
        row: List[Any] = []
        for dets in per_image:
            d = np.asarray(dets, dtype=np.float32).reshape(-1, 5) if len(dets) else None
            if d is None or d.shape[0] == 0:
                row.append([])
                continue
            t = torch.from_numpy(d)
            keep = nms(t[:, :4], t[:, 4], float(thresh)).numpy()
            row.append(d[keep].copy() if len(keep) else [])
        out.append(row)
    return out


# ----------------------------------------------------------------------------- cache
def save_detections(path: str, all_boxes: Sequence[Sequence[Any]],
                    classes: Optional[Sequence[str]] = None,
                    image_ids: Optional[Sequence[Any]] = None) -> None:
    """Write ``all_boxes[class][image]`` as one ``.npz`` (no pickle).

    Keys: ``dets`` ``(M, 5)`` float32, ``class_index`` and ``image_index`` ``(M,)``,
    ``num_classes``/``num_images``, and ``classes``/``image_ids`` as string arrays.
    """
    from caffe_compat.atomic import atomic_open

    num_classes = len(all_boxes)
    num_images = len(all_boxes[0]) if num_classes else 0
    dets, ci, ii = [], [], []
    for c, per_image in enumerate(all_boxes):
        for i, d in enumerate(per_image):
            a = np.asarray(d, dtype=np.float32).reshape(-1, 5) if len(d) else np.zeros((0, 5), np.float32)
            dets.append(a)
            ci.append(np.full(a.shape[0], c, dtype=np.int32))
            ii.append(np.full(a.shape[0], i, dtype=np.int32))
    arrays: Dict[str, np.ndarray] = {
        "dets": np.concatenate(dets) if dets else np.zeros((0, 5), np.float32),
        "class_index": np.concatenate(ci) if ci else np.zeros(0, np.int32),
        "image_index": np.concatenate(ii) if ii else np.zeros(0, np.int32),
        "num_classes": np.array(num_classes, dtype=np.int64),
        "num_images": np.array(num_images, dtype=np.int64),
    }
    if classes is not None:
        arrays["classes"] = np.array([str(c) for c in classes])
    if image_ids is not None:
        arrays["image_ids"] = np.array([str(i) for i in image_ids])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    with atomic_open(path) as f:
        f.write(buf.getvalue())


def load_detections(path: str, meta: Optional[Dict[str, List[str]]] = None) -> List[List[np.ndarray]]:
    """``all_boxes[class][image]`` (``(n, 5)`` float32 arrays) from :func:`save_detections`.

    A damaged or inconsistent file is one ``DataError``; ``meta``, if given, receives the
    recorded ``classes`` and ``image_ids``.
    """
    import zipfile
    import zlib

    try:
        with np.load(path, allow_pickle=False) as z:
            dets, ci, ii = z["dets"], z["class_index"], z["image_index"]
            nc, ni = int(z["num_classes"]), int(z["num_images"])
            if meta is not None:
                for key in ("classes", "image_ids"):
                    if key in z.files:
                        meta[key] = [str(v) for v in z[key].reshape(-1)]
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise DataError(f"cannot read detections file: {e}", where=path) from None
    if dets.ndim != 2 or dets.shape[1] != 5 or dets.dtype.kind != "f":
        raise DataError(f"'dets' must be n x 5 floats (x1 y1 x2 y2 score), got {dets.dtype} "
                        f"{dets.shape}", where=path)
    if ci.shape != (len(dets),) or ii.shape != (len(dets),) or ci.dtype.kind not in "iu" \
            or ii.dtype.kind not in "iu":
        raise DataError(f"'class_index' and 'image_index' must be {len(dets)} integers each, got "
                        f"{ci.dtype} {ci.shape} and {ii.dtype} {ii.shape}", where=path)
    if nc < 0 or ni < 0 or (len(dets) and (ci.min() < 0 or ci.max() >= nc or ii.min() < 0
                                           or ii.max() >= ni)):
        raise DataError(f"indices outside the recorded {nc} classes x {ni} images", where=path)
    out = [[np.zeros((0, 5), np.float32) for _ in range(ni)] for _ in range(nc)]
    for c in range(nc):
        sel_c = ci == c
        for i in np.unique(ii[sel_c]):
            out[c][int(i)] = dets[sel_c & (ii == i)].astype(np.float32, copy=False)
    return out


# ----------------------------------------------------------------------------- test_net
def _net_name(net: Any) -> Optional[str]:
    for attr in ("name", "net_name"):
        v = getattr(net, attr, None)
        if isinstance(v, str) and v:
            return v
    return None


class _Named:
    def __init__(self, name: str) -> None:
        self.name = name


def test_net(net: Any, imdb: Any, max_per_image: int = 100, thresh: float = 0.05,
             vis: bool = False, output_dir: Optional[str] = None, *,
             log_fn: Optional[Callable[[str], None]] = None,
             detect_fn: Optional[Detector] = None, batch: int = 1,
             precision: str = "fp32", dist: Any = None) -> Dict[str, Any]:
    """Detect on every image of ``imdb`` and evaluate: ``{"ap": {class: AP}, "mAP": m, ...}``.

    Per image: :func:`im_detect` (on the imdb's non-ground-truth proposals unless
    ``TEST.HAS_RPN``), per class scores ``> thresh`` and NMS at ``TEST.NMS``, then at most
    ``max_per_image`` detections over all classes (``<= 0``: no limit).  Detections go to
    ``output_dir/detections.npz`` (default: ``get_output_dir(imdb, net)``), images with
    drawn boxes to ``output_dir/vis`` when ``vis``.  The result adds ``det_file``,
    ``num_images``, ``all_boxes`` and average ``im_detect``/``misc`` times to what
    ``imdb.evaluate_detections`` returns.  Progress lines go to ``log_fn`` (default: this
    module's logger at INFO).

    ``batch > 1`` (RPN nets): up to ``batch`` consecutive images of the same resized shape
    share a forward (:func:`im_detect_batch`; the same detections as batch 1), and the
    ``im_detect`` time shown is per image.  ``precision`` (:mod:`caffe_compat.precision`:
    fp32, tf32, bf16, fp16) runs the forwards in that precision; fp32 is Caffe's numbers.

    ``dist`` (a :class:`~caffe_compat.distributed.DistContext` of a joined process group):
    each rank detects on its contiguous share of the images, rank 0 gathers the detections,
    writes the file and evaluates once (the same file and mAP as one process); the other
    ranks return ``{"rank": r, "num_images": n}`` with their share's count.
    """
    from caffe_compat.precision import inference_precision

    if int(batch) < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    with inference_precision(net, precision):
        return _test_net(net, imdb, max_per_image, thresh, vis, output_dir, log_fn, detect_fn,
                         int(batch), dist)


def _test_net(net: Any, imdb: Any, max_per_image: int, thresh: float, vis: bool,
              output_dir: Optional[str], log_fn: Optional[Callable[[str], None]],
              detect_fn: Optional[Detector], batch: int, dist: Any = None) -> Dict[str, Any]:
    emit = log_fn or log.info
    detect = detect_fn or im_detect
    c = cfg
    num_images = len(imdb.image_index)
    num_classes = imdb.num_classes
    all_boxes: List[List[Any]] = [[[] for _ in range(num_images)] for _ in range(num_classes)]
    if output_dir is None:
        name = _net_name(net)
        output_dir = get_output_dir(imdb, _Named(name) if name else None)
    os.makedirs(output_dir, exist_ok=True)

    sync = _device_sync(_net_device(net))
    timers = {"im_detect": Timer(sync), "misc": Timer(sync)}
    roidb = None if c.TEST.HAS_RPN else imdb.roidb

    batched = batch > 1 and roidb is None and detect_fn is None
    step = batch if batched else 1
    lo, hi = 0, num_images
    if dist is not None and dist.distributed:
        from caffe_compat.distributed import shard_range

        share = shard_range(num_images, dist.rank, dist.world_size)
        lo, hi = share.start, share.stop
    for first in range(lo, hi, step):
        chunk = range(first, min(first + step, hi))
        ims = [read_image(imdb.image_path_at(i)) for i in chunk]
        timers["im_detect"].tic()
        if batched:
            found = im_detect_batch(net, ims, batch)
        else:
            found = []
            for i, im in zip(chunk, ims):
                if roidb is None:
                    box_proposals = None
                else:
                    entry = roidb[i]
                    # only proposals: ground-truth rows (class != 0) would make the test a cheat
                    box_proposals = entry["boxes"][entry["gt_classes"] == 0]
                if box_proposals is not None and len(box_proposals) == 0:
                    found.append((torch.zeros((0, num_classes)), torch.zeros((0, 4 * num_classes))))
                else:
                    found.append(detect(net, im, box_proposals))
        timers["im_detect"].toc()
        if len(chunk) > 1:   # per-image time: one timed call counted as len(chunk) images
            t = timers["im_detect"]
            t.calls += len(chunk) - 1
            t.average_time = t.total_time / t.calls

        for i, im, (scores, boxes) in zip(chunk, ims, found):
            if scores.shape[1] != num_classes:
                raise ShapeError(f"the net scores {scores.shape[1]} classes but {imdb.name} has "
                                 f"{num_classes} ({', '.join(imdb.classes)})")

            timers["misc"].tic()
            per_class = detections_per_class(scores, boxes, thresh, float(c.TEST.NMS))
            per_class = limit_per_image(per_class, max_per_image)
            for j in range(1, num_classes):
                all_boxes[j][i] = per_class[j]
            timers["misc"].toc()

            if vis:
                _write_vis(im, per_class, imdb, i, output_dir)
            emit("im_detect: {:d}/{:d} {:.3f}s {:.3f}s".format(
                i + 1, num_images, timers["im_detect"].average_time, timers["misc"].average_time))

    if dist is not None and dist.distributed:  # rank 0 gathers every rank's share
        from caffe_compat.distributed import gather_objects

        parts = gather_objects({i: [all_boxes[j][i] for j in range(num_classes)] for i in range(lo, hi)},
                               dist)
        if parts is None:
            return {"rank": dist.rank, "num_images": hi - lo, "output_dir": output_dir}
        for part in parts:
            for i, rows in part.items():
                for j in range(1, num_classes):
                    all_boxes[j][i] = rows[j]
    det_file = os.path.join(output_dir, "detections.npz")
    save_detections(det_file, all_boxes, imdb.classes, list(imdb.image_index))
    emit(f"Wrote detections to {det_file}")
    out = evaluate(imdb, all_boxes, output_dir, emit)
    out.update(det_file=det_file, output_dir=output_dir, num_images=num_images, all_boxes=all_boxes,
               im_detect_time=timers["im_detect"].average_time, misc_time=timers["misc"].average_time)
    return out


def evaluate(imdb: Any, all_boxes: Sequence[Sequence[Any]], output_dir: str,
             emit: Callable[[str], None]) -> Dict[str, Any]:
    """The imdb's evaluation as a dict with ``ap`` (per class) and ``mAP`` (also for data
    sets whose evaluation returns something else)."""
    emit("Evaluating detections")
    result = imdb.evaluate_detections(all_boxes, output_dir)
    out: Dict[str, Any] = dict(result) if isinstance(result, dict) else {"evaluation": result}
    out.setdefault("ap", {})
    if "mAP" not in out:
        vals = [v for v in out["ap"].values() if v is not None and not np.isnan(v)]
        out["mAP"] = float(np.mean(vals)) if vals else float("nan")
    return out


test_net.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported


def _write_vis(im: np.ndarray, per_class: List[np.ndarray], imdb: Any, i: int, output_dir: str) -> None:
    """py-faster-rcnn showed each class in a matplotlib window; here one image per test image."""
    from caffe_compat.frcnn.vis import draw_detections, write_image

    dets = [(imdb.classes[j], j, d) for j, d in enumerate(per_class) if j > 0 and len(d)]
    drawn = draw_detections(im, dets, thresh=0.3, num_classes=imdb.num_classes)
    vis_dir = os.path.join(output_dir, "vis")
    os.makedirs(vis_dir, exist_ok=True)
    stem = str(imdb.image_index[i]).replace(os.sep, "_")
    write_image(os.path.join(vis_dir, stem + ".jpg"), drawn)


def test_imdb(model: str, weights: str, imdb_name: str, *, device: Any = None, comp_mode: bool = False,
              max_per_image: int = 100, thresh: float = 0.05, vis: bool = False,
              output_dir: Optional[str] = None, rpn_file: Optional[str] = None,
              stages: Sequence[str] = (), level: Optional[int] = None,
              allow_python_layers: Optional[bool] = None, batch: int = 1,
              precision: str = "fp32",
              log_fn: Callable[[str], None] = print,
              note_fn: Callable[[str], None] = print, dist: Any = None,
              cuda_graphs: bool = True, compile_backend: Optional[str] = None) -> Dict[str, Any]:
    """py-faster-rcnn's ``tools/test_net.py`` under the config in force: build the TEST net
    with ``weights``, match ``TEST.HAS_RPN`` to its inputs (``im_info``: an RPN net;
    ``rois``: precomputed proposals), then :func:`test_net` on ``imdb_name``.
    ``cuda_graphs``/``compile_backend``: :func:`caffe_compat.cuda_graph.fast_runner`."""
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.net import Net
    from caffe_compat.precision import check_precision

    device = torch.device("cpu") if device is None else torch.device(device)
    check_precision(precision, device)   # before the (slow) net build
    net = Net(model, phase="test", stages=stages, level=level, device=device,
              allow_python_layers=allow_python_layers)
    for note in net.load_weights(weights):
        note_fn(f"note: {note}")
    net.name = os.path.splitext(os.path.basename(weights))[0]
    inputs = set(net.input_names)
    if "im_info" in inputs and "rois" not in inputs and not cfg.TEST.HAS_RPN:
        note_fn("note: the net takes im_info (an RPN net): using TEST.HAS_RPN True")
        cfg.TEST.HAS_RPN = True
    elif "rois" in inputs and "im_info" not in inputs and cfg.TEST.HAS_RPN:
        note_fn("note: the net takes rois (precomputed proposals): using TEST.HAS_RPN False")
        cfg.TEST.HAS_RPN = False

    imdb = get_imdb(imdb_name)
    imdb.competition_mode(comp_mode)
    if not cfg.TEST.HAS_RPN:
        if rpn_file:
            imdb.config["rpn_file"] = rpn_file
        imdb.set_proposal_method(cfg.TEST.PROPOSAL_METHOD)
    log_fn(f"Testing '{net.name}' on {imdb.name} ({imdb.num_images} images, "
           f"{'CPU' if device.type == 'cpu' else f'cuda:{device.index}'})")
    from caffe_compat.cuda_graph import fast_runner

    runner = fast_runner(net, cuda_graphs=cuda_graphs, compile_backend=compile_backend)
    return test_net(runner, imdb, max_per_image=max_per_image, thresh=thresh, vis=vis,
                    output_dir=output_dir, log_fn=log_fn, batch=batch, precision=precision, dist=dist)


def format_ap(v: Any) -> str:
    """An AP as the commands print it (``n/a`` for a class without objects)."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "n/a (no objects of this class)"
    return f"{float(v):.4f}"
