"""Benchmark: Fast R-CNN's SVD compression of VGG16's fc6/fc7 (``caffe-compat compress``).

    .venv/bin/python benchmarks/compress_svd.py [--model VGG16] [--gesdd]

Builds rbgirshick/fast-rcnn's ``models/<model>/test.prototxt`` and its ``compressed/``
definition from the shared corpus with seeded N(0, 1/fan_in) weights, then times each
layer's float64 factorization (``truncated_svd``) and the whole ``compress_net``, and
checks the reported error against ``||W - U L|| / ||W||`` computed directly.  ``--gesdd``
also times ``torch.linalg.svd`` (LAPACK's divide and conquer) on the same matrices, the
method the Gram/eigh route replaces (minutes for fc6 on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import CORPUS, randomize_weights  # noqa: E402

from caffe_compat.frcnn.compress import compress_net, compressed_pairs, truncated_svd  # noqa: E402
from caffe_compat.net import Net  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="VGG16", help="VGG16, VGG_CNN_M_1024 or CaffeNet")
    ap.add_argument("--gesdd", action="store_true", help="also time torch.linalg.svd (slow)")
    args = ap.parse_args()
    d = CORPUS / "rbgirshick-fast-rcnn" / "models" / args.model
    if not (d / "compressed" / "test.prototxt").is_file():
        sys.exit(f"corpus definitions not found under {d}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    t = time.perf_counter()
    net = Net(str(d / "test.prototxt"), seed=0)
    randomize_weights(net)
    svd = Net(str(d / "compressed" / "test.prototxt"), seed=0)
    print(f"nets built in {time.perf_counter() - t:.1f} s")
    for x, xl, _ in compressed_pairs(net, svd):
        w = net.layer(x).weight.detach()
        l = svd.layer(xl).num_output
        t = time.perf_counter()
        lower, upper, err = truncated_svd(w, l)
        dt = time.perf_counter() - t
        a = w.double()
        direct = float(torch.linalg.norm(a - upper @ lower) / torch.linalg.norm(a))
        print(f"{x}: {tuple(w.shape)} l = {l}: Gram + eigh (float64) {dt:.1f} s, "
              f"error {err:.6f} (direct {direct:.6f})")
        if args.gesdd:
            t = time.perf_counter()
            torch.linalg.svd(a, full_matrices=False)
            print(f"{x}: torch.linalg.svd (float64) {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    compress_net(net, svd)
    print(f"compress_net (all layers, copies included) {time.perf_counter() - t:.1f} s")


if __name__ == "__main__":
    main()
