"""Caffe's command-line tools as ``caffe-compat`` subcommands.

upgrade-net-text / upgrade-net-binary / upgrade-solver-text are checked byte for byte
against what real Caffe wrote for the fixtures of tests/core/test_upgrade.py (tests/data/upgrade/
golden, made by its oracle driver with WriteProtoToTextFile / WriteProtoToBinaryFile).
convert-imageset and compute-image-mean are checked on tiny synthetic images: the LMDB read
back with lmdb + caffe_pb2.Datum, the mean against numpy, and both through the project's own
Data layer.
"""
from __future__ import annotations

import json
import os
import pathlib
import tracemalloc

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from google.protobuf import text_format

from caffe_compat import imageset
from caffe_compat import io as cio
from caffe_compat import upgrade as up
from caffe_compat.cli.main import main
from caffe_compat.proto_text import format_double, format_float, to_text
from caffe_compat.protos import caffe_pb2
from caffe_compat.upgrade_files import upgrade_net_binary_file
from conftest import ROOT

UP = ROOT / "tests" / "data" / "upgrade"
EXPECTED = json.loads((UP / "expected.json").read_text())


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(db) -> list:
    """(key, Datum) of an LMDB in key order, read directly."""
    import lmdb

    env = lmdb.open(str(db), readonly=True, lock=False)
    try:
        with env.begin() as txn:
            out = []
            for k, v in txn.cursor():
                d = caffe_pb2.Datum()
                d.ParseFromString(bytes(v))
                out.append((bytes(k), d, bytes(v)))
            return out
    finally:
        env.close()


# ============================================================================ text format

def test_float_format_is_cpp_protobufs():
    assert [format_float(v) for v in (1.0, 0.0, 0.0001, 0.1, 2.5e-05, 1e10, float("inf"))] == \
        ["1", "0", "0.0001", "0.1", "2.5e-05", "1e+10", "inf"]
    assert format_float(float(np.float32(1.2345678))) == "1.23456776"  # 6 digits do not round-trip
    assert format_double(0.1) == "0.1" and format_double(1 / 3) == "0.33333333333333331"


# ============================================================================ upgrade-net-text

@pytest.mark.parametrize("name", sorted(EXPECTED["nets"]))
def test_upgrade_net_text_is_caffes_output(name, tmp_path):
    out = tmp_path / "out.prototxt"
    r = run("upgrade-net-text", UP / "nets" / f"{name}.prototxt", out)
    exp = EXPECTED["nets"][name]
    assert r.exit_code == (0 if exp["success"] else 1), r.output
    assert out.read_text() == (UP / "golden" / "nets" / f"{name}.prototxt").read_text()
    if exp["applied"]:
        assert r.stdout.startswith(f"upgraded {UP / 'nets' / name}.prototxt:")
        assert len(r.stdout.splitlines()) == len(exp["applied"]) + 2
    else:
        assert "already up to date" in r.stdout


def test_upgrade_net_text_says_what_it_did(tmp_path):
    out = tmp_path / "o.prototxt"
    r = run("upgrade-net-text", UP / "nets" / "v0_net.prototxt", out)
    assert r.exit_code == 0
    assert "V0 -> V1:" in r.stdout and "padding layer" in r.stdout and "V1 -> V2:" in r.stdout
    assert "Input layer 'input'" in r.stdout
    r = run("upgrade-net-text", UP / "nets" / "batchnorm.prototxt", out)
    assert "BatchNorm: the 3 obsolete param {} specs of 1 layer removed" in r.stdout
    r = run("upgrade-net-text", UP / "nets" / "v1_net.prototxt", out)
    assert "transform_param" in r.stdout


def test_upgrade_net_text_problems_write_and_exit_1(tmp_path):
    out = tmp_path / "o.prototxt"
    r = run("upgrade-net-text", UP / "nets" / "v0_bad_params.prototxt", out)
    assert r.exit_code == 1 and out.exists()
    assert "warning:" in r.stderr and "written anyway" in r.stderr


