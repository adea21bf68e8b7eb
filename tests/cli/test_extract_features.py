"""``caffe-compat extract-features`` (Caffe's tools/extract_features.cpp).

A tiny net reads an LMDB made by ``convert_imageset`` through a Data layer (batch 3 over 7
images, so the third mini-batch wraps around as Caffe's cursor does); the conv output (4-D,
after an in-place ReLU) and the fc output (2-D) of 3 mini-batches are extracted, read back with
lmdb + caffe_pb2.Datum and compared exactly with the same net run batch by batch.
"""
from __future__ import annotations

import os

import cv2
import numpy as np
import pytest

from caffe_compat import extract_features as ef
from caffe_compat.errors import DataError
from caffe_compat.imageset import convert_imageset
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2

N_IMAGES, BATCH, BATCHES = 7, 3, 3

NET = """name: "feat"
layer {{ name: "data" type: "Data" top: "data" top: "label" include {{ phase: TEST }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "{db}" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 2 kernel_size: 3
    weight_filler {{ type: "gaussian" std: 0.5 }} bias_filler {{ type: "constant" value: -0.1 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "fc" type: "InnerProduct" bottom: "conv1" top: "fc"
  inner_product_param {{ num_output: 4 weight_filler {{ type: "gaussian" std: 0.3 }}
    bias_filler {{ type: "constant" value: 0.2 }} }} }}
layer {{ name: "prob" type: "Softmax" bottom: "fc" top: "prob" }}
"""


from test_caffe_tools import records, run  # noqa: E402  (the LMDB reader and CLI runner)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(folder, prototxt, caffemodel): 7 tiny 5x6 images in an LMDB, a net reading it, weights."""
    tmp = tmp_path_factory.mktemp("extract")
    rng = np.random.default_rng(3)
    (tmp / "img").mkdir()
    for i in range(N_IMAGES):
        assert cv2.imwrite(str(tmp / "img" / f"{i}.png"), rng.integers(0, 256, (5, 6, 3), dtype=np.uint8))
    (tmp / "list.txt").write_text("".join(f"{i}.png {i}\n" for i in range(N_IMAGES)))
    convert_imageset(str(tmp / "img"), str(tmp / "list.txt"), str(tmp / "images_lmdb"))
    proto = tmp / "net.prototxt"
    proto.write_text(NET.format(db=tmp / "images_lmdb", batch=BATCH))
    weights = tmp / "w.caffemodel"
    Net(str(proto), phase="test", seed=5).save_weights(str(weights))
    return tmp, proto, weights


def reference(proto, weights, names, batches=BATCHES):
    """The named blobs of each forward of a fresh net: {name: [array per batch]}."""
    net = Net(str(proto), weights=str(weights), phase="test")
    out = {n: [] for n in names}
    for _ in range(batches):
        net.forward()
        for n in names:
            out[n].append(net.blobs[n].detach().numpy().copy())
    return out


def test_extract_two_blobs_matches_the_net(setup, tmp_path):
    _, proto, weights = setup
    r = run("extract-features", weights, proto, "conv1,fc", f"{tmp_path}/f_conv,{tmp_path}/f_fc",
            BATCHES, "lmdb")
    assert r.exit_code == 0, r.output
    total = BATCH * BATCHES
    for b in ("conv1", "fc"):
        assert f"Extracted features of {total} query images for feature blob {b}" in r.stderr
    assert f"wrote {tmp_path}/f_conv: {total} features of blob conv1 (2x3x4 CxHxW, 24 floats each)" \
        in r.stdout
    assert f"{total} features of blob fc (4x1x1 CxHxW, 4 floats each)" in r.stdout
    want = reference(proto, weights, ["conv1", "fc"])
    # the Data layer advanced: batches differ, and the third wrapped to the first images
    assert not np.array_equal(want["conv1"][0], want["conv1"][1])
    np.testing.assert_array_equal(want["conv1"][2][1:], want["conv1"][0][:2])
    assert (want["conv1"][0] == 0).any() and (want["conv1"][0] > 0).any()  # after the in-place ReLU
    for db, blob, chw in ((tmp_path / "f_conv", "conv1", (2, 3, 4)), (tmp_path / "f_fc", "fc", (4, 1, 1))):
        recs = records(db)
        assert [k for k, _, _ in recs] == [b"%010d" % i for i in range(total)]
        for i, (_, d, raw) in enumerate(recs):
            batch, n = divmod(i, BATCH)
            item = want[blob][batch][n]
            assert (d.channels, d.height, d.width) == chw
            assert not d.HasField("data") and not d.HasField("label") and not d.HasField("encoded")
            got = np.asarray(d.float_data, dtype=np.float32)
            # the tool runs without grad (the inference plan: oneDNN kernels), the reference with:
            # equal within Caffe's 1e-5 of the blob's largest value
            scale = float(np.abs(want[blob]).max())
            np.testing.assert_allclose(got, item.reshape(-1), rtol=0, atol=1e-5 * scale)
            # protobuf's own serialization (what Caffe's SerializeToString writes)
            ref = caffe_pb2.Datum(channels=chw[0], height=chw[1], width=chw[2])
            ref.float_data.extend(got.tolist())
            assert raw == ref.SerializeToString()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_legacy_dims_and_datum_bytes():
    assert ef.legacy_dims((3, 2, 4, 5)) == (3, 2, 4, 5)
    assert ef.legacy_dims((3, 5)) == (3, 5, 1, 1)          # fc output: channels = D
    assert ef.legacy_dims((2, 3, 4)) == (2, 3, 4, 1)
    assert ef.legacy_dims((6,)) == (6, 1, 1, 1)
    assert ef.legacy_dims(()) == (1, 1, 1, 1)              # a scalar (loss) blob: one item
    with pytest.raises(DataError, match="5 axes"):
        ef.legacy_dims((1, 2, 3, 4, 5), "x")
    vals = np.array([1.5, -0.0, np.inf, 3e-39, -7.25], np.float32)
    ref = caffe_pb2.Datum(channels=5, height=1, width=1)
    ref.float_data.extend(vals.tolist())
    assert ef.datum_bytes(5, 1, 1, vals) == ref.SerializeToString()
    assert ef.datum_bytes(1, 1, 1, np.zeros(0, np.float32)) == \
        caffe_pb2.Datum(channels=1, height=1, width=1).SerializeToString()
    assert ef.split_names("fc7,prob") == ["fc7", "prob"] and ef.split_names("a,") == ["a", ""]


