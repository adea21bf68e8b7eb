"""pycaffe compatibility: legacy `import caffe` scripts run unchanged on caffe-compat.

The scripts in tests/data/pycaffe_scripts/ are written against pycaffe (py-faster-rcnn's
test_net.py/demo.py style detection, Caffe's classification example, net surgery and
backward semantics, a solver loop fed through ``solver.net.blobs``, NetSpec).  Each writes
its results to the .npz named on its command line; real Caffe ran the very same files
(tests/golden/make_pycaffe.py -> tests/golden/pycaffe/*.npz) and here they run through
``caffe-compat run``.  The rest checks the API pieces the oracle cannot (image loading,
Detector, MemoryData, GPU mode, the runner's aliasing and real-Caffe guard) against
independent computations.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import caffe_compat.pycaffe as caffe
from caffe_compat.cli.main import main as cli
from caffe_compat.pycaffe import _mode
from caffe_compat.pycaffe.runner import RealCaffeFound, run_script
from conftest import GOLDEN as GOLDEN_DIR, ROOT

SCRIPTS = ROOT / "tests" / "data" / "pycaffe_scripts"
GOLDEN = GOLDEN_DIR / "pycaffe"
NAMES = sorted(p.stem for p in GOLDEN.glob("*.npz"))


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes: one intra-op thread is fastest (and immune to a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _cpu_mode():
    """CPU mode for every test; the global RNGs as they were (set_random_seed reseeds torch)."""
    rng, seeds = torch.get_rng_state(), _mode._seeds
    _mode.set_mode_cpu()
    yield
    _mode.set_mode_cpu()
    torch.set_rng_state(rng)
    _mode._seeds = seeds


def _tol(key: str) -> float:
    """Every value within 1e-5 of the array's largest magnitude."""
    return 1e-5


