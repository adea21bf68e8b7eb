"""``caffe.draw``: draw a NetParameter as a Graphviz graph, without pydot.

pycaffe's ``draw.py`` built a ``pydot.Dot`` and had Graphviz render it.  pydot is not a
dependency here, so the graph is written as DOT text directly, with Caffe's look:

* layers are ``record`` boxes labelled ``name``, ``(Type)`` and, for Convolution /
  Deconvolution, ``kernel size``, ``stride`` and ``pad`` (Pooling: ``(MAX Pooling)``
  and the same three); Convolution red, Pooling orange, InnerProduct purple, others blue;
  a layer whose one top is its one bottom (in place, e.g. ReLU) is green;
* blobs are grey octagons, one node per blob name (an in-place layer points back at the
  blob it reads, as in Caffe's pictures); a layer is one box per name and type (a
  train_val net's TRAIN and TEST data layers of one name share a box, as in Caffe's),
  and an edge drawn twice is drawn once;
* edges from a layer to its tops are labelled ``Batch N`` (Data), ``num_output``
  (Convolution, Deconvolution, InnerProduct);
* labels stack on lines for ``rankdir`` LR/RL and on one line for TB/BT.

With ``phase`` (``caffe.TRAIN``/``caffe.TEST`` or ``"train"``/``"test"``) only the
layers a net built in that phase has are drawn, by Caffe's own include/exclude rules
(:mod:`caffe_compat.net_state`; pycaffe compared only the rules' phase).  V0/V1 nets
(``layers { ... }``) are upgraded first (pycaffe drew nothing for them).

:func:`get_pydot_graph` returns a :class:`DotGraph`: the subset of ``pydot.Dot`` that
pycaffe scripts use -- ``to_string()``, ``create(format=...)``, ``write(path, format=...)``,
``create_png()``/``write_png(path)`` and the like.  Rendering runs Graphviz's ``dot`` when
it is on ``PATH``; formats ``dot``, ``gv`` and ``raw`` are the DOT text itself and need
no Graphviz (unlike pydot, ``dot`` is not laid out: the same text on every machine).
Without ``dot``, any other format raises :class:`GraphvizNotFound` saying so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from caffe_compat.errors import CaffeCompatError
from caffe_compat.protos import caffe_pb2

__all__ = [
    "LAYER_STYLE_DEFAULT", "NEURON_LAYER_STYLE", "BLOB_STYLE", "DotGraph", "DrawError",
    "GraphvizNotFound", "RANKDIRS", "TEXT_FORMATS", "choose_color_by_layertype", "get_pooling_types_dict",
    "get_edge_label", "get_layer_label", "get_layer_lr_mult", "get_pydot_graph", "draw_net",
    "draw_net_to_file", "render",
]

LAYER_STYLE_DEFAULT = {"shape": "record", "fillcolor": "#6495ED", "style": "filled"}
NEURON_LAYER_STYLE = {"shape": "record", "fillcolor": "#90EE90", "style": "filled"}
BLOB_STYLE = {"shape": "octagon", "fillcolor": "#E0E0E0", "style": "filled"}

#: Graphviz's layout directions
RANKDIRS = ("LR", "RL", "TB", "BT")

#: formats that are the DOT source itself (no Graphviz needed)
TEXT_FORMATS = ("dot", "gv", "raw")


class DrawError(CaffeCompatError):
    """A net that cannot be drawn in the format asked for (Graphviz failed, bad name)."""


class GraphvizNotFound(DrawError):
    """Rendering an image needs Graphviz's ``dot``, and it is not on PATH."""


# ----------------------------------------------------------------------------- labels
def choose_color_by_layertype(layertype: str) -> str:
    """Caffe's fill colour per layer type."""
    if layertype in ("Convolution", "Deconvolution"):
        return "#FF5050"
    if layertype == "Pooling":
        return "#FF9900"
    if layertype == "InnerProduct":
        return "#CC33FF"
    return "#6495ED"


def get_pooling_types_dict() -> Dict[int, str]:
    """Pooling method number -> name (``0 -> 'MAX'``...)."""
    return {v.number: v.name for v in caffe_pb2.PoolingParameter.PoolMethod.DESCRIPTOR.values}


def get_edge_label(layer: "caffe_pb2.LayerParameter") -> str:
    """The label of a layer's edges to its tops ('' for none)."""
    if layer.type == "Data":
        return f"Batch {layer.data_param.batch_size}"
    if layer.type in ("Convolution", "Deconvolution"):
        return str(layer.convolution_param.num_output)
    if layer.type == "InnerProduct":
        return str(layer.inner_product_param.num_output)
    return ""


