"""Lstm, Reverse and Transpose (CTPN's Caffe, tianzhi0549/CTPN @ f77ec9e).

References: numpy loops transcribed from the fork's CPU code (``reverse_cpu``,
``transpose_cpu``, ``LstmLayer::Forward_cpu``/``Backward_cpu`` with its gate order, its
zero initial state and its clipping of the gate pre-activation gradients), forward and
backward; and ``torch.nn.LSTM`` (an independent implementation) with the gates reordered,
where the fork's backward is the true gradient (no clipping).  OpenCV dnn has none of
the three layers under these names.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf import text_format

from caffe_compat.errors import GraphError, SchemaError, ShapeError, UnknownLayerError
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.ctpn import Lstm, Reverse, Transpose
from caffe_compat.layers.registry import lookup
from caffe_compat.net import Net
from caffe_compat.protos import caffe_pb2
from caffe_compat.weights import caffemodel_state_dict


# ============================================================================ references
def counts_of(shape):
    """Caffe's ``count(i)`` for i = 1..dims-1, then 1 (the forks' stride tables)."""
    return [int(np.prod(shape[i:], dtype=np.int64)) for i in range(1, len(shape))] + [1]


def ref_reverse_cpu(from_data, shape, axis):
    """``reverse_cpu``: to[counts[axis] * (axis_count - 2 * ind - 1) + index] = from[index]."""
    counts = counts_of(shape)
    src = from_data.reshape(-1)
    out = np.empty_like(src)
    axis_count = shape[axis]
    for index in range(src.size):
        ind = (index // counts[axis]) % axis_count
        out[counts[axis] * (axis_count - 2 * ind - 1) + index] = src[index]
    return out.reshape(shape)


def ref_transpose_cpu(from_data, from_shape, to_shape, mapping):
    """``transpose_cpu``: the multi-index of each source element, permuted by ``mapping``."""
    from_counts, to_counts = counts_of(from_shape), counts_of(to_shape)
    src = from_data.reshape(-1)
    out = np.empty_like(src)
    for index in range(src.size):
        rem, inds = index, []
        for c in from_counts:
            inds.append(rem // c)
            rem %= c
        out[sum(inds[mapping[i]] * to_counts[i] for i in range(len(mapping)))] = src[index]
    return out.reshape(to_shape)


def ref_transpose(x, dims):
    top_shape = tuple(x.shape[d] for d in dims)
    return ref_transpose_cpu(x, x.shape, top_shape, list(dims))


def ref_transpose_backward(top_diff, bottom_shape, dims):
    backward_map = [0] * len(dims)
    for i, d in enumerate(dims):
        backward_map[d] = i
    return ref_transpose_cpu(top_diff, top_diff.shape, bottom_shape, backward_map)


def sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def ref_lstm_forward(x, w_i, w_h, b):
    """``LstmLayer::Forward_cpu`` without the clip bottom; returns top and saved state."""
    t_len, n_len = x.shape[:2]
    hid = w_h.shape[1]
    pre = (x.reshape(t_len * n_len, -1) @ w_i.T + b).reshape(t_len, n_len, 4 * hid)
    gate = np.zeros_like(pre)
    cell = np.zeros((t_len, n_len, hid), x.dtype)
    top = np.zeros((t_len, n_len, hid), x.dtype)
    h0 = np.zeros((n_len, hid), x.dtype)
    c0 = np.zeros((n_len, hid), x.dtype)
    for t in range(t_len):
        h_prev = top[t - 1] if t > 0 else h0
        c_prev = cell[t - 1] if t > 0 else c0
        h_to_gate = h_prev @ w_h.T
        for n in range(n_len):
            cont = t > 0
            if cont:
                pre[t, n] += h_to_gate[n]
            for d in range(hid):
                gate[t, n, d] = sigmoid(pre[t, n, d])
                gate[t, n, hid + d] = sigmoid(pre[t, n, hid + d]) if cont else 0.0
                gate[t, n, 2 * hid + d] = sigmoid(pre[t, n, 2 * hid + d])
                gate[t, n, 3 * hid + d] = np.tanh(pre[t, n, 3 * hid + d])
                cell[t, n, d] = gate[t, n, hid + d] * c_prev[n, d] + gate[t, n, d] * gate[t, n, 3 * hid + d]
                top[t, n, d] = gate[t, n, 2 * hid + d] * np.tanh(cell[t, n, d])
    return top, dict(gate=gate, cell=cell, h0=h0, c0=c0)


def ref_lstm_backward(top_diff, x, w_i, w_h, top, saved, clipping_threshold):
    """``LstmLayer::Backward_cpu``: BPTT with the per-step clamp of the pre-gate diffs."""
    t_len, n_len, hid = top.shape
    gate, cell, h0, c0 = saved["gate"], saved["cell"], saved["h0"], saved["c0"]
    dh = top_diff.copy()  # the fork accumulates into the top's diff in place
    dcell = np.zeros_like(cell)
    dgate = np.zeros_like(gate)
    dpre = np.zeros_like(gate)
    dh0 = np.zeros_like(h0)
    dc0 = np.zeros_like(c0)
    clamped = 0
    for t in range(t_len - 1, -1, -1):
        dh_prev = dh[t - 1] if t > 0 else dh0
        dc_prev = dcell[t - 1] if t > 0 else dc0
        c_prev = cell[t - 1] if t > 0 else c0
        for n in range(n_len):
            cont = t > 0
            g = gate[t, n]
            for d in range(hid):
                tanh_c = np.tanh(cell[t, n, d])
                dgate[t, n, 2 * hid + d] = dh[t, n, d] * tanh_c
                dcell[t, n, d] += dh[t, n, d] * g[2 * hid + d] * (1 - tanh_c * tanh_c)
                dc_prev[n, d] = dcell[t, n, d] * g[hid + d] if cont else 0.0
                dgate[t, n, hid + d] = dcell[t, n, d] * c_prev[n, d] if cont else 0.0
                dgate[t, n, d] = dcell[t, n, d] * g[3 * hid + d]
                dgate[t, n, 3 * hid + d] = dcell[t, n, d] * g[d]
                dpre[t, n, d] = dgate[t, n, d] * g[d] * (1 - g[d])
                dpre[t, n, hid + d] = dgate[t, n, hid + d] * g[hid + d] * (1 - g[hid + d])
                dpre[t, n, 2 * hid + d] = dgate[t, n, 2 * hid + d] * g[2 * hid + d] * (1 - g[2 * hid + d])
                dpre[t, n, 3 * hid + d] = dgate[t, n, 3 * hid + d] * (1 - g[3 * hid + d] ** 2)
            if clipping_threshold > 0:
                clamped += int((np.abs(dpre[t, n]) > clipping_threshold).sum())
                dpre[t, n] = np.clip(dpre[t, n], -clipping_threshold, clipping_threshold)
        h_to_h = dpre[t] @ w_h
        for n in range(n_len):
            if t > 0:
                dh_prev[n] += h_to_h[n]
    dw_i = dpre.reshape(t_len * n_len, -1).T @ x.reshape(t_len * n_len, -1)
    rows = (t_len - 1) * n_len  # the fork's gemm over (T - 1) * N rows (none when T = 1)
    dw_h = dpre[1:].reshape(rows, 4 * hid).T @ top[:-1].reshape(rows, hid)
    dw_h += dpre[0].T @ h0
    db = dpre.reshape(t_len * n_len, -1).sum(0)
    dx = (dpre.reshape(t_len * n_len, -1) @ w_i).reshape(x.shape)
    return dx, dw_i, dw_h, db, clamped


# ============================================================================ helpers
def layer_param(text):
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def lstm_layer(shape, hidden, clip=0.0, std=0.5):
    p = layer_param(f'name: "lstm" type: "Lstm" bottom: "x" top: "y" lstm_param {{ '
                    f'num_output: {hidden} clipping_threshold: {clip} '
                    f'weight_filler {{ type: "gaussian" std: {std} }} '
                    f'bias_filler {{ type: "gaussian" std: {std} }} }}')
    g = torch.Generator().manual_seed(hidden * 10 + shape[0])
    return Lstm(p, [shape], BuildContext(generator=g))


def reorder_to_torch(w):
    """Fork gate rows (i, f, o, g) -> torch.nn.LSTM rows (i, f, g, o)."""
    i, f, o, g = w.chunk(4, 0)
    return torch.cat([i, f, g, o], 0)


# ============================================================================ registry
def test_registered():
    assert lookup("Lstm") is Lstm
    assert lookup("Reverse") is Reverse
    assert lookup("Transpose") is Transpose
    try:  # BVLC's "LSTM" (recurrent_param) is another layer, if this project has it
        bvlc = lookup("LSTM")
    except UnknownLayerError:
        bvlc = None
    assert bvlc is not Lstm


# ============================================================================ Transpose
@pytest.mark.parametrize("shape,dims", [
    ((2, 3, 4, 5), (3, 2, 0, 1)),   # CTPN's (N, C, H, W) -> (W, H, N, C)
    ((5, 6, 2, 1), (2, 3, 1, 0)),
    ((4,), (0,)),
    ((2, 3), (1, 0)),
    ((2, 1, 3, 2, 2), (4, 0, 3, 1, 2)),
])
def test_transpose_matches_fork_loop(shape, dims):
    rng = np.random.RandomState(len(shape))
    x = rng.randn(*shape)
    p = layer_param('name: "t" type: "Transpose" bottom: "x" top: "y" transpose_param { '
                    + " ".join(f"dim: {d}" for d in dims) + " }")
    layer = Transpose(p, [shape], BuildContext())
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    np.testing.assert_array_equal(y.detach().numpy(), ref_transpose(x, dims))
    assert layer.infer_top_shapes([shape]) == [tuple(y.shape)]
    g = rng.randn(*y.shape)
    (gx,) = torch.autograd.grad(y, xt, torch.from_numpy(g))
    np.testing.assert_array_equal(gx.numpy(), ref_transpose_backward(g, shape, dims))


@pytest.mark.parametrize("dims,shape,err,match", [
    ((0, 0, 1), (2, 3, 4), SchemaError, "permutation"),
    ((0, 1, 3), (2, 3, 4), SchemaError, "permutation"),
    ((0, -1, 1), (2, 3, 4), SchemaError, "permutation"),
    ((1, 0), (2, 3, 4), ShapeError, "2 entries"),
    ((), (2, 3), ShapeError, "0 entries"),
])
def test_transpose_errors(dims, shape, err, match):
    p = layer_param('name: "t" type: "Transpose" bottom: "x" top: "y" transpose_param { '
                    + " ".join(f"dim: {d}" for d in dims) + " }")
    with pytest.raises(err, match=match):
        Transpose(p, [shape], BuildContext())


def test_transpose_and_reverse_not_in_place():
    for text in ('type: "Transpose" transpose_param { dim: 1 dim: 0 }', 'type: "Reverse"'):
        p = layer_param(f'name: "l" bottom: "x" top: "x" {text}')
        cls = Transpose if "Transpose" in text else Reverse
        with pytest.raises(GraphError, match="in-place"):
            cls(p, [(2, 3)], BuildContext())


# ============================================================================ Reverse
@pytest.mark.parametrize("shape", [(5,), (4, 3), (3, 2, 4, 2)])
def test_reverse_matches_fork_loop(shape):
    rng = np.random.RandomState(sum(shape))
    for axis in range(len(shape)):
        x = rng.randn(*shape)
        p = layer_param(f'name: "r" type: "Reverse" bottom: "x" top: "y" reverse_param {{ axis: {axis} }}')
        layer = Reverse(p, [shape], BuildContext())
        xt = torch.from_numpy(x).requires_grad_(True)
        (y,) = layer(xt)
        np.testing.assert_array_equal(y.detach().numpy(), ref_reverse_cpu(x, shape, axis))
        g = rng.randn(*shape)
        (gx,) = torch.autograd.grad(y, xt, torch.from_numpy(g))
        # the fork's backward is the same loop applied to the top's diff
        np.testing.assert_array_equal(gx.numpy(), ref_reverse_cpu(g, shape, axis))


def test_reverse_default_axis_is_time():
    layer = Reverse(layer_param('name: "r" type: "Reverse" bottom: "x" top: "y"'), [(3, 2)], BuildContext())
    (y,) = layer(torch.arange(6.0).reshape(3, 2))
    assert y.tolist() == [[4.0, 5.0], [2.0, 3.0], [0.0, 1.0]]


@pytest.mark.parametrize("axis,shape", [(-1, (3, 2)), (2, (3, 2)), (0, ())])
def test_reverse_errors(axis, shape):
    p = layer_param(f'name: "r" type: "Reverse" bottom: "x" top: "y" reverse_param {{ axis: {axis} }}')
    with pytest.raises(ShapeError):
        Reverse(p, [shape], BuildContext())


# ============================================================================ Lstm
LSTM_CASES = [
    # shape (T, N, ...), hidden, clipping_threshold
    ((4, 3, 2, 3), 5, 0.0),
    ((1, 3, 4), 5, 0.0),        # T = 1: no recurrence, forget gate unused
    ((5, 2, 3), 4, 0.02),       # clipping active (checked below that it clamps)
    ((1, 2, 3), 3, 0.01),       # T = 1 with clipping
    ((3, 1, 1), 2, 0.0),        # one input, one sequence
    ((3, 2), 3, 0.05),          # 2-D bottom: I = 1
]


@pytest.mark.parametrize("shape,hidden,clip", LSTM_CASES)
def test_lstm_matches_fork_loops(shape, hidden, clip):
    layer = lstm_layer(shape, hidden, clip).double()
    assert [tuple(b.shape) for b in layer.caffe_blobs()] == [
        (4 * hidden, layer.inputs), (4 * hidden, hidden), (4 * hidden,)]
    rng = np.random.RandomState(hidden + len(shape))
    x = rng.randn(*shape)
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    assert tuple(y.shape) == (shape[0], shape[1], hidden)
    assert layer.infer_top_shapes([shape]) == [tuple(y.shape)]
    w_i, w_h, b = (t.detach().numpy() for t in layer.caffe_blobs())
    x3 = x.reshape(shape[0], shape[1], -1)
    top, saved = ref_lstm_forward(x3, w_i, w_h, b)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-12, atol=1e-13)
    g = rng.randn(*top.shape) * 3
    wrt = [xt, *layer.caffe_blobs()]
    grads = torch.autograd.grad(y, wrt, torch.from_numpy(g), allow_unused=True)
    # T = 1 never uses the hidden-to-hidden weights: no gradient (the solver reads it as 0)
    assert (grads[2] is None) == (shape[0] == 1)
    grads = [torch.zeros_like(w) if gr is None else gr for w, gr in zip(wrt, grads)]
    thr = float(np.float32(clip))  # the proto field is a float: 0.02 is 0.0199999995...
    dx, dw_i, dw_h, db, clamped = ref_lstm_backward(g, x3, w_i, w_h, top, saved, thr)
    if clip > 0:
        assert clamped > 0  # the case really exercises the clamp
    for got, want in zip(grads, (dx.reshape(shape), dw_i, dw_h, db)):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_lstm_clipping_changes_gradients_not_outputs():
    shape = (5, 2, 3)
    rng = np.random.RandomState(0)
    x = torch.from_numpy(rng.randn(*shape)).requires_grad_(True)
    g = torch.from_numpy(rng.randn(5, 2, 4) * 3)
    a, b = lstm_layer(shape, 4, 0.0).double(), lstm_layer(shape, 4, 0.02).double()
    b.load_state_dict(a.state_dict())
    (ya,), (yb,) = a(x), b(x)
    assert torch.equal(ya, yb)
    (ga,) = torch.autograd.grad(ya, x, g)
    (gb,) = torch.autograd.grad(yb, x, g)
    assert not torch.allclose(ga, gb)


def test_lstm_float32_matches_fork_loops():
    shape, hidden = (6, 4, 5), 8
    layer = lstm_layer(shape, hidden, 0.5, std=0.3)
    x = np.random.RandomState(1).randn(*shape).astype(np.float32)
    xt = torch.from_numpy(x).requires_grad_(True)
    (y,) = layer(xt)
    w_i, w_h, b = (t.detach().numpy() for t in layer.caffe_blobs())
    top, saved = ref_lstm_forward(x, w_i, w_h, b)
    np.testing.assert_allclose(y.detach().numpy(), top, rtol=1e-5, atol=1e-6)
    g = np.random.RandomState(2).randn(*top.shape).astype(np.float32)
    grads = torch.autograd.grad(y, [xt, *layer.caffe_blobs()], torch.from_numpy(g))
    want = ref_lstm_backward(g, x, w_i, w_h, top, saved, float(np.float32(0.5)))[:4]
    for got, w in zip(grads, want):
        np.testing.assert_allclose(got.numpy(), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(7, 3, 4), (1, 2, 4)])
def test_lstm_matches_torch_nn_lstm(shape):
    """No clipping: the fork's BPTT is the true gradient, so an independent LSTM agrees once
    its gates are reordered (i, f, o, g -> i, f, g, o) and given the single bias."""
    hidden = 6
    layer = lstm_layer(shape, hidden).double()
    ref = torch.nn.LSTM(shape[2], hidden).double()
    with torch.no_grad():
        ref.weight_ih_l0.copy_(reorder_to_torch(layer.weight_ih))
        ref.weight_hh_l0.copy_(reorder_to_torch(layer.weight_hh))
        ref.bias_ih_l0.copy_(reorder_to_torch(layer.bias))
        ref.bias_hh_l0.zero_()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    (y,) = layer(x)
    y_ref, _ = ref(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    mine = [x, layer.weight_ih, layer.weight_hh, layer.bias]
    theirs = [x, ref.weight_ih_l0, ref.weight_hh_l0, ref.bias_ih_l0]
    got = [torch.zeros_like(w) if d is None else d
           for w, d in zip(mine, torch.autograd.grad(y, mine, g, allow_unused=True))]
    want = torch.autograd.grad(y_ref, theirs, g)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, reorder_to_torch(b), rtol=1e-10, atol=1e-12)


def test_lstm_errors():
    with pytest.raises(SchemaError, match="num_output"):
        Lstm(layer_param('name: "l" type: "Lstm" bottom: "x" top: "y"'), [(2, 3, 4)], BuildContext())
    with pytest.raises(GraphError, match="second bottom"):
        Lstm(layer_param('name: "l" type: "Lstm" bottom: "x" bottom: "c" top: "y" '
                         'lstm_param { num_output: 3 }'), [(2, 1, 4), (2,)], BuildContext())
    with pytest.raises(ShapeError, match="2-D"):
        lstm_layer((5,), 3)
    layer = lstm_layer((2, 3, 4), 3)
    with pytest.raises(ShapeError, match="incompatible"):
        layer(torch.zeros(2, 3, 5))
    with pytest.raises(ShapeError, match="incompatible"):
        layer.infer_top_shapes([(2, 3, 2, 2, 1, 2)])
    # T and N may change between calls (the fork reshapes them), I may not
    assert layer.infer_top_shapes([(9, 1, 2, 2)]) == [(9, 1, 3)]


def test_lstm_blob_names_in_caffemodel(tmp_path):
    net = Net('name: "n" input: "x" input_shape { dim: 3 dim: 2 dim: 4 }\n'
              'layer { name: "lstm" type: "Lstm" bottom: "x" top: "y" lstm_param { num_output: 5 '
              'weight_filler { type: "uniform" min: -0.1 max: 0.1 } bias_filler { type: "constant" value: 0.5 } } }',
              phase="test")
    path = tmp_path / "l.caffemodel"
    net.save_weights(str(path))
    sd = caffemodel_state_dict(str(path))
    assert list(sd) == ["lstm.weight_ih", "lstm.weight_hh", "lstm.bias"]
    assert tuple(sd["lstm.weight_ih"].shape) == (20, 4) and tuple(sd["lstm.weight_hh"].shape) == (20, 5)
    assert torch.all(sd["lstm.bias"] == 0.5)
    net2 = Net('name: "n" input: "x" input_shape { dim: 3 dim: 2 dim: 4 }\n'
               'layer { name: "lstm" type: "Lstm" bottom: "x" top: "y" lstm_param { num_output: 5 } }',
               phase="test")
    net2.load_weights(str(path))
    x = torch.randn(3, 2, 4)
    torch.testing.assert_close(net2.forward(x=x)["y"], net.forward(x=x)["y"])


# ============================================================================ a tiny CTPN-style net
CTPN_NET = """
name: "tiny_ctpn"
input: "data"
input_shape { dim: 2 dim: 3 dim: 4 dim: 6 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 5 kernel_size: 3 pad: 1
    weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "to_wh" type: "Transpose" bottom: "conv" top: "conv_t"
  transpose_param { dim: 3 dim: 2 dim: 0 dim: 1 } }
