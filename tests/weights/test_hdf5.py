"""Caffe's HDF5 weights (``*.caffemodel.h5``) and solver states (``*.solverstate.h5``):
round trips, files laid out as Caffe writes them, Caffe's own files
(tests/golden/hdf5/sgd_hdf5.npz from tests/golden/make_hdf5.py), refusals, ``convert``,
pycaffe's ``save_hdf5``/``load_hdf5`` and ``snapshot_format: HDF5`` resumes, and real Caffe
restoring and loading the files written here (tests/golden/hdf5/caffe_reads_ours.npz)."""
from __future__ import annotations

import os
import pathlib
import sys

import h5py
import numpy as np
import pytest
import torch

from caffe_compat import weights as W
from caffe_compat.errors import ParseError, SolverError, WeightsError
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2
from caffe_compat.solver import Solver, SolverState, state_hdf5
from caffe_compat.weights import hdf5 as H5
from conftest import ROOT
from test_weights import (SHARED, TINY, assert_same_state, blob_bytes, net_values,
                          run_cli, tiny_net)

GOLDEN = ROOT / "tests" / "golden" / "hdf5" / "sgd_hdf5.npz"


def _datasets(path) -> dict:
    """{'data/ip/0': array, ...} of every dataset, and {'data/relu1': None} for empty groups."""
    out = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]
            elif len(obj) == 0:
                out[name] = None
        f.visititems(visit)
    return out


# ---------------------------------------------------------------------- weights round trips
def test_round_trip_bit_exact_and_same_blobs_as_caffemodel(tmp_path):
    net = tiny_net(3)
    h5, cm = tmp_path / "w.caffemodel.h5", tmp_path / "w.caffemodel"
    net.save_weights(str(h5))
    net.save_weights(str(cm))
    fresh = tiny_net(9)
    assert fresh.load_weights(str(h5)) == []
    assert_same_state(net_values(fresh), net_values(net))
    # the datasets hold exactly the caffemodel's blobs, float32, in the blobs' shapes
    ds = _datasets(h5)
    blobs = blob_bytes(cm)
    assert {k for k, v in ds.items() if v is not None} == {f"data/{ln}/{i}" for ln, i in blobs}
    for (ln, i), raw in blobs.items():
        arr = ds[f"data/{ln}/{i}"]
        assert arr.dtype == np.float32 and arr.tobytes() == raw
        assert arr.shape == tuple(net.layer(ln).caffe_blobs()[i].shape)
    # Caffe's ToHDF5: a group for every layer, empty where the layer has no blobs; no diff
    assert ds["data/relu1"] is None and ds["data/input"] is None
    assert not any(k.startswith("diff") for k in ds)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_write_diff_and_shared_params_stored_once(tmp_path):
    """Sharers (``param { name }``) get an empty group, as Caffe stores only owners; the diff
    group holds every blob's gradient, sharers included."""
    net = Net(SHARED, seed=4)
    out = net(data=torch.randn(2, 4))["out"]
    out.sum().backward()
    path = tmp_path / "s.h5"
    H5.save_hdf5(net, str(path), write_diff=True)
    ds = _datasets(path)
    assert sorted(k for k, v in ds.items() if k.startswith("data/") and v is not None) == \
        ["data/ip1/0", "data/ip1/1"]
    assert ds["data/ip2"] is None
    grad = net.layer("ip1").weight.grad.numpy()
    assert np.array_equal(ds["diff/ip1/0"], grad) and np.array_equal(ds["diff/ip2/0"], grad)
    fresh = Net(SHARED, seed=9)
    fresh.load_weights(str(path))
    assert fresh.layer("ip2").weight is fresh.layer("ip1").weight
    assert torch.equal(fresh.layer("ip2").weight, net.layer("ip1").weight)
    assert torch.equal(fresh.layer("ip2").bias, net.layer("ip1").bias)


