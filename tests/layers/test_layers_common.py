"""Tests of the "common" layer family (layers/common.py) against real Caffe and by formula.

Golden files come from tests/golden/make_common.py (run under the Caffe oracle).  Each is
checked twice: layer by layer with a tiny interpreter right here (the modules alone), and
through ``caffe_compat.Net`` with ``check_golden`` once the net can build Input layers.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers import registry
from caffe_compat.layers.base import TEST, TRAIN, BuildContext
from caffe_compat.layers.common import MVN, ArgMax, BatchNorm, Eltwise, Filter
from caffe_compat.protos import caffe_pb2
from conftest import GOLDEN as GOLDEN_DIR
from golden_util import _rel_close

GOLDEN = sorted((GOLDEN_DIR / "common").glob("*.npz"))
SPLIT_BLOB = re.compile(r"_split_\d+$")


_close = _rel_close  # against the blob's largest magnitude, as every golden check


def layer_param(text: str) -> "caffe_pb2.LayerParameter":
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def build(text: str, shapes, phase: str = TEST):
    """A layer module from LayerParameter text and its bottom shapes (default top "y")."""
    p = layer_param(text)
    cls = registry.resolve(p)
    if not p.top and cls.exact_tops != 0:
        p.top.append("y")
    return cls(p, [tuple(s) for s in shapes], BuildContext(phase=phase))


# ----------------------------------------------------------------------------- golden, direct
def run_direct(path, dtype=torch.float32):
    """Run a golden net layer by layer with the modules alone; compare blobs, diffs, params."""
    g = np.load(str(path), allow_pickle=False)
    net = text_format.Parse(str(g["prototxt"]), caffe_pb2.NetParameter())
    phase = TRAIN if int(g["phase"]) == 0 else TEST
    blobs, leaves, modules = {}, {}, {}
    for lp in net.layer:
        if lp.type == "Input":
            for t in lp.top:
                x = torch.from_numpy(g["input/" + t]).to(dtype).requires_grad_(True)
                blobs[t] = leaves[t] = x
            continue
        bottoms = [blobs[b] for b in lp.bottom]
        shapes = [tuple(b.shape) for b in bottoms]
        m = registry.resolve(lp)(lp, shapes, BuildContext(phase=phase)).to(dtype)
        modules[lp.name] = m
        with torch.no_grad():
            for i, blob in enumerate(m.caffe_blobs()):
                blob.copy_(torch.from_numpy(g[f"param/{lp.name}/{i}"]).reshape(blob.shape))
        inferred = m.infer_top_shapes(shapes, [b.dtype for b in bottoms])
        tops = m(*bottoms)
        assert len(tops) == len(lp.top)
        for t, y, s in zip(lp.top, tops, inferred):
            if lp.type == "Filter":  # data-dependent: the inferred shape is an upper bound
                assert s[1:] == tuple(y.shape[1:]) and s[0] >= y.shape[0]
            else:
                assert s == tuple(y.shape), f"{lp.name}: inferred {s}, ran {tuple(y.shape)}"
            blobs[t] = y
    for k in g.files:
        if k.startswith("blob/") and not SPLIT_BLOB.search(k):
            name = k[len("blob/"):]
            _close(blobs[name].detach().float().numpy(), g[k], 1e-5, k)
        elif k.startswith("param_after/"):
            _, lname, i = k.split("/")
            _close(modules[lname].caffe_blobs()[int(i)].detach().float().numpy(), g[k], 1e-5, k)
    tops, diffs = [], []
    for k in g.files:
        if k.startswith("top_diff/"):
            y = blobs[k[len("top_diff/"):]]
            if y.requires_grad:
                tops.append(y)
                diffs.append(torch.from_numpy(g[k]).to(dtype).reshape(y.shape))
    wrt, keys = [], []
    for k in g.files:
        if k.startswith("diff/"):
            wrt.append(leaves[k[len("diff/"):]])
            keys.append(k)
        elif k.startswith("param_diff/"):
            _, lname, i = k.split("/")
            p = modules[lname].caffe_blobs()[int(i)]
            if isinstance(p, torch.nn.Parameter):
                wrt.append(p)
                keys.append(k)
    grads = torch.autograd.grad(tops, wrt, diffs, allow_unused=True) if tops else [None] * len(wrt)
    for k, t, gr in zip(keys, wrt, grads):
        actual = (np.zeros(g[k].shape, np.float32) if gr is None
                  else gr.float().numpy().reshape(g[k].shape))
        _close(actual, g[k], 1e-5, k)
    return g, modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_direct(path, dtype):
    run_direct(path, dtype)


def test_golden_files_present_and_small():
    names = {p.stem for p in GOLDEN}
    for must in ("ip_axis2_transpose", "bn_test_sf", "bn_train", "scale_2bottom",
                 "eltwise_max_ties4", "eltwise_sum_coeff_neg", "crop_per_axis", "mvn_big_eps",
                 "argmax_ties_topk", "softmax_axis2", "reshape_mixed", "filter_two", "embed_bias"):
        assert must in names
    assert sum(p.stat().st_size for p in GOLDEN) < 1_000_000


def test_golden_bn_train_changes_stats():
    """The TRAIN goldens really check an update (param_after differs from param)."""
    for case in ("bn_train", "bn_train_small_sf", "bn_train_2d_opts", "bn_test_local"):
        g = np.load(str(GOLDEN[0].parent / f"{case}.npz"))
        for i in range(3):
            assert not np.array_equal(g[f"param/bn/{i}"], g[f"param_after/bn/{i}"])
    g = np.load(str(GOLDEN[0].parent / "bn_train_small_sf.npz"))
    for i in range(3):
        assert not np.allclose(g[f"param/bn/{i}"], g[f"param_after/bn/{i}"], rtol=1e-2)
    g = np.load(str(GOLDEN[0].parent / "bn_train_global.npz"))
    for i in range(3):
        np.testing.assert_array_equal(g[f"param/bn/{i}"], g[f"param_after/bn/{i}"])


# ----------------------------------------------------------------------------- golden via Net
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_net(path):
    from golden_util import check_golden

    g = np.load(str(path))
    skip = [k[len("blob/"):] for k in g.files if k.startswith("blob/") and SPLIT_BLOB.search(k)]
    net = check_golden(path, skip_blobs=skip)
    for k in g.files:
        if k.startswith("param_after/"):
            _, lname, i = k.split("/")
            _close(net.layer(lname).caffe_blobs()[int(i)].detach().cpu().numpy(), g[k], 1e-5, k)


# ----------------------------------------------------------------------------- gradcheck (float64)
GRADCHECK = [
    ('name: "l" type: "InnerProduct" inner_product_param { num_output: 3 axis: 2 transpose: true }',
     [(2, 2, 3)], TEST),
    ('name: "l" type: "BatchNorm"', [(3, 2, 2)], TRAIN),
    ('name: "l" type: "BatchNorm" batch_norm_param { eps: 0.1 }', [(2, 2, 2)], TEST),
    ('name: "l" type: "Scale" scale_param { axis: 1 num_axes: 2 bias_term: true }', [(2, 3, 2)], TEST),
    ('name: "l" type: "Scale" scale_param { bias_term: true }', [(2, 3, 2), (3,)], TEST),
    ('name: "l" type: "Bias" bias_param { axis: 0 }', [(2, 3), (2, 3)], TEST),
    ('name: "l" type: "Eltwise" eltwise_param { operation: PROD }', [(2, 3)] * 3, TEST),
    ('name: "l" type: "Eltwise" eltwise_param { coeff: 2 coeff: -1 }', [(2, 3)] * 2, TEST),
    ('name: "l" type: "Eltwise" eltwise_param { operation: MAX }', [(2, 3)] * 3, TEST),
    ('name: "l" type: "Concat" concat_param { axis: -1 }', [(2, 1), (2, 3)], TEST),
    ('name: "l" type: "Slice" top: "a" top: "b" slice_param { slice_point: 1 }', [(2, 3)], TEST),
    ('name: "l" type: "Split" top: "a" top: "b" top: "c"', [(2, 3)], TEST),
    ('name: "l" type: "Crop" crop_param { axis: 1 offset: 1 }', [(2, 4, 4), (1, 2, 3)], TEST),
    ('name: "l" type: "Tile" tile_param { tiles: 3 }', [(2, 2)], TEST),
    ('name: "l" type: "Reduction" reduction_param { operation: SUMSQ axis: 1 coeff: 0.5 }',
     [(2, 3)], TEST),
    ('name: "l" type: "Reduction" reduction_param { operation: MEAN axis: 1 }', [(2, 3)], TEST),
    ('name: "l" type: "MVN"', [(2, 2, 3)], TEST),
    ('name: "l" type: "MVN" mvn_param { across_channels: true normalize_variance: false }',
     [(2, 2, 3)], TEST),
    ('name: "l" type: "Softmax" softmax_param { axis: 0 }', [(3, 2)], TEST),
    ('name: "l" type: "Reshape" reshape_param { shape { dim: 0 dim: -1 } }', [(2, 3, 2)], TEST),
    ('name: "l" type: "Flatten"', [(2, 3, 2)], TEST),
]


@pytest.mark.parametrize("text,shapes,phase", GRADCHECK, ids=[t[0].split('"')[3] + str(i)
                                                              for i, t in enumerate(GRADCHECK)])
def test_gradcheck(text, shapes, phase):
    torch.manual_seed(0)
    m = build(text, shapes, phase).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        if isinstance(m, BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 1.5)
            m.scale_factor.fill_(2.0)
    xs = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    params = [p for p in m.parameters()]
    n = len(xs)

    def f(*args):
        return m(*args[:n])

    assert torch.autograd.gradcheck(f, tuple(xs), eps=1e-6, atol=1e-6)
    if params:
        names = [n for n, _ in m.named_parameters()]

        def g(*ps):
            return torch.func.functional_call(m, dict(zip(names, ps)), tuple(x.detach() for x in xs))

        ps = tuple(p.detach().clone().requires_grad_(True) for p in params)
        assert torch.autograd.gradcheck(g, ps, eps=1e-6, atol=1e-6)


def test_embed_param_gradcheck():
    m = build('name: "e" type: "Embed" embed_param { num_output: 3 input_dim: 4 }', [(5,)]).double()
    idx = torch.tensor([0.0, 3.0, 3.0, 1.0, 2.9], dtype=torch.float64)  # 2.9 truncates to 2
    w = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda w, b: torch.func.functional_call(m, {"weight": w, "bias": b}, (idx,)), (w, b))
    y = torch.func.functional_call(m, {"weight": w, "bias": b}, (idx,))[0]
    np.testing.assert_allclose(y[4].detach().numpy(), (w[2] + b).detach().numpy())


# ----------------------------------------------------------------------------- semantics
def test_eltwise_max_tie_routing_matches_caffe_loop():
    """Ties: bottom 1 beats bottom 0; among later bottoms the earlier wins (strict >)."""
    m = Eltwise(layer_param('name: "e" type: "Eltwise" top: "y" eltwise_param { operation: MAX }'),
                [(4,)] * 3, BuildContext())
    a = torch.tensor([1.0, 2.0, 0.0, 5.0], requires_grad=True)
    b = torch.tensor([1.0, 1.0, 3.0, 5.0], requires_grad=True)
    c = torch.tensor([0.0, 2.0, 3.0, 5.0], requires_grad=True)
    (y,) = m(a, b, c)
    y.backward(torch.tensor([1.0, 10.0, 100.0, 1000.0]))
    # numpy re-statement of Caffe's loop
    A, B, C = (t.detach().numpy() for t in (a, b, c))
    mask = np.where(A > B, 0, 1)
    top = np.where(A > B, A, B)
    mask = np.where(C > top, 2, mask)
    np.testing.assert_array_equal(mask, [1, 0, 1, 1])
    for i, t in enumerate((a, b, c)):
        np.testing.assert_array_equal(t.grad.numpy(), np.where(mask == i, [1, 10, 100, 1000], 0))


def test_argmax_ties_larger_index_first():
    m = ArgMax(layer_param('name: "a" type: "ArgMax" top: "y" argmax_param { top_k: 3 axis: 1 }'),
               [(1, 5)], BuildContext())
    (y,) = m(torch.tensor([[1.0, 3.0, 1.0, 3.0, 0.0]]))
    np.testing.assert_array_equal(y.numpy(), [[3, 1, 2]])
    assert not y.requires_grad


def test_argmax_shapes_without_axis():
    m = build('name: "a" type: "ArgMax" argmax_param { top_k: 2 out_max_val: true }', [(2, 3, 4, 5)])
    assert m.infer_top_shapes([(2, 3, 4, 5)]) == [(2, 2, 2, 1)]
    m = build('name: "a" type: "ArgMax"', [(2, 3)])
    assert m.infer_top_shapes([(2, 3)]) == [(2, 1, 1)]


def test_batchnorm_buffers_and_update_formula():
    m = BatchNorm(layer_param('name: "bn" type: "BatchNorm" top: "y" batch_norm_param '
                              '{ moving_average_fraction: 0.5 }'), [(2, 2, 3)], BuildContext(phase=TRAIN))
    assert [n for n, _ in m.named_parameters()] == []
    assert m.blob_names == ["running_mean", "running_var", "scale_factor"]
    assert m.scale_factor.shape == (1,)
    assert not m.use_global_stats
    x = torch.randn(2, 2, 3, dtype=torch.float64)
    m.double()
    for step in range(2):
        before = [b.clone() for b in m.caffe_blobs()]
        m(x)
        xn = x.numpy()
        mean = xn.mean(axis=(0, 2))
        var = xn.var(axis=(0, 2))
        np.testing.assert_allclose(m.scale_factor.numpy(), before[2].numpy() * 0.5 + 1)
        np.testing.assert_allclose(m.running_mean.numpy(), before[0].numpy() * 0.5 + mean)
        np.testing.assert_allclose(m.running_var.numpy(), before[1].numpy() * 0.5 + var * 6 / 5)
    # shape inference on meta tensors leaves the statistics alone
    saved = [b.clone() for b in m.caffe_blobs()]
    assert m.infer_top_shapes([(4, 2, 3)]) == [(4, 2, 3)]
    for a, b in zip(saved, m.caffe_blobs()):
        assert torch.equal(a, b)


def test_batchnorm_global_stats_divides_by_scale_factor():
    m = build('name: "bn" type: "BatchNorm" batch_norm_param { eps: 0.25 }', [(2, 2)])
    assert m.use_global_stats
    with torch.no_grad():
        m.running_mean.copy_(torch.tensor([4.0, -2.0]))
        m.running_var.copy_(torch.tensor([6.0, 2.0]))
        m.scale_factor.fill_(2.0)
    x = torch.tensor([[1.0, 1.0], [3.0, -1.0]])
    (y,) = m(x)
    expect = (x.numpy() - np.array([2.0, -1.0])) / np.sqrt(np.array([3.0, 1.0]) + 0.25)
    np.testing.assert_allclose(y.numpy(), expect, rtol=1e-6)
    with torch.no_grad():
        m.scale_factor.zero_()
    (y,) = m(x)  # zero scale factor: zero statistics
    np.testing.assert_allclose(y.numpy(), x.numpy() / np.sqrt(0.25), rtol=1e-6)


def test_mvn_backward_is_caffes_formula_not_autograd():
    """With a large eps Caffe's MVN gradient differs from the true one: we follow Caffe."""
    eps = 0.5
    m = MVN(layer_param(f'name: "m" type: "MVN" top: "y" mvn_param {{ eps: {eps} }}'), [(1, 1, 4)],
            BuildContext()).double()
    x = torch.tensor([[[0.0, 1.0, 3.0, -2.0]]], dtype=torch.float64, requires_grad=True)
    gtop = torch.tensor([0.3, -1.0, 2.0, 0.5], dtype=torch.float64)
    (y,) = m(x)
    assert y.shape == (1, 1, 4, 1)  # Caffe's MVN top is always 4-D
    (gx,) = torch.autograd.grad(y, x, gtop.reshape(y.shape))
    xn = x.detach().numpy().ravel()
    xc = xn - xn.mean()
    s = np.sqrt((xc ** 2).mean()) + eps
    yn = xc / s
    g = gtop.numpy()
    caffe = (g - g.mean() - yn * (yn * g).mean()) / s
    np.testing.assert_allclose(gx.numpy().ravel(), caffe, rtol=1e-12)
    xa = x.detach().clone().requires_grad_(True)
    xca = xa - xa.mean()
    ya = xca / ((xca ** 2).mean().sqrt() + eps)
    (true,) = torch.autograd.grad(ya, xa, gtop.reshape(ya.shape))
    assert not np.allclose(true.numpy().ravel(), caffe, rtol=1e-3)


