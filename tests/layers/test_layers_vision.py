"""Vision layers against real Caffe (golden files from tests/golden/make_vision.py) and,
where the oracle cannot answer (round_mode FLOOR, STOCHASTIC pooling, AVE windows of size
0), against numpy transcriptions of Caffe's CPU loops; plus float64 gradchecks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from golden_util import check_golden, run_golden_layers
from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers import vision
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import resolve
from caffe_compat.layers.vision import caffe_pool2d
from caffe_compat.protos import caffe_pb2
from conftest import GOLDEN as GOLDEN_DIR

GOLDEN = sorted((GOLDEN_DIR / "vision").glob("*.npz"))
FLT_MAX = float(np.finfo(np.float32).max)


# ---------------------------------------------------------------------------- helpers
def make(text: str, shapes, phase: str = "TEST", seed: int = 0, tops=("y",)):
    p = text_format.Parse('name: "l" ' + text, caffe_pb2.LayerParameter())
    if not p.bottom:
        p.bottom.extend(["x%d" % i for i in range(len(shapes))])
    if not p.top:
        p.top.extend(tops)
    ctx = BuildContext(phase=phase, generator=torch.Generator().manual_seed(seed))
    return resolve(p)(p, [tuple(s) for s in shapes], ctx)


# ---------------------------------------------------------------------------- golden
def test_golden_files_exist():
    names = {p.stem for p in GOLDEN}
    for must in ("conv_group_dilate_rect", "deconv_stride_pad_group", "pool_max_pad_drop",
                 "pool_ave_bigpad", "pool_max_stride_gt_kernel", "pool_global_max",
                 "pool_max_ties_mask", "lrn_across", "lrn_within", "spp_max3", "im2col_2d"):
        assert must in names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_layer(path, dtype):
    run_golden_layers(path, dtype)


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_net(path):
    check_golden(path)


# ---------------------------------------------------------------------------- pooling reference
def ref_size(size, k, s, p, ceil, any_pad):
    """Caffe's PoolingLayer::Reshape (float ceil/floor; drop rule if any axis is padded)."""
    r = (size + 2 * p - k) / float(s)
    out = int(math.ceil(r) if ceil else math.floor(r)) + 1
    if any_pad and (out - 1) * s >= size + p:
        out -= 1
    return out


