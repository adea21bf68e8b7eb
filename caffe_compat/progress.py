"""What a training run shows and leaves behind: Caffe-style log lines, a progress bar with
an ETA, and a loss curve.

* :func:`setup_logging` prints the ``caffe_compat`` loggers' records the way Caffe's glog
  did (``I0612 10:11:12.345678  4242 solver.py:123] Iteration 20, loss = 0.53``), so
  Caffe's own log tools (``tools/extra/parse_log.py``) read them; the solver's lines
  (``Iteration N, loss = ...``, ``Train net output #k: ...``, ``Iteration N, lr = ...``)
  come from :mod:`caffe_compat.solver`.
* :class:`TrainingMonitor` is a solver callback: it records every iteration's loss, and on
  a terminal redraws one bottom line ``[#####-----] 120/1000 12% loss 0.53 0.21 s/it ETA
  3:05`` (log records are printed above it); elsewhere (a file, a pipe, CI) it writes a
  plain progress line now and then instead.
* :func:`draw_loss_curve` renders the recorded losses as a PNG with OpenCV (no matplotlib).
"""
from __future__ import annotations

import csv
import io
import logging
import math
import os
import sys
import threading
import time
from typing import IO, Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = ["GlogFormatter", "setup_logging", "TrainingMonitor", "draw_loss_curve",
           "write_loss_csv", "format_duration"]

log = logging.getLogger("caffe_compat.train")

_LEVEL_LETTER = {logging.DEBUG: "I", logging.INFO: "I", logging.WARNING: "W", logging.ERROR: "E",
                 logging.CRITICAL: "F"}


class GlogFormatter(logging.Formatter):
    """glog's line prefix: ``Lmmdd hh:mm:ss.uuuuuu threadid file:line] message``."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        usec = int((record.created - int(record.created)) * 1e6)
        letter = _LEVEL_LETTER.get(record.levelno, "I")
        head = (f"{letter}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:"
                f"{t.tm_sec:02d}.{usec:06d} {record.process:5d} {record.filename}:{record.lineno}] ")
        msg = record.getMessage()
        if record.exc_info:
            msg += "\n" + self.formatException(record.exc_info)
        return head + msg


class _BarAwareHandler(logging.StreamHandler):
    """A stream handler that clears the progress bar before a record and redraws it after."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(stream)
        self.monitor: Optional["TrainingMonitor"] = None

    def emit(self, record: logging.LogRecord) -> None:
        mon = self.monitor
        if mon is not None and mon.bar_visible:
            with mon.lock:
                mon._clear_bar()
                super().emit(record)
                mon._draw_bar()
        else:
            super().emit(record)


_HANDLER: Optional[_BarAwareHandler] = None


def setup_logging(stream: Optional[IO[str]] = None, level: int = logging.INFO,
                  glog: bool = True) -> logging.Handler:
    """Print the ``caffe_compat`` loggers' records on ``stream`` (default stderr), glog style.

    Idempotent: a second call replaces the handler installed by the first.
    """
    global _HANDLER
    logger = logging.getLogger("caffe_compat")
    if _HANDLER is not None:
        logger.removeHandler(_HANDLER)
    h = _BarAwareHandler(stream if stream is not None else sys.stderr)
    h.setFormatter(GlogFormatter() if glog else logging.Formatter("%(message)s"))
    logger.addHandler(h)
    logger.setLevel(level)
    logger.propagate = False
    _HANDLER = h
    return h


