"""Read a fork's own ``caffe.proto`` and extend the schema with it, at run time.

The long tail of Caffe forks each added a few messages and ``LayerParameter`` fields.  A user
who holds such a model also holds the fork's ``caffe.proto``; ``Net(..., schema=PATH)`` (and
``--schema`` on every command) reads it with the small proto2 reader below (no ``protoc``
needed) and builds a schema that is caffe-compat's own plus every message and field the fork
adds.  Text prototxts are matched by field *name*, so the fork's param blocks parse; fields the
fork numbers differently from ours keep our number (binary weights never need layer params:
see ``caffe_compat.weights``).

Decision on conflicts (a field name both define with different numbers or types, or a number
the fork uses for another name): ours is kept for names we already know; a new fork field whose
number is taken in our schema is given a free number from a private range (text format does
not see numbers).  Both are listed in ``Schema.notes``.
"""
from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from caffe_compat import io
from caffe_compat.errors import ParseError

FDP = descriptor_pb2.FieldDescriptorProto

_SCALARS = {
    "double": FDP.TYPE_DOUBLE, "float": FDP.TYPE_FLOAT, "int64": FDP.TYPE_INT64,
    "uint64": FDP.TYPE_UINT64, "int32": FDP.TYPE_INT32, "fixed64": FDP.TYPE_FIXED64,
    "fixed32": FDP.TYPE_FIXED32, "bool": FDP.TYPE_BOOL, "string": FDP.TYPE_STRING,
    "bytes": FDP.TYPE_BYTES, "uint32": FDP.TYPE_UINT32, "sfixed32": FDP.TYPE_SFIXED32,
    "sfixed64": FDP.TYPE_SFIXED64, "sint32": FDP.TYPE_SINT32, "sint64": FDP.TYPE_SINT64,
}
_LABELS = {"optional": FDP.LABEL_OPTIONAL, "repeated": FDP.LABEL_REPEATED,
           "required": FDP.LABEL_REQUIRED}
#: numbers handed to fork fields whose own number is taken (below protobuf's 2^29 - 1 limit,
#: above every number any Caffe fork uses)
PRIVATE_BASE = 400_000_000

_TOKEN = re.compile(r'''
    (?P<ws>\s+) | (?P<comment>//[^\n]*|/\*.*?\*/) |
    (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*') |
    (?P<num>[-+]?(?:0[xX][0-9a-fA-F]+|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)) |
    (?P<ident>[A-Za-z_][\w.]*) | (?P<sym>[{}\[\]=;,<>()])
''', re.X | re.S)


@dataclass
class _Tok:
    kind: str
    text: str
    line: int


def _tokens(text: str, path: str) -> List[_Tok]:
    out: List[_Tok] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise ParseError(f"unexpected character {text[pos]!r} in .proto", where=f"{path}:{line}")
        kind = m.lastgroup or ""
        if kind not in ("ws", "comment"):
            out.append(_Tok(kind, m.group(), line))
        line += m.group().count("\n")
        pos = m.end()
    return out


