"""Python layers of tests/data/pycaffe_scripts/python_layer_behaviour.py (run by real Caffe
and by caffe-compat) and of tests/layers/test_python_layer.py: written against ``import caffe``."""
import caffe

KINDS = {"RuntimeError": RuntimeError, "ValueError": ValueError, "KeyError": KeyError,
         "ZeroDivisionError": ZeroDivisionError}


class Raising(caffe.Layer):
    """param_str "METHOD:EXCEPTION": raise EXCEPTION from METHOD."""

    def _maybe(self, where):
        method, kind = self.param_str.split(":")
        if method == where:
            raise KINDS[kind]("raised in " + where)

    def setup(self, bottom, top):
        self._maybe("setup")

    def reshape(self, bottom, top):
        self._maybe("reshape")
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        self._maybe("forward")
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom):
        self._maybe("backward")
        bottom[0].diff[...] = top[0].diff


class AffineDiff(caffe.Layer):
    """Backward reads the blobs as they are: d bottom = 3 * d top + bottom data."""

    def setup(self, bottom, top):
        pass

    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)

    def forward(self, bottom, top):
        top[0].data[...] = 2 * bottom[0].data

    def backward(self, top, propagate_down, bottom):
        if propagate_down[0]:
            bottom[0].diff[...] = 3 * top[0].diff + bottom[0].data
