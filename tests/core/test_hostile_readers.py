"""Hostile files for the readers (issue 12, item 1): memory bounded by what a file is, not by
what it declares.

``CASES`` (collected into docs/bad_inputs.md by tests/make_bad_inputs_doc.py): weights, solver
states and definitions that declare huge indices, shapes, counts, views or nesting in a few
bytes, each refused from its metadata with one clear error.  Limits are lowered in some cases
so that a regression would allocate little.  ``test_big_hostile_files_stay_bounded`` runs the
full-size versions (tens of MB: 60 M spaces, 20 M empty layers...) in a subprocess whose
address space is capped at its own + 2 GiB.
"""
from __future__ import annotations

import json
import os
import pathlib
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile
from typing import List

import h5py
import numpy as np
import pytest
import torch

from caffe_compat import limits
from caffe_compat import weights as W
from caffe_compat.errors import CaffeCompatError, LimitError, ParseError, SchemaError, SolverError, WeightsError
from caffe_compat.io import read_net_text
from caffe_compat.net import Net

from capped import with_cap  # noqa: E402
from conftest import PROPOSAL_NET, ROOT  # noqa: E402
from test_errors import SMALL, Case, blob_shape_data, check_bad_input, field, varint, write  # noqa: E402


# ---------------------------------------------------------------------- builders
def _ld(num: int, payload: bytes) -> bytes:
    return field(num, 2, payload)


def _caffemodel(d: pathlib.Path, layers: bytes, name: str = "hostile.caffemodel") -> pathlib.Path:
    return write(d, name, _ld(1, b"hostile") + layers)


def _layer(name: str, body: bytes = b"") -> bytes:
    return _ld(100, _ld(1, name.encode()) + _ld(2, b"InnerProduct") + body)


def _shape_blob(dims) -> bytes:
    """A BlobProto declaring ``dims`` and holding no data."""
    return _ld(7, _ld(1, b"".join(varint(d) for d in dims)))


def _limited(run, **values):
    def go(d: pathlib.Path):
        with limits.raised(**values):
            return run(d)
    return go


def _read(path_fn):
    return lambda d: W.read_caffemodel(str(path_fn(d)))


# --- binary caffemodels
def _many_layers(d):
    return _caffemodel(d, _ld(100, b"") * 11)


def _long_list(d):
    return _caffemodel(d, _layer("ip", _ld(3, b"x") * 9))


def _many_blobs(d):
    return _caffemodel(d, _layer("a", _ld(7, b"") * 3) + _layer("b", _ld(7, b"") * 3))


def _blob_axes(d):
    return _caffemodel(d, _layer("ip", _ld(7, _shape_blob([1] * 40))))


def _blob_total(d):
    full = blob_shape_data((600,), [0.5] * 600)
    return _caffemodel(d, _layer("ip", _ld(7, full) + _ld(7, _shape_blob([600]))))


# --- HDF5 weights and solver states
def _h5_weights(d: pathlib.Path, fill) -> pathlib.Path:
    path = d / "hostile.caffemodel.h5"
    with h5py.File(path, "w") as f:
        fill(f.create_group("data").create_group("ip"))
    return path


def _h5_index(d):
    return Net(SMALL).load_weights(str(_h5_weights(d, lambda g: g.create_dataset(
        "1000000000000", data=np.zeros((3, 18), "f4")))))


def _h5_huge(d):
    return Net(SMALL).load_weights(str(_h5_weights(d, lambda g: g.create_dataset(
        "0", shape=(10 ** 6, 10 ** 6), dtype="f4", chunks=(1, 1024)))))


def _h5_total(d):
    def fill(g):
        for i in range(2):
            g.create_dataset(str(i), shape=(600,), dtype="f4", chunks=(64,), compression="gzip")
    return Net(SMALL).load_weights(str(_h5_weights(d, fill)))


def _h5_state(d: pathlib.Path, fill) -> pathlib.Path:
    path = d / "hostile.solverstate.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("current_step", data=np.array([0], "i4"))
        fill(f)
    return path


