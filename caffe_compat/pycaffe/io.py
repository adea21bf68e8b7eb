"""pycaffe's ``caffe.io``: blob/datum conversions, image loading and the Transformer.

Same functions and semantics as BVLC's module, built on numpy and OpenCV instead of
scikit-image and SciPy:

- ``load_image`` reads with OpenCV and returns what skimage's reader gives pycaffe:
  float32 RGB in [0, 1] (H x W x 3), or H x W x 1 intensity with ``color=False``
  (skimage's luminance weights 0.2125 R + 0.7154 G + 0.0721 B).  Lossless formats give
  skimage's values exactly; JPEG decoders may differ by a grey level here and there.
- ``resize_image`` keeps pycaffe's recipe (normalize to [0, 1], resize, scale back; a
  constant image stays constant) with OpenCV's pixel-centre-aligned interpolation
  (order 0 nearest, 1 bilinear, 3 bicubic; others linear).  Interior pixels equal
  skimage's for bilinear; at the border skimage's ``mode='constant'`` blends in zeros,
  OpenCV replicates the edge.  Any number of channels is accepted.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from caffe_compat.protos import caffe_pb2

__all__ = ["blobproto_to_array", "array_to_blobproto", "arraylist_to_blobprotovector_str",
           "blobprotovector_str_to_arraylist", "array_to_datum", "datum_to_array",
           "Transformer", "load_image", "resize_image", "oversample"]


# ---------------------------------------------------------------------------- protos
def blobproto_to_array(blob, return_diff: bool = False) -> np.ndarray:
    """A BlobProto's data (or diff) as an array of its shape (legacy 4-D fields honoured)."""
    # float64, as numpy makes of Python floats (newer protobufs would hand out float32)
    data = np.asarray(blob.diff if return_diff else blob.data, dtype=np.float64)
    if blob.HasField("num") or blob.HasField("channels") or blob.HasField("height") \
            or blob.HasField("width"):
        return data.reshape(blob.num, blob.channels, blob.height, blob.width)
    return data.reshape(blob.shape.dim)


def array_to_blobproto(arr: np.ndarray, diff: Optional[np.ndarray] = None):
    """An N-d array (and optional diff of the same shape) as a BlobProto."""
    arr = np.asarray(arr)
    blob = caffe_pb2.BlobProto()
    blob.shape.dim.extend(int(d) for d in arr.shape)
    blob.data.extend(arr.astype(float).flat)
    if diff is not None:
        blob.diff.extend(np.asarray(diff).astype(float).flat)
    return blob


def arraylist_to_blobprotovector_str(arraylist: Iterable[np.ndarray]) -> bytes:
    """A list of arrays as a serialized BlobProtoVector."""
    vec = caffe_pb2.BlobProtoVector()
    vec.blobs.extend([array_to_blobproto(a) for a in arraylist])
    return vec.SerializeToString()


def blobprotovector_str_to_arraylist(s: bytes) -> List[np.ndarray]:
    """A serialized BlobProtoVector as a list of arrays."""
    vec = caffe_pb2.BlobProtoVector()
    vec.ParseFromString(s)
    return [blobproto_to_array(b) for b in vec.blobs]


def array_to_datum(arr: np.ndarray, label: Optional[int] = None):
    """A C x H x W array as a Datum: uint8 arrays as bytes, others as float_data."""
    arr = np.asarray(arr)
    if arr.ndim != 3:
        raise ValueError("Incorrect array shape.")
    datum = caffe_pb2.Datum()
    datum.channels, datum.height, datum.width = (int(d) for d in arr.shape)
    if arr.dtype == np.uint8:
        datum.data = arr.tobytes()
    else:
        datum.float_data.extend(arr.astype(float).flat)
    if label is not None:
        datum.label = label
    return datum


def datum_to_array(datum) -> np.ndarray:
    """A Datum's pixels as a C x H x W array (uint8 or float64); the label is not returned."""
    if len(datum.data):
        return np.frombuffer(datum.data, dtype=np.uint8).reshape(
            datum.channels, datum.height, datum.width).copy()
    return np.array(datum.float_data).astype(float).reshape(datum.channels, datum.height, datum.width)


