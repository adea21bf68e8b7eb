"""py-faster-rcnn's training (``tools/train_net.py`` and ``lib/fast_rcnn/train.py``) on caffe_compat.

The pipeline is the original's::

    cfg_from_file(yml); cfg_from_list(overrides)             # before any net is built
    imdb, roidb = combined_roidb("voc_2007_trainval")         # + flipped images
    result = train_net("solver.prototxt", roidb, get_output_dir(imdb),
                       pretrained_model="VGG16.v2.caffemodel", max_iters=70000)

``train_net`` drops roidb entries without usable RoIs, computes the bounding-box
regression targets and their means/stds (``cfg.TRAIN.BBOX_REG``), builds a
:class:`~caffe_compat.solver.Solver` from the solver prototxt (net paths relative to the
current directory, as in Caffe), copies the pretrained weights in (layers absent from
the file keep their fillers: fine-tuning), and feeds the roidb to the train net's
``RoIDataLayer`` through a :class:`~caffe_compat.roidb.MinibatchLoader`.

Snapshots are py-faster-rcnn's: every ``cfg.TRAIN.SNAPSHOT_ITERS`` iterations and at the
end, ``<output dir>/<snapshot_prefix>[_<SNAPSHOT_INFIX>]_iter_<N>.caffemodel`` (and/or
``.safetensors``), where -- with ``TRAIN.BBOX_REG`` and ``TRAIN.BBOX_NORMALIZE_TARGETS``
-- the saved ``bbox_pred`` is *un-normalized* (``W * stds[:, None]``, ``b * stds +
means``) so the file predicts plain box deltas at test time, while the training net keeps
its normalized weights.  Unlike py-faster-rcnn, each snapshot also gets a
``.solverstate`` (momentum history, iteration, every random generator, the minibatch
loader's position and the *normalized* ``bbox_pred``), so ``resume=`` continues the run
exactly as if it had not stopped.

SIGINT (Ctrl-C) and SIGTERM during training write a snapshot of the iteration in progress
and stop cleanly (a second signal aborts at once).

Nets without a ``RoIDataLayer`` (plain Caffe nets with their own data layers) are trained
by :func:`train_plain`, which is ``caffe train``: the solver's own ``max_iter``,
``snapshot`` interval and ``snapshot_prefix``.
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
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from caffe_compat.config import ConfigError, cfg
from caffe_compat.errors import SolverError
from caffe_compat.frcnn.progress import TrainingMonitor
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver import SnapshotInfo, Solver

__all__ = [
    "FORMATS", "parse_formats", "unnormalize_bbox_params", "normalize_bbox_params",
    "find_roi_data_layer", "net_uses_roidb", "load_solver_param", "resolve_net_paths",
    "TrainSolver", "SolverWrapper", "TrainResult", "train_net", "train_plain",
    "combined_roidb", "stop_on_signals", "resolve_device", "seed_everything",
]

log = logging.getLogger("caffe_compat.train")

#: snapshot formats and their file extensions
FORMATS: Dict[str, str] = {"caffemodel": ".caffemodel", "safetensors": ".safetensors"}

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
                    raise ConfigError(f"unknown snapshot format '{f}'; allowed: caffemodel, "
                                      "safetensors, both")
                if n not in out:
                    out.append(n)
    if not out:
        raise ConfigError("no snapshot format given; allowed: caffemodel, safetensors, both")
    return tuple(out)


# ---------------------------------------------------------------------------- bbox_pred
def _stats(values: Any, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(values, dtype=np.float64).reshape(-1))
    if t.numel() != n:
        raise SolverError(f"bbox_pred has {n} outputs but the bounding-box {what} have {t.numel()} "
                          "values (4 per class): does the net's num_output match the data set's "
                          "number of classes?")
    return t


def unnormalize_bbox_params(weight: torch.Tensor, bias: Optional[torch.Tensor], means: Any,
                            stds: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The ``bbox_pred`` weights a test net needs: ``W * stds[:, None]``, ``b * stds + means``.

    Computed in float64 and rounded once to the weights' dtype, as py-faster-rcnn's numpy
    code did (float32 blob times float64 stds, stored back into the float32 blob).
    """
    n = int(weight.shape[0])
    s = _stats(stds, n, "stds").to(weight.device)
    m = _stats(means, n, "means").to(weight.device)
    w = (weight.detach().double() * s.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    if bias is None:
        if bool((m != 0).any()):
            raise SolverError("bbox_pred has no bias, so the non-zero bbox target means cannot be "
                              "folded into the snapshot")
        return w, None
    b = (bias.detach().double() * s + m).to(bias.dtype)
    return w, b


def normalize_bbox_params(weight: torch.Tensor, bias: Optional[torch.Tensor], means: Any,
                          stds: Any) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The inverse of :func:`unnormalize_bbox_params` (exact up to one rounding)."""
    n = int(weight.shape[0])
    s = _stats(stds, n, "stds").to(weight.device)
    m = _stats(means, n, "means").to(weight.device)
    w = (weight.detach().double() / s.view(-1, *([1] * (weight.dim() - 1)))).to(weight.dtype)
    b = None if bias is None else ((bias.detach().double() - m) / s).to(bias.dtype)
    return w, b


def _bbox_pred_blobs(net) -> Optional[List[torch.Tensor]]:
    """``bbox_pred``'s blobs when the net has a layer of that name with weights (the
    original's ``net.params.has_key('bbox_pred')``)."""
    if "bbox_pred" not in net.layer_names:
        return None
    blobs = list(net.layer("bbox_pred").caffe_blobs())
    return blobs or None


# ---------------------------------------------------------------------------- nets, solvers
def find_roi_data_layer(net) -> Optional[Any]:
    """The net's ``RoIDataLayer`` module (py-faster-rcnn's 'input-data'/'data' layer), if any."""
    from caffe_compat.layers.roi_data import RoIDataLayer

    for e in net.entries:
        if isinstance(e.module, RoIDataLayer):
            return e.module
    return None


def _train_net_param(param: "caffe_pb2.SolverParameter") -> Optional["caffe_pb2.NetParameter"]:
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


def net_uses_roidb(param: "caffe_pb2.SolverParameter") -> bool:
    """Whether the solver's train net reads py-faster-rcnn's roidb (has a RoIDataLayer)."""
    from caffe_compat.layers import registry

    net = _train_net_param(param)
    if net is None:
        return False
    from caffe_compat.layers.roi_data import RoIDataLayer

    for lp in net.layer:
        if lp.type != "Python":
            continue
        try:
            cls = registry.resolve(lp)
        except Exception:  # an unknown Python layer: not ours to judge here
            continue
        if isinstance(cls, type) and issubclass(cls, RoIDataLayer):
            return True
    return False


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


def resolve_device(gpu: Optional[int]) -> Optional[str]:
    """``--gpu ID`` -> ``"cuda:ID"`` (None or a negative id: the CPU)."""
    if gpu is None or int(gpu) < 0:
        return None
    if not torch.cuda.is_available():
        raise SolverError(f"--gpu {gpu}: no CUDA device is available here "
                          "(torch.cuda.is_available() is False); leave --gpu out to train on the CPU")
    n = torch.cuda.device_count()
    if int(gpu) >= n:
        raise SolverError(f"--gpu {gpu}: there {'is' if n == 1 else 'are'} only {n} CUDA "
                          f"device{'s' if n != 1 else ''} (ids 0..{n - 1})")
    return f"cuda:{int(gpu)}"


def seed_everything(seed: int) -> None:
    """The original's ``np.random.seed(cfg.RNG_SEED); caffe.set_random_seed(cfg.RNG_SEED)``."""
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


def _read_frcnn_extras(path: str) -> Optional[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
    """The ``frcnn.*`` tensors and the ``frcnn`` metadata of a caffe-compat ``.solverstate``
    (None for Caffe's binaryproto states).  Reads only those entries, not the history."""
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
    keys = [k for k in header if k.startswith("frcnn.")]
    if keys:
        with safe_open(path, framework="pt") as st:
            for k in keys:
                tensors[k] = st.get_tensor(k)
    return tensors, json.loads(meta.get("frcnn", "{}") or "{}")


class TrainSolver(Solver):
    """A :class:`Solver` whose snapshots are written the way py-faster-rcnn's tools write them.

    * names: ``<output_dir>/<basename(snapshot_prefix)>[_<infix>]_iter_<N><ext>`` (with
      ``output_dir=None``: Caffe's ``<snapshot_prefix>_iter_<N><ext>``);
    * ``formats``: ``caffemodel`` and/or ``safetensors`` weights, plus a ``.solverstate``
      (unless ``save_state=False``);
    * with ``bbox_means``/``bbox_stds`` set, the saved ``bbox_pred`` is un-normalized
      (the training net is restored bit for bit afterwards);
    * the ``.solverstate`` also keeps the exact training ``bbox_pred``, the minibatch
      loader's state and the loss history, which :meth:`restore` puts back.
    """

    def __init__(self, solver: SolverSource, *, output_dir: Optional[str] = None, infix: str = "",
                 formats: Sequence[str] = ("caffemodel",), save_state: bool = True, **kw: Any) -> None:
        super().__init__(solver, **kw)
        self.output_dir = None if output_dir is None else os.path.abspath(output_dir)
        self.infix = str(infix or "")
        self.formats = parse_formats(formats)
        #: write a .solverstate with every snapshot (needed to resume)
        self.save_state = bool(save_state)
        self.bbox_means: Optional[np.ndarray] = None
        self.bbox_stds: Optional[np.ndarray] = None
        self.loader: Optional[Any] = None
        self.monitor: Optional[TrainingMonitor] = None
        #: first-format model file of every snapshot written, in order
        self.snapshot_paths: List[str] = []

    def _check_param(self) -> None:
        """Also refuse ``snapshot_format: HDF5`` for Faster R-CNN training: its snapshots are
        py-faster-rcnn's, whose ``.solverstate`` keeps what Caffe's HDF5 state cannot (loader
        position, training ``bbox_pred``, generator states).  Plain nets (``caffe train``)
        get Caffe's HDF5 snapshots."""
        if self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5 and net_uses_roidb(self.param):
            raise SolverError("snapshot_format: HDF5 is not supported by the Faster R-CNN trainer "
                              "(caffe-compat train: its snapshots are py-faster-rcnn's, --format "
                              "caffemodel|safetensors plus a .solverstate); remove snapshot_format from "
                              "the solver, or train with caffe_compat.solver.Solver or pycaffe's "
                              "SGDSolver, which write Caffe's HDF5 snapshots")
        super()._check_param()

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

    # ------------------------------------------------------------------ bbox_pred
    def set_bbox_stats(self, means: Any, stds: Any) -> bool:
        """Un-normalize ``bbox_pred`` in snapshots with these (4K,) means/stds.

        Returns False (and changes nothing) when the net has no ``bbox_pred`` weights.
        """
        blobs = _bbox_pred_blobs(self.net)
        if blobs is None:
            return False
        n = int(blobs[0].shape[0])
        self.bbox_means = _stats(means, n, "means").numpy()
        self.bbox_stds = _stats(stds, n, "stds").numpy()
        return True

    @contextlib.contextmanager
    def deploy_weights(self) -> Iterator[None]:
        """Inside the block ``bbox_pred`` holds the un-normalized (test-time) weights."""
        blobs = _bbox_pred_blobs(self.net) if self.bbox_stds is not None else None
        if not blobs:
            yield
            return
        weight = blobs[0]
        bias = blobs[1] if len(blobs) > 1 else None
        saved = [b.detach().clone() for b in blobs]
        w, b = unnormalize_bbox_params(weight, bias, self.bbox_means, self.bbox_stds)
        try:
            with torch.no_grad():
                weight.copy_(w)
                if bias is not None and b is not None:
                    bias.copy_(b)
            yield
        finally:
            with torch.no_grad():
                for t, s in zip(blobs, saved):
                    t.copy_(s)

    # ------------------------------------------------------------------ snapshots
    def snapshot(self) -> Tuple[str, str]:
        """Write the weights in every format (un-normalized ``bbox_pred``) and a .solverstate
        (``snapshot_format: HDF5``, plain nets only: Caffe's .caffemodel.h5 and .solverstate.h5)."""
        if self._hdf5_snapshots:
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
        """``frcnn.*`` entries of the ``.solverstate``: the training ``bbox_pred``, the loss
        history and, in the metadata, the minibatch loader's state."""
        tensors: Dict[str, torch.Tensor] = {}
        extra: Dict[str, Any] = {}
        blobs = _bbox_pred_blobs(self.net) if self.bbox_stds is not None else None
        if blobs:
            for i, b in enumerate(blobs):
                tensors[f"frcnn.bbox_pred.{i}"] = b.detach().cpu().contiguous()
            extra["bbox_pred_normalized"] = True
        if self.loader is not None and hasattr(self.loader, "state_dict"):
            extra["loader"] = _jsonable(self.loader.state_dict())
        if self.monitor is not None and self.monitor.history:
            tensors["frcnn.history"] = torch.tensor(self.monitor.history, dtype=torch.float64)
        return tensors, {"frcnn": json.dumps(extra)}

    def restore(self, state_path: str) -> None:
        """Restore a snapshot, including the normalized ``bbox_pred``, the loader position
        and the loss history when the state has them."""
        super().restore(state_path)
        self._last_snapshot_iter = self.iter
        got = _read_frcnn_extras(os.fspath(state_path))
        if got is None:
            return
        tensors, meta = got
        blobs = _bbox_pred_blobs(self.net) if self.bbox_stds is not None else None
        if blobs:
            if meta.get("bbox_pred_normalized") and "frcnn.bbox_pred.0" in tensors:
                with torch.no_grad():
                    for i, b in enumerate(blobs):
                        b.copy_(tensors[f"frcnn.bbox_pred.{i}"].to(device=b.device, dtype=b.dtype))
            else:
                # the weights file holds the un-normalized bbox_pred: undo that
                log.warning("%s does not hold the training net's bbox_pred: re-normalizing the "
                            "snapshot's (exact up to rounding)", state_path)
                w, b = normalize_bbox_params(blobs[0], blobs[1] if len(blobs) > 1 else None,
                                             self.bbox_means, self.bbox_stds)
                with torch.no_grad():
                    blobs[0].copy_(w)
                    if b is not None:
                        blobs[1].copy_(b)
        if self.loader is not None and "loader" in meta and hasattr(self.loader, "load_state_dict"):
            st = dict(meta["loader"])
            st["perm"] = np.asarray(st.get("perm", []), dtype=np.int64)
            self.loader.load_state_dict(st)
        if self.monitor is not None and "frcnn.history" in tensors:
            self.monitor.load_history(tensors["frcnn.history"].tolist())


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


# ---------------------------------------------------------------------------- roidb
def combined_roidb(imdb_names: str) -> Tuple[Any, List[Dict[str, Any]]]:
    """``imdb, roidb`` for ``"name"`` or ``"name1+name2"`` (py-faster-rcnn's ``combined_roidb``):
    each set gets ``cfg.TRAIN.PROPOSAL_METHOD`` and flipped copies (``TRAIN.USE_FLIPPED``)."""
    from caffe_compat.datasets.factory import get_imdb
    from caffe_compat.datasets.imdb import imdb as imdb_cls
    from caffe_compat.roidb import get_training_roidb

    def get_roidb(name: str) -> Tuple[Any, List[Dict[str, Any]]]:
        imdb = get_imdb(name)
        log.info("Loaded dataset `%s` for training", imdb.name)
        imdb.set_proposal_method(cfg.TRAIN.PROPOSAL_METHOD)
        log.info("Set proposal method: %s", cfg.TRAIN.PROPOSAL_METHOD)
        return imdb, get_training_roidb(imdb)

    parts = [get_roidb(s) for s in imdb_names.split("+")]
    roidb = list(parts[0][1])
    for _, r in parts[1:]:
        roidb.extend(r)
    imdb = parts[0][0] if len(parts) == 1 else imdb_cls(imdb_names, parts[0][0].classes)
    return imdb, roidb


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


class SolverWrapper:
    """py-faster-rcnn's ``SolverWrapper``: a solver whose train net reads ``roidb``.

    ``solver_prototxt``: a solver path (net paths relative to the current directory) or
    a ``SolverParameter``.  ``pretrained_model``: weights copied in before training
    (missing layers keep their fillers).  Unless ``randomize``, a solver without its own
    ``random_seed`` gets ``cfg.RNG_SEED`` (the original seeded Caffe's RNG with it) and
    the minibatch loader draws from ``cfg.RNG_SEED`` too.
    """

    def __init__(self, solver_prototxt: SolverSource, roidb: List[Dict[str, Any]], output_dir: str,
                 pretrained_model: Optional[str] = None, *, device: Any = None,
                 formats: Sequence[str] = ("caffemodel",), randomize: bool = False,
                 seed: Optional[int] = None, save_state: bool = True) -> None:
        from caffe_compat.roidb import MinibatchLoader, add_bbox_regression_targets

        self.output_dir = output_dir
        T = cfg.TRAIN
        if T.HAS_RPN and T.BBOX_REG and T.BBOX_NORMALIZE_TARGETS and not T.BBOX_NORMALIZE_TARGETS_PRECOMPUTED:
            # RPN training can only use precomputed normalization: there are no fixed
            # statistics of the proposals to compute beforehand (the original asserts this)
            raise ConfigError("TRAIN.HAS_RPN with TRAIN.BBOX_REG and TRAIN.BBOX_NORMALIZE_TARGETS needs "
                              "TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED True (as faster_rcnn_end2end.yml "
                              "sets)")
        self.bbox_means: Optional[np.ndarray] = None
        self.bbox_stds: Optional[np.ndarray] = None
        if T.BBOX_REG:
            log.info("Computing bounding-box regression targets...")
            self.bbox_means, self.bbox_stds = add_bbox_regression_targets(roidb)
            log.info("done")
        param = load_solver_param(solver_prototxt)
        if not randomize and param.random_seed < 0:
            param.random_seed = int(cfg.RNG_SEED)
        if pretrained_model is not None:
            log.info("Loading pretrained model weights from %s", pretrained_model)
        self.solver = TrainSolver(param, output_dir=output_dir, infix=T.SNAPSHOT_INFIX,
                                  formats=formats, save_state=save_state, device=device,
                                  weights=pretrained_model)
        self.solver_param = self.solver.param
        self.device = self.solver.net.device
        layer = find_roi_data_layer(self.solver.net)
        if layer is None:
            raise SolverError("the train net has no RoIDataLayer (python_param { module: "
                              "'roi_data_layer.layer' layer: 'RoIDataLayer' }) to feed the roidb to; "
                              "train nets with their own data layers with train_plain")
        self.data_layer = layer
        if randomize:
            loader_seed = int.from_bytes(os.urandom(4), "little")
        else:
            loader_seed = int(cfg.RNG_SEED if seed is None else seed)
        has_rpn = "im_info" in layer.blob_order
        self.loader = MinibatchLoader(roidb, layer.num_classes, seed=loader_seed, has_rpn=has_rpn)
        self.solver.loader = self.loader
        layer.set_minibatch_source(self._next_minibatch)
        if T.BBOX_REG and T.BBOX_NORMALIZE_TARGETS and self.bbox_means is not None:
            if self.solver.set_bbox_stats(self.bbox_means, self.bbox_stds):
                log.info("snapshots will hold bbox_pred un-normalized (stds %s, means %s, per class)",
                         np.asarray(self.bbox_stds)[-4:].tolist(), np.asarray(self.bbox_means)[-4:].tolist())

    def _next_minibatch(self) -> Dict[str, torch.Tensor]:
        blobs = next(self.loader)
        order = self.data_layer.blob_order
        dev = self.device
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in blobs.items()
                if k in order}

    def snapshot(self) -> str:
        """Write a snapshot now; returns its (first-format) weights file."""
        return self.solver.snapshot()[0]

    def train_model(self, max_iters: int) -> List[str]:
        """Train until the solver reaches ``max_iters`` iterations, snapshotting every
        ``cfg.TRAIN.SNAPSHOT_ITERS`` and at the end; returns the snapshots' weight files."""
        s = self.solver
        every = int(cfg.TRAIN.SNAPSHOT_ITERS)

        def periodic(solver: TrainSolver, info: Any) -> None:
            if every > 0 and solver.iter % every == 0:
                solver.request_snapshot()

        s.add_callback(periodic, on="iteration")
        s.requested_early_exit = False
        log.info("Solving...")
        remaining = int(max_iters) - s.iter
        if remaining > 0:
            s.step(remaining)
        if not s.requested_early_exit and s._last_snapshot_iter != s.iter:
            s.snapshot()
        log.info("done solving")
        return list(s.snapshot_paths)


def _finish_outputs(monitor: TrainingMonitor, folder: str, stem: str, title: str
                    ) -> Tuple[Optional[str], Optional[str]]:
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


def train_net(solver_prototxt: SolverSource, roidb: List[Dict[str, Any]], output_dir: str,
              pretrained_model: Optional[str] = None, max_iters: int = 40000, *,
              resume: Optional[str] = None, device: Any = None,
              formats: Sequence[str] = ("caffemodel",), randomize: bool = False,
              progress: bool = True, progress_stream: Any = None, handle_signals: bool = True,
              seed: Optional[int] = None, save_state: bool = True) -> TrainResult:
    """Train a Fast/Faster R-CNN net on ``roidb`` (py-faster-rcnn's ``train_net``).

    ``resume``: a ``.solverstate`` written by an earlier run to continue from
    (``save_state=False`` writes none).
    ``progress``: show the progress bar / progress lines (``progress_stream``, default
    stderr).  Writes ``<prefix>[_<infix>]_loss.png`` and ``_loss.csv`` in ``output_dir``.
    Returns a :class:`TrainResult` (``.model_paths`` is what the original returned).
    """
    from caffe_compat.roidb import filter_roidb

    os.makedirs(output_dir, exist_ok=True)
    roidb = filter_roidb(roidb)
    sw = SolverWrapper(solver_prototxt, roidb, output_dir, pretrained_model, device=device,
                       formats=formats, randomize=randomize, seed=seed, save_state=save_state)
    s = sw.solver
    monitor = TrainingMonitor(int(max_iters), stream=progress_stream, enabled=progress)
    s.monitor = monitor
    monitor.attach(s)
    if resume:
        log.info("Restoring previous solver status from %s", resume)
        s.restore(resume)
    monitor.start = s.iter
    stem = os.path.basename(s.prefix)
    sig = _SignalState()
    try:
        with (stop_on_signals(s) if handle_signals else contextlib.nullcontext(_SignalState())) as sig:
            paths = sw.train_model(int(max_iters))
    finally:
        monitor.close()
        png, csv_path = _finish_outputs(monitor, output_dir, stem, f"{stem}: training loss")
    return TrainResult(model_paths=paths, iterations=s.iter, output_dir=output_dir,
                       interrupted=bool(s.requested_early_exit), signal=sig.name,
                       loss_curve=png, loss_csv=csv_path, history=list(monitor.history), solver=s)


def train_plain(solver: SolverSource, *, weights: Optional[str] = None, resume: Optional[str] = None,
                max_iter: Optional[int] = None, device: Any = None,
                formats: Sequence[str] = ("caffemodel",), output_dir: Optional[str] = None,
                progress: bool = True, progress_stream: Any = None,
                handle_signals: bool = True) -> TrainResult:
    """``caffe train``: run the solver (its nets read their own data layers) to ``max_iter``
    (the solver's unless given), snapshotting as the solver says
    (``<snapshot_prefix>_iter_N``, or in ``output_dir`` when given)."""
    param = load_solver_param(solver)
    if max_iter is not None:
        param.max_iter = int(max_iter)
    s = TrainSolver(param, output_dir=output_dir, formats=formats, device=device, weights=weights)
    monitor = TrainingMonitor(int(s.param.max_iter), stream=progress_stream, enabled=progress)
    s.monitor = monitor
    monitor.attach(s)
    if resume:
        log.info("Restoring previous solver status from %s", resume)
        s.restore(resume)
    monitor.start = s.iter
    folder = output_dir or os.path.dirname(os.path.abspath(s.prefix))
    stem = os.path.basename(s.prefix) or "train"
    sig = _SignalState()
    try:
        with (stop_on_signals(s) if handle_signals else contextlib.nullcontext(_SignalState())) as sig:
            s.solve()
    finally:
        monitor.close()
        png, csv_path = _finish_outputs(monitor, folder, stem, f"{stem}: training loss")
    return TrainResult(model_paths=list(s.snapshot_paths), iterations=s.iter, output_dir=folder,
                       interrupted=bool(s.requested_early_exit), signal=sig.name,
                       loss_curve=png, loss_csv=csv_path, history=list(monitor.history), solver=s)
