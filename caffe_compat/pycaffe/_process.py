"""pycaffe's process-level odds and ends: logging, timers, and the multi-GPU switches.

``init_log``/``log`` map glog onto Python's ``logging`` (glog's minloglevel 0..3 = INFO,
WARNING, ERROR, FATAL).  The multi-process switches (``set_solver_count``, ``set_solver_rank``,
``set_multiprocess``) are kept and reported back, as in a Caffe build without NCCL, where
one process trains; ``has_nccl()`` is False and ``NCCL`` refuses to start, naming why.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any, Optional

_GLOG_LEVELS = {0: logging.INFO, 1: logging.WARNING, 2: logging.ERROR, 3: logging.CRITICAL}
_state = {"solver_count": 1, "solver_rank": 0, "multiprocess": False}
_log = logging.getLogger("caffe_compat")


def init_log(level: Optional[int] = None, std_err: bool = True) -> None:
    """Caffe's ``InitLog``: messages at ``level`` (glog's minloglevel, default 0 = INFO) and
    above go to stderr (``std_err=False``: stdout)."""
    lvl = _GLOG_LEVELS.get(int(level) if level is not None else 0, logging.INFO)
    handler = logging.StreamHandler(sys.stderr if std_err else sys.stdout)
    handler.setFormatter(logging.Formatter("%(levelname).1s%(asctime)s %(name)s] %(message)s",
                                           "%m%d %H:%M:%S"))
    for h in list(_log.handlers):
        if getattr(h, "_caffe_init_log", False):
            _log.removeHandler(h)
    handler._caffe_init_log = True  # type: ignore[attr-defined]
    _log.addHandler(handler)
    _log.setLevel(lvl)


def log(message: str) -> None:
    """Caffe's ``LOG(INFO) << message``."""
    _log.info("%s", message)


def has_nccl() -> bool:
    """caffe-compat trains in one process (no NCCL multi-GPU)."""
    return False


def set_solver_count(count: int) -> None:
    _state["solver_count"] = int(count)


def solver_count() -> int:
    return int(_state["solver_count"])


def set_solver_rank(rank: int) -> None:
    _state["solver_rank"] = int(rank)


def solver_rank() -> int:
    return int(_state["solver_rank"])


def set_multiprocess(multiprocess: bool) -> None:
    _state["multiprocess"] = bool(multiprocess)


class NCCL:
    """Caffe's multi-GPU synchronizer; unavailable here, as in a Caffe built without NCCL."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("multi-GPU training (caffe.NCCL) is not available in caffe-compat: "
                           "train in one process (caffe.has_nccl() is False)")

    @staticmethod
    def new_uid() -> bytes:
        raise RuntimeError("multi-GPU training (caffe.NCCL) is not available in caffe-compat")


class Timer:
    """Caffe's ``Timer``: ``start()``, ``stop()``, ``ms`` (milliseconds between them, or up to
    now while running)."""

    def __init__(self) -> None:
        self._t0: Optional[float] = None
        self._elapsed = 0.0
        self._running = False

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._running = True

    def stop(self) -> None:
        if self._running and self._t0 is not None:
            self._elapsed = time.perf_counter() - self._t0
        self._running = False

    @property
    def ms(self) -> float:
        if self._running and self._t0 is not None:
            return (time.perf_counter() - self._t0) * 1e3
        return self._elapsed * 1e3
