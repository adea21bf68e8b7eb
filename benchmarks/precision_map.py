"""Benchmark: the mAP change of each ``--precision`` on a trained Faster R-CNN.

    .venv/bin/python benchmarks/precision_map.py [--device cuda] [--out DIR] [--iters 1300]
        [--table benchmarks/RESULTS.md]

Trains ``models/faster_rcnn_tiny`` as ``make demo`` does (synthetic VOC, 300 trainval
images, fp32) unless ``DIR`` already holds that run, then tests the snapshot on the 100
test images once per precision the device offers (CPU: fp32, bf16; CUDA: fp32, tf32, bf16,
fp16) with ``test_net``: VOC07 mAP, and the largest score difference against fp32 over
the detections' class scores.  Writes one markdown table (appended to ``--table``).
"""
from __future__ import annotations

import argparse
import pathlib
import platform
import sys
import time

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="/tmp/cc-precision-map")
    ap.add_argument("--iters", type=int, default=1300)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--table", default="")
    a = ap.parse_args()
    from caffe_compat.frcnn import demo
    from caffe_compat.frcnn.config import cfg_from_file, cfg_from_list, temporary_cfg
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.test import test_net
    from caffe_compat.net import Net
    from caffe_compat.precision import inference_precision

    out = pathlib.Path(a.out)
    model = out / "train" / f"faster_rcnn_tiny_iter_{a.iters}.caffemodel"
    if not model.exists():
        rc = demo.main(str(out), iters=a.iters, images=a.images)
        if rc != 0 or not model.exists():
            raise SystemExit(f"training failed (rc {rc}); no {model}")
    modes = ["fp32", "bf16"] if a.device == "cpu" else ["fp32", "tf32", "bf16", "fp16"]
    rows, ref_boxes = [], None
    for mode in modes:
        with temporary_cfg():
            cfg_from_file(str(demo.MODEL_DIR / "faster_rcnn_tiny.yml"))
            cfg_from_list(["DATA_DIR", str(out / "data")])
            net = Net(str(demo.MODEL_DIR / "test.prototxt"), weights=str(model), device=a.device)
            t = time.perf_counter()
            with inference_precision(net, mode):
                res = test_net(net, get_imdb("voc_2007_test"), output_dir=str(out / f"test-{mode}"),
                               log_fn=lambda msg: None)
            dt = time.perf_counter() - t
        boxes = res.get("all_boxes")
        diff = ""
        if boxes is not None:
            flat = [np.asarray(b) for cls in boxes[1:] for b in cls]
            if ref_boxes is None:
                ref_boxes = flat
            elif all(x.shape == y.shape for x, y in zip(flat, ref_boxes)):
                d = max((float(np.abs(x[:, 4] - y[:, 4]).max()) for x, y in zip(flat, ref_boxes)
                         if x.size), default=0.0)
                diff = f"{d:.2e}"
            else:
                diff = "different detections"
        rows.append((mode, float(res["mAP"]), diff, dt))
        print(f"{mode}: mAP {float(res['mAP']):.4f} ({dt:.1f} s)", flush=True)
    base = rows[0][1]
    card = torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "CPU"
    table = ["", f"### mAP per --precision ({time.strftime('%Y-%m-%d')}): {a.device} ({card}), "
             f"torch {torch.__version__}", "",
             f"`python benchmarks/precision_map.py --device {a.device}`: models/faster_rcnn_tiny trained "
             f"{a.iters} iterations in fp32 (make demo's run), tested on the 100 synthetic VOC test images", "",
             "| precision | mAP (VOC07) | change vs fp32 | max score change (same detections) |",
             "|---|---|---|---|"]
    table += [f"| {m} | {v:.4f} | {v - base:+.4f} | {d or '-'} |" for m, v, d, _ in rows]
    print("\n".join(table))
    if a.table:
        with open(a.table, "a") as f:
            f.write("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
