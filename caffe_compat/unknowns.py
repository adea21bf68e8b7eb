"""Everything a prototxt uses that caffe-compat does not know, found in one pass.

protobuf's text parser stops at the first unknown field, and a net builder at the first
unknown layer type; a user converting a fork's model then fixes one thing per run.  This
module walks the text against the schema's descriptors and lists *every* unknown field
(with its line) and every layer type without an implementation, names the fork each comes
from where caffe-compat knows it, and gives the two ways forward: the fork's own schema
(``schema=`` / ``--schema``) and registering an implementation.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from caffe_compat.layers.registry import WAYS_FORWARD, is_registered
from caffe_compat.protos import caffe_pb2

_TOKEN = re.compile(r'''(?P<ws>\s+)|(?P<comment>\#[^\n]*)|(?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|(?P<sym>[{}<>:;,\[\]])|(?P<word>[^\s{}<>:;,\[\]"'\#]+)''')



@dataclass
class Unknowns:
    """Unknown fields (message, name, line) and layer types (type, layer name, line)."""

    fields: List[Tuple[str, str, int]] = field(default_factory=list)
    types: List[Tuple[str, str, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.fields or self.types)

    def message(self) -> str:
        from caffe_compat.forks import describe_type

        parts = []
        if self.types:
            seen = {}
            for t, layer, line in self.types:
                seen.setdefault(t, []).append((layer, line))
            items = []
            for t, where in seen.items():
                at = ", ".join(f"'{n}'" + (f" (line {ln})" if ln else "") for n, ln in where[:3])
                more = f" and {len(where) - 3} more" if len(where) > 3 else ""
                items.append(f"'{t}'{describe_type(t) or ' (no fork caffe-compat knows)'}: layer {at}{more}")
            parts.append(f"{len(seen)} unknown layer type(s): " + "; ".join(items))
        if self.fields:
            items = []
            for msg, name, line in self.fields:
                items.append(f"{msg}.{name} at line {line}{_near(msg, name)}")
            parts.append(f"{len(self.fields)} unknown field(s): " + "; ".join(items))
        return ". ".join(parts) + ". " + WAYS_FORWARD


def _near(message: str, name: str) -> str:
    """' (did you mean a, b?)' from the message's own fields, or ''."""
    import difflib

    try:
        desc = caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"caffe.{message}")
    except KeyError:
        return ""
    near = difflib.get_close_matches(name, list(desc.fields_by_name), n=2, cutoff=0.75)
    return f" (did you mean {', '.join(near)}?)" if near else ""


def _tokens(text: str):
    line = 1
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind in ("word", "str", "sym"):
            yield kind, m.group(), line
        line += m.group().count("\n")


def scan(text: str, root=None, *, check_types: bool = True) -> Unknowns:
    """Unknown fields of ``text`` (a NetParameter by default) and unregistered layer types.

    Tolerant by design: it only reports; the real parser still decides what is valid."""
    root = root or caffe_pb2.NetParameter.DESCRIPTOR
    out = Unknowns()
    stack: List[Optional[object]] = [root]  # descriptor of each open block (None: skipping)
    layer_info: List[dict] = []  # per open layer block: name, type, line
    toks = list(_tokens(text))
    i = 0
    pending: Optional[Tuple[str, int]] = None  # a field name awaiting ':' or '{'
    while i < len(toks):
        kind, tok, line = toks[i]
        desc = stack[-1]
        if kind == "sym" and tok in "}>":
            if len(stack) > 1:
                closed = stack.pop()
                if closed is not None and closed.full_name in ("caffe.LayerParameter",
                                                               "caffe.V1LayerParameter"):
                    info = layer_info.pop() if layer_info else {}
                    t = info.get("type")
                    if check_types and t and closed.full_name == "caffe.LayerParameter" \
                            and not is_registered(t):
                        out.types.append((t, info.get("name", "?"), info.get("line", 0)))
            i += 1
            continue
        if kind != "word":
            i += 1
            continue
        name = tok
        nxt = toks[i + 1] if i + 1 < len(toks) else ("", "", line)
        if nxt[1] == ":" and i + 2 < len(toks) and toks[i + 2][1] in ("{", "<"):
            i += 1  # `name: { ... }` form
            nxt = toks[i + 1]
        if nxt[1] in ("{", "<"):
            if desc is None:
                stack.append(None)
            else:
                f = desc.fields_by_name.get(name)
                if f is None or f.message_type is None:
                    if f is None:
                        out.fields.append((desc.name, name, line))
                    stack.append(None)
                else:
                    stack.append(f.message_type)
                    if f.message_type.full_name in ("caffe.LayerParameter", "caffe.V1LayerParameter"):
                        layer_info.append({"line": line})
            i += 2
            continue
        if nxt[1] == ":":
            # scalar field: value is the next token (or a [list])
            if desc is not None:
                f = desc.fields_by_name.get(name)
                if f is None:
                    out.fields.append((desc.name, name, line))
                elif desc.full_name == "caffe.LayerParameter" and name in ("type", "name") and layer_info:
                    val = toks[i + 2][1] if i + 2 < len(toks) else ""
                    layer_info[-1][name] = val.strip("\"'")
            i += 3
            if i - 1 < len(toks) and toks[i - 1][1] == "[":
                while i < len(toks) and toks[i][1] != "]":
                    i += 1
                i += 1
            continue
        i += 1
    return out