def format_duration(seconds: float) -> str:
    """``h:mm:ss`` (or ``m:ss`` under an hour); ``--:--`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class TrainingMonitor:
    """Solver callback recording losses and showing progress towards ``total`` iterations.

    ``attach(solver)`` registers it.  ``history`` holds ``(iteration, loss, smoothed
    loss, lr)`` rows (iteration = iterations done).  On a TTY (``tty=None`` asks the
    stream) a bar is redrawn at most ``refresh`` seconds apart; otherwise a plain line
    is written every ``every`` iterations (default: about 20 lines per run), with
    py-faster-rcnn's ``speed: X s / iter``.
    """

    def __init__(self, total: int, *, start: int = 0, stream: Optional[IO[str]] = None,
                 tty: Optional[bool] = None, every: Optional[int] = None, refresh: float = 0.2,
                 enabled: bool = True, label: str = "") -> None:
        self.total = int(total)
        self.start = int(start)
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            isatty = getattr(self.stream, "isatty", None)
            tty = bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"
        self.tty = bool(tty) and enabled
        self.enabled = enabled
        n = max(1, self.total - self.start)
        self.every = int(every) if every else max(1, int(math.ceil(n / 20.0)))
        self.refresh = float(refresh)
        self.label = label
        self.history: List[Tuple[int, float, float, float]] = []
        self.lock = threading.RLock()
        self.bar_visible = False
        self._t0: Optional[float] = None
        self._first_iter: Optional[int] = None
        self._last_draw = 0.0
        self._line = ""
        self._steady_t0: Optional[float] = None
        self._steady_iter: Optional[int] = None
        if _HANDLER is not None and self.tty:
            _HANDLER.monitor = self

    # ------------------------------------------------------------------ solver hook
    def attach(self, solver: Any) -> "TrainingMonitor":
        solver.add_callback(self.on_iteration, on="iteration")
        return self

    def on_iteration(self, solver: Any, info: Any) -> None:
        now = time.perf_counter()
        it = int(info.iter)
        self.history.append((it, float(info.loss), float(info.smoothed_loss), float(info.lr)))
        if self._t0 is None:
            self._t0, self._first_iter = now, it - 1
        elif self._steady_t0 is None:
            # the first iteration pays for warm-up (allocations, caches): time from the second
            self._steady_t0, self._steady_iter = now, it
        if not self.enabled:
            return
        if self.tty:
            if now - self._last_draw >= self.refresh or it >= self.total:
                self._last_draw = now
                with self.lock:
                    self._clear_bar()
                    self._line = self._bar_text(it, info)
                    self._draw_bar()
        elif (it - self.start) % self.every == 0 or it >= self.total:
            rate = self.seconds_per_iter()
            eta = rate * max(0, self.total - it) if rate is not None else None
            pct = 100.0 * it / max(1, self.total)
            speed = f"{rate:.3f}s / iter" if rate is not None else "-- s / iter"
            self.stream.write(f"{self.label}progress: iteration {it}/{self.total} ({pct:.1f}%), "
                              f"loss {info.smoothed_loss:.4g}, speed: {speed}, ETA "
                              f"{format_duration(eta) if eta is not None else '--:--'}\n")
            self.stream.flush()

    # ------------------------------------------------------------------ numbers
    def seconds_per_iter(self) -> Optional[float]:
        """Average wall time per iteration (from the second iteration on when possible)."""
        if not self.history:
            return None
        now = time.perf_counter()
        last = self.history[-1][0]
        if self._steady_t0 is not None and self._steady_iter is not None and last > self._steady_iter:
            return (now - self._steady_t0) / (last - self._steady_iter)
        if self._t0 is not None and self._first_iter is not None and last > self._first_iter:
            return (now - self._t0) / (last - self._first_iter)
        return None

    @property
    def iterations(self) -> np.ndarray:
        return np.array([h[0] for h in self.history], dtype=np.int64)

    @property
    def losses(self) -> np.ndarray:
        return np.array([h[1] for h in self.history], dtype=np.float64)

    @property
    def smoothed_losses(self) -> np.ndarray:
        return np.array([h[2] for h in self.history], dtype=np.float64)

    def load_history(self, rows: Sequence[Sequence[float]]) -> None:
        """Put back the rows of an earlier run (a resumed snapshot's)."""
        self.history = [(int(r[0]), float(r[1]), float(r[2]), float(r[3])) for r in rows]

    # ------------------------------------------------------------------ bar
    def _bar_text(self, it: int, info: Any) -> str:
        width = 24
        frac = min(1.0, max(0.0, it / max(1, self.total)))
        filled = int(round(frac * width))
        rate = self.seconds_per_iter()
        eta = format_duration(rate * max(0, self.total - it)) if rate is not None else "--:--"
        speed = f"{rate:.2f} s/it" if rate is not None else "-- s/it"
        return (f"{self.label}[{'#' * filled}{'-' * (width - filled)}] {it}/{self.total} "
                f"{100 * frac:3.0f}% loss {info.smoothed_loss:.4g} {speed} ETA {eta}")

    def _clear_bar(self) -> None:
        if self.bar_visible:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.bar_visible = False

    def _draw_bar(self) -> None:
        if self.tty and self._line:
            self.stream.write(self._line)
            self.stream.flush()
            self.bar_visible = True

    def close(self) -> None:
        """End the bar's line (the bar stays visible) and stop coordinating with logging."""
        with self.lock:
            if self.bar_visible:
                self.stream.write("\n")
                self.stream.flush()
                self.bar_visible = False
            self._line = ""
        if _HANDLER is not None and _HANDLER.monitor is self:
            _HANDLER.monitor = None

    # ------------------------------------------------------------------ outputs
    def write_outputs(self, png_path: Optional[str], csv_path: Optional[str] = None,
                      title: str = "") -> List[str]:
        """Write the loss curve PNG (and a CSV of the history); returns the paths written."""
        out: List[str] = []
        if not self.history:
            return out
        if csv_path:
            write_loss_csv(csv_path, self.history)
            out.append(csv_path)
        if png_path:
            draw_loss_curve(png_path, self.iterations, self.losses, self.smoothed_losses, title=title)
            out.append(png_path)
        return out


def write_loss_csv(path: str, rows: Sequence[Sequence[float]]) -> None:
    """``iteration,loss,smoothed_loss,lr`` rows, written atomically."""
    from caffe_compat.atomic import atomic_write

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["iteration", "loss", "smoothed_loss", "lr"])
    for r in rows:
        w.writerow([int(r[0])] + [f"{float(v):.9g}" for v in r[1:]])
    atomic_write(path, buf.getvalue().encode("utf-8"))


