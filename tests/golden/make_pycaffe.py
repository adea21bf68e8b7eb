"""Record real Caffe running the pycaffe-style scripts of tests/data/pycaffe_scripts/.
Runs under the Caffe oracle:

    ../shared/tools/caffe-oracle/py tests/golden/make_pycaffe.py [NAME ...]

Each script takes the path of an .npz to write its results to, so the very same file runs
under real Caffe (here) and under `caffe-compat run` (tests/pycaffe/test_pycaffe.py), which
compares the two.  Every script runs in its own subprocess (a failed Caffe CHECK aborts
the process); its .npz is rewritten compressed into tests/golden/pycaffe/<name>.npz.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(HERE, "..", "data", "pycaffe_scripts")
OUT = os.path.join(HERE, "pycaffe")


def main(names):
    os.makedirs(OUT, exist_ok=True)
    if not names:
        names = sorted(f[:-3] for f in os.listdir(SCRIPTS) if f.endswith(".py"))
    for name in names:
        script = os.path.join(SCRIPTS, name + ".py")
        with tempfile.TemporaryDirectory() as tmp:
            raw = os.path.join(tmp, "out.npz")
            subprocess.run([sys.executable, script, raw], check=True, cwd=tmp)
            with np.load(raw) as f:
                arrays = {k: f[k] for k in f.files}
        path = os.path.join(OUT, name + ".npz")
        np.savez_compressed(path, **arrays)
        print("wrote %s (%d arrays, %d bytes)" % (path, len(arrays), os.path.getsize(path)),
              file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
