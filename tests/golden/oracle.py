"""Record golden blobs and diffs from real Caffe.  Runs under the Caffe oracle's Python:

    ../shared/tools/caffe-oracle/py tests/golden/make_<family>.py

(the oracle is built by ../shared/tools/caffe-oracle/install.sh; never needed by CI).

Protocol of one case (``record``): the net text must declare ``force_backward: true`` and
feed its bottoms through Input layers.  Parameters are filled with seeded normals (or what
the case gives), inputs with seeded normals (or given arrays), then Caffe runs forward;
every net output gets a seeded random diff and Caffe runs backward.  The .npz holds:

- ``prototxt``: the net text;  ``phase``: 0 TRAIN / 1 TEST
- ``input/<blob>``: fed arrays;  ``blob/<blob>``: every blob after forward
- ``param/<layer>/<i>``: the layer's blobs before the step
- ``top_diff/<blob>``: the diffs set on net outputs
- ``diff/<blob>``: input diffs after backward; ``param_diff/<layer>/<i>``: parameter diffs
"""
import os
import sys

import numpy as np

import caffe  # the oracle's pycaffe

caffe.set_mode_cpu()


def record(path, prototxt, *, seed=0, phase="TEST", inputs=None, params=None,
           param_scale=1.0, skip_backward=False):
    rng = np.random.RandomState(seed)
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".prototxt", delete=False) as f:
        f.write(prototxt)
        net_path = f.name
    try:
        net = caffe.Net(net_path, caffe.TRAIN if phase == "TRAIN" else caffe.TEST)
    finally:
        os.unlink(net_path)
    out = {"prototxt": np.array(prototxt), "phase": np.array(0 if phase == "TRAIN" else 1)}
    params = params or {}
    for lname, blobs in net.params.items():
        for i, b in enumerate(blobs):
            given = params.get((lname, i))
            if given is not None:
                b.data[...] = given
            else:
                b.data[...] = rng.randn(*b.data.shape) * param_scale
            out["param/%s/%d" % (lname, i)] = b.data.copy()
    inputs = inputs or {}
    for name in net.inputs:
        given = inputs.get(name)
        arr = given if given is not None else rng.randn(*net.blobs[name].data.shape)
        net.blobs[name].reshape(*arr.shape)
        net.blobs[name].data[...] = arr
        out["input/%s" % name] = net.blobs[name].data.copy()
    net.reshape()
    net.forward()
    for name, b in net.blobs.items():
        out["blob/%s" % name] = b.data.copy()
    if not skip_backward:
        for name in net.outputs:
            shape = net.blobs[name].data.shape
            d = np.asarray(rng.randn(*shape), dtype=np.float32).reshape(shape)
            net.blobs[name].diff[...] = d  # set directly: pycaffe's kwargs check fails on 0-axis tops
            out["top_diff/%s" % name] = d
        net.backward()
        for name in net.inputs:
            out["diff/%s" % name] = net.blobs[name].diff.copy()
        for lname, blobs in net.params.items():
            for i, b in enumerate(blobs):
                out["param_diff/%s/%d" % (lname, i)] = b.diff.copy()
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    np.savez_compressed(path, **out)
    print("wrote", path, "(%d arrays)" % len(out), file=sys.stderr)
    return out


def run_cases(argv, cases, run_case, script):
    """``script [CASE ...]``: each case in its own process (a failed Caffe CHECK aborts it);
    ``script --one CASE`` runs one case in this process."""
    import subprocess

    if len(argv) == 2 and argv[0] == "--one":
        run_case(argv[1])
        return 0
    failed = []
    for name in argv or sorted(cases):
        if subprocess.call([sys.executable, os.path.abspath(script), "--one", name]):
            failed.append(name)
    if failed:
        print("FAILED:", failed, file=sys.stderr)
    return 1 if failed else 0
