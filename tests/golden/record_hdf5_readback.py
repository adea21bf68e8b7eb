"""Record real Caffe reading the HDF5 files caffe-compat writes, for tests/weights/test_hdf5.py.
Runs under the PROJECT's Python (it writes caffe-compat's files) and calls the Caffe oracle:

    .venv/bin/python tests/golden/record_hdf5_readback.py      (also run by `make golden`)

1. caffe-compat runs tests/golden/hdf5/sgd_hdf5.npz's solver for ``state_iter`` steps and
   writes ``snap_iter_<k>.solverstate.h5`` (+ its ``.caffemodel.h5``) and ``ours.caffemodel.h5``;
2. the oracle (``make_hdf5.py --check DIR``) restores that state in real Caffe, steps to
   ``steps``, and loads ``ours.caffemodel.h5`` with pycaffe's ``load_hdf5``;
3. tests/golden/hdf5/caffe_reads_ours.npz keeps every dataset of the three files caffe-compat
   wrote (``ours/<file>/<dataset>``) and what Caffe made of them (``caffe/iter``,
   ``caffe/resumed/<layer>/<i>``, ``caffe/loaded/<layer>/<i>``).

The test checks that caffe-compat still writes exactly those datasets (so Caffe's verdict
holds for today's writer) and that Caffe's resumed run equals caffe-compat's uninterrupted one.
"""
import os
import pathlib
import subprocess
import sys
import tempfile

import h5py
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent.parent
ORACLE = ROOT.parent / "shared" / "tools" / "caffe-oracle" / "py"
OUT = HERE / "hdf5" / "caffe_reads_ours.npz"
FILES = ("snap_iter_{k}.solverstate.h5", "snap_iter_{k}.caffemodel.h5", "ours.caffemodel.h5")


def datasets(path) -> dict:
    """Every dataset of an HDF5 file by its path (empty groups are not datasets)."""
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset)
                     else None)
    return out


def write_ours(folder: pathlib.Path) -> int:
    """caffe-compat's snapshot at ``state_iter`` and its weights, in ``folder``; returns k."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "weights")]
    import test_hdf5 as T

    g = np.load(T.GOLDEN)
    k = int(g["state_iter"])
    s = T._golden_solver(g, folder)
    s.step(k)
    s.snapshot()
    s.net.save_weights(str(folder / "ours.caffemodel.h5"))
    return k


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = pathlib.Path(tmp)
        k = write_ours(d)
        r = subprocess.run([str(ORACLE), str(HERE / "make_hdf5.py"), "--check", str(d)],
                           capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"the oracle failed:\n{r.stderr[-3000:]}")
        out = {}
        for pattern in FILES:
            name = pattern.format(k=k)
            for key, v in datasets(d / name).items():
                out[f"ours/{pattern}/{key}"] = np.asarray(v)
        with np.load(d / "caffe_check.npz") as c:
            for key in c.files:
                out[f"caffe/{key}"] = c[key]
    np.savez_compressed(OUT, **out)
    print(f"wrote {OUT} ({len(out)} arrays, {os.path.getsize(OUT)} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