def ref_pool(x, method, k, s, p, ceil=True, top_diff=None):
    """Caffe's PoolingLayer Forward_cpu/Backward_cpu (MAX, AVE) as plain loops, float64.

    Returns (top, mask, bottom_diff).  Empty MAX windows keep -FLT_MAX and mask -1 (their
    backward is undefined in Caffe and is skipped here).
    """
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    OH = ref_size(H, kh, sh, ph, ceil, ph or pw)
    OW = ref_size(W, kw, sw, pw, ceil, ph or pw)
    top = np.zeros((N, C, OH, OW))
    mask = np.full((N, C, OH, OW), -1.0)
    diff = np.zeros_like(x, dtype=np.float64)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    hs, ws = oh * sh - ph, ow * sw - pw
                    if method == 0:
                        he, we = min(hs + kh, H), min(ws + kw, W)
                        hs, ws = max(hs, 0), max(ws, 0)
                        best, idx = -FLT_MAX, -1
                        for h in range(hs, he):
                            for w in range(ws, we):
                                if x[n, c, h, w] > best:
                                    best, idx = x[n, c, h, w], h * W + w
                        top[n, c, oh, ow], mask[n, c, oh, ow] = best, idx
                        if top_diff is not None and idx >= 0:
                            diff[n, c, idx // W, idx % W] += top_diff[n, c, oh, ow]
                    else:
                        he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
                        size = (he - hs) * (we - ws)
                        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
                        acc = 0.0
                        for h in range(hs, he):
                            for w in range(ws, we):
                                acc += x[n, c, h, w]
                        with np.errstate(all="ignore"):
                            top[n, c, oh, ow] = np.float64(acc) / size
                        if top_diff is not None:
                            for h in range(hs, he):
                                for w in range(ws, we):
                                    diff[n, c, h, w] += top_diff[n, c, oh, ow] / size
    return top, mask, diff


def _pool_configs(count=100, seed=0):
    rng = np.random.RandomState(seed)
    out = []
    while len(out) < count:
        H, W = rng.randint(1, 9, size=2)
        kh, kw = rng.randint(1, 5, size=2)
        sh, sw = rng.randint(1, 5, size=2)
        ph, pw = rng.randint(0, kh), rng.randint(0, kw)
        ceil = bool(rng.rand() < 0.75)
        if ref_size(H, kh, sh, ph, ceil, ph or pw) <= 0 or ref_size(W, kw, sw, pw, ceil, ph or pw) <= 0:
            continue
        out.append(((int(H), int(W)), (int(kh), int(kw)), (int(sh), int(sw)), (int(ph), int(pw)),
                    ceil, int(rng.randint(0, 2))))
    return out


@pytest.mark.parametrize("method", [0, 1], ids=["MAX", "AVE"])
def test_pooling_matches_caffe_loops_on_random_geometries(method):
    """Fast (one torch op) and explicit-padding paths against Caffe's loops: ceil and floor,
    pad up to k - 1, stride > kernel, inputs smaller than the kernel, ties."""
    rng = np.random.RandomState(method)
    for (H, W), k, s, p, ceil, tie in _pool_configs(seed=method):
        xn = rng.randint(0, 3, size=(1, 2, H, W)).astype(np.float64) if tie \
            else rng.randn(1, 2, H, W)
        x = torch.from_numpy(xn).requires_grad_(True)
        y, mask = caffe_pool2d(x, method, k, s, p, ceil, return_mask=method == 0)
        td = rng.randn(*y.shape)
        top, rmask, rdiff = ref_pool(xn, method, k, s, p, ceil, td)
        what = f"H,W={H, W} k={k} s={s} p={p} ceil={ceil}"
        np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-12, atol=1e-12,
                                   equal_nan=True, err_msg=what)
        if method == 0:
            np.testing.assert_array_equal(mask.numpy(), rmask, err_msg=what)
        live = torch.from_numpy(np.isfinite(top) & (np.abs(top) < FLT_MAX))
        (g,) = torch.autograd.grad(y, x, torch.from_numpy(td) * live)
        np.testing.assert_allclose(g.numpy(), rdiff, rtol=1e-12, atol=1e-12, err_msg=what)


def test_ave_pool_zero_size_window_is_nan_like_caffe():
    # pad 0, stride > kernel, the last window starts exactly at H: pool_size 0, 0/0
    x = torch.randn(1, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    (y,) = make('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 stride: 3 }',
                [(1, 1, 6, 6)])(x)
    assert y.shape == (1, 1, 3, 3)
    assert torch.isnan(y[0, 0, 2]).all() and torch.isnan(y[0, 0, :, 2]).all()
    assert torch.isfinite(y[0, 0, :2, :2]).all()
    ref, _, rdiff = ref_pool(x.detach().numpy(), 1, (2, 2), (3, 3), (0, 0), True,
                             np.ones((1, 1, 3, 3)))
    np.testing.assert_allclose(y.detach().numpy(), ref, equal_nan=True)
    (g,) = torch.autograd.grad(y, x, torch.ones_like(y))
    np.testing.assert_allclose(g.numpy(), rdiff)  # no NaN leaks into the bottom diff


def test_pooling_floor_round_mode():
    text = 'type: "Pooling" pooling_param { pool: %s kernel_size: 3 stride: 2 pad: 1 round_mode: FLOOR }'
    rng = np.random.RandomState(0)
    xn = rng.randn(2, 2, 6, 8)
    for method, name in ((0, "MAX"), (1, "AVE")):
        x = torch.from_numpy(xn).requires_grad_(True)
        (y,) = make(text % name, [xn.shape])(x)
        assert y.shape == (2, 2, 3, 4)  # ceil would give 4 x 5
        top, _, diff = ref_pool(xn, method, (3, 3), (2, 2), (1, 1), False, np.ones(y.shape))
        np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-12)
        (g,) = torch.autograd.grad(y.sum(), x)
        np.testing.assert_allclose(g.numpy(), diff, rtol=1e-12)


