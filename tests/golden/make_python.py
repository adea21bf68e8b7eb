"""Golden numbers for Python layers from real Caffe (BVLC pycaffe):

    ../shared/tools/caffe-oracle/py tests/golden/make_python.py

Runs nets of the legacy layers in tests/data/pylayers/cc_pylayers.py (the same module
caffe-compat's shim runs) and records blobs and diffs with tests/golden/oracle.py.
"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "data", "pylayers"))

from oracle import record  # noqa: E402

OUT = os.path.join(HERE, "python")


def py(name, layer, bottoms, tops, param_str="", extra=""):
    b = " ".join('bottom: "%s"' % x for x in bottoms)
    t = " ".join('top: "%s"' % x for x in tops)
    ps = ' param_str: "%s"' % param_str if param_str else ""
    return ('layer { name: "%s" type: "Python" %s %s python_param { module: "cc_pylayers" '
            'layer: "%s"%s } %s }\n' % (name, b, t, layer, ps, extra))


def inp(name, *dims):
    return ('layer { name: "%s" type: "Input" top: "%s" input_param { shape { %s } } }\n'
            % (name, name, " ".join("dim: %d" % d for d in dims)))


# Affine -> learnable channel scale -> Euclidean loss, plus a data-dependent top (a split)
CHAIN = ('name: "py_chain" force_backward: true\n' + inp("x", 2, 3, 4) + inp("t", 2, 3, 4)
         + py("aff", "AffineLayer", ["x"], ["y"], "{'a': 2.0, 'b': 1.0}")
         + py("scale", "ChannelScaleLayer", ["y"], ["z"])
         + py("loss", "EuclideanLossLayer", ["z", "t"], ["loss"], extra="loss_weight: 1")
         + py("pos", "PositiveLayer", ["y"], ["pos"]))

# 4-D blobs, TEST phase, a loss weight of 2
FOUR_D = ('name: "py_4d" force_backward: true\n' + inp("x", 2, 3, 2, 2) + inp("t", 2, 3, 2, 2)
          + py("aff", "AffineLayer", ["x"], ["y"], "{'a': -0.5, 'b': 0.25}")
          + py("scale", "ChannelScaleLayer", ["y"], ["z"])
          + py("loss", "EuclideanLossLayer", ["z", "t"], ["loss"], extra="loss_weight: 2"))

if __name__ == "__main__":
    record(os.path.join(OUT, "py_chain.npz"), CHAIN, seed=1, phase="TRAIN")
    record(os.path.join(OUT, "py_4d.npz"), FOUR_D, seed=2, phase="TEST")