def test_upgrade_net_text_on_corpus_v1_net(tmp_path, corpus):
    """The corpus's V1 nets sit inline in lenet_consolidated_solver: upgrade each one."""
    hits = [p for p in corpus.rglob("*.prototxt") if "layers {" in p.read_text(errors="replace")]
    if not hits:
        pytest.skip("no V1 net in the corpus")
    n = 0
    for p in hits:
        solver = cio.read_solver_text(p, upgrade=False)
        nets = [solver.net_param, solver.train_net_param] + list(solver.test_net_param)
        for i, net in enumerate(x for x in nets if len(x.layers)):
            src, dst = tmp_path / f"{p.stem}_{i}.prototxt", tmp_path / f"{p.stem}_{i}_new.prototxt"
            src.write_text(text_format.MessageToString(net))
            r = run("upgrade-net-text", src, dst)
            assert r.exit_code == 0, r.output
            new = cio.read_net_text(dst, upgrade=False)
            assert not up.needs_upgrade(new) and len(new.layer) == len(net.layers)
            assert new == up.upgrade_net(net)
            assert dst.read_text() == to_text(new)
            n += 1
    assert n > 0


def test_upgrade_net_text_bad_input(tmp_path):
    r = run("upgrade-net-text", tmp_path / "nope.prototxt", tmp_path / "o")
    assert r.exit_code == 2 and "not found" in r.stderr and len(r.stderr.splitlines()) == 1
    bad = tmp_path / "bad.prototxt"
    bad.write_text('layers { name: "a" type: NOT_A_TYPE }\n')
    r = run("upgrade-net-text", bad, tmp_path / "o")
    assert r.exit_code == 2 and "bad.prototxt:1" in r.stderr and not (tmp_path / "o").exists()


# ============================================================================ upgrade-solver-text

@pytest.mark.parametrize("name", sorted(EXPECTED["solvers"]))
def test_upgrade_solver_text_is_caffes_output(name, tmp_path):
    out = tmp_path / "s.prototxt"
    r = run("upgrade-solver-text", UP / "solvers" / f"{name}.prototxt", out)
    assert r.exit_code == 0, r.output
    assert out.read_text() == (UP / "golden" / "solvers" / f"{name}.prototxt").read_text()
    if name.startswith("enum_"):
        assert "solver_type:" in r.stdout and "(enum) -> type:" in r.stdout
    else:
        assert "already up to date" in r.stdout


def test_upgrade_solver_both_fields_refused(tmp_path):
    src = tmp_path / "s.prototxt"
    src.write_text('net: "n.prototxt"\nsolver_type: ADAM\ntype: "Adam"\n')
    r = run("upgrade-solver-text", src, tmp_path / "o")
    assert r.exit_code == 2 and "cannot both be given" in r.stderr and not (tmp_path / "o").exists()


# ============================================================================ upgrade-net-binary

@pytest.mark.parametrize("name", sorted(EXPECTED["binaries"]))
def test_upgrade_net_binary_is_caffes_output(name, tmp_path):
    out = tmp_path / "m.caffemodel"
    r = run("upgrade-net-binary", UP / "binaries" / f"{name}.pb", out)
    assert r.exit_code == 0, r.output
    assert out.read_bytes() == (UP / "golden" / "binaries" / f"{name}.pb").read_bytes()
    assert "V1 -> V2" in r.stdout
    # the result is current: a second run copies it as is
    again = tmp_path / "again.caffemodel"
    r = run("upgrade-net-binary", out, again)
    assert r.exit_code == 0 and "already up to date" in r.stdout and "copied as is" in r.stdout
    assert again.read_bytes() == out.read_bytes()