def test_filter_shapes_and_gradient():
    m = Filter(layer_param('name: "f" type: "Filter" top: "a" top: "b"'),
               [(3, 2), (3,), (3, 1)], BuildContext())
    assert m.infer_top_shapes([(3, 2), (3,), (3, 1)]) == [(3, 2), (3,)]
    x = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    v = torch.tensor([5.0, 6.0, 7.0], requires_grad=True)
    a, b = m(x, v, torch.tensor([[0.0], [float("nan")], [2.0]]))
    np.testing.assert_array_equal(b.detach().numpy(), [6.0, 7.0])
    a.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[0, 0], [1, 1], [1, 1]])
    a, b = m(x, v, torch.zeros(3, 1))
    assert a.shape == (0, 2) and b.shape == (0,)


def test_parameter_blob_and_silence():
    p = build('name: "p" type: "Parameter" top: "p" parameter_param { shape { dim: 2 dim: 3 } }', [])
    assert p.blob_names == ["blob"] and isinstance(p.blob, torch.nn.Parameter)
    (y,) = p()
    assert y.shape == (2, 3) and float(y.detach().abs().sum()) == 0.0
    (y * torch.arange(6.0).reshape(2, 3)).sum().backward()
    np.testing.assert_array_equal(p.blob.grad.numpy(), np.arange(6.0).reshape(2, 3))
    s = build('name: "s" type: "Silence" bottom: "a" bottom: "b"', [(2,), (3,)])
    assert s(torch.zeros(2), torch.zeros(3)) == ()
    assert s.infer_top_shapes([(2,), (3,)]) == []


