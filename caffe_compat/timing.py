"""Caffe's ``caffe time``: per-layer and whole-net forward/backward timings.

Timings use wall-clock time with CUDA synchronization around each measured region, so
layer times on a GPU are real (and the per-layer pass is slower than the whole-net pass,
as in Caffe, because every layer boundary synchronizes).
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class TimingReport:
    iterations: int
    forward_ms: float
    backward_ms: Optional[float]
    layer_forward_ms: "OrderedDict[str, float]" = field(default_factory=OrderedDict)
    layer_backward_ms: "OrderedDict[str, float]" = field(default_factory=OrderedDict)

    def lines(self) -> List[str]:
        out = []
        for name, ms in self.layer_forward_ms.items():
            out.append(f"{name:>24s}\tforward: {ms:.4f} ms.")
            if name in self.layer_backward_ms:
                out.append(f"{name:>24s}\tbackward: {self.layer_backward_ms[name]:.4f} ms.")
        out.append(f"Average Forward pass: {self.forward_ms:.4f} ms.")
        if self.backward_ms is not None:
            out.append(f"Average Backward pass: {self.backward_ms:.4f} ms.")
            out.append(f"Average Forward-Backward: {self.forward_ms + self.backward_ms:.4f} ms.")
        return out


def random_inputs(net, seed: int = 0) -> Dict[str, torch.Tensor]:
    """Random inputs of the net's declared input shapes (labels as small integers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in net.input_names:
        shape = net.blob_shapes.get(name)
        if shape is None:
            continue
        if "label" in name:
            out[name] = torch.randint(0, 2, shape, generator=g).to(net.dtype)
        else:
            out[name] = torch.randn(shape, generator=g, dtype=net.dtype)
    return {k: v.to(net.device) for k, v in out.items()}


def time_net(net, iterations: int = 50, *, backward: Optional[bool] = None, warmup: int = 2,
             per_layer: bool = True, inputs: Optional[Dict[str, torch.Tensor]] = None) -> TimingReport:
    """Average forward (and backward, for nets with a loss) over ``iterations`` runs."""
    device = net.device
    feeds = inputs if inputs is not None else random_inputs(net)
    if backward is None:  # as Caffe: nets with a loss that reaches a parameter time backward too
        with torch.enable_grad():
            net.forward(**feeds)
        backward = net.loss is not None and net.loss.requires_grad
        net.loss = None
    ctx = torch.enable_grad if backward else torch.no_grad
    for _ in range(warmup):
        with ctx():
            net.forward(**feeds)
            if backward:
                net.zero_grad(set_to_none=True)
                net.backward()
    fw, bw = [], []
    for _ in range(iterations):
        net.zero_grad(set_to_none=True)
        _sync(device)
        t0 = time.perf_counter()
        with ctx():
            net.forward(**feeds)
        _sync(device)
        t1 = time.perf_counter()
        fw.append(t1 - t0)
        if backward:
            net.backward()
            _sync(device)
            bw.append(time.perf_counter() - t1)
    report = TimingReport(iterations, float(np.mean(fw)) * 1e3, float(np.mean(bw)) * 1e3 if bw else None)
    if per_layer:
        report.layer_forward_ms = _per_layer_forward(net, feeds, max(1, min(iterations, 10)), device)
        if backward:
            report.layer_backward_ms = _per_layer_backward(net, feeds, max(1, min(iterations, 10)), device)
    return report


def _per_layer_backward(net, feeds, iterations: int, device) -> "OrderedDict[str, float]":
    """Each layer's backward alone, as Caffe times ``Layer::Backward``: one forward whose
    layers see detached copies of their bottoms (so every layer has its own graph), then
    per layer the gradient of its tops (all-ones top diffs) to its bottoms and parameters."""
    records: Dict[str, tuple] = OrderedDict()
    hooks = []

    def pre(mod, args):
        # a bottom gets a diff only where the net's pass would compute one (propagate_down)
        return tuple(a.detach().requires_grad_(a.requires_grad) if torch.is_tensor(a) else a
                     for a in args)

    def post(name):
        def fn(mod, args, out):
            outs = (out,) if torch.is_tensor(out) else tuple(out)
            records[name] = ([a for a in args if torch.is_tensor(a) and a.requires_grad],
                             [p for p in mod.parameters() if p.requires_grad],
                             [o for o in outs if torch.is_tensor(o) and o.requires_grad])
        return fn

    for e in net.entries:
        if e.module is not None and not e.module.accepts_feed:
            hooks.append(e.module.register_forward_pre_hook(pre))
            hooks.append(e.module.register_forward_hook(post(e.name)))
    try:
        with torch.enable_grad():
            net.forward(**feeds)
    finally:
        for h in hooks:
            h.remove()
    times: Dict[str, List[float]] = OrderedDict()
    with net.precision():
        for _ in range(iterations):
            for name in reversed(list(records)):
                bottoms, params, outs = records[name]
                if not outs or not (bottoms or params):
                    continue
                _sync(device)
                t0 = time.perf_counter()
                torch.autograd.grad(outs, bottoms + params, [torch.ones_like(o) for o in outs],
                                    retain_graph=True, allow_unused=True)
                _sync(device)
                times.setdefault(name, []).append(time.perf_counter() - t0)
    net.loss = None
    return OrderedDict((k, float(np.mean(times[k])) * 1e3) for k in records if k in times)


def _per_layer_forward(net, feeds, iterations: int, device) -> "OrderedDict[str, float]":
    times: Dict[str, List[float]] = OrderedDict((e.name, []) for e in net.entries)
    hooks = []
    starts: Dict[str, float] = {}

    def pre(name):
        def fn(mod, args):
            _sync(device)
            starts[name] = time.perf_counter()
        return fn

    def post(name):
        def fn(mod, args, out):
            _sync(device)
            times[name].append(time.perf_counter() - starts[name])
        return fn

    for e in net.entries:
        if e.module is not None:
            hooks.append(e.module.register_forward_pre_hook(pre(e.name)))
            hooks.append(e.module.register_forward_hook(post(e.name)))
    try:
        with torch.no_grad():
            for _ in range(iterations):
                net.forward(**feeds)
    finally:
        for h in hooks:
            h.remove()
    return OrderedDict((k, float(np.mean(v)) * 1e3) for k, v in times.items() if v)


def time_cuda_graph(net, iterations: int, warmup: int = 3,
                    inputs: Optional[Dict[str, torch.Tensor]] = None) -> TimingReport:
    """Average forward time of ``net`` replayed as a CUDA graph (inference; no per-layer
    table: a graph is one launch)."""
    from caffe_compat.cuda_graph import CudaGraphNet

    feeds = inputs if inputs is not None else random_inputs(net)
    graph = CudaGraphNet(net, warmup, **feeds)
    device = graph.device
    for _ in range(warmup):
        graph()
    fw = []
    for _ in range(iterations):
        _sync(device)
        t0 = time.perf_counter()
        graph()
        _sync(device)
        fw.append(time.perf_counter() - t0)
    return TimingReport(iterations, float(np.mean(fw)) * 1e3, None)
