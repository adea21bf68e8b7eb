"""The net interpreter: a Caffe net definition as an executable ``torch.nn.Module``.

Caffe's ``Net::Init`` in Python terms: filter layers by the net state, resolve each layer's
implementation through the registry, wire bottoms to tops by name (in-place tops rebind
the name, so every op is out of place and autograd sees a plain DAG), compute every blob's
shape at build time, share parameters by ``param { name }`` and keep each parameter's
``lr_mult``/``decay_mult`` for the solver.  Gradient summing for blobs read by several
layers (Caffe's split layers) is what autograd does anyway.

The builder knows nothing about individual layer types: it only uses the Layer contract
(``caffe_compat.layers.base``).
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from caffe_compat.errors import (CaffeCompatError, DataError, GraphError, LimitError, SchemaError,
                                 ShapeError, UnknownLayerError, name_list, shorten)
from caffe_compat.forward_backward import LayerRef, Record, backward_from_to, forward_from_to, step_index
from caffe_compat.fuse import fold_batchnorm_into_conv
from caffe_compat import inference_plan
from caffe_compat.insert_splits import Step, insert_splits, mark_need_backward
from caffe_compat.host_sync import DeferredChecks
from caffe_compat.io import read_net_text
from caffe_compat.layers import registry
from caffe_compat.layers.base import TEST, TRAIN, BuildContext, Layer, Shape
from caffe_compat import limits
from caffe_compat.net_state import filter_net, make_state
from caffe_compat.precision import pass_settings
from caffe_compat.protos import caffe_pb2

log = logging.getLogger(__name__)

ModelSource = Union[str, "os.PathLike[str]", "caffe_pb2.NetParameter"]


@dataclass
class ParamInfo:
    """A learnable blob as the solver sees it (Caffe's ``learnable_params_`` entry)."""

    key: str            # state-dict key of the owner, ``<layer>.<attr>``
    param: nn.Parameter
    lr_mult: float = 1.0
    decay_mult: float = 1.0


@dataclass
class LayerEntry:
    """One layer of the built net and its wiring."""

    name: str
    type: str
    module: Optional[Layer]         # None when its bottom shapes are unknown (data absent)
    bottoms: List[str]
    tops: List[str]
    loss_weights: List[float]
    propagate_down: List[bool]
    unbuilt_reason: str = ""


def _is_path(x) -> bool:
    return isinstance(x, (str, os.PathLike))


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the duration (as it was before, after).

    A build makes about fifteen containers a layer and no garbage cycles; the collector's
    passes over everything built so far were a third of a large net's build time."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _names(names) -> str:
    return name_list(names, limit=20)


#: BlobProto fields that hold data (bounded by the file that holds them, not counted here)
_BLOB_DATA = frozenset(("data", "diff", "double_data", "double_diff"))


def _check_lists(msg, layer: str, path: str, max_len: int) -> None:
    """Every repeated field under ``msg`` within ``max_len`` values, every BlobShape within
    Caffe's 32 axes (the parsed definition is walked once: linear in its size)."""
    is_blob = msg.DESCRIPTOR.name == "BlobProto"
    for fd, value in msg.ListFields():
        if is_blob and fd.name in _BLOB_DATA:
            continue
        where = f"{path}{fd.name}"
        if _is_repeated(fd):
            n = len(value)
            if fd.name == "dim" and msg.DESCRIPTOR.name == "BlobShape" and n > limits.MAX_BLOB_AXES:
                raise ShapeError(f"{where} has {n} dims; Caffe allows at most {limits.MAX_BLOB_AXES} "
                                 "axes (kMaxBlobAxes)", layer=layer)
            if n > max_len:
                raise LimitError(f"{where} has {n} values, over the limit of {max_len} "
                                 f"({limits.how_to_raise('max_list_length')})", layer=layer)
            if fd.message_type is not None:
                for i, v in enumerate(value):
                    _check_lists(v, layer, f"{where}[{i}].", max_len)
        elif fd.message_type is not None:
            _check_lists(value, layer, f"{where}.", max_len)


def _is_repeated(fd) -> bool:
    rep = getattr(fd, "is_repeated", None)  # protobuf >= 5; older ones have only ``label``
    return bool(rep) if rep is not None else fd.label == fd.LABEL_REPEATED


def check_definition(param: "caffe_pb2.NetParameter", where: Optional[str] = None) -> None:
    """Refuse a definition whose counts are over ``caffe_compat.limits`` before anything is
    built: its layers (``max_layers``), the length of every list in a layer (tops, bottoms,
    param specs, blobs, include rules, dims... ``max_list_length``) and the axes of every
    declared shape (Caffe's 32).  Building is linear in all of them; these bound it."""
    n_layers = len(param.layer) + len(param.layers)
    limit = limits.get("max_layers")
    if n_layers > limit:
        raise LimitError(f"the net has {n_layers} layers, over the limit of {limit} "
                         f"({limits.how_to_raise('max_layers')})", where=where)
    max_len = limits.get("max_list_length")
    for field in ("input", "input_shape", "input_dim"):
        n = len(getattr(param, field))
        if n > max_len:
            raise LimitError(f"{field} has {n} values, over the limit of {max_len} "
                             f"({limits.how_to_raise('max_list_length')})", where=where)
    for shape in param.input_shape:
        _check_lists(shape, "", "input_shape.", max_len)
    for idx, lp in enumerate(param.layer):
        _check_lists(lp, shorten(lp.name) or f"#{idx}", "", max_len)


class Net(nn.Module):
    """A Caffe net, built for one phase (``"train"`` or ``"test"``), as a torch module.

    ``forward(**inputs)`` returns Caffe's net outputs (blobs no layer consumes) as a dict;
    afterwards ``net.blobs`` holds every blob in Caffe's order and ``net.loss`` the weighted
    sum of loss tops (``None`` if the net has no loss).  Tensors given as inputs are used as
    they are (no copy, no detach), so autograd flows back to them.

    ``forward(start=, end=)`` and ``backward(start=, end=)`` are Caffe's ``ForwardFromTo`` /
    ``BackwardFromTo``: layer by layer on what the blobs hold (``net.blobs``, ``net.diffs``),
    over Caffe's graph with its split layers (``net.caffe_steps``); see
    :mod:`caffe_compat.forward_backward`.

    ``context`` is handed to every layer as ``BuildContext.extra``: settings a layer
    family reads once, when it is built (``{"frcnn_cfg": cfg}``: py-faster-rcnn's config).

    Fast by default: a whole-net ``forward`` of a TEST net on the CPU with grad off
    (``torch.no_grad()`` / ``torch.inference_mode()``) runs its 2-D convolutions in NHWC
    layout with prepacked oneDNN weights, folding BatchNorm/Scale and fusing ReLU where
    those overwrite the convolution's top in place (:mod:`caffe_compat.inference_plan`):
    Caffe's numbers (fp32 rounding only) and ``net.blobs`` names and values stay, the
    parameters are not touched.  ``exact_layout=True`` (or ``net.exact_layout = True``)
    keeps the plain layer-by-layer NCHW path.
    """

    def __init__(self, model: ModelSource, weights: Optional[str] = None, phase: str = "test", *,
                 level: Optional[int] = None, stages: Iterable[str] = (),
                 allow_python_layers: Optional[bool] = None, allow_missing: bool = False,
                 input_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                 seed: Optional[int] = None, device=None, allow_tf32: bool = False, schema=None,
                 context: Optional[Mapping[str, Any]] = None, exact_layout: bool = False):
        super().__init__()
        #: True keeps the layer-by-layer NCHW path for grad-free TEST forwards too (the
        #: default runs :mod:`caffe_compat.inference_plan` there); settable at any time
        self.exact_layout = bool(exact_layout)
        #: on CUDA, let cuDNN time its algorithms once per shape and keep the fastest (fp32
        #: either way; False keeps torch's heuristic choice); settable at any time
        self.cudnn_autotune = True
        from caffe_compat.io import active_schema
        from caffe_compat.proto_schema import as_schema, use_schema

        #: a fork's caffe.proto added to the schema (``schema=PATH``), or None
        self.schema = as_schema(schema) or active_schema()
        with use_schema(self.schema):
            self._init(model, weights, phase, level=level, stages=stages,
                       allow_python_layers=allow_python_layers, allow_missing=allow_missing,
                       input_shapes=input_shapes, seed=seed, device=device, allow_tf32=allow_tf32,
                       context=context)

    def _init(self, model, weights, phase, *, level, stages, allow_python_layers, allow_missing,
              input_shapes, seed, device, allow_tf32, context) -> None:
        #: Caffe's fp32 has no TF32; True lets cuDNN/cuBLAS use it (faster, ~1e-3 relative).
        self.allow_tf32 = bool(allow_tf32)
        if isinstance(model, caffe_pb2.NetParameter):
            from caffe_compat.upgrade import upgrade_net

            param, self.source = upgrade_net(model, source="<NetParameter>"), None
        elif _is_path(model):
            param = read_net_text(model)
            self.source = os.fspath(model) if os.path.exists(os.fspath(model)) else None
        else:
            raise TypeError(f"model must be a path, prototxt text or NetParameter, not {type(model)}")
        try:  # counts it declares, before anything is built
            check_definition(param, self.source)
        except CaffeCompatError as e:
            raise self._located(e) from None
        state = make_state(param, phase, level, stages)
        self.state = state
        self.phase = TRAIN if state.phase == caffe_pb2.TRAIN else TEST
        self.net_param = filter_net(param, state)
        self.net_name = param.name
        if allow_python_layers is None:
            allow_python_layers = os.environ.get("CAFFE_COMPAT_ALLOW_PYTHON_LAYERS", "") not in ("", "0")
        gen = torch.Generator()
        gen.manual_seed(0 if seed is None else int(seed))
        self._ctx = BuildContext(
            phase=self.phase, generator=gen,
            source_dir=os.path.dirname(os.path.abspath(self.source)) if self.source else os.getcwd(),
            allow_python_layers=bool(allow_python_layers),
            stages=tuple(state.stage), level=int(state.level), extra=dict(context or {}),
            source=self.source, budget=limits.NetBudget())
        self._input_overrides = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
        self._fed: Dict[str, Tensor] = {}
        self.memory_format = torch.contiguous_format
        self.blobs: "OrderedDict[str, Tensor]" = OrderedDict()
        #: Caffe's blob diffs, by Caffe's blob names (split tops included): what
        #: ``backward(start=, end=)`` reads as top diffs and writes as bottom diffs
        self.diffs: Dict[str, Tensor] = {}
        self.loss: Optional[Tensor] = None
        self._records: Dict[int, Record] = {}   # each step's last layer-by-layer forward
        self._layerwise = False                 # the last forward ran layer by layer
        self._steps_key: Optional[tuple] = None
        try:
            with _collector_paused():
                self._build()
        except CaffeCompatError as e:
            located = self._located(e)
            if located is e:
                raise
            raise located from None
        #: layers' validity checks, settled once at the end of a forward on an accelerator
        self.checks = DeferredChecks()
        for e in self.entries:
            if e.module is not None:
                e.module.checks = self.checks
        unknown = [k for k in self._input_overrides if k not in self.input_names]
        if unknown:  # after the build: only then are the net's inputs known
            shown = ", ".join(repr(k[:80]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise GraphError(f"input shape given for {shown}, which is not an input of this net; its "
                             f"inputs are: {', '.join(self.input_names[:20]) or 'none'}"
                             + (" ..." if len(self.input_names) > 20 else ""), where=self.source)
        self.train(self.phase == TRAIN)
        if device is not None:
            self.to(device)
        if weights is not None:
            self.load_weights(weights, allow_missing=allow_missing)

    def _located(self, e: CaffeCompatError) -> CaffeCompatError:
        """``e`` naming the prototxt line of its layer (or the file, when the layer is not
        written there, e.g. the Input layer an upgrade made)."""
        if e.where is None and e.layer and self.source:
            from caffe_compat.io import locate_layer

            return e.located(where=locate_layer(self.source, e.layer) or self.source)
        return e

    def __setattr__(self, name: str, value) -> None:
        # Layer names live in _modules and may equal the net's own attributes ('loss',
        # 'blobs', ...): the net's plain attributes must not collide with them.
        mods = self.__dict__.get("_modules")
        if mods is not None and name in mods and not isinstance(value, nn.Module):
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        self.entries: List[LayerEntry] = []
        self.blob_names: List[str] = []
        self.blob_shapes: Dict[str, Optional[Shape]] = {}
        self.input_names: List[str] = []
        self.param_infos: "OrderedDict[str, ParamInfo]" = OrderedDict()
        self._share_owner: Dict[str, Tuple[str, str]] = {}
        shapes: Dict[str, Optional[Shape]] = {}
        available: "OrderedDict[str, None]" = OrderedDict()
        seen_names = set()
        next_suffix: Dict[str, int] = {}  # per name, the next '_k' to try: duplicates stay linear
        budget = self._ctx.budget
        force_backward = self.net_param.force_backward
        self._check_types()
        fork_lp = self.schema.LayerParameter if self.schema is not None else None
        for idx, lp in enumerate(self.net_param.layer):
            if fork_lp is not None:  # the fork's own fields come back from unknown fields
                lp = fork_lp.FromString(lp.SerializeToString())
            name = lp.name or f"{lp.type.lower() or 'layer'}{idx}"
            key = name
            if key in seen_names:  # Caffe allows duplicate names (the last one wins lookups)
                k = next_suffix.get(name, 1)
                while f"{name}_{k}" in seen_names:  # each name is skipped once: linear in all
                    k += 1
                key = f"{name}_{k}"
                next_suffix[name] = k + 1
            seen_names.add(key)
            bottoms, tops = list(lp.bottom), list(lp.top)  # read once: each access builds a view
            for b in bottoms:
                if b not in shapes:
                    raise GraphError(f"unknown bottom blob '{shorten(b)}' (no earlier layer produces it; "
                                     f"known blobs: {_names(shapes) or 'none'})", layer=name)
            bottom_shapes = [shapes[b] for b in bottoms]
            cls = registry.resolve(lp)
            module: Optional[Layer] = None
            reason = ""
            if any(s is None for s in bottom_shapes):
                unknown = [b for b in bottoms if shapes[b] is None]
                reason = f"shape of bottom(s) {_names(unknown)} unknown (data source absent?)"
                top_shapes: List[Optional[Shape]] = [None] * len(tops)
            else:
                module = cls(lp, [tuple(s) for s in bottom_shapes], self._ctx)
                if module.name != name:
                    module.name = name
                top_shapes = self._infer(module, bottom_shapes, name)
            if len(top_shapes) != len(tops):
                raise GraphError(f"{shorten(lp.type)} produced {len(top_shapes)} tops but the definition "
                                 f"names {len(tops)}", layer=name)
            from_nothing = module is not None and not bottoms and not module.blob_names
            for i, (t, ts) in enumerate(zip(tops, top_shapes)):
                if ts is None:
                    continue
                # a definition may declare absurd shapes: refuse, don't allocate
                budget.check(ts, what=f"top '{shorten(t)}'", layer=name)
                if from_nothing:  # a forward makes these (inputs, data layers): charge them
                    budget.charge(ts, what=f"top '{shorten(t)}'", layer=name, key=(id(module), "top", i))
            bottom_set = set(bottoms)
            for i, t in enumerate(tops):
                in_place = i < len(bottoms) and bottoms[i] == t
                if t in shapes and not in_place:
                    if t in bottom_set:
                        raise GraphError(f"top '{shorten(t)}' is an in-place top at the wrong position "
                                         "(Caffe pairs top i with bottom i)", layer=name)
                    raise GraphError(f"top blob '{shorten(t)}' is produced by more than one layer",
                                     layer=name)
                if t not in shapes:
                    self.blob_names.append(t)
                shapes[t] = top_shapes[i]
            for b in bottoms:
                available.pop(b, None)
            for t in tops:
                available[t] = None
            if module is not None and module.accepts_feed:
                self.input_names.extend(tops)
            # loss weights: Caffe's SetLossWeights
            loss_weight, propagate_down = lp.loss_weight, lp.propagate_down
            if len(loss_weight):
                if len(loss_weight) != len(tops):
                    raise SchemaError(f"loss_weight must be given once per top ({len(tops)}), "
                                      f"got {len(loss_weight)}", layer=name)
                weights = [float(w) for w in loss_weight]
            elif getattr(cls, "is_loss", False):
                weights = [1.0] + [0.0] * (len(tops) - 1)
            else:
                weights = [0.0] * len(tops)
            if len(propagate_down) and len(propagate_down) != len(bottoms):
                raise SchemaError(f"propagate_down must be given once per bottom ({len(bottoms)}), "
                                  f"got {len(propagate_down)}", layer=name)
            prop = [bool(p) for p in propagate_down] if len(propagate_down) else [True] * len(bottoms)
            entry = LayerEntry(name, lp.type, module, bottoms, tops, weights, prop, reason)
            self.entries.append(entry)
            if module is not None:
                # bypass add_module's name checks: Caffe names may contain '.' or shadow
                # nn.Module attributes; state-dict keys stay '<layer>.<param>'.
                self._modules[key] = module
                if module.blob_names:
                    self._register_params(module, lp, key)
                elif len(lp.param):
                    raise SchemaError(f"{len(lp.param)} param specs given but the layer has 0 blobs",
                                      layer=name)
        for info in self.param_infos.values():  # once all sharers have said their lr_mult
            if info.lr_mult == 0:
                info.param.requires_grad_(False)
        self.blob_shapes = shapes
        # Caffe's net outputs: blobs still available at the end, in std::set (sorted) order
        self.output_names: List[str] = sorted(available)
        self._by_name = {e.name: e for e in self.entries}
        del force_backward
        self.warnings = self._lint()

    def _check_types(self) -> None:
        """Every layer type without an implementation, named at once (not one per run)."""
        from caffe_compat.unknowns import Unknowns

        found = Unknowns()
        for idx, lp in enumerate(self.net_param.layer):
            if lp.type == "Python":
                continue
            if not registry.is_registered(lp.type):
                found.types.append((lp.type, lp.name or f"#{idx}", 0))
        if len(found.types) == 1:
            registry.lookup(found.types[0][0], layer=found.types[0][1])  # near-match hints
        if found:
            raise UnknownLayerError(found.message())

    def _lint(self) -> List[str]:
        """Each layer's own wiring warnings (``Layer.lint``), logged once and kept in
        ``net.warnings``."""
        producer: Dict[str, str] = {}
        found: List[str] = []
        for e in self.entries:
            if e.module is not None:
                for w in e.module.lint([producer.get(b) for b in e.bottoms]):
                    found.append(f"layer '{e.name}': {w}")
                    log.warning("%s", found[-1])
            for t in e.tops:
                producer[t] = e.type
        return found

    def _infer(self, module: Layer, bottom_shapes, name: str) -> List[Optional[Shape]]:
        if module.accepts_feed:
            shapes = module.infer_top_shapes([tuple(s) for s in bottom_shapes])
            return [self._input_overrides.get(t, s) for t, s in zip(module.top_names, shapes)]
        return module.infer_top_shapes([tuple(s) for s in bottom_shapes])

    def _register_params(self, module: Layer, lp, prefix: str) -> None:
        if len(lp.param) > len(module.blob_names):
            raise SchemaError(f"{len(lp.param)} param specs given but the layer has "
                              f"{len(module.blob_names)} blobs", layer=module.name)
        for i, attr in enumerate(module.blob_names):
            spec = lp.param[i] if i < len(lp.param) else None
            key = f"{prefix}.{attr}"
            tensor = getattr(module, attr)
            if not isinstance(tensor, nn.Parameter):
                continue  # buffers (e.g. BatchNorm statistics) are not learned
            lr = spec.lr_mult if spec is not None and spec.HasField("lr_mult") else None
            decay = spec.decay_mult if spec is not None and spec.HasField("decay_mult") else None
            share = spec.name if spec is not None else ""
            if share and share in self._share_owner:
                owner_key = self._share_owner[share]
                info = self.param_infos[owner_key[0]]
                owner = info.param
                strict = spec.share_mode == caffe_pb2.ParamSpec.STRICT
                if tuple(owner.shape) != tuple(tensor.shape):
                    if strict or owner.numel() != tensor.numel():
                        raise ShapeError(f"cannot share param '{share}' owned by layer '{owner_key[1]}': "
                                         f"shape {tuple(owner.shape)} vs {tuple(tensor.shape)}",
                                         layer=module.name)
                    raise SchemaError("PERMISSIVE sharing between different shapes of equal count is "
                                      "not supported", layer=module.name)
                module._parameters[attr] = owner
                self._ctx.budget.refund(tensor.numel())  # its own copy is dropped
                # Caffe: a sharer's explicit lr_mult/decay_mult must agree with the owner's
                if lr is not None:
                    if info.lr_mult != lr and getattr(info, "_lr_set", False):
                        raise SchemaError(f"shared param '{share}' has mismatched lr_mult", layer=module.name)
                    info.lr_mult = lr
                if decay is not None:
                    if info.decay_mult != decay and getattr(info, "_decay_set", False):
                        raise SchemaError(f"shared param '{share}' has mismatched decay_mult",
                                          layer=module.name)
                    info.decay_mult = decay
                continue
            info = ParamInfo(key, tensor, 1.0 if lr is None else float(lr), 1.0 if decay is None else float(decay))
            info._lr_set = lr is not None  # type: ignore[attr-defined]
            info._decay_set = decay is not None  # type: ignore[attr-defined]
            self.param_infos[key] = info
            if share:
                self._share_owner[share] = (key, module.name)

    # ------------------------------------------------------------------ access
    def layer(self, name: str) -> Layer:
        """The module of the layer called ``name`` (Caffe's name)."""
        e = self._by_name.get(name)
        if e is None:
            raise GraphError(f"no layer named '{name}'")
        if e.module is None:
            raise GraphError(f"layer not built: {e.unbuilt_reason}", layer=name)
        return e.module

    @property
    def caffe_steps(self) -> List[Step]:
        """The net as Caffe runs it: the layers with Caffe's split layers inserted, each with
        Net::Init's need-backward flags (:mod:`caffe_compat.insert_splits`)."""
        pinned = self.__dict__.get("_pass")
        if pinned is not None:  # inside a ranged pass: checked once at its start
            return pinned[0]
        key = tuple((id(e), tuple(e.bottoms), tuple(e.tops)) for e in self.entries)
        if key != self._steps_key:
            with _collector_paused():  # (a step per layer, as in the build)
                steps, shares = insert_splits(self.entries, list(self.net_param.layer))
                mark_need_backward(steps, bool(self.net_param.force_backward))
            self.__dict__["_steps"], self.__dict__["_split_sources"] = steps, shares
            self._steps_key = key
            self._records.clear()
        return self.__dict__["_steps"]

    @contextlib.contextmanager
    def _ranged_pass(self) -> Iterator[List[Step]]:
        """One layer-by-layer forward or backward: Caffe's steps, the device and the dtype
        are looked up once for it (each looks at the whole net: per blob, a pass over n
        layers was quadratic)."""
        if self.__dict__.get("_pass") is not None:
            yield self.__dict__["_pass"][0]
            return
        pinned = (self.caffe_steps, self.device, self.dtype)
        self.__dict__["_pass"] = pinned
        try:
            yield pinned[0]
        finally:
            self.__dict__["_pass"] = None

    @property
    def split_sources(self) -> Dict[str, str]:
        """For each split top of :attr:`caffe_steps`, the blob whose data it shares."""
        self.caffe_steps  # noqa: B018  (computes them)
        return self.__dict__["_split_sources"]

    def step_index(self, layer: LayerRef, default: int = 0) -> int:
        """Index in :attr:`caffe_steps` of a layer name (first occurrence) or index."""
        return step_index(self, layer, default)

    @property
    def generator(self) -> torch.Generator:
        """The generator the net's fillers (and random layers such as Dropout) draw from."""
        return self._ctx.generator

    @property
    def layer_names(self) -> List[str]:
        return [e.name for e in self.entries]

    @property
    def device(self) -> torch.device:
        pinned = self.__dict__.get("_pass")
        if pinned is not None:
            return pinned[1]
        for t in self.parameters():
            return t.device
        for t in self.buffers():
            return t.device
        # a net without parameters (ReLU, Softmax...) remembers where it was moved
        return self.__dict__.get("_moved_to") or torch.device("cpu")

    def to(self, *args, **kwargs) -> "Net":
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            self.__dict__["_moved_to"] = torch.device(device)
        self._records.clear()  # recorded graphs hold the old tensors
        return super().to(*args, **kwargs)

    def cuda(self, device=None) -> "Net":
        super().cuda(device)
        self._records.clear()
        if device is None:
            device = torch.cuda.current_device()
        self.__dict__["_moved_to"] = torch.device("cuda", device) if isinstance(device, int) \
            else torch.device(device)
        return self

    def cpu(self) -> "Net":
        super().cpu()
        self._records.clear()
        self.__dict__["_moved_to"] = torch.device("cpu")
        return self

    @property
    def dtype(self) -> torch.dtype:
        pinned = self.__dict__.get("_pass")
        if pinned is not None:
            return pinned[2]
        for t in self.parameters():
            return t.dtype
        return torch.float32

    def fuse_batchnorm(self) -> List[str]:
        """Fold BatchNorm (+ Scale) into the preceding convolutions (inference only, opt-in).

        Returns the names of the layers folded away; see ``caffe_compat.fuse``.
        """
        return fold_batchnorm_into_conv(self)

    def learnable_params(self) -> List[ParamInfo]:
        """Unique learnable parameters in Caffe's order, with their lr/decay multipliers."""
        return list(self.param_infos.values())

    # ------------------------------------------------------------------ running
    def _as_tensor(self, name: str, x) -> Tensor:
        """An input (or top diff) as a tensor of the net's float type: float data of another
        precision is cast (a net without parameters keeps it), booleans and exactly
        representable integers too, anything else is an InputError (:mod:`caffe_compat.inputs`)."""
        from caffe_compat.inputs import as_blob_tensor

        has_params = next(iter(self.parameters()), None) is not None
        return as_blob_tensor(name, x, self.dtype, self.device, keep_float=not has_params)

    def channels_last(self, enable: bool = True) -> "Net":
        """Run convolutions in NHWC memory layout (opt-in; a CPU/GPU inference speed-up).

        Parameters are converted, and 4-D inputs are made channels-last when fed (a copy:
        with this mode on, inputs are not used as they are).  Numbers are unchanged up to
        float rounding (the golden tests run in both layouts).
        """
        self.memory_format = torch.channels_last if enable else torch.contiguous_format
        with torch.no_grad():  # 4-D tensors only (3-D convolutions keep their layout)
            for t in list(self.parameters()) + list(self.buffers()):
                if t.dim() == 4:
                    t.data = t.data.contiguous(memory_format=self.memory_format)
        return self

    def feed(self, **inputs) -> None:
        """Set input blobs for the next forward (kept until replaced, like Caffe's blobs);
        ``net.blobs`` holds them at once, so a ranged forward that starts later reads them."""
        for k, v in inputs.items():
            if k not in self.input_names:
                raise GraphError(f"'{k}' is not an input of this net; inputs are: "
                                 f"{', '.join(self.input_names) or 'none'}")
            t = self._as_tensor(k, v)
            if self.memory_format is torch.channels_last and t.dim() == 4:
                t = t.contiguous(memory_format=torch.channels_last)
            self._fed[k] = t
            self.blobs[k] = t

    def precision(self):
        """Context for passes over this net's graph: true fp32 unless ``allow_tf32``.

        ``forward``/``backward`` use it; wrap your own ``torch.autograd`` calls on the
        net's outputs in it too (on CUDA, backward kernels read torch's global flags).
        """
        tune = getattr(self, "cudnn_autotune", True) and self.device.type == "cuda"
        return pass_settings(exact=not self.allow_tf32, autotune=tune)

    def forward(self, *, start: LayerRef = None, end: LayerRef = None,
                **inputs) -> "OrderedDict[str, Tensor]":
        """Run the net; returns Caffe's net outputs by name.

        Without ``start``/``end``: every layer, as one autograd graph.  With either (a layer
        name or an index into :attr:`caffe_steps`; inclusive): Caffe's ``ForwardFromTo``,
        layer by layer on what the blobs hold, each layer recorded for
        ``backward(start=, end=)``; ``net.loss`` is then the (detached, float64) loss of the
        layers run, and the outputs returned are those the blobs hold.
        """
        with self.precision():
            if start is None and end is None:
                compiled = self.__dict__.get("_compiled_forward")
                return self._forward(inputs) if compiled is None else compiled(inputs)
            self.feed(**inputs)
            with self._ranged_pass() as steps:
                self.loss = forward_from_to(self, self.step_index(start, 0),
                                            self.step_index(end, len(steps) - 1))
            self._layerwise = True
            return OrderedDict((n, self.blobs[n]) for n in self.output_names if n in self.blobs)

    def compile_forward(self, backend: Any = "inductor", *, mode: Optional[str] = None,
                        dynamic: Optional[bool] = None, fallback: bool = True) -> "Net":
        """Run whole forwards through ``torch.compile`` from now on (ranged forwards stay
        layer by layer); a compiler failure falls back to eager with one warning
        (:class:`caffe_compat.compile.CompiledForward`).  ``backend=None`` undoes it."""
        if backend is None:
            self.__dict__.pop("_compiled_forward", None)
            return self
        from caffe_compat.compile import CompiledForward

        self.__dict__["_compiled_forward"] = CompiledForward(
            self._forward, backend=backend, mode=mode, dynamic=dynamic, fallback=fallback,
            name=f"net '{self.net_name}'")
        return self

    def _forward(self, inputs) -> "OrderedDict[str, Tensor]":
        self.feed(**inputs)
        self._records.clear()
        self._layerwise = False
        self.checks.clear()
        blobs: Dict[str, Tensor] = {}
        loss: Optional[Tensor] = None
        plan = inference_plan.plan_for(self) if inference_plan.applies(self) else None
        for i, e in enumerate(self.entries):
            m = e.module
            if plan is not None:
                if i in plan.skip:  # an in-place layer its convolution step ran already
                    continue
                fused = plan.convs.get(i)
                if fused is not None:
                    blobs[e.tops[0]] = fused.run(blobs[e.bottoms[0]])
                    continue
            if m is None:
                raise DataError(f"layer cannot run: {e.unbuilt_reason}", layer=e.name)
            bottoms = [blobs[b] if p else blobs[b].detach() for b, p in zip(e.bottoms, e.propagate_down)]
            if m.accepts_feed:
                if all(t in self._fed for t in e.tops):  # no need for the layer's defaults
                    outs = [self._fed[t] for t in e.tops]
                else:
                    outs = list(m())
                    for i, t in enumerate(e.tops):
                        if t in self._fed:
                            outs[i] = self._fed[t]
            else:
                outs = m(*bottoms)
                if isinstance(outs, Tensor):
                    outs = (outs,)
            if len(outs) != len(e.tops):
                raise GraphError(f"produced {len(outs)} tops, expected {len(e.tops)}", layer=e.name)
            for t, o, w in zip(e.tops, outs, e.loss_weights):
                blobs[t] = o
                if w:
                    term = o.sum() * w if w != 1.0 else o.sum()
                    loss = term if loss is None else loss + term
        self.checks.settle()
        self.blobs = OrderedDict((n, blobs[n]) for n in self.blob_names if n in blobs)
        for n, t in self.blobs.items():
            self.blob_shapes[n] = tuple(t.shape)
        self.loss = loss
        return OrderedDict((n, blobs[n]) for n in self.output_names)

    def backward(self, *, start: LayerRef = None, end: LayerRef = None, **diffs) -> None:
        """Backpropagate the net's loss (Caffe's ``Net::Backward`` from the loss layers).

        After a whole-net forward: ``net.loss.backward()`` through its graph.  After a
        ranged forward, or with ``start``/``end`` or top diffs given (``name=tensor``, into
        ``net.diffs``): Caffe's ``BackwardFromTo`` (``start`` >= ``end``, inclusive), layer
        by layer from the top diffs the blobs hold, writing ``net.diffs`` and accumulating
        parameter gradients; it needs no forward first (a layer without a recorded forward
        runs from its bottoms as they are).
        """
        if self._layerwise or start is not None or end is not None or diffs:
            with self._ranged_pass() as steps:
                for k, v in diffs.items():
                    if k not in self.blob_shapes and k not in self.split_sources:
                        raise GraphError(f"'{shorten(k)}' is not a blob of this net")
                    self.diffs[k] = self._as_tensor(k, v)
                with self.precision():
                    backward_from_to(self, self.step_index(start, len(steps) - 1), self.step_index(end, 0))
            return
        if self.loss is None:
            raise GraphError("the net has no loss to backpropagate (run forward first; "
                             "loss layers or loss_weight make a loss)")
        with self.precision():
            self.loss.backward()

    def reshape(self, **shapes: Sequence[int]) -> Dict[str, Optional[Shape]]:
        """Recompute every blob shape for new input shapes (Caffe's ``Net::Reshape``)."""
        for k, v in shapes.items():
            if k not in self.input_names:
                raise GraphError(f"'{shorten(k)}' is not an input of this net; inputs are: "
                                 f"{_names(self.input_names) or 'none'}")
            self._input_overrides[k] = tuple(int(d) for d in v)
        for k, t in self._fed.items():
            if k not in shapes:
                self._input_overrides[k] = tuple(t.shape)
        cur: Dict[str, Optional[Shape]] = {}
        for e in self.entries:
            if e.module is None:
                for t in e.tops:
                    cur[t] = None
                continue
            bs = [cur[b] for b in e.bottoms]
            if any(s is None for s in bs):
                tops: List[Optional[Shape]] = [None] * len(e.tops)
            else:
                tops = self._infer(e.module, bs, e.name)
            for t, s in zip(e.tops, tops):
                cur[t] = s
        self.blob_shapes = cur
        return cur

    # ------------------------------------------------------------------ weights
    def load_weights(self, path: str, *, allow_missing: bool = False,
                     check_finite: Optional[bool] = None) -> List[str]:
        """Load a .caffemodel, .pt or .safetensors file; returns notes (e.g. ignored layers).

        NaN/Inf weights are refused unless ``check_finite=False`` (or the environment
        variable CAFFE_COMPAT_ALLOW_NONFINITE_WEIGHTS=1).
        """
        from caffe_compat import weights as W

        kw = {} if check_finite is None else {"check_finite": check_finite}
        return W.load_into(self, path, allow_missing=allow_missing, **kw)

    def save_weights(self, path: str, **kw) -> None:
        """Write the weights as .caffemodel, .pt or .safetensors (by extension)."""
        from caffe_compat import weights as W

        W.save(self, path, **kw)

    def extra_repr(self) -> str:
        return f"name={self.net_name!r}, phase={self.phase}, layers={len(self.entries)}"
