"""``torch.export``: a net as an ``ExportedProgram`` (``.pt2``), dynamic image size where
the net allows it.

The program is the net's exact path (:class:`caffe_compat.export.graph.ExportModule`):
inputs positional in ``net.input_names`` order, outputs a tuple in ``net.output_names``
order.  ``dynamic``: the height and width of every 4-D input (and a Fast R-CNN ``rois``
input's count) are traced as ``Dim.AUTO`` (the batch stays as traced), after the layers'
own shape inference at another size did not refuse it (:func:`size_probe`), and the
result is *checked*: a tracer that meets a size in a Python decision (Caffe's ceil
pooling, a reshape's ``-1``, an InnerProduct's fixed input length) records a guard, an
assumption about the sizes under which the graph is right.
``ExportedProgram.module()`` checks them when it runs, an ONNX model does not, so a graph
is called dynamic only if every guard holds at every size from the smallest the net
takes up to :data:`CHECK_UP_TO` (each height, each width, and random pairs:
:func:`spatial_check`).  Otherwise the image size is fixed: an error when ``dynamic=True``
was asked for, a static export when ``dynamic=None`` (the default: as the net allows).
"""
from __future__ import annotations

import dataclasses
import os
import random
import warnings
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.errors import CaffeCompatError
from caffe_compat.export.graph import ExportError, ExportModule, example_inputs

__all__ = ["to_exported", "export_program", "dynamic_shapes_for", "spatial_check", "SpatialCheck",
           "size_probe", "CHECK_UP_TO"]

#: what a dynamic axis is, in messages and the ONNX metadata
_AXES = {0: "count", 2: "height", 3: "width"}

#: sizes (each of height and width) up to which a dynamic graph's guards are checked
CHECK_UP_TO = 2048


def dynamic_shapes_for(inputs: Tuple[Tensor, ...], dynamic: bool, names: Sequence[str] = ()):
    """``dynamic_shapes`` for ``torch.export``: H and W of 4-D inputs ``Dim.AUTO``, and the
    ROI count of a Fast R-CNN net's (R, 5) ``rois`` input (named in ``names``)."""
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    names = list(names) + [""] * len(inputs)

    def axes(t: Tensor, name: str):
        if t.dim() == 4:
            return {2: auto, 3: auto}
        if name == "rois" and t.dim() == 2 and t.shape[1] == 5:
            return {0: auto}
        return None

    # one entry: ExportModule.forward takes the inputs as ``*inputs``
    return (tuple(axes(t, n) for t, n in zip(inputs, names)),)


@dataclasses.dataclass
class SpatialCheck:
    """What a traced program allows of its inputs' sizes.

    ``minimum``: input name -> {axis: smallest size} for the axes that stay symbolic (empty:
    the program is static); ``reason``: why the sizes cannot vary although symbolic (None
    when the program is right at every checked size)."""

    minimum: Dict[str, Dict[int, int]]
    reason: Optional[str] = None

    @property
    def dynamic(self) -> bool:
        return bool(self.minimum) and self.reason is None

    def describe(self) -> str:
        """``data: height >= 7, width >= 7`` (or ``static``)."""
        if not self.dynamic:
            return "static"
        names = _AXES
        return "; ".join(f"{n}: " + ", ".join(f"{names.get(a, f'axis {a}')} >= {m}"
                                                for a, m in sorted(axes.items()))
                         for n, axes in self.minimum.items())


class _Sized:
    """What a printed guard reads of an input: ``L['inputs'][i].size()[d]``."""

    def __init__(self, shape: List[int]):
        self.shape = shape

    def size(self) -> List[int]:
        return self.shape


