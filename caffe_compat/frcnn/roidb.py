"""Training data for py-faster-rcnn nets: roidb preparation and minibatches.

This is the data side of py-faster-rcnn's ``RoIDataLayer`` (``roi_data_layer/roidb.py``,
``roi_data_layer/minibatch.py``, ``utils/blob.py`` and the roidb helpers of
``fast_rcnn/train.py``).  The formulas, thresholds and orders are the original's, since
they decide what a model learns; randomness comes from a seedable ``numpy.random.Generator``
instead of the global numpy state, so runs are reproducible and independent of anything
else that draws random numbers.

Pipeline::

    imdb = get_imdb("voc_2007_trainval"); imdb.set_proposal_method(cfg.TRAIN.PROPOSAL_METHOD)
    roidb = get_training_roidb(imdb)          # + flipped copies, + image paths/sizes/overlaps
    roidb = filter_roidb(roidb)               # drop images without a usable fg/bg RoI
    means, stds = add_bbox_regression_targets(roidb)   # Fast R-CNN nets only
    loader = MinibatchLoader(roidb, num_classes=21, seed=3)
    blobs = next(loader)   # {"data", "im_info", "gt_boxes"} or {"data", "rois", "labels", ...}

Every function reads the global ``cfg`` when called (as the original did), or the config
passed as ``config``.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import AttrDict, ConfigError, cfg

__all__ = [
    "prepare_roidb", "add_bbox_regression_targets", "compute_targets", "filter_roidb",
    "get_training_roidb", "prep_im_for_blob", "im_list_to_blob", "get_minibatch",
    "sample_rois", "get_bbox_regression_labels", "MinibatchLoader", "top_names",
]

log = logging.getLogger(__name__)

Roidb = List[Dict[str, Any]]


def _c(config: Optional[AttrDict]) -> AttrDict:
    return cfg if config is None else config


def _bbox_overlaps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from caffe_compat.frcnn.datasets.imdb import bbox_overlaps_np

    return bbox_overlaps_np(a, b)


def _bbox_transform(ex: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """Regression targets in float64 (py-faster-rcnn's numpy ``bbox_transform``)."""
    import torch

    from caffe_compat.frcnn.boxes import bbox_transform

    return bbox_transform(torch.from_numpy(np.ascontiguousarray(ex, dtype=np.float64)),
                          torch.from_numpy(np.ascontiguousarray(gt, dtype=np.float64))).numpy()


# ----------------------------------------------------------------------------- roidb
def prepare_roidb(imdb: Any) -> Roidb:
    """Add ``image``, ``width``, ``height``, ``max_overlaps`` and ``max_classes`` to each entry.

    ``max_overlaps`` is the best overlap of each box with any class's ground truth and
    ``max_classes`` that class (0 where the overlap is 0).  Sizes come from the image
    files (headers only), as the original.
    """
    roidb = imdb.roidb
    sizes: Dict[str, Tuple[int, int]] = {}
    from caffe_compat.frcnn.datasets.imdb import image_size

    for i in range(len(imdb.image_index)):
        path = imdb.image_path_at(i)
        if path not in sizes:
            sizes[path] = image_size(path)
        e = roidb[i]
        e["image"] = path
        e["width"], e["height"] = sizes[path]
        gt_overlaps = np.asarray(e["gt_overlaps"])
        if gt_overlaps.shape[0] == 0:
            max_overlaps = np.zeros((0,), dtype=np.float32)
            max_classes = np.zeros((0,), dtype=np.int64)
        else:
            max_overlaps = gt_overlaps.max(axis=1)
            max_classes = gt_overlaps.argmax(axis=1)
        e["max_classes"] = max_classes
        e["max_overlaps"] = max_overlaps
        if (max_classes[max_overlaps == 0] != 0).any() or (max_classes[max_overlaps > 0] == 0).any():
            raise DataError(f"roidb entry {i} ({path}): overlaps must be 0 exactly for background "
                            "boxes and positive only in foreground class columns")
    return roidb


def compute_targets(rois: np.ndarray, overlaps: np.ndarray, labels: np.ndarray,
                    bbox_thresh: float) -> np.ndarray:
    """``(R, 5)`` float32: ``[class, dx, dy, dw, dh]`` towards the best-overlapping gt box.

    Ground-truth boxes are the rows with overlap exactly 1; rows with overlap
    ``>= bbox_thresh`` get targets, the others stay zero (class 0).
    """
    targets = np.zeros((rois.shape[0], 5), dtype=np.float32)
    gt_inds = np.where(overlaps == 1)[0]
    if len(gt_inds) == 0:
        return targets
    ex_inds = np.where(overlaps >= bbox_thresh)[0]
    ex_gt = _bbox_overlaps(rois[ex_inds, :], rois[gt_inds, :])
    gt_assignment = ex_gt.argmax(axis=1)
    gt_rois = rois[gt_inds[gt_assignment], :]
    targets[ex_inds, 0] = labels[ex_inds]
    targets[ex_inds, 1:] = _bbox_transform(rois[ex_inds, :], gt_rois)
    return targets


def add_bbox_regression_targets(roidb: Roidb, config: Optional[AttrDict] = None
                                ) -> Tuple[np.ndarray, np.ndarray]:
    """Add ``bbox_targets`` to each entry; return the ``(4K,)`` means and stds used.

    Means/stds are ``TRAIN.BBOX_NORMALIZE_MEANS/STDS`` tiled over classes when
    ``TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED``, else per-class statistics of the targets
    (``var = E[x^2] - E[x]^2``, counts start at ``cfg.EPS``; a class whose targets have
    zero variance gets std 1 where the original produced NaN).  Targets are normalized
    ``(t - mean) / std`` per class when ``TRAIN.BBOX_NORMALIZE_TARGETS``.  The returned
    values undo the normalization in the snapshot's ``bbox_pred`` weights.
    """
    c = _c(config)
    if not roidb:
        raise DataError("empty roidb: no training images")
    if "max_classes" not in roidb[0]:
        raise DataError("roidb entries lack 'max_classes': call prepare_roidb first")
    num_classes = np.asarray(roidb[0]["gt_overlaps"]).shape[1]
    for e in roidb:
        e["bbox_targets"] = compute_targets(e["boxes"], e["max_overlaps"], e["max_classes"],
                                            c.TRAIN.BBOX_THRESH)
    if c.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
        means = np.tile(np.array(c.TRAIN.BBOX_NORMALIZE_MEANS), (num_classes, 1))
        stds = np.tile(np.array(c.TRAIN.BBOX_NORMALIZE_STDS), (num_classes, 1))
    else:
        class_counts = np.zeros((num_classes, 1)) + c.EPS
        sums = np.zeros((num_classes, 4))
        squared_sums = np.zeros((num_classes, 4))
        for e in roidb:
            t = e["bbox_targets"]
            for cls in range(1, num_classes):
                inds = np.where(t[:, 0] == cls)[0]
                if inds.size > 0:
                    class_counts[cls] += inds.size
                    sums[cls, :] += t[inds, 1:].sum(axis=0)
                    squared_sums[cls, :] += (t[inds, 1:] ** 2).sum(axis=0)
        means = sums / class_counts
        var = squared_sums / class_counts - means ** 2
        # A fg class whose targets do not vary (e.g. only ground-truth boxes, whose targets
        # are all 0) made the original divide 0 by 0: NaN targets, NaN loss.  Such a class
        # gets std 1 (no scaling) instead; the returned stds say so, so snapshots stay right.
        flat = (var <= 0) & (class_counts > c.EPS)
        if flat[1:].any():
            log.warning("bbox targets of classes %s have zero variance: using std 1 for them",
                        sorted(set(np.where(flat)[0].tolist()) - {0}))
        stds = np.where(flat, 1.0, np.sqrt(np.maximum(var, 0.0)))
    log.info("bbox target means (fg classes averaged): %s", means[1:, :].mean(axis=0))
    log.info("bbox target stds (fg classes averaged): %s", stds[1:, :].mean(axis=0))
    if c.TRAIN.BBOX_NORMALIZE_TARGETS:
        for e in roidb:
            t = e["bbox_targets"]
            for cls in range(1, num_classes):
                inds = np.where(t[:, 0] == cls)[0]
                t[inds, 1:] -= means[cls, :]
                t[inds, 1:] /= stds[cls, :]
    return means.ravel(), stds.ravel()


def filter_roidb(roidb: Roidb, config: Optional[AttrDict] = None) -> Roidb:
    """Keep entries with at least one fg (``>= FG_THRESH``) or bg (``[BG_LO, BG_HI)``) RoI."""
    c = _c(config)

    def is_valid(e: Dict[str, Any]) -> bool:
        ov = e["max_overlaps"]
        fg = ov >= c.TRAIN.FG_THRESH
        bg = (ov < c.TRAIN.BG_THRESH_HI) & (ov >= c.TRAIN.BG_THRESH_LO)
        return bool(fg.any() or bg.any())

    out = [e for e in roidb if is_valid(e)]
    log.info("filtered %d roidb entries: %d -> %d", len(roidb) - len(out), len(roidb), len(out))
    return out


def get_training_roidb(imdb: Any, config: Optional[AttrDict] = None) -> Roidb:
    """The imdb's roidb with flipped copies (``TRAIN.USE_FLIPPED``), prepared for training."""
    c = _c(config)
    if c.TRAIN.USE_FLIPPED:
        imdb.append_flipped_images()
    return prepare_roidb(imdb)


# ----------------------------------------------------------------------------- images
def prep_im_for_blob(im: np.ndarray, pixel_means: np.ndarray, target_size: int,
                     max_size: int) -> Tuple[np.ndarray, float]:
    """Subtract the BGR means and resize: shortest side to ``target_size``, longest at most
    ``max_size`` (if ``round(scale * longest) > max_size``, ``scale = max_size / longest``).

    Bilinear (``cv2.INTER_LINEAR``) resize of the mean-subtracted float32 image; returns
    ``(image, scale)``.  The input is never modified.
    """
    import cv2

    im = np.array(im, dtype=np.float32)   # a copy: the caller's image stays intact
    im -= pixel_means                     # float64 means, float32 result as the original
    im_size_min = min(im.shape[0:2])
    im_size_max = max(im.shape[0:2])
    im_scale = float(target_size) / float(im_size_min)
    if np.round(im_scale * im_size_max) > max_size:
        im_scale = float(max_size) / float(im_size_max)
    im = cv2.resize(im, None, None, fx=im_scale, fy=im_scale, interpolation=cv2.INTER_LINEAR)
    return im, im_scale


def im_list_to_blob(ims: Sequence[np.ndarray]) -> np.ndarray:
    """Stack HxWx3 images into a zero-padded ``(N, 3, maxH, maxW)`` float32 blob."""
    if not ims:
        raise DataError("no images to put in a blob")
    max_h = max(im.shape[0] for im in ims)
    max_w = max(im.shape[1] for im in ims)
    blob = np.zeros((len(ims), max_h, max_w, 3), dtype=np.float32)
    for i, im in enumerate(ims):
        blob[i, :im.shape[0], :im.shape[1], :] = im
    return np.ascontiguousarray(blob.transpose(0, 3, 1, 2))


def _read_image(entry: Dict[str, Any]) -> np.ndarray:
    import cv2

    path = entry.get("image")
    if path is None:
        raise DataError("roidb entry has no 'image': call prepare_roidb first")
    im = cv2.imread(path)
    if im is None:
        raise DataError("cannot read image (missing or not an image)", where=path)
    if entry.get("flipped"):
        im = im[:, ::-1, :]
    return im


def _get_image_blob(roidb: Roidb, scale_inds: np.ndarray, c: AttrDict) -> Tuple[np.ndarray, List[float]]:
    ims, scales = [], []
    for entry, si in zip(roidb, scale_inds):
        im, s = prep_im_for_blob(_read_image(entry), c.PIXEL_MEANS, c.TRAIN.SCALES[int(si)],
                                 c.TRAIN.MAX_SIZE)
        ims.append(im)
        scales.append(s)
    return im_list_to_blob(ims), scales


# ----------------------------------------------------------------------------- minibatches
def get_bbox_regression_labels(bbox_target_data: np.ndarray, num_classes: int,
                               inside_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)
                               ) -> Tuple[np.ndarray, np.ndarray]:
    """Expand compact ``[class, 4 targets]`` rows to ``(R, 4K)`` targets and inside weights:
    only the 4 columns of the row's class are set (none for background)."""
    clss = bbox_target_data[:, 0].astype(np.int64)
    n = clss.size
    targets = np.zeros((n, 4 * num_classes), dtype=np.float32)
    weights = np.zeros(targets.shape, dtype=np.float32)
    inds = np.where(clss > 0)[0]
    if inds.size and clss[inds].max() >= num_classes:
        raise DataError(f"a regression target has class {int(clss[inds].max())} but the net has "
                        f"num_classes {num_classes}")
    cols = 4 * clss[inds, None] + np.arange(4)[None, :]
    targets[inds[:, None], cols] = bbox_target_data[inds, 1:]
    weights[inds[:, None], cols] = np.asarray(inside_weights, dtype=np.float32)
    return targets, weights