def test_file_built_with_h5py_in_caffes_layout_loads(tmp_path):
    """What Caffe writes, made here with h5py: empty groups, a diff group, a layer the net lacks,
    and a double dataset (Caffe's double nets; read as float32)."""
    ref = tiny_net(5)
    path = tmp_path / "caffe_style.caffemodel.h5"
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        diff = f.create_group("diff")
        for e in ref.entries:
            g = data.create_group(e.name)
            diff.create_group(e.name)
            for i, b in enumerate(e.module.caffe_blobs() if e.module is not None else []):
                arr = b.detach().numpy()
                g.create_dataset(str(i), data=arr.astype(np.float64) if e.name == "ip" else arr)
                diff[e.name].create_dataset(str(i), data=np.full(arr.shape, np.nan, np.float32))
        data.create_group("old_fc").create_dataset("0", data=np.ones((2, 2), np.float32))
        data.create_group("loss")  # a blob-less layer the net lacks: no note
    net = tiny_net(6)
    notes = net.load_weights(str(path))
    assert notes == ["ignoring source layer 'old_fc' (not in the net)"]
    got, want = net_values(net), net_values(ref)
    for k in want:
        exact = want[k] if not k.startswith("ip.") else want[k].double().float()
        assert torch.equal(got[k], exact), k


def test_integer_datasets_and_chunked_reads(tmp_path):
    """Caffe reads integer datasets as floats; big datasets are read slab by slab (the slab
    size is forced small here), each slab checked for NaN before it is copied."""
    path = _write_tiny(tmp_path)

    def ints(f):
        del f["data/ip/1"]
        f["data/ip"].create_dataset("1", data=np.arange(5, dtype=np.uint32))
    _edit(path, ints)
    net = tiny_net(2)
    net.load_weights(str(path))
    assert torch.equal(net.layer("ip").bias.detach(), torch.arange(5, dtype=torch.float32))
    arr = np.random.RandomState(0).randn(10, 3)
    with h5py.File(tmp_path / "c.h5", "w") as f:
        f.create_dataset("x", data=arr)
        f.create_dataset("y", data=np.where(np.arange(30).reshape(10, 3) == 20, np.nan, arr))
        target = torch.empty(10, 3)
        H5._DatasetSource(f["x"]).copy_into(target, 7, None)  # slabs of 2 rows
        assert torch.equal(target, torch.from_numpy(arr).float())
        seen = []

        def check(part):
            seen.append(part.size)
            W.check_finite_array(part, layer="l", blob=0)
        with pytest.raises(WeightsError, match="holds 1 NaN"):
            H5._DatasetSource(f["y"]).copy_into(torch.empty(10, 3), 7, check)
        assert seen == [6, 6, 6, 6]  # refused at the slab holding the NaN


# ---------------------------------------------------------------------- Caffe's own files
@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


def _golden_params(g, step: int) -> dict:
    return {(k.split("/")[1], int(k.split("/")[2])): g[k] for k in g.files
            if k.startswith("param/") and k.endswith(f"/{step}")}


def _golden_solver(g, tmp_path, extra: str = "") -> Solver:
    net = tmp_path / "net.prototxt"
    net.write_text(str(g["prototxt"]))
    sp = tmp_path / "solver.prototxt"
    sp.write_text(f'net: "{net}"\nsnapshot_prefix: "{tmp_path}/snap"\n{g["solver"]}\n{extra}')
    s = Solver(str(sp), feed={"data": g["input/data"], "label": g["input/label"]})
    with torch.no_grad():
        for (ln, i), v in _golden_params(g, 0).items():
            s.net.layer(ln).caffe_blobs()[i].copy_(torch.from_numpy(v))
    return s


def _params(net) -> dict:
    return {(e.name, i): b.detach().cpu().numpy().copy() for e in net.entries if e.module is not None
            for i, b in enumerate(e.module.caffe_blobs())}


def _assert_close(got: dict, want: dict, tol: float = 1e-5) -> None:
    for k, v in want.items():
        scale = max(float(np.abs(v).max()), 1e-6)
        err = float(np.abs(got[k].astype(np.float64) - v).max()) / scale
        assert err <= tol, f"{k}: rel err {err:.3g}"


def test_caffe_written_weights_load_bit_exact(golden, tmp_path):
    k = int(golden["state_iter"])
    h5 = tmp_path / "caffe.caffemodel.h5"
    h5.write_bytes(golden["caffemodel_h5"].tobytes())
    cm = tmp_path / "caffe.caffemodel"
    cm.write_bytes(golden["caffemodel"].tobytes())
    a = Net(str(golden["prototxt"]), phase="train")
    assert a.load_weights(str(h5)) == []
    b = Net(str(golden["prototxt"]), phase="train")
    b.load_weights(str(cm))
    want = _golden_params(golden, k)
    got = _params(a)
    assert got.keys() == want.keys()
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    assert_same_state(net_values(a), net_values(b))
    # and ours, written from those weights, has Caffe's datasets bit for bit
    ours = tmp_path / "ours.caffemodel.h5"
    a.save_weights(str(ours))
    theirs, mine = _datasets(h5), _datasets(ours)
    assert theirs.keys() == mine.keys()
    for key, v in theirs.items():
        assert (v is None and mine[key] is None) or (v.dtype == mine[key].dtype
                                                      and v.tobytes() == mine[key].tobytes()), key


