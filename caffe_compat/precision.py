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

The commands' ``--precision`` (:data:`PRECISIONS`) picks how far to leave Caffe's numbers:

* ``fp32`` (default): the exact path above;
* ``tf32``: the net's ``allow_tf32`` for the run (TensorFloat-32 matmuls/convolutions on
  Ampere and later GPUs; on the CPU it changes nothing);
* ``bf16``: ``torch.autocast`` to bfloat16 (CUDA or CPU); weights, losses, the RPN's box
  arithmetic and the solver's update stay fp32; no loss scaling (bf16 has fp32's range);
* ``fp16``: ``torch.autocast`` to float16 on CUDA, training with dynamic loss scaling
  (``torch.amp.GradScaler``: an iteration whose gradients overflow is skipped and the
  scale halves).  Refused on the CPU: CPU float16 kernels are few and slow there, and
  bf16 is the CPU's reduced precision.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["exact_fp32", "cudnn_autotune", "pass_settings", "tf32_state", "PRECISIONS", "check_precision", "autocast_dtype",
           "autocast", "inference_precision", "install_training_precision", "SolverOptimizer"]

#: the ``--precision`` choices, exact first
PRECISIONS: Tuple[str, ...] = ("fp32", "tf32", "bf16", "fp16")

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


_tune_depth = 0
_tune_prev: List[bool] = []


@contextlib.contextmanager
def cudnn_autotune(enabled: bool = True) -> Iterator[None]:
    """Run the block with cuDNN's autotuner on (``torch.backends.cudnn.benchmark``).

    The first convolution of each new shape times cuDNN's algorithms and keeps the fastest
    (Caffe asked cuDNN's heuristic once per shape); later ones reuse it.  Every algorithm
    computes the same fp32 convolution (TF32 stays off unless allowed), so the numbers stay
    Caffe's within fp32 rounding.  Global in torch, hence set at the outermost pass and
    restored after it, as :func:`exact_fp32`.
    """
    global _tune_depth
    if not enabled:
        yield
        return
    with _lock:
        if _tune_depth == 0:
            _tune_prev[:] = [bool(torch.backends.cudnn.benchmark)]
            torch.backends.cudnn.benchmark = True
        _tune_depth += 1
    try:
        yield
    finally:
        with _lock:
            _tune_depth -= 1
            if _tune_depth == 0:
                torch.backends.cudnn.benchmark = _tune_prev[0]


@contextlib.contextmanager
def pass_settings(*, exact: bool, autotune: bool) -> Iterator[None]:
    """A net pass's torch switches: :func:`exact_fp32` and :func:`cudnn_autotune`."""
    with exact_fp32(exact), cudnn_autotune(autotune):
        yield


# ----------------------------------------------------------------------------- --precision
def check_precision(mode: str, device: Any = None) -> str:
    """``mode`` lower-cased if it is one of :data:`PRECISIONS` usable on ``device``, else a
    ``SchemaError`` saying what to use instead."""
    from caffe_compat.errors import SchemaError

    m = str(mode).strip().lower()
    if m not in PRECISIONS:
        raise SchemaError(f"unknown precision {str(mode)[:40]!r}; choose one of {', '.join(PRECISIONS)}")
    dev = torch.device("cpu") if device is None else torch.device(device)
    if m == "fp16" and dev.type != "cuda":
        raise SchemaError("precision fp16 needs a CUDA device (--gpu ID); on the CPU use bf16")
    return m


def autocast_dtype(mode: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs ``mode`` in, or None for the fp32 modes."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(mode).lower())


def autocast(mode: str, device: Any) -> "contextlib.AbstractContextManager[Any]":
    """``torch.autocast`` for bf16/fp16 on ``device``'s type; a no-op context for fp32/tf32."""
    dtype = autocast_dtype(mode)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


#: layer types kept in fp32 under autocast: box arithmetic (py-faster-rcnn's Python layers;
#: a box coordinate near 1000 has a 4-pixel step in bf16) and ROI pooling (its -FLT_MAX
#: sentinel does not exist in half precision); max pooling of upcast values is exact
FP32_LAYER_TYPES: Tuple[str, ...] = ("Python", "ROIPooling", "ROIAlign", "PSROIPooling")


def _to_fp32(module: Any, args: Tuple[Any, ...]) -> Tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype in (torch.float16, torch.bfloat16)
                 else a for a in args)