def sample_rois(entry: Dict[str, Any], fg_rois_per_image: int, rois_per_image: int,
                num_classes: int, rng: np.random.Generator, config: Optional[AttrDict] = None
                ) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Sample fg (``>= FG_THRESH``) then bg (``[BG_THRESH_LO, BG_THRESH_HI)``) RoIs of one image.

    At most ``fg_rois_per_image`` fg RoIs, then bg RoIs up to ``rois_per_image`` in all,
    each without replacement; bg labels are 0.  Returns
    ``(labels, overlaps, rois, bbox_targets (R, 4K), bbox_inside_weights (R, 4K))``.
    """
    c = _c(config)
    compact = entry.get("bbox_targets")
    if compact is None:
        if c.TRAIN.BBOX_REG:
            raise DataError("roidb entry has no 'bbox_targets': call add_bbox_regression_targets "
                            "(Fast R-CNN nets with TRAIN.BBOX_REG need them)")
        compact = np.zeros((entry["boxes"].shape[0], 5), dtype=np.float32)
    overlaps = entry["max_overlaps"]
    fg_inds = np.where(overlaps >= c.TRAIN.FG_THRESH)[0]
    fg_this = int(min(fg_rois_per_image, fg_inds.size))
    if fg_inds.size > 0:
        fg_inds = rng.choice(fg_inds, size=fg_this, replace=False)
    bg_inds = np.where((overlaps < c.TRAIN.BG_THRESH_HI) & (overlaps >= c.TRAIN.BG_THRESH_LO))[0]
    bg_this = int(min(rois_per_image - fg_this, bg_inds.size))
    if bg_inds.size > 0:
        bg_inds = rng.choice(bg_inds, size=bg_this, replace=False)
    keep = np.append(fg_inds, bg_inds).astype(np.int64)
    labels = np.array(entry["max_classes"][keep])
    labels[fg_this:] = 0
    targets, inside = get_bbox_regression_labels(compact[keep, :], num_classes,
                                                 c.TRAIN.BBOX_INSIDE_WEIGHTS)
    return labels, overlaps[keep], entry["boxes"][keep], targets, inside


def top_names(has_rpn: bool, bbox_reg: bool = True) -> List[str]:
    """The RoIDataLayer's tops, in order, for an RPN net or a Fast R-CNN net."""
    if has_rpn:
        return ["data", "im_info", "gt_boxes"]
    names = ["data", "rois", "labels"]
    if bbox_reg:
        names += ["bbox_targets", "bbox_inside_weights", "bbox_outside_weights"]
    return names


