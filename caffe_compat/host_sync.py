"""Find the host round trips inside a forward (the GPU's idle gaps), on any device.

On CUDA every operation whose result the host must see before it can go on -- a tensor's
value read as a Python number (``.item()``, ``bool(t)``, ``int(t)``), an output whose
*size* depends on the data (``nonzero``, a boolean-mask index, ``unique``), a copy of host
data onto the device (``torch.tensor(values, device=...)``) or back -- makes the CPU wait
for the GPU's queue to drain.  A Faster R-CNN forward needs a few of them where the
algorithm's output size is data-dependent (the proposals kept after NMS, the RoIs
sampled); every other one is a stall to remove.

:func:`audit_host_syncs` runs one forward under a dispatch mode that records those
operations per layer.  It sees the operations themselves, not the device, so the audit is
the same on a CPU-only machine (where it is tested) as on the GPU; on CUDA,
``torch.cuda.set_sync_debug_mode('warn')`` is the device's own check of the same thing.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torchvision  # noqa: F401  (registers torchvision::nms, counted below)
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncReport", "audit_host_syncs", "SYNCING_OPS", "DeferredChecks", "check_now_or_later",
           "DeviceConstants"]

aten = torch.ops.aten

#: operation -> why it waits for the device
SYNCING_OPS: Dict[Any, str] = {
    aten._local_scalar_dense.default: "value read on the host (.item() / bool / int / float)",
    aten.nonzero.default: "output size depends on the data (nonzero)",
    aten.masked_select.default: "output size depends on the data (masked_select)",
    aten._unique2.default: "output size depends on the data (unique)",
    aten.unique_consecutive.default: "output size depends on the data (unique_consecutive)",
    aten.lift_fresh.default: "host data copied to the device (torch.tensor(values))",
    aten.lift_fresh_copy.default: "host data copied to the device (torch.tensor(values))",
}
for _ns, _name in (("aten", "_unique"), ("aten", "unique_dim"), ("torchvision", "nms")):
    _pkt = getattr(getattr(torch.ops, _ns), _name, None)
    if _pkt is not None and hasattr(_pkt, "default"):
        SYNCING_OPS[_pkt.default] = ("output size depends on the data (NMS)" if _name == "nms"
                                     else "output size depends on the data (unique)")


@dataclass
class HostSyncReport:
    """Host round trips of one forward: ``by_layer[name]`` lists ``(op, why)`` in order."""

    by_layer: "OrderedDict[str, List[str]]" = field(default_factory=OrderedDict)

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.by_layer.values())

    def layers(self) -> List[str]:
        return [k for k, v in self.by_layer.items() if v]

    def __str__(self) -> str:
        if not self.total:
            return "no host round trips"
        lines = [f"{self.total} host round trip(s):"]
        for k, v in self.by_layer.items():
            for op in v:
                lines.append(f"  {k}: {op}")
        return "\n".join(lines)


class _HostReads(TorchFunctionMode):
    """Reads the dispatcher does not see on the CPU (``tolist``/``numpy`` copy out directly)."""

    def __init__(self, rec: "_Recorder") -> None:
        super().__init__()
        self.rec = rec

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("tolist", "numpy") and args and isinstance(args[0], torch.Tensor):
            self.rec.report.by_layer.setdefault(self.rec.layer, []).append(
                f"{name}: value read on the host (.{name}())")
        return func(*args, **(kwargs or {}))


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.layer = "(outside any layer)"
        self.report = HostSyncReport()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        why = SYNCING_OPS.get(func)
        if func in (aten.lift_fresh.default, aten.lift_fresh_copy.default) and args[0].dim() == 0:
            why = None  # a 0-d host value stays a host scalar in device ops: no copy
        if why is None and func is aten.index.Tensor:
            # a boolean (mask) index runs nonzero inside the kernel
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ())):
                why = "output size depends on the data (boolean-mask index)"
        if why is None and func in (aten._to_copy.default, aten.copy_.default):
            src = args[0] if func is aten._to_copy.default else args[1]
            dst_dev = (kwargs or {}).get("device") if func is aten._to_copy.default else args[0].device
            if (isinstance(src, torch.Tensor) and dst_dev is not None
                    and torch.device(dst_dev).type != src.device.type
                    and not (kwargs or {}).get("non_blocking", False)):
                why = f"blocking copy {src.device.type} -> {torch.device(dst_dev).type}"
        if why is not None:
            self.report.by_layer.setdefault(self.layer, []).append(f"{func.__name__.split('.')[0]}: {why}")
        return func(*args, **(kwargs or {}))


def audit_host_syncs(net, *, phase_forward: Optional[Any] = None, **inputs) -> HostSyncReport:
    """Run ``net.forward(**inputs)`` once (or ``phase_forward()``) and report, per Caffe
    layer, every operation that would make the host wait for a GPU.

    Forward hooks name the layer running; they also switch off the CPU inference plan for
    this call, so the audit sees each layer's own operations (as they run on CUDA).  The
    net's validity checks are deferred as on an accelerator; their one settling read is
    reported as ``(end of forward: checks)``.
    """
    rec = _Recorder()
    handles = []
    checks = getattr(net, "checks", None)
    saved_defer = checks.defer_on_cpu if checks is not None else False
    if checks is not None:
        checks.defer_on_cpu = True
    for e in net.entries:
        if e.module is None:
            continue

        def pre(_m, _a, name=e.name):
            rec.layer = name
            rec.report.by_layer.setdefault(name, [])

        def post(_m, _a, _o):
            rec.layer = "(end of forward: checks)"

        handles.append(e.module.register_forward_pre_hook(pre))
        handles.append(e.module.register_forward_hook(post))
    try:
        with rec, _HostReads(rec):
            if phase_forward is not None:
                phase_forward()
            else:
                net.forward(**inputs)
    finally:
        for h in handles:
            h.remove()
        if checks is not None:
            checks.defer_on_cpu = saved_defer
    rec.report.by_layer = OrderedDict((k, v) for k, v in rec.report.by_layer.items() if v)
    return rec.report


class DeferredChecks:
    """Validity checks of one net's forward, settled together with one host round trip.

    A layer that must refuse bad data (a label out of range, an RoI naming no image) finds
    out with a comparison on the device; reading the answer on the host stalls the GPU.
    On an accelerator the layer instead computes on safe (clamped) values, queues the
    0-d ``bad`` flag here with the function that raises the error, and the net settles
    every queued flag once at the end of its forward (one read for all of them), raising
    the first layer's error in the net's order -- the same error the immediate check
    gives, one forward's work later.  On the CPU a read costs nothing: checks run at once.
    """

    def __init__(self) -> None:
        self._pending: List[Tuple[Any, Callable[[], None]]] = []
        #: defer CPU checks too (tests use it to exercise the accelerator path)
        self.defer_on_cpu = False

    def check(self, bad: torch.Tensor, fail: Callable[[], None]) -> None:
        """Call ``fail()`` (which raises) if the 0-d bool ``bad`` holds: now, or at settle."""
        if bad.device.type == "meta":
            return
        if bad.device.type == "cpu" and not self.defer_on_cpu:
            if bool(bad):
                fail()
            return
        self._pending.append((bad.reshape(()), fail))

    def settle(self) -> None:
        """Read every queued flag with one host round trip; raise the first failure."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        flags = torch.stack([b.to(pending[0][0].device) for b, _ in pending])
        if not bool(flags.any()):
            return
        for hit, (_, fail) in zip(flags.tolist(), pending):
            if hit:
                fail()

    def clear(self) -> None:
        self._pending = []


def check_now_or_later(checks: Optional[DeferredChecks], bad: torch.Tensor,
                       fail: Callable[[], None]) -> None:
    """``checks.check(bad, fail)``, or at once when the layer runs outside a net."""
    if checks is None:
        if bad.device.type != "meta" and bool(bad):
            fail()
        return
    checks.check(bad, fail)


class DeviceConstants:
    """Small constant tensors (weights, means) made once per device and dtype: creating
    them from Python values at every forward is a blocking host-to-device copy each."""

    def __init__(self) -> None:
        self._cache: Dict[Tuple[Any, ...], torch.Tensor] = {}

    def get(self, values: Any, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (tuple(values) if isinstance(values, (list, tuple)) else values, dtype, str(device))
        t = self._cache.get(key)
        if t is None:
            t = torch.tensor(values, dtype=dtype).to(device)
            self._cache[key] = t
        return t
