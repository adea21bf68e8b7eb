"""Record Caffe's HDF5 snapshots for tests/weights/test_hdf5.py.  Runs under the Caffe oracle:

    ../shared/tools/caffe-oracle/py tests/golden/make_hdf5.py

The oracle must be built with HDF5 (its install.sh does: -DUSE_HDF5=ON).  One SGD run with
``snapshot_format: HDF5`` on a small net (a BatchNorm, two layers sharing a weight by
``param { name }``, multistep learning rate so that ``current_step`` matters), fed the same
batch every pass through Input layers.  No weight decay: the oracle's fork does not mask
BatchNorm's statistics from the solver as BVLC master does (their lr_mult stays 1, so decay
would shrink them); without decay their diffs, and so their history entries, stay zero, as in
BVLC master, while Caffe's history still has slots for them.  tests/golden/hdf5/sgd_hdf5.npz holds:

- ``prototxt``, ``solver``: the net and the solver text (without net/snapshot_prefix fields)
- ``input/data``, ``input/label``: the batch;  ``steps``: total steps, ``state_iter``: the
  snapshot's iteration
- ``param/<layer>/<i>/<k>``: blob ``i`` of the layer after ``k`` steps (k = 0, state_iter, steps)
- ``caffemodel_h5``, ``solverstate_h5``: the bytes of Caffe's ``snap_iter_<state_iter>``
  ``.caffemodel.h5`` and ``.solverstate.h5`` (written in the working directory with the
  relative prefix ``snap``, so ``learned_net`` is ``snap_iter_<state_iter>.caffemodel.h5``)
- ``caffemodel``: Caffe's ``net.save`` (binaryproto) of the same weights at ``state_iter``

``--check DIR`` (used by tests/weights/test_hdf5.py when the oracle is present): restore the
caffe-compat ``DIR/snap_iter_<k>.solverstate.h5`` in Caffe, step to ``steps``, and load
``DIR/ours.caffemodel.h5`` into a fresh net with ``load_hdf5``; both written to
``DIR/caffe_check.npz`` (``resumed/<layer>/<i>``, ``loaded/<layer>/<i>``).
"""
import os
import shutil
import sys
import tempfile

import numpy as np

import caffe  # the oracle's pycaffe

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "hdf5", "sgd_hdf5.npz")
STEPS = 6
STATE_ITER = 3

NET = """name: "hdf5net"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 } }
layer { name: "bn1" type: "BatchNorm" bottom: "ip1" top: "ip1" }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "shared_w" }
  inner_product_param { num_output: 5 bias_term: false } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3" param { name: "shared_w" }
  inner_product_param { num_output: 5 bias_term: false } }
layer { name: "ip4" type: "InnerProduct" bottom: "ip3" top: "ip4"
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip4" bottom: "label" top: "loss" }
"""

SOLVER = """base_lr: 0.05
momentum: 0.9
lr_policy: "multistep"
stepvalue: 2
stepvalue: 4
gamma: 0.5
max_iter: 6
snapshot_format: HDF5
type: "SGD"
random_seed: 1
"""


def _solver(workdir, net_path):
    sp = os.path.join(workdir, "solver.prototxt")
    with open(sp, "w") as f:
        f.write('net: "%s"\nsnapshot_prefix: "snap"\n%s' % (net_path, SOLVER))
    return caffe.get_solver(sp)


def _feed(net, g):
    net.blobs["data"].data[...] = g["input/data"]
    net.blobs["label"].data[...] = g["input/label"]


def _params(net):
    return {(name, i): b.data.copy() for name, blobs in net.params.items() for i, b in enumerate(blobs)}


def record():
    rng = np.random.RandomState(5)
    work = tempfile.mkdtemp()
    cwd = os.getcwd()
    try:
        os.chdir(work)
        net_path = os.path.join(work, "net.prototxt")
        with open(net_path, "w") as f:
            f.write(NET)
        s = _solver(work, net_path)
        out = {"prototxt": np.array(NET), "solver": np.array(SOLVER), "steps": np.array(STEPS),
               "state_iter": np.array(STATE_ITER),
               "input/data": rng.randn(4, 6).astype(np.float32),
               "input/label": np.array([0, 1, 2, 1], np.float32)}
        for name, blobs in s.net.params.items():  # ip3's weight is ip2's (shared)
            if name != "bn1":
                for b in blobs:
                    b.data[...] = rng.randn(*b.data.shape) * 0.5
        _feed(s.net, out)
        for (name, i), v in _params(s.net).items():
            out["param/%s/%d/0" % (name, i)] = v
        s.step(STATE_ITER)
        s.snapshot()
        s.net.save(os.path.join(work, "w.caffemodel"))
        for (name, i), v in _params(s.net).items():
            out["param/%s/%d/%d" % (name, i, STATE_ITER)] = v
        for key, fname in (("caffemodel_h5", "snap_iter_%d.caffemodel.h5" % STATE_ITER),
                           ("solverstate_h5", "snap_iter_%d.solverstate.h5" % STATE_ITER),
                           ("caffemodel", "w.caffemodel")):
            with open(fname, "rb") as f:
                out[key] = np.frombuffer(f.read(), np.uint8)
        s.step(STEPS - STATE_ITER)
        for (name, i), v in _params(s.net).items():
            out["param/%s/%d/%d" % (name, i, STEPS)] = v
    finally:
        os.chdir(cwd)
        shutil.rmtree(work)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    np.savez_compressed(OUT, **out)
    print("wrote", OUT)


def check(workdir):
    """Caffe restores caffe-compat's HDF5 snapshot and loads its HDF5 weights."""
    g = np.load(OUT)
    net_path = os.path.join(workdir, "net.prototxt")
    with open(net_path, "w") as f:
        f.write(str(g["prototxt"]))
    cwd = os.getcwd()
    out = {}
    try:
        os.chdir(workdir)
        s = _solver(workdir, net_path)
        _feed(s.net, g)
        s.restore("snap_iter_%d.solverstate.h5" % int(g["state_iter"]))
        out["iter"] = np.array(s.iter)
        s.step(int(g["steps"]) - s.iter)
        for (name, i), v in _params(s.net).items():
            out["resumed/%s/%d" % (name, i)] = v
        net = caffe.Net(net_path, caffe.TEST)
        net.load_hdf5("ours.caffemodel.h5")
        for (name, i), v in _params(net).items():
            out["loaded/%s/%d" % (name, i)] = v
    finally:
        os.chdir(cwd)
    np.savez(os.path.join(workdir, "caffe_check.npz"), **out)


if __name__ == "__main__":
    caffe.set_mode_cpu()
    if len(sys.argv) == 3 and sys.argv[1] == "--check":
        check(sys.argv[2])
    else:
        record()
