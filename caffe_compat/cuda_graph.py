"""Replay a Net's inference forward as one CUDA graph.

At batch 1 a Caffe net on a modern GPU is bound by kernel launches, not arithmetic: the nsfw
ResNet-50 takes ~13 ms eagerly on an H200 for well under 1 ms of GPU work.  A CUDA graph
records the forward's kernels once (fixed input shapes) and replays them with one launch.
The graph reads its inputs from, and writes every blob to, fixed tensors: a call copies the
new inputs in, replays, and returns the net's outputs -- the same tensors each time, so
clone them to keep a result past the next call.  ``net.blobs`` after a call holds every blob
of that call, as after an eager forward.

Nets whose forward needs the host (data-dependent shapes: proposals, NMS, Python layers,
data layers without fed inputs) cannot be captured; that is reported as a ``GraphError``
naming the reason, and such nets keep running eagerly.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import GraphError, ShapeError

__all__ = ["CudaGraphNet", "TrunkGraphs", "host_free_prefix", "fast_runner"]


class CudaGraphNet:
    """``CudaGraphNet(net, data=example)``: a captured forward of ``net`` (on CUDA) for the
    example inputs' shapes; call it with new inputs of those shapes.  ``end``: capture only
    Caffe's ``ForwardFromTo(0, end)`` (the layers up to and including ``end``)."""

    def __init__(self, net, warmup: int = 3, *, end: Optional[str] = None, **example_inputs) -> None:
        if not torch.cuda.is_available():
            raise GraphError("CUDA graphs need a CUDA device; none is available")
        has_state = any(True for _ in net.parameters()) or any(True for _ in net.buffers())
        device = net.device if has_state else next(
            (v.device for v in example_inputs.values() if isinstance(v, Tensor) and v.is_cuda),
            torch.device("cuda", torch.cuda.current_device()))
        if device.type != "cuda":
            raise GraphError(f"the net is on {device}; move it first: net.to('cuda')")
        missing = [n for n in net.input_names if n not in example_inputs]
        if missing:
            raise GraphError(f"a CUDA graph needs every net input given; missing: {', '.join(missing)}")
        self.net = net
        self.device = device
        self.inputs: Dict[str, Tensor] = {}
        for k, v in example_inputs.items():
            t = v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))
            self.inputs[k] = t.to(device=device, dtype=net.dtype).clone()
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.no_grad(), torch.cuda.stream(side):
            run = (lambda: net.forward(**self.inputs)) if end is None else \
                (lambda: net.forward(end=end, **self.inputs))
            run()  # lazy inits and caches (may copy from the host once)
            # a forward that synchronizes with the host cannot be captured: find out now, with
            # a clear error, rather than by a failed capture
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(max(1, warmup)):
                    run()
            except RuntimeError as e:
                raise GraphError("this net cannot be captured as a CUDA graph (run it eagerly): its "
                                 "forward synchronizes with the host (data-dependent shapes or host "
                                 f"copies): {str(e).splitlines()[0]}") from None
            finally:
                torch.cuda.set_sync_debug_mode(previous)
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            self.graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(self.graph):
                self.outputs: "OrderedDict[str, Tensor]" = run()
        except RuntimeError as e:
            try:
                torch.cuda.synchronize(device)
            except RuntimeError:
                pass
            raise GraphError(f"this net cannot be captured as a CUDA graph (run it eagerly): "
                             f"{str(e).splitlines()[0]}") from None
        self.blobs = net.blobs
        # constants cached outside the net that the graph reads (AVE divisors): keep them alive
        from caffe_compat.layers.vision import cached_constants

        self._constants = [t for t in cached_constants() if t.device == device]

    def __call__(self, **inputs) -> "OrderedDict[str, Tensor]":
        for k, v in inputs.items():
            dst = self.inputs.get(k)
            if dst is None:
                raise GraphError(f"'{k}' is not an input of this net; inputs are: {', '.join(self.inputs)}")
            src = v if isinstance(v, Tensor) else torch.as_tensor(np.asarray(v))
            if tuple(src.shape) != tuple(dst.shape):
                raise ShapeError(f"input '{k}': the graph was captured for shape {tuple(dst.shape)}, "
                                 f"got {tuple(src.shape)} (capture another graph for new shapes)")
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        self.net.blobs = self.blobs
        return self.outputs

    def forward(self, **inputs) -> "OrderedDict[str, Tensor]":
        return self(**inputs)