class _Reader:
    """Recursive-descent reader of the proto2 subset Caffe schemas use."""

    def __init__(self, toks: List[_Tok], path: str):
        self.t, self.i, self.path = toks, 0, path

    def peek(self) -> Optional[_Tok]:
        return self.t[self.i] if self.i < len(self.t) else None

    def next(self) -> _Tok:
        tok = self.peek()
        if tok is None:
            raise ParseError("unexpected end of .proto file", where=self.path)
        self.i += 1
        return tok

    def expect(self, text: str) -> _Tok:
        tok = self.next()
        if tok.text != text:
            raise ParseError(f"expected {text!r}, got {tok.text!r}", where=f"{self.path}:{tok.line}")
        return tok

    def error(self, tok: _Tok, msg: str) -> ParseError:
        return ParseError(msg, where=f"{self.path}:{tok.line}")

    def skip_statement(self) -> None:
        """Skip to the end of a statement (``;``) or over a ``{...}`` block."""
        depth = 0
        while True:
            tok = self.next()
            if tok.text == "{":
                depth += 1
            elif tok.text == "}":
                depth -= 1
                if depth == 0:
                    return
            elif tok.text == ";" and depth == 0:
                return

    def file(self) -> descriptor_pb2.FileDescriptorProto:
        fdp = descriptor_pb2.FileDescriptorProto(name=os.path.basename(self.path), syntax="proto2")
        while self.peek() is not None:
            tok = self.next()
            if tok.text == "syntax":
                self.expect("=")
                val = self.next().text.strip("\"'")
                if val != "proto2":
                    raise self.error(tok, f"only proto2 schemas are read (this one is {val})")
                self.expect(";")
            elif tok.text == "package":
                fdp.package = self.next().text
                self.expect(";")
            elif tok.text == "message":
                self.message(fdp.message_type.add())
            elif tok.text == "enum":
                self.enum(fdp.enum_type.add())
            elif tok.text in ("import", "option", "extend", "service"):
                self.skip_statement()
            elif tok.text == ";":
                continue
            else:
                raise self.error(tok, f"unexpected {tok.text!r} at the top level of a .proto")
        return fdp

    def enum(self, e: descriptor_pb2.EnumDescriptorProto) -> None:
        e.name = self.next().text
        self.expect("{")
        while True:
            tok = self.next()
            if tok.text == "}":
                return
            if tok.text in ("option", "reserved"):
                self.skip_statement()
                continue
            if tok.text == ";":
                continue
            self.expect("=")
            num = self.next()
            e.value.add(name=tok.text, number=int(num.text, 0))
            if self.peek() and self.peek().text == "[":
                self._options()
            self.expect(";")

    def _options(self) -> Dict[str, str]:
        self.expect("[")
        opts: Dict[str, str] = {}
        while True:
            key = self.next().text
            self.expect("=")
            opts[key] = self.next().text
            sep = self.next().text
            if sep == "]":
                return opts
            if sep != ",":
                raise ParseError(f"expected ',' or ']' in field options, got {sep!r}", where=self.path)

    def message(self, m: descriptor_pb2.DescriptorProto) -> None:
        m.name = self.next().text
        self.expect("{")
        while True:
            tok = self.next()
            if tok.text == "}":
                return
            if tok.text == "message":
                self.message(m.nested_type.add())
            elif tok.text == "enum":
                self.enum(m.enum_type.add())
            elif tok.text in ("option", "extensions", "reserved", "extend", "oneof"):
                self.skip_statement()
            elif tok.text == ";":
                continue
            elif tok.text in _LABELS:
                self.field(m, tok)
            else:
                raise self.error(tok, f"unexpected {tok.text!r} in message {m.name} "
                                      "(proto2 fields need optional/repeated/required)")

    def field(self, m: descriptor_pb2.DescriptorProto, label: _Tok) -> None:
        typ = self.next()
        name = self.next()
        self.expect("=")
        num = self.next()
        f = m.field.add(name=name.text, number=int(num.text, 0), label=_LABELS[label.text])
        if typ.text in _SCALARS:
            f.type = _SCALARS[typ.text]
        else:
            f.type_name = typ.text  # resolved once every type is known
        if self.peek() and self.peek().text == "[":
            opts = self._options()
            if "default" in opts:
                f.default_value = opts["default"].strip("\"'") if typ.text in ("string", "bytes") \
                    else opts["default"]
            if opts.get("packed") == "true":
                f.options.packed = True
            if opts.get("deprecated") == "true":
                f.options.deprecated = True
        self.expect(";")


