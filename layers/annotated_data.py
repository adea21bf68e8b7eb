"""The SSD fork's ``AnnotatedData`` layer: images and box annotations from an LMDB.

Follows weiliu89/caffe, branch ``ssd``, commit 4817bf8b4200b35ada8ed0dc378dceaf38c539e4:
``src/caffe/layers/annotated_data_layer.cpp``, ``src/caffe/data_transformer.cpp``,
``src/caffe/util/im_transforms.cpp``, ``src/caffe/util/sampler.cpp`` and the box helpers
of ``src/caffe/util/bbox_util.cpp`` (``ProjectBBox``, ``ClipBBox``, ``ScaleBBox``,
``LocateBBox``, ``ExtrapolateBBox``, ``MeetEmitConstraint``, ``BBoxCoverage``).

Records are ``AnnotatedDatum`` messages, read in key order (wrapping) with the LMDB reader
of :class:`caffe_compat.layers.data.Data`.  Per item, in the fork's order:

1. ``distort_param`` (encoded images): random brightness / contrast / saturation / hue /
   channel order (two orders, picked by a coin), then the image is re-encoded as JPEG,
   as the fork does (lossy, on purpose);
2. ``expand_param``: with probability ``prob`` the image is placed at a random spot of a
   canvas ``ratio`` times larger (``ratio ~ U(1, max_expand_ratio)``), filled with
   ``mean_value`` (or the mean file, or 0), boxes moved accordingly; re-encoded as JPEG;
3. ``batch_sampler``: each sampler with ``use_original_image`` draws up to ``max_trials``
   boxes (scale, aspect ratio, position uniform; at most ``max_sample`` kept) that satisfy
   its ``sample_constraint`` against the object boxes; one of all kept boxes, chosen
   uniformly, crops the image (re-encoded as JPEG) and the annotations are projected into
   it (``emit_constraint`` applies);
4. the transform: ``resize_param`` (WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD, with
   ``interp_mode`` chosen uniformly among those given, ``pad_mode``/``pad_value``), the
   crop (``crop_size`` or ``crop_h``/``crop_w``: random at TRAIN, centred at TEST), the
   mirror coin (``mirror``), ``(pixel - mean) * scale``; boxes go through the fork's
   ``UpdateBBoxByResizePolicy``, ``emit_constraint``, projection into the crop (boxes
   left with no area are dropped, as are groups left empty), mirroring and
   ``ExtrapolateBBox``.

Tops: ``data`` (batch, C, H, W), its item shape from the first record of the batch (as
``InferBlobShape``); ``label`` (1, 1, num_boxes, 8) rows ``[item_id, group_label,
instance_id, xmin, ymin, xmax, ymax, difficult]``, or one row of -1 when the batch has no
box.  Without an annotation type (neither the record's ``type`` nor ``anno_type`` set) the
label top holds each record's ``datum.label`` (batch, 1, 1, 1), as the fork does.

Random draws use a torch generator seeded from the net's: equal in law to Caffe's, not the
same stream (the fork's ``RandomOrderChannels`` uses ``std::random_shuffle``; any of the six
orders here).  Differences from the fork, all deliberate:

* a raw (not encoded) uint8 datum goes through the same resize as an encoded one (the fork
  skips the resize for raw datums, then aborts on its size check);
* distortion and expansion of raw datums are errors (the fork skips the distortion with a
  log line and pads expansions with the byte 32), as is sampling float-data datums (the
  fork crops their empty byte string); raw uint8 datums are sampled (cropped, not
  re-encoded) as in the fork;
* ``noise_param`` is not implemented: refused at build;
* ``mean_file`` combined with a crop, or with an expansion of another size, is refused
  (the fork reads past its mean blob there);
* a record without ``type`` is accepted when ``anno_type`` is given (the fork CHECKs the
  record's own field before looking at ``anno_type``).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import DataError, SchemaError
from caffe_compat.layers.data import Data, _DataBase, _child_generator
from caffe_compat.layers.registry import register
from caffe_compat.layers.ssd_boxes import jaccard_overlap
from caffe_compat.protos import caffe_pb2
from caffe_compat.transform import DataTransformer

__all__ = ["AnnotatedData", "update_bbox_by_resize_policy", "project_bbox", "infer_new_size"]

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
_R = caffe_pb2.ResizeParameter
_AD = caffe_pb2.AnnotatedDatum
_EC = caffe_pb2.EmitConstraint
TRAIN = "TRAIN"

#: fields of the union schema that belong to other forks' versions of these messages
_FOREIGN_TRANSFORM = ("scale_factors", "crop_width", "crop_height", "enable_classf_aug",
                      "min_scaling_factor", "max_scaling_factor", "max_rotation_angle",
                      "contrast_brightness_adjustment", "smooth_filtering", "min_contrast",
                      "max_contrast", "max_brightness_shift", "max_smooth", "max_color_shift",
                      "min_side_min", "min_side_max", "min_side", "apply_probability",
                      "debug_params", "cvt_bgr2rgb")
_FOREIGN_ANNO = ("yolo_data_type", "yolo_data_jitter", "train_diffcult", "single_class",
                 "seg_scales", "seg_resize_width", "seg_resize_height", "difficult_label_warmup")


# ============================================================================ boxes (float32)
Box = List[F32]  # [xmin, ymin, xmax, ymax]


def _size(b: Box) -> F32:
    if b[2] < b[0] or b[3] < b[1]:
        return F32(0)
    return F32(F32(b[2] - b[0]) * F32(b[3] - b[1]))


def _clip(b: Box) -> Box:
    return [max(min(F32(v), F32(1)), F32(0)) for v in b]


def project_bbox(src: Box, b: Box) -> Optional[Box]:
    """The fork's ``ProjectBBox``: ``b`` in the coordinates of ``src``, clipped to [0, 1];
    None when they do not overlap or nothing of ``b`` is left."""
    if b[0] >= src[2] or b[2] <= src[0] or b[1] >= src[3] or b[3] <= src[1]:
        return None
    sw, sh = F32(src[2] - src[0]), F32(src[3] - src[1])
    p = _clip([F32(F32(b[0] - src[0]) / sw), F32(F32(b[1] - src[1]) / sh),
               F32(F32(b[2] - src[0]) / sw), F32(F32(b[3] - src[1]) / sh)])
    return p if _size(p) > 0 else None


def _coverage(a: Box, b: Box) -> F32:
    """``BBoxCoverage(a, b)``: the part of ``a`` inside ``b``."""
    if b[0] > a[2] or b[2] < a[0] or b[1] > a[3] or b[3] < a[1]:
        return F32(0)
    inter = _size([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    return F32(inter / _size(a)) if inter > 0 else F32(0)


def _meet_emit_constraint(src: Box, b: Box, ec) -> bool:
    if ec.emit_type == _EC.CENTER:
        xc = F32(F32(b[0] + b[2]) / F32(2))
        yc = F32(F32(b[1] + b[3]) / F32(2))
        return bool(src[0] <= xc <= src[2] and src[1] <= yc <= src[3])
    if ec.emit_type == _EC.MIN_OVERLAP:
        return bool(_coverage(b, src) > F32(ec.emit_overlap))
    raise DataError(f"unknown emit_constraint.emit_type {ec.emit_type}")


def update_bbox_by_resize_policy(rp, old_width: int, old_height: int, b: Box) -> Box:
    """The fork's ``UpdateBBoxByResizePolicy``: a normalized box of an ``old`` image after
    ``resize_param``'s resize (WARP clamps; the FIT modes account for padding / scale)."""
    nh, nw = F32(rp.height), F32(rp.width)
    orig_aspect = F32(F32(old_width) / F32(old_height))
    new_aspect = F32(nw / nh)
    ow, oh = F32(old_width), F32(old_height)
    x0, y0, x1, y1 = F32(b[0] * ow), F32(b[1] * oh), F32(b[2] * ow), F32(b[3] * oh)
    mode = rp.resize_mode
    if mode == _R.WARP or mode == _R.FIT_SMALL_SIZE:
        if mode == _R.FIT_SMALL_SIZE:
            if orig_aspect < new_aspect:
                nh = F32(nw / orig_aspect)
            else:
                nw = F32(orig_aspect * nh)
        x0 = max(F32(0), F32(F32(x0 * nw) / ow))
        x1 = min(nw, F32(F32(x1 * nw) / ow))
        y0 = max(F32(0), F32(F32(y0 * nh) / oh))
        y1 = min(nh, F32(F32(y1 * nh) / oh))
    elif mode == _R.FIT_LARGE_SIZE_AND_PAD:
        if orig_aspect > new_aspect:
            pad = F32(F32(nh - F32(nw / orig_aspect)) / F32(2))
            x0 = max(F32(0), F32(F32(x0 * nw) / ow))
            x1 = min(nw, F32(F32(x1 * nw) / ow))
            y0 = F32(pad + max(F32(0), F32(F32(y0 * F32(nh - F32(2) * pad)) / oh)))
            y1 = F32(pad + min(nh, F32(F32(y1 * F32(nh - F32(2) * pad)) / oh)))
        else:
            pad = F32(F32(nw - F32(orig_aspect * nh)) / F32(2))
            x0 = F32(pad + max(F32(0), F32(F32(x0 * F32(nw - F32(2) * pad)) / ow)))
            x1 = F32(pad + min(nw, F32(F32(x1 * F32(nw - F32(2) * pad)) / ow)))
            y0 = max(F32(0), F32(F32(y0 * nh) / oh))
            y1 = min(nh, F32(F32(y1 * nh) / oh))
    else:
        raise DataError(f"unknown resize_param.resize_mode {mode}")
    return [F32(x0 / nw), F32(y0 / nh), F32(x1 / nw), F32(y1 / nh)]


