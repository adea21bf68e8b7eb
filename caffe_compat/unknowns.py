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
import sys
from collections import deque
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from caffe_compat.errors import shorten
from caffe_compat.layers.registry import WAYS_FORWARD, is_registered
from caffe_compat.protos import caffe_pb2

_STR = (r'"(?:[^"\\\n]++|\\.)*+"|\'(?:[^\'\\\n]++|\\.)*+\'' if sys.version_info >= (3, 11)  # possessive:
       else r'"(?:[^"\\\n]+|\\.)*"|\'(?:[^\'\\\n]+|\\.)*\'')        # no state per character
_TOKEN = re.compile(r'''(?P<ws>\s+)|(?P<comment>\#[^\n]*)|(?P<str>''' + _STR
                    + r''')|(?P<sym>[{}<>:;,\[\]])|(?P<word>[^\s{}<>:;,\[\]"'\#]+)''')
#: unknown fields and types kept for the message (the rest are only counted), and listed in it
_KEEP = 1000
_LIST = 10


@dataclass
class Unknowns:
    """Unknown fields (message, name, line) and layer types (type, layer name, line)."""

    fields: List[Tuple[str, str, int]] = field(default_factory=list)
    types: List[Tuple[str, str, int]] = field(default_factory=list)
    #: unknown fields found beyond the first ``_KEEP`` (counted, not kept)
    more_fields: int = 0

    def __bool__(self) -> bool:
        return bool(self.fields or self.types)

    def add_field(self, message: str, name: str, line: int) -> None:
        if len(self.fields) < _KEEP:
            self.fields.append((message, shorten(name, 80), line))
        else:
            self.more_fields += 1

    def message(self) -> str:
        from caffe_compat.forks import describe_type

        parts = []
        if self.types:
            seen = {}
            for t, layer, line in self.types:
                seen.setdefault(t, []).append((layer, line))
            items = []
            for t, where in list(seen.items())[:_LIST]:
                at = ", ".join(f"'{shorten(n, 80)}'" + (f" (line {ln})" if ln else "") for n, ln in where[:3])
                more = f" and {len(where) - 3} more" if len(where) > 3 else ""
                items.append(f"'{shorten(t, 80)}'{describe_type(t) or ' (no fork caffe-compat knows)'}: "
                             f"layer {at}{more}")
            if len(seen) > _LIST:
                items.append(f"... ({len(seen) - _LIST} more types)")
            parts.append(f"{len(seen)} unknown layer type(s): " + "; ".join(items))
        if self.fields:
            items = []
            for msg, name, line in self.fields[:_LIST]:
                items.append(f"{msg}.{shorten(name, 80)} at line {line}{_near(msg, name)}")
            total = len(self.fields) + self.more_fields
            if total > _LIST:
                items.append(f"... ({total - _LIST} more)")
            parts.append(f"{total} unknown field(s): " + "; ".join(items))
        return ". ".join(parts) + ". " + WAYS_FORWARD


def _near(message: str, name: str) -> str:
    """' (did you mean a, b?)' from the message's own fields, or ''."""
    import difflib

    try:
        desc = caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(f"caffe.{message}")
    except KeyError:
        return ""
    if len(name) > 100:  # no field name is that long (and difflib's cost grows with it)
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


class _Lookahead:
    """The token stream with a few tokens of lookahead (no list of all tokens: a 64 MB file
    has millions)."""

    _END = ("", "", 0)

    def __init__(self, tokens):
        self._it = iter(tokens)
        self._buf: deque = deque()

    def peek(self, k: int = 0) -> Tuple[str, str, int]:
        while len(self._buf) <= k:
            nxt = next(self._it, None)
            if nxt is None:
                return self._END
            self._buf.append(nxt)
        return self._buf[k]

    def skip(self, n: int = 1) -> None:
        for _ in range(n):
            if not self._buf and next(self._it, None) is None:
                return
            if self._buf:
                self._buf.popleft()

    def more(self) -> bool:
        return self.peek(0) is not self._END


def scan(text: str, root=None, *, check_types: bool = True) -> Unknowns:
    """Unknown fields of ``text`` (a NetParameter by default) and unregistered layer types.

    Tolerant by design: it only reports; the real parser still decides what is valid."""
    root = root or caffe_pb2.NetParameter.DESCRIPTOR
    out = Unknowns()
    stack: List[Optional[object]] = [root]  # descriptor of each open block (None: skipping)
    layer_info: List[dict] = []  # per open layer block: name, type, line
    toks = _Lookahead(_tokens(text))
    while toks.more():
        kind, tok, line = toks.peek(0)
        desc = stack[-1]
        if kind == "sym" and tok in "}>":
            if len(stack) > 1:
                closed = stack.pop()
                if closed is not None and closed.full_name in ("caffe.LayerParameter",
                                                               "caffe.V1LayerParameter"):
                    info = layer_info.pop() if layer_info else {}
                    t = info.get("type")
                    if check_types and t and closed.full_name == "caffe.LayerParameter" \
                            and not is_registered(t) and len(out.types) < _KEEP:
                        out.types.append((t, info.get("name", "?"), info.get("line", 0)))
            toks.skip()
            continue
        if kind != "word":
            toks.skip()
            continue
        name = tok
        nxt = toks.peek(1)
        if nxt[1] == ":" and toks.peek(2)[1] in ("{", "<"):
            toks.skip()  # `name: { ... }` form
            nxt = toks.peek(1)
        if nxt[1] in ("{", "<"):
            if desc is None:
                stack.append(None)
            else:
                f = desc.fields_by_name.get(name)
                if f is None or f.message_type is None:
                    if f is None:
                        out.add_field(desc.name, name, line)
                    stack.append(None)
                else:
                    stack.append(f.message_type)
                    if f.message_type.full_name in ("caffe.LayerParameter", "caffe.V1LayerParameter"):
                        layer_info.append({"line": line})
            toks.skip(2)
            continue
        if nxt[1] == ":":
            # scalar field: value is the next token (or a [list])
            if desc is not None:
                f = desc.fields_by_name.get(name)
                if f is None:
                    out.add_field(desc.name, name, line)
                elif desc.full_name == "caffe.LayerParameter" and name in ("type", "name") and layer_info:
                    val = toks.peek(2)[1]
                    layer_info[-1][name] = val.strip("\"'")
            opens_list = toks.peek(2)[1] == "["
            toks.skip(3)
            if opens_list:
                while toks.more() and toks.peek(0)[1] != "]":
                    toks.skip()
                toks.skip()
            continue
        toks.skip()
    return out