def get_minibatch(roidb: Roidb, num_classes: int, rng: Optional[np.random.Generator] = None,
                  config: Optional[AttrDict] = None, has_rpn: Optional[bool] = None
                  ) -> Dict[str, np.ndarray]:
    """The blobs of one minibatch made of ``roidb``'s images (all float32).

    Each image is scaled to a randomly chosen ``TRAIN.SCALES`` entry.  RPN nets
    (``TRAIN.HAS_RPN``; one image): ``data``, ``im_info = [[H, W, scale]]`` and
    ``gt_boxes`` ``(G, 5)`` = scaled ``x1, y1, x2, y2`` and class.  Fast R-CNN nets:
    ``data``, ``rois`` ``(R, 5)`` = image index and scaled box, ``labels`` ``(R,)`` and,
    with ``TRAIN.BBOX_REG``, ``bbox_targets``/``bbox_inside_weights``/
    ``bbox_outside_weights`` ``(R, 4K)``.
    """
    c = _c(config)
    rng = np.random.default_rng() if rng is None else rng
    has_rpn = bool(c.TRAIN.HAS_RPN) if has_rpn is None else has_rpn
    num_images = len(roidb)
    if num_images == 0:
        raise DataError("empty minibatch")
    scale_inds = rng.integers(0, len(c.TRAIN.SCALES), size=num_images)
    if c.TRAIN.BATCH_SIZE % num_images != 0:
        raise ConfigError(f"the number of images per batch ({num_images}) must divide "
                          f"TRAIN.BATCH_SIZE ({c.TRAIN.BATCH_SIZE})")
    rois_per_image = c.TRAIN.BATCH_SIZE // num_images
    fg_rois_per_image = int(np.round(c.TRAIN.FG_FRACTION * rois_per_image))

    im_blob, im_scales = _get_image_blob(roidb, scale_inds, c)
    blobs: Dict[str, np.ndarray] = {"data": im_blob}
    if has_rpn:
        if num_images != 1:
            raise ConfigError(f"RPN training takes one image per batch; set TRAIN.IMS_PER_BATCH 1 "
                              f"(got {num_images})")
        e = roidb[0]
        gt_inds = np.where(e["gt_classes"] != 0)[0]
        gt_boxes = np.empty((len(gt_inds), 5), dtype=np.float32)
        gt_boxes[:, 0:4] = e["boxes"][gt_inds, :] * im_scales[0]
        gt_boxes[:, 4] = e["gt_classes"][gt_inds]
        blobs["im_info"] = np.array([[im_blob.shape[2], im_blob.shape[3], im_scales[0]]], dtype=np.float32)
        blobs["gt_boxes"] = gt_boxes
        return blobs

    rois_l, labels_l, targets_l, inside_l = [], [], [], []
    for im_i, e in enumerate(roidb):
        labels, _overlaps, im_rois, targets, inside = sample_rois(
            e, fg_rois_per_image, rois_per_image, num_classes, rng, c)
        rois = im_rois * im_scales[im_i]
        rois_l.append(np.hstack((np.full((rois.shape[0], 1), im_i, dtype=np.float64), rois)))
        labels_l.append(labels)
        targets_l.append(targets)
        inside_l.append(inside)
    blobs["rois"] = np.vstack(rois_l).astype(np.float32).reshape(-1, 5)
    blobs["labels"] = np.hstack(labels_l).astype(np.float32)
    if c.TRAIN.BBOX_REG:
        inside_all = np.vstack(inside_l).astype(np.float32)
        blobs["bbox_targets"] = np.vstack(targets_l).astype(np.float32)
        blobs["bbox_inside_weights"] = inside_all
        blobs["bbox_outside_weights"] = (inside_all > 0).astype(np.float32)
    return blobs


