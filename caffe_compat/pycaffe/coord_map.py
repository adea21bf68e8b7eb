"""``caffe.coord_map``: how one NetSpec top's spatial coordinates relate to another's, and
``crop(top_from, top_to)``, the Crop layer that aligns them (FCN's score and skip layers:
``n.score = crop(n.upscore, n.data)``).

A coordinate map is ``(axis, a, b)``: a layer sends a bottom coordinate ``x`` to the top
coordinate ``a * x + b`` on every axis after ``axis`` (``a``/``b`` hold one value per
spatial axis, or one for all).  pycaffe's conventions are kept:

* Convolution / Pooling / Im2col: ``a = 1/stride``, ``b = (pad - (extent - 1)/2) / stride``
  with ``extent = (kernel - 1) * dilation + 1`` (a window's centre); Deconvolution: the
  inverse, ``a = stride``, ``b = (extent - 1)/2 - pad``; ``axis`` is the layer's
  ``axis`` (default 1, the channel axis).  Pooling's rounding (ceil) only changes the
  output's size, not where its windows sit, so it plays no part.
* Crop: ``(axis - 1, 1, -offset)``; pointwise layers (``PASS_THROUGH_LAYERS``):
  ``(None, 1, 0)``, valid on any axis.  Any other layer raises
  :class:`UndefinedMapException`; the search treats its top as a dead end.
* :func:`coord_map_from_to` walks back from both tops to the nearest common ancestor and
  returns the map from ``top_from``'s coordinates to ``top_to``'s; :func:`crop` needs
  ``a == 1`` and an integral ``b <= 0`` and writes ``crop_param { axis: axis + 1
  offset: -b }``.

The arithmetic is exact (fractions, handed out as float arrays like pycaffe's), so no
float rounding decides whether a crop is integral.  Differences from pycaffe, all where it
failed: legacy ``kernel_h``/``_w``, ``stride_h``/``_w``, ``pad_h``/``_w`` are read (pycaffe
asserted); Pooling's parameters may come in a ``pooling_param`` dict (KeyError); global
pooling is undefined (KeyError); Concat on the channel axis and the pointwise Clip and
Swish pass through (the search stopped there); a map through pointwise layers only is
refused by :func:`crop` with an AssertionError (AttributeError).  When several common
ancestors exist the nearest to ``top_to`` is used (pycaffe: set order; the maps agree
wherever the net is consistent).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Sequence, Tuple

import numpy as np

from caffe_compat.pycaffe.net_spec import Function, Top, layers as L

__all__ = ["PASS_THROUGH_LAYERS", "UndefinedMapException", "AxisMismatchException",
           "conv_params", "crop_params", "coord_map", "compose", "inverse",
           "coord_map_from_to", "crop"]

#: layers that leave coordinates as they are (pycaffe's list, plus Clip and Swish)
PASS_THROUGH_LAYERS = ["AbsVal", "BatchNorm", "Bias", "BNLL", "Dropout", "Eltwise", "ELU", "Log",
                       "LRN", "Exp", "MVN", "Power", "ReLU", "PReLU", "Scale", "Sigmoid", "Split",
                       "TanH", "Threshold", "Clip", "Swish"]
_WINDOW_LAYERS = ("Convolution", "Pooling", "Im2col", "Deconvolution")

Vec = Tuple[Fraction, ...]
Triple = Tuple[Optional[int], Any, Any]


class UndefinedMapException(Exception):
    """The layer has no coordinate map (InnerProduct, Reshape, global pooling...)."""


class AxisMismatchException(Exception):
    """Two maps on a path start their spatial axes at different axes."""


# ============================================================================ exact maps
@dataclass(frozen=True)
class _Map:
    """``x -> a * x + b`` per spatial axis after ``axis`` (None: any axis), exactly."""

    axis: Optional[int]
    a: Vec
    b: Vec

    def after(self, inner: "_Map") -> "_Map":
        """``self(inner(x))``: ``inner`` maps an earlier top's coordinates into ours."""
        if self.axis is None or inner.axis is None or self.axis == inner.axis:
            axis = inner.axis if self.axis is None else self.axis
        else:
            raise AxisMismatchException(f"coordinate maps on axes {self.axis} and {inner.axis}")
        return _Map(axis, _zip(lambda x, y: x * y, self.a, inner.a),
                    _zip(lambda x, y, z: x * y + z, self.a, inner.b, self.b))

    def inverse(self) -> "_Map":
        return _Map(self.axis, tuple(1 / x for x in self.a),
                    _zip(lambda a, b: -b / a, self.a, self.b))