def test_common_pooling_geometries_are_one_torch_op(monkeypatch):
    """AlexNet/VGG/GoogLeNet pooling must not take the explicit-padding path."""
    def no_pad(*a, **k):
        raise AssertionError("explicit padding used")

    monkeypatch.setattr(vision.F, "pad", no_pad)
    # (with a gradient to keep: without one, MAX pooling takes the index-free path, which
    # pads and is tested against this one in tests/core/test_inference_plan.py)
    x = torch.randn(1, 2, 55, 55, requires_grad=True)
    for k, s, p in ((3, 2, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1), (2, 2, 1)):
        for m in (0, 1):
            caffe_pool2d(x, m, (k, k), (s, s), (p, p), True)
    caffe_pool2d(x, 0, (55, 55), (1, 1), (0, 0), True, return_mask=True)


def test_pool_mask_general_path_and_empty_windows():
    x = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(1, 2, 8, 8)
    y, mask = caffe_pool2d(x, 0, (2, 2), (5, 5), (0, 0), True, return_mask=True)
    _, rmask, _ = ref_pool(x.numpy().astype(np.float64), 0, (2, 2), (5, 5), (0, 0))
    np.testing.assert_array_equal(mask.numpy(), rmask)
    assert mask[0, 0, 2, 2] == -1 and y[0, 0, 2, 2] == -FLT_MAX


# ---------------------------------------------------------------------------- stochastic
def ref_stochastic(x, k, s, u=None):
    """Caffe's StoPoolForwardTest / StoPoolForwardTrain (pooling_layer.cu), float64."""
    N, C, H, W = x.shape
    (kh, kw), (sh, sw) = k, s
    OH, OW = ref_size(H, kh, sh, 0, True, False), ref_size(W, kw, sw, 0, True, False)
    top = np.zeros((N, C, OH, OW))
    pick = np.full((N, C, OH, OW), -1)
    for n in range(N):
        for c in range(C):
            for oh in range(OH):
                for ow in range(OW):
                    hs, ws = oh * sh, ow * sw
                    he, we = min(hs + kh, H), min(ws + kw, W)
                    vals = [(x[n, c, h, w], h * W + w) for h in range(hs, he) for w in range(ws, we)]
                    if u is None:
                        cs = np.float64(np.finfo(np.float32).tiny)
                        cv = 0.0
                        for v, _ in vals:
                            cs += v
                            cv += v * v
                        top[n, c, oh, ow] = cv / cs
                    else:
                        total = sum(v for v, _ in vals)
                        thres = u[n, c, oh * OW + ow] * total
                        cs = 0.0
                        for v, i in vals:
                            cs += v
                            if cs >= thres:
                                top[n, c, oh, ow], pick[n, c, oh, ow] = v, i
                                break
    return top, pick


def test_stochastic_pooling_test_phase():
    rng = np.random.RandomState(0)
    xn = np.maximum(rng.randn(2, 3, 7, 6), 0)  # after a ReLU: many zero windows
    xn[0, 0] = 0.0
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = make('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }',
                [xn.shape])(x)
    ref, _ = ref_stochastic(xn, (3, 3), (2, 2))
    np.testing.assert_allclose(y.detach().numpy(), ref, rtol=1e-12)
    assert (y[0, 0] == 0).all()
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(g).all() and (g[0, 0] == 0).all()