def test_batch_reindex():
    m = build('name: "r" type: "BatchReindex" top: "y"', [(3, 2), (4,)])
    x = torch.arange(6.0).reshape(3, 2).requires_grad_(True)
    (y,) = m(x, torch.tensor([2.0, 0.0, 2.0, 1.0]))
    np.testing.assert_array_equal(y.detach().numpy(), [[4, 5], [0, 1], [4, 5], [2, 3]])
    y.sum().backward()
    np.testing.assert_array_equal(x.grad.numpy(), [[1, 1], [1, 1], [2, 2]])
    with pytest.raises(ShapeError):
        m(x, torch.tensor([3.0]))
    with pytest.raises(ShapeError):
        build('name: "r" type: "BatchReindex"', [(3, 2), (4, 1)])


def test_scale_defaults():
    m = build('name: "s" type: "Scale" scale_param { bias_term: true }', [(2, 3, 4)])
    assert m.blob_names == ["weight", "bias"]
    assert torch.equal(m.weight, torch.ones(3)) and torch.equal(m.bias, torch.zeros(3))
    m = build('name: "s" type: "Scale" scale_param { num_axes: 0 }', [(2, 3)])
    assert m.weight.shape == ()
    m = build('name: "s" type: "Scale" bottom: "x" bottom: "s" scale_param { axis: 0 bias_term: true }',
              [(2, 3, 4), (2, 3)])
    assert m.blob_names == ["bias"] and m.bias.shape == (2, 3)