def _extrapolate(rp, height: int, width: int, crop: Box, b: Box) -> Box:
    """The fork's ``ExtrapolateBBox`` (only FIT_SMALL_SIZE with height/width_scale)."""
    hs, ws = F32(rp.height_scale), F32(rp.width_scale)
    if not (hs > 0 and ws > 0 and rp.resize_mode == _R.FIT_SMALL_SIZE):
        return b
    orig_aspect = F32(F32(width) / F32(height))
    rh, rw = F32(rp.height), F32(rp.width)
    if orig_aspect < F32(rw / rh):
        rh = F32(rw / orig_aspect)
    else:
        rw = F32(rh * orig_aspect)
    ch = F32(rh * F32(crop[3] - crop[1]))
    cw = F32(rw * F32(crop[2] - crop[0]))
    if cw < ws or ch < hs:
        raise DataError(f"crop {float(cw)}x{float(ch)} is smaller than width_scale/height_scale")
    return [F32(F32(b[0] * cw) / ws), F32(F32(b[1] * ch) / hs), F32(F32(b[2] * cw) / ws),
            F32(F32(b[3] * ch) / hs)]


def infer_new_size(rp, old_width: int, old_height: int) -> Tuple[int, int]:
    """The fork's ``InferNewSize``: ``(width, height)`` after ``resize_param``."""
    h, w = int(rp.height), int(rp.width)
    if rp.resize_mode == _R.FIT_SMALL_SIZE:
        orig_aspect = F32(F32(old_width) / F32(old_height))
        if orig_aspect < F32(F32(w) / F32(h)):
            h = int(F32(F32(w) / orig_aspect))
        else:
            w = int(F32(orig_aspect * F32(h)))
    return w, h


