"""Caffe's ``Net::ForwardFromTo`` / ``Net::BackwardFromTo``: the net run layer by layer on
the state its blobs hold.

A whole-net ``Net.forward()`` builds one autograd graph and ``Net.backward()`` is torch's
``loss.backward()``.  Caffe's ranged calls (and pycaffe, which is built on them) need more:
every blob keeps a data and a diff between calls, a range of layers runs on whatever the
blobs hold (a script may have written into them), and backward writes each bottom's diff
exactly where Caffe's need-backward analysis says (``caffe_compat.insert_splits``), over
Caffe's graph with its split layers.  So here each layer runs on its bottoms detached
from the layers before it, and its autograd record is kept; ``backward_from_to`` differentiates each record
with the top diffs the blobs hold now (a loss top's diff is its loss weight, Caffe's
``SetLossWeights``).

Backward needs no forward first, as in Caffe: a layer without a record (or whose bottoms
changed since it ran) is run again under autograd on its bottoms as they are now, its
buffers and the net's generator restored afterwards so the extra run changes nothing; an
in-place layer uses its recorded input, or, with no record, the blob (its own output, as
Caffe's in-place backward reads it).  Layers whose backward reads state their forward kept
(``Layer.backward_on_blobs``, Python layers) get their own ``caffe_backward`` called on the
blobs instead, as Caffe calls ``Backward``.  (A native layer run again computes what its
Caffe counterpart keeps from its forward -- SoftmaxWithLoss's probabilities, Dropout's
mask -- from the bottoms as they are: a fresh mask for Dropout.)
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from caffe_compat.errors import DataError, GraphError
from caffe_compat.insert_splits import Step

if TYPE_CHECKING:  # pragma: no cover
    from caffe_compat.net import Net

LayerRef = Union[str, int, None]

__all__ = ["LayerRef", "Record", "step_index", "forward_from_to", "backward_from_to"]


@dataclass
class Record:
    """One layer's last layer-by-layer forward: the bottoms it ran on (leaves of its
    autograd graph), its outputs, and each bottom's blob tensor and version then."""

    bottoms: List[Tensor]
    outs: Tuple[Tensor, ...]
    sources: List[Tuple[Tensor, int]]


def step_index(net: "Net", layer: LayerRef, default: int) -> int:
    """The index in ``net.caffe_steps`` of a layer name (its first occurrence, as pycaffe's
    ``list(net._layer_names).index(name)``) or of an index (negative counts from the end)."""
    steps = net.caffe_steps
    if layer is None:
        layer = default
    if isinstance(layer, int):
        i = layer + len(steps) if layer < 0 else layer
        if not 0 <= i < len(steps):
            raise IndexError(f"layer index {layer} outside 0..{len(steps) - 1}")
        return i
    for i, s in enumerate(steps):
        if s.name == layer:
            return i
    raise ValueError(f"no layer named '{layer}' (layers: {', '.join(s.name for s in steps)})")


# ============================================================================ blob state
def _data(net: "Net", name: str) -> Tensor:
    """Blob ``name``'s data (a split top reads its source); zeros when it has none yet, as
    Caffe's blobs are zero-filled from ``Net::Init``."""
    src = net.split_sources.get(name, name)
    t = net.blobs.get(src)
    dev = net.device
    if t is None:
        shape = net.blob_shapes.get(src)
        if shape is None:
            raise DataError(f"blob '{src}' has no data and no known shape")
        t = net.blobs[src] = torch.zeros(shape, dtype=net.dtype, device=dev)
    elif t.device != dev:
        t = net.blobs[src] = t.to(dev)
    return t


def _diff(net: "Net", name: str, like: Tensor, fill: float = 0.0) -> Tensor:
    """Blob ``name``'s diff shaped as ``like``; ``fill`` (a loss top's weight) when it has
    none.  A diff of another shape is cut to the new count or, if it is too small, renewed
    as zeros (Caffe's ``Blob::Reshape`` within and beyond capacity)."""
    d = net.diffs.get(name)
    if d is None:
        return torch.full_like(like, fill) if fill else torch.zeros_like(like)
    if d.shape != like.shape:
        n = like.numel()
        d = d.reshape(-1)[:n].reshape(like.shape) if d.numel() >= n else torch.zeros_like(like)
    return d.to(device=like.device, dtype=like.dtype)


@contextlib.contextmanager
def _params_for_grad(step: Step) -> Iterator[List[Tuple[int, nn.Parameter]]]:
    """The step's parameters that get diffs, with ``requires_grad`` on for the duration
    (``lr_mult: 0`` freezes a parameter in torch, but ``force_backward`` still wants its diff)."""
    out: List[Tuple[int, nn.Parameter]] = []
    flipped: List[nn.Parameter] = []
    m = step.module
    if m is not None:
        for k, attr in enumerate(m.blob_names):
            t = getattr(m, attr)
            if k < len(step.param_propagate_down) and step.param_propagate_down[k] \
                    and isinstance(t, nn.Parameter):
                if not t.requires_grad:
                    t.requires_grad_(True)
                    flipped.append(t)
                out.append((k, t))
    try:
        yield out
    finally:
        for t in flipped:
            t.requires_grad_(False)


