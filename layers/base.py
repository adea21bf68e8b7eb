"""The Layer contract every Caffe layer implementation follows.

A layer is built once from its ``LayerParameter`` and the shapes of its bottoms (Caffe's
``LayerSetUp``), owns its learnable blobs as torch parameters (Caffe's ``blobs_``, in Caffe's
order), and computes its tops from its bottoms in ``forward`` with differentiable torch ops,
so autograd supplies Caffe's backward.  Where Caffe's backward is *not* the mathematical
gradient of its forward, the layer says so with a custom ``torch.autograd.Function``.

Life of a layer inside :class:`caffe_compat.net.Net`:

1. ``__init__(param, bottom_shapes, ctx)``: read the layer's ``*_param``, check bottoms,
   create blobs with ``add_blob`` (filled by Caffe's filler; weights may be loaded later).
2. ``infer_top_shapes(bottom_shapes)``: Caffe's ``Reshape``.  By default the layer's own
   ``forward`` runs on meta tensors (no memory, no compute), so most layers need not
   write shape code; layers whose top shapes depend on data override it.
3. ``forward(*bottoms) -> tuple of tops``: pure (no in-place writes to bottoms); the net
   rebinds in-place tops by name, which removes Caffe's aliasing.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.fillers import fill
from caffe_compat.host_sync import DeferredChecks, check_now_or_later
from caffe_compat.limits import check_shape

Shape = Tuple[int, ...]

#: value types ``Layer.__setattr__`` stores without nn.Module's checks (never tensors/modules)
_PLAIN = frozenset((bool, int, float, str, bytes, tuple, list, dict, set, type(None)))

TRAIN = "TRAIN"
TEST = "TEST"


@dataclass
class BuildContext:
    """What a layer may know about the net being built (never other layers)."""

    phase: str = TEST
    generator: Optional[torch.Generator] = None
    source_dir: str = "."
    allow_python_layers: bool = False
    stages: Tuple[str, ...] = ()
    level: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)
    source: Optional[str] = None    # the prototxt file, to name a layer's file:line in errors
    #: the net's ``limits.NetBudget``: every blob a layer allocates at build is charged to it
    #: first (None outside a net: only each shape is checked)
    budget: Optional[Any] = None


@contextlib.contextmanager
def _blobs_on_meta(module: nn.Module) -> Iterator[None]:
    """Swap every parameter and buffer of ``module`` (and its children) for a meta tensor of
    the same shape while the block runs.  What ``torch.func.functional_call`` does, without
    the import of torch._dynamo it triggers (over a second at every process's first net)."""
    saved = []
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for k, v in store.items():
                if v is not None:
                    saved.append((store, k, v))
                    store[k] = torch.empty_like(v, device="meta")
    try:
        yield
    finally:
        for store, k, v in reversed(saved):
            store[k] = v


class Layer(nn.Module):
    """Base class of every layer; see the module docstring for the contract."""

    #: set by ``@register``
    type_names: Tuple[str, ...] = ()
    #: loss layers weigh top 0 by 1 unless ``loss_weight`` says otherwise
    is_loss: bool = False
    #: Input-like layers whose tops the user feeds (``net.forward(data=...)``)
    accepts_feed: bool = False
    # Caffe's ExactNumBottomBlobs/MinBottomBlobs/... (None: no constraint)
    exact_bottoms: Optional[int] = None
    min_bottoms: Optional[int] = None
    max_bottoms: Optional[int] = None
    exact_tops: Optional[int] = None
    min_tops: Optional[int] = None
    max_tops: Optional[int] = None
    #: Caffe's Backward reads state the layer kept since its forward (a Python layer's own
    #: ``backward``): layer-by-layer backward calls ``caffe_backward`` instead of autograd
    backward_on_blobs: bool = False
    #: the net's :class:`~caffe_compat.host_sync.DeferredChecks` (set by the net; None for a
    #: layer run on its own, whose checks then run at once)
    checks: Optional[DeferredChecks] = None

    def __init__(self, param, bottom_shapes: Sequence[Shape], ctx: BuildContext):
        super().__init__()
        self.param = param
        self.name: str = param.name
        self.phase: str = ctx.phase
        self.ctx = ctx
        self.bottom_names: List[str] = list(param.bottom)
        self.top_names: List[str] = list(param.top)
        #: attribute names of Caffe's blobs_, in Caffe's order (parameters or buffers)
        self.blob_names: List[str] = []
        self._check_counts(len(bottom_shapes), len(param.top))

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module.__setattr__ tests every value against Parameter, Module and Buffer (slow
        # metaclass checks, ~10 per layer): plain values of a name it does not manage go
        # straight in, everything else takes its path (a 200,000-layer net builds in seconds)
        d = self.__dict__
        if type(value) in _PLAIN and "_modules" in d and name not in d["_parameters"] \
                and name not in d["_buffers"] and name not in d["_modules"]:
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ helpers
    def _check_counts(self, n_bottom: int, n_top: int) -> None:
        def check(n: int, exact, lo, hi, what: str) -> None:
            if exact is not None and n != exact:
                raise GraphError(f"{self.param.type} takes {exact} {what} blob(s), got {n}",
                                 layer=self.name)
            if lo is not None and n < lo:
                raise GraphError(f"{self.param.type} takes at least {lo} {what} blob(s), got {n}",
                                 layer=self.name)
            if hi is not None and n > hi:
                raise GraphError(f"{self.param.type} takes at most {hi} {what} blob(s), got {n}",
                                 layer=self.name)

        check(n_bottom, self.exact_bottoms, self.min_bottoms, self.max_bottoms, "bottom")
        check(n_top, self.exact_tops, self.min_tops, self.max_tops, "top")

    def error(self, cls, message: str):
        """An error of ``cls`` naming this layer (raise it)."""
        return cls(message, layer=self.name)

    def check_later(self, bad: Tensor, fail: Callable[[], None]) -> None:
        """Raise ``fail()`` if the 0-d bool ``bad`` holds, without stalling an accelerator:
        at once on the CPU, else when the net settles its checks at the end of the forward
        (compute on clamped values meanwhile).  See :class:`~caffe_compat.host_sync.DeferredChecks`."""
        check_now_or_later(self.checks, bad, fail)

    def declare(self, shape: Sequence[int], *, what: str, key: Optional[tuple] = None) -> int:
        """Charge a tensor of ``shape`` this layer is about to allocate to the net's budget
        (``BuildContext.budget``: its shape and the net's total are checked against
        ``caffe_compat.limits``), *before* allocating it; returns its element count.
        ``key`` (e.g. ``("top", 0)``) marks what the builder may charge again (not twice)."""
        budget = self.ctx.budget
        if budget is None:
            return check_shape(shape, what=what, layer=self.name, error=ShapeError)
        return budget.charge(shape, what=what, layer=self.name, error=ShapeError,
                             key=None if key is None else (id(self),) + tuple(key))

    def add_blob(self, attr: str, shape: Sequence[int], filler=None, *, buffer: bool = False,
                 value: Optional[Tensor] = None) -> Tensor:
        """Create Caffe blob number ``len(blob_names)`` as parameter (or buffer) ``attr``."""
        self.declare(shape, what=f"blob '{attr}'")  # before allocating it
        if value is None:
            value = fill(shape, filler, generator=self.ctx.generator, layer=self.name)
        if buffer:
            self.register_buffer(attr, value)
        else:
            self.register_parameter(attr, nn.Parameter(value))
        self.blob_names.append(attr)
        return getattr(self, attr)

    def caffe_blobs(self) -> List[Tensor]:
        """The layer's blobs in Caffe's order (what a caffemodel stores for it)."""
        return [getattr(self, n) for n in self.blob_names]

    # ------------------------------------------------------------------ contract
    def lint(self, bottom_producers: Sequence[Optional[str]]) -> List[str]:
        """Warnings about how this layer is wired (``bottom_producers``: the type of the layer
        that wrote each bottom, None for net inputs); the net logs them after building.
        Nothing is wrong with the wiring by default."""
        return []

    def infer_top_shapes(self, bottom_shapes: Sequence[Shape],
                         bottom_dtypes: Optional[Sequence[torch.dtype]] = None) -> List[Shape]:
        """Top shapes for these bottom shapes (Caffe's Reshape); default: run on meta."""
        dtypes = bottom_dtypes or [torch.float32] * len(bottom_shapes)
        for i, s in enumerate(bottom_shapes):  # Python ints: no int64 overflow on the way
            check_shape(s, what=f"bottom {i}", layer=self.name)
        metas = tuple(torch.empty(tuple(s), device="meta", dtype=d)
                      for s, d in zip(bottom_shapes, dtypes))
        try:
            with _blobs_on_meta(self):
                outs = self(*metas)
        except (NotImplementedError, RuntimeError, TypeError, ValueError, IndexError) as e:
            raise self.error(ShapeError, f"cannot infer top shapes from bottoms "
                                         f"{[tuple(s) for s in bottom_shapes]}: {e}") from e
        if isinstance(outs, Tensor):
            outs = (outs,)
        return [tuple(int(d) for d in o.shape) for o in outs]

    def forward(self, *bottoms: Tensor) -> Tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def caffe_backward(self, top_data: Sequence[Tensor], top_diff: Sequence[Tensor],
                       propagate_down: Sequence[bool], bottom_data: Sequence[Tensor],
                       bottom_diff: Sequence[Tensor], param_diff: Sequence[Tensor]
                       ) -> Tuple[List[Tensor], List[Tensor]]:
        """Caffe's ``Backward`` on the blobs as they are, for ``backward_on_blobs`` layers:
        returns the bottom diffs and parameter diffs the layer leaves (given their current
        contents, which Caffe does not clear)."""
        raise NotImplementedError(f"{type(self).__name__} computes its backward by autograd")

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def shape_str(shape: Optional[Shape]) -> str:
    """Caffe's way of printing a blob shape: ``2 3 4 5 (120)``."""
    if shape is None:
        return "?"
    n = 1
    for s in shape:
        n *= s
    return " ".join(str(s) for s in shape) + f" ({n})"


def canonical_axis(axis: int, num_axes: int, *, layer: str = "", what: str = "axis") -> int:
    """Caffe's ``CanonicalAxisIndex``: negative axes count from the end; out of range is an error."""
    if not -num_axes <= axis < max(num_axes, 1):
        raise ShapeError(f"{what} {axis} out of range for a {num_axes}-D blob", layer=layer)
    return axis + num_axes if axis < 0 else axis


def spatial_params(p, name: str, num_spatial: int, default: Optional[int], *, layer: str) -> List[int]:
    """Per-axis values from Caffe's repeated ``name`` field or ``name_h``/``name_w``.

    Caffe allows one value (broadcast), one per spatial axis, or, for 2-D only, the
    ``_h``/``_w`` pair (which then must not be combined with the repeated field).
    """
    hw = "kernel" if name == "kernel_size" else name  # Caffe's kernel_h/kernel_w
    fields = {f.name for f in p.DESCRIPTOR.fields}
    has_h = f"{hw}_h" in fields and p.HasField(f"{hw}_h")
    has_w = f"{hw}_w" in fields and p.HasField(f"{hw}_w")
    rep = getattr(p, name)
    if not isinstance(rep, (int, float)):
        rep = list(rep)
    else:
        rep = [rep] if p.HasField(name) else []
    if has_h or has_w:
        if num_spatial != 2:
            raise SchemaError(f"{hw}_h/{hw}_w are for 2-D spatial blobs only", layer=layer)
        if rep:
            raise SchemaError(f"give either {name} or {hw}_h/{hw}_w, not both", layer=layer)
        if not (has_h and has_w):
            raise SchemaError(f"{hw}_h and {hw}_w must be given together", layer=layer)
        return [int(getattr(p, f"{hw}_h")), int(getattr(p, f"{hw}_w"))]
    if not rep:
        if default is None:
            raise SchemaError(f"{name} is required", layer=layer)
        return [default] * num_spatial
    if len(rep) == 1:
        return [int(rep[0])] * num_spatial
    if len(rep) != num_spatial:
        raise SchemaError(f"{name} must be given once or {num_spatial} times, got {len(rep)}",
                          layer=layer)
    return [int(v) for v in rep]
