"""Caffe's ``caffe test``: N forward passes of a TEST net, every output printed and averaged.

The net's own data layers provide the data.  Each output blob's elements are printed per
batch (``Batch k, name = v``) and averaged at the end (``name = mean``, with the weighted
loss for loss outputs), accumulated in float32 as Caffe does, and printed as C++ streams
print floats, so the lines compare with Caffe's log.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Dict, List

import numpy as np

__all__ = ["caffe_test"]


def _fmt(v: float) -> str:
    """A float as C++ streams print it by default (6 significant digits)."""
    v = float(v)
    if np.isnan(v):
        return "nan"
    if np.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


def caffe_test(net: Any, iterations: int, echo: Callable[[str], None] = print) -> Dict[str, Any]:
    """Caffe's ``test`` loop: run ``iterations`` forwards, print and average every output.

    Returns ``{"loss": mean loss, "scores": OrderedDict(name -> float32 array of the
    per-element means), "batches": [per-batch OrderedDict(name -> array)]}``.  Sums are
    float32 (Caffe's ``vector<float>``), so the means match Caffe's to the last bit of
    their inputs.
    """
    import torch

    from caffe_compat.errors import SchemaError

    if iterations < 1:
        raise SchemaError(f"--iterations must be >= 1, got {iterations}")
    weights: Dict[str, float] = {}
    for e in net.entries:                      # the last writer of a blob sets its loss weight
        for t, w in zip(e.tops, e.loss_weights):
            weights[t] = float(w)
    echo(f"Running for {iterations} iterations.")
    sums: "OrderedDict[str, np.ndarray]" = OrderedDict()
    batches: List["OrderedDict[str, np.ndarray]"] = []
    loss = np.float32(0.0)
    with torch.no_grad():
        for i in range(iterations):
            outs = net.forward()
            iter_loss = np.float32(net.loss.item()) if net.loss is not None else np.float32(0.0)
            loss = np.float32(loss + iter_loss)
            batch: "OrderedDict[str, np.ndarray]" = OrderedDict()
            for name, t in outs.items():
                vals = t.detach().to(torch.float32).cpu().numpy().reshape(-1).copy()
                batch[name] = vals
                if i == 0:
                    sums[name] = vals.copy()
                else:
                    sums[name] = (sums[name] + vals).astype(np.float32)
                for v in vals:
                    echo(f"Batch {i}, {name} = {_fmt(v)}")
            batches.append(batch)
    loss = np.float32(loss / np.float32(iterations))
    echo(f"Loss: {_fmt(loss)}")
    means: "OrderedDict[str, np.ndarray]" = OrderedDict()
    for name, s in sums.items():
        mean = (s / np.float32(iterations)).astype(np.float32)
        means[name] = mean
        w = np.float32(weights.get(name, 0.0))
        for v in mean:
            extra = f" (* {_fmt(w)} = {_fmt(np.float32(w * v))} loss)" if w else ""
            echo(f"{name} = {_fmt(v)}{extra}")
    return {"loss": float(loss), "scores": means, "batches": batches}