def build_minibatch(entries: Roidb, num_classes: int, seed: int, slot: int, config: AttrDict,
                    has_rpn: bool) -> Dict[str, np.ndarray]:
    """Minibatch ``slot`` of a seeded stream: its random draws (scales, RoI sampling) come
    from a generator seeded by ``(seed, slot)`` alone, so any process can build it."""
    from caffe_compat.distributed import slot_seed

    rng = np.random.default_rng(slot_seed(seed, slot))
    return get_minibatch(entries, num_classes, rng, config, has_rpn)


class MinibatchLoader:
    """Endless minibatches over a prepared roidb, as py-faster-rcnn's ``RoIDataLayer``.

    The roidb is visited in a random permutation, ``TRAIN.IMS_PER_BATCH`` entries at a
    time, and reshuffled when ``cur + IMS_PER_BATCH >= len(roidb)`` (so, as in the
    original, the last images of a pass are skipped).  With ``TRAIN.ASPECT_GROUPING``
    landscape (``width >= height``) and portrait images are permuted separately and
    then paired, and the pairs shuffled, so 2-image batches share an orientation (and
    padding stays small); an odd entry out is kept as a batch of its own row.
    ``next(loader)`` returns ``{top name: float32 array}``.

    ``shard=(rank, world, iter_size)``: a distributed run's loader (any world size, 1
    included).  Every rank walks the same stream of minibatches (the same seeded
    permutations) and takes its own: at iteration ``k`` the ``iter_size`` consecutive
    minibatches from ``k*world*iter_size + rank*iter_size``
    (:func:`caffe_compat.distributed.batch_slot`), skipping the others' without loading
    them.  Each minibatch's own random draws (scales, RoI sampling) come from a generator
    seeded by the seed and its index in the stream (:attr:`last_slot`), so they do not
    depend on which rank reads it: N ranks draw what one process with ``iter_size*N``
    draws, and the state (position in the stream) resumes under any world size.
    """

    def __init__(self, roidb: Roidb, num_classes: int, seed: Optional[int] = None,
                 rng: Optional[np.random.Generator] = None, config: Optional[AttrDict] = None,
                 has_rpn: Optional[bool] = None, shard: Optional[Tuple[int, int, int]] = None) -> None:
        if not roidb:
            raise DataError("empty roidb: no training images (after filtering)")
        self._roidb = roidb
        self.num_classes = int(num_classes)
        self._config = config
        c = _c(config)
        self.has_rpn = bool(c.TRAIN.HAS_RPN) if has_rpn is None else bool(has_rpn)
        self.seed = int(c.RNG_SEED if seed is None else seed)
        if rng is None:
            rng = np.random.default_rng(self.seed)
        self.rng = rng
        self.shard = None if shard is None else tuple(int(v) for v in shard)
        if self.shard is not None:
            r, n, s = self.shard
            if not (0 <= r < n and s >= 1):
                raise DataError(f"bad loader shard (rank {r}, world {n}, iter_size {s})")
        #: index in the stream of the next minibatch (sharded loaders)
        self.slot = 0
        #: index in the stream of the minibatch last returned (None before the first)
        self.last_slot: Optional[int] = None
        self._in_block = 0
        self._perm = np.zeros((0,), dtype=np.int64)
        self._cur = 0
        self.shuffle()

    @property
    def top_names(self) -> List[str]:
        """The tops this loader fills, in the RoIDataLayer's order."""
        return top_names(self.has_rpn, bool(_c(self._config).TRAIN.BBOX_REG))

    def __len__(self) -> int:
        return len(self._roidb)

    def shuffle(self) -> None:
        """Draw a new visiting order and start from its beginning."""
        c = _c(self._config)
        n = len(self._roidb)
        if c.TRAIN.ASPECT_GROUPING:
            widths = np.array([e["width"] for e in self._roidb])
            heights = np.array([e["height"] for e in self._roidb])
            horz = widths >= heights
            inds = np.hstack((self.rng.permutation(np.where(horz)[0]),
                              self.rng.permutation(np.where(~horz)[0]))).astype(np.int64)
            rows = [inds[i:i + 2] for i in range(0, n, 2)]
            order = self.rng.permutation(len(rows))
            self._perm = np.concatenate([rows[i] for i in order]) if rows else inds
        else:
            self._perm = self.rng.permutation(n).astype(np.int64)
        self._cur = 0

    def next_indices(self) -> np.ndarray:
        """Roidb indices of the next minibatch."""
        ims = int(_c(self._config).TRAIN.IMS_PER_BATCH)
        if self._cur + ims >= len(self._roidb):
            self.shuffle()
        inds = self._perm[self._cur:self._cur + ims]
        self._cur += ims
        return inds

    def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
        return self

    def _skip(self, n: int) -> None:
        """Move past ``n`` minibatches of the stream (other ranks') without building them."""
        for _ in range(n):
            self.next_indices()
            self.slot += 1

    def __next__(self) -> Dict[str, np.ndarray]:
        if self.shard is None:
            inds = self.next_indices()
            return get_minibatch([self._roidb[i] for i in inds], self.num_classes, self.rng,
                                 self._config, self.has_rpn)
        inds, slot = self.next_recipe()
        self.last_slot = slot
        return self.build(inds, slot)

    def next_recipe(self) -> Tuple[np.ndarray, int]:
        """A sharded loader's next minibatch as ``(roidb indices, slot in the stream)``,
        moving past it without building it: what a prefetching worker needs to build it
        (:class:`caffe_compat.frcnn.prefetch.PrefetchLoader`)."""
        if self.shard is None:
            raise DataError("next_recipe needs a sharded loader (its minibatches seeded per slot)")
        r, n, s = self.shard
        if self._in_block == 0:
            self._skip(r * s)
        inds = self.next_indices()
        slot = self.slot
        self.slot += 1
        self._in_block += 1
        if self._in_block == s:  # the iteration's last own minibatch: move to the next iteration
            self._skip((n - 1 - r) * s)
            self._in_block = 0
        return inds, slot

    def build(self, inds: np.ndarray, slot: int) -> Dict[str, np.ndarray]:
        """The minibatch of ``next_recipe``'s ``(inds, slot)``: a pure function of them."""
        return build_minibatch([self._roidb[i] for i in inds], self.num_classes, self.seed, slot,
                               _c(self._config), self.has_rpn)

    def state_dict(self) -> Dict[str, Any]:
        """Position and random state, to resume a snapshot exactly (sharded: the position
        in the stream, the same on every rank between iterations)."""
        return {"perm": self._perm.copy(), "cur": self._cur,
                "rng": self.rng.bit_generator.state, "slot": self.slot}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._perm = np.asarray(state["perm"], dtype=np.int64)
        self._cur = int(state["cur"])
        self.rng.bit_generator.state = state["rng"]
        self.slot = int(state.get("slot", 0))
        self._in_block = 0
