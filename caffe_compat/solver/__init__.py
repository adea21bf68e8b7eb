"""Caffe's solvers: ``Solver`` on a train net and its test nets, one update rule per type.

- :mod:`~caffe_compat.solver.solver`: :class:`Solver` -- iterations, ``iter_size``, clipping,
  regularization, test nets, snapshots and restores (Caffe's ``Solver`` and ``SGDSolver``);
- :mod:`~caffe_compat.solver.update_rules`: SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam,
  registered by Caffe's type name (Caffe's ``SolverRegistry``; each is ``ComputeUpdateValue``);
- :mod:`~caffe_compat.solver.lr_policy`: the learning-rate policies;
- solver states, one module per format: :mod:`~caffe_compat.solver.state_safetensors`
  (caffe-compat's ``.solverstate``), :mod:`~caffe_compat.solver.state_binaryproto` (Caffe's),
  :mod:`~caffe_compat.solver.state_hdf5` (Caffe's ``.solverstate.h5``).

This package's namespace is the public API.
"""
from caffe_compat.solver.lr_policy import LR_POLICIES, learning_rate
from caffe_compat.solver.solver import IterationInfo, SnapshotInfo, Solver, TestResult, get_solver
from caffe_compat.solver.state import SolverState
from caffe_compat.solver.state_safetensors import STATE_FORMAT
from caffe_compat.solver.update_rules import (SOLVER_TYPES, UPDATE_RULES, UpdateRule,
                                              register_update_rule, update_rule_class)

__all__ = ["Solver", "get_solver", "IterationInfo", "TestResult", "SnapshotInfo", "SolverState",
           "STATE_FORMAT", "SOLVER_TYPES", "UPDATE_RULES", "UpdateRule", "register_update_rule",
           "update_rule_class", "LR_POLICIES", "learning_rate"]