def keep_fp32_layers(net: Any) -> List[Any]:
    """Make :data:`FP32_LAYER_TYPES` layers of ``net`` take fp32 bottoms (forward pre-hooks);
    returns the hook handles (``.remove()`` them to undo)."""
    handles = []
    for e in getattr(net, "entries", ()):
        m = e.module
        if m is not None and e.type in FP32_LAYER_TYPES and hasattr(m, "register_forward_pre_hook"):
            handles.append(m.register_forward_pre_hook(_to_fp32))
    return handles


def _net_device(net: Any) -> torch.device:
    dev = getattr(net, "device", None)
    return torch.device(dev) if dev is not None else torch.device("cpu")


@contextlib.contextmanager
def inference_precision(net: Any, mode: str = "fp32") -> Iterator[str]:
    """Run ``net``'s forwards inside the block in ``mode`` (checked for its device).

    ``tf32`` sets the net's ``allow_tf32`` for the block (restored after it); ``bf16`` and
    ``fp16`` autocast.  Yields the checked mode.
    """
    m = check_precision(mode, _net_device(net))
    had = getattr(net, "allow_tf32", None)
    if m == "tf32" and had is not None:
        net.allow_tf32 = True
    handles = keep_fp32_layers(net) if autocast_dtype(m) is not None else []
    try:
        with autocast(m, _net_device(net)):
            yield m
    finally:
        for h in handles:
            h.remove()
        if m == "tf32" and had is not None:
            net.allow_tf32 = had


class SolverOptimizer(torch.optim.Optimizer):
    """A solver's update seen as a torch optimizer, so ``torch.amp.GradScaler`` can drive it:
    ``step()`` runs the solver's own Caffe update (clipping, ``iter_size``, decay, rule)
    on the gradients the scaler unscaled, and is skipped by the scaler when they overflow."""

    def __init__(self, solver: Any, update: Callable[[bool], float]) -> None:
        params = [info.param for info in solver.net.learnable_params()]
        super().__init__(params or [torch.zeros(0, requires_grad=True)], {})
        self._update = update
        self.display = False
        self.rate: Optional[float] = None

    def step(self, closure: Optional[Callable[[], Any]] = None) -> None:  # type: ignore[override]
        self.rate = self._update(self.display)


def install_training_precision(solver: Any, mode: str, *, scaler: Any = None) -> Optional[Any]:
    """Train ``solver`` (a :class:`caffe_compat.solver.Solver`) in ``mode`` from now on.

    ``tf32``: its nets' ``allow_tf32``.  ``bf16``/``fp16``: each forward under autocast (the
    backward follows the dtypes autocast chose), and for ``fp16`` (or a given ``scaler``)
    the loss scaled before backward, the gradients unscaled before the Caffe update, which
    is skipped for an iteration whose gradients are not finite (the scale then shrinks).
    Returns the ``GradScaler`` in use, or None.  Sets the solver's ``autocast_dtype`` and
    ``grad_scaler``, which its ForwardBackward and update read.
    """
    net = solver.net
    device = _net_device(net)
    m = check_precision(mode, device)
    if m == "tf32":
        for n in [net] + list(getattr(solver, "test_nets", []) or []):
            n.allow_tf32 = True
        return None
    if m == "fp32" and scaler is None:
        return None
    if scaler is None and m == "fp16":
        scaler = torch.amp.GradScaler(device.type)
    dtype = autocast_dtype(m)
    if dtype is not None:
        for n in [net] + list(getattr(solver, "test_nets", []) or []):
            keep_fp32_layers(n)

    solver.autocast_dtype = dtype
    solver.grad_scaler = scaler
    solver.skipped_iterations = 0
    return scaler