def _h5_state_iter(d):
    from caffe_compat.solver import state_hdf5

    def fill(f):
        f.create_dataset("iter", shape=(10 ** 9,), dtype="i4", chunks=(1024,))
        f.create_group("history")
    return state_hdf5.read_state(str(_h5_state(d, fill)))


def _h5_state_history(d):
    from caffe_compat.solver import state_hdf5

    def fill(f):
        f.create_dataset("iter", data=np.array([0], "i4"))
        h = f.create_group("history")
        for i in range(3):
            h.create_dataset(str(i), shape=(400,), dtype="f4", chunks=(64,), compression="gzip")
    return state_hdf5.read_state(str(_h5_state(d, fill)))


# --- .pt and .safetensors
def _pt_expanded(d):
    torch.save({"ip.weight": torch.zeros(1).expand(10 ** 10)}, str(d / "expanded.pt"))
    return W.read_state_file(str(d / "expanded.pt"))


def _pt_view(d):
    torch.save({"ip.weight": torch.zeros(1).expand(3, 18)}, str(d / "view.pt"))
    return Net(SMALL).load_weights(str(d / "view.pt"))


def _pt_deflated(d):
    torch.save({"ip.weight": torch.zeros(3, 18)}, str(d / "plain.pt"))
    with zipfile.ZipFile(d / "plain.pt") as zi, \
            zipfile.ZipFile(d / "deflated.pt", "w", compression=zipfile.ZIP_DEFLATED) as zo:
        for info in zi.infolist():
            zo.writestr(info.filename, zi.read(info.filename))
    return W.read_state_file(str(d / "deflated.pt"))


def _pt_sparse(d):
    with warnings.catch_warnings():  # torch's notes on sparse invariant checks
        warnings.simplefilter("ignore", UserWarning)
        torch.save({"ip.weight": torch.sparse_coo_tensor(torch.zeros(2, 0, dtype=torch.long), torch.zeros(0),
                                                         (10 ** 6, 10 ** 3))}, str(d / "sparse.pt"))
        return W.read_state_file(str(d / "sparse.pt"))


def _pt_total(d):
    torch.save({"a.weight": torch.zeros(600), "b.weight": torch.zeros(600)}, str(d / "two.pt"))
    return W.read_state_file(str(d / "two.pt"))


def _safetensors(d: pathlib.Path, header: dict, data: bytes = b"", n: int = -1) -> str:
    raw = json.dumps(header).encode()
    path = d / "hostile.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if n < 0 else n) + raw + data)
    return str(path)


def _st_shape(d):
    return W.read_state_file(_safetensors(d, {"ip.weight": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6],
                                                            "data_offsets": [0, 4]}}, b"\0" * 4))


def _st_offsets(d):
    return W.read_state_file(_safetensors(d, {"ip.weight": {"dtype": "F32", "shape": [2],
                                                            "data_offsets": [0, 10 ** 12]}}, b"\0" * 8))


def _st_header(d):
    return W.read_state_file(_safetensors(d, {}, n=10 ** 15))


# --- Caffe's binaryproto solver state
def _binaryproto_state(d):
    from caffe_compat.solver import state_binaryproto

    data = field(1, 0, varint(1)) + _ld(3, b"") * 5
    return state_binaryproto.read_state(str(write(d, "hostile.solverstate", data)), data)


# --- text
def _text_layers(d):
    return read_net_text(str(write(d, "net.prototxt", 'name: "n"\n' + "layer { }\n" * 4)))


def _text_list(d):
    return read_net_text(str(write(d, "net.prototxt", 'input: "a"\n' * 9)))


def _text_long_token(d):
    return read_net_text(str(write(d, "net.prototxt", "input_dim: " + "1" * 100_000 + "\n")))


def _text_unknowns(d):
    return read_net_text(str(write(d, "net.prototxt", "".join(f"bogus{i}: 1\n" for i in range(2000)))))


# --- param_str YAML
LAUGHS = ("'feat_stride': 16\\n'a': &a [x, x, x, x, x, x, x, x, x]\\n'b': &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\\n"
          "'c': [*b, *b, *b, *b, *b, *b, *b, *b, *b]")