@contextlib.contextmanager
def _without_side_effects(net: "Net", module: nn.Module) -> Iterator[None]:
    """Run a layer again for its gradient only: its buffers (running statistics) and the
    net's generator are put back afterwards."""
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    gen = net.generator
    state = gen.get_state() if gen is not None else None
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)
        if state is not None:
            gen.set_state(state)


# ============================================================================ forward
def _feed_tops(net: "Net", step: Step) -> Tuple[Tensor, ...]:
    """An input layer's tops: what the blobs hold (a fed tensor), else its defaults."""
    m = step.module
    outs: List[Optional[Tensor]] = [net.blobs.get(t, net._fed.get(t)) for t in step.tops]
    if any(o is None for o in outs):
        made = list(m())
        outs = [o if o is not None else d for o, d in zip(outs, made)]
    return tuple(outs)  # type: ignore[arg-type]


def _run_layer(net: "Net", i: int, step: Step) -> Tuple[Tensor, ...]:
    m = step.module
    record = step.need_backward and not getattr(m, "backward_on_blobs", False)
    bottoms: List[Tensor] = []
    sources: List[Tuple[Tensor, int]] = []
    for j, b in enumerate(step.bottoms):
        src = _data(net, b)
        sources.append((src, src._version))
        x = src.detach()
        if record and step.bottom_need_backward[j] and x.is_floating_point():
            x.requires_grad_(True)
        bottoms.append(x)
    if record:
        with _params_for_grad(step), torch.enable_grad():
            outs = m(*bottoms)
    else:
        with torch.no_grad():
            outs = m(*bottoms)
    outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
    if len(outs) != len(step.tops):
        raise GraphError(f"produced {len(outs)} tops, expected {len(step.tops)}", layer=step.name)
    if record:
        net._records[i] = Record(bottoms, outs, sources)
    else:
        net._records.pop(i, None)
    return outs


def forward_from_to(net: "Net", start: int, end: int) -> Optional[Tensor]:
    """Caffe's ``ForwardFromTo(start, end)`` (step indices, inclusive): returns the loss of
    the layers run (float64, None when none of them is a loss)."""
    steps = net.caffe_steps
    loss: Optional[float] = None
    fused = _fused_groups(net, steps, start, end)
    done: set = set()
    for i in range(start, end + 1):
        s = steps[i]
        if s.is_split or i in done:  # a split's tops share the bottom's data
            continue
        m = s.module
        if m is None:
            raise DataError(f"layer cannot run: {net.entries[s.entry].unbuilt_reason}", layer=s.name)
        group = fused.get(i)
        if group is not None:  # the inference plan's fused step: Caffe's value in the top
            run, absorbed = group
            with torch.no_grad():
                net.blobs[s.tops[0]] = run(_data(net, s.bottoms[0]))
            for j in [i] + absorbed:
                net._records.pop(j, None)
            done.update(absorbed)
            net.checks.settle()
            continue
        outs = _feed_tops(net, s) if m.accepts_feed else _run_layer(net, i, s)
        net.checks.settle()  # layer by layer: each layer's checks before the next reads its tops
        for t, o, w in zip(s.tops, outs, s.loss_weights):
            net.blobs[t] = o.detach()
            if w:
                loss = (loss or 0.0) + float(w) * float(o.detach().double().sum())
    order = {n: k for k, n in enumerate(net.blob_names)}
    net.blobs = type(net.blobs)(sorted(net.blobs.items(), key=lambda kv: order.get(kv[0], len(order))))
    for n, t in net.blobs.items():
        net.blob_shapes[n] = tuple(t.shape)
    return None if loss is None else torch.tensor(loss, dtype=torch.float64)


def _fused_groups(net: "Net", steps: List[Step], start: int, end: int) -> dict:
    """Step index -> (fused run, absorbed step indices) for the default CPU inference plan's
    groups (a convolution with its in-place BatchNorm/Scale/ReLU, an InnerProduct with its
    ReLU) that lie wholly inside ``start..end`` and of which no step needs backward.  A range
    ending inside a group runs its layers one by one, so every blob holds what Caffe's does."""
    from caffe_compat import inference_plan

    if not inference_plan.applies_ranged(net):
        return {}
    plan = inference_plan.plan_for(net)
    if not plan.convs:
        return {}
    at = {s.entry: k for k, s in enumerate(steps) if s.entry is not None}
    out = {}
    for entry, f in plan.convs.items():
        k = at.get(entry)
        absorbed = [at.get(a) for a in f.absorbed]
        if k is None or None in absorbed:
            continue
        members = [k] + absorbed
        if min(members) < start or max(members) > end or any(steps[j].need_backward for j in members):
            continue
        out[k] = (f.run, absorbed)
    return out


# ============================================================================ backward
def _is_fresh(net: "Net", step: Step, rec: Record) -> bool:
    """Whether every bottom still holds what the layer ran on (in-place bottoms hold the
    layer's own output by design and do not count)."""
    for j, b in enumerate(step.bottoms):
        if step.in_place(j):
            continue
        cur = _data(net, b)
        src, version = rec.sources[j]
        if cur is src:
            if cur._version != version:
                return False
            continue
        rb = rec.bottoms[j]
        if cur.shape != rb.shape or cur.device != rb.device or cur.dtype != rb.dtype \
                or not torch.equal(cur, rb.detach()):
            return False
    return True


