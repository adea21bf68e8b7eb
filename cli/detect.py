"""``caffe-compat detect``: py-faster-rcnn's ``tools/demo.py`` on images of one's own.

For each image: ``im_detect`` with the net's RPN (``TEST.HAS_RPN`` is forced on, as the
demo does), per class NMS at ``--nms`` over all proposals, then detections scoring
``>= --thresh`` are kept.  Each image is written to ``--out`` with labelled boxes (one
colour per class), and ``--out/detections.json`` lists every kept detection::

    {"classes": [...], "thresh": t, "nms": n, "model": ..., "weights": ...,
     "images": [{"image": path, "output": path, "width": w, "height": h,
                 "num_proposals": R, "time_s": s,
                 "detections": [{"class": name, "class_index": k, "score": s,
                                 "box": [x1, y1, x2, y2]}, ...]}, ...]}

Boxes are 0-based inclusive pixel corners in the original image, best score first.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import click

from caffe_compat.cli.main import friendly, main
from caffe_compat.cli.options import (cfg_options, check_file, config_scope, gpu_option,
                                      python_layers_option)

__all__ = ["parse_classes", "detect_image"]

_WRITABLE = (".png", ".jpg", ".jpeg")


def parse_classes(spec: Optional[str]) -> Tuple[str, ...]:
    """Class names from ``--classes``: ``VOC`` (default), comma-separated names, or a file
    with one name per line.  ``__background__`` is prepended unless already first."""
    from caffe_compat.frcnn.datasets.pascal_voc import VOC_CLASSES
    from caffe_compat.errors import SchemaError

    if spec is None or spec.strip().upper() == "VOC":
        return tuple(VOC_CLASSES)
    if os.path.isfile(spec):
        with open(spec, "r", encoding="utf-8") as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise SchemaError(f"--classes {spec!r} names no classes")
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

    scores, boxes = im_detect(net, im)
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


def _out_name(path: str, used: set) -> str:
    stem, ext = os.path.splitext(os.path.basename(path))
    ext = ext.lower() if ext.lower() in _WRITABLE else ".png"
    name, k = stem + ext, 1
    while name in used:
        name = f"{stem}_{k}{ext}"
        k += 1
    used.add(name)
    return name


@main.command("detect")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--model", "--def", "model", required=True, type=click.Path(dir_okay=False),
              help="Faster R-CNN TEST net with an RPN (inputs data, im_info).")
@click.option("--weights", "--net", "weights", required=True, type=click.Path(dir_okay=False),
              help="Trained weights (.caffemodel, .pt or .safetensors).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder for the drawn images and detections.json.")
@cfg_options(trailing=False)
@click.option("--thresh", type=float, default=0.8, show_default=True, help="Keep detections scoring >= this.")
@click.option("--nms", "nms_thresh", type=float, default=0.3, show_default=True, help="Per-class NMS IoU.")
@click.option("--classes", "classes_spec", default=None,
              help="VOC (default), comma-separated class names, or a file with one per line "
                   "(background first or implied).")
@gpu_option()
@python_layers_option()
@friendly
def detect_command(images, model, weights, out_dir, cfg_file, set_pairs, thresh, nms_thresh, classes_spec,
                   gpu, allow_python_layers):
    """Detect objects in IMAGES and write them, boxes drawn, to --out."""
    import cv2

    from caffe_compat.atomic import atomic_write
    from caffe_compat.device import resolve_device
    from caffe_compat.errors import DataError, GraphError
    from caffe_compat.frcnn.test import Timer, read_image
    from caffe_compat.frcnn.vis import draw_detections
    from caffe_compat.net import Net

    check_file(model, "net definition", "--model")
    check_file(weights, "weights file", "--weights")
    for p in images:                       # fail before the (slow) net build
        if not os.path.isfile(p):
            raise DataError("image file not found", where=p)
    classes = parse_classes(classes_spec)
    with config_scope(cfg_file, set_pairs, (), gpu) as cfg:
        cfg.TEST.HAS_RPN = True            # the demo's proposals come from the net's RPN
        device = resolve_device(gpu)
        net = Net(model, phase="test", device=device, allow_python_layers=allow_python_layers or None)
        for note in net.load_weights(weights):
            click.echo(f"note: {note}", err=True)
        if "im_info" not in net.input_names:
            raise GraphError("detect needs a Faster R-CNN net with an RPN (inputs data and im_info); "
                             f"this net's inputs are: {', '.join(net.input_names) or 'none'}")
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise DataError(f"cannot create the output folder: {e}", where=out_dir) from None
        sync = (lambda: __import__("torch").cuda.synchronize(device)) if device.type == "cuda" else None
        used: set = set()
        records: List[Dict[str, Any]] = []
        for path in images:
            im = read_image(path)
            timer = Timer(sync)
            timer.tic()
            found, per_class, num_props = detect_image(net, im, classes, thresh, nms_thresh)
            timer.toc()
            drawn = draw_detections(im, per_class, thresh=thresh)
            out_path = os.path.join(out_dir, _out_name(path, used))
            if not cv2.imwrite(out_path, drawn):
                raise DataError("cannot write image", where=out_path)
            records.append({"image": os.path.abspath(path), "output": os.path.abspath(out_path),
                            "width": int(im.shape[1]), "height": int(im.shape[0]),
                            "num_proposals": num_props, "time_s": timer.diff, "detections": found})
            summary = ", ".join(f"{d['class']} {d['score']:.3f}" for d in found[:5])
            more = f", ... ({len(found)} in all)" if len(found) > 5 else ""
            click.echo(f"{path}: {len(found)} detections in {timer.diff:.3f}s for {num_props} "
                       f"proposals{': ' + summary + more if found else ''} -> {out_path}")
        doc = {"model": os.path.abspath(model), "weights": os.path.abspath(weights), "classes": list(classes),
               "thresh": thresh, "nms": nms_thresh, "images": records}
        json_path = os.path.join(out_dir, "detections.json")
        atomic_write(json_path, (json.dumps(doc, indent=1) + "\n").encode("utf-8"))
        click.echo(f"wrote {len(records)} images and {json_path}")