# ---------------------------------------------------------------------------- transformer
class Transformer:
    """Prepare images for a net's input blobs (pycaffe's ``caffe.io.Transformer``).

    ``inputs`` maps input names to blob shapes (N, K, H, W).  ``preprocess`` converts an
    H' x W' x K image: to float32, resize to (H, W) when needed, transpose, swap
    channels, ``*= raw_scale``, ``-= mean``, ``*= input_scale``; ``deprocess`` undoes it.
    """

    def __init__(self, inputs: Dict[str, Sequence[int]]):
        self.inputs = inputs
        self.transpose: Dict[str, Sequence[int]] = {}
        self.channel_swap: Dict[str, Sequence[int]] = {}
        self.raw_scale: Dict[str, float] = {}
        self.mean: Dict[str, np.ndarray] = {}
        self.input_scale: Dict[str, float] = {}

    def __check_input(self, in_: str) -> None:
        if in_ not in self.inputs:
            raise Exception(f"{in_} is not one of the net inputs: {self.inputs}")

    def preprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        self.__check_input(in_)
        caffe_in = data.astype(np.float32, copy=False)
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        in_dims = tuple(self.inputs[in_][2:])
        if tuple(caffe_in.shape[:2]) != in_dims:
            caffe_in = resize_image(caffe_in, in_dims)
        if transpose is not None:
            caffe_in = caffe_in.transpose(transpose)
        if channel_swap is not None:
            caffe_in = caffe_in[list(channel_swap), :, :]
        # in place, as pycaffe: a float32 image that only gets transposed is scaled in place
        if raw_scale is not None:
            caffe_in *= raw_scale
        if mean is not None:
            caffe_in -= mean
        if input_scale is not None:
            caffe_in *= input_scale
        return caffe_in

    def deprocess(self, in_: str, data: np.ndarray) -> np.ndarray:
        self.__check_input(in_)
        decaf_in = np.array(data, copy=True).squeeze()
        transpose = self.transpose.get(in_)
        channel_swap = self.channel_swap.get(in_)
        raw_scale = self.raw_scale.get(in_)
        mean = self.mean.get(in_)
        input_scale = self.input_scale.get(in_)
        if input_scale is not None:
            decaf_in /= input_scale
        if mean is not None:
            decaf_in += mean
        if raw_scale is not None:
            decaf_in /= raw_scale
        if channel_swap is not None:
            decaf_in = decaf_in[np.argsort(channel_swap), :, :]
        if transpose is not None:
            decaf_in = decaf_in.transpose(np.argsort(transpose))
        return decaf_in

    def set_transpose(self, in_: str, order: Sequence[int]) -> None:
        """Axis order, e.g. (2, 0, 1) for H x W x K images to K x H x W."""
        self.__check_input(in_)
        if len(order) != len(self.inputs[in_]) - 1:
            raise Exception("Transpose order needs to have the same number of dimensions as the input.")
        self.transpose[in_] = order

    def set_channel_swap(self, in_: str, order: Sequence[int]) -> None:
        """Channel order after the transpose, e.g. (2, 1, 0) for RGB to BGR."""
        self.__check_input(in_)
        if len(order) != self.inputs[in_][1]:
            raise Exception("Channel swap needs to have the same number of dimensions as the input channels.")
        self.channel_swap[in_] = order

    def set_raw_scale(self, in_: str, scale: float) -> None:
        """Multiply the raw image (e.g. 255 for models trained on [0, 255])."""
        self.__check_input(in_)
        self.raw_scale[in_] = scale

    def set_mean(self, in_: str, mean: np.ndarray) -> None:
        """Mean to subtract: per channel (K,) or per pixel (K x H x W, resized if needed)."""
        self.__check_input(in_)
        mean = np.asarray(mean)
        ms = mean.shape
        if mean.ndim == 1:
            if ms[0] != self.inputs[in_][1]:
                raise ValueError("Mean channels incompatible with input.")
            mean = mean[:, np.newaxis, np.newaxis]
        else:
            if len(ms) == 2:
                ms = (1,) + ms
            if len(ms) != 3:
                raise ValueError("Mean shape invalid")
            if tuple(ms) != tuple(self.inputs[in_][1:]):
                in_shape = tuple(self.inputs[in_][1:])
                m_min, m_max = mean.min(), mean.max()
                normal_mean = (mean - m_min) / (m_max - m_min)
                mean = resize_image(normal_mean.transpose((1, 2, 0)), in_shape[1:]).transpose((2, 0, 1)) \
                    * (m_max - m_min) + m_min
        self.mean[in_] = mean

    def set_input_scale(self, in_: str, scale: float) -> None:
        """Multiply after mean subtraction (e.g. 0.017 for some ImageNet models)."""
        self.__check_input(in_)
        self.input_scale[in_] = scale


