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

from caffe_compat.errors import SolverDefinitionError

LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")

_f32 = np.float32


def _pow(x: float, n: float) -> float:
    """C's ``pow`` in double: overflow gives inf (``math.pow`` would raise), a domain error NaN."""
    try:
        return math.pow(x, n)
    except OverflowError:
        return math.inf
    except ValueError:
        return math.nan


def _short(s: str, n: int = 60) -> str:
    """A definition's string for a message, never unbounded."""
    return s if len(s) <= n else s[:n] + f"... ({len(s)} characters)"


def check_lr_policy(param) -> None:
    """Refuse, before any net is built, what Caffe's ``GetLearningRate`` would only find at
    an update: an unknown policy, its CHECKs (BVLC master's: ``stepsize > 0`` for step and
    sigmoid, ``gamma >= 0`` for step, exp, inv and multistep; sigmoid's ``gamma`` may be
    negative, a rising warm-up, as Caffe 1.0 computes it and the golden test records),
    ``poly``'s division by ``max_iter``, ``multistep`` step values that decrease (Caffe moves
    to the next value only once the previous one is passed, so an unsorted list silently
    means another schedule; equal values step on consecutive iterations, as in Caffe), and
    any setting whose rate is not a finite float at some iteration ``0..max_iter`` (Caffe
    would compute inf or NaN there and train on it).

    With these CHECKs every policy's rate is monotonic in the iteration, so the rates at
    iteration 0 and at ``max_iter`` (for multistep: before the first step and after the
    last one reached) bound all the others.
    """
    policy = param.lr_policy
    if policy not in LR_POLICIES:
        if not policy:
            raise SolverDefinitionError("lr_policy is not set; allowed: " + ", ".join(LR_POLICIES))
        raise SolverDefinitionError(f"unknown lr_policy '{_short(policy)}'; allowed: " + ", ".join(LR_POLICIES))
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise SolverDefinitionError(f"lr_policy '{policy}' needs a positive stepsize (got {param.stepsize})")
    if policy == "poly" and param.max_iter <= 0:
        raise SolverDefinitionError(f"lr_policy 'poly' needs a positive max_iter (got {param.max_iter}): "
                                    "its rate divides by max_iter")
    if policy in ("step", "exp", "inv", "multistep") and not param.gamma >= 0:
        raise SolverDefinitionError(f"lr_policy '{policy}' needs gamma >= 0, as Caffe CHECKs (got gamma "
                                    f"{param.gamma:g})")
    if policy == "multistep":
        values = list(param.stepvalue)
        for i in range(1, len(values)):
            if values[i] < values[i - 1]:
                raise SolverDefinitionError(
                    f"lr_policy 'multistep' needs stepvalue entries in increasing order, got stepvalue "
                    f"{values[i - 1]} then {values[i]} (entries {i - 1} and {i}): Caffe steps to entry "
                    f"k+1 only after passing entry k, so a smaller value later means another schedule")
    max_iter = max(int(param.max_iter), 0)
    if policy == "multistep":
        # Caffe advances at most one entry per iteration: entry k is passed at iteration
        # max(stepvalue[k], k); count those reached by max_iter
        reached = 0
        for k, v in enumerate(param.stepvalue):
            if max(int(v), k) <= max_iter:
                reached = k + 1
        checks = [(0, 0, "iteration 0"), (max_iter, reached, f"iteration {max_iter} (max_iter), after "
                                                            f"{reached} step(s)")]
    else:
        checks = [(0, 0, "iteration 0"), (max_iter, 0, f"iteration {max_iter} (max_iter)")]
    for it, step, when in checks:
        if policy == "multistep":
            with np.errstate(all="ignore"):
                rate = float(_f32(float(_f32(param.base_lr)) * _pow(float(_f32(param.gamma)), step)))
        else:
            rate = learning_rate(param, it, step)[0]
        if not math.isfinite(rate):
            raise SolverDefinitionError(
                f"lr_policy '{policy}' gives a learning rate of {rate} at {when}: "
                f"{_FORMULAS[policy]} with {_values(param, policy)} is not a finite float "
                "(Caffe would train on it); change those values or max_iter")


#: each policy's rate, as the messages show it
_FORMULAS = {
    "fixed": "base_lr",
    "step": "base_lr * gamma^floor(iter / stepsize)",
    "exp": "base_lr * gamma^iter",
    "inv": "base_lr * (1 + gamma * iter)^-power",
    "multistep": "base_lr * gamma^steps",
    "poly": "base_lr * (1 - iter / max_iter)^power",
    "sigmoid": "base_lr / (1 + exp(-gamma * (iter - stepsize)))",
}
_FIELDS = {"fixed": ("base_lr",), "step": ("base_lr", "gamma", "stepsize"), "exp": ("base_lr", "gamma"),
           "inv": ("base_lr", "gamma", "power"), "multistep": ("base_lr", "gamma"),
           "poly": ("base_lr", "power", "max_iter"), "sigmoid": ("base_lr", "gamma", "stepsize")}


def _values(param, policy: str) -> str:
    return ", ".join(f"{f} {getattr(param, f):g}" for f in _FIELDS[policy])


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
            rate = float(base) * _pow(float(gamma), current_step)
        elif policy == "exp":
            rate = float(base) * _pow(float(gamma), it)
        elif policy == "inv":
            rate = base * np.power(_f32(1) + gamma * _f32(it), -power)
        elif policy == "multistep":
            if current_step < len(param.stepvalue) and it >= param.stepvalue[current_step]:
                current_step += 1
            rate = float(base) * _pow(float(gamma), current_step)
        elif policy == "poly":
            rate = base * np.power(_f32(1) - _f32(it) / _f32(param.max_iter), power)
        elif policy == "sigmoid":
            rate = base * (_f32(1) / (_f32(1) + np.exp(-gamma * (_f32(it) - _f32(param.stepsize)))))
        else:
            check_lr_policy(param)
            raise AssertionError("unreachable")
    return float(_f32(rate)), current_step
