"""Caffe's ``Solver`` (with ``SGDSolver``'s shared part) on a :class:`Net`.

One training iteration is Caffe's ``Solver::Step`` body: clear the parameter diffs, run
forward/backward ``iter_size`` times (gradients accumulate, the loss is averaged for the
log), then ``ApplyUpdate``: learning rate from the policy (:mod:`.lr_policy`), global-L2
gradient clipping, division by ``iter_size``, L1/L2 weight decay scaled by each blob's
``decay_mult``, the solver type's update rule (:mod:`.update_rules`, Caffe's
``ComputeUpdateValue``) scaled by each blob's ``lr_mult``, and ``w -= update``.

Training data comes from the net's own data layers (Caffe's way) unless a ``feed`` is given:
a dict of arrays fed every pass, or a callable ``feed(iteration)`` /
``feed(iteration, pass_index)`` returning such a dict (``pass_index`` counts the
``iter_size`` passes of one iteration).

Snapshots are ``{prefix}_iter_{N}.caffemodel`` plus ``{prefix}_iter_{N}.solverstate``,
caffe-compat's state (:mod:`.state_safetensors`: it keeps every random generator's state, so
that a restored run continues bit-identically).  ``snapshot_format: HDF5`` writes Caffe's
``{prefix}_iter_{N}.caffemodel.h5`` and ``.solverstate.h5`` instead (:mod:`.state_hdf5`;
needs h5py).  :meth:`Solver.restore` reads all three state formats, Caffe's binaryproto one
(:mod:`.state_binaryproto`) included; Caffe's formats have no random generator states, so a
resume from them is exact in weights, history, iteration and learning-rate step, but random
draws (dropout masks, data shuffling) continue from the process's current generators.
"""
from __future__ import annotations

import inspect
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import (PATH_WIDTH, CaffeCompatError, SolverDefinitionError, SolverError,
                                 SolverStateError)
from caffe_compat.hdf5_util import h5py_module, looks_like_hdf5
from caffe_compat.io import read_net_text, read_solver_text
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver import state_binaryproto, state_hdf5, state_safetensors
from caffe_compat.solver.lr_policy import check_lr_policy, learning_rate
from caffe_compat.solver.state import SolverState
from caffe_compat.solver.update_rules import UpdateRule, update_rule_class
from caffe_compat.upgrade import upgrade_solver

#: the package's name, not this module's: log filters and tests select it by that name
log = logging.getLogger("caffe_compat.solver")

Feed = Union[None, Mapping[str, Any], Callable[..., Mapping[str, Any]]]
TestFeed = Union[None, Mapping[str, Any], Callable[[int, int], Mapping[str, Any]]]
SolverSource = Union[str, "os.PathLike[str]", "caffe_pb2.SolverParameter"]

__all__ = ["Solver", "get_solver", "IterationInfo", "TestResult", "SnapshotInfo"]


def _g(x: float) -> str:
    """A number as C++'s ``ostream << float`` prints it (6 significant digits)."""
    return f"{x:.6g}"


@dataclass
class IterationInfo:
    """What an ``on="iteration"`` callback gets after each update."""

    iter: int                 # iterations done (Caffe's iter_ after the increment)
    loss: float               # this iteration's loss, averaged over iter_size
    smoothed_loss: float      # Caffe's displayed loss (average over average_loss iterations)
    lr: float                 # the rate used for this update
    max_iter: int
    outputs: Optional["OrderedDict[str, List[float]]"] = None  # on display iterations only


@dataclass
class TestResult:
    """Caffe's test output: each net output's values averaged over test_iter."""

    net_id: int
    iter: int
    scores: "OrderedDict[str, Union[float, List[float]]]" = field(default_factory=OrderedDict)
    loss: Optional[float] = None   # with test_compute_loss
    interrupted: bool = False

    def __getitem__(self, name: str):
        return self.scores[name]


@dataclass
class SnapshotInfo:
    """What an ``on="snapshot"`` callback gets: the iteration and the files written."""

    iter: int
    model: str
    state: str


def _feed_arity(fn: Callable) -> int:
    """1 for ``fn(iteration)``, 2 for ``fn(iteration, pass_index)``."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 1
    n = 0
    for p in sig.parameters.values():
        if p.kind == p.VAR_POSITIONAL:
            return 2
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            n += 1
    return 2 if n >= 2 else 1


def _short(s: str, n: int = 80) -> str:
    """A definition's string for a message, never unbounded."""
    return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


#: float fields Caffe reads as numbers: NaN or an infinity in any of them is refused
_FLOAT_FIELDS = ("base_lr", "gamma", "power", "momentum", "momentum2", "weight_decay", "delta",
                 "rms_decay", "clip_gradients")
#: integer fields where a negative value has no meaning (Caffe would loop zero times, take a
#: negative modulo, or never test)
_COUNT_FIELDS = ("max_iter", "display", "snapshot", "test_interval")


