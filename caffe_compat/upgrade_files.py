"""Caffe's ``upgrade_net_proto_text`` / ``upgrade_net_proto_binary`` / ``upgrade_solver_proto_text``.

Each reads a file, runs it through :mod:`caffe_compat.upgrade` (Caffe's ``UpgradeNetAsNeeded``
/ ``UpgradeSolverAsNeeded``) when a step applies, and writes the result atomically: text in
C++'s layout (:mod:`caffe_compat.proto_text`, byte-identical to Caffe's output), binary as a
serialized NetParameter.  What was done is returned as an :class:`UpgradeOutcome` whose
``lines`` say it in words.

A binary caffemodel can be hundreds of megabytes of packed floats, which protobuf's Python
runtime would turn into lists.  The binary path never parses blob payloads: the file is
memory-mapped, each blob is replaced by a tiny numbered placeholder, the blob-free
"skeleton" goes through the upgrade, and the output is written from the upgraded skeleton
with every placeholder swapped back for the original blob bytes, straight from the map.  A
file that needs no upgrade is copied as is.
"""
from __future__ import annotations

import mmap
import os
import stat
from dataclasses import dataclass, field
from typing import BinaryIO, List, Optional, Tuple, Union

from caffe_compat import limits, wire
from caffe_compat.errors import ParseError
from caffe_compat.protos import caffe_pb2
from caffe_compat.upgrade import UpgradeReport, solver_needs_upgrade, upgrade_net_with_report, upgrade_solver

__all__ = ["UpgradeOutcome", "upgrade_net_text_file", "upgrade_net_binary_file",
           "upgrade_solver_text_file", "describe_net_upgrade"]

#: bytes copied (and their file pages released) per write when streaming blob payloads
_CHUNK = 1 << 26


@dataclass
class UpgradeOutcome:
    """What an upgrade command did.

    ``applied``: the upgrade steps run (``caffe_compat.upgrade.STEPS`` names; ``["solver_type"]``
    for a solver), empty when the input was already current.  ``lines``: those steps in words.
    ``problems``: what Caffe logs as an error but upgrades past (its tool then exits 1).
    ``notes``: information Caffe drops silently.  ``copied``: the output is a byte copy of
    the input (a binary net already current).
    """

    applied: List[str] = field(default_factory=list)
    lines: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    copied: bool = False

    @property
    def up_to_date(self) -> bool:
        return not self.applied

    @property
    def success(self) -> bool:
        """Caffe's return value of UpgradeNetAsNeeded (False: exit status 1)."""
        return not self.problems


# ----------------------------------------------------------------------------- words

def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def describe_net_upgrade(before: caffe_pb2.NetParameter, report: UpgradeReport) -> List[str]:
    """One line per applied step, with counts taken from the net before the upgrade."""
    v0 = sum(1 for l in before.layers if l.HasField("layer"))
    padding = sum(1 for l in before.layers if l.HasField("layer") and l.layer.type == "padding")
    old_bn = sum(1 for l in before.layer if l.type == "BatchNorm" and len(l.param) == 3)
    words = {
        "v0_to_v1": (f"V0 -> V1: {_plural(v0, 'V0 layer')} (layers {{ layer {{ ... }} }}) "
                     f"rewritten as V1 layers"
                     + (f", {_plural(padding, 'padding layer')} folded into the following "
                        f"conv/pool" if padding else "")),
        "data_transform": ("data layers: scale/mean_file/crop_size/mirror moved from "
                           "data_param/image_data_param/window_data_param into transform_param"),
        "v1_to_v2": (f"V1 -> V2: {_plural(len(before.layers) - padding, 'layer')} "
                     f"'layers {{ type: ENUM }}' -> 'layer {{ type: \"Name\" }}' "
                     f"(blobs_lr/weight_decay/param -> param {{ lr_mult decay_mult name }})"),
        "input": (f"net inputs {', '.join(before.input)}: input fields (input + "
                  f"{'input_shape' if len(before.input_shape) else 'input_dim'}) -> Input "
                  f"layer 'input'" if len(before.input_shape) or len(before.input_dim) else
                  f"net inputs {', '.join(before.input)}: bare 'input' fields without "
                  f"shapes dropped (as Caffe does for old caffemodels)"),
        "batch_norm": f"BatchNorm: the 3 obsolete param {{}} specs of {_plural(old_bn, 'layer')} removed",
    }
    return [words.get(step, step) for step in report.applied]