def test_stochastic_pooling_train_phase_matches_caffe_sampling():
    rng = np.random.RandomState(1)
    xn = np.abs(rng.randn(2, 2, 7, 7))
    seed = 5
    layer = make('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 stride: 2 }',
                 [xn.shape], phase="TRAIN", seed=seed)
    x = torch.from_numpy(xn).requires_grad_(True)
    (y,) = layer(x)
    u = torch.rand((2, 2, 1, 9), generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64).numpy()[:, :, 0, :]
    ref, pick = ref_stochastic(xn, (3, 3), (2, 2), u)
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    td = rng.randn(*y.shape)
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(td))
    gref = np.zeros_like(xn)
    for n, c, oh, ow in np.ndindex(*pick.shape):
        i = pick[n, c, oh, ow]
        gref[n, c, i // 7, i % 7] += td[n, c, oh, ow]
    np.testing.assert_allclose(g.numpy(), gref, rtol=1e-12)


def test_stochastic_pooling_train_frequencies():
    x = torch.tensor([[[[1.0, 3.0], [0.0, 4.0]]]]).expand(20000, 1, 2, 2).contiguous()
    layer = make('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 }',
                 [(1, 1, 2, 2)], phase="TRAIN", seed=3)
    (y,) = layer(x)
    freq = [(y == v).double().mean().item() for v in (1.0, 3.0, 0.0, 4.0)]
    np.testing.assert_allclose(freq, [0.125, 0.375, 0.0, 0.5], atol=0.015)


# ---------------------------------------------------------------------------- gradchecks
def _gradcheck_layer(layer, x):
    layer = layer.double()
    params = {n: p.detach().clone().requires_grad_(True) for n, p in layer.named_parameters()}

    def f(x, *ps):
        return torch.func.functional_call(layer, dict(zip(params, ps)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x,) + tuple(params.values()))


@pytest.mark.parametrize("text", [
    "pool: AVE kernel_size: 3 stride: 2 pad: 1",
    "pool: AVE kernel_size: 3 stride: 2 pad: 2",
    "pool: MAX kernel_size: 3 stride: 2 pad: 1",
    "pool: MAX kernel_size: 3 stride: 2 pad: 2",
    "pool: MAX kernel_size: 2 stride: 3",
])
def test_gradcheck_pooling(text):
    layer = make('type: "Pooling" pooling_param { %s }' % text, [(1, 2, 5, 6)])
    x = torch.randperm(60, generator=torch.Generator().manual_seed(0)).double()
    x = (x / 7.0).reshape(1, 2, 5, 6).requires_grad_(True)  # distinct: no ties
    _gradcheck_layer(layer, x)


@pytest.mark.parametrize("text", [
    "local_size: 5 alpha: 0.5 beta: 0.75 k: 2",
    "local_size: 3 alpha: 1.1 beta: 0.6 k: 1 norm_region: WITHIN_CHANNEL",
])
def test_gradcheck_lrn(text):
    layer = make('type: "LRN" lrn_param { %s }' % text, [(2, 6, 3, 4)])
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _gradcheck_layer(layer, x.requires_grad_(True))


@pytest.mark.parametrize("typ,text,shape", [
    ("Convolution", "num_output: 4 kernel_h: 3 kernel_w: 2 pad: 1 stride: 2 dilation: 2 group: 2",
     (1, 4, 5, 4)),
    ("Convolution", "num_output: 2 kernel_size: 3 stride: 2", (1, 2, 2, 5)),
    ("Deconvolution", "num_output: 4 kernel_size: 3 stride: 2 pad: 1 group: 2", (1, 2, 3, 4)),
    ("Convolution", "num_output: 2 kernel_size: 2", (1, 2, 3, 3, 3)),
])
def test_gradcheck_conv(typ, text, shape):
    layer = make('type: "%s" convolution_param { %s weight_filler { type: "gaussian" std: 0.5 } '
                 'bias_filler { type: "gaussian" std: 0.5 } }' % (typ, text), [shape])
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _gradcheck_layer(layer, x.requires_grad_(True))


# ---------------------------------------------------------------------------- shapes, blobs, errors
def test_conv_blobs_fillers_and_batch_size():
    layer = make('type: "Convolution" convolution_param { num_output: 8 kernel_size: 3 group: 2 '
                 'weight_filler { type: "gaussian" std: 0.1 } bias_filler { type: "constant" '
                 'value: 0.5 } }', [(2, 4, 9, 9)])
    assert layer.blob_names == ["weight", "bias"]
    assert tuple(layer.weight.shape) == (8, 2, 3, 3)
    assert torch.all(layer.bias == 0.5) and 0.05 < layer.weight.std().item() < 0.15
    (y,) = layer(torch.randn(5, 4, 11, 10))
    assert y.shape == (5, 8, 9, 8)
    nobias = make('type: "Convolution" convolution_param { num_output: 2 kernel_size: 1 '
                  'bias_term: false }', [(1, 3, 2, 2)])
    assert nobias.blob_names == ["weight"]
    deconv = make('type: "Deconvolution" convolution_param { num_output: 6 kernel_size: 4 '
                  'stride: 2 pad: 1 group: 3 }', [(1, 9, 5, 5)])
    assert tuple(deconv.weight.shape) == (9, 2, 4, 4)
    assert deconv.infer_top_shapes([(3, 9, 5, 7)]) == [(3, 6, 10, 14)]


def test_pooling_shapes():
    def shape(text, s):
        return make('type: "Pooling" pooling_param { %s }' % text, [s]).infer_top_shapes([s])[0]

    assert shape("pool: MAX kernel_size: 3 stride: 2", (1, 1, 13, 13)) == (1, 1, 6, 6)
    assert shape("pool: MAX kernel_size: 3 stride: 2", (1, 1, 14, 14)) == (1, 1, 7, 7)  # ceil
    assert shape("pool: MAX kernel_size: 2 stride: 2 pad: 1", (1, 1, 5, 5)) == (1, 1, 3, 3)
    assert shape("pool: AVE global_pooling: true", (2, 3, 7, 5)) == (2, 3, 1, 1)
    assert shape("pool: MAX kernel_size: 2 stride: 3", (1, 1, 6, 6)) == (1, 1, 3, 3)
    assert shape("pool: MAX kernel_size: 3 stride: 2 round_mode: FLOOR", (1, 1, 14, 14)) == (1, 1, 6, 6)


@pytest.mark.parametrize("text,shapes,err,tops", [
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 pad: 2 }', [(1, 1, 5, 5)],
     SchemaError, ("y",)),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 global_pooling: true }',
     [(1, 1, 5, 5)], SchemaError, ("y",)),
    ('type: "Pooling" pooling_param { pool: MAX global_pooling: true stride: 2 }',
     [(1, 1, 5, 5)], SchemaError, ("y",)),
    ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 3 pad: 1 }', [(1, 1, 5, 5)],
     SchemaError, ("y",)),
    ('type: "Pooling" pooling_param { pool: AVE kernel_size: 2 }', [(1, 1, 5, 5)],
     GraphError, ("y", "m")),
    ('type: "Pooling" pooling_param { pool: MAX }', [(1, 1, 5, 5)], SchemaError, ("y",)),
    ('type: "Pooling" pooling_param { pool: MAX kernel_size: 2 }', [(1, 5, 5)], ShapeError, ("y",)),
    ('type: "LRN" lrn_param { local_size: 4 }', [(1, 3, 5, 5)], SchemaError, ("y",)),
    ('type: "Convolution" convolution_param { num_output: 3 kernel_size: 3 group: 2 }',
     [(1, 4, 5, 5)], ShapeError, ("y",)),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 group: 3 }',
     [(1, 6, 5, 5)], ShapeError, ("y",)),
    ('type: "Convolution" convolution_param { num_output: 4 }', [(1, 6, 5, 5)], SchemaError, ("y",)),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 }',
     [(1, 6, 5, 5)], GraphError, ("y", "z")),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 kernel_h: 3 '
     'kernel_w: 3 }', [(1, 6, 5, 5)], SchemaError, ("y",)),
    ('type: "Convolution" convolution_param { num_output: 4 kernel_size: 3 stride: 0 }',
     [(1, 6, 5, 5)], SchemaError, ("y",)),
    ('type: "SPP" spp_param { pyramid_height: 0 }', [(1, 1, 5, 5)], SchemaError, ("y",)),
])
def test_bad_parameters(text, shapes, err, tops):
    with pytest.raises(err):
        make(text, shapes, tops=tops)


