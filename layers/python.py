"""``type: "Python"`` layers: run the user's legacy pycaffe layer class, as Caffe does.

Layers with a native implementation (registered with ``register_python``, e.g.
py-faster-rcnn's proposal layers) never reach this file: ``registry.resolve`` picks them.
Every other Python layer is run here, through pycaffe's protocol:

- Import: ``python_param.module`` is imported from the Python path, plus the directories
  of ``$PYTHONPATH``, the prototxt's folder and the current directory (appended), but
  **only when allowed** (importing runs arbitrary code): ``ctx.allow_python_layers``
  (``Net(..., allow_python_layers=True)``) or ``CAFFE_COMPAT_ALLOW_PYTHON_LAYERS=1``.
  While it is imported and run, ``import caffe`` gives :mod:`caffe_compat.pycaffe` (and
  ``caffe.proto.caffe_pb2`` caffe-compat's schema) unless a real Caffe is already imported.
- Build (Caffe's ``SetUp``): ``cls(layer_param)``, then ``param_str``/``param_str_``/
  ``phase`` are set, ``setup(bottom, top)`` and ``reshape(bottom, top)`` run on bottoms of
  the build shapes filled with zeros; the tops' shapes are the layer's top shapes.  Blobs
  the layer adds (``self.blobs.add_blob``) become learnable parameters ``blob0``, ``blob1``...
- Forward: ``reshape`` then ``forward`` on float32 numpy copies of the bottoms (float64
  when the net runs in float64), inside a ``torch.autograd.Function``, so ``backward`` of a
  loss calls the user's ``backward(top, propagate_down, bottom)`` with the tops' gradients
  as diffs; the bottom diffs it writes are the bottoms' gradients and the blob diffs the
  parameters' gradients.  A top that shares its name with a bottom (in place) is the same
  Blob object, as in Caffe.
- Layer-by-layer backward (``Net.backward(start=, end=)``, pycaffe): ``caffe_backward``
  calls the user's ``backward`` on the blobs as they are now (data, top diffs, and the
  bottom and blob diffs it may add to), with or without a forward first, as Caffe does.
- Errors: an exception raised by the user's ``__init__``, ``setup``, ``reshape``,
  ``forward`` or ``backward`` reaches the caller with its own type (Caffe's PythonLayer lets
  boost::python re-raise it, so ``except RuntimeError:`` around ``caffe.Net(...)`` works);
  a note (PEP 678) names the layer, the method and the prototxt's file:line.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.errors import PythonLayerError, SchemaError
from caffe_compat.layers.base import TRAIN, Layer, Shape
from caffe_compat.layers.registry import register

ENV_ALLOW = "CAFFE_COMPAT_ALLOW_PYTHON_LAYERS"

_ALIASED = ("caffe", "caffe.proto", "caffe.proto.caffe_pb2")


def _add_note(exc: BaseException, note: str) -> None:
    """PEP 678's ``add_note`` (``__notes__`` set the same way before Python 3.11)."""
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # pragma: no cover - Python < 3.11
        exc.__notes__ = [*getattr(exc, "__notes__", []), note]  # type: ignore[attr-defined]


_NOTE_PREFIX = "in Python layer '"


def python_layer_note(exc: BaseException) -> Optional[str]:
    """The note naming the Python layer whose user code raised ``exc`` (None when no user
    layer code raised it): what a command-line tool reports instead of an internal error."""
    return next((n for n in getattr(exc, "__notes__", ()) if str(n).startswith(_NOTE_PREFIX)), None)


def python_layers_allowed(ctx) -> bool:
    """Whether user Python modules may be imported: the build flag or the environment."""
    return bool(getattr(ctx, "allow_python_layers", False)) or \
        os.environ.get(ENV_ALLOW, "").strip() not in ("", "0")


def _pycaffe():
    import caffe_compat.pycaffe as pycaffe

    return pycaffe


