"""``torch.compile`` for a Net's whole forward, with a fallback that keeps the run going.

Where it pays: on a GPU, a net of many small layers (ZF Faster R-CNN's RPN and head,
MobileNet's depthwise blocks) is bound by kernel launches and elementwise passes;
Inductor fuses the elementwise layers (ReLU, Scale, Eltwise, the BatchNorm arithmetic)
into the kernels around them and the Python layers stay eager (graph breaks).  On the CPU
the default inference plan already fuses what pays, and compiling costs seconds to
minutes per input shape, so compiling is an opt-in (``--compile`` on ``train``/``test``/
``detect``), never the default.

A compiler failure (no C++ compiler, an unsupported operation, a backend error) must not
end a two-day training run: the first failing call logs one warning naming the error and
the net runs eagerly from then on, computing exactly what it computes without compiling.
(Code before the failing graph has run once by then: in a training net whose data layer
pulls minibatches, the failed call may have drawn one; the run goes on from the next.)
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Optional, Union

import torch

__all__ = ["CompiledForward"]

log = logging.getLogger("caffe_compat.compile")


class CompiledForward:
    """``fn(inputs)`` through ``torch.compile(fn, backend=...)``; eager after a failure.

    ``fallback=False`` re-raises instead (for tests of a backend, or users who would rather
    stop).  ``failed`` holds the error that switched to eager, ``calls_compiled`` counts
    the calls that ran compiled.
    """

    def __init__(self, fn: Callable[[Dict[str, Any]], Any], *, backend: Union[str, Callable] = "inductor",
                 mode: Optional[str] = None, dynamic: Optional[bool] = None, fallback: bool = True,
                 name: str = "net") -> None:
        self.fn = fn
        self.backend = backend
        self.fallback = bool(fallback)
        self.name = name
        self.failed: Optional[BaseException] = None
        self.calls_compiled = 0
        kwargs: Dict[str, Any] = {"backend": backend, "dynamic": dynamic}
        if mode is not None:
            kwargs["mode"] = mode
        self._compiled = torch.compile(fn, **kwargs)

    def __call__(self, inputs: Dict[str, Any]) -> Any:
        if self.failed is not None:
            return self.fn(inputs)
        try:
            out = self._compiled(inputs)
        except Exception as e:  # noqa: BLE001 - any compiler failure: run eagerly instead
            # caffe-compat's own errors (bad input, a layer's refusal) are the net's, not the
            # compiler's: they surface as they would eagerly
            from caffe_compat.errors import CaffeCompatError

            if isinstance(e, CaffeCompatError) or not self.fallback:
                raise
            self.failed = e
            cause = getattr(e, "inner_exception", None) or e.__cause__ or e  # the backend's own error
            text = str(cause).strip()
            first = text.splitlines()[0] if text else type(cause).__name__
            log.warning("torch.compile of %s failed (%s: %s); running eagerly from now on",
                        self.name, type(cause).__name__, first[:300])
            return self.fn(inputs)
        self.calls_compiled += 1
        return out