def _resolve_types(fdp: descriptor_pb2.FileDescriptorProto, path: str) -> None:
    """Turn each field's relative type name into '.pkg.Full.Name' (proto scoping rules)."""
    pkg = f".{fdp.package}" if fdp.package else ""
    kinds: Dict[str, int] = {}

    def collect(prefix: str, msgs, enums) -> None:
        for e in enums:
            kinds[f"{prefix}.{e.name}"] = FDP.TYPE_ENUM
        for m in msgs:
            full = f"{prefix}.{m.name}"
            kinds[full] = FDP.TYPE_MESSAGE
            collect(full, m.nested_type, m.enum_type)

    collect(pkg, fdp.message_type, fdp.enum_type)

    def walk(scope: str, msgs) -> None:
        for m in msgs:
            here = f"{scope}.{m.name}"
            for f in m.field:
                if not f.type_name or f.type_name.startswith("."):
                    continue
                parts = here.split(".")
                for k in range(len(parts), 0, -1):
                    cand = ".".join(parts[:k]) + "." + f.type_name
                    if cand in kinds:
                        f.type_name, f.type = cand, kinds[cand]
                        break
                else:
                    cand = "." + f.type_name
                    if cand not in kinds:
                        raise ParseError(f"field {m.name}.{f.name}: unknown type {f.type_name!r}",
                                         where=path)
                    f.type_name, f.type = cand, kinds[cand]
            walk(here, m.nested_type)

    walk(pkg, fdp.message_type)


def read_proto(path: str) -> descriptor_pb2.FileDescriptorProto:
    """A ``FileDescriptorProto`` for a proto2 ``.proto`` file (Caffe's dialect)."""
    text = io.read_text_file(path, what=".proto schema")
    fdp = _Reader(_tokens(text, os.fspath(path)), os.fspath(path)).file()
    _resolve_types(fdp, os.fspath(path))
    return fdp


# ---------------------------------------------------------------------------- merging
def _index(fdp) -> Dict[str, descriptor_pb2.DescriptorProto]:
    out: Dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            out[f"{prefix}{m.name}"] = m
            walk(f"{prefix}{m.name}.", m.nested_type)

    walk("", fdp.message_type)
    return out


def _retarget(f, src_pkg: str, dst_pkg: str) -> None:
    if f.type_name and src_pkg != dst_pkg and f.type_name.startswith(f".{src_pkg}."):
        f.type_name = f".{dst_pkg}." + f.type_name[len(src_pkg) + 2:]


@dataclass
class Schema:
    """A schema: its ``NetParameter``/``SolverParameter`` classes and where it came from."""

    classes: Dict[str, type]
    source: str
    notes: List[str] = field(default_factory=list)
    pool: Optional[descriptor_pool.DescriptorPool] = None

    def __getattr__(self, name: str):
        try:
            return self.__dict__["classes"][name]
        except KeyError:
            raise AttributeError(name) from None


def merge_into(base: descriptor_pb2.FileDescriptorProto,
               fork: descriptor_pb2.FileDescriptorProto) -> List[str]:
    """Add ``fork``'s messages, enum values and fields missing from ``base`` (in place).

    Returns notes on every conflict (see the module docstring for the policy)."""
    notes: List[str] = []
    bpkg, fpkg = base.package, fork.package
    bidx, fidx = _index(base), _index(fork)
    private = PRIVATE_BASE
    for full, fm in fidx.items():
        bm = bidx.get(full)
        if bm is None:
            if "." in full:  # a nested message new to base: add it under its parent
                parent = bidx.get(full.rsplit(".", 1)[0])
                target = parent.nested_type if parent is not None else None
            else:
                target = base.message_type
            if target is None:
                continue  # its parent was added whole already
            nm = target.add()
            nm.CopyFrom(fm)
            for sub in [nm] + list(_index_msgs(nm)):
                for f in sub.field:
                    _retarget(f, fpkg, bpkg)
            bidx.update({f"{full}{k[len(nm.name):]}": v for k, v in _index_named(nm).items()})
            continue
        by_name = {f.name: f for f in bm.field}
        used = {f.number for f in bm.field}
        for fe in fm.enum_type:  # enum values a fork appends (e.g. new pooling methods)
            be = next((e for e in bm.enum_type if e.name == fe.name), None)
            if be is None:
                bm.enum_type.add().CopyFrom(fe)
                continue
            have_names = {v.name for v in be.value}
            have_nums = {v.number for v in be.value}
            for v in fe.value:
                if v.name not in have_names:
                    if v.number in have_nums:
                        notes.append(f"{full}.{fe.name}.{v.name} = {v.number}: number taken, value "
                                     "kept by name for text only")
                    be.value.add().CopyFrom(v)
        for f in fm.field:
            have = by_name.get(f.name)
            if have is not None:
                if have.number != f.number or have.type != f.type:
                    notes.append(f"{full}.{f.name}: the fork gives number {f.number}, ours is "
                                 f"{have.number}; ours is kept")
                continue
            nf = bm.field.add()
            nf.CopyFrom(f)
            _retarget(nf, fpkg, bpkg)
            if f.number in used:
                while private in used:
                    private += 1
                notes.append(f"{full}.{f.name}: number {f.number} is taken here, given {private}")
                nf.number = private
                private += 1
            used.add(nf.number)
    if base.enum_type is not None:
        have = {e.name for e in base.enum_type}
        for e in fork.enum_type:
            if e.name not in have:
                base.enum_type.add().CopyFrom(e)
    return notes


