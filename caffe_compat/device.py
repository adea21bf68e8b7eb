"""``--gpu ID`` -> a torch device, the same way for every command and library entry point.

Caffe's tools take ``-gpu ID`` (a negative id or none: the CPU).  One resolver, so every
command refuses a missing device with the same message.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from caffe_compat.errors import SchemaError

__all__ = ["resolve_device", "peak_memory", "peak_memory_line"]


def resolve_device(gpu: Optional[int]) -> torch.device:
    """``None`` or a negative id: the CPU; else ``cuda:<gpu>``, which must exist (a
    :class:`~caffe_compat.errors.SchemaError`, bad input, otherwise)."""
    if gpu is None or int(gpu) < 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SchemaError(f"--gpu {gpu}: no CUDA device is available here "
                          "(torch.cuda.is_available() is False); leave --gpu out to run on the CPU")
    n = torch.cuda.device_count()
    if int(gpu) >= n:
        raise SchemaError(f"--gpu {gpu}: there {'is' if n == 1 else 'are'} only {n} CUDA "
                          f"device{'s' if n != 1 else ''} (ids 0..{n - 1})")
    return torch.device(f"cuda:{int(gpu)}")


def peak_memory(device: "torch.device | str") -> Tuple[int, str]:
    """``(bytes, what)``: the peak memory of this process on ``device`` so far.

    CUDA: the caching allocator's peak of allocated tensor memory
    (``torch.cuda.max_memory_allocated``, what py-faster-rcnn's 3 GB figure for VGG16
    end2end compares with; the driver's context adds a few hundred MB to nvidia-smi's
    figure).  CPU: the process's peak resident set (``ru_maxrss``), which includes
    Python, torch and the data.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev)), "peak CUDA memory allocated"
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak resident memory"


def peak_memory_line(device: "torch.device | str") -> str:
    """``peak memory: 2.31 GB (peak CUDA memory allocated on cuda:0)`` for logs."""
    n, what = peak_memory(device)
    return f"peak memory: {n / 1e9:.2f} GB ({what} on {torch.device(device)})"