def _outcome(before: caffe_pb2.NetParameter, report: UpgradeReport) -> UpgradeOutcome:
    return UpgradeOutcome(list(report.applied), describe_net_upgrade(before, report),
                          list(report.problems), list(report.notes))


# ----------------------------------------------------------------------------- text

def _write_text(msg, path: str) -> None:
    from caffe_compat.atomic import atomic_write
    from caffe_compat.proto_text import to_text

    atomic_write(os.fspath(path), to_text(msg).encode("utf-8"))


def upgrade_net_text_file(src: str, dst: str) -> UpgradeOutcome:
    """``upgrade_net_proto_text SRC DST``: a prototxt in the current format (always written)."""
    from caffe_compat.io import read_net_text

    net = read_net_text(src, upgrade=False)
    new, report = upgrade_net_with_report(net, source=os.fspath(src))
    out = _outcome(net, report)
    _write_text(new if out.applied else net, dst)
    return out


def upgrade_solver_text_file(src: str, dst: str) -> UpgradeOutcome:
    """``upgrade_solver_proto_text SRC DST``: ``solver_type`` (enum) -> ``type`` (string)."""
    from caffe_compat.io import read_solver_text

    solver = read_solver_text(src, upgrade=False)
    out = UpgradeOutcome()
    if solver_needs_upgrade(solver):
        old = caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)
        solver = upgrade_solver(solver, source=os.fspath(src))
        out.applied.append("solver_type")
        out.lines.append(f"solver_type: {old} (enum) -> type: \"{solver.type}\"")
    _write_text(solver, dst)
    return out


# ----------------------------------------------------------------------------- binary

def _strip_blobs(buf, a: int, b: int, blob_field: int, v0_field: Optional[int],
                 ranges: List[Tuple[int, int]], budget: "limits.FileBudget", message) -> bytes:
    """A layer message with each blob replaced by a placeholder BlobProto numbered into ``ranges``.

    ``v0_field``: the V1 layer's nested V0 ``layer`` (whose blobs are field 50), stripped too.
    Blobs and list lengths are counted against the limits before protobuf parses the result.
    """
    from caffe_compat.weights.caffemodel import _ListLengths

    out = bytearray()
    lengths = _ListLengths(message, budget.where or "")
    for num, wt, x, y in wire.fields(buf, a, b):
        lengths.add(num)
        if num == blob_field:
            budget.count_blob()
            wire.expect_wire(num, wt, (wire.LEN,), "blobs")
            for _ in wire.fields(buf, x, y):  # framing check only; payloads stay unread
                pass
            ranges.append((x, y))
            out += wire.len_field(num, caffe_pb2.BlobProto(num=len(ranges)).SerializeToString())
        elif v0_field is not None and num == v0_field:
            wire.expect_wire(num, wt, (wire.LEN,), "V1LayerParameter.layer")
            out += wire.len_field(num, _strip_blobs(buf, x, y, 50, None, ranges, budget,
                                                    caffe_pb2.V0LayerParameter))
        else:
            out += wire.encode_field(num, wt, buf, x, y)
    return bytes(out)


def _skeleton(buf, size: int, where: str) -> Tuple[caffe_pb2.NetParameter, List[Tuple[int, int]]]:
    """The NetParameter without blob payloads, and the byte range of every blob (by number)."""
    from caffe_compat.io import _text_hint, parse_binary

    ranges: List[Tuple[int, int]] = []
    out = bytearray()
    budget = limits.FileBudget(where)  # layers and blobs, counted before protobuf builds them
    try:
        for num, wt, a, b in wire.fields(buf, 0, size):
            if num in (2, 100):  # layers (V0/V1), layer (current)
                wire.expect_wire(num, wt, (wire.LEN,),
                                 "NetParameter.layers" if num == 2 else "NetParameter.layer")
                budget.layer()
                body = _strip_blobs(buf, a, b, 6 if num == 2 else 7, 1 if num == 2 else None, ranges,
                                    budget, caffe_pb2.V1LayerParameter if num == 2 else caffe_pb2.LayerParameter)
                out += wire.len_field(num, body)
            else:
                out += wire.encode_field(num, wt, buf, a, b)
    except (ValueError, IndexError, OverflowError) as e:
        raise ParseError(f"corrupt or truncated NetParameter: {e}{_text_hint(buf)}", where=where) from None
    return parse_binary(bytes(out), caffe_pb2.NetParameter(), where), ranges


Part = Union[bytes, Tuple[int, int]]