def test_inner_product_blob_shapes():
    m = build('name: "ip" type: "InnerProduct" inner_product_param { num_output: 5 axis: 2 '
              'transpose: true }', [(2, 3, 4, 2)])
    assert m.weight.shape == (8, 5) and m.bias.shape == (5,)
    assert m.infer_top_shapes([(7, 3, 4, 2)]) == [(7, 3, 5)]
    with pytest.raises(ShapeError):
        m(torch.zeros(2, 3, 4, 3))


def test_reshape_and_flatten_shapes():
    def shape(param, s):
        return build('name: "r" type: "Reshape" top: "y" bottom: "x" reshape_param { %s }' % param,
                     [s]).infer_top_shapes([s])[0]

    assert shape("shape { dim: 0 dim: -1 }", (2, 3, 4)) == (2, 12)
    assert shape("axis: -1 num_axes: 0 shape { dim: 1 }", (2, 3)) == (2, 3, 1)
    assert shape("axis: 1 num_axes: 1 shape { dim: 3 dim: -1 }", (2, 6, 5)) == (2, 3, 2, 5)
    assert shape("axis: 0 num_axes: 0 shape { dim: 1 }", (2, 3)) == (1, 2, 3)
    assert shape("", (1, 1)) == ()
    fl = build('name: "f" type: "Flatten" top: "y" bottom: "x" flatten_param { axis: 0 end_axis: 1 }',
               [(2, 3, 4)])
    assert fl.infer_top_shapes([(2, 3, 4)]) == [(6, 4)]