@contextlib.contextmanager
def caffe_alias() -> Iterator[Any]:
    """Make ``import caffe`` resolve to caffe-compat's pycaffe for the duration.

    A real Caffe already in ``sys.modules`` is left alone (and yielded); otherwise the
    previous state of ``caffe``, ``caffe.proto`` and ``caffe.proto.caffe_pb2`` is restored
    on exit, so nesting and a later real ``import caffe`` keep working.
    """
    pycaffe = _pycaffe()
    current = sys.modules.get("caffe")
    if current is not None and current is not pycaffe:
        yield current
        return
    saved = {n: sys.modules.get(n) for n in _ALIASED}
    sys.modules["caffe"] = pycaffe
    sys.modules["caffe.proto"] = pycaffe.proto
    sys.modules["caffe.proto.caffe_pb2"] = pycaffe.proto.caffe_pb2
    try:
        yield pycaffe
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def _extend_path(source_dir: Optional[str]) -> None:
    """Append $PYTHONPATH's folders, the prototxt's folder and the cwd to ``sys.path``."""
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if source_dir:
        extra.append(source_dir)
    extra.append(os.getcwd())
    for p in extra:
        p = os.path.abspath(p)
        if p not in sys.path:
            sys.path.append(p)


def _adapt_foreign(cls: type) -> type:
    """A pycaffe.Layer subclass with ``cls``'s own methods (best effort).

    For a class written against a real Caffe that is imported in this process (its
    ``caffe.Layer`` is a Boost.Python class we cannot construct) or a duck-typed class.
    The methods are copied, so a user ``__init__`` (which would have to call the Boost
    base) is skipped and zero-argument ``super()`` inside them does not work.
    """
    pycaffe = _pycaffe()
    ns: dict = {}
    for klass in reversed(cls.__mro__):
        mod = getattr(klass, "__module__", "") or ""
        if klass is object or mod.startswith(("caffe._caffe", "Boost.Python")) or klass is pycaffe.Layer:
            continue
        ns.update({k: v for k, v in vars(klass).items()
                   if k not in ("__dict__", "__weakref__", "__init__")})
    return type(cls.__name__, (pycaffe.Layer,), ns)


def import_layer_class(module: str, layer: str, *, layer_name: str, source_dir: Optional[str]) -> type:
    """Import ``module`` (with the ``caffe`` alias) and return its pycaffe-compatible ``layer``."""
    _extend_path(source_dir)
    with caffe_alias():
        try:
            mod = importlib.import_module(module)
        except Exception as e:  # ImportError, SyntaxError, errors at import time
            raise PythonLayerError(
                f"cannot import Python layer module '{module}': {type(e).__name__}: {e} "
                f"(searched sys.path, $PYTHONPATH, the prototxt's folder and the current "
                f"directory)", layer=layer_name) from e
    cls = getattr(mod, layer, None)
    if not isinstance(cls, type):
        found = sorted(k for k, v in vars(mod).items() if isinstance(v, type) and hasattr(v, "forward"))
        raise PythonLayerError(f"module '{module}' has no layer class '{layer}'"
                               + (f"; it has {', '.join(found)}" if found else ""), layer=layer_name)
    if not issubclass(cls, _pycaffe().Layer):
        cls = _adapt_foreign(cls)
    _check_protocol(cls, f"{module}.{layer}", layer_name)
    return cls


#: the methods Caffe's PythonLayer calls that a layer class must define itself
REQUIRED_METHODS = ("setup", "forward")