_IDENTITY = _Map(None, (Fraction(1),), (Fraction(0),))


def _zip(op: Callable[..., Fraction], *vecs: Vec) -> Vec:
    """``op`` axis by axis; a one-value vector stands for every axis (numpy's broadcasting,
    so a and b keep the lengths pycaffe's arrays have)."""
    n = max(len(v) for v in vecs)
    if any(len(v) not in (1, n) for v in vecs):
        raise ValueError(f"coordinate maps over different numbers of spatial axes: "
                         f"{sorted({len(v) for v in vecs})}")
    return tuple(op(*(v[i] if len(v) > 1 else v[0] for v in vecs)) for i in range(n))


def _vec(value: Any) -> Vec:
    """A parameter (scalar or list) as exact numbers."""
    items = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
    if not items:
        raise ValueError("empty spatial parameter")
    return tuple(Fraction(v) for v in items)


# ============================================================================ layer params
def _merged_params(fn: Function, nested: str) -> Dict[str, Any]:
    """The layer's keyword parameters with those of its ``<nested>`` dict on top (NetSpec
    routes both into the same message)."""
    params = {k: v for k, v in fn.params.items() if not k.endswith("param")}
    inner = fn.params.get(nested)
    if isinstance(inner, Mapping):
        params.update(inner)
    return params


def _pick(params: Mapping[str, Any], name: str, h: str, w: str, default: Any) -> Vec:
    """``name`` (scalar or list), else the legacy ``h``/``w`` pair, else ``default``."""
    if h in params or w in params:
        if h not in params or w not in params:
            raise ValueError(f"{h} and {w} must be given together")
        return _vec([params[h], params[w]])
    value = params.get(name)
    return _vec(default if value is None or (isinstance(value, list) and not value) else value)


def _window(fn: Function) -> Tuple[int, Vec, Vec, Vec]:
    """(axis, stride, extent, pad) of a Convolution/Deconvolution/Im2col/Pooling layer;
    extent is the dilated kernel's span, ``(kernel - 1) * dilation + 1``."""
    pooling = fn.type_name == "Pooling"
    p = _merged_params(fn, "pooling_param" if pooling else "convolution_param")
    if pooling and p.get("global_pooling"):
        raise UndefinedMapException(f"global pooling ({fn.type_name}) has no coordinate map")
    if "kernel_size" not in p and "kernel_h" not in p:
        raise ValueError(f"{fn.type_name} layer without kernel_size")
    kernel = _pick(p, "kernel_size", "kernel_h", "kernel_w", 1)
    stride = _pick(p, "stride", "stride_h", "stride_w", 1)
    pad = _pick(p, "pad", "pad_h", "pad_w", 0)
    dilation = _vec(1 if pooling else p.get("dilation", 1))
    extent = _zip(lambda k, d: (k - 1) * d + 1, kernel, dilation)
    axis = 1 if pooling else int(p.get("axis", 1))
    return axis, stride, extent, pad


def conv_params(fn: Function) -> Tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """pycaffe's helper: (axis, stride, dilated kernel extent, pad) as arrays."""
    axis, stride, extent, pad = _window(fn)
    return axis, *(np.array([int(x) for x in v]) for v in (stride, extent, pad))


def _crop(fn: Function) -> Tuple[int, Vec]:
    p = _merged_params(fn, "crop_param")
    return int(p.get("axis", 2)), _vec(p.get("offset", 0))


def crop_params(fn: Function) -> Tuple[int, np.ndarray]:
    """pycaffe's helper: a Crop layer's (axis, offsets), with Caffe's defaults (2, [0])."""
    axis, offset = _crop(fn)
    return axis, np.array([int(x) for x in offset])


def _concat_axis(fn: Function) -> int:
    p = _merged_params(fn, "concat_param")
    return int(p.get("axis", p.get("concat_dim", 1)))


def _layer_map(fn: Function) -> _Map:
    """The exact map from ``fn``'s bottoms' coordinates to its tops'."""
    kind = fn.type_name
    if kind in _WINDOW_LAYERS:
        axis, stride, extent, pad = _window(fn)
        centre = tuple((e - 1) / 2 for e in extent)  # of a window, from its first input
        if kind == "Deconvolution":
            return _Map(axis, stride, _zip(lambda c, p: c - p, centre, pad))
        return _Map(axis, tuple(1 / s for s in stride),
                    _zip(lambda s, p, c: (p - c) / s, stride, pad, centre))
    if kind in PASS_THROUGH_LAYERS or (kind == "Concat" and _concat_axis(fn) == 1):
        return _IDENTITY
    if kind == "Crop":
        axis, offset = _crop(fn)
        return _Map(axis - 1, (Fraction(1),), tuple(-o for o in offset))
    raise UndefinedMapException(f"layer type {kind} has no coordinate map")


