"""Loss layers against real Caffe (tests/golden/loss, made by tests/golden/make_loss.py) and,
where the oracle lacks a feature (BVLC master's SigmoidCrossEntropyLoss ignore/normalization,
master's InfogainLoss, Accuracy's master tie rule), against numpy loops written from the
C++ formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import DataError, GraphError, SchemaError, ShapeError
from caffe_compat.layers import loss as L
from caffe_compat.layers.base import BuildContext
from caffe_compat.protos import caffe_pb2
from conftest import ROOT

GOLDEN = ROOT / "tests" / "golden" / "loss"
FILES = sorted(GOLDEN.glob("*.npz"))
LEGACY_INFOGAIN = sorted((GOLDEN / "infogain_probs").glob("*.npz"))
FLT_MIN = float(np.finfo(np.float32).tiny)


def layer_param(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def build(text: str, shapes, phase: str = "TEST"):
    from caffe_compat.layers.registry import resolve

    p = layer_param(text)
    return resolve(p)(p, [tuple(s) for s in shapes], BuildContext(phase=phase))


def rel_close(actual, expected, rtol, what):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual - expected).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


# ---------------------------------------------------------------------------- golden, per layer
def _golden_layers(g):
    net = text_format.Parse(str(g["prototxt"]), caffe_pb2.NetParameter())
    return [lp for lp in net.layer if lp.type not in ("Input", "Scale")]


def run_layer_golden(path, dtype=torch.float32):
    """Build the golden's layer alone, feed the recorded bottoms, compare tops and diffs."""
    g = np.load(str(path), allow_pickle=False)
    (lp,) = _golden_layers(g)
    bottoms = []
    for b in lp.bottom:
        t = torch.from_numpy(g["blob/" + b]).to(dtype)
        t.requires_grad_(True)  # labels too: the layer must simply give them no gradient
        bottoms.append(t)
    from caffe_compat.layers.registry import resolve

    layer = resolve(lp)(lp, [tuple(t.shape) for t in bottoms], BuildContext(phase="TEST"))
    assert layer.infer_top_shapes([tuple(t.shape) for t in bottoms]) == [g["blob/" + t].shape for t in lp.top]
    tops = layer(*bottoms)
    for name, t in zip(lp.top, tops):
        assert t.dtype == dtype
        rel_close(t.detach().numpy(), g["blob/" + name], 1e-5, f"{path.name}: top {name}")
    if not any(k.startswith("top_diff/") for k in g.keys()):
        return layer, tops
    outs, diffs = [], []
    for name, t in zip(lp.top, tops):
        if t.requires_grad:
            outs.append(t)
            diffs.append(torch.from_numpy(g["top_diff/" + name]).to(dtype).reshape(t.shape))
    grads = torch.autograd.grad(outs, bottoms, diffs, allow_unused=True)
    for name, t, gr in zip(lp.bottom, bottoms, grads):
        expected = g["diff/" + name]
        actual = np.zeros(expected.shape) if gr is None else gr.numpy()
        rel_close(actual.reshape(expected.shape), expected, 1e-5, f"{path.name}: diff {name}")
    return layer, tops


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_layer(path):
    run_layer_golden(path)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_layer_float64(path):
    run_layer_golden(path, torch.float64)


def test_golden_set_is_complete():
    """Every loss layer type has Caffe goldens (InfogainLoss: the probability-input ones)."""
    types = {lp.type for p in FILES + LEGACY_INFOGAIN for lp in _golden_layers(np.load(str(p)))}
    assert types >= {"SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss",
                     "InfogainLoss", "ContrastiveLoss", "MultinomialLogisticLoss", "Accuracy"}
    assert sum(p.stat().st_size for p in GOLDEN.rglob("*")) < 400_000


def test_softmax_saturated_matches_caffe_clamp():
    """-log(max(p, FLT_MIN)) caps an underflowed probability at 87.3365; an unclamped
    log_softmax gives a different loss, so the golden tells the two apart."""
    g = np.load(str(GOLDEN / "softmax_saturated.npz"))
    _, (loss,) = run_layer_golden(GOLDEN / "softmax_saturated.npz")
    x = torch.from_numpy(g["blob/x"]).double()
    y = torch.from_numpy(g["blob/label"]).long()
    unclamped = float(-torch.log_softmax(x, 1).gather(1, y[:, None]).mean())
    assert abs(unclamped - float(g["blob/loss"])) > 10
    assert float(loss.detach()) == pytest.approx(float(g["blob/loss"]), rel=1e-5)
    assert math.isclose(-math.log(FLT_MIN), 87.33654, rel_tol=1e-6)