def get_layer_lr_mult(layer: "caffe_pb2.LayerParameter") -> Tuple[float, float]:
    """The weight and bias ``lr_mult`` of a Convolution/Deconvolution/InnerProduct (default 1)."""
    if layer.type not in ("Convolution", "Deconvolution", "InnerProduct"):
        raise ValueError(f"{layer.type} layers do not have a learning rate multiplier")
    mults = [p.lr_mult if p.HasField("lr_mult") else 1.0 for p in layer.param[:2]]
    mults += [1.0] * (2 - len(mults))
    return float(mults[0]), float(mults[1])


def _dims(values: Sequence[int], h: int, w: int, default: int) -> str:
    """A spatial parameter as Caffe shows it: one number, or HxW where they differ."""
    if h or w:
        return str(h) if h == w else f"{h}x{w}"
    vals = list(values) or [default]
    return str(vals[0]) if len(set(vals)) == 1 else "x".join(str(v) for v in vals)


def _spatial(layer: "caffe_pb2.LayerParameter") -> Optional[List[str]]:
    if layer.type in ("Convolution", "Deconvolution"):
        p = layer.convolution_param
        k = _dims(p.kernel_size, p.kernel_h, p.kernel_w, 1)
        s = _dims(p.stride, p.stride_h, p.stride_w, 1)
        d = _dims(p.pad, p.pad_h, p.pad_w, 0)
    elif layer.type == "Pooling":
        p = layer.pooling_param
        if p.global_pooling:
            k, s, d = "global", "1", "0"
        else:
            k = _dims([p.kernel_size] if p.HasField("kernel_size") else [], p.kernel_h, p.kernel_w, 0)
            s = _dims([p.stride] if p.HasField("stride") else [], p.stride_h, p.stride_w, 1)
            d = _dims([p.pad] if p.HasField("pad") else [], p.pad_h, p.pad_w, 0)
    else:
        return None
    return [f"kernel size: {k}", f"stride: {s}", f"pad: {d}"]


def get_layer_label(layer: "caffe_pb2.LayerParameter", rankdir: str, display_lrm: bool = False) -> str:
    """A layer's label text (lines separated by ``\\n`` for LR/RL, by spaces for TB/BT).

    Escaped for a DOT string; unlike pycaffe's it carries no outer quotes (:class:`DotGraph`
    quotes every string).
    """
    sep = " " if str(rankdir).upper() in ("TB", "BT") else "\\n"
    if layer.type == "Pooling":
        pool = get_pooling_types_dict().get(layer.pooling_param.pool, str(layer.pooling_param.pool))
        parts = [_record_escape(layer.name), f"({pool} Pooling)"]
    else:
        parts = [_record_escape(layer.name), f"({_record_escape(layer.type)})"]
    parts += _spatial(layer) or []
    if display_lrm and layer.type in ("Convolution", "Deconvolution", "InnerProduct"):
        w, b = get_layer_lr_mult(layer)
        parts.append(f"lr mult: {w:.1f}, {b:.1f}")
    return sep.join(parts)


def _dot_text(text: Any) -> str:
    """Text for a DOT double-quoted string: backslashes and quotes escaped, one line."""
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\r", " ").replace("\n", " ")


def _record_escape(text: Any) -> str:
    """:func:`_dot_text` plus the characters that structure a ``record`` label."""
    out = _dot_text(text)
    for ch in "{}|<>":
        out = out.replace(ch, "\\" + ch)
    return out


# ----------------------------------------------------------------------------- the graph
def _id(text: str) -> str:
    return '"' + _dot_text(text) + '"'


def _attrs(attrs: Dict[str, str]) -> str:
    """Attribute values are escaped where they are made (labels) or fixed words (styles)."""
    return ", ".join(f'{k}="{v}"' for k, v in attrs.items())


@dataclass
class DotNode:
    """One node: ``name`` (the DOT id) and its attributes (``label``, ``shape``...)."""

    name: str
    attrs: Dict[str, str] = field(default_factory=dict)

    def get_name(self) -> str:
        return self.name

    def get_label(self) -> str:
        return self.attrs.get("label", self.name)

    def to_string(self) -> str:
        return f"{_id(self.name)} [{_attrs(self.attrs)}];"