def _v1_caffemodel(big: int = 0) -> bytes:
    """A V1 caffemodel: legacy-dim and shape blobs, double data, an old input field.

    ``big``: floats in an extra InnerProduct weight blob, appended after the layer's other
    fields (protobuf accepts fields in any order; Caffe re-serializes canonically).
    """
    from caffe_compat.weights import encode_blob
    from caffe_compat.wire import encode_varint, len_field

    rng = np.random.default_rng(3)
    net = caffe_pb2.NetParameter(name="v1")
    net.input.append("data")
    net.input_dim.extend([1, 2, 5, 5])
    conv = net.layers.add(name="conv", type=caffe_pb2.V1LayerParameter.CONVOLUTION, bottom=["data"],
                          top=["conv"], blobs_lr=[1, 2], weight_decay=[1, 0])
    conv.convolution_param.num_output = 3
    cio.array_to_blob(rng.standard_normal((3, 2, 2, 2)), conv.blobs.add(), legacy_dims=True)
    cio.array_to_blob(rng.standard_normal(3), conv.blobs.add())
    ip = net.layers.add(name="ip", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT, bottom=["conv"],
                        top=["ip"])
    b = ip.blobs.add()
    b.shape.dim.extend([2, 3])
    b.double_data.extend(rng.standard_normal(6).tolist())
    net.layers.add(name="relu", type=caffe_pb2.V1LayerParameter.RELU, bottom=["ip"], top=["ip"])
    data = net.SerializeToString()
    if big:
        fc = caffe_pb2.V1LayerParameter(name="fc", type=caffe_pb2.V1LayerParameter.INNER_PRODUCT,
                                        bottom=["ip"], top=["fc"], blobs_lr=[1])
        body = fc.SerializeToString() + len_field(6, encode_blob(
            np.arange(big, dtype=np.float32).reshape(-1, 1000)))
        data += encode_varint((2 << 3) | 2) + encode_varint(len(body)) + body
    return data


def test_upgrade_net_binary_v1_written_here(tmp_path):
    src, out = tmp_path / "v1.caffemodel", tmp_path / "new.caffemodel"
    src.write_bytes(_v1_caffemodel())
    r = run("upgrade-net-binary", src, out)
    assert r.exit_code == 0, r.output
    assert "V1 -> V2: 3 layers" in r.stdout and "net inputs data" in r.stdout
    parsed = cio.parse_binary(src.read_bytes(), caffe_pb2.NetParameter())
    assert out.read_bytes() == up.upgrade_net(parsed).SerializeToString()  # protobuf's own bytes
    new = cio.parse_binary(out.read_bytes(), caffe_pb2.NetParameter())
    assert [l.name for l in new.layer] == ["input", "conv", "ip", "relu"]
    np.testing.assert_array_equal(cio.blob_to_array(new.layer[1].blobs[0]),
                                  cio.blob_to_array(parsed.layers[0].blobs[0]))
    assert list(new.layer[2].blobs[0].double_data) == list(parsed.layers[1].blobs[0].double_data)
    # and the weights load like the source's
    from caffe_compat.weights import caffemodel_state_dict

    a, b = caffemodel_state_dict(str(src)), caffemodel_state_dict(str(out))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_upgrade_net_binary_current_with_old_batchnorm(tmp_path):
    """A current-format caffemodel whose BatchNorm keeps the 3 old param specs: only those go."""
    net = caffe_pb2.NetParameter(name="bn")
    bn = net.layer.add(name="bn", type="BatchNorm", bottom=["x"], top=["x"])
    for _ in range(3):
        bn.param.add(lr_mult=0)
    for v in ([1.0, 2.0], [3.0, 4.0], [5.0]):
        cio.array_to_blob(np.asarray(v), bn.blobs.add())
    sc = net.layer.add(name="sc", type="Scale", bottom=["x"], top=["x"])
    cio.array_to_blob(np.ones(2), sc.blobs.add())
    src, out = tmp_path / "bn.caffemodel", tmp_path / "new.caffemodel"
    src.write_bytes(net.SerializeToString())
    r = run("upgrade-net-binary", src, out)
    assert r.exit_code == 0 and "BatchNorm: the 3 obsolete param {} specs of 1 layer removed" in r.stdout
    new = cio.parse_binary(out.read_bytes(), caffe_pb2.NetParameter())
    assert len(new.layer[0].param) == 0 and len(new.layer[0].blobs) == 3
    assert out.read_bytes() == up.upgrade_net(net).SerializeToString()


