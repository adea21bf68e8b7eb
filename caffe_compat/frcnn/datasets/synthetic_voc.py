"""A small synthetic PASCAL VOC: rendered shapes in the VOCdevkit layout.

It exists so that py-faster-rcnn's training and testing paths (imdb -> roidb ->
minibatches -> training -> VOC evaluation) can be run end to end without the 2 GB VOC
download, and so that a small detector can actually *learn* something in minutes: each
of the 20 VOC classes is drawn as its own shape (10 shapes) in its own colour (20 hues
around the colour wheel; classes ``i`` and ``i + 10`` share a shape but have opposite
hues), on a desaturated, noisy, low-frequency textured background.

Layout (what :class:`~caffe_compat.frcnn.datasets.pascal_voc.pascal_voc` reads)::

    OUT/VOCdevkit<year>/VOC<year>/JPEGImages/000001.jpg
                                 /Annotations/000001.xml
                                 /ImageSets/Main/{trainval,test,train,val}.txt

so ``--set DATA_DIR OUT`` makes ``voc_2007_trainval``/``voc_2007_test`` this data set.
Class names are VOC's, so 21-class prototxts run unchanged; ``num_classes=K`` only draws
the first K classes (a faster-learning demo) and keeps all 20 names.

Boxes are the tight bounds of each drawn shape, 1-based as VOC writes them; no object
is truncated; a few objects (``difficult_prob``) are drawn faintly and marked
``<difficult>1</difficult>``.  Everything is a function of ``(seed, image number)``:
the same seed gives the same files, and image k does not change when more images are
asked for.
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from caffe_compat.errors import DataError

__all__ = ["write_dataset", "render_image", "CLASS_NAMES", "SHAPES", "class_style"]

#: the 20 VOC classes in VOC order (index 0 here is class 1 of the 21-way classifier)
CLASS_NAMES: Tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor")

SHAPES: Tuple[str, ...] = ("rectangle", "ellipse", "triangle", "cross", "ring",
                           "diamond", "star", "hexagon", "semicircle", "xmark")

Box = Tuple[int, int, int, int]


def class_style(c: int) -> Tuple[str, Tuple[int, int, int]]:
    """Shape name and BGR colour of foreground class ``c`` (0-based over the 20 classes)."""
    import cv2

    hue = int(round(c * 9)) % 180     # OpenCV hues are 0..179: 20 classes, 18 degrees apart
    hsv = np.uint8([[[hue, 230, 235]]])
    b, g, r = (int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
    return SHAPES[c % len(SHAPES)], (b, g, r)


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Grey-ish low-frequency texture plus pixel noise and a few thin grey lines."""
    import cv2

    gh, gw = int(rng.integers(3, 9)), int(rng.integers(3, 9))
    base = rng.uniform(60, 190, size=(gh, gw, 1))
    tint = rng.uniform(-12, 12, size=(gh, gw, 3))       # keeps the background desaturated
    grid = np.clip(base + tint, 0, 255).astype(np.float32)
    img = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    img += rng.normal(0.0, 8.0, size=(h, w, 3)).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 5))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        v = int(rng.integers(40, 220))
        cv2.line(img, p1, p2, (v, v, v), int(rng.integers(1, 3)))
    return img


