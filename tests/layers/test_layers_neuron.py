"""Neuron layers against real Caffe (golden files from tests/golden/make_neuron.py) and,
for layers the oracle lacks (Clip, Swish, Dropout at TRAIN), against numpy references."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from golden_util import check_golden, run_golden_layers
from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import resolve
from caffe_compat.protos import caffe_pb2
from conftest import GOLDEN as GOLDEN_DIR

GOLDEN = sorted((GOLDEN_DIR / "neuron").glob("*.npz"))


# ---------------------------------------------------------------------------- helpers
def make(text: str, shapes, phase: str = "TEST", seed: int = 0):
    p = text_format.Parse('name: "l" ' + text, caffe_pb2.LayerParameter())
    if not p.bottom:
        p.bottom.extend(["x%d" % i for i in range(len(shapes))])
    if not p.top:
        p.top.append("y")
    ctx = BuildContext(phase=phase, generator=torch.Generator().manual_seed(seed))
    return resolve(p)(p, [tuple(s) for s in shapes], ctx)


# ---------------------------------------------------------------------------- golden
def test_golden_files_exist():
    names = {p.stem for p in GOLDEN}
    for must in ("relu", "prelu_shared", "power_sqrt", "exp_base_scale_shift", "log_base10",
                 "threshold", "dropout_test", "bnll", "elu_alpha"):
        assert must in names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_layer(path, dtype):
    run_golden_layers(path, dtype)


@pytest.mark.parametrize("path", GOLDEN, ids=[p.stem for p in GOLDEN])
def test_golden_net(path):
    check_golden(path)


# ---------------------------------------------------------------------------- kinks and special cases
def test_relu_kink_gradient_is_slope():
    x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    for slope in (0.0, 0.2):
        (y,) = make('type: "ReLU" relu_param { negative_slope: %g }' % slope, [(3,)])(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        assert g.tolist() == pytest.approx([slope, slope, 1.0])


def test_prelu_blobs_and_default_filler():
    layer = make('type: "PReLU"', [(2, 3, 4)])
    assert layer.blob_names == ["weight"] and tuple(layer.weight.shape) == (3,)
    assert torch.all(layer.weight == 0.25)
    shared = make('type: "PReLU" prelu_param { channel_shared: true }', [(2, 3, 4)])
    assert tuple(shared.weight.shape) == ()
    filled = make('type: "PReLU" prelu_param { filler { type: "constant" value: 0.5 } }', [(2, 3)])
    assert torch.all(filled.weight == 0.5)
    with pytest.raises(ShapeError):
        make('type: "PReLU"', [(5,)])
    with pytest.raises(ShapeError):
        layer(torch.zeros(2, 4, 4))


def caffe_power_grad_ref(x, power, scale, shift):
    """Caffe's PowerLayer::Backward_cpu formulas in numpy (float64)."""
    x = x.astype(np.float64)
    ds = power * scale
    with np.errstate(all="ignore"):
        y = (shift + scale * x) ** power
        if ds == 0:
            return np.zeros_like(x)
        if power == 1:
            return np.full_like(x, ds)
        if power == 2:
            return ds * scale * x + ds * shift
        if shift == 0:
            return power * y / x
        return ds * y / (scale * x + shift)


@pytest.mark.parametrize("power,scale,shift", [(3, 1, 0), (0.5, 1, 0), (0.5, 2, -1), (-1, 1, 0),
                                               (2, 1.5, -0.5), (3, -2, 1), (0, 2, 1), (1, 2, 1)])
def test_power_gradient_matches_caffe_formula_incl_zero_base(power, scale, shift):
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)
    layer = make('type: "Power" power_param { power: %g scale: %g shift: %g }'
                 % (power, scale, shift), [(5,)])
    (y,) = layer(x)
    with np.errstate(all="ignore"):
        y_ref = np.broadcast_to(
            (shift + scale * x.detach().numpy()) ** power if power * scale != 0
            else (1.0 if power == 0 else shift ** power), (5,))
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, equal_nan=True)
    (g,) = torch.autograd.grad(y.sum(), x)
    ref = caffe_power_grad_ref(x.detach().numpy(), power, scale, shift)
    np.testing.assert_allclose(g.numpy(), ref, rtol=1e-12, equal_nan=True)