def _index_msgs(m):
    for n in m.nested_type:
        yield n
        yield from _index_msgs(n)


def _index_named(m, prefix: str = "") -> Dict[str, descriptor_pb2.DescriptorProto]:
    out = {f"{prefix}{m.name}": m}
    for n in m.nested_type:
        out.update(_index_named(n, f"{prefix}{m.name}."))
    return out


_CACHE: Dict[Tuple[str, float, int], Schema] = {}


def load_schema(path: Optional[str]) -> Optional[Schema]:
    """caffe-compat's schema extended with the fork ``.proto`` at ``path`` (None: none).

    Cached by path and modification time: building a pool costs a few milliseconds, and
    message classes of one schema must be the same classes across nets."""
    if path is None:
        return None
    from caffe_compat.protos import caffe_pb2

    path = os.fspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise ParseError(f"cannot read schema: {e.strerror}", where=path) from None
    key = (os.path.abspath(path), st.st_mtime, st.st_size)
    if key in _CACHE:
        return _CACHE[key]
    fork = read_proto(path)
    base = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(base)
    base.name = f"caffe_compat_with_{os.path.basename(path)}"
    notes = merge_into(base, fork)
    pool = descriptor_pool.DescriptorPool()
    try:
        pool.Add(base)
        fd = pool.FindFileByName(base.name)
    except Exception as e:  # protobuf's TypeError/ValueError on an inconsistent schema
        raise ParseError(f"schema cannot be combined with caffe-compat's: {e}", where=path) from None
    classes = {}
    for name in ("NetParameter", "SolverParameter", "LayerParameter", "V1LayerParameter",
                 "BlobProto", "NetState"):
        desc = fd.message_types_by_name[name]
        classes[name] = message_factory.GetMessageClass(desc)
    schema = Schema(classes=classes, source=path, notes=notes, pool=pool)
    _CACHE[key] = schema
    return schema


def as_schema(schema) -> Optional[Schema]:
    """A :class:`Schema` from a path, a Schema, or None."""
    if schema is None or isinstance(schema, Schema):
        return schema
    return load_schema(os.fspath(schema))


@contextlib.contextmanager
def use_schema(schema):
    """Read net definitions inside this block with ``schema`` (a path or Schema) added.

    The CLI's ``--schema`` wraps a command in it; ``Net(..., schema=)`` wraps its own build.
    ``io.read_net_text`` reads it while parsing, never during a forward."""
    token = io._SCHEMA.set(as_schema(schema) if schema is not None else io._SCHEMA.get())
    try:
        yield io._SCHEMA.get()
    finally:
        io._SCHEMA.reset(token)