# ---------------------------------------------------------------------------- InfogainLoss vs the oracle
@pytest.mark.parametrize("path", LEGACY_INFOGAIN, ids=[p.stem for p in LEGACY_INFOGAIN])
def test_infogain_against_probability_oracle(path, monkeypatch):
    """The oracle's InfogainLoss takes probabilities p; master's takes scores and applies
    softmax.  With scores log(p), master's loss equals the oracle's, and master's gradient is
    the oracle's pushed through the softmax Jacobian: p * (g - <g, p>)."""
    monkeypatch.chdir(ROOT)  # the golden's infogain source path is relative to the repo root
    g = np.load(str(path))
    (lp,) = _golden_layers(g)
    p = g["input/p"].astype(np.float64)
    x = torch.tensor(np.log(p), requires_grad=True)
    label = torch.from_numpy(g["input/label"]).double()
    shapes = [x.shape, label.shape] + ([g["input/H"].shape] if len(lp.bottom) == 3 else [])
    layer = L.InfogainLoss(lp, shapes, BuildContext())
    args = [x, label] + ([torch.from_numpy(g["input/H"]).double()] if len(lp.bottom) == 3 else [])
    (loss,) = layer(*args)
    rel_close(loss.detach().numpy(), g["blob/loss"], 1e-5, "loss")
    top_diff = float(g["top_diff/loss"])
    (gx,) = torch.autograd.grad(loss, x, torch.tensor(top_diff, dtype=torch.float64))
    gp = g["diff/ps" if "diff/ps" in g else "diff/p"].astype(np.float64)
    expected = p * (gp - (gp * p).sum(1, keepdims=True))
    rel_close(gx.numpy(), expected, 1e-5, "diff")


