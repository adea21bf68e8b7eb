"""Caffe's ``DataTransformer``: ``transform_param`` applied to one image on the CPU.

An image here is a ``(C, H, W)`` numpy array of raw values (uint8 pixels from a Datum or
OpenCV, or a Datum's ``float_data``).  The result is float32 ``(C, h, w)``:

    out[c, y, x] = (img[c, y0 + y, x0 + x'] - mean) * scale

with ``(y0, x0)`` the crop offset (random at TRAIN, centred at TEST, none without
``crop_size``), ``x'`` mirrored when a coin flip says so (``mirror: true``, in *either* phase,
as in Caffe), and ``mean`` from ``mean_file`` (a BlobProto the size of the *uncropped*
image, indexed at the crop offset) or ``mean_value`` (one value, or one per channel).
Random draws come from a torch generator; they are equal in law to Caffe's, not bit for bit.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from caffe_compat.errors import DataError, SchemaError

TRAIN = "TRAIN"


class DataTransformer:
    """``transform_param`` for one layer (Caffe's ``DataTransformer<Dtype>``)."""

    def __init__(self, param, phase: str, *, generator: Optional[torch.Generator] = None,
                 layer: Optional[str] = None):
        self.layer = layer
        self.phase = phase
        self.scale = float(param.scale)
        self.mirror = bool(param.mirror)
        self.crop_size = int(param.crop_size)
        self.force_color = bool(param.force_color)
        self.force_gray = bool(param.force_gray)
        self.mean_values = [float(v) for v in param.mean_value]
        self.mean_file: Optional[str] = param.mean_file if param.HasField("mean_file") else None
        if self.mean_file is not None and self.mean_values:
            raise SchemaError("cannot specify mean_file and mean_value at the same time", layer=layer)
        if self.force_color and self.force_gray:
            raise SchemaError("cannot set both force_color and force_gray", layer=layer)
        self._mean: Optional[np.ndarray] = None
        self._mean_error: Optional[str] = None
        if self.mean_file is not None:
            self._load_mean()
        self.generator = torch.Generator()
        if generator is not None:
            self.generator.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
        else:
            self.generator.seed()

    # ------------------------------------------------------------------ mean
    def _load_mean(self) -> None:
        from caffe_compat.io import read_binaryproto

        path = self.mean_file
        if not os.path.exists(path):
            self._mean_error = f"mean file '{path}' not found (cwd {os.getcwd()})"
            return
        try:
            arr = read_binaryproto(path)
        except Exception as e:  # ParseError / WeightsError
            self._mean_error = f"cannot read mean file '{path}': {e}"
            return
        # Caffe's data_mean_ is a (1, C, H, W) blob; its channels/height/width must match
        if arr.ndim > 4:
            self._mean_error = f"mean file '{path}' has {arr.ndim} axes; expected at most 4"
            return
        arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
        self._mean = np.ascontiguousarray(arr[0], dtype=np.float32)

    def mean_array(self) -> Optional[np.ndarray]:
        """The mean file as (C, H, W) float32, or None without one; DataError if unreadable."""
        if self.mean_file is None:
            return None
        if self._mean is None:
            self._load_mean()
        if self._mean is None:
            raise DataError(self._mean_error or f"cannot read mean file '{self.mean_file}'", layer=self.layer)
        return self._mean

    # ------------------------------------------------------------------ random
    def rand(self, n: int) -> int:
        """Caffe's ``Rand(n)``: uniform in [0, n)."""
        return int(torch.randint(0, n, (1,), generator=self.generator))

    # ------------------------------------------------------------------ shapes
    def infer_shape(self, chw: Sequence[int]) -> Tuple[int, int, int]:
        """Caffe's ``InferBlobShape`` for one image (without the batch axis)."""
        c, h, w = (int(d) for d in chw)
        if c <= 0:
            raise DataError(f"image has {c} channels", layer=self.layer)
        if self.crop_size and (h < self.crop_size or w < self.crop_size):
            raise DataError(f"image {h}x{w} is smaller than crop_size {self.crop_size}", layer=self.layer)
        if self.crop_size:
            return c, self.crop_size, self.crop_size
        return c, h, w

    # ------------------------------------------------------------------ decoding
    def decode_image(self, datum) -> np.ndarray:
        """An encoded ``Datum``'s image (H, W[, C]) as OpenCV decodes it, honouring
        ``force_color`` / ``force_gray`` (Caffe's DecodeDatumToCVMat)."""
        import cv2

        if self.force_color:
            flag = cv2.IMREAD_COLOR
        elif self.force_gray:
            flag = cv2.IMREAD_GRAYSCALE
        else:
            flag = cv2.IMREAD_UNCHANGED
        img = cv2.imdecode(np.frombuffer(datum.data, dtype=np.uint8), flag)
        if img is None:
            raise DataError("could not decode an encoded Datum", layer=self.layer)
        return img

    def decode_datum(self, datum) -> np.ndarray:
        """A ``caffe_pb2.Datum`` as a (C, H, W) array: decoded image, uint8 bytes or float_data."""
        if datum.encoded:
            return hwc_to_chw(self.decode_image(datum), layer=self.layer)
        c, h, w = int(datum.channels), int(datum.height), int(datum.width)
        n = c * h * w
        if len(datum.data):
            arr = np.frombuffer(datum.data, dtype=np.uint8)
        else:
            arr = np.asarray(datum.float_data, dtype=np.float32)
        if arr.size != n:
            raise DataError(f"Datum declares {c}x{h}x{w} = {n} values but holds {arr.size}", layer=self.layer)
        return arr.reshape(c, h, w)

    # ------------------------------------------------------------------ transform
    def transform(self, img: np.ndarray, expected: Optional[Sequence[int]] = None) -> np.ndarray:
        """One (C, H, W) image -> transformed float32 (C, h, w).

        ``expected`` is the batch's per-item shape: Caffe requires every item of a batch to
        have the shape of the first one.
        """
        c, h, w = img.shape
        out_shape = self.infer_shape(img.shape)
        if expected is not None and tuple(expected) != out_shape:
            raise DataError(f"image of shape {tuple(img.shape)} gives {out_shape} but the batch "
                            f"(from its first image) is {tuple(expected)}; set new_height/new_width "
                            "or crop_size to make images the same size", layer=self.layer)
        do_mirror = self.mirror and self.rand(2) == 1
        h_off = w_off = 0
        oh, ow = h, w
        if self.crop_size:
            oh = ow = self.crop_size
            if self.phase == TRAIN:
                h_off = self.rand(h - self.crop_size + 1)
                w_off = self.rand(w - self.crop_size + 1)
            else:
                h_off = (h - self.crop_size) // 2
                w_off = (w - self.crop_size) // 2
        x = img[:, h_off:h_off + oh, w_off:w_off + ow].astype(np.float32)
        mean = self.mean_array()
        if mean is not None:
            if mean.shape != (c, h, w):
                raise DataError(f"mean file shape {mean.shape} does not match the image {(c, h, w)}",
                                layer=self.layer)
            x = x - mean[:, h_off:h_off + oh, w_off:w_off + ow]
        elif self.mean_values:
            if len(self.mean_values) not in (1, c):
                raise DataError(f"specify either 1 mean_value or as many as channels ({c}); got "
                                f"{len(self.mean_values)}", layer=self.layer)
            mv = np.asarray(self.mean_values * (c if len(self.mean_values) == 1 else 1), np.float32)
            x = x - mv[:, None, None]
        x = x * np.float32(self.scale)
        if do_mirror:
            x = x[:, :, ::-1]
        return np.ascontiguousarray(x, dtype=np.float32)


def hwc_to_chw(img: np.ndarray, *, layer: Optional[str] = None) -> np.ndarray:
    """An OpenCV image (H x W or H x W x C, uint8, BGR order kept) as (C, H, W)."""
    if img.dtype != np.uint8:
        raise DataError(f"image data type must be unsigned byte, got {img.dtype}", layer=layer)
    if img.ndim == 2:
        return img[None]
    return np.ascontiguousarray(img.transpose(2, 0, 1))
