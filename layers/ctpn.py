"""CTPN's own Caffe layers: Lstm, Reverse and Transpose.

All three follow tianzhi0549/CTPN @ f77ec9e7c4c010c8834cf0f87111370b14a00f33
(``caffe/src/caffe/layers/{lstm,reverse,transpose}_layer.cpp``).  CTPN runs a
bidirectional LSTM along each row of its conv5 feature map: Transpose makes the width the
first (time) axis, one Lstm reads left to right, and Reverse -> Lstm -> Reverse reads right
to left.  ``Lstm`` is this fork's type (``lstm_param``), not BVLC's ``LSTM``
(``recurrent_param``, other blobs, other gate order).

Lstm in brief (``lstm_param { num_output clipping_threshold weight_filler bias_filler }``):

- bottom (T, N, ...): axis 0 is time, axis 1 the batch, the rest flattened into I inputs;
  top (T, N, H) with ``H = num_output``.
- blobs: input-to-hidden weights (4H, I), hidden-to-hidden weights (4H, H), one bias (4H);
  the 4H rows are the gates in the order **input, forget, output, cell candidate**
  (PyTorch's ``nn.LSTM`` uses input, forget, cell, output and two biases).
- each sequence starts from zero state: at t = 0 there is no recurrent term and the forget
  gate is 0, so ``c_0 = i g``.  Then ``c_t = f c_{t-1} + i g``, ``h_t = o tanh(c_t)``.
- backward is backpropagation through time, except that with ``clipping_threshold > 0``
  the fork clamps the gradient of every gate *pre-activation* (the 4H values before the
  sigmoids and tanh) to ``[-threshold, threshold]``, per time step, right where it is
  computed: the clamped values then reach the weights, the bias, the bottom and the
  previous step's hidden state (the cell-state gradient itself is not clamped).  A hook on
  each step's pre-activation does exactly that clamp inside autograd.
- ``batch_size`` is not read by the fork (N comes from the bottom), nor here.

Reverse (``reverse_param { axis }``): flips the bottom along ``axis`` (0 <= axis < dims,
negative axes are refused as by the fork); backward flips the gradient back.
Transpose (``transpose_param { dim }``): top axis i is bottom axis ``dim[i]`` (one entry
per bottom axis, a permutation); backward applies the inverse permutation.  Neither allows
in-place computation (the fork CHECKs it).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import Layer, Shape
from caffe_compat.layers.registry import register


def _no_in_place(layer: Layer) -> None:
    for t in layer.top_names:
        if t in layer.bottom_names:
            raise layer.error(GraphError, f"{layer.param.type} does not allow in-place computation "
                                          f"(top '{t}' is also a bottom)")


def _count(shape: Sequence[int], start: int = 0) -> int:
    """Caffe's ``Blob::count(start)``: product of the dims from ``start`` on."""
    n = 1
    for d in tuple(shape)[start:]:
        n *= int(d)
    return n


# ---------------------------------------------------------------------------- Lstm
def lstm_forward(x: Tensor, weight_i: Tensor, weight_h: Tensor, bias: Tensor,
                 clipping_threshold: float = 0.0) -> Tensor:
    """The fork's LSTM over ``x`` (T, N, I) from zero state; returns h (T, N, H).

    Gate rows of the weights and bias: input, forget, output, candidate (each H rows).
    With ``clipping_threshold > 0`` the gradient reaching each step's gate
    pre-activations is clamped to ``[-thr, thr]`` during backward (the fork's clipping).
    """
    t_len, n = x.shape[0], x.shape[1]
    hid = weight_h.shape[1]
    pre_all = x.reshape(t_len * n, x.shape[2]) @ weight_i.t() + bias  # input-to-gate, all steps
    pre_all = pre_all.reshape(t_len, n, 4 * hid)
    thr = float(clipping_threshold)
    clamp = thr > 0 and pre_all.requires_grad
    hs: List[Tensor] = []
    h = c = None
    for t in range(t_len):
        pre = pre_all[t] if t == 0 else pre_all[t] + h @ weight_h.t()
        if clamp:
            pre.register_hook(lambda g, thr=thr: g.clamp(-thr, thr))
        i = torch.sigmoid(pre[:, :hid])
        o = torch.sigmoid(pre[:, 2 * hid:3 * hid])
        g = torch.tanh(pre[:, 3 * hid:])
        if t == 0:
            c = i * g  # forget gate 0, no previous state
        else:
            f = torch.sigmoid(pre[:, hid:2 * hid])
            c = f * c + i * g
        h = o * torch.tanh(c)
        hs.append(h)
    if not hs:
        return pre_all.new_zeros((0, n, hid))
    return torch.stack(hs, 0)


