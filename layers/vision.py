"""Vision layers: Convolution, Deconvolution, Pooling, LRN, SPP, Im2col, and the MobileNet
forks' depthwise convolution types (DepthwiseConvolution, ConvolutionDepthwise).

Each is one torch op where Caffe's semantics allow it, with explicit padding where Caffe's
geometry differs from PyTorch's:

- Convolution: Caffe's output size truncates ``(in + 2p - ext) / s`` toward zero, so an
  input smaller than the kernel extent still gives one output (the missing taps read
  zeros); we pad those zeros explicitly.  Leading axes before ``axis`` are flattened into
  the batch, as Caffe's ``num_``; 0 to 3 spatial axes are supported.
- Pooling (``caffe_pool2d``): Caffe's ceil/floor size with the pad rule; pad may be up to
  ``k - 1``; with pad 0 and stride > kernel, ceil mode can create windows that lie
  entirely past the input (MAX gives ``-FLT_MAX``, AVE ``0/0 = NaN`` or ``-0``, exactly as
  Caffe's CPU code).  MAX ties go to the first maximum in row-major scan order.
  ``round_mode: FLOOR`` (BVLC master) and ``ceil_mode: false`` (the model-zoo forks) floor.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from caffe_compat.limits import check_shape
from caffe_compat.errors import GraphError, SchemaError, ShapeError
from caffe_compat.layers.base import TRAIN, Layer, canonical_axis, spatial_params
from caffe_compat.layers.neuron import random_uniform
from caffe_compat.layers.registry import register
from caffe_compat.protos import caffe_pb2

__all__ = ["Convolution", "Deconvolution", "DepthwiseConvolution", "ConvolutionDepthwise",
           "Pooling", "LRN", "SPP", "Im2col",
           "caffe_pool2d", "caffe_pooled_size"]

FLT_MAX = float(np.finfo(np.float32).max)
FLT_MIN = float(np.finfo(np.float32).tiny)

MAX, AVE, STOCHASTIC = 0, 1, 2
_POOL_NAMES = {MAX: "MAX", AVE: "AVE", STOCHASTIC: "STOCHASTIC"}


def _check_enum(layer: Layer, value: int, names: dict, field: str) -> int:
    if value not in names:
        allowed = ", ".join(f"{v} ({k})" for k, v in names.items())
        raise layer.error(SchemaError, f"{field} {value} is not one of {allowed}")
    return int(value)


def _axis_values(p, name: str, nsp: int, default: Optional[int], *, layer: str) -> List[int]:
    """``spatial_params`` that also knows ``kernel_h``/``kernel_w`` belong to ``kernel_size``."""
    if name == "kernel_size":
        has_h, has_w = p.HasField("kernel_h"), p.HasField("kernel_w")
        if has_h or has_w:
            rep = getattr(p, name)
            given = len(rep) if not isinstance(rep, int) else int(p.HasField(name))
            if nsp != 2:
                raise SchemaError("kernel_h/kernel_w are for 2-D spatial blobs only", layer=layer)
            if given:
                raise SchemaError("give either kernel_size or kernel_h/kernel_w, not both",
                                  layer=layer)
            if not (has_h and has_w):
                raise SchemaError("kernel_h and kernel_w must be given together", layer=layer)
            return [int(p.kernel_h), int(p.kernel_w)]
    return spatial_params(p, name, nsp, default, layer=layer)


# ---------------------------------------------------------------------------- convolution
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _trunc_div(a: int, b: int) -> int:
    """C++ integer division (truncates toward zero)."""
    q = abs(a) // abs(b)
    same_sign = (a >= 0) if b > 0 else (a < 0)  # no SymBool == bool (torch.export sizes)
    return q if same_sign else -q


class _ConvGeometry(Layer):
    """Shared parsing of ``convolution_param`` (Caffe's BaseConvolutionLayer::LayerSetUp)."""

    def _parse_geometry(self, cp, shape: Sequence[int]) -> None:
        self.axis = canonical_axis(int(cp.axis), len(shape), layer=self.name)
        nsp = len(shape) - self.axis - 1
        self.num_spatial = nsp
        self.kernel = _axis_values(cp, "kernel_size", nsp, None if nsp else 1, layer=self.name)
        self.stride = spatial_params(cp, "stride", nsp, 1, layer=self.name)
        self.pad = spatial_params(cp, "pad", nsp, 0, layer=self.name)
        self.dilation = spatial_params(cp, "dilation", nsp, 1, layer=self.name)
        for what, vals in (("kernel_size", self.kernel), ("stride", self.stride),
                           ("dilation", self.dilation)):
            if any(v <= 0 for v in vals):
                raise self.error(SchemaError, f"{what} must be positive, got {vals}")
        self.channels = int(shape[self.axis])

    def _split(self, x: Tensor) -> Tuple[Tuple[int, ...], Tensor]:
        """(leading shape, x as (num, C, *spatial)) after Caffe's shape checks."""
        if x.dim() != self.axis + 1 + self.num_spatial:
            raise self.error(ShapeError, f"expected a {self.axis + 1 + self.num_spatial}-D bottom "
                                         f"(channels on axis {self.axis}), got {tuple(x.shape)}")
        if x.shape[self.axis] != self.channels:
            raise self.error(ShapeError, f"expected {self.channels} channels on axis {self.axis}, "
                                         f"got shape {tuple(x.shape)}")
        lead = tuple(x.shape[:self.axis])
        num = math.prod(lead)
        return lead, x.reshape((num, self.channels) + tuple(x.shape[self.axis + 1:]))

    def _conv_padding(self, spatial: Sequence[int]) -> Tuple[List[int], Optional[List[int]]]:
        """Caffe's conv output sizes and, if some axis needs zeros past its end, F.pad's list."""
        outs, extra = [], []
        for n, k, s, p, d in zip(spatial, self.kernel, self.stride, self.pad, self.dilation):
            ext = d * (k - 1) + 1
            out = _trunc_div(n + 2 * p - ext, s) + 1
            if out <= 0:
                raise self.error(ShapeError, f"spatial size {n} with pad {p} is too small for "
                                             f"kernel extent {ext} (output {out})")
            outs.append(out)
            extra.append(max(0, (out - 1) * s + ext - (n + 2 * p)))
        if not any(extra):
            return outs, None
        pads: List[int] = []
        for p, e in zip(reversed(self.pad), reversed(extra)):
            pads += [p, p + e]
        return outs, pads


@register("Convolution")
class Convolution(_ConvGeometry):
    """Caffe convolution: bottom i -> top i with shared weights.

    Blobs: ``weight`` (num_output, C / group, *kernel), ``bias`` (num_output,) if bias_term.
    """

    min_bottoms = 1
    transposed = False

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        if len(param.top) != len(bottom_shapes):
            raise self.error(GraphError, f"{param.type} needs as many tops as bottoms, got "
                                         f"{len(bottom_shapes)} bottom(s), {len(param.top)} top(s)")
        shape = tuple(bottom_shapes[0])
        for s in bottom_shapes[1:]:
            if tuple(s) != shape:
                raise self.error(ShapeError, f"all bottoms must have the same shape: "
                                             f"{shape} vs {tuple(s)}")
        cp = param.convolution_param
        self._parse_geometry(cp, shape)
        if self.num_spatial > 3:
            raise self.error(ShapeError, f"{self.num_spatial} spatial axes are not supported "
                                         "(at most 3)")
        self.num_output, self.group = self._output_and_group(cp)
        if self.num_output <= 0:
            raise self.error(SchemaError, "num_output must be positive")
        if self.group <= 0 or self.channels % self.group or self.num_output % self.group:
            raise self.error(ShapeError, f"group {self.group} must divide both the input channels "
                                         f"({self.channels}) and num_output ({self.num_output})")
        if self.transposed:
            wshape = (self.channels, self.num_output // self.group)
        else:
            wshape = (self.num_output, self.channels // self.group)
        self.add_blob("weight", wshape + tuple(self.kernel), cp.weight_filler)
        self.bias_term = bool(cp.bias_term)
        if self.bias_term:
            self.add_blob("bias", (self.num_output,), cp.bias_filler)
        else:
            self.bias = None

    def _output_and_group(self, cp) -> Tuple[int, int]:
        """``(num_output, group)``; the depthwise forks' layer types override it."""
        return int(cp.num_output), int(cp.group)

    def add_bias(self, value: Tensor) -> Tensor:
        """Give a convolution built without ``bias_term`` its ``bias`` blob (Caffe's blob 1).

        For inference passes that fold a per-channel shift into the convolution
        (``caffe_compat.fuse``); the layer's definition then says ``bias_term: true``, so a
        caffemodel saved afterwards describes its two blobs.
        """
        if self.bias_term:
            raise self.error(GraphError, "the convolution already has a bias")
        if tuple(value.shape) != (self.num_output,):
            raise self.error(ShapeError, f"bias must have shape ({self.num_output},), "
                                         f"got {tuple(value.shape)}")
        del self.bias  # the plain None attribute set in __init__
        self.add_blob("bias", (self.num_output,), value=value)
        self.bias_term = True
        self.param.convolution_param.bias_term = True
        return self.bias

    def forward(self, *bottoms: Tensor) -> Tuple[Tensor, ...]:
        return tuple(self._one(x) for x in bottoms)

    def _one(self, x: Tensor) -> Tensor:
        lead, xb = self._split(x)
        w = self.weight
        stride, pad, dil = self.stride, self.pad, self.dilation
        if self.num_spatial == 0:  # a per-position matrix product (Caffe allows it)
            xb, w = xb.unsqueeze(-1), w.unsqueeze(-1)
            stride, pad, dil = [1], [0], [1]
            y = self._op(xb, w, stride, pad, dil, 1).squeeze(-1)
        else:
            y = self._op(xb, w, stride, pad, dil, self.num_spatial)
        return y.reshape(lead + tuple(y.shape[1:]))

    def _op(self, xb: Tensor, w: Tensor, stride, pad, dil, nsp: int) -> Tensor:
        if self.num_spatial:
            _, fpad = self._conv_padding(xb.shape[2:])
            if fpad is not None:
                xb, pad = F.pad(xb, fpad), [0] * nsp
        return _CONV[nsp](xb, w, self.bias, tuple(stride), tuple(pad), tuple(dil), self.group)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, num_output={self.num_output}, kernel={self.kernel}, "
                f"stride={self.stride}, pad={self.pad}, dilation={self.dilation}, "
                f"group={self.group}, bias_term={self.bias_term}, axis={self.axis}")


@register("Deconvolution")
class Deconvolution(Convolution):
    """Transposed convolution: ``out = s (i - 1) + d (k - 1) + 1 - 2 p`` per spatial axis.

    Blobs: ``weight`` (C_in, num_output / group, *kernel) as ConvTranspose, ``bias``.
    """

    transposed = True

    def _op(self, xb: Tensor, w: Tensor, stride, pad, dil, nsp: int) -> Tensor:
        for n, k, s, p, d in zip(xb.shape[2:], self.kernel, stride, pad, dil):
            out = s * (n - 1) + d * (k - 1) + 1 - 2 * p
            if out <= 0:
                raise self.error(ShapeError, f"deconvolution output size {out} <= 0 for input "
                                             f"{n}, kernel {k}, stride {s}, pad {p}, dilation {d}")
        return _CONV_T[nsp](xb, w, self.bias, tuple(stride), tuple(pad), 0, self.group,
                            tuple(dil))


@register("DepthwiseConvolution")
class DepthwiseConvolution(Convolution):
    """The MobileNet fork's "DepthwiseConvolution" (yonghenglh6/DepthwiseConvolution, as
    copied into eric612/MobileNet-YOLO @ 69b4441cb3ec8d553fbdef788ad033e246f901bd,
    ``depthwise_conv_layer.cpp``/``.cu``): a BaseConvolutionLayer whose CPU path is plain
    Caffe convolution with the prototxt's ``group`` and ``num_output`` (the fork's tool
    renames every ``group != 1`` Convolution to this type), so it is Convolution itself.

    Its CUDA kernel is only right for ``group == channels == num_output`` and ignores
    ``dilation``; nets outside that case are flagged by ``lint`` (the GPU fork would compute
    something else there).
    """

    def lint(self, bottom_producers) -> List[str]:
        c = self.channels
        if self.group == c and self.num_output == c and all(d == 1 for d in self.dilation):
            return []
        return [f"DepthwiseConvolution with group {self.group}, num_output {self.num_output}, "
                f"dilation {self.dilation} on {c} channels: computed as a grouped Convolution "
                "(the fork's CPU path); the fork's GPU kernel assumes group == channels == "
                "num_output and no dilation, and would give other results"]


@register("ConvolutionDepthwise")
class ConvolutionDepthwise(Convolution):
    """The ShuffleNet/MobileNet-SSD forks' "ConvolutionDepthwise" (farmingyard/caffe-mobilenet
    @ f7d7d130761727560f201c1ff5c274e938888b5f, ``conv_dw_layer.cpp``, from BVLC pull request
    5665): one filter per input channel whatever ``num_output`` and ``group`` say.

    The fork sizes its blobs from the bottom alone (weight ``(C, 1, kh, kw)``, bias ``(C,)``),
    gives the top ``C`` channels, takes one 4-D bottom and honours kernel/stride/pad/dilation
    (``_h``/``_w`` forms included) and ``bias_term``; its output size is Caffe's.  So it is
    Convolution with ``num_output = group = C``.  ``axis`` other than 1 is refused (the fork
    has no such notion); a ``num_output`` other than ``C`` is ignored, as the fork does, and
    reported by ``lint``.
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        shape = tuple(bottom_shapes[0]) if bottom_shapes else ()
        if len(shape) != 4:
            raise GraphError(f"ConvolutionDepthwise needs one 4-D bottom (N, C, H, W), got "
                             f"{[tuple(s) for s in bottom_shapes]}", layer=param.name)
        if param.convolution_param.axis != 1:
            raise SchemaError("ConvolutionDepthwise works on axis 1 only, got axis "
                              f"{param.convolution_param.axis}", layer=param.name)
        super().__init__(param, bottom_shapes, ctx)

    def _output_and_group(self, cp) -> Tuple[int, int]:
        return self.channels, self.channels

    def lint(self, bottom_producers) -> List[str]:
        cp = self.param.convolution_param
        if cp.HasField("num_output") and int(cp.num_output) != self.channels:
            return [f"ConvolutionDepthwise: num_output {cp.num_output} is ignored; the top has "
                    f"the bottom's {self.channels} channels (as in the fork)"]
        return []


@register("Im2col")
class Im2col(_ConvGeometry):
    """Caffe's im2col as a layer: (.., C, H, W) -> (.., C * kh * kw, OH, OW), channel-major."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        self._parse_geometry(param.convolution_param, tuple(bottom_shapes[0]))
        if self.num_spatial > 2:
            raise self.error(ShapeError, f"Im2col supports at most 2 spatial axes, "
                                         f"got {self.num_spatial}")

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        lead, xb = self._split(x)
        if self.num_spatial == 0:
            return (x.reshape(x.shape),)
        outs, fpad = self._conv_padding(xb.shape[2:])
        pad = list(self.pad)
        if fpad is not None:
            xb, pad = F.pad(xb, fpad), [0] * self.num_spatial
        kernel, stride, dil = list(self.kernel), list(self.stride), list(self.dilation)
        if self.num_spatial == 1:
            xb = xb.unsqueeze(2)
            kernel, stride, dil, pad = [1] + kernel, [1] + stride, [1] + dil, [0] + pad
        cols = F.unfold(xb, tuple(kernel), tuple(dil), tuple(pad), tuple(stride))
        return (cols.reshape(lead + (cols.shape[1],) + tuple(outs)),)


# ---------------------------------------------------------------------------- pooling
def caffe_pooled_size(size: int, k: int, s: int, p: int, ceil: bool = True,
                      padded: Optional[bool] = None) -> int:
    """Caffe's pooled size: ceil (or floor) of ``(size + 2p - k) / s`` plus 1; if the layer
    has any padding (``padded``, on either axis; default ``p > 0``) the last window is
    dropped when it would start in the right padding."""
    num = size + 2 * p - k
    # ceil(num / s) as PyTorch writes it: the same integer, and for symbolic sizes
    # (torch.export) the same expression as _torch_pooled_size's, so comparing them is no guard
    out = ((num + s - 1) // s if ceil else num // s) + 1
    if (p > 0 if padded is None else padded) and (out - 1) * s >= size + p:
        out -= 1
    return out


def _torch_pooled_size(size: int, k: int, s: int, p: int, ceil: bool) -> Optional[int]:
    """PyTorch's pooled size, or None where PyTorch would refuse the geometry."""
    if 2 * p > k or size + 2 * p < k:
        return None
    out = (size + 2 * p - k + (s - 1 if ceil else 0)) // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


def _avg_pool2d(x: Tensor, *args, **kwargs) -> Tensor:
    """``F.avg_pool2d`` run on an NCHW-contiguous input on CUDA.

    With a channels-last input on CUDA (torch 2.11, H200) the input gradient of padded
    average windows came out wrong (golden nets pool_ave_k3s2p1, lrn_within, spp_ave2 in
    NHWC; forward was right; ``benchmarks/gpu_diag_avgpool.py`` shows the cases).  The
    copy costs one layout change per average-pooling layer, rare in channels-last nets.
    """
    if x.is_cuda and not x.is_contiguous():
        x = x.contiguous()
    return F.avg_pool2d(x, *args, **kwargs)


def _window_sums(x: Tensor, kh: int, kw: int, sh: int, sw: int) -> Tensor:
    """Sums over the (unpadded, floor) windows.  Under torch.export as the mean times the
    window size: ONNX ``AveragePool`` has no ``divisor_override`` and torch's ONNX exporter
    drops it, which would divide the sums silently (fp32 rounding: ~1e-7 relative)."""
    if torch.compiler.is_exporting():
        return _avg_pool2d(x, (kh, kw), (sh, sw), 0) * float(kh * kw)
    return _avg_pool2d(x, (kh, kw), (sh, sw), 0, divisor_override=1)


_DIVISORS: "OrderedDict[tuple, Tensor]" = OrderedDict()


def _ave_divisors(H: int, W: int, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                  OH: int, OW: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Caffe's AVE window sizes (clipped to the padded map), cached per geometry and device:
    no host-to-device copy per forward, which also lets such nets be captured as CUDA graphs.
    Under torch.export they are built from ``arange``, uncached: the trace's fake tensors
    and symbolic sizes must not outlive it in the cache."""
    if torch.compiler.is_exporting() or any(isinstance(v, torch.SymInt) for v in (H, W, OH, OW)):
        def sizes(n, k: int, s: int, p: int, out) -> Tensor:
            start = torch.arange(out, device=device) * s - p
            return torch.minimum(start + k, torch.zeros_like(start) + (n + p)) - start

        return (sizes(H, kh, sh, ph, OH)[:, None] * sizes(W, kw, sw, pw, OW)[None, :]).to(dtype)
    key = (H, W, kh, kw, sh, sw, ph, pw, OH, OW, dtype, device)
    div = _DIVISORS.get(key)
    if div is None:
        sizes_h = [min(o * sh - ph + kh, H + ph) - (o * sh - ph) for o in range(OH)]
        sizes_w = [min(o * sw - pw + kw, W + pw) - (o * sw - pw) for o in range(OW)]
        div = torch.tensor([[a * b for b in sizes_w] for a in sizes_h], dtype=dtype, device=device)
        _DIVISORS[key] = div
        while len(_DIVISORS) > 64:
            _DIVISORS.popitem(last=False)
    return div


def cached_constants() -> List[Tensor]:
    """The device tensors pooling keeps between forwards (AVE divisors): a CUDA graph that
    read them must hold references, or an eviction would free memory the replay reads."""
    return list(_DIVISORS.values())


def _max_pool2d_no_indices(x: Tensor, kh: int, kw: int, sh: int, sw: int, ph: int, pw: int,
                           rh: int, rw: int, OH: int, OW: int) -> Tensor:
    """MAX pooling as a running ``torch.maximum`` over the window's strided views, rows
    then columns (``kh + kw - 2`` elementwise ops), on the explicit Caffe geometry (pad
    ``ph``/``pw`` before, ``rh``/``rw`` after; negative: cropped).

    Why: on the CPU ``F.max_pool2d`` always computes the argmax indices (it is
    ``max_pool2d_with_indices``), and its NCHW kernel is 10-20x slower than this at
    batch 1; a max is exact, so the values are Caffe's bit for bit (NaN propagates, as in
    ``F.max_pool2d``).  Forward only: ``torch.maximum`` splits the gradient on ties, Caffe
    sends it to the first maximum, so the caller uses this only where no gradient flows.
    Works in either memory layout (the views keep ``x``'s strides).
    """
    if ph or pw or rh > 0 or rw > 0:
        x = F.pad(x, (pw, max(rw, 0), ph, max(rh, 0)), value=float("-inf"))
    rows_end = (OH - 1) * sh + 1
    y = x[:, :, 0:rows_end:sh, :]
    for i in range(1, kh):
        y = torch.maximum(y, x[:, :, i:i + rows_end:sh, :])
    cols_end = (OW - 1) * sw + 1
    z = y[:, :, :, 0:cols_end:sw]
    for j in range(1, kw):
        z = torch.maximum(z, y[:, :, :, j:j + cols_end:sw])
    return z.clone() if z.data_ptr() == x.data_ptr() or kh == kw == 1 else z  # never a view of x


def caffe_pool2d(x: Tensor, method: int, kernel: Sequence[int], stride: Sequence[int],
                 pad: Sequence[int], ceil: bool = True, *, return_mask: bool = False,
                 train: bool = False, generator: Optional[torch.Generator] = None,
                 layer: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Caffe's 2-D pooling of ``x`` (N, C, H, W) -> (top (N, C, OH, OW), mask or None).

    ``method``: 0 MAX, 1 AVE, 2 STOCHASTIC.  ``kernel``/``stride``/``pad`` are (h, w).
    MAX ignores padding and sends the gradient to the first maximum in scan order;
    ``return_mask`` also gives Caffe's argmax top: flat ``h * W + w`` as x's dtype.
    AVE divides by the window clipped to the padded map.  STOCHASTIC (pad must be 0):
    at TEST ``sum(x^2) / (FLT_MIN + sum(x))`` per window (gradient 0 where the sum is 0;
    Caffe has no TEST backward); at TRAIN picks the first position whose running sum
    reaches ``u * sum``, ``u ~ U[0, 1)`` from ``generator``, and routes the gradient there.
    """
    if x.dim() != 4:
        raise ShapeError(f"pooling needs a 4-D (N, C, H, W) bottom, got {tuple(x.shape)}",
                         layer=layer)
    # plain shape values: ints eagerly, symbolic sizes under torch.export (int() would fix them)
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, pad
    for k, p in ((kh, ph), (kw, pw)):
        if p and p >= k:
            raise ShapeError(f"pad {p} must be smaller than kernel {k}", layer=layer)
    padded = bool(ph or pw)  # Caffe applies the drop rule to both axes if either is padded
    OH = caffe_pooled_size(H, kh, sh, ph, ceil, padded)
    OW = caffe_pooled_size(W, kw, sw, pw, ceil, padded)
    if OH <= 0 or OW <= 0 or ((ph or pw) and ((OH - 1) * sh >= H + ph or (OW - 1) * sw >= W + pw)):
        raise ShapeError(f"pooled size {OH}x{OW} from input {H}x{W}, kernel {kh}x{kw}, "
                         f"stride {sh}x{sw}, pad {ph}x{pw} is not valid", layer=layer)
    fast = (_torch_pooled_size(H, kh, sh, ph, ceil) == OH
            and _torch_pooled_size(W, kw, sw, pw, ceil) == OW)
    # explicit geometry: pad left by p, right up to the end of the last window (or crop)
    rh = (OH - 1) * sh + kh - H - ph
    rw = (OW - 1) * sw + kw - W - pw
    if not fast and not isinstance(H * W, torch.SymInt):  # a stride far above the map
        # would pad the input to an absurd size (a traced size is checked when it runs)
        check_shape((N, C, H + ph + max(rh, 0), W + pw + max(rw, 0)), what="padded pooling input",
                    layer=layer)

    if method == MAX:
        if not return_mask and not (torch.is_grad_enabled() and x.requires_grad) and x.device.type == "cpu":
            y = _max_pool2d_no_indices(x, kh, kw, sh, sw, ph, pw, rh, rw, OH, OW)
            empty = (OH - 1) * sh - ph >= H or (OW - 1) * sw - pw >= W
            return (y.clamp_min(-FLT_MAX) if empty else y), None
        if fast:
            if return_mask:
                y, idx = F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil,
                                      return_indices=True)
                return y, idx.to(x.dtype)
            return F.max_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil), None
        xp = F.pad(x, (pw, rw, ph, rh), value=float("-inf"))
        if return_mask:
            y, idx = F.max_pool2d(xp, (kh, kw), (sh, sw), 0, return_indices=True)
        else:
            y = F.max_pool2d(xp, (kh, kw), (sh, sw), 0)
        empty = (OH - 1) * sh - ph >= H or (OW - 1) * sw - pw >= W
        if empty:  # windows past the input: Caffe leaves -FLT_MAX there
            y = y.clamp_min(-FLT_MAX)
        mask = None
        if return_mask:
            Wp = W + pw + rw
            hh, ww = idx // Wp - ph, idx % Wp - pw
            inside = (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
            mask = torch.where(inside, hh * W + ww, torch.full_like(idx, -1)).to(x.dtype)
        return y, mask

    if method == AVE:
        if fast:
            return _avg_pool2d(x, (kh, kw), (sh, sw), (ph, pw), ceil_mode=ceil,
                                count_include_pad=True), None
        xp = F.pad(x, (pw, rw, ph, rh))
        sums = _window_sums(xp, kh, kw, sh, sw)
        return sums / _ave_divisors(H, W, kh, kw, sh, sw, ph, pw, OH, OW, x.dtype, x.device), None

    if method == STOCHASTIC:
        if ph or pw:
            raise ShapeError("padding is implemented only for AVE and MAX pooling", layer=layer)
        xp = F.pad(x, (0, rw, 0, rh))
        if not train:
            sums = _window_sums(xp, kh, kw, sh, sw)
            sq = _window_sums(xp * xp, kh, kw, sh, sw)
            zero = (sums == 0).detach()
            safe = torch.where(zero, torch.ones_like(sums), sums + FLT_MIN)
            return torch.where(zero, (sq / FLT_MIN).detach(), sq / safe), None
        cols = F.unfold(xp, (kh, kw), stride=(sh, sw)).reshape(N, C, kh * kw, OH * OW)
        cum = cols.detach().cumsum(2)
        thres = random_uniform((N, C, 1, OH * OW), x, generator) * cum[:, :, -1:, :]
        hit = cum >= thres
        first = hit.to(torch.int8).argmax(2, keepdim=True)
        picked = cols.gather(2, first)
        picked = torch.where(hit.any(2, keepdim=True), picked, torch.zeros_like(picked))
        return picked.reshape(N, C, OH, OW), None

    raise SchemaError(f"unknown pooling method {method}", layer=layer)


@register("Pooling")
class Pooling(Layer):
    """Caffe pooling (MAX / AVE / STOCHASTIC); optional second top = MAX argmax mask."""

    exact_bottoms = 1
    min_tops = 1
    max_tops = 2

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        pp = param.pooling_param
        self.method = _check_enum(self, pp.pool, _POOL_NAMES, "pool")
        if len(param.top) == 2 and self.method != MAX:
            raise self.error(GraphError, "only MAX pooling has a second (mask) top")
        self.global_pooling = bool(pp.global_pooling)
        has_kernel = any(pp.HasField(f) for f in ("kernel_size", "kernel_h", "kernel_w"))
        if self.global_pooling:
            if has_kernel:
                raise self.error(SchemaError, "with global_pooling the kernel size must not be "
                                              "given")
            self.kernel = None
        else:
            self.kernel = _axis_values(pp, "kernel_size", 2, None, layer=self.name)
            if any(k <= 0 for k in self.kernel):
                raise self.error(SchemaError, f"kernel size must be positive, got {self.kernel}")
        self.pad = spatial_params(pp, "pad", 2, 0, layer=self.name)
        self.stride = spatial_params(pp, "stride", 2, 1, layer=self.name)
        if any(s <= 0 for s in self.stride):
            raise self.error(SchemaError, f"stride must be positive, got {self.stride}")
        if self.global_pooling and (any(self.pad) or any(s != 1 for s in self.stride)):
            raise self.error(SchemaError, "with global_pooling only pad 0 and stride 1 are allowed")
        if any(self.pad) and self.method == STOCHASTIC:
            raise self.error(SchemaError, "padding is implemented only for AVE and MAX pooling")
        if self.kernel is not None:
            for k, p in zip(self.kernel, self.pad):
                if p >= k and p:
                    raise self.error(SchemaError, f"pad {p} must be smaller than kernel {k}")
        self.ceil = self._parse_rounding(pp)
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(ShapeError, f"Pooling needs a 4-D bottom (N, C, H, W), got {shape}")

    def _parse_rounding(self, pp) -> bool:
        """Ceil (True) or floor (False) output sizes, from BVLC master's ``round_mode`` or the
        model-zoo forks' ``ceil_mode`` (BVLC pull request 3057, used by DenseNet/DPN/ResNeXt).

        PR 3057's Reshape only swaps ``ceil`` for ``floor`` in the size formula and keeps the
        rule that drops a last window starting in the padding, which is what BVLC master's
        ``round_mode: FLOOR`` does too (with floor that rule never fires, as pad < kernel):
        ``ceil_mode: false`` is ``round_mode: FLOOR`` and ``ceil_mode: true`` is ``CEIL``.
        Both may be given if they agree; contradicting values are refused.
        """
        rm = _check_enum(self, pp.round_mode, {0: "CEIL", 1: "FLOOR"}, "round_mode")
        ceil = rm == 0
        if "ceil_mode" in pp.DESCRIPTOR.fields_by_name and pp.HasField("ceil_mode"):
            if pp.HasField("round_mode") and bool(pp.ceil_mode) != ceil:
                raise self.error(SchemaError, f"ceil_mode: {str(bool(pp.ceil_mode)).lower()} "
                                              f"contradicts round_mode: {'CEIL' if ceil else 'FLOOR'}"
                                              "; give one of them (ceil_mode: false means "
                                              "round_mode: FLOOR)")
            ceil = bool(pp.ceil_mode)
        return ceil

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        kernel = self.kernel if self.kernel is not None else [int(x.shape[-2]), int(x.shape[-1])]
        y, mask = caffe_pool2d(x, self.method, kernel, self.stride, self.pad, self.ceil,
                               return_mask=len(self.top_names) == 2,
                               train=self.phase == TRAIN, generator=self.ctx.generator,
                               layer=self.name)
        return (y, mask) if len(self.top_names) == 2 else (y,)

    def extra_repr(self) -> str:
        k = "global" if self.global_pooling else self.kernel
        return (f"name={self.name!r}, pool={_POOL_NAMES[self.method]}, kernel={k}, "
                f"stride={self.stride}, pad={self.pad}, "
                f"round_mode={'CEIL' if self.ceil else 'FLOOR'}")


@register("SPP")
class SPP(Layer):
    """Spatial pyramid pooling: level l pools into 2^l x 2^l bins, flattened and concatenated
    (a pyramid of height 1 gives the 4-D pooled blob unflattened, as Caffe)."""

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        sp = param.spp_param
        self.pyramid_height = int(sp.pyramid_height)
        if self.pyramid_height < 1:
            raise self.error(SchemaError, "pyramid_height must be at least 1")
        self.method = _check_enum(self, sp.pool, _POOL_NAMES, "pool")
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(ShapeError, f"SPP needs a 4-D bottom (N, C, H, W), got {shape}")

    @staticmethod
    def level_geometry(size: int, level: int) -> Tuple[int, int]:
        """(kernel = stride, pad) of pyramid level ``level`` along an axis of ``size``."""
        bins = 2 ** level
        k = -(-size // bins)
        return k, (k * bins - size + 1) // 2

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() != 4 or x.shape[2] <= 0 or x.shape[3] <= 0:
            raise self.error(ShapeError, f"SPP needs a non-empty 4-D bottom, got {tuple(x.shape)}")
        H, W = int(x.shape[2]), int(x.shape[3])
        outs = []
        for level in range(self.pyramid_height):
            (kh, ph), (kw, pw) = self.level_geometry(H, level), self.level_geometry(W, level)
            y, _ = caffe_pool2d(x, self.method, (kh, kw), (kh, kw), (ph, pw), True,
                                train=self.phase == TRAIN, generator=self.ctx.generator,
                                layer=self.name)
            if self.pyramid_height == 1:
                return (y,)
            outs.append(y.flatten(1))
        return (torch.cat(outs, 1),)


# ---------------------------------------------------------------------------- LRN
def _lrn_across_no_grad(x: Tensor, n: int, pre: int, alpha: float, beta: float,
                        k: float) -> Tensor:
    """ACROSS_CHANNELS LRN where no gradient flows: the channel-window sum as ``n - 1``
    in-place adds of channel-shifted views (in either memory layout: the avg_pool2d over
    a reshaped map copies NHWC inputs, and was 5-10x slower), and ``scale ** -beta`` as
    square roots for Caffe's usual betas (0.75, 0.5, 1).  Same numbers up to fp32
    rounding (a few 1e-7 relative); the autograd path keeps the pooled form.
    """
    C = x.shape[1]
    sq = F.pad(x * x, (0, 0, 0, 0, pre, pre))
    s = sq[:, 0:C].clone()
    for i in range(1, n):
        s.add_(sq[:, i:i + C])
    s.mul_(alpha / n).add_(k)
    if beta == 0.75:
        r = s.rsqrt_()
        return x * r * r.sqrt()
    if beta == 0.5:
        return x * s.rsqrt_()
    if beta == 1.0:
        return x / s
    return x * s.pow_(-beta)


@register("LRN")
class LRN(Layer):
    """Local response normalization.

    ACROSS_CHANNELS: ``x * (k + alpha / n * sum_{|c' - c| <= (n-1)/2} x_c'^2) ** -beta``.
    WITHIN_CHANNEL: ``x * (1 + alpha / n^2 * sum_{n x n window, zero pad (n-1)/2} x^2) ** -beta``
    (``k`` is ignored, as in Caffe).
    """

    exact_bottoms = 1
    exact_tops = 1

    def __init__(self, param, bottom_shapes, ctx):
        super().__init__(param, bottom_shapes, ctx)
        lp = param.lrn_param
        self.size = int(lp.local_size)
        if self.size % 2 != 1:
            raise self.error(SchemaError, f"LRN only supports odd values for local_size, "
                                          f"got {self.size}")
        self.alpha, self.beta, self.k = float(lp.alpha), float(lp.beta), float(lp.k)
        self.region = _check_enum(self, lp.norm_region,
                                  {0: "ACROSS_CHANNELS", 1: "WITHIN_CHANNEL"}, "norm_region")
        shape = tuple(bottom_shapes[0])
        if len(shape) != 4:
            raise self.error(ShapeError, f"LRN needs a 4-D bottom (N, C, H, W), got {shape}")

    def forward(self, x: Tensor) -> Tuple[Tensor]:
        if x.dim() != 4:
            raise self.error(ShapeError, f"LRN needs a 4-D bottom, got {tuple(x.shape)}")
        n, pre = self.size, (self.size - 1) // 2
        if self.region == 0 and not (torch.is_grad_enabled() and x.requires_grad):
            return (_lrn_across_no_grad(x, n, pre, self.alpha, self.beta, self.k),)
        sq = x * x
        if self.region == 0:
            N, C, H, W = x.shape
            # mean over a channel window of n (zero padded): divisor is always n
            mean = _avg_pool2d(sq.reshape(N, 1, C, H * W), (n, 1), 1, (pre, 0),
                                count_include_pad=True).reshape(x.shape)
            scale = mean * self.alpha + self.k
        else:
            # Caffe: AVE pooling n x n, pad (n-1)/2: every window has n*n elements
            mean = _avg_pool2d(sq, n, 1, pre, count_include_pad=True)
            scale = mean * self.alpha + 1.0
        return (x * scale.pow(-self.beta),)

    def extra_repr(self) -> str:
        region = "ACROSS_CHANNELS" if self.region == 0 else "WITHIN_CHANNEL"
        return (f"name={self.name!r}, local_size={self.size}, alpha={self.alpha}, "
                f"beta={self.beta}, k={self.k}, norm_region={region}")
