"""The one layer registry: a Caffe type name (or a Python layer's ``module.layer``) -> class.

The net builder knows nothing about individual layer types; it asks this registry.
Layer families register themselves with the decorator when ``caffe_compat.layers`` is
imported::

    @register("ReLU")
    class ReLU(Layer): ...

    @register_python("rpn.proposal_layer.ProposalLayer")
    class ProposalLayer(Layer): ...
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, Type, TypeVar

from caffe_compat.errors import UnknownLayerError

T = TypeVar("T")

_TYPES: Dict[str, type] = {}
_PYTHON: Dict[str, type] = {}


def register(*type_names: str) -> Callable[[T], T]:
    """Register a layer class under one or more Caffe type names."""

    def deco(cls: T) -> T:
        for name in type_names:
            if name in _TYPES and _TYPES[name] is not cls:
                raise ValueError(f"layer type '{name}' registered twice ({_TYPES[name]} and {cls})")
            _TYPES[name] = cls  # type: ignore[assignment]
        cls.type_names = tuple(type_names)  # type: ignore[attr-defined]
        return cls

    return deco


def register_python(*module_layers: str) -> Callable[[T], T]:
    """Register a native implementation for ``python_param { module: M layer: L }`` as 'M.L'."""

    def deco(cls: T) -> T:
        for name in module_layers:
            _PYTHON[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def _ensure_loaded() -> None:
    import caffe_compat.layers  # noqa: F401  (registers every family)


def lookup(type_name: str, *, layer: str | None = None) -> type:
    """The class for a Caffe type name; an error lists near matches and how to register."""
    _ensure_loaded()
    cls = _TYPES.get(type_name)
    if cls is None:
        near = difflib.get_close_matches(type_name, list(_TYPES), n=3, cutoff=0.6)
        near += [t for t in _TYPES if t.lower() == type_name.lower() and t not in near]
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownLayerError(
            f"unknown layer type '{type_name}'.{hint} Register an implementation with "
            "@caffe_compat.layers.registry.register('%s') on a Layer subclass." % type_name,
            layer=layer,
        )
    return cls


def lookup_python(module_layer: str) -> type | None:
    """The native class for a Python layer 'module.layer', or None (then the shim runs it)."""
    _ensure_loaded()
    return _PYTHON.get(module_layer)


def registered_types() -> list[str]:
    _ensure_loaded()
    return sorted(_TYPES)


def registered_python_layers() -> list[str]:
    _ensure_loaded()
    return sorted(_PYTHON)


def resolve(param) -> type:
    """The class that implements one ``LayerParameter``.

    ``type: "Python"`` layers resolve to a native implementation registered for their
    ``python_param { module layer }`` when there is one, else to the class registered as
    "Python" (the pycaffe-compatible shim that imports and runs the user's module).
    """
    if param.type == "Python":
        key = f"{param.python_param.module}.{param.python_param.layer}"
        native = lookup_python(key)
        if native is not None:
            return native
    return lookup(param.type, layer=param.name)