def test_commits_every_n_and_label_blob(setup, tmp_path, monkeypatch):
    """Caffe's progress lines at each commit (every 1000 items; 4 here) and at the end; a 1-D
    blob (the labels) is stored as 1x1x1 Datums."""
    _, proto, weights = setup
    monkeypatch.setattr(ef, "COMMIT_EVERY", 4)
    net = Net(str(proto), weights=str(weights), phase="test")
    lines = []
    res = ef.extract_features(net, ["label", "prob"], [str(tmp_path / "lab"), str(tmp_path / "p")],
                              BATCHES, log=lines.append)
    assert res.counts == [9, 9] and res.item_shapes == [(1, 1, 1), (4, 1, 1)]
    progress = [l for l in lines if l.startswith("Extracted")]
    assert progress == [f"Extracted features of {n} query images for feature blob {b}"
                        for n, b in ((4, "label"), (4, "prob"), (8, "label"), (8, "prob"),
                                     (9, "label"), (9, "prob"))]
    labels = [d.float_data[0] for _, d, _ in records(tmp_path / "lab")]
    assert labels == [float(i % N_IMAGES) for i in range(9)]   # 0..6, then the wrap: 0, 1


def test_failure_midway_leaves_nothing(setup, tmp_path):
    _, proto, weights = setup
    net = Net(str(proto), weights=str(weights), phase="test")
    calls = []
    real = net.forward

    def flaky(**kw):
        calls.append(1)
        if len(calls) == 2:
            raise DataError("boom")
        return real(**kw)

    net.forward = flaky
    with pytest.raises(DataError, match="boom"):
        ef.extract_features(net, ["fc"], [str(tmp_path / "f")], BATCHES)
    assert os.listdir(tmp_path) == []


def test_errors(setup, tmp_path, monkeypatch):
    _, proto, weights = setup
    a, b = tmp_path / "a", tmp_path / "b"

    def refused(*args, msg):
        r = run("extract-features", weights, proto, *args)
        assert r.exit_code == 2, r.output
        errors = [l for l in r.stderr.splitlines() if l.startswith("error")]
        assert len(errors) == 1 and r.stderr.splitlines()[-1] == errors[0], r.stderr
        assert msg in errors[0], r.stderr
        return r

    r = refused("conv1,nope", f"{a},{b}", 1, "lmdb", msg="unknown feature blob name 'nope'")
    assert "data, label, conv1, fc, prob" in r.stderr
    refused("conv1,fc", str(a), 1, "lmdb", msg="the number of blob names and dataset names must be equal")
    refused("conv1", str(a), 0, "lmdb", msg="num_mini_batches must be >= 1")
    refused("conv1", str(a), 1, "leveldb", msg="leveldb backend is not supported")
    refused("conv1", str(a), 1, "lmdb", "TPU", msg="mode must be CPU or GPU")
    refused("conv1,fc", f"{a},{a}", 1, "lmdb", msg="named twice")
    refused("conv1,", f"{a},{b}", 1, "lmdb", msg="empty blob name")
    b.mkdir()
    (b / "keep").write_text("")
    refused("conv1,fc", f"{a},{b}", 1, "lmdb", msg="already exists")
    assert os.listdir(b) == ["keep"]
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused("conv1", str(a), 1, "lmdb", "GPU", "0", msg="no CUDA device")
    assert sorted(os.listdir(tmp_path)) == ["b"]    # nothing was created by any refused run
    # a missing weights file is one line too
    r = run("extract-features", tmp_path / "none.caffemodel", proto, "conv1", a, 1, "lmdb")
    assert r.exit_code == 2 and r.stderr.splitlines()[-1].startswith("error: "), r.output
    assert "none.caffemodel" in r.stderr
    assert not a.exists()


@pytest.mark.gpu
def test_gpu_matches_cpu(setup, tmp_path):
    _, proto, weights = setup
    r = run("extract-features", weights, proto, "conv1,fc", f"{tmp_path}/g_conv,{tmp_path}/g_fc",
            BATCHES, "lmdb", "GPU", "0")
    assert r.exit_code == 0, r.output
    assert "Using GPU, device 0" in r.stderr
    want = reference(proto, weights, ["conv1", "fc"])
    for db, blob in ((tmp_path / "g_conv", "conv1"), (tmp_path / "g_fc", "fc")):
        got = np.stack([np.asarray(d.float_data, np.float32) for _, d, _ in records(db)])
        np.testing.assert_allclose(got, np.concatenate(want[blob]).reshape(len(got), -1),
                                   rtol=1e-5, atol=1e-6)
