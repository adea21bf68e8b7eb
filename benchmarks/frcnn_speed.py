"""Benchmark: py-faster-rcnn's own VGG16 / ZF end2end nets, training and detection speed.

    .venv/bin/python benchmarks/frcnn_speed.py [--device cuda] [--nets VGG16,ZF]
        [--train-iters 20] [--test-images 20] [--cpu-images 1] [--variants 0,3]
        [--compile inductor] [--table OUT.md]

The corpus' ``models/pascal_voc/<NET>/faster_rcnn_end2end`` solver/train/test prototxts
and ``experiments/cfgs/faster_rcnn_end2end.yml``, unchanged (scale 600, max 1000), with
seeded random weights, on a synthetic VOC set written first.  Reports:

- training: seconds per solver iteration (VGG16's solver has ``iter_size: 2``, i.e. two
  images per iteration) after warm-up iterations, on ``--device``;
- training peak memory (``torch.cuda.max_memory_allocated``) and, with ``--compile``, the
  same training through ``Net.compile_forward``;
- detection: ``im_detect`` images per second (RPN + 300 proposals + head, image resize and
  blob building included) on ``--device`` in the variants of :data:`GPU_DETECT` -- the
  default exact fp32 path (cuDNN autotuned, the trunk replayed as CUDA graphs), without
  graphs, TF32, bf16, fp16, NHWC, batch 4 -- and on the CPU of the same process;
- one markdown table (``--table FILE`` appends it), each figure beside its anchor.

For scale, the Faster R-CNN paper reports 198 ms (VGG16) and 59 ms (ZF) per image for
py-faster-rcnn on a K40; that is another card and another process, not a ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from typing import Iterator, Tuple

import torch

from common import CORPUS, randomize_weights, sync

FRCNN = CORPUS / "py-faster-rcnn"


def _data(tmp: str, images: int):
    from caffe_compat.frcnn.datasets.synthetic_voc import write_dataset

    d = os.path.join(tmp, "voc")
    # VOC-like sizes (about 375 x 500), so scale 600 gives the usual ~600 x 800 input
    write_dataset(d, images, seed=0, image_size=(330, 500))
    return d


@contextlib.contextmanager
def corpus_solver(name: str, data_dir: str, device: str, out_dir: str) -> Iterator:
    """The corpus' end2end solver for ``name`` on the synthetic set, seeded random weights;
    py-faster-rcnn's cfg stays active (the nets are built under it, the roidb reads it)."""
    from caffe_compat.frcnn.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
    from caffe_compat.frcnn.train import SolverWrapper, combined_roidb
    from caffe_compat.trainer import seed_everything

    cwd = os.getcwd()
    os.chdir(FRCNN)  # the solvers name their nets relative to py-faster-rcnn's root
    try:
        with temporary_cfg():
            cfg_from_file("experiments/cfgs/faster_rcnn_end2end.yml")
            cfg_from_list(["DATA_DIR", data_dir])
            seed_everything(cfg.RNG_SEED)
            _, roidb = combined_roidb("voc_2007_trainval")
            sw = SolverWrapper(f"models/pascal_voc/{name}/faster_rcnn_end2end/solver.prototxt", roidb,
                               out_dir, device=device, save_state=False)
            randomize_weights(sw.solver.net)
            yield sw.solver
    finally:
        os.chdir(cwd)


def bench_train(name: str, data_dir: str, device: str, iters: int, warmup: int, tmp: str,
                compile_backend: str = "") -> Tuple[float, float]:
    """(seconds per iteration, peak memory in GB) of end2end training on ``device``."""
    from caffe_compat.device import peak_memory

    with corpus_solver(name, data_dir, device, os.path.join(tmp, "train-" + name)) as s:
        if compile_backend:
            s.net.compile_forward(backend=compile_backend)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        s.step(warmup)
        sync(device)
        t = time.perf_counter()
        s.step(iters)
        sync(device)
        dt = (time.perf_counter() - t) / iters
        peak = peak_memory(device)[0] / 1e9
        label = f"compiled ({compile_backend})" if compile_backend else "eager"
        print(f"  train {name:6s} on {device} {label}: {dt * 1e3:8.1f} ms/iteration = {1 / dt:6.1f} it/s "
              f"(iter_size {s.param.iter_size}; loss {float(s.smoothed_loss):.3f}; peak {peak:.2f} GB)",
              flush=True)
        return dt, peak