def test_upgrade_net_binary_streams_blobs(tmp_path):
    """An 8 MB blob goes from the map to the output without being held in Python memory."""
    src, out = tmp_path / "big.caffemodel", tmp_path / "new.caffemodel"
    src.write_bytes(_v1_caffemodel(big=2_000_000))
    tracemalloc.start()
    try:
        res = upgrade_net_binary_file(str(src), str(out))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.applied == ["v1_to_v2", "input"] and not res.copied
    assert peak < 1 << 20, peak
    new = caffe_pb2.NetParameter()
    new.ParseFromString(out.read_bytes())
    fc = new.layer[-1]
    assert fc.name == "fc" and fc.type == "InnerProduct" and fc.param[0].lr_mult == 1
    w = cio.blob_to_array(fc.blobs[0])
    assert w.shape == (2000, 1000) and w[1999, 999] == 1_999_999


def test_upgrade_net_binary_bad_input(tmp_path):
    text = tmp_path / "net.prototxt"
    text.write_text('name: "n"\nlayer { name: "a" type: "ReLU" bottom: "x" top: "x" }\n')
    r = run("upgrade-net-binary", text, tmp_path / "o")
    assert r.exit_code == 2 and "text prototxt" in r.stderr and len(r.stderr.splitlines()) == 1
    cut = tmp_path / "cut.caffemodel"
    cut.write_bytes(_v1_caffemodel()[:-7])
    r = run("upgrade-net-binary", cut, tmp_path / "o")
    assert r.exit_code == 2 and "corrupt or truncated" in r.stderr
    empty = tmp_path / "empty.caffemodel"
    empty.write_bytes(b"")
    r = run("upgrade-net-binary", empty, tmp_path / "o")
    assert r.exit_code == 2 and "empty file" in r.stderr
    assert not (tmp_path / "o").exists()


# ============================================================================ convert-imageset

@pytest.fixture
def images(tmp_path):
    """Tiny images: three 5x7 colour PNGs (one path with spaces), a grey PNG, a 9x6 JPEG."""
    rng = np.random.default_rng(0)
    root = tmp_path / "img"
    (root / "sub dir").mkdir(parents=True)
    files = {"a.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
             "sub dir/b c.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
             "c.png": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8),
             "g.png": rng.integers(0, 256, (5, 7), dtype=np.uint8),
             "big.jpg": rng.integers(0, 256, (9, 6, 3), dtype=np.uint8)}
    for name, img in files.items():
        assert cv2.imwrite(str(root / name), img)
    return root


def write_list(tmp_path, lines) -> pathlib.Path:
    p = tmp_path / "list.txt"
    p.write_text("".join(f"{l}\n" for l in lines))
    return p


def test_convert_raw_colour(images, tmp_path):
    lst = write_list(tmp_path, ["a.png 1", "sub dir/b c.png 2", "", "c.png 3"])
    r = run("convert-imageset", f"{images}/", lst, tmp_path / "db")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.stdout and "3 of 3 images" in r.stdout
    recs = records(tmp_path / "db")
    assert [k for k, _, _ in recs] == [b"00000000_a.png", b"00000001_sub dir/b c.png", b"00000002_c.png"]
    for (k, d, raw), (name, label) in zip(recs, [("a.png", 1), ("sub dir/b c.png", 2), ("c.png", 3)]):
        bgr = cv2.imread(str(images / name))
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 5, 7, label, False)
        assert d.data == bgr.transpose(2, 0, 1).tobytes()  # CHW, BGR as Caffe
        # Caffe's CVMatToDatum sets encoded=false explicitly: same bytes
        assert raw == caffe_pb2.Datum(channels=3, height=5, width=7, data=d.data, label=label,
                                      encoded=False).SerializeToString()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_convert_gray_resized_different_sizes(images, tmp_path):
    lst = write_list(tmp_path, ["a.png 0", "big.jpg 7", "g.png 2"])
    r = run("convert-imageset", "--gray", "--resize_width", "4", "--resize-height", "3", "--check_size",
            images, lst, tmp_path / "db")  # a root without '/' gets one
    assert r.exit_code == 0, r.output
    recs = records(tmp_path / "db")
    assert [(d.channels, d.height, d.width) for _, d, _ in recs] == [(1, 3, 4)] * 3
    for (_, d, _), name in zip(recs, ["a.png", "big.jpg", "g.png"]):
        ref = cv2.resize(cv2.imread(str(images / name), cv2.IMREAD_GRAYSCALE), (4, 3))
        assert d.data == ref.tobytes()
    assert [d.label for _, d, _ in recs] == [0, 7, 2]