layer { name: "seq" type: "Reshape" bottom: "conv_t" top: "seq"
  reshape_param { shape { dim: -1 } axis: 1 num_axes: 2 } }
layer { name: "lstm" type: "Lstm" bottom: "seq" top: "fwd"
  lstm_param { num_output: 4 CLIP
    weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "rev_in" type: "Reverse" bottom: "seq" top: "seq_r" reverse_param { axis: 0 } }
layer { name: "rlstm" type: "Lstm" bottom: "seq_r" top: "bwd_r"
  lstm_param { num_output: 4 CLIP
    weight_filler { type: "gaussian" std: 0.4 } bias_filler { type: "gaussian" std: 0.2 } } }
layer { name: "rev_out" type: "Reverse" bottom: "bwd_r" top: "bwd" reverse_param { axis: 0 } }
layer { name: "merge" type: "Concat" bottom: "fwd" bottom: "bwd" top: "merged" concat_param { axis: 2 } }
layer { name: "fc" type: "InnerProduct" bottom: "merged" top: "fc" loss_weight: 1
  inner_product_param { num_output: 3 axis: 2
    weight_filler { type: "gaussian" std: 0.5 } bias_filler { type: "gaussian" std: 0.1 } } }
"""


def _torch_lstm(layer):
    m = torch.nn.LSTM(layer.inputs, layer.hidden)
    with torch.no_grad():
        m.weight_ih_l0.copy_(reorder_to_torch(layer.weight_ih))
        m.weight_hh_l0.copy_(reorder_to_torch(layer.weight_hh))
        m.bias_ih_l0.copy_(reorder_to_torch(layer.bias))
        m.bias_hh_l0.zero_()
    return m


def test_tiny_ctpn_net_forward_backward():
    torch.manual_seed(0)
    net = Net(CTPN_NET.replace("CLIP", ""), phase="test")
    assert net.blob_shapes["seq"] == (6, 8, 5) and net.blob_shapes["fc"] == (6, 8, 3)
    x = torch.randn(2, 3, 4, 6)
    net.forward(data=x)
    net.backward()
    # the same model from torch ops and torch.nn.LSTM
    conv, fc = net.layer("conv"), net.layer("fc")
    fwd, bwd = _torch_lstm(net.layer("lstm")), _torch_lstm(net.layer("rlstm"))
    cw = conv.weight.detach().clone().requires_grad_(True)
    fw = fc.weight.detach().clone().requires_grad_(True)
    c = torch.relu(torch.nn.functional.conv2d(x, cw, conv.bias.detach(), padding=1))
    seq = c.permute(3, 2, 0, 1).reshape(6, 8, 5)
    h_f, _ = fwd(seq)
    h_b, _ = bwd(seq.flip(0))
    out = torch.cat([h_f, h_b.flip(0)], 2) @ fw.t() + fc.bias.detach()
    torch.testing.assert_close(net.blobs["fc"], out, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    torch.testing.assert_close(conv.weight.grad, cw.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fc.weight.grad, fw.grad, rtol=1e-4, atol=1e-5)
    for name, ref in (("lstm", fwd), ("rlstm", bwd)):
        lay = net.layer(name)
        torch.testing.assert_close(lay.weight_ih.grad, reorder_to_torch(ref.weight_ih_l0.grad),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lay.weight_hh.grad, reorder_to_torch(ref.weight_hh_l0.grad),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(lay.bias.grad, reorder_to_torch(ref.bias_ih_l0.grad),
                                   rtol=1e-4, atol=1e-5)


def test_tiny_ctpn_net_with_clipping_runs_backward():
    torch.manual_seed(0)
    plain = Net(CTPN_NET.replace("CLIP", ""), phase="test")
    clipped = Net(CTPN_NET.replace("CLIP", "clipping_threshold: 0.001"), phase="test")
    clipped.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 4, 6)
    for net in (plain, clipped):
        net.forward(data=x)
        net.backward()
    torch.testing.assert_close(clipped.blobs["fc"], plain.blobs["fc"])
    g_plain = plain.layer("lstm").weight_ih.grad
    g_clip = clipped.layer("lstm").weight_ih.grad
    assert torch.isfinite(g_clip).all() and not torch.allclose(g_plain, g_clip)
    # every per-step pre-gate gradient is at most 0.001, so the bias gradient (their sum over
    # T * N = 48 steps and rows) is bounded by 48 * 0.001
    assert clipped.layer("lstm").bias.grad.abs().max() <= 48 * 0.001 + 1e-7
