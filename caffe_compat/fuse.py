"""Inference pass: fold Caffe's BatchNorm (+ Scale) into the Convolution before it.

Why: a BN-heavy net such as ResNet-50 spends a large part of its forward in the per-channel
BatchNorm and Scale passes over every feature map; OpenCV's dnn folds them into the
convolution's weights, and so may we (``Net.fuse_batchnorm()``, ``caffe-compat time
--fuse-batchnorm``).  Caffe's layers stay the default: the pass is opt-in.

What is folded: a chain ``Convolution -> BatchNorm (use_global_stats) [-> Scale]`` where the
convolution has one bottom and one top, channels on axis 1 and unshared parameters, and the
Scale has one bottom and a learned per-channel (or scalar) ``weight`` (with or without
``bias_term``).  With BatchNorm ``y = (x - mean) / sqrt(var + eps)`` (``mean``/``var`` are
Caffe's stored sums divided by the scale factor; factor 0 gives zero statistics) and Scale
``y * gamma + beta``::

    a  = gamma / sqrt(var + eps)              (gamma = 1, beta = 0 without Scale)
    w' = w * a                                (per output channel)
    b' = (b - mean) * a + beta                (b = 0 if the convolution had no bias)

computed in float64 and cast to the weights' dtype.

Which blobs stay: in the in-place form of ResNet prototxts (BatchNorm and Scale with
``bottom == top ==`` the convolution's top) Caffe's in-place blob ends holding the post-Scale
value, which the fused convolution now writes, so ``net.blobs`` still matches Caffe.  The
non-in-place form is folded only when each intermediate blob is read by nothing but the next
layer of the chain and is not a net output; those intermediate blobs then disappear from
``net.blobs`` (and ``blob_names``/``blob_shapes``) and the convolution writes the chain's last
top.  Anything else is left as it is: BatchNorm with batch statistics (training nets),
Deconvolution, convolution tops read elsewhere, a Scale with two bottoms, loss-weighted tops.

After the pass the folded layers are gone from ``net.entries``, ``net.layer_names``, the
modules, ``state_dict()``/``parameters()`` and ``learnable_params()``; ``net.net_param`` (the
filtered definition, when it lists exactly the built layers, as for any net built from a
definition) describes the fused net (a bias-less convolution that received a bias
says ``bias_term: true``); ``net.layer(name)`` of a folded layer raises a ``GraphError``
saying it was folded.  Inference only: backward through the fused net is not Caffe's, and
weights must be loaded *before* fusing (weights that hold a folded layer's own blobs are
refused afterwards, before anything is copied: they would overwrite the fused convolution
weights); ``save_weights`` afterwards writes the fused convolution weights and no
BatchNorm/Scale layers.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.errors import CaffeCompatError
from caffe_compat.layers.base import Layer, canonical_axis
from caffe_compat.layers.common import BatchNorm, Scale
from caffe_compat.layers.vision import Convolution

if TYPE_CHECKING:  # annotations only: Net.fuse_batchnorm() calls this pass, so net imports fuse
    from caffe_compat.net import LayerEntry, Net, ParamInfo

__all__ = ["fold_batchnorm_into_conv"]


@dataclasses.dataclass
class _Chain:
    """One foldable Convolution -> BatchNorm [-> Scale] chain (indices into ``net.entries``)."""

    conv: int
    bn: int
    scale: Optional[int]
    top: str                # the blob the fused convolution writes
    vanished: List[str]     # blobs nothing produces any more


def _next_touch(entries: Sequence[LayerEntry], after: int, blob: str) -> Optional[int]:
    """Index of the first entry after ``after`` that reads or writes ``blob``."""
    for j in range(after + 1, len(entries)):
        if blob in entries[j].bottoms or blob in entries[j].tops:
            return j
    return None


def _readers(entries: Sequence[LayerEntry], after: int, blob: str) -> List[int]:
    return [j for j in range(after + 1, len(entries)) if blob in entries[j].bottoms]


def _param_users(net: Net) -> Dict[int, int]:
    """id(parameter) -> how many layer modules hold it (``param { name }`` sharing)."""
    users: Dict[int, int] = {}
    for m in net._modules.values():
        for p in m._parameters.values():
            if p is not None:
                users[id(p)] = users.get(id(p), 0) + 1
    return users


def _unshared(users: Dict[int, int], *params: Optional[Tensor]) -> bool:
    return all(p is None or users.get(id(p), 0) <= 1 for p in params)


def _no_loss(e: LayerEntry) -> bool:
    return not any(e.loss_weights)


def _step_ok(net: Net, entries: Sequence[LayerEntry], producer: int, consumer: int) -> bool:
    """Can ``consumer`` (one bottom, one top) be folded into the layer writing its bottom?

    In place (top == bottom): yes, ``consumer`` is the next to touch that blob, so no one
    sees the value before it.  Otherwise the bottom must be read by ``consumer`` alone and
    must not be a net output, because it will no longer exist.
    """
    e = entries[consumer]
    if len(e.bottoms) != 1 or len(e.tops) != 1 or not _no_loss(e):
        return False
    blob = e.bottoms[0]
    if e.tops[0] == blob:
        return True
    return _readers(entries, producer, blob) == [consumer] and blob not in net.output_names


def _conv_ok(e: LayerEntry, users: Dict[int, int]) -> bool:
    m = e.module
    return (isinstance(m, Convolution) and not m.transposed and len(e.bottoms) == 1
            and len(e.tops) == 1 and m.axis == 1 and _no_loss(e) and m.weight.is_floating_point()
            and _unshared(users, m.weight, m.bias))


def _bn_ok(e: LayerEntry, channels: int) -> bool:
    m = e.module
    return isinstance(m, BatchNorm) and m.use_global_stats and m.channels == channels


def _scale_ok(net: Net, e: LayerEntry, channels: int, users: Dict[int, int]) -> bool:
    m = e.module
    if not isinstance(m, Scale) or len(e.bottoms) != 1:
        return False
    w = m.weight
    b = m.bias if m.bias_term else None
    if not _unshared(users, w, b) or (b is not None and tuple(b.shape) != tuple(w.shape)):
        return False
    if w.dim() == 0:  # a scalar scale (num_axes: 0) applies to every channel alike
        return True
    shape = net.blob_shapes.get(e.bottoms[0])
    if shape is None or w.dim() != 1 or w.shape[0] != channels:
        return False
    try:
        return canonical_axis(m.axis_param, len(shape)) == 1
    except CaffeCompatError:  # an axis the layer itself would refuse: leave it alone
        return False


def _find_chains(net: Net) -> List[_Chain]:
    entries = net.entries
    users = _param_users(net)
    chains: List[_Chain] = []
    for i, e in enumerate(entries):
        if not _conv_ok(e, users):
            continue
        channels = e.module.num_output
        t0 = e.tops[0]
        j = _next_touch(entries, i, t0)
        if j is None or not _bn_ok(entries[j], channels) or not _step_ok(net, entries, i, j):
            continue
        t1 = entries[j].tops[0]
        k = _next_touch(entries, j, t1)
        if k is not None and not (_scale_ok(net, entries[k], channels, users)
                                  and _step_ok(net, entries, j, k)):
            k = None
        top = entries[k].tops[0] if k is not None else t1
        vanished = [b for b in dict.fromkeys([t0, t1]) if b != top]
        chains.append(_Chain(i, j, k, top, vanished))
    return chains


def _folded_params(conv: Convolution, bn: BatchNorm,
                   scale: Optional[Scale]) -> Tuple[Tensor, Tensor]:
    """(w', b') in float64 (see the module docstring)."""
    f64 = torch.float64
    w = conv.weight.detach().to(f64)
    n = conv.num_output
    b = conv.bias.detach().to(f64) if conv.bias is not None else torch.zeros(n, dtype=f64, device=w.device)
    sf = bn.scale_factor.detach().to(f64).reshape(-1)[0]
    inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
    mean = bn.running_mean.detach().to(f64) * inv
    var = bn.running_var.detach().to(f64) * inv
    a = 1.0 / torch.sqrt(var + bn.eps)
    beta = torch.zeros(n, dtype=f64, device=w.device)
    if scale is not None:
        a = a * scale.weight.detach().to(f64).expand(n)
        if scale.bias_term:
            beta = scale.bias.detach().to(f64).expand(n)
    w_new = w * a.reshape((n,) + (1,) * (w.dim() - 1))
    return w_new, (b - mean) * a + beta


def _module_key(net: Net, module: Layer) -> str:
    for k, m in net._modules.items():
        if m is module:
            return k
    raise KeyError(module.name)  # pragma: no cover - every built entry is registered


def _add_bias(net: Net, conv: Convolution, key: str, value: Tensor) -> None:
    """Give a bias-less convolution its folded bias and a learnable-param entry after its weight."""
    bias = conv.add_bias(value)
    infos: "OrderedDict[str, ParamInfo]" = OrderedDict()
    for k, info in net.param_infos.items():
        infos[k] = info
        if k == f"{key}.weight":
            infos[f"{key}.bias"] = type(info)(f"{key}.bias", bias)  # a ParamInfo, default multipliers
    net.param_infos.clear()
    net.param_infos.update(infos)


def _fold(net: Net, ch: _Chain) -> None:
    """Fold one chain's numbers into its convolution and rewire the convolution's top."""
    entries = net.entries
    ce = entries[ch.conv]
    conv = ce.module
    bn = entries[ch.bn].module
    scale = entries[ch.scale].module if ch.scale is not None else None
    w_new, b_new = _folded_params(conv, bn, scale)
    with torch.no_grad():
        conv.weight.copy_(w_new)  # copy_ keeps the weight's memory format (channels_last)
        if conv.bias is not None:
            conv.bias.copy_(b_new)
        else:
            _add_bias(net, conv, _module_key(net, conv),
                      b_new.to(dtype=conv.weight.dtype, device=conv.weight.device))
    if ce.tops[0] != ch.top:
        ce.tops = [ch.top]
        conv.top_names = [ch.top]
        del conv.param.top[:]
        conv.param.top.append(ch.top)


def _remove_layers(net: Net, drop: Dict[int, str]) -> None:
    """Take the entries ``drop`` (index -> name of the convolution it went into) out of the net."""
    entries = net.entries
    removed_params = set()
    placeholders = {}
    for idx, into in drop.items():
        e = entries[idx]
        key = _module_key(net, e.module)
        removed_params.update(id(p) for p in e.module._parameters.values() if p is not None)
        del net._modules[key]
        placeholders[e.name] = dataclasses.replace(
            e, module=None,
            unbuilt_reason=f"folded into convolution '{into}' by fuse_batchnorm() (inference "
                           "only: its numbers now live in that layer's weight and bias)")
    for k in [k for k, info in net.param_infos.items() if id(info.param) in removed_params]:
        del net.param_infos[k]
    for share in [s for s, (k, _) in net._share_owner.items() if k not in net.param_infos]:
        del net._share_owner[share]
    same_definition = len(net.net_param.layer) == len(entries)
    for idx in sorted(drop, reverse=True):
        del entries[idx]
        if same_definition:
            del net.net_param.layer[idx]
    # folded names answer net.layer() with a clear error (this pass's and any earlier one's);
    # remaining layers win on duplicate names
    kept = {id(e) for e in entries}
    earlier = {n: e for n, e in net._by_name.items() if id(e) not in kept and e.module is None
               and e.unbuilt_reason.startswith("folded into")}
    net._by_name = {**earlier, **placeholders, **{e.name: e for e in entries}}


def _rename_blobs(net: Net, chains: Sequence[_Chain]) -> None:
    """Blobs of non-in-place chains: the chain's top takes its first blob's place."""
    for ch in chains:
        if not ch.vanished:
            continue
        first = ch.vanished[0]
        names = net.blob_names
        if ch.top in names and first in names and names.index(first) < names.index(ch.top):
            names.remove(ch.top)
            names[names.index(first)] = ch.top
        for b in ch.vanished:
            if b in names:
                names.remove(b)
            net.blob_shapes.pop(b, None)
            net.blobs.pop(b, None)


def fold_batchnorm_into_conv(net: Net) -> List[str]:
    """Fold BatchNorm (+ Scale) layers into the preceding convolutions of ``net``, in place.

    Inference only (see the module docstring for what is folded and which blobs remain);
    returns the names of the layers folded away, in net order.
    """
    chains = _find_chains(net)
    if not chains:
        return []
    drop: Dict[int, str] = {}
    for ch in chains:
        conv_name = net.entries[ch.conv].name
        drop[ch.bn] = conv_name
        if ch.scale is not None:
            drop[ch.scale] = conv_name
    for ch in chains:
        _fold(net, ch)
    names = [net.entries[i].name for i in sorted(drop)]
    _remove_layers(net, drop)
    _rename_blobs(net, chains)
    return names