def spatial_check(program: "torch.export.ExportedProgram", input_names: List[str]) -> SpatialCheck:
    """Check that ``program`` is right at every size of its symbolic input axes.

    Its guards (``program._guards_code``: Python expressions over the inputs' sizes) are
    evaluated for every height from 1 to :data:`CHECK_UP_TO` (other sizes as traced), the
    same for widths, and 400 random combinations above the smallest sizes found; the
    smallest size of an axis is one above the largest size that fails alone.  A guard
    that fails above the traced size, or on a combination, means the graph holds only
    for some sizes (a fixed-length InnerProduct, a pooling whose rounding changes with
    the size ...): ``reason`` says which."""
    names = [s.arg.name for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    traced: List[List[int]] = []
    free: List[Tuple[int, int, int]] = []  # (input, axis, lower bound)
    capped: List[Tuple[int, int, int]] = []  # (input, axis, upper bound) below CHECK_UP_TO
    for i, pname in enumerate(names):
        v = vals.get(pname)
        shape = []
        for a, d in enumerate(v.shape if isinstance(v, Tensor) else ()):
            if isinstance(d, torch.SymInt):
                hint = d.node.hint
                if hint is None:
                    return SpatialCheck({}, "an input size has no traced value")
                bounds = program.range_constraints.get(d.node.expr)
                lo = max(1, int(bounds.lower)) if bounds is not None else 1
                if bounds is not None and bounds.upper < CHECK_UP_TO:
                    capped.append((i, a, int(bounds.upper)))
                free.append((i, a, lo))
                shape.append(int(hint))
            else:
                shape.append(int(d))
        traced.append(shape)
    if not free:
        return SpatialCheck({})
    label = {(i, a): f"{input_names[i] if i < len(input_names) else i} {_AXES.get(a, f'axis {a}')}"
             for i, a, _ in free}
    if capped:
        i, a, up = capped[0]
        return SpatialCheck({}, f"the tracer allows {label[i, a]} up to {up} only")
    codes = getattr(program, "_guards_code", None)
    if codes is None:
        return SpatialCheck({}, "this torch version does not expose the traced program's guards")
    texts = list(dict.fromkeys(codes))
    guards = [(g, compile(g, "<guard>", "eval")) for g in texts]
    # all at once first (one eval per size), one by one only to name a failing one
    every = compile(" and ".join(f"bool({g})" for g in texts) or "True", "<guards>", "eval")

    def failing(sizes: Dict[Tuple[int, int], int]) -> Optional[str]:
        shapes = [list(s) for s in traced]
        for (i, a), n in sizes.items():
            shapes[i][a] = n
        env = {"L": {"inputs": [_Sized(s) for s in shapes]}, "torch": torch}
        try:
            if eval(every, env):  # noqa: S307 - torch's own printed guards
                return None
        except Exception:
            pass
        for text, code in guards:
            try:
                ok = bool(eval(code, env))  # noqa: S307 - torch's own printed guard
            except Exception:  # a guard over something else than sizes: cannot check
                return text
            if not ok:
                return text
        return None

    minimum: Dict[Tuple[int, int], int] = {}
    for i, a, lo in free:
        hint = traced[i][a]
        low = lo
        for n in range(lo, CHECK_UP_TO + 1):
            bad = failing({(i, a): n})
            if bad is None:
                continue
            if n > hint:
                return SpatialCheck({}, f"the graph traced at {label[i, a]} {hint} does not hold "
                                        f"at {n} (it assumes {_short(bad)})")
            low = n + 1
        minimum[i, a] = low
    draw = random.Random(0)
    for _ in range(400):
        sizes = {k: draw.randint(m, CHECK_UP_TO) for k, m in minimum.items()}
        bad = failing(sizes)
        if bad is not None:
            at = ", ".join(f"{label[k]} {n}" for k, n in sizes.items())
            return SpatialCheck({}, f"the graph does not hold at {at} (it assumes {_short(bad)})")
    out: Dict[str, Dict[int, int]] = {}
    for (i, a), m in minimum.items():
        out.setdefault(input_names[i] if i < len(input_names) else str(i), {})[a] = m
    return SpatialCheck(out)


def size_probe(net, args: Tuple[Tensor, ...]) -> Optional[str]:
    """Why the net cannot take another image size, by its layers' own shape inference
    (on meta tensors: nothing is computed) at about twice the traced height and width;
    None when it can (the traced program's guards then decide, :func:`spatial_check`).
    Cheap, and it names the layer (an InnerProduct on the feature map, mostly) -- and it
    spares torch.export's constraint solver, which gives up on some such nets."""
    from caffe_compat.errors import CaffeCompatError

    shapes = {n: tuple(t.shape) for n, t in zip(net.input_names, args)}
    for n, s in list(shapes.items()):
        if len(s) == 4:
            shapes[n] = s[:2] + (2 * s[2] + 7, 2 * s[3] + 13)
    cur: Dict[str, Tuple[int, ...]] = dict(shapes)
    for e in net.entries:
        if e.module is None or e.module.accepts_feed:
            continue
        try:
            tops = e.module.infer_top_shapes([cur[b] for b in e.bottoms])
        except CaffeCompatError as err:
            text = " ".join(str(err).split())
            at = ", ".join(f"{n} {s[2]}x{s[3]}" for n, s in shapes.items() if len(s) == 4)
            return f"at {at}: {text[:300]}"
        except Exception:  # a shape the meta run cannot tell (data-dependent): the trace decides
            return None
        for t, s in zip(e.tops, tops):
            cur[t] = tuple(s)
    return None


def _short(guard: str) -> str:
    text = guard.replace("L['inputs']", "inputs")
    return text if len(text) <= 160 else text[:157] + "..."


def _trace(net, args: Tuple[Tensor, ...], dynamic: bool) -> "torch.export.ExportedProgram":
    """One ``torch.export`` of the net's exact path on fresh copies of ``args``: an export
    leaves its fake tensors memoized on the real inputs, and a second trace on the same
    tensors (a static one after a symbolic attempt failed) would meet the first one's
    symbolic sizes.  The copies require grad: every layer then takes its autograd path
    (F.max_pool2d, not the grad-free CPU shortcut that compares data pointers, which a
    tracer has not), also behind frozen (lr_mult 0) first layers; the program records no
    gradient."""
    args = tuple(t.detach().clone().requires_grad_(t.is_floating_point()) for t in args)
    module = ExportModule(net)
    was_training = net.training
    net.eval()
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.export(module, args, strict=False,
                                       dynamic_shapes=dynamic_shapes_for(args, dynamic, net.input_names))
    except ExportError:
        raise
    except Exception as e:
        text = " ".join(str(e).split())
        raise ExportError(f"torch.export failed: {type(e).__name__}: {text[:400]}",
                          where=net.source) from e
    finally:
        net.train(was_training)


def export_program(net, inputs: Optional[Mapping[str, Tensor]] = None, *,
                   dynamic: Optional[bool] = None) -> "torch.export.ExportedProgram":
    """Trace ``net`` (a TEST net, weights loaded) into an ExportedProgram.

    ``inputs``: tensors by input name to trace with (default: seeded data of the declared
    shapes, :func:`caffe_compat.export.graph.example_inputs`).  ``dynamic``: True: the
    image size (H, W of 4-D inputs) varies, or an :class:`ExportError` says why the net
    fixes it; False: the traced size only; None: dynamic where the net allows (checked,
    see the module docstring), else static.  A layer that cannot be traced is one
    :class:`ExportError` naming it."""
    args = example_inputs(net, inputs)
    if dynamic is False or not any(t.dim() == 4 for t in args):
        if dynamic is True:
            raise ExportError("dynamic image size needs a 4-D (N, C, H, W) input; this net has "
                              "none: export it static", where=net.source)
        return _trace(net, args, False)
    fixed = size_probe(net, args)
    if fixed is not None:
        if dynamic is True:
            raise ExportError(f"this net does not allow another image size: {fixed}; export it at "
                              "one size (dynamic=False, CLI --static, with --input-shape)",
                              where=net.source)
        return _trace(net, args, False)
    try:
        program = _trace(net, args, True)
    except ExportError as e:
        # torch.export's own constraint solver gives up on some nets that fix their size
        # (an InnerProduct pins a size that floor divisions lead to): a static trace then
        # succeeds or fails with the layer's own error
        if not isinstance(e.__cause__, Exception) or isinstance(e.__cause__, CaffeCompatError) \
                or "cannot be traced" in str(e):
            raise
        if dynamic is True:
            raise ExportError("this net does not allow another image size: torch.export cannot "
                              f"keep its sizes symbolic ({str(e.__cause__)[:200]}); export it at "
                              "one size (dynamic=False, CLI --static, with --input-shape)",
                              where=net.source) from e
        return _trace(net, args, False)
    check = spatial_check(program, list(net.input_names))
    if check.dynamic:
        return program
    if dynamic is True:
        why = check.reason or "the tracer fixed every image size (a layer, typically an " \
                              "InnerProduct on the feature map, takes one size only)"
        raise ExportError(f"this net does not allow another image size: {why}; export it at one "
                          "size (dynamic=False, CLI --static, with --input-shape)", where=net.source)
    if not check.minimum and check.reason is None:
        return program  # the tracer fixed the sizes itself: the graph is static already
    return _trace(net, args, False)


def to_exported(net, path: Optional[str] = None, *, inputs: Optional[Mapping[str, Tensor]] = None,
                dynamic: Optional[bool] = None) -> "torch.export.ExportedProgram":
    """Export ``net`` with ``torch.export``; written to ``path`` (``.pt2``, atomically) when
    given.  Returns the program (``program.module()(*inputs)`` runs it; it refuses sizes
    its guards do not allow).  ``dynamic``: see :func:`export_program`."""
    program = export_program(net, inputs, dynamic=dynamic)
    if path is not None:
        from caffe_compat.atomic import atomic_path

        with atomic_path(os.fspath(path)) as tmp:
            torch.export.save(program, tmp)
    return program
