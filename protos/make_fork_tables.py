"""Write ``protos/forks/<fork>.tsv`` from a fork's own ``caffe.proto``.

A fork table lists, in the fact-table format of ``shared/reference`` (message, field, label,
type, number, default), every message, field and enum value the fork's schema has that the
BVLC + Fast R-CNN union lacks, and every field the fork numbers differently (the union keeps
its own number for those; the fork's number matters when reading the fork's binaries).
Tables are facts (names, numbers, defaults); nothing of the fork's text is kept.

Usage: ``python protos/make_fork_tables.py FORK path/to/fork/caffe.proto > protos/forks/FORK.tsv``
(the fork's repository and commit go in ``protos/forks/FORKS.tsv`` by hand).  Column ``kind``
says ``new`` (the union lacks it) or ``renumbered`` (the union has the name at another number).
"""
from __future__ import annotations

import csv
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from make_proto import read_rows, DEFAULT_REF, union  # noqa: E402

_SCALAR_NAMES = {1: "double", 2: "float", 3: "int64", 4: "uint64", 5: "int32", 6: "fixed64",
                 7: "fixed32", 8: "bool", 9: "string", 12: "bytes", 13: "uint32", 15: "sfixed32",
                 16: "sfixed64", 17: "sint32", 18: "sint64"}
_LABEL_NAMES = {1: "optional", 2: "required", 3: "repeated"}
COLUMNS = ["message", "field", "label", "type", "number", "default", "kind"]


def fork_rows(fdp) -> list[dict]:
    """Every field and enum value of a parsed ``.proto`` as fact-table rows."""
    pkg = f".{fdp.package}." if fdp.package else "."
    rows: list[dict] = []

    def type_name(f) -> str:
        if f.type_name:
            return f.type_name[len(pkg):] if f.type_name.startswith(pkg) else f.type_name.lstrip(".")
        return _SCALAR_NAMES[f.type]

    def enums(prefix: str, es) -> None:
        for e in es:
            for v in e.value:
                rows.append(dict(message=f"{prefix}{e.name}", field=v.name, label="", type="enum",
                                 number=str(v.number), default=""))

    def walk(prefix: str, msgs) -> None:
        for m in msgs:
            full = f"{prefix}{m.name}"
            enums(f"{full}.", m.enum_type)
            for f in m.field:
                dv = f.default_value
                if dv and f.type == 9:
                    dv = f'"{dv}"'
                rows.append(dict(message=full, field=f.name, label=_LABEL_NAMES[f.label],
                                 type=type_name(f), number=str(f.number), default=dv))
            walk(f"{full}.", m.nested_type)

    enums("", fdp.enum_type)
    walk("", fdp.message_type)
    return rows


def diff_rows(base: "dict[str, list[dict]]", rows: list[dict]) -> list[dict]:
    """Rows of ``rows`` that ``base`` (message -> rows) lacks or numbers differently."""
    have = {(m, r["field"]): r for m, rs in base.items() for r in rs}
    out = []
    for r in rows:
        b = have.get((r["message"], r["field"]))
        if b is None:
            out.append(dict(r, kind="new"))
        elif b["number"] != r["number"] or b["type"] != r["type"]:
            out.append(dict(r, kind="renumbered"))
    return out


def main() -> None:
    from caffe_compat.proto_schema import read_proto

    fork, path = sys.argv[1], sys.argv[2]
    ref = DEFAULT_REF
    base = union(read_rows(os.path.join(ref, "caffe_proto_fields_bvlc_master.tsv")),
                 read_rows(os.path.join(ref, "caffe_proto_fields.tsv")))
    rows = diff_rows(base, fork_rows(read_proto(path)))
    w = csv.DictWriter(sys.stdout, COLUMNS, delimiter="\t", lineterminator="\n",
                       quoting=csv.QUOTE_NONE, quotechar=None, escapechar="\\")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    del fork


if __name__ == "__main__":
    main()
