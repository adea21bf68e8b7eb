"""Golden blobs and diffs of the loss layers from real Caffe.  Run from the repo root:

    ../shared/tools/caffe-oracle/py tests/golden/make_loss.py

Writes tests/golden/loss/*.npz (layers whose semantics the oracle shares with BVLC master)
and tests/golden/loss/infogain_probs/*.npz: the oracle's InfogainLoss predates master's
internal softmax (it takes probabilities), so tests/layers/test_layers_loss.py compares those
through softmax(log p) = p and the softmax Jacobian instead of running them as nets.
Each case runs in its own subprocess (a failed Caffe CHECK aborts the process).
"""
import os
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "loss")
LEGACY = os.path.join(OUT, "infogain_probs")
H_SOURCE = "tests/golden/loss/infogain_probs/H.binaryproto"  # relative to the repo root


def net(inputs, layer, *, force_backward=True):
    """Net text: one Input layer per bottom (name -> shape), then the layer under test."""
    lines = ['name: "golden"'] + (["force_backward: true"] if force_backward else [])
    for name, shape in inputs.items():
        dims = " ".join("dim: %d" % d for d in shape)
        lines.append('layer { name: "%s" type: "Input" top: "%s" input_param { shape { %s } } }'
                     % (name, name, dims))
    lines.append(layer)
    return "\n".join(lines) + "\n"


