"""pycaffe's API on caffe-compat: ``import caffe_compat.pycaffe as caffe``.

Everything a legacy script uses from ``import caffe``:

- nets and layers: ``Net`` (pycaffe's stateful view of a caffe-compat net: ``blobs``,
  ``params``, ``layers``, ``forward``/``backward`` with ranges, net surgery, ``save``...),
  ``Layer`` (base class of Python layers), ``Blob``, ``TRAIN``/``TEST``;
- solvers: ``SGDSolver``, ``NesterovSolver``, ``AdaGradSolver``, ``RMSPropSolver``,
  ``AdaDeltaSolver``, ``AdamSolver``, ``get_solver``;
- the process switches ``set_mode_cpu``, ``set_mode_gpu``, ``set_device``,
  ``set_random_seed``, and ``layer_type_list``; ``init_log``/``log``, ``Timer``, and the
  multi-GPU switches of a build without NCCL (``has_nccl()`` False, ``NCCL`` refuses);
- ``io`` (conversions, ``load_image``, ``Transformer``...), ``Classifier``, ``Detector``;
- net specification: ``layers``, ``params``, ``NetSpec``, ``to_proto`` (module ``net_spec``);
  ``coord_map``: ``coord_map_from_to`` and ``crop`` (FCN's aligning Crop layers);
- ``draw``: ``get_pydot_graph``, ``draw_net``, ``draw_net_to_file`` (DOT text without pydot;
  images through Graphviz's ``dot`` where it is installed);
- ``proto.caffe_pb2``: caffe-compat's schema (BVLC's fields plus the Fast R-CNN fork's).

To run an unchanged script whose ``import caffe`` should get this module, use
``caffe-compat run script.py ...`` or ``python -m caffe_compat.pycaffe script.py ...``
(see :mod:`caffe_compat.pycaffe.runner`).  While a ``type: "Python"`` layer's module is
imported or run, ``import caffe`` resolves here too (see
:func:`caffe_compat.layers.python.caffe_alias`) unless a real Caffe is already imported.

The heavy parts (torch, the net) load on first use, so that importing this module for
``Layer`` alone stays cheap.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, List, Tuple

from caffe_compat.protos import caffe_pb2 as _caffe_pb2
from caffe_compat.pycaffe.layer import TEST, TRAIN, Blob, BlobVec, Layer, Phase

__version__ = "1.0.0"

#: ``caffe.proto`` with its one module, ``caffe.proto.caffe_pb2``
proto = types.ModuleType(__name__ + ".proto", "Caffe's schema (caffe_pb2).")
proto.caffe_pb2 = _caffe_pb2  # type: ignore[attr-defined]
proto.__path__ = []  # type: ignore[attr-defined]  (a package, so 'import ...proto.caffe_pb2' works)
sys.modules.setdefault(proto.__name__, proto)
sys.modules.setdefault(proto.__name__ + ".caffe_pb2", _caffe_pb2)

_LAZY: Dict[str, Tuple[str, str]] = {
    "Net": ("_net", "Net"),
    "Solver": ("_solver", "Solver"),
    "SGDSolver": ("_solver", "SGDSolver"),
    "NesterovSolver": ("_solver", "NesterovSolver"),
    "AdaGradSolver": ("_solver", "AdaGradSolver"),
    "RMSPropSolver": ("_solver", "RMSPropSolver"),
    "AdaDeltaSolver": ("_solver", "AdaDeltaSolver"),
    "AdamSolver": ("_solver", "AdamSolver"),
    "get_solver": ("_solver", "get_solver"),
    "set_mode_cpu": ("_mode", "set_mode_cpu"),
    "set_mode_gpu": ("_mode", "set_mode_gpu"),
    "set_device": ("_mode", "set_device"),
    "set_random_seed": ("_mode", "set_random_seed"),
    "Classifier": ("classifier", "Classifier"),
    "Detector": ("detector", "Detector"),
    "layers": ("net_spec", "layers"),
    "params": ("net_spec", "params"),
    "NetSpec": ("net_spec", "NetSpec"),
    "to_proto": ("net_spec", "to_proto"),
    "init_log": ("_process", "init_log"),
    "log": ("_process", "log"),
    "has_nccl": ("_process", "has_nccl"),
    "set_solver_count": ("_process", "set_solver_count"),
    "solver_count": ("_process", "solver_count"),
    "set_solver_rank": ("_process", "set_solver_rank"),
    "solver_rank": ("_process", "solver_rank"),
    "set_multiprocess": ("_process", "set_multiprocess"),
    "NCCL": ("_process", "NCCL"),
    "Timer": ("_process", "Timer"),
}
_SUBMODULES = ("io", "draw", "net_spec", "coord_map", "classifier", "detector", "pycaffe", "runner",
               "_caffe")


def layer_type_list() -> List[str]:
    """Every layer type caffe-compat can build (Caffe's registered types)."""
    from caffe_compat.layers import registry

    return sorted(registry.registered_types())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        mod, attr = _LAZY[name]
        value = getattr(importlib.import_module(f"{__name__}.{mod}"), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'caffe' ({__name__}) has no attribute '{name}'")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_SUBMODULES))


__all__ = ["Layer", "Blob", "BlobVec", "Phase", "TRAIN", "TEST", "proto", "layer_type_list",
           "__version__", *_LAZY, "io"]
