"""Diagnose torch's CUDA average pooling backward in channels-last layout (needs CUDA).

    python benchmarks/gpu_diag_avgpool.py

Compares ``F.avg_pool2d``'s input gradient on CUDA with a channels-last input against the
CPU for padded / unpadded windows, divisor_override, and NCHW- vs NHWC-contiguous output
gradients; prints the cases that differ.  ``layers/vision.py``'s ``_avg_pool2d`` makes
such inputs contiguous on CUDA because of what this found on torch 2.11 (H200).
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def main() -> None:
    print("torch", torch.__version__, torch.cuda.get_device_name(0))
    g = torch.Generator().manual_seed(0)
    bad = 0
    for (k, s, p, ceil, cip, div), gcl in itertools.product(
            [(3, 2, 1, True, True, None), (3, 2, 1, False, True, None), (2, 2, 0, False, True, None),
             (3, 1, 1, False, True, None), (3, 2, 0, False, True, 1), (3, 1, 0, False, True, 1),
             (5, 1, 2, False, True, None), (3, 2, 1, True, False, None)], [False, True]):
        x = torch.randn(2, 8, 9, 11, generator=g)
        y = F.avg_pool2d(x, k, s, p, ceil, cip, div)
        gy = torch.randn(y.shape, generator=g)
        xs = x.clone().requires_grad_(True)
        ref, = torch.autograd.grad(F.avg_pool2d(xs, k, s, p, ceil, cip, div), xs, gy)
        xc = x.cuda().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        gyc = gy.cuda().contiguous(memory_format=torch.channels_last) if gcl else gy.cuda()
        yc = F.avg_pool2d(xc, k, s, p, ceil, cip, div)
        gx, = torch.autograd.grad(yc, xc, gyc)
        fwd = (yc.cpu() - y).abs().max().item()
        err = (gx.cpu() - ref).abs().max().item()
        ok = err < 1e-5 and fwd < 1e-5
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} k{k} s{s} p{p} ceil={ceil} count_include_pad={cip} divisor={div} "
              f"grad_out {'NHWC' if gcl else 'NCHW'}: fwd err {fwd:.1e}, grad err {err:.1e}")
    print(f"{bad} bad cases")


if __name__ == "__main__":
    main()