def softmax(x, axis=1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def acc_master(x, lab, k):
    """BVLC master: correct when fewer than k other classes score >= the true class."""
    return [(row >= row[int(y)]).sum() - 1 < k for row, y in zip(x, lab)]


def acc_oracle(x, lab, k):
    """The oracle's partial_sort on (score, index) pairs, descending."""
    out = []
    for row, y in zip(x, lab):
        order = sorted(range(len(row)), key=lambda j: (row[j], j), reverse=True)
        out.append(int(y) in order[:k])
    return out


def cases():
    rng = np.random.RandomState(1234)
    f32 = np.float32
    C = {}

    # ---------------------------------------------------------------- SoftmaxWithLoss
    x = rng.randn(4, 5).astype(f32) * 2
    lab = np.array([0, 3, 4, 1], f32)
    C["softmax_basic"] = (net({"x": (4, 5), "label": (4,)},
                              'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                              'top: "loss" }'), {"x": x, "label": lab}, {})
    xs = rng.randn(2, 3, 2, 3).astype(f32)
    labs = np.array([[[[0, 255, 2], [1, 1, 255]]], [[[2, 0, 255], [255, 1, 0]]]], f32)
    for mode in ("FULL", "VALID", "BATCH_SIZE", "NONE"):
        C["softmax_ignore_%s" % mode.lower()] = (
            net({"x": (2, 3, 2, 3), "label": (2, 1, 2, 3)},
                'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" '
                'loss_param { ignore_label: 255 normalization: %s } }' % mode),
            {"x": xs, "label": labs}, {})
    for flag in ("false", "true"):
        C["softmax_normalize_%s" % flag] = (
            net({"x": (2, 3, 2, 3), "label": (2, 1, 2, 3)},
                'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" '
                'loss_param { ignore_label: 255 normalize: %s } }' % flag),
            {"x": xs, "label": labs}, {})
    C["softmax_normalize_false_normalization_full"] = (
        net({"x": (2, 3, 2, 3), "label": (2, 1, 2, 3)},
            'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" top: "loss" '
            'loss_param { ignore_label: 255 normalize: false normalization: FULL } }'),
        {"x": xs, "label": labs}, {})
    xa = rng.randn(2, 3, 4).astype(f32)
    C["softmax_axis2"] = (net({"x": (2, 3, 4), "label": (2, 3)},
                              'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                              'top: "loss" softmax_param { axis: 2 } }'),
                          {"x": xa, "label": np.array([[0, 3, 1], [2, 2, 3]], f32)}, {})
    C["softmax_axis_neg1"] = (net({"x": (2, 3, 4), "label": (2, 3)},
                                  'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                                  'top: "loss" softmax_param { axis: -1 } loss_param { ignore_label: 3 } }'),
                              {"x": xa, "label": np.array([[0, 3, 1], [2, 3, 3]], f32)}, {})
    # (no golden for the optional prob top: Caffe aborts on it -- the LossLayer adds one
    # default loss_weight for two tops, and explicit weights reach the inner Softmax layer)
    C["softmax_all_ignored"] = (net({"x": (4, 5), "label": (4,)},
                                    'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                                    'top: "loss" loss_param { ignore_label: 2 } }'),
                                {"x": x, "label": np.full(4, 2, f32)}, {})
    xsat = x.copy()
    xsat[0] = [0, 200, 0, 0, 0]     # p(label 0) underflows: Caffe clamps at FLT_MIN
    xsat[1] = [-120, 0, 0, 0, 0]
    C["softmax_saturated"] = (net({"x": (4, 5), "label": (4,)},
                                  'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "x" bottom: "label" '
                                  'top: "loss" }'), {"x": xsat, "label": np.array([0, 0, 4, 1], f32)}, {})

    # ---------------------------------------------------------------- EuclideanLoss
    C["euclidean_basic"] = (net({"a": (3, 4), "b": (3, 4)},
                                'layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" top: "loss" }'),
                            {}, {})
    C["euclidean_reshaped"] = (net({"a": (3, 4), "b": (3, 2, 2)},
                                   'layer { name: "loss" type: "EuclideanLoss" bottom: "a" bottom: "b" '
                                   'top: "loss" }'), {}, {})

    # ---------------------------------------------------------------- SigmoidCrossEntropyLoss
    xsig = (rng.randn(3, 4) * 4).astype(f32)
    xsig[0, 0], xsig[0, 1], xsig[1, 2] = 40.0, -40.0, 0.0
    C["sigmoid_ce"] = (net({"x": (3, 4), "t": (3, 4)},
                           'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" '
                           'top: "loss" }'),
                       {"x": xsig, "t": rng.rand(3, 4).astype(f32)}, {})
    C["sigmoid_ce_binary_4d"] = (net({"x": (2, 2, 1, 3), "t": (2, 6)},
                                     'layer { name: "loss" type: "SigmoidCrossEntropyLoss" bottom: "x" '
                                     'bottom: "t" top: "loss" }'),
                                 {"x": rng.randn(2, 2, 1, 3).astype(f32) * 3,
                                  "t": (rng.rand(2, 6) > 0.5).astype(f32)}, {})

    # ---------------------------------------------------------------- HingeLoss
    xh = rng.randn(4, 5).astype(f32)
    for norm in ("L1", "L2"):
        C["hinge_%s" % norm.lower()] = (
            net({"x": (4, 5), "label": (4,)},
                'layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" top: "loss" '
                'hinge_loss_param { norm: %s } }' % norm),
            {"x": xh, "label": np.array([1, 0, 4, 2], f32)}, {})
    C["hinge_default_4d"] = (net({"x": (3, 2, 1, 2), "label": (3, 1, 1, 1)},
                                 'layer { name: "loss" type: "HingeLoss" bottom: "x" bottom: "label" '
                                 'top: "loss" }'),
                             {"x": rng.randn(3, 2, 1, 2).astype(f32) * 2,
                              "label": np.array([3, 0, 1], f32).reshape(3, 1, 1, 1)}, {})

    # ---------------------------------------------------------------- ContrastiveLoss
    a = (rng.randn(6, 3) * 0.5).astype(f32)
    b = (rng.randn(6, 3) * 0.5).astype(f32)
    b[4] = a[4] + 3.0  # a dissimilar pair far beyond the margin: zero gradient
    y = np.array([1, 0, 0, 1, 0, 0], f32)
    C["contrastive"] = (net({"a": (6, 3), "b": (6, 3), "y": (6,)},
                            'layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" '
                            'top: "loss" contrastive_loss_param { margin: 1.5 } }'),
                        {"a": a, "b": b, "y": y}, {})
    C["contrastive_legacy"] = (net({"a": (6, 3, 1, 1), "b": (6, 3, 1, 1), "y": (6, 1, 1, 1)},
                                   'layer { name: "loss" type: "ContrastiveLoss" bottom: "a" bottom: "b" '
                                   'bottom: "y" top: "loss" contrastive_loss_param { margin: 1.5 '
                                   'legacy_version: true } }'),
                               {"a": a.reshape(6, 3, 1, 1), "b": b.reshape(6, 3, 1, 1),
                                "y": y.reshape(6, 1, 1, 1)}, {})

    # ---------------------------------------------------------------- MultinomialLogisticLoss
    p = softmax(rng.randn(4, 5)).astype(f32)
    p[2, 4] = 0.0  # clamped at kLOG_THRESHOLD: gradient -1/1e-20, as Caffe
    C["multinomial_logistic"] = (net({"p": (4, 5), "label": (4,)},
                                     'layer { name: "loss" type: "MultinomialLogisticLoss" bottom: "p" '
                                     'bottom: "label" top: "loss" }'),
                                 {"p": p, "label": np.array([1, 0, 4, 2], f32)}, {})

    # ---------------------------------------------------------------- Accuracy (no backward)
    xacc = rng.randn(6, 5).astype(f32)
    lacc = np.array([0, 1, 2, 3, 4, 2], f32)
    C["accuracy_top1"] = (net({"x": (6, 5), "label": (6,)},
                              'layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" }',
                              force_backward=False), {"x": xacc, "label": lacc}, {"skip_backward": True})
    # ties that every tie rule decides the same way (asserted below): tied classes above
    # the true class, or tied with it at a higher index
    xt = np.array([[1, 2, 2, 2, 0],     # label 0, 3 better: wrong at k=3
                   [2, 1, 1, 0, 0],     # label 1, tie with class 2 (higher index): wrong at k=2
                   [3, 1, 1, 0, 0],     # label 1: right at k=3
                   [1, 1, 1, 1, 1],     # label 0, all tied: wrong at k=1..4
                   [0, 0, 5, 5, 1],     # label 2 tied with 3 above it: wrong at k=1, right at k=2
                   [4, 3, 3, 3, 3]], f32)  # label 0: right
    lt = np.array([0, 1, 1, 0, 2, 0], f32)
    for k in (1, 2, 3):
        assert acc_master(xt, lt, k) == acc_oracle(xt, lt, k), k
        C["accuracy_ties_top%d" % k] = (
            net({"x": (6, 5), "label": (6,)},
                'layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
                'top: "per_class" accuracy_param { top_k: %d } }' % k, force_backward=False),
            {"x": xt, "label": lt}, {"skip_backward": True})
    C["accuracy_ignore_per_class"] = (
        net({"x": (6, 5), "label": (6,)},
            'layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" top: "per_class" '
            'accuracy_param { ignore_label: 2 top_k: 2 } }', force_backward=False),
        {"x": xacc, "label": lacc}, {"skip_backward": True})
    xsp = rng.randn(2, 4, 3).astype(f32)
    C["accuracy_spatial_axis1"] = (
        net({"x": (2, 4, 3), "label": (2, 3)},
            'layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" top: "per_class" }',
            force_backward=False),
        {"x": xsp, "label": np.array([[0, 1, 3], [3, 3, 2]], f32)}, {"skip_backward": True})
    C["accuracy_axis_neg1"] = (
        net({"x": (2, 3, 4), "label": (2, 3)},
            'layer { name: "acc" type: "Accuracy" bottom: "x" bottom: "label" top: "acc" '
            'accuracy_param { axis: -1 top_k: 2 ignore_label: 0 } }', force_backward=False),
        {"x": xsp.reshape(2, 3, 4), "label": np.array([[0, 1, 3], [3, 0, 2]], f32)}, {"skip_backward": True})

    # ---------------------------------------------------------------- InfogainLoss (oracle: probabilities)
    pi = softmax(rng.randn(4, 5)).astype(f32)
    H = rng.rand(5, 5).astype(f32) + np.eye(5, dtype=f32)
    li = np.array([2, 0, 4, 2], f32)
    # force_backward would make Caffe abort on the H bottom (it overrides propagate_down);
    # instead a Scale layer fixed at 1 makes its top ps need backward and H not (p itself
    # gets no diff: it is an Input without force_backward); diff/ps is recorded.
    C["infogain_probs/infogain_H_bottom"] = (
        net({"p": (4, 5), "label": (4,), "H": (1, 1, 5, 5)},
            'layer { name: "s" type: "Scale" bottom: "p" top: "ps" scale_param { axis: 0 num_axes: 0 } }\n'
            'layer { name: "loss" type: "InfogainLoss" bottom: "ps" bottom: "label" bottom: "H" top: "loss" }',
            force_backward=False),
        {"p": pi, "label": li, "H": H.reshape(1, 1, 5, 5)}, {"params": {("s", 0): np.ones(())}, "extra_diffs": ["ps"]})
    C["infogain_probs/infogain_source"] = (
        net({"p": (4, 5), "label": (4,)},
            'layer { name: "loss" type: "InfogainLoss" bottom: "p" bottom: "label" top: "loss" '
            'infogain_loss_param { source: "%s" } }' % H_SOURCE),
        {"p": pi, "label": li}, {"H_file": H})
    return C


def record(path, prototxt, *, seed=0, phase="TEST", inputs=None, params=None, skip_backward=False,
           extra_diffs=()):
    """oracle.record's protocol and .npz keys, for nets whose outputs are 0-axis loss tops.

    (oracle.record draws top diffs with ``randn(*shape)``, a float for shape (), and pycaffe's
    ``backward(**diffs)`` indexes ``shape[0]``; here the diffs are written on the blobs.)
    """
    import tempfile

    import caffe

    caffe.set_mode_cpu()
    rng = np.random.RandomState(seed)
    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(prototxt)
        net_path = f.name
    try:
        net = caffe.Net(net_path, caffe.TRAIN if phase == "TRAIN" else caffe.TEST)
    finally:
        os.unlink(net_path)
    out = {"prototxt": np.array(prototxt), "phase": np.array(0 if phase == "TRAIN" else 1)}
    for lname, blobs in net.params.items():
        for i, b in enumerate(blobs):
            given = (params or {}).get((lname, i))
            b.data[...] = given if given is not None else rng.randn(*b.data.shape)
            out["param/%s/%d" % (lname, i)] = b.data.copy()
    for name in net.inputs:
        arr = inputs.get(name) if inputs else None
        if arr is None:
            arr = rng.randn(*net.blobs[name].data.shape)
        net.blobs[name].reshape(*arr.shape)
        net.blobs[name].data[...] = arr
        out["input/%s" % name] = net.blobs[name].data.copy()
    net.reshape()
    net.forward()
    for name, b in net.blobs.items():
        out["blob/%s" % name] = b.data.copy()
    if not skip_backward:
        for name in net.outputs:
            d = np.asarray(rng.randn(*net.blobs[name].data.shape), dtype=np.float32)
            net.blobs[name].diff[...] = d
            out["top_diff/%s" % name] = d
        net.backward()
        for name in list(net.inputs) + list(extra_diffs):
            out["diff/%s" % name] = net.blobs[name].diff.copy()
        for lname, blobs in net.params.items():
            for i, b in enumerate(blobs):
                out["param_diff/%s/%d" % (lname, i)] = b.diff.copy()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, **out)
    print("wrote", path, file=sys.stderr)


def run_one(name):
    proto, inputs, opts = cases()[name]
    opts = dict(opts)
    H = opts.pop("H_file", None)
    if H is not None:
        import caffe

        blob = caffe.proto.caffe_pb2.BlobProto()
        blob.num, blob.channels, blob.height, blob.width = 1, 1, H.shape[0], H.shape[1]
        blob.data.extend(H.ravel().tolist())
        os.makedirs(os.path.dirname(H_SOURCE), exist_ok=True)
        with open(H_SOURCE, "wb") as f:
            f.write(blob.SerializeToString())
    record(os.path.join(OUT, name + ".npz"), proto, seed=7, inputs=inputs, **opts)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run_one(sys.argv[1])
    else:
        os.makedirs(LEGACY, exist_ok=True)
        for name in cases():
            subprocess.check_call([sys.executable, os.path.abspath(__file__), name])
