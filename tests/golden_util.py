"""Compare caffe-compat with a golden .npz recorded from real Caffe (tests/golden/oracle.py)."""
from __future__ import annotations

import pathlib
import re
from typing import Iterable

import numpy as np
from google.protobuf import text_format
import torch

from caffe_compat import Net
from caffe_compat.layers.base import BuildContext
from caffe_compat.layers.registry import resolve
from caffe_compat.protos import caffe_pb2

_SPLIT = re.compile(r"_split_\d+$")
FLT_MAX = float(np.finfo(np.float32).max)


def _rel_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


def check_golden(path, *, rtol: float = 1e-5, grad_rtol: float = 1e-5,
                 skip_blobs: Iterable[str] = (), check_backward: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 device: str = "cpu") -> Net:
    """Build the recorded net, load its params, run forward/backward, compare everything.

    Blob values are compared relative to the blob's max magnitude (``rtol``), as are diffs
    (``grad_rtol``).  Returns the net for further checks.
    """
    g = np.load(str(path), allow_pickle=False)
    keys = list(g.keys())
    phase = "train" if int(g["phase"]) == 0 else "test"
    net = Net(str(g["prototxt"]), phase=phase)
    net.to(dtype)
    with torch.no_grad():
        for k in keys:
            if k.startswith("param/"):
                _, lname, i = k.split("/")
                blob = net.layer(lname).caffe_blobs()[int(i)]
                blob.copy_(torch.from_numpy(g[k]).reshape(blob.shape))
    net.to(device)
    if channels_last:
        net.channels_last()
    inputs = {}
    for k in keys:
        if k.startswith("input/"):
            t = torch.from_numpy(g[k]).to(dtype=dtype, device=device)
            t.requires_grad_(check_backward)
            inputs[k[len("input/"):]] = t
    outs = net.forward(**inputs)
    skip = set(skip_blobs)
    for k in keys:
        if k.startswith("blob/"):
            name = k[len("blob/"):]
            if name in skip or _SPLIT.search(name):
                continue  # Caffe's auto-inserted split blobs have no counterpart here
            _rel_close(net.blobs[name].detach().cpu().numpy(), g[k], rtol, f"blob '{name}'")
    if not check_backward:
        return net
    tops, diffs = [], []
    for k in keys:
        if k.startswith("top_diff/"):
            name = k[len("top_diff/"):]
            if outs[name].requires_grad:
                tops.append(outs[name])
                diffs.append(torch.from_numpy(g[k]).to(dtype=dtype, device=device).reshape(outs[name].shape))
    wrt, wrt_keys = [], []
    for k in keys:
        if k.startswith("diff/"):
            t = inputs[k[len("diff/"):]]
            wrt.append(t)
            wrt_keys.append(k)
        elif k.startswith("param_diff/"):
            _, lname, i = k.split("/")
            p = net.layer(lname).caffe_blobs()[int(i)]
            if isinstance(p, torch.nn.Parameter) and p.requires_grad:
                wrt.append(p)
                wrt_keys.append(k)
    with net.precision():
        grads = torch.autograd.grad(tops, wrt, diffs, allow_unused=True) if tops else [None] * len(wrt)
    for k, t, gr in zip(wrt_keys, wrt, grads):
        expected = g[k]
        actual = np.zeros(expected.shape, np.float32) if gr is None else gr.detach().cpu().numpy()
        _rel_close(actual.reshape(expected.shape), expected, grad_rtol, k)
    return net


def golden_files(family: str) -> list:
    d = pathlib.Path(__file__).parent / "golden" / family
    return sorted(d.glob("*.npz"))


# ---- layer-by-layer replay of a golden net (no Net): used by the layer-family tests
def rel_close(actual, expected, rtol, what=""):
    """max |a - e| <= rtol * max |e|; entries at +-FLT_MAX (Caffe's empty MAX windows) and
    NaN must match exactly and do not set the scale."""
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    actual = actual.astype(np.float64)
    expected = np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    special = np.isnan(expected) | (np.abs(expected) >= FLT_MAX)
    np.testing.assert_array_equal(actual[special], expected[special], err_msg=what)
    a, e = actual[~special], expected[~special]
    if e.size == 0:
        return
    scale = max(float(np.abs(e).max()), 1e-6)
    err = float(np.abs(a - e).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"




def run_golden_layers(path, dtype=torch.float32, rtol=1e-5, grad_rtol=1e-5):
    """Build the recorded net's layers directly (no Net), load params, compare all blobs
    after forward and the input/param diffs after backward with the recorded top diffs."""
    g = np.load(str(path), allow_pickle=False)
    netp = text_format.Parse(str(g["prototxt"]), caffe_pb2.NetParameter())
    phase = "TRAIN" if int(g["phase"]) == 0 else "TEST"
    blobs, inputs, layers = {}, {}, {}
    for k in g.keys():
        if k.startswith("input/"):
            t = torch.from_numpy(g[k]).to(dtype).requires_grad_(True)
            inputs[k[6:]] = blobs[k[6:]] = t
    for lp in netp.layer:
        if lp.type == "Input":
            continue
        shapes = [tuple(blobs[b].shape) for b in lp.bottom]
        layer = resolve(lp)(lp, shapes, BuildContext(phase=phase))
        layer.to(dtype)
        with torch.no_grad():
            for i, b in enumerate(layer.caffe_blobs()):
                b.copy_(torch.from_numpy(g["param/%s/%d" % (lp.name, i)]).reshape(b.shape))
        inferred = layer.infer_top_shapes(shapes, [dtype] * len(shapes))
        outs = layer(*[blobs[b] for b in lp.bottom])
        assert [tuple(o.shape) for o in outs] == inferred, lp.name
        for o in outs:
            assert o.dtype == dtype
        blobs.update(zip(lp.top, outs))
        layers[lp.name] = layer
    for k in g.keys():
        if k.startswith("blob/"):
            rel_close(blobs[k[5:]], g[k], rtol, k)
    tops, diffs = [], []
    for k in g.keys():
        if k.startswith("top_diff/") and blobs[k[9:]].requires_grad:
            tops.append(blobs[k[9:]])
            diffs.append(torch.from_numpy(g[k]).to(dtype))
    wrt, keys = [], []
    for k in g.keys():
        if k.startswith("diff/"):
            wrt.append(inputs[k[5:]])
            keys.append(k)
        elif k.startswith("param_diff/"):
            _, lname, i = k.split("/")
            wrt.append(layers[lname].caffe_blobs()[int(i)])
            keys.append(k)
    if not keys:
        return
    grads = torch.autograd.grad(tops, wrt, diffs, allow_unused=True) if tops else [None] * len(wrt)
    for k, t, gr in zip(keys, wrt, grads):
        actual = torch.zeros_like(t) if gr is None else gr
        rel_close(actual.reshape(g[k].shape), g[k], grad_rtol, k)
