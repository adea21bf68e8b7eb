"""Leave Caffe behind: a built net as ONNX, a ``torch.export`` program, or PyTorch code.

* :func:`to_onnx` (:mod:`caffe_compat.export.onnx`): an ONNX model (opset 18) for
  onnxruntime and friends, ROIPooling as ``MaxRoiPool``, proposals' NMS as
  ``NonMaxSuppression``, dynamic image size where the net allows (checked over all
  sizes: :func:`caffe_compat.export.exported.spatial_check`);
* :func:`to_exported` (:mod:`caffe_compat.export.exported`): a ``torch.export``
  ExportedProgram (``.pt2``), dynamic likewise;
* :func:`to_python` (:mod:`caffe_compat.export.python_code`): a standalone, readable
  PyTorch module with its weights in ``.safetensors``.

All three export the interpreter's exact path (not the oneDNN inference plan), so their
outputs are caffe-compat's within float rounding; docs/export.md lists the decisions.
The optional packages (onnx, onnxscript) are imported only when used.
"""
from __future__ import annotations

from typing import Optional

from caffe_compat.export.exported import to_exported
from caffe_compat.export.graph import ExportError, ExportModule
from caffe_compat.export.onnx import to_onnx

__all__ = ["to_onnx", "to_exported", "to_python", "ExportError", "ExportModule"]


def to_python(net, path: str, *, weights_path: Optional[str] = None) -> None:
    """Write ``net`` as a readable PyTorch module to ``path`` (weights beside it);
    see :mod:`caffe_compat.export.python_code`."""
    from caffe_compat.export.python_code import to_python as write

    write(net, path, weights_path=weights_path)
