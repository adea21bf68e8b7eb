"""``--to python``: a built Caffe net as standalone, readable PyTorch code.

:func:`to_python` writes three files: the model (``model.py``: one ``nn.Module`` class whose
attributes are the net's layers with parameters, named after them, and whose ``forward``
reads like the prototxt: blob names as variable names, in-place layers as reassignments,
the net's outputs returned as a dict), its weights (``model.safetensors``, keys exactly the
module's ``state_dict`` keys) and ``caffe_runtime.py`` (what torch lacks: Caffe's pooling
sizes where torch's differ, ROI pooling, py-faster-rcnn's proposal layer...; see
``runtime/caffe_runtime.py``).  Neither generated file imports caffe-compat.

The code is generated from the net's own layer list (``net.entries``, the prototxt's
layers; not Caffe's inserted split layers), one generator per layer type in
:data:`GENERATORS`; each reads the built layer's parsed parameters, so every default and
legacy field has been resolved already.  Only the TEST phase is generated (the code is for
inference).  A layer type without a generator is refused, naming every such layer.

``python -m caffe_compat.export.python_code --example`` regenerates the committed example
(py-faster-rcnn's VGG16 Faster R-CNN test net) in ``docs/examples/``.
"""
from __future__ import annotations

import keyword
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from caffe_compat.atomic import atomic_write
from caffe_compat.export.graph import ExportError

__all__ = ["to_python", "generate_code", "runtime_source", "state_dict_for", "GENERATORS",
           "RUNTIME_MODULE", "EXAMPLE_NET", "write_example"]

#: the runtime's module name, written beside every generated model
RUNTIME_MODULE = "caffe_runtime"
_RUNTIME_PATH = Path(__file__).resolve().parent / "runtime" / f"{RUNTIME_MODULE}.py"

_ROOT = Path(__file__).resolve().parents[2]
#: the committed example: py-faster-rcnn's VGG16 Faster R-CNN test net (path in the corpus)
EXAMPLE_NET = "py-faster-rcnn/models/pascal_voc/VGG16/faster_rcnn_end2end/test.prototxt"
EXAMPLE_DIR = _ROOT / "docs" / "examples"
EXAMPLE_NAME = "vgg16_faster_rcnn_test"

#: names the generated code itself uses (never a blob variable or a class name)
_RESERVED = frozenset({"self", "torch", "nn", "F", "rt", "Tensor", "Dict", "Path", "annotations",
                       "load_model", "WEIGHTS", "super", "print", "len", "range", "dict"})


# ---------------------------------------------------------------------------- formatting
def _identifier(name: str) -> str:
    """``name`` as a Python identifier: other characters become ``_``, a leading digit gets a
    ``_`` before it, a keyword one after it."""
    s = re.sub(r"\W", "_", name, flags=re.ASCII) or "_"
    if s[0].isdigit():
        s = "_" + s
    if keyword.iskeyword(s) or keyword.issoftkeyword(s):
        s += "_"
    return s


def _num(v: float) -> str:
    """A float as written in the prototxt: the shortest text that gives the same float32
    (Caffe's fields are float32), else Python's repr (a computed double)."""
    v = float(v)
    if math.isfinite(v) and float(np.float32(v)) == v:
        text = np.format_float_positional(np.float32(v), unique=True, trim="0")
        if "e" not in text and len(text) > 12:
            text = np.format_float_scientific(np.float32(v), unique=True, trim="0")
        v2 = float(text)
        if float(np.float32(v2)) == v:
            return text if any(c in text for c in ".e") else text + ".0"
    return repr(v)


def _ints(vals: Sequence[int]) -> str:
    """One int when all are equal (``3``), else a tuple (``(3, 5)``)."""
    vals = [int(v) for v in vals]
    return str(vals[0]) if len(set(vals)) == 1 else "(" + ", ".join(map(str, vals)) + ")"


def _split_args(text: str) -> List[str]:
    """``text``'s top-level comma-separated parts."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return parts + ([cur.strip()] if cur.strip() else [])


def _wrap(line: str, indent: int, width: int = 100) -> List[str]:
    """A long ``lhs = f(args)  # note`` line as a call with its arguments on the lines below."""
    if indent + len(line) <= width:
        return [line]
    code, _, note = line.partition("  # ")
    open_at = code.find("(")
    if open_at < 0 or not code.endswith(")"):
        return [line]
    depth = 0
    for i, ch in enumerate(code[open_at:], open_at):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if depth == 0 and i != len(code) - 1:
            return [line]  # the first bracket closes before the end: not one call
    out = [code[:open_at + 1] + (f"  # {note}" if note else "")]

    def pack(items: List[str], pad: str) -> List[str]:
        lines, cur = [], ""
        for item in items:
            piece = f"{cur} {item}," if cur else f"{item},"
            if cur and indent + len(pad) + len(piece) > width:
                lines.append(pad + cur)
                piece = f"{item},"
            cur = piece
        return lines + ([pad + cur] if cur else [])

    groups: List[List[str]] = [[]]
    for arg in _split_args(code[open_at + 1:-1]):
        if indent + 5 + len(arg) > width and arg[0] == "[" and arg[-1] == "]":
            groups += [["[" + arg], []]  # a long list: one item per slot, on lines of its own
        else:
            groups[-1].append(arg)
    for grp in groups:
        if grp and grp[0].startswith("[["):
            out.append("    [")
            out += pack(_split_args(grp[0][2:-1]), "        ")
            out.append("    ],")
        elif grp:
            out += pack(grp, "    ")
    out[-1] = out[-1].rstrip(",") + ")"
    return out


def _docstring(text: str, indent: int) -> List[str]:
    """A docstring's paragraphs (``\n\n``-separated) filled to 100 columns."""
    import textwrap

    lines: List[str] = []
    for i, para in enumerate(text.split("\n\n")):
        if i:
            lines.append("")
        lines += textwrap.wrap(para, 97 - indent, break_on_hyphens=False, break_long_words=False)
    lines[0] = '"""' + lines[0]
    if len(lines) == 1 and indent + len(lines[0]) + 3 <= 100:
        return [lines[0] + '"""']
    return lines + ['"""']