@dataclass
class DotEdge:
    """One edge ``src -> dst`` (node names) with its attributes (``label``)."""

    src: str
    dst: str
    attrs: Dict[str, str] = field(default_factory=dict)

    def get_source(self) -> str:
        return self.src

    def get_destination(self) -> str:
        return self.dst

    def to_string(self) -> str:
        tail = f" [{_attrs(self.attrs)}]" if self.attrs else ""
        return f"{_id(self.src)} -> {_id(self.dst)}{tail};"


@dataclass
class DotGraph:
    """A directed graph with pydot's ``Dot`` methods that pycaffe scripts call.

    ``nodes``/``edges`` keep drawing order (first appearance).  ``create`` returns bytes
    (the DOT text for :data:`TEXT_FORMATS`, else what ``dot -T<format>`` writes);
    ``create_png()``, ``write_svg(path)``... are ``create``/``write`` with that format.
    """

    name: str = "Net"
    rankdir: str = "LR"
    nodes: List[DotNode] = field(default_factory=list)
    edges: List[DotEdge] = field(default_factory=list)

    def get_nodes(self) -> List[DotNode]:
        return list(self.nodes)

    def get_edges(self) -> List[DotEdge]:
        return list(self.edges)

    def get_node(self, name: str) -> List[DotNode]:
        return [n for n in self.nodes if n.name == name]

    def to_string(self) -> str:
        lines = [f"digraph {_id(self.name)} {{", f'  rankdir="{self.rankdir}";']
        lines += ["  " + n.to_string() for n in self.nodes]
        lines += ["  " + e.to_string() for e in self.edges]
        lines.append("}")
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.to_string()

    def create(self, prog: Optional[str] = None, format: str = "ps", encoding: Optional[str] = None) -> bytes:  # noqa: A002
        """The graph in ``format`` (pydot's signature; ``prog`` defaults to ``dot``)."""
        return render(self.to_string(), format, prog=prog or "dot")

    def write(self, path: str, prog: Optional[str] = None, format: str = "raw", encoding: Optional[str] = None) -> bool:  # noqa: A002
        """Write the graph in ``format`` to ``path`` (atomically); True, as pydot returns."""
        from caffe_compat.atomic import atomic_write

        atomic_write(os.fspath(path), self.create(prog=prog, format=format))
        return True

    def __getattr__(self, name: str) -> Any:
        # pydot's create_<fmt>() / write_<fmt>(path) shortcuts
        for prefix, method in (("create_", "create"), ("write_", "write")):
            if name.startswith(prefix) and len(name) > len(prefix):
                fmt = name[len(prefix):]
                fn = getattr(self, method)
                return lambda *a, **kw: fn(*a, format=fmt, **kw)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def render(source: str, fmt: str, prog: str = "dot") -> bytes:
    """DOT ``source`` in format ``fmt``: the text itself for :data:`TEXT_FORMATS`, else
    Graphviz's ``prog -T<fmt>`` output."""
    fmt = str(fmt).lstrip(".").lower()
    if not fmt:
        raise DrawError("no output format given (e.g. png, svg, pdf, or dot for the text)")
    if fmt in TEXT_FORMATS:
        return source.encode("utf-8")
    exe = shutil.which(prog)
    if exe is None:
        raise GraphvizNotFound(
            f"drawing a .{fmt} file needs Graphviz's `{prog}` program, which is not on PATH; install "
            f"Graphviz (e.g. `apt-get install graphviz`), or write a .dot file (DOT text) and render "
            f"it elsewhere with `dot -T{fmt}`")
    try:
        proc = subprocess.run([exe, f"-T{fmt}"], input=source.encode("utf-8"), capture_output=True,
                              check=False)
    except OSError as e:
        raise DrawError(f"cannot run Graphviz's {prog}: {e}", where=exe) from None
    if proc.returncode != 0:
        msg = " ".join(proc.stderr.decode("utf-8", "replace").split()) or f"exit status {proc.returncode}"
        raise DrawError(f"Graphviz's {prog} failed to render .{fmt}: {msg}")
    return proc.stdout


# ----------------------------------------------------------------------------- net -> graph
def _layers(caffe_net: "caffe_pb2.NetParameter", phase: Any, stages: Iterable[str],
            level: Optional[int]) -> List["caffe_pb2.LayerParameter"]:
    """The net's layers (upgraded from V0/V1), filtered for ``phase`` if given."""
    from caffe_compat.net_state import layer_included, make_state

    net = caffe_net
    if len(net.layers):
        from caffe_compat.upgrade import upgrade_net

        net = upgrade_net(net)
    if phase is None:
        return list(net.layer)
    bare = caffe_pb2.NetParameter()        # the caller's state, not the file's
    state = make_state(bare, phase=phase, level=level, stages=stages)
    return [lp for lp in net.layer if layer_included(lp, state)]


