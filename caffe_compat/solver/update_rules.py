"""Caffe's update rules, one class per solver type, registered by Caffe's type name.

Caffe's ``SolverRegistry`` maps ``type: "Adam"`` to ``AdamSolver``, whose only own part
(beside its history) is ``ComputeUpdateValue``; everything else -- iterations, ``iter_size``,
the learning-rate policy, clipping, regularization, test nets, snapshots -- is the shared
``Solver``/``SGDSolver`` code (:class:`caffe_compat.solver.Solver`).  Here each rule is that
one method: given one learnable blob's history, its gradient (already clipped, normalized
and regularized) and its rate (``lr * lr_mult``), it updates the history in place and
returns the step, ``w -= step``.  The :class:`~caffe_compat.solver.Solver` builds the rule of
its ``type`` (:func:`update_rule_class`), so every solver, trainer or pycaffe view built on
it gets every rule.

The rules are written tensor by tensor with Caffe's float32 constants rather than taken from
``torch.optim``, whose SGD keeps ``lr`` outside the momentum buffer and so differs whenever
the rate changes.
"""
from __future__ import annotations

import difflib
import math
from typing import Callable, ClassVar, Dict, Sequence, Type, TypeVar

import numpy as np
from torch import Tensor

from caffe_compat.errors import SolverDefinitionError

__all__ = ["UpdateRule", "register_update_rule", "update_rule_class", "UPDATE_RULES",
           "SOLVER_TYPES", "SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam"]

_f32 = np.float32

#: Caffe's solver type name -> its update rule (Caffe's SolverRegistry)
UPDATE_RULES: Dict[str, Type["UpdateRule"]] = {}

R = TypeVar("R", bound=Type["UpdateRule"])


def register_update_rule(type_name: str) -> Callable[[R], R]:
    """Class decorator: the rule for solver ``type: "<type_name>"`` (Caffe's
    ``REGISTER_SOLVER_CLASS``)."""
    def deco(cls: R) -> R:
        cls.type = type_name
        UPDATE_RULES[type_name] = cls
        return cls
    return deco


def update_rule_class(type_name: str) -> Type["UpdateRule"]:
    """The rule registered for ``type_name``, or a SolverError naming the known types."""
    cls = UPDATE_RULES.get(type_name)
    if cls is not None:
        return cls
    known = tuple(UPDATE_RULES)
    near = difflib.get_close_matches(type_name, known, n=1, cutoff=0.5)
    near += [t for t in known if t.lower() == type_name.lower() and t not in near]
    hint = f" Did you mean '{near[0]}'?" if near else ""
    shown = type_name if len(type_name) <= 60 else type_name[:60] + f"... ({len(type_name)} characters)"
    raise SolverDefinitionError(f"unknown solver type '{shown}' (types are case-sensitive; known: "
                      f"{', '.join(known)}).{hint}")


class UpdateRule:
    """Caffe's ``ComputeUpdateValue`` for one solver type.

    ``param`` is the ``SolverParameter``; its fields are read at each update, as Caffe does.
    The constructor checks what Caffe's solver constructor CHECKs.
    """

    type: ClassVar[str] = ""
    #: history blobs per learnable blob (AdaDelta and Adam keep a second set)
    history_sets: ClassVar[int] = 1

    def __init__(self, param) -> None:
        self.param = param

    def compute_update_value(self, history: Sequence[Tensor], grad: Tensor, local_rate: float,
                             iteration: int) -> Tensor:
        """The step for one blob (``w -= step``); updates ``history`` (this blob's
        ``history_sets`` tensors) in place.  ``iteration`` is Caffe's ``iter_`` before the
        increment."""
        raise NotImplementedError


@register_update_rule("SGD")
class SGD(UpdateRule):
    """``h = momentum * h + rate * g``; step ``h``."""

    def compute_update_value(self, history, grad, local_rate, iteration):
        h, = history
        h.mul_(float(_f32(self.param.momentum))).add_(grad, alpha=local_rate)
        return h


@register_update_rule("Nesterov")
class Nesterov(UpdateRule):
    """SGD's ``h``; step ``(1 + momentum) * h - momentum * h_previous``."""

    def compute_update_value(self, history, grad, local_rate, iteration):
        h, = history
        mom = float(_f32(self.param.momentum))
        prev = h.clone()
        h.mul_(mom).add_(grad, alpha=local_rate)
        return h * float(_f32(1) + _f32(mom)) - prev * mom


