"""Caffe's weight fillers (``FillerParameter``) as torch functions.

Distributions and fan computations follow Caffe's ``filler.hpp``; the random streams do not
(Caffe used Boost's MT19937), so filled values are equal in law, not bit for bit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from caffe_compat.errors import SchemaError
from caffe_compat.limits import check_shape

FILLER_TYPES = ("constant", "uniform", "gaussian", "positive_unitball", "xavier", "msra", "bilinear")
#: elements of the sparse gaussian's keep-mask made at a time (memory stays the blob's own)
_MASK_CHUNK = 1 << 22


def _fans(shape: Sequence[int]) -> tuple[int, int]:
    count = math.prod(shape)
    fan_in = count // shape[0] if shape and shape[0] else count
    fan_out = count // shape[1] if len(shape) > 1 and shape[1] else count
    return fan_in, fan_out


def _variance_n(filler, shape: Sequence[int]) -> float:
    fan_in, fan_out = _fans(shape)
    norm = filler.variance_norm
    # VarianceNorm: FAN_IN = 0, FAN_OUT = 1, AVERAGE = 2
    if norm == 2:
        return (fan_in + fan_out) / 2.0
    if norm == 1:
        return float(fan_out)
    return float(fan_in)


def fill(shape: Sequence[int], filler=None, *, generator: Optional[torch.Generator] = None,
         dtype: torch.dtype = torch.float32, layer: Optional[str] = None) -> torch.Tensor:
    """A new tensor of ``shape`` filled as Caffe's ``FillerParameter`` says.

    ``filler`` is a ``caffe_pb2.FillerParameter`` (or None for Caffe's default, constant 0).
    """
    shape = tuple(int(s) for s in shape)
    check_shape(shape, what="blob", layer=layer)  # before allocating anything
    t = torch.empty(shape, dtype=dtype)
    if filler is None:
        return t.zero_()
    kind = filler.type
    g = generator
    if t.numel() == 0 and kind in FILLER_TYPES:
        return t  # nothing to fill (and no fan to divide by)
    if kind == "constant":
        t.fill_(filler.value)
    elif kind == "uniform":
        if filler.min > filler.max:
            raise SchemaError(f"uniform filler needs min <= max, got min {filler.min:g} > max "
                              f"{filler.max:g}", layer=layer)
        t.uniform_(filler.min, filler.max, generator=g)
    elif kind == "gaussian":
        if not filler.std >= 0:
            raise SchemaError(f"gaussian filler needs std >= 0, got {filler.std:g}", layer=layer)
        t.normal_(filler.mean, filler.std, generator=g)
        if filler.sparse >= 0 and t.numel():
            # Each weight is kept with probability sparse / num_outputs (Caffe: shape(0)).
            p = min(1.0, filler.sparse / float(shape[0]))
            flat = t.view(-1)
            for a in range(0, flat.numel(), _MASK_CHUNK):  # a mask of the whole blob would double it
                part = flat[a:a + _MASK_CHUNK]
                part.mul_(torch.empty_like(part).bernoulli_(p, generator=g))
    elif kind == "positive_unitball":
        if not shape:
            raise SchemaError("positive_unitball filler needs a blob with at least one axis "
                              "(it normalizes each row of shape[0])", layer=layer)
        t.uniform_(0, 1, generator=g)
        if t.numel():
            flat = t.reshape(shape[0], -1)
            flat.div_(flat.sum(dim=1, keepdim=True))
    elif kind == "xavier":
        scale = math.sqrt(3.0 / _variance_n(filler, shape))
        t.uniform_(-scale, scale, generator=g)
    elif kind == "msra":
        std = math.sqrt(2.0 / _variance_n(filler, shape))
        t.normal_(0.0, std, generator=g)
    elif kind == "bilinear":
        if len(shape) < 3 or shape[-1] != shape[-2]:
            raise SchemaError(f"bilinear filler needs a square kernel, got shape {shape}", layer=layer)
        k = shape[-1]
        f = math.ceil(k / 2.0)
        c = (2 * f - 1 - f % 2) / (2.0 * f)
        x = torch.arange(k, dtype=torch.float64)
        w1 = 1 - (x / f - c).abs()
        kern = (w1[:, None] * w1[None, :]).to(dtype)
        t.copy_(kern.expand(shape))
    else:
        raise SchemaError(
            f"unknown filler type '{kind}'; allowed: {', '.join(FILLER_TYPES)}", layer=layer)
    return t
