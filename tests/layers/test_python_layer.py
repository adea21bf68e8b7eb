"""The ``type: "Python"`` shim: pycaffe's protocol around legacy numpy layers.

The layers under test live in tests/data/pylayers/cc_pylayers.py (not registered
natively).  Their numbers are checked against numpy, and against real Caffe running the
same module (tests/golden/python/*.npz, made by tests/golden/make_python.py).
"""
from __future__ import annotations

import pathlib
import sys
import textwrap

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat import Net
from caffe_compat.errors import PythonLayerError
from caffe_compat.layers import registry
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.python import ENV_ALLOW, PythonLayer, caffe_alias, python_layer_note
from caffe_compat.protos import caffe_pb2
from caffe_compat.pycaffe import TEST, TRAIN, Blob, Layer, Phase
from conftest import GOLDEN as GOLDEN_DIR, ROOT

PYLAYERS = ROOT / "tests" / "data" / "pylayers"
GOLDEN = sorted((GOLDEN_DIR / "python").glob("*.npz"))


@pytest.fixture(autouse=True)
def pylayers_path(monkeypatch):
    monkeypatch.syspath_prepend(str(PYLAYERS))
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    yield


def py_param(layer: str, bottoms=("x",), tops=("y",), param_str: str = "", module="cc_pylayers",
             name="py") -> caffe_pb2.LayerParameter:
    p = caffe_pb2.LayerParameter(name=name, type="Python")
    p.bottom.extend(bottoms)
    p.top.extend(tops)
    p.python_param.module = module
    p.python_param.layer = layer
    if param_str:
        p.python_param.param_str = param_str
    return p


def build(layer: str, shapes, *, phase="TEST", **kw) -> PythonLayer:
    ctx = BuildContext(phase=phase, allow_python_layers=True)
    cls = registry.resolve(py_param(layer, **kw))
    assert cls is PythonLayer
    return cls(py_param(layer, **kw), [tuple(s) for s in shapes], ctx)


# ============================================================================ permission
def test_refused_without_permission():
    sys.modules.pop("cc_refused_probe", None)
    p = py_param("AffineLayer", module="cc_refused_probe", name="affine1")
    with pytest.raises(PythonLayerError) as ei:
        PythonLayer(p, [(2, 3)], BuildContext(allow_python_layers=False))
    msg = str(ei.value)
    assert "layer 'affine1'" in msg and "'cc_refused_probe.AffineLayer'" in msg
    assert "allow_python_layers=True" in msg and f"{ENV_ALLOW}=1" in msg
    assert "cc_refused_probe" not in sys.modules  # refused before importing anything


def test_allowed_by_environment(monkeypatch):
    monkeypatch.setenv(ENV_ALLOW, "1")
    layer = PythonLayer(py_param("AffineLayer"), [(2, 3)], BuildContext(allow_python_layers=False))
    assert layer.infer_top_shapes([(2, 3)]) == [(2, 3)]
    monkeypatch.setenv(ENV_ALLOW, "0")
    with pytest.raises(PythonLayerError, match="not allowed"):
        PythonLayer(py_param("AffineLayer"), [(2, 3)], BuildContext(allow_python_layers=False))


# ============================================================================ numbers
def test_affine_forward_backward():
    layer = build("AffineLayer", [(2, 3, 4)], param_str="{'a': 2.0, 'b': 1.0}")
    assert layer.infer_top_shapes([(2, 3, 4)]) == [(2, 3, 4)]
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(2, 3, 4).astype(np.float32)).requires_grad_(True)
    (y,) = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), 2.0 * x.detach().numpy() + 1.0, rtol=1e-6)
    g = rng.randn(2, 3, 4).astype(np.float32)
    y.backward(torch.from_numpy(g))
    np.testing.assert_allclose(x.grad.numpy(), 2.0 * g, rtol=1e-6)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 4)


def test_affine_new_batch_size_runs_reshape():
    layer = build("AffineLayer", [(2, 3)], param_str="{'a': -1.0, 'b': 0.5}")
    (y,) = layer(torch.ones(5, 3))
    assert y.shape == (5, 3) and torch.all(y == -0.5)
    assert layer.infer_top_shapes([(7, 1)]) == [(7, 1)]


