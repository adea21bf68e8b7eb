"""ONNX export: ``torch.export`` program -> ONNX (opset 18) with torch's dynamo exporter.

Why this route (docs/export.md has the whole list): the TorchScript exporter traces
Python ints of shapes as tensors, which the layers' shape arithmetic does not survive;
``torch.export`` (non-strict) runs the layers' own code with symbolic sizes and records
the data-dependent Proposal layer (``nonzero``, NMS with a data-dependent count) as
unbacked sizes.  torchvision's two ops get their ONNX form here:

* ``torchvision::roi_pool`` -> ``MaxRoiPool`` (onnxruntime's kernel rounds ROI corners
  half away from zero, sizes ``end - start + 1``, floor/ceil bins and empty bins 0 --
  Caffe's fork's arithmetic; the tests compare it against the interpreter);
* ``torchvision::nms`` -> ``NonMaxSuppression`` on the ``x2 + 1, y2 + 1`` boxes the export
  form hands it (:func:`caffe_compat.export.ops.legacy_nms`), so onnxruntime's IoU
  without ``+1`` equals Caffe's with it, and with strictly decreasing rank scores, so
  ties keep their order.

onnx and onnxscript are optional: imported here, when an export runs.
"""
from __future__ import annotations

import os
import warnings
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

from caffe_compat.export.exported import SpatialCheck, export_program, spatial_check
from caffe_compat.export.graph import ExportError

__all__ = ["to_onnx", "write_program", "OPSET"]

#: the ONNX opset written (MaxRoiPool and NonMaxSuppression are unchanged since 1 and 11;
#: 18 is the newest onnxscript's torch library targets and onnxruntime >= 1.14 runs)
OPSET = 18

#: the largest ``max_output_boxes_per_class`` (no cap: the layer's top-N slices after)
_NMS_ALL = 2 ** 31 - 1


def _need_onnx() -> None:
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise ExportError(f"ONNX export needs the '{mod}' package: pip install "
                              "'caffe-compat[export]' (onnx, onnxscript; onnxruntime to run it)"
                              ) from None


def _translations() -> Dict[object, object]:
    """ONNX forms of the torchvision ops the export forms use (onnxscript, traced)."""
    import torchvision  # noqa: F401  (registers torch.ops.torchvision)
    from onnxscript import opset18 as op

    def nms(boxes, scores, iou_threshold: float):
        """boxes (R, 4) x1 y1 x2 y2, scores (R,) -> kept indices (K,) int64, best first."""
        sel = op.NonMaxSuppression(op.Unsqueeze(boxes, [0]), op.Unsqueeze(scores, [0, 1]),
                                   op.Constant(value_int=_NMS_ALL),
                                   op.Constant(value_float=float(iou_threshold)),
                                   center_point_box=0)
        return op.Gather(sel, op.Constant(value_int=2), axis=1)

    def roi_pool(x, rois, spatial_scale: float, pooled_height: int, pooled_width: int):
        """Caffe's ROIPooling top; the argmax output (unused by any layer) is a stand-in."""
        out = op.MaxRoiPool(x, rois, pooled_shape=[int(pooled_height), int(pooled_width)],
                            spatial_scale=float(spatial_scale))
        return out, op.Cast(out, to=6)  # INT32

    def sort_stable(x, *, stable: bool = True, dim: int = -1, descending: bool = False):
        """A stable sort of a 1-D tensor: ``TopK`` over all of it, whose ties put the lower
        index first (the ONNX spec's rule), which is a stable sort either way."""
        k = op.Reshape(op.Size(x), [1])
        return op.TopK(x, k, axis=int(dim), largest=int(bool(descending)), sorted=1)

    return {torch.ops.aten.sort.stable: sort_stable,
            torch.ops.caffe_compat_export.nms.default: nms,
            torch.ops.torchvision.roi_pool.default: roi_pool}


def to_onnx(net, path: str, *, inputs: Optional[Mapping[str, Tensor]] = None,
            opset: int = OPSET, dynamic: Optional[bool] = None) -> SpatialCheck:
    """Write ``net`` (a TEST net with its weights) as an ONNX model to ``path`` (atomically).

    Inputs and outputs are named after the net's input and output blobs.  Shapes are
    those of ``inputs`` (tensors by input name) or the net's declared ones
    (``Net(..., input_shapes=)``); a Faster R-CNN net's ROI count stays dynamic.
    ``dynamic`` (image height and width of 4-D inputs): None (default) where the net
    allows it, checked (:func:`caffe_compat.export.exported.spatial_check`), else the
    traced size; True: dynamic or an error saying why not; False: the traced size.  The
    model's metadata ``caffe_compat.input_sizes`` says which sizes it takes.  A layer
    with no ONNX form is one :class:`~caffe_compat.export.graph.ExportError` naming it
    and why.  Returns the sizes the model takes (``.describe()``: ``static`` or the
    smallest of each dynamic axis)."""
    _need_onnx()
    return write_program(net, export_program(net, inputs, dynamic=dynamic), path, opset=opset)


def write_program(net, program, path: str, *, opset: int = OPSET) -> SpatialCheck:
    """Write an ExportedProgram of ``net`` (:func:`export_program`) as ONNX to ``path``;
    returns the sizes it takes (:func:`caffe_compat.export.exported.spatial_check`).  A
    program with symbolic sizes that the check refuses is an :class:`ExportError`: an
    ONNX model keeps no guards, it would compute wrong numbers at other sizes."""
    _need_onnx()
    sizes = spatial_check(program, list(net.input_names))
    if sizes.reason is not None:
        raise ExportError(f"the traced sizes cannot vary: {sizes.reason}; export it static "
                          "(dynamic=False)", where=net.source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            onnx_program = torch.onnx.export(
                program, dynamo=True, opset_version=int(opset), input_names=list(net.input_names),
                output_names=list(net.output_names), custom_translation_table=_translations(),
                verbose=False, report=False, optimize=True)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(_onnx_failure(program, e), where=net.source) from e
    from caffe_compat.atomic import atomic_path

    onnx_program.model.metadata_props["caffe_compat.input_sizes"] = sizes.describe()
    with atomic_path(os.fspath(path)) as tmp:
        onnx_program.save(tmp, external_data=False)
    return sizes


def _onnx_failure(program, e: BaseException) -> str:
    """The exporter's failure, naming the Caffe layer whose op has no ONNX form."""
    import re

    texts = []
    cause: Optional[BaseException] = e
    while cause is not None and len(texts) < 5:
        texts.append(" ".join(str(cause).split()))
        cause = cause.__cause__
    found = next((m.group(1) for t in texts for m in [re.search(r"translating node %(\w+)", t)] if m), None)
    layer, op_name = None, None
    for node in program.graph.nodes:
        if node.name == found:
            op_name = str(node.target)
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            if stack:
                layer = stack[-1][0].split("net.", 1)[-1]
    if op_name is not None:
        where = f"layer '{layer}': " if layer else ""
        return f"{where}{op_name} has no ONNX form in opset {OPSET} (torch's ONNX exporter)"
    return f"ONNX conversion failed: {texts[-1][:400]}"