def infogain_ref(x, lab, H, axis, ignore, mode):
    """BVLC master's InfogainLoss forward/backward as loops (top diff 1)."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    c = x.shape[-1]
    outer = int(np.prod(x.shape[:axis]))
    xf = x.reshape(-1, c)
    e = np.exp(xf - xf.max(1, keepdims=True))
    prob = e / e.sum(1, keepdims=True)
    labf = np.asarray(lab).reshape(-1).astype(int)
    loss, count = 0.0, 0
    grad = np.zeros_like(prob)
    for i, y in enumerate(labf):
        if ignore is not None and y == ignore:
            continue
        count += 1
        for l in range(c):
            loss -= H[y, l] * math.log(max(prob[i, l], 1e-20))
            grad[i, l] = prob[i, l] * H[y].sum() - H[y, l]
    n = {"FULL": len(labf), "VALID": count, "BATCH_SIZE": outer, "NONE": 1}[mode]
    n = max(1, n)
    grad = np.moveaxis((grad / n).reshape(x.shape), -1, axis)
    return loss / n, grad, np.moveaxis(prob.reshape(x.shape), -1, axis)


@pytest.mark.parametrize("mode", ["FULL", "VALID", "BATCH_SIZE", "NONE"])
@pytest.mark.parametrize("axis", [1, 2, -1])
def test_infogain_master_semantics(mode, axis):
    rng = np.random.RandomState(3)
    x = rng.randn(2, 3, 4) * 2
    ax = axis % 3
    c = x.shape[ax]
    lab_shape = tuple(s for i, s in enumerate(x.shape) if i != ax)
    lab = rng.randint(0, c, size=lab_shape)
    lab.flat[1] = 9  # ignored
    H = rng.rand(c, c) + np.eye(c)
    layer = build(f'name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" bottom: "H" top: "loss" top: "prob" '
                  f'infogain_loss_param {{ axis: {axis} }} loss_param {{ ignore_label: 9 normalization: {mode} }}',
                  [x.shape, lab.shape, H.shape])
    assert layer.infer_top_shapes([x.shape, lab.shape, H.shape]) == [(), x.shape]
    xt = torch.tensor(x, requires_grad=True)
    loss, prob = layer(xt, torch.tensor(lab, dtype=torch.float64), torch.tensor(H))
    ref_loss, ref_grad, ref_prob = infogain_ref(x, lab, H, ax, 9, mode)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(prob.detach().numpy(), ref_prob, rtol=1e-12)
    assert not prob.requires_grad  # like SoftmaxWithLoss's prob top: no gradient through it
    (gx,) = torch.autograd.grad(loss, xt)
    np.testing.assert_allclose(gx.numpy(), ref_grad, rtol=1e-10, atol=1e-14)


def test_infogain_source_file_relative_to_cwd(tmp_path, monkeypatch):
    from caffe_compat.io import array_to_blob

    rng = np.random.RandomState(0)
    H = (rng.rand(4, 4) + np.eye(4)).astype(np.float32)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "H.binaryproto").write_bytes(array_to_blob(H.reshape(1, 1, 4, 4)).SerializeToString())
    monkeypatch.chdir(tmp_path)
    text = ('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" top: "loss" '
            'infogain_loss_param { source: "h/H.binaryproto" }')
    layer = build(text, [(3, 4), (3,)])
    x = rng.randn(3, 4)
    lab = np.array([0, 3, 1])
    (loss,) = layer(torch.tensor(x), torch.tensor(lab, dtype=torch.float64))
    assert loss.item() == pytest.approx(infogain_ref(x, lab, H.astype(np.float64), 1, None, "VALID")[0], rel=1e-6)
    # a missing file: the net still builds (shapes are known), forward names the path
    layer = build(text.replace("h/H", "nope/H"), [(3, 4), (3,)])
    assert layer.infer_top_shapes([(3, 4), (3,)]) == [()]
    with pytest.raises(DataError, match="nope/H.binaryproto"):
        layer(torch.tensor(x), torch.tensor(lab, dtype=torch.float64))


def test_infogain_errors():
    with pytest.raises(SchemaError, match="source"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" top: "loss"', [(3, 4), (3,)])
    with pytest.raises(SchemaError, match="normalize"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" bottom: "H" top: "loss" '
              'loss_param { normalize: true }', [(3, 4), (3,), (4, 4)])
    with pytest.raises(ShapeError, match="H must be 4x4"):
        build('name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" bottom: "H" top: "loss"',
              [(3, 4), (3,), (3, 3)])
    with pytest.raises(GraphError):
        build('name: "ig" type: "InfogainLoss" bottom: "x" top: "loss"', [(3, 4)])


# ---------------------------------------------------------------------------- SoftmaxWithLoss extras
def test_softmax_prob_top_is_softmax_without_gradient():
    rng = np.random.RandomState(1)
    x = torch.tensor(rng.randn(2, 3, 4), requires_grad=True)
    lab = torch.tensor([[0.0, 1, 2, 1], [2, 2, 0, 1]])
    layer = build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" top: "prob"',
                  [x.shape, lab.shape])
    assert layer.infer_top_shapes([x.shape, lab.shape]) == [(), (2, 3, 4)]
    loss, prob = layer(x, lab)
    torch.testing.assert_close(prob, torch.softmax(x, 1).detach())
    assert not prob.requires_grad  # Caffe ignores the prob top's diff
    ref = -torch.log_softmax(x, 1).gather(1, lab.long().unsqueeze(1)).mean()
    torch.testing.assert_close(loss, ref.detach())


@pytest.mark.parametrize("text", [
    'loss_param { ignore_label: 1 normalization: VALID }',
    'loss_param { ignore_label: 1 normalization: FULL }',
    'loss_param { normalize: false }',
    'softmax_param { axis: 2 }',
])
def test_softmax_gradcheck(text):
    rng = np.random.RandomState(2)
    x = torch.tensor(rng.randn(2, 3, 3), requires_grad=True)
    lab = torch.tensor(rng.randint(0, 3, size=(2, 3)), dtype=torch.float64)
    layer = build(f'name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" {text}',
                  [x.shape, lab.shape])
    assert torch.autograd.gradcheck(lambda t: layer(t, lab)[0], (x,))


def test_loss_label_errors():
    layer = build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"', [(2, 3), (2,)])
    with pytest.raises(DataError, match="label value 3 out of range"):
        layer(torch.zeros(2, 3), torch.tensor([0.0, 3.0]))
    with pytest.raises(ShapeError, match="number of labels"):
        build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"', [(2, 3, 2), (2,)])
    with pytest.raises(ShapeError, match="first dimension"):
        build('name: "l" type: "EuclideanLoss" bottom: "x" bottom: "y" top: "loss"', [(2, 3), (3, 2)])
    with pytest.raises(ShapeError, match="out of range"):
        build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss" '
              'softmax_param { axis: 3 }', [(2, 3), (2,)])
    with pytest.raises(GraphError):
        build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "a" top: "b" top: "c"',
              [(2, 3), (2,)])
    with pytest.raises(DataError):
        build('name: "l" type: "MultinomialLogisticLoss" bottom: "x" bottom: "y" top: "loss"',
              [(2, 3), (2,)])(torch.full((2, 3), 0.3), torch.tensor([0.0, -1.0]))


def test_labels_truncate_like_static_cast():
    """Caffe reads float labels with static_cast<int>: 1.9 is class 1."""
    layer = build('name: "l" type: "SoftmaxWithLoss" bottom: "x" bottom: "y" top: "loss"', [(2, 3), (2,)])
    x = torch.randn(2, 3, dtype=torch.float64)
    a = layer(x, torch.tensor([1.9, 0.2], dtype=torch.float64))[0]
    b = layer(x, torch.tensor([1.0, 0.0], dtype=torch.float64))[0]
    assert float(a) == float(b)


# ---------------------------------------------------------------------------- SigmoidCrossEntropyLoss (master)
def sigmoid_ce_ref(x, t, ignore, mode):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    t = np.asarray(t, np.float64).reshape(x.shape)
    loss, count = 0.0, 0
    grad = np.zeros_like(x)
    for i in range(x.size):
        xi, ti = x.flat[i], t.flat[i]
        if ignore is not None and int(ti) == ignore:
            continue
        pos = float(xi >= 0)
        loss -= xi * (ti - pos) - math.log(1 + math.exp(xi - 2 * xi * pos))
        grad.flat[i] = 1 / (1 + math.exp(-xi)) - ti
        count += 1
    n = {"FULL": x.size, "VALID": count, "BATCH_SIZE": x.shape[0], "NONE": 1}[mode]
    n = max(n, 1)
    return loss / n, grad / n


@pytest.mark.parametrize("norm,mode", [
    ("normalization: FULL", "FULL"), ("normalization: VALID", "VALID"),
    ("normalization: BATCH_SIZE", "BATCH_SIZE"), ("normalization: NONE", "NONE"),
    ("", "BATCH_SIZE"), ("normalize: true", "VALID"), ("normalize: false", "BATCH_SIZE")])
def test_sigmoid_ce_ignore_and_normalization(norm, mode):
    rng = np.random.RandomState(4)
    x = rng.randn(3, 2, 2) * 3
    t = (rng.rand(3, 2, 2) > 0.5).astype(np.float64)
    t[0, 0, 0] = t[2, 1, 1] = t[1, 0, 1] = -1
    layer = build(f'name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" '
                  f'loss_param {{ ignore_label: -1 {norm} }}', [x.shape, t.shape])
    xt = torch.tensor(x, requires_grad=True)
    tt = torch.tensor(t, requires_grad=True)
    (loss,) = layer(xt, tt)
    ref_loss, ref_grad = sigmoid_ce_ref(x, t, -1, mode)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    gx, gt = torch.autograd.grad(loss, [xt, tt], allow_unused=True)
    assert gt is None
    np.testing.assert_allclose(gx.numpy().reshape(3, -1), ref_grad, rtol=1e-10, atol=1e-15)


def test_sigmoid_ce_all_ignored_and_extremes():
    layer = build('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss" '
                  'loss_param { ignore_label: 7 normalization: VALID }', [(2, 2), (2, 2)])
    (loss,) = layer(torch.tensor([[1e4, -1e4], [0.0, 3.0]]), torch.full((2, 2), 7.0))
    assert loss.item() == 0.0
    layer = build('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss"',
                  [(1, 2), (1, 2)])
    (loss,) = layer(torch.tensor([[1e4, -1e4]]), torch.tensor([[0.0, 1.0]]))
    assert loss.item() == pytest.approx(2e4)  # stable form: no overflow


def test_sigmoid_ce_gradcheck():
    rng = np.random.RandomState(5)
    x = torch.tensor(rng.randn(2, 5), requires_grad=True)
    t = torch.tensor(rng.rand(2, 5))
    layer = build('name: "s" type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "loss"',
                  [x.shape, t.shape])
    assert torch.autograd.gradcheck(lambda a: layer(a, t)[0], (x,))


# ---------------------------------------------------------------------------- other gradchecks
@pytest.mark.parametrize("text,bottoms", [
    ('type: "EuclideanLoss"', lambda r: [r.randn(3, 4), r.randn(3, 2, 2)]),
    ('type: "HingeLoss" hinge_loss_param { norm: L2 }', lambda r: [r.randn(3, 4), np.array([0.0, 3, 1])]),
    ('type: "HingeLoss"', lambda r: [r.randn(3, 4) * 0.4, np.array([0.0, 3, 1])]),
    ('type: "MultinomialLogisticLoss"', lambda r: [r.rand(3, 4) + 0.1, np.array([0.0, 3, 1])]),
])
def test_autograd_gradcheck(text, bottoms):
    rng = np.random.RandomState(6)
    arrays = bottoms(rng)
    layer = build(f'name: "l" {text} bottom: "a" bottom: "b" top: "loss"', [a.shape for a in arrays])
    ts = [torch.tensor(a, requires_grad=(i == 0 or "Euclidean" in text)) for i, a in enumerate(arrays)]
    assert torch.autograd.gradcheck(lambda *t: layer(*t)[0], tuple(ts))


def test_multinomial_logistic_clamp_gradient_is_caffe_not_autograd():
    layer = build('name: "l" type: "MultinomialLogisticLoss" bottom: "p" bottom: "y" top: "loss"',
                  [(2, 2), (2,)])
    p = torch.tensor([[0.0, 1.0], [0.5, 0.5]], requires_grad=True)
    (loss,) = layer(p, torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx((-math.log(float(np.float32(1e-20))) - math.log(0.5)) / 2, rel=1e-6)
    (g,) = torch.autograd.grad(loss, p)
    assert float(g[0, 0]) == pytest.approx(-0.5 / float(np.float32(1e-20)), rel=1e-6)  # not 0


# ---------------------------------------------------------------------------- ContrastiveLoss
def contrastive_ref(a, b, y, margin, legacy):
    n = a.shape[0]
    loss = 0.0
    ga = np.zeros_like(a)
    for i in range(n):
        d = a[i] - b[i]
        dsq = float(d @ d)
        if int(y[i]):
            loss += dsq
            ga[i] = d / n
        elif legacy:
            loss += max(margin - dsq, 0.0)
            if margin - dsq > 0:
                ga[i] = -d / n
        else:
            dist = math.sqrt(dsq)
            loss += max(margin - dist, 0.0) ** 2
            if margin - dist > 0:
                ga[i] = -(margin - dist) / (dist + 1e-4) * d / n
    return loss / n / 2, ga


def contrastive_exact(a, b, y, margin):
    d = (a - b).pow(2).sum(1)
    dis = (margin - d.sqrt()).clamp(min=0) ** 2
    return torch.where(y != 0, d, dis).sum() / a.shape[0] / 2


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_reference(legacy):
    rng = np.random.RandomState(7)
    a, b = rng.randn(8, 3) * 0.3, rng.randn(8, 3) * 0.3
    a[7] = b[7] + 2.0  # a dissimilar pair beyond the margin
    y = np.array([3, 0, 1, 0, 0, 1, 0, 0], np.float64)  # any nonzero integer is "similar"
    dist = np.sqrt(((a - b) ** 2).sum(1))
    margin_sq = 1.25 if legacy else 1.25 ** 2
    within = (y == 0) & ((dist ** 2 if legacy else dist ** 2) < margin_sq)
    assert within.sum() >= 2 and ((y == 0) & ~within).any()
    layer = build('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss" '
                  f'contrastive_loss_param {{ margin: 1.25 legacy_version: {str(legacy).lower()} }}',
                  [a.shape, b.shape, y.shape])
    at, bt, yt = (torch.tensor(v, requires_grad=True) for v in (a, b, y))
    (loss,) = layer(at, bt, yt)
    ref, ga = contrastive_ref(a, b, y, 1.25, legacy)
    assert loss.item() == pytest.approx(ref, rel=1e-12)
    g = torch.autograd.grad(loss, [at, bt, yt], allow_unused=True)
    np.testing.assert_allclose(g[0].numpy(), ga, rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(g[1].numpy(), -ga, rtol=1e-10, atol=1e-15)
    assert g[2] is None
    if not legacy:  # Caffe divides by dist + 1e-4: not the derivative of its own forward
        exact = torch.autograd.grad(contrastive_exact(at, bt, yt, 1.25), at)[0]
        assert (g[0] - exact).abs().max() > 1e-6


def test_contrastive_shape_checks():
    with pytest.raises(ShapeError):
        build('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss"',
              [(4, 3, 2, 1), (4, 3, 2, 1), (4,)])
    with pytest.raises(ShapeError):
        build('name: "c" type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "loss"',
              [(4, 3), (4, 3), (4, 2)])


# ---------------------------------------------------------------------------- Accuracy
def accuracy_ref(x, lab, k, axis, ignore):
    """BVLC master's loop: count classes scoring >= the true class (itself included)."""
    x = np.moveaxis(np.asarray(x), axis, -1)
    c = x.shape[-1]
    xf, lf = x.reshape(-1, c), np.asarray(lab).reshape(-1).astype(int)
    hits, nums, per = 0, np.zeros(c), np.zeros(c)
    count = 0
    for row, y in zip(xf, lf):
        if ignore is not None and y == ignore:
            continue
        nums[y] += 1
        better = -1
        for v in row:
            better += v >= row[y]
        if better < k:
            hits += 1
            per[y] += 1
        count += 1
    return (hits / count if count else 0.0), np.where(nums == 0, 0, per / np.maximum(nums, 1))