def test_convert_encoded(images, tmp_path):
    lst = write_list(tmp_path, ["a.png 1", "big.jpg 2"])
    r = run("convert-imageset", "--encoded", images, lst, tmp_path / "db")
    assert r.exit_code == 0, r.output
    (_, a, _), (_, j, _) = records(tmp_path / "db")
    assert a.encoded and a.data == (images / "a.png").read_bytes() and a.label == 1
    assert not a.HasField("channels")
    assert j.data == (images / "big.jpg").read_bytes()  # the file, not a re-encoding
    # another type, or resized: re-encoded with OpenCV
    r = run("convert-imageset", "--encode_type", "png", "--resize_width", "3", "--resize_height", "2",
            images, lst, tmp_path / "db2")
    assert r.exit_code == 0, r.output
    for (_, d, _), name in zip(records(tmp_path / "db2"), ["a.png", "big.jpg"]):
        assert d.encoded and d.data[:4] == b"\x89PNG"
        dec = cv2.imdecode(np.frombuffer(d.data, np.uint8), cv2.IMREAD_UNCHANGED)
        np.testing.assert_array_equal(dec, cv2.resize(cv2.imread(str(images / name)), (3, 2)))
    # --gray --encoded: a colour file is re-encoded grey (Caffe stored the colour file)
    r = run("convert-imageset", "--gray", "--encoded", images, write_list(tmp_path, ["a.png 1", "g.png 2"]),
            tmp_path / "db3")
    assert r.exit_code == 0, r.output
    (_, a, _), (_, g, _) = records(tmp_path / "db3")
    assert cv2.imdecode(np.frombuffer(a.data, np.uint8), cv2.IMREAD_UNCHANGED).ndim == 2
    assert g.data == (images / "g.png").read_bytes()


def test_convert_shuffle_is_seeded(images, tmp_path):
    names = ["a.png", "sub dir/b c.png", "c.png", "g.png", "big.jpg"]
    lst = write_list(tmp_path, [f"{n} {i}" for i, n in enumerate(names)])

    def order(db, *flags):
        r = run("convert-imageset", "--shuffle", *flags, images, lst, tmp_path / db)
        assert r.exit_code == 0, r.output
        return [(k, d.label) for k, d, _ in records(tmp_path / db)], r.stdout

    first, out = order("s1")
    assert "shuffled with seed 0" in out
    assert order("s2")[0] == first
    perm = np.random.default_rng(imageset.DEFAULT_SEED).permutation(5)
    assert [lab for _, lab in first] == perm.tolist()
    assert [k for k, _ in first] == [f"{i:08d}_{names[p]}".encode() for i, p in enumerate(perm)]
    other, _ = order("s3", "--seed", "5")
    assert sorted(l for _, l in other) == list(range(5)) and other != first