@register("Lstm")
class Lstm(Layer):
    """CTPN's LSTM (type "Lstm"); see the module docstring.  Blobs: ``weight_ih`` (4H, I),
    ``weight_hh`` (4H, H), ``bias`` (4H,), gates ordered input, forget, output, candidate.

    The fork also accepts a second bottom of per-step "continue" flags that carries state
    between forward calls (truncated BPTT of one sequence); CTPN never uses it and it is
    refused here with a clear error.
    """

    default_blob_names = ("weight_ih", "weight_hh", "bias")
    min_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if len(bottom_shapes) > 1:
            raise self.error(GraphError, "Lstm's optional second bottom (sequence-continuation "
                                         "flags with state kept across forward calls) is not "
                                         "supported; give only the (T, N, ...) input")
        p = param.lstm_param
        if p.num_output <= 0:
            raise self.error(SchemaError, "lstm_param.num_output is required and must be > 0")
        self.hidden = int(p.num_output)
        self.clipping_threshold = float(p.clipping_threshold)
        shape = tuple(bottom_shapes[0])
        self._check(shape, None)
        self.inputs = _count(shape, 2)
        h = self.hidden
        self.add_blob("weight_ih", (4 * h, self.inputs), p.weight_filler)
        self.add_blob("weight_hh", (4 * h, h), p.weight_filler)
        self.add_blob("bias", (4 * h,), p.bias_filler)

    def _check(self, shape: Shape, inputs) -> None:
        if len(shape) < 2:
            raise self.error(ShapeError, f"bottom must be at least 2-D (T, N, ...), got {shape}")
        if inputs is not None and _count(shape, 2) != inputs:
            raise self.error(ShapeError, f"input size incompatible with the layer's weights: "
                                         f"expected {inputs} values per (t, n), got bottom {shape}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        shape = tuple(int(d) for d in bottom_shapes[0])
        self._check(shape, self.inputs)
        return [(shape[0], shape[1], self.hidden)]

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape), self.inputs)
        t_len, n = x.shape[0], x.shape[1]
        y = lstm_forward(x.reshape(t_len, n, self.inputs), self.weight_ih, self.weight_hh,
                         self.bias, self.clipping_threshold)
        return (y,)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_output={self.hidden}, inputs={self.inputs}, "
                f"clipping_threshold={self.clipping_threshold:g}")



# ---------------------------------------------------------------------------- Reverse
@register("Reverse")
class Reverse(Layer):
    """Flip along ``reverse_param.axis`` (default 0; 0 <= axis < bottom dims)."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        _no_in_place(self)
        self.axis = int(param.reverse_param.axis)
        self._check(tuple(bottom_shapes[0]))

    def _check(self, shape: Shape) -> None:
        if len(shape) == 0:
            raise self.error(ShapeError, "Reverse does not support a 0-axis bottom")
        if not 0 <= self.axis < len(shape):
            raise self.error(ShapeError, f"reverse_param.axis must be in [0, {len(shape)}) for a "
                                         f"{len(shape)}-D bottom, got {self.axis}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        self._check(tuple(bottom_shapes[0]))
        return [tuple(int(d) for d in bottom_shapes[0])]

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape))
        return (torch.flip(x, (self.axis,)),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, axis={self.axis}"


# ---------------------------------------------------------------------------- Transpose
@register("Transpose")
class Transpose(Layer):
    """Permute axes: top axis i = bottom axis ``transpose_param.dim[i]``."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        _no_in_place(self)
        self.dims = tuple(int(d) for d in param.transpose_param.dim)
        if sorted(self.dims) != list(range(len(self.dims))):
            raise self.error(SchemaError, f"transpose_param.dim must be a permutation of "
                                          f"0..{len(self.dims) - 1}, got {list(self.dims)}")
        self._check(tuple(bottom_shapes[0]))

    def _check(self, shape: Shape) -> None:
        if len(shape) == 0:
            raise self.error(ShapeError, "Transpose needs a bottom with at least one axis")
        if len(shape) != len(self.dims):
            raise self.error(ShapeError, f"transpose_param.dim has {len(self.dims)} entries but "
                                         f"the bottom has {len(shape)} axes {shape}")

    def infer_top_shapes(self, bottom_shapes, bottom_dtypes=None) -> List[Shape]:
        shape = tuple(int(d) for d in bottom_shapes[0])
        self._check(shape)
        return [tuple(shape[d] for d in self.dims)]

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        self._check(tuple(x.shape))
        return (x.permute(self.dims).contiguous(),)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={list(self.dims)}"
