"""Caffe's ``caffe train`` on caffe_compat: a solver, its snapshots, signals and progress.

:func:`train_plain` runs a solver prototxt whose nets read their own data layers, as
``caffe train --solver S [--weights W | --snapshot STATE]`` does: the solver's own
``max_iter``, ``snapshot`` interval and ``snapshot_prefix``.  Around the solver it adds
what a training run needs and Caffe's tool had:

* :class:`TrainSolver`: snapshots named ``<prefix>[_<infix>]_iter_<N>`` (in ``output_dir``
  when given), weights as ``.caffemodel`` and/or ``.safetensors`` (``formats``), and a
  ``.solverstate`` that also keeps the loss history and a data loader's position, so
  ``resume=`` continues a run exactly;
* :func:`stop_on_signals`: SIGINT/SIGTERM write a snapshot of the iteration in progress and
  stop cleanly (a second signal aborts at once);
* :class:`~caffe_compat.progress.TrainingMonitor`: Caffe's log lines, a progress bar with an
  ETA, and the loss curve (PNG and CSV) at the end.

The loop is :class:`TrainerBase` (detectron2's shape: a solver, the iteration loop and
hooks called before training, after each step and after training); a run is that
trainer with :func:`default_hooks` -- :class:`ProgressHook` (log, progress, loss curve),
:class:`ResumeHook` and :class:`SignalHook`.  py-faster-rcnn's trainer
(:mod:`caffe_compat.frcnn.train`) is the same trainer plus its data hook (roidb feeding)
and :class:`PeriodicSnapshotHook`; its solver un-normalizes ``bbox_pred`` in snapshots
(:meth:`TrainSolver.deploy_weights`).  Nothing here knows about it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import struct
import threading
from dataclasses import dataclass, field
from typing import Any, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from caffe_compat.errors import SchemaError, SolverError
from caffe_compat.progress import TrainingMonitor
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver import SnapshotInfo, Solver

__all__ = [
    "FORMATS", "parse_formats", "load_solver_param", "train_net_param", "resolve_net_paths",
    "seed_everything", "read_state_extras", "TrainSolver", "stop_on_signals", "TrainResult",
    "finish_outputs", "HookBase", "TrainerBase", "ProgressHook", "ResumeHook", "SignalHook",
    "PeriodicSnapshotHook", "DistributedHook", "default_hooks", "run_trainer", "train_plain", "EXTRAS_PREFIX",
]

log = logging.getLogger("caffe_compat.train")

#: snapshot formats and their file extensions
FORMATS: Dict[str, str] = {"caffemodel": ".caffemodel", "safetensors": ".safetensors"}

#: prefix of caffe-compat's own entries in a ``.solverstate`` (tensors ``frcnn.*``, metadata
#: key ``frcnn``): the name they have had since the first states were written, kept so
#: that those states still resume
EXTRAS_PREFIX = "frcnn"

SolverSource = Union[str, "os.PathLike[str]", "caffe_pb2.SolverParameter"]


def parse_formats(fmt: Union[str, Sequence[str]]) -> Tuple[str, ...]:
    """``"caffemodel"``, ``"safetensors"``, ``"both"`` or a list of them -> a tuple of formats.

    The first format is the one a snapshot's ``.solverstate`` points at.
    """
    items = [fmt] if isinstance(fmt, str) else list(fmt)
    out: List[str] = []
    for item in items:
        for f in str(item).split(","):
            f = f.strip().lower()
            if not f:
                continue
            names = list(FORMATS) if f == "both" else [f]
            for n in names:
                if n not in FORMATS:
                    raise SchemaError(f"unknown snapshot format '{f}'; allowed: caffemodel, "
                                      "safetensors, both")
                if n not in out:
                    out.append(n)
    if not out:
        raise SchemaError("no snapshot format given; allowed: caffemodel, safetensors, both")
    return tuple(out)


# ---------------------------------------------------------------------------- solvers
def train_net_param(param: "caffe_pb2.SolverParameter") -> Optional["caffe_pb2.NetParameter"]:
    """The solver's train net definition (inline, or read from its file), or None when its
    file does not exist from the current directory."""
    from caffe_compat.io import read_net_text

    for f in ("train_net_param", "net_param"):
        if param.HasField(f):
            return getattr(param, f)
    for f in ("train_net", "net"):
        if param.HasField(f):
            path = getattr(param, f)
            if os.path.exists(path):
                return read_net_text(path)
    return None


def load_solver_param(solver: SolverSource) -> "caffe_pb2.SolverParameter":
    """Read and upgrade a solver definition as :class:`Solver` does (a copy, so callers
    may change it: the default ``snapshot_prefix`` is the solver file's name)."""
    p = Solver._read_param(solver)
    out = caffe_pb2.SolverParameter()
    out.CopyFrom(p)
    return out


def resolve_net_paths(param: "caffe_pb2.SolverParameter", search_dirs: Sequence[str]) -> List[str]:
    """Make the solver's net paths that do not exist relative to the current directory
    point into ``search_dirs`` (same relative path, else same file name).  Returns notes."""
    notes: List[str] = []

    def fix(path: str) -> str:
        if os.path.exists(path):
            return path
        for d in search_dirs:
            for cand in (os.path.join(d, path), os.path.join(d, os.path.basename(path))):
                if os.path.exists(cand):
                    notes.append(f"net file '{path}' not found from {os.getcwd()}: using {cand}")
                    return os.path.abspath(cand)
        return path

    for f in ("train_net", "net"):
        if param.HasField(f):
            setattr(param, f, fix(getattr(param, f)))
    for i, t in enumerate(list(param.test_net)):
        param.test_net[i] = fix(t)
    return notes


def seed_everything(seed: int) -> None:
    """Seed numpy's global generator and torch's (py-faster-rcnn's ``np.random.seed(cfg.RNG_SEED);
    caffe.set_random_seed(cfg.RNG_SEED)``)."""
    np.random.seed(int(seed) % (2 ** 32))
    torch.manual_seed(int(seed))


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def read_state_extras(path: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
    """The ``frcnn.*`` tensors and the ``frcnn`` metadata (:data:`EXTRAS_PREFIX`) of a
    caffe-compat ``.solverstate`` (None for Caffe's binaryproto states).  Reads only those
    entries, not the history."""
    from safetensors import safe_open

    from caffe_compat.solver import STATE_FORMAT

    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (n,) = struct.unpack("<Q", head)
            if n > os.path.getsize(path) - 8 or n < 2:
                return None
            header = json.loads(f.read(n).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        return None
    tensors: Dict[str, torch.Tensor] = {}
    keys = [k for k in header if k.startswith(EXTRAS_PREFIX + ".")]
    if keys:
        with safe_open(path, framework="pt") as st:
            for k in keys:
                tensors[k] = st.get_tensor(k)
    return tensors, json.loads(meta.get(EXTRAS_PREFIX, "{}") or "{}")


class TrainSolver(Solver):
    """A :class:`Solver` whose snapshots are written the way ``caffe-compat train`` writes them.

    * names: ``<output_dir>/<basename(snapshot_prefix)>[_<infix>]_iter_<N><ext>`` (with
      ``output_dir=None``: Caffe's ``<snapshot_prefix>_iter_<N><ext>``);
    * ``formats``: ``caffemodel`` and/or ``safetensors`` weights, plus a ``.solverstate``
      (unless ``save_state=False``); ``snapshot_format: HDF5`` gives Caffe's HDF5 pair;
    * the ``.solverstate`` also keeps the loss history (``monitor``) and the position of a
      data ``loader`` with ``state_dict``/``load_state_dict``, which :meth:`restore` puts back.

    Subclasses change what a snapshot holds through two hooks: :meth:`deploy_weights` (the
    weights as the files should hold them) and :meth:`_state_entries` /
    :meth:`_restore_entries` (extra entries of the ``.solverstate``).
    """

    def __init__(self, solver: SolverSource, *, output_dir: Optional[str] = None, infix: str = "",
                 formats: Sequence[str] = ("caffemodel",), save_state: bool = True, **kw: Any) -> None:
        super().__init__(solver, **kw)
        self.output_dir = None if output_dir is None else os.path.abspath(output_dir)
        self.infix = str(infix or "")
        self.formats = parse_formats(formats)
        #: write a .solverstate with every snapshot (needed to resume)
        self.save_state = bool(save_state)
        self.loader: Optional[Any] = None
        self.monitor: Optional[TrainingMonitor] = None
        #: first-format model file of every snapshot written, in order
        self.snapshot_paths: List[str] = []
        self.check_snapshots_spare_inputs()

    # ------------------------------------------------------------------ names
    @property
    def prefix(self) -> str:
        """The snapshot path up to ``_iter_N`` (prefix and infix, in the output dir)."""
        infix = "_" + self.infix if self.infix else ""
        p = self.param.snapshot_prefix
        if self.output_dir is not None:
            return os.path.join(self.output_dir, os.path.basename(p) + infix)
        return p + infix

    def snapshot_filename(self, extension: str) -> str:
        return f"{self.prefix}_iter_{self.iter}{extension}"

    def check_snapshots_spare_inputs(self) -> None:
        """Refuse, before training, a run whose snapshots would replace a file it read: an
        input (``--weights``, ``--snapshot``, the weights a state names) named like a snapshot
        of an iteration this run can reach (``<prefix>_iter_N.<ext>`` beside the prefix, with
        N after the current iteration and at most ``max_iter``; a stop signal can snapshot
        any of them).  Fine-tuning from an earlier run's ``_iter_2000.caffemodel`` into the
        same output would otherwise overwrite it at iteration 2000."""
        import re

        from caffe_compat.atomic import same_file
        from caffe_compat.errors import SameFileError

        prefix = os.path.abspath(self.prefix)
        folder, stem = os.path.dirname(prefix), os.path.basename(prefix)
        exts = "|".join(re.escape(e) for e in sorted(set(FORMATS.values()) | {
            ".solverstate", ".caffemodel.h5", ".solverstate.h5"}, key=len, reverse=True))
        pattern = re.compile(re.escape(stem) + r"_iter_(\d+)(" + exts + r")$")
        for role, path in getattr(self, "input_files", []):
            m = pattern.match(os.path.basename(path))
            if m is None or not same_file(os.path.dirname(os.path.abspath(path)) or ".", folder):
                continue
            n = int(m.group(1))
            if self.iter < n <= int(self.param.max_iter):
                raise SameFileError(f"the snapshot of iteration {n} would replace the input {role} {path} "
                                    f"(snapshots are {prefix}_iter_N{m.group(2)}): choose another output "
                                    "folder (--output) or snapshot_prefix, or move the input",
                                    where=path)

    def _refuse_overwriting_inputs(self, path: str) -> None:
        from caffe_compat.atomic import refuse_overwriting_inputs

        refuse_overwriting_inputs(path, getattr(self, "input_files", []), "the snapshot")

    # ------------------------------------------------------------------ hooks
    def deploy_weights(self) -> ContextManager[None]:
        """Inside the block the net holds the weights the snapshot files get (here: the
        training weights; py-faster-rcnn's solver un-normalizes ``bbox_pred``)."""
        return contextlib.nullcontext()

    def _state_entries(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Extra ``.solverstate`` tensors and metadata: the loss history and the loader's state."""
        tensors: Dict[str, torch.Tensor] = {}
        extra: Dict[str, Any] = {}
        if self.loader is not None and hasattr(self.loader, "state_dict"):
            extra["loader"] = _jsonable(self.loader.state_dict())
        if self.monitor is not None and self.monitor.history:
            tensors[f"{EXTRAS_PREFIX}.history"] = torch.tensor(self.monitor.history, dtype=torch.float64)
        return tensors, extra

    def _restore_entries(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any],
                         state_path: str) -> None:
        """Put back what :meth:`_state_entries` saved (what the state has of it)."""
        if self.loader is not None and "loader" in meta and hasattr(self.loader, "load_state_dict"):
            self.loader.load_state_dict(dict(meta["loader"]))
        if self.monitor is not None and f"{EXTRAS_PREFIX}.history" in tensors:
            self.monitor.load_history(tensors[f"{EXTRAS_PREFIX}.history"].tolist())

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> Tuple[str, str]:
        """Write the weights in every format (as :meth:`deploy_weights` has them) and a
        .solverstate (``snapshot_format: HDF5``: Caffe's .caffemodel.h5 and .solverstate.h5).

        In a distributed run only rank 0 writes (every rank holds the same weights); the
        others note the iteration and the names rank 0 writes."""
        if self.dist is not None and not self.dist.is_main:
            hdf5 = self._hdf5_snapshots
            model = self.snapshot_filename(".caffemodel.h5" if hdf5 else FORMATS[self.formats[0]])
            self._last_snapshot_iter = self.iter
            self.snapshot_paths.append(model)
            return model, self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        if self._hdf5_snapshots:
            for ext in (".caffemodel.h5", ".solverstate.h5"):
                self._refuse_overwriting_inputs(self.snapshot_filename(ext))
            model, state = super().snapshot()
            self.snapshot_paths.append(model)
            return model, state
        base = self.snapshot_filename("")
        folder = os.path.dirname(os.path.abspath(base))
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            raise SolverError(f"cannot create the snapshot folder {folder}: {e}") from None
        models: List[str] = []
        for fmt in self.formats:  # nothing is written if any file would replace an input
            self._refuse_overwriting_inputs(base + FORMATS[fmt])
        if self.save_state:
            self._refuse_overwriting_inputs(base + ".solverstate")
        with self.deploy_weights():
            for fmt in self.formats:
                path = base + FORMATS[fmt]
                log.info("Snapshotting to %s file %s", "binary proto" if fmt == "caffemodel" else fmt,
                         path)
                try:
                    self.net.save_weights(path)
                except OSError as e:
                    raise SolverError(f"cannot write snapshot {path}: {e}") from None
                models.append(path)
        state = base + ".solverstate"
        if self.save_state:
            log.info("Snapshotting solver state to binary proto file %s", state)
            self._write_state(state, models[0])
        log.info("Wrote snapshot to: %s", models[0])
        self._last_snapshot_iter = self.iter
        self.snapshot_paths.append(models[0])
        info = SnapshotInfo(self.iter, models[0], state)
        for cb in self._callbacks["snapshot"]:
            cb(self, info)
        return models[0], state

    def _extra_state(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
        """The ``.solverstate``'s own entries (``frcnn.*``, metadata ``frcnn``: see
        :data:`EXTRAS_PREFIX`), from :meth:`_state_entries`."""
        tensors, extra = self._state_entries()
        return tensors, {EXTRAS_PREFIX: json.dumps(extra)}

    def restore(self, state_path: str) -> None:
        """Restore a snapshot, with the entries :meth:`_state_entries` wrote when it has them."""
        super().restore(state_path)
        self._last_snapshot_iter = self.iter
        self.check_snapshots_spare_inputs()
        got = read_state_extras(os.fspath(state_path))
        if got is not None:
            self._restore_entries(got[0], got[1], os.fspath(state_path))


# ---------------------------------------------------------------------------- signals
@dataclass
class _SignalState:
    signal: Optional[int] = None

    @property
    def name(self) -> Optional[str]:
        return None if self.signal is None else signal.Signals(self.signal).name


@contextlib.contextmanager
def stop_on_signals(solver: Solver, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)
                    ) -> Iterator[_SignalState]:
    """While inside: the first SIGINT/SIGTERM makes ``solver`` snapshot and stop after the
    current iteration (``request_stop(snapshot=True)``); a second one aborts at once
    (``KeyboardInterrupt``).  Previous handlers come back on exit.  Outside the main
    thread (where Python cannot install handlers) it does nothing."""
    state = _SignalState()
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum: int, frame: Any) -> None:
        if state.signal is not None:
            raise KeyboardInterrupt
        state.signal = signum
        log.warning("%s received: finishing iteration %d, then writing a snapshot and stopping "
                    "(send it again to abort without a snapshot)", signal.Signals(signum).name,
                    solver.iter + 1)
        solver.request_stop(snapshot=True)

    old = {}
    try:
        for s in signals:
            old[s] = signal.signal(s, handler)
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    """What a training run produced."""

    model_paths: List[str]                 # every snapshot's first-format weights, in order
    iterations: int                        # iterations done (the solver's iter at the end)
    output_dir: str
    interrupted: bool = False              # stopped early (signal or request_stop)
    signal: Optional[str] = None           # "SIGINT"/"SIGTERM" when a signal stopped it
    loss_curve: Optional[str] = None       # PNG
    loss_csv: Optional[str] = None
    history: List[Tuple[int, float, float, float]] = field(default_factory=list)
    solver: Optional[Any] = None           # the TrainSolver (its net holds the training weights)

    @property
    def final_model(self) -> Optional[str]:
        return self.model_paths[-1] if self.model_paths else None


def finish_outputs(monitor: TrainingMonitor, folder: str, stem: str, title: str
                   ) -> Tuple[Optional[str], Optional[str]]:
    """Write the loss curve ``<folder>/<stem>_loss.png`` and ``_loss.csv``; (png, csv) or Nones."""
    if not monitor.history:
        return None, None
    png = os.path.join(folder, stem + "_loss.png")
    csv_path = os.path.join(folder, stem + "_loss.csv")
    try:
        monitor.write_outputs(png, csv_path, title=title)
    except Exception as e:  # a plot must never cost the trained model
        log.warning("could not write the loss curve: %s", e)
        return None, None
    log.info("Loss curve: %s", png)
    return png, csv_path


# ---------------------------------------------------------------------------- trainer, hooks
class HookBase:
    """A piece of a training run (detectron2's ``HookBase``).

    :meth:`before_train` hooks run in registration order before the first iteration;
    :meth:`after_step` after every iteration's update (the solver's ``iteration``
    callback, once the update is applied and before its snapshot); :meth:`after_train` in
    *reverse* order when the run ends, whatever happened (like nested ``with`` blocks: a
    hook's ``after_train`` sees the hooks registered before it still in place), and only
    for hooks whose ``before_train`` ran.

    There is no ``before_step``: Caffe's ``Solver::Step`` owns the iteration loop (and
    restarts its smoothed loss on every call), so driving it one step at a time would
    change the logged loss; per-iteration input is pulled by the net's data layer instead
    (:class:`~caffe_compat.frcnn.train.RoidbDataHook`).
    """

    trainer: "TrainerBase"

    def before_train(self) -> None:
        pass

    def after_step(self) -> None:
        pass

    def after_train(self) -> None:
        pass


class TrainerBase:
    """A solver, its hooks and the iteration loop (detectron2's ``TrainerBase``).

    The loop is Caffe's: :meth:`run_steps` is ``Solver::Solve`` (``max_iter=None``: the
    solver's own ``max_iter``, final snapshot and tests) or ``Solver::Step`` up to
    ``max_iter`` (py-faster-rcnn's ``train_model``; a hook writes its final snapshot).
    ``completed`` is True once the loop returned without an exception.
    """

    def __init__(self, solver: TrainSolver, hooks: Sequence[HookBase] = (), *,
                 max_iter: Optional[int] = None) -> None:
        self.solver = solver
        self.max_iter = None if max_iter is None else int(max_iter)
        self.hooks: List[HookBase] = []
        self.completed = False
        self._attached = False
        self.register_hooks(hooks)

    @property
    def net(self) -> Any:
        return self.solver.net

    @property
    def iter(self) -> int:
        return self.solver.iter

    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
            self.hooks.append(h)

    def _after_step(self, solver: Solver, info: Any) -> None:
        for h in self.hooks:
            h.after_step()

    def run_steps(self) -> None:
        """The iteration loop: ``Solver::Solve`` or ``Solver::Step`` to ``max_iter``."""
        s = self.solver
        if self.max_iter is None:
            s.solve()
            return
        s.requested_early_exit = False
        remaining = self.max_iter - s.iter
        if remaining > 0:
            s.step(remaining)

    def train(self) -> None:
        """``before_train`` hooks, the loop, ``after_train`` hooks (always, in reverse)."""
        self.completed = False
        with contextlib.ExitStack() as stack:
            for h in self.hooks:
                h.before_train()
                stack.callback(h.after_train)
            if not self._attached:  # after before_train: the progress monitor's callback first
                self.solver.add_callback(self._after_step, on="iteration")
                self._attached = True
            self.run_steps()
            self.completed = True


class ProgressHook(HookBase):
    """Caffe's log lines with a progress bar and ETA up to ``max_iter``
    (:class:`~caffe_compat.progress.TrainingMonitor`, whose history the snapshots keep), and
    the loss curve ``<folder>/<stem>_loss.png`` and ``.csv`` at the end."""

    def __init__(self, max_iter: int, folder: str, stem: str, *, enabled: bool = True,
                 stream: Any = None, outputs: bool = True) -> None:
        self.monitor = TrainingMonitor(int(max_iter), stream=stream, enabled=enabled)
        self.folder, self.stem = folder, stem
        #: write the loss curve at the end (False on the ranks other than 0)
        self.outputs = bool(outputs)
        self.loss_curve: Optional[str] = None
        self.loss_csv: Optional[str] = None

    def before_train(self) -> None:
        s = self.trainer.solver
        s.monitor = self.monitor
        self.monitor.attach(s)
        self.monitor.start = s.iter

    def after_train(self) -> None:
        self.monitor.close()
        if not self.outputs:
            return
        from caffe_compat.device import peak_memory_line

        log.info("%s", peak_memory_line(self.trainer.solver.net.device))
        self.loss_curve, self.loss_csv = finish_outputs(self.monitor, self.folder, self.stem,
                                                        f"{self.stem}: training loss")


class ResumeHook(HookBase):
    """Restore a ``.solverstate`` (weights, history, loader position) before training."""

    def __init__(self, state_path: str) -> None:
        self.state_path = state_path

    def before_train(self) -> None:
        s = self.trainer.solver
        log.info("Restoring previous solver status from %s", self.state_path)
        s.restore(self.state_path)
        if s.monitor is not None:
            s.monitor.start = s.iter


class SignalHook(HookBase):
    """SIGINT/SIGTERM during training: snapshot and stop cleanly (:func:`stop_on_signals`)."""

    def __init__(self) -> None:
        self.state = _SignalState()
        self._scope: Optional[ContextManager[_SignalState]] = None

    def before_train(self) -> None:
        self._scope = stop_on_signals(self.trainer.solver)
        self.state = self._scope.__enter__()

    def after_train(self) -> None:
        if self._scope is not None:
            self._scope.__exit__(None, None, None)
            self._scope = None


class PeriodicSnapshotHook(HookBase):
    """py-faster-rcnn's snapshots: every ``every`` iterations (``cfg.TRAIN.SNAPSHOT_ITERS``,
    not the solver's ``snapshot``) and once at the end of a run that completed."""

    def __init__(self, every: int) -> None:
        self.every = int(every)

    def before_train(self) -> None:
        log.info("Solving...")

    def after_step(self) -> None:
        s = self.trainer.solver
        if self.every > 0 and s.iter % self.every == 0:
            s.request_snapshot()

    def after_train(self) -> None:
        t = self.trainer
        s = t.solver
        if not t.completed:
            return
        if not s.requested_early_exit and s._last_snapshot_iter != s.iter:
            s.snapshot()
        log.info("done solving")


class DistributedHook(HookBase):
    """One rank of a distributed run (:mod:`caffe_compat.distributed`), after a resume: the
    weights of rank 0 on every rank, and this rank's own random streams (a restored state
    holds rank 0's)."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx

    def before_train(self) -> None:
        from caffe_compat.distributed import broadcast_params, reseed_rank

        s = self.trainer.solver
        broadcast_params(s.net, self.ctx)
        reseed_rank(s, self.ctx)


class CompileHook(HookBase):
    """The train net's forwards through ``torch.compile`` (``--compile BACKEND``), with the
    eager fallback of :meth:`caffe_compat.net.Net.compile_forward`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend

    def before_train(self) -> None:
        self.trainer.solver.net.compile_forward(backend=self.backend)


def default_hooks(max_iter: int, folder: str, stem: str, *, resume: Optional[str] = None,
                  progress: bool = True, progress_stream: Any = None,
                  handle_signals: bool = True, dist: Any = None,
                  compile_backend: Optional[str] = None) -> List[HookBase]:
    """What every training command has: progress and loss curve (and the peak memory at
    the end), ``resume`` restored first, SIGINT/SIGTERM -> snapshot and stop; in a
    distributed run (``dist``, a :class:`~caffe_compat.distributed.DistContext`) progress and
    the loss curve on rank 0 only; ``compile_backend``: a :class:`CompileHook`."""
    main = dist is None or dist.is_main
    hooks: List[HookBase] = [ProgressHook(max_iter, folder, stem, enabled=progress and main,
                                          stream=progress_stream, outputs=main)]
    if compile_backend:
        hooks.append(CompileHook(compile_backend))
    if resume:
        hooks.append(ResumeHook(resume))
    if dist is not None and dist.distributed:
        hooks.append(DistributedHook(dist))
    if handle_signals:
        hooks.append(SignalHook())
    return hooks


def run_trainer(trainer: TrainerBase) -> TrainResult:
    """Train and collect what the run produced (the loss curve is written even when the
    loop raised; the exception then propagates)."""
    trainer.train()
    s = trainer.solver
    progress = next((h for h in trainer.hooks if isinstance(h, ProgressHook)), None)
    sig = next((h.state for h in trainer.hooks if isinstance(h, SignalHook)), _SignalState())
    return TrainResult(model_paths=list(s.snapshot_paths), iterations=s.iter,
                       output_dir=progress.folder if progress else "",
                       interrupted=bool(s.requested_early_exit), signal=sig.name,
                       loss_curve=progress.loss_curve if progress else None,
                       loss_csv=progress.loss_csv if progress else None,
                       history=list(progress.monitor.history) if progress else [], solver=s)


def train_plain(solver: SolverSource, *, weights: Optional[str] = None, resume: Optional[str] = None,
                max_iter: Optional[int] = None, device: Any = None,
                formats: Sequence[str] = ("caffemodel",), output_dir: Optional[str] = None,
                progress: bool = True, progress_stream: Any = None,
                handle_signals: bool = True, precision: str = "fp32", dist: Any = None,
                compile_backend: Optional[str] = None) -> TrainResult:
    """``caffe train``: run the solver (its nets read their own data layers) to ``max_iter``
    (the solver's unless given), snapshotting as the solver says
    (``<snapshot_prefix>_iter_N``, or in ``output_dir`` when given).  ``precision``: see
    :func:`caffe_compat.precision.install_training_precision` (fp32 is Caffe's numbers).
    ``dist``: this process's :class:`~caffe_compat.distributed.DistContext` in a distributed
    run (its process group joined): gradients summed over the ranks, the data layers
    sharded, rank 0 logging and snapshotting."""
    param = load_solver_param(solver)
    if max_iter is not None:
        param.max_iter = int(max_iter)
    s = TrainSolver(param, output_dir=output_dir, formats=formats, device=device, weights=weights)
    if precision != "fp32":
        from caffe_compat.precision import install_training_precision

        install_training_precision(s, precision)
    if dist is not None:
        from caffe_compat.distributed import install, seed_data_layers

        install(s, dist, broadcast=False)  # DistributedHook broadcasts, after any resume
        seed_data_layers(s.net, dist, int(s.param.iter_size))
    folder = output_dir or os.path.dirname(os.path.abspath(s.prefix))
    hooks = default_hooks(int(s.param.max_iter), folder, os.path.basename(s.prefix) or "train",
                          resume=resume, progress=progress, progress_stream=progress_stream,
                          handle_signals=handle_signals, dist=dist, compile_backend=compile_backend)
    result = run_trainer(TrainerBase(s, hooks))
    if dist is not None:  # every rank returns once rank 0's snapshots are written
        from caffe_compat.distributed import barrier

        barrier(dist)
    return result
