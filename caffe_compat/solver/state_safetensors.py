"""caffe-compat's ``.solverstate``: a safetensors file, so that a resume is bit-identical.

It holds the history tensors (this solver's layout, ``history.<i>``) and one JSON metadata
entry: the iteration, the step counter, the weights file name, the solver type, the
learnable blobs' keys and shapes, and every random generator's state (torch's CPU and CUDA
generators and each net's own), which Caffe's formats have no place for.  A trainer may add
entries of its own (``extra_tensors`` / ``extra_meta``, e.g. the Faster R-CNN loader's
position); the solver's names are reserved.
"""
from __future__ import annotations

import base64
import json
import struct
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.atomic import atomic_write
from caffe_compat.errors import LimitError, SolverError, SolverStateError, shorten
from caffe_compat.solver.state import SolverState

STATE_FORMAT = "caffe-compat-solverstate"
STATE_VERSION = 1

#: (name, net) pairs: "train", "test0", "test1", ...
NamedNets = Sequence[Tuple[str, Any]]

__all__ = ["STATE_FORMAT", "STATE_VERSION", "is_safetensors", "write_state", "read_state",
           "rng_states", "set_rng_states"]


def _b64(t: Tensor) -> str:
    return base64.b64encode(t.detach().cpu().numpy().tobytes()).decode("ascii")


def _unb64(s: str) -> Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


def _net_generator(net) -> Optional[torch.Generator]:
    gen = getattr(net, "generator", None)
    if isinstance(gen, torch.Generator):
        return gen
    ctx = getattr(net, "_ctx", None)
    return getattr(ctx, "generator", None)


def rng_states(nets: NamedNets) -> Dict[str, Any]:
    """Every random generator's state, as JSON-ready text."""
    rng: Dict[str, Any] = {"torch_cpu": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["torch_cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    by_net = {}
    for name, net in nets:
        gen = _net_generator(net)
        if gen is not None:
            by_net[name] = _b64(gen.get_state())
    rng["nets"] = by_net
    return rng


def set_rng_states(rng: Mapping[str, Any], nets: NamedNets) -> None:
    """Put back what :func:`rng_states` saved (CUDA states only on as many devices)."""
    if "torch_cpu" in rng:
        torch.set_rng_state(_unb64(rng["torch_cpu"]))
    cuda = rng.get("torch_cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([_unb64(s) for s in cuda])
    by_net = rng.get("nets", {})
    for name, net in nets:
        gen = _net_generator(net)
        if gen is not None and name in by_net:
            gen.set_state(_unb64(by_net[name]))


def is_safetensors(data: bytes) -> bool:
    """Whether ``data`` starts like a safetensors file (a sane header length, then JSON)."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def write_state(path: str, state: SolverState, *, solver_type: str,
                params: List[Tuple[str, List[int]]], rng: Mapping[str, Any],
                extra_tensors: Optional[Dict[str, Tensor]] = None,
                extra_meta: Optional[Dict[str, str]] = None) -> None:
    """Write the state atomically; ``params`` are the learnable blobs' (key, shape)."""
    from safetensors.torch import save as st_save

    meta = {
        "version": STATE_VERSION,
        "type": solver_type,
        "iter": state.iter,
        "current_step": state.current_step,
        "learned_net": state.learned_net,
        "params": [[k, list(shape)] for k, shape in params],
        "history_size": len(state.history),
        "rng": dict(rng),
    }
    tensors = {f"history.{i}": h.detach().cpu().contiguous() for i, h in enumerate(state.history)}
    metadata = {"format": STATE_FORMAT, "state": json.dumps(meta)}
    extra_tensors, extra_meta = extra_tensors or {}, extra_meta or {}
    clash = (set(extra_tensors) & set(tensors)) | (set(extra_meta) & set(metadata))
    if clash:
        raise SolverError(f"solver state entries {sorted(clash)} are reserved")
    tensors.update(extra_tensors)
    metadata.update(extra_meta)
    data = st_save(tensors, metadata=metadata)
    try:
        atomic_write(path, data)
    except OSError as e:
        raise SolverError(f"cannot write solver state {path}: {e}") from None


def read_state(path: str, data: bytes, *, solver_type: str) -> Tuple[SolverState, Dict[str, Any]]:
    """``(state, generator states)`` of the file's bytes ``data``; refuses another format's
    file, a newer version or another solver type's state."""
    from safetensors.torch import load as st_load

    from caffe_compat.weights.preflight import check_safetensors_header

    (n,) = struct.unpack("<Q", data[:8])
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
        meta = header.get("__metadata__", {}) or {}
        if meta.get("format") != STATE_FORMAT:
            raise SolverStateError(f"not a solver state (format {shorten(repr(meta.get('format')), 80)})",
                              where=path)
        state = json.loads(meta["state"])
        if not isinstance(state, dict):
            raise SolverStateError("corrupt solver state: its 'state' metadata is not a JSON object", where=path)
        # shapes, offsets and totals from the header, before safetensors reads any tensor
        check_safetensors_header(header, path, len(data) - 8 - n, error=SolverError, per_param=2)
        tensors = st_load(data)
    except (SolverError, LimitError):
        raise
    except Exception as e:  # corrupt JSON or tensors
        raise SolverStateError(f"corrupt solver state: {shorten(e, 300)}", where=path) from None
    if not isinstance(state.get("version", 0), int) or state.get("version", 0) > STATE_VERSION:
        raise SolverStateError(f"solver state version {shorten(state.get('version'), 40)} is newer than this "
                          f"caffe-compat understands ({STATE_VERSION})", where=path)
    if state.get("type") != solver_type:
        raise SolverStateError(f"the state was written by a {shorten(state.get('type'), 40)} solver, this one is "
                          f"{solver_type}", where=path)
    size = state.get("history_size")
    missing = None if isinstance(size, int) and 0 <= size <= len(tensors) else "?"
    if missing is None:
        missing = next((i for i in range(size) if f"history.{i}" not in tensors), None)
    if missing is not None:
        raise SolverStateError(f"corrupt solver state: history_size {shorten(size, 40)} but no tensor "
                          f"'history.{missing}'", where=path)
    hist = [tensors[f"history.{i}"] for i in range(size)]
    counters = {k: state.get(k, 0 if k == "current_step" else None) for k in ("iter", "current_step")}
    for k, v in counters.items():
        if not isinstance(v, int) or isinstance(v, bool):
            raise SolverStateError(f"corrupt solver state: '{k}' is {shorten(repr(v), 40)}, not an integer",
                              where=path)
    learned = state.get("learned_net")
    if learned is not None and not isinstance(learned, str):
        raise SolverStateError("corrupt solver state: 'learned_net' is not a string", where=path)
    rng = state.get("rng", {})
    return (SolverState(counters["iter"], counters["current_step"], learned, hist),
            rng if isinstance(rng, dict) else {})