def test_caffe_written_solverstate_restores_and_continues_like_caffe(golden, tmp_path):
    """Caffe's history (with slots for BatchNorm's statistics), iter, current_step and its
    relative learned_net (found next to the state) continue as Caffe did."""
    k, steps = int(golden["state_iter"]), int(golden["steps"])
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    (snaps / f"snap_iter_{k}.caffemodel.h5").write_bytes(golden["caffemodel_h5"].tobytes())
    state = snaps / f"snap_iter_{k}.solverstate.h5"
    state.write_bytes(golden["solverstate_h5"].tobytes())
    s = _golden_solver(golden, tmp_path)
    s.restore(str(state))
    assert (s.iter, s.current_step) == (k, 1)
    s.step(steps - k)
    _assert_close(_params(s.net), _golden_params(golden, steps))
    # the same history as a binaryproto SolverState (Caffe's other format) restores the same
    with h5py.File(state, "r") as f:
        hist = [f["history"][str(i)][()] for i in range(len(f["history"]))]
    st = caffe_pb2.SolverState(iter=k, current_step=1, learned_net=f"snap_iter_{k}.caffemodel.h5")
    for a in hist:
        blob = st.history.add()
        blob.shape.dim.extend(a.shape)
        blob.data.extend(a.ravel().tolist())
    bp = snaps / "state.solverstate"
    bp.write_bytes(st.SerializeToString())
    s2 = _golden_solver(golden, tmp_path)
    s2.restore(str(bp))
    s2.step(steps - k)
    assert_same_state(net_values(s2.net), net_values(s.net))


# ---------------------------------------------------------------------- refusals
def _write_tiny(tmp_path, name="w.caffemodel.h5", net=None) -> pathlib.Path:
    path = tmp_path / name
    (net or tiny_net(1)).save_weights(str(path))
    return path


def _edit(path, fn) -> None:
    with h5py.File(path, "a") as f:
        fn(f)


def test_missing_layer_is_an_error_unless_allowed(tmp_path):
    path = _write_tiny(tmp_path)
    _edit(path, lambda f: f["data"].move("ip", "fc_renamed"))
    with pytest.raises(WeightsError, match=r"no weights in the file for layer\(s\) ip .*allow_missing"):
        tiny_net(2).load_weights(str(path))
    net = tiny_net(2)
    before = net.layer("ip").weight.detach().clone()
    notes = net.load_weights(str(path), allow_missing=True)
    assert "ignoring source layer 'fc_renamed' (not in the net)" in notes
    assert any("no weights in the file for layer(s) ip" in n for n in notes)
    assert torch.equal(net.layer("ip").weight, before)


