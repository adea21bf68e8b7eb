"""pycaffe's ``caffe.Net``: a stateful, Caffe-shaped view of a :class:`caffe_compat.net.Net`.

The torch net (the "core") owns the layers and their parameters.  This view adds what
pycaffe scripts rely on and a functional torch module does not have:

- **Caffe's graph**: split layers are inserted where a blob feeds several consumers (or
  feeds one and is also a loss), with Caffe's names (``<blob>_<layer>_<i>_split`` and
  tops ``..._split_<k>``), so ``net.blobs``, ``net.layers``, ``net._layer_names``,
  ``top_names``/``bottom_names``, ``inputs`` and ``outputs`` list exactly what Caffe's
  would, in Caffe's order.
- **Blob state**: every blob keeps its data and diff between calls (numpy views the script
  may write into); ``forward`` reads the input blobs as the script left them.
- **Layer-by-layer execution**, as ``Net::ForwardFromTo`` / ``BackwardFromTo``: each layer
  runs on detached copies of its bottoms, so ``forward(start=, end=)`` and
  ``backward(start=, end=)`` work on any range, and ``backward`` takes the *current*
  top diffs (given diffs, or the loss weight Caffe stores in a loss top's diff) and
  writes bottom diffs (overwritten) and parameter diffs (accumulated, cleared only by
  ``clear_param_diffs`` or a solver step), exactly where Caffe's need-backward analysis
  (loss reachability, ``propagate_down``, ``lr_mult: 0``, ``force_backward`` and each
  layer type's ``AllowForceBackward``) says Caffe would.

Nets are built with Python layers allowed: a script that builds a net is already running
the user's code, as pycaffe does.
"""
from __future__ import annotations

import contextlib
import os
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from itertools import zip_longest
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from caffe_compat.pycaffe import _mode
from caffe_compat.pycaffe._blobs import NetBlob, SplitTopBlob, param_blobs, upload_dirty
from caffe_compat.pycaffe.layer import BlobVec, Phase

__all__ = ["Net"]

# Caffe's AllowForceBackward(bottom_index) overrides: LossLayer refuses its label bottom (1)
_NO_FORCE_LABEL = {"SoftmaxWithLoss", "SigmoidCrossEntropyLoss", "InfogainLoss",
                   "MultinomialLogisticLoss", "HingeLoss", "MultiBoxLoss", "RNN", "LSTM"}


def _allow_force_backward(layer_type: str, bottom_index: int) -> bool:
    if layer_type in _NO_FORCE_LABEL:
        return bottom_index != 1
    if layer_type == "ContrastiveLoss":
        return bottom_index != 2
    return True


def split_layer_name(layer: str, blob: str, index: int) -> str:
    """Caffe's name of the split layer after ``layer``'s top ``index`` named ``blob``."""
    return f"{blob}_{layer}_{index}_split"


def split_blob_name(layer: str, blob: str, index: int, k: int) -> str:
    """Caffe's name of that split layer's ``k``-th top."""
    return f"{blob}_{layer}_{index}_split_{k}"


@dataclass
class _Step:
    """One layer of Caffe's (split-augmented) net."""

    name: str
    type: str
    module: Optional[nn.Module]
    bottoms: List[str]
    tops: List[str]
    loss: List[float]
    lp: Any = None                      # LayerParameter (None for splits)
    unbuilt: str = ""
    need_backward: bool = False
    bottom_need: List[bool] = field(default_factory=list)
    param_prop: List[bool] = field(default_factory=list)

    @property
    def kind(self) -> str:
        if self.type == "Split" and self.lp is None:
            return "split"
        if self.type == "Input":
            return "input"
        if self.type == "MemoryData":
            return "memory"
        return "layer"


class LayerView:
    """An entry of ``net.layers``: ``type`` and ``blobs`` as pycaffe's, and for Python layers
    (and native stand-ins such as RoIDataLayer) every other attribute of the layer object,
    so ``net.layers[0].set_roidb(roidb)`` reaches it."""

    def __init__(self, step: _Step, blobs: BlobVec):
        impl = getattr(step.module, "impl", None) if step.type == "Python" else None
        object.__setattr__(self, "_step", step)
        object.__setattr__(self, "_blobs", blobs)
        object.__setattr__(self, "_target", impl if impl is not None else step.module)

    @property
    def type(self) -> str:
        return self._step.type

    @property
    def blobs(self) -> BlobVec:
        return self._blobs

    def set_roidb(self, roidb, *args, **kwargs):
        """py-faster-rcnn's ``RoIDataLayer.set_roidb(roidb)``; the native layer also needs the
        minibatch builder, which defaults to :func:`caffe_compat.roidb.get_minibatch`."""
        target = self._target
        fn = getattr(target, "set_roidb", None)
        if fn is None:
            raise AttributeError(f"layer '{self._step.name}' ({self.type}) has no set_roidb")
        if not args and "get_minibatch" not in kwargs and target is self._step.module:
            import inspect

            try:
                needs = "get_minibatch" in inspect.signature(fn).parameters
            except (TypeError, ValueError):
                needs = False
            if needs:
                from caffe_compat.roidb import get_minibatch

                args = (get_minibatch,)
        return fn(roidb, *args, **kwargs)

    def __getattr__(self, name: str):
        target = object.__getattribute__(self, "_target")
        if target is None:
            raise AttributeError(name)
        return getattr(target, name)

    def __setattr__(self, name: str, value) -> None:
        target = self._target
        if target is None or name in ("type", "blobs"):
            raise AttributeError(f"cannot set '{name}' on layer '{self._step.name}'")
        setattr(target, name, value)

    def __repr__(self) -> str:
        return f"<caffe Layer '{self._step.name}' type={self.type}>"


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RuntimeError(f"Could not open file {path}")
    return path


