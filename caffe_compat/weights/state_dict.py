"""A net's weights as a PyTorch state dict: ``.safetensors`` and ``.pt`` files.

Keys are ``<layer>.<param>`` in PyTorch's vocabulary (see README "Weights"):
Convolution/InnerProduct/Deconvolution/Embed ``weight``, ``bias``; PReLU ``weight``;
Scale ``weight`` (+ ``bias``); Bias ``bias``; BatchNorm ``running_mean``, ``running_var``,
``scale_factor`` holding Caffe's three blobs as stored (the mean/variance *sums* and their
scale factor; the layer divides at run time, so a caffemodel round trip is bit-exact);
:func:`fold_batchnorm` turns them into plain statistics with a scale factor of 1.

Nothing here runs code from a file: ``.pt`` files load with ``torch.load(weights_only=True)``,
and nothing caffe-compat writes needs pickle.
"""
from __future__ import annotations

import json
import os
import re
import stat
from typing import Dict, List, Optional, Tuple

import torch

from caffe_compat.atomic import atomic_open
from caffe_compat.errors import ParseError, WeightsError, name_list, shorten
from caffe_compat.file_kind import file_kind_hint
from caffe_compat.weights.trained_layers import check_finite_array, want_finite_check

StateDict = Dict[str, torch.Tensor]

__all__ = ["StateDict", "net_state_dict", "load_state_into", "read_safetensors", "read_pt",
           "save_safetensors", "save_pt", "fold_batchnorm"]


def net_state_dict(net, *, dedupe_shared: bool = False) -> StateDict:
    """The net's state dict; with ``dedupe_shared`` only the owner's key of a shared param."""
    sd = net.state_dict()
    if not dedupe_shared:
        return sd
    seen: Dict[int, str] = {}
    out = {}
    for k, v in sd.items():
        key = (v.data_ptr(), tuple(v.shape)) if v.numel() else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen[key] = k
        out[k] = v
    return out


def _key_location(net, key: str) -> Tuple[str, Optional[int]]:
    """(layer, blob index) of state-dict key ``<layer>.<attr>``, for error messages."""
    layer, _, attr = key.rpartition(".")
    mod = net._modules.get(layer)
    names = getattr(mod, "blob_names", None) or []
    return layer, (names.index(attr) if attr in names else None)


def load_state_into(net, sd: StateDict, *, allow_missing: bool = False,
                    where: str = "", check_finite: Optional[bool] = None) -> List[str]:
    """Load a state dict (from .pt/.safetensors) strictly, naming any mismatch clearly."""
    finite = want_finite_check(check_finite)
    own = net.state_dict()
    notes = []
    # shared params saved once: fill the sharers' keys from their owners
    for k, v in own.items():
        if k not in sd:
            for k2, v2 in own.items():
                if k2 in sd and v.numel() and v2.data_ptr() == v.data_ptr() and v2.shape == v.shape:
                    sd[k] = sd[k2]
                    break
    unexpected = [k for k in sd if k not in own]
    missing = [k for k in own if k not in sd]
    if unexpected:
        raise WeightsError(f"the file has keys the net lacks: {', '.join(unexpected[:10])}"
                           + (" ..." if len(unexpected) > 10 else ""), where=where)
    if missing:
        msg = f"the file lacks keys: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else "")
        if not allow_missing:
            raise WeightsError(msg + " (use allow_missing / --allow-missing)", where=where)
        notes.append(msg)
    for k in [k for k in own if k in sd]:  # the net's (Caffe's) order, not the file's
        v = sd[k]
        layer, idx = _key_location(net, k)
        if tuple(v.shape) != tuple(own[k].shape):
            raise WeightsError(f"shape mismatch for '{k}': the net expects {tuple(own[k].shape)}, "
                               f"the file has {tuple(v.shape)}", where=where or None, layer=layer, blob=idx)
        if not (v.is_floating_point() or v.dtype == own[k].dtype):
            raise WeightsError(f"'{k}' has dtype {v.dtype}, expected a floating-point tensor",
                               where=where or None, layer=layer, blob=idx)
        if finite and v.is_floating_point():
            check_finite_array(v.detach().cpu().float().numpy() if v.dtype == torch.bfloat16
                               else v.detach().cpu().numpy(), where=where, layer=layer, blob=idx, name=k)
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return notes


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _torch_load_reason(e: Exception) -> str:
    """Why torch.load refused a file, in our words: the Python global the pickle asked for
    when that is the reason (``Unsupported global: GLOBAL posix.system``, or torch's "unsupported
    GLOBAL x whose module y is blocked"), else torch's own reason.  Never torch's advice to
    load with ``weights_only=False`` (which would run the pickle's code) or to allowlist the
    global: a weights file holds tensors only."""
    text = _ANSI.sub("", str(e))
    m = _GLOBAL.search(text)
    if m:
        name = m.group(1)[:120]
        return f"the pickle asks for the Python global '{name}', which was blocked (nothing ran)"
    m = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\s*Please use|\s*Check the documentation|$)", text, re.S)
    reason = " ".join((m.group(1) if m else text).split()).rstrip(".")
    # whatever remains, drop every sentence with torch's advice to turn the safety off
    reason = " ".join(part for part in re.split(r"(?<=[.!?])\s+", reason)
                      if "weights_only" not in part and "safe_globals" not in part
                      and "trusted source" not in part and "trust the source" not in part).strip()
    reason = reason or "torch.load refused it"
    return reason if len(reason) <= 300 else reason[:297] + "..."