def test_power_zero_base_gives_caffe_nan():
    # Caffe: dy/dx = power * y / x at x = 0 is 0/0 (the derivative would be 0)
    x = torch.zeros(3, requires_grad=True)
    (y,) = make('type: "Power" power_param { power: 3 }', [(3,)])(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.isnan(g).all()


def test_power_constant_has_zero_gradient_even_for_inf():
    x = torch.tensor([float("inf"), 1.0], requires_grad=True)
    (y,) = make('type: "Power" power_param { power: 0 }', [(2,)])(x)
    assert y.tolist() == [1.0, 1.0]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [0.0, 0.0]


def test_exp_log_bad_base():
    with pytest.raises(SchemaError):
        make('type: "Exp" exp_param { base: -2 }', [(3,)])
    with pytest.raises(SchemaError):
        make('type: "Log" log_param { base: 0 }', [(3,)])
    with pytest.raises(SchemaError):
        make('type: "Log" log_param { base: 1 }', [(3,)])


def test_threshold_has_no_gradient():
    x = torch.tensor([-1.0, 0.5, 0.5001, 2.0], requires_grad=True)
    (y,) = make('type: "Threshold" threshold_param { threshold: 0.5 }', [(4,)])(x)
    assert y.tolist() == [0.0, 0.0, 1.0, 1.0]
    assert not y.requires_grad


def test_wrong_bottom_count():
    with pytest.raises(GraphError):
        make('type: "ReLU"', [(3,), (3,)])


def test_absval_refuses_in_place():
    with pytest.raises(GraphError):
        make('type: "AbsVal" bottom: "x" top: "x"', [(3,)])


def test_in_place_clip_passes_gradient_like_caffe():
    # Caffe's in-place Clip reads the (clipped) top as bottom data: every position passes
    x = torch.tensor([-3.0, 0.5, 3.0], requires_grad=True)
    (y,) = make('type: "Clip" bottom: "x" top: "x" clip_param { min: -1 max: 1 }', [(3,)])(x)
    assert y.tolist() == [-1.0, 0.5, 1.0]
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.tolist() == [1.0, 1.0, 1.0]


# ---------------------------------------------------------------------------- Clip (BVLC master)
def clip_ref(x, lo, hi):
    y = np.array([max(lo, min(v, hi)) if not np.isnan(v) else lo for v in x.ravel()])
    g = np.array([1.0 if lo <= v <= hi else 0.0 for v in x.ravel()])
    return y.reshape(x.shape), g.reshape(x.shape)


def test_clip_forward_backward_bounds_inclusive():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 1.0, 1.5, 2.0, 7.0], requires_grad=True)
    layer = make('type: "Clip" clip_param { min: -1 max: 2 }', [(8,)])
    (y,) = layer(x)
    top_diff = torch.arange(1.0, 9.0)
    (g,) = torch.autograd.grad(y, x, top_diff)
    y_ref, mask = clip_ref(x.detach().numpy(), -1.0, 2.0)
    np.testing.assert_array_equal(y.detach().numpy(), y_ref)
    np.testing.assert_array_equal(g.numpy(), mask * top_diff.numpy())
    assert g[1] == 2.0 and g[6] == 7.0  # x == min and x == max pass the gradient


def test_clip_random_and_nan():
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(2, 3, 4, 5)).requires_grad_(True)
    (y,) = make('type: "Clip" clip_param { min: -0.5 max: 0.75 }', [(2, 3, 4, 5)])(x)
    y_ref, mask = clip_ref(x.detach().numpy(), np.float32(-0.5), np.float32(0.75))
    np.testing.assert_array_equal(y.detach().numpy(), y_ref)
    d = torch.from_numpy(rng.randn(2, 3, 4, 5))
    (g,) = torch.autograd.grad(y, x, d)
    np.testing.assert_array_equal(g.numpy(), mask * d.numpy())
    (yn,) = make('type: "Clip" clip_param { min: -1 max: 1 }', [(1,)])(torch.tensor([float("nan")]))
    assert yn.item() == -1.0  # std::max(min, std::min(NaN, max)) is min
    with pytest.raises(SchemaError):
        make('type: "Clip"', [(3,)])