def _nice_step(span: float, n: int = 5) -> float:
    """A 1/2/5 x 10^k step giving about ``n`` ticks over ``span``."""
    if span <= 0 or not math.isfinite(span):
        return 1.0
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return m * mag
    return 10 * mag


def _tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def draw_loss_curve(path: str, iterations: Sequence[float], losses: Sequence[float],
                    smoothed: Optional[Sequence[float]] = None, *, title: str = "",
                    size: Tuple[int, int] = (900, 520)) -> np.ndarray:
    """Plot loss (light) and smoothed loss (dark) against iterations; write a PNG atomically.

    Non-finite losses are left out; the y axis starts at 0 and ends near the 99th
    percentile so one early spike does not flatten the curve.  Returns the BGR image.
    """
    import cv2

    from caffe_compat.atomic import atomic_write

    W, H = int(size[0]), int(size[1])
    img = np.full((H, W, 3), 255, dtype=np.uint8)
    x = np.asarray(iterations, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    ys = np.asarray(smoothed, dtype=np.float64) if smoothed is not None else None
    ok = np.isfinite(y)
    left, right, top, bottom = 78, 24, 44, 56
    pw, ph = W - left - right, H - top - bottom
    font = cv2.FONT_HERSHEY_SIMPLEX
    grey, dark = (200, 200, 200), (40, 40, 40)
    if ok.any():
        xmin, xmax = float(x[ok].min()) - 1.0, float(x[ok].max())   # iteration 1 follows 0
        if xmax <= xmin:
            xmax = xmin + 1
        ymax = float(np.percentile(y[ok], 99)) * 1.08
        if ys is not None and np.isfinite(ys).any():
            ymax = max(ymax, float(np.nanmax(np.where(np.isfinite(ys), ys, np.nan))) * 1.02)
        ymax = ymax if ymax > 0 else 1.0
    else:
        xmin, xmax, ymax = 0.0, 1.0, 1.0

    def px(xv: np.ndarray, yv: np.ndarray) -> np.ndarray:
        u = left + (xv - xmin) / (xmax - xmin) * pw
        v = top + ph - np.clip(yv, 0, ymax) / ymax * ph
        return np.stack([u, v], 1).round().astype(np.int32)

    # grid, ticks and labels
    ystep = _nice_step(ymax)
    t = 0.0
    while t <= ymax + 1e-12:
        v = int(round(top + ph - t / ymax * ph))
        cv2.line(img, (left, v), (left + pw, v), grey, 1)
        lab = _tick_label(t)
        (tw, th), _ = cv2.getTextSize(lab, font, 0.45, 1)
        cv2.putText(img, lab, (left - 8 - tw, v + th // 2), font, 0.45, dark, 1, cv2.LINE_AA)
        t += ystep
    xstep = _nice_step(xmax - xmin)
    t = math.ceil(xmin / xstep) * xstep
    while t <= xmax + 1e-9:
        u = int(round(left + (t - xmin) / (xmax - xmin) * pw))
        cv2.line(img, (u, top), (u, top + ph), grey, 1)
        lab = _tick_label(t)
        (tw, th), _ = cv2.getTextSize(lab, font, 0.45, 1)
        cv2.putText(img, lab, (u - tw // 2, top + ph + 8 + th), font, 0.45, dark, 1, cv2.LINE_AA)
        t += xstep
    cv2.rectangle(img, (left, top), (left + pw, top + ph), dark, 1)
    # curves
    if ok.sum() >= 2:
        cv2.polylines(img, [px(x[ok], y[ok])], False, (235, 190, 150), 1, cv2.LINE_AA)
    elif ok.sum() == 1:
        cv2.circle(img, tuple(int(c) for c in px(x[ok], y[ok])[0]), 3, (235, 190, 150), -1)
    if ys is not None:
        oks = np.isfinite(ys)
        if oks.sum() >= 2:
            cv2.polylines(img, [px(x[oks], ys[oks])], False, (160, 60, 10), 2, cv2.LINE_AA)
    # captions
    cv2.putText(img, title or "training loss", (left, 28), font, 0.6, dark, 1, cv2.LINE_AA)
    cv2.putText(img, "iteration", (left + pw // 2 - 36, H - 14), font, 0.5, dark, 1, cv2.LINE_AA)
    lx = left + pw - 250
    cv2.line(img, (lx, 22), (lx + 24, 22), (235, 190, 150), 2)
    cv2.putText(img, "loss", (lx + 30, 27), font, 0.45, dark, 1, cv2.LINE_AA)
    cv2.line(img, (lx + 80, 22), (lx + 104, 22), (160, 60, 10), 2)
    cv2.putText(img, "smoothed loss", (lx + 110, 27), font, 0.45, dark, 1, cv2.LINE_AA)
    ok_enc, buf = cv2.imencode(".png", img)
    if not ok_enc:  # pragma: no cover - OpenCV always encodes PNG
        raise RuntimeError("cannot encode the loss curve as PNG")
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    atomic_write(path, buf.tobytes())
    return img
