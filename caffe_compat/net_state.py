"""Which layers a net keeps for a given state: Caffe's ``FilterNet`` / ``StateMeetsRule``.

A layer with ``include`` rules is kept when at least one rule is met; a layer with
``exclude`` rules is dropped when at least one rule is met; giving both is an error.
"""
from __future__ import annotations

from typing import Iterable, Optional

from caffe_compat.errors import SchemaError
from caffe_compat.protos import caffe_pb2

PHASES = {"train": caffe_pb2.TRAIN, "test": caffe_pb2.TEST}


def phase_value(phase) -> int:
    """'train'/'test' (any case), caffe_pb2.TRAIN/TEST or 0/1 -> the Phase enum value."""
    if isinstance(phase, str):
        try:
            return PHASES[phase.lower()]
        except KeyError:
            raise SchemaError(f"unknown phase '{phase}'; allowed: train, test") from None
    if int(phase) in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        return int(phase)
    raise SchemaError(f"unknown phase {phase!r}; allowed: train, test")


def make_state(net: "caffe_pb2.NetParameter", phase=None, level: Optional[int] = None,
               stages: Iterable[str] = ()) -> "caffe_pb2.NetState":
    """The effective NetState: the net's own ``state`` overridden by what the caller gives."""
    state = caffe_pb2.NetState()
    state.CopyFrom(net.state)
    if phase is not None:
        state.phase = phase_value(phase)
    if level is not None:
        state.level = int(level)
    for s in stages:
        if s not in state.stage:
            state.stage.append(s)
    return state


def state_meets_rule(state: "caffe_pb2.NetState", rule: "caffe_pb2.NetStateRule") -> bool:
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    stages = set(state.stage)
    if any(s not in stages for s in rule.stage):
        return False
    if any(s in stages for s in rule.not_stage):
        return False
    return True


def layer_included(layer: "caffe_pb2.LayerParameter", state: "caffe_pb2.NetState") -> bool:
    if len(layer.include) and len(layer.exclude):
        raise SchemaError("specify either include rules or exclude rules, not both", layer=layer.name)
    if len(layer.include):
        return any(state_meets_rule(state, r) for r in layer.include)
    return not any(state_meets_rule(state, r) for r in layer.exclude)


def filter_net(net: "caffe_pb2.NetParameter", state: "caffe_pb2.NetState") -> "caffe_pb2.NetParameter":
    """A copy of ``net`` holding only the layers this state includes."""
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layer[:]
    for lp in net.layer:
        if layer_included(lp, state):
            out.layer.add().CopyFrom(lp)
    out.state.CopyFrom(state)
    return out