def check_solver_values(p: "caffe_pb2.SolverParameter") -> None:
    """Every value of a solver definition that needs no net, checked with Caffe's rules before
    anything is built (a bad solver file is bad input: SolverDefinitionError, exit 2).

    Caffe's own CHECKs (``average_loss >= 1``, the learning-rate policy's CHECKs, ...) plus
    what Caffe would only meet while training: a NaN or infinite number, a negative count,
    ``test_iter`` of 0 or less (Caffe divides the test scores by it), a learning rate that is
    not finite at some iteration up to ``max_iter`` (:func:`check_lr_policy`), and a
    ``snapshot_prefix`` with a NUL byte (no file can have that name).  The solver type's own
    ranges (momentum, delta, rms_decay) are checked when its rule is built
    (:mod:`.update_rules`).
    """
    for f in _FLOAT_FIELDS:
        v = getattr(p, f)
        if not math.isfinite(v):
            raise SolverDefinitionError(f"{f} must be a finite number, got {v}")
    for f in _COUNT_FIELDS:
        v = getattr(p, f)
        if v < 0:
            raise SolverDefinitionError(f"{f} must not be negative, got {v} (an interval; 0 turns it off)"
                                        if f != "max_iter" else f"max_iter must not be negative, got {v}")
    if p.average_loss < 1:
        raise SolverDefinitionError(f"average_loss must be at least 1, got {p.average_loss}")
    if p.iter_size < 1:
        raise SolverDefinitionError(f"iter_size must be at least 1, got {p.iter_size}")
    for i, n in enumerate(p.test_iter):
        if n <= 0:
            raise SolverDefinitionError(f"test_iter must be positive, got test_iter {n} (entry {i}): a test "
                                        "pass of no iteration has no scores, and Caffe divides its loss by "
                                        "test_iter")
    if "\x00" in p.snapshot_prefix:
        raise SolverDefinitionError(f"snapshot_prefix contains a NUL byte (at character "
                                    f"{p.snapshot_prefix.index(chr(0))}): no file can have that name")
    check_lr_policy(p)


