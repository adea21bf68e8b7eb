"""Labelled detection boxes drawn with OpenCV (py-faster-rcnn used matplotlib windows).

Each class gets its own colour (hues spread by the golden angle, so neighbouring class
indices differ strongly); every box is outlined in its class colour with a filled label
``"<class> <score>"`` above it (inside the image when the box touches the top edge).
Boxes are inclusive pixel corners, as everywhere in py-faster-rcnn.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["class_colours", "class_colour", "draw_detections", "label_text"]

BGR = Tuple[int, int, int]


def class_colour(index: int) -> BGR:
    """BGR colour of class ``index`` (0, the background, is grey)."""
    import cv2

    if index <= 0:
        return (128, 128, 128)
    hue = int((index - 1) * 137.508 / 2.0) % 180      # golden angle on OpenCV's 0..179 hues
    sat = 255 if (index - 1) // 12 % 2 == 0 else 170   # a second ring after 12 classes
    hsv = np.uint8([[[hue, sat, 255]]])
    b, g, r = (int(v) for v in cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0])
    return (b, g, r)


def class_colours(num_classes: int) -> List[BGR]:
    """Colours of classes ``0 .. num_classes - 1``."""
    return [class_colour(i) for i in range(num_classes)]


def label_text(class_name: str, score: float) -> str:
    return f"{class_name} {score:.3f}"


def _text_colour(bg: BGR) -> BGR:
    b, g, r = bg
    return (0, 0, 0) if 0.114 * b + 0.587 * g + 0.299 * r > 140 else (255, 255, 255)


def draw_detections(im: np.ndarray, detections: Iterable[Tuple[str, int, np.ndarray]],
                    thresh: float = 0.0, num_classes: Optional[int] = None,
                    thickness: Optional[int] = None) -> np.ndarray:
    """A copy of BGR image ``im`` with every detection scoring ``>= thresh`` drawn.

    ``detections``: ``(class_name, class_index, dets)`` with ``dets`` an ``(n, 5)`` array of
    ``x1 y1 x2 y2 score``.  Lower scores are drawn first, so the best boxes end on top.
    ``num_classes`` is accepted for symmetry with callers; colours depend on the index only.
    """
    import cv2

    del num_classes
    out = np.ascontiguousarray(np.array(im, dtype=np.uint8, copy=True))
    h, w = out.shape[:2]
    if thickness is None:
        thickness = max(1, int(round(min(h, w) / 250.0)))
    font = cv2.FONT_HERSHEY_SIMPLEX
    font_scale = max(0.35, min(h, w) / 900.0)
    font_thick = max(1, thickness // 2)
    items: List[Tuple[float, str, int, Sequence[float]]] = []
    for name, idx, dets in detections:
        d = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
        for row in d:
            if row[4] >= thresh:
                items.append((float(row[4]), str(name), int(idx), row[:4]))
    items.sort(key=lambda t: t[0])
    for score, name, idx, box in items:
        colour = class_colour(idx)
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        x1, x2 = max(0, min(x1, w - 1)), max(0, min(x2, w - 1))
        y1, y2 = max(0, min(y1, h - 1)), max(0, min(y2, h - 1))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness)
        text = label_text(name, score)
        (tw, th), base = cv2.getTextSize(text, font, font_scale, font_thick)
        ty = y1 - thickness if y1 - th - base - thickness >= 0 else y1 + th + base + thickness
        tx = min(x1, max(0, w - tw - 2))
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw + 2, ty), colour, -1)
        cv2.putText(out, text, (tx + 1, ty - base), font, font_scale, _text_colour(colour),
                    font_thick, cv2.LINE_AA)
    return out


def write_image(path: str, image: np.ndarray, params: Sequence[int] = ()) -> None:
    """Encode ``image`` (BGR) by ``path``'s suffix and write it atomically: a crash leaves the
    previous file, and a target that is one of the command's inputs is refused."""
    import os

    import cv2

    from caffe_compat.atomic import atomic_write
    from caffe_compat.errors import DataError

    ext = os.path.splitext(path)[1] or ".png"
    ok, buf = cv2.imencode(ext, image, list(params))
    if not ok:
        raise DataError(f"cannot encode the image as {ext}", where=path)
    atomic_write(path, buf.tobytes())