# ---------------------------------------------------------------------------- images
def load_image(filename: str, color: bool = True) -> np.ndarray:
    """An image as float32 in [0, 1]: H x W x 3 RGB, or H x W x 1 with ``color=False``."""
    import cv2

    raw = cv2.imread(str(filename), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise IOError(f"cannot read image file {filename!r}")
    if raw.dtype == np.uint16:
        scale = 65535.0
    elif raw.dtype == np.uint8:
        scale = 255.0
    else:
        scale = 1.0
    img = raw.astype(np.float64) / scale
    if img.ndim == 3:
        if img.shape[2] == 4:
            img = img[:, :, :3]
        img = img[:, :, ::-1]  # OpenCV's BGR -> RGB
        if img.shape[2] == 1:
            img = img[:, :, 0]
    if not color and img.ndim == 3:
        img = img[:, :, 0] * 0.2125 + img[:, :, 1] * 0.7154 + img[:, :, 2] * 0.0721
    img = img.astype(np.float32)
    if img.ndim == 2:
        img = img[:, :, np.newaxis]
        if color:
            img = np.tile(img, (1, 1, 3))
    return np.ascontiguousarray(img)


_INTERP = {0: "INTER_NEAREST", 1: "INTER_LINEAR", 2: "INTER_LINEAR", 3: "INTER_CUBIC"}


def _cv_resize(im: np.ndarray, new_dims: Tuple[int, int], order: int) -> np.ndarray:
    import cv2

    h, w = int(new_dims[0]), int(new_dims[1])
    flag = getattr(cv2, _INTERP.get(int(order), "INTER_LINEAR"))
    if tuple(im.shape[:2]) == (h, w):
        return np.array(im, dtype=np.float64, copy=True)
    src = np.ascontiguousarray(im, dtype=np.float64)
    chans = src.shape[2]
    # OpenCV resizes at most 512 channels at once
    parts = [cv2.resize(src[:, :, c:c + 512], (w, h), interpolation=flag) for c in range(0, chans, 512)]
    parts = [p[:, :, np.newaxis] if p.ndim == 2 else p for p in parts]
    return np.concatenate(parts, axis=2) if len(parts) > 1 else parts[0]


def resize_image(im: np.ndarray, new_dims: Sequence[int], interp_order: int = 1) -> np.ndarray:
    """Resize an H x W x K image to (new_dims[0], new_dims[1], K), float32."""
    im = np.asarray(im)
    new_dims = (int(new_dims[0]), int(new_dims[1]))
    if im.ndim != 3:
        raise ValueError(f"resize_image expects an H x W x K array, got shape {im.shape}")
    im_min, im_max = im.min(), im.max()
    if im.shape[-1] in (1, 3) and not im_max > im_min:
        ret = np.empty((new_dims[0], new_dims[1], im.shape[-1]), dtype=np.float32)
        ret.fill(im_min)
        return ret
    if im.shape[-1] in (1, 3):
        im_std = (im.astype(np.float64) - im_min) / (im_max - im_min)
        resized = _cv_resize(im_std, new_dims, interp_order) * (im_max - im_min) + im_min
    else:
        resized = _cv_resize(im, new_dims, interp_order)
    return resized.astype(np.float32)


def oversample(images: Sequence[np.ndarray], crop_dims: Sequence[int]) -> np.ndarray:
    """The four corner crops, the centre crop and their mirrors: (10 N) x H x W x K."""
    im_shape = np.array(images[0].shape)
    crop_dims = np.array(crop_dims)
    im_center = im_shape[:2] / 2.0
    h_indices = (0, im_shape[0] - crop_dims[0])
    w_indices = (0, im_shape[1] - crop_dims[1])
    crops_ix = np.empty((5, 4), dtype=int)
    curr = 0
    for i in h_indices:
        for j in w_indices:
            crops_ix[curr] = (i, j, i + crop_dims[0], j + crop_dims[1])
            curr += 1
    crops_ix[4] = np.tile(im_center, (1, 2)) + np.concatenate([-crop_dims / 2.0, crop_dims / 2.0])
    crops_ix = np.tile(crops_ix, (2, 1))
    crops = np.empty((10 * len(images), int(crop_dims[0]), int(crop_dims[1]), int(im_shape[-1])),
                     dtype=np.float32)
    ix = 0
    for im in images:
        for crop in crops_ix:
            crops[ix] = im[crop[0]:crop[2], crop[1]:crop[3], :]
            ix += 1
        crops[ix - 5:ix] = crops[ix - 5:ix, :, ::-1, :]  # mirrors
    return crops


def input_transformer(net, *, mean=None, input_scale=None, raw_scale=None, channel_swap=None) -> "Transformer":
    """The Transformer pycaffe's Classifier and Detector set up for a net's first input."""
    in_ = net.inputs[0]
    t = Transformer({in_: net.blobs[in_].data.shape})
    t.set_transpose(in_, (2, 0, 1))
    if mean is not None:
        t.set_mean(in_, mean)
    if input_scale is not None:
        t.set_input_scale(in_, input_scale)
    if raw_scale is not None:
        t.set_raw_scale(in_, raw_scale)
    if channel_swap is not None:
        t.set_channel_swap(in_, channel_swap)
    return t
