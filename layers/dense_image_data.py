"""SegNet's ``DenseImageData``: image / label-image pairs for dense (per-pixel) labelling.

Follows alexgkendall/caffe-segnet @ 344c113bf1832886f1cbe9f33ffe28a3beeaf412
(``src/caffe/layers/dense_image_data_layer.cpp``, ``ReadImageToCVMat`` in ``util/io.cpp``);
ENet's copy (TimoSaemann/caffe-enet @ 22d356c956cdc5e752e6d40612e4f6c60fc8f471) adds
``label_divide_factor``, supported here in the one configuration where it is well defined.

Per item, as the fork:

1. read the image (BGR, or grey with ``is_color: false``) resized bilinearly to
   ``new_height x new_width`` when both are set, and the label image as grey, resized with
   *nearest neighbour* (label values are class ids; interpolating them would invent classes);
2. with ``mirror: true`` flip both horizontally on a coin toss (in any phase);
3. with ``crop_height``/``crop_width`` cut the same random window from both (random in any
   phase: the fork has no centred TEST crop);
4. the image goes through ``transform_param`` (mean, scale); the label keeps its raw
   pixel values.  ``transform_param``'s own ``mirror``/``crop_size`` are refused, as the fork
   refuses them: they would move the image and not its label.

Tops: data (N, C, H, W) and label (N, 1, H, W).  With ``batch_size: 1`` and no resizing or
cropping the tops take each image's own size.  Random choices use the layer's generator
(seeded from the net's), equal in law to Caffe's, not the same stream.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import DataError, SchemaError
from caffe_compat.layers.data import _BatchedSource, _child_generator, _read_image
from caffe_compat.layers.registry import register
from caffe_compat.transform import DataTransformer, hwc_to_chw


@register("DenseImageData")
class DenseImageData(_BatchedSource):
    """``dense_image_data_param { source batch_size shuffle rand_skip new_height new_width
    crop_height crop_width mirror is_color root_folder label_divide_factor }``.

    ``source`` lists whitespace-separated pairs ``image label_image`` (read pairwise, as the
    fork's ``infile >> a >> b``; ``root_folder`` is prefixed to both as plain text).
    """

    exact_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        p = param.dense_image_data_param
        self.source = p.source
        self.batch_size = int(p.batch_size)
        self.new_height, self.new_width = int(p.new_height), int(p.new_width)
        self.crop_height, self.crop_width = int(p.crop_height), int(p.crop_width)
        self.is_color = bool(p.is_color)
        self.root_folder = p.root_folder
        self.shuffle = bool(p.shuffle)
        self.mirror = bool(p.mirror)
        self.rand_skip = int(p.rand_skip)
        self.label_divide_factor = int(p.label_divide_factor)
        if (self.new_height > 0) != (self.new_width > 0):
            raise self.error(SchemaError, "dense_image_data_param.new_height and new_width must be "
                                          "set together")
        if (self.crop_height > 0) != (self.crop_width > 0):
            raise self.error(SchemaError, "dense_image_data_param.crop_height and crop_width must be "
                                          "set together")
        if self.batch_size <= 0:
            raise self.error(SchemaError, "dense_image_data_param.batch_size must be positive")
        tp = param.transform_param
        if tp.mirror or tp.crop_size:
            raise self.error(SchemaError, "DenseImageData cannot use transform_param.mirror or "
                                          "crop_size: they would move the image but not its label; "
                                          "use dense_image_data_param.mirror and crop_height/"
                                          "crop_width, which move both")
        if self.label_divide_factor < 1:
            raise self.error(SchemaError, "dense_image_data_param.label_divide_factor must be >= 1")
        if self.label_divide_factor > 1 and (self.new_height == 0 or self.crop_height > 0
                                             or self.new_height // self.label_divide_factor == 0
                                             or self.new_width // self.label_divide_factor == 0):
            raise self.error(SchemaError, "label_divide_factor > 1 (ENet) needs new_height/new_width "
                                          "at least that factor and no crop_height/crop_width (the "
                                          "crop window of the image would not fit the smaller label)")
        self.transformer = DataTransformer(tp, self.phase, generator=_child_generator(ctx),
                                           layer=self.name)
        self._generator = _child_generator(ctx)
        self._shapes = [None, None]
        self.lines: Optional[List[Tuple[str, str]]] = None
        self.pos = 0
        self._problem: Optional[str] = None
        if self._open():
            try:
                img, lab = self._load(self.pos, draw=False)
                self._shapes = [(self.batch_size,) + self.transformer.infer_shape(img.shape),
                                (self.batch_size,) + tuple(lab.shape)]
            except DataError as e:
                self._problem = str(e)

    def lint(self, bottom_producers):
        if self.param.dense_image_data_param.HasField("mean_file"):
            return ["dense_image_data_param.mean_file is never read (nor by the fork); a mean file "
                    "goes in transform_param.mean_file"]
        return []

    # ------------------------------------------------------------------ list
    def _open(self) -> bool:
        if not os.path.exists(self.source):
            self._problem = f"image list '{self.source}' not found (cwd {os.getcwd()})"
            return False
        with open(self.source, "r", encoding="utf-8", errors="surrogateescape") as f:
            tokens = f.read().split()
        pairs = list(zip(tokens[0::2], tokens[1::2]))  # an unpaired last token is dropped
        if not pairs:
            self._problem = f"image list '{self.source}' holds no 'image label_image' pair"
            return False
        self._start_list(pairs)
        return True

    # ------------------------------------------------------------------ items
    def _read_pair(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        """Image (H, W[, C]) and label (h, w), uint8, resized as the fork reads them."""
        import cv2

        img_name, lab_name = self.lines[i]
        img_path, lab_path = self.root_folder + img_name, self.root_folder + lab_name
        img = _read_image(img_path, self.new_height, self.new_width, self.is_color)
        if img is None:
            raise self._missing(f"could not load image '{img_path}' (listed in '{self.source}')")
        lab = _read_image(lab_path, 0, 0, False)
        if lab is None:
            raise self._missing(f"could not load label image '{lab_path}' (listed in '{self.source}')")
        lh, lw = self.new_height // self.label_divide_factor, self.new_width // self.label_divide_factor
        if lh > 0 and lw > 0:
            lab = cv2.resize(lab, (lw, lh), interpolation=cv2.INTER_NEAREST)
        want = (img.shape[0] // self.label_divide_factor, img.shape[1] // self.label_divide_factor)
        if lab.shape[:2] != want:
            raise self._missing(f"label image '{lab_path}' is {lab.shape[0]} x {lab.shape[1]} but its "
                                f"image '{img_path}' is {img.shape[0]} x {img.shape[1]}: their heights "
                                "and widths must match")
        return img, lab

    def _load(self, i: int, draw: bool = True) -> Tuple[np.ndarray, np.ndarray]:
        """Item ``i`` as (image (C, H, W) uint8, label (1, H, W) float32), mirrored and cropped
        when ``draw`` (the first item read at build time only gives the shapes)."""
        img, lab = self._read_pair(i)
        if draw and self.mirror and int(torch.randint(0, 2, (1,), generator=self._generator)):
            img, lab = img[:, ::-1], lab[:, ::-1]
        if self.crop_height > 0:
            h, w = img.shape[:2]
            ch, cw = self.crop_height, self.crop_width
            if h < ch or w < cw:
                raise self._missing(f"image '{self.root_folder + self.lines[i][0]}' ({h} x {w}) is "
                                    f"smaller than the crop {ch} x {cw}")
            h_off = w_off = 0
            if draw:
                h_off = int(torch.randint(0, h - ch + 1, (1,), generator=self._generator))
                w_off = int(torch.randint(0, w - cw + 1, (1,), generator=self._generator))
            img = img[h_off:h_off + ch, w_off:w_off + cw]
            lab = lab[h_off:h_off + ch, w_off:w_off + cw]
        return (hwc_to_chw(np.ascontiguousarray(img), layer=self.name),
                np.ascontiguousarray(lab, dtype=np.float32)[None])

    def forward(self) -> Tuple[Tensor, ...]:
        if self.lines is None and not self._open():
            raise self._missing(self._problem)
        images, labels = [], []
        for _ in range(self.batch_size):
            img, lab = self._load(self.pos)  # a label always has its image's size
            images.append(img)
            labels.append(lab)
            self.pos += 1
            if self.pos >= len(self.lines):
                self.pos = 0
                if self.shuffle:
                    self._shuffle()
        # the transformer refuses images of another size than the first; the labels, of
        # their images' sizes, then stack to (N, 1, H, W)
        return self._stack(images, labels)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, source={self.source!r}, batch_size={self.batch_size}, "
                f"new=({self.new_height}, {self.new_width}), crop=({self.crop_height}, "
                f"{self.crop_width}), mirror={self.mirror}, shuffle={self.shuffle}")
