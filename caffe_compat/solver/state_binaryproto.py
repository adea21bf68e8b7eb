"""Caffe's own ``.solverstate``: a binaryproto ``SolverState`` (``SnapshotSolverStateToBinaryProto``).

Read so that a run interrupted under real Caffe continues here; not written (caffe-compat's
own ``.solverstate`` replaces it, see docs/differences.md).  Its history is in Caffe's layout
(one blob per net-owned blob, buffers included), which the solver maps onto its own.

The history blobs are counted on the wire before protobuf builds them, and every blob's
declared shape is charged to the limits before any is converted, so a small file declaring
millions of blobs (or huge ones) is refused before it costs memory.
"""
from __future__ import annotations

import numpy as np
import torch

from caffe_compat import limits, wire
from caffe_compat.errors import CaffeCompatError, LimitError, SolverStateError
from caffe_compat.io import blob_shape, blob_to_array, parse_binary
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver.state import SolverState

__all__ = ["read_state"]

_HISTORY = caffe_pb2.SolverState.DESCRIPTOR.fields_by_name["history"].number


def _count_history(path: str, data: bytes) -> None:
    """Refuse more history blobs than ``max_blobs``, counted on the wire (a damaged file is
    left to protobuf, which says what is wrong)."""
    limit = limits.get("max_blobs")
    n = 0
    try:
        for num, _wt, _a, _b in wire.fields(data, 0, len(data)):
            if num == _HISTORY:
                n += 1
                if n > limit:
                    raise LimitError(f"the solver state has more than {limit} history blobs "
                                     f"({limits.how_to_raise('max_blobs')})", where=path)
    except (ValueError, IndexError, OverflowError):
        return


def read_state(path: str, data: bytes) -> SolverState:
    """The state in the file's bytes ``data`` (Caffe's ``RestoreSolverStateFromBinaryProto``)."""
    _count_history(path, data)
    try:
        st = parse_binary(data, caffe_pb2.SolverState(), path)
    except CaffeCompatError as e:
        raise SolverStateError(f"not a solver state: {e.message}", where=path) from None
    # every declared shape is charged before any history is converted (Caffe's Adam keeps two
    # history blobs per parameter: twice the net's total)
    budget = limits.FileBudget(path, per_param=2)
    for i, b in enumerate(st.history):
        budget.blob(blob_shape(b), what="history blob", blob=i, error=SolverStateError)
    history = [torch.from_numpy(np.array(blob_to_array(b, where=path, index=i)))
               for i, b in enumerate(st.history)]
    return SolverState(int(st.iter), int(st.current_step),
                       st.learned_net if st.HasField("learned_net") else None, history)
