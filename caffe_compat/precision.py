"""fp32 as Caffe computed it: no TensorFloat-32 on CUDA.

PyTorch lets cuDNN convolutions use TF32 on Ampere and later cards by default (10-bit
mantissa products, ~1e-3 relative error).  Caffe predates TF32, so its GPU numbers are
true fp32; a Net therefore runs its forward and backward passes inside
:func:`exact_fp32` unless built with ``allow_tf32=True`` (the fast, inexact choice).
The flags are global in torch, so they are set for the duration of a pass and restored
afterwards: code outside a Net keeps the user's choice.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch

__all__ = ["exact_fp32", "tf32_state"]


def _targets() -> List[Tuple[object, str, object]]:
    """(object, attribute, exact value) for each TF32 switch this torch has."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    mm = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if conv is not None and hasattr(conv, "fp32_precision") and mm is not None:
        # torch >= 2.9: the per-operator API (mixing it with the legacy flags is an error)
        return [(conv, "fp32_precision", "ieee"), (torch.backends.cuda.matmul, "fp32_precision", "ieee")]
    return [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]


def tf32_state() -> Tuple[object, ...]:
    """The current values of the switches :func:`exact_fp32` sets (for tests and logs)."""
    return tuple(getattr(o, a) for o, a, _ in _targets())


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """Run the block with TF32 off for cuDNN convolutions and cuBLAS matmuls."""
    if not enabled:
        yield
        return
    targets = _targets()
    saved = [getattr(o, a) for o, a, _ in targets]
    if all(s == v for s, (_, _, v) in zip(saved, targets)):
        yield  # already exact: nothing to set or restore
        return
    try:
        for o, a, v in targets:
            setattr(o, a, v)
        yield
    finally:
        for (o, a, _), s in zip(targets, saved):
            setattr(o, a, s)
