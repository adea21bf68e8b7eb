"""fp32 as Caffe computed it: no TensorFloat-32 on CUDA.

PyTorch lets cuDNN convolutions use TF32 on Ampere and later cards by default (10-bit
mantissa products, ~1e-3 relative error).  Caffe predates TF32, so its GPU numbers are
true fp32; a Net therefore runs its forward and backward passes inside
:func:`exact_fp32` unless built with ``allow_tf32=True`` (the fast, inexact choice).

The switches are global in torch, so they are set when the first pass begins and restored
when the last one ends (a lock and a depth count make this hold across threads).  torch 2.9
added per-operator switches beside the legacy ones and raises when the two disagree, so the
switches are set through the API the user's current state is consistent with:
``torch.set_float32_matmul_precision`` for cuBLAS (it keeps both APIs in step), the legacy
``cudnn.allow_tf32`` for cuDNN unless the user already mixed the APIs, then the per-op one.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Iterator, List, Tuple

import torch

__all__ = ["exact_fp32", "tf32_state"]

_lock = threading.Lock()
_depth = 0
_undo: List[Callable[[], None]] = []


def _conv_allows_tf32() -> bool:
    conv = getattr(torch.backends.cudnn, "conv", None)
    value = getattr(conv, "fp32_precision", None)
    if value in ("ieee", "tf32"):
        return value == "tf32"
    try:
        return bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # mixed legacy/per-op settings: the per-op value decides for convs
        return False


def tf32_state() -> Tuple[bool, bool]:
    """(cuDNN convolutions may use TF32, cuBLAS matmuls may use TF32) as torch is set now."""
    return _conv_allows_tf32(), torch.get_float32_matmul_precision() != "highest"


def _set_exact() -> List[Callable[[], None]]:
    undo: List[Callable[[], None]] = []
    prev_mm = torch.get_float32_matmul_precision()
    if prev_mm != "highest":
        torch.set_float32_matmul_precision("highest")
        undo.append(lambda: torch.set_float32_matmul_precision(prev_mm))
    try:
        prev_cudnn = bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:  # the user mixed the APIs: only the per-op switch is safe to touch
        conv = torch.backends.cudnn.conv
        prev_conv = conv.fp32_precision
        if prev_conv != "ieee":
            conv.fp32_precision = "ieee"
            undo.append(lambda: setattr(conv, "fp32_precision", prev_conv))
    else:
        if prev_cudnn:
            torch.backends.cudnn.allow_tf32 = False
            undo.append(lambda: setattr(torch.backends.cudnn, "allow_tf32", prev_cudnn))
    return undo


@contextlib.contextmanager
def exact_fp32(enabled: bool = True) -> Iterator[None]:
    """Run the block with TF32 off for cuDNN convolutions and cuBLAS matmuls."""
    global _depth
    if not enabled:
        yield
        return
    with _lock:
        if _depth == 0:
            _undo[:] = _set_exact()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for fn in reversed(_undo):
                    fn()
                _undo.clear()