def compare_npz(golden: pathlib.Path, ours: pathlib.Path) -> None:
    with np.load(golden) as g, np.load(ours) as o:
        assert sorted(g.files) == sorted(o.files)
        bad = []
        for k in g.files:
            x, y = g[k], o[k]
            if x.dtype.kind in "US":
                if x.shape != y.shape or not (x == y).all():
                    bad.append(f"{k}: {x!r} != {y!r}")
                continue
            if x.dtype != y.dtype or x.shape != y.shape:
                bad.append(f"{k}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
                continue
            if x.size == 0:
                continue
            if x.dtype.kind in "iub":
                if not np.array_equal(x, y):
                    bad.append(f"{k}: {x} != {y}")
                continue
            scale = max(float(np.abs(x).max()), 1e-3)
            err = float(np.abs(x.astype(np.float64) - y.astype(np.float64)).max())
            if not err <= _tol(k) * scale:
                bad.append(f"{k}: max error {err:.3g} (scale {scale:.3g})")
        assert not bad, "\n".join(bad)


# ============================================================================ golden scripts
@pytest.mark.parametrize("name", NAMES)
def test_script_matches_caffe(name, tmp_path):
    """The same script, run by `caffe-compat run`, gives real Caffe's numbers."""
    out = tmp_path / f"{name}.npz"
    res = CliRunner().invoke(cli, ["run", "--shadow", str(SCRIPTS / f"{name}.py"), str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    compare_npz(GOLDEN / f"{name}.npz", out)


def test_every_script_has_a_golden():
    assert NAMES, "no golden files in tests/golden/pycaffe"
    assert sorted(p.stem for p in SCRIPTS.glob("*.py")) == NAMES


def test_golden_detects_a_wrong_result(tmp_path):
    """The comparison can fail: a perturbed copy of a golden file is refused."""
    src = GOLDEN / "solver_loop.npz"
    with np.load(src) as f:
        arrays = {k: f[k] for k in f.files}
    arrays["sgd/loss/4"] = arrays["sgd/loss/4"] * (1 + 1e-3)
    bad = tmp_path / "bad.npz"
    np.savez(bad, **arrays)
    with pytest.raises(AssertionError, match="sgd/loss/4"):
        compare_npz(src, bad)


# ============================================================================ runner
def _script(tmp_path, body: str, name="s.py") -> pathlib.Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def test_runner_aliases_and_main(tmp_path):
    out = tmp_path / "o.txt"
    s = _script(tmp_path, f"""
        import sys
        import caffe
        import caffe.io
        from caffe.proto import caffe_pb2
        import caffe.proto.caffe_pb2 as pb
        from caffe import layers as L, params as P
        from caffe.pycaffe import Net
        import caffe_compat.pycaffe
        assert caffe is caffe_compat.pycaffe and pb is caffe_pb2 and Net is caffe.Net
        assert caffe.io.Transformer and P.Pooling.MAX == caffe_pb2.PoolingParameter.MAX
        open({str(out)!r}, "w").write(__name__ + " " + " ".join(sys.argv[1:]) + " " + sys.argv[0])
    """)
    run_script(s, ["a", "--b"], shadow=True)
    assert out.read_text() == f"__main__ a --b {s}"
    assert "caffe" not in sys.modules and not any(k.startswith("caffe.") for k in sys.modules)


def test_runner_missing_submodule(tmp_path):
    s = _script(tmp_path, "import caffe.no_such_module\n")
    with pytest.raises(ModuleNotFoundError, match="caffe.no_such_module"):
        run_script(s, shadow=True)


def _fake_caffe(tmp_path) -> pathlib.Path:
    root = tmp_path / "realcaffe"
    (root / "caffe").mkdir(parents=True)
    (root / "caffe" / "__init__.py").write_text("REAL = True\n")
    return root


def test_runner_never_replaces_real_caffe_silently(tmp_path, monkeypatch):
    root = _fake_caffe(tmp_path)
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delenv("CAFFE_COMPAT_SHADOW", raising=False)
    out = tmp_path / "which.txt"
    s = _script(tmp_path, f"""
        import caffe
        open({str(out)!r}, "w").write(str(getattr(caffe, "REAL", False)))
    """)
    with pytest.raises(RealCaffeFound, match="--shadow"):
        run_script(s)
    run_script(s, shadow=True)
    assert out.read_text() == "False"
    run_script(s, shadow=False)
    assert out.read_text() == "True"
    sys.modules.pop("caffe", None)
    monkeypatch.setenv("CAFFE_COMPAT_SHADOW", "1")
    run_script(s)
    assert out.read_text() == "False"


def test_runner_guard_when_script_adds_real_caffe(tmp_path, monkeypatch):
    monkeypatch.delenv("CAFFE_COMPAT_SHADOW", raising=False)
    root = _fake_caffe(tmp_path)
    s = _script(tmp_path, f"""
        import sys
        sys.path.insert(0, {str(root)!r})
        import caffe
    """)
    with pytest.raises(ImportError, match="real Caffe"):
        run_script(s)


def test_cli_run_exit_codes(tmp_path, monkeypatch):
    runner = CliRunner()
    ok = _script(tmp_path, "import caffe\nprint('layers', len(caffe.layer_type_list()) > 50)\n", "ok.py")
    res = runner.invoke(cli, ["run", str(ok)])
    assert res.exit_code == 0 and "layers True" in res.output
    code = _script(tmp_path, "import sys\nsys.exit(3)\n", "code.py")
    assert runner.invoke(cli, ["run", str(code)]).exit_code == 3
    res = runner.invoke(cli, ["run", str(tmp_path / "missing.py")])
    assert res.exit_code == 2 and "script not found" in res.output
    monkeypatch.syspath_prepend(str(_fake_caffe(tmp_path)))
    res = runner.invoke(cli, ["run", str(ok)])
    assert res.exit_code == 2 and "real Caffe" in res.output
    res = runner.invoke(cli, ["run", "--shadow", str(ok), "--not-an-option-of-ours"])
    assert res.exit_code == 0, res.output


def test_python_dash_m(tmp_path):
    out = tmp_path / "o.txt"
    s = _script(tmp_path, f"""
        import sys, caffe
        from caffe.proto import caffe_pb2
        open({str(out)!r}, "w").write(str(caffe.TRAIN) + str(caffe_pb2.TEST) + sys.argv[1])
    """)
    env = dict(os.environ, CAFFE_COMPAT_SHADOW="1")
    r = subprocess.run([sys.executable, "-m", "caffe_compat.pycaffe", str(s), "X"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "TRAIN1X"


# ============================================================================ Net semantics
NET = """name: "t"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }
layer { name: "a" type: "Power" bottom: "ip" top: "a" power_param { scale: 2 } }
layer { name: "b" type: "Power" bottom: "ip" top: "b" power_param { shift: 1 } }
"""


@pytest.fixture
def net(tmp_path):
    p = tmp_path / "net.prototxt"
    p.write_text(NET)
    return caffe.Net(str(p), caffe.TEST)


def test_blob_arrays_are_live(net):
    data = net.blobs["data"].data
    a = net.blobs["a"].data            # held before the forward, as pycaffe users do
    data[...] = [[1, 2, 3], [-1, 0, 1]]
    w = net.params["ip"][0].data
    w[...] = [[1, 0, 0], [0, 1, 0]]
    net.params["ip"][1].data[...] = 0
    out = net.forward()
    ip = np.maximum(np.array([[1, 2], [-1, 0]], np.float32), 0)
    np.testing.assert_array_equal(a, 2 * ip)                  # the held array was updated
    np.testing.assert_array_equal(out["b"], ip + 1)
    assert out["a"] is not None and set(out) == {"a", "b"}
    w *= 3                                                    # weight surgery through a held array
    net.forward()
    np.testing.assert_array_equal(net.blobs["a"].data, 6 * ip)


def test_split_blobs_share_data(net):
    assert list(net.blobs) == ["data", "ip", "ip_relu_0_split_0", "ip_relu_0_split_1", "a", "b"]
    assert net._layer_names[3] == "ip_relu_0_split" and net.layers[3].type == "Split"
    net.blobs["data"].data[...] = 1
    net.forward()
    assert net.blobs["ip_relu_0_split_1"].data is net.blobs["ip"].data
    assert net._bottom_ids(4) == [2] and net._top_ids(1) == [1] and net._inputs == [0]
    assert [net._blob_names[i] for i in net._outputs] == ["a", "b"]


def test_backward_without_loss_is_a_no_op_unless_forced(net, tmp_path):
    net.blobs["data"].data[...] = 1
    net.forward()
    d = net.backward(a=np.ones((2, 2), np.float32), b=np.ones((2, 2), np.float32))
    assert not d["data"].any() and not net.params["ip"][0].diff.any()   # Caffe: nothing under a loss
    p = tmp_path / "forced.prototxt"
    p.write_text("force_backward: true\n" + NET)
    forced = caffe.Net(str(p), caffe.TEST)
    forced.params["ip"][0].data[...] = [[1, 0, 0], [0, -1, 0]]
    forced.params["ip"][1].data[...] = 0
    forced.forward(data=np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    d = forced.backward(a=np.ones((2, 2), np.float32), b=np.full((2, 2), 0.5, np.float32))
    # ip = relu(x W^T): column 0 active (x0 > 0), column 1 dead; d ip = 2 * 1 + 0.5
    np.testing.assert_allclose(d["data"], [[2.5, 0, 0], [2.5, 0, 0]])
    np.testing.assert_allclose(forced.params["ip"][0].diff, [[12.5, 17.5, 22.5], [0, 0, 0]])
    forced.backward(a=np.ones((2, 2), np.float32), b=np.full((2, 2), 0.5, np.float32))
    np.testing.assert_allclose(forced.params["ip"][0].diff, [[25, 35, 45], [0, 0, 0]])  # accumulates
    forced.clear_param_diffs()
    assert not forced.params["ip"][0].diff.any()


def test_backward_without_forward_runs_on_the_blobs(tmp_path):
    """Real pycaffe: ``net.backward()`` (python/caffe/pycaffe.py ``_Net_backward``) goes
    straight to ``Net::BackwardFromTo`` (src/caffe/net.cpp), which runs each layer's Backward
    on what the blobs hold, forward or not.  So the diffs are those of the blobs' current data
    and top diffs: the in-place ReLU reads the 'ip' blob (its own output), the split sums its
    tops' diffs, InnerProduct uses the data blob and its weights; no top data is computed."""
    p = tmp_path / "forced.prototxt"
    p.write_text("force_backward: true\n" + NET)
    n = caffe.Net(str(p), caffe.TEST)
    w = np.array([[1, 0, -1], [0.5, 2, 0]], np.float32)
    n.params["ip"][0].data[...] = w
    n.params["ip"][1].data[...] = 0
    x = np.array([[1, 2, 3], [-1, 0, 1]], np.float32)
    ip = np.array([[1, -2], [0.5, 3]], np.float32)          # what the ReLU left, not relu(x W^T)
    da = np.array([[1, 2], [3, 4]], np.float32)
    db = np.array([[0.5, -1], [2, 0]], np.float32)
    n.blobs["data"].data[...] = x
    n.blobs["ip"].data[...] = ip
    n.blobs["a"].diff[...] = da
    n.blobs["b"].diff[...] = db
    d = n.backward()
    g = (2 * da + db) * (ip > 0)                                # Power(scale 2), Power(shift 1), ReLU
    np.testing.assert_allclose(n.blobs["ip_relu_0_split_0"].diff, 2 * da)
    np.testing.assert_allclose(n.blobs["ip_relu_0_split_1"].diff, db)
    np.testing.assert_allclose(n.blobs["ip"].diff, g)
    np.testing.assert_allclose(d["data"], g @ w, rtol=1e-6)
    np.testing.assert_allclose(n.params["ip"][0].diff, g.T @ x, rtol=1e-6)
    np.testing.assert_allclose(n.params["ip"][1].diff, g.sum(0), rtol=1e-6)
    assert not n.blobs["a"].data.any() and not n.blobs["b"].data.any()
    np.testing.assert_array_equal(n.blobs["ip"].data, ip)   # backward changes no data


def test_in_place_on_a_shared_blob_is_refused_as_in_caffe(tmp_path):
    p = tmp_path / "bad.prototxt"
    p.write_text(NET.replace('layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }\n', "")
                 + 'layer { name: "relu" type: "ReLU" bottom: "ip" top: "ip" }\n')
    from caffe_compat.errors import GraphError

    with pytest.raises(GraphError, match="produced by multiple sources"):
        caffe.Net(str(p), caffe.TEST)


def test_host_copies_of_non_cpu_float32_params_are_uploaded(tmp_path):
    """The GPU path, exercised on the CPU with a float64 net: ``.data``/``.diff`` of a
    parameter that numpy cannot alias are host copies, written back before the next run."""
    p = tmp_path / "n.prototxt"
    p.write_text("force_backward: true\n" + NET)
    n = caffe.Net(str(p), caffe.TEST)
    n.core.to(torch.float64)
    w = n.params["ip"][0]
    w.data[...] = [[1, 0, 0], [0, 1, 0]]
    n.params["ip"][1].data[...] = 0
    assert not np.shares_memory(w.data, n.core.layer("ip").weight.detach().numpy())
    out = n.forward(data=np.array([[1, 2, 3], [4, 5, 6]], np.float32))
    np.testing.assert_array_equal(out["a"], [[2, 4], [8, 10]])
    n.backward(a=np.ones((2, 2), np.float32), b=np.zeros((2, 2), np.float32))
    np.testing.assert_allclose(w.diff, [[10, 14, 18], [10, 14, 18]])
    w.diff[...] = 0
    n.save(str(tmp_path / "w.caffemodel"))   # uploads first
    assert not n.core.layer("ip").weight.grad.any()


def test_set_roidb_supplies_the_minibatch_builder():
    from caffe_compat.insert_splits import Step
    from caffe_compat.pycaffe._net import LayerView
    from caffe_compat.frcnn.roidb import get_minibatch

    class Native:
        def set_roidb(self, roidb, get_minibatch, generator=None):
            self.got = (roidb, get_minibatch)

    native = Native()
    view = LayerView(Step("input-data", "Python", native, [], ["data"], [0.0]), caffe.BlobVec())
    view.set_roidb(["r"])
    assert native.got == (["r"], get_minibatch)
    view.extra = 1
    assert native.extra == 1 and view.extra == 1


def test_forward_argument_checks(net):
    with pytest.raises(Exception, match="Input blob arguments do not match net inputs"):
        net.forward(ip=np.zeros((2, 2)))
    with pytest.raises(Exception, match="Input is not batch sized"):
        net.forward(data=np.zeros((3, 3)))
    with pytest.raises(ValueError):
        net.forward(start="no-such-layer")
    with pytest.raises(RuntimeError, match="Could not open file"):
        caffe.Net("/nonexistent.prototxt", caffe.TEST)
    with pytest.raises(TypeError):
        caffe.Net(__file__, caffe.TEST, 0, None, None, "extra")


def test_blob_reshape_keeps_memory_within_capacity():
    from caffe_compat.pycaffe._blobs import NetBlob

    b = NetBlob((2, 3))
    b.data[...] = np.arange(6).reshape(2, 3)
    b.reshape(3, 2)
    np.testing.assert_array_equal(b.data.ravel(), np.arange(6))
    b.reshape(4)
    np.testing.assert_array_equal(b.data, [0, 1, 2, 3])
    b.reshape(2, 3)                      # within capacity: Caffe keeps the memory
    np.testing.assert_array_equal(b.data.ravel(), np.arange(6))
    b.reshape(7)                         # beyond: fresh zeros
    assert b.count == 7 and not b.data.any() and b.num == 7 and b.channels == 1
    assert b.diff.shape == (7,)


def test_param_blob_properties(net):
    w = net.params["ip"][0]
    assert w.shape == (2, 3) and w.count == 6 and (w.num, w.channels, w.height, w.width) == (2, 3, 1, 1)
    assert np.shares_memory(w.data, net.core.layer("ip").weight.detach().numpy())
    with pytest.raises(ValueError, match="net surgery"):
        w.reshape(3, 2)
    assert isinstance(net.layers[1].blobs, caffe.BlobVec) and net.layer_dict["ip"].type == "InnerProduct"


def test_forward_all_and_forward_backward_all(tmp_path):
    p = tmp_path / "n.prototxt"
    p.write_text("force_backward: true\n" + NET.replace("dim: 2 dim: 3", "dim: 4 dim: 3"))
    n = caffe.Net(str(p), caffe.TEST)
    rng = np.random.RandomState(0)
    x = rng.randn(10, 3).astype(np.float32)
    outs = n.forward_all(data=x)
    ref = np.concatenate([n.forward(data=np.concatenate([x, np.zeros((2, 3))])[i:i + 4])["a"].copy()
                          for i in (0, 4, 8)])[:10]
    assert outs["a"].shape == (10, 2)
    np.testing.assert_allclose(outs["a"], ref, rtol=1e-6)
    o, d = n.forward_backward_all(data=x, a=np.ones((10, 2), np.float32), b=np.ones((10, 2), np.float32))
    assert o["b"].shape == (10, 2) and d["data"].shape == (10, 3)


def test_memory_data_set_input_arrays(tmp_path):
    p = tmp_path / "m.prototxt"
    p.write_text("""layer { name: "md" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 1 width: 2 } }
    layer { name: "s" type: "Power" bottom: "data" top: "s" }
    layer { name: "l" type: "Power" bottom: "label" top: "l" }""")
    n = caffe.Net(str(p), caffe.TEST)
    with pytest.raises(RuntimeError, match="set_input_arrays"):
        n.forward()
    data = np.arange(8, dtype=np.float32).reshape(4, 1, 1, 2)
    labels = np.array([10, 11, 12, 13], np.float32)
    with pytest.raises(RuntimeError, match="float32"):
        n.set_input_arrays(data.astype(np.float64), labels)
    with pytest.raises(RuntimeError, match="multiple of batch size"):
        n.set_input_arrays(data[:3], labels[:3])
    n.set_input_arrays(data, labels)
    seen = [n.forward()["l"].tolist() for _ in range(3)]
    assert seen == [[10, 11], [12, 13], [10, 11]]
    np.testing.assert_array_equal(n.blobs["data"].data.ravel(), [0, 1, 2, 3])


def test_python_layer_view_delegates(tmp_path, monkeypatch):
    """``net.layers[i]`` of a Python layer reaches the user's object (py-faster-rcnn calls
    ``net.layers[0].set_roidb(...)``); its ``blobs`` are the net's parameters."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    q = tmp_path / "py2.prototxt"
    q.write_text("""layer { name: "data" type: "Input" top: "f" top: "i"
      input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } shape { dim: 1 dim: 3 } } }
    layer { name: "py" type: "Python" bottom: "f" bottom: "i" top: "rois"
      python_param { module: "frcnn_style" layer: "ToyProposalLayer" param_str: "{'feat_stride': 2, 'num': 3}" } }""")
    n = caffe.Net(str(q), caffe.TEST)
    layer = n.layer_dict["py"]
    assert layer.type == "Python" and layer._feat_stride == 2 and len(layer.blobs) == 0
    layer._num = 2
    n.blobs["f"].data[...] = np.arange(32).reshape(1, 2, 4, 4)
    n.blobs["i"].data[...] = [[8, 8, 1]]
    assert n.forward()["rois"].shape == (2, 5)


# ============================================================================ solver API
SOLVER_NET = """name: "m"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 2 dim: 3 } shape { dim: 2 } } }
layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param { num_output: 2 } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_solver_class_decides_type_and_update_is_left_in_diff(tmp_path):
    (tmp_path / "n.prototxt").write_text(SOLVER_NET)
    sp = tmp_path / "s.prototxt"
    sp.write_text(f'net: "{tmp_path / "n.prototxt"}"\ntype: "Adam"\nbase_lr: 0.5\nmomentum: 0.9\n'
                  'lr_policy: "fixed"\nmax_iter: 10\n')
    s = caffe.SGDSolver(str(sp))
    assert s.type == "SGD" and type(caffe.get_solver(str(sp))).__name__ == "AdamSolver"
    s.net.params["ip"][0].data[...] = [[1, 0, 0], [0, 1, 0]]
    s.net.params["ip"][1].data[...] = 0
    s.net.blobs["data"].data[...] = [[1, 2, 3], [3, 2, 1]]
    s.net.blobs["label"].data[...] = [0, 1]
    before = s.net.params["ip"][0].data.copy()
    s.step(1)
    assert s.iter == 1
    # SGD, first step: the update is lr * gradient, and Caffe leaves it in the diff
    np.testing.assert_allclose(before - s.net.params["ip"][0].data, s.net.params["ip"][0].diff, rtol=1e-6)
    assert np.abs(s.net.params["ip"][0].diff).max() > 0
    assert float(s.net.blobs["loss"].data) > 0
    assert s.param.base_lr == pytest.approx(0.5)


# ============================================================================ caffe.io
def test_load_image(tmp_path):
    import cv2

    rng = np.random.RandomState(1)
    bgr = rng.randint(0, 256, size=(5, 7, 3)).astype(np.uint8)
    path = str(tmp_path / "im.png")
    cv2.imwrite(path, bgr)
    im = caffe.io.load_image(path)
    assert im.dtype == np.float32 and im.shape == (5, 7, 3)
    np.testing.assert_allclose(im, bgr[:, :, ::-1] / 255.0, rtol=1e-6)
    grey = caffe.io.load_image(path, color=False)
    rgb = bgr[:, :, ::-1] / 255.0
    np.testing.assert_allclose(grey[:, :, 0], rgb @ [0.2125, 0.7154, 0.0721], rtol=1e-5)
    assert grey.shape == (5, 7, 1)
    g = rng.randint(0, 256, size=(4, 4)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), g)
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "g.png")), np.repeat(g[:, :, None], 3, 2) / 255.,
                               rtol=1e-6)
    rgba = np.dstack([bgr, np.full((5, 7), 9, np.uint8)])
    cv2.imwrite(str(tmp_path / "a.png"), rgba)
    np.testing.assert_allclose(caffe.io.load_image(str(tmp_path / "a.png")), im)
    with pytest.raises(IOError):
        caffe.io.load_image(str(tmp_path / "missing.png"))


