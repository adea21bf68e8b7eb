"""A pycaffe-compatible ``caffe`` module, so legacy Python layers run without Caffe.

Only the core that user layers need lives here for now: ``Layer``, ``Blob``, ``TRAIN``,
``TEST`` and ``proto.caffe_pb2`` (caffe-compat's schema, the fork's fields included).
While a ``type: "Python"`` layer's module is imported or run, ``import caffe`` resolves
to this module (see :func:`caffe_compat.layers.python.caffe_alias`) unless a real Caffe
is already imported.
"""
from __future__ import annotations

import sys
import types

from caffe_compat.protos import caffe_pb2 as _caffe_pb2
from caffe_compat.pycaffe.layer import TEST, TRAIN, Blob, BlobVec, Layer, Phase

#: ``caffe.proto`` with its one module, ``caffe.proto.caffe_pb2``
proto = types.ModuleType(__name__ + ".proto", "Caffe's schema (caffe_pb2).")
proto.caffe_pb2 = _caffe_pb2  # type: ignore[attr-defined]
proto.__path__ = []  # type: ignore[attr-defined]  (a package, so 'import ...proto.caffe_pb2' works)
sys.modules.setdefault(proto.__name__, proto)
sys.modules.setdefault(proto.__name__ + ".caffe_pb2", _caffe_pb2)

__all__ = ["Layer", "Blob", "BlobVec", "Phase", "TRAIN", "TEST", "proto"]
