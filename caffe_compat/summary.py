"""A net's layer table: type, wiring, shapes, parameter counts and FLOPs.

FLOPs are counted by running each layer on meta tensors under torch's FlopCounterMode
(multiply-adds count 2, as torch counts them); layers whose work is not a counted matmul
or convolution (pointwise ops, pooling, data-dependent Python layers) count 0.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from torch.utils.flop_counter import FlopCounterMode

from caffe_compat.layers.base import shape_str


@dataclass
class LayerRow:
    name: str
    type: str
    bottoms: List[str]
    tops: List[str]
    top_shapes: List[Optional[tuple]]
    params: int
    flops: int


def layer_rows(net) -> List[LayerRow]:
    rows = []
    shapes = net.blob_shapes
    cur = {}
    for e in net.entries:
        bshapes = [cur.get(b, shapes.get(b)) for b in e.bottoms]
        flops = 0
        tshapes: List[Optional[tuple]] = [None] * len(e.tops)
        nparams = 0
        if e.module is not None:
            seen = set()
            for t in e.module.caffe_blobs():
                if id(t) not in seen:
                    seen.add(id(t))
                    nparams += t.numel()
            if all(s is not None for s in bshapes):
                counter = FlopCounterMode(display=False)
                try:
                    with counter:
                        tshapes = list(net._infer(e.module, bshapes, e.name))
                    flops = int(counter.get_total_flops())
                except Exception:  # a layer that cannot run on meta still gets its shapes
                    tshapes = list(net._infer(e.module, bshapes, e.name))
        for t, s in zip(e.tops, tshapes):
            cur[t] = s
        rows.append(LayerRow(e.name, e.type, e.bottoms, e.tops, tshapes, nparams, flops))
    return rows


def human(n: float) -> str:
    for unit in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}" if unit else f"{int(n)}"
        n /= 1000.0
    return f"{n:.3g}P"


def format_table(net) -> str:
    rows = layer_rows(net)
    head = ("layer", "type", "bottoms", "tops (shape)", "params", "FLOPs")
    body = []
    for r in rows:
        tops = ", ".join(f"{t} [{shape_str(s)}]" for t, s in zip(r.tops, r.top_shapes))
        body.append((r.name, r.type, ", ".join(r.bottoms), tops, human(r.params) if r.params else "",
                     human(r.flops) if r.flops else ""))
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    widths = [min(w, 60) for w in widths]

    def fmt(cells):
        return "  ".join(c.ljust(w) if len(c) <= w else c for c, w in zip(cells, widths)).rstrip()

    lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
    lines += [fmt(b) for b in body]
    total_p = sum(info.param.numel() for info in net.learnable_params())
    total_p += sum(b.numel() for n, b in net.named_buffers())
    total_f = sum(r.flops for r in rows)
    unknown = sum(1 for r in rows for s in r.top_shapes if s is None)
    lines.append("")
    lines.append(f"{len(rows)} layers, {human(total_p)} parameters ({total_p}), {human(total_f)} FLOPs"
                 + (f"; {unknown} blob shape(s) unknown ('?': data source absent)" if unknown else ""))
    lines.append(f"outputs: {', '.join(net.output_names) or 'none'}; inputs: {', '.join(net.input_names) or 'none'}")
    return "\n".join(lines)
