"""PASCAL VOC as an imdb: ``DATA_DIR/VOCdevkit<year>/VOC<year>/{Annotations,ImageSets/Main,JPEGImages}``.

Ground truth comes from the XML annotations (standard library parser).  As in
py-faster-rcnn, coordinates are made 0-based by subtracting 1 (VOC is 1-based) and stored
as ``uint16``; difficult objects are left out of training unless ``config['use_diff']``
(their flag is kept in the roidb's ``difficult`` array); evaluation writes VOC "comp4"
result files and scores them with :mod:`.voc_eval`, using the 11-point metric for years
before 2010.

The ground-truth roidb is cached in ``DATA_DIR/cache/<name>_gt_roidb.npz`` together with
a fingerprint of the annotation files, so an edited or regenerated data set is re-read
(the original's pickle cache was keyed by name only and went stale silently).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from caffe_compat.atomic import atomic_write
from caffe_compat.errors import DataError
from caffe_compat.frcnn.config import cfg
from caffe_compat.frcnn.datasets import voc_eval as _voc
from caffe_compat.frcnn.datasets.imdb import Roidb, RoidbEntry, imdb, load_roidb, save_roidb

__all__ = ["pascal_voc", "VOC_CLASSES"]

log = logging.getLogger(__name__)

#: index 0 is the background; the order is the one every VOC-trained model was trained with
VOC_CLASSES = ("__background__",
               "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")

_CACHE_VERSION = 1


class pascal_voc(imdb):  # noqa: N801 - py-faster-rcnn's name
    """One VOC image set (``train``, ``val``, ``trainval``, ``test``) of one year."""

    def __init__(self, image_set: str, year: str, devkit_path: Optional[str] = None) -> None:
        super().__init__(f"voc_{year}_{image_set}", VOC_CLASSES)
        self._year = str(year)
        self._image_set = image_set
        self._devkit_path = os.path.abspath(devkit_path if devkit_path is not None
                                            else self._get_default_path())
        self._data_path = os.path.join(self._devkit_path, "VOC" + self._year)
        self._class_to_ind = {c: i for i, c in enumerate(self.classes)}
        self._image_ext = ".jpg"
        self._salt = str(uuid.uuid4())
        self._comp_id = "comp4"
        self.config = {"cleanup": True, "use_salt": True, "use_diff": False,
                       "matlab_eval": False, "rpn_file": None, "min_size": 2}
        if not os.path.isdir(self._devkit_path):
            raise DataError("VOCdevkit folder not found (set DATA_DIR, e.g. `--set DATA_DIR PATH`, "
                            "or make a synthetic one with `caffe-compat synthetic-voc PATH`)",
                            where=self._devkit_path)
        if not os.path.isdir(self._data_path):
            raise DataError(f"VOC{self._year} folder not found inside the devkit", where=self._data_path)
        self._image_index = self._load_image_set_index()
        self._roidb_handler = self.gt_roidb

    # --- paths
    def _get_default_path(self) -> str:
        return os.path.join(cfg.DATA_DIR, "VOCdevkit" + self._year)

    def image_path_at(self, i: int) -> str:
        return self.image_path_from_index(self._image_index[i])

    def image_path_from_index(self, index: str) -> str:
        path = os.path.join(self._data_path, "JPEGImages", index + self._image_ext)
        if not os.path.exists(path):
            raise DataError(f"image of '{index}' not found", where=path)
        return path

    def _annotation_path(self, index: str) -> str:
        return os.path.join(self._data_path, "Annotations", index + ".xml")

    def _image_set_file(self) -> str:
        return os.path.join(self._data_path, "ImageSets", "Main", self._image_set + ".txt")

    def _load_image_set_index(self) -> List[str]:
        path = self._image_set_file()
        if not os.path.exists(path):
            raise DataError(f"image set '{self._image_set}' not found", where=path)
        with open(path) as f:
            # the first token of each line: per-class set files ('000005 -1') work too
            return [line.split()[0] for line in f if line.strip()]

    def _has_gt(self) -> bool:
        return int(self._year) == 2007 or self._image_set != "test"

    # --- ground truth
    def _fingerprint(self) -> str:
        """Hash of the annotation files' sizes and times and of the image list."""
        h = hashlib.sha1()
        for index in self._image_index:
            h.update(index.encode("utf-8"))
            try:
                st = os.stat(self._annotation_path(index))
                h.update(f":{st.st_size}:{st.st_mtime_ns};".encode())
            except OSError:
                h.update(b":missing;")
        return h.hexdigest()

    def gt_roidb(self) -> Roidb:
        """One entry per image of the set, from the XML files (cached, see the module doc)."""
        cache_file = os.path.join(self.cache_path, self.name + "_gt_roidb.npz")
        meta = {"version": _CACHE_VERSION, "data_path": self._data_path,
                "use_diff": bool(self.config["use_diff"]), "classes": list(self.classes),
                "fingerprint": self._fingerprint(), "num_images": self.num_images}
        if os.path.exists(cache_file):
            try:
                roidb, cached_meta = load_roidb(cache_file)
                if cached_meta == meta and len(roidb) == self.num_images:
                    log.info("%s gt roidb loaded from %s", self.name, cache_file)
                    return roidb
            except DataError:
                pass  # unreadable cache: rebuild it
        roidb = [self._load_pascal_annotation(index) for index in self.image_index]
        try:
            save_roidb(cache_file, roidb, meta)
            log.info("wrote gt roidb to %s", cache_file)
        except OSError as e:  # a read-only DATA_DIR must not stop training
            log.warning("could not write the gt roidb cache %s: %s", cache_file, e)
        return roidb

    def _load_pascal_annotation(self, index: str) -> RoidbEntry:
        """Boxes (0-based, uint16), classes, one-hot overlaps, areas, difficult flags."""
        filename = self._annotation_path(index)
        try:
            tree = ET.parse(filename)
        except (OSError, ET.ParseError) as e:
            raise DataError(f"cannot read VOC annotation: {e}", where=filename) from None
        objs = tree.findall("object")

        def difficult(o: ET.Element) -> int:
            d = o.find("difficult")
            return int(float(d.text)) if d is not None and d.text and d.text.strip() else 0

        if not self.config["use_diff"]:
            objs = [o for o in objs if difficult(o) == 0]
        n = len(objs)
        boxes = np.zeros((n, 4), dtype=np.uint16)
        gt_classes = np.zeros((n,), dtype=np.int32)
        overlaps = np.zeros((n, self.num_classes), dtype=np.float32)
        seg_areas = np.zeros((n,), dtype=np.float32)
        diff = np.zeros((n,), dtype=bool)
        for ix, obj in enumerate(objs):
            bbox = obj.find("bndbox")
            name_node = obj.find("name")
            if bbox is None or name_node is None or not name_node.text:
                raise DataError("an <object> needs <name> and <bndbox>", where=filename)
            try:
                x1, y1, x2, y2 = (float(bbox.find(t).text) - 1  # type: ignore[union-attr]
                                  for t in ("xmin", "ymin", "xmax", "ymax"))
            except (AttributeError, TypeError, ValueError):
                raise DataError("bad or missing xmin/ymin/xmax/ymax in a <bndbox>", where=filename) from None
            if min(x1, y1) < 0 or max(x2, y2) > 65535 or x2 < x1 or y2 < y1:
                raise DataError(f"box ({x1 + 1:g}, {y1 + 1:g}, {x2 + 1:g}, {y2 + 1:g}) is invalid: VOC "
                                "boxes are 1-based with xmin <= xmax, ymin <= ymax", where=filename)
            cname = name_node.text.lower().strip()
            if cname not in self._class_to_ind:
                raise DataError(f"unknown class '{cname}'; VOC classes: {', '.join(self.classes[1:])}",
                                where=filename)
            cls = self._class_to_ind[cname]
            boxes[ix, :] = [x1, y1, x2, y2]
            gt_classes[ix] = cls
            overlaps[ix, cls] = 1.0
            seg_areas[ix] = (x2 - x1 + 1) * (y2 - y1 + 1)
            diff[ix] = difficult(obj) != 0
        return {"boxes": boxes, "gt_classes": gt_classes, "gt_overlaps": overlaps,
                "flipped": False, "seg_areas": seg_areas, "difficult": diff}

    def selective_search_roidb(self) -> Roidb:
        """Not available: selective-search proposals came as MATLAB files (use gt or rpn)."""
        raise DataError(f"{self.name}: selective-search proposals (.mat files) are not supported; "
                        "set TRAIN.PROPOSAL_METHOD to 'gt' (Faster R-CNN end2end / RPN training) or "
                        "'rpn' with imdb.config['rpn_file'] from `caffe-compat rpn-generate`")

    # --- evaluation
    def _get_comp_id(self) -> str:
        return self._comp_id + "_" + self._salt if self.config["use_salt"] else self._comp_id

    def _get_voc_results_file_template(self) -> str:
        """``VOCdevkit/results/VOC<year>/Main/<comp_id>_det_<set>_{:s}.txt`` (format with the class)."""
        filename = self._get_comp_id() + "_det_" + self._image_set + "_{:s}.txt"
        return os.path.join(self._devkit_path, "results", "VOC" + self._year, "Main", filename)

    def _write_voc_results_file(self, all_boxes: Sequence[Sequence[Any]]) -> None:
        """One file per class: ``image_id score x1 y1 x2 y2`` with 1-based boxes, VOC's format."""
        template = self._get_voc_results_file_template()
        os.makedirs(os.path.dirname(template), exist_ok=True)
        for cls_ind, cls in enumerate(self.classes):
            if cls == "__background__":
                continue
            lines: List[str] = []
            for im_ind, index in enumerate(self.image_index):
                dets = all_boxes[cls_ind][im_ind]
                if dets is None or len(dets) == 0:
                    continue
                dets = np.asarray(dets)
                for k in range(dets.shape[0]):
                    lines.append("{:s} {:.3f} {:.1f} {:.1f} {:.1f} {:.1f}\n".format(
                        index, dets[k, -1], dets[k, 0] + 1, dets[k, 1] + 1,
                        dets[k, 2] + 1, dets[k, 3] + 1))
            atomic_write(template.format(cls), "".join(lines).encode("utf-8"))

    def _check_all_boxes(self, all_boxes: Sequence[Sequence[Any]]) -> None:
        if len(all_boxes) != self.num_classes:
            raise DataError(f"all_boxes has {len(all_boxes)} classes, {self.name} has {self.num_classes}")
        for c, per_image in enumerate(all_boxes):
            if len(per_image) != self.num_images:
                raise DataError(f"all_boxes[{c}] has {len(per_image)} images, {self.name} has "
                                f"{self.num_images}")

    def _do_python_eval(self, output_dir: Optional[str] = None) -> Dict[str, Any]:
        annopath = os.path.join(self._data_path, "Annotations", "{:s}.xml")
        cachefile = os.path.join(self._devkit_path, "annotations_cache",
                                 f"annots_{self._year}_{self._image_set}.json")
        index = self._load_image_set_index()
        recs = _voc.load_annotations(annopath, index, cachefile)
        use_07_metric = int(self._year) < 2010   # the VOC metric changed in 2010
        aps: Dict[str, float] = {}
        if output_dir:
            os.makedirs(output_dir, exist_ok=True)
        for cls in self.classes:
            if cls == "__background__":
                continue
            rec, prec, ap = _voc.voc_eval(self._get_voc_results_file_template().format(cls), recs,
                                          cls, ovthresh=0.5, use_07_metric=use_07_metric)
            aps[cls] = ap
            log.info("AP for %s = %.4f", cls, ap)
            if output_dir:
                buf = io.BytesIO()
                np.savez(buf, rec=rec, prec=prec, ap=np.float64(ap))
                atomic_write(os.path.join(output_dir, cls + "_pr.npz"), buf.getvalue())
        result = {"ap": aps, "mAP": _voc.mean_ap(aps.values()), "use_07_metric": use_07_metric}
        if output_dir:
            as_json = dict(result, ap={c: (None if np.isnan(a) else a) for c, a in aps.items()})
            if np.isnan(result["mAP"]):
                as_json["mAP"] = None
            atomic_write(os.path.join(output_dir, "voc_eval.json"),
                         json.dumps(as_json, indent=1).encode("utf-8"))
        return result

    def evaluate_detections(self, all_boxes: Sequence[Sequence[Any]],
                            output_dir: Optional[str] = None) -> Dict[str, Any]:
        """Write comp4 result files, score them: ``{"ap": {class: AP}, "mAP": m, "use_07_metric": b}``.

        ``all_boxes[class][image]`` is an empty list or an ``(K, 5)`` array
        ``x1 y1 x2 y2 score`` in 0-based image coordinates.  Classes without any
        non-difficult object in the set get AP ``nan`` and are left out of the mAP.
        Per-class precision/recall go to ``output_dir/<class>_pr.npz``.
        """
        if self.config.get("matlab_eval"):
            raise DataError("config['matlab_eval']: the official MATLAB evaluation is not supported; "
                            "the Python evaluation is the one py-faster-rcnn printed")
        self._check_all_boxes(all_boxes)
        self._write_voc_results_file(all_boxes)
        try:
            result = self._do_python_eval(output_dir)
        finally:
            if self.config["cleanup"]:
                for cls in self.classes[1:]:
                    try:
                        os.remove(self._get_voc_results_file_template().format(cls))
                    except OSError:
                        pass
        return result

    def competition_mode(self, on: bool) -> None:
        """Competition mode keeps result files and drops the random salt from their names."""
        self.config["use_salt"] = not on
        self.config["cleanup"] = not on
