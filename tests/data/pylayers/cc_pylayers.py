"""Legacy pycaffe-style Python layers used by caffe-compat's tests.

They are written the way Caffe users write them (numpy in place on blobs, param_str
parsed by the layer) and run unchanged in real Caffe (tests/golden/make_python.py) and
in caffe-compat's shim.  Keep them compatible with numpy 1.x and Python 3.9+.
"""
import ast

import numpy as np

import caffe
from caffe.proto import caffe_pb2  # noqa: F401  (legacy modules import the schema too)

CAFFE_MODULE = caffe.__name__


class AffineLayer(caffe.Layer):
    """y = a * x + b, with a and b from param_str "{'a': 2.0, 'b': 1.0}"."""

    def setup(self, bottom, top):
        if len(bottom) != 1 or len(top) != 1:
            raise Exception("AffineLayer takes one bottom and one top")
        params = ast.literal_eval(self.param_str) if self.param_str else {}
        self.a = float(params.get("a", 1.0))
        self.b = float(params.get("b", 0.0))

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = self.a * bottom[0].data + self.b

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = self.a * top[0].diff


class ChannelScaleLayer(caffe.Layer):
    """y[n, c, ...] = w[c] * x[n, c, ...] with a learnable blob w of shape (C,)."""

    def setup(self, bottom, top):
        self.blobs.add_blob(bottom[0].channels)
        self.blobs[0].data[...] = 1.0

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def _w(self, x):
        return self.blobs[0].data.reshape((1, -1) + (1,) * (x.ndim - 2))

    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data * self._w(bottom[0].data)

    def backward(self, top, propagate_down, bottom):
        x, g = bottom[0].data, top[0].diff
        axes = (0,) + tuple(range(2, x.ndim))
        self.blobs[0].diff[...] = (g * x).sum(axis=axes)
        if propagate_down[0]:
            bottom[0].diff[...] = g * self._w(x)


class EuclideanLossLayer(caffe.Layer):
    """loss = sum((p - t)^2) / (2 num); gradients scaled by the top's diff (loss weight)."""

    def setup(self, bottom, top):
        if len(bottom) != 2:
            raise Exception("EuclideanLossLayer needs a prediction and a target")

    def reshape(self, bottom, top):
        if bottom[0].count != bottom[1].count:
            raise Exception("prediction and target must have the same count")
        self.residual = np.zeros_like(bottom[0].data, dtype=np.float32)
        top[0].reshape(1)

    def forward(self, bottom, top):
        self.residual[...] = bottom[0].data - bottom[1].data.reshape(bottom[0].data.shape)
        top[0].data[...] = np.sum(self.residual ** 2) / bottom[0].num / 2.0

    def backward(self, top, propagate_down, bottom):
        scale = top[0].diff[0] / bottom[0].num
        for i, sign in ((0, 1.0), (1, -1.0)):
            if propagate_down[i]:
                bottom[i].diff[...] = (sign * scale * self.residual).reshape(bottom[i].diff.shape)


class PositiveLayer(caffe.Layer):
    """The positive entries of the bottom, flattened: the top's length depends on the data."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(int((bottom[0].data > 0).sum()))

    def forward(self, bottom, top):
        self.mask = bottom[0].data > 0
        top[0].data[...] = bottom[0].data[self.mask]

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = 0
        bottom[0].diff[self.mask] = top[0].diff


class PhaseLayer(caffe.Layer):
    """py-faster-rcnn style: reads param_str_ and compares str(self.phase) with 'TRAIN'."""

    def setup(self, bottom, top):
        self.cfg_key = str(self.phase)  # 'TRAIN' or 'TEST' in the fork
        self.extra = ast.literal_eval(self.param_str_) if self.param_str_ else {}
        top[0].reshape(3)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        top[0].data[0] = 1.0 if self.cfg_key == "TRAIN" else 2.0
        top[0].data[1] = 1.0 if self.phase == caffe.TRAIN else 2.0
        top[0].data[2] = float(self.extra.get("k", 0))

    def backward(self, top, propagate_down, bottom):
        pass


class YamlDataLayer(caffe.Layer):
    """A data layer (no bottoms) reading its shape and fill value from YAML param_str."""

    def setup(self, bottom, top):
        import yaml

        params = yaml.safe_load(self.param_str)
        self.shape = tuple(params["shape"])
        self.value = float(params.get("value", 0.0))
        self.calls = 0
        top[0].reshape(*self.shape)

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        self.calls += 1
        top[0].data[...] = self.value * self.calls

    def backward(self, top, propagate_down, bottom):
        pass


class InPlaceDoubleLayer(caffe.Layer):
    """Doubles its bottom in place: writes bottom data only (the top is the same blob)."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        pass

    def forward(self, bottom, top):
        bottom[0].data[...] *= 2.0

    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] *= 2.0  # top diff and bottom diff are one array


class FailingLayer(caffe.Layer):
    def setup(self, bottom, top):
        raise ValueError("bad param_str: %r" % self.param_str)

    def forward(self, bottom, top):
        pass


class LazyImportLayer(caffe.Layer):
    """Imports caffe inside a method, as some legacy layers do."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        import caffe as c2
        from caffe.proto import caffe_pb2 as pb

        top[0].data[...] = bottom[0].data + (1.0 if hasattr(c2, "Layer") and pb.TRAIN == 0 else 0.0)
