"""The default CPU inference plan: what a TEST-phase net runs when no gradient is recorded.

Why: at batch 1 on the CPU, eager NCHW convolutions re-order their weights on every call
and run in a layout oneDNN is slow in, so the plain path was 1.5-2x OpenCV's dnn.  When
``Net.forward`` runs a TEST net on the CPU with grad off (``torch.no_grad()`` or
``torch.inference_mode()``) and the net was not built with ``exact_layout=True``, each
2-D convolution runs instead as oneDNN's ``_convolution_pointwise`` on

- its input in channels-last (NHWC) layout (the output stays NHWC, so the whole trunk does);
- a prepacked copy of its weights (oneDNN's blocked format, made once per input shape);
- with BatchNorm (``use_global_stats``) and Scale folded in, and ReLU (``negative_slope``
  0) fused, **only** where those layers overwrite the convolution's top in place and are the
  next layers to touch it: Caffe's blob then holds the post-ReLU value, which is what the
  fused step writes, so ``net.blobs`` keeps Caffe's names and values (in NHWC strides; the
  logical values and shapes are the same, ``numpy`` views of them too).

The packed copy is a cache beside the net: the parameters themselves (their values,
layout, ``requires_grad``) are never touched, so training, backward and ``state_dict`` see
the net as built.  The cache is keyed on the input shape and on each source tensor's
identity, storage and ``_version``, so weights edited or loaded after a forward are picked
up by the next one.  Folding and fusion change rounding only (fp32, well within Caffe's
1e-5; ``tests/core/test_inference_plan.py`` compares against ``exact_layout=True``).
Max pooling without a mask top skips the argmax indices by itself (``layers/vision.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from caffe_compat.fuse import _bn_ok, _folded_params, _scale_ok
from caffe_compat.layers.base import TEST
from caffe_compat.layers.vision import Convolution

if TYPE_CHECKING:
    from caffe_compat.net import LayerEntry, Net

__all__ = ["InferencePlan", "plan_for", "applies", "applies_ranged"]


def _has_mkldnn_ops() -> bool:
    return (torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def applies(net: "Net") -> bool:
    """Whether this forward of ``net`` takes the plan (checked per forward: grad mode is
    the caller's).  Not while a layer module has forward hooks: whoever watches layers
    one by one (``caffe-compat time``'s per-layer figures, feature extractors) gets each
    layer run as it is."""
    return (not net.exact_layout and net.phase == TEST and not torch.is_grad_enabled()
            and net.device.type == "cpu" and net.dtype == torch.float32 and _has_mkldnn_ops()
            and not any(m._forward_hooks or m._forward_pre_hooks for m in net._modules.values()))


def applies_ranged(net: "Net") -> bool:
    """:func:`applies` for Caffe's ``ForwardFromTo`` (pycaffe's ``net.forward()``): there
    grad mode does not matter -- a layer runs with grad only where Caffe's need-backward says
    so, and the ranged pass fuses only groups none of whose steps need it."""
    return (not net.exact_layout and net.phase == TEST and net.device.type == "cpu"
            and net.dtype == torch.float32 and _has_mkldnn_ops()
            and not any(m._forward_hooks or m._forward_pre_hooks for m in net._modules.values()))


def _key(*tensors: Optional[Tensor]) -> tuple:
    return tuple((id(t), t.data_ptr(), t._version) if t is not None else None for t in tensors)


@dataclass
class FusedConv:
    """One convolution step of the plan, with what it absorbs (entry indices)."""

    conv: Convolution
    bn: Optional[torch.nn.Module] = None
    scale: Optional[torch.nn.Module] = None
    relu: Optional[torch.nn.Module] = None
    absorbed: List[int] = field(default_factory=list)
    _cache_key: Optional[tuple] = None
    _packed: Optional[Tuple[Tensor, Optional[Tensor]]] = None
    _args: tuple = ()

    @property
    def _attr(self) -> str:
        return "relu" if self.relu is not None else "none"

    def _sources(self) -> tuple:
        c, bn, sc = self.conv, self.bn, self.scale
        ts: List[Optional[Tensor]] = [c.weight, c.bias]
        if bn is not None:
            ts += [bn.running_mean, bn.running_var, bn.scale_factor]
        if sc is not None:
            ts += [sc.weight, sc.bias if sc.bias_term else None]
        return tuple(ts)

    def _pack(self, key: tuple) -> Tuple[Tensor, Optional[Tensor]]:
        c = self.conv
        with torch.no_grad():
            if self.bn is not None:
                w64, b64 = _folded_params(c, self.bn, self.scale)
                w, b = w64.to(c.weight.dtype), b64.to(c.weight.dtype)
            else:
                w = c.weight.detach()
                b = c.bias.detach() if c.bias is not None else None
            w = torch.ops.mkldnn._reorder_convolution_weight(
                w.contiguous(), self._args[0], self._args[1], self._args[2], c.group, list(key[0]))
        self._packed, self._cache_key = (w, b), key
        return self._packed

    def run(self, x: Tensor) -> Tensor:
        """The top after the convolution and every layer it absorbs."""
        c = self.conv
        key = (x.shape, _key(*self._sources()))
        if key == self._cache_key and x.dtype == torch.float32:
            w, b = self._packed
        else:  # a new shape or new weights: check the input, then pack
            if (x.dim() != 4 or x.shape[1] != c.channels or x.dtype != torch.float32
                    or c._conv_padding(x.shape[2:])[1] is not None):  # (Caffe's extra right padding)
                return self._unfused(x)  # the layers themselves (and their error messages)
            self._args = (list(c.pad), list(c.stride), list(c.dilation))
            w, b = self._pack(key)
        x = x.contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise(
            x, w, b, self._args[0], self._args[1], self._args[2], c.group, self._attr, [], "")

    def _unfused(self, x: Tensor) -> Tensor:
        (y,) = self.conv(x)
        for m in (self.bn, self.scale, self.relu):
            if m is not None:
                (y,) = m(y)
        return y


@dataclass
class FusedLinear:
    """An InnerProduct step: oneDNN's ``_linear_pointwise`` on a prepacked weight (at batch
    1 a matrix-vector product bound by reading the weight: the packed copy reads 1.5-2x
    faster than ``x @ W.t()``), with an in-place ReLU after it fused."""

    ip: torch.nn.Module
    relu: Optional[torch.nn.Module] = None
    absorbed: List[int] = field(default_factory=list)
    _cache_key: Optional[tuple] = None
    _packed: Optional[Tuple[Tensor, Optional[Tensor]]] = None

    def run(self, x: Tensor) -> Tensor:
        ip = self.ip
        axis = ip.param.inner_product_param.axis
        axis = axis + x.dim() if axis < 0 else axis
        if (not 0 <= axis < x.dim() or x.dtype != torch.float32
                or math.prod(x.shape[axis:]) != ip.k):  # the layer's own path and errors
            (y,) = ip(x)
            return self.relu(y)[0] if self.relu is not None else y
        m = math.prod(x.shape[:axis])
        b = ip.bias if ip.bias_term else None
        key = (m, _key(ip.weight, b))
        if key != self._cache_key or self._packed is None:
            with torch.no_grad():
                w = ip.weight.detach()
                w = (w.t() if ip.transpose else w).contiguous()
                self._packed = (torch.ops.mkldnn._reorder_linear_weight(w, m),
                                None if b is None else b.detach())
            self._cache_key = key
        w, bb = self._packed
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(m, ip.k), w, bb,
                                               "relu" if self.relu is not None else "none", [], "")
        return y.reshape(tuple(x.shape[:axis]) + (ip.num_output,))


def _plannable_ip(e: "LayerEntry") -> bool:
    from caffe_compat.layers.common import InnerProduct

    m = e.module
    return (type(m) is InnerProduct and len(e.bottoms) == 1 and len(e.tops) == 1
            and not any(e.loss_weights) and m.weight.dtype == torch.float32)


def _plannable_conv(e: "LayerEntry") -> bool:
    m = e.module
    return (isinstance(m, Convolution) and type(m)._op is Convolution._op and not m.transposed
            and m.num_spatial == 2 and m.axis == 1 and len(e.bottoms) == 1 and len(e.tops) == 1
            and not any(e.loss_weights) and m.weight.dtype == torch.float32)


def _next_in_place(entries: Sequence["LayerEntry"], after: int, blob: str) -> Optional[int]:
    """Index of the next entry touching ``blob`` if it overwrites it in place (one bottom,
    one top, no loss), else None."""
    for j in range(after + 1, len(entries)):
        e = entries[j]
        if blob in e.bottoms or blob in e.tops:
            ok = (e.module is not None and e.bottoms == [blob] and e.tops == [blob]
                  and not any(e.loss_weights))
            return j if ok else None
    return None


class InferencePlan:
    """Per entry index: the fused convolution that runs there, and the entries it absorbs.

    A cache: copies and pickles of a net drop it (oneDNN's packed weights have no
    storage to copy) and the copy builds its own on its first grad-free forward."""

    def __deepcopy__(self, memo) -> None:
        return None

    def __reduce__(self):
        return (type(None), ())

    def __init__(self, net: "Net"):
        from caffe_compat.layers.neuron import ReLU

        entries = net.entries
        self.convs: Dict[int, Union[FusedConv, FusedLinear]] = {}
        self.skip: set = set()
        for i, e in enumerate(entries):
            if _plannable_ip(e) and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
                fl = FusedLinear(e.module)
                r = _next_in_place(entries, i, e.tops[0])
                if r is not None and type(entries[r].module) is ReLU and entries[r].module.negative_slope == 0.0:
                    fl.relu = entries[r].module
                    fl.absorbed.append(r)
                self.convs[i] = fl
                self.skip.update(fl.absorbed)
                continue
            if not _plannable_conv(e):
                continue
            fc = FusedConv(e.module)
            top = e.tops[0]
            at = i
            j = _next_in_place(entries, at, top)
            if j is not None and _bn_ok(entries[j], e.module.num_output):
                fc.bn, at = entries[j].module, j
                fc.absorbed.append(j)
                k = _next_in_place(entries, at, top)
                if k is not None and _scale_ok(net, entries[k], e.module.num_output, {}):
                    fc.scale, at = entries[k].module, k
                    fc.absorbed.append(k)
            r = _next_in_place(entries, at, top)
            if r is not None and type(entries[r].module) is ReLU and entries[r].module.negative_slope == 0.0:
                fc.relu = entries[r].module
                fc.absorbed.append(r)
            self.convs[i] = fc
            self.skip.update(fc.absorbed)


def plan_for(net: "Net") -> InferencePlan:
    """The net's plan, rebuilt when its layers or wiring changed (``fuse_batchnorm`` ...)."""
    key = tuple((id(e), id(e.module), tuple(e.bottoms), tuple(e.tops)) for e in net.entries)
    cached = net.__dict__.get("_inference_plan")
    if cached is None or cached[0] != key or cached[1] is None:
        cached = (key, InferencePlan(net))
        net.__dict__["_inference_plan"] = cached
    return cached[1]