def test_euclidean_loss_with_propagate_down():
    layer = build("EuclideanLossLayer", [(3, 4), (3, 4)], bottoms=("p", "t"), tops=("loss",))
    assert layer.infer_top_shapes([(3, 4), (3, 4)]) == [(1,)]
    rng = np.random.RandomState(1)
    p = rng.randn(3, 4).astype(np.float32)
    t = rng.randn(3, 4).astype(np.float32)
    pt = torch.from_numpy(p).requires_grad_(True)
    tt = torch.from_numpy(t).requires_grad_(True)
    (loss,) = layer(pt, tt)
    np.testing.assert_allclose(loss.item(), ((p - t) ** 2).sum() / 3 / 2, rtol=1e-6)
    weight = 0.25  # a loss weight arrives as the top's diff
    gp, gt = torch.autograd.grad(loss.sum() * weight, (pt, tt))
    np.testing.assert_allclose(gp.numpy(), weight * (p - t) / 3, rtol=1e-5)
    np.testing.assert_allclose(gt.numpy(), -weight * (p - t) / 3, rtol=1e-5)
    # target not requiring grad: propagate_down [True, False]; its diff is not asked for
    seen = {}
    orig = layer.impl.backward

    def spy(top, propagate_down, bottom):
        seen["pd"] = list(propagate_down)
        return orig(top, propagate_down, bottom)

    layer.impl.backward = spy
    (loss2,) = layer(pt, torch.from_numpy(t))
    (gp2,) = torch.autograd.grad(loss2.sum(), (pt,))
    assert seen["pd"] == [True, False]
    np.testing.assert_allclose(gp2.numpy(), (p - t) / 3, rtol=1e-5)


