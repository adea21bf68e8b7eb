"""Benchmark: load and convert a VGG16-size caffemodel (~550 MB); time and peak memory.

    .venv/bin/python benchmarks/weights_load.py [--keep DIR]

Writes a seeded-random VGG16 caffemodel with the project's writer (no download needed),
then, each in a fresh subprocess so peak RSS is per task:
- caffe-compat: caffemodel -> Net (weights loaded), and caffemodel -> .safetensors;
- baseline in the same run: protobuf's own parser (NetParameter.ParseFromString) and
  OpenCV's Caffe importer (cv2.dnn.readNetFromCaffe), where installed.
Reports seconds and peak RSS as a multiple of the file size.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

VGG16 = """name: "VGG16"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 3 dim: 224 dim: 224 } } }
""" + "".join(
    f'layer {{ name: "conv{b}_{i}" type: "Convolution" bottom: "{bot}" top: "conv{b}_{i}" '
    f'convolution_param {{ num_output: {c} kernel_size: 3 pad: 1 }} }}\n'
    f'layer {{ name: "relu{b}_{i}" type: "ReLU" bottom: "conv{b}_{i}" top: "conv{b}_{i}" }}\n'
    + (f'layer {{ name: "pool{b}" type: "Pooling" bottom: "conv{b}_{i}" top: "pool{b}" '
       f'pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}\n' if i == n else "")
    for b, (c, n) in enumerate([(64, 2), (128, 2), (256, 3), (512, 3), (512, 3)], start=1)
    for i in range(1, n + 1)
    for bot in [("data" if b == 1 else f"pool{b-1}") if i == 1 else f"conv{b}_{i-1}"]
) + """layer { name: "fc6" type: "InnerProduct" bottom: "pool5" top: "fc6" inner_product_param { num_output: 4096 } }
layer { name: "relu6" type: "ReLU" bottom: "fc6" top: "fc6" }
layer { name: "fc7" type: "InnerProduct" bottom: "fc6" top: "fc7" inner_product_param { num_output: 4096 } }
layer { name: "relu7" type: "ReLU" bottom: "fc7" top: "fc7" }
layer { name: "fc8" type: "InnerProduct" bottom: "fc7" top: "fc8" inner_product_param { num_output: 1000 } }
layer { name: "prob" type: "Softmax" bottom: "fc8" top: "prob" }
"""

TASKS = {
    "caffe-compat Net(weights=caffemodel)":
        "from caffe_compat import Net; net = Net(P, weights=W)",
    "caffe-compat caffemodel -> safetensors":
        "from caffe_compat import weights as X; X.save_safetensors(X.caffemodel_state_dict(W), W + '.safetensors')",
    "protobuf NetParameter.ParseFromString (baseline)":
        "from caffe_compat.protos import caffe_pb2; m = caffe_pb2.NetParameter(); m.ParseFromString(open(W,'rb').read())",
    "OpenCV dnn.readNetFromCaffe (baseline)":
        "import cv2; cv2.dnn.readNetFromCaffe(P, W)",
}


def run_task(code: str, proto: str, weights: str) -> dict:
    # the imports happen before the baseline reading, so 'rss' is what the task itself adds
    imports = "\n".join(l for l in code.split(";") if l.strip().startswith(("import", "from")))
    body = "\n".join(l.strip() for l in code.split(";") if not l.strip().startswith(("import", "from")))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork/exec from the parent (which
    # held the whole net while writing the file), VmHWM belongs to this process's memory
    prog = (f"import time, json, os\n{imports}\nP={proto!r}\nW={weights!r}\n"
            "def hwm():\n"
            "    for line in open('/proc/self/status'):\n"
            "        if line.startswith('VmHWM:'):\n"
            "            return int(line.split()[1]) * 1024\n"
            "pre = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
            f"t=time.perf_counter()\n{body}\n"
            "print(json.dumps({'s': time.perf_counter()-t, "
            "'rss': hwm() - pre}))")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", help="folder for the generated files (default: a temp folder)")
    a = ap.parse_args()
    d = a.keep or tempfile.mkdtemp(prefix="cc-bench-")
    os.makedirs(d, exist_ok=True)
    proto = os.path.join(d, "vgg16.prototxt")
    weights = os.path.join(d, "vgg16.caffemodel")
    with open(proto, "w") as f:
        f.write(VGG16)
    if not os.path.exists(weights):
        import torch

        from caffe_compat import Net

        net = Net(proto, seed=0)
        t = time.perf_counter()
        net.save_weights(weights)
        print(f"wrote {weights} in {time.perf_counter() - t:.1f} s")
        del net
    size = os.path.getsize(weights)
    print(f"file: {size / 1e6:.0f} MB; peak RSS is measured above the process's RSS after its imports")
    print(f"{'task':52s} {'seconds':>8s} {'peak RSS':>9s} {'x file':>7s}")
    for name, code in TASKS.items():
        r = run_task(code, proto, weights)
        if "error" in r:
            print(f"{name:52s} skipped: {r['error']}")
            continue
        print(f"{name:52s} {r['s']:8.2f} {r['rss'] / 1e6:8.0f}M {r['rss'] / size:7.2f}")


if __name__ == "__main__":
    main()
