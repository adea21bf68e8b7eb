"""Benchmark: py-faster-rcnn's own VGG16 / ZF end2end nets, training and detection speed.

    .venv/bin/python benchmarks/frcnn_speed.py [--device cuda] [--nets VGG16,ZF]
        [--train-iters 20] [--test-images 20] [--cpu-images 1]

The corpus' ``models/pascal_voc/<NET>/faster_rcnn_end2end`` solver/train/test prototxts
and ``experiments/cfgs/faster_rcnn_end2end.yml``, unchanged (scale 600, max 1000), with
seeded random weights, on a synthetic VOC set written first.  Reports:

- training: seconds per solver iteration (VGG16's solver has ``iter_size: 2``, i.e. two
  images per iteration) after warm-up iterations, on ``--device``;
- detection: ``im_detect`` ms per image (RPN + 300 proposals + head, image resize and
  blob building included) on ``--device`` in three variants -- exact fp32 NCHW (Caffe's
  numbers), exact NHWC, NHWC with TF32 allowed -- and on the CPU of the same process (the
  same-process baseline: ratio = CPU time / device time).

For scale, the Faster R-CNN paper reports 198 ms (VGG16) and 59 ms (ZF) per image for
py-faster-rcnn on a K40; that is another card and another process, not a ratio.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from typing import Iterator

import numpy as np
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


def bench_train(name: str, data_dir: str, device: str, iters: int, warmup: int, tmp: str) -> float:
    with corpus_solver(name, data_dir, device, os.path.join(tmp, "train-" + name)) as s:
        s.step(warmup)
        sync(device)
        t = time.perf_counter()
        s.step(iters)
        sync(device)
        dt = (time.perf_counter() - t) / iters
        print(f"  train {name:6s} on {device}: {dt * 1e3:8.1f} ms/iteration "
              f"(iter_size {s.param.iter_size}; loss {float(s.smoothed_loss):.3f})", flush=True)
        return dt


def bench_detect(name: str, data_dir: str, device: str, images: int, *, nhwc: bool = False,
                 tf32: bool = False, weights: str) -> float:
    from caffe_compat import Net
    from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg
    from caffe_compat.frcnn.test import im_detect, read_image

    proto = FRCNN / "models" / "pascal_voc" / name / "faster_rcnn_end2end" / "test.prototxt"
    jpgs = sorted((p for p in _walk(data_dir) if p.endswith(".jpg")))[: max(images, 1) + 2]
    ims = [read_image(p) for p in jpgs]
    with temporary_cfg():
        cfg_from_file(str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
        net = Net(str(proto), weights=weights, device=device, allow_tf32=tf32)
        if nhwc:
            net.channels_last()
        for im in ims[:2]:  # warm-up (cuDNN picks its algorithms)
            im_detect(net, im)
        sync(device)
        t = time.perf_counter()
        for im in ims[2:2 + images]:
            scores, boxes = im_detect(net, im)
        sync(device)
        dt = (time.perf_counter() - t) / images
    label = "exact NCHW" if not (nhwc or tf32) else ("TF32 NHWC" if tf32 else "exact NHWC")
    print(f"  detect {name:6s} on {device:4s} {label:10s}: {dt * 1e3:8.1f} ms/image "
          f"({scores.shape[0]} proposals)", flush=True)
    return dt


def _walk(d: str):
    for root, _, files in os.walk(d):
        for f in files:
            yield os.path.join(root, f)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nets", default="VGG16,ZF")
    ap.add_argument("--train-iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--test-images", type=int, default=20)
    ap.add_argument("--cpu-images", type=int, default=1, help="images for the CPU baseline (0: skip)")
    a = ap.parse_args()
    if not FRCNN.is_dir():
        raise SystemExit(f"py-faster-rcnn corpus not found at {FRCNN} (set CAFFE_COMPAT_CORPUS)")
    from caffe_compat import Net
    from caffe_compat.frcnn.config import cfg_from_file, temporary_cfg

    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "CPU only"
    print(f"device {a.device} ({card}); torch {torch.__version__}; CPU threads {torch.get_num_threads()}")
    tmp = tempfile.mkdtemp(prefix="cc-frcnn-")
    data_dir = _data(tmp, max(24, a.test_images + 4))
    for name in a.nets.split(","):
        with temporary_cfg():
            cfg_from_file(str(FRCNN / "experiments" / "cfgs" / "faster_rcnn_end2end.yml"))
            net = Net(str(FRCNN / "models" / "pascal_voc" / name / "faster_rcnn_end2end" / "test.prototxt"), seed=0)
            randomize_weights(net)
            weights = os.path.join(tmp, name + ".caffemodel")
            net.save_weights(weights)
            del net
        if a.train_iters > 0:
            bench_train(name, data_dir, a.device, a.train_iters, a.warmup, tmp)
        t = {}
        t["exact"] = bench_detect(name, data_dir, a.device, a.test_images, weights=weights)
        if a.device != "cpu":
            t["nhwc"] = bench_detect(name, data_dir, a.device, a.test_images, nhwc=True, weights=weights)
            t["tf32"] = bench_detect(name, data_dir, a.device, a.test_images, nhwc=True, tf32=True,
                                     weights=weights)
            if a.cpu_images > 0:
                t_cpu = bench_detect(name, data_dir, "cpu", a.cpu_images, weights=weights)
                print(f"  {name}: {a.device} exact is {t_cpu / t['exact']:.0f}x this CPU "
                      f"({torch.get_num_threads()} threads); NHWC {t['exact'] / t['nhwc']:.2f}x and "
                      f"TF32 {t['exact'] / t['tf32']:.2f}x exact NCHW", flush=True)


if __name__ == "__main__":
    main()