def test_reduction_axis0_is_scalar():
    m = build('name: "r" type: "Reduction" reduction_param { operation: ASUM }', [(2, 3)])
    (y,) = m(torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.0, -1.0]]))
    assert y.shape == () and float(y) == 7.0


def test_crop_and_slice_and_concat_shapes():
    m = build('name: "c" type: "Crop" crop_param { offset: 1 offset: 2 }', [(1, 2, 5, 6), (1, 1, 3, 3)])
    x = torch.arange(60.0).reshape(1, 2, 5, 6)
    (y,) = m(x, torch.zeros(1, 1, 3, 3))
    assert torch.equal(y, x[:, :, 1:4, 2:5])
    s = build('name: "s" type: "Slice" top: "a" top: "b" top: "c" slice_param { axis: 0 }', [(6, 2)])
    assert s.infer_top_shapes([(9, 2)]) == [(3, 2)] * 3
    c = build('name: "c" type: "Concat" concat_param { concat_dim: 0 }', [(1, 2), (3, 2)])
    assert c.infer_top_shapes([(1, 2), (3, 2)]) == [(4, 2)]


def test_tile_is_block_repeat():
    m = build('name: "t" type: "Tile" tile_param { axis: 0 tiles: 2 }', [(2, 2)])
    (y,) = m(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_array_equal(y.numpy(), [[1, 2], [3, 4], [1, 2], [3, 4]])


# ----------------------------------------------------------------------------- errors
ERRORS = [
    ('name: "e" type: "InnerProduct"', [(2, 3)], SchemaError),
    ('name: "e" type: "InnerProduct" inner_product_param { num_output: 2 axis: 3 }', [(2, 3)], ShapeError),
    ('name: "e" type: "BatchNorm"', [(4,)], ShapeError),
    ('name: "e" type: "Scale" scale_param { axis: 2 num_axes: 2 }', [(2, 3, 4)], ShapeError),
    ('name: "e" type: "Scale" scale_param { num_axes: -2 }', [(2, 3, 4)], SchemaError),
    ('name: "e" type: "Scale"', [(2, 3, 4), (4,)], ShapeError),
    ('name: "e" type: "Scale"', [(2, 3), (3,), (3,)], GraphError),
    ('name: "e" type: "Bias"', [(2, 3, 4), (3, 5)], ShapeError),
    ('name: "e" type: "Eltwise" eltwise_param { operation: PROD coeff: 1 coeff: 2 }',
     [(2,), (2,)], SchemaError),
    ('name: "e" type: "Eltwise" eltwise_param { coeff: 1 }', [(2,), (2,)], SchemaError),
    ('name: "e" type: "Eltwise"', [(2,)], GraphError),
    ('name: "e" type: "Eltwise"', [(2, 3), (2, 2)], ShapeError),
    ('name: "e" type: "Concat" concat_param { axis: 1 concat_dim: 1 }', [(2, 3)], SchemaError),
    ('name: "e" type: "Concat"', [(2, 3), (3, 3)], ShapeError),
    ('name: "e" type: "Concat" concat_param { concat_dim: 2 }', [(2, 3)], ShapeError),
    ('name: "e" type: "Slice" top: "a" top: "b" slice_param { slice_point: 2 slice_point: 3 }',
     [(2, 4)], SchemaError),
    ('name: "e" type: "Slice" top: "a" top: "b" slice_param { slice_point: 5 }', [(2, 4)], ShapeError),
    ('name: "e" type: "Slice" top: "a" top: "b" top: "c"', [(2, 4)], ShapeError),
    ('name: "e" type: "Slice" top: "a" top: "b" top: "c" slice_param { slice_point: 2 '
     'slice_point: 2 }', [(2, 4)], SchemaError),
    ('name: "e" type: "Split" bottom: "x" top: "x"', [(2,)], GraphError),
    ('name: "e" type: "Flatten" bottom: "x" top: "x"', [(2, 3)], GraphError),
    ('name: "e" type: "Flatten" flatten_param { axis: 2 end_axis: 1 }', [(2, 3, 4)], ShapeError),
    ('name: "e" type: "Reshape" reshape_param { shape { dim: -1 dim: -1 } }', [(2, 3)], SchemaError),
    ('name: "e" type: "Reshape" reshape_param { shape { dim: 4 dim: -1 } }', [(2, 3)], ShapeError),
    ('name: "e" type: "Reshape" reshape_param { shape { dim: 5 } }', [(2, 3)], ShapeError),
    ('name: "e" type: "Reshape" reshape_param { axis: 1 shape { dim: 0 dim: 0 } }', [(2, 3)], ShapeError),
    ('name: "e" type: "Reshape" reshape_param { axis: 3 shape { dim: 1 } }', [(2, 3)], ShapeError),
    ('name: "e" type: "Crop" crop_param { offset: 1 offset: 1 offset: 1 }', [(2, 2, 4, 4), (2, 2, 2, 2)],
     SchemaError),
    ('name: "e" type: "Crop" crop_param { offset: 3 }', [(2, 2, 4, 4), (2, 2, 2, 2)], ShapeError),
    ('name: "e" type: "Crop"', [(2, 2, 4, 4), (2, 2, 2)], ShapeError),
    ('name: "e" type: "Tile"', [(2, 3)], SchemaError),
    ('name: "e" type: "Tile" tile_param { tiles: 0 }', [(2, 3)], SchemaError),
    ('name: "e" type: "Reduction" reduction_param { axis: 2 }', [(2, 3)], ShapeError),
    ('name: "e" type: "MVN"', [(2, 3, 2, 2, 2)], ShapeError),
    ('name: "e" type: "ArgMax" argmax_param { top_k: 7 }', [(2, 3, 2)], ShapeError),
    ('name: "e" type: "ArgMax" argmax_param { top_k: 3 axis: 1 }', [(2, 2, 5)], ShapeError),
    ('name: "e" type: "Softmax" softmax_param { axis: -3 }', [(2, 3)], ShapeError),
    ('name: "e" type: "Embed" embed_param { num_output: 2 }', [(3,)], SchemaError),
    ('name: "e" type: "Filter" top: "a"', [(3, 2), (3, 2), (3, 1)], GraphError),
    ('name: "e" type: "Filter" top: "a"', [(3, 2), (3, 2)], ShapeError),
    ('name: "e" type: "Filter" top: "a"', [(3, 2), (4, 1)], ShapeError),
    ('name: "e" type: "Silence"', [], GraphError),
]


@pytest.mark.parametrize("text,shapes,err", ERRORS, ids=[f"{t[0].split(chr(34))[3]}{i}"
                                                          for i, t in enumerate(ERRORS)])
def test_errors(text, shapes, err):
    with pytest.raises(err) as ei:
        build(text, shapes)
    assert "'e'" in str(ei.value)


def test_embed_index_out_of_range():
    m = build('name: "e" type: "Embed" embed_param { num_output: 2 input_dim: 3 }', [(2,)])
    with pytest.raises(ShapeError):
        m(torch.tensor([0.0, 3.0]))
    with pytest.raises(ShapeError):
        m(torch.tensor([-1.0, 0.0]))


def test_bad_enum_value_lists_allowed():
    """Binary protos may carry enum numbers the schema lacks; the check names the allowed ones."""
    from caffe_compat.layers.common import _enum_value

    m = build('name: "e" type: "Reduction"', [(2,)])
    with pytest.raises(SchemaError, match="SUM, ASUM, SUMSQ, MEAN"):
        _enum_value(m, caffe_pb2.ReductionParameter.ReductionOp, 9, "reduction operation")
    assert _enum_value(m, caffe_pb2.ReductionParameter.ReductionOp, 4, "op") == 4