def _class_name(net_name: str) -> str:
    s = _identifier(net_name or "CaffeNet")
    return s if s not in _RESERVED else s + "_"


# ---------------------------------------------------------------------------- the generator
@dataclass
class _Gen:
    """What is written while walking the net's layers."""

    net: object
    inits: List[str] = field(default_factory=list)       # lines of __init__
    lines: List[str] = field(default_factory=list)       # lines of forward
    state: Dict[str, Tensor] = field(default_factory=dict)
    uses_runtime: bool = False
    _vars: Dict[str, str] = field(default_factory=dict)  # blob -> variable
    _taken: set = field(default_factory=set)
    _attrs: set = field(default_factory=set)

    def var(self, blob: str) -> str:
        """The variable of a Caffe blob (one per blob name; in-place tops reuse it)."""
        v = self._vars.get(blob)
        if v is None:
            v = base = _identifier(blob)
            if v in _RESERVED:
                v = base = v + "_"
            k = 2
            while v in self._taken:
                v, k = f"{base}_{k}", k + 1
            self._vars[blob] = v
            self._taken.add(v)
        return v

    def shape(self, blob: str) -> Tuple[int, ...]:
        return tuple(self.net.blob_shapes[blob])

    def module(self, e, ctor: str, tensors: Dict[str, Tensor]) -> str:
        """Declare ``self.<attr> = ctor`` for layer ``e`` with its state-dict tensors;
        returns ``self.<attr>``."""
        import torch.nn as nn

        a = base = _identifier(e.name)
        if a.startswith("__") or hasattr(nn.Module, a) or a in ("T_destination", "call_super_init"):
            a = base = a + "_"
        k = 2
        while a in self._attrs:
            a, k = f"{base}_{k}", k + 1
        self._attrs.add(a)
        note = f"  # Caffe layer {e.name!r}" if a != e.name else ""
        self.inits.append(f"self.{a} = {ctor}{note}")
        for key, t in tensors.items():
            self.state[f"{a}.{key}"] = t.detach().cpu().contiguous()
        return f"self.{a}"

    def emit(self, e, expr: str, *, named: bool = False) -> None:
        """``tops = expr``; a comment names the Caffe layer unless ``named`` (an attribute
        already carries its name) or the layer is named after its only top."""
        tops = ", ".join(self.var(t) for t in e.tops)
        note = "" if named or (len(e.tops) == 1 and e.name == e.tops[0]) else f"  # {e.name}"
        self.lines.append(f"{tops} = {expr}{note}")

    def comment(self, text: str) -> None:
        self.lines.append(f"# {text}")


def _refuse(e, why: str) -> ExportError:
    return ExportError(f"{e.type} layer cannot be written as Python code: {why}", layer=e.name)


Generator = Callable[[_Gen, object], None]
#: Caffe layer type (or ``Python:<module>.<layer>``) -> the function that writes its code
GENERATORS: Dict[str, Generator] = {}


def _gen(*types: str) -> Callable[[Generator], Generator]:
    def deco(fn: Generator) -> Generator:
        for t in types:
            GENERATORS[t] = fn
        return fn
    return deco


# ---------------------------------------------------------------------------- vision
@_gen("Input")
def _input(g: _Gen, e) -> None:
    """Inputs are ``forward``'s arguments: nothing to write."""


@_gen("Convolution", "Deconvolution", "DepthwiseConvolution", "ConvolutionDepthwise")
def _conv(g: _Gen, e) -> None:
    m = e.module
    if m.axis != 1 or not 1 <= m.num_spatial <= 3:
        raise _refuse(e, f"only channels on axis 1 and 1 to 3 spatial axes are supported "
                         f"(axis {m.axis}, {m.num_spatial} spatial)")
    nd = m.num_spatial
    cls = f"nn.ConvTranspose{nd}d" if m.transposed else f"nn.Conv{nd}d"
    args = [str(m.channels), str(m.num_output), _ints(m.kernel)]
    if any(s != 1 for s in m.stride):
        args.append(f"stride={_ints(m.stride)}")
    if any(m.pad):
        args.append(f"padding={_ints(m.pad)}")
    if any(d != 1 for d in m.dilation):
        args.append(f"dilation={_ints(m.dilation)}")
    if m.group != 1:
        args.append(f"groups={m.group}")
    if not m.bias_term:
        args.append("bias=False")
    tensors = {"weight": m.weight}
    if m.bias_term:
        tensors["bias"] = m.bias
    attr = g.module(e, f"{cls}({', '.join(args)})", tensors)
    for b, t in zip(e.bottoms, e.tops):  # bottom i -> top i, shared weights
        x = g.var(b)
        # an input (plus padding) smaller than the kernel: Caffe still gives one output,
        # reading zeros past the end; torch refuses, so the zeros are written out
        extra = [0 if m.transposed else max(0, d * (k - 1) + 1 - (n + 2 * p))
                 for n, k, p, d in zip(g.shape(b)[2:], m.kernel, m.pad, m.dilation)]
        if any(extra):
            pads = ", ".join(f"0, {v}" for v in reversed(extra))
            x = f"F.pad({x}, ({pads}))"
            g.lines.append(f"{g.var(t)} = {attr}({x})  # zeros past the end, as Caffe reads them")
        else:
            g.lines.append(f"{g.var(t)} = {attr}({x})")


def _torch_pools_like_caffe(size: int, k: int, s: int, p: int, ceil: bool, padded: bool) -> bool:
    """Whether ``F.max_pool2d``/``F.avg_pool2d`` size (and divide) this axis as Caffe does, at
    any input size: torch refuses pad > kernel / 2, and with no padding on either axis
    Caffe keeps windows that start past the input (stride > kernel) where torch drops them."""
    from caffe_compat.layers.vision import caffe_pooled_size

    if 2 * p > k or (ceil and not padded and s > k) or size + 2 * p < k:
        return False
    torch_out = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (torch_out - 1) * s >= size + p:
        torch_out -= 1
    return torch_out == caffe_pooled_size(size, k, s, p, ceil, padded)