def test_accuracy_ties_count_against_the_true_class():
    """Master's rule; the oracle (older partial_sort) breaks ties by class index instead."""
    x = torch.tensor([[1.0, 1, 1, 1, 1], [3, 1, 1, 1, 0], [0, 2, 2, 0, 0]])
    y = torch.tensor([4.0, 3, 1])
    for k, expected in ((1, 0.0), (2, 1 / 3), (3, 1 / 3), (4, 2 / 3), (5, 1.0)):
        layer = build(f'name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "a" '
                      f'accuracy_param {{ top_k: {k} }}', [x.shape, y.shape])
        (acc,) = layer(x, y)
        assert acc.item() == pytest.approx(expected), k
        assert acc.item() == pytest.approx(accuracy_ref(x.numpy(), y.numpy(), k, 1, None)[0])


@pytest.mark.parametrize("k,axis,ignore", [(1, 1, None), (2, 1, 0), (3, -1, 2), (1, 2, 1)])
def test_accuracy_reference(k, axis, ignore):
    rng = np.random.RandomState(8)
    x = np.round(rng.randn(3, 4, 5), 0)  # rounding makes plenty of ties
    ax = axis % 3
    c = x.shape[ax]
    lab = rng.randint(0, c, size=tuple(s for i, s in enumerate(x.shape) if i != ax)).astype(np.float64)
    ig = f"ignore_label: {ignore}" if ignore is not None else ""
    layer = build(f'name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "a" top: "pc" '
                  f'accuracy_param {{ top_k: {k} axis: {axis} {ig} }}', [x.shape, lab.shape])
    assert layer.infer_top_shapes([x.shape, lab.shape]) == [(), (c,)]
    acc, pc = layer(torch.tensor(x, requires_grad=True), torch.tensor(lab))
    ra, rpc = accuracy_ref(x, lab, k, ax, ignore)
    assert acc.item() == pytest.approx(ra)
    np.testing.assert_allclose(pc.numpy(), rpc)
    assert not acc.requires_grad and not L.Accuracy.is_loss


def test_accuracy_all_ignored_is_zero_and_topk_check():
    layer = build('name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "a" '
                  'accuracy_param { ignore_label: 1 }', [(2, 3), (2,)])
    (acc,) = layer(torch.randn(2, 3), torch.ones(2))
    assert acc.item() == 0.0
    with pytest.raises(ShapeError, match="top_k"):
        build('name: "a" type: "Accuracy" bottom: "x" bottom: "y" top: "a" accuracy_param { top_k: 4 }',
              [(2, 3), (2,)])


# ---------------------------------------------------------------------------- whole-net goldens
@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_golden_net(path):
    from golden_util import check_golden

    check_golden(path)
