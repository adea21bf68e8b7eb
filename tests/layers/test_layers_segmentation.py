"""BN, Upsample, Interp (segmentation forks' layers) and SegNet's DenseImageData.

References:
- numpy loops transcribed from each fork's C++ (forward and Backward_cpu):
  SegNet/ENet ``bn_layer.cpp`` and ``upsample_layer.cpp`` (alexgkendall/caffe-segnet,
  TimoSaemann/caffe-enet), PSPNet ``bn_layer.cpp``, ``interp_layer.cpp`` and
  ``util/interp.cpp`` (hszhao/PSPNet), MobileNet-YOLO ``upsample_layer.cpp``;
- OpenCV dnn 4.x for ``Interp`` where it implements the fork's rule (``zoom_factor`` and
  ``height``/``width`` without padding: OpenCV ignores ``shrink_factor`` and ``pad_beg``/
  ``pad_end`` and refuses a second bottom).  OpenCV's Caffe importer has no ``BN`` and no
  ``Upsample`` ("Can't create layer"), so those have only the transcriptions;
- DenseImageData against the files it reads (cv2 resize: bilinear image, nearest label).
"""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import DataError, GraphError, SchemaError, ShapeError, WeightsError
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import lookup, resolve
from caffe_compat.layers.segmentation import (BN, Interp, NearestUpsample, PSPNetBN, SegNetBN,
                                              UnpoolUpsample, Upsample, interp_bilinear)
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2


# ============================================================================ references
def ref_segnet_bn(x, scale, shift, learn, dy):
    """SegNet BN Forward_cpu/Backward_cpu per channel (float64); returns top, mean, var, grads."""
    n, c, h, w = x.shape
    s, b = scale.reshape(c), shift.reshape(c)
    x3 = x.reshape(n, c, h * w)
    g3 = dy.reshape(n, c, h * w)
    if not learn:
        top = x3 * s[None, :, None] + b[None, :, None]
        dscale = (x3 * g3).sum(axis=(0, 2))
        dshift = g3.sum(axis=(0, 2))
        dx = g3 * s[None, :, None]
        return top.reshape(x.shape), None, None, dx.reshape(x.shape), dscale, dshift
    spatial_mean = x3.sum(axis=2) / (h * w)          # gemv 1/(HW)
    mean = spatial_mean.sum(axis=0) / n              # gemv 1/N
    spatial_sq = (x3 ** 2).sum(axis=2) / (h * w)
    var = spatial_sq.sum(axis=0) / n - mean ** 2     # E(X^2) - (EX)^2
    std = np.sqrt(var + 1e-9)                        # var_eps_ = 1e-9
    x_norm = (x3 - mean[None, :, None]) / std[None, :, None]
    top = x_norm * s[None, :, None] + b[None, :, None]
    # Backward_cpu, LEARN
    dscale = (x_norm * g3).sum(axis=(0, 2))
    dshift = g3.sum(axis=(0, 2))
    buf = g3 * s[None, :, None]
    bd = x_norm * buf
    bd = x_norm * bd.sum(axis=(0, 2))[None, :, None]
    bd = bd + buf.sum(axis=(0, 2))[None, :, None]
    bd = buf - bd / (n * h * w)
    dx = bd / std[None, :, None]
    return top.reshape(x.shape), mean, var, dx.reshape(x.shape), dscale, dshift


def ref_pspnet_bn(x, slope, bias, r_mean, r_var, dy, *, train, frozen, momentum, eps):
    """PSPNet BN Forward_cpu/Backward_cpu (float64): top, new running stats, grads."""
    n, c, h, w = x.shape
    s, b = slope.reshape(c), bias.reshape(c)
    x3 = x.reshape(n, c, h * w)
    g3 = dy.reshape(n, c, h * w)
    r_mean, r_var = r_mean.reshape(c).copy(), r_var.reshape(c).copy()
    if frozen or not train:
        mean = r_mean.copy()
    else:
        mean = (x3.sum(axis=2) / (h * w)).sum(axis=0) / n
        r_mean = (1 - momentum) * mean + momentum * r_mean
    xc = x3 - mean[None, :, None]
    if frozen or not train:
        var = r_var.copy()
    else:
        var = ((xc ** 2).sum(axis=2) / (h * w)).sum(axis=0) / n
        r_var = (1 - momentum) * var + momentum * r_var
    inv_std = (var + eps) ** -0.5
    x_norm = xc * inv_std[None, :, None]
    top = x_norm * s[None, :, None] + b[None, :, None]
    if frozen:
        inv = (r_var + eps) ** -0.5
        dx = g3 * (s * inv)[None, :, None]
        return top.reshape(x.shape), r_mean, r_var, dx.reshape(x.shape), None, None
    dslope = (x_norm * g3).sum(axis=(0, 2))
    dbias = g3.sum(axis=(0, 2))
    buf = g3 * s[None, :, None]
    bd = x_norm * buf
    bd = x_norm * bd.sum(axis=(0, 2))[None, :, None]
    bd = bd + buf.sum(axis=(0, 2))[None, :, None]
    bd = buf + (-1.0 / (n * h * w)) * bd
    dx = bd * inv_std[None, :, None]
    return top.reshape(x.shape), r_mean, r_var, dx.reshape(x.shape), dslope, dbias


def ref_unpool(x, mask, oh, ow):
    """SegNet Upsample Forward_cpu (sequential writes: the last one stays)."""
    n, c, h, w = x.shape
    top = np.zeros((n, c, oh, ow), x.dtype)
    for i in range(n):
        for j in range(c):
            flat = top[i, j].reshape(-1)
            for k in range(h * w):
                idx = int(mask[i, j].reshape(-1)[k])
                assert idx < oh * ow
                flat[idx] = x[i, j].reshape(-1)[k]
    return top


def ref_unpool_backward(g, mask, x_shape):
    """SegNet Upsample Backward_cpu: bottom_diff[i] = top_diff[mask[i]]."""
    n, c, h, w = x_shape
    gx = np.zeros(x_shape, g.dtype)
    for i in range(n):
        for j in range(c):
            for k in range(h * w):
                gx[i, j].reshape(-1)[k] = g[i, j].reshape(-1)[int(mask[i, j].reshape(-1)[k])]
    return gx