@_gen("Pooling")
def _pooling(g: _Gen, e) -> None:
    from caffe_compat.layers.vision import AVE, MAX

    m = e.module
    x = g.var(e.bottoms[0])
    if m.method not in (MAX, AVE):  # STOCHASTIC: at test time, a self-weighted average
        g.uses_runtime = True
        _, _, H, W = g.shape(e.bottoms[0])
        kernel, stride = ((H, W), (1, 1)) if m.global_pooling else (m.kernel, m.stride)
        g.emit(e, f"rt.stochastic_pool2d({x}, kernel=({kernel[0]}, {kernel[1]}), "
                  f"stride=({stride[0]}, {stride[1]}), ceil={m.ceil})")
        return
    mask = len(e.tops) == 2
    fn = "F.max_pool2d" if m.method == MAX else "F.avg_pool2d"
    if m.global_pooling:  # the kernel is the whole map
        g.emit(e, f"{fn}({x}, {x}.shape[2:]{', return_indices=True' if mask else ''})")
        if mask:
            top, idx = g.var(e.tops[0]), g.var(e.tops[1])
            g.lines.append(f"{idx} = {idx}.to({top}.dtype)")
        return
    _, _, H, W = g.shape(e.bottoms[0])
    (kh, kw), (sh, sw), (ph, pw) = m.kernel, m.stride, m.pad
    padded = bool(ph or pw)
    if (_torch_pools_like_caffe(H, kh, sh, ph, m.ceil, padded)
            and _torch_pools_like_caffe(W, kw, sw, pw, m.ceil, padded)):
        args = [x, _ints(m.kernel)]
        if (sh, sw) != (kh, kw):
            args.append(f"stride={_ints(m.stride)}")
        if padded:
            args.append(f"padding={_ints(m.pad)}")
        if m.ceil:
            args.append("ceil_mode=True")  # Caffe rounds pooled sizes up
        if mask:  # Caffe's argmax top: the flat index in the input plane, as a float
            args.append("return_indices=True")
            g.emit(e, f"{fn}({', '.join(args)})")
            top, idx = g.var(e.tops[0]), g.var(e.tops[1])
            g.lines.append(f"{idx} = {idx}.to({top}.dtype)")
            return
        g.emit(e, f"{fn}({', '.join(args)})")
        return
    if mask:
        raise _refuse(e, "the argmax (mask) top of a pooling torch sizes differently has no Python "
                         "code generator")
    g.uses_runtime = True
    method = '"max"' if m.method == MAX else '"ave"'
    g.emit(e, f"rt.pool2d({x}, {method}, kernel=({kh}, {kw}), stride=({sh}, {sw}), "
              f"pad=({ph}, {pw}), ceil={m.ceil})")


@_gen("LRN")
def _lrn(g: _Gen, e) -> None:
    m = e.module
    x = g.var(e.bottoms[0])
    if m.region == 0:
        g.emit(e, f"F.local_response_norm({x}, {m.size}, alpha={_num(m.alpha)}, "
                  f"beta={_num(m.beta)}, k={_num(m.k)})")
    else:
        g.uses_runtime = True
        g.emit(e, f"rt.lrn_within_channel({x}, {m.size}, alpha={_num(m.alpha)}, beta={_num(m.beta)})")


# ---------------------------------------------------------------------------- common
@_gen("InnerProduct")
def _inner_product(g: _Gen, e) -> None:
    m = e.module
    w = m.weight.t() if m.transpose else m.weight
    tensors = {"weight": w}
    if m.bias_term:
        tensors["bias"] = m.bias
    bias = "" if m.bias_term else ", bias=False"
    attr = g.module(e, f"nn.Linear({m.k}, {m.num_output}{bias})", tensors)
    x = g.var(e.bottoms[0])
    if len(g.shape(e.bottoms[0])) != m.axis + 1:
        x = f"{x}.flatten({m.axis})"
    g.emit(e, f"{attr}({x})", named=True)