def _param_str(text: str):
    return lambda d: Net(PROPOSAL_NET.replace("PARAM", text), phase="test")


def _cfg_aliases(d):
    from caffe_compat.frcnn.config import AttrDict, cfg, cfg_from_file

    path = write(d, "hostile.yml", "EXP_DIR: &e x\nTRAIN: {SCALES: *e}\n")
    return cfg_from_file(str(path), into=AttrDict(cfg))


def _long_layer_name(d):
    name = "x" * 100_000
    return Net('input: "d" input_shape { dim: 1 }\n'
               f'layer {{ name: "{name}" type: "Convolutin" bottom: "d" top: "c" }}')


CASES: List[Case] = [
    # --- binary caffemodels: counted and charged on the wire, before protobuf builds anything
    Case("caffemodel-many-layers", "caffemodel of many empty layers (limit lowered to 10 here)",
         _limited(_read(_many_layers), max_layers=10), LimitError,
         r"the file has more than 10 layers \(raise it with CAFFE_COMPAT_MAX_LAYERS=N",
         where=r"hostile\.caffemodel$"),
    Case("caffemodel-long-list", "caffemodel layer repeating a field (bottom) too often (limit 8 here)",
         _limited(_read(_long_list), max_list_length=8), LimitError,
         r"field 3 \(LayerParameter\.bottom\) is repeated more than 8 times \(raise it with "
         r"CAFFE_COMPAT_MAX_LIST_LENGTH=N", layer="ip"),
    Case("caffemodel-many-blobs", "caffemodel of many (empty) blobs in all (limit lowered to 4 here)",
         _limited(_read(_many_blobs), max_blobs=4), LimitError,
         r"the file has more than 4 blobs \(raise it with CAFFE_COMPAT_MAX_BLOBS=N", layer="b", blob=1),
    Case("caffemodel-blob-axes", "caffemodel blob with 40 axes (Caffe's kMaxBlobAxes is 32)",
         _read(_blob_axes), WeightsError, r"blob has 33 axes; Caffe allows at most 32 \(kMaxBlobAxes\)",
         layer="ip", blob=0),
    Case("caffemodel-total", "caffemodel whose blobs each fit but together exceed the total "
                             "(limit lowered to 1000 elements here)",
         _limited(_read(_blob_total), max_total_elements=1000), LimitError,
         r"blob shape \(600,\) brings the file's blobs to 1200 elements together, over the limit of 1000 "
         r"\(raise it with CAFFE_COMPAT_MAX_TOTAL_ELEMENTS=N", layer="ip", blob=1),
    # --- HDF5: from the metadata, before any dataset is read
    Case("h5-blob-index", ".caffemodel.h5 whose dataset is named as blob index 10^12",
         _h5_index, LimitError, r"dataset name '1000000000000' is a blob index over the limit of 65536 "
                                r"blobs per layer", where=r"hostile\.caffemodel\.h5$", layer="ip"),
    Case("h5-huge-dataset", ".caffemodel.h5 declaring a 10^12-element dataset (3 KB on disk: chunks "
                            "never written)",
         _h5_huge, LimitError, r"dataset '0' shape \(1000000, 1000000\) has 1000000000000 elements, over "
                               r"the limit of 2147483648", layer="ip", blob=0),
    Case("h5-total", ".caffemodel.h5 of compressed datasets together over the total (limit 1000 here)",
         _limited(_h5_total, max_total_elements=1000), LimitError,
         r"dataset '1' shape \(600,\) brings the file's blobs to 1200 elements together", layer="ip", blob=1),
    Case("h5-state-iter", ".solverstate.h5 whose 'iter' declares 10^9 values",
         _h5_state_iter, SolverError, r"'iter' must hold one integer, it declares shape \(1000000000,\)",
         where=r"hostile\.solverstate\.h5$"),
    Case("h5-state-history", ".solverstate.h5 history over twice the total (limit 500 here: Adam keeps "
                             "two history blobs per parameter)",
         _limited(_h5_state_history, max_total_elements=500), LimitError,
         r"dataset 'history/2' shape \(400,\) brings the file's blobs to 1200 elements together, over the "
         r"limit of 1000 \(2 x max_total_elements for this file", blob=2),
    # --- .pt and .safetensors
    Case("pt-expanded-huge", ".pt holding torch.zeros(1).expand(10**10) (1.5 KB on disk)",
         _pt_expanded, LimitError, r"tensor 'ip\.weight' shape \(10000000000,\) has 10000000000 elements, "
                                   r"over the limit", where=r"expanded\.pt$"),
    Case("pt-expanded-view", ".pt holding a stride-0 view larger than its storage",
         _pt_view, WeightsError, r"tensor 'ip\.weight' has 54 elements but its storage holds 1 \(an expanded "
                                 r"or overlapping view, strides \(0, 0\)\)"),
    Case("pt-compressed", ".pt whose zip entries are compressed (could inflate to any size)",
         _pt_deflated, WeightsError, r"zip entry '[^']+' is compressed \(method 8\); torch\.save stores "
                                     r"entries uncompressed"),
    Case("pt-sparse", ".pt holding a sparse tensor of 10^9 declared elements",
         _pt_sparse, WeightsError, r"tensor 'ip\.weight' is a torch\.sparse_coo tensor; a weights file "
                                   r"holds dense tensors"),
    Case("pt-total", ".pt whose tensors together exceed the total (limit 1000 here)",
         _limited(_pt_total, max_total_elements=1000), LimitError,
         r"tensor 'b\.weight' shape \(600,\) brings the file's blobs to 1200 elements together"),
    Case("safetensors-shape", "safetensors header declaring a 10^12-element tensor",
         _st_shape, LimitError, r"tensor 'ip\.weight' shape \(1000000, 1000000\) has 1000000000000 elements"),
    Case("safetensors-offsets", "safetensors header with data offsets past the end of the file",
         _st_offsets, WeightsError, r"entry 'ip\.weight' has data offsets \[0, 1000000000000\] outside the "
                                    r"file's 8 data bytes"),
    Case("safetensors-header", "safetensors header length of 10^15 bytes",
         _st_header, ParseError, r"its header length 1000000000000000 exceeds the file"),
    Case("binaryproto-state-blobs", "Caffe .solverstate of many empty history blobs (limit lowered to 4 here)",
         _limited(_binaryproto_state, max_blobs=4), LimitError,
         r"the solver state has more than 4 history blobs \(raise it with CAFFE_COMPAT_MAX_BLOBS=N"),
    # --- text: counted while parsing, located, messages bounded
    Case("prototxt-many-layers", "prototxt of many (empty) layers (limit lowered to 3 here)",
         _limited(_text_layers, max_layers=3), LimitError,
         r"the net has more than 3 layers \(raise it with CAFFE_COMPAT_MAX_LAYERS=N",
         where=r"net\.prototxt:5:7$"),
    Case("prototxt-long-list", "prototxt repeating a field too often (limit lowered to 8 here)",
         _limited(_text_list, max_list_length=8), LimitError,
         r"field 'input' of NetParameter is repeated more than 8 times", where=r"net\.prototxt:9:8$"),
    Case("prototxt-long-token", "prototxt with a 100,000-digit number (the message quotes it cut short)",
         _text_long_token, ParseError, r"Couldn't parse integer: 1{100,}\.\.\. \(\d+ characters\) for field "
                                       r"'input_dim'", where=r"net\.prototxt:1:12$"),
    Case("prototxt-many-unknowns", "prototxt of 2,000 unknown fields (the message lists 10)",
         _text_unknowns, ParseError, r"^\S+: 2000 unknown field\(s\): NetParameter\.bogus0 at line 1; .*"
                                     r"NetParameter\.bogus9 at line 10; \.\.\. \(1990 more\)\."),
    Case("long-layer-name", "a layer name of 100,000 characters in an error (cut short)",
         _long_layer_name, CaffeCompatError, r"'x{150,}\.\.\. \(100000 characters\)'"),
    # --- param_str / cfg YAML: one safe loader
    Case("param-str-aliases", "param_str YAML with anchors and aliases (\"billion laughs\")",
         _param_str(LAUGHS), SchemaError, r"YAML in param_str: anchor '&a' \(anchors and aliases are not allowed",
         layer="proposal"),
    Case("param-str-nesting", "param_str YAML nested 5,000 levels deep",
         _param_str("'feat_stride': " + "[" * 5000 + "]" * 5000), SchemaError,
         r"YAML in param_str: nested more than 64 levels deep", layer="proposal"),
    Case("param-str-size", "param_str YAML over the size limit (lowered to 64 bytes here)",
         _limited(_param_str("'feat_stride': 16 " + " " * 100), max_yaml_bytes=64), LimitError,
         r"YAML in param_str is 118 bytes, over the limit of 64 \(raise it with CAFFE_COMPAT_MAX_YAML_BYTES=N",
         layer="proposal"),
    Case("cfg-aliases", "py-faster-rcnn cfg file with YAML aliases",
         _cfg_aliases, SchemaError, r"YAML: anchor '&e' \(anchors and aliases are not allowed",
         where=r"hostile\.yml$"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    check_bad_input(case, tmp_path)


# ---------------------------------------------------------------------- what still reads
def test_real_files_still_read(tmp_path):
    """Within the limits nothing changes: views, transposes, shared storages, safetensors and
    HDF5 written by the project, a text file with long comments and blank lines."""
    x = torch.arange(10.0)
    torch.save({"a": x[:5], "b": x[5:], "t": torch.zeros(4, 3).t()}, str(tmp_path / "views.pt"))
    sd = W.read_state_file(str(tmp_path / "views.pt"))
    assert sd["b"].tolist() == [5.0, 6.0, 7.0, 8.0, 9.0] and sd["t"].shape == (3, 4)
    net = Net(SMALL, seed=3)
    for name in ("w.safetensors", "w.caffemodel.h5", "w.caffemodel", "w.pt"):
        net.save_weights(str(tmp_path / name))
        other = Net(SMALL)
        other.load_weights(str(tmp_path / name))
        assert torch.equal(other.layer("ip").weight, net.layer("ip").weight), name
    text = "# " + "c" * 10_000 + "\n\n\n" + SMALL.replace("\n", "\n   \t\n# note\n")
    n = read_net_text(text + "\n" * 1000)
    assert [lp.name for lp in n.layer][-1] == "prob"


def test_text_errors_keep_their_position(tmp_path):
    """Blank and comment lines are skipped in C but still counted: file:line:col is exact."""
    text = "\n" * 5000 + "# c\n" * 10 + 'name: "x"\n' + " " * 100_000 + 'layer { name: "a" tpye: "ReLU" }\n'
    with pytest.raises(ParseError) as ei:
        read_net_text(str(write(tmp_path, "n.prototxt", text)))
    assert ei.value.where.endswith(f"n.prototxt:5012:{100_000 + 19}"), ei.value.where
    assert "did you mean type" in str(ei.value) and len(str(ei.value)) < 500


def test_string_escapes_are_the_same_language():
    """The constant-memory string pattern reads what protobuf's own reads."""
    from google.protobuf import text_format

    from caffe_compat.protos import caffe_pb2
    from caffe_compat.text_parse import parse
    for s in (r'"a\"b"', r"'a\'b'", r'"\\"', r'"\x41\101\n\t"', '"a" \'b\' "c"', '"caf\u00e9"'):
        want = text_format.Parse(f"name: {s}", caffe_pb2.NetParameter())
        assert parse(f"name: {s}", caffe_pb2.NetParameter()) == want, s
    for bad in ('"abc', r'"abc\"', "'a\"", '"a\\'):
        with pytest.raises(text_format.ParseError):
            text_format.Parse(f"name: {bad}", caffe_pb2.NetParameter())
        with pytest.raises(text_format.ParseError):
            parse(f"name: {bad}", caffe_pb2.NetParameter())


# ---------------------------------------------------------------------- full size, capped
EXTRA_BYTES = 2 << 30  # what each input may add to the interpreter's own address space
DRIVER = with_cap(textwrap.dedent(r"""
    import json, resource, signal, sys, time, traceback
    import torch
    torch.set_num_threads(1)
    from caffe_compat.errors import CaffeCompatError
    from caffe_compat.io import read_net_text
    from caffe_compat.solver import state_binaryproto
    from caffe_compat.weights import caffemodel
    import caffe_compat.unknowns, caffe_compat.text_parse
    # CAP ADDRESS SPACE
    def run(kind, path):
        if kind == "caffemodel":
            return caffemodel.read_caffemodel(path)
        if kind == "prototxt":
            return read_net_text(path)
        data = open(path, "rb").read()
        return state_binaryproto.read_state(path, data)
    for name, kind, path in json.loads(sys.argv[1]):
        print("START", name, flush=True)
        t0 = time.perf_counter()
        signal.alarm(120)
        try:
            run(kind, path)
            result = "ok"
        except CaffeCompatError as e:
            result = f"{type(e).__name__}: {e.one_line()[:300]} ({len(e.one_line())} chars)"
        except BaseException as e:
            result = f"ESCAPED {type(e).__name__}: {str(e)[:300]}"
        signal.alarm(0)
        print("END", json.dumps({"name": name, "result": result,
                                 "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    """))


def _big_inputs(d: pathlib.Path):
    """Tens-of-MB files that cost gigabytes (or crashed) before the readers were bounded."""
    mb = 1 << 20
    files = {
        # 60 M spaces on one line: 9.6 GB peak before
        ("spaces-60mb", "prototxt"): 'name: "x"\n' + " " * (60 * mb) + '\ninput: "data"\n',
        # a string of 8 M escapes: one regex frame per escape before
        ("escapes-16mb", "prototxt"): 'name: "' + "\\na" * (5 * mb) + '"\n',
        # an unknown field, then a 20 MB string: the scan for every unknown field kept one
        # regex frame per character of it (3.3 GB) before
        ("unknown-then-string-20mb", "prototxt"): 'bogus: 1\nname: "' + "a" * (20 * mb) + '"\n',
        # 20 M empty layers (60 MB): a segfault inside protobuf at 4.9 GB before
        ("empty-layers-60mb", "caffemodel"): _ld(1, b"m") + _ld(100, b"") * (20 * mb),
        # one layer of 8 M empty bottoms
        ("bottoms-16mb", "caffemodel"): _ld(1, b"m") + _ld(100, _ld(1, b"L") + _ld(3, b"") * (8 * mb)),
        # a Caffe solver state of 5 M empty history blobs: 3.5 GB and two minutes before
        ("empty-history-10mb", "solverstate"): _ld(3, b"") * (5 * mb),
    }
    runs = []
    for (name, kind), content in files.items():
        path = d / f"{name}.{kind}"
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        runs.append((name, kind, str(path)))
    return runs


@pytest.mark.slow
def test_big_hostile_files_stay_bounded(tmp_path):
    runs = _big_inputs(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT), MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1")
    for k in [k for k in env if k.startswith("CAFFE_COMPAT_MAX")]:
        del env[k]  # the defaults are what is promised
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(runs), str(EXTRA_BYTES)],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600)
    started = [line.split(" ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("START ")]
    ended = {r["name"]: r for r in (json.loads(line[4:]) for line in proc.stdout.splitlines()
                                    if line.startswith("END "))}
    assert proc.returncode == 0 and len(ended) == len(runs), (
        f"the driver died (exit {proc.returncode}) during {started[-1] if started else 'start-up'!r}: "
        f"{proc.stderr[-2000:]}")
    results = {name: r["result"] for name, r in ended.items()}
    print({name: r["seconds"] for name, r in ended.items()})
    assert results["spaces-60mb"] == "ok" and results["escapes-16mb"] == "ok", results
    assert results["unknown-then-string-20mb"].startswith("ParseError:"), results
    assert f"more than {limits.get('max_layers')} layers" in results["empty-layers-60mb"], results
    assert "LayerParameter.bottom) is repeated more than 65536" in results["bottoms-16mb"], results
    assert "more than 100000 history blobs" in results["empty-history-10mb"], results
    for r in results.values():  # refusals are one bounded line
        assert r == "ok" or int(r.rsplit("(", 1)[-1].split()[0]) < 2000, r
