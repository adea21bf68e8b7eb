"""Training and testing on many processes (GPUs, machines) with ``torch.distributed``.

Caffe's ``caffe train -gpu 0,1,2,3`` ran one solver per GPU; after every iteration's
backward the diffs were summed over the GPUs and scaled by ``1/solver_count`` (its NCCL
path), and every solver applied the same update.  So *N processes are one process with
``iter_size`` multiplied by N on the same minibatches*.  This module gives caffe-compat the
same, on one machine or several:

* :class:`DistContext` -- rank, world size, local rank and device of this process, read once
  from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
  ``MASTER_PORT``) and passed on explicitly (no global read at run time); gloo on the CPU,
  NCCL on CUDA devices, chosen by the device.
* :class:`GradSync` -- the solver's ``grad_sync``: between the last ``iter_size`` backward and
  Caffe's ``ApplyUpdate`` it sums the gradients over the processes with
  ``torch.distributed.all_reduce`` on flattened fp32 buckets (PyTorch's own collective) and
  scales them by ``1/world_size``.  A small second buffer carries the iteration's loss (so
  every rank logs and checks the world's loss) and the stop requests of signals (so every
  rank stops at the same iteration).  Why not ``DistributedDataParallel``: a Caffe net's loss
  is the sum of its loss tops (``net.loss``), not its forward's output; parameters frozen by
  ``lr_mult: 0`` or unused by a minibatch (no foreground RoI) would need
  ``find_unused_parameters``; and Caffe reduces once per iteration, after all ``iter_size``
  passes (DDP's ``no_sync`` would do the same, with hooks that also change the gradient
  buffers' layout).  One explicit all-reduce at Caffe's point is the simplest equal of it;
  DDP's one gain, overlapping the reduction with the backward, is discussed in
  docs/distributed.md.
* :func:`batch_slot` / :func:`shard_slots` -- the data split: the global stream of minibatches
  (one seeded order, the same on every rank) is dealt out in blocks: at iteration ``k`` rank
  ``r`` takes minibatches ``k*N*s + r*s ... + s - 1`` (``s`` = ``iter_size``), which are
  exactly the minibatches the single process with ``iter_size = N*s`` reads at that
  iteration.
* :func:`launch` -- ``--gpus 0,1`` / ``all`` / ``cpu:N``: one process per device on this
  machine with torchrun's elastic launcher API; a rank that dies ends the job with an error
  naming it; :class:`GradSync` names a rank that hangs (its all-reduce times out).
* :func:`gather_objects` -- rank 0 collects a picklable object from every rank (the
  detections of a sharded test).
* :func:`convert_sync_batchnorm` -- ``--sync-batchnorm``: Caffe's BatchNorm layers normalise
  with the statistics of the whole world's batch instead of each process's (opt-in; Caffe's
  BatchNorm is per process).
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import sys
import types
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import SchemaError, SolverError

__all__ = ["DistributedError", "DistContext", "parse_gpus", "GradSync", "batch_slot", "shard_slots",
           "launch", "gather_objects", "broadcast_params", "convert_sync_batchnorm", "shard_range",
           "WORKER_ENV", "DEFAULT_TIMEOUT_S", "slot_seed", "install", "seed_data_layers", "reseed_rank", "resolve_gpus",
           "worker_logging", "barrier"]

log = logging.getLogger("caffe_compat.distributed")

#: the environment variables torchrun (and :func:`launch`) give every worker
WORKER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")

#: seconds a rank waits for the others in a collective before the job fails (``--dist-timeout``)
DEFAULT_TIMEOUT_S = 300.0

#: all-reduce bucket size in bytes (fp32): big enough to amortise a collective's latency,
#: small enough not to double the gradients' memory
BUCKET_BYTES = 64 << 20


class DistributedError(SolverError):
    """A distributed run that failed: a rank died, hung, or could not join."""

    exit_code = 1


# ---------------------------------------------------------------------------- --gpus
def parse_gpus(spec: Optional[str], cuda_count: Optional[int] = None) -> Optional[List[str]]:
    """``--gpus`` -> the device of each local process, or None when not given.

    ``0,1,2`` (CUDA ids), ``all`` (every CUDA device; Caffe's ``-gpu all``), ``cpu:N`` (N CPU
    processes with gloo: the same code paths without a GPU; ``cpu`` alone is ``cpu:1``).
    """
    if spec is None:
        return None
    s = str(spec).strip().lower()
    if s == "cpu" or s.startswith("cpu:"):
        n_text = s[4:] or "1"
        try:
            n = int(n_text)
        except ValueError:
            raise SchemaError(f"--gpus {spec}: expected cpu:N with N a number of processes") from None
        if n < 1:
            raise SchemaError(f"--gpus {spec}: the number of CPU processes must be at least 1")
        return ["cpu"] * n
    count = torch.cuda.device_count() if cuda_count is None else int(cuda_count)
    if s == "all":
        if count < 1:
            raise SchemaError("--gpus all: no CUDA device is available here; use --gpus cpu:N to "
                              "train with N CPU processes")
        return [f"cuda:{i}" for i in range(count)]
    ids: List[int] = []
    for part in s.split(","):
        part = part.strip()
        try:
            ids.append(int(part))
        except ValueError:
            raise SchemaError(f"--gpus {spec}: expected comma-separated CUDA ids, 'all' or cpu:N") from None
    if len(set(ids)) != len(ids):
        raise SchemaError(f"--gpus {spec}: a device is given twice")
    bad = [i for i in ids if i < 0 or i >= count]
    if bad:
        raise SchemaError(f"--gpus {spec}: no CUDA device {bad[0]} here ({count} device"
                          f"{'s' if count != 1 else ''})")
    return [f"cuda:{i}" for i in ids]


# ---------------------------------------------------------------------------- context
@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a distributed run (world size 1: a single process)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    timeout_s: float = DEFAULT_TIMEOUT_S
    sync_batchnorm: bool = False
    #: torchrun's MASTER_ADDR/MASTER_PORT (its key-value store): the heartbeats' own client
    master_addr: str = ""
    master_port: int = 0
    #: the gradient syncs installed in this process (their heartbeat threads are stopped
    #: before the group goes: a store client alive at interpreter exit aborts the process)
    syncs: List["GradSync"] = field(default_factory=list, compare=False, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, draws the loss curve, writes snapshots and evaluates."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def backend(self) -> str:
        """NCCL for CUDA devices, gloo for the CPU (Caffe's NCCL path; gloo to test it here)."""
        return "nccl" if self.device.type == "cuda" else "gloo"

    @staticmethod
    def from_env(env: Mapping[str, str], gpus: Optional[Sequence[str]] = None, *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, sync_batchnorm: bool = False
                 ) -> Optional["DistContext"]:
        """The context torchrun's variables describe (None when ``WORLD_SIZE`` is not set).

        The device: ``gpus[LOCAL_RANK]`` when ``--gpus`` listed them, else
        ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
        """
        if "WORLD_SIZE" not in env:
            return None
        try:
            rank, world, local = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
        except (KeyError, ValueError):
            raise SchemaError("a distributed worker needs RANK, WORLD_SIZE and LOCAL_RANK as numbers "
                              "(torchrun sets them)") from None
        if not 0 <= rank < world:
            raise SchemaError(f"RANK {rank} is not in 0..WORLD_SIZE-1 ({world})")
        if gpus:
            dev = torch.device(gpus[local % len(gpus)])
        elif torch.cuda.is_available():
            dev = torch.device(f"cuda:{local % torch.cuda.device_count()}")
        else:
            dev = torch.device("cpu")
        try:
            port = int(env.get("MASTER_PORT", "0") or 0)
        except ValueError:
            port = 0
        return DistContext(rank, world, local, dev, float(timeout_s), bool(sync_batchnorm),
                           str(env.get("MASTER_ADDR", "")), port)

    def init(self) -> None:
        """Join the process group (``env://``: torchrun's MASTER_ADDR/MASTER_PORT)."""
        import torch.distributed as dist

        if not self.distributed or dist.is_initialized():
            return
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        try:
            dist.init_process_group(self.backend, rank=self.rank, world_size=self.world_size,
                                    timeout=datetime.timedelta(seconds=self.timeout_s))
        except Exception as e:  # noqa: BLE001 -- any failure to join is the run's one error
            raise DistributedError(f"rank {self.rank}: cannot join the process group "
                                   f"({self.backend}, world size {self.world_size}): "
                                   f"{' '.join(str(e).split())[:300]}") from None

    def close(self) -> None:
        import torch.distributed as dist

        while self.syncs:
            self.syncs.pop().close()
        if dist.is_initialized():
            dist.destroy_process_group()

    @contextlib.contextmanager
    def session(self) -> Iterator["DistContext"]:
        """``init`` ... ``close`` (the group is destroyed even when the run failed)."""
        self.init()
        try:
            yield self
        finally:
            self.close()


def slot_seed(seed: int, slot: int) -> int:
    """The seed of global minibatch ``slot``'s random draws: independent of the rank that
    reads it, so N processes draw what one process with ``iter_size*N`` draws."""
    return int(np.random.SeedSequence([int(seed) % (2 ** 32), int(slot)]).generate_state(1)[0])


def batch_slot(j: int, rank: int, world: int, iter_size: int) -> int:
    """The global index of the ``j``-th minibatch rank ``rank`` reads (see :func:`shard_slots`)."""
    s = int(iter_size)
    return (j // s) * world * s + rank * s + j % s


def shard_slots(rank: int, world: int, iter_size: int, iterations: int) -> List[int]:
    """The global minibatch indices rank ``rank`` reads in ``iterations`` iterations: blocks of
    ``iter_size`` consecutive minibatches, one block per rank and iteration."""
    return [batch_slot(j, rank, world, iter_size) for j in range(int(iterations) * int(iter_size))]


def shard_range(n: int, rank: int, world: int) -> range:
    """Rank ``rank``'s contiguous share of ``n`` items (a sharded test's images)."""
    lo = n * rank // world
    hi = n * (rank + 1) // world
    return range(lo, hi)


# ---------------------------------------------------------------------------- gradients
def _store(ctx: DistContext) -> Any:
    """A client of its own to torchrun's key-value store (heartbeats), or None without one.

    Never the process group's client: that one is the group's, and using it from the
    heartbeat thread while the group uses it can crash the process."""
    if not ctx.master_addr or not ctx.master_port:
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(ctx.master_addr, ctx.master_port, is_master=False,
                             timeout=datetime.timedelta(seconds=30))
    except Exception:  # noqa: BLE001 -- naming a hung rank is a courtesy, not a need
        return None


class GradSync:
    """The solver's ``grad_sync(solver, loss) -> loss``: Caffe's multi-GPU gradient sum.

    Called once per iteration after the ``iter_size`` passes and before ``ApplyUpdate``:
    every trainable parameter's gradient (zeros where a pass left none) is summed over the
    ranks and multiplied by ``float32(1/world_size)``, as Caffe's NCCL ``on_gradients_ready``
    did; ``ApplyUpdate`` then divides by ``iter_size`` as always.  The loss and the solver's
    stop request travel in a second small buffer: the returned loss is the world's mean,
    and a signal any rank received stops every rank after this iteration
    (``solver._synced_stop``; snapshots are rank 0's alone, so they need no agreement).

    Before each reduction the rank writes the iteration it reached to the group's store, and
    a daemon thread counts a heartbeat there every :attr:`BEAT_S` seconds.  When the
    reduction fails (a peer died, or did not arrive within the timeout) the error names the
    ranks that did not reach this iteration or whose heartbeat stopped (a stopped or hung
    process: a rank stuck inside the collective looks like it reached it).
    """

    BEAT_S = 0.5

    def __init__(self, ctx: DistContext, *, bucket_bytes: int = BUCKET_BYTES) -> None:
        self.ctx = ctx
        self.bucket_elems = max(1, int(bucket_bytes) // 4)
        self.store = _store(ctx) if ctx.distributed else None
        #: elements all-reduced per iteration (gradients + 3 control values: loss, stop, stop with snapshot)
        self.elements = 0
        #: the iteration whose all-reduce this rank reached (the heartbeat publishes it)
        self._at = -1
        import threading

        #: one store operation at a time (the heartbeat thread and the failure report)
        self._store_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat, name=f"caffe_compat-heartbeat-{ctx.rank}",
                                            daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        """Every BEAT_S: count a heartbeat and publish the iteration reached."""
        rank = self.ctx.rank
        store = self.store
        while not self._stop.is_set():
            try:
                with self._store_lock:
                    store.set(f"caffe_compat/at/{rank}", str(self._at))
                    store.add(f"caffe_compat/beat/{rank}", 1)
            except Exception:  # noqa: BLE001 -- the store went away with the job
                return
            self._stop.wait(self.BEAT_S)

    def close(self) -> None:
        """Stop the heartbeat and drop the store client (before the interpreter exits: a
        thread inside the store's C++ client at exit aborts the process)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        with self._store_lock:
            self.store = None

    def _mark(self, iteration: int) -> None:
        """Publish the iteration whose all-reduce this rank reached (one store round trip)."""
        self._at = int(iteration)
        if self.store is not None:
            with contextlib.suppress(Exception), self._store_lock:
                self.store.set(f"caffe_compat/at/{self.ctx.rank}", str(self._at))

    def _laggards(self, iteration: int) -> str:
        """'rank 1 (last at iteration 3)' for the ranks that did not reach ``iteration`` or
        whose heartbeat stopped (watched for 3 beats)."""
        import time

        if self.store is None:
            return ""
        n = self.ctx.world_size
        try:
            with self._store_lock:
                beats = [self.store.add(f"caffe_compat/beat/{r}", 0) for r in range(n)]
            time.sleep(3 * self.BEAT_S)
            with self._store_lock:
                silent = {r for r in range(n) if self.store.add(f"caffe_compat/beat/{r}", 0) == beats[r]}
                at = []
                for r in range(n):
                    key = f"caffe_compat/at/{r}"
                    at.append(int(self.store.get(key)) if self.store.check([key]) else -1)
        except Exception:  # noqa: BLE001 -- the store itself may be gone with its host
            return ""
        out = []
        for r in range(n):
            if r == self.ctx.rank or (at[r] >= iteration and r not in silent):
                continue
            where = f"last at iteration {at[r]}" if at[r] >= 0 else "never started"
            out.append(f"rank {r} ({where}{', no heartbeat' if r in silent else ''})")
        return ", ".join(out)

    def _all_reduce(self, buf: Tensor, iteration: int) -> None:
        import torch.distributed as dist

        try:
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        except Exception as e:  # noqa: BLE001 -- gloo/NCCL raise RuntimeError subclasses
            who = self._laggards(iteration)
            what = (f"did not reach it within {self.ctx.timeout_s:g} s or died: {who}" if who
                    else "a peer died or did not answer within the timeout")
            raise DistributedError(f"rank {self.ctx.rank}: the gradient all-reduce of iteration "
                                   f"{iteration} failed ({what}; {' '.join(str(e).split())[:200]})"
                                   ) from None

    def __call__(self, solver: Any, loss: float) -> float:
        ctx = self.ctx
        if not ctx.distributed:
            return loss
        params = [i.param for i in solver.net.learnable_params() if i.param.requires_grad]
        dev = solver.net.device
        control = torch.tensor([float(loss), float(bool(solver._stop_requested)),
                                float(bool(solver._stop_snapshot) if solver._stop_requested else 0.0)],
                               dtype=torch.float64)
        self._mark(solver.iter)
        scale = float(np.float32(1.0) / np.float32(ctx.world_size))
        self.elements = sum(p.numel() for p in params) + control.numel()
        # buckets of consecutive parameters (fp32 buffers, whatever the params' dtype)
        bucket: List[Tensor] = []
        size = 0
        for k, p in enumerate(params):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            bucket.append(p)
            size += p.numel()
            if size >= self.bucket_elems or k == len(params) - 1:
                self._reduce_bucket(bucket, scale, solver.iter)
                bucket, size = [], 0
        ctl = control.to(dev)
        self._all_reduce(ctl, solver.iter)
        ctl = ctl.cpu()
        solver._synced_stop = bool(ctl[1] > 0)
        if solver._synced_stop:
            solver._stop_requested = True
            solver._stop_snapshot = bool(ctl[2] > 0)
        return float(ctl[0]) / ctx.world_size

    def _reduce_bucket(self, params: List[Tensor], scale: float, iteration: int) -> None:
        flat = torch.cat([p.grad.detach().reshape(-1).to(torch.float32) for p in params])
        self._all_reduce(flat, iteration)
        flat.mul_(scale)
        off = 0
        with torch.no_grad():
            for p in params:
                n = p.numel()
                p.grad.copy_(flat[off:off + n].view_as(p.grad))
                off += n


def broadcast_params(net: Any, ctx: DistContext) -> None:
    """Every rank starts from rank 0's weights and buffers (Caffe's NCCL ``Broadcast``): a
    solver without ``random_seed`` initialises differently on each rank."""
    if not ctx.distributed:
        return
    import torch.distributed as dist

    with torch.no_grad():
        for t in list(net.parameters()) + list(net.buffers()):
            if t.is_floating_point() or t.dtype in (torch.int64, torch.int32):
                dist.broadcast(t.data, src=0)


def gather_objects(obj: Any, ctx: DistContext) -> Optional[List[Any]]:
    """Rank 0: every rank's ``obj`` in rank order; other ranks: None."""
    if not ctx.distributed:
        return [obj]
    import torch.distributed as dist

    out: Optional[List[Any]] = [None] * ctx.world_size if ctx.is_main else None
    try:
        dist.gather_object(obj, out, dst=0)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {ctx.rank}: gathering the results failed (a peer died or "
                               f"did not answer within {ctx.timeout_s:g} s: "
                               f"{' '.join(str(e).split())[:200]})") from None
    return out


def barrier(ctx: Optional[DistContext]) -> None:
    """Wait for every rank (e.g. until rank 0's final snapshot is on disk); a no-op alone."""
    if ctx is None or not ctx.distributed:
        return
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"rank {ctx.rank}: waiting for the other ranks failed (a peer died "
                               f"or did not answer within {ctx.timeout_s:g} s: "
                               f"{' '.join(str(e).split())[:200]})") from None


# ---------------------------------------------------------------------------- sync BatchNorm
class _AllReduceSum(torch.autograd.Function):
    """``all_reduce(SUM)`` with its gradient (the sum of every rank's output gradients)."""

    @staticmethod
    def forward(ctx: Any, t: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        out = t.detach().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        g = grad.detach().clone().contiguous()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


def _sync_bn_forward(self: Any, x: Tensor) -> Tuple[Tensor]:
    """Caffe's BatchNorm in train mode with the world's batch statistics (``--sync-batchnorm``):
    per-channel sums and sums of squares all-reduced (differentiably), the biased variance
    normalises, the running blobs get the world's mean and unbiased variance."""
    if self.use_global_stats:
        return type(self).forward(self, x)
    dims = [0] + list(range(2, x.dim()))
    bshape = (1, self.channels) + (1,) * (x.dim() - 2)
    m_local = x.numel() // self.channels
    stats = torch.cat([x.sum(dim=dims), (x * x).sum(dim=dims),
                       torch.full((1,), float(m_local), dtype=x.dtype, device=x.device)])
    stats = _AllReduceSum.apply(stats)
    c = self.channels
    m = stats[2 * c]
    mean = (stats[:c] / m).reshape(bshape)
    var = (stats[c:2 * c] / m).reshape(bshape) - mean * mean
    with torch.no_grad():
        maf = self.moving_average_fraction
        mm = int(m.item())
        corr = mm / (mm - 1) if mm > 1 else 1.0
        dt = self.running_mean.dtype
        self.scale_factor.mul_(maf).add_(1.0)
        self.running_mean.mul_(maf).add_(mean.detach().reshape(-1).to(dt))
        self.running_var.mul_(maf).add_(var.detach().reshape(-1).to(dt) * corr)
    return ((x - mean) / torch.sqrt(var + self.eps),)


def convert_sync_batchnorm(net: Any, ctx: DistContext) -> int:
    """Make the net's Caffe ``BatchNorm`` layers use the world's batch statistics in train
    mode; returns how many layers changed (none for a single process)."""
    if not ctx.distributed:
        return 0
    from caffe_compat.layers.common import BatchNorm

    n = 0
    for e in net.entries:
        if isinstance(e.module, BatchNorm):
            e.module.forward = types.MethodType(_sync_bn_forward, e.module)
            n += 1
    return n


# ---------------------------------------------------------------------------- launch
def _failure_text(e: Any) -> str:
    """'rank 1 (local rank 1) killed by SIGKILL; the launcher then stopped rank 0' from a
    ChildFailedError: the ranks that failed by themselves first (earliest first), then those
    the launcher stopped with SIGTERM because of them."""
    failures = getattr(e, "failures", None) or {}
    causes, stopped = [], []
    for rank, f in sorted(failures.items(), key=lambda kv: (kv[1].timestamp, kv[0])):
        code = int(f.exitcode)
        if code == -signal.SIGTERM:
            stopped.append(str(rank))
            continue
        why = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.Signals._value2member_map_
               else f"exited with code {code}")
        causes.append(f"rank {rank} (local rank {f.local_rank}) {why}")
    text = "; ".join(causes) or (" ".join(str(e).split())[:300] if not stopped else "")
    if stopped:
        text += ("; " if text else "") + f"the launcher then stopped rank{'s' if len(stopped) > 1 else ''} " \
            + ", ".join(stopped)
    return text


def _children(pid: int) -> List[int]:
    """The ids of ``pid``'s child processes (Linux /proc; none elsewhere)."""
    out = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(name))
        except (OSError, ValueError, IndexError):
            continue
    return out