def host_free_prefix(net, **inputs) -> Optional[str]:
    """The last layer before the first one whose forward needs the host (an NMS, a Python
    layer, a sampled size: found by :func:`caffe_compat.host_sync.audit_host_syncs` on one
    forward of ``inputs``), or None when the first layer already needs it.  The layers up to
    it can be captured as one CUDA graph; with no such layer the whole net can."""
    from caffe_compat.host_sync import audit_host_syncs

    with torch.no_grad():
        report = audit_host_syncs(net, **inputs)
    needing = set(report.layers())
    previous: Optional[str] = None
    for e in net.entries:
        if e.name in needing:
            return previous
        previous = e.name
    return previous


class TrunkGraphs:
    """A net whose host-free leading layers (a detector's convolutional trunk and RPN head)
    replay as CUDA graphs, one per input shape, and whose remaining layers run eagerly.

    Faster R-CNN's test images come in a few sizes (VOC: mostly 600 x 800 and 800 x 600 after
    scaling), so most forwards replay a captured trunk: one launch instead of one per kernel.
    The split point is found once (:func:`host_free_prefix`); at most ``max_graphs`` shapes
    keep a graph (least recently used dropped first); a shape that cannot be captured runs
    eagerly.  Quacks like the net for ``im_detect``: ``forward(**inputs)`` returns the
    outputs, ``blobs`` and other attributes are the net's.
    """

    def __init__(self, net, max_graphs: int = 4) -> None:
        self.net = net
        self.max_graphs = int(max_graphs)
        self.split: Optional[str] = None
        self._split_known = False
        self._graphs: "OrderedDict[Tuple[Any, ...], Optional[CudaGraphNet]]" = OrderedDict()
        #: shapes replayed / captured / run eagerly: the figures a benchmark reports
        self.replays = 0
        self.captures = 0
        self.eager = 0

    _OWN = frozenset({"net", "max_graphs", "split", "_split_known", "_graphs", "replays", "captures",
                      "eager"})

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["net"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        # settings such as ``allow_tf32`` (``--precision tf32``) are the net's
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.net, name, value)

    def _key(self, inputs: Dict[str, Any]) -> Tuple[Any, ...]:
        return tuple(sorted((k, tuple(v.shape), str(v.dtype)) for k, v in inputs.items()))

    def forward(self, **inputs) -> "OrderedDict[str, Tensor]":
        net = self.net
        if not self._split_known:
            self.split = host_free_prefix(net, **inputs)
            self._split_known = True
        if self.split is None or net.device.type != "cuda":
            self.eager += 1
            return net.forward(**inputs)
        key = self._key(inputs)
        if key in self._graphs:
            self._graphs.move_to_end(key)
            graph = self._graphs[key]
        else:
            try:
                graph = CudaGraphNet(net, end=self.split, **inputs)
                self.captures += 1
            except GraphError:
                graph = None   # this shape runs eagerly from now on
            self._graphs[key] = graph
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        if graph is None:
            self.eager += 1
            return net.forward(**inputs)
        graph(**inputs)
        self.replays += 1
        last = net.entries[-1].name
        if last == self.split:
            return OrderedDict((n, net.blobs[n]) for n in net.output_names if n in net.blobs)
        return net.forward(start=net.step_index(self.split) + 1)

    __call__ = forward


def fast_runner(net, *, cuda_graphs: bool = True, compile_backend: Optional[str] = None):
    """What ``test``/``detect`` run images through: ``net`` itself, its forwards compiled
    (``compile_backend``, with the eager fallback), and on CUDA its host-free trunk replayed
    as CUDA graphs (:class:`TrunkGraphs`; compiling and graphs are not combined: a compiled
    forward is captured by neither)."""
    if compile_backend:
        net.compile_forward(backend=compile_backend)
        return net
    if cuda_graphs and net.device.type == "cuda":
        return TrunkGraphs(net)
    return net