def _parse_net_args(args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    """pycaffe's two constructors: (file, phase, level=0, stages=None, weights=None) and the
    legacy (file, weights_file, phase)."""
    kwargs = dict(kwargs)
    if args and isinstance(args[0], (str, bytes, os.PathLike)):
        weights = args[0]
        rest = list(args[1:])
        phase = rest.pop(0) if rest else kwargs.pop("phase", None)
        if rest or kwargs or phase is None:
            raise TypeError("Net(network_file, pretrained_file, phase) takes exactly these arguments")
        return Phase.of(phase), 0, None, weights
    names = ["phase", "level", "stages", "weights"]
    values: Dict[str, Any] = {"level": 0, "stages": None, "weights": None}
    if len(args) > len(names):
        raise TypeError(f"Net() takes at most {len(names) + 1} positional arguments")
    for n, v in zip(names, args):
        values[n] = v
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"Net() got an unexpected keyword argument '{k}'")
        if k in dict(zip(names, args)):
            raise TypeError(f"Net() got multiple values for argument '{k}'")
        values[k] = v
    if "phase" not in values:
        raise TypeError("Net() needs a phase: caffe.TRAIN or caffe.TEST")
    return Phase.of(values["phase"]), int(values["level"]), values["stages"], values["weights"]


class Net:
    """pycaffe's ``caffe.Net`` (see the module docstring).

    ``Net(network_file, phase, level=0, stages=None, weights=None)`` or the legacy
    ``Net(network_file, pretrained_file, phase)``.
    """

    def __init__(self, network_file, *args, **kwargs):
        from caffe_compat.net import Net as CoreNet

        phase, level, stages, weights = _parse_net_args(args, kwargs)
        network_file = _check_file(network_file)
        if weights is not None:
            weights = _check_file(weights)
        core = CoreNet(network_file, phase="train" if phase == 0 else "test", level=level,
                       stages=list(stages or ()), allow_python_layers=True,
                       seed=_mode.next_net_seed(), device=_mode.device())
        if weights is not None:
            core.load_weights(weights, allow_missing=True)
        self._attach(core)

    @classmethod
    def from_core(cls, core) -> "Net":
        """A pycaffe view of an existing :class:`caffe_compat.net.Net` (a solver's nets)."""
        obj = cls.__new__(cls)
        obj._attach(core)
        return obj

    # ================================================================== building
    def _attach(self, core) -> None:
        self._core = core
        self._placed = core.device
        self._last_loss = 0.0
        self._records: Dict[int, Tuple[List[Tensor], Tuple[Tensor, ...]]] = {}
        self._memory: Optional[Dict[str, Any]] = None
        self._steps = self._build_steps(core)
        self._analyse_backward(bool(core.net_param.force_backward))
        names: List[str] = []
        blobs: Dict[str, NetBlob] = {}
        shapes = dict(core.blob_shapes)
        for s in self._steps:
            for j, t in enumerate(s.tops):
                if j < len(s.bottoms) and s.bottoms[j] == t:
                    continue  # in place
                if t in blobs:
                    # e.g. an in-place layer on a blob that another layer also reads: the
                    # split renames its bottom, and Caffe refuses the net
                    from caffe_compat.errors import GraphError

                    raise GraphError(f"Top blob '{t}' produced by multiple sources (Caffe's net "
                                     "after split insertion; an in-place layer on a blob that "
                                     "other layers read too?)", layer=s.name)
                names.append(t)
                if s.kind == "split":
                    blobs[t] = SplitTopBlob(blobs[s.bottoms[0]])
                    continue
                shape = shapes.get(t)
                blobs[t] = NetBlob(tuple(shape) if shape is not None else (0,))
        self._blob_names = names
        self._blob_index = {n: i for i, n in enumerate(names)}
        self._blob_list = [blobs[n] for n in names]
        self.blobs: "OrderedDict[str, NetBlob]" = OrderedDict((n, blobs[n]) for n in names)
        loss_weights = {n: 0.0 for n in names}
        for s in self._steps:
            for t, w in zip(s.tops, s.loss):
                loss_weights[t] = float(w)
                if w:
                    blobs[t]._fill(1, float(w))  # Caffe's SetLossWeights: the top's diff holds it
        self._loss_weights = [loss_weights[n] for n in names]
        available: "OrderedDict[str, None]" = OrderedDict()
        inputs: List[int] = []
        for s in self._steps:
            for b in s.bottoms:
                available.pop(b, None)
            for t in s.tops:
                available[t] = None
                if s.kind == "input":
                    inputs.append(self._blob_index[t])
        self._input_ids = inputs
        self._output_ids = [self._blob_index[n] for n in sorted(available)]
        self._layer_list = [LayerView(s, param_blobs(s.module)) for s in self._steps]
        self._layer_names_list = [s.name for s in self._steps]

    def _build_steps(self, core) -> List[_Step]:
        """Caffe's InsertSplits over the filtered net (the core's entries, in order)."""
        from caffe_compat.layers import registry

        lps = list(core.net_param.layer)
        entries = core.entries
        if len(lps) != len(entries):  # pragma: no cover - the core builds one entry per layer
            raise RuntimeError("net definition and built layers disagree")
        last_top: Dict[str, Tuple[int, int]] = {}
        source: Dict[Tuple[int, int], Tuple[int, int]] = {}
        count: Dict[Tuple[int, int], int] = defaultdict(int)
        loss_w: Dict[Tuple[int, int], float] = {}
        for i, lp in enumerate(lps):
            for j, b in enumerate(lp.bottom):
                src = last_top[b]
                source[(i, j)] = src
                count[src] += 1
            for j, t in enumerate(lp.top):
                last_top[t] = (i, j)
            for j in range(min(len(lp.loss_weight), len(lp.top))):
                key = last_top[lp.top[j]]
                loss_w[key] = float(lp.loss_weight[j])
                if loss_w[key]:
                    count[key] += 1
        steps: List[_Step] = []
        split_idx: Dict[Tuple[int, int], int] = defaultdict(int)
        for i, (lp, e) in enumerate(zip(lps, entries)):
            bottoms = list(lp.bottom)
            for j in range(len(bottoms)):
                src = source[(i, j)]
                if count[src] > 1:
                    bottoms[j] = split_blob_name(lps[src[0]].name, lp.bottom[j], src[1], split_idx[src])
                    split_idx[src] += 1
            step = _Step(lp.name, lp.type, e.module, bottoms, list(lp.top), list(e.loss_weights),
                         lp=lp, unbuilt=e.unbuilt_reason)
            steps.append(step)
            for j, t in enumerate(lp.top):
                n = count[(i, j)]
                if n <= 1:
                    continue
                w = loss_w.get((i, j), 0.0)
                tops = [split_blob_name(lp.name, t, j, k) for k in range(n)]
                loss = [w if k == 0 else 0.0 for k in range(n)] if w else [0.0] * n
                steps.append(_Step(split_layer_name(lp.name, t, j), "Split", None, [t], tops, loss))
                if w:
                    # Caffe clears the producer's loss_weight field: a loss layer falls back
                    # to its default (1 on top 0), any other layer to none
                    is_loss = bool(getattr(type(e.module), "is_loss", False)) if e.module is not None \
                        else bool(getattr(registry.resolve(lp), "is_loss", False))
                    step.loss = ([1.0] + [0.0] * (len(lp.top) - 1)) if is_loss else [0.0] * len(lp.top)
                    split_idx[(i, j)] += 1
        return steps

    def _analyse_backward(self, force_backward: bool) -> None:
        """Caffe's Net::Init bookkeeping: which layers, bottoms and params get diffs."""
        steps = self._steps
        blob_need: Dict[str, bool] = {}
        for s in steps:
            need = False
            s.bottom_need = []
            lp = s.lp
            for j, b in enumerate(s.bottoms):
                nb = blob_need.get(b, False)
                need |= nb
                if lp is not None and len(lp.propagate_down):
                    nb = bool(lp.propagate_down[j])
                s.bottom_need.append(nb)
            for j, t in enumerate(s.tops):
                if not (j < len(s.bottoms) and s.bottoms[j] == t):
                    blob_need[t] = False
            n_blobs = len(getattr(s.module, "blob_names", [])) if s.module is not None else 0
            s.param_prop = []
            for k in range(n_blobs):
                spec = lp.param[k] if lp is not None and k < len(lp.param) else None
                lr = spec.lr_mult if spec is not None else 1.0
                s.param_prop.append(lr != 0)
            need |= any(s.param_prop)
            s.need_backward = need
            if need:
                for t in s.tops:
                    blob_need[t] = True
        under_loss: set = set()
        skip_backp: set = set()
        for s in reversed(steps):
            contributes = False
            skip = True
            for t, w in zip(s.tops, s.loss):
                if w or t in under_loss:
                    contributes = True
                if t not in skip_backp:
                    skip = False
                if contributes and not skip:
                    break
            if s.need_backward and skip:
                s.need_backward = False
                s.bottom_need = [False] * len(s.bottoms)
            if not contributes:
                s.need_backward = False
            for j, b in enumerate(s.bottoms):
                if contributes:
                    under_loss.add(b)
                else:
                    s.bottom_need[j] = False
                if not s.bottom_need[j]:
                    skip_backp.add(b)
        if force_backward:
            for s in steps:
                s.need_backward = True
                s.bottom_need = [nb or _allow_force_backward(s.type, j) for j, nb in enumerate(s.bottom_need)]
                s.param_prop = [True] * len(s.param_prop)

    # ================================================================== pycaffe's properties
    @property
    def layers(self) -> List[LayerView]:
        return self._layer_list

    @property
    def _layer_names(self) -> List[str]:
        return self._layer_names_list

    @property
    def _blobs(self) -> List[NetBlob]:
        return self._blob_list

    @property
    def _inputs(self) -> List[int]:
        return list(self._input_ids)

    @property
    def _outputs(self) -> List[int]:
        return list(self._output_ids)

    @property
    def _blob_loss_weights(self) -> List[float]:
        return list(self._loss_weights)

    def _bottom_ids(self, i: int) -> List[int]:
        return [self._blob_index[b] for b in self._steps[i].bottoms]

    def _top_ids(self, i: int) -> List[int]:
        return [self._blob_index[t] for t in self._steps[i].tops]

    @property
    def inputs(self) -> List[str]:
        return [self._blob_names[i] for i in self._input_ids]

    @property
    def outputs(self) -> List[str]:
        return [self._blob_names[i] for i in self._output_ids]

    @property
    def blob_loss_weights(self) -> "OrderedDict[str, float]":
        return OrderedDict(zip(self._blob_names, self._loss_weights))

    @property
    def layer_dict(self) -> "OrderedDict[str, LayerView]":
        return OrderedDict(zip(self._layer_names_list, self._layer_list))

    @property
    def params(self) -> "OrderedDict[str, BlobVec]":
        if not hasattr(self, "_params_dict"):
            self._params_dict = OrderedDict((n, lr.blobs) for n, lr in zip(self._layer_names_list,
                                                                            self._layer_list)
                                            if len(lr.blobs) > 0)
        return self._params_dict

    @property
    def top_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((s.name, list(s.tops)) for s in self._steps)

    @property
    def bottom_names(self) -> "OrderedDict[str, List[str]]":
        return OrderedDict((s.name, list(s.bottoms)) for s in self._steps)

    @property
    def phase(self) -> Phase:
        return Phase.of(self._core.phase)

    @property
    def core(self):
        """The :class:`caffe_compat.net.Net` underneath (a torch module)."""
        return self._core

    # ================================================================== running
    def _device(self) -> torch.device:
        """The mode's device; moves the net there when the mode changed since the last run."""
        want = _mode.device()
        if self._placed != want:
            self._core.to(want)
            self._placed = want
            self._records.clear()
        return want

    def _index(self, layer: Optional[str], default: int) -> int:
        if layer is None:
            return default
        return list(self._layer_names_list).index(layer)

    @contextlib.contextmanager
    def _params_for_grad(self, step: _Step) -> Iterator[List[Tuple[int, nn.Parameter]]]:
        """The step's parameters that get diffs, with requires_grad on for the duration
        (``lr_mult: 0`` freezes a parameter in torch, but force_backward still wants its diff)."""
        out: List[Tuple[int, nn.Parameter]] = []
        flipped: List[nn.Parameter] = []
        if step.module is not None:
            for k, attr in enumerate(step.module.blob_names):
                t = getattr(step.module, attr)
                if k < len(step.param_prop) and step.param_prop[k] and isinstance(t, nn.Parameter):
                    if not t.requires_grad:
                        t.requires_grad_(True)
                        flipped.append(t)
                    out.append((k, t))
        try:
            yield out
        finally:
            for t in flipped:
                t.requires_grad_(False)

    def _forward(self, start: int, end: int) -> float:
        """Caffe's ForwardFromTo (inclusive); returns the loss of the layers run."""
        with self._core.precision():
            return self._forward_steps(start, end)

    def _forward_steps(self, start: int, end: int) -> float:
        n = len(self._steps)
        if not (0 <= start and end < n):
            raise IndexError(f"layer range {start}..{end} outside 0..{n - 1}")
        upload_dirty()
        dev = self._device()
        dtype = self._core.dtype
        cache: Dict[str, Tensor] = {}
        loss = 0.0

        def read(name: str) -> Tensor:
            t = cache.get(name)
            if t is None:
                t = cache[name] = self.blobs[name]._tensor(0, dev, dtype)
            return t

        for i in range(start, end + 1):
            s = self._steps[i]
            kind = s.kind
            if kind == "input":
                continue
            if kind == "split":  # the tops share the bottom's data (SplitTopBlob)
                src = read(s.bottoms[0])
                for t in s.tops:
                    cache[t] = src
                self._records[i] = ([], ())
            else:
                if kind == "memory":
                    outs = self._memory_batch(s, dev, dtype)
                    self._records[i] = ([], outs)
                else:
                    outs = self._run_layer(i, s, read)
                for t, o in zip(s.tops, outs):
                    cache[t] = o.detach()
                    self.blobs[t]._put(0, o)
            for t, w in zip(s.tops, s.loss):
                if w:
                    loss += float(w) * float(cache[t].double().sum())
        self._last_loss = loss
        return loss

    def _run_layer(self, i: int, s: _Step, read) -> Tuple[Tensor, ...]:
        m = s.module
        if m is None:
            from caffe_compat.errors import DataError

            raise DataError(f"layer cannot run: {s.unbuilt}", layer=s.name)
        bottoms: List[Tensor] = []
        for j, b in enumerate(s.bottoms):
            x = read(b).detach()
            if s.need_backward and s.bottom_need[j] and x.is_floating_point():
                x = x.requires_grad_(True)
            bottoms.append(x)
        if s.need_backward:
            with self._params_for_grad(s), torch.enable_grad():
                outs = m(*bottoms)
        else:
            with torch.no_grad():
                outs = m(*bottoms)
        if isinstance(outs, Tensor):
            outs = (outs,)
        outs = tuple(outs)
        if len(outs) != len(s.tops):
            from caffe_compat.errors import GraphError

            raise GraphError(f"produced {len(outs)} tops, expected {len(s.tops)}", layer=s.name)
        self._records[i] = (bottoms, outs) if s.need_backward else ([], ())
        return outs

    def _backward(self, start: int, end: int) -> None:
        """Caffe's BackwardFromTo (``start`` >= ``end``, inclusive)."""
        with self._core.precision():
            self._backward_steps(start, end)

    def _backward_steps(self, start: int, end: int) -> None:
        n = len(self._steps)
        if not (end >= 0 and start < n):
            raise IndexError(f"layer range {start}..{end} outside 0..{n - 1}")
        upload_dirty()
        dev = self._device()
        dtype = self._core.dtype
        for i in range(start, end - 1, -1):
            s = self._steps[i]
            if not s.need_backward or s.kind in ("input", "memory"):
                continue
            if s.kind == "split":
                if s.bottom_need and s.bottom_need[0]:
                    total = None
                    for t in s.tops:
                        d = self.blobs[t]._tensor(1, dev, dtype)
                        total = d.clone() if total is None else total.add_(d)
                    self.blobs[s.bottoms[0]]._put(1, total)
                continue
            self._backward_layer(i, s, dev, dtype)

    def _backward_layer(self, i: int, s: _Step, dev, dtype) -> None:
        rec = self._records.get(i)
        if rec is None:
            raise RuntimeError(f"layer '{s.name}': backward needs a forward pass through it first")
        bottoms, outs = rec
        # Caffe's Backward reads the bottoms as they are now: if one changed since this
        # layer's forward (a later partial forward, a script's write), recompute from it.
        # In-place bottoms hold the layer's own output by design and keep the recording.
        stale = False
        current = list(bottoms)
        for j, b in enumerate(s.bottoms):
            if j < len(s.tops) and s.tops[j] == b:
                continue
            cur = self.blobs[b]._tensor(0, dev, dtype)
            rb = bottoms[j]
            if cur.shape != rb.shape or (cur.data_ptr() != rb.data_ptr() and not torch.equal(cur, rb.detach())):
                stale = True
                x = cur.detach()
                current[j] = x.requires_grad_(True) if rb.requires_grad else x
        if stale:
            with self._params_for_grad(s), torch.enable_grad():
                outs = s.module(*current)
            outs = (outs,) if isinstance(outs, Tensor) else tuple(outs)
            bottoms = current
            self._records[i] = (bottoms, outs)
        pairs = [(o, self.blobs[t]._tensor(1, dev, dtype).reshape(o.shape))
                 for o, t in zip(outs, s.tops) if o.requires_grad]
        targets = [(j, b) for j, b in enumerate(bottoms) if s.bottom_need[j] and b.requires_grad]
        with self._params_for_grad(s) as params:
            if pairs and (targets or params):
                grads = torch.autograd.grad([o for o, _ in pairs], [b for _, b in targets] + [p for _, p in params],
                                            [d for _, d in pairs], retain_graph=True, allow_unused=True)
            else:
                grads = (None,) * (len(targets) + len(params))
        got = {j: g for (j, _), g in zip(targets, grads[:len(targets)])}
        for j, b in enumerate(s.bottoms):
            if not s.bottom_need[j]:
                continue
            g = got.get(j)
            if g is None:
                g = torch.zeros_like(bottoms[j]) if j < len(bottoms) else None
            if g is not None:
                self.blobs[b]._put(1, g)
        with torch.no_grad():
            for (k, p), g in zip(params, grads[len(targets):]):
                if g is None:
                    continue
                if p.grad is None:
                    p.grad = g.detach().clone()
                else:
                    p.grad.add_(g.to(p.grad.dtype))

    def _memory_batch(self, s: _Step, dev, dtype) -> Tuple[Tensor, Tensor]:
        mem = self._memory
        if mem is None:
            raise RuntimeError(f"MemoryDataLayer '{s.name}' needs to be initialized by calling "
                               "set_input_arrays")
        b, pos, n = mem["batch"], mem["pos"], mem["n"]
        data = torch.from_numpy(np.array(mem["data"][pos:pos + b], np.float32, copy=True))
        labels = torch.from_numpy(np.array(mem["labels"][pos:pos + b], np.float32, copy=True).reshape(b))
        mem["pos"] = (pos + b) % n
        return data.to(device=dev, dtype=dtype), labels.to(device=dev, dtype=dtype)

    # ================================================================== pycaffe's methods
    def forward(self, blobs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                end: Optional[str] = None, **kwargs) -> Dict[str, np.ndarray]:
        """Run layers ``start``..``end`` (names, inclusive; default all) after copying the
        given input arrays into the input blobs; returns the output blobs' arrays (live
        views, as pycaffe's), plus those named in ``blobs``."""
        blobs = list(blobs or [])
        start_ind = self._index(start, 0)
        if end is not None:
            end_ind = self._index(end, 0)
            outputs = set(self.top_names[end] + blobs)
        else:
            end_ind = len(self._steps) - 1
            outputs = set(self.outputs + blobs)
        if kwargs:
            if set(kwargs.keys()) != set(self.inputs):
                raise Exception("Input blob arguments do not match net inputs.")
            for name, arr in kwargs.items():
                if np.shape(arr)[0] != self.blobs[name].shape[0]:
                    raise Exception("Input is not batch sized")
                self.blobs[name].data[...] = arr
        self._forward(start_ind, end_ind)
        return {out: self.blobs[out].data for out in outputs}

    def backward(self, diffs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                 end: Optional[str] = None, **kwargs) -> Dict[str, np.ndarray]:
        """Backpropagate from layer ``start`` down to ``end`` (default: all) after copying the
        given output diffs into the output blobs; returns the input blobs' diffs (plus
        those named in ``diffs``)."""
        diffs = list(diffs or [])
        start_ind = self._index(start, len(self._steps) - 1)
        if end is not None:
            end_ind = self._index(end, 0)
            outputs = set(self.bottom_names[end] + diffs)
        else:
            end_ind = 0
            outputs = set(self.inputs + diffs)
        if kwargs:
            if set(kwargs.keys()) != set(self.outputs):
                raise Exception("Top diff arguments do not match net outputs.")
            for name, arr in kwargs.items():
                if np.shape(arr)[0] != self.blobs[name].shape[0]:
                    raise Exception("Diff is not batch sized")
                self.blobs[name].diff[...] = arr
        self._backward(start_ind, end_ind)
        return {out: self.blobs[out].diff for out in outputs}

    def _batch(self, blobs: Dict[str, np.ndarray]) -> Iterator[Dict[str, np.ndarray]]:
        """pycaffe's batching: full batches of the first blob's batch size, the last one
        padded with zeros."""
        num = len(next(iter(blobs.values())))
        batch_size = next(iter(self.blobs.values())).shape[0]
        remainder = num % batch_size
        for b in range(num // batch_size):
            i = b * batch_size
            yield {name: blobs[name][i:i + batch_size] for name in blobs}
        if remainder > 0:
            padded = {}
            for name in blobs:
                padding = np.zeros((batch_size - remainder,) + np.shape(blobs[name])[1:])
                padded[name] = np.concatenate([blobs[name][-remainder:], padding])
            yield padded

    def forward_all(self, blobs: Optional[Sequence[str]] = None, **kwargs) -> Dict[str, np.ndarray]:
        """``forward`` over inputs of any length, in batches; outputs stacked, padding cut."""
        all_outs: Dict[str, list] = {out: [] for out in set(self.outputs + list(blobs or []))}
        if not kwargs:
            outs = self.forward(blobs=blobs)
            return {k: np.asarray(v).copy() for k, v in outs.items()}
        for batch in self._batch(kwargs):
            outs = self.forward(blobs=blobs, **batch)
            for out, arr in outs.items():
                all_outs[out].extend(arr.copy())
        result = {out: np.asarray(v) for out, v in all_outs.items()}
        pad = len(next(iter(result.values()))) - len(next(iter(kwargs.values())))
        if pad:
            result = {out: v[:-pad] for out, v in result.items()}
        return result

    def forward_backward_all(self, blobs: Optional[Sequence[str]] = None,
                             diffs: Optional[Sequence[str]] = None, **kwargs):
        """``forward`` then ``backward`` over batches; returns (outputs, diffs)."""
        all_outs: Dict[str, list] = {out: [] for out in set(self.outputs + list(blobs or []))}
        all_diffs: Dict[str, list] = {d: [] for d in set(self.inputs + list(diffs or []))}
        fwd = {k: kwargs[k] for k in self.inputs if k in kwargs}
        bwd = {k: kwargs[k] for k in self.outputs if k in kwargs}
        fb = self._batch(fwd) if fwd else iter(())
        bb = self._batch(bwd) if bwd else iter(())
        for f, b in zip_longest(fb, bb, fillvalue={}):
            outs = self.forward(blobs=blobs, **f)
            ds = self.backward(diffs=diffs, **b)
            for out, arr in outs.items():
                all_outs[out].extend(arr.copy())
            for d, arr in ds.items():
                all_diffs[d].extend(arr.copy())
        res_o = {k: np.asarray(v) for k, v in all_outs.items()}
        res_d = {k: np.asarray(v) for k, v in all_diffs.items()}
        if kwargs and res_o:
            pad = len(next(iter(res_o.values()))) - len(next(iter(kwargs.values())))
            if pad:
                res_o = {k: v[:-pad] for k, v in res_o.items()}
                res_d = {k: v[:-pad] for k, v in res_d.items()}
        return res_o, res_d

    def reshape(self) -> None:
        """Caffe's Net::Reshape: propagate the input blobs' shapes through every layer."""
        shapes: Dict[str, Tuple[int, ...]] = {}
        for s in self._steps:
            kind = s.kind
            if kind == "input":
                for t in s.tops:
                    shapes[t] = self.blobs[t].shape
                continue
            if kind == "split":
                for t in s.tops:
                    shapes[t] = shapes[s.bottoms[0]]
            elif s.module is None:
                continue
            else:
                bs = [shapes.get(b, self.blobs[b].shape) for b in s.bottoms]
                tops = s.module.infer_top_shapes([tuple(x) for x in bs])
                for t, shp in zip(s.tops, tops):
                    shapes[t] = tuple(int(d) for d in shp)
            for t in s.tops:
                self.blobs[t].reshape(*shapes[t])

    def clear_param_diffs(self) -> None:
        """Zero every learnable parameter's diff."""
        with torch.no_grad():
            for info in self._core.learnable_params():
                if info.param.grad is not None:
                    info.param.grad.zero_()

    def copy_from(self, weights) -> None:
        """Caffe's CopyTrainedLayersFrom: layers named as in the file take its blobs."""
        upload_dirty()
        self._core.load_weights(os.fspath(weights), allow_missing=True)

    def share_with(self, other: "Net") -> None:
        """Caffe's ShareTrainedLayersWith: layers named like ``other``'s use its blobs."""
        core = other._core if isinstance(other, Net) else other
        mine = self._core
        for e in core.entries:
            src = e.module
            if src is None:
                continue
            target = next((x for x in mine.entries if x.name == e.name), None)
            if target is None or target.module is None:
                continue
            dst = target.module
            if len(dst.blob_names) != len(src.blob_names):
                raise RuntimeError(f"Incompatible number of blobs for layer {e.name}")
            for a, b in zip(dst.blob_names, src.blob_names):
                t_src, t_dst = getattr(src, b), getattr(dst, a)
                if tuple(t_src.shape) != tuple(t_dst.shape):
                    raise RuntimeError(f"Cannot share param {a} weights from layer '{e.name}'; shape "
                                       f"mismatch.  Source param shape is {tuple(t_src.shape)}; target "
                                       f"param shape is {tuple(t_dst.shape)}")
                if a in dst._parameters:
                    dst._parameters[a] = t_src
                else:
                    dst._buffers[a] = t_src
        for key, info in mine.param_infos.items():  # keep the solver's parameter list current
            prefix, attr = key.rsplit(".", 1)
            module = mine._modules.get(prefix)
            if module is not None and module._parameters.get(attr) is not None:
                info.param = module._parameters[attr]

    def save(self, filename) -> None:
        """Write the weights as a .caffemodel (.pt/.safetensors by extension)."""
        upload_dirty()
        self._core.save_weights(os.fspath(filename))

    def save_hdf5(self, filename) -> None:
        """Caffe's ``ToHDF5``: the weights in Caffe's HDF5 layout, whatever the file is named."""
        from caffe_compat.hdf5_format import save_hdf5

        upload_dirty()
        save_hdf5(self._core, os.fspath(filename))

    def load_hdf5(self, filename) -> None:
        """Caffe's ``CopyTrainedLayersFromHDF5``, whatever the file is named: layers named as
        in the file take its blobs (others keep theirs, as ``copy_from``)."""
        from caffe_compat.hdf5_format import load_hdf5_into

        upload_dirty()
        load_hdf5_into(self._core, os.fspath(filename), allow_missing=True)

    def set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Feed a MemoryData first layer: ``data`` (N, C, H, W) float32 and ``labels`` (N,),
        both C-contiguous; each forward takes the next batch (the arrays are not copied)."""
        if labels.ndim == 1:
            labels = np.ascontiguousarray(labels[:, np.newaxis, np.newaxis, np.newaxis])
        return self._set_input_arrays(data, labels)

    def _set_input_arrays(self, data: np.ndarray, labels: np.ndarray) -> None:
        s = self._steps[0] if self._steps else None
        if s is None or s.kind != "memory":
            raise RuntimeError("set_input_arrays may only be called if the first layer is a "
                               "MemoryDataLayer")
        p = s.lp.memory_data_param
        c, h, w, b = int(p.channels), int(p.height), int(p.width), int(p.batch_size)
        for arr, name, dims in ((data, "data array", (c, h, w)), (labels, "labels array", (1, 1, 1))):
            if not isinstance(arr, np.ndarray) or not arr.flags["C_CONTIGUOUS"]:
                raise RuntimeError(f"{name} must be C contiguous")
            if arr.ndim != 4:
                raise RuntimeError(f"{name} must be 4-d")
            if arr.dtype != np.float32:
                raise RuntimeError(f"{name} must be float32")
            for axis, what in zip(range(1, 4), ("number of channels", "height", "width")):
                if arr.shape[axis] != dims[axis - 1]:
                    raise RuntimeError(f"{name} has wrong {what}")
        if data.shape[0] != labels.shape[0]:
            raise RuntimeError("data and labels must have the same first dimension")
        if data.shape[0] % b != 0:
            raise RuntimeError("first dimensions of input arrays must be a multiple of batch size")
        self._memory = {"data": data, "labels": labels, "pos": 0, "n": int(data.shape[0]), "batch": b}

    # ================================================================== solver support
    def _has_loss(self) -> bool:
        return any(w for s in self._steps for w in s.loss)

    def _publish_to_core(self) -> None:
        """Mirror the last forward's outputs and loss into the core (the solver's log reads
        ``net.blobs`` of the outputs and ``net.loss``)."""
        core = self._core
        dev = core.device
        core.blobs = OrderedDict((n, self.blobs[n]._tensor(0, dev, core.dtype))
                                 for n in core.output_names if n in self.blobs)
        core.loss = torch.tensor(self._last_loss, dtype=torch.float32) if self._has_loss() else None

    def _sync_from_core(self) -> None:
        """Take the core's last forward (a solver test pass) into the blobs."""
        core = self._core
        for n, t in core.blobs.items():
            b = self.blobs.get(n)
            if b is not None and not self._is_input(n):
                b._put(0, t)
        self._records.clear()

    def _is_input(self, name: str) -> bool:
        i = self._blob_index.get(name)
        return i is not None and i in self._input_ids

    def _feed_tensors(self) -> Dict[str, Tensor]:
        """Input blobs (and a MemoryData batch) as the core net's feed."""
        dev, dtype = self._core.device, self._core.dtype
        feed: Dict[str, Tensor] = {}
        for i in self._input_ids:
            n = self._blob_names[i]
            if n in self._core.input_names:
                feed[n] = self.blobs[n]._tensor(0, dev, dtype)
        for s in self._steps:
            if s.kind == "memory" and self._memory is not None:
                for t, v in zip(s.tops, self._memory_batch(s, dev, dtype)):
                    feed[t] = v
        return feed

    def __repr__(self) -> str:
        return (f"<caffe Net '{self._core.net_name}' phase={self.phase} layers={len(self._steps)} "
                f"blobs={len(self._blob_names)}>")
