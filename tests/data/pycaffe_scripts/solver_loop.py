"""A pycaffe training loop, written against `import caffe`: data fed through
`solver.net.blobs[...]` before each `solver.step(1)`, losses and weights read back from
the nets, test nets sharing the trained weights, snapshot/restore, `get_solver` with
another solver type, callbacks, `iter_size`, and `solve()`.

    python solver_loop.py OUT.npz        (run by real Caffe and by `caffe-compat run`)
"""
import os
import sys
import tempfile

import numpy as np

import caffe

NET = """name: "mlp"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc"
  include { phase: TEST } }
"""

SOLVER = """net: "%(net)s"
test_iter: 1
test_interval: 3
base_lr: 0.1
momentum: 0.9
weight_decay: 0.01
lr_policy: "step"
gamma: 0.5
stepsize: 2
display: 0
max_iter: %(max_iter)d
snapshot_prefix: "%(prefix)s"
random_seed: 1
%(extra)s
"""


def batch(rng):
    x = rng.randn(4, 6).astype(np.float32)
    y = rng.randint(0, 3, size=4).astype(np.float32)
    return x, y


def init_weights(net, rng):
    for name, blobs in net.params.items():
        for b in blobs:
            b.data[...] = rng.randn(*b.data.shape) * 0.5


def record_params(net, out, prefix):
    for name, blobs in net.params.items():
        for i, b in enumerate(blobs):
            out["%s/%s/%d/data" % (prefix, name, i)] = b.data.copy()
            out["%s/%s/%d/diff" % (prefix, name, i)] = b.diff.copy()


def write(tmp, name, text):
    path = os.path.join(tmp, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def main(out_path):
    rng = np.random.RandomState(11)
    tmp = tempfile.mkdtemp()
    net_path = write(tmp, "mlp.prototxt", NET)
    out = {}
    caffe.set_mode_cpu()

    # --- SGD, fed through the blobs
    sgd_path = write(tmp, "sgd_solver.prototxt", SOLVER % dict(
        net=net_path, max_iter=100, prefix=os.path.join(tmp, "sgd"), extra=""))
    solver = caffe.SGDSolver(sgd_path)
    out["train_blobs"] = np.array(list(solver.net.blobs.keys()))
    out["test_blobs"] = np.array(list(solver.test_nets[0].blobs.keys()))
    out["test_outputs"] = np.array(list(solver.test_nets[0].outputs))
    init_weights(solver.net, rng)
    record_params(solver.net, out, "sgd/init")
    xt, yt = batch(rng)
    for it in range(5):
        x, y = batch(rng)
        solver.net.blobs["data"].data[...] = x
        solver.net.blobs["label"].data[...] = y
        solver.step(1)
        out["sgd/iter/%d" % it] = np.array(solver.iter)
        out["sgd/loss/%d" % it] = solver.net.blobs["loss"].data.copy()
        out["sgd/ip2/%d" % it] = solver.net.blobs["ip2"].data.copy()
        out["sgd/ip1_diff/%d" % it] = solver.net.blobs["ip1"].diff.copy()
        record_params(solver.net, out, "sgd/step%d" % it)
        test = solver.test_nets[0]
        test.blobs["data"].data[...] = xt
        test.blobs["label"].data[...] = yt
        r = test.forward()
        out["sgd/test_acc/%d" % it] = np.array(r["acc"]).copy()
        out["sgd/test_loss/%d" % it] = np.array(r["loss"]).copy()
        out["sgd/test_w/%d" % it] = test.params["ip2"][0].data.copy()
    # the same data for several steps (Input blobs keep what was written)
    solver.step(2)
    record_params(solver.net, out, "sgd/repeat")
    solver.snapshot()
    state = os.path.join(tmp, "sgd_iter_%d.solverstate" % solver.iter)
    out["snapshot_files"] = np.array(sorted(f for f in os.listdir(tmp) if f.startswith("sgd_iter")))
    solver.step(2)
    record_params(solver.net, out, "sgd/after_snapshot")
    solver.restore(state)
    out["restored_iter"] = np.array(solver.iter)
    solver.step(2)
    record_params(solver.net, out, "sgd/after_restore")

    # --- get_solver follows the file's type; callbacks; iter_size
    adam_path = write(tmp, "adam_solver.prototxt", SOLVER % dict(
        net=net_path, max_iter=100, prefix=os.path.join(tmp, "adam"),
        extra='type: "Adam"\nmomentum2: 0.99\ndelta: 1e-6\niter_size: 2'))
    adam = caffe.get_solver(adam_path)
    out["adam_class"] = np.array(type(adam).__name__)
    init_weights(adam.net, rng)
    events = []
    grads = []

    def on_start():
        events.append(("start", adam.iter))

    def on_gradients_ready():
        events.append(("ready", adam.iter))
        grads.append(adam.net.params["ip1"][0].diff.copy())

    adam.add_callback(on_start, on_gradients_ready)
    for it in range(3):
        x, y = batch(rng)
        adam.net.blobs["data"].data[...] = x
        adam.net.blobs["label"].data[...] = y
        adam.step(1)
        out["adam/loss/%d" % it] = adam.net.blobs["loss"].data.copy()
        record_params(adam.net, out, "adam/step%d" % it)
    out["adam/events"] = np.array(["%s%d" % e for e in events])
    out["adam/grads"] = np.array(grads)

    # --- solve() to max_iter with a Nesterov solver
    nes_path = write(tmp, "nesterov_solver.prototxt", SOLVER % dict(
        net=net_path, max_iter=4, prefix=os.path.join(tmp, "nes"), extra='type: "Nesterov"'))
    nes = caffe.NesterovSolver(nes_path)
    init_weights(nes.net, rng)
    x, y = batch(rng)
    nes.net.blobs["data"].data[...] = x
    nes.net.blobs["label"].data[...] = y
    nes.solve()
    out["nes/iter"] = np.array(nes.iter)
    record_params(nes.net, out, "nes/final")
    np.savez(out_path, **out)


if __name__ == "__main__":
    main(sys.argv[1])