def test_runtime_shape_errors():
    conv = make('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }',
                [(1, 3, 5, 5)])
    with pytest.raises(ShapeError):
        conv(torch.zeros(1, 4, 5, 5))
    with pytest.raises(ShapeError):
        conv(torch.zeros(1, 3, 1, 1))  # output size 0 (Caffe: (1 - 3) / 1 + 1 = -1)
    deconv = make('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 2 '
                  'pad: 3 }', [(1, 3, 2, 2)])
    with pytest.raises(ShapeError):
        deconv(torch.zeros(1, 3, 2, 2))
    spp = make('type: "SPP" spp_param { pyramid_height: 4 }', [(1, 1, 3, 3)])
    with pytest.raises(ShapeError):
        spp(torch.zeros(1, 1, 3, 3))  # 8 bins over 3 pixels: pad >= kernel in Caffe


def test_lrn_reference_across_and_within():
    rng = np.random.RandomState(3)
    xn = rng.randn(2, 5, 3, 4) * 2
    x = torch.from_numpy(xn)
    n, alpha, beta, k = 3, *(float(np.float32(v)) for v in (0.7, 0.8, 1.7))  # proto floats
    (y,) = make('type: "LRN" lrn_param { local_size: 3 alpha: 0.7 beta: 0.8 k: 1.7 }', [xn.shape])(x)
    ref = np.empty_like(xn)
    for c in range(5):
        lo, hi = max(0, c - 1), min(5, c + 2)
        ref[:, c] = xn[:, c] * (k + alpha / n * (xn[:, lo:hi] ** 2).sum(1)) ** -beta
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12)
    (y,) = make('type: "LRN" lrn_param { local_size: 3 alpha: 0.7 beta: 0.8 k: 1.7 '
                'norm_region: WITHIN_CHANNEL }', [xn.shape])(x)
    padded = np.pad(xn ** 2, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ref = np.empty_like(xn)
    for h in range(3):
        for w in range(4):
            s = padded[:, :, h:h + 3, w:w + 3].sum((2, 3))
            ref[:, :, h, w] = xn[:, :, h, w] * (1 + alpha / 9 * s) ** -beta
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12)