def _rerun(net: "Net", i: int, step: Step, rec: Optional[Record]) -> Record:
    """The layer run again on its bottoms as they are now, for its gradient only."""
    bottoms: List[Tensor] = []
    sources: List[Tuple[Tensor, int]] = []
    for j, b in enumerate(step.bottoms):
        src = _data(net, b)
        sources.append((src, src._version))
        if step.in_place(j) and rec is not None:
            bottoms.append(rec.bottoms[j])
            continue
        x = src.detach()
        if step.bottom_need_backward[j] and x.is_floating_point():
            x.requires_grad_(True)
        bottoms.append(x)
    with _without_side_effects(net, step.module), _params_for_grad(step), torch.enable_grad():
        outs = step.module(*bottoms)
    outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
    new = Record(bottoms, outs, sources)
    net._records[i] = new
    return new


def _backward_layer(net: "Net", i: int, step: Step) -> None:
    need = step.bottom_need_backward
    if not any(need) and not any(step.param_propagate_down):
        return  # nothing to write (a data layer's Backward does nothing)
    rec = net._records.get(i)
    if rec is None or not _is_fresh(net, step, rec):
        rec = _rerun(net, i, step, rec)
    pairs = [(o, _diff(net, t, o, w)) for o, t, w in zip(rec.outs, step.tops, step.loss_weights)
             if o.requires_grad]
    targets = [(j, b) for j, b in enumerate(rec.bottoms) if need[j] and b.requires_grad]
    with _params_for_grad(step) as params:
        if pairs and (targets or params):
            grads = torch.autograd.grad([o for o, _ in pairs],
                                        [b for _, b in targets] + [p for _, p in params],
                                        [d for _, d in pairs], retain_graph=True, allow_unused=True)
        else:
            grads = (None,) * (len(targets) + len(params))
    got = {j: g for (j, _), g in zip(targets, grads[:len(targets)])}
    for j, b in enumerate(step.bottoms):
        if need[j]:
            g = got.get(j)
            net.diffs[b] = (g if g is not None else torch.zeros_like(rec.bottoms[j])).detach()
    with torch.no_grad():
        for (_, p), g in zip(params, grads[len(targets):]):
            if g is None:
                continue
            if p.grad is None:  # Caffe accumulates parameter diffs until ClearParamDiffs
                p.grad = g.detach().clone()
            else:
                p.grad.add_(g.to(p.grad.dtype))


def _backward_on_blobs(net: "Net", step: Step) -> None:
    """Caffe's ``Backward`` of a layer that computes it itself (``caffe_backward``): on the
    blobs' data and diffs as they are; what it leaves in the bottom and parameter diffs is
    theirs (Caffe writes straight into them)."""
    m = step.module
    bottom_data = [_data(net, b) for b in step.bottoms]
    top_data = [_data(net, t) for t in step.tops]
    top_diff = [_diff(net, t, d, w) for t, d, w in zip(step.tops, top_data, step.loss_weights)]
    bottom_diff = [_diff(net, b, d) for b, d in zip(step.bottoms, bottom_data)]
    params = [getattr(m, a) for a in m.blob_names]
    param_diff = [p.grad if isinstance(p, nn.Parameter) and p.grad is not None else torch.zeros_like(p)
                  for p in params]
    new_bottom, new_param = m.caffe_backward(top_data, top_diff, list(step.bottom_need_backward),
                                             bottom_data, bottom_diff, param_diff)
    for b, d in zip(step.bottoms, new_bottom):
        net.diffs[b] = d.detach()
    with torch.no_grad():
        for p, d in zip(params, new_param):
            if not isinstance(p, nn.Parameter):
                continue
            d = d.detach().to(device=p.device, dtype=p.dtype).reshape(p.shape)
            if p.grad is None or p.grad.shape != p.shape:
                p.grad = d.clone()
            else:
                p.grad.copy_(d)


def backward_from_to(net: "Net", start: int, end: int) -> None:
    """Caffe's ``BackwardFromTo(start, end)`` (step indices, ``start >= end``, inclusive):
    bottom diffs are overwritten, parameter diffs accumulate."""
    steps = net.caffe_steps
    for i in range(start, end - 1, -1):
        s = steps[i]
        if not s.need_backward:
            continue
        if s.is_split:
            if s.bottom_need_backward[0]:
                like = _data(net, s.bottoms[0])
                total = None
                for t, w in zip(s.tops, s.loss_weights):
                    d = _diff(net, t, like, w)
                    total = d.clone() if total is None else total.add_(d)
                net.diffs[s.bottoms[0]] = total
            continue
        m = s.module
        if m is None:
            raise DataError(f"layer cannot run: {net.entries[s.entry].unbuilt_reason}", layer=s.name)
        if getattr(m, "backward_on_blobs", False):
            _backward_on_blobs(net, s)
        else:
            _backward_layer(net, i, s)

