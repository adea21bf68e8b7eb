"""MS COCO as an imdb: ``DATA_DIR/coco/{annotations,images}`` (py-faster-rcnn's layout).

Annotations: ``annotations/instances_<set><year>.json`` (``image_info_...`` for test
sets); images: ``images/<data name>/COCO_<data name>_<12-digit id>.jpg``, where the
"views" ``minival2014``/``valminusminival2014`` read ``val2014`` images.

Ground truth needs only the JSON file: pycocotools is used when installed and the file
is parsed directly otherwise (the same order: categories, images and annotations as they
appear in the file).  Box cleaning follows the original: ``[x, y, w, h]`` becomes
``x1 = max(0, x)``, ``x2 = min(W - 1, x1 + max(0, w - 1))`` (likewise y) and objects
with zero area or empty boxes are dropped; crowd objects get ``gt_overlaps = -1`` in
every column so that training ignores them.  *Evaluation* runs COCO's official metric
and therefore needs pycocotools.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import os.path as osp
import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from caffe_compat.atomic import atomic_write
from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import cfg
from caffe_compat.frcnn.datasets.imdb import (Roidb, RoidbEntry, imdb, load_roidb, save_roidb,
                                              validate_boxes, xyxy_to_xywh)

__all__ = ["coco", "filter_crowd_proposals", "crowd_iou"]

log = logging.getLogger(__name__)
_CACHE_VERSION = 1


def _need_pycocotools(what: str) -> Any:
    """The ``pycocotools`` package with its ``coco`` and ``cocoeval`` modules loaded."""
    try:
        import pycocotools.coco
        import pycocotools.cocoeval
    except ImportError:
        raise DataError(f"{what} needs pycocotools: pip install pycocotools "
                        "(or `pip install caffe-compat[all]`)") from None
    return pycocotools


def crowd_iou(dt_xywh: np.ndarray, crowd_xywh: np.ndarray) -> np.ndarray:
    """COCO's box IoU against crowd regions: ``intersection / area(dt)``, ``(N, K)``.

    Boxes are ``[x, y, w, h]`` with COCO's continuous extent ``[x, x + w)`` (no ``+1``),
    which is what ``pycocotools.mask.iou(dt, gt, iscrowd=1)`` computes.
    """
    d = np.asarray(dt_xywh, dtype=np.float64).reshape(-1, 4)
    g = np.asarray(crowd_xywh, dtype=np.float64).reshape(-1, 4)
    dx, dy, dw, dh = (d[:, None, k] for k in range(4))
    gx, gy, gw, gh = (g[None, :, k] for k in range(4))
    iw = np.minimum(dx + dw, gx + gw) - np.maximum(dx, gx)
    ih = np.minimum(dy + dh, gy + gh) - np.maximum(dy, gy)
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area = (d[:, 2] * d[:, 3])[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(area > 0, inter / np.where(area > 0, area, 1), 0.0)
    return out


def filter_crowd_proposals(roidb: Roidb, crowd_thresh: float) -> Roidb:
    """Mark proposals lying mostly inside a crowd region (overlap ``> crowd_thresh``) with
    ``gt_overlaps = -1`` so training neither uses them as fg nor as bg."""
    for entry in roidb:
        overlaps = entry["gt_overlaps"]
        if overlaps.size == 0:
            continue
        crowd_inds = np.where(overlaps.max(axis=1) == -1)[0]
        non_gt_inds = np.where(entry["gt_classes"] == 0)[0]
        if len(crowd_inds) == 0 or len(non_gt_inds) == 0:
            continue
        crowd = xyxy_to_xywh(entry["boxes"][crowd_inds, :].astype(np.float64))
        non_gt = xyxy_to_xywh(entry["boxes"][non_gt_inds, :].astype(np.float64))
        ious = crowd_iou(non_gt, crowd)
        bad = np.where(ious.max(axis=1) > crowd_thresh)[0]
        overlaps = overlaps.copy()
        overlaps[non_gt_inds[bad], :] = -1
        entry["gt_overlaps"] = overlaps
    return roidb


class _CocoJson:
    """The parts of pycocotools' ``COCO`` index that the imdb needs, from the JSON alone."""

    def __init__(self, path: str) -> None:
        try:
            with open(path, "r") as f:
                data = json.load(f)
        except OSError as e:
            raise DataError(f"cannot read COCO annotations: {e}", where=path) from None
        except ValueError as e:
            raise DataError(f"COCO annotation file is not valid JSON: {e}", where=path) from None
        if not isinstance(data, dict) or "images" not in data:
            raise DataError("not a COCO annotation file (no 'images' list)", where=path)
        self.cats = {c["id"]: c for c in data.get("categories", [])}
        self.imgs = {im["id"]: im for im in data["images"]}
        self.img_to_anns: Dict[Any, List[Dict[str, Any]]] = {i: [] for i in self.imgs}
        for a in data.get("annotations", []):
            self.img_to_anns.setdefault(a["image_id"], []).append(a)

    def getCatIds(self) -> List[Any]:  # noqa: N802 - pycocotools' names
        return list(self.cats)

    def loadCats(self, ids: Sequence[Any]) -> List[Dict[str, Any]]:  # noqa: N802
        return [self.cats[i] for i in ids]

    def getImgIds(self) -> List[Any]:  # noqa: N802
        return list(self.imgs)

    def loadImgs(self, ids: Any) -> List[Dict[str, Any]]:  # noqa: N802
        ids = ids if isinstance(ids, (list, tuple)) else [ids]
        return [self.imgs[i] for i in ids]

    def anns_of(self, img_id: Any) -> List[Dict[str, Any]]:
        return list(self.img_to_anns.get(img_id, []))