@pytest.mark.parametrize("edit,match", [
    (lambda f: f["data/ip"].create_dataset("2", data=np.zeros(3, np.float32)),
     r"layer 'ip': incompatible number of blobs: the file has 3, the net's InnerProduct layer has 2"),
    (lambda f: f["data/ip"].__delitem__("1"),
     r"layer 'ip': blob 1: incompatible number of blobs: the file lacks blob 1 \('bias'\)"),
    (lambda f: f["data/relu1"].create_dataset("0", data=np.zeros(3, np.float32)),
     r"layer 'relu1': incompatible number of blobs: the file has 1, the net's ReLU layer has 0"),
    (lambda f: (f["data/ip"].__delitem__("0"), f["data/ip"].create_dataset("0", data=np.zeros((5, 3))))
     , r"layer 'ip': blob 0: shape mismatch for 'weight': the net expects \(5, \d+\), the file has \(5, 3\)"),
    (lambda f: f["data/ip"].create_dataset("w", data=np.zeros(3, np.float32)),
     r"layer 'ip': unexpected entry 'w'.*datasets named 0, 1"),
    (lambda f: (f["data/ip"].__delitem__("1"), f["data/ip"].create_dataset("1", data=np.array([b"x"] * 5))),
     r"layer 'ip': blob 1: dataset has type \|S1"),
    (lambda f: (f["data"].__delitem__("ip"), f["data"].create_dataset("ip", data=np.zeros(3))),
     r"layer 'ip': 'data/ip' is not a group"),
])
def test_count_shape_and_layout_errors(tmp_path, edit, match):
    path = _write_tiny(tmp_path)
    _edit(path, edit)
    with pytest.raises(WeightsError, match=match) as ei:
        tiny_net(2).load_weights(str(path))
    assert str(ei.value).startswith(str(path) + ": ")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nonfinite_refused_with_layer_and_blob(tmp_path, bad):
    path = _write_tiny(tmp_path)

    def poison(f):
        f["data/sc1/1"][2] = bad
    _edit(path, poison)
    with pytest.raises(WeightsError, match=r"layer 'sc1': blob 1: holds \d NaN and \d Inf value"):
        tiny_net(2).load_weights(str(path))
    net = tiny_net(2)
    net.load_weights(str(path), check_finite=False)
    assert not torch.isfinite(net.layer("sc1").bias).all()
    # double values beyond float32's range are Inf once loaded: refused too
    path2 = _write_tiny(tmp_path, "d.caffemodel.h5")

    def huge(f):
        del f["data/sc1/1"]
        f["data/sc1"].create_dataset("1", data=np.full(4, 1e300))
    _edit(path2, huge)
    with pytest.raises(WeightsError, match="beyond float32's range"):
        tiny_net(2).load_weights(str(path2))


def test_not_hdf5_and_not_weights_files(tmp_path):
    text = tmp_path / "text.h5"
    text.write_text('name: "x"\nlayer { name: "a" type: "ReLU" }\n')
    with pytest.raises(ParseError, match=r"not an HDF5 file, expected HDF5 weights; it looks like a "
                                         r"text prototxt"):
        tiny_net().load_weights(str(text))
    cm = tmp_path / "w.caffemodel"
    tiny_net().save_weights(str(cm))
    misnamed = tmp_path / "w.h5"
    misnamed.write_bytes(cm.read_bytes())
    with pytest.raises(ParseError, match="it looks like a binary caffemodel: name it .caffemodel"):
        tiny_net().load_weights(str(misnamed))
    # HDF5 content under a .caffemodel name: told to name it .h5
    h5 = _write_tiny(tmp_path)
    wrong = tmp_path / "h5.caffemodel"
    wrong.write_bytes(h5.read_bytes())
    with pytest.raises(ParseError, match=r"not a binary caffemodel; it looks like an HDF5 file: .*\*\.h5"):
        tiny_net().load_weights(str(wrong))
    with pytest.raises(WeightsError, match="weights file not found"):
        tiny_net().load_weights(str(tmp_path / "missing.h5"))


def test_no_data_group(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros(3))
    with pytest.raises(WeightsError, match=r"no 'data' group \(missing\), so not Caffe HDF5 weights "
                                           r"\(top-level entries: features\)"):
        tiny_net().load_weights(str(path))
    state = tmp_path / "s.solverstate.h5"
    state_hdf5.write_state(str(state), SolverState(iter=1, current_step=0, learned_net="x", history=[]))
    with pytest.raises(WeightsError, match="looks like a solver state"):
        tiny_net().load_weights(str(state))


def test_unwritable_names_refused_and_nothing_left(tmp_path):
    net = Net(TINY.replace('name: "ip"', 'name: "fc/ip"'), seed=0)
    with pytest.raises(WeightsError, match=r"layer 'fc/ip': this layer name cannot be an HDF5 group name"):
        net.save_weights(str(tmp_path / "w.caffemodel.h5"))
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = _write_tiny(tmp_path)
    before = path.read_bytes()

    def boom(t):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(H5, "as_array", boom)
    with pytest.raises(OSError, match="No space left"):
        tiny_net(8).save_weights(str(path))
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_without_h5py_one_clear_line(tmp_path, monkeypatch):
    path = _write_tiny(tmp_path)
    monkeypatch.setitem(sys.modules, "h5py", None)  # import h5py -> ImportError
    for call in (lambda: tiny_net().load_weights(str(path)),
                 lambda: tiny_net().save_weights(str(tmp_path / "x.caffemodel.h5"))):
        with pytest.raises(WeightsError) as ei:
            call()
        assert ei.value.one_line() == ("HDF5 weights need the 'h5py' package, which is not installed: "
                                       "pip install h5py")
    text = _solver_body(tmp_path, 'lr_policy: "fixed" snapshot_format: HDF5')
    with pytest.raises(SolverError, match="pip install h5py"):
        Solver(text)


