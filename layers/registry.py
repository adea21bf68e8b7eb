"""The one layer registry: a Caffe type name (or a Python layer's ``module.layer``) -> class.

The net builder knows nothing about individual layer types; it asks this registry.
Layer families register themselves with the decorator when ``caffe_compat.layers`` is
imported, which Python does before this module (its package) can be used, so every built-in
family is registered by the time anything is looked up::

    @register("ReLU")
    class ReLU(Layer): ...

    @register_python("rpn.proposal_layer.ProposalLayer")
    class ProposalLayer(Layer): ...

Users add layer types the same way from their own package (``caffe_compat.register_layer``
is this ``register``), or without importing anything first through an entry point in the
``caffe_compat.layers`` group, named by the Caffe type, pointing at the Layer subclass (or at a
module whose import registers its layers); it is loaded the first time the type is looked up::

    [project.entry-points."caffe_compat.layers"]
    Yolov3 = "mypkg.layers:Yolov3"

Python layers of a pipeline that lives outside ``caffe_compat.layers`` (py-faster-rcnn's,
in :mod:`caffe_compat.frcnn.layers`) are *provided lazily*: :data:`PYTHON_PROVIDERS` names
the module that registers each ``module.layer`` key, and the first lookup of such a key
imports it.  A net without those layers never loads that code.
"""
from __future__ import annotations

import difflib
import importlib
from typing import Callable, Dict, Mapping, Type, TypeVar

from caffe_compat.errors import UnknownLayerError

T = TypeVar("T")

_TYPES: Dict[str, type] = {}
_PYTHON: Dict[str, type] = {}


def register(*type_names: str, override: bool = False) -> Callable[[T], T]:
    """Register a layer class under one or more Caffe type names.

    ``override=True`` replaces an implementation registered before (a fork whose layer of the
    same name means something else); otherwise registering a taken name is an error."""

    def deco(cls: T) -> T:
        for name in type_names:
            if name in _TYPES and _TYPES[name] is not cls and not override:
                raise ValueError(f"layer type '{name}' registered twice ({_TYPES[name]} and {cls}); "
                                 "pass override=True to replace it")
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


ENTRY_POINT_GROUP = "caffe_compat.layers"

#: the two ways to run a model that uses something caffe-compat does not know (every
#: unknown-type and unknown-field error ends with it)
WAYS_FORWARD = (
    "Ways forward: (1) give the fork's own caffe.proto with schema='fork/caffe.proto' "
    "(--schema on the command line) so its param blocks parse; (2) register an implementation "
    "of each missing layer type from your own package: @caffe_compat.register_layer('Type') on a "
    "caffe_compat.layers.Layer subclass, or an entry point in the 'caffe_compat.layers' group.")

#: Python-layer key ('module.layer') -> the module whose import registers its native class.
PYTHON_PROVIDERS: Mapping[str, str] = {
    "rpn.anchor_target_layer.AnchorTargetLayer": "caffe_compat.frcnn.layers",
    "rpn.proposal_layer.ProposalLayer": "caffe_compat.frcnn.layers",
    "rpn.proposal_target_layer.ProposalTargetLayer": "caffe_compat.frcnn.layers",
    "roi_data_layer.layer.RoIDataLayer": "caffe_compat.frcnn.layers",
}


def _from_entry_point(type_name: str) -> type | None:
    """Load the ``caffe_compat.layers`` entry point named ``type_name``, if one is installed."""
    import inspect
    from importlib.metadata import entry_points

    try:
        eps = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == type_name]
    except Exception:  # a broken distribution's metadata must not break lookups
        return None
    for ep in eps:
        try:
            obj = ep.load()
        except Exception as e:
            raise UnknownLayerError(f"layer type '{type_name}': its entry point {ep.value!r} "
                                    f"failed to load: {type(e).__name__}: {e}") from e
        if inspect.isclass(obj) and type_name not in _TYPES:
            register(type_name)(obj)
        if type_name in _TYPES:
            return _TYPES[type_name]
    return None


def is_registered(type_name: str) -> bool:
    """Whether ``type_name`` has an implementation (built in, registered, or an entry point)."""
    return type_name in _TYPES or _from_entry_point(type_name) is not None


def lookup(type_name: str, *, layer: str | None = None) -> type:
    """The class for a Caffe type name; an error names the fork, near matches and the ways forward."""
    cls = _TYPES.get(type_name) or _from_entry_point(type_name)
    if cls is None:
        from caffe_compat.forks import describe_type

        near = difflib.get_close_matches(type_name, list(_TYPES), n=3, cutoff=0.6)
        near += [t for t in _TYPES if t.lower() == type_name.lower() and t not in near]
        hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
        raise UnknownLayerError(
            f"unknown layer type '{type_name}'{describe_type(type_name)}.{hint} {WAYS_FORWARD}",
            layer=layer,
        )
    return cls


def lookup_python(module_layer: str) -> type | None:
    """The native class for a Python layer 'module.layer', or None (then the shim runs it).

    A key of :data:`PYTHON_PROVIDERS` not registered yet imports its provider first."""
    if module_layer not in _PYTHON and module_layer in PYTHON_PROVIDERS:
        importlib.import_module(PYTHON_PROVIDERS[module_layer])
    return _PYTHON.get(module_layer)


def registered_types() -> list[str]:
    return sorted(_TYPES)


def registered_python_layers() -> list[str]:
    """Every Python-layer key with a native class (imports the lazy providers)."""
    for module in sorted(set(PYTHON_PROVIDERS.values())):
        importlib.import_module(module)
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
