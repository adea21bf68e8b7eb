"""Caffe's learning-rate policies (``SGDSolver::GetLearningRate``), as one pure function.

The arithmetic follows Caffe's C++ types: where Caffe computes in ``float`` (``Dtype``) this
does too (numpy float32), where C++ promotes ``pow(float, int)`` to double this uses double,
so rates agree with Caffe's to the last bit or two.  ``multistep`` is stateful in Caffe
(``current_step_`` advances at most once per call), so the step counter goes in and out.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np

from caffe_compat.errors import SolverError

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_f32 = np.float32


def check_lr_policy(param) -> None:
    """Refuse what Caffe would only find at the first update (or divide by zero on)."""
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        if not policy:
            raise SolverError("lr_policy is not set; allowed: " + ", ".join(LR_POLICIES))
        raise SolverError(f"unknown lr_policy '{policy}'; allowed: " + ", ".join(LR_POLICIES))
    if policy == "step" and param.stepsize <= 0:
        raise SolverError(f"lr_policy 'step' needs a positive stepsize (got {param.stepsize})")
    if policy == "poly" and param.max_iter <= 0:
        raise SolverError(f"lr_policy 'poly' needs a positive max_iter (got {param.max_iter})")


def learning_rate(param, iteration: int, current_step: int = 0) -> Tuple[float, int]:
    """``(rate, current_step)`` at ``iteration`` for a SolverParameter, exactly as Caffe.

    ``current_step`` is the solver's step counter (only ``step`` and ``multistep`` change it;
    Caffe keeps it in the .solverstate).
    """
    policy = param.lr_policy
    base = _f32(param.base_lr)
    gamma = _f32(param.gamma)
    power = _f32(param.power)
    it = int(iteration)
    with np.errstate(all="ignore"):
        if policy == "fixed":
            rate = base
        elif policy == "step":
            current_step = it // int(param.stepsize)
            # pow(float, int) is computed in double in C++11
            rate = float(base) * math.pow(float(gamma), current_step)
        elif policy == "exp":
            rate = float(base) * math.pow(float(gamma), it)
        elif policy == "inv":
            rate = base * np.power(_f32(1) + gamma * _f32(it), -power)
        elif policy == "multistep":
            if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
                current_step += 1
            rate = float(base) * math.pow(float(gamma), current_step)
        elif policy == "poly":
            rate = base * np.power(_f32(1) - _f32(it) / _f32(param.max_iter), power)
        elif policy == "sigmoid":
            rate = base * (_f32(1) / (_f32(1) + np.exp(-gamma * (_f32(it) - _f32(param.stepsize)))))
        else:
            check_lr_policy(param)
            raise AssertionError("unreachable")
    return float(_f32(rate)), current_step