# ---------------------------------------------------------------------- convert
def test_convert_caffemodel_h5_both_ways(tmp_path):
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    cm = tmp_path / "orig.caffemodel"
    tiny_net(4).save_weights(str(cm))
    h5 = tmp_path / "w.caffemodel.h5"
    r = run_cli("convert", cm, "-o", h5, "--model", proto)
    assert r.exit_code == 0, r.output
    back = tmp_path / "back.caffemodel"
    r = run_cli("convert", h5, "-o", back, "--model", proto)
    assert r.exit_code == 0, r.output
    assert back.read_bytes() == cm.read_bytes()
    st = tmp_path / "w.safetensors"
    assert run_cli("convert", h5, "-o", st, "--model", proto).exit_code == 0
    assert_same_state(W.read_state_file(str(st)), net_values(tiny_net(4)))
    r = run_cli("convert", h5, "-o", tmp_path / "x.safetensors")
    assert r.exit_code == 2 and "reading HDF5 (.h5) weights needs the net definition" in r.output
    r = run_cli("convert", cm, "-o", tmp_path / "x.caffemodel.h5")
    assert r.exit_code == 2 and "writing an HDF5 (.h5) weights file needs the net definition" in r.output


# ---------------------------------------------------------------------- pycaffe
def test_pycaffe_save_hdf5_load_hdf5(tmp_path):
    import caffe_compat.pycaffe as caffe

    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY)
    a = caffe.Net(str(proto), caffe.TEST)
    for name, blobs in a.params.items():
        for i, b in enumerate(blobs):
            b.data[...] = np.random.RandomState(len(name) + i).randn(*b.data.shape)
    out = tmp_path / "weights.any"  # save_hdf5 writes HDF5 whatever the name
    a.save_hdf5(str(out))
    assert h5py.is_hdf5(str(out))
    b = caffe.Net(str(proto), caffe.TEST)
    b.load_hdf5(str(out))
    for name in a.params:
        for x, y in zip(a.params[name], b.params[name]):
            assert np.array_equal(x.data, y.data), name
    # copy_from and the constructor read *.h5 as HDF5 (Caffe's CopyTrainedLayersFrom)
    h5 = tmp_path / "w.caffemodel.h5"
    h5.write_bytes(out.read_bytes())
    c = caffe.Net(str(proto), caffe.TEST)
    c.copy_from(str(h5))
    d = caffe.Net(str(proto), str(h5), caffe.TEST)
    for name in a.params:
        for x, y, z in zip(a.params[name], c.params[name], d.params[name]):
            assert np.array_equal(x.data, y.data) and np.array_equal(x.data, z.data), name


# ---------------------------------------------------------------------- solver snapshots
NET = """name: "hdf5net"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "bn1" type: "BatchNorm" bottom: "ip1" top: "ip1" }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" param { name: "w" }
  inner_product_param { num_output: 5 bias_term: false weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3" param { name: "w" }
  inner_product_param { num_output: 5 bias_term: false } }
layer { name: "ip4" type: "InnerProduct" bottom: "ip3" top: "ip4"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip4" bottom: "label" top: "loss" }
"""


def _solver_body(tmp_path, body: str) -> str:
    net = tmp_path / "net.prototxt"
    net.write_text(NET)
    return f'net: "{net}"\nsnapshot_prefix: "{tmp_path}/snap"\nrandom_seed: 3\n{body}\n'


def _feed(it: int) -> dict:
    rng = np.random.RandomState(it)
    return {"data": rng.randn(4, 6).astype(np.float32), "label": rng.randint(0, 3, 4).astype(np.float32)}