# ---------------------------------------------------------------------------- Swish (BVLC master)
@pytest.mark.parametrize("beta", [1.0, 0.5, 2.0])
def test_swish_matches_caffe_formula(beta):
    rng = np.random.RandomState(1)
    xn = rng.randn(2, 3, 4) * 3
    x = torch.from_numpy(xn).requires_grad_(True)
    text = 'type: "Swish"' + ('' if beta == 1.0 else ' swish_param { beta: %g }' % beta)
    (y,) = make(text, [(2, 3, 4)])(x)
    s = 1.0 / (1.0 + np.exp(-beta * xn))
    y_ref = xn * s
    np.testing.assert_allclose(y.detach().numpy(), y_ref, rtol=1e-12, atol=1e-14)
    d = rng.randn(2, 3, 4)
    (g,) = torch.autograd.grad(y, x, torch.from_numpy(d))
    # Caffe's SwishLayer::Backward_cpu: dy * (beta * y + s * (1 - beta * y))
    g_ref = d * (beta * y_ref + s * (1.0 - beta * y_ref))
    np.testing.assert_allclose(g.numpy(), g_ref, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------- Dropout
def test_dropout_train_statistics_and_gradient():
    p = 0.3
    layer = make('type: "Dropout" dropout_param { dropout_ratio: %g }' % p, [(200, 500)], "TRAIN")
    x = (torch.rand(200, 500, generator=torch.Generator().manual_seed(3)) + 0.5).requires_grad_(True)
    (y,) = layer(x)
    kept = y != 0
    frac = kept.double().mean().item()
    assert abs(frac - (1 - p)) < 0.01
    scale = np.float32(1.0 / (1.0 - np.float32(p)))
    torch.testing.assert_close(y[kept], x[kept] * float(scale), rtol=0, atol=0)
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.float() * float(scale), rtol=0, atol=0)
    # a fresh mask on each forward
    (y2,) = layer(x)
    assert not torch.equal(y2 != 0, kept)


def test_dropout_seeded_and_test_identity():
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.5 }'
    x = torch.ones(50, 50)
    a = make(text, [(50, 50)], "TRAIN", seed=7)(x)[0]
    b = make(text, [(50, 50)], "TRAIN", seed=7)(x)[0]
    assert torch.equal(a, b)
    assert set(a.unique().tolist()) == {0.0, 2.0}
    t = make(text, [(50, 50)], "TEST")(x)[0]
    assert torch.equal(t, x)


def test_dropout_fork_scale_train_false():
    text = 'type: "Dropout" dropout_param { dropout_ratio: 0.25 scale_train: false }'
    x = torch.full((100, 100), 2.0, requires_grad=True)
    (y,) = make(text, [(100, 100)], "TRAIN")(x)
    assert set(y.unique().tolist()) == {0.0, 2.0}  # no scaling at TRAIN
    assert abs((y != 0).double().mean().item() - 0.75) < 0.02
    (t,) = make(text, [(100, 100)], "TEST")(x)
    torch.testing.assert_close(t, x * 0.75)  # times 1 / scale = 1 - p at TEST
    (g,) = torch.autograd.grad(t.sum(), x)
    torch.testing.assert_close(g, torch.full_like(x, 0.75))


def test_dropout_bad_ratio():
    with pytest.raises(SchemaError):
        make('type: "Dropout" dropout_param { dropout_ratio: 1.0 }', [(3,)])


def test_dropout_meta_shape():
    layer = make('type: "Dropout"', [(2, 3)], "TRAIN")
    assert layer.infer_top_shapes([(4, 5)]) == [(4, 5)]


# ---------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("text,positive", [
    ('type: "PReLU"', False),
    ('type: "PReLU" prelu_param { channel_shared: true }', False),
    ('type: "ELU" elu_param { alpha: 0.7 }', False),
    ('type: "BNLL"', False),
    ('type: "Power" power_param { power: 0.5 scale: 2 shift: 0.1 }', True),
    ('type: "Power" power_param { power: -1.5 scale: 1 shift: 0 }', True),
    ('type: "Exp" exp_param { base: 3 scale: 0.5 shift: -1 }', False),
    ('type: "Log" log_param { base: 2 scale: 3 shift: 0.5 }', True),
    ('type: "Swish" swish_param { beta: 1.7 }', False),
    ('type: "Sigmoid"', False),
    ('type: "TanH"', False),
])
def test_gradcheck(text, positive):
    layer = make(text, [(2, 3, 3)]).double()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 3, generator=g, dtype=torch.float64)
    x = x.abs() + 0.2 if positive else x + 0.05 * torch.sign(x)  # keep away from kinks
    x.requires_grad_(True)
    params = [p for p in layer.parameters()]
    for p in params:
        p.data.uniform_(0.1, 0.5)
    assert torch.autograd.gradcheck(lambda x: layer(x)[0], (x,))
    if params:
        def fp(w):
            return torch.func.functional_call(layer, {"weight": w}, (x,))[0]
        assert torch.autograd.gradcheck(fp, (params[0].detach().clone().requires_grad_(True),))