@_gen("BatchNorm")
def _batch_norm(g: _Gen, e) -> None:
    m = e.module
    nd = len(g.shape(e.bottoms[0]))
    kind = {2: "1d", 3: "1d", 4: "2d", 5: "3d"}.get(nd)
    if kind is None:
        raise _refuse(e, f"a {nd}-D bottom has no torch BatchNorm")
    eps = "" if np.float32(m.eps) == np.float32(1e-5) else f", eps={_num(m.eps)}"  # torch's default
    if not m.use_global_stats:  # normalised with the batch's own statistics, as Caffe
        attr = g.module(e, f"nn.BatchNorm{kind}({m.channels}{eps}, affine=False, "
                           "track_running_stats=False)", {})
    else:
        # Caffe keeps sums and a scale factor; the statistics are sum / factor (0 if 0)
        sf = m.scale_factor.detach().to(torch.float32).reshape(())
        inv = torch.where(sf == 0, torch.zeros_like(sf), 1.0 / sf)
        tensors = {"running_mean": m.running_mean.detach().float() * inv,
                   "running_var": m.running_var.detach().float() * inv,
                   "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
        attr = g.module(e, f"nn.BatchNorm{kind}({m.channels}{eps}, affine=False)", tensors)
    g.emit(e, f"{attr}({g.var(e.bottoms[0])})", named=True)


@_gen("Scale")
def _scale(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    m = e.module
    x = g.var(e.bottoms[0])
    nd = len(g.shape(e.bottoms[0]))
    if len(e.bottoms) == 2:
        s_shape = g.shape(e.bottoms[1])
        axis = 0 if not s_shape else canonical_axis(m.axis_param, nd)
        tail = nd - axis - len(s_shape)
        s = g.var(e.bottoms[1])
        expr = f"{x} * {s}" if tail == 0 else f"{x} * {s}.reshape({s}.shape + (1,) * {tail})"
        if m.bias_term:  # the learned bias, shaped like bottom[1], added after the product
            b = m.bias
            g.uses_runtime = True
            b_axis = 0 if b.dim() == 0 else canonical_axis(m.axis_param, nd)
            attr = g.module(e, f"rt.Bias({tuple(int(d) for d in b.shape)!r}, axis={b_axis})", {"bias": b})
            g.emit(e, f"{attr}({expr})", named=True)
            return
        g.emit(e, expr)
        return
    w = m.weight
    axis = 0 if w.dim() == 0 else canonical_axis(m.axis_param, nd)
    tensors = {"weight": w}
    if m.bias_term:
        if tuple(m.bias.shape) != tuple(w.shape):
            raise _refuse(e, "a bias shaped unlike the scale has no Python code generator")
        tensors["bias"] = m.bias
    g.uses_runtime = True
    shape = repr(tuple(int(d) for d in w.shape))
    bias = ", bias=True" if m.bias_term else ""
    attr = g.module(e, f"rt.Scale({shape}, axis={axis}{bias})", tensors)
    g.emit(e, f"{attr}({x})", named=True)


@_gen("Eltwise")
def _eltwise(g: _Gen, e) -> None:
    from caffe_compat.protos import caffe_pb2

    m = e.module
    op = caffe_pb2.EltwiseParameter
    first = g.shape(e.bottoms[0])
    xs = []
    for b in e.bottoms:
        v = g.var(b)
        xs.append(v if g.shape(b) == first else f"{v}.reshape_as({xs[0]})")
    if m.op == op.SUM:
        terms = [x if c == 1.0 else f"{x} * {_num(c)}" for x, c in zip(xs, m.coeffs)]
        expr = " + ".join(terms)
    elif m.op == op.PROD:
        expr = " * ".join(xs)
    else:
        expr = f"torch.maximum({xs[0]}, {xs[1]})"
        for x in xs[2:]:
            expr = f"torch.maximum({expr}, {x})"
    g.emit(e, expr)


@_gen("Concat")
def _concat(g: _Gen, e) -> None:
    m = e.module
    xs = [g.var(b) for b in e.bottoms]
    if len(xs) == 1:
        g.emit(e, xs[0])
        return
    axis = m._axis(len(g.shape(e.bottoms[0])))
    g.emit(e, f"torch.cat([{', '.join(xs)}], dim={axis})")


@_gen("Slice")
def _slice(g: _Gen, e) -> None:
    m = e.module
    axis, _ = m._sizes(g.shape(e.bottoms[0]))
    x = g.var(e.bottoms[0])
    if len(e.tops) == 1:
        g.emit(e, x)
    elif m.points:
        g.emit(e, f"torch.tensor_split({x}, {list(m.points)}, dim={axis})")
    else:
        g.emit(e, f"torch.chunk({x}, {len(e.tops)}, dim={axis})")


@_gen("Split")
def _split(g: _Gen, e) -> None:
    x = g.var(e.bottoms[0])
    g.emit(e, ", ".join([x] * len(e.tops)) if len(e.tops) > 1 else x)


@_gen("Flatten")
def _flatten(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    p = e.module.param.flatten_param
    nd = len(g.shape(e.bottoms[0]))
    a = canonical_axis(p.axis, nd)
    end = canonical_axis(p.end_axis, nd)
    x = g.var(e.bottoms[0])
    g.emit(e, f"{x}.flatten({a})" if end == nd - 1 else f"{x}.flatten({a}, {end})")


@_gen("Reshape")
def _reshape(g: _Gen, e) -> None:
    m = e.module
    p = m.param.reshape_param
    x = g.var(e.bottoms[0])
    nd = len(g.shape(e.bottoms[0]))
    start = p.axis if p.axis >= 0 else nd + p.axis + 1
    end = nd if p.num_axes == -1 else start + p.num_axes
    dims = [f"{x}.shape[{i}]" for i in range(start)]
    for i, d in enumerate(m.dims):  # 0 copies the bottom's dim, -1 is inferred
        dims.append(f"{x}.shape[{start + i}]" if d == 0 else str(d))
    dims += [f"{x}.shape[{j}]" for j in range(end, nd)]
    g.emit(e, f"{x}.reshape({', '.join(dims)}{',' if len(dims) == 1 else ''})")


@_gen("Crop")
def _crop(g: _Gen, e) -> None:
    m = e.module
    x, ref = g.var(e.bottoms[0]), g.var(e.bottoms[1])
    parts = []
    for i in range(len(g.shape(e.bottoms[0]))):
        if i < m.start:
            parts.append(":")
            continue
        offs = m.offsets_param
        off = offs[0] if len(offs) == 1 else (offs[i - m.start] if offs else 0)
        parts.append(f"{off}:{off} + {ref}.shape[{i}]" if off else f":{ref}.shape[{i}]")
    g.emit(e, f"{x}[{', '.join(parts)}]")


@_gen("Softmax")
def _softmax(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    axis = canonical_axis(e.module.param.softmax_param.axis, len(g.shape(e.bottoms[0])))
    g.emit(e, f"F.softmax({g.var(e.bottoms[0])}, dim={axis})")


@_gen("Silence")
def _silence(g: _Gen, e) -> None:
    g.comment(f"{e.name} (Silence): {', '.join(g.var(b) for b in e.bottoms)} not used further")


@_gen("Permute")
def _permute(g: _Gen, e) -> None:
    m = e.module
    order = list(getattr(m, "order", None) or getattr(m, "permute_order", None) or [])
    if not order:
        raise _refuse(e, "its permutation order is unknown")
    g.emit(e, f"{g.var(e.bottoms[0])}.permute({', '.join(map(str, order))})")


@_gen("Bias")
def _bias(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    m = e.module
    x = g.var(e.bottoms[0])
    nd = len(g.shape(e.bottoms[0]))
    if len(e.bottoms) == 2:
        b_shape = g.shape(e.bottoms[1])
        axis = 0 if not b_shape else canonical_axis(m.axis_param, nd)
        tail = nd - axis - len(b_shape)
        b = g.var(e.bottoms[1])
        g.emit(e, f"{x} + {b}" if tail == 0 else f"{x} + {b}.reshape({b}.shape + (1,) * {tail})")
        return
    b = m.bias
    axis = 0 if b.dim() == 0 else canonical_axis(m.axis_param, nd)
    g.uses_runtime = True
    attr = g.module(e, f"rt.Bias({tuple(int(d) for d in b.shape)!r}, axis={axis})", {"bias": b})
    g.emit(e, f"{attr}({x})", named=True)


@_gen("Tile")
def _tile(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    nd = len(g.shape(e.bottoms[0]))
    reps = [1] * nd
    reps[canonical_axis(e.module.param.tile_param.axis, nd)] = e.module.tiles
    g.emit(e, f"{g.var(e.bottoms[0])}.repeat({', '.join(map(str, reps))})")


@_gen("Reduction")
def _reduction(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis
    from caffe_compat.protos import caffe_pb2

    m = e.module
    red = caffe_pb2.ReductionParameter
    a = canonical_axis(m.param.reduction_param.axis, len(g.shape(e.bottoms[0])))
    x = g.var(e.bottoms[0])
    src = {red.SUM: x, red.MEAN: x, red.ASUM: f"{x}.abs()", red.SUMSQ: f"({x} * {x})"}[m.op]
    expr = f"{src}.flatten({a}).{'mean' if m.op == red.MEAN else 'sum'}({a})"
    g.emit(e, expr if m.coeff == 1.0 else f"{expr} * {_num(m.coeff)}")


@_gen("MVN")
def _mvn(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    args = [g.var(e.bottoms[0])]
    if not m.normalize_variance:
        args.append("normalize_variance=False")
    if m.across_channels:
        args.append("across_channels=True")
    if np.float32(m.eps) != np.float32(1e-9):
        args.append(f"eps={_num(m.eps)}")
    g.emit(e, f"rt.mvn({', '.join(args)})")


@_gen("ArgMax")
def _argmax(g: _Gen, e) -> None:
    from caffe_compat.layers.base import canonical_axis

    m = e.module
    g.uses_runtime = True
    args = [g.var(e.bottoms[0])]
    if m.top_k != 1:
        args.append(f"top_k={m.top_k}")
    if m.out_max_val:
        args.append("out_max_val=True")
    if m.has_axis:
        args.append(f"axis={canonical_axis(m.param.argmax_param.axis, len(g.shape(e.bottoms[0])))}")
    g.emit(e, f"rt.argmax({', '.join(args)})")


@_gen("Embed")
def _embed(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    tensors = {"weight": m.weight}
    if m.bias_term:
        tensors["bias"] = m.bias
    bias = "" if m.bias_term else ", bias=False"
    attr = g.module(e, f"rt.Embed({m.input_dim}, {m.num_output}{bias})", tensors)
    g.emit(e, f"{attr}({g.var(e.bottoms[0])})", named=True)


# ---------------------------------------------------------------------------- neurons
@_gen("ReLU")
def _relu(g: _Gen, e) -> None:
    x = g.var(e.bottoms[0])
    s = e.module.negative_slope
    g.emit(e, f"F.relu({x})" if s == 0 else f"F.leaky_relu({x}, {_num(s)})")


@_gen("ReLU6")
def _relu6(g: _Gen, e) -> None:
    if e.module.negative_slope != 0:
        raise _refuse(e, "a negative slope has no Python code generator")
    g.emit(e, f"F.relu6({g.var(e.bottoms[0])})")


@_gen("PReLU")
def _prelu(g: _Gen, e) -> None:
    m = e.module
    n = 1 if m.channel_shared else m.channels
    attr = g.module(e, f"nn.PReLU({n})", {"weight": m.weight.reshape(n)})
    g.emit(e, f"{attr}({g.var(e.bottoms[0])})", named=True)


@_gen("ELU")
def _elu(g: _Gen, e) -> None:
    g.emit(e, f"F.elu({g.var(e.bottoms[0])}, {_num(e.module.alpha)})")


_PLAIN_NEURONS = {"Sigmoid": "torch.sigmoid", "TanH": "torch.tanh", "AbsVal": "torch.abs",
                  "BNLL": "F.softplus"}


@_gen(*_PLAIN_NEURONS)
def _plain_neuron(g: _Gen, e) -> None:
    g.emit(e, f"{_PLAIN_NEURONS[e.type]}({g.var(e.bottoms[0])})")


@_gen("Power")
def _power(g: _Gen, e) -> None:
    m = e.module
    x = g.var(e.bottoms[0])
    if m.power * m.scale == 0.0:  # Caffe ignores the input
        with np.errstate(all="ignore"):
            value = 1.0 if m.power == 0.0 else float(np.power(np.float64(m.shift), m.power))
        g.emit(e, f"torch.full_like({x}, {_num(value)})")
        return
    base = x if m.scale == 1.0 else f"{x} * {_num(m.scale)}"
    if m.shift != 0.0:
        base = f"{base} + {_num(m.shift)}"
    g.emit(e, base if m.power == 1.0 else f"({base}) ** {_num(m.power)}")


@_gen("Dropout")
def _dropout(g: _Gen, e) -> None:
    m = e.module
    x = g.var(e.bottoms[0])
    if m.scale_train:  # TEST: identity
        if e.tops[0] == e.bottoms[0]:
            g.comment(f"{e.name} (Dropout): identity at test time")
        else:
            g.lines.append(f"{g.var(e.tops[0])} = {x}  # {e.name} (Dropout): identity at test time")
        return
    g.emit(e, f"{x} * {_num(1.0 / m.scale)}")


@_gen("Exp")
def _exp(g: _Gen, e) -> None:
    m = e.module  # base ** (shift + scale * x) as Caffe computes it: outer * exp(inner * x)
    x = g.var(e.bottoms[0])
    expr = f"torch.exp({x if m.inner_scale == 1.0 else f'{x} * {_num(m.inner_scale)}'})"
    g.emit(e, expr if m.outer_scale == 1.0 else f"{expr} * {_num(m.outer_scale)}")


@_gen("Log")
def _log(g: _Gen, e) -> None:
    m = e.module  # log_base(shift + scale * x)
    u = g.var(e.bottoms[0])
    if m.scale != 1.0:
        u = f"{u} * {_num(m.scale)}"
    if m.shift != 0.0:
        u = f"{u} + {_num(m.shift)}"
    expr = f"torch.log({u})"
    g.emit(e, expr if m.base_scale == 1.0 else f"{expr} * {_num(m.base_scale)}")


@_gen("Threshold")
def _threshold(g: _Gen, e) -> None:
    x = g.var(e.bottoms[0])
    g.emit(e, f"({x} > {_num(e.module.threshold)}).to({x}.dtype)")


@_gen("Clip")
def _clip(g: _Gen, e) -> None:
    g.emit(e, f"torch.clamp({g.var(e.bottoms[0])}, {_num(e.module.min)}, {_num(e.module.max)})")


@_gen("Swish")
def _swish(g: _Gen, e) -> None:
    x = g.var(e.bottoms[0])
    b = e.module.beta
    g.emit(e, f"{x} * torch.sigmoid({x if b == 1.0 else f'{x} * {_num(b)}'})")


# ---------------------------------------------------------------------------- Fast/Faster R-CNN
@_gen("ROIPooling")
def _roi_pooling(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    g.emit(e, f"rt.roi_pool({g.var(e.bottoms[0])}, {g.var(e.bottoms[1])}, pooled_h={m.pooled_h}, "
              f"pooled_w={m.pooled_w}, spatial_scale={_num(m.spatial_scale)})")


@_gen("Python:rpn.proposal_layer.ProposalLayer")
def _proposal(g: _Gen, e) -> None:
    m = e.module
    o = m.opts
    g.uses_runtime = True
    tops = [g.var(t) for t in e.tops] + (["_"] if len(e.tops) == 1 else [])

    def seq(vals) -> str:
        return "(" + ", ".join(_num(v) if isinstance(v, float) else str(v) for v in vals) + \
            ("," if len(vals) == 1 else "") + ")"

    g.lines.append(
        f"{', '.join(tops)} = rt.proposal({', '.join(g.var(b) for b in e.bottoms)}, "
        f"feat_stride={m.feat_stride}, scales={seq(m.scales)}, ratios={seq(m.ratios)}, "
        f"pre_nms_top_n={o.pre_nms_top_n}, post_nms_top_n={o.post_nms_top_n}, "
        f"nms_thresh={_num(o.nms_thresh)}, min_size={_num(o.min_size)})  # {e.name}")


# ---------------------------------------------------------------------------- SSD
def _floats(vals: Sequence[float]) -> str:
    """A tuple of prototxt floats: ``(0.1, 0.2)``, ``(2.0,)``."""
    vals = [_num(v) for v in vals]
    return "(" + ", ".join(vals) + ("," if len(vals) == 1 else "") + ")"


@_gen("PriorBox")
def _prior_box(g: _Gen, e) -> None:
    m = e.module
    p = m.param.prior_box_param
    g.uses_runtime = True
    args = [g.var(b) for b in e.bottoms[:2]]
    args.append(f"min_sizes={_floats(m.min_sizes)}")
    if m.max_sizes:
        args.append(f"max_sizes={_floats(m.max_sizes)}")
    if len(p.aspect_ratio):
        args.append(f"aspect_ratios={_floats(p.aspect_ratio)}")
    if not m.flip:
        args.append("flip=False")
    if m.clip:
        args.append("clip=True")
    args.append(f"variance={_floats(m.variance)}")
    if m.img_h and m.img_w:
        args.append(f"img_size=({m.img_h}, {m.img_w})")
    if m.step_h and m.step_w:
        args.append(f"step=({_num(m.step_h)}, {_num(m.step_w)})")
    if m.offset != 0.5:
        args.append(f"offset={_num(m.offset)}")
    g.emit(e, f"rt.prior_box({', '.join(args)})")


@_gen("Normalize")
def _normalize(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    args = [str(m.channels)]
    if not m.across_spatial:
        args.append("across_spatial=False")
    if not m.channel_shared:
        args.append("channel_shared=False")
    if np.float32(m.eps) != np.float32(1e-10):
        args.append(f"eps={_num(m.eps)}")
    attr = g.module(e, f"rt.Normalize({', '.join(args)})", {"weight": m.weight.reshape(
        () if m.channel_shared else (m.channels,))})
    g.emit(e, f"{attr}({g.var(e.bottoms[0])})", named=True)


@_gen("DetectionOutput")
def _detection_output(g: _Gen, e) -> None:
    from caffe_compat.layers.ssd import _CODE_NAMES, FLT_MAX

    m = e.module
    g.uses_runtime = True
    args = [g.var(b) for b in e.bottoms[:3]]  # a 4th bottom (the image) is only visualized
    args.append(f"num_classes={m.num_classes}")
    if not m.share_location:
        args.append("share_location=False")
    if m.background_label_id != 0:
        args.append(f"background_label_id={m.background_label_id}")
    args.append(f'code_type="{_CODE_NAMES[m.code_type]}"')
    if m.variance_encoded_in_target:
        args.append("variance_encoded_in_target=True")
    args.append(f"nms_threshold={_num(m.nms_threshold)}")
    if m.top_k != -1:
        args.append(f"top_k={m.top_k}")
    if m.eta != 1.0:
        args.append(f"eta={_num(m.eta)}")
    if m.keep_top_k != -1:
        args.append(f"keep_top_k={m.keep_top_k}")
    if m.confidence_threshold != -FLT_MAX:
        args.append(f"confidence_threshold={_num(m.confidence_threshold)}")
    g.emit(e, f"rt.detection_output({', '.join(args)})")


# ---------------------------------------------------------------------------- the forks' layers
@_gen("ShuffleChannel")
def _shuffle_channel(g: _Gen, e) -> None:
    g.uses_runtime = True
    g.emit(e, f"rt.shuffle_channel({g.var(e.bottoms[0])}, {e.module.group})")


@_gen("Axpy")
def _axpy(g: _Gen, e) -> None:
    a, x, y = (g.var(b) for b in e.bottoms)
    nd = len(g.shape(e.bottoms[1]))
    if g.shape(e.bottoms[0]) != g.shape(e.bottoms[1])[:2] + (1,) * (nd - 2):
        a = f"{a}.reshape({x}.shape[:2] + (1,) * {nd - 2})"
    g.emit(e, f"{a} * {x} + {y}")  # SENet's fused channel scale and shortcut


@_gen("BN")
def _bn(g: _Gen, e) -> None:
    from caffe_compat.layers.segmentation import PSPNetBN

    m = e.module
    c = m.channels
    x = g.var(e.bottoms[0])
    if len(g.shape(e.bottoms[0])) != 4:
        raise _refuse(e, "only a 4-D bottom has a Python code generator")
    if isinstance(m, PSPNetBN):
        if not m.use_global_stats:
            raise _refuse(e, "batch statistics at test time have no Python code generator")
        eps = "" if np.float32(m.eps) == np.float32(1e-5) else f", eps={_num(m.eps)}"
        tensors = {"weight": m.slope.reshape(c), "bias": m.bias.reshape(c),
                   "running_mean": m.mean.reshape(c), "running_var": m.variance.reshape(c),
                   "num_batches_tracked": torch.tensor(0, dtype=torch.long)}
        attr = g.module(e, f"nn.BatchNorm2d({c}{eps})", tensors)  # PSPNet's stored statistics
        g.emit(e, f"{attr}({x})", named=True)
        return
    if m.learn:
        raise _refuse(e, "bn_mode LEARN (batch statistics at test time) has no Python code generator")
    g.uses_runtime = True  # SegNet's INFERENCE mode: scale * x + shift
    attr = g.module(e, f"rt.Scale(({c},), axis=1, bias=True)",
                    {"weight": m.scale.reshape(c), "bias": m.shift.reshape(c)})
    g.emit(e, f"{attr}({x})", named=True)


@_gen("Upsample")
def _upsample(g: _Gen, e) -> None:
    from caffe_compat.layers.segmentation import UnpoolUpsample

    m = e.module
    x = g.var(e.bottoms[0])
    if not isinstance(m, UnpoolUpsample):  # the YOLO ports': nearest neighbour
        s = m.scale
        g.emit(e, x if s == 1 else f"{x}.repeat_interleave({s}, dim=2).repeat_interleave({s}, dim=3)")
        return
    g.uses_runtime = True
    if m.upsample_hw is not None:
        size = f"({m.upsample_hw[0]}, {m.upsample_hw[1]})"
    else:
        dims = [f"{x}.shape[{2 + i}] * {m.scale_hw[i]}" + (f" - {m.pad_out[i]}" if m.pad_out[i] else "")
                for i in range(2)]
        size = f"({dims[0]}, {dims[1]})"
    g.emit(e, f"rt.unpool({x}, {g.var(e.bottoms[1])}, {size})")


@_gen("Interp")
def _interp(g: _Gen, e) -> None:
    m = e.module
    if m.pad_beg or m.pad_end:
        raise _refuse(e, "interp_param.pad_beg/pad_end have no Python code generator")
    x = g.var(e.bottoms[0])
    if len(e.bottoms) == 2:
        size = f"{g.var(e.bottoms[1])}.shape[2:]"
    elif m.has["height"] and m.has["width"] and not (m.has["zoom_factor"] or m.has["shrink_factor"]):
        size = f"({m.height}, {m.width})"
    else:
        dims = []
        for i in (2, 3):
            d = f"{x}.shape[{i}]"
            if m.has["shrink_factor"]:
                d = f"({d} - 1) // {m.shrink} + 1"
            if m.has["zoom_factor"]:
                d = f"{d} * {m.zoom} - {m.zoom - 1}" if not m.has["shrink_factor"] else \
                    f"({d}) * {m.zoom} - {m.zoom - 1}"
            dims.append(d)
        size = f"({dims[0]}, {dims[1]})"
    # Caffe's Interp maps corner onto corner
    g.emit(e, f'F.interpolate({x}, size={size}, mode="bilinear", align_corners=True)')


@_gen("PSROIPooling")
def _psroi_pooling(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    g.emit(e, f"rt.psroi_pool({g.var(e.bottoms[0])}, {g.var(e.bottoms[1])}, output_dim={m.output_dim}, "
              f"group_size={m.group_size}, spatial_scale={_num(m.spatial_scale)})")


@_gen("Reorg")
def _reorg(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    rev = ", reverse=True" if m.reverse else ""
    g.emit(e, f"rt.reorg({g.var(e.bottoms[0])}, {m.stride}{rev})")


@_gen("Region")
def _region(g: _Gen, e) -> None:
    m = e.module
    g.uses_runtime = True
    g.emit(e, f"rt.region({g.var(e.bottoms[0])}, num={m.num}, coords={m.coords}, classes={m.classes})")


# ---------------------------------------------------------------------------- whole net
def _key(e) -> str:
    if e.type == "Python":
        p = e.module.param.python_param if e.module is not None else None
        return f"Python:{p.module}.{p.layer}" if p is not None else "Python"
    return e.type


def _walk(net) -> _Gen:
    """Every layer's code, after checking all of them have a generator."""
    if getattr(net, "phase", None) != "TEST":
        raise ExportError("Python code is generated for TEST nets only (inference); build the net "
                         "with phase='test'")
    missing = [f"'{_key(e)}' (layer '{e.name}')" for e in net.entries if _key(e) not in GENERATORS]
    if missing:
        raise ExportError(f"no Python code generator for layer type {', '.join(missing[:10])}"
                         + (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
    unbuilt = [e for e in net.entries if e.module is None]
    if unbuilt:
        raise ExportError(f"layer not built: {unbuilt[0].unbuilt_reason}", layer=unbuilt[0].name)
    g = _Gen(net)
    for name in net.input_names:
        g.var(name)
    for e in net.entries:
        GENERATORS[_key(e)](g, e)
    return g


def _shape_text(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ")" if s is not None else "?"


def generate_code(net, *, weights_name: str = "model.safetensors", source_name: Optional[str] = None) -> str:
    """The model file's text for ``net`` (a built TEST-phase :class:`caffe_compat.Net`).

    ``weights_name``: the weights file, relative to the model file (what ``load_model``
    reads by default); ``source_name``: the prototxt named in the docstring (default: the
    net's file name).  The text depends on the net's definition and declared input shapes
    only, never on its weights."""
    return _code(net, _walk(net), weights_name, source_name)


def _code(net, g: _Gen, weights_name: str, source_name: Optional[str]) -> str:
    cls = _class_name(net.net_name)
    inputs = [(n, g.var(n)) for n in net.input_names]
    outputs = [(n, g.var(n)) for n in net.output_names]
    src = source_name or (os.path.basename(net.source) if getattr(net, "source", None) else "a NetParameter")
    in_text = ", ".join(f"{n} {_shape_text(net.blob_shapes.get(n))}" for n, _ in inputs)
    out_text = ", ".join(n for n, _ in outputs)
    doc = (f"Caffe net {net.net_name!r} as a PyTorch module, generated by caffe-compat from {src} "
           "(regenerate rather than edit).\n\n"
           f"Inputs: {in_text}.  Outputs, returned as a dict by blob name: {out_text}.\n\n"
           f"Weights: {weights_name} beside this file; load_model() builds the module with them.")
    if g.uses_runtime:
        doc += f"  {RUNTIME_MODULE}.py, also beside this file, has what torch lacks."
    head = _docstring(doc, 0)
    head += ["from __future__ import annotations", "", "from pathlib import Path",
             "from typing import Dict", "", "import torch", "import torch.nn.functional as F",
             "from torch import Tensor, nn", ""]
    if g.uses_runtime:
        head += [f"import {RUNTIME_MODULE} as rt  # written beside this file", ""]
    head += [f"WEIGHTS = Path(__file__).parent / {weights_name!r}", "", ""]
    body = [f"class {cls}(nn.Module):"]
    body += ["    " + line for line in _docstring(
        f"The layers of {net.net_name!r} that have parameters, named after them; forward() "
        "follows the prototxt.", 4)]
    body += ["", "    def __init__(self) -> None:", "        super().__init__()"]
    body += [f"        {part}" for line in g.inits for part in _wrap(line, 8)]
    args = ", ".join(f"{v}: Tensor" for _, v in inputs)
    body += ["", f"    def forward(self{', ' if args else ''}{args}) -> Dict[str, Tensor]:"]
    body += [f"        {part}" for line in g.lines for part in _wrap(line, 8)]
    ret = "return {" + ", ".join(f"{n!r}: {v}" for n, v in outputs) + "}"
    if len(ret) + 8 <= 100:
        body.append(f"        {ret}")
    else:
        body += ["        return {"] + [f"            {n!r}: {v}," for n, v in outputs] + ["        }"]
    tail = ["", "", f"def load_model(weights: str | Path = WEIGHTS) -> {cls}:",
            f'    """A {cls} in eval mode with the weights of ``weights`` (a .safetensors file)."""',
            "    from safetensors.torch import load_file", "",
            "    with torch.device(\"meta\"):  # no memory for the random initial values",
            f"        model = {cls}()",
            "    model.load_state_dict(load_file(str(weights)), assign=True)",
            "    return model.eval()", ""]
    return "\n".join(head + body + tail)


def runtime_source() -> str:
    """The runtime module's text (written beside every generated model)."""
    return _RUNTIME_PATH.read_text(encoding="utf-8")


def state_dict_for(net) -> Dict[str, Tensor]:
    """The generated module's state dict for ``net``'s weights (the keys of the
    ``.safetensors`` file :func:`to_python` writes)."""
    return _walk(net).state


def to_python(net, path: str, *, weights_path: Optional[str] = None) -> None:
    """Write ``net`` as ``path`` (a standalone PyTorch module), its weights as
    ``weights_path`` (default: ``path`` with the suffix ``.safetensors``) and
    ``caffe_runtime.py`` beside ``path``.  Each file is written atomically."""
    from caffe_compat.weights.state_dict import save_safetensors

    path = os.fspath(path)
    if weights_path is None:
        weights_path = os.path.splitext(path)[0] + ".safetensors"
    weights_path = os.fspath(weights_path)
    folder = os.path.dirname(os.path.abspath(path))
    weights_name = os.path.relpath(os.path.abspath(weights_path), folder)
    g = _walk(net)
    code = _code(net, g, weights_name.replace(os.sep, "/"), None)
    save_safetensors(g.state, weights_path, metadata={"format": "pt", "source": "caffe-compat"})
    atomic_write(os.path.join(folder, f"{RUNTIME_MODULE}.py"), runtime_source().encode("utf-8"))
    atomic_write(path, code.encode("utf-8"))


# ---------------------------------------------------------------------------- the example
def example_net(corpus: Optional[Path] = None):
    """py-faster-rcnn's VGG16 Faster R-CNN test net as the example is generated from it
    (py-faster-rcnn's default config, the prototxt's input shapes)."""
    from caffe_compat import Net
    from caffe_compat.frcnn.config import default_cfg

    corpus = corpus or Path(os.environ.get("CAFFE_COMPAT_CORPUS", _ROOT.parent / "shared" / "corpus"))
    return Net(str(Path(corpus) / EXAMPLE_NET), phase="test", context={"frcnn_cfg": default_cfg()})


def example_files(net=None) -> Dict[str, str]:
    """File name -> text of the committed example (``docs/examples/``)."""
    net = net if net is not None else example_net()
    return {f"{EXAMPLE_NAME}.py": generate_code(net, weights_name=f"{EXAMPLE_NAME}.safetensors",
                                                source_name=EXAMPLE_NET),
            f"{RUNTIME_MODULE}.py": runtime_source()}


def write_example(folder: Path = EXAMPLE_DIR) -> List[Path]:
    """Regenerate the committed example (the code only: the weights are not committed)."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in example_files().items():
        atomic_write(str(folder / name), text.encode("utf-8"))
        written.append(folder / name)
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args != ["--example"]:
        print("usage: python -m caffe_compat.export.python_code --example  (regenerates "
              f"{EXAMPLE_DIR.relative_to(_ROOT)}/; `caffe-compat export --to python` for a net)",
              file=sys.stderr)
        return 2
    for p in write_example():
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
