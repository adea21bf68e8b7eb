"""Compare caffe-compat with a golden .npz recorded from real Caffe (tests/golden/oracle.py)."""
from __future__ import annotations

import pathlib
import re
from typing import Iterable, Optional

import numpy as np
import torch

from caffe_compat import Net

_SPLIT = re.compile(r"_split_\d+$")


def _rel_close(actual: np.ndarray, expected: np.ndarray, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if expected.size == 0:
        return
    scale = max(float(np.abs(expected).max()), 1e-6)
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert err <= rtol * scale, f"{what}: max abs err {err:.3g} > {rtol} * {scale:.3g}"


def check_golden(path, *, rtol: float = 1e-5, grad_rtol: float = 1e-4,
                 skip_blobs: Iterable[str] = (), check_backward: bool = True,
                 dtype: torch.dtype = torch.float32) -> Net:
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
    inputs = {}
    for k in keys:
        if k.startswith("input/"):
            t = torch.from_numpy(g[k]).to(dtype)
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
                diffs.append(torch.from_numpy(g[k]).to(dtype).reshape(outs[name].shape))
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
    grads = torch.autograd.grad(tops, wrt, diffs, allow_unused=True) if tops else [None] * len(wrt)
    for k, t, gr in zip(wrt_keys, wrt, grads):
        expected = g[k]
        actual = np.zeros(expected.shape, np.float32) if gr is None else gr.detach().cpu().numpy()
        _rel_close(actual.reshape(expected.shape), expected, grad_rtol, k)
    return net


def golden_files(family: str) -> list:
    d = pathlib.Path(__file__).parent / "golden" / family
    return sorted(d.glob("*.npz"))