# ============================================================================ annotations
Anno = Tuple[int, Box, bool]  # (instance_id, box, difficult)
Groups = List[Tuple[int, List[Anno]]]  # [(group_label, annotations)]


def _read_groups(ad) -> Groups:
    out: Groups = []
    for g in ad.annotation_group:
        annos = [(int(a.instance_id), [F32(a.bbox.xmin), F32(a.bbox.ymin), F32(a.bbox.xmax),
                                        F32(a.bbox.ymax)], bool(a.bbox.difficult))
                 for a in g.annotation]
        out.append((int(g.group_label), annos))
    return out


# ============================================================================ images
def _saturate(x: np.ndarray) -> np.ndarray:
    """``saturate_cast<uchar>`` of float values (cvRound: half to even)."""
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _convert(img: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``Mat::convertTo(-1, alpha, beta)`` on uint8 data."""
    return _saturate(img.astype(np.float32) * F32(alpha) + F32(beta))


def _reencode(img: np.ndarray) -> np.ndarray:
    """``EncodeCVMatToDatum(img, "jpg")`` then the decode the next step does."""
    import cv2

    ok, buf = cv2.imencode(".jpg", img)
    if not ok:
        raise DataError(f"cannot JPEG-encode an image of shape {img.shape}")
    flag = cv2.IMREAD_UNCHANGED
    out = cv2.imdecode(buf, flag)
    if out is None:
        raise DataError("cannot decode a re-encoded JPEG")
    return out


class _SSDTransformer:
    """The SSD fork's ``DataTransformer`` for one layer (images as OpenCV HWC arrays)."""

    def __init__(self, tp, phase: str, generator: torch.Generator, layer: str):
        self.layer = layer
        self.phase = phase
        self.base = DataTransformer(tp, phase, generator=generator, layer=layer)
        self.gen = self.base.generator
        self.tp = tp
        self.scale = F32(tp.scale)
        self.mirror = bool(tp.mirror)
        self.crop_h = int(tp.crop_h)
        self.crop_w = int(tp.crop_w)
        if int(tp.crop_size):
            self.crop_h = self.crop_w = int(tp.crop_size)
        self.resize = tp.resize_param if tp.HasField("resize_param") else None
        self.distort = tp.distort_param if tp.HasField("distort_param") else None
        self.expand = tp.expand_param if tp.HasField("expand_param") else None
        self.emit = tp.emit_constraint if tp.HasField("emit_constraint") else None
        self.mean_values = [float(v) for v in tp.mean_value]

    # ---------------------------------------------------------------- random
    def uniform(self, a: float, b: float) -> F32:
        """``caffe_rng_uniform(1, a, b)`` (float)."""
        if b < a:
            raise DataError(f"uniform range [{a}, {b}) is empty")
        u = float(torch.rand((), generator=self.gen, dtype=torch.float64))
        return F32(F32(a) + F32(F32(b) - F32(a)) * F32(u))

    def rand(self, n: int) -> int:
        return self.base.rand(n)

    # ---------------------------------------------------------------- decode
    def decode(self, datum) -> Tuple[np.ndarray, bool]:
        """``(image, encoded)``: HWC (or HW) uint8 for encoded / raw byte data, HWC float32
        for ``float_data``."""
        if datum.encoded:
            return self.base.decode_image(datum), True
        chw = self.base.decode_datum(datum)
        if chw.size == 0:
            raise DataError(f"a Datum of {chw.shape[0]}x{chw.shape[1]}x{chw.shape[2]} holds no pixel",
                            layer=self.layer)
        return np.ascontiguousarray(chw.transpose(1, 2, 0)), False

    def infer_shape(self, img: np.ndarray) -> Tuple[int, int, int]:
        """``InferBlobShape`` of one image: (C, H, W)."""
        h, w = img.shape[:2]
        c = 1 if img.ndim == 2 else img.shape[2]
        if c <= 0:
            raise DataError("image has no channel", layer=self.layer)
        if self.resize is not None:
            w, h = infer_new_size(self.resize, w, h)
        if h < self.crop_h or w < self.crop_w:
            raise DataError(f"image {h}x{w} is smaller than the crop {self.crop_h}x{self.crop_w}",
                            layer=self.layer)
        return c, (self.crop_h or h), (self.crop_w or w)

    # ---------------------------------------------------------------- distortion
    def distort_image(self, img: np.ndarray) -> np.ndarray:
        import cv2

        p = self.distort
        if img.ndim != 3 or img.shape[2] != 3:
            raise DataError("distort_param needs 3-channel (BGR) images", layer=self.layer)

        def brightness(im):
            if self.uniform(0, 1) < F32(p.brightness_prob):
                d = self.uniform(-p.brightness_delta, p.brightness_delta)
                if abs(d) > 0:
                    return _convert(im, 1, d)
            return im

        def contrast(im):
            if self.uniform(0, 1) < F32(p.contrast_prob):
                d = self.uniform(p.contrast_lower, p.contrast_upper)
                if abs(F32(d - F32(1))) > 1e-3:
                    return _convert(im, d, 0)
            return im

        def saturation(im):
            if self.uniform(0, 1) < F32(p.saturation_prob):
                d = self.uniform(p.saturation_lower, p.saturation_upper)
                # the fork's test is `fabs(delta - 1) != 1e-3`: it always converts
                hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
                hsv[:, :, 1] = _convert(hsv[:, :, 1], d, 0)
                return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
            return im

        def hue(im):
            if self.uniform(0, 1) < F32(p.hue_prob):
                d = self.uniform(-p.hue_delta, p.hue_delta)
                if abs(d) > 0:
                    hsv = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)
                    hsv[:, :, 0] = _convert(hsv[:, :, 0], 1, d)
                    return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
            return im

        def order(im):
            if self.uniform(0, 1) < F32(p.random_order_prob):
                perm = torch.randperm(3, generator=self.gen).tolist()
                return np.ascontiguousarray(im[:, :, perm])
            return im

        steps = ((brightness, contrast, saturation, hue, order) if self.uniform(0, 1) > 0.5
                 else (brightness, saturation, hue, contrast, order))
        for step in steps:
            img = step(img)
        return img

    # ---------------------------------------------------------------- expansion
    def expand_image(self, img: np.ndarray, groups: Groups) -> Tuple[np.ndarray, Groups]:
        p = self.expand
        if self.uniform(0, 1) > F32(p.prob):
            return img, groups
        max_ratio = F32(p.max_expand_ratio)
        if abs(float(max_ratio) - 1.0) < 1e-2:
            return img, groups
        ratio = self.uniform(1, max_ratio)
        ih, iw = img.shape[:2]
        height = int(F32(F32(ih) * ratio))
        width = int(F32(F32(iw) * ratio))
        h_off = F32(math.floor(self.uniform(0, float(height - ih))))
        w_off = F32(math.floor(self.uniform(0, float(width - iw))))
        box = [F32(-w_off / F32(iw)), F32(-h_off / F32(ih)), F32(F32(width - w_off) / F32(iw)),
               F32(F32(height - h_off) / F32(ih))]
        c = 1 if img.ndim == 2 else img.shape[2]
        canvas = np.zeros((height, width) + img.shape[2:], np.uint8)
        mean = self.base.mean_array()
        if mean is not None:
            if mean.shape != (c, height, width):
                raise DataError(f"expand_param with mean_file needs a mean of the expanded size "
                                f"{(c, height, width)}, got {mean.shape} (the fork reads past it)",
                                layer=self.layer)
            fill = (mean.astype(np.int64) & 0xFF).astype(np.uint8)  # static_cast<char>
            canvas[...] = fill.transpose(1, 2, 0).reshape(canvas.shape)
        if self.mean_values:
            mv = self.mean_values * (c if len(self.mean_values) == 1 else 1)
            if len(mv) != c:
                raise DataError(f"specify either 1 mean_value or as many as channels ({c})",
                                layer=self.layer)
            fill = _saturate(np.asarray(mv, np.float32))
            canvas[...] = fill.reshape((1, 1, c) if canvas.ndim == 3 else (1, 1))
        y, x = int(h_off), int(w_off)
        canvas[y:y + ih, x:x + iw] = img
        return _reencode(canvas), self.transform_annotation(groups, box, mirror=False, resize=False,
                                                            img_hw=(ih, iw))

    # ---------------------------------------------------------------- sampling
    def _satisfy(self, sampled: Box, objects: List[Box], sc) -> bool:
        has_j = sc.HasField("min_jaccard_overlap") or sc.HasField("max_jaccard_overlap")
        has_s = sc.HasField("min_sample_coverage") or sc.HasField("max_sample_coverage")
        has_o = sc.HasField("min_object_coverage") or sc.HasField("max_object_coverage")
        if not (has_j or has_s or has_o):
            return True
        found = False
        ious = None
        if has_j and objects:  # one call for all objects
            ious = jaccard_overlap(torch.tensor([sampled], dtype=torch.float32),
                                   torch.tensor(objects, dtype=torch.float32))[0].tolist()
        for k, ob in enumerate(objects):
            if has_j:
                j = F32(ious[k])
                if sc.HasField("min_jaccard_overlap") and j < F32(sc.min_jaccard_overlap):
                    continue
                if sc.HasField("max_jaccard_overlap") and j > F32(sc.max_jaccard_overlap):
                    continue
                found = True
            if has_s:
                s = _coverage(sampled, ob)
                if sc.HasField("min_sample_coverage") and s < F32(sc.min_sample_coverage):
                    continue
                if sc.HasField("max_sample_coverage") and s > F32(sc.max_sample_coverage):
                    continue
                found = True
            if has_o:
                o = _coverage(ob, sampled)
                if sc.HasField("min_object_coverage") and o < F32(sc.min_object_coverage):
                    continue
                if sc.HasField("max_object_coverage") and o > F32(sc.max_object_coverage):
                    continue
                found = True
            if found:
                return True
        return found

    def _sample_bbox(self, s) -> Box:
        scale = self.uniform(s.min_scale, s.max_scale)
        ar = self.uniform(s.min_aspect_ratio, s.max_aspect_ratio)
        ar = max(ar, F32(float(scale) ** 2))
        ar = min(ar, F32(1 / float(scale) ** 2))
        bw = F32(float(scale) * math.sqrt(float(ar)))
        bh = F32(float(scale) / math.sqrt(float(ar)))
        # a box a rounding error wider than the image: the range is [0, 0]
        w_off = self.uniform(0, max(0.0, float(F32(1) - bw)))
        h_off = self.uniform(0, max(0.0, float(F32(1) - bh)))
        return [w_off, h_off, F32(w_off + bw), F32(h_off + bh)]

    def generate_samples(self, groups: Groups, samplers) -> List[Box]:
        objects = [b for _, annos in groups for _, b, _ in annos]
        out: List[Box] = []
        for bs in samplers:
            if not bs.use_original_image:
                continue
            found = 0
            for _ in range(int(bs.max_trials)):
                if bs.HasField("max_sample") and found >= bs.max_sample:
                    break
                b = self._sample_bbox(bs.sampler)
                # LocateBBox in the unit box
                b = [F32(F32(0) + F32(b[0] * F32(1))), F32(F32(0) + F32(b[1] * F32(1))),
                     F32(F32(0) + F32(b[2] * F32(1))), F32(F32(0) + F32(b[3] * F32(1)))]
                if self._satisfy(b, objects, bs.sample_constraint):
                    found += 1
                    out.append(b)
        return out

    def crop_image(self, img: np.ndarray, box: Box, groups: Groups,
                   encoded: bool) -> Tuple[np.ndarray, Groups]:
        ih, iw = img.shape[:2]
        c = _clip(box)
        sx0, sy0 = F32(c[0] * F32(iw)), F32(c[1] * F32(ih))
        sx1, sy1 = F32(c[2] * F32(iw)), F32(c[3] * F32(ih))
        x, y = int(sx0), int(sy0)
        w, h = int(F32(sx1 - sx0)), int(F32(sy1 - sy0))
        if w <= 0 or h <= 0:
            raise DataError(f"a sampled crop of {w}x{h} pixels is empty", layer=self.layer)
        crop = np.ascontiguousarray(img[y:y + h, x:x + w])
        if encoded:
            crop = _reencode(crop)
        return crop, self.transform_annotation(groups, c, mirror=False, resize=False, img_hw=(ih, iw))

    # ---------------------------------------------------------------- annotation
    def transform_annotation(self, groups: Groups, crop: Box, *, mirror: bool, resize: bool,
                             img_hw: Tuple[int, int]) -> Groups:
        ih, iw = img_hw
        out: Groups = []
        for label, annos in groups:
            kept: List[Anno] = []
            for inst, b, diff in annos:
                rb = b
                if resize and self.resize is not None:
                    if ih <= 0 or iw <= 0:
                        raise DataError("the datum's height and width are needed to resize boxes",
                                        layer=self.layer)
                    rb = update_bbox_by_resize_policy(self.resize, iw, ih, rb)
                if self.emit is not None and not _meet_emit_constraint(crop, rb, self.emit):
                    continue
                p = project_bbox(crop, rb)
                if p is None:
                    continue
                if mirror:
                    p = [F32(F32(1) - p[2]), p[1], F32(F32(1) - p[0]), p[3]]
                if resize and self.resize is not None:
                    p = _extrapolate(self.resize, ih, iw, crop, p)
                kept.append((inst, p, diff))
            if kept:
                out.append((label, kept))
        return out

    # ---------------------------------------------------------------- resize + transform
    def _resize(self, img: np.ndarray) -> np.ndarray:
        import cv2

        rp = self.resize
        nh, nw = int(rp.height), int(rp.width)
        pad_mode = {_R.CONSTANT: cv2.BORDER_CONSTANT, _R.MIRRORED: cv2.BORDER_REFLECT_101,
                    _R.REPEAT_NEAREST: cv2.BORDER_REPLICATE}[rp.pad_mode]
        interp = cv2.INTER_LINEAR
        modes = list(rp.interp_mode)
        if modes:
            # roll_weighted_die over equal probabilities
            cum = np.cumsum(np.full(len(modes), F32(1) / F32(len(modes)), np.float32))
            k = int(np.searchsorted(cum, self.uniform(0, float(cum[-1])), side="left"))
            table = {_R.AREA: cv2.INTER_AREA, _R.CUBIC: cv2.INTER_CUBIC, _R.LINEAR: cv2.INTER_LINEAR,
                     _R.NEAREST: cv2.INTER_NEAREST, _R.LANCZOS4: cv2.INTER_LANCZOS4}
            interp = table[modes[min(k, len(modes) - 1)]]
        c = 1 if img.ndim == 2 else img.shape[2]
        pad = [0.0, 0.0, 0.0]
        if len(rp.pad_value):
            pv = [float(v) for v in rp.pad_value]
            if len(pv) not in (1, c):
                raise DataError(f"specify either 1 pad_value or as many as channels ({c})",
                                layer=self.layer)
            if c > 1 and len(pv) == 1:
                pv = pv * c
            pad = (pv + [0.0, 0.0, 0.0])[:3]
        ih, iw = img.shape[:2]
        orig_aspect = F32(F32(iw) / F32(ih))
        new_aspect = F32(F32(nw) / F32(nh))
        mode = rp.resize_mode
        if mode == _R.WARP:
            return cv2.resize(img, (nw, nh), interpolation=interp)
        if mode == _R.FIT_LARGE_SIZE_AND_PAD:
            if orig_aspect > new_aspect:
                h = int(math.floor(F32(F32(nw) / orig_aspect)))
                r = cv2.resize(img, (nw, h), interpolation=interp)
                top = int(math.floor((nh - r.shape[0]) / 2.0))
                return cv2.copyMakeBorder(r, top, nh - r.shape[0] - top, 0, 0, pad_mode,
                                          value=pad + [0.0])
            w = int(math.floor(F32(orig_aspect * F32(nh))))
            r = cv2.resize(img, (w, nh), interpolation=interp)
            left = int(math.floor((nw - r.shape[1]) / 2.0))
            return cv2.copyMakeBorder(r, 0, 0, left, nw - r.shape[1] - left, pad_mode,
                                      value=pad + [0.0])
        if mode == _R.FIT_SMALL_SIZE:
            if orig_aspect < new_aspect:
                h = int(math.floor(F32(F32(nw) / orig_aspect)))
                return cv2.resize(img, (nw, h), interpolation=interp)
            w = int(math.floor(F32(orig_aspect * F32(nh))))
            return cv2.resize(img, (w, nh), interpolation=interp)
        raise DataError(f"unknown resize_param.resize_mode {mode}", layer=self.layer)

    def transform(self, img: np.ndarray, groups: Optional[Groups], datum_hw: Tuple[int, int],
                  encoded: bool) -> Tuple[np.ndarray, Optional[Groups]]:
        """Resize, crop, mirror, mean and scale one image -> (C, H, W) float32, and its
        annotations (``Transform(AnnotatedDatum, ...)``)."""
        do_mirror = self.mirror and self.rand(2) == 1
        x = self._resize(img) if self.resize is not None else img
        if x.ndim == 2:
            x = x[:, :, None]
        ih, iw, c = x.shape
        ch, cw = self.crop_h, self.crop_w
        if ih < ch or iw < cw:
            raise DataError(f"image {ih}x{iw} is smaller than the crop {ch}x{cw}", layer=self.layer)
        h_off = w_off = 0
        oh, ow = ih, iw
        if ch > 0 and cw > 0:
            oh, ow = ch, cw
            if self.phase == TRAIN:
                h_off = self.rand(ih - ch + 1)
                w_off = self.rand(iw - cw + 1)
            else:
                h_off = (ih - ch) // 2
                w_off = (iw - cw) // 2
        crop_box = [F32(F32(w_off) / F32(iw)), F32(F32(h_off) / F32(ih)),
                    F32(F32(w_off + ow) / F32(iw)), F32(F32(h_off + oh) / F32(ih))]
        out = x[h_off:h_off + oh, w_off:w_off + ow].astype(np.float32).transpose(2, 0, 1)
        if do_mirror:
            out = out[:, :, ::-1]
        mean = self.base.mean_array()
        if mean is not None:
            if mean.shape != (c, oh, ow) or (oh, ow) != (ih, iw):
                raise DataError(f"mean_file of shape {mean.shape} needs images of that size without "
                                f"a crop; got {(c, ih, iw)} cropped to {(c, oh, ow)}", layer=self.layer)
            # the fork subtracts the mean at the *destination* pixel (encoded images) but at
            # the source pixel for raw datums
            out = out - (mean if encoded or not do_mirror else mean[:, :, ::-1])
        elif self.mean_values:
            mv = self.mean_values * (c if len(self.mean_values) == 1 else 1)
            if len(mv) != c:
                raise DataError(f"specify either 1 mean_value or as many as channels ({c}); got "
                                f"{len(self.mean_values)}", layer=self.layer)
            out = out - np.asarray(mv, np.float32)[:, None, None]
        out = np.ascontiguousarray(out * self.scale, dtype=np.float32)
        new_groups = None
        if groups is not None:
            new_groups = self.transform_annotation(groups, crop_box, mirror=do_mirror, resize=True,
                                                   img_hw=datum_hw)
        return out, new_groups


