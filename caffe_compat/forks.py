"""The Caffe forks caffe-compat knows: their layer types and their own field numbers.

The schema (``protos/caffe.proto``) is the union of BVLC, the Fast R-CNN fork and the forks of
``protos/forks/FORKS.tsv``.  Its *binary* numbering is BVLC's: every field a fork adds to a BVLC
message lives there at a private number, because forks reuse numbers for different things
(PSPNet's ``interp_param`` is BVLC's ``input_param`` = 143; R-FCN's ``psroi_pooling_param`` =
10001 is what CaffeOnSpark models carry as a class name).  Text prototxts are read by name,
so that is invisible there.

Binary files are where numbers matter.  A layer a fork wrote carries that fork's numbers, so
its ``LayerParameter`` is decoded with *that fork's* numbering, chosen by the layer's type
(``PriorBox`` -> SSD, ``Interp`` -> PSPNet, ...), and written back the same way.  Layers of
other types are decoded with the union's (BVLC's) numbering, where fork numbers are unknown
fields, skipped by wire type.  This is the conflict policy; docs/differences.md repeats it.
"""
from __future__ import annotations

import csv
import functools
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format

from caffe_compat import wire
from caffe_compat.proto_text import is_repeated
from caffe_compat.protos import caffe_pb2

FORKS_DIR = os.path.join(os.path.dirname(os.path.abspath(caffe_pb2.__file__)), "forks")
#: numbers a fork pool moves a colliding union field to (never in any file)
_DISPLACED_BASE = 500_000_000


@dataclass(frozen=True)
class Fork:
    """One fork: where its facts come from and the layer types it defines."""

    name: str
    repo: str
    commit: str
    layer_types: Tuple[str, ...]
    note: str
    rows: Tuple[Tuple[str, str, str, int, str], ...]  # (message, field, type, number, kind)

    @property
    def source(self) -> str:
        return f"{self.repo}@{self.commit[:7]}" if len(self.commit) >= 7 else self.repo


