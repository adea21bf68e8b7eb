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
from common import randomize_weights, sync


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--net", default="ZF")
    ap.add_argument("--iters", type=int, default=4)
    a = ap.parse_args()
    from caffe_compat.config import cfg, cfg_from_file, cfg_from_list, temporary_cfg
    from caffe_compat.frcnn.train import SolverWrapper, combined_roidb, seed_everything

    tmp = tempfile.mkdtemp(prefix="cc-prof-")
    data = fs._data(tmp, 16)
    os.chdir(fs.FRCNN)
    with temporary_cfg():
        cfg_from_file("experiments/cfgs/faster_rcnn_end2end.yml")
        cfg_from_list(["DATA_DIR", data])
        seed_everything(cfg.RNG_SEED)
        _, roidb = combined_roidb("voc_2007_trainval")
        sw = SolverWrapper(f"models/pascal_voc/{a.net}/faster_rcnn_end2end/solver.prototxt", roidb,
                           os.path.join(tmp, "t"), device="cuda", save_state=False)
        s = sw.solver
        randomize_weights(s.net)
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