def test_resize_image():
    ramp = np.array([[0.0, 1.0]], np.float32).reshape(1, 2, 1)
    up = caffe.io.resize_image(ramp, (1, 4))
    # pixel-centre aligned bilinear (skimage's mapping), edges replicated
    np.testing.assert_allclose(up[0, :, 0], [0, 0.25, 0.75, 1], atol=1e-6)
    im = np.random.RandomState(0).rand(3, 4, 3).astype(np.float32) * 7 - 2
    np.testing.assert_array_equal(caffe.io.resize_image(im, (3, 4)), im)
    const = np.full((2, 2, 3), 5.0)
    np.testing.assert_array_equal(caffe.io.resize_image(const, (3, 3)), np.full((3, 3, 3), 5.0))
    many = np.random.RandomState(1).rand(4, 4, 5)
    assert caffe.io.resize_image(many, (2, 6)).shape == (2, 6, 5)
    assert caffe.io.resize_image(im, (5, 5), interp_order=0).dtype == np.float32


def test_transformer_errors():
    t = caffe.io.Transformer({"data": (1, 3, 4, 4)})
    with pytest.raises(Exception, match="not one of the net inputs"):
        t.set_raw_scale("x", 1)
    with pytest.raises(ValueError, match="Mean channels"):
        t.set_mean("data", np.zeros(2))
    with pytest.raises(Exception, match="Channel swap"):
        t.set_channel_swap("data", (1, 0))
    t.set_mean("data", np.arange(12.0).reshape(3, 2, 2))   # a mean of another size is resized
    assert t.mean["data"].shape == (3, 4, 4)