def test_convert_missing_image_is_skipped(images, tmp_path):
    lst = write_list(tmp_path, ["a.png 1", "nope.png 2", "c.png 3"])
    r = run("convert-imageset", images, lst, tmp_path / "db")
    assert r.exit_code == 0, r.output
    assert "could not open or find file" in r.stderr and "list.txt:2" in r.stderr
    assert "2 of 3 images, 1 skipped" in r.stdout
    assert [k for k, _, _ in records(tmp_path / "db")] == [b"00000000_a.png", b"00000002_c.png"]
    r = run("convert-imageset", images, write_list(tmp_path, ["x.png 1", "y.png 2"]), tmp_path / "db2")
    assert r.exit_code == 2 and "none of the 2 listed images" in r.stderr
    assert not (tmp_path / "db2").exists()


@pytest.mark.parametrize("line, msg", [("a.png one", "bad label 'one'"), ("a.png", "expected 'PATH LABEL'"),
                                       ("a.png 99999999999", "int32")])
def test_convert_bad_list_line(images, tmp_path, line, msg):
    lst = write_list(tmp_path, ["c.png 0", line])
    r = run("convert-imageset", images, lst, tmp_path / "db")
    assert r.exit_code == 2 and msg in r.stderr and "list.txt:2" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "db").exists()


def test_convert_refusals(images, tmp_path):
    lst = write_list(tmp_path, ["a.png 1", "big.jpg 2"])
    (tmp_path / "db").mkdir()
    (tmp_path / "db" / "keep").write_text("x")
    r = run("convert-imageset", images, lst, tmp_path / "db")
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert os.listdir(tmp_path / "db") == ["keep"]
    r = run("convert-imageset", "--backend", "leveldb", images, lst, tmp_path / "db2")
    assert r.exit_code == 2 and "leveldb backend is not supported" in r.stderr
    r = run("convert-imageset", "--resize_width", "4", images, lst, tmp_path / "db2")
    assert r.exit_code == 2 and "go together" in r.stderr
    r = run("convert-imageset", "--check_size", images, lst, tmp_path / "db2")  # 5x7 then 9x6
    assert r.exit_code == 2 and "--check_size" in r.stderr and "3x9x6" in r.stderr
    r = run("convert-imageset", "--encode_type", "nosuch", images, lst, tmp_path / "db2")
    assert r.exit_code == 2 and "cannot encode" in r.stderr
    r = run("convert-imageset", images, tmp_path / "nolist.txt", tmp_path / "db2")
    assert r.exit_code == 2 and "cannot read the image list" in r.stderr
    assert not (tmp_path / "db2").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_convert_commits_in_batches_and_grows_the_map(tmp_path, monkeypatch):
    root = tmp_path / "img"
    root.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        cv2.imwrite(str(root / f"{i}.png"), rng.integers(0, 256, (60, 60, 3), dtype=np.uint8))
    lst = write_list(tmp_path, [f"{i}.png {i}" for i in range(5)])
    monkeypatch.setattr(imageset, "COMMIT_EVERY", 2)
    lines = []
    res = imageset.convert_imageset(str(root), str(lst), str(tmp_path / "db"), log=lines.append,
                                    map_size=32 << 10)  # 32 KiB: each record is ~10.8 kB
    assert res.written == 5
    assert [l for l in lines if l.startswith("Processed")] == [
        "Processed 2 files.", "Processed 4 files.", "Processed 5 files."]
    assert [d.label for _, d, _ in records(tmp_path / "db")] == list(range(5))


# ============================================================================ compute-image-mean