# ============================================================================ the layer
@register("AnnotatedData")
class AnnotatedData(Data):
    """SSD's AnnotatedData (weiliu89/caffe@4817bf8); see the module docstring."""

    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        _DataBase.__init__(self, param, bottom_shapes, ctx)  # Data's reader, not its transformer
        p = param.data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.backend = p.backend
        if self.batch_size <= 0:
            raise self.error(SchemaError, f"data_param.batch_size must be > 0, got {self.batch_size}")
        ap = param.annotated_data_param
        tp = param.transform_param
        self._check_params(ap, tp)
        self.batch_samplers = list(ap.batch_sampler)
        self.label_map_file = ap.label_map_file  # the fork keeps it and reads nothing from it
        self.anno_type = int(ap.anno_type) if ap.HasField("anno_type") else None
        self.transformer = _SSDTransformer(tp, self.phase, _child_generator(ctx), self.name)
        self._env = None
        self._next_key: Optional[bytes] = None
        self._problem: Optional[str] = None
        self.has_anno_type: Optional[bool] = None
        first = self._open()
        if first is not None:
            try:
                img, _ = self.transformer.decode(first.datum)
                self._shapes[0] = (self.batch_size,) + self.transformer.infer_shape(img)
                self.has_anno_type = first.HasField("type") or self.anno_type is not None
                if len(self.top_names) > 1:
                    if self.has_anno_type:
                        n = sum(len(g.annotation) for g in first.annotation_group)
                        self._shapes[1] = (1, 1, max(n, 1), 8)
                    else:
                        self._shapes[1] = (self.batch_size, 1, 1, 1)
            except DataError as e:
                self._problem = str(e)

    def _check_params(self, ap, tp) -> None:
        for f in _FOREIGN_ANNO:
            if f in ap.DESCRIPTOR.fields_by_name and ap.HasField(f):
                raise self.error(SchemaError, f"annotated_data_param.{f} belongs to another fork's "
                                              "AnnotatedData, not the SSD fork's (not supported)")
        for f in _FOREIGN_TRANSFORM:
            if f not in tp.DESCRIPTOR.fields_by_name:
                continue
            try:
                given = tp.HasField(f)
            except ValueError:  # a repeated field
                given = len(getattr(tp, f)) > 0
            if given:
                raise self.error(SchemaError, f"transform_param.{f} belongs to another fork's data "
                                              "transformer, not the SSD fork's (not supported)")
        if ap.HasField("anno_type") and ap.anno_type != _AD.BBOX:
            raise self.error(SchemaError, f"annotated_data_param.anno_type "
                                          f"{_AD.AnnotationType.Name(ap.anno_type)} is not supported; "
                                          "allowed: BBOX")
        if tp.HasField("noise_param"):
            raise self.error(SchemaError, "transform_param.noise_param (the fork's ApplyNoise: "
                                          "decolorize, blur, histogram equalisation, JPEG, salt and "
                                          "pepper, ...) is not implemented")
        if tp.HasField("resize_param"):
            rp = tp.resize_param
            if not (rp.height > 0 and rp.width > 0):
                raise self.error(SchemaError, "resize_param.height and resize_param.width must be > 0")
            if rp.resize_mode not in (_R.WARP, _R.FIT_SMALL_SIZE, _R.FIT_LARGE_SIZE_AND_PAD):
                raise self.error(SchemaError, f"unknown resize_param.resize_mode {rp.resize_mode}; "
                                              "allowed: WARP, FIT_SMALL_SIZE, FIT_LARGE_SIZE_AND_PAD")
            if rp.resize_mode == _R.FIT_SMALL_SIZE and self.batch_size != 1:
                raise self.error(SchemaError, "resize_mode FIT_SMALL_SIZE needs batch_size 1")
        if tp.HasField("expand_param") and not tp.expand_param.max_expand_ratio > 1:
            raise self.error(SchemaError, "expand_param.max_expand_ratio must be > 1")
        if tp.HasField("distort_param"):
            d = tp.distort_param
            if d.brightness_prob > 0 and d.brightness_delta < 0:
                raise self.error(SchemaError, "distort_param.brightness_delta must be >= 0")
            if d.hue_prob > 0 and d.hue_delta < 0:
                raise self.error(SchemaError, "distort_param.hue_delta must be >= 0")
            for what in ("contrast", "saturation"):
                lo, hi = getattr(d, f"{what}_lower"), getattr(d, f"{what}_upper")
                if getattr(d, f"{what}_prob") > 0 and not (0 <= lo <= hi):
                    raise self.error(SchemaError, f"distort_param: need 0 <= {what}_lower <= "
                                                  f"{what}_upper, got {lo}, {hi}")
        for k, bs in enumerate(ap.batch_sampler):
            s = bs.sampler
            if not (0 < s.min_scale <= s.max_scale <= 1):
                raise self.error(SchemaError, f"batch_sampler {k}: need 0 < min_scale <= max_scale "
                                              f"<= 1, got {s.min_scale}, {s.max_scale}")
            if not (0 < s.min_aspect_ratio <= s.max_aspect_ratio < FLT_MAX):
                raise self.error(SchemaError, f"batch_sampler {k}: need 0 < min_aspect_ratio <= "
                                              f"max_aspect_ratio, got {s.min_aspect_ratio}, "
                                              f"{s.max_aspect_ratio}")

    def _parse(self, raw: bytes):
        ad = caffe_pb2.AnnotatedDatum()
        try:
            ad.ParseFromString(raw)
        except Exception as e:
            raise self.error(DataError, f"corrupt AnnotatedDatum record in '{self.source}': {e}") from None
        return ad

    # ---------------------------------------------------------------- one item
    def _item(self, ad) -> Tuple[np.ndarray, Optional[Groups], np.ndarray]:
        t = self.transformer
        img, encoded = t.decode(ad.datum)
        if not encoded and (t.distort is not None or t.expand is not None):
            raise DataError("distort_param and expand_param need encoded images (the fork skips "
                            "the distortion of raw datums and pads their expansion with the byte "
                            "32); re-create the LMDB with encoded images", layer=self.name)
        if img.dtype != np.uint8 and self.batch_samplers:
            raise DataError("batch_sampler cannot crop float_data datums (the fork crops their "
                            "empty byte data)", layer=self.name)
        groups = _read_groups(ad) if self.has_anno_type else None
        dh, dw = int(ad.datum.height), int(ad.datum.width)
        if t.distort is not None:
            img = _reencode(t.distort_image(img))
        if t.expand is not None:
            img, groups2 = t.expand_image(img, groups or [])
            groups = groups2 if groups is not None else None
            dh, dw = img.shape[:2]
        if self.batch_samplers:
            boxes = t.generate_samples(groups or [], self.batch_samplers)
            if boxes:
                pick = boxes[int(torch.randint(0, len(boxes), (1,), generator=t.gen))]
                img, groups2 = t.crop_image(img, pick, groups or [], encoded)
                groups = groups2 if groups is not None else None
                dh, dw = img.shape[:2]
        if dh <= 0 or dw <= 0:  # a datum without stored dimensions: the decoded image's
            dh, dw = img.shape[:2]
        shape = t.infer_shape(img)
        out, groups = t.transform(img, groups, (dh, dw), encoded)
        return out, groups, np.asarray(shape)

    def forward(self) -> Tuple[Tensor, ...]:
        if self._env is None:
            self._open()
            if self._env is None:
                raise self._missing(self._problem or f"cannot read '{self.source}'")
        records = self._read(self.batch_size)
        if self.has_anno_type is None:
            self.has_anno_type = records[0].HasField("type") or self.anno_type is not None
        t = self.transformer
        first_img, _ = t.decode(records[0].datum)
        expected = t.infer_shape(first_img)
        fit_small = t.resize is not None and t.resize.resize_mode == _R.FIT_SMALL_SIZE
        datas: List[np.ndarray] = []
        rows: List[List[float]] = []
        labels: List[float] = []
        for item_id, ad in enumerate(records):
            if self.has_anno_type:
                if not ad.HasField("type") and self.anno_type is None:
                    raise self.error(DataError, f"record {item_id} of the batch has no annotation type "
                                                "while others have one")
                if self.anno_type is None and ad.type != records[0].type:
                    raise self.error(DataError, "records have different annotation types")
                typ = self.anno_type if self.anno_type is not None else ad.type
                if typ != _AD.BBOX:
                    raise self.error(DataError, f"annotation type {typ} is not supported (BBOX only)")
            try:
                out, groups, shape = self._item(ad)
            except DataError:
                raise
            except Exception as e:  # OpenCV refusing a damaged or degenerate image
                if type(e).__module__.split(".")[0] != "cv2":
                    raise
                raise self.error(DataError, f"record {item_id} of the batch: OpenCV: "
                                            f"{str(e).strip()}") from None
            if not fit_small and tuple(shape) != tuple(expected):
                raise self.error(DataError, f"item {item_id} would be {tuple(shape)} but the batch "
                                            f"(from its first record) is {tuple(expected)}; use "
                                            "resize_param to give every image one size")
            datas.append(out)
            if self.has_anno_type:
                for label, annos in groups or []:
                    for inst, b, diff in annos:
                        rows.append([item_id, label, inst, *[float(v) for v in b], float(diff)])
            else:
                if not ad.datum.HasField("label"):
                    raise self.error(DataError, f"record {item_id} has no datum.label")
                labels.append(float(ad.datum.label))
        tops = [self._tensor(np.stack(datas))]
        if len(self.top_names) > 1:
            if self.has_anno_type:
                lab = np.asarray(rows, np.float32).reshape(1, 1, -1, 8) if rows else \
                    np.full((1, 1, 1, 8), -1, np.float32)
            else:
                lab = np.asarray(labels, np.float32).reshape(-1, 1, 1, 1)
            tops.append(self._tensor(lab))
        return tuple(tops)
