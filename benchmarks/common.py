"""Shared helpers for the benchmarks: the corpus location and seeded random weights."""
from __future__ import annotations

import os
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
#: the shared corpus (CAFFE_COMPAT_CORPUS overrides, as for the tests)
CORPUS = pathlib.Path(os.environ.get("CAFFE_COMPAT_CORPUS", ROOT.parent / "shared" / "corpus"))


def randomize_weights(net) -> None:
    """Fill every weight matrix/filter bank with N(0, 1/fan_in) from the net's generator:
    activations keep their scale through deep nets (zero fillers would make a timing run
    of all-zero maps)."""
    with torch.no_grad():
        for info in net.learnable_params():
            p = info.param
            if p.dim() > 1:
                cpu = torch.empty(p.shape).normal_(0, (1.0 / p[0].numel()) ** 0.5, generator=net.generator)
                p.copy_(cpu)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
