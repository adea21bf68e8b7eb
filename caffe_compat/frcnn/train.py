"""py-faster-rcnn's training (``tools/train_net.py`` and ``lib/fast_rcnn/train.py``) on caffe_compat.

The pipeline is the original's::

    cfg_from_file(yml); cfg_from_list(overrides)             # before any net is built
    imdb, roidb = combined_roidb("voc_2007_trainval")         # + flipped images
    result = train_net("solver.prototxt", roidb, get_output_dir(imdb),
                       pretrained_model="VGG16.v2.caffemodel", max_iters=70000)

``train_net`` drops roidb entries without usable RoIs, computes the bounding-box
regression targets and their means/stds (``cfg.TRAIN.BBOX_REG``), builds a
:class:`FrcnnSolver` from the solver prototxt (net paths relative to the
current directory, as in Caffe), copies the pretrained weights in (layers absent from
the file keep their fillers: fine-tuning), and feeds the roidb to the train net's
``RoIDataLayer`` through a :class:`~caffe_compat.frcnn.roidb.MinibatchLoader`.

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
and stop cleanly (a second signal aborts at once).  All of that is the generic trainer's
(:mod:`caffe_compat.trainer`, which also trains nets without a ``RoIDataLayer``, as
``caffe train`` does); this module adds py-faster-rcnn's data and ``bbox_pred`` handling.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from caffe_compat.errors import SolverError
from caffe_compat.frcnn.config import ConfigError, cfg
from caffe_compat.frcnn.layers import RoIDataLayer
from caffe_compat.layers import registry
from caffe_compat.protos import caffe_pb2
from caffe_compat.trainer import (HookBase, PeriodicSnapshotHook, SolverSource, TrainerBase,
                                  TrainResult, TrainSolver, default_hooks, load_solver_param,
                                  run_trainer, train_net_param)

__all__ = [
    "unnormalize_bbox_params", "normalize_bbox_params", "find_roi_data_layer", "net_uses_roidb",
    "FrcnnSolver", "RoidbDataHook", "SolverWrapper", "train_net", "combined_roidb",
    "train_from_solver",
]

log = logging.getLogger("caffe_compat.train")


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
    for e in net.entries:
        if isinstance(e.module, RoIDataLayer):
            return e.module
    return None


def net_uses_roidb(param: "caffe_pb2.SolverParameter") -> bool:
    """Whether the solver's train net reads py-faster-rcnn's roidb (has a RoIDataLayer)."""
    net = train_net_param(param)
    if net is None:
        return False
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


class FrcnnSolver(TrainSolver):
    """The :class:`~caffe_compat.trainer.TrainSolver` of py-faster-rcnn's training.

    * with ``bbox_means``/``bbox_stds`` set (:meth:`set_bbox_stats`), the saved ``bbox_pred``
      is un-normalized (the training net is restored bit for bit afterwards);
    * the ``.solverstate`` also keeps the exact training ``bbox_pred``, which :meth:`restore`
      puts back (besides the minibatch loader's state and the loss history);
    * ``snapshot_format: HDF5`` is refused for nets that read a roidb.
    """

    def __init__(self, solver: SolverSource, **kw: Any) -> None:
        super().__init__(solver, **kw)
        self.bbox_means: Optional[np.ndarray] = None
        self.bbox_stds: Optional[np.ndarray] = None

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

    def _state_entries(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
        """Also the training (normalized) ``bbox_pred``: ``frcnn.bbox_pred.<i>``."""
        tensors, extra = super()._state_entries()
        blobs = _bbox_pred_blobs(self.net) if self.bbox_stds is not None else None
        if blobs:
            for i, b in enumerate(blobs):
                tensors[f"frcnn.bbox_pred.{i}"] = b.detach().cpu().contiguous()
            extra["bbox_pred_normalized"] = True
        return tensors, extra

    def _restore_entries(self, tensors: Dict[str, torch.Tensor], meta: Dict[str, Any],
                         state_path: str) -> None:
        """Also the normalized ``bbox_pred`` (re-normalized from the weights file when the
        state lacks it)."""
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
        super()._restore_entries(tensors, meta, state_path)


# ---------------------------------------------------------------------------- roidb
def combined_roidb(imdb_names: str) -> Tuple[Any, List[Dict[str, Any]]]:
    """``imdb, roidb`` for ``"name"`` or ``"name1+name2"`` (py-faster-rcnn's ``combined_roidb``):
    each set gets ``cfg.TRAIN.PROPOSAL_METHOD`` and flipped copies (``TRAIN.USE_FLIPPED``)."""
    from caffe_compat.frcnn.datasets.factory import get_imdb
    from caffe_compat.frcnn.datasets.imdb import imdb as imdb_cls
    from caffe_compat.frcnn.roidb import get_training_roidb

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
class RoidbDataHook(HookBase):
    """py-faster-rcnn's data: the train net's ``RoIDataLayer`` pulls its minibatches from a
    :class:`~caffe_compat.frcnn.roidb.MinibatchLoader`, whose position the snapshots keep.

    :meth:`install` wires it at once (so a bare ``solver.step`` trains too);
    :meth:`before_train` does it again for a trainer.
    """

    def __init__(self, solver: TrainSolver, layer: Any, loader: Any) -> None:
        self.solver, self.layer, self.loader = solver, layer, loader
        #: the net's sampling layers (anchor/proposal targets), reseeded per minibatch when
        #: the loader is sharded (distributed runs: the draws follow the minibatch, not the rank)
        self.samplers = _sampling_layers(solver.net) if getattr(loader, "shard", None) else []
        self.install()

    def install(self) -> None:
        self.solver.loader = self.loader
        self.layer.set_minibatch_source(self.next_minibatch)

    def before_train(self) -> None:
        self.install()

    def next_minibatch(self) -> Dict[str, torch.Tensor]:
        blobs = next(self.loader)
        if self.samplers and self.loader.last_slot is not None:
            from caffe_compat.distributed import slot_seed

            for k, layer in enumerate(self.samplers):
                layer.seed(slot_seed(self.loader.seed + 1 + k, self.loader.last_slot))
        order = self.layer.blob_order
        dev = self.solver.net.device
        if dev.type == "cuda":  # page-locked host memory: the copy runs without blocking the host
            return {k: torch.from_numpy(np.ascontiguousarray(v)).pin_memory().to(dev, non_blocking=True)
                    for k, v in blobs.items() if k in order}
        return {k: torch.from_numpy(np.ascontiguousarray(v)).to(dev) for k, v in blobs.items()
                if k in order}


def _sampling_layers(net: Any) -> List[Any]:
    """The net's layers with their own random subsampling (``seed(s)``: the RPN's anchor and
    proposal target layers), in net order."""
    from caffe_compat.frcnn.layers.rpn import _Sampler

    return [e.module for e in net.entries if isinstance(e.module, _Sampler)]


class SolverWrapper:
    """py-faster-rcnn's ``SolverWrapper``: a solver whose train net reads ``roidb``.

    ``solver_prototxt``: a solver path (net paths relative to the current directory) or
    a ``SolverParameter``.  ``pretrained_model``: weights copied in before training
    (missing layers keep their fillers).  Unless ``randomize``, a solver without its own
    ``random_seed`` gets ``cfg.RNG_SEED`` (the original seeded Caffe's RNG with it) and
    the minibatch loader draws from ``cfg.RNG_SEED`` too.

    ``dist`` (a :class:`~caffe_compat.distributed.DistContext`): one rank of a distributed
    run -- the loader takes this rank's minibatches of the one stream, gradients are summed
    over the ranks, rank 0 snapshots.
    """

    def __init__(self, solver_prototxt: SolverSource, roidb: List[Dict[str, Any]], output_dir: str,
                 pretrained_model: Optional[str] = None, *, device: Any = None,
                 formats: Sequence[str] = ("caffemodel",), randomize: bool = False,
                 seed: Optional[int] = None, save_state: bool = True, dist: Any = None) -> None:
        from caffe_compat.frcnn.roidb import MinibatchLoader, add_bbox_regression_targets

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
        self.solver = FrcnnSolver(param, output_dir=output_dir, infix=T.SNAPSHOT_INFIX,
                                  formats=formats, save_state=save_state, device=device,
                                  weights=pretrained_model)
        self.solver_param = self.solver.param
        self.device = self.solver.net.device
        layer = find_roi_data_layer(self.solver.net)
        if layer is None:
            raise SolverError("the train net has no RoIDataLayer (python_param { module: "
                              "'roi_data_layer.layer' layer: 'RoIDataLayer' }) to feed the roidb to; "
                              "train nets with their own data layers with "
                              "caffe_compat.trainer.train_plain")
        self.data_layer = layer
        if randomize:
            loader_seed = int.from_bytes(os.urandom(4), "little")
        else:
            loader_seed = int(cfg.RNG_SEED if seed is None else seed)
        has_rpn = "im_info" in layer.blob_order
        shard = None
        if dist is not None:
            from caffe_compat.distributed import install

            install(self.solver, dist, broadcast=False)  # DistributedHook broadcasts, after a resume
            shard = (dist.rank, dist.world_size, int(self.solver.param.iter_size))
        from caffe_compat.frcnn.prefetch import PrefetchLoader, prefetch_workers

        workers = prefetch_workers(None, self.device)
        if workers and shard is None:  # prefetching builds each minibatch from its slot's seed
            shard = (0, 1, int(self.solver.param.iter_size))
        self.loader = MinibatchLoader(roidb, layer.num_classes, seed=loader_seed, has_rpn=has_rpn,
                                      shard=shard)
        if workers:
            log.info("building minibatches in %d worker process(es)", workers)
            self.loader = PrefetchLoader(self.loader, workers)
        self.data_hook = RoidbDataHook(self.solver, layer, self.loader)
        if T.BBOX_REG and T.BBOX_NORMALIZE_TARGETS and self.bbox_means is not None:
            if self.solver.set_bbox_stats(self.bbox_means, self.bbox_stds):
                log.info("snapshots will hold bbox_pred un-normalized (stds %s, means %s, per class)",
                         np.asarray(self.bbox_stds)[-4:].tolist(), np.asarray(self.bbox_means)[-4:].tolist())

    def snapshot(self) -> str:
        """Write a snapshot now; returns its (first-format) weights file."""
        return self.solver.snapshot()[0]

    def train_model(self, max_iters: int) -> List[str]:
        """Train until the solver reaches ``max_iters`` iterations, snapshotting every
        ``cfg.TRAIN.SNAPSHOT_ITERS`` and at the end; returns the snapshots' weight files."""
        self.trainer(int(max_iters)).train()
        return list(self.solver.snapshot_paths)

    def trainer(self, max_iters: int, hooks: Sequence[HookBase] = ()) -> TrainerBase:
        """The generic trainer with this run's hooks: ``hooks`` (progress, resume, signals),
        the roidb data and py-faster-rcnn's snapshots (every ``cfg.TRAIN.SNAPSHOT_ITERS``
        and at the end), stepping to ``max_iters``."""
        return TrainerBase(self.solver, [*hooks, self.data_hook,
                                         PeriodicSnapshotHook(int(cfg.TRAIN.SNAPSHOT_ITERS))],
                           max_iter=int(max_iters))


def train_net(solver_prototxt: SolverSource, roidb: List[Dict[str, Any]], output_dir: str,
              pretrained_model: Optional[str] = None, max_iters: int = 40000, *,
              resume: Optional[str] = None, device: Any = None,
              formats: Sequence[str] = ("caffemodel",), randomize: bool = False,
              progress: bool = True, progress_stream: Any = None, handle_signals: bool = True,
              seed: Optional[int] = None, save_state: bool = True, precision: str = "fp32",
              dist: Any = None, compile_backend: Optional[str] = None) -> TrainResult:
    """Train a Fast/Faster R-CNN net on ``roidb`` (py-faster-rcnn's ``train_net``).

    ``precision``: fp32 (Caffe's numbers), tf32, bf16 or fp16 (AMP with loss scaling), see
    :func:`caffe_compat.precision.install_training_precision`.

    ``resume``: a ``.solverstate`` written by an earlier run to continue from
    (``save_state=False`` writes none).
    ``progress``: show the progress bar / progress lines (``progress_stream``, default
    stderr).  Writes ``<prefix>[_<infix>]_loss.png`` and ``_loss.csv`` in ``output_dir``.
    Returns a :class:`TrainResult` (``.model_paths`` is what the original returned).
    ``dist``: this process's :class:`~caffe_compat.distributed.DistContext` in a distributed
    run (see :class:`SolverWrapper`).
    """
    from caffe_compat.frcnn.roidb import filter_roidb

    os.makedirs(output_dir, exist_ok=True)
    roidb = filter_roidb(roidb)
    sw = SolverWrapper(solver_prototxt, roidb, output_dir, pretrained_model, device=device,
                       formats=formats, randomize=randomize, seed=seed, save_state=save_state,
                       dist=dist)
    s = sw.solver
    if precision != "fp32":
        from caffe_compat.precision import install_training_precision

        install_training_precision(s, precision)
    hooks = default_hooks(int(max_iters), output_dir, os.path.basename(s.prefix), resume=resume,
                          progress=progress, progress_stream=progress_stream,
                          handle_signals=handle_signals, dist=dist, compile_backend=compile_backend)
    result = run_trainer(sw.trainer(int(max_iters), hooks))
    if dist is not None:  # every rank returns once rank 0's snapshots are written
        from caffe_compat.distributed import barrier

        barrier(dist)
    return result


def train_from_solver(solver: str, imdb_name: str, *, pretrained_model: Optional[str] = None,
                      resume: Optional[str] = None, max_iters: Optional[int] = None,
                      device: Any = None, formats: Sequence[str] = ("caffemodel",),
                      randomize: bool = False, output_dir: Optional[str] = None,
                      progress: bool = True, precision: str = "fp32", dist: Any = None,
                      compile_backend: Optional[str] = None) -> TrainResult:
    """py-faster-rcnn's ``tools/train_net.py`` under the config in force: seed from
    ``cfg.RNG_SEED`` (unless ``randomize``), the roidb of ``imdb_name``, the output folder
    (``get_output_dir(imdb)`` unless given) and ``max_iters`` (the solver's ``max_iter``,
    else the original's 40000)."""
    import pprint

    from caffe_compat.frcnn.config import get_output_dir
    from caffe_compat.trainer import seed_everything

    log.info("Using config:\n%s", pprint.pformat(dict(cfg)))
    if not randomize:
        seed_everything(cfg.RNG_SEED)
    imdb, roidb = combined_roidb(imdb_name)
    log.info("%d roidb entries", len(roidb))
    out = os.path.abspath(output_dir) if output_dir else get_output_dir(imdb)
    log.info("Output will be saved to `%s`", out)
    iters = max_iters if max_iters is not None else (load_solver_param(solver).max_iter or 40000)
    return train_net(solver, roidb, out, pretrained_model=pretrained_model, max_iters=iters,
                     resume=resume, device=device, formats=formats, randomize=randomize,
                     progress=progress, precision=precision, dist=dist, compile_backend=compile_backend)
