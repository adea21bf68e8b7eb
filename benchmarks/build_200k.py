"""Benchmark: build time of a 200,000-layer net, for each way a net can be long.

    .venv/bin/python benchmarks/build_200k.py [--layers 200000] [--variants unique,duplicate]

Building is linear in the layers (issue 12: duplicate layer names made it quadratic, 20,000
layers took 49 s).  Each variant is a generated prototxt of ``--layers`` layers after one
Input, built in a fresh subprocess (so peak memory is its own):

- ``unique``: a chain of ReLU layers with unique names and tops;
- ``duplicate``: the same chain, every layer named "r" (Caffe allows it; we suffix _1, _2...);
- ``inplace``: every layer a ReLU in place on the input blob (one blob rewritten 200,000 times);
- ``splits``: every layer a Power reading the input blob (one split of 200,000 tops in
  Caffe's ``InsertSplits``).

Reported per variant: seconds to parse the text (protobuf's text parser + upgrade), to build
the ``Net`` from the parsed definition, to compute Caffe's steps (``net.caffe_steps``: split
insertion and need-backward), and the peak RSS of the process.  ``max_layers`` (2^18 by
default) is raised for larger ``--layers``.  The machine is named on the first line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VARIANTS = ("unique", "duplicate", "inplace", "splits")


def prototxt(n: int, variant: str) -> str:
    """A net of one Input and ``n`` layers shaped as ``variant`` says."""
    out = ['name: "long"\n',
           'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 2 } } }\n']
    prev = "data"
    for i in range(n):
        if variant == "unique":
            out.append(f'layer {{ name: "r{i}" type: "ReLU" bottom: "{prev}" top: "t{i}" }}\n')
            prev = f"t{i}"
        elif variant == "duplicate":
            out.append(f'layer {{ name: "r" type: "ReLU" bottom: "{prev}" top: "t{i}" }}\n')
            prev = f"t{i}"
        elif variant == "inplace":
            out.append(f'layer {{ name: "r{i}" type: "ReLU" bottom: "data" top: "data" }}\n')
        elif variant == "splits":
            out.append(f'layer {{ name: "p{i}" type: "Power" bottom: "data" top: "t{i}" }}\n')
        else:
            raise ValueError(f"unknown variant {variant!r}; variants: {', '.join(VARIANTS)}")
    return "".join(out)


CHILD = r"""
import json, sys, time
from caffe_compat import limits
from caffe_compat.io import read_net_text
from caffe_compat.net import Net

path, n = sys.argv[1], int(sys.argv[2])
with limits.raised(max_layers=max(n + 1, limits.get("max_layers"))):
    t0 = time.perf_counter()
    param = read_net_text(path)
    t1 = time.perf_counter()
    net = Net(param)
    t2 = time.perf_counter()
    steps = net.caffe_steps
    t3 = time.perf_counter()
assert len(net.entries) == n + 1, len(net.entries)
hwm = 0
with open("/proc/self/status") as f:
    for line in f:
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) // 1024
print(json.dumps({"parse": t1 - t0, "build": t2 - t1, "steps": t3 - t2, "n_steps": len(steps),
                  "peak_mb": hwm}))
"""


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__}, {platform.system()} {platform.release()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=200_000)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    print(f"machine: {machine()}")
    print(f"{'variant':<10} {'layers':>8} {'parse s':>8} {'build s':>8} {'steps s':>8} {'peak MB':>8}")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for variant in a.variants.split(","):
            path = os.path.join(tmp, f"{variant}.prototxt")
            with open(path, "w") as f:
                f.write(prototxt(a.layers, variant))
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            res = subprocess.run([sys.executable, "-c", CHILD, path, str(a.layers)], env=env,
                                 capture_output=True, text=True)
            if res.returncode:
                print(f"{variant:<10} failed: {res.stderr.strip().splitlines()[-1:]}")
                failed = True
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{variant:<10} {a.layers:>8} {r['parse']:>8.1f} {r['build']:>8.1f} {r['steps']:>8.1f} "
                  f"{r['peak_mb']:>8}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
