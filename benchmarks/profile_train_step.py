"""Profile py-faster-rcnn training steps on CUDA (where does an iteration's time go?).

    python benchmarks/profile_train_step.py [--net ZF] [--iters 4]

Builds the corpus' end2end solver for NET on a synthetic VOC set (as frcnn_speed.py does),
runs warm-up steps, then profiles ``--iters`` steps with torch.profiler and prints the top
operators by self CPU time and by self CUDA time, and the wall time per step.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

import frcnn_speed as fs
from common import sync


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="ZF")
    ap.add_argument("--iters", type=int, default=4)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="cc-prof-")
    with fs.corpus_solver(a.net, fs._data(tmp, 16), "cuda", os.path.join(tmp, "t")) as s:
        s.step(3)
        sync("cuda")
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t = time.perf_counter()
            s.step(a.iters)
            sync("cuda")
            dt = (time.perf_counter() - t) / a.iters
    print(f"{a.net}: {dt * 1e3:.1f} ms per step under the profiler")
    ka = prof.key_averages()
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40))
    for key in ("self_device_time_total", "self_cuda_time_total"):  # the name changed in torch 2.x
        try:
            print(ka.table(sort_by=key, row_limit=12, max_name_column_width=40))
            break
        except (AttributeError, KeyError, ValueError):
            continue


if __name__ == "__main__":
    main()
