"""py-faster-rcnn's ``tools/demo.py`` as a library: detect, draw and record images of one's own.

``caffe-compat detect`` is a thin wrapper over :func:`detect_images`; scripts can call it
directly.  For each image: ``im_detect`` with the net's RPN (the caller forces
``TEST.HAS_RPN``, as the demo does), per-class NMS at ``nms_thresh`` over all proposals,
then detections scoring ``>= thresh`` are kept, best score first.  Boxes are 0-based
inclusive pixel corners in the original image.  The JSON document written next to the
drawn images is::

    {"classes": [...], "thresh": t, "nms": n, "model": ..., "weights": ...,
     "images": [{"image": path, "output": path, "width": w, "height": h,
                 "num_proposals": R, "time_s": s,
                 "detections": [{"class": name, "class_index": k, "score": s,
                                 "box": [x1, y1, x2, y2]}, ...]}, ...]}
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

__all__ = ["parse_classes", "detect_image", "detect_images", "write_detections_json"]

#: suffixes an output image keeps; anything else is written as PNG
WRITABLE = (".png", ".jpg", ".jpeg")

ImageRecord = Dict[str, Any]


def parse_classes(spec: Optional[str]) -> Tuple[str, ...]:
    """Class names from a spec: ``VOC`` (default), comma-separated names, or a file with one
    name per line.  ``__background__`` is prepended unless already first."""
    from caffe_compat.errors import SchemaError
    from caffe_compat.frcnn.datasets.pascal_voc import VOC_CLASSES

    if spec is None or spec.strip().upper() == "VOC":
        return tuple(VOC_CLASSES)
    if os.path.isfile(spec):
        with open(spec, "r", encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SchemaError(f"--classes {spec[:200]!r} names no classes")
    if names[0] != "__background__":
        names = ["__background__"] + names
    return tuple(names)


def detect_image(net: Any, im, classes: Sequence[str], thresh: float, nms_thresh: float
                 ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, int, Any]], int]:
    """Detections of one image: ``(json-ready list, per-class arrays for drawing, #proposals)``."""
    import torch

    from caffe_compat.boxes import nms
    from caffe_compat.errors import ShapeError
    from caffe_compat.frcnn.test import im_detect

    return _detections(*im_detect(net, im), classes, thresh, nms_thresh)


def _detections(scores, boxes, classes: Sequence[str], thresh: float, nms_thresh: float
                ) -> Tuple[List[Dict[str, Any]], List[Tuple[str, int, Any]], int]:
    """:func:`detect_image`'s result from im_detect's ``(scores, boxes)``."""
    import torch

    from caffe_compat.boxes import nms
    from caffe_compat.errors import ShapeError

    if scores.shape[1] != len(classes):
        raise ShapeError(f"the net scores {scores.shape[1]} classes but --classes names {len(classes)} "
                         f"(background included): {', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''}")
    found: List[Dict[str, Any]] = []
    per_class: List[Tuple[str, int, Any]] = []
    for j in range(1, len(classes)):
        cls_scores = scores[:, j].to(torch.float32)
        cls_boxes = boxes[:, 4 * j:4 * (j + 1)].to(torch.float32)
        keep = nms(cls_boxes, cls_scores, float(nms_thresh))
        dets = torch.cat([cls_boxes[keep], cls_scores[keep, None]], dim=1).cpu().numpy()
        dets = dets[dets[:, 4] >= thresh]
        if len(dets) == 0:
            continue
        per_class.append((classes[j], j, dets))
        for d in dets:
            found.append({"class": classes[j], "class_index": j, "score": float(d[4]),
                          "box": [float(v) for v in d[:4]]})
    found.sort(key=lambda r: -r["score"])
    return found, per_class, int(scores.shape[0])


def output_name(path: str, used: set) -> str:
    """A file name in the output folder for ``path``, unique among ``used`` (which it extends)."""
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext.lower() if ext.lower() in WRITABLE else ".png"
    name, k = stem + ext, 1
    while name in used:
        name = f"{stem}_{k}{ext}"
        k += 1
    used.add(name)
    return name


def detect_images(net: Any, images: Sequence[str], out_dir: str, classes: Sequence[str], *,
                  thresh: float = 0.8, nms_thresh: float = 0.3,
                  sync: Optional[Callable[[], None]] = None, batch: int = 1,
                  precision: str = "fp32") -> Iterator[ImageRecord]:
    """Detect, draw into ``out_dir`` and yield one record per image, as each finishes
    (so a caller can show progress).  ``sync`` waits for the device before timing.
    ``batch``: up to that many consecutive images of one resized shape per forward (the
    same detections as batch 1); ``precision``: :mod:`caffe_compat.precision`'s modes."""
    from caffe_compat.atomic import check_output, refuse_overwriting_inputs
    from caffe_compat.errors import DataError
    from caffe_compat.frcnn.test import Timer, read_image
    from caffe_compat.frcnn.vis import draw_detections, write_image

    used: set = set()
    out_paths = [os.path.join(out_dir, output_name(path, used)) for path in images]
    for out_path in out_paths:  # before any work: a drawn image must never replace an input
        refuse_overwriting_inputs(out_path, [("image", p) for p in images], "the drawn image")
        check_output(out_path, "the drawn image")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the output folder: {e}", where=out_dir) from None
    from caffe_compat.frcnn.test import im_detect_batch
    from caffe_compat.precision import inference_precision

    step = max(1, int(batch))
    with inference_precision(net, precision):
        for first in range(0, len(images), step):
            paths = images[first:first + step]
            ims = [read_image(p) for p in paths]
            timer = Timer(sync)
            timer.tic()
            if step == 1:
                results = [detect_image(net, ims[0], classes, thresh, nms_thresh)]
            else:   # same-shape images share a forward; time_s is the chunk's time per image
                results = [_detections(sc, bx, classes, thresh, nms_thresh)
                           for sc, bx in im_detect_batch(net, ims, step)]
            timer.toc()
            for path, out_path, im, (found, per_class, num_props) in zip(
                    paths, out_paths[first:first + step], ims, results):
                drawn = draw_detections(im, per_class, thresh=thresh)
                write_image(out_path, drawn)
                yield {"image": os.path.abspath(path), "output": os.path.abspath(out_path),
                       "width": int(im.shape[1]), "height": int(im.shape[0]),
                       "num_proposals": num_props, "time_s": timer.diff / len(paths),
                       "detections": found}


def write_detections_json(out_dir: str, records: Sequence[ImageRecord], *, model: str, weights: str,
                          classes: Sequence[str], thresh: float, nms_thresh: float) -> str:
    """Write ``out_dir/detections.json`` atomically; returns its path."""
    from caffe_compat.atomic import atomic_write

    doc = {"model": os.path.abspath(model), "weights": os.path.abspath(weights), "classes": list(classes),
           "thresh": thresh, "nms": nms_thresh, "images": list(records)}
    json_path = os.path.join(out_dir, "detections.json")
    atomic_write(json_path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
    return json_path