def _with_blobs(msg_bytes: bytes, blob_field: int, ranges: List[Tuple[int, int]]) -> List[Part]:
    """A serialized layer with its placeholder blobs swapped back for the original ranges."""
    parts: List[Part] = []
    for num, wt, a, b in wire.fields(msg_bytes, 0, len(msg_bytes)):
        if num == blob_field and wt == wire.LEN:
            ph = caffe_pb2.BlobProto.FromString(msg_bytes[a:b])
            x, y = ranges[ph.num - 1]
            parts.append(wire.encode_key(num, wire.LEN) + wire.encode_varint(y - x))
            parts.append((x, y))
        else:
            parts.append(wire.encode_field(num, wt, msg_bytes, a, b))
    return parts


def _part_len(p: Part) -> int:
    return p[1] - p[0] if isinstance(p, tuple) else len(p)


def _release(m, a: int, b: int) -> None:
    """Drop the copied pages of the map (advice only) so a big file does not stay resident."""
    page = mmap.PAGESIZE
    lo, hi = -(-a // page) * page, b // page * page
    if hi > lo and hasattr(m, "madvise"):
        try:
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, ValueError):
            pass


def _write_parts(f: BinaryIO, buf, parts: List[Part]) -> None:
    with memoryview(buf) as view:  # released before the map is closed
        for p in parts:
            if isinstance(p, tuple):
                for s in range(p[0], p[1], _CHUNK):
                    e = min(p[1], s + _CHUNK)
                    with view[s:e] as piece:
                        f.write(piece)
                    if isinstance(buf, mmap.mmap):
                        _release(buf, s, e)
            else:
                f.write(p)


def _write_upgraded(new: caffe_pb2.NetParameter, buf, ranges: List[Tuple[int, int]], dst: str) -> None:
    """Serialize ``new`` (placeholder blobs) to ``dst`` with the real blob bytes streamed in."""
    from caffe_compat.atomic import atomic_open

    data = new.SerializeToString()
    with atomic_open(os.fspath(dst)) as f:
        for num, wt, a, b in wire.fields(data, 0, len(data)):
            if num == 100 and wt == wire.LEN:
                parts = _with_blobs(data[a:b], 7, ranges)
                f.write(wire.encode_key(100, wire.LEN))
                f.write(wire.encode_varint(sum(_part_len(p) for p in parts)))
                _write_parts(f, buf, parts)
            else:
                f.write(wire.encode_field(num, wt, data, a, b))


def _copy_file(src, dst: str) -> None:
    """A byte copy of the open file ``src`` to ``dst``, atomically (kernel copy when it can)."""
    import shutil

    from caffe_compat.atomic import atomic_open

    with atomic_open(os.fspath(dst)) as f:
        src.seek(0)
        size = os.fstat(src.fileno()).st_size
        try:
            sent = 0
            while sent < size:
                n = os.sendfile(f.fileno(), src.fileno(), sent, size - sent)
                if n == 0:
                    break
                sent += n
            if sent != size:
                raise OSError("short sendfile")
        except (OSError, AttributeError):
            f.seek(0)
            f.truncate()
            src.seek(0)
            shutil.copyfileobj(src, f, _CHUNK)


def upgrade_net_binary_file(src: str, dst: str) -> UpgradeOutcome:
    """``upgrade_net_proto_binary SRC DST``: a caffemodel (binary NetParameter) upgraded.

    Blob payloads are never parsed nor held in memory: see the module docstring.  A file
    already in the current format is copied byte for byte.
    """
    from caffe_compat.io import _stat_file

    src, st = _stat_file(src, "binary NetParameter (.caffemodel)")
    try:
        f = open(src, "rb")
    except OSError as e:
        raise ParseError(f"cannot read binary NetParameter: {e.strerror or e}", where=src) from None
    with f:
        size = os.fstat(f.fileno()).st_size if stat.S_ISREG(st.st_mode) else 0
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else f.read()
        size = size or len(buf)
        if not size:
            raise ParseError("empty file, expected a binary NetParameter (.caffemodel)", where=src)
        try:
            before, ranges = _skeleton(buf, size, src)
            new, report = upgrade_net_with_report(before, source=src)
            out = _outcome(before, report)
            if not out.applied and isinstance(buf, mmap.mmap):
                _copy_file(f, dst)
                out.copied = True
            else:
                _write_upgraded(new if out.applied else before, buf, ranges, dst)
        finally:
            if isinstance(buf, mmap.mmap):
                buf.close()
    return out