def test_detector_windows(tmp_path):
    import cv2

    (tmp_path / "d.prototxt").write_text("""layer { name: "data" type: "Input" top: "data"
      input_param { shape { dim: 2 dim: 3 dim: 6 dim: 6 } } }
    layer { name: "fc" type: "InnerProduct" bottom: "data" top: "fc" inner_product_param { num_output: 3 } }
    layer { name: "prob" type: "Softmax" bottom: "fc" top: "prob" }""")
    init = caffe.Net(str(tmp_path / "d.prototxt"), caffe.TEST)
    init.params["fc"][0].data[...] = np.random.RandomState(0).randn(3, 108) * 0.002
    init.save(str(tmp_path / "d.caffemodel"))
    img = np.random.RandomState(1).randint(0, 256, size=(12, 10, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "im.png"), img)
    det = caffe.Detector(str(tmp_path / "d.prototxt"), str(tmp_path / "d.caffemodel"), raw_scale=255,
                         channel_swap=(2, 1, 0), mean=np.array([100.0, 110.0, 120.0]))
    windows = [np.array([0, 0, 6, 6]), np.array([3, 2, 9, 8]), np.array([6, 4, 12, 10])]
    dets = det.detect_windows([(str(tmp_path / "im.png"), windows)])
    assert [d["filename"] for d in dets] == [str(tmp_path / "im.png")] * 3
    im = caffe.io.load_image(str(tmp_path / "im.png"))
    for d, w in zip(dets, windows):
        crop = im[w[0]:w[2], w[1]:w[3]]
        x = (crop.transpose(2, 0, 1)[[2, 1, 0]] * 255 - np.array([100, 110, 120.])[:, None, None]).ravel()
        logits = init.params["fc"][0].data @ x + init.params["fc"][1].data
        ref = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        np.testing.assert_allclose(d["prediction"], ref, rtol=1e-4, atol=1e-7)
    padded = caffe.Detector(str(tmp_path / "d.prototxt"), str(tmp_path / "d.caffemodel"), context_pad=1)
    crop = padded.crop(im, np.array([2, 2, 8, 8]))
    assert crop.shape == (6, 6, 3)