def test_im2col_channel_major_order():
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    (y,) = make('type: "Im2col" convolution_param { kernel_size: 2 }', [(1, 2, 3, 4)])(x)
    assert y.shape == (1, 8, 2, 3)
    # row c * 4 + i * 2 + j holds x[c, oh + i, ow + j]
    for c, i, j in np.ndindex(2, 2, 2):
        assert torch.equal(y[0, c * 4 + i * 2 + j], x[0, c, i:i + 2, j:j + 3])


def test_layers_run_on_meta_and_float64():
    for text, shape in (
        ('type: "Convolution" convolution_param { num_output: 2 kernel_size: 3 }', (1, 3, 5, 5)),
        ('type: "Deconvolution" convolution_param { num_output: 2 kernel_size: 3 stride: 2 }',
         (1, 3, 5, 5)),
        ('type: "Pooling" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 2 }', (1, 3, 5, 5)),
        ('type: "Pooling" pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 }', (1, 3, 5, 5)),
        ('type: "LRN"', (1, 3, 5, 5)),
        ('type: "SPP" spp_param { pyramid_height: 2 }', (1, 3, 5, 5)),
    ):
        layer = make(text, [shape])
        layer.infer_top_shapes([shape])
        (y,) = layer.double()(torch.randn(*shape, dtype=torch.float64).abs())
        assert y.dtype == torch.float64