def _shape_mask(shape: str, h: int, w: int, box: Box) -> np.ndarray:
    """A filled ``uint8`` mask of ``shape`` inscribed in ``box = (x0, y0, bw, bh)``."""
    import cv2

    x0, y0, bw, bh = box
    m = np.zeros((h, w), dtype=np.uint8)

    def pts(unit: Sequence[Tuple[float, float]]) -> np.ndarray:
        return np.array([[int(round(x0 + u * (bw - 1))), int(round(y0 + v * (bh - 1)))]
                         for u, v in unit], dtype=np.int32)

    cx, cy = x0 + (bw - 1) / 2.0, y0 + (bh - 1) / 2.0
    thick = max(2, int(round(0.2 * min(bw, bh))))
    if shape == "rectangle":
        cv2.rectangle(m, (x0, y0), (x0 + bw - 1, y0 + bh - 1), 255, -1)
    elif shape == "ellipse":
        cv2.ellipse(m, (int(round(cx)), int(round(cy))), (max(1, (bw - 1) // 2), max(1, (bh - 1) // 2)),
                    0, 0, 360, 255, -1)
    elif shape == "triangle":
        cv2.fillPoly(m, [pts([(0.5, 0.0), (1.0, 1.0), (0.0, 1.0)])], 255)
    elif shape == "cross":
        cv2.fillPoly(m, [pts([(0.0, 0.35), (1.0, 0.35), (1.0, 0.65), (0.0, 0.65)])], 255)
        cv2.fillPoly(m, [pts([(0.35, 0.0), (0.65, 0.0), (0.65, 1.0), (0.35, 1.0)])], 255)
    elif shape == "ring":
        ax = (max(1, (bw - thick) // 2), max(1, (bh - thick) // 2))
        cv2.ellipse(m, (int(round(cx)), int(round(cy))), ax, 0, 0, 360, 255, thick)
    elif shape == "diamond":
        cv2.fillPoly(m, [pts([(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)])], 255)
    elif shape == "star":
        unit = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.2
            a = -np.pi / 2 + k * np.pi / 5
            unit.append((0.5 + r * np.cos(a), 0.5 + r * np.sin(a)))
        cv2.fillPoly(m, [pts(unit)], 255)
    elif shape == "hexagon":
        cv2.fillPoly(m, [pts([(0.25, 0.0), (0.75, 0.0), (1.0, 0.5), (0.75, 1.0), (0.25, 1.0),
                              (0.0, 0.5)])], 255)
    elif shape == "semicircle":
        cv2.ellipse(m, (int(round(cx)), y0 + bh - 1), (max(1, (bw - 1) // 2), max(1, bh - 1)),
                    0, 180, 360, 255, -1)
    elif shape == "xmark":
        cv2.line(m, (x0, y0), (x0 + bw - 1, y0 + bh - 1), 255, thick)
        cv2.line(m, (x0 + bw - 1, y0), (x0, y0 + bh - 1), 255, thick)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)
    # thick lines spill past the box: keep the shape inside it
    clip = np.zeros_like(m)
    clip[y0:y0 + bh, x0:x0 + bw] = 1
    return m * clip


def _cover(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area: how much one of the two may hide the other."""
    ax2, ay2, bx2, by2 = a[0] + a[2], a[1] + a[3], b[0] + b[2], b[1] + b[3]
    iw = max(0, min(ax2, bx2) - max(a[0], b[0]))
    ih = max(0, min(ay2, by2) - max(a[1], b[1]))
    return iw * ih / float(min(a[2] * a[3], b[2] * b[3]))


def render_image(seed: int, number: int, image_size: Tuple[int, int] = (200, 400),
                 num_classes: int = 20, difficult_prob: float = 0.08,
                 max_objects: int = 4) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    """Image ``number`` of data set ``seed``: a BGR ``uint8`` array and its objects.

    Objects are ``{"name", "class", "difficult", "bbox": [xmin, ymin, xmax, ymax]}`` with
    1-based inclusive VOC coordinates of the tight bounds of the drawn pixels.
    """
    lo, hi = int(image_size[0]), int(image_size[1])
    rng = np.random.default_rng([int(seed), int(number)])
    h, w = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    img = _background(rng, h, w)
    n_obj = int(rng.integers(1, max_objects + 1))
    placed: List[Box] = []
    objects: List[Dict[str, Any]] = []
    side = min(h, w)
    for _ in range(n_obj):
        c = int(rng.integers(0, num_classes))
        shape, colour = class_style(c)
        box = None
        for _try in range(20):
            s = rng.uniform(0.2, 0.55) * side
            ar = float(np.exp(rng.uniform(np.log(0.6), np.log(1.6))))
            bw = int(min(w - 2, max(12, round(s * np.sqrt(ar)))))
            bh = int(min(h - 2, max(12, round(s / np.sqrt(ar)))))
            x0 = int(rng.integers(1, w - bw))
            y0 = int(rng.integers(1, h - bh))
            cand = (x0, y0, bw, bh)
            if all(_cover(cand, p) < 0.15 for p in placed):
                box = cand
                break
        if box is None:
            continue
        mask = _shape_mask(shape, h, w, box)
        ys, xs = np.nonzero(mask)
        if xs.size < 16:
            continue
        difficult = bool(rng.uniform() < difficult_prob)
        jitter = rng.integers(-15, 16, size=3)
        col = np.clip(np.array(colour) + jitter, 0, 255).astype(np.float32)
        alpha = 0.35 if difficult else 1.0
        sel = mask > 0
        img[sel] = np.clip((1 - alpha) * img[sel].astype(np.float32) + alpha * col, 0, 255).astype(np.uint8)
        placed.append(box)
        objects.append({"name": CLASS_NAMES[c], "class": c + 1, "difficult": int(difficult),
                        "bbox": [int(xs.min()) + 1, int(ys.min()) + 1, int(xs.max()) + 1, int(ys.max()) + 1]})
    return img, objects


def _annotation_xml(year: str, index: str, w: int, h: int, objects: List[Dict[str, Any]]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = f"VOC{year}"
    ET.SubElement(root, "filename").text = index + ".jpg"
    src = ET.SubElement(root, "source")
    ET.SubElement(src, "database").text = "caffe-compat synthetic VOC"
    size = ET.SubElement(root, "size")
    ET.SubElement(size, "width").text = str(w)
    ET.SubElement(size, "height").text = str(h)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(root, "segmented").text = "0"
    for o in objects:
        ob = ET.SubElement(root, "object")
        ET.SubElement(ob, "name").text = o["name"]
        ET.SubElement(ob, "pose").text = "Unspecified"
        ET.SubElement(ob, "truncated").text = "0"
        ET.SubElement(ob, "difficult").text = str(o["difficult"])
        bb = ET.SubElement(ob, "bndbox")
        for tag, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox"]):
            ET.SubElement(bb, tag).text = str(v)
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8") + b"\n"


def write_dataset(out_dir: str, num_images: int, seed: int = 0, year: str = "2007",
                  image_size: Tuple[int, int] = (200, 400), num_classes: int = 20,
                  test_fraction: float = 0.25, difficult_prob: float = 0.08,
                  max_objects: int = 4, jpeg_quality: int = 95) -> Dict[str, Any]:
    """Write ``num_images`` rendered images under ``out_dir/VOCdevkit<year>/VOC<year>``.

    ``image_size = (lo, hi)``: each image's height and width are drawn from ``[lo, hi]``.
    ``test_fraction`` of the images, spread evenly, go to ``test``; the rest to
    ``trainval``, split alternately into ``train`` and ``val``.  Returns a summary
    (paths, counts of images/objects/difficult objects per split).
    """
    import cv2

    if num_images < 1:
        raise DataError(f"need at least one image, got {num_images}")
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise DataError(f"num_classes must be in 1..{len(CLASS_NAMES)}, got {num_classes}")
    lo, hi = int(image_size[0]), int(image_size[1])
    if not 32 <= lo <= hi:
        raise DataError(f"image_size must be (lo, hi) with 32 <= lo <= hi, got {tuple(image_size)}")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"test_fraction must be in [0, 1), got {test_fraction}")
    if max_objects < 1:
        raise DataError(f"max_objects must be >= 1, got {max_objects}")
    year = str(year)
    devkit = os.path.join(os.path.abspath(out_dir), "VOCdevkit" + year)
    root = os.path.join(devkit, "VOC" + year)
    dirs = {k: os.path.join(root, *k.split("/")) for k in ("JPEGImages", "Annotations", "ImageSets/Main")}
    try:
        for d in dirs.values():
            os.makedirs(d, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the data set folders: {e}", where=root) from None

    n_test = int(round(num_images * test_fraction))
    splits: Dict[str, List[str]] = {"trainval": [], "test": [], "train": [], "val": []}
    n_objects = 0
    n_difficult = 0
    for k in range(num_images):
        index = f"{k + 1:06d}"
        img, objects = render_image(seed, k, (lo, hi), num_classes, difficult_prob, max_objects)
        h, w = img.shape[:2]
        if not cv2.imwrite(os.path.join(dirs["JPEGImages"], index + ".jpg"), img,
                           [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)]):
            raise DataError("cannot write image", where=os.path.join(dirs["JPEGImages"], index + ".jpg"))
        with open(os.path.join(dirs["Annotations"], index + ".xml"), "wb") as f:
            f.write(_annotation_xml(year, index, w, h, objects))
        n_objects += len(objects)
        n_difficult += sum(o["difficult"] for o in objects)
        # evenly spread test images: k is a test image when floor(k * n_test / N) steps up
        if n_test and (k + 1) * n_test // num_images > k * n_test // num_images:
            splits["test"].append(index)
        else:
            splits["trainval"].append(index)
            splits["train" if len(splits["trainval"]) % 2 == 1 else "val"].append(index)
    for name, ids in splits.items():
        with open(os.path.join(dirs["ImageSets/Main"], name + ".txt"), "w") as f:
            f.write("".join(i + "\n" for i in ids))
    return {"devkit": devkit, "data_dir": os.path.abspath(out_dir), "year": year,
            "num_images": num_images, "num_objects": n_objects, "num_difficult": n_difficult,
            "splits": {k: len(v) for k, v in splits.items()},
            "classes": list(CLASS_NAMES[:num_classes])}
