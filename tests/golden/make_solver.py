"""Record Caffe's solver trajectories for tests/solver/test_solver.py.  Runs under the Caffe oracle:

    ../shared/tools/caffe-oracle/py tests/golden/make_solver.py

Each case runs in its own subprocess (a failed Caffe CHECK aborts the process; glog's lines
are captured from that subprocess's stderr).  Per case the .npz in tests/golden/solver/ holds:

- ``prototxt``: the net as caffe-compat builds it (data through Input layers ``data``/``label``)
- ``solver``: the solver text without any net field;  ``steps``: how many steps were run
- ``param/<layer>/<i>/<k>``: the layer's blob ``i`` after ``k`` steps (``k = 0``: initial)
- ``input/<blob>``: data fed every pass, or ``input/<blob>/<step>/<pass>`` when the case
  feeds different batches to the ``iter_size`` passes of a step (Caffe gets them from a
  Python data layer)
- ``lr``, ``loss``: Caffe's logged "Iteration N, lr = X" and "Iteration N, loss = X" values
- ``caffe_state``/``caffe_model`` (some cases): Caffe's own .solverstate and .caffemodel
  bytes after ``state_iter`` steps, to test restoring a Caffe snapshot
"""
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "solver")
STEPS = 5

MLP = """name: "mlp"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 5 } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { lr_mult: 0.5 decay_mult: 2 } param { lr_mult: 1 decay_mult: 0 }
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

# ip1's weights frozen (lr_mult 0), the loss weighted by 2
FROZEN = MLP.replace("param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }",
                     "param { lr_mult: 0 } param { lr_mult: 2 decay_mult: 0 }").replace(
    'top: "loss" }', 'top: "loss" loss_weight: 2 }')

CONV = """name: "convnet"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 2 dim: 5 dim: 5 } shape { dim: 2 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  convolution_param { num_output: 3 kernel_size: 3 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "ip" type: "InnerProduct" bottom: "conv1" top: "ip"
  inner_product_param { num_output: 3 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""

# Caffe side of iter_size cases: a Python layer yields a new batch on every forward
PYDATA = 'layer { name: "data" type: "Python" top: "data" top: "label" ' \
         'python_param { module: "make_solver" layer: "BatchLayer" param_str: \'%s\' } }\n'

BASE = "lr_policy: \"fixed\" display: 1 max_iter: 100\n"

CASES = {
    "sgd_step": (MLP, 'type: "SGD" lr_policy: "step" stepsize: 2 gamma: 0.5 base_lr: 0.2 '
                      'momentum: 0.9 weight_decay: 0.01 display: 1 max_iter: 100', {"state_iter": 3}),
    "sgd_iter_size": (MLP, BASE + 'type: "SGD" base_lr: 0.1 momentum: 0.9 weight_decay: 0.02 iter_size: 2',
                      {"pydata": True}),
    "sgd_l1": (MLP, BASE + 'base_lr: 0.1 momentum: 0.5 weight_decay: 0.05 regularization_type: "L1"', {}),
    "sgd_clip": (MLP, BASE + 'base_lr: 0.3 momentum: 0.9 clip_gradients: 0.2', {}),
    "sgd_frozen": (FROZEN, BASE + 'base_lr: 0.1 momentum: 0.9 weight_decay: 0.01', {}),
    "sgd_conv": (CONV, 'type: "SGD" lr_policy: "step" stepsize: 3 gamma: 0.1 base_lr: 0.1 '
                       'momentum: 0.9 weight_decay: 0.005 display: 1 max_iter: 100', {}),
    "nesterov": (MLP, BASE + 'type: "Nesterov" base_lr: 0.1 momentum: 0.9 weight_decay: 0.01', {}),
    "adagrad": (MLP, BASE + 'type: "AdaGrad" base_lr: 0.1 delta: 1e-6 weight_decay: 0.001', {}),
    "rmsprop": (MLP, BASE + 'type: "RMSProp" base_lr: 0.01 rms_decay: 0.9 delta: 1e-6 '
                            'weight_decay: 0.001', {}),
    "adadelta": (MLP, 'type: "AdaDelta" lr_policy: "fixed" base_lr: 1.0 momentum: 0.95 '
                      'delta: 1e-6 weight_decay: 0.001 display: 1 max_iter: 100', {}),
    "adam": (MLP, BASE + 'type: "Adam" base_lr: 0.01 momentum: 0.9 momentum2: 0.999 '
                         'delta: 1e-8 weight_decay: 0.001', {"state_iter": 3}),
    "adam_iter_size": (CONV, BASE + 'type: "Adam" base_lr: 0.02 iter_size: 3 clip_gradients: 1.0',
                       {"pydata": True}),
    "lr_multistep": (MLP, 'lr_policy: "multistep" stepvalue: 1 stepvalue: 3 stepvalue: 3 '
                          'gamma: 0.5 base_lr: 0.3 display: 1 max_iter: 100', {}),
    "lr_poly": (MLP, 'lr_policy: "poly" power: 2 base_lr: 0.3 display: 1 max_iter: 8', {}),
    "lr_inv": (MLP, 'lr_policy: "inv" gamma: 0.5 power: 0.75 base_lr: 0.3 display: 1 max_iter: 100', {}),
    "lr_exp": (MLP, 'lr_policy: "exp" gamma: 0.8 base_lr: 0.3 display: 1 max_iter: 100', {}),
    "lr_sigmoid": (MLP, 'lr_policy: "sigmoid" gamma: -1 stepsize: 2 base_lr: 0.3 display: 1 '
                        'max_iter: 100', {}),
}


def batch(shape, n_classes, seed):
    """The batch a Python data layer yields on its ``seed``-th forward (also used by tests)."""
    rng = np.random.RandomState(1000 + seed)
    data = rng.randn(*shape).astype(np.float32)
    label = rng.randint(0, n_classes, size=shape[0]).astype(np.float32)
    return data, label


try:
    import caffe  # noqa: E402  (the oracle's pycaffe; absent when imported by pytest)

    class BatchLayer(caffe.Layer):
        """A data layer that yields ``batch(shape, classes, k)`` on its k-th forward."""

        def setup(self, bottom, top):
            p = json.loads(self.param_str)
            self.shape, self.classes, self.k = tuple(p["shape"]), p["classes"], 0

        def reshape(self, bottom, top):
            top[0].reshape(*self.shape)
            top[1].reshape(self.shape[0])

        def forward(self, bottom, top):
            top[0].data[...], top[1].data[...] = batch(self.shape, self.classes, self.k)
            self.k += 1

        def backward(self, top, propagate_down, bottom):
            pass
except ImportError:  # pragma: no cover
    caffe = None


def input_shapes(net_text):
    dims = re.findall(r"shape \{((?: dim: \d+)+) \}", net_text)
    return [tuple(int(d) for d in re.findall(r"\d+", s)) for s in dims]


def run_case(name, out_path):
    """Child process: run one case in Caffe and write its npz."""
    import caffe

    caffe.set_mode_cpu()
    net_text, solver_text, opts = CASES[name]
    shapes = input_shapes(net_text)
    n_classes = 3
    caffe_net = net_text
    if opts.get("pydata"):
        lines = net_text.split("\n")
        i = next(k for k, l in enumerate(lines) if 'type: "Input"' in l)
        cfg = json.dumps({"shape": list(shapes[0]), "classes": n_classes})
        caffe_net = "\n".join(lines[:i] + [PYDATA % cfg] + lines[i + 2:])
    tmp = tempfile.mkdtemp()
    net_path = os.path.join(tmp, "net.prototxt")
    with open(net_path, "w") as f:
        f.write(caffe_net)
    solver_path = os.path.join(tmp, "solver.prototxt")
    with open(solver_path, "w") as f:
        f.write('net: "%s"\n%s\nsnapshot_prefix: "%s/snap"\n' % (net_path, solver_text, tmp))
    solver = caffe.get_solver(solver_path)
    net = solver.net
    rng = np.random.RandomState(sum(map(ord, name)))
    out = {"prototxt": np.array(net_text), "solver": np.array(solver_text), "steps": np.array(STEPS)}
    for lname, blobs in net.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = rng.randn(*b.data.shape) * 0.5
            out["param/%s/%d/0" % (lname, i)] = b.data.copy()
    if opts.get("pydata"):
        iter_size = int(re.search(r"iter_size: (\d+)", solver_text).group(1))
        k = 0
        for s in range(STEPS):
            for p in range(iter_size):
                d, l = batch(shapes[0], n_classes, k)
                out["input/data/%d/%d" % (s, p)] = d
                out["input/label/%d/%d" % (s, p)] = l
                k += 1
    else:
        data = rng.randn(*shapes[0]).astype(np.float32)
        label = rng.randint(0, n_classes, size=shapes[1]).astype(np.float32)
        net.blobs["data"].data[...] = data
        net.blobs["label"].data[...] = label
        out["input/data"], out["input/label"] = data, label
    for s in range(1, STEPS + 1):
        solver.step(1)
        for lname, blobs in net.params.items():
            for i, b in enumerate(blobs):
                out["param/%s/%d/%d" % (lname, i, s)] = b.data.copy()
        if opts.get("state_iter") == s:
            solver.snapshot()
            with open(os.path.join(tmp, "snap_iter_%d.solverstate" % s), "rb") as f:
                out["caffe_state"] = np.frombuffer(f.read(), np.uint8)
            with open(os.path.join(tmp, "snap_iter_%d.caffemodel" % s), "rb") as f:
                out["caffe_model"] = np.frombuffer(f.read(), np.uint8)
            out["state_iter"] = np.array(s)
    np.savez_compressed(out_path, **out)


def main():
    os.makedirs(OUT, exist_ok=True)
    names = sys.argv[1:] or list(CASES)
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    for name in names:
        path = os.path.join(OUT, name + ".npz")
        tmp_npz = path + ".tmp.npz"
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", name, tmp_npz],
                           env=env, stderr=subprocess.PIPE, universal_newlines=True)
        if r.returncode != 0:
            sys.stderr.write(r.stderr[-3000:])
            raise SystemExit("case %s failed (rc %d)" % (name, r.returncode))
        lrs = [(int(i), float(v)) for i, v in re.findall(r"Iteration (\d+), lr = (\S+)", r.stderr)]
        losses = [(int(i), float(v)) for i, v in re.findall(r"Iteration (\d+), loss = (\S+)", r.stderr)]
        assert [i for i, _ in lrs] == list(range(STEPS)), lrs
        assert [i for i, _ in losses] == list(range(STEPS)), losses
        data = dict(np.load(tmp_npz))
        os.unlink(tmp_npz)
        data["lr"] = np.array([v for _, v in lrs])
        data["loss"] = np.array([v for _, v in losses])
        np.savez_compressed(path, **data)
        print("wrote", path, "lr:", data["lr"].tolist(), file=sys.stderr)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        run_case(sys.argv[2], sys.argv[3])
    else:
        main()