def _public(m: _Map) -> Triple:
    """pycaffe's form: (None, 1, 0) for the identity, else float arrays."""
    if m.axis is None:
        return None, 1, 0
    return m.axis, np.array([float(x) for x in m.a]), np.array([float(x) for x in m.b])


def coord_map(fn: Function) -> Triple:
    """(axis, a, b): a bottom coordinate ``x`` of ``fn`` lands on top coordinate ``a*x + b``."""
    return _public(_layer_map(fn))


def compose(base_map: Triple, next_map: Triple) -> Triple:
    """``base_map`` after ``next_map`` (pycaffe's argument order): scales multiply and
    ``next_map``'s shift is scaled by ``base_map``'s scale."""
    ax1, a1, b1 = base_map
    ax2, a2, b2 = next_map
    if ax1 is not None and ax2 is not None and ax1 != ax2:
        raise AxisMismatchException(f"coordinate maps on axes {ax1} and {ax2}")
    return (ax2 if ax1 is None else ax1), np.multiply(a1, a2), np.add(np.multiply(a1, b2), b1)


def inverse(coord_map: Triple) -> Triple:
    """The map back: ``x = (y - b) / a``."""
    ax, a, b = coord_map
    return ax, np.divide(1.0, a), np.divide(np.negative(b), a)


# ============================================================================ graph walk
def _mapped_bottoms(fn: Function) -> Iterable[Top]:
    """A Crop's second bottom only lends its shape: coordinates come from the first."""
    return fn.inputs[:1] if fn.type_name == "Crop" else fn.inputs


def _walk_back(start: Top) -> Iterator[Tuple[Top, _Map]]:
    """Every top reachable backwards from ``start`` through mapped layers, nearest first,
    with the map from its coordinates to ``start``'s."""
    maps: Dict[Top, _Map] = {start: _IDENTITY}
    queue = deque([start])
    while queue:
        top = queue.popleft()
        yield top, maps[top]
        if not top.fn.inputs:
            continue
        try:
            step = _layer_map(top.fn)
        except UndefinedMapException:
            continue
        for bottom in _mapped_bottoms(top.fn):
            if bottom not in maps:
                maps[bottom] = maps[top].after(step)
                queue.append(bottom)


def _exact_from_to(top_from: Top, top_to: Top) -> _Map:
    from_maps = dict(_walk_back(top_from))
    for top, to_map in _walk_back(top_to):   # the nearest common ancestor
        if top in from_maps:
            return to_map.after(from_maps[top].inverse())
    raise RuntimeError("Could not compute map between tops; are they connected by spatial "
                       "layers?")


def coord_map_from_to(top_from: Top, top_to: Top) -> Triple:
    """(axis, a, b) with ``top_to``'s coordinate ``= a * top_from's + b``, through the
    nearest top both come from (RuntimeError when none is reachable through mapped layers)."""
    return _public(_exact_from_to(top_from, top_to))


def _floats(v: Sequence[Fraction]) -> list:
    return [float(x) for x in v]


def crop(top_from: Top, top_to: Top) -> Top:
    """``L.Crop(top_from, top_to, crop_param=dict(axis=..., offset=[...]))`` cutting
    ``top_from`` down to ``top_to``'s region.  AssertionError (as pycaffe) when the two
    differ in scale, ``top_from`` would need padding, or the offset is fractional."""
    m = _exact_from_to(top_from, top_to)
    if m.axis is None:
        raise AssertionError("no spatial layer between the tops: no crop axis to align on")
    if any(x != 1 for x in m.a):
        raise AssertionError(f"scale mismatch on crop (a = {_floats(m.a)})")
    if any(x > 0 for x in m.b):
        raise AssertionError(f"cannot crop negative offset (b = {_floats(m.b)})")
    if any(x.denominator != 1 for x in m.b):
        raise AssertionError(f"cannot crop noninteger offset (b = {_floats(m.b)})")
    return L.Crop(top_from, top_to,
                  crop_param=dict(axis=m.axis + 1, offset=[int(-x) for x in m.b]))
