"""A built net as one traceable function: what ``torch.export`` and the ONNX exporter see.

The interpreter's ``Net.forward`` feeds inputs, records blobs, may run the oneDNN inference
plan and keeps Caffe's ``net.blobs``; none of that belongs in an exported graph.
:class:`ExportModule` runs the same layer modules on the exact (layer-by-layer, NCHW) path,
inputs as positional tensors in ``net.input_names`` order, outputs as a tuple in
``net.output_names`` order: the graph a tracer records is exactly the interpreter's exact
path.

Most layers export through their own ``forward``.  A layer whose forward branches on data
in Python (the Proposal layer's NMS and top-N) or calls a kernel with an autograd wrapper
(ROIPooling) has an *export form* in :data:`EXPORT_FORMS` (:mod:`caffe_compat.export.ops`):
a function with the same numbers written without host round trips.  Layers that cannot be
expressed at all are named in :data:`NOT_EXPORTABLE` with the reason, and
:func:`check_exportable` refuses a net that has one, naming every such layer at once.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from caffe_compat.errors import CaffeCompatError, GraphError
from caffe_compat.export.ops import EXPORT_FORMS

__all__ = ["ExportModule", "EXPORT_FORMS", "NOT_EXPORTABLE", "check_exportable", "example_inputs",
           "example_rois", "layer_type", "ExportError"]


class ExportError(GraphError):
    """A net (or one of its layers) that the chosen export format cannot express."""


#: Caffe type -> why no exported graph can hold it (checked before tracing)
NOT_EXPORTABLE: Dict[str, str] = {
    "Data": "it reads an LMDB/LevelDB data source at run time; export the deploy net (Input layers)",
    "ImageData": "it reads image files at run time; export the deploy net (Input layers)",
    "HDF5Data": "it reads HDF5 files at run time; export the deploy net (Input layers)",
    "WindowData": "it reads image windows from files at run time; export the deploy net",
    "DenseImageData": "it reads image files at run time; export the deploy net",
    "AnnotatedData": "it reads an annotated LMDB at run time; export the deploy net",
    "HDF5Output": "it writes HDF5 files as a side effect",
    "Python": "it runs arbitrary user Python code, which a graph cannot hold",
    "rpn.anchor_target_layer.AnchorTargetLayer": "it is a training layer (random anchor sampling "
                                                 "against ground truth); export the test net",
    "rpn.proposal_target_layer.ProposalTargetLayer": "it is a training layer (random RoI sampling "
                                                     "against ground truth); export the test net",
    "roi_data_layer.layer.RoIDataLayer": "it reads a training roidb at run time; export the test net",
}



def layer_type(entry) -> str:
    """The key of a net entry in the tables: its Caffe type, or 'module.layer' for Python."""
    if entry.type == "Python":
        p = entry.module.param.python_param if entry.module is not None else None
        if p is not None and p.module:
            return f"{p.module}.{p.layer}"
    return entry.type


def _feeds(entry) -> bool:
    return entry.module is not None and entry.module.accepts_feed


def check_exportable(net) -> None:
    """Refuse a net that cannot become a graph: every unbuilt or inexpressible layer is
    named, with why, in one :class:`ExportError`."""
    from caffe_compat.layers.python import PythonLayer  # the shim that imports user code

    problems: List[str] = []
    for e in net.entries:
        key = layer_type(e)
        if e.module is None:
            problems.append(f"layer '{e.name}' ({e.type}) is not built: {e.unbuilt_reason}")
        elif _feeds(e) and e.type not in ("Input", "MemoryData", "DummyData"):
            why = NOT_EXPORTABLE.get(key, "a data layer")
            problems.append(f"layer '{e.name}' ({e.type}) cannot be exported: {why}")
        elif key in NOT_EXPORTABLE and key not in EXPORT_FORMS:
            problems.append(f"layer '{e.name}' ({key}) cannot be exported: {NOT_EXPORTABLE[key]}")
        elif e.type == "Python" and key not in EXPORT_FORMS and isinstance(e.module, PythonLayer):
            problems.append(f"layer '{e.name}' (Python layer {key}) cannot be exported: "
                            f"{NOT_EXPORTABLE['Python']}")
        elif not _feeds(e) and not e.bottoms:
            problems.append(f"layer '{e.name}' ({e.type}) cannot be exported: it makes data from "
                            "nothing at run time (a data layer); export the deploy net")
    if problems:
        raise ExportError("; ".join(problems[:10]) + (f"; and {len(problems) - 10} more"
                                                     if len(problems) > 10 else ""),
                          where=net.source)
    if not net.input_names:
        raise ExportError("the net has no inputs (Input layers) to export a function of",
                          where=net.source)


class ExportModule(nn.Module):
    """``net`` as ``forward(*inputs) -> tuple of outputs`` on the exact path (see the
    module docstring).  ``inputs``: tensors in ``net.input_names`` order; outputs in
    ``net.output_names`` order (Caffe's net outputs).  ``outputs`` may name other blobs
    to return instead (any blob the net makes).  The layer modules are the net's own
    (weights are shared, not copied)."""

    def __init__(self, net, outputs: Optional[Sequence[str]] = None):
        super().__init__()
        check_exportable(net)
        object.__setattr__(self, "net", net)  # not a submodule: the layers below are
        self.input_names: List[str] = list(net.input_names)
        self.output_names: List[str] = list(outputs) if outputs is not None else list(net.output_names)
        unknown = [o for o in self.output_names if o not in net.blob_shapes]
        if unknown:
            raise ExportError(f"output(s) {', '.join(unknown[:5])} are not blobs of this net")
        #: the layers as submodules under identifier names (a graph's code names them:
        #: Caffe names such as 'in', 'conv1/dw' or 'fc.7' are not attribute names)
        self.layers = nn.ModuleDict()
        self._steps = []
        for e in net.entries:
            if _feeds(e):
                continue
            key = _identifier(e.name, self.layers)
            self.layers[key] = e.module
            self._steps.append((e, key, EXPORT_FORMS.get(layer_type(e))))

    def forward(self, *inputs: Tensor) -> Tuple[Tensor, ...]:
        blobs: Dict[str, Tensor] = dict(zip(self.input_names, inputs))
        for e, key, form in self._steps:
            bottoms = [blobs[b] for b in e.bottoms]
            module = self.layers[key]
            try:
                outs = form(module, *bottoms) if form is not None else module(*bottoms)
            except CaffeCompatError:  # the layer's own clear error (e.g. batch 1 only)
                raise
            except Exception as err:  # a tracer met something it cannot record: say where
                text = " ".join(str(err).split())
                raise ExportError(f"{layer_type(e)} cannot be traced: "
                                  f"{type(err).__name__}: {text[:300]}", where=self.net.source,
                                  layer=e.name) from err
            if isinstance(outs, Tensor):
                outs = (outs,)
            for t, o in zip(e.tops, outs):
                blobs[t] = o
        return tuple(blobs[n] for n in self.output_names)


def _identifier(name: str, taken) -> str:
    """A Python identifier, not a keyword, not in ``taken``, that reads like ``name``."""
    import keyword
    import re

    base = re.sub(r"\W", "_", name) or "layer"
    if base[0].isdigit() or keyword.iskeyword(base) or base.startswith("_"):
        base = f"layer_{base}"
    key, k = base, 1
    while key in taken:
        k += 1
        key = f"{base}_{k}"
    return key


def example_inputs(net, inputs: Optional[Mapping[str, Tensor]] = None) -> Tuple[Tensor, ...]:
    """Tensors to trace with, in ``net.input_names`` order: the given ones, else seeded
    normal data of each input's declared shape; an ``im_info`` input (py-faster-rcnn) gets
    ``[height, width, 1]`` of the image input so proposals are not all clipped away, a
    Fast R-CNN ``rois`` input (R, 5) boxes of image 0 inside the image, at least 4 of
    them (its declared 1 is a placeholder; a count of 0 or 1 would be traced as fixed)."""
    inputs = dict(inputs or {})
    gen = torch.Generator().manual_seed(0)
    out: List[Tensor] = []
    image_hw: Optional[Tuple[int, int]] = None
    for n in net.input_names:
        s = net.blob_shapes.get(n)
        if n not in inputs and s is not None and len(s) == 4:
            image_hw = image_hw or (int(s[2]), int(s[3]))
    for n in net.input_names:
        if n in inputs:
            out.append(torch.as_tensor(inputs[n], dtype=net.dtype))
            continue
        s = net.blob_shapes.get(n)
        if s is None:
            raise ExportError(f"input '{n}' has no known shape; give it with --input-shape "
                              f"{n}=D1,D2,... (input_shapes=)", where=net.source)
        if n == "im_info" and image_hw is not None and tuple(s)[-1:] == (3,):
            row = torch.tensor([float(image_hw[0]), float(image_hw[1]), 1.0], dtype=net.dtype)
            out.append(row.expand(tuple(s)).clone())
        elif n == "rois" and image_hw is not None and len(s) == 2 and s[1] == 5:
            out.append(example_rois(max(int(s[0]), 4), image_hw, gen, net.dtype))
        else:
            out.append(torch.randn(tuple(s), generator=gen, dtype=net.dtype) * 10)
    return tuple(out)



def example_rois(count: int, image_hw: Tuple[int, int], gen: torch.Generator,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """``count`` seeded ROIs ``[0, x1, y1, x2, y2]`` inside an ``image_hw`` image (batch index 0:
    a random one would read outside the batch)."""
    h, w = image_hw
    a = torch.rand(count, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])
    b = torch.rand(count, 2, generator=gen) * torch.tensor([w - 1.0, h - 1.0])
    boxes = torch.cat([torch.minimum(a, b), torch.maximum(a, b)], 1).floor()
    return torch.cat([torch.zeros(count, 1), boxes], 1).to(dtype)