def _check_protocol(cls: type, where: str, layer_name: str) -> None:
    """Refuse a class that does not define ``setup`` and ``forward`` (before it is built).

    Caffe's PythonLayer calls ``self.setup(bottom, top)`` once and ``self.forward(bottom,
    top)`` on every pass; a class without its own ``setup`` falls back to the Boost base's,
    which calls back into the layer without end, and one without ``forward`` raises
    AttributeError at the first pass.  The no-op defaults of this package's ``caffe.Layer``
    would instead make such a layer silently do nothing.
    """
    base = _pycaffe().Layer
    missing = [m for m in REQUIRED_METHODS
               if not callable(getattr(cls, m, None)) or getattr(cls, m) is getattr(base, m, None)]
    if missing:
        raise PythonLayerError(
            f"Python layer class '{where[:120]}' does not define {' or '.join(missing)} (Caffe calls "
            "setup(bottom, top) once and forward(bottom, top) on every pass; a class without them "
            "fails in Caffe too): define both, even as 'pass'", layer=layer_name)


class _PythonLayerFn(torch.autograd.Function):
    """The user's forward/backward as one autograd node (numpy round trip: legacy path)."""

    @staticmethod
    def forward(ctx, layer: "PythonLayer", n_bottoms: int, *args: Tensor):  # type: ignore[override]
        bottoms, params = args[:n_bottoms], args[n_bottoms:]
        dtype, device = layer._out_spec(bottoms)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32
        bottom_np = [b.detach().cpu().numpy().astype(np_dtype, copy=False) for b in bottoms]
        param_np = [p.detach().cpu().numpy().astype(np_dtype, copy=False) for p in params]
        top_np = layer._run_forward(bottom_np, param_np, np_dtype)
        ctx.layer = layer
        ctx.n_bottoms = n_bottoms
        ctx.np_dtype = np_dtype
        ctx.bottom_np, ctx.top_np, ctx.param_np = bottom_np, top_np, param_np
        ctx.in_specs = [(a.dtype, a.device) for a in args]
        return tuple(torch.from_numpy(t.copy()).to(device=device, dtype=dtype) for t in top_np)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads: Tensor):  # type: ignore[override]
        nb = ctx.n_bottoms
        propagate = [bool(ctx.needs_input_grad[2 + i]) for i in range(nb)]
        top_diffs = [g.detach().cpu().numpy().astype(ctx.np_dtype, copy=False) for g in grads]
        bdiffs, pdiffs = ctx.layer._run_backward(ctx.bottom_np, ctx.top_np, ctx.param_np,
                                                 top_diffs, propagate, ctx.np_dtype)
        out: List[Optional[Tensor]] = [None, None]
        for i, d in enumerate(bdiffs + pdiffs):
            dt, dev = ctx.in_specs[i]
            needed = ctx.needs_input_grad[2 + i]
            out.append(torch.from_numpy(d.copy()).to(device=dev, dtype=dt) if needed else None)
        return tuple(out)