def _checked_path(path: str) -> str:
    """Refuse a missing, unreadable, directory or empty weights file before any parser sees it."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ParseError(f"cannot read weights: {reason}", where=str(path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise ParseError("is a directory, expected a weights file", where=path)
    if st.st_size == 0:
        raise ParseError("empty file, expected a weights file", where=path)
    return path


def read_safetensors(path: str) -> StateDict:
    """A ``.safetensors`` file as a state dict.  Its header's shapes, offsets and tensor
    count are checked against the limits before any tensor is read
    (:mod:`caffe_compat.weights.preflight`)."""
    from safetensors.torch import load_file

    from caffe_compat.weights.preflight import check_safetensors_header, read_safetensors_header

    path = _checked_path(path)
    try:
        header, data_bytes = read_safetensors_header(path)
    except ParseError as e:
        raise ParseError(f"{e.message}{file_kind_hint(path)}", where=path) from None
    check_safetensors_header(header, path, data_bytes)
    try:
        return dict(load_file(path))
    except Exception as e:
        raise ParseError(f"not a readable safetensors file: {shorten(e, 300)}{file_kind_hint(path)}",
                         where=path) from None


def read_pt(path: str) -> StateDict:
    """A ``.pt`` file as a state dict, never running code from it.

    It loads with ``torch.load(weights_only=True)``: a pickle that would import or call
    anything beyond tensors and containers is refused, not executed.
    """
    from caffe_compat.weights.preflight import check_pt_archive, check_tensors

    path = _checked_path(path)
    check_pt_archive(path)  # entry count and sizes from the zip's metadata, before torch reads it
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        msg = _torch_load_reason(e)
        raise ParseError(f"not a readable weights-only .pt file (refusing to unpickle anything "
                         f"but tensors): {msg}{file_kind_hint(path)}", where=path) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        held = type(obj).__name__
        if isinstance(obj, dict):
            held = f"a dict with keys {name_list(map(str, obj), 5)}"
            if "state_dict" in obj:
                held += " (a training checkpoint? save its 'state_dict')"
        raise WeightsError(f"a .pt weights file must hold a dict of tensors (a state dict), "
                           f"this one holds {held}", where=path)
    bad = [k for k in obj if not isinstance(k, str)]
    if bad:
        raise WeightsError(f"state dict keys must be strings, got {name_list(map(repr, bad), 3)}", where=path)
    check_tensors(obj, path)  # shapes, views and totals, before any tensor's data is used
    return dict(obj)


def save_pt(sd: StateDict, path: str) -> None:
    """Write a state dict as a ``.pt`` file (tensors only, compact and on the CPU), atomically."""
    clean = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in sd.items()}
    with atomic_open(os.fspath(path)) as f:
        torch.save(clean, f)


def save_safetensors(sd: StateDict, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
    """Write a state dict as safetensors, streamed tensor by tensor and atomically.

    The format (8-byte header length, JSON header, raw little-endian data) is written
    directly so that no second in-memory copy of the weights is built; any safetensors
    reader loads it.
    """
    clean = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "caffe-compat"})}
    offset = 0
    for k, v in clean.items():
        if v.dtype not in _ST_DTYPES:
            raise WeightsError(f"cannot write dtype {v.dtype} to safetensors", layer=k.rsplit(".", 1)[0])
        n = v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with atomic_open(os.fspath(path)) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for v in clean.values():
            if v.numel():
                f.write(memoryview(v.view(torch.uint8).numpy() if v.dtype == torch.bfloat16
                                   else v.numpy()).cast("B"))


_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}


def fold_batchnorm(sd: StateDict) -> StateDict:
    """Divide BatchNorm mean/variance sums by their scale factor (0 -> 0); factor becomes 1.

    The result holds plain statistics, what ``torch.nn.BatchNorm*d`` expects in
    ``running_mean``/``running_var`` (Caffe's BatchNorm has no affine part: a following
    Scale layer's ``weight``/``bias`` are the BN's affine parameters).  The inverse is
    taken in the blob's own dtype, as Caffe's ``1 / blobs_[2][0]`` in ``Dtype``, so the
    folded statistics are bit-identical to what the layer computes at run time.
    """
    out = dict(sd)
    for k, v in sd.items():
        if k.endswith(".scale_factor"):
            base = k[: -len(".scale_factor")]
            s = v.reshape(-1)[:1] if v.numel() else torch.ones(1, dtype=v.dtype)
            inv = torch.where(s == 0, torch.zeros_like(s), 1.0 / s)
            for nm in ("running_mean", "running_var"):
                if f"{base}.{nm}" in out:
                    sums = sd[f"{base}.{nm}"]
                    out[f"{base}.{nm}"] = sums * inv.to(sums.dtype)
            out[k] = torch.ones_like(v)
    return out