@pytest.mark.parametrize("body", [
    'type: "SGD" base_lr: 0.05 momentum: 0.9 weight_decay: 0.01 lr_policy: "multistep" '
    'stepvalue: 2 stepvalue: 4 gamma: 0.5',
    'type: "Adam" base_lr: 0.01 lr_policy: "fixed"',
])
def test_hdf5_snapshot_restore_continue_equals_uninterrupted(tmp_path, body):
    text = _solver_body(tmp_path, body + " snapshot_format: HDF5 max_iter: 6")
    a = Solver(text, feed=_feed)
    a.step(6)
    b = Solver(text, feed=_feed)
    b.step(3)
    model, state = b.snapshot()
    assert model == f"{tmp_path}/snap_iter_3.caffemodel.h5"
    assert state == f"{tmp_path}/snap_iter_3.solverstate.h5"
    b.step(1)  # move on: the restore must undo it
    with h5py.File(state, "r") as f:  # Caffe's layout
        assert sorted(f.keys()) == ["current_step", "history", "iter", "learned_net"]
        assert f["iter"].dtype == np.int32 and f["iter"].shape == (1,) and f["iter"][0] == 3
        assert f["current_step"].dtype == np.int32 and f["current_step"][0] == (1 if "SGD" in body else 0)
        t = f["learned_net"].id.get_type()
        assert f["learned_net"].shape == () and t.get_strpad() == h5py.h5t.STR_NULLTERM
        assert t.get_size() == len(model) + 1 and f["learned_net"][()] == model.encode()
        blocks = 2 if "Adam" in body else 1
        # Caffe's learnable_params_: ip1 w, b, bn1's three statistics, ip2 w (ip3 shares it), ip4 w, b
        assert sorted(f["history"].keys(), key=int) == [str(i) for i in range(8 * blocks)]
        shapes = [(5, 6), (5,), (5,), (5,), (1,), (5, 5), (3, 5), (3,)] * blocks
        assert [f["history"][str(i)].shape for i in range(8 * blocks)] == shapes
        assert not f["history"]["4"][()].any()  # a buffer's slot: zeros
    assert sorted(_datasets(model)) == sorted(
        ["data/data", "data/ip1/0", "data/ip1/1", "data/bn1/0", "data/bn1/1", "data/bn1/2",
         "data/relu1", "data/ip2/0", "data/ip3", "data/ip4/0", "data/ip4/1", "data/loss"])
    c = Solver(text, feed=_feed)
    c.restore(state)
    assert c.iter == 3
    c.step(3)
    pa, pc = _params(a.net), _params(c.net)
    for k in pa:
        assert np.array_equal(pa[k], pc[k]), k


def test_solve_writes_hdf5_snapshots_and_resumes(tmp_path, monkeypatch):
    body = 'type: "SGD" base_lr: 0.05 momentum: 0.9 lr_policy: "fixed" snapshot: 2 max_iter: 4 ' \
           'snapshot_format: HDF5'
    text = _solver_body(tmp_path, body)
    a = Solver(text, feed=_feed)
    a.solve()
    names = sorted(p for p in os.listdir(tmp_path) if p.startswith("snap"))
    assert names == ["snap_iter_2.caffemodel.h5", "snap_iter_2.solverstate.h5",
                     "snap_iter_4.caffemodel.h5", "snap_iter_4.solverstate.h5"]
    # a relative learned_net that the current directory cannot see is found next to the state
    monkeypatch.chdir(tmp_path)
    rel = Solver(text.replace(f'"{tmp_path}/snap"', '"snap"'), feed=_feed)
    rel.step(2)
    rel.snapshot()
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in ("snap_iter_2.caffemodel.h5", "snap_iter_2.solverstate.h5"):
        os.replace(tmp_path / n, moved / n)
    c = Solver(text, feed=_feed)
    c.solve(str(moved / "snap_iter_2.solverstate.h5"))
    pa, pc = _params(a.net), _params(c.net)
    for k in pa:
        assert np.array_equal(pa[k], pc[k]), k


def test_bad_hdf5_solver_states(tmp_path):
    text = _solver_body(tmp_path, 'type: "SGD" base_lr: 0.1 lr_policy: "fixed"')
    s = Solver(text, feed=_feed)
    bad = tmp_path / "bad.solverstate.h5"
    state_hdf5.write_state(str(bad), SolverState(iter=1, current_step=0, learned_net="",
                                                 history=[torch.zeros(2)]))
    with pytest.raises(SolverError, match=r"incorrect number of history blobs: the state has 1, a SGD "
                                          r"solver on this net needs 5 \(or 8 in Caffe's layout"):
        s.restore(str(bad))
    with h5py.File(bad, "a") as f:
        del f["current_step"]
    with pytest.raises(SolverError, match="no 'current_step' dataset"):
        s.restore(str(bad))
    junk = tmp_path / "junk.solverstate.h5"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(SolverError, match="not an HDF5 file, expected an HDF5 solver state"):
        s.restore(str(junk))
    weights = _write_tiny(tmp_path)
    with pytest.raises(SolverError, match="no 'iter' dataset"):
        s.restore(str(weights))
    with pytest.raises(SolverError, match="cannot read an HDF5 solver state"):
        s.restore(str(tmp_path / "missing.solverstate.h5"))