@register("Python")
class PythonLayer(Layer):
    """Runs a user's pycaffe layer class (see the module docstring for the protocol)."""

    backward_on_blobs = True  # its backward reads what its forward kept, as in Caffe

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        pp = param.python_param
        self.module_name, self.class_name = str(pp.module), str(pp.layer)
        if not self.module_name or not self.class_name:
            raise self.error(SchemaError, "python_param needs both 'module' and 'layer'")
        where = f"'{self.module_name}.{self.class_name}'"
        if not python_layers_allowed(ctx):
            raise self.error(PythonLayerError,
                             f"Python layer {where} needs to import module '{self.module_name}', "
                             f"which runs arbitrary code, and Python layers are not allowed. "
                             f"Allow them with Net(..., allow_python_layers=True) (the CLI's "
                             f"--allow-python-layers) or by setting the environment variable "
                             f"{ENV_ALLOW}=1")
        cls = import_layer_class(self.module_name, self.class_name, layer_name=self.name,
                                 source_dir=getattr(ctx, "source_dir", None))
        pycaffe = _pycaffe()
        lp = type(param)()
        lp.CopyFrom(param)
        lp.phase = 0 if ctx.phase == TRAIN else 1  # Caffe gives the layer the net's phase
        impl = self._call(cls, "__init__", lp)
        impl.param_str = str(pp.param_str)  # BVLC
        impl.param_str_ = str(pp.param_str)  # the Fast R-CNN fork
        impl.phase = pycaffe.Phase(lp.phase)
        self.impl = impl
        self._bottoms = [pycaffe.Blob(*s) for s in bottom_shapes]
        self._tops: List[Any] = []  # in place (top named as a bottom): the same Blob, as in Caffe
        for t in param.top:
            shared = [j for j, b in enumerate(param.bottom) if b == t]
            self._tops.append(self._bottoms[shared[0]] if shared else pycaffe.Blob(0))
        self._call(impl.setup, "setup", self._bottoms, self._tops)
        self._call(impl.reshape, "reshape", self._bottoms, self._tops)
        self._shape_cache: Tuple[List[Shape], List[Shape]] = (
            [tuple(int(d) for d in s) for s in bottom_shapes], [t.shape for t in self._tops])
        for i, b in enumerate(impl.blobs):
            self.add_blob(f"blob{i}", b.shape, value=torch.from_numpy(np.array(b.data, np.float32)))
        # follows net.to(dtype/device): the tops' dtype and device when there is no float bottom
        self.register_buffer("_probe", torch.zeros(0), persistent=False)

    # ------------------------------------------------------------------ user calls
    def _call(self, fn, what: str, *args):
        """Run user code with the ``caffe`` alias; its errors keep their type, with a note
        naming this layer, the method and where the layer is defined."""
        with caffe_alias():
            try:
                return fn(*args)
            except Exception as e:
                _add_note(e, self._where(what))
                raise

    def _where(self, what: str) -> str:
        from caffe_compat.io import locate_layer

        source = getattr(self.ctx, "source", None)
        at = locate_layer(source, self.name) if source else None
        return (f"{_NOTE_PREFIX}{self.name}' ({self.module_name}.{self.class_name}.{what})"
                + (f" defined at {at}" if at else ""))

    def _learnable(self) -> list:
        blobs = self.impl.blobs
        if len(blobs) != len(self.blob_names):
            raise self.error(PythonLayerError, f"the layer had {len(self.blob_names)} blobs after "
                                               f"setup but has {len(blobs)} now")
        return list(blobs)

    def _run_forward(self, bottom_np: Sequence[np.ndarray], param_np: Sequence[np.ndarray],
                     np_dtype) -> List[np.ndarray]:
        blobs = self._learnable()
        for blob, arr in zip(self._bottoms, bottom_np):
            blob.retype(np_dtype)
            blob.set_data(arr)
        for blob, arr in zip(blobs, param_np):
            blob.retype(np_dtype)
            blob.set_data(arr)
        for t in self._tops:
            t.retype(np_dtype)
        self._call(self.impl.reshape, "reshape", self._bottoms, self._tops)
        self._call(self.impl.forward, "forward", self._bottoms, self._tops)
        tops = [np.array(t.data, copy=True) for t in self._tops]
        # a layer may update its own blobs in forward (running statistics): keep them
        with torch.no_grad():
            for name, blob, arr in zip(self.blob_names, blobs, param_np):
                if blob.data.shape == arr.shape and not np.array_equal(blob.data, arr):
                    p = getattr(self, name)
                    p.copy_(torch.from_numpy(np.array(blob.data)).to(p.dtype))
        return tops

    def _run_backward(self, bottom_np, top_np, param_np, top_diffs, propagate: List[bool],
                      np_dtype) -> Tuple[List[np.ndarray], List[np.ndarray]]:
        blobs = self._learnable()
        # restore this forward's state (another forward may have run since)
        for blob, arr in zip(self._bottoms, bottom_np):
            blob.retype(np_dtype)
            blob.set_data(arr)
            blob.set_diff(None)
        for blob, arr in zip(blobs, param_np):
            blob.retype(np_dtype)
            blob.set_data(arr)
            blob.set_diff(None)
        for blob, arr, d in zip(self._tops, top_np, top_diffs):
            blob.retype(np_dtype)
            blob.set_data(arr)
            blob.set_diff(d)
        self._call(self.impl.backward, "backward", self._tops, list(propagate), self._bottoms)
        bdiffs = [np.array(b.diff, copy=True).reshape(arr.shape) for b, arr in zip(self._bottoms, bottom_np)]
        pdiffs = [np.array(b.diff, copy=True).reshape(arr.shape) for b, arr in zip(blobs, param_np)]
        return bdiffs, pdiffs

    def caffe_backward(self, top_data, top_diff, propagate_down, bottom_data, bottom_diff,
                       param_diff) -> Tuple[List[Tensor], List[Tensor]]:
        """The user's ``backward(top, propagate_down, bottom)`` on the blobs as they are: no
        forward is replayed, so state the layer kept since its last forward is what it reads."""
        blobs = self._learnable()
        dtype = next((t.dtype for t in (*bottom_data, *top_data) if t.is_floating_point()), self._probe.dtype)
        np_dtype = np.float64 if dtype == torch.float64 else np.float32

        def arr(t: Tensor) -> np.ndarray:
            return t.detach().cpu().numpy().astype(np_dtype, copy=False)

        params = [getattr(self, n) for n in self.blob_names]
        for blob, d, g in zip(self._bottoms, bottom_data, bottom_diff):
            blob.retype(np_dtype)
            blob.set_data(arr(d))
            blob.set_diff(arr(g))
        for blob, p, g in zip(blobs, params, param_diff):
            blob.retype(np_dtype)
            blob.set_data(arr(p))
            blob.set_diff(arr(g))
        for blob, d, g in zip(self._tops, top_data, top_diff):  # in place: the bottom's Blob
            blob.retype(np_dtype)
            blob.set_data(arr(d))
            blob.set_diff(arr(g))
        self._call(self.impl.backward, "backward", self._tops, list(propagate_down), self._bottoms)

        def back(b, like: Tensor) -> Tensor:
            return torch.from_numpy(np.array(b.diff, copy=True)).to(device=like.device, dtype=like.dtype)

        return ([back(b, d) for b, d in zip(self._bottoms, bottom_data)],
                [back(b, p).reshape(p.shape) for b, p in zip(blobs, params)])

    def _out_spec(self, bottoms: Sequence[Tensor]) -> Tuple[torch.dtype, torch.device]:
        for b in bottoms:
            if b.is_floating_point():
                return b.dtype, b.device
        return self._probe.dtype, self._probe.device

    # ------------------------------------------------------------------ contract
    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        """Caffe's Reshape: the user's ``reshape`` on zero bottoms of these shapes."""
        shapes = [tuple(int(d) for d in s) for s in bottom_shapes]
        if shapes == self._shape_cache[0]:
            return list(self._shape_cache[1])
        for blob, s in zip(self._bottoms, shapes):
            blob.set_data(np.zeros(s, blob.dtype))
        self._call(self.impl.reshape, "reshape", self._bottoms, self._tops)
        tops = [t.shape for t in self._tops]
        self._shape_cache = (shapes, tops)
        return list(tops)

    @torch.compiler.disable  # the user's Python (numpy, host state) runs as written
    def forward(self, *bottoms: Tensor) -> Tuple[Tensor, ...]:
        if len(bottoms) != len(self._bottoms):
            raise self.error(PythonLayerError, f"built with {len(self._bottoms)} bottoms, "
                                               f"called with {len(bottoms)}")
        params = [getattr(self, n) for n in self.blob_names]
        if not self._tops:  # nothing to differentiate: just run the user's code
            dtype, _ = self._out_spec(bottoms)
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            self._run_forward([b.detach().cpu().numpy().astype(np_dtype) for b in bottoms],
                              [p.detach().cpu().numpy().astype(np_dtype) for p in params], np_dtype)
            return ()
        return tuple(_PythonLayerFn.apply(self, len(bottoms), *bottoms, *params))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, module={self.module_name!r}, layer={self.class_name!r}"