def ref_nearest(x, s):
    """MobileNet-YOLO Upsample Forward_cpu / Backward_cpu loops."""
    n, c, h, w = x.shape
    top = np.zeros((n, c, h * s, w * s), x.dtype)
    for a in range(n):
        for b in range(c):
            for y in range(h * s):
                for z in range(w * s):
                    top[a, b, y, z] = x[a, b, y // s, z // s]
    return top


def ref_nearest_backward(g, s):
    n, c, hs, ws = g.shape
    gx = np.zeros((n, c, hs // s, ws // s), g.dtype)
    for a in range(n):
        for b in range(c):
            for y in range(hs // s):
                for z in range(ws // s):
                    for i in range(s):
                        for j in range(s):
                            gx[a, b, y, z] += g[a, b, y * s + j, z * s + i]
    return gx


def _interp_taps(n1, n2, dt):
    """caffe_cpu_interp2's per-axis (index, next offset, lambda1, lambda0) in float arithmetic."""
    f = np.float32
    r = f(f(n1 - 1) / f(n2 - 1)) if n2 > 1 else f(0)
    out = []
    for i2 in range(n2):
        i1r = f(r * f(i2))
        i1 = int(i1r)
        p = 1 if i1 < n1 - 1 else 0
        l1 = dt(f(i1r - f(i1)))
        out.append((i1, p, l1, dt(1) - l1))
    return out


def ref_interp(x, oh, ow, pad_beg=0, pad_end=0):
    """caffe_cpu_interp2<Dtype, false> as InterpLayer::Forward_cpu calls it."""
    dt = x.dtype.type
    n, c, h, w = x.shape
    y1 = x1 = -pad_beg
    h1, w1 = h + pad_beg + pad_end, w + pad_beg + pad_end
    top = np.zeros((n, c, oh, ow), x.dtype)
    if (h1, w1) == (oh, ow):
        return x[:, :, y1:y1 + h1, x1:x1 + w1].copy()
    th, tw = _interp_taps(h1, oh, dt), _interp_taps(w1, ow, dt)
    for a in range(n):
        for b in range(c):
            d = x[a, b]
            for h2, (hh, hp, h1l, h0l) in enumerate(th):
                for w2, (ww, wp, w1l, w0l) in enumerate(tw):
                    r0, c0 = y1 + hh, x1 + ww
                    top[a, b, h2, w2] = (h0l * (w0l * d[r0, c0] + w1l * d[r0, c0 + wp])
                                         + h1l * (w0l * d[r0 + hp, c0] + w1l * d[r0 + hp, c0 + wp]))
    return top


def ref_interp_backward(g, x_shape, pad_beg=0, pad_end=0):
    """caffe_cpu_interp2_backward (accumulating adjoint) into a zeroed bottom diff."""
    dt = g.dtype.type
    n, c, h, w = x_shape
    y1 = x1 = -pad_beg
    h1, w1 = h + pad_beg + pad_end, w + pad_beg + pad_end
    oh, ow = g.shape[2:]
    gx = np.zeros(x_shape, np.float64)
    if (h1, w1) == (oh, ow):
        gx[:, :, y1:y1 + h1, x1:x1 + w1] += g
        return gx
    th, tw = _interp_taps(h1, oh, dt), _interp_taps(w1, ow, dt)
    for a in range(n):
        for b in range(c):
            for h2, (hh, hp, h1l, h0l) in enumerate(th):
                for w2, (ww, wp, w1l, w0l) in enumerate(tw):
                    v = g[a, b, h2, w2]
                    r0, c0 = y1 + hh, x1 + ww
                    gx[a, b, r0, c0] += h0l * w0l * v
                    gx[a, b, r0, c0 + wp] += h0l * w1l * v
                    gx[a, b, r0 + hp, c0] += h1l * w0l * v
                    gx[a, b, r0 + hp, c0 + wp] += h1l * w1l * v
    return gx


# ============================================================================ helpers
def build(text, bottom_shapes, phase="TEST", seed=0):
    p = text_format.Parse(text, caffe_pb2.LayerParameter())
    g = torch.Generator()
    g.manual_seed(seed)
    return resolve(p)(p, [tuple(s) for s in bottom_shapes], BuildContext(phase=phase, generator=g))


def grads(top, inputs, seed=1):
    g = torch.from_numpy(np.random.RandomState(seed).randn(*top.shape)).to(top.dtype)
    return g.numpy(), torch.autograd.grad(top, inputs, g, allow_unused=True)


def test_registered_types_and_dispatch():
    assert lookup("BN") is BN and lookup("Upsample") is Upsample and lookup("Interp") is Interp
    assert isinstance(build('name: "b" type: "BN" bottom: "x" top: "y"', [(1, 3, 2, 2)]), SegNetBN)
    assert isinstance(build('name: "b" type: "BN" bottom: "x" top: "y" bn_param { eps: 1e-4 }',
                            [(1, 3, 2, 2)]), PSPNetBN)
    assert isinstance(build('name: "u" type: "Upsample" bottom: "x" bottom: "m" top: "y"',
                            [(1, 3, 2, 2)] * 2), UnpoolUpsample)
    assert isinstance(build('name: "u" type: "Upsample" bottom: "x" top: "y"', [(1, 3, 2, 2)]),
                      NearestUpsample)
    with pytest.raises(GraphError, match="at most 2"):
        build('name: "u" type: "Upsample" bottom: "x" bottom: "m" bottom: "z" top: "y"',
              [(1, 3, 2, 2)] * 3)


# ============================================================================ BN (SegNet)
@pytest.mark.parametrize("phase", ["TRAIN", "TEST"])
@pytest.mark.parametrize("mode", ["LEARN", "INFERENCE"])
def test_segnet_bn_matches_fork(phase, mode):
    rng = np.random.RandomState(0)
    x = rng.randn(3, 4, 5, 6) * 2 + 1.5
    tops = ' top: "m" top: "v"' if mode == "LEARN" else ""
    layer = build(f'name: "bn" type: "BN" bottom: "x" top: "y"{tops} bn_param {{ bn_mode: {mode} '
                  'scale_filler { type: "uniform" min: 0.5 max: 1.5 } '
                  'shift_filler { type: "gaussian" std: 1 } }', [x.shape], phase).double()
    assert layer.blob_names == ["scale", "shift"] and layer.scale.shape == (1, 4, 1, 1)
    xt = torch.from_numpy(x).requires_grad_(True)
    outs = layer(xt)
    s, b = layer.scale.detach().numpy(), layer.shift.detach().numpy()
    dy, (gx, gs, gb) = grads(outs[0], [xt, layer.scale, layer.shift])
    top, mean, var, dx, ds, db = ref_segnet_bn(x, s, b, mode == "LEARN", dy)
    np.testing.assert_allclose(outs[0].detach().numpy(), top, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(gx.numpy(), dx, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(gs.numpy().reshape(-1), ds, rtol=1e-10)
    np.testing.assert_allclose(gb.numpy().reshape(-1), db, rtol=1e-10)
    if mode == "LEARN":  # batch statistics at TEST as well; tops 1 and 2 are mean and variance
        assert outs[1].shape == outs[2].shape == (1, 4, 1, 1)
        np.testing.assert_allclose(outs[1].numpy().reshape(-1), mean, rtol=1e-12)
        np.testing.assert_allclose(outs[2].numpy().reshape(-1), var, rtol=1e-12)
        assert not outs[1].requires_grad and not outs[2].requires_grad


def test_segnet_bn_eps_is_fixed_1e9_and_2d_bottoms():
    # a channel of variance 1e-9: the fork's 1e-9 halves the variance it divides by
    x = np.zeros((2, 1, 1, 2))
    x[:, 0, 0] = [np.sqrt(1e-9), -np.sqrt(1e-9)]
    layer = build('name: "bn" type: "BN" bottom: "x" top: "y" bn_param { bn_mode: LEARN '
                  'scale_filler { type: "constant" value: 1 } }', [x.shape]).double()
    with torch.no_grad():
        (y,) = layer(torch.from_numpy(x))
    np.testing.assert_allclose(y.numpy().reshape(-1), [1 / np.sqrt(2), -1 / np.sqrt(2)] * 2, rtol=1e-6)
    x2 = np.random.RandomState(3).randn(5, 3)
    layer = build('name: "bn" type: "BN" bottom: "x" top: "y" bn_param { '
                  'scale_filler { type: "constant" value: 2 } }', [x2.shape]).double()
    with torch.no_grad():
        (y,) = layer(torch.from_numpy(x2))
    ref = ref_segnet_bn(x2.reshape(5, 3, 1, 1), 2 * np.ones(3), np.zeros(3), True, np.zeros((5, 3, 1, 1)))[0]
    np.testing.assert_allclose(y.numpy(), ref.reshape(5, 3), rtol=1e-10)


def test_segnet_bn_errors():
    with pytest.raises(GraphError, match="INFERENCE has 1 top"):
        build('name: "b" type: "BN" bottom: "x" top: "y" top: "m" bn_param { bn_mode: INFERENCE }',
              [(1, 2, 3, 3)])
    with pytest.raises(GraphError, match="at most 3"):
        build('name: "b" type: "BN" bottom: "x" top: "y" top: "a" top: "b" top: "c"', [(1, 2, 3, 3)])
    with pytest.raises(SchemaError, match="mixes SegNet's BN fields \\(bn_mode\\).*PSPNet's \\(eps\\)"):
        build('name: "b" type: "BN" bottom: "x" top: "y" bn_param { bn_mode: LEARN eps: 1e-3 }',
              [(1, 2, 3, 3)])
    with pytest.raises(SchemaError, match="var_eps.*CTPN"):
        build('name: "b" type: "BN" bottom: "x" top: "y" bn_param { var_eps: 1e-3 }', [(1, 2, 3, 3)])
    with pytest.raises(ShapeError, match="2 to 4 axes"):
        build('name: "b" type: "BN" bottom: "x" top: "y"', [(1, 2, 3, 3, 3)])
    layer = build('name: "b" type: "BN" bottom: "x" top: "y"', [(1, 2, 3, 3)])
    with pytest.raises(ShapeError, match="3 channels"):
        layer(torch.zeros(1, 3, 3, 3))


# ============================================================================ BN (PSPNet)
PSP_BN = ('name: "bn" type: "BN" bottom: "x" top: "y" bn_param {{ '
          'slope_filler {{ type: "uniform" min: 0.5 max: 1.5 }} bias_filler {{ type: "gaussian" std: 1 }} '
          'momentum: {m} eps: {e} frozen: {f} }}')


@pytest.mark.parametrize("phase,frozen", [("TRAIN", False), ("TEST", False), ("TRAIN", True),
                                          ("TEST", True)])
def test_pspnet_bn_matches_fork(phase, frozen):
    rng = np.random.RandomState(1)
    x = rng.randn(2, 3, 4, 5) * 3 - 1
    layer = build(PSP_BN.format(m=0.8, e=1e-3, f=str(frozen).lower()), [x.shape], phase).double()
    mom, eps = float(np.float32(0.8)), float(np.float32(1e-3))  # float proto fields
    assert layer.blob_names == ["slope", "bias", "mean", "variance"]
    assert all(b.shape == (1, 3, 1, 1) for b in layer.caffe_blobs())
    # the fork starts the variance at 1 when frozen, at 0 otherwise
    assert float(layer.variance[0, 0]) == (1.0 if frozen else 0.0)
    assert isinstance(layer.slope, torch.nn.Parameter) != frozen  # frozen: never learned
    with torch.no_grad():
        layer.mean.copy_(torch.from_numpy(rng.randn(1, 3, 1, 1)))
        layer.variance.copy_(torch.from_numpy(rng.rand(1, 3, 1, 1) + 0.5))
    r_mean, r_var = layer.mean.numpy().copy(), layer.variance.numpy().copy()
    slope, bias = layer.slope.detach().numpy().copy(), layer.bias.detach().numpy().copy()
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    wanted = [xt] + ([] if frozen else [layer.slope, layer.bias])
    dy, gs = grads(y, wanted)
    top, new_mean, new_var, dx, dslope, dbias = ref_pspnet_bn(
        x, slope, bias, r_mean, r_var, dy, train=phase == "TRAIN", frozen=frozen, momentum=mom, eps=eps)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(layer.mean.numpy().reshape(-1), new_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.variance.numpy().reshape(-1), new_var, rtol=1e-12)
    np.testing.assert_allclose(gs[0].numpy(), dx, rtol=1e-9, atol=1e-12)
    if not frozen:
        np.testing.assert_allclose(gs[1].numpy().reshape(-1), dslope, rtol=1e-10)
        np.testing.assert_allclose(gs[2].numpy().reshape(-1), dbias, rtol=1e-10)
    if phase == "TRAIN" and not frozen:
        assert not np.allclose(new_mean, r_mean.reshape(-1))  # the running mean moved
        # here the fork's backward is autograd's gradient of its forward
        xa = torch.from_numpy(x).requires_grad_(True)
        d = [0, 2, 3]
        m = xa.mean(d, keepdim=True)
        v = ((xa - m) ** 2).mean(d, keepdim=True)
        ya = (xa - m) / torch.sqrt(v + eps) * torch.from_numpy(slope) + torch.from_numpy(bias)
        (ga,) = torch.autograd.grad(ya, xa, torch.from_numpy(dy))
        np.testing.assert_allclose(ga.numpy(), dx, rtol=1e-9, atol=1e-12)
    if phase == "TEST" and not frozen:
        # ... but not at TEST: the fork applies the batch formula to stored-statistics x_norm
        assert not np.allclose(dx, dy * (slope / np.sqrt(r_var + eps)))


def test_pspnet_bn_frozen_in_a_net_is_not_learned():
    text = ('name: "n" input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 } '
            'layer { name: "bn" type: "BN" bottom: "x" top: "y" bn_param { frozen: true } } '
            'layer { name: "bn2" type: "BN" bottom: "y" top: "z" bn_param { momentum: 0.5 } } ')
    net = Net(text, phase="train")
    keys = [p.key for p in net.learnable_params()]
    assert keys == ["bn2.slope", "bn2.bias"]


def _psp_net_text(bn_param: str) -> str:
    return ('name: "n" input: "x" input_shape { dim: 2 dim: 3 dim: 4 dim: 4 } '
            f'layer {{ name: "bn" type: "BN" bottom: "x" top: "y" {bn_param} }}')


def test_bn_weights_round_trip_and_form_by_blob_shapes(tmp_path):
    net = Net(_psp_net_text('bn_param { slope_filler { type: "gaussian" std: 1 } momentum: 0.5 }'),
              phase="train")
    net.forward(x=torch.randn(2, 3, 4, 4) + 2)  # moves the running statistics
    path = tmp_path / "psp.caffemodel"
    net.save_weights(str(path))
    test = Net(_psp_net_text("bn_param { eps: 1e-5 }"), weights=str(path), phase="test")
    for a, b in zip(net.layer("bn").caffe_blobs(), test.layer("bn").caffe_blobs()):
        np.testing.assert_array_equal(a.detach().numpy(), b.detach().numpy())
    assert float(test.layer("bn").mean.abs().sum()) > 0
    # no bn_param: SegNet's two blobs; a PSPNet caffemodel does not load into it
    with pytest.raises(WeightsError, match="incompatible number of blobs.*4.*2"):
        Net(_psp_net_text(""), weights=str(path), phase="test")
    from caffe_compat.weights import blob_names_for

    lp = caffe_pb2.LayerParameter(name="bn", type="BN")
    assert blob_names_for("BN", lp, 4) == ["slope", "bias", "mean", "variance"]
    assert blob_names_for("BN", lp, 2) == ["scale", "shift"]
    seg = Net(_psp_net_text('bn_param { bn_mode: INFERENCE scale_filler { type: "constant" value: 3 } }'))
    path2 = tmp_path / "seg.caffemodel"
    seg.save_weights(str(path2))
    back = Net(_psp_net_text("bn_param { bn_mode: INFERENCE }"), weights=str(path2))
    assert float(back.layer("bn").scale.detach()[0, 1]) == 3.0


# ============================================================================ Upsample (unpooling)
POOL_UNPOOL = ('name: "n" input: "x" input_shape {{ dim: {n} dim: {c} dim: {h} dim: {w} }} '
               'layer {{ name: "pool" type: "Pooling" bottom: "x" top: "p" top: "mask" '
               'pooling_param {{ pool: MAX kernel_size: {k} stride: {s} }} }} '
               'layer {{ name: "up" type: "Upsample" bottom: "p" bottom: "mask" top: "u" '
               'upsample_param {{ {up} }} }}')


@pytest.mark.parametrize("h,w,up", [
    (8, 10, "scale: 2"),
    (9, 11, "upsample_h: 9 upsample_w: 11"),       # odd sizes: ceil pooling 5 x 6 -> 9 x 11
    (9, 11, "scale: 2 pad_out_h: true pad_out_w: true"),
    (9, 10, "scale_h: 2 scale_w: 2 pad_out_h: true"),
])
def test_pool_unpool_round_trip(h, w, up):
    rng = np.random.RandomState(h * w)
    x = rng.randn(2, 3, h, w).astype(np.float32)
    net = Net(POOL_UNPOOL.format(n=2, c=3, h=h, w=w, k=2, s=2, up=up), phase="train")
    assert net.blob_shapes["u"] == (2, 3, h, w)
    xt = torch.from_numpy(x).requires_grad_(True)
    out = net.forward(x=xt)["u"]
    p, mask = net.blobs["p"].detach().numpy(), net.blobs["mask"].numpy()
    np.testing.assert_array_equal(out.detach().numpy(), ref_unpool(p, mask, h, w))
    # each window's max lands where it was, everything else is zero
    kept = out.detach().numpy() != 0
    np.testing.assert_array_equal(out.detach().numpy()[kept], x[kept])
    assert kept.reshape(2, 3, -1).sum(-1).max() == p.shape[2] * p.shape[3]
    g = rng.randn(*out.shape).astype(np.float32)
    (gx,) = torch.autograd.grad(out, xt, torch.from_numpy(g))
    # upsample backward gathers, pooling routes it back to the argmax: g where kept
    np.testing.assert_array_equal(gx.numpy(), np.where(kept, g, 0))


def test_unpool_duplicates_last_write_wins_and_backward_gathers():
    # overlapping pooling (k3 s2) can give two outputs one argmax; hand-made masks too
    x = np.array([[[[1.0, 2.0], [3.0, 4.0]]]], np.float32)
    mask = np.array([[[[5, 5], [0, 5]]]], np.float32)
    layer = build('name: "u" type: "Upsample" bottom: "x" bottom: "m" top: "y"', [x.shape] * 2)
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt, torch.from_numpy(mask))
    ref = ref_unpool(x, mask, 4, 4)
    assert ref.reshape(-1)[5] == 4.0 and ref.reshape(-1)[0] == 3.0
    np.testing.assert_array_equal(y.detach().numpy(), ref)
    g = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4) + 1
    (gx,) = torch.autograd.grad(y, xt, torch.from_numpy(g))
    np.testing.assert_array_equal(gx.numpy(), ref_unpool_backward(g, mask, x.shape))
    assert gx.numpy().reshape(-1).tolist() == [6.0, 6.0, 1.0, 6.0]  # losers get it too
    # with a real overlapping pooling, against the loops
    rng = np.random.RandomState(5)
    xs = rng.randn(1, 2, 7, 7).astype(np.float32)
    net = Net(POOL_UNPOOL.format(n=1, c=2, h=7, w=7, k=3, s=2, up="upsample_h: 7 upsample_w: 7"))
    xt = torch.from_numpy(xs).requires_grad_(True)
    u = net.forward(x=xt)["u"]
    p, m = net.blobs["p"].detach().numpy(), net.blobs["mask"].numpy()
    assert len(np.unique(m[0, 0])) < m[0, 0].size  # duplicates present
    np.testing.assert_array_equal(u.detach().numpy(), ref_unpool(p, m, 7, 7))
    g = rng.randn(*u.shape).astype(np.float32)
    (gp,) = torch.autograd.grad(u, net.blobs["p"], torch.from_numpy(g), retain_graph=True)
    np.testing.assert_array_equal(gp.numpy(), ref_unpool_backward(g, m, p.shape))


def test_unpool_mask_from_elsewhere_warns():
    text = ('name: "n" input: "x" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 } '
            'input: "m" input_shape { dim: 1 dim: 2 dim: 4 dim: 4 } '
            'layer { name: "r" type: "ReLU" bottom: "m" top: "r" } '
            'layer { name: "u" type: "Upsample" bottom: "x" bottom: "{}" top: "y" }')
    assert Net(text.replace("{}", "m")).warnings == []
    (w,) = Net(text.replace("{}", "r")).warnings
    assert "layer 'u'" in w and "ReLU" in w and "mask" in w


def test_unpool_shapes_and_errors():
    up = 'name: "u" type: "Upsample" bottom: "x" bottom: "m" top: "y" upsample_param {{ {} }}'
    s = [(1, 2, 5, 6)] * 2
    assert build(up.format("scale: 3"), s).infer_top_shapes(s) == [(1, 2, 15, 18)]
    assert build(up.format(""), s).infer_top_shapes(s) == [(1, 2, 10, 12)]  # default scale 2
    assert build(up.format("scale_h: 2 scale_w: 3 pad_out_h: true"), s).infer_top_shapes(s) == \
        [(1, 2, 9, 18)]
    # upsample_h/w win over scale and pad_out, as in the fork
    assert build(up.format("upsample_h: 7 upsample_w: 4 scale: 5 pad_out_w: true"), s) \
        .infer_top_shapes(s) == [(1, 2, 7, 4)]
    for bad, msg in [("scale: 1", "scale must be > 1"), ("upsample_h: 4", "together"),
                     ("upsample_h: 1 upsample_w: 5", "> 1"), ("scale_h: 2", "together"),
                     ("scale: 2 scale_h: 2 scale_w: 2", "not both"),
                     ("scale: 3 pad_out_h: true", "scale of 2")]:
        with pytest.raises(SchemaError, match=msg):
            build(up.format(bad), s)
    with pytest.raises(ShapeError, match="must equal the data"):
        build(up.format(""), [(1, 2, 5, 6), (1, 2, 5, 5)])
    layer = build(up.format("upsample_h: 3 upsample_w: 3"), [(1, 1, 2, 2)] * 2)
    with pytest.raises(ShapeError, match="index 9 out of range"):
        layer(torch.ones(1, 1, 2, 2), torch.tensor([[[[0.0, 1], [2, 9]]]]))
    with pytest.raises(ShapeError, match="index -1 out of range"):
        layer(torch.ones(1, 1, 2, 2), torch.tensor([[[[0.0, 1], [2, -1]]]]))
    # mask values are floats truncated toward zero, as static_cast<int>
    (y,) = layer(torch.ones(1, 1, 2, 2) * torch.tensor([1.0, 2, 3, 4]).reshape(1, 1, 2, 2),
                 torch.tensor([[[[0.9, 1.5], [4.2, 8.99]]]]))
    assert y.reshape(-1).tolist() == [1, 2, 0, 0, 3, 0, 0, 0, 4]


# ============================================================================ Upsample (nearest)
@pytest.mark.parametrize("scale", [1, 2, 3])
def test_nearest_upsample_matches_fork(scale):
    x = np.random.RandomState(scale).randn(2, 3, 4, 5)
    param = f"upsample_param {{ scale: {scale} }}" if scale != 1 else ""
    layer = build(f'name: "u" type: "Upsample" bottom: "x" top: "y" {param}', [x.shape])
    assert layer.infer_top_shapes([x.shape]) == [(2, 3, 4 * scale, 5 * scale)]
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    np.testing.assert_array_equal(y.detach().numpy(), ref_nearest(x, scale))
    g, (gx,) = grads(y, [xt])
    np.testing.assert_allclose(gx.numpy(), ref_nearest_backward(g, scale), rtol=1e-12)


def test_nearest_upsample_errors():
    with pytest.raises(SchemaError, match="scale_h.*2 bottoms"):
        build('name: "u" type: "Upsample" bottom: "x" top: "y" upsample_param { scale_h: 2 scale_w: 2 }',
              [(1, 2, 3, 3)])
    with pytest.raises(SchemaError, match=">= 1"):
        build('name: "u" type: "Upsample" bottom: "x" top: "y" upsample_param { scale: 0 }', [(1, 2, 3, 3)])
    with pytest.raises(ShapeError, match="4-D"):
        build('name: "u" type: "Upsample" bottom: "x" top: "y"', [(2, 3, 3)])


# ============================================================================ Interp
INTERP = 'name: "i" type: "Interp" bottom: "x" top: "y" interp_param {{ {} }}'


@pytest.mark.parametrize("params,out", [
    ("zoom_factor: 3", (16, 19)),                        # h + (h - 1)(z - 1)
    ("shrink_factor: 2", (3, 4)),                        # (h - 1) / s + 1
    ("shrink_factor: 3", (2, 3)),
    ("shrink_factor: 2 zoom_factor: 3", (7, 10)),         # shrink, then zoom
    ("height: 9 width: 4", (9, 4)),
    ("height: 1 width: 1", (1, 1)),                       # r = 0: the corner
    ("height: 6 width: 7", (6, 7)),                       # same size: a copy
    ("zoom_factor: 2 height: 3 width: 3", (11, 13)),      # zoom alone comes first
    ("zoom_factor: 2 shrink_factor: 2 height: 3 width: 5", (3, 5)),  # then height/width
    ("zoom_factor: 8 pad_beg: -1 pad_end: -1", (25, 33)),  # 6 - 2 = 4 -> 4 + 3 * 7
    ("shrink_factor: 2 pad_beg: -1 pad_end: 0", (3, 3)),  # 5 x 6 -> 3 x 3
    ("height: 9 width: 10 pad_beg: -2 pad_end: -1", (9, 10)),
    ("height: 3 width: 4 pad_beg: -1 pad_end: -2", (3, 4)),  # crop to 3 x 4: a copy
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_interp_matches_fork(params, out, dtype):
    rng = np.random.RandomState(len(params))
    x = rng.randn(2, 3, 6, 7).astype(dtype)
    layer = build(INTERP.format(params), [x.shape])
    assert layer.infer_top_shapes([x.shape]) == [(2, 3) + out]
    pb = int(params.split("pad_beg: ")[1].split()[0]) if "pad_beg" in params else 0
    pe = int(params.split("pad_end: ")[1].split()[0]) if "pad_end" in params else 0
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    ref = ref_interp(x, *out, pb, pe)
    assert y.dtype == xt.dtype
    np.testing.assert_array_equal(y.detach().numpy(), ref)  # same float ops, same order
    g, (gx,) = grads(y, [xt])
    np.testing.assert_allclose(gx.numpy(), ref_interp_backward(g, x.shape, pb, pe),
                               rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)
    if pb or pe:  # the cropped-off border gets no gradient
        assert not gx[:, :, :-pb].any() and not gx[:, :, :, :-pb].any()


def test_interp_second_bottom_takes_its_size():
    x = np.random.RandomState(7).randn(2, 3, 5, 4).astype(np.float32)
    layer = build('name: "i" type: "Interp" bottom: "x" bottom: "r" top: "y"', [x.shape, (2, 8, 9, 11)])
    assert layer.infer_top_shapes([x.shape, (2, 1, 9, 11)]) == [(2, 3, 9, 11)]
    xt = torch.from_numpy(x).requires_grad_(True)
    ref_t = torch.zeros(2, 8, 9, 11, requires_grad=True)
    (y,) = layer(xt, ref_t)
    np.testing.assert_array_equal(y.detach().numpy(), ref_interp(x, 9, 11))
    gx, gr = torch.autograd.grad(y.sum(), [xt, ref_t], allow_unused=True)
    assert gr is None  # the size reference gets no gradient
    with pytest.raises(SchemaError, match="second bottom.*zoom_factor"):
        build('name: "i" type: "Interp" bottom: "x" bottom: "r" top: "y" interp_param { zoom_factor: 2 }',
              [x.shape, (2, 8, 9, 11)])
    with pytest.raises(ShapeError, match="batch size"):
        build('name: "i" type: "Interp" bottom: "x" bottom: "r" top: "y"', [x.shape, (1, 8, 9, 11)])


def test_interp_errors():
    s = [(1, 2, 6, 7)]
    for bad, err, msg in [("pad_beg: 1", SchemaError, "<= 0"), ("height: 4", SchemaError, "needs"),
                          ("", SchemaError, "needs zoom_factor"),
                          ("shrink_factor: 0", SchemaError, "shrink_factor must be >= 1"),
                          ("zoom_factor: 0", SchemaError, "zoom_factor must be >= 1"),
                          ("zoom_factor: 2 pad_beg: -3 pad_end: -3", ShapeError, "leaves no input"),
                          ("height: 0 width: 3", ShapeError, "positive")]:
        with pytest.raises(err, match=msg):
            build(INTERP.format(bad), s)


@pytest.mark.parametrize("params", ["zoom_factor: 3", "height: 13 width: 5", "height: 4 width: 17"])
def test_interp_matches_opencv(tmp_path, params):
    proto = tmp_path / "interp.prototxt"
    proto.write_text('name: "t" input: "data" input_shape { dim: 1 dim: 3 dim: 6 dim: 7 } '
                     f'layer {{ name: "i" type: "Interp" bottom: "data" top: "out" '
                     f'interp_param {{ {params} }} }}')
    x = np.random.RandomState(11).randn(1, 3, 6, 7).astype(np.float32)
    cvnet = cv2.dnn.readNetFromCaffe(str(proto))
    cvnet.setInput(x)
    expected = cvnet.forward()
    ours = Net(str(proto)).forward(data=torch.from_numpy(x))["out"].numpy()
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)  # OpenCV sums in another order


def test_interp_function_is_usable_alone():
    x = torch.arange(4.0).reshape(1, 1, 2, 2)
    y = interp_bilinear(x, 3, 3)
    assert y[0, 0].tolist() == [[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]


# ============================================================================ DenseImageData
def write_pairs(root, sizes, seed=0, classes=5):
    """Images whose channel 0 equals their label image (so alignment survives crops/flips)."""
    rng = np.random.RandomState(seed)
    pairs = []
    for i, (h, w) in enumerate(sizes):
        lab = rng.randint(0, classes, size=(h, w)).astype(np.uint8)
        img = rng.randint(0, 256, size=(h, w, 3)).astype(np.uint8)
        img[:, :, 0] = lab
        cv2.imwrite(str(root / f"im{i}.png"), img)
        cv2.imwrite(str(root / f"lab{i}.png"), lab)
        pairs.append((f"im{i}.png", f"lab{i}.png", img, lab))
    return pairs


def dense(text, phase="TRAIN", seed=0):
    from caffe_compat.layers.dense_image_data import DenseImageData

    layer = build(f'name: "d" type: "DenseImageData" top: "data" top: "label" {text}', [], phase, seed)
    assert isinstance(layer, DenseImageData)
    return layer


def test_dense_image_data_reads_pairs_in_order(tmp_path):
    pairs = write_pairs(tmp_path, [(5, 6)] * 3)
    # whitespace-separated pairs, across lines; an unpaired last token is dropped
    (tmp_path / "list.txt").write_text("im0.png lab0.png\nim1.png\tlab1.png  im2.png\nlab2.png\nstray")
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 2 } transform_param { mean_value: 10 scale: 0.5 }')
    assert layer.infer_top_shapes() == [(2, 3, 5, 6), (2, 1, 5, 6)]
    seq = [0, 1, 2, 0]
    for b in range(2):
        data, label = layer()
        assert data.shape == (2, 3, 5, 6) and label.shape == (2, 1, 5, 6)
        for j in range(2):
            _, _, img, lab = pairs[seq[2 * b + j]]
            np.testing.assert_array_equal(data[j].numpy(), (img.transpose(2, 0, 1) - 10.0) * 0.5)
            np.testing.assert_array_equal(label[j, 0].numpy(), lab)  # no mean, no scale


def test_dense_image_data_resize_label_nearest(tmp_path):
    pairs = write_pairs(tmp_path, [(9, 13)], classes=4)
    (tmp_path / "list.txt").write_text("im0.png lab0.png\n")
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 1 new_height: 7 new_width: 5 is_color: false }')
    data, label = layer()
    _, _, img, lab = pairs[0]
    gray = cv2.imread(str(tmp_path / "im0.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(data[0, 0].numpy(), cv2.resize(gray, (5, 7)))
    np.testing.assert_array_equal(label[0, 0].numpy(), cv2.resize(lab, (5, 7), interpolation=cv2.INTER_NEAREST))
    assert set(np.unique(label.numpy())) <= {0, 1, 2, 3}
    assert not np.array_equal(cv2.resize(lab, (5, 7)), cv2.resize(lab, (5, 7), interpolation=cv2.INTER_NEAREST))


def test_dense_image_data_crop_mirror_keep_pairs_aligned(tmp_path):
    pairs = write_pairs(tmp_path, [(8, 9)] * 2, classes=200)
    (tmp_path / "list.txt").write_text("im0.png lab0.png im1.png lab1.png")
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 2 crop_height: 4 crop_width: 5 mirror: true shuffle: true }', "TEST", seed=4)
    assert layer.infer_top_shapes() == [(2, 3, 4, 5), (2, 1, 4, 5)]
    windows = set()
    for _ in range(12):
        data, label = layer()
        np.testing.assert_array_equal(data[:, 0].numpy(), label[:, 0].numpy())  # same window, same flip
        for j in range(2):
            found = None
            for _, _, img, lab in pairs:
                for flip in (False, True):
                    src = lab[:, ::-1] if flip else lab
                    for y in range(5):
                        for x in range(5):
                            if np.array_equal(src[y:y + 4, x:x + 5], label[j, 0].numpy()):
                                found = (flip, y, x)
                                im = (img[:, ::-1] if flip else img)[y:y + 4, x:x + 5]
                                np.testing.assert_array_equal(data[j].numpy(), im.transpose(2, 0, 1))
            assert found is not None
            windows.add(found)
    # random at TEST too (the fork's crop is never centred), both flips seen
    assert len(windows) > 4 and {f for f, _, _ in windows} == {False, True}


def test_dense_image_data_variable_sizes_and_divide_factor(tmp_path):
    write_pairs(tmp_path, [(5, 6), (7, 4)])
    (tmp_path / "list.txt").write_text("im0.png lab0.png\nim1.png lab1.png\n")
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 1 }')
    shapes = [tuple(t.shape) for _ in range(2) for t in layer()]
    assert shapes == [(1, 3, 5, 6), (1, 1, 5, 6), (1, 3, 7, 4), (1, 1, 7, 4)]
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 2 }')
    with pytest.raises(DataError, match="first image"):
        layer()
    # ENet's label_divide_factor: labels resized (nearest) to new size / factor
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" '
                  'batch_size: 2 new_height: 8 new_width: 6 label_divide_factor: 2 }')
    assert layer.infer_top_shapes() == [(2, 3, 8, 6), (2, 1, 4, 3)]
    data, label = layer()
    lab1 = cv2.imread(str(tmp_path / "lab1.png"), cv2.IMREAD_GRAYSCALE)
    np.testing.assert_array_equal(label[1, 0].numpy(),
                                  cv2.resize(lab1, (3, 4), interpolation=cv2.INTER_NEAREST))


def test_dense_image_data_errors(tmp_path):
    write_pairs(tmp_path, [(5, 6)])
    cv2.imwrite(str(tmp_path / "small.png"), np.zeros((4, 6), np.uint8))
    src = f'source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/"'
    for bad, msg in [("new_height: 4", "together"), ("crop_width: 3", "together"),
                     ("batch_size: 0", "batch_size"), ("label_divide_factor: 0", ">= 1"),
                     ("label_divide_factor: 2", "needs new_height")]:
        with pytest.raises(SchemaError, match=msg):
            dense(f"dense_image_data_param {{ {src} batch_size: 1 {bad} }}".replace(
                "batch_size: 1 batch_size: 0", "batch_size: 0"))
    with pytest.raises(SchemaError, match="transform_param.mirror"):
        dense(f"dense_image_data_param {{ {src} batch_size: 1 }} transform_param {{ mirror: true }}")
    with pytest.raises(SchemaError, match="crop_size"):
        dense(f"dense_image_data_param {{ {src} batch_size: 1 }} transform_param {{ crop_size: 3 }}")
    layer = dense(f'dense_image_data_param {{ {src} batch_size: 1 mean_file: "m.binaryproto" }}')
    assert "transform_param.mean_file" in layer.lint([])[0]
    layer = dense(f'dense_image_data_param {{ source: "{tmp_path}/absent.txt" batch_size: 1 }}')
    assert layer.infer_top_shapes() == [None, None]
    with pytest.raises(DataError, match="absent.txt"):
        layer()
    (tmp_path / "list.txt").write_text("im0.png small.png\n")
    layer = dense(f"dense_image_data_param {{ {src} batch_size: 1 }}")
    with pytest.raises(DataError, match="small.png.*4 x 6.*5 x 6.*must match"):
        layer()
    (tmp_path / "list.txt").write_text("im0.png nolabel.png\n")
    with pytest.raises(DataError, match="could not load label image.*nolabel.png"):
        dense(f"dense_image_data_param {{ {src} batch_size: 1 }}")()
    (tmp_path / "list.txt").write_text("im0.png lab0.png\n")
    with pytest.raises(DataError, match="smaller than the crop"):
        dense(f"dense_image_data_param {{ {src} batch_size: 1 crop_height: 6 crop_width: 2 }}")()


# ============================================================================ a tiny SegNet
SEGNET = """
name: "tiny_segnet"
layer {{ name: "data" type: "DenseImageData" top: "data" top: "label"
  dense_image_data_param {{ source: "{src}" root_folder: "{root}/" batch_size: 2 mirror: true shuffle: true }}
  transform_param {{ mean_value: 128 scale: 0.0078125 }} }}
layer {{ name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn1" type: "BN" bottom: "conv1" top: "conv1"
  bn_param {{ scale_filler {{ type: "constant" value: 1 }}
             shift_filler {{ type: "constant" value: 0.01 }} }} }}
layer {{ name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }}
layer {{ name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" top: "mask1"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
  convolution_param {{ num_output: 8 kernel_size: 3 pad: 1 weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn2" type: "BN" bottom: "conv2" top: "conv2"
  bn_param {{ slope_filler {{ type: "constant" value: 1 }} momentum: 0.9 }} }}
layer {{ name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }}
layer {{ name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" top: "mask2"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "up2" type: "Upsample" bottom: "pool2" bottom: "mask2" top: "up2"
  upsample_param {{ upsample_h: 5 upsample_w: 7 }} }}
layer {{ name: "conv3" type: "Convolution" bottom: "up2" top: "conv3"
  convolution_param {{ num_output: 6 kernel_size: 3 pad: 1 weight_filler {{ type: "msra" }} }} }}
layer {{ name: "bn3" type: "BN" bottom: "conv3" top: "conv3"
  bn_param {{ scale_filler {{ type: "constant" value: 1 }} }} }}
layer {{ name: "relu3" type: "ReLU" bottom: "conv3" top: "conv3" }}
layer {{ name: "up1" type: "Upsample" bottom: "conv3" bottom: "mask1" top: "up1"
  upsample_param {{ scale: 2 }} }}
layer {{ name: "score" type: "Convolution" bottom: "up1" top: "score"
  convolution_param {{ num_output: 3 kernel_size: 3 pad: 1 weight_filler {{ type: "msra" }} }} }}
layer {{ name: "interp" type: "Interp" bottom: "score" bottom: "data" top: "score_full" }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "score_full" bottom: "label" top: "loss" }}
"""


def test_tiny_segnet_trains(tmp_path):
    write_pairs(tmp_path, [(10, 14)] * 4, classes=3)
    (tmp_path / "list.txt").write_text("".join(f"im{i}.png lab{i}.png\n" for i in range(4)))
    net = Net(SEGNET.format(src=tmp_path / "list.txt", root=tmp_path), phase="train")
    assert net.blob_shapes["pool2"] == (2, 8, 3, 4) and net.blob_shapes["up2"] == (2, 8, 5, 7)
    assert net.blob_shapes["score_full"] == (2, 3, 10, 14)
    params = net.learnable_params()
    assert {"bn1.scale", "bn1.shift", "bn2.slope", "bn2.bias"} <= {p.key for p in params}
    losses = []
    for _ in range(8):
        for p in params:
            p.param.grad = None
        net.forward()
        net.backward()
        losses.append(float(net.loss.detach()))
        for p in params:
            g = p.param.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, p.key
            with torch.no_grad():
                p.param -= 0.05 * g
    assert np.isfinite(losses).all() and min(losses[-3:]) < losses[0]
    assert float(net.layer("bn2").mean.abs().sum()) > 0  # PSPNet BN's running mean moved