def bench_detect(name: str, data_dir: str, device: str, images: int, *, weights: str,
                 nhwc: bool = False, precision: str = "fp32", graphs: bool = False,
                 batch: int = 1) -> float:
    """ms per image of im_detect (batch 1) or im_detect_batch (``batch`` > 1)."""
    from caffe_compat import Net
    from caffe_compat.cuda_graph import TrunkGraphs
    from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg
    from caffe_compat.frcnn.test import im_detect, im_detect_batch, read_image
    from caffe_compat.precision import inference_precision

    proto = FRCNN / "models" / "pascal_voc" / name / "faster_rcnn_end2end" / "test.prototxt"
    jpgs = sorted((p for p in _walk(data_dir) if p.endswith(".jpg")))[: max(images, 1) + 2]
    ims = [read_image(p) for p in jpgs]
    with temporary_cfg():
        cfg_from_file(str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
        net = Net(str(proto), weights=weights, device=device)
        if nhwc:
            net.channels_last()
        runner = TrunkGraphs(net) if graphs else net
        with inference_precision(net, precision):
            def run(batch_ims):
                if batch > 1:
                    return im_detect_batch(runner, batch_ims, batch)[-1]
                for im in batch_ims:
                    out = im_detect(runner, im)
                return out

            run(ims[:2])  # warm-up (cuDNN autotuning, graph capture)
            sync(device)
            t = time.perf_counter()
            scores, _ = run(ims[2:2 + images])
            sync(device)
        dt = (time.perf_counter() - t) / images
    label = f"{precision}{' NHWC' if nhwc else ''}{' graphs' if graphs else ''}{f' batch {batch}' if batch > 1 else ''}"
    print(f"  detect {name:6s} on {device:4s} {label:22s}: {dt * 1e3:8.1f} ms/image = {1 / dt:7.1f} images/s "
          f"({scores.shape[0]} proposals)", flush=True)
    return dt


def _walk(d: str):
    for root, _, files in os.walk(d):
        for f in files:
            yield os.path.join(root, f)


#: (label, bench_detect keywords) run on a GPU; the CPU runs the first only
GPU_DETECT = [
    ("fp32 exact (default: autotuned, trunk graphs)", dict(graphs=True)),
    ("fp32 exact, no graphs", dict()),
    ("tf32 NHWC graphs", dict(nhwc=True, precision="tf32", graphs=True)),
    ("bf16 graphs", dict(precision="bf16", graphs=True)),
    ("bf16 NHWC graphs", dict(nhwc=True, precision="bf16", graphs=True)),
    ("bf16 NHWC batch 4", dict(nhwc=True, precision="bf16", batch=4)),
    ("fp16 NHWC graphs", dict(nhwc=True, precision="fp16", graphs=True)),
]

#: the issue's targets and py-faster-rcnn's published figures (K40, Faster R-CNN paper /
#: py-faster-rcnn README), the anchors each figure is read against
ANCHORS = {
    ("VGG16", "detect fp32"): "target >= 80 images/s; paper: 5 images/s (198 ms, K40)",
    ("VGG16", "detect bf16"): "target >= 250 images/s",
    ("ZF", "detect fp32"): "paper: 17 images/s (59 ms, K40)",
    ("VGG16", "train"): "target >= 15 it/s; peak < 3 GB (py-faster-rcnn's published memory)",
    ("ZF", "train"): "target >= 40 it/s",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nets", default="VGG16,ZF")
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=20)
    ap.add_argument("--cpu-images", type=int, default=1, help="images for the CPU baseline (0: skip)")
    ap.add_argument("--variants", default="", help="comma-separated GPU_DETECT labels' indices (default: all)")
    ap.add_argument("--compile", default="", help="also train with net.compile_forward(backend=...)")
    ap.add_argument("--compile-nets", default="ZF", help="the nets --compile applies to (compiling takes minutes)")
    ap.add_argument("--table", default="", help="append a markdown table to this file")
    a = ap.parse_args()
    if not FRCNN.is_dir():
        raise SystemExit(f"py-faster-rcnn corpus not found at {FRCNN} (set CAFFE_COMPAT_CORPUS)")
    from caffe_compat import Net
    from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg

    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "CPU only"
    head = (f"device {a.device} ({card}); torch {torch.__version__}; CPU threads {torch.get_num_threads()}; "
            f"{os.cpu_count()} CPUs")
    print(head)
    tmp = tempfile.mkdtemp(prefix="cc-frcnn-")
    data_dir = _data(tmp, max(24, a.test_images + 4))
    rows = []
    picked = [int(i) for i in a.variants.split(",") if i.strip()] or list(range(len(GPU_DETECT)))
    for name in a.nets.split(","):
        with temporary_cfg():
            cfg_from_file(str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
            net = Net(str(FRCNN / "models" / "pascal_voc" / name / "faster_rcnn_end2end" / "test.prototxt"), seed=0)
            randomize_weights(net)
            weights = os.path.join(tmp, name + ".caffemodel")
            net.save_weights(weights)
            del net
        if a.train_iters > 0:
            dt, peak = bench_train(name, data_dir, a.device, a.train_iters, a.warmup, tmp)
            rows.append((name, "train end2end (eager)", f"{1 / dt:.1f} it/s, peak {peak:.2f} GB",
                         ANCHORS.get((name, "train"), "")))
            if a.compile and name in a.compile_nets.split(","):
                dt, peak = bench_train(name, data_dir, a.device, a.train_iters, a.warmup, tmp, a.compile)
                rows.append((name, f"train end2end (compiled, {a.compile})",
                             f"{1 / dt:.1f} it/s, peak {peak:.2f} GB", ""))
        variants = [GPU_DETECT[i] for i in picked] if a.device != "cpu" else [("fp32 exact (default)", {})]
        for label, kw in variants:
            try:
                dt = bench_detect(name, data_dir, a.device, a.test_images, weights=weights, **kw)
            except Exception as e:  # noqa: BLE001 - one failing variant must not hide the others
                print(f"  detect {name} {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                rows.append((name, f"detect {label}", "failed", type(e).__name__))
                continue
            anchor = ANCHORS.get((name, "detect " + label.split()[0]), "") if "batch" not in label else ""
            rows.append((name, f"detect {label}", f"{1 / dt:.1f} images/s ({dt * 1e3:.1f} ms)", anchor))
        if a.device != "cpu" and a.cpu_images > 0:
            t_cpu = bench_detect(name, data_dir, "cpu", a.cpu_images, weights=weights)
            rows.append((name, "detect fp32 on this machine's CPU", f"{1 / t_cpu:.2f} images/s", "same process"))
    table = ["", f"### Faster R-CNN speed ({time.strftime('%Y-%m-%d')}): {head}", "",
             "`python benchmarks/frcnn_speed.py " + " ".join(os.sys.argv[1:]) + "` (corpus end2end nets, "
             "seeded weights, synthetic VOC-sized images, scale 600 / max 1000)", "",
             "| net | what | figure | anchor |", "|---|---|---|---|"]
    table += [f"| {n} | {w} | {f} | {an} |" for n, w, f, an in rows]
    print("\n".join(table))
    if a.table:
        with open(a.table, "a") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