def test_frcnn_trainer_refuses_hdf5_plain_nets_get_it(tmp_path):
    from caffe_compat.frcnn.train import FrcnnSolver
    from caffe_compat.trainer import TrainSolver

    frcnn = tmp_path / "frcnn.prototxt"
    frcnn.write_text('layer { name: "input-data" type: "Python" top: "data" top: "im_info" top: "gt_boxes" '
                     'python_param { module: "roi_data_layer.layer" layer: "RoIDataLayer" '
                     'param_str: "\'num_classes\': 21" } }')
    body = _solver_body(tmp_path, 'base_lr: 0.1 lr_policy: "fixed" snapshot_format: HDF5')
    with pytest.raises(SolverError, match="snapshot_format: HDF5 is not supported by the Faster R-CNN "
                                          "trainer"):
        FrcnnSolver(body.replace(str(tmp_path / "net.prototxt"), str(frcnn)))
    s = TrainSolver(body, feed=_feed)   # a plain net: Caffe's HDF5 snapshots, as `caffe train`
    s.step(2)
    model, state = s.snapshot()
    assert model.endswith("_iter_2.caffemodel.h5") and state.endswith("_iter_2.solverstate.h5")
    assert s.snapshot_paths == [model]
    with h5py.File(state, "r") as f:
        assert int(np.asarray(f["iter"]).reshape(-1)[0]) == 2


# ---------------------------------------------------------------------- real Caffe reads ours
READBACK = ROOT / "tests" / "golden" / "hdf5" / "caffe_reads_ours.npz"


def test_caffe_restores_and_loads_our_hdf5_files(golden, tmp_path):
    """Real Caffe restored our .solverstate.h5 (history in its layout, learned_net) and
    continued like our uninterrupted run, and its load_hdf5 read our weights bit for bit
    (recorded by tests/golden/record_hdf5_readback.py with the Caffe oracle).  Today's
    writer must still write exactly the datasets Caffe read then."""
    k, steps = int(golden["state_iter"]), int(golden["steps"])
    rec = np.load(READBACK)
    b = _golden_solver(golden, tmp_path)
    b.step(k)
    b.snapshot()
    b.net.save_weights(str(tmp_path / "ours.caffemodel.h5"))
    for pattern in ("snap_iter_{k}.solverstate.h5", "snap_iter_{k}.caffemodel.h5", "ours.caffemodel.h5"):
        prefix = f"ours/{pattern}/"
        want = {key[len(prefix):]: rec[key] for key in rec.files if key.startswith(prefix)}
        got = {key: np.asarray(v) for key, v in _datasets(tmp_path / pattern.format(k=k)).items()
               if v is not None}
        assert want and sorted(got) == sorted(want), (pattern, sorted(got), sorted(want))
        for key, v in want.items():
            if v.dtype.kind == "S":  # learned_net: a path, written in another scratch folder
                assert os.path.basename(bytes(got[key])) == os.path.basename(bytes(v)), (pattern, key)
                continue
            assert got[key].dtype == v.dtype and np.array_equal(got[key], v), (pattern, key)
    assert int(rec["caffe/iter"]) == k
    ours_k = _params(b.net)
    for (ln, i), v in ours_k.items():
        assert np.array_equal(rec[f"caffe/loaded/{ln}/{i}"], v), (ln, i)
    a = _golden_solver(golden, tmp_path)
    a.step(steps)
    resumed = {(key.split("/")[2], int(key.split("/")[3])): rec[key] for key in rec.files
               if key.startswith("caffe/resumed/")}
    assert len(resumed) == len(ours_k)
    _assert_close(resumed, _params(a.net))


def test_errors_not_from_h5py_keep_their_own_message(tmp_path, monkeypatch):
    """Only h5py's failures mean a damaged file; e.g. a CUDA out-of-memory while copying must
    not be reported as 'corrupt HDF5 weights file'."""
    import caffe_compat.weights.hdf5 as H

    path = _write_tiny(tmp_path)

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(H, "load_layers_into", oom)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        tiny_net(1).load_weights(str(path))
