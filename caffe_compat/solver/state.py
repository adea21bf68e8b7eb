"""What every solver-state format holds: Caffe's ``SolverState`` message.

The formats -- caffe-compat's ``.solverstate`` (:mod:`.state_safetensors`), Caffe's
binaryproto one (:mod:`.state_binaryproto`) and Caffe's HDF5 one (:mod:`.state_hdf5`) --
each read into (and, where written, write from) this record; the solver maps the history
between its own layout and Caffe's.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

from torch import Tensor

__all__ = ["SolverState"]


class SolverState(NamedTuple):
    """Iteration, learning-rate step, the weights file it goes with, and the history blobs."""

    iter: int
    current_step: int
    learned_net: Optional[str]   # the weights file the state was written with (None: not recorded)
    history: List[Tensor]