def test_learnable_blob_and_gradcheck():
    layer = build("ChannelScaleLayer", [(2, 3, 4)])
    (w,) = layer.caffe_blobs()
    assert isinstance(w, torch.nn.Parameter) and w.shape == (3,) and torch.all(w == 1)
    assert layer.blob_names == ["blob0"]
    with torch.no_grad():
        w.copy_(torch.tensor([0.5, -2.0, 3.0]))
    rng = np.random.RandomState(2)
    x = rng.randn(2, 3, 4).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    wn = np.array([0.5, -2.0, 3.0], np.float32)[None, :, None]
    np.testing.assert_allclose(y.detach().numpy(), x * wn, rtol=1e-6)
    g = rng.randn(2, 3, 4).astype(np.float32)
    gx, gw = torch.autograd.grad(y, (xt, w), torch.from_numpy(g))
    np.testing.assert_allclose(gx.numpy(), g * wn, rtol=1e-6)
    np.testing.assert_allclose(gw.numpy(), (g * x).sum(axis=(0, 2)), rtol=1e-5)
    # float64 end to end (the arrays follow the net's dtype) and a numerical gradcheck
    layer.to(torch.float64)
    x64 = torch.from_numpy(x.astype(np.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: layer(a)[0], (x64,))
    w64 = layer.caffe_blobs()[0]
    assert torch.autograd.gradcheck(lambda a, b: _with_weight(layer, b, a), (x64, w64.detach().clone().requires_grad_(True)))


def _with_weight(layer, w, x):
    return torch.func.functional_call(layer, {"blob0": w}, (x,))[0]


def test_parameter_update_is_seen_by_the_layer():
    layer = build("ChannelScaleLayer", [(1, 2, 1)])
    with torch.no_grad():
        layer.blob0.mul_(3.0)
    (y,) = layer(torch.ones(1, 2, 1))
    assert y.flatten().tolist() == [3.0, 3.0]


def test_data_dependent_top_shape():
    layer = build("PositiveLayer", [(2, 5)])
    assert layer.infer_top_shapes([(2, 5)]) == [(0,)]  # zeros at build: nothing positive
    x = torch.tensor([[1.0, -2.0, 3.0, 0.0, 5.0], [-1.0, 2.0, -3.0, 4.0, 0.0]], requires_grad=True)
    (y,) = layer(x)
    assert y.tolist() == [1.0, 3.0, 5.0, 2.0, 4.0]
    y.backward(torch.arange(1.0, 6.0))
    assert x.grad.tolist() == [[1.0, 0.0, 2.0, 0.0, 3.0], [0.0, 4.0, 0.0, 5.0, 0.0]]
    (y2,) = layer(-torch.ones(2, 5))  # reshape runs again before every forward
    assert y2.shape == (0,)


@pytest.mark.parametrize("phase,expect", [("TRAIN", [1.0, 1.0, 7.0]), ("TEST", [2.0, 2.0, 7.0])])
def test_phase_and_param_str_underscore(phase, expect):
    layer = build("PhaseLayer", [], bottoms=(), tops=("flags",), phase=phase, param_str="{'k': 7}")
    assert str(layer.impl.phase) == phase and layer.impl.cfg_key == phase
    assert layer.impl.phase == (0 if phase == "TRAIN" else 1)
    assert layer.impl.param_str == layer.impl.param_str_ == "{'k': 7}"
    assert layer.infer_top_shapes([]) == [(3,)]
    (y,) = layer()
    assert y.tolist() == expect and y.dtype == torch.float32


def test_data_layer_dtype_follows_the_module():
    layer = build("YamlDataLayer", [], bottoms=(), tops=("d",),
                  param_str="shape: [2, 3]\nvalue: 1.5")
    assert layer.infer_top_shapes([]) == [(2, 3)]
    (a,) = layer()
    (b,) = layer()
    assert torch.all(a == 1.5) and torch.all(b == 3.0)  # the layer's own state persists
    layer.to(torch.float64)
    (c,) = layer()
    assert c.dtype == torch.float64 and torch.all(c == 4.5)


def test_in_place_top_is_the_bottom_blob():
    layer = build("InPlaceDoubleLayer", [(2, 2)], bottoms=("x",), tops=("x",))
    assert layer._tops[0] is layer._bottoms[0]
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    (y,) = layer(x)
    assert y.tolist() == [[2.0, 4.0], [6.0, 8.0]]
    assert x.tolist() == [[1.0, 2.0], [3.0, 4.0]]  # the torch bottom is untouched
    y.backward(torch.ones(2, 2))
    assert x.grad.tolist() == [[2.0, 2.0], [2.0, 2.0]]


# ============================================================================ errors
def test_user_exception_keeps_its_type():
    """Caffe's PythonLayer calls ``self_.attr("setup")(bottom, top)`` through boost::python
    (include/caffe/layers/python_layer.hpp): the Python exception stays set and reaches the
    caller as it was raised.  Here it is the same exception object, with a PEP 678 note."""
    with pytest.raises(ValueError) as ei:
        build("FailingLayer", [(1,)], param_str="oops")
    assert type(ei.value) is ValueError and str(ei.value) == "bad param_str: 'oops'"
    assert ei.value.__notes__ == ["in Python layer 'py' (cc_pylayers.FailingLayer.setup)"]


def test_missing_module_and_class():
    with pytest.raises(PythonLayerError, match="cannot import Python layer module 'cc_no_such_mod'"):
        build("X", [(1,)], module="cc_no_such_mod")
    with pytest.raises(PythonLayerError, match="no layer class 'Nope'.*AffineLayer"):
        build("Nope", [(1,)])


def test_native_python_layers_bypass_the_shim():
    from caffe_compat.layers.base import Layer as NativeLayer

    @registry.register_python("cc_pylayers.NativeProbe")
    class NativeProbe(NativeLayer):
        def forward(self, x):
            return (x,)

    try:
        assert registry.resolve(py_param("NativeProbe")) is NativeProbe
    finally:
        registry._PYTHON.pop("cc_pylayers.NativeProbe", None)


# ============================================================================ the caffe alias
def test_import_caffe_resolves_to_pycaffe_only_while_running():
    assert "caffe" not in sys.modules
    layer = build("LazyImportLayer", [(1, 2)])
    assert sys.modules["cc_pylayers"].CAFFE_MODULE == "caffe_compat.pycaffe"
    assert "caffe" not in sys.modules and "caffe.proto" not in sys.modules
    (y,) = layer(torch.zeros(1, 2))  # 'import caffe' inside forward works too
    assert y.tolist() == [[1.0, 1.0]]
    assert "caffe" not in sys.modules
    with caffe_alias() as c:
        import caffe
        import caffe.proto.caffe_pb2 as pb
        from caffe.proto import caffe_pb2 as pb2

        assert caffe is c and c.Layer is Layer and pb is pb2 is caffe_pb2
    assert "caffe" not in sys.modules


def test_real_caffe_already_imported_is_left_alone(tmp_path, monkeypatch):
    import types

    fake = types.ModuleType("caffe")

    class ForeignLayer:  # stands in for Boost.Python's caffe.Layer
        def __init__(self, *a):
            raise TypeError("cannot construct from Python")

    ForeignLayer.__module__ = "caffe._caffe"
    fake.Layer = ForeignLayer
    monkeypatch.setitem(sys.modules, "caffe", fake)
    (tmp_path / "cc_foreign_mod.py").write_text(textwrap.dedent("""
        import caffe
        SEEN = caffe
        class Base(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(*bottom[0].data.shape)
        class Plus(Base):
            def __init__(self, param):  # calls the Boost base: skipped when adapted
                caffe.Layer.__init__(self, param)
            def forward(self, bottom, top):
                top[0].data[...] = bottom[0].data + 1
            def backward(self, top, propagate_down, bottom):
                bottom[0].diff[...] = top[0].diff
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    layer = build("Plus", [(2,)], module="cc_foreign_mod")
    assert sys.modules["cc_foreign_mod"].SEEN is fake and sys.modules["caffe"] is fake
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    (y,) = layer(x)
    y.sum().backward()
    assert y.tolist() == [2.0, 3.0] and x.grad.tolist() == [1.0, 1.0]
    sys.modules.pop("cc_foreign_mod", None)


def test_module_found_next_to_the_prototxt(tmp_path):
    (tmp_path / "cc_beside_prototxt.py").write_text(textwrap.dedent("""
        import caffe
        class Neg(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top):
                top[0].data[...] = -bottom[0].data
    """))
    ctx = BuildContext(allow_python_layers=True, source_dir=str(tmp_path))
    p = py_param("Neg", module="cc_beside_prototxt")
    try:
        layer = PythonLayer(p, [(3,)], ctx)
        assert layer(torch.ones(3))[0].tolist() == [-1.0, -1.0, -1.0]
    finally:
        sys.modules.pop("cc_beside_prototxt", None)
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))


# ============================================================================ pycaffe core
def test_blob_api():
    b = Blob(2, 3, 4)
    assert b.shape == (2, 3, 4) and b.count == 24 and b.data.dtype == np.float32
    assert (b.num, b.channels, b.height, b.width) == (2, 3, 4, 1)
    b.data[...] = np.arange(24).reshape(2, 3, 4)
    b.reshape(6, 4)  # same count: contents kept
    assert b.data[5, 3] == 23 and b.diff.shape == (6, 4)
    b.reshape(5)
    assert b.count == 5 and not b.data.any()
    with pytest.raises(AttributeError):
        b.data = np.zeros(5)  # pycaffe's data is read-only; write into it instead
    with pytest.raises(ValueError):
        Blob(1, 1, 1, 1, 1).num
    assert Blob().count == 1 and Blob(0).count == 0


def test_phase_values():
    assert TRAIN == 0 and TEST == 1 and str(TRAIN) == "TRAIN" and f"{TEST}" == "TEST"
    assert Phase.of("test") is not None and Phase.of("test") == TEST and Phase.of(0) == TRAIN
    assert caffe_pb2.TRAIN == TRAIN and {0: "a"}[TRAIN] == "a"
    with pytest.raises(ValueError):
        Phase(2)


def test_layer_base_class_defaults():
    class NoInit(Layer):
        def __init__(self, param):  # a user __init__ that skips the base one
            self.p = param

    layer = NoInit(None)
    layer.blobs.add_blob(2, 2)
    assert layer.blobs[0].shape == (2, 2) and layer.type == "Python"


# ============================================================================ oracle goldens
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_matches_real_caffe_layerwise(path):
    """Replay the golden net layer by layer (independent of the Net builder)."""
    g = np.load(str(path), allow_pickle=False)
    net = text_format.Parse(str(g["prototxt"]), caffe_pb2.NetParameter())
    phase = "TRAIN" if int(g["phase"]) == 0 else "TEST"
    ctx = BuildContext(phase=phase, allow_python_layers=True)
    blobs = {}
    leaves = {}
    for k in g.files:
        if k.startswith("input/"):
            t = torch.from_numpy(g[k]).requires_grad_(True)
            blobs[k[6:]] = leaves[k[6:]] = t
    params = {}
    for lp in net.layer:
        if lp.type == "Input":
            continue
        shapes = [tuple(blobs[b].shape) for b in lp.bottom]
        layer = registry.resolve(lp)(lp, shapes, ctx)
        with torch.no_grad():
            for i, p in enumerate(layer.caffe_blobs()):
                p.copy_(torch.from_numpy(g[f"param/{lp.name}/{i}"]).reshape(p.shape))
                params[f"param_diff/{lp.name}/{i}"] = p
        outs = layer(*[blobs[b] for b in lp.bottom])
        for t, o in zip(lp.top, outs):
            blobs[t] = o
    for k in g.files:
        if k.startswith("blob/"):
            if "_split_" in k and k[5:] not in blobs:
                continue  # Caffe's split layers: copies of the blob they split
            np.testing.assert_allclose(blobs[k[5:]].detach().numpy(), g[k], rtol=1e-5, atol=1e-6,
                                       err_msg=k)
    tops = [k[9:] for k in g.files if k.startswith("top_diff/")]
    outs = [blobs[t] for t in tops]
    diffs = [torch.from_numpy(g[f"top_diff/{t}"]).reshape(blobs[t].shape) for t in tops]
    wrt_keys = [k for k in g.files if k.startswith("diff/")] + sorted(params)
    wrt = [leaves[k[5:]] if k.startswith("diff/") else params[k] for k in wrt_keys]
    grads = torch.autograd.grad(outs, wrt, diffs, allow_unused=True)
    for k, gr in zip(wrt_keys, grads):
        actual = np.zeros_like(g[k]) if gr is None else gr.numpy()
        np.testing.assert_allclose(actual, g[k], rtol=1e-5, atol=1e-6, err_msg=k)


# ============================================================================ through the Net
NET = """name: "pynet" force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "t" type: "Input" top: "t" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "aff" type: "Python" bottom: "x" top: "y"
        python_param { module: "cc_pylayers" layer: "AffineLayer" param_str: "{'a': 3.0, 'b': -1.0}" } }
layer { name: "loss" type: "Python" bottom: "y" bottom: "t" top: "loss"
        python_param { module: "cc_pylayers" layer: "EuclideanLossLayer" } %s }
layer { name: "flags" type: "Python" top: "flags"
        python_param { module: "cc_pylayers" layer: "PhaseLayer" param_str: "{'k': 4}" } }
"""


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_matches_real_caffe_through_net(path, monkeypatch):
    from golden_util import check_golden

    monkeypatch.setenv(ENV_ALLOW, "1")
    check_golden(path)


@pytest.mark.parametrize("phase", ["train", "test"])
def test_net_python_loss(phase):
    net = Net(NET % "loss_weight: 0.5", phase=phase, allow_python_layers=True)
    assert net.blob_shapes["y"] == (2, 3) and net.blob_shapes["loss"] == (1,)
    assert net.blob_shapes["flags"] == (3,)
    rng = np.random.RandomState(4)
    x = rng.randn(2, 3).astype(np.float32)
    t = rng.randn(2, 3).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = net.forward(x=xt, t=torch.from_numpy(t))
    y = 3.0 * x - 1.0
    np.testing.assert_allclose(out["loss"].item(), ((y - t) ** 2).sum() / 2 / 2, rtol=1e-6)
    np.testing.assert_allclose(net.loss.item(), 0.5 * ((y - t) ** 2).sum() / 2 / 2, rtol=1e-6)
    expect = [1.0, 1.0, 4.0] if phase == "train" else [2.0, 2.0, 4.0]
    assert out["flags"].tolist() == expect
    net.backward()
    np.testing.assert_allclose(xt.grad.numpy(), 0.5 * 3.0 * (y - t) / 2, rtol=1e-5)


def test_net_python_layer_is_no_loss_without_loss_weight():
    net = Net(NET % "", phase="train", allow_python_layers=True)
    net.forward(x=torch.zeros(2, 3), t=torch.zeros(2, 3))
    assert net.loss is None  # Caffe: only LossLayers default to loss_weight 1


def test_net_refuses_python_layers_by_default():
    with pytest.raises(PythonLayerError, match=r"layer 'aff'.*CAFFE_COMPAT_ALLOW_PYTHON_LAYERS=1"):
        Net(NET % "", phase="test")


def test_net_finds_module_beside_prototxt(tmp_path, monkeypatch):
    d = tmp_path / "model"
    d.mkdir()
    (d / "cc_net_beside.py").write_text(textwrap.dedent("""
        import caffe
        class Square(caffe.Layer):
            def setup(self, bottom, top):
                pass
            def reshape(self, bottom, top):
                top[0].reshape(*bottom[0].data.shape)
            def forward(self, bottom, top):
                top[0].data[...] = bottom[0].data ** 2
            def backward(self, top, propagate_down, bottom):
                bottom[0].diff[...] = 2 * bottom[0].data * top[0].diff
    """))
    (d / "net.prototxt").write_text(
        'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 3 } } }\n'
        'layer { name: "sq" type: "Python" bottom: "x" top: "y" loss_weight: 1 '
        'python_param { module: "cc_net_beside" layer: "Square" } }\n')
    monkeypatch.chdir(tmp_path)  # not the model folder
    monkeypatch.setattr(sys, "path", list(sys.path))  # undo the shim's sys.path additions
    try:
        net = Net(str(d / "net.prototxt"), phase="train", allow_python_layers=True)
        x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
        net.forward(x=x)
        assert net.loss.item() == 14.0
        net.backward()
        assert x.grad.tolist() == [2.0, -4.0, 6.0]
    finally:
        sys.modules.pop("cc_net_beside", None)


# ============================================================================ Caffe's behaviours

RAISING_NET = """force_backward: true
layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }
layer { name: "boom" type: "Python" bottom: "x" top: "y" loss_weight: 1
        python_param { module: "pcb_layers" layer: "Raising" param_str: "%s" } }
"""


@pytest.fixture
def raising_net(tmp_path, monkeypatch):
    """A prototxt whose Python layer 'boom' (line 3) raises what param_str says
    (pcb_layers.Raising, also run by real Caffe in tests/data/pycaffe_scripts/)."""
    monkeypatch.syspath_prepend(str(PYLAYERS))

    def make(param_str: str) -> pathlib.Path:
        path = tmp_path / f"{param_str.replace(':', '_')}.prototxt"
        path.write_text(RAISING_NET % param_str)
        return path

    yield make
    sys.modules.pop("pcb_layers", None)


@pytest.mark.parametrize("method,kind", [("setup", RuntimeError), ("reshape", ValueError),
                                         ("forward", KeyError), ("backward", RuntimeError)])
def test_pycaffe_python_layer_exception_reaches_the_script(raising_net, method, kind):
    """What real pycaffe does: include/caffe/layers/python_layer.hpp calls the layer's
    ``setup``/``reshape``/``forward``/``backward`` through boost::python, whose
    ``error_already_set`` leaves the Python exception set while it unwinds Net::Init /
    Net::ForwardFromTo / Net::BackwardFromTo, and python/caffe/_caffe.cpp's wrappers hand it
    to the caller as raised.  So a legacy ``except RuntimeError:`` around ``caffe.Net(...)``
    catches a RuntimeError from ``setup`` and a KeyError stays a KeyError.  caffe-compat
    adds a PEP 678 note naming the layer, the method and the prototxt's file:line."""
    import caffe_compat.pycaffe as caffe

    path = raising_net(f"{method}:{kind.__name__}")
    caught = None
    try:
        net = caffe.Net(str(path), caffe.TEST)
        net.forward()
        net.backward()
    except kind as e:  # the legacy pattern: the script's own except clause
        caught = e
    assert type(caught) is kind and not isinstance(caught, PythonLayerError)
    assert str(caught) in (f"raised in {method}", repr(f"raised in {method}"))
    assert caught.__notes__ == [f"in Python layer 'boom' (pcb_layers.Raising.{method}) defined at {path}:3"]
    assert python_layer_note(caught) == caught.__notes__[0]
    assert python_layer_note(ValueError("not from a layer")) is None


@pytest.mark.parametrize("method,kind", [("forward", ValueError), ("backward", KeyError)])
def test_core_net_python_layer_exception_keeps_its_type(raising_net, method, kind):
    """The same through the core Net's whole-graph forward and autograd backward."""
    path = raising_net(f"{method}:{kind.__name__}")
    net = Net(str(path), phase="train", allow_python_layers=True)
    with pytest.raises(kind) as ei:
        net.forward(x=torch.ones(2, 3, requires_grad=True))
        net.backward()
    assert ei.value.__notes__ == [f"in Python layer 'boom' (pcb_layers.Raising.{method}) defined at {path}:3"]


STATEFUL = textwrap.dedent("""
    import caffe

    class Stateful(caffe.Layer):
        '''y = scale * x; backward reads the scale and the blobs as they are now.'''

        def setup(self, bottom, top):
            self.calls = []
            self.scale = 3.0

        def reshape(self, bottom, top):
            top[0].reshape(*bottom[0].data.shape)

        def forward(self, bottom, top):
            self.calls.append("forward")
            top[0].data[...] = self.scale * bottom[0].data

        def backward(self, top, propagate_down, bottom):
            self.calls.append(("backward", list(propagate_down)))
            bottom[0].diff[...] = self.scale * top[0].diff + bottom[0].data
""")


def test_pycaffe_backward_without_forward_calls_the_python_layer_as_it_is(tmp_path, monkeypatch):
    """Real pycaffe: ``net.backward()`` is python/caffe/pycaffe.py's ``_Net_backward``, which
    calls ``_backward`` (Net::BackwardFromTo, src/caffe/net.cpp) at once: every layer that
    needs backward gets ``Backward(top, propagate_down, bottom)`` on what the blobs hold,
    whether or not a forward ran, and a Python layer's own ``backward`` is called with its
    state as it is (python_layer.hpp).  No forward is replayed."""
    import caffe_compat.pycaffe as caffe

    (tmp_path / "cc_stateful.py").write_text(STATEFUL)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "s.prototxt"
    path.write_text('force_backward: true\n'
                    'layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 dim: 3 } } }\n'
                    'layer { name: "py" type: "Python" bottom: "x" top: "y" '
                    'python_param { module: "cc_stateful" layer: "Stateful" } }\n')
    try:
        net = caffe.Net(str(path), caffe.TEST)
        layer = net.layer_dict["py"]
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        g = np.full((2, 3), 0.5, np.float32)
        net.blobs["x"].data[...] = x
        net.blobs["y"].diff[...] = g
        d = net.backward()
        assert layer.calls == [("backward", [True])]              # no forward ran
        np.testing.assert_allclose(d["x"], 3.0 * g + x)
        assert not net.blobs["y"].data.any()                      # nothing computed y
        layer.scale = -1.0                                        # the layer's state, as it is
        net.blobs["x"].data[...] = 1.0
        np.testing.assert_allclose(net.backward()["x"], -g + 1.0)
        net.forward()
        np.testing.assert_allclose(net.blobs["y"].data, -np.ones((2, 3)))
        net.blobs["x"].data[...] = 2.0                            # written after the forward:
        np.testing.assert_allclose(net.backward()["x"], -g + 2.0)  # backward reads it
        assert layer.calls[2:] == ["forward", ("backward", [True])]
    finally:
        sys.modules.pop("cc_stateful", None)


def test_cli_reports_a_python_layer_exception_as_the_users_error(raising_net):
    """The command line prints the user's exception with its layer note (exit 1), not as an
    internal error of caffe-compat."""
    from click.testing import CliRunner

    from caffe_compat.cli.main import main

    path = raising_net("setup:ValueError")
    r = CliRunner().invoke(main, ["inspect", str(path), "--allow-python-layers"])
    assert r.exit_code == 1, r.output
    assert "internal error" not in r.stderr and "Traceback" not in r.output
    assert r.stderr.strip() == (f"error: ValueError: raised in setup (in Python layer 'boom' "
                                f"(pcb_layers.Raising.setup) defined at {path}:3)")