def _no_momentum(rule: UpdateRule) -> None:
    p = rule.param
    if p.momentum != 0:
        raise SolverDefinitionError(f"momentum cannot be used with {rule.type} (got momentum {p.momentum:g})")


def _positive_delta(rule: UpdateRule) -> None:
    """``delta`` keeps the rule's division finite: with 0 a zero gradient gives 0/0 = NaN."""
    d = rule.param.delta
    if not d > 0:
        raise SolverDefinitionError(f"delta must be positive for {rule.type} (got delta {d:g}): its update "
                                    "divides by a running average plus delta, which is 0 for a zero "
                                    "gradient when delta is 0")


def _in_range(rule: UpdateRule, field: str, lo: float, hi: float, hi_open: bool, why: str) -> None:
    v = getattr(rule.param, field)
    if not (lo <= v and (v < hi if hi_open else v <= hi)):
        raise SolverDefinitionError(f"{field} should lie in [{lo:g}, {hi:g}{')' if hi_open else ']'} for "
                                    f"{rule.type}, got {field} {v:g}: {why}")


@register_update_rule("AdaGrad")
class AdaGrad(UpdateRule):
    """``h += g^2``; step ``rate * g / (sqrt(h) + delta)``."""

    def __init__(self, param) -> None:
        super().__init__(param)
        _no_momentum(self)
        _positive_delta(self)

    def compute_update_value(self, history, grad, local_rate, iteration):
        h, = history
        h.add_(grad * grad)
        return (grad / (h.sqrt() + float(_f32(self.param.delta)))) * local_rate


@register_update_rule("RMSProp")
class RMSProp(UpdateRule):
    """``h = rms_decay * h + (1 - rms_decay) * g^2``; step ``rate * g / (sqrt(h) + delta)``."""

    def __init__(self, param) -> None:
        super().__init__(param)
        _no_momentum(self)
        if not 0 <= param.rms_decay < 1:
            raise SolverDefinitionError(f"rms_decay should lie in [0, 1), got {param.rms_decay:g}")
        _positive_delta(self)

    def compute_update_value(self, history, grad, local_rate, iteration):
        h, = history
        decay = float(_f32(self.param.rms_decay))
        h.mul_(decay).add_(grad * grad, alpha=float(_f32(1) - _f32(decay)))
        return (grad / (h.sqrt() + float(_f32(self.param.delta)))) * local_rate


@register_update_rule("AdaDelta")
class AdaDelta(UpdateRule):
    """Running averages of ``g^2`` and of the squared updates (momentum is their decay)."""

    history_sets = 2

    def __init__(self, param) -> None:
        super().__init__(param)
        _positive_delta(self)
        _in_range(self, "momentum", 0, 1, False, "it weighs the running averages (momentum and "
                  "1 - momentum), which must stay non-negative for their square roots")

    def compute_update_value(self, history, grad, local_rate, iteration):
        hg, hu = history
        mom = float(_f32(self.param.momentum))
        one_m = float(_f32(1) - _f32(mom))
        delta = float(_f32(self.param.delta))
        hg.mul_(mom).add_(grad * grad, alpha=one_m)
        upd = grad * ((hu + delta) / (hg + delta)).sqrt()
        hu.mul_(mom).add_(upd * upd, alpha=one_m)
        return upd * local_rate


@register_update_rule("Adam")
class Adam(UpdateRule):
    """First and second moment estimates (``momentum``, ``momentum2``) with Caffe's bias
    correction folded into the rate."""

    history_sets = 2

    def __init__(self, param) -> None:
        super().__init__(param)
        _positive_delta(self)
        _in_range(self, "momentum", 0, 1, True, "the bias correction divides by 1 - momentum^t")
        _in_range(self, "momentum2", 0, 1, True, "the bias correction takes sqrt(1 - momentum2^t)")

    def compute_update_value(self, history, grad, local_rate, iteration):
        m, v = history
        p = self.param
        b1, b2 = float(_f32(p.momentum)), float(_f32(p.momentum2))
        step = iteration + 1
        # C++: pow(float, int) is double, so the correction is computed in double
        correction = float(_f32(math.sqrt(1.0 - math.pow(b2, step)) / (1.0 - math.pow(b1, step))))
        m.mul_(b1).add_(grad, alpha=float(_f32(1) - _f32(b1)))
        v.mul_(b2).add_(grad * grad, alpha=float(_f32(1) - _f32(b2)))
        return (m / (v.sqrt() + float(_f32(p.delta)))) * float(_f32(local_rate) * _f32(correction))


#: the types Caffe itself registers, in its order (registered above)
SOLVER_TYPES = tuple(UPDATE_RULES)
