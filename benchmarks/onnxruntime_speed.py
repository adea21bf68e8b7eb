"""Benchmark: onnxruntime (CPU) on caffe-compat's ONNX export vs caffe-compat's default path.

    .venv/bin/python benchmarks/onnxruntime_speed.py [--iters 20] [--nets AlexNet,...]
                                                     [--results benchmarks/RESULTS.md]

Nets: the five classification deploy nets of ../shared/corpus (AlexNet, GoogLeNet,
SqueezeNet 1.1, ResNet-50, MobileNet) with seeded random weights, batch 1, same process.
Each net is exported with ``caffe_compat.export.to_onnx`` and run by an onnxruntime
``InferenceSession`` (CPUExecutionProvider, default graph optimizations, torch's thread count,
no spinning between runs: spinning workers would take torch's cores); caffe-compat runs
``Net(...).forward`` under ``torch.inference_mode()`` (the default inference plan).  Both
alternate in 5 rounds of ``iters / 5`` forwards after a warm-up; the fastest round counts.
The outputs are compared (max |diff| relative to caffe-compat's largest output).  With
``--results`` (default) one markdown table is appended to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from typing import Callable

import numpy as np
import torch

from common import CORPUS, randomize_weights

HERE = pathlib.Path(__file__).resolve().parent
NETS = [("AlexNet", "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt"),
        ("GoogLeNet", "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt"),
        ("SqueezeNet 1.1", "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt"),
        ("ResNet-50", "KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt"),
        ("MobileNet", "shicai-MobileNet-Caffe/mobilenet_deploy.prototxt")]


def seed_batchnorm(net) -> None:
    """BatchNorm statistics have no filler (all zero: MobileNet's outputs would be NaN, and
    a NaN comparison says nothing): seeded means, variances in [1, 3], scale factor 1."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for e in net.entries:
            if e.type == "BatchNorm" and e.module is not None:
                mean, var, factor = e.module.caffe_blobs()
                mean.copy_(torch.randn(mean.shape, generator=gen) * 0.5)
                var.copy_(torch.rand(var.shape, generator=gen) * 2 + 1)
                factor.fill_(1.0)


def best_ms(fns: "list[Callable[[], object]]", iters: int) -> "list[float]":
    """Fastest round's ms per call of each function, rounds alternating between them."""
    for f in fns:
        f()
    per = max(1, iters // 5)
    best = [float("inf")] * len(fns)
    for _ in range(5 if iters >= 5 else 1):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            for _ in range(per):
                f()
            best[i] = min(best[i], (time.perf_counter() - t) * 1000 / per)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--nets", default=",".join(n for n, _ in NETS))
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="'' to print only")
    args = ap.parse_args()
    import onnxruntime as ort

    from caffe_compat import Net
    from caffe_compat.export import to_onnx

    wanted = [n.strip() for n in args.nets.split(",") if n.strip()]
    rows = []
    for name, rel in NETS:
        if name not in wanted:
            continue
        path = CORPUS / rel
        if not path.is_file():
            print(f"skip {name}: {path} not found", file=sys.stderr)
            continue
        net = Net(path)
        shape = (1,) + tuple(net.blob_shapes["data"][1:])
        net = Net(path, input_shapes={"data": shape})
        randomize_weights(net)
        seed_batchnorm(net)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = str(pathlib.Path(tmp) / "net.onnx")
            # static: the benchmark runs one size, and a fixed-size graph is what a
            # deployment at one size would run (no symbolic shape arithmetic in it)
            to_onnx(net, onnx_path, inputs={"data": x}, dynamic=False)
            so = ort.SessionOptions()
            # onnxruntime's workers spin after each run by default: in one process with torch
            # that steals torch's cores and slows the alternating rounds; same thread count
            so.intra_op_num_threads = torch.get_num_threads()
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(onnx_path, sess_options=so, providers=["CPUExecutionProvider"])
        feed = {"data": x.numpy()}

        def ours():
            with torch.inference_mode():
                return net.forward(data=x)

        ref = next(iter(ours().values())).numpy()
        got = sess.run(None, feed)[0]
        diff = float(np.abs(got - ref).max() / max(np.abs(ref).max(), 1e-30))
        t_ours, t_ort = best_ms([ours, lambda: sess.run(None, feed)], args.iters)
        rows.append((name, t_ours, t_ort, diff))
        print(f"{name}: caffe-compat {t_ours:.2f} ms, onnxruntime {t_ort:.2f} ms, rel diff {diff:.1e}")
    if args.results and rows:
        import onnxruntime as ort2

        lines = [f"\n### onnxruntime CPU vs caffe-compat default path, batch 1 "
                 f"({datetime.date.today().isoformat()})\n",
                 f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                 f"torch {torch.__version__}, onnxruntime {ort2.__version__}; "
                 f"`{shlex.join(['python'] + sys.argv)}`\n",
                 "| net | caffe-compat ms | onnxruntime ms | onnxruntime / caffe-compat | max rel diff |",
                 "|---|---|---|---|---|"]
        for name, a, b, d in rows:
            lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} | {d:.1e} |")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
