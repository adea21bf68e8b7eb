"""``torch.export``: a net as an ``ExportedProgram`` (``.pt2``), dynamic image size where
the net allows it.

The program is the net's exact path (:class:`caffe_compat.export.graph.ExportModule`):
inputs positional in ``net.input_names`` order, outputs a tuple in ``net.output_names``
order.  With ``dynamic=True`` the height and width of every 4-D input are
``Dim.AUTO``: symbolic where the layers allow any size (fully convolutional nets, Faster
R-CNN test nets), specialised to the traced size where a layer fixes them (an
InnerProduct after the convolutions); the batch stays as traced.
"""
from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional, Tuple

import torch
from torch import Tensor

from caffe_compat.export.graph import ExportError, ExportModule, example_inputs

__all__ = ["to_exported", "export_program", "dynamic_shapes_for"]


def dynamic_shapes_for(inputs: Tuple[Tensor, ...], dynamic: bool):
    """``dynamic_shapes`` for ``torch.export``: H and W of 4-D inputs ``Dim.AUTO``."""
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    # one entry: ExportModule.forward takes the inputs as ``*inputs``
    return (tuple({2: auto, 3: auto} if t.dim() == 4 else None for t in inputs),)


def export_program(net, inputs: Optional[Mapping[str, Tensor]] = None, *, dynamic: bool = False
                   ) -> "torch.export.ExportedProgram":
    """Trace ``net`` (a TEST net, weights loaded) into an ExportedProgram.

    ``inputs``: tensors by input name to trace with (default: seeded data of the declared
    shapes, :func:`caffe_compat.export.graph.example_inputs`).  A layer that cannot be
    traced is one :class:`ExportError` naming it."""
    module = ExportModule(net)
    # inputs that require grad: every layer then takes its autograd path (F.max_pool2d, not
    # the grad-free CPU shortcut that compares data pointers, which a tracer has not), also
    # behind frozen (lr_mult 0) first layers; the program itself records no gradient
    args = tuple(t.detach().requires_grad_(t.is_floating_point()) for t in example_inputs(net, inputs))
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args, dynamic_shapes=dynamic_shapes_for(args, dynamic),
                                       strict=False)
    except ExportError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        raise ExportError(f"torch.export failed: {type(e).__name__}: {text[:400]}",
                          where=net.source) from e
    finally:
        net.train(was_training)


def to_exported(net, path: Optional[str] = None, *, inputs: Optional[Mapping[str, Tensor]] = None,
                dynamic: bool = False) -> "torch.export.ExportedProgram":
    """Export ``net`` with ``torch.export``; written to ``path`` (``.pt2``, atomically) when
    given.  Returns the program (``program.module()(*inputs)`` runs it)."""
    program = export_program(net, inputs, dynamic=dynamic)
    if path is not None:
        from caffe_compat.atomic import atomic_path

        with atomic_path(os.fspath(path)) as tmp:
            torch.export.save(program, tmp)
    return program
