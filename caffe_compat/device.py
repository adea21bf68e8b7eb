"""``--gpu ID`` -> a torch device, the same way for every command and library entry point.

Caffe's tools take ``-gpu ID`` (a negative id or none: the CPU).  One resolver, so every
command refuses a missing device with the same message.
"""
from __future__ import annotations

from typing import Optional

import torch

from caffe_compat.errors import SchemaError

__all__ = ["resolve_device"]


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