def test_compute_image_mean(images, tmp_path):
    names = ["a.png", "sub dir/b c.png", "c.png"]
    run("convert-imageset", images, write_list(tmp_path, [f"{n} 0" for n in names]), tmp_path / "db")
    r = run("compute-image-mean", tmp_path / "db", tmp_path / "mean.binaryproto")
    assert r.exit_code == 0, r.output
    imgs = np.stack([cv2.imread(str(images / n)).transpose(2, 0, 1) for n in names])
    want = (imgs.sum(0).astype(np.float32) / np.float32(3)).astype(np.float32)  # Caffe's float math
    np.testing.assert_allclose(want, imgs.mean(0), rtol=1e-6)
    blob = caffe_pb2.BlobProto()
    raw = (tmp_path / "mean.binaryproto").read_bytes()
    blob.ParseFromString(raw)
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 5, 7)
    assert not blob.HasField("shape")
    np.testing.assert_array_equal(np.asarray(blob.data, np.float32).reshape(3, 5, 7), want)
    assert raw == blob.SerializeToString()  # protobuf's (and Caffe's) serialization
    np.testing.assert_array_equal(cio.read_binaryproto(tmp_path / "mean.binaryproto"), want[None])
    assert "Number of channels: 3" in r.stdout
    for c in range(3):
        assert f"mean_value channel [{c}]: {want[c].mean():.6g}" in r.stdout
    # encoded records are decoded: the same mean from an encoded (PNG) database
    run("convert-imageset", "--encoded", images, write_list(tmp_path, [f"{n} 0" for n in names]),
        tmp_path / "enc")
    assert run("compute-image-mean", tmp_path / "enc", tmp_path / "m2").exit_code == 0
    assert (tmp_path / "m2").read_bytes() == raw
    # no output file: the means are printed only
    r = run("compute-image-mean", tmp_path / "db")
    assert r.exit_code == 0 and "mean_value channel [2]:" in r.stdout


def test_compute_image_mean_refusals(images, tmp_path):
    import lmdb

    run("convert-imageset", images, write_list(tmp_path, ["a.png 0", "big.jpg 1"]), tmp_path / "db")
    r = run("compute-image-mean", tmp_path / "db", tmp_path / "m")
    assert r.exit_code == 2 and "00000001_big.jpg" in r.stderr and "3x9x6" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "error" not in r.stderr.split("\n")[0]
    assert not (tmp_path / "m").exists()
    r = run("compute-image-mean", tmp_path / "nope")
    assert r.exit_code == 2 and "database not found" in r.stderr
    r = run("compute-image-mean", "--backend", "leveldb", tmp_path / "db")
    assert r.exit_code == 2 and "leveldb" in r.stderr
    env = lmdb.open(str(tmp_path / "empty"), map_size=1 << 20)
    env.close()
    r = run("compute-image-mean", tmp_path / "empty")
    assert r.exit_code == 2 and "empty" in r.stderr


# ============================================================================ Data layer round trip

@pytest.mark.parametrize("flags", [(), ("--encoded",), ("--gray", "--resize_width", "4", "--resize_height", "3")])
def test_data_layer_reads_converted_db_with_mean(images, tmp_path, flags):
    from caffe_compat.net import Net

    names = ["a.png", "sub dir/b c.png", "c.png"]
    lst = write_list(tmp_path, [f"{n} {10 + i}" for i, n in enumerate(names)])
    assert run("convert-imageset", *flags, images, lst, tmp_path / "db").exit_code == 0
    assert run("compute-image-mean", tmp_path / "db", tmp_path / "mean.binaryproto").exit_code == 0
    gray = "--gray" in flags
    imgs = []
    for n in names:
        im = cv2.imread(str(images / n), cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
        im = cv2.resize(im, (4, 3)) if gray else im
        imgs.append(im[None] if gray else im.transpose(2, 0, 1))
    imgs = np.stack(imgs).astype(np.float32)
    mean = cio.read_binaryproto(tmp_path / "mean.binaryproto")[0]
    net = Net(f'name: "rt" layer {{ name: "data" type: "Data" top: "data" top: "label" '
              f'data_param {{ source: "{tmp_path / "db"}" backend: LMDB batch_size: 3 }} '
              f'transform_param {{ mean_file: "{tmp_path / "mean.binaryproto"}" }} }}', phase="test")
    out = net.forward()
    assert out["label"].tolist() == [10.0, 11.0, 12.0]
    np.testing.assert_array_equal(out["data"].numpy(), imgs - mean)
    np.testing.assert_allclose(out["data"].numpy().mean(0), 0, atol=1e-4)  # the mean subtracted
