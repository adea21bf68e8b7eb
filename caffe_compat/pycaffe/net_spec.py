"""pycaffe's net specification: write prototxts from Python (``caffe.layers``, ``caffe.params``,
``caffe.NetSpec``, ``caffe.to_proto``), with BVLC's naming and parameter rules.

- ``L.Convolution(bottom, kernel_size=3, num_output=8)`` is a layer function call; keyword
  arguments go into the layer's own ``<type>_param`` message when it has that field,
  else into the LayerParameter (``param=[dict(lr_mult=1)]``, ``loss_weight=...``,
  ``include=dict(phase=...)``); keywords ending in ``param`` are always LayerParameter
  fields.  Lists fill repeated fields, dicts fill messages, a scalar given to a repeated
  field becomes a one-element list.
- ``ntop=k`` gives k tops (0: the call returns the layer itself), ``in_place=True`` reuses
  the bottoms' names as tops.
- Names: tops assigned to a NetSpec attribute take that name (and the layer takes its
  first top's name); other tops and layers are auto-named ``<Type><count>`` in the order
  they are reached.
- ``P.Pooling.MAX`` reads enum values from ``caffe_pb2.PoolingParameter``.
"""
from __future__ import annotations

from collections import Counter, OrderedDict
from typing import Any, Dict

from caffe_compat.protos import caffe_pb2

__all__ = ["layers", "params", "NetSpec", "to_proto", "Top", "Function", "param_name_dict",
           "assign_proto"]


def param_name_dict() -> Dict[str, str]:
    """Layer type name -> its parameter field prefix, e.g. 'Convolution' -> 'convolution'."""
    layer = caffe_pb2.LayerParameter()
    names = [f.name for f in layer.DESCRIPTOR.fields if f.name.endswith("_param")]
    type_names = [type(getattr(layer, s)).__name__ for s in names]
    return dict(zip([t[:-len("Parameter")] for t in type_names], [s[:-len("_param")] for s in names]))


def to_proto(*tops) -> "caffe_pb2.NetParameter":
    """A NetParameter with every layer needed to compute ``tops`` (auto-named)."""
    layers: "OrderedDict[Any, Any]" = OrderedDict()
    autonames: Counter = Counter()
    for top in tops:
        top.fn._to_proto(layers, {}, autonames)
    net = caffe_pb2.NetParameter()
    net.layer.extend(layers.values())
    return net


def assign_proto(proto, name: str, val) -> None:
    """Set field ``name`` of ``proto`` from a Python value (lists, dicts, scalars)."""
    is_repeated = hasattr(getattr(proto, name), "extend")
    if is_repeated and not isinstance(val, list):
        val = [val]
    if isinstance(val, list):
        if val and isinstance(val[0], dict):
            for item in val:
                sub = getattr(proto, name).add()
                for k, v in item.items():
                    assign_proto(sub, k, v)
        else:
            getattr(proto, name).extend(val)
    elif isinstance(val, dict):
        for k, v in val.items():
            assign_proto(getattr(proto, name), k, v)
    else:
        setattr(proto, name, val)


class Top:
    """One output blob of a layer function."""

    def __init__(self, fn: "Function", n: int):
        self.fn = fn
        self.n = n

    def to_proto(self) -> "caffe_pb2.NetParameter":
        return to_proto(self)

    def _to_proto(self, layers, names, autonames):
        return self.fn._to_proto(layers, names, autonames)


class Function:
    """A layer: type, input Tops and parameters."""

    def __init__(self, type_name: str, inputs, params: Dict[str, Any]):
        self.type_name = type_name
        for index, inp in enumerate(inputs):
            if not isinstance(inp, Top):
                raise TypeError(f"{type_name} input {index} is not a Top (type is {type(inp)})")
        self.inputs = inputs
        self.params = params
        self.ntop = self.params.pop("ntop", 1)
        self.in_place = self.params.pop("in_place", False)
        self.tops = tuple(Top(self, n) for n in range(self.ntop))

    def _get_name(self, names, autonames) -> str:
        if self not in names and self.ntop > 0:
            names[self] = self._get_top_name(self.tops[0], names, autonames)
        elif self not in names:
            autonames[self.type_name] += 1
            names[self] = self.type_name + str(autonames[self.type_name])
        return names[self]

    def _get_top_name(self, top: Top, names, autonames) -> str:
        if top not in names:
            autonames[top.fn.type_name] += 1
            names[top] = top.fn.type_name + str(autonames[top.fn.type_name])
        return names[top]

    def _to_proto(self, layers, names, autonames) -> None:
        if self in layers:
            return
        bottom_names = []
        for inp in self.inputs:
            inp._to_proto(layers, names, autonames)
            bottom_names.append(layers[inp.fn].top[inp.n])
        layer = caffe_pb2.LayerParameter()
        layer.type = self.type_name
        layer.bottom.extend(bottom_names)
        if self.in_place:
            layer.top.extend(layer.bottom)
        else:
            for top in self.tops:
                layer.top.append(self._get_top_name(top, names, autonames))
        layer.name = self._get_name(names, autonames)
        for k, v in self.params.items():
            if k.endswith("param"):
                assign_proto(layer, k, v)
            else:
                try:
                    assign_proto(getattr(layer, _param_names[self.type_name] + "_param"), k, v)
                except (AttributeError, KeyError):
                    assign_proto(layer, k, v)
        layers[self] = layer


class NetSpec:
    """Named tops: assign ``n.conv1 = L.Convolution(...)``; ``n.to_proto()`` writes them all."""

    def __init__(self):
        super().__setattr__("tops", OrderedDict())

    def __setattr__(self, name: str, value) -> None:
        self.tops[name] = value

    def __getattr__(self, name: str):
        try:
            return self.tops[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setitem__(self, key: str, value) -> None:
        self.__setattr__(key, value)

    def __getitem__(self, item: str):
        return self.tops[item]

    def to_proto(self) -> "caffe_pb2.NetParameter":
        names = {v: k for k, v in self.tops.items()}
        autonames: Counter = Counter()
        layers: "OrderedDict[Any, Any]" = OrderedDict()
        for _, top in self.tops.items():
            top._to_proto(layers, names, autonames)
        net = caffe_pb2.NetParameter()
        net.layer.extend(layers.values())
        return net


class Layers:
    """``L.<Type>(*bottoms, **params)``: a layer function of any Caffe type."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def layer_fn(*args, **kwargs):
            fn = Function(name, args, kwargs)
            if fn.ntop == 0:
                return fn
            if fn.ntop == 1:
                return fn.tops[0]
            return fn.tops
        return layer_fn


class Parameters:
    """``P.<Type>.<ENUM>``: enum values of ``caffe_pb2.<Type>Parameter``."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        class Param:
            def __getattr__(self, param_name: str):
                return getattr(getattr(caffe_pb2, name + "Parameter"), param_name)
        return Param()


_param_names = param_name_dict()
layers = Layers()
params = Parameters()
