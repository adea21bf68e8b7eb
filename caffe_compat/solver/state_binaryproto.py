"""Caffe's own ``.solverstate``: a binaryproto ``SolverState`` (``SnapshotSolverStateToBinaryProto``).

Read so that a run interrupted under real Caffe continues here; not written (caffe-compat's
own ``.solverstate`` replaces it, see docs/differences.md).  Its history is in Caffe's layout
(one blob per net-owned blob, buffers included), which the solver maps onto its own.
"""
from __future__ import annotations

import numpy as np
import torch

from caffe_compat.errors import CaffeCompatError, SolverError
from caffe_compat.io import blob_to_array, parse_binary
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver.state import SolverState

__all__ = ["read_state"]


def read_state(path: str, data: bytes) -> SolverState:
    """The state in the file's bytes ``data`` (Caffe's ``RestoreSolverStateFromBinaryProto``)."""
    try:
        st = parse_binary(data, caffe_pb2.SolverState(), path)
    except CaffeCompatError as e:
        raise SolverError(f"not a solver state: {e.message}", where=path) from None
    history = [torch.from_numpy(np.array(blob_to_array(b, where=path))) for b in st.history]
    return SolverState(int(st.iter), int(st.current_step),
                       st.learned_net if st.HasField("learned_net") else None, history)