def get_pydot_graph(caffe_net: "caffe_pb2.NetParameter", rankdir: str = "LR", label_edges: bool = True,
                    phase: Any = None, display_lrm: bool = False, *, stages: Iterable[str] = (),
                    level: Optional[int] = None) -> DotGraph:
    """The :class:`DotGraph` of ``caffe_net`` (a ``caffe_pb2.NetParameter``).

    ``phase``: ``None`` draws every layer; ``caffe.TRAIN``/``caffe.TEST`` (or
    ``"train"``/``"test"``) only those included in that phase (with ``stages``/``level``
    as a net built with them would).
    """
    if not isinstance(caffe_net, caffe_pb2.NetParameter):
        raise DrawError(f"caffe_net must be a caffe_pb2.NetParameter, got {type(caffe_net).__name__} "
                        "(read a prototxt with text_format.Merge or caffe_compat.io.read_net_text)")
    rankdir = str(rankdir).upper()
    if rankdir not in RANKDIRS:
        raise DrawError(f"unknown rankdir {rankdir!r}; Graphviz's are {', '.join(RANKDIRS)}")
    graph = DotGraph(name=caffe_net.name or "Net", rankdir=rankdir)
    index: Dict[str, DotNode] = {}

    def node(name: str, attrs: Dict[str, str]) -> str:
        if name in index:                  # seen again: the same node, the latest attributes
            index[name].attrs = attrs
        else:
            index[name] = DotNode(name, attrs)
            graph.nodes.append(index[name])
        return name

    edges: Dict[Tuple[str, str, str], None] = {}
    for lp in _layers(caffe_net, phase, stages, level):
        in_place = len(lp.bottom) == 1 and len(lp.top) == 1 and lp.bottom[0] == lp.top[0]
        style = dict(NEURON_LAYER_STYLE) if in_place else \
            dict(LAYER_STYLE_DEFAULT, fillcolor=choose_color_by_layertype(lp.type))
        # one box per name and type, as Caffe drew: a train_val net's TRAIN and TEST data
        # layers of one name are one box (the later one's label)
        layer_id = node(f"{lp.name}_{lp.type}", {"label": get_layer_label(lp, rankdir, display_lrm), **style})
        for b in lp.bottom:
            edges[(node(f"{b}_blob", {"label": _dot_text(b), **BLOB_STYLE}), layer_id, "")] = None
        label = get_edge_label(lp) if label_edges else ""
        for t in lp.top:
            edges[(layer_id, node(f"{t}_blob", {"label": _dot_text(t), **BLOB_STYLE}), label)] = None
    graph.edges = [DotEdge(src, dst, {"label": lab} if lab else {}) for src, dst, lab in edges]
    return graph


def draw_net(caffe_net: "caffe_pb2.NetParameter", rankdir: str, ext: str = "png", phase: Any = None,
             display_lrm: bool = False, **kwargs: Any) -> bytes:
    """``caffe_net`` drawn as ``ext`` (``png``, ``svg``, ``pdf``..., or ``dot`` for the text)."""
    return get_pydot_graph(caffe_net, rankdir, phase=phase, display_lrm=display_lrm, **kwargs).create(format=ext)


def draw_net_to_file(caffe_net: "caffe_pb2.NetParameter", filename: str, rankdir: str = "LR",
                     phase: Any = None, display_lrm: bool = False, **kwargs: Any) -> None:
    """Draw ``caffe_net`` to ``filename`` in the format its extension names (``.dot``/``.gv``/
    ``.raw``: DOT text, no Graphviz needed).  Nothing is written if rendering fails."""
    filename = os.fspath(filename)
    base = os.path.basename(filename)
    if "." not in base.lstrip("."):
        raise DrawError("the output file needs an extension naming the format (.dot, .png, .svg, .pdf...)",
                        where=filename)
    ext = base[base.rfind(".") + 1:]
    data = draw_net(caffe_net, rankdir, ext, phase=phase, display_lrm=display_lrm, **kwargs)
    from caffe_compat.atomic import atomic_write

    atomic_write(filename, data)