class Solver:
    """A Caffe solver over a train net (and test nets), with Caffe's exact update rules.

    The update rule is the one registered for the definition's ``type``
    (:func:`~caffe_compat.solver.update_rules.update_rule_class`), held as ``self.rule``;
    everything else is shared by all types, as Caffe's ``Solver``/``SGDSolver`` code is.

    ``solver`` is a solver prototxt path, its text, or a ``caffe_pb2.SolverParameter``.  Net
    file paths inside it are resolved against the current directory, as Caffe does.
    ``weights`` (a path, a comma-separated list, or a list) fine-tunes from existing
    weights like ``caffe train --weights``; the solver's own ``weights`` field is honoured too.
    """

    def __init__(self, solver: SolverSource, *, feed: Feed = None, test_feed: TestFeed = None,
                 device=None, weights: Union[None, str, Sequence[str]] = None,
                 dtype: Optional[torch.dtype] = None):
        self.param = self._read_param(solver)
        p = self.param
        self.type: str = p.type or "SGD"
        self.rule: UpdateRule
        self._check_param()
        self.feed = feed
        self._feed_arity = _feed_arity(feed) if callable(feed) else 0
        self.test_feed = test_feed
        self.iter: int = 0
        self.current_step: int = 0
        self.requested_early_exit = False
        self._stop_requested = False
        self._stop_snapshot = True
        self._snapshot_requested = False
        self._last_snapshot_iter: Optional[int] = None
        self._callbacks: Dict[str, List[Callable]] = {"iteration": [], "test": [], "snapshot": []}
        self._losses: List[float] = []
        self.smoothed_loss: float = 0.0
        self.last_lr: Optional[float] = None
        #: mixed precision (set by caffe_compat.precision.install_training_precision): forwards
        #: under autocast to this dtype, and a torch.amp.GradScaler scaling the loss and driving
        #: the update (iterations whose gradients overflow are skipped and counted)
        self.autocast_dtype: Optional[torch.dtype] = None
        self.grad_scaler: Any = None
        self.skipped_iterations = 0
        #: distributed training (:class:`caffe_compat.distributed.GradSync`): called as
        #: ``grad_sync(solver, loss) -> loss`` after the iter_size passes, before the update
        #: (sums the gradients over the processes, returns the world's loss); None: one process
        self.grad_sync: Optional[Callable[["Solver", float], float]] = None
        #: the run's :class:`caffe_compat.distributed.DistContext` (None: one process)
        self.dist: Any = None
        #: with grad_sync: the stop request as the world agreed on it at this iteration's
        #: all-reduce (a signal seen by one rank later stops everyone one iteration later)
        self._synced_stop = False
        #: (role, path) of every file read: weights, restored states (snapshots spare them)
        self.input_files: List[Tuple[str, str]] = []
        # Caffe seeds its global RNG before building the nets
        if p.random_seed >= 0:
            seed = int(p.random_seed)
            torch.manual_seed(seed)
        else:
            seed = int.from_bytes(os.urandom(4), "little")
        self.seed = seed
        self.net = self._build_train_net(seed, device)
        self.test_nets = self._build_test_nets(seed, device)
        if dtype is not None:
            for n in [self.net] + self.test_nets:
                n.to(dtype)
        wlist: List[str] = list(p.weights)
        if weights is not None:
            wlist += [weights] if isinstance(weights, (str, os.PathLike)) else list(weights)
        for item in wlist:
            for w in str(item).split(","):
                w = w.strip()
                if w:
                    self.load_weights(w)
        self.history: List[Tensor] = self._new_history()

    # ------------------------------------------------------------------ setup
    @staticmethod
    def _read_param(solver: SolverSource) -> "caffe_pb2.SolverParameter":
        if isinstance(solver, caffe_pb2.SolverParameter):
            return upgrade_solver(solver, source="<SolverParameter>")
        if not isinstance(solver, (str, os.PathLike)):
            raise TypeError(f"solver must be a path, prototxt text or SolverParameter, not {type(solver)}")
        src = os.fspath(solver)
        param = read_solver_text(src)
        if os.path.isfile(src):
            # BVLC's UpgradeSnapshotPrefixProperty: default prefix from the solver file name;
            # a prefix naming a directory gets the solver file's stem appended.
            stem = os.path.splitext(src)[0]
            if not param.HasField("snapshot_prefix"):
                param.snapshot_prefix = stem
            elif os.path.isdir(param.snapshot_prefix):
                param.snapshot_prefix = os.path.join(param.snapshot_prefix, os.path.basename(stem))
        return param

    def _check_param(self) -> None:
        """Caffe's CHECKs on the solver definition, and every value checked with Caffe's rules
        (:func:`check_solver_values`), as SolverDefinitionErrors before any net is built;
        builds ``self.rule``."""
        p = self.param
        rule_class = update_rule_class(self.type)
        check_solver_values(p)
        if p.weight_decay != 0 and p.regularization_type not in ("L1", "L2"):
            raise SolverDefinitionError(f"unknown regularization_type '{_short(p.regularization_type)}'; "
                                        "allowed: L1, L2")
        self.rule = rule_class(p)  # the rule's own CHECKs (e.g. no momentum with AdaGrad)
        if p.snapshot_format == caffe_pb2.SolverParameter.HDF5:
            h5py_module(SolverError, "snapshot_format: HDF5 snapshots")  # fail now, not at a snapshot
        if p.snapshot:
            if not p.snapshot_prefix:
                raise SolverDefinitionError("snapshot is specified but snapshot_prefix is not")
            folder = os.path.dirname(os.path.abspath(p.snapshot_prefix))
            if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
                prefix, where = _short(p.snapshot_prefix, PATH_WIDTH), _short(folder, PATH_WIDTH)
                raise SolverDefinitionError(f"cannot write to snapshot prefix '{prefix}': "
                                            f"make sure the directory {where} exists and is writable")
        if p.snapshot_diff:
            log.warning("snapshot_diff is ignored: snapshots hold weights only")
        self._train_source()  # the nets' fields, before the (possibly long) train net build
        self._test_sources()

    @staticmethod
    def _net_file(path: str, what: str) -> str:
        if os.path.exists(path):
            return path
        raise SolverDefinitionError(f"{what} file '{_short(path, PATH_WIDTH)}' not found (net paths in a solver are "
                                    f"relative to the current directory {os.getcwd()}, as in Caffe)")

    @staticmethod
    def _merged_state(net_param: "caffe_pb2.NetParameter", phase: int,
                      override: Optional["caffe_pb2.NetState"]) -> "caffe_pb2.NetState":
        """Caffe's precedence: solver default phase < the net's own state < train/test_state."""
        st = caffe_pb2.NetState()
        st.phase = phase
        st.MergeFrom(net_param.state)
        if override is not None:
            st.MergeFrom(override)
        return st

    def _make_net(self, source, phase: int, override, seed: int, device):
        net_param = read_net_text(source) if not isinstance(source, caffe_pb2.NetParameter) else source
        st = self._merged_state(net_param, phase, override)
        return Net(source, phase="train" if st.phase == caffe_pb2.TRAIN else "test",
                   level=int(st.level), stages=list(st.stage), seed=seed, device=device)

    def _train_source(self):
        """The train net's definition (a checked path or a NetParameter), from the one field
        that gives it (Caffe's InitTrainNet CHECKs)."""
        p = self.param
        fields = ("net", "net_param", "train_net", "train_net_param")
        given = [f for f in fields if p.HasField(f)]
        if not given:
            raise SolverDefinitionError("the solver must specify a train net using one of these fields: "
                                        + ", ".join(fields))
        if len(given) > 1:
            raise SolverDefinitionError("the solver must not give more than one of these fields specifying "
                                        f"a train net: {', '.join(fields)} (got {', '.join(given)})")
        f = given[0]
        source = getattr(p, f)
        return self._net_file(source, f) if f in ("net", "train_net") else source

    def _test_sources(self) -> list:
        """Each test net's definition, with Caffe's InitTestNets CHECKs (test_iter, test_state
        and test_interval against the number of test nets)."""
        p = self.param
        sources: List[Any] = list(p.test_net_param)
        sources += [self._net_file(t, "test_net") for t in p.test_net]
        n_specific = len(sources)
        generic = p.HasField("net") or p.HasField("net_param")
        if generic:
            if len(p.test_iter) < n_specific:
                raise SolverDefinitionError(f"test_iter must be given for each test net ({n_specific} test "
                                            f"nets, {len(p.test_iter)} test_iter)")
            for _ in range(len(p.test_iter) - n_specific):
                sources.append(p.net if p.HasField("net") else p.net_param)
        elif len(p.test_iter) != n_specific:
            raise SolverDefinitionError(f"test_iter must be given once per test net ({n_specific} test "
                                        f"nets, {len(p.test_iter)} test_iter)")
        if len(p.test_state) and len(p.test_state) != len(sources):
            raise SolverDefinitionError(f"test_state must be unspecified or given once per test net "
                                        f"({len(sources)} test nets, {len(p.test_state)} test_state)")
        if sources and p.test_interval <= 0:
            raise SolverDefinitionError(f"test_interval must be positive when there are test nets "
                                        f"(got {p.test_interval})")
        return sources

    def _build_train_net(self, seed: int, device):
        p = self.param
        override = p.train_state if p.HasField("train_state") else None
        return self._make_net(self._train_source(), caffe_pb2.TRAIN, override, seed, device)

    def _build_test_nets(self, seed: int, device) -> list:
        p = self.param
        nets = []
        for i, src in enumerate(self._test_sources()):
            override = p.test_state[i] if len(p.test_state) else None
            nets.append(self._make_net(src, caffe_pb2.TEST, override, seed + 1 + i, device))
        return nets

    def _new_history(self) -> List[Tensor]:
        params = [info.param for info in self.net.learnable_params()]
        return [torch.zeros_like(t, memory_format=torch.contiguous_format).detach()
                for _ in range(self.rule.history_sets) for t in params]

    # ------------------------------------------------------------------ API
    @property
    def max_iter(self) -> int:
        return int(self.param.max_iter)

    def add_callback(self, fn: Callable, *, on: str = "iteration") -> None:
        """Call ``fn(solver, info)`` after each iteration (``IterationInfo``), each test
        (``on="test"``, ``TestResult``) or each snapshot (``on="snapshot"``, ``SnapshotInfo``)."""
        if on not in self._callbacks:
            raise ValueError(f"unknown callback event '{on}'; allowed: {', '.join(self._callbacks)}")
        self._callbacks[on].append(fn)

    def request_stop(self, snapshot: bool = True) -> None:
        """Stop after the current iteration (or test pass); safe to call from a signal handler.

        With ``snapshot`` the solver writes a snapshot of the iteration it stopped at (as
        ``caffe train`` does on SIGINT); without, it writes nothing more.
        """
        self._stop_requested = True
        self._stop_snapshot = bool(snapshot)

    def request_snapshot(self) -> None:
        """Write a snapshot after the current iteration and go on (Caffe's SIGHUP action)."""
        self._snapshot_requested = True

    def load_weights(self, path: str) -> None:
        """Fine-tune from ``path`` (Caffe's CopyTrainedLayersFrom: layers absent from the file
        keep their initial values) into the train net and every test net."""
        self._note_input(path, "weights")
        for n in [self.net] + self.test_nets:
            for note in n.load_weights(path, allow_missing=True):
                log.info("%s: %s", path, note)

    @property
    def learning_rate(self) -> float:
        """The rate the next update will use (does not advance ``multistep``)."""
        return learning_rate(self.param, self.iter, self.current_step)[0]

    # ------------------------------------------------------------------ training
    def _feed_inputs(self, iteration: int, pass_index: int) -> Dict[str, Any]:
        feed = self.feed
        if feed is None:
            return {}
        if callable(feed):
            got = feed(iteration, pass_index) if self._feed_arity == 2 else feed(iteration)
        else:
            got = feed
        return self._on_device(self.net, got)

    @staticmethod
    def _on_device(net, inputs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
        if inputs is None:
            return {}
        if not isinstance(inputs, Mapping):
            raise SolverError(f"a feed must return a dict of input blobs, got {type(inputs).__name__}")
        dev = net.device
        return {k: (v.to(dev) if isinstance(v, Tensor) and v.device != dev else v) for k, v in inputs.items()}

    def _forward_backward(self, iteration: int, pass_index: int) -> Optional[Tensor]:
        """One Caffe ``ForwardBackward``: returns the loss tensor (detached) or None."""
        inputs = self._feed_inputs(iteration, pass_index)
        if self.autocast_dtype is None:
            self.net.forward(**inputs)
        else:
            with torch.autocast(self.net.device.type, dtype=self.autocast_dtype):
                self.net.forward(**inputs)
        loss = self.net.loss
        if loss is None:
            return None
        if loss.requires_grad:
            with self.net.precision():
                (loss if self.grad_scaler is None else self.grad_scaler.scale(loss.float())).backward()
        return loss.detach() if self.autocast_dtype is None else loss.detach().float()

    def _nonfinite_loss_top(self) -> Optional[str]:
        for e in self.net.entries:
            for t, w in zip(e.tops, e.loss_weights):
                b = self.net.blobs.get(t)
                if w and b is not None and not bool(torch.isfinite(b.detach()).all()):
                    return f"'{t}' (layer '{e.name}')"
        return None

    def _update_smoothed_loss(self, loss: float, start_iter: int) -> None:
        """Caffe's UpdateSmoothedLoss: running mean of the last ``average_loss`` losses."""
        avg = int(self.param.average_loss)
        if len(self._losses) < avg:
            self._losses.append(loss)
            size = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (size - 1) + loss) / size
        else:
            idx = (self.iter - start_iter) % avg
            self.smoothed_loss += (loss - self._losses[idx]) / avg
            self._losses[idx] = loss

    def _output_values(self, net) -> "OrderedDict[str, List[float]]":
        out: "OrderedDict[str, List[float]]" = OrderedDict()
        for name in net.output_names:
            b = net.blobs.get(name)
            if b is not None:
                out[name] = [float(v) for v in b.detach().reshape(-1).double().cpu().tolist()]
        return out

    @staticmethod
    def _loss_weights(net) -> Dict[str, float]:
        w: Dict[str, float] = {}
        for e in net.entries:
            for t, lw in zip(e.tops, e.loss_weights):
                w[t] = float(lw)
        return w

    def _display_outputs(self, net, values: Mapping[str, List[float]], what: str) -> None:
        weights = self._loss_weights(net)
        k = 0
        for name, vals in values.items():
            lw = weights.get(name, 0.0)
            for v in vals:
                extra = f" (* {_g(lw)} = {_g(lw * v)} loss)" if lw else ""
                log.info("    %s net output #%d: %s = %s%s", what, k, name, _g(v), extra)
                k += 1

    def step(self, iters: int = 1) -> None:
        """Run ``iters`` training iterations (Caffe's ``Solver::Step``)."""
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + int(iters)
        self._losses = []
        self.smoothed_loss = 0.0
        params = self.net.learnable_params()
        while self.iter < stop_iter:
            for info in params:
                info.param.grad = None
            if (p.test_interval and self.iter % p.test_interval == 0
                    and (self.iter > 0 or p.test_initialization) and self.test_nets):
                self.test_all()
                if self.requested_early_exit:
                    break
            display = bool(p.display) and self.iter % p.display == 0
            total: Optional[Tensor] = None
            for i in range(int(p.iter_size)):
                loss = self._forward_backward(self.iter, i)
                if loss is not None:
                    total = loss if total is None else total + loss
            loss_val = 0.0 if total is None else float(total) / int(p.iter_size)
            if self.grad_sync is not None:  # every rank: the world's gradients and loss
                loss_val = self.grad_sync(self, loss_val)
            if not math.isfinite(loss_val):
                top = self._nonfinite_loss_top()
                where = f"; first non-finite loss top: {top}" if top else ""
                raise SolverError(f"loss is {loss_val} at iteration {self.iter}{where} "
                                  "(weights were not updated)")
            self._update_smoothed_loss(loss_val, start_iter)
            outputs = None
            if display:
                log.info("Iteration %d, loss = %s", self.iter, _g(self.smoothed_loss))
                outputs = self._output_values(self.net)
                self._display_outputs(self.net, outputs, "Train")
            rate = self.apply_update(display) if self.grad_scaler is None else self._scaled_update(display)
            self.iter += 1
            info = IterationInfo(self.iter, loss_val, self.smoothed_loss, rate, self.max_iter, outputs)
            for cb in self._callbacks["iteration"]:
                cb(self, info)
            stop = self._stop_requested if self.grad_sync is None else self._synced_stop
            if ((p.snapshot and self.iter % p.snapshot == 0) or self._snapshot_requested
                    or (stop and self._stop_snapshot)):
                self._snapshot_requested = False
                self.snapshot()
            if stop:
                self._stop_requested = False
                self.requested_early_exit = True
                break

    def _scaled_update(self, display: bool) -> float:
        """The update driven by ``grad_scaler``: gradients unscaled, then Caffe's update, or
        nothing when they overflowed at this scale (the scale then shrinks)."""
        from caffe_compat.precision import SolverOptimizer

        opt = SolverOptimizer(self, self.apply_update)
        opt.display = display
        scaler = self.grad_scaler
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        if opt.rate is None:
            self.skipped_iterations += 1
            return float(self.last_lr or 0.0)
        return opt.rate

    def apply_update(self, display: bool = False) -> float:
        """Caffe's ``ApplyUpdate`` on the accumulated gradients; returns the rate used."""
        p = self.param
        rate, self.current_step = learning_rate(p, self.iter, self.current_step)
        self.last_lr = rate
        if display:
            log.info("Iteration %d, lr = %s", self.iter, _g(rate))
        infos = self.net.learnable_params()
        if len(self.history) != self.rule.history_sets * len(infos):
            raise SolverError("the net's learnable parameters changed since the solver was built")
        with torch.no_grad():
            grads: List[Tensor] = []
            for info in infos:
                w = info.param
                g = w.grad
                grads.append(torch.zeros_like(w) if g is None else g)
            self._clip_gradients(grads)
            if p.iter_size != 1:
                norm = float(np.float32(1.0) / np.float32(p.iter_size))
                for g in grads:
                    g.mul_(norm)
            n = len(infos)
            for i, (info, g) in enumerate(zip(infos, grads)):
                w = info.param
                self._regularize(w, g, info.decay_mult)
                local_rate = float(np.float32(rate) * np.float32(info.lr_mult))
                upd = self._compute_update(i, n, w, g, local_rate)
                w.sub_(upd)  # Caffe's Net::Update: data -= diff
        return rate

    def _clip_gradients(self, grads: List[Tensor]) -> None:
        clip = float(np.float32(self.param.clip_gradients))
        if clip < 0:
            return
        sumsq = sum(float(torch.sum(g.double() * g.double())) for g in grads)
        norm = math.sqrt(sumsq)
        if norm > clip:
            scale = float(np.float32(clip) / np.float32(norm))
            log.info("Gradient clipping: scaling down gradients (L2 norm %s > %s) by scale factor %s",
                     _g(norm), _g(clip), _g(scale))
            for g in grads:
                g.mul_(scale)

    def _regularize(self, w: Tensor, g: Tensor, decay_mult: float) -> None:
        p = self.param
        local_decay = float(np.float32(p.weight_decay) * np.float32(decay_mult))
        if not local_decay:
            return
        if p.regularization_type == "L2":
            g.add_(w, alpha=local_decay)
        else:  # "L1" (checked at construction)
            g.add_(torch.sign(w), alpha=local_decay)

    def _hist(self, j: int, like: Tensor) -> Tensor:
        h = self.history[j]
        if h.device != like.device or h.dtype != like.dtype:
            h = self.history[j] = h.to(device=like.device, dtype=like.dtype)
        return h

    def _compute_update(self, i: int, n: int, w: Tensor, g: Tensor, local_rate: float) -> Tensor:
        """The solver type's ComputeUpdateValue for learnable blob ``i`` of ``n``; returns the
        step.  Its history is ``history[i]`` (and ``history[n + i]`` for a second set)."""
        hist = [self._hist(b * n + i, w) for b in range(self.rule.history_sets)]
        return self.rule.compute_update_value(hist, g, local_rate, self.iter)

    def solve(self, resume_file: Optional[str] = None) -> None:
        """Train to ``max_iter`` (Caffe's ``Solver::Solve``), optionally resuming a snapshot."""
        p = self.param
        log.info("Solving %s", self.net.net_name)
        log.info("Learning Rate Policy: %s", p.lr_policy)
        self.requested_early_exit = False
        if resume_file:
            log.info("Restoring previous solver status from %s", resume_file)
            self.restore(resume_file)
        start_iter = self.iter
        self.step(p.max_iter - self.iter)
        stopped_without_snapshot = self.requested_early_exit and not self._stop_snapshot
        if (p.snapshot_after_train and not stopped_without_snapshot
                and self._last_snapshot_iter != self.iter
                and (not p.snapshot or self.iter % p.snapshot != 0)):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            with torch.no_grad():
                self.net.forward(**self._feed_inputs(self.iter, 0))
            loss = self.net.loss
            self._update_smoothed_loss(0.0 if loss is None else float(loss), start_iter)
            log.info("Iteration %d, loss = %s", self.iter, _g(self.smoothed_loss))
        if p.test_interval and self.iter % p.test_interval == 0 and self.test_nets:
            self.test_all()
        log.info("Optimization Done.")

    # ------------------------------------------------------------------ testing
    def share_trained_layers(self, test_net) -> None:
        """Caffe's ShareTrainedLayersWith: test-net layers named like train-net layers use the
        train net's blobs (the same tensors, so tests see the current weights)."""
        for e in test_net.entries:
            if e.module is None:
                continue
            src = self.net._by_name.get(e.name)
            if src is None or src.module is None:
                continue
            mine, theirs = e.module, src.module
            if not theirs.blob_names:
                continue
            if len(mine.blob_names) != len(theirs.blob_names):
                raise SolverError(f"test net layer '{e.name}' has {len(mine.blob_names)} blobs, the "
                                  f"train net's has {len(theirs.blob_names)}")
            for a, b in zip(mine.blob_names, theirs.blob_names):
                t_src = getattr(theirs, b)
                t_dst = getattr(mine, a)
                if t_dst is t_src:
                    continue
                if tuple(t_dst.shape) != tuple(t_src.shape):
                    raise SolverError(f"cannot share blob '{a}' of layer '{e.name}' with the train "
                                      f"net: shape {tuple(t_dst.shape)} vs {tuple(t_src.shape)}")
                if a in mine._parameters:
                    mine._parameters[a] = t_src
                else:
                    mine._buffers[a] = t_src

    def _test_inputs(self, net_id: int, i: int) -> Dict[str, Any]:
        tf = self.test_feed
        if tf is None:
            return {}
        got = tf(net_id, i) if callable(tf) else tf
        return self._on_device(self.test_nets[net_id], got)

    def test(self, test_net_id: int = 0) -> TestResult:
        """Run test net ``test_net_id`` for its ``test_iter`` and average its outputs (Caffe's
        ``TestClassification``); logs Caffe's lines and returns the scores."""
        p = self.param
        if not 0 <= test_net_id < len(self.test_nets):
            raise SolverError(f"no test net #{test_net_id} (the solver has {len(self.test_nets)}; "
                              "test nets come from test_net/test_net_param or net + test_iter)")
        log.info("Iteration %d, Testing net (#%d)", self.iter, test_net_id)
        net = self.test_nets[test_net_id]
        self.share_trained_layers(net)
        n_iter = int(p.test_iter[test_net_id])
        sums: Optional[List[Tensor]] = None
        names: List[str] = []
        loss = 0.0
        result = TestResult(test_net_id, self.iter)
        with torch.no_grad():
            for i in range(n_iter):
                if self._snapshot_requested:
                    self._snapshot_requested = False
                    self.snapshot()
                if self._stop_requested:
                    self._stop_requested = False
                    if self._stop_snapshot:
                        self.snapshot()
                    self.requested_early_exit = True
                if self.requested_early_exit:
                    break
                outs = net.forward(**self._test_inputs(test_net_id, i))
                if p.test_compute_loss and net.loss is not None:
                    loss += float(net.loss)
                vals = [o.detach().reshape(-1).double() for o in outs.values()]
                if sums is None:
                    names = list(outs.keys())
                    sums = [v.clone() for v in vals]
                else:
                    for s, v in zip(sums, vals):
                        s.add_(v)
        if self.requested_early_exit:
            log.info("Test interrupted.")
            result.interrupted = True
            return result
        if p.test_compute_loss:
            result.loss = loss / n_iter
            log.info("Test loss: %s", _g(result.loss))
        if sums is not None:
            for name, s in zip(names, sums):
                means = [float(x) / n_iter for x in s.cpu().tolist()]
                result.scores[name] = means[0] if len(means) == 1 else means
            self._display_outputs(net, OrderedDict((n, [v] if isinstance(v, float) else v)
                                                   for n, v in result.scores.items()), "Test")
        for cb in self._callbacks["test"]:
            cb(self, result)
        return result

    def test_all(self) -> List[TestResult]:
        """Every test net in turn (Caffe's ``TestAll``)."""
        out = []
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            out.append(self.test(i))
        return out

    # ------------------------------------------------------------------ snapshots
    def snapshot_filename(self, extension: str) -> str:
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    @property
    def _hdf5_snapshots(self) -> bool:
        return self.param.snapshot_format == caffe_pb2.SolverParameter.HDF5

    def snapshot(self) -> Tuple[str, str]:
        """Write ``{prefix}_iter_{N}.caffemodel`` and ``.solverstate`` (each atomically), or
        with ``snapshot_format: HDF5`` Caffe's ``.caffemodel.h5`` and ``.solverstate.h5``."""
        hdf5 = self._hdf5_snapshots
        kind = "HDF5" if hdf5 else "binary proto"
        model = self.snapshot_filename(".caffemodel.h5" if hdf5 else ".caffemodel")
        folder = os.path.dirname(os.path.abspath(model))
        if not os.path.isdir(folder):
            raise SolverError(f"cannot write snapshot {model}: directory {folder} does not exist")
        if not self.param.snapshot_prefix:
            log.warning("snapshot_prefix is not set: writing %s in the current directory", model)
        log.info("Snapshotting to %s file %s", kind, model)
        try:
            self.net.save_weights(model)
        except CaffeCompatError:  # a full disk's WriteError already names the file
            raise
        except OSError as e:
            raise SolverError(f"cannot write snapshot {model}: {e}") from None
        state = self.snapshot_filename(".solverstate.h5" if hdf5 else ".solverstate")
        log.info("Snapshotting solver state to %s file %s", kind, state)
        if hdf5:
            self._write_state_hdf5(state, model)
        else:
            self._write_state(state, model)
        self._last_snapshot_iter = self.iter
        info = SnapshotInfo(self.iter, model, state)
        for cb in self._callbacks["snapshot"]:
            cb(self, info)
        return model, state

    def _named_nets(self) -> List[Tuple[str, Any]]:
        return [("train", self.net)] + [(f"test{i}", n) for i, n in enumerate(self.test_nets)]

    def _write_state(self, path: str, model: str) -> None:
        """caffe-compat's ``.solverstate``: history in this solver's layout, generator states
        and the ``_extra_state`` of subclasses."""
        extra_tensors, extra_meta = self._extra_state()
        state_safetensors.write_state(
            path, SolverState(self.iter, self.current_step, model, self.history), solver_type=self.type,
            params=[(i.key, list(i.param.shape)) for i in self.net.learnable_params()],
            rng=state_safetensors.rng_states(self._named_nets()), extra_tensors=extra_tensors,
            extra_meta=extra_meta)

    def _write_state_hdf5(self, path: str, model: str) -> None:
        """Caffe's HDF5 solver state: iteration, step, weights file name and history only
        (no generator states, no ``_extra_state``: Caffe's layout has no place for them)."""
        try:
            state_hdf5.write_state(path, SolverState(self.iter, self.current_step, model,
                                                     self._caffe_history()))
        except CaffeCompatError:
            raise
        except OSError as e:
            raise SolverError(f"cannot write solver state {path}: {e}") from None

    def _extra_state(self) -> Tuple[Dict[str, Tensor], Dict[str, str]]:
        """More tensors and metadata strings for the ``.solverstate`` (subclasses: e.g. the
        Faster R-CNN trainer's loader position); names must not clash with the solver's."""
        return {}, {}

    def restore(self, state_path: str) -> None:
        """Restore a snapshot: weights, iteration, step counter, history and RNG states.

        Reads this project's ``.solverstate`` (safetensors), Caffe's binaryproto one, or
        Caffe's HDF5 one (named ``*.h5``, or HDF5 content; it has no RNG states, so random
        draws after the resume differ from the uninterrupted run's).
        """
        state_path = os.fspath(state_path)
        self._note_input(state_path, "solver state")
        if state_path.endswith(".h5") or looks_like_hdf5(state_path):
            # the state can hold no more history than this net's solver keeps: a small
            # compressed file declaring more is refused before its data is read
            most = self.rule.history_sets * sum(t.numel() for _, t in self._caffe_history_slots())
            most = max(most, sum(h.numel() for h in self.history))
            self._apply_restored(state_path, state_hdf5.read_state(state_path, max_elements=most))
            log.info("Restored solver state at iteration %d from %s (HDF5: no random generator "
                     "states)", self.iter, state_path)
            return
        try:
            with open(state_path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SolverStateError(f"cannot read solver state: {e.strerror}", where=state_path) from None
        if state_safetensors.is_safetensors(data):
            state, rng = state_safetensors.read_state(state_path, data, solver_type=self.type)
            self._apply_restored(state_path, state)
            state_safetensors.set_rng_states(rng, self._named_nets())
        else:
            self._apply_restored(state_path, state_binaryproto.read_state(state_path, data))
        log.info("Restored solver state at iteration %d from %s", self.iter, state_path)

    def _note_input(self, path: str, role: str) -> None:
        """Remember a file this solver read (``input_files``): snapshots must not replace it
        (``caffe_compat.trainer.TrainSolver`` refuses to; within a command, every write does)."""
        from caffe_compat.atomic import register_input

        self.__dict__.setdefault("input_files", []).append((role, os.fspath(path)))
        register_input(path, role)

    def _learned_net_path(self, state_path: str, learned: str) -> str:
        for path in (learned, os.path.join(os.path.dirname(os.path.abspath(state_path)),
                                           os.path.basename(learned))):
            if os.path.exists(path):
                self._note_input(path, "weights named by the solver state")
                return path
        raise SolverStateError(f"the weights file '{learned}' named by the solver state was not found "
                          "(looked relative to the current directory and next to the state file)",
                          where=state_path)

    def _caffe_history_slots(self) -> List[Tuple[Optional[int], Tensor]]:
        """Caffe's history layout: one slot per blob the net owns (its ``learnable_params_``,
        net order), buffers such as BatchNorm's statistics included.  Each slot is (index in
        ``learnable_params()`` or None for a buffer, which this solver never updates; blob)."""
        index = {id(info.param): k for k, info in enumerate(self.net.learnable_params())}
        seen: set = set()
        slots: List[Tuple[Optional[int], Tensor]] = []
        for e in self.net.entries:
            for t in (e.module.caffe_blobs() if e.module is not None else []):
                if id(t) not in seen:  # a sharer's blob is its owner's slot
                    seen.add(id(t))
                    slots.append((index.get(id(t)), t))
        return slots

    def _caffe_history(self) -> List[Tensor]:
        """The history in Caffe's layout (what Caffe's solver states hold): zeros for buffers."""
        n = len(self.net.learnable_params())
        out: List[Tensor] = []
        for b in range(self.rule.history_sets):
            for k, t in self._caffe_history_slots():
                out.append(self.history[b * n + k] if k is not None
                           else torch.zeros(t.shape, dtype=self.history[0].dtype if self.history
                                            else t.dtype))
        return out

    def _from_caffe_history(self, arrays: List[Tensor], state_path: str) -> List[Tensor]:
        """``arrays`` in this solver's layout: a state in Caffe's layout (which has slots for
        buffers, e.g. BatchNorm statistics) loses the buffers' entries."""
        if len(arrays) == len(self.history):
            return arrays
        slots = self._caffe_history_slots()
        blocks = self.rule.history_sets
        if len(arrays) != blocks * len(slots):
            extra = (f" (or {blocks * len(slots)} in Caffe's layout, which also counts buffers such as "
                     "BatchNorm statistics)" if blocks * len(slots) != len(self.history) else "")
            raise SolverStateError(f"incorrect number of history blobs: the state has {len(arrays)}, a "
                              f"{self.type} solver on this net needs {len(self.history)}{extra} "
                              "(another solver type or net?)", where=state_path)
        n = len(self.net.learnable_params())
        out: List[Tensor] = list(self.history)  # every entry is replaced below
        for b in range(blocks):
            for j, (k, t) in enumerate(slots):
                a = arrays[b * len(slots) + j]
                if k is not None:
                    out[b * n + k] = a
                elif a.numel() != t.numel():
                    raise SolverStateError(f"history blob {b * len(slots) + j} has {a.numel()} values, "
                                      f"expected {t.numel()} (shape {tuple(t.shape)})", where=state_path)
        return out

    def _load_history(self, arrays: List[Tensor], state_path: str) -> None:
        arrays = self._from_caffe_history(arrays, state_path)
        for i, (h, a) in enumerate(zip(self.history, arrays)):
            if a.numel() != h.numel():
                raise SolverStateError(f"history blob {i} has {a.numel()} values, expected {h.numel()} "
                                  f"(shape {tuple(h.shape)})", where=state_path)
            with torch.no_grad():
                h.copy_(a.reshape(h.shape).to(device=h.device, dtype=h.dtype))

    def _apply_restored(self, state_path: str, state: SolverState) -> None:
        """What every state format restores: the weights file it names (looked up like
        Caffe, then next to the state), the history, the iteration and the step counter."""
        if state.learned_net:
            self.net.load_weights(self._learned_net_path(state_path, state.learned_net))
        self._load_history(state.history, state_path)
        self.iter = state.iter
        self.current_step = state.current_step


def get_solver(solver: SolverSource, **kw) -> Solver:
    """pycaffe's ``caffe.get_solver``: the solver of the definition's ``type``."""
    return Solver(solver, **kw)
