"""pycaffe's ``caffe.Net``: Caffe's Python API over a :class:`caffe_compat.net.Net`.

The core net does the work: Caffe's graph with its split layers and Net::Init's
need-backward analysis (``core.caffe_steps``), ``ForwardFromTo``/``BackwardFromTo`` layer
by layer on the data and diffs its blobs hold (``core.blobs``, ``core.diffs``), backward
without a forward first.  This view only maps pycaffe's API onto it:

- ``net.blobs``: one :class:`~caffe_compat.pycaffe._blobs.NetBlob` per Caffe blob (a split
  top's data is its source's), whose ``data``/``diff`` are numpy arrays a script may hold
  and write into.  What the script wrote goes to the core before each run (``_push``), the
  core's results come back after it (``_pull``).
- ``net.params``, ``net.layers``, ``_layer_names``, ``top_names``/``bottom_names``,
  ``inputs``/``outputs``, ``blob_loss_weights``: read off the core's steps, in Caffe's order.
- ``forward``/``backward`` (pycaffe.py's argument handling), ``_forward``/``_backward``
  (_caffe.cpp's), ``forward_all``/``forward_backward_all``, ``reshape``, net surgery
  (``copy_from``, ``share_with``, ``save``...), ``set_input_arrays`` (MemoryData).

Nets are built with Python layers allowed: a script that builds a net is already running
the user's code, as pycaffe does.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from itertools import zip_longest
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.inputs import as_blob_array
from caffe_compat.insert_splits import Step
from caffe_compat.pycaffe import _mode
from caffe_compat.pycaffe._blobs import NetBlob, SplitTopBlob, bump_held_params, param_blobs, upload_dirty
from caffe_compat.pycaffe.layer import BlobVec, Phase

__all__ = ["Net"]


class LayerView:
    """An entry of ``net.layers``: ``type`` and ``blobs`` as pycaffe's, and for Python layers
    (and native stand-ins such as RoIDataLayer) every other attribute of the layer object,
    so ``net.layers[0].set_roidb(roidb)`` reaches it."""

    def __init__(self, step: Step, blobs: BlobVec):
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
        minibatch builder, which defaults to :func:`caffe_compat.frcnn.roidb.get_minibatch`."""
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
                from caffe_compat.frcnn.roidb import get_minibatch

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
        self._memory: Optional[Dict[str, Any]] = None
        self._steps: List[Step] = core.caffe_steps  # refuses what Caffe's InsertSplits refuses
        names: List[str] = []
        blobs: Dict[str, NetBlob] = {}
        for s in self._steps:
            for j, t in enumerate(s.tops):
                if s.in_place(j):
                    continue
                names.append(t)
                if s.is_split:
                    blobs[t] = SplitTopBlob(blobs[s.bottoms[0]])
                    continue
                shape = core.blob_shapes.get(t)
                blobs[t] = NetBlob(tuple(shape) if shape is not None else (0,))
        self._blob_names = names
        self._blob_index = {n: i for i, n in enumerate(names)}
        self._blob_list = [blobs[n] for n in names]
        self.blobs: "OrderedDict[str, NetBlob]" = OrderedDict((n, blobs[n]) for n in names)
        loss_weights = {n: 0.0 for n in names}
        for s in self._steps:
            for t, w in zip(s.tops, s.loss_weights):
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
                if s.type == "Input":
                    inputs.append(self._blob_index[t])
        self._input_ids = inputs
        self._output_ids = [self._blob_index[n] for n in sorted(available)]
        self._layer_list = [LayerView(s, param_blobs(s.module)) for s in self._steps]
        self._layer_names_list = [s.name for s in self._steps]
        # the core tensors each blob last exchanged with the core (data, diff)
        self._seen: Tuple[Dict[str, Tensor], Dict[str, Tensor]] = ({}, {})
        self._pull()

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

    # ================================================================== core exchange
    def _device(self) -> torch.device:
        """The mode's device; moves the net there when the mode changed since the last run."""
        want = _mode.device()
        if self._placed != want:
            self._core.to(want)
            self._placed = want
        return want

    def _push(self) -> None:
        """Hand the core what the script changed in the blobs (and the device edits of
        parameters): an array handed out and now holding other values, a blob reshaped."""
        upload_dirty()
        dev = self._device()
        core = self._core
        bump_held_params(e.module for e in core.entries if e.module is not None)
        dtype = core.dtype
        feed: Dict[str, Tensor] = {}
        for n, blob in self.blobs.items():
            for k, store in ((0, core.blobs), (1, core.diffs)):
                if k == 0 and isinstance(blob, SplitTopBlob) and blob.shared:
                    continue  # the source blob's data
                if not self._changed(n, blob, k, store.get(n)):
                    continue
                t = blob._tensor(k, dev, dtype)
                self._seen[k][n] = t
                if k == 0 and n in core.input_names:
                    feed[n] = t
                else:
                    store[n] = t
        if feed:
            core.feed(**feed)
            for n in feed:  # feed may convert (channels-last): that tensor is the core's
                self._seen[0][n] = core.blobs[n]

    def _changed(self, name: str, blob: NetBlob, k: int, cur: Optional[Tensor]) -> bool:
        """Whether blob ``name``'s data (k=0) or diff (k=1) differs from the core's ``cur``."""
        pending, arr = blob._current(k)
        if pending is not None:  # the core's tensor, or a reshaped view of it
            return pending is not self._seen[k].get(name)
        if cur is None:  # the core has its default: zeros of the blob's shape (or a loss weight)
            return blob._handed[k] or (k == 0 and arr.shape != self._core.blob_shapes.get(name))
        if tuple(cur.shape) != arr.shape:
            return True
        if not blob._handed[k]:
            return False  # unchanged since it came from the core
        cpu32 = cur.device.type == "cpu" and cur.dtype == torch.float32
        return not (cpu32 and torch.equal(cur.detach(), torch.from_numpy(arr)))

    def _pull(self) -> None:
        """Take the core's new data and diffs into the blobs (copied into arrays the script
        holds, else kept as tensors until asked for)."""
        core = self._core
        for n, blob in self.blobs.items():
            if not (isinstance(blob, SplitTopBlob) and blob.shared):
                t = core.blobs.get(n)
                if t is not None and t is not self._seen[0].get(n):
                    blob._put(0, t)
                    self._seen[0][n] = t
            d = core.diffs.get(n)
            if d is not None and d is not self._seen[1].get(n):
                blob._put(1, d)
                self._seen[1][n] = d

    def _feed_memory(self, start: int, end: int) -> None:
        """The next batch of ``set_input_arrays``' arrays for a MemoryData layer in the range."""
        for i in range(start, end + 1):
            s = self._steps[i]
            if s.type != "MemoryData":
                continue
            mem = self._memory
            if mem is None:
                raise RuntimeError(f"MemoryDataLayer '{s.name}' needs to be initialized by calling "
                                   "set_input_arrays")
            b, pos, n = mem["batch"], mem["pos"], mem["n"]
            data = torch.from_numpy(np.array(mem["data"][pos:pos + b], np.float32, copy=True))
            labels = torch.from_numpy(np.array(mem["labels"][pos:pos + b], np.float32, copy=True).reshape(b))
            mem["pos"] = (pos + b) % n
            dev, dtype = self._core.device, self._core.dtype
            self._core.feed(**{t: v.to(device=dev, dtype=dtype) for t, v in zip(s.tops, (data, labels))})

    def _sync_to_core(self) -> Dict[str, Tensor]:
        """Before the core runs this net whole (a solver's test pass): the blobs and the
        MemoryData batch handed over; returns the (empty) feed."""
        self._push()
        if self._steps:
            self._feed_memory(0, len(self._steps) - 1)
        return {}

    # ================================================================== running
    def _index(self, layer: Optional[str], default: int) -> int:
        if layer is None:
            return default
        return list(self._layer_names_list).index(layer)

    def _forward(self, start: int, end: int) -> float:
        """pycaffe's ``_forward(start, end)``: Caffe's ForwardFromTo (inclusive) in the core;
        returns the loss of the layers run."""
        n = len(self._steps)
        if not (0 <= start and end < n):
            raise IndexError(f"layer range {start}..{end} outside 0..{n - 1}")
        if start > end:  # Caffe's loop runs nothing
            return 0.0
        self._push()
        self._feed_memory(start, end)
        self._core.forward(start=start, end=end)
        for s in self._steps[start:end + 1]:
            if s.is_split:  # Caffe's SplitLayer::Forward: ShareData from now on
                for t in s.tops:
                    self.blobs[t].share()
        self._pull()
        loss = self._core.loss
        return 0.0 if loss is None else float(loss)

    def _backward(self, start: int, end: int) -> None:
        """pycaffe's ``_backward(start, end)``: Caffe's BackwardFromTo (``start`` >= ``end``)
        in the core, from the diffs the blobs hold now (no forward needed first)."""
        n = len(self._steps)
        if not (end >= 0 and start < n):
            raise IndexError(f"layer range {start}..{end} outside 0..{n - 1}")
        if start < end:  # Caffe's loop runs nothing
            return
        self._push()
        self._core.backward(start=start, end=end)
        self._pull()

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
                arr = as_blob_array(name, arr)  # strings, objects, complex: one InputError
                if arr.ndim == 0 or arr.shape[0] != self.blobs[name].shape[0]:
                    raise Exception("Input is not batch sized")
                self.blobs[name].data[...] = arr
        self._forward(start_ind, end_ind)
        return {out: self.blobs[out].data for out in outputs}

    def backward(self, diffs: Optional[Sequence[str]] = None, start: Optional[str] = None,
                 end: Optional[str] = None, **kwargs) -> Dict[str, np.ndarray]:
        """Backpropagate from layer ``start`` down to ``end`` (default: all) after copying the
        given output diffs into the output blobs; returns the input blobs' diffs (plus
        those named in ``diffs``).  Like Caffe's, it runs on what the blobs hold, with or
        without a forward first."""
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
        """Caffe's Net::Reshape: the input blobs' shapes through every layer (in the core)."""
        core = self._core
        shapes = {n: self.blobs[n].shape for n in core.input_names if n in self.blobs}
        for n, s in core.reshape(**shapes).items():
            blob = self.blobs.get(n)
            if s is not None and blob is not None and not isinstance(blob, SplitTopBlob):
                blob.reshape(*s)

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
        from caffe_compat.weights.hdf5 import save_hdf5

        upload_dirty()
        save_hdf5(self._core, os.fspath(filename))

    def load_hdf5(self, filename) -> None:
        """Caffe's ``CopyTrainedLayersFromHDF5``, whatever the file is named: layers named as
        in the file take its blobs (others keep theirs, as ``copy_from``)."""
        from caffe_compat.weights.hdf5 import load_hdf5_into

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
        if s is None or s.type != "MemoryData":
            raise RuntimeError("set_input_arrays may only be called if the first layer is a "
                               "MemoryDataLayer")
        p = s.param.memory_data_param
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

    def __repr__(self) -> str:
        return (f"<caffe Net '{self._core.net_name}' phase={self.phase} layers={len(self._steps)} "
                f"blobs={len(self._blob_names)}>")