def _forward_signal(signum: int, frame: Any) -> None:
    """Pass SIGINT/SIGTERM on to the workers: torchrun's agent starts them in sessions of
    their own, so a terminal's Ctrl-C never reaches them.  They agree on the stop in their
    next all-reduce, rank 0 snapshots, and they exit 130/143 (a second signal aborts them)."""
    for pid in _children(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(pid, signum)


def launch(argv: Sequence[str], nprocs: int, *, nnodes: int = 1, node_rank: int = 0,
           rdzv_endpoint: str = "localhost:0", timeout_s: float = DEFAULT_TIMEOUT_S,
           env: Optional[Mapping[str, str]] = None) -> None:
    """Run ``python -m caffe_compat.cli <argv>`` in ``nprocs`` worker processes on this machine
    (torchrun's elastic agent: c10d rendezvous, RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set for
    each), and wait.  A worker that fails stops the others; the error names the rank(s) that
    failed first.  SIGINT and SIGTERM are passed on to the workers (they snapshot and stop
    together; this process then exits 130/143 as they do)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.ERROR)
    config = LaunchConfig(min_nodes=nnodes, max_nodes=nnodes, nproc_per_node=int(nprocs),
                          run_id=f"caffe_compat-{uuid.uuid4().hex[:12]}", rdzv_backend="c10d",
                          rdzv_endpoint=rdzv_endpoint, rdzv_configs={"rank": node_rank} if nnodes > 1 else {},
                          max_restarts=0, monitor_interval=0.1, start_method="spawn",
                          signals_to_handle="SIGHUP,SIGQUIT", rdzv_timeout=int(timeout_s),
                          shutdown_timeout=3)
    saved = dict(os.environ)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if env:
            os.environ.update(env)
        for s in old:
            signal.signal(s, _forward_signal)
        elastic_launch(config, sys.executable)("-m", "caffe_compat.cli", *argv)
    except ChildFailedError as e:
        codes = {int(f.exitcode) for f in (getattr(e, "failures", None) or {}).values()}
        codes.discard(-signal.SIGTERM)   # ranks the launcher stopped after the first one exited
        if codes and codes <= {130, 143}:  # the workers stopped on a signal, after a snapshot
            raise SystemExit(max(codes)) from None
        raise DistributedError(f"distributed run failed: {_failure_text(e)}") from None
    except Exception as e:  # noqa: BLE001 -- rendezvous/agent failures: one clear line
        if type(e).__name__ == "SignalException":  # the launcher got SIGTERM/SIGHUP: workers stopped
            sig = getattr(e, "sigval", signal.SIGTERM)
            raise SystemExit(128 + int(sig)) from None
        raise DistributedError(f"distributed launch failed: {' '.join(str(e).split())[:300]}") from None
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        os.environ.clear()
        os.environ.update(saved)


def resolve_gpus(gpus: Optional[str], gpu: Optional[int], environ: Mapping[str, str], *,
                 timeout_s: float = DEFAULT_TIMEOUT_S, sync_batchnorm: bool = False
                 ) -> Tuple[Optional[List[str]], Optional[DistContext]]:
    """A command's ``--gpus``/``--gpu`` and torchrun's environment -> (local devices, context).

    * a torchrun worker (``WORLD_SIZE`` set): its context (device ``gpus[LOCAL_RANK]``);
    * ``--gpus`` with one device: a one-process context on it (the distributed code paths:
      the sharded stream and per-minibatch seeds, so it reproduces an N-process run with
      ``iter_size`` multiplied by N);
    * ``--gpus`` with several devices: (devices, None) -- the caller starts them (:func:`launch`);
    * neither: (None, None), a plain single-process run.
    """
    if gpus is not None and gpu is not None:
        raise SchemaError("give --gpu (one device) or --gpus (one process per device), not both")
    if timeout_s <= 0:
        raise SchemaError(f"--dist-timeout must be positive, got {timeout_s:g}")
    devices = parse_gpus(gpus)
    ctx = DistContext.from_env(environ, devices, timeout_s=timeout_s, sync_batchnorm=sync_batchnorm)
    if ctx is None and devices is not None and len(devices) == 1:
        ctx = DistContext(device=torch.device(devices[0]), timeout_s=float(timeout_s),
                          sync_batchnorm=bool(sync_batchnorm))
    return devices, ctx


def worker_logging(ctx: DistContext) -> None:
    """Ranks other than 0 keep quiet: warnings and errors only (rank 0 logs Caffe's lines)."""
    if not ctx.is_main:
        logging.getLogger("caffe_compat").setLevel(logging.WARNING)


def install(solver: Any, ctx: DistContext, *, broadcast: bool = True) -> Optional[GradSync]:
    """Make ``solver`` one rank of a distributed run: rank 0's weights everywhere, the
    gradient sum before every update, sync BatchNorm when asked, tests on rank 0 only
    (Caffe's root solver tests), snapshots on rank 0 only (:class:`caffe_compat.trainer.TrainSolver`
    reads ``solver.dist``)."""
    solver.dist = ctx
    if not ctx.distributed:
        return None
    if broadcast:
        broadcast_params(solver.net, ctx)
    if ctx.sync_batchnorm:
        n = convert_sync_batchnorm(solver.net, ctx)
        log.info("--sync-batchnorm: %d BatchNorm layer%s use the world's batch statistics",
                 n, "" if n == 1 else "s")
    if not ctx.is_main:
        solver.test_nets = []
    while ctx.syncs:  # an earlier stage's solver (alt-opt): its heartbeat ends here
        ctx.syncs.pop().close()
    sync = GradSync(ctx)
    ctx.syncs.append(sync)
    solver.grad_sync = sync
    return sync


def reseed_rank(solver: Any, ctx: DistContext) -> None:
    """This rank's own random streams (torch's and numpy's global generators, the train net's
    generator: dropout and Python layers): drawn from the solver's seed, the iteration and
    the rank, so ranks never share masks or samples.  (Data layers keep the generators
    they were built with: their shuffles are the one order all ranks share.)"""
    if not ctx.distributed:
        return
    seed = slot_seed(int(solver.seed) + int(solver.iter), 1_000_003 + ctx.rank)
    torch.manual_seed(seed)
    np.random.seed(seed % (2 ** 32))
    gen = getattr(solver.net, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)


def seed_data_layers(net: Any, ctx: DistContext, iter_size: int) -> int:
    """Give the net's own data layers (Data, ImageData, HDF5Data: ``shard(rank, world,
    iter_size)``) this rank's share of the minibatch stream; returns how many."""
    if not ctx.distributed:
        return 0
    n = 0
    for e in net.entries:
        fn = getattr(e.module, "shard", None)
        if callable(fn):
            fn(ctx.rank, ctx.world_size, int(iter_size))
            n += 1
    return n

