"""pycaffe's ``caffe.Classifier``: a Net that classifies images (resize, crop or oversample,
preprocess, forward in batches, average over the ten crops)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from caffe_compat.pycaffe import io as caffe_io
from caffe_compat.pycaffe._net import Net
from caffe_compat.pycaffe.layer import TEST

__all__ = ["Classifier"]


class Classifier(Net):
    """``Classifier(model_file, pretrained_file, image_dims=None, mean=None, input_scale=None,
    raw_scale=None, channel_swap=None)``: the first input's Transformer is configured from
    the options (transpose (2, 0, 1) always); ``image_dims`` (default: the net's input
    size) is the size images are resized to before cropping."""

    def __init__(self, model_file, pretrained_file, image_dims: Optional[Sequence[int]] = None,
                 mean=None, input_scale=None, raw_scale=None, channel_swap=None):
        Net.__init__(self, model_file, TEST, weights=pretrained_file)
        in_ = self.inputs[0]
        self.transformer = caffe_io.input_transformer(self, mean=mean, input_scale=input_scale,
                                                      raw_scale=raw_scale, channel_swap=channel_swap)
        self.crop_dims = np.array(self.blobs[in_].data.shape[2:])
        if image_dims is None or len(image_dims) == 0:
            image_dims = self.crop_dims
        self.image_dims = image_dims

    def predict(self, inputs, oversample: bool = True) -> np.ndarray:
        """Class probabilities (N x C) of the H x W x K images ``inputs``; with
        ``oversample`` the average over corner, centre and mirrored crops, else the centre
        crop's."""
        input_ = np.zeros((len(inputs), self.image_dims[0], self.image_dims[1], inputs[0].shape[2]),
                          dtype=np.float32)
        for ix, in_ in enumerate(inputs):
            input_[ix] = caffe_io.resize_image(in_, self.image_dims)
        if oversample:
            input_ = caffe_io.oversample(input_, self.crop_dims)
        else:
            center = np.array(self.image_dims) / 2.0
            crop = np.tile(center, (1, 2))[0] + np.concatenate([-self.crop_dims / 2.0, self.crop_dims / 2.0])
            crop = crop.astype(int)
            input_ = input_[:, crop[0]:crop[2], crop[1]:crop[3], :]
        caffe_in = np.zeros(np.array(input_.shape)[[0, 3, 1, 2]], dtype=np.float32)
        for ix, in_ in enumerate(input_):
            caffe_in[ix] = self.transformer.preprocess(self.inputs[0], in_)
        out = self.forward_all(**{self.inputs[0]: caffe_in})
        predictions = out[self.outputs[0]]
        if oversample:
            predictions = predictions.reshape((len(predictions) // 10, 10, -1))
            predictions = predictions.mean(1)
        return predictions
