"""Two pycaffe behaviours legacy scripts rely on, written against `import caffe`:

1. An exception raised by a Python layer's ``setup``/``reshape``/``forward``/``backward``
   reaches the script with its own type and message (a legacy ``except RuntimeError:``
   around ``caffe.Net(...)`` catches a RuntimeError from ``setup``; a KeyError stays one).
2. ``net.backward()`` without a forward first runs every layer's backward on what the
   blobs hold now (no top data is computed), a Python layer's own ``backward`` included.

    python python_layer_behaviour.py OUT.npz    (run by real Caffe and by `caffe-compat run`)

Recorded: ``raise/<method>/<kind>/type`` and ``.../message`` (the exception as caught),
``raise/<method>/<kind>/stage`` (how far the script got: ``net``, ``forward`` or
``backward``), and ``bwf/...`` every blob's data and diff and every param's diff after a
backward without forward.
"""
import os
import sys
import tempfile

import numpy as np

import caffe

# the layers (Raising, AffineDiff) are tests/data/pylayers/pcb_layers.py, shared with
# tests/layers/test_python_layer.py
PYLAYERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pylayers")

RAISING_NET = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "boom" type: "Python" bottom: "x" top: "y" loss_weight: 1
        python_param { module: "pcb_layers" layer: "Raising" param_str: "%s" } }
"""

# in-place ReLU, a split, a Python layer and two Power layers under the InnerProduct
BWF_NET = """force_backward: true
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
  inner_product_param { num_output: 2 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "py" type: "Python" bottom: "ip" top: "p"
  python_param { module: "pcb_layers" layer: "AffineDiff" } }
layer { name: "a" type: "Power" bottom: "p" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "p" top: "b" power_param { shift: 1 } }
"""

CASES = [(m, k) for m in ("setup", "reshape", "forward", "backward")
         for k in ("RuntimeError", "ValueError", "KeyError", "ZeroDivisionError")]


def write(folder, name, text):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def raising(folder, out):
    for method, kind in CASES:
        path = write(folder, "raise_%s_%s.prototxt" % (method, kind), RAISING_NET % (method + ":" + kind))
        stage, caught = "net", None
        try:
            net = caffe.Net(path, caffe.TEST)
            stage = "forward"
            net.forward(x=np.ones((2, 3), np.float32))
            stage = "backward"
            net.backward()
            stage = "done"
        except Exception as e:  # the script's own handler, as a legacy script's
            caught = e
        key = "raise/%s/%s/" % (method, kind)
        out[key + "stage"] = np.array(stage)
        out[key + "type"] = np.array(type(caught).__name__ if caught is not None else "")
        # KeyError's str() is the repr of its argument
        out[key + "message"] = np.array(str(caught.args[0]) if caught is not None and caught.args else "")


def backward_without_forward(folder, out):
    net = caffe.Net(write(folder, "bwf.prototxt", BWF_NET), caffe.TEST)
    rng = np.random.RandomState(3)
    net.params["ip"][0].data[...] = rng.randn(2, 3)
    net.params["ip"][1].data[...] = rng.randn(2)
    for name, blob in net.blobs.items():   # every blob's data and diff set by hand, no forward
        blob.data[...] = rng.randn(*blob.data.shape)
        blob.diff[...] = rng.randn(*blob.data.shape)
    before = {name: blob.data.copy() for name, blob in net.blobs.items()}
    grads = net.backward()
    out["bwf/returned"] = np.array(sorted(grads))
    for name, blob in net.blobs.items():
        out["bwf/blob/%s/data" % name] = blob.data.copy()
        out["bwf/blob/%s/diff" % name] = blob.diff.copy()
        out["bwf/blob/%s/data_unchanged" % name] = np.array(bool((blob.data == before[name]).all()))
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out["bwf/param/%s/%d/diff" % (name, i)] = b.diff.copy()


def main(out_path):
    caffe.set_mode_cpu()
    folder = tempfile.mkdtemp()
    sys.path.insert(0, PYLAYERS)
    out = {}
    raising(folder, out)
    backward_without_forward(folder, out)
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