# ============================================================================ modes
def test_set_mode_gpu_without_cuda_warns_and_runs_on_cpu(net):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _mode._state["warned"] = False
    caffe.set_mode_gpu()
    with pytest.warns(RuntimeWarning, match="no CUDA"):
        net.forward()
    assert net.core.device.type == "cpu"


def test_set_random_seed_makes_fillers_reproducible(tmp_path):
    p = tmp_path / "f.prototxt"
    p.write_text(NET.replace("num_output: 2 }", "num_output: 2 weight_filler { type: 'gaussian' } }"))
    caffe.set_random_seed(5)
    a = caffe.Net(str(p), caffe.TEST).params["ip"][0].data.copy()
    b = caffe.Net(str(p), caffe.TEST).params["ip"][0].data.copy()
    caffe.set_random_seed(5)
    c = caffe.Net(str(p), caffe.TEST).params["ip"][0].data.copy()
    assert np.array_equal(a, c) and not np.array_equal(a, b)


@pytest.mark.gpu
def test_gpu_mode_matches_cpu(tmp_path):
    """GPU mode: the same script steps on CUDA give the CPU's numbers; edits of host copies
    of device weights reach the device before the next run."""
    p = tmp_path / "n.prototxt"
    p.write_text("force_backward: true\n" + NET)
    rng = np.random.RandomState(0)
    w = rng.randn(2, 3).astype(np.float32)
    x = rng.randn(2, 3).astype(np.float32)
    results = []
    for mode in ("cpu", "gpu"):
        getattr(caffe, f"set_mode_{mode}")()
        n = caffe.Net(str(p), caffe.TEST)
        n.params["ip"][0].data[...] = w
        n.params["ip"][1].data[...] = 0.5
        out = n.forward(data=x)
        if mode == "gpu":
            assert n.core.device.type == "cuda"
        d = n.backward(a=np.ones((2, 2), np.float32), b=np.ones((2, 2), np.float32))
        results.append((out["a"].copy(), d["data"].copy(), n.params["ip"][0].diff.copy()))
    for c, g in zip(*results):
        np.testing.assert_allclose(g, c, rtol=1e-5, atol=1e-6)


def test_process_functions_of_a_build_without_nccl(capsys):
    import caffe_compat.pycaffe as caffe

    assert caffe.has_nccl() is False
    with pytest.raises(RuntimeError, match="not available in caffe-compat"):
        caffe.NCCL(None, b"")
    caffe.set_solver_count(1)
    caffe.set_solver_rank(0)
    caffe.set_multiprocess(False)
    assert (caffe.solver_count(), caffe.solver_rank()) == (1, 0)
    t = caffe.Timer()
    t.start()
    assert t.ms >= 0
    t.stop()
    stopped = t.ms
    assert stopped >= 0 and t.ms == stopped  # frozen once stopped
    import logging

    lg = logging.getLogger("caffe_compat")
    handlers, level = list(lg.handlers), lg.level
    try:
        caffe.init_log(0, True)
        caffe.log("hello from a pycaffe script")
        assert "hello from a pycaffe script" in capsys.readouterr().err
        caffe.init_log(1)   # WARNING and above only
        caffe.log("quiet now")
        assert "quiet now" not in capsys.readouterr().err
    finally:
        lg.handlers[:] = handlers
        lg.setLevel(level)