class coco(imdb):  # noqa: N801 - py-faster-rcnn's name
    """One COCO image set (``train``/``val``/``minival``/``valminusminival``/``test``/``test-dev``)."""

    def __init__(self, image_set: str, year: str, data_path: Optional[str] = None) -> None:
        super().__init__(f"coco_{year}_{image_set}")
        self.config = {"top_k": 2000, "use_salt": True, "cleanup": True,
                       "crowd_thresh": 0.7, "min_size": 2, "rpn_file": None}
        self._year = str(year)
        self._image_set = image_set
        self._data_path = osp.abspath(data_path if data_path is not None
                                      else osp.join(cfg.DATA_DIR, "coco"))
        ann_file = self._get_ann_file()
        if not osp.exists(ann_file):
            raise DataError("COCO annotation file not found (expected under DATA_DIR/coco/annotations)",
                            where=ann_file)
        self._COCO = self._load_api(ann_file)
        cat_ids = self._COCO.getCatIds()
        cats = self._COCO.loadCats(cat_ids)
        self._classes = tuple(["__background__"] + [c["name"] for c in cats])
        self._class_to_ind = {c: i for i, c in enumerate(self._classes)}
        self._class_to_coco_cat_id = dict(zip([c["name"] for c in cats], cat_ids))
        self._image_index = list(self._COCO.getImgIds())
        self._roidb_handler = self.gt_roidb
        self.competition_mode(False)
        # "views": minival2014 is a 5k subset of val2014, valminusminival2014 the rest
        view_map = {"minival2014": "val2014", "valminusminival2014": "val2014"}
        coco_name = image_set + self._year
        self._data_name = view_map.get(coco_name, coco_name)
        self._gt_splits = ("train", "val", "minival")

    @staticmethod
    def _load_api(ann_file: str) -> Any:
        try:
            from pycocotools.coco import COCO
        except ImportError:
            return _CocoJson(ann_file)
        return COCO(ann_file)

    def _get_ann_file(self) -> str:
        prefix = "instances" if "test" not in self._image_set else "image_info"
        return osp.join(self._data_path, "annotations", f"{prefix}_{self._image_set}{self._year}.json")

    def _has_gt(self) -> bool:
        return self._image_set in self._gt_splits

    def _get_widths(self) -> List[int]:
        return [int(a["width"]) for a in self._COCO.loadImgs(list(self._image_index))]

    def image_path_at(self, i: int) -> str:
        return self.image_path_from_index(self._image_index[i])

    def image_path_from_index(self, index: Any) -> str:
        """``images/<data name>/COCO_<data name>_<id, 12 digits>.jpg``."""
        file_name = "COCO_" + self._data_name + "_" + str(index).zfill(12) + ".jpg"
        path = osp.join(self._data_path, "images", self._data_name, file_name)
        if not osp.exists(path):
            raise DataError(f"image {index} not found", where=path)
        return path

    def _anns(self, index: Any) -> List[Dict[str, Any]]:
        if isinstance(self._COCO, _CocoJson):
            return self._COCO.anns_of(index)
        return self._COCO.loadAnns(self._COCO.getAnnIds(imgIds=index, iscrowd=None))

    def gt_roidb(self) -> Roidb:
        """Ground truth of every image (cached as ``.npz`` with a fingerprint of the JSON)."""
        if not self._has_gt():
            raise DataError(f"{self.name} has no ground truth (test splits are unannotated)")
        cache_file = osp.join(self.cache_path, self.name + "_gt_roidb.npz")
        st = os.stat(self._get_ann_file())
        meta = {"version": _CACHE_VERSION, "ann_file": self._get_ann_file(),
                "fingerprint": hashlib.sha1(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest(),
                "num_images": self.num_images}
        if osp.exists(cache_file):
            try:
                roidb, cached = load_roidb(cache_file)
                if cached == meta and len(roidb) == self.num_images:
                    return roidb
            except DataError:
                pass
        roidb = [self._load_coco_annotation(index) for index in self._image_index]
        try:
            save_roidb(cache_file, roidb, meta)
        except OSError as e:
            log.warning("could not write the gt roidb cache %s: %s", cache_file, e)
        return roidb

    def _load_coco_annotation(self, index: Any) -> RoidbEntry:
        im_ann = self._COCO.loadImgs(index)[0]
        width, height = int(im_ann["width"]), int(im_ann["height"])
        objs = []
        for obj in self._anns(index):
            x, y, w, h = (float(v) for v in obj["bbox"])
            x1 = max(0.0, x)
            y1 = max(0.0, y)
            x2 = min(width - 1.0, x1 + max(0.0, w - 1))
            y2 = min(height - 1.0, y1 + max(0.0, h - 1))
            if obj.get("area", w * h) > 0 and x2 >= x1 and y2 >= y1:
                objs.append((obj, [x1, y1, x2, y2]))
        n = len(objs)
        boxes = np.zeros((n, 4), dtype=np.uint16)
        gt_classes = np.zeros((n,), dtype=np.int32)
        overlaps = np.zeros((n, self.num_classes), dtype=np.float32)
        seg_areas = np.zeros((n,), dtype=np.float32)
        cat_to_ind = {self._class_to_coco_cat_id[c]: self._class_to_ind[c] for c in self._classes[1:]}
        for ix, (obj, box) in enumerate(objs):
            if obj["category_id"] not in cat_to_ind:
                raise DataError(f"annotation {obj.get('id')} has unknown category_id {obj['category_id']}",
                                where=self._get_ann_file())
            cls = cat_to_ind[obj["category_id"]]
            boxes[ix, :] = box
            gt_classes[ix] = cls
            seg_areas[ix] = obj.get("area", 0.0)
            if obj.get("iscrowd", 0):
                overlaps[ix, :] = -1.0       # excluded from training
            else:
                overlaps[ix, cls] = 1.0
        validate_boxes(boxes, width=width, height=height, where=f"{self._get_ann_file()} image {index}")
        return {"boxes": boxes, "gt_classes": gt_classes, "gt_overlaps": overlaps,
                "flipped": False, "seg_areas": seg_areas}

    def rpn_roidb(self) -> Roidb:
        """Ground truth (train/val/minival) plus RPN proposals; crowd-covered proposals masked."""
        roidb = super().rpn_roidb()
        if self._has_gt():
            roidb = filter_crowd_proposals(roidb, self.config["crowd_thresh"])
        return roidb

    # --- evaluation
    def _coco_results_one_category(self, boxes: Sequence[Any], cat_id: Any) -> List[Dict[str, Any]]:
        results = []
        for im_ind, index in enumerate(self.image_index):
            dets = boxes[im_ind]
            if dets is None or len(dets) == 0:
                continue
            dets = np.asarray(dets, dtype=np.float64)
            xs, ys = dets[:, 0], dets[:, 1]
            ws = dets[:, 2] - xs + 1
            hs = dets[:, 3] - ys + 1
            scores = dets[:, -1]
            results.extend({"image_id": index, "category_id": cat_id,
                            "bbox": [float(xs[k]), float(ys[k]), float(ws[k]), float(hs[k])],
                            "score": float(scores[k])} for k in range(dets.shape[0]))
        return results

    def _write_coco_results_file(self, all_boxes: Sequence[Sequence[Any]], res_file: str) -> None:
        """COCO's results JSON: ``[{"image_id", "category_id", "bbox": [x, y, w, h], "score"}]``."""
        results: List[Dict[str, Any]] = []
        for cls_ind, cls in enumerate(self.classes):
            if cls == "__background__":
                continue
            results.extend(self._coco_results_one_category(all_boxes[cls_ind],
                                                            self._class_to_coco_cat_id[cls]))
        atomic_write(res_file, json.dumps(results).encode("utf-8"))

    def _do_detection_eval(self, res_file: str, output_dir: str) -> Dict[str, Any]:
        pc = _need_pycocotools("COCO evaluation")
        gt = self._COCO if not isinstance(self._COCO, _CocoJson) else pc.coco.COCO(self._get_ann_file())
        coco_dt = gt.loadRes(res_file)
        ev = pc.cocoeval.COCOeval(gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        # AP over IoU 0.50:0.95, all areas, 100 detections; per class (-1 = no gt).  COCOeval
        # orders its category axis by sorted category id (py-faster-rcnn used class index - 1,
        # the same thing only when the file lists categories sorted by id, as COCO's does)
        precision = ev.eval["precision"][:, :, :, 0, 2]
        cat_axis = {cid: k for k, cid in enumerate(ev.params.catIds)}
        per_class = {}
        for cls in self.classes[1:]:
            p = precision[:, :, cat_axis[self._class_to_coco_cat_id[cls]]]
            per_class[cls] = float(np.mean(p[p > -1])) if (p > -1).any() else float("nan")
        result = {"stats": [float(s) for s in ev.stats], "AP": float(ev.stats[0]), "ap": per_class}
        atomic_write(osp.join(output_dir, "detection_results.json"),
                     json.dumps({"stats": result["stats"],
                                 "ap": {c: (None if np.isnan(a) else a) for c, a in per_class.items()}},
                                indent=1).encode("utf-8"))
        return result

    def evaluate_detections(self, all_boxes: Sequence[Sequence[Any]],
                            output_dir: Optional[str] = None) -> Dict[str, Any]:
        """Write the results JSON and, for annotated sets, run COCO's evaluation (pycocotools).

        Returns ``{"results_file": path}`` plus, where evaluated, ``"stats"`` (COCOeval's 12
        summary numbers), ``"AP"`` (AP@[.5:.95]) and ``"ap"`` (per class).
        """
        output_dir = output_dir or os.getcwd()
        os.makedirs(output_dir, exist_ok=True)
        if "test" not in self._image_set:
            _need_pycocotools("COCO evaluation")   # fail before writing anything
        res_file = osp.join(output_dir, f"detections_{self._image_set}{self._year}_results")
        if self.config["use_salt"]:
            res_file += "_" + str(uuid.uuid4())
        res_file += ".json"
        self._write_coco_results_file(all_boxes, res_file)
        out: Dict[str, Any] = {"results_file": res_file}
        try:
            if "test" not in self._image_set:
                out.update(self._do_detection_eval(res_file, output_dir))
        finally:
            if self.config["cleanup"]:
                os.remove(res_file)
                out["results_file"] = None
        return out

    def competition_mode(self, on: bool) -> None:
        self.config["use_salt"] = not on
        self.config["cleanup"] = not on