def _read_tsv(path: str) -> List[Dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@functools.lru_cache(maxsize=None)
def forks() -> Tuple[Fork, ...]:
    """Every fork in FORKS.tsv order (package data; read once)."""
    out = []
    for r in _read_tsv(os.path.join(FORKS_DIR, "FORKS.tsv")):
        rows = tuple((x["message"], x["field"], x["type"], int(x["number"]), x.get("kind") or "new")
                     for x in _read_tsv(os.path.join(FORKS_DIR, f"{r['fork']}.tsv")))
        types = tuple(t.strip() for t in (r.get("layer_types") or "").split(",") if t.strip())
        out.append(Fork(r["fork"], r["repo"], r["commit"], types, r.get("note") or "", rows))
    return tuple(out)


@functools.lru_cache(maxsize=None)
def _by_type() -> Dict[str, Tuple[Fork, ...]]:
    table: Dict[str, List[Fork]] = {}
    for f in forks():
        for t in f.layer_types:
            table.setdefault(t, []).append(f)
    return {t: tuple(fs) for t, fs in table.items()}


def forks_of_type(type_name: str) -> Tuple[Fork, ...]:
    """The forks that define layer type ``type_name``, in FORKS.tsv order (``BN`` and
    ``Upsample`` have several, with different field numbers)."""
    return _by_type().get(type_name, ())


def fork_of_type(type_name: str) -> Optional[Fork]:
    """The first fork that defines layer type ``type_name``, or None."""
    found = forks_of_type(type_name)
    return found[0] if found else None


def forks_with_field(message: str, field: str) -> List[Fork]:
    """Forks whose tables add ``message.field`` (to name them in errors)."""
    return [f for f in forks() if any(m == message and n == field for m, n, *_ in f.rows)]


def _find(fdp: descriptor_pb2.FileDescriptorProto, dotted: str):
    parts = dotted.split(".")
    scope = fdp.message_type
    msg = None
    for p in parts:
        msg = next((m for m in scope if m.name == p), None)
        if msg is None:
            return None
        scope = msg.nested_type
    return msg


def _renumber(fdp: descriptor_pb2.FileDescriptorProto, fork: Fork) -> None:
    """Give ``fork``'s fields their own numbers in ``fdp``; displace what collides."""
    displaced = _DISPLACED_BASE
    for message, field, typ, number, _kind in fork.rows:
        if typ == "enum":
            continue  # enum numbers: the union keeps the first fork's; weights never need them
        msg = _find(fdp, message)
        if msg is None:
            continue
        mine = next((f for f in msg.field if f.name == field), None)
        if mine is None or mine.number == number:
            continue
        for other in msg.field:
            if other.number == number and other is not mine:
                other.number = displaced
                displaced += 1
        mine.number = number


@functools.lru_cache(maxsize=None)
def _fork_classes(name: str) -> Dict[str, type]:
    fork = next(f for f in forks() if f.name == name)
    fdp = descriptor_pb2.FileDescriptorProto()
    caffe_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = f"caffe_compat_fork_{name}.proto"
    _renumber(fdp, fork)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    fd = pool.FindFileByName(fdp.name)
    return {n: message_factory.GetMessageClass(fd.message_types_by_name[n])
            for n in ("LayerParameter", "NetParameter")}


def _convert(msg, cls):
    """``msg`` as a message of ``cls``: same schema by name, other numbers (text round trip).

    Unknown fields are not carried (text format does not print them)."""
    out = cls()
    text_format.Parse(text_format.MessageToString(msg), out)
    return out


def decode_layer(raw: bytes, type_name: str) -> Tuple["caffe_pb2.LayerParameter", List[int]]:
    """A binary ``LayerParameter`` (blobs already removed) -> (union message, skipped fields).

    A fork's layer type is decoded with that fork's numbers; any other type with the union's.
    A top-level field that still does not decode (a number some unlisted fork gives another
    meaning) is skipped by wire type and its number returned, instead of failing the file.
    """
    fallback = None
    for fork in forks_of_type(type_name):  # several forks may share a type name: the first
        cls = _fork_classes(fork.name)["LayerParameter"]  # whose numbering reads it all wins
        msg, skipped = _tolerant_parse(cls, raw)
        clean = not skipped and not _has_unknown(msg)
        try:
            converted = _convert(msg, caffe_pb2.LayerParameter), skipped
        except text_format.ParseError:  # an enum value only the fork's numbering knows
            continue
        if clean:
            return converted
        fallback = fallback or converted
    if fallback is not None:
        return fallback
    return _tolerant_parse(caffe_pb2.LayerParameter, raw)


def _has_unknown(msg) -> bool:
    """Whether ``msg`` or any message inside it holds fields its schema does not know
    (``DiscardUnknownFields`` is recursive and exists in every protobuf this project supports,
    unlike ``google.protobuf.unknown_fields``, which 4.21 lacks)."""
    known = type(msg)()
    known.CopyFrom(msg)
    known.DiscardUnknownFields()
    return known.ByteSize() != msg.ByteSize()


def as_written(param: "caffe_pb2.LayerParameter"):
    """``param`` as the message to serialize: with its fork's numbers for a fork's layer type
    (what that fork's Caffe reads back), else the union message itself.  Where several forks
    share the type, the first whose schema has every param block the layer sets."""
    candidates = forks_of_type(param.type)
    if not candidates:
        return param
    used = _fork_fields_used(param)
    for fork in candidates:
        if used <= {(m, n) for m, n, *_ in fork.rows}:
            return _convert(param, _fork_classes(fork.name)["LayerParameter"])
    return _convert(param, _fork_classes(candidates[0].name)["LayerParameter"])


@functools.lru_cache(maxsize=None)
def _fork_specific() -> frozenset:
    """(message, field) pairs that only forks define."""
    return frozenset((m, n) for f in forks() for m, n, _t, _num, kind in f.rows if kind == "new")


def _fork_fields_used(msg) -> set:
    """The fork-specific (message, field) pairs set anywhere in ``msg``."""
    out = set()
    specific = _fork_specific()
    prefix = msg.DESCRIPTOR.file.package + "."
    for fd, value in msg.ListFields():
        owner = fd.containing_type.full_name[len(prefix):]
        if (owner, fd.name) in specific:
            out.add((owner, fd.name))
        if fd.message_type is not None:
            for v in (value if is_repeated(fd) else [value]):
                out |= _fork_fields_used(v)
    return out


def _tolerant_parse(cls, raw: bytes):
    msg = cls()
    try:
        msg.ParseFromString(raw)
        return msg, []
    except Exception:  # protobuf's DecodeError (and upb's variants): retry field by field
        pass
    msg = cls()
    skipped: List[int] = []
    for num, wt, a, b in wire.fields(raw, 0, len(raw)):
        one = cls()
        try:
            one.ParseFromString(wire.encode_field(num, wt, raw, a, b))
        except Exception:
            skipped.append(num)
            continue
        msg.MergeFrom(one)
    return msg, skipped


def describe_type(type_name: str) -> str:
    """' (from FORK: repo@commit)' for a type a known fork defines, else ''."""
    fork = fork_of_type(type_name)
    return f" (from {fork.name}: {fork.source})" if fork is not None else ""
